"""The embedded broker and per-node credentials against a real Mosquitto 2.0 and real paho clients.

``EmbeddedBroker`` runs here on a private store; the last tests go through the real server. Denials
are observed over MQTT 5, where Mosquitto answers a refused connection or publish with "Not
authorized". A message that must not arrive is checked with a later message on the same path, which
the broker delivers in order, so no test waits for something not to happen.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from nodefoundry_agent import build as agent_build
from nodefoundry_server import lifecycle
from nodefoundry_server.config import Config, load
from nodefoundry_server.mqtt import broker as broker_module
from nodefoundry_server.mqtt import credentials
from nodefoundry_server.mqtt.broker import RUNTIME_ROOT, BrokerEndpoint, EmbeddedBroker
from nodefoundry_server.store import Store
from tests.conftest import free_port
from tests.debconf import debconf_load
from tests.integration.mqtt_lab import wait_for

MAC_A, MAC_B = "aabbccddee01", "aabbccddee02"
PASSWORD_A, PASSWORD_B = "password of a", "password of b"
TIMEOUT = 30.0
NOT_AUTHORIZED = "Not authorized"


class Peer:
    """A paho MQTT 5 client on its own network thread that records what the broker answers."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str = "") -> None:
        self.port = port
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnects: list[str] = []
        self._acks: dict[int, Any] = {}
        self._connack: list[mqtt.ReasonCode] = []
        self._changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda _c, _u, _f, code, _p: self._record(self._connack.append, code)
        self.client.on_publish = lambda _c, _u, mid, code, _p: self._record(self._acks.__setitem__, mid, code)
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self._record(self._acks.__setitem__, mid, codes[0])
        self.client.on_message = lambda _c, _u, message: self.messages.put((message.topic, message.payload))
        self.client.on_disconnect = lambda _c, _u, _f, code, _p: self.disconnects.append(str(code))

    def _record(self, store: Any, *args: Any) -> None:
        with self._changed:
            store(*args)
            self._changed.notify_all()

    def _wait(self, predicate: Any, what: str) -> Any:
        with self._changed:
            if not self._changed.wait_for(predicate, TIMEOUT):
                raise AssertionError(f"no {what} within {TIMEOUT:.0f} s")
        return predicate()

    def connect(self) -> str:
        """The CONNACK's reason ("Success" or why not); only an accepted client gets a network thread."""
        self.client.connect("127.0.0.1", self.port)
        deadline = time.monotonic() + TIMEOUT
        while not self._connack and time.monotonic() < deadline:
            self.client.loop(timeout=0.1)
        assert self._connack, f"no CONNACK within {TIMEOUT:.0f} s"
        if not self._connack[0].is_failure:
            self.client.loop_start()
        return str(self._connack[0])

    def publish(self, topic: str, payload: bytes = b"x") -> str:
        """QoS 1, so the broker answers: the PUBACK's reason."""
        mid = self.client.publish(topic, payload, qos=1).mid
        return str(self._wait(lambda: self._acks.get(mid), f"PUBACK for {topic}"))

    def subscribe(self, topic: str) -> str:
        """The SUBACK's reason: the granted QoS, or why not."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        return str(self._wait(lambda: self._acks.get(mid), f"SUBACK for {topic}"))

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_config(db_path: Path, **values: Any) -> Config:
    base = load(None, {"NF_DB_PATH": str(db_path)})
    return dataclasses.replace(base, values={**base.values, **values})


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A data directory user mosquitto can reach (pytest's own tmp_path is under a 0700 directory)."""
    directory = Path(tempfile.mkdtemp(prefix="nf-broker-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def store(reachable_dir: Path) -> Store:
    store = Store(reachable_dir / "data" / "nodes.db")
    store.open()
    for mac, password in ((MAC_A, PASSWORD_A), (MAC_B, PASSWORD_B)):
        lifecycle.register(store, mac, {}, source="api")
        with store.write() as conn:
            credentials.mint_in(conn, mac, password)
    return store


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


@pytest.fixture
def broker(store: Store) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(make_config(Path(store.path)), store)
    yield broker
    broker.stop()


def connected(peers: list[Peer], port: int, username: str | None, password: str | None, client_id: str = "") -> Peer:
    peer = Peer(port, username, password, client_id)
    peers.append(peer)
    assert peer.connect() == "Success"
    return peer


def attempt(port: int, username: str | None, password: str | None) -> str:
    """Connect once and leave: the CONNACK's reason, or that nothing listens (yet)."""
    peer = Peer(port, username, password)
    try:
        return peer.connect()
    except ConnectionRefusedError:
        return "not listening"
    finally:
        peer.close()


def mosquitto_pids(conf: Path) -> list[int]:
    """Processes running ``mosquitto -c <conf>``, found the way an operator would (the process table)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        if len(argv) > 2 and argv[0].endswith(b"mosquitto") and argv[2] == str(conf).encode():
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                found.append(int(entry.name))
    return found


def process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def readable_by_mosquitto(path: Path) -> bool:
    return subprocess.run(["runuser", "-u", "mosquitto", "--", "test", "-r", str(path)], check=False).returncode == 0


# --- accounts and the ACL -------------------------------------------------------------------------------------


def test_server_account_reads_every_node_and_writes_only_commands(broker: EmbeddedBroker, peers: list[Peer]) -> None:
    endpoint = broker.start()
    assert (endpoint.host, endpoint.username, endpoint.tls) == ("127.0.0.1", "nodefoundry-server", False)
    server = connected(peers, endpoint.port, endpoint.username, endpoint.password)
    node_a = connected(peers, endpoint.port, MAC_A, PASSWORD_A)
    assert server.subscribe("node/#") == "Granted QoS 1"
    assert node_a.publish(f"node/{MAC_A}/status", b"hello") == "Success"
    assert server.next_message() == (f"node/{MAC_A}/status", b"hello")
    assert server.publish(f"node/{MAC_A}/status") == NOT_AUTHORIZED
    assert server.publish(f"node/{MAC_A}/command") == "Success"
    assert server.next_message()[0] == f"node/{MAC_A}/command"


def test_a_node_publishes_only_its_own_topics(broker: EmbeddedBroker, peers: list[Peer]) -> None:
    endpoint = broker.start()
    server = connected(peers, endpoint.port, endpoint.username, endpoint.password)
    assert server.subscribe("node/#") == "Granted QoS 1"
    node_a = connected(peers, endpoint.port, MAC_A, PASSWORD_A)
    own = [f"node/{MAC_A}/{kind}" for kind in ("status", "state", "facts", "result/c1")]
    foreign = [f"node/{MAC_B}/status", f"node/{MAC_B}/result/c1", f"node/{MAC_A}/command", "elsewhere"]
    for topic in foreign + own:
        assert node_a.publish(topic) == (NOT_AUTHORIZED if topic in foreign else "Success"), topic
    # In order from one publisher: had a refused publish gone through, it would arrive before these.
    assert [server.next_message()[0] for _ in own] == own


def test_a_node_reads_only_its_own_commands(broker: EmbeddedBroker, peers: list[Peer]) -> None:
    endpoint = broker.start()
    server = connected(peers, endpoint.port, endpoint.username, endpoint.password)
    node_a = connected(peers, endpoint.port, MAC_A, PASSWORD_A)
    node_b = connected(peers, endpoint.port, MAC_B, PASSWORD_B)
    # Mosquitto 2.0 grants these subscriptions and filters each delivery by the read ACL.
    for topic in (f"node/{MAC_B}/command", f"node/{MAC_B}/status", "node/#", f"node/{MAC_A}/command"):
        assert node_a.subscribe(topic) == "Granted QoS 1", topic
    assert server.publish(f"node/{MAC_B}/command", b"for b") == "Success"
    assert node_b.publish(f"node/{MAC_B}/status", b"from b") == "Success"
    # Each PUBACK came after the broker routed that message, so anything A were given would be queued first.
    assert server.publish(f"node/{MAC_A}/command", b"for a") == "Success"
    assert node_a.next_message() == (f"node/{MAC_A}/command", b"for a")


def test_wrong_password_anonymous_and_unknown_users_are_refused(broker: EmbeddedBroker) -> None:
    endpoint = broker.start()
    attempts = [(MAC_A, PASSWORD_B), (MAC_A, ""), ("ffeeddccbbaa", PASSWORD_A), (None, None)]
    attempts += [("nodefoundry-server", "guess"), ("nodefoundry-probe", "guess")]
    for username, password in attempts:
        assert attempt(endpoint.port, username, password) == NOT_AUTHORIZED, username


def test_a_node_cannot_take_over_the_servers_session(broker: EmbeddedBroker, peers: list[Peer]) -> None:
    endpoint = broker.start()
    server = connected(peers, endpoint.port, endpoint.username, endpoint.password, client_id="nodefoundry-server")
    assert server.subscribe("node/#") == "Granted QoS 1"
    impostor = connected(peers, endpoint.port, MAC_A, PASSWORD_A, client_id="nodefoundry-server")
    assert impostor.publish(f"node/{MAC_A}/status", b"after") == "Success"
    assert server.next_message() == (f"node/{MAC_A}/status", b"after")
    assert server.disconnects == []


def test_new_and_replaced_credentials_apply_after_sync(broker: EmbeddedBroker, store: Store, peers: list[Peer]) -> None:
    endpoint = broker.start()
    assert broker.sync_credentials() is False  # nothing changed since the start
    mac_c = "aabbccddee03"
    lifecycle.register(store, mac_c, {}, source="api")
    with store.write() as conn:
        credentials.mint_in(conn, mac_c, "password of c")
        credentials.mint_in(conn, MAC_A, "new password of a")  # a reinstall
    store.conn().execute("DELETE FROM nodes WHERE mac = ?", (MAC_B,))  # a deleted node
    assert broker.sync_credentials() is True
    # SIGHUP is asynchronous: poll until Mosquitto has read the new file (bounded), then check the rest.
    wait_for(lambda: attempt(endpoint.port, mac_c, "password of c") == "Success", TIMEOUT, "the new account")
    connected(peers, endpoint.port, MAC_A, "new password of a")
    for username, password in ((MAC_A, PASSWORD_A), (MAC_B, PASSWORD_B)):
        assert attempt(endpoint.port, username, password) == NOT_AUTHORIZED, username


# --- files, processes, restarts -------------------------------------------------------------------------------


def test_files_are_private_to_root_and_the_broker_user(broker: EmbeddedBroker, store: Store) -> None:
    broker.start()
    assert broker.files_dir == Path(store.path).parent / "mqtt"
    mosquitto = pwd.getpwnam("mosquitto")
    for path in (broker.files_dir, *(broker.files_dir / name for name in ("mosquitto.conf", "passwd", "acl"))):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, mosquitto.pw_gid), path
        assert info.st_mode & 0o7777 == (0o750 if path.is_dir() else 0o640), path
        assert readable_by_mosquitto(path), path
    conf = broker.files_dir / "mosquitto.conf"
    [pid] = mosquitto_pids(conf)
    assert process_uid(pid) == mosquitto.pw_uid  # started as mosquitto, never as root
    text = conf.read_text()
    assert "persistence false" in text and "allow_anonymous false" in text
    assert f"listener {broker.port} 127.0.0.1\n" in text and text.count("listener ") == 1


def test_a_data_dir_the_broker_user_cannot_reach_moves_its_files_to_run(tmp_path: Path, peers: list[Peer]) -> None:
    store = Store(tmp_path / "data" / "nodes.db")  # pytest's tmp_path: under a 0700 directory
    store.open()
    broker = EmbeddedBroker(make_config(Path(store.path)), store)
    try:
        endpoint = broker.start()
        assert broker.files_dir.parent == RUNTIME_ROOT
        assert all(readable_by_mosquitto(broker.files_dir / name) for name in ("mosquitto.conf", "passwd", "acl"))
        assert (tmp_path / "data" / "mqtt" / "mosquitto.log").exists()
        connected(peers, endpoint.port, endpoint.username, endpoint.password)
    finally:
        broker.stop()
    assert not broker.files_dir.exists()


def test_ensure_running_restarts_a_killed_broker_on_the_same_port(broker: EmbeddedBroker, peers: list[Peer]) -> None:
    endpoint = broker.start()
    conf = broker.files_dir / "mosquitto.conf"
    [pid] = mosquitto_pids(conf)
    assert broker.ensure_running() is True
    assert mosquitto_pids(conf) == [pid]  # alive: left alone
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not mosquitto_pids(conf), TIMEOUT, "mosquitto to die")
    assert broker.ensure_running() is True
    [new_pid] = mosquitto_pids(conf)
    assert new_pid != pid and broker.port == endpoint.port
    connected(peers, endpoint.port, endpoint.username, endpoint.password)
    connected(peers, endpoint.port, MAC_A, PASSWORD_A)
    broker.stop()
    assert mosquitto_pids(conf) == []
    assert broker.ensure_running() is False  # stopped means stopped


def test_a_port_taken_before_mosquitto_binds_it_is_replaced(
    broker: EmbeddedBroker, peers: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ports = iter([squatter.getsockname()[1], free_port()])
        monkeypatch.setattr(broker_module, "_free_port", lambda: next(ports))
        endpoint = broker.start()
        assert endpoint.port != squatter.getsockname()[1]
    assert "Address already in use" in broker.log_path.read_text()
    connected(peers, endpoint.port, endpoint.username, endpoint.password)


def test_the_broker_dies_with_the_process_that_started_it(store: Store) -> None:
    script = textwrap.dedent(
        f"""
        import dataclasses, sys, time
        from nodefoundry_server.config import load
        from nodefoundry_server.mqtt.broker import EmbeddedBroker
        from nodefoundry_server.store import Store
        config = load(None, {{"NF_DB_PATH": {store.path!r}}})
        EmbeddedBroker(config, Store(config.db_path)).start()
        print("started", flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "started\n"
        conf = Path(store.path).parent / "mqtt" / "mosquitto.conf"
        assert len(mosquitto_pids(conf)) == 1
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not mosquitto_pids(conf), TIMEOUT, "mosquitto to die with its parent")


def test_node_listener_and_anonymous_mode(reachable_dir: Path, peers: list[Peer]) -> None:
    store = Store(reachable_dir / "data" / "nodes.db")
    store.open()
    node_port = free_port()
    config = make_config(Path(store.path), mqtt_node_auth=False, mqtt_embedded_listen=f"127.0.0.1:{node_port}")
    broker = EmbeddedBroker(config, store)
    try:
        endpoint = broker.start()
        assert endpoint == BrokerEndpoint("127.0.0.1", endpoint.port, None, None, False, "")
        assert broker.node_port == node_port != endpoint.port
        assert not (broker.files_dir / "passwd").exists()
        node = connected(peers, node_port, None, None)  # anything goes: mqtt_node_auth=false
        assert node.subscribe("#") == "Granted QoS 1"
        assert node.publish(f"node/{MAC_B}/status", b"anyone") == "Success"
        assert node.next_message() == (f"node/{MAC_B}/status", b"anyone")
    finally:
        broker.stop()


# --- through the real server ----------------------------------------------------------------------------------


def install_preseed(server: Any, mac: str) -> tuple[str, str]:
    """Register and install ``mac``, follow its boot script to the preseed: (preseed text, its URL path)."""
    assert server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    script = server.get(f"/boot/{mac}/boot.ipxe").text
    found = re.search(rf"url={re.escape(server.url)}(/preseed/{mac}/preseed\.cfg\?token=[0-9a-f]+)", script)
    assert found, script
    response = server.get(found.group(1))
    assert response.status_code == 200, response.text
    return response.text, found.group(1)


def agent_env(preseed: str, workdir: Path) -> dict[str, str]:
    """The words the late_command's ``printf`` writes to the agent's env file."""
    late = debconf_load(preseed, workdir)["preseed/late_command"]
    words = late.split("> /target/etc/default/nodefoundry-agent")[0].rsplit("printf '%s\\n'", 1)[1]
    return dict(word.split("=", 1) for word in shlex.split(words))


def test_credentials_reach_the_node_only_through_the_install_token_preseed_and_work(
    server_factory: Any, tmp_path: Path, peers: list[Peer]
) -> None:
    node_port = free_port()
    server = server_factory({"NF_MQTT_EMBEDDED_LISTEN": f"127.0.0.1:{node_port}"}).start()
    preseed, path = install_preseed(server, MAC_A)
    env = agent_env(preseed, tmp_path / "debconf")
    assert env["NF_MQTT_BROKER"] == f"127.0.0.1:{node_port}"
    assert env["NF_MQTT_USERNAME"] == MAC_A and re.fullmatch(r"[0-9a-f]{64}", env["NF_MQTT_PASSWORD"])
    assert server.get(path).text == preseed  # the same install, the same password
    assert env["NF_MQTT_PASSWORD"] not in server.get(f"/boot/{MAC_A}/boot.ipxe").text
    assert server.get(f"/preseed/{MAC_A}/preseed.cfg").status_code == 403
    assert server.get(f"/preseed/{MAC_A}/preseed.cfg?token={'0' * 40}").status_code == 403

    account = (env["NF_MQTT_USERNAME"], env["NF_MQTT_PASSWORD"])
    wait_for(lambda: attempt(node_port, *account) == "Success", TIMEOUT, "the node's account in the broker")
    node = connected(peers, node_port, *account)
    accepted = ("Success", "No matching subscribers")  # the latter while the server's client is not subscribed yet
    assert node.publish(f"node/{MAC_A}/facts", b"{}") in accepted
    assert node.publish(f"node/{MAC_B}/status", b"{}") == NOT_AUTHORIZED


def test_agent_routes_serve_the_installed_agent_unless_the_assets_hold_one(server: Any) -> None:
    agent = server.get("/agent/nodefoundry-agent")
    assert agent.status_code == 200 and agent.headers["Content-Type"] == "application/octet-stream"
    assert agent.content == agent_build.zipapp_bytes() and agent.content.startswith(b"#!/usr/bin/env python3\n")
    unit = server.get("/agent/nodefoundry-agent.service")
    assert unit.status_code == 200 and unit.headers["Content-Type"].startswith("text/plain")
    assert unit.text == agent_build.unit_text()
    overrides = server.assets_dir / "agent"
    overrides.mkdir()
    (overrides / "nodefoundry-agent.pyz").write_bytes(b"operator's own build")
    (overrides / "nodefoundry-agent.service").write_text("[Unit]\n")
    assert server.get("/agent/nodefoundry-agent").content == b"operator's own build"
    assert server.get("/agent/nodefoundry-agent.service").text == "[Unit]\n"
    assert server.get("/agent/other").status_code == 404
