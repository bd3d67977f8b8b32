"""Guest side of benchmarks/vm_bench.py: runs INSIDE the lab VM (root, after guest_prelude()).

    python vm_bench_guest.py --out DIR [--seconds 8] [--reps 3] [--size-mib 256] ...

What it does, in one boot:
1. writes one image on the guest's scratch tmpfs (non-zero data, so reads are not served from
   tmpfs holes);
2. creates the targets, all at once, each exported through its own tcm_loop port:
   - ``pyraw``: tcmu-py ``raw`` on the image (emulate_write_cache=1: the handler writes through
     the page cache); ``pyoff``: the same with the C data plane off (``data_plane=off``);
     ``pynull``: tcmu-py ``null``;
   - ``runner``: tcmu-runner's ``qcow`` handler on the same image (it serves raw images too);
   - ``fileio``: LIO's in-kernel fileio backstore on the same image (buffered: fd_buffered_io=1);
   - ``rdmcp``: LIO's in-kernel RAM disk of the same size;
   the user backstores get the same control settings (hw_max_sectors, max_data_area_mb);
3. for every repetition, for every workload, for every target (interleaved, so drift in the
   shared host's load spreads over all targets): one time-bounded fio run (libaio, direct=1,
   time_based). tcmu-py runs also record the daemon's own counters over the run;
4. optionally samples the tcmu-py daemon with py-spy during a few extra pyraw runs.

Writes ``DIR/runs.json`` (appended after every run, so a killed VM still leaves data),
``DIR/env.json`` (guest facts and target attributes), ``DIR/profile-*.txt`` (py-spy collapsed
stacks) and ``DIR/done.json`` last. Standard library plus tests/kernel/guestlib.py only; tcmu_py
is imported only for the daemon's status query.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "kernel"))

from guestlib import CORE, LOOPBACK, Daemon, log, read_attr, run, wait_for, write_attr  # noqa: E402
from labbench import py_spy_record  # noqa: E402

MIB = 1 << 20


@dataclass(frozen=True)
class Workload:
    """One fio job shape."""

    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        """The fio JSON section holding this workload's figures."""
        return "read" if "read" in self.rw else "write"


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd32", "randread", "4k", 32),
    Workload("randwrite-4k-qd1", "randwrite", "4k", 1),
    Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
    Workload("read-1m-qd8", "read", "1M", 8),
    Workload("write-1m-qd8", "write", "1M", 8),
)

TARGETS: tuple[str, ...] = ("pyraw", "pyoff", "pynull", "runner", "fileio", "rdmcp")


@dataclass
class Target:
    """A backstore exported through tcm_loop, and its block device once the LUN is scanned."""

    name: str
    backstore: Path  # configfs directory of the storage object
    wwn: str
    dev: Path | None = None

    @property
    def tpg(self) -> Path:
        return LOOPBACK / self.wwn / "tpgt_1"


# --------------------------------------------------------------------------------------------
# configfs


def create_backstore(kind: str, name: str, control: dict[str, Any], attrib: dict[str, Any]) -> Path:
    """mkdir ``core/<kind>/<name>``, write ``control`` key by key and ``attrib`` entries, enable.

    Attributes go before ``enable`` on purpose: for TCMU, emulate_write_cache written after enable
    becomes a netlink RECONFIG, and the daemons read it from configfs when they open the device.
    """
    path = CORE / kind / name
    path.mkdir(parents=True)
    for key, value in control.items():
        write_attr(path / "control", f"{key}={value}")
    for key, value in attrib.items():
        write_attr(path / "attrib" / key, value)
    write_attr(path / "enable", 1)
    log(f"backstore {path} enabled")
    return path


def export(target: Target) -> None:
    """tcm_loop target with an I_T nexus and LUN 0 -> the backstore (the kernel scans at once)."""
    lun = target.tpg / "lun" / "lun_0"
    lun.mkdir(parents=True)
    write_attr(target.tpg / "nexus", target.wwn[:-4] + "ffff")
    os.symlink(target.backstore, lun / target.name)


def block_device(target: Target) -> Path | None:
    """/dev/sdX of the target's LUN once sd has bound it."""
    try:
        address = read_attr(target.tpg / "address")
    except OSError:
        return None
    base = Path("/sys/class/scsi_device") / f"{address}:0" / "device" / "block"
    if not base.is_dir():
        return None
    names = sorted(p.name for p in base.iterdir())
    if not names:
        return None
    dev = Path("/dev") / names[0]
    return dev if dev.exists() else None


def uio_of(backstore: Path) -> str | None:
    """uioN whose name names this user backstore (tcm-user/<hba>/<name>/...)."""
    hba = backstore.parent.name.split("_", 1)[1]
    prefix = f"tcm-user/{hba}/{backstore.name}/"
    for entry in Path("/sys/class/uio").iterdir():
        with contextlib.suppress(OSError):
            if read_attr(entry / "name").startswith(prefix):
                return entry.name
    return None


def holds_open(pid: int, node: str) -> bool:
    """Whether process ``pid`` has /dev/<node> open (i.e. serves that TCMU device)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"/dev/{node}":
                    return True
    return False


def sd_cache_type(dev: Path) -> str:
    """What the initiator's sd driver made of the target's caching mode page ("write back"
    when WCE=1)."""
    for p in (Path("/sys/block") / dev.name / "device" / "scsi_disk").glob("*/cache_type"):
        with contextlib.suppress(OSError):
            return read_attr(p)
    return "unknown"


def wait_serving(daemon: Daemon, backstore: Path, timeout: float) -> None:
    """Wait (bounded) until ``daemon`` holds the uio device of ``backstore`` open."""
    proc = daemon.proc
    assert proc is not None

    def serving() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{daemon.argv[0]} exited with {proc.returncode}")
        node = uio_of(backstore)
        return node is not None and holds_open(proc.pid, node)

    wait_for(serving, timeout, f"{daemon.argv[0]} to serve {backstore}")


def serve_daemon(run_dir: Path, ready: Path, extra: list[str], log_path: Path) -> Daemon:
    """``tcmu-py serve`` (this interpreter, the repo's package) with its run directory and ready
    file, plus `extra` options; not started."""
    argv = [sys.executable, "-m", "tcmu_py.cli", "serve", "--run-dir", str(run_dir),
            "--ready-file", str(ready), *extra]
    return Daemon(argv, log_path)


def teardown(targets: list[Target]) -> None:
    """Unlink LUNs, drop nexuses, remove targets and backstores (best effort)."""
    for t in targets:
        lun = t.tpg / "lun" / "lun_0"
        with contextlib.suppress(OSError):
            for link in lun.iterdir():
                if link.is_symlink():
                    link.unlink()
            lun.rmdir()
        with contextlib.suppress(OSError):
            write_attr(t.tpg / "nexus", "NULL")
        for p in (t.tpg, t.tpg.parent, t.backstore, t.backstore.parent):
            with contextlib.suppress(OSError):
                p.rmdir()


# --------------------------------------------------------------------------------------------
# fio


def fio(dev: Path, wl: Workload, seconds: float, size_mib: int, out_json: Path) -> dict[str, Any]:
    """One time-bounded fio run; returns the figures of its single job."""
    ramp = min(1.0, seconds / 4)
    argv = [
        "fio",
        f"--name={wl.name}",
        f"--filename={dev}",
        "--ioengine=libaio",
        "--direct=1",
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        "--numjobs=1",
        f"--size={size_mib}M",
        "--time_based",
        f"--runtime={seconds:g}",
        f"--ramp_time={ramp:g}",
        "--norandommap",
        "--randrepeat=0",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--output={out_json}",
    ]
    res = run(argv, timeout=seconds + ramp + 120, check=False)
    return fio_figures(res, out_json, wl, f"fio {wl.name} on {dev}")


def fio_figures(
    res: subprocess.CompletedProcess[str], out_json: Path, wl: Workload, what: str
) -> dict[str, Any]:
    """The figures of the first job of a finished fio run's JSON output (with
    ``--group_reporting``: all jobs summed); RuntimeError if fio failed."""
    text = out_json.read_text() if out_json.exists() else ""
    if res.returncode != 0 or "{" not in text:
        raise RuntimeError(f"{what}: exit {res.returncode}: {res.stderr[-2000:]}")
    job = json.loads(text[text.index("{") :])["jobs"][0]
    side = job[wl.direction]
    lat = side.get("lat_ns", {})
    pct = lat.get("percentile", {}) or side.get("clat_ns", {}).get("percentile", {})
    return {
        "error": job.get("error", 0),
        "iops": side["iops"],
        "bw_bytes": side["bw_bytes"],
        "lat_mean_us": lat.get("mean", 0.0) / 1000,
        "lat_p99_us": pct.get("99.000000", 0.0) / 1000,
        "ios": side.get("total_ios", 0),
        "usr_cpu": job.get("usr_cpu"),
        "sys_cpu": job.get("sys_cpu"),
    }


# --------------------------------------------------------------------------------------------
# daemons


def daemon_counters(run_dir: Path, device: str) -> dict[str, float] | None:
    """The tcmu-py daemon's counters for ``device`` (None if it does not answer)."""
    from tcmu_py.daemon.control import query_status
    from tcmu_py.errors import TcmuError

    try:
        st = query_status(run_dir, timeout=5)
    except TcmuError:
        return None
    for d in st["devices"]:
        if d["name"] == device:
            return dict(d["counters"])
    return None


def counter_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """What the daemon did between two snapshots: commands, batches, mean in-daemon latency."""
    from tcmu_py.daemon.status import window

    if not before or not after:
        return None
    w = window(after, before)  # the rates `tcmu-py status` reports
    return {
        "commands": after["commands"] - before["commands"],
        "batches": after["batches"] - before["batches"],
        "commands_per_s": w["iops"],
        "daemon_mean_latency_us": 1e6 * w["mean_s"],
        "busy_seconds": after["busy_seconds"] - before["busy_seconds"],
        "errors": w["errors"],
        # the native loop's busy-poll: wake-ups it saved, watches that found nothing, and its
        # judge's probes and changes of mind (absent from older counters: 0)
        **{k: after.get(k, 0) - before.get(k, 0)
           for k in ("polled", "poll_misses", "poll_probes", "poll_switches", "mapped")},
    }


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: fields[0] is the state (proc(5) field 3)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all threads), seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> dict[str, float]:
    """A process's user and system CPU seconds, minor/major page faults (all threads) and
    voluntary/involuntary context switches (summed over its threads)."""
    fields = _stat_fields(pid)
    ticks = os.sysconf("SC_CLK_TCK")
    out = {
        "user_s": int(fields[11]) / ticks,
        "sys_s": int(fields[12]) / ticks,
        "minflt": float(fields[7]),
        "majflt": float(fields[9]),
        "vcsw": 0.0,
        "ivcsw": 0.0,
    }
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out["vcsw"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    out["ivcsw"] += int(line.split()[1])
    return out


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    return "unknown"


def make_image(path: Path, size: int) -> None:
    """A fully allocated image of pseudo-random data (one random MiB repeated)."""
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(block)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(path)


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--hw-max-sectors", type=int, default=1024)
    ap.add_argument("--data-area-mb", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="tcmu-py serve --workers")
    ap.add_argument("--poll-us", type=int, default=None, help="tcmu-py serve --poll-us")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    ap.add_argument("--profile", default="", help="workloads to profile on pyraw with py-spy")
    args = ap.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch"))
    work = scratch / "bench"
    work.mkdir(parents=True, exist_ok=True)
    wanted = [t for t in args.targets.split(",") if t]
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    size = args.size_mib * MIB
    env: dict[str, Any] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_total_kib": int(Path("/proc/meminfo").read_text().split()[1]),
        "scratch_fs": "tmpfs",
        "fio": tool_version(["fio", "--version"]),
        "tcmu_runner": tool_version(["tcmu-runner", "--version"]),
        "python": sys.version.split()[0],
        "seconds": args.seconds,
        "reps": args.reps,
        "size_mib": args.size_mib,
        "targets": wanted,
        "workloads": [w.name for w in workloads],
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
    }

    image = work / "disk.img"
    t0 = time.monotonic()
    make_image(image, size)
    log(f"image {image}: {size} bytes in {time.monotonic() - t0:.1f}s")

    user_control = {
        "dev_size": size,
        "hw_max_sectors": args.hw_max_sectors,
        "max_data_area_mb": args.data_area_mb,
        "nl_reply_supported": -1,
    }
    user_attrib = {"emulate_write_cache": 1}
    targets: list[Target] = []
    daemons: list[Daemon] = []
    run_dir = work / "run"
    serve: Daemon | None = None
    # Userspace process serving each target: its CPU time is sampled around every run.
    server_pid: dict[str, int] = {}
    runs: list[dict[str, Any]] = []
    rc = 0
    try:
        hba = 1
        specs: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
            "pyraw": ("user", {"dev_config": f"raw/{image}", **user_control}, user_attrib),
            "pyoff": ("user", {"dev_config": f"raw/{image};data_plane=off", **user_control},
                      user_attrib),
            "pynull": ("user", {"dev_config": "null/", **user_control}, user_attrib),
            "runner": ("user", {"dev_config": f"qcow/{image}", **user_control}, user_attrib),
            "fileio": (
                "fileio",
                {"fd_dev_name": image, "fd_dev_size": size, "fd_buffered_io": 1},
                {},
            ),
            "rdmcp": ("rd_mcp", {"rd_pages": size // 4096}, {}),
        }
        for i, name in enumerate(wanted):
            kind, control, attrib = specs[name]
            bs = create_backstore(f"{kind}_{hba + i}", name, control, attrib)
            targets.append(Target(name, bs, f"naa.5001405{i + 1:05x}0000"))

        by_name = {t.name: t for t in targets}
        if {"pyraw", "pyoff", "pynull"} & set(by_name):
            ready = work / "serve.ready"
            extra = ["--workers", str(args.workers)] if args.workers else []
            if args.poll_us is not None:
                extra += ["--poll-us", str(args.poll_us)]
            serve = serve_daemon(run_dir, ready, extra, out / "tcmu-py-serve.log")
            daemons.append(serve)
            serve.start(ready=ready.exists, timeout=300)
            assert serve.proc is not None
            for name in ("pyraw", "pyoff", "pynull"):
                if name in by_name:
                    wait_serving(serve, by_name[name].backstore, 60)
                    server_pid[name] = serve.proc.pid
        if "runner" in by_name:
            Path("/run/dbus").mkdir(parents=True, exist_ok=True)
            run(["dbus-daemon", "--system", "--fork"], timeout=60)
            logdir = work / "runner-log"
            logdir.mkdir(exist_ok=True)
            runner = Daemon(["tcmu-runner", "--tcmu-log-dir", str(logdir)], out / "tcmu-runner.log")
            daemons.append(runner)
            runner.start()
            try:
                wait_serving(runner, by_name["runner"].backstore, 120)
                assert runner.proc is not None
                server_pid["runner"] = runner.proc.pid
            finally:
                with contextlib.suppress(OSError):
                    shutil.copy(logdir / "tcmu-runner.log", out / "tcmu-runner-file.log")

        for t in targets:
            export(t)
            t.dev = wait_for(lambda t=t: block_device(t), 180, f"block device of {t.name}")
            # Same block-layer settings for every target: no I/O scheduler.
            sched = Path("/sys/block") / t.dev.name / "queue" / "scheduler"
            with contextlib.suppress(OSError):
                write_attr(sched, "none")
            log(f"{t.name}: {t.dev}")

        env["attributes"] = {
            t.name: {
                k: read_attr(t.backstore / "attrib" / k)
                for k in ("hw_max_sectors", "emulate_write_cache", "hw_queue_depth", "block_size")
                if (t.backstore / "attrib" / k).exists()
            }
            | {
                "cache_type": sd_cache_type(t.dev),
                "max_sectors_kb": read_attr(
                    Path("/sys/block") / t.dev.name / "queue" / "max_sectors_kb"
                ),
            }
            for t in targets
            if t.dev is not None
        }
        env["serve_pid"] = serve.proc.pid if serve and serve.proc else None
        write_json(out / "env.json", env)

        for rep in range(args.reps):
            for wl in workloads:
                for t in targets:
                    assert t.dev is not None
                    before = daemon_counters(run_dir, t.name) if t.name.startswith("py") else None
                    pid = server_pid.get(t.name)
                    stats0 = proc_stats(pid) if pid else None
                    # Every userspace server's CPU, also while another target runs (idle cost).
                    servers = {n: p for n, p in server_pid.items() if n in ("pyraw", "runner")}
                    server_cpu0 = {n: proc_cpu_seconds(p) for n, p in servers.items()}
                    started = time.time()
                    rec: dict[str, Any] = {
                        "rep": rep,
                        "target": t.name,
                        "workload": wl.name,
                        "loadavg": Path("/proc/loadavg").read_text().split()[0],
                        "runtime_s": args.seconds + min(1.0, args.seconds / 4),
                    }
                    try:
                        rec.update(
                            fio(
                                t.dev,
                                wl,
                                args.seconds,
                                args.size_mib,
                                work / f"{t.name}-{wl.name}-{rep}.json",
                            )
                        )
                    except (RuntimeError, TimeoutError) as exc:
                        rec["failed"] = str(exc)
                        rc = 1
                    rec["wall"] = time.time() - started
                    if before is not None:
                        rec["daemon"] = counter_delta(before, daemon_counters(run_dir, t.name))
                    if stats0 is not None and pid:
                        stats1 = proc_stats(pid)
                        delta = {k: stats1[k] - stats0[k] for k in stats0}
                        rec["server_stats"] = delta
                        rec["daemon_cpu_s"] = delta["user_s"] + delta["sys_s"]
                    rec["server_cpu_s"] = {
                        ("tcmu-py" if n == "pyraw" else "tcmu-runner"): proc_cpu_seconds(p)
                        - server_cpu0[n]
                        for n, p in servers.items()
                    }
                    runs.append(rec)
                    write_json(out / "runs.json", runs)
                    log(
                        f"rep {rep} {wl.name} {t.name}: "
                        f"{rec.get('iops', 0):.0f} IOPS {rec.get('bw_bytes', 0) / MIB:.1f} MiB/s "
                        f"mean {rec.get('lat_mean_us', 0):.0f}us "
                        f"p99 {rec.get('lat_p99_us', 0):.0f}us"
                    )

        profiles = [w for w in WORKLOADS if w.name in args.profile.split(",")]
        if profiles and serve and serve.proc and "pyraw" in by_name and shutil.which("py-spy"):
            prof_runs = []
            for wl in profiles:
                t = by_name["pyraw"]
                assert t.dev is not None
                raw = out / f"profile-{wl.name}.txt"
                spy = py_spy_record(serve.proc.pid, max(int(args.seconds), 6) + 2, raw)
                time.sleep(1)
                rec = {"target": "pyraw", "workload": wl.name, "profiled": True}
                try:
                    rec.update(
                        fio(t.dev, wl, max(args.seconds, 6), args.size_mib, work / "prof.json")
                    )
                except (RuntimeError, TimeoutError) as exc:
                    rec["failed"] = str(exc)
                try:
                    spy_out, _ = spy.communicate(timeout=max(args.seconds, 6) + 120)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy_out, _ = spy.communicate()
                rec["py_spy"] = spy_out.decode(errors="replace")[-2000:]
                prof_runs.append(rec)
                write_json(out / "profile-runs.json", prof_runs)
        env["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
        write_json(out / "env.json", env)
    except Exception as exc:  # noqa: BLE001 - record, then clean up and report failure
        import traceback

        log("benchmark failed: " + "".join(traceback.format_exception(exc)))
        rc = 2
    finally:
        # LIO objects first, while the daemons still serve them (a stopped tcmu-py leaves its
        # devices blocked), then the daemons.
        teardown(targets)
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop(timeout=30)
        write_json(out / "done.json", {"rc": rc, "runs": len(runs)})
    return rc


if __name__ == "__main__":
    sys.exit(main())
