"""Background services that run beside the HTTP workers, in the main process.

Each publishes its state to the store's ``components`` table, which is how
the HTTP workers (other processes) answer /health.
"""

from __future__ import annotations

import logging
import threading

from . import lifecycle
from .config import Config
from .store import Store

log = logging.getLogger("nodefoundry.services")


class InstallWatchdog(threading.Thread):
    """Fails installs that made no progress within ``install_timeout``."""

    def __init__(self, store: Store, timeout_seconds: int, interval_seconds: float = 30.0) -> None:
        super().__init__(name="install-watchdog", daemon=True)
        self.store = store
        self.timeout_seconds = timeout_seconds
        self.interval_seconds = interval_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for mac in lifecycle.expire_stalled_installs(self.store, self.timeout_seconds):
                    log.warning("install of %s failed: no progress for %d s", mac, self.timeout_seconds)
                self.store.set_component("install_watchdog", "ok", f"timeout {self.timeout_seconds} s")
            except Exception:  # the watchdog must outlive a locked or failing database
                log.exception("install watchdog pass failed")
            self.stopped.wait(self.interval_seconds)

    def stop(self) -> None:
        self.stopped.set()


def record_unbuilt_components(store: Store, config: Config) -> None:
    """Say plainly in /health what this build does not run yet."""
    dhcp = "configured but not available in this version" if config.dhcp_enabled else "off (NF_DHCP_INTERFACE unset)"
    store.set_component("dhcp", "unavailable" if config.dhcp_enabled else "disabled", dhcp)
    store.set_component("tftp", "disabled", "served with DHCP")
    store.set_component("mqtt", "disabled", "not available in this version")
