"""The inventory plugin in real ``ansible-inventory`` / ``ansible-playbook`` processes against a real server.

The fleet is built through the paths real nodes take (see fleet.py). The golden file is the exact
``ansible-inventory --list`` output of the shipped example source, timestamps replaced by a marker.
Regenerate it after an intended change with ``NF_UPDATE_GOLDEN=1 pytest tests/ansible`` and review the diff.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from nodefoundry_agent import facts as agent_facts
from tests.ansible import fleet
from tests.ansible.conftest import BIN, Lab

GOLDEN = Path(__file__).parent / "golden" / "inventory.json"
INJECTION = "{{ lookup('pipe', 'touch pwned') }}"
FACTS = {
    "mac": "525400000004",
    "hostname": "edge-04",
    "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12 (bookworm)"},
    "kernel": "6.1.0-28-arm64",
    "arch": "arm64",
    "machine": "aarch64",
    "board": INJECTION,
    "cpu": {"model": None, "count": 8},
    "memory_bytes": 16 * 1024**3,
    "disks": [{"name": "nvme0n1", "size_bytes": 512110190592}],
    "interfaces": [{"name": "eth0", "mac": "525400000004", "ipv4": ["10.0.0.24"]}],
    "boot_id": "0b5e3c1c-1b0e-4c4e-9a53-000000000004",
    "agent_version": "0.1.0",
}


def build_fleet(lab: Lab) -> None:
    """One node of every kind the inventory distinguishes, and a host-name clash."""
    server = lab.server
    fleet.pxe_boot(server, "525400000001", "arm64")
    fleet.update(server, "525400000001", hostname="edge-01", labels={"rack": "r1"})
    fleet.pxe_boot(server, "525400000002", "x86_64")
    fleet.update(server, "525400000002", labels={"rack": "r2"})
    fleet.installing(server, "525400000003", labels={"rack": "r1"})
    online = fleet.Agent(server, fleet.installed(server, "525400000004", labels={"rack": "r1"}))
    online.online("10.0.0.24", "edge-04", FACTS)
    online.close()
    gone = fleet.Agent(server, fleet.installed(server, "525400000005"))
    gone.online("10.0.0.25", "edge-05", {"arch": "amd64"})
    gone.offline()
    gone.close()
    fleet.failed(server, "525400000006", hostname="edge-06")
    fleet.register(server, "525400000007", hostname="edge-01")


def normalized(listing: dict[str, Any]) -> dict[str, Any]:
    for variables in listing["_meta"]["hostvars"].values():
        if variables.get("nodefoundry_last_heartbeat"):
            variables["nodefoundry_last_heartbeat"] = "<timestamp>"
    return listing


def listed(lab: Lab, source: Path, **kwargs: Any) -> dict[str, Any]:
    done = lab.inventory(source, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_inventory_of_the_example_source_matches_the_golden_file(lab: Lab) -> None:
    build_fleet(lab)
    done = lab.inventory(lab.example_source())
    assert done.returncode == 0, done.stderr
    listing = normalized(json.loads(done.stdout))
    if os.environ.get("NF_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")
    assert listing == json.loads(GOLDEN.read_text())
    assert "host name edge-01 is taken; using node-525400000007" in " ".join(done.stderr.split())


def test_server_side_status_filter(lab: Lab) -> None:
    build_fleet(lab)
    listing = listed(lab, lab.inventory_source(statuses=["discovered", "failed"]))
    assert sorted(listing["_meta"]["hostvars"]) == ["edge-01", "edge-06", "node-525400000002", "node-525400000007"]
    assert "hosts" not in listing.get("installed", {})


def test_remote_strings_are_never_templated_in_a_play(lab: Lab) -> None:
    build_fleet(lab)
    playbook = lab.workdir / "show.yml"
    playbook.write_text(
        "- hosts: online\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.debug:\n        msg: 'board={{ nodefoundry_facts.board }}'\n"
    )
    done = lab.playbook(playbook, lab.example_source())
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'"msg": "board={INJECTION}"' in done.stdout
    assert not (lab.workdir / "pwned").exists()


def test_awx_style_export_keeps_the_enabled_variable_boolean(lab: Lab) -> None:
    """AWX imports with ``ansible-inventory --list --export``; its enabled_var must stay a real boolean."""
    build_fleet(lab)
    listing = listed(lab, lab.example_source(), env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"})
    exported = lab.inventory(lab.example_source(), "--export")
    assert exported.returncode == 0, exported.stderr
    hostvars = json.loads(exported.stdout)["_meta"]["hostvars"]
    assert {name: v["nodefoundry_online"] for name, v in hostvars.items() if v["nodefoundry_online"]} == {
        "edge-04": True
    }
    assert set(hostvars) == set(listing["_meta"]["hostvars"])
    # Only the one fact that could be templated is marked; everything AWX maps to its own fields is plain.
    assert exported.stdout.count("__ansible_unsafe") == 1
    assert hostvars["edge-04"]["ansible_host"] == "10.0.0.24"


def test_real_agent_facts_give_the_full_summary(lab: Lab, tmp_path: Path) -> None:
    """The summary reads the agent's real fact names (gathered on this machine)."""
    gathered = agent_facts.gather("525400000008", tmp_path / "no-boot-id")
    agent = fleet.Agent(lab.server, fleet.installed(lab.server, "525400000008"))
    agent.online("10.0.0.28", "edge-08", json.loads(json.dumps(gathered)))
    agent.close()
    summary = listed(lab, lab.inventory_source())["_meta"]["hostvars"]["edge-08"]["nodefoundry_facts"]
    assert summary["kernel"] == platform.release()
    assert summary["cpu_count"] == os.cpu_count()
    assert summary["memory_mb"] == gathered["memory_bytes"] // 2**20 > 0
    assert summary["os"] == gathered["os"]
    assert summary["agent_version"] == gathered["agent_version"]


def test_unreachable_server_falls_back_to_the_last_known_nodes_with_a_warning(lab: Lab) -> None:
    build_fleet(lab)
    source = lab.inventory_source(last_known_dir=str(lab.workdir / "last-known"))
    before = listed(lab, source)
    lab.server.stop()
    done = lab.inventory(source)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == before
    warning = " ".join(done.stderr.split())
    assert f"nodefoundry inventory: cannot reach the NodeFoundry server at {lab.server.url}: " in warning
    assert "using the node list fetched" in warning


def test_unreachable_server_without_a_last_known_copy_fails_clearly(lab: Lab) -> None:
    lab.server.stop()
    source = lab.inventory_source(last_known_dir=str(lab.workdir / "never-written"))
    done = lab.inventory(source, env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"})
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert (
        f"nodefoundry inventory: cannot reach the NodeFoundry server at {lab.server.url}: [Errno 111] Connection "
        "refused (and no last known node list to fall back on)" in message
    )


def test_fallback_can_be_switched_off(lab: Lab) -> None:
    source = lab.inventory_source(last_known_dir=str(lab.workdir / "last-known"), fallback_to_last_known=False)
    listed(lab, source)
    lab.server.stop()
    done = lab.inventory(source, env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"})
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert f"nodefoundry inventory: cannot reach the NodeFoundry server at {lab.server.url}: " in message
    assert "last known" not in message


def test_a_bad_token_is_an_error_not_a_fallback(lab: Lab) -> None:
    source = lab.inventory_source(last_known_dir=str(lab.workdir / "last-known"))
    listed(lab, source)
    done = lab.inventory(source, env={"NODEFOUNDRY_TOKEN": "nf_wrong", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"})
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "nodefoundry inventory: GET /api/v1/nodes: HTTP 401: missing or invalid token (check the token)" in message
    assert "last known" not in message


def test_a_read_only_token_is_enough(lab: Lab) -> None:
    build_fleet(lab)
    created = lab.run(BIN / "nodefoundry-server", "token", "create", "--name", "inventory", "--role", "readonly",
                      env=lab.server.env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    done = lab.inventory(lab.inventory_source(), env={"NODEFOUNDRY_TOKEN": created.stdout.strip()})
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["_meta"]["hostvars"]) == 7
