"""``nodefoundry.provision.command`` and ``playbooks/command.yml`` in real Ansible processes against a real server
whose embedded broker real agent processes are connected to.

Each node is enrolled as a real one is (through its preseed, see ``tests/integration/mqtt_lab.py``) and its agent
runs as a process with its own exec allow-list; only reboot/poweroff/systemctl are stand-in scripts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ansible import fleet
from tests.ansible.conftest import REPO, Lab
from tests.conftest import Server, fake_installer, free_port
from tests.integration.mqtt_lab import HEARTBEAT, Agent, enroll, mqtt_ready, wait_for

COMMAND = REPO / "playbooks" / "command.yml"
MAC_A, MAC_B = "0e0000000c01", "0e0000000c02"
UNKNOWN = "0e0000000cff"
FAST = {"wait_sleep": 1, "wait_timeout": 60}
REPORT = '#!/bin/sh\necho "report $*"\necho line-two\n'
BROKEN = "#!/bin/sh\necho 'disk full' >&2\nexit 3\n"


class CommandLab(Lab):
    """The Ansible lab on a server with a fixed broker listener (the preseed's address), plus node agents."""

    def __init__(self, server: Server, workdir: Path, collections_path: Path) -> None:
        super().__init__(server, workdir, collections_path)
        self.agents: dict[str, Agent] = {}

    def online(self, mac: str) -> Agent:
        """Enroll ``mac`` and run its agent until the node is installed and online."""
        agent = Agent(self.workdir / f"agent-{mac}", enroll(self.server, mac, self.workdir)).start()
        self.agents[mac] = agent
        wait_for(
            lambda: (node := self.node(mac)) and node["status"] == "installed" and node["liveness"] == "online",
            30,
            f"{mac} installed and online",
        )
        return agent

    def commands(self, mac: str) -> list[dict[str, Any]]:
        return fleet.ok(self.server.api("GET", f"/api/v1/nodes/{mac}/commands"))


@pytest.fixture
def lab(tmp_path: Path, collections_path: Path) -> Iterator[CommandLab]:
    workdir = tmp_path / "server"
    workdir.mkdir()
    env = {"NF_HEARTBEAT_INTERVAL": str(HEARTBEAT), "NF_MQTT_EMBEDDED_LISTEN": f"127.0.0.1:{free_port()}"}
    server = Server(workdir, env)
    fake_installer(server.assets_dir)
    made: CommandLab | None = None
    try:
        server.start()
        mqtt_ready(server)
        made = CommandLab(server, tmp_path, collections_path)
        yield made
    finally:
        for agent in made.agents.values() if made else ():
            agent.stop()
        server.close()


@pytest.fixture
def two(lab: CommandLab) -> CommandLab:
    """Two online nodes whose agents allow ``report`` (succeeds) and ``broken`` (exits 3)."""
    for mac in (MAC_A, MAC_B):
        agent = lab.online(mac)
        agent.add_exec("report", REPORT)
        agent.add_exec("broken", BROKEN)
    return lab


def by_mac(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["mac"]: item for item in result["results"]}


def test_ping_on_two_nodes(two: CommandLab) -> None:
    result, _ = two.module("command", {"macs": ["0e:00:00:00:0c:01", MAC_B], "command": "ping", **FAST})
    assert (result["_state"], result["changed"]) == ("CHANGED", True), result
    assert result["summary"] == {"not_queued": 0, "succeeded": 2}
    for mac, item in by_mac(result).items():
        assert (item["state"], item["stdout"]) == ("succeeded", "pong"), item
        assert [(found["id"], found["state"]) for found in two.commands(mac)] == [(item["id"], "succeeded")]


def test_exec_returns_rc_and_output_and_a_failure_names_the_node(two: CommandLab) -> None:
    done, _ = two.module(
        "command", {"macs": [MAC_A], "command": "exec", "args": {"name": "report", "argv": ["x"]}, **FAST}
    )
    assert done["_state"] == "CHANGED", done
    [item] = done["results"]
    assert (item["state"], item["exit_code"], item["stdout"]) == ("succeeded", 0, "report x\nline-two\n")

    failed, _ = two.module("command", {"macs": [MAC_A, MAC_B], "command": "exec", "args": {"name": "broken"}, **FAST})
    assert failed["_state"] == "FAILED!", failed
    assert failed["msg"] == f"exec did not succeed on 2 node(s): {MAC_A}, {MAC_B}"
    assert failed["summary"] == {"not_queued": 0, "failed": 2}
    for item in failed["results"]:
        assert (item["state"], item["exit_code"], item["stderr"]) == ("failed", 3, "disk full\n"), item

    tolerated, _ = two.module(
        "command", {"macs": [MAC_B], "command": "exec", "args": {"name": "broken"}, "fail_on_error": False, **FAST}
    )
    assert (tolerated["_state"], tolerated["summary"]) == ("CHANGED", {"not_queued": 0, "failed": 1}), tolerated
    assert [found["state"] for found in two.commands(MAC_B)] == ["failed", "failed"]


def test_check_mode_sends_nothing(two: CommandLab) -> None:
    result, _ = two.module(
        "command", {"macs": [MAC_A, MAC_B], "command": "exec", "args": {"name": "report"}}, "--check"
    )
    assert (result["_state"], result["changed"]) == ("CHANGED", True), result
    assert result["results"] == [{"mac": MAC_A}, {"mac": MAC_B}]
    assert two.commands(MAC_A) == [] and two.commands(MAC_B) == []


def test_unknown_mac_is_not_queued(two: CommandLab) -> None:
    args = {"macs": [MAC_A, UNKNOWN], "command": "ping", **FAST}
    failed, _ = two.module("command", args)
    assert failed["_state"] == "FAILED!", failed
    assert failed["msg"] == f"ping did not succeed on 1 node(s): {UNKNOWN}"
    assert by_mac(failed)[UNKNOWN] == {"mac": UNKNOWN, "ok": False, "error": "node not found"}
    assert by_mac(failed)[MAC_A]["state"] == "succeeded"

    tolerated, _ = two.module("command", {**args, "fail_on_error": False})
    assert (tolerated["_state"], tolerated["summary"]) == ("CHANGED", {"not_queued": 1, "succeeded": 1}), tolerated
    assert "id" not in by_mac(tolerated)[UNKNOWN]
    assert two.server.api("GET", f"/api/v1/nodes/{UNKNOWN}/commands").status_code == 404


def test_bad_token_is_one_clear_failure(lab: CommandLab) -> None:
    fleet.register(lab.server, MAC_A)
    result, _ = lab.module("command", {"macs": [MAC_A], "command": "ping"}, env={"NODEFOUNDRY_TOKEN": "nf_wrong"})
    assert result["_state"] == "FAILED!"
    assert result["msg"] == "POST /api/v1/commands: HTTP 401: missing or invalid token (check the token)"
    assert lab.commands(MAC_A) == []


def test_command_playbook_limited_to_the_online_group(two: CommandLab) -> None:
    fleet.register(two.server, UNKNOWN)  # discovered, never online: outside the limit
    inventory = two.inventory_source(hostnames=["mac"])
    run = ("-e", "nodefoundry_hosts=all", "-l", "online", "-e", "nodefoundry_command=exec")
    done = two.playbook(COMMAND, inventory, *run, "-e", '{"nodefoundry_args": {"name": "report", "argv": ["pb"]}}')
    assert done.returncode == 0, done.stdout + done.stderr
    for mac in (MAC_A, MAC_B):
        assert f'"node-{mac} ({mac}): succeeded, rc 0, report pb | line-two"' in done.stdout, done.stdout
        assert [found["state"] for found in two.commands(mac)] == ["succeeded"]
    assert two.commands(UNKNOWN) == []
    # Every task runs once for the play (on its first host): one API call, one report, one check.
    assert re.findall(r"^(node-\S+)\s+: ok=(\d+)\s+changed=(\d+)", done.stdout, re.MULTILINE) == [
        (f"node-{MAC_A}", "3", "1")
    ], done.stdout

    failed = two.playbook(COMMAND, inventory, *run, "-e", '{"nodefoundry_args": {"name": "broken"}}')
    assert failed.returncode == 2, failed.stdout + failed.stderr
    for mac in (MAC_A, MAC_B):
        assert f'"node-{mac} ({mac}): failed, rc 3"' in failed.stdout, failed.stdout
    message = " ".join(failed.stdout.split())
    assert f"exec did not succeed on 2 node(s): node-{MAC_A} ({MAC_A}), node-{MAC_B} ({MAC_B})" in message, message

    checked = two.playbook(COMMAND, inventory, *run, "--check", "-e", '{"nodefoundry_args": {"name": "report"}}')
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f'"node-{MAC_A} ({MAC_A}): would run"' in checked.stdout, checked.stdout
    assert [len(two.commands(mac)) for mac in (MAC_A, MAC_B, UNKNOWN)] == [2, 2, 0]
