"""Answers of a real server conform to openapi.json: status codes, media types, headers, JSON bodies.

Each response is looked up in the document by path template, method and status; a JSON body is validated
against the documented schema with ``$ref``'s inlined and, for objects that list their properties,
``additionalProperties: false`` added, so a field the server sends but the document lacks fails too.
An ``{"error": ...}`` body must carry one of the messages the document gives as examples.
"""

from __future__ import annotations

import copy
import json
import subprocess
from importlib import resources
from typing import Any

import requests
from openapi_schema_validator import OAS30Validator, oas30_format_checker

from tests.conftest import ADMIN_TOKEN, SERVER_BIN, Server, install_token_in

SPEC: dict[str, Any] = json.loads(
    resources.files("nodefoundry_server.api").joinpath("openapi.json").read_text(encoding="utf-8")
)

MAC = "aa:bb:cc:dd:ee:01"
NORM = "aabbccddee01"
OTHER = "aa-bb-cc-dd-ee-02"
OTHER_NORM = "aabbccddee02"
UNKNOWN = "aabbccddeeff"
NODE = "/api/v1/nodes/{mac}"


def _lookup(pointer: str) -> Any:
    target: Any = SPEC
    for part in pointer.removeprefix("#/").split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def _resolve(node: Any) -> Any:
    """A copy of ``node`` with every ``$ref`` replaced by its target (the document has no recursive schemas)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolve(_lookup(node["$ref"]))
        return {key: _resolve(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value) for value in node]
    return node


def _strict(schema: Any) -> Any:
    """Objects that list properties may send nothing else (unless the document says otherwise)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(value) for value in schema]
    return schema


def _documented_response(template: str, method: str, status: int) -> dict[str, Any]:
    operation = SPEC["paths"].get(template, {}).get(method.lower())
    assert operation is not None, f"{method} {template} is not in openapi.json"
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {template} answered {status}, documented: {sorted(responses)}"
    return _resolve(responses[str(status)])


def _messages(media: dict[str, Any]) -> set[str]:
    found = set()
    if "example" in media:
        found.add(media["example"]["error"])
    for example in media.get("examples", {}).values():
        found.add(example["value"]["error"])
    return found


def conforms(response: requests.Response, template: str, *, any_message: bool = False) -> Any:
    """Check ``response`` against the document; return its JSON body (or None)."""
    method = response.request.method or "GET"
    documented = _documented_response(template, method, response.status_code)
    for header in documented.get("headers", {}):
        assert header in response.headers, f"{method} {template} {response.status_code}: no {header} header"
    content = documented.get("content")
    if not content:
        assert response.content == b"", f"{method} {template} {response.status_code}: documented without a body"
        return None
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    assert media_type in content, f"{method} {template} {response.status_code}: {media_type} not in {list(content)}"
    if media_type != "application/json":
        return None
    body = response.json()
    schema = _strict(content[media_type]["schema"])
    errors = sorted(
        OAS30Validator(schema, format_checker=oas30_format_checker).iter_errors(body), key=lambda e: list(e.path)
    )
    assert not errors, f"{method} {template} {response.status_code}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
    )
    if isinstance(body, dict) and set(body) == {"error"} and not any_message:
        assert body["error"] in _messages(content[media_type]), (
            f"{method} {template} {response.status_code}: message {body['error']!r} is not documented"
        )
    return body


def create(server: Server, mac: str = MAC, **fields: Any) -> requests.Response:
    return server.api("POST", "/api/v1/nodes", json={"mac": mac, **fields})


def readonly_token(server: Server) -> str:
    done = subprocess.run(
        [str(SERVER_BIN), "token", "create", "--name", "ro", "--role", "readonly"],
        env=server.env,
        cwd=server.workdir,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


# --- health and the document ------------------------------------------------------------------------


def test_health(server: Server) -> None:
    body = conforms(server.get("/health"), "/health")
    assert body["status"] in ("ok", "degraded")


def test_document_needs_no_token_and_is_the_file(server: Server) -> None:
    response = server.api("GET", "/api/v1/openapi.json", token=None)
    assert conforms(response, "/api/v1/openapi.json") == SPEC


# --- nodes ------------------------------------------------------------------------------------------


def test_create_get_list(server: Server) -> None:
    response = create(
        server,
        hostname="Edge-01",
        ip="10.0.0.21",
        netmask="/24",
        gateway="10.0.0.1",
        dns="10.0.0.1, 1.1.1.1",
        labels={"rack": "r1"},
    )
    assert response.status_code == 201
    node = conforms(response, "/api/v1/nodes")
    assert response.headers["Location"] == f"/api/v1/nodes/{NORM}"
    assert node["hostname"] == "edge-01" and node["dns"] == ["10.0.0.1", "1.1.1.1"]
    assert conforms(create(server, OTHER), "/api/v1/nodes")["mac"] == OTHER_NORM

    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE) == node

    listed = server.api("GET", "/api/v1/nodes")
    assert [n["mac"] for n in conforms(listed, "/api/v1/nodes")] == [OTHER_NORM, NORM]
    assert listed.headers["X-Total-Count"] == "2"
    paged = server.api("GET", "/api/v1/nodes?status=discovered,installed&status=failed&limit=1&offset=1")
    assert [n["mac"] for n in conforms(paged, "/api/v1/nodes")] == [NORM]
    assert paged.headers["X-Total-Count"] == "2"


def test_list_query_errors(server: Server) -> None:
    for query, status in [("status=new", 400), ("limit=0", 400), ("offset=-1", 400), ("status=installing", 200)]:
        response = server.api("GET", f"/api/v1/nodes?{query}")
        assert response.status_code == status, query
        conforms(response, "/api/v1/nodes")


def test_create_errors(server: Server) -> None:
    assert create(server).status_code == 201
    for body, status, message in [
        ("not json", 400, "invalid request body"),
        ("[1, 2]", 400, "invalid request body"),
        ('{"mac": "zz:bb:cc:dd:ee:01"}', 400, "invalid MAC address format"),
        ('{"ip": "10.0.0.1"}', 400, "invalid MAC address format"),
        ('{"mac": "aa:bb:cc:dd:ee:09", "gateway": "10.0.0.1"}', 400, "gateway needs ip and netmask"),
        ('{"mac": "aa:bb:cc:dd:ee:09", "dns": "1.1.1.1 1.0.0.1 8.8.8.8 8.8.4.4"}', 400, None),
        ('{"mac": "aa:bb:cc:dd:ee:09", "foo": 1}', 400, None),
        ('{"mac": "aa:bb:cc:dd:ee:01"}', 409, "node already exists"),
    ]:
        response = server.api("POST", "/api/v1/nodes", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status, body
        error = conforms(response, "/api/v1/nodes", any_message=message is None)
        if message:
            assert error == {"error": message}
    assert conforms(server.api("GET", "/api/v1/nodes"), "/api/v1/nodes") == [
        conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)
    ]


def test_get_errors(server: Server) -> None:
    assert server.api("GET", f"/api/v1/nodes/{UNKNOWN}").status_code == 404
    conforms(server.api("GET", f"/api/v1/nodes/{UNKNOWN}"), NODE)
    assert server.api("GET", "/api/v1/nodes/not-a-mac").status_code == 400
    conforms(server.api("GET", "/api/v1/nodes/not-a-mac"), NODE)


def test_patch(server: Server) -> None:
    create(server, ip="10.0.0.21", netmask=24, gateway="10.0.0.1", dns=["10.0.0.1"])
    response = server.api("PATCH", f"/api/v1/nodes/{MAC}", json={"hostname": "edge-02", "labels": {"role": "edge"}})
    node = conforms(response, NODE)
    assert node["hostname"] == "edge-02" and node["labels"] == {"role": "edge"}
    cleared = conforms(
        server.api("PATCH", f"/api/v1/nodes/{MAC}", json={"gateway": None, "dns": [], "labels": None}), NODE
    )
    assert "gateway" not in cleared and "dns" not in cleared and cleared["labels"] == {}
    assert conforms(server.api("PATCH", f"/api/v1/nodes/{MAC}", json={}), NODE)["hostname"] == "edge-02"


def test_patch_errors(server: Server) -> None:
    create(server, ip="10.0.0.21", netmask=24)
    for mac, body, status in [
        (MAC, {"gateway": "10.9.0.1"}, 400),
        (MAC, {"status": "installed"}, 400),
        (MAC, {"mac": OTHER}, 400),
        (MAC, [1, 2], 400),
        (UNKNOWN, {"hostname": "x"}, 404),
        ("nope", {"hostname": "x"}, 400),
    ]:
        response = server.api("PATCH", f"/api/v1/nodes/{mac}", json=body)
        assert response.status_code == status, body
        conforms(response, NODE, any_message=True)


def test_put_install_and_refusals(server: Server) -> None:
    create(server)
    node = conforms(server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"}), NODE)
    assert node["status"] == "installing" and node["install_phase"] == "queued"
    assert "install_started_at" in node and "install_progress_at" in node
    again = server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"})
    assert again.status_code == 400
    conforms(again, NODE)
    reinstall = server.api("PUT", f"/api/v1/nodes/{OTHER}", json={"action": "install"})
    assert reinstall.status_code == 404
    conforms(reinstall, NODE)


def test_put_errors(server: Server) -> None:
    create(server)
    for body, message in [
        ({}, "invalid request body"),
        ({"action": ""}, "invalid request body"),
        ({"action": 1}, "invalid request body"),
        ({"action": "wipe"}, "unknown action"),
        (
            {"action": "reinstall"},
            "cannot reinstall node with status 'discovered', only 'installed' or 'failed' nodes can be reinstalled",
        ),
    ]:
        response = server.api("PUT", f"/api/v1/nodes/{MAC}", json=body)
        assert response.status_code == 400, body
        assert conforms(response, NODE) == {"error": message}


def test_delete(server: Server) -> None:
    create(server)
    response = server.api("DELETE", f"/api/v1/nodes/{MAC}")
    assert response.status_code == 204
    conforms(response, NODE)
    assert server.api("DELETE", f"/api/v1/nodes/{MAC}").status_code == 404
    conforms(server.api("DELETE", f"/api/v1/nodes/{MAC}"), NODE)
    events = conforms(server.api("GET", f"/api/v1/nodes/{MAC}/events"), NODE + "/events")
    assert events[-1]["kind"] == "deleted"


# --- bulk -------------------------------------------------------------------------------------------


def test_bulk_dry_run_then_for_real(server: Server) -> None:
    create(server)
    create(server, OTHER)
    server.api("PUT", f"/api/v1/nodes/{OTHER}", json={"action": "install"})
    macs = [MAC, MAC.upper(), OTHER, UNKNOWN, "zz", 7]
    dry = conforms(
        server.api("POST", "/api/v1/nodes/bulk", json={"action": "install", "macs": macs, "dry_run": True}),
        "/api/v1/nodes/bulk",
    )
    assert dry["dry_run"] is True
    assert dry["summary"] == {"changed": 1, "unchanged": 1, "failed": 3}
    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)["status"] == "discovered"

    real = conforms(
        server.api("POST", "/api/v1/nodes/bulk", json={"action": "install", "macs": macs}), "/api/v1/nodes/bulk"
    )
    assert real["dry_run"] is False and real["results"] == dry["results"]
    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)["status"] == "installing"

    reinstall = conforms(
        server.api("POST", "/api/v1/nodes/bulk", json={"action": "reinstall", "macs": [MAC]}), "/api/v1/nodes/bulk"
    )
    assert reinstall["results"] == [{"mac": NORM, "ok": True, "changed": False, "status": "installing"}]


def test_bulk_errors(server: Server) -> None:
    for body, message in [
        ({"macs": [MAC]}, "invalid request body"),
        ({"action": "wipe", "macs": [MAC]}, "unknown action"),
        ({"action": "install"}, "invalid request body"),
        ({"action": "install", "macs": MAC}, "invalid request body"),
        ({"action": "install", "macs": [MAC], "dry_run": "yes"}, "invalid request body"),
        ({"action": "install", "macs": [MAC] * 10001}, "at most 10000 MACs per call"),
    ]:
        response = server.api("POST", "/api/v1/nodes/bulk", json=body)
        assert response.status_code == 400, body
        assert conforms(response, "/api/v1/nodes/bulk") == {"error": message}


# --- events -----------------------------------------------------------------------------------------


def test_events(server: Server) -> None:
    create(server, ip="10.0.0.21")
    server.api("PATCH", f"/api/v1/nodes/{MAC}", json={"labels": {"rack": "r1"}, "dns": ["10.0.0.1"]})
    server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"})
    events = conforms(server.api("GET", f"/api/v1/nodes/{MAC}/events"), NODE + "/events")
    assert [e["kind"] for e in events] == ["registered", "updated", "updated", "install"]
    page = conforms(server.api("GET", f"/api/v1/nodes/{MAC}/events?limit=2&after={events[0]['id']}"), NODE + "/events")
    assert page == events[1:3]
    for url, status in [
        (f"/api/v1/nodes/{UNKNOWN}/events", 404),
        (f"/api/v1/nodes/{MAC}/events?limit=1001", 400),
        (f"/api/v1/nodes/{MAC}/events?after=x", 400),
        ("/api/v1/nodes/nope/events", 400),
    ]:
        response = server.api("GET", url)
        assert response.status_code == status, url
        conforms(response, NODE + "/events")


# --- authentication and limits ------------------------------------------------------------------------


def test_missing_or_bad_token_is_401(server: Server) -> None:
    for method, template, body in [
        ("GET", "/api/v1/nodes", None),
        ("POST", "/api/v1/nodes", {"mac": MAC}),
        ("GET", NODE, None),
        ("PATCH", NODE, {"hostname": "x"}),
        ("PUT", NODE, {"action": "install"}),
        ("DELETE", NODE, None),
        ("POST", "/api/v1/nodes/bulk", {"action": "install", "macs": [MAC]}),
        ("GET", NODE + "/events", None),
    ]:
        for token in (None, "nf_wrong"):
            response = server.api(method, template.replace("{mac}", MAC), token=token, json=body)
            assert response.status_code == 401, (method, template, token)
            assert conforms(response, template) == {"error": "missing or invalid token"}
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="nodefoundry"'
    assert (
        server.api("GET", "/api/v1/nodes", headers={"Authorization": f"Basic {ADMIN_TOKEN}"}, token=None).status_code
        == 401
    )


def test_readonly_token_reads_but_cannot_write(server: Server) -> None:
    create(server)
    token = readonly_token(server)
    assert conforms(server.api("GET", "/api/v1/nodes", token=token), "/api/v1/nodes")[0]["mac"] == NORM
    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}", token=token), NODE)["mac"] == NORM
    conforms(server.api("GET", f"/api/v1/nodes/{MAC}/events", token=token), NODE + "/events")
    for method, template, body in [
        ("POST", "/api/v1/nodes", {"mac": OTHER}),
        ("PATCH", NODE, {"hostname": "x"}),
        ("PUT", NODE, {"action": "install"}),
        ("DELETE", NODE, None),
        ("POST", "/api/v1/nodes/bulk", {"action": "install", "macs": [MAC]}),
    ]:
        response = server.api(method, template.replace("{mac}", MAC), token=token, json=body)
        assert response.status_code == 403, (method, template)
        assert conforms(response, template) == {"error": "read-only token cannot change anything"}
    assert conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)["status"] == "discovered"


def test_oversized_body_is_413(server: Server) -> None:
    big = {"mac": MAC, "labels": {f"k{i}": "v" * 60 for i in range(20000)}}
    response = server.api("POST", "/api/v1/nodes", json=big)
    assert response.status_code == 413
    assert conforms(response, "/api/v1/nodes") == {"error": "request body too large"}


# --- the boot path ----------------------------------------------------------------------------------


def test_boot_scripts(server: Server) -> None:
    entry = server.get("/boot.ipxe")
    conforms(entry, "/boot.ipxe")
    assert entry.text.startswith("#!ipxe")
    registered = server.get(f"/boot.ipxe?mac={MAC}&arch=x86_64&platform=efi")
    conforms(registered, "/boot.ipxe")
    node = conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)
    assert node["arch"] == "amd64" and node["facts"] == {"platform": "efi", "ipxe_buildarch": "x86_64"}
    conforms(server.get(f"/boot/{MAC}/boot.ipxe"), "/boot/{mac}/boot.ipxe")
    for url, template, status in [
        ("/boot.ipxe?mac=nope", "/boot.ipxe", 400),
        (f"/boot/{UNKNOWN}/boot.ipxe", "/boot/{mac}/boot.ipxe", 404),
        ("/boot/nope/boot.ipxe", "/boot/{mac}/boot.ipxe", 400),
    ]:
        response = server.get(url)
        assert response.status_code == status, url
        conforms(response, template)


def test_install_path_with_token(server: Server) -> None:
    create(server)
    preseed_template, installer_template = "/preseed/{mac}/preseed.cfg", "/installer/{mac}/{event}"
    assert conforms(server.get(f"/preseed/{NORM}/preseed.cfg?token=x"), preseed_template) == {
        "error": "invalid or expired install token"
    }
    server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"})
    script = server.get(f"/boot/{NORM}/boot.ipxe")
    conforms(script, "/boot/{mac}/boot.ipxe")
    token = install_token_in(script.text)
    assert token, script.text

    preseed = server.get(f"/preseed/{NORM}/preseed.cfg?token={token}")
    conforms(preseed, preseed_template)
    assert token in preseed.text
    for url, status in [
        (f"/preseed/{NORM}/preseed.cfg?token=wrong", 403),
        (f"/preseed/{NORM}/preseed.cfg", 403),
        (f"/preseed/{UNKNOWN}/preseed.cfg?token={token}", 404),
        (f"/preseed/nope/preseed.cfg?token={token}", 400),
        (f"/preseed/{NORM}/preseed.cfg?token={token}&ip=10.0.0.300", 400),
    ]:
        response = server.get(url)
        assert response.status_code == status, url
        conforms(response, preseed_template, any_message=status == 400 and "ip=" in url)

    for url, status in [
        (f"/installer/{NORM}/started?token={token}", 204),
        (f"/installer/{NORM}/progress?token={token}&phase=late-command", 204),
        (f"/installer/{NORM}/progress?token={token}&phase=bad%20phase", 400),
        (f"/installer/{NORM}/rebooted?token={token}", 404),
        (f"/installer/{NORM}/progress?token=wrong", 403),
        (f"/installer/{UNKNOWN}/progress?token={token}", 404),
        (f"/installer/{NORM}/finished?token={token}", 204),
        (f"/installer/{NORM}/progress?token={token}", 403),
    ]:
        response = server.session.post(server.url + url, timeout=30)
        assert response.status_code == status, url
        conforms(response, installer_template)
    node = conforms(server.api("GET", f"/api/v1/nodes/{MAC}"), NODE)
    assert node["status"] == "installed" and node["install_phase"] == "finished"
    events = conforms(server.api("GET", f"/api/v1/nodes/{MAC}/events"), NODE + "/events")
    assert events[-1]["kind"] == "installer-finished" and events[-1]["source"] == "installer"


def test_downloads(server: Server) -> None:
    kernel = server.get("/assets/debian-installer/amd64/linux")
    conforms(kernel, "/assets/{path}")
    assert kernel.content == b"kernel-amd64"
    ranged = server.get("/assets/debian-installer/amd64/linux", headers={"Range": "bytes=0-5"})
    assert ranged.status_code == 206 and ranged.content == b"kernel"
    conforms(ranged, "/assets/{path}")
    cached = server.get("/assets/debian-installer/amd64/linux", headers={"If-None-Match": kernel.headers["ETag"]})
    assert cached.status_code == 304
    conforms(cached, "/assets/{path}")
    for url, template, status in [
        ("/assets/debian-installer/amd64/missing", "/assets/{path}", 404),
        ("/assets/debian-installer/amd64/linux", "/assets/{path}", 416),
        ("/agent/nodefoundry-agent", "/agent/nodefoundry-agent", 200),
        ("/agent/nodefoundry-agent.service", "/agent/nodefoundry-agent.service", 200),
    ]:
        headers = {"Range": "bytes=100-200"} if status == 416 else {}
        response = server.get(url, headers=headers)
        assert response.status_code == status, url
        conforms(response, template)


def test_agent_downloads_when_present(server: Server) -> None:
    agent_dir = server.assets_dir / "agent"
    agent_dir.mkdir(parents=True)
    (agent_dir / "nodefoundry-agent.pyz").write_bytes(b"PK-agent")
    (agent_dir / "nodefoundry-agent.service").write_text("[Unit]\nDescription=NodeFoundry agent\n")
    agent = server.get("/agent/nodefoundry-agent")
    conforms(agent, "/agent/nodefoundry-agent")
    assert agent.content == b"PK-agent"
    unit = server.get("/agent/nodefoundry-agent.service")
    conforms(unit, "/agent/nodefoundry-agent.service")
    assert unit.text.startswith("[Unit]")


def test_strict_check_catches_an_undocumented_field() -> None:
    """The checker itself: a Node with a field the document lacks does not conform."""
    schema = _strict(copy.deepcopy(_resolve(SPEC["components"]["schemas"]["Node"])))
    node = {
        "mac": NORM,
        "status": "discovered",
        "liveness": "unknown",
        "labels": {},
        "facts": {},
        "created_at": "2024-05-01T12:00:00.123Z",
        "updated_at": "2024-05-01T12:00:00.123Z",
    }
    assert OAS30Validator(schema).is_valid(node)
    assert not OAS30Validator(schema).is_valid({**node, "install_nonce": "secret"})
