"""POST /api/v1/nodes/{mac}/credentials through the real server and real Mosquitto brokers.

The node is installed the way a real one is (register, install, the installer's ``finished`` callback with
the install token), so the install's derived password is gone, as on a system whose agent the role sets up
later. The credentials the API returns must bring a real agent online; a second call must lock the first
password out of the broker. Both ways the server maintains a broker's accounts are exercised: the embedded
Mosquitto, and an external one whose password and ACL files the server rewrites and reloads.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodefoundry_server.mqtt.credentials import SERVER_USER, acl_text, password_hash
from tests.conftest import Server, free_port, wait_for
from tests.integration.mqtt_lab import HEARTBEAT, Agent, agent_env_from_preseed, mqtt_ready, node
from tests.integration.test_openapi_conformance import conforms, readonly_token
from tests.unit.test_mqtt_credentials import connack, wait_listening

MAC = "0e00000c0d01"
ROUTE = "/api/v1/nodes/{mac}/credentials"
SYNC_SECONDS = 20  # the server syncs the password file every 2 s; slack for a loaded machine
ONLINE_SECONDS = 30


def credentials_url(mac: str) -> str:
    return ROUTE.replace("{mac}", mac)


def installed_node(server: Server, mac: str, workdir: Path) -> dict[str, str]:
    """Install ``mac`` to the end through the installer path; return the env its preseed wrote."""
    assert server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    token = server.install_token(mac)
    preseed = server.get(f"/preseed/{mac}/preseed.cfg?token={token}")
    assert preseed.status_code == 200, preseed.text
    env = agent_env_from_preseed(preseed.text, workdir / f"debconf-{mac}")
    finished = server.session.post(f"{server.url}/installer/{mac}/finished?token={token}", timeout=30)
    assert finished.status_code == 204, finished.text
    assert node(server, mac)["status"] == "installed"
    return env


def issue(server: Server, mac: str = MAC, status: int = 201) -> dict[str, Any]:
    response = server.api("POST", credentials_url(mac))
    assert response.status_code == status, response.text
    if response.ok:
        assert response.headers["Cache-Control"] == "no-store"
    return conforms(response, ROUTE)


def broker_answer(port: int, username: str, password: str) -> str:
    return str(connack(port, username, password))


def wait_answer(port: int, username: str, password: str, expected: str) -> None:
    """The password file is synced in the background: wait (bounded) until the broker answers ``expected``."""
    wait_for(lambda: broker_answer(port, username, password) == expected, SYNC_SECONDS, f"CONNACK {expected!r}")


@pytest.fixture
def embedded(server_factory: Any) -> Server:
    """The embedded broker with a fixed node listener, so the env's NF_MQTT_BROKER is where nodes connect."""
    env = {"NF_HEARTBEAT_INTERVAL": str(HEARTBEAT), "NF_MQTT_EMBEDDED_LISTEN": f"127.0.0.1:{free_port()}"}
    server = server_factory(env).start()
    mqtt_ready(server)
    return server


def test_issued_credentials_bring_the_agent_online_and_a_new_issue_revokes_them(
    embedded: Server, tmp_path: Path
) -> None:
    preseed_env = installed_node(embedded, MAC, tmp_path)
    first = issue(embedded)
    env = first["agent_env"]
    assert first["credentials_delivered"] is True and first["username"] == MAC
    assert re.fullmatch(r"[0-9a-f]{64}", first["password"])
    assert env == preseed_env | {"NF_MQTT_PASSWORD": first["password"]}  # one builder for both
    assert env["NF_MQTT_PASSWORD"] != preseed_env["NF_MQTT_PASSWORD"]

    agent = Agent(tmp_path / "agent", env).start()
    try:
        wait_for(lambda: node(embedded, MAC)["liveness"] == "online", ONLINE_SECONDS, "the node online")
    finally:
        agent.stop()
    assert node(embedded, MAC)["status"] == "installed"

    port = int(env["NF_MQTT_BROKER"].rsplit(":", 1)[1])
    assert broker_answer(port, MAC, first["password"]) == "Success"
    second = issue(embedded)
    assert second["password"] != first["password"]
    wait_answer(port, MAC, first["password"], "Not authorized")
    assert broker_answer(port, MAC, second["password"]) == "Success"

    events = embedded.api("GET", f"/api/v1/nodes/{MAC}/events").json()
    issued = [event for event in events if event["kind"] == "credentials-issued"]
    assert [(e["actor"], e["detail"]) for e in issued] == [("NF_API_TOKEN", {"username": MAC})] * 2
    assert first["password"] not in str(events) and second["password"] not in str(events)


def test_errors_are_clear_4xx(embedded: Server) -> None:
    assert embedded.api("POST", "/api/v1/nodes", json={"mac": MAC}).status_code == 201
    for url, token, status, message in [
        (credentials_url("0e00000c0dff"), "admin", 404, "node not found"),
        (credentials_url("not-a-mac"), "admin", 400, "invalid MAC address format"),
        (credentials_url(MAC), None, 401, "missing or invalid token"),
        (credentials_url(MAC), "nf_wrong", 401, "missing or invalid token"),
        (credentials_url(MAC), readonly_token(embedded), 403, "read-only token cannot change anything"),
    ]:
        kwargs = {} if token == "admin" else {"token": token}
        response = embedded.api("POST", url, **kwargs)
        assert response.status_code == status, (url, token)
        assert conforms(response, ROUTE) == {"error": message}
    assert embedded.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"}).status_code == 200
    installing = embedded.api("POST", credentials_url(MAC))
    assert installing.status_code == 409
    assert conforms(installing, ROUTE) == {"error": "node is installing: the installer delivers its credentials"}
    bad_host = embedded.api("POST", credentials_url(MAC), headers={"Host": "bad host"})
    assert bad_host.status_code == 400
    conforms(bad_host, ROUTE)
    assert [e["kind"] for e in embedded.api("GET", f"/api/v1/nodes/{MAC}/events").json()] == [
        "registered",
        "install",
    ]


def test_without_node_auth_the_env_has_no_credentials(server_factory: Any) -> None:
    server = server_factory({"NF_MQTT_NODE_AUTH": "false"}).start()
    assert server.api("POST", "/api/v1/nodes", json={"mac": MAC}).status_code == 201
    body = issue(server, status=200)
    assert body["credentials_delivered"] is False and "password" not in body
    assert set(body["agent_env"]) == {"NF_MAC", "NF_MQTT_BROKER", "NF_LOG_LEVEL", "NF_HEARTBEAT_INTERVAL"}
    assert [e["kind"] for e in server.api("GET", f"/api/v1/nodes/{MAC}/events").json()] == ["registered"]
    assert issue(server, "0e00000c0dff", status=404) == {"error": "node not found"}


@pytest.fixture
def external_broker(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """A Mosquitto of the operator's, seeded with the server's account; the server then maintains its files."""
    port, auth = free_port(), tmp_path / "broker"
    auth.mkdir()
    (auth / "passwd").write_text(f"{SERVER_USER}:{password_hash('server secret')}\n")
    (auth / "acl").write_text(acl_text(SERVER_USER))
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\npersistence false\nallow_anonymous false\nlistener {port} 127.0.0.1\n"
        f"password_file {auth / 'passwd'}\nacl_file {auth / 'acl'}\n"
    )
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield port, auth, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_external_broker_files_carry_the_issued_password(
    server_factory: Any, external_broker: tuple[int, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    port, auth, broker = external_broker
    server = server_factory(
        {
            "NF_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "NF_MQTT_BROKER": f"127.0.0.1:{port}",
            "NF_MQTT_USERNAME": SERVER_USER,
            "NF_MQTT_PASSWORD": "server secret",
            "NF_MQTT_PASSWORD_FILE": str(auth / "passwd"),
            "NF_MQTT_ACL_FILE": str(auth / "acl"),
            "NF_MQTT_RELOAD_COMMAND": f"kill -HUP {broker.pid}",
        }
    ).start()
    mqtt_ready(server)
    installed_node(server, MAC, tmp_path)
    first = issue(server)
    assert first["agent_env"]["NF_MQTT_BROKER"] == f"127.0.0.1:{port}"
    wait_answer(port, MAC, first["password"], "Success")

    agent = Agent(tmp_path / "agent", first["agent_env"]).start()
    try:
        wait_for(lambda: node(server, MAC)["liveness"] == "online", ONLINE_SECONDS, "the node online")
    finally:
        agent.stop()

    second = issue(server)
    wait_answer(port, MAC, first["password"], "Not authorized")
    assert broker_answer(port, MAC, second["password"]) == "Success"
