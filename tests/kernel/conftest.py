"""Kernel tests: boot the lab VM ONCE per pytest session and run every selected scenario in it.

How it fits together:
- Scenarios are guest functions registered with ``@guestlib.scenario`` in tests/kernel/scenarios/.
- test_kernel_scenarios.py parametrizes one test per scenario; collection (including ``-k``)
  decides which scenarios the guest runs.
- The session fixture ``kernel_lab`` boots the VM with ``tcmu_py.lab.run_in_vm`` running
  guest_main.py, which writes ``results/kernel/<run>/<name>.json`` (+ ``.log`` and an artifacts
  dir) for each scenario through an ``--rwdir`` (``results/kernel/latest`` points at the newest
  run); each test then asserts on its own scenario's result.
- The VM not booting is a FAILURE of every kernel test, never a skip. Only an explicit
  ``TCMU_PY_NO_VM=1`` outside CI skips them (for machines without QEMU/the Debian kernel).

Environment knobs: TCMU_PY_NO_VM=1 (local opt-out), TCMU_PY_LAB_RESULTS (results directory,
default <repo>/results/kernel/<UTC time>-<pid>), TCMU_PY_LAB_MEMORY (guest memory, default 2G),
TCMU_PY_LAB_BUDGET (seconds for all scenarios together, default 3600).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import guestlib  # noqa: E402

from tcmu_py import lab  # noqa: E402

REPO = HERE.parent.parent
# Boot (about 20 s here under emulation when idle, 90 s when loaded) plus guest_main start-up
# and power-off, with a wide margin.
BOOT_ALLOWANCE = 300.0
# Seconds all scenarios together may take in the guest (TCMU_PY_LAB_BUDGET overrides). CI has 90
# minutes for bootstrap, linters, unit and kernel tests; scenarios past the budget are reported
# failed ("not run"), never silently dropped.
DEFAULT_BUDGET = 3600.0
# Run directories kept under results/kernel/ (older ones are deleted at session start).
KEEP_RUNS = 10
SELECTED = pytest.StashKey[list[str]]()


@dataclass
class LabRun:
    """Outcome of the session's VM run, queried by the tests."""

    results: Path
    console: Path
    error: str | None = None  # why the VM could not run / finish (all kernel tests fail)
    returncode: int | None = None
    wall_time: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)

    def console_tail(self, chars: int = 6000) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no console log)"

    def result(self, name: str) -> dict[str, Any]:
        """The scenario's result record; fails the calling test if there is none."""
        if self.error is not None:
            pytest.fail(f"kernel lab failed: {self.error}\n--- console tail ---\n"
                        f"{self.console_tail()}", pytrace=False)
        path = self.results / f"{name}.json"
        if not path.exists():
            pytest.fail(f"scenario {name} produced no result (guest exit {self.returncode})\n"
                        f"--- console tail ---\n{self.console_tail()}", pytrace=False)
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def check(self, name: str) -> dict[str, Any]:
        """Fail with the scenario's error and log tail unless it passed; return its details."""
        res = self.result(name)
        if not res["ok"]:
            log = self.results / f"{name}.log"
            tail = log.read_text(errors="replace")[-6000:] if log.exists() else "(no log)"
            pytest.fail(f"scenario {name} failed: {res['error']}\n"
                        f"{daemon_warnings(self.results / name)}"
                        f"--- guest log tail ({log}) ---\n{tail}", pytrace=False)
        done = self.results / "_done.json"
        module = name.split(".", 1)[0]
        if done.exists() and module in json.loads(done.read_text()).get("teardown_failures", []):
            log = self.results / f"_teardown-{module}.log"
            pytest.fail(f"the group teardown of {module} failed:\n"
                        f"{log.read_text(errors='replace')[-4000:] if log.exists() else ''}",
                        pytrace=False)
        details: dict[str, Any] = res["details"]
        return details


def daemon_warnings(artifacts: Path, lines: int = 30) -> str:
    """The WARNING, ERROR and CRITICAL lines of the logs a failed scenario left among its
    artifacts (its daemons' ``*.log``), the last `lines` of each, headed by the file's name:
    a run elsewhere (CI) shows only what the failure message prints, and a daemon's own
    account of a failure (a close that did not finish, a leg it gave up on) is there."""
    out = []
    for path in sorted(artifacts.glob("*.log")) if artifacts.is_dir() else []:
        found = [ln for ln in path.read_text(errors="replace").splitlines()
                 if any(f" {level} " in ln for level in ("WARNING", "ERROR", "CRITICAL"))]
        if found:
            out.append(f"--- {path.name}: warnings and errors (last {lines}) ---\n"
                       + "\n".join(ln[:400] for ln in found[-lines:]) + "\n")
    return "".join(out)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so the guest runs only what is left
def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember which scenarios were selected so the single VM boot runs exactly those.

    (collection_finish, not collection_modifyitems: only after every modifyitems hook, -k and -m
    included, is ``session.items`` the final selection.)"""
    selected: list[str] = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "scenario_name" in callspec.params:
            selected.append(callspec.params["scenario_name"])
    session.config.stash[SELECTED] = selected


def _opted_out() -> bool:
    if os.environ.get("TCMU_PY_NO_VM") != "1":
        return False
    if os.environ.get("CI"):
        pytest.fail("TCMU_PY_NO_VM=1 is not honoured in CI: kernel tests must run", pytrace=False)
    return True


_LAB_RUN = pytest.StashKey[LabRun]()


@pytest.fixture(scope="session")
def lab_results() -> Path:
    """This pytest session's results directory (see ``_results_dir``); created on first use."""
    return _results_dir()


@pytest.fixture(scope="session")
def kernel_lab(request: pytest.FixtureRequest, lab_results: Path) -> LabRun:
    config = request.config
    names = config.stash.get(SELECTED, [])
    budget = float(os.environ.get("TCMU_PY_LAB_BUDGET", DEFAULT_BUDGET))
    run = boot_scenarios(names, lab_results, budget=budget)
    config.stash[_LAB_RUN] = run
    return run


def boot_scenarios(names: list[str], results: Path, *, budget: float = DEFAULT_BUDGET,
                   disks: tuple[Path, ...] = ()) -> LabRun:
    """Boot the lab VM once, run the named scenarios in it (guest_main.py --only), and return
    the outcome. ``disks`` are attached as /dev/vda, ... (``tcmu_py.lab.run_in_vm``). A VM that
    ends without guest_main's ``_done.json`` is recorded in ``LabRun.error`` (a scenario may end
    the VM on purpose; its host test then reads the files it left instead)."""
    if _opted_out():
        pytest.skip("TCMU_PY_NO_VM=1: kernel lab disabled on this machine")
    registry = guestlib.discover_scenarios()
    results.mkdir(parents=True, exist_ok=True)
    run = LabRun(results=results, console=results / "console.log")
    wanted = sum(registry[n].timeout + 30.0 for n in names if n in registry)  # 30: cleanup grace
    timeout = BOOT_ALLOWANCE + min(wanted, budget + 60.0)
    script = (
        lab.guest_prelude()
        + f"cd {_q(REPO)}\n"
        + f"exec {_q(sys.executable)} {_q(HERE / 'guest_main.py')} --results {_q(results)} "
        + f"--budget {budget:g} "
        + "--only " + " ".join(_q(n) for n in names) + "\n"
    )
    start = time.monotonic()
    try:
        proc = lab.run_in_vm(
            script,
            rwdirs=[results],
            disks=disks,
            memory=os.environ.get("TCMU_PY_LAB_MEMORY", "2G"),
            timeout=timeout,
            log=run.console,
            cwd=REPO,
        )
        run.returncode = proc.returncode
        if not (results / "_done.json").exists():
            run.error = f"guest did not finish its scenarios (vng exit {proc.returncode})"
    except lab.LabError as e:
        run.error = f"cannot run the VM lab here: {e}"
    except lab.LabTimeout as e:
        run.error = f"VM killed after {e.timeout:g}s without finishing"
    run.wall_time = time.monotonic() - start
    facts = results / "_guest.json"
    if facts.exists():
        run.facts = json.loads(facts.read_text())
    return run


#: The host image files of the power-loss tests, attached to every boot of the chain in this
#: order (/dev/vda, /dev/vdb, /dev/vdc; each scenario module names its own): sparse sizes.
POWER_LOSS_DISKS = (("dedup-disk.img", 512 << 20),     # vda: dedup_reboot (the pool, ext4)
                    ("restore-disk.img", 512 << 20),   # vdb: targetcli_restore (64 MiB image)
                    ("library-disk.img", 1 << 30),     # vdc: vtl_reboot (a few tens of MiB)
                    ("mirror-disk.img", 512 << 20))    # vdd: mirror_reboot (3 leg images)
#: The four power-loss tests in four boots instead of two each. Three "before" halves leave work
#: in flight for the cut (a tape drive's unterminated blocks; fio on the dedup disk and on the
#: mirror), each with its own `tcmu-py serve`; two daemons in one boot would both claim every
#: device of the subtypes they serve, so a boot holds one cut. Each boot runs its scenarios in
#: registry order and the one that ends it (``sysrq b``) must come last (checked); targetcli's
#: saveconfig half ends normally (it syncs) and the reset that follows in the same boot is its
#: reboot.
POWER_LOSS_CHAIN: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("dedup_reboot.before_power_loss",), "dedup_reboot.before_power_loss"),
    (("dedup_reboot.after_power_loss", "mirror_reboot.before_power_loss"),
     "mirror_reboot.before_power_loss"),
    (("mirror_reboot.after_power_loss", "targetcli_restore.before_reboot",
      "vtl_reboot.before_power_loss"), "vtl_reboot.before_power_loss"),
    (("targetcli_restore.after_reboot", "vtl_reboot.after_power_loss"), None),
)

#: The "before" scenario of each "after" one.
POWER_LOSS_BEFORE = {
    "dedup_reboot.after_power_loss": "dedup_reboot.before_power_loss",
    "mirror_reboot.after_power_loss": "mirror_reboot.before_power_loss",
    "targetcli_restore.after_reboot": "targetcli_restore.before_reboot",
    "vtl_reboot.after_power_loss": "vtl_reboot.before_power_loss",
}


@pytest.fixture(scope="session")
def power_loss_chain(request: pytest.FixtureRequest, lab_results: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> PowerLossChain:
    """The power-loss boots, once per session for every selected test that asks for them (its
    module's BEFORE and AFTER scenarios run; `PowerLossChain`)."""
    wanted: set[str] = set()
    for item in request.session.items:
        if "power_loss_chain" in getattr(item, "fixturenames", ()):
            module: Any = getattr(item, "module", None)
            wanted.update((module.BEFORE, module.AFTER))
    return boot_power_loss_chain(lab_results / "power-loss",
                                 tmp_path_factory.mktemp("power-loss-disks"), wanted)


@dataclass
class PowerLossChain:
    """The boots of `POWER_LOSS_CHAIN` (``boots[i]`` ran ``POWER_LOSS_CHAIN[i]``); each test
    checks its own pair of scenarios with `check`."""

    results: Path
    #: The boots that ran, by index in POWER_LOSS_CHAIN.
    boots: dict[int, LabRun]
    #: Index of the boot of each scenario.
    boot_of: dict[str, int]
    #: Whether boot i ended in the reset (no ``_done.json``).
    reset: dict[int, bool]

    def check(self, before: str, after: str) -> dict[str, Any]:
        """``before`` left ``expected.json`` (and passed, if it ended normally), the boot it
        ran in ended in a reset, and ``after`` passed in a later boot: ``after``'s details."""
        first = self.boots[self.boot_of[before]]
        expected = self.results / before / "expected.json"
        if (self.results / f"{before}.json").exists():
            first.check(before)  # it ended normally (targetcli's) or failed before the cut
        if not expected.exists():
            pytest.fail(f"{before} left no {expected.name} (it ends its boot with the reset)\n"
                        f"--- console tail ({first.console}) ---\n{first.console_tail()}",
                        pytrace=False)
        assert self.reset[self.boot_of[before]], (
            f"the boot that ran {before} finished its scenarios: the reset did not happen")
        return self.boots[self.boot_of[after]].check(after)


def boot_power_loss_chain(results: Path, workdir: Path, wanted: set[str]) -> PowerLossChain:
    """Create the `POWER_LOSS_DISKS` (sparse, in ``workdir``) and boot `POWER_LOSS_CHAIN` for the
    ``wanted`` scenarios, every boot with all the disks, each boot's console kept as
    ``console-<i>.log``. A boot with none of them is left out; one whose "before" scenarios owe
    their reboot to its cut runs the cut too. An "after" scenario whose "before" left no
    ``expected.json`` is not run (its test reports why)."""
    results.mkdir(parents=True, exist_ok=True)
    disks: list[Path] = []
    for name, size in POWER_LOSS_DISKS:
        disk = workdir / name
        with open(disk, "wb") as f:
            f.truncate(size)
        disks.append(disk)
    registry = list(guestlib.discover_scenarios())
    chain = PowerLossChain(results, {}, {}, {})
    for i, (names, cut) in enumerate(POWER_LOSS_CHAIN):
        order = sorted(names, key=registry.index)  # guest_main's order
        if cut is not None and order[-1] != cut:
            pytest.fail(f"boot {i}: {cut} ends the VM but runs before {order[-1]}: rename or "
                        "regroup POWER_LOSS_CHAIN", pytrace=False)
        chain.boot_of.update(dict.fromkeys(names, i))
        run_names = [n for n in order if n in wanted and (
            n not in POWER_LOSS_BEFORE
            or (results / POWER_LOSS_BEFORE[n] / "expected.json").exists())]
        if cut is not None and cut not in run_names and any(
                n in POWER_LOSS_BEFORE.values() for n in run_names):
            run_names.append(cut)  # last in guest_main's order (checked above)
        if not run_names:
            continue
        (results / "_done.json").unlink(missing_ok=True)
        run = boot_scenarios(run_names, results, disks=tuple(disks))
        # Reset: the VM ended by itself (not killed at its timeout) without guest_main's end.
        chain.reset[i] = run.returncode is not None and not (results / "_done.json").exists()
        if chain.reset[i] and cut in run_names:
            run.error = None  # the planned end; what ran before the cut is in its results
        console = results / f"console-{i}.log"
        if run.console.exists():
            os.replace(run.console, console)
        run.console = console
        chain.boots[i] = run
    return chain


def _results_dir() -> Path:
    """A fresh directory for this session's results: TCMU_PY_LAB_RESULTS (emptied), or
    results/kernel/<UTC time>-<pid> (several sessions may run kernel tests in one checkout at
    once), with results/kernel/latest pointing at it. Older run directories beyond the newest
    KEEP_RUNS are removed."""
    explicit = os.environ.get("TCMU_PY_LAB_RESULTS")
    if explicit:
        results = Path(explicit).resolve()
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        return results
    base = REPO / "results" / "kernel"
    base.mkdir(parents=True, exist_ok=True)
    results = base / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    results.mkdir()
    latest = base / "latest"
    tmp_link = base / f".latest-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(results.name)
    tmp_link.replace(latest)  # atomic: concurrent sessions never see a missing link
    runs = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    for old in runs[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    return results


def _q(value: object) -> str:
    return shlex.quote(str(value))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_LAB_RUN, None)
    if run is None:
        return
    tr = terminalreporter
    tr.section("kernel lab")
    boot = run.facts.get("uptime_at_start")
    tr.write_line(
        f"kernel {run.facts.get('kernel', '?')}: VM wall time {run.wall_time:.1f}s, "
        f"guest uptime when scenarios started {boot if boot is not None else '?'}s, "
        f"results in {run.results}"
    )
    if run.error:
        tr.write_line(f"lab error: {run.error}")
    for path in sorted(run.results.glob("*.json")):
        if path.name.startswith("_"):
            continue
        res = json.loads(path.read_text())
        cpu = res.get("cpu")
        busy = (f", guest CPUs {cpu['busy'] / (res['duration'] * cpu['cpus']):.0%} busy"
                if cpu and res["duration"] > 0 else "")
        tr.write_line(f"  {res['name']}: {'ok' if res['ok'] else 'FAILED'} "
                      f"in {res['duration']:.1f}s{busy}")
