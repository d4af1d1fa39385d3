"""The HTTP application: Flask app factory and its blueprints.

``create_app`` takes the configuration and the store; nothing happens at
import time. Blueprints: ``nodes`` (REST API, token auth), ``commands``
(agent commands, same auth), ``boot`` (iPXE, preseed, installer callbacks,
downloads), ``health``.
"""

from __future__ import annotations

import time

from flask import Flask
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..store import Store
from . import boot, commands, health, nodes
from .common import ApiError, json_error

HTTP_ERROR_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}


def create_app(config: Config, store: Store, started_at: float | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.compact = True  # type: ignore[attr-defined]
    app.extensions["nodefoundry"] = {
        "config": config,
        "store": store,
        "started_at": started_at or time.time(),
    }
    app.register_blueprint(nodes.blueprint)
    app.register_blueprint(commands.blueprint)
    app.register_blueprint(boot.blueprint)
    app.register_blueprint(health.blueprint)

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # type: ignore[no-untyped-def]
        return json_error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        code = exc.code or 500
        return json_error(code, HTTP_ERROR_MESSAGES.get(code, (exc.name or "error").lower()))

    @app.errorhandler(Exception)
    def _crash(exc: Exception):  # type: ignore[no-untyped-def]
        app.logger.exception("unhandled error")
        return json_error(500, "internal server error")

    return app
