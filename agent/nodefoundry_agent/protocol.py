"""The MQTT protocol between agents and the server: topics and payload schemas.

Both sides import this module, so a topic or a field is spelled in one place.
Every ``parse_*`` function takes the raw payload bytes from the broker and
either returns a clean dict or raises ``ProtocolError`` with a short reason
(the receiver logs it, counts it and drops the message). Nothing here trusts
the payload: sizes, types and values are all checked.

Topics (``<mac>`` = 12 lower-case hex digits, the node identity):

=============================  =========  ========  ======================================
topic                          direction  retained  payload
=============================  =========  ========  ======================================
``node/<mac>/status``          agent ->   no        seed fields + ``agent_version``
``node/<mac>/state``           agent ->   yes       ``online`` birth / ``offline`` will
``node/<mac>/facts``           agent ->   yes       OS, kernel, CPU, memory, disks, IPs
``node/<mac>/command``         -> agent   no        ``{cmd_id, command, args, deadline}``
``node/<mac>/result/<cmd_id>`` agent ->   no        command state changes and output
=============================  =========  ========  ======================================
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

TOPIC_ROOT = "node"
STATUS, STATE, FACTS, COMMAND, RESULT = "status", "state", "facts", "command", "result"

# Subscriptions of the server: everything an agent may publish.
SERVER_SUBSCRIPTIONS = (f"{TOPIC_ROOT}/+/{STATUS}", f"{TOPIC_ROOT}/+/{STATE}", f"{TOPIC_ROOT}/+/{FACTS}",
                        f"{TOPIC_ROOT}/+/{RESULT}/+")  # fmt: skip

MAX_PAYLOAD_BYTES = {STATUS: 4096, STATE: 1024, FACTS: 65536, COMMAND: 16384, RESULT: 32768}
OUTPUT_TAIL_BYTES = 4096  # stdout/stderr tails carried in a result

COMMANDS = ("reboot", "shutdown", "service", "facts", "ping", "exec")
SERVICE_ACTIONS = ("start", "stop", "restart", "status")
# accepted -> running -> succeeded|failed|timed_out, or rejected / expired without running.
COMMAND_STATES = ("accepted", "running", "succeeded", "failed", "timed_out", "rejected", "expired")
FINAL_STATES = ("succeeded", "failed", "timed_out", "rejected", "expired")
LIVENESS = ("online", "offline")

_MAC = re.compile(r"^[0-9a-f]{12}$")
_CMD_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_UNIT = re.compile(r"^[A-Za-z0-9@_.:-]{1,200}$")
_EXEC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")


class ProtocolError(ValueError):
    """A topic or payload that does not follow the protocol; the message says why."""


# ---- topics -------------------------------------------------------------------------------------------------


def topic(mac: str, kind: str, cmd_id: str | None = None) -> str:
    """``node/<mac>/<kind>`` (or ``node/<mac>/result/<cmd_id>``)."""
    return f"{TOPIC_ROOT}/{mac}/{kind}" + (f"/{cmd_id}" if kind == RESULT else "")


def parse_topic(name: str) -> tuple[str, str, str | None]:
    """``(mac, kind, cmd_id)`` of an agent topic; the MAC in the topic is the node's identity."""
    parts = name.split("/")
    if len(parts) not in (3, 4) or parts[0] != TOPIC_ROOT or not _MAC.fullmatch(parts[1]):
        raise ProtocolError(f"not a node topic: {name[:80]!r}")
    kind = parts[2]
    if len(parts) == 4:
        if kind != RESULT or not _CMD_ID.fullmatch(parts[3]):
            raise ProtocolError(f"bad result topic: {name[:80]!r}")
        return parts[1], kind, parts[3]
    if kind not in (STATUS, STATE, FACTS, COMMAND):
        raise ProtocolError(f"unknown topic kind {kind[:20]!r}")
    return parts[1], kind, None


# ---- encoding -----------------------------------------------------------------------------------------------


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON; every message on the wire goes through here (never string formatting)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 UTC with a ``Z``, as the seed's agent sent it."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise ProtocolError(f"bad timestamp {str(text)[:40]!r}") from None
    if moment.tzinfo is None:
        raise ProtocolError("timestamp without a time zone")
    return moment.astimezone(UTC)


def _load(kind: str, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES[kind]:
        raise ProtocolError(f"{kind} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES[kind]}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{kind} payload is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind} payload is not a JSON object")
    return data


def _optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    wanted = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in wanted):  # JSON true is no number
        raise ProtocolError(f"field {key!r} has the wrong type")
    return value


def _matching(value: str | None, pattern: re.Pattern[str], key: str) -> str | None:
    if value is not None and not pattern.fullmatch(value):
        raise ProtocolError(f"field {key!r} is malformed")
    return value


def _ipv4(value: str | None) -> str | None:
    """A dotted quad as ``ipaddress`` accepts it (no leading zeros), checked by a regex: the server
    validates every status of every node, and ``IPv4Address`` costs more than the rest of the parse."""
    if value in (None, ""):
        return None
    if not _IPV4.fullmatch(value):
        raise ProtocolError("field 'ip' is not an IPv4 address")
    return value


# ---- agent -> server ----------------------------------------------------------------------------------------


def status_payload(ip: str | None, hostname: str, uptime: int, agent_version: str, session: str) -> bytes:
    """The seed's status fields plus the agent's version and session."""
    return encode(
        {
            "status": "installed",
            "ip": ip or "",
            "hostname": hostname,
            "uptime": uptime,
            "timestamp": timestamp(),
            "agent_version": agent_version,
            "session": session,
        }
    )


def parse_status(payload: bytes) -> dict[str, Any]:
    data = _load(STATUS, payload)
    uptime = _optional(data, "uptime", (int, float), 0)
    if uptime < 0:
        raise ProtocolError("field 'uptime' is negative")
    return {
        "status": _optional(data, "status", str, "installed"),
        "ip": _ipv4(_optional(data, "ip", str)),
        "hostname": _matching(_optional(data, "hostname", str) or None, _HOSTNAME, "hostname"),
        "uptime": int(uptime),
        "timestamp": _optional(data, "timestamp", str),
        "agent_version": _matching(_optional(data, "agent_version", str), _VERSION, "agent_version"),
        "session": _matching(_optional(data, "session", str), _SESSION, "session"),
    }


def state_payload(state: str, session: str) -> bytes:
    """Birth (``online``) or will (``offline``); the session tells a stale will from a current one."""
    return encode({"state": state, "session": session, "timestamp": timestamp()})


def parse_state(payload: bytes) -> dict[str, Any]:
    data = _load(STATE, payload)
    state = _optional(data, "state", str)
    if state not in LIVENESS:
        raise ProtocolError("field 'state' must be online or offline")
    session = _matching(_optional(data, "session", str), _SESSION, "session")
    if session is None:
        raise ProtocolError("field 'session' is required")
    return {"state": state, "session": session, "timestamp": _optional(data, "timestamp", str)}


def parse_facts(payload: bytes) -> dict[str, Any]:
    """Facts are free-form but bounded (size checked in ``_load``); only the shape is enforced."""
    return _load(FACTS, payload)


def result_payload(cmd_id: str, state: str, **fields: Any) -> bytes:
    """One state change of a command: ``exit_code``, ``stdout``, ``stderr``, ``detail`` as they apply."""
    body = {"cmd_id": cmd_id, "state": state, "timestamp": timestamp()}
    body.update({key: value for key, value in fields.items() if value is not None})
    return encode(body)


def parse_result(payload: bytes, cmd_id: str) -> dict[str, Any]:
    data = _load(RESULT, payload)
    state = _optional(data, "state", str)
    if state not in COMMAND_STATES:
        raise ProtocolError(f"field 'state' must be one of {', '.join(COMMAND_STATES)}")
    if data.get("cmd_id", cmd_id) != cmd_id:
        raise ProtocolError("cmd_id in the payload differs from the topic")
    return {
        "cmd_id": cmd_id,
        "state": state,
        "exit_code": _optional(data, "exit_code", int),
        "stdout": _optional(data, "stdout", str),
        "stderr": _optional(data, "stderr", str),
        "detail": _optional(data, "detail", str),
        "timestamp": _optional(data, "timestamp", str),
    }


# ---- server -> agent ----------------------------------------------------------------------------------------


def is_cmd_id(value: Any) -> bool:
    """Whether ``value`` can name a command (and so a result topic); lets a receiver answer a malformed command."""
    return isinstance(value, str) and _CMD_ID.fullmatch(value) is not None


def command_payload(cmd_id: str, command: str, args: dict[str, Any], deadline: datetime) -> bytes:
    return encode({"cmd_id": cmd_id, "command": command, "args": args, "deadline": timestamp(deadline)})


def check_command_args(command: str, args: Any) -> dict[str, Any]:
    """The arguments each command accepts; shared by the API (400 on error) and the agent (rejected)."""
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:40]!r} (allowed: {', '.join(COMMANDS)})")
    if not isinstance(args, dict):
        raise ProtocolError("args must be a JSON object")
    if command == "service":
        if set(args) - {"unit", "action"} or args.get("action") not in SERVICE_ACTIONS:
            raise ProtocolError(f"service needs args unit and action ({', '.join(SERVICE_ACTIONS)})")
        _matching(args.get("unit") if isinstance(args.get("unit"), str) else "", _UNIT, "unit")
    elif command == "exec":
        if set(args) - {"name", "argv", "timeout"} or not isinstance(args.get("name"), str):
            raise ProtocolError("exec needs args name (an allow-listed executable), optional argv and timeout")
        _matching(args["name"], _EXEC_NAME, "name")
        argv = args.get("argv", [])
        if not isinstance(argv, list) or not all(isinstance(item, str) and len(item) <= 4096 for item in argv):
            raise ProtocolError("exec argv must be a list of strings")
        timeout = args.get("timeout", 60)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 86400:
            raise ProtocolError("exec timeout must be an integer between 1 and 86400")
    elif args:
        raise ProtocolError(f"{command} takes no args")
    return args


def parse_command(payload: bytes) -> dict[str, Any]:
    """A command for the agent. The seed form ``{"command": "reboot"}`` has no cmd_id and no deadline."""
    data = _load(COMMAND, payload)
    command = _optional(data, "command", str)
    if command is None:
        raise ProtocolError("field 'command' is required")
    cmd_id = _matching(_optional(data, "cmd_id", str), _CMD_ID, "cmd_id")
    deadline = _optional(data, "deadline", str)
    return {
        "cmd_id": cmd_id,
        "command": command,
        "args": _optional(data, "args", dict, {}),
        "deadline": parse_timestamp(deadline) if deadline else None,
    }
