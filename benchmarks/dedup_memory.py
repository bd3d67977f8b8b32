"""Resident memory of a dedup pool as its unique chunks grow (issue 14: "the daemon's resident
memory per million unique chunks; the index must not have to fit in RAM").

    .venv/bin/python benchmarks/dedup_memory.py [--dir DIR] [--points 0,100000,250000]

Host side, no VM: in this process, a pool (4 KiB chunks, no compression) and one disk opened
through the handler API as the daemon opens them (`DedupPool.open`, `open_disk` with a write
cache, so commits are grouped as under fio), then 1 MiB writes of distinct random data
(``random.Random(SEED)``, every 4 KiB chunk unique) with a SYNCHRONIZE CACHE (``flush``) every
64 MiB. At each point (unique chunks stored) the process's VmRSS and the index file's size are
recorded, and the growth per million chunks between consecutive points (``steps``): RSS
grows until SQLite's page cache (`CACHE_KIB` per pool) is full and then stays flat, while
the index grows on disk. The data
buffers are freed before each reading, so RSS is the pool's (SQLite's page cache, Python
objects) plus the interpreter's. Prints a JSON report; ``--out`` also writes it to a file.

Disk use: chunk bytes (4 KiB each: 1 GiB for 250k) plus the index, removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SEED = 14
CHUNK = 4096
MIB = 1 << 20
FLUSH_EVERY = 64 * MIB


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(workdir: Path, points: list[int]) -> dict[str, Any]:
    from tcmu_py.handlers.dedup import DedupPool, create_pool
    from tcmu_py.handlers.dedup.store import CACHE_KIB

    pool_dir = workdir / "pool"
    top = max(points)
    size = -(-top * CHUNK // MIB) * MIB or MIB
    create_pool(str(pool_dir), "mem", size + 64 * MIB, None)
    rng = random.Random(SEED)
    rows: list[dict[str, Any]] = []
    with DedupPool.open(str(pool_dir)) as pool:
        disk = pool.open_disk("d0", size, write_cache=True)
        written = 0  # chunks
        data = b""
        since_flush = 0
        t0 = time.monotonic()
        for point in sorted(points):
            while written < point:
                n = min(MIB // CHUNK, point - written)
                data = rng.randbytes(n * CHUNK)
                disk.write(written * CHUNK, [memoryview(data)])
                written += n
                since_flush += n * CHUNK
                if since_flush >= FLUSH_EVERY:
                    disk.flush()
                    since_flush = 0
            disk.flush()
            since_flush = 0
            del data
            gc.collect()
            st = pool.status()
            assert st.chunks == point, (st.chunks, point)
            rows.append({
                "unique_chunks": point,
                "rss_bytes": rss_bytes(),
                "index_bytes": sum(f.stat().st_size for f in pool_dir.glob("index.sqlite*")),
                "container_bytes": st.used,
                "seconds": round(time.monotonic() - t0, 1),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        disk.close()
    steps = [{"from": a["unique_chunks"], "to": b["unique_chunks"],
              "rss_bytes_per_million_chunks": round((b["rss_bytes"] - a["rss_bytes"]) * 1e6
                                                    / (b["unique_chunks"] - a["unique_chunks"])),
              "index_bytes_per_million_chunks": round(
                  (b["index_bytes"] - a["index_bytes"]) * 1e6
                  / (b["unique_chunks"] - a["unique_chunks"]))}
             for a, b in zip(rows, rows[1:], strict=False)]
    return {"seed": SEED, "chunk_bytes": CHUNK, "sqlite_cache_kib": CACHE_KIB, "points": rows,
            "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/dedup-mem"),
                    help="scratch directory (removed at the end; needs ~1.2 GiB free)")
    ap.add_argument("--points", default="0,100000,250000",
                    help="unique chunk counts at which to read RSS (comma-separated)")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args()
    points = sorted({int(p) for p in args.points.split(",")})
    if args.dir.exists():
        shutil.rmtree(args.dir)
    args.dir.mkdir(parents=True)
    try:
        report = measure(args.dir, points)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    report["python"] = sys.version.split()[0]
    report["cpus"] = os.cpu_count()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
