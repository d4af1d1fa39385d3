"""MQTT: the server's side of the agent protocol, run in the services process.

``MqttService`` connects to the broker (the embedded Mosquitto it supervises, or an external one),
feeds what agents publish to the ingest writer, keeps liveness and dispatches commands. Nothing in
it waits for the broker: while the broker is unreachable the service keeps retrying, /health says
``degraded`` with the reason, and HTTP, DHCP and TFTP are not affected.

Threads: paho's network thread (queues messages), the writer (ingest batches, the liveness
watchdog) and the supervisor (broker, credentials files, commands, the /health row). The
supervisor starts the embedded broker too, because the broker dies with the thread that started it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..config import Config, ConfigError
from ..store import Store
from .broker import BrokerEndpoint, EmbeddedBroker, check_mosquitto_available, external_endpoint, reload_external
from .client import Connection
from .commands import Dispatcher
from .credentials import AuthFiles, external_auth_files
from .ingest import Counters, Ingest
from .liveness import Watchdog

__all__ = ["MqttService", "preflight"]

log = logging.getLogger("nodefoundry.mqtt")

TICK_SECONDS = 0.25  # the dispatcher's polling interval
BROKER_RETRY_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 15.0


def preflight(config: Config) -> None:
    """Embedded: Mosquitto 2 must be installed. External: only the settings are checked, never the broker,
    whose outage must not stop the start-up."""
    if not config.mqtt_broker:
        check_mosquitto_available()
        return
    external_auth_files(config, Store(config.db_path))  # raises ConfigError for half-set files; opens nothing
    log.info("MQTT: external broker %s, connected in the background", config.mqtt_broker)


class _Every:
    """Runs a task at most once per interval (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._next = 0.0

    def due(self) -> bool:
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.seconds
        return True


class MqttService:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.counters = Counters()
        self.ingest = Ingest(store, self.counters, config.mqtt_register_unknown)
        self.watchdog = Watchdog(store, config.agent_heartbeat_interval)
        self.broker = None if config.mqtt_broker else EmbeddedBroker(config, store)
        self.connection: Connection | None = None
        self.dispatcher: Dispatcher | None = None
        self._external_auth: AuthFiles | None = None
        self._problem = ""  # why there is no connection yet, once starting the broker failed
        self._stopped = threading.Event()
        self._writer_stopped = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="mqtt-supervisor", daemon=True)
        self._writer = threading.Thread(target=self._write, name="mqtt-writer", daemon=True)
        self._broker_retry = _Every(BROKER_RETRY_SECONDS)
        self._housekeeping = [
            (_Every(1.0), self._check_broker),
            (_Every(2.0), self._sync_credentials),
            (_Every(1.0), self._expire_commands),
            (_Every(1.0), self._report),
        ]
        self._watchdog_due = _Every(2.0)

    def start(self) -> None:
        """Returns at once: the broker is started and connected to on the supervisor thread."""
        self.store.set_component("mqtt", "starting", "connecting to the broker")
        self._writer.start()
        self._supervisor.start()

    def stop(self) -> None:
        """Disconnect and stop the broker first, then let the writer apply what was already received."""
        self._stopped.set()
        if self._supervisor.is_alive():
            self._supervisor.join(STOP_TIMEOUT_SECONDS)
        self._writer_stopped.set()
        if self._writer.is_alive():
            self._writer.join(STOP_TIMEOUT_SECONDS)

    # --- the supervisor thread ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            while not self._stopped.is_set():
                if self.connection is None:
                    self._guard(self._connect)
                elif self.dispatcher is not None:
                    self._guard(self.dispatcher.run_once)
                for every, task in self._housekeeping:
                    if every.due():
                        self._guard(task)
                self._stopped.wait(TICK_SECONDS)
        finally:
            if self.connection is not None:
                self.connection.stop()
            if self.broker is not None:
                self.broker.stop()
            self._guard(lambda: self.store.set_component("mqtt", "stopped", "the services process is stopping"))

    @staticmethod
    def _guard(task: Callable[[], object]) -> None:
        """One failing pass (a locked database, a broken file) must not end the thread."""
        try:
            task()
        except Exception:
            log.exception("MQTT: %s failed", getattr(task, "__name__", "task"))

    def _connect(self) -> None:
        if not self._broker_retry.due():
            return
        endpoint = self._endpoint()
        if endpoint is None:
            return
        self.connection = Connection(endpoint, self.ingest.offer)
        self.dispatcher = Dispatcher(self.store, self.connection)
        self.connection.start()

    def _endpoint(self) -> BrokerEndpoint | None:
        if self.broker is None:
            self._external_auth = external_auth_files(self.config, self.store)
            return external_endpoint(self.config)
        try:
            return self.broker.start()
        except (ConfigError, RuntimeError, OSError) as exc:
            self._problem = f"the embedded broker did not start: {exc}"
            log.error("MQTT: %s; retrying in %.0f s", self._problem, BROKER_RETRY_SECONDS)
            return None

    def _check_broker(self) -> None:
        """Restart a dead embedded broker on its port; paho then reconnects by itself."""
        if self.broker is not None and self.connection is not None:
            self.broker.ensure_running()

    def _sync_credentials(self) -> None:
        if self.broker is not None and self.connection is not None:
            self.broker.sync_credentials()
        elif self._external_auth is not None and self._external_auth.sync():
            reload_external(self.config)

    def _expire_commands(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.expire()

    def _report(self) -> None:
        """The ``mqtt`` row of /health: state, the broker's address (tests connect to it) and the counters."""
        connection = self.connection
        counts = f"backlog={self.ingest.backlog} {self.counters.summary()}"
        if connection is None:
            state, detail = ("error", self._problem) if self._problem else ("starting", "starting the broker")
            detail = f"{detail}; {counts}"
        elif connection.connected:
            state, detail = "ok", f"connected to {connection.address} ({self._broker_kind()}); {counts}"
        else:
            state, detail = "degraded", f"{connection.problem} ({connection.address}); {counts}"
        published = self.dispatcher.published if self.dispatcher else 0
        self.store.set_component("mqtt", state, f"{detail} commands_published={published}")

    def _broker_kind(self) -> str:
        if self.broker is None:
            return "external broker"
        return f"embedded broker, nodes on port {self.broker.node_port}"

    # --- the writer thread --------------------------------------------------------------------------------

    def _write(self) -> None:
        self.ingest.run(self._writer_stopped, lambda: self._guard(self._watch_liveness))

    def _watch_liveness(self) -> None:
        """Only once connected for a whole timeout: silence while the server could not listen proves nothing."""
        connection = self.connection
        if connection is None or connection.connected_since is None or not self._watchdog_due.due():
            return
        if time.monotonic() - connection.connected_since >= self.watchdog.timeout:
            self.watchdog.run_once()
