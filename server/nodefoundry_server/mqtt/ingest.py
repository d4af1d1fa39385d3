"""MQTT ingest: paho's thread only queues; one writer thread applies whole batches, one transaction each.

Why: SQLite has one writer at a time and every commit costs an fsync (``synchronous=full``). The
writer takes everything queued (up to ``MAX_BATCH``), validates it outside the transaction, then
in one ``BEGIN IMMEDIATE`` reads the batch's nodes, folds every message into them in arrival order
and writes each node once (``executemany``), however many messages it sent. Nothing a node sends is
trusted: payloads go through the protocol's parsers, and the MAC in the topic is the identity.

A message that cannot be used is dropped and counted by reason (``Counters``), never half-stored.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from nodefoundry_agent import protocol
from nodefoundry_agent.protocol import FACTS, RESULT, STATE, STATUS, ProtocolError

from .. import commands, lifecycle, validate
from ..store import Store, add_events, now
from ..validate import InvalidValue
from . import liveness

log = logging.getLogger("nodefoundry.mqtt")

MAX_QUEUE = 200_000  # about 20 s of a 10,000 msg/s burst while the database is busy
MAX_QUEUE_BYTES = 256 * 1024 * 1024  # facts may be 64 KiB each
MAX_BATCH = 2_000
WRITE_ATTEMPTS = 3
WARN_EVERY_SECONDS = 10.0

# mac, kind, cmd_id, payload, received at (epoch seconds), retained
Item = tuple[str, str, str | None, bytes, float, bool]
Parsed = tuple[str, str, dict[str, Any], float, bool]


@dataclass
class Counters:
    """Messages since the service started, by fate; shown in /health."""

    received: int = 0
    applied: int = 0
    bad_topic: int = 0
    oversize: int = 0
    malformed: int = 0
    queue_full: int = 0
    unknown_node: int = 0
    registered: int = 0
    stale_will: int = 0
    unknown_command: int = 0
    stale_result: int = 0
    write_failed: int = 0

    def add(self, tally: Counter[str]) -> None:
        for key, value in tally.items():
            setattr(self, key, getattr(self, key) + value)

    def summary(self) -> str:
        return " ".join(f"{key}={value}" for key, value in asdict(self).items())


@functools.lru_cache(maxsize=8)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _stamp(at: float) -> str:
    """``store.stamp`` of an epoch time, without a datetime per message (the writer stamps thousands)."""
    return f"{_second(int(at))}.{int(at * 1000) % 1000:03d}Z"


@dataclass(slots=True)
class NodeView:
    """The MQTT-maintained columns of one node, changed in memory by a batch and written once.

    ``facts`` is never loaded whole: a status sets two of its keys (``facts_patch``), a facts message
    replaces its ``agent`` object (``agent_facts``); SQLite's JSON functions apply both."""

    mac: str
    status: str
    liveness: str
    ip: str | None
    hostname: str | None
    agent_version: str | None
    mqtt_session: str | None
    online_at: str | None
    install_started_at: str | None
    heartbeat_at: float | None = None
    facts_patch: dict[str, Any] = field(default_factory=dict)
    agent_facts: dict[str, Any] | None = None
    changed: bool = False  # a change worth a new updated_at and revision (not a mere heartbeat)
    dirty: bool = False  # the row needs writing
    renamed: bool = False  # ip or hostname changed (indexed columns: written only then)
    events: list[tuple[str, str, Any, Any, dict[str, Any] | None, float]] = field(default_factory=list)

    def event(self, kind: str, name: str, old: Any, new: Any, detail: dict[str, Any] | None, at: float) -> None:
        self.events.append((kind, name, old, new, detail, at))

    def set_field(self, name: str, value: Any, at: float) -> None:
        old = getattr(self, name)
        if value != old:
            self.event("updated", name, old, value, None, at)
            setattr(self, name, value)
            self.changed = self.dirty = self.renamed = True


_SELECT = (
    "SELECT mac, status, liveness, ip, hostname, json_extract(facts, '$.agent_version'), mqtt_session, online_at,"
    " install_started_at FROM json_each(?) AS wanted JOIN nodes ON nodes.mac = wanted.value"
)
_UPDATE = (
    "UPDATE nodes SET liveness = ?1, mqtt_session = ?2, online_at = ?3, last_heartbeat = coalesce(?4, last_heartbeat),"
    " facts = CASE WHEN ?5 IS NULL THEN facts ELSE json_patch(coalesce(facts, '{}'), ?5) END,"
    " updated_at = coalesce(?6, updated_at), revision = revision + ?7 WHERE mac = ?8"
)
_UPDATE_NAMES = "UPDATE nodes SET ip = ?, hostname = ? WHERE mac = ?"
_UPDATE_AGENT_FACTS = "UPDATE nodes SET facts = json_set(coalesce(facts, '{}'), '$.agent', json(?)) WHERE mac = ?"
_PARSERS: dict[str, Callable[[bytes], dict[str, Any]]] = {
    STATUS: protocol.parse_status,
    STATE: protocol.parse_state,
    FACTS: protocol.parse_facts,
}
_RESULT_TALLY = {"applied": "applied", "unknown": "unknown_command", "stale": "stale_result"}


def _hostname(reported: str | None) -> str | None:
    """The node's short name as the store keeps it (an RFC 1123 label), or None when unusable."""
    if not reported:
        return None
    try:
        return validate.hostname(reported.split(".", 1)[0])
    except InvalidValue:
        return None


class Ingest:
    """The queue between paho and the database, and the thread that drains it."""

    def __init__(self, store: Store, counters: Counters, register_unknown: bool) -> None:
        self.store = store
        self.counters = counters
        self.register_unknown = register_unknown
        # One producer (paho's thread) and one consumer (the writer): a deque needs no lock, and the
        # event wakes the writer only when it waits, not for every message as queue.Queue would.
        self._queue: deque[Item] = deque()
        self._ready = threading.Event()
        self._bytes_in = 0  # written by paho's thread only
        self._bytes_out = 0  # written by the writer only: their difference needs no lock either
        self._warned_at = 0.0

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def offer(self, message: mqtt.MQTTMessage) -> None:
        """paho's on_message: check the topic, queue, return. Never blocks paho's network thread."""
        try:
            mac, kind, cmd_id = protocol.parse_topic(message.topic)
        except (ProtocolError, UnicodeDecodeError):
            self.counters.bad_topic += 1
            return
        if kind not in _PARSERS and kind != RESULT:
            self.counters.bad_topic += 1
            return
        self.counters.received += 1
        payload = message.payload
        if len(self._queue) >= MAX_QUEUE or self._bytes_in - self._bytes_out + len(payload) > MAX_QUEUE_BYTES:
            self._dropped()
            return
        self._queue.append((mac, kind, cmd_id, payload, time.time(), message.retain))
        self._bytes_in += len(payload)
        if not self._ready.is_set():
            self._ready.set()

    def _dropped(self) -> None:
        self.counters.queue_full += 1
        if time.monotonic() - self._warned_at > WARN_EVERY_SECONDS:
            self._warned_at = time.monotonic()
            log.warning("MQTT ingest queue full: dropping messages (%d so far)", self.counters.queue_full)

    def run(self, stopped: threading.Event, idle: Callable[[], None]) -> None:
        """The writer thread. ``idle`` runs whenever the queue has been drained (the liveness watchdog)."""
        while not stopped.is_set():
            batch = self._take(timeout=0.5)
            if batch:
                self.write(batch)
            if len(batch) < MAX_BATCH:
                idle()
        while batch := self._take(timeout=0):  # what paho already acknowledged to the broker
            self.write(batch)

    def _take(self, timeout: float) -> list[Item]:
        if not self._queue and timeout:
            self._ready.clear()
            if not self._queue:  # checked again after the clear: an append in between is never missed
                self._ready.wait(timeout)
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
        self._bytes_out += sum(len(item[3]) for item in batch)
        return batch

    def write(self, batch: list[Item]) -> None:
        """Validate, then apply in one transaction (retried: the broker has already been acknowledged)."""
        parsed = [message for message in map(self._parse, batch) if message is not None]
        if not parsed:
            return
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.store.write() as conn:
                    tally = self._apply(conn, parsed)
            except Exception:
                log.exception("MQTT ingest: writing %d messages failed (attempt %d)", len(parsed), attempt)
                time.sleep(attempt)
                continue
            self.counters.add(tally)
            return
        self.counters.write_failed += len(parsed)

    def _parse(self, item: Item) -> Parsed | None:
        mac, kind, cmd_id, payload, at, retained = item
        if len(payload) > protocol.MAX_PAYLOAD_BYTES[kind]:
            self.counters.oversize += 1
            return None
        try:
            data = protocol.parse_result(payload, cmd_id or "") if kind == RESULT else _PARSERS[kind](payload)
        except ProtocolError as exc:
            self.counters.malformed += 1
            log.debug("dropped %s message of %s: %s", kind, mac, exc)
            return None
        return mac, kind, data, at, retained

    def _apply(self, conn: sqlite3.Connection, parsed: list[Parsed]) -> Counter[str]:
        tally: Counter[str] = Counter()
        nodes = _load(conn, {mac for mac, kind, *_ in parsed if kind != RESULT})
        for mac, kind, data, at, retained in parsed:
            if kind == RESULT:
                tally[_RESULT_TALLY[commands.apply_result_in(conn, mac, data, _stamp(at))]] += 1
                continue
            node = nodes.get(mac) or self._adopt(conn, nodes, mac, kind, data, tally)
            if node is None:
                tally["unknown_node"] += 1
            elif kind == STATUS:
                _status(conn, node, data, at)
                tally["applied"] += 1
            elif kind == STATE:
                applied = liveness.state_seen(node, data["state"], data["session"], retained, at)
                tally["applied" if applied else "stale_will"] += 1
            else:
                _facts(conn, node, data)
                tally["applied"] += 1
        _store(conn, nodes.values())
        return tally

    def _adopt(
        self, conn: sqlite3.Connection, nodes: dict[str, NodeView], mac: str, kind: str, data: dict[str, Any],
        tally: Counter[str],
    ) -> NodeView | None:  # fmt: skip
        """With ``mqtt_register_unknown``, an agent that proves it runs (status, birth) registers its node."""
        if not self.register_unknown or not (kind == STATUS or (kind == STATE and data["state"] == "online")):
            return None
        lifecycle.register_installed_in(conn, mac, source="mqtt", detail={"reason": "unknown node reported"})
        tally["registered"] += 1
        nodes.update(_load(conn, {mac}))
        return nodes[mac]


def _load(conn: sqlite3.Connection, macs: set[str]) -> dict[str, NodeView]:
    if not macs:
        return {}
    return {row[0]: NodeView(*row) for row in conn.execute(_SELECT, (json.dumps(sorted(macs)),))}


def _status(conn: sqlite3.Connection, node: NodeView, data: dict[str, Any], at: float) -> None:
    liveness.status_seen(node, data["session"], at)
    node.heartbeat_at, node.dirty = at, True
    if data["ip"]:
        node.set_field("ip", data["ip"], at)
    hostname = _hostname(data["hostname"])
    if hostname:
        node.set_field("hostname", hostname, at)
    node.facts_patch["uptime"] = data["uptime"]
    if data["agent_version"] and data["agent_version"] != node.agent_version:
        node.agent_version = node.facts_patch["agent_version"] = data["agent_version"]
        node.changed = True
    # Only an agent that came online after the install started speaks for the new system: the old
    # system's agent may still be connected, and reporting, until the node reboots into the installer.
    if node.status == "installing" and (node.online_at or "") >= (node.install_started_at or ""):
        detail = {key: data[key] for key in ("agent_version", "ip", "hostname") if data[key]}
        if lifecycle.mark_installed_in(conn, node.mac, source="mqtt", detail=detail or None):
            node.status = "installed"


def _facts(conn: sqlite3.Connection, node: NodeView, data: dict[str, Any]) -> None:
    """The agent's facts replace ``facts.agent`` (facts from the boot path stay); only a change is written."""
    current = node.agent_facts
    if current is None:
        row = conn.execute("SELECT json_extract(facts, '$.agent') FROM nodes WHERE mac = ?", (node.mac,)).fetchone()
        current = json.loads(row[0]) if row and row[0] else None
    if current != data:
        node.agent_facts = data
        node.changed = node.dirty = True


def _row(node: NodeView, when: str) -> tuple[Any, ...]:
    """Parameters of ``_UPDATE`` for one node."""
    patch = json.dumps(node.facts_patch) if node.facts_patch else None
    heartbeat = _stamp(node.heartbeat_at) if node.heartbeat_at else None
    updated_at = when if node.changed else None
    return (node.liveness, node.mqtt_session, node.online_at, heartbeat, patch, updated_at, int(node.changed),
            node.mac)  # fmt: skip


def _store(conn: sqlite3.Connection, nodes: Iterable[NodeView]) -> None:
    when = now()
    dirty = [node for node in nodes if node.dirty]
    conn.executemany(_UPDATE, [_row(node, when) for node in dirty])
    conn.executemany(_UPDATE_NAMES, [(node.ip, node.hostname, node.mac) for node in dirty if node.renamed])
    conn.executemany(
        _UPDATE_AGENT_FACTS,
        [(json.dumps(node.agent_facts), node.mac) for node in dirty if node.agent_facts is not None],
    )
    add_events(
        conn,
        [
            (node.mac, _stamp(at), "mqtt", kind, name, old, new, detail, None)
            for node in dirty
            for kind, name, old, new, detail, at in node.events
        ],
    )
