"""Hostile input against every value that reaches an iPXE script or the preseed (seed defect #9).

Each field gets the same corpus: line breaks, quotes, backslashes, shell and iPXE syntax, NUL,
non-ASCII, very long strings. The API must answer 400 with ``{"error": ...}`` and store nothing;
a bad configuration value must stop the server (exit 2, one line naming the variable). The only
accepted alternative is normalisation that the field documents (surrounding whitespace of a
netmask, separators in a DNS string), and then the stored value must be exactly the clean one.
The last tests render scripts for a node and a configuration at their allowed extremes and check
that no value added a character with a meaning to iPXE, debconf or the shell.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from nodefoundry_server import config as config_module
from nodefoundry_server.config import ConfigError
from tests.conftest import Server, fake_installer, install_token_in

PAYLOADS = [
    "\n",
    "\r",
    "\r\n",
    "\t",
    " ",
    '"',
    "'",
    "\\",
    "$(reboot)",
    "`reboot`",
    ";reboot",
    "&&reboot",
    "|reboot",
    "${net0/mac}",
    "#",
    " x",
    "\x00",
    "ü",
    "\u202e",
    "\nkernel http://evil/x",
]
WHITESPACE = {"\n", "\r", "\r\n", "\t", " "}
LONG = "a" * 3000  # long, yet the whole request line stays under gunicorn's 4094-byte limit
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn6D0z0v6Hn7dbPdn8xh9xJ8vqQ5bdLJd4v2q6b2Z1e"
DANGEROUS = set("\r\t\x00\"'\\$`;&|#(){}<>*!~") | {"\u202e"}

_serial = itertools.count(1)


def new_mac() -> str:
    return f"02{next(_serial):010x}"


def hostile_values(base: str) -> list[str]:
    """The base value with each payload appended, each non-blank payload alone, and a very long value."""
    return (
        [base + payload for payload in PAYLOADS]
        + [p for p in PAYLOADS if p.strip()]
        + [LONG, base * (3000 // len(base))]
    )


def case_id(value: Any) -> str:
    return repr(value)[:40]


# --- one server for the API cases (each case uses its own MAC) -------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("injection")
    path = workdir / "nodefoundry.yml"
    path.write_text(yaml.safe_dump({"profiles": {"edge": {"timezone": "Europe/Berlin"}}}))
    server = Server(workdir, config=path)
    fake_installer(server.assets_dir)
    server.start()
    yield server
    server.stop()


def get_node(server: Any, mac: str) -> dict[str, Any]:
    response = server.api("GET", f"/api/v1/nodes/{mac}")
    assert response.status_code == 200, response.text
    return response.json()


def node_events(server: Any, mac: str) -> list[dict[str, Any]]:
    return server.api("GET", f"/api/v1/nodes/{mac}/events?limit=1000").json()


def assert_error(response: requests.Response, status: int = 400) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body


# field -> (JSON body for the field's value, how the base value is stored, values that may normalise)
STATIC = {"ip": "10.0.0.5", "netmask": "255.255.255.0"}
FIELDS: dict[str, tuple[Any, str, set[str]]] = {
    "hostname": (lambda v: {"hostname": v}, "node1", set()),
    "ip": (lambda v: {"ip": v, "netmask": "24"}, "10.0.0.5", set()),
    "netmask": (lambda v: {"ip": "10.0.0.5", "netmask": v}, "255.255.255.0", WHITESPACE),
    "gateway": (lambda v: {**STATIC, "gateway": v}, "10.0.0.1", set()),
    "dns-string": (lambda v: {"dns": v}, "1.1.1.1", WHITESPACE),
    "dns-list": (lambda v: {"dns": [v]}, "1.1.1.1", set()),
    "dns-list-second": (lambda v: {"dns": ["1.1.1.1", v]}, "8.8.8.8", set()),
    "label-key": (lambda v: {"labels": {v: "web"}}, "role", set()),
    "label-value": (lambda v: {"labels": {"role": v}}, "web", set()),
    "profile": (lambda v: {"profile": v}, "edge", set()),
}
CANONICAL = {
    "hostname": ("hostname", "node1"),
    "ip": ("ip", "10.0.0.5"),
    "netmask": ("netmask", "255.255.255.0"),
    "gateway": ("gateway", "10.0.0.1"),
    "dns-string": ("dns", ["1.1.1.1"]),
    "dns-list": ("dns", ["1.1.1.1"]),
    "dns-list-second": ("dns", ["1.1.1.1", "8.8.8.8"]),
    "label-key": ("labels", {"role": "web"}),
    "label-value": ("labels", {"role": "web"}),
    "profile": ("profile", "edge"),
}
API_CASES = [(field, value) for field, (_body, base, _n) in FIELDS.items() for value in hostile_values(base)]


def normalises(field: str, value: str) -> bool:
    base, allowed = FIELDS[field][1], FIELDS[field][2]
    return value.startswith(base) and value[len(base) :] in allowed


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_the_clean_value_of_each_field_is_accepted(shared: Any, field: str) -> None:
    """The control: without a payload the same request succeeds, so a 400 below is the payload's doing."""
    body, base, _ = FIELDS[field]
    key, stored = CANONICAL[field]
    mac = new_mac()
    created = shared.api("POST", "/api/v1/nodes", json={"mac": mac, **body(base)})
    assert created.status_code == 201, created.text
    assert created.json()[key] == stored
    other = new_mac()
    assert shared.api("POST", "/api/v1/nodes", json={"mac": other}).status_code == 201
    patched = shared.api("PATCH", f"/api/v1/nodes/{other}", json=body(base))
    assert patched.status_code == 200, patched.text
    assert get_node(shared, other)[key] == stored


@pytest.mark.parametrize(("field", "value"), API_CASES, ids=[f"{f}-{case_id(v)}" for f, v in API_CASES])
def test_hostile_field_values_are_refused_and_nothing_is_stored(shared: Any, field: str, value: str) -> None:
    body = FIELDS[field][0](value)
    key, stored = CANONICAL[field]

    mac = new_mac()
    created = shared.api("POST", "/api/v1/nodes", json={"mac": mac, **body})
    if normalises(field, value) and created.status_code == 201:
        assert created.json()[key] == stored
    else:
        assert_error(created)
        assert shared.api("GET", f"/api/v1/nodes/{mac}").status_code == 404

    mac = new_mac()
    assert shared.api("POST", "/api/v1/nodes", json={"mac": mac, **STATIC, "gateway": "10.0.0.1"}).status_code == 201
    before = get_node(shared, mac)
    history = node_events(shared, mac)
    patched = shared.api("PATCH", f"/api/v1/nodes/{mac}", json=body)
    after = get_node(shared, mac)
    if normalises(field, value) and patched.status_code == 200:
        assert after[key] == stored
    else:
        assert_error(patched)
        assert after == before
        assert node_events(shared, mac) == history


MAC_CASES = [value[:1000] for value in hostile_values("aa:bb:cc:dd:ee:0f")]  # quoted, it must fit a URL


@pytest.mark.parametrize("value", MAC_CASES, ids=case_id)
def test_hostile_macs_are_refused_everywhere(shared: Any, value: str) -> None:
    created = shared.api("POST", "/api/v1/nodes", json={"mac": value})
    assert_error(created)
    assert created.json() == {"error": "invalid MAC address format"}
    quoted = requests.utils.quote(value, safe="")
    for path in (
        f"/boot/{quoted}/boot.ipxe",
        f"/preseed/{quoted}/preseed.cfg?token=00",
        f"/api/v1/nodes/{quoted}",
    ):
        response = shared.api("GET", path)
        assert response.status_code in (400, 404), (path, response.status_code)  # 404: a "/" splits the route
        assert "error" in response.json()
    response = shared.session.post(f"{shared.url}/installer/{quoted}/progress?token=00", timeout=30)
    assert response.status_code in (400, 404) and "error" in response.json()
    entry = shared.get("/boot.ipxe", params={"mac": value, "arch": "x86_64", "platform": "efi"})
    assert_error(entry)
    assert shared.api("GET", "/api/v1/nodes/aabbccddee0f").status_code == 404


@pytest.mark.parametrize(
    "value", ["$(reboot)", "x86_64\n", "efi;reboot", "\u202e", "x86_64 i386", LONG[:1500]], ids=case_id
)
def test_hostile_boot_facts_are_not_recorded(shared: Any, value: str) -> None:
    mac = new_mac()
    response = shared.get("/boot.ipxe", params={"mac": mac, "arch": value, "platform": value})
    assert response.status_code == 200
    node = get_node(shared, mac)
    assert node["status"] == "discovered"
    assert "arch" not in node and node["facts"] == {}
    assert value not in response.text


# --- the preseed's query parameters and the installer's phase ------------------------------------


@pytest.fixture(scope="module")
def installing(shared: Any) -> tuple[str, str]:
    """A static node that is installing, and its install token (from its boot script)."""
    mac = new_mac()
    body = {"mac": mac, "ip": "10.0.0.5", "netmask": "24", "gateway": "10.0.0.1", "dns": ["1.1.1.1"]}
    assert shared.api("POST", "/api/v1/nodes", json=body).status_code == 201
    assert shared.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    return mac, shared.install_token(mac)


QUERY_BASE = {"ip": "10.0.0.9", "netmask": "255.255.255.0", "gateway": "10.0.0.1", "dns": "9.9.9.9"}
QUERY_CASES = [(param, value) for param, base in QUERY_BASE.items() for value in hostile_values(base)]


def test_preseed_query_overrides_are_applied_when_clean(shared: Any, installing: tuple[str, str]) -> None:
    mac, token = installing
    response = shared.get(f"/preseed/{mac}/preseed.cfg", params={"token": token, **QUERY_BASE})
    assert response.status_code == 200, response.text
    assert "d-i netcfg/get_ipaddress string 10.0.0.9\n" in response.text
    assert "d-i netcfg/get_nameservers string 9.9.9.9\n" in response.text


@pytest.mark.parametrize(("param", "value"), QUERY_CASES, ids=[f"{p}-{case_id(v)}" for p, v in QUERY_CASES])
def test_hostile_preseed_query_is_refused(shared: Any, installing: tuple[str, str], param: str, value: str) -> None:
    mac, token = installing
    clean = shared.get(f"/preseed/{mac}/preseed.cfg", params={"token": token, **QUERY_BASE})
    assert clean.status_code == 200
    before = get_node(shared, mac)
    history = node_events(shared, mac)
    time.sleep(0.002)  # a successful fetch would move install_progress_at
    response = shared.get(f"/preseed/{mac}/preseed.cfg", params={"token": token, **QUERY_BASE, param: value})
    allowed = WHITESPACE | ({","} if param == "dns" else set())
    if value.startswith(QUERY_BASE[param]) and value[len(QUERY_BASE[param]) :] in allowed:
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            assert response.text == clean.text
            return
    assert_error(response)
    assert get_node(shared, mac) == before
    assert node_events(shared, mac) == history


PHASE_CASES = [(event, value) for event in ("progress", "started", "failed") for value in hostile_values("partman")]


@pytest.mark.parametrize(("event", "value"), PHASE_CASES, ids=[f"{e}-{case_id(v)}" for e, v in PHASE_CASES])
def test_hostile_installer_phase_is_refused(shared: Any, installing: tuple[str, str], event: str, value: str) -> None:
    mac, token = installing
    before = get_node(shared, mac)
    history = node_events(shared, mac)
    response = shared.session.post(
        f"{shared.url}/installer/{mac}/{event}", params={"token": token, "phase": value}, timeout=30
    )
    assert_error(response)
    after = get_node(shared, mac)
    assert after == before and after["status"] == "installing"
    assert node_events(shared, mac) == history


def test_clean_installer_phase_is_accepted(shared: Any, installing: tuple[str, str]) -> None:
    mac, token = installing
    response = shared.session.post(
        f"{shared.url}/installer/{mac}/progress", params={"token": token, "phase": "partman-base"}, timeout=30
    )
    assert response.status_code == 204
    assert get_node(shared, mac)["install_phase"] == "partman-base"


# --- the Host header, from which the scripts' URLs are built --------------------------------------

BAD_HOSTS = [
    "evil.example:80/x",
    "a b",
    "x;reboot",
    "$(reboot)",
    "`reboot`",
    "h'q",
    'h"q',
    "h\\q",
    "${net0/mac}",
    "h#x",
    "h|x",
    "h&&x",
    "h\tx",
    "ü.example",
    "\u202e.example",
    "h:0",
    "h:65536",
    "h:+80",
    "h:80:80",
    ":8080",
    "",
    "a" * 64 + ".example",
    "-h.example",
    "user@host.example",
    "[::1]:8080",
    "[::1]",
    "h.example:8080\x00",
]
IPV6_HOST = "[::1]:8080"  # well-formed but refused: the installer path is IPv4


def raw_get(port: int, path: str, host: str | None, version: str = "HTTP/1.1") -> tuple[int, bytes, bytes]:
    """One request with exactly these bytes in the Host header (or none); returns status, headers, body."""
    lines = [f"GET {path} {version}".encode()]
    if host is not None:
        lines.append(b"Host: " + host.encode("utf-8"))
    lines.append(b"Connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def host_paths(shared: Any, installing: tuple[str, str]) -> list[str]:
    mac, token = installing
    return ["/boot.ipxe", f"/boot/{mac}/boot.ipxe", f"/preseed/{mac}/preseed.cfg?token={token}"]


def test_a_clean_host_header_builds_the_urls(shared: Any, installing: tuple[str, str]) -> None:
    for path in host_paths(shared, installing):
        status, _head, body = raw_get(shared.port, path, "boot.example:8080")
        assert status == 200, body
        assert b"http://boot.example:8080/" in body


@pytest.mark.parametrize("host", BAD_HOSTS, ids=case_id)
def test_a_hostile_host_header_is_refused(shared: Any, installing: tuple[str, str], host: str) -> None:
    for path in host_paths(shared, installing):
        status, head, body = raw_get(shared.port, path, host)
        assert status == 400, (path, status, body[:300])
        if b"application/json" in head:
            assert "error" in json.loads(body)


def test_a_hostile_host_header_never_reaches_a_script(shared: Any, installing: tuple[str, str]) -> None:
    """Whatever the status, no byte of a hostile Host may appear in a served script."""
    for host in BAD_HOSTS:
        if host == IPV6_HOST:  # a well-formed IPv6 literal: unsupported (see above), not hostile
            continue
        for path in host_paths(shared, installing):
            status, _head, body = raw_get(shared.port, path, host)
            assert status in (200, 400, 500), (host, path, status)
            if status == 200 and host:
                assert host.encode() not in body, (host, path)
                assert not re.search(rb"http://[^/\s]*[^A-Za-z0-9.:\[\]/\s-][^/\s]*/", body), (host, path, body)


def test_a_preseed_request_refused_for_its_host_records_no_progress(shared: Any, installing: tuple[str, str]) -> None:
    mac, token = installing
    before = get_node(shared, mac)
    time.sleep(0.002)
    status, _head, _body = raw_get(shared.port, f"/preseed/{mac}/preseed.cfg?token={token}", "-h.example")
    assert status == 400
    assert get_node(shared, mac) == before


def test_a_request_without_host_is_refused(shared: Any, installing: tuple[str, str]) -> None:
    for path in host_paths(shared, installing):
        status, _head, body = raw_get(shared.port, path, None, "HTTP/1.0")
        assert status == 400, (path, body[:200])


# --- configuration from the environment ------------------------------------------------------------

ENV_BASE = {
    "NF_MIRROR_URL": "deb.example.org",
    "NF_MIRROR_DIRECTORY": "/debian",
    "NF_MIRROR_PROXY": "http://proxy.example:3128",
    "NF_DOMAIN": "example.org",
    "NF_KERNEL_ARGS": "quiet",
    "NF_ADMIN_USER": "ops",
    "NF_ADMIN_PASSWORD_HASH": "$6$saltsalt$" + "h" * 86,
    "NF_TIMEZONE": "Europe/Berlin",
    "NF_LOCALE": "de_DE.UTF-8",
    "NF_KEYMAP": "de",
    "NF_INSTALL_DISK": "/dev/sda",
    "NF_EXTRA_PACKAGES": "htop",
    "NF_SERVER_ADDR": "10.0.0.1:8080",
    "NF_MQTT_BROKER": "broker.example:1883",
    "NF_DHCP_DNS": "1.1.1.1",
    "NF_LOG_LEVEL": "info",
    "NF_HEARTBEAT_INTERVAL": "30",
    "NF_BOOT_POLL_INTERVAL": "5",
}
SAFE_TEXT = re.compile(r"[A-Za-z0-9_.,:=/+@%-]*")


def clean(value: Any) -> bool:
    """A parsed setting no script could misread: every item plain ASCII without syntax or whitespace."""
    items = value if isinstance(value, list) else [value]
    return all(SAFE_TEXT.fullmatch(str(item)) for item in items)


KEY_OF = {setting.env: setting.key for setting in config_module.SETTINGS}


ENV_CASES = [
    pytest.param(variable, value, id=f"{variable}-{case_id(value)}")
    for variable, base in ENV_BASE.items()
    for value in hostile_values(base)
    if value != " x"  # a stripped " x" is just the plain value "x"
]


def test_clean_configuration_values_load() -> None:
    loaded = config_module.load(None, ENV_BASE)
    assert loaded.domain == "example.org"
    assert loaded.mqtt_broker == "broker.example:1883"


@pytest.mark.parametrize(("variable", "value"), ENV_CASES)
def test_hostile_configuration_value_is_refused(variable: str, value: str) -> None:
    """Refused in one line naming the variable; or, where the parser strips whitespace or splits a
    list on it, accepted only as plain values with nothing of the payload's syntax left."""
    try:
        loaded = config_module.load(None, {**ENV_BASE, variable: value})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(variable + ":"), message
        assert "\n" not in message and "\r" not in message
        return
    parsed = loaded.values[KEY_OF[variable]]
    assert clean(parsed), f"{variable}={value!r} was accepted as {parsed!r}"


SSH_BAD = [
    KEY + "\x00",
    KEY + " comment\x00",
    "$(reboot)",
    KEY + "$(reboot)",
    KEY + " ü",
    KEY + " \u202e",
    "ssh-ed25519 " + "A" * 20 + "'",
    "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    KEY + "\r" + "$(reboot)",
    KEY + " c" + "x" * 300,
]


@pytest.mark.parametrize("value", SSH_BAD, ids=case_id)
def test_hostile_ssh_keys_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^NF_ADMIN_SSH_KEYS:"):
        config_module.load(None, {"NF_ADMIN_SSH_KEYS": value})


SPAWN_CASES = [
    *[(variable, base + "$(reboot)") for variable, base in ENV_BASE.items()],
    ("NF_DOMAIN", "example.org\n"),
    ("NF_ADMIN_USER", "ops\nroot"),
    ("NF_TIMEZONE", "UTC\\"),
    ("NF_ADMIN_SSH_KEYS", "$(reboot)"),
    ("NF_KERNEL_ARGS", "quiet;reboot"),
    ("NF_LOCALE", "en_US.UTF-8 "),
    ("NF_MIRROR_DIRECTORY", "/debian/../etc"),
]


@pytest.mark.parametrize(
    ("variable", "value"),
    SPAWN_CASES,
    ids=[f"{v}-{case_id(x)}" for v, x in SPAWN_CASES],
)
def test_server_with_a_hostile_setting_exits_2_naming_it(server_factory: Any, variable: str, value: str) -> None:
    server = server_factory({variable: value}).start(wait=False)
    assert server.process is not None
    deadline = time.monotonic() + 30
    while server.process.poll() is None:
        assert time.monotonic() < deadline, "server neither exited nor became ready"
        try:
            started = requests.get(server.url + "/health", timeout=1).status_code
        except requests.ConnectionError:
            started = None
        assert started is None, f"server started with {variable}={value!r}"
        time.sleep(0.1)
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    assert server.process.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"nodefoundry-server: {variable}:"), lines


# --- a node and a configuration at their allowed extremes -------------------------------------------

LONG_DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
EXTREME_CONFIG = {
    "domain": LONG_DOMAIN,
    "mirror_url": f"http://{LONG_DOMAIN}:65535",
    "mirror_directory": "/" + "/".join(["a-_.b"] * 20),
    "mirror_proxy": f"http://{LONG_DOMAIN}:65535/",
    "timezone": "America/Argentina/Buenos_Aires",
    "locale": "ast_ES.UTF-8",
    "keymap": "abcdefghij-" + "a1" * 10,
    "install_disk": "/dev/" + "disk/by-id/nvme-X_Y.Z-" * 5,
    "admin_user": "_" + "a" * 15 + "-" * 8 + "_" * 8,
    "admin_password_hash": "$6$./AZaz09./AZaz09$" + "x" * 86,
    "admin_ssh_keys": [f"{KEY}{'A' * 300}== {'c' * 201}", f"ssh-rsa {'B' * 500} {'d' * 201}"],
    "extra_packages": ["g++-12", "libstdc++6"],
    "kernel_args": ["console=ttyS0,115200n8", "a" * 200],
    "profiles": {"p" * 63: {"disk": "/dev/nvme0n1", "timezone": "Etc/GMT+12", "keymap": "de"}},
}
BENIGN_CONFIG = {
    "domain": "example.org",
    "mirror_url": "deb.example.org",
    "mirror_directory": "/debian",
    "mirror_proxy": "http://proxy.example:3128",
    "timezone": "UTC",
    "locale": "en_US.UTF-8",
    "keymap": "us",
    "install_disk": "/dev/sda",
    "admin_user": "ops",
    "admin_password_hash": "$6$saltsalt$" + "h" * 86,
    "admin_ssh_keys": [f"{KEY} a", f"{KEY} b"],
    "extra_packages": ["htop", "jq"],
    "kernel_args": ["quiet", "nomodeset"],
    "profiles": {"edge": {"disk": "/dev/sdb", "timezone": "UTC", "keymap": "us"}},
}
EXTREME_NODE = {
    "hostname": "a" + "-" * 61 + "z",
    "ip": "10.255.255.254",
    "netmask": "1",
    "gateway": "10.0.0.1",
    "dns": ["255.255.255.255", "0.0.0.0", "10.0.0.1"],
    "labels": {f"k{i:02d}/" + "x._-" * 14 + "ab": "v" + "y._-" * 15 + "z" for i in range(64)},
    "profile": "p" * 63,
}
BENIGN_NODE = {
    "hostname": "n1",
    "ip": "10.0.0.5",
    "netmask": "24",
    "gateway": "10.0.0.1",
    "dns": ["1.1.1.1", "8.8.8.8", "9.9.9.9"],
    "labels": {"role": "web"},
    "profile": "edge",
}


def render(server_factory: Any, tmp_path: Path, name: str, settings: dict[str, Any], node: dict[str, Any]) -> Any:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}))
    server = server_factory(config=path).start()
    mac = "aabbccddee01"
    created = server.api("POST", "/api/v1/nodes", json={"mac": mac, **node})
    assert created.status_code == 201, created.text
    assert server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": "install"}).status_code == 200
    script = server.get(f"/boot/{mac}/boot.ipxe")
    assert script.status_code == 200, script.text
    token = install_token_in(script.text)
    assert token
    preseed = server.get(f"/preseed/{mac}/preseed.cfg", params={"token": token})
    assert preseed.status_code == 200, preseed.text
    return server, script.text, preseed.text


def dangerous(line: str) -> Counter[str]:
    return Counter(ch for ch in line if ch in DANGEROUS or ch == " " or not ch.isascii())


def test_values_at_their_extremes_add_no_syntax(server_factory: Any, tmp_path: Path) -> None:
    extreme_server, extreme_script, extreme_preseed = render(
        server_factory, tmp_path, "extreme", EXTREME_CONFIG, EXTREME_NODE
    )
    _benign_server, benign_script, benign_preseed = render(
        server_factory, tmp_path, "benign", BENIGN_CONFIG, BENIGN_NODE
    )
    assert extreme_script.isascii() and extreme_preseed.isascii()
    for extreme, benign in ((extreme_script, benign_script), (extreme_preseed, benign_preseed)):
        extreme_lines, benign_lines = extreme.splitlines(), benign.splitlines()
        assert len(extreme_lines) == len(benign_lines)
        for mine, theirs in zip(extreme_lines, benign_lines, strict=True):
            assert dangerous(mine) == dangerous(theirs), (mine[:200], theirs[:200])
    # The extreme values did arrive, whole.
    assert f"hostname={EXTREME_NODE['hostname']}" in extreme_script
    assert f"domain={LONG_DOMAIN}" in extreme_script
    assert "a" * 200 in extreme_script
    kernel = next(line for line in extreme_script.splitlines() if line.startswith("kernel "))
    assert len(kernel.split(" ", 2)[2]) < 2048  # Linux's command line limit
    assert "d-i partman-auto/disk string /dev/nvme0n1\n" in extreme_preseed
    assert f"d-i mirror/http/hostname string {LONG_DOMAIN}:65535\n" in extreme_preseed
    assert "d-i netcfg/get_nameservers string 255.255.255.255 0.0.0.0 10.0.0.1\n" in extreme_preseed
    assert "d-i netcfg/get_netmask string 128.0.0.0\n" in extreme_preseed
    # ... and the preseed is still well-formed for debconf and the shell.
    debconf = tmp_path / "debconf"
    debconf.mkdir()
    (debconf / "debconf.conf").write_text(
        "Config: configdb\nTemplates: templatedb\n\n"
        f"Name: configdb\nDriver: File\nFilename: {debconf}/config.dat\n\n"
        f"Name: templatedb\nDriver: File\nFilename: {debconf}/templates.dat\n"
    )
    (debconf / "preseed.cfg").write_text(extreme_preseed)
    check = subprocess.run(
        ["debconf-set-selections", "-c", str(debconf / "preseed.cfg")],
        env={"PATH": "/usr/bin:/bin", "DEBCONF_SYSTEMRC": str(debconf / "debconf.conf")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and not check.stderr, check.stderr
    late = re.search(r"^d-i preseed/late_command string ((?:.*\\\n)*.*)$", extreme_preseed, re.M)
    assert late
    joined = late.group(1).replace("\\\n", "")
    syntax = subprocess.run(["dash", "-n"], input=joined, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    assert extreme_server.get("/health").status_code in (200, 503)
