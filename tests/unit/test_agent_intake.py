"""Command intake and execution without MQTT: the real ledger, real handlers, stub reboot/systemctl scripts.

``report`` is the seam to the MQTT session; here it records each state change.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nodefoundry_agent import protocol
from nodefoundry_agent.commands import MAX_RUNNING, CommandProcessor
from nodefoundry_agent.config import Settings
from nodefoundry_agent.handlers import Handlers, NotAllowed, executable
from nodefoundry_agent.ledger import Ledger


def script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls = root / "calls"
        self.boot_id = "boot-1"
        self.exec_dir = root / "exec.d"
        self.exec_dir.mkdir(mode=0o755)
        self.settings = Settings(
            state_dir=root / "state",
            exec_dir=self.exec_dir,
            reboot_command=(str(script(root / "reboot", f"echo reboot >> {self.calls}\n")),),
            shutdown_command=(str(script(root / "poweroff", f"echo poweroff >> {self.calls}\n")),),
            systemctl=(str(script(root / "systemctl", f'echo "$*" >> {self.calls}\nexit "${{STATUS:-0}}"\n')),),
        )
        self.reports: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.processor = self.restart()

    def restart(self) -> CommandProcessor:
        """A new agent process over the same state directory."""
        ledger = Ledger(self.settings.state_dir / "commands.json")
        ledger.load()
        handlers = Handlers(self.settings, lambda: {"mac": "aabbccddeeff"})
        self.processor = CommandProcessor(ledger, handlers, self._report, lambda: self.boot_id)
        return self.processor

    def _report(self, cmd_id: str, state: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.reports.append((cmd_id, state, fields))

    def send(self, command: str, args: dict[str, Any] | None = None, cmd_id: str = "c1", **extra: Any) -> str:
        deadline = extra.pop("deadline", datetime.now(UTC) + timedelta(minutes=5))
        self.processor.handle(protocol.command_payload(cmd_id, command, args or {}, deadline), retained=False)
        return cmd_id

    def states(self, cmd_id: str) -> list[str]:
        with self._lock:
            return [state for reported, state, _ in self.reports if reported == cmd_id]

    def final(self, cmd_id: str, after: int = 0) -> dict[str, Any]:
        """The first final state reported for ``cmd_id`` after its first ``after`` reports."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with self._lock:
                reports = [(s, f) for c, s, f in self.reports if c == cmd_id][after:]
            finals = [(state, fields) for state, fields in reports if state in protocol.FINAL_STATES]
            if finals:
                return {"state": finals[0][0], **finals[0][1]}
            time.sleep(0.01)
        raise AssertionError(f"no final state for {cmd_id}: {self.reports}")

    def stub_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def agent(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_states_of_a_successful_command(agent: Harness):
    agent.send("ping")
    assert agent.final("c1") == {"state": "succeeded", "stdout": "pong"}
    assert agent.states("c1") == ["accepted", "running", "succeeded"]


def test_a_duplicate_gets_the_stored_result_in_this_process_and_the_next(agent: Harness):
    script(agent.exec_dir / "count", f"echo run >> {agent.calls}\necho counted\n")
    agent.send("exec", {"name": "count"})
    first = agent.final("c1")
    agent.send("exec", {"name": "count"})
    agent.restart()
    agent.send("exec", {"name": "count"})
    assert agent.states("c1") == ["accepted", "running", "succeeded", "succeeded", "succeeded"]
    assert agent.reports[-2:] == [("c1", "succeeded", {"exit_code": 0, "stdout": "counted\n"})] * 2
    assert first["stdout"] == "counted\n" and agent.stub_calls() == ["run"]


def test_an_expired_command_never_runs(agent: Harness):
    agent.send("reboot", deadline=datetime.now(UTC) - timedelta(seconds=1))
    assert agent.final("c1")["state"] == "expired"
    assert agent.states("c1") == ["expired"] and agent.stub_calls() == []
    agent.send("reboot")  # and stays expired when delivered again with a fresh deadline
    assert agent.states("c1") == ["expired", "expired"] and agent.stub_calls() == []


def test_reboot_is_settled_by_the_next_boot(agent: Harness):
    agent.send("reboot")
    deadline = time.monotonic() + 20
    while agent.stub_calls() != ["reboot"] or "running" not in agent.states("c1"):
        assert time.monotonic() < deadline, agent.reports
        time.sleep(0.01)
    record = agent.processor.ledger.get("c1")
    assert record["state"] == "running" and record["boot_id"] == "boot-1"
    agent.boot_id = "boot-2"
    agent.restart().recover("boot-2")
    assert agent.final("c1") == {"state": "succeeded", "detail": "the node restarted (boot id boot-1 -> boot-2)"}


def test_reboot_without_a_new_boot_id_failed(agent: Harness):
    agent.processor.ledger.begin("c9", "reboot", boot_id="boot-1")
    agent.restart().recover("boot-1")
    assert agent.final("c9") == {"state": "failed", "detail": "the node did not restart (boot id still boot-1)"}


def test_other_commands_cut_short_by_a_restart_are_failed(agent: Harness):
    agent.processor.ledger.begin("c8", "exec")
    agent.restart().recover("boot-1")
    assert agent.final("c8")["state"] == "failed"
    agent.restart().recover("boot-1")
    assert agent.states("c8") == ["failed"]  # settled once


def test_service_status_of_a_stopped_unit_is_an_answer_not_a_failure(agent: Harness, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("nodefoundry_agent.runner.CHILD_ENV", {"PATH": "/usr/bin:/bin", "STATUS": "3"})
    agent.send("service", {"unit": "nginx.service", "action": "status"}, cmd_id="s1")
    agent.send("service", {"unit": "nginx.service", "action": "restart"}, cmd_id="s2")
    assert agent.final("s1") == {"state": "succeeded", "exit_code": 3}
    assert agent.final("s2")["state"] == "failed"
    assert sorted(agent.stub_calls()) == ["restart -- nginx.service", "status -- nginx.service"]


@pytest.mark.parametrize(
    "payload",
    [b'{"cmd_id":"c1","command":"ping","args":7}', b'{"cmd_id":"c1","command":"exec","args":{"name":"../x"}}',
     b'{"cmd_id":"c1","command":"dance"}', b'{"cmd_id":"c1","command":"ping","deadline":"soon"}'],
)  # fmt: skip
def test_a_bad_command_with_a_usable_id_is_rejected(agent: Harness, payload: bytes):
    agent.processor.handle(payload, retained=False)
    assert agent.states("c1") == ["rejected"]
    assert agent.processor.ledger.get("c1")["state"] == "rejected"


@pytest.mark.parametrize("payload", [b"", b"\x00\xff", b"null", b"[]", b'{"cmd_id":"../x","command":"ping"}'])
def test_a_bad_command_without_a_usable_id_is_dropped(agent: Harness, payload: bytes):
    agent.processor.handle(payload, retained=False)
    assert agent.reports == []


def test_seed_form_gets_an_id_unless_retained(agent: Harness):
    agent.processor.handle(b'{"command":"ping"}', retained=True)
    assert agent.reports == []
    agent.processor.handle(b'{"command":"ping"}', retained=False)
    cmd_id = agent.reports[0][0]
    assert cmd_id.startswith("seed-") and protocol.is_cmd_id(cmd_id)
    assert agent.final(cmd_id)["stdout"] == "pong"


def test_at_most_max_running_commands_at_once(agent: Harness):
    release = agent.root / "release"
    script(agent.exec_dir / "block", f"while [ ! -e {release} ]; do sleep 0.02; done\n")
    for number in range(MAX_RUNNING + 1):
        agent.send("exec", {"name": "block"}, cmd_id=f"b{number}")
    busy = agent.final(f"b{MAX_RUNNING}")
    assert busy["state"] == "rejected" and busy["detail"].startswith("busy")
    assert agent.processor.ledger.get(f"b{MAX_RUNNING}") is None  # not recorded: a later delivery may run it
    release.touch()
    assert all(agent.final(f"b{number}")["state"] == "succeeded" for number in range(MAX_RUNNING))
    agent.send("exec", {"name": "block"}, cmd_id=f"b{MAX_RUNNING}")
    assert agent.final(f"b{MAX_RUNNING}", after=1)["state"] == "succeeded"


def test_an_unwritable_ledger_means_the_command_is_not_run(agent: Harness):
    agent.settings.state_dir.parent.mkdir(exist_ok=True)
    agent.settings.state_dir.write_text("not a directory")
    agent.restart()
    agent.send("reboot")
    assert agent.final("c1")["state"] == "rejected" and agent.stub_calls() == []


def test_exec_allow_list_rules(tmp_path: Path):
    directory = tmp_path / "exec.d"
    directory.mkdir(mode=0o755)
    assert executable(directory, script(directory / "ok", "true\n").name) == directory / "ok"
    script(directory / "group-writable", "true\n", 0o775)
    script(directory / "not-executable", "true\n", 0o644)
    os.chown(script(directory / "not-root", "true\n"), 65534, 65534)
    (directory / "link").symlink_to(directory / "ok")
    (directory / "dir").mkdir()
    for name in ("group-writable", "not-executable", "not-root", "link", "dir", "missing", "..", "a/b", ""):
        with pytest.raises(NotAllowed):
            executable(directory, name)
    directory.chmod(0o777)
    with pytest.raises(NotAllowed, match="writable"):
        executable(directory, "ok")
