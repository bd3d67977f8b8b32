"""Host-side tests of the guest runner (guest_main.py) with throw-away scenarios: results are
written for passing, failing and hanging scenarios, a hang is killed at its deadline, and
cleanup stacks run. No VM needed (configfs is absent here, so teardown finds nothing)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import guest_main
import guestlib
import pytest


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, guestlib.Scenario]:
    reg: dict[str, guestlib.Scenario] = {}
    monkeypatch.setattr(guestlib, "discover_scenarios", lambda: reg)
    monkeypatch.setattr(guest_main, "CLEANUP_GRACE", 0.5)
    monkeypatch.setenv("TCMU_PY_SCRATCH", str(tmp_path / "scratch"))
    return reg


def _add(reg: dict[str, guestlib.Scenario], name: str, func: guestlib.ScenarioFunc,
         timeout: float = 10.0) -> None:
    reg[name] = guestlib.Scenario(name, func, timeout, "")


def test_runner_records_pass_fail_and_details(registry: dict, tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"

    def good(ctx: guestlib.Context) -> None:
        ctx.cleanup.callback(marker.write_text, "yes")
        ctx.details["answer"] = 42
        print("hello from good")
        (ctx.artifacts / "kept.txt").write_text("artifact")

    def bad(ctx: guestlib.Context) -> None:
        raise AssertionError("expected 1, found 2")

    _add(registry, "t.good", good)
    _add(registry, "t.bad", bad)
    results = tmp_path / "results"
    assert guest_main.run_all(results, None) == 1

    good_res = json.loads((results / "t.good.json").read_text())
    assert good_res["ok"] is True and good_res["details"] == {"answer": 42}
    assert "hello from good" in (results / "t.good.log").read_text()
    assert (results / "t.good" / "kept.txt").read_text() == "artifact"
    assert marker.read_text() == "yes"

    bad_res = json.loads((results / "t.bad.json").read_text())
    assert bad_res["ok"] is False and "expected 1, found 2" in bad_res["error"]
    done = json.loads((results / "_done.json").read_text())
    assert done == {"scenarios": ["t.good", "t.bad"], "failures": 1, "teardown_failures": []}
    assert (results / "_guest.json").exists()


def test_group_teardown_runs_after_the_modules_last_scenario(
        registry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module's group teardown runs once, after its last selected scenario and before the
    next module's first, even when that scenario failed; one that raises fails the run and is
    named in _done.json."""
    order = tmp_path / "order"
    order.write_text("")

    def note(what: str) -> None:
        order.write_text(order.read_text() + what + "\n")

    def step(ctx: guestlib.Context) -> None:
        note(ctx.name)
        if ctx.name == "g.second":
            raise AssertionError("failed")

    def teardown_g() -> None:
        note("teardown g")

    def teardown_h() -> None:
        note("teardown h")
        raise RuntimeError("daemons would not stop")

    monkeypatch.setattr(guestlib, "GROUP_TEARDOWNS", {"g": teardown_g, "h": teardown_h})
    for name in ("g.first", "g.second", "h.only", "k.other"):
        _add(registry, name, step)
    results = tmp_path / "results"
    assert guest_main.run_all(results, None) == 1
    assert order.read_text().split("\n")[:-1] == [
        "g.first", "g.second", "teardown g", "h.only", "teardown h", "k.other"]
    done = json.loads((results / "_done.json").read_text())
    assert done["teardown_failures"] == ["h"] and done["failures"] == 2
    assert "daemons would not stop" in (results / "_teardown-h.log").read_text()


def test_runner_kills_a_hung_scenario_at_its_deadline(registry: dict, tmp_path: Path) -> None:
    def hang(ctx: guestlib.Context) -> None:
        print("about to hang", flush=True)
        time.sleep(3600)

    _add(registry, "t.hang", hang, timeout=0.5)
    results = tmp_path / "results"
    start = time.monotonic()
    assert guest_main.run_all(results, ["t.hang"]) == 1
    assert time.monotonic() - start < 10
    res = json.loads((results / "t.hang.json").read_text())
    assert res["ok"] is False and "timed out" in res["error"]
    assert "about to hang" in (results / "t.hang.log").read_text()


def test_runner_selection_and_unknown_names(registry: dict, tmp_path: Path) -> None:
    _add(registry, "t.a", lambda ctx: None)
    _add(registry, "t.b", lambda ctx: None)
    results = tmp_path / "results"
    assert guest_main.run_all(results, ["t.b", "t.nope"]) == 1
    assert not (results / "t.a.json").exists()
    assert json.loads((results / "t.b.json").read_text())["ok"] is True
    assert "no scenario named" in json.loads((results / "t.nope.json").read_text())["error"]
    # An empty selection runs nothing (and succeeds); None means all.
    assert guest_main.run_all(tmp_path / "r2", []) == 0
    assert not (tmp_path / "r2" / "t.a.json").exists()
    assert guest_main.run_all(tmp_path / "r3", None) == 0
    assert (tmp_path / "r3" / "t.a.json").exists()


def test_wait_for_returns_value_or_times_out() -> None:
    calls = iter([None, 0, "", "found"])
    assert guestlib.wait_for(lambda: next(calls), 5, "the value") == "found"
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        guestlib.wait_for(lambda: None, 0.3, "nothing")
    assert 0.25 < time.monotonic() - start < 2


def test_daemon_start_fails_fast_when_the_process_dies(tmp_path: Path) -> None:
    d = guestlib.Daemon(["sh", "-c", "echo boom; exit 3"], tmp_path / "d.log")
    with pytest.raises(RuntimeError, match="exited with 3 before ready"):
        d.start(ready=lambda: False, timeout=10)


def test_daemon_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    d = guestlib.Daemon(["sh", "-c", "trap '' TERM; echo up; while :; do sleep 1; done"],
                        tmp_path / "d.log")
    d.start(ready=lambda: "up" in d.output(), timeout=10)
    start = time.monotonic()
    assert d.stop(timeout=0.5) == -9
    assert time.monotonic() - start < 5
    assert not d.running


def test_runner_budget_cuts_timeouts_and_skips_the_rest(
    registry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(ctx: guestlib.Context) -> None:
        time.sleep(3600)

    _add(registry, "t.slow", slow, timeout=600)
    _add(registry, "t.never", lambda ctx: None)
    monkeypatch.setattr(guest_main, "MIN_SCENARIO_TIME", 1.0)
    results = tmp_path / "results"
    start = time.monotonic()
    # The first scenario gets the 2 s that are left instead of its 600 s; after it (killed at
    # 2 s + 0.5 s grace) less than MIN_SCENARIO_TIME is left, so the second is not started.
    assert guest_main.run_all(results, None, budget=2.0) == 1
    assert time.monotonic() - start < 10
    slow_res = json.loads((results / "t.slow.json").read_text())
    assert slow_res["ok"] is False and "timed out after 2s" in slow_res["error"]
    never = json.loads((results / "t.never.json").read_text())
    assert never["ok"] is False and "budget of 2s was used up" in never["error"]
