"""A DHCP lab for integration tests: real clients and the real server in network namespaces.

Layout (every namespace and interface name is unique per run; nothing touches the root
namespace except the loopback port through which the test reaches the server's API)::

    switch namespace: one bridge
      ├── veth ── server namespace   10.77.0.1/24   nodefoundry-server (DHCP on its veth)
      ├── veth ── client namespace   (one per client, own MAC: udhcpc, dhclient, the probe)
      ├── veth ── dnsmasq namespace  10.77.0.2/24   (ProxyDHCP tests: the site's DHCP server)
      └── veth ── relay namespace    10.77.0.3/24 ── veth ── client namespace  (10.78.0.0/24)

``probe`` is a small DHCP client of our own (raw packet socket, stdlib only) for what udhcpc
and dhclient cannot do: collect every reply to one DISCOVER, send INIT-REBOOT / foreign-server
REQUESTs, DECLINE, INFORM, PXE requests to port 4011, malformed packets. It runs on a thread
that entered the client's namespace, so its sockets live there.

``DhcpLab.close()`` stops the servers, kills every process it started and deletes every
namespace, whatever state a test left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import Server, fake_installer
from tests.netns import Namespace, bridge, run_in, veth
from tests.polling import wait_for

SUBNET = "10.77.0"
SERVER_IP = f"{SUBNET}.1"
PEER_IP = f"{SUBNET}.2"  # dnsmasq (ProxyDHCP tests), or "another DHCP server" in REQUESTs
RELAY_IP = f"{SUBNET}.3"
POOL_START, POOL_END = f"{SUBNET}.100", f"{SUBNET}.199"
NETMASK = "255.255.255.0"
GATEWAY = f"{SUBNET}.254"
DNS = ("10.77.0.53", "10.77.0.54")
LEASE_TIME = 600
RELAYED_SUBNET = "10.78.0"
RELAYED_POOL = (f"{RELAYED_SUBNET}.50", f"{RELAYED_SUBNET}.59")

PXE_BIOS_VENDOR = "PXEClient:Arch:00000:UNDI:002001"
UDHCPC_PXE = ("-V", PXE_BIOS_VENDOR, "-x", "0x5d:0000")
# Short retries everywhere: a client that gets no answer gives up within a few seconds.
UDHCPC_RETRIES = ("-t", "4", "-T", "1", "-A", "1")

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
MESSAGE_NAMES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE", 8: "INFORM"}
MAGIC = b"\x63\x82\x53\x63"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

# The script udhcpc (-s) and dhclient (-sf) run: it records each event (udhcpc: $1, dhclient:
# $reason) with its variables, and configures the address the way a real client's script would,
# so that unicast renewals and releases from the leased address work.
CLIENT_SCRIPT = """#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
event="${1:-$reason}"
case "$event" in
  bound|renew) address="$ip/$mask" gateway="${router%% *}" ;;
  BOUND|RENEW|REBIND|REBOOT) address="$new_ip_address/$new_subnet_mask" gateway="${new_routers%% *}" ;;
  deconfig|leasefail|nak|EXPIRE|FAIL|RELEASE|STOP) ip addr flush dev "$interface" ;;
esac
if [ -n "$address" ]; then
  ip addr replace "$address" dev "$interface"
  [ -z "$gateway" ] || ip route replace default via "$gateway" dev "$interface" onlink
fi
# Recorded after the address is in place: a test that reacts to the event can use it.
{
  echo "event=$event"
  env | grep -E '^(ip|subnet|mask|router|dns|serverid|lease|siaddr|boot_file|message|interface|reason)=' | sort
  env | grep -E '^(new_[a-z_]+|old_ip_address)=' | sort
  echo "--"
} >> "%(events)s"
exit 0
"""

# dhclient: short timers, so a failing exchange ends within seconds.
DHCLIENT_CONF = """timeout 20;
retry 60;
initial-interval 1;
backoff-cutoff 2;
select-timeout 0;
reboot 4;
request subnet-mask, broadcast-address, routers, domain-name-servers, dhcp-lease-time;
%(extra)s
"""


def sbin_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if p not in parts])


def random_mac() -> str:
    """A locally administered unicast MAC, colon form."""
    return "02:" + ":".join(f"{random.randrange(256):02x}" for _ in range(5))


def node_id(mac: str) -> str:
    return mac.replace(":", "").replace("-", "").lower()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, details: Callable[[], str] = str) -> Any:
    """The shared bounded poll; on timeout the AssertionError carries the lab's ``details()``."""
    return wait_for(predicate, timeout, what, interval=0.1, details=details)


# -- DHCP packets ---------------------------------------------------------------------------------


def opt(code: int, value: bytes | str | int | Iterable[str]) -> tuple[int, bytes]:
    """One option; str values are ASCII, int a single byte, a list/tuple of strings IPv4 addresses."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = bytes([value])
    elif isinstance(value, bytes):
        data = value
    else:
        data = b"".join(socket.inet_aton(address) for address in value)
    return code, data


def pxe_options(arch: int, vendor: str | None = None) -> list[tuple[int, bytes]]:
    """What a PXE ROM sends: option 60 PXEClient, 93 architecture, 94 UNDI version, 97 GUID."""
    vendor = vendor or f"PXEClient:Arch:{arch:05d}:UNDI:003016"
    guid = b"\x00" + bytes(range(1, 17))
    return [opt(60, vendor), (93, struct.pack("!H", arch)), (94, b"\x01\x03\x10"), (97, guid)]


def bootp(
    mac: str,
    msg_type: int | None,
    xid: int,
    options: Iterable[tuple[int, bytes]] = (),
    *,
    op: int = 1,
    htype: int = 1,
    hlen: int = 6,
    ciaddr: str = "0.0.0.0",
    yiaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    flags: int = 0,
    end: bool = True,
) -> bytes:
    """A BOOTP/DHCP message as bytes (option 53 first when ``msg_type`` is given)."""
    chaddr = bytes.fromhex(node_id(mac))
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        htype,
        hlen,
        0,
        xid,
        0,
        flags,
        socket.inet_aton(ciaddr),
        socket.inet_aton(yiaddr),
        socket.inet_aton("0.0.0.0"),
        socket.inet_aton(giaddr),
        chaddr.ljust(16, b"\0"),
        b"",
        b"",
    )
    body = b"" if msg_type is None else bytes([53, 1, msg_type])
    for code, data in options:
        body += bytes([code, len(data)]) + data
    return header + MAGIC + body + (b"\xff" if end else b"")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet_frame(src_mac: str, payload: bytes, src_ip: str = "0.0.0.0", dst_ip: str = "255.255.255.255") -> bytes:
    """Ethernet broadcast / IPv4 / UDP 68->67 around ``payload``, checksums filled in."""
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", 68, 67, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + udp_len, 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
    return b"\xff" * 6 + bytes.fromhex(node_id(src_mac)) + b"\x08\x00" + ip_header + udp


@dataclass
class Reply:
    """A BOOTP reply as seen on the wire by the client."""

    eth_src: str
    eth_dst: str
    ip_src: str
    ip_dst: str
    sport: int
    dport: int
    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: str
    sname: str
    file: str
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def type(self) -> int | None:
        value = self.options.get(53)
        return value[0] if value else None

    @property
    def type_name(self) -> str:
        return MESSAGE_NAMES.get(self.type or 0, str(self.type))

    def text(self, code: int) -> str | None:
        value = self.options.get(code)
        return None if value is None else value.rstrip(b"\0").decode("ascii", "replace")

    def addresses(self, code: int) -> list[str]:
        value = self.options.get(code, b"")
        return [socket.inet_ntoa(value[i : i + 4]) for i in range(0, len(value) - 3, 4)]

    def summary(self) -> str:
        opts = " ".join(f"{code}={value.hex()}" for code, value in sorted(self.options.items()))
        return (
            f"{self.type_name} {self.ip_src}:{self.sport}->{self.ip_dst}:{self.dport} (eth {self.eth_dst}) "
            f"yiaddr={self.yiaddr} siaddr={self.siaddr} giaddr={self.giaddr} file={self.file!r} "
            f"sname={self.sname!r} options: {opts}"
        )


def parse_reply(frame: bytes) -> Reply | None:
    """Ethernet/IPv4/UDP/BOOTP reply -> Reply; None for anything else."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != socket.IPPROTO_UDP:
        return None
    ip_src, ip_dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    udp = frame[14 + ihl :]
    sport, dport, length = struct.unpack("!HHH", udp[:6])
    data = udp[8:length]
    if len(data) < 240 or data[0] != 2 or data[236:240] != MAGIC:
        return None
    fields = struct.unpack("!BBBBIHH4s4s4s4s16s64s128s", data[:236])
    options: dict[int, bytes] = {}
    rest, i = data[240:], 0
    while i < len(rest) and rest[i] != 255:
        if rest[i] == 0:
            i += 1
            continue
        if i + 1 >= len(rest):
            break
        code, size = rest[i], rest[i + 1]
        options[code] = options.get(code, b"") + rest[i + 2 : i + 2 + size]
        i += 2 + size
    return Reply(
        eth_src=frame[6:12].hex(":"),
        eth_dst=frame[0:6].hex(":"),
        ip_src=ip_src,
        ip_dst=ip_dst,
        sport=sport,
        dport=dport,
        op=fields[0],
        xid=fields[4],
        flags=fields[6],
        ciaddr=socket.inet_ntoa(fields[7]),
        yiaddr=socket.inet_ntoa(fields[8]),
        siaddr=socket.inet_ntoa(fields[9]),
        giaddr=socket.inet_ntoa(fields[10]),
        chaddr=fields[11][:6].hex(":"),
        sname=fields[12].split(b"\0", 1)[0].decode("ascii", "replace"),
        file=fields[13].split(b"\0", 1)[0].decode("ascii", "replace"),
        options=options,
    )


def _exchange(
    iface: str,
    payload: bytes,
    src_mac: str,
    xid: int,
    wait: float,
    unicast: tuple[str, str, int] | None,
    first: bool,
    source: str,
) -> list[Reply]:
    """Runs inside the client's namespace: send one message, collect replies with ``xid``."""
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sender = None
    try:
        capture.bind((iface, 0))
        if unicast:  # (source ip, destination ip, destination port): an ordinary UDP socket from port 68
            source, destination, port = unicast
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sender.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            sender.bind((source, 68))
            sender.sendto(payload, (destination, port))
        else:
            capture.send(ethernet_frame(src_mac, payload, src_ip=source))
        replies: list[Reply] = []
        end = time.monotonic() + wait
        while (remaining := end - time.monotonic()) > 0:
            capture.settimeout(remaining)
            try:
                frame, address = capture.recvfrom(65535)
            except TimeoutError:
                break
            if address[2] == PACKET_OUTGOING:
                continue
            reply = parse_reply(frame)
            if reply and reply.xid == xid:
                replies.append(reply)
                if first:
                    break
        return replies
    finally:
        capture.close()
        if sender:
            sender.close()


def _send_all(iface: str, src: str, packets: list[tuple[bytes, str]], port: int = 67) -> int:
    """Runs inside a namespace: send each payload by UDP from ``src``:68 to its destination:67."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    sender.bind((src, 68))
    sent = 0
    try:
        for number, (payload, destination) in enumerate(packets):
            sender.sendto(payload, (destination, port))
            sent += 1
            if number % 50 == 49:
                time.sleep(0.01)  # pacing, so that the kernel's receive buffer is not what drops them
    finally:
        sender.close()
    return sent


# -- lab ------------------------------------------------------------------------------------------


@dataclass
class Host:
    """One end of the lab: a namespace with one interface (and MAC) on the segment."""

    ns: Namespace
    iface: str
    mac: str
    ip: str | None = None

    @property
    def id(self) -> str:
        return node_id(self.mac)


@dataclass
class Event:
    kind: str
    values: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values.get(key, "")


class ClientRecord:
    """The events file the client script appends to, parsed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self) -> list[Event]:
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        found = []
        # The script appends a block in several writes: only blocks closed by their "--" line are complete.
        for block in text.split("--\n")[:-1]:
            values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if "event" in values:
                found.append(Event(values.pop("event"), values))
        return found

    def of(self, *kinds: str) -> list[Event]:
        return [event for event in self.events() if event.kind in kinds]


class Udhcpc:
    """busybox udhcpc in a client namespace (foreground, its output in a log file)."""

    def __init__(self, lab: DhcpLab, host: Host, args: Iterable[str], once: bool) -> None:
        self.lab, self.host = lab, host
        tag = f"udhcpc-{host.id}-{len(lab.processes)}"
        self.record = ClientRecord(lab.workdir / f"{tag}.events")
        script = lab.client_script(self.record.path)
        command = ["udhcpc", "-f", "-i", host.iface, "-s", str(script), *UDHCPC_RETRIES]
        if once:
            command += ["-q", "-n"]
        self.log_path = lab.workdir / f"{tag}.log"
        self.process = lab.spawn(host.ns, [*command, *args], self.log_path)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def details(self) -> str:
        return f"--- udhcpc on {self.host.mac}:\n{self.output()}\nevents: {self.record.events()}\n{self.lab.details()}"

    def wait_exit(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"udhcpc did not exit within {timeout} s\n{self.details()}") from None

    def wait_event(self, kind: str, count: int = 1, timeout: float = 15) -> Event:
        """The ``count``-th event of ``kind`` (waits for it)."""
        events = wait_until(
            lambda: len(found := self.record.of(kind)) >= count and found,
            timeout,
            f"udhcpc event {kind!r} #{count} on {self.host.mac}",
            self.details,
        )
        return events[count - 1]

    def lease(self, timeout: float = 15) -> str:
        """One-shot (-q) client: wait for exit 0 and return the bound address."""
        code = self.wait_exit(timeout)
        bound = self.record.of("bound")
        assert code == 0 and bound, f"udhcpc got no lease (exit {code})\n{self.details()}"
        return bound[-1]["ip"]

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def renew(self, timeout: float = 15) -> Event:
        """SIGUSR1: a unicast REQUEST (RENEWING) to the server; returns the 'renew' event."""
        done = len(self.record.of("renew"))
        self.signal(signal.SIGUSR1)
        return self.wait_event("renew", done + 1, timeout)

    def release(self, timeout: float = 15) -> None:
        """SIGUSR2: DHCPRELEASE to the server, then the script's 'deconfig'."""
        done = len(self.record.of("deconfig"))
        self.signal(signal.SIGUSR2)
        self.wait_event("deconfig", done + 1, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.wait_exit(10)


class Dhclient:
    """ISC dhclient in a client namespace with its own lease, pid, config and script files."""

    def __init__(self, lab: DhcpLab, host: Host, config: str = "") -> None:
        self.lab, self.host = lab, host
        tag = f"dhclient-{host.id}"
        self.record = ClientRecord(lab.workdir / f"{tag}.events")
        self.lease_file = lab.workdir / f"{tag}.leases"
        self.pid_file = lab.workdir / f"{tag}.pid"
        self.conf = lab.workdir / f"{tag}.conf"
        self.conf.write_text(DHCLIENT_CONF % {"extra": config})
        self.script = lab.client_script(self.record.path)
        self.log_path = lab.workdir / f"{tag}.log"

    def _run(self, *args: str, timeout: float = 40) -> int:
        command = ["dhclient", "-4", "-v", "-cf", str(self.conf), "-lf", str(self.lease_file)]
        command += ["-pf", str(self.pid_file), "-sf", str(self.script), *args, self.host.iface]
        with self.log_path.open("a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            try:
                # dhclient forks a daemon once bound; it closes its output, so waiting for the
                # parent is enough. The daemon is killed with the namespace at the end.
                return subprocess.run(
                    self.host.ns.command(*command),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PATH": sbin_path()},
                    timeout=timeout,
                ).returncode
            except subprocess.TimeoutExpired:
                raise AssertionError(f"dhclient {' '.join(args)} hung\n{self.details()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def details(self) -> str:
        events = self.record.events()
        return f"--- dhclient on {self.host.mac}:\n{self.output()}\nevents: {events}\n{self.lab.details()}"

    def obtain(self) -> Event:
        """``dhclient -1``: get a lease (DISCOVER, or INIT-REBOOT from the lease file) and daemonise."""
        before = len(self.record.of("BOUND", "REBOOT"))
        code = self._run("-1")
        events = self.record.of("BOUND", "REBOOT")
        assert code == 0 and len(events) > before, f"dhclient -1 failed (exit {code})\n{self.details()}"
        return events[-1]

    def stop(self) -> None:
        """``dhclient -x``: stop the daemon without releasing."""
        self._run("-x")
        self._wait_daemon_gone()

    def release(self) -> None:
        """``dhclient -r``: DHCPRELEASE, stop the daemon."""
        code = self._run("-r")
        assert code == 0, f"dhclient -r failed (exit {code})\n{self.details()}"
        self._wait_daemon_gone()

    def _wait_daemon_gone(self) -> None:
        def gone() -> bool:
            try:
                os.kill(int(self.pid_file.read_text().split()[0]), 0)
            except (OSError, ValueError, IndexError):
                return True
            return False

        wait_until(gone, 10, "the dhclient daemon to stop", self.details)

    def forge_lease(self, address: str) -> None:
        """Make the lease file claim ``address`` (to make dhclient INIT-REBOOT for it)."""
        text = self.lease_file.read_text()
        text = re.sub(r"fixed-address [0-9.]+;", f"fixed-address {address};", text)
        self.lease_file.write_text(text)


class DhcpLab:
    """Namespaces, servers and clients of one test; ``close()`` undoes everything."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.namespaces: list[Namespace] = []
        self.processes: list[tuple[subprocess.Popen[bytes], Path | None]] = []
        self.servers: list[Server] = []

    def build(self) -> DhcpLab:
        """The switch and the server's namespace (separate from __init__ so close() covers a failure here)."""
        self.switch = self.namespace("nfsw")
        self.bridge = bridge(self.switch)
        self.server_host = self.host("nfsv", ip=SERVER_IP)
        return self

    # -- topology ---------------------------------------------------------------------------------

    def namespace(self, prefix: str) -> Namespace:
        ns = Namespace(prefix)
        self.namespaces.append(ns)
        return ns

    def host(self, prefix: str = "nfc", mac: str | None = None, ip: str | None = None) -> Host:
        """A new namespace whose interface is a port of the lab's switch."""
        ns = self.namespace(prefix)
        inner, outer = veth(ns, self.switch)
        self.switch.ip("link", "set", outer, "master", self.bridge)
        mac = mac or random_mac()
        ns.ip("link", "set", inner, "address", mac)
        if ip:
            ns.address(inner, f"{ip}/24")
        return Host(ns, inner, mac, ip)

    def relayed_client(self, mac: str | None = None) -> tuple[Host, Host]:
        """A relay namespace (dhcrelay between the switch and a second segment) and a client on
        that second segment. Returns (relay, client); the server gets a route to the segment."""
        relay = self.host("nfrl", ip=RELAY_IP)
        client_ns = self.namespace("nfrc")
        client_if, down_if = veth(client_ns, relay.ns)
        mac = mac or random_mac()
        client_ns.ip("link", "set", client_if, "address", mac)
        relay.ns.address(down_if, f"{RELAYED_SUBNET}.1/24")
        # The relay host is also the segment's router (the client script routes via the offered
        # gateway): unicast renewals and releases reach the server.
        relay.ns.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.server_host.ns.ip("route", "add", f"{RELAYED_SUBNET}.0/24", "via", RELAY_IP)
        log = self.workdir / "dhcrelay.log"
        command = ["dhcrelay", "-d", "-4", "-pf", str(self.workdir / "dhcrelay.pid")]
        self.spawn(relay.ns, [*command, "-id", down_if, "-iu", relay.iface, SERVER_IP], log)
        wait_until(
            lambda: log.exists() and log.read_text().count("Listening on") >= 2,
            10,
            "dhcrelay to listen on both interfaces",
            lambda: log.read_text() if log.exists() else "",
        )
        return relay, Host(client_ns, client_if, mac)

    def dnsmasq(self, host: Host, first: str, last: str) -> Path:
        """dnsmasq as the site's ordinary DHCP server on ``host``; returns its lease file."""
        leases = self.workdir / "dnsmasq.leases"
        log = self.workdir / "dnsmasq.log"
        self.spawn(
            host.ns,
            [
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                f"--interface={host.iface}",
                "--except-interface=lo",
                "--user=root",
                "--group=root",
                f"--dhcp-range={first},{last},{NETMASK},10m",
                f"--dhcp-option=6,{host.ip}",
                f"--dhcp-leasefile={leases}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                "--no-ping",  # no 3 s ICMP probe before each offer
                "--log-dhcp",
                f"--log-facility={log}",
            ],
            self.workdir / "dnsmasq.out",
        )
        wait_until(
            lambda: log.exists() and "DHCP, IP range" in log.read_text(),
            10,
            "dnsmasq to start",
            self.details,
        )
        return leases

    # -- processes --------------------------------------------------------------------------------

    def spawn(self, ns: Namespace, args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
        out: Any = log.open("ab") if log else subprocess.DEVNULL
        process = subprocess.Popen(
            ns.command(*args),
            cwd=self.workdir,
            env={**os.environ, "PATH": sbin_path()},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append((process, log))
        return process

    def client_script(self, events: Path) -> Path:
        path = events.with_suffix(".sh")
        path.write_text(CLIENT_SCRIPT % {"events": events})
        path.chmod(0o755)
        return path

    def udhcpc(self, host: Host, *args: str, pxe: bool = False, once: bool = True) -> Udhcpc:
        """Start udhcpc on ``host`` (PXE vendor class and option 93 when ``pxe``)."""
        return Udhcpc(self, host, [*(UDHCPC_PXE if pxe else ()), *args], once)

    def dhclient(self, host: Host, config: str = "") -> Dhclient:
        return Dhclient(self, host, config)

    def server(self, env: dict[str, str | None] | None = None, host: Host | None = None, start: bool = True) -> Server:
        """nodefoundry-server in the server namespace, DHCP on its lab interface.

        ``env`` overrides the lab's DHCP settings; a value of None removes a variable.
        """
        host = host or self.server_host
        workdir = self.workdir / f"server{len(self.servers)}"
        workdir.mkdir()
        settings: dict[str, str | None] = {
            "NF_DHCP_INTERFACE": host.iface,
            "NF_DHCP_IP_POOL_START": POOL_START,
            "NF_DHCP_IP_POOL_END": POOL_END,
            "NF_DHCP_NETMASK": NETMASK,
            "NF_DHCP_GATEWAY": GATEWAY,
            "NF_DHCP_DNS": ",".join(DNS),
            "NF_DHCP_LEASE_TIME": str(LEASE_TIME),
            "NF_LOG_LEVEL": "debug",
            **(env or {}),
        }
        server = Server(workdir, {k: v for k, v in settings.items() if v is not None}, netns=host.ns.name)
        for key in [key for key, value in settings.items() if value is None]:
            server.env.pop(key, None)
        server.env["PATH"] = sbin_path()
        fake_installer(server.assets_dir)
        self.servers.append(server)
        if start:
            self.start(server)
        return server

    def start(self, server: Server) -> Server:
        """Start (or restart) ``server`` and wait until its DHCP component reports ``ok``."""
        server.start()
        wait_until(
            lambda: dhcp_component(server).get("state") == "ok",
            20,
            "/health components.dhcp.state == 'ok'",
            lambda: f"health: {server.get('/health').text}\n{server.log_text()[-3000:]}",
        )
        return server

    # -- the probe ----------------------------------------------------------------------------------

    def exchange(
        self,
        host: Host,
        payload: bytes,
        xid: int,
        wait: float = 3.0,
        unicast: tuple[str, str, int] | None = None,
        first: bool = False,
        mac: str | None = None,
        source: str = "0.0.0.0",
    ) -> list[Reply]:
        """Send ``payload`` from ``host`` (broadcast from ``source``, or ``unicast`` = (src ip, dst ip,
        dst port)) and return every reply with ``xid`` seen within ``wait`` seconds (or the first one)."""
        src_mac = mac or host.mac
        return run_in(host.ns.name, _exchange, host.iface, payload, src_mac, xid, wait, unicast, first, source)

    def send_all(self, host: Host, packets: list[tuple[bytes, str]], port: int = 67) -> int:
        assert host.ip, "the sender needs an address"
        return run_in(host.ns.name, _send_all, host.iface, host.ip, packets, port)

    def dora(self, host: Host, mac: str | None = None, options: list[tuple[int, bytes]] | None = None) -> Reply:
        """DISCOVER -> OFFER -> REQUEST -> ACK with the probe; returns the ACK."""
        mac = mac or host.mac
        xid = random.getrandbits(32)
        offers = self.exchange(host, bootp(mac, DISCOVER, xid, options or []), xid, first=True, mac=mac)
        assert offers and offers[0].type == OFFER, f"no OFFER for {mac}: {[r.summary() for r in offers]}"
        offer = offers[0]
        server_id = offer.options.get(54, socket.inet_aton(SERVER_IP))
        request = bootp(mac, REQUEST, xid, [*(options or []), (50, socket.inet_aton(offer.yiaddr)), (54, server_id)])
        acks = self.exchange(host, request, xid, first=True, mac=mac)
        assert acks and acks[0].type == ACK, f"no ACK for {mac} {offer.yiaddr}: {[r.summary() for r in acks]}"
        return acks[0]

    # -- observation --------------------------------------------------------------------------------

    def details(self) -> str:
        parts = []
        for server in self.servers:
            lines = [
                line
                for line in server.log_text().splitlines()
                if line.strip()
                and not line.startswith("  ")  # gunicorn's configuration dump
                and not any(noise in line for noise in ("/health", "Closing connection", "python-requests"))
            ]
            parts.append(f"--- {server.workdir.name}/server.log (last 40 lines)\n" + "\n".join(lines[-40:]))
        for name in ("dnsmasq.log", "dhcrelay.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def listening(self, ns: Namespace) -> list[str]:
        """Listening TCP and bound UDP sockets in ``ns`` (ss lines)."""
        result = ns.run("ss", "-H", "-l", "-n", "-t", "-u", check=False)
        return [line for line in result.stdout.splitlines() if line.strip()]

    # -- tear-down ----------------------------------------------------------------------------------

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.crash()  # fast; graceful stops are exercised by the tests themselves
            if server.forward:
                server.forward.close()
        for process, _log in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        for ns in reversed(self.namespaces):
            ns.delete()  # also kills what is left inside (e.g. a dhclient daemon)
        self.namespaces.clear()


@contextlib.contextmanager
def dhcp_lab(workdir: Path) -> Iterator[DhcpLab]:
    """The lab for one test; everything it created is gone afterwards, also when the test fails."""
    require_binaries("ip", "udhcpc", "dhclient", "dhcrelay", "dnsmasq", "ss")
    lab = DhcpLab(workdir)
    try:
        yield lab.build()
    finally:
        names = [ns.name for ns in lab.namespaces]
        lab.close()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
        leftovers = [name for name in names if name in listed]
        assert not leftovers, f"namespaces left behind: {leftovers}"


# -- server state ---------------------------------------------------------------------------------


def dhcp_component(server: Server) -> dict[str, Any]:
    try:
        response = server.get("/health")
    except Exception:
        return {}
    if response.status_code not in (200, 503):
        return {}
    return response.json().get("components", {}).get("dhcp", {})


COUNTER = re.compile(r"([a-z_]+)[=: ]+(\d+)")


def dhcp_counters(server: Server) -> dict[str, int]:
    """Counters from /health components.dhcp: its numeric fields and ``counters``, also when the
    detail is JSON text (``{"counters": {"offer": 3, "dropped:short": 1}}``) or ``name=N`` text."""
    component = dhcp_component(server)
    sources: list[Any] = [component, component.get("counters")]
    detail = component.get("detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            sources.append({name: int(number) for name, number in COUNTER.findall(detail.lower())})
    if isinstance(detail, dict):
        sources += [detail, detail.get("counters")]
    counters: dict[str, int] = {}
    for source in sources:
        if isinstance(source, dict):
            counters.update({k: v for k, v in source.items() if isinstance(v, int) and not isinstance(v, bool)})
    return counters


def leases(server: Server) -> list[dict[str, Any]]:
    """The lease table, read-only (the server may be running)."""
    if not server.db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM dhcp_leases")]
    finally:
        conn.close()


def bound_leases(server: Server) -> dict[str, str]:
    """ip -> mac (12 hex digits) of every unexpired bound lease."""
    now = time.time()
    return {
        row["ip"]: node_id(row["mac"]) for row in leases(server) if row["state"] == "bound" and row["expires_at"] > now
    }


def assert_pool_consistent(server: Server, pools: Iterable[tuple[str, str]] = ((POOL_START, POOL_END),)) -> None:
    """No MAC holds two bound leases in one subnet, every lease is inside a pool, and no two
    nodes of the API share an address."""
    rows = leases(server)
    ranges = [(ipaddress.IPv4Address(a), ipaddress.IPv4Address(b)) for a, b in pools]
    seen: dict[tuple[str, str], str] = {}
    for row in rows:
        address = ipaddress.IPv4Address(row["ip"])
        assert any(a <= address <= b for a, b in ranges), f"lease outside every pool: {row}"
        if row["state"] == "bound" and row["expires_at"] > time.time():
            key = (node_id(row["mac"]), row["subnet"])
            assert key not in seen, f"{key[0]} holds both {seen[key]} and {row['ip']}"
            seen[key] = row["ip"]
    nodes = server.api("GET", "/api/v1/nodes").json()
    addresses = [node["ip"] for node in nodes if node.get("ip")]
    duplicated = sorted({a for a in addresses if addresses.count(a) > 1})
    assert not duplicated, f"nodes share an address: {duplicated}"


def node(server: Server, mac: str) -> dict[str, Any] | None:
    response = server.api("GET", f"/api/v1/nodes/{node_id(mac)}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def require_binaries(*names: str) -> None:
    missing = [name for name in names if not shutil.which(name, path=sbin_path())]
    assert not missing, f"missing binaries {missing} (make setup installs them)"


def dumps(replies: Iterable[Reply]) -> str:
    return json.dumps([reply.summary() for reply in replies], indent=1)
