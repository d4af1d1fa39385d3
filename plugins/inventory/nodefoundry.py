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
  - Strings from the server that could be templated (they contain C({) or C(})), in facts for example, are
    marked unsafe, so a node cannot inject Jinja2 templates into a play. Other strings stay plain, so AWX
    imports them as they are.
  - "Host variables: C(ansible_host) (the node's address, when known), C(nodefoundry_mac), C(nodefoundry_status),
    C(nodefoundry_liveness), C(nodefoundry_online), C(nodefoundry_enabled) (false only for a node known to be
    offline; a boolean for AWX's enabled variable), C(nodefoundry_arch),
    C(nodefoundry_hostname), C(nodefoundry_ip), C(nodefoundry_labels), C(nodefoundry_last_heartbeat) and
    C(nodefoundry_facts), a summary of the agent's facts (C(os), C(kernel), C(arch), C(machine), C(board),
    C(cpu_model), C(cpu_count), C(memory_mb), C(agent_version), C(boot_id))."
  - When the server cannot be reached, the last inventory fetched successfully is used (with a warning) if
    O(fallback_to_last_known) is enabled.
version_added: 0.1.0
author:
  - NodeFoundry contributors (!UNKNOWN)
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
import re
import time

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import ApiError, Client

_TEMPLATE_CHARS = re.compile("[{}]")
STATUS_GROUPS = ("discovered", "installing", "installed", "failed")
LIVENESS_GROUPS = ("online", "offline")
# Facts the agent reports (``facts.agent``) that are worth a host variable; the rest stays on the server.
FACT_SUMMARY = ("os", "kernel", "arch", "machine", "board", "agent_version", "boot_id")


def fact_summary(facts):
    """The small summary of the agent's facts kept in ``nodefoundry_facts`` (not the disks and interfaces)."""
    agent = facts.get("agent") if isinstance(facts, dict) else None
    if not isinstance(agent, dict):
        return {}
    summary = {key: agent[key] for key in FACT_SUMMARY if agent.get(key) is not None}
    cpu = agent.get("cpu") if isinstance(agent.get("cpu"), dict) else {}
    if cpu.get("model") is not None:
        summary["cpu_model"] = cpu["model"]
    if isinstance(cpu.get("count"), int):
        summary["cpu_count"] = cpu["count"]
    if isinstance(agent.get("memory_bytes"), int):
        summary["memory_mb"] = agent["memory_bytes"] // (1024 * 1024)
    return summary


def make_unsafe(value):
    """Mark remote strings that could be templated (they contain ``{`` or ``}``) as unsafe, recursively.

    Only those: ``ansible-inventory --list`` writes an unsafe string as ``{"__ansible_unsafe": ...}``, which
    AWX's inventory import then stores as a dict (community.general#8212). A string without braces
    cannot start a template, so leaving it plain loses no protection.
    """
    if isinstance(value, dict):
        return {make_unsafe(key): make_unsafe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [make_unsafe(item) for item in value]
    if isinstance(value, (str, bytes)) and _TEMPLATE_CHARS.search(to_text(value, errors="surrogate_or_strict")):
        return wrap_var(value)
    return value


def node_vars(node):
    """The ``nodefoundry_*`` host variables of one node; remote strings that could be templated are unsafe."""
    summary = fact_summary(node.get("facts"))
    variables = {
        "nodefoundry_mac": node["mac"],
        "nodefoundry_status": node.get("status"),
        "nodefoundry_liveness": node.get("liveness", "unknown"),
        "nodefoundry_online": node.get("liveness") == "online",
        # For AWX's enabled variable: only a node known to be down is disabled (AWX leaves disabled hosts out
        # of jobs); discovered and installing nodes have no agent yet and must stay in the install job.
        "nodefoundry_enabled": node.get("liveness") != "offline",
        # The boot path reports the architecture of a discovered node, the agent that of an installed one.
        "nodefoundry_arch": node.get("arch") or summary.get("arch") or "",
        "nodefoundry_hostname": node.get("hostname") or "",
        "nodefoundry_ip": node.get("ip") or "",
        "nodefoundry_labels": node.get("labels") or {},
        "nodefoundry_last_heartbeat": node.get("last_heartbeat") or "",
        "nodefoundry_facts": summary,
    }
    if node.get("ip"):
        variables["ansible_host"] = node["ip"]
    return {key: make_unsafe(value) for key, value in variables.items()}


def reuse_compiled_templates(templar, limit=256):
    """Compile each ``compose``/``groups``/``keyed_groups``/``hostnames`` expression once, not once per host.

    Ansible's ``_compose`` compiles its expression again for every host: for 10,000 nodes and three
    expressions that is 30,000 Jinja2 compilations, most of the plugin's run time. A compiled template holds
    no per-render state (the variables come with each render), so this plugin's own templar keeps the
    compiled form of the few expressions its options contain (``limit`` bounds the cache all the same).
    """
    environment = templar.environment
    compile_template = environment.from_string
    compiled = {}

    def from_string(source, *args, **kwargs):
        if args or kwargs or not isinstance(source, str):
            return compile_template(source, *args, **kwargs)
        template = compiled.get(source)
        if template is None:
            template = compile_template(source)
            if len(compiled) < limit:
                compiled[source] = template
        return template

    environment.from_string = from_string


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "nodefoundry.provision.nodefoundry"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("nodefoundry.yml", "nodefoundry.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        reuse_compiled_templates(self.templar)
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
        usable = [node for node in nodes if isinstance(node, dict) and isinstance(node.get("mac"), str)]
        for node in sorted(usable, key=lambda item: item["mac"]):
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
