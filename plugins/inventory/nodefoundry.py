# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: nodefoundry
short_description: Nodes of a NodeFoundry provisioning server
description:
  - Reads every node from the NodeFoundry REST API in one request and groups them by lifecycle status
    (C(discovered), C(installing), C(installed), C(failed)) and liveness (C(online), C(offline)).
  - Inventory sources must be named C(*.nodefoundry.yml) or C(*.nodefoundry.yaml).
  - Strings that come from the server (host names, labels, facts) are marked unsafe, so a node cannot inject
    Jinja2 templates into a play.
  - When the server cannot be reached, the last inventory fetched successfully is used (with a warning) if
    O(fallback_to_last_known) is enabled.
version_added: 0.1.0
author:
  - NodeFoundry contributors
extends_documentation_fragment:
  - constructed
  - inventory_cache
  - nodefoundry.provision.connection.inventory
options:
  plugin:
    description: Marks this file as an inventory source of this plugin.
    type: str
    required: true
    choices: [nodefoundry.provision.nodefoundry]
  statuses:
    description:
      - Only nodes with one of these lifecycle statuses (filtered by the server). Empty means all nodes.
    type: list
    elements: str
    default: []
  hostnames:
    description:
      - How inventory host names are made, first usable entry wins.
      - C(hostname) is the node's host name, C(mac) is C(node-<mac>), C(ip) is its address; any other entry is
        a Jinja2 template over the node's C(nodefoundry_*) variables.
      - Names must be unique; a node whose name is already taken is named C(node-<mac>) with a warning.
    type: list
    elements: str
    default: [hostname, mac]
  fallback_to_last_known:
    description:
      - Use the last successfully fetched node list when the server is unreachable.
    type: bool
    default: true
  last_known_dir:
    description: Directory for the last successfully fetched node list (one file per source, mode 0600).
    type: path
    default: ~/.cache/nodefoundry
  cache_timeout:
    description: Seconds a cached node list stays valid when O(cache) is enabled. Kept short on purpose.
    type: int
    default: 60
    env:
      - name: ANSIBLE_INVENTORY_CACHE_TIMEOUT
    ini:
      - section: inventory
        key: cache_timeout
"""

EXAMPLES = r"""
# lab.nodefoundry.yml -- ansible-inventory -i lab.nodefoundry.yml --graph
plugin: nodefoundry.provision.nodefoundry
url: http://10.0.0.1:8080
# token from NODEFOUNDRY_TOKEN
keyed_groups:
  - key: nodefoundry_arch
    prefix: arch
  - key: nodefoundry_labels.rack | default('none')
    prefix: rack
compose:
  ansible_user: "'nodefoundry'"
"""

import hashlib
import json
import os
import time

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import ApiError, Client

STATUS_GROUPS = ("discovered", "installing", "installed", "failed")
LIVENESS_GROUPS = ("online", "offline")
FACT_SUMMARY = ("os", "kernel", "arch", "cpu_count", "cpu_model", "memory_mb", "agent_version", "boot_id")


def node_vars(node):
    """The ``nodefoundry_*`` host variables of one node; remote strings are wrapped as unsafe."""
    facts = node.get("facts") or {}
    agent = facts.get("agent") if isinstance(facts.get("agent"), dict) else facts
    summary = {key: agent[key] for key in FACT_SUMMARY if key in agent}
    variables = {
        "nodefoundry_mac": node["mac"],
        "nodefoundry_status": node.get("status"),
        "nodefoundry_liveness": node.get("liveness", "unknown"),
        "nodefoundry_online": node.get("liveness") == "online",
        "nodefoundry_arch": node.get("arch") or "",
        "nodefoundry_hostname": node.get("hostname") or "",
        "nodefoundry_ip": node.get("ip") or "",
        "nodefoundry_labels": node.get("labels") or {},
        "nodefoundry_last_heartbeat": node.get("last_heartbeat") or "",
        "nodefoundry_facts": summary,
    }
    if node.get("ip"):
        variables["ansible_host"] = node["ip"]
    return {key: wrap_var(value) for key, value in variables.items()}


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "nodefoundry.provision.nodefoundry"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("nodefoundry.yml", "nodefoundry.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        nodes = self._cached_or_fetched(self.get_cache_key(path), cache)
        self._populate(nodes)

    def _cached_or_fetched(self, cache_key, cache):
        use_cache = self.get_option("cache")
        if use_cache and cache:
            try:
                return self._cache[cache_key]
            except KeyError:
                pass
        nodes = self._fetch(cache_key)
        if use_cache:
            self._cache[cache_key] = nodes
        return nodes

    def _fetch(self, cache_key):
        try:
            client = Client(
                self.get_option("url"),
                self.get_option("token"),
                self.get_option("validate_certs"),
                self.get_option("timeout"),
            )
            nodes = client.nodes(self.get_option("statuses"))
        except ApiError as exc:
            if exc.status is None and self.get_option("fallback_to_last_known"):
                return self._last_known(cache_key, exc)
            raise AnsibleError("nodefoundry inventory: %s" % exc) from None
        if not isinstance(nodes, list):
            raise AnsibleParserError("nodefoundry inventory: the server did not return a list of nodes")
        self._remember(cache_key, nodes)
        return nodes

    def _last_known_path(self, cache_key):
        name = hashlib.sha256(cache_key.encode()).hexdigest()[:32]
        return os.path.join(os.path.expanduser(self.get_option("last_known_dir")), "inventory-%s.json" % name)

    def _remember(self, cache_key, nodes):
        path = self._last_known_path(cache_key)
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            temporary = path + ".tmp"
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
                json.dump(nodes, handle)
            os.replace(temporary, path)
        except OSError as exc:
            self.display.warning("nodefoundry inventory: cannot keep the last known node list: %s" % exc)

    def _last_known(self, cache_key, error):
        path = self._last_known_path(cache_key)
        try:
            with open(path) as handle:
                nodes = json.load(handle)
            age = time.time() - os.path.getmtime(path)
        except (OSError, ValueError):
            raise AnsibleError(
                "nodefoundry inventory: %s (and no last known node list to fall back on)" % error
            ) from None
        self.display.warning(
            "nodefoundry inventory: %s; using the node list fetched %d s ago from %s" % (error, age, path)
        )
        return nodes

    def _populate(self, nodes):
        for group in STATUS_GROUPS + LIVENESS_GROUPS:
            self.inventory.add_group(group)
        strict = self.get_option("strict")
        taken = set()
        for node in sorted(nodes, key=lambda item: item.get("mac", "")):
            if not isinstance(node, dict) or not isinstance(node.get("mac"), str):
                continue
            variables = node_vars(node)
            name = self._host_name(node, variables, taken)
            taken.add(name)
            self.inventory.add_host(name)
            for key, value in variables.items():
                self.inventory.set_variable(name, key, value)
            if node.get("status") in STATUS_GROUPS:
                self.inventory.add_child(node["status"], name)
            if node.get("liveness") in LIVENESS_GROUPS:
                self.inventory.add_child(node["liveness"], name)
            self._set_composite_vars(self.get_option("compose"), variables, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, name, strict=strict)

    def _host_name(self, node, variables, taken):
        fallback = "node-" + node["mac"]
        for entry in self.get_option("hostnames"):
            if entry == "hostname":
                candidate = node.get("hostname")
            elif entry == "mac":
                candidate = fallback
            elif entry == "ip":
                candidate = node.get("ip")
            else:
                candidate = self._compose(entry, variables)
            if candidate:
                candidate = str(candidate)
                if candidate in taken:
                    self.display.warning(
                        "nodefoundry inventory: host name %s is taken; using %s" % (candidate, fallback)
                    )
                    return fallback
                return candidate
        return fallback
