"""GET /health: seed fields (``status``, ``uptime``) plus each component's state."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from .. import __version__, boot
from ..store import parse_stamp
from .common import config, store

blueprint = Blueprint("health", __name__)

HEALTHY_STATES = ("ok", "disabled")
# A background component that has not refreshed its row for this long is reported stale.
STALE_AFTER_SECONDS = 120


def go_duration(seconds: float) -> str:
    """Uptime in the seed's Go style: ``45s``, ``5m30s``, ``2h0m5s``."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _age_seconds(stamp: str) -> float:
    return (datetime.now(UTC) - parse_stamp(stamp)).total_seconds()


def _store_component() -> dict[str, Any]:
    conn = store().conn()
    counts = dict(conn.execute("SELECT status, COUNT(*) FROM nodes GROUP BY status").fetchall())
    version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    return {"state": "ok", "schema_version": version, "nodes": counts}


def _background_components() -> dict[str, dict[str, Any]]:
    found = {}
    for name, info in store().components().items():
        entry = {"state": info["state"], **({"detail": info["detail"]} if info["detail"] else {})}
        if info["state"] == "ok" and _age_seconds(info["updated_at"]) > STALE_AFTER_SECONDS:
            entry = {"state": "stale", "detail": f"no report since {info['updated_at']}"}
        found[name] = entry
    return found


@blueprint.get("/health")
def health() -> tuple[Response, int]:
    uptime = time.time() - current_app.extensions["nodefoundry"]["started_at"]
    cfg = config()
    arches = boot.available_arches(cfg.assets_dir)
    components: dict[str, dict[str, Any]] = {
        "http": {"state": "ok", "workers": cfg.http_workers, "threads": cfg.http_threads},
        "assets": {"state": "ok" if arches else "missing", "arches": list(arches)}
        | ({} if arches else {"detail": "run 'nodefoundry-server assets import'"}),
    }
    try:
        components["store"] = _store_component()
        components.update(_background_components())
    except sqlite3.Error as exc:
        components["store"] = {"state": "error", "detail": str(exc)}
    healthy = all(component["state"] in HEALTHY_STATES for component in components.values())
    status = "ok" if healthy else ("error" if components["store"]["state"] == "error" else "degraded")
    body = {
        "status": status,
        "uptime": go_duration(uptime),
        "uptime_seconds": int(uptime),
        "version": __version__,
        "components": components,
    }
    return jsonify(body), 503 if status == "error" else 200
