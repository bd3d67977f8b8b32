"""Thin vs raw in the lab VM: fio 4 KiB random write and 1 MiB sequential write on a fresh thin
disk and on a raw disk, both served by one `tcmu-py serve`, in the same VM boot.

    .venv/bin/python benchmarks/thin_vs_raw.py --out results/thin_vs_raw [--seconds 10] [--reps 3]

Host side: boots the lab kernel (`tcmu_py.lab.run_in_vm`) and runs this file again inside with
``--guest``; then prints per-workload medians and the thin/raw ratio, and writes
``OUT/summary.json``.

Guest side (``--guest``): creates a thin pool on the scratch tmpfs (capacity twice the disk) and a
fully written raw image of the same size, both devices with ``emulate_write_cache=1`` (the
handlers write through the page cache; WCE=1 for both, so neither pays O_DSYNC), exported through
tcm_loop, I/O scheduler "none". For every repetition and workload the two targets run back to
back (drift in the shared host's load spreads over both), in three runs:

- ``thin-fresh``: the thin disk discarded whole (``blkdiscard``) just before, so the run starts
  on a fresh thin disk and pays for allocating what it writes (the issue's comparison);
- ``raw``: the raw disk, its image fully written beforehand (a provisioned disk);
- ``thin-mapped``: the thin disk again after writing all of it once, so nothing is allocated
  during the run: the handler's own overhead, without the backing file system's allocation cost.

fio: libaio, direct=1, time_based. Results go to ``OUT/runs.json`` (appended after each run) and
``OUT/done.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from labbench import MIB, REPO, GuestDisks, arg_parser, boot_guest, full_image

# (name, fio rw, block size, queue depth)
WORKLOADS = (
    ("randwrite-4k-qd16", "randwrite", "4k", 16),
    ("write-1m-qd8", "write", "1M", 8),
)


# --------------------------------------------------------------------------------------------
# Guest side


def guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests" / "kernel"))
    from guestlib import Cleanup, log, run

    from tcmu_py.handlers.thin import create_pool, read_pool_status

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "thinbench"
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    pool = work / "pool"
    create_pool(str(pool), "bench", 2 * size, None)
    image = work / "raw.img"
    full_image(image, size)

    runs: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        disks = GuestDisks(work, out, cleanup)
        devs = {"thin0": disks.export("thin0", f"thin/pool={pool};disk=thin0", size),
                "raw0": disks.export("raw0", f"raw/{image}", size)}

        plan = (("thin-fresh", devs["thin0"]), ("raw", devs["raw0"]),
                ("thin-mapped", devs["thin0"]))
        for rep in range(args.reps):
            for wl, rw, bsz, qd in WORKLOADS:
                for name, dev in plan:
                    if name == "thin-fresh":
                        run(["blkdiscard", str(dev)], timeout=300)
                        assert read_pool_status(str(pool)).used == 0, "thin disk not fresh"
                    elif name == "thin-mapped":
                        run(["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "oflag=direct"],
                            timeout=900, check=False)  # ends with ENOSPC at the end of the disk
                        assert read_pool_status(str(pool)).used == size, "thin disk not mapped"
                    res_json = work / f"{name}-{wl}-{rep}.json"
                    argv = ["fio", f"--name={wl}", f"--filename={dev}", "--ioengine=libaio",
                            "--direct=1", f"--rw={rw}", f"--bs={bsz}", f"--iodepth={qd}",
                            f"--size={args.size_mib}M", "--time_based",
                            f"--runtime={args.seconds:g}", "--norandommap", "--randrepeat=0",
                            "--output-format=json", f"--output={res_json}"]
                    p = run(argv, timeout=args.seconds + 180, check=False)
                    text = res_json.read_text() if res_json.exists() else ""
                    rec: dict[str, Any] = {"rep": rep, "workload": wl, "target": name,
                                           "loadavg": Path("/proc/loadavg").read_text().split()[0]}
                    if p.returncode != 0 or "{" not in text:
                        rec["failed"] = f"fio exit {p.returncode}: {p.stderr[-1500:]}"
                    else:
                        job = json.loads(text[text.index("{"):])["jobs"][0]
                        rec.update(iops=job["write"]["iops"], bw_bytes=job["write"]["bw_bytes"],
                                   lat_mean_us=job["write"]["lat_ns"]["mean"] / 1000,
                                   error=job["error"])
                    if name.startswith("thin"):
                        rec["pool_used_after"] = read_pool_status(str(pool)).used
                    runs.append(rec)
                    (out / "runs.json").write_text(json.dumps(runs, indent=2))
                    log(f"rep {rep} {wl} {name}: {rec.get('iops', 0):.0f} IOPS "
                        f"{rec.get('bw_bytes', 0) / MIB:.1f} MiB/s")
    (out / "done.json").write_text(json.dumps({"runs": len(runs), "kernel": os.uname().release,
                                               "cpus": os.cpu_count()}))
    return 0 if all("failed" not in r for r in runs) else 1


# --------------------------------------------------------------------------------------------
# Host side


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median IOPS and MiB/s per workload and target, and thin/raw ratios of the medians."""
    summary: dict[str, Any] = {}
    for wl, *_ in WORKLOADS:
        row: dict[str, Any] = {}
        for target in ("thin-fresh", "raw", "thin-mapped"):
            ok = [r for r in runs if r["workload"] == wl and r["target"] == target
                  and "failed" not in r]
            if ok:
                row[target] = {"iops": statistics.median(r["iops"] for r in ok),
                               "mib_s": statistics.median(r["bw_bytes"] for r in ok) / MIB,
                               "runs": len(ok)}
        if "raw" in row and row["raw"]["iops"]:
            for thin in ("thin-fresh", "thin-mapped"):
                if thin in row:
                    row[f"ratio {thin}/raw"] = row[thin]["iops"] / row["raw"]["iops"]
        summary[wl] = row
    return summary


def host(args: argparse.Namespace) -> int:
    guest_args = ["--seconds", str(args.seconds), "--reps", str(args.reps),
                  "--size-mib", str(args.size_mib)]
    budget = 600 + args.reps * len(WORKLOADS) * 3 * (args.seconds + 120)
    runs = boot_guest(Path(__file__), guest_args, args.out.resolve(), budget)
    if runs is None:
        return 1
    out = args.out.resolve()
    summary = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for wl, row in summary.items():
        parts = [f"{t}: {v['iops']:.0f} IOPS {v['mib_s']:.1f} MiB/s ({v['runs']} runs)"
                 for t, v in row.items() if isinstance(v, dict)]
        ratios = "".join(f"  {k} = {v:.2f}" for k, v in row.items() if k.startswith("ratio"))
        print(f"{wl}: " + "; ".join(parts) + ratios)
    return 0 if (out / "done.json").exists() else 1


def main() -> int:
    ap = arg_parser(__doc__, "thin_vs_raw", seconds=10.0, reps=3, size_mib=128, only=False)
    args = ap.parse_args()
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
