"""Decisions: one client message in, at most one reply and some store writes out (RFC 2131, PXE).

Runs on the receive thread and touches only memory; whatever must be durable is returned as
``Writes`` for the persister, and a reply that grants a lease (``durable``) is sent only after those
writes are committed. Every outcome is counted (offer, ack, nak, ignored:<reason>, dropped:<reason> ...).
"""

from __future__ import annotations

import logging
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import validate
from ..config import Config
from . import bootfile
from .bootfile import BootFiles
from .codec import (
    ACK,
    BROADCAST_FLAG,
    DECLINE,
    DISCOVER,
    INFORM,
    MESSAGE_NAMES,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    Malformed,
    Request,
    decode,
    encode,
    ip_int,
    ip_text,
)
from .leases import LeaseTable, LeaseWrite, Subnet, subnets_from_config
from .netif import PROXY_PORT, server_port

log = logging.getLogger("nodefoundry.dhcp")

BROADCAST = "255.255.255.255"
EXHAUSTED_WARNING_SECONDS = 60
PXE_BOOT_FILE_IN_HEADER = b"\x06\x01\x08\xff"  # option 43: discovery control = boot the header's file, end
_PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")


@dataclass(frozen=True)
class DhcpSettings:
    """What the handler needs from the configuration and the interface."""

    proxy: bool
    interface: str
    server_ip: int
    next_server: int
    default_subnet: Subnet | None
    relayed: tuple[Subnet, ...]
    boot: BootFiles
    register_all: bool
    server_port: int

    @classmethod
    def from_config(cls, config: Config, server_ip: str) -> DhcpSettings:
        default, relayed = subnets_from_config(config)
        _, http_port = validate.host_port(config.http_addr, "address", 8080)
        return cls(
            proxy=config.dhcp_proxy_mode,
            interface=config.dhcp_interface,
            server_ip=ip_int(server_ip),
            next_server=ip_int(config.dhcp_tftp_server or server_ip),
            default_subnet=None if config.dhcp_proxy_mode else default,
            relayed=() if config.dhcp_proxy_mode else relayed,
            boot=BootFiles(
                overrides=dict(config.dhcp_boot_files),
                efi_loader=config.dhcp_efi_loader,
                assets_dir=config.assets_dir,
                http_base=f"http://{config.server_addr or f'{server_ip}:{http_port}'}",
            ),
            register_all=config.dhcp_register_all,
            server_port=server_port(config),
        )

    @property
    def subnets(self) -> tuple[Subnet, ...]:
        return ((self.default_subnet,) if self.default_subnet else ()) + self.relayed

    def describe(self) -> str:
        where = f"on {self.interface} ({ip_text(self.server_ip)}) port {self.server_port}"
        if self.proxy:
            return f"ProxyDHCP {where} and {PROXY_PORT}: boot information for PXE clients, no addresses"
        pools = [f"{ip_text(subnet.pool_first)}-{ip_text(subnet.pool_last)}" for subnet in self.subnets]
        return f"{where}, pool {', '.join(pools)}; iPXE clients get {self.boot.http_base}/boot.ipxe"

    @property
    def client_port(self) -> int:
        """68 beside 67; with another server port the client port follows it (as dnsmasq does)."""
        return self.server_port + 1


@dataclass(frozen=True, slots=True)
class Reply:
    packet: bytes
    address: tuple[str, int]
    from_proxy_port: bool = False  # sent from the 4011 socket (ProxyDHCP answers there)


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A node's first leased address, recorded in the node when it has none (never over a reservation)."""

    mac: str
    ip: str
    netmask: str
    gateway: str
    dns: tuple[str, ...]


@dataclass(slots=True)
class Writes:
    leases: list[LeaseWrite] = field(default_factory=list)
    registration: tuple[str, dict[str, Any]] | None = None
    address: NodeAddress | None = None


@dataclass(slots=True)
class Decision:
    reply: Reply | None = None
    writes: Writes | None = None
    durable: bool = False  # the reply waits until ``writes`` are committed
    refusal: Reply | None = None  # sent instead of a durable ACK whose address the store finds reserved


class DhcpHandler:
    """The state machine over a LeaseTable; not thread-safe (the service serialises calls)."""

    def __init__(self, settings: DhcpSettings, table: LeaseTable, known_macs: set[str] | None = None) -> None:
        self.settings = settings
        self.table = table
        self.known_macs = known_macs if known_macs is not None else set()
        self.counters: Counter[str] = Counter()
        self._server_id = ip_text(settings.server_ip)
        self._next_server = ip_text(settings.next_server)
        self._exhausted_warned: dict[str, float] = {}

    def handle(
        self, packet: bytes, source: tuple[str, int], now: float, *, proxy_port: bool = False
    ) -> Decision | None:
        """Decode and decide; never raises (a failure is counted as "error")."""
        try:
            request = decode(packet)
        except Malformed as exc:
            self.counters[f"dropped:{exc.reason}"] += 1
            log.debug("dropped a packet from %s:%d: %s", *source, exc.reason)
            return None
        except Exception:
            self.counters["error"] += 1
            log.exception("cannot decode a packet from %s:%d", *source)
            return None
        try:
            if self.settings.proxy:
                return self._proxy(request, source, now, proxy_port)
            return self._standard(request, now)
        except Exception:
            self.counters["error"] += 1
            log.exception("failed on %s from %s", MESSAGE_NAMES[request.message_type], request.mac)
            return None

    def expire(self, now: float) -> Writes | None:
        """Housekeeping: stale offers, expired leases, ended quarantines."""
        reclaimed = self.table.expire(now)
        return Writes(leases=reclaimed) if reclaimed else None

    # --- standard mode ---------------------------------------------------------

    def _standard(self, request: Request, now: float) -> Decision | None:
        kind = request.message_type
        if kind == DISCOVER:
            return self._discover(request, now)
        if kind == REQUEST:
            return self._request(request, now)
        if kind == DECLINE:
            return self._decline(request, now)
        if kind == RELEASE:
            return self._release(request)
        if kind == INFORM:
            return self._inform(request)
        return self._ignore(f"unexpected_{MESSAGE_NAMES[kind]}", request)

    def _segment(self, request: Request) -> Subnet | None:
        """The subnet the client sits on: the relay's (giaddr) or the interface's."""
        if request.giaddr:
            return next((subnet for subnet in self.settings.subnets if subnet.contains(request.giaddr)), None)
        return self.settings.default_subnet

    def _discover(self, request: Request, now: float) -> Decision | None:
        subnet = self._segment(request)
        if subnet is None:
            return self._ignore("unknown_relay" if request.giaddr else "no_subnet", request)
        ip = self.table.choose(subnet, request.mac, request.requested_ip, now)
        if ip is None:
            if now >= self._exhausted_warned.get(subnet.key, 0) + EXHAUSTED_WARNING_SECONDS:
                self._exhausted_warned[subnet.key] = now
                log.warning("pool of %s is exhausted: %s and others get no address", subnet.key, request.mac)
            return self._ignore("pool_exhausted", request)
        self.table.hold_offer(request.mac, ip, now)
        self.counters["offer"] += 1
        registration = self._registration(request)
        return Decision(
            reply=self._lease_reply(request, OFFER, subnet, ip),
            writes=Writes(registration=registration) if registration else None,
        )

    def _request(self, request: Request, now: float) -> Decision | None:
        if request.server_id:  # SELECTING: the client answers one OFFER
            if request.server_id != self.settings.server_ip:
                self.table.forget_offer(request.mac)
                return self._ignore("other_server", request)
            subnet = self._segment(request)
            ip = request.requested_ip or request.ciaddr
            if subnet is None or not ip:
                return self._ignore("no_subnet" if subnet is None else "no_address", request)
            return self._ack_or_nak(request, subnet, ip, now, self.table.acceptable)
        if request.ciaddr:  # RENEWING (unicast) or REBINDING (broadcast)
            subnet = self.table.subnet_of(request.ciaddr)
            if subnet is None:
                return self._ignore("foreign_address", request)
            return self._ack_or_nak(request, subnet, request.ciaddr, now, self.table.confirmable)
        if request.requested_ip:  # INIT-REBOOT: the client checks a remembered address
            segment = self._segment(request)
            if segment is not None and segment.contains(request.requested_ip):
                return self._ack_or_nak(request, segment, request.requested_ip, now, self.table.confirmable)
            if self.table.subnet_of(request.requested_ip) is not None:
                return self._nak(request, "address not valid on this network")
            return self._ignore("foreign_address", request)
        return self._ignore("no_address", request)

    def _ack_or_nak(
        self, request: Request, subnet: Subnet, ip: int, now: float, valid: Callable[[Subnet, int, str, float], bool]
    ) -> Decision:
        """``valid``: may this client have ``ip`` (an offer it selects), or keep it (a lease it confirms)."""
        if not valid(subnet, ip, request.mac, now):
            return self._nak(request, "address not available")
        writes = Writes(
            leases=self.table.bind(
                subnet, ip, request.mac, now, request.client_id.hex() or None, _text(request.hostname) or None
            ),
            registration=self._registration(request),
        )
        if request.mac in self.known_macs and self.table.reservation(request.mac) is None:
            self.table.reserve(request.mac, ip)
            writes.address = NodeAddress(request.mac, ip_text(ip), subnet.netmask, subnet.gateway, subnet.dns)
        self.counters["ack"] += 1
        return Decision(
            reply=self._lease_reply(request, ACK, subnet, ip),
            writes=writes,
            durable=True,
            refusal=self._nak_reply(request, "address reserved"),
        )

    def _nak(self, request: Request, message: str) -> Decision:
        self.counters["nak"] += 1
        log.debug("NAK to %s: %s", request.mac, message)
        return Decision(reply=self._nak_reply(request, message))

    def _nak_reply(self, request: Request, message: str) -> Reply:
        options = [("server_id", self._server_id), ("error_message", message.encode())]
        # RFC 2131 4.3.2: a NAK through a relay carries the broadcast bit, so the relay broadcasts it.
        flags = request.flags | BROADCAST_FLAG if request.giaddr else request.flags
        return Reply(encode(request, NAK, options, flags=flags), self._destination(request, to_ciaddr=False))

    def _decline(self, request: Request, now: float) -> Decision | None:
        if request.server_id and request.server_id != self.settings.server_ip:
            return self._ignore("other_server", request)
        write = self.table.decline(request.requested_ip, request.mac, now)
        if write is None:
            return self._ignore("decline_unknown", request)
        self.counters["declined"] += 1
        log.warning("%s declined %s (in use by another host?); quarantined", request.mac, write.ip)
        return Decision(writes=Writes(leases=[write]))

    def _release(self, request: Request) -> Decision | None:
        if request.server_id and request.server_id != self.settings.server_ip:
            return self._ignore("other_server", request)
        write = self.table.release(request.ciaddr, request.mac)
        if write is None:
            return self._ignore("release_unknown", request)
        self.counters["released"] += 1
        return Decision(writes=Writes(leases=[write]))

    def _inform(self, request: Request) -> Decision | None:
        subnet = self.table.subnet_of(request.ciaddr) if request.ciaddr else None
        if subnet is None:
            return self._ignore("foreign_address", request)
        self.counters["inform"] += 1
        options = [("server_id", self._server_id), *self._network_options(subnet)]
        siaddr, file, boot_options = self._boot(request)
        packet = encode(request, ACK, options + boot_options, ciaddr=request.ciaddr, siaddr=siaddr, file=file)
        return Decision(reply=Reply(packet, self._destination(request, to_ciaddr=True)))

    def _lease_reply(self, request: Request, kind: int, subnet: Subnet, ip: int) -> Reply:
        lease_time = subnet.lease_time
        options = [
            ("server_id", self._server_id),
            ("lease_time", lease_time),
            ("renewal_time", lease_time // 2),
            ("rebinding_time", lease_time * 7 // 8),
            *self._network_options(subnet),
        ]
        siaddr, file, boot_options = self._boot(request)
        packet = encode(
            request,
            kind,
            options + boot_options,
            ciaddr=request.ciaddr if kind == ACK else 0,
            yiaddr=ip,
            siaddr=siaddr,
            file=file,
        )
        return Reply(packet, self._destination(request, to_ciaddr=kind == ACK))

    @staticmethod
    def _network_options(subnet: Subnet) -> list[tuple[Any, ...]]:
        options: list[tuple[Any, ...]] = [("subnet_mask", subnet.netmask)]
        if subnet.gateway:
            options.append(("router", subnet.gateway))
        if subnet.dns:
            options.append(("name_server", *subnet.dns))
        return options

    def _boot(self, request: Request) -> tuple[int, bytes, list[tuple[Any, ...]]]:
        """(siaddr, file field, options) for a network-booting client; nothing for the others.

        Standard mode sends option 60 only as "HTTPClient": "PXEClient" without option 43 sends
        EDK2 on to port 4011, where no ProxyDHCP server listens.
        """
        choice = self.settings.boot.choose(request) if bootfile.is_network_boot(request) else None
        if choice is None:
            return 0, b"", []
        file = choice.file.encode()
        options: list[tuple[Any, ...]] = [("tftp_server_name", self._next_server.encode()), ("boot-file-name", file)]
        if choice.http:
            options.append(("vendor_class_id", b"HTTPClient"))
        return self.settings.next_server, file if len(file) < 128 else b"", options

    def _destination(self, request: Request, *, to_ciaddr: bool) -> tuple[str, int]:
        """Relay (giaddr) first, then a client that has an address (ciaddr), else a broadcast."""
        if request.giaddr:
            return ip_text(request.giaddr), self.settings.server_port
        if to_ciaddr and request.ciaddr:
            return ip_text(request.ciaddr), self.settings.client_port
        return BROADCAST, self.settings.client_port

    # --- ProxyDHCP -------------------------------------------------------------

    def _proxy(self, request: Request, source: tuple[str, int], now: float, proxy_port: bool) -> Decision | None:
        """Boot information only, never an address: OFFER on port 67, ACK on port 4011."""
        booting = bootfile.is_pxe(request) or bootfile.is_http_boot(request)
        if not booting or request.client_arch is None:
            return self._ignore("not_pxe", request)
        expected = (REQUEST, INFORM) if proxy_port else (DISCOVER,)
        if request.message_type not in expected:
            return self._ignore(f"proxy_{MESSAGE_NAMES[request.message_type]}", request)
        choice = self.settings.boot.choose(request)
        if choice is None:
            return self._ignore("unsupported_arch", request)
        file = choice.file.encode()
        options: list[tuple[Any, ...]] = [
            ("server_id", self._server_id),
            ("vendor_class_id", b"HTTPClient" if choice.http else b"PXEClient"),
            ("tftp_server_name", self._next_server.encode()),
            ("boot-file-name", file),
        ]
        if request.machine_id is not None:
            options.append(("pxe_client_machine_identifier", request.machine_id))
        if request.client_arch == bootfile.BIOS and not choice.http:
            options.append(("vendor_specific", PXE_BOOT_FILE_IN_HEADER))
        kind = ACK if proxy_port else OFFER
        self.counters["ack" if proxy_port else "offer"] += 1
        packet = encode(
            request,
            kind,
            options,
            ciaddr=request.ciaddr if proxy_port else 0,
            siaddr=self.settings.next_server,
            file=file if len(file) < 128 else b"",
        )
        destination = source if proxy_port else self._destination(request, to_ciaddr=False)
        registration = self._registration(request)
        return Decision(
            reply=Reply(packet, destination, from_proxy_port=proxy_port),
            writes=Writes(registration=registration) if registration else None,
        )

    # --- shared ----------------------------------------------------------------

    def _registration(self, request: Request) -> tuple[str, dict[str, Any]] | None:
        """A new network-booting client (any client with dhcp_register_all) becomes a discovered node."""
        if request.mac in self.known_macs:
            return None
        if not (bootfile.is_network_boot(request) or self.settings.register_all):
            return None
        self.known_macs.add(request.mac)
        arch = bootfile.client_arch(request)
        facts: dict[str, Any] = {
            "interface": ip_text(request.giaddr) if request.giaddr else self.settings.interface,
        }
        if request.vendor_class:
            facts["vendor_class"] = _text(request.vendor_class)
        if arch is not None:
            facts["client_arch"] = arch
        if request.user_class:
            facts["user_class"] = _text(request.user_class)
        fields: dict[str, Any] = {"facts": {"dhcp": facts}}
        if arch in bootfile.DEBIAN_ARCH:
            fields["arch"] = bootfile.DEBIAN_ARCH[arch]
        return request.mac, fields

    def _ignore(self, reason: str, request: Request) -> None:
        self.counters[f"ignored:{reason}"] += 1
        log.debug("ignored %s from %s: %s", MESSAGE_NAMES[request.message_type], request.mac, reason)


def _text(value: bytes) -> str:
    """Client-supplied bytes as short printable text, for facts and lease rows."""
    return "".join(ch for ch in value[:128].decode("ascii", "replace") if ch in _PRINTABLE)
