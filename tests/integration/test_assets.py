"""Installer assets: import from Debian's packages or a mirror, then serve them to nodes."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import threading
from pathlib import Path

import pytest

from nodefoundry_server.assets import import_from_apt
from tests.conftest import SERVER_BIN

PACKAGE_DIR = "/usr/lib/debian-installer/images/12/{arch}/text/debian-installer/{arch}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SERVER_BIN), *args], env=server.env, cwd=server.workdir, capture_output=True, text=True)


def test_import_from_installed_packages_and_serve_with_range(server_factory):
    server = server_factory(installer=False)
    done = cli(server, "assets", "import")
    assert done.returncode == 0, done.stderr
    for arch in ("amd64", "arm64"):
        target = server.assets_dir / "debian-installer" / arch
        for name in ("linux", "initrd.gz"):
            assert sha256(target / name) == sha256(Path(PACKAGE_DIR.format(arch=arch)) / name)
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["source"] == f"debian-installer-12-netboot-{arch}"
        assert manifest["initrd.gz"]["sha256"] == sha256(target / "initrd.gz")
    server.start()
    assert server.get("/health").json()["components"]["assets"] == {"state": "ok", "arches": ["amd64", "arm64"]}
    source = Path(PACKAGE_DIR.format(arch="amd64")) / "initrd.gz"
    whole = server.get("/assets/debian-installer/amd64/initrd.gz")
    assert whole.status_code == 200 and whole.content == source.read_bytes()
    part = server.get("/assets/debian-installer/amd64/initrd.gz", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == source.read_bytes()[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{source.stat().st_size}"


def test_import_downloads_the_package_when_it_is_not_installed(tmp_path):
    """apt-get download + dpkg-deb -x, the path taken on a server without the netboot packages."""
    files = import_from_apt(tmp_path / "assets", "arm64", installed_root=tmp_path / "empty-root")
    assert sha256(Path(files["linux"])) == sha256(Path(PACKAGE_DIR.format(arch="arm64")) / "linux")


@pytest.fixture
def mirror(tmp_path):
    """A local Debian mirror tree with the netboot files and a SHA256SUMS, served over HTTP."""
    root = tmp_path / "mirror"
    images = root / "debian/dists/bookworm/main/installer-amd64/current/images"
    netboot = images / "netboot/debian-installer/amd64"
    netboot.mkdir(parents=True)
    (netboot / "linux").write_bytes(b"mirror-kernel" * 1000)
    (netboot / "initrd.gz").write_bytes(b"mirror-initrd" * 5000)
    sums = [f"{sha256(netboot / n)}  ./netboot/debian-installer/amd64/{n}" for n in ("linux", "initrd.gz")]
    (images / "SHA256SUMS").write_text("\n".join(sums) + "\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/debian", netboot
    httpd.shutdown()


def test_import_from_a_mirror_checks_sha256sums(server_factory, mirror):
    url, netboot = mirror
    server = server_factory(installer=False)
    done = cli(server, "assets", "import", "--arch", "amd64", "--mirror", url)
    assert done.returncode == 0, done.stderr
    target = server.assets_dir / "debian-installer/amd64"
    assert (target / "initrd.gz").read_bytes() == (netboot / "initrd.gz").read_bytes()
    before = (target / "linux").read_bytes()
    (netboot / "linux").write_bytes(b"tampered")
    done = cli(server, "assets", "import", "--arch", "amd64", "--mirror", url)
    assert done.returncode == 2
    assert "checksum mismatch" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert (target / "linux").read_bytes() == before  # a failed import leaves the old files in place


def test_import_errors_are_one_line(server_factory):
    server = server_factory(installer=False)
    bad_arch = cli(server, "assets", "import", "--arch", "sparc")
    assert bad_arch.returncode == 2 and "unknown architecture 'sparc'" in bad_arch.stderr
    unreachable = cli(server, "assets", "import", "--arch", "amd64", "--mirror", "http://127.0.0.1:9/debian")
    assert unreachable.returncode == 2 and "cannot fetch" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def test_assets_route_refuses_traversal(server):
    for path in ("/assets/../data/nodes.db", "/assets/%2e%2e/nodes.db", "/assets//etc/passwd"):
        response = server.get(path)
        assert response.status_code == 404, path
