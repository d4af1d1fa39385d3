"""HTTP benchmark of the server core: boot scripts, node list, bulk install, installer downloads.

Run: ``.venv/bin/python bench/http_bench.py [--nodes 10000] [--quick]``

Starts a real ``nodefoundry-server run`` (gunicorn gthread) on a free loopback port with a
temporary database seeded with ``--nodes`` discovered nodes, and an nginx of its own (temporary
config, sendfile on) as the reference for large downloads. Load comes from ``wrk`` (C, epoll),
so the client does not bottleneck on Python. Prints a markdown table; everything started is
stopped and the temporary directory removed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import (
    CPUS,
    CpuUse,
    check_disturbed,
    child_pids,
    cpu_meter,
    cpu_model,
    free_port,
    http,
    log,
    mac_for,
    markdown_table,
    stamp,
    stop_process,
    wait_http,
)

BIN = Path(sys.executable).parent
SERVER_BIN = BIN / "nodefoundry-server"
INSTALLER_DIR = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
INITRD_URL_PATH = "/assets/debian-installer/amd64/initrd.gz"
MB = 1_000_000  # throughput is reported in decimal MB/s

# Targets.
BOOT_RPS_MIN = 2000.0
BOOT_P99_MAX_MS = 50.0
LIST_MAX_MS = 300.0
BULK_MAX_MS = 1000.0
INITRD_RATIO_MIN = 0.50


# --- wrk ----------------------------------------------------------------------------------------------------------

# wrk's done() hook prints exact totals (wrk's own text output rounds and uses binary units).
WRK_DONE = textwrap.dedent(
    """
    function done(summary, latency, requests)
       local e = summary.errors
       io.write(string.format(
          "NFBENCH requests=%d bytes=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d"
          .. " connect=%d read=%d write=%d status=%d timeout=%d\\n",
          summary.requests, summary.bytes, summary.duration,
          latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
          e.connect, e.read, e.write, e.status, e.timeout))
    end
    """
)

# Each wrk thread seeds its own generator and picks a random seeded MAC per request.
WRK_RANDOM_MAC = textwrap.dedent(
    """
    local next_id = 1
    function setup(thread)
       thread:set("thread_id", next_id)
       next_id = next_id + 1
    end
    function init(args)
       math.randomseed(os.time() * 1000 + thread_id)
    end
    function request()
       return wrk.format("GET", "/boot/" .. macs[math.random(#macs)] .. "/boot.ipxe")
    end
    """
)


@dataclass
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    command: str
    cpu: CpuUse

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB

    def error_text(self) -> str:
        bad = {key: value for key, value in self.errors.items() if value}
        return ", ".join(f"{key} {value}" for key, value in bad.items()) or "none"


def run_wrk(
    url: str,
    script: Path,
    connections: int,
    seconds: int,
    timeout: str,
    latency: bool,
    pids: tuple[int, int],
) -> WrkResult:
    """Run wrk with 2 threads; ``pids`` (server, nginx) are the process trees whose CPU use is accounted."""
    threads = 2
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout}", "-s", str(script)]
    if latency:
        args.append("--latency")
    args.append(url)
    shown = " ".join(a if a != str(script) else script.name for a in args)
    log(f"running: {shown}")
    cpu = CpuUse()
    with cpu_meter(cpu, *pids):
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    match = re.search(r"^NFBENCH (.*)$", done.stdout, re.M)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    values = {key: int(value) for key, value in (item.split("=") for item in match.group(1).split())}
    return WrkResult(
        requests=values["requests"],
        bytes=values["bytes"],
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        errors={key: values[key] for key in ("connect", "read", "write", "status", "timeout")},
        command=shown,
        cpu=cpu,
    )


# --- the server under test ----------------------------------------------------------------------------------------


class Server:
    def __init__(self, workdir: Path, workers: int, threads: int | None) -> None:
        self.workdir = workdir
        self.db_path = workdir / "data" / "nodes.db"
        self.assets_dir = workdir / "data" / "assets"
        self.token = "nf_bench-" + secrets.token_urlsafe(16)
        self.workers = workers
        self.command = [str(SERVER_BIN), "run"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = workdir / "server.log"
        self.env = {
            **os.environ,
            "NF_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "NF_DB_PATH": str(self.db_path),
            "NF_ASSETS_DIR": str(self.assets_dir),
            "NF_API_TOKEN": self.token,
            "NF_HTTP_WORKERS": str(workers),
        }
        self.env.pop("NF_HTTP_THREADS", None)
        if threads is not None:
            self.env["NF_HTTP_THREADS"] = str(threads)
        self.process: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        """Create the database with the server's own migrations (``db check`` migrates, then checks)."""
        done = subprocess.run(
            [str(SERVER_BIN), "db", "check"],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nodefoundry-server db check failed:\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_http(self.url + "/health", self.process, "nodefoundry-server", self.logfile)
        # /health answers as soon as one worker runs; wrk opens its keep-alive connections once, at its start,
        # so a worker that boots later would get none of them. Wait for all workers, then let them settle.
        deadline = time.monotonic() + 30
        while len(child_pids(self.pid)) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(child_pids(self.pid))} of {self.workers} workers started")
            time.sleep(0.1)
        time.sleep(1.0)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, "nodefoundry-server")


def seed_nodes(db_path: Path, count: int) -> list[str]:
    """Insert ``count`` discovered nodes (and their 'registered' events) in one transaction."""
    macs = [mac_for(i) for i in range(count)]
    start = datetime.now(UTC) - timedelta(hours=1)
    rows, events = [], []
    for i, mac in enumerate(macs):
        at = stamp(start + timedelta(milliseconds=i))
        facts = '{"ipxe_buildarch": "x86_64", "platform": "efi"}'
        rows.append((mac, "discovered", "unknown", "amd64", "{}", facts, at, at))
        events.append((mac, at, "boot", "registered", "status", None, "discovered", None, None))
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO nodes (mac, status, liveness, arch, labels, facts, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO node_events (mac, at, source, kind, field, old, new, detail, actor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            events,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return macs


# --- nginx, the reference for large files ---------------------------------------------------------------------------


class Nginx:
    def __init__(self, workdir: Path, root: Path) -> None:
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = self.dir / "error.log"
        self.conf = self.dir / "nginx.conf"
        user = "user root root;" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir
        temp = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf.write_text(
            textwrap.dedent(
                f"""
                {user}
                daemon off;
                master_process on;
                worker_processes auto;
                pid {self.dir / "nginx.pid"};
                error_log {self.logfile} warn;
                events {{ worker_connections 1024; }}
                http {{
                    access_log off;
                    sendfile on;
                    tcp_nopush on;
                    keepalive_timeout 65;
                    default_type application/octet-stream;
                {temp}
                    server {{
                        listen 127.0.0.1:{self.port};
                        root {root};
                    }}
                }}
                """
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(
                ["nginx", "-p", str(self.dir), "-e", str(self.logfile), "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(self.url + "/", self.process, "nginx", self.logfile)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, "nginx", signal.SIGQUIT)  # graceful shutdown of master and workers


# --- the measurements -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    passed: bool | None  # None: informational

    def cells(self) -> list[str]:
        verdict = "—" if self.passed is None else ("pass" if self.passed else "**FAIL**")
        return [self.figure, self.measured, self.target, verdict]


def bench_boot(
    server: Server, macs: list[str], workdir: Path, seconds: int, pids: tuple[int, int], notes: list[str]
) -> list[Row]:
    status, _, body = http("GET", f"{server.url}/boot/{macs[0]}/boot.ipxe")
    if status != 200 or not body.startswith(b"#!ipxe"):
        raise RuntimeError(f"boot script check failed: {status} {body[:200]!r}")
    script = workdir / "boot_random_mac.lua"
    script.write_text(
        "macs = {" + ",".join(f'"{mac}"' for mac in macs) + "}\n" + WRK_RANDOM_MAC + WRK_DONE,
    )
    result = run_wrk(server.url + "/", script, 64, seconds, "2s", True, pids)
    notes.append(
        f"boot.ipxe: `{result.command}` (random MAC of {len(macs)} per request): {result.requests} requests,"
        f" p50 {result.p50_ms:.1f} ms, p90 {result.p90_ms:.1f} ms, p99 {result.p99_ms:.1f} ms,"
        f" max {result.max_ms:.1f} ms; errors: {result.error_text()}; {result.cpu.text(CPUS)};"
        f" server CPU per request {result.cpu.server / result.requests * 1000:.2f} ms"
    )
    check_disturbed("the boot.ipxe run", result.cpu, notes)
    clean = not any(result.errors.values())
    return [
        Row(
            f"`GET /boot/<mac>/boot.ipxe` throughput ({len(macs):,} nodes, random MAC, wrk -t2 -c64)",
            f"{result.rps:,.0f} req/s",
            f"≥ {BOOT_RPS_MIN:,.0f} req/s",
            result.rps >= BOOT_RPS_MIN and clean,
        ),
        Row(
            "`GET /boot/<mac>/boot.ipxe` p99 latency (same run)",
            f"{result.p99_ms:.1f} ms",
            f"≤ {BOOT_P99_MAX_MS:.0f} ms",
            result.p99_ms <= BOOT_P99_MAX_MS and clean,
        ),
    ]


def bench_list(server: Server, count: int, runs: int, pids: tuple[int, int], notes: list[str]) -> list[Row]:
    """Sequential requests; the time is until the whole body is received (the client's JSON parse is not in it)."""
    times: list[float] = []
    size = 0
    cpu = CpuUse()
    with cpu_meter(cpu, *pids):
        for _ in range(runs):
            began = time.perf_counter()
            status, headers, body = http("GET", server.url + "/api/v1/nodes", server.token)
            times.append((time.perf_counter() - began) * 1000)
            if status != 200:
                raise RuntimeError(f"GET /api/v1/nodes answered {status}: {body[:200]!r}")
            size = len(body)
            listed = json.loads(body)
            if len(listed) != count or headers.get("X-Total-Count") != str(count):
                raise RuntimeError(f"GET /api/v1/nodes listed {len(listed)} nodes, expected {count}")
    median, worst = statistics.median(times), max(times)
    notes.append(
        f"GET /api/v1/nodes: {runs} sequential requests, body {size / MB:.2f} MB, times (ms): "
        + ", ".join(f"{t:.0f}" for t in times)
        + f"; server CPU per request {cpu.server / runs * 1000:.0f} ms; {cpu.text(CPUS)}"
    )
    check_disturbed("the node list requests", cpu, notes)
    figure = f"`GET /api/v1/nodes` all {count:,} nodes ({size / MB:.1f} MB JSON)"
    return [
        Row(f"{figure}, median of {runs}", f"{median:.0f} ms", f"≤ {LIST_MAX_MS:.0f} ms", median <= LIST_MAX_MS),
        Row(f"{figure}, max of {runs}", f"{worst:.0f} ms", f"≤ {LIST_MAX_MS:.0f} ms", worst <= LIST_MAX_MS),
    ]


def bench_bulk(server: Server, macs: list[str], pids: tuple[int, int], notes: list[str]) -> list[Row]:
    body = {"action": "install", "macs": macs}
    cpu = CpuUse()
    with cpu_meter(cpu, *pids):
        began = time.perf_counter()
        status, _, answer = http("POST", server.url + "/api/v1/nodes/bulk", server.token, body)
        elapsed = (time.perf_counter() - began) * 1000
    if status != 200:
        raise RuntimeError(f"bulk install answered {status}: {answer[:200]!r}")
    results = json.loads(answer)["results"]
    changed = sum(1 for r in results if r.get("changed") is True and r.get("status") == "installing")
    notes.append(
        f"bulk install: {len(macs)} MACs in one call (one SQLite transaction, synchronous=FULL), {changed} results"
        f" changed=true, {elapsed:.0f} ms; server CPU {cpu.server * 1000:.0f} ms"
    )
    return [
        Row(
            f"`POST /api/v1/nodes/bulk` install {len(macs):,} discovered nodes, one call",
            f"{elapsed:.0f} ms ({changed:,}/{len(macs):,} changed)",
            f"≤ {BULK_MAX_MS:.0f} ms, all changed",
            elapsed <= BULK_MAX_MS and changed == len(macs) == len(results),
        )
    ]


def check_download(url: str, expected: str, size: int, name: str) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{name} served a different {url} ({size} bytes expected)")


def merge(parts: list[WrkResult]) -> WrkResult:
    """Totals of several wrk runs; latency percentiles become the median of the runs' percentiles."""
    cpu = CpuUse()
    for part in parts:
        for key in ("seconds", "server", "nginx", "client", "other"):
            setattr(cpu, key, getattr(cpu, key) + getattr(part.cpu, key))
    return WrkResult(
        requests=sum(p.requests for p in parts),
        bytes=sum(p.bytes for p in parts),
        seconds=sum(p.seconds for p in parts),
        p50_ms=statistics.median(p.p50_ms for p in parts),
        p90_ms=statistics.median(p.p90_ms for p in parts),
        p99_ms=statistics.median(p.p99_ms for p in parts),
        max_ms=max(p.max_ms for p in parts),
        errors={key: sum(p.errors[key] for p in parts) for key in parts[0].errors},
        command=parts[0].command,
        cpu=cpu,
    )


def bench_initrd(
    server: Server,
    nginx: Nginx,
    initrd: Path,
    workdir: Path,
    rounds: int,
    seconds: int,
    pids: tuple[int, int],
    notes: list[str],
) -> list[Row]:
    """Both servers under the same load, alternating in ``rounds`` slices so that a change in the
    machine's background load during the run hits both alike."""
    expected = hashlib.sha256(initrd.read_bytes()).hexdigest()
    size = initrd.stat().st_size
    for name, base in (("server", server.url), ("nginx", nginx.url)):
        check_download(base + INITRD_URL_PATH, expected, size, name)
    script = workdir / "download.lua"
    script.write_text(WRK_DONE)
    parts: dict[str, list[WrkResult]] = {"server": [], "nginx": []}
    order = [("nginx", nginx.url), ("server", server.url)]
    for _ in range(rounds):
        for name, base in order:
            parts[name].append(run_wrk(base + INITRD_URL_PATH, script, 50, seconds, "120s", False, pids))
        order.reverse()
    results = {name: merge(runs) for name, runs in parts.items()}
    runs = f"{rounds} runs" if rounds > 1 else "1 run"
    for name, result in results.items():
        notes.append(
            f"initrd ({size / MB:.1f} MB) via {name}: {runs} of `{result.command}`, alternating with the other"
            f" server: {result.requests} complete downloads ({result.requests / 50 / rounds:.1f} per client and run),"
            f" {result.bytes / MB:,.0f} MB in {result.seconds:.1f} s (per run: "
            + ", ".join(f"{p.mb_per_s:,.0f}" for p in parts[name])
            + f" MB/s), median download {result.p50_ms / 1000:.2f} s, slowest {result.max_ms / 1000:.2f} s;"
            f" errors: {result.error_text()}; {result.cpu.text(CPUS)}"
        )
    check_disturbed("the initrd runs", merge([*parts["server"], *parts["nginx"]]).cpu, notes)
    ratio = results["server"].mb_per_s / results["nginx"].mb_per_s
    clean = not any(results["server"].errors.values()) and not any(results["nginx"].errors.values())
    figure = f"`GET {INITRD_URL_PATH}` ({size / MB:.1f} MB), 50 concurrent clients"
    return [
        Row(f"{figure}: server", f"{results['server'].mb_per_s:,.0f} MB/s", "—", None),
        Row(f"{figure}: nginx (sendfile)", f"{results['nginx'].mb_per_s:,.0f} MB/s", "—", None),
        Row(
            f"{figure}: server / nginx",
            f"{ratio:.0%}",
            f"≥ {INITRD_RATIO_MIN:.0%}",
            ratio >= INITRD_RATIO_MIN and clean,
        ),
    ]


def table(rows: list[Row]) -> str:
    return markdown_table(["figure", "measured", "target", "result"], [row.cells() for row in rows])


@contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nf-http-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000, help="nodes in the store (default 10000)")
    parser.add_argument("--bulk", type=int, default=1000, help="nodes installed by the bulk call (default 1000)")
    parser.add_argument("--quick", action="store_true", help="5 s per wrk figure (not 15 s), 5 list requests (not 10)")
    parser.add_argument("--workers", type=int, default=2, help="NF_HTTP_WORKERS (default 2)")
    parser.add_argument("--threads", type=int, help="NF_HTTP_THREADS (default: unset, the server's default)")
    args = parser.parse_args()
    if args.bulk > args.nodes:
        parser.error("--bulk cannot exceed --nodes")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make setup installs it)")
    if not SERVER_BIN.exists():
        parser.error(f"{SERVER_BIN} missing: run from the project venv (make setup)")
    seconds, list_runs, rounds = (5, 5, 1) if args.quick else (15, 10, 3)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    notes: list[str] = []
    rows: list[Row] = []
    began = time.monotonic()
    with workspace() as workdir:
        server = Server(workdir, args.workers, args.threads)
        nginx = Nginx(workdir, server.assets_dir.parent)  # URL path /assets/... on both
        try:
            installer = server.assets_dir / "debian-installer" / "amd64"
            installer.mkdir(parents=True)
            for name in ("linux", "initrd.gz"):
                shutil.copyfile(INSTALLER_DIR / name, installer / name)
            server.migrate()
            seed_began = time.perf_counter()
            macs = seed_nodes(server.db_path, args.nodes)
            notes.append(
                f"seeding: {args.nodes} discovered nodes (+ one 'registered' event each) inserted directly with"
                f" sqlite3 in one transaction ({time.perf_counter() - seed_began:.2f} s), after"
                " `nodefoundry-server db check` created the schema with the server's migrations"
            )
            server.start()
            nginx.start()
            log(f"server {server.url} (workers {args.workers}, threads {args.threads or 'default'}), nginx {nginx.url}")
            pids = (server.pid, nginx.pid)
            rows += bench_boot(server, macs, workdir, seconds, pids, notes)
            rows += bench_list(server, args.nodes, list_runs, pids, notes)
            rows += bench_bulk(server, macs[: args.bulk], pids, notes)
            initrd = installer / "initrd.gz"
            rows += bench_initrd(server, nginx, initrd, workdir, rounds, seconds // rounds, pids, notes)
        finally:
            server.stop()
            nginx.stop()

    threads = args.threads if args.threads is not None else "unset (server default)"
    print(f"## Server core (HTTP): {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    print(
        f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()};"
        f" Python {platform.python_version()}; NF_HTTP_WORKERS={args.workers}, NF_HTTP_THREADS={threads}"
    )
    print()
    print(table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"- total run time {time.monotonic() - began:.0f} s")
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
