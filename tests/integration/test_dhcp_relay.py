"""A client behind a real relay (ISC dhcrelay) gets an address from its own subnet's pool.

    server ns 10.77.0.1 ── switch ── relay ns 10.77.0.3 | dhcrelay | 10.78.0.1 ── client ns

The relay sets giaddr 10.78.0.1; the server picks the NF_DHCP_SUBNETS entry containing it and
answers the relay (unicast to giaddr:67). The relay also routes, so the client's unicast
renewals and its release reach the server directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.integration.dhcp_lab import (
    NETMASK,
    POOL_END,
    POOL_START,
    RELAYED_POOL,
    RELAYED_SUBNET,
    SERVER_IP,
    DhcpLab,
    assert_pool_consistent,
    bound_leases,
    dhcp_lab,
    node,
    wait_until,
)

RELAYED_GATEWAY = f"{RELAYED_SUBNET}.1"
RELAYED_DNS = f"{RELAYED_SUBNET}.53"
SUBNETS = [
    {
        "pool_start": RELAYED_POOL[0],
        "pool_end": RELAYED_POOL[1],
        "netmask": NETMASK,
        "gateway": RELAYED_GATEWAY,
        "dns": RELAYED_DNS,
        "lease_time": 300,
    }
]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DhcpLab]:
    with dhcp_lab(tmp_path) as built:
        yield built


def in_relayed_pool(address: str) -> bool:
    return ip_address(RELAYED_POOL[0]) <= ip_address(address) <= ip_address(RELAYED_POOL[1])


def test_client_behind_dhcrelay_gets_an_address_of_the_relays_subnet(lab: DhcpLab) -> None:
    server = lab.server({"NF_DHCP_SUBNETS": json.dumps(SUBNETS)})
    _relay, client_host = lab.relayed_client()

    client = lab.udhcpc(client_host, pxe=True, once=False)
    bound = client.wait_event("bound", timeout=20)
    address = bound["ip"]
    assert in_relayed_pool(address), f"{address} is not from the relayed pool {RELAYED_POOL}\n{lab.details()}"
    assert bound["subnet"] == NETMASK
    assert bound["router"] == RELAYED_GATEWAY
    assert bound["dns"].split() == [RELAYED_DNS]
    assert bound["lease"] == "300"
    assert bound["serverid"] == SERVER_IP
    relay_log = (lab.workdir / "dhcrelay.log").read_text()
    assert f"BOOTREPLY giaddr: {RELAYED_GATEWAY}" in relay_log, relay_log  # the answer went to the relay

    # RENEWING: unicast from the client's address straight to the server (routed by the relay host).
    assert client.renew()["ip"] == address
    server.crash()
    lab.start(server)
    assert client.renew()["ip"] == address
    client.stop()

    found = node(server, client_host.mac)
    assert found is not None and found["status"] == "discovered", found
    assert found["ip"] == address and found["netmask"] == NETMASK and found["dns"] == [RELAYED_DNS], found

    # dhclient: a fresh lease, then INIT-REBOOT through the relay for an address that is not in the
    # server's own subnet (a NAK here would mean the server judged it by the wrong subnet).
    plain = lab.dhclient(client_host)
    first = plain.obtain()
    assert first["new_ip_address"] == address, plain.details()  # the same MAC keeps its lease
    plain.stop()
    again = plain.obtain()
    assert (again.kind, again["new_ip_address"]) == ("REBOOT", address), plain.details()
    assert "DHCPNAK" not in plain.output()
    plain.release()
    wait_until(lambda: address not in bound_leases(server), 10, "the released lease to disappear", plain.details)
    assert_pool_consistent(server, [RELAYED_POOL, (POOL_START, POOL_END)])

    # A client on the server's own segment still gets the server subnet's pool.
    local = lab.udhcpc(lab.host()).lease()
    assert ip_address(POOL_START) <= ip_address(local) <= ip_address(POOL_END), local
