"""tcmu-py's ``ceph`` handler vs tcmu-runner's ``rbd`` handler on one Ceph cluster, in one lab
VM boot: the six fio workloads of docs/benchmarks.md on each (issue 15).

    .venv/bin/python benchmarks/ceph_vs_runner.py --out results/ceph_vs_runner \\
        [--seconds 8] [--reps 2] [--size-mib 32] [--only randread-4k-qd1,...]

Host side: boots the lab kernel (`labbench.boot_guest`) and runs this file again inside with
``--guest``; then prints per-workload medians and the ceph/rbd ratio, and writes
``OUT/summary.json``.

Guest side (``--guest``): starts the tests' cluster (`tcmu_py.testing.ceph_cluster`: 1 mon,
1 mgr, 3 memstore OSDs, pool ``rbd`` of size 2), makes two images of the same size in that pool
(``a`` and ``b``), serves one with tcmu-py's ``ceph`` and the other with Debian's tcmu-runner
``rbd``, and swaps them between the daemons at every repetition (a 32 MiB image is 8 RADOS
objects: one image's objects may sit on busier OSDs than the other's, which no number of
repetitions on the same image would average out). Both backstores
``emulate_write_cache=1``, 512 KiB commands, a 64 MiB data area, I/O scheduler "none"; both
librbds without ``rbd_cache`` (tcmu-runner's always, tcmu-py's by default; ``--py-rbd-cache``
gives tcmu-py's device ``rbd_cache=1``). It fills both images whole with random data (reads of
never-written RBD objects would not reach an OSD), then for every repetition and workload runs
the two targets back to back, which goes first swapping every second repetition (drift in
the shared host's load spreads over both): in every four repetitions each target runs first and
second on each image, so neither the image nor the order favours a daemon (use a multiple of
4 for ``--reps``; ``runs.json`` records each run's ``image`` and ``first``).

fio: libaio, direct=1, time_based, one job. Results go to ``OUT/runs.json`` (appended after each
run) and ``OUT/done.json``; the daemons' CPU seconds over each run are recorded too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from labbench import MIB, REPO, GuestDisks, arg_parser, boot_guest, select

# (name, fio rw, block size, queue depth): docs/benchmarks.md's six.
WORKLOADS = (
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("read-1m-qd8", "read", "1M", 8),
    ("write-1m-qd8", "write", "1M", 8),
)
TARGETS = ("tcmu-py ceph", "tcmu-runner rbd")
IMAGES = ("a", "b")


# --------------------------------------------------------------------------------------------
# Guest side


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runner_uios(pid: int) -> list[str]:
    """The uio devices process `pid` has open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.path.realpath(fd)
        if target.startswith("/dev/uio"):
            found.append(target)
    return found


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid`'s threads, summed by thread name (digits dropped: the
    ``msgr-worker-N`` of librados; tcmu-py's ``tcmu-py-loop``, ``tcmu:<device>`` and
    ``tcmu-w:<device>`` (`tcmu_py.threadname.name_os_thread`); its other Python threads carry the
    process's name)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            head, rest = task.joinpath("stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        name = re.sub(r"\d+", "N", head.split("(", 1)[1])
        f = rest.split()
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


def _profile(pid: int, seconds: float, raw: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (the virtualenv's, if installed) sampling `pid` for `seconds`, collapsed stacks
    per thread into `raw`; None without py-spy."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration",
                             f"{int(seconds) + 2}", "--rate", "97", "--format", "raw",
                             "--threads", "--nonblocking", "--output", str(raw)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _py_counters(disks: GuestDisks, name: str) -> dict[str, int]:
    """tcmu-py's counters of device `name`: commands, those C executed, wake-ups, batches,
    errors, merged (sent within an adjacent command's librbd operation); {} if the status
    cannot be read."""
    from tcmu_py.daemon.control import query_status
    from tcmu_py.errors import TcmuError

    try:
        st = query_status(disks.run_dir, timeout=10)
    except TcmuError:
        return {}
    for d in st["devices"]:
        if d["name"] == name:
            c = d["counters"]
            out = {k: int(c.get(k, 0))
                   for k in ("commands", "wakeups", "batches", "errors", "merged")}
            out["in_c"] = int((d.get("data_plane") or {}).get("commands", 0))
            return out
    return {}


def _fio_once(workload: tuple[str, str, str, int], dev: Path,
              args: argparse.Namespace) -> list[str]:
    """fio's command line for one more run of `workload` on `dev`, for a profiler (terse
    output, not recorded in runs.json)."""
    name, rw, bsz, qd = workload
    return ["fio", f"--name={name}", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
            f"--rw={rw}", f"--bs={bsz}", f"--iodepth={qd}", f"--size={args.size_mib}M",
            "--time_based", f"--runtime={args.seconds:g}", "--norandommap", "--randrepeat=0",
            "--output-format=terse"]


def _perf_run(out: Path, target: str, name: str, pid: int, seconds: float,
              fio: list[str], log: Any) -> None:
    """Run `fio` once more while ``perf record`` samples process `pid` (software clock: no
    PMU under TCG; call graphs by frame pointer), then write ``perf report`` by thread name
    and shared object, and by symbol, to ``OUT/perf-<target>-<name>.txt``."""
    if shutil.which("perf") is None:
        log("no perf: no profile")
        return
    tag = target.split()[0]
    data = out / f"perf-{tag}-{name}.data"
    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g",
                            "-p", str(pid), "-o", str(data), "--", "sleep",
                            f"{seconds + 1:g}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)  # attached
    subprocess.run(fio, timeout=seconds + 300, check=False, capture_output=True)
    rec.wait(timeout=seconds + 120)
    with open(out / f"perf-{tag}-{name}.txt", "w") as f:
        for sort in ("comm,dso", "comm,dso,symbol"):
            f.write(f"===== perf report --sort {sort}\n")
            f.flush()
            subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                            "-g", "none", "--sort", sort, "--percent-limit", "0.3"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=600, check=False)
    log(f"perf profile of {target} on {name}: {out / f'perf-{tag}-{name}.txt'}")


def guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests" / "kernel"))
    from guestlib import Cleanup, Daemon, log, run

    from tcmu_py.testing.ceph_cluster import start_cluster

    workloads = select(WORKLOADS, args.only)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "cephbench"
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    env: dict[str, Any] = {"load_start": Path("/proc/loadavg").read_text().split()[:3]}
    runs: list[dict[str, Any]] = []
    with Cleanup() as cleanup:
        t0 = time.monotonic()
        cluster = start_cluster(work / "c")
        cleanup.callback(cluster.stop)
        env["cluster_start_seconds"] = round(time.monotonic() - t0, 1)
        log(f"cluster started in {env['cluster_start_seconds']} s")
        admin = cluster.admin()
        try:
            io = admin.ioctx("rbd")
            try:
                for image in IMAGES:
                    io.create_image(image, size)
            finally:
                io.close()
        finally:
            admin.shutdown()

        # tcmu-py serve (no D-Bus yet: none claimed)
        disks = GuestDisks(work, out, cleanup,
                           () if args.py_native_loop else ("--no-native-loop",))
        serve_pid = disks_pid(disks)
        Path("/run/dbus").mkdir(parents=True, exist_ok=True)
        run(["dbus-daemon", "--system", "--fork"], timeout=60)
        logdir = work / "runner-log"
        logdir.mkdir(exist_ok=True)
        runner = Daemon(["tcmu-runner", "--tcmu-log-dir", str(logdir)], out / "tcmu-runner.log")
        cleanup.callback(lambda: shutil.copy(logdir / "tcmu-runner.log",
                                             out / "tcmu-runner-file.log"))
        cleanup.callback(runner.stop, 60)
        runner.start()
        assert runner.proc is not None
        runner_pid = runner.proc.pid

        def runner_opened(bs: Any) -> bool:
            found = bs.find_uio()
            return found is not None and str(found[0]) in _runner_uios(runner_pid)

        conf = cluster.conf

        exported: dict[str, Any] = {}

        def export(rep: int, stack: Any) -> dict[str, Path]:
            """Both targets' disks for repetition `rep`: the images swap targets every
            repetition, so neither daemon keeps the image whose RADOS objects happen to sit
            on the less busy OSDs (a 32 MiB image is 8 objects)."""
            images = IMAGES if rep % 2 == 0 else IMAGES[::-1]
            py_name, rn_name = f"cephpy{rep}", f"rbdrunner{rep}"
            devs = {
                "tcmu-py ceph": disks.export(py_name,
                                             f"ceph/image=rbd/{images[0]};conf={conf};id=admin"
                                             + (";rbd_cache=1" if args.py_rbd_cache else ""),
                                             size, cleanup=stack),
                "tcmu-runner rbd": disks.export(rn_name,
                                                f"rbd/rbd/{images[1]};conf={conf};id=admin",
                                                size, served=runner_opened, cleanup=stack),
            }
            exported.update({"tcmu-py ceph": images[0], "tcmu-runner rbd": images[1],
                             "py_name": py_name, "rn_name": rn_name})
            return devs

        def unexport(stack: Any) -> None:
            """Remove both disks and wait until both daemons closed them (and with that
            released the images' exclusive locks)."""
            from guestlib import wait_for

            stack.close()
            wait_for(lambda: not disks.served(exported["py_name"]), 120,
                     f"tcmu-py closing {exported['py_name']}")
            wait_for(lambda: not _runner_uios(runner_pid), 120, "tcmu-runner closing its uio")

        stack = Cleanup()
        cleanup.callback(stack.close)
        devs = export(0, stack)
        pids = {"tcmu-py ceph": serve_pid, "tcmu-runner rbd": runner_pid}
        for name, dev in devs.items():
            t1 = time.monotonic()
            run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", f"count={args.size_mib}",
                 "oflag=direct", "status=none"], timeout=900)
            env[f"fill_seconds {name}"] = round(time.monotonic() - t1, 1)
            log(f"{name}: {dev} filled in {env[f'fill_seconds {name}']} s")
        env["versions"] = {"tcmu-runner": run(["tcmu-runner", "--version"], timeout=60,
                                              check=False).stdout.strip(),
                           "fio": run(["fio", "--version"], timeout=60).stdout.strip()}
        for rep in range(args.reps):
            if rep:
                unexport(stack)
                stack = Cleanup()
                cleanup.callback(stack.close)
                devs = export(rep, stack)
            for i, (wl, rw, bsz, qd) in enumerate(workloads):
                # Images swap every repetition, the order every second one: in four
                # repetitions each target runs first and second on each image.
                order = TARGETS if (rep // 2 + i) % 2 == 0 else TARGETS[::-1]
                for target in order:
                    dev = devs[target]
                    res_json = work / f"{target.split()[0]}-{wl}-{rep}.json"
                    ramp = min(1.0, args.seconds / 4)
                    argv = ["fio", f"--name={wl}", f"--filename={dev}", "--ioengine=libaio",
                            "--direct=1", f"--rw={rw}", f"--bs={bsz}", f"--iodepth={qd}",
                            "--numjobs=1", f"--size={args.size_mib}M", "--time_based",
                            f"--runtime={args.seconds:g}", f"--ramp_time={ramp:g}",
                            "--norandommap", "--randrepeat=0", "--lat_percentiles=1",
                            "--output-format=json", f"--output={res_json}"]
                    # The status query first: its CPU in the daemon is not the run's.
                    py0 = _py_counters(disks, exported["py_name"]) if target == TARGETS[0] else {}
                    cpu0 = _cpu_seconds(pids[target])
                    threads0 = _thread_cpu(pids[target])
                    p = run(argv, timeout=args.seconds + 300, check=False)
                    cpu = _cpu_seconds(pids[target]) - cpu0
                    threads1 = _thread_cpu(pids[target])
                    text = res_json.read_text() if res_json.exists() else ""
                    rec: dict[str, Any] = {"rep": rep, "workload": wl, "target": target,
                                           "image": exported[target],
                                           "first": target == order[0],
                                           "loadavg": Path("/proc/loadavg").read_text().split()[0]}
                    if p.returncode != 0 or "{" not in text:
                        rec["failed"] = f"fio exit {p.returncode}: {p.stderr[-1500:]}"
                    else:
                        job = json.loads(text[text.index("{"):])["jobs"][0]
                        side = job["read" if "read" in rw else "write"]
                        pct = side.get("lat_ns", {}).get("percentile", {})
                        rec.update(iops=side["iops"], bw_bytes=side["bw_bytes"],
                                   lat_mean_us=side["lat_ns"]["mean"] / 1000,
                                   lat_p99_us=pct.get("99.000000", 0.0) / 1000,
                                   error=job["error"], ios=side["total_ios"],
                                   server_cpu_s=round(cpu, 2),
                                   server_cpu_us_per_io=round(
                                       cpu * 1e6 / max(side["total_ios"], 1)),
                                   thread_cpu_us_per_io={
                                       k: round((v - threads0.get(k, 0.0)) * 1e6
                                                / max(side["total_ios"], 1))
                                       for k, v in sorted(threads1.items())
                                       if v - threads0.get(k, 0.0) > 0})
                    if py0:
                        py1 = _py_counters(disks, exported["py_name"])
                        # What tcmu-py did with the run's commands: all of them, those C
                        # completed (the rest went through Python), its wake-ups and batches.
                        rec["daemon"] = {k: py1.get(k, 0) - py0.get(k, 0) for k in py1}
                    runs.append(rec)
                    (out / "runs.json").write_text(json.dumps(runs, indent=2))
                    log(f"rep {rep} {wl} {target}: {rec.get('iops', 0):.0f} IOPS "
                        f"{rec.get('bw_bytes', 0) / MIB:.1f} MiB/s")
        for prof_wl in [w for w in workloads if w[0] in args.profile.split(",")]:
            name = prof_wl[0]
            spy = _profile(serve_pid, args.seconds, out / f"profile-{name}.txt")
            if spy is None:
                log("no py-spy in the virtualenv: no profile")
                break
            time.sleep(1)  # py-spy attached
            run(_fio_once(prof_wl, devs[TARGETS[0]], args), timeout=args.seconds + 300,
                check=False)
            spy_out, _ = spy.communicate(timeout=args.seconds + 120)
            (out / f"profile-{name}.log").write_bytes(spy_out)
        for perf_wl in [w for w in workloads if w[0] in args.perf.split(",")]:
            for target in TARGETS:
                _perf_run(out, target, perf_wl[0], pids[target], args.seconds,
                          _fio_once(perf_wl, devs[target], args), log)
        env["load_end"] = Path("/proc/loadavg").read_text().split()[:3]
    (out / "done.json").write_text(json.dumps({"runs": len(runs), "kernel": os.uname().release,
                                               "cpus": os.cpu_count(), **env}, indent=2))
    return 0 if all("failed" not in r for r in runs) else 1


def disks_pid(disks: GuestDisks) -> int:
    """The pid of the `tcmu-py serve` behind `disks` (from its status)."""
    from tcmu_py.daemon.control import query_status

    return int(query_status(disks.run_dir, timeout=30)["pid"])


# --------------------------------------------------------------------------------------------
# Host side


def _pair_ratios(runs: list[dict[str, Any]], wl: str) -> list[float]:
    """tcmu-py/tcmu-runner IOPS of each repetition of workload `wl` in which both ran."""
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["workload"] == wl and "failed" not in r and r.get("iops"):
            by_rep.setdefault(r["rep"], {})[r["target"]] = r["iops"]
    return [got[TARGETS[0]] / got[TARGETS[1]] for _, got in sorted(by_rep.items())
            if all(t in got for t in TARGETS)]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median IOPS, MiB/s, mean latency and server CPU per I/O per workload and target, the
    ceph/rbd IOPS ratio of the medians, and each repetition's ratio (back-to-back pairs) with
    their geometric mean and how many tcmu-py won: with the schedule balanced over images and
    order (a multiple of 4 repetitions), the geometric mean is the fairer figure."""
    summary: dict[str, Any] = {}
    for wl, *_ in WORKLOADS:
        row: dict[str, Any] = {}
        for target in TARGETS:
            ok = [r for r in runs if r["workload"] == wl and r["target"] == target
                  and "failed" not in r]
            if ok:
                row[target] = {
                    "iops": statistics.median(r["iops"] for r in ok),
                    "mib_s": statistics.median(r["bw_bytes"] for r in ok) / MIB,
                    "lat_mean_us": statistics.median(r["lat_mean_us"] for r in ok),
                    "cpu_us_per_io": statistics.median(r["server_cpu_us_per_io"] for r in ok),
                    "iops_each": [round(r["iops"], 1) for r in ok],
                    "runs": len(ok)}
        if all(t in row for t in TARGETS) and row[TARGETS[1]]["iops"]:
            row["ratio"] = row[TARGETS[0]]["iops"] / row[TARGETS[1]]["iops"]
        pairs = _pair_ratios(runs, wl)
        if pairs:
            row["pairs"] = [round(p, 3) for p in pairs]
            row["pairs_geomean"] = math.exp(statistics.fmean(math.log(p) for p in pairs))
            row["pairs_won"] = sum(p > 1 for p in pairs)
        if row:
            summary[wl] = row
    return summary


def host(args: argparse.Namespace) -> int:
    guest_args = ["--seconds", str(args.seconds), "--reps", str(args.reps),
                  "--size-mib", str(args.size_mib)]
    if args.only:
        guest_args += ["--only", args.only]
    if args.profile:
        guest_args += ["--profile", args.profile]
    if args.perf:
        guest_args += ["--perf", args.perf]
    if args.py_rbd_cache:
        guest_args += ["--py-rbd-cache"]
    if not args.py_native_loop:
        guest_args += ["--no-py-native-loop"]
    n = len(select(WORKLOADS, args.only))
    budget = 1200 + args.reps * n * 2 * (args.seconds + 120)
    out = args.out.resolve()
    load = Path("/proc/loadavg").read_text().split()[:3]
    runs = boot_guest(Path(__file__), guest_args, out, budget)
    if runs is None:
        return 1
    summary = summarise(runs)
    summary["_host_load"] = {"start": load, "end": Path("/proc/loadavg").read_text().split()[:3]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"host load average: start {load}, end {summary['_host_load']['end']}")
    for wl, row in summary.items():
        if wl.startswith("_"):
            continue
        parts = [f"{t}: {v['iops']:.0f} IOPS {v['mib_s']:.1f} MiB/s "
                 f"{v['lat_mean_us']:.0f} µs {v['cpu_us_per_io']:.0f} CPU µs/IO {v['iops_each']}"
                 for t, v in row.items() if isinstance(v, dict)]
        ratio = f"  ceph/rbd = {row['ratio']:.2f}" if "ratio" in row else ""
        if "pairs" in row:
            ratio += (f"; pairs {row['pairs']} geometric mean {row['pairs_geomean']:.3f}, "
                      f"tcmu-py won {row['pairs_won']} of {len(row['pairs'])}")
        print(f"{wl}: " + "; ".join(parts) + ratio)
    for prof in sorted(out.glob("profile-*.txt")):
        from vm_bench import summarize_profile

        top = summarize_profile(prof.read_text(), top=12)
        (prof.with_suffix(".json")).write_text(json.dumps(top, indent=2))
        print(f"{prof.name}: {top['samples']} samples; threads {top['by_thread']}")
        print("  self:", top["self_by_function"][:10])
        print("  inclusive:", top["inclusive_by_function"][:12])
    return 0 if (out / "done.json").exists() else 1


def main() -> int:
    ap = arg_parser(__doc__, "ceph_vs_runner", seconds=8.0, reps=2, size_mib=32)
    ap.add_argument("--profile", default="",
                    help="workloads to run once more on tcmu-py under py-spy (OUT/profile-*)")
    ap.add_argument("--perf", default="",
                    help="workloads to run once more on each target under perf record "
                    "(OUT/perf-*.txt: CPU by thread, library and function)")
    ap.add_argument("--py-rbd-cache", action="store_true",
                    help="tcmu-py's device with rbd_cache=1 (librbd's cache, WCE=1); by "
                    "default both librbds run without it, as tcmu-runner's rbd always does")
    ap.add_argument("--py-native-loop", action=argparse.BooleanOptionalAction, default=True,
                    help="tcmu-py's native loop serves plain READ/WRITE through librbd from C "
                    "(issue 15), as by default; --no-py-native-loop: `serve --no-native-loop`, "
                    "every command in Python (the handler before issue 15's C path)")
    args = ap.parse_args()
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
