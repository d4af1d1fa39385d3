"""Which network interface identifies this node, and the addresses it has.

The node's identity is the MAC the server saw when the node PXE-booted: the MAC of a physical NIC.
Bridges, bonds, VLANs, veth pairs and docker interfaces carry made-up or copied MACs, so only an
interface backed by a device (``/sys/class/net/<if>/device``) of Ethernet type counts. Everything
reads plain files under ``/proc`` and ``/sys`` (the roots are parameters so tests can use fake trees).
"""

from __future__ import annotations

import fcntl
import re
import socket
import struct
from pathlib import Path

SYS_NET = Path("/sys/class/net")
PROC_NET = Path("/proc/net")

_ARPHRD_ETHER = "1"
_RTF_UP = 0x1
_SIOCGIFADDR = 0x8915
_HEX_MAC = re.compile(r"^[0-9a-f]{12}$")
_SEPARATED = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_CISCO = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")


def normalise_mac(text: str) -> str | None:
    """12 lower-case hex digits from the usual spellings; None for anything else or a non-unicast MAC."""
    text = text.strip().lower()
    if not (_HEX_MAC.fullmatch(text) or _SEPARATED.fullmatch(text) or _CISCO.fullmatch(text)):
        return None
    mac = re.sub(r"[^0-9a-f]", "", text)
    if mac == "0" * 12 or int(mac[:2], 16) & 1:  # all-zero and multicast/broadcast are no NIC's address
        return None
    return mac


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def default_route_interfaces(proc_net: Path = PROC_NET) -> list[str]:
    """Interfaces with an IPv4 default route that is up, lowest metric first."""
    routes: list[tuple[int, str]] = []
    for line in (_read(proc_net / "route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        try:
            if int(fields[3], 16) & _RTF_UP:
                routes.append((int(fields[6]), fields[0]))
        except ValueError:
            continue
    return [name for _, name in sorted(routes)]


def is_physical(name: str, sys_net: Path = SYS_NET) -> bool:
    """A NIC backed by a device (not a bridge, bond, VLAN, veth, tun or docker interface)."""
    interface = sys_net / name
    return (interface / "device").exists() and _read(interface / "type") == _ARPHRD_ETHER


def interface_mac(name: str, sys_net: Path = SYS_NET) -> str | None:
    return normalise_mac(_read(sys_net / name / "address") or "")


def physical_interfaces(sys_net: Path = SYS_NET) -> list[str]:
    """Physical NICs with a usable MAC, the ones that are up first, then by name."""
    try:
        names = sorted(entry.name for entry in sys_net.iterdir())
    except OSError:
        return []
    physical = [name for name in names if is_physical(name, sys_net) and interface_mac(name, sys_net)]
    return sorted(physical, key=lambda name: _read(sys_net / name / "operstate") != "up")


def detect_mac(sys_net: Path = SYS_NET, proc_net: Path = PROC_NET) -> str | None:
    """The MAC of the physical NIC with the default route; else of the first physical NIC."""
    physical = physical_interfaces(sys_net)
    for name in default_route_interfaces(proc_net):
        if name in physical:
            return interface_mac(name, sys_net)
    return interface_mac(physical[0], sys_net) if physical else None


def ipv4_address(name: str) -> str | None:
    """The primary IPv4 address of an interface (SIOCGIFADDR), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            request = struct.pack("256s", name.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
    except OSError:
        return None


def ipv6_addresses(proc_net: Path = PROC_NET) -> dict[str, list[str]]:
    """IPv6 addresses per interface from ``/proc/net/if_inet6``."""
    found: dict[str, list[str]] = {}
    for line in (_read(proc_net / "if_inet6") or "").splitlines():
        fields = line.split()
        if len(fields) != 6 or not re.fullmatch(r"[0-9a-f]{32}", fields[0]):
            continue
        found.setdefault(fields[5], []).append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
    return found
