"""Bounded polling for the tests and the role-test lab: wait for a condition, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.2,
    error: type[Exception] = AssertionError,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll until ``predicate`` returns something truthy and return it.

    On timeout ``error`` names ``what``, followed by ``details()`` (logs, state) when given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.0f} s waiting for {what}"
            raise error(f"{message}\n{details()}" if details else message)
        time.sleep(interval)
