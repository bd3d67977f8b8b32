"""The latency histogram's buckets: pure arithmetic shared by the runner (which fills
`Counters.latency_hist`) and `tcmu-py status` (which reads percentiles from it without importing
the data path)."""

from __future__ import annotations

import math

__all__ = ["LATENCY_BUCKETS", "latency_bucket", "latency_bucket_upper"]

#: Latency histogram: bucket 0 holds commands under 1 µs, bucket i >= 1 those in
#: [2^((i-1)/4), 2^(i/4)) µs — four buckets per doubling, so a percentile read from it is within
#: 19 % of the true value. The last bucket also takes everything longer (2^(127/4) µs ≈ 58 min).
LATENCY_BUCKETS = 128


def latency_bucket(seconds: float) -> int:
    """The `Counters.latency_hist` index of a command that took `seconds`."""
    us = seconds * 1e6
    if us < 1.0:
        return 0
    return min(LATENCY_BUCKETS - 1, int(math.log2(us) * 4) + 1)


def latency_bucket_upper(index: int) -> float:
    """Upper edge of bucket `index`, in seconds."""
    return float(2.0 ** (index / 4) / 1e6)
