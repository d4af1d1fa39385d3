"""nodefoundry_server.boot: the escaping filters, the installer kernel arguments, the arch mapping.

The filters are the last line of defence behind ``validate``: whatever reaches them unsafe must make
the render fail. Their claims are checked against the real consumers where one exists on this
machine: ``dash``/``busybox sh`` for shell quoting, ``debconf-set-selections`` for preseed lines.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodefoundry_server import boot
from nodefoundry_server.boot import IPXE_ARCH_TO_DEBIAN, Urls, _debconf, _ipxe, _sh
from nodefoundry_server.config import Config, load
from tests.debconf import debconf_load

MAC = "aabbccddee01"
URLS = Urls("http://10.0.0.1:8080")
TOKEN = "0123456789abcdef0123456789abcdef01234567"

# Characters with a meaning to iPXE's parser or to a shell, and other hostile input.
HOSTILE = [
    " ",
    "a b",
    "\t",
    "$",
    "${net0/mac}",
    "$(reboot)",
    "`reboot`",
    ";",
    "a;reboot",
    "&&",
    "||",
    "|",
    "#",
    "'",
    '"',
    "\\",
    "\n",
    "a\n",
    "\na",
    "\r",
    "a\r\nb",
    "\x00",
    "ü",
    "\u202e",
    "<",
    ">",
    "(",
    "{",
    "*",
]


def default_config(**values: Any) -> Config:
    config = load(None, {})
    return dataclasses.replace(config, values={**config.values, **values})


def static_node(**fields: Any) -> dict[str, Any]:
    return {
        "mac": MAC,
        "hostname": "n1",
        "ip": "10.0.0.5",
        "netmask": "255.255.255.0",
        "gateway": "10.0.0.1",
        "dns": ["1.1.1.1", "8.8.8.8"],
        **fields,
    }


def arg_map(args: list[str]) -> dict[str, str]:
    pairs = [arg.split("=", 1) for arg in args]
    assert all(len(pair) == 2 for pair in pairs), args
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate kernel arguments: {args}"
    return dict(pairs)  # type: ignore[arg-type]


# --- _ipxe -------------------------------------------------------------------------------------


def test_ipxe_filter_passes_urls_and_numbers() -> None:
    url = "http://10.0.0.1:8080/preseed/aabbccddee01/preseed.cfg?token=ab12%41"
    assert _ipxe(url) == url
    assert _ipxe(5) == "5"
    assert _ipxe("netcfg/get_nameservers=1.1.1.1") == "netcfg/get_nameservers=1.1.1.1"


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_ipxe_filter_refuses_parser_characters(value: str) -> None:
    with pytest.raises(ValueError, match="iPXE"):
        _ipxe(value)


@pytest.mark.parametrize("value", ["node1\n", "http://h/x\n"], ids=repr)
def test_ipxe_filter_refuses_a_trailing_newline(value: str) -> None:
    """A regex anchored with ``$`` also matches before a final newline; the filter must not."""
    with pytest.raises(ValueError):
        _ipxe(value)


# --- _debconf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["\n", "a\n", "\na", "a\r", "\x00", "a\tb", "\x7f", "\x1b[2J"], ids=repr)
def test_debconf_filter_refuses_control_characters(value: str) -> None:
    with pytest.raises(ValueError, match="preseed"):
        _debconf(value)


def test_debconf_filter_keeps_printable_text() -> None:
    value = "a b $x 'q' \"d\" ü /dev/sda $6$salt$hash # not a comment"
    assert _debconf(value) == value


def test_trailing_backslash_joins_the_next_preseed_line(tmp_path: Path) -> None:
    """Why the filter refuses a final backslash: debconf-set-selections reads it as a continuation."""
    joined = debconf_load("d-i time/zone string UTC\\\nd-i clock-setup/ntp boolean true\n", tmp_path / "db")
    assert joined["time/zone"] == "UTCd-i clock-setup/ntp boolean true"
    assert "clock-setup/ntp" not in joined
    with pytest.raises(ValueError, match="preseed"):
        _debconf("UTC\\")
    # A value that slipped past validation makes the render fail instead of rewriting the file.
    with pytest.raises(ValueError):
        boot.preseed(default_config(timezone="UTC\\"), static_node(), URLS, TOKEN)


def test_debconf_backslash_inside_a_value_is_kept(tmp_path: Path) -> None:
    values = debconf_load("d-i foo/bar string a\\b c\n", tmp_path / "db")
    assert values["foo/bar"] == "a\\b c"
    assert _debconf("a\\b c") == "a\\b c"


# --- _sh ---------------------------------------------------------------------------------------

SHELL_VALUES = [
    "",
    "plain",
    "two words",
    "'",
    "it's",
    "''",
    '"',
    "\\",
    "ends with backslash\\",
    "$(touch /tmp/nf-pwned)",
    "`touch /tmp/nf-pwned`",
    "${HOME}",
    "$HOME",
    "a;touch /tmp/nf-pwned",
    "a && b",
    "a | b",
    "#comment",
    "*",
    "~",
    "-n",
    "%s%d",
    "ü\u202e",
    "x" * 5000,
    "'\"$(`;|&#\\",
]


@pytest.mark.parametrize("shell", [["dash", "-c"], ["busybox", "sh", "-c"]], ids=["dash", "busybox-ash"])
@pytest.mark.parametrize("value", SHELL_VALUES, ids=lambda v: repr(v)[:40])
def test_sh_quoting_round_trips_through_a_real_shell(shell: list[str], value: str, tmp_path: Path) -> None:
    marker = Path("/tmp/nf-pwned")
    marker.unlink(missing_ok=True)
    done = subprocess.run(
        [*shell, "printf %s " + _sh(value)], capture_output=True, timeout=30, cwd=tmp_path, env={"HOME": "/root"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == value.encode()
    assert not marker.exists()


@pytest.mark.parametrize("value", ["\n", "a\nb", "a\r", "\x00"], ids=repr)
def test_sh_refuses_what_would_break_the_preseed_line(value: str) -> None:
    with pytest.raises(ValueError):
        _sh(value)


# --- kernel arguments --------------------------------------------------------------------------


def test_kernel_args_static_node() -> None:
    args = boot.kernel_args(default_config(), static_node(), URLS, TOKEN)
    assert args[:3] == ["auto=true", "priority=critical", f"url={URLS.preseed(MAC, TOKEN)}"]
    values = arg_map(args)
    assert values["url"] == f"http://10.0.0.1:8080/preseed/{MAC}/preseed.cfg?token={TOKEN}"
    assert values["BOOTIF"] == "01-aa-bb-cc-dd-ee-01"
    assert values["hostname"] == "n1"
    assert values["domain"] == "local"
    assert values["locale"] == "en_US.UTF-8"
    assert values["keymap"] == "us"
    assert values["netcfg/disable_autoconfig"] == "true"
    assert values["netcfg/get_ipaddress"] == "10.0.0.5"
    assert values["netcfg/get_netmask"] == "255.255.255.0"
    assert values["netcfg/get_gateway"] == "10.0.0.1"
    assert values["netcfg/get_nameservers"] == "1.1.1.1"  # one value: a kernel argument has no spaces
    assert values["netcfg/confirm_static"] == "true"
    assert all(_ipxe(arg) == arg for arg in args)


def test_kernel_args_dhcp_node_has_no_network_arguments() -> None:
    node = {"mac": MAC}
    args = boot.kernel_args(default_config(), node, URLS, TOKEN)
    assert not [arg for arg in args if arg.startswith("netcfg/")]
    values = arg_map(args)
    assert values["hostname"] == f"node-{MAC}"
    assert values["interface"] == "auto"
    # An address without a netmask is not a static configuration either.
    args = boot.kernel_args(default_config(), {"mac": MAC, "ip": "10.0.0.5"}, URLS, TOKEN)
    assert not [arg for arg in args if arg.startswith("netcfg/")]


def test_kernel_args_static_without_gateway_says_none() -> None:
    args = boot.kernel_args(default_config(), static_node(gateway=None), URLS, TOKEN)
    assert arg_map(args)["netcfg/get_gateway"] == "none"


def test_kernel_args_static_without_dns_still_names_a_nameserver() -> None:
    """A static install without netcfg/get_nameservers stops at a question (seen on real d-i):
    the configured DNS servers (NF_DHCP_DNS) are the fallback, on the kernel line and in the preseed."""
    config = default_config(dhcp_dns=["9.9.9.9", "149.112.112.112"])
    args = boot.kernel_args(config, static_node(dns=None), URLS, TOKEN)
    assert arg_map(args)["netcfg/get_nameservers"] == "9.9.9.9"
    text = boot.preseed(config, static_node(dns=None), URLS, TOKEN)
    assert "d-i netcfg/get_nameservers string 9.9.9.9 149.112.112.112\n" in text


def test_kernel_args_profile_overrides_and_extra_arguments_come_last() -> None:
    config = dataclasses.replace(
        default_config(kernel_args=["quiet"]),
        profiles={"edge": {"locale": "de_DE.UTF-8", "keymap": "de", "kernel_args": ["console=ttyS0,115200n8"]}},
    )
    args = boot.kernel_args(config, static_node(profile="edge"), URLS, TOKEN)
    assert args[-1] == "console=ttyS0,115200n8"
    values = arg_map(args)
    assert values["locale"] == "de_DE.UTF-8"
    assert values["keymap"] == "de"
    assert "quiet" not in args  # the profile's list replaces the default list
    assert boot.kernel_args(config, static_node(), URLS, TOKEN)[-1] == "quiet"


def test_a_value_that_slipped_past_validation_fails_the_render() -> None:
    """Defence in depth: a stored hostname with a newline must not split the iPXE kernel line."""
    for hostname in ("n1\n", "n1 n2", "$(reboot)"):
        with pytest.raises(ValueError):
            boot.installing_script(default_config(), static_node(hostname=hostname), URLS, TOKEN, ("amd64",))
        with pytest.raises(ValueError):
            boot.preseed(default_config(), static_node(hostname=hostname + "\n"), URLS, TOKEN)


# --- architectures and small helpers -----------------------------------------------------------


def test_ipxe_buildarch_mapping() -> None:
    assert IPXE_ARCH_TO_DEBIAN == {"x86_64": "amd64", "i386": "amd64", "arm64": "arm64"}
    assert set(IPXE_ARCH_TO_DEBIAN.values()) == set(boot.DEBIAN_ARCHES)


def test_installing_script_branches_on_buildarch() -> None:
    script = boot.installing_script(default_config(), static_node(), URLS, TOKEN, ("amd64", "arm64"))
    assert "iseq ${buildarch} x86_64 && goto amd64 ||\n" in script
    assert "iseq ${buildarch} i386 && goto amd64 ||\n" in script
    assert "iseq ${buildarch} arm64 && goto arm64 ||\n" in script
    only_amd64 = boot.installing_script(default_config(), static_node(), URLS, TOKEN, ("amd64",))
    assert "goto arm64" not in only_amd64
    assert ", missing: arm64." in only_amd64


def test_hyphenated_mac_and_urls() -> None:
    assert boot.hyphenated(MAC) == "aa-bb-cc-dd-ee-01"
    assert URLS.boot(MAC) == "http://10.0.0.1:8080/boot/aabbccddee01/boot.ipxe"
    assert URLS.asset("arm64", "initrd.gz") == "http://10.0.0.1:8080/assets/debian-installer/arm64/initrd.gz"
    assert URLS.installer(MAC, "finished", "t") == "http://10.0.0.1:8080/installer/aabbccddee01/finished?token=t"


def test_available_arches_needs_both_files(tmp_path: Path) -> None:
    assert boot.available_arches(tmp_path) == ()
    amd64 = tmp_path / "debian-installer" / "amd64"
    amd64.mkdir(parents=True)
    (amd64 / "linux").write_bytes(b"k")
    assert boot.available_arches(tmp_path) == ()
    (amd64 / "initrd.gz").write_bytes(b"i")
    assert boot.available_arches(tmp_path) == ("amd64",)
