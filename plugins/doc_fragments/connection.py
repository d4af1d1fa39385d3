# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by every module and the inventory plugin, documented once."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import yaml


def _read_from_environment(documentation: str) -> str:
    """Add to each option its ``env`` entry NODEFOUNDRY_<OPTION>, the variable its description names.

    Modules apply these fallbacks in their argument spec (module_utils/api.py); for an inventory plugin
    Ansible reads the variables itself, but only those listed under ``env``.
    """
    doc = yaml.safe_load(documentation)
    for name, option in doc["options"].items():
        option["env"] = [{"name": "NODEFOUNDRY_" + name.upper()}]
    return yaml.safe_dump(doc, sort_keys=False)


class ModuleDocFragment:
    # For modules (extends_documentation_fragment: nodefoundry.provision.connection).
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of the NodeFoundry server, for example C(http://10.0.0.1:8080).
      - If not set, the environment variable E(NODEFOUNDRY_URL) is used.
    type: str
    required: true
  token:
    description:
      - API token of the server (C(nodefoundry-server token create)). Read-only tokens suffice for queries.
      - If not set, the environment variable E(NODEFOUNDRY_TOKEN) is used.
    type: str
    required: true
  validate_certs:
    description:
      - Verify the server's TLS certificate when O(url) is C(https://).
      - If not set, the environment variable E(NODEFOUNDRY_VALIDATE_CERTS) is used.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for each HTTP response.
      - If not set, the environment variable E(NODEFOUNDRY_TIMEOUT) is used.
    type: int
    default: 30
"""


# For the inventory plugin (nodefoundry.provision.connection.inventory): the same options with ``env``. It is
# attached after the class because ansible-test's yamllint reads every assignment in a fragment class as a
# YAML string literal (it checks DOCUMENTATION above; this one is generated YAML).
ModuleDocFragment.INVENTORY = _read_from_environment(ModuleDocFragment.DOCUMENTATION)
