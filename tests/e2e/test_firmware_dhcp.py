"""Real firmware against NodeFoundry's own DHCP and TFTP (no dnsmasq in the lab).

* BIOS: SeaBIOS runs QEMU's e1000 iPXE ROM. Its DHCP already says "iPXE" (option 77), so the server must hand it
  the HTTP boot script URL (not a boot file to chain-load forever); it registers through DHCP, waits in the poll
  loop, and after an install trigger fetches kernel and initrd; the installer's own DHCP client then gets the
  same address from the server and fetches its preseed from it.
* UEFI: OVMF's own PXE client (virtio NIC, no option ROM) asks with option 93 = 7. The server hands it an
  iPXE EFI binary over TFTP (``ipxe.efi`` or ``snponly.efi``); that iPXE asks DHCP again, now as iPXE, gets the
  boot script URL and lands in the wait loop.

Which stages each firmware reached is printed (``pytest -s``) and kept in ``stages.txt``, also on failure.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.observe import Stages, event_time, events, random_macs, requests_for, wait_request

if TYPE_CHECKING:
    from tests.e2e.conftest import Lab

POLL_INTERVAL = 5
BIOS_FIRST_BOOT_DEADLINE = 120  # VM start -> /boot.ipxe (SeaBIOS + iPXE ROM under TCG)
UEFI_FIRST_BOOT_DEADLINE = 240  # VM start -> /boot.ipxe (OVMF start, PXE, TFTP of iPXE, iPXE DHCP)
KERNEL_DEADLINE = 120  # install trigger -> kernel and initrd
INSTALLER_DEADLINE = 300  # initrd -> preseed (kernel boot, hw-detect, the installer's DHCP)


def _registered_by_dhcp(lab: Lab, mac: str) -> dict[str, Any]:
    first = events(lab, mac)[0]
    assert (first["source"], first["kind"], first["new"]) == ("dhcp", "registered", "discovered"), first
    return first


def _dhcp_lease_of(lab: Lab, mac: str) -> str:
    node = lab.api("GET", f"/api/v1/nodes/{mac}")
    assert node.get("ip"), f"the server recorded no leased address for {mac}: {node}"
    return node["ip"]


def test_bios_ipxe_rom_with_nodefoundry_dhcp(dhcp_lab: Lab, stages: Stages) -> None:
    lab = dhcp_lab
    ((qemu_mac, mac),) = random_macs(1)
    stages.start = time.time()
    lab.start_qemu(qemu_mac, "qemu-bios")
    stages.reached("[bios] VM started", stages.start, "SeaBIOS, e1000 with its iPXE ROM")
    own = wait_request(
        lab, rf"^/boot\.ipxe\?mac={mac}&arch=(x86_64|i386)&platform=pcbios$", BIOS_FIRST_BOOT_DEADLINE,
        "iPXE (DHCP from NodeFoundry) to fetch /boot.ipxe?mac=...",
    )  # fmt: skip
    registered = _registered_by_dhcp(lab, mac)
    facts = (registered.get("detail") or {}).get("facts", {}).get("dhcp", {})
    stages.reached("[bios] registered by DHCP", event_time(registered), f"option 93 {facts.get('client_arch')}, "
                   f"user class {facts.get('user_class')!r}")  # fmt: skip
    entry = requests_for(lab, r"^/boot\.ipxe$", client=own.client)
    assert entry, f"iPXE did not fetch the boot script URL from the DHCP reply (client {own.client})"
    stages.reached("[bios] DHCP -> GET /boot.ipxe", entry[0].at, f"from {own.client}")
    assert _dhcp_lease_of(lab, mac) == own.client
    assert lab.api("GET", f"/api/v1/nodes/{mac}")["arch"] == "amd64"

    own_script = rf"^/boot/{mac}/boot\.ipxe$"
    second = wait_request(lab, own_script, 3 * POLL_INTERVAL + 30, "two wait-loop polls", count=2)
    stages.reached("[bios] wait loop polled 2x", second.at)

    put_at = stages.reached("[bios] PUT action=install")
    lab.api("PUT", f"/api/v1/nodes/{mac}", {"action": "install"})
    kernel = wait_request(lab, r"^/assets/debian-installer/amd64/linux$", KERNEL_DEADLINE, "the kernel", since=put_at)
    stages.reached("[bios] kernel fetched", kernel.at, f"+{kernel.at - put_at:.1f} s after PUT")
    initrd = wait_request(lab, r"/initrd\.gz$", KERNEL_DEADLINE, "the initrd", since=put_at)
    stages.reached("[bios] initrd fetched", initrd.at, f"+{initrd.at - put_at:.1f} s after PUT")

    preseed = wait_request(
        lab, rf"^/preseed/{mac}/preseed\.cfg\?token=", INSTALLER_DEADLINE, "the installer's preseed", since=initrd.at
    )
    stages.reached("[bios] installer DHCP -> preseed", preseed.at, f"from {preseed.client}")
    assert preseed.client == own.client, f"the installer got {preseed.client}, iPXE had {own.client}: lease not kept"


@pytest.mark.parametrize(
    "dhcp_lab", [{"NF_DHCP_EFI_LOADER": "ipxe.efi"}, {"NF_DHCP_EFI_LOADER": "snponly.efi"}], indirect=True,
    ids=["ipxe.efi", "snponly.efi"],
)  # fmt: skip
def test_uefi_pxe_tftp_ipxe_with_nodefoundry_dhcp(dhcp_lab: Lab, stages: Stages) -> None:
    lab = dhcp_lab
    loader = lab.env["NF_DHCP_EFI_LOADER"]
    ((qemu_mac, mac),) = random_macs(1)
    stages.start = time.time()
    lab.start_qemu(qemu_mac, "qemu-uefi", uefi=True)
    stages.reached("[uefi] VM started", stages.start, f"OVMF, virtio-net without ROM, loader {loader}")
    registered = lab.wait_until(
        lambda: lab.curl("GET", f"/api/v1/nodes/{mac}")[0] == 200 and _registered_by_dhcp(lab, mac),
        UEFI_FIRST_BOOT_DEADLINE, "OVMF's PXE DHCP to register the node", "server", 1.0,
    )  # fmt: skip
    stages.reached("[uefi] PXE DHCP registered the node", event_time(registered))
    node = lab.api("GET", f"/api/v1/nodes/{mac}")
    assert node["arch"] == "amd64" and node["facts"]["dhcp"]["client_arch"] == 7, node

    own = wait_request(
        lab, rf"^/boot\.ipxe\?mac={mac}&arch=x86_64&platform=efi$", UEFI_FIRST_BOOT_DEADLINE,
        f"iPXE ({loader}, fetched over TFTP) to fetch its boot script",
    )  # fmt: skip
    stages.reached(f"[uefi] TFTP {loader} -> iPXE -> /boot.ipxe", own.at, own.target)
    second = wait_request(lab, rf"^/boot/{mac}/boot\.ipxe$", 3 * POLL_INTERVAL + 30, "two wait-loop polls", count=2)
    stages.reached("[uefi] wait loop polled 2x", second.at)
    assert lab.api("GET", f"/api/v1/nodes/{mac}")["status"] == "discovered"
