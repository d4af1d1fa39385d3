"""The execution environment of ``meta/execution-environment.yml``, from a clean checkout.

``ansible-builder create`` writes the build context (Containerfile plus ``_build/``) on a copy of the files git
knows about, after the collection artifact was built there as ``make collection`` builds it. No container engine
runs on this machine, so the image build itself cannot run; instead the build steps that read our files are
replayed here with the Containerfile's own commands, its container paths mapped to temporary ones:

- the galaxy stage installs the collection from ``_build/requirements.yml`` and the artifact copied next to it;
- the builder stage's introspection collects the Python and system requirements of the user files and of every
  installed collection (the step that failed while the artifact carried this definition: ansible-builder reads
  an installed collection's ``meta/execution-environment.yml`` with paths relative to the collection root).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import bindep.depends
import pytest
import yaml

from tests.ansible.run_ansible_test import lay_out

BIN = Path(sys.executable).parent
# Where the image keeps collections (the galaxy stage installs there, introspection reads there).
IMAGE_COLLECTIONS = "/usr/share/ansible/collections"


class BuildContext:
    """A checkout copy, its collection artifact, and the build context ``ansible-builder create`` wrote for it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.checkout = lay_out(work / "tree")
        version = yaml.safe_load((self.checkout / "galaxy.yml").read_text())["version"]
        self.version = str(version)
        self.artifact = self.checkout / "build" / "collection" / f"nodefoundry-provision-{version}.tar.gz"
        self.root = work / "context"
        self.files = self.root / "_build"
        self.containerfile = ""

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
        """Run a command with Ansible's state under the work directory; return its stdout, failing on an error."""
        home = self.work / "ansible-home"
        home.mkdir(exist_ok=True)
        merged = {**os.environ, "ANSIBLE_HOME": str(home), "ANSIBLE_NOCOLOR": "1", **(env or {})}
        done = subprocess.run(argv, cwd=cwd, env=merged, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def create(self) -> None:
        """``make collection`` then ``ansible-builder create``, as docs/awx.md tells operators to."""
        self.run(
            [str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", "build/collection", "."],
            self.checkout,
        )
        definition = self.checkout / "meta" / "execution-environment.yml"
        builder = [str(BIN / "ansible-builder"), "create", "-f", str(definition), "-c", str(self.root)]
        self.run([*builder, "--output-filename", "Containerfile"], self.work)
        self.containerfile = (self.root / "Containerfile").read_text()

    def step(self, marker: str, paths: dict[str, str | Path]) -> tuple[dict[str, str], list[str]]:
        """The Containerfile's one RUN step containing ``marker`` as (environment, argv), with ``paths`` mapped."""
        lines = [line for line in self.containerfile.splitlines() if line.startswith("RUN ") and marker in line]
        assert len(lines) == 1, f"expected one RUN step with {marker!r} in:\n{self.containerfile}"
        line = lines[0].removeprefix("RUN ")
        for container, local in paths.items():
            line = line.replace(container, str(local))
        words = shlex.split(line)
        env = {}
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        return env, words

    def install(self, collections: Path) -> Path:
        """Replay the galaxy stage into ``collections``; return the installed collection's directory."""
        env, argv = self.step(
            "ansible-galaxy collection install",
            {"$ANSIBLE_GALAXY_CLI_COLLECTION_OPTS": "--offline", IMAGE_COLLECTIONS: collections},
        )
        assert argv[:3] == ["ansible-galaxy", "collection", "install"] and "requirements.yml" in argv, argv
        self.run([str(BIN / argv[0]), *argv[1:]], cwd=self.files, env=env)
        return collections / "ansible_collections" / "nodefoundry" / "provision"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> BuildContext:
    built = BuildContext(tmp_path_factory.mktemp("ee"))
    built.create()
    return built


def test_context_holds_the_artifact_requirements_and_bindep(context: BuildContext) -> None:
    copied = context.files / "collections" / context.artifact.name
    assert copied.is_file(), f"the artifact is not in the build context: {sorted(context.files.rglob('*'))}"
    assert copied.read_bytes() == context.artifact.read_bytes()
    for name in ("requirements.yml", "requirements.txt", "bindep.txt"):
        assert (context.files / name).read_text() == (context.checkout / "meta" / name).read_text(), name
    for instruction in (
        "COPY _build /build",
        "COPY _build/requirements.txt requirements.txt",
        "COPY _build/bindep.txt bindep.txt",
        'ARG ANSIBLE_INSTALL_REFS="ansible-core>=2.16,<2.19 ansible-runner"',
    ):
        assert instruction in context.containerfile, instruction


def test_galaxy_stage_installs_the_collection_from_the_context(context: BuildContext, tmp_path: Path) -> None:
    root = context.install(tmp_path / "collections")
    info = json.loads((root / "MANIFEST.json").read_text())["collection_info"]
    assert (info["namespace"], info["name"], info["version"]) == ("nodefoundry", "provision", context.version)
    assert (root / "plugins" / "modules" / "node.py").is_file()
    assert (root / "server" / "nodefoundry_server" / "cli.py").is_file()


def test_builder_stage_collects_the_python_and_system_requirements(context: BuildContext, tmp_path: Path) -> None:
    collections = tmp_path / "collections"
    context.install(collections)
    workdir = tmp_path / "build"  # the builder stage's WORKDIR, with its COPY _build/<name> <name>
    workdir.mkdir()
    for name in ("requirements.txt", "bindep.txt"):
        (workdir / name).write_text((context.files / name).read_text())
    output = tmp_path / "src"
    output.mkdir()
    _, argv = context.step(
        "introspect.py introspect",
        {"$PYCMD": sys.executable, "/output/scripts/": f"{context.files}/scripts/", "/tmp/src/": f"{output}/"},
    )
    report = yaml.safe_load(context.run([*argv, str(collections)], cwd=workdir).split("---", 1)[1])
    assert report == {
        "python": [],
        "system": [
            "openssh-clients [platform:rpm]  # from collection user",
            "openssh-client [platform:dpkg]  # from collection user",
        ],
    }
    rules = bindep.depends.Depends((output / "bindep.txt").read_text())
    assert [rule[0] for rule in rules.active_rules(["platform:rpm", "platform:centos"])] == ["openssh-clients"]
