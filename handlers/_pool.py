"""What thin pools (`tcmu_py.handlers.thin`) and dedup pools (`tcmu_py.handlers.dedup`) share:
the YAML ``hard_limit`` key."""

from __future__ import annotations

from tcmu_py.configspec import Checker, parse_size

__all__ = ["hard_limit"]


def hard_limit(c: Checker, value: object, path: str, capacity: int) -> int | None:
    """A pool's ``hard_limit`` in bytes: ``'95%'`` (1..100 % of `capacity`) or a size up to
    `capacity`; None (reported to `c`) when it is neither."""
    expected = "a percentage of capacity like '95%' or a size not above capacity"
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = int(value.strip()[:-1])
        except ValueError:
            pct = -1
        if 1 <= pct <= 100:
            return capacity * pct // 100
        c.fail(path, value, expected)
        return None
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if 0 < n <= capacity:
        return n
    c.fail(path, value, expected)
    return None
