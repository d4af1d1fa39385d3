"""ProxyDHCP beside the site's own DHCP server (dnsmasq) on one segment.

    switch ── dnsmasq ns 10.77.0.2 (addresses) ── nodefoundry ns 10.77.0.1 (boot files only) ── client ns

The lab's probe sends one DISCOVER and collects every OFFER for a few seconds (udhcpc would take
only the first): the address comes from dnsmasq, the boot information from NodeFoundry.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.integration.dhcp_lab import (
    ACK,
    DISCOVER,
    OFFER,
    PEER_IP,
    REQUEST,
    SERVER_IP,
    SUBNET,
    DhcpLab,
    Reply,
    bootp,
    dhcp_lab,
    dumps,
    leases,
    node,
    opt,
    pxe_options,
)

SITE_RANGE = (f"{SUBNET}.50", f"{SUBNET}.90")
PROXY_ENV: dict[str, str | None] = {
    "NF_DHCP_PROXY_MODE": "true",
    "NF_DHCP_IP_POOL_START": None,
    "NF_DHCP_IP_POOL_END": None,
    "NF_DHCP_GATEWAY": None,
    "NF_DHCP_DNS": None,
    "NF_DHCP_LEASE_TIME": None,
}
PARAMETERS = opt(55, bytes([1, 3, 6, 43, 60, 66, 67, 97]))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DhcpLab]:
    with dhcp_lab(tmp_path) as built:
        yield built


def in_site_range(address: str) -> bool:
    return ip_address(SITE_RANGE[0]) <= ip_address(address) <= ip_address(SITE_RANGE[1])


def proxy_problems(reply: Reply, expected_file: str, guid: bytes, bios: bool) -> list[str]:
    """What a PXE ROM needs from a ProxyDHCP reply and does not find in ``reply``."""
    problems = []
    if reply.yiaddr != "0.0.0.0":
        problems.append(f"ProxyDHCP assigned an address: yiaddr {reply.yiaddr}")
    if 51 in reply.options:
        problems.append("ProxyDHCP reply carries a lease time (option 51)")
    if reply.text(60) != "PXEClient":
        problems.append(f"option 60 {reply.text(60)!r}, expected 'PXEClient' (PXE ROMs ignore the reply otherwise)")
    if reply.addresses(54) != [SERVER_IP]:
        problems.append(f"option 54 {reply.addresses(54)}, expected [{SERVER_IP}]")
    if reply.siaddr != SERVER_IP:
        problems.append(f"siaddr {reply.siaddr}, expected {SERVER_IP} (iPXE needs a non-zero next-server)")
    if reply.file != expected_file:
        problems.append(f"file {reply.file!r}, expected {expected_file!r}")
    if 67 in reply.options and reply.text(67) != reply.file:
        problems.append(f"option 67 {reply.text(67)!r} disagrees with file {reply.file!r}")
    if bios and 43 not in reply.options:
        problems.append("no option 43 (PXE vendor options) for a BIOS PXE client")
    if reply.options.get(97) != guid:
        problems.append(f"option 97 not echoed: {reply.options.get(97, b'').hex()} != {guid.hex()}")
    return problems


def test_pxe_client_gets_address_from_dnsmasq_and_boot_file_from_nodefoundry(lab: DhcpLab) -> None:
    site = lab.host("nfdm", ip=PEER_IP)
    lab.dnsmasq(site, *SITE_RANGE)
    server = lab.server(PROXY_ENV)
    client = lab.host()
    options = [*pxe_options(0), PARAMETERS]
    guid = dict(options)[97]

    xid = random.getrandbits(32)
    replies = lab.exchange(client, bootp(client.mac, DISCOVER, xid, options), xid, wait=3.0)
    site_offers = [reply for reply in replies if reply.ip_src == PEER_IP]
    proxy_offers = [reply for reply in replies if reply.ip_src == SERVER_IP]
    assert len(site_offers) == 1 and site_offers[0].type == OFFER, f"{dumps(replies)}\n{lab.details()}"
    address = site_offers[0].yiaddr
    assert in_site_range(address), site_offers[0].summary()
    assert len(proxy_offers) == 1, f"expected one ProxyDHCP offer: {dumps(replies)}\n{lab.details()}"
    offer = proxy_offers[0]
    assert offer.type == OFFER, offer.summary()
    problems = proxy_problems(offer, "undionly.kpxe", guid, bios=True)
    assert not problems, "\n".join(problems) + "\n" + offer.summary()

    # The client takes dnsmasq's address ...
    request = bootp(
        client.mac, REQUEST, xid, [*options, (50, socket.inet_aton(address)), (54, socket.inet_aton(PEER_IP))]
    )
    acks = [r for r in lab.exchange(client, request, xid, wait=2.0) if r.ip_src == PEER_IP]
    assert acks and acks[0].type == ACK and acks[0].yiaddr == address, dumps(acks)
    client.ns.address(client.iface, f"{address}/24")

    # ... and asks the boot server on port 4011 (PXE's boot server discovery), unicast from its address.
    xid = random.getrandbits(32)
    request = bootp(client.mac, REQUEST, xid, options, ciaddr=address)
    answers = lab.exchange(client, request, xid, unicast=(address, SERVER_IP, 4011), first=True)
    assert answers, f"no answer on port 4011\n{lab.details()}"
    ack = answers[0]
    assert ack.type == ACK, ack.summary()
    assert ack.ip_src == SERVER_IP and ack.ip_dst == address, ack.summary()
    problems = proxy_problems(ack, "undionly.kpxe", guid, bios=True)
    assert not problems, "\n".join(problems) + "\n" + ack.summary()

    found = node(server, client.mac)
    assert found is not None and found["status"] == "discovered" and found["arch"] == "amd64", found
    assert leases(server) == [], "ProxyDHCP must not hand out (or record) addresses"


def test_proxy_answers_only_network_boot_clients_and_picks_the_efi_loader(lab: DhcpLab) -> None:
    site = lab.host("nfdm", ip=PEER_IP)
    lab.dnsmasq(site, *SITE_RANGE)
    server = lab.server(PROXY_ENV)

    plain = lab.host()
    xid = random.getrandbits(32)
    replies = lab.exchange(plain, bootp(plain.mac, DISCOVER, xid, [opt(60, "udhcp 1.35.0")]), xid, wait=2.5)
    assert [r.ip_src for r in replies] == [PEER_IP], f"only dnsmasq answers a plain client: {dumps(replies)}"
    assert node(server, plain.mac) is None

    efi = lab.host()
    options = [*pxe_options(7), PARAMETERS]
    xid = random.getrandbits(32)
    replies = lab.exchange(efi, bootp(efi.mac, DISCOVER, xid, options), xid, wait=2.5)
    ours = [reply for reply in replies if reply.ip_src == SERVER_IP]
    assert len(ours) == 1, dumps(replies)
    problems = proxy_problems(ours[0], "ipxe.efi", dict(options)[97], bios=False)
    assert not problems, "\n".join(problems) + "\n" + ours[0].summary()
    assert (node(server, efi.mac) or {}).get("arch") == "amd64"
