"""The harness of the agent's integration tests: a real Mosquitto, the agent as a real process and a paho
client that watches the node's topics and sends it commands.

The agent runs in both shapes nodes get: the package under the venv's Python (paho-mqtt 2.x), and the built
zipapp under Debian's /usr/bin/python3 (python3-paho-mqtt 1.6). The only stand-ins are at the OS boundary:
the reboot/shutdown commands and systemctl are small scripts that record how they were called. Test modules
take the fixtures by name (``broker = harness.broker``); this module's own test checks the stand-ins.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from nodefoundry_agent import build, protocol
from tests.conftest import free_port
from tests.conftest import wait_for as poll_until

T = TypeVar("T")
MAC = "02a0b0c0d0e1"
WAIT_SECONDS = 20.0
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian 12's interpreter with python3-paho-mqtt 1.6
RUNTIMES = ("venv-paho2", "pyz-paho16")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = WAIT_SECONDS) -> T:
    """The shared bounded poll, with this harness's default timeout and a short interval."""
    return poll_until(predicate, timeout, what, interval=0.05)


class Broker:
    """A private Mosquitto on a free loopback port; ``stop``/``start`` keep the port (a broker restart)."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        # user root: pytest's temporary directories are 0700, so a broker that dropped to user mosquitto could
        # not read TLS files placed there.
        settings = f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
        self.config.write_text(settings + extra_config)
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=log, stderr=log)
        wait_for(self._accepts, f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=WAIT_SECONDS)

    def _accepts(self) -> bool:
        assert self.process and self.process.poll() is None, self.log.read_text()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0


class Observer:
    """A paho 2.x client on ``node/<mac>/#``: records every message and publishes commands."""

    def __init__(self, port: int, mac: str = MAC, tls_ca: Path | None = None) -> None:
        self.mac = mac
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(0.1, 0.5)
        self.subscriptions = 0  # SUBACKs so far: one per (re)connect
        self.client.on_connect = lambda client, *_: client.subscribe(f"node/{mac}/#", qos=1)
        self.client.on_message = self._received
        self.client.on_subscribe = self._subscribed
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.client.connect("localhost" if tls_ca else "127.0.0.1", port)
        self.client.loop_start()
        self.wait_subscribed(after=0)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _subscribed(self, *_: Any) -> None:
        with self._lock:
            self.subscriptions += 1

    def wait_subscribed(self, after: int) -> None:
        """Until the observer has subscribed more than ``after`` times (again, after a broker restart)."""
        wait_for(lambda: self.subscriptions > after, "the observer to subscribe")

    def _received(self, _client: mqtt.Client, _data: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic.endswith("/command"):
            return
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"unparsable": message.payload.decode(errors="replace")}
        with self._lock:
            self.messages.append((message.topic, body, bool(message.retain)))

    def seen(self, kind: str, cmd_id: str | None = None) -> list[dict[str, Any]]:
        wanted = protocol.topic(self.mac, kind, cmd_id)
        with self._lock:
            return [body for topic, body, _ in self.messages if topic == wanted]

    def wait(self, kind: str, match: Callable[[dict[str, Any]], bool] = bool, cmd_id: str | None = None,
             after: int = 0) -> dict[str, Any]:  # fmt: skip
        """The first message on ``kind`` (after the first ``after`` ones) that ``match`` accepts."""
        return wait_for(lambda: next((b for b in self.seen(kind, cmd_id)[after:] if match(b)), None),
                        f"{kind} {cmd_id or ''} message; seen: {self.seen(kind, cmd_id)}")  # fmt: skip

    def states(self, cmd_id: str) -> list[str]:
        return [body["state"] for body in self.seen(protocol.RESULT, cmd_id)]

    def final(self, cmd_id: str, after: int = 0) -> dict[str, Any]:
        return self.wait(protocol.RESULT, lambda body: body["state"] in protocol.FINAL_STATES, cmd_id, after)

    def command(self, command: str, args: dict[str, Any] | None = None, cmd_id: str | None = None,
                deadline: datetime | None = None) -> str:  # fmt: skip
        cmd_id = cmd_id or f"t-{uuid.uuid4().hex[:12]}"
        deadline = deadline or datetime.now(UTC) + timedelta(minutes=5)
        self.send(protocol.command_payload(cmd_id, command, args or {}, deadline))
        return cmd_id

    def send(self, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(protocol.topic(self.mac, protocol.COMMAND), payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_SECONDS)


class Node:
    """The files the agent sees as its node: state dir, exec allow-list, boot id, OS-boundary stubs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.exec_dir = root / "exec.d"
        self.exec_dir.mkdir(parents=True)
        self.exec_dir.chmod(0o755)
        self.boot_id_file = root / "boot_id"
        self.boot_id_file.write_text(str(uuid.uuid4()) + "\n")
        self.calls = root / "calls.log"  # one line per stub call: "<stub> <argv...>"
        for stub in ("reboot", "poweroff", "systemctl"):
            self.script(root / "stubs" / stub, f'echo "{stub} $*" >> {self.calls}\necho "{stub} done"\n')

    @staticmethod
    def script(path: Path, body: str, mode: int = 0o755) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(mode)
        return path

    def tool(self, name: str, body: str, mode: int = 0o755) -> Path:
        """An allow-listed program in the exec directory."""
        return self.script(self.exec_dir / name, body, mode)

    def stub_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def reboot(self) -> None:
        """What a real reboot changes for the agent: the kernel's boot id."""
        self.boot_id_file.write_text(str(uuid.uuid4()) + "\n")

    def env(self, broker_port: int) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NF_MAC": MAC.upper(),  # any usual spelling is accepted
            "NF_MQTT_BROKER": f"127.0.0.1:{broker_port}",
            "NF_LOG_LEVEL": "debug",
            "NF_HEARTBEAT_INTERVAL": "1",
            "NF_RECONNECT_MAX_DELAY": "1",
            "NF_STATE_DIR": str(self.state_dir),
            "NF_EXEC_DIR": str(self.exec_dir),
            "NF_BOOT_ID_FILE": str(self.boot_id_file),
            "NF_REBOOT_COMMAND": str(self.root / "stubs" / "reboot"),
            "NF_SHUTDOWN_COMMAND": str(self.root / "stubs" / "poweroff"),
            "NF_SYSTEMCTL": str(self.root / "stubs" / "systemctl"),
        }


class AgentProcess:
    """``nodefoundry-agent`` as a real process, as systemd would run it (settings in the environment)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.process
        return self.process.pid

    def alive(self) -> bool:
        return bool(self.process and self.process.poll() is None)

    def terminate(self) -> int:
        """SIGTERM, as ``systemctl stop`` sends it; returns the exit code."""
        assert self.process
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT_SECONDS)

    def signal(self, signum: int) -> None:
        assert self.process
        self.process.send_signal(signum)

    def kill(self) -> None:
        assert self.process
        self.process.kill()
        self.process.wait(timeout=WAIT_SECONDS)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="session")
def pyz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agent-build") / "nodefoundry-agent.pyz"
    path.write_bytes(build.zipapp_bytes())
    return path


@pytest.fixture(params=RUNTIMES)
def agent_argv(request: pytest.FixtureRequest, pyz_path: Path) -> list[str]:
    if request.param == "venv-paho2":
        return [sys.executable, "-m", "nodefoundry_agent"]
    return [SYSTEM_PYTHON, str(pyz_path)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path)
    yield broker.start()
    broker.stop()


@pytest.fixture
def observer(broker: Broker) -> Iterator[Observer]:
    observer = Observer(broker.port)
    yield observer
    observer.close()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "node")


@pytest.fixture
def agents(agent_argv: list[str], node: Node, broker: Broker, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts agent processes (``agents()``, or ``agents(env_overrides)``); all are stopped afterwards."""
    started: list[AgentProcess] = []

    def start(**overrides: str) -> AgentProcess:
        agent = AgentProcess(agent_argv, {**node.env(broker.port), **overrides}, tmp_path / f"agent{len(started)}.log")
        started.append(agent.start())
        return agent

    yield start
    for agent in started:
        if agent.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.terminate()
        if agent.alive():
            agent.kill()


def online(observer: Observer, after: int = 0) -> dict[str, Any]:
    """The next retained-or-live birth (``state: online``)."""
    return observer.wait(protocol.STATE, lambda body: body.get("state") == "online", after=after)


# ---- the harness's own checks ----------------------------------------------------------------------------------


def test_stubs_record_their_calls(node: Node) -> None:
    subprocess.run([node.env(1)["NF_REBOOT_COMMAND"]], check=True)
    subprocess.run([node.env(1)["NF_SYSTEMCTL"], "restart", "--", "x.service"], check=True)
    assert node.stub_calls() == ["reboot ", "systemctl restart -- x.service"]
