"""The commands API with a real server, its embedded broker and a fake node: every answer is checked
against openapi.json; commands travel over MQTT and the node's results come back into the record."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from nodefoundry_agent import protocol
from tests.conftest import Server
from tests.integration.mqtt_lab import wait_for
from tests.integration.test_mqtt_ingest_broker import (
    MAC,
    OTHER,
    FakeNode,
    closing_nodes,
    connect,
    counters,
    register,
    start,
)
from tests.integration.test_openapi_conformance import conforms, readonly_token

UNKNOWN = "aabbccddeeff"
UNKNOWN_COMMAND = "unknown command 'wipe' (allowed: reboot, shutdown, service, facts, ping, exec)"
NODE_COMMANDS = "/api/v1/nodes/{mac}/commands"
COMMAND = "/api/v1/commands/{command_id}"


@pytest.fixture
def nodes() -> Iterator[list[FakeNode]]:
    yield from closing_nodes()


def create(server: Server, mac: str = MAC, **body: Any) -> Any:
    response = server.api("POST", f"/api/v1/nodes/{mac}/commands", json={"command": "ping", **body})
    assert response.status_code == 201, response.text
    command = conforms(response, NODE_COMMANDS)
    assert response.headers["Location"] == f"/api/v1/commands/{command['id']}"
    return command


def get(server: Server, command_id: str) -> dict[str, Any]:
    return conforms(server.api("GET", f"/api/v1/commands/{command_id}"), COMMAND)


def wait_state(server: Server, command_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
    return wait_for(lambda: (found := get(server, command_id))["state"] == state and found, timeout, state)


def received(fake: FakeNode, command_id: str, times: int = 1) -> list[dict[str, Any]]:
    def copies() -> list[dict[str, Any]]:
        found = [command for command in fake.commands() if command["cmd_id"] == command_id]
        return found if len(found) >= times else []

    return wait_for(copies, 20, f"{times} x {command_id} at {fake.mac}")


# --- the records ------------------------------------------------------------------------------------------------


def test_create_get_and_list(server_factory: Any) -> None:
    server = start(server_factory)
    register(server, MAC, OTHER)
    first = create(server, command="service", args={"unit": "ssh.service", "action": "restart"}, timeout=60)
    assert (first["mac"], first["command"], first["state"]) == (MAC, "service", "queued")
    assert re.fullmatch(r"[0-9a-f]{32}", first["id"]) and first["deadline"] > first["created_at"]
    assert get(server, first["id"]) == first
    second = create(server, mac="AA-BB-CC-DD-EE-01")
    create(server, mac=OTHER)

    listed = server.api("GET", f"/api/v1/nodes/{MAC}/commands")
    assert [c["id"] for c in conforms(listed, NODE_COMMANDS)] == [second["id"], first["id"]]
    assert listed.headers["X-Total-Count"] == "2"
    paged = server.api("GET", f"/api/v1/nodes/{MAC}/commands?state=queued,sent&state=failed&limit=1&offset=1")
    assert [c["id"] for c in conforms(paged, NODE_COMMANDS)] == [first["id"]]
    assert paged.headers["X-Total-Count"] == "2"
    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}/commands?state=succeeded"), NODE_COMMANDS) == []

    events = [e for e in server.api("GET", f"/api/v1/nodes/{MAC}/events").json() if e["kind"] == "command"]
    assert [(e["source"], e["new"], e["detail"]["id"], e["actor"]) for e in events] == [
        ("api", "queued", first["id"], "NF_API_TOKEN"), ("api", "queued", second["id"], "NF_API_TOKEN")]  # fmt: skip


def test_create_errors(server_factory: Any) -> None:
    server = start(server_factory)
    register(server, MAC)
    for mac, body, status, message in [
        (MAC, [1], 400, "invalid request body"),
        (MAC, {}, 400, "invalid request body"),
        (MAC, {"command": 7}, 400, "invalid request body"),
        (MAC, {"command": "wipe"}, 400, UNKNOWN_COMMAND),
        (MAC, {"command": "reboot", "args": {"now": True}}, 400, "reboot takes no args"),
        (MAC, {"command": "service", "args": {"unit": "a b", "action": "stop"}}, 400, None),
        (MAC, {"command": "exec", "args": {"name": "../sh"}}, 400, None),
        (MAC, {"command": "ping", "args": []}, 400, None),
        (MAC, {"command": "ping", "timeout": 0}, 400, "invalid timeout: an integer from 1 to 86400 (seconds)"),
        (MAC, {"command": "ping", "timeout": "60"}, 400, "invalid timeout: an integer from 1 to 86400 (seconds)"),
        (MAC, {"command": "ping", "timeout": True}, 400, "invalid timeout: an integer from 1 to 86400 (seconds)"),
        ("nope", {"command": "ping"}, 400, "invalid MAC address format"),
        (UNKNOWN, {"command": "ping"}, 404, "node not found"),
    ]:
        response = server.api("POST", f"/api/v1/nodes/{mac}/commands", json=body)
        assert response.status_code == status, body
        error = conforms(response, NODE_COMMANDS, any_message=message is None)
        assert message is None or error == {"error": message}
    assert server.api("GET", f"/api/v1/nodes/{MAC}/commands").headers["X-Total-Count"] == "0"


def test_read_errors_and_tokens(server_factory: Any) -> None:
    server = start(server_factory)
    register(server, MAC)
    command = create(server)
    for url, template, status in [
        ("/api/v1/commands/0123456789abcdef0123456789abcdef", COMMAND, 404),
        (f"/api/v1/nodes/{UNKNOWN}/commands", NODE_COMMANDS, 404),
        ("/api/v1/nodes/nope/commands", NODE_COMMANDS, 400),
        (f"/api/v1/nodes/{MAC}/commands?state=done", NODE_COMMANDS, 400),
        (f"/api/v1/nodes/{MAC}/commands?limit=1001", NODE_COMMANDS, 400),
        (f"/api/v1/nodes/{MAC}/commands?offset=-1", NODE_COMMANDS, 400),
    ]:
        response = server.api("GET", url)
        assert response.status_code == status, url
        conforms(response, template)
    assert server.api("DELETE", f"/api/v1/nodes/{MAC}").status_code == 204
    kept = server.api("GET", f"/api/v1/nodes/{MAC}/commands")  # a deleted node's commands stay readable
    assert [c["id"] for c in conforms(kept, NODE_COMMANDS)] == [command["id"]]

    token = readonly_token(server)
    assert conforms(server.api("GET", f"/api/v1/commands/{command['id']}", token=token), COMMAND) == command
    for method, url, template in [
        ("POST", f"/api/v1/nodes/{MAC}/commands", NODE_COMMANDS),
        ("POST", "/api/v1/commands", "/api/v1/commands"),
    ]:
        refused = server.api(method, url, token=token, json={"command": "ping", "macs": [MAC]})
        assert refused.status_code == 403
        assert conforms(refused, template) == {"error": "read-only token cannot change anything"}
        missing = server.api(method, url, token=None, json={"command": "ping", "macs": [MAC]})
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="nodefoundry"'
        conforms(missing, template)
    conforms(server.api("GET", f"/api/v1/commands/{command['id']}", token="nf_wrong"), COMMAND)


def test_bulk(server_factory: Any) -> None:
    server = start(server_factory)
    register(server, MAC, OTHER)
    macs = [MAC, MAC.upper(), OTHER, UNKNOWN, "zz", 7]
    body = conforms(
        server.api("POST", "/api/v1/commands", json={"macs": macs, "command": "reboot", "timeout": 30}),
        "/api/v1/commands",
    )
    results = {result["mac"]: result for result in body["results"]}
    assert list(results) == [MAC, OTHER, UNKNOWN, "zz", "7"]
    assert results[UNKNOWN] == {"mac": UNKNOWN, "ok": False, "error": "node not found"}
    assert results["zz"] == {"mac": "zz", "ok": False, "error": "invalid MAC address format"}
    assert (body["command"], body["summary"]) == ("reboot", {"created": 2, "failed": 3})
    for mac in (MAC, OTHER):
        queued = get(server, results[mac]["id"])
        assert (queued["mac"], queued["command"], queued["state"]) == (mac, "reboot", "queued")
    for bad, message in [
        ({"command": "reboot"}, "invalid request body"),
        ({"macs": MAC, "command": "reboot"}, "invalid request body"),
        ({"macs": [MAC]}, "invalid request body"),
        ({"macs": [MAC], "command": "reboot", "args": {"force": True}}, "reboot takes no args"),
        ({"macs": [MAC] * 10001, "command": "reboot"}, "at most 10000 MACs per call"),
    ]:
        response = server.api("POST", "/api/v1/commands", json=bad)
        assert response.status_code == 400
        assert conforms(response, "/api/v1/commands") == {"error": message}
    assert server.api("GET", f"/api/v1/nodes/{MAC}/commands").headers["X-Total-Count"] == "1"


# --- delivery over MQTT -----------------------------------------------------------------------------------------


def test_a_command_reaches_the_online_node_and_its_results_come_back(
    server_factory: Any, nodes: list[FakeNode]
) -> None:
    server = start(server_factory)
    register(server, MAC)
    fake = connect(nodes, server, MAC, "s1")
    wait_for(lambda: server.api("GET", f"/api/v1/nodes/{MAC}").json()["liveness"] == "online", 20, "online")
    command = create(server, command="exec", args={"name": "uptime", "argv": ["-p"]}, timeout=120)
    [delivered] = received(fake, command["id"])
    assert (delivered["command"], delivered["args"]) == ("exec", {"name": "uptime", "argv": ["-p"]})
    assert protocol.timestamp(delivered["deadline"]) == command["deadline"][:19] + "Z"
    sent = wait_state(server, command["id"], "sent")
    assert sent["sent_at"] >= sent["created_at"]
    fake.result(command["id"], "accepted")
    fake.result(command["id"], "running")
    wait_state(server, command["id"], "running")
    fake.result(command["id"], "succeeded", exit_code=0, stdout="up 5 minutes\n", stderr="")
    done = wait_state(server, command["id"], "succeeded")
    assert (done["exit_code"], done["stdout"], done["stderr"]) == (0, "up 5 minutes\n", "")
    assert done["finished_at"] == done["updated_at"]
    fake.result(command["id"], "failed", exit_code=1)  # a final state never changes
    wait_for(lambda: counters(server)["stale_result"] == 1, 20, "the late result counted as stale")
    assert get(server, command["id"])["state"] == "succeeded"
    history = [e["new"] for e in server.api("GET", f"/api/v1/nodes/{MAC}/events").json() if e["kind"] == "command"]
    assert history == ["queued", "sent", "accepted", "running", "succeeded"]


def test_a_node_cannot_answer_for_another(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    register(server, MAC, OTHER)
    target, intruder = connect(nodes, server, MAC, "s1"), connect(nodes, server, OTHER, "s1")
    command = create(server)
    received(target, command["id"])
    wait_state(server, command["id"], "sent")
    intruder.result(command["id"], "succeeded", exit_code=0)
    wait_for(lambda: counters(server)["unknown_command"] == 1, 20, "the foreign result counted")
    assert get(server, command["id"])["state"] == "sent"


def test_queued_for_an_offline_node_then_sent_again_after_its_next_birth(
    server_factory: Any, nodes: list[FakeNode]
) -> None:
    server = start(server_factory)
    register(server, MAC)
    command = create(server, command="facts")
    assert get(server, command["id"])["state"] == "queued"  # liveness unknown: nothing goes out
    first = connect(nodes, server, MAC, "s1")
    received(first, command["id"])
    wait_state(server, command["id"], "sent")
    first.vanish()  # lost before the agent accepted it
    wait_for(lambda: server.api("GET", f"/api/v1/nodes/{MAC}").json()["liveness"] == "offline", 20, "offline")
    second = connect(nodes, server, MAC, "s2")
    [again] = received(second, command["id"])
    assert again["command"] == "facts"
    second.result(command["id"], "succeeded", exit_code=0)
    assert wait_state(server, command["id"], "succeeded")["exit_code"] == 0


def test_deadlines_expire_unstarted_commands_and_time_out_started_ones(
    server_factory: Any, nodes: list[FakeNode]
) -> None:
    server = start(server_factory)
    register(server, MAC, OTHER)
    never = create(server, mac=OTHER, timeout=1)  # OTHER never comes online
    fake = connect(nodes, server, MAC, "s1")
    started = create(server, timeout=8)  # long enough to be accepted on a busy machine
    received(fake, started["id"])
    fake.result(started["id"], "accepted")
    wait_state(server, started["id"], "accepted")
    expired = wait_state(server, never["id"], "expired")
    assert expired["detail"] == f"deadline {never['deadline']} passed" and "sent_at" not in expired
    timed_out = wait_state(server, started["id"], "timed_out")
    assert timed_out["finished_at"] >= timed_out["deadline"]
    fake.result(started["id"], "succeeded", exit_code=0)  # too late
    wait_for(lambda: counters(server)["stale_result"] == 1, 20, "the late result counted as stale")
    assert get(server, started["id"])["state"] == "timed_out"
    last = server.api("GET", f"/api/v1/nodes/{MAC}/events").json()[-1]
    assert (last["kind"], last["source"], last["old"], last["new"]) == ("command", "system", "accepted", "timed_out")
