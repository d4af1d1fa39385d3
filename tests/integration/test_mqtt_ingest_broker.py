"""MQTT ingest through the real server and its embedded Mosquitto: statuses, births and wills, the
watchdog, bad messages, unknown nodes, per-node credentials and a broker that dies.

The node side is ``FakeNode``: paho speaking the agent protocol (MQTT 3.1.1, as the agent does), with
a real will that the broker publishes when the node's connection breaks.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from nodefoundry_agent import protocol
from tests.conftest import Server
from tests.integration.mqtt_lab import broker_pid, enroll, mqtt_health, mqtt_ready, node, wait_for

MAC, OTHER, STRANGER = "aabbccddee01", "aabbccddee02", "aabbccddeeff"
NO_AUTH = {"NF_MQTT_NODE_AUTH": "false"}


class FakeNode:
    """One agent connection: its session, a retained birth and will, the commands it receives."""

    def __init__(
        self, port: int, mac: str, session: str, credentials: tuple[str, str] | None = None, timeout: float = 20
    ) -> None:
        self.mac, self.session = mac, session
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{mac}-{session}")
        if credentials:
            self.client.username_pw_set(*credentials)
        self.client.will_set(self.topic(protocol.STATE), protocol.state_payload("offline", session), 1, retain=True)
        self.client.reconnect_delay_set(1, 2)  # a refused CONNACK is retried: the password file may lag a moment
        self.client.on_message = lambda _c, _u, message: self._keep(message.payload)
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        try:
            wait_for(self.client.is_connected, timeout, f"{mac}'s connection to the broker")
        except AssertionError:
            self.client.loop_stop()
            raise
        self.client.subscribe(self.topic(protocol.COMMAND), qos=1)
        self.send(protocol.STATE, protocol.state_payload("online", session), retain=True)

    def topic(self, kind: str, cmd_id: str | None = None) -> str:
        return protocol.topic(self.mac, kind, cmd_id)

    def _keep(self, payload: bytes) -> None:
        with self._lock:
            self.received.append(protocol.parse_command(payload))

    def commands(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.received)

    def send(self, kind: str, payload: bytes, cmd_id: str | None = None, retain: bool = False) -> None:
        """QoS 1, returns once the broker has it."""
        info = self.client.publish(self.topic(kind, cmd_id), payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"the broker did not take {kind} of {self.mac}"

    def status(self, uptime: int = 5, **fields: Any) -> None:
        body = {
            "status": "installed",
            "ip": "10.0.0.21",
            "hostname": "edge-01",
            "uptime": uptime,
            "timestamp": protocol.timestamp(),
            "agent_version": "1.2.0",
            "session": self.session,
            **fields,
        }
        self.send(protocol.STATUS, protocol.encode(body))

    def result(self, cmd_id: str, state: str, **fields: Any) -> None:
        self.send(protocol.RESULT, protocol.result_payload(cmd_id, state, **fields), cmd_id=cmd_id)

    def vanish(self) -> None:
        """The network goes: no DISCONNECT, so the broker publishes the will."""
        sock = self.client.socket()
        self.client.loop_stop()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def closing_nodes() -> Iterator[list[FakeNode]]:
    """The body of a ``nodes`` fixture: the fake nodes a test opens, closed afterwards."""
    opened: list[FakeNode] = []
    yield opened
    for fake in opened:
        fake.close()


@pytest.fixture
def nodes() -> Iterator[list[FakeNode]]:
    yield from closing_nodes()


def connect(nodes: list[FakeNode], server: Server, mac: str, session: str, **kwargs: Any) -> FakeNode:
    fake = FakeNode(mqtt_ready(server)["node_port"], mac, session, **kwargs)
    nodes.append(fake)
    return fake


def start(server_factory: Any, **env: str) -> Server:
    server = server_factory(env={**NO_AUTH, **env}).start()
    mqtt_ready(server)
    return server


def register(server: Server, *macs: str) -> None:
    for mac in macs:
        assert server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201


def counters(server: Server) -> dict[str, int]:
    return mqtt_health(server)["counters"]


def wait_node(server: Server, mac: str, what: str, timeout: float = 20, **wanted: Any) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        response = server.api("GET", f"/api/v1/nodes/{mac}")
        found = response.json() if response.status_code == 200 else {}
        return found if found and all(found.get(key) == value for key, value in wanted.items()) else None

    return wait_for(matches, timeout, f"{mac}: {what}")


def wait_counter(server: Server, name: str, value: int) -> dict[str, int]:
    return wait_for(lambda: (found := counters(server)).get(name) == value and found, 20, f"{name}={value}")


def kinds(server: Server, mac: str) -> list[str]:
    return [event["kind"] for event in server.api("GET", f"/api/v1/nodes/{mac}/events").json()]


# --- statuses ---------------------------------------------------------------------------------------------------


def test_a_status_installs_the_node_and_records_the_agent(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    register(server, MAC)
    assert server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"}).status_code == 200
    connect(nodes, server, MAC, "s1").status(uptime=42)
    found = wait_node(server, MAC, "installed", status="installed", liveness="online")
    assert (found["ip"], found["hostname"]) == ("10.0.0.21", "edge-01")
    assert found["facts"] == {"uptime": 42, "agent_version": "1.2.0"}
    assert found["last_heartbeat"] >= found["install_started_at"]
    events = server.api("GET", f"/api/v1/nodes/{MAC}/events").json()
    installed = next(event for event in events if event["kind"] == "installed")
    assert (installed["source"], installed["old"], installed["new"]) == ("mqtt", "installing", "installed")
    assert {"online", "installed"} <= set(kinds(server, MAC))
    wait_for(lambda: counters(server)["applied"] == 2, 10, "the birth and the status counted as applied")


def test_bad_messages_are_dropped_counted_and_change_nothing(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    register(server, MAC)
    before = node(server, MAC)
    spy = connect(nodes, server, OTHER, "spy")  # publishes onto MAC's topics (no per-node auth in this server)
    for payload in (b"{not json", b"[1]", protocol.encode({"uptime": "5"}), protocol.encode({"ip": "10.0.0.300"}),
                    protocol.encode({"hostname": "a;b"}), protocol.encode({"uptime": True})):  # fmt: skip
        spy.client.publish(protocol.topic(MAC, protocol.STATUS), payload, qos=1).wait_for_publish(10)
    spy.client.publish(protocol.topic(MAC, protocol.STATUS), b"x" * 5000, qos=1).wait_for_publish(10)
    spy.client.publish(protocol.topic(MAC, protocol.FACTS), b"\xff", qos=1).wait_for_publish(10)
    for topic in ("node/AABBCCDDEE01/status", "node/not-a-mac/state", f"node/{MAC}/result/bad.id"):
        spy.client.publish(topic, protocol.encode({"state": "online", "session": "x"}), qos=1).wait_for_publish(10)
    wanted = {"bad_topic": 3, "malformed": 7, "oversize": 1}
    wait_for(lambda: {key: counters(server)[key] for key in wanted} == wanted, 20, f"counters {wanted}")
    assert node(server, MAC) == before and kinds(server, MAC) == ["registered"]


def test_unknown_nodes_are_ignored_unless_told_to_register(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    connect(nodes, server, STRANGER, "s1").status()
    wait_counter(server, "unknown_node", 2)  # its birth and its status
    assert server.api("GET", f"/api/v1/nodes/{STRANGER}").status_code == 404

    adopting = start(server_factory, NF_MQTT_REGISTER_UNKNOWN="true")
    connect(nodes, adopting, STRANGER, "s1").status()
    found = wait_node(adopting, STRANGER, "registered", status="installed", liveness="online", ip="10.0.0.21")
    assert found["facts"]["agent_version"] == "1.2.0"
    wait_counter(adopting, "registered", 1)


# --- liveness ---------------------------------------------------------------------------------------------------


def test_births_and_wills_follow_the_session(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    register(server, MAC)
    first = connect(nodes, server, MAC, "s1")
    wait_node(server, MAC, "online by its birth", liveness="online")
    second = connect(nodes, server, MAC, "s2")  # the agent reconnected before the broker noticed the first
    first.vanish()
    wait_counter(server, "stale_will", 1)
    assert node(server, MAC)["liveness"] == "online"
    second.vanish()
    wait_node(server, MAC, "offline by its will", liveness="offline")
    events = [e for e in server.api("GET", f"/api/v1/nodes/{MAC}/events").json() if e["kind"] in ("online", "offline")]
    assert [(e["kind"], e["detail"]["reason"], e["source"]) for e in events] == [
        ("online", "birth", "mqtt"), ("offline", "will", "mqtt")]  # fmt: skip


def test_the_watchdog_takes_a_silent_node_offline(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory, NF_HEARTBEAT_INTERVAL="5")  # timeout 3 x 5 s
    register(server, MAC)
    fake = connect(nodes, server, MAC, "s1")
    fake.status()
    wait_node(server, MAC, "online", liveness="online")
    # Silent but connected (no will): only the watchdog can notice. It waits a whole timeout after the
    # server connected, then acts within its 2 s period.
    wait_node(server, MAC, "offline by the watchdog", timeout=60, liveness="offline")
    last = server.api("GET", f"/api/v1/nodes/{MAC}/events").json()[-1]
    assert (last["kind"], last["detail"]) == ("offline", {"reason": "heartbeat timeout", "timeout_seconds": 15})
    fake.status(uptime=60)
    wait_node(server, MAC, "online again", liveness="online")


# --- per-node credentials ---------------------------------------------------------------------------------------


def test_an_enrolled_node_reports_with_its_own_credentials(
    server_factory: Any, nodes: list[FakeNode], tmp_path: Path
) -> None:
    server = server_factory().start()  # per-node broker auth on (the default)
    mqtt_ready(server)
    settings = enroll(server, MAC, tmp_path)
    credentials = (settings["NF_MQTT_USERNAME"], settings["NF_MQTT_PASSWORD"])
    connect(nodes, server, MAC, "s1", credentials=credentials).status()
    wait_node(server, MAC, "installed through its own account", status="installed", liveness="online")
    with pytest.raises(AssertionError, match="connection to the broker"):  # 5 s only bound the wait
        FakeNode(mqtt_ready(server)["node_port"], OTHER, "s1", credentials=(OTHER, "guessed"), timeout=5)


# --- the broker fails -------------------------------------------------------------------------------------------


def listen(port: int) -> socket.socket | None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", port))
        holder.listen()
    except OSError:
        holder.close()
        return None
    return holder


def kill_broker_and_hold_its_port(server: Server) -> tuple[set[int], socket.socket]:
    """SIGKILL the embedded Mosquitto and listen on its port, so the supervisor cannot restart it until the
    test lets go: the outage lasts as long as the test needs to look at it."""
    port = mqtt_ready(server)["node_port"]
    killed: set[int] = set()

    def kill_and_hold() -> socket.socket | None:
        pid = broker_pid(server)  # the dead one stays listed until the supervisor reaps it
        if pid is not None and pid not in killed:  # a new one: the supervisor restarted it first
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        return listen(port)

    return killed, wait_for(kill_and_hold, 10, "the broker's port", interval=0.01)


def test_a_killed_broker_degrades_only_mqtt_and_comes_back(server_factory: Any, nodes: list[FakeNode]) -> None:
    server = start(server_factory)
    register(server, MAC)
    killed, holder = kill_broker_and_hold_its_port(server)
    try:
        degraded = wait_for(lambda: (found := mqtt_health(server))["state"] != "ok" and found, 20, "mqtt not ok")
        assert degraded["state"] == "degraded"
        health = server.get("/health").json()
        assert health["status"] == "degraded" and health["components"]["http"]["state"] == "ok"
        assert server.api("GET", f"/api/v1/nodes/{MAC}").status_code == 200  # HTTP keeps serving
    finally:
        holder.close()
    mqtt_ready(server)  # the supervisor restarted Mosquitto on its port and paho reconnected
    assert broker_pid(server) not in (None, *killed)
    connect(nodes, server, MAC, "s1").status(uptime=7)
    # the birth and the status may land in different ingest batches: wait for the status itself
    wait_node(server, MAC, "ingest works again", liveness="online", facts={"uptime": 7, "agent_version": "1.2.0"})
    assert "embedded MQTT broker exited" in server.log_text()
