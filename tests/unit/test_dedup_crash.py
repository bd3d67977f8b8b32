"""A power cut at every write point of a random workload on a dedup pool.

`CrashFS` (tcmu_py.testing.crashfs) cannot see SQLite: its I/O is C code, not Python's ``os``.
So the cut is simulated here at the level the pool's ordering rules speak of:

- the pool's own file-system calls (``os.pwrite``/``os.pwritev`` to containers,
  ``fdatasync``/``fsync``, ``ftruncate``, ``unlink``) are intercepted; each is a crash point
  (after it ran);
- each SQLite ``COMMIT`` is a crash point, before and after (a proxy around the connection);
- what a cut leaves: each container file as of its last fdatasync (unsynced appends dropped),
  only the container files whose directory entry was fsync'd, and the SQLite files as they are
  (SQLite's own crash safety is trusted: synchronous=FULL makes a returned COMMIT durable, and a
  transaction without its commit frame is ignored by recovery); the write journal (a pool
  that has one) as of its last fdatasync with each write since then dropped, kept or kept in
  part (a torn record), at random.

At each point the cut pool is copied aside and then checked as the next daemon would find it:
`check_pool` reports no problem (leaks allowed: they are what a cut leaves), opening it
reclaims the leaks so that `check_pool` is clean, and every block reads back its value as of
the last flush that completed, or one written after it (writes not yet flushed may or may not
survive; nothing else may appear). Disk ``a`` has a write cache (durable at SYNCHRONIZE CACHE),
disk ``b`` none (durable when the write returns); the collector runs in the middle.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handlers.dedup import DedupPool, check_pool, create_pool, journal, store
from tcmu_py.handlers.dedup.journal import JOURNAL_FILE
from tcmu_py.handlers.dedup.store import CONTAINER_DIR, DB_FILE, POOL_FILE

BS = 512
CS = 4096
BPC = CS // BS
SIZE = 10 * CS
NBLOCKS = SIZE // BS


class CutMachine:
    """Keeps what is durable of the containers and calls `on_point` at every crash point."""

    def __init__(self, pool_dir: str, on_point: Callable[[str], None],
                 rng: random.Random | None = None) -> None:
        self.dir = pool_dir
        self.cdir = os.path.join(pool_dir, CONTAINER_DIR)
        self.journal = os.path.join(pool_dir, JOURNAL_FILE)
        self.rng = rng or random.Random(0)
        #: The journal's durable bytes, and the writes to it since its last fdatasync.
        self.journal_durable = (Path(self.journal).read_bytes() if os.path.exists(self.journal)
                                else None)
        self.journal_unsynced: list[tuple[int, bytes]] = []
        self.on_point = on_point
        self.busy = False
        self.points = 0
        self.durable: dict[str, bytes] = {}  # container name -> durable bytes
        self.entries: set[str] = set(os.listdir(self.cdir))  # durable directory entries
        for name in self.entries:
            self.durable[name] = Path(self.cdir, name).read_bytes()
        self.real: dict[str, Any] = {}

    def point(self, what: str) -> None:
        if self.busy:
            return
        self.busy = True
        try:
            self.points += 1
            self.on_point(what)
        finally:
            self.busy = False

    def _path(self, fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = self.real
        for name in ("pwrite", "pwritev", "fdatasync", "fsync", "ftruncate", "unlink"):
            real[name] = getattr(os, name)

        def pwrite(fd: int, data: Any, offset: int) -> int:
            n: int = real["pwrite"](fd, data, offset)
            self.point("pwrite")
            return n

        def pwritev(fd: int, buffers: Any, offset: int) -> int:
            n: int = real["pwritev"](fd, buffers, offset)
            if not self.busy and self._path(fd) == self.journal:
                self.journal_unsynced.append((offset, b"".join(bytes(b) for b in buffers)[:n]))
            self.point("pwritev")
            return n

        def sync(kind: str) -> Callable[[int], None]:
            def fn(fd: int) -> None:
                real[kind](fd)
                if not self.busy:
                    path = self._path(fd)
                    if path == self.cdir:
                        self.entries = set(os.listdir(self.cdir))
                    elif path == self.journal:
                        self.journal_durable = Path(path).read_bytes()
                        self.journal_unsynced.clear()
                    elif os.path.dirname(path) == self.cdir:
                        self.durable[os.path.basename(path)] = Path(path).read_bytes()
                self.point(kind)
            return fn

        def ftruncate(fd: int, length: int) -> None:
            real["ftruncate"](fd, length)
            self.point("ftruncate")

        def unlink(path: Any, *args: Any, **kw: Any) -> None:
            real["unlink"](path, *args, **kw)
            self.point("unlink")

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", sync("fdatasync"))
        monkeypatch.setattr(os, "fsync", sync("fsync"))
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "unlink", unlink)

    def cut(self, dest: str) -> None:
        """Write the pool a power cut now would leave into `dest`."""
        os.makedirs(os.path.join(dest, CONTAINER_DIR))
        for name in (POOL_FILE, DB_FILE, DB_FILE + "-wal"):
            src = os.path.join(self.dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(dest, name))
        for name in self.entries:
            Path(dest, CONTAINER_DIR, name).write_bytes(self.durable.get(name, b""))
        if self.journal_durable is not None:
            data = bytearray(self.journal_durable)
            for offset, written in self.journal_unsynced:
                keep = self.rng.choice([0, len(written), self.rng.randrange(len(written) + 1)])
                data[offset : offset + keep] = written[:keep]
            Path(dest, JOURNAL_FILE).write_bytes(data)


class CommitPoints:
    """The pool's SQLite connection, with a crash point before and after every COMMIT."""

    def __init__(self, db: sqlite3.Connection, machine: CutMachine) -> None:
        self._db = db
        self._machine = machine

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self._machine.point("before COMMIT")
            cur = self._db.execute(sql, *args)
            self._machine.point("after COMMIT")
            return cur
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def pattern(seed: int, n: int) -> list[bytes]:
    """n blocks from a few contents, so that chunks repeat."""
    return [bytes([(seed + i) % 3 + 1]) * BS for i in range(n)]


def run_workload(tmp: Path, seed: int, monkeypatch: pytest.MonkeyPatch,
                 compression: str = "none", fingerprint: str = "xxh3-128",
                 journal_bytes: int = 0) -> int:
    """`journal_bytes`: the pool's write journal (0: none); half the writes are then of whole
    chunks (what it takes), and it wraps often (records of at most 2 chunks in 32 KiB)."""
    rng = random.Random(seed)
    pool_dir = str(tmp / "pool")
    monkeypatch.setattr(store, "is_journal_size", lambda v: isinstance(v, int) and v >= 0)
    monkeypatch.setattr(journal.Journal, "background", False)  # drained at known points
    create_pool(pool_dir, "crash", 1 << 24, compression=compression, fingerprint=fingerprint,
                journal=journal_bytes)
    # For each disk and block: the value as of the last completed flush, and the values written
    # since (any of them may survive a cut).
    flushed = {d: [bytes(BS)] * NBLOCKS for d in "ab"}
    since: dict[str, list[set[bytes]]] = {d: [set() for _ in range(NBLOCKS)] for d in "ab"}
    current = {d: [bytes(BS)] * NBLOCKS for d in "ab"}
    cuts = iter(range(1 << 30))

    def check_cut(what: str) -> None:
        dest = str(tmp / f"cut{next(cuts)}")
        machine.cut(dest)
        report = check_pool(dest)
        assert not report.problems, (what, report)
        with DedupPool.open(dest) as cut:
            for d in "ab":
                disk = cut.open_disk(d, SIZE, block_size=BS)
                buf = bytearray(SIZE)
                disk.read(0, [memoryview(buf)])
                for b in range(NBLOCKS):
                    got = bytes(buf[b * BS : (b + 1) * BS])
                    assert got == flushed[d][b] or got in since[d][b], (what, d, b)
                disk.close()
        assert check_pool(dest).clean, what
        shutil.rmtree(dest)

    pool = DedupPool.open(pool_dir, container_bytes=4 * CS)
    machine = CutMachine(pool_dir, check_cut, random.Random(seed))
    disks = {"a": pool.open_disk("a", SIZE, block_size=BS, write_cache=True),
             "b": pool.open_disk("b", SIZE, block_size=BS, write_cache=False)}
    pool._db = CommitPoints(pool._db, machine)  # type: ignore[assignment]
    machine.install(monkeypatch)

    def settle(d: str) -> None:
        for b in range(NBLOCKS):
            flushed[d][b] = current[d][b]
            since[d][b].clear()

    try:
        for _ in range(22):
            d = rng.choice("ab")
            disk = disks[d]
            op = rng.choices(["write", "unmap", "write_same", "flush", "collect"],
                             [6, 2, 2, 2, 1])[0]
            lba = rng.randrange(NBLOCKS)
            n = rng.randint(1, min(NBLOCKS - lba, 12))
            if journal_bytes and op == "write" and rng.random() < 0.5:
                lba, n = lba - lba % BPC, BPC
                lba = min(lba, NBLOCKS - BPC)
            if op == "flush":
                disk.flush()  # a commit makes both disks durable
                settle("a")
                settle("b")
                continue
            if op == "collect":
                pool.collect(10, dead_percent=1)
                continue
            if op == "write":
                data = pattern(rng.randrange(3), n)
            elif op == "unmap":
                data = [bytes(BS)] * n
            else:
                data = [pattern(rng.randrange(3), 1)[0]] * n
            for i, blk in enumerate(data):
                since[d][lba + i].add(blk)
            if op == "write":
                disk.write(lba * BS, [memoryview(b"".join(data))])
            elif op == "unmap":
                disk.unmap(lba * BS, n * BS)
            else:
                disk.write_same(lba * BS, n * BS, data[0], rng.random() < 0.5)
            current[d][lba : lba + n] = data
            if not disk.write_cache:
                # Durable on return; and every commit makes disk a's writes durable too, so
                # they stay allowed (either value) until a flush settles them.
                for i, blk in enumerate(data):
                    flushed[d][lba + i] = blk
                    since[d][lba + i].clear()
        disks["a"].flush()
        settle("a")
        settle("b")
    finally:
        monkeypatch.undo()
        # The commits of the close are crash points too: their cuts are opened with the
        # journal's size allowed.
        monkeypatch.setattr(store, "is_journal_size", lambda v: isinstance(v, int) and v >= 0)
        for disk in disks.values():
            disk.close()
        pool.close()
    return machine.points


@pytest.mark.parametrize(("seed", "compression", "fingerprint", "journal_bytes"),
                         [(1, "none", "xxh3-128", 0), (2, "none", "xxh3-128", 0),
                          (3, "none", "sha256", 0), (4, "zstd", "xxh3-128", 0),
                          (5, "none", "xxh3-128", 32 << 10), (6, "none", "xxh3-128", 32 << 10),
                          (7, "zstd", "xxh3-128", 32 << 10)])
def test_power_cut_at_every_write_point(tmp_path: Path, seed: int, compression: str,
                                        fingerprint: str, journal_bytes: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    points = run_workload(tmp_path, seed, monkeypatch, compression, fingerprint, journal_bytes)
    assert points > 40  # the workload reached many write points
