"""Footprint of the node agent while idle: resident memory and CPU time, as a node would run it.

Run: ``.venv/bin/python bench/agent_footprint.py [--seconds 300] [--python /usr/bin/python3]``

Builds the zipapp nodes download (``nodefoundry_agent.build``), starts a private Mosquitto on a free loopback
port and runs the agent under Debian's ``/usr/bin/python3`` with its python3-paho-mqtt 1.6, the default
heartbeat (30 s) and no commands. Once the agent is connected it reads ``VmRSS`` from ``/proc/<pid>/status``
and ``utime + stime`` from ``/proc/<pid>/stat``, waits ``--seconds``, and reads them again. Prints a markdown
table; everything started is stopped and the temporary directory removed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from common import CLOCK_TICKS, free_port, markdown_table, process_cpu_seconds

from nodefoundry_agent import __version__, build

RSS_TARGET_KB = 30 * 1024
MAC = "02ffeeddccbb"
CONNECT_TIMEOUT_SECONDS = 30.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def version_of(python: str) -> str:
    code = "import platform, paho.mqtt; print(platform.python_version(), paho.mqtt.__version__)"
    python_version, paho_version = subprocess.run([python, "-c", code], capture_output=True, text=True,
                                                  check=True).stdout.split()  # fmt: skip
    return f"Python {python_version}, paho-mqtt {paho_version}"


@contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as output:
        child = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def wait_connected(agent: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    while "connected to the broker" not in log.read_text(errors="replace"):
        if agent.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the agent did not connect:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def measure(python: str, seconds: float, workdir: Path) -> list[tuple[str, str]]:
    pyz = workdir / "nodefoundry-agent"
    pyz.write_bytes(build.zipapp_bytes())
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    (workdir / "exec.d").mkdir(mode=0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NF_MAC": MAC, "NF_MQTT_BROKER": f"127.0.0.1:{port}",
           "NF_STATE_DIR": str(workdir / "state"), "NF_EXEC_DIR": str(workdir / "exec.d")}  # fmt: skip
    agent_log = workdir / "agent.log"
    with (
        process(["mosquitto", "-c", str(config)], workdir / "mosquitto.log"),
        process([python, str(pyz)], agent_log, env) as agent,  # it retries until the broker listens
    ):
        wait_connected(agent, agent_log)
        rss_start, cpu_start, started = rss_kb(agent.pid), process_cpu_seconds(agent.pid), time.monotonic()
        print(f"[bench] agent {agent.pid} connected; idle for {seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(seconds)
        rss_end, cpu_end, elapsed = rss_kb(agent.pid), process_cpu_seconds(agent.pid), time.monotonic() - started
    if "Traceback" in agent_log.read_text(errors="replace"):
        raise SystemExit(f"the agent logged errors:\n{agent_log.read_text(errors='replace')}")
    cpu = cpu_end - cpu_start
    verdict = "met" if max(rss_start, rss_end) <= RSS_TARGET_KB else "MISSED"
    return [
        ("RSS after connect", f"{rss_start / 1024:.1f} MiB"),
        (f"RSS after {elapsed:.0f} s idle", f"{rss_end / 1024:.1f} MiB"),
        ("RSS target", f"<= {RSS_TARGET_KB / 1024:.0f} MiB: {verdict}"),
        (f"CPU time over {elapsed:.0f} s idle", f"{cpu:.2f} s (the kernel counts in {1 / CLOCK_TICKS:.2f} s ticks)"),
        ("CPU share while idle", f"{100 * cpu / elapsed:.3f} % of one core"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="idle period to measure (default 300)")
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter (default: Debian's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nf-agent-bench-") as workdir:
        rows = measure(args.python, args.seconds, Path(workdir))
    print(f"## Node agent footprint: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print()
    print(f"agent {__version__} zipapp, {version_of(args.python)}, {platform.machine()}, heartbeat 30 s, idle")
    print()
    print(markdown_table(["measure", "value"], [list(row) for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
