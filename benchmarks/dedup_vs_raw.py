"""Dedup vs raw in the lab VM (issue 14): fio 4 KiB random write QD32 and 1 MiB sequential write
QD8 with 0 %, 50 % and 90 % duplicate data, and 4 KiB random read QD32, on a dedup disk and a raw
disk served by one `tcmu-py serve`, in the same VM boot.

    .venv/bin/python benchmarks/dedup_vs_raw.py --out results/dedup_vs_raw [--seconds 10] [--reps 2]
        [--only randread-4k-qd32,...] [--size-mib 256] [--capacity-mib N] [--journal-mib N]

Host side: boots the lab kernel (`tcmu_py.lab.run_in_vm`) and runs this file again inside with
``--guest``; then prints per-workload medians and the dedup/raw ratio, and writes
``OUT/summary.json``.

Guest side (``--guest``): a dedup pool on the scratch tmpfs (4 KiB chunks, no compression,
capacity four times the disk, or ``--capacity-mib``; with ``--journal-mib N`` a write journal
of N MiB, post-process deduplication) and a fully written raw image of the same size; both
devices with ``emulate_write_cache=1`` (WCE=1 for both: the dedup disk acknowledges from its
open transaction, or its journal, and commits at SYNCHRONIZE CACHE or every few thousand
changes, the raw one writes through the page cache), exported through tcm_loop, I/O scheduler
"none". For every repetition and workload the two targets run back to back (drift in the
shared host's load spreads over both):

- writes: the dedup disk is discarded whole (``blkdiscard``) before each run and the pool's
  collector given time to return the space, so each run starts on an empty disk and stores
  what it writes (fresh chunks, the issue's case). fio writes at most the disk once per run
  (random map on; ``--runtime`` or ``--size``, whichever ends first) with ``refill_buffers``,
  ``dedupe_percentage`` 0, 50 or 90 and ``end_fsync`` (the run ends with its data durable: for
  the dedup disk the pool's commit); the raw disk gets the same job. The pool's dedup ratio
  after each dedup run is recorded (with a journal, once it is drained: see `drain_journal`).
- random read: the dedup disk written whole with unique data first (fio, 1 MiB); the raw image
  is already full; then 4 KiB random reads, time based.

fio: libaio, direct=1. Results go to ``OUT/runs.json`` (appended after each run) and
``OUT/done.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from labbench import MIB, REPO, GuestDisks, arg_parser, boot_guest, full_image, select

# (name, fio rw, block size, queue depth, dedupe_percentage or None for reads)
WORKLOADS: tuple[tuple[str, str, str, int, int | None], ...] = (
    ("randwrite-4k-qd32-dup0", "randwrite", "4k", 32, 0),
    ("randwrite-4k-qd32-dup50", "randwrite", "4k", 32, 50),
    ("randwrite-4k-qd32-dup90", "randwrite", "4k", 32, 90),
    ("write-1m-qd8-dup0", "write", "1M", 8, 0),
    ("write-1m-qd8-dup50", "write", "1M", 8, 50),
    ("write-1m-qd8-dup90", "write", "1M", 8, 90),
    ("randread-4k-qd32", "randread", "4k", 32, None),
)
TARGETS = ("dedup", "raw")


def selected(only: str | None) -> tuple[tuple[str, str, str, int, int | None], ...]:
    return select(WORKLOADS, only)


# --------------------------------------------------------------------------------------------
# Guest side


def guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests" / "kernel"))
    from guestlib import Cleanup, log, run, wait_for

    from tcmu_py.handlers.dedup import create_pool, read_pool_status

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "dedupbench"
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    pool = work / "pool"
    create_pool(str(pool), "bench", (args.capacity_mib or 4 * args.size_mib) * MIB, None,
                journal=args.journal_mib * MIB)
    image = work / "raw.img"
    full_image(image, size)

    def fio(dev: Path, name: str, rw: str, bsz: str, qd: int, dup: int | None,
            res_json: Path, runtime: float | None = args.seconds) -> tuple[int, str, str]:
        argv = ["fio", f"--name={name}", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
                f"--rw={rw}", f"--bs={bsz}", f"--iodepth={qd}", f"--size={args.size_mib}M",
                "--randrepeat=0", "--output-format=json", f"--output={res_json}"]
        if runtime is not None:
            argv.append(f"--runtime={runtime:g}")
        if dup is None:
            argv += ["--time_based", "--norandommap"]
        else:  # end_fsync: the run ends when its data is durable (on both targets)
            argv += ["--refill_buffers", f"--dedupe_percentage={dup}", "--end_fsync=1"]
        p = run(argv, timeout=(runtime or 120) + 180, check=False)
        return p.returncode, res_json.read_text() if res_json.exists() else "", p.stderr

    def sync_cache(dev: Path) -> None:
        """fsync of the block device: SYNCHRONIZE CACHE, which commits the pool (its figures
        as `read_pool_status` reads them are the committed ones)."""
        fd = os.open(dev, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def drain_journal(dev: Path) -> None:
        """With a write journal: have the pool drain it into the index, then commit, so that
        `read_pool_status` counts everything written. A write of part of a chunk waits for the
        journal to be drained first: the disk's first logical block is read and written back
        as it is (O_DIRECT; the data does not change), then SYNCHRONIZE CACHE."""
        if not args.journal_mib:
            return
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            blksz = struct.unpack("i", fcntl.ioctl(fd, 0x1268, b"\0" * 4))[0]  # BLKSSZGET
            assert blksz < 4096, f"{dev}: block size {blksz} is a whole chunk"
            buf = mmap.mmap(-1, blksz)  # page-aligned, as O_DIRECT wants
            assert os.preadv(fd, [buf], 0) == blksz
            assert os.pwritev(fd, [buf], 0) == blksz
            os.fsync(fd)
        finally:
            os.close(fd)

    def daemon_pool(path: str) -> dict[str, Any]:
        """What the serving daemon says of the pool at `path` now: the WRITEs the native loop
        appended to the journal itself so far, and those it sent to Python while leased."""
        from tcmu_py.daemon.control import query_status

        st = query_status(disks.run_dir, timeout=10)
        for p in st.get("dedup_pools") or []:
            if p.get("path") == path:
                return {k: v for k, v in p.items()
                        if k.startswith("journal_c_") or k == "collector"}
        return {}

    def fresh_dedup(dev: Path) -> dict[str, Any]:
        """Discard the dedup disk whole and wait (bounded) for the collector to give the
        containers back; returns the pool's figures then."""
        run(["blkdiscard", str(dev)], timeout=300)
        sync_cache(dev)
        t0 = time.monotonic()

        idle_since: list[float | None] = [None]

        def settled() -> Any:
            """The pool's data gone and its collector idle for a second: the run then measures
            the writes, not the compaction of the previous run's chunks beside them (the raw
            disk has nothing running in the background)."""
            st = read_pool_status(str(pool))
            now = time.monotonic()
            if daemon_pool(str(pool)).get("collector") != "idle":
                idle_since[0] = None
            elif idle_since[0] is None:
                idle_since[0] = now
            quiet = idle_since[0] is not None and now - idle_since[0] >= 1.0
            return st if st.logical == 0 and st.used <= 64 * MIB and quiet else None

        try:
            st = wait_for(settled, 180, "the collector to empty the pool")
        except TimeoutError:
            st = read_pool_status(str(pool))
        return {"used_before": st.used, "collect_wait_s": round(time.monotonic() - t0, 1)}

    runs: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        disks = GuestDisks(work, out, cleanup)
        devs = {"dedup": disks.export("dedup", f"dedup/pool={pool};disk=dedup0", size),
                "raw": disks.export("raw", f"raw/{image}", size)}

        for rep in range(args.reps):
            for wl, rw, bsz, qd, dup in selected(args.only):
                for target in TARGETS:
                    dev = devs[target]
                    rec: dict[str, Any] = {"rep": rep, "workload": wl, "target": target}
                    if target == "dedup" and dup is not None:
                        rec.update(fresh_dedup(dev))
                    elif target == "dedup" and read_pool_status(str(pool)).logical < size:
                        fresh_dedup(dev)
                        code, _, err = fio(dev, "fill", "write", "1M", 8, 0, work / "fill.json",
                                           runtime=None)
                        assert code == 0, f"fio fill: exit {code}: {err[-1500:]}"
                        sync_cache(dev)
                        drain_journal(dev)
                        assert read_pool_status(str(pool)).logical == size, "fill incomplete"
                    res_json = work / f"{target}-{wl}-{rep}.json"
                    rec["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
                    code, text, err = fio(dev, wl, rw, bsz, qd, dup, res_json)
                    if code != 0 or "{" not in text:
                        rec["failed"] = f"fio exit {code}: {err[-1500:]}"
                    else:
                        job = json.loads(text[text.index("{"):])["jobs"][0]
                        io = job["read" if dup is None else "write"]
                        rec.update(iops=io["iops"], bw_bytes=io["bw_bytes"],
                                   bytes=io["io_bytes"], lat_mean_us=io["lat_ns"]["mean"] / 1000,
                                   error=job["error"])
                    if target == "dedup":
                        rec.update({k: v for k, v in daemon_pool(str(pool)).items()
                                    if k != "collector"})
                        sync_cache(dev)
                        drain_journal(dev)
                        st = read_pool_status(str(pool))
                        rec.update(pool_logical=st.logical, pool_unique=st.unique,
                                   pool_ratio=round(st.ratio, 3))
                    runs.append(rec)
                    (out / "runs.json").write_text(json.dumps(runs, indent=2))
                    log(f"rep {rep} {wl} {target}: {rec.get('iops', 0):.0f} IOPS "
                        f"{rec.get('bw_bytes', 0) / MIB:.1f} MiB/s"
                        + (f" ratio {rec['pool_ratio']}" if target == "dedup" else ""))
    (out / "done.json").write_text(json.dumps({"runs": len(runs), "kernel": os.uname().release,
                                               "cpus": os.cpu_count(),
                                               "journal_mib": args.journal_mib}))
    return 0 if all("failed" not in r for r in runs) else 1


# --------------------------------------------------------------------------------------------
# Host side


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median IOPS and MiB/s per workload and target, the dedup/raw ratio of the medians, and
    the pool's median dedup ratio after the dedup runs."""
    summary: dict[str, Any] = {}
    for wl, *_ in WORKLOADS:
        row: dict[str, Any] = {}
        if not any(r["workload"] == wl for r in runs):
            continue
        for target in TARGETS:
            ok = [r for r in runs if r["workload"] == wl and r["target"] == target
                  and "failed" not in r]
            if ok:
                row[target] = {"iops": statistics.median(r["iops"] for r in ok),
                               "mib_s": statistics.median(r["bw_bytes"] for r in ok) / MIB,
                               "runs": len(ok)}
                if target == "dedup":
                    row["pool_ratio"] = statistics.median(r["pool_ratio"] for r in ok)
        if "raw" in row and "dedup" in row and row["raw"]["iops"]:
            row["ratio dedup/raw"] = row["dedup"]["iops"] / row["raw"]["iops"]
        summary[wl] = row
    return summary


def host(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    guest_args = ["--seconds", str(args.seconds), "--reps", str(args.reps),
                  "--size-mib", str(args.size_mib),
                  "--capacity-mib", str(args.capacity_mib),
                  "--journal-mib", str(args.journal_mib)] + ([] if args.only is None else
                                                             ["--only", args.only])
    budget = 600 + args.reps * len(selected(args.only)) * len(TARGETS) * (args.seconds + 200)
    runs = boot_guest(Path(__file__), guest_args, out, budget)
    if runs is None:
        return 1
    summary = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for wl, row in summary.items():
        parts = [f"{t}: {v['iops']:.0f} IOPS {v['mib_s']:.1f} MiB/s ({v['runs']} runs)"
                 for t, v in row.items() if isinstance(v, dict)]
        extra = "".join(f"  {k} = {v:.2f}" for k, v in row.items()
                        if k.startswith("ratio") or k == "pool_ratio")
        print(f"{wl}: " + "; ".join(parts) + extra)
    return 0 if (out / "done.json").exists() else 1


def main() -> int:
    ap = arg_parser(__doc__, "dedup_vs_raw", seconds=10.0, reps=2, size_mib=256)
    ap.add_argument("--capacity-mib", type=int, default=0,
                    help="the pool's capacity (default: 4 x the disk's size; the guest's "
                    "scratch tmpfs has ~1 GiB free, which bounds it with the raw image and "
                    "the journal)")
    ap.add_argument("--journal-mib", type=int, default=0,
                    help="the pool's write journal in MiB (default 0: none; else 4..65536); "
                    "journal.dat (up to that size) is on the guest's scratch tmpfs too")
    args = ap.parse_args()
    if args.journal_mib and not 4 <= args.journal_mib <= 64 << 10:
        ap.error(f"--journal-mib: got {args.journal_mib}, expected 0 (no journal) or 4..65536")
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
