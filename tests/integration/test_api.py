"""REST API against a real server: the seed's routes, status codes and messages, plus the new routes."""

from __future__ import annotations

import io
import itertools
import zipfile

import pytest

from tests.conftest import Server, fake_installer

_serial = itertools.count(1)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the tests that do not need an empty store (each uses its own MACs)."""
    workdir = tmp_path_factory.mktemp("api")
    server = Server(workdir)
    fake_installer(server.assets_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mac() -> str:
    """A MAC no other test in this module uses, in colon form."""
    n = next(_serial)
    return f"aa:bb:cc:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"


@pytest.fixture
def server(shared_server):
    return shared_server


def norm(mac: str) -> str:
    return mac.replace(":", "")


def create(server, mac: str, **fields):
    return server.api("POST", "/api/v1/nodes", json={"mac": mac, **fields})


# --- the seed's table ------------------------------------------------------------------------------


def test_health_has_seed_fields(server):
    body = server.get("/health").json()
    assert body["status"] in ("ok", "degraded")
    assert body["uptime"].endswith("s")
    assert {"store", "http", "assets", "install_watchdog", "dhcp", "mqtt"} <= set(body["components"])
    assert body["components"]["store"]["state"] == "ok"


def test_empty_list_is_an_empty_array(server_factory):
    server = server_factory().start()
    response = server.api("GET", "/api/v1/nodes")
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["X-Total-Count"] == "0"


def test_create_returns_201_location_and_normalised_node(server, mac):
    response = create(server, mac, ip="10.0.0.7")
    assert response.status_code == 201
    assert response.headers["Location"] == f"/api/v1/nodes/{norm(mac)}"
    node = response.json()
    assert node["mac"] == norm(mac) and node["status"] == "discovered" and node["ip"] == "10.0.0.7"
    assert node["created_at"].endswith("Z") and node["updated_at"] == node["created_at"]
    assert "netmask" not in node and "gateway" not in node and "dns" not in node  # empty network fields omitted


@pytest.mark.parametrize("spell", ["upper-colon", "hyphen", "cisco-dots", "bare-upper"])
def test_usual_mac_spellings_are_one_node(server, mac, spell):
    assert create(server, mac).status_code == 201
    bare = norm(mac)
    spelling = {
        "upper-colon": mac.upper(),
        "hyphen": mac.replace(":", "-"),
        "cisco-dots": f"{bare[:4]}.{bare[4:8]}.{bare[8:]}",
        "bare-upper": bare.upper(),
    }[spell]
    response = server.api("GET", f"/api/v1/nodes/{spelling}")
    assert response.status_code == 200 and response.json()["mac"] == norm(mac)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "invalid request body"),
        ("[1, 2]", "invalid request body"),
        ('{"mac": "zz:bb:cc:dd:ee:01"}', "invalid MAC address format"),
        ('{"mac": "aa:bb:cc:dd:ee"}', "invalid MAC address format"),
        ('{"mac": 12}', "invalid MAC address format"),
        ('{"mac": "aa:bb:cc:dd:ee:01:02"}', "invalid MAC address format"),
    ],
)
def test_create_rejects_bad_bodies(server, body, message):
    response = server.api("POST", "/api/v1/nodes", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": message}


def test_create_twice_is_409(server, mac):
    assert create(server, mac).status_code == 201
    response = create(server, mac.upper().replace(":", "-"))
    assert response.status_code == 409
    assert response.json() == {"error": "node already exists"}


def test_get_unknown_node_is_404(server):
    response = server.api("GET", "/api/v1/nodes/aabbccddeeff")
    assert response.status_code == 404 and response.json() == {"error": "node not found"}


def test_list_is_newest_first(server_factory):
    server = server_factory().start()
    for i in range(3):
        assert create(server, mac=f"02:00:00:00:00:0{i}").status_code == 201
    macs = [node["mac"] for node in server.api("GET", "/api/v1/nodes").json()]
    assert macs == ["020000000002", "020000000001", "020000000000"]


def test_put_install_moves_discovered_to_installing(server, mac):
    create(server, mac)
    response = server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"})
    assert response.status_code == 200
    assert response.json()["status"] == "installing"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "invalid request body"),
        ({"action": "dance"}, 400, "unknown action"),
        ({"action": 5}, 400, "invalid request body"),
    ],
)
def test_put_rejects_bad_actions(server, mac, body, status, message):
    create(server, mac)
    response = server.api("PUT", f"/api/v1/nodes/{mac}", json=body)
    assert (response.status_code, response.json()) == (status, {"error": message})


def test_put_unknown_node_is_404(server):
    response = server.api("PUT", "/api/v1/nodes/aabbccddeeff", json={"action": "install"})
    assert (response.status_code, response.json()) == (404, {"error": "node not found"})


def test_install_only_from_discovered_with_seed_message(server, mac):
    create(server, mac)
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    response = server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"})
    assert response.status_code == 400
    assert response.json() == {
        "error": "cannot install node with status 'installing', only 'discovered' nodes can be installed"
    }


def test_reinstall_only_from_installed_or_failed(server, mac):
    create(server, mac)
    response = server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "reinstall"})
    assert response.status_code == 400
    assert response.json()["error"] == (
        "cannot reinstall node with status 'discovered', only 'installed' or 'failed' nodes can be reinstalled"
    )


def test_boot_script_unknown_node_is_404(server):
    response = server.get("/boot/aabbccddeeff/boot.ipxe")
    assert (response.status_code, response.json()) == (404, {"error": "node not found"})


def test_boot_script_is_text_plain(server, mac):
    create(server, mac)
    response = server.get(f"/boot/{norm(mac)}/boot.ipxe")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text.startswith("#!ipxe\n")


def test_agent_routes_serve_the_built_agent_unless_the_assets_hold_one(server):
    response = server.get("/agent/nodefoundry-agent")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/octet-stream"
    assert response.content.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(io.BytesIO(response.content)) as built:
        assert "nodefoundry_agent/__main__.py" in built.namelist()
    unit = server.get("/agent/nodefoundry-agent.service")
    assert unit.status_code == 200 and "ExecStart=" in unit.text
    agent_dir = server.assets_dir / "agent"
    agent_dir.mkdir()
    (agent_dir / "nodefoundry-agent.pyz").write_bytes(b"PK-zipapp")
    (agent_dir / "nodefoundry-agent.service").write_text("[Unit]\n")
    response = server.get("/agent/nodefoundry-agent")
    assert response.status_code == 200 and response.content == b"PK-zipapp"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert server.get("/agent/nodefoundry-agent.service").headers["Content-Type"].startswith("text/plain")


# --- beyond the seed -------------------------------------------------------------------------------


def test_list_filters_and_pagination(server_factory):
    server = server_factory().start()
    for i in range(5):
        create(server, mac=f"02:00:00:00:00:0{i}")
    server.api("PUT", "/api/v1/nodes/020000000001", json={"action": "install"})
    server.api("PUT", "/api/v1/nodes/020000000003", json={"action": "install"})
    installing = server.api("GET", "/api/v1/nodes?status=installing").json()
    assert sorted(n["mac"] for n in installing) == ["020000000001", "020000000003"]
    both = server.api("GET", "/api/v1/nodes?status=installing,discovered")
    assert len(both.json()) == 5
    page = server.api("GET", "/api/v1/nodes?limit=2&offset=1")
    assert [n["mac"] for n in page.json()] == ["020000000003", "020000000002"]
    assert page.headers["X-Total-Count"] == "5"
    assert server.api("GET", "/api/v1/nodes?status=failed").json() == []
    for bad in ("status=sleeping", "limit=0", "limit=x", "offset=-1"):
        response = server.api("GET", f"/api/v1/nodes?{bad}")
        assert response.status_code == 400 and "error" in response.json(), bad


def test_patch_updates_fields_and_records_events(server, mac):
    create(server, mac)
    response = server.api(
        "PATCH",
        f"/api/v1/nodes/{mac}",
        json={
            "hostname": "Edge-01",
            "ip": "10.1.0.10",
            "netmask": "/24",
            "gateway": "10.1.0.1",
            "dns": "1.1.1.1, 9.9.9.9",
            "labels": {"rack": "r1", "site": "fra"},
        },
    )
    assert response.status_code == 200, response.text
    node = response.json()
    assert node["hostname"] == "edge-01"
    assert node["netmask"] == "255.255.255.0"
    assert node["dns"] == ["1.1.1.1", "9.9.9.9"]
    assert node["labels"] == {"rack": "r1", "site": "fra"}
    events = server.api("GET", f"/api/v1/nodes/{mac}/events").json()
    changed = {e["field"]: (e.get("old"), e.get("new")) for e in events if e["kind"] == "updated"}
    assert changed["hostname"] == (None, "edge-01")
    assert changed["netmask"] == (None, "255.255.255.0")
    assert all(e["source"] == "api" and e["actor"] == "NF_API_TOKEN" for e in events)
    # the same PATCH again changes nothing and adds no event
    again = server.api("PATCH", f"/api/v1/nodes/{mac}", json={"hostname": "edge-01"})
    assert again.json()["updated_at"] == node["updated_at"]
    assert len(server.api("GET", f"/api/v1/nodes/{mac}/events").json()) == len(events)
    # null clears
    cleared = server.api("PATCH", f"/api/v1/nodes/{mac}", json={"labels": None, "gateway": None}).json()
    assert cleared["labels"] == {} and "gateway" not in cleared


@pytest.mark.parametrize(
    "body",
    [
        {"hostname": "-bad"},
        {"hostname": "a.b"},
        {"ip": "10.0.0.300"},
        {"ip": "fe80::1"},
        {"netmask": "255.0.255.0"},
        {"dns": ["1.1.1.1", "x"]},
        {"labels": {"k": "v v"}},
        {"labels": ["a"]},
        {"profile": "nope"},
        {"status": "installed"},
        {"mac": "aabbccddee02"},
        {"gateway": "10.9.9.1"},
        {"ip": "10.1.0.10", "netmask": "255.255.255.0", "gateway": "10.2.0.1"},
    ],
)
def test_patch_rejects_bad_values_and_stores_nothing(server, mac, body):
    create(server, mac)
    before = server.api("GET", f"/api/v1/nodes/{mac}").json()
    response = server.api("PATCH", f"/api/v1/nodes/{mac}", json=body)
    assert response.status_code == 400 and response.json()["error"]
    assert server.api("GET", f"/api/v1/nodes/{mac}").json() == before


def test_delete(server, mac):
    create(server, mac)
    assert server.api("DELETE", f"/api/v1/nodes/{mac}").status_code == 204
    assert server.api("GET", f"/api/v1/nodes/{mac}").status_code == 404
    assert server.api("DELETE", f"/api/v1/nodes/{mac}").status_code == 404
    kinds = [e["kind"] for e in server.api("GET", f"/api/v1/nodes/{mac}/events").json()]
    assert kinds == ["registered", "deleted"]  # the audit trail outlives the node


def test_events_record_transitions(server, mac):
    create(server, mac)
    server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"})
    events = server.api("GET", f"/api/v1/nodes/{mac}/events").json()
    assert [(e["kind"], e.get("old"), e.get("new")) for e in events] == [
        ("registered", None, "discovered"),
        ("install", "discovered", "installing"),
    ]
    later = server.api("GET", f"/api/v1/nodes/{mac}/events?after={events[0]['id']}").json()
    assert [e["kind"] for e in later] == ["install"]
    assert server.api("GET", "/api/v1/nodes/aabbccddeeff/events").status_code == 404


def test_bulk_install_reports_per_mac(server_factory):
    server = server_factory().start()
    for i in range(3):
        create(server, mac=f"02:00:00:00:00:0{i}")
    server.api("PUT", "/api/v1/nodes/020000000002", json={"action": "install"})
    macs = ["02:00:00:00:00:00", "020000000001", "020000000002", "02:00:00:00:00:09", "bogus", "020000000000"]
    response = server.api("POST", "/api/v1/nodes/bulk", json={"action": "install", "macs": macs})
    assert response.status_code == 200
    body = response.json()
    by_mac = {r["mac"]: r for r in body["results"]}
    assert by_mac["020000000000"] == {"mac": "020000000000", "ok": True, "changed": True, "status": "installing"}
    assert by_mac["020000000001"]["changed"] is True
    assert by_mac["020000000002"] == {"mac": "020000000002", "ok": True, "changed": False, "status": "installing"}
    assert by_mac["020000000009"] == {"mac": "020000000009", "ok": False, "changed": False, "error": "node not found"}
    assert by_mac["bogus"]["error"] == "invalid MAC address format"
    assert len(body["results"]) == 5  # the duplicate spelling of 020000000000 counts once
    assert body["summary"] == {"changed": 2, "unchanged": 1, "failed": 2}


def test_bulk_dry_run_changes_nothing(server, mac):
    create(server, mac)
    response = server.api("POST", "/api/v1/nodes/bulk", json={"action": "install", "macs": [mac], "dry_run": True})
    assert response.json()["results"][0]["changed"] is True
    assert server.api("GET", f"/api/v1/nodes/{mac}").json()["status"] == "discovered"
    assert [e["kind"] for e in server.api("GET", f"/api/v1/nodes/{mac}/events").json()] == ["registered"]


def test_bulk_rejects_bad_requests(server):
    for body in ({"action": "install"}, {"action": "nuke", "macs": []}, {"action": "install", "macs": "aa"}):
        response = server.api("POST", "/api/v1/nodes/bulk", json=body)
        assert response.status_code == 400 and response.json()["error"]


def test_oversized_body_is_413(server_factory):
    server = server_factory(env={"NF_MAX_BODY_BYTES": "2048"}).start()
    response = server.api("POST", "/api/v1/nodes", data="{" + " " * 4096 + "}")
    assert response.status_code == 413
    assert response.json() == {"error": "request body too large"}


def test_unknown_route_and_method_are_json_errors(server):
    response = server.get("/nope")
    assert (response.status_code, response.json()) == (404, {"error": "not found"})
    response = server.api("POST", "/api/v1/nodes/aabbccddeeff")
    assert (response.status_code, response.json()) == (405, {"error": "method not allowed"})
