"""roles/server/files/pack_tree.py: the server role ships sources as tarballs whose bytes depend only on
the files, so the copy task (and with it pip and the restart) runs only when the sources changed."""

from __future__ import annotations

import importlib.util
import os
import tarfile
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "server" / "files" / "pack_tree.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pack_tree", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tree(root: Path) -> Path:
    for name, text in {
        "pyproject.toml": "[project]\nname = 'x'\n",
        "pkg/__init__.py": "VALUE = 1\n",
        "pkg/templates/a.j2": "{{ a }}\n",
        "pkg/__pycache__/__init__.cpython-311.pyc": "cache",
        "pkg.egg-info/PKG-INFO": "stale",
        "build/lib/pkg/__init__.py": "old",
        ".pytest_cache/v": "x",
        "pkg/mod.pyc": "x",
    }.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_only_sources_travel_under_one_top_directory(tmp_path: Path) -> None:
    out = tmp_path / "x.tar.gz"
    load().pack(make_tree(tmp_path / "src"), out, "nodefoundry-x")
    with tarfile.open(out) as tar:
        names = tar.getnames()
        modes = {member.mode for member in tar.getmembers()}
    assert names == [
        "nodefoundry-x/pkg/__init__.py",
        "nodefoundry-x/pkg/templates/a.j2",
        "nodefoundry-x/pyproject.toml",
    ]
    assert modes == {0o644}


def test_same_files_same_bytes_and_a_change_shows(tmp_path: Path) -> None:
    pack = load().pack
    source = make_tree(tmp_path / "src")
    pack(source, tmp_path / "1.tar.gz", "top")
    os.utime(source / "pkg" / "__init__.py", (1, 1))  # touched, not changed: same bytes
    (source / "pkg" / "__pycache__" / "new.pyc").write_text("cache")
    pack(source, tmp_path / "2.tar.gz", "top")
    assert (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()
    (source / "pkg" / "__init__.py").write_text("VALUE = 2\n")
    pack(source, tmp_path / "3.tar.gz", "top")
    assert (tmp_path / "3.tar.gz").read_bytes() != (tmp_path / "1.tar.gz").read_bytes()
