"""TFTP wire format and option negotiation (RFC 1350, 2347-2349)."""

from __future__ import annotations

import struct

import pytest

from nodefoundry_server.tftp import packets
from nodefoundry_server.tftp.packets import ErrorCode, MalformedPacket


def test_read_request_with_options() -> None:
    raw = b"\x00\x01pxelinux.0\x00OCTET\x00BLKSIZE\x001468\x00tsize\x000\x00"
    request = packets.parse_request(raw)
    assert request == packets.Request(packets.RRQ, "pxelinux.0", "octet", {"blksize": "1468", "tsize": "0"})
    assert packets.parse_request(packets.request_packet(packets.RRQ, "a/b", "netascii", {"timeout": "3"})) == (
        packets.Request(packets.RRQ, "a/b", "netascii", {"timeout": "3"})
    )


def test_request_padding_dangling_option_and_repeats_are_tolerated() -> None:
    raw = b"\x00\x01f\x00octet\x00blksize\x001024\x00blksize\x00512\x00tsize\x00\x00\x00\x00"
    request = packets.parse_request(raw)
    assert request.options == {"blksize": "1024"}  # first of a repeated option; "tsize" without value dropped


def test_write_request_parses_so_the_server_can_refuse_it() -> None:
    assert packets.parse_request(b"\x00\x02upload\x00octet\x00").opcode == packets.WRQ


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x01",
        b"\x00\x01file",  # no NUL at the end
        b"\x00\x01\x00octet\x00",  # empty file name
        b"\x00\x01file\x00\x00",  # empty mode
        b"\x00\x01file\x00",  # no mode
        b"\x00\x01\xff\xfe\x00octet\x00",  # not UTF-8
        b"\x00\x03\x00\x01data",  # DATA is not a request
        b"\x00\x09x\x00octet\x00",  # unknown opcode
    ],
)
def test_malformed_requests_raise(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        packets.parse_request(raw)


def test_data_blocks_roll_over_to_zero() -> None:
    assert packets.data_packet(1, b"x") == b"\x00\x03\x00\x01x"
    assert packets.data_packet(65535, b"") == b"\x00\x03\xff\xff"
    assert packets.data_packet(65536, b"y") == b"\x00\x03\x00\x00y"
    assert packets.data_packet(65537, b"") == b"\x00\x03\x00\x01"


def test_ack_error_oack_round_trip() -> None:
    assert packets.parse_ack(packets.ack_packet(70000)) == 70000 & 0xFFFF
    assert packets.parse_error(packets.error_packet(ErrorCode.FILE_NOT_FOUND, "nope")) == (1, "nope")
    oack = packets.oack_packet({"blksize": "1468", "tsize": "42"})
    assert oack == b"\x00\x06blksize\x001468\x00tsize\x0042\x00"
    with pytest.raises(MalformedPacket):
        packets.parse_ack(b"\x00\x04\x00")
    with pytest.raises(MalformedPacket):
        packets.parse_error(b"\x00\x05")


def test_negotiate_answers_tsize_with_the_real_size() -> None:
    agreed = packets.negotiate({"tsize": "0"}, 74213)
    assert agreed.oack == {"tsize": "74213"} and agreed.blksize == 512 and agreed.timeout is None


@pytest.mark.parametrize(
    ("requested", "blksize", "oack"),
    [
        ("1468", 1468, {"blksize": "1468"}),
        ("8", 8, {"blksize": "8"}),
        ("65464", 65464, {"blksize": "65464"}),
        ("65535", 65464, {"blksize": "65464"}),  # lowered to the RFC 2348 maximum, and said so
        ("7", 512, {}),  # below the minimum: ignored, the client keeps 512
        ("abc", 512, {}),
        ("-5", 512, {}),
    ],
)
def test_negotiate_blksize(requested: str, blksize: int, oack: dict[str, str]) -> None:
    agreed = packets.negotiate({"blksize": requested}, 10)
    assert (agreed.blksize, agreed.oack) == (blksize, oack)


@pytest.mark.parametrize(("requested", "timeout"), [("1", 1.0), ("255", 255.0), ("0", None), ("256", None)])
def test_negotiate_timeout(requested: str, timeout: float | None) -> None:
    agreed = packets.negotiate({"timeout": requested}, 10)
    assert agreed.timeout == timeout
    assert agreed.oack == ({"timeout": requested} if timeout else {})


def test_negotiate_ignores_unknown_options_and_keeps_the_client_order() -> None:
    agreed = packets.negotiate({"tsize": "0", "windowsize": "8", "blksize": "1024"}, 5)
    assert list(agreed.oack.items()) == [("tsize", "5"), ("blksize", "1024")]


def test_netascii_line_ends() -> None:
    assert packets.netascii(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"
    whole = b"line one\r\nline\rtwo\n"
    assert b"".join(packets.netascii(whole[i : i + 3]) for i in range(0, len(whole), 3)) == packets.netascii(whole)


def test_error_packet_layout() -> None:
    packet = packets.error_packet(ErrorCode.ACCESS_VIOLATION, "no")
    assert struct.unpack("!HH", packet[:4]) == (packets.ERROR, 2) and packet[4:] == b"no\0"
