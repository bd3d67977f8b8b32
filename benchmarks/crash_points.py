"""Crash points of the VTL's on-disk formats, longer than CI runs them.

    .venv/bin/python benchmarks/crash_points.py [--seed 1] [--operations 150] [--seconds 120]
                                                [--runs N] [--json out.json]

Runs `handlers/vtl/crashcheck.py` workloads (library create, cartridges created and placed,
moves, import/export lock, loads, appends of blocks and filemarks, syncs, overwrites, cartridge
memory, write protect, closes) with seeds `seed`, `seed + 1`, ... until `--runs` workloads are
done or `--seconds` have passed (the run in progress is finished), cutting after every write and
checking every state a crash may leave (tcmu_py/testing/crashfs.py). Prints one line per seed and
the totals; exit status 1 if any state failed its invariants (the first failures are printed).
Works in a temporary directory on /dev/shm when there is one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tcmu_py.handlers.vtl.crashcheck import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    p.add_argument("--operations", type=int, default=150, help="operations per workload")
    p.add_argument("--seconds", type=float, default=120.0, help="time budget (default 120)")
    p.add_argument("--runs", type=int, default=0, help="stop after this many workloads")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # torn headers found while checking are expected
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    totals = {"runs": 0, "operations": 0, "crash_points": 0, "states_checked": 0, "failures": 0}
    seeds: list[int] = []
    failures: list[str] = []
    start = time.monotonic()
    seed = args.seed
    while (not args.runs or totals["runs"] < args.runs) and (
        time.monotonic() - start < args.seconds
    ):
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=base) as d:
            r = run(Path(d), seed, args.operations)
        print(f"seed {seed}: {r.operations} operations, {r.crash_points} crash points, "
              f"{r.states_checked} states checked, {r.failure_count} failures "
              f"({time.monotonic() - t0:.1f} s)", flush=True)
        seeds.append(seed)
        totals["runs"] += 1
        totals["operations"] += r.operations
        totals["crash_points"] += r.crash_points
        totals["states_checked"] += r.states_checked
        totals["failures"] += r.failure_count
        failures += r.failures
        seed += 1
    elapsed = time.monotonic() - start
    print(f"total: {totals['runs']} workloads (seeds {seeds[0]}..{seeds[-1]}), "
          f"{totals['operations']} operations, {totals['crash_points']} crash points, "
          f"{totals['states_checked']} states checked, {totals['failures']} failures "
          f"in {elapsed:.0f} s")
    for f in failures[:20]:
        print("  " + f)
    if args.json:
        args.json.write_text(json.dumps(
            {**totals, "seeds": [seeds[0], seeds[-1]], "operations_per_run": args.operations,
             "seconds": round(elapsed, 1), "first_failures": failures[:20]}, indent=1) + "\n")
    return 1 if totals["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
