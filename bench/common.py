"""What the benchmarks share: process and HTTP helpers, CPU accounting and the markdown table they print.

The CPU accounting splits the machine's busy time during a measured stretch into the processes a benchmark
started (process trees, this script and its reaped children) and everyone else's, so a figure taken on a
loaded machine says so (``DISTURBED_SHARE``). Benchmarks import it as ``common`` (their directory is on
``sys.path`` when run as ``python bench/<name>.py``).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CPUS = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine


# --- helpers ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stamp(moment: datetime) -> str:
    """The store's timestamp format: RFC 3339, milliseconds, Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def mac_for(index: int) -> str:
    """Locally administered, unique, 12 lower-case hex digits (the store's form)."""
    return f"02{index:010x}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def log(message: str) -> None:
    """Progress on stderr, prefixed with the benchmark's name; stdout carries only the results."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def stop_process(process: subprocess.Popen[bytes] | None, name: str, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop on signal {sig}; killing it")
        process.kill()
        process.wait()


def wait_http(url: str, process: subprocess.Popen[bytes], name: str, logfile: Path, attempts: int = 300) -> None:
    for _ in range(attempts):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{logfile.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                response.read()
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url}:\n{logfile.read_text(errors='replace')}")


def http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- CPU accounting ---------------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds all CPUs spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may contain spaces): state is [0]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_of(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def process_cpu_seconds(pid: int) -> float:
    """CPU-seconds used so far by the one process ``pid`` (not its children)."""
    return _cpu_of(_stat_fields(pid))


def _process_table() -> tuple[dict[int, int], dict[int, float]]:
    """(parent of each pid, CPU-seconds used so far by each pid) for all live processes."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry.name)
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        used[pid] = _cpu_of(fields)
    return parents, used


def _descendants(roots: list[int], parents: dict[int, int]) -> set[int]:
    members = {pid for pid in roots if pid in parents}
    while found := {pid for pid, ppid in parents.items() if ppid in members} - members:
        members |= found
    return members


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU-seconds used so far by the live processes ``roots`` and all their descendants."""
    parents, used = _process_table()
    return sum(used[pid] for pid in _descendants(roots, parents))


def child_pids(pid: int) -> list[int]:
    parents, _ = _process_table()
    return [child for child, parent in parents.items() if parent == pid]


def own_cpu_seconds() -> float:
    """This process and its reaped children (wrk, after subprocess.run returns)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class CpuUse:
    seconds: float = 0.0
    server: float = 0.0
    nginx: float = 0.0
    client: float = 0.0
    other: float = 0.0

    def other_share(self, cpus: int) -> float:
        return self.other / self.seconds / cpus if self.seconds else 0.0

    def text(self, cpus: int) -> str:
        def share(value: float) -> str:
            return f"{value / self.seconds / cpus:.0%}" if self.seconds else "?"

        parts = [f"server {share(self.server)}"]
        if self.nginx > 0.05:
            parts.append(f"nginx {share(self.nginx)}")
        parts += [f"wrk+bench {share(self.client)}", f"**other processes {share(self.other)}**"]
        return f"CPU use over {cpus} CPUs: " + ", ".join(parts)


@contextmanager
def cpu_meter(into: CpuUse, server_pid: int, nginx_pid: int | None = None) -> Iterator[None]:
    """Split the machine's busy time during the block into ours (server, nginx, client) and everyone else's."""
    nginx_roots = [nginx_pid] if nginx_pid is not None else []
    began = time.monotonic()
    busy, server, nginx, own = (
        machine_busy_seconds(),
        tree_cpu_seconds([server_pid]),
        tree_cpu_seconds(nginx_roots),
        own_cpu_seconds(),
    )
    yield
    into.seconds = time.monotonic() - began
    into.server = tree_cpu_seconds([server_pid]) - server
    into.nginx = tree_cpu_seconds(nginx_roots) - nginx
    into.client = own_cpu_seconds() - own
    into.other = max(0.0, machine_busy_seconds() - busy - into.server - into.nginx - into.client)


DISTURBED_SHARE = 0.10


def check_disturbed(label: str, cpu: CpuUse, notes: list[str]) -> None:
    """Say so when other processes took a noticeable share of the machine during a figure."""
    share = cpu.other_share(CPUS)
    if share > DISTURBED_SHARE:
        notes.append(
            f"**warning**: other processes used {share:.0%} of the machine during {label}; this figure understates"
            " what the server does on a machine of its own"
        )


# --- results ------------------------------------------------------------------------------------------------------


def markdown_table(head: list[str], rows: Iterable[list[str]]) -> str:
    """The table a benchmark prints (docs/performance.md takes it as it is)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
