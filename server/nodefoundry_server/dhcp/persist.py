"""The one writer of DHCP state: batches of decisions, one transaction each, replies after COMMIT.

The receive thread never waits on SQLite. It queues each decision's writes here (lease rows, node
registrations, a node's first address) together with the ACK that depends on them; this thread
drains whatever is queued, commits it in one ``BEGIN IMMEDIATE`` transaction and only then sends
those ACKs, so no client is told about a lease that a crash could still lose.

Inside that transaction the store is the authority on reservations: the handler's copy of the
nodes' addresses is refreshed by polling, so a reservation made through the API a moment ago may
be missing from it. A lease on an address that a node of another MAC now holds is not written, and
its client gets a NAK instead of the ACK.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import lifecycle
from ..store import Store, add_event, now
from .handler import Decision, NodeAddress, Reply, Writes

log = logging.getLogger("nodefoundry.dhcp")

MAX_BATCH = 2000


@dataclass
class BatchResult:
    registered: int = 0
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)  # ip -> (client mac, node that holds it)


def write_batch(conn: sqlite3.Connection, batch: Sequence[Writes]) -> BatchResult:
    """Apply a batch inside the caller's transaction."""
    result = BatchResult()
    final_rows: dict[str, tuple[object, ...] | None] = {}
    for writes in batch:
        if writes.registration is not None:
            mac, fields = writes.registration
            result.registered += lifecycle.register_in(conn, mac, fields, source="dhcp")
        for lease in writes.leases:
            final_rows[lease.ip] = lease.row
    for ip, row in final_rows.items():
        if row is not None and row[2] == "bound":
            owner = conn.execute("SELECT mac FROM nodes WHERE ip = ? AND mac != ? LIMIT 1", (ip, row[1])).fetchone()
            if owner is not None:
                result.refused[ip] = (str(row[1]), owner[0])
    for ip in result.refused:
        del final_rows[ip]
    # Replace every touched address by its final state: the batch as a whole keeps the keys' invariants
    # (one MAC per address, one bound lease per MAC and subnet) even when rows moved within it.
    conn.executemany("DELETE FROM dhcp_leases WHERE ip = ?", [(ip,) for ip in final_rows])
    stamp = now()
    conn.executemany(
        "INSERT INTO dhcp_leases (ip, mac, state, subnet, client_id, hostname, expires_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row, stamp) for row in final_rows.values() if row is not None],
    )
    for writes in batch:
        if writes.address is not None and writes.address.ip not in result.refused:
            _record_address(conn, writes.address, stamp)
    return result


def _record_address(conn: sqlite3.Connection, address: NodeAddress, stamp: str) -> None:
    """A node's first lease becomes its address; a node that already has one (a reservation) keeps it."""
    updated = conn.execute(
        "UPDATE nodes SET ip = ?, netmask = ?, gateway = ?, dns = ?, updated_at = ?, revision = revision + 1"
        " WHERE mac = ? AND COALESCE(ip, '') = ''",
        (address.ip, address.netmask, address.gateway or None, json.dumps(list(address.dns)), stamp, address.mac),
    ).rowcount
    if updated:
        detail = {"netmask": address.netmask, "gateway": address.gateway, "dns": list(address.dns)}
        add_event(conn, address.mac, "dhcp", "dhcp-address", field="ip", new=address.ip, detail=detail, at=stamp)


class Persister(threading.Thread):
    """Runs ``write_batch`` for everything queued, then sends the replies that waited for it."""

    def __init__(
        self, store: Store, send: Callable[[Reply], None], on_committed: Callable[[BatchResult], None]
    ) -> None:
        super().__init__(name="dhcp-persister", daemon=True)
        self.store = store
        self.send = send
        self.on_committed = on_committed
        self.last_error = ""
        self._queue: queue.SimpleQueue[Decision | None] = queue.SimpleQueue()

    def put(self, decision: Decision) -> None:
        """Queue a decision's writes; its reply too when it is ``durable``."""
        self._queue.put(decision)

    def stop(self, timeout: float = 10) -> None:
        """Commit what is queued, then end."""
        self._queue.put(None)
        self.join(timeout)

    def run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            self._commit([decision for decision in batch if decision is not None])

    def _commit(self, batch: list[Decision]) -> None:
        if not batch:
            return
        try:
            with self.store.write() as conn:
                result = write_batch(conn, [decision.writes for decision in batch if decision.writes is not None])
        except sqlite3.Error as exc:
            # Nothing is acknowledged: the clients retry, and their next REQUEST queues the lease again.
            self.last_error = str(exc)
            log.error("cannot store %d DHCP decisions: %s", len(batch), exc)
            return
        self.last_error = ""
        self.on_committed(result)
        for decision in batch:
            if decision.durable:
                self._answer(decision, result.refused)

    def _answer(self, decision: Decision, refused: dict[str, tuple[str, str]]) -> None:
        leases = decision.writes.leases if decision.writes is not None else []
        if any(lease.ip in refused and lease.row is not None for lease in leases):
            reply = decision.refusal
        else:
            reply = decision.reply
        if reply is not None:
            self.send(reply)
