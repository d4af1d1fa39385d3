"""What each allow-listed command does on the node.

``check`` runs before a command is accepted (a command that may not run is *rejected*, never started);
``run`` executes it in a worker thread and returns its final outcome, or None for reboot/shutdown whose
success can only be seen from the next boot (see ``commands.CommandProcessor.recover``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodefoundry_agent import protocol, runner
from nodefoundry_agent.config import Settings

POWER_COMMANDS = ("reboot", "shutdown")
POWER_TIMEOUT_SECONDS = 60
SERVICE_TIMEOUT_SECONDS = 300
SERVICE_STATUS_ANSWERED = range(0, 4)  # systemctl status: 0 active, 1-3 not running; 4+ no such unit / error
EXEC_OWNER_UID = 0


class NotAllowed(Exception):
    """A command that is well-formed but may not run here; the message says why."""


@dataclass(frozen=True)
class Outcome:
    state: str
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    detail: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr, "detail": self.detail}


def _completed(result: runner.Completed, ok: bool, timeout: float) -> Outcome:
    state = "timed_out" if result.timed_out else ("succeeded" if ok else "failed")
    detail = f"killed after {timeout:g} s" if result.timed_out else None
    return Outcome(state, result.exit_code, result.stdout or None, result.stderr or None, detail)


def executable(exec_dir: Path, name: str) -> Path:
    """The allow-listed program ``name``: a root-owned, not group/world-writable regular file directly in
    a root-owned, not group/world-writable ``exec_dir`` (a symlink could point anywhere, so none is followed).
    """
    if not name or "/" in name or name in (".", ".."):
        raise NotAllowed(f"{name!r} is not a plain file name")
    _check_owner(exec_dir, "exec directory")
    path = exec_dir / name
    try:
        info = os.lstat(path)
    except OSError:
        raise NotAllowed(f"{name!r} is not in the allow-list directory {exec_dir}") from None
    if not stat.S_ISREG(info.st_mode):
        raise NotAllowed(f"{path} is not a regular file")
    _check_owner(path, "program", info)
    if not info.st_mode & stat.S_IXUSR:
        raise NotAllowed(f"{path} is not executable")
    return path


def _check_owner(path: Path, what: str, info: os.stat_result | None = None) -> None:
    try:
        info = info or os.stat(path)
    except OSError:
        raise NotAllowed(f"{what} {path} does not exist") from None
    if info.st_uid != EXEC_OWNER_UID:
        raise NotAllowed(f"{what} {path} is not owned by root")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NotAllowed(f"{what} {path} is writable by group or others")


class Handlers:
    def __init__(self, settings: Settings, republish_facts: Callable[[], dict[str, Any]]) -> None:
        self.settings = settings
        self.republish_facts = republish_facts

    def check(self, command: str, args: dict[str, Any]) -> None:
        """Raise ``NotAllowed`` for a command that may not run on this node."""
        if command == "exec":
            executable(self.settings.exec_dir, args["name"])

    def run(self, command: str, args: dict[str, Any], seconds_left: float | None) -> Outcome | None:
        return getattr(self, f"_{command}")(args, seconds_left)

    def _ping(self, args: dict[str, Any], seconds_left: float | None) -> Outcome:
        return Outcome("succeeded", stdout="pong")

    def _facts(self, args: dict[str, Any], seconds_left: float | None) -> Outcome:
        facts = self.republish_facts()
        return Outcome("succeeded", stdout=protocol.encode(facts).decode(), detail="facts republished")

    def _reboot(self, args: dict[str, Any], seconds_left: float | None) -> Outcome | None:
        return self._power(self.settings.reboot_command)

    def _shutdown(self, args: dict[str, Any], seconds_left: float | None) -> Outcome | None:
        return self._power(self.settings.shutdown_command)

    def _power(self, argv: tuple[str, ...]) -> Outcome | None:
        """None on success: the command only queues the reboot, its result shows after the next boot."""
        result = runner.run(argv, POWER_TIMEOUT_SECONDS)
        if result.exit_code == 0 and not result.timed_out:
            return None
        return _completed(result, False, POWER_TIMEOUT_SECONDS)

    def _service(self, args: dict[str, Any], seconds_left: float | None) -> Outcome:
        argv = (*self.settings.systemctl, args["action"], "--", args["unit"])
        result = runner.run(argv, SERVICE_TIMEOUT_SECONDS)
        ok = result.exit_code in SERVICE_STATUS_ANSWERED if args["action"] == "status" else result.exit_code == 0
        return _completed(result, ok, SERVICE_TIMEOUT_SECONDS)

    def _exec(self, args: dict[str, Any], seconds_left: float | None) -> Outcome:
        """Runs at most ``timeout`` seconds and never past the command's deadline."""
        path = executable(self.settings.exec_dir, args["name"])
        timeout = float(args.get("timeout", 60))
        if seconds_left is not None:
            timeout = max(1.0, min(timeout, seconds_left))
        result = runner.run((str(path), *args.get("argv", [])), timeout)
        return _completed(result, result.exit_code == 0, timeout)
