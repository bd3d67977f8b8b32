"""Mirror vs raw in the lab VM (issue 16): a 2-leg `mirror` disk (a local image file and an NBD
export served by nbdkit on 127.0.0.1) against a `raw` disk, both served by one `tcmu-py serve`
in the same VM boot, over the six fio workloads of docs/benchmarks.md (4 KiB random read and
write at queue depth 1 and 32, 1 MiB sequential read and write at queue depth 8).

    .venv/bin/python benchmarks/mirror_vs_raw.py --out results/mirror_vs_raw [--seconds 8]
        [--reps 2] [--size-mib 128] [--only randread-4k-qd1,...] [--profile WORKLOAD,...]

Host side: boots the lab kernel (`tcmu_py.lab.run_in_vm`), runs this file again inside with
``--guest``, then prints per-workload medians and the mirror/raw ratio against the issue's aims
(reads >= 0.9x raw, writes >= 0.5x raw) and writes ``OUT/summary.json``.

Guest side (``--guest``): every image on the scratch tmpfs. The raw image is written whole
first; the mirror's legs are new sparse files (``assume_clean=1``: both zero, equal) that fio
then writes whole through the mirror, so both disks read allocated data. Both devices have
``emulate_write_cache=1`` (WCE=1: the raw disk writes through the page cache, the mirror
acknowledges when every leg has the write, flushes at SYNCHRONIZE CACHE), quorum ``all``,
region 1 MiB, reads ``least-busy`` (the default: the local leg unless it has more reads in
flight than the NBD leg). They are exported through tcm_loop with I/O
scheduler "none"; for every repetition and workload the two targets run back to back (drift in
the shared host's load spreads over both). fio: libaio, direct=1, time based, bounded by
``--seconds``; writes end with ``end_fsync``. Results: ``OUT/runs.json`` (appended after each
run) and ``OUT/done.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from labbench import (
    MIB,
    REPO,
    GuestDisks,
    arg_parser,
    boot_guest,
    full_image,
    py_spy_record,
    select,
)

NBD_PORT = 10809
#: ``--nbd-direct``: a second nbdkit (same plugin, its own file) that fio drives itself.
DIRECT_PORT = 10810

# (name, fio rw, block size, queue depth)
WORKLOADS: tuple[tuple[str, str, str, int], ...] = (
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("read-1m-qd8", "read", "1M", 8),
    ("write-1m-qd8", "write", "1M", 8),
)
TARGETS = ("mirror", "raw")
#: The issue's aims, mirror/raw: reads and writes.
AIM_READ, AIM_WRITE = 0.9, 0.5


# --------------------------------------------------------------------------------------------
# Guest side


def guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests" / "kernel"))
    import socket

    from guestlib import Cleanup, Daemon, log, run

    from tcmu_py.daemon.control import query_status
    from tcmu_py.handlers.mirror.config import encode_spec
    from tcmu_py.handlers.mirror.mirror import meta_length

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "mirrorbench"
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    region = MIB
    image = work / "raw.img"
    full_image(image, size)
    legs = [work / "leg0.img", work / "leg1.img"]
    for leg in legs:
        with open(leg, "wb") as f:
            f.truncate(size + meta_length(size, region))

    def listening(port: int = NBD_PORT) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    def fio(dev: Path | str, name: str, rw: str, bsz: str, qd: int, res_json: Path,
            runtime: float | None = args.seconds) -> tuple[int, str, str]:
        engine = (["--ioengine=nbd", f"--uri={dev}"] if str(dev).startswith("nbd:") else
                  [f"--filename={dev}", "--ioengine=libaio", "--direct=1"])
        argv = ["fio", f"--name={name}", *engine, f"--rw={rw}", f"--bs={bsz}",
                f"--iodepth={qd}", f"--size={args.size_mib}M",
                "--randrepeat=0", "--output-format=json", f"--output={res_json}"]
        if runtime is not None:
            argv += [f"--runtime={runtime:g}", "--time_based", "--norandommap"]
        if "write" in rw:
            argv.append("--end_fsync=1")
        p = run(argv, timeout=(runtime or 300) + 180, check=False)
        return p.returncode, res_json.read_text() if res_json.exists() else "", p.stderr

    runs: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        nbd = Daemon(["nbdkit", "--foreground", "-i", "127.0.0.1", "-p", str(NBD_PORT), "file",
                      f"file={legs[1]}"], out / "nbdkit.log")
        cleanup.callback(nbd.stop)
        nbd.start(ready=listening, timeout=60)
        disks = GuestDisks(work, out, cleanup, serve_args=args.serve_args.split())
        spec = "|".join(encode_spec(s) for s in (str(legs[0]), f"nbd://127.0.0.1:{NBD_PORT}"))
        devs: dict[str, Path | str] = {
            "mirror": disks.export("mirror", f"mirror/legs={spec};assume_clean=1;region=1M", size),
            "raw": disks.export("raw", f"raw/{image}", size)}
        targets: tuple[str, ...] = TARGETS
        if args.nbd_direct:
            # What the NBD leg alone can do: fio's libnbd engine on an export like the leg's
            # (its own file: fio must not write the mirror's leg behind the mirror's back)
            direct = work / "direct.img"
            full_image(direct, size)
            nbd2 = Daemon(["nbdkit", "--foreground", "-i", "127.0.0.1", "-p", str(DIRECT_PORT),
                           "file", f"file={direct}"], out / "nbdkit-direct.log")
            cleanup.callback(nbd2.stop)
            nbd2.start(ready=lambda: listening(DIRECT_PORT), timeout=60)
            devs["nbd"] = f"nbd://127.0.0.1:{DIRECT_PORT}/"
            targets = (*TARGETS, "nbd")

        def served(target: str) -> tuple[int, float, int] | None:
            """(commands, latency seconds, C writes) the daemon counted for `target`."""
            if target == "nbd":
                return None
            st = query_status(disks.run_dir, timeout=30)
            (d,) = [d for d in st["devices"] if d["name"] == target]
            m = [m for m in st["mirrors"] if m["device"] == target]
            return (int(d["counters"]["commands"]), float(d["counters"]["latency_seconds"]),
                    int(m[0]["c_writes"]) if m else 0)

        t0 = time.monotonic()
        code, _, err = fio(devs["mirror"], "fill", "write", "1M", 8, work / "fill.json",
                           runtime=None)
        assert code == 0, f"fio fill of the mirror: exit {code}: {err[-1500:]}"
        log(f"mirror filled in {time.monotonic() - t0:.1f}s")

        for rep in range(args.reps):
            for wl, rw, bsz, qd in select(WORKLOADS, args.only):
                for target in targets:
                    rec: dict[str, Any] = {"rep": rep, "workload": wl, "target": target,
                                           "loadavg": Path("/proc/loadavg").read_text().split()[0]}
                    res_json = work / f"{target}-{wl}-{rep}.json"
                    before = served(target)
                    code, text, err = fio(devs[target], wl, rw, bsz, qd, res_json)
                    after = served(target)
                    # the daemon's side: commands, mean latency (dequeue to completion) and,
                    # for the mirror, the writes C made (the rest went through Python)
                    if after and before:
                        n = after[0] - before[0]
                        rec.update(served_commands=n, served_lat_us=(
                            (after[1] - before[1]) / n * 1e6 if n else 0.0))
                        if target == "mirror":
                            rec["c_writes"] = after[2] - before[2]
                    if code != 0 or "{" not in text:
                        rec["failed"] = f"fio exit {code}: {err[-1500:]}"
                    else:
                        job = json.loads(text[text.index("{"):])["jobs"][0]
                        io = job["read" if "read" in rw else "write"]
                        rec.update(iops=io["iops"], bw_bytes=io["bw_bytes"],
                                   bytes=io["io_bytes"], lat_mean_us=io["lat_ns"]["mean"] / 1000,
                                   error=job["error"])
                    runs.append(rec)
                    (out / "runs.json").write_text(json.dumps(runs, indent=2))
                    log(f"rep {rep} {wl} {target}: {rec.get('iops', 0):.0f} IOPS "
                        f"{rec.get('bw_bytes', 0) / MIB:.1f} MiB/s")
        for wl, rw, bsz, qd in select(WORKLOADS, args.profile) if args.profile else ():
            # py-spy on the daemon (its pid is in the lock file) while fio runs the mirror
            pid = (disks.run_dir / "daemon.lock").read_text().strip()
            prof = out / f"profile-{wl}.txt"
            spy = py_spy_record(pid, int(args.seconds) + 2, prof)
            code, _, err = fio(devs["mirror"], wl, rw, bsz, qd, work / "prof.json")
            spy.communicate(timeout=args.seconds + 120)
            size = prof.stat().st_size if prof.exists() else 0
            log(f"profile {wl}: fio exit {code}, {prof} ({size} B)")
        # The legs hold the same data after all of it (quorum all, no leg lost).
        st = query_status(disks.run_dir, timeout=30)
        (m,) = [m for m in st["mirrors"] if m["device"] == "mirror"]
        legs_ok = [leg["state"] for leg in m["legs"]]
        leg_reads = [leg["reads"] for leg in m["legs"]]  # how the read policy spread them
        # READs the C data plane served from the local leg (the legs' counts leave them out)
        (dev,) = [d for d in st["devices"] if d["name"] == "mirror"]
        in_c = (dev.get("data_plane") or {}).get("commands", 0)
    (out / "done.json").write_text(json.dumps({"runs": len(runs), "kernel": os.uname().release,
                                               "cpus": os.cpu_count(), "legs": legs_ok,
                                               "leg_reads": leg_reads, "c_commands": in_c}))
    return 0 if all("failed" not in r for r in runs) else 1


# --------------------------------------------------------------------------------------------
# Host side


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median IOPS and MiB/s per workload and target, the mirror/raw ratio of the medians and
    whether it meets the issue's aim."""
    summary: dict[str, Any] = {}
    for wl, rw, _, _ in WORKLOADS:
        row: dict[str, Any] = {}
        for target in (*TARGETS, "nbd"):
            ok = [r for r in runs if r["workload"] == wl and r["target"] == target
                  and "failed" not in r]
            if ok:
                row[target] = {"iops": statistics.median(r["iops"] for r in ok),
                               "mib_s": statistics.median(r["bw_bytes"] for r in ok) / MIB,
                               "runs": len(ok)}
        if "raw" in row and "mirror" in row and row["raw"]["iops"]:
            ratio = row["mirror"]["iops"] / row["raw"]["iops"]
            row["ratio mirror/raw"] = ratio
            row["aim"] = AIM_READ if "read" in rw else AIM_WRITE
            row["met"] = ratio >= row["aim"]
        if "raw" in row and "nbd" in row and row["raw"]["iops"]:
            row["ratio nbd/raw"] = row["nbd"]["iops"] / row["raw"]["iops"]
        if row:
            summary[wl] = row
    return summary


def host(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    guest_args = ["--seconds", str(args.seconds), "--reps", str(args.reps),
                  "--size-mib", str(args.size_mib)] + ([] if args.only is None else
                                                       ["--only", args.only]) + (
        ["--profile", args.profile] if args.profile else []) + (
        ["--nbd-direct"] if args.nbd_direct else []) + (
        [f"--serve-args={args.serve_args}"] if args.serve_args else [])
    budget = 900 + args.reps * len(select(WORKLOADS, args.only)) * len(TARGETS) * (
        args.seconds + 200)
    runs = boot_guest(Path(__file__), guest_args, out, budget)
    if runs is None:
        return 1
    summary = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for wl, row in summary.items():
        parts = [f"{t}: {v['iops']:.0f} IOPS {v['mib_s']:.1f} MiB/s ({v['runs']} runs)"
                 for t, v in row.items() if isinstance(v, dict)]
        extra = ""
        if "ratio nbd/raw" in row:
            extra += f"  nbd/raw = {row['ratio nbd/raw']:.2f}"
        if "ratio mirror/raw" in row:
            extra += (f"  mirror/raw = {row['ratio mirror/raw']:.2f} (aim {row['aim']}: "
                     f"{'met' if row['met'] else 'NOT met'})")
        print(f"{wl}: " + "; ".join(parts) + extra)
    return 0 if (out / "done.json").exists() else 1


def main() -> int:
    ap = arg_parser(__doc__, "mirror_vs_raw", seconds=8.0, reps=2, size_mib=128)
    ap.add_argument("--profile", default="",
                    help="workloads to run once more on the mirror under py-spy (OUT/profile-*)")
    ap.add_argument("--serve-args", default="",
                    help="more options of tcmu-py serve, space separated (--poll-us 0)")
    ap.add_argument("--nbd-direct", action="store_true",
                    help="also run each workload with fio's nbd engine on a second nbdkit "
                         "export (target 'nbd': what the NBD leg alone can do)")
    args = ap.parse_args()
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
