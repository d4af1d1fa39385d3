"""TFTP: the boot binaries for PXE clients (iPXE, Debian's arm64 GRUB), read-only.

``packets`` is the wire format, ``tree`` the virtual file tree (shared with HTTP ``/tftp/``),
``server`` the sockets and threads.
"""

from __future__ import annotations

from .server import TftpServer, TftpService, preflight, tftp_enabled
from .tree import GRUB_CONFIG, AccessViolation, FileNotFound, TreeError, resolve

__all__ = [
    "GRUB_CONFIG",
    "AccessViolation",
    "FileNotFound",
    "TftpServer",
    "TftpService",
    "TreeError",
    "preflight",
    "resolve",
    "tftp_enabled",
]
