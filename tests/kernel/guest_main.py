"""Guest-side runner: executes kernel scenarios inside the lab VM and writes one result each.

Started by tests/kernel/conftest.py (via tcmu_py.lab.run_in_vm, after guest_prelude()) as

    python guest_main.py --results DIR [--budget SECONDS] [--only NAME ...]

For every selected scenario, in registry order, it forks a child (own session) whose output goes
to ``DIR/NAME.log``, kills its process group if it outlives the scenario's timeout, then removes
any LIO objects left behind. (``--run-one NAME`` runs a single scenario in-process.) Each scenario
ends with ``DIR/NAME.json``::

    {"name": ..., "ok": bool, "error": str | null, "details": {...}, "duration": float,
     "leaked": [configfs paths removed after it], "cpu": {"busy": s, "idle": s, "cpus": n}}

``cpu``: the guest's CPU seconds (all CPUs together, /proc/stat) busy and idle (iowait counted
as idle) while the scenario ran; busy / (duration x cpus) tells how much of the VM's CPUs it
kept busy, whatever else ran on the host (a descheduled vCPU's time is not counted as idle).

A module's ``@guestlib.group_teardown`` function runs in this process after the last selected
scenario of that module; an exception there is written to ``DIR/_teardown-MODULE.log`` and
fails the run (``_done.json`` lists it under ``teardown_failures``).

``DIR/_guest.json`` records facts about the guest (kernel, modules, udev, uptime at start) and
``DIR/_done.json`` is written last, so the host can tell a finished run from a crashed guest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestlib  # noqa: E402

# Extra seconds a child gets beyond its scenario timeout to unwind its cleanup stack.
CLEANUP_GRACE = 30.0
# A scenario is not started with less than this left of the run's budget.
MIN_SCENARIO_TIME = 30.0


def write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(path)


def guest_facts() -> dict[str, object]:
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    proc_modules = Path("/proc/modules")  # absent on kernels without module support
    lines = proc_modules.read_text().splitlines() if proc_modules.exists() else []
    modules = sorted(line.split()[0] for line in lines)
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


def cpu_times() -> tuple[float, float]:
    """(busy, idle) seconds of all the guest's CPUs together since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / hz, idle / hz


def run_one(name: str, results: Path, timeout: float | None = None) -> int:
    """Run one scenario (in the current process) with its cleanup stack; write NAME.json.
    ``timeout`` (default: the scenario's own) sets ``ctx.deadline``."""
    scen = guestlib.discover_scenarios()[name]
    timeout = scen.timeout if timeout is None else timeout
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
        deadline=start + timeout,
        cleanup=guestlib.Cleanup(),
    )
    error: str | None = None
    guestlib.log(f"=== scenario {name} (timeout {timeout:g}s)")
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


def run_all(results: Path, only: list[str] | None, budget: float | None = None) -> int:
    """Run the scenarios named in ``only`` (if None: all but those that need a boot of their
    own; none if empty); 0 if all passed.

    ``budget``: seconds for all of them together. Each scenario's timeout is cut to what is left,
    and scenarios that find less than MIN_SCENARIO_TIME left are not started (reported failed),
    so an overlong run still ends with every result written instead of a killed VM.
    """
    budget_end = time.monotonic() + budget if budget is not None else None
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "_guest.json", guest_facts())
    registry = guestlib.discover_scenarios()
    unknown = [n for n in only or [] if n not in registry]
    names = [n for n, sc in registry.items()
             if (n in only if only is not None else not sc.own_boot)]
    failures = 0
    for name in unknown:
        write_json(results / f"{name}.json",
                   {"name": name, "ok": False, "error": f"no scenario named {name}",
                    "details": {}, "duration": 0.0, "leaked": []})
        failures += 1
    teardown_failures: list[str] = []
    for i, name in enumerate(names):
        module = name.split(".", 1)[0]
        if i + 1 == len(names) or names[i + 1].split(".", 1)[0] != module:
            after: str | None = module  # the group's last scenario: its teardown follows
        else:
            after = None
        failures += _run_within_budget(name, registry, budget_end, budget, results)
        if (after is not None and after in guestlib.GROUP_TEARDOWNS
                and not _group_teardown(after, results)):
            teardown_failures.append(after)
    failures += len(teardown_failures)
    write_json(results / "_done.json", {"scenarios": names, "failures": failures,
                                        "teardown_failures": teardown_failures})
    return 0 if failures == 0 else 1


def _group_teardown(module: str, results: Path) -> bool:
    """Run ``module``'s group teardown here; False (traceback in its log) if it raised."""
    guestlib.log(f"=== group teardown of {module}")
    start = time.monotonic()
    try:
        guestlib.GROUP_TEARDOWNS[module]()
    except Exception:  # noqa: BLE001 - reported, the run goes on
        (results / f"_teardown-{module}.log").write_text(traceback.format_exc())
        guestlib.log(traceback.format_exc())
        return False
    guestlib.log(f"=== group teardown of {module}: done in {time.monotonic() - start:.1f}s")
    return True


def _run_within_budget(name: str, registry: dict[str, guestlib.Scenario],
                       budget_end: float | None, budget: float | None, results: Path) -> int:
    """Run scenario ``name`` with its timeout cut to what is left of the budget (or record it
    not run); 1 if it failed."""
    timeout = registry[name].timeout
    if budget_end is not None:
        left = budget_end - time.monotonic()
        if left < MIN_SCENARIO_TIME:
            write_json(results / f"{name}.json",
                       {"name": name, "ok": False, "duration": 0.0, "details": {},
                        "error": f"not run: the lab's time budget of {budget:g}s was used up",
                        "leaked": []})
            return 1
        timeout = min(timeout, left)
    return run_child(name, timeout, results)




def run_child(name: str, timeout: float, results: Path) -> int:
    result_path = results / f"{name}.json"
    log_path = results / f"{name}.log"
    start = time.monotonic()
    cpu_start = cpu_times()
    # fork rather than a new interpreter: Python start-up costs seconds under emulation, and the
    # scenario modules are already imported here.
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: own session (so the whole group can be killed), output to the log
        rc = 70
        try:
            os.setsid()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            # Rebind in case sys.stdout/err were not fds 1/2 (e.g. under pytest's capture).
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            rc = run_one(name, results, timeout)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    timed_out = False
    deadline = start + timeout + CLEANUP_GRACE
    status = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    returncode = os.waitstatus_to_exitcode(status)
    cpu_end = cpu_times()
    if result_path.exists() and not timed_out:
        result = json.loads(result_path.read_text())
    else:
        why = (f"timed out after {timeout:.0f}s (+{CLEANUP_GRACE:g}s cleanup grace); killed"
               if timed_out else f"scenario process died with status {returncode}")
        result = {"name": name, "ok": False, "error": why, "details": {},
                  "duration": time.monotonic() - start, "leaked": []}
    # Whatever the scenario left behind would disturb the next one: remove it, and fail a
    # scenario that passed but leaked (its cleanup is incomplete).
    try:
        leaked = guestlib.teardown_all()
    except OSError as e:
        leaked = [f"teardown failed: {e}"]
    result["cpu"] = {"busy": round(cpu_end[0] - cpu_start[0], 1),
                     "idle": round(cpu_end[1] - cpu_start[1], 1), "cpus": os.cpu_count()}
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
    ap.add_argument("--only", nargs="*", default=None, help="scenarios to run (default all)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all scenarios")
    ap.add_argument("--run-one")
    args = ap.parse_args()
    if args.run_one:
        return run_one(args.run_one, args.results)
    return run_all(args.results, args.only, args.budget)


if __name__ == "__main__":
    sys.exit(main())
