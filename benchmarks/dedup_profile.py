"""Cost per command of a dedup disk on the host, no VM (issue 14's performance aims).

    .venv/bin/python benchmarks/dedup_profile.py [--dir /dev/shm/dedup-prof] [--mib 64]
        [--profile write4k|write1m|read4k]

In this process: a pool (4 KiB chunks, no compression) and one disk opened through the handler
API as the daemon opens them (write cache on, so commits are grouped as under fio; a
SYNCHRONIZE CACHE, ``flush``, every 64 MiB and at the end, counted in the figures), and a raw
file of the same size written with ``os.pwrite``/read with ``os.preadv`` for comparison. Runs,
each on a fresh pool:

- ``write4k``: 4 KiB writes of distinct random data at random chunk-aligned offsets;
- ``write1m-dupN``: 1 MiB sequential writes, N % of the 4 KiB chunks repeating earlier ones
  (N = 0, 50, 90);
- ``read4k``: 4 KiB random reads of the disk written whole with unique data.

Prints µs per command for dedup and raw (wall and CPU) and their ratios as JSON, with the
host's 1-minute load average (on a shared host compare CPU figures: wall time is mostly
waiting for a core). A new pool fingerprints with XXH3-128 + byte compare; pass
``--fingerprint sha256`` for the SHA-256 kind. ``--profile NAME`` runs that
workload under cProfile instead and prints the top functions by own time. The data is made
before the clock starts; one thread, so this is the per-command CPU cost, not the device's
throughput under queue depth (the VM benchmark, benchmarks/dedup_vs_raw.py, measures that).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHUNK = 4096
MIB = 1 << 20
FLUSH_EVERY = 64 * MIB


def _buffers(rng: random.Random, n: int, size: int, dup_percent: int) -> list[bytes]:
    """`n` buffers of `size` bytes whose 4 KiB chunks repeat an earlier chunk `dup_percent` % of
    the time (else fresh random bytes)."""
    seen: list[bytes] = []
    out = []
    for _ in range(n):
        parts = []
        for _ in range(size // CHUNK):
            if seen and rng.randrange(100) < dup_percent:
                parts.append(rng.choice(seen))
            else:
                chunk = rng.randbytes(CHUNK)
                seen.append(chunk)
                parts.append(chunk)
        out.append(b"".join(parts))
    return out


def run(base: Path, name: str, mib: int, profile: bool,
        fingerprint: str | None = None, journal_mib: int = 0) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from handlers.dedup.journal import Journal
    from handlers.dedup.store import DedupPool, create_pool

    Journal.background = False  # a journal's writes alone: its drain comes after the timing

    size = mib * MIB
    rng = random.Random(14)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    create_pool(str(base / "pool"), "prof", 4 * size, None, journal=journal_mib * MIB,
                **({} if fingerprint is None else {"fingerprint": fingerprint}))
    raw_fd = os.open(base / "raw.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(raw_fd, size)
    pool = DedupPool.open(str(base / "pool"))
    disk = pool.open_disk("d0", size, write_cache=True)
    try:
        if name == "write4k":
            bs = CHUNK
            n = size // bs
            offsets = rng.sample(range(n), n)
            bufs = _buffers(rng, n, bs, 0)
            ops = [(o * bs, b) for o, b in zip(offsets, bufs, strict=True)]
        elif name.startswith("write1m"):
            bs = MIB
            n = size // bs
            bufs = _buffers(rng, n, bs, int(name.rsplit("dup", 1)[1]))
            ops = [(i * bs, b) for i, b in enumerate(bufs)]
        else:
            bs = CHUNK
            n = min(size // bs, 20000)
            fill = _buffers(rng, size // MIB, MIB, 0)
            for i, b in enumerate(fill):
                disk.write(i * MIB, [memoryview(b)])
                os.pwrite(raw_fd, b, i * MIB)
            disk.flush()
            del fill
            ops = [(rng.randrange(size // bs) * bs, b"") for _ in range(n)]

        def dedup_pass() -> None:
            if name == "read4k":
                buf = memoryview(bytearray(bs))
                for off, _ in ops:
                    disk.read(off, [buf])
                return
            since = 0
            for off, b in ops:
                disk.write(off, [memoryview(b)])
                since += len(b)
                if since >= FLUSH_EVERY:
                    disk.flush()
                    since = 0
            disk.flush()

        def raw_pass() -> None:
            if name == "read4k":
                buf = bytearray(bs)
                for off, _ in ops:
                    os.preadv(raw_fd, [buf], off)
                return
            for off, b in ops:
                os.pwrite(raw_fd, b, off)
            os.fdatasync(raw_fd)

        if profile:
            prof = cProfile.Profile()
            prof.runcall(dedup_pass)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return {}
        out: dict[str, Any] = {"workload": name, "commands": len(ops)}
        for label, fn in (("dedup", dedup_pass), ("raw", raw_pass)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            out[f"{label}_us"] = round((t1 - t0) / len(ops) * 1e6, 1)
            out[f"{label}_cpu_us"] = round((c1 - c0) / len(ops) * 1e6, 1)
        out["ratio"] = round(out["raw_us"] / out["dedup_us"], 3)
        out["cpu_ratio"] = round(out["raw_cpu_us"] / out["dedup_cpu_us"], 3)
        out["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
        return out
    finally:
        disk.close()
        pool.close()
        os.close(raw_fd)
        shutil.rmtree(base)



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/dedup-prof"))
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--only", default=None, help="comma-separated workloads")
    ap.add_argument("--fingerprint", default=None, help="the pool's: xxh3-128 or sha256")
    ap.add_argument("--journal-mib", type=int, default=0,
                    help="the pool's write journal (0: none); writes are timed without its "
                    "drain (a 1 MiB write of more than a quarter of it goes to the index)")
    args = ap.parse_args()
    names = ["write4k", "write1m-dup0", "write1m-dup50", "write1m-dup90", "read4k"]
    if args.profile:
        run(args.dir, args.profile, args.mib, True, args.fingerprint, args.journal_mib)
        return 0
    if args.only:
        names = args.only.split(",")
    for name in names:
        print(json.dumps(run(args.dir, name, args.mib, False, args.fingerprint,
                             args.journal_mib)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
