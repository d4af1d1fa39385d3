"""The lab itself: a machine boots and answers SSH; teardown, and the cleanup of a crashed run, leave nothing."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.roles import lab, rootfs, wheelhouse

CHILD = """
import json, sys, time
from tests.roles import lab, rootfs, wheelhouse
owned = lab.Lab.create(rootfs.ensure(), wheelhouse.ensure())
lab.Machine(owned, "crashed").up(1)
nspawn = int((owned.dir / "machines/crashed/nspawn.pid").read_text())
print(json.dumps({"lab": owned.name, "nspawn": nspawn}), flush=True)
time.sleep(600)
"""


def _netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


@pytest.fixture
def fresh_lab() -> Iterator[lab.Lab]:
    owned = lab.Lab.create(rootfs.ensure(), wheelhouse.ensure())
    yield owned
    owned.destroy()


def test_machine_boots_answers_ssh_and_goes_away(fresh_lab: lab.Lab) -> None:
    machine = lab.Machine(fresh_lab, "probe")
    config = machine.up(3)
    assert config["address"] == f"{lab.SUBNET}.13"
    assert config["system_state"] == "running", config
    ssh = [
        *fresh_lab.enter(), "ssh", "-i", str(fresh_lab.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", f"root@{config['address']}",
        "hostname; stat -c %Y /var/lib/apt/periodic/update-success-stamp; systemctl is-enabled apt-daily.timer;"
        " ls /var/cache/apt/archives",
    ]  # fmt: skip
    result = subprocess.run(ssh, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    hostname, stamp, apt_daily, *archives = result.stdout.split()
    assert hostname == "probe"
    assert apt_daily == "masked"  # it would hold the dpkg lock while failing to reach a mirror
    assert time.time() - int(stamp) < 3600  # apt lists count as fresh for the roles' cache_valid_time
    assert any(name.startswith("mosquitto_") for name in archives)  # the roles' packages are cached offline
    machine.down()
    assert not machine.dir.exists()
    assert not lab._mounted(machine.merged)


def test_cleanup_after_a_crashed_run_leaves_nothing() -> None:
    rootfs.ensure()  # the child must not spend its time building
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=lab.REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 240)
        assert ready, "the child lab did not boot its machine in time"
        state = json.loads(child.stdout.readline())
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the crash: no teardown ran
        child.wait(timeout=30)
    name, nspawn = state["lab"], state["nspawn"]
    merged = lab.STATE_ROOT / name / "machines" / "crashed" / "merged"
    assert _netns_exists(name) and lab._mounted(merged) and lab._alive(nspawn)

    assert name in lab.cleanup_stale()

    assert not _netns_exists(name)
    assert not lab._mounted(merged)
    assert not lab._alive(nspawn)
    assert not (lab.STATE_ROOT / name).exists()
