"""Network namespaces for tests and benchmarks: created per run, always deleted.

Every name carries the pid and a counter, so parallel runs and leftovers of a
killed run never collide. Interface names stay within Linux's 15 characters.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import select
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

T = TypeVar("T")

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A name unique to this process, at most 15 characters (prefix up to 5)."""
    return f"{prefix[:5]}{os.getpid() % 100000}{next(_counter)}"[:15]


def ip(*args: str, timeout: float = 10) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=timeout)


class Namespace:
    """One network namespace with loopback up."""

    def __init__(self, prefix: str = "nf") -> None:
        self.name = unique(prefix)
        ip("netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), check=check, capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(*args), **kwargs)

    def address(self, interface: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", interface)
        self.ip("link", "set", interface, "up")

    def delete(self) -> None:
        # Processes left in the namespace (a client that did not exit) would keep it alive.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10).stdout
        for pid in pids.split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def veth(left: Namespace, right: Namespace) -> tuple[str, str]:
    """A veth pair between two namespaces; returns (left interface, right interface), both up."""
    left_if, right_if = unique("vl"), unique("vr")
    ip("link", "add", left_if, "netns", left.name, "type", "veth", "peer", "name", right_if, "netns", right.name)
    left.ip("link", "set", left_if, "up")
    right.ip("link", "set", right_if, "up")
    return left_if, right_if


def bridge(namespace: Namespace, *members: str) -> str:
    """A bridge in ``namespace`` enslaving ``members``; returns its name."""
    name = unique("br")
    namespace.ip("link", "add", name, "type", "bridge")
    for member in members:
        namespace.ip("link", "set", member, "master", name)
    namespace.ip("link", "set", name, "up")
    return name


@contextmanager
def namespaces(*prefixes: str) -> Iterator[list[Namespace]]:
    """Namespaces that exist for the ``with`` block and are deleted after it, whatever happens."""
    created: list[Namespace] = []
    try:
        for prefix in prefixes:
            created.append(Namespace(prefix))
        yield created
    finally:
        for namespace in created:
            namespace.delete()


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(name: str) -> None:
    """Move the calling *thread* into namespace ``name`` (sockets it creates then live there)."""
    with open(f"/run/netns/{name}") as handle:
        if _libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({name}): {os.strerror(errno)}")


def run_in(name: str, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a thread inside namespace ``name``; its sockets stay in that namespace."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            enter(name)
            outcome["value"] = function(*args)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=f"in-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class PortForward:
    """``127.0.0.1:<port>`` here -> ``target`` inside namespace ``netns``.

    Lets an ordinary HTTP client in the root namespace talk to a server that listens only
    inside a namespace, without giving the root namespace an interface or a route. Each
    connection is piped by a thread of its own that enters the namespace to connect: a
    refused upstream connection closes the accepted one, which the client sees as a
    connection error (what it would see without the forwarder).
    """

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self.netns = netns
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"forward-{netns}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        with conn:
            try:
                enter(self.netns)  # this thread only, and it ends with the connection
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            with upstream:
                pair = {conn: upstream, upstream: conn}
                while True:
                    ready, _, _ = select.select(list(pair), [], [], 120)
                    if not ready:
                        return
                    for source in ready:
                        try:
                            data = source.recv(65536)
                            if not data:
                                return
                            pair[source].sendall(data)
                        except OSError:
                            return

    def close(self) -> None:
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.listener.close()
