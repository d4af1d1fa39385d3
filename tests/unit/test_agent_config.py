"""Agent settings: NF_* values, the env file, and bad values that fall back to defaults with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodefoundry_agent import config
from nodefoundry_agent.config import Settings


def test_defaults_match_the_seed_and_the_spec():
    settings, warnings = config.load({})
    assert warnings == []
    assert settings == Settings()
    assert (settings.broker_host, settings.broker_port, settings.heartbeat_interval) == ("localhost", 1883, 30.0)
    assert settings.reboot_command == ("systemctl", "reboot") and settings.shutdown_command == ("systemctl", "poweroff")
    assert settings.state_dir == Path("/var/lib/nodefoundry-agent")
    assert settings.exec_dir == Path("/etc/nodefoundry-agent/exec.d")


def test_every_setting_is_read():
    settings, warnings = config.load(
        {
            "NF_MAC": "AA-BB-CC-DD-EE-FF",
            "NF_MQTT_BROKER": "broker.lab:8884",
            "NF_MQTT_USERNAME": "node-aabbccddeeff",
            "NF_MQTT_PASSWORD": "s3cret",
            "NF_MQTT_TLS": "yes",
            "NF_LOG_LEVEL": "DEBUG",
            "NF_HEARTBEAT_INTERVAL": "10",
            "NF_STATE_DIR": "/srv/state",
            "NF_EXEC_DIR": "/srv/exec",
            "NF_REBOOT_COMMAND": "/usr/bin/systemctl reboot --no-wall",
            "NF_SHUTDOWN_COMMAND": "'/opt/my tools/off'",
            "NF_SYSTEMCTL": "/bin/systemctl",
            "NF_BOOT_ID_FILE": "/tmp/boot_id",
            "NF_RECONNECT_MAX_DELAY": "5",
        }
    )
    assert warnings == []
    assert settings.mac == "aabbccddeeff"
    assert (settings.broker_host, settings.broker_port, settings.tls) == ("broker.lab", 8884, True)
    assert (settings.username, settings.password, settings.log_level) == ("node-aabbccddeeff", "s3cret", "DEBUG")
    assert settings.heartbeat_interval == 10 and settings.reconnect_max_delay == 5
    assert settings.reboot_command == ("/usr/bin/systemctl", "reboot", "--no-wall")
    assert settings.shutdown_command == ("/opt/my tools/off",) and settings.systemctl == ("/bin/systemctl",)
    assert (settings.state_dir, settings.exec_dir) == (Path("/srv/state"), Path("/srv/exec"))


@pytest.mark.parametrize(
    ("key", "value", "field", "default"),
    [
        ("NF_MAC", "aa:bb:cc", "mac", None),
        ("NF_MAC", "01:00:5e:00:00:01", "mac", None),  # multicast: no NIC has it
        ("NF_MQTT_BROKER", "host:99999", "broker_host", "localhost"),
        ("NF_MQTT_BROKER", "http://host:1883", "broker_host", "localhost"),
        ("NF_MQTT_TLS", "maybe", "tls", False),
        ("NF_LOG_LEVEL", "chatty", "log_level", "INFO"),
        ("NF_HEARTBEAT_INTERVAL", "thirty", "heartbeat_interval", 30.0),
        ("NF_HEARTBEAT_INTERVAL", "0", "heartbeat_interval", 30.0),
        ("NF_HEARTBEAT_INTERVAL", "-5", "heartbeat_interval", 30.0),
        ("NF_REBOOT_COMMAND", "'unterminated", "reboot_command", ("systemctl", "reboot")),
        ("NF_RECONNECT_MAX_DELAY", "1e9", "reconnect_max_delay", 60.0),
    ],
)
def test_a_bad_value_is_a_warning_and_the_default(key: str, value: str, field: str, default: object):
    settings, warnings = config.load({key: value})
    assert getattr(settings, field) == default
    assert len(warnings) == 1 and warnings[0].startswith(f"{key}=")


def test_a_password_never_appears_in_a_warning(tmp_path: Path):
    settings, warnings = config.load({"NF_MQTT_PASSWORD": "hunter2", "NF_MQTT_CA_FILE": str(tmp_path / "missing.pem")})
    assert settings.password == "hunter2" and settings.ca_file is None
    assert warnings and not any("hunter2" in warning for warning in warnings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", None, None)),
        ("10.0.0.1:1884", ("10.0.0.1", 1884, None)),
        ("broker.example:1883", ("broker.example", 1883, None)),
        ("[fd00::1]:8883", ("fd00::1", 8883, None)),
        ("[fd00::1]", ("fd00::1", None, None)),
        ("fd00::1", ("fd00::1", None, None)),
        ("tcp://broker:1883", ("broker", 1883, False)),
        ("mqtts://broker", ("broker", None, True)),
    ],
)
def test_broker_spellings(text: str, expected: tuple):
    assert config.parse_broker(text) == expected


def test_tls_changes_the_default_port_only():
    assert config.load({"NF_MQTT_BROKER": "mqtts://broker"})[0].broker_port == 8883
    assert config.load({"NF_MQTT_BROKER": "broker", "NF_MQTT_TLS": "true"})[0].broker_port == 8883
    assert config.load({"NF_MQTT_BROKER": "broker:1883", "NF_MQTT_TLS": "true"})[0].broker_port == 1883


def test_env_file_reads_what_systemd_reads(tmp_path: Path):
    env_file = tmp_path / "nodefoundry-agent"
    env_file.write_text(
        "# written by the preseed\n; also a comment\n\nNF_MAC=aa:bb:cc:dd:ee:ff\n"
        "NF_MQTT_BROKER=\"10.0.0.1:1883\"\nNF_LOG_LEVEL = 'info'\nexport NF_HEARTBEAT_INTERVAL=30\nnot a setting\n"
    )
    assert config.read_env_file(env_file) == {
        "NF_MAC": "aa:bb:cc:dd:ee:ff",
        "NF_MQTT_BROKER": "10.0.0.1:1883",
        "NF_LOG_LEVEL": "info",
        "NF_HEARTBEAT_INTERVAL": "30",
    }
