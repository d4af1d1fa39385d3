"""Rendering of iPXE scripts and the Debian preseed from Jinja2 templates.

Values are validated where they enter the system (``validate``); the
templates still pass every variable through an escaping filter (``ipxe``,
``debconf``, ``sh``) that refuses what cannot be made safe, so a value that
slipped through would fail the render instead of reaching a script.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ..config import Config
from ..mqtt.broker import node_broker
from ..mqtt.credentials import node_username

# iPXE ${buildarch} -> Debian architecture. 32-bit iPXE builds (undionly.kpxe is
# i386) run on 64-bit PCs, and Debian 12 installs amd64 there.
IPXE_ARCH_TO_DEBIAN = {"x86_64": "amd64", "i386": "amd64", "arm64": "arm64"}
# Debian architecture -> GRUB's $grub_cpu (arm64-efi sets "arm64", x86_64-efi "x86_64").
DEBIAN_TO_GRUB_CPU = {"amd64": "x86_64", "arm64": "arm64"}
DEBIAN_ARCHES = ("amd64", "arm64")
BASE_PACKAGES = ("openssh-server", "python3", "python3-paho-mqtt", "sudo", "ca-certificates")
INSTALLER_FILES = ("linux", "initrd.gz")

_IPXE_SAFE = re.compile(r"^[A-Za-z0-9_.,:=/?+%@-]*$")


def _ipxe(value: Any) -> str:
    """iPXE has no quoting: allow only characters with no meaning to its parser."""
    text = str(value)
    if not _IPXE_SAFE.fullmatch(text):  # fullmatch: ``$`` alone would let a final newline through
        raise ValueError(f"unsafe value for an iPXE script: {text!r}")
    return text


def _one_line(text: str, what: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ValueError(f"unsafe value for {what}: {text!r}")
    return text


def _debconf(value: Any) -> str:
    """A debconf value is the rest of one line: no control characters, and no final backslash,
    which debconf-set-selections reads as a continuation that joins the next line into this value."""
    text = _one_line(str(value), "a preseed line")
    if text.endswith("\\"):
        raise ValueError(f"unsafe value for a preseed line (final backslash): {text!r}")
    return text


def _sh(value: Any) -> str:
    """Single-quote for POSIX sh; newlines would split the debconf line, so refuse them.
    The quoted result ends with a quote, so a final backslash inside it is harmless."""
    return shlex.quote(_one_line(str(value), "a preseed shell line"))


def _grub(value: Any) -> str:
    """One GRUB script word: single-quoted, where nothing is special; a quote inside is written
    ``'\\''`` (GRUB's lexer joins adjacent quoted parts into one word, as sh does). Control characters
    are refused: a newline inside quotes would reach the kernel command line or an echo."""
    return "'" + _one_line(str(value), "a GRUB script").replace("'", "'\\''") + "'"


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("nodefoundry_server.boot", "templates"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters.update(ipxe=_ipxe, debconf=_debconf, sh=_sh, grub=_grub)


def _render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


@dataclass(frozen=True)
class Urls:
    """Absolute URLs a node uses, all built from one validated base."""

    base: str  # http://host:port

    def boot(self, mac: str) -> str:
        return f"{self.base}/boot/{mac}/boot.ipxe"

    def entry(self) -> str:
        return f"{self.base}/boot.ipxe"

    def asset(self, arch: str, name: str) -> str:
        return f"{self.base}/assets/debian-installer/{arch}/{name}"

    def preseed(self, mac: str, token: str) -> str:
        return f"{self.base}/preseed/{mac}/preseed.cfg?token={token}"

    def installer(self, mac: str, event: str, token: str) -> str:
        return f"{self.base}/installer/{mac}/{event}?token={token}"

    def agent(self, name: str) -> str:
        return f"{self.base}/agent/{name}"


def hyphenated(mac: str) -> str:
    return "-".join(mac[i : i + 2] for i in range(0, 12, 2))


def entry_script(urls: Urls) -> str:
    return _render("entry.ipxe.j2", entry_url=urls.entry())


def wait_script(poll_url: str, mac: str, poll_seconds: int, reason: str) -> str:
    """A loop that re-fetches ``poll_url`` every ``poll_seconds``; ``reason`` picks the message."""
    return _render("discovered.ipxe.j2", mac=mac, poll=poll_seconds, boot_url=poll_url, reason=reason)


def installed_script(mac: str) -> str:
    return _render("installed.ipxe.j2", mac=mac)


def kernel_args(config: Config, node: Mapping[str, Any], urls: Urls, token: str) -> list[str]:
    """Arguments for a fully unattended install; static network first, so it applies before the preseed fetch."""
    settings = config.profile(node.get("profile"))
    args = [
        "auto=true",
        "priority=critical",
        f"url={urls.preseed(node['mac'], token)}",
        f"BOOTIF=01-{hyphenated(node['mac'])}",
        "interface=auto",
        f"locale={settings['locale']}",
        f"keymap={settings['keymap']}",
        f"hostname={node.get('hostname') or 'node-' + node['mac']}",
        f"domain={config.domain}",
    ]
    if node.get("ip") and node.get("netmask"):
        args += [
            "netcfg/disable_autoconfig=true",
            f"netcfg/get_ipaddress={node['ip']}",
            f"netcfg/get_netmask={node['netmask']}",
            f"netcfg/get_gateway={node.get('gateway') or 'none'}",
            "netcfg/confirm_static=true",
        ]
        args += [f"netcfg/get_nameservers={server}" for server in nameservers(config, node)[:1]]
    return args + list(settings["kernel_args"])


def nameservers(config: Config, node: Mapping[str, Any]) -> list[str]:
    """The node's DNS servers, else the configured ones: a static install without any stops at a question."""
    return list(node.get("dns") or config.dhcp_dns)


def installing_script(
    config: Config, node: Mapping[str, Any], urls: Urls, token: str, available_arches: tuple[str, ...]
) -> str:
    return _render(
        "installing.ipxe.j2",
        mac=node["mac"],
        args=kernel_args(config, node, urls, token),
        arches=[(arch, urls.asset(arch, "linux"), urls.asset(arch, "initrd.gz")) for arch in available_arches],
        missing=[arch for arch in DEBIAN_ARCHES if arch not in available_arches],
        poll=config.boot_poll_interval,
        boot_url=urls.boot(node["mac"]),
    )


def grub_device_path(url: str) -> str:
    """``http://host:port/path`` as GRUB names it: ``(http,host:port)/path`` (Debian's GRUB 2.06 takes the port)."""
    scheme, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    return f"({scheme},{host}){slash}{path}"


def grub_netboot_script(urls: Urls, poll_seconds: int) -> str:
    """GRUB's network config: a loop that sources ``/boot/<mac>/grub.cfg``. The loop lives here and not in
    the node's config, because a config that loaded itself again would nest GRUB one level deeper per poll."""
    return _render("grub-netboot.cfg.j2", device=grub_device_path(urls.base), base=urls.base, poll=poll_seconds)


def grub_wait_script(mac: str, poll_seconds: int, reason: str) -> str:
    """Say why the node waits, sleep, and return to the loop, which asks again."""
    return _render("grub.cfg.j2", state="wait", mac=mac, poll=poll_seconds, reason=reason)


def grub_installed_script(mac: str) -> str:
    return _render("grub.cfg.j2", state="installed", mac=mac)


def grub_installing_script(
    config: Config, node: Mapping[str, Any], urls: Urls, token: str, available_arches: tuple[str, ...]
) -> str:
    """The installer over HTTP with the iPXE script's kernel arguments; the branch is chosen by ``$grub_cpu``.

    No ``initrd=`` argument: iPXE needs it for the kernel's EFI stub, GRUB hands the initrd over itself.
    """
    return _render(
        "grub.cfg.j2",
        state="installing",
        mac=node["mac"],
        args=kernel_args(config, node, urls, token),
        arches=[
            (
                arch,
                DEBIAN_TO_GRUB_CPU[arch],
                grub_device_path(urls.asset(arch, "linux")),
                grub_device_path(urls.asset(arch, "initrd.gz")),
            )
            for arch in available_arches
        ],
        missing=[arch for arch in DEBIAN_ARCHES if arch not in available_arches],
        poll=config.boot_poll_interval,
    )


def agent_env(config: Config, mac: str, urls: Urls, mqtt_password: str | None = None) -> dict[str, str]:
    """The agent's /etc/default/nodefoundry-agent, one source for the preseed and the credentials API (the
    agent role): the broker host is the server's as the node reaches it, unless ``mqtt_node_broker`` says."""
    env = {
        "NF_MAC": mac,
        "NF_MQTT_BROKER": node_broker(config, urls.base.split("://", 1)[1].rsplit(":", 1)[0]),
        "NF_LOG_LEVEL": config.log_level,
        "NF_HEARTBEAT_INTERVAL": str(config.agent_heartbeat_interval),
    }
    if mqtt_password is not None:
        env.update(NF_MQTT_USERNAME=node_username(mac), NF_MQTT_PASSWORD=mqtt_password)
    return env


def preseed(config: Config, node: Mapping[str, Any], urls: Urls, token: str, mqtt_password: str | None = None) -> str:
    """The per-install preseed. ``mqtt_password`` (per-node broker credentials) goes only into the agent's
    0600 env file, and only here: this file is served solely against the install token."""
    settings = config.profile(node.get("profile"))
    mac = node["mac"]
    static = bool(node.get("ip") and node.get("netmask"))
    packages = list(dict.fromkeys([*BASE_PACKAGES, *settings["extra_packages"]]))
    mirror_host = config.mirror_url
    return _render(
        "preseed.cfg.j2",
        mac=mac,
        hostname=node.get("hostname") or f"node-{mac}",
        domain=config.domain,
        static=static,
        ip=node.get("ip", ""),
        netmask=node.get("netmask", ""),
        gateway=node.get("gateway", ""),
        dns=" ".join(nameservers(config, node)),
        mirror_host=mirror_host,
        mirror_directory=config.mirror_directory,
        mirror_proxy=config.mirror_proxy,
        locale=settings["locale"],
        keymap=settings["keymap"],
        timezone=settings["timezone"],
        disk=settings["disk"],
        admin_user=config.admin_user,
        admin_password_hash=config.admin_password_hash,
        admin_ssh_keys=config.admin_ssh_keys,
        packages=" ".join(packages),
        started_url=urls.installer(mac, "started", token),
        progress_url=urls.installer(mac, "progress", token),
        finished_url=urls.installer(mac, "finished", token),
        failed_url=urls.installer(mac, "failed", token),
        agent_url=urls.agent("nodefoundry-agent"),
        agent_unit_url=urls.agent("nodefoundry-agent.service"),
        agent_env=agent_env(config, mac, urls, mqtt_password),
    )


def available_arches(assets_dir: str | Path) -> tuple[str, ...]:
    """Architectures whose installer kernel and initrd are present."""
    root = Path(assets_dir) / "debian-installer"
    return tuple(arch for arch in DEBIAN_ARCHES if all((root / arch / name).is_file() for name in INSTALLER_FILES))
