"""Auth matrix against a real server: no token 401, read-only 403 on writes, admin everything."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ADMIN_TOKEN, SERVER_BIN, Server

MAC = "0a0000000001"

# (method, path, body) for every /api/v1 route, with whether it writes.
ROUTES = [
    ("GET", "/api/v1/nodes", None, False),
    ("GET", f"/api/v1/nodes/{MAC}", None, False),
    ("GET", f"/api/v1/nodes/{MAC}/events", None, False),
    ("POST", "/api/v1/nodes", {"mac": "0a0000000002"}, True),
    ("PATCH", f"/api/v1/nodes/{MAC}", {"hostname": "x1"}, True),
    ("PUT", f"/api/v1/nodes/{MAC}", {"action": "install"}, True),
    ("POST", "/api/v1/nodes/bulk", {"action": "install", "macs": [MAC], "dry_run": True}, True),
    ("DELETE", f"/api/v1/nodes/{MAC}", None, True),
]


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SERVER_BIN), *args], env=server.env, cwd=server.workdir, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("auth")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_tokens(shared_server):
    """A stored admin token and a read-only token, made with the real CLI."""
    made = {}
    for name, role in (("ops", "admin"), ("viewer", "readonly")):
        done = cli(shared_server, "token", "create", "--name", name, "--role", role)
        assert done.returncode == 0, done.stderr
        made[role] = done.stdout.strip()
    return made


@pytest.fixture
def server(shared_server):
    return shared_server


@pytest.fixture
def tokens(server, module_tokens):
    """The tokens, and node MAC freshly registered in ``discovered``."""
    server.api("DELETE", f"/api/v1/nodes/{MAC}")
    assert server.api("POST", "/api/v1/nodes", json={"mac": MAC}).status_code == 201
    return module_tokens


@pytest.mark.parametrize(("method", "path", "body", "writes"), ROUTES)
def test_no_token_or_a_wrong_one_is_401(server, tokens, method, path, body, writes):
    for token in (None, "nf_wrong", ""):
        response = server.api(method, path, token=token, json=body)
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid token"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    basic = server.api(method, path, token=None, json=body, headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    assert basic.status_code == 401


@pytest.mark.parametrize(("method", "path", "body", "writes"), ROUTES)
def test_read_only_token_reads_but_cannot_write(server, tokens, method, path, body, writes):
    response = server.api(method, path, token=tokens["readonly"], json=body)
    if writes:
        assert response.status_code == 403
        assert response.json() == {"error": "read-only token cannot change anything"}
    else:
        assert response.status_code == 200
    assert server.api("GET", f"/api/v1/nodes/{MAC}").json()["status"] == "discovered"


@pytest.mark.parametrize(("method", "path", "body", "writes"), ROUTES)
def test_stored_admin_token_may_do_everything(server, tokens, method, path, body, writes):
    response = server.api(method, path, token=tokens["admin"], json=body)
    assert response.status_code in (200, 201, 204)


def test_actor_is_recorded_with_the_token_name(server, tokens):
    server.api("PATCH", f"/api/v1/nodes/{MAC}", token=tokens["admin"], json={"hostname": "named"})
    events = server.api("GET", f"/api/v1/nodes/{MAC}/events").json()
    assert events[-1]["actor"] == "ops"


def test_revoked_token_stops_working(server, tokens):
    temporary = cli(server, "token", "create", "--name", "temporary", "--role", "readonly").stdout.strip()
    assert server.api("GET", "/api/v1/nodes", token=temporary).status_code == 200
    assert cli(server, "token", "revoke", "--name", "temporary").returncode == 0
    assert server.api("GET", "/api/v1/nodes", token=temporary).status_code == 401
    listed = cli(server, "token", "list").stdout
    assert "ops\tadmin" in listed and "temporary" not in listed
    assert cli(server, "token", "revoke", "--name", "temporary").returncode == 2


def test_token_names_are_unique(server, tokens):
    done = cli(server, "token", "create", "--name", "ops")
    assert done.returncode == 2 and "exists" in done.stderr


def test_public_routes_need_no_token(server, tokens):
    assert server.get("/health").status_code == 200
    assert server.get(f"/boot/{MAC}/boot.ipxe").status_code == 200
    assert server.get("/api/v1/openapi.json").status_code == 200


def test_first_start_without_nf_api_token_mints_and_prints_one(server_factory):
    server = server_factory(env={"NF_API_TOKEN": ""})
    server.start()
    token_file = server.db_path.parent / "admin.token"
    token = token_file.read_text().strip()
    assert token.startswith("nf_") and oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert f"Admin token {token}" in server.log_text()
    assert server.api("GET", "/api/v1/nodes", token=token).status_code == 200
    assert server.api("GET", "/api/v1/nodes", token=ADMIN_TOKEN).status_code == 401
    server.stop()
    server.start()  # a restart keeps the same token and does not mint another
    assert token_file.read_text().strip() == token
    assert server.api("GET", "/api/v1/nodes", token=token).status_code == 200
    assert cli(server, "token", "list").stdout.count("\tadmin\t") == 1
