"""``nodefoundry-server run``: prepare the store, start services, serve HTTP.

The main process prepares the store, then becomes gunicorn's arbiter; HTTP
is served by forked gthread workers (a production WSGI server, and one
process per core, since one Python process cannot use both cores). The
background services run in their own process (see ``services``): the
arbiter keeps no database connection open, because it forks.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from . import __version__, auth, boot, validate
from .api import create_app
from .config import Config, ConfigError
from .dhcp import describe as describe_dhcp
from .services import ServicesSupervisor, announce_components, preflight
from .store import Store

ADMIN_TOKEN_FILE = "admin.token"


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def check_port_free(addr: str) -> tuple[str, int]:
    """Fail before anything starts when the HTTP port is taken."""
    host, port = validate.host_port(addr, "address", 8080)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise ConfigError(f"NF_HTTP_ADDR: cannot listen on {addr}: {exc.strerror}") from None
    return host, port


def ensure_admin_token(store: Store, config: Config) -> tuple[str | None, Path]:
    """First start: mint an admin token, keep it in a 0600 file beside the database."""
    path = Path(config.db_path).parent / ADMIN_TOKEN_FILE
    if config.api_token:
        return config.api_token, path
    if not auth.has_admin_token(store):
        token = auth.create_token(store, "admin", "admin")
        path.touch(mode=0o600)
        path.write_text(token + "\n")
        return token, path
    return (path.read_text().strip() if path.is_file() else None), path


def banner(config: Config, host: str, port: int, token: str | None, token_path: Path) -> str:
    shown = host or _primary_address()
    lines = [
        f"NodeFoundry server {__version__}",
        f"  API         http://{shown}:{port}/api/v1/nodes",
        f"  Boot entry  http://{config.server_addr or f'{shown}:{port}'}/boot.ipxe  (iPXE: chain this URL)",
        f"  Health      http://{shown}:{port}/health",
        f"  Database    {config.db_path}",
    ]
    if config.api_token:
        lines.append("  Admin token from NF_API_TOKEN")
    elif token:
        lines.append(f"  Admin token {token}  (saved in {token_path})")
    else:
        lines.append("  Admin token: create one with 'nodefoundry-server token create --name NAME'")
    if not boot.available_arches(config.assets_dir):
        lines.append(f"  Installer   missing in {config.assets_dir}: run 'nodefoundry-server assets import'")
    if config.dhcp_enabled:
        lines.append(f"  DHCP        {describe_dhcp(config)}")
    else:
        lines.append(
            "  DHCP        off. To serve DHCP set NF_DHCP_INTERFACE=<iface> with NF_DHCP_IP_POOL_START/END,"
            " or NF_DHCP_PROXY_MODE=true beside an existing DHCP server."
        )
    lines.append(f"  MQTT        {_describe_mqtt(config)}")
    return "\n".join(lines)


def _describe_mqtt(config: Config) -> str:
    if config.mqtt_broker:
        return f"broker {config.mqtt_broker}" + (", per-node credentials" if config.mqtt_node_auth else "")
    if config.mqtt_embedded_listen:
        return f"embedded Mosquitto; nodes connect to {config.mqtt_embedded_listen}"
    return (
        "embedded Mosquitto on loopback only. Installed nodes report in once it listens for them:"
        " set NF_MQTT_EMBEDDED_LISTEN=:1883 (or NF_MQTT_BROKER for your own broker)."
    )


def _primary_address() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the routing source address
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _forget_the_services_process(_arbiter: Any, _worker: Any) -> None:
    """A worker inherits the arbiter's list of multiprocessing children (the services process) and,
    at exit, multiprocessing would try to join a process that is not its child. Only the arbiter owns it."""
    multiprocessing.process._children.clear()  # type: ignore[attr-defined]


def run(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = check_port_free(config.http_addr)
    preflight(config)
    store = Store(config.db_path, config.db_synchronous)
    store.open()
    Path(config.assets_dir).mkdir(parents=True, exist_ok=True)
    token, token_path = ensure_admin_token(store, config)
    announce_components(store, config)
    store.close()  # nothing that forks may hold a SQLite connection
    services = ServicesSupervisor(config)
    services.start()
    print(banner(config, host, port, token, token_path), flush=True)
    app = create_app(config, store, started_at=time.time())
    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}",
        "workers": config.http_workers,
        "worker_class": "gthread",
        "threads": config.http_threads,
        "keepalive": 5,
        "timeout": 120,
        "graceful_timeout": 10,
        "accesslog": "-" if config.log_level == "debug" else None,
        "errorlog": "-",
        "loglevel": config.log_level,
        "proc_name": "nodefoundry-server",
        "control_socket_disable": True,
        "on_exit": lambda _arbiter: services.stop(),
        "post_fork": _forget_the_services_process,
    }
    _Gunicorn(app, options).run()
    return 0
