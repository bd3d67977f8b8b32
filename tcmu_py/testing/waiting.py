"""Waiting on a condition with a deadline, for tests that watch other threads.

A test never sleeps a fixed time to let something happen: it polls the condition until it
holds or the deadline passes, and fails with what it was waiting for.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.005) -> bool:
    """Poll `cond` every `interval` seconds until it is true (returns True) or `timeout`
    seconds have passed (returns whether it holds at that last look). Bounded: at most
    ``timeout / interval + 2`` calls of `cond`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())
