"""What each piece of a dedup write costs per MiB, alone (issue 14: where a C write path would
have to land to meet the write aims).

    .venv/bin/python benchmarks/dedup_pieces.py [--dir /tmp/dedup-pieces] [--reps 20]

    # in the VM lab (the emulated CPU the benchmark's ratios come from):
    .venv/bin/tcmu-py lab --no-serve ".venv/bin/python benchmarks/dedup_pieces.py --dir /tmp/dp"

One thread, one MiB of random data cut in 4 KiB chunks, each piece timed over `--reps` MiB
after one warm-up: the fingerprints (XXH3-128 and SHA-256 per chunk), the byte confirmation of a
duplicate (`bytes ==` per chunk), copying chunks out of a memoryview, a raw disk's 1 MiB
`pwrite` over allocated pages against appending the 256 chunks to a growing file (a container:
fresh pages), a dict of 256 entries (Python's per-chunk bookkeeping at its cheapest), and the
store's SQLite rows for a MiB of unique chunks — 256 chunk rows (UNIQUE random fingerprint,
indexed by container) and 256 map rows, one commit (WAL, synchronous=FULL), as the pool's schema
has them. Prints one line per piece (wall and CPU ms per MiB) and a JSON summary. The files go to a
new directory in `--dir` (on the file system to measure: tmpfs in the lab), removed after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

MIB = 1 << 20
CHUNK = 4096


def _time(name: str, piece: Callable[[], object], reps: int, out: dict[str, float]) -> None:
    piece()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        piece()
    wall = (time.perf_counter() - t0) / reps * 1e3
    cpu = (time.process_time() - c0) / reps * 1e3
    out[name] = round(cpu, 3)
    print(f"{name:40s} {wall:8.2f} ms/MiB wall {cpu:8.2f} ms/MiB CPU", flush=True)


def _sqlite(path: Path) -> Callable[[], None]:
    """One MiB of unique chunks as the pool's schema stores them: chunk rows, map rows, commit."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE chunks(id INTEGER PRIMARY KEY, fp BLOB NOT NULL UNIQUE, "
               "container INTEGER, offset INTEGER, length INTEGER, refcount INTEGER)")
    db.execute("CREATE INDEX chunks_by_container ON chunks(container)")
    db.execute("CREATE TABLE map(disk INTEGER, idx INTEGER, chunk INTEGER, "
               "PRIMARY KEY(disk, idx)) WITHOUT ROWID")
    n = MIB // CHUNK
    fps = [os.urandom(16) for _ in range(n * 200)]
    state = {"next": 1}

    def piece() -> None:
        first = state["next"]
        db.execute("BEGIN")
        db.executemany("INSERT INTO chunks VALUES(?, ?, ?, ?, ?, 1)",
                       [(first + k, fps[(first + k) % len(fps)] + first.to_bytes(8, "little"),
                         first // 16384, k * CHUNK, CHUNK) for k in range(n)])
        db.executemany("INSERT OR REPLACE INTO map VALUES(1, ?, ?)",
                       [(first + k, first + k) for k in range(n)])
        db.execute("COMMIT")
        state["next"] = first + n

    return piece


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dedup-pieces"))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pieces-", dir=args.dir))
    data = os.urandom(MIB)
    view = memoryview(data)
    chunks = [view[i:i + CHUNK] for i in range(0, MIB, CHUNK)]
    copies = [bytes(c) for c in chunks]
    others = [bytes(c) for c in chunks]
    out: dict[str, float] = {}
    fd = os.open(work / "file.dat", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, data, 0)
        end = {"at": MIB}

        def append() -> None:
            os.pwritev(fd, chunks, end["at"])
            end["at"] += MIB

        _time("fingerprint XXH3-128 (256 chunks)",
              lambda: [xxhash.xxh3_128_digest(c) for c in chunks], args.reps, out)
        _time("fingerprint SHA-256 (256 chunks)",
              lambda: [hashlib.sha256(c).digest() for c in chunks], args.reps, out)
        _time("confirm: bytes == (256 chunks)",
              lambda: [a == b for a, b in zip(copies, others, strict=True)], args.reps, out)
        _time("copy chunks out of a memoryview",
              lambda: [bytes(c) for c in chunks], args.reps, out)
        _time("raw: pwrite 1 MiB over allocated pages", lambda: os.pwrite(fd, data, 0),
              args.reps, out)
        _time("container: pwritev 256 chunks, append", append, args.reps, out)
        _time("a dict of 256 entries",
              lambda: {i: (i, c, None) for i, c in enumerate(chunks)}, args.reps, out)
        _time("SQLite: 256 chunk + 256 map rows, commit", _sqlite(work / "index.sqlite"),
              args.reps, out)
    finally:
        os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"ms_cpu_per_mib": out, "loadavg": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
