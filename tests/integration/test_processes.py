"""The process tree of ``nodefoundry-server run``: arbiter, HTTP workers, a supervised services process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.polling import wait_for

WAIT_SECONDS = 30


def children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def services_pid(server) -> int | None:
    spawned = [pid for pid, cmd in children(server.process.pid).items() if "spawn_main" in cmd]
    return spawned[0] if spawned else None


def watchdog_state(server) -> dict:
    return server.get("/health").json()["components"]["install_watchdog"]


def test_services_process_reports_and_is_restarted_after_a_crash(server):
    first = wait_for(
        lambda: services_pid(server),
        WAIT_SECONDS,
        "the services process",
        details=lambda: str(children(server.process.pid)),
    )
    wait_for(lambda: watchdog_state(server)["state"] == "ok", WAIT_SECONDS, "the install watchdog to report ok")
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: (pid := services_pid(server)) and pid != first and pid, WAIT_SECONDS, "a restarted services process"
    )
    workers = [pid for pid, cmd in children(server.process.pid).items() if "nodefoundry-server run" in cmd]
    assert len(workers) == 2  # the HTTP workers were not disturbed
    assert server.get("/health").status_code == 200


def test_stopping_the_server_stops_the_services_process(server):
    pid = wait_for(lambda: services_pid(server), WAIT_SECONDS, "the services process")
    server.stop()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), WAIT_SECONDS, "the services process to exit")
