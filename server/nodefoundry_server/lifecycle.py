"""The node lifecycle: the only code that sets ``nodes.status``.

    discovered ──install──► installing ──finished/first status──► installed
                                 │                                    │
                                 └──error / no progress──► failed     │
                  installed | failed ──reinstall (explicit)──► installing

Every transition is one ``BEGIN IMMEDIATE`` transaction: the current status
is read under the write lock and the UPDATE repeats it as a compare-and-set,
so concurrent writers (API, DHCP, MQTT, the watchdog) get exactly one winner.
Each transition appends an event row in the same transaction.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .store import Store, add_event, now, stamp

INSTALL_FROM = {"install": ("discovered",), "reinstall": ("installed", "failed")}


class LifecycleError(Exception):
    """A refused request; ``str()`` is the API error message."""


class NodeNotFound(LifecycleError):
    def __init__(self) -> None:
        super().__init__("node not found")


class NodeExists(LifecycleError):
    def __init__(self) -> None:
        super().__init__("node already exists")


class TransitionRefused(LifecycleError):
    pass


@dataclass(frozen=True)
class Outcome:
    """Result of one transition attempt, used for per-MAC bulk answers."""

    mac: str
    ok: bool
    changed: bool
    status: str | None
    error: str | None = None

    def json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"mac": self.mac, "ok": self.ok, "changed": self.changed}
        if self.status:
            body["status"] = self.status
        if self.error:
            body["error"] = self.error
        return body


def register(
    store: Store, mac: str, fields: dict[str, Any], *, source: str, actor: str | None = None
) -> dict[str, Any]:
    """Create a node in ``discovered``; raise NodeExists if the MAC is known."""
    with store.write() as conn:
        if not register_in(conn, mac, fields, source=source, actor=actor):
            raise NodeExists()
    return store.get_node(mac) or {}


def register_in(
    conn: sqlite3.Connection, mac: str, fields: dict[str, Any], *, source: str, actor: str | None = None
) -> bool:
    """Register inside the caller's transaction (batched writers); False if the MAC is already known."""
    when = now()
    columns = {key: _column(value) for key, value in fields.items()}
    names = ", ".join(["mac", "status", "created_at", "updated_at", *columns])
    marks = ", ".join("?" * (4 + len(columns)))
    inserted = conn.execute(
        f"INSERT INTO nodes ({names}) VALUES ({marks}) ON CONFLICT (mac) DO NOTHING",
        [mac, "discovered", when, when, *columns.values()],
    ).rowcount
    if inserted:
        add_event(
            conn,
            mac,
            source,
            "registered",
            field="status",
            new="discovered",
            detail=fields or None,
            actor=actor,
            at=when,
        )
    return bool(inserted)


def register_if_new(store: Store, mac: str, fields: dict[str, Any], *, source: str) -> bool:
    """Auto-registration from the boot path: a known node keeps its status."""
    if store.get_node_row(mac) is not None:
        return False
    try:
        register(store, mac, fields, source=source)
    except NodeExists:
        return False
    return True


def register_installed_in(
    conn: sqlite3.Connection, mac: str, *, source: str, detail: dict[str, Any] | None = None
) -> bool:
    """Adopt a node that reports from an installed system but was never registered (opt-in, MQTT)."""
    when = now()
    inserted = conn.execute(
        "INSERT INTO nodes (mac, status, created_at, updated_at) VALUES (?, 'installed', ?, ?)"
        " ON CONFLICT (mac) DO NOTHING",
        (mac, when, when),
    ).rowcount
    if inserted:
        add_event(conn, mac, source, "registered", field="status", new="installed", detail=detail, at=when)
    return bool(inserted)


def _column(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _refusal(action: str, status: str) -> str:
    if action == "install":
        return f"cannot install node with status '{status}', only 'discovered' nodes can be installed"
    return f"cannot reinstall node with status '{status}', only 'installed' or 'failed' nodes can be reinstalled"


def _start_install(conn: sqlite3.Connection, mac: str, action: str, source: str, actor: str | None) -> Outcome:
    row = conn.execute("SELECT status FROM nodes WHERE mac = ?", (mac,)).fetchone()
    if row is None:
        return Outcome(mac, False, False, None, "node not found")
    status = row["status"]
    if status == "installing":
        return Outcome(mac, True, False, status)
    if status not in INSTALL_FROM[action]:
        return Outcome(mac, False, False, status, _refusal(action, status))
    from .mqtt import credentials  # here, not at the top: the mqtt package imports this module

    when, nonce = now(), secrets.token_hex(16)
    updated = conn.execute(
        "UPDATE nodes SET status = 'installing', install_nonce = ?, install_ip = NULL, install_phase = 'queued',"
        " install_started_at = ?, install_progress_at = ?, updated_at = ?, revision = revision + 1"
        " WHERE mac = ? AND status = ?",
        (nonce, when, when, when, mac, status),
    ).rowcount
    if updated != 1:  # cannot happen under BEGIN IMMEDIATE; kept as the compare-and-set guard
        raise RuntimeError(f"lost compare-and-set on {mac}")
    # The node's broker password for this install: the preseed derives it again from the nonce.
    credentials.mint_in(conn, mac, credentials.install_password(conn, mac, nonce))
    add_event(conn, mac, source, action, field="status", old=status, new="installing", actor=actor, at=when)
    return Outcome(mac, True, True, "installing")


def start_install(store: Store, mac: str, action: str, *, source: str, actor: str | None = None) -> dict[str, Any]:
    """Single-node install/reinstall with the seed's error messages.

    Unlike the bulk form, a node already ``installing`` is refused here, as
    the seed did, so a repeated PUT is visible to the caller.
    """
    with store.write() as conn:
        outcome = _start_install(conn, mac, action, source, actor)
    if outcome.status is None:
        raise NodeNotFound()
    if not outcome.changed:
        raise TransitionRefused(outcome.error or _refusal(action, outcome.status))
    return store.get_node(mac) or {}


class _Rollback(Exception):
    """Raised inside a write transaction to undo it (dry runs)."""


def start_install_many(
    store: Store, macs: Sequence[str], action: str, *, source: str, actor: str | None = None, dry_run: bool = False
) -> list[Outcome]:
    """Bulk install/reinstall in one transaction; per-MAC outcome, idempotent.

    With ``dry_run`` the transaction is rolled back: the answer says what
    would change (Ansible check mode) and nothing is stored.
    """
    outcomes: list[Outcome] = []
    try:
        with store.write() as conn:
            outcomes = [_start_install(conn, mac, action, source, actor) for mac in macs]
            if dry_run:
                raise _Rollback()
    except _Rollback:
        pass
    return outcomes


INSTALLER_EVENTS = ("started", "progress", "finished", "failed")


def installer_report(store: Store, mac: str, event: str, *, phase: str | None, detail: dict[str, Any] | None) -> str:
    """Apply a callback from debian-installer; return the node's status after it.

    ``started`` and ``progress`` refresh the no-progress timer; ``finished``
    moves the node to ``installed`` (its next PXE boot goes to the local disk);
    ``failed`` moves it to ``failed``. The install token dies with the install.
    """
    when = now()
    with store.write() as conn:
        row = conn.execute("SELECT status, install_phase FROM nodes WHERE mac = ?", (mac,)).fetchone()
        if row is None or row["status"] != "installing":
            raise TransitionRefused("node is not installing")
        if event in ("started", "progress"):
            new_phase = phase or event
            conn.execute(
                "UPDATE nodes SET install_phase = ?, install_progress_at = ?, updated_at = ?, revision = revision + 1"
                " WHERE mac = ? AND status = 'installing'",
                (new_phase, when, when, mac),
            )
            if new_phase != row["install_phase"]:
                add_event(
                    conn,
                    mac,
                    "installer",
                    f"installer-{event}",
                    field="install_phase",
                    old=row["install_phase"],
                    new=new_phase,
                    detail=detail,
                    at=when,
                )
            return "installing"
        new_status = "installed" if event == "finished" else "failed"
        _end_install(conn, mac, new_status, when)
        add_event(
            conn,
            mac,
            "installer",
            f"installer-{event}",
            field="status",
            old="installing",
            new=new_status,
            detail={**(detail or {}), **({"phase": phase} if phase else {})} or None,
            at=when,
        )
        return new_status


def _end_install(conn: sqlite3.Connection, mac: str, status: str, when: str) -> None:
    conn.execute(
        "UPDATE nodes SET status = ?, install_nonce = NULL, install_ip = NULL, install_phase = ?,"
        " updated_at = ?, revision = revision + 1 WHERE mac = ? AND status = 'installing'",
        (status, "finished" if status == "installed" else "failed", when, mac),
    )


def mark_installed(store: Store, mac: str, *, source: str, detail: dict[str, Any] | None = None) -> bool:
    """An installing node that reports in (agent status) is installed; True if it changed."""
    with store.write() as conn:
        return mark_installed_in(conn, mac, source=source, detail=detail)


def mark_installed_in(conn: sqlite3.Connection, mac: str, *, source: str, detail: dict[str, Any] | None = None) -> bool:
    """``mark_installed`` inside the caller's transaction (the batched MQTT writer)."""
    when = now()
    row = conn.execute("SELECT status FROM nodes WHERE mac = ?", (mac,)).fetchone()
    if row is None or row["status"] != "installing":
        return False
    _end_install(conn, mac, "installed", when)
    add_event(conn, mac, source, "installed", field="status", old="installing", new="installed", detail=detail, at=when)
    return True


def expire_stalled_installs(store: Store, timeout_seconds: int, *, at: datetime | None = None) -> list[str]:
    """Fail installs without progress for ``timeout_seconds``; return their MACs."""
    current = at or datetime.now(UTC)
    cutoff = stamp(current - timedelta(seconds=timeout_seconds))
    when = now()
    with store.write() as conn:
        rows = conn.execute(
            "SELECT mac, install_progress_at FROM nodes WHERE status = 'installing' AND install_progress_at < ?",
            (cutoff,),
        ).fetchall()
        for row in rows:
            _end_install(conn, row["mac"], "failed", when)
            add_event(
                conn,
                row["mac"],
                "system",
                "install-timeout",
                field="status",
                old="installing",
                new="failed",
                detail={"last_progress_at": row["install_progress_at"], "timeout_seconds": timeout_seconds},
                at=when,
            )
    return [row["mac"] for row in rows]


def installing_nonce(store: Store, mac: str) -> tuple[str, str | None] | None:
    """(nonce, pinned ip) of a node that is installing now, else None."""
    row = (
        store.conn()
        .execute("SELECT install_nonce, install_ip FROM nodes WHERE mac = ? AND status = 'installing'", (mac,))
        .fetchone()
    )
    return (row["install_nonce"], row["install_ip"]) if row and row["install_nonce"] else None


def pin_install_ip(store: Store, mac: str, ip: str) -> str:
    """Trust on first use: the first address that fetches the install script owns the install."""
    with store.write() as conn:
        conn.execute(
            "UPDATE nodes SET install_ip = ? WHERE mac = ? AND status = 'installing' AND install_ip IS NULL", (ip, mac)
        )
        row = conn.execute("SELECT install_ip FROM nodes WHERE mac = ?", (mac,)).fetchone()
    return row["install_ip"] if row else ip
