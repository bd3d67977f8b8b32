"""Guest-side runner: executes kernel scenarios inside the lab VM and writes one result each.

Started by tests/kernel/conftest.py (via tcmu_py.lab.run_in_vm, after guest_prelude()) as

    python guest_main.py --results DIR [--only NAME ...]

For every selected scenario, in registry order, it starts a child process
(``guest_main.py --run-one NAME``) whose output goes to ``DIR/NAME.log``, kills its process group
if it outlives the scenario's timeout, then removes any LIO objects left behind. Each scenario
ends with ``DIR/NAME.json``::

    {"name": ..., "ok": bool, "error": str | null, "details": {...}, "duration": float,
     "leaked": [configfs paths removed after it]}

``DIR/_guest.json`` records facts about the guest (kernel, modules, udev, uptime at start) and
``DIR/_done.json`` is written last, so the host can tell a finished run from a crashed guest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestlib  # noqa: E402

# Extra seconds a child gets beyond its scenario timeout to unwind its cleanup stack.
CLEANUP_GRACE = 30.0


def write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(path)


def guest_facts() -> dict[str, object]:
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    modules = sorted(line.split()[0] for line in Path("/proc/modules").read_text().splitlines())
    udevd = any(
        Path(p, "comm").read_text().strip() == "systemd-udevd"
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and Path(p, "comm").exists()
    )
    return {
        "kernel": os.uname().release,
        "uptime_at_start": uptime,
        "modules": modules,
        "udevd_running": udevd,
        "configfs_target": guestlib.CORE.is_dir(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def run_one(name: str, results: Path) -> int:
    """Child process: run one scenario with its cleanup stack; write NAME.json."""
    scen = guestlib.discover_scenarios()[name]
    scratch = Path(os.environ.get("TCMU_PY_SCRATCH", "/tmp/scratch"))
    workdir = scratch / name
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = results / name
    artifacts.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ctx = guestlib.Context(
        name=name,
        workdir=workdir,
        artifacts=artifacts,
        deadline=start + scen.timeout,
        cleanup=guestlib.Cleanup(),
    )
    error: str | None = None
    guestlib.log(f"=== scenario {name} (timeout {scen.timeout:g}s)")
    try:
        with ctx.cleanup:
            scen.func(ctx)
    except BaseException:  # noqa: BLE001 - every failure, including SystemExit, is a result
        error = traceback.format_exc()
        guestlib.log(error)
    duration = time.monotonic() - start
    guestlib.log(f"=== {name}: {'ok' if error is None else 'FAILED'} in {duration:.1f}s")
    write_json(
        results / f"{name}.json",
        {"name": name, "ok": error is None, "error": error, "details": ctx.details,
         "duration": duration, "leaked": []},
    )
    return 0 if error is None else 1


def run_all(results: Path, only: list[str]) -> int:
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "_guest.json", guest_facts())
    registry = guestlib.discover_scenarios()
    unknown = [n for n in only if n not in registry]
    names = [n for n in registry if not only or n in only]
    failures = 0
    for name in unknown:
        write_json(results / f"{name}.json",
                   {"name": name, "ok": False, "error": f"no scenario named {name}",
                    "details": {}, "duration": 0.0, "leaked": []})
        failures += 1
    for name in names:
        failures += run_child(name, registry[name].timeout, results)
    write_json(results / "_done.json", {"scenarios": names, "failures": failures})
    return 0 if failures == 0 else 1


def run_child(name: str, timeout: float, results: Path) -> int:
    result_path = results / f"{name}.json"
    log_path = results / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--results", str(results), "--run-one", name],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout + CLEANUP_GRACE)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if result_path.exists() and not timed_out:
        result = json.loads(result_path.read_text())
    else:
        why = (f"timed out after {timeout:g}s (+{CLEANUP_GRACE:g}s cleanup grace); killed"
               if timed_out else f"scenario process died with status {proc.returncode}")
        result = {"name": name, "ok": False, "error": why, "details": {},
                  "duration": time.monotonic() - start, "leaked": []}
    # Whatever the scenario left behind would disturb the next one: remove it, and fail a
    # scenario that passed but leaked (its cleanup is incomplete).
    try:
        leaked = guestlib.teardown_all()
    except OSError as e:
        leaked = [f"teardown failed: {e}"]
    if leaked:
        result["leaked"] = leaked
        if result["ok"]:
            result["ok"] = False
            result["error"] = f"scenario left LIO objects behind: {leaked}"
    write_json(result_path, result)
    return 0 if result["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--run-one")
    args = ap.parse_args()
    if args.run_one:
        return run_one(args.run_one, args.results)
    return run_all(args.results, args.only)


if __name__ == "__main__":
    sys.exit(main())
