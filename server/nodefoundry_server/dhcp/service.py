"""The DHCP service: sockets, the receive threads, housekeeping and the published state.

Threads: one receive loop per socket (port 67; port 4011 too in ProxyDHCP mode), the persister
(the only writer), and housekeeping (reclaims expired leases, follows node changes in the store,
publishes counters to /health). Decisions are serialised by one lock around the handler.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from ..config import Config
from ..store import Store
from .codec import MAX_PACKET, ip_int
from .handler import Decision, DhcpHandler, DhcpSettings, Reply
from .leases import LeaseTable, Reservations
from .netif import PROXY_PORT, interface_address, open_socket, server_port
from .persist import BatchResult, Persister

log = logging.getLogger("nodefoundry.dhcp")

RECEIVE_TIMEOUT_SECONDS = 0.5
NODES_POLL_SECONDS = 0.01  # API changes to a node's ip reach the DHCP decisions this fast (~12 µs a look)
EXPIRE_EVERY_SECONDS = 5.0
PUBLISH_EVERY_SECONDS = 1.0  # only when something changed
REFRESH_SECONDS = 30.0  # /health calls a component stale after 120 s without a report


def describe(config: Config) -> str:
    """One line for the start-up banner: mode, interface, pools, what booting clients are told."""
    try:
        address = str(interface_address(config.dhcp_interface).ip)
    except OSError:
        return f"on {config.dhcp_interface}, which has no IPv4 address now"
    return DhcpSettings.from_config(config, address).describe()


class DhcpService:
    """DHCP (or ProxyDHCP) on ``dhcp_interface``; ``start`` raises rather than half-run."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sockets: dict[bool, socket.socket] = {}  # from_proxy_port -> socket
        self._threads: list[threading.Thread] = []
        self._data_version = -1
        self._published: tuple[str, str] = ("", "")
        self._published_at = 0.0
        self.handler: DhcpHandler | None = None
        self.persister: Persister | None = None
        # A server killed with -9 left its last "ok" behind; /health must not show it for this one.
        store.set_component("dhcp", "starting", f"binding {config.dhcp_interface}")

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except Exception as exc:
            self.stop()
            self.store.set_component("dhcp", "error", f"cannot start on {self.config.dhcp_interface}: {exc}")
            raise

    def _start(self) -> None:
        settings = DhcpSettings.from_config(self.config, str(interface_address(self.config.dhcp_interface).ip))
        self.handler = DhcpHandler(settings, LeaseTable(settings.subnets, settings.server_ip))
        if not settings.proxy:
            self._load_leases()
        self._follow_nodes()
        self._sockets[False] = open_socket(settings.interface, server_port(self.config))
        if settings.proxy:
            self._sockets[True] = open_socket(settings.interface, PROXY_PORT)
        self.persister = Persister(self.store, self._send, self._committed)
        self.persister.start()
        for from_proxy_port, sock in self._sockets.items():
            self._spawn(f"dhcp-receive-{sock.getsockname()[1]}", self._receive, sock, from_proxy_port)
        self._spawn("dhcp-housekeeping", self._housekeeping)
        self._publish()
        log.info("serving %s", settings.describe())

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.persister is not None:
            self.persister.stop()
        self._close_sockets()

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    # --- packets ---------------------------------------------------------------

    def _receive(self, sock: socket.socket, from_proxy_port: bool) -> None:
        assert self.handler is not None
        sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
        while not self._stopped.is_set():
            try:
                packet, source = sock.recvfrom(MAX_PACKET + 1)  # one byte more tells an oversize datagram
            except TimeoutError:
                continue
            except OSError as exc:
                log.warning("receiving on %s failed: %s", self.config.dhcp_interface, exc)
                self._stopped.wait(RECEIVE_TIMEOUT_SECONDS)
                continue
            with self._lock:
                decision = self.handler.handle(packet, source, time.time(), proxy_port=from_proxy_port)
            if decision is not None:
                self._dispatch(decision)

    def _dispatch(self, decision: Decision) -> None:
        """A durable reply goes with its writes to the persister; anything else is sent now."""
        assert self.persister is not None
        if decision.writes is not None:
            self.persister.put(decision)
        if decision.reply is not None and not decision.durable:
            self._send(decision.reply)

    def _send(self, reply: Reply) -> None:
        try:
            self._sockets[reply.from_proxy_port].sendto(reply.packet, reply.address)
        except (OSError, KeyError) as exc:  # KeyError: the socket closed while stopping
            log.debug("cannot send to %s:%d: %s", *reply.address, exc)
            self._count("send_failed")

    def _count(self, name: str, amount: int = 1) -> None:
        assert self.handler is not None
        with self._lock:
            self.handler.counters[name] += amount

    def _committed(self, result: BatchResult) -> None:
        """After each COMMIT: count registrations; a refused lease gives way to the node that holds it."""
        assert self.handler is not None
        if result.registered:
            log.info("registered %d new node(s) from DHCP", result.registered)
            self._count("registered", result.registered)
        for ip, (mac, owner) in result.refused.items():
            log.info("NAK to %s instead of ACK: %s is reserved for node %s", mac, ip, owner)
            with self._lock:
                self.handler.counters["ack"] -= 1
                self.handler.counters["nak"] += 1
                self.handler.table.yield_to_reservation(ip_int(ip), mac, owner)

    # --- store -----------------------------------------------------------------

    def _load_leases(self) -> None:
        """The store is the truth after a restart: load the leases, drop expired and orphaned rows."""
        assert self.handler is not None
        rows = self.store.conn().execute(
            "SELECT ip, mac, state, subnet, client_id, hostname, expires_at FROM dhcp_leases"
        )
        stale = self.handler.table.load(rows.fetchall(), time.time())
        if stale:
            with self.store.write() as conn:
                conn.executemany("DELETE FROM dhcp_leases WHERE ip = ?", [(write.ip,) for write in stale])
        log.info("loaded %d DHCP leases, dropped %d stale", len(self.handler.table.leases), len(stale))

    def _database_changed(self) -> bool:
        """Another connection committed since the last look (only ever asked on the housekeeping thread)."""
        version = self.store.conn().execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        return changed

    def _follow_nodes(self) -> None:
        """Known MACs and reservations (nodes' recorded addresses), which the API may change at any time."""
        assert self.handler is not None
        known: set[str] = set()
        reservations = Reservations()
        for mac, ip in self.store.conn().execute("SELECT mac, ip FROM nodes ORDER BY created_at, rowid"):
            known.add(mac)
            if ip:
                try:
                    reservations.add(mac, ip_int(ip))
                except OSError:
                    log.warning("node %s has an unusable ip %r; not reserved", mac, ip)
        with self._lock:
            self.handler.known_macs = known
            self.handler.table.reservations = reservations

    def _housekeeping(self) -> None:
        next_nodes = next_expire = next_publish = time.monotonic()
        while not self._stopped.wait(NODES_POLL_SECONDS):
            try:
                started = time.monotonic()
                if started >= next_nodes and self._database_changed():
                    self._follow_nodes()
                    # Re-reading costs ~1 ms per 1,000 nodes: during a storm it takes at most ~5 % of a core.
                    next_nodes = started + 20 * (time.monotonic() - started)
                if time.monotonic() >= next_expire:
                    self._expire()
                    next_expire = time.monotonic() + EXPIRE_EVERY_SECONDS
                if time.monotonic() >= next_publish:
                    self._publish()
                    next_publish = time.monotonic() + PUBLISH_EVERY_SECONDS
            except Exception:  # housekeeping must outlive a locked or failing database
                log.exception("DHCP housekeeping failed")

    def _expire(self) -> None:
        assert self.handler is not None and self.persister is not None
        with self._lock:
            writes = self.handler.expire(time.time())
        if writes is not None:
            self.persister.put(Decision(writes=writes))

    def _publish(self) -> None:
        """State, pool usage and counters for /health: written when they changed, else every 30 s."""
        assert self.handler is not None and self.persister is not None
        settings = self.handler.settings
        with self._lock:
            detail: dict[str, Any] = {
                "mode": "proxy" if settings.proxy else "standard",
                "interface": settings.interface,
                "pools": list(self.handler.table.usage(time.time())),
                "counters": dict(sorted(self.handler.counters.items())),
            }
        state = "ok"
        if self.persister.last_error:
            state, detail["error"] = "error", self.persister.last_error
        published = (state, json.dumps(detail, separators=(",", ":")))
        if published != self._published or time.monotonic() >= self._published_at + REFRESH_SECONDS:
            self.store.set_component("dhcp", *published)
            self._published, self._published_at = published, time.monotonic()
