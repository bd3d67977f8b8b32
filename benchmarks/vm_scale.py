"""Device scaling in the VM lab (issue 17): one device against four served by one daemon.

    .venv/bin/python benchmarks/vm_scale.py [--seconds 5] [--reps 2] [--size-mib 64]

Issue 17's aim: "four devices served by one daemon reach >= 1.6x the aggregate IOPS of one".
One VM boot (vm_bench.boot_guest) runs benchmarks/vm_scale_guest.py, which measures fio
(libaio, direct, 4 KiB random read and write at QD32, time-bounded) through tcm_loop on ONE
device and on all FOUR at once (one job per device, summed), for three servers of the same raw
images on the guest's tmpfs (emulate_write_cache=1):

    py-native   tcmu-py serve (default: the native loop, a C thread per device owns its ring)
    py-stage1   tcmu-py serve --no-native-loop (the data plane in each device's Python loop
                thread: the devices share the GIL)
    runner      tcmu-runner (Debian's package), `qcow` handler on the raw images

The host side takes medians over --reps and reports, per server and workload, the IOPS of one
device, the aggregate IOPS of four and their ratio, with CPU use (the serving process's and the
whole guest's) to tell what limits the scaling.

Output, in results/vm_scale/<UTC time>/: ``guest/`` (raw figures, daemon logs), ``summary.json``
and ``table.md``; ``--analyze DIR`` re-does the host side of an earlier run without booting.
Absolute numbers are from software emulation (QEMU TCG on a shared host); the guest's vCPU count
bounds what four devices can reach and is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from vm_bench import _fmt, _fx, _median, _ratio, boot_guest, host_facts  # noqa: E402

GUEST_SCRIPT = REPO / "benchmarks" / "vm_scale_guest.py"
SERVERS = ("py-native", "py-stage1", "runner")
SERVER_LABELS = {
    "py-native": "tcmu-py (native loop)",
    "py-stage1": "tcmu-py --no-native-loop",
    "runner": "tcmu-runner qcow",
}
WORKLOADS = ("randread-4k-qd32", "randwrite-4k-qd32")
AIM = 1.6


def aggregate(runs: list[dict[str, Any]], devices: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {server: entry}}``: medians over the repetitions of the one-device and the
    ``devices``-device runs (IOPS, mean latency, server CPU in cores, guest CPU busy share),
    and ``ratio``: aggregate IOPS of ``devices`` / IOPS of one."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if "failed" not in r:
            groups[(r["workload"], r["target"], r["devices"])].append(r)
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (wl, server, count), rs in groups.items():
        entry = table[wl].setdefault(server, {})
        key = "one" if count == 1 else "many"
        entry[key] = {
            "iops": _median([r["iops"] for r in rs]),
            "lat_mean_us": _median([r["lat_mean_us"] for r in rs]),
            "server_cores": _median([r["server_cpu_s"] / r["runtime_s"] for r in rs]),
            "guest_busy": _median([r["guest_busy"] for r in rs if r.get("guest_busy") is not None]),
            "iops_reps": [round(r["iops"]) for r in rs],
            "n": len(rs),
        }
        if count != 1:
            shares = [
                min(c.values()) / max(c.values())
                for r in rs
                if (c := r.get("device_commands")) and max(c.values()) > 0
            ]
            if shares:
                entry[key]["min_max_device_share"] = _median(shares)
            # Per rank (busiest thread first, thread ids differ between runs): the median
            # cores, named after that rank's thread in the first repetition.
            ranked = [
                sorted(
                    ((s / r["runtime_s"], name.split("/")[0])
                     for name, s in r.get("server_threads_cpu_s", {}).items()),
                    reverse=True,
                )
                for r in rs
            ]
            depth = min((len(x) for x in ranked), default=0)
            entry[key]["thread_cores"] = [
                (ranked[0][i][1], round(_median([x[i][0] for x in ranked]), 3))
                for i in range(depth)
            ]
    for servers in table.values():
        for entry in servers.values():
            one, many = entry.get("one"), entry.get("many")
            entry["ratio"] = _ratio(many["iops"], one["iops"]) if one and many else None
    return {wl: dict(s) for wl, s in table.items()}


def render_table(table: dict[str, dict[str, dict[str, Any]]], devices: int) -> str:
    lines = [
        f"| workload | server | IOPS, 1 device | IOPS, {devices} devices | ratio | aim "
        f"≥ {AIM}× | mean µs 1 / {devices} | server CPU cores 1 / {devices} | "
        f"guest CPU busy 1 / {devices} |",
        "|" + "---|" * 9,
    ]
    for wl in WORKLOADS:
        for server in SERVERS:
            e = table.get(wl, {}).get(server)
            if e is None:
                continue
            one, many = e.get("one", {}), e.get("many", {})
            ratio = e.get("ratio")
            met = "–" if ratio is None else ("met" if ratio >= AIM else "not met")
            lines.append(
                f"| {wl} | {SERVER_LABELS[server]} | {_fmt(one.get('iops'))} | "
                f"{_fmt(many.get('iops'))} | {_fx(ratio)} | {met} | "
                f"{_fmt(one.get('lat_mean_us'))} / {_fmt(many.get('lat_mean_us'))} | "
                f"{_fmt(one.get('server_cores'), 2)} / {_fmt(many.get('server_cores'), 2)} | "
                f"{_pct(one.get('guest_busy'))} / {_pct(many.get('guest_busy'))} |"
            )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.0f}%"


def render_threads(table: dict[str, dict[str, dict[str, Any]]], devices: int) -> str:
    """The busiest threads of each server in the multi-device runs (cores, busiest first)."""
    out = []
    for wl in WORKLOADS:
        for server in SERVERS:
            many = table.get(wl, {}).get(server, {}).get("many")
            if not many:
                continue
            top = many.get("thread_cores", [])[:8]
            share = many.get("min_max_device_share")
            out.append(
                f"- {wl}, {SERVER_LABELS[server]}, {devices} devices: "
                + ", ".join(f"`{k}` {v:.2f}" for k, v in top)
                + (f"; least / most busy device {share:.2f}" if share is not None else "")
            )
    return "\n".join(out)


def analyze(run_dir: Path, argv_line: str) -> int:
    guest = run_dir / "guest"
    runs = json.loads((guest / "runs.json").read_text()) if (guest / "runs.json").exists() else []
    if not runs:
        print(f"no runs recorded in {guest}", file=sys.stderr)
        return 1
    env = json.loads((guest / "env.json").read_text()) if (guest / "env.json").exists() else {}
    host_file = run_dir / "host.json"
    host = json.loads(host_file.read_text()) if host_file.exists() else {}
    devices = int(env.get("devices", 4))
    table = aggregate(runs, devices)
    failed = [
        f"{r['target']}/{r['workload']} x{r['devices']} rep {r['rep']}: {r['failed'][:200]}"
        for r in runs
        if "failed" in r
    ]
    summary = {"host": host, "guest": env, "table": table, "failed": failed, "aim": AIM}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    planes = env.get("plane", {})
    plane_lines = [
        f"  - {mode}: " + ", ".join(f"{d} {p}" for d, p in sorted(devs.items()))
        for mode, devs in planes.items()
    ]
    parts = [
        f"Command: `{host.get('command', argv_line)}`",
        "",
        f"- host: {host.get('host_cpu')}, {host.get('host_cpus')} CPUs, shared; load average "
        f"{host.get('host_loadavg')} at start, {host.get('host_loadavg_end', '?')} at end; "
        f"commit {host.get('commit')}",
        f"- guest: {host.get('qemu')}, kernel {env.get('kernel')}, **{env.get('cpus')} vCPUs**, "
        f"{int(env.get('mem_total_kib', 0)) // 1024} MiB; {env.get('fio')}; "
        f"{env.get('tcmu_runner')}",
        f"- {devices} images of {env.get('size_mib')} MiB on tmpfs, one tcmu-py raw and one "
        f"tcmu-runner qcow device on each, emulate_write_cache=1, tcm_loop; each fio run "
        f"{env.get('seconds')} s (+ ramp), {env.get('reps')} repetitions, median reported",
        "- tcmu-py's data plane per device, as `tcmu-py status` reported it after each start:",
        *plane_lines,
        "",
        render_table(table, devices),
        "",
        f"Busiest threads of each server in the {devices}-device runs (cores, median per rank; "
        "tcmu-py's threads, native loops included, are all named `python`):",
        "",
        render_threads(table, devices),
    ]
    if failed:
        parts += ["", "Failed runs:", *[f"- {f}" for f in failed]]
    md = "\n".join(parts)
    (run_dir / "table.md").write_text(md + "\n")
    print(md)
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="fio runtime per run (default 5)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions (default 2; median)")
    ap.add_argument("--size-mib", type=int, default=64, help="size of each image (default 64)")
    ap.add_argument("--devices", type=int, default=4, help="devices in the many-device runs")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-runner", action="store_true", help="skip tcmu-runner")
    ap.add_argument("--memory", default="3G", help="guest memory (default 3G)")
    ap.add_argument("--cpus", type=int, default=None, help="guest vCPUs (default: vng's)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "vm_scale")
    ap.add_argument("--analyze", type=Path, default=None, help="re-analyze an earlier run dir")
    args = ap.parse_args(argv)
    argv_line = ".venv/bin/python benchmarks/vm_scale.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    if args.analyze is not None:
        return analyze(args.analyze.resolve(), argv_line)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = (args.out / stamp).resolve()
    guest = run_dir / "guest"
    guest.mkdir(parents=True)
    host = host_facts()
    host["command"] = argv_line
    (run_dir / "host.json").write_text(json.dumps(host, indent=2))
    n_wl = len(args.workloads.split(","))
    n_runs = args.reps * n_wl * 2 * (2 if args.no_runner else 3)
    # Boot, images, daemons and one serve restart per repetition, then every run (ramp, fio
    # start-up under emulation).
    timeout = 600 + args.reps * 120 + n_runs * (args.seconds + 30)
    guest_argv = [
        sys.executable,
        str(GUEST_SCRIPT),
        "--out",
        str(guest),
        "--seconds",
        f"{args.seconds:g}",
        "--reps",
        str(args.reps),
        "--size-mib",
        str(args.size_mib),
        "--devices",
        str(args.devices),
        "--workloads",
        args.workloads,
    ] + (["--no-runner"] if args.no_runner else [])
    print(
        f"booting the lab VM ({n_runs} runs of {args.seconds:g} s; timeout {timeout:.0f} s); "
        f"console log: {run_dir / 'console.log'}",
        flush=True,
    )
    rc = boot_guest(guest_argv, run_dir, guest, args.memory, args.cpus, timeout, "vm_scale")
    if rc is None:
        return 2
    host["host_loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (run_dir / "host.json").write_text(json.dumps(host, indent=2))
    return rc or analyze(run_dir, argv_line)


if __name__ == "__main__":
    sys.exit(main())
