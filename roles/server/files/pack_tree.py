"""Pack a directory (server/, agent/, a wheelhouse) into a reproducible .tar.gz on the controller.

Why: only what pip needs travels to the host (no caches, egg-info or build output), in one transfer,
and the same files always give the same bytes, so the copy task reports a change only when they changed.
Usage: pack_tree.py SOURCE_DIR OUTPUT_FILE TOP_DIRECTORY_NAME
"""

from __future__ import annotations

import contextlib
import gzip
import sys
import tarfile
from pathlib import Path

SKIP_DIRS = {"__pycache__", "build", "dist"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")
FIXED_MTIME = 1577836800  # 2020-01-01: wheels are zip files, which cannot hold times before 1980


def wanted(relative: Path) -> bool:
    """Sources only: hidden files, caches and build output stay behind."""
    return not any(part.startswith(".") or part in SKIP_DIRS or part.endswith(SKIP_SUFFIXES) for part in relative.parts)


def pack(source: Path, output: Path, top: str) -> None:
    if not source.is_dir():
        raise SystemExit(f"{source}: not a directory")
    files = sorted(path for path in source.rglob("*") if path.is_file() and wanted(path.relative_to(source)))
    with contextlib.ExitStack() as stack:  # not a parenthesized `with`: any controller Python may run this
        raw = stack.enter_context(output.open("wb"))
        packed = stack.enter_context(gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0))
        tar = stack.enter_context(tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT))
        for path in files:
            info = tarfile.TarInfo(f"{top}/{path.relative_to(source).as_posix()}")
            info.size, info.mtime, info.mode = path.stat().st_size, FIXED_MTIME, 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    pack(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
