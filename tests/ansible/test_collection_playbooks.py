"""The collection's playbooks as operators run them: ``ansible-playbook install.yml -l discovered`` (and a
narrower limit), check mode, the reinstall confirmation, and the same install driven through ansible-runner
the way an AWX job runs it (the inventory imported with ``ansible-inventory --list --export`` first).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import ansible_runner

from tests.ansible import fleet
from tests.ansible.conftest import REPO, Lab

INSTALL = REPO / "playbooks" / "install.yml"
REINSTALL = REPO / "playbooks" / "reinstall.yml"
# mac -> (how the node gets there, rack label)
FLEET = {
    "525400000201": ("discovered", "r1"),
    "525400000202": ("discovered", "r1"),
    "525400000203": ("discovered", "r2"),
    "525400000204": ("installed", "r1"),
    "525400000205": ("failed", "r1"),
    "525400000206": ("installing", "r1"),
}
# The inventory source settings docs/awx.md gives.
ENABLED_VAR, ENABLED_VALUE = "nodefoundry_enabled", "True"
RACK_GROUPS = [{"key": "nodefoundry_labels.rack | default('none')", "prefix": "rack"}]


def build_fleet(lab: Lab) -> Path:
    """The mixed fleet, and an inventory source with rack groups."""
    make = {"discovered": fleet.register, "installed": fleet.installed, "failed": fleet.failed}
    for mac, (status, rack) in FLEET.items():
        make.get(status, fleet.installing)(lab.server, mac, labels={"rack": rack})
    assert {mac: lab.node(mac)["status"] for mac in FLEET} == {mac: status for mac, (status, _) in FLEET.items()}
    return lab.inventory_source(keyed_groups=RACK_GROUPS)


def statuses(lab: Lab) -> dict[str, str]:
    return {mac: lab.node(mac)["status"] for mac in FLEET}


def of(snapshot: dict[str, Any], macs: list[str]) -> dict[str, Any]:
    """The part of a snapshot that concerns ``macs``."""
    return {
        "nodes": [node for node in snapshot["nodes"] if node["mac"] in macs],
        "events": {mac: snapshot["events"][mac] for mac in macs},
    }


def recap(stdout: str) -> dict[str, str]:
    """PLAY RECAP: host -> its changed= count."""
    found = re.findall(r"^(\S+)\s+: ok=\d+\s+(changed=\d+)", stdout, re.MULTILINE)
    return dict(found)


def assert_installs_exactly(lab: Lab, before: dict[str, Any], started: list[str]) -> None:
    """``started`` moved discovered -> installing with one install event each; nothing else changed at all."""
    after = lab.snapshot()
    others = [mac for mac in FLEET if mac not in started]
    assert of(after, others) == of(before, others)
    for mac in started:
        new = after["events"][mac][len(before["events"][mac]) :]
        assert [(e["kind"], e["old"], e["new"]) for e in new] == [("install", "discovered", "installing")], new
        assert lab.node(mac)["status"] == "installing"


def test_install_limited_to_discovered_installs_exactly_those(lab: Lab) -> None:
    inventory = build_fleet(lab)
    before = lab.snapshot()
    done = lab.playbook(INSTALL, inventory, "-l", "discovered")
    assert done.returncode == 0, done.stdout + done.stderr
    started = ["525400000201", "525400000202", "525400000203"]
    assert_installs_exactly(lab, before, started)
    for mac in started:
        assert f"node-{mac} ({mac}): started, status installing" in done.stdout
    assert '"started": 3,' in done.stdout and '"errors": 0,' in done.stdout
    # Every task runs once for the play (on its first host): one bulk call, one report.
    assert recap(done.stdout) == {"node-525400000201": "changed=1"}

    # The same nodes again (now installing, so no longer in "discovered"): nothing changes.
    again = lab.snapshot()
    same = ",".join(f"node-{mac}" for mac in started)
    second = lab.playbook(INSTALL, inventory, "-e", "nodefoundry_hosts=all", "-l", same)
    assert second.returncode == 0, second.stdout + second.stderr
    assert lab.snapshot() == again
    assert recap(second.stdout) == {"node-525400000201": "changed=0"}
    for mac in started:
        assert f"node-{mac} ({mac}): unchanged, status installing" in second.stdout
    assert '"unchanged": 3' in second.stdout


def test_a_narrower_limit_leaves_the_other_discovered_nodes_alone(lab: Lab) -> None:
    inventory = build_fleet(lab)
    before = lab.snapshot()
    done = lab.playbook(INSTALL, inventory, "-l", "discovered:&rack_r1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_installs_exactly(lab, before, ["525400000201", "525400000202"])
    assert statuses(lab)["525400000203"] == "discovered"


def test_install_in_check_mode_changes_nothing(lab: Lab) -> None:
    inventory = build_fleet(lab)
    before = lab.snapshot()
    done = lab.playbook("nodefoundry.provision.install", inventory, "-l", "discovered", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert lab.snapshot() == before
    assert "node-525400000203 (525400000203): started, status installing" in done.stdout
    assert "changed=1" in done.stdout


def test_reinstall_needs_the_confirmation(lab: Lab) -> None:
    inventory = build_fleet(lab)
    before = lab.snapshot()
    refused = lab.playbook(REINSTALL, inventory)
    assert refused.returncode != 0
    assert "Reinstalling wipes the disks of 2 node(s). Run again with -e nodefoundry_confirm_reinstall=true" in (
        " ".join(refused.stdout.split())
    )
    assert lab.snapshot() == before

    done = lab.playbook(REINSTALL, inventory, "-e", "nodefoundry_confirm_reinstall=true")
    assert done.returncode == 0, done.stdout + done.stderr
    reinstalled = ["525400000204", "525400000205"]
    assert {mac: status for mac, status in statuses(lab).items() if mac in reinstalled} == dict.fromkeys(
        reinstalled, "installing"
    )
    others = [mac for mac in FLEET if mac not in reinstalled]
    assert of(lab.snapshot(), others) == of(before, others)


def awx_enabled(variables: dict[str, Any]) -> bool:
    """AWX's test for an enabled host (inventory_import: the enabled variable compared as lower-case text)."""
    return str(variables.get(ENABLED_VAR)).lower() == ENABLED_VALUE.lower()


def awx_inventory(lab: Lab, source: Path, directory: Path) -> dict[str, Any]:
    """What AWX does: an inventory update imports ``ansible-inventory --list --export`` (with the enabled
    variable of docs/awx.md); a job gets the enabled hosts back from an executable inventory script."""
    imported = lab.inventory(source, "--export", env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"})
    assert imported.returncode == 0, imported.stderr
    data = json.loads(imported.stdout)
    hostvars = {name: v for name, v in data["_meta"]["hostvars"].items() if awx_enabled(v)}
    groups = {
        name: {**body, "hosts": [host for host in body["hosts"] if host in hostvars]}
        for name, body in data.items()
        if name != "_meta" and "hosts" in body
    }
    data = {**data, **groups, "_meta": {"hostvars": hostvars}}
    directory.mkdir(parents=True)
    script = directory / "hosts"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\nprint(json.dumps({data!r} if '--list' in sys.argv else {{}}))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return data


def test_install_through_ansible_runner_like_an_awx_job(lab: Lab) -> None:
    source = build_fleet(lab)
    private = lab.workdir / "runner"
    (private / "project").mkdir(parents=True)
    shutil.copy(INSTALL, private / "project" / "install.yml")
    gone = fleet.Agent(lab.server, fleet.installed(lab.server, "525400000207"))
    gone.online("10.0.0.27", "edge-27", {})
    gone.offline()
    gone.close()
    job_inventory = awx_inventory(lab, source, private / "inventory")
    assert "edge-27" not in job_inventory["_meta"]["hostvars"]  # offline: disabled, left out of jobs
    assert len(job_inventory["_meta"]["hostvars"]) == len(FLEET)  # discovered, installing, failed: all enabled
    before = lab.snapshot()
    credential = {"NODEFOUNDRY_URL": lab.server.url, "NODEFOUNDRY_TOKEN": lab.env["NODEFOUNDRY_TOKEN"]}
    keep = ("PATH", "HOME", "ANSIBLE_CONFIG", "ANSIBLE_HOME", "ANSIBLE_LOCAL_TEMP", "ANSIBLE_COLLECTIONS_PATH")
    result = ansible_runner.run(
        private_data_dir=str(private),
        playbook="install.yml",
        limit="discovered",
        envvars={**{key: lab.env[key] for key in keep}, **credential},
        quiet=True,
        timeout=600,
    )
    output = result.stdout.read()
    assert (result.status, result.rc) == ("successful", 0), output
    assert_installs_exactly(lab, before, ["525400000201", "525400000202", "525400000203"])
    started = [
        event["event_data"]["res"]["summary"]
        for event in result.events
        if event["event"] == "runner_on_ok" and event["event_data"].get("task_action", "").endswith("node_install")
    ]
    assert started == [{"started": 3, "unchanged": 0, "errors": 0}], output
    assert result.stats["changed"] == {"node-525400000201": 1}
