"""Put nodes of a real server into every lifecycle state through the paths real nodes use.

Registration and install go through the REST API; an install ends through the installer callback that
debian-installer calls (with the install token from the node's iPXE script); liveness and facts arrive
over MQTT on the server's own broker, with the node's credentials from its preseed and payloads built
by the agent's protocol module. Nothing is written to the database behind the server's back.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from nodefoundry_agent import protocol
from tests.polling import wait_for


def ok(response: Any, *statuses: int) -> Any:
    assert response.status_code in (statuses or (200,)), f"{response.status_code}: {response.text}"
    return response.json() if response.content else None


def node(server: Any, mac: str) -> dict[str, Any]:
    return ok(server.api("GET", f"/api/v1/nodes/{mac}"))


def register(server: Any, mac: str, **fields: Any) -> dict[str, Any]:
    return ok(server.api("POST", "/api/v1/nodes", json={"mac": mac, **fields}), 201)


def start_install(server: Any, mac: str) -> dict[str, Any]:
    return ok(server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}))


def mqtt_credentials(server: Any, mac: str, token: str) -> tuple[str, str]:
    """The broker user and password the preseed hands to the node's agent."""
    preseed = server.get(f"/preseed/{mac}/preseed.cfg", params={"token": token}).text
    user = re.search(r"NF_MQTT_USERNAME=([0-9a-f]{12})", preseed)
    password = re.search(r"NF_MQTT_PASSWORD=([0-9a-f]+)", preseed)
    assert user and password, preseed
    return user.group(1), password.group(1)


def end_install(server: Any, mac: str, token: str, event: str) -> None:
    response = server.session.post(f"{server.url}/installer/{mac}/{event}", params={"token": token}, timeout=30)
    assert response.status_code == 204, response.text


def installing(server: Any, mac: str, **fields: Any) -> None:
    register(server, mac, **fields)
    start_install(server, mac)


def installed(server: Any, mac: str, **fields: Any) -> tuple[str, str]:
    """Install to the end; the agent's broker credentials of the installed node."""
    installing(server, mac, **fields)
    token = server.install_token(mac)
    credentials = mqtt_credentials(server, mac, token)
    end_install(server, mac, token, "finished")
    return credentials


def failed(server: Any, mac: str, **fields: Any) -> None:
    installing(server, mac, **fields)
    end_install(server, mac, server.install_token(mac), "failed")


def broker_port(server: Any) -> int:
    """The node port of the server's embedded broker, once the server is connected to it."""

    def port() -> int | None:
        component = server.get("/health").json()["components"].get("mqtt", {})
        found = re.search(r"nodes on port (\d+)", component.get("detail", ""))
        return int(found.group(1)) if component.get("state") == "ok" and found else None

    return wait_for(port, 30, "the server's MQTT broker")


class Agent:
    """A node's MQTT session as its agent holds it: birth, status, facts and (optionally) the will."""

    def __init__(self, server: Any, credentials: tuple[str, str]) -> None:
        self.server = server
        self.mac, password = credentials
        self.session = uuid.uuid4().hex
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"nf-test-{self.mac}")
        self.client.username_pw_set(self.mac, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect("127.0.0.1", broker_port(server), keepalive=60)
        self.client.loop_start()
        # The broker learns the node's password when the server reloads it; paho retries until accepted.
        wait_for(self.client.is_connected, 30, f"the broker to accept {self.mac}")

    def publish(self, kind: str, payload: bytes) -> None:
        info = self.client.publish(protocol.topic(self.mac, kind), payload, qos=1)
        info.wait_for_publish(timeout=15)
        assert info.is_published(), f"PUBLISH {kind} for {self.mac} not acknowledged"

    def online(self, ip: str, hostname: str, facts: dict[str, Any]) -> dict[str, Any]:
        """Birth, status and facts; returns the node once the server shows all three."""
        self.publish(protocol.STATE, protocol.state_payload("online", self.session))
        self.publish(protocol.STATUS, protocol.status_payload(ip, hostname, 60, "0.1.0", self.session))
        self.publish(protocol.FACTS, protocol.encode(facts))
        return wait_for(
            lambda: (
                (found := node(self.server, self.mac))["liveness"] == "online"
                and found.get("ip") == ip
                and (found.get("facts") or {}).get("agent") == facts
                and found
            ),
            30,
            f"{self.mac} online with its facts",
        )

    def offline(self) -> dict[str, Any]:
        """The will the broker would publish for a node that went away."""
        self.publish(protocol.STATE, protocol.state_payload("offline", self.session))
        return wait_for(
            lambda: (found := node(self.server, self.mac))["liveness"] == "offline" and found,
            30,
            f"{self.mac} offline",
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def pxe_boot(server: Any, mac: str, buildarch: str = "arm64", platform: str = "efi") -> dict[str, Any]:
    """The first iPXE request of a new node: the server registers it as discovered, with its architecture."""
    response = server.get("/boot.ipxe", params={"mac": mac, "arch": buildarch, "platform": platform})
    assert response.status_code == 200, response.text
    return node(server, mac)


def update(server: Any, mac: str, **fields: Any) -> dict[str, Any]:
    return ok(server.api("PATCH", f"/api/v1/nodes/{mac}", json=fields))
