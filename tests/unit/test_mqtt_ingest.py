"""The MQTT ingest writer against a real SQLite store: what each message does, and what it must not do.

Messages are fed to ``Ingest.write`` as paho's thread queues them (topic already split), so every rule
of the batch fold is checked without a broker; the broker path is covered by the integration tests.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from nodefoundry_agent import protocol
from nodefoundry_server import commands, lifecycle
from nodefoundry_server.mqtt.ingest import Counters, Ingest, Item
from nodefoundry_server.mqtt.liveness import Watchdog
from nodefoundry_server.store import Store
from tests.unit.conftest import MAC, OTHER

STRANGER = "aabbccddeeff"


def make_ingest(store: Store, register_unknown: bool = False) -> Ingest:
    return Ingest(store, Counters(), register_unknown)


def item(mac: str, kind: str, payload: bytes | dict[str, Any], *, cmd_id: str | None = None,
         retained: bool = False) -> Item:  # fmt: skip
    raw = protocol.encode(payload) if isinstance(payload, dict) else payload
    return (mac, kind, cmd_id, raw, time.time(), retained)


def status(mac: str = MAC, uptime: int = 5, session: str = "s1", **fields: Any) -> Item:
    body = {"status": "installed", "ip": "10.0.0.21", "hostname": "edge-01.lab", "uptime": uptime,
            "timestamp": protocol.timestamp(), "agent_version": "1.2.0", "session": session, **fields}  # fmt: skip
    return item(mac, protocol.STATUS, body)


def state(value: str, session: str, mac: str = MAC, retained: bool = False) -> Item:
    return item(mac, protocol.STATE, protocol.state_payload(value, session), retained=retained)


def result(cmd_id: str, value: str, mac: str = MAC, **fields: Any) -> Item:
    return item(mac, protocol.RESULT, protocol.result_payload(cmd_id, value, **fields), cmd_id=cmd_id)


def events(store: Store, mac: str = MAC) -> list[tuple[str, str | None, str | None]]:
    return [(event["kind"], event.get("old"), event.get("new")) for event in store.node_events(mac)]


def row(store: Store, mac: str = MAC) -> Any:
    return store.get_node_row(mac)


# --- status -----------------------------------------------------------------------------------------------------


def test_first_status_installs_an_installing_node_and_records_the_agent(store: Store) -> None:
    lifecycle.start_install(store, MAC, "install", source="api")
    ingest = make_ingest(store)
    ingest.write([status()])
    node = store.get_node(MAC)
    assert node is not None
    assert (node["status"], node["liveness"], node["ip"], node["hostname"]) == (
        "installed", "online", "10.0.0.21", "edge-01")  # fmt: skip
    assert node["facts"] == {"uptime": 5, "agent_version": "1.2.0"}
    assert node["last_heartbeat"] and row(store)["mqtt_session"] == "s1"
    kinds = [kind for kind, _old, _new in events(store)]
    assert kinds[:2] == ["registered", "install"] and sorted(kinds[2:]) == ["installed", "online", "updated", "updated"]
    assert ingest.counters.applied == 1


def test_the_old_systems_agent_cannot_finish_a_reinstall(store: Store) -> None:
    lifecycle.start_install(store, MAC, "install", source="api")
    ingest = make_ingest(store)
    ingest.write([status(session="old")])
    time.sleep(0.01)  # the stored times have milliseconds: the reinstall starts after the old session
    lifecycle.start_install(store, MAC, "reinstall", source="api")
    ingest.write([status(uptime=6, session="old")])  # still running until the node reboots
    assert store.get_node(MAC)["status"] == "installing"  # type: ignore[index]
    ingest.write([state("online", "new"), status(uptime=1, session="new")])  # the new system
    assert store.get_node(MAC)["status"] == "installed"  # type: ignore[index]


def test_statuses_of_one_node_in_a_batch_fold_into_one_update(store: Store) -> None:
    ingest = make_ingest(store)
    revision = row(store)["revision"]
    ingest.write([status(uptime=1), status(uptime=2, ip="10.0.0.22"), status(uptime=3, ip="10.0.0.22")])
    node = store.get_node(MAC)
    assert node is not None and node["facts"]["uptime"] == 3 and node["ip"] == "10.0.0.22"
    assert row(store)["revision"] == revision + 1
    assert [e for e in events(store) if e[0] == "online"] == [("online", "unknown", "online")]
    assert ("updated", "10.0.0.21", "10.0.0.22") in events(store)
    assert ingest.counters.applied == 3


def test_a_heartbeat_that_changes_nothing_else_keeps_updated_at(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([status(uptime=1)])
    before = store.get_node(MAC)
    history = events(store)
    time.sleep(0.01)
    ingest.write([status(uptime=2)])
    after = store.get_node(MAC)
    assert before is not None and after is not None
    assert after["updated_at"] == before["updated_at"] and after["last_heartbeat"] > before["last_heartbeat"]
    assert after["facts"]["uptime"] == 2 and events(store) == history


def test_a_status_never_moves_a_discovered_or_failed_node(store: Store) -> None:
    make_ingest(store).write([status()])
    node = store.get_node(MAC)
    assert node is not None and node["status"] == "discovered" and node["liveness"] == "online"


def test_an_unusable_hostname_is_left_out_not_the_status(store: Store) -> None:
    make_ingest(store).write([status(hostname="a" * 70 + ".lab")])
    node = store.get_node(MAC)
    assert node is not None and "hostname" not in node and node["last_heartbeat"]


@pytest.mark.parametrize(
    ("payload", "counter"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"\xff\xfe", "malformed"),
        ({"uptime": "5"}, "malformed"),
        ({"uptime": True}, "malformed"),
        ({"uptime": -1}, "malformed"),
        ({"ip": 5}, "malformed"),
        ({"ip": "10.0.0.300"}, "malformed"),
        ({"ip": "010.0.0.1"}, "malformed"),
        ({"hostname": "edge;reboot"}, "malformed"),
        ({"session": "s 1"}, "malformed"),
        ({"agent_version": "1.0'"}, "malformed"),
        ({"hostname": "x" * 5000}, "oversize"),
    ],
)
def test_a_bad_status_is_dropped_counted_and_stores_nothing(store: Store, payload: Any, counter: str) -> None:
    before = store.get_node(MAC)
    ingest = make_ingest(store)
    ingest.write([item(MAC, protocol.STATUS, payload)])
    assert store.get_node(MAC) == before and events(store) == [("registered", None, "discovered")]
    assert getattr(ingest.counters, counter) == 1 and ingest.counters.applied == 0


def test_bad_messages_do_not_spoil_good_ones_in_the_same_batch(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([item(MAC, protocol.STATUS, b"nope"), status(uptime=9), item(OTHER, protocol.FACTS, b"[]")])
    node = store.get_node(MAC)
    assert node is not None and node["facts"]["uptime"] == 9
    assert (ingest.counters.malformed, ingest.counters.applied) == (2, 1)


def test_unknown_nodes_are_counted_and_ignored(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([status(STRANGER), state("online", "s1", STRANGER), item(STRANGER, protocol.FACTS, {"os": "x"})])
    assert store.get_node(STRANGER) is None and not store.has_events(STRANGER)
    assert (ingest.counters.unknown_node, ingest.counters.registered) == (3, 0)


def test_with_register_unknown_a_reporting_agent_registers_an_installed_node(store: Store) -> None:
    ingest = make_ingest(store, register_unknown=True)
    ingest.write([item(STRANGER, protocol.FACTS, {"os": "x"}), status(STRANGER)])
    node = store.get_node(STRANGER)
    assert node is not None and (node["status"], node["liveness"], node["ip"]) == ("installed", "online", "10.0.0.21")
    assert events(store, STRANGER)[0] == ("registered", None, "installed")
    assert (ingest.counters.registered, ingest.counters.unknown_node) == (1, 1)  # facts came before the status


# --- liveness ---------------------------------------------------------------------------------------------------


def test_birth_and_will_follow_the_session(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([state("online", "s1")])
    assert store.get_node(MAC)["liveness"] == "online"  # type: ignore[index]
    ingest.write([state("offline", "s0")])  # a late will of an earlier connection
    assert store.get_node(MAC)["liveness"] == "online"  # type: ignore[index]
    assert ingest.counters.stale_will == 1
    ingest.write([state("online", "s1"), state("offline", "s1")])
    assert store.get_node(MAC)["liveness"] == "offline"  # type: ignore[index]
    assert [e for e in events(store) if e[0] in ("online", "offline")] == [
        ("online", "unknown", "online"), ("offline", "online", "offline")]  # fmt: skip


def test_a_new_session_while_online_marks_a_new_online_time(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([state("online", "s1")])
    first = row(store)["online_at"]
    time.sleep(0.01)
    ingest.write([state("online", "s1")])
    assert row(store)["online_at"] == first
    ingest.write([status(session="s2")])
    assert row(store)["online_at"] > first and row(store)["mqtt_session"] == "s2"
    assert len([e for e in events(store) if e[0] == "online"]) == 1


def test_a_retained_birth_of_the_known_session_is_old_news(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([state("online", "s1"), state("offline", "s1")])
    ingest.write([state("online", "s1", retained=True)])
    assert store.get_node(MAC)["liveness"] == "offline"  # type: ignore[index]
    ingest.write([state("online", "s2", retained=True)])  # a session the server missed while away
    assert store.get_node(MAC)["liveness"] == "online"  # type: ignore[index]


def test_a_state_needs_a_session(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([item(MAC, protocol.STATE, {"state": "online"}), item(MAC, protocol.STATE, {"state": "away"})])
    assert store.get_node(MAC)["liveness"] == "unknown"  # type: ignore[index]
    assert ingest.counters.malformed == 2


def test_the_watchdog_takes_silent_nodes_offline_once(store: Store) -> None:
    ingest = make_ingest(store)
    ingest.write([status(MAC), state("online", "s9", OTHER)])
    old = "2020-01-01T00:00:00.000Z"
    with store.write() as conn:
        conn.execute("UPDATE nodes SET last_heartbeat = ?, online_at = ? WHERE mac = ?", (old, old, MAC))
    watchdog = Watchdog(store, heartbeat_interval=30)
    assert watchdog.timeout == 90
    assert watchdog.run_once() == [MAC]
    assert watchdog.run_once() == []
    assert store.get_node(MAC)["liveness"] == "offline"  # type: ignore[index]
    assert store.get_node(OTHER)["liveness"] == "online"  # type: ignore[index]  (online by birth just now)
    offline = store.node_events(MAC)[-1]
    assert (offline["kind"], offline["source"], offline["detail"]["reason"]) == ("offline", "mqtt", "heartbeat timeout")


# --- facts ------------------------------------------------------------------------------------------------------


def test_agent_facts_replace_facts_agent_and_keep_the_boot_facts(store: Store) -> None:
    with store.write() as conn:
        conn.execute("UPDATE nodes SET facts = ? WHERE mac = ?", (json.dumps({"platform": "efi"}), MAC))
    ingest = make_ingest(store)
    ingest.write([status(), item(MAC, protocol.FACTS, {"os": "debian", "disks": ["sda"]})])
    ingest.write([item(MAC, protocol.FACTS, {"os": "debian", "kernel": "6.1"})])
    node = store.get_node(MAC)
    assert node is not None
    assert node["facts"] == {"platform": "efi", "uptime": 5, "agent_version": "1.2.0",
                             "agent": {"os": "debian", "kernel": "6.1"}}  # fmt: skip
    updated_at = node["updated_at"]
    time.sleep(0.01)
    ingest.write([item(MAC, protocol.FACTS, {"os": "debian", "kernel": "6.1"}, retained=True)])
    assert store.get_node(MAC)["updated_at"] == updated_at  # type: ignore[index]


# --- command results --------------------------------------------------------------------------------------------


def new_command(store: Store, mac: str = MAC) -> str:
    [(_mac, command_id)] = commands.create_many(store, [mac], "ping", {}, 60, "test")
    assert command_id is not None
    return command_id


def test_results_move_a_command_forward_only(store: Store) -> None:
    command_id = new_command(store)
    ingest = make_ingest(store)
    ingest.write([result(command_id, "accepted"), result(command_id, "running")])
    assert commands.get(store, command_id)["state"] == "running"  # type: ignore[index]
    ingest.write([result(command_id, "succeeded", exit_code=0, stdout="pong\n"), result(command_id, "running")])
    ingest.write([result(command_id, "failed", exit_code=1)])
    command = commands.get(store, command_id)
    assert command is not None
    assert (command["state"], command["exit_code"], command["stdout"]) == ("succeeded", 0, "pong\n")
    assert command["finished_at"] == command["updated_at"]
    assert (ingest.counters.applied, ingest.counters.stale_result) == (3, 2)
    history = [(e["new"], e["source"]) for e in store.node_events(MAC) if e["kind"] == "command"]
    assert history == [("queued", "api"), ("accepted", "mqtt"), ("running", "mqtt"), ("succeeded", "mqtt")]


def test_a_result_counts_only_on_the_topic_of_the_commands_node(store: Store) -> None:
    command_id = new_command(store, MAC)
    ingest = make_ingest(store)
    ingest.write([result(command_id, "succeeded", mac=OTHER), result("feedbeef", "succeeded")])
    assert commands.get(store, command_id)["state"] == "queued"  # type: ignore[index]
    assert ingest.counters.unknown_command == 2


def test_a_result_whose_payload_names_another_command_is_malformed(store: Store) -> None:
    command_id, other_id = new_command(store), new_command(store)
    ingest = make_ingest(store)
    ingest.write([item(MAC, protocol.RESULT, protocol.result_payload(other_id, "succeeded"), cmd_id=command_id)])
    assert commands.get(store, command_id)["state"] == commands.get(store, other_id)["state"] == "queued"  # type: ignore[index]
    assert ingest.counters.malformed == 1
