"""Fixtures of the collection's integration tests: a real server, and real ``ansible``, ``ansible-playbook``
and ``ansible-inventory`` processes that find the collection where Ansible looks for collections.

Every Ansible process runs with its own HOME, ANSIBLE_CONFIG and ANSIBLE_HOME under the test's directory, so
neither a developer's configuration nor an earlier test's cache can change what a test sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ansible import fleet
from tests.conftest import ADMIN_TOKEN, Server, fake_installer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The server settings of these tests: agents report once an hour, so a node the test brought online stays online.
SERVER_ENV = {"NF_HEARTBEAT_INTERVAL": "3600"}


@pytest.fixture(scope="session")
def collections_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collections directory whose ``nodefoundry/provision`` is this checkout (what the tests test)."""
    root = tmp_path_factory.mktemp("collections")
    namespace = root / "ansible_collections" / "nodefoundry"
    namespace.mkdir(parents=True)
    (namespace / "provision").symlink_to(REPO, target_is_directory=True)
    return root


class Lab:
    """One real server plus the environment Ansible runs in against it."""

    def __init__(self, server: Server, workdir: Path, collections_path: Path) -> None:
        self.server = server
        self.workdir = workdir
        home = workdir / "home"
        (home / ".ansible" / "tmp").mkdir(parents=True)
        config = workdir / "ansible.cfg"
        config.write_text("[defaults]\n")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "NODEFOUNDRY_"))}
        self.env = {
            **inherited,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(home),
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_HOME": str(home / ".ansible"),
            "ANSIBLE_LOCAL_TEMP": str(home / ".ansible" / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(collections_path),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "NODEFOUNDRY_URL": server.url,
            "NODEFOUNDRY_TOKEN": ADMIN_TOKEN,
        }

    # -- running Ansible ------------------------------------------------------------------------------

    def run(self, *args: str | Path, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the lab's environment; ``env`` adds to it, and a None value removes a variable."""
        merged = {**self.env, **(env or {})}
        return subprocess.run(
            [str(arg) for arg in args],
            cwd=self.workdir,
            env={key: value for key, value in merged.items() if value is not None},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def module(
        self, name: str, args: dict[str, Any], *flags: str, env: dict[str, str | None] | None = None
    ) -> tuple[dict[str, Any], str]:
        """``ansible localhost -m nodefoundry.provision.<name>``: its result and everything printed before it."""
        callback = {"ANSIBLE_STDOUT_CALLBACK": "minimal", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", **(env or {})}
        arguments = ("-a", json.dumps(args)) if args else ()
        done = self.run(
            BIN / "ansible", "localhost", "-m", f"nodefoundry.provision.{name}", *arguments, *flags, env=callback
        )
        marker = done.stdout.find("localhost | ")
        assert marker >= 0, done.stdout + done.stderr
        result = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("{", marker))[0]
        result["_state"] = done.stdout[marker:].split(" => ", 1)[0].split(" | ")[1]
        return result, done.stdout[:marker].strip()

    def playbook(self, playbook: str | Path, inventory: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(BIN / "ansible-playbook", "-i", inventory, playbook, *args, **kwargs)

    def inventory(self, source: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(BIN / "ansible-inventory", "-i", source, "--list", *args, **kwargs)

    def inventory_source(self, name: str = "fleet.nodefoundry.yml", **options: Any) -> Path:
        """An inventory source file of the plugin (url and token from the environment)."""
        path = self.workdir / name
        path.write_text(json.dumps({"plugin": "nodefoundry.provision.nodefoundry", **options}))
        return path

    def example_source(self) -> Path:
        """The example source shipped in inventory/, under its own name."""
        path = self.workdir / "lab.nodefoundry.yml"
        shutil.copy(REPO / "inventory" / "lab.nodefoundry.yml", path)
        return path

    # -- looking at the server ------------------------------------------------------------------------

    def node(self, mac: str) -> dict[str, Any] | None:
        response = self.server.api("GET", f"/api/v1/nodes/{mac}")
        return None if response.status_code == 404 else fleet.ok(response)

    def snapshot(self, *macs: str) -> dict[str, Any]:
        """Everything a change would show: all nodes as listed, and the event history of every node."""
        nodes = fleet.ok(self.server.api("GET", "/api/v1/nodes"))
        known = sorted({node["mac"] for node in nodes} | set(macs))
        events = {}
        for mac in known:
            response = self.server.api("GET", f"/api/v1/nodes/{mac}/events", params={"limit": 1000})
            events[mac] = fleet.ok(response) if response.status_code != 404 else None
        return {"nodes": nodes, "events": events}


@pytest.fixture
def lab(tmp_path: Path, collections_path: Path) -> Iterator[Lab]:
    workdir = tmp_path / "server"
    workdir.mkdir()
    server = Server(workdir, SERVER_ENV)
    fake_installer(server.assets_dir)
    try:
        server.start()
        yield Lab(server, tmp_path, collections_path)
    finally:
        server.close()
