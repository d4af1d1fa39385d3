# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by every module and the inventory plugin, documented once."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    # For modules: the environment fallbacks are applied by the shared argument spec.
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

    # For the inventory plugin: Ansible itself reads the environment variables.
    INVENTORY = r"""
options:
  url:
    description:
      - Base URL of the NodeFoundry server, for example C(http://10.0.0.1:8080).
      - If not set, the environment variable E(NODEFOUNDRY_URL) is used.
    type: str
    required: true
    env:
      - name: NODEFOUNDRY_URL
  token:
    description:
      - API token of the server (C(nodefoundry-server token create)). Read-only tokens suffice for queries.
      - If not set, the environment variable E(NODEFOUNDRY_TOKEN) is used.
    type: str
    required: true
    env:
      - name: NODEFOUNDRY_TOKEN
  validate_certs:
    description:
      - Verify the server's TLS certificate when O(url) is C(https://).
      - If not set, the environment variable E(NODEFOUNDRY_VALIDATE_CERTS) is used.
    type: bool
    default: true
    env:
      - name: NODEFOUNDRY_VALIDATE_CERTS
  timeout:
    description:
      - Seconds to wait for each HTTP response.
      - If not set, the environment variable E(NODEFOUNDRY_TIMEOUT) is used.
    type: int
    default: 30
    env:
      - name: NODEFOUNDRY_TIMEOUT
"""
