"""Schema migrations. Each entry moves the database one version forward.

Append new migrations; never edit an applied one. ``migrate`` applies the
missing ones in one transaction each and records them in ``schema_version``.
"""

from __future__ import annotations

import secrets
import sqlite3

import sqlite_utils

MIGRATIONS: tuple[str, ...] = (
    # 1: nodes, their event history, API tokens, server settings, component states.
    """
    CREATE TABLE nodes (
        mac TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('discovered', 'installing', 'installed', 'failed')),
        liveness TEXT NOT NULL DEFAULT 'unknown' CHECK (liveness IN ('online', 'offline', 'unknown')),
        hostname TEXT,
        ip TEXT,
        netmask TEXT,
        gateway TEXT,
        dns TEXT,
        arch TEXT,
        labels TEXT,
        profile TEXT,
        facts TEXT,
        install_nonce TEXT,
        install_ip TEXT,
        install_phase TEXT,
        install_started_at TEXT,
        install_progress_at TEXT,
        last_heartbeat TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        revision INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX nodes_by_status ON nodes (status, created_at);
    CREATE INDEX nodes_by_created ON nodes (created_at);
    CREATE TABLE node_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        mac TEXT NOT NULL,
        at TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('api', 'dhcp', 'mqtt', 'installer', 'boot', 'system')),
        kind TEXT NOT NULL,
        field TEXT,
        old TEXT,
        new TEXT,
        detail TEXT,
        actor TEXT
    );
    CREATE INDEX node_events_by_mac ON node_events (mac, id);
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'readonly')),
        token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE components (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        detail TEXT,
        updated_at TEXT NOT NULL
    );
    """,
    # 2: DHCP leases. An address is held by at most one MAC (primary key); a MAC holds at most one
    # bound lease per subnet. A declined address is quarantined: state 'declined', mac = who declined it.
    # expires_at is Unix time (seconds): the end of the lease or of the quarantine. A node's ip is its
    # reservation; the DHCP writer checks it (by address) inside the transaction that binds a lease.
    """
    CREATE TABLE dhcp_leases (
        ip TEXT PRIMARY KEY,
        mac TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('bound', 'declined')),
        subnet TEXT NOT NULL,
        client_id TEXT,
        hostname TEXT,
        expires_at INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX dhcp_leases_bound_mac ON dhcp_leases (mac, subnet) WHERE state = 'bound';
    CREATE INDEX dhcp_leases_by_expiry ON dhcp_leases (expires_at);
    CREATE INDEX nodes_by_ip ON nodes (ip)
    """,
    # 3: MQTT: commands with their results, per-node broker credentials, the agent's current session and
    # when the node last came online (the liveness watchdog's reference and the commands' re-send mark).
    """
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        mac TEXT NOT NULL,
        command TEXT NOT NULL,
        args TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'accepted', 'running', 'succeeded', 'failed',
                                             'timed_out', 'rejected', 'expired')),
        created_at TEXT NOT NULL,
        deadline TEXT NOT NULL,
        sent_at TEXT,
        updated_at TEXT NOT NULL,
        finished_at TEXT,
        exit_code INTEGER,
        stdout TEXT,
        stderr TEXT,
        detail TEXT,
        actor TEXT
    );
    CREATE INDEX commands_by_mac ON commands (mac, created_at);
    CREATE INDEX commands_open ON commands (state, deadline) WHERE state IN ('queued', 'sent', 'accepted', 'running');
    CREATE INDEX commands_unsent ON commands (deadline) WHERE state IN ('queued', 'sent');
    CREATE TABLE node_credentials (
        mac TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN mqtt_session TEXT;
    ALTER TABLE nodes ADD COLUMN online_at TEXT
    """,
)


def current_version(conn: sqlite3.Connection) -> int:
    if "schema_version" not in sqlite_utils.Database(conn).table_names():
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def migrate(conn: sqlite3.Connection, now: str) -> int:
    """Apply missing migrations, one transaction each; safe if two processes race."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = current_version(conn)
            if version > len(MIGRATIONS):
                raise RuntimeError(f"database schema {version} is newer than this server; upgrade the server")
            if version == len(MIGRATIONS):
                conn.execute("COMMIT")
                return version
            for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                conn.execute(statement)
            if version == 0:
                conn.execute("INSERT INTO settings VALUES ('install_token_secret', ?)", (secrets.token_hex(32),))
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version + 1, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
