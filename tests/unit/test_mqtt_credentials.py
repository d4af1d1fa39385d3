"""nodefoundry_server.mqtt.credentials: the password hash, the derived passwords, the ACL, the files, and the
preseed lines that hand a node its credentials.

The hash format is checked against the real consumers: ``mosquitto_passwd`` (same bytes for the same
salt) and a real Mosquitto 2 that must accept the plaintext and refuse anything else.
"""

from __future__ import annotations

import base64
import dataclasses
import grp
import hashlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from nodefoundry_server import auth, boot, lifecycle
from nodefoundry_server.boot import Urls
from nodefoundry_server.config import Config, ConfigError, load
from nodefoundry_server.mqtt import broker, credentials
from nodefoundry_server.mqtt.credentials import AuthFiles, password_hash
from nodefoundry_server.store import Store
from tests.conftest import free_port
from tests.debconf import debconf_load

MAC_A, MAC_B = "aabbccddee01", "aabbccddee02"
SECRET = "0f" * 32


def config(**values: Any) -> Config:
    base = load(None, {})
    return dataclasses.replace(base, values={**base.values, **values})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "db" / "nodes.db")
    store.open()
    return store


def register(store: Store, *macs: str) -> None:
    for mac in macs:
        lifecycle.register(store, mac, {}, source="api")


def pbkdf2_matches(stored: str, password: str) -> bool:
    """Independent check of a ``$7$`` line: recompute PBKDF2-SHA512 with its own salt and iterations."""
    _, kind, iterations, salt, digest = stored.split("$")
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
    return kind == "7" and base64.b64encode(computed).decode() == digest


# --- the hash -------------------------------------------------------------------------------------------------


def test_hash_is_byte_identical_to_mosquitto_passwd_for_the_same_salt(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "someone", "s3cret pass"], check=True, timeout=30)
    user, reference = path.read_text().strip().split(":", 1)
    salt = base64.b64decode(reference.split("$")[3])
    assert user == "someone"
    assert password_hash("s3cret pass", salt) == reference


def test_hash_format_and_fresh_salt() -> None:
    first, second = password_hash("pw"), password_hash("pw")
    _, kind, iterations, salt, digest = first.split("$")
    assert (kind, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    assert first != second  # a new salt each time
    assert pbkdf2_matches(first, "pw") and pbkdf2_matches(second, "pw") and not pbkdf2_matches(first, "pW")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real Mosquitto 2 with a password file of our making. ``user root`` keeps it from dropping to
    user mosquitto, which could not enter pytest's 0700 directories (the broker module handles that)."""
    port, passwd = free_port(), tmp_path / "passwd"
    passwd.write_text(f"someone:{password_hash('right password')}\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\npersistence false\nallow_anonymous false\npassword_file {passwd}\nlistener {port} 127.0.0.1\n"
    )
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
        yield port, passwd
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"mosquitto did not listen on {port} (exit code {process.poll()})")


def connack(port: int, username: str | None, password: str | None) -> mqtt.ReasonCode:
    """The broker's answer to one CONNECT over MQTT 5."""
    codes: list[mqtt.ReasonCode] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, code, _p: codes.append(code)
    if username is not None:
        client.username_pw_set(username, password)
    client.connect("127.0.0.1", port)
    while not codes and client.loop(1.0) == mqtt.MQTT_ERR_SUCCESS:
        pass
    client.disconnect()
    assert codes, "no CONNACK"
    return codes[0]


def test_mosquitto_accepts_our_hash_and_refuses_anything_else(mosquitto: tuple[int, Path]) -> None:
    port, _passwd = mosquitto
    assert not connack(port, "someone", "right password").is_failure
    for username, password in (("someone", "wrong password"), ("nobody", "right password"), (None, None)):
        assert str(connack(port, username, password)) == "Not authorized"


# --- derived passwords and user names -------------------------------------------------------------------------


def test_node_password_is_deterministic_per_install_and_unrelated_to_the_install_token(store: Store) -> None:
    password = credentials.node_password(SECRET, MAC_A, "n1")
    assert password == credentials.node_password(SECRET, MAC_A, "n1")
    assert len(password) == 64 and set(password) <= set("0123456789abcdef")
    others = {
        credentials.node_password(SECRET, MAC_A, "n2"),
        credentials.node_password(SECRET, MAC_B, "n1"),
        credentials.node_password("1f" * 32, MAC_A, "n1"),
    }
    assert password not in others and len(others) == 3
    token = auth.install_token(store, MAC_A, "n1")
    assert credentials.install_password(store.conn(), MAC_A, "n1")[: len(token)] != token


def test_node_username_is_the_normalised_mac() -> None:
    assert credentials.node_username(MAC_A) == MAC_A
    for bad in ("AABBCCDDEE01", "aa:bb:cc:dd:ee:01", "aabbccddee0", "node/#", ""):
        with pytest.raises(ValueError):
            credentials.node_username(bad)


def test_install_start_mints_the_password_the_preseed_derives(store: Store) -> None:
    register(store, MAC_A)
    lifecycle.start_install(store, MAC_A, "install", source="api")
    nonce = lifecycle.installing_nonce(store, MAC_A)
    assert nonce is not None
    row = (
        store.conn().execute("SELECT username, password_hash FROM node_credentials WHERE mac = ?", (MAC_A,)).fetchone()
    )
    assert row["username"] == MAC_A
    assert pbkdf2_matches(row["password_hash"], credentials.install_password(store.conn(), MAC_A, nonce[0]))


def test_reinstall_replaces_the_password_and_a_dry_run_mints_nothing(store: Store) -> None:
    register(store, MAC_A, MAC_B)
    lifecycle.start_install_many(store, [MAC_B], "install", source="api", dry_run=True)
    assert store.conn().execute("SELECT COUNT(*) FROM node_credentials WHERE mac = ?", (MAC_B,)).fetchone()[0] == 0
    lifecycle.start_install(store, MAC_A, "install", source="api")
    first = lifecycle.installing_nonce(store, MAC_A)
    lifecycle.installer_report(store, MAC_A, "failed", phase=None, detail=None)
    lifecycle.start_install(store, MAC_A, "reinstall", source="api")
    second = lifecycle.installing_nonce(store, MAC_A)
    assert first and second and first[0] != second[0]
    stored = store.conn().execute("SELECT password_hash FROM node_credentials WHERE mac = ?", (MAC_A,)).fetchone()[0]
    assert pbkdf2_matches(stored, credentials.install_password(store.conn(), MAC_A, second[0]))
    assert not pbkdf2_matches(stored, credentials.install_password(store.conn(), MAC_A, first[0]))


# --- the ACL and the files ------------------------------------------------------------------------------------


def test_acl_confines_nodes_to_their_own_topics_and_the_server_to_reading_and_commands() -> None:
    lines = [line for line in credentials.acl_text("nodefoundry-server").splitlines() if line and line[0] != "#"]
    assert lines == [
        "pattern write node/%u/status",
        "pattern write node/%u/state",
        "pattern write node/%u/facts",
        "pattern write node/%u/result/#",
        "pattern read node/%u/command",
        "user nodefoundry-server",
        "topic read node/#",
        "topic write node/+/command",
    ]


def auth_files(store: Store, directory: Path, **kwargs: Any) -> AuthFiles:
    return AuthFiles(
        config(), store, "nodefoundry-server", "server pw", directory / "passwd", directory / "acl", **kwargs
    )


def password_lines(path: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in path.read_text().splitlines())


def test_sync_writes_only_changes_and_only_nodes_still_in_the_store(store: Store, tmp_path: Path) -> None:
    files = auth_files(store, tmp_path, extra_accounts=[("nodefoundry-probe", "probe pw")])
    assert files.sync() is True
    assert set(password_lines(files.password_file)) == {"nodefoundry-server", "nodefoundry-probe"}
    assert files.acl_file.read_text() == credentials.acl_text("nodefoundry-server")
    assert files.sync() is False

    register(store, MAC_A)
    with store.write() as conn:
        credentials.mint_in(conn, MAC_A, "node a pw")
        credentials.mint_in(conn, MAC_B, "orphan pw")  # credentials of a node that is not in the store
    assert files.sync() is True
    accounts = password_lines(files.password_file)
    assert set(accounts) == {"nodefoundry-server", "nodefoundry-probe", MAC_A}
    assert pbkdf2_matches(accounts[MAC_A], "node a pw") and pbkdf2_matches(accounts["nodefoundry-server"], "server pw")
    assert files.sync() is False

    files.acl_file.write_text("topic readwrite #\n")  # a hand edit is put right
    assert files.sync() is True and files.acl_file.read_text() == credentials.acl_text("nodefoundry-server")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["acl", "db", "passwd"]  # no temp files left


def test_files_are_0640_in_the_broker_users_group(store: Store, tmp_path: Path) -> None:
    files = auth_files(store, tmp_path)
    files.sync()
    mosquitto_gid = grp.getgrnam("mosquitto").gr_gid
    for path in (files.password_file, files.acl_file):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert (info.st_uid, info.st_gid) == (os.geteuid(), mosquitto_gid)


def test_account_names_that_would_break_the_files_are_refused(store: Store, tmp_path: Path) -> None:
    for name in ("with space", "a:b", "node/#", MAC_A, ""):
        with pytest.raises(ConfigError):
            AuthFiles(config(), store, name, "pw", tmp_path / "passwd", tmp_path / "acl")
    with pytest.raises(ValueError, match="mqtt_node_auth"):
        AuthFiles(config(mqtt_node_auth=False), store, "server", "pw", tmp_path / "passwd", tmp_path / "acl")
    with pytest.raises(ValueError, match="unsafe"):
        credentials.render("passwd.j2", accounts=[("server", "$7$1\nuser evil")])


def test_nodes_get_credentials_only_where_the_server_maintains_the_brokers_accounts() -> None:
    external = {"mqtt_broker": "broker.example:1883"}
    files = {"mqtt_password_file": "/etc/mosquitto/nf/passwd", "mqtt_acl_file": "/etc/mosquitto/nf/acl"}
    assert credentials.delivers_node_credentials(config())  # embedded
    assert credentials.delivers_node_credentials(config(**external, **files))
    assert not credentials.delivers_node_credentials(config(**external))
    assert not credentials.delivers_node_credentials(config(mqtt_node_auth=False))
    assert not credentials.delivers_node_credentials(config(**external, **files, mqtt_node_auth=False))
    assert credentials.auth_file_paths(config(**files)) == (
        Path(files["mqtt_password_file"]),
        Path(files["mqtt_acl_file"]),
    )
    with pytest.raises(ConfigError, match="set both or neither"):
        credentials.auth_file_paths(config(mqtt_password_file=files["mqtt_password_file"]))


def test_external_files_are_maintained_only_when_both_are_set(store: Store, tmp_path: Path) -> None:
    paths = {"mqtt_password_file": str(tmp_path / "passwd"), "mqtt_acl_file": str(tmp_path / "acl")}
    external = {"mqtt_broker": "broker.example:1883", "mqtt_username": "nf", "mqtt_password": "pw"}
    assert credentials.external_auth_files(config(**external), store) is None
    assert credentials.external_auth_files(config(**paths), store) is None  # embedded: the broker's own files
    with pytest.raises(ConfigError, match="set both or neither"):
        credentials.external_auth_files(config(**external, mqtt_acl_file=paths["mqtt_acl_file"]), store)
    with pytest.raises(ConfigError, match="NF_MQTT_USERNAME"):
        credentials.external_auth_files(config(**paths, mqtt_broker="broker.example:1883"), store)
    files = credentials.external_auth_files(config(**external, **paths), store)
    assert files is not None and files.sync()
    assert set(password_lines(tmp_path / "passwd")) == {"nf"}
    assert "user nf\n" in (tmp_path / "acl").read_text()


# --- the preseed that delivers them ---------------------------------------------------------------------------

ENV_FILE = "/target/etc/default/nodefoundry-agent"
URLS = Urls("http://10.0.0.1:8080")
HOSTILE_PASSWORD = 'p\'w "q" $(touch x) `y` \\ ; #'


def env_command(text: str, workdir: Path) -> str:
    """The late_command's shell command that writes the agent's env file, as debconf hands it over."""
    late = debconf_load(text, workdir)["preseed/late_command"]
    command = late.split(f"> {ENV_FILE} )")[0].rsplit("( umask 077; ", 1)[1]
    return f"( umask 077; {command}> {ENV_FILE} )"


def written_env(text: str, workdir: Path) -> tuple[list[str], int]:
    """Run that command with the installer's shell (dash); the file's lines and mode."""
    target = workdir / "target"
    (target / "etc/default").mkdir(parents=True)
    command = env_command(text, workdir / "debconf").replace("/target/", f"{target}/")
    subprocess.run(["dash", "-c", command], cwd=workdir, check=True, timeout=30)
    env_file = target / "etc/default/nodefoundry-agent"
    assert not (workdir / "x").exists()
    return env_file.read_text().splitlines(), stat.S_IMODE(env_file.stat().st_mode)


def test_preseed_writes_the_node_credentials_shell_escaped_into_a_0600_env_file(tmp_path: Path) -> None:
    text = boot.preseed(config(), {"mac": MAC_A}, URLS, "t" * 40, mqtt_password=HOSTILE_PASSWORD)
    lines, mode = written_env(text, tmp_path)
    assert lines == [
        f"NF_MAC={MAC_A}",
        "NF_MQTT_BROKER=10.0.0.1:1883",
        "NF_LOG_LEVEL=info",
        "NF_HEARTBEAT_INTERVAL=30",
        f"NF_MQTT_USERNAME={MAC_A}",
        f"NF_MQTT_PASSWORD={HOSTILE_PASSWORD}",
    ]
    assert mode == 0o600
    assert text.count("NF_MQTT_PASSWORD") == 1  # only in the env file, nowhere else in the preseed
    assert "python3-paho-mqtt" in debconf_load(text, tmp_path / "packages")["pkgsel/include"].split()


def test_preseed_without_node_auth_has_no_credentials(tmp_path: Path) -> None:
    text = boot.preseed(config(mqtt_node_auth=False), {"mac": MAC_A}, URLS, "t" * 40)
    lines, _mode = written_env(text, tmp_path)
    assert not [line for line in lines if line.startswith(("NF_MQTT_USERNAME", "NF_MQTT_PASSWORD"))]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "10.0.0.1:1883"),  # embedded without a node listener: the conventional port
        ({"mqtt_embedded_listen": ":1884"}, "10.0.0.1:1884"),
        ({"mqtt_embedded_listen": "10.0.0.1:1885"}, "10.0.0.1:1885"),
        ({"mqtt_broker": "broker.example"}, "broker.example:1883"),
        ({"mqtt_broker": "broker.example:8883", "mqtt_embedded_listen": ":1884"}, "broker.example:8883"),
        ({"mqtt_broker": "127.0.0.1:1883", "mqtt_node_broker": "mqtt.example:1883"}, "mqtt.example:1883"),
        ({"mqtt_embedded_listen": ":1884", "mqtt_node_broker": "10.9.9.9:1999"}, "10.9.9.9:1999"),
    ],
)
def test_preseed_broker_address_follows_mqtt_node_broker_rules(
    values: dict[str, str], expected: str, tmp_path: Path
) -> None:
    text = boot.preseed(config(**values), {"mac": MAC_A}, URLS, "t" * 40, mqtt_password="pw")
    assert f"NF_MQTT_BROKER={expected}" in written_env(text, tmp_path)[0]


def test_reload_command_runs_without_a_shell_and_failures_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert broker.reload_external(config()) is True  # none configured
    assert broker.reload_external(config(mqtt_reload_command=f"touch '{tmp_path}/re loaded;' {tmp_path}/x")) is True
    assert sorted(path.name for path in tmp_path.iterdir()) == ["re loaded;", "x"]  # quoting kept, no shell
    assert broker.reload_external(config(mqtt_reload_command="false")) is False
    assert broker.reload_external(config(mqtt_reload_command="/nonexistent/reload")) is False
    assert broker.reload_external(config(mqtt_reload_command="unbalanced 'quote")) is False
    monkeypatch.setattr(broker, "RELOAD_TIMEOUT_SECONDS", 0.2)
    assert broker.reload_external(config(mqtt_reload_command="sleep 30")) is False
