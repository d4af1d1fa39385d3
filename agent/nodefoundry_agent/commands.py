"""The life of a command: intake, at-most-once bookkeeping, execution in a worker, result reports.

States follow ``protocol.COMMAND_STATES``: ``accepted -> running -> succeeded|failed|timed_out``, or
``rejected``/``expired`` without running. Intake runs in the MQTT thread and is quick (parse, ledger
lookup, checks, one small file write); the command itself runs in its own thread, so a long ``exec``
never holds up the MQTT loop. ``report(cmd_id, state, fields)`` hands each state change to the outbox.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from nodefoundry_agent import protocol
from nodefoundry_agent.handlers import POWER_COMMANDS, Handlers, NotAllowed, Outcome
from nodefoundry_agent.ledger import Ledger

log = logging.getLogger(__name__)

MAX_RUNNING = 4
Report = Callable[[str, str, dict[str, Any]], None]


class CommandProcessor:
    def __init__(self, ledger: Ledger, handlers: Handlers, report: Report, boot_id: Callable[[], str | None]) -> None:
        self.ledger = ledger
        self.handlers = handlers
        self.report = report
        self.boot_id = boot_id
        self._slots = threading.BoundedSemaphore(MAX_RUNNING)

    def handle(self, payload: bytes, retained: bool) -> None:
        """One message from ``node/<mac>/command``; never raises for bad input."""
        try:
            command = protocol.parse_command(payload)
        except protocol.ProtocolError as err:
            self._reject_malformed(payload, err)
            return
        if command["cmd_id"] is None:
            if retained:  # a retained seed-style command would run again on every reconnect
                log.warning("ignoring a retained %r command without cmd_id", command["command"][:64])
                return
            command["cmd_id"] = "seed-" + secrets.token_hex(8)
        self._intake(command)

    def recover(self, current_boot_id: str | None) -> None:
        """Settle commands a previous run left unfinished; a reboot succeeded if the boot id changed."""
        for record in self.ledger.unfinished():
            self._final(record["cmd_id"], record.get("command", ""), _recovered(record, current_boot_id))

    def _intake(self, command: dict[str, Any]) -> None:
        cmd_id, name = command["cmd_id"], command["command"][:64]  # an unknown name is logged and stored: bound it
        if self._is_duplicate(cmd_id):
            return
        now = datetime.now(UTC)
        if command["deadline"] is not None and command["deadline"] <= now:
            deadline, clock = protocol.timestamp(command["deadline"]), protocol.timestamp(now)
            detail = f"deadline {deadline} passed (agent clock {clock})"
            self._final(cmd_id, name, Outcome("expired", detail=detail))
            return
        try:
            protocol.check_command_args(name, command["args"])
            self.handlers.check(name, command["args"])
        except (protocol.ProtocolError, NotAllowed) as err:
            self._final(cmd_id, name, Outcome("rejected", detail=str(err)))
            return
        if self._begin(cmd_id, name):
            threading.Thread(target=self._execute, args=(command,), name=f"command-{cmd_id}", daemon=True).start()

    def _is_duplicate(self, cmd_id: str) -> bool:
        record = self.ledger.get(cmd_id)
        if record is None:
            return False
        log.info("command %s delivered again: re-publishing its state %s, not running it", cmd_id, record["state"])
        self.report(cmd_id, record["state"], record["result"])
        return True

    def _begin(self, cmd_id: str, name: str) -> bool:
        """Take a worker slot and record the command on disk; a command that cannot be recorded must not run.

        Neither refusal is recorded in the ledger: the command never ran, so a later delivery may run it.
        """
        if not self._slots.acquire(blocking=False):
            self.report(cmd_id, "rejected", {"detail": f"busy: {MAX_RUNNING} commands are running"})
            return False
        try:
            self.ledger.begin(cmd_id, name, self.boot_id() if name in POWER_COMMANDS else None)
        except OSError as err:
            self._slots.release()
            self.report(cmd_id, "rejected", {"detail": f"cannot record the command, so it is not run: {err}"})
            return False
        log.info("command %s (%s) accepted", cmd_id, name)
        self.report(cmd_id, "accepted", {})
        return True

    def _execute(self, command: dict[str, Any]) -> None:
        cmd_id, name = command["cmd_id"], command["command"]
        self.ledger.mark(cmd_id, "running")
        self.report(cmd_id, "running", {})
        try:
            outcome = self.handlers.run(name, command["args"], _seconds_left(command["deadline"]))
        except Exception as err:  # a failing handler ends its command, never the agent
            log.exception("command %s (%s) failed inside the agent", cmd_id, name)
            outcome = Outcome("failed", detail=f"agent error: {type(err).__name__}: {err}")
        finally:
            self._slots.release()
        if outcome is None:
            log.info("command %s (%s) issued; its result follows after the next boot", cmd_id, name)
        else:
            self._final(cmd_id, name, outcome)

    def _final(self, cmd_id: str, name: str, outcome: Outcome) -> None:
        result = {key: value for key, value in outcome.fields().items() if value is not None}
        why = outcome.detail or (f"exit code {outcome.exit_code}" if outcome.exit_code is not None else "")
        log.info("command %s (%s) %s%s", cmd_id, name, outcome.state, f": {why}" if why else "")
        self.ledger.finish(cmd_id, name, outcome.state, result)
        self.report(cmd_id, outcome.state, result)

    def _reject_malformed(self, payload: bytes, err: protocol.ProtocolError) -> None:
        """Answer ``rejected`` when the payload still names a usable cmd_id; otherwise only log it."""
        cmd_id = _salvage_cmd_id(payload)
        if cmd_id is None:
            log.warning("dropping a malformed command: %s", err)
        elif not self._is_duplicate(cmd_id):
            self._final(cmd_id, "", Outcome("rejected", detail=str(err)))


def _salvage_cmd_id(payload: bytes) -> str | None:
    if len(payload) > protocol.MAX_PAYLOAD_BYTES[protocol.COMMAND]:
        return None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    cmd_id = data.get("cmd_id") if isinstance(data, dict) else None
    return cmd_id if protocol.is_cmd_id(cmd_id) else None


def _seconds_left(deadline: datetime | None) -> float | None:
    return None if deadline is None else (deadline - datetime.now(UTC)).total_seconds()


def _recovered(record: dict[str, Any], current_boot_id: str | None) -> Outcome:
    if record.get("command") not in POWER_COMMANDS:
        return Outcome("failed", detail="interrupted: the agent stopped before the command finished")
    before = record.get("boot_id")
    if not before or not current_boot_id:
        return Outcome("failed", detail="boot id unknown: cannot tell whether the node restarted")
    if before == current_boot_id:
        return Outcome("failed", detail=f"the node did not restart (boot id still {before})")
    return Outcome("succeeded", detail=f"the node restarted (boot id {before} -> {current_boot_id})")
