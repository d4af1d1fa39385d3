"""The agent as nodes receive it: one arch-independent zipapp plus its systemd unit.

The zipapp holds only this package (pure Python, so one file serves arm64 and amd64); paho-mqtt comes
from the node's Debian package python3-paho-mqtt. The build is deterministic (sorted entries, fixed
timestamps and modes), so the same installed package always yields the same bytes and checksum.
"""

from __future__ import annotations

import functools
import io
import zipfile
from importlib import resources
from importlib.resources.abc import Traversable

PACKAGE = "nodefoundry_agent"
UNIT_NAME = "nodefoundry-agent.service"
SHEBANG = b"#!/usr/bin/env python3\n"
ENTRY_POINT = b"import sys\n\nfrom nodefoundry_agent.__main__ import main\n\nsys.exit(main())\n"
_SHIPPED_SUFFIXES = (".py", ".service")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


@functools.cache
def zipapp_bytes() -> bytes:
    """``nodefoundry-agent.pyz``: run as ``python3 nodefoundry-agent.pyz`` or directly (shebang)."""
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "__main__.py", ENTRY_POINT)
        for name, data in sorted(_package_files(resources.files(PACKAGE), PACKAGE)):
            _add(archive, name, data)
    return buffer.getvalue()


def unit_text() -> str:
    """The systemd unit, ``nodefoundry-agent.service``."""
    return resources.files(PACKAGE).joinpath(UNIT_NAME).read_text()


def _package_files(directory: Traversable, prefix: str) -> list[tuple[str, bytes]]:
    found = []
    for entry in directory.iterdir():
        name = f"{prefix}/{entry.name}"
        if entry.is_dir() and entry.name != "__pycache__":
            found += _package_files(entry, name)
        elif entry.is_file() and entry.name.endswith(_SHIPPED_SUFFIXES):
            found.append((name, entry.read_bytes()))
    return found


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)
