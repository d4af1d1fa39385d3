"""The DHCP server in standard mode, against real clients (udhcpc, dhclient) and the lab's probe.

Each test builds its own namespaces (see ``dhcp_lab``): the server on one port of a bridge, one
namespace per client on the others. Leases, renewals (RENEWING, REBINDING, INIT-REBOOT) and
releases are checked across a graceful restart and a kill -9 of the server.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
import requests

from tests.integration.dhcp_lab import (
    ACK,
    DECLINE,
    DISCOVER,
    DNS,
    GATEWAY,
    INFORM,
    NAK,
    NETMASK,
    OFFER,
    PEER_IP,
    POOL_END,
    POOL_START,
    PXE_BIOS_VENDOR,
    REQUEST,
    SERVER_IP,
    SUBNET,
    DhcpLab,
    assert_pool_consistent,
    bootp,
    bound_leases,
    dhcp_counters,
    dhcp_lab,
    dumps,
    node,
    opt,
    pxe_options,
    random_mac,
    wait_until,
)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DhcpLab]:
    with dhcp_lab(tmp_path) as built:
        yield built


def in_pool(address: str) -> bool:
    return ip_address(POOL_START) <= ip_address(address) <= ip_address(POOL_END)


def aton(address: str) -> bytes:
    return socket.inet_aton(address)


def test_udhcpc_pxe_and_plain_clients_get_leases_only_the_pxe_client_becomes_a_node(lab: DhcpLab) -> None:
    server = lab.server()
    pxe_host, plain_host = lab.host(), lab.host()
    pxe = lab.udhcpc(pxe_host, pxe=True)
    pxe_ip = pxe.lease()
    plain = lab.udhcpc(plain_host)
    plain_ip = plain.lease()

    assert in_pool(pxe_ip) and in_pool(plain_ip) and pxe_ip != plain_ip, (pxe_ip, plain_ip)
    bound = pxe.record.of("bound")[-1]
    assert bound["serverid"] == SERVER_IP
    assert bound["subnet"] == NETMASK
    assert bound["router"] == GATEWAY
    assert bound["dns"].split() == list(DNS)
    assert bound["lease"] == "600"
    # A PXE client is told where its loader is: next-server and the BIOS loader (its option 93 is 0).
    assert bound["siaddr"] == SERVER_IP, bound.values
    assert bound["boot_file"] == "undionly.kpxe", bound.values

    assert bound_leases(server) == {pxe_ip: pxe_host.id, plain_ip: plain_host.id}

    found = node(server, pxe_host.mac)
    assert found is not None, f"the PXE client was not registered\n{lab.details()}"
    assert found["status"] == "discovered"
    assert found["ip"] == pxe_ip
    assert found["netmask"] == NETMASK  # dotted, never hex
    assert found["dns"] == list(DNS)  # a list, never a comma-separated string
    assert found["arch"] == "amd64"  # option 93 = 0: x86 BIOS
    dhcp_facts = found.get("facts", {}).get("dhcp")
    assert dhcp_facts, found
    assert PXE_BIOS_VENDOR in str(dhcp_facts), dhcp_facts
    events = server.api("GET", f"/api/v1/nodes/{pxe_host.id}/events")
    assert events.status_code == 200 and events.json(), events.text

    assert node(server, plain_host.mac) is None, "a plain DHCP client must not become a node"
    assert_pool_consistent(server)


def test_udhcpc_renew_and_release_survive_restart_and_kill_9(lab: DhcpLab) -> None:
    server = lab.server()
    owner_host, other_host, third_host = lab.host(), lab.host(), lab.host()
    # A plain client: a PXE client would become a node, whose recorded ip stays reserved after a release.
    owner = lab.udhcpc(owner_host, once=False)
    address = owner.wait_event("bound")["ip"]

    server.stop()
    lab.start(server)
    assert owner.renew()["ip"] == address, "RENEWING after a graceful restart changed the address"

    server.crash()  # kill -9 of the whole process group
    lab.start(server)
    assert owner.renew()["ip"] == address, "RENEWING after kill -9 changed the address"
    assert bound_leases(server).get(address) == owner_host.id

    # Somebody else asking for that address gets another one: never two MACs on one address.
    other = lab.udhcpc(other_host, "-r", address).lease()
    assert other != address and in_pool(other)

    owner.release()  # SIGUSR2: DHCPRELEASE
    wait_until(
        lambda: address not in bound_leases(server),
        10,
        f"the released lease of {address} to disappear",
        lambda: f"leases: {bound_leases(server)}\n{lab.details()}",
    )
    # Free again: a new client asking for it gets it.
    assert lab.udhcpc(third_host, "-r", address).lease() == address
    owner.stop()
    assert_pool_consistent(server)


def test_dhclient_init_reboot_keeps_the_address_across_kill_9_and_restart_then_releases(lab: DhcpLab) -> None:
    server = lab.server()
    host = lab.host()
    client = lab.dhclient(host)
    first = client.obtain()
    address = first["new_ip_address"]
    assert first.kind == "BOUND" and in_pool(address), first
    assert first["new_dhcp_server_identifier"] == SERVER_IP
    assert first["new_subnet_mask"] == NETMASK
    assert first["new_routers"] == GATEWAY
    assert first["new_domain_name_servers"].split() == list(DNS)
    client.stop()  # no release: the lease file keeps the lease

    server.crash()
    lab.start(server)
    again = client.obtain()  # INIT-REBOOT: REQUEST with option 50, no server id
    assert (again.kind, again["new_ip_address"]) == ("REBOOT", address), client.details()
    client.stop()

    server.stop()
    lab.start(server)
    third = client.obtain()
    assert (third.kind, third["new_ip_address"]) == ("REBOOT", address), client.details()
    assert bound_leases(server).get(address) == host.id

    client.release()
    assert "DHCPRELEASE" in client.output()
    wait_until(
        lambda: address not in bound_leases(server),
        10,
        f"the released lease of {address} to disappear",
        lambda: f"leases: {bound_leases(server)}\n{client.details()}",
    )
    assert node(server, host.mac) is None  # dhclient is a plain client
    assert_pool_consistent(server)


def test_concurrent_clients_never_share_an_address(lab: DhcpLab) -> None:
    server = lab.server()
    hosts = [lab.host() for _ in range(6)]
    clients = [lab.udhcpc(host, pxe=number % 2 == 0) for number, host in enumerate(hosts)]  # all at once
    addresses = [client.lease(timeout=30) for client in clients]
    assert len(set(addresses)) == len(addresses), addresses
    assert all(in_pool(address) for address in addresses), addresses
    assert bound_leases(server) == {address: host.id for address, host in zip(addresses, hosts, strict=True)}
    # Each client again, after a kill -9: every one keeps its own address.
    server.crash()
    lab.start(server)
    again = [lab.udhcpc(host, pxe=number % 2 == 0) for number, host in enumerate(hosts)]
    assert [client.lease(timeout=30) for client in again] == addresses
    assert_pool_consistent(server)


def test_init_reboot_for_an_address_that_is_not_the_clients_gets_nak(lab: DhcpLab) -> None:
    server = lab.server()
    owner, intruder, prober = lab.host(), lab.host(), lab.host()
    taken = lab.udhcpc(owner).lease()

    # The probe: INIT-REBOOT (REQUEST, option 50, no option 54, ciaddr 0) for the owner's address.
    xid = random.getrandbits(32)
    replies = lab.exchange(prober, bootp(prober.mac, REQUEST, xid, [(50, aton(taken))]), xid, first=True)
    assert replies, f"no answer to an INIT-REBOOT for a foreign address\n{lab.details()}"
    nak = replies[0]
    assert nak.type == NAK, dumps(replies)
    assert nak.addresses(54) == [SERVER_IP], nak.summary()
    assert nak.yiaddr == "0.0.0.0", nak.summary()
    assert nak.ip_dst == "255.255.255.255", f"RFC 2131 4.3.2: a NAK without giaddr is broadcast: {nak.summary()}"

    # A client with a lease of its own that asks for another (free) address of the subnet: NAK too.
    own = lab.dora(prober).yiaddr
    wrong = next(f"{SUBNET}.{n}" for n in range(199, 99, -1) if f"{SUBNET}.{n}" not in (own, taken))
    xid = random.getrandbits(32)
    replies = lab.exchange(prober, bootp(prober.mac, REQUEST, xid, [(50, aton(wrong))]), xid, first=True)
    assert [reply.type for reply in replies] == [NAK], f"INIT-REBOOT for {wrong} (own lease {own}): {dumps(replies)}"

    # The real client: dhclient whose lease file claims the owner's address.
    client = lab.dhclient(intruder)
    own_address = client.obtain()["new_ip_address"]
    client.stop()
    client.forge_lease(taken)
    after = client.obtain()
    assert "DHCPNAK" in client.output(), client.details()
    assert after.kind == "BOUND" and after["new_ip_address"] == own_address, client.details()

    # udhcpc -r: a DISCOVER that asks for the owner's address gets another one.
    assert lab.udhcpc(lab.host(), "-r", taken).lease() != taken
    assert bound_leases(server).get(taken) == owner.id
    wait_until(
        lambda: dhcp_counters(server).get("nak", 0) >= 3,
        15,
        "/health components.dhcp to count the NAKs",
        lambda: str(dhcp_counters(server)),
    )
    assert_pool_consistent(server)


def test_request_naming_another_server_gets_no_reply_and_binds_nothing(lab: DhcpLab) -> None:
    server = lab.server()
    host = lab.host()
    xid = random.getrandbits(32)
    offers = lab.exchange(host, bootp(host.mac, DISCOVER, xid, pxe_options(0)), xid, first=True)
    assert offers and offers[0].type == OFFER, dumps(offers)
    offered = offers[0].yiaddr
    # The client chose the other server's offer (option 54 = the other server).
    request = bootp(host.mac, REQUEST, xid, [*pxe_options(0), (50, aton(offered)), (54, aton(PEER_IP))])
    replies = lab.exchange(host, request, xid, wait=2.5)
    assert replies == [], f"the server answered a REQUEST for another server: {dumps(replies)}"
    assert host.id not in bound_leases(server).values()


def test_rebinding_decline_and_inform(lab: DhcpLab) -> None:
    server = lab.server()
    host, other = lab.host(), lab.host()
    address = lab.dora(host).yiaddr

    # REBINDING: broadcast REQUEST from the leased address (ciaddr), neither option 50 nor 54.
    host.ns.address(host.iface, f"{address}/24")
    xid = random.getrandbits(32)
    replies = lab.exchange(host, bootp(host.mac, REQUEST, xid, ciaddr=address), xid, first=True, source=address)
    assert [(r.type, r.yiaddr) for r in replies] == [(ACK, address)], dumps(replies)

    # DECLINE: the client found the address in use; it is quarantined, not offered again.
    xid = random.getrandbits(32)
    decline = bootp(host.mac, DECLINE, xid, [(50, aton(address)), (54, aton(SERVER_IP))])
    assert lab.exchange(host, decline, xid, wait=1.0) == []
    wait_until(lambda: address not in bound_leases(server), 10, "the declined lease to be dropped", lab.details)
    for client in (host, other):
        xid = random.getrandbits(32)
        offers = lab.exchange(client, bootp(client.mac, DISCOVER, xid, [(50, aton(address))]), xid, first=True)
        assert offers and offers[0].type == OFFER, dumps(offers)
        assert offers[0].yiaddr != address, f"a declined address was offered again: {offers[0].summary()}"

    # INFORM: a client with a configured address asks for its other parameters.
    static = lab.host(ip=f"{SUBNET}.30")
    xid = random.getrandbits(32)
    inform = bootp(static.mac, INFORM, xid, [opt(55, bytes([1, 3, 6]))], ciaddr=f"{SUBNET}.30")
    replies = lab.exchange(static, inform, xid, unicast=(f"{SUBNET}.30", SERVER_IP, 67), first=True)
    assert replies and replies[0].type == ACK, dumps(replies)
    answer = replies[0]
    assert answer.ip_dst == f"{SUBNET}.30", answer.summary()
    assert answer.yiaddr == "0.0.0.0", answer.summary()
    assert 51 not in answer.options, f"RFC 2131: no lease time in an ACK to INFORM: {answer.summary()}"
    assert answer.addresses(6) == list(DNS) and answer.addresses(3) == [GATEWAY], answer.summary()
    assert static.id not in bound_leases(server).values()
    assert_pool_consistent(server)


def test_a_nodes_recorded_ip_is_its_reservation_and_dhcp_keeps_its_status(lab: DhcpLab) -> None:
    server = lab.server()
    reserved = f"{SUBNET}.150"
    owner, other = lab.host(), lab.host()
    created = server.api("POST", "/api/v1/nodes", json={"mac": owner.mac, "ip": reserved})
    assert created.status_code == 201, created.text

    # The owner gets its address (polling: the server picks up API changes within a moment) ...
    def owner_lease() -> str | None:
        client = lab.udhcpc(owner, pxe=True)
        return address if (address := client.lease()) == reserved else None

    wait_until(owner_lease, 10, f"{owner.mac} to be given its reservation {reserved}", lab.details)
    # ... releases it: it stays reserved, another client asking for it gets another address.
    holder = lab.udhcpc(owner, pxe=True, once=False)
    assert holder.wait_event("bound")["ip"] == reserved
    holder.release()
    holder.stop()
    wait_until(lambda: reserved not in bound_leases(server), 10, "the release", lab.details)
    assert lab.udhcpc(other, "-r", reserved).lease() != reserved, "a reserved address went to another MAC"
    assert lab.udhcpc(owner, pxe=True).lease() == reserved

    installing = server.api("PUT", f"/api/v1/nodes/{owner.id}", json={"action": "install"})
    assert installing.status_code == 200, installing.text
    assert lab.udhcpc(owner, pxe=True).lease() == reserved
    found = node(server, owner.mac)
    assert found is not None and found["status"] == "installing", found
    assert found["ip"] == reserved
    assert_pool_consistent(server)


IPXE_OPTION_175 = bytes([19, 1, 1, 17, 1, 1])  # iPXE's encapsulated options: bus id, HTTP support


def boot_cases(http_base: str, efi_loader: str) -> list[tuple[str, list[tuple[int, bytes]], str, bool]]:
    """(label, request options, expected file, HTTP boot)."""
    return [
        ("BIOS PXE (93=0)", pxe_options(0), "undionly.kpxe", False),
        ("EFI BC (93=7)", pxe_options(7), efi_loader, False),
        ("EFI x64 (93=9)", pxe_options(9), efi_loader, False),
        ("EFI arm64 (93=11)", pxe_options(11), "debian-installer/arm64/grubaa64.efi", False),
        (
            "HTTP boot x64 (93=16)",
            [opt(60, "HTTPClient:Arch:00016:UNDI:003001"), (93, b"\x00\x10")],
            f"{http_base}/tftp/{efi_loader}",
            True,
        ),
        ("iPXE user class (77)", [*pxe_options(0), opt(77, "iPXE")], f"{http_base}/boot.ipxe", False),
        ("iPXE option 175", [*pxe_options(9), (175, IPXE_OPTION_175)], f"{http_base}/boot.ipxe", False),
    ]


def check_boot_offers(lab: DhcpLab, server_port: int, efi_loader: str) -> list[str]:
    problems = []
    http_base = f"http://{SERVER_IP}:{server_port}"
    host = lab.host()
    for label, options, expected, http in boot_cases(http_base, efi_loader):
        mac = random_mac()  # one client per case, all from the same namespace
        xid = random.getrandbits(32)
        offers = lab.exchange(host, bootp(mac, DISCOVER, xid, options), xid, first=True, mac=mac)
        if not offers or offers[0].type != OFFER:
            problems.append(f"{label}: no OFFER ({dumps(offers)})")
            continue
        offer = offers[0]
        if offer.file != expected:
            problems.append(f"{label}: file {offer.file!r}, expected {expected!r}")
        if 67 in offer.options and offer.text(67) != offer.file:
            problems.append(f"{label}: option 67 {offer.text(67)!r} disagrees with file {offer.file!r}")
        if not http and not expected.startswith("http://"):
            if offer.siaddr != SERVER_IP:
                problems.append(f"{label}: siaddr {offer.siaddr}, expected {SERVER_IP}")
            if 66 in offer.options and offer.text(66) != offer.siaddr:
                problems.append(f"{label}: option 66 {offer.text(66)!r} disagrees with siaddr {offer.siaddr}")
        if http and offer.text(60) != "HTTPClient":
            problems.append(f"{label}: option 60 {offer.text(60)!r}, expected 'HTTPClient'")
    return problems


def test_boot_file_follows_the_requests_option_93(lab: DhcpLab) -> None:
    server = lab.server()
    problems = check_boot_offers(lab, server.port, "ipxe.efi")
    # The HTTP-boot URL is served.
    loader = requests.get(f"{server.url}/tftp/ipxe.efi", timeout=10)
    if loader.status_code != 200:
        problems.append(f"GET /tftp/ipxe.efi (the HTTP-boot URL): {loader.status_code}")
    assert not problems, "\n".join(problems) + "\n" + lab.details()

    snp = lab.server({"NF_DHCP_EFI_LOADER": "snponly.efi"}, start=False)
    server.stop()
    lab.start(snp)
    problems = check_boot_offers(lab, snp.port, "snponly.efi")
    assert not problems, "\n".join(problems) + "\n" + lab.details()
