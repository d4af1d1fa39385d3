"""The mosquitto role seeds the same ACL the server writes, so the server's first rewrite changes nothing."""

from __future__ import annotations

from pathlib import Path

import jinja2

from nodefoundry_server.mqtt import credentials

ROLE = Path(__file__).resolve().parents[2] / "roles" / "mosquitto"


def render_role_acl(server_user: str) -> str:
    # Ansible's template module renders with these Jinja2 settings (trim_blocks on, trailing newline kept).
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template("acl.j2").render(nodefoundry_mosquitto_server_username=server_user)


def test_seed_acl_is_the_servers() -> None:
    for user in (credentials.SERVER_USER, "broker-admin"):
        assert render_role_acl(user) == credentials.acl_text(user)


def test_default_server_user_matches() -> None:
    defaults = (ROLE / "defaults" / "main.yml").read_text()
    assert f"nodefoundry_mosquitto_server_username: {credentials.SERVER_USER}\n" in defaults
