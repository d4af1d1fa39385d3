"""The virtual TFTP tree: lookup order, the generated GRUB config, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodefoundry_server.config import Config, load
from nodefoundry_server.tftp import GRUB_CONFIG, AccessViolation, FileNotFound, resolve
from nodefoundry_server.tftp.tree import segments

BASE = "http://10.0.0.1:8080"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir()
    (ipxe / "undionly.kpxe").write_bytes(b"ipxe-bios")
    (ipxe / "ipxe.efi").write_bytes(b"ipxe-efi")
    installer = tmp_path / "assets" / "debian-installer" / "arm64"
    (installer / "grub" / "arm64-efi").mkdir(parents=True)
    (installer / "grubaa64.efi").write_bytes(b"grub")
    (installer / "grub" / "arm64-efi" / "http.mod").write_bytes(b"module")
    (installer / "grub" / "grub.cfg").write_text("packaged config, never served\n")
    (tmp_path / "assets" / "agent").mkdir()
    (tmp_path / "assets" / "agent" / "secret").write_text("not in the tree")
    return load(environ={"NF_ASSETS_DIR": str(tmp_path / "assets"), "NF_TFTP_IPXE_DIR": str(ipxe)})


def base() -> str:
    return BASE


def read(config: Config, path: str) -> bytes:
    found = resolve(config, path, base)
    return found if isinstance(found, bytes) else found.read_bytes()


def test_ipxe_binaries_with_or_without_a_leading_slash(config: Config) -> None:
    assert read(config, "undionly.kpxe") == b"ipxe-bios"
    assert resolve(config, "/ipxe.efi", base) == resolve(config, "ipxe.efi", base)
    assert resolve(config, "//./ipxe.efi", base) == resolve(config, "ipxe.efi", base)


def test_assets_tftp_overrides_everything(config: Config) -> None:
    override = Path(config.assets_dir) / "tftp"
    (override / "debian-installer/arm64/grub").mkdir(parents=True)
    (override / "ipxe.efi").write_bytes(b"own build")
    (override / "debian-installer/arm64/grub/grub.cfg").write_text("own config\n")
    assert resolve(config, "ipxe.efi", base) == override / "ipxe.efi"
    config_path = "debian-installer/arm64/grub/grub.cfg"
    assert resolve(config, config_path, base) == override / config_path


def test_installer_tree_serves_grub_files(config: Config) -> None:
    assert read(config, "/debian-installer/arm64/grub/arm64-efi/http.mod") == b"module"
    assert read(config, "debian-installer/arm64/grubaa64.efi") == b"grub"


def test_grub_config_is_generated_with_the_http_base(config: Config) -> None:
    generated = resolve(config, "/" + GRUB_CONFIG, base)
    assert isinstance(generated, bytes)
    assert b"set nodefoundry_server='(http,10.0.0.1:8080)'" in generated
    assert b"packaged config" not in generated


def test_the_http_base_is_asked_only_for_generated_files(config: Config) -> None:
    def refuse() -> str:
        raise AssertionError("asked for the HTTP base")

    resolve(config, "ipxe.efi", refuse)


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "../../etc/passwd", "/../ipxe.efi", "debian-installer/../../../etc/passwd", "a/../ipxe.efi"],
)
def test_dot_dot_is_an_access_violation(config: Config, path: str) -> None:
    with pytest.raises(AccessViolation):
        resolve(config, path, base)


@pytest.mark.parametrize("path", ["ipxe.efi\n", "a\x00b", "\x7f"])
def test_control_characters_are_an_access_violation(config: Config, path: str) -> None:
    with pytest.raises(AccessViolation):
        resolve(config, path, base)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",  # absolute paths are looked up inside the roots, like relative ones
        "etc/passwd",
        "agent/secret",  # the assets directory is not served outside debian-installer/ and tftp/
        "debian-installer",  # a directory
        "debian-installer/arm64/grub",
        "ipxe.efi/x",
        "x" * 5000,  # longer than a file name may be
        "",
        "/",
        "./",
    ],
)
def test_not_found(config: Config, path: str) -> None:
    with pytest.raises(FileNotFound):
        resolve(config, path, base)


def test_symlinks_inside_a_root_are_followed(config: Config, tmp_path: Path) -> None:
    """Debian's /usr/lib/ipxe/ipxe.efi is a link to /boot/ipxe.efi."""
    elsewhere = tmp_path / "boot-ipxe.efi"
    elsewhere.write_bytes(b"linked")
    link = Path(config.tftp_ipxe_dir) / "snponly.efi"
    link.symlink_to(elsewhere)
    assert read(config, "snponly.efi") == b"linked"


def test_segments() -> None:
    assert segments("/a//b/./c") == ["a", "b", "c"]
    with pytest.raises(AccessViolation):
        segments("a/..")
    with pytest.raises(FileNotFound):
        segments("//")
