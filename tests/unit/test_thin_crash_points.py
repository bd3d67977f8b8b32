"""Crash points of the thin pool format: pool.json and the disk files of its directory.

Each pool operation that changes the directory (create a pool, register a disk, change the
capacity or the threshold in this process or from `tcmu-py apply`'s, delete a disk) is run
once to count its file-system steps, then again from the same starting state once per step,
with the power cut just before that step (and, for the write of a temporary file's content,
half-way through it). After a cut, nothing else reaches the disk: the process is gone, its
clean-up code included. Then the pool is reopened, as the next daemon would, and checked:

- pool.json reads, and is exactly the old one or exactly the new one (never a mix, never
  missing once a pool was created);
- every disk file is a registered disk (no unaccounted file); the accounting equals a recount;
- no temporary file is left once the pool was opened;
- doing the operation again succeeds and gives the new state.

The model of a crash: every step completed before the cut is durable (each write is fsync'd
before its rename and the directory after it), nothing after it happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcmu_py.handlers.thin import Pool, create_pool, ensure_pool
from tcmu_py.handlers.thin import pool as pool_mod
from tcmu_py.handlers.thin.pool import POOL_FILE, PoolConfig, load_pool_config

UNIT = 16 * 1024
CAPACITY = 4 << 20


class PowerCut(BaseException):
    """The machine stopped here: no handler runs, nothing more reaches the disk."""


@dataclass
class Step:
    what: str
    torn: bool = False  # cut half-way through a content write


class Machine:
    """Intercepts the file-system steps of the code under test; with `cut_at` (an index into
    the steps of a clean run) the machine stops there. The steps: creating a temporary file,
    writing its content (also cut half-way: a second, torn step), fsync, rename, unlink,
    creating or growing a disk file."""

    def __init__(self, cut_at: int | None = None) -> None:
        self.steps: list[Step] = []
        self.cut_at = cut_at
        self.dead = False

    def step(self, what: str, torn_possible: bool = False) -> bool:
        """Called before a step; raises PowerCut at the cut. True: cut half-way through it."""
        if self.dead:
            raise PowerCut(what)
        index = len(self.steps)
        self.steps.append(Step(what))
        if torn_possible:
            self.steps.append(Step(what, torn=True))
        if self.cut_at == index:
            self.dead = True
            raise PowerCut(what)
        if torn_possible and self.cut_at == index + 1:
            self.dead = True
            return True
        return False

    @contextlib.contextmanager
    def running(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
        real_mkstemp = tempfile.mkstemp
        real = {name: getattr(os, name) for name in
                ("fsync", "replace", "unlink", "ftruncate", "open")}

        def mkstemp(*a: object, **kw: object) -> tuple[int, str]:
            self.step("create temporary file")
            return real_mkstemp(*a, **kw)  # type: ignore[call-overload, no-any-return]

        def dump(obj: object, fp: object, **kw: object) -> None:
            text = json.dumps(obj, **kw)  # type: ignore[arg-type]
            if self.step("write content", torn_possible=True):
                fp.write(text[: len(text) // 2])  # type: ignore[attr-defined]
                fp.flush()  # type: ignore[attr-defined]
                raise PowerCut("torn write")
            fp.write(text)  # type: ignore[attr-defined]

        def wrap(name: str) -> Callable[..., object]:
            def call(*a: object, **kw: object) -> object:
                if name == "open":
                    path, flags = str(a[0]), int(a[1])  # type: ignore[call-overload]
                    if not (flags & os.O_CREAT and path.endswith(".img")):
                        return real[name](*a, **kw)
                    if not os.path.exists(path):
                        self.step(f"create {os.path.basename(path)}")
                elif name in ("fsync", "ftruncate"):
                    self.step(name)
                else:  # replace (its destination), unlink
                    self.step(f"{name} {_stable_name(a[-1] if name == 'replace' else a[0])}")
                return real[name](*a, **kw)
            return call

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(json, "dump", dump)
        for name in real:
            monkeypatch.setattr(os, name, wrap(name))
        try:
            yield self
        finally:
            monkeypatch.undo()


def _stable_name(path: object) -> str:
    """A file's name without the random part of temporary and probe files."""
    name = os.path.basename(str(path))
    name = re.sub(r"\.[A-Za-z0-9_]{8}\.tmp$", ".*.tmp", name)
    return re.sub(r"^\.probe.*", ".probe*", name)


# --------------------------------------------------------------------------------------------
# The operations, from a starting state each


def _base(path: str) -> None:
    """A pool with disk d0 holding data in 3 units (and a pool.json that says so)."""
    create_pool(path, "p", CAPACITY, 80, unit=UNIT)
    with Pool.open(path) as pool:
        d0 = pool.open_disk("d0", 64 * UNIT)
        for u in (0, 7, 30):
            d0.write(u * UNIT, [memoryview(b"d" * 4096)])
        d0.close()


def _with_open_pool(fn: Callable[[Pool], None]) -> Callable[[str, Machine, pytest.MonkeyPatch],
                                                              None]:
    """Run `fn` on the pool opened before the machine starts intercepting (the daemon had it
    open); on a cut, the process's descriptors close as the kernel would close them."""
    def op(path: str, machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
        pool = Pool.open(path)
        try:
            with machine.running(monkeypatch):
                fn(pool)
        finally:
            if machine.dead:  # the process died: only the kernel's clean-up happens
                for backend in list(pool._open_disks.values()):
                    os.close(backend._fd)
                with pool_mod._open_pools_lock:
                    pool_mod._open_pools.pop(pool.path, None)
                os.close(pool._lock_fd)
            else:
                pool.close()
    return op


def _plain(fn: Callable[[str], None]) -> Callable[[str, Machine, pytest.MonkeyPatch], None]:
    def op(path: str, machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
        with machine.running(monkeypatch):
            fn(path)
    return op


def _register(pool: Pool) -> None:
    pool.open_disk("d1", 64 * UNIT, unit=2 * UNIT).close()


OPERATIONS: dict[str, tuple[Callable[[str], None] | None, Callable[..., None]]] = {
    # name: (setup, operation)
    "create_pool": (None, _plain(lambda p: create_pool(p, "p", CAPACITY, 80, unit=UNIT))),
    "register_disk": (_base, _with_open_pool(_register)),
    "set_capacity": (_base, _with_open_pool(lambda pool: pool.set_capacity(2 * CAPACITY))),
    "set_soft_threshold": (_base, _with_open_pool(lambda pool: pool.set_soft_threshold(10))),
    "delete_disk": (_base, _with_open_pool(lambda pool: pool.delete_disk("d0"))),
    "apply_capacity": (_base, _plain(lambda p: ensure_pool(p, "p", 2 * CAPACITY, 60))),
}


def _snapshot(path: str) -> PoolConfig | None:
    return load_pool_config(path) if os.path.exists(os.path.join(path, POOL_FILE)) else None


def _check_reopened(path: str, before: PoolConfig | None, after: PoolConfig | None) -> None:
    now = _snapshot(path)
    assert now in (before, after), f"pool.json is neither the old nor the new one: {now}"
    if now is None:
        assert not [f for f in os.listdir(path) if f.endswith(".img")]
        return
    with Pool.open(path) as pool:
        files = {f[: -len(".img")] for f in os.listdir(path) if f.endswith(".img")}
        assert files <= set(pool.config.disks), "a disk file nobody registered"
        recount = sum(pool_mod._scan_file(pool_mod.disk_file(path, d), u)[1] * u
                      for d, u in pool.config.disks.items() if d in files)
        assert pool.used == recount
        assert (pool.capacity, pool.soft_threshold) == (now.capacity, now.soft_threshold)
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")], "temporary file left"


def _redo(name: str, path: str) -> None:
    """The operation again, after the crash (what the operator or the next daemon does)."""
    if name == "create_pool":
        if _snapshot(path) is None:
            create_pool(path, "p", CAPACITY, 80, unit=UNIT)
        return
    with Pool.open(path) as pool:
        if name == "register_disk":
            _register(pool)
        elif name == "set_capacity":
            pool.set_capacity(2 * CAPACITY)
        elif name == "set_soft_threshold":
            pool.set_soft_threshold(10)
        elif name == "delete_disk" and "d0" in pool.config.disks:
            pool.delete_disk("d0")
    if name == "apply_capacity":
        ensure_pool(path, "p", 2 * CAPACITY, 60)


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_power_cut_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 name: str) -> None:
    setup, operation = OPERATIONS[name]
    # A clean run: the steps, and the state before and after.
    ref = str(tmp_path / "ref" / "pool")
    os.makedirs(os.path.dirname(ref))
    if setup:
        setup(ref)
    before = _snapshot(ref)
    machine = Machine()
    operation(ref, machine, monkeypatch)
    after = _snapshot(ref)
    assert after != before and machine.steps
    # Every pool.json write shows its steps to the harness: content, fsync, rename.
    assert {"write", "fsync", "replace"} <= {s.what.split()[0] for s in machine.steps}
    for index, step in enumerate(machine.steps):
        path = str(tmp_path / f"cut{index}" / "pool")
        os.makedirs(os.path.dirname(path))
        if setup:
            setup(path)
        cut = Machine(cut_at=index)
        with pytest.raises(PowerCut):
            operation(path, cut, monkeypatch)
        assert cut.steps[index].what == step.what  # the same path as the clean run
        _check_reopened(path, before, after)
        _redo(name, path)
        assert _snapshot(path) == after
