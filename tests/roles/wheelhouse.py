"""Python wheels for the server's venv on machines without PyPI: `pip download` on the controller.

Holds the dependencies of server/ and agent/ (their own sources travel with the collection) plus
setuptools and wheel, which building those sources needs once pip runs with --no-index. Cached by
the digest of the requirement list and the Python it is for; built into a temporary directory and
renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/nodefoundry")
LOCAL = {"nodefoundry-server", "nodefoundry-agent"}  # built from the collection's sources on the target
BUILD = ["setuptools>=68", "wheel"]
# The machines run Debian 12's CPython 3.11 on this architecture: the controller's venv is the same.
PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
TIMEOUT = 900


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].strip().split(" ")[0].rstrip("<>=!~,0123456789.").lower()


def requirements() -> list[str]:
    """Every third-party requirement of server/ and agent/, plus the build backend."""
    found: list[str] = []
    for project in ("server", "agent"):
        data = tomllib.loads((REPO / project / "pyproject.toml").read_text())
        found += [r for r in data["project"]["dependencies"] if _name(r) not in LOCAL]
        found += data["build-system"]["requires"]
    return sorted(set(found + BUILD))


def path() -> Path:
    """The wheelhouse directory for the current requirements (whether or not it is built yet)."""
    key = json.dumps({"requirements": requirements(), "python": PYTHON_TAG, "machine": _machine()})
    return CACHE / f"wheelhouse-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _machine() -> str:
    return subprocess.run(["uname", "-m"], capture_output=True, text=True, check=True).stdout.strip()


def ensure() -> Path:
    """The cached wheelhouse, downloaded first if missing (binary wheels only: nothing compiles offline)."""
    final = path()
    if final.is_dir():
        return final
    temp = final.with_name(f".{final.name}.{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(temp)]
    result = subprocess.run([*command, *requirements()], capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"pip download failed ({result.returncode}):\n{result.stderr[-4000:]}")
    try:
        temp.rename(final)
    except OSError:  # a concurrent caller finished first: its copy is as good
        shutil.rmtree(temp, ignore_errors=True)
    return final
