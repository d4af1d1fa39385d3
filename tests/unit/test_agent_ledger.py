"""The command ledger on a real file system: recorded before a run, bounded, readable after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodefoundry_agent.ledger import Ledger


def reopened(ledger: Ledger) -> Ledger:
    """What the next agent process sees."""
    fresh = Ledger(ledger.path, ledger.limit, ledger.output_limit)
    fresh.load()
    return fresh


def test_begin_is_on_disk_before_it_returns(tmp_path: Path):
    ledger = Ledger(tmp_path / "state" / "commands.json")
    ledger.begin("c1", "reboot", boot_id="boot-a")
    assert reopened(ledger).get("c1") == {
        "cmd_id": "c1",
        "command": "reboot",
        "state": "accepted",
        "boot_id": "boot-a",
        "result": {},
    }
    assert [record["cmd_id"] for record in reopened(ledger).unfinished()] == ["c1"]
    assert (tmp_path / "state" / "commands.json").stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in (tmp_path / "state").iterdir()) == ["commands.json"]  # no temp file left


def test_finish_replaces_the_record_and_survives_a_restart(tmp_path: Path):
    ledger = Ledger(tmp_path / "commands.json")
    ledger.begin("c1", "exec")
    ledger.mark("c1", "running")
    assert ledger.get("c1")["state"] == "running"
    assert reopened(ledger).get("c1")["state"] == "accepted"  # intermediate states stay in memory
    ledger.finish("c1", "exec", "failed", {"exit_code": 2, "stderr": "no"})
    again = reopened(ledger)
    assert again.get("c1")["state"] == "failed" and again.get("c1")["result"] == {"exit_code": 2, "stderr": "no"}
    assert again.unfinished() == []


def test_the_ledger_is_bounded_and_keeps_outputs_only_for_the_newest(tmp_path: Path):
    ledger = Ledger(tmp_path / "commands.json", limit=5, output_limit=2)
    for number in range(8):
        ledger.finish(f"c{number}", "exec", "succeeded", {"exit_code": 0, "stdout": f"out{number}"})
    again = reopened(ledger)
    assert [again.get(f"c{number}") for number in range(3)] == [None, None, None]
    assert [again.get(f"c{number}")["result"] for number in range(3, 8)] == [
        {"exit_code": 0},
        {"exit_code": 0},
        {"exit_code": 0},
        {"exit_code": 0, "stdout": "out6"},
        {"exit_code": 0, "stdout": "out7"},
    ]


def test_a_corrupt_file_is_set_aside_not_fatal(tmp_path: Path):
    path = tmp_path / "commands.json"
    path.write_text('{"version": 1, "commands": [{"cmd_id": ')
    ledger = Ledger(path)
    ledger.load()
    assert ledger.get("anything") is None and ledger.unfinished() == []
    assert (tmp_path / "commands.json.corrupt").exists() and not path.exists()


def test_malformed_records_are_skipped(tmp_path: Path):
    path = tmp_path / "commands.json"
    good = {"cmd_id": "ok", "command": "ping", "state": "succeeded", "result": {}}
    path.write_text(json.dumps({"version": 1, "commands": [good, 7, {"cmd_id": 5}, {"cmd_id": "x", "state": "odd"}]}))
    ledger = Ledger(path)
    ledger.load()
    assert ledger.get("ok") == good and ledger.get("x") is None


def test_a_command_that_cannot_be_recorded_is_forgotten(tmp_path: Path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    ledger = Ledger(blocker / "commands.json")
    with pytest.raises(OSError):
        ledger.begin("c1", "exec")
    assert ledger.get("c1") is None  # so a later delivery may still run it
