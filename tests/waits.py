"""Waiting for events in tests: poll a condition until it holds, with a
deadline, never a timing assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05, diagnose: Callable[[], str] | None = None,
               fail: Callable[[], None] | None = None) -> Any:
    """Poll until cond() is truthy and return its value; AssertionError
    naming `what` (and diagnose()'s text) after `timeout` seconds. `fail`
    is called every round: it raises when the wait can never succeed."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if fail is not None:
            fail()
        if time.monotonic() > end:
            extra = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)
