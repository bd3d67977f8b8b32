"""ThinBackend: hard limit, concurrency, soft threshold, unmap edges, durability flags."""

from __future__ import annotations

import fcntl
import os
import random
import threading
from collections.abc import Iterator

import pytest

from tcmu_py.handlers.thin import Pool, ThinBackend, create_pool
from tcmu_py.handlers.thin import backend as backend_mod
from tcmu_py.handlers.thin.pool import count_units
from tcmu_py.handlers.thin.sparse import allocated_bytes, data_runs
from tcmu_py.scsi.sense import SpaceAllocationFailed

UNIT = 16 * 1024
BS = 512


def make_pool(tmp_path: object, units: int, threshold: int | None = None) -> Pool:
    path = os.path.join(str(tmp_path), "pool")
    create_pool(path, "t", units * UNIT, threshold, unit=UNIT)
    return Pool.open(path)


@pytest.fixture
def pool(tmp_path: object) -> Iterator[Pool]:
    p = make_pool(tmp_path, 8)
    yield p
    p.close()


def data(byte: int, n: int) -> list[memoryview]:
    return [memoryview(bytes([byte]) * n)]


def read(b: ThinBackend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    b.read(offset, [memoryview(buf)])
    return bytes(buf)


Snapshot = tuple[bytes, list[tuple[int, int, int]], int, list[tuple[int, int]]]


def snapshot(b: ThinBackend) -> Snapshot:
    return (read(b, 0, b.size), b.lba_status(0, b.size), b.pool.used,
            list(data_runs(b._fd, 0, b.size)))


def test_holes_read_zero_and_scattered_io(pool: Pool) -> None:
    b = pool.open_disk("d", 64 * UNIT, write_cache=True)
    assert read(b, 0, 3 * UNIT) == bytes(3 * UNIT)
    # More iovecs than one preadv/pwritev takes (IOV_MAX), each a different block.
    bufs = [memoryview(bytes([i % 251 + 1]) * 64) for i in range(1100)]
    b.write(UNIT, bufs)
    out = [bytearray(64) for _ in range(1100)]
    b.read(UNIT, [memoryview(x) for x in out])
    assert [bytes(x) for x in out] == [bytes(v) for v in bufs]
    assert b.provisioning().device_used == -(-1100 * 64 // UNIT) * UNIT
    b.close()


@pytest.mark.parametrize("write_cache", [False, True])
def test_write_cache_decides_o_dsync(pool: Pool, write_cache: bool) -> None:
    b = pool.open_disk("d", 4 * UNIT, write_cache=write_cache)
    flags = fcntl.fcntl(b._fd, fcntl.F_GETFL)
    # Without a write cache every write must be durable on return: O_DSYNC.
    assert bool(flags & os.O_DSYNC) is (not write_cache)
    assert b.write_cache is write_cache
    b.close()


def test_partial_unmap_zeroes_but_keeps_unit(pool: Pool) -> None:
    b = pool.open_disk("d", 4 * UNIT)
    b.write(0, data(7, 2 * UNIT))
    b.unmap(BS, UNIT)  # partial unit 0, partial unit 1
    assert read(b, 0, 2 * UNIT) == b"\x07" * BS + bytes(UNIT) + b"\x07" * (UNIT - BS)
    assert b.lba_status(0, 4 * UNIT) == [(0, 2 * UNIT, 0), (2 * UNIT, 2 * UNIT, 1)]
    assert pool.used == 2 * UNIT
    b.close()


def test_small_discards_covering_a_unit_free_it(pool: Pool) -> None:
    """fstrim sends 4 KiB discards; the unit returns when the last of them makes it all zero."""
    b = pool.open_disk("d", 4 * UNIT)
    b.write(UNIT, data(1, UNIT))
    for i in range(3):
        b.unmap(UNIT + i * 4096, 4096)
        assert pool.used == UNIT
    b.unmap(UNIT + 3 * 4096, 4096)
    assert pool.used == 0
    assert allocated_bytes(b._fd, 0, b.size) == 0
    assert b.lba_status(0, b.size) == [(0, 4 * UNIT, 1)]
    b.close()


def test_unmap_of_unallocated_edges_allocates_nothing(pool: Pool) -> None:
    b = pool.open_disk("d", 4 * UNIT)
    b.unmap(BS, 3 * UNIT)
    assert pool.used == 0 and allocated_bytes(b._fd, 0, b.size) == 0
    b.close()


def test_lba_status_starts_at_offset_and_limits_runs(pool: Pool) -> None:
    b = pool.open_disk("d", 8 * UNIT)
    b.write(2 * UNIT, data(1, BS))
    b.write(5 * UNIT + BS, data(1, BS))
    off = UNIT + 3 * BS
    assert b.lba_status(off, 8 * UNIT - off) == [
        (off, 2 * UNIT - off, 1), (2 * UNIT, UNIT, 0), (3 * UNIT, 2 * UNIT, 1),
        (5 * UNIT, UNIT, 0), (6 * UNIT, 2 * UNIT, 1),
    ]
    assert b.lba_status(2 * UNIT + BS, BS) == [(2 * UNIT + BS, BS, 0)]
    assert b.lba_status(off, 8 * UNIT - off, max_runs=2) == [(off, 2 * UNIT - off, 1),
                                                             (2 * UNIT, UNIT, 0)]
    b.close()


# --------------------------------------------------------------------------------------------
# Hard limit


def fill(b: ThinBackend, units: int) -> None:
    for u in range(units):
        b.write(u * UNIT, data(u + 1, UNIT))


def test_write_beyond_capacity_changes_nothing(pool: Pool) -> None:
    b = pool.open_disk("d", 16 * UNIT)
    fill(b, 7)
    before = snapshot(b)
    # Needs units 6 (allocated) .. 8: two new units, one too many.
    with pytest.raises(SpaceAllocationFailed) as exc:
        b.write(6 * UNIT + BS, data(0xEE, 2 * UNIT))
    assert (exc.value.sense_key, exc.value.asc, exc.value.ascq) == (0x07, 0x27, 0x07)
    assert snapshot(b) == before
    with pytest.raises(SpaceAllocationFailed):
        b.write_same(5 * UNIT, 4 * UNIT, b"\xab" * BS, False)
    assert snapshot(b) == before
    # One new unit still fits; then the pool is full but allocated units stay writable.
    b.write(7 * UNIT, data(9, BS))
    assert pool.used == pool.capacity
    b.write(3 * UNIT, data(0x33, UNIT))
    assert read(b, 3 * UNIT, UNIT) == b"\x33" * UNIT
    with pytest.raises(SpaceAllocationFailed):
        b.write(8 * UNIT, data(1, BS))
    # Deallocating gives the space back.
    b.unmap(0, UNIT)
    b.write(8 * UNIT, data(1, BS))
    b.close()


def test_capacity_shared_between_disks(pool: Pool) -> None:
    a = pool.open_disk("a", 16 * UNIT)
    b = pool.open_disk("b", 16 * UNIT)
    fill(a, 5)
    fill(b, 3)
    with pytest.raises(SpaceAllocationFailed):
        a.write(10 * UNIT, data(1, BS))
    assert pool.status().as_dict()["disks"] == [
        {"name": "a", "size": 16 * UNIT, "used": 5 * UNIT, "unit": UNIT, "open": True},
        {"name": "b", "size": 16 * UNIT, "used": 3 * UNIT, "unit": UNIT, "open": True},
    ]
    a.close()
    b.close()


def test_concurrent_writers_never_overshoot(tmp_path: object) -> None:
    pool = make_pool(tmp_path, 10)
    b = pool.open_disk("d", 64 * UNIT, write_cache=True)
    start = threading.Barrier(40)
    results: list[bool] = []
    lock = threading.Lock()

    def writer(u: int) -> None:
        start.wait()
        try:
            b.write(u * UNIT, data(u + 1, UNIT))
            ok = True
        except SpaceAllocationFailed:
            ok = False
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=writer, args=(u,)) for u in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10
    assert pool.used == 10 * UNIT == count_units(b._fd, UNIT, 0, b.size) * UNIT
    b.close()
    pool.close()


def test_concurrent_writers_to_one_unit_reserve_it_once(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(tmp_path, 1)
    b = pool.open_disk("d", 4 * UNIT, write_cache=True)
    start = threading.Barrier(32)
    landed = threading.Barrier(32)
    real_pwrite = backend_mod.pwrite_all

    def pwrite_after_all_admitted(fd: int, offset: int, bufs: list[memoryview],
                                  length: int = -1) -> None:
        landed.wait(timeout=10)  # every writer was admitted before any data lands
        real_pwrite(fd, offset, bufs, length)

    monkeypatch.setattr(backend_mod, "pwrite_all", pwrite_after_all_admitted)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        start.wait()
        try:
            b.write(UNIT + (i % 32) * BS, data(i + 1, BS))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.used == UNIT
    b.close()
    pool.close()


def test_mixed_concurrent_load_keeps_accounting_exact(tmp_path: object) -> None:
    """Writers, unmappers and write-sames racing over the same units; then a recount agrees."""
    pool = make_pool(tmp_path, 24)
    disks = [pool.open_disk(f"d{i}", 32 * UNIT, write_cache=True) for i in range(2)]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            b = disks[rng.randrange(2)]
            off = rng.randrange(0, b.size // BS) * BS
            n = min(rng.randrange(1, 3 * UNIT // BS) * BS, b.size - off)
            op = rng.randrange(4)
            try:
                if op == 0:
                    b.write(off, data(rng.randrange(256), n))
                elif op == 1:
                    b.unmap(off, n)
                elif op == 2:
                    b.write_same(off, n, bytes(BS), True)
                else:
                    b.write_same(off, n, b"\x5a" * BS, False)
            except SpaceAllocationFailed:
                pass

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = {d.name: pool.disk_used(d.name) for d in disks}
    for d in disks:
        assert live[d.name] == count_units(d._fd, UNIT, 0, d.size) * UNIT
        d.close()
    assert pool.used == sum(live.values()) <= pool.capacity
    pool.close()
    reopened = Pool.open(os.path.join(str(tmp_path), "pool"))
    assert {d.name: d.used for d in reopened.status().disks} == live
    reopened.close()


def test_failed_write_releases_its_reservation(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    b = pool.open_disk("d", 8 * UNIT)
    b.write(0, data(1, UNIT))

    def broken(fd: int, offset: int, bufs: object, length: int = -1) -> None:
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(backend_mod, "pwrite_all", broken)
    with pytest.raises(OSError):
        b.write(0, data(2, 3 * UNIT))
    assert pool.used == UNIT
    assert b._unconfirmed == set()
    b.close()


# --------------------------------------------------------------------------------------------
# Soft threshold


def test_soft_threshold_crossing_reported_once_per_disk(tmp_path: object) -> None:
    pool = make_pool(tmp_path, 8, threshold=50)
    a = pool.open_disk("a", 16 * UNIT)
    b = pool.open_disk("b", 16 * UNIT)
    fill(a, 3)
    assert not a.take_threshold_event() and not b.take_threshold_event()
    b.write(0, data(1, BS))  # 4 of 8 units: 50 % reached
    assert pool.generation == 1
    assert a.take_threshold_event() and not a.take_threshold_event()
    assert b.take_threshold_event() and not b.take_threshold_event()
    a.write(10 * UNIT, data(1, BS))  # still above: no new crossing
    assert not a.take_threshold_event()
    a.unmap(0, 3 * UNIT)  # below again: re-armed
    a.write(12 * UNIT, data(1, 3 * UNIT))
    assert pool.generation == 2
    assert a.take_threshold_event() and b.take_threshold_event()
    info = a.provisioning()
    assert (info.capacity, info.used, info.device_used, info.soft_threshold,
            info.threshold_generation) == (8 * UNIT, 5 * UNIT, 4 * UNIT, 50, 2)
    # The granularity and LBPRZ are `Unmap` promises, declared once on the backend.
    assert (a.unmap_granularity, a.lbprz) == (UNIT, True)
    a.set_soft_threshold(80)  # 5/8 < 80 %
    assert pool.generation == 2
    a.set_soft_threshold(25)  # lowered below the usage: a crossing
    assert pool.generation == 3 and b.take_threshold_event()
    a.close()
    b.close()
    pool.close()


def test_pool_opened_above_threshold_reports_once(tmp_path: object) -> None:
    pool = make_pool(tmp_path, 8, threshold=25)
    d = pool.open_disk("d", 8 * UNIT)
    fill(d, 3)
    d.close()
    pool.close()
    pool = Pool.open(os.path.join(str(tmp_path), "pool"))
    d = pool.open_disk("d", 8 * UNIT)
    assert d.take_threshold_event() and not d.take_threshold_event()
    d.close()
    pool.close()


# --------------------------------------------------------------------------------------------
# Resize, bounds, close


def test_resize_returns_cut_units(pool: Pool) -> None:
    b = pool.open_disk("d", 8 * UNIT)
    fill(b, 6)
    b.resize(4 * UNIT + BS)
    assert b.size == 4 * UNIT + BS and pool.used == 5 * UNIT
    b.resize(16 * UNIT)
    assert pool.used == 5 * UNIT
    assert read(b, 4 * UNIT, 2 * UNIT) == b"\x05" * BS + bytes(2 * UNIT - BS)
    b.close()


def test_out_of_range_is_refused(pool: Pool) -> None:
    b = pool.open_disk("d", 4 * UNIT)
    for call in (lambda: b.write(3 * UNIT, data(1, UNIT + BS)),
                 lambda: b.unmap(4 * UNIT, BS),
                 lambda: b.write_same(3 * UNIT, 2 * UNIT, bytes(BS), True)):
        with pytest.raises(ValueError):
            call()
    assert pool.used == 0 and os.fstat(b._fd).st_size == 4 * UNIT
    b.close()


def test_close_is_idempotent_and_calls_back(pool: Pool) -> None:
    calls: list[int] = []
    b = pool.open_disk("d", 4 * UNIT, on_close=lambda: calls.append(1))
    b.close()
    b.close()
    assert calls == [1]
    pool.open_disk("d", 4 * UNIT).close()  # may be opened again
