"""What nodes download: the zipapp (deterministic, only this package, runs on Debian's python3) and the unit."""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import nodefoundry_agent
from nodefoundry_agent import __version__, build

PACKAGE_DIR = Path(nodefoundry_agent.__file__).parent


def unit_directives() -> dict[str, list[str]]:
    """``Section.Key`` -> values, in the order the unit sets them."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in build.unit_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


def test_zipapp_is_deterministic_and_cached():
    first = build.zipapp_bytes()
    assert build.zipapp_bytes() is first
    build.zipapp_bytes.cache_clear()
    assert build.zipapp_bytes() == first


def test_zipapp_holds_the_package_and_nothing_else():
    data = build.zipapp_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    shipped = [f"nodefoundry_agent/{path.name}" for path in PACKAGE_DIR.iterdir() if path.suffix == ".py"]
    assert names == ["__main__.py", *sorted([*shipped, "nodefoundry_agent/nodefoundry-agent.service"])]
    assert not any("paho" in name or "__pycache__" in name or name.endswith(".pyc") for name in names)


def test_zipapp_runs_with_debians_python3(tmp_path: Path):
    pyz = tmp_path / "nodefoundry-agent"
    pyz.write_bytes(build.zipapp_bytes())
    argv = ["/usr/bin/python3", str(pyz), "--version"]
    printed = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert printed == f"nodefoundry-agent {__version__}\n"


def test_unit_runs_the_zipapp_as_specified():
    directives = unit_directives()
    expected = {
        "Service.Type": ["notify"],
        "Service.EnvironmentFile": ["/etc/default/nodefoundry-agent"],
        "Service.ExecStart": ["/usr/bin/python3 /usr/local/bin/nodefoundry-agent"],
        "Service.Restart": ["always"],
        "Service.RestartSec": ["5"],
        "Service.StateDirectory": ["nodefoundry-agent"],
        "Service.NoNewPrivileges": ["yes"],
        "Service.ProtectSystem": ["full"],
        "Service.PrivateTmp": ["yes"],
        "Install.WantedBy": ["multi-user.target"],
    }
    assert {key: directives.get(key) for key in expected} == expected
    assert "Service.ProtectHome" in directives


def test_unit_hardening_leaves_reboot_and_service_control_possible():
    """Root with its capabilities, writable /run and AF_UNIX: what systemctl needs to reach systemd/logind."""
    directives = unit_directives()
    for absent in ("Service.User", "Service.DynamicUser", "Service.CapabilityBoundingSet",
                   "Service.AmbientCapabilities", "Service.PrivateUsers", "Service.ProtectProc",
                   "Service.InaccessiblePaths", "Service.SystemCallFilter", "Service.IPAddressDeny"):  # fmt: skip
        assert absent not in directives, absent
    assert directives["Service.ProtectSystem"] == ["full"]  # not "strict": /run and /var stay writable
    assert "AF_UNIX" in directives["Service.RestrictAddressFamilies"][0].split()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    unit = tmp_path / build.UNIT_NAME
    unit.write_text(build.unit_text())
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
