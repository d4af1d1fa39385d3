"""Running programs: argv without a shell, bounded output, timeouts that kill the whole process group."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nodefoundry_agent import runner
from nodefoundry_agent.protocol import OUTPUT_TAIL_BYTES


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_exit_code_and_output():
    result = runner.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 4"], timeout=30)
    assert result == runner.Completed(4, "out\n", "err\n", timed_out=False)


def test_arguments_reach_the_program_verbatim():
    result = runner.run(["/usr/bin/printf", "%s|", "a b", "$(id)", "*", "; rm -rf /"], timeout=30)
    assert result.stdout == "a b|$(id)|*|; rm -rf /|"


def test_only_the_tail_of_a_large_output_is_kept():
    result = runner.run(["/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x; echo END"], timeout=30)
    assert len(result.stdout) == OUTPUT_TAIL_BYTES and result.stdout.endswith("xEND\n")


def test_children_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NF_MQTT_PASSWORD", "hunter2")
    assert "hunter2" not in runner.run(["/usr/bin/env"], timeout=30).stdout


def test_a_timeout_kills_the_program_and_its_children(tmp_path: Path):
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $$ $! > {pids}; wait"
    result = runner.run(["/bin/sh", "-c", script], timeout=0.5)
    assert result.timed_out and result.exit_code is not None and result.exit_code < 0
    assert all(wait_gone(int(pid)) for pid in pids.read_text().split())


def test_a_program_that_closes_its_pipes_is_still_timed():
    result = runner.run(["/bin/sh", "-c", "exec >&- 2>&-; sleep 300"], timeout=0.5)
    assert result.timed_out


def test_a_background_child_holding_the_pipes_does_not_hold_up_the_result(tmp_path: Path):
    pid_file = tmp_path / "pid"
    result = runner.run(["/bin/sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo started"], timeout=60)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, "started\n", False)
    child = int(pid_file.read_text())
    assert not gone(child)  # a daemon it started is left alone: only a timeout kills the group
    os.kill(child, signal.SIGKILL)


def test_a_missing_program_raises():
    with pytest.raises(OSError):
        runner.run(["/nonexistent/program"], timeout=5)
