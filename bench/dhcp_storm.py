"""DHCP boot-storm benchmark: N simulated PXE clients doing full DORA against NodeFoundry and dnsmasq.

Run: ``.venv/bin/python bench/dhcp_storm.py [--clients 1000,10000] [--servers nodefoundry,dnsmasq]`` (as root)

For every (clients, server) pair the benchmark creates two fresh network namespaces joined by a veth pair,
starts the server in one (a fresh database or lease file each time) and runs the client simulator from the
other. The simulator is one thread, one selector and one UDP socket bound to 0.0.0.0:68 on the client end of
the veth (the servers broadcast their replies to 255.255.255.255:68, so all clients share the socket and are
told apart by xid and chaddr). Packets are built and parsed with ``struct`` from a fixed BOOTP template, so
the simulator costs little CPU beside the server under test on a small machine.

Each client behaves like PXE firmware: DISCOVER, then REQUEST (option 54 = the offering server, option 50 =
the offered address) for the first OFFER; an unanswered DISCOVER or REQUEST is sent again after
``--retransmit`` seconds, up to ``--tries`` times per phase, after which the client counts as lost; a NAK
restarts it at DISCOVER. Clients arrive at ``--rate`` per second, with at most ``--outstanding`` of them
between their first DISCOVER and their ACK (a storm as it reaches a server through a power-on ramp); a storm
never runs longer than ``--max-seconds``.

After a NodeFoundry storm the benchmark reads ``dhcp_leases`` read-only and checks that the bound leases are
exactly the (address, MAC) pairs the clients were ACKed; after a dnsmasq storm it checks the lease file alike.
Prints one markdown table; namespaces, processes and the temporary directory are always removed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.netns; bench/ itself is on sys.path as the script's directory

from common import (  # noqa: E402
    CPUS,
    DISTURBED_SHARE,
    CpuUse,
    cpu_meter,
    cpu_model,
    log,
    markdown_table,
    stop_process,
)

from tests.netns import Namespace, namespaces, run_in, veth  # noqa: E402

BIN = Path(sys.executable).parent
SERVER_BIN = BIN / "nodefoundry-server"

# The network of the storm: a /16, the server at .0.1, the pool leaves 10.200.0.0/24 free.
SERVER_CIDR = "10.200.0.1/16"
POOL_START = "10.200.1.0"
POOL_END = "10.200.60.255"
NETMASK = "255.255.0.0"
LEASE_SECONDS = 3600
PROBE_MAC = "02fffffffffe"  # the start-up probe; storm clients are 02:<run>:<index>, run < 255

# Targets for NodeFoundry (issue 3).
DORA_RATE_MIN = 1000.0

# --- BOOTP / DHCP wire format -------------------------------------------------------------------------------------

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr(16) sname(64) file(128) cookie
BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
MAGIC_COOKIE = 0x63825363
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
BROADCAST_FLAG = 0x8000  # PXE ROMs ask for broadcast replies: the client has no address yet
PXE_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PARAMETER_REQUEST = bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59, 60,
                           66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135])  # fmt: skip
HEADER_SIZE = BOOTP.size  # 240, options follow
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32  # Linux; not in Python's socket module


def option(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


def pxe_options(mac: bytes) -> bytes:
    """What a BIOS PXE ROM sends besides the message type: max size, arch, NII, UUID, vendor class, PRL."""
    return (
        option(57, struct.pack("!H", 1260))
        + option(93, b"\x00\x00")
        + option(94, b"\x01\x02\x01")
        + option(97, b"\x00" + mac + bytes(10))
        + option(60, PXE_VENDOR_CLASS)
        + option(55, PARAMETER_REQUEST)
    )


def dhcp_packet(message_type: int, xid: int, mac: bytes, extra: bytes = b"", secs: int = 0) -> bytes:
    header = BOOTP.pack(1, 1, 6, 0, xid, secs, BROADCAST_FLAG, bytes(4), bytes(4), bytes(4), bytes(4),
                        mac + bytes(10), bytes(64), bytes(128), MAGIC_COOKIE)  # fmt: skip
    options = option(53, bytes([message_type])) + extra + pxe_options(mac) + b"\xff"
    return header + options


def parse_reply(data: bytes) -> tuple[int, bytes, int, bytes, bytes] | None:
    """(xid, chaddr, message type, yiaddr, server id) of a BOOTREPLY, or None for anything else."""
    if len(data) < HEADER_SIZE + 3 or data[0] != 2 or data[236:240] != b"\x63\x82\x53\x63":
        return None
    xid = int.from_bytes(data[4:8], "big")
    yiaddr = data[16:20]
    chaddr = data[28:34]
    message_type = 0
    server_id = data[20:24]  # siaddr, when option 54 is missing
    i, end = HEADER_SIZE, len(data)
    while i < end:
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = data[i + 1]
        if code == 53 and length >= 1:
            message_type = data[i + 2]
        elif code == 54 and length == 4:
            server_id = data[i + 2 : i + 6]
        i += 2 + length
    return xid, chaddr, message_type, yiaddr, server_id


def mac_bytes(run: int, index: int) -> bytes:
    """Locally administered and unique per client: 02:<run>:<index, 4 bytes>."""
    return bytes([0x02, run & 0xFF]) + index.to_bytes(4, "big")


def mac_text(mac: bytes) -> str:
    """The store's form: 12 lower-case hex digits."""
    return mac.hex()


# --- the clients' socket ------------------------------------------------------------------------------------------


def client_socket(namespace: Namespace, interface: str) -> socket.socket:
    """The one socket of all simulated clients, made inside the client namespace (where it stays)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        # Replies arrive in bursts; the client must not be the one dropping them (root: the FORCE variants).
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
        sock.bind(("0.0.0.0", 68))
        sock.setblocking(False)
        return sock

    return run_in(namespace.name, make)


def udp_counters(namespace: Namespace) -> dict[str, int]:
    """The namespace's UDP counters from /proc/net/snmp (InDatagrams, RcvbufErrors, ...)."""
    text = namespace.run("cat", "/proc/net/snmp", timeout=10).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(rows[0], rows[1], strict=True)}


# --- the client simulator -----------------------------------------------------------------------------------------

PENDING, SELECTING, REQUESTING, BOUND, LOST = range(5)


@dataclass
class StormResult:
    clients: int
    leased: int = 0
    lost: int = 0
    lost_no_offer: int = 0
    lost_no_ack: int = 0
    unfinished: int = 0  # still mid-DORA (or never started) at the hard stop; included in lost
    seconds: float = 0.0  # first DISCOVER sent .. last ACK received
    seconds_99: float = 0.0  # first DISCOVER sent .. the ACK that made 99 % of the clients leased
    dora_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    duplicates: int = 0  # addresses ACKed to more than one MAC
    naks: int = 0
    retransmits: int = 0
    retransmits_discover: int = 0
    retransmits_request: int = 0
    offers: int = 0
    extra_offers: int = 0  # OFFERs to a client that already requested (answers to a retransmit, ...)
    extra_acks: int = 0  # ACKs to a client that is already bound (answers to a retransmitted REQUEST)
    changed_acks: int = 0  # extra ACKs naming another address than the first ACK
    foreign: int = 0  # replies matching no client of this storm, or no step of it
    late: int = 0  # replies to a client already given up as lost
    acked_other_than_offered: int = 0
    acks: dict[str, str] = field(default_factory=dict, repr=False)  # mac -> address of its (first) ACK


class Storm:
    """All clients of one storm, in flat lists indexed by client number (cheap in CPU and memory)."""

    def __init__(
        self,
        sock: socket.socket,
        count: int,
        run: int,
        rate: float,
        outstanding: int,
        retransmit: float,
        tries: int,
        max_seconds: float,
    ) -> None:
        self.sock = sock
        self.count = count
        self.rate = rate
        self.outstanding_max = outstanding
        self.retransmit = retransmit
        self.tries = tries
        self.max_seconds = max_seconds
        self.xid_base = random.getrandbits(32)
        self.macs = [mac_bytes(run, i) for i in range(count)]
        self.state = [PENDING] * count
        self.generation = [0] * count  # invalidates timers of an earlier step
        self.sends = [0] * count  # sends in the current phase
        self.restarts = [0] * count  # NAK restarts
        self.started = [0.0] * count
        self.finished = [0.0] * count
        self.offered = [b""] * count
        self.server_id = [b""] * count
        self.timers: deque[tuple[float, int, int]] = deque()  # one delay for all, so appends stay sorted
        self.result = StormResult(clients=count)
        self.acked_by_address: dict[bytes, set[bytes]] = {}
        self.acked: list[bytes | None] = [None] * count
        self.active = 0
        self.next_client = 0
        self.closed = 0
        self.destination = ("255.255.255.255", 67)

    # packets

    def xid(self, index: int) -> int:
        return (self.xid_base + index) & 0xFFFFFFFF

    def send(self, index: int, now: float, message_type: int) -> None:
        extra = option(54, self.server_id[index]) + option(50, self.offered[index]) if message_type == REQUEST else b""
        secs = min(int(now - self.started[index]), 0xFFFF)  # seconds since the client began, as RFC 2131 asks
        packet = dhcp_packet(message_type, self.xid(index), self.macs[index], extra, secs=secs)
        # A full send queue loses the packet, like a busy wire; the retransmit timer covers it.
        with suppress(BlockingIOError):
            self.sock.sendto(packet, self.destination)
        self.sends[index] += 1
        self.generation[index] += 1
        self.timers.append((now + self.retransmit, index, self.generation[index]))

    # client steps

    def open(self, index: int, now: float) -> None:
        self.started[index] = now
        self.state[index] = SELECTING
        self.active += 1
        self.send(index, now, DISCOVER)

    def close(self, index: int, state: int, now: float) -> None:
        self.state[index] = state
        self.finished[index] = now
        self.generation[index] += 1
        self.active -= 1
        self.closed += 1

    def on_timer(self, index: int, now: float) -> None:
        state = self.state[index]
        if self.sends[index] < self.tries:
            self.result.retransmits += 1
            if state == SELECTING:
                self.result.retransmits_discover += 1
                self.send(index, now, DISCOVER)
            else:
                self.result.retransmits_request += 1
                self.send(index, now, REQUEST)
            return
        if state == SELECTING:
            self.result.lost_no_offer += 1
        else:
            self.result.lost_no_ack += 1
        self.close(index, LOST, now)

    def on_reply(self, data: bytes, now: float) -> None:
        parsed = parse_reply(data)
        if parsed is None:
            self.result.foreign += 1
            return
        xid, chaddr, message_type, yiaddr, server_id = parsed
        index = (xid - self.xid_base) & 0xFFFFFFFF
        if index >= self.count or chaddr != self.macs[index]:
            self.result.foreign += 1
            return
        state = self.state[index]
        if state == LOST:
            self.result.late += 1
            if message_type == ACK:
                self.acked_by_address.setdefault(yiaddr, set()).add(chaddr)
            return
        if message_type == OFFER:
            self.result.offers += 1
            if state != SELECTING:
                self.result.extra_offers += 1
                return
            self.offered[index] = yiaddr
            self.server_id[index] = server_id
            self.state[index] = REQUESTING
            self.sends[index] = 0
            self.send(index, now, REQUEST)
        elif message_type == ACK:
            self.acked_by_address.setdefault(yiaddr, set()).add(chaddr)
            if state == BOUND:
                self.result.extra_acks += 1
                if yiaddr != self.acked[index]:
                    self.result.changed_acks += 1
                return
            if state != REQUESTING:
                self.result.foreign += 1
                return
            if yiaddr != self.offered[index]:
                self.result.acked_other_than_offered += 1
            self.acked[index] = yiaddr
            self.close(index, BOUND, now)
        elif message_type == NAK:
            self.result.naks += 1
            if state != REQUESTING:
                return
            if self.restarts[index] >= self.tries:
                self.result.lost_no_ack += 1
                self.close(index, LOST, now)
                return
            self.restarts[index] += 1
            self.state[index] = SELECTING
            self.sends[index] = 0
            self.send(index, now, DISCOVER)
        else:
            self.result.foreign += 1

    # the loop

    def run(self) -> StormResult:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        clock = time.monotonic
        began = clock()
        hard_stop = began + self.max_seconds
        spacing = 1.0 / self.rate if self.rate > 0 else 0.0
        timers = self.timers
        recv = self.sock.recv
        try:
            while self.closed < self.count:
                now = clock()
                if now >= hard_stop:
                    break
                # arrivals: on schedule, as long as the outstanding cap allows
                while (
                    self.next_client < self.count
                    and self.active < self.outstanding_max
                    and began + self.next_client * spacing <= now
                ):
                    self.open(self.next_client, now)
                    self.next_client += 1
                # retransmit timers that are due
                while timers and timers[0][0] <= now:
                    _, index, generation = timers.popleft()
                    if generation == self.generation[index]:
                        self.on_timer(index, now)
                # sleep until the next arrival, timer or reply
                wake = hard_stop
                if timers:
                    wake = min(wake, timers[0][0])
                if self.next_client < self.count and self.active < self.outstanding_max:
                    wake = min(wake, began + self.next_client * spacing)
                if selector.select(max(0.0, wake - clock())):
                    for _ in range(256):  # then arrivals and timers get their turn again
                        try:
                            data = recv(2048)
                        except BlockingIOError:
                            break
                        self.on_reply(data, clock())
        finally:
            selector.close()
        return self.summarise(began)

    def summarise(self, began: float) -> StormResult:
        result = self.result
        unfinished = [i for i in range(self.count) if self.state[i] not in (BOUND, LOST)]
        result.unfinished = len(unfinished)
        bound = [i for i in range(self.count) if self.state[i] == BOUND]
        result.leased = len(bound)
        result.lost = self.count - result.leased
        latencies = sorted((self.finished[i] - self.started[i]) * 1000 for i in bound)
        if latencies:
            result.p50_ms = percentile(latencies, 50)
            result.p90_ms = percentile(latencies, 90)
            result.p99_ms = percentile(latencies, 99)
            result.max_ms = latencies[-1]
            first = min(self.started[i] for i in range(self.count) if self.started[i])
            result.seconds = max(self.finished[i] for i in bound) - first
            result.dora_per_s = result.leased / result.seconds if result.seconds > 0 else 0.0
            done = sorted(self.finished[i] for i in bound)
            if len(done) >= -(-self.count * 99 // 100):
                result.seconds_99 = done[-(-self.count * 99 // 100) - 1] - first
        result.duplicates = sum(1 for macs in self.acked_by_address.values() if len(macs) > 1)
        result.acks = {mac_text(self.macs[i]): socket.inet_ntoa(self.acked[i]) for i in bound}  # type: ignore[arg-type]
        log(f"storm done in {time.monotonic() - began:.1f} s: {result.leased} leased, {result.lost} lost")
        return result


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def probe(sock: socket.socket, deadline: float, is_alive: Callable[[], bool], describe: Callable[[], str]) -> float:
    """Send a PXE DISCOVER every 0.5 s until an OFFER comes back; returns seconds waited.
    The probe never requests, so it holds no lease; its MAC is left out of every count."""
    mac = bytes.fromhex(PROBE_MAC)
    xid = random.getrandbits(32)
    began = time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not is_alive():
                raise RuntimeError(f"the server exited before it answered DHCP:\n{describe()}")
            with suppress(BlockingIOError):
                sock.sendto(dhcp_packet(DISCOVER, xid, mac), ("255.255.255.255", 67))
            until = time.monotonic() + 0.5
            while (left := until - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                with suppress(BlockingIOError):
                    while True:
                        parsed = parse_reply(sock.recv(2048))
                        if parsed and parsed[0] == xid and parsed[2] == OFFER:
                            drain(sock)
                            return time.monotonic() - began
    finally:
        selector.close()
    raise RuntimeError(f"no OFFER for a probe DISCOVER within the start-up time:\n{describe()}")


def drain(sock: socket.socket) -> None:
    time.sleep(0.2)
    with suppress(BlockingIOError):
        while True:
            sock.recv(2048)


# --- the servers under test ---------------------------------------------------------------------------------------


class DhcpServer:
    name = ""

    def __init__(self, workdir: Path, namespace: Namespace, interface: str) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.interface = interface
        self.logfile = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.process = self.namespace.popen(
                *self.command(),
                cwd=self.workdir,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def describe(self) -> str:
        status = "running" if self.alive() else f"exited with {self.process.returncode if self.process else '?'}"
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return f"{self.name} {status}; log tail:\n" + "\n".join(text.splitlines()[-40:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid  # `ip netns exec` execs the server: same pid

    def stop(self) -> None:
        stop_process(self.process, self.name)

    def leases(self) -> dict[str, str] | None:
        """mac -> address of every bound lease the server recorded (None: it records none)."""
        raise NotImplementedError

    def version(self) -> str:
        return ""


class NodeFoundry(DhcpServer):
    name = "nodefoundry"

    def __init__(self, workdir: Path, namespace: Namespace, interface: str) -> None:
        super().__init__(workdir, namespace, interface)
        self.db_path = workdir / "data" / "nodes.db"

    def command(self) -> list[str]:
        return [str(SERVER_BIN), "run"]

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("NF_")}
        env.update(
            NF_HTTP_ADDR="127.0.0.1:8080",  # loopback of the server's own namespace
            NF_DB_PATH=str(self.db_path),
            NF_ASSETS_DIR=str(self.workdir / "data" / "assets"),
            NF_API_TOKEN="nf_bench-" + secrets.token_urlsafe(16),
            NF_DHCP_INTERFACE=self.interface,
            NF_DHCP_IP_POOL_START=POOL_START,
            NF_DHCP_IP_POOL_END=POOL_END,
            NF_DHCP_NETMASK=NETMASK,
            NF_DHCP_LEASE_TIME=str(LEASE_SECONDS),
            NF_LOG_LEVEL="warning",
        )
        return env

    def leases(self) -> dict[str, str]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT mac, ip FROM dhcp_leases WHERE state = 'bound'").fetchall()
        finally:
            conn.close()
        found: dict[str, str] = {}
        for mac, address in rows:
            if mac in found:
                found[mac] += "," + address  # a MAC with two bound leases shows up as a mismatch
            else:
                found[mac] = address
        return found

    def nodes(self) -> int:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute("SELECT count(*) FROM nodes WHERE mac != ?", (PROBE_MAC,)).fetchone()[0]
        finally:
            conn.close()

    def version(self) -> str:
        done = subprocess.run([str(SERVER_BIN), "version"], capture_output=True, text=True, check=False)
        return f"nodefoundry-server {done.stdout.strip()}" if done.returncode == 0 else "?"


class Dnsmasq(DhcpServer):
    name = "dnsmasq"

    def __init__(self, workdir: Path, namespace: Namespace, interface: str) -> None:
        super().__init__(workdir, namespace, interface)
        self.leasefile = workdir / "dnsmasq.leases"

    def command(self) -> list[str]:
        return [
            "dnsmasq",
            "--no-daemon",
            "--port=0",  # no DNS
            "--conf-file=/dev/null",
            f"--dhcp-range={POOL_START},{POOL_END},{NETMASK},{LEASE_SECONDS}",
            "--dhcp-lease-max=20000",
            f"--dhcp-leasefile={self.leasefile}",
            f"--interface={self.interface}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            "--dhcp-authoritative",  # answer at once, no waiting for another server's say
            "--no-ping",  # no ICMP probe (and its wait) before each offer
            "--quiet-dhcp",  # no log line per packet
            "--user=root",  # the temporary directory (lease file) is root's 0700
        ]

    def leases(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in self.leasefile.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] != "duid":
                mac = parts[1].replace(":", "").lower()
                found[mac] = found[mac] + "," + parts[2] if mac in found else parts[2]
        return found

    def version(self) -> str:
        done = subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True, check=False)
        return done.stdout.split("  ")[0].strip() if done.stdout else "?"


class DnsmasqNoLeaseFile(Dnsmasq):
    """dnsmasq keeping its leases in memory only (--leasefile-ro): the DHCP packet path without the lease
    file, which dnsmasq rewrites whole (and fsyncs) for every new lease. Not durable: a reference only."""

    name = "dnsmasq-ro"

    def command(self) -> list[str]:
        return [arg for arg in super().command() if not arg.startswith("--dhcp-leasefile=")] + ["--leasefile-ro"]

    def leases(self) -> dict[str, str] | None:
        return None


SERVERS = {"nodefoundry": NodeFoundry, "dnsmasq": Dnsmasq, "dnsmasq-ro": DnsmasqNoLeaseFile}
DEFAULT_SERVERS = ["nodefoundry", "dnsmasq"]


# --- one storm ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    clients: int
    result: StormResult
    cpu: CpuUse
    startup_s: float
    store_check: str
    store_ok: bool | None
    server_udp: dict[str, int]
    client_udp: dict[str, int]
    version: str
    extra: dict[str, int] = field(default_factory=dict)


def counters_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def check_store(recorded: dict[str, str] | None, acked: dict[str, str], probe_mac: str) -> tuple[str, bool | None]:
    """Compare the server's bound leases with the ACKs the clients saw."""
    if recorded is None:
        return "no lease store (not checked)", None
    recorded = {mac: address for mac, address in recorded.items() if mac != probe_mac}
    missing = [mac for mac in acked if mac not in recorded]
    extra = [mac for mac in recorded if mac not in acked]
    differ = [mac for mac in acked if mac in recorded and recorded[mac] != acked[mac]]
    addresses = [address for value in recorded.values() for address in value.split(",")]
    shared = len(addresses) - len(set(addresses))
    ok = not (missing or extra or differ or shared)
    text = (
        f"{len(recorded):,} bound leases"
        + (" = the ACKs" if ok else "")
        + (f", {len(missing)} ACKed but not recorded" if missing else "")
        + (f", {len(extra)} recorded but never ACKed" if extra else "")
        + (f", {len(differ)} with another address than ACKed" if differ else "")
        + (f", {shared} addresses on two MACs" if shared else "")
    )
    return text, ok


def run_storm(kind: str, count: int, run_number: int, args: argparse.Namespace, workroot: Path) -> Run:
    workdir = workroot / f"{kind}-{count}"
    workdir.mkdir()
    with namespaces("nfsrv", "nfcli") as (server_ns, client_ns):
        server_if, client_if = veth(server_ns, client_ns)
        server_ns.address(server_if, SERVER_CIDR)
        # The client end has no address, like a booting node; accept the server's broadcasts from 10.200.0.1.
        for name in ("all", "default", client_if):
            client_ns.run("sysctl", "-qw", f"net.ipv4.conf.{name}.rp_filter=0")
        server = SERVERS[kind](workdir, server_ns, server_if)
        sock = client_socket(client_ns, client_if)
        try:
            log(f"{kind}: starting for {count:,} clients")
            server.start()
            startup = probe(sock, time.monotonic() + args.startup_timeout, server.alive, server.describe)
            log(f"{kind}: answered a probe DISCOVER after {startup:.1f} s; storm of {count:,} clients")
            server_before, client_before = udp_counters(server_ns), udp_counters(client_ns)
            storm = Storm(
                sock, count, run_number, args.rate, args.outstanding, args.retransmit, args.tries, args.max_seconds
            )
            cpu = CpuUse()
            with cpu_meter(cpu, server.pid):
                result = storm.run()
            server_udp = counters_delta(udp_counters(server_ns), server_before)
            client_udp = counters_delta(udp_counters(client_ns), client_before)
            if not server.alive():
                raise RuntimeError(f"the server died during the storm:\n{server.describe()}")
            extra: dict[str, int] = {}
            if isinstance(server, Dnsmasq):
                server.stop()  # the lease file is complete once dnsmasq has exited
                recorded = server.leases()
            else:
                recorded = server.leases()  # while it runs: an ACK promises a lease already durable
                extra["nodes"] = server.nodes()
            store_check, store_ok = check_store(recorded, result.acks, PROBE_MAC)
            return Run(
                kind,
                count,
                result,
                cpu,
                startup,
                store_check,
                store_ok,
                server_udp,
                client_udp,
                server.version(),
                extra,
            )
        finally:
            sock.close()
            server.stop()


# --- report -------------------------------------------------------------------------------------------------------


def nodefoundry_passed(run: Run) -> bool:
    r = run.result
    return r.leased == r.clients and r.lost == 0 and r.duplicates == 0 and r.dora_per_s >= DORA_RATE_MIN


STORE_CELL = {True: "= ACKs", False: "**differ**", None: "—"}


def table(runs: list[Run]) -> str:
    reference = {run.clients: run.result.dora_per_s for run in runs if run.server == "dnsmasq"}
    head = ["server", "clients", "leased", "lost", "DORA/s", "p50 ms", "p99 ms", "NAKs", "retransmits",
            "duplicate addresses", "leases recorded", "NodeFoundry / dnsmasq", "target"]  # fmt: skip
    rows = []
    for run in runs:
        r = run.result
        ratio, target = "—", "—"
        if run.server == "nodefoundry":
            if reference.get(run.clients):
                ratio = f"{r.dora_per_s / reference[run.clients]:.0%}"
            target = "pass" if nodefoundry_passed(run) else "**FAIL**"
        rows.append([run.server, f"{r.clients:,}", f"{r.leased:,}", f"{r.lost:,}", f"{r.dora_per_s:,.0f}",
                     f"{r.p50_ms:,.0f}", f"{r.p99_ms:,.0f}", f"{r.naks:,}", f"{r.retransmits:,}", f"{r.duplicates:,}",
                     STORE_CELL[run.store_ok], ratio, target])  # fmt: skip
    return markdown_table(head, rows)


def notes(run: Run) -> str:
    r, cpu = run.result, run.cpu

    def share(value: float) -> str:
        return f"{value / cpu.seconds / CPUS:.0%}" if cpu.seconds else "?"

    parts = [
        f"{run.server}, {r.clients:,} clients: {r.leased:,} leased in {r.seconds:.2f} s"
        + (f" (99 % of the clients in {r.seconds_99:.2f} s)" if r.seconds_99 else ""),
        f"latency p50 {r.p50_ms:.0f} / p90 {r.p90_ms:.0f} / p99 {r.p99_ms:.0f} / max {r.max_ms:.0f} ms",
        f"lost {r.lost} (no OFFER {r.lost_no_offer}, no ACK {r.lost_no_ack}, unfinished at hard stop {r.unfinished})",
        f"retransmits {r.retransmits} (DISCOVER {r.retransmits_discover}, REQUEST {r.retransmits_request})",
        f"OFFERs {r.offers:,} (extra {r.extra_offers}), extra ACKs {r.extra_acks} (other address {r.changed_acks}),"
        f" ACK ≠ offer {r.acked_other_than_offered}, replies to lost clients {r.late}, unmatched replies {r.foreign}",
        f"server UDP: in {run.server_udp.get('InDatagrams', 0):,}, receive-buffer drops"
        f" {run.server_udp.get('RcvbufErrors', 0):,}; client UDP: in {run.client_udp.get('InDatagrams', 0):,},"
        f" drops {run.client_udp.get('RcvbufErrors', 0):,}",
        f"store: {run.store_check}" + (f", {run.extra['nodes']:,} nodes registered" if "nodes" in run.extra else ""),
        f"CPU over {CPUS} CPUs during the storm: server {share(cpu.server)}, client simulator {share(cpu.client)},"
        f" **other processes {share(cpu.other)}**",
        f"server CPU per DORA {cpu.server / r.leased * 1e6:.0f} µs" if r.leased else "no DORA completed",
        f"first probe answered {run.startup_s:.1f} s after start",
    ]
    if cpu.seconds and cpu.other_share(CPUS) > DISTURBED_SHARE:
        parts.append(
            f"**warning**: other processes used {cpu.other_share(CPUS):.0%} of the machine during this storm; its"
            " figures understate what the server does on a machine of its own"
        )
    return "; ".join(parts)


# --- main ---------------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(item.replace("_", "")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("expected positive numbers")
    return values


def server_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"servers are {', '.join(SERVERS)}; got {text!r}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int_list, default=[1000, 10000], help="storm sizes (default 1000,10000)")
    parser.add_argument(
        "--servers",
        type=server_list,
        default=DEFAULT_SERVERS,
        help="any of nodefoundry,dnsmasq,dnsmasq-ro (default nodefoundry,dnsmasq)",
    )
    parser.add_argument("--retransmit", type=float, default=4.0, help="seconds before a resend (default 4, as PXE)")
    parser.add_argument("--tries", type=int, default=4, help="sends per DISCOVER/REQUEST phase (default 4)")
    parser.add_argument("--rate", type=float, default=10000, help="client arrivals per second (default 10000)")
    parser.add_argument("--outstanding", type=int, default=64, help="clients mid-DORA at most (default 64)")
    parser.add_argument("--max-seconds", type=float, default=180, help="hard stop of one storm (default 180)")
    parser.add_argument("--startup-timeout", type=float, default=60, help="seconds for a server to answer DHCP")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    if max(args.clients) > int(ipaddress.IPv4Address(POOL_END)) - int(ipaddress.IPv4Address(POOL_START)):
        parser.error(f"the pool {POOL_START}-{POOL_END} is too small for that many clients")
    if "nodefoundry" in args.servers and not SERVER_BIN.exists():
        parser.error(f"{SERVER_BIN} missing: run from the project venv (make setup)")
    if "dnsmasq" in args.servers and shutil.which("dnsmasq") is None:
        parser.error("dnsmasq is not installed (make setup installs dnsmasq-base)")
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    began = time.monotonic()
    runs: list[Run] = []
    failures: list[str] = []
    workroot = Path(tempfile.mkdtemp(prefix="nf-dhcp-storm-"))
    try:
        number = 0
        for count in args.clients:
            for kind in args.servers:
                number += 1
                try:
                    runs.append(run_storm(kind, count, number, args, workroot))
                    log(notes(runs[-1]))
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failures.append(f"{kind}, {count:,} clients: {exc}")
                    log(f"FAILED {failures[-1]}")
    finally:
        shutil.rmtree(workroot, ignore_errors=True)

    print(f"## DHCP boot storm: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    versions = sorted({f"{run.server}: {run.version}" for run in runs if run.version})
    print(
        f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()};"
        f" Python {platform.python_version()}; kernel {platform.release()}; " + "; ".join(versions)
    )
    print()
    print(
        f"Clients: PXE-like (option 60 PXEClient, 93, 94, 97), broadcast flag, retransmit after {args.retransmit:g} s,"
        f" {args.tries} tries per phase; arrivals {args.rate:,.0f}/s, at most {args.outstanding:,} mid-DORA;"
        f" pool {POOL_START}-{POOL_END}/{NETMASK}, lease {LEASE_SECONDS} s"
    )
    print()
    if runs:
        print(table(runs))
        print()
    for run in runs:
        print(f"- {notes(run)}")
    for failure in failures:
        print(f"- **failed**: {failure}")
    print(f"- total run time {time.monotonic() - began:.0f} s")
    if args.json:
        document = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "runs": [
                {
                    **{key: value for key, value in asdict(run).items() if key != "result"},
                    "result": {key: value for key, value in asdict(run.result).items() if key != "acks"},
                }
                for run in runs
            ],
            "failures": failures,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    passed = not failures and all(
        nodefoundry_passed(run) and run.store_ok for run in runs if run.server == "nodefoundry"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    with suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
