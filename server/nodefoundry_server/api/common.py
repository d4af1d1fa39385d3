"""Shared by the blueprints: the error shape ``{"error": ...}``, the JSON body, the app context."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify, request

from .. import validate
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
