"""The boot path against a real server: iPXE scripts by status, the preseed, installer callbacks.

What a node runs is run for real where this machine has the program: the preseed goes through
``debconf-set-selections``, its commands through ``dash -n`` and Debian's busybox ``sh`` (the
installer's shell), and every callback is made by busybox ``wget`` exactly as the preseed makes it.
iPXE itself is not available as a program, so its scripts are walked by a small interpreter below
that knows only the commands these scripts use and fails on anything else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodefoundry_server import lifecycle
from nodefoundry_server.store import Store
from tests.debconf import debconf_load
from tests.polling import wait_for

MAC = "aabbccddee01"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
KEY_1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn6D0z0v6Hn7dbPdn8xh9xJ8vqQ5bdLJd4v2q6b2Z1e ops@laptop"
# A legal comment full of shell syntax: the preseed must quote it, never run it.
KEY_2 = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBw2 it\'s "$(touch /tmp/nf-key-pwned)" `id`; a|b && c # d\\'
AGENT_BYTES = b"PK\x03\x04 fake nodefoundry agent zipapp\n"
AGENT_UNIT = "[Unit]\nDescription=NodeFoundry agent\n[Service]\nExecStart=/usr/local/bin/nodefoundry-agent\n"


# --- a tiny iPXE interpreter ---------------------------------------------------------------------


@dataclass
class Ipxe:
    """Where a script ends up: ``boot`` (kernel+initrd), ``chain`` (another script) or ``exit``."""

    action: str
    url: str = ""
    kernel: str = ""
    kernel_args: tuple[str, ...] = ()
    initrd: str = ""
    initrd_name: str = ""
    slept: int = 0
    echoed: tuple[str, ...] = ()

    @property
    def args(self) -> dict[str, str]:
        pairs = [arg.split("=", 1) for arg in self.kernel_args]
        assert all(len(pair) == 2 for pair in pairs), self.kernel_args
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate kernel arguments {keys}"
        return dict(pairs)  # type: ignore[arg-type]


def run_ipxe(script: str, buildarch: str = "x86_64", mac: str = "525400123456", platform: str = "efi") -> Ipxe:
    """Walk an iPXE script as iPXE would for a machine with these settings (all commands succeed)."""
    assert script.isascii(), "iPXE scripts must be plain ASCII"
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    labels = {line[1:].strip(): index for index, line in enumerate(lines) if line.startswith(":")}
    for target in re.findall(r"\bgoto (\S+)", script):
        assert target in labels, f"goto {target} has no label"
    settings = {"buildarch": buildarch, "net0/mac:hexraw": mac, "platform": platform}
    kernel: list[str] = []
    initrd: list[str] = []
    echoed: list[str] = []
    slept = 0
    pc, steps = 1, 0
    while pc < len(lines):
        steps += 1
        assert steps < 500, "script loops without chaining"
        raw = lines[pc]
        pc += 1
        line = re.sub(r"\$\{([^}]*)\}", lambda m: settings[m.group(1)], raw).strip()
        if not line or line.startswith("#") or line.startswith(":"):
            continue
        tokens = line.split()
        segments: list[tuple[str, list[str]]] = [("", [])]
        for token in tokens:
            if token in ("||", "&&"):
                segments.append((token, []))
            else:
                segments[-1][1].append(token)
        ok = True
        jump: str | None = None
        for operator, command in segments:
            if (operator == "&&" and not ok) or (operator == "||" and ok):
                continue
            if not command:  # "cmd ||": failure ignored
                ok = True
                continue
            name, params = command[0], command[1:]
            if name == "iseq":
                assert len(params) == 2, line
                ok = params[0] == params[1]
            elif name == "goto":
                jump = params[0]
                break
            elif name == "echo":
                echoed.append(" ".join(params))
            elif name == "imgfree":
                kernel, initrd = [], []
            elif name == "kernel":
                kernel = params
            elif name == "initrd":
                initrd = params
            elif name == "sleep":
                slept += int(params[0])
            elif name == "boot":
                assert kernel and initrd, "boot without kernel and initrd"
                assert initrd[0] == "--name" and len(initrd) == 3, initrd
                return Ipxe(
                    "boot",
                    kernel=kernel[0],
                    kernel_args=tuple(kernel[1:]),
                    initrd=initrd[2],
                    initrd_name=initrd[1],
                    slept=slept,
                    echoed=tuple(echoed),
                )
            elif name == "chain":
                assert params[:2] == ["--replace", "--autofree"] and len(params) == 3, line
                return Ipxe("chain", url=params[2], slept=slept, echoed=tuple(echoed))
            elif name == "exit":
                return Ipxe("exit", slept=slept, echoed=tuple(echoed))
            else:
                raise AssertionError(f"unexpected iPXE command {name!r} in {raw!r}")
        if jump is not None:
            pc = labels[jump] + 1
    raise AssertionError("script ended without boot, chain or exit")


# --- helpers -------------------------------------------------------------------------------------


def create_node(server: Any, mac: str = MAC, **fields: Any) -> dict[str, Any]:
    response = server.api("POST", "/api/v1/nodes", json={"mac": mac, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def get_node(server: Any, mac: str = MAC) -> dict[str, Any]:
    response = server.api("GET", f"/api/v1/nodes/{mac}")
    assert response.status_code == 200, response.text
    return response.json()


def events(server: Any, mac: str = MAC) -> list[dict[str, Any]]:
    response = server.api("GET", f"/api/v1/nodes/{mac}/events?limit=1000")
    assert response.status_code == 200, response.text
    return response.json()


def act(server: Any, action: str, mac: str = MAC) -> dict[str, Any]:
    response = server.api("PUT", f"/api/v1/nodes/{mac}", json={"action": action})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "installing"
    return response.json()


def boot_script(server: Any, mac: str = MAC) -> str:
    response = server.get(f"/boot/{mac}/boot.ipxe")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def local(server: Any, url: str) -> str:
    """The path of an absolute URL the server handed out; it must point back at this server."""
    assert url.startswith(server.url + "/"), url
    return url[len(server.url) :]


def preseed_url(server: Any, mac: str = MAC) -> str:
    result = run_ipxe(boot_script(server, mac))
    assert result.action == "boot", result
    return result.args["url"]


def token_of(url: str) -> str:
    match = re.search(r"[?&]token=([0-9a-f]+)$", url)
    assert match, url
    return match.group(1)


def fetch_preseed(server: Any, mac: str = MAC) -> tuple[str, str]:
    url = preseed_url(server, mac)
    response = server.get(local(server, url))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text, token_of(url)


def callback_urls(values: dict[str, str]) -> dict[str, str]:
    """The installer callback URLs, as quoted in the preseed's commands."""
    found = re.findall(
        r"'(http://[^' ]+/installer/[0-9a-f]{12}/(\w+)\?token=[0-9a-f]+)'", values["preseed/late_command"]
    )
    found += re.findall(
        r"'(http://[^' ]+/installer/[0-9a-f]{12}/(\w+)\?token=[0-9a-f]+)'", values["preseed/early_command"]
    )
    urls = {event: url for url, event in found}
    assert set(urls) == {"started", "progress", "finished", "failed"}, urls
    return urls


def busybox_post(url: str) -> int:
    """The preseed's ``nf_post``: busybox wget, POST with an empty body."""
    done = subprocess.run(
        [BUSYBOX, "wget", "-q", "-O", "/dev/null", "--post-data", "", url], capture_output=True, timeout=60
    )
    return done.returncode


def kinds(server: Any, mac: str = MAC) -> list[tuple[str, str | None]]:
    return [(event["kind"], event.get("new")) for event in events(server, mac)]


@dataclass
class Sandbox:
    """A stand-in for the installer's environment: busybox applets on PATH, ``/target`` as a directory,
    and ``in-target`` (the installer's chroot helper) replaced by a stub that records its arguments."""

    root: Path
    bin: Path
    target: Path
    in_target_log: Path

    @classmethod
    def make(cls, root: Path) -> Sandbox:
        bin_dir, target = root / "bin", root / "target"
        bin_dir.mkdir(parents=True)
        for applet in ("wget", "grep", "sed", "tail", "head", "sleep", "chmod", "mkdir", "rm", "cat"):
            (bin_dir / applet).symlink_to(BUSYBOX)
        log = root / "in-target.log"
        stub = bin_dir / "in-target"
        stub.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\n")
        stub.chmod(0o755)
        for directory in ("etc/sudoers.d", "etc/systemd/system", "etc/default", "usr/local/bin", "home"):
            (target / directory).mkdir(parents=True)
        return cls(root, bin_dir, target, log)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run a preseed command with the installer's shell, ``/target`` mapped into the sandbox."""
        assert "/target/" in command
        mapped = command.replace("/target/", f"{self.target}/")
        assert "/target" not in mapped.replace(str(self.target), "")
        return subprocess.run(
            [BUSYBOX, "sh", "-c", mapped],
            env={"PATH": str(self.bin)},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )


def install_agent_assets(server: Any) -> None:
    agent = server.assets_dir / "agent"
    agent.mkdir(parents=True, exist_ok=True)
    (agent / "nodefoundry-agent.pyz").write_bytes(AGENT_BYTES)
    (agent / "nodefoundry-agent.service").write_text(AGENT_UNIT)


def check_config_exit(server_factory: Any, env: dict[str, str], variable: str) -> None:
    server = server_factory(env).start(wait=False)
    assert server.process is not None
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server started with {env}") from None
    log = [line for line in server.log_text().splitlines() if line.strip()]
    assert server.process.returncode == 2, log
    assert len(log) == 1 and variable in log[0], log


# --- scripts by status ---------------------------------------------------------------------------


def test_discovered_node_waits_polling_its_own_url(server: Any) -> None:
    create_node(server)
    script = boot_script(server)
    result = run_ipxe(script)
    assert result.action == "chain"
    assert result.url == f"{server.url}/boot/{MAC}/boot.ipxe"
    assert result.slept == 5
    assert any("discovered" in line for line in result.echoed)
    assert "token" not in script
    assert "kernel" not in script and "preseed" not in script
    # The loop goes back to its own sleep when the server is unreachable.
    assert re.search(r"^:(\w+)\nsleep 5\nchain --replace --autofree \S+ \|\| goto \1$", script, re.M), script


@pytest.mark.parametrize("interval", ["1", "10"])
def test_poll_interval_follows_the_configuration(server_factory: Any, interval: str) -> None:
    server = server_factory({"NF_BOOT_POLL_INTERVAL": interval}).start()
    create_node(server)
    assert run_ipxe(boot_script(server)).slept == int(interval)


@pytest.mark.parametrize("interval", ["0", "11", "90", "5s"])
def test_poll_interval_out_of_range_is_refused(server_factory: Any, interval: str) -> None:
    check_config_exit(server_factory, {"NF_BOOT_POLL_INTERVAL": interval}, "NF_BOOT_POLL_INTERVAL")


def test_install_boots_the_installer_for_each_buildarch(server: Any) -> None:
    create_node(server, hostname="n1", ip="10.0.0.5", netmask="24", gateway="10.0.0.1", dns="1.1.1.1,8.8.8.8")
    act(server, "install")
    script = boot_script(server)
    for buildarch, arch in (("x86_64", "amd64"), ("i386", "amd64"), ("arm64", "arm64")):
        result = run_ipxe(script, buildarch=buildarch)
        assert result.action == "boot", (buildarch, result)
        assert result.kernel == f"{server.url}/assets/debian-installer/{arch}/linux"
        assert result.initrd == f"{server.url}/assets/debian-installer/{arch}/initrd.gz"
        assert result.initrd_name == "initrd.gz"
        assert result.kernel_args[0] == "initrd=initrd.gz"  # UEFI kernels need it on the kernel line
        assert server.get(local(server, result.kernel)).content == f"kernel-{arch}".encode()
        assert server.get(local(server, result.initrd)).content == f"initrd-{arch}".encode()
        args = result.args
        assert args["auto"] == "true"
        assert args["priority"] == "critical"
        assert re.fullmatch(rf"{re.escape(server.url)}/preseed/{MAC}/preseed\.cfg\?token=[0-9a-f]{{40}}", args["url"])
        assert args["BOOTIF"] == "01-aa-bb-cc-dd-ee-01"
        assert args["hostname"] == "n1"
        assert args["netcfg/disable_autoconfig"] == "true"
        assert args["netcfg/get_ipaddress"] == "10.0.0.5"
        assert args["netcfg/get_netmask"] == "255.255.255.0"
        assert args["netcfg/get_gateway"] == "10.0.0.1"
        assert args["netcfg/get_nameservers"] == "1.1.1.1"
        assert args["netcfg/confirm_static"] == "true"
        assert len(" ".join(result.kernel_args)) < 2048  # Linux's COMMAND_LINE_SIZE on x86 and arm64
    other = run_ipxe(script, buildarch="riscv64")
    assert other.action == "chain" and other.url == f"{server.url}/boot/{MAC}/boot.ipxe"
    assert other.slept == 5
    assert any("no Debian installer for riscv64" in line for line in other.echoed)


def test_install_of_a_dhcp_node_has_no_network_arguments(server: Any) -> None:
    create_node(server)
    act(server, "install")
    result = run_ipxe(boot_script(server))
    assert result.action == "boot"
    assert not [arg for arg in result.kernel_args if arg.startswith("netcfg/")]
    assert result.args["hostname"] == f"node-{MAC}"
    assert result.args["BOOTIF"] == "01-aa-bb-cc-dd-ee-01"


def test_static_node_without_dns_still_gets_a_nameserver(server_factory: Any) -> None:
    """Without a nameserver the installer stops at a question before it fetches the preseed."""
    server = server_factory({"NF_DHCP_DNS": "9.9.9.9 149.112.112.112"}).start()
    create_node(server, ip="10.0.0.5", netmask="255.255.255.0")
    act(server, "install")
    result = run_ipxe(boot_script(server))
    assert result.args["netcfg/get_nameservers"] == "9.9.9.9"
    assert result.args["netcfg/get_gateway"] == "none"
    values = debconf_load(fetch_preseed(server)[0], server.workdir / "debconf")
    assert values["netcfg/get_nameservers"] == "9.9.9.9 149.112.112.112"


def test_install_without_installer_files_says_so_and_retries(server_factory: Any) -> None:
    server = server_factory(installer=False).start()
    create_node(server)
    act(server, "install")
    script = boot_script(server)
    assert "kernel" not in script and "initrd" not in script and "token" not in script
    for buildarch in ("x86_64", "i386", "arm64"):
        result = run_ipxe(script, buildarch=buildarch)
        assert result.action == "chain", result
        assert result.url == f"{server.url}/boot/{MAC}/boot.ipxe"
        assert result.slept == 5
        said = " ".join(result.echoed)
        assert f"no Debian installer for {buildarch}" in said
        assert "missing: amd64,arm64" in said and "assets import" in said
    # With only amd64 imported, amd64 machines boot and arm64 machines keep waiting.
    amd64 = server.assets_dir / "debian-installer" / "amd64"
    amd64.mkdir(parents=True)
    (amd64 / "linux").write_bytes(b"kernel-amd64")
    (amd64 / "initrd.gz").write_bytes(b"initrd-amd64")
    script = boot_script(server)
    assert run_ipxe(script, buildarch="x86_64").action == "boot"
    arm = run_ipxe(script, buildarch="arm64")
    assert arm.action == "chain" and "missing: arm64" in " ".join(arm.echoed)


# --- the entry script and registration -----------------------------------------------------------


def test_entry_script_registers_the_booting_node(server: Any) -> None:
    response = server.get("/boot.ipxe")
    assert response.status_code == 200
    entry = run_ipxe(response.text, buildarch="x86_64", mac="525400123456", platform="efi")
    assert entry.action == "chain"
    assert entry.url == f"{server.url}/boot.ipxe?mac=525400123456&arch=x86_64&platform=efi"
    assert "${net0/mac:hexraw}" in response.text
    assert server.api("GET", "/api/v1/nodes/525400123456").status_code == 404

    own = server.get(local(server, entry.url))
    assert own.status_code == 200
    node = get_node(server, "525400123456")
    assert node["status"] == "discovered"
    assert node["arch"] == "amd64"
    assert node["facts"] == {"platform": "efi", "ipxe_buildarch": "x86_64"}
    history = events(server, "525400123456")
    assert [(e["kind"], e["source"]) for e in history] == [("registered", "boot")]
    loop = run_ipxe(own.text)
    assert loop.action == "chain" and loop.url == f"{server.url}/boot/525400123456/boot.ipxe" and loop.slept == 5
    # Booting again registers nothing new.
    assert server.get(local(server, entry.url)).status_code == 200
    assert len(events(server, "525400123456")) == 1
    # A 32-bit iPXE on a PC is an amd64 machine.
    server.get("/boot.ipxe?mac=52:54:00:12:34:57&arch=i386&platform=pcbios")
    assert get_node(server, "525400123457")["arch"] == "amd64"


def test_without_auto_registration_the_node_waits_unregistered(server_factory: Any) -> None:
    server = server_factory({"NF_AUTO_REGISTER": "false"}).start()
    response = server.get("/boot.ipxe?mac=525400123456&arch=x86_64&platform=efi")
    assert response.status_code == 200
    result = run_ipxe(response.text)
    assert result.action == "chain"
    assert result.url == f"{server.url}/boot.ipxe?mac=525400123456"
    assert result.slept == 5
    assert any("not registered" in line for line in result.echoed)
    assert server.api("GET", "/api/v1/nodes/525400123456").status_code == 404
    assert server.api("GET", "/api/v1/nodes").json() == []
    # Registered through the API, the same poll now finds it.
    create_node(server, "525400123456")
    again = run_ipxe(server.get(local(server, result.url)).text)
    assert again.url == f"{server.url}/boot/525400123456/boot.ipxe"


def test_unknown_and_invalid_macs(server: Any) -> None:
    unknown = server.get("/boot/aabbccddeeff/boot.ipxe")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "node not found"}
    for bad in ("zzbbccddeeff", "aabbccddee", "aa:bb:cc:dd:ee:ff:00", "aa%3Bbb"):
        response = server.get(f"/boot/{bad}/boot.ipxe")
        assert response.status_code == 400, bad
        assert response.json() == {"error": "invalid MAC address format"}
        response = server.get("/boot.ipxe", params={"mac": bad})
        assert response.status_code == 400, bad
        assert response.json() == {"error": "invalid MAC address format"}
    assert server.api("GET", "/api/v1/nodes").json() == []


# --- the preseed ---------------------------------------------------------------------------------


def test_preseed_needs_the_install_token(server: Any) -> None:
    create_node(server)
    assert server.get(f"/preseed/{MAC}/preseed.cfg").status_code == 403  # not installing, no token
    act(server, "install")
    url = preseed_url(server)
    token = token_of(url)
    path = local(server, url)
    no_token = server.get(f"/preseed/{MAC}/preseed.cfg")
    assert no_token.status_code == 403 and "error" in no_token.json()
    wrong = server.get(f"/preseed/{MAC}/preseed.cfg", params={"token": "0" * 40})
    assert wrong.status_code == 403
    assert server.get(f"/preseed/{MAC}/preseed.cfg", params={"token": token[:-1]}).status_code == 403
    other = create_node(server, "aabbccddee02")["mac"]
    act(server, "install", other)
    assert server.get(f"/preseed/{other}/preseed.cfg", params={"token": token}).status_code == 403
    unknown = server.get("/preseed/aabbccddeeff/preseed.cfg", params={"token": token})
    assert unknown.status_code == 404 and unknown.json() == {"error": "node not found"}
    ok = server.get(path)
    assert ok.status_code == 200
    assert ok.text.startswith("#### NodeFoundry preseed")


def test_preseed_is_valid_and_answers_everything(server_factory: Any) -> None:
    server = server_factory(
        {
            "NF_MIRROR_URL": "http://deb.example.org:8081",
            "NF_MIRROR_DIRECTORY": "/debian-mirror",
            "NF_ADMIN_USER": "ops",
            "NF_ADMIN_SSH_KEYS": f"{KEY_1}\n{KEY_2}\n",
            "NF_EXTRA_PACKAGES": "htop,jq",
        }
    ).start()
    create_node(server, hostname="n1", ip="10.0.0.5", netmask="24", gateway="10.0.0.1", dns=["1.1.1.1", "8.8.8.8"])
    act(server, "install")
    text, _token = fetch_preseed(server)
    values = debconf_load(text, server.workdir / "debconf")

    assert "partman-auto/disk" not in values  # no disk configured: the first disk, found by partman/early_command
    for question in ("preseed/early_command", "preseed/late_command", "partman/early_command"):
        script = server.workdir / (question.replace("/", "_") + ".sh")
        script.write_text(values[question] + "\n")
        for shell in (["dash", "-n"], [BUSYBOX, "sh", "-n"]):
            done = subprocess.run([*shell, str(script)], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and not done.stderr, (question, shell, done.stderr)

    # Network: static from the node, DNS space-separated, dotted netmask.
    assert values["netcfg/get_nameservers"] == "1.1.1.1 8.8.8.8"
    assert "netcfg/get_nameservers string 1.1.1.1 8.8.8.8\n" in text
    assert values["netcfg/get_netmask"] == "255.255.255.0"
    assert values["netcfg/get_ipaddress"] == "10.0.0.5"
    assert values["netcfg/get_gateway"] == "10.0.0.1"
    assert values["netcfg/disable_autoconfig"] == "true"
    assert values["netcfg/get_hostname"] == "n1"
    # Mirror.
    assert values["mirror/http/hostname"] == "deb.example.org:8081"
    assert values["mirror/http/directory"] == "/debian-mirror"
    assert values["mirror/suite"] == "bookworm"
    # Packages and accounts.
    packages = values["pkgsel/include"].split()
    assert {"openssh-server", "python3", "python3-paho-mqtt", "sudo", "htop", "jq"} <= set(packages)
    assert values["passwd/root-login"] == "false"
    assert values["passwd/make-user"] == "true"
    assert values["passwd/username"] == "ops"
    assert values["passwd/user-password-crypted"]  # never empty: an empty answer makes d-i ask
    late = values["preseed/late_command"]
    assert "printf '%s\\n' 'ops ALL=(ALL) NOPASSWD:ALL' > /target/etc/sudoers.d/nodefoundry-admin" in late
    keys = re.search(r"printf '%s\\n' (.*?) > /target/home/ops/\.ssh/authorized_keys", late)
    assert keys, late
    printed = subprocess.run(["dash", "-c", f"printf '%s\\n' {keys.group(1)}"], capture_output=True, text=True)
    assert printed.stdout == f"{KEY_1}\n{KEY_2}\n"
    # Every question d-i asks at critical priority on this path has an answer (defect #8 of the seed).
    for question in (
        "debian-installer/locale",
        "keyboard-configuration/xkb-keymap",
        "netcfg/get_domain",
        "time/zone",
        "passwd/user-fullname",
        "partman-auto/method",
        "partman-auto/choose_recipe",
        "partman-partitioning/confirm_write_new_label",
        "partman/choose_partition",
        "partman/confirm",
        "partman/confirm_nooverwrite",
        "partman-lvm/confirm",
        "partman-lvm/confirm_nooverwrite",
        "grub-installer/bootdev",
        "finish-install/reboot_in_progress",
        "tasksel/first",
    ):
        assert question in values, question
    assert values["partman/confirm"] == values["partman/confirm_nooverwrite"] == "true"


def test_preseed_profile_from_the_config_file(server_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "nodefoundry.yml"
    path.write_text(yaml.safe_dump({"profiles": {"edge": {"disk": "/dev/nvme0n1", "timezone": "Europe/Berlin"}}}))
    server = server_factory(config=path).start()
    create_node(server)
    create_node(server, "aabbccddee02")
    response = server.api("PATCH", f"/api/v1/nodes/{MAC}", json={"profile": "edge"})
    assert response.status_code == 200 and response.json()["profile"] == "edge"
    act(server, "install")
    act(server, "install", "aabbccddee02")
    edge = debconf_load(fetch_preseed(server)[0], tmp_path / "edge")
    assert edge["time/zone"] == "Europe/Berlin"
    assert edge["partman-auto/disk"] == "/dev/nvme0n1"
    assert edge["grub-installer/bootdev"] == "/dev/nvme0n1"
    plain = debconf_load(fetch_preseed(server, "aabbccddee02")[0], tmp_path / "plain")
    assert plain["time/zone"] == "UTC"
    assert "partman-auto/disk" not in plain
    assert plain["partman/early_command"] == 'debconf-set partman-auto/disk "$(list-devices disk | head -n1)"'
    assert plain["grub-installer/bootdev"] == "default"


# --- installer callbacks, made by busybox wget -----------------------------------------------------


def test_installer_callbacks_drive_the_lifecycle(server: Any) -> None:
    create_node(server)
    act(server, "install")
    text, token = fetch_preseed(server)
    urls = callback_urls(debconf_load(text, server.workdir / "debconf"))
    assert all(token_of(url) == token for url in urls.values())

    stamps = [get_node(server)["install_progress_at"]]
    time.sleep(0.01)
    assert busybox_post(urls["started"]) == 0
    stamps.append(get_node(server)["install_progress_at"])
    for phase in ("partman-base", "pkgsel"):
        time.sleep(0.01)
        assert busybox_post(urls["progress"] + f"&phase={phase}") == 0
        stamps.append(get_node(server)["install_progress_at"])
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    node = get_node(server)
    assert node["status"] == "installing" and node["install_phase"] == "pkgsel"
    history = kinds(server)
    assert ("installer-progress", "preseed-fetched") in history
    assert ("installer-started", "started") in history
    assert ("installer-progress", "partman-base") in history
    assert ("installer-progress", "pkgsel") in history

    assert busybox_post(urls["finished"]) == 0
    node = get_node(server)
    assert node["status"] == "installed"
    assert kinds(server)[-1] == ("installer-finished", "installed")
    # The token died with the install.
    assert server.get(f"/preseed/{MAC}/preseed.cfg", params={"token": token}).status_code == 403
    for event in ("started", "progress", "finished", "failed"):
        assert busybox_post(urls[event]) != 0
        assert server.session.post(urls[event], timeout=30).status_code == 403
    assert get_node(server)["status"] == "installed"
    assert run_ipxe(boot_script(server)) == Ipxe(
        "exit", echoed=(f"NodeFoundry: node {MAC} is installed, booting from local disk.",)
    )
    assert token not in boot_script(server)


def test_failed_install_then_reinstall_gets_a_new_token(server: Any) -> None:
    create_node(server)
    act(server, "install")
    text, old_token = fetch_preseed(server)
    urls = callback_urls(debconf_load(text, server.workdir / "debconf-1"))
    assert busybox_post(urls["started"]) == 0
    assert busybox_post(urls["failed"] + "&phase=grub-installer") == 0
    node = get_node(server)
    assert node["status"] == "failed"
    last = events(server)[-1]
    assert last["kind"] == "installer-failed" and last["new"] == "failed"
    assert last["detail"]["phase"] == "grub-installer"
    # A failed node waits instead of booting its half-written disk or reinstalling by itself.
    waiting = run_ipxe(boot_script(server))
    assert waiting.action == "chain" and waiting.url == f"{server.url}/boot/{MAC}/boot.ipxe"
    assert "token" not in boot_script(server)
    assert server.get(f"/preseed/{MAC}/preseed.cfg", params={"token": old_token}).status_code == 403

    # Only an explicit reinstall starts over.
    refused = server.api("PUT", f"/api/v1/nodes/{MAC}", json={"action": "install"})
    assert refused.status_code == 400
    act(server, "reinstall")
    new_url = preseed_url(server)
    new_token = token_of(new_url)
    assert new_token != old_token
    assert server.get(f"/preseed/{MAC}/preseed.cfg", params={"token": old_token}).status_code == 403
    assert busybox_post(urls["finished"]) != 0  # the old install's callback
    assert get_node(server)["status"] == "installing"
    assert server.get(local(server, new_url)).status_code == 200


def test_late_command_installs_the_agent(server_factory: Any, tmp_path: Path) -> None:
    marker = Path("/tmp/nf-key-pwned")
    marker.unlink(missing_ok=True)
    server = server_factory({"NF_ADMIN_SSH_KEYS": f"{KEY_1}\n{KEY_2}", "NF_HEARTBEAT_INTERVAL": "45"}).start()
    install_agent_assets(server)
    create_node(server)
    act(server, "install")
    text, _token = fetch_preseed(server)
    values = debconf_load(text, tmp_path / "debconf")
    box = Sandbox.make(tmp_path / "installer")

    done = box.run(values["preseed/late_command"])
    assert done.returncode == 0, done.stderr

    agent = box.target / "usr/local/bin/nodefoundry-agent"
    assert agent.read_bytes() == AGENT_BYTES
    assert stat.S_IMODE(agent.stat().st_mode) == 0o755
    assert (box.target / "etc/systemd/system/nodefoundry-agent.service").read_text() == AGENT_UNIT
    env_file = box.target / "etc/default/nodefoundry-agent"
    env_lines = env_file.read_text().splitlines()
    password = next(line for line in env_lines if line.startswith("NF_MQTT_PASSWORD="))
    assert len(password) > len("NF_MQTT_PASSWORD=") + 20  # a per-node secret, minted at install start
    assert [line for line in env_lines if line != password] == [
        f"NF_MAC={MAC}",
        "NF_MQTT_BROKER=127.0.0.1:1883",
        "NF_LOG_LEVEL=info",
        "NF_HEARTBEAT_INTERVAL=45",
        f"NF_MQTT_USERNAME={MAC}",
    ]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    sudoers = box.target / "etc/sudoers.d/nodefoundry-admin"
    assert sudoers.read_text() == "nodefoundry ALL=(ALL) NOPASSWD:ALL\n"
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    ssh = box.target / "home/nodefoundry/.ssh"
    assert (ssh / "authorized_keys").read_text() == f"{KEY_1}\n{KEY_2}\n"
    assert stat.S_IMODE(ssh.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh / "authorized_keys").stat().st_mode) == 0o600
    assert not marker.exists()
    assert box.in_target_log.read_text().splitlines() == [
        "chown -R nodefoundry:nodefoundry /home/nodefoundry/.ssh",
        "systemctl enable nodefoundry-agent.service",
    ]
    assert get_node(server)["status"] == "installed"
    history = kinds(server)
    assert history[-3:] == [
        ("installer-progress", "late-command"),
        ("installer-progress", "agent-installed"),
        ("installer-finished", "installed"),
    ]


def test_late_command_whose_agent_download_fails_reports_it_and_still_finishes(server: Any, tmp_path: Path) -> None:
    create_node(server)
    act(server, "install")
    values = debconf_load(fetch_preseed(server)[0], tmp_path / "debconf")
    box = Sandbox.make(tmp_path / "installer")
    # The server always has an agent to serve; a download that fails on the way (404 here) must not stop the install.
    late_command = values["preseed/late_command"].replace("/agent/nodefoundry-agent", "/agent/missing-agent")
    assert late_command != values["preseed/late_command"]
    done = box.run(late_command)
    assert done.returncode == 0, done.stderr
    assert not (box.target / "usr/local/bin/nodefoundry-agent").exists()
    assert not (box.target / "etc/systemd/system/nodefoundry-agent.service").exists()
    assert not (box.target / "etc/default/nodefoundry-agent").exists()
    assert (box.target / "etc/sudoers.d/nodefoundry-admin").exists()
    assert not box.in_target_log.exists()  # no keys configured, no agent: nothing to run in the target
    assert kinds(server)[-3:] == [
        ("installer-progress", "late-command"),
        ("installer-progress", "agent-unavailable"),
        ("installer-finished", "installed"),
    ]


@contextlib.contextmanager
def running_watcher(server: Any, tmp_path: Path, log_lines: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """Run the preseed's early_command under busybox sh against a fake installer syslog.

    The syslog starts with the line d-i writes before running the command (its own text, which
    the watcher must not match), then ``log_lines``.
    """
    early = debconf_load(fetch_preseed(server)[0], tmp_path / "debconf")["preseed/early_command"]
    assert early.count("/var/log/syslog") >= 2
    box = Sandbox.make(tmp_path / "installer")
    syslog = box.root / "syslog"
    syslog.write_text(f"Nov 24 15:30:00 preseed: running preseed command preseed/early_command: {early}\n{log_lines}")
    process = subprocess.Popen(
        [BUSYBOX, "sh", "-c", early.replace("/var/log/syslog", str(syslog))],
        env={"PATH": str(box.bin)},
        cwd=box.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield syslog, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_early_command_reports_start_steps_and_failure(server: Any, tmp_path: Path) -> None:
    """The early_command watcher, run by busybox sh against a syslog written like d-i's main-menu writes it."""
    create_node(server)
    act(server, "install")
    first_step = "Nov 24 15:30:01 main-menu[238]: INFO: Menu item 'netcfg' selected\n"
    with running_watcher(server, tmp_path, first_step) as (syslog, process):
        assert process.wait(timeout=30) == 0  # the watcher runs in the background; the command returns
        wait_for(lambda: ("installer-started", "started") in kinds(server), 15, "started")
        wait_for(lambda: ("installer-progress", "netcfg") in kinds(server), 25, "progress netcfg")
        with syslog.open("a") as log:
            log.write("Nov 24 15:31:07 main-menu[238]: INFO: Menu item 'partman-base' selected\n")
        wait_for(lambda: ("installer-progress", "partman-base") in kinds(server), 25, "progress partman-base")
        with syslog.open("a") as log:
            log.write(
                "Nov 24 15:40:11 main-menu[238]: WARNING **: Configuring 'grub-installer' failed with error code 1\n"
            )
        wait_for(lambda: get_node(server)["status"] == "failed", 25, "failed")
        assert events(server)[-1]["detail"]["phase"] == "grub-installer"


def test_early_command_reports_a_mirror_that_cannot_serve_bookworm(server: Any, tmp_path: Path) -> None:
    """choose-mirror then waits at a dialog and exits with no error code: the warning is the only sign."""
    create_node(server)
    act(server, "install")
    lines = (
        "Nov 24 15:30:05 main-menu[238]: INFO: Menu item 'choose-mirror' selected\n"
        "Nov 24 15:30:06 choose-mirror[901]: WARNING **: mirror does not support the specified release (bookworm)\n"
    )
    with running_watcher(server, tmp_path, lines):
        wait_for(lambda: get_node(server)["status"] == "failed", 25, "failed")
        assert events(server)[-1]["detail"]["phase"] == "choose-mirror"


def test_extra_kernel_arguments_reach_the_kernel_line(server_factory: Any, tmp_path: Path) -> None:
    path = tmp_path / "nodefoundry.yml"
    path.write_text(yaml.safe_dump({"kernel_args": ["console=ttyS0,115200n8", "quiet"]}))
    server = server_factory(config=path).start()
    create_node(server)
    act(server, "install")
    args = run_ipxe(boot_script(server)).kernel_args
    assert args[-2:] == ("console=ttyS0,115200n8", "quiet")


def test_extra_kernel_arguments_from_the_environment_keep_their_commas(server_factory: Any) -> None:
    server = server_factory({"NF_KERNEL_ARGS": "console=ttyS0,115200n8 quiet"}).start()
    create_node(server)
    act(server, "install")
    args = run_ipxe(boot_script(server)).kernel_args
    assert args[-2:] == ("console=ttyS0,115200n8", "quiet")


# --- the install watchdog ------------------------------------------------------------------------


def test_stalled_installs_fail_and_progressing_ones_do_not(tmp_path: Path) -> None:
    store = Store(tmp_path / "nodes.db")
    store.open()
    stalled, moving, idle = "aabbccddee01", "aabbccddee02", "aabbccddee03"
    for mac in (stalled, moving, idle):
        lifecycle.register(store, mac, {}, source="api")
    for mac in (stalled, moving):
        lifecycle.start_install(store, mac, "install", source="api")
    now = datetime.now(UTC)
    # Nothing is stale yet, even half an hour on.
    assert lifecycle.expire_stalled_installs(store, 3600, at=now + timedelta(seconds=1800)) == []
    # The stalled install last reported an hour ago; the other reports progress now.
    hour_ago = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    with store.write() as conn:
        conn.execute("UPDATE nodes SET install_progress_at = ? WHERE mac = ?", (hour_ago, stalled))
    assert lifecycle.installer_report(store, moving, "progress", phase="pkgsel", detail=None) == "installing"

    assert lifecycle.expire_stalled_installs(store, 3600, at=now + timedelta(seconds=1800)) == [stalled]
    assert store.get_node(stalled)["status"] == "failed"  # type: ignore[index]
    assert lifecycle.installing_nonce(store, stalled) is None  # its install token is dead
    timeout = store.node_events(stalled)[-1]
    assert (timeout["kind"], timeout["source"], timeout["old"], timeout["new"]) == (
        "install-timeout",
        "system",
        "installing",
        "failed",
    )
    assert timeout["detail"] == {"last_progress_at": hour_ago, "timeout_seconds": 3600}
    assert store.get_node(moving)["status"] == "installing"  # type: ignore[index]
    assert store.get_node(idle)["status"] == "discovered"  # type: ignore[index]
    # Once the moving install is silent for longer than the timeout, it fails too; a second pass is a no-op.
    assert lifecycle.expire_stalled_installs(store, 3600, at=now + timedelta(seconds=3700)) == [moving]
    assert lifecycle.expire_stalled_installs(store, 3600, at=now + timedelta(days=30)) == []
    assert store.get_node(idle)["status"] == "discovered"  # type: ignore[index]
