"""Hostile input: YAML configurations, thin pool files (pool.json) and LIO state files.

Every case runs the real command line (`tcmu_py.cli.main`) in a forked child of
tests/unit/hostile/forkserver.py with 1 GiB of address space (RLIMIT_AS) and a 20 s hang guard,
and must end with exit status 2 and one line on stderr that names the hostile file (and says
what was expected: each case names a word its message must hold). A traceback, a crash, a
timeout, an exit status other than 2 or a second line fails the case.

The cases are data: tests/unit/hostile/config/*.yaml (each starts with ``# expect: <text>``),
hostile/pool/*.json (put in a thin pool directory a configuration's device names) and
hostile/lio-state/*.json (put as the state file of a configuration's ``state_dir``), plus the
generated ones below (too large to keep as files). A few cases also run through a fresh
interpreter (`python -m tcmu_py.cli`), the way an operator runs it.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOSTILE = Path(__file__).parent / "hostile"
MEMORY = 1 << 30
HANG_GUARD = 20.0

#: Word each pool.json / LIO state case's message must hold (besides the file's path).
POOL_EXPECT = {
    "not-json.json": "JSON",
    "not-utf8.json": "UTF-8",
    "deep-nesting.json": "nest",
    "top-level-list.json": "object",
    "version-2.json": "version",
    "missing-name.json": "name",
    "missing-capacity.json": "capacity",
    "name-not-string.json": "name",
    "capacity-string.json": "capacity",
    "capacity-bool.json": "capacity",
    "capacity-float.json": "capacity",
    "capacity-nan.json": "NaN",
    "capacity-5000-digits.json": "JSON",
    "unit-string.json": "unit",
    "threshold-string.json": "soft_threshold",
    "disks-list.json": "disks",
    "disk-entry-int.json": "disks.d0",
    "disk-unit-list.json": "disks.d0",
    "disk-name-traversal.json": "disk name",
    "duplicate-key.json": "duplicate",
    "empty.json": "JSON",
}
STATE_EXPECT = {
    "not-json.json": "JSON",
    "not-utf8.json": "UTF-8",
    "deep-nesting.json": "nest",
    "top-level-list.json": "object",
    "missing-version.json": "version",
    "objects-mapping.json": "objects",
    "object-int.json": "objects[0]",
    "object-missing-kind.json": "kind",
    "object-unknown-kind.json": "kind",
    "object-key-string.json": "key",
    "object-key-nested.json": "key",
    "object-params-list.json": "params",
    "object-key-too-short.json": "key",
    "empty.json": "JSON",
}


class Runner:
    """The forkserver: `run(argv)` -> its answer (see hostile/forkserver.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOSTILE / "forkserver.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line(60.0)) == {"ready": True}

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the forkserver does not answer"
        return self.proc.stdout.readline()

    def run(self, argv: list[str]) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(
            {"argv": argv, "timeout": HANG_GUARD, "memory": MEMORY}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(HANG_GUARD + 30))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


def check_refused(answer: dict, hostile: Path, expect: str) -> str:
    """Exit 2, one line on stderr naming `hostile` and holding `expect`; returns the line."""
    assert not answer["timed_out"], f"still running after {HANG_GUARD} s (hang guard)"
    assert answer["signal"] is None, f"killed by signal {answer['signal']}"
    lines = answer["stderr"].splitlines()
    assert answer["status"] == 2, answer["stderr"][-3000:]
    assert len(lines) == 1, answer["stderr"][-3000:]
    assert str(hostile) in lines[0]
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# YAML configurations


def _expect_of(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path}: first line must be '# expect: <text>'"
    return first[len("# expect: "):]


CONFIG_CASES = sorted((HOSTILE / "config").glob("*.yaml"))


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[p.stem for p in CONFIG_CASES])
def test_hostile_config(runner: Runner, case: Path) -> None:
    check_refused(runner.run(["check", "-c", str(case)]), case, _expect_of(case))


def _generated_configs(tmp: Path) -> Iterator[tuple[Path, str]]:
    big = tmp / "larger-than-the-cap.yaml"
    big.write_text("# padding\n" * 40_000 + "state_dir: /srv/x\n")  # 400 KiB
    yield big, "larger than"
    scalar = tmp / "one-huge-scalar.yaml"
    scalar.write_text("state_dir: /" + "x" * (2 << 20) + "\n")
    yield scalar, "larger than"
    many = tmp / "many-devices.yaml"
    many.write_text("devices:\n" + "".join(
        f"  - {{name: d{i}, handler: raw, size: 1G, serial: S{i:05d}{'x' * 30}}}\n"
        for i in range(2500)) + f"  - {{name: bad, handler: raw, size: 1G, serial: {'x' * 65}}}\n")
    yield many, "serial"  # ~200 KiB: 2500 good devices, then one bad serial


def test_hostile_generated_configs(runner: Runner, tmp_path: Path) -> None:
    for path, expect in _generated_configs(tmp_path):
        check_refused(runner.run(["check", "-c", str(path)]), path, expect)


def test_many_problems_are_bounded(runner: Runner, tmp_path: Path) -> None:
    """100 000 wrong values within the size cap: the message stays short (the first problems
    and a count), every line names the file, and it is quick."""
    path = tmp_path / "flat.yaml"
    path.write_text("devices: [" + ",".join(["1"] * 100_000) + "]\n")  # 200 KiB
    answer = runner.run(["check", "-c", str(path)])
    assert answer["status"] == 2 and not answer["timed_out"]
    lines = answer["stderr"].splitlines()
    assert 2 <= len(lines) <= 25
    assert all(str(path) in line for line in lines[1:])
    assert "more" in lines[-1]


# --------------------------------------------------------------------------------------------
# Thin pool files


def _thin_config(tmp: Path, pool_dir: Path) -> Path:
    cfg = tmp / "thin.yaml"
    cfg.write_text(f"state_dir: {tmp / 'state'}\ndevices:\n"
                   f"  - {{name: t0, handler: thin, size: 1M, options: {{pool: {pool_dir}}}}}\n")
    return cfg


@pytest.mark.parametrize("name", sorted(POOL_EXPECT))
def test_hostile_pool_file(runner: Runner, tmp_path: Path, name: str) -> None:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    hostile = pool_dir / "pool.json"
    hostile.write_bytes((HOSTILE / "pool" / name).read_bytes())
    check_refused(runner.run(["check", "-c", str(_thin_config(tmp_path, pool_dir))]), hostile,
                  POOL_EXPECT[name])


def test_pool_file_larger_than_the_cap(runner: Runner, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    hostile = pool_dir / "pool.json"
    hostile.write_text('{"version": 1, "pad": "' + "x" * (2 << 20) + '"}')
    check_refused(runner.run(["check", "-c", str(_thin_config(tmp_path, pool_dir))]), hostile,
                  "larger than")


def test_all_pool_cases_have_an_expectation() -> None:
    assert {p.name for p in (HOSTILE / "pool").iterdir()} == set(POOL_EXPECT)
    assert {p.name for p in (HOSTILE / "lio-state").iterdir()} == set(STATE_EXPECT)


# --------------------------------------------------------------------------------------------
# LIO state files


@pytest.mark.parametrize("command", ["check", "down"])
@pytest.mark.parametrize("name", sorted(STATE_EXPECT))
def test_hostile_lio_state_file(runner: Runner, tmp_path: Path, name: str, command: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    hostile = state / "lio-state.json"
    hostile.write_bytes((HOSTILE / "lio-state" / name).read_bytes())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"state_dir: {state}\n")
    check_refused(runner.run([command, "-c", str(cfg)]), hostile, STATE_EXPECT[name])


# --------------------------------------------------------------------------------------------
# Through a fresh interpreter, as an operator runs it


@pytest.mark.parametrize("case", ["billion-laughs.yaml", "not-utf8.yaml", "deep-flow-nesting.yaml"])
def test_hostile_config_fresh_interpreter(case: str) -> None:
    import resource

    path = HOSTILE / "config" / case

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tcmu_py.cli", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=HANG_GUARD, preexec_fn=limit)
    answer = {"status": proc.returncode, "signal": None, "stderr": proc.stderr,
              "timed_out": False, "seconds": time.monotonic() - start}
    check_refused(answer, path, _expect_of(path))
