"""End-to-end lab: two network namespaces, dnsmasq (DHCP only), the real server, QEMU with real iPXE.

Layout (names and the /24 are unique per run, so parallel runs and leftovers never collide)::

    nfs-<id> (server)                       nfc-<id> (client)
    veth-s 10.X.Y.1/24  <──veth pair──>  veth-c ─┐
      dnsmasq (DHCP, no DNS)                       br0 ── tapN ── QEMU e1000 (iPXE ROM), one tap per VM
      nodefoundry-server 0.0.0.0:8080
      UDP syslog receiver :5514 (the installer's log_host)

Neither namespace has a default route and nothing is connected to the host's network, so no test
packet can leave: the installer's mirror is a closed port on the server address. Everything the
fixture starts runs in its own process group and is killed, and both namespaces are deleted, even
when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.observe import Stages
from tests.polling import wait_for

SERVER_BIN = Path(sys.executable).parent / "nodefoundry-server"
INSTALLER_DIR = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
E1000_ROM = Path("/usr/lib/ipxe/qemu/pxe-e1000.rom")
OVMF = Path("/usr/share/ovmf/OVMF.fd")
REQUIRED_BINARIES = ("ip", "dnsmasq", "qemu-system-x86_64", "timeout", "curl")
API_TOKEN = "nf_e2e-admin-token"
SERVER_PORT = 8080
MIRROR_PORT = 9  # closed: the installer fails at the mirror instead of leaving the namespace
SYSLOG_PORT = 5514  # the installer's remote syslog (d-i boot parameters log_host/log_port)
SYSLOG_RECEIVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = sock.recvfrom(65535)
    print(peer[0], data.decode("utf-8", "replace").replace("\\n", " "), flush=True)
"""

# gunicorn's default access log format: h l u [t] "r" s b "f" "a"
ACCESS_LINE = re.compile(
    r'^(?P<client>\S+) \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<target>\S+) [^"]*" (?P<status>\d{3}) '
)


DNSMASQ_LINE = re.compile(r"dnsmasq-dhcp\[\d+\]: (\d+) (.*)")


def _sbin_path() -> str:
    """Debian puts ip/dnsmasq in /usr/sbin; make sure lookups see it even from a user PATH."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in ("/usr/sbin", "/sbin", "/usr/bin", "/bin") if p not in parts])


def check_prerequisites() -> None:
    """Fail loudly (never skip) when something the lab needs is missing."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, tap devices)")
    path = _sbin_path()
    problems += [
        f"binary {name!r} not found (make setup)" for name in REQUIRED_BINARIES if not shutil.which(name, path=path)
    ]
    for needed in (SERVER_BIN, E1000_ROM, OVMF, INSTALLER_DIR / "linux", INSTALLER_DIR / "initrd.gz"):
        if not needed.exists():
            problems.append(f"{needed} missing (make setup installs ipxe-qemu, debian-installer-12-netboot-amd64)")
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun missing: QEMU needs it for the tap device")
    if problems:
        pytest.fail("e2e lab cannot start:\n  " + "\n  ".join(problems), pytrace=False)


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": _sbin_path()}
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {result.returncode}\n{result.stdout}{result.stderr}")
    return result


@dataclass
class TimedLog:
    """Lines of a process's output, each stamped with the (wall clock) time the test read it."""

    path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, stream: Any) -> threading.Thread:
        def pump() -> None:
            with self.path.open("a") as copy:
                for raw in iter(stream.readline, b""):
                    line = raw.decode(errors="replace").rstrip("\n")
                    stamp = time.time()
                    with self.lock:
                        self.lines.append((stamp, line))
                    copy.write(f"{stamp:.3f} {line}\n")
                    copy.flush()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.lines)


@dataclass(frozen=True)
class Request:
    at: float
    client: str
    method: str
    target: str
    status: int


class Lab:
    """The namespaces and processes of one test; ``close()`` undoes everything."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.run_id = f"{os.getpid() % 10000:04d}{random.randrange(16**4):04x}"
        self.server_ns = f"nfs-{self.run_id}"
        self.client_ns = f"nfc-{self.run_id}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.server_ip = f"{self.subnet}.1"
        self.base_url = f"http://{self.server_ip}:{SERVER_PORT}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.namespaces: list[str] = []
        self.access = TimedLog(workdir / "server.log")
        self.syslog = TimedLog(workdir / "installer-syslog.log")
        self.dnsmasq_log = workdir / "dnsmasq.log"
        self.lease_file = workdir / "dnsmasq.leases"
        self.env = {
            **os.environ,
            "PATH": _sbin_path(),
            "NF_HTTP_ADDR": f"0.0.0.0:{SERVER_PORT}",
            "NF_DB_PATH": str(workdir / "data" / "nodes.db"),
            "NF_ASSETS_DIR": str(workdir / "data" / "assets"),
            "NF_API_TOKEN": API_TOKEN,
            "NF_LOG_LEVEL": "debug",
            "NF_MIRROR_URL": f"{self.server_ip}:{MIRROR_PORT}",
            # Serial console for serial.log; remote syslog so the test can read the installer's own log.
            "NF_KERNEL_ARGS": f"console=ttyS0,115200n8 log_host={self.server_ip} log_port={SYSLOG_PORT}",
            "NF_HTTP_WORKERS": "2",
            "NF_HTTP_THREADS": "8",
        }
        for key in ("NF_SERVER_ADDR", "NF_DHCP_INTERFACE", "NF_AUTO_REGISTER", "NF_BOOT_POLL_INTERVAL"):
            self.env.pop(key, None)

    # -- set-up ---------------------------------------------------------------------------------

    def create_network(self) -> None:
        s, c = self.server_ns, self.client_ns
        for ns in (s, c):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", "veth-s", "netns", s, "type", "veth", "peer", "name", "veth-c", "netns", c)
        run("ip", "-n", s, "addr", "add", f"{self.server_ip}/24", "dev", "veth-s")
        run("ip", "-n", s, "link", "set", "veth-s", "up")
        run("ip", "-n", c, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", c, "link", "set", "veth-c", "master", "br0")
        for dev in ("veth-c", "br0"):
            run("ip", "-n", c, "link", "set", dev, "up")
        for ns in (s, c):  # the isolation this lab promises: no way out of the namespaces
            routes = run("ip", "-n", ns, "route", "show", "default").stdout.strip()
            assert not routes, f"namespace {ns} unexpectedly has a default route: {routes}"

    def add_tap(self, name: str) -> None:
        """A tap device on the client bridge, one per VM."""
        c = self.client_ns
        run("ip", "-n", c, "tuntap", "add", "dev", name, "mode", "tap")
        run("ip", "-n", c, "link", "set", name, "master", "br0")
        run("ip", "-n", c, "link", "set", name, "up")

    def start_syslog(self) -> None:
        process = self._spawn(
            "syslog",
            [sys.executable, "-u", "-c", SYSLOG_RECEIVER, self.server_ip, str(SYSLOG_PORT)],
            self.server_ns,
            None,
        )
        self.syslog.follow(process.stdout)

    def start_dnsmasq(self) -> None:
        self._spawn(
            "dnsmasq",
            [
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                "--interface=veth-s",
                "--except-interface=lo",
                "--user=root",
                "--group=root",
                f"--dhcp-range={self.subnet}.50,{self.subnet}.150,255.255.255.0,1h",
                f"--dhcp-option=6,{self.server_ip}",
                "--dhcp-userclass=set:ipxe,iPXE",
                f"--dhcp-boot=tag:ipxe,{self.base_url}/boot.ipxe",
                f"--dhcp-leasefile={self.lease_file}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                "--log-dhcp",
                f"--log-facility={self.dnsmasq_log}",
            ],
            self.server_ns,
            self.workdir / "dnsmasq.out",
        )
        self.wait_until(
            lambda: self.dnsmasq_log.exists() and "DHCP, IP range" in self.dnsmasq_log.read_text(),
            15,
            "dnsmasq to start",
            process="dnsmasq",
        )

    def use_nodefoundry_dhcp(self, **settings: str) -> None:
        """Let the server itself serve DHCP (and TFTP) on the lab segment instead of dnsmasq."""
        self.env.update(
            {
                "NF_DHCP_INTERFACE": "veth-s",
                "NF_DHCP_IP_POOL_START": f"{self.subnet}.50",
                "NF_DHCP_IP_POOL_END": f"{self.subnet}.150",
                "NF_DHCP_NETMASK": "255.255.255.0",
                "NF_DHCP_DNS": self.server_ip,
                "NF_DHCP_LEASE_TIME": "3600",
                **settings,
            }
        )

    def import_installer(self) -> None:
        """The real installer from the installed Debian package; run in the namespace so it cannot download."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.server_ns, str(SERVER_BIN), "assets", "import", "--arch", "amd64"],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"assets import failed:\n{result.stdout}{result.stderr}"

    def start_server(self) -> None:
        process = self._spawn("server", [str(SERVER_BIN), "run"], self.server_ns, None)
        self.access.follow(process.stdout)
        self.wait_until(
            lambda: self.curl("GET", "/health")[0] in (200, 503), 30, "the server to answer /health", process="server"
        )

    def _spawn(self, name: str, args: list[str], ns: str, output: Path | None) -> subprocess.Popen[bytes]:
        out: Any = output.open("ab") if output else subprocess.PIPE
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            cwd=self.workdir,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_qemu(self, mac: str, name: str, lifetime: int = 900, uefi: bool = False) -> Path:
        """Boot a VM from the network on its own tap; its serial console goes to ``<name>-serial.log``.

        BIOS: SeaBIOS runs the e1000's iPXE option ROM. UEFI: OVMF's own PXE client on a virtio NIC
        without an option ROM (it must TFTP an iPXE binary first)."""
        serial = self.workdir / f"{name}-serial.log"
        tap = f"tap{sum(1 for n in self.processes if n.startswith('qemu'))}"
        self.add_tap(tap)
        nic = f"virtio-net-pci,netdev=n0,mac={mac},romfile=" if uefi else f"e1000,netdev=n0,mac={mac}"
        firmware = ["-bios", str(OVMF)] if uefi else []
        self._spawn(
            name,
            [
                "timeout",
                "--signal=KILL",
                str(lifetime),
                "qemu-system-x86_64",
                "-m",
                "1024",
                "-display",
                "none",
                "-boot",
                "n",
                "-monitor",
                "none",
                "-serial",
                f"file:{serial}",
                "-netdev",
                f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device",
                nic,
                *firmware,
            ],
            self.client_ns,
            self.workdir / f"{name}.out",
        )
        return serial

    def dhcp_vendor_classes(self, mac: str) -> list[str]:
        """Vendor classes (option 60) of the DHCP transactions dnsmasq logged for ``mac`` (colon form):
        ``PXEClient:...`` is iPXE, ``d-i`` the installer's own DHCP client."""
        transactions: dict[str, dict[str, set[str]]] = {}
        text = self.dnsmasq_log.read_text(errors="replace") if self.dnsmasq_log.exists() else ""
        for xid, rest in DNSMASQ_LINE.findall(text):
            seen = transactions.setdefault(xid, {"macs": set(), "classes": set()})
            if rest.startswith("vendor class: "):
                seen["classes"].add(rest[len("vendor class: ") :].strip())
            elif rest.startswith("DHCP"):
                seen["macs"].update(word.lower() for word in rest.split() if word.count(":") == 5)
        return sorted({c for t in transactions.values() if mac.lower() in t["macs"] for c in t["classes"]})

    def leased_ip(self, mac: str) -> str | None:
        """The address dnsmasq leased to ``mac`` (colon form), from its lease file."""
        text = self.lease_file.read_text() if self.lease_file.exists() else ""
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1].lower() == mac.lower():
                return fields[2]
        return None

    # -- observation ----------------------------------------------------------------------------

    def curl(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Call the server from inside its namespace (the only place it can be reached)."""
        args = ["ip", "netns", "exec", self.server_ns, "curl", "-sS", "--max-time", "20", "-X", method]
        args += ["-H", f"Authorization: Bearer {API_TOKEN}", "-w", "\n%{http_code}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        result = run(*args, f"http://127.0.0.1:{SERVER_PORT}{path}", check=False, timeout=30)
        text, _, code = result.stdout.rpartition("\n")
        if result.returncode != 0 or not code.isdigit():
            server = self.processes["server"]
            if server.poll() is not None:
                raise AssertionError(
                    f"the server process exited (rc {server.returncode}) during the test; something outside the test"
                    f" may have signalled it - see the end of server.log\n{self.diagnostics()}"
                )
            return 0, result.stderr.strip()
        try:
            return int(code), json.loads(text) if text else None
        except ValueError:
            return int(code), text

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        status, payload = self.curl(method, path, body)
        assert status == expect, f"{method} {path}: expected {expect}, got {status}: {payload}"
        return payload

    def requests(self) -> list[Request]:
        """The access log as parsed requests (only those not made by the test itself from 127.0.0.1)."""
        found = []
        for stamp, line in self.access.snapshot():
            match = ACCESS_LINE.match(line)
            if match and match["client"] != "127.0.0.1":
                found.append(Request(stamp, match["client"], match["method"], match["target"], int(match["status"])))
        return found

    def wait_until(
        self, predicate: Callable[[], Any], deadline: float, what: str, process: str | None = None, step: float = 0.25
    ) -> Any:
        """The shared bounded poll, failing early if ``process`` exits; assertions carry the lab's logs."""

        def checked() -> Any:
            value = predicate()
            if not value and process and self.processes[process].poll() is not None:
                raise AssertionError(
                    f"{process} exited ({self.processes[process].returncode}) while waiting for "
                    f"{what}\n{self.diagnostics()}"
                )
            return value

        return wait_for(checked, deadline, what, interval=step, details=self.diagnostics)

    def diagnostics(self, lines: int = 25) -> str:
        """The end of each log, without the test's own API polling, for assertion messages."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.out")):
            text = path.read_text(errors="replace")
            if path.name.endswith("serial.log"):
                text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]", "", text).replace("\r", "\n")
            kept = [
                line.rstrip()
                for line in text.splitlines()
                if line.strip() and " 127.0.0.1 - - " not in line and "] [DEBUG] " not in line
            ][-lines:]
            parts.append(f"--- {path.name} (last {len(kept)} lines)\n" + "\n".join(kept))
        return "\n".join(parts)

    # -- tear-down ------------------------------------------------------------------------------

    def stop(self, name: str) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def close(self) -> None:
        for name in [n for n in self.processes if n.startswith("qemu")] + ["server", "dnsmasq", "syslog"]:
            with contextlib.suppress(Exception):
                self.stop(name)
        for ns in self.namespaces:
            # Anything still inside our own namespaces was started by this lab: end it by PID.
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def _lab(workdir: Path, nodefoundry_dhcp: dict[str, str] | None) -> Iterator[Lab]:
    check_prerequisites()
    lab = Lab(workdir)
    try:
        lab.create_network()
        if nodefoundry_dhcp is None:
            lab.start_dnsmasq()
        else:
            lab.use_nodefoundry_dhcp(**nodefoundry_dhcp)
        lab.start_syslog()
        lab.import_installer()
        lab.start_server()
        yield lab
    finally:
        lab.close()
        leftovers = [ns for ns in run("ip", "netns", "list", check=False).stdout.split() if lab.run_id in ns]
        assert not leftovers, f"namespaces left behind: {leftovers}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """dnsmasq serves DHCP: the boot path and the installer, independent of NodeFoundry's DHCP."""
    with _lab(tmp_path, None) as ready:
        yield ready


@pytest.fixture
def dhcp_lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """NodeFoundry serves DHCP and TFTP itself; settings from ``@pytest.mark.parametrize(..., indirect=True)``."""
    with _lab(tmp_path, getattr(request, "param", None) or {}) as ready:
        yield ready


@pytest.fixture
def stages(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stages]:
    recorder = Stages(tmp_path / "stages.txt")
    yield recorder
    text = recorder.write(f"== e2e {request.node.name} (artifacts: {tmp_path})")
    print("\n" + text)
    request.node.user_properties.append(("stages", text))
