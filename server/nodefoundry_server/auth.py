"""API tokens and per-install tokens.

API tokens are random strings shown once; only their SHA-256 is stored.
Install tokens are never stored: each is an HMAC of the node's MAC and the
random nonce of its current install, keyed by a server secret. A new install
draws a new nonce and the end of an install clears it, so a token works only
while that node is installing, for that install.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass

from . import validate
from .store import Store, now

ROLES = ("admin", "readonly")
TOKEN_PREFIX = "nf_"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def can_write(self) -> bool:
        return self.role == "admin"


class TokenNameTaken(Exception):
    pass


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, name: str, role: str) -> str:
    """Store a new token's hash and return the token (the only time it is seen)."""
    validate.name(name, "token name")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with store.write() as conn:
            conn.execute(
                "INSERT INTO api_tokens (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
                (name, role, _digest(token), now()),
            )
    except sqlite3.IntegrityError:
        raise TokenNameTaken(f"a token named {name!r} exists; revoke it first") from None
    return token


def revoke_token(store: Store, name: str) -> bool:
    with store.write() as conn:
        return conn.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount == 1


def list_tokens(store: Store) -> list[dict[str, str]]:
    rows = store.conn().execute("SELECT name, role, created_at FROM api_tokens ORDER BY name")
    return [dict(row) for row in rows]


def has_admin_token(store: Store) -> bool:
    return store.conn().execute("SELECT 1 FROM api_tokens WHERE role = 'admin' LIMIT 1").fetchone() is not None


def authenticate(store: Store, token: str, env_admin_token: str = "") -> Principal | None:
    """The principal a bearer token stands for, or None."""
    if env_admin_token and hmac.compare_digest(token.encode(), env_admin_token.encode()):
        return Principal("NF_API_TOKEN", "admin")
    row = store.conn().execute("SELECT name, role FROM api_tokens WHERE token_hash = ?", (_digest(token),)).fetchone()
    return Principal(row["name"], row["role"]) if row else None


def install_token(store: Store, mac: str, nonce: str) -> str:
    secret = store.setting("install_token_secret")
    if not secret:  # written by the first migration; without it every token would be guessable
        raise RuntimeError("install_token_secret is missing from the settings table")
    return hmac.new(secret.encode(), f"{mac}:{nonce}".encode(), hashlib.sha256).hexdigest()[:40]


def install_token_valid(store: Store, mac: str, nonce: str, presented: str) -> bool:
    return hmac.compare_digest(install_token(store, mac, nonce).encode(), presented.encode())
