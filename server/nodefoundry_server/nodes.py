"""Node records outside the lifecycle: editable fields, updates, deletion.

``parse_fields`` turns a JSON body into validated column values; ``update``
applies them in one transaction with one event per changed field.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Any

from . import validate
from .lifecycle import NodeNotFound
from .store import Store, add_event, now
from .validate import InvalidValue

EDITABLE: dict[str, Callable[[Any], Any]] = {
    "hostname": validate.hostname,
    "ip": validate.ipv4,
    "netmask": validate.netmask,
    "gateway": lambda value: validate.ipv4(value, "gateway"),
    "dns": validate.dns_list,
    "labels": validate.labels,
    "profile": lambda value: validate.name(value, "profile"),
}


def parse_fields(body: Mapping[str, Any], profiles: Mapping[str, Any]) -> dict[str, Any]:
    """Validate editable fields; ``None`` (JSON null) or "" clears a field."""
    unknown = sorted(set(body) - set(EDITABLE))
    if unknown:
        raise InvalidValue(f"unknown field {unknown[0]!r}; editable: {', '.join(EDITABLE)}")
    fields: dict[str, Any] = {}
    for key, parse in EDITABLE.items():
        if key not in body:
            continue
        value = body[key]
        fields[key] = None if value in (None, "", [], {}) else parse(value)
    if fields.get("profile") and fields["profile"] not in profiles:
        raise InvalidValue(
            f"unknown profile {fields['profile']!r}; configured: {', '.join(sorted(profiles)) or 'none'}"
        )
    return fields


def check_network(node: Mapping[str, Any]) -> None:
    """A static configuration must be complete and coherent before it reaches the installer."""
    ip, mask, gateway = node.get("ip"), node.get("netmask"), node.get("gateway")
    if gateway and not (ip and mask):
        raise InvalidValue("gateway needs ip and netmask")
    if ip and mask and gateway:
        network = ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)
        if ipaddress.IPv4Address(gateway) not in network:
            raise InvalidValue(f"gateway {gateway} is not in {network}")


def update(store: Store, mac: str, fields: dict[str, Any], *, source: str, actor: str | None) -> dict[str, Any]:
    """Apply field changes; unchanged values write nothing and add no event."""
    stamp = now()
    with store.write() as conn:
        row = conn.execute("SELECT * FROM nodes WHERE mac = ?", (mac,)).fetchone()
        if row is None:
            raise NodeNotFound()
        current = {key: _decode(key, row[key]) for key in EDITABLE}
        changed = {key: value for key, value in fields.items() if current[key] != value}
        check_network({**current, **changed})
        if changed:
            assignments = ", ".join(f"{key} = ?" for key in changed)
            conn.execute(
                f"UPDATE nodes SET {assignments}, updated_at = ?, revision = revision + 1 WHERE mac = ?",
                [*(_encode(value) for value in changed.values()), stamp, mac],
            )
            for key, value in changed.items():
                add_event(conn, mac, source, "updated", field=key, old=current[key], new=value, actor=actor, at=stamp)
    return store.get_node(mac) or {}


def delete(store: Store, mac: str, *, source: str, actor: str | None) -> None:
    """Remove a node; its event history stays, ending with a ``deleted`` event."""
    with store.write() as conn:
        row = conn.execute("SELECT status FROM nodes WHERE mac = ?", (mac,)).fetchone()
        if row is None:
            raise NodeNotFound()
        conn.execute("DELETE FROM nodes WHERE mac = ?", (mac,))
        add_event(conn, mac, source, "deleted", field="status", old=row["status"], actor=actor)


def _decode(key: str, value: Any) -> Any:
    return json.loads(value) if key in ("dns", "labels") and value else value


def _encode(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
