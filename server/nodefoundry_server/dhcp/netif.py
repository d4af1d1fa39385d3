"""The DHCP interface: its IPv4 address, bound sockets, and the start-up checks (preflight)."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from .. import validate
from ..config import Config, ConfigError
from .leases import subnets_from_config

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
RECEIVE_BUFFER_BYTES = 4 << 20  # a boot storm arrives in bursts; the default ~200 KiB drops them
_SO_RCVBUFFORCE = 33  # Linux; Python's socket module does not name it
PROXY_PORT = 4011


def interface_address(name: str) -> ipaddress.IPv4Interface:
    """The interface's (primary) IPv4 address with its prefix; OSError if it has none or does not exist."""
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        address = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24]
        netmask = fcntl.ioctl(probe.fileno(), _SIOCGIFNETMASK, request)[20:24]
    return ipaddress.IPv4Interface(f"{socket.inet_ntoa(address)}/{socket.inet_ntoa(netmask)}")


def server_port(config: Config) -> int:
    return validate.host_port(config.dhcp_addr, "address", 67)[1]


def open_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket on ``port`` of this interface only (SO_BINDTODEVICE), able to broadcast.

    It binds the wildcard address: a socket bound to a unicast address never sees the broadcasts
    that clients without an address send. No SO_REUSEADDR, so a second DHCP server fails to bind.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
        except OSError:  # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        sock.bind(("", port))
    except BaseException:
        sock.close()
        raise
    return sock


def preflight(config: Config) -> None:
    """Fail the start-up with one line naming the setting, before anything listens."""
    if not config.dhcp_enabled:
        return
    name = config.dhcp_interface
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise ConfigError(f"NF_DHCP_INTERFACE: no network interface named {name!r}") from None
    try:
        address = interface_address(name)
    except OSError:
        raise ConfigError(f"NF_DHCP_INTERFACE: interface {name} has no IPv4 address") from None
    if not config.dhcp_proxy_mode:
        _check_subnets(config, name, address)
    _check_port(name, server_port(config), "NF_DHCP_ADDR")
    if config.dhcp_proxy_mode:
        _check_port(name, PROXY_PORT, "NF_DHCP_PROXY_MODE")


def _check_subnets(config: Config, name: str, address: ipaddress.IPv4Interface) -> None:
    default, relayed = subnets_from_config(config)
    if default is None and not relayed:
        raise ConfigError(
            "NF_DHCP_IP_POOL_START/NF_DHCP_IP_POOL_END: required to hand out addresses on"
            f" {name} (or set NF_DHCP_PROXY_MODE=true beside an existing DHCP server)"
        )
    if default is not None and not (
        ipaddress.IPv4Address(default.pool_first) in address.network
        and ipaddress.IPv4Address(default.pool_last) in address.network
    ):
        raise ConfigError(
            f"NF_DHCP_IP_POOL_START/NF_DHCP_IP_POOL_END: the pool {config.dhcp_pool_start}-{config.dhcp_pool_end}"
            f" is outside the subnet {address.network} of {name} ({address.ip})"
        )
    subnets = ([default] if default else []) + list(relayed)
    for number, subnet in enumerate(subnets):
        for other in subnets[number + 1 :]:
            if subnet.network.overlaps(other.network):
                raise ConfigError(f"NF_DHCP_SUBNETS: subnet {other.network} overlaps {subnet.network}")


def _check_port(interface: str, port: int, setting: str) -> None:
    try:
        open_socket(interface, port).close()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot listen on UDP port {port} on {interface}: {exc.strerror}") from None
