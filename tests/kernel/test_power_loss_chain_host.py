"""Host-side tests of conftest's power-loss chain with a fake boot (no VM): which boots run for
which selection, the cut appended for a "before" that owes its reboot to it, and how a reset,
a missing expected.json and a failed scenario reach each test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import conftest
import pytest
from conftest import LabRun, PowerLossChain

CUTS = {cut for _, cut in conftest.POWER_LOSS_CHAIN if cut is not None}


def _fake_boot(booted: list[list[str]],
               fail: frozenset[str] = frozenset()) -> Callable[..., LabRun]:
    """A boot_scenarios stand-in: each "before" leaves expected.json unless in ``fail``; a cut
    ends the boot without _done.json; other scenarios write their result JSON."""

    def boot(names: list[str], results: Path, **_: object) -> LabRun:
        booted.append(list(names))
        results.mkdir(parents=True, exist_ok=True)
        run = LabRun(results=results, console=results / "console.log")
        run.console.write_text("console\n")
        run.returncode = 0
        for name in names:
            ok = name not in fail
            if ok and name in conftest.POWER_LOSS_BEFORE.values():
                (results / name).mkdir(exist_ok=True)
                (results / name / "expected.json").write_text("{}")
            if ok and name in CUTS:
                run.error = "guest did not finish its scenarios (vng exit 0)"
                return run
            (results / f"{name}.json").write_text(json.dumps(
                {"name": name, "ok": ok, "error": None if ok else "boom", "duration": 1.0,
                 "details": {"n": name}, "leaked": []}))
        (results / "_done.json").write_text("{}")
        return run

    return boot


def _chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wanted: set[str],
           fail: frozenset[str] = frozenset()) -> tuple[PowerLossChain, list[list[str]]]:
    booted: list[list[str]] = []
    monkeypatch.setattr(conftest, "boot_scenarios", _fake_boot(booted, fail))
    disks = tmp_path / "disks"
    disks.mkdir()
    return conftest.boot_power_loss_chain(tmp_path / "r", disks, wanted), booted


ALL = {n for pair in conftest.POWER_LOSS_BEFORE.items() for n in pair}


def test_all_four_in_four_boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain, booted = _chain(tmp_path, monkeypatch, ALL)
    assert len(booted) == 4
    assert booted[1][-1] == "mirror_reboot.before_power_loss"  # the cut comes last
    assert booted[2][-1] == "vtl_reboot.before_power_loss"
    for after, before in conftest.POWER_LOSS_BEFORE.items():
        assert chain.check(before, after) == {"n": after}


def test_one_test_alone_runs_only_its_boots(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = {"dedup_reboot.before_power_loss", "dedup_reboot.after_power_loss"}
    _, booted = _chain(tmp_path, monkeypatch, wanted)
    assert booted == [["dedup_reboot.before_power_loss"], ["dedup_reboot.after_power_loss"]]


def test_targetcli_alone_still_gets_its_reset(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = {"targetcli_restore.before_reboot", "targetcli_restore.after_reboot"}
    chain, booted = _chain(tmp_path, monkeypatch, wanted)
    assert booted == [["targetcli_restore.before_reboot", "vtl_reboot.before_power_loss"],
                      ["targetcli_restore.after_reboot"]]
    chain.check("targetcli_restore.before_reboot", "targetcli_restore.after_reboot")


def test_a_failed_before_fails_only_its_own_test(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    chain, booted = _chain(tmp_path, monkeypatch, ALL,
                           fail=frozenset({"targetcli_restore.before_reboot"}))
    assert "targetcli_restore.after_reboot" not in booted[3]
    with pytest.raises(pytest.fail.Exception, match="boom"):
        chain.check("targetcli_restore.before_reboot", "targetcli_restore.after_reboot")
    chain.check("vtl_reboot.before_power_loss", "vtl_reboot.after_power_loss")
    chain.check("dedup_reboot.before_power_loss", "dedup_reboot.after_power_loss")


def test_no_reset_fails_the_tests_that_needed_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    chain, _ = _chain(tmp_path, monkeypatch, ALL,
                      fail=frozenset({"vtl_reboot.before_power_loss"}))
    with pytest.raises(AssertionError, match="the reset did not happen"):
        chain.check("targetcli_restore.before_reboot", "targetcli_restore.after_reboot")
    with pytest.raises(pytest.fail.Exception, match="boom"):
        chain.check("vtl_reboot.before_power_loss", "vtl_reboot.after_power_loss")
