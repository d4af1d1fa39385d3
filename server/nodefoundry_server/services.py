"""Background services, in a process of their own beside the HTTP workers.

Why a separate process: gunicorn forks HTTP workers from its arbiter, also
later to replace one that died. A process that forks must hold no SQLite
connection (the child inherits SQLite's in-process lock bookkeeping and can
wait forever on a lock nobody holds), so nothing that touches the database
may run in the arbiter. The services process is started with ``spawn`` (a
fresh interpreter), restarted by a supervisor thread if it dies, and stops
when its parent goes away.

Each service publishes its state to the store's ``components`` table, which
is how the HTTP workers answer /health.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Protocol

from . import lifecycle
from .config import Config
from .store import Store

log = logging.getLogger("nodefoundry.services")

RESTART_DELAY_SECONDS = 2.0


class InstallWatchdog:
    """Fails installs that made no progress within ``install_timeout``."""

    def __init__(self, store: Store, timeout_seconds: int) -> None:
        self.store = store
        self.timeout_seconds = timeout_seconds

    def run_once(self) -> None:
        for mac in lifecycle.expire_stalled_installs(self.store, self.timeout_seconds):
            log.warning("install of %s failed: no progress for %d s", mac, self.timeout_seconds)
        self.store.set_component("install_watchdog", "ok", f"timeout {self.timeout_seconds} s")


class Service(Protocol):
    """A background service. ``start`` returns once it serves (on threads of its own) and raises
    only for a fault that must restart the services process; ``stop`` ends it within seconds."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def build_services(config: Config, store: Store) -> list[Service]:
    """The services this configuration asks for (announce_components has told /health about the others)."""
    from .dhcp import DhcpService
    from .mqtt import MqttService
    from .tftp import TftpService, tftp_enabled

    services: list[Service] = []
    if config.dhcp_enabled:
        services.append(DhcpService(config, store))
    if tftp_enabled(config):
        services.append(TftpService(config, store))
    services.append(MqttService(config, store))
    return services


def announce_components(store: Store, config: Config) -> None:
    """Before anything serves: every background component is 'starting' or 'disabled'.

    A row left by a previous run (``ok`` from a server killed with -9) must not make /health claim a
    service is up before this run's service has bound its socket."""
    from .tftp import tftp_enabled

    store.set_component("install_watchdog", "starting", "services process starting")
    if config.dhcp_enabled:
        store.set_component("dhcp", "starting", "services process starting")
    else:
        store.set_component("dhcp", "disabled", "off (NF_DHCP_INTERFACE unset)")
    if tftp_enabled(config):
        store.set_component("tftp", "starting", "services process starting")
    else:
        store.set_component("tftp", "disabled", "off (runs with DHCP, or set NF_TFTP_ADDR)")
    store.set_component("mqtt", "starting", "services process starting")


def preflight(config: Config) -> None:
    """Checks that must fail the start-up in one line (ConfigError) rather than leave a half-running server."""
    from .dhcp import preflight as dhcp_preflight
    from .mqtt import preflight as mqtt_preflight
    from .tftp import preflight as tftp_preflight

    dhcp_preflight(config)
    tftp_preflight(config)
    mqtt_preflight(config)


def services_main(config: Config, parent_pid: int) -> None:
    """Entry point of the services process."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the arbiter, which stops us
    store = Store(config.db_path, config.db_synchronous)
    services = build_services(config, store)
    try:
        for service in services:
            service.start()
        _watch_installs(config, store, stopped, parent_pid)
    finally:
        for service in reversed(services):
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)


def _watch_installs(config: Config, store: Store, stopped: threading.Event, parent_pid: int) -> None:
    watchdog = InstallWatchdog(store, config.install_timeout)
    interval = min(30.0, config.install_timeout / 4)
    next_pass = 0.0
    while not stopped.is_set() and os.getppid() == parent_pid:
        if time.monotonic() >= next_pass:
            try:
                watchdog.run_once()
            except Exception:  # the watchdog must outlive a locked or failing database
                log.exception("install watchdog pass failed")
            next_pass = time.monotonic() + interval
        stopped.wait(1.0)


class ServicesSupervisor(threading.Thread):
    """Runs in the arbiter: keeps one services process alive until ``stop``."""

    def __init__(self, config: Config) -> None:
        super().__init__(name="services-supervisor", daemon=True)
        self.config = config
        self.stopped = threading.Event()
        self.process: BaseProcess | None = None
        self._context = multiprocessing.get_context("spawn")

    def _start_process(self) -> None:
        self.process = self._context.Process(
            target=services_main, args=(self.config, os.getpid()), name="nodefoundry-services", daemon=False
        )
        self.process.start()

    def run(self) -> None:
        self._start_process()
        while not self.stopped.wait(1.0):
            if self.process is not None and not self._alive(self.process):
                log.error("services process exited with %s; restarting", self.process.exitcode)
                time.sleep(RESTART_DELAY_SECONDS)
                if not self.stopped.is_set():
                    self._start_process()

    @staticmethod
    def _alive(process: BaseProcess) -> bool:
        """is_alive() alone is fooled when gunicorn's SIGCHLD handler has already reaped the child."""
        if not process.is_alive() or process.pid is None:
            return False
        try:
            os.kill(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        self.stopped.set()
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
