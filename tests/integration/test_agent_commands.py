"""Commands end to end: a real Mosquitto, the agent as a real process, allow-listed programs that really run.

Only the reboot/shutdown commands and systemctl are stand-ins (scripts that record their argv), and a
"reboot" is a changed boot-id file between two agent runs. Every test runs under paho 2.x and paho 1.6.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nodefoundry_agent import protocol
from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import Node, Observer, online, wait_for

pyz_path, agent_argv, broker, observer, node, agents = (harness.pyz_path, harness.agent_argv, harness.broker,
                                                         harness.observer, harness.node, harness.agents)  # fmt: skip

NOBODY_UID = 65534


def pid_gone(pid: int) -> bool:
    """Gone, or a zombie that no longer runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_exec_runs_the_argv_without_a_shell_and_reports_each_state(agents, observer: Observer, node: Node):
    node.tool("show", 'printf "%s|" "$@"\necho oops >&2\nexit 3\n')
    agents()
    online(observer)
    cmd_id = observer.command("exec", {"name": "show", "argv": ["a b", "$(touch /tmp/x)", ";", "*"]})
    result = observer.final(cmd_id)
    assert observer.states(cmd_id) == ["accepted", "running", "failed"]
    assert result["exit_code"] == 3 and result["stdout"] == "a b|$(touch /tmp/x)|;|*|" and result["stderr"] == "oops\n"


def test_output_tails_are_bounded(agents, observer: Observer, node: Node):
    node.tool("chatty", "head -c 200000 /dev/zero | tr '\\0' a\necho END\n")
    agents()
    online(observer)
    result = observer.final(observer.command("exec", {"name": "chatty"}))
    assert result["state"] == "succeeded"
    assert len(result["stdout"]) == protocol.OUTPUT_TAIL_BYTES and result["stdout"].endswith("aaaEND\n")


def test_an_expired_command_is_reported_and_never_runs(agents, observer: Observer, node: Node):
    marker = node.root / "ran"
    node.tool("touch-marker", f"touch {marker}\n")
    agent = agents()
    online(observer)
    past = datetime.now(UTC) - timedelta(seconds=30)
    cmd_id = observer.command("exec", {"name": "touch-marker"}, deadline=past)
    assert observer.final(cmd_id)["state"] == "expired"
    after = observer.command("ping")  # commands are taken in order: once this one is done, the other was handled
    observer.final(after)
    assert observer.states(cmd_id) == ["expired"] and not marker.exists()
    assert agent.alive()


def test_exec_timeout_kills_the_program_and_what_it_started(agents, observer: Observer, node: Node):
    pids = node.root / "pids"
    node.tool("hang", f"sleep 300 &\necho $$ $! > {pids}\nwait\n")
    agents()
    online(observer)
    cmd_id = observer.command("exec", {"name": "hang", "timeout": 1})
    result = observer.final(cmd_id)
    assert result["state"] == "timed_out" and result["exit_code"] < 0, result
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda pid=pid: pid_gone(pid), f"process {pid} to be killed")


def test_the_deadline_caps_a_running_exec(agents, observer: Observer, node: Node):
    node.tool("hang", "exec sleep 300\n")
    agents()
    online(observer)
    soon = datetime.now(UTC) + timedelta(seconds=3)
    cmd_id = observer.command("exec", {"name": "hang", "timeout": 600}, deadline=soon)
    assert observer.final(cmd_id, after=0)["state"] == "timed_out"


def test_exec_outside_the_allow_list_is_rejected_and_nothing_runs(agents, observer: Observer, node: Node):
    marker = node.root / "ran"
    body = f"touch {marker}\n"
    node.tool("group-writable", body, mode=0o775)
    node.tool("world-writable", body, mode=0o757)
    node.tool("not-executable", body, mode=0o644)
    node.tool("not-root", body)
    os.chown(node.exec_dir / "not-root", NOBODY_UID, NOBODY_UID)
    outside = Node.script(node.root / "outside", body)
    (node.exec_dir / "symlink").symlink_to(outside)
    (node.exec_dir / "subdir").mkdir()
    agents()
    online(observer)
    names = ["missing", "group-writable", "world-writable", "not-executable", "not-root", "symlink", "subdir",
             "../outside", "..", "/bin/sh", "sub/dir"]  # fmt: skip
    sent = {name: observer.command("exec", {"name": name}) for name in names}
    for name, cmd_id in sent.items():
        result = observer.final(cmd_id)
        assert result["state"] == "rejected" and result["detail"], (name, result)
        assert observer.states(cmd_id) == ["rejected"]
    assert not marker.exists()


def test_a_writable_exec_directory_disables_the_allow_list(agents, observer: Observer, node: Node):
    node.tool("fine", "echo ok\n")
    node.exec_dir.chmod(0o777)
    agents()
    online(observer)
    result = observer.final(observer.command("exec", {"name": "fine"}))
    assert result["state"] == "rejected" and "writable" in result["detail"]


def test_reboot_succeeds_after_the_node_came_back_with_a_new_boot_id(agents, observer: Observer, node: Node):
    agent = agents()
    online(observer)
    cmd_id = observer.command("reboot")
    observer.wait(protocol.RESULT, lambda body: body["state"] == "running", cmd_id)
    wait_for(lambda: node.stub_calls() == ["reboot "], "the reboot command")
    wait_for(lambda: f"{cmd_id} (reboot) issued" in agent.output(), "the agent waiting for the reboot")
    assert agent.terminate() == 0  # systemd stops the agent on the way down
    node.reboot()
    births = len(observer.seen(protocol.STATE))
    agents()
    online(observer, after=births)
    result = observer.final(cmd_id)
    assert result["state"] == "succeeded" and "restarted" in result["detail"]
    assert observer.states(cmd_id) == ["accepted", "running", "succeeded"]
    observer.command("reboot", cmd_id=cmd_id)  # delivered again after the reboot: answered, not rebooted again
    wait_for(lambda: observer.states(cmd_id).count("succeeded") == 2, "the stored result")
    assert node.stub_calls() == ["reboot "]


def test_reboot_fails_when_the_agent_restarts_in_the_same_boot(agents, observer: Observer, node: Node):
    agent = agents()
    online(observer)
    cmd_id = observer.command("reboot")
    wait_for(lambda: f"{cmd_id} (reboot) issued" in agent.output(), "the agent waiting for the reboot")
    agent.terminate()
    agents()  # same boot id: the reboot never happened
    result = observer.final(cmd_id)
    assert result["state"] == "failed" and "did not restart" in result["detail"]


def test_a_failing_reboot_command_is_reported_at_once(agents, observer: Observer, node: Node):
    failing = Node.script(node.root / "stubs" / "broken-reboot", "echo 'Failed to reboot' >&2\nexit 1\n")
    agents(NF_REBOOT_COMMAND=f"{failing} --now")
    online(observer)
    result = observer.final(observer.command("reboot"))
    assert result["state"] == "failed" and result["exit_code"] == 1 and "Failed to reboot" in result["stderr"]


def test_service_and_shutdown_call_the_configured_commands_with_an_argv(agents, observer: Observer, node: Node):
    agents()
    online(observer)
    service = observer.command("service", {"unit": "ssh.service", "action": "restart"})
    result = observer.final(service)
    assert result["state"] == "succeeded" and result["stdout"] == "systemctl done\n"
    shutdown = observer.command("shutdown")
    wait_for(lambda: len(node.stub_calls()) == 2, "the poweroff command")
    assert node.stub_calls() == ["systemctl restart -- ssh.service", "poweroff "]
    assert observer.wait(protocol.RESULT, lambda body: body["state"] == "running", shutdown)


def test_facts_command_republishes_the_facts(agents, observer: Observer):
    agents()
    online(observer)
    observer.wait(protocol.FACTS)
    before = len(observer.seen(protocol.FACTS))
    result = observer.final(observer.command("facts"))
    assert result["state"] == "succeeded"
    assert protocol.parse_facts(result["stdout"].encode())["mac"] == harness.MAC
    observer.wait(protocol.FACTS, after=before)


def test_seed_command_without_cmd_id_runs_under_a_generated_id(agents, observer: Observer, node: Node):
    agents()
    online(observer)
    observer.send(b'{"command":"reboot","args":{}}')
    running = wait_for(lambda: [t for t, body, _ in observer.messages if body.get("state") == "running"], "running")
    assert len(running) == 1 and running[0].split("/")[-1].startswith("seed-")
    wait_for(lambda: node.stub_calls() == ["reboot "], "the reboot command")


def test_a_retained_seed_command_is_not_run_on_every_connect(agents, observer: Observer, node: Node):
    observer.send(b'{"command":"reboot"}', retain=True)
    agent = agents()
    online(observer)
    observer.final(observer.command("ping"))  # delivered after the retained one
    assert node.stub_calls() == []
    assert "ignoring a retained 'reboot' command without cmd_id" in agent.output()


def test_malformed_commands_are_dropped_or_rejected_and_the_agent_carries_on(agents, observer: Observer):
    agent = agents()
    online(observer)
    oversized = b'{"cmd_id":"too-big","command":"ping","pad":"' + b"x" * protocol.MAX_PAYLOAD_BYTES["command"] + b'"}'
    dropped = (b"", b"not json", b"\xff\xfe", b"[1,2]", b'"text"', b"{}", b'{"command":42}',
               b'{"cmd_id":"a/b","command":"ping"}', b"{" * 20000, oversized)  # fmt: skip
    for payload in dropped:
        observer.send(payload)
    rejected = {
        "bad-args": b'{"cmd_id":"bad-args","command":"ping","args":[]}',
        "bad-deadline": b'{"cmd_id":"bad-deadline","command":"ping","deadline":"tomorrow"}',
        "unknown": b'{"cmd_id":"unknown","command":"format-disk"}',
        "extra-args": b'{"cmd_id":"extra-args","command":"ping","args":{"x":1}}',
        "bad-service": b'{"cmd_id":"bad-service","command":"service","args":{"unit":"x","action":"enable"}}',
    }
    for payload in rejected.values():
        observer.send(payload)
    for cmd_id in rejected:
        assert observer.final(cmd_id)["state"] == "rejected"
    assert observer.final(observer.command("ping"))["stdout"] == "pong"
    assert agent.alive() and "Traceback" not in agent.output()
    assert observer.states("too-big") == []  # too large to trust any of it: dropped, not answered
