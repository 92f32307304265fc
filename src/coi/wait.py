"""Waiting on events: one poll helper with a deadline and a check that can fail."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from coi.errors import TimedOutError

T = TypeVar("T")


def wait_for(check: Callable[[], T], *, timeout: float, what: str, hint: str | None = None,
             first_interval: float = 0.01, max_interval: float = 0.25) -> T:
    """Call ``check`` until it returns a true value; raise TimedOutError at the deadline.

    The interval starts small (readiness is usually a matter of milliseconds)
    and backs off, so a fast event is seen fast without a busy loop.
    """
    deadline = time.monotonic() + timeout
    interval = first_interval
    while True:
        result = check()
        if result:
            return result
        now = time.monotonic()
        if now >= deadline:
            raise TimedOutError(f"timed out after {timeout:g}s waiting for {what}", hint)
        time.sleep(min(interval, deadline - now))
        interval = min(interval * 2, max_interval)
