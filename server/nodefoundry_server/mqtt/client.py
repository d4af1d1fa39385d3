"""The server's broker connection: paho 2.x, MQTT 3.1.1, QoS 1, a persistent session.

``start`` returns at once; paho's own thread connects, and reconnects after
any loss with a bounded back-off, so a broker outage never blocks or stops
the server. The session outlives a disconnection (``clean_session=False``), so
QoS 1 messages published while the server was away are delivered when it
returns.

Why 3.1.1 and not 5: paho builds a properties object for every MQTT 5 message,
which cost about a third of the server's CPU per message under load. The
broker's ``max_inflight_messages`` (default 20) is then the delivery window;
measured, it does not limit ingest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from nodefoundry_agent import protocol

from .broker import BrokerEndpoint

log = logging.getLogger("nodefoundry.mqtt")

CLIENT_ID = "nodefoundry-server"
KEEPALIVE_SECONDS = 30
RECONNECT_DELAY = (1, 5)  # seconds, min and max of paho's back-off
READ_CHUNK_BYTES = 65536


class _ReadBuffer:
    """The broker socket, read 64 KiB at a time.

    paho reads every packet's fixed header one byte per ``recv`` call: under load that is several
    system calls per message, a large share of the server's ingest cost. ``pending`` (which paho
    already asks of TLS sockets) makes its loop read on, instead of waiting in ``select``, while
    bytes are buffered here.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(READ_CHUNK_BYTES)  # BlockingIOError / SSLWantReadError go to paho as usual
            if not data:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._data) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    def _create_socket(self) -> Any:
        return _ReadBuffer(super()._create_socket())


class Connection:
    """One paho client and what /health needs to know about it."""

    def __init__(self, endpoint: BrokerEndpoint, on_message: Callable[[mqtt.MQTTMessage], None]) -> None:
        self.endpoint = endpoint
        self.problem = "connecting"
        self.connected_since: float | None = None  # monotonic; None while not connected and subscribed
        self._lock = threading.Lock()
        self._subscribed = False  # once per process: the first subscription also brings the retained states
        self._client = self._make_client(on_message)

    def _make_client(self, on_message: Callable[[mqtt.MQTTMessage], None]) -> mqtt.Client:
        client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=False)
        if self.endpoint.username:
            client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls:
            client.tls_set(ca_certs=self.endpoint.ca_file or None)
        client.reconnect_delay_set(*RECONNECT_DELAY)
        client.suppress_exceptions = True  # a failing callback is logged, and never ends paho's network thread
        client.enable_logger(logging.getLogger("nodefoundry.mqtt.paho"))
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda _client, _userdata, message: on_message(message)
        return client

    @property
    def address(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    @property
    def connected(self) -> bool:
        return self.connected_since is not None

    def start(self) -> None:
        self._client.connect_async(self.endpoint.host, self.endpoint.port, KEEPALIVE_SECONDS)
        self._client.loop_start()

    def stop(self) -> None:
        self._set(None, "stopped")
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1; True when paho took the message for a live connection (it retries until acknowledged)."""
        if not self.connected:
            return False
        return self._client.publish(topic, payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    def _set(self, since: float | None, problem: str) -> None:
        with self._lock:
            self.connected_since, self.problem = since, problem

    # --- paho callbacks (paho's thread) ---------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, flags: mqtt.ConnectFlags, reason: ReasonCode, _props: object
    ) -> None:
        if reason.is_failure:
            self._set(None, f"broker refused the connection: {reason}")
            log.warning("MQTT broker %s refused the connection: %s", self.address, reason)
            return
        if flags.session_present and self._subscribed:  # subscribing again would replay every retained message
            self._connected()
            return
        client.subscribe([(name, 1) for name in protocol.SERVER_SUBSCRIPTIONS])
        self._set(None, "subscribing")

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: object, _mid: int, reasons: list[ReasonCode], _props: object
    ) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:
            self._set(None, f"subscription refused: {', '.join(refused)}")
            log.error("MQTT broker %s refused the server's subscriptions: %s", self.address, refused)
            return
        self._subscribed = True
        self._connected()

    def _connected(self) -> None:
        self._set(time.monotonic(), "")
        log.info("MQTT connected to %s", self.address)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: object) -> None:
        self._set(None, "cannot reach the broker; retrying")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: object, _flags: object, reason: ReasonCode, _props: object
    ) -> None:
        if self.problem == "stopped":
            return
        if self.connected:
            log.warning("MQTT connection to %s lost: %s; reconnecting", self.address, reason)
        self._set(None, f"disconnected ({reason}); reconnecting")
