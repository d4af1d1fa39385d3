"""Lifecycle transitions and store migrations on a real SQLite file."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from nodefoundry_server import auth, lifecycle, nodes
from nodefoundry_server.lifecycle import NodeExists, NodeNotFound, TransitionRefused
from nodefoundry_server.store import Store, schema

MAC = "aabbccddeeff"


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "nodes.db")
    store.open()
    return store


def kinds(store, mac=MAC):
    return [(e["kind"], e.get("old"), e.get("new")) for e in store.node_events(mac)]


def test_fresh_database_is_migrated_in_wal_mode(store):
    assert store.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema.current_version(store.conn()) == len(schema.MIGRATIONS)
    assert store.setting("install_token_secret")
    assert store.open() == len(schema.MIGRATIONS)  # reopening is a no-op


def test_a_newer_schema_is_refused(store):
    store.conn().execute("INSERT INTO schema_version VALUES (99, 'x')")
    with pytest.raises(RuntimeError, match="newer"):
        Store(store.path).open()


def test_full_lifecycle_with_events(store):
    lifecycle.register(store, MAC, {}, source="dhcp")
    with pytest.raises(NodeExists):
        lifecycle.register(store, MAC, {}, source="api")
    lifecycle.start_install(store, MAC, "install", source="api", actor="ops")
    assert lifecycle.installer_report(store, MAC, "started", phase=None, detail=None) == "installing"
    assert lifecycle.installer_report(store, MAC, "progress", phase="partman", detail=None) == "installing"
    assert lifecycle.installer_report(store, MAC, "finished", phase=None, detail=None) == "installed"
    with pytest.raises(TransitionRefused):
        lifecycle.start_install(store, MAC, "install", source="api")
    lifecycle.start_install(store, MAC, "reinstall", source="api")
    assert lifecycle.installer_report(store, MAC, "failed", phase="grub-installer", detail=None) == "failed"
    lifecycle.start_install(store, MAC, "reinstall", source="api")
    assert lifecycle.mark_installed(store, MAC, source="mqtt") is True
    assert lifecycle.mark_installed(store, MAC, source="mqtt") is False
    assert [k for k in kinds(store) if k[0] != "installer-progress"] == [
        ("registered", None, "discovered"),
        ("install", "discovered", "installing"),
        ("installer-started", "queued", "started"),
        ("installer-finished", "installing", "installed"),
        ("reinstall", "installed", "installing"),
        ("installer-failed", "installing", "failed"),
        ("reinstall", "failed", "installing"),
        ("installed", "installing", "installed"),
    ]


def test_refused_transitions(store):
    with pytest.raises(NodeNotFound):
        lifecycle.start_install(store, MAC, "install", source="api")
    lifecycle.register(store, MAC, {}, source="api")
    with pytest.raises(TransitionRefused, match="only 'installed' or 'failed'"):
        lifecycle.start_install(store, MAC, "reinstall", source="api")
    with pytest.raises(TransitionRefused):
        lifecycle.installer_report(store, MAC, "finished", phase=None, detail=None)
    assert lifecycle.mark_installed(store, MAC, source="mqtt") is False
    assert store.get_node(MAC)["status"] == "discovered"


def test_install_token_lives_only_for_its_install(store):
    lifecycle.register(store, MAC, {}, source="api")
    assert lifecycle.installing_nonce(store, MAC) is None
    lifecycle.start_install(store, MAC, "install", source="api")
    nonce, _ = lifecycle.installing_nonce(store, MAC)
    token = auth.install_token(store, MAC, nonce)
    assert auth.install_token_valid(store, MAC, nonce, token)
    altered = token[:-1] + ("1" if token.endswith("0") else "0")  # one digit off, never the token itself
    assert not auth.install_token_valid(store, MAC, nonce, altered)
    assert auth.install_token(store, "aabbccddee00", nonce) != token  # bound to the MAC
    lifecycle.installer_report(store, MAC, "failed", phase=None, detail=None)
    assert lifecycle.installing_nonce(store, MAC) is None
    lifecycle.start_install(store, MAC, "reinstall", source="api")
    new_nonce, _ = lifecycle.installing_nonce(store, MAC)
    assert not auth.install_token_valid(store, MAC, new_nonce, token)  # a new install, a new token


def test_stalled_installs_fail_after_the_timeout(store):
    lifecycle.register(store, MAC, {}, source="api")
    lifecycle.register(store, "aabbccddee00", {}, source="api")
    lifecycle.start_install_many(store, [MAC, "aabbccddee00"], "install", source="api")
    assert lifecycle.expire_stalled_installs(store, 600) == []
    with store.write() as conn:  # MAC's last progress is old; the other node's is fresh
        conn.execute("UPDATE nodes SET install_progress_at = '2020-01-01T00:00:00.000Z' WHERE mac = ?", (MAC,))
    assert lifecycle.expire_stalled_installs(store, 600) == [MAC]
    assert store.get_node(MAC)["status"] == "failed"
    assert kinds(store)[-1] == ("install-timeout", "installing", "failed")
    assert store.get_node("aabbccddee00")["status"] == "installing"
    later = datetime.now(UTC) + timedelta(seconds=3600)
    assert lifecycle.expire_stalled_installs(store, 600, at=later) == ["aabbccddee00"]


def test_bulk_dry_run_rolls_back(store):
    lifecycle.register(store, MAC, {}, source="api")
    outcomes = lifecycle.start_install_many(store, [MAC, "000000000000"], "install", source="api", dry_run=True)
    assert [(o.ok, o.changed) for o in outcomes] == [(True, True), (False, False)]
    assert store.get_node(MAC)["status"] == "discovered"
    assert kinds(store) == [("registered", None, "discovered")]


def test_a_failed_transaction_leaves_nothing_behind(store):
    lifecycle.register(store, MAC, {}, source="api")
    with pytest.raises(sqlite3.IntegrityError), store.write() as conn:
        conn.execute("UPDATE nodes SET hostname = 'half' WHERE mac = ?", (MAC,))
        conn.execute("UPDATE nodes SET status = 'bogus' WHERE mac = ?", (MAC,))  # CHECK constraint
    assert "hostname" not in store.get_node(MAC)


def test_node_update_checks_the_whole_network(store):
    lifecycle.register(store, MAC, {"ip": "10.0.0.5", "netmask": "255.255.255.0"}, source="api")
    with pytest.raises(nodes.InvalidValue, match=r"not in 10\.0\.0\.0/24"):
        nodes.update(store, MAC, {"gateway": "10.0.1.1"}, source="api", actor=None)
    assert nodes.update(store, MAC, {"gateway": "10.0.0.1"}, source="api", actor=None)["gateway"] == "10.0.0.1"
