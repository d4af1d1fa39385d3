"""Benchmark of the Ansible collection: the dynamic inventory and ``install.yml -l discovered``.

Run: ``.venv/bin/python bench/inventory_bench.py [--nodes 10000] [--install-nodes 1000] [--runs 5]``

1. ``ansible-inventory --list`` through the ``nodefoundry.provision.nodefoundry`` plugin over ``--nodes`` nodes of
   a real server, against the same hosts, host variables and groups from a static YAML inventory (written from
   the plugin's own output), in the same run: the runs alternate, so background load hits both alike.
   Target: plugin median within 1.5x of the static median.
2. ``ansible-playbook playbooks/install.yml -l discovered`` over ``--install-nodes`` discovered nodes of a second
   server. Target: at most 30 s wall time, and every node ``installing`` afterwards.

The servers are real ``nodefoundry-server run`` processes on free loopback ports. Their databases are created
with the server's own migrations and seeded with sqlite3 in one transaction before the server starts (the API
registers one node per request, which would make the setup, not the figure, slow). Ansible runs with its own
HOME and configuration. Prints a markdown table and the CPU share other processes took during the runs;
everything started is stopped and the temporary directory removed, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from common import CPUS, DISTURBED_SHARE, free_port, log, machine_busy_seconds, markdown_table, stamp, tree_cpu_seconds

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "nf_bench-inventory"
INVENTORY_RATIO_MAX = 1.5
INSTALL_MAX_S = 30.0
# The plugin options of the shipped example source (inventory/lab.nodefoundry.yml), without its cache.
SOURCE = {
    "plugin": "nodefoundry.provision.nodefoundry",
    "hostnames": ["hostname", "mac"],
    "keyed_groups": [
        {"key": "nodefoundry_arch", "prefix": "arch"},
        {"key": "nodefoundry_labels.rack | default('unracked')", "prefix": "rack", "separator": "_"},
    ],
    "compose": {"ansible_user": "'nodefoundry'"},
}


# --- CPU accounting: how much of the machine other processes took ---------------------------------------------


def children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


@dataclass
class Load:
    """Machine busy time and ours over one measured stretch."""

    wall: float = 0.0
    busy: float = 0.0
    ours: float = 0.0

    def other_share(self) -> float:
        return max(0.0, self.busy - self.ours) / (self.wall * CPUS) if self.wall else 0.0


class Meter:
    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.load = Load()

    def __enter__(self) -> Meter:
        self._start = (time.monotonic(), machine_busy_seconds(), children_cpu(), tree_cpu_seconds(self.server_pids))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, children, servers = self._start
        self.load.wall += time.monotonic() - wall
        self.load.busy += machine_busy_seconds() - busy
        # Ours: the Ansible processes (children) and the server; this script's own idle waiting is negligible.
        self.load.ours += (children_cpu() - children) + (tree_cpu_seconds(self.server_pids) - servers)


# --- the server ---------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self.workdir = workdir
        self.db_path = workdir / "nodes.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "NF_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "NF_DB_PATH": str(self.db_path),
            "NF_ASSETS_DIR": str(workdir / "assets"),
            "NF_API_TOKEN": TOKEN,
            "NF_HTTP_WORKERS": "2",
            "NF_HEARTBEAT_INTERVAL": "3600",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        """Create the database with the server's own migrations."""
        done = subprocess.run(
            [BIN / "nodefoundry-server", "db", "check"],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"nodefoundry-server db check failed: {done.stdout!r} {done.stderr!r}")

    def start(self) -> None:
        with (self.workdir / "server.log").open("ab") as out:
            self.process = subprocess.Popen(
                [BIN / "nodefoundry-server", "run"], cwd=self.workdir, env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start; see " + str(self.workdir / "server.log")) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def statuses(self) -> dict[str, int]:
        with sqlite3.connect(self.db_path) as conn:
            return dict(conn.execute("SELECT status, count(*) FROM nodes GROUP BY status").fetchall())


def seed(db_path: Path, count: int, installed_share: float) -> None:
    """``count`` nodes in one transaction: installed ones (online, address, host name, agent facts) first,
    the rest discovered (architecture from the boot path), spread over 40 racks."""
    start = datetime.now(UTC) - timedelta(hours=1)
    installed = int(count * installed_share)
    rows, events = [], []
    for index in range(count):
        mac = f"52540{index:07x}"
        at = stamp(start + timedelta(milliseconds=index))
        arch = "arm64" if index % 3 else "amd64"
        labels = json.dumps({"rack": f"r{index % 40}"})
        if index < installed:
            agent = {
                "os": {"id": "debian", "version_id": "12"},
                "kernel": "6.1.0-28-" + arch,
                "arch": arch,
                "cpu": {"model": "Cortex-A76", "count": 8},
                "memory_bytes": 16 * 1024**3,
                "agent_version": "0.1.0",
                "boot_id": f"boot-{index}",
            }
            row = (
                mac,
                "installed",
                "online",
                f"edge-{index}",
                f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}",
                arch,
                labels,
                json.dumps({"agent": agent, "uptime": 60}),
                at,
                at,
                at,
            )
        else:
            facts = json.dumps({"platform": "efi", "ipxe_buildarch": "arm64" if arch == "arm64" else "x86_64"})
            row = (mac, "discovered", "unknown", None, None, arch, labels, facts, None, at, at)
        rows.append(row)
        events.append((mac, at, "boot", "registered", "status", None, "discovered"))
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO nodes (mac, status, liveness, hostname, ip, arch, labels, facts, last_heartbeat,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO node_events (mac, at, source, kind, field, old, new) VALUES (?, ?, ?, ?, ?, ?, ?)", events
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def started_server(workdir: Path, count: int, installed_share: float) -> Server:
    server = Server(workdir)
    server.migrate()
    seed(server.db_path, count, installed_share)
    server.start()
    return server


# --- Ansible ------------------------------------------------------------------------------------------------------


def ansible_env(workdir: Path, server: Server) -> dict[str, str]:
    home = workdir / "home"
    (home / ".ansible" / "tmp").mkdir(parents=True, exist_ok=True)
    collections = workdir / "collections" / "ansible_collections" / "nodefoundry"
    if not collections.exists():
        collections.mkdir(parents=True)
        (collections / "provision").symlink_to(REPO, target_is_directory=True)
    config = workdir / "ansible.cfg"
    config.write_text("[defaults]\n")
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "NODEFOUNDRY_"))},
        "HOME": str(home),
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(home / ".ansible" / "tmp"),
        "ANSIBLE_COLLECTIONS_PATH": str(workdir / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "NODEFOUNDRY_URL": server.url,
        "NODEFOUNDRY_TOKEN": TOKEN,
    }


def timed(args: list[str | Path], env: dict[str, str], workdir: Path, meter: Meter) -> tuple[float, str]:
    """Wall time of one process (its output goes to a file, so serialising it counts, printing does not)."""
    output = workdir / "output.txt"
    with output.open("wb") as out, meter:
        start = time.monotonic()
        done = subprocess.run([str(arg) for arg in args], env=env, cwd=workdir, stdout=out, stderr=subprocess.PIPE)
        elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, output.read_text()


def plain(value: object) -> object:
    """The ``--list`` value without its ``__ansible_unsafe`` wrappers (static YAML has no such marker)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def same_inventory(listing: dict) -> tuple[object, dict[str, list[str]]]:
    """What must match between the two inventories: host variables, and each group's hosts (in any order)."""
    groups = {name: sorted(body.get("hosts", [])) for name, body in listing.items() if name != "_meta"}
    return plain(listing["_meta"]["hostvars"]), {name: hosts for name, hosts in groups.items() if hosts}


def static_inventory(listing: dict, path: Path) -> int:
    """Write the plugin's ``--list`` output as a static YAML inventory: same hosts, variables and groups."""
    hostvars = plain(listing["_meta"]["hostvars"])
    groups = {
        name: {"hosts": dict.fromkeys(body["hosts"])}
        for name, body in listing.items()
        if name not in ("_meta", "all", "ungrouped") and body.get("hosts")
    }
    path.write_text(yaml.safe_dump({"all": {"hosts": hostvars, "children": groups}}, sort_keys=False))
    return len(hostvars)


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    result: str


def bench_inventory(workdir: Path, nodes: int, runs: int) -> tuple[list[Row], Load, list[float], list[float]]:
    server = started_server(workdir / "server-inventory", nodes, installed_share=0.5)
    try:
        env = ansible_env(workdir, server)
        source = workdir / "bench.nodefoundry.yml"
        source.write_text(json.dumps(SOURCE))
        meter = Meter([server.process.pid])
        log(f"warm-up: ansible-inventory --list over {nodes} nodes (plugin)")
        _, text = timed([BIN / "ansible-inventory", "-i", source, "--list"], env, workdir, Meter([]))
        listing = json.loads(text)
        static = workdir / "static.yml"
        hosts = static_inventory(listing, static)
        if hosts != nodes:
            raise RuntimeError(f"the plugin listed {hosts} hosts, not {nodes}")
        _, text = timed([BIN / "ansible-inventory", "-i", static, "--list"], env, workdir, Meter([]))
        if same_inventory(json.loads(text)) != same_inventory(listing):
            raise RuntimeError("the static inventory does not list the same hosts, variables and groups")
        plugin_times, static_times = [], []
        for run in range(runs):
            for name, path, times in (("plugin", source, plugin_times), ("static", static, static_times)):
                elapsed, _ = timed([BIN / "ansible-inventory", "-i", path, "--list"], env, workdir, meter)
                times.append(elapsed)
                log(f"run {run + 1}/{runs} {name}: {elapsed:.2f} s")
    finally:
        server.stop()
    plugin, static_median = statistics.median(plugin_times), statistics.median(static_times)
    ratio = plugin / static_median
    rows = [
        Row(f"`ansible-inventory --list`, {nodes:,} nodes, plugin (median of {runs})", f"{plugin:.2f} s", "—", "—"),
        Row(
            f"`ansible-inventory --list`, same {nodes:,} hosts, static YAML (median of {runs})",
            f"{static_median:.2f} s",
            "—",
            "—",
        ),
        Row(
            "plugin / static",
            f"{ratio:.2f}x",
            f"≤ {INVENTORY_RATIO_MAX}x",
            "pass" if ratio <= INVENTORY_RATIO_MAX else "FAIL",
        ),
    ]
    return rows, meter.load, plugin_times, static_times


def bench_install(workdir: Path, nodes: int) -> tuple[list[Row], Load]:
    server = started_server(workdir / "server-install", nodes, installed_share=0.0)
    try:
        env = ansible_env(workdir, server)
        source = workdir / "install.nodefoundry.yml"
        source.write_text(json.dumps(SOURCE))
        meter = Meter([server.process.pid])
        log(f"ansible-playbook install.yml -l discovered over {nodes} discovered nodes")
        playbook = [BIN / "ansible-playbook", "-i", source, REPO / "playbooks" / "install.yml", "-l", "discovered"]
        elapsed, _ = timed(playbook, env, workdir, meter)
        statuses = server.statuses()
    finally:
        server.stop()
    if statuses != {"installing": nodes}:
        raise RuntimeError(f"after install.yml the nodes are {statuses}, not all installing")
    ok = elapsed <= INSTALL_MAX_S
    rows = [
        Row(
            f"`install.yml -l discovered`, {nodes:,} discovered nodes (all `installing` afterwards)",
            f"{elapsed:.1f} s",
            f"≤ {INSTALL_MAX_S:.0f} s",
            "pass" if ok else "FAIL",
        ),
    ]
    return rows, meter.load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--install-nodes", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nf-inventory-bench-") as temp:
        workdir = Path(temp)
        rows, inventory_load, plugin_times, static_times = bench_inventory(workdir, options.nodes, options.runs)
        install_rows, install_load = bench_install(workdir, options.install_nodes)
    head = ["figure", "measured", "target", "result"]
    print(markdown_table(head, [[row.figure, row.measured, row.target, row.result] for row in rows + install_rows]))
    print()
    print(f"- plugin runs (s): {', '.join(f'{value:.2f}' for value in plugin_times)}")
    print(f"- static runs (s): {', '.join(f'{value:.2f}' for value in static_times)}")
    for name, load in (("inventory runs", inventory_load), ("install run", install_load)):
        share = load.other_share()
        warning = " — WARNING: other processes loaded the machine" if share > DISTURBED_SHARE else ""
        print(f"- {name}: other processes took {share:.0%} of the machine's CPU{warning}")
    print(f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {os.getloadavg()}")
    return 0 if all(row.result != "FAIL" for row in rows + install_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
