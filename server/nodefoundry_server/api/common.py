"""Shared by the blueprints: the error shape ``{"error": ...}``, the JSON body, the app context."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, g, jsonify, request

from .. import auth, validate
from ..boot import Urls
from ..config import Config
from ..store import Store
from ..validate import InvalidValue


class ApiError(Exception):
    """Raise from a view to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def no_content() -> Response:
    """204 with no body and so no Content-Type."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def json_body() -> dict[str, Any]:
    """The request's JSON object, or 400 ``invalid request body``."""
    body = request.get_json(silent=True, force=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid request body")
    return body


def path_mac(raw: object) -> str:
    """A MAC from the URL or body, normalised, or 400 ``invalid MAC address format``."""
    try:
        return validate.mac(raw)
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None


def config() -> Config:
    return current_app.extensions["nodefoundry"]["config"]


def store() -> Store:
    return current_app.extensions["nodefoundry"]["store"]


READ_METHODS = ("GET", "HEAD", "OPTIONS")


def authenticate() -> None:
    """before_request of the /api/v1 blueprints: a bearer token; read-only tokens may only read."""
    if request.endpoint == "nodes.openapi":
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    principal = auth.authenticate(store(), token.strip(), config().api_token) if scheme.lower() == "bearer" else None
    if principal is None:
        raise ApiError(401, "missing or invalid token")
    if request.method not in READ_METHODS and not principal.can_write:
        raise ApiError(403, "read-only token cannot change anything")
    g.principal = principal


def challenge(response: Response) -> Response:
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="nodefoundry"'
    return response


def actor() -> str:
    """The name of the token behind this request, recorded in events."""
    return g.principal.name


def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError(400, f"invalid {name}: an integer from {low} to {high}")
    return int(raw)


def request_urls() -> Urls:
    """Base URL for generated links: NF_SERVER_ADDR, else the Host the node used."""
    host = config().server_addr or request.headers.get("Host", "")  # as sent: werkzeug's request.host rewrites it
    try:
        name, _port = validate.host_port(host, "Host header", 80)
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    if not name or ":" in name:  # empty (unparseable Host) or IPv6: the installer path is IPv4
        raise ApiError(400, "invalid Host header: nodes must reach the server by an IPv4 address or name")
    return Urls(f"http://{host}")
