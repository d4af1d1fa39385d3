"""Per-node MQTT credentials, and the Mosquitto password and ACL files built from them.

A node's password is derived from the nonce of its current install (an HMAC keyed by the secret that
also keys install tokens, under its own prefix), so the token-protected preseed can render it while
the store keeps only its hash. The nonce dies with the install; from then on nobody can derive the
password again. A reinstall draws a new nonce, so the old system's password stops working.

The hash is Mosquitto 2's own format (``$7$``: PBKDF2-SHA512), so the server writes the password file
itself. The user name is the MAC, which lets one pattern ACL (``%u``) confine every node to its own
topics.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from nodefoundry_agent import protocol

from ..config import Config, ConfigError
from ..lifecycle import NodeNotFound, TransitionRefused
from ..store import Store, add_event, now

log = logging.getLogger("nodefoundry.mqtt")

SERVER_USER = "nodefoundry-server"
BROKER_USER = "mosquitto"  # the user Debian's Mosquitto runs as
# mosquitto_passwd's default. The passwords are 256-bit random, so a slower hash would buy nothing
# and would cost the broker CPU on every connect.
HASH_ITERATIONS = 101
SALT_BYTES = 12
ISSUED_PASSWORD_BYTES = 32  # the API's passwords: random, as strong as the derived ones (64 hex digits)
FILE_MODE = 0o640

_ROOT = protocol.TOPIC_ROOT
NODE_WRITES = tuple(
    f"{_ROOT}/%u/{kind}" for kind in (protocol.STATUS, protocol.STATE, protocol.FACTS, f"{protocol.RESULT}/#")
)
NODE_READS = (f"{_ROOT}/%u/{protocol.COMMAND}",)
SERVER_READS = (f"{_ROOT}/#",)
SERVER_WRITES = (f"{_ROOT}/+/{protocol.COMMAND}",)

_MAC = re.compile(r"^[0-9a-f]{12}$")
_ACCOUNT_NAME = re.compile(r"^[^\s:#+/]+$")


def _conf(value: Any) -> str:
    """One value on one line of a Mosquitto file: a control character would start a new directive."""
    text = str(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"unsafe value for a Mosquitto file: {text!r}")
    return text


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["conf"] = _conf


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def node_username(mac: str) -> str:
    """The MAC itself: the ACL's ``%u`` then equals the ``<mac>`` in the node's topics."""
    if not _MAC.fullmatch(mac):
        raise ValueError(f"not a normalised MAC: {mac!r}")
    return mac


def node_password(secret: str, mac: str, nonce: str) -> str:
    """Deterministic per install; the prefix keeps it unrelated to the install token (``mac:nonce``)."""
    return hmac.new(secret.encode(), f"mqtt-password:{mac}:{nonce}".encode(), hashlib.sha256).hexdigest()


def install_password(conn: sqlite3.Connection, mac: str, nonce: str) -> str:
    """The node's password for the install with ``nonce``, keyed by the install token secret."""
    row = conn.execute("SELECT value FROM settings WHERE key = 'install_token_secret'").fetchone()
    if row is None:  # written by the first migration; without it every password would be guessable
        raise RuntimeError("install_token_secret is missing from the settings table")
    return node_password(row[0], mac, nonce)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's password-file hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ITERATIONS)
    return f"$7${HASH_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mint_in(conn: sqlite3.Connection, mac: str, password: str) -> None:
    """Store (or replace) the node's credentials inside the caller's transaction."""
    conn.execute(
        "INSERT INTO node_credentials (mac, username, password_hash, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (mac) DO UPDATE SET username = excluded.username,"
        " password_hash = excluded.password_hash, created_at = excluded.created_at",
        (mac, node_username(mac), password_hash(password), now()),
    )


def issue(store: Store, mac: str, *, source: str, actor: str | None) -> str:
    """A fresh random password for a node set up without the installer (the agent role): only its hash is
    stored, the previous one stops working at the next sync. Refused while the node installs, because
    the preseed derives that install's password from the nonce and would hand the new system a dead one."""
    password = secrets.token_hex(ISSUED_PASSWORD_BYTES)
    with store.write() as conn:
        row = conn.execute("SELECT status FROM nodes WHERE mac = ?", (mac,)).fetchone()
        if row is None:
            raise NodeNotFound()
        if row["status"] == "installing":
            raise TransitionRefused("node is installing: the installer delivers its credentials")
        mint_in(conn, mac, password)
        add_event(conn, mac, source, "credentials-issued", detail={"username": node_username(mac)}, actor=actor)
    return password


def acl_text(server_user: str) -> str:
    """Nodes: publish only their own status/state/facts/results, read only their own commands.
    The server: read every node topic, write only commands."""
    return render(
        "acl.j2",
        node_writes=NODE_WRITES,
        node_reads=NODE_READS,
        server_user=server_user,
        server_reads=SERVER_READS,
        server_writes=SERVER_WRITES,
    )


class AuthFiles:
    """The broker's password and ACL files, rebuilt from ``node_credentials``.

    The server's own account (and any ``extra_accounts``, which the ACL grants nothing) is hashed once
    here, so an unchanged store renders byte-identical files and ``sync`` can tell a change from none.
    Only nodes still in the store get an account: deleting a node revokes its broker access.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        server_user: str,
        server_password: str,
        password_file: Path,
        acl_file: Path,
        extra_accounts: Sequence[tuple[str, str]] = (),
    ) -> None:
        if not config.mqtt_node_auth:
            raise ValueError("per-node MQTT credentials are off (mqtt_node_auth=false)")
        fixed = [(server_user, server_password), *extra_accounts]
        for user, _password in fixed:
            if not _ACCOUNT_NAME.fullmatch(user) or _MAC.fullmatch(user):
                raise ConfigError(f"MQTT user name {user!r}: must not be a MAC, empty or contain spaces, ':#+/'")
        self.store = store
        self.password_file = Path(password_file)
        self.acl_file = Path(acl_file)
        self._fixed = [(user, password_hash(password)) for user, password in fixed]
        self._acl = acl_text(server_user)

    def _node_accounts(self) -> list[tuple[str, str]]:
        rows = self.store.conn().execute(
            "SELECT c.username, c.password_hash FROM node_credentials c JOIN nodes n ON n.mac = c.mac"
            " ORDER BY c.username"
        )
        return [(row[0], row[1]) for row in rows]

    def sync(self) -> bool:
        """Rewrite whichever file differs from what the store says; True if one changed (reload the broker)."""
        passwords = render("passwd.j2", accounts=[*self._fixed, *self._node_accounts()])
        changed = replace_file(self.password_file, passwords)
        return replace_file(self.acl_file, self._acl) or changed


def broker_ids() -> tuple[int, int, list[int]] | None:
    """(uid, gid, groups) of the broker's user when this process is root (Mosquitto then runs as it)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(BROKER_USER, entry.pw_gid)


def _group_for(path: Path) -> int | None:
    """Root: the broker user's group. Otherwise the group the operator gave the file (the server's
    user must belong to it), or none for a new file (a non-root broker runs as this same user)."""
    ids = broker_ids()
    if ids is not None:
        return ids[1]
    try:
        return path.stat().st_gid
    except FileNotFoundError:
        return None


def replace_file(path: Path, text: str) -> bool:
    """Atomically replace ``path`` (temp file + rename, mode 0640) unless it already holds ``text``."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    group = _group_for(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        if group is not None:
            try:
                os.chown(temp, -1, group)
            except PermissionError:
                log.warning("cannot give %s to group %d: the broker may not be able to read it", path, group)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True


def auth_file_paths(config: Config) -> tuple[Path, Path] | None:
    """``mqtt_password_file`` and ``mqtt_acl_file`` when set: both or neither (ConfigError for one)."""
    password_file, acl_file = config.mqtt_password_file, config.mqtt_acl_file
    if bool(password_file) != bool(acl_file):
        raise ConfigError("NF_MQTT_PASSWORD_FILE/NF_MQTT_ACL_FILE: set both or neither")
    return (Path(password_file), Path(acl_file)) if password_file else None


def delivers_node_credentials(config: Config) -> bool:
    """Nodes get credentials only where the server maintains the broker's accounts: the embedded broker,
    or an external one whose files it writes. Elsewhere the broker would not know them."""
    return config.mqtt_node_auth and (not config.mqtt_broker or bool(config.mqtt_password_file))


def external_auth_files(config: Config, store: Store) -> AuthFiles | None:
    """The files to maintain for an external broker, if it is given any; ConfigError for half a setting."""
    paths = auth_file_paths(config)
    if paths is None or not config.mqtt_node_auth or not config.mqtt_broker:
        return None
    if not config.mqtt_username:
        raise ConfigError("NF_MQTT_USERNAME: needed when the server maintains the broker's password file")
    return AuthFiles(config, store, config.mqtt_username, config.mqtt_password, *paths)
