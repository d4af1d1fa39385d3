"""Every module in a real ``ansible`` process against a real server: a normal run, a ``--check`` run that
leaves the server exactly as it was (all nodes and every event history compared), the ``--diff`` output,
a second run that changes nothing, and one clear message for each way a call can fail.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import pytest

from tests.ansible import fleet
from tests.ansible.conftest import BIN, Lab

MAC = "525400000101"
SPELLED = "52:54:00:00:01:01"
NODE_ARGS = {
    "mac": SPELLED,
    "hostname": "Edge-11",
    "ip": "10.0.0.11",
    "netmask": "24",
    "gateway": "10.0.0.1",
    "dns": ["10.0.0.1"],
    "labels": {"rack": 1},
}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def checked_then_done(lab: Lab, module: str, args: dict[str, Any], *macs: str) -> tuple[dict, dict, str]:
    """Run with --check --diff (asserting the server did not change), then for real with --diff.

    Returns both results and the diff, which must be the same in both runs.
    """
    before = lab.snapshot(*macs)
    checked, check_diff = lab.module(module, args, "--check", "--diff")
    assert lab.snapshot(*macs) == before
    done, diff = lab.module(module, args, "--diff")
    assert diff == check_diff
    return checked, done, diff


def unchanged_on_second_run(lab: Lab, module: str, args: dict[str, Any], *macs: str) -> dict:
    before = lab.snapshot(*macs)
    again, diff = lab.module(module, args, "--diff")
    assert (again["_state"], again["changed"], diff) == ("SUCCESS", False, "")
    assert lab.snapshot(*macs) == before
    return again


def event_kinds(lab: Lab, mac: str) -> list[str]:
    return [event["kind"] for event in lab.snapshot(mac)["events"][mac]]


# -- node ----------------------------------------------------------------------------------------------


def test_node_registers_with_all_fields_in_one_step(lab: Lab) -> None:
    checked, done, diff = checked_then_done(lab, "node", NODE_ARGS, MAC)
    assert checked["changed"] and done["changed"]
    node = lab.node(MAC)
    assert {key: node.get(key) for key in ("hostname", "ip", "netmask", "gateway", "dns", "labels", "status")} == {
        "hostname": "edge-11",
        "ip": "10.0.0.11",
        "netmask": "255.255.255.0",
        "gateway": "10.0.0.1",
        "dns": ["10.0.0.1"],
        "labels": {"rack": "1"},
        "status": "discovered",
    }
    assert done["node"] == node
    assert '+    "hostname": "edge-11",' in diff and '+    "status": "discovered"' in diff
    assert event_kinds(lab, MAC) == ["registered"]
    unchanged_on_second_run(lab, "node", NODE_ARGS, MAC)


def test_node_update_shows_the_difference(lab: Lab) -> None:
    fleet.register(lab.server, MAC, labels={"rack": "r1"}, hostname="edge-11")
    args = {"mac": MAC, "labels": {"rack": "r2"}, "profile": None}
    checked, done, diff = checked_then_done(lab, "node", args, MAC)
    assert checked["changed"] and done["changed"]
    assert '-        "rack": "r1"' in diff and '+        "rack": "r2"' in diff
    assert "hostname" not in "".join(line for line in diff.splitlines() if line.startswith(("+ ", "- ")))
    assert lab.node(MAC)["labels"] == {"rack": "r2"}
    unchanged_on_second_run(lab, "node", args, MAC)


def test_node_install_then_reinstall_only_when_asked(lab: Lab) -> None:
    fleet.register(lab.server, MAC)
    install = {"mac": MAC, "state": "installed"}
    checked, done, diff = checked_then_done(lab, "node", install, MAC)
    assert checked["node"]["status"] == done["node"]["status"] == "installing"
    assert '-    "status": "discovered"' in diff and '+    "status": "installing"' in diff
    unchanged_on_second_run(lab, "node", install, MAC)  # installing: left alone

    token = lab.server.install_token(MAC)
    fleet.end_install(lab.server, MAC, token, "finished")
    unchanged_on_second_run(lab, "node", install, MAC)  # installed: never touched without reinstall

    reinstall = {**install, "reinstall": True}
    checked, done, _ = checked_then_done(lab, "node", reinstall, MAC)
    assert checked["changed"] and done["changed"] and lab.node(MAC)["status"] == "installing"
    assert event_kinds(lab, MAC) == ["registered", "install", "installer-finished", "reinstall"]


def test_node_state_installed_registers_an_unknown_node_first(lab: Lab) -> None:
    checked, done, _ = checked_then_done(lab, "node", {"mac": MAC, "state": "installed", "hostname": "e1"}, MAC)
    assert checked["node"]["status"] == done["node"]["status"] == lab.node(MAC)["status"] == "installing"
    assert event_kinds(lab, MAC) == ["registered", "install"]


def test_node_absent(lab: Lab) -> None:
    fleet.register(lab.server, MAC)
    checked, done, diff = checked_then_done(lab, "node", {"mac": MAC, "state": "absent"}, MAC)
    assert checked["changed"] and done["changed"] and done["node"] == {}
    assert '-    "mac": "525400000101",' in diff
    assert lab.node(MAC) is None
    unchanged_on_second_run(lab, "node", {"mac": MAC, "state": "absent"}, MAC)


def test_node_wait_is_bounded(lab: Lab) -> None:
    fleet.installing(lab.server, MAC)
    args = {"mac": MAC, "state": "installed", "wait": True, "wait_timeout": 2, "wait_sleep": 1}
    result, _ = lab.module("node", args)
    assert result["_state"] == "FAILED!"
    assert result["msg"] == f"install of {MAC} did not end within 2 s (status installing)"


def test_node_wait_reports_a_failed_install(lab: Lab) -> None:
    fleet.failed(lab.server, MAC)
    result, _ = lab.module("node", {"mac": MAC, "state": "installed", "wait": True})
    assert (result["_state"], result["msg"]) == ("FAILED!", f"install of {MAC} failed (phase failed)")


# -- node_info -----------------------------------------------------------------------------------------


def test_node_info_queries(lab: Lab) -> None:
    fleet.register(lab.server, "525400000101", labels={"rack": "r1"})
    fleet.register(lab.server, "525400000102", labels={"rack": "r2"})
    fleet.installing(lab.server, "525400000103", labels={"rack": "r1"})
    before = lab.snapshot()

    def macs(args: dict[str, Any], *flags: str) -> list[str]:
        result, _ = lab.module("node_info", args, *flags)
        assert (result["_state"], result["changed"]) == ("SUCCESS", False), result
        return sorted(node["mac"] for node in result["nodes"])

    for flags in ((), ("--check",)):
        assert macs({}, *flags) == ["525400000101", "525400000102", "525400000103"]
        assert macs({"mac": "52-54-00-00-01-02"}, *flags) == ["525400000102"]
        assert macs({"mac": "525400000199"}, *flags) == []
        assert macs({"macs": ["525400000101", "5254.0000.0103", "525400000199"]}, *flags) == [
            "525400000101",
            "525400000103",
        ]
        assert macs({"statuses": ["discovered"]}, *flags) == ["525400000101", "525400000102"]
        assert macs({"statuses": ["discovered"], "labels": {"rack": "r1"}}, *flags) == ["525400000101"]
        assert macs({"mac": "525400000103", "statuses": ["discovered"]}, *flags) == []
    assert lab.snapshot() == before


# -- node_install --------------------------------------------------------------------------------------


def test_node_install_starts_only_discovered_nodes(lab: Lab) -> None:
    fleet.register(lab.server, "525400000101")
    fleet.register(lab.server, "525400000102")
    fleet.installing(lab.server, "525400000103")
    fleet.installed(lab.server, "525400000104")
    macs = ["525400000101", "52:54:00:00:01:02", "525400000103", "525400000104"]
    checked, done, _ = checked_then_done(lab, "node_install", {"macs": macs})
    for result in (checked, done):
        assert result["changed"] is True
        assert result["summary"] == {"started": 2, "unchanged": 1, "errors": 1}
        by_mac = {item["mac"]: item for item in result["results"]}
        assert by_mac["525400000101"]["changed"] and by_mac["525400000102"]["changed"]
        assert by_mac["525400000103"] == {"mac": "525400000103", "ok": True, "changed": False, "status": "installing"}
        assert by_mac["525400000104"]["error"] == (
            "cannot install node with status 'installed', only 'discovered' nodes can be installed"
        )
    assert [lab.node(mac)["status"] for mac in ("525400000101", "525400000102")] == ["installing", "installing"]
    assert lab.node("525400000104")["status"] == "installed"
    again = unchanged_on_second_run(lab, "node_install", {"macs": macs})
    assert again["summary"] == {"started": 0, "unchanged": 3, "errors": 1}


def test_node_install_fails_on_an_unknown_mac_and_names_it(lab: Lab) -> None:
    fleet.register(lab.server, "525400000101")
    for flags in (("--check",), ()):
        result, _ = lab.module("node_install", {"macs": ["525400000101", "525400000199"]}, *flags)
        assert result["_state"] == "FAILED!"
        assert result["msg"] == "unknown to the server (not registered): 525400000199"
    assert lab.node("525400000101")["status"] == "installing"


def test_node_install_wait_is_bounded(lab: Lab) -> None:
    fleet.register(lab.server, "525400000101")
    args = {"macs": ["525400000101"], "wait": True, "wait_timeout": 2, "wait_sleep": 1}
    result, _ = lab.module("node_install", args)
    assert result["_state"] == "FAILED!"
    assert result["msg"] == "install not ended within 2 s: 525400000101"
    assert result["results"][0]["status"] == "installing"


# -- one clear message per failure ----------------------------------------------------------------------

CALLS = [
    ("node", {"mac": MAC}),
    ("node_info", {"mac": MAC}),
    ("node_install", {"macs": [MAC]}),
]


@pytest.mark.parametrize(("module", "args"), CALLS)
def test_unreachable_server(lab: Lab, module: str, args: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result, _ = lab.module(module, args, env={"NODEFOUNDRY_URL": url})
    assert result["_state"] == "FAILED!"
    assert result["msg"] == f"cannot reach the NodeFoundry server at {url}: [Errno 111] Connection refused"


@pytest.mark.parametrize(("module", "args"), CALLS)
def test_bad_token(lab: Lab, module: str, args: dict[str, Any]) -> None:
    result, _ = lab.module(module, args, env={"NODEFOUNDRY_TOKEN": "nf_wrong"})
    path = "POST /api/v1/nodes/bulk" if module == "node_install" else f"GET /api/v1/nodes/{MAC}"
    assert result["_state"] == "FAILED!"
    assert result["msg"] == f"{path}: HTTP 401: missing or invalid token (check the token)"


@pytest.mark.parametrize(("module", "args"), CALLS)
def test_malformed_url_and_mac(lab: Lab, module: str, args: dict[str, Any]) -> None:
    result, _ = lab.module(module, args, env={"NODEFOUNDRY_URL": "10.0.0.1:8080"})
    assert result["msg"] == "invalid server URL '10.0.0.1:8080': expected http(s)://host[:port]"
    bad_mac = {key: ["nope"] if key == "macs" else "nope" for key in args}
    result, _ = lab.module(module, bad_mac)
    assert result["msg"] == "invalid MAC address 'nope': expected aa:bb:cc:dd:ee:ff or 12 hex digits"


@pytest.mark.parametrize(("module", "args"), CALLS)
def test_no_url_at_all(lab: Lab, module: str, args: dict[str, Any]) -> None:
    result, _ = lab.module(module, args, env={"NODEFOUNDRY_URL": None})
    assert (result["_state"], result["msg"]) == ("FAILED!", "missing required arguments: url")
    result, _ = lab.module(module, args, env={"NODEFOUNDRY_URL": ""})
    assert (result["_state"], result["msg"]) == ("FAILED!", "no server URL: set the url option or NODEFOUNDRY_URL")


def test_a_read_only_token_cannot_change_anything(lab: Lab) -> None:
    created = lab.run(BIN / "nodefoundry-server", "token", "create", "--name", "ro", "--role", "readonly",
                      env=lab.server.env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    result, _ = lab.module("node", {"mac": MAC}, env={"NODEFOUNDRY_TOKEN": created.stdout.strip()})
    assert result["msg"] == (
        "POST /api/v1/nodes: HTTP 403: read-only token cannot change anything (the token lacks the right role)"
    )


def test_server_refusal_is_passed_on(lab: Lab) -> None:
    result, _ = lab.module("node", {"mac": MAC, "gateway": "10.0.0.1"})
    assert result["_state"] == "FAILED!"
    assert result["msg"] == "POST /api/v1/nodes: HTTP 400: gateway needs ip and netmask"
    assert lab.node(MAC) is None


def test_module_defaults_group_sets_the_connection(lab: Lab) -> None:
    """``group/nodefoundry.provision.nodefoundry`` from meta/runtime.yml sets url and token for every module."""
    playbook = lab.workdir / "defaults.yml"
    playbook.write_text(
        f"""- hosts: localhost
  gather_facts: false
  module_defaults:
    group/nodefoundry.provision.nodefoundry:
      url: {lab.server.url}
      token: {lab.env["NODEFOUNDRY_TOKEN"]}
  tasks:
    - nodefoundry.provision.node:
        mac: {MAC}
    - nodefoundry.provision.node_install:
        macs: [{MAC}]
    - nodefoundry.provision.node_info:
        statuses: [installing]
      register: found
    - ansible.builtin.assert:
        that: found.nodes | map(attribute='mac') | list == ['{MAC}']
"""
    )
    env = {"NODEFOUNDRY_URL": None, "NODEFOUNDRY_TOKEN": None}
    interpreter = f"ansible_python_interpreter={sys.executable}"
    done = lab.run(BIN / "ansible-playbook", "-i", "localhost,", "-c", "local", "-e", interpreter, playbook, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lab.node(MAC)["status"] == "installing"
