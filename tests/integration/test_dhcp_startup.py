"""DHCP start-up failures: one clear line on stderr, a non-zero exit, nothing left listening.

The seed's server left a half-running process behind when its DHCP bind failed. Each case runs
``nodefoundry-server run`` in a namespace of its own, so "nothing listening afterwards" can be
checked exactly (the namespace holds no other sockets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, SERVER_BIN, fake_installer, free_port
from tests.integration.dhcp_lab import POOL_END, POOL_START, DhcpLab, dhcp_lab, sbin_path, wait_until

RELAYED_OUTSIDE = {"pool_start": "10.78.0.10", "pool_end": "10.79.0.10", "netmask": "255.255.255.0"}
HOLD_PORT = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("bound", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DhcpLab]:
    with dhcp_lab(tmp_path) as built:
        yield built


def run_server(lab: DhcpLab, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    workdir = lab.workdir / "run"
    workdir.mkdir(exist_ok=True)
    fake_installer(workdir / "assets")
    settings = {
        **{key: value for key, value in os.environ.items() if not key.startswith("NF_")},
        "PATH": sbin_path(),
        "NF_HTTP_ADDR": f"0.0.0.0:{free_port()}",
        "NF_DB_PATH": str(workdir / "nodes.db"),
        "NF_ASSETS_DIR": str(workdir / "assets"),
        "NF_API_TOKEN": ADMIN_TOKEN,
        "NF_DHCP_INTERFACE": lab.server_host.iface,
        "NF_DHCP_IP_POOL_START": POOL_START,
        "NF_DHCP_IP_POOL_END": POOL_END,
        **env,
    }
    try:
        return subprocess.run(
            lab.server_host.ns.command(str(SERVER_BIN), "run"),
            env=settings,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the server kept running instead of failing: {exc.stdout!r} {exc.stderr!r}") from None


def assert_failed_cleanly(
    lab: DhcpLab, result: subprocess.CompletedProcess[str], mentions: list[str], holder: tuple[str, ...] = ()
) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"exit 0\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("nodefoundry-server: "), lines
    for mention in mentions:
        assert mention in lines[0], f"{mention!r} not in {lines[0]!r}"
    # Nothing of the server is left: no process in its namespace but the test's own, no socket.
    ours = {str(process.pid) for process, _ in lab.processes if process.poll() is None}
    ns = lab.server_host.ns

    def leftovers() -> set[str]:
        return (
            set(subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()) - ours
        )

    wait_until(lambda: not leftovers(), 10, "the server's processes to be gone", lambda: str(leftovers()))
    listening = lab.listening(ns)
    assert len(listening) == len(holder) and all(
        expected in line for expected, line in zip(holder, listening, strict=False)
    ), f"sockets after a failed start: {listening}"


@pytest.mark.parametrize(
    ("label", "env", "mentions"),
    [
        ("missing interface", {"NF_DHCP_INTERFACE": "nfmissing0"}, ["NF_DHCP_INTERFACE", "nfmissing0"]),
        ("pool outside the subnet", {"NF_DHCP_IP_POOL_END": "10.77.1.20"}, ["NF_DHCP_IP_POOL", "10.77.1.20"]),
        ("pool start after end", {"NF_DHCP_IP_POOL_START": "10.77.0.200"}, ["NF_DHCP_IP_POOL", "10.77.0.200"]),
        ("IPv6 pool", {"NF_DHCP_IP_POOL_START": "fd00::10", "NF_DHCP_IP_POOL_END": "fd00::20"}, ["NF_DHCP_IP_POOL"]),
        ("relayed pool outside its subnet", {"NF_DHCP_SUBNETS": json.dumps([RELAYED_OUTSIDE])}, ["NF_DHCP_SUBNETS"]),
    ],
)
def test_bad_dhcp_configuration_fails_in_one_line(
    lab: DhcpLab, label: str, env: dict[str, str], mentions: list[str]
) -> None:
    result = run_server(lab, env)
    assert_failed_cleanly(lab, result, mentions)
    assert result.returncode == 2, f"{label}: exit {result.returncode}"


@pytest.mark.parametrize(
    ("port", "env"),
    [
        (67, {}),
        (4011, {"NF_DHCP_PROXY_MODE": "true", "NF_DHCP_IP_POOL_START": "", "NF_DHCP_IP_POOL_END": ""}),
    ],
    ids=["standard-67", "proxy-4011"],
)
def test_taken_port_fails_in_one_line(lab: DhcpLab, port: int, env: dict[str, str]) -> None:
    log = lab.workdir / "holder.log"
    lab.spawn(lab.server_host.ns, [sys.executable, "-c", HOLD_PORT, str(port)], log)
    wait_until(lambda: log.exists() and "bound" in log.read_text(), 10, "the port holder", lambda: log.read_text())
    result = run_server(lab, env)
    assert_failed_cleanly(lab, result, [str(port)], holder=(f"0.0.0.0:{port}",))  # only the holder's socket is left
    assert result.returncode == 2, f"exit {result.returncode}"
