"""Input validation: the gate in front of every script and preseed."""

from __future__ import annotations

import pytest

from nodefoundry_server import validate
from nodefoundry_server.validate import InvalidValue


@pytest.mark.parametrize("spelling", ["aa:bb:cc:dd:ee:ff", "AA-BB-CC-DD-EE-FF", "aabb.ccdd.eeff", "AABBCCDDEEFF"])
def test_mac_spellings_normalise(spelling):
    assert validate.mac(spelling) == "aabbccddeeff"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa:bb-cc:dd:ee:fg",
        "aabbccddeef",
        "aa:bb:cc:dd:ee:ff\n",
        " aabbccddeeff",
        None,
        5,
    ],
)
def test_bad_macs_are_refused_with_the_seed_message(bad):
    with pytest.raises(InvalidValue, match=r"^invalid MAC address format$"):
        validate.mac(bad)


def test_hostname_is_one_rfc1123_label():
    assert validate.hostname("Edge-01") == "edge-01"
    assert validate.hostname("a" * 63) == "a" * 63
    for bad in ("-a", "a-", "a.b", "edge\n", "a" * 64, "a_b", "ü", "a b", "", "a;reboot"):
        with pytest.raises(InvalidValue):
            validate.hostname(bad)


def test_netmask_accepts_dotted_and_prefix_lengths():
    assert validate.netmask("255.255.255.0") == "255.255.255.0"
    assert validate.netmask("24") == "255.255.255.0"
    assert validate.netmask("/20") == "255.255.240.0"
    assert validate.netmask(16) == "255.255.0.0"
    for bad in ("255.0.255.0", "33", "ffffff00", "x", True):
        with pytest.raises(InvalidValue):
            validate.netmask(bad)


def test_dns_becomes_a_list():
    assert validate.dns_list("1.1.1.1, 8.8.8.8") == ["1.1.1.1", "8.8.8.8"]
    assert validate.dns_list("1.1.1.1 8.8.8.8") == ["1.1.1.1", "8.8.8.8"]
    assert validate.dns_list(["9.9.9.9"]) == ["9.9.9.9"]
    for bad in ("1.1.1.1;reboot", ["1.1.1.1", 5], "::1", {"a": 1}, "1.1.1.1 2.2.2.2 3.3.3.3 4.4.4.4"):
        with pytest.raises(InvalidValue):
            validate.dns_list(bad)


def test_ipv4_only():
    assert validate.ipv4("10.0.0.1") == "10.0.0.1"
    for bad in ("10.0.0.256", "fe80::1", "10.0.0.1\n", "", None, "010.0.0.1"):
        with pytest.raises(InvalidValue):
            validate.ipv4(bad)


def test_labels():
    assert validate.labels({"b": "2", "a": ""}) == {"a": "", "b": "2"}
    assert validate.labels({"example.com/role": "edge"}) == {"example.com/role": "edge"}
    for bad in ({"a": 1}, {"": "x"}, {"a b": "x"}, {"a": "x y"}, {"a": "$(x)"}, ["a"], {str(i): "" for i in range(65)}):
        with pytest.raises(InvalidValue):
            validate.labels(bad)


def test_ssh_keys_and_other_install_settings():
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ops@example"
    assert validate.ssh_key(key) == key
    for bad in ("ssh-ed25519", "ssh-dss AAAA", key + "\nssh-rsa AAAA", "ssh-rsa AAAA$(x)"):
        with pytest.raises(InvalidValue):
            validate.ssh_key(bad)
    assert validate.disk("/dev/nvme0n1") == "/dev/nvme0n1"
    assert validate.disk("") == ""
    for bad in ("/etc/passwd;x", "sda", "/dev/../etc", "/dev/sd a"):
        with pytest.raises(InvalidValue):
            validate.disk(bad)
    assert validate.kernel_arg("console=ttyS0,115200n8") == "console=ttyS0,115200n8"
    for bad in ("a b", "x;y", "${x}", "a\nb"):
        with pytest.raises(InvalidValue):
            validate.kernel_arg(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8080", ("", 8080)),
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("nf.example", ("nf.example", 8080)),
        ("[::1]:9", ("::1", 9)),
    ],
)
def test_host_port(text, expected):
    assert validate.host_port(text, "address", 8080) == expected


@pytest.mark.parametrize("bad", [":0", ":70000", "a b:80", "host:x", "h$(x):80"])
def test_host_port_refuses(bad):
    with pytest.raises(InvalidValue):
        validate.host_port(bad, "address", 8080)
