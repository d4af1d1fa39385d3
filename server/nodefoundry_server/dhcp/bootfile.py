"""Which boot file a network-booting client gets, decided from its own request.

The original chose the file from option 93 of the *reply* (BIOS clients got ipxe.efi) and never
recognised iPXE, so iPXE chain-loaded itself forever. Here the client's option 93 picks the loader
and a client that already runs iPXE (user class "iPXE" or option 175) gets the HTTP boot script.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .codec import Request

BIOS, EFI_IA32, EFI_BC, EFI_X64, EFI_ARM64, HTTP_IA32, HTTP_X64, HTTP_ARM64 = 0, 6, 7, 9, 11, 15, 16, 19
ARM64_IPXE = "arm64/ipxe.efi"
ARM64_GRUB = "debian-installer/arm64/grubaa64.efi"  # Debian 12 ships no arm64 iPXE; its netboot GRUB loads d-i
HTTP_ARCHES = {HTTP_X64: EFI_X64, HTTP_ARM64: EFI_ARM64}  # HTTP boot arch -> the TFTP arch whose loader it gets
DEBIAN_ARCH = {BIOS: "amd64", EFI_IA32: "i386", EFI_BC: "amd64", EFI_X64: "amd64", HTTP_IA32: "i386"}
DEBIAN_ARCH |= {HTTP_X64: "amd64", EFI_ARM64: "arm64", HTTP_ARM64: "arm64"}


@dataclass(frozen=True)
class BootChoice:
    """``file`` is a TFTP path or an http:// URL; ``http`` marks UEFI HTTP boot (option 60 HTTPClient)."""

    file: str
    http: bool = False


@dataclass(frozen=True)
class BootFiles:
    """The table: built-in defaults, overridden per option 93 number by ``dhcp_boot_files``."""

    overrides: dict[int, str]
    efi_loader: str
    assets_dir: str
    http_base: str  # http://host[:port] of this server as nodes reach it

    def loader(self, arch: int) -> str | None:
        if arch in self.overrides:
            return self.overrides[arch]
        if arch == BIOS:
            return "undionly.kpxe"
        if arch in (EFI_IA32, EFI_BC, EFI_X64):
            return self.efi_loader
        if arch == EFI_ARM64:
            return ARM64_IPXE if (Path(self.assets_dir) / "tftp" / ARM64_IPXE).is_file() else ARM64_GRUB
        return None

    def choose(self, request: Request) -> BootChoice | None:
        """None for a client that does not network-boot or whose architecture has no loader."""
        if is_ipxe(request):
            return BootChoice(f"{self.http_base}/boot.ipxe")
        arch = client_arch(request)
        if arch is None:
            return None
        if arch in HTTP_ARCHES:
            name = self.overrides.get(arch) or self.loader(HTTP_ARCHES[arch])
            if name == ARM64_GRUB:
                # Started by HTTP boot, Debian's GRUB gets no network settings and stops at its prompt; no
                # answer lets the firmware fall back to PXE (arch 11), where GRUB works.
                return None
            return BootChoice(f"{self.http_base}/tftp/{name}", http=True) if name else None
        name = self.loader(arch)
        return BootChoice(name) if name else None


def is_ipxe(request: Request) -> bool:
    return b"iPXE" in request.user_class or request.ipxe_encapsulated


def is_pxe(request: Request) -> bool:
    return request.vendor_class.startswith(b"PXEClient")


def is_http_boot(request: Request) -> bool:
    return request.vendor_class.startswith(b"HTTPClient")


def is_network_boot(request: Request) -> bool:
    return is_pxe(request) or is_http_boot(request) or is_ipxe(request)


def client_arch(request: Request) -> int | None:
    """Option 93, else the "Arch:NNNNN" of a PXE/HTTP vendor class (older ROMs send only that)."""
    if request.client_arch is not None:
        return request.client_arch
    parts = request.vendor_class.split(b":")
    if len(parts) >= 3 and parts[1] == b"Arch" and parts[2].isdigit():
        return int(parts[2])
    return None
