"""``ansible-lint`` with the production profile over the collection (playbooks, inventory, metadata, plugins).

It runs on a copy laid out as ``ansible_collections/nodefoundry/provision`` (as ``make sanity`` does), so it
resolves the collection's own modules and writes its caches outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.ansible.run_ansible_test import lay_out

BIN = Path(sys.executable).parent
# Publication metadata the collection does not have yet; everything else of the profile applies.
#   galaxy[no-repository]: galaxy.yml has no repository URL yet (the project has no public repository).
NOT_YET = ("galaxy[no-repository]",)


def test_production_profile_is_clean(tmp_path: Path) -> None:
    collection = lay_out(tmp_path / "tree")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")},
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "tree"),
        "NO_COLOR": "1",
    }
    args = [BIN / "ansible-lint", "--offline", "--profile", "production", "-f", "pep8", "-x", ",".join(NOT_YET)]
    done = subprocess.run(args, cwd=collection, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Passed: 0 failure(s), 0 warning(s)" in done.stderr, done.stderr
    assert "playbooks/install.yml" not in done.stdout
