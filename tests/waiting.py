"""Waiting on a condition, never on a fixed sleep: poll until it holds, fail at a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold within the deadline (a test failure unless caught)."""


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.01
) -> T:
    """Poll `predicate` every `interval` seconds until it returns a truthy value, and return
    that value; raise WaitTimeout naming `what` once `timeout` seconds have passed. It is
    always asked once more at the deadline, so a timeout of 0 is one look."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.3g}s waiting for {what}")
        time.sleep(interval)
