"""Messages waiting for the MQTT loop: results from worker threads, and everything while the broker is away.

Only the MQTT loop thread touches the paho client; other threads ``put`` here, and the write to a pipe
wakes the loop's ``select``. The queue is bounded, so a long outage cannot grow the agent's memory: when
it is full, the oldest intermediate state (``accepted``/``running``) goes first, then the oldest message.
Heartbeat statuses are never queued; a fresh one is sent on every connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIMIT = 256


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    final: bool = True  # False for a state a later message supersedes


class Outbox:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self._messages: deque[Message] = deque()
        self._lock = threading.Lock()
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._read_end, False)
        os.set_blocking(self._write_end, False)

    def fileno(self) -> int:
        """The end of the wake-up pipe to ``select`` on."""
        return self._read_end

    def put(self, message: Message) -> None:
        with self._lock:
            if len(self._messages) >= self.limit:
                self._drop_one()
            self._messages.append(message)
        self.wake()

    def put_back(self, message: Message) -> None:
        """Return a message the client could not take; it goes out first next time."""
        with self._lock:
            self._messages.appendleft(message)

    def pop(self) -> Message | None:
        with self._lock:
            return self._messages.popleft() if self._messages else None

    def __len__(self) -> int:
        return len(self._messages)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop anyway
            os.write(self._write_end, b"\0")

    def wait(self, timeout: float) -> None:
        """Sleep until woken or ``timeout`` seconds passed."""
        select.select([self], [], [], max(0.0, timeout))
        self.clear_wakeups()

    def clear_wakeups(self) -> None:
        try:
            while os.read(self._read_end, 4096):
                pass
        except BlockingIOError:
            pass

    def _drop_one(self) -> None:
        victim = next((message for message in self._messages if not message.final), self._messages[0])
        self._messages.remove(victim)
        self.dropped += 1
        log.warning("outbox full (%d messages): dropped one for %s", self.limit, victim.topic)
