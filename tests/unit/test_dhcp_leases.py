"""Lease durability on a real SQLite store: ACK after COMMIT, reload after a restart, no duplicates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from nodefoundry_server import config, lifecycle
from nodefoundry_server.dhcp.codec import ip_int
from nodefoundry_server.dhcp.handler import Decision, DhcpHandler, DhcpSettings, Reply
from nodefoundry_server.dhcp.leases import LeaseTable
from nodefoundry_server.dhcp.persist import BatchResult, Persister, write_batch
from nodefoundry_server.store import Store

SERVER = "10.66.0.1"
NOW = 1_800_000_000.0
PXE = {"vendor_class_id": b"PXEClient:Arch:00007:UNDI:003016", "pxe_client_architecture": b"\x00\x07"}
ENVIRON = {
    "NF_DHCP_INTERFACE": "nf0",
    "NF_DHCP_IP_POOL_START": "10.66.0.10",
    "NF_DHCP_IP_POOL_END": "10.66.0.200",
    "NF_DHCP_GATEWAY": "10.66.0.1",
    "NF_DHCP_DNS": "10.66.0.53 10.66.0.54",
    "NF_DHCP_LEASE_TIME": "600",
}
LEASE_COLUMNS = "ip, mac, state, subnet, client_id, hostname, expires_at"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "nodes.db")
    store.open()
    return store


def new_handler(store: Store | None = None, now: float = NOW, environ: dict[str, str] = ENVIRON) -> DhcpHandler:
    """A handler as the service builds it: leases and nodes read back from the store."""
    settings = DhcpSettings.from_config(config.load(None, environ), SERVER)
    handler = DhcpHandler(settings, LeaseTable(settings.subnets, settings.server_ip))
    if store is not None:
        handler.table.load(store.conn().execute(f"SELECT {LEASE_COLUMNS} FROM dhcp_leases").fetchall(), now)
        rows = store.conn().execute("SELECT mac, ip FROM nodes").fetchall()
        handler.known_macs = {row["mac"] for row in rows}
        for row in rows:
            if row["ip"]:
                handler.table.reservations.add(row["mac"], ip_int(row["ip"]))
    return handler


def packet(mac: str, kind: str, ciaddr: str = "0.0.0.0", **options: object) -> bytes:
    header = BOOTP(op=1, chaddr=bytes.fromhex(mac) + bytes(10), xid=7, flags=0x8000, ciaddr=ciaddr)
    return bytes(header / DHCP(options=[("message-type", kind), *options.items(), "end"]))


def decide(handler: DhcpHandler, mac: str, kind: str, now: float = NOW, **options: object) -> Decision:
    decision = handler.handle(packet(mac, kind, **options), ("0.0.0.0", 68), now)
    assert decision is not None, handler.counters
    return decision


def yiaddr(decision: Decision) -> str:
    assert decision.reply is not None
    return BOOTP(decision.reply.packet).yiaddr


def dora(handler: DhcpHandler, mac: str, want: str = "", **options: object) -> list[Decision]:
    """DISCOVER (asking for ``want`` with option 50) and REQUEST; returns [offer, ack]."""
    offer = decide(handler, mac, "discover", **({"requested_addr": want} if want else {}), **options)
    ack = decide(handler, mac, "request", server_id=SERVER, requested_addr=yiaddr(offer), **options)
    assert ack.durable
    return [offer, ack]


def commit(store: Store, decisions: list[Decision]) -> BatchResult:
    with store.write() as conn:
        return write_batch(conn, [decision.writes for decision in decisions if decision.writes is not None])


def leases(store: Store) -> dict[str, tuple[str, str]]:
    rows = store.conn().execute("SELECT ip, mac, state FROM dhcp_leases").fetchall()
    return {row["ip"]: (row["mac"], row["state"]) for row in rows}


def test_the_ack_is_sent_only_after_its_lease_is_committed(store):
    handler = new_handler()
    seen: list[tuple[str, tuple[str, str] | None]] = []
    sent = threading.Event()

    def send(reply: Reply) -> None:
        ip = BOOTP(reply.packet).yiaddr
        seen.append((ip, leases(Store(store.path)).get(ip)))  # a separate connection sees only committed rows
        sent.set()

    persister = Persister(store, send, lambda result: None)
    persister.start()
    offer, ack = dora(handler, "02000000cc01")
    persister.put(ack)
    assert sent.wait(10)
    persister.stop()
    assert seen == [(yiaddr(offer), ("02000000cc01", "bound"))]


def test_leases_survive_a_restart(store):
    handler = new_handler()
    decisions = dora(handler, "02000000cc01") + dora(handler, "02000000cc02")
    commit(store, decisions)
    first = yiaddr(decisions[1])

    restarted = new_handler(store, NOW + 60)
    assert yiaddr(decide(restarted, "02000000cc01", "discover", NOW + 60)) == first
    assert yiaddr(decide(restarted, "02000000cc03", "discover", NOW + 60, requested_addr=first)) != first
    renewal = decide(restarted, "02000000cc01", "request", NOW + 60, ciaddr=first)
    assert BOOTP(renewal.reply.packet).yiaddr == first and renewal.durable


def test_expired_and_orphaned_rows_are_not_loaded(store):
    with store.write() as conn:
        conn.executemany(
            f"INSERT INTO dhcp_leases ({LEASE_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'x')",
            [
                ("10.66.0.10", "02000000cc01", "bound", "10.66.0.0/24", None, None, int(NOW) + 100),
                ("10.66.0.11", "02000000cc02", "bound", "10.66.0.0/24", None, None, int(NOW) - 1),
                ("10.55.0.10", "02000000cc03", "bound", "10.55.0.0/24", None, None, int(NOW) + 100),
            ],
        )
    table = new_handler().table
    stale = table.load(store.conn().execute(f"SELECT {LEASE_COLUMNS} FROM dhcp_leases").fetchall(), NOW)
    assert sorted(write.ip for write in stale) == ["10.55.0.10", "10.66.0.11"]
    assert sorted(table.leases) == [ip_int("10.66.0.10")]


def test_an_address_that_changes_hands_within_one_batch(store):
    handler = new_handler()
    first = dora(handler, "02000000cc01")
    address = yiaddr(first[1])
    release = decide(handler, "02000000cc01", "release", ciaddr=address, server_id=SERVER)
    second = dora(handler, "02000000cc02", want=address)
    third = dora(handler, "02000000cc01")
    commit(store, [*first, release, *second, *third])
    assert yiaddr(second[1]) == address
    assert leases(store) == {address: ("02000000cc02", "bound"), yiaddr(third[1]): ("02000000cc01", "bound")}


def test_a_new_pxe_client_becomes_a_discovered_node_with_its_first_address(store):
    handler = new_handler()
    decisions = dora(handler, "02000000cc01", **PXE)
    assert commit(store, decisions).registered == 1
    node = store.get_node("02000000cc01")
    assert node["status"] == "discovered" and node["arch"] == "amd64"
    assert node["facts"]["dhcp"]["client_arch"] == 7 and node["facts"]["dhcp"]["interface"] == "nf0"
    assert (node["ip"], node["netmask"], node["gateway"], node["dns"]) == (
        yiaddr(decisions[1]),
        "255.255.255.0",
        "10.66.0.1",
        ["10.66.0.53", "10.66.0.54"],
    )
    renewal = decide(handler, "02000000cc01", "request", ciaddr=node["ip"], **PXE)
    commit(store, [renewal])
    events = [(event["source"], event["kind"], event.get("new")) for event in store.node_events("02000000cc01")]
    assert events == [("dhcp", "registered", "discovered"), ("dhcp", "dhcp-address", node["ip"])]


def test_a_known_node_keeps_its_status_and_its_reserved_address(store):
    lifecycle.register(store, "02000000cc01", {"ip": "10.66.0.150", "netmask": "255.255.0.0"}, source="api")
    lifecycle.start_install(store, "02000000cc01", "install", source="api")
    lifecycle.register(store, "02000000cc02", {}, source="api")
    handler = new_handler(store)
    reserved = dora(handler, "02000000cc01", **PXE)
    assert yiaddr(reserved[1]) == "10.66.0.150"
    unreserved = dora(handler, "02000000cc02", **PXE)
    assert commit(store, reserved + unreserved).registered == 0  # both were known: nobody registered again
    node = store.get_node("02000000cc01")
    assert (node["status"], node["ip"], node["netmask"]) == ("installing", "10.66.0.150", "255.255.0.0")
    assert store.get_node("02000000cc02")["ip"] == yiaddr(unreserved[1])


def test_an_address_reserved_through_the_api_a_moment_ago_is_naked_not_acked(store):
    handler = new_handler(store)  # its copy of the nodes predates the reservation
    lifecycle.register(store, "02000000dd01", {"ip": "10.66.0.10"}, source="api")
    sent: list[bytes] = []
    committed: list[BatchResult] = []
    persister = Persister(store, lambda reply: sent.append(reply.packet), committed.append)
    offer, ack = dora(handler, "02000000cc01")
    assert yiaddr(offer) == "10.66.0.10"
    persister.start()
    persister.put(ack)
    persister.stop()
    assert [BOOTP(packet)[DHCP].options[0] for packet in sent] == [("message-type", 6)]
    assert committed[0].refused == {"10.66.0.10": ("02000000cc01", "02000000dd01")}
    assert leases(store) == {}
    handler.table.yield_to_reservation(ip_int("10.66.0.10"), "02000000cc01", "02000000dd01")
    assert yiaddr(decide(handler, "02000000cc01", "discover")) != "10.66.0.10"
    assert yiaddr(dora(handler, "02000000dd01")[1]) == "10.66.0.10"


STORM_ENVIRON = {**ENVIRON, "NF_DHCP_IP_POOL_END": "10.66.255.200", "NF_DHCP_NETMASK": "16"}
STORM = textwrap.dedent(
    """
    import json
    import sys
    from scapy.layers.dhcp import BOOTP, DHCP
    from nodefoundry_server import config
    from nodefoundry_server.dhcp.handler import DhcpHandler, DhcpSettings
    from nodefoundry_server.dhcp.leases import LeaseTable
    from nodefoundry_server.dhcp.persist import Persister
    from nodefoundry_server.store import Store

    settings = DhcpSettings.from_config(config.load(None, json.loads(sys.argv[2])), sys.argv[3])
    handler = DhcpHandler(settings, LeaseTable(settings.subnets, settings.server_ip))
    store = Store(sys.argv[1])

    def sent(reply):
        answer = BOOTP(reply.packet)
        print(bytes(answer.chaddr)[:6].hex(), answer.yiaddr, flush=True)

    persister = Persister(store, sent, lambda result: None)
    persister.start()

    def packet(mac, kind, **options):
        header = BOOTP(op=1, chaddr=bytes.fromhex(mac) + bytes(10), xid=1, flags=0x8000)
        return bytes(header / DHCP(options=[("message-type", kind), *options.items(), "end"]))

    for number in range(60000):
        mac = f"02bb{number % 1000:08x}"  # every client comes back: re-binds mid-storm
        now = 1.8e9 + number // 10
        offer = handler.handle(packet(mac, "discover"), ("0.0.0.0", 68), now)
        address = BOOTP(offer.reply.packet).yiaddr
        ack = handler.handle(packet(mac, "request", server_id=sys.argv[3], requested_addr=address),
                             ("0.0.0.0", 68), now)
        persister.put(ack)
    """
)


def test_no_acked_lease_is_lost_or_shared_after_kill_9_mid_storm(store):
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM, store.path, json.dumps(STORM_ENVIRON), SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, str] = {}  # the last address each client was ACKed
    try:
        for count, line in enumerate(storm.stdout, 1):
            mac, ip = line.split()
            acked[mac] = ip
            if count == 3000:
                break
    finally:
        storm.send_signal(signal.SIGKILL)
        storm.wait()
    assert len(acked) == 1000, storm.stderr.read()
    store.close()
    survivor = Store(store.path)
    assert survivor.integrity_check() == "ok"
    rows = survivor.conn().execute("SELECT ip, mac, subnet FROM dhcp_leases WHERE state = 'bound'").fetchall()
    by_mac = {row["mac"]: row["ip"] for row in rows}
    assert len(by_mac) == len(rows)  # no MAC holds two addresses (and the key allows one MAC per address)
    assert {mac: by_mac.get(mac) for mac in acked} == acked  # every ACK that went out is durable
    restarted = new_handler(survivor, 1.8e9, STORM_ENVIRON)
    assert len(restarted.table.leases) == len(rows)


def test_counters_and_pool_usage_for_health(store):
    handler = new_handler()
    dora(handler, "02000000cc01")
    decide(handler, "02000000cc02", "discover")
    usage = list(handler.table.usage(NOW))
    assert usage == [
        {
            "subnet": "10.66.0.0/24",
            "pool": "10.66.0.10-10.66.0.200",
            "size": 191,
            "leased": 1,
            "declined": 0,
            "offered": 1,
        }
    ]
    assert json.loads(json.dumps(dict(handler.counters))) == {"offer": 2, "ack": 1}
