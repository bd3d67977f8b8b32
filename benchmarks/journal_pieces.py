"""What a dedup journal record costs the native loop, piece by piece, per MiB (issue 14).

    .venv/bin/python benchmarks/journal_pieces.py [--dir /dev/shm] [--reps 100]
    .venv/bin/tcmu-py lab --no-serve ".venv/bin/python benchmarks/journal_pieces.py --dir /tmp"

Times, for 1 MiB of data: ``pwrite`` into a file's allocated pages and ``memcpy`` into the same
file mapped (how the loop writes a record when the journal is not / is on tmpfs), and the
record's XXH3-64 checksum in both builds the binding carries (SIMD and scalar;
`tcmu_py.ring.journal_checksum`), whose faster one the loop picks for the CPU. Prints one line
per piece: the fastest of three rounds of `--reps` repetitions, in ms per MiB.
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time
from collections.abc import Callable

MIB = 1 << 20


def best_ms(fn: Callable[[int], object], reps: int) -> float:
    """Milliseconds per call of `fn(k)`: the fastest of three rounds of `reps` calls."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for k in range(reps):
            fn(k)
        best = min(best, (time.perf_counter() - t0) * 1e3 / reps)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the 64 MiB test file goes")
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()

    from tcmu_py.ring import journal_checksum

    data = os.urandom(MIB)
    head = os.urandom(48)
    slots = 64
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="journal-pieces-")
    try:
        for k in range(slots):  # allocated whole, as journal.py makes its file
            os.pwrite(fd, data, k * MIB)
        ms = best_ms(lambda k: os.pwrite(fd, data, (k % slots) * MIB), args.reps)
        print(f"pwrite into allocated pages: {ms:.3f} ms/MiB")
        with mmap.mmap(fd, slots * MIB) as m:
            def copy(k: int) -> None:
                at = (k % slots) * MIB
                m[at : at + MIB] = data

            print(f"memcpy into the file mapped: {best_ms(copy, args.reps):.3f} ms/MiB")
        for build, name in ((0, "SIMD"), (1, "scalar")):
            def checksum(k: int, build: int = build) -> int:
                return journal_checksum(head, data, build)

            print(f"XXH3-64, {name} build: {best_ms(checksum, args.reps):.3f} ms/MiB")
    finally:
        os.close(fd)
        os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
