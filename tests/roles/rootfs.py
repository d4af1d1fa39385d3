"""The Debian 12 tree the lab machines boot: built once by mmdebstrap, cached by the digest of its recipe.

Machines never write into it (they run on an overlay over it). Its apt cache carries the packages the
roles install, downloaded but not installed, with the package lists they came from: the machines have
no network to a mirror, so `apt` installs them offline. A build goes to a temporary directory that is
renamed into place only when complete, so a killed build never leaves a half tree behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path("/var/cache/nodefoundry/rootfs")
SUITE = "bookworm"
INCLUDE = (
    "systemd,systemd-sysv,dbus,python3,python3-apt,openssh-server,iproute2,ca-certificates,udev,netbase,procps,curl,acl"
)
# Installed by the roles (server, mosquitto, agent) and the scenarios' verify steps, offline.
DOWNLOAD_ONLY = (
    "mosquitto",
    "mosquitto-clients",
    "python3-venv",
    "python3-pip",
    "python3-paho-mqtt",
    "ipxe",
    "debian-installer-12-netboot-amd64",
    "debian-installer-12-netboot-arm64",
    "openssl",
)
CUSTOMIZE = (
    f'chroot "$1" apt-get install -y --download-only {" ".join(DOWNLOAD_ONLY)}',
    # The machines get their static address from a .network file the lab writes per machine.
    'chroot "$1" systemctl enable systemd-networkd',
)
BUILD_TIMEOUT = 1800


def recipe(target: str) -> list[str]:
    """The mmdebstrap command line that builds the tree into ``target``."""
    return [
        "mmdebstrap",
        "--variant=apt",
        "--skip=cleanup/apt/lists,cleanup/apt/cache",
        f"--include={INCLUDE}",
        *(f"--customize-hook={hook}" for hook in CUSTOMIZE),
        SUITE,
        target,
    ]


def path() -> Path:
    """Where the tree for the current recipe lives (whether or not it is built yet)."""
    digest = hashlib.sha256(json.dumps(recipe("TARGET")).encode()).hexdigest()[:12]
    return CACHE / f"{SUITE}-{digest}"


def _lock(handle: object, timeout: float) -> None:
    """Wait (bounded) for another process's build to finish."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"another rootfs build held {CACHE / '.lock'} for {timeout:.0f} s") from None
            time.sleep(1)


def ensure(log: Path | None = None) -> Path:
    """The cached tree, built first if missing; concurrent callers wait for one build (flock)."""
    final = path()
    if final.is_dir():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        _lock(lock, BUILD_TIMEOUT + 60)
        if final.is_dir():
            return final
        temp = CACHE / f".build-{final.name}"
        shutil.rmtree(temp, ignore_errors=True)  # leftover of a killed build
        started = time.monotonic()
        result = subprocess.run(
            recipe(str(temp)), capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL
        )
        if log is not None:
            log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            shutil.rmtree(temp, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
        temp.rename(final)
        print(f"rootfs: built {final} in {time.monotonic() - started:.0f} s", flush=True)
    return final
