# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Author and attributes shared by every module of the collection, documented once."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    # Every module (extends_documentation_fragment: nodefoundry.provision.attributes). The modules call the
    # server's API from the controller, on any platform, and all belong to the action group of meta/runtime.yml.
    # A module states its own check_mode and diff_mode support (in its attributes, or through INFO_MODULE).
    DOCUMENTATION = r"""
author:
  - NodeFoundry contributors (!UNKNOWN)
attributes:
  check_mode:
    description: Can run in check mode and predict the changed status without changing anything on the server.
  diff_mode:
    description: Returns details on what has changed (or would change, in check mode) when in diff mode.
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: all
  action_group:
    description: Use C(group/nodefoundry.provision.nodefoundry) in C(module_defaults) to set defaults for this module.
    support: full
    membership:
      - nodefoundry.provision.nodefoundry
"""

    # Modules that only read (extends_documentation_fragment: nodefoundry.provision.attributes.info_module).
    INFO_MODULE = r"""
attributes:
  check_mode:
    support: full
    details:
      - This action does not change anything on the server.
  diff_mode:
    support: N/A
    details:
      - This action does not change anything on the server.
"""
