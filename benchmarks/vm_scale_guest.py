"""Guest side of benchmarks/vm_scale.py: runs INSIDE the lab VM (root, after guest_prelude()).

    python vm_scale_guest.py --out DIR [--seconds 5] [--reps 2] [--size-mib 64] [--devices 4]

Issue 17's aim "four devices served by one daemon reach >= 1.6x the aggregate IOPS of one", in
one boot:

1. writes ``--devices`` images on the guest's scratch tmpfs (non-zero data);
2. creates, on each image, one tcmu-py ``raw`` device (``py0``...) and one tcmu-runner ``qcow``
   device (``rn0``...; it serves raw images), all with emulate_write_cache=1 and the same control
   settings, each exported through its own tcm_loop port (vm_bench_guest's helpers);
3. starts tcmu-runner, and ``tcmu-py serve`` in one of two modes: ``native`` (the default: a C
   thread per device owns its ring) or ``stage1`` (``--no-native-loop``: the data plane runs in
   each device's Python loop thread, under the GIL). Switching modes stops serve (SIGTERM: the
   devices stay in configfs, unblocked) and starts it again; its start-up scan of
   /sys/class/uio serves the existing devices;
4. per repetition: tcmu-runner, then tcmu-py in both modes (ABBA order over repetitions, so one
   restart per repetition), each over every workload (4 KiB random read / write at QD32) on ONE
   device, then on ALL devices at once (one fio run, one job per device, group_reporting: the
   figures are the sum). Each fio run is bounded by --seconds (time_based).

Around every run it records the serving process's CPU time per thread (by thread name), the
guest's whole CPU use (/proc/stat) and, for tcmu-py, each device's command count (so a device
starved in the four-device run shows).

Writes ``DIR/runs.json`` (after every run), ``DIR/env.json`` and ``DIR/done.json`` last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "kernel"))
sys.path.insert(0, str(REPO / "benchmarks"))

from guestlib import Daemon, log, read_attr, run, wait_for, write_attr  # noqa: E402
from vm_bench_guest import (  # noqa: E402
    MIB,
    WORKLOADS,
    Target,
    Workload,
    block_device,
    create_backstore,
    daemon_counters,
    export,
    fio_figures,
    make_image,
    proc_cpu_seconds,
    serve_daemon,
    teardown,
    tool_version,
    wait_serving,
    write_json,
)

DEFAULT_WORKLOADS = "randread-4k-qd32,randwrite-4k-qd32"
MODES = {"native": [], "stage1": ["--no-native-loop"]}


def fio_many(
    devs: list[Path], wl: Workload, seconds: float, size_mib: int, out_json: Path
) -> dict[str, Any]:
    """One time-bounded fio run with one job per device, reported as one group (summed IOPS and
    bandwidth, latency over all jobs)."""
    ramp = min(1.0, seconds / 4)
    argv = [
        "fio",
        "--ioengine=libaio",
        "--direct=1",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        f"--size={size_mib}M",
        "--time_based",
        f"--runtime={seconds:g}",
        f"--ramp_time={ramp:g}",
        "--norandommap",
        "--randrepeat=0",
        "--lat_percentiles=1",
        "--group_reporting",
        "--output-format=json",
        f"--output={out_json}",
    ]
    for i, dev in enumerate(devs):  # options before the first --name are global
        argv += [f"--name={wl.name}-{i}", f"--filename={dev}"]
    res = run(argv, timeout=seconds + ramp + 120, check=False)
    return fio_figures(res, out_json, wl, f"fio {wl.name} on {len(devs)} devices")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread of process ``pid``, keyed ``name/tid`` (tcmu-py's
    threads, Python's and the native loops', all carry the OS name ``python``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = (task / "stat").read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def guest_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all guest CPUs since boot (/proc/stat's first line)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])
    return float(total - idle), float(total)


def start_serve(mode: str, run_dir: Path, work: Path, out: Path, py: list[Target]) -> Daemon:
    """``tcmu-py serve`` in ``mode``, waited for (bounded) until it serves every device."""
    ready = work / "serve.ready"
    ready.unlink(missing_ok=True)
    serve = serve_daemon(run_dir, ready, MODES[mode], out / f"tcmu-py-serve-{mode}.log")
    serve.start(ready=ready.exists, timeout=300)
    for t in py:
        wait_serving(serve, t.backstore, 60)
    return serve


def plane_status(run_dir: Path) -> dict[str, Any]:
    """Each tcmu-py device's data-plane report (``native: True`` under the native loop)."""
    from tcmu_py.daemon.control import query_status

    st = query_status(run_dir, timeout=10)
    return {d["name"]: d.get("data_plane") for d in st["devices"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--hw-max-sectors", type=int, default=1024)
    ap.add_argument("--data-area-mb", type=int, default=64)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    ap.add_argument("--no-runner", action="store_true", help="skip tcmu-runner")
    args = ap.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch")) / "scale"
    work.mkdir(parents=True, exist_ok=True)
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    n = args.devices
    size = args.size_mib * MIB
    env: dict[str, Any] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_total_kib": int(Path("/proc/meminfo").read_text().split()[1]),
        "fio": tool_version(["fio", "--version"]),
        "tcmu_runner": tool_version(["tcmu-runner", "--version"]),
        "python": sys.version.split()[0],
        "seconds": args.seconds,
        "reps": args.reps,
        "size_mib": args.size_mib,
        "devices": n,
        "workloads": [w.name for w in workloads],
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
    }
    control = {
        "dev_size": size,
        "hw_max_sectors": args.hw_max_sectors,
        "max_data_area_mb": args.data_area_mb,
        "nl_reply_supported": -1,
    }
    attrib = {"emulate_write_cache": 1}
    targets: list[Target] = []
    py: list[Target] = []
    rn: list[Target] = []
    run_dir = work / "run"
    serve: Daemon | None = None
    runner: Daemon | None = None
    runs: list[dict[str, Any]] = []
    rc = 0
    try:
        for i in range(n):
            image = work / f"disk{i}.img"
            make_image(image, size)
            bs = create_backstore(
                f"user_{i + 1}", f"py{i}", {"dev_config": f"raw/{image}", **control}, attrib
            )
            py.append(Target(f"py{i}", bs, f"naa.5001405{i + 1:05x}0000"))
            if not args.no_runner:
                bs = create_backstore(
                    f"user_{n + i + 1}", f"rn{i}", {"dev_config": f"qcow/{image}", **control},
                    attrib,
                )
                rn.append(Target(f"rn{i}", bs, f"naa.5001405{n + i + 1:05x}0000"))
        targets = py + rn
        mode = "native"
        serve = start_serve(mode, run_dir, work, out, py)
        env["plane"] = {mode: plane_status(run_dir)}
        if rn:
            Path("/run/dbus").mkdir(parents=True, exist_ok=True)
            run(["dbus-daemon", "--system", "--fork"], timeout=60)
            logdir = work / "runner-log"
            logdir.mkdir(exist_ok=True)
            runner = Daemon(["tcmu-runner", "--tcmu-log-dir", str(logdir)], out / "tcmu-runner.log")
            runner.start()
            try:
                for t in rn:
                    wait_serving(runner, t.backstore, 120)
            finally:
                with contextlib.suppress(OSError):
                    shutil.copy(logdir / "tcmu-runner.log", out / "tcmu-runner-file.log")
        for t in targets:
            export(t)
            t.dev = wait_for(lambda t=t: block_device(t), 180, f"block device of {t.name}")
            with contextlib.suppress(OSError):
                write_attr(Path("/sys/block") / t.dev.name / "queue" / "scheduler", "none")
            log(f"{t.name}: {t.dev}")
        env["attributes"] = {
            t.name: {
                k: read_attr(t.backstore / "attrib" / k)
                for k in ("hw_max_sectors", "emulate_write_cache", "hw_queue_depth")
            }
            for t in targets
        }
        write_json(out / "env.json", env)

        def measure(rep: int, target: str, group: list[Target], pid: int) -> None:
            nonlocal rc
            for wl in workloads:
                for count in (1, n):
                    devs = [t.dev for t in group[:count] if t.dev is not None]
                    py_side = target != "runner"
                    before = (
                        {t.name: daemon_counters(run_dir, t.name) for t in group[:count]}
                        if py_side
                        else {}
                    )
                    threads0, cpu0, g0 = thread_cpu(pid), proc_cpu_seconds(pid), guest_cpu()
                    rec: dict[str, Any] = {
                        "rep": rep,
                        "target": target,
                        "workload": wl.name,
                        "devices": count,
                        "runtime_s": args.seconds + min(1.0, args.seconds / 4),
                    }
                    t0 = time.monotonic()
                    try:
                        rec.update(
                            fio_many(
                                devs, wl, args.seconds, args.size_mib,
                                work / f"{target}-{wl.name}-{count}-{rep}.json",
                            )
                        )
                    except (RuntimeError, TimeoutError) as exc:
                        rec["failed"] = str(exc)
                        rc = 1
                    rec["wall"] = time.monotonic() - t0
                    g1, threads1 = guest_cpu(), thread_cpu(pid)
                    rec["server_cpu_s"] = proc_cpu_seconds(pid) - cpu0
                    rec["server_threads_cpu_s"] = {
                        k: round(v - threads0.get(k, 0.0), 3)
                        for k, v in threads1.items()
                        if v - threads0.get(k, 0.0) > 0.005
                    }
                    rec["guest_busy"] = (g1[0] - g0[0]) / (g1[1] - g0[1]) if g1[1] > g0[1] else None
                    if py_side:
                        rec["device_commands"] = {}
                        for name, c0 in before.items():
                            c1 = daemon_counters(run_dir, name)
                            if c0 and c1:
                                rec["device_commands"][name] = c1["commands"] - c0["commands"]
                    runs.append(rec)
                    write_json(out / "runs.json", runs)
                    log(
                        f"rep {rep} {target} {wl.name} x{count}: {rec.get('iops', 0):.0f} IOPS, "
                        f"mean {rec.get('lat_mean_us', 0):.0f}us, server CPU "
                        f"{rec['server_cpu_s']:.2f}s, guest busy {rec['guest_busy'] or 0:.0%}"
                    )

        for rep in range(args.reps):
            if runner is not None and runner.proc is not None:
                measure(rep, "runner", rn, runner.proc.pid)
            order = ["native", "stage1"] if rep % 2 == 0 else ["stage1", "native"]
            for want in order:
                if want != mode:
                    serve.stop(timeout=60)
                    mode = want
                    serve = start_serve(mode, run_dir, work, out, py)
                    env["plane"][mode] = plane_status(run_dir)
                    write_json(out / "env.json", env)
                assert serve.proc is not None
                measure(rep, f"py-{mode}", py, serve.proc.pid)
        env["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
        write_json(out / "env.json", env)
    except Exception as exc:  # noqa: BLE001 - record, then clean up and report failure
        import traceback

        log("benchmark failed: " + "".join(traceback.format_exception(exc)))
        rc = 2
    finally:
        # LIO objects first, while the daemons still serve them, then the daemons.
        teardown(targets)
        for d in (serve, runner):
            if d is not None:
                with contextlib.suppress(Exception):
                    d.stop(timeout=30)
        write_json(out / "done.json", {"rc": rc, "runs": len(runs)})
    return rc


if __name__ == "__main__":
    sys.exit(main())
