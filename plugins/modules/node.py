#!/usr/bin/python
# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node
short_description: Register, update, install or delete a NodeFoundry node
description:
  - Makes a node of the NodeFoundry server look as described. The node is identified by its MAC address.
  - With O(state=installed) the server is asked to install Debian on a C(discovered) node. An installed (or
    failed) node is never touched again unless O(reinstall=true); a node that is C(installing) is left alone.
  - Check mode changes nothing on the server and reports what would change; diff mode shows the fields.
version_added: 0.1.0
extends_documentation_fragment:
  - nodefoundry.provision.connection
  - nodefoundry.provision.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
options:
  mac:
    description: MAC address of the node (C(aa:bb:cc:dd:ee:ff), C(aa-bb-...) or 12 hex digits).
    type: str
    required: true
  state:
    description:
      - V(present) registers the node (status C(discovered)) or updates the given fields.
      - V(installed) does the same and then starts its install if it is C(discovered).
      - V(absent) deletes the node (its event history is kept on the server).
    type: str
    choices: [present, installed, absent]
    default: present
  hostname:
    description: Host name of the node (an RFC 1123 label).
    type: str
  ip:
    description: Static IPv4 address; also its DHCP reservation.
    type: str
  netmask:
    description: Netmask of the static address (dotted, or a prefix length).
    type: str
  gateway:
    description: Default gateway of the static address.
    type: str
  dns:
    description: DNS servers (at most 3).
    type: list
    elements: str
  labels:
    description: Labels of the node; replaces the node's labels when given.
    type: dict
  profile:
    description: Install profile of the node, defined in the server's configuration.
    type: str
  reinstall:
    description: With O(state=installed), reinstall a node that is already C(installed) or C(failed).
    type: bool
    default: false
  wait:
    description: With O(state=installed), wait until the install has ended (C(installed) or C(failed)).
    type: bool
    default: false
  wait_timeout:
    description: Seconds to wait at most; the module fails when the install has not ended by then.
    type: int
    default: 3600
  wait_sleep:
    description: Seconds between two looks at the node while waiting.
    type: int
    default: 10
"""

EXAMPLES = r"""
- name: Register a node with a static address
  nodefoundry.provision.node:
    url: http://10.0.0.1:8080
    token: "{{ nodefoundry_token }}"
    mac: "52:54:00:12:34:56"
    hostname: edge-01
    ip: 10.0.0.21
    netmask: 255.255.255.0
    gateway: 10.0.0.1
    dns: [10.0.0.1]
    labels:
      rack: r1

- name: Install it and wait for the installer to finish
  nodefoundry.provision.node:
    mac: "52:54:00:12:34:56"
    state: installed
    wait: true
    wait_timeout: 2700

- name: Forget a node
  nodefoundry.provision.node:
    mac: "52:54:00:12:34:56"
    state: absent
"""

RETURN = r"""
node:
  description: The node as the server reports it after the task (before it, in check mode). Empty when deleted.
  returned: always
  type: dict
  sample:
    mac: "525400123456"
    status: installing
    liveness: unknown
    hostname: edge-01
    ip: 10.0.0.21
    labels: {rack: r1}
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    client_from_params,
    normalize_mac,
)

FIELDS = ("hostname", "ip", "netmask", "gateway", "dns", "labels", "profile")
ENDED = ("installed", "failed")


def wanted_fields(params, node):
    """The given fields that differ from the node's current values."""
    changes = {}
    for key in FIELDS:
        value = params[key]
        if value is None:
            continue
        current = (node or {}).get(key)
        value = STORED_FORM.get(key, _same)(value)
        if current != value and not (current in (None, "", [], {}) and value in ("", [], {})):
            changes[key] = value
    return changes


def _same(value):
    return value


def _label_strings(labels):
    """Label values are strings on the server; ``rack: 1`` in YAML means ``"1"``."""
    return {key: value if isinstance(value, str) else str(value) for key, value in labels.items()}


def _prefix_form(value):
    """``24`` or ``/24`` as the server stores it (dotted)."""
    text = str(value).lstrip("/")
    if not text.isdigit() or not 0 <= int(text) <= 32:
        return value
    bits = (0xFFFFFFFF << (32 - int(text))) & 0xFFFFFFFF
    return ".".join(str((bits >> shift) & 0xFF) for shift in (24, 16, 8, 0))


# How the server stores a value it accepts, so a second run compares like with like (idempotence).
STORED_FORM = {"hostname": lambda value: value.lower(), "netmask": _prefix_form, "labels": _label_strings}


def wait_for_end(client, mac, timeout, sleep):
    """Poll until the install ended; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        node = client.node(mac)
        if node is None:
            raise ApiError("node %s was deleted while waiting for its install" % mac)
        if node["status"] in ENDED:
            return node
        if time.monotonic() + sleep > deadline:
            raise ApiError("install of %s did not end within %d s (status %s)" % (mac, timeout, node["status"]))
        time.sleep(sleep)


def diff_view(node):
    """The fields this module manages: the same in check mode and in a real run (no server timestamps)."""
    return {key: node[key] for key in ("mac", "status", *FIELDS) if (node or {}).get(key) not in (None, "", [], {})}


class NodeTask:
    """One run of the module: compare, then change only what differs (nothing in check mode)."""

    def __init__(self, module, client, mac):
        self.module = module
        self.client = client
        self.mac = mac
        self.check = module.check_mode
        self.changed = False

    def absent(self, node):
        if node is None:
            return {}
        self.changed = True
        if not self.check:
            self.client.delete_node(self.mac)
        return {}

    def present(self, node):
        changes = wanted_fields(self.module.params, node)
        if node is None:
            self.changed = True
            return {"mac": self.mac, "status": "discovered", **changes} if self.check else self._create(changes)
        if not changes:
            return node
        self.changed = True
        return dict(node, **changes) if self.check else self.client.update_node(self.mac, changes)

    def _create(self, changes):
        """One request, so a refused field leaves no half-registered node behind."""
        return self.client.create_node(dict(changes, mac=self.mac))

    def installed(self, node):
        node = self.present(node)
        action = None
        if node["status"] == "discovered":
            action = "install"
        elif node["status"] in ENDED and self.module.params["reinstall"]:
            action = "reinstall"
        if action:
            self.changed = True
            node = dict(node, status="installing") if self.check else self._start(action)
        if self.module.params["wait"] and not self.check:
            node = wait_for_end(
                self.client, self.mac, self.module.params["wait_timeout"], self.module.params["wait_sleep"]
            )
            if node["status"] == "failed":
                raise ApiError("install of %s failed (phase %s)" % (self.mac, node.get("install_phase", "unknown")))
        return node

    def _start(self, action):
        return self.client.request("PUT", "/api/v1/nodes/" + self.mac, body={"action": action})[1]


def main():
    argument_spec = dict(
        CONNECTION_ARGS,
        mac={"type": "str", "required": True},
        state={"type": "str", "default": "present", "choices": ["present", "installed", "absent"]},
        hostname={"type": "str"},
        ip={"type": "str"},
        netmask={"type": "str"},
        gateway={"type": "str"},
        dns={"type": "list", "elements": "str"},
        labels={"type": "dict"},
        profile={"type": "str"},
        reinstall={"type": "bool", "default": False},
        wait={"type": "bool", "default": False},
        wait_timeout={"type": "int", "default": 3600},
        wait_sleep={"type": "int", "default": 10},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        mac = normalize_mac(module.params["mac"])
        client = client_from_params(module.params)
        task = NodeTask(module, client, mac)
        before = client.node(mac)
        after = getattr(task, module.params["state"])(before)
    except ApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=task.changed, node=after, diff={"before": diff_view(before), "after": diff_view(after)})


if __name__ == "__main__":
    main()
