"""Command records: the only code that changes ``commands.state``.

    queued ──published──► sent ──agent──► accepted ──► running ──► succeeded | failed | timed_out
       │                   │                 └─────────────┴──deadline (server)──► timed_out
       └───────────────────┴──deadline (server)──► expired          agent: rejected | expired

A state only moves forward (``RANK``); a final state never changes again, so
a late or replayed result cannot undo one. Every change appends a ``command``
event to the node's history in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from nodefoundry_agent import protocol

from .store import Store, add_event, now, stamp

OPEN_STATES = ("queued", "sent", "accepted", "running")
STATES = (*OPEN_STATES, *protocol.FINAL_STATES)
RANK = {"queued": 0, "sent": 1, "accepted": 2, "running": 3} | dict.fromkeys(protocol.FINAL_STATES, 4)
FIELDS = ("id", "mac", "command", "args", "state", "created_at", "deadline", "sent_at", "updated_at", "finished_at",
          "exit_code", "stdout", "stderr", "detail")  # fmt: skip
COLUMNS = ", ".join(FIELDS)


def command_json(row: sqlite3.Row) -> dict[str, Any]:
    """The public JSON of a command; empty optional fields are left out, as for nodes."""
    body = {key: row[key] for key in FIELDS if row[key] is not None}
    body["args"] = json.loads(row["args"])
    return body


def _event(conn: sqlite3.Connection, row: sqlite3.Row, new: str, source: str, when: str, **extra: Any) -> None:
    """A state change in the node's history; the command id is in ``detail``."""
    detail = {"id": row["id"], "command": row["command"], **{k: v for k, v in extra.items() if v is not None}}
    add_event(conn, row["mac"], source, "command", field="state", old=row["state"], new=new, detail=detail, at=when)


def create_in(
    conn: sqlite3.Connection, mac: str, command: str, args: dict[str, Any], timeout: int, actor: str | None
) -> str | None:
    """Queue a command for a known node (its args already checked); its id, or None for an unknown MAC."""
    if conn.execute("SELECT 1 FROM nodes WHERE mac = ?", (mac,)).fetchone() is None:
        return None
    moment = datetime.now(UTC)
    when, deadline = stamp(moment), stamp(moment + timedelta(seconds=timeout))
    command_id = uuid.uuid4().hex
    conn.execute(
        "INSERT INTO commands (id, mac, command, args, state, created_at, deadline, updated_at, actor)"
        " VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
        (command_id, mac, command, json.dumps(args, sort_keys=True), when, deadline, when, actor),
    )
    detail = {"id": command_id, "command": command, "deadline": deadline}
    add_event(conn, mac, "api", "command", field="state", new="queued", detail=detail, actor=actor, at=when)
    return command_id


def create_many(
    store: Store, macs: Sequence[str], command: str, args: dict[str, Any], timeout: int, actor: str | None
) -> list[tuple[str, str | None]]:
    """One transaction for all MACs: (mac, command id or None for an unknown node)."""
    with store.write() as conn:
        return [(mac, create_in(conn, mac, command, args, timeout, actor)) for mac in macs]


def get(store: Store, command_id: str) -> dict[str, Any] | None:
    row = store.conn().execute(f"SELECT {COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
    return command_json(row) if row else None


def list_for_node(
    store: Store, mac: str, states: Sequence[str] = (), limit: int = 100, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """A node's commands, newest first, and how many match the filter."""
    where, params = "mac = ?", [mac]
    if states:
        where += f" AND state IN ({','.join('?' * len(states))})"
        params += list(states)
    conn = store.conn()
    total = conn.execute(f"SELECT COUNT(*) FROM commands WHERE {where}", params).fetchone()[0]
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM commands WHERE {where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    return [command_json(row) for row in rows], total


def has_commands(store: Store, mac: str) -> bool:
    return store.conn().execute("SELECT 1 FROM commands WHERE mac = ? LIMIT 1", (mac,)).fetchone() is not None


def apply_result_in(conn: sqlite3.Connection, mac: str, result: dict[str, Any], when: str) -> str:
    """Apply one agent result: ``applied``, ``unknown`` (no such command for this MAC) or ``stale``.

    The MAC comes from the topic, so a node can only ever report on its own commands.
    """
    row = conn.execute(
        "SELECT id, mac, command, state FROM commands WHERE id = ? AND mac = ?", (result["cmd_id"], mac)
    ).fetchone()
    if row is None:
        return "unknown"
    new = result["state"]
    if RANK[new] <= RANK[row["state"]]:
        return "stale"
    final = new in protocol.FINAL_STATES
    conn.execute(
        "UPDATE commands SET state = ?, updated_at = ?, finished_at = ?, exit_code = coalesce(?, exit_code),"
        " stdout = coalesce(?, stdout), stderr = coalesce(?, stderr), detail = coalesce(?, detail) WHERE id = ?",
        (new, when, when if final else None, result["exit_code"], result["stdout"], result["stderr"],
         result["detail"], row["id"]),
    )  # fmt: skip
    _event(conn, row, new, "mqtt", when, exit_code=result["exit_code"])
    return "applied"


def due_for_dispatch(store: Store, limit: int = 500) -> list[sqlite3.Row]:
    """Unexpired commands to publish now: queued ones, and sent ones the agent has not accepted and that went
    out before the node last came online (the agent may have lost them; it ignores a cmd_id it already has)."""
    return (
        store.conn()
        .execute(
            "SELECT c.id, c.mac, c.command, c.args, c.deadline FROM commands c JOIN nodes n ON n.mac = c.mac"
            " WHERE c.state IN ('queued', 'sent') AND c.deadline > ? AND n.liveness = 'online'"
            " AND (c.state = 'queued' OR c.sent_at < n.online_at) ORDER BY c.created_at LIMIT ?",
            (now(), limit),
        )
        .fetchall()
    )


def mark_sent(store: Store, ids: Iterable[str], when: str) -> None:
    """Record a publish made at ``when``; only ``queued`` moves (to ``sent``): the agent may have answered already."""
    with store.write() as conn:
        for command_id in ids:
            row = conn.execute("SELECT id, mac, command, state FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None or row["state"] in protocol.FINAL_STATES:
                continue
            conn.execute(
                "UPDATE commands SET sent_at = ?, updated_at = ?,"
                " state = CASE state WHEN 'queued' THEN 'sent' ELSE state END WHERE id = ?",
                (when, when, command_id),
            )
            if row["state"] == "queued":
                _event(conn, row, "sent", "mqtt", when)


def expire_overdue(store: Store) -> int:
    """Enforce deadlines: never started (queued, sent) → ``expired``; started → ``timed_out``."""
    when = now()
    with store.write() as conn:
        rows = conn.execute(
            "SELECT id, mac, command, state, deadline FROM commands"
            " WHERE state IN ('queued', 'sent', 'accepted', 'running') AND deadline <= ?",
            (when,),
        ).fetchall()
        for row in rows:
            new = "expired" if row["state"] in ("queued", "sent") else "timed_out"
            conn.execute(
                "UPDATE commands SET state = ?, updated_at = ?, finished_at = ?, detail = coalesce(detail, ?)"
                " WHERE id = ?",
                (new, when, when, f"deadline {row['deadline']} passed", row["id"]),
            )
            _event(conn, row, new, "system", when, deadline=row["deadline"])
    return len(rows)
