"""Fixtures shared by the server's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodefoundry_server import lifecycle
from nodefoundry_server.store import Store

# The nodes the ``store`` fixture registers.
MAC, OTHER = "aabbccddee01", "aabbccddee02"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A fresh store with MAC and OTHER registered through the API (a module needing another defines its own)."""
    store = Store(tmp_path / "nodes.db")
    store.open()
    for mac in (MAC, OTHER):
        lifecycle.register(store, mac, {}, source="api")
    return store
