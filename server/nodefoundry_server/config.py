"""Server configuration: embedded defaults < YAML file < ``NF_*`` environment.

Every setting has one entry in ``SETTINGS`` (file key, environment variable,
default, parser). A bad value raises ``ConfigError`` naming the key and the
reason, which the CLI prints as one line before exiting.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import validate
from .validate import InvalidValue


class ConfigError(Exception):
    """A configuration value is unusable; str() is one line for the operator."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InvalidValue(f"expected true or false, got {value!r}")


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise InvalidValue(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise InvalidValue(f"must be between {low} and {high}, got {number}")
        return number

    return parse


def _text(value: Any) -> str:
    return str(value).strip()


def _required_text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise InvalidValue("must not be empty")
    return text


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: parse(value) if str(value).strip() else ""


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise InvalidValue(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _http_addr(value: Any) -> str:
    validate.host_port(value, "address", 8080)
    return str(value)


def _server_addr(value: Any) -> str:
    """host[:port] that nodes use to reach this server; empty = the request's Host."""
    text = str(value).strip()
    if text:
        host, _port = validate.host_port(text, "address", 80)
        if not host:
            raise InvalidValue("needs a host that nodes can reach, e.g. 10.0.0.1:8080")
    return text


def _mirror(value: Any) -> str:
    """A mirror host name (the seed's form) or http://host[:port]; stored as host[:port]."""
    text = str(value).strip()
    if text.startswith("http://"):
        text = text[len("http://") :].split("/", 1)[0]
    host, _port = validate.host_port(text, "mirror", 80)
    if not host:
        raise InvalidValue("needs a mirror host, e.g. deb.debian.org")
    return text


def _directory(value: Any) -> str:
    text = str(value).strip()
    if (
        not text.startswith("/")
        or not all((ch.isascii() and ch.isalnum()) or ch in "/_.-" for ch in text)
        or ".." in text
    ):
        raise InvalidValue(f"expected an absolute path like /debian, got {value!r}")
    return text


def _proxy(value: Any) -> str:
    text = str(value).strip()
    if text and not text.startswith("http://"):
        raise InvalidValue("expected http://host:port or empty")
    if text:
        validate.host_port(text[len("http://") :].rstrip("/"), "proxy", 3128)
    return text


def _broker(value: Any) -> str:
    """host[:port] of the MQTT broker; empty or ``embedded`` = the server's own private broker."""
    text = str(value).strip()
    if text.lower() in ("", "embedded"):
        return ""
    host, _port = validate.host_port(text, "broker", 1883)
    if not host:
        raise InvalidValue("needs a broker host, e.g. 10.0.0.1:1883 (or empty for the embedded broker)")
    return text


def _list_of(parse: Callable[[Any], str], commas: bool = True) -> Callable[[Any], list[str]]:
    """A YAML list, or a string split on spaces (and on commas unless they may occur in an item)."""

    def parse_list(value: Any) -> list[str]:
        text = str(value).replace(",", " ") if commas else str(value)
        items = value if isinstance(value, list) else text.split()
        return [parse(item) for item in items]

    return parse_list


def _ssh_keys(value: Any) -> list[str]:
    """A YAML list, or from the environment one key per line."""
    items = value if isinstance(value, list) else [line for line in str(value).splitlines() if line.strip()]
    return [validate.ssh_key(item) for item in items]


def _structured(value: Any, what: str) -> Any:
    """File values arrive as YAML; the environment carries the same shape as YAML/JSON text."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise InvalidValue(f"expected {what} as YAML or JSON") from None
    return value


_SUBNET_KEYS = ("pool_start", "pool_end", "netmask", "gateway", "dns", "lease_time")


def _subnet(raw: Any, number: int) -> dict[str, Any]:
    where = f"subnet {number + 1}"
    if not isinstance(raw, dict):
        raise InvalidValue(f"{where}: expected a mapping with {', '.join(_SUBNET_KEYS)}")
    unknown = sorted(str(key) for key in raw if key not in _SUBNET_KEYS)
    if unknown:
        raise InvalidValue(f"{where}: unknown key {unknown[0]!r}")
    try:
        subnet = {
            "pool_start": validate.ipv4(raw.get("pool_start", ""), "pool_start"),
            "pool_end": validate.ipv4(raw.get("pool_end", ""), "pool_end"),
            "netmask": validate.netmask(raw.get("netmask", "")),
            "gateway": validate.ipv4(raw["gateway"], "gateway") if raw.get("gateway") else "",
            "dns": validate.dns_list(raw["dns"]) if raw.get("dns") else None,
            "lease_time": _int_range(60, 31536000)(raw["lease_time"]) if raw.get("lease_time") else None,
        }
    except InvalidValue as exc:
        raise InvalidValue(f"{where}: {exc}") from None
    problem = pool_problem(subnet["pool_start"], subnet["pool_end"], subnet["netmask"], subnet["gateway"])
    if problem:
        raise InvalidValue(f"{where}: {problem}")
    return subnet


def _subnets(value: Any) -> list[dict[str, Any]]:
    """Extra subnets (reached through DHCP relays), each with its own pool."""
    raw = _structured(value, "a list of subnets")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidValue("expected a list of subnets")
    return [_subnet(item, number) for number, item in enumerate(raw)]


def _boot_files(value: Any) -> dict[int, str]:
    """Option 93 architecture number -> boot file name, e.g. ``{7: snponly.efi}`` or ``7=snponly.efi``."""
    raw = value
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.replace(",", " ").split() if item]
        if any(len(pair) != 2 for pair in pairs):
            raise InvalidValue("expected ARCH=FILE pairs, e.g. 7=snponly.efi")
        raw = dict(pairs)
    if not isinstance(raw, dict):
        raise InvalidValue("expected a mapping of option 93 architecture number to boot file")
    files = {}
    for arch, file_name in raw.items():
        number = _int_range(0, 65535)(arch)
        files[number] = validate.boot_file(file_name)
    return files


def pool_problem(start: str, end: str, netmask: str, gateway: str = "") -> str:
    """Why a pool cannot work in its subnet, or '' when it can."""
    start_ip, end_ip = ipaddress.IPv4Address(start), ipaddress.IPv4Address(end)
    network = ipaddress.IPv4Network(f"{start}/{netmask}", strict=False)
    if start_ip > end_ip:
        return f"pool start {start} is after pool end {end}"
    if end_ip not in network:
        return f"pool end {end} is outside the subnet {network} of pool start {start}"
    if start_ip == network.network_address or end_ip == network.broadcast_address:
        return f"the pool {start}-{end} includes the network or broadcast address of {network}"
    if gateway and ipaddress.IPv4Address(gateway) not in network:
        return f"gateway {gateway} is outside the subnet {network}"
    return ""


@dataclass(frozen=True)
class Setting:
    key: str
    env: str
    default: Any
    parse: Callable[[Any], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("http_addr", "NF_HTTP_ADDR", ":8080", _http_addr, "HTTP listen address (host:port)"),
    Setting("http_workers", "NF_HTTP_WORKERS", 2, _int_range(1, 64), "HTTP worker processes"),
    Setting("http_threads", "NF_HTTP_THREADS", 16, _int_range(1, 256), "threads per HTTP worker"),
    Setting("server_addr", "NF_SERVER_ADDR", "", _server_addr, "host:port nodes use to reach the server"),
    Setting("db_path", "NF_DB_PATH", "./data/nodes.db", _required_text, "SQLite database file"),
    Setting("db_synchronous", "NF_DB_SYNCHRONOUS", "full", _choice("full", "normal"), "SQLite synchronous"),
    Setting("assets_dir", "NF_ASSETS_DIR", "./data/assets", _required_text, "installer kernels/initrds, agent"),
    Setting("log_level", "NF_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Setting("api_token", "NF_API_TOKEN", "", _text, "admin API token (in addition to stored tokens)"),
    Setting("max_body_bytes", "NF_MAX_BODY_BYTES", 1048576, _int_range(1024, 67108864), "request body limit"),
    Setting("auto_register", "NF_AUTO_REGISTER", True, _bool, "register unknown MACs seen at /boot.ipxe"),
    Setting("boot_poll_interval", "NF_BOOT_POLL_INTERVAL", 5, _int_range(1, 10), "iPXE wait-loop seconds"),
    Setting("install_timeout", "NF_INSTALL_TIMEOUT", 3600, _int_range(60, 604800), "seconds without progress"),
    Setting("install_token_bind_ip", "NF_INSTALL_TOKEN_BIND_IP", False, _bool, "pin install URLs to node IP"),
    Setting(
        "kernel_args", "NF_KERNEL_ARGS", [], _list_of(validate.kernel_arg, commas=False), "extra installer kernel args"
    ),
    Setting("mirror_url", "NF_MIRROR_URL", "mirrors.ustc.edu.cn", _mirror, "Debian mirror host"),
    Setting("mirror_directory", "NF_MIRROR_DIRECTORY", "/debian", _directory, "Debian mirror directory"),
    Setting("mirror_proxy", "NF_MIRROR_PROXY", "", _proxy, "HTTP proxy for the installer"),
    Setting("domain", "NF_DOMAIN", "local", validate.domain, "DNS domain of installed nodes"),
    Setting("timezone", "NF_TIMEZONE", "UTC", validate.timezone, "time zone of installed nodes"),
    Setting("locale", "NF_LOCALE", "en_US.UTF-8", validate.locale, "locale of installed nodes"),
    Setting("keymap", "NF_KEYMAP", "us", validate.keymap, "keyboard layout"),
    Setting("install_disk", "NF_INSTALL_DISK", "", validate.disk, "disk to partition ('' = first disk)"),
    Setting("admin_user", "NF_ADMIN_USER", "nodefoundry", validate.username, "admin user on installed nodes"),
    Setting("admin_password_hash", "NF_ADMIN_PASSWORD_HASH", "", _optional(validate.crypt_hash), "crypt hash"),
    Setting("admin_ssh_keys", "NF_ADMIN_SSH_KEYS", [], _ssh_keys, "authorized SSH keys of the admin user"),
    Setting("extra_packages", "NF_EXTRA_PACKAGES", [], _list_of(validate.package), "packages to add"),
    Setting("mqtt_broker", "NF_MQTT_BROKER", "", _broker, "MQTT broker host:port ('' = embedded)"),
    Setting("agent_heartbeat_interval", "NF_HEARTBEAT_INTERVAL", 30, _int_range(5, 3600), "agent interval (s)"),
    Setting("dhcp_addr", "NF_DHCP_ADDR", ":67", _http_addr, "DHCP listen address"),
    Setting("dhcp_interface", "NF_DHCP_INTERFACE", "", _text, "interface to serve DHCP on ('' = off)"),
    Setting("dhcp_pool_start", "NF_DHCP_IP_POOL_START", "", _optional(validate.ipv4), "first pool address"),
    Setting("dhcp_pool_end", "NF_DHCP_IP_POOL_END", "", _optional(validate.ipv4), "last pool address"),
    Setting("dhcp_netmask", "NF_DHCP_NETMASK", "255.255.255.0", validate.netmask, "pool netmask"),
    Setting("dhcp_gateway", "NF_DHCP_GATEWAY", "", _optional(validate.ipv4), "pool gateway"),
    Setting("dhcp_dns", "NF_DHCP_DNS", ["8.8.8.8", "8.8.4.4"], validate.dns_list, "DNS servers"),
    Setting("dhcp_lease_time", "NF_DHCP_LEASE_TIME", 86400, _int_range(60, 31536000), "lease seconds"),
    Setting("dhcp_tftp_server", "NF_DHCP_TFTP_SERVER", "", _optional(validate.ipv4), "TFTP server address"),
    Setting("dhcp_proxy_mode", "NF_DHCP_PROXY_MODE", False, _bool, "ProxyDHCP beside another server"),
    Setting("dhcp_subnets", "NF_DHCP_SUBNETS", [], _subnets, "further (relayed) subnets"),
    Setting("dhcp_boot_files", "NF_DHCP_BOOT_FILES", {}, _boot_files, "option 93 arch -> boot file overrides"),
    Setting("dhcp_efi_loader", "NF_DHCP_EFI_LOADER", "ipxe.efi", _choice("ipxe.efi", "snponly.efi"), "x86-64 EFI"),
    Setting("dhcp_register_all", "NF_DHCP_REGISTER_ALL", False, _bool, "register non-PXE DHCP clients as nodes"),
    Setting("tftp_addr", "NF_TFTP_ADDR", "", _optional(_http_addr), "TFTP listen address ('' = :69 with DHCP)"),
    Setting("tftp_ipxe_dir", "NF_TFTP_IPXE_DIR", "/usr/lib/ipxe", _required_text, "iPXE binaries served by TFTP"),
    Setting("tftp_max_transfers", "NF_TFTP_MAX_TRANSFERS", 128, _int_range(1, 4096), "concurrent TFTP transfers"),
    Setting("mqtt_username", "NF_MQTT_USERNAME", "", _text, "server's user on an external broker"),
    Setting("mqtt_password", "NF_MQTT_PASSWORD", "", _text, "server's password on an external broker"),
    Setting("mqtt_tls", "NF_MQTT_TLS", False, _bool, "TLS to the external broker"),
    Setting("mqtt_ca_file", "NF_MQTT_CA_FILE", "", _text, "CA bundle for broker TLS ('' = system CAs)"),
    Setting("mqtt_node_broker", "NF_MQTT_NODE_BROKER", "", _optional(_broker), "broker host:port given to nodes"),
    Setting("mqtt_embedded_listen", "NF_MQTT_EMBEDDED_LISTEN", "", _optional(_http_addr), "node-facing listener"),
    Setting("mqtt_node_auth", "NF_MQTT_NODE_AUTH", True, _bool, "per-node broker credentials and ACL"),
    Setting("mqtt_password_file", "NF_MQTT_PASSWORD_FILE", "", _text, "password file the server maintains"),
    Setting("mqtt_acl_file", "NF_MQTT_ACL_FILE", "", _text, "ACL file the server maintains"),
    Setting("mqtt_reload_command", "NF_MQTT_RELOAD_COMMAND", "", _text, "command that reloads an external broker"),
    Setting("mqtt_register_unknown", "NF_MQTT_REGISTER_UNKNOWN", False, _bool, "register unknown MQTT nodes"),
    Setting("command_timeout", "NF_COMMAND_TIMEOUT", 300, _int_range(1, 86400), "default command deadline (s)"),
)

_PROFILE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "disk": validate.disk,
    "timezone": validate.timezone,
    "locale": validate.locale,
    "keymap": validate.keymap,
    "extra_packages": _list_of(validate.package),
    "kernel_args": _list_of(validate.kernel_arg, commas=False),
}


@dataclass(frozen=True)
class Config:
    """All settings, validated. ``profiles`` maps a profile name to overrides."""

    values: Mapping[str, Any]
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "defaults"

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values")  # absent while unpickling (the services process)
        if values is None or key not in values:
            raise AttributeError(key)
        return values[key]

    @property
    def dhcp_enabled(self) -> bool:
        """DHCP is off unless an interface is named: no rogue DHCP server by accident."""
        return bool(self.values["dhcp_interface"])

    def profile(self, profile_name: str | None) -> dict[str, Any]:
        """Install settings for a node: the defaults overlaid with its profile."""
        merged = {key: self.values[key] for key in ("timezone", "locale", "keymap", "kernel_args")}
        merged["disk"] = self.values["install_disk"]
        merged["extra_packages"] = self.values["extra_packages"]
        merged.update(self.profiles.get(profile_name or "", {}))
        return merged


def _parse_profiles(raw: Any) -> dict[str, dict[str, Any]]:
    if raw in (None, ""):
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("profiles: expected a mapping of profile name to settings")
    profiles: dict[str, dict[str, Any]] = {}
    for profile_name, settings in raw.items():
        try:
            validate.name(profile_name, "profile name")
        except InvalidValue as exc:
            raise ConfigError(f"profiles: {exc}") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"profiles.{profile_name}: expected a mapping")
        parsed = {}
        for key, value in settings.items():
            if key not in _PROFILE_FIELDS:
                raise ConfigError(
                    f"profiles.{profile_name}.{_key_name(str(key))}: unknown setting ({', '.join(_PROFILE_FIELDS)})"
                )
            try:
                parsed[key] = _PROFILE_FIELDS[key](value)
            except InvalidValue as exc:
                raise ConfigError(f"profiles.{profile_name}.{key}: {exc}") from None
        profiles[profile_name] = parsed
    return profiles


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    return data


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration; raise ConfigError on the first bad value."""
    environ = os.environ if environ is None else environ
    file_values = _read_file(path) if path else {}
    known = {setting.key for setting in SETTINGS} | {"profiles"}
    unknown = sorted(str(key) for key in file_values if key not in known)
    if unknown:
        raise ConfigError(f"{_key_name(unknown[0])} ({path}): unknown setting")
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for setting in SETTINGS:
        if setting.env in environ:
            raw, where = environ[setting.env], setting.env
        elif setting.key in file_values:
            # A key written without a value (YAML null) means "empty", never the text "None".
            raw, where = file_values[setting.key], f"{setting.key} ({path})"
            raw = "" if raw is None else raw
        else:
            values[setting.key] = setting.default
            continue
        origin[setting.key] = where
        try:
            values[setting.key] = setting.parse(raw)
        except InvalidValue as exc:
            raise ConfigError(f"{where}: {exc}") from None
    _check_dhcp_pool(values, origin)
    return Config(values=values, profiles=_parse_profiles(file_values.get("profiles")), source=str(path or "env"))


def _key_name(key: str) -> str:
    """A key as written, quoted when it could break the one-line error."""
    return key if key.isprintable() and " " not in key else repr(key)


def _check_dhcp_pool(values: dict[str, Any], origin: dict[str, str]) -> None:
    """Pool sanity is checked even before the DHCP server exists: fail early, in one line."""
    start, end = values["dhcp_pool_start"], values["dhcp_pool_end"]
    start_name = origin.get("dhcp_pool_start", "NF_DHCP_IP_POOL_START")
    end_name = origin.get("dhcp_pool_end", "NF_DHCP_IP_POOL_END")
    if bool(start) != bool(end):
        raise ConfigError(f"{start_name}/{end_name}: set both or neither")
    if start and tuple(map(int, start.split("."))) > tuple(map(int, end.split("."))):
        raise ConfigError(f"{start_name}: {start} is after {end_name} {end}")
    if start:
        problem = pool_problem(start, end, values["dhcp_netmask"], values["dhcp_gateway"])
        if problem:
            raise ConfigError(f"{start_name}/{end_name}: {problem}")
