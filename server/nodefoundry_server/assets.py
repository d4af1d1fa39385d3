"""``assets import``: put the Debian 12 netboot installer into the assets directory.

Sources: Debian's ``debian-installer-12-netboot-<arch>`` package (already
installed, or fetched with ``apt-get download``), or a Debian mirror over
HTTP with the files checked against the mirror's SHA256SUMS. Files are
written to a temporary name and renamed, so a node never sees half a kernel.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from .boot import DEBIAN_ARCHES, INSTALLER_FILES

PACKAGE = "debian-installer-12-netboot-{arch}"
PACKAGE_DIR = "usr/lib/debian-installer/images/12/{arch}/text/debian-installer/{arch}"
MIRROR_IMAGES = "dists/bookworm/main/installer-{arch}/current/images"
MIRROR_FILE = "netboot/debian-installer/{arch}/{name}"


class AssetError(Exception):
    pass


def _install_files(files: dict[str, Path], target: Path, source: str) -> dict[str, str]:
    """Copy atomically and write a manifest with sizes and SHA-256 sums."""
    target.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, str | dict[str, object]] = {"source": source}
    for name, path in files.items():
        temporary = target / f".{name}.tmp"
        shutil.copyfile(path, temporary)
        temporary.replace(target / name)
        manifest[name] = {"size": path.stat().st_size, "sha256": _sha256(target / name)}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {name: str(target / name) for name in files}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_tree(root: Path, arch: str) -> dict[str, Path] | None:
    directory = root / PACKAGE_DIR.format(arch=arch)
    files = {name: directory / name for name in INSTALLER_FILES}
    return files if all(path.is_file() for path in files.values()) else None


def import_from_apt(assets_dir: Path, arch: str, installed_root: Path = Path("/")) -> dict[str, str]:
    """Use the installed package if present, else ``apt-get download`` + ``dpkg-deb -x``."""
    installed = _from_tree(installed_root, arch)
    if installed:
        return _install_files(installed, assets_dir / "debian-installer" / arch, PACKAGE.format(arch=arch))
    with tempfile.TemporaryDirectory() as work:
        package = PACKAGE.format(arch=arch)
        for command in (["apt-get", "download", package], None):
            if command is None:
                debs = list(Path(work).glob("*.deb"))
                if not debs:
                    raise AssetError(f"apt-get download {package} produced no package")
                command = ["dpkg-deb", "-x", str(debs[0]), str(Path(work) / "tree")]
            done = subprocess.run(command, cwd=work, capture_output=True, text=True)
            if done.returncode != 0:
                raise AssetError(f"{' '.join(command[:2])} {package} failed: {done.stderr.strip().splitlines()[-1:]}")
        files = _from_tree(Path(work) / "tree", arch)
        if files is None:
            raise AssetError(f"{package} does not contain the netboot kernel and initrd")
        return _install_files(files, assets_dir / "debian-installer" / arch, package)


def import_from_mirror(assets_dir: Path, arch: str, mirror: str, timeout: float = 60) -> dict[str, str]:
    """Download from ``<mirror>/dists/bookworm/...`` and verify against SHA256SUMS."""
    base = f"{mirror.rstrip('/')}/{MIRROR_IMAGES.format(arch=arch)}"
    sums = _read_sums(_fetch_text(f"{base}/SHA256SUMS", timeout))
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for name in INSTALLER_FILES:
            relative = MIRROR_FILE.format(arch=arch, name=name)
            if relative not in sums:
                raise AssetError(f"{base}/SHA256SUMS has no entry for {relative}")
            path = Path(work) / name
            _download(f"{base}/{relative}", path, timeout)
            if _sha256(path) != sums[relative]:
                raise AssetError(f"checksum mismatch for {base}/{relative}")
            files[name] = path
        return _install_files(files, assets_dir / "debian-installer" / arch, base)


def _fetch_text(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except OSError as exc:
        raise AssetError(f"cannot fetch {url}: {exc}") from None


def _download(url: str, path: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, path.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        raise AssetError(f"cannot fetch {url}: {exc}") from None


def _read_sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].removeprefix("./")] = parts[0]
    return sums


def import_assets(assets_dir: str, arches: list[str], mirror: str | None) -> dict[str, dict[str, str]]:
    unknown = [arch for arch in arches if arch not in DEBIAN_ARCHES]
    if unknown:
        raise AssetError(f"unknown architecture {unknown[0]!r}; one of {', '.join(DEBIAN_ARCHES)}")
    root = Path(assets_dir)
    return {arch: import_from_mirror(root, arch, mirror) if mirror else import_from_apt(root, arch) for arch in arches}
