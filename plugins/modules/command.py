#!/usr/bin/python
# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: command
short_description: Send a command to NodeFoundry node agents and collect the results
description:
  - Queues one command for one or many nodes in a single API call. The server delivers it over MQTT to each
    node's agent when the node is online, and records the agent's result (state, exit code, output tails).
  - Commands are an allow-list of the agent (C(reboot), C(shutdown), C(service), C(facts), C(ping), C(exec)
    of executables in the agent's allow-list directory); the server refuses others before sending anything.
  - In check mode nothing is sent; the module reports that the command would run.
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
  command:
    description: The agent command.
    type: str
    required: true
    choices: [reboot, shutdown, service, facts, ping, exec]
  args:
    description:
      - "Arguments of the command, for example C({unit: nginx.service, action: restart}) for V(service) or
        C({name: collect-logs, argv: [--since, 1h], timeout: 120}) for V(exec)."
    type: dict
    default: {}
  command_timeout:
    description:
      - Seconds the server gives the command to finish, from now (its deadline). Default from the server.
      - Not O(timeout), which bounds each HTTP request to the server.
    type: int
  wait:
    description: Wait for every command to reach a final state (or its deadline).
    type: bool
    default: true
  wait_timeout:
    description: Seconds to wait at most.
    type: int
    default: 600
  wait_sleep:
    description: Seconds between two looks at the commands.
    type: int
    default: 3
  fail_on_error:
    description: Fail the task when a command did not succeed (or did not end within O(wait_timeout)).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Restart chrony on every online node of the play, with one API call
  nodefoundry.provision.command:
    macs: "{{ ansible_play_hosts | map('extract', hostvars, 'nodefoundry_mac') | list }}"
    command: service
    args: {unit: chrony.service, action: restart}
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
results:
  description: One entry per MAC.
  returned: always
  type: list
  elements: dict
  contains:
    mac: {description: The node's MAC (12 hex digits)., type: str, returned: always}
    id: {description: The command's id on the server., type: str, returned: when queued}
    state:
      description:
        - C(queued), C(sent), C(accepted), C(running) while under way;
        - C(succeeded), C(failed), C(timed_out), C(rejected) or C(expired) at the end.
      type: str
      returned: when queued
    exit_code: {description: Exit code (when the command ran a process)., type: int, returned: when known}
    stdout: {description: Tail of the standard output., type: str, returned: when known}
    stderr: {description: Tail of the standard error., type: str, returned: when known}
    error: {description: Why the command was not queued for this node., type: str, returned: when not queued}
summary:
  description: Counts of the final states (and of nodes whose command was not queued).
  returned: always
  type: dict
  sample: {succeeded: 4, failed: 1, not_queued: 0}
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    client_from_params,
    normalize_mac,
)

FINAL_STATES = ("succeeded", "failed", "timed_out", "rejected", "expired")
RESULT_FIELDS = ("id", "state", "exit_code", "stdout", "stderr", "detail", "finished_at")


def wait_for_results(client, results, timeout, sleep):
    """Refresh every queued command until all are final or the wait is over; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for item in results:
            if item.get("id") and item.get("state") not in FINAL_STATES:
                found = client.command(item["id"])
                item.update({key: found[key] for key in RESULT_FIELDS if found.get(key) is not None})
        pending = [item for item in results if item.get("id") and item.get("state") not in FINAL_STATES]
        if not pending or time.monotonic() + sleep > deadline:
            return
        time.sleep(sleep)


def summarize(results):
    summary = {"not_queued": sum(1 for item in results if not item.get("id"))}
    for item in results:
        if item.get("id"):
            summary[item.get("state", "queued")] = summary.get(item.get("state", "queued"), 0) + 1
    return summary


def main():
    argument_spec = dict(
        CONNECTION_ARGS,
        macs={"type": "list", "elements": "str", "required": True},
        command={
            "type": "str",
            "required": True,
            "choices": ["reboot", "shutdown", "service", "facts", "ping", "exec"],
        },
        args={"type": "dict", "default": {}},
        command_timeout={"type": "int"},
        wait={"type": "bool", "default": True},
        wait_timeout={"type": "int", "default": 600},
        wait_sleep={"type": "int", "default": 3},
        fail_on_error={"type": "bool", "default": True},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    try:
        macs = [normalize_mac(mac) for mac in params["macs"]]
        client = client_from_params(params)
        if module.check_mode or not macs:
            module.exit_json(changed=bool(macs), results=[{"mac": mac} for mac in macs], summary={})
        sent = client.send_commands(macs, params["command"], params["args"], params["command_timeout"])["results"]
        results = [
            {"mac": item["mac"], "id": item["id"], "state": "queued"} if item.get("ok") else item for item in sent
        ]
        if params["wait"]:
            wait_for_results(client, results, params["wait_timeout"], params["wait_sleep"])
    except ApiError as exc:
        module.fail_json(msg=str(exc))
    summary = summarize(results)
    unsuccessful = [item["mac"] for item in results if item.get("state") != "succeeded"]
    if params["fail_on_error"] and params["wait"] and unsuccessful:
        module.fail_json(
            msg="%s did not succeed on %d node(s): %s"
            % (params["command"], len(unsuccessful), ", ".join(unsuccessful)),
            changed=True,
            results=results,
            summary=summary,
        )
    module.exit_json(changed=any(item.get("id") for item in results), results=results, summary=summary)


if __name__ == "__main__":
    main()
