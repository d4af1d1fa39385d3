"""The repository builds into the collection artifact nodefoundry-provision-0.1.0.tar.gz, which installs.

The build runs on a copy of the files git knows about (tracked, plus untracked files that are not
ignored), so it sees what a fresh clone plus work in progress would give, never a developer's
local state. Decoys of that local state (.venv, data, caches, build output) are planted in the
copy to prove that galaxy.yml's build_ignore keeps them out of the artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.ansible.run_ansible_test import lay_out

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GALAXY = BIN / "ansible-galaxy"
ARTIFACT = "nodefoundry-provision-0.1.0.tar.gz"

# Local state that must never travel in the artifact: path planted in the copy -> what it stands for.
DECOYS = {
    ".venv/bin/python": "virtual environment",
    "data/nodes.db": "runtime data",
    "data/assets/debian-installer/amd64/linux": "imported installer",
    "build/collection/old.tar.gz": "build output",
    ".pytest_cache/README.md": "pytest cache",
    ".ruff_cache/CACHEDIR.TAG": "ruff cache",
    "server/nodefoundry_server/__pycache__/cli.cpython-311.pyc": "bytecode",
    "server/nodefoundry_server.egg-info/PKG-INFO": "editable-install metadata",
    "tests/output/junit.xml": "ansible-test output",
    "bench/results/http.txt": "benchmark results",
    ".git/HEAD": "git metadata",
    ".gitattributes": "git metadata",
}
FORBIDDEN_PREFIXES = (
    ".venv/",
    "data/",
    "build/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".git/",
    "tests/output/",
    "bench/results/",
)


def _galaxy_env(tmp_path: Path) -> dict[str, str]:
    """Keep ansible-galaxy's caches and default collection paths inside the test's directory."""
    home = tmp_path / "ansible-home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "unused-collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("git") and (REPO / ".git").exists(), "this test builds from a git checkout of the repository"
    work = tmp_path_factory.mktemp("collection")
    source = lay_out(work / "src")
    assert (source / "galaxy.yml").is_file(), "galaxy.yml is missing from the repository"
    for relative in DECOYS:
        decoy = source / relative
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_text("decoy\n")
    output = work / "out"
    built = subprocess.run(
        [str(GALAXY), "collection", "build", "--output-path", str(output), str(source)],
        cwd=work,
        env=_galaxy_env(work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, f"ansible-galaxy collection build failed:\n{built.stdout}\n{built.stderr}"
    tarball = output / ARTIFACT
    assert tarball.is_file(), f"expected {ARTIFACT}, got {sorted(p.name for p in output.iterdir())}"
    return tarball


def _members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {member.name.removeprefix("./").rstrip("/"): member for member in tar.getmembers()}


def _read_json(tarball: Path, name: str) -> dict:
    with tarfile.open(tarball) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return json.load(extracted)


def test_artifact_contains_metadata_and_server_sources(artifact: Path) -> None:
    members = _members(artifact)
    for required in (
        "MANIFEST.json",
        "FILES.json",
        "meta/runtime.yml",
        "server/pyproject.toml",
        "server/nodefoundry_server/cli.py",
        "server/nodefoundry_server/config.py",
    ):
        assert required in members, f"{required} missing from {artifact.name}"


def test_manifest_describes_the_collection(artifact: Path) -> None:
    info = _read_json(artifact, "MANIFEST.json")["collection_info"]
    assert (info["namespace"], info["name"], info["version"]) == ("nodefoundry", "provision", "0.1.0")
    assert info["license"] == ["GPL-3.0-or-later"]
    assert info["readme"] == "README.md"
    assert {"provisioning", "pxe", "debian", "mqtt", "infrastructure"} <= set(info["tags"])


def test_files_json_lists_every_file_with_a_checksum(artifact: Path) -> None:
    files = {entry["name"]: entry for entry in _read_json(artifact, "FILES.json")["files"]}
    for required in ("server/pyproject.toml", "server/nodefoundry_server/cli.py", "meta/runtime.yml"):
        assert files[required]["ftype"] == "file"
        assert len(files[required]["chksum_sha256"]) == 64
    members = _members(artifact)
    regular = {name for name, member in members.items() if member.isfile()} - {"MANIFEST.json", "FILES.json"}
    listed = {name for name, entry in files.items() if entry["ftype"] == "file"}
    assert regular == listed


def _is_local_state(name: str) -> bool:
    parts = name.split("/")
    return (
        f"{name}/".startswith(FORBIDDEN_PREFIXES)
        or "__pycache__" in parts
        or any(part.endswith(".egg-info") for part in parts)
        or name.endswith(".pyc")
        or parts[-1].startswith(".git")
    )


def test_local_state_stays_out_of_the_artifact(artifact: Path) -> None:
    leaked = sorted(name for name in _members(artifact) if _is_local_state(name))
    assert not leaked, f"local state in the artifact: {leaked}"


def test_artifact_installs_and_is_listed(artifact: Path, tmp_path: Path) -> None:
    collections = tmp_path / "collections"
    env = _galaxy_env(tmp_path)
    installed = subprocess.run(
        [str(GALAXY), "collection", "install", "--offline", str(artifact), "-p", str(collections)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, f"install failed:\n{installed.stdout}\n{installed.stderr}"
    root = collections / "ansible_collections" / "nodefoundry" / "provision"
    assert (root / "MANIFEST.json").is_file()
    assert (root / "server" / "nodefoundry_server" / "cli.py").is_file()

    listed = subprocess.run(
        [str(GALAXY), "collection", "list", "-p", str(collections)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, f"list failed:\n{listed.stdout}\n{listed.stderr}"
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["nodefoundry.provision", "0.1.0"] in rows, listed.stdout
