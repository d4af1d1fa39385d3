"""The command dispatcher: publishes queued commands to online nodes and enforces deadlines.

HTTP workers hold no broker connection; they only insert ``queued`` rows. This
runs in the services process and polls for work with an indexed query. A command
goes out (QoS 1) only while its node is online; one that went out before the
node last came online and was never accepted is sent again (the agent ignores a
cmd_id it already has). Deadlines are the server's: see ``commands.expire_overdue``.
"""

from __future__ import annotations

import json
import logging

from nodefoundry_agent import protocol

from .. import commands
from ..store import Store, now, parse_stamp
from .client import Connection

log = logging.getLogger("nodefoundry.mqtt")


class Dispatcher:
    def __init__(self, store: Store, connection: Connection) -> None:
        self.store = store
        self.connection = connection
        self.published = 0

    def run_once(self) -> int:
        """Publish what is due; return how many went out."""
        if not self.connection.connected:
            return 0
        sent, when = [], now()  # stamped before publishing: compared with when the node last came online
        for row in commands.due_for_dispatch(self.store):
            payload = protocol.command_payload(
                row["id"], row["command"], json.loads(row["args"]), parse_stamp(row["deadline"])
            )
            if not self.connection.publish(protocol.topic(row["mac"], protocol.COMMAND), payload):
                break  # the connection just dropped: the rest waits for the next pass
            sent.append(row["id"])
        if sent:
            commands.mark_sent(self.store, sent, when)
            self.published += len(sent)
            log.info("published %d command(s)", len(sent))
        return len(sent)

    def expire(self) -> int:
        expired = commands.expire_overdue(self.store)
        if expired:
            log.info("%d command(s) passed their deadline", expired)
        return expired
