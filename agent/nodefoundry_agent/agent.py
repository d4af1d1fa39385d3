"""The agent's MQTT session: birth and will, facts, heartbeat, commands, and reconnecting for ever.

The main thread owns the paho client and drives its network loop itself (paho's external-loop API:
``select`` on its socket, then ``loop_read``/``loop_write``/``loop_misc``), because paho's own loop
reconnects with a plain exponential delay and the agent wants full jitter, so a fleet that lost its broker
does not come back in lock step. Command workers never touch the client; they use the outbox.

Session id: one per process start, carried by the birth (``online``) and the will (``offline``). A
reconnect of the same process keeps it: the broker publishes a taken-over connection's will before it
accepts the new one, so per topic the old will always precedes the new birth. A restart gets a new id, so
the server can tell a late will of a previous run from the current run's state.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from nodefoundry_agent import __version__, compat, facts, netinfo, protocol, sdnotify
from nodefoundry_agent.commands import CommandProcessor
from nodefoundry_agent.config import Settings
from nodefoundry_agent.handlers import Handlers
from nodefoundry_agent.ledger import Ledger
from nodefoundry_agent.outbox import Message, Outbox

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 60
CONNACK_TIMEOUT_SECONDS = 30
STABLE_CONNECTION_SECONDS = 30  # a connection that lasted this long starts the backoff afresh
BACKOFF_BASE_SECONDS = 1.0
MAX_WAIT_SECONDS = 15.0  # longest select: paho's keepalive ping only goes out from loop_misc
GOODBYE_SECONDS = 5.0
HEARTBEAT_JITTER = 0.1
PAHO_QUEUE_LIMIT = 100
PAHO_INFLIGHT_LIMIT = 20


def backoff_delay(attempt: int, cap: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return (rng or random).uniform(0.0, min(cap, BACKOFF_BASE_SECONDS * 2 ** min(attempt, 32)))


def heartbeat_delay(interval: float, rng: random.Random | None = None) -> float:
    """The interval +-10 %, so agents started together drift apart."""
    return interval * (rng or random).uniform(1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER)


class Agent:
    def __init__(self, settings: Settings, mac: str) -> None:
        self.settings = settings
        self.mac = mac
        self.session = secrets.token_hex(8)
        self.broker = f"{settings.broker_host}:{settings.broker_port}"
        self.outbox = Outbox()
        self.ledger = Ledger(settings.state_dir / "commands.json")
        handlers = Handlers(settings, self._republish_facts)
        self.commands = CommandProcessor(self.ledger, handlers, self._report, self._boot_id)
        self.client = self._make_client()
        self._stopping = False
        self._connected = False
        self._up_since: float | None = None
        self._next_status = 0.0

    # ---- life cycle -------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until ``stop``; a broker that is down or goes away only means waiting and trying again."""
        self.ledger.load()
        self.commands.recover(self._boot_id())
        log.info("agent %s for node %s (session %s, paho-mqtt %s)", __version__, self.mac, self.session,
                 compat.PAHO_VERSION)  # fmt: skip
        attempt = 0
        while not self._stopping:
            try:
                lasted = self._connect_and_serve()
            except Exception:  # whatever a broker or the network does must cost a reconnect, not the process
                log.exception("the connection to the broker %s failed", self.broker)
                self._connected, lasted = False, 0.0
            if self._stopping:
                break
            attempt = 0 if lasted >= STABLE_CONNECTION_SECONDS else attempt + 1
            delay = backoff_delay(attempt, self.settings.reconnect_max_delay)
            log.info("next connection attempt to %s in %.1f s", self.broker, delay)
            sdnotify.notify(f"STATUS=waiting for the broker {self.broker}")
            self._sleep(delay)
        self._goodbye()
        return 0

    def stop(self) -> None:
        """Ask the loop to publish ``offline`` and return; safe to call from a signal handler."""
        self._stopping = True
        self.outbox.wake()

    def _connect_and_serve(self) -> float:
        """One connection, served until it ends; returns how long it was up (0 if it never came up)."""
        self._up_since = None
        try:
            will = protocol.state_payload("offline", self.session)
            self.client.will_set(self._topic(protocol.STATE), will, qos=1, retain=True)
            self.client.connect(self.settings.broker_host, self.settings.broker_port, KEEPALIVE_SECONDS)
        except Exception as err:  # paho raises OSError, ssl.SSLError or ValueError here: all mean "not now"
            log.warning("cannot connect to the broker %s: %s", self.broker, err)
            return 0.0
        connack_by = time.monotonic() + CONNACK_TIMEOUT_SECONDS
        while not self._stopping and self.client.socket() is not None:
            if not self._connected and time.monotonic() > connack_by:
                log.warning("no answer from the broker %s within %d s", self.broker, CONNACK_TIMEOUT_SECONDS)
                self.client.disconnect()
                break
            self._pump(self._wait_seconds(connack_by))
            if self._connected:
                self._flush()
                if time.monotonic() >= self._next_status:
                    self._publish_status()
        return time.monotonic() - self._up_since if self._up_since is not None else 0.0

    def _sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self._stopping and (remaining := until - time.monotonic()) > 0:
            self.outbox.wait(remaining)

    def _goodbye(self) -> None:
        """A clean disconnect makes the broker drop the will, so ``offline`` is published explicitly."""
        sdnotify.notify("STOPPING=1")
        if self._connected:
            self._flush()
            info = self.client.publish(self._topic(protocol.STATE), protocol.state_payload("offline", self.session),
                                       qos=1, retain=True)  # fmt: skip
            self._pump_until(lambda: info.rc != mqtt.MQTT_ERR_SUCCESS or info.is_published(), GOODBYE_SECONDS)
            self.client.disconnect()
            self._pump_until(lambda: self.client.socket() is None, GOODBYE_SECONDS)
        log.info("agent stopped")

    # ---- network loop -----------------------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """One round: wait for the socket or a wake-up, then let paho read, write and keep the link alive."""
        sock = self.client.socket()
        if sock is None:
            return
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS may hold bytes select cannot see
        writers = [sock] if self.client.want_write() else []
        readable, writable, _ = select.select([sock, self.outbox], writers, [], 0 if pending else timeout)
        if sock in readable or pending:
            self.client.loop_read()
        if self.outbox in readable:
            self.outbox.clear_wakeups()
        if sock in writable and self.client.socket() is sock:
            self.client.loop_write()
        self.client.loop_misc()

    def _pump_until(self, done: Callable[[], bool], seconds: float) -> None:
        until = time.monotonic() + seconds
        while not done() and self.client.socket() is not None and time.monotonic() < until:
            self._pump(until - time.monotonic())

    def _wait_seconds(self, connack_by: float) -> float:
        due = self._next_status if self._connected else connack_by
        return max(0.0, min(MAX_WAIT_SECONDS, due - time.monotonic()))

    def _flush(self) -> None:
        while self._connected and (message := self.outbox.pop()) is not None:
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # paho's own queue is full: keep it for later
                self.outbox.put_back(message)
                return

    # ---- paho callbacks (main thread) -------------------------------------------------------------------

    def _on_connect(self, accepted: bool, reason: str) -> None:
        if not accepted:
            log.error("the broker %s refused the connection: %s", self.broker, reason)
            return
        self._connected, self._up_since = True, time.monotonic()
        log.info("connected to the broker %s", self.broker)
        # Subscribe before the birth: whoever sees the node online may send it a command at once.
        self.client.subscribe(self._topic(protocol.COMMAND), qos=1)
        self.client.publish(self._topic(protocol.STATE), protocol.state_payload("online", self.session),
                            qos=1, retain=True)  # fmt: skip
        self._publish_status()
        self.client.publish(self._topic(protocol.FACTS), self._facts_payload(), qos=1, retain=True)
        sdnotify.notify(f"STATUS=connected to the broker {self.broker}")

    def _on_disconnect(self, reason: str) -> None:
        if self._connected and not self._stopping:
            log.warning("lost the connection to the broker %s: %s", self.broker, reason)
        self._connected = False

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._topic(protocol.COMMAND):
            self.commands.handle(message.payload, bool(message.retain))

    # ---- messages ---------------------------------------------------------------------------------------

    def _publish_status(self) -> None:
        payload = protocol.status_payload(self._local_ipv4(), socket.gethostname(), facts.uptime_seconds(),
                                          __version__, self.session)  # fmt: skip
        self.client.publish(self._topic(protocol.STATUS), payload, qos=0)
        self._next_status = time.monotonic() + heartbeat_delay(self.settings.heartbeat_interval)

    def _report(self, cmd_id: str, state: str, fields: dict[str, Any]) -> None:
        """A command's state change, from any thread."""
        payload = protocol.result_payload(cmd_id, state, **fields)
        final = state in protocol.FINAL_STATES
        self.outbox.put(Message(protocol.topic(self.mac, protocol.RESULT, cmd_id), payload, final=final))

    def _republish_facts(self) -> dict[str, Any]:
        """The ``facts`` command (a worker thread): gather afresh, publish through the outbox."""
        gathered = facts.gather(self.mac, self.settings.boot_id_file)
        self.outbox.put(Message(self._topic(protocol.FACTS), protocol.encode(gathered), retain=True))
        return gathered

    def _facts_payload(self) -> bytes:
        return protocol.encode(facts.gather(self.mac, self.settings.boot_id_file))

    def _local_ipv4(self) -> str | None:
        """The address this node reaches the broker from; else the primary one of the default-route NIC."""
        sock = self.client.socket()
        try:
            address = ipaddress.ip_address(sock.getsockname()[0]) if sock else None
        except (OSError, ValueError):
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if isinstance(address, ipaddress.IPv4Address):
            return str(address)
        routes = netinfo.default_route_interfaces()
        return netinfo.ipv4_address(routes[0]) if routes else None

    def _boot_id(self) -> str | None:
        return facts.boot_id(self.settings.boot_id_file)

    def _topic(self, kind: str) -> str:
        return protocol.topic(self.mac, kind)

    def _make_client(self) -> mqtt.Client:
        client = compat.new_client(f"nodefoundry-agent-{self.mac}")
        compat.set_callbacks(client, self._on_connect, self._on_disconnect, self._on_message)
        client.enable_logger(logging.getLogger("nodefoundry_agent.paho"))
        client.max_queued_messages_set(PAHO_QUEUE_LIMIT)
        client.max_inflight_messages_set(PAHO_INFLIGHT_LIMIT)
        if self.settings.username:
            client.username_pw_set(self.settings.username, self.settings.password)
        if self.settings.tls:
            self._set_tls(client)
        return client

    def _set_tls(self, client: mqtt.Client) -> None:
        """A broken CA file falls back to the system store: never to plain text, and never a crash loop."""
        ca_file = str(self.settings.ca_file) if self.settings.ca_file else None
        try:
            client.tls_set(ca_certs=ca_file)
        except Exception as err:  # ssl.SSLError, OSError, ValueError from a bad CA file
            log.error("cannot use the CA file %s (%s); verifying with the system CA store", ca_file, err)
            client.tls_set()
