"""MQTT end to end: the real server (embedded Mosquitto, per-node credentials and ACL) and real agent processes.

Each node is enrolled as a real one is: registered, put to install, its preseed fetched with the install
token from its iPXE script; the agent runs with the settings the preseed's late_command writes (broker
address, user name, password), under the venv's Python or as the zipapp the server serves, under Debian's
Python with paho 1.6. Only the OS boundary is stubbed: the reboot command, systemctl and the boot id.

Where a test must show that something did *not* happen, it follows it with a later message on the same
path and waits for that one (the broker and the server keep order per path), instead of sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nodefoundry_agent import protocol
from tests.conftest import Server, free_port
from tests.integration.mqtt_lab import (
    HEARTBEAT,
    Agent,
    Spy,
    appender,
    broker_pid,
    enroll,
    lines,
    mqtt_health,
    mqtt_ready,
    node,
    wait_for,
)

MAC_A, MAC_B = "0e0000000a01", "0e0000000b02"
WILL_SECONDS = 10  # a SIGKILLed agent's TCP connection closes at once; the broker publishes its will then
WATCHDOG_SECONDS = 3 * HEARTBEAT + 15  # the server's silence timeout (3 heartbeats) + its pass + slack
COMMAND_SECONDS = 30
FAR = datetime.now(UTC) + timedelta(days=1)


class Lab:
    """A server with the embedded broker (per-node auth unless a test turns it off) and its agents."""

    def __init__(self, server: Server, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.agents: list[Agent] = []

    def enroll(self, mac: str) -> dict[str, str]:
        return enroll(self.server, mac, self.workdir)

    def agent(self, settings: dict[str, str], pyz: Path | None = None) -> Agent:
        agent = Agent(self.workdir / f"agent-{settings['NF_MAC']}-{len(self.agents)}", settings, pyz)
        self.agents.append(agent)
        return agent

    def node(self, mac: str) -> dict[str, Any]:
        return node(self.server, mac)

    def wait_node(self, mac: str, what: str, timeout: float, **expected: Any) -> dict[str, Any]:
        return wait_for(
            lambda: (found := self.node(mac)) and all(found.get(k) == v for k, v in expected.items()) and found,
            timeout,
            f"{mac} {what} ({expected})",
        )


def make_lab(server_factory: Any, workdir: Path, **env: str) -> Lab:
    """A server whose broker has a fixed node listener, so the preseed's broker address is the real one."""
    settings = {"NF_HEARTBEAT_INTERVAL": str(HEARTBEAT), "NF_MQTT_EMBEDDED_LISTEN": f"127.0.0.1:{free_port()}"}
    server = server_factory(settings | env).start()
    mqtt_ready(server)
    return Lab(server, workdir)


@pytest.fixture
def labs(server_factory: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[Lab] = []

    def make(**env: str) -> Lab:
        made.append(make_lab(server_factory, tmp_path / f"lab{len(made)}", **env))
        return made[-1]

    yield make
    for lab in made:
        for agent in lab.agents:
            agent.stop()


@pytest.fixture
def lab(labs: Any) -> Lab:
    return labs()


# --- helpers -----------------------------------------------------------------------------------------------


def online(lab: Lab, mac: str, pyz: Path | None = None) -> Agent:
    """Enroll ``mac`` and run its agent until the node is installed and online."""
    agent = lab.agent(lab.enroll(mac), pyz).start()
    lab.wait_node(mac, "installed and online", COMMAND_SECONDS, status="installed", liveness="online")
    return agent


def command(lab: Lab, mac: str, name: str, args: dict[str, Any] | None = None, timeout: int = 120) -> str:
    body = {"command": name, "args": args or {}, "timeout": timeout}
    response = lab.server.api("POST", f"/api/v1/nodes/{mac}/commands", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "queued"
    return response.json()["id"]


def command_record(lab: Lab, cmd_id: str) -> dict[str, Any]:
    response = lab.server.api("GET", f"/api/v1/commands/{cmd_id}")
    assert response.status_code == 200, response.text
    return response.json()


def finished(lab: Lab, cmd_id: str, timeout: float = COMMAND_SECONDS) -> dict[str, Any]:
    """The command's record once it reached a final state."""
    return wait_for(
        lambda: (found := command_record(lab, cmd_id))["state"] in protocol.FINAL_STATES and found,
        timeout,
        f"command {cmd_id} to finish",
    )


def run(lab: Lab, mac: str, name: str, args: dict[str, Any] | None = None, timeout: int = 120) -> dict[str, Any]:
    return finished(lab, command(lab, mac, name, args, timeout))


def events(lab: Lab, mac: str) -> list[dict[str, Any]]:
    response = lab.server.api("GET", f"/api/v1/nodes/{mac}/events?limit=1000")
    assert response.status_code == 200, response.text
    return response.json()


def liveness_events(lab: Lab, mac: str) -> list[dict[str, Any]]:
    return [event for event in events(lab, mac) if event["kind"] in ("online", "offline")]


def running_programs(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (an exec program still running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


# --- enrolment, birth and will -------------------------------------------------------------------------------


def test_agent_with_preseed_credentials_installs_the_node_and_its_will_marks_it_offline(lab: Lab) -> None:
    settings = lab.enroll(MAC_A)
    node_port = mqtt_ready(lab.server)["node_port"]
    assert settings["NF_MQTT_BROKER"] == f"127.0.0.1:{node_port}"
    assert settings["NF_MQTT_USERNAME"] == MAC_A and settings["NF_MAC"] == MAC_A
    assert settings["NF_HEARTBEAT_INTERVAL"] == str(HEARTBEAT)
    assert lab.node(MAC_A)["status"] == "installing"

    agent = lab.agent(settings).start()
    found = lab.wait_node(MAC_A, "installed and online", COMMAND_SECONDS, status="installed", liveness="online")
    assert found["last_heartbeat"] and found["hostname"]
    installed = [
        e for e in lab.server.api("GET", f"/api/v1/nodes/{MAC_A}/events").json() if e.get("new") == "installed"
    ]
    assert installed and installed[-1]["source"] == "mqtt", installed

    agent.signal(signal.SIGKILL)
    lab.wait_node(MAC_A, "offline by its will", WILL_SECONDS, liveness="offline")
    assert liveness_events(lab, MAC_A)[-1]["detail"]["reason"] == "will"


def test_the_served_zipapp_runs_under_debians_python_with_paho_1_6(lab: Lab, tmp_path: Path) -> None:
    response = lab.server.get("/agent/nodefoundry-agent")
    assert response.status_code == 200
    pyz = tmp_path / "nodefoundry-agent"
    pyz.write_bytes(response.content)

    agent = online(lab, MAC_A, pyz)
    assert "paho-mqtt 1.6" in agent.log_text(), agent.log_text()
    record = run(lab, MAC_A, "ping")
    assert (record["state"], record.get("stdout")) == ("succeeded", "pong"), record

    agent.signal(signal.SIGTERM)  # systemctl stop: the agent says goodbye itself
    assert agent.wait_exit() == 0, agent.log_text()
    lab.wait_node(MAC_A, "offline by its goodbye", WILL_SECONDS, liveness="offline")


def test_a_frozen_agent_is_marked_offline_by_the_watchdog_and_back_online_when_it_resumes(lab: Lab) -> None:
    agent = online(lab, MAC_A)
    agent.signal(signal.SIGSTOP)  # its TCP connection stays open: no will, only silence
    lab.wait_node(MAC_A, "offline after silence", WATCHDOG_SECONDS, liveness="offline")
    assert liveness_events(lab, MAC_A)[-1]["detail"]["reason"] == "heartbeat timeout"

    agent.signal(signal.SIGCONT)
    lab.wait_node(MAC_A, "online again", 2 * HEARTBEAT + 10, liveness="online")
    assert liveness_events(lab, MAC_A)[-1]["kind"] == "online"


# --- the broker goes away ------------------------------------------------------------------------------------


def test_after_a_broker_crash_everything_reconnects_and_no_command_runs_twice(lab: Lab, tmp_path: Path) -> None:
    agent = online(lab, MAC_A)
    runs = tmp_path / "runs"
    agent.add_exec("slow-append", appender(runs, sleep_seconds=3))
    first = command(lab, MAC_A, "exec", {"name": "slow-append", "argv": ["before"]})
    wait_for(lambda: lines(runs), COMMAND_SECONDS, "the command to start")

    old = broker_pid(lab.server)
    assert old is not None
    os.kill(old, signal.SIGKILL)  # while the command runs: its result waits in the agent for the broker
    wait_for(lambda: (pid := broker_pid(lab.server)) and pid != old, 30, "the server to restart its broker")

    record = finished(lab, first, 60)
    assert record["state"] == "succeeded", record
    mqtt_ready(lab.server)
    heartbeat = lab.node(MAC_A)["last_heartbeat"]
    second = run(lab, MAC_A, "exec", {"name": "slow-append", "argv": ["after"]})  # the agent subscribed again
    assert second["state"] == "succeeded", second
    assert lines(runs) == ["run before", "run after"]
    lab.wait_node(MAC_A, "heartbeats after the restart", 2 * HEARTBEAT + 10, liveness="online")
    wait_for(lambda: lab.node(MAC_A)["last_heartbeat"] > heartbeat, 2 * HEARTBEAT + 10, "a new heartbeat")
    assert agent.log_text().count("connected to the broker") >= 2


# --- commands ------------------------------------------------------------------------------------------------


def test_a_command_delivered_again_is_answered_from_the_ledger_not_run_again(labs: Any, tmp_path: Path) -> None:
    """Without per-node auth (the broker is open), a test client can replay the server's exact command."""
    lab = labs(NF_MQTT_NODE_AUTH="false")
    agent = online(lab, MAC_A)
    assert "NF_MQTT_PASSWORD" not in lab.enroll(MAC_B)  # no credentials in the preseed in this mode
    runs = tmp_path / "runs"
    agent.add_exec("append", appender(runs))
    record = run(lab, MAC_A, "exec", {"name": "append", "argv": ["once"]}, timeout=600)
    assert record["state"] == "succeeded", record
    replay = protocol.command_payload(
        record["id"], "exec", record["args"], protocol.parse_timestamp(record["deadline"])
    )

    peer = Spy(mqtt_ready(lab.server)["node_port"], None, None, "replayer")
    assert peer.subscribe(f"node/{MAC_A}/result/{record['id']}") == "Granted QoS 1"

    def answers() -> list[dict[str, Any]]:
        return [json.loads(payload) for _topic, payload in peer.messages()]

    def final_answers(count: int) -> bool:
        return sum(answer["state"] in protocol.FINAL_STATES for answer in answers()) >= count

    assert peer.publish(f"node/{MAC_A}/command", replay) == "Success"
    wait_for(lambda: final_answers(1), COMMAND_SECONDS, "the agent's answer to the replay")
    assert [answer["state"] for answer in answers()] == ["succeeded"]  # the stored outcome, no new run

    agent.signal(signal.SIGTERM)  # the ledger is on disk: a new process remembers
    assert agent.wait_exit() == 0
    agent.start()
    lab.wait_node(MAC_A, "online again", COMMAND_SECONDS, liveness="online")
    assert peer.publish(f"node/{MAC_A}/command", replay) == "Success"
    wait_for(lambda: final_answers(2), COMMAND_SECONDS, "the restarted agent's answer to the replay")
    assert [answer["state"] for answer in answers()] == ["succeeded", "succeeded"]
    assert lines(runs) == ["run once"]
    assert command_record(lab, record["id"])["state"] == "succeeded"
    peer.close()


def test_a_command_whose_deadline_passed_never_runs(lab: Lab, tmp_path: Path) -> None:
    agent = online(lab, MAC_A)
    runs = tmp_path / "runs"
    agent.add_exec("append", appender(runs))

    # The node is offline: the command waits on the server and expires there.
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0
    lab.wait_node(MAC_A, "offline", WILL_SECONDS, liveness="offline")
    while_offline = finished(lab, command(lab, MAC_A, "exec", {"name": "append", "argv": ["offline"]}, timeout=2))
    assert while_offline["state"] == "expired" and "sent_at" not in while_offline, while_offline
    agent.start()
    lab.wait_node(MAC_A, "online again", COMMAND_SECONDS, liveness="online")

    # The agent is frozen while the server still counts it online: the command goes out and waits in the
    # agent's socket until after its deadline; the agent must see that and not run it.
    agent.signal(signal.SIGSTOP)
    frozen = command(lab, MAC_A, "exec", {"name": "append", "argv": ["late"]}, timeout=3)
    sent = wait_for(lambda: (found := command_record(lab, frozen))["state"] != "queued" and found, 10, "the send")
    assert sent["state"] == "sent", sent
    assert finished(lab, frozen)["state"] == "expired"
    agent.signal(signal.SIGCONT)
    marker = run(lab, MAC_A, "exec", {"name": "append", "argv": ["marker"]})  # delivered after the late one
    assert marker["state"] == "succeeded", marker
    assert lines(runs) == ["run marker"]
    assert "deadline" in agent.log_text() and "expired" in agent.log_text()


def test_a_program_running_past_its_deadline_or_timeout_is_killed_and_timed_out(lab: Lab, tmp_path: Path) -> None:
    agent = online(lab, MAC_A)
    runs = tmp_path / "runs"
    program = agent.add_exec("sleeper", f"#!/bin/sh\necho start >> {runs}\nsleep 60\necho end >> {runs}\n")

    by_deadline = run(lab, MAC_A, "exec", {"name": "sleeper"}, timeout=3)
    assert by_deadline["state"] == "timed_out", by_deadline
    wait_for(lambda: not running_programs(program), 15, "the program to be killed")
    by_timeout = run(lab, MAC_A, "exec", {"name": "sleeper", "timeout": 2}, timeout=120)
    assert by_timeout["state"] == "timed_out" and "killed after 2 s" in by_timeout.get("detail", ""), by_timeout
    wait_for(lambda: not running_programs(program), 15, "the program to be killed")
    assert lines(runs) == ["start", "start"]  # neither got to its end


def test_reboot_succeeds_when_the_node_comes_back_with_a_new_boot_id(lab: Lab) -> None:
    agent = online(lab, MAC_A)
    boot_id = agent.boot_id_file.read_text()
    cmd_id = command(lab, MAC_A, "reboot")
    assert agent.wait_exit(COMMAND_SECONDS) == 0, agent.log_text()  # the stub's "shutdown" stopped the agent
    assert agent.boot_id_file.read_text() != boot_id
    lab.wait_node(MAC_A, "offline while rebooting", WILL_SECONDS, liveness="offline")
    assert command_record(lab, cmd_id)["state"] == "running"  # only the next boot can tell

    agent.start()  # systemd, after the reboot
    record = finished(lab, cmd_id)
    assert record["state"] == "succeeded" and "restarted" in record.get("detail", ""), record
    lab.wait_node(MAC_A, "online after the reboot", COMMAND_SECONDS, liveness="online")


# --- what one node's credentials allow -----------------------------------------------------------------------


def test_one_nodes_credentials_cannot_act_as_or_listen_to_another_node(lab: Lab, tmp_path: Path) -> None:
    password_a = lab.enroll(MAC_A)["NF_MQTT_PASSWORD"]  # A's agent never runs: the spy holds its account
    agent_b = online(lab, MAC_B)
    runs = tmp_path / "runs"
    agent_b.add_exec("append", appender(runs))
    before = lab.node(MAC_B)
    port = mqtt_ready(lab.server)["node_port"]
    # B's client id: the broker replaces it with the user name, so B's agent is not pushed off.
    spy = Spy(port, MAC_A, password_a, f"nodefoundry-agent-{MAC_B}")
    for topic in (f"node/{MAC_B}/command", "node/+/command", "node/#"):
        spy.subscribe(topic)

    forged = {
        "status": protocol.status_payload("10.6.6.6", "forged", 1, "6.6.6", "forged"),
        "state": protocol.state_payload("offline", "forged"),
        "facts": b'{"forged": true}',
        "result/forged1": protocol.result_payload("forged1", "failed"),
        "command": protocol.command_payload("forged2", "exec", {"name": "append", "argv": ["forged"]}, FAR),
    }
    for kind, payload in forged.items():
        assert spy.publish(f"node/{MAC_B}/{kind}", payload) == "Not authorized", kind

    record = run(lab, MAC_B, "exec", {"name": "append", "argv": ["real"]})
    assert record["state"] == "succeeded", record
    # A round trip of the spy's own after B's command went out: anything routed to the spy came before it.
    assert spy.publish(f"node/{MAC_A}/facts", b"{}") == "Success"
    assert spy.messages() == []
    assert lines(runs) == ["run real"]

    # B's next heartbeat was published after the forgeries, so they would have been applied by now.
    wait_for(lambda: lab.node(MAC_B)["last_heartbeat"] > before["last_heartbeat"], 2 * HEARTBEAT + 10, "B's status")
    after = lab.node(MAC_B)
    for key in ("status", "liveness", "hostname", "ip"):
        assert after.get(key) == before.get(key), key
    assert "forged" not in json.dumps(after)
    assert "lost the connection" not in agent_b.log_text()
    spy.close()


def test_malformed_oversize_and_mistyped_messages_are_dropped_counted_and_not_stored(lab: Lab) -> None:
    password = lab.enroll(MAC_A)["NF_MQTT_PASSWORD"]
    port = mqtt_ready(lab.server)["node_port"]
    before, counted = lab.node(MAC_A), mqtt_health(lab.server)["counters"]
    history = len(events(lab, MAC_A))
    malformed = [
        ("status", b"not json"),
        ("status", b"[1, 2]"),
        ("status", b'{"status": "installed", "uptime": "long"}'),
        ("status", b'{"status": "installed", "uptime": -1}'),
        ("status", b'{"status": "installed", "ip": "999.1.1.1"}'),
        ("status", b'{"status": "installed", "hostname": "x; reboot"}'),
        ("status", b'{"status": "installed", "hostname": 5}'),
        ("state", b'{"state": "maybe", "session": "s1"}'),
        ("state", b'{"state": "online"}'),
        ("state", b'{"state": "online", "session": 5}'),
        ("facts", b'"facts"'),
        ("result/c1", b'{"state": "exploded"}'),
        ("result/c1", b'{"state": "failed", "cmd_id": "c2"}'),
    ]
    oversize = [
        ("status", protocol.encode({"status": "installed", "pad": "x" * protocol.MAX_PAYLOAD_BYTES["status"]})),
        ("state", protocol.encode({"state": "offline", "session": "s1", "pad": "x" * 1024})),
        ("facts", protocol.encode({"pad": "x" * protocol.MAX_PAYLOAD_BYTES["facts"]})),
    ]
    spy = Spy(port, MAC_A, password, f"nodefoundry-agent-{MAC_A}")
    for kind, payload in malformed + oversize:
        assert spy.publish(f"node/{MAC_A}/{kind}", payload) == "Success", kind  # A's own topics: the server decides

    def delta(key: str) -> int:
        return mqtt_health(lab.server)["counters"].get(key, 0) - counted.get(key, 0)

    wait_for(lambda: delta("malformed") + delta("oversize") == len(malformed) + len(oversize), 15, "the counters")
    assert (delta("malformed"), delta("oversize"), delta("applied")) == (len(malformed), len(oversize), 0)
    assert lab.node(MAC_A) == before
    assert len(events(lab, MAC_A)) == history

    # The same path still works: a well-formed status after them is applied.
    assert spy.publish(f"node/{MAC_A}/status", protocol.status_payload(None, "node-a", 5, "1.0", "s1")) == "Success"
    lab.wait_node(MAC_A, "installed by a valid status", 15, status="installed", liveness="online", hostname="node-a")
    spy.close()
