"""GRUB configs: the ``grub`` filter, the network boot loop, and a node's config per status.

GRUB's lexer (grub-core/script/yylex.l) reads ``'...'`` literally and ``\\x`` outside quotes as ``x``,
and joins adjacent parts into one word, exactly as POSIX sh does; so ``shlex`` in POSIX mode is the
model that checks what a rendered line means to GRUB.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from nodefoundry_server import boot
from nodefoundry_server.boot import Urls, _grub
from nodefoundry_server.config import Config, load

MAC = "aabbccddee01"
URLS = Urls("http://10.0.0.1:8080")
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def config(**values: Any) -> Config:
    return load(environ={f"NF_{key.upper()}": str(value) for key, value in values.items()})


def words(line: str) -> list[str]:
    return shlex.split(line, posix=True)


@pytest.mark.parametrize(
    "value",
    ["plain", "a b", "$(reboot)", "${net_default_mac}", "'", "a'b'", "';reboot;'", "\\", "{ } | & ; < >", "ü", "#x"],
)
def test_grub_filter_makes_one_literal_word(value: str) -> None:
    assert words(f"echo {_grub(value)}") == ["echo", value]


@pytest.mark.parametrize("value", ["\n", "a\nb", "\r", "\x00", "tab\there", "\x7f"])
def test_grub_filter_refuses_control_characters(value: str) -> None:
    with pytest.raises(ValueError, match="unsafe value for a GRUB script"):
        _grub(value)


def test_device_path() -> None:
    assert boot.grub_device_path("http://10.0.0.1:8080") == "(http,10.0.0.1:8080)"
    assert boot.grub_device_path("http://10.0.0.1:8080/assets/x") == "(http,10.0.0.1:8080)/assets/x"


def test_netboot_loop_asks_for_the_node_config_by_mac_over_http() -> None:
    script = boot.grub_netboot_script(URLS, 7)
    assert "set nodefoundry_server='(http,10.0.0.1:8080)'\n" in script
    source = next(line.strip() for line in script.splitlines() if line.strip().startswith("source "))
    assert words(source) == [
        "source",
        "${nodefoundry_server}/boot/${net_default_mac}/grub.cfg?arch=${grub_cpu}&platform=${grub_platform}",
    ]
    assert "while true; do" in script and "unset nodefoundry_answered" in script
    assert "sleep '7'" in script  # only when the server did not answer: the node's config sleeps itself


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("discovered", "is discovered and waits for an install"),
        ("failed", "failed, it waits for a reinstall"),
        ("unregistered", "is not registered"),
    ],
)
def test_wait_config_returns_to_the_loop(reason: str, message: str) -> None:
    script = boot.grub_wait_script(MAC, 4, reason)
    assert message in script and "sleep '4'" in script and "set nodefoundry_answered=1" in script
    commands = [line.split()[0] for line in script.splitlines() if line and not line.startswith("#")]
    assert "source" not in commands and "configfile" not in commands  # a reload here would nest GRUB per poll


def test_installed_config_exits_to_the_firmware() -> None:
    script = boot.grub_installed_script(MAC)
    assert script.rstrip().splitlines()[-1] == "exit"


def _linux_words(script: str, cpu: str) -> list[str]:
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if f"\"$grub_cpu\" = '{cpu}'" in line)
    linux = next(line for line in lines[start:] if line.strip().startswith("if linux "))
    return words(linux.strip().removeprefix("if ").removesuffix("; then"))


def test_installing_config_has_the_ipxe_kernel_arguments() -> None:
    cfg = config(kernel_args="console=ttyAMA0 quiet")
    node = {"mac": MAC, "hostname": "edge-01", "ip": "10.0.0.21", "netmask": "255.255.255.0", "gateway": "10.0.0.1"}
    script = boot.grub_installing_script(cfg, node, URLS, TOKEN, ("amd64", "arm64"))
    linux = _linux_words(script, "arm64")
    assert linux[:2] == ["linux", "(http,10.0.0.1:8080)/assets/debian-installer/arm64/linux"]
    assert linux[2:] == boot.kernel_args(cfg, node, URLS, TOKEN)
    assert f"url=http://10.0.0.1:8080/preseed/{MAC}/preseed.cfg?token={TOKEN}" in linux
    assert linux[-2:] == ["console=ttyAMA0", "quiet"]
    assert _linux_words(script, "x86_64")[1] == "(http,10.0.0.1:8080)/assets/debian-installer/amd64/linux"
    assert "initrd '(http,10.0.0.1:8080)/assets/debian-installer/arm64/initrd.gz'" in script
    assert not any(word.startswith("initrd=") for word in linux)  # iPXE's EFI-stub argument, not GRUB's


def test_installing_config_without_the_installer_says_so_and_waits() -> None:
    script = boot.grub_installing_script(config(), {"mac": MAC}, URLS, TOKEN, ("amd64",))
    assert "'arm64'" not in script
    assert "missing: arm64" in script and "assets import" in script
    none = boot.grub_installing_script(config(), {"mac": MAC}, URLS, TOKEN, ())
    assert "if linux" not in none and "sleep '5'" in none


@pytest.mark.parametrize("hostile", ["x'; reboot; echo '", "x\nreboot", "$(reboot)", "a b", "x'\\''y", "{ reboot; }"])
def test_a_hostile_value_that_slipped_validation_stays_one_argument_or_fails(hostile: str) -> None:
    node = {"mac": MAC, "hostname": hostile}
    try:
        script = boot.grub_installing_script(config(), node, URLS, TOKEN, ("arm64",))
    except ValueError:
        assert any(ord(char) < 32 for char in hostile)
        return
    assert f"hostname={hostile}" in _linux_words(script, "arm64")
