"""Liveness: is a node's agent running? ``online``/``offline``, independent of the lifecycle status.

Evidence, in the order the writer applies it:

- a status message: online; its session becomes the node's current one;
- a birth (``state: online``): online, and its session becomes the current one. A *retained* birth
  of the session already known is the broker replaying old news and changes nothing;
- a will or clean shutdown (``state: offline``): offline, but only for the current session; a will
  of an older session (it arrives late, after the agent reconnected) is stale and ignored;
- the watchdog: no status and no birth for ``3 x agent_heartbeat_interval`` → offline (the service
  runs it only after being connected to the broker for that long).

``online_at`` is when the node last came online (a new session counts, even without a visible
offline in between): the watchdog's reference when no status came yet, the mark after which commands
sent earlier are sent again, and what tells the new system's agent from the old one during a reinstall.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ..store import Store, add_event, now, stamp

if TYPE_CHECKING:
    from .ingest import NodeView

log = logging.getLogger("nodefoundry.mqtt")

TIMEOUT_HEARTBEATS = 3


def _online(node: NodeView, at: float, reason: str, new_session: bool) -> None:
    if node.liveness != "online":
        node.event("online", "liveness", node.liveness, "online", {"reason": reason}, at)
        node.liveness = "online"
        node.changed = True
    elif not new_session:
        return
    node.online_at = stamp(datetime.fromtimestamp(at, UTC))
    node.dirty = True


def status_seen(node: NodeView, session: str | None, at: float) -> None:
    """A status proves the agent runs now; a session the server has not seen means the agent restarted."""
    new_session = session is not None and session != node.mqtt_session
    if new_session:
        node.mqtt_session = session
    _online(node, at, "status", new_session)


def state_seen(node: NodeView, state: str, session: str, retained: bool, at: float) -> bool:
    """Apply a birth or will; False for a stale will (ignored)."""
    if state == "online":
        if retained and session == node.mqtt_session:
            return True
        new_session = session != node.mqtt_session
        node.mqtt_session = session
        _online(node, at, "birth", new_session)
        return True
    if session != node.mqtt_session:
        return False
    if node.liveness != "offline":
        node.event("offline", "liveness", node.liveness, "offline", {"reason": "will"}, at)
        node.liveness = "offline"
        node.changed = node.dirty = True
    return True


class Watchdog:
    """Marks online nodes offline when their agent fell silent; the evidence timestamps are text-sortable."""

    def __init__(self, store: Store, heartbeat_interval: int) -> None:
        self.store = store
        self.timeout = TIMEOUT_HEARTBEATS * heartbeat_interval

    def run_once(self) -> list[str]:
        cutoff = stamp(datetime.now(UTC) - timedelta(seconds=self.timeout))
        evidence = "max(coalesce(last_heartbeat, ''), coalesce(online_at, ''))"
        silent = self.store.conn().execute(
            f"SELECT mac FROM nodes WHERE liveness = 'online' AND {evidence} < ?", (cutoff,)
        )
        candidates = [row["mac"] for row in silent]
        if not candidates:
            return []
        when, detail = now(), {"reason": "heartbeat timeout", "timeout_seconds": self.timeout}
        gone = []
        with self.store.write() as conn:  # re-checked under the write lock: a status may just have come in
            for mac in candidates:
                if conn.execute(
                    "UPDATE nodes SET liveness = 'offline', updated_at = ?, revision = revision + 1"
                    f" WHERE mac = ? AND liveness = 'online' AND {evidence} < ?",
                    (when, mac, cutoff),
                ).rowcount:
                    add_event(conn, mac, "mqtt", "offline", field="liveness", old="online", new="offline",
                              detail=detail, at=when)  # fmt: skip
                    gone.append(mac)
        if gone:
            log.info("%d node(s) offline: no status for %d s", len(gone), self.timeout)
        return gone
