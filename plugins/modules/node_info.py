#!/usr/bin/python
# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node_info
short_description: Query NodeFoundry nodes
description:
  - Returns one node, a list of nodes, or the nodes with given statuses and labels.
  - Statuses are filtered by the server in one request; labels are matched on the returned nodes.
version_added: 0.1.0
extends_documentation_fragment:
  - nodefoundry.provision.connection
  - nodefoundry.provision.attributes
  - nodefoundry.provision.attributes.info_module
options:
  mac:
    description: Only this node. A MAC the server does not know returns an empty list (not an error).
    type: str
  macs:
    description: Only these nodes.
    type: list
    elements: str
  statuses:
    description: Only nodes with one of these lifecycle statuses.
    type: list
    elements: str
    choices: [discovered, installing, installed, failed]
  labels:
    description: Only nodes that carry all of these labels with these values.
    type: dict
"""

EXAMPLES = r"""
- name: All discovered nodes in rack r1
  nodefoundry.provision.node_info:
    statuses: [discovered]
    labels:
      rack: r1
  register: found

- name: One node
  nodefoundry.provision.node_info:
    mac: "52:54:00:12:34:56"
  register: one
"""

RETURN = r"""
nodes:
  description: The matching nodes, newest first.
  returned: always
  type: list
  elements: dict
  sample:
    - mac: "525400123456"
      status: discovered
      liveness: unknown
      labels: {rack: r1}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    client_from_params,
    normalize_mac,
)


def matches(node, macs, labels):
    if macs is not None and node["mac"] not in macs:
        return False
    node_labels = node.get("labels") or {}
    return all(node_labels.get(key) == str(value) for key, value in (labels or {}).items())


def main():
    argument_spec = dict(
        CONNECTION_ARGS,
        mac={"type": "str"},
        macs={"type": "list", "elements": "str"},
        statuses={"type": "list", "elements": "str", "choices": ["discovered", "installing", "installed", "failed"]},
        labels={"type": "dict"},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True, mutually_exclusive=[["mac", "macs"]])
    params = module.params
    try:
        client = client_from_params(params)
        if params["mac"]:
            node = client.node(normalize_mac(params["mac"]))
            found = [node] if node and matches(node, None, params["labels"]) else []
            if found and params["statuses"] and found[0]["status"] not in params["statuses"]:
                found = []
        else:
            macs = {normalize_mac(mac) for mac in params["macs"]} if params["macs"] is not None else None
            found = [node for node in client.nodes(params["statuses"]) if matches(node, macs, params["labels"])]
    except ApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, nodes=found)


if __name__ == "__main__":
    main()
