"""REST API under /api/v1: nodes, their events, bulk install. Bearer-token auth."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from .. import boot, lifecycle, nodes, validate
from ..lifecycle import LifecycleError, NodeExists, NodeNotFound, TransitionRefused
from ..mqtt import credentials
from ..store import STATUSES
from ..validate import InvalidValue
from .common import (
    ApiError,
    actor,
    authenticate,
    challenge,
    config,
    int_arg,
    json_body,
    no_content,
    path_mac,
    request_urls,
    store,
)
from .openapi import document as openapi_document

blueprint = Blueprint("nodes", __name__, url_prefix="/api/v1")

MAX_BULK = 10000
ACTIONS = ("install", "reinstall")
NO_STORE = {"Cache-Control": "no-store"}  # answers that carry a secret


blueprint.before_request(authenticate)
blueprint.after_request(challenge)


@blueprint.get("/nodes")
def list_nodes() -> Response:
    try:
        wanted = validate.query_filter(request.args.getlist("status"), STATUSES, "status")
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    limit = int_arg("limit", None, 1, 100000)
    offset = int_arg("offset", 0, 0, 10**9) or 0
    found, total = store().list_nodes(wanted, limit, offset)
    response = jsonify(found)
    response.headers["X-Total-Count"] = str(total)
    return response


@blueprint.post("/nodes")
def create_node() -> tuple[Response, int, dict[str, str]]:
    body = json_body()
    mac = path_mac(body.get("mac"))  # type: ignore[arg-type]
    try:
        fields = nodes.parse_fields({k: v for k, v in body.items() if k != "mac"}, config().profiles)
        fields = {key: value for key, value in fields.items() if value is not None}
        nodes.check_network(fields)
        node = lifecycle.register(store(), mac, fields, source="api", actor=actor())
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    except NodeExists as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify(node), 201, {"Location": url_for("nodes.get_node", mac=mac)}


@blueprint.get("/nodes/<mac>")
def get_node(mac: str) -> Response:
    node = store().get_node(path_mac(mac))
    if node is None:
        raise ApiError(404, "node not found")
    return jsonify(node)


@blueprint.patch("/nodes/<mac>")
def patch_node(mac: str) -> Response:
    mac = path_mac(mac)
    body = json_body()
    try:
        fields = nodes.parse_fields(body, config().profiles)
        return jsonify(nodes.update(store(), mac, fields, source="api", actor=actor()))
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    except NodeNotFound as exc:
        raise ApiError(404, str(exc)) from None


@blueprint.delete("/nodes/<mac>")
def delete_node(mac: str) -> Response:
    try:
        nodes.delete(store(), path_mac(mac), source="api", actor=actor())
    except NodeNotFound as exc:
        raise ApiError(404, str(exc)) from None
    return no_content()


@blueprint.put("/nodes/<mac>")
def act_on_node(mac: str) -> Response:
    """Seed-compatible action endpoint: ``{"action": "install" | "reinstall"}``."""
    mac = path_mac(mac)
    body = json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise ApiError(400, "invalid request body")
    if action not in ACTIONS:
        raise ApiError(400, "unknown action")
    try:
        return jsonify(lifecycle.start_install(store(), mac, action, source="api", actor=actor()))
    except NodeNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except LifecycleError as exc:
        raise ApiError(400, str(exc)) from None


@blueprint.post("/nodes/bulk")
def bulk_action() -> Response:
    """Install or reinstall many nodes in one transaction; one result per MAC."""
    body = json_body()
    action, macs, dry_run = body.get("action"), body.get("macs"), body.get("dry_run", False)
    if not isinstance(action, str) or not action:
        raise ApiError(400, "invalid request body")
    if action not in ACTIONS:
        raise ApiError(400, "unknown action")
    if not isinstance(macs, list) or not isinstance(dry_run, bool):
        raise ApiError(400, "invalid request body")
    if len(macs) > MAX_BULK:
        raise ApiError(400, f"at most {MAX_BULK} MACs per call")
    results: dict[str, dict[str, Any]] = {}
    valid: list[str] = []
    for raw in macs:
        try:
            mac = validate.mac(raw)
        except InvalidValue as exc:
            results[str(raw)] = {"mac": str(raw), "ok": False, "changed": False, "error": str(exc)}
            continue
        if mac not in results:
            valid.append(mac)
            results[mac] = {}
    for outcome in lifecycle.start_install_many(store(), valid, action, source="api", actor=actor(), dry_run=dry_run):
        results[outcome.mac] = outcome.json()
    listed = list(results.values())
    summary = {
        "changed": sum(1 for r in listed if r["changed"]),
        "unchanged": sum(1 for r in listed if r["ok"] and not r["changed"]),
        "failed": sum(1 for r in listed if not r["ok"]),
    }
    return jsonify(action=action, dry_run=dry_run, results=listed, summary=summary)


@blueprint.get("/nodes/<mac>/events")
def node_events(mac: str) -> Response:
    mac = path_mac(mac)
    limit = int_arg("limit", 100, 1, 1000) or 100
    after = int_arg("after", 0, 0, 2**62) or 0
    if store().get_node_row(mac) is None and not store().has_events(mac):
        raise ApiError(404, "node not found")
    return jsonify(store().node_events(mac, limit, after))


@blueprint.post("/nodes/<mac>/credentials")
def issue_credentials(mac: str) -> tuple[Response, int, dict[str, str]]:
    """The agent's env file for a node set up without the installer, with a freshly minted broker password
    when the server maintains the broker's accounts (201); otherwise the same env without one (200)."""
    mac = path_mac(mac)
    cfg, urls = config(), request_urls()
    if not credentials.delivers_node_credentials(cfg):
        if store().get_node_row(mac) is None:
            raise ApiError(404, "node not found")
        body = {"mac": mac, "credentials_delivered": False, "agent_env": boot.agent_env(cfg, mac, urls)}
        return jsonify(body), 200, NO_STORE
    try:
        password = credentials.issue(store(), mac, source="api", actor=actor())
    except NodeNotFound as exc:
        raise ApiError(404, str(exc)) from None
    except TransitionRefused as exc:
        raise ApiError(409, str(exc)) from None
    body = {
        "mac": mac,
        "credentials_delivered": True,
        "username": credentials.node_username(mac),
        "password": password,
        "agent_env": boot.agent_env(cfg, mac, urls, password),
    }
    return jsonify(body), 201, NO_STORE


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
