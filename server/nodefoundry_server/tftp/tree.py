"""The virtual file tree that TFTP and HTTP ``/tftp/<path>`` both serve.

Lookup order for a request path (a leading ``/`` is dropped: clients send both forms):

1. ``<assets_dir>/tftp/<path>``: the operator's own files win;
2. GRUB's network config, generated (see ``GRUB_CONFIG``);
3. ``<tftp_ipxe_dir>/<path>``: Debian's iPXE binaries (undionly.kpxe, ipxe.efi, snponly.efi);
4. ``debian-installer/<path>`` from ``<assets_dir>/debian-installer/``: installer kernels, initrds and
   the arm64 GRUB netboot files that ``assets import`` copies.

A ``..`` segment is an access violation; nothing else can leave a root, since the remaining segments
are joined below it. Symbolic links inside a root are followed, as tftpd-hpa does: Debian's
``/usr/lib/ipxe/ipxe.efi`` is a link to ``/boot/ipxe.efi``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import boot
from ..config import Config
from .packets import ErrorCode

# Debian's netboot grubaa64.efi has the prefix /debian-installer/arm64/grub built in; its embedded config
# sources $prefix/arm64-efi/grub.cfg if ``[ -e ]`` finds it, else $prefix/grub.cfg. On a network device
# ``-e`` is always false (GRUB 2.06 lists no directories over TFTP or HTTP), so this is the one it loads.
GRUB_CONFIG = "debian-installer/arm64/grub/grub.cfg"


class TreeError(Exception):
    """A path the tree refuses; ``code`` is the TFTP error code to answer with."""

    code = ErrorCode.NOT_DEFINED


class FileNotFound(TreeError):
    code = ErrorCode.FILE_NOT_FOUND


class AccessViolation(TreeError):
    code = ErrorCode.ACCESS_VIOLATION


def segments(path: str) -> list[str]:
    """The path's segments without empty and ``.`` ones; refuse ``..`` and control characters."""
    if any(ord(char) < 32 or ord(char) == 127 for char in path):
        raise AccessViolation("control character in file name")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise AccessViolation("'..' in file name")
    if not parts:
        raise FileNotFound("empty file name")
    return parts


def _file_below(root: Path, parts: list[str]) -> Path | None:
    candidate = root.joinpath(*parts)
    try:
        return candidate if candidate.is_file() else None
    except OSError:  # a name too long, a directory we may not search: not there for the client
        return None


def resolve(config: Config, path: str, http_base: Callable[[], str]) -> Path | bytes:
    """The file to send for ``path``, or the generated content; raise FileNotFound or AccessViolation.

    ``http_base`` gives ``http://host:port`` of this server as the client reaches it; it is asked
    only when a generated file needs it.
    """
    parts = segments(path)
    assets = Path(config.assets_dir)
    found = _file_below(assets / "tftp", parts)
    if found:
        return found
    relative = "/".join(parts)
    if relative == GRUB_CONFIG:
        return boot.grub_netboot_script(boot.Urls(http_base()), config.boot_poll_interval).encode()
    found = _file_below(Path(config.tftp_ipxe_dir), parts)
    if found:
        return found
    if parts[0] == "debian-installer":
        found = _file_below(assets, parts)
        if found:
            return found
    raise FileNotFound(f"{relative} not found")
