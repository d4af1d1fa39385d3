"""Malformed DHCP traffic: the server stays up, keeps its pool consistent and counts the drops.

A few thousand packets go to UDP port 67 (unicast to the server and broadcast) from a host
on the segment: scapy's ``fuzz()`` of BOOTP/DHCP messages, random bytes, and hand-made corner
cases (truncated options, bad lengths, option 52 overload loops, > 1500 bytes, non-Ethernet
hardware types, empty datagrams). The seed is in the failure message.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.packet import fuzz, raw

from tests.integration.dhcp_lab import (
    DISCOVER,
    INFORM,
    MAGIC,
    POOL_END,
    POOL_START,
    RELEASE,
    REQUEST,
    SERVER_IP,
    SUBNET,
    DhcpLab,
    assert_pool_consistent,
    bootp,
    bound_leases,
    dhcp_component,
    dhcp_counters,
    dhcp_lab,
    pxe_options,
    random_mac,
    wait_until,
)

FUZZER_IP = f"{SUBNET}.40"
RANDOM_COUNT = 2500
MESSAGE_TYPES = ["discover", "request", "decline", "release", "inform", "offer", "ack", "nak"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DhcpLab]:
    with dhcp_lab(tmp_path) as built:
        yield built


def corner_cases(rng: random.Random) -> list[bytes]:
    """Hand-made malformed messages (and a few valid-looking ones with odd values)."""
    mac = "02:00:00:00:fe:01"
    xid = rng.getrandbits(32)
    header = bootp(mac, None, xid, end=False)[:236]  # fixed header without the magic cookie

    def options(body: bytes) -> bytes:
        return header + MAGIC + body

    cases = [
        b"",  # empty datagram
        b"\x01",
        os.urandom(100),
        header[:200],  # truncated header
        header,  # no magic cookie
        header + b"\x63\x82\x53",  # truncated cookie
        header + b"\x00\x00\x00\x00" + bytes([53, 1, 1, 255]),  # wrong cookie
        options(b""),  # no options, no end
        options(bytes([255])),  # no message type
        options(bytes([53, 1, 1])),  # no end option
        options(bytes([53, 1, 1, 60, 200]) + b"PXEClient"),  # option longer than the packet
        options(bytes([53, 1, 1, 61])),  # option code without length
        options(bytes([53, 0, 255])),  # message type of length 0
        options(bytes([53, 5, 1, 1, 1, 1, 1, 255])),  # message type of length 5
        options(bytes([53, 1, 0, 255])),  # message type 0
        options(bytes([53, 1, 99, 255])),  # unknown message type
        options(bytes([53, 1, 1, 50, 3, 10, 77, 0, 255])),  # requested address of 3 bytes
        options(bytes([53, 1, 1, 54, 5, 10, 77, 0, 1, 1, 255])),  # server id of 5 bytes
        options(bytes([53, 1, 1, 93, 1, 0, 255])),  # option 93 of one byte
        options(bytes([53, 1, 1, 93, 3, 0, 0, 7, 255])),  # option 93 of odd length
        options(bytes([53, 1, 1, 93, 2, 255, 255, 255])),  # unknown architecture
        options(bytes([53, 1, 1, 52, 1, 4, 255])),  # overload value out of range
        options(bytes([53, 1, 1, 52, 2, 3, 3, 255])),  # overload of wrong length
        options(bytes([53, 1, 1, 57, 2, 0, 10, 255])),  # max message size 10
        options(bytes([53, 1, 1, 55, 255]) + bytes(range(255)) + bytes([255])),  # 255 parameters
        options(bytes([53, 1, 1, 12, 12]) + b"\xff\xfe$(reboot)" + bytes([255])),  # hostname: junk bytes
        options(bytes([53, 1, 1, 60, 9]) + b"PXE\xffClie\x00" + bytes([255])),  # vendor class: junk bytes
        options(bytes([53, 1, 1, 61, 0, 255])),  # empty client id
        options(bytes([53, 1, 1, 255, 53, 1, 3, 50, 4, 10, 77, 0, 150])),  # data after the end option
        options(bytes(1000) + bytes([53, 1, 1, 255])),  # 1000 pad options
    ]
    # Option 52 loops: file/sname areas that again say "overload", pointing at each other.
    loop = bytearray(header + MAGIC + bytes([53, 1, 1, 52, 1, 3, 255]))
    loop[44:108] = bytes([52, 1, 3, 255]).ljust(64, b"\0")  # sname
    loop[108:236] = bytes([52, 1, 3, 53, 1, 3, 255]).ljust(128, b"\0")  # file
    cases.append(bytes(loop))
    unterminated = bytearray(header + MAGIC + bytes([53, 1, 1, 52, 1, 1, 255]))
    unterminated[108:236] = bytes([60, 200]) + b"X" * 126  # an option running off the end of the file area
    cases.append(bytes(unterminated))
    # Header fields: non-Ethernet hardware, odd lengths, replies sent to the server, bad addresses.
    for fields in (
        {"htype": 6},
        {"htype": 0},
        {"hlen": 0},
        {"hlen": 16},
        {"hlen": 255},
        {"op": 2},
        {"op": 0},
        {"giaddr": "255.255.255.255"},
        {"giaddr": "127.0.0.1"},
        {"ciaddr": "255.255.255.255"},
    ):
        cases.append(bootp(mac, DISCOVER, xid, pxe_options(0), **fields))
    for bad_mac in ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"):
        cases.append(bootp(bad_mac, DISCOVER, xid, pxe_options(0)))
    # Oversize: > 1500 bytes (sent as IP fragments), also as a DISCOVER that is otherwise valid.
    cases.append(bootp(mac, DISCOVER, xid, [*pxe_options(0)] + [(224, bytes(250))] * 8))
    cases.append(bootp(mac, DISCOVER, xid, [(224, bytes(255))] * 30))
    cases.append(os.urandom(3000))
    # A RELEASE, REQUEST and INFORM that name addresses of the pool but come from strangers.
    for number in range(3):
        stranger = random_mac()
        address = socket.inet_aton(f"{SUBNET}.{100 + number}")
        cases.append(
            bootp(stranger, RELEASE, xid, [(54, socket.inet_aton(SERVER_IP))], ciaddr=f"{SUBNET}.{100 + number}")
        )
        cases.append(bootp(stranger, REQUEST, xid, [(50, address), (54, socket.inet_aton(SERVER_IP))]))
        cases.append(bootp(stranger, INFORM, xid, [], ciaddr=f"{SUBNET}.{100 + number}"))
    return cases


def fuzzed(rng: random.Random, count: int) -> list[bytes]:
    """scapy fuzz(): random BOOTP header fields around a message type, random option bytes, random bytes."""
    random.seed(rng.getrandbits(64))  # scapy's Rand* values come from the random module
    packets = []
    for number in range(count):
        kind = number % 4
        if kind == 0:
            message = fuzz(BOOTP() / DHCP(options=[("message-type", rng.choice(MESSAGE_TYPES)), "end"]))
        elif kind == 1:
            message = fuzz(BOOTP(op=1, htype=1, hlen=6) / DHCP())  # random option bytes
        elif kind == 2:
            message = BOOTP(op=1, chaddr=bytes.fromhex("0200000000fe")) / fuzz(DHCP())
        else:
            packets.append(os.urandom(rng.randrange(0, 700)))
            continue
        data = raw(message)
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data) + 1)]  # cut anywhere
        packets.append(data)
    return packets


def total_dropped(counters: dict[str, int]) -> int:
    """The server's count of dropped (malformed) packets: a ``dropped`` total or its parts."""
    if "dropped" in counters:
        return counters["dropped"]
    return sum(value for name, value in counters.items() if name.startswith("dropped") or name.startswith("drop_"))


def test_malformed_packets_leave_the_server_serving_and_the_pool_consistent(lab: DhcpLab) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = lab.server()
    owner_host = lab.host()
    owner = lab.udhcpc(owner_host, pxe=True, once=False)
    address = owner.wait_event("bound")["ip"]
    before = total_dropped(dhcp_counters(server))

    fuzzer = lab.host(ip=FUZZER_IP)
    packets = corner_cases(rng) + fuzzed(rng, RANDOM_COUNT)
    rng.shuffle(packets)
    destinations = [(packet, SERVER_IP if rng.random() < 0.5 else "255.255.255.255") for packet in packets]
    sent = lab.send_all(fuzzer, destinations)
    assert sent == len(packets)
    context = f"(seed {seed}, {sent} packets)"

    counted = wait_until(
        lambda: total_dropped(dhcp_counters(server)) > before and dhcp_counters(server),
        20,
        f"/health to count dropped packets {context}",
        lambda: f"components.dhcp: {dhcp_component(server)}\n{lab.details()}",
    )
    assert total_dropped(counted) - before >= 20, f"only {total_dropped(counted) - before} drops counted: {counted}"
    assert server.process is not None and server.process.poll() is None, f"the server died {context}"
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", f"{context}: {health.text}"
    assert dhcp_component(server).get("state") == "ok"

    # Still serving: the existing lease renews unchanged, a new client gets a lease.
    assert owner.renew()["ip"] == address, context
    newcomer_host = lab.host()
    newcomer = lab.udhcpc(newcomer_host).lease()
    assert ip_address(POOL_START) <= ip_address(newcomer) <= ip_address(POOL_END) and newcomer != address
    bound = bound_leases(server)
    assert bound.get(address) == owner_host.id and bound.get(newcomer) == newcomer_host.id, f"{context}: {bound}"
    assert_pool_consistent(server)
