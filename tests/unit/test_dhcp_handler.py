"""DHCP decisions (RFC 2131 client states, ProxyDHCP, boot files) on scapy-built client packets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from nodefoundry_server import config
from nodefoundry_server.dhcp.codec import ip_int
from nodefoundry_server.dhcp.handler import Decision, DhcpHandler, DhcpSettings
from nodefoundry_server.dhcp.leases import DECLINE_HOLD_SECONDS, OFFER_HOLD_SECONDS, LeaseTable

SERVER = "10.77.0.1"
NOW = 1_800_000_000.0
PXE_BIOS = {"vendor_class_id": b"PXEClient:Arch:00000:UNDI:002001", "pxe_client_architecture": b"\x00\x00"}
PXE_UEFI = {"vendor_class_id": b"PXEClient:Arch:00007:UNDI:003016", "pxe_client_architecture": b"\x00\x07"}
HTTP_BOOT = {"vendor_class_id": b"HTTPClient:Arch:00016:UNDI:003001", "pxe_client_architecture": b"\x00\x10"}
IPXE = {**PXE_BIOS, "user_class": b"iPXE"}
GUID = b"\x00" + bytes(range(16))


def make_handler(tmp_path: Path, **env: str) -> DhcpHandler:
    environ = {
        "NF_DHCP_INTERFACE": "nf0",
        "NF_DHCP_IP_POOL_START": "10.77.0.100",
        "NF_DHCP_IP_POOL_END": "10.77.0.103",
        "NF_DHCP_GATEWAY": "10.77.0.254",
        "NF_DHCP_DNS": "10.77.0.53",
        "NF_DHCP_LEASE_TIME": "3600",
        "NF_HTTP_ADDR": ":8080",
        "NF_ASSETS_DIR": str(tmp_path / "assets"),
        **env,
    }
    settings = DhcpSettings.from_config(config.load(None, environ), SERVER)
    return DhcpHandler(settings, LeaseTable(settings.subnets, settings.server_ip))


def packet(
    mac: str, kind: str, ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0", numbered: tuple = (), **options: Any
) -> bytes:
    """A client message; ``numbered`` adds options scapy has no name for, as (code, bytes)."""
    header = BOOTP(op=1, chaddr=bytes.fromhex(mac) + bytes(10), xid=42, flags=0x8000, ciaddr=ciaddr, giaddr=giaddr)
    return bytes(header / DHCP(options=[("message-type", kind), *options.items(), *numbered, "end"]))


def send(handler: DhcpHandler, raw: bytes, now: float = NOW, **kwargs: Any) -> Decision | None:
    return handler.handle(raw, ("0.0.0.0", 68), now, **kwargs)


def answer(decision: Decision | None) -> tuple[BOOTP, dict[str, Any]]:
    """The reply as scapy reads it, with its options by name (a single value unwrapped)."""
    assert decision is not None and decision.reply is not None
    reply = BOOTP(decision.reply.packet)
    options = {item[0]: item[1] if len(item) == 2 else item[1:] for item in reply[DHCP].options if len(item) > 1}
    return reply, options


def dora(handler: DhcpHandler, mac: str, now: float = NOW, **options: Any) -> str:
    offer, _ = answer(send(handler, packet(mac, "discover", **options), now))
    ack, ack_options = answer(
        send(handler, packet(mac, "request", server_id=SERVER, requested_addr=offer.yiaddr, **options), now)
    )
    assert ack_options["message-type"] == 5
    return ack.yiaddr


@pytest.fixture
def handler(tmp_path: Path) -> DhcpHandler:
    return make_handler(tmp_path)


# --- standard mode: the client state machine ------------------------------------------------


def test_discover_gets_an_offer_with_the_network_options(handler):
    decision = send(handler, packet("02000000aa01", "discover"))
    reply, options = answer(decision)
    assert decision.reply.address == ("255.255.255.255", 68)
    assert not decision.durable
    assert reply.op == 2 and reply.yiaddr == "10.77.0.100" and reply.xid == 42
    assert options["message-type"] == 2
    assert options["server_id"] == SERVER
    assert options["subnet_mask"] == "255.255.255.0"
    assert options["router"] == "10.77.0.254"
    assert options["name_server"] == "10.77.0.53"
    assert (options["lease_time"], options["renewal_time"], options["rebinding_time"]) == (3600, 1800, 3150)
    assert reply.siaddr == "0.0.0.0" and reply.file.rstrip(b"\0") == b""  # not a network-booting client
    assert "boot-file-name" not in options and "vendor_class_id" not in options
    assert handler.counters == {"offer": 1}


def test_request_for_the_offer_is_acked_after_the_lease_is_written(handler):
    send(handler, packet("02000000aa01", "discover"))
    decision = send(handler, packet("02000000aa01", "request", server_id=SERVER, requested_addr="10.77.0.100"))
    reply, options = answer(decision)
    assert options["message-type"] == 5 and reply.yiaddr == "10.77.0.100"
    assert decision.durable  # sent by the persister, after COMMIT
    [lease] = decision.writes.leases
    assert lease.ip == "10.77.0.100" and lease.row[1:4] == ("02000000aa01", "bound", "10.77.0.0/24")
    assert lease.row[6] == int(NOW) + 3600
    assert handler.counters == {"offer": 1, "ack": 1}


def test_an_offer_is_held_for_its_client_only(handler):
    first, _ = answer(send(handler, packet("02000000aa01", "discover")))
    second, _ = answer(send(handler, packet("02000000aa02", "discover")))
    again, _ = answer(send(handler, packet("02000000aa01", "discover")))
    assert first.yiaddr == again.yiaddr != second.yiaddr
    later, _ = answer(send(handler, packet("02000000aa03", "discover", requested_addr=first.yiaddr)))
    assert later.yiaddr != first.yiaddr
    # once the hold ran out, the address is free again
    handler.expire(NOW + OFFER_HOLD_SECONDS + 1)
    taken, _ = answer(
        send(handler, packet("02000000aa04", "discover", requested_addr=first.yiaddr), NOW + OFFER_HOLD_SECONDS + 1)
    )
    assert taken.yiaddr == first.yiaddr


def test_a_request_naming_another_server_is_silently_dropped_and_frees_our_offer(handler):
    offer, _ = answer(send(handler, packet("02000000aa01", "discover")))
    decision = send(handler, packet("02000000aa01", "request", server_id="10.77.0.2", requested_addr=offer.yiaddr))
    assert decision is None
    assert handler.counters["ignored:other_server"] == 1
    other, _ = answer(send(handler, packet("02000000aa02", "discover", requested_addr=offer.yiaddr)))
    assert other.yiaddr == offer.yiaddr


def test_a_request_for_an_address_held_by_another_client_is_naked(handler):
    held = dora(handler, "02000000aa01")
    send(handler, packet("02000000aa02", "discover"))
    decision = send(handler, packet("02000000aa02", "request", server_id=SERVER, requested_addr=held))
    _, options = answer(decision)
    assert options["message-type"] == 6 and options["server_id"] == SERVER
    assert decision.reply.address == ("255.255.255.255", 68)
    assert decision.writes is None and handler.counters["nak"] == 1


def test_init_reboot_acks_its_own_lease(handler):
    ip = dora(handler, "02000000aa01")
    reply, options = answer(send(handler, packet("02000000aa01", "request", requested_addr=ip), NOW + 100))
    assert options["message-type"] == 5 and reply.yiaddr == ip


def test_init_reboot_naks_a_foreign_address_in_our_subnet(handler):
    held = dora(handler, "02000000aa01")
    _, held_by_other = answer(send(handler, packet("02000000aa02", "request", requested_addr=held)))
    _, outside_pool = answer(send(handler, packet("02000000aa02", "request", requested_addr="10.77.0.20")))
    assert held_by_other["message-type"] == outside_pool["message-type"] == 6


def test_init_reboot_is_silent_for_an_address_outside_our_subnets(handler):
    assert send(handler, packet("02000000aa01", "request", requested_addr="192.168.1.50")) is None
    assert handler.counters == {"ignored:foreign_address": 1}


def test_renewing_extends_the_lease_and_answers_the_client_directly(handler):
    ip = dora(handler, "02000000aa01")
    decision = send(handler, packet("02000000aa01", "request", ciaddr=ip), NOW + 1800)
    reply, options = answer(decision)
    assert options["message-type"] == 5 and reply.yiaddr == ip and reply.ciaddr == ip
    assert decision.reply.address == (ip, 68)
    assert decision.writes.leases[0].row[6] == int(NOW) + 1800 + 3600


def test_renewing_an_address_of_another_client_is_naked(handler):
    ip = dora(handler, "02000000aa01")
    _, options = answer(send(handler, packet("02000000aa02", "request", ciaddr=ip)))
    assert options["message-type"] == 6


def test_release_frees_the_address(handler):
    ip = dora(handler, "02000000aa01")
    decision = send(handler, packet("02000000aa01", "release", ciaddr=ip, server_id=SERVER))
    assert decision.reply is None and [write.row for write in decision.writes.leases] == [None]
    assert handler.counters["released"] == 1
    offer, _ = answer(send(handler, packet("02000000aa02", "discover", requested_addr=ip)))
    assert offer.yiaddr == ip


def test_decline_quarantines_the_address(handler):
    ip = dora(handler, "02000000aa01")
    decision = send(handler, packet("02000000aa01", "decline", requested_addr=ip, server_id=SERVER))
    assert decision.writes.leases[0].row[2] == "declined" and handler.counters["declined"] == 1
    for number in range(2, 6):  # the other three addresses go, the declined one is never offered
        mac = f"02000000aa0{number}"
        decision = send(handler, packet(mac, "discover", requested_addr=ip))
        if number < 5:
            assert answer(decision)[0].yiaddr != ip
        else:
            assert decision is None and handler.counters["ignored:pool_exhausted"] == 1
    later = NOW + DECLINE_HOLD_SECONDS + 1
    assert [write.row for write in handler.expire(later).leases] == [None]
    assert answer(send(handler, packet("02000000aa06", "discover", requested_addr=ip), later))[0].yiaddr == ip


def test_inform_gets_options_but_no_lease(handler):
    decision = send(handler, packet("02000000aa01", "inform", ciaddr="10.77.0.7"))
    reply, options = answer(decision)
    assert options["message-type"] == 5 and options["subnet_mask"] == "255.255.255.0"
    assert "lease_time" not in options and reply.yiaddr == "0.0.0.0" and reply.ciaddr == "10.77.0.7"
    assert decision.reply.address == ("10.77.0.7", 68) and decision.writes is None
    assert handler.counters == {"inform": 1}


def test_a_reserved_address_goes_to_its_node_only(handler):
    handler.table.reservations.add("02000000bb01", ip_int("10.77.0.102"))
    taken, _ = answer(send(handler, packet("02000000aa01", "discover", requested_addr="10.77.0.102")))
    assert taken.yiaddr != "10.77.0.102"
    _, options = answer(send(handler, packet("02000000aa01", "request", requested_addr="10.77.0.102")))
    assert options["message-type"] == 6
    assert dora(handler, "02000000bb01") == "10.77.0.102"


def test_a_reservation_outside_the_pool_but_in_the_subnet_is_given(handler):
    handler.table.reservations.add("02000000bb01", ip_int("10.77.0.20"))
    assert dora(handler, "02000000bb01") == "10.77.0.20"


def test_the_previous_lease_is_preferred_then_option_50(handler):
    first = dora(handler, "02000000aa01")
    dora(handler, "02000000aa02")
    assert dora(handler, "02000000aa01", NOW + 10) == first
    asked, _ = answer(send(handler, packet("02000000aa03", "discover", requested_addr="10.77.0.103")))
    assert asked.yiaddr == "10.77.0.103"


def test_binding_another_address_ends_the_clients_previous_lease(handler):
    first = dora(handler, "02000000aa01")
    handler.table.reservations.add("02000000aa01", ip_int("10.77.0.103"))  # reserved through the API
    _, options = answer(send(handler, packet("02000000aa01", "request", ciaddr=first)))
    assert options["message-type"] == 6  # renewing the old address: no longer this node's
    send(handler, packet("02000000aa01", "discover"))
    decision = send(handler, packet("02000000aa01", "request", server_id=SERVER, requested_addr="10.77.0.103"))
    assert [(write.ip, write.row is None) for write in decision.writes.leases] == [
        (first, True),
        ("10.77.0.103", False),
    ]


def test_init_reboot_for_a_free_address_that_is_not_its_lease_is_naked(handler):
    dora(handler, "02000000aa01")
    _, options = answer(send(handler, packet("02000000aa01", "request", requested_addr="10.77.0.103")))
    assert options["message-type"] == 6


def test_relayed_requests_use_the_relays_subnet_and_answer_the_relay(tmp_path):
    subnets = '[{"pool_start": "10.88.0.10", "pool_end": "10.88.0.20", "netmask": "255.255.255.0", "lease_time": 600}]'
    handler = make_handler(tmp_path, NF_DHCP_SUBNETS=subnets)
    decision = send(handler, packet("02000000aa01", "discover", giaddr="10.88.0.1"))
    reply, options = answer(decision)
    assert reply.yiaddr == "10.88.0.10" and reply.giaddr == "10.88.0.1"
    assert decision.reply.address == ("10.88.0.1", 67)
    assert options["lease_time"] == 600 and options["name_server"] == "10.77.0.53"  # the global DNS
    assert "router" not in options
    nak = send(handler, packet("02000000aa02", "request", giaddr="10.88.0.1", requested_addr="10.88.0.99"))
    assert answer(nak)[1]["message-type"] == 6 and answer(nak)[0].flags & 0x8000
    assert nak.reply.address == ("10.88.0.1", 67)
    assert send(handler, packet("02000000aa03", "discover", giaddr="10.99.0.1")) is None
    assert handler.counters["ignored:unknown_relay"] == 1


# --- boot information in standard mode -------------------------------------------------------


def test_a_bios_pxe_client_gets_undionly_from_the_next_server(handler):
    reply, options = answer(send(handler, packet("02000000aa01", "discover", **PXE_BIOS)))
    assert reply.siaddr == SERVER
    assert reply.file.rstrip(b"\0") == options["boot-file-name"] == b"undionly.kpxe"
    assert options["tftp_server_name"] == SERVER.encode()
    assert "vendor_class_id" not in options and "vendor_specific" not in options  # no PXEClient without 43


def test_the_next_server_setting_is_used_for_siaddr_and_option_66(tmp_path):
    handler = make_handler(tmp_path, NF_DHCP_TFTP_SERVER="10.77.0.5")
    reply, options = answer(send(handler, packet("02000000aa01", "discover", **PXE_UEFI)))
    assert reply.siaddr == "10.77.0.5" and options["tftp_server_name"] == b"10.77.0.5"
    assert options["server_id"] == SERVER


def test_an_ipxe_client_gets_its_boot_script_url(handler):
    reply, options = answer(send(handler, packet("02000000aa01", "discover", **IPXE)))
    assert options["boot-file-name"] == reply.file.rstrip(b"\0") == b"http://10.77.0.1:8080/boot.ipxe"
    _, encapsulated = answer(
        send(handler, packet("02000000aa02", "discover", numbered=((175, b"\x13\x01\x01"),), **PXE_BIOS))
    )
    assert encapsulated["boot-file-name"] == b"http://10.77.0.1:8080/boot.ipxe"


def test_a_uefi_http_boot_client_gets_a_url_and_httpclient(handler):
    _, options = answer(send(handler, packet("02000000aa01", "discover", **HTTP_BOOT)))
    assert options["vendor_class_id"] == b"HTTPClient"
    assert options["boot-file-name"] == b"http://10.77.0.1:8080/tftp/ipxe.efi"


def test_the_boot_script_url_uses_server_addr(tmp_path):
    handler = make_handler(tmp_path, NF_SERVER_ADDR="boot.lab:80")
    _, options = answer(send(handler, packet("02000000aa01", "discover", **IPXE)))
    assert options["boot-file-name"] == b"http://boot.lab:80/boot.ipxe"


BOOT_FILES = [
    ({}, 0, "undionly.kpxe", False),
    ({}, 6, "ipxe.efi", False),
    ({}, 7, "ipxe.efi", False),
    ({}, 9, "ipxe.efi", False),
    ({"NF_DHCP_EFI_LOADER": "snponly.efi"}, 7, "snponly.efi", False),
    ({}, 11, "debian-installer/arm64/grubaa64.efi", False),
    ({}, 16, "http://10.77.0.1:8080/tftp/ipxe.efi", True),
    ({"NF_DHCP_EFI_LOADER": "snponly.efi"}, 16, "http://10.77.0.1:8080/tftp/snponly.efi", True),
    ({"NF_DHCP_BOOT_FILES": "7=custom/x64.efi,0=lab.kpxe"}, 7, "custom/x64.efi", False),
    ({"NF_DHCP_BOOT_FILES": "7=custom/x64.efi,0=lab.kpxe"}, 0, "lab.kpxe", False),
    ({"NF_DHCP_BOOT_FILES": "16=snponly.efi"}, 16, "http://10.77.0.1:8080/tftp/snponly.efi", True),
]


@pytest.mark.parametrize(("env", "arch", "expected", "http"), BOOT_FILES)
def test_boot_file_by_the_requests_option_93(tmp_path, env, arch, expected, http):
    handler = make_handler(tmp_path, **env)
    vendor = b"HTTPClient" if http else b"PXEClient"
    request = packet(
        "02000000aa01", "discover", vendor_class_id=vendor, pxe_client_architecture=arch.to_bytes(2, "big")
    )
    reply, options = answer(send(handler, request))
    assert options["boot-file-name"] == reply.file.rstrip(b"\0") == expected.encode()
    assert (options.get("vendor_class_id") == b"HTTPClient") is http


def test_arm64_http_boot_gets_no_grub(tmp_path):
    """Debian's GRUB started by UEFI HTTP boot has no network settings: the firmware must fall back to PXE."""
    handler = make_handler(tmp_path)
    request = packet("02000000aa01", "discover", vendor_class_id=b"HTTPClient", pxe_client_architecture=b"\x00\x13")
    reply = send(handler, request)
    assert reply is None or "boot-file-name" not in answer(reply)[1]


def test_arm64_gets_ipxe_once_it_is_in_the_assets(tmp_path):
    loader = tmp_path / "assets" / "tftp" / "arm64" / "ipxe.efi"
    loader.parent.mkdir(parents=True)
    loader.write_bytes(b"efi")
    handler = make_handler(tmp_path)
    request = packet("02000000aa01", "discover", vendor_class_id=b"PXEClient", pxe_client_architecture=b"\x00\x0b")
    assert answer(send(handler, request))[1]["boot-file-name"] == b"arm64/ipxe.efi"


def test_an_architecture_without_a_loader_gets_a_plain_lease(handler):
    request = packet("02000000aa01", "discover", vendor_class_id=b"PXEClient", pxe_client_architecture=b"\x00\x0a")
    reply, options = answer(send(handler, request))
    assert reply.yiaddr == "10.77.0.100" and "boot-file-name" not in options


# --- discovery ---------------------------------------------------------------------------------


def test_a_new_pxe_client_is_registered_once_with_its_facts(handler):
    decision = send(handler, packet("02000000aa01", "discover", **PXE_UEFI, user_class=b"x"))
    mac, fields = decision.writes.registration
    assert mac == "02000000aa01"
    assert fields == {
        "arch": "amd64",
        "facts": {
            "dhcp": {
                "vendor_class": "PXEClient:Arch:00007:UNDI:003016",
                "client_arch": 7,
                "interface": "nf0",
                "user_class": "x",
            }
        },
    }
    assert send(handler, packet("02000000aa01", "discover", **PXE_UEFI)).writes is None


def test_a_known_node_without_an_address_gets_its_first_lease_recorded(handler):
    handler.known_macs = {"02000000aa01"}
    send(handler, packet("02000000aa01", "discover"))
    decision = send(handler, packet("02000000aa01", "request", server_id=SERVER, requested_addr="10.77.0.100"))
    address = decision.writes.address
    assert (address.ip, address.netmask, address.gateway, address.dns) == (
        "10.77.0.100",
        "255.255.255.0",
        "10.77.0.254",
        ("10.77.0.53",),
    )
    renewal = send(handler, packet("02000000aa01", "request", ciaddr="10.77.0.100"))
    assert renewal.writes.address is None  # recorded once, not on every renewal


def test_a_node_with_a_reservation_is_never_given_a_recorded_address(handler):
    handler.known_macs = {"02000000aa01"}
    handler.table.reservations.add("02000000aa01", ip_int("10.77.0.101"))
    send(handler, packet("02000000aa01", "discover"))
    decision = send(handler, packet("02000000aa01", "request", server_id=SERVER, requested_addr="10.77.0.101"))
    assert decision.writes.address is None


def test_plain_clients_get_leases_but_are_not_registered(handler, tmp_path):
    assert dora(handler, "02000000aa01") == "10.77.0.100"
    assert "02000000aa01" not in handler.known_macs
    everyone = make_handler(tmp_path, NF_DHCP_REGISTER_ALL="true")
    decision = send(everyone, packet("02000000aa01", "discover"))
    assert decision.writes.registration == ("02000000aa01", {"facts": {"dhcp": {"interface": "nf0"}}})


def test_a_relayed_client_records_the_relay_as_its_interface(tmp_path):
    subnets = '[{"pool_start": "10.88.0.10", "pool_end": "10.88.0.20", "netmask": "255.255.255.0"}]'
    handler = make_handler(tmp_path, NF_DHCP_SUBNETS=subnets)
    decision = send(handler, packet("02000000aa01", "discover", giaddr="10.88.0.1", **PXE_BIOS))
    assert decision.writes.registration[1]["facts"]["dhcp"]["interface"] == "10.88.0.1"


# --- ProxyDHCP -----------------------------------------------------------------------------------


@pytest.fixture
def proxy(tmp_path: Path) -> DhcpHandler:
    return make_handler(tmp_path, NF_DHCP_PROXY_MODE="true", NF_DHCP_IP_POOL_START="", NF_DHCP_IP_POOL_END="")


def test_proxy_offer_to_a_bios_client_has_pxe_options_and_no_address(proxy):
    decision = send(proxy, packet("02000000aa01", "discover", **PXE_BIOS, pxe_client_machine_identifier=GUID))
    reply, options = answer(decision)
    assert reply.yiaddr == "0.0.0.0" and reply.siaddr == SERVER
    assert reply.file.rstrip(b"\0") == options["boot-file-name"] == b"undionly.kpxe"
    assert options["message-type"] == 2 and options["server_id"] == SERVER
    assert options["vendor_class_id"] == b"PXEClient"
    assert options["vendor_specific"] == b"\x06\x01\x08\xff"
    assert options["pxe_client_machine_identifier"] == GUID
    assert "lease_time" not in options and "subnet_mask" not in options
    assert decision.reply.address == ("255.255.255.255", 68) and not decision.reply.from_proxy_port
    assert decision.writes.registration[0] == "02000000aa01"


def test_proxy_offer_to_a_uefi_client_without_option_97(proxy):
    _, options = answer(send(proxy, packet("02000000aa01", "discover", **PXE_UEFI)))
    assert options["boot-file-name"] == b"ipxe.efi" and options["vendor_class_id"] == b"PXEClient"
    assert "vendor_specific" not in options and "pxe_client_machine_identifier" not in options


def test_proxy_answers_requests_on_port_4011_to_their_source(proxy):
    request = packet("02000000aa01", "request", ciaddr="10.50.0.7", **PXE_UEFI, pxe_client_machine_identifier=GUID)
    decision = proxy.handle(request, ("10.50.0.7", 4011), NOW, proxy_port=True)
    reply, options = answer(decision)
    assert options["message-type"] == 5 and reply.ciaddr == "10.50.0.7" and reply.yiaddr == "0.0.0.0"
    assert options["pxe_client_machine_identifier"] == GUID
    assert decision.reply.address == ("10.50.0.7", 4011) and decision.reply.from_proxy_port
    assert not decision.durable


def test_proxy_http_boot_client_gets_httpclient_and_a_url(proxy):
    _, options = answer(send(proxy, packet("02000000aa01", "discover", **HTTP_BOOT)))
    assert options["vendor_class_id"] == b"HTTPClient"
    assert options["boot-file-name"] == b"http://10.77.0.1:8080/tftp/ipxe.efi"


def test_proxy_ignores_clients_that_do_not_pxe_boot(proxy):
    assert send(proxy, packet("02000000aa01", "discover")) is None
    assert send(proxy, packet("02000000aa01", "discover", vendor_class_id=b"PXEClient")) is None  # no option 93
    assert send(proxy, packet("02000000aa01", "request", **PXE_BIOS, requested_addr="10.77.0.9")) is None
    assert proxy.counters == {"ignored:not_pxe": 2, "ignored:proxy_request": 1}
