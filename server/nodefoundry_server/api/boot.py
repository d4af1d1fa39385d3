"""The boot path: iPXE scripts, the preseed, installer callbacks, downloads.

Nodes cannot carry an API token here. Boot scripts need none and contain no
secret except, for a node that is installing, its install token, which only
opens that install's preseed and callbacks and dies when the install ends.
With ``install_token_bind_ip`` the install is also pinned to one address.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_file, send_from_directory

from nodefoundry_agent import build as agent_build

from .. import auth, boot, lifecycle, tftp, validate
from ..boot import IPXE_ARCH_TO_DEBIAN, Urls
from ..mqtt import credentials
from ..nodes import EDITABLE, check_network
from ..validate import InvalidValue
from .common import ApiError, config, no_content, path_mac, request_urls, store

blueprint = Blueprint("boot", __name__)

# Route name -> (override file in <assets_dir>/agent/, MIME type, the build of the installed agent package).
AGENT_FILES = {
    "nodefoundry-agent": ("nodefoundry-agent.pyz", "application/octet-stream", agent_build.zipapp_bytes),
    "nodefoundry-agent.service": ("nodefoundry-agent.service", "text/plain", agent_build.unit_text),
}


def _text(body: str) -> Response:
    return Response(body, mimetype="text/plain")


def _node_script(mac: str) -> str | None:
    node = store().get_node(mac)
    if node is None:
        return None
    cfg, urls = config(), request_urls()
    if node["status"] == "installed":
        return boot.installed_script(mac)
    if node["status"] != "installing":
        return boot.wait_script(urls.boot(mac), mac, cfg.boot_poll_interval, node["status"])
    token = _install_token(node)
    if token is None:
        return boot.wait_script(urls.boot(mac), mac, cfg.boot_poll_interval, "discovered")
    return boot.installing_script(cfg, node, urls, token, boot.available_arches(cfg.assets_dir))


def _install_token(node: dict) -> str | None:
    """The token to embed, or None when the requester is not the pinned address.

    A node with a static address owns its install from there; others from
    the first address that fetches the install script.
    """
    mac = node["mac"]
    found = lifecycle.installing_nonce(store(), mac)
    if found is None:
        return None
    nonce, pinned = found
    if config().install_token_bind_ip:
        owner = pinned or lifecycle.pin_install_ip(store(), mac, node.get("ip") or request.remote_addr or "")
        if owner != request.remote_addr:
            return None
    return auth.install_token(store(), mac, nonce)


@blueprint.get("/boot/<mac>/boot.ipxe")
def node_script(mac: str) -> Response:
    script = _node_script(path_mac(mac))
    if script is None:
        raise ApiError(404, "node not found")
    return _text(script)


@blueprint.get("/boot.ipxe")
def entry_script() -> Response:
    """Without ``mac``: a script that asks again with iPXE's own MAC; with it, the node's script."""
    raw = request.args.get("mac")
    if raw is None:
        return _text(boot.entry_script(request_urls()))
    mac = path_mac(raw)
    if config().auto_register:
        lifecycle.register_if_new(store(), mac, _boot_facts(), source="boot")
    script = _node_script(mac)
    if script is None:
        poll_url = f"{request_urls().entry()}?mac={mac}"
        script = boot.wait_script(poll_url, mac, config().boot_poll_interval, "unregistered")
    return _text(script)


def _boot_facts() -> dict[str, object]:
    """What iPXE told us about itself, validated; unknown values are left out."""
    facts: dict[str, object] = {}
    arch = IPXE_ARCH_TO_DEBIAN.get(request.args.get("arch", ""))
    if arch:
        facts["arch"] = arch
    platform = request.args.get("platform", "")
    if platform in ("pcbios", "efi"):
        facts["facts"] = (
            {"platform": platform, "ipxe_buildarch": request.args["arch"]} if arch else {"platform": platform}
        )
    return facts


def _installing_mac(mac: str) -> tuple[str, str]:
    """Check the install token (and pinned address): the MAC and its install's nonce; 404 for unknown,
    403 otherwise."""
    mac = path_mac(mac)
    found = lifecycle.installing_nonce(store(), mac)
    token = request.args.get("token", "")
    if found is None:
        if store().get_node_row(mac) is None:
            raise ApiError(404, "node not found")
        raise ApiError(403, "invalid or expired install token")
    nonce, pinned = found
    if not token or not auth.install_token_valid(store(), mac, nonce, token):
        raise ApiError(403, "invalid or expired install token")
    if config().install_token_bind_ip and pinned and pinned != request.remote_addr:
        raise ApiError(403, "install token is bound to another address")
    return mac, nonce


@blueprint.get("/preseed/<mac>/preseed.cfg")
def preseed(mac: str) -> Response:
    mac, nonce = _installing_mac(mac)
    node = dict(store().get_node(mac) or {})
    try:
        node.update(_network_overrides())
        check_network(node)
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    urls = request_urls()  # a refused request must not count as installer progress
    try:
        lifecycle.installer_report(store(), mac, "progress", phase="preseed-fetched", detail=None)
    except lifecycle.TransitionRefused as exc:
        raise ApiError(403, str(exc)) from None
    delivered = credentials.delivers_node_credentials(config())
    password = credentials.install_password(store().conn(), mac, nonce) if delivered else None
    return _text(boot.preseed(config(), node, urls, request.args["token"], mqtt_password=password))


def _network_overrides() -> dict[str, object]:
    """The seed's ``?ip=&netmask=&gateway=&dns=`` query form, validated; checked with the node's own values."""
    return {
        key: EDITABLE[key](request.args[key]) for key in ("ip", "netmask", "gateway", "dns") if request.args.get(key)
    }


@blueprint.post("/installer/<mac>/<event>")
def installer_callback(mac: str, event: str) -> Response:
    if event not in lifecycle.INSTALLER_EVENTS:
        raise ApiError(404, "unknown installer event")
    mac, _nonce = _installing_mac(mac)
    try:
        phase = validate.phase(request.args["phase"]) if request.args.get("phase") else None
    except InvalidValue as exc:
        raise ApiError(400, str(exc)) from None
    try:
        lifecycle.installer_report(store(), mac, event, phase=phase, detail={"remote_addr": request.remote_addr})
    except lifecycle.TransitionRefused as exc:
        raise ApiError(409, str(exc)) from None
    return no_content()


@blueprint.get("/assets/<path:subpath>")
def asset(subpath: str) -> Response:
    """Installer kernels/initrds: streamed by the WSGI server (sendfile), with Range support.

    The MIME type is fixed: guessing it would label ``initrd.gz`` with
    ``Content-Encoding: gzip`` and HTTP clients would unpack the initrd.
    """
    return send_from_directory(
        Path(config().assets_dir).resolve(),
        subpath,
        mimetype="application/octet-stream",
        conditional=True,
        max_age=3600,
    )


@blueprint.get("/agent/<name>")
def agent_file(name: str) -> Response:
    if name not in AGENT_FILES:
        raise ApiError(404, "not found")
    filename, mimetype, built = AGENT_FILES[name]
    directory = Path(config().assets_dir).resolve() / "agent"
    if (directory / filename).is_file():  # an operator's own build wins
        return send_from_directory(directory, filename, mimetype=mimetype, conditional=True)
    return Response(built(), mimetype=mimetype)


# --- GRUB (arm64 UEFI) and the TFTP tree over HTTP ------------------------------------------------


def _grub_urls() -> Urls:
    """``request_urls``, but a Host header without a port gets the port this request came in on: Debian's
    GRUB 2.06 loses the port of ``(http,host:port)`` from its Host header, and UEFI HTTP boot omits it."""
    urls = request_urls()
    host = request.headers.get("Host", "")
    port = request.environ.get("SERVER_PORT", "")
    if config().server_addr or host.rpartition(":")[2].isdigit() or not port.isdigit():
        return urls
    return Urls(f"{urls.base}:{port}")


@blueprint.get("/boot/<mac>/grub.cfg")
def node_grub_config(mac: str) -> Response:
    """GRUB's boot.ipxe. It is also a GRUB node's first request, so it registers like ``/boot.ipxe?mac=``."""
    mac = path_mac(mac)
    if config().auto_register:
        lifecycle.register_if_new(store(), mac, _grub_facts(), source="boot")
    return _text(_grub_script(mac))


def _grub_script(mac: str) -> str:
    cfg = config()
    node = store().get_node(mac)
    if node is None:
        return boot.grub_wait_script(mac, cfg.boot_poll_interval, "unregistered")
    if node["status"] == "installed":
        return boot.grub_installed_script(mac)
    token = _install_token(node) if node["status"] == "installing" else None
    if token is None:
        reason = "discovered" if node["status"] == "installing" else node["status"]
        return boot.grub_wait_script(mac, cfg.boot_poll_interval, reason)
    return boot.grub_installing_script(cfg, node, _grub_urls(), token, boot.available_arches(cfg.assets_dir))


def _grub_facts() -> dict[str, object]:
    """What the GRUB loop tells about itself (``$grub_cpu``, ``$grub_platform``), validated."""
    cpu = request.args.get("arch", "")
    arch = {grub_cpu: debian for debian, grub_cpu in boot.DEBIAN_TO_GRUB_CPU.items()}.get(cpu)
    if not arch or request.args.get("platform") != "efi":
        return {}
    return {"arch": arch, "facts": {"platform": "efi", "loader": "grub", "grub_cpu": cpu}}


@blueprint.get("/tftp/<path:subpath>")
def tftp_file(subpath: str) -> Response:
    """The TFTP tree over HTTP, for UEFI HTTP boot (``http://<server>/tftp/ipxe.efi``).

    Not for Debian's GRUB: booted over HTTP by Debian 12's AAVMF it gets no network settings from the
    firmware (empty ``Uri()`` in its device path), so it has no prefix and loads no config at all.
    """
    try:
        found = tftp.resolve(config(), subpath, lambda: _grub_urls().base)
    except tftp.AccessViolation:
        raise ApiError(403, "access violation") from None
    except tftp.FileNotFound:
        raise ApiError(404, "not found") from None
    if isinstance(found, bytes):
        return _text(found.decode())
    return send_file(found, mimetype="application/octet-stream", conditional=True, max_age=3600)
