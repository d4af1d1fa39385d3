"""Let these collection unit tests run under plain pytest (``make test``) as well as ``ansible-test units``.

ansible-test installs Ansible's collection loader for the collection it runs in. Under plain pytest the
repository is not inside an ``ansible_collections/<namespace>/<name>`` tree, so the same loader is
installed here over a temporary tree whose ``nodefoundry/provision`` is a symlink to the repository.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _collection_importable() -> bool:
    try:
        return importlib.util.find_spec("ansible_collections.nodefoundry.provision") is not None
    except ImportError:
        return False


def _install_collection_loader() -> None:
    if _collection_importable():
        return  # ansible-test did it
    # pylint: disable-next=import-outside-toplevel
    from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

    root = Path(tempfile.mkdtemp(prefix="nf-unit-collections-"))
    atexit.register(shutil.rmtree, root, True)
    namespace = root / "ansible_collections" / "nodefoundry"
    namespace.mkdir(parents=True)
    (namespace / "provision").symlink_to(REPO, target_is_directory=True)
    _AnsibleCollectionFinder(paths=[str(root)])._install()  # pylint: disable=protected-access


_install_collection_loader()
