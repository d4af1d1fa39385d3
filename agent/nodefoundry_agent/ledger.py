"""The command ledger: every cmd_id this agent has seen, so a command runs at most once.

MQTT QoS 1 delivers at least once: a reconnect, a broker restart or the server retrying can hand the same
command to the agent again, also after the agent restarted. The ledger is written (atomically: temporary
file, fsync, rename) before a command starts, so a second delivery finds the id and gets the stored result
instead of a second run. It keeps the newest ``LIMIT`` ids; only the newest ``OUTPUT_LIMIT`` keep their
stdout/stderr tails, which bounds both the file and the memory holding it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from nodefoundry_agent import protocol

log = logging.getLogger(__name__)

LIMIT = 1000
OUTPUT_LIMIT = 50
FORMAT_VERSION = 1


class Ledger:
    def __init__(self, path: Path, limit: int = LIMIT, output_limit: int = OUTPUT_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self.output_limit = output_limit
        self._records: dict[str, dict[str, Any]] = {}  # insertion order = age
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the file; an unreadable one is set aside (``.corrupt``) rather than stopping the agent."""
        try:
            data = json.loads(self.path.read_text())
            records = {record["cmd_id"]: record for record in data["commands"] if _well_formed(record)}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error("command ledger %s is unreadable (%s); starting with an empty one", self.path, err)
            self._set_aside()
            return
        with self._lock:
            self._records = records

    def get(self, cmd_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(cmd_id)
            return dict(record) if record else None

    def begin(self, cmd_id: str, command: str, boot_id: str | None = None) -> None:
        """Record a command as accepted, on disk, before it runs; raises OSError (and forgets it) when that fails."""
        try:
            self._store({"cmd_id": cmd_id, "command": command, "state": "accepted", "boot_id": boot_id, "result": {}})
        except OSError:
            with self._lock:
                self._records.pop(cmd_id, None)
            raise

    def finish(self, cmd_id: str, command: str, state: str, result: dict[str, Any]) -> None:
        """Record a final state with its result; a failed write is logged (the command already ran)."""
        record = {"cmd_id": cmd_id, "command": command, "state": state, "result": result}
        try:
            self._store(record)
        except OSError as err:
            log.error("cannot record the result of %s in %s: %s", cmd_id, self.path, err)

    def mark(self, cmd_id: str, state: str) -> None:
        """An intermediate state, kept in memory only: after a restart the command counts as interrupted."""
        with self._lock:
            if cmd_id in self._records:
                self._records[cmd_id]["state"] = state

    def unfinished(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(record) for record in self._records.values() if record["state"] not in protocol.FINAL_STATES]

    def _store(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.pop(record["cmd_id"], None)
            self._records[record["cmd_id"]] = record
            self._trim()
            self._write()

    def _trim(self) -> None:
        while len(self._records) > self.limit:
            del self._records[next(iter(self._records))]
        for record in list(self._records.values())[: -self.output_limit or None]:
            for key in ("stdout", "stderr"):
                record["result"].pop(key, None)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        body = json.dumps({"version": FORMAT_VERSION, "commands": list(self._records.values())}, separators=(",", ":"))
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _set_aside(self) -> None:
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".corrupt"))
        except OSError as err:
            log.error("cannot move the unreadable ledger aside: %s", err)


def _well_formed(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("cmd_id"), str)
        and record.get("state") in protocol.COMMAND_STATES
        and isinstance(record.get("result"), dict)
    )
