"""Fixtures for the MQTT end-to-end tests: a node enrolled through the real install path, its agent as a
real process (the package under the venv's Python, or the built zipapp under Debian's Python with paho 1.6),
the OS-boundary stubs it calls instead of rebooting, and a paho client that holds a node's credentials.

Nothing here imitates the server or the broker: the tests talk to the real ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.conftest import wait_for
from tests.debconf import debconf_load

VENV_PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian 12's interpreter with python3-paho-mqtt 1.6
HEARTBEAT = 5  # NF_HEARTBEAT_INTERVAL on both sides: the smallest the server accepts
ENV_FILE = "/target/etc/default/nodefoundry-agent"


# --- the server side: enrolment through the install path ------------------------------------------------------


def node(server: Any, mac: str) -> dict[str, Any]:
    response = server.api("GET", f"/api/v1/nodes/{mac}")
    assert response.status_code == 200, response.text
    return response.json()


def agent_env_from_preseed(text: str, workdir: Path) -> dict[str, str]:
    """The lines the preseed's late_command writes to /etc/default/nodefoundry-agent, as d-i would read them."""
    late = debconf_load(text, workdir)["preseed/late_command"]
    assert f"> {ENV_FILE}" in late, late
    words = late.split(f"> {ENV_FILE}")[0].rsplit("printf '%s\\n'", 1)[1]
    return dict(word.split("=", 1) for word in shlex.split(words))


def enroll(server: Any, mac: str, workdir: Path) -> dict[str, str]:
    """Register, start the install, fetch the preseed with the install token; return the agent's env lines."""
    assert server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    script = server.get(f"/boot/{mac}/boot.ipxe").text
    found = re.search(rf"url=({re.escape(server.url)}(/preseed/{mac}/preseed\.cfg\?token=[0-9a-f]+))", script)
    assert found, script
    response = server.get(found.group(2))
    assert response.status_code == 200, response.text
    return agent_env_from_preseed(response.text, workdir / f"debconf-{mac}")


# --- /health ---------------------------------------------------------------------------------------------------


def mqtt_health(server: Any) -> dict[str, Any]:
    """The ``mqtt`` component of /health: its state, the node port of the embedded broker and the counters."""
    component = server.get("/health").json()["components"].get("mqtt", {"state": "absent"})
    detail = component.get("detail", "")
    port = re.search(r"nodes on port (\d+)", detail)
    counters = {key: int(value) for key, value in re.findall(r"\b(\w+)=(\d+)\b", detail)}
    return {"state": component["state"], "node_port": int(port.group(1)) if port else None, "counters": counters}


def mqtt_ready(server: Any) -> dict[str, Any]:
    """Wait until the server is connected to its broker."""
    return wait_for(lambda: (health := mqtt_health(server))["state"] == "ok" and health, 30, "the MQTT component ok")


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` with its command name."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
                parents[int(entry.name)] = (int(rest.split()[1]), name)
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _) in parents.items() if parent in frontier} - found.keys()
        found.update({child: parents[child][1] for child in frontier})
    return found


def broker_pid(server: Any) -> int | None:
    """The embedded Mosquitto the server supervises (a child of its services process)."""
    pids = [pid for pid, name in descendants(server.process.pid).items() if name == "mosquitto"]
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


# --- the agent as a process ------------------------------------------------------------------------------------


class Agent:
    """One agent process for one node, with its own state directory, exec allow-list and fake boot id.

    The settings the preseed gave the node go into an env file read with ``--env-file`` (as systemd's
    ``EnvironmentFile=`` would pass them); the test's own settings (directories, the OS-boundary stubs)
    come from the process environment, which wins over the file.
    """

    def __init__(self, workdir: Path, settings: dict[str, str], pyz: Path | None = None) -> None:
        self.workdir = workdir
        self.state_dir, self.exec_dir = workdir / "state", workdir / "exec.d"
        self.boot_id_file, self.pid_file = workdir / "boot_id", workdir / "agent.pid"
        self.env_file, self.log_path = workdir / "nodefoundry-agent.env", workdir / "agent.log"
        for directory in (self.state_dir, self.exec_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        self.env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        self.env_file.chmod(0o600)
        self.boot_id_file.write_text(f"{uuid.uuid4()}\n")
        self.argv = [SYSTEM_PYTHON, str(pyz)] if pyz else [VENV_PYTHON, "-m", "nodefoundry_agent"]
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "NF_STATE_DIR": str(self.state_dir),
            "NF_EXEC_DIR": str(self.exec_dir),
            "NF_BOOT_ID_FILE": str(self.boot_id_file),
            "NF_REBOOT_COMMAND": str(self._reboot_stub()),
            "NF_SYSTEMCTL": "/bin/false",
            "NF_RECONNECT_MAX_DELAY": "2",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, "--env-file", str(self.env_file)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self.process.pid}\n")
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None and self.running, self.log_text()
        os.kill(self.process.pid, signum)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Teardown: nothing of the agent's process group is left running (SIGKILL ends a stopped one too)."""
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def add_exec(self, name: str, script: str) -> Path:
        """A program on the allow-list: root-owned, 0755, directly in the exec directory."""
        path = self.exec_dir / name
        path.write_text(script)
        path.chmod(0o755)
        return path

    def _reboot_stub(self) -> Path:
        """Stands in for ``systemctl reboot``: a new boot id for the "next boot", then systemd's SIGTERM to
        the agent a moment later (the reboot command itself returns at once, as systemctl's does)."""
        stub = self.workdir / "reboot"
        stub.write_text(
            "#!/bin/sh\n"
            f"cat /proc/sys/kernel/random/uuid > {shlex.quote(str(self.boot_id_file))}\n"
            f'(sleep 0.5; kill -TERM "$(cat {shlex.quote(str(self.pid_file))})") >/dev/null 2>&1 &\n'
        )
        stub.chmod(0o755)
        return stub


def appender(path: Path, sleep_seconds: float = 0) -> str:
    """An exec program that appends one line (its arguments) to ``path``: runs are counted by lines."""
    tail = f"sleep {sleep_seconds}\n" if sleep_seconds else ""
    return f'#!/bin/sh\necho "run $*" >> {shlex.quote(str(path))}\n{tail}'


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --- a paho client holding some node's credentials -------------------------------------------------------------


class Spy:
    """An MQTT 5 client (paho 2.x, its own network thread) that keeps what it receives and the broker's answers.

    Over MQTT 5 Mosquitto answers a denied publish with "Not authorized" in the PUBACK.
    """

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._answers: dict[int, str] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda _c, _u, message: self._keep(message.topic, message.payload)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self._answer(mid, str(reason))
        self.client.on_subscribe = lambda _c, _u, mid, reasons, _p: self._answer(mid, str(reasons[0]))
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        wait_for(self.client.is_connected, 15, "the spy's connection")

    def _keep(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.received.append((topic, payload))

    def _answer(self, mid: int, reason: str) -> None:
        with self._lock:
            self._answers[mid] = reason

    def _wait_answer(self, mid: int, what: str) -> str:
        return wait_for(lambda: self._answers.get(mid), 15, f"the broker's answer to {what}", interval=0.02)

    def subscribe(self, topic: str) -> str:
        """QoS 1; the SUBACK's reason ("Granted QoS 1" also when Mosquitto then filters each delivery by the ACL)."""
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        return self._wait_answer(mid, f"SUBSCRIBE {topic}")

    def publish(self, topic: str, payload: bytes) -> str:
        """QoS 1; the PUBACK's reason: "Success", or "Not authorized" for a topic the ACL denies."""
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait_answer(info.mid, f"PUBLISH {topic}")

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
