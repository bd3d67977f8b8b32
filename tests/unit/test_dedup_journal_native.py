"""A dedup pool's write journal appended to by the native loop (`struct tcmu_py_jl` in _ring.h,
`Journal.lease_for`): the loop's records are the journal's format (a cut replays them), the
capacity and soft threshold hold with the loop appending, a record whose write failed is never
taken, and loops racing the drainer and Python's own appends and reads keep every byte. The
two-disk model test (test_dedup_model.py, "journal") runs its WRITEs of whole chunks through
the loop too."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.dedup import (
    DedupHandler,
    DedupPool,
    acquire_pool,
    check_pool,
    create_pool,
    journal,
    release_pool,
)
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness

BS = 512
CS = 4096
BPC = CS // BS
MIB = 1 << 20
SIZE = 64 * CS


@pytest.fixture(autouse=True)
def no_drainer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Drained at known points only, unless a test starts the thread itself."""
    monkeypatch.setattr(journal.Journal, "background", False)
    yield


@pytest.fixture(params=["disk", "tmpfs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the pool lives: a disk file system (the loop writes records with pwrite/pwritev)
    or tmpfs (it copies them into the journal mapped)."""
    if request.param == "disk":
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tcmu-py-test-") as d:
        yield Path(d)


def chunk(seed: int, n: int = 1) -> bytes:
    return random.Random(seed).randbytes(n * CS)


class Disk:
    """A dedup disk of the pool at `path`, served through a ring by a native loop."""

    def __init__(self, pool: DedupPool, name: str, write_cache: bool = True) -> None:
        self.dev = DedupHandler.open(DeviceConfig(name, "dedup", f"pool={pool.path}", SIZE,
                                                  block_size=BS, write_cache=write_cache))
        self.ring = RingHarness(self.dev)
        assert self.ring.runner.native is not None
        self.ring.run(cdbs.test_unit_ready())  # the power-on unit attention

    def write(self, offset: int, data: bytes, fua: bool = False) -> Any:
        return self.ring.run(cdbs.write16(offset // BS, len(data) // BS, fua=fua),
                             data_out=data)

    def read(self, offset: int, n: int) -> bytes:
        r = self.ring.run(cdbs.read16(offset // BS, n // BS), data_in_len=n)
        assert r.good, r
        return bytes(r.data)

    def sync(self) -> Any:
        return self.ring.run(cdbs.synchronize_cache10())

    @property
    def c_writes(self) -> tuple[int, int]:
        return self.dev.backend.c_writes  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.ring.close()
        self.dev.close()

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def served_pool(src: str, capacity: int, **settings: Any) -> Iterator[DedupPool]:
    """A pool made at `src` with a 4 MiB journal, open as a daemon's devices share it."""
    create_pool(src, "j", capacity, journal=4 * MIB, **settings)
    pool = acquire_pool(src)
    try:
        yield pool
    finally:
        release_pool(pool)


def test_the_loops_records_replay_after_a_cut(root: Path) -> None:
    """WRITEs of whole chunks are the loop's (no Python on their path); reads return them at
    once, whole or in part; after SYNCHRONIZE CACHE a power cut keeps them: the next open
    replays the loop's records (their format and checksums are journal.py's)."""
    src = str(root / "pool")
    with served_pool(src, 256 * MIB) as pool, Disk(pool, "d") as d:
        assert d.write(8 * CS + BS, chunk(5)[:BS]).good  # part of a chunk: Python's
        assert d.c_writes == (0, 0)
        # The partial write's decision on space took the lease back: the next WRITE is
        # appended by Python, which grants it again.
        assert d.write(0, chunk(0, 2)).good
        assert d.c_writes == (0, 0)
        assert d.write(4 * CS, chunk(4)).good
        assert d.write(0, chunk(9)).good  # chunk 0 again: the newer record wins
        assert d.c_writes == (2, 0)
        want = chunk(9) + chunk(0, 2)[CS:] + bytes(2 * CS) + chunk(4)
        assert d.read(0, 5 * CS) == want
        assert d.read(CS + 1024, 1024) == want[CS + 1024 : CS + 2048]  # part of a chunk
        assert d.sync().good
        assert pool.journal is not None and pool.journal.pending == 4 * CS  # 2 + 1 + 1
        cut = shutil.copytree(src, str(root / "cut"),
                              ignore=shutil.ignore_patterns(".lock"))
    with DedupPool.open(cut) as again:
        disk = again.open_disk("d", SIZE)
        got = bytearray(9 * CS)
        disk.read(0, [memoryview(got)])
        disk.close()
    assert bytes(got[: 5 * CS]) == want
    assert bytes(got[8 * CS :]) == bytes(BS) + chunk(5)[:BS] + bytes(CS - 2 * BS)
    assert check_pool(cut).clean


def test_the_loop_leaves_the_crossing_and_the_hard_limit_to_python(root: Path) -> None:
    """The lease stops short of the soft threshold: the WRITE that reaches it is Python's and
    reports THIN PROVISIONING SOFT THRESHOLD REACHED (38/07) once; a full pool refuses with
    SPACE ALLOCATION FAILED WRITE PROTECT (27/07) and nothing changes (SBC-4 4.7.3.7, 4.7.3.8)."""
    src = str(root / "pool")
    with served_pool(src, 16 * CS, soft_threshold=50) as pool, Disk(pool, "d") as d:
        for k in range(7):  # 7 of 16 chunks: below 50 %
            r = d.write(k * CS, chunk(k))
            assert r.good, r
        assert d.c_writes == (7, 0)
        assert d.write(7 * CS, chunk(7)).good  # 8 of 16: the crossing, by Python
        assert d.c_writes == (7, 1)
        r = d.ring.run(cdbs.test_unit_ready())
        assert r.sense_codes == (0x6, 0x38, 0x07), r
        assert d.ring.run(cdbs.test_unit_ready()).good  # once
        for k in range(8, 16):
            assert d.write(k * CS, chunk(k)).good
        r = d.write(16 * CS, chunk(16))
        assert r.sense_codes == (0x7, 0x27, 0x07), r
        assert d.read(16 * CS, CS) == bytes(CS)
        assert d.write(17 * CS, chunk(3)).good  # a duplicate: fits
        assert d.sync().good
        assert pool.used == 16 * CS
        assert d.read(0, 18 * CS) == b"".join(chunk(k) for k in range(16)) + bytes(CS) + \
            chunk(3)


def test_a_write_the_loop_could_not_append_is_never_taken(tmp_path: Path) -> None:
    """The loop's write to the journal fails (the file turned read-only under it): its record
    is void, the WRITE goes to Python, whose append fails too, and the initiator gets an error;
    the chunk keeps its old bytes, the next SYNCHRONIZE CACHE drains the records around the
    void one into the index (rule 5), and once the file is writable the loop appends again."""
    src = str(tmp_path / "pool")
    with served_pool(src, 256 * MIB) as pool, Disk(pool, "d") as d:
        assert d.write(0, chunk(0)).good
        assert pool.journal is not None
        jfd = pool.journal.fd
        saved = os.dup(jfd)
        ro = os.open(os.path.join(src, journal.JOURNAL_FILE), os.O_RDONLY)
        os.dup2(ro, jfd)
        try:
            r = d.write(CS, chunk(1))
            assert not r.good and r.sense_codes[0] in (0x3, 0x4), r
        finally:
            os.dup2(saved, jfd)
            os.close(saved)
            os.close(ro)
        assert d.read(0, 2 * CS) == chunk(0) + bytes(CS)
        assert d.sync().good
        assert pool.journal.pending == 0  # drained: replay would stop at the void one
        assert d.write(2 * CS, chunk(2)).good
        assert d.write(3 * CS, chunk(3)).good
        assert d.c_writes[0] >= 2
        assert d.read(0, 4 * CS) == chunk(0) + bytes(CS) + chunk(2) + chunk(3)
    assert check_pool(src).clean


def test_a_fault_in_the_mapped_journal_is_a_write_python_makes() -> None:
    """On tmpfs the loop copies records into the journal mapped; a fault there (the file was
    cut short under it: SIGBUS) voids the record and hands the WRITE to Python, which writes it
    (pwritev extends the file); nothing is lost, the next SYNCHRONIZE CACHE drains everything
    into the index, and the pool checks clean."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tcmu-py-test-") as root, \
            served_pool(os.path.join(root, "pool"), 256 * MIB) as pool, Disk(pool, "d") as d:
        src = pool.path
        assert d.write(0, chunk(0)).good
        assert d.c_writes == (1, 0)
        assert pool.journal is not None
        # Cut short 32 bytes past the first record: the second would cross the new end.
        os.truncate(os.path.join(src, journal.JOURNAL_FILE), journal.HEADER + CS + 32)
        r = d.write(CS, chunk(1))
        assert r.good, r
        assert d.c_writes == (1, 0)  # the loop's append faulted: Python wrote it
        assert d.read(0, 2 * CS) == chunk(0) + chunk(1)
        assert d.sync().good  # drains the records around the void one: rule 5
        assert pool.journal.pending == 0
        assert d.read(0, 2 * CS) == chunk(0) + chunk(1)


def test_loops_racing_the_drainer_and_python(root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two disks of a pool with a small journal, each driven by two threads submitting batches
    of WRITEs (whole chunks: the loop's; parts of chunks: Python's), READs and now and then a
    SYNCHRONIZE CACHE, while the drainer runs and the journal fills and wraps: every READ
    matches what was written before it, and the disks and the pool check out after."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 0.001)
    src = str(root / "pool")
    errors: list[BaseException] = []
    models = {name: bytearray(SIZE) for name in "ab"}
    with served_pool(src, 256 * MIB) as pool, Disk(pool, "a") as da, Disk(pool, "b") as db:
        disks = {"a": da, "b": db}
        def work(t: int) -> None:
            rng = random.Random(t)
            name = "ab"[t % 2]
            d, model = disks[name], models[name]
            lo = (t // 2) * (SIZE // 2)  # each thread its own half of its disk
            try:
                for _ in range(40):
                    batch: list[tuple[bytes, bytes, int]] = []
                    spans: list[tuple[int, int]] = []
                    for _ in range(rng.randrange(1, 6)):
                        c = rng.randrange(SIZE // 2 // CS)
                        if any(s <= c < e for s, e in spans):
                            continue
                        if rng.random() < 0.75:  # whole chunks, seldom duplicates
                            n = min(rng.choice([1, 2, 4]), SIZE // 2 // CS - c)
                            data = (chunk(rng.randrange(1 << 30), n) if rng.random() < 0.8
                                    else chunk(rng.randrange(3)) * n)
                            off = lo + c * CS
                        else:  # part of one chunk
                            n = 1
                            a = rng.randrange(BPC)
                            off = lo + c * CS + a * BS
                            data = rng.randbytes(rng.randrange(1, BPC - a + 1) * BS)
                        if any(s < c + n and c < e for s, e in spans):
                            continue
                        spans.append((c, c + n))
                        batch.append((cdbs.write16(off // BS, len(data) // BS), data, 0))
                        model[off : off + len(data)] = data
                    pending = d.ring.submit_many(batch)
                    d.ring.wait(pending)
                    assert all(p.status == 0 for p in pending), pending
                    if rng.random() < 0.3:
                        assert d.read(lo, SIZE // 2) == model[lo : lo + SIZE // 2]
                    if rng.random() < 0.1:
                        assert d.sync().good
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads), "writers hung"
        assert not errors, errors
        for name, d in disks.items():
            assert d.read(0, SIZE) == models[name]
            assert d.sync().good
        assert disks["a"].c_writes[0] > 0
    assert check_pool(src).clean
    with DedupPool.open(src) as again:
        for name in "ab":
            disk = again.open_disk(name, SIZE)
            got = bytearray(SIZE)
            disk.read(0, [memoryview(got)])
            disk.close()
            assert got == models[name]


@pytest.mark.parametrize("build", [0, 1], ids=["simd", "scalar"])
def test_both_builds_of_the_loops_checksum_are_journal_py_s(build: int) -> None:
    """The loop's record checksum, in either build it may pick (`tcmu_py_jl_sum_build`), is
    journal.py's XXH3-64 over the header's first 48 bytes and the data, for data of every
    length class XXH3 treats apart (short inputs, one stripe, many blocks)."""
    import xxhash

    from tcmu_py.ring import journal_checksum

    rng = random.Random(build)
    for n in (0, 1, 3, 16, 17, 128, 129, 240, 241, 1024, 4096, 65536 + 7, 1 << 20):
        head, data = rng.randbytes(48), rng.randbytes(n)
        want = xxhash.xxh3_64(head + data).intdigest()
        assert journal_checksum(head, data, build) == want, n
        assert journal_checksum(head, data) == want, n


def test_a_cleared_table_is_never_told_an_older_location_than_the_loops_record(
        tmp_path: Path) -> None:
    """Chunk 3's newest bytes are a loop record Python has not taken yet, its index entry the
    older ones; the table is cleared (a rolled-back commit, a healed chunk). A READ that misses
    goes to Python, whose read tells the table the locations it found: before, the index's old
    location of chunk 3 (the overlay did not hold the record yet), so every later READ the loop
    served returned the bytes from before the WRITE. Now the journal takes the loop's records
    before the table is told anything."""
    src = str(tmp_path / "pool")
    with served_pool(src, 256 * MIB) as pool, Disk(pool, "d") as d:
        assert pool.journal is not None
        assert d.write(3 * CS, chunk(1)).good
        pool.journal.drain_all()  # the index holds chunk(1)
        assert d.write(3 * CS, chunk(2)).good  # the loop's record, not yet taken
        assert d.c_writes[0] == 2
        table = d.dev.backend._table  # type: ignore[attr-defined]
        with pool.lock:
            table.clear()
        for _ in range(3):  # a miss (Python), then the loop's own READs
            assert d.read(2 * CS, 2 * CS) == bytes(CS) + chunk(2)


def test_no_lease_above_the_soft_threshold(tmp_path: Path) -> None:
    """A lease granted while the pool is above its soft threshold had the whole rest of the
    capacity: once the use fell below (the collector compacted freed chunks), the loop's WRITEs
    took it across the threshold again and nobody reported it. Now no lease is granted above
    the threshold: WRITEs there are Python's, and the crossing after a fall is reported again
    (SBC-4 4.7.3.7)."""
    src = str(tmp_path / "pool")
    with served_pool(src, 16 * CS, soft_threshold=50) as pool, Disk(pool, "d") as d:
        assert pool.journal is not None
        for k in range(8):  # the 8th reaches 50 %
            assert d.write(k * CS, chunk(k)).good
        assert d.ring.run(cdbs.test_unit_ready()).sense_codes == (0x6, 0x38, 0x07)
        assert d.write(8 * CS, chunk(8)).good  # above: Python's, and no lease after it
        before = d.c_writes
        assert d.write(9 * CS, chunk(9)).good
        assert d.c_writes == before
        assert pool.journal.lease_state()["journal_c_not_granted"] == \
            "the pool's capacity or soft threshold"
        params = cdbs.unmap_parameters([(0, 10 * BPC)])
        assert d.ring.run(cdbs.unmap(len(params)), data_out=params).good
        assert d.sync().good
        assert pool.collect(30, dead_percent=1).done and pool.used == 0
        for k in range(8):  # up to 50 % again: the crossing is reported again
            assert d.write(k * CS, chunk(20 + k)).good
        assert d.ring.run(cdbs.test_unit_ready()).sense_codes == (0x6, 0x38, 0x07)


def test_log_sense_counts_the_loops_records_at_once(tmp_path: Path) -> None:
    """The used count of LOG SENSE 0Ch (the one the threshold is met on) holds the loop's
    records the journal has not taken yet: before, it read the journal's count without taking
    them (up to a drainer's wake-up behind)."""
    src = str(tmp_path / "pool")
    with served_pool(src, 256 * MIB) as pool, Disk(pool, "d") as d:
        assert d.write(0, chunk(0, 4)).good
        assert d.c_writes[0] == 1
        assert d.dev.backend.provisioning().used == 4 * CS  # type: ignore[attr-defined]
        assert pool.journal is not None and pool.journal.pending == 4 * CS


def test_a_lease_taken_back_is_granted_again_once_the_pool_lock_is_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision on space (here: the pool's capacity changed) takes the lease back, and a
    grant needs the pool's lock free (tried, never waited for while the journal's own lock is
    held). With nothing to drain and no WRITE of Python's, only the drainer grants again: it
    waits for the pool's lock, and the loop's WRITEs are its own again without a WRITE of
    Python's first. (Before, the lease stayed out until the next append or drain: a stretch of
    WRITEs through Python, e.g. after each collector step.)"""
    monkeypatch.setattr(journal.Journal, "background", True)
    with served_pool(str(tmp_path / "pool"), 256 * MIB) as pool, Disk(pool, "d") as d:
        jnl = pool.journal
        assert jnl is not None
        assert d.write(0, chunk(1)).good
        assert d.c_writes == (1, 0)
        assert d.sync().good
        deadline = time.monotonic() + 10
        while jnl.pending:  # the drainer drains it: nothing left for a drain to grant after
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pool_lock_held(pool):
            jnl.take_back()
            for _ in range(3):  # the drainer looks, and cannot take the pool's lock
                assert "journal_c_not_granted" in jnl.lease_state()
                time.sleep(journal.IDLE_SECONDS)
        wait_granted(jnl, 10)
        assert d.write(CS, chunk(2)).good
        assert d.c_writes == (2, 0)  # the loop's: granted without a WRITE of Python's
        assert d.read(0, 2 * CS) == chunk(1) + chunk(2)


@contextlib.contextmanager
def pool_lock_held(pool: DedupPool) -> Iterator[None]:
    """The pool's lock held by another thread (a decision on space) until the block ends."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pool.lock:
            locked.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)
        assert not holder.is_alive()


def wait_granted(jnl: journal.Journal, seconds: float) -> None:
    """Until the lease is granted (no reason it is out in the status), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while "journal_c_not_granted" in jnl.lease_state():
        assert time.monotonic() < deadline, jnl.lease_state()
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["taken_back", "grant_found_the_lock_held"])
def test_the_drainer_is_woken_for_a_regrant_not_left_to_its_idle_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A grant that only the drainer can make (the lease was taken back, or a grant of
    Python's found the pool's lock held) wakes it at once: it waits for the pool's lock and
    grants as soon as it is free. Before, it saw the wish only at its next idle wake-up
    (`IDLE_SECONDS` later; made 60 s here, so that only the wake-up passes the 10 s bound)."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 60.0)
    with served_pool(str(tmp_path / "pool"), 256 * MIB) as pool, Disk(pool, "d") as d:
        jnl = pool.journal
        assert jnl is not None
        assert d.write(0, chunk(1)).good
        assert d.c_writes == (1, 0)
        assert "journal_c_not_granted" not in jnl.lease_state()
        # Take the loop's record now (that wakes the drainer, which waits again): no record is
        # left for the revoke below to take, whose taking would wake the drainer too.
        assert jnl.pending == CS
        with pool_lock_held(pool):
            if how == "taken_back":
                jnl.take_back()
                want = "taken back (the pool's capacity or threshold changed)"
            else:
                # Python's append finds no room (the index takes the WRITE); the grant after
                # it finds the pool's lock held.
                with monkeypatch.context() as m:
                    m.setattr(pool, "room_for", lambda need: False)
                    assert not jnl.append(d.dev.backend.disk_id,  # type: ignore[attr-defined]
                                          1, [memoryview(chunk(2))], durable=False)
                want = "the pool's lock was held (a decision on space)"
            assert jnl.lease_state().get("journal_c_not_granted") == want
        wait_granted(jnl, 10)
        assert d.write(CS, chunk(3)).good
        assert d.c_writes == (2, 0)  # the loop's: granted without a WRITE of Python's
        assert d.read(0, 2 * CS) == chunk(1) + chunk(3)


def test_a_lasting_reason_the_lease_is_out_stays_in_the_status_until_it_is_granted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status names why the lease is out. A decision on space or a new capacity takes the
    lease back; while it was out for a lasting reason already (here: the pool reached its soft
    threshold), that reason stays (before, "taken back" replaced it until the drainer's next
    grant). Once a grant succeeds (the threshold was lifted), the status names none."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 0.01)
    src = str(tmp_path / "pool")
    with served_pool(src, 16 * CS, soft_threshold=50) as pool, Disk(pool, "d") as d:
        jnl = pool.journal
        assert jnl is not None
        assert "journal_c_not_granted" not in jnl.lease_state()
        for k in range(8):  # the 8th reaches 50 %: Python's, and no lease after it
            assert d.write(k * CS, chunk(k)).good
        assert d.c_writes == (7, 1)
        assert d.ring.run(cdbs.test_unit_ready()).sense_codes == (0x6, 0x38, 0x07)
        lasting = "the pool's capacity or soft threshold"
        assert jnl.lease_state().get("journal_c_not_granted") == lasting
        with pool.lock:  # a decision on space: the drainer cannot grant meanwhile
            jnl.held()
            assert jnl.lease_state().get("journal_c_not_granted") == lasting
            jnl.take_back()
            assert jnl.lease_state().get("journal_c_not_granted") == lasting
        assert jnl.lease_state().get("journal_c_not_granted") == lasting
        pool.set_soft_threshold(None)  # takes the lease back: the drainer grants again
        wait_granted(jnl, 10)
        for _ in range(3):  # unit attentions the change may have raised
            if d.ring.run(cdbs.test_unit_ready()).good:
                break
        assert d.write(8 * CS, chunk(8)).good
        assert d.c_writes == (8, 1)
        assert d.read(0, 9 * CS) == b"".join(chunk(k) for k in range(9))


class _CountingLock:
    """The pool's lock, counting the acquisitions the journal's drainer thread makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.by_drainer = 0

    def _count(self) -> None:
        if threading.current_thread().name.startswith("dedup-jnl-"):
            self.by_drainer += 1

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._count()
        return bool(self.inner.acquire(blocking, timeout))

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_an_idle_drainer_takes_the_pool_lock_only_for_a_regrant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing to drain and no re-grant wanted, the drainer's wake-ups leave the pool's
    lock alone (it is every disk's metadata lock); a re-grant wanted takes it, and grants."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 0.005)
    with served_pool(str(tmp_path / "pool"), 256 * MIB) as pool, Disk(pool, "d") as d:
        jnl = pool.journal
        assert jnl is not None
        assert "journal_c_not_granted" not in jnl.lease_state()
        wakeups = 0
        due = jnl._due

        def counted_due() -> bool:
            nonlocal wakeups
            if threading.current_thread().name.startswith("dedup-jnl-"):
                wakeups += 1
            return due()

        counting = _CountingLock(pool.lock)
        monkeypatch.setattr(jnl, "_due", counted_due)
        monkeypatch.setattr(pool, "lock", counting)
        try:
            deadline = time.monotonic() + 10
            while wakeups < 20:
                assert time.monotonic() < deadline, wakeups
                time.sleep(0.005)
            assert counting.by_drainer == 0
            jnl.take_back()  # a re-grant wanted: the drainer takes the lock and grants
            wait_granted(jnl, 10)
            assert counting.by_drainer >= 1
        finally:
            monkeypatch.setattr(pool, "lock", counting.inner)
        assert d.write(0, chunk(1)).good
        assert d.c_writes == (1, 0)


def test_the_lease_comes_back_once_a_failed_fdatasync_is_drained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fdatasync of the journal fails: no lease (rule 5, "a failed fdatasync" in the
    status) until a SYNCHRONIZE CACHE drained the records it left in doubt. Then the lease is
    granted again without a WRITE of Python's first, and the status names no reason."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 0.01)
    with served_pool(str(tmp_path / "pool"), 256 * MIB) as pool, Disk(pool, "d") as d:
        jnl = pool.journal
        assert jnl is not None
        assert d.write(0, chunk(1)).good
        assert d.c_writes == (1, 0)
        real = os.fdatasync

        def failing(fd: int) -> None:
            if fd == jnl.fd:
                raise OSError(5, "Input/output error")
            real(fd)

        with monkeypatch.context() as m:
            m.setattr(journal.os, "fdatasync", failing)
            assert not d.sync().good
        jnl.take_back()  # the drainer's grant finds the failed fdatasync
        deadline = time.monotonic() + 10
        while jnl.lease_state().get("journal_c_not_granted") != "a failed fdatasync":
            assert time.monotonic() < deadline, jnl.lease_state()
            time.sleep(0.01)
        assert d.sync().good  # drains the records in doubt into the index
        wait_granted(jnl, 10)
        assert d.write(CS, chunk(2)).good
        assert d.c_writes == (2, 0)
        assert d.read(0, 2 * CS) == chunk(1) + chunk(2)
