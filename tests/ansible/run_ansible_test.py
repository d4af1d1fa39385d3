"""Run ``ansible-test sanity`` or ``ansible-test units`` on a copy of the collection (``make sanity``).

ansible-test only works inside ``ansible_collections/<namespace>/<name>``, so the files git knows about
(tracked plus untracked-but-not-ignored: what a clone plus work in progress gives, never .venv/data/build)
are copied under a temporary ``ansible_collections/nodefoundry/provision``. The copy has no ``.git``;
ansible-test then lists content by walking the directory (its "unversioned" source), which sees the
same files. The copy lives outside the checkout: inside it, ansible-test would find the checkout's
``.git`` above it and list files from there.

Sanity covers the Ansible content only. ``server/``, ``agent/``, ``bench/`` and the repository's pytest
suites are Python 3.11 projects with their own linting (ruff) and tests; they travel in the collection
for the roles but are not plugins, so they are left out with ansible-test's own ``--exclude`` target
selection rather than with hundreds of ignore-file entries. A new Ansible directory is checked
automatically; a new non-Ansible Python tree fails loudly until it is excluded here.

No containers are needed (``--venv``): ansible-test builds its virtual environments from PyPI. Its pip
bootstrap script normally comes from ci-files.testing.ansible.com, which may be unreachable (only the
package registries are, here); then an equivalent bootstrap is written that installs the same pip
version from its PyPI wheel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

# Not collection content (see the module docstring): regular expressions over ansible-test target paths.
SANITY_EXCLUDES = (
    "server/",
    "agent/",
    "bench/",
    "tests/integration/",
    "tests/e2e/",
    "tests/ansible/",
    "tests/roles/",
    r"tests/[^/]+\.py",
    r"tests/unit/test_[^/]+\.py",
    r"tests/unit/conftest\.py",
)
UNIT_TARGETS = ("tests/unit/plugins/",)
# pytest loads every conftest.py between the collection root and the tests: the repository suite's own ones
# (requests, network namespaces, the server's store) have no business in ansible-test's unit environment.
UNIT_LEAVE_OUT = ("tests/conftest.py", "tests/unit/conftest.py")

BOOTSTRAP = '''"""Stand-in for get-pip.py {version} (written by NodeFoundry's tests/ansible/run_ansible_test.py).

Like get-pip.py, it runs "pip install <arguments>" from a pip {version} wheel: here the PyPI wheel next to it.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "{wheel}"))
from pip._internal.cli.main import main

sys.exit(main(["install"] + [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]))
'''


def git_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(name for name in set(listed.split("\0")) if name and (REPO / name).is_file())


def lay_out(root: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """Copy the collection to ``root/ansible_collections/nodefoundry/provision``; return that directory."""
    collection = root / "ansible_collections" / "nodefoundry" / "provision"
    for relative in git_files():
        if relative in leave_out:
            continue
        target = collection / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, target)
    return collection


def ensure_pip_bootstrap() -> None:
    """Make ansible-test's pip bootstrap script available (see the module docstring)."""
    from ansible_test._internal.python_requirements import get_venv_packages

    version = get_venv_packages(SimpleNamespace(version=PYTHON_VERSION))["pip"]
    cache = Path.home() / ".ansible" / "test" / "cache"
    script = cache / f"get_pip_{version.replace('.', '_')}.py"
    if script.exists():
        return
    cache.mkdir(parents=True, exist_ok=True)
    try:
        url = f"https://ci-files.testing.ansible.com/ansible-test/get-pip-{version}.py"
        with urllib.request.urlopen(url, timeout=10) as response:
            script.write_bytes(response.read())
        return
    except OSError as exc:
        print(f"run_ansible_test: {exc}; using pip {version} from PyPI for the bootstrap", file=sys.stderr)
    subprocess.run([BIN / "pip", "download", "-q", "--no-deps", f"pip=={version}", "-d", cache], check=True)
    wheel = f"pip-{version}-py3-none-any.whl"
    if not (cache / wheel).exists():
        raise SystemExit(f"run_ansible_test: pip download did not produce {cache / wheel}")
    script.write_text(BOOTSTRAP.format(version=version, wheel=wheel))


def command(kind: str, extra: list[str]) -> list[str]:
    base = [str(BIN / "ansible-test"), kind, "--venv", "--python", PYTHON_VERSION, "--color", "no", "--requirements"]
    if kind == "sanity":
        return [*base, *(arg for pattern in SANITY_EXCLUDES for arg in ("--exclude", pattern)), *extra]
    return [*base, *extra, *UNIT_TARGETS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sanity", "units"])
    parser.add_argument("--keep", action="store_true", help="keep the copy (and tests/output) for inspection")
    options, extra = parser.parse_known_args()
    ensure_pip_bootstrap()
    root = Path(tempfile.mkdtemp(prefix="nf-ansible-test-"))
    try:
        collection = lay_out(root, UNIT_LEAVE_OUT if options.kind == "units" else ())
        args = command(options.kind, extra)
        print("run_ansible_test: cd", collection, "&&", " ".join(args), flush=True)
        return subprocess.run(args, cwd=collection, check=False).returncode
    finally:
        if options.keep:
            print("run_ansible_test: kept", root, file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
