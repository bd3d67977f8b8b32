"""Tape vs raw disk in the lab VM: `dd` of 256 KiB blocks to /dev/nstN (a VTL drive) and the
same volume to a raw disk, both served by one `tcmu-py serve`, in the same VM boot.

    .venv/bin/python benchmarks/tape_vs_raw.py --out results/tape_vs_raw [--mib 256] [--reps 3]

Host side: boots the lab kernel (`tcmu_py.lab.run_in_vm`) and runs this file again inside with
``--guest``; then prints per-direction medians and the tape/raw ratio, and writes
``OUT/summary.json``.

Guest side (``--guest``): on the scratch tmpfs, a library with one IBM LTO-8 drive holding a
blank cartridge, and a fully written raw image of the volume's size. Both devices get the same
LIO settings (hw_max_sectors 2048, data area 128 MiB, write cache off), are exported through
tcm_loop, and see the same I/O pattern: one 256 KiB command at a time (st writes variable
blocks synchronously; the disk is written with ``oflag=direct``, read with ``iflag=direct``).
Each repetition writes, then reads, tape then raw back to back (the tape from BOT after a
rewind, so every write starts an empty cartridge). Throughput is volume / wall time of the dd
process, which for the tape includes the filemark st writes at close. Each run also records the
daemon's CPU time and the guest's busy CPU time: on a shared, emulated host they say more about
the cost per byte than wall time does. Data comes from
/dev/zero (the drive's compression is off by default, so zeros cost what other data costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BLOCK = 256 << 10


# --------------------------------------------------------------------------------------------
# Guest side


def guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests" / "kernel"))
    from guestlib import (
        Cleanup,
        Daemon,
        create_loopback_lun,
        create_user_backstore,
        log,
        run,
        wait_for,
        write_attr,
    )

    from tcmu_py.daemon.control import query_status
    from tcmu_py.errors import TcmuError
    from tcmu_py.handlers.vtl import admin
    from tcmu_py.scsi.smc import ElementType

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "tapebench"
    work.mkdir(parents=True, exist_ok=True)
    volume = args.mib * MIB
    count = volume // BLOCK

    library = work / "library"
    lib = admin.create_library(library, name="bench", drives=[("BENCH00001", "IBM-LTO8")],
                               slots=2, import_export=0)
    admin.create_cartridges(lib, "BEN000L8")
    lib.move(lib.addresses(ElementType.STORAGE)[0], lib.drive_address(0))
    lib.close()
    image = work / "raw.img"
    block = os.urandom(MIB)
    with open(image, "wb") as f:  # fully allocated, like a provisioned raw image
        for _ in range(volume // MIB):
            f.write(block)

    def served(name: str) -> bool:
        try:
            st = query_status(run_dir, timeout=2)
        except TcmuError:
            return False
        return any(d["name"] == name and not d["failed"] for d in st["devices"])

    control = {"hw_max_sectors": 2048, "max_data_area_mb": 128}
    runs: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        run_dir = work / "run"
        ready = work / "ready"
        serve_extra = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
        daemon = Daemon([sys.executable, "-m", "tcmu_py.cli", "serve", "--run-dir", str(run_dir),
                         "--ready-file", str(ready), *serve_extra], out / "serve.log")
        cleanup.callback(daemon.stop)
        daemon.start(ready=ready.exists, timeout=300)
        targets: dict[str, Path] = {}
        for name, config, size, kind in (
            ("tape0", f"vtl/library={library};unit=drive0", MIB, "scsi_tape"),
            ("raw0", f"raw/{image}", volume, "block"),
        ):
            bs = create_user_backstore(name, config, size, control=control, cleanup=cleanup)
            bs.set_attrib("cmd_time_out", 300)
            wait_for(lambda n=name: served(n), 120, f"daemon serving {name}")
            lun = create_loopback_lun(bs, cleanup=cleanup)
            targets[name] = lun.wait_device(kind, 180)
            log(f"{name}: {targets[name]}")
        write_attr(Path("/sys/block") / targets["raw0"].name / "queue" / "scheduler", "none")
        tape = targets["tape0"]
        # st allows one open at a time; udev's probe of the new node (scsi_id) may hold it.
        run(["udevadm", "settle", "--timeout=120"], timeout=180, check=False)
        wait_for(lambda: run(["mt", "-f", str(tape), "rewind"], timeout=120,
                             check=False).returncode == 0, 120, f"{tape} to rewind")

        def dd(target: str, direction: str) -> tuple[float, float, float]:
            """(wall seconds, daemon CPU seconds, guest busy seconds) of one dd run."""
            dev = targets[target]
            if direction == "write":
                argv = ["dd", "if=/dev/zero", f"of={dev}", f"bs={BLOCK}", f"count={count}"]
                if target == "raw0":
                    argv.append("oflag=direct")
            else:
                argv = ["dd", f"if={dev}", "of=/dev/null", f"bs={BLOCK}", f"count={count}"]
                if target == "raw0":
                    argv.append("iflag=direct")
            if target == "tape0":
                run(["mt", "-f", str(dev), "rewind"], timeout=300)
            cpu0, busy0 = daemon_cpu(), guest_busy()
            t0 = time.monotonic()
            res = run(argv, timeout=600, check=False)
            elapsed = time.monotonic() - t0
            if res.returncode != 0 or f"{count}+0 records" not in res.stderr:
                raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr}")
            return elapsed, daemon_cpu() - cpu0, guest_busy() - busy0

        def daemon_cpu() -> float:
            """CPU seconds (user + system) the daemon process has used so far."""
            assert daemon.proc is not None
            fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        for rep in range(args.reps):
            for direction in ("write", "read"):
                for target in ("tape0", "raw0"):
                    rec: dict[str, Any] = {"rep": rep, "direction": direction, "target": target,
                                           "bytes": volume,
                                           "loadavg": Path("/proc/loadavg").read_text().split()[0]}
                    try:
                        seconds, cpu, busy = dd(target, direction)
                        rec.update(seconds=seconds, mib_s=volume / MIB / seconds,
                                   daemon_cpu_s=cpu, guest_busy_s=busy)
                    except (RuntimeError, TimeoutError) as exc:
                        rec["failed"] = str(exc)[-1500:]
                    runs.append(rec)
                    (out / "runs.json").write_text(json.dumps(runs, indent=2))
                    log(f"rep {rep} {direction} {target}: {rec.get('mib_s', 0):.1f} MiB/s")
        if args.profile:
            # py-spy samples the daemon's threads (CPU only, no idle frames) during one more
            # write and read of each target; the host summarises the stacks.
            for direction in ("write", "read"):
                for target in ("tape0", "raw0"):
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).parent / "py-spy"), "record",
                         "--pid", str(daemon.proc.pid), "--rate", "197", "--format", "raw",
                         "--threads", "--nonblocking",
                         "--output", str(out / f"profile-{direction}-{target}.txt")],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                    try:
                        dd(target, direction)
                    finally:
                        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                        spy.communicate(timeout=120)
    (out / "done.json").write_text(json.dumps({"runs": len(runs), "kernel": os.uname().release,
                                               "cpus": os.cpu_count()}))
    return 0 if all("failed" not in r for r in runs) else 1


def guest_busy() -> float:
    """CPU seconds the whole guest has spent busy (all CPUs; /proc/stat minus idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Host side


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median MiB/s per direction and target, and tape/raw ratios of the medians."""
    summary: dict[str, Any] = {}
    for direction in ("write", "read"):
        row: dict[str, Any] = {}
        for target in ("tape0", "raw0"):
            ok = [r for r in runs if r["direction"] == direction and r["target"] == target
                  and "failed" not in r]
            if ok:
                row[target] = {"mib_s": statistics.median(r["mib_s"] for r in ok),
                               "runs": len(ok)}
                if all("daemon_cpu_s" in r for r in ok):
                    row[target]["daemon_cpu_s_per_gib"] = statistics.median(
                        r["daemon_cpu_s"] * (1 << 30) / r["bytes"] for r in ok)
                    row[target]["guest_busy_s_per_gib"] = statistics.median(
                        r["guest_busy_s"] * (1 << 30) / r["bytes"] for r in ok)
        if "tape0" in row and "raw0" in row:
            row["ratio"] = row["tape0"]["mib_s"] / row["raw0"]["mib_s"]
        summary[direction] = row
    return summary


def host(args: argparse.Namespace) -> int:
    from tcmu_py import lab

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs.json", "done.json"):
        (out / stale).unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--guest", "--out", str(out),
           "--reps", str(args.reps), "--mib", str(args.mib)]
    if args.poll_us is not None:
        cmd += ["--poll-us", str(args.poll_us)]
    if args.profile:
        cmd.append("--profile")
    script = lab.guest_prelude() + f"cd {shlex.quote(str(REPO))}\nexec {shlex.join(cmd)}\n"
    t0 = time.monotonic()
    proc = lab.run_in_vm(script, rwdirs=[out], memory="2G", timeout=900 + args.reps * 600,
                         log=out / "console.log", cwd=REPO)
    print(f"VM exit {proc.returncode} after {time.monotonic() - t0:.0f}s")
    runs_file = out / "runs.json"
    if not runs_file.exists():
        print("no runs.json: see", out / "console.log")
        return 1
    summary = summarise(json.loads(runs_file.read_text()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for direction, row in summary.items():
        parts = [f"{t}: {v['mib_s']:.1f} MiB/s ({v['runs']} runs"
                 + (f", daemon {v['daemon_cpu_s_per_gib']:.0f} CPU s/GiB, guest busy"
                    f" {v['guest_busy_s_per_gib']:.0f} s/GiB" if "daemon_cpu_s_per_gib" in v
                    else "") + ")"
                 for t, v in row.items() if isinstance(v, dict)]
        ratio = f"  tape/raw = {row['ratio']:.2f}" if "ratio" in row else ""
        print(f"{direction} {BLOCK >> 10} KiB blocks: " + "; ".join(parts) + ratio)
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vm_bench import summarize_profile

        for prof in sorted(out.glob("profile-*.txt")):
            p = summarize_profile(prof.read_text(), top=12)
            print(f"{prof.stem}: {p['samples']} samples; self: "
                  + ", ".join(f"{k} {v}%" for k, v in p["self_by_function"]))
    return 0 if (out / "done.json").exists() else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "tape_vs_raw")
    ap.add_argument("--mib", type=int, default=256, help="volume per run (MiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--poll-us", type=int, default=None, help="tcmu-py serve --poll-us")
    ap.add_argument("--profile", action="store_true",
                    help="also sample the daemon with py-spy during one more run of each")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
