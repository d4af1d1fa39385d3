"""DHCP and ProxyDHCP for network-booting nodes (scapy option codec, leases in the store)."""

from .netif import preflight
from .service import DhcpService, describe

__all__ = ["DhcpService", "describe", "preflight"]
