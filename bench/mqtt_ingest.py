"""MQTT ingest benchmark: status messages of 30,000 simulated nodes through the real broker into SQLite.

Run: ``.venv/bin/python bench/mqtt_ingest.py [--nodes 30000] [--messages 300000] [--rate 10000] [--quick]``
(as root; ``--broker-option 'max_queued_messages 100000'`` appends a line to the broker's configuration)

The broker is a Mosquitto 2.0 of the benchmark's own, configured from the server's template for its
embedded broker; the server runs on it as on an external broker (the ``mosquitto`` role's topology). Two
setups, because one process may hold at most 20,000 descriptors here (hard limit, no CAP_SYS_RESOURCE), so
one broker cannot take 30,000 connections:

- ``no node auth`` (``NF_MQTT_NODE_AUTH=false``, anonymous broker): 30,000 nodes, two per connection.
- ``per-node auth``: 15,000 nodes, each on its own connection as its own user with the credentials an
  install mints; the server writes the broker's password and ACL files from its store and reloads it
  (SIGHUP), and the broker checks the pattern ACL on every message, as for real agents.

In both, the reference subscriber ``mosquitto_sub`` shares the server's account (the only one allowed to
read ``node/+/status``), so the template's ``use_username_as_clientid`` is dropped: with it, that
subscriber would take over the server's session.

Nodes are seeded ``installed`` directly in SQLite after ``nodefoundry-server db check`` created the schema.
A separate publisher process (hand-encoded MQTT 3.1.1 frames over raw non-blocking sockets, spread over
several loopback source addresses) sends ``protocol.status_payload`` messages, round after round over all
nodes, in phases: the first status of every node, then QoS 0 and QoS 1 heartbeats at full speed and paced
at ``--rate``. During each phase ``mosquitto_sub -t 'node/+/status' -C <n>`` receives the same stream.

Measured per phase: published msg/s (QoS 1: until the last PUBACK), applied msg/s (the server's ``applied``
counter in /health, which it refreshes once a second), loss (published - applied once drained), drain lag
(last publish to all applied) and the server/mosquitto_sub ratio. Afterwards every node's stored uptime must
be that of its last message. Prints a markdown table; everything started is stopped and the temporary
directory removed, also on errors.
"""

from __future__ import annotations

import argparse
import grp
import json
import multiprocessing
import os
import platform
import re
import resource
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from common import (
    CPUS,
    DISTURBED_SHARE,
    cpu_model,
    free_port,
    http,
    log,
    mac_for,
    machine_busy_seconds,
    markdown_table,
    stamp,
    stop_process,
    tree_cpu_seconds,
    wait_http,
)

from nodefoundry_agent import __version__ as agent_version
from nodefoundry_agent import protocol
from nodefoundry_server.mqtt import credentials

BIN = Path(sys.executable).parent
SERVER_BIN = BIN / "nodefoundry-server"
SERVER_USER = credentials.SERVER_USER
TARGET_RATE = 10_000.0  # status msg/s, sustained, with zero loss
PER_SOURCE_ADDRESS = 15_000  # connections per loopback source address (the ephemeral port range is ~28,000)
CONNECT_WINDOW = 64  # connections being set up at once (Mosquitto's listen backlog is 100)
DRAIN_IDLE_SECONDS = 10.0  # a phase is drained when the counters stop moving this long
DRAIN_MAX_SECONDS = 120.0  # or at the latest this long after the last publish
HEALTH_POLL_SECONDS = 0.2
KEPT_UP_LAG = 2.0  # seconds; the server refreshes its /health counters once a second

# --- MQTT 3.1.1 frames, hand-encoded: the publisher must cost far less CPU than what it measures -----------------


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_frame(client_id: str, username: str | None, password: str | None) -> bytes:
    """CONNECT: clean session, keepalive off (the phases have idle gaps), user name and password if given."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + _utf8(client_id)
    body += b"".join(_utf8(value) for value in (username, password) if value is not None)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_frame(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining_length(len(body)) + body


CONNACK_OK = b"\x20\x02\x00\x00"
PUBACK_BYTES = 4
DISCONNECT = b"\xe0\x00"


# --- the publisher process ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One MQTT connection of the publisher: its account and the nodes (indices) whose status it carries.

    With per-node auth a link is one node under its own user name, as an agent connects. Without, one
    connection may carry several nodes, since the broker then accepts any topic from anyone.
    """

    client_id: str
    username: str | None
    password: str | None
    nodes: range


def node_ip(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


def raise_nofile(needed: int) -> None:
    """Soft descriptor limit up to the hard one (children, the broker too, inherit it); fail early if short."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise SystemExit(f"{needed} descriptors needed, the hard limit is {hard}: fewer connections, please")


def _open(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def connect_all(port: int, links: list[Link]) -> list[socket.socket]:
    """Every link connected, CONNECT sent and CONNACK checked, ``CONNECT_WINDOW`` at a time."""
    socks: list[socket.socket | None] = [None] * len(links)
    selector = selectors.DefaultSelector()
    waiting = iter(enumerate(links))
    pending, done = 0, 0
    while done < len(links):
        while pending < CONNECT_WINDOW and (item := next(waiting, None)) is not None:
            index, link = item
            sock = _open(port, f"127.0.0.{2 + index // PER_SOURCE_ADDRESS}")
            selector.register(sock, selectors.EVENT_WRITE, (index, link))
            pending += 1
        events = selector.select(timeout=30)
        if not events:
            raise RuntimeError(f"connecting stalled after {done} of {len(links)} connections")
        for key, mask in events:
            sock, (index, link) = key.fileobj, key.data
            if mask & selectors.EVENT_WRITE:
                if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise RuntimeError(f"connect of {link.client_id}: {os.strerror(error)}")
                sock.send(connect_frame(link.client_id, link.username, link.password))
                selector.modify(sock, selectors.EVENT_READ, key.data)
                continue
            sock.setblocking(True)
            answer = sock.recv(4, socket.MSG_WAITALL)
            sock.setblocking(False)
            if answer != CONNACK_OK:
                raise RuntimeError(f"{link.client_id} refused by the broker: {answer!r}")
            selector.unregister(sock)
            socks[index] = sock
            pending, done = pending - 1, done + 1
    selector.close()
    return [sock for sock in socks if sock is not None]


Round = list[tuple[int, bytes]]  # (link index, PUBLISH frame), in node order


def build_frames(macs: list[str], links: list[Link], rounds: int, qos: int, uptime_base: int) -> list[Round]:
    """Every message of a phase, built before it starts: round ``r`` carries uptime ``uptime_base + r``.
    Packet ids are unique per connection for the whole phase (at most ``rounds`` times nodes per link in flight)."""
    per_link = max(len(link.nodes) for link in links)
    frames: list[Round] = []
    for r in range(rounds):
        row = []
        for link_index, link in enumerate(links):
            for slot, index in enumerate(link.nodes):
                hostname, session = f"node-{macs[index]}", f"bench{index:07d}"
                payload = protocol.status_payload(node_ip(index), hostname, uptime_base + r, agent_version, session)
                topic = protocol.topic(macs[index], protocol.STATUS)
                row.append((link_index, publish_frame(topic, payload, qos, r * per_link + slot + 1)))
        frames.append(row)
    return frames


def _send(sock: socket.socket, frame: bytes) -> None:
    """Non-blocking send; a full socket buffer (the broker is behind) blocks until the frame is out."""
    try:
        sent = sock.send(frame)
    except BlockingIOError:
        sent = 0
    if sent < len(frame):
        sock.setblocking(True)
        sock.sendall(frame[sent:])
        sock.setblocking(False)


class AckCounter:
    """PUBACKs are the only thing the broker sends these clients, and each is exactly 4 bytes."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.selector = selectors.DefaultSelector()
        for sock in socks:
            self.selector.register(sock, selectors.EVENT_READ)
        self.bytes = 0
        self.last_at = 0.0

    @property
    def acks(self) -> int:
        return self.bytes // PUBACK_BYTES

    def drain(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            data = key.fileobj.recv(65536)
            if not data:
                raise RuntimeError("the broker closed a connection")
            self.bytes += len(data)
            self.last_at = time.time()

    def close(self) -> None:
        self.selector.close()


def publish(socks: list[socket.socket], frames: list[Round], qos: int, rate: float) -> dict[str, Any]:
    """Send every frame (round after round over all nodes), paced to ``rate`` msg/s when it is not 0."""
    acks = AckCounter(socks) if qos else None
    total = sum(len(row) for row in frames)
    started, began, sent = time.time(), time.monotonic(), 0
    cpu = time.process_time()
    for row in frames:
        for link_index, frame in row:
            _send(socks[link_index], frame)
            sent += 1
            if sent % 100 == 0:
                if rate and (ahead := began + sent / rate - time.monotonic()) > 0:
                    time.sleep(ahead)
                if acks:
                    acks.drain(0)
    finished = time.time()
    if acks:
        deadline = time.monotonic() + 120
        while acks.acks < total and time.monotonic() < deadline:
            acks.drain(1.0)
        acks.close()
    return {
        "sent": sent,
        "started": started,
        "finished": finished,
        "acked": acks.acks if acks else None,
        "acked_at": acks.last_at if acks else None,
        "cpu": time.process_time() - cpu,
    }


def publisher_main(pipe: Connection, port: int, macs: list[str], links: list[Link]) -> None:
    """The publisher process: connect every link, then run phases on request until told to close."""
    raise_nofile(len(links) + 100)
    began = time.monotonic()
    socks = connect_all(port, links)
    pipe.send({"connected": len(socks), "seconds": time.monotonic() - began})
    frames: list[Round] = []
    while (request := pipe.recv())["do"] != "close":
        if request["do"] == "prepare":
            frames = build_frames(macs, links, request["rounds"], request["qos"], request["uptime_base"])
            pipe.send({"prepared": sum(len(row) for row in frames)})
        elif request["do"] == "publish":
            pipe.send(publish(socks, frames, request["qos"], request["rate"]))
    for sock in socks:
        sock.setblocking(True)
        sock.sendall(DISCONNECT)
        sock.close()


# --- the broker and the server ------------------------------------------------------------------------------------


class Broker:
    """A Mosquitto of the benchmark's own, configured from the server's template for its embedded broker."""

    def __init__(self, directory: Path, node_auth: bool, options: list[str]) -> None:
        self.directory = directory
        self.node_auth = node_auth
        self.options = options
        self.port = free_port()
        self.password_file, self.acl_file = directory / "passwd", directory / "acl"
        self.conf, self.logfile = directory / "mosquitto.conf", directory / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Empty auth files for now (the server fills them and sends SIGHUP), readable by user mosquitto."""
        gid = grp.getgrnam("mosquitto").gr_gid
        self.directory.mkdir(mode=0o750)
        os.chown(self.directory, 0, gid)
        for path in (self.password_file, self.acl_file):
            path.write_text("")
            os.chown(path, 0, gid)
            path.chmod(0o640)
        files = {"password_file": self.password_file, "acl_file": self.acl_file} if self.node_auth else {}
        text = credentials.render("mosquitto.conf.j2", listeners=[(str(self.port), "127.0.0.1")],
                                  **({"password_file": "", "acl_file": ""} | files))  # fmt: skip
        kept = [line for line in text.splitlines() if "use_username_as_clientid" not in line]
        extra = ["# the benchmark: use_username_as_clientid removed; --broker-option lines:", *self.options]
        self.conf.write_text("\n".join([*kept, *extra, ""]))
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{self.logfile.read_text(errors='replace')}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_size(self) -> int:
        return self.logfile.stat().st_size

    def drop_notices(self, since: int) -> list[str]:
        """Mosquitto's own notices about messages it dropped (a client's queue was full), since ``since``."""
        with self.logfile.open("rb") as log_file:
            log_file.seek(since)
            text = log_file.read().decode(errors="replace")
        return sorted({line.split(": ", 1)[-1] for line in text.splitlines() if "dropped" in line})

    def stop(self) -> None:
        stop_process(self.process, "mosquitto")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """``nodefoundry-server run`` on an external broker, maintaining that broker's password and ACL files."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        self.node_auth = broker.node_auth
        self.db_path = workdir / "data" / "nodes.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = workdir / "server.log"
        self.token = "nf_bench-" + secrets.token_urlsafe(16)
        self.mqtt_password = secrets.token_urlsafe(24)
        self.env = {
            **os.environ,
            "NF_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "NF_DB_PATH": str(self.db_path),
            "NF_ASSETS_DIR": str(workdir / "data" / "assets"),
            "NF_API_TOKEN": self.token,
            "NF_MQTT_BROKER": f"127.0.0.1:{broker.port}",
            "NF_MQTT_NODE_AUTH": str(self.node_auth).lower(),
            # Long enough that no node falls silent (watchdog: 3 intervals) between phases.
            "NF_HEARTBEAT_INTERVAL": "300",
        }
        if self.node_auth:
            self.env |= {
                "NF_MQTT_USERNAME": SERVER_USER,
                "NF_MQTT_PASSWORD": self.mqtt_password,
                "NF_MQTT_PASSWORD_FILE": str(broker.password_file),
                "NF_MQTT_ACL_FILE": str(broker.acl_file),
                "NF_MQTT_RELOAD_COMMAND": f"kill -HUP {broker.pid}",
            }
        self.process: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        done = subprocess.run([str(SERVER_BIN), "db", "check"], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nodefoundry-server db check failed:\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(
                [str(SERVER_BIN), "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_http(self.url + "/health", self.process, "nodefoundry-server", self.logfile)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def mqtt(self) -> dict[str, Any]:
        """The mqtt component of /health: state and counters (applied, received, drops by reason, backlog)."""
        status, _, body = http("GET", self.url + "/health")
        if status != 200:
            raise RuntimeError(f"/health answered {status}")
        component = json.loads(body)["components"].get("mqtt", {"state": "absent", "detail": ""})
        counters = {key: int(value) for key, value in re.findall(r"\b(\w+)=(\d+)\b", component.get("detail", ""))}
        return {"state": component["state"], "detail": component.get("detail", ""), **counters}

    def stop(self) -> None:
        stop_process(self.process, "nodefoundry-server")


def seed(db_path: Path, count: int, node_auth: bool) -> dict[str, str | None]:
    """``count`` installed nodes in one transaction, with broker credentials as an install mints them when
    ``node_auth``; returns each node's password (None without)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        secret = conn.execute("SELECT value FROM settings WHERE key = 'install_token_secret'").fetchone()[0]
        macs = [mac_for(index) for index in range(count)]
        passwords = {mac: credentials.node_password(secret, mac, secrets.token_hex(20)) if node_auth else None
                     for mac in macs}  # fmt: skip
        at = stamp(datetime.now(UTC) - timedelta(hours=1))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO nodes (mac, status, liveness, arch, created_at, updated_at)"
            " VALUES (?, 'installed', 'unknown', 'amd64', ?, ?)",
            [(mac, at, at) for mac in macs],
        )
        conn.executemany(
            "INSERT INTO node_events (mac, at, source, kind, field, new)"
            " VALUES (?, ?, 'installer', 'registered', 'status', 'installed')",
            [(mac, at) for mac in macs],
        )
        conn.executemany(
            "INSERT INTO node_credentials (mac, username, password_hash, created_at) VALUES (?, ?, ?, ?)",
            [(mac, mac, credentials.password_hash(password), at) for mac, password in passwords.items() if password],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return passwords


def links_for(passwords: dict[str, str | None], per_link: int) -> list[Link]:
    """Per-node auth: one link per node, its user name the MAC. Without: ``per_link`` nodes per anonymous link."""
    macs = list(passwords)
    if all(passwords.values()):
        return [Link(f"nodefoundry-agent-{mac}", mac, passwords[mac], range(i, i + 1)) for i, mac in enumerate(macs)]
    starts = range(0, len(macs), per_link)
    return [Link(f"nf-bench-{i:06d}", None, None, range(i, min(i + per_link, len(macs)))) for i in starts]


def wait_until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


def broker_accepts(broker: Broker, link: Link) -> bool:
    """One CONNECT with a link's credentials: with per-node auth, the broker has loaded the server's files."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(connect_frame(f"probe-{link.client_id}", link.username, link.password))
        answer = sock.recv(4, socket.MSG_WAITALL)
        sock.sendall(DISCONNECT)
    return answer == CONNACK_OK


# --- the reference subscriber ---------------------------------------------------------------------------------------


class Subscriber:
    """``mosquitto_sub -C <n>`` on the server's account, printing each message's arrival time (``%U``)."""

    def __init__(self, workdir: Path, broker: Broker, server: Server, qos: int, count: int, name: str) -> None:
        self.output = workdir / f"sub-{name}.txt"
        account = ["-u", SERVER_USER, "-P", server.mqtt_password] if server.node_auth else []
        options = ["-i", f"nf-bench-{name}", "-q", str(qos), "-t", "node/+/status", "-C", str(count), "-F", "%U", "-d"]
        # Line-buffered, so the SUBACK shows in the file at once (readiness); costs it one write per line.
        self.argv = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), *account, *options]
        self.process: subprocess.Popen[bytes] | None = None

    @contextmanager
    def running(self) -> Iterator[Subscriber]:
        """Started and subscribed (``-d`` prints the SUBACK among the debug lines); stopped at the end."""
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until("mosquitto_sub's SUBACK", lambda: b"SUBACK" in self.output.read_bytes(), 30)
            yield self
        finally:
            stop_process(self.process, "mosquitto_sub")

    def finish(self, timeout: float) -> list[float]:
        """Arrival times of the messages it got (all ``-C`` of them, or what came before ``timeout``)."""
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.process, "mosquitto_sub")
        stamps = re.findall(rb"^(\d+\.\d+)$", self.output.read_bytes(), re.M)
        self.output.unlink()
        return [float(value) for value in stamps]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


# --- phases ---------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    qos: int
    rate: float  # 0: full speed
    rounds: int


@dataclass
class Outcome:
    phase: Phase
    published: int
    publish_rate: float
    applied: int
    applied_rate: float
    dropped: dict[str, int]
    lag: float  # seconds from the last publish until the server had applied everything
    sub_count: int
    sub_rate: float
    cpu: dict[str, float]  # share of the machine during the phase
    broker_drops: list[str]  # the broker's notices of dropped messages

    @property
    def loss(self) -> int:
        return self.published - self.applied


class Samples:
    """/health samples of one phase: (wall time, mqtt counters)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.base = server.mqtt()
        self.taken: list[tuple[float, dict[str, Any]]] = []

    def take(self) -> dict[str, Any]:
        sample = self.server.mqtt()
        self.taken.append((time.time(), sample))
        return sample

    def delta(self, key: str, sample: dict[str, Any] | None = None) -> int:
        return (sample or self.taken[-1][1]).get(key, 0) - self.base.get(key, 0)

    def first_reached(self, key: str, value: int) -> float:
        """When the counter first showed ``value``: the middle between that sample and the one before."""
        previous = self.taken[0][0]
        for at, sample in self.taken:
            if self.delta(key, sample) >= value:
                return (previous + at) / 2
            previous = at
        return self.taken[-1][0]


DROPS = ("queue_full", "malformed", "oversize", "bad_topic", "unknown_node", "write_failed")


def drain(samples: Samples, expected: int) -> None:
    """Poll until the server applied ``expected`` messages, or its counters stopped moving (or a cap passed)."""
    last, still_since, cap = None, time.monotonic(), time.monotonic() + DRAIN_MAX_SECONDS
    while time.monotonic() < cap:
        sample = samples.take()
        settled = samples.delta("applied") + sum(samples.delta(key) for key in DROPS)
        if settled >= expected:
            return
        moving = (sample.get("received"), sample.get("applied"), sample.get("backlog"))
        if moving != last:
            last, still_since = moving, time.monotonic()
        elif time.monotonic() - still_since > DRAIN_IDLE_SECONDS:
            return
        time.sleep(HEALTH_POLL_SECONDS)


@contextmanager
def cpu_shares(groups: dict[str, list[int]], into: dict[str, float]) -> Iterator[None]:
    """Each group's share of the machine during the block, plus everyone else's (``other``)."""
    began, busy = time.monotonic(), machine_busy_seconds()
    used = {name: tree_cpu_seconds(pids) for name, pids in groups.items()}
    yield
    seconds = (time.monotonic() - began) * CPUS
    for name, pids in groups.items():
        used[name] = tree_cpu_seconds(pids) - used[name]
    into.update({name: value / seconds for name, value in used.items()})
    into["other"] = max(0.0, machine_busy_seconds() - busy - sum(used.values())) / seconds


@dataclass
class Rig:
    workdir: Path
    broker: Broker
    server: Server
    pipe: Connection
    publisher_pid: int
    nodes: int


def run_phase(phase: Phase, rig: Rig, uptime_base: int) -> Outcome:
    server, broker, pipe = rig.server, rig.broker, rig.pipe
    count = phase.rounds * rig.nodes
    pipe.send({"do": "prepare", "rounds": phase.rounds, "qos": phase.qos, "uptime_base": uptime_base})
    pipe.recv()
    subscriber = Subscriber(rig.workdir, broker, server, phase.qos, count, phase.name.replace(" ", "-"))
    with subscriber.running():
        samples = Samples(server)
        groups = {"server": [server.pid], "broker": [broker.pid], "publisher": [rig.publisher_pid],
                  "mosquitto_sub": [subscriber.pid]}  # fmt: skip
        cpu: dict[str, float] = {}
        log_offset = broker.log_size()
        log(f"phase {phase.name}, QoS {phase.qos}: {count} messages")
        with cpu_shares(groups, cpu):
            pipe.send({"do": "publish", "qos": phase.qos, "rate": phase.rate})
            while not pipe.poll(HEALTH_POLL_SECONDS):
                samples.take()
            result = pipe.recv()
            drain(samples, result["acked"] if phase.qos else result["sent"])
        stamps = subscriber.finish(timeout=30)
    published = result["acked"] if phase.qos else result["sent"]
    published_until = result["acked_at"] if phase.qos else result["finished"]
    applied = samples.delta("applied")
    applied_at = samples.first_reached("applied", applied)
    started = result["started"]
    return Outcome(
        phase=phase,
        published=published,
        publish_rate=published / max(published_until - started, 1e-9),
        applied=applied,
        applied_rate=applied / max(applied_at - started, 1e-9),
        dropped={key: samples.delta(key) for key in DROPS if samples.delta(key)},
        lag=max(0.0, applied_at - published_until),
        sub_count=len(stamps),
        sub_rate=len(stamps) / max(stamps[-1] - started, 1e-9) if stamps else 0.0,
        cpu=cpu,
        broker_drops=broker.drop_notices(log_offset),
    )


def check_last_messages(db_path: Path, uptime: int) -> int:
    """Nodes whose stored uptime is that of their last message: ingest applied every node's messages in order."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM nodes WHERE json_extract(facts, '$.uptime') = ? AND liveness = 'online'", (uptime,)
        ).fetchone()[0]
    finally:
        conn.close()


# --- report and main ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    name: str
    nodes: int
    node_auth: bool
    per_link: int  # nodes per MQTT connection (1 with per-node auth)


def verdict(outcome: Outcome) -> str:
    """Full speed must reach the target rate; a paced phase offered at least the target must be kept up with:
    the server at most ``KEPT_UP_LAG`` behind when the last message was published. Both with zero loss."""
    phase = outcome.phase
    if phase.name == "first status":
        return "—"
    if phase.rate:
        met = phase.rate >= TARGET_RATE and outcome.publish_rate >= 0.99 * TARGET_RATE and outcome.lag <= KEPT_UP_LAG
    else:
        met = outcome.applied_rate >= TARGET_RATE
    return "pass" if met and outcome.loss == 0 else "**FAIL**"


def table(results: list[tuple[Setup, list[Outcome]]]) -> str:
    head = ["setup", "phase", "QoS", "messages", "published msg/s", "applied msg/s", "loss", "drain lag",
            "mosquitto_sub msg/s", "server / mosquitto_sub", "≥ 10,000 msg/s, no loss"]  # fmt: skip
    rows = []
    for setup, outcomes in results:
        for o in outcomes:
            ratio = f"{o.applied_rate / o.sub_rate:.0%}" if o.sub_rate else "—"
            phase = f"{o.phase.name} ({o.phase.rate:,.0f}/s offered)" if o.phase.rate else o.phase.name
            sub = f"{o.sub_rate:,.0f}" + ("" if o.sub_count == o.published else f" (got {o.sub_count:,})")
            cells = [setup.name, phase, str(o.phase.qos), f"{o.published:,}", f"{o.publish_rate:,.0f}",
                     f"{o.applied_rate:,.0f}", f"{o.loss:,}", f"{o.lag:.1f} s", sub, ratio, verdict(o)]  # fmt: skip
            rows.append(cells)
    return markdown_table(head, rows)


def details(setup: Setup, outcomes: list[Outcome]) -> list[str]:
    notes = []
    for o in outcomes:
        cpu = ", ".join(f"{name} {share:.0%}" for name, share in o.cpu.items())
        dropped = ", ".join(f"{key} {value}" for key, value in o.dropped.items()) or "none"
        notes.append(f"{setup.name}, {o.phase.name}, QoS {o.phase.qos}: CPU ({CPUS} CPUs = 100 %) {cpu};"
                     f" server drops: {dropped}")  # fmt: skip
        notes += [f"broker log: '{notice}' (mosquitto 2.0.11 says it once per client and episode, not per message)"
                  for notice in o.broker_drops]  # fmt: skip
        if o.cpu.get("other", 0) > DISTURBED_SHARE:
            notes.append(f"**warning**: other processes used {o.cpu['other']:.0%} of the machine in that phase")
    return notes


@contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory user mosquitto can traverse (its files are in a 0750 root:mosquitto subdirectory)."""
    path = Path(tempfile.mkdtemp(prefix="nf-mqtt-bench-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_publisher(port: int, macs: list[str], links: list[Link]) -> tuple[BaseProcess, Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=publisher_main, args=(theirs, port, macs, links), name="nf-bench-publisher")
    process.start()
    return process, ours


def phases(rounds: int, rate: float) -> list[Phase]:
    """The first status of every node (it comes online: an event and a changed row each), then heartbeats."""
    found = [Phase("first status", 1, 0, 1), Phase("full speed", 0, 0, rounds), Phase("full speed", 1, 0, rounds)]
    if rate:
        found += [Phase("paced", 0, rate, rounds), Phase("paced", 1, rate, rounds)]
    return found


def bench(setup: Setup, args: argparse.Namespace, workdir: Path, notes: list[str]) -> list[Outcome]:
    rounds = max(1, args.messages // setup.nodes)
    broker = Broker(workdir / "broker", setup.node_auth, args.broker_option)
    broker.start()
    server = Server(workdir, broker)
    publisher = None
    try:
        server.migrate()
        began = time.perf_counter()
        passwords = seed(server.db_path, setup.nodes, setup.node_auth)
        links = links_for(passwords, setup.per_link)
        hashes = ", password hashes included" if setup.node_auth else ""
        notes.append(f"{setup.name}: {setup.nodes:,} installed nodes seeded in one transaction"
                     f" ({time.perf_counter() - began:.1f} s{hashes})")  # fmt: skip
        server.start()
        wait_until("the broker to accept the nodes", lambda: broker_accepts(broker, links[-1]), 60)
        wait_until("the server's broker connection", lambda: server.mqtt()["state"] == "ok", 60)
        publisher, pipe = start_publisher(broker.port, list(passwords), links)
        connected = pipe.recv()
        notes.append(f"{setup.name}: {connected['connected']:,} MQTT connections (CONNECT, CONNACK checked)"
                     f" in {connected['seconds']:.1f} s")  # fmt: skip
        rig = Rig(workdir, broker, server, pipe, publisher.pid, setup.nodes)
        outcomes = [run_phase(phase, rig, 1000 * index) for index, phase in enumerate(phases(rounds, args.rate))]
        last_uptime = 1000 * (len(outcomes) - 1) + outcomes[-1].phase.rounds - 1
        in_order = check_last_messages(server.db_path, last_uptime)
        notes.append(f"{setup.name}: afterwards {in_order:,} of {setup.nodes:,} nodes are online and store the"
                     " uptime of their last message (every node's messages applied, in order)")  # fmt: skip
        pipe.send({"do": "close"})
        publisher.join(30)
        return outcomes
    finally:
        if publisher is not None and publisher.is_alive():
            publisher.kill()
        server.stop()
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=30_000, help="nodes of the setup without node auth (30000)")
    parser.add_argument("--per-link", type=int, default=2, help="nodes per connection without node auth (2)")
    parser.add_argument("--auth-nodes", type=int, default=15_000, help="nodes with per-node auth (15000; 0: skip)")
    parser.add_argument("--messages", type=int, default=300_000, help="messages per phase (300000)")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="msg/s of the paced phases (0: skip them)")
    parser.add_argument("--broker-option", action="append", default=[], help="extra mosquitto.conf line (tuning)")
    parser.add_argument("--quick", action="store_true", help="3,000 and 1,500 nodes, 9,000 messages: harness check")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.auth_nodes, args.messages = 3_000, 1_500, 9_000
    for tool in ("mosquitto", "mosquitto_sub"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            parser.error(f"{tool} is not installed (make setup installs it)")
    setups = [Setup("no node auth", args.nodes, False, args.per_link)]
    if args.auth_nodes:
        setups.append(Setup("per-node auth", args.auth_nodes, True, 1))
    raise_nofile(max(-(-setup.nodes // setup.per_link) for setup in setups) + 100)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    notes: list[str] = []
    results = []
    began = time.monotonic()
    for setup in setups:
        with workspace() as workdir:
            results.append((setup, bench(setup, args, workdir, notes)))
    print(f"## MQTT ingest: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    print(f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()};"
          f" {args.messages:,} status messages per phase; broker options: {args.broker_option or 'none'}")  # fmt: skip
    print()
    print(table(results))
    print()
    for line in notes + [line for setup, outcomes in results for line in details(setup, outcomes)]:
        print(f"- {line}")
    print(f"- total run time {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
