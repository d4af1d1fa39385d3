"""Load preseed text with the real debconf-set-selections, as debian-installer does."""

from __future__ import annotations

import subprocess
from pathlib import Path


def debconf_load(text: str, workdir: Path) -> dict[str, str]:
    """Check with ``debconf-set-selections -c``, then load into a private database and read the values back."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "debconf.conf").write_text(
        "Config: configdb\nTemplates: templatedb\n\n"
        f"Name: configdb\nDriver: File\nFilename: {workdir}/config.dat\n\n"
        f"Name: templatedb\nDriver: File\nFilename: {workdir}/templates.dat\n"
    )
    path = workdir / "preseed.cfg"
    path.write_text(text)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBCONF_SYSTEMRC": str(workdir / "debconf.conf")}
    for args in (["-c", str(path)], [str(path)]):
        done = subprocess.run(["debconf-set-selections", *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr  # also no "Unknown type" warnings
    values: dict[str, str] = {}
    name = None
    for line in (workdir / "config.dat").read_text().splitlines():
        if line.startswith("Name: "):
            name = line[len("Name: ") :]
        elif line.startswith("Value: ") and name:
            values[name] = line[len("Value: ") :]
    return values
