"""Validation and normalisation of every value that comes from outside.

Anything that can end up in an iPXE script, a preseed or a shell line passes
through one of these functions first; each raises ``InvalidValue`` with a
message fit for an API error or a config error.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

MAC_INVALID = "invalid MAC address format"

_MAC_FORMS = (
    re.compile(r"^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$"),
    re.compile(r"^([0-9a-f]{4})\.([0-9a-f]{4})\.([0-9a-f]{4})$"),
    re.compile(r"^([0-9a-f]{12})$"),
)
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,62})$")
_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_DISK = re.compile(r"^/dev/[A-Za-z0-9/_.-]{1,120}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,100}$")
_KERNEL_ARG = re.compile(r"^[A-Za-z0-9_.,:=/+-]{1,200}$")
_SSH_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [\x21-\x7e]([\x20-\x7e]{0,200}))?$"
)
_PHASE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TIMEZONE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+){0,2}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(_[A-Z]{2})?(\.UTF-8)?$")
_KEYMAP = re.compile(r"^[a-z]{2,10}(-[a-z0-9]{1,20})?$")
_BOOT_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,126}$")
_CRYPT_HASH = re.compile(r"^\$(1|5|6|y|2b|gy)\$[A-Za-z0-9./$=,]{8,200}$")


class InvalidValue(ValueError):
    """A value from outside failed validation; the message says why."""


def mac(value: object) -> str:
    """Return the MAC as 12 lower-case hex digits, or raise InvalidValue."""
    if not isinstance(value, str):
        raise InvalidValue(MAC_INVALID)
    text = value.lower()
    for form in _MAC_FORMS:
        match = form.fullmatch(text)
        if match:
            return "".join(match.groups())
    raise InvalidValue(MAC_INVALID)


def hostname(value: object) -> str:
    """An RFC 1123 host label (no dots), returned in lower case."""
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value.lower()):
        raise InvalidValue("invalid hostname: must be an RFC 1123 label (letters, digits, '-', at most 63)")
    return value.lower()


def domain(value: object) -> str:
    """A DNS domain name (dotted RFC 1123 labels), lower case."""
    if not isinstance(value, str) or not _DOMAIN.fullmatch(value.lower()):
        raise InvalidValue("invalid domain: must be dotted RFC 1123 labels")
    return value.lower()


def ipv4(value: object, what: str = "ip") -> str:
    """A dotted IPv4 address (IPv6 is refused: the installer network path is v4)."""
    try:
        return str(ipaddress.IPv4Address(value if isinstance(value, str) else ""))
    except ValueError:
        raise InvalidValue(f"invalid {what}: {value!r} is not an IPv4 address") from None


def netmask(value: object) -> str:
    """A netmask in dotted form; a prefix length (``24`` or ``/24``) is converted."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    try:
        if text.lstrip("/").isdigit():
            return str(ipaddress.IPv4Network(f"0.0.0.0/{text.lstrip('/')}").netmask)
        return str(ipaddress.IPv4Network(f"0.0.0.0/{text}").netmask)
    except ValueError:
        raise InvalidValue(f"invalid netmask: {value!r}") from None


def dns_list(value: object) -> list[str]:
    """DNS servers as a list; a comma- or space-separated string is split."""
    if isinstance(value, str):
        items: Iterable[object] = [item for item in re.split(r"[,\s]+", value) if item]
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidValue("invalid dns: expected a list of IPv4 addresses")
    servers = [ipv4(item, "dns") for item in items]
    if len(servers) > 3:
        raise InvalidValue("invalid dns: at most 3 servers (the installer uses 3)")
    return servers


def labels(value: object) -> dict[str, str]:
    """Labels: a flat object of short, safe keys and values."""
    if not isinstance(value, dict) or len(value) > 64:
        raise InvalidValue("invalid labels: expected an object with at most 64 entries")
    for key, item in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
            raise InvalidValue(f"invalid label key: {key!r}")
        if not isinstance(item, str) or not _LABEL_VALUE.fullmatch(item):
            raise InvalidValue(f"invalid label value for {key!r}: letters, digits, '-', '_', '.' only")
    return dict(sorted(value.items()))


def name(value: object, what: str = "name") -> str:
    """A short identifier: profile names, token names."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidValue(f"invalid {what}: lower-case letters, digits, '-', '_' (at most 63)")
    return value


def username(value: object) -> str:
    if not isinstance(value, str) or not _USERNAME.fullmatch(value):
        raise InvalidValue(f"invalid user name: {value!r}")
    return value


def disk(value: object) -> str:
    """A block device path for partitioning, or '' for the first disk."""
    if value in ("", None):
        return ""
    if not isinstance(value, str) or not _DISK.fullmatch(value) or ".." in value:
        raise InvalidValue(f"invalid disk: {value!r} (expected /dev/<name>)")
    return value


def package(value: object) -> str:
    if not isinstance(value, str) or not _PACKAGE.fullmatch(value):
        raise InvalidValue(f"invalid package name: {value!r}")
    return value


def kernel_arg(value: object) -> str:
    if not isinstance(value, str) or not _KERNEL_ARG.fullmatch(value):
        raise InvalidValue(f"invalid kernel argument: {value!r}")
    return value


def boot_file(value: object) -> str:
    """A file name relative to the TFTP root that fits the BOOTP ``file`` field (127 bytes)."""
    if not isinstance(value, str) or not _BOOT_FILE.fullmatch(value) or ".." in value.split("/"):
        raise InvalidValue(f"invalid boot file: {value!r} (a relative path of letters, digits, '_./-')")
    return value


def ssh_key(value: object) -> str:
    if not isinstance(value, str) or not _SSH_KEY.fullmatch(value.strip()):
        raise InvalidValue("invalid SSH public key: expected '<type> <base64> [comment]' on one line")
    return value.strip()


def crypt_hash(value: object) -> str:
    if not isinstance(value, str) or not _CRYPT_HASH.fullmatch(value):
        raise InvalidValue("invalid password hash: expected a crypt(3) hash such as $6$... or $y$...")
    return value


def phase(value: object) -> str:
    if not isinstance(value, str) or not _PHASE.fullmatch(value):
        raise InvalidValue("invalid phase")
    return value


def timezone(value: object) -> str:
    if not isinstance(value, str) or not _TIMEZONE.fullmatch(value):
        raise InvalidValue(f"invalid time zone: {value!r}")
    return value


def locale(value: object) -> str:
    if not isinstance(value, str) or not _LOCALE.fullmatch(value):
        raise InvalidValue(f"invalid locale: {value!r}")
    return value


def keymap(value: object) -> str:
    if not isinstance(value, str) or not _KEYMAP.fullmatch(value):
        raise InvalidValue(f"invalid keymap: {value!r}")
    return value


def host_port(value: object, what: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``host``; the host may be empty (all addresses)."""
    if not isinstance(value, str):
        raise InvalidValue(f"invalid {what}: expected host:port")
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = value, str(default_port)
    host = host.strip("[]")
    if host and not _DOMAIN.fullmatch(host.lower()):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InvalidValue(f"invalid {what}: bad host {host!r}") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidValue(f"invalid {what}: bad port {port_text!r}")
    return host, int(port_text)


def query_filter(values: Iterable[str], allowed: Sequence[str], what: str) -> list[str]:
    """The choices of a query filter (repeated and/or comma-separated), each one of ``allowed``."""
    chosen = [value for value in ",".join(values).split(",") if value]
    bad = [value for value in chosen if value not in allowed]
    if bad:
        raise InvalidValue(f"invalid {what} filter {bad[0]!r}: one of {', '.join(allowed)}")
    return chosen
