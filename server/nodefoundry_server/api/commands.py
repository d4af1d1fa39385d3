"""Commands for node agents under /api/v1: queue one or many, read their state and results.

HTTP workers only store ``queued`` commands; the services process publishes them over MQTT when the
node is online and records the agent's results (see ``mqtt.commands``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from nodefoundry_agent import protocol
from nodefoundry_agent.protocol import ProtocolError

from .. import commands, validate
from ..validate import InvalidValue
from .common import ApiError, actor, authenticate, challenge, config, int_arg, json_body, path_mac, store
from .nodes import MAX_BULK

blueprint = Blueprint("commands", __name__, url_prefix="/api/v1")
blueprint.before_request(authenticate)
blueprint.after_request(challenge)

MAX_TIMEOUT_SECONDS = 86400


def _command_request(body: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
    """(command, args, timeout) from a request body, checked as the agent will check them."""
    command, args = body.get("command"), body.get("args")
    timeout = body.get("timeout", config().command_timeout)
    if not isinstance(command, str) or not command:
        raise ApiError(400, "invalid request body")
    try:
        args = protocol.check_command_args(command, {} if args is None else args)
    except ProtocolError as exc:
        raise ApiError(400, str(exc)) from None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= MAX_TIMEOUT_SECONDS:
        raise ApiError(400, f"invalid timeout: an integer from 1 to {MAX_TIMEOUT_SECONDS} (seconds)")
    return command, args, timeout


@blueprint.post("/nodes/<mac>/commands")
def create_command(mac: str) -> tuple[Response, int, dict[str, str]]:
    mac = path_mac(mac)
    command, args, timeout = _command_request(json_body())
    [(_mac, command_id)] = commands.create_many(store(), [mac], command, args, timeout, actor())
    if command_id is None:
        raise ApiError(404, "node not found")
    location = url_for("commands.get_command", command_id=command_id)
    return jsonify(commands.get(store(), command_id)), 201, {"Location": location}


@blueprint.get("/nodes/<mac>/commands")
def list_node_commands(mac: str) -> Response:
    mac = path_mac(mac)
    try:
        wanted = validate.query_filter(request.args.getlist("state"), commands.STATES, "state")
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    limit = int_arg("limit", 100, 1, 1000) or 100
    offset = int_arg("offset", 0, 0, 10**9) or 0
    if store().get_node_row(mac) is None and not commands.has_commands(store(), mac):
        raise ApiError(404, "node not found")
    found, total = commands.list_for_node(store(), mac, wanted, limit, offset)
    response = jsonify(found)
    response.headers["X-Total-Count"] = str(total)
    return response


@blueprint.get("/commands/<command_id>")
def get_command(command_id: str) -> Response:
    found = commands.get(store(), command_id)
    if found is None:
        raise ApiError(404, "command not found")
    return jsonify(found)


@blueprint.post("/commands")
def bulk_commands() -> Response:
    """The same command for many nodes, queued in one transaction; one result per distinct MAC."""
    body = json_body()
    macs = body.get("macs")
    if not isinstance(macs, list):
        raise ApiError(400, "invalid request body")
    if len(macs) > MAX_BULK:
        raise ApiError(400, f"at most {MAX_BULK} MACs per call")
    command, args, timeout = _command_request(body)
    results: dict[str, dict[str, Any]] = {}
    for raw in macs:
        try:
            results.setdefault(validate.mac(raw), {})
        except InvalidValue as exc:
            results[str(raw)] = {"mac": str(raw), "ok": False, "error": str(exc)}
    valid = [mac for mac, result in results.items() if not result]
    for mac, command_id in commands.create_many(store(), valid, command, args, timeout, actor()):
        ok = command_id is not None
        results[mac] = {"mac": mac, "ok": ok, **({"id": command_id} if ok else {"error": "node not found"})}
    listed = list(results.values())
    created = sum(1 for result in listed if result["ok"])
    return jsonify(command=command, results=listed, summary={"created": created, "failed": len(listed) - created})
