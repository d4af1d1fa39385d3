"""Run one program with a timeout and keep only the tails of its output.

The argv goes to the kernel as a list (never through a shell). The program gets its own process group,
so a timeout kills it together with anything it started, and only the last ``OUTPUT_TAIL_BYTES`` of
stdout/stderr are kept, so a chatty program cannot grow the agent's memory.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nodefoundry_agent.protocol import OUTPUT_TAIL_BYTES

# Children get a plain environment: the agent's own holds the broker password.
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
TERM_GRACE_SECONDS = 3.0
_POLL_SECONDS = 1.0  # how often a finished program whose pipes a grandchild still holds is noticed


@dataclass(frozen=True)
class Completed:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool


class _Tail:
    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        del self.data[:-OUTPUT_TAIL_BYTES]

    def text(self) -> str:
        return self.data.decode(errors="replace")


def run(argv: Sequence[str], timeout: float) -> Completed:
    """Run ``argv``; raises OSError when it cannot be started at all."""
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=CHILD_ENV,
        start_new_session=True,
    )
    tails = {process.stdout: _Tail(), process.stderr: _Tail()}
    deadline = time.monotonic() + timeout
    timed_out = not (_collect(process, tails, deadline) and _ended(process, deadline))
    if timed_out:
        _kill_group(process)
    exit_code = process.wait()
    for pipe in tails:
        pipe.close()
    stdout, stderr = (tail.text() for tail in tails.values())
    return Completed(exit_code, stdout, stderr, timed_out)


def _collect(process: subprocess.Popen[bytes], tails: dict, deadline: float) -> bool:
    """Read both pipes until they close or the program ended; False when the deadline came first."""
    with selectors.DefaultSelector() as selector:
        for pipe in tails:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = selector.select(min(remaining, _POLL_SECONDS))
            for key, _ in ready:
                chunk = os.read(key.fd, 65536)
                if chunk:
                    tails[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
            if not ready and process.poll() is not None:
                return True  # ended, but a background child keeps the pipes open: stop waiting for it
    return True


def _ended(process: subprocess.Popen[bytes], deadline: float) -> bool:
    """A program may close its pipes and keep running: wait for its exit, up to the deadline."""
    try:
        process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group, then SIGKILL to whatever is left of it after a grace period."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(TERM_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
