"""Command records: what the dispatcher picks up, and the server-side deadlines."""

from __future__ import annotations

import pytest

from nodefoundry_server import commands, validate
from nodefoundry_server.store import Store, now
from nodefoundry_server.validate import InvalidValue
from tests.unit.conftest import MAC, OTHER

PAST = "2020-01-01T00:00:00.000Z"


def queue(store: Store, mac: str = MAC, timeout: int = 60) -> str:
    [(_mac, command_id)] = commands.create_many(store, [mac], "ping", {}, timeout, "test")
    assert command_id is not None
    return command_id


def set_command(store: Store, command_id: str, **columns: str) -> None:
    assignments = ", ".join(f"{key} = ?" for key in columns)
    with store.write() as conn:
        conn.execute(f"UPDATE commands SET {assignments} WHERE id = ?", (*columns.values(), command_id))


def set_online(store: Store, mac: str, online_at: str) -> None:
    with store.write() as conn:
        conn.execute("UPDATE nodes SET liveness = 'online', online_at = ? WHERE mac = ?", (online_at, mac))


def due(store: Store) -> list[str]:
    return [row["id"] for row in commands.due_for_dispatch(store)]


def test_unknown_nodes_get_no_command(store: Store) -> None:
    assert commands.create_many(store, ["aabbccddeeff", MAC], "reboot", {}, 60, None)[0] == ("aabbccddeeff", None)
    assert [c["mac"] for c in commands.list_for_node(store, MAC)[0]] == [MAC]


def test_only_online_nodes_get_their_queued_commands(store: Store) -> None:
    waiting, expired, offline = queue(store), queue(store), queue(store, OTHER)
    set_command(store, expired, deadline=PAST)
    assert due(store) == []
    set_online(store, MAC, "2024-05-01T12:00:00.000Z")
    assert due(store) == [waiting]
    assert offline not in due(store)


def test_sent_commands_go_again_only_after_the_node_came_back(store: Store) -> None:
    command_id = queue(store)
    set_online(store, MAC, "2024-05-01T12:00:00.000Z")
    commands.mark_sent(store, [command_id], now())
    assert commands.get(store, command_id)["state"] == "sent"  # type: ignore[index]
    assert due(store) == []
    set_online(store, MAC, "2999-01-01T00:00:00.000Z")  # a new session since it was sent
    assert due(store) == [command_id]
    set_command(store, command_id, state="accepted")  # the agent has it: never again
    assert due(store) == []


def test_marking_sent_never_moves_a_command_back(store: Store) -> None:
    command_id = queue(store)
    set_command(store, command_id, state="running")
    commands.mark_sent(store, [command_id], now())
    command = commands.get(store, command_id)
    assert command is not None and command["state"] == "running" and command["sent_at"]


def test_deadlines_expire_unstarted_commands_and_time_out_started_ones(store: Store) -> None:
    ids = {state: queue(store) for state in ("queued", "sent", "accepted", "running", "succeeded")}
    for state, command_id in ids.items():
        set_command(store, command_id, state=state, deadline=PAST)
    fresh = queue(store)
    assert commands.expire_overdue(store) == 4
    states = {state: commands.get(store, command_id)["state"] for state, command_id in ids.items()}  # type: ignore[index]
    assert states == {"queued": "expired", "sent": "expired", "accepted": "timed_out", "running": "timed_out",
                      "succeeded": "succeeded"}  # fmt: skip
    assert commands.get(store, fresh)["state"] == "queued"  # type: ignore[index]
    timed_out = commands.get(store, ids["running"])
    assert timed_out is not None and timed_out["finished_at"] and timed_out["detail"] == f"deadline {PAST} passed"
    by_system = sorted((e["old"], e["new"]) for e in store.node_events(MAC) if e["source"] == "system")
    assert by_system == [
        ("accepted", "timed_out"),
        ("queued", "expired"),
        ("running", "timed_out"),
        ("sent", "expired"),
    ]
    assert commands.expire_overdue(store) == 0


def test_listing_is_newest_first_and_filters_by_state(store: Store) -> None:
    first, second, third = queue(store), queue(store), queue(store)
    set_command(store, second, state="failed")
    found, total = commands.list_for_node(store, MAC)
    assert [c["id"] for c in found] == [third, second, first] and total == 3
    found, total = commands.list_for_node(store, MAC, ["queued"], limit=1, offset=1)
    assert [c["id"] for c in found] == [first] and total == 2
    with pytest.raises(InvalidValue, match="invalid state filter 'done'"):
        validate.query_filter(["queued,done"], commands.STATES, "state")
