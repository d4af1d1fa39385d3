"""The outbox between worker threads and the MQTT loop, and the agent's timing: backoff and heartbeat jitter."""

from __future__ import annotations

import random
import select
import threading

from nodefoundry_agent.agent import backoff_delay, heartbeat_delay
from nodefoundry_agent.outbox import Message, Outbox


def message(name: str, final: bool = True) -> Message:
    return Message(f"node/aabbccddeeff/result/{name}", name.encode(), final=final)


def drain(outbox: Outbox) -> list[str]:
    names = []
    while (item := outbox.pop()) is not None:
        names.append(item.payload.decode())
    return names


def test_messages_come_out_in_order_and_a_put_back_one_first():
    outbox = Outbox()
    for name in ("a", "b", "c"):
        outbox.put(message(name))
    first = outbox.pop()
    assert first is not None
    outbox.put_back(first)
    assert drain(outbox) == ["a", "b", "c"]


def test_when_full_the_oldest_intermediate_state_goes_first_then_the_oldest_message():
    outbox = Outbox(limit=3)
    outbox.put(message("final-1"))
    outbox.put(message("running-1", final=False))
    outbox.put(message("final-2"))
    outbox.put(message("final-3"))  # drops running-1
    outbox.put(message("final-4"))  # no intermediate left: drops final-1
    assert drain(outbox) == ["final-2", "final-3", "final-4"]
    assert outbox.dropped == 2


def test_a_put_from_another_thread_wakes_a_select():
    outbox = Outbox()
    threading.Thread(target=outbox.put, args=(message("x"),)).start()
    readable, _, _ = select.select([outbox], [], [], 30)
    assert readable == [outbox]
    outbox.clear_wakeups()
    assert select.select([outbox], [], [], 0)[0] == []


def test_many_wakeups_never_block_the_sender():
    outbox = Outbox(limit=10)
    for _ in range(100_000):  # far more wake-ups than a pipe buffer holds
        outbox.wake()
    outbox.put(message("last"))
    assert len(outbox) == 1


def test_backoff_is_full_jitter_below_a_growing_cap():
    rng = random.Random(7)
    for attempt, ceiling in ((0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (1000, 60.0)):
        delays = [backoff_delay(attempt, cap=60.0, rng=rng) for _ in range(2000)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert min(delays) < ceiling * 0.05 and max(delays) > ceiling * 0.95  # spread over the whole range


def test_heartbeat_jitter_stays_within_ten_percent():
    rng = random.Random(3)
    delays = [heartbeat_delay(30.0, rng) for _ in range(2000)]
    assert all(27.0 <= delay <= 33.0 for delay in delays)
    assert min(delays) < 27.3 and max(delays) > 32.7
