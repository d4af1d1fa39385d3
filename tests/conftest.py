"""Shared fixtures: a real ``nodefoundry-server run`` process on a free port."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.netns import PortForward
from tests.polling import wait_for as wait_for  # imported from here by many tests

REPO = Path(__file__).resolve().parent.parent
SERVER_BIN = Path(sys.executable).parent / "nodefoundry-server"
ADMIN_TOKEN = "nf_test-admin-token"


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_TEST_PORT = 10000


def free_port(attempts: int = 1000) -> int:
    """A free loopback TCP port below the kernel's ephemeral range.

    The kernel hands ports of that range to every outgoing connection as its source port, so a service
    stopped and started again on a port from it (a broker restart) can find it taken meanwhile by some
    client's connection — more likely with several test workers. Below the range only another bind can.
    """
    ephemeral_low = int(EPHEMERAL_RANGE.read_text().split()[0])
    for _ in range(attempts):
        port = random.randrange(LOWEST_TEST_PORT, ephemeral_low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOWEST_TEST_PORT}-{ephemeral_low - 1} after {attempts} attempts")


def install_token_in(script: str) -> str | None:
    """The install token a boot script carries to the preseed; None for a script without one (a wait loop)."""
    found = re.search(r"preseed\.cfg\?token=([0-9a-f]+)", script)
    return found.group(1) if found else None


class _OneShotSession(requests.Session):
    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", None) or {}
        return super().request(*args, headers={"Connection": "close", **headers}, **kwargs)


def fake_installer(assets_dir: Path, arches: tuple[str, ...] = ("amd64", "arm64")) -> None:
    """Small stand-in kernel/initrd files: the boot path only needs them to exist."""
    for arch in arches:
        directory = assets_dir / "debian-installer" / arch
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "linux").write_bytes(b"kernel-" + arch.encode())
        (directory / "initrd.gz").write_bytes(b"initrd-" + arch.encode())


class Server:
    """A server process under test, with a small API client.

    With ``netns`` (a network namespace name) the process runs inside that namespace
    (``ip netns exec``), HTTP listens on all of the namespace's addresses, and ``url``
    reaches it through a loopback port forwarded into the namespace.
    """

    def __init__(
        self, workdir: Path, env: dict[str, str] | None = None, config: Path | None = None, netns: str | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.netns = netns
        self.forward = PortForward(netns, ("127.0.0.1", self.port)) if netns else None
        self.url = f"http://127.0.0.1:{self.forward.port if self.forward else self.port}"
        self.db_path = workdir / "data" / "nodes.db"
        self.assets_dir = workdir / "data" / "assets"
        self.env = {
            **os.environ,
            "NF_HTTP_ADDR": f"{'0.0.0.0' if netns else '127.0.0.1'}:{self.port}",
            "NF_DB_PATH": str(self.db_path),
            "NF_ASSETS_DIR": str(self.assets_dir),
            "NF_API_TOKEN": ADMIN_TOKEN,
            "NF_HTTP_WORKERS": "2",
            "NF_HTTP_THREADS": "4",
            **(env or {}),
        }
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        # A new connection per request: a pooled keep-alive connection that the server closes
        # just as it is reused would make a test fail for a reason that is not the server's.
        self.session = _OneShotSession()
        self.log_path = workdir / "server.log"

    def start(self, wait: bool = True) -> Server:
        args = [str(SERVER_BIN), *(["--config", str(self.config)] if self.config else []), "run"]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            args, cwd=self.workdir, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, attempts: int = 200) -> None:
        """Poll /health until it answers (bounded: ~20 s), or fail with the server's log."""
        for _ in range(attempts):
            if self.process and self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code in (200, 503):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server did not become ready:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as systemd would do it."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.crash()
        self.session.close()

    def crash(self) -> None:
        """kill -9 the whole server at once: the arbiter and every worker."""
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.session.close()

    def close(self) -> None:
        """Stop, and release the forwarded port (the server cannot be started again)."""
        self.stop()
        if self.forward:
            self.forward.close()

    def api(self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def install_token(self, mac: str) -> str:
        """The install token in the node's iPXE script, fetched as the node would (from 127.0.0.1)."""
        script = self.get(f"/boot/{mac}/boot.ipxe").text
        token = install_token_in(script)
        assert token, script
        return token


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def make(
        env: dict[str, str] | None = None, config: Path | None = None, installer: bool = True, netns: str | None = None
    ) -> Server:
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        server = Server(workdir, env, config, netns)
        if installer:
            fake_installer(server.assets_dir)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def server(server_factory: Any) -> Server:
    return server_factory().start()
