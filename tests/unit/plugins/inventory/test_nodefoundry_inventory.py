"""The inventory plugin's pure parts: host variables (remote strings unsafe) and host naming.

The plugin is loaded by name through Ansible's plugin loader, so its documented options and defaults
apply as in ``ansible-inventory``; ``tests/ansible/`` runs it against a real server.
"""

from __future__ import annotations

import pytest
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import inventory_loader
from ansible.template import Templar
from ansible.utils.unsafe_proxy import AnsibleUnsafe
from ansible_collections.nodefoundry.provision.plugins.inventory.nodefoundry import (
    fact_summary,
    node_vars,
    reuse_compiled_templates,
)

INJECTION = "{{ lookup('pipe', 'touch /tmp/nodefoundry-pwned') }}"
AGENT_FACTS = {
    "mac": "525400000001",
    "hostname": "edge-01",
    "os": {"id": "debian", "version_id": "12"},
    "kernel": "6.1.0-28-arm64",
    "arch": "arm64",
    "machine": "aarch64",
    "board": "Radxa ROCK 5B",
    "cpu": {"model": None, "count": 8},
    "memory_bytes": 16 * 1024**3,
    "disks": [{"name": "nvme0n1"}],
    "interfaces": [{"name": "eth0"}],
    "boot_id": "0b5e3c1c-0000-4000-8000-000000000001",
    "agent_version": "0.1.0",
}


def node(mac: str, **fields) -> dict:
    return {"mac": mac, "status": "discovered", "liveness": "unknown", "labels": {}, "facts": {}, **fields}


def populated(nodes: list[dict], **options) -> InventoryData:
    plugin = inventory_loader.get("nodefoundry.provision.nodefoundry")
    plugin.inventory = InventoryData()
    plugin.templar = Templar(loader=DataLoader())
    direct = {"plugin": "nodefoundry.provision.nodefoundry", "url": "http://127.0.0.1:9", "token": "t", **options}
    plugin.set_options(direct=direct)
    plugin._populate(nodes)  # pylint: disable=protected-access
    return plugin.inventory


def strings_in(value):
    """Every string inside ``value``, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)


def test_remote_strings_that_could_be_templated_are_unsafe_and_only_those() -> None:
    """Plain strings stay plain: AWX would import an unsafe one as a dict (community.general#8212)."""
    variables = node_vars(
        node(
            "525400000001",
            hostname="edge-01",
            ip="10.0.0.21",
            labels={"rack": "r1"},
            facts={"agent": dict(AGENT_FACTS, kernel=INJECTION, os={INJECTION: ["a}", "b"]})},
        )
    )
    texts = list(strings_in(list(variables.values())))
    unsafe = sorted(text for text in texts if isinstance(text, AnsibleUnsafe))
    assert unsafe == sorted([INJECTION, INJECTION, "a}"])
    assert len(texts) > len(unsafe)
    assert not any(isinstance(text, AnsibleUnsafe) for text in texts if text not in unsafe)
    assert not isinstance(variables["ansible_host"], AnsibleUnsafe)


def test_an_unsafe_fact_is_never_templated() -> None:
    variables = node_vars(node("525400000001", facts={"agent": dict(AGENT_FACTS, board=INJECTION)}))
    templar = Templar(loader=DataLoader(), variables=variables)
    rendered = templar.template("{{ nodefoundry_facts.board }}")
    assert rendered == INJECTION
    assert isinstance(rendered, AnsibleUnsafe)


def test_host_variables_of_a_node() -> None:
    variables = node_vars(
        node(
            "525400000001",
            status="installed",
            liveness="online",
            arch="arm64",
            hostname="edge-01",
            ip="10.0.0.21",
            labels={"rack": "r1"},
            last_heartbeat="2026-11-24T17:00:00.000Z",
            facts={"agent": AGENT_FACTS, "uptime": 12},
        )
    )
    assert variables == {
        "ansible_host": "10.0.0.21",
        "nodefoundry_mac": "525400000001",
        "nodefoundry_status": "installed",
        "nodefoundry_liveness": "online",
        "nodefoundry_online": True,
        "nodefoundry_enabled": True,
        "nodefoundry_arch": "arm64",
        "nodefoundry_hostname": "edge-01",
        "nodefoundry_ip": "10.0.0.21",
        "nodefoundry_labels": {"rack": "r1"},
        "nodefoundry_last_heartbeat": "2026-11-24T17:00:00.000Z",
        "nodefoundry_facts": {
            "os": {"id": "debian", "version_id": "12"},
            "kernel": "6.1.0-28-arm64",
            "arch": "arm64",
            "machine": "aarch64",
            "board": "Radxa ROCK 5B",
            "cpu_count": 8,
            "memory_mb": 16384,
            "boot_id": "0b5e3c1c-0000-4000-8000-000000000001",
            "agent_version": "0.1.0",
        },
    }


def test_a_node_without_address_gets_no_ansible_host() -> None:
    variables = node_vars(node("525400000001"))
    assert "ansible_host" not in variables
    assert variables["nodefoundry_online"] is False
    assert variables["nodefoundry_facts"] == {}


@pytest.mark.parametrize("facts", [None, {}, {"agent": None}, {"agent": "garbage"}, {"uptime": 5}, "garbage"])
def test_missing_or_odd_facts_give_an_empty_summary(facts) -> None:
    assert fact_summary(facts) == {}


def test_hosts_are_named_by_hostname_else_by_mac() -> None:
    inventory = populated([node("525400000002"), node("525400000001", hostname="edge-01")])
    assert sorted(inventory.hosts) == ["edge-01", "node-525400000002"]


def test_a_taken_name_falls_back_to_the_mac_for_the_later_mac(capsys) -> None:
    nodes = [node("525400000003", hostname="edge"), node("525400000001", hostname="edge")]
    inventory = populated(nodes)
    assert sorted(inventory.hosts) == ["edge", "node-525400000003"]
    assert inventory.get_host("edge").vars["nodefoundry_mac"] == "525400000001"
    assert "host name edge is taken; using node-525400000003" in capsys.readouterr().err.replace("\n", " ")


def test_naming_is_deterministic_whatever_the_server_order() -> None:
    nodes = [node(f"5254000000{index:02d}", hostname=f"edge-{index % 3}") for index in range(10)]
    assert sorted(populated(nodes).hosts) == sorted(populated(list(reversed(nodes))).hosts)


def test_hostnames_entries_and_templates() -> None:
    nodes = [
        node("525400000001", ip="10.0.0.21", hostname="edge-01"),
        node("525400000002", labels={"rack": "r7"}),
        node("525400000003"),
    ]
    entries = ["ip", "'rack-' ~ nodefoundry_labels.rack if nodefoundry_labels.rack is defined else ''", "mac"]
    assert sorted(populated(nodes, hostnames=entries).hosts) == ["10.0.0.21", "node-525400000003", "rack-r7"]


def test_status_and_liveness_groups() -> None:
    nodes = [
        node("525400000001", status="installed", liveness="online"),
        node("525400000002", status="installed", liveness="offline"),
        node("525400000003", status="failed"),
        node("525400000004", status="installing"),
        node("525400000005"),
    ]
    groups = {name: sorted(host.name for host in group.get_hosts()) for name, group in populated(nodes).groups.items()}
    assert groups["installed"] == ["node-525400000001", "node-525400000002"]
    assert groups["online"] == ["node-525400000001"]
    assert groups["offline"] == ["node-525400000002"]
    assert groups["failed"] == ["node-525400000003"]
    assert groups["installing"] == ["node-525400000004"]
    assert groups["discovered"] == ["node-525400000005"]


def test_entries_that_are_not_nodes_are_left_out() -> None:
    inventory = populated([node("525400000001"), {"status": "discovered"}, "garbage", {"mac": 12}])
    assert sorted(inventory.hosts) == ["node-525400000001"]


def test_an_installed_node_gets_its_architecture_from_the_agent() -> None:
    assert node_vars(node("525400000001", facts={"agent": AGENT_FACTS}))["nodefoundry_arch"] == "arm64"
    assert node_vars(node("525400000001", arch="amd64", facts={"agent": AGENT_FACTS}))["nodefoundry_arch"] == "amd64"


@pytest.mark.parametrize(
    ("status", "liveness", "enabled"),
    [
        ("discovered", "unknown", True),
        ("installing", "unknown", True),
        ("failed", "unknown", True),
        ("installed", "online", True),
        ("installed", "unknown", True),
        ("installed", "offline", False),
    ],
)
def test_only_a_node_known_to_be_down_is_disabled(status: str, liveness: str, enabled: bool) -> None:
    assert node_vars(node("525400000001", status=status, liveness=liveness))["nodefoundry_enabled"] is enabled


def test_each_expression_is_compiled_once_not_once_per_host() -> None:
    """The plugin's keyed groups over many hosts: same groups, one Jinja2 compilation per expression."""
    plugin = inventory_loader.get("nodefoundry.provision.nodefoundry")
    plugin.inventory = InventoryData()
    plugin.templar = Templar(loader=DataLoader())
    compiled = []
    real_from_string = plugin.templar.environment.from_string
    plugin.templar.environment.from_string = lambda source: compiled.append(source) or real_from_string(source)
    reuse_compiled_templates(plugin.templar)
    keyed = [{"key": "nodefoundry_labels.rack | default('none')", "prefix": "rack"}]
    plugin.set_options(direct={"plugin": plugin.NAME, "url": "http://127.0.0.1:9", "token": "t", "keyed_groups": keyed})
    nodes = [node(f"5254000001{index:02x}", labels={"rack": f"r{index % 4}"}) for index in range(100)]
    plugin._populate(nodes)  # pylint: disable=protected-access
    groups = {
        name: len(group.get_hosts()) for name, group in plugin.inventory.groups.items() if name.startswith("rack")
    }
    assert groups == {"rack_r0": 25, "rack_r1": 25, "rack_r2": 25, "rack_r3": 25}
    assert compiled == ["{{nodefoundry_labels.rack | default('none')}}"]
