"""TFTP and the TFTP tree over HTTP, against the real server with real clients.

Clients: tftp-hpa (``tftp``), curl's TFTP (RFC 2347-2349 options), busybox ``tftp`` (blksize), and a
raw UDP socket for what no client sends on purpose (malformed datagrams, a bare tsize request).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import http.server
import shutil
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nodefoundry_server.tftp import packets
from tests.conftest import SERVER_BIN, Server, free_port
from tests.integration.test_openapi_conformance import conforms

IPXE = Path("/usr/lib/ipxe")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
PACKAGE_DIR = "/usr/lib/debian-installer/images/12/arm64/text/debian-installer/arm64"


def start_with_tftp(server: Server) -> Server:
    """Start, then wait for the services process to report TFTP listening (HTTP is ready first)."""
    server.start()
    deadline = time.monotonic() + 30
    while server.get("/health").json()["components"].get("tftp", {}).get("state") != "ok":
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.1)
    return server


@pytest.fixture
def tftp_server(server_factory: Any) -> Server:
    return start_with_tftp(server_factory({"NF_TFTP_ADDR": f"127.0.0.1:{free_port()}"}))


def tftp_port(server: Server) -> int:
    return int(server.env["NF_TFTP_ADDR"].rsplit(":", 1)[1])


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def tftp_hpa(server: Server, command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run("tftp", "127.0.0.1", str(tftp_port(server)), "-m", "binary", "-c", *command.split(), cwd=cwd)


def curl_tftp(server: Server, path: str, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    url = f"tftp://127.0.0.1:{tftp_port(server)}/{path}"
    return run("curl", "--silent", "--show-error", "--max-time", "240", *options, "-o", str(out), url)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_request(server: Server, request: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(request, ("127.0.0.1", tftp_port(server)))
        return sock.recvfrom(65536)[0]


@pytest.mark.parametrize("name", ["undionly.kpxe", "ipxe.efi", "snponly.efi"])
def test_clients_fetch_ipxe_binaries_byte_identical(tftp_server: Server, tmp_path: Path, name: str) -> None:
    original = digest(IPXE / name)
    done = tftp_hpa(tftp_server, f"get {name} hpa.bin", tmp_path)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert digest(tmp_path / "hpa.bin") == original
    for number, options in enumerate([(), ("--tftp-blksize", "1468"), ("--tftp-blksize", "65464")]):
        out = tmp_path / f"curl{number}.bin"
        done = curl_tftp(tftp_server, name, out, *options)
        assert done.returncode == 0, done.stderr
        assert digest(out) == original, options
    busybox = tmp_path / "busybox.bin"
    done = run(
        BUSYBOX,
        "tftp",
        "-g",
        "-b",
        "8192",
        "-r",
        f"/{name}",
        "-l",
        str(busybox),
        "127.0.0.1",
        str(tftp_port(tftp_server)),
    )
    assert done.returncode == 0, done.stderr
    assert digest(busybox) == original


def test_tsize_is_answered_with_the_real_size(tftp_server: Server) -> None:
    answer = raw_request(tftp_server, packets.request_packet(packets.RRQ, "undionly.kpxe", options={"tsize": "0"}))
    assert answer == packets.oack_packet({"tsize": str((IPXE / "undionly.kpxe").stat().st_size)})


def test_traversal_absolute_paths_and_writes_are_refused(tftp_server: Server, tmp_path: Path) -> None:
    traversal = tftp_hpa(tftp_server, "get ../../etc/passwd passwd1", tmp_path)
    assert "Error code 2: '..' in file name" in traversal.stderr + traversal.stdout
    absolute = tftp_hpa(tftp_server, "get /etc/passwd passwd2", tmp_path)
    assert "Error code 1: etc/passwd not found" in absolute.stderr + absolute.stdout
    assert curl_tftp(tftp_server, "..%2f..%2fetc/passwd", tmp_path / "passwd3").returncode != 0
    (tmp_path / "upload.bin").write_bytes(b"data")
    upload = tftp_hpa(tftp_server, "put upload.bin", tmp_path)
    assert "Error code 2: read-only server" in upload.stderr + upload.stdout
    for name in ("passwd1", "passwd2", "passwd3"):
        assert not (tmp_path / name).exists() or b"root:" not in (tmp_path / name).read_bytes()
    assert not (tftp_server.assets_dir / "tftp" / "upload.bin").exists()


def test_a_file_past_65535_blocks_rolls_the_block_number_over(tftp_server: Server, tmp_path: Path) -> None:
    big = tftp_server.assets_dir / "tftp" / "big.bin"
    big.parent.mkdir(parents=True)
    block = hashlib.sha256(b"nodefoundry").digest() * 16  # 512 bytes
    big.write_bytes(b"".join(struct.pack("!I", number) + block[4:] for number in range(65535 + 100)) + b"tail")
    out = tmp_path / "big.bin"
    done = curl_tftp(tftp_server, "big.bin", out)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size == big.stat().st_size and digest(out) == digest(big)


def test_twenty_parallel_transfers_all_succeed(tftp_server: Server, tmp_path: Path) -> None:
    names = ["undionly.kpxe", "ipxe.efi"] * 10

    def fetch(number: int) -> str:
        out = tmp_path / f"{number}.bin"
        done = curl_tftp(tftp_server, names[number], out, "--tftp-blksize", "1428")
        assert done.returncode == 0, done.stderr
        return digest(out)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(fetch, range(20)))
    assert results == [digest(IPXE / name) for name in names]


def test_malformed_datagrams_leave_the_server_answering(tftp_server: Server, tmp_path: Path) -> None:
    garbage = [
        b"",
        b"\x00",
        b"\xff\xff",
        b"\x00\x01no terminator",
        b"\x00\x07x\x00",
        b"\x00\x01\x00\x00",
        b"\x00" * 1000,
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        for datagram in garbage:
            sock.sendto(datagram, ("127.0.0.1", tftp_port(tftp_server)))
        replies = []
        for _ in garbage[1:]:  # every datagram with an opcode gets ``illegal operation``
            replies.append(packets.parse_error(sock.recvfrom(65536)[0])[0])
    assert set(replies) == {4}
    done = curl_tftp(tftp_server, "undionly.kpxe", tmp_path / "after.bin")
    assert done.returncode == 0 and digest(tmp_path / "after.bin") == digest(IPXE / "undionly.kpxe")
    assert tftp_server.process is not None and tftp_server.process.poll() is None


def test_tftp_health_and_the_port_check(tftp_server: Server, server_factory: Any) -> None:
    component = tftp_server.get("/health").json()["components"]["tftp"]
    assert component["state"] == "ok" and component["detail"].startswith(
        f"listening on 127.0.0.1:{tftp_port(tftp_server)}"
    )
    taken = server_factory({"NF_TFTP_ADDR": tftp_server.env["NF_TFTP_ADDR"]})
    taken.start(wait=False)
    assert taken.process is not None and taken.process.wait(timeout=60) == 2
    message = f"NF_TFTP_ADDR: cannot listen on {tftp_server.env['NF_TFTP_ADDR']}: Address already in use"
    assert taken.log_text().strip().splitlines() == [f"nodefoundry-server: {message}"]


def test_http_tftp_route_serves_the_same_tree(tftp_server: Server, tmp_path: Path) -> None:
    for name in ("ipxe.efi", "undionly.kpxe"):
        response = tftp_server.get(f"/tftp/{name}")
        conforms(response, "/tftp/{path}")
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.content == (IPXE / name).read_bytes()
    part = tftp_server.get("/tftp/ipxe.efi", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == (IPXE / "ipxe.efi").read_bytes()[10:20]
    missing = tftp_server.get("/tftp/nothing.efi")
    assert missing.status_code == 404 and conforms(missing, "/tftp/{path}") == {"error": "not found"}
    connection = http.client.HTTPConnection("127.0.0.1", tftp_server.port, timeout=30)
    connection.request("GET", "/tftp/../../etc/passwd")  # as sent, not normalised by a client library
    refused = connection.getresponse()
    assert refused.status == 403 and refused.read() == b'{"error":"access violation"}\n'
    via_tftp = tmp_path / "grub.cfg"
    assert curl_tftp(tftp_server, "debian-installer/arm64/grub/grub.cfg", via_tftp).returncode == 0
    via_http = tftp_server.get("/tftp/debian-installer/arm64/grub/grub.cfg")
    conforms(via_http, "/tftp/{path}")
    assert via_http.headers["Content-Type"].startswith("text/plain")
    assert via_http.text == via_tftp.read_text()
    assert f"set nodefoundry_server='(http,127.0.0.1:{tftp_server.port})'" in via_http.text


# --- GRUB per node ----------------------------------------------------------------------------------

MAC = "52:54:00:12:34:56"
NORM = "525400123456"


def grub_cfg(server: Server, mac: str = MAC, host: str | None = None) -> str:
    """As GRUB asks: with its MAC spelling, the loop's query, and a Host header without the port."""
    headers = {"Host": host or "127.0.0.1"}
    response = server.get(f"/boot/{mac}/grub.cfg?arch=arm64&platform=efi", headers=headers)
    conforms(response, "/boot/{mac}/grub.cfg")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return response.text


def linux_args(script: str, arch: str = "arm64") -> list[str]:
    line = next(line for line in script.splitlines() if f"/debian-installer/{arch}/linux" in line)
    return [word.strip("'") for word in line.strip().removeprefix("if ").removesuffix("; then").split()]


def test_grub_config_follows_the_node_status(tftp_server: Server) -> None:
    server = tftp_server
    waiting = grub_cfg(server)
    assert f"node {NORM} is discovered and waits" in waiting and "sleep '5'" in waiting
    node = server.api("GET", f"/api/v1/nodes/{NORM}").json()
    assert node["status"] == "discovered" and node["arch"] == "arm64"
    assert node["facts"] == {"platform": "efi", "loader": "grub", "grub_cpu": "arm64"}

    assert server.api("PUT", f"/api/v1/nodes/{NORM}", json={"action": "install"}).status_code == 200
    installing = grub_cfg(server)
    args = linux_args(installing)
    assert args[:2] == ["linux", f"(http,127.0.0.1:{server.port})/assets/debian-installer/arm64/linux"]
    ipxe = server.get(f"/boot/{NORM}/boot.ipxe").text
    kernel = next(line for line in ipxe.splitlines() if line.startswith("kernel ") and "/arm64/" in line).split()
    assert kernel[2] == "initrd=initrd.gz"
    assert args[2:] == kernel[3:]  # the iPXE script's kernel arguments, the same install token
    assert f"initrd '(http,127.0.0.1:{server.port})/assets/debian-installer/arm64/initrd.gz'" in installing
    token = next(arg for arg in args if arg.startswith("url=")).split("token=", 1)[1]
    preseed = server.get(f"/preseed/{NORM}/preseed.cfg?token={token}")
    assert preseed.status_code == 200

    assert server.session.post(f"{server.url}/installer/{NORM}/finished?token={token}").status_code == 204
    installed = grub_cfg(server)
    assert installed.rstrip().endswith("exit") and "booting from local disk" in installed


def test_grub_config_for_a_failed_install(tftp_server: Server) -> None:
    grub_cfg(tftp_server)
    tftp_server.api("PUT", f"/api/v1/nodes/{NORM}", json={"action": "install"})
    token = next(arg for arg in linux_args(grub_cfg(tftp_server)) if arg.startswith("url=")).split("token=", 1)[1]
    tftp_server.session.post(f"{tftp_server.url}/installer/{NORM}/failed?token={token}")
    assert "failed, it waits for a reinstall" in grub_cfg(tftp_server)


def test_grub_config_uses_nf_server_addr_when_set(server_factory: Any) -> None:
    server = server_factory({"NF_SERVER_ADDR": "boot.lab:8080"}).start()
    server.api("POST", "/api/v1/nodes", json={"mac": NORM})
    server.api("PUT", f"/api/v1/nodes/{NORM}", json={"action": "install"})
    assert linux_args(grub_cfg(server))[1] == "(http,boot.lab:8080)/assets/debian-installer/arm64/linux"


def test_grub_config_without_auto_registration(server_factory: Any) -> None:
    server = server_factory({"NF_AUTO_REGISTER": "false"}).start()
    assert f"node {NORM} is not registered" in grub_cfg(server)
    assert server.api("GET", f"/api/v1/nodes/{NORM}").status_code == 404


def test_grub_config_refuses_bad_macs_and_hosts(tftp_server: Server) -> None:
    bad_mac = tftp_server.get("/boot/52:54:00:12:34/grub.cfg")
    assert bad_mac.status_code == 400
    assert conforms(bad_mac, "/boot/{mac}/grub.cfg") == {"error": "invalid MAC address format"}
    tftp_server.api("POST", "/api/v1/nodes", json={"mac": NORM})
    tftp_server.api("PUT", f"/api/v1/nodes/{NORM}", json={"action": "install"})
    bad_host = tftp_server.get(f"/boot/{NORM}/grub.cfg", headers={"Host": "bad host"})
    assert bad_host.status_code == 400
    conforms(bad_host, "/boot/{mac}/grub.cfg")


def test_assets_import_brings_debian_grub_and_tftp_serves_it(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory({"NF_TFTP_ADDR": f"127.0.0.1:{free_port()}"}, installer=False)
    imported = subprocess.run(
        [str(SERVER_BIN), "assets", "import", "--arch", "arm64"],
        env=server.env,
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr
    target = server.assets_dir / "debian-installer" / "arm64"
    package = Path(PACKAGE_DIR)
    assert digest(target / "grubaa64.efi") == digest(package / "grubaa64.efi")
    assert digest(target / "grub/arm64-efi/http.mod") == digest(package / "grub/arm64-efi/http.mod")
    assert (target / "grub/font.pf2").is_file()
    assert not (target / "grub/grub.cfg").exists() and not (target / "grub/arm64-efi/grub.cfg").exists()
    start_with_tftp(server)
    out = tmp_path / "grubaa64.efi"
    assert curl_tftp(server, "debian-installer/arm64/grubaa64.efi", out, "--tftp-blksize", "1468").returncode == 0
    assert digest(out) == digest(package / "grubaa64.efi")
    module = tmp_path / "http.mod"
    assert tftp_hpa(server, f"get /debian-installer/arm64/grub/arm64-efi/http.mod {module}", tmp_path).returncode == 0
    assert digest(module) == digest(package / "grub/arm64-efi/http.mod")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def test_assets_import_from_a_mirror_brings_grub_checked_against_sha256sums(
    server_factory: Any, tmp_path: Path
) -> None:
    images = tmp_path / "mirror/debian/dists/bookworm/main/installer-arm64/current/images"
    netboot = images / "netboot/debian-installer/arm64"
    (netboot / "grub/arm64-efi").mkdir(parents=True)
    files = {
        "linux": b"kernel",
        "initrd.gz": b"initrd",
        "grubaa64.efi": b"grub loader",
        "grub/arm64-efi/http.mod": b"http module",
        "grub/grub.cfg": b"packaged config",
    }
    for name, content in files.items():
        (netboot / name).write_bytes(content)
    sums = [f"{hashlib.sha256(c).hexdigest()}  ./netboot/debian-installer/arm64/{n}" for n, c in files.items()]
    (images / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "mirror"))
    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    server = server_factory(installer=False)
    url = f"http://127.0.0.1:{mirror.server_address[1]}/debian"
    command = [str(SERVER_BIN), "assets", "import", "--arch", "arm64", "--mirror", url]
    try:
        done = subprocess.run(command, env=server.env, cwd=server.workdir, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        target = server.assets_dir / "debian-installer/arm64"
        assert (target / "grubaa64.efi").read_bytes() == b"grub loader"
        assert (target / "grub/arm64-efi/http.mod").read_bytes() == b"http module"
        assert not (target / "grub/grub.cfg").exists()
        (netboot / "grub/arm64-efi/http.mod").write_bytes(b"tampered")
        tampered = subprocess.run(command, env=server.env, cwd=server.workdir, capture_output=True, text=True)
        assert tampered.returncode == 2 and "checksum mismatch" in tampered.stderr
        assert (target / "grub/arm64-efi/http.mod").read_bytes() == b"http module"
    finally:
        mirror.shutdown()
