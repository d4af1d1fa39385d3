"""Agent settings from NF_* environment variables (systemd loads them from /etc/default/nodefoundry-agent).

A bad value never stops the agent: it is reported as a warning and the default is used, because an agent
that exits on a typo turns into a restart loop on a node nobody can reach.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from nodefoundry_agent.netinfo import normalise_mac

ENV_FILE = Path("/etc/default/nodefoundry-agent")
LOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING", "error": "ERROR"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SCHEMES = {"tcp": False, "mqtt": False, "ssl": True, "tls": True, "mqtts": True}

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    mac: str | None = None  # None: detect from the default-route NIC
    broker_host: str = "localhost"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    log_level: str = "INFO"
    heartbeat_interval: float = 30.0
    state_dir: Path = Path("/var/lib/nodefoundry-agent")
    exec_dir: Path = Path("/etc/nodefoundry-agent/exec.d")
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    shutdown_command: tuple[str, ...] = ("systemctl", "poweroff")
    systemctl: tuple[str, ...] = ("systemctl",)
    boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id")
    reconnect_max_delay: float = 60.0


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them: comments, blank lines and quotes allowed."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.removeprefix("export ").split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def parse_broker(text: str) -> tuple[str, int | None, bool | None]:
    """``host[:port]``, ``[v6]:port`` or ``scheme://host:port`` -> (host, port or None, tls or None)."""
    tls = None
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        tls = _SCHEMES[scheme.lower()]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError("junk after the IPv6 address")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host or any(char.isspace() or char in "/@" for char in host):
        raise ValueError("bad host")
    port = int(port_text) if port_text is not None else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("port out of range")
    return host, port, tls


class _Reader:
    """Reads one value at a time, collecting a warning for each bad one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.warnings: list[str] = []

    def get(self, key: str, convert: Callable[[str], T], default: T) -> T:
        raw = self.env.get(key, "").strip()
        if not raw:
            return default
        try:
            return convert(raw)
        except ValueError as err:
            shown = "<hidden>" if "PASSWORD" in key else repr(raw[:80])
            self.warnings.append(f"{key}={shown} is invalid ({err}); using {default!r}")
            return default


def _number(low: float, high: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = float(text.removesuffix("s"))
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}")
        return value

    return convert


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise ValueError("must be true or false")


def _command(text: str) -> tuple[str, ...]:
    argv = tuple(shlex.split(text))
    if not argv:
        raise ValueError("empty command")
    return argv


def _mac(text: str) -> str:
    mac = normalise_mac(text)
    if mac is None:
        raise ValueError("not a unicast MAC address")
    return mac


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[text.lower()]


def load(env: Mapping[str, str]) -> tuple[Settings, list[str]]:
    """Settings and the warnings about values that were ignored (logged by the caller once logging is up)."""
    read, defaults = _Reader(env), Settings()
    host, port, scheme_tls = read.get("NF_MQTT_BROKER", parse_broker, (defaults.broker_host, None, None))
    tls = read.get("NF_MQTT_TLS", _boolean, bool(scheme_tls))
    settings = Settings(
        mac=read.get("NF_MAC", _mac, None),
        broker_host=host,
        broker_port=port or (8883 if tls else 1883),
        username=env.get("NF_MQTT_USERNAME") or None,
        password=env.get("NF_MQTT_PASSWORD") or None,
        tls=tls,
        ca_file=read.get("NF_MQTT_CA_FILE", Path, None),
        log_level=read.get("NF_LOG_LEVEL", _log_level, defaults.log_level),
        heartbeat_interval=read.get("NF_HEARTBEAT_INTERVAL", _number(1, 86400), defaults.heartbeat_interval),
        state_dir=read.get("NF_STATE_DIR", Path, defaults.state_dir),
        exec_dir=read.get("NF_EXEC_DIR", Path, defaults.exec_dir),
        reboot_command=read.get("NF_REBOOT_COMMAND", _command, defaults.reboot_command),
        shutdown_command=read.get("NF_SHUTDOWN_COMMAND", _command, defaults.shutdown_command),
        systemctl=read.get("NF_SYSTEMCTL", _command, defaults.systemctl),
        boot_id_file=read.get("NF_BOOT_ID_FILE", Path, defaults.boot_id_file),
        reconnect_max_delay=read.get("NF_RECONNECT_MAX_DELAY", _number(1, 3600), defaults.reconnect_max_delay),
    )
    if settings.ca_file and not settings.ca_file.is_file():
        read.warnings.append(f"NF_MQTT_CA_FILE {settings.ca_file} does not exist; using the system CA store")
        settings = replace(settings, ca_file=None)
    return settings, read.warnings
