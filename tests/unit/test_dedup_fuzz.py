"""The dedup handler's byte-model fuzzer (`benchmarks/dedup_fuzz.py`, which found D43), with
fixed seeds and few batches (about 10 s), every config, `serial` only: one command at a time and
the collector stepped by hand, so every READ must return exactly what the commands before it
left and nothing depends on timing. Before D43's fix, seeds 1 and 3 read zeros for data here
(config b, batches 17 and 7). `benchmarks/dedup_fuzz.py` runs more seeds and batches, and
concurrent batches.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from dedup_fuzz import CONFIGS, run  # noqa: E402

SEEDS = [1, 3]
BATCHES = 80


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dedup_fuzz_serial(config: str) -> None:
    for seed in SEEDS:
        counts: Counter[str] = Counter()
        run(seed, config, BATCHES, serial=True, max_seconds=60.0, counts=counts)
        assert counts["batches"] == BATCHES, (seed, counts)  # not cut short by the time bound
