"""TFTP packets (RFC 1350) and option negotiation (RFC 2347 OACK, 2348 blksize, 2349 timeout and tsize).

Pure functions over bytes, so every rule here is unit-tested without a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349, seconds
MODES = ("octet", "netascii")


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class MalformedPacket(ValueError):
    """A datagram that is not a well-formed TFTP packet; the message says what is wrong."""


@dataclass(frozen=True)
class Request:
    """A read or write request: file name, transfer mode (lower case) and options (names lower case)."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


def opcode(packet: bytes) -> int:
    if len(packet) < 2:
        raise MalformedPacket("shorter than an opcode")
    return struct.unpack_from("!H", packet)[0]


def parse_request(packet: bytes) -> Request:
    """RRQ/WRQ: ``opcode filename NUL mode NUL [name NUL value NUL]...``.

    Trailing empty fields (padding some PXE ROMs add) and a name without a value are ignored;
    of a repeated option the first counts.
    """
    code = opcode(packet)
    if code not in (RRQ, WRQ):
        raise MalformedPacket(f"opcode {code} is not a request")
    if not packet.endswith(b"\0"):
        raise MalformedPacket("request does not end with NUL")
    try:
        fields = [item.decode("utf-8") for item in packet[2:-1].split(b"\0")]
    except UnicodeDecodeError:
        raise MalformedPacket("request is not UTF-8") from None
    while fields and not fields[-1]:
        fields.pop()
    if len(fields) < 2 or not fields[0] or not fields[1]:
        raise MalformedPacket("request lacks a file name or mode")
    options: dict[str, str] = {}
    for name, value in zip(fields[2::2], fields[3::2], strict=False):
        options.setdefault(name.lower(), value)
    return Request(code, fields[0], fields[1].lower(), options)


def parse_ack(packet: bytes) -> int:
    if len(packet) < 4:
        raise MalformedPacket("ACK shorter than 4 bytes")
    return struct.unpack_from("!H", packet, 2)[0]


def parse_error(packet: bytes) -> tuple[int, str]:
    if len(packet) < 4:
        raise MalformedPacket("ERROR shorter than 4 bytes")
    message = packet[4:].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return struct.unpack_from("!H", packet, 2)[0], message


def data_packet(block: int, payload: bytes) -> bytes:
    """Block numbers wrap from 65535 to 0, as tftp-hpa, curl, iPXE and GRUB expect for big files."""
    return struct.pack("!HH", DATA, block & 0xFFFF) + payload


def ack_packet(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


def oack_packet(options: dict[str, str]) -> bytes:
    body = b"".join(f"{name}\0{value}\0".encode() for name, value in options.items())
    return struct.pack("!H", OACK) + body


def error_packet(code: ErrorCode, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("utf-8", errors="replace") + b"\0"


def request_packet(code: int, filename: str, mode: str = "octet", options: dict[str, str] | None = None) -> bytes:
    """Build a request; the server never sends one, tests and tools do."""
    fields = [filename, mode, *(item for pair in (options or {}).items() for item in pair)]
    return struct.pack("!H", code) + b"".join(item.encode() + b"\0" for item in fields)


@dataclass(frozen=True)
class Negotiated:
    """What a transfer uses, and the OACK to send (empty: no option was accepted, start with DATA 1)."""

    blksize: int = DEFAULT_BLKSIZE
    timeout: float | None = None
    oack: dict[str, str] = field(default_factory=dict)


def _int(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def negotiate(options: dict[str, str], size: int) -> Negotiated:
    """Accept blksize (a larger one is lowered to 65464), timeout and tsize (answered with ``size``).

    Unknown options and unusable values are left out of the OACK, which RFC 2347 allows: the
    client then uses the default for that option.
    """
    blksize, timeout, oack = DEFAULT_BLKSIZE, None, {}
    for name, value in options.items():
        number = _int(value)
        if name == "blksize" and number is not None and number >= MIN_BLKSIZE:
            blksize = min(number, MAX_BLKSIZE)
            oack[name] = str(blksize)
        elif name == "timeout" and number is not None and MIN_TIMEOUT <= number <= MAX_TIMEOUT:
            timeout = float(number)
            oack[name] = str(number)
        elif name == "tsize" and number is not None:
            oack[name] = str(size)
    return Negotiated(blksize, timeout, oack)


def netascii(raw: bytes) -> bytes:
    """RFC 764 line ends: CR becomes CR NUL, LF becomes CR LF. Byte by byte, so chunks convert alone."""
    return raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
