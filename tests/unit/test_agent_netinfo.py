"""Node identity: the MAC of the physical NIC, read from (fake) /proc/net and /sys/class/net trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodefoundry_agent import netinfo

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.sys_net = root / "sys" / "class" / "net"
        self.proc_net = root / "proc" / "net"
        self.sys_net.mkdir(parents=True)
        self.proc_net.mkdir(parents=True)
        (self.proc_net / "route").write_text(ROUTE_HEADER)

    def interface(self, name: str, mac: str, physical: bool, kind: str = "1", state: str = "up") -> None:
        directory = self.sys_net / name
        directory.mkdir()
        (directory / "address").write_text(mac + "\n")
        (directory / "type").write_text(kind + "\n")
        (directory / "operstate").write_text(state + "\n")
        if physical:
            (directory / "device").mkdir()

    def default_route(self, name: str, metric: int = 0, flags: str = "0003") -> None:
        with (self.proc_net / "route").open("a") as route:
            route.write(f"{name}\t00000000\t0102A8C0\t{flags}\t0\t0\t{metric}\t00000000\t0\t0\t0\n")

    def detect(self) -> str | None:
        return netinfo.detect_mac(self.sys_net, self.proc_net)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.mark.parametrize(
    ("text", "mac"),
    [
        ("aa:bb:cc:dd:ee:ff", "aabbccddeeff"),
        ("AA-BB-CC-DD-EE-FF", "aabbccddeeff"),
        ("aabb.ccdd.eeff", "aabbccddeeff"),
        (" aabbccddeeff\n", "aabbccddeeff"),
        ("aa:bb-cc:dd:ee:ff", None),
        ("aa:bb:cc:dd:ee", None),
        ("gg:bb:cc:dd:ee:ff", None),
        ("00:00:00:00:00:00", None),
        ("ff:ff:ff:ff:ff:ff", None),
        ("", None),
    ],
)
def test_normalise_mac(text: str, mac: str | None):
    assert netinfo.normalise_mac(text) == mac


def test_the_physical_nic_with_the_default_route(host: FakeHost):
    host.interface("eth0", "52:54:00:00:00:01", physical=True)
    host.interface("eth1", "52:54:00:00:00:02", physical=True)
    host.default_route("eth1")
    assert host.detect() == "525400000002"


def test_the_lowest_metric_default_route_wins(host: FakeHost):
    host.interface("eth0", "52:54:00:00:00:01", physical=True)
    host.interface("wlan0", "52:54:00:00:00:03", physical=True)
    host.default_route("wlan0", metric=600)
    host.default_route("eth0", metric=100)
    host.default_route("eth0", metric=50, flags="0002")  # not up
    assert host.detect() == "525400000001"


def test_a_bridge_veth_or_docker_interface_is_never_the_identity(host: FakeHost):
    host.interface("br0", "02:42:00:00:00:09", physical=False)
    host.interface("docker0", "02:42:00:00:00:0a", physical=False)
    host.interface("veth1a2b", "02:42:00:00:00:0b", physical=False)
    host.interface("ib0", "80:00:00:00:00:0c", physical=True, kind="32")  # infiniband: no Ethernet MAC
    host.interface("enp1s0", "52:54:00:00:00:01", physical=True, state="down")
    host.interface("enp2s0", "52:54:00:00:00:02", physical=True)
    host.default_route("br0")  # the bridge carries the route: fall back to a physical NIC, an up one first
    assert host.detect() == "525400000002"


def test_no_physical_nic_means_no_identity(host: FakeHost):
    host.interface("veth0", "02:42:00:00:00:0b", physical=False)
    host.default_route("veth0")
    assert host.detect() is None


def test_ipv6_addresses_per_interface(host: FakeHost):
    (host.proc_net / "if_inet6").write_text(
        "fe800000000000005054fffe000001 02 40 20 80     eth0\n"  # malformed (31 digits): skipped
        "fe80000000000000505400fffe000001 02 40 20 80     eth0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n"
    )
    assert netinfo.ipv6_addresses(host.proc_net) == {"eth0": ["fe80::5054:ff:fe00:1"], "lo": ["::1"]}


def test_loopback_has_an_ipv4_address():
    assert netinfo.ipv4_address("lo") == "127.0.0.1"
    assert netinfo.ipv4_address("no-such-interface") is None
