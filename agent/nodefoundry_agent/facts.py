"""What the node is: OS, kernel, CPU, memory, disks, interfaces, boot id (the retained ``facts`` message).

Every probe reads a plain file and yields None (or an empty list) when the file is missing, so a board
with an unusual kernel still reports everything else. Lists are capped to keep the message small.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

from nodefoundry_agent import __version__, netinfo

MAX_ITEMS = 32
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386", "riscv64": "riscv64"}
OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def boot_id(path: Path) -> str | None:
    """The kernel's id of the current boot: it changes on every reboot and nowhere else."""
    return read_text(path) or None


def uptime_seconds(proc: Path = Path("/proc")) -> int:
    try:
        return int(float((read_text(proc / "uptime") or "0").split()[0]))
    except (ValueError, IndexError):
        return 0


def os_release(paths: tuple[Path, ...] = OS_RELEASE) -> dict[str, str]:
    for path in paths:
        text = read_text(path)
        if text is None:
            continue
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        wanted = {"ID": "id", "VERSION_ID": "version_id", "VERSION_CODENAME": "codename", "PRETTY_NAME": "name"}
        return {name: fields[key].strip("\"'") for key, name in wanted.items() if key in fields}
    return {}


def cpu_model(proc: Path = Path("/proc")) -> str | None:
    """x86 names the CPU in ``model name``; arm64 kernels print no model, so fall back to ``Hardware``."""
    fields: dict[str, str] = {}
    for line in (read_text(proc / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields.get("model name") or fields.get("hardware") or fields.get("processor name") or None


def memory_bytes(proc: Path = Path("/proc")) -> int | None:
    for line in (read_text(proc / "meminfo") or "").splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[0] == "MemTotal:" and fields[1].isdigit():
            return int(fields[1]) * 1024
    return None


def disks(sys_block: Path = Path("/sys/block")) -> list[dict[str, Any]]:
    """Whole disks backed by a device; partitions, loop, RAM and device-mapper devices are left out."""
    try:
        names = sorted(entry.name for entry in sys_block.iterdir() if (entry / "device").exists())
    except OSError:
        return []
    found = []
    for name in names[:MAX_ITEMS]:
        size = read_text(sys_block / name / "size")
        found.append(
            {
                "name": name,
                "size_bytes": int(size) * 512 if size and size.isdigit() else None,
                "model": read_text(sys_block / name / "device" / "model"),
                "rotational": read_text(sys_block / name / "queue" / "rotational") == "1",
                "removable": read_text(sys_block / name / "removable") == "1",
            }
        )
    return found


def interfaces(sys_net: Path = netinfo.SYS_NET, proc_net: Path = netinfo.PROC_NET) -> list[dict[str, Any]]:
    try:
        names = sorted(entry.name for entry in sys_net.iterdir() if entry.name != "lo")
    except OSError:
        return []
    ipv6 = netinfo.ipv6_addresses(proc_net)
    return [
        {
            "name": name,
            "mac": netinfo.interface_mac(name, sys_net),
            "physical": netinfo.is_physical(name, sys_net),
            "state": read_text(sys_net / name / "operstate"),
            "ipv4": [address] if (address := netinfo.ipv4_address(name)) else [],
            "ipv6": ipv6.get(name, [])[:MAX_ITEMS],
        }
        for name in names[:MAX_ITEMS]
    ]


def gather(mac: str, boot_id_file: Path) -> dict[str, Any]:
    """All facts as one JSON-ready dict."""
    machine = platform.machine()
    return {
        "mac": mac,
        "hostname": socket.gethostname(),
        "os": os_release(),
        "kernel": platform.release(),
        "arch": DEBIAN_ARCH.get(machine, machine),
        "machine": machine,
        "board": (read_text(Path("/sys/firmware/devicetree/base/model")) or "").rstrip("\0") or None,
        "cpu": {"model": cpu_model(), "count": os.cpu_count()},
        "memory_bytes": memory_bytes(),
        "disks": disks(),
        "interfaces": interfaces(),
        "boot_id": boot_id(boot_id_file),
        "machine_id": read_text(Path("/etc/machine-id")),
        "agent_version": __version__,
        "python": platform.python_version(),
    }
