"""NF_INSTALL_TOKEN_BIND_IP: an install is pinned to one address (requests from several loopback sources)."""

from __future__ import annotations

import http.client

import pytest

from tests.conftest import install_token_in


def fetch(server, path: str, source: str, method: str = "GET") -> tuple[int, str]:
    """One request from a chosen loopback source address (127.0.0.0/8 is all local)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def bound_server(server_factory):
    return server_factory(env={"NF_INSTALL_TOKEN_BIND_IP": "true"}).start()


def install(server, mac: str, **fields) -> None:
    assert server.api("POST", "/api/v1/nodes", json={"mac": mac, **fields}).status_code == 201
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200


def test_a_node_with_a_static_address_owns_its_install_from_there(bound_server):
    mac = "0b0000000001"
    install(bound_server, mac, ip="127.0.0.2", netmask="255.0.0.0")
    status, script = fetch(bound_server, f"/boot/{mac}/boot.ipxe", "127.0.0.1")
    assert status == 200 and install_token_in(script) is None and "chain --replace" in script  # a wait loop, no token
    status, script = fetch(bound_server, f"/boot/{mac}/boot.ipxe", "127.0.0.2")
    token = install_token_in(script)
    assert status == 200 and token
    preseed = f"/preseed/{mac}/preseed.cfg?token={token}"
    assert fetch(bound_server, preseed, "127.0.0.1")[0] == 403
    assert fetch(bound_server, preseed, "127.0.0.2")[0] == 200
    callback = f"/installer/{mac}/started?token={token}"
    assert fetch(bound_server, callback, "127.0.0.3", "POST")[0] == 403
    assert fetch(bound_server, callback, "127.0.0.2", "POST")[0] == 204


def test_without_an_address_the_first_requester_is_pinned(bound_server):
    mac = "0b0000000002"
    install(bound_server, mac)
    status, script = fetch(bound_server, f"/boot/{mac}/boot.ipxe", "127.0.0.5")
    token = install_token_in(script)
    assert status == 200 and token
    assert install_token_in(fetch(bound_server, f"/boot/{mac}/boot.ipxe", "127.0.0.6")[1]) is None
    assert fetch(bound_server, f"/preseed/{mac}/preseed.cfg?token={token}", "127.0.0.6")[0] == 403
    assert fetch(bound_server, f"/preseed/{mac}/preseed.cfg?token={token}", "127.0.0.5")[0] == 200
    # the pin dies with the install: after a failure and a reinstall another address may claim it
    assert fetch(bound_server, f"/installer/{mac}/failed?token={token}", "127.0.0.5", "POST")[0] == 204
    assert bound_server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "reinstall"}).status_code == 200
    assert install_token_in(fetch(bound_server, f"/boot/{mac}/boot.ipxe", "127.0.0.6")[1])


def test_without_binding_any_address_gets_the_script(server):
    mac = "0b0000000003"
    install(server, mac, ip="127.0.0.2", netmask="255.0.0.0")
    assert install_token_in(fetch(server, f"/boot/{mac}/boot.ipxe", "127.0.0.9")[1])
