#!/usr/bin/python
# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node_install
short_description: Install (or reinstall) many NodeFoundry nodes with one API call
description:
  - Asks the server to install all given nodes in one transaction (C(POST /api/v1/nodes/bulk)), so a play over
    a thousand hosts makes one request, not a thousand. Meant to run once per play (C(run_once), on the controller).
  - O(action=install) starts only C(discovered) nodes; nodes in any other status are reported and left alone.
    O(action=reinstall) starts C(installed) and C(failed) nodes again (a disk wipe).
  - The task fails when a MAC is not registered on the server (the others are still started), and with
    O(wait=true) when an install failed or did not end in time.
  - Check mode asks the server for a dry run, which gives the same per-node answers and changes nothing.
version_added: 0.1.0
extends_documentation_fragment:
  - nodefoundry.provision.connection
  - nodefoundry.provision.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  macs:
    description: MAC addresses of the nodes.
    type: list
    elements: str
    required: true
  action:
    description: V(install) for discovered nodes, V(reinstall) for installed or failed ones.
    type: str
    choices: [install, reinstall]
    default: install
  wait:
    description: Wait until every node that was started has ended its install (C(installed) or C(failed)).
    type: bool
    default: false
  wait_timeout:
    description: Seconds to wait at most; nodes still installing then are reported, and the module fails.
    type: int
    default: 3600
  wait_sleep:
    description: Seconds between two looks at the nodes while waiting (one request per look).
    type: int
    default: 15
"""

EXAMPLES = r"""
- name: Install every discovered host of the play with one API call
  nodefoundry.provision.node_install:
    macs: "{{ ansible_play_hosts | map('extract', hostvars, 'nodefoundry_mac') | list }}"
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
results:
  description: One entry per MAC, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    mac: {description: The node's MAC (12 hex digits)., type: str, returned: always}
    ok: {description: Whether the node is (now) installing or was already., type: bool, returned: always}
    changed: {description: Whether this call started its install., type: bool, returned: always}
    status: {description: Status after the call (or at the end of the wait)., type: str, returned: when known}
    error: {description: Why the node was not started., type: str, returned: when not ok}
summary:
  description: How many nodes were started, left alone, failed or are still installing.
  returned: always
  type: dict
  sample: {started: 3, unchanged: 1, errors: 0}
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    client_from_params,
    normalize_mac,
)


def wait_for_all(client, macs, timeout, sleep):
    """Statuses of ``macs`` once none is installing, or at the deadline; one list request per look."""
    deadline = time.monotonic() + timeout
    while True:
        current = {node["mac"]: node["status"] for node in client.nodes() if node["mac"] in macs}
        if not any(status == "installing" for status in current.values()) or time.monotonic() + sleep > deadline:
            return current
        time.sleep(sleep)


def summarize(results):
    return {
        "started": sum(1 for item in results if item.get("changed")),
        "unchanged": sum(1 for item in results if item.get("ok") and not item.get("changed")),
        "errors": sum(1 for item in results if not item.get("ok")),
    }


def problems(results, started, final, timeout):
    """One line naming every node that makes the task fail: unknown, still installing, or failed."""
    unknown = [item["mac"] for item in results if not item.get("ok") and not item.get("status")]
    still = sorted(mac for mac in started if final.get(mac) == "installing")
    failed = sorted(mac for mac in started if final.get(mac) == "failed")
    parts = []
    if unknown:
        parts.append("unknown to the server (not registered): %s" % ", ".join(unknown))
    if still:
        parts.append("install not ended within %d s: %s" % (timeout, ", ".join(still)))
    if failed:
        parts.append("install failed: %s" % ", ".join(failed))
    return "; ".join(parts)


def run(module, client, macs):
    """The bulk call, then (optionally) the bounded wait; per-node results and the failure line, if any."""
    params = module.params
    results = client.bulk(params["action"], macs, dry_run=module.check_mode)["results"] if macs else []
    started = {item["mac"] for item in results if item.get("changed")}
    final = {}
    if params["wait"] and started and not module.check_mode:
        final = wait_for_all(client, started, params["wait_timeout"], params["wait_sleep"])
        for item in results:
            item["status"] = final.get(item["mac"], item.get("status"))
    return results, problems(results, started, final, params["wait_timeout"])


def main():
    argument_spec = dict(
        CONNECTION_ARGS,
        macs={"type": "list", "elements": "str", "required": True},
        action={"type": "str", "default": "install", "choices": ["install", "reinstall"]},
        wait={"type": "bool", "default": False},
        wait_timeout={"type": "int", "default": 3600},
        wait_sleep={"type": "int", "default": 15},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        macs = [normalize_mac(mac) for mac in module.params["macs"]]
        results, failure = run(module, client_from_params(module.params), macs)
    except ApiError as exc:
        module.fail_json(msg=str(exc))
    outcome = {"changed": any(item.get("changed") for item in results), "results": results}
    if failure:
        module.fail_json(msg=failure, summary=summarize(results), **outcome)
    module.exit_json(summary=summarize(results), **outcome)


if __name__ == "__main__":
    main()
