"""nodefoundry_server.config.load: defaults < YAML file < NF_* environment, and one-line errors.

The last tests run the real ``nodefoundry-server run`` and check what an operator sees: exit
code 2, one line on stderr naming the setting, and nothing started.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodefoundry_server import config
from nodefoundry_server.config import ConfigError, load

SERVER_BIN = Path(sys.executable).parent / "nodefoundry-server"
KEY_OF = {setting.env: setting.key for setting in config.SETTINGS}

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn6D0z0v6Hn7dbPdn8xh9xJ8vqQ5bdLJd4v2q6b2Z1e ops@laptop"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7vbqajDhA+17ZAdaZcZSjJF9Dp+fJ+ops backup key"


def write_yaml(tmp_path: Path, data: Any, name: str = "server.yml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    """The ConfigError message for this input, checked to be a single line."""
    with pytest.raises(ConfigError) as raised:
        load(path, environ or {})
    message = str(raised.value)
    assert message, "ConfigError without a message"
    assert "\n" not in message and "\r" not in message, f"message is not one line: {message!r}"
    return message


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    loaded = load(None, {})
    for setting in config.SETTINGS:
        assert getattr(loaded, setting.key) == setting.default, setting.key
    assert loaded.profiles == {}
    assert loaded.dhcp_enabled is False
    assert loaded.http_addr == ":8080"
    assert loaded.db_path == "./data/nodes.db"
    assert loaded.mqtt_broker == ""


@pytest.mark.parametrize("setting", config.SETTINGS, ids=lambda setting: setting.key)
def test_every_default_passes_its_own_parser(setting: config.Setting) -> None:
    assert setting.parse(setting.default) == setting.default


def test_keys_and_variables_are_unique() -> None:
    assert len({s.key for s in config.SETTINGS}) == len(config.SETTINGS)
    assert len({s.env for s in config.SETTINGS}) == len(config.SETTINGS)
    assert all(s.env.startswith("NF_") for s in config.SETTINGS)


def test_seed_variable_names_are_kept() -> None:
    seed = {
        "NF_HTTP_ADDR",
        "NF_DHCP_ADDR",
        "NF_DHCP_INTERFACE",
        "NF_DHCP_IP_POOL_START",
        "NF_DHCP_IP_POOL_END",
        "NF_DHCP_NETMASK",
        "NF_DHCP_GATEWAY",
        "NF_DHCP_DNS",
        "NF_DHCP_LEASE_TIME",
        "NF_DHCP_TFTP_SERVER",
        "NF_DHCP_PROXY_MODE",
        "NF_MQTT_BROKER",
        "NF_MIRROR_URL",
        "NF_DB_PATH",
        "NF_LOG_LEVEL",
        "NF_SERVER_ADDR",
        "NF_HEARTBEAT_INTERVAL",
    }
    assert seed <= set(KEY_OF)


def test_unknown_profile_gives_the_global_install_settings() -> None:
    loaded = load(None, {})
    assert (
        loaded.profile(None)
        == loaded.profile("nonexistent")
        == {
            "timezone": "UTC",
            "locale": "en_US.UTF-8",
            "keymap": "us",
            "kernel_args": [],
            "disk": "",
            "extra_packages": [],
        }
    )


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NF_HTTP_WORKERS", "3")
    assert load().http_workers == 3


# --- file values and precedence -------------------------------------------------------------------


def test_file_values(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        {
            "http_addr": "127.0.0.1:9000",
            "http_workers": 4,
            "db_path": "/var/lib/nodefoundry/nodes.db",
            "auto_register": False,
            "kernel_args": ["console=ttyS0", "quiet"],
            "mirror_url": "http://deb.debian.org/debian",
            "admin_ssh_keys": [ED25519, RSA],
            "extra_packages": ["htop", "chrony"],
            "dhcp_interface": "eth1",
            "dhcp_pool_start": "10.0.0.100",
            "dhcp_pool_end": "10.0.0.199",
            "dhcp_netmask": 24,
            "dhcp_dns": ["10.0.0.1"],
            "dhcp_proxy_mode": "yes",
        },
    )
    loaded = load(path, {})
    assert loaded.http_addr == "127.0.0.1:9000"
    assert loaded.http_workers == 4
    assert loaded.db_path == "/var/lib/nodefoundry/nodes.db"
    assert loaded.auto_register is False
    assert loaded.kernel_args == ["console=ttyS0", "quiet"]
    assert loaded.mirror_url == "deb.debian.org"
    assert loaded.admin_ssh_keys == [ED25519, RSA]
    assert loaded.extra_packages == ["htop", "chrony"]
    assert loaded.dhcp_enabled is True
    assert (loaded.dhcp_pool_start, loaded.dhcp_pool_end) == ("10.0.0.100", "10.0.0.199")
    assert loaded.dhcp_netmask == "255.255.255.0"
    assert loaded.dhcp_dns == ["10.0.0.1"]
    assert loaded.dhcp_proxy_mode is True
    assert loaded.http_threads == 16  # not in the file: default
    assert loaded.source == str(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(write_yaml(tmp_path, ""), {}).values == load(None, {}).values


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"http_workers": 4, "log_level": "debug", "extra_packages": ["htop"]})
    loaded = load(path, {"NF_HTTP_WORKERS": "8", "NF_EXTRA_PACKAGES": "vim"})
    assert loaded.http_workers == 8
    assert loaded.extra_packages == ["vim"]  # replaced, not merged
    assert loaded.log_level == "debug"  # only in the file


def test_environment_set_to_empty_overrides_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"api_token": "from-file", "dhcp_interface": "eth1"})
    loaded = load(path, {"NF_API_TOKEN": "", "NF_DHCP_INTERFACE": ""})
    assert loaded.api_token == ""
    assert loaded.dhcp_enabled is False


def test_a_bad_file_value_overridden_by_the_environment_is_not_used(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"http_workers": "many"})
    assert load(path, {"NF_HTTP_WORKERS": "3"}).http_workers == 3


def test_environment_list_forms() -> None:
    loaded = load(
        None,
        {
            "NF_EXTRA_PACKAGES": "htop, chrony  vim",
            "NF_KERNEL_ARGS": "quiet nomodeset",
            "NF_ADMIN_SSH_KEYS": f"{ED25519}\n\n{RSA}\n",
            "NF_DHCP_DNS": "1.1.1.1,9.9.9.9",
        },
    )
    assert loaded.extra_packages == ["htop", "chrony", "vim"]
    assert loaded.kernel_args == ["quiet", "nomodeset"]
    assert loaded.admin_ssh_keys == [ED25519, RSA]
    assert loaded.dhcp_dns == ["1.1.1.1", "9.9.9.9"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("False", False), ("no", False)],
)
def test_boolean_spellings(text: str, expected: bool) -> None:
    assert load(None, {"NF_AUTO_REGISTER": text}).auto_register is expected


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("NF_HTTP_ADDR", "[::1]:8080", "[::1]:8080"),
        ("NF_HTTP_ADDR", "localhost", "localhost"),
        ("NF_DHCP_NETMASK", "/16", "255.255.0.0"),
        ("NF_MIRROR_URL", "http://mirror.lab:8080/debian", "mirror.lab:8080"),
        ("NF_LOG_LEVEL", "DEBUG", "debug"),
        ("NF_DOMAIN", "Lab.Example", "lab.example"),
        ("NF_BOOT_POLL_INTERVAL", " 10 ", 10),
    ],
)
def test_values_are_normalised(env: str, value: str, expected: Any) -> None:
    assert getattr(load(None, {env: value}), KEY_OF[env]) == expected


def test_profiles(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        {
            "timezone": "Europe/Berlin",
            "extra_packages": ["htop"],
            "profiles": {
                "rk3588": {"disk": "/dev/nvme0n1", "kernel_args": ["console=ttyS2"], "extra_packages": ["chrony"]},
                "lab-amd64": {"keymap": "de", "locale": "de_DE.UTF-8"},
            },
        },
    )
    loaded = load(path, {})
    assert set(loaded.profiles) == {"rk3588", "lab-amd64"}
    rk = loaded.profile("rk3588")
    assert rk["disk"] == "/dev/nvme0n1"
    assert rk["kernel_args"] == ["console=ttyS2"]
    assert rk["extra_packages"] == ["chrony"]
    assert rk["timezone"] == "Europe/Berlin"  # global value, not overridden
    assert loaded.profile("lab-amd64")["keymap"] == "de"
    assert loaded.profile(None)["extra_packages"] == ["htop"]


# --- bad values: one line naming the key ---------------------------------------------------------

# (variable, bad value, other settings needed, fragment of the reason)
BAD_VALUES = [
    ("NF_HTTP_ADDR", ":99999", {}, "bad port"),
    ("NF_HTTP_ADDR", "127.0.0.1:http", {}, "bad port"),
    ("NF_HTTP_ADDR", ":0", {}, "bad port"),
    ("NF_HTTP_ADDR", "bad host!:8080", {}, "bad host"),
    ("NF_HTTP_WORKERS", "two", {}, "expected an integer"),
    ("NF_HTTP_WORKERS", "2.5", {}, "expected an integer"),
    ("NF_BOOT_POLL_INTERVAL", "99", {}, "between 1 and 10"),
    ("NF_BOOT_POLL_INTERVAL", "0", {}, "between 1 and 10"),
    ("NF_INSTALL_TIMEOUT", "-5", {}, "between 60 and 604800"),
    ("NF_AUTO_REGISTER", "maybe", {}, "expected true or false"),
    ("NF_DHCP_PROXY_MODE", "2", {}, "expected true or false"),
    ("NF_DHCP_IP_POOL_START", "10.0.0.300", {"NF_DHCP_IP_POOL_END": "10.0.0.200"}, "not an IPv4 address"),
    ("NF_DHCP_IP_POOL_END", "10.0.0", {"NF_DHCP_IP_POOL_START": "10.0.0.100"}, "not an IPv4 address"),
    ("NF_DHCP_GATEWAY", "fe80::1", {}, "not an IPv4 address"),
    ("NF_DHCP_NETMASK", "255.0.255.0", {}, "invalid netmask"),
    ("NF_DHCP_DNS", "1.1.1.1,2.2.2.2,3.3.3.3,4.4.4.4", {}, "at most 3"),
    ("NF_ADMIN_SSH_KEYS", "not-a-key", {}, "invalid SSH public key"),
    ("NF_ADMIN_SSH_KEYS", f"{ED25519}\nssh-ed25519 AAAA;reboot", {}, "invalid SSH public key"),
    ("NF_ADMIN_PASSWORD_HASH", "hunter2", {}, "invalid password hash"),
    ("NF_ADMIN_USER", "Root User", {}, "invalid user name"),
    ("NF_LOG_LEVEL", "verbose", {}, "expected one of"),
    ("NF_DB_SYNCHRONOUS", "off", {}, "expected one of"),
    ("NF_SERVER_ADDR", ":8080", {}, "needs a host"),
    ("NF_MIRROR_URL", "https://deb.debian.org", {}, "invalid mirror"),
    ("NF_MIRROR_DIRECTORY", "debian", {}, "absolute path"),
    ("NF_MIRROR_DIRECTORY", "/debian/../etc", {}, "absolute path"),
    ("NF_MIRROR_PROXY", "proxy:3128", {}, "expected http://host:port"),
    ("NF_INSTALL_DISK", "sda", {}, "invalid disk"),
    ("NF_TIMEZONE", "Europe/Berlin; reboot", {}, "invalid time zone"),
    ("NF_LOCALE", "en_US.UTF-8\nx", {}, "invalid locale"),
    ("NF_KEYMAP", "US", {}, "invalid keymap"),
    ("NF_DOMAIN", "-lab", {}, "invalid domain"),
    ("NF_KERNEL_ARGS", "quiet $(reboot)", {}, "invalid kernel argument"),
    ("NF_EXTRA_PACKAGES", "htop;reboot", {}, "invalid package name"),
    ("NF_HEARTBEAT_INTERVAL", "1", {}, "between 5 and 3600"),
    ("NF_DHCP_LEASE_TIME", "1d", {}, "expected an integer"),
]
BAD_IDS = [f"{env}={value!r}" for env, value, _, _ in BAD_VALUES]


@pytest.mark.parametrize(("env", "value", "others", "reason"), BAD_VALUES, ids=BAD_IDS)
def test_bad_environment_value_names_the_variable(env: str, value: str, others: dict[str, str], reason: str) -> None:
    message = config_error(None, {env: value, **others})
    assert message.startswith(f"{env}: "), message
    assert reason in message


@pytest.mark.parametrize(("env", "value", "others", "reason"), BAD_VALUES, ids=BAD_IDS)
def test_bad_file_value_names_the_file_key(
    tmp_path: Path, env: str, value: str, others: dict[str, str], reason: str
) -> None:
    path = write_yaml(tmp_path, {KEY_OF[env]: value, **{KEY_OF[k]: v for k, v in others.items()}})
    message = config_error(path, {})
    assert message.startswith(f"{KEY_OF[env]} ({path}): "), message
    assert reason in message


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("http_workers", True, "expected an integer"),
        ("http_workers", 2.5, "expected an integer"),
        ("http_addr", 8080, "expected host:port"),
        ("dhcp_dns", {"primary": "1.1.1.1"}, "expected a list"),
        ("admin_ssh_keys", [ED25519, 42], "invalid SSH public key"),
        ("kernel_args", ["quiet", None], "invalid kernel argument"),
    ],
)
def test_bad_yaml_types_name_the_file_key(tmp_path: Path, key: str, value: Any, reason: str) -> None:
    path = write_yaml(tmp_path, {key: value})
    message = config_error(path, {})
    assert message.startswith(f"{key} ({path}): "), message
    assert reason in message


def test_dhcp_pool_start_after_end() -> None:
    message = config_error(None, {"NF_DHCP_IP_POOL_START": "10.0.0.200", "NF_DHCP_IP_POOL_END": "10.0.0.100"})
    assert message.startswith("NF_DHCP_IP_POOL_START: ")
    assert "10.0.0.200" in message and "NF_DHCP_IP_POOL_END" in message


def test_dhcp_pool_order_is_numeric_not_textual() -> None:
    loaded = load(None, {"NF_DHCP_IP_POOL_START": "10.0.0.9", "NF_DHCP_IP_POOL_END": "10.0.0.10"})
    assert loaded.dhcp_pool_end == "10.0.0.10"


@pytest.mark.parametrize("env", ["NF_DHCP_IP_POOL_START", "NF_DHCP_IP_POOL_END"])
def test_dhcp_pool_needs_both_ends(env: str) -> None:
    message = config_error(None, {env: "10.0.0.100"})
    assert "NF_DHCP_IP_POOL_START" in message and "NF_DHCP_IP_POOL_END" in message
    assert "both" in message


@pytest.mark.parametrize(
    "pool",
    [{"dhcp_pool_start": "10.0.0.200", "dhcp_pool_end": "10.0.0.100"}, {"dhcp_pool_start": "10.0.0.100"}],
    ids=["start-after-end", "one-end"],
)
def test_dhcp_pool_errors_from_the_file_name_the_file_keys(tmp_path: Path, pool: dict[str, str]) -> None:
    path = write_yaml(tmp_path, pool)
    message = config_error(path, {})
    assert message.startswith(f"dhcp_pool_start ({path})"), message


def test_unknown_file_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"http_workers": 2, "boot_pol_interval": 5})
    message = config_error(path, {})
    assert message == f"boot_pol_interval ({path}): unknown setting"


def test_environment_names_are_not_file_keys(tmp_path: Path) -> None:
    message = config_error(write_yaml(tmp_path, {"NF_HTTP_ADDR": ":9000"}), {})
    assert message.startswith("NF_HTTP_ADDR (")
    assert "unknown setting" in message


@pytest.mark.parametrize(
    "text",
    ["http_addr: [unclosed\n", "http_addr: ':8080'\n  bad_indent: 1\n", "key: 'open\n", "\tdb_path: x\n"],
    ids=["flow", "indent", "quote", "tab"],
)
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    message = config_error(path, {})
    assert message.startswith(f"--config {path}: not valid YAML"), message


@pytest.mark.parametrize("text", ["- http_addr\n- ':8080'\n", "just a string\n", "42\n"])
def test_file_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    assert config_error(path, {}) == f"--config {path}: expected a mapping of settings"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    assert config_error(path, {}) == f"--config {path}: No such file or directory"


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ({"rk3588": {"colour": "red"}}, "profiles.rk3588.colour: unknown setting"),
        ({"rk3588": {"install_disk": "/dev/sda"}}, "profiles.rk3588.install_disk: unknown setting"),
        ({"rk3588": {"disk": "sda"}}, "profiles.rk3588.disk: invalid disk"),
        ({"rk3588": {"timezone": "Mars/Olympus Mons"}}, "profiles.rk3588.timezone: invalid time zone"),
        ({"rk3588": {"extra_packages": ["htop", "rm -rf"]}}, "profiles.rk3588.extra_packages: invalid package"),
        ({"rk3588": {"kernel_args": "quiet `reboot`"}}, "profiles.rk3588.kernel_args: invalid kernel argument"),
        ({"RK 3588": {"disk": "/dev/sda"}}, "profiles: invalid profile name"),
        ({"rk3588": ["disk", "/dev/sda"]}, "profiles.rk3588: expected a mapping"),
        (["rk3588"], "profiles: expected a mapping"),
    ],
)
def test_bad_profiles(tmp_path: Path, profiles: Any, expected: str) -> None:
    message = config_error(write_yaml(tmp_path, {"profiles": profiles}), {})
    assert message.startswith(expected), message


def test_first_bad_value_wins_and_is_the_only_one_reported() -> None:
    message = config_error(None, {"NF_HTTP_ADDR": ":0", "NF_LOG_LEVEL": "loud"})
    assert message.startswith("NF_HTTP_ADDR: ")
    assert "NF_LOG_LEVEL" not in message


# --- regressions: bugs these tests found in config.py ---------------------------------------------


def test_yaml_null_is_not_the_string_none(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "api_token:\ndhcp_interface:\nmqtt_broker:\n")
    try:
        loaded = load(path, {})
    except ConfigError:
        return  # refusing null is acceptable too
    assert loaded.api_token == ""
    assert loaded.dhcp_enabled is False
    assert loaded.mqtt_broker == ""


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes("domain: café.example\n".encode("latin-1"))
    assert config_error(path, {}).startswith(f"--config {path}")


def test_unknown_non_string_keys(tmp_path: Path) -> None:
    message = config_error(write_yaml(tmp_path, "1: x\nfoo: y\n"), {})
    assert "unknown setting" in message


@pytest.mark.parametrize(
    "data",
    [{"bad\nkey": 1}, {"profiles": {"rk3588": {"bad\nkey": 1}}}],
    ids=["top-level", "profile"],
)
def test_unknown_key_with_a_newline_is_still_one_line(tmp_path: Path, data: dict[str, Any]) -> None:
    config_error(write_yaml(tmp_path, data), {})


@pytest.mark.parametrize("where", ["env", "file"])
def test_kernel_argument_with_a_comma_stays_whole(tmp_path: Path, where: str) -> None:
    value = "console=ttyS0,115200n8 quiet"
    if where == "env":
        loaded = load(None, {"NF_KERNEL_ARGS": value})
    else:
        loaded = load(write_yaml(tmp_path, {"kernel_args": value}), {})
    assert loaded.kernel_args == ["console=ttyS0,115200n8", "quiet"]


@pytest.mark.parametrize("env", ["NF_DB_PATH", "NF_ASSETS_DIR", "NF_MIRROR_URL"])
def test_empty_required_value_is_refused_or_defaulted(env: str) -> None:
    try:
        loaded = load(None, {env: ""})
    except ConfigError as exc:
        assert str(exc).startswith(f"{env}: ")
        return
    assert getattr(loaded, KEY_OF[env]) != ""


# --- the real CLI ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(**values: str) -> dict[str, str]:
    """The test's environment without any NF_* setting of the developer's shell, plus ``values``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NF_")}, **values}


def run_server(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``nodefoundry-server [args] run``; if it wrongly starts, stop its whole process group."""
    process = subprocess.Popen(
        [str(SERVER_BIN), *args, "run"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"nodefoundry-server kept running instead of refusing the configuration:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_nothing_listens(port: int) -> None:
    with socket.socket() as client:
        client.settimeout(2)
        assert client.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED, f"something listens on {port}"


def test_cli_bad_environment_value_exits_2_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    db_path = tmp_path / "data" / "nodes.db"
    env = clean_environment(NF_HTTP_ADDR=f"127.0.0.1:{port}", NF_DB_PATH=str(db_path), NF_BOOT_POLL_INTERVAL="99")
    result = run_server(tmp_path, env)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "NF_BOOT_POLL_INTERVAL" in lines[0]
    assert result.stdout == ""
    assert_nothing_listens(port)
    assert not db_path.parent.exists(), "the database was touched although the configuration is bad"


def test_cli_bad_file_value_exits_2_naming_the_file_key(tmp_path: Path) -> None:
    port = free_port()
    path = write_yaml(tmp_path, {"http_threads": 1000})
    env = clean_environment(NF_HTTP_ADDR=f"127.0.0.1:{port}", NF_DB_PATH=str(tmp_path / "data" / "nodes.db"))
    result = run_server(tmp_path, env, "--config", str(path))
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"nodefoundry-server: http_threads ({path}): must be between 1 and 256, got 1000"
    ]
    assert_nothing_listens(port)


def test_cli_taken_port_exits_2_naming_nf_http_addr(tmp_path: Path) -> None:
    db_path = tmp_path / "data" / "nodes.db"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = clean_environment(NF_HTTP_ADDR=f"127.0.0.1:{port}", NF_DB_PATH=str(db_path))
        result = run_server(tmp_path, env)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "NF_HTTP_ADDR" in lines[0] and str(port) in lines[0]
    assert not db_path.parent.exists(), "the database was touched although the port is taken"
