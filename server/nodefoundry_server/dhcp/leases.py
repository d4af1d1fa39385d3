"""Subnets and the in-memory lease table (the cache of ``dhcp_leases``; offers live only here).

Invariants kept in memory and by the table's keys: an address is held by at most one MAC, a MAC has
at most one bound lease per subnet, and an address reserved for a node (its ``ip`` in ``nodes``) is
never handed to another MAC. Addresses are integers for cheap comparisons on the hot path.

Every change returns ``LeaseWrite`` rows for the persister: the final state of an address
(a row, or None for "no lease"), applied in order in one transaction.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from .codec import ip_int, ip_text

OFFER_HOLD_SECONDS = 60
DECLINE_HOLD_SECONDS = 600  # RFC 2131 leaves it open; dnsmasq also waits 10 minutes
FULL_POOL_RETRY_SECONDS = 1.0
BOUND, DECLINED = "bound", "declined"


@dataclass(frozen=True)
class Subnet:
    """One subnet with its pool; served on the interface (the default one) or through relays.

    Addresses are integers: ipaddress objects are too slow for the per-packet checks.
    """

    key: str  # the network, e.g. "10.0.0.0/24"
    network_ip: int
    broadcast_ip: int
    pool_first: int
    pool_last: int
    netmask: str
    gateway: str
    dns: tuple[str, ...]
    lease_time: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.key)

    @property
    def size(self) -> int:
        return self.pool_last - self.pool_first + 1

    def contains(self, ip: int) -> bool:
        return self.network_ip <= ip <= self.broadcast_ip

    def in_pool(self, ip: int) -> bool:
        return self.pool_first <= ip <= self.pool_last

    def usable(self, ip: int) -> bool:
        """Never the network or broadcast address, nor the gateway."""
        return self.network_ip < ip < self.broadcast_ip and (not self.gateway or ip != ip_int(self.gateway))


def _subnet(start: str, end: str, netmask: str, gateway: str, dns: Iterable[str], lease_time: int) -> Subnet:
    network = ipaddress.IPv4Network(f"{start}/{netmask}", strict=False)
    return Subnet(
        key=str(network),
        network_ip=int(network.network_address),
        broadcast_ip=int(network.broadcast_address),
        pool_first=ip_int(start),
        pool_last=ip_int(end),
        netmask=netmask,
        gateway=gateway,
        dns=tuple(dns),
        lease_time=lease_time,
    )


def subnets_from_config(config: Config) -> tuple[Subnet | None, tuple[Subnet, ...]]:
    """(the interface's subnet or None, the relayed subnets)."""
    default = None
    if config.dhcp_pool_start:
        default = _subnet(
            config.dhcp_pool_start,
            config.dhcp_pool_end,
            config.dhcp_netmask,
            config.dhcp_gateway,
            config.dhcp_dns,
            config.dhcp_lease_time,
        )
    relayed = tuple(
        _subnet(
            item["pool_start"],
            item["pool_end"],
            item["netmask"],
            item["gateway"],
            config.dhcp_dns if item["dns"] is None else item["dns"],
            item["lease_time"] or config.dhcp_lease_time,
        )
        for item in config.dhcp_subnets
    )
    return default, relayed


@dataclass(slots=True)
class Lease:
    ip: int
    mac: str
    state: str
    subnet: str
    expires_at: int
    client_id: str | None = None
    hostname: str | None = None

    def row(self) -> tuple[Any, ...]:
        """Column values of ``dhcp_leases`` (without updated_at, which the persister stamps)."""
        return (ip_text(self.ip), self.mac, self.state, self.subnet, self.client_id, self.hostname, self.expires_at)


@dataclass(frozen=True, slots=True)
class LeaseWrite:
    """The state of one address after a change: a row, or None when it holds no lease."""

    ip: str
    row: tuple[Any, ...] | None


@dataclass(slots=True)
class _Offer:
    ip: int
    expires_at: float


@dataclass
class Reservations:
    """Nodes' recorded addresses, both ways; the first node keeps an address that two nodes claim."""

    by_mac: dict[str, int] = field(default_factory=dict)
    by_ip: dict[int, str] = field(default_factory=dict)

    def add(self, mac: str, ip: int) -> None:
        if mac not in self.by_mac and ip not in self.by_ip:
            self.by_mac[mac] = ip
            self.by_ip[ip] = mac

    def replace(self, mac: str, ip: int) -> None:
        """The store says so: ``ip`` is ``mac``'s now, whatever this copy held."""
        previous = self.by_mac.pop(mac, None)
        if previous is not None:
            self.by_ip.pop(previous, None)
        self.by_mac.pop(self.by_ip.get(ip, ""), None)
        self.by_mac[mac] = ip
        self.by_ip[ip] = mac


@dataclass
class LeaseTable:
    """Leases, offers and reservations of every subnet; not thread-safe (the service holds one lock)."""

    subnets: tuple[Subnet, ...]
    server_ip: int
    leases: dict[int, Lease] = field(default_factory=dict)
    _bound: dict[tuple[str, str], int] = field(default_factory=dict)  # (subnet, mac) -> ip
    _offers: dict[str, _Offer] = field(default_factory=dict)  # mac -> offer
    _offered: dict[int, str] = field(default_factory=dict)  # ip -> mac
    reservations: Reservations = field(default_factory=Reservations)
    _cursor: dict[str, int] = field(default_factory=dict)
    _full_until: dict[str, float] = field(default_factory=dict)

    # --- lookups -------------------------------------------------------------

    def subnet_of(self, ip: int) -> Subnet | None:
        return next((subnet for subnet in self.subnets if subnet.contains(ip)), None)

    def lease_of(self, subnet: Subnet, mac: str) -> Lease | None:
        ip = self._bound.get((subnet.key, mac))
        return self.leases.get(ip) if ip is not None else None

    def reservation(self, mac: str) -> int | None:
        return self.reservations.by_mac.get(mac)

    def _free_for(self, ip: int, mac: str, now: float) -> bool:
        """Nobody else holds, was offered, declined or reserved ``ip``."""
        if ip == self.server_ip:
            return False
        owner = self.reservations.by_ip.get(ip)
        if owner is not None and owner != mac:
            return False
        lease = self.leases.get(ip)
        if lease is not None and lease.expires_at > now and (lease.mac != mac or lease.state == DECLINED):
            return False
        offered_to = self._offered.get(ip)
        return offered_to is None or offered_to == mac or self._offers[offered_to].expires_at <= now

    def allowed(self, subnet: Subnet, ip: int, mac: str, now: float) -> bool:
        """May ``mac`` hold ``ip`` in ``subnet``: in the pool (or reserved for it), usable and free."""
        in_range = subnet.in_pool(ip) or self.reservations.by_mac.get(mac) == ip
        return in_range and subnet.contains(ip) and subnet.usable(ip) and self._free_for(ip, mac, now)

    def _reserved_here(self, subnet: Subnet, mac: str, now: float) -> int | None:
        """The node's reserved address when it lies in this subnet and can be given now."""
        ip = self.reservations.by_mac.get(mac)
        return ip if ip is not None and self.allowed(subnet, ip, mac, now) else None

    def acceptable(self, subnet: Subnet, ip: int, mac: str, now: float) -> bool:
        """Can a REQUEST for ``ip`` be ACKed: allowed, and the node's usable reservation if it has one."""
        reserved = self._reserved_here(subnet, mac, now)
        return self.allowed(subnet, ip, mac, now) and (reserved is None or reserved == ip)

    def confirmable(self, subnet: Subnet, ip: int, mac: str, now: float) -> bool:
        """INIT-REBOOT, RENEWING, REBINDING: the client may keep only its own lease (or reservation)."""
        lease = self.leases.get(ip)
        own = lease is not None and lease.mac == mac and lease.state == BOUND
        return (own or self.reservations.by_mac.get(mac) == ip) and self.acceptable(subnet, ip, mac, now)

    # --- offers --------------------------------------------------------------

    def choose(self, subnet: Subnet, mac: str, requested: int, now: float) -> int | None:
        """The address to offer: a held offer, the reservation, the current lease, option 50, the next free."""
        offer = self._offers.get(mac)
        if offer is not None and offer.expires_at > now and self.acceptable(subnet, offer.ip, mac, now):
            return offer.ip
        reserved = self._reserved_here(subnet, mac, now)
        if reserved is not None:
            return reserved
        lease = self.lease_of(subnet, mac)
        if lease is not None and lease.state == BOUND and self.allowed(subnet, lease.ip, mac, now):
            return lease.ip
        if requested and subnet.in_pool(requested) and self.allowed(subnet, requested, mac, now):
            return requested
        return self._next_free(subnet, mac, now)

    def _next_free(self, subnet: Subnet, mac: str, now: float) -> int | None:
        """Round-robin from the last address given, so a storm finds a free address in O(1) steps.

        A full pool is not scanned again for a second (or until a release or expiry frees an address):
        a storm of clients that cannot be served must not cost a whole-pool scan each.
        """
        if self._full_until.get(subnet.key, 0) > now:
            return None
        start = self._cursor.get(subnet.key, subnet.pool_first)
        for step in range(subnet.size):
            ip = subnet.pool_first + (start - subnet.pool_first + step) % subnet.size
            if self.allowed(subnet, ip, mac, now):
                self._cursor[subnet.key] = ip + 1 if ip < subnet.pool_last else subnet.pool_first
                return ip
        self._full_until[subnet.key] = now + FULL_POOL_RETRY_SECONDS
        return None

    def hold_offer(self, mac: str, ip: int, now: float) -> None:
        self.forget_offer(mac)
        self._offers[mac] = _Offer(ip, now + OFFER_HOLD_SECONDS)
        self._offered[ip] = mac

    def forget_offer(self, mac: str) -> None:
        """The offer was taken up, ran out, or the client chose another server."""
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offered.get(offer.ip) == mac:
            del self._offered[offer.ip]

    # --- lease changes -------------------------------------------------------

    def bind(
        self, subnet: Subnet, ip: int, mac: str, now: float, client_id: str | None, hostname: str | None
    ) -> list[LeaseWrite]:
        """Bind or extend; a MAC's other lease in this subnet ends (one bound lease per MAC and subnet)."""
        writes = []
        previous = self._bound.get((subnet.key, mac))
        if previous is not None and previous != ip:
            self._drop(previous)
            writes.append(LeaseWrite(ip_text(previous), None))
        self._drop(ip)
        self.forget_offer(mac)
        lease = Lease(ip, mac, BOUND, subnet.key, int(now) + subnet.lease_time, client_id, hostname)
        self._put(lease)
        writes.append(LeaseWrite(ip_text(ip), lease.row()))
        return writes

    def release(self, ip: int, mac: str) -> LeaseWrite | None:
        lease = self.leases.get(ip)
        if lease is None or lease.mac != mac or lease.state != BOUND:
            return None
        self._drop(ip)
        self._full_until.clear()
        return LeaseWrite(ip_text(ip), None)

    def decline(self, ip: int, mac: str, now: float) -> LeaseWrite | None:
        """Quarantine an address the client found in use (ARP conflict): offered or leased to it."""
        lease = self.leases.get(ip)
        subnet = self.subnet_of(ip)
        held = (lease is not None and lease.mac == mac and lease.state == BOUND) or self._offered.get(ip) == mac
        if subnet is None or not held:
            return None
        self._drop(ip)
        self.forget_offer(mac)
        quarantined = Lease(ip, mac, DECLINED, subnet.key, int(now) + DECLINE_HOLD_SECONDS)
        self._put(quarantined)
        return LeaseWrite(ip_text(ip), quarantined.row())

    def expire(self, now: float) -> list[LeaseWrite]:
        """Forget stale offers; reclaim expired leases and ended quarantines."""
        for mac in [mac for mac, offer in self._offers.items() if offer.expires_at <= now]:
            self.forget_offer(mac)
        self._full_until.clear()
        ended = [ip for ip, lease in self.leases.items() if lease.expires_at <= now]
        for ip in ended:
            self._drop(ip)
        return [LeaseWrite(ip_text(ip), None) for ip in ended]

    def _put(self, lease: Lease) -> None:
        self.leases[lease.ip] = lease
        if lease.state == BOUND:
            self._bound[(lease.subnet, lease.mac)] = lease.ip

    def _drop(self, ip: int) -> None:
        lease = self.leases.pop(ip, None)
        if lease is not None and self._bound.get((lease.subnet, lease.mac)) == ip:
            del self._bound[(lease.subnet, lease.mac)]

    # --- loading -------------------------------------------------------------

    def load(self, rows: Iterable[Any], now: float) -> list[LeaseWrite]:
        """Fill from stored rows; return deletions for rows that are expired or of a subnet no longer served."""
        stale = []
        for row in rows:
            ip = ip_int(row["ip"])
            subnet = self.subnet_of(ip)
            if row["expires_at"] <= now or subnet is None or subnet.key != row["subnet"]:
                stale.append(LeaseWrite(row["ip"], None))
                continue
            self._put(
                Lease(ip, row["mac"], row["state"], subnet.key, row["expires_at"], row["client_id"], row["hostname"])
            )
        return stale

    def yield_to_reservation(self, ip: int, mac: str, owner: str) -> None:
        """The store found ``ip`` reserved for ``owner`` (changed since the last read): ``mac`` loses it."""
        lease = self.leases.get(ip)
        if lease is not None and lease.mac == mac:
            self._drop(ip)
        self.reservations.replace(owner, ip)

    def reserve(self, mac: str, ip: int) -> None:
        """A node's first leased address becomes its reservation (written to the node by the persister)."""
        self.reservations.add(mac, ip)

    # --- status --------------------------------------------------------------

    def usage(self, now: float) -> Iterator[dict[str, Any]]:
        for subnet in self.subnets:
            leases = [lease for lease in self.leases.values() if lease.subnet == subnet.key and lease.expires_at > now]
            yield {
                "subnet": subnet.key,
                "pool": f"{ip_text(subnet.pool_first)}-{ip_text(subnet.pool_last)}",
                "size": subnet.size,
                "leased": sum(lease.state == BOUND for lease in leases),
                "declined": sum(lease.state == DECLINED for lease in leases),
                "offered": sum(subnet.contains(offer.ip) and offer.expires_at > now for offer in self._offers.values()),
            }
