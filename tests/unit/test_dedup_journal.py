"""A dedup pool's write journal (handlers/dedup/journal.py): replay after a cut, epochs, a
torn record, its size changing, the capacity it reserves, a failed append, and writers racing
the drainer thread. The crash-point and model tests (test_dedup_crash.py, test_dedup_model.py)
run with a journal too."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handlers.dedup import (
    DedupPool,
    check_pool,
    create_pool,
    ensure_pool,
    journal,
    store,
)
from tcmu_py.handlers.dedup.journal import HEADER, JOURNAL_FILE
from tcmu_py.handlers.dedup.store import POOL_FILE
from tcmu_py.scsi.sense import SpaceAllocationFailed

CS = 4096
MIB = 1 << 20
SIZE = 64 * CS


@pytest.fixture(autouse=True)
def no_drainer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Drained at known points only (full, before other commands, at close), unless a test
    starts the thread itself."""
    monkeypatch.setattr(journal.Journal, "background", False)
    yield


def chunk(seed: int) -> bytes:
    return random.Random(seed).randbytes(CS)


def cut(pool_dir: str, dest: str) -> str:
    """What a power cut now leaves, for a pool whose files are all in the page cache (tmpfs):
    every file as it is, without the lock."""
    shutil.copytree(pool_dir, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def read_disk(pool: DedupPool, name: str) -> bytes:
    disk = pool.open_disk(name, SIZE)
    try:
        buf = bytearray(SIZE)
        disk.read(0, [memoryview(buf)])
        return bytes(buf)
    finally:
        disk.close()


def test_a_cut_replays_the_journal_and_a_torn_record_ends_it(tmp_path: Path) -> None:
    """Writes acknowledged from the journal (never drained) are in the index after a cut; a
    record torn by the cut ends the replay, and the records after it, though whole, are never
    taken: not at that open, and not later, when the new epoch's records lie where they did
    (the index would then hold an older write over a newer one)."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        for k in range(6):  # records 1..6: chunk k gets chunk(k); then chunk 4 again (7)
            disk.write(k * CS, [memoryview(chunk(k))])
        disk.write(4 * CS, [memoryview(chunk(40))])
        disk.flush()
        assert pool.journal is not None and pool.journal.pending == 7 * CS
        first = cut(src, str(tmp_path / "cut1"))
        disk.close()
    # Tear record 3 (chunk 2): the replay takes 1 and 2 only.
    rec = HEADER + CS
    jfile = Path(first, JOURNAL_FILE)
    data = bytearray(jfile.read_bytes())
    data[2 * rec + HEADER + 100] ^= 0xFF
    jfile.write_bytes(data)
    with DedupPool.open(first) as pool:
        got = read_disk(pool, "d")
        assert got[: 2 * CS] == chunk(0) + chunk(1)
        assert got[2 * CS :] == bytes(SIZE - 2 * CS)  # records 3.. are not taken
        # The next epoch's records start where record 3 lay, numbered 3, 4, ...: one the
        # size of the torn one, so that its successor would lie where record 4 (of the old
        # epoch, whole) does.
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(3 * CS, [memoryview(chunk(33))])
        disk.flush()
        second = cut(first, str(tmp_path / "cut2"))
        disk.close()
    report = check_pool(second)  # offline: the index alone, the journal's write noted
    assert report.clean and len(report.notes) == 1 and "holds 1 write(s)" in report.notes[0]
    with DedupPool.open(second) as pool:
        got = read_disk(pool, "d")
    assert got[: 4 * CS] == chunk(0) + chunk(1) + bytes(CS) + chunk(33)
    assert got[4 * CS :] == bytes(SIZE - 4 * CS), "an old epoch's record was replayed"
    assert check_pool(second).clean and not check_pool(second).notes  # replayed at the open
    # The untouched pool drains at close: everything there.
    with DedupPool.open(src) as pool:
        got = read_disk(pool, "d")
    assert got[: 6 * CS] == b"".join(chunk(k) for k in (0, 1, 2, 3, 40, 5))
    assert check_pool(src).clean


def test_the_journal_size_changes_at_the_next_open(tmp_path: Path) -> None:
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    jfile = Path(src, JOURNAL_FILE)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(1))])
        disk.flush()
        ensure_pool(src, "j", 256 * MIB, journal=8 * MIB)  # the live pool's: at the next open
        assert jfile.stat().st_size == 4 * MIB
        before = cut(src, str(tmp_path / "cut"))
        disk.close()
    with DedupPool.open(before) as pool:  # replayed with the old size, then made anew
        assert Path(before, JOURNAL_FILE).stat().st_size == 8 * MIB
        assert read_disk(pool, "d")[:CS] == chunk(1)
    ensure_pool(src, "j", 256 * MIB, journal=0)
    with DedupPool.open(src) as pool:
        assert pool.journal is None and not jfile.exists()
        assert read_disk(pool, "d")[:CS] == chunk(1)
    assert '"version": 4' in Path(src, POOL_FILE).read_text()  # never lowered


def test_journaled_chunks_count_against_the_capacity(tmp_path: Path) -> None:
    """A write whose chunks would not fit were they all unique goes to the index, which
    refuses it if they do not fit (SPACE ALLOCATION FAILED) and takes it if they are
    duplicates; the pool never holds more than its capacity."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 16 * CS, soft_threshold=None, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        for k in range(16):
            disk.write(k * CS, [memoryview(chunk(k))])
        assert pool.journal is not None and pool.journal.reserved == 16 * CS
        with pytest.raises(SpaceAllocationFailed):
            disk.write(16 * CS, [memoryview(chunk(16))])
        disk.write(17 * CS, [memoryview(chunk(3))])  # a duplicate: fits
        disk.flush()
        assert pool.journal.pending == 0 and pool.used == 16 * CS
        got = bytearray(SIZE)
        disk.read(0, [memoryview(got)])
        assert bytes(got[: 18 * CS]) == b"".join(chunk(k) for k in range(16)) + bytes(CS) + \
            chunk(3)
        disk.close()


def test_a_journaled_write_crossing_the_soft_threshold_reports_it_once(tmp_path: Path) -> None:
    """Before: the crossing was counted when the journal drained, after the write had asked
    (`take_threshold_event`) and in a thread no command follows: no disk reported SOFT THRESHOLD
    REACHED until some later write, and a pool filled by journaled writes never did before its
    writes were refused. Now the write that takes the use plus the journal's bytes across the
    threshold reports it, on each disk, once (the drain counts no second crossing)."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 16 * CS, soft_threshold=50, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        a = pool.open_disk("a", SIZE, write_cache=True)
        b = pool.open_disk("b", SIZE, write_cache=True)
        for k in range(7):  # 7 of 16 chunks: below 50 %
            a.write(k * CS, [memoryview(chunk(k))])
            assert not a.take_threshold_event()
        a.write(7 * CS, [memoryview(chunk(7))])  # 8 of 16: the crossing
        assert pool.journal is not None and pool.journal.pending == 8 * CS
        assert a.take_threshold_event() and b.take_threshold_event()
        # LOG SENSE 0Ch's used count (the one the threshold is met on, SBC-4 4.7.3.7) holds
        # them too; before: 0 until drained, below the threshold just reported
        assert a.provisioning().used == b.provisioning().used == 8 * CS
        pool.journal.drain_all()  # into the index: used 8 chunks, no second crossing
        assert pool.journal.pending == 0 and pool.used == 8 * CS
        assert a.provisioning().used == 8 * CS
        a.write(8 * CS, [memoryview(chunk(8))])
        assert not a.take_threshold_event() and not b.take_threshold_event()
        a.close()
        b.close()


def test_a_failed_append_is_an_error_and_the_journal_goes_on(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The WRITE whose append fails gets the error and leaves its chunk as it was; the next
    SYNCHRONIZE CACHE drains the records around the failed one into the index (replay would
    stop at it), and every other write is kept."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(0))])
        real = os.pwritev
        jfd = pool.journal.fd if pool.journal is not None else -1
        fail = [True]

        def pwritev(fd: int, bufs: Any, offset: int) -> int:
            if fd == jfd and fail and fail.pop():
                raise OSError(5, "injected")
            return real(fd, bufs, offset)

        monkeypatch.setattr(os, "pwritev", pwritev)
        with pytest.raises(OSError):
            disk.write(CS, [memoryview(chunk(1))])
        disk.write(2 * CS, [memoryview(chunk(2))])
        disk.flush()
        assert pool.journal is not None and pool.journal.pending == 0  # drained: rule 5
        monkeypatch.undo()
        expect = chunk(0) + bytes(CS) + chunk(2)
        got = bytearray(3 * CS)
        disk.read(0, [memoryview(got)])
        assert bytes(got) == expect
        after = cut(src, str(tmp_path / "cut"))
        disk.close()
    with DedupPool.open(after) as pool:
        assert read_disk(pool, "d")[: 3 * CS] == expect


def test_writers_racing_the_drainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads write whole and partial chunks to two disks of a pool with a small
    journal while its drainer runs (and the writers drain it when full); every read during and
    after matches what was written, and the pool checks clean."""
    monkeypatch.setattr(journal.Journal, "background", True)
    monkeypatch.setattr(journal, "IDLE_SECONDS", 0.001)
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    errors: list[BaseException] = []
    models = {d: bytearray(SIZE) for d in "ab"}
    with DedupPool.open(src) as pool:
        disks = {d: pool.open_disk(d, SIZE, write_cache=d == "a") for d in "ab"}

        def work(t: int) -> None:
            rng = random.Random(t)
            d = "ab"[t % 2]
            disk, model = disks[d], models[d]
            lo = (t // 2) * (SIZE // 2)  # each thread its own half of its disk
            try:
                for _ in range(150):
                    if rng.random() < 0.8:
                        off = lo + rng.randrange(SIZE // 2 // CS) * CS
                        n = min(rng.choice([1, 2, 4]) * CS, lo + SIZE // 2 - off)
                    else:
                        off = lo + rng.randrange(SIZE // 2 // 512) * 512
                        n = min(rng.randrange(1, 12) * 512, lo + SIZE // 2 - off)
                    data = (rng.randbytes(n) if rng.random() < 0.6
                            else (chunk(rng.randrange(4)) * 4)[:n])
                    disk.write(off, [memoryview(data)])
                    model[off : off + n] = data
                    if rng.random() < 0.2:
                        buf = bytearray(SIZE // 2)
                        disk.read(lo, [memoryview(buf)])
                        assert buf == model[lo : lo + SIZE // 2]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        for d, disk in disks.items():
            buf = bytearray(SIZE)
            disk.read(0, [memoryview(buf)])
            assert buf == models[d]
            disk.close()
    assert check_pool(src).clean
    with DedupPool.open(src) as pool:
        for d in "ab":
            assert read_disk(pool, d) == bytes(models[d])


def test_a_missing_journal_file_is_reported(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src):
        pass
    os.unlink(os.path.join(src, JOURNAL_FILE))
    with DedupPool.open(src) as pool:
        assert pool.journal is not None
    assert "journal.dat is missing" in caplog.text
    caplog.clear()
    ensure_pool(src, "j", 256 * MIB, journal=0)
    with DedupPool.open(src):
        pass
    ensure_pool(src, "j", 256 * MIB, journal=4 * MIB)  # turned off, then on: nothing missing
    with DedupPool.open(src):
        pass
    assert "missing" not in caplog.text


def test_a_dropped_disks_journaled_writes_never_reach_the_next_disk(tmp_path: Path) -> None:
    """Dropping a disk drains the journal first: its records, still there, would otherwise be
    put into the index under its id, which a disk made next may get."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("old", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(7))])
        disk.close()
        pool.drop_disk("old")
        assert read_disk(pool, "new") == bytes(SIZE)


def test_after_a_failed_journal_fdatasync_syncs_drain_into_the_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync(2) reports a failed write-back once and the kernel marks the pages clean: the
    SYNCHRONIZE CACHE that met it fails, and a later one must not answer GOOD on the journal's
    say-so (a power cut would then find the earlier record missing, and the replay would stop
    there, before the later, "durable" one). Later syncs drain the records into the index
    instead, so both writes survive a cut that loses the first record's bytes."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(1))])
        assert pool.journal is not None
        jfd, real = pool.journal.fd, os.fdatasync
        fail = [True]

        def fdatasync(fd: int) -> None:
            if fd == jfd and fail and fail.pop():
                raise OSError(5, "injected write-back error")
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        with pytest.raises(OSError):
            disk.flush()
        disk.write(CS, [memoryview(chunk(2))])
        disk.flush()
        assert pool.journal.pending == 0  # drained: the index holds both
        after = cut(src, str(tmp_path / "cut"))
        disk.close()
    jfile = Path(after, JOURNAL_FILE)
    data = bytearray(jfile.read_bytes())
    data[: HEADER + CS] = bytes(HEADER + CS)  # the failed write-back: record 1 never landed
    jfile.write_bytes(data)
    with DedupPool.open(after) as pool:
        assert read_disk(pool, "d")[: 2 * CS] == chunk(1) + chunk(2)


def test_a_record_read_back_wrong_is_a_lost_write(tmp_path: Path) -> None:
    """A drain reads each record back with its checksum: bytes that changed under it (lost
    pages) are not put in the index, and the disk's next SYNCHRONIZE CACHE reports the loss."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(1))])
        disk.write(CS, [memoryview(chunk(2))])
        assert pool.journal is not None
        os.pwrite(pool.journal.fd, b"\xff" * 16, HEADER + 64)  # record 1's data, damaged
        pool.journal.drain_all()
        assert disk.lost_writes() is not None
        assert disk.lost_writes() is None  # once
        got = bytearray(2 * CS)
        disk.read(0, [memoryview(got)])
        assert bytes(got) == bytes(CS) + chunk(2)
        disk.close()


def test_draining_a_long_backlog_is_bounded_by_progress_not_by_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that needs the index to itself waits for the whole backlog however long that
    takes while the drain makes progress (it once failed with EIO after a fixed 20 s)."""
    monkeypatch.setattr(journal, "WAIT_SECONDS", 0.05)
    monkeypatch.setattr(journal, "STEP_BYTES", CS)  # one record per step
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        for k in range(SIZE // CS):
            disk.write(k * CS, [memoryview(chunk(k))])
        real = pool.put_journaled

        def slow(*args: Any, **kw: Any) -> None:
            time.sleep(0.01)
            real(*args, **kw)

        monkeypatch.setattr(pool, "put_journaled", slow)
        disk.write(5, [memoryview(b"x" * 512)])  # part of a chunk: after all 64 records
        got = bytearray(CS)
        disk.read(0, [memoryview(got)])
        assert bytes(got) == chunk(0)[:5] + b"x" * 512 + chunk(0)[517:]
        disk.close()


def test_a_drain_failing_at_close_keeps_the_writes_for_the_next_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """The pool still closes (its lock released, so the next open works) and says why; the
    records stay in the journal and the next open replays them."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    pool = DedupPool.open(src)
    disk = pool.open_disk("d", SIZE, write_cache=True)
    disk.write(0, [memoryview(chunk(7))])
    disk.flush()
    disk.close()

    def fail(*_args: object) -> None:
        raise OSError(5, "injected")

    monkeypatch.setattr(pool, "put_journaled", fail)
    pool.close()
    monkeypatch.undo()
    assert "could not be drained at close" in caplog.text
    with DedupPool.open(src) as pool:
        assert read_disk(pool, "d")[:CS] == chunk(7)
    assert check_pool(src).clean


def test_space_the_journal_reserved_is_counted_when_dead_chunks_are_compacted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to the index that fits once dead chunks are compacted, but only counting the
    space the journal reserved (another disk's records, journaled after this write drained
    the journal), compacts them rather than failing with SPACE ALLOCATION FAILED (the
    compaction's estimate left the reservation out)."""
    src = str(tmp_path / "pool")
    monkeypatch.setattr(store, "is_journal_size", lambda v: isinstance(v, int) and v >= 0)
    create_pool(src, "j", 16 * CS, soft_threshold=None, journal=64 * 1024)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        other = pool.open_disk("e", SIZE, write_cache=True)
        jnl = pool.journal
        assert jnl is not None
        # 8 chunks in one record: more than a quarter of the journal, so to the index
        disk.write(0, [memoryview(b"".join(chunk(k) for k in range(8)))])
        disk.unmap(0, 8 * CS)  # 8 dead chunks, not compacted (no collector)
        assert pool.used == 8 * CS and jnl.reserved == 0
        real = jnl.drain_all

        def drain_then_other_disk_writes(upto: int | None = None) -> None:
            real(upto)
            if not jnl.reserved:  # the other disk's writer, between the drain and the write
                other.write(0, [memoryview(chunk(50))])
                other.write(CS, [memoryview(chunk(51))])

        monkeypatch.setattr(jnl, "drain_all", drain_then_other_disk_writes)
        new = b"".join(chunk(100 + k) for k in range(8))
        disk.write(16 * CS, [memoryview(new)])  # 8 used + 2 reserved + 8 new > 16: compacts
        assert jnl.reserved == 2 * CS
        monkeypatch.setattr(jnl, "drain_all", real)
        disk.flush()
        got = bytearray(SIZE)
        disk.read(0, [memoryview(got)])
        assert bytes(got[16 * CS : 24 * CS]) == new and not any(got[: 16 * CS])
        other.read(0, [memoryview(got)])
        assert bytes(got[: 2 * CS]) == chunk(50) + chunk(51)
        assert pool.used <= 16 * CS
        disk.close()
        other.close()
    assert check_pool(src).clean


def test_a_cut_while_the_journal_is_turned_off_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """Turning the journal off replays it, records that it is gone, then removes the file: a
    cut between the two (here: the recording fails) leaves the file for the next open, which
    finds nothing missing (the file went first before, and the next open reported every
    acknowledged write of the journal as lost)."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 256 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("d", SIZE, write_cache=True)
        disk.write(0, [memoryview(chunk(9))])
        disk.flush()
        after = cut(src, str(tmp_path / "cut"))
        disk.close()
    ensure_pool(after, "j", 256 * MIB, journal=0)
    real = DedupPool.set_journal_meta

    def cut_at_recording(self: DedupPool, pos: int, seq: int, epoch: int) -> None:
        if not epoch:
            raise OSError(5, "power cut")
        real(self, pos, seq, epoch)

    monkeypatch.setattr(DedupPool, "set_journal_meta", cut_at_recording)
    with pytest.raises(OSError, match="power cut"):
        DedupPool.open(after)
    monkeypatch.undo()
    with DedupPool.open(after) as pool:
        assert pool.journal is None
        assert read_disk(pool, "d")[:CS] == chunk(9)
    assert "missing" not in caplog.text
    assert not Path(after, JOURNAL_FILE).exists()
    assert check_pool(after).clean


def test_a_journal_file_left_by_a_removal_cut_short_is_made_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal turned off, the open that removes its file cut after recording "no journal"
    (epoch 0) and before the removal was durable, then turned on again at the same size.
    Before: the left file was taken as the journal and the epochs restarted at 1, the left
    records' epoch: records a first cut had left past a hole became valid again, and the next
    open replayed them over writes flushed since. Now such a file is made anew."""
    src = str(tmp_path / "pool")
    create_pool(src, "j", 16 * MIB, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        d = pool.open_disk("d", SIZE, write_cache=True)
        for i in range(4):  # records 1..4, never synced
            d.write(i * CS, [memoryview(chunk(100 + i))])
        crash = cut(src, str(tmp_path / "crash"))
        d.close()
    jf = Path(crash, JOURNAL_FILE)
    data = bytearray(jf.read_bytes())
    data[: HEADER + CS] = bytes(HEADER + CS)  # write-back had not reached record 1
    jf.write_bytes(bytes(data))
    ensure_pool(crash, "j", 16 * MIB, journal=0)
    real_unlink = os.unlink

    def cut_short(path: Any, *args: Any, **kw: Any) -> None:
        if str(path).endswith(JOURNAL_FILE):
            raise OSError(5, "the power failed")
        real_unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", cut_short)
    with pytest.raises(OSError, match="power failed"):
        DedupPool.open(crash)
    monkeypatch.setattr(os, "unlink", real_unlink)
    ensure_pool(crash, "j", 16 * MIB, journal=4 * MIB)
    want = [chunk(200)] + [chunk(200 + i)[: CS // 2] + bytes(CS // 2) for i in (1, 2, 3)]
    with DedupPool.open(crash) as pool:
        d = pool.open_disk("d", SIZE, write_cache=True)
        d.write(0, [memoryview(chunk(200))])  # a record of the new epoch
        for i in (1, 2, 3):  # through the index
            d.write(i * CS, [memoryview(chunk(200 + i)[: CS // 2])])
        d.flush()
        d.close()
    with DedupPool.open(crash) as pool:
        got = read_disk(pool, "d")
    assert [got[i * CS : (i + 1) * CS] for i in range(4)] == want
    assert check_pool(crash).clean


def test_offline_status_counts_the_journal_records_not_yet_in_the_index(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tcmu-py dedup status` on a pool no process of its own has open (a daemon killed with
    records in its journal, or serving it elsewhere) said ``journal_pending: -1``, a value the
    docs never name, while `dedup check` counted the records. Now the records past the
    index's committed tail are counted, as `check` and the next open's replay take them."""
    from tcmu_py.handlers.dedup import config as dedup_config
    from tcmu_py.handlers.dedup.store import read_pool_status

    src = str(tmp_path / "pool")
    create_pool(src, "j", 64 * CS, soft_threshold=None, journal=4 * MIB)
    with DedupPool.open(src) as pool:
        disk = pool.open_disk("a", SIZE, write_cache=True)
        for k in range(3):
            disk.write(k * CS, [memoryview(chunk(k))])
        disk.write(8 * CS, [memoryview(chunk(8) + chunk(9))])
        disk.flush()
        left = cut(src, str(tmp_path / "cut"))
        disk.close()
    status = read_pool_status(left)
    assert status.journal_pending == 5 * CS
    assert read_pool_status(src).journal_pending == 0  # drained at the close
    assert dedup_config.main(["status", "--json", left]) == 0
    assert '"journal_pending": 20480' in capsys.readouterr().out


def test_status_shows_the_pools_it_can_read_beside_one_it_cannot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: one path that is not a pool made `tcmu-py dedup status GOOD TYPO` print nothing
    but the error. Now GOOD's row, the error on stderr, exit 2."""
    from tcmu_py.handlers.dedup import config as dedup_config

    good = str(tmp_path / "good")
    create_pool(good, "good", 16 * CS, soft_threshold=None)
    assert dedup_config.main(["status", good, str(tmp_path / "typo")]) == 2
    out, err = capsys.readouterr()
    assert "good" in out.splitlines()[-1] and "typo" in err and "pool.json" in err
