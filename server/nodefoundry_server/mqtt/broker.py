"""The MQTT broker: the embedded private Mosquitto, or the address of an external one.

The embedded broker is a ``mosquitto -c <conf>`` child of the services process. Its files live in
``<data dir>/mqtt`` (configuration, password file, ACL, ``mosquitto.log``). Persistence is off: the
store is the system of record for nodes and commands, agents re-send their retained birth and facts
on every connect, and a second store would only keep stale retained messages of deleted nodes.

When this process is root the broker is started as user ``mosquitto`` (not left to drop root
itself), because a privilege change clears the parent-death signal that kills it with the services
process. Every file it reads is then ``root:mosquitto`` 0640 in a 0750 directory; if the data
directory is not reachable by that user (a 0700 parent, e.g. a home directory) those files go to
``/run/nodefoundry/mqtt-<hash>`` instead, as they are rebuilt from the store at every start anyway.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from .. import validate
from ..config import Config, ConfigError
from ..store import Store
from .credentials import SERVER_USER, AuthFiles, auth_file_paths, broker_ids, render, replace_file

log = logging.getLogger("nodefoundry.mqtt")

PROBE_USER = "nodefoundry-probe"  # readiness checks; the ACL grants it nothing
DEFAULT_PORT = 1883
READY_TIMEOUT_SECONDS = 10.0
PORT_ATTEMPTS = 3
STOP_TIMEOUT_SECONDS = 5.0
RELOAD_TIMEOUT_SECONDS = 30.0
LOG_ROTATE_BYTES = 10 * 1024 * 1024
RUNTIME_ROOT = Path("/run/nodefoundry")
OWNER_FILE = "owner.pid"  # the services process that uses a /run fallback directory
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started; ``str()`` is one line with the broker's last words."""


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the server's own MQTT client connects, and as whom."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str


def external_endpoint(config: Config) -> BrokerEndpoint:
    host, port = validate.host_port(config.mqtt_broker, "broker", DEFAULT_PORT)
    return BrokerEndpoint(
        host, port, config.mqtt_username or None, config.mqtt_password or None, config.mqtt_tls, config.mqtt_ca_file
    )


def node_broker(config: Config, server_host: str) -> str:
    """``host:port`` written into a node's agent configuration: ``mqtt_node_broker``, else the external
    broker, else this server's host and the embedded broker's node listener (1883 when none is set,
    which nodes cannot reach: the embedded broker then listens on loopback only)."""
    if config.mqtt_node_broker or config.mqtt_broker:
        host, port = validate.host_port(config.mqtt_node_broker or config.mqtt_broker, "broker", DEFAULT_PORT)
        return f"{host}:{port}"
    return f"{server_host}:{_node_listener(config)[1] or DEFAULT_PORT}"


def _node_listener(config: Config) -> tuple[str, int | None]:
    if not config.mqtt_embedded_listen:
        return "", None
    return validate.host_port(config.mqtt_embedded_listen, "address", DEFAULT_PORT)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def check_mosquitto_available() -> None:
    """The embedded broker needs Mosquitto 2 (``$7$`` password hashes) and, under root, its user."""
    binary = mosquitto_binary()
    if binary is None:
        raise ConfigError("embedded MQTT broker: mosquitto not found (apt install mosquitto, or set NF_MQTT_BROKER)")
    banner = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False).stdout
    found = re.search(r"mosquitto version (\d+)\.", banner)
    if not found or int(found.group(1)) < 2:
        raise ConfigError(f"embedded MQTT broker: {binary} is not Mosquitto 2 ({_last_line(banner[:200])})")
    if os.geteuid() == 0 and broker_ids() is None:
        raise ConfigError("embedded MQTT broker: user 'mosquitto' does not exist (install Debian's mosquitto package)")


def reload_external(config: Config) -> bool:
    """Run ``mqtt_reload_command`` (no shell, bounded); False and a log line if it failed."""
    if not config.mqtt_reload_command:
        return True
    try:
        result = subprocess.run(
            shlex.split(config.mqtt_reload_command),
            capture_output=True,
            text=True,
            timeout=RELOAD_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.error("NF_MQTT_RELOAD_COMMAND failed: %s", exc)
        return False
    if result.returncode != 0:
        log.error("NF_MQTT_RELOAD_COMMAND exited with %d: %s", result.returncode, _last_line(result.stderr))
        return False
    return True


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _probe(port: int, username: str | None, password: str | None) -> bool | None:
    """Connect once: True accepted, False refused by the broker (auth files unreadable?), None not listening."""
    codes: list[mqtt.ReasonCode] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{PROBE_USER}-{secrets.token_hex(4)}")
    client.on_connect = lambda _client, _data, _flags, code, _props: codes.append(code)
    if username:
        client.username_pw_set(username, password)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
        deadline = time.monotonic() + 2.0
        while not codes and time.monotonic() < deadline and client.loop(timeout=0.1) == mqtt.MQTT_ERR_SUCCESS:
            pass
    except OSError:
        return None
    finally:
        client.disconnect()  # writes DISCONNECT and closes the socket (a refused CONNACK closed it already)
    return (not codes[0].is_failure) if codes else None


class EmbeddedBroker:
    """A private Mosquitto supervised by the services process.

    The child dies with the thread that starts it (parent-death signal): call ``start`` and
    ``ensure_running`` from a thread that lives as long as the broker should.
    """

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.data_dir = Path(config.db_path).resolve().parent / "mqtt"
        self.log_path = self.data_dir / "mosquitto.log"
        self.node_port: int | None = None
        self.port: int | None = None
        self.auth: AuthFiles | None = None
        self.files_dir = self.data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._probe_password = secrets.token_urlsafe(24)
        self._server_password = ""

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> BrokerEndpoint:
        """Write the files, start Mosquitto on a free loopback port, return once it accepts the server."""
        check_mosquitto_available()
        self._prepare_dirs()
        self._server_password = secrets.token_urlsafe(32)
        self.auth = self._auth_files() if self.config.mqtt_node_auth else None
        self._launch_on_a_free_port()
        self.node_port = _node_listener(self.config)[1] or self.port
        log.info("embedded MQTT broker on 127.0.0.1:%d (nodes: port %d)", self.port, self.node_port)
        if self.auth is None:  # mqtt_node_auth=false: an anonymous broker
            return BrokerEndpoint("127.0.0.1", self.port, None, None, False, "")
        return BrokerEndpoint("127.0.0.1", self.port, SERVER_USER, self._server_password, False, "")

    def ensure_running(self) -> bool:
        """Restart Mosquitto on the same port if it died; whether it is up."""
        if self.port is None:
            return False
        process = self._process
        if process is not None and process.poll() is None:
            return True
        code = process.returncode if process is not None else None
        log.error("embedded MQTT broker exited with %s (%s); restarting", code, self._log_tail())
        try:
            self._launch()
        except (BrokerError, OSError) as exc:
            log.error("embedded MQTT broker did not restart: %s", exc)
            return False
        return True

    def sync_credentials(self) -> bool:
        """Bring the password file up to date with the store; reload Mosquitto if it changed."""
        if self.auth is None or not self.auth.sync():
            return False
        self.reload()
        return True

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files (connected clients stay connected)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        process, self._process, self.port = self._process, None, None
        if process is not None:
            _end(process)
        if self.files_dir != self.data_dir:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    # --- internals ------------------------------------------------------------------------------------

    def _auth_files(self) -> AuthFiles:
        """The configured password/ACL files, else the broker's own; with an account for the readiness probe."""
        paths = auth_file_paths(self.config) or (self.files_dir / "passwd", self.files_dir / "acl")
        extra = [(PROBE_USER, self._probe_password)]
        return AuthFiles(self.config, self.store, SERVER_USER, self._server_password, *paths, extra_accounts=extra)

    def _prepare_dirs(self) -> None:
        """0750 directories the broker's user can enter; see the module docstring for the /run fallback."""
        _private_dir(self.data_dir)
        ids = broker_ids()
        if ids is None or _reachable(self.data_dir, ids):
            self.files_dir = self.data_dir
            return
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        self.files_dir = RUNTIME_ROOT / f"mqtt-{digest}"
        RUNTIME_ROOT.mkdir(mode=0o755, exist_ok=True)
        _remove_orphaned_runtime_dirs()
        _private_dir(self.files_dir)
        (self.files_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        log.warning(
            "user mosquitto cannot reach %s (a parent directory is not searchable by it); its files are in %s",
            self.data_dir,
            self.files_dir,
        )

    def _launch_on_a_free_port(self) -> None:
        """A port found free may be taken by someone else before Mosquitto binds it: then try another."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port()
            try:
                self._launch()
                return
            except BrokerError as exc:
                if attempt == PORT_ATTEMPTS or "Address already in use" not in str(exc):
                    raise
                log.warning("embedded MQTT broker: port %d was taken meanwhile; trying another", self.port)

    def _launch(self) -> None:
        assert self.port is not None
        if self.auth is not None:
            self.auth.sync()
        conf = self.files_dir / "mosquitto.conf"
        listeners = [(str(self.port), "127.0.0.1")]
        node_host, node_port = _node_listener(self.config)
        if node_port:
            listeners.append((str(node_port), node_host) if node_host else (str(node_port),))
        replace_file(
            conf,
            render(
                "mosquitto.conf.j2",
                listeners=listeners,
                password_file=self.auth.password_file if self.auth else "",
                acl_file=self.auth.acl_file if self.auth else "",
            ),
        )
        self._rotate_log()
        self._process = _spawn([mosquitto_binary() or "mosquitto", "-c", str(conf)], self.log_path)
        try:
            self._wait_ready()
        except BrokerError:
            _end(self._process)
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None and self.port is not None
        username, password = (PROBE_USER, self._probe_password) if self.auth else (None, None)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._process.returncode}: {self._log_tail()}")
            accepted = _probe(self.port, username, password)
            if accepted:
                return
            if accepted is False:
                raise BrokerError(f"mosquitto refuses the accounts it was given: {self._log_tail()}")
            time.sleep(0.05)
        raise BrokerError(f"mosquitto did not accept connections within {READY_TIMEOUT_SECONDS:.0f} s")

    def _rotate_log(self) -> None:
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_suffix(".log.1"))

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_bytes()[-2000:].decode(errors="replace").splitlines()
        except FileNotFoundError:
            return "no log"
        return " | ".join(line.strip() for line in lines[-3:]) or "no log"


def _private_dir(path: Path) -> None:
    """0750, and under root group mosquitto, so the broker's user may enter and nobody else."""
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(path, 0o750)
    ids = broker_ids()
    if ids is not None:
        os.chown(path, 0, ids[1])


def _reachable(path: Path, ids: tuple[int, int, list[int]]) -> bool:
    """Whether the broker's user can enter ``path`` (every parent searchable), asked as that user."""
    uid, gid, groups = ids
    result = subprocess.run(
        ["test", "-x", str(path)], user=uid, group=gid, extra_groups=groups, timeout=10, check=False
    )
    return result.returncode == 0


_LIBC = ctypes.CDLL(None, use_errno=True)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the broker's user (when root), killed by SIGKILL when the calling thread ends."""
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child between fork and exec: keep it minimal
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    ids = broker_ids()
    as_user = {"user": ids[0], "group": ids[1], "extra_groups": ids[2]} if ids else {}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's Ctrl-C is for the server, which stops the broker itself
            preexec_fn=die_with_parent,
            **as_user,
        )


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _remove_orphaned_runtime_dirs() -> None:
    """A server killed with -9 cannot remove its /run fallback directory; the next start does, by owner pid."""
    for directory in RUNTIME_ROOT.glob("mqtt-*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(directory, ignore_errors=True)
