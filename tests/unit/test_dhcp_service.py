"""The DHCP service with real sockets (on ``lo``, ports of the test's own) and its start-up checks."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from nodefoundry_server import config
from nodefoundry_server.config import Config, ConfigError
from nodefoundry_server.dhcp import DhcpService, preflight
from nodefoundry_server.runtime import banner
from nodefoundry_server.store import Store
from tests.conftest import SERVER_BIN
from tests.netns import namespaces

MAC = "02000000ee01"


def free_port_pair() -> int:
    """A UDP port whose successor (the client port) is free as well."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("", port + 1))
                return port
            except OSError:
                continue


def load(tmp_path: Path, **env: str) -> Config:
    environ = {
        "NF_DHCP_INTERFACE": "lo",
        "NF_DHCP_ADDR": f":{free_port_pair()}",
        "NF_DHCP_IP_POOL_START": "127.0.0.100",
        "NF_DHCP_IP_POOL_END": "127.0.0.120",
        "NF_DHCP_NETMASK": "255.0.0.0",
        "NF_DHCP_LEASE_TIME": "600",
        "NF_DB_PATH": str(tmp_path / "nodes.db"),
        "NF_ASSETS_DIR": str(tmp_path / "assets"),
        "NF_HTTP_ADDR": "127.0.0.1:8080",
        **env,
    }
    return config.load(None, environ)


def port_of(cfg: Config) -> int:
    return int(cfg.dhcp_addr.rsplit(":", 1)[1])


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load(tmp_path)


@pytest.fixture
def store(cfg: Config) -> Store:
    store = Store(cfg.db_path)
    store.open()
    return store


@pytest.fixture
def client(cfg: Config) -> Iterator[socket.socket]:
    """The client's socket on the client port (server port + 1), where broadcast replies arrive."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("", port_of(cfg) + 1))
    sock.settimeout(10)
    yield sock
    sock.close()


def exchange(cfg: Config, client: socket.socket, kind: str, ciaddr: str = "0.0.0.0", **options: object) -> BOOTP:
    header = BOOTP(op=1, chaddr=bytes.fromhex(MAC) + bytes(10), xid=99, flags=0x8000, ciaddr=ciaddr)
    client.sendto(
        bytes(header / DHCP(options=[("message-type", kind), *options.items(), "end"])), ("127.0.0.1", port_of(cfg))
    )
    data, _ = client.recvfrom(2048)
    return BOOTP(data)


def message_type(reply: BOOTP) -> int:
    return next(option[1] for option in reply[DHCP].options if option[0] == "message-type")


def test_dora_through_real_sockets_and_the_lease_survives_a_restart(cfg, store, client):
    service = DhcpService(cfg, store)
    service.start()
    try:
        offer = exchange(cfg, client, "discover")
        assert message_type(offer) == 2 and offer.yiaddr == "127.0.0.100"
        ack = exchange(cfg, client, "request", server_id="127.0.0.1", requested_addr=offer.yiaddr)
        assert message_type(ack) == 5 and ack.yiaddr == "127.0.0.100"
        row = store.conn().execute("SELECT mac, state FROM dhcp_leases WHERE ip = '127.0.0.100'").fetchone()
        assert tuple(row) == (MAC, "bound")  # in the store before the ACK arrived
    finally:
        service.stop()

    restarted = DhcpService(cfg, store)
    restarted.start()
    try:
        renewal = exchange(cfg, client, "request", ciaddr="127.0.0.100")
        assert message_type(renewal) == 5 and renewal.yiaddr == "127.0.0.100"
        restarted._publish()  # what housekeeping does within a second
        component = store.components()["dhcp"]
        detail = json.loads(component["detail"])
        assert component["state"] == "ok"
        assert detail["mode"] == "standard" and detail["interface"] == "lo"
        assert detail["counters"] == {"ack": 1}
        assert detail["pools"][0]["leased"] == 1 and detail["pools"][0]["size"] == 21
    finally:
        restarted.stop()


def test_a_taken_port_makes_start_raise_and_report(cfg, store):
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("", port_of(cfg)))
    try:
        service = DhcpService(cfg, store)
        with pytest.raises(OSError):
            service.start()
        assert service._threads == [] and service._sockets == {}  # nothing half-running
        component = store.components()["dhcp"]
        assert component["state"] == "error" and "lo" in component["detail"]
        with pytest.raises(ConfigError, match=rf"^NF_DHCP_ADDR: cannot listen on UDP port {port_of(cfg)} on lo: "):
            preflight(cfg)
    finally:
        holder.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NF_DHCP_INTERFACE": "nfnothere0"}, "NF_DHCP_INTERFACE: no network interface named 'nfnothere0'"),
        (
            {"NF_DHCP_IP_POOL_START": "10.9.0.10", "NF_DHCP_IP_POOL_END": "10.9.0.20", "NF_DHCP_NETMASK": "24"},
            "NF_DHCP_IP_POOL_START/NF_DHCP_IP_POOL_END: the pool 10.9.0.10-10.9.0.20 is outside the subnet"
            " 127.0.0.0/8 of lo (127.0.0.1)",
        ),
        (
            {"NF_DHCP_IP_POOL_START": "", "NF_DHCP_IP_POOL_END": ""},
            "NF_DHCP_IP_POOL_START/NF_DHCP_IP_POOL_END: required to hand out addresses on lo",
        ),
        (
            {"NF_DHCP_SUBNETS": '[{"pool_start": "127.0.0.150", "pool_end": "127.0.0.160", "netmask": "16"}]'},
            "NF_DHCP_SUBNETS: subnet 127.0.0.0/16 overlaps 127.0.0.0/8",
        ),
    ],
)
def test_preflight_names_the_setting_in_one_line(tmp_path, env, message):
    with pytest.raises(ConfigError) as failure:
        preflight(load(tmp_path, **env))
    assert str(failure.value).startswith(message)
    assert "\n" not in str(failure.value)


def test_proxy_mode_needs_no_pool_but_port_4011(tmp_path):
    cfg = load(tmp_path, NF_DHCP_PROXY_MODE="true", NF_DHCP_IP_POOL_START="", NF_DHCP_IP_POOL_END="")
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    holder.bind(("", 4011))
    try:
        with pytest.raises(ConfigError, match=r"^NF_DHCP_PROXY_MODE: cannot listen on UDP port 4011 on lo: "):
            preflight(cfg)
    finally:
        holder.close()
    preflight(cfg)


def test_an_interface_without_ipv4_stops_the_server_in_one_line(tmp_path):
    with namespaces("nfdh") as (namespace,):
        namespace.ip("link", "add", "nfdummy0", "type", "veth", "peer", "name", "nfdummy1")
        namespace.ip("link", "set", "nfdummy0", "up")
        env = {"NF_DHCP_INTERFACE": "nfdummy0", "NF_DB_PATH": str(tmp_path / "db" / "nodes.db")}
        result = subprocess.run(
            namespace.command("env", *(f"{key}={value}" for key, value in env.items()), str(SERVER_BIN), "run"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 2
    assert result.stderr == "nodefoundry-server: NF_DHCP_INTERFACE: interface nfdummy0 has no IPv4 address\n"


def test_the_banner_describes_the_dhcp_service(cfg):
    text = banner(cfg, "127.0.0.1", 8080, None, Path("admin.token"))
    dhcp_line = next(line for line in text.splitlines() if line.startswith("  DHCP"))
    assert f"on lo (127.0.0.1) port {port_of(cfg)}, pool 127.0.0.100-127.0.0.120" in dhcp_line
    assert "http://127.0.0.1:8080/boot.ipxe" in dhcp_line
