"""The /run fallback directories of the embedded broker do not pile up after servers killed with -9."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodefoundry_server.mqtt import broker


def _owned_dir(root: Path, name: str, pid: int | str) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / broker.OWNER_FILE).write_text(f"{pid}\n")
    return directory


def test_orphaned_fallback_dirs_are_removed_and_live_ones_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker, "RUNTIME_ROOT", tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited: its directory is an orphan
    orphan = _owned_dir(tmp_path, "mqtt-orphan", dead_pid)
    live = _owned_dir(tmp_path, "mqtt-live", os.getppid())
    mine = _owned_dir(tmp_path, "mqtt-mine", os.getpid())
    unowned = tmp_path / "mqtt-unknown"  # no owner file: not ours to judge
    unowned.mkdir()
    broker._remove_orphaned_runtime_dirs()
    assert not orphan.exists()
    assert live.exists() and mine.exists() and unowned.exists()
