"""The collection's REST client: MAC spellings, URL checks, and one clear line per failed call.

Calls go over real HTTP to a small standard-library server in a thread. It stands in for what the real
NodeFoundry server never answers (a proxy's HTML error page, a redirect); the real server is exercised by
tests/ansible/.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    Client,
    client_from_params,
    normalize_mac,
)

# path -> (status, content type, body, extra headers); every answer of the stand-in server.
ANSWERS = {
    "/api/v1/nodes": (200, "application/json", b'[{"mac": "aabbccddeeff"}]', {}),
    "/api/v1/nodes/aabbccddeeff": (200, "application/json", b'{"mac": "aabbccddeeff"}', {}),
    "/api/v1/nodes/001122334455": (404, "application/json", b'{"error": "node not found"}', {}),
    "/api/v1/denied": (401, "application/json", b'{"error": "missing or invalid token"}', {}),
    "/api/v1/readonly": (403, "application/json", b'{"error": "read-only token cannot change anything"}', {}),
    "/api/v1/proxy": (502, "text/html", b"<html><body>Bad Gateway</body></html>", {}),
    "/api/v1/moved": (302, "text/plain", b"", {"Location": "/api/v1/nodes"}),
    "/api/v1/garbled": (200, "application/json", b"{not json", {}),
    "/api/v1/empty": (500, "text/plain", b"", {}),
}


class Handler(BaseHTTPRequestHandler):
    """Answers from ANSWERS and records what it was sent."""

    seen: list[dict] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        Handler.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "content_type": self.headers.get("Content-Type"),
                "body": self.rfile.read(length) if length else b"",
            }
        )
        status, content_type, body, headers = ANSWERS.get(self.path.split("?")[0], (404, "text/plain", b"", {}))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:  # pylint: disable=arguments-differ
        """Quiet: pytest shows failures, not access logs."""


@pytest.fixture(name="base_url")
def fixture_base_url():
    Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "spelling",
    [
        "aa:bb:cc:dd:ee:ff",
        "AA:BB:CC:DD:EE:FF",
        "aa-bb-cc-dd-ee-ff",
        "aabb.ccdd.eeff",
        "aabbccddeeff",
        " aabbccddeeff\n",
    ],
)
def test_usual_mac_spellings_become_twelve_hex_digits(spelling: str) -> None:
    assert normalize_mac(spelling) == "aabbccddeeff"


@pytest.mark.parametrize(
    "spelling",
    [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "gg:bb:cc:dd:ee:ff",
        "aabbccddeef",
        "aa:bb:cc:dd:ee:ff/x",
        "a:b:c:d:e:f",
    ],
)
def test_other_mac_spellings_are_refused_with_the_value_shown(spelling: str) -> None:
    with pytest.raises(ApiError) as caught:
        normalize_mac(spelling)
    assert str(caught.value) == f"invalid MAC address {spelling!r}: expected aa:bb:cc:dd:ee:ff or 12 hex digits"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "no server URL: set the url option or NODEFOUNDRY_URL"),
        ("", "no server URL: set the url option or NODEFOUNDRY_URL"),
        ("10.0.0.1:8080", "invalid server URL '10.0.0.1:8080': expected http(s)://host[:port]"),
        ("ftp://10.0.0.1", "invalid server URL 'ftp://10.0.0.1': expected http(s)://host[:port]"),
        ("http://", "invalid server URL 'http://': expected http(s)://host[:port]"),
        ("http://a b:8080", "invalid server URL 'http://a b:8080': expected http(s)://host[:port]"),
        ("http://10.0.0.1:8080\n", "invalid server URL 'http://10.0.0.1:8080\\n': expected http(s)://host[:port]"),
        ("http://10.0.0.1/?x=1", "invalid server URL 'http://10.0.0.1/?x=1': expected http(s)://host[:port]"),
    ],
)
def test_unusable_urls_are_refused_before_any_request(url, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        Client(url, "token")
    assert str(caught.value) == message


def test_missing_token_is_refused() -> None:
    with pytest.raises(ApiError, match=r"^no API token: set the token option or NODEFOUNDRY_TOKEN$"):
        Client("http://10.0.0.1:8080", "")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "https://nf.example/", "http://nf.example/prefix/"])
def test_usable_urls_lose_their_trailing_slash(url: str) -> None:
    assert Client(url, "token").base == url.rstrip("/")


def test_connection_options_come_from_the_environment_variables() -> None:
    fallbacks = {name: spec["fallback"][1] for name, spec in CONNECTION_ARGS.items()}
    assert fallbacks == {
        "url": ["NODEFOUNDRY_URL"],
        "token": ["NODEFOUNDRY_TOKEN"],
        "validate_certs": ["NODEFOUNDRY_VALIDATE_CERTS"],
        "timeout": ["NODEFOUNDRY_TIMEOUT"],
    }
    assert CONNECTION_ARGS["token"]["no_log"] is True


def test_requests_carry_the_token_and_json(base_url: str) -> None:
    client = client_from_params({"url": base_url + "/", "token": "nf_secret", "validate_certs": True, "timeout": 5})
    assert client.nodes(["discovered", "failed"]) == [{"mac": "aabbccddeeff"}]
    client.request("PATCH", "/api/v1/nodes/aabbccddeeff", body={"labels": {"rack": "r1"}})
    listing, patch = Handler.seen
    assert listing["path"] == "/api/v1/nodes?status=discovered%2Cfailed"
    assert listing["authorization"] == patch["authorization"] == "Bearer nf_secret"
    assert (patch["method"], patch["content_type"]) == ("PATCH", "application/json")
    assert json.loads(patch["body"]) == {"labels": {"rack": "r1"}}


def test_an_unknown_node_is_none_not_an_error(base_url: str) -> None:
    client = Client(base_url, "token")
    assert client.node("001122334455") is None
    assert client.node("aabbccddeeff") == {"mac": "aabbccddeeff"}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/v1/denied", "GET /api/v1/denied: HTTP 401: missing or invalid token (check the token)"),
        (
            "/api/v1/readonly",
            "GET /api/v1/readonly: HTTP 403: read-only token cannot change anything (the token lacks the right role)",
        ),
        (
            "/api/v1/proxy",
            "GET /api/v1/proxy: HTTP 502: unexpected response '<html><body>Bad Gateway</body></html>'",
        ),
        ("/api/v1/moved", "GET /api/v1/moved: HTTP 302: redirected to /api/v1/nodes (check the url)"),
        ("/api/v1/empty", "GET /api/v1/empty: HTTP 500: empty response"),
    ],
)
def test_http_errors_are_one_line_with_the_servers_reason(base_url: str, path: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        Client(base_url, "token").request("GET", path)
    assert str(caught.value) == message
    assert caught.value.status == int(message.split("HTTP ")[1][:3])


def test_a_redirect_is_not_followed(base_url: str) -> None:
    with pytest.raises(ApiError):
        Client(base_url, "token").request("GET", "/api/v1/moved")
    assert [seen["path"] for seen in Handler.seen] == ["/api/v1/moved"]


def test_a_body_that_is_not_json_is_returned_as_text(base_url: str) -> None:
    assert Client(base_url, "token").request("GET", "/api/v1/garbled")[1] == "{not json"


def test_an_unreachable_server_is_one_line_without_a_status() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ApiError) as caught:
        Client(url, "token", timeout=5).nodes()
    assert str(caught.value).startswith(f"cannot reach the NodeFoundry server at {url}: ")
    assert "Connection refused" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.status is None
