"""``nodefoundry.provision.node_credentials`` in a real ``ansible`` process against a real server (embedded
Mosquitto): a check run that asks the server nothing, runs that each mint a password the broker then takes,
and one clear message for each way a call can fail.
"""

from __future__ import annotations

from typing import Any

from tests.ansible.conftest import Lab
from tests.ansible.test_collection_modules import closed_port
from tests.conftest import wait_for
from tests.integration.mqtt_lab import mqtt_ready
from tests.unit.test_mqtt_credentials import connack

MAC = "525400000c01"
SPELLED = "52:54:00:00:0c:01"


def register(lab: Lab, mac: str = MAC) -> None:
    assert lab.server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201


def issued_events(lab: Lab) -> list[dict[str, Any]]:
    return [event for event in lab.snapshot(MAC)["events"][MAC] if event["kind"] == "credentials-issued"]


def test_check_mode_asks_nothing_and_reports_a_change(lab: Lab) -> None:
    register(lab)
    before = lab.snapshot(MAC)
    checked, _ = lab.module("node_credentials", {"mac": SPELLED}, "--check")
    assert (checked["_state"], checked["changed"], checked["agent_env"]) == ("CHANGED", True, {})
    assert lab.snapshot(MAC) == before


def test_each_run_mints_a_password_the_broker_accepts(lab: Lab) -> None:
    register(lab)
    port = mqtt_ready(lab.server)["node_port"]
    first, _ = lab.module("node_credentials", {"mac": SPELLED})
    assert (first["_state"], first["changed"], first["mac"], first["credentials_delivered"]) == (
        "CHANGED",
        True,
        MAC,
        True,
    )
    env = first["agent_env"]
    assert env["NF_MAC"] == env["NF_MQTT_USERNAME"] == MAC and len(env["NF_MQTT_PASSWORD"]) == 64
    second, _ = lab.module("node_credentials", {"mac": MAC})
    assert second["changed"] and second["agent_env"]["NF_MQTT_PASSWORD"] != env["NF_MQTT_PASSWORD"]
    new, old = second["agent_env"]["NF_MQTT_PASSWORD"], env["NF_MQTT_PASSWORD"]
    wait_for(lambda: str(connack(port, MAC, new)) == "Success", 20, "the new password accepted")
    assert str(connack(port, MAC, old)) == "Not authorized"
    assert len(issued_events(lab)) == 2


def test_failures_are_one_clear_message(lab: Lab) -> None:
    register(lab)
    for args, env, message in [
        ({"mac": "52:54:00:00:0c:ff"}, {}, "node not found"),
        ({"mac": "not-a-mac"}, {}, "invalid MAC address 'not-a-mac'"),
        ({"mac": MAC}, {"NODEFOUNDRY_TOKEN": "nf_wrong"}, "missing or invalid token"),
        ({"mac": MAC}, {"NODEFOUNDRY_URL": f"http://127.0.0.1:{closed_port()}"}, "cannot reach the NodeFoundry server"),
    ]:
        result, _ = lab.module("node_credentials", args, env=env)
        assert result["_state"] == "FAILED!" and message in result["msg"], (args, result)
    lab.server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"})
    refused, _ = lab.module("node_credentials", {"mac": MAC})
    assert "node is installing" in refused["msg"]
    assert issued_events(lab) == []
