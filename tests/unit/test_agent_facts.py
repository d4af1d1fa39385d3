"""Facts from (fake) /proc, /sys and os-release files, including the arm64 shapes of /proc/cpuinfo."""

from __future__ import annotations

import json
from pathlib import Path

from nodefoundry_agent import facts

ARM64_CPUINFO = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU implementer\t: 0x41\nHardware\t: Rockchip RK3588\n"
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\n"


def test_os_release(tmp_path: Path):
    release = tmp_path / "os-release"
    release.write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
    )
    assert facts.os_release((tmp_path / "missing", release)) == {
        "id": "debian",
        "version_id": "12",
        "codename": "bookworm",
        "name": "Debian GNU/Linux 12 (bookworm)",
    }
    assert facts.os_release((tmp_path / "missing",)) == {}


def test_cpu_model_on_x86_and_arm64(tmp_path: Path):
    (tmp_path / "cpuinfo").write_text(X86_CPUINFO)
    assert facts.cpu_model(tmp_path) == "AMD EPYC 7B13"
    (tmp_path / "cpuinfo").write_text(ARM64_CPUINFO)
    assert facts.cpu_model(tmp_path) == "Rockchip RK3588"
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    assert facts.cpu_model(tmp_path) is None


def test_memory_and_uptime(tmp_path: Path):
    (tmp_path / "meminfo").write_text("\nMemTotal:       16303304 kB\nMemFree:         1000 kB\n")
    (tmp_path / "uptime").write_text("7744.52 15000.10\n")
    assert facts.memory_bytes(tmp_path) == 16303304 * 1024
    assert facts.uptime_seconds(tmp_path) == 7744
    assert facts.memory_bytes(tmp_path / "missing") is None and facts.uptime_seconds(tmp_path / "missing") == 0


def test_disks_are_whole_devices_only(tmp_path: Path):
    for name, sectors, rotational in (("nvme0n1", "1000215216", "0"), ("sda", "3907029168", "1")):
        (tmp_path / name / "device").mkdir(parents=True)
        (tmp_path / name / "queue").mkdir()
        (tmp_path / name / "size").write_text(sectors + "\n")
        (tmp_path / name / "queue" / "rotational").write_text(rotational + "\n")
        (tmp_path / name / "removable").write_text("0\n")
    (tmp_path / "sda" / "device" / "model").write_text("WDC WD20EFRX    \n")
    for virtual in ("loop0", "dm-0", "zram0"):
        (tmp_path / virtual).mkdir()
        (tmp_path / virtual / "size").write_text("100\n")
    assert facts.disks(tmp_path) == [
        {"name": "nvme0n1", "size_bytes": 1000215216 * 512, "model": None, "rotational": False, "removable": False},
        {
            "name": "sda",
            "size_bytes": 3907029168 * 512,
            "model": "WDC WD20EFRX",
            "rotational": True,
            "removable": False,
        },
    ]


def test_gather_on_this_machine_is_json_and_within_the_facts_limit(tmp_path: Path):
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("6d579d3f-19a4-4b0b-8cd2-95d2d659f3bf\n")
    gathered = facts.gather("aabbccddeeff", boot_id)
    assert gathered["boot_id"] == "6d579d3f-19a4-4b0b-8cd2-95d2d659f3bf" and gathered["mac"] == "aabbccddeeff"
    assert gathered["arch"] in ("amd64", "arm64") and gathered["cpu"]["count"] >= 1
    assert len(json.dumps(gathered)) < 16384
