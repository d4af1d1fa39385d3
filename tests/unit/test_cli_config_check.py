"""``nodefoundry-server config check``: the server role's template ``validate:`` step.

It must refuse a bad file with the server's one-line message and exit code 2, accept a good one,
and never create the database (it runs as root on a file that has not landed yet).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERVER_BIN = Path(sys.executable).parent / "nodefoundry-server"


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SERVER_BIN), "--config", str(config), "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_good_file_passes_without_creating_the_database(tmp_path: Path) -> None:
    config = tmp_path / "server.yml"
    config.write_text(f"db_path: {tmp_path}/data/nodes.db\nhttp_addr: ':80'\nmqtt_broker: 127.0.0.1:1883\n")
    done = check(config)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{config}: ok\n", "")
    assert not (tmp_path / "data").exists()


def test_bad_value_fails_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "server.yml"
    config.write_text("boot_poll_interval: 30\n")
    done = check(config)
    assert done.returncode == 2
    assert done.stderr == f"nodefoundry-server: boot_poll_interval ({config}): must be between 1 and 10, got 30\n"


def test_broker_files_without_the_servers_account_fail(tmp_path: Path) -> None:
    config = tmp_path / "server.yml"
    config.write_text("mqtt_broker: 127.0.0.1:1883\nmqtt_password_file: /x/passwd\nmqtt_acl_file: /x/acl\n")
    done = check(config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "nodefoundry-server: NF_MQTT_USERNAME: needed when the server maintains the broker's password file"
    ]
