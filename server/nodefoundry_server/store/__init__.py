"""The node store: one SQLite file in WAL mode, shared by every process.

Writers use ``Store.write()``, a ``BEGIN IMMEDIATE`` transaction: the write
lock is taken before anything is read, so a check and the update that depends
on it can never interleave with another writer (API workers, DHCP, MQTT).
Connections are per thread and per process (gunicorn forks after start-up).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import schema

NODE_COLUMNS = (
    "mac, status, liveness, hostname, ip, netmask, gateway, dns, arch, labels, profile, facts,"
    " install_phase, install_started_at, install_progress_at, last_heartbeat, created_at, updated_at"
)
STATUSES = ("discovered", "installing", "installed", "failed")


def stamp(moment: datetime) -> str:
    """A UTC timestamp as stored: RFC 3339 with milliseconds, so it sorts as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def now() -> str:
    return stamp(datetime.now(UTC))


class Store:
    """Access to the SQLite database; cheap to share between threads."""

    def __init__(self, path: str | os.PathLike[str], synchronous: str = "full") -> None:
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self._local = threading.local()
        self._pid = os.getpid()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child never reuses its parent's)."""
        if self._pid != os.getpid():
            self._local = threading.local()
            self._pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self) -> None:
        """Close this thread's connection (required before this process forks)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def open(self) -> int:
        """Create the file if needed and migrate; return the schema version."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return schema.migrate(self.conn(), now())

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # --- reads -------------------------------------------------------------

    def get_node(self, mac: str) -> dict[str, Any] | None:
        row = self.conn().execute(f"SELECT {NODE_COLUMNS} FROM nodes WHERE mac = ?", (mac,)).fetchone()
        return node_json(row) if row else None

    def get_node_row(self, mac: str) -> sqlite3.Row | None:
        """The full row, including the install secret's nonce (never sent to clients)."""
        return self.conn().execute("SELECT * FROM nodes WHERE mac = ?", (mac,)).fetchone()

    def list_nodes(
        self, statuses: Sequence[str] = (), limit: int | None = None, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """Nodes newest first, and the total that match the filter."""
        where, args = "", list(statuses)
        if statuses:
            where = f" WHERE status IN ({','.join('?' * len(statuses))})"
        conn = self.conn()
        total = conn.execute(f"SELECT COUNT(*) FROM nodes{where}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT {NODE_COLUMNS} FROM nodes{where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            [*args, -1 if limit is None else limit, offset],
        ).fetchall()
        return [node_json(row) for row in rows], total

    def node_events(self, mac: str, limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
        rows = self.conn().execute(
            "SELECT id, at, source, kind, field, old, new, detail, actor FROM node_events"
            " WHERE mac = ? AND id > ? ORDER BY id LIMIT ?",
            (mac, after, limit),
        )
        return [event_json(row) for row in rows]

    def has_events(self, mac: str) -> bool:
        """A deleted node keeps its history; this tells a forgotten MAC from one never seen."""
        return self.conn().execute("SELECT 1 FROM node_events WHERE mac = ? LIMIT 1", (mac,)).fetchone() is not None

    def setting(self, key: str) -> str | None:
        row = self.conn().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def components(self) -> dict[str, dict[str, Any]]:
        rows = self.conn().execute("SELECT name, state, detail, updated_at FROM components")
        return {
            row["name"]: {"state": row["state"], "detail": row["detail"], "updated_at": row["updated_at"]}
            for row in rows
        }

    def set_component(self, name: str, state: str, detail: str | None = None) -> None:
        """Background services publish their state here; HTTP workers read it for /health."""
        with self.write() as conn:
            conn.execute(
                "INSERT INTO components VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET state = excluded.state, detail = excluded.detail, updated_at = excluded.updated_at",
                (name, state, detail, now()),
            )

    def integrity_check(self) -> str:
        return self.conn().execute("PRAGMA integrity_check").fetchone()[0]


def add_event(
    conn: sqlite3.Connection,
    mac: str,
    source: str,
    kind: str,
    *,
    field: str | None = None,
    old: Any = None,
    new: Any = None,
    detail: dict[str, Any] | None = None,
    actor: str | None = None,
    at: str | None = None,
) -> None:
    """Append one history row inside the caller's transaction."""
    add_events(conn, [(mac, at or now(), source, kind, field, old, new, detail, actor)])


EventRow = tuple[str, str, str, str, str | None, Any, Any, dict[str, Any] | None, str | None]


def add_events(conn: sqlite3.Connection, rows: Iterable[EventRow]) -> None:
    """Append many history rows with one statement (batched writers); each row is
    ``(mac, at, source, kind, field, old, new, detail, actor)`` as ``add_event`` takes them."""
    conn.executemany(
        "INSERT INTO node_events (mac, at, source, kind, field, old, new, detail, actor) VALUES (?,?,?,?,?,?,?,?,?)",
        [
            (mac, at, source, kind, field, _text(old), _text(new), json.dumps(detail) if detail else None, actor)
            for mac, at, source, kind, field, old, new, detail, actor in rows
        ],
    )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


_OPTIONAL_FIELDS = ("ip", "netmask", "gateway", "hostname", "arch", "profile", "last_heartbeat", "install_phase")


def node_json(row: sqlite3.Row) -> dict[str, Any]:
    """The public JSON of a node (seed field names; empty network fields omitted)."""
    node: dict[str, Any] = {"mac": row["mac"], "status": row["status"], "liveness": row["liveness"]}
    for key in _OPTIONAL_FIELDS:
        if row[key]:
            node[key] = row[key]
    node["dns"] = json.loads(row["dns"]) if row["dns"] else []
    if not node["dns"]:
        del node["dns"]
    node["labels"] = json.loads(row["labels"]) if row["labels"] else {}
    node["facts"] = json.loads(row["facts"]) if row["facts"] else {}
    if row["install_started_at"]:
        node["install_started_at"] = row["install_started_at"]
        node["install_progress_at"] = row["install_progress_at"]
    node["created_at"] = row["created_at"]
    node["updated_at"] = row["updated_at"]
    return node


def event_json(row: sqlite3.Row) -> dict[str, Any]:
    event = {key: row[key] for key in ("id", "at", "source", "kind") if row[key] is not None}
    for key in ("field", "old", "new", "actor"):
        if row[key] is not None:
            event[key] = row[key]
    if row["detail"]:
        event["detail"] = json.loads(row["detail"])
    return event
