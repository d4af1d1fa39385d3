#!/usr/bin/python
# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: node_credentials
short_description: Issue a node's MQTT credentials and its agent settings
description:
  - Asks the NodeFoundry server for the settings of the node agent, the lines of
    C(/etc/default/nodefoundry-agent) that the installer's preseed writes, for a node whose agent is set up
    without the installer (the role C(nodefoundry.provision.agent) does).
  - Where the server maintains the broker's accounts (its embedded broker, or an external one with
    C(NF_MQTT_PASSWORD_FILE)), every call mints a new random broker password; the previous one stops
    working within seconds. So the module reports a change on every such call; call it only when the node
    needs new credentials. Elsewhere the settings come without credentials (RV(credentials_delivered=false))
    and nothing changes.
  - Needs an admin (read-write) token. A node that is installing is refused (the installer delivers its
    credentials).
  - In check mode nothing is asked of the server and the module reports a change.
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
  mac:
    description: The node, in any usual MAC spelling (C(aa:bb:cc:dd:ee:ff), C(aa-bb-..), C(aabb.ccdd.eeff)).
    type: str
    required: true
notes:
  - The result carries a secret. Set C(no_log) on the task, as the role does.
"""

EXAMPLES = r"""
- name: New broker credentials for a node (runs on the controller)
  nodefoundry.provision.node_credentials:
    mac: "{{ nodefoundry_mac }}"
  delegate_to: localhost
  no_log: true
  register: issued

- name: The agent's env file
  ansible.builtin.copy:
    dest: /etc/default/nodefoundry-agent
    content: "{% for key, value in issued.agent_env.items() %}{{ key }}={{ value }}\n{% endfor %}"
    mode: "0600"
  no_log: true
"""

RETURN = r"""
mac:
  description: The node's normalised MAC.
  returned: always
  type: str
  sample: "525400123456"
credentials_delivered:
  description: >-
    Whether new credentials were minted. False where the server does not maintain the broker's accounts;
    the agent then connects without any. In check mode, true (what a real run would do is not known).
  returned: always
  type: bool
agent_env:
  description:
    - The agent's settings (C(NF_MAC), C(NF_MQTT_BROKER), C(NF_LOG_LEVEL), C(NF_HEARTBEAT_INTERVAL), and with
      credentials C(NF_MQTT_USERNAME) and C(NF_MQTT_PASSWORD)), one C(KEY=value) line each in the env file.
    - C(NF_MQTT_PASSWORD) is a secret, so set C(no_log) on the task. The module cannot mask it itself, because
      Ansible replaces every registered no-log value in a module's result, which would leave the caller a
      useless placeholder instead of the password.
    - Empty in check mode.
  returned: always
  type: dict
  sample:
    NF_MAC: "525400123456"
    NF_MQTT_BROKER: "10.0.0.1:1883"
    NF_LOG_LEVEL: info
    NF_HEARTBEAT_INTERVAL: "30"
    NF_MQTT_USERNAME: "525400123456"
    NF_MQTT_PASSWORD: "<secret>"
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nodefoundry.provision.plugins.module_utils.api import (
    CONNECTION_ARGS,
    ApiError,
    client_from_params,
    normalize_mac,
)


def main():
    argument_spec = dict(CONNECTION_ARGS, mac={"type": "str", "required": True})
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    try:
        mac = normalize_mac(module.params["mac"])
        client = client_from_params(module.params)
        if module.check_mode:
            module.exit_json(changed=True, mac=mac, credentials_delivered=True, agent_env={})
        issued = client.issue_credentials(mac)
    except ApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(
        changed=bool(issued["credentials_delivered"]),
        mac=issued["mac"],
        credentials_delivered=issued["credentials_delivered"],
        agent_env=issued["agent_env"],
    )


if __name__ == "__main__":
    main()
