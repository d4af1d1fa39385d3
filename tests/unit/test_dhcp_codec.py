"""The DHCP codec's strict bounds: malformed packets are dropped and counted, never raised."""

from __future__ import annotations

import random
import struct
import time

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from nodefoundry_server import config
from nodefoundry_server.dhcp import codec
from nodefoundry_server.dhcp.handler import DhcpHandler, DhcpSettings
from nodefoundry_server.dhcp.leases import LeaseTable

MAC = bytes.fromhex("525400aabbcc")


def discover(*options: object, **header: object) -> bytes:
    fields = {"op": 1, "chaddr": MAC + bytes(10), "xid": 0x1234, "flags": 0x8000, **header}
    return bytes(BOOTP(**fields) / DHCP(options=[("message-type", "discover"), *options, "end"]))


def with_options(raw_options: bytes, header: bytes | None = None) -> bytes:
    """A request whose options area is exactly ``raw_options`` (after the magic cookie)."""
    return (header or discover()[: codec.HEADER.size]) + raw_options


@pytest.fixture
def handler(tmp_path) -> DhcpHandler:
    environ = {"NF_DHCP_INTERFACE": "nf0", "NF_DHCP_IP_POOL_START": "10.9.0.10", "NF_DHCP_IP_POOL_END": "10.9.0.20"}
    settings = DhcpSettings.from_config(config.load(None, environ), "10.9.0.1")
    return DhcpHandler(settings, LeaseTable(settings.subnets, settings.server_ip))


def test_a_scapy_built_discover_decodes():
    request = codec.decode(
        discover(
            ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"),
            ("pxe_client_architecture", b"\x00\x07\x00\x00"),
            ("client_id", b"\x01" + MAC),
            ("param_req_list", [1, 3, 6, 66, 67]),
            ("requested_addr", "10.9.0.15"),
            (175, b"\xb1\x05\x01\x80\x86\x10\x0e"),
        )
    )
    assert request.message_type == codec.DISCOVER
    assert request.mac == "525400aabbcc"
    assert request.client_arch == 7  # the first of the listed architectures
    assert request.requested_ip == codec.ip_int("10.9.0.15")
    assert request.client_id == b"\x01" + MAC
    assert request.parameters == [1, 3, 6, 66, 67]
    assert request.ipxe_encapsulated


MALFORMED = {
    "oversize": discover() + bytes(1300),
    "short": discover()[:239],
    "op": discover(op=2),
    "htype": discover(htype=6),
    "not_dhcp": discover()[:236] + b"\x00\x00\x00\x00" + discover()[240:],
    "chaddr": discover(chaddr=b"\xff" * 6 + bytes(10)),
    "truncated_option": with_options(b"\x35\x01\x01\x3c\x20PXEClient"),
    "option_length": with_options(b"\x35\x01\x01\x32\x03\x0a\x09\x00\xff"),  # requested address of 3 bytes
    "no_message_type": with_options(b"\x3c\x03abc\xff"),
    "message_type": with_options(b"\x35\x01\x63\xff"),
    "overload": with_options(b"\x35\x01\x01\x34\x01\x07\xff"),
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed_packets_are_dropped_and_counted(handler, reason):
    assert handler.handle(MALFORMED[reason], ("10.9.0.99", 68), time.time()) is None
    assert handler.counters == {f"dropped:{reason}": 1}


def test_odd_option_93_is_a_bad_length(handler):
    assert handler.handle(discover(("pxe_client_architecture", b"\x00")), ("0.0.0.0", 68), time.time()) is None
    assert handler.counters == {"dropped:option_length": 1}


def test_a_server_id_of_eight_bytes_is_a_bad_length(handler):
    packet = with_options(b"\x35\x01\x03\x36\x08\x0a\x09\x00\x01\x0a\x09\x00\x02\xff")
    assert handler.handle(packet, ("0.0.0.0", 68), time.time()) is None
    assert handler.counters == {"dropped:option_length": 1}


def test_option_overload_reads_the_file_field_once():
    header = bytearray(discover()[: codec.HEADER.size])
    file_options = b"\x3c\x09PXEClient\xff"
    header[108 : 108 + len(file_options)] = file_options  # the 128-byte file field starts at offset 108
    request = codec.decode(with_options(b"\x35\x01\x01\x34\x01\x01\xff", bytes(header)))
    assert request.vendor_class == b"PXEClient"


def test_option_overload_inside_an_overloaded_field_is_a_loop(handler):
    header = bytearray(discover()[: codec.HEADER.size])
    header[108:114] = b"\x34\x01\x02\xff\x00\x00"  # the file field points on to sname
    header[44:47] = b"\x34\x01\x01"  # and sname back to the file field
    packet = with_options(b"\x35\x01\x01\x34\x01\x03\xff", bytes(header))
    assert handler.handle(packet, ("0.0.0.0", 68), time.time()) is None
    assert handler.counters == {"dropped:overload_loop": 1}


def test_bytes_after_the_end_option_are_ignored():
    request = codec.decode(with_options(b"\x35\x01\x01\xff\x3c\x50trailing-garbage"))
    assert request.vendor_class == b""


def test_a_failure_inside_the_decision_is_counted_not_raised(handler):
    handler.table = None  # any packet that reaches the lease table now fails
    assert handler.handle(discover(), ("0.0.0.0", 68), time.time()) is None
    assert handler.counters == {"error": 1}


def test_random_bytes_never_raise(handler):
    generator = random.Random(4)
    valid = discover(("vendor_class_id", b"PXEClient"), ("pxe_client_architecture", b"\x00\x00"))
    for _ in range(3000):
        packet = bytearray(valid)
        for _ in range(generator.randint(1, 8)):
            packet[generator.randrange(codec.HEADER.size - 4, len(packet))] = generator.randrange(256)
        handler.handle(bytes(packet[: generator.randint(200, len(packet))]), ("0.0.0.0", 68), time.time())
    assert handler.counters["error"] == 0
    assert sum(handler.counters.values()) == 3000


def test_replies_are_padded_and_ordered_by_option_55():
    request = codec.decode(discover(("param_req_list", [6, 3, 1])))
    options = [("server_id", "10.9.0.1"), ("subnet_mask", "255.255.255.0"), ("router", "10.9.0.1")]
    options.append(("name_server", "10.9.0.53"))
    packet = codec.encode(request, codec.OFFER, options, yiaddr=codec.ip_int("10.9.0.10"))
    assert len(packet) >= codec.MIN_REPLY
    op, *_ = struct.unpack_from("!B", packet)
    assert op == 2
    reply = BOOTP(packet)
    names = [option[0] for option in reply[DHCP].options if isinstance(option, tuple)]
    assert names == ["message-type", "name_server", "router", "subnet_mask", "server_id"]
    assert reply.yiaddr == "10.9.0.10"
    assert reply.xid == 0x1234
    assert bytes(reply.chaddr)[:6] == MAC
