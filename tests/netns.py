"""Network namespaces for tests and benchmarks: created per run, always deleted.

Every name carries the pid and a counter, so parallel runs and leftovers of a
killed run never collide. Interface names stay within Linux's 15 characters.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

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
