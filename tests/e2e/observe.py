"""What the e2e tests observe: stages reached, access-log requests, node events, serial consoles."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.e2e.conftest import Lab, Request


def random_macs(count: int) -> list[tuple[str, str]]:
    """Distinct locally administered QEMU-style MACs: (colon form for QEMU, 12 hex digits as the server stores it)."""
    chosen: set[str] = set()
    while len(chosen) < count:
        chosen.add("".join(f"{o:02x}" for o in (0x52, 0x54, 0x00, *(random.randrange(256) for _ in range(3)))))
    return [(":".join(mac[i : i + 2] for i in range(0, 12, 2)), mac) for mac in sorted(chosen)]


class Stages:
    """Stages reached, with times relative to the VMs' start; rendered as a table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()
        self.rows: list[tuple[str, float | None, str]] = []
        self.notes: list[str] = []

    def reached(self, name: str, at: float | None = None, detail: str = "") -> float:
        stamp = at if at is not None else time.time()
        self.rows.append((name, stamp, detail))
        return stamp

    def missed(self, name: str, detail: str) -> None:
        self.rows.append((name, None, detail))

    def table(self) -> str:
        width = max([len(name) for name, _, _ in self.rows] + [5])
        lines = [f"{'stage':<{width}}  {'t (s)':>7}  detail", f"{'-' * width}  {'-' * 7}  {'-' * 40}"]
        for name, stamp, detail in sorted(self.rows, key=lambda row: row[1] or float("inf")):
            when = f"{stamp - self.start:7.1f}" if stamp is not None else "    n/a"
            lines.append(f"{name:<{width}}  {when}  {detail}")
        return "\n".join(lines + self.notes)

    def write(self, header: str) -> str:
        text = f"{header}\n{self.table()}\n"
        self.path.write_text(text)
        return text


def requests_for(lab: Lab, pattern: str, since: float = 0.0, client: str | None = None) -> list[Request]:
    regex = re.compile(pattern)
    return [
        r
        for r in lab.requests()
        if r.at >= since and r.status == 200 and regex.search(r.target) and (client is None or r.client == client)
    ]


def wait_request(
    lab: Lab, pattern: str, deadline: float, what: str, since: float = 0.0, count: int = 1, client: str | None = None
) -> Request:
    def hits() -> list[Request] | None:
        found = requests_for(lab, pattern, since, client)
        return found if len(found) >= count else None

    return lab.wait_until(hits, deadline, what, "server")[count - 1]


def events(lab: Lab, mac: str) -> list[dict[str, Any]]:
    return lab.api("GET", f"/api/v1/nodes/{mac}/events?limit=1000")


def wait_event(lab: Lab, mac: str, match: Callable[[dict[str, Any]], bool], deadline: float, what: str) -> Any:
    return lab.wait_until(lambda: next((e for e in events(lab, mac) if match(e)), None), deadline, what, "server", 1.0)


def event_time(event: dict[str, Any]) -> float:
    """An event's server timestamp (RFC 3339, UTC) as epoch seconds: same clock as the test."""
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def syslog_matches(lab: Lab, pattern: re.Pattern[str], client: str | None = None) -> list[tuple[float, str]]:
    return [
        (stamp, line)
        for stamp, line in lab.syslog.snapshot()
        if pattern.search(line) and (client is None or line.startswith(client + " "))
    ]


def serial_text(path: Path) -> str:
    text = path.read_bytes().decode(errors="replace") if path.exists() else ""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]", "", text).replace("\r", "\n")


def serial_tail(path: Path, lines: int = 12) -> str:
    kept = [line.strip() for line in serial_text(path).splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(no serial output)"
