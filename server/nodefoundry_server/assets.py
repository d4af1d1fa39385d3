"""``assets import``: put the Debian 12 netboot installer into the assets directory.

Sources: Debian's ``debian-installer-12-netboot-<arch>`` package (already
installed, or fetched with ``apt-get download``), or a Debian mirror over
HTTP with the files checked against the mirror's SHA256SUMS. Files are
written to a temporary name and renamed, so a node never sees half a kernel.

For arm64 the netboot GRUB comes along (``grubaa64.efi``, the signed shim
``bootnetaa64.efi``, and ``grub/`` with the modules and font GRUB loads from
its prefix): Debian 12 has no arm64 iPXE, so this GRUB is what arm64 UEFI
nodes boot over TFTP. Its packaged ``grub.cfg`` files are left out: the
server generates GRUB's config (see ``tftp.tree``).
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
GRUB_LOADERS = {"arm64": ("grubaa64.efi", "bootnetaa64.efi")}
GRUB_TREE = "grub"


class AssetError(Exception):
    pass


def _install_files(files: dict[str, Path], target: Path, source: str) -> dict[str, str]:
    """Copy atomically and write a manifest with sizes and SHA-256 sums.

    Returns the installed top-level names: the GRUB module tree is one entry, ``grub``.
    """
    manifest: dict[str, str | dict[str, object]] = {"source": source}
    for name, path in files.items():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.tmp")
        shutil.copyfile(path, temporary)
        temporary.replace(destination)
        manifest[name] = {"size": path.stat().st_size, "sha256": _sha256(destination)}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {name.split("/", 1)[0]: str(target / name.split("/", 1)[0]) for name in files}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_tree(root: Path, arch: str) -> dict[str, Path] | None:
    directory = root / PACKAGE_DIR.format(arch=arch)
    files = {name: directory / name for name in INSTALLER_FILES}
    if not all(path.is_file() for path in files.values()):
        return None
    return files | _grub_files(directory, arch)


def _is_grub_file(name: str, arch: str) -> bool:
    """A netboot GRUB file to copy: a loader, or a module/font under ``grub/`` but no ``grub.cfg``."""
    if name in GRUB_LOADERS.get(arch, ()):
        return True
    return arch in GRUB_LOADERS and name.startswith(f"{GRUB_TREE}/") and not name.endswith("/grub.cfg")


def _grub_files(directory: Path, arch: str) -> dict[str, Path]:
    found = [path for path in sorted(directory.rglob("*")) if path.is_file()]
    return {name: path for path in found if _is_grub_file(name := path.relative_to(directory).as_posix(), arch)}


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
    for name in INSTALLER_FILES:
        if MIRROR_FILE.format(arch=arch, name=name) not in sums:
            raise AssetError(f"{base}/SHA256SUMS has no entry for {MIRROR_FILE.format(arch=arch, name=name)}")
    prefix = MIRROR_FILE.format(arch=arch, name="")
    grub = [name.removeprefix(prefix) for name in sums if name.startswith(prefix)]
    names = [*INSTALLER_FILES, *(name for name in grub if _is_grub_file(name, arch))]
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for name in names:
            relative = MIRROR_FILE.format(arch=arch, name=name)
            path = Path(work) / name
            path.parent.mkdir(parents=True, exist_ok=True)
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
