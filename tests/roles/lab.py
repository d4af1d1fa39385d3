"""Role-test lab: Debian 12 machines booted by `systemd-nspawn --boot`, on a bridge in a network namespace.

A lab is one network namespace (with a bridge and the controller's address on it), one SSH key and a
state directory, all named after the lab (``nflab<pid><n>``). Its machines are overlay mounts over the
cached rootfs (never written to), each booted by systemd-nspawn inside the namespace with a static address
from systemd-networkd and root SSH with the lab's key. Molecule runs inside the namespace too, so
Ansible reaches the machines over plain SSH, and its create/destroy playbooks call this module's CLI.

Every wait is bounded. Teardown always runs and also clears what a killed earlier run left behind: a
lab whose owning process is gone is stale (found by name under STATE_ROOT).

CLI (run from the repository root, as root)::

    python -m tests.roles.lab molecule <scenario> [molecule command, default: test]
    python -m tests.roles.lab up <machine> <index>      # inside a lab: NF_LAB_DIR set
    python -m tests.roles.lab down <machine>
    python -m tests.roles.lab cleanup                   # stale labs only
    python -m tests.roles.lab rootfs | wheelhouse       # build the caches, print their paths
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests import netns
from tests.polling import wait_for
from tests.roles import rootfs, wheelhouse

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STATE_ROOT = Path("/var/lib/nodefoundry-lab")
PREFIX = "nflab"
SUBNET = "10.88.0"  # exists only inside each lab's own namespace
CONTROLLER = f"{SUBNET}.1"
BOOT_TIMEOUT = 180.0
SSH_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
APT_JOBS = ("apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service")
_HOSTNAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,29}$")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a reused pid), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, start: str | None = None) -> bool:
    now = _start_time(pid)
    return now is not None and (start is None or now == start)


def _wait(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Bounded polling; TimeoutError, which the boot and stop paths catch to add what they know."""
    return wait_for(predicate, timeout, what, interval, error=TimeoutError)


def _mounted(path: Path) -> bool:
    target = str(path)
    return any(line.split()[1] == target for line in Path("/proc/self/mounts").read_text().splitlines())


@dataclass
class Machine:
    """One booted container of a lab: its overlay, its nspawn process and its address."""

    lab: Lab
    name: str

    @property
    def dir(self) -> Path:
        return self.lab.dir / "machines" / self.name

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    def _read_pid(self, kind: str) -> int | None:
        try:
            return int((self.dir / f"{kind}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _ours(self, pid: int) -> bool:
        """True if ``pid`` still is the nspawn we started for this machine (its command line names our tree)."""
        try:
            return str(self.merged) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return False

    def up(self, index: int) -> dict[str, object]:
        """Mount, configure, boot; return the instance config Molecule needs."""
        if not 1 <= index <= 200:
            raise ValueError(f"machine index {index}: must be 1..200")
        if not _HOSTNAME.fullmatch(self.name):
            raise ValueError(f"machine name {self.name!r}: use 1-30 of a-z, 0-9, '-' (it becomes the hostname)")
        self.down()  # a leftover of the same name (e.g. a create after a failed create)
        address = f"{SUBNET}.{10 + index}"
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.lab.rootfs},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.merged)], check=True, timeout=30)
        self._configure(address)
        self._boot()
        state = self._wait_running()
        _wait(lambda: netns.run_in(self.lab.name, _ssh_banner, address), SSH_TIMEOUT, f"sshd on {address}")
        return {
            "instance": self.name,
            "address": address,
            "user": "root",
            "port": 22,
            "identity_file": str(self.lab.key),
            "system_state": state,
        }

    def _configure(self, address: str) -> None:
        root = self.merged
        ssh = root / "root" / ".ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "authorized_keys").write_text(self.lab.key.with_suffix(".pub").read_text())
        (ssh / "authorized_keys").chmod(0o600)
        network = root / "etc" / "systemd" / "network" / "10-lab.network"
        network.write_text(f"[Match]\nName=host0\n\n[Network]\nAddress={address}/24\nLinkLocalAddressing=no\n")
        (root / "etc" / "hostname").write_text(f"{self.name}\n")
        # The package lists in the rootfs are the ones its cached .debs came from: call them fresh, so
        # roles with update_cache + cache_valid_time install offline instead of trying a mirror.
        stamp = root / "var" / "lib" / "apt" / "periodic" / "update-success-stamp"
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
        # Debian's daily apt jobs would try the unreachable mirror and hold the dpkg lock meanwhile.
        for unit in APT_JOBS:
            mask = root / "etc" / "systemd" / "system" / unit
            mask.unlink(missing_ok=True)
            mask.symlink_to("/dev/null")

    def _boot(self) -> None:
        console = (self.dir / "console.log").open("ab")
        command = [
            *self.lab.enter(),
            "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
            f"--directory={self.merged}", f"--machine={self.name}",
            f"--network-bridge={self.lab.bridge}", "--console=read-only",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )
        (self.dir / "nspawn.pid").write_text(str(process.pid))

    def _children(self) -> list[int]:
        """The processes our nspawn forked: the container's PID 1 (or, early in the boot, its precursor)."""
        nspawn = self._read_pid("nspawn")
        if nspawn is None or not self._ours(nspawn):
            return []
        with suppress(FileNotFoundError):
            return [int(pid) for pid in Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()]
        return []

    def leader(self) -> int | None:
        """The container's PID 1 as the host sees it, once it runs systemd."""
        for child in self._children():
            with suppress(FileNotFoundError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        return None

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces), as root."""
        leader = self.leader()
        if leader is None:
            raise RuntimeError(f"machine {self.name} is not running; console:\n{self.console_tail()}")
        return subprocess.run(
            ["nsenter", "-t", str(leader), "-a", *args], capture_output=True, text=True, timeout=timeout
        )

    def console_tail(self, lines: int = 30) -> str:
        with suppress(FileNotFoundError):
            return "\n".join((self.dir / "console.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait_running(self) -> str:
        """Wait for `systemctl is-system-running` to settle; degraded is accepted but names the failed units."""

        def settled() -> str | None:
            nspawn = self._read_pid("nspawn")
            if nspawn is None or not _alive(nspawn):
                raise RuntimeError(f"nspawn for {self.name} exited; console:\n{self.console_tail()}")
            if self.leader() is None:
                return None
            state = self.run("systemctl", "is-system-running").stdout.strip()
            return state if state in ("running", "degraded") else None

        try:
            state = _wait(settled, BOOT_TIMEOUT, f"{self.name} to boot")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; console:\n{self.console_tail()}") from None
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", "--plain").stdout.strip()
            print(f"lab: {self.name} is degraded; failed units:\n{failed}", file=sys.stderr)
            state = f"degraded: {failed}"
        return state

    def down(self) -> None:
        """Stop the container (kill its PID 1: the kernel ends its whole pid namespace), unmount, delete."""
        nspawn = self._read_pid("nspawn")
        if nspawn is not None and self._ours(nspawn):
            for child in self._children():
                with suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            try:
                _wait(lambda: not _alive(nspawn), STOP_TIMEOUT, f"nspawn {nspawn} to exit", 0.2)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    os.kill(nspawn, signal.SIGKILL)
                _wait(lambda: not _alive(nspawn), STOP_TIMEOUT, f"nspawn {nspawn} to die", 0.2)
        if _mounted(self.merged):
            done = subprocess.run(["umount", str(self.merged)], capture_output=True, timeout=30)
            if done.returncode != 0:  # still busy: detach it, so the state can go
                subprocess.run(["umount", "--lazy", str(self.merged)], check=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=2) as conn:
            conn.settimeout(5)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@dataclass
class Lab:
    """A network namespace + bridge + SSH key + state directory, owned by one process."""

    name: str

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def bridge(self) -> str:
        return "br-lab"  # alone in the lab's namespace: no name clash with anything else

    @property
    def info(self) -> dict[str, object]:
        return json.loads((self.dir / "lab.json").read_text())

    @property
    def rootfs(self) -> Path:
        return Path(str(self.info["rootfs"]))

    @classmethod
    def create(cls, rootfs_dir: Path, wheelhouse_dir: Path) -> Lab:
        """A new lab owned by this process (after clearing stale ones)."""
        cleanup_stale()
        lab = cls(netns.unique(PREFIX))
        lab.dir.mkdir(parents=True)
        owner = os.getpid()
        info = {
            "owner": owner,
            "owner_start": _start_time(owner),
            "rootfs": str(rootfs_dir),
            "wheelhouse": str(wheelhouse_dir),
        }
        (lab.dir / "lab.json").write_text(json.dumps(info))
        try:
            netns.ip("netns", "add", lab.name)
            netns.ip("-n", lab.name, "link", "set", "lo", "up")
            netns.ip("-n", lab.name, "link", "add", lab.bridge, "type", "bridge")
            netns.ip("-n", lab.name, "addr", "add", f"{CONTROLLER}/24", "dev", lab.bridge)
            netns.ip("-n", lab.name, "link", "set", lab.bridge, "up")
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", lab.name, "-f", str(lab.key)],
                check=True,
                timeout=30,
            )
            collection = lab.dir / "collections" / "ansible_collections" / "nodefoundry" / "provision"
            collection.parent.mkdir(parents=True)
            collection.symlink_to(REPO)
        except BaseException:
            lab.destroy()
            raise
        return lab

    @classmethod
    def current(cls) -> Lab:
        """The lab a Molecule run belongs to (NF_LAB_DIR, set by `run_molecule`)."""
        directory = os.environ.get("NF_LAB_DIR")
        if not directory:
            raise SystemExit("NF_LAB_DIR is not set: run scenarios through `python -m tests.roles.lab molecule`")
        return cls(Path(directory).name)

    def enter(self) -> list[str]:
        """Command prefix that runs in the lab's namespace. Not `ip netns exec`: it remounts /sys,
        which hides the cgroup hierarchy systemd-nspawn needs."""
        return ["nsenter", f"--net=/run/netns/{self.name}"]

    def machines(self) -> list[Machine]:
        with suppress(FileNotFoundError):
            return [Machine(self, entry.name) for entry in (self.dir / "machines").iterdir()]
        return []

    def env(self) -> dict[str, str]:
        """The environment Molecule (and the Ansible it runs) gets."""
        info = self.info
        return {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "NF_LAB_DIR": str(self.dir),
            "NF_LAB_REPO": str(REPO),
            "NF_LAB_ROOTFS": str(info["rootfs"]),
            "NF_LAB_WHEELHOUSE": str(info["wheelhouse"]),
            "NF_LAB_CONTROLLER": CONTROLLER,
            "MOLECULE_EPHEMERAL_DIRECTORY": str(self.dir / "molecule"),
            "ANSIBLE_COLLECTIONS_PATH": str(self.dir / "collections"),
            # SSH ControlMaster sockets are files, not bound to a network namespace: in the default shared
            # directory, a lab's root@10.88.0.11 would reuse another lab's connection to its own 10.88.0.11.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.dir / "cp"),
            "ANSIBLE_FORCE_COLOR": "0",
            "NO_COLOR": "1",
            "PY_COLORS": "0",
        }

    def destroy(self) -> None:
        """Machines, namespace, directory: each step runs even if an earlier one failed."""
        errors: list[str] = []
        for machine in self.machines():
            try:
                machine.down()
            except Exception as exc:
                errors.append(f"{machine.name}: {exc}")
        if Path(f"/run/netns/{self.name}").exists():
            _delete_netns(self.name)
        if not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise RuntimeError(f"lab {self.name}: teardown failed: {'; '.join(errors)}")


def _delete_netns(name: str) -> None:
    """Kill what still runs in the lab's namespace (only our processes live there), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10).stdout
    for pid in pids.split():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def cleanup_stale() -> list[str]:
    """Tear down labs whose owner process is gone (a killed run); returns their names."""
    removed = []
    with suppress(FileNotFoundError):
        for entry in sorted(STATE_ROOT.iterdir()):
            if not entry.name.startswith(PREFIX):
                continue
            try:
                info = json.loads((entry / "lab.json").read_text())
                owned = _alive(int(info["owner"]), info.get("owner_start"))
            except (FileNotFoundError, ValueError, KeyError):
                owned = False
            if not owned:
                Lab(entry.name).destroy()
                removed.append(entry.name)
    return removed


def run_molecule(scenario: str, command: str = "test", timeout: float = 1500, stream: bool = False) -> tuple[int, str]:
    """`molecule <command> -s <scenario>` inside a fresh lab; (exit code, output). The lab is always destroyed."""
    lab = Lab.create(rootfs.ensure(), wheelhouse.ensure())
    try:
        args = [*lab.enter(), str(VENV_BIN / "molecule"), command, "-s", scenario]
        log = lab.dir / "molecule.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                args, cwd=REPO, env=lab.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
            output = _tee(process, out, timeout, stream)
        return process.returncode, output
    finally:
        lab.destroy()


def _tee(process: subprocess.Popen[str], out: object, timeout: float, stream: bool) -> str:
    """Collect (and optionally print) the output; kill the process group when ``timeout`` runs out."""
    fired: list[bool] = []

    def kill() -> None:
        fired.append(True)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    chunks = []
    assert process.stdout is not None
    for line in process.stdout:
        chunks.append(line)
        out.write(line)  # type: ignore[attr-defined]
        if stream:
            print(line, end="", flush=True)
    process.wait()
    timer.cancel()
    if fired:
        chunks.append(f"\nlab: molecule killed after {timeout:.0f} s\n")
    return "".join(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.roles.lab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    mol = sub.add_parser("molecule", help="run one scenario in a fresh lab")
    mol.add_argument("scenario")
    mol.add_argument("command", nargs="?", default="test")
    up = sub.add_parser("up", help="boot a machine of the current lab; prints its instance config (JSON)")
    up.add_argument("machine")
    up.add_argument("index", type=int)
    down = sub.add_parser("down", help="stop and delete a machine of the current lab")
    down.add_argument("machine")
    sub.add_parser("cleanup", help="tear down stale labs")
    sub.add_parser("rootfs", help="build (if needed) the cached rootfs; print its path")
    sub.add_parser("wheelhouse", help="download (if needed) the wheelhouse; print its path")
    args = parser.parse_args(argv)
    if args.action == "molecule":
        code, _ = run_molecule(args.scenario, args.command, stream=True)
        return code
    if args.action == "up":
        print(json.dumps(Machine(Lab.current(), args.machine).up(args.index)))
    elif args.action == "down":
        Machine(Lab.current(), args.machine).down()
    elif args.action == "cleanup":
        print("\n".join(cleanup_stale()))
    elif args.action == "rootfs":
        print(rootfs.ensure())
    elif args.action == "wheelhouse":
        print(wheelhouse.ensure())
    return 0


if __name__ == "__main__":
    sys.exit(main())
