"""Dedup pools and disks: sharing, space, SCSI provisioning, the collector, repair and check,
the YAML section and the ``tcmu-py dedup`` commands."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import yaml

from tcmu_py.backend import ChunkExtent, NativeKit
from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig, load_handlers
from tcmu_py.handlers.dedup import (
    DedupHandler,
    DedupPool,
    acquire_pool,
    check_pool,
    create_pool,
    ensure_pool,
    read_pool_status,
    release_pool,
    store,
)
from tcmu_py.handlers.dedup import config as dedup_config
from tcmu_py.handlers.dedup.handler import register_pool, unregister_pool
from tcmu_py.handlers.dedup.store import CONTAINER_DIR, DB_FILE, container_file
from tcmu_py.scsi.sense import SpaceAllocationFailed
from tcmu_py.testing import cdbs, conformance, harness

CS = 4096
BS = 512
_names = itertools.count()


@pytest.fixture
def pool_dir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    path = os.path.join(tmp_path, "pool")
    create_pool(path, "dd", 8 * CS, 50)
    register_pool("dd", path)
    yield path
    unregister_pool("dd")


def device_config(cfg: str = "pool=dd", name: str | None = None, size: int = 64 * CS,
                  write_cache: bool = True) -> DeviceConfig:
    return DeviceConfig(name=name or f"d{next(_names)}", subtype="dedup", cfgstring=cfg,
                        size=size, block_size=BS, write_cache=write_cache)


def chunk(seed: int) -> bytes:
    return random.Random(seed).randbytes(CS)


def read(backend: object, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.read(offset, [memoryview(buf)])  # type: ignore[attr-defined]
    return bytes(buf)


def container_bytes_on_disk(path: str) -> int:
    """Bytes of the container files; one the collector deletes between the listing and its
    stat counts as gone (a race the served-pool test lost now and then: FileNotFoundError)."""
    d = os.path.join(path, CONTAINER_DIR)
    total = 0
    for f in os.listdir(d):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(os.path.join(d, f)).st_size
    return total


# ------------------------------------------------------------------------------------------
# Sharing and space


def test_two_disks_share_chunks_and_zeros_cost_nothing(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 20)
    with DedupPool.open(path) as pool:
        a = pool.open_disk("a", 64 * CS)
        b = pool.open_disk("b", 64 * CS, write_cache=True)
        a.write(0, [memoryview(chunk(1) + chunk(2))])
        b.write(10 * CS, [memoryview(chunk(2) + chunk(1) + chunk(1))])
        b.write(20 * CS, [memoryview(bytes(8 * CS))])  # zeros: no chunk, no map entry
        assert pool.used == 2 * CS
        st = pool.status()
        assert (st.logical, st.unique, st.chunks) == (5 * CS, 2 * CS, 2)
        assert st.ratio == 2.5
        assert read(b, 10 * CS, 3 * CS) == chunk(2) + chunk(1) + chunk(1)
        assert b.lba_status(0, 64 * CS) == [(0, 10 * CS, 1), (10 * CS, 3 * CS, 0),
                                            (13 * CS, 51 * CS, 1)]
        assert b.lba_status(11 * CS, CS, max_runs=1) == [(11 * CS, CS, 0)]
        # Overwrite and unmap drop references; the garbage stays until collected.
        a.write(0, [memoryview(chunk(3))])
        a.unmap(CS, CS)
        b.unmap(10 * CS, 3 * CS)
        b.flush()
        assert (pool.status().unique, pool.used) == (CS, 3 * CS)
        assert pool.dead_bytes() == 2 * CS
        a.close()
        b.close()
    assert check_pool(path).clean


def test_partial_chunk_writes_read_modify_write() -> None:
    """Blocks smaller than a chunk: the rest of the chunk keeps its bytes; a chunk that
    becomes all zeros is deallocated."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        create_pool(d + "/p", "p", 1 << 20)
        with DedupPool.open(d + "/p") as pool:
            disk = pool.open_disk("a", 16 * CS + 3 * BS)  # a short last chunk
            disk.write(BS, [memoryview(b"\x01" * BS), memoryview(b"\x02" * 2 * BS)])
            want = bytes(BS) + b"\x01" * BS + b"\x02" * 2 * BS + bytes(4 * BS)
            assert read(disk, 0, CS) == want
            disk.write_same(CS - BS, 3 * BS, b"\x07" * BS, False)
            assert read(disk, CS - BS, 3 * BS) == b"\x07" * 3 * BS
            last = 16 * CS
            disk.write(last + BS, [memoryview(b"\x09" * 2 * BS)])
            assert read(disk, last, 3 * BS) == bytes(BS) + b"\x09" * 2 * BS
            disk.unmap(last, 3 * BS)  # the whole short chunk: deallocated
            disk.unmap(0, CS - BS)
            disk.unmap(CS - BS, 3 * BS)  # partial in both chunks
            assert disk.lba_status(0, 16 * CS + 3 * BS) == [(0, 16 * CS + 3 * BS, 1)]
            assert read(disk, 0, 2 * CS) == bytes(2 * CS)
            disk.close()
        assert check_pool(d + "/p").clean


def test_concurrent_writes_to_one_chunk_lose_nothing(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 4 * CS, write_cache=True)
        per = CS // BS

        def writer(block: int) -> None:
            for i in range(30):
                disk.write(block * BS, [memoryview(bytes([block * 7 + i % 5 + 1]) * BS)])
            disk.write(block * BS, [memoryview(bytes([block + 1]) * BS)])

        threads = [threading.Thread(target=writer, args=(b,)) for b in range(per)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert read(disk, 0, CS) == b"".join(bytes([b + 1]) * BS for b in range(per))
        disk.close()
    assert check_pool(path).clean


def test_collector_gives_space_back_to_the_file_system(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    with DedupPool.open(path, container_bytes=8 * CS) as pool:
        disk = pool.open_disk("a", 64 * CS)
        disk.write(0, [memoryview(b"".join(chunk(i) for i in range(40)))])
        assert container_bytes_on_disk(path) == 40 * CS
        disk.unmap(0, 30 * CS)  # most containers entirely dead
        disk.write(45 * CS, [memoryview(chunk(35))])  # one live chunk referenced twice
        assert pool.collect(0.0, dead_percent=1).containers == 1  # at least one per call
        progress = pool.collect(30, dead_percent=1)
        assert progress.done and progress.dead_left == 0
        assert container_bytes_on_disk(path) == pool.used == 10 * CS
        assert read(disk, 30 * CS, 10 * CS) == b"".join(chunk(i) for i in range(30, 40))
        assert read(disk, 45 * CS, CS) == chunk(35)
        # Content written again after its chunk was collected is stored anew.
        disk.write(0, [memoryview(chunk(0))])
        assert read(disk, 0, CS) == chunk(0)
        disk.close()
    assert check_pool(path).clean


class RecordingTable:
    """A `tcmu_py.backend.ChunkTable` that keeps its entries in a dict and checks that every fd
    it is given, or told to drop, is still open."""

    hits = misses = 0

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, int]] = {}
        self.dropped: list[int] = []

    def set(self, idxs: list[int], fds: list[int], offs: list[int]) -> None:
        for idx, fd, off in zip(idxs, fds, offs, strict=True):
            if fd == -2:
                self.entries.pop(idx, None)
                continue
            if fd >= 0:
                os.fstat(fd)
            self.entries[idx] = (fd, off)

    def clear(self) -> None:
        self.entries.clear()

    def drop_fd(self, fd: int) -> None:
        os.fstat(fd)  # not closed yet
        self.dropped.append(fd)
        self.entries = {i: e for i, e in self.entries.items() if e[0] != fd}

    def check(self, disk: object) -> int:
        """Every entry names the chunk's current bytes (what the backend reads); how many."""
        entries = dict(self.entries)  # before the reads below tell the table anything
        for idx, (fd, off) in entries.items():
            want = read(disk, idx * CS, CS)
            got = bytes(CS) if fd == -1 else os.pread(fd, CS, off)
            assert got == want, idx
        return len(entries)


def fail(fd: int) -> None:
    raise OSError(errno.EIO, "injected")


def test_chunk_table_names_current_bytes_through_writes_collection_and_rollback(
        tmp_path: os.PathLike[str]) -> None:
    """The contract of the native loop's table (`tcmu_py.backend.ChunkExtent`): every entry
    names the chunk's current bytes after writes, unmaps, partial writes, collection (a
    container's fd is dropped before it is closed), a rolled-back command, a failed commit and
    compression."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 48 * CS)
    table = RecordingTable()
    with DedupPool.open(path, container_bytes=8 * CS) as pool:
        disk = pool.open_disk("a", 64 * CS, write_cache=True)
        assert disk.file_extent() is None  # no native loop: no extent
        disk.native_kit = NativeKit(None, None, lambda cs, n: table)  # type: ignore[arg-type]
        extent = disk.file_extent()
        assert isinstance(extent, ChunkExtent) and extent.table is table
        disk.write(0, [memoryview(b"".join(chunk(i) for i in range(40)))])
        assert table.check(disk) == 40
        read(disk, 40 * CS, 8 * CS)  # zeros, learnt by a read
        disk.write(2 * CS + BS, [memoryview(b"x" * BS)])  # part of a chunk
        disk.unmap(0, 30 * CS)
        disk.write(45 * CS, [memoryview(chunk(35))])
        assert table.check(disk) == 48
        progress = pool.collect(30, dead_percent=1)
        assert progress.done and progress.containers >= 3
        assert len(table.dropped) == progress.containers
        read(disk, 0, 64 * CS)
        assert table.check(disk) == 64
        with pytest.raises(SpaceAllocationFailed):  # rolled back: nothing changes
            disk.write(0, [memoryview(b"".join(chunk(100 + i) for i in range(60)))])
        assert table.check(disk) == 64
        disk.flush()
        disk.write(0, [memoryview(chunk(200) + chunk(201))])  # lost by the failing commit:
        with pytest.MonkeyPatch.context() as mp:  # its bytes past the container's committed
            mp.setattr(os, "fdatasync", fail)  # end are written again by the next append
            with pytest.raises(OSError):
                disk.flush()
        disk.write(5 * CS, [memoryview(chunk(202) + chunk(203))])
        assert table.check(disk) == 2  # emptied by the rollback, then told the new write
        read(disk, 0, 64 * CS)
        pool.set_compression("zstd")
        disk.write(50 * CS, [memoryview(b"z" * CS)])  # stored compressed: the loop cannot
        assert 50 not in table.entries and table.check(disk) == 63
        disk.close()
        assert not table.entries
    assert check_pool(path).clean


def test_native_reads_stay_right_while_the_collector_moves_chunks(tmp_path: os.PathLike[str]
                                                                  ) -> None:
    """READs the native loop serves from the chunk table, while the collector (another thread)
    moves the live chunks they read and deletes the containers they were in: every READ gets
    the chunk's bytes (a container's fd is dropped from the table before it is closed; a new
    container may get the same fd number)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 24)
    pool = acquire_pool(path)  # shared with the device the handler opens
    pool.container_bytes = 8 * CS
    n = 128
    dev = DedupHandler.open(DeviceConfig("c0", "dedup", f"pool={path}", n * CS, block_size=BS,
                                         write_cache=True))
    h = harness.RingHarness(dev)
    per = CS // BS
    done = threading.Event()
    failed: list[BaseException] = []

    def collect() -> None:
        try:
            while pool.collect_step(dead_percent=1, batch_bytes=2 * CS) is not None:
                pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)
        finally:
            done.set()

    try:
        h.run(cdbs.test_unit_ready())  # power-on unit attention
        for i in range(0, n, 16):
            data = b"".join(chunk(j) for j in range(i, i + 16))
            assert h.run(cdbs.write16(i * per, 16 * per), data_out=data).good
        params = cdbs.unmap_parameters([(i * per, per) for i in range(1, n, 2)])
        assert h.run(cdbs.unmap(len(params)), data_out=params).good  # every container half dead
        rng = random.Random(14)
        thread = threading.Thread(target=collect)
        thread.start()
        deadline = time.monotonic() + 60
        reads = 0
        while not done.is_set() or reads < 256:
            assert time.monotonic() < deadline, f"{reads} READs"
            i = rng.randrange(0, n, 2)
            r = h.run(cdbs.read16(i * per, per), data_in_len=CS)
            assert r.good and r.data == chunk(i), (i, reads)
            reads += 1
        thread.join()
        assert not failed, failed
        assert pool.status().compacted >= n // 8 - 1
        assert dev.backend.c_reads[0] > 0
        assert read(dev.backend, 0, 2 * CS) == chunk(0) + bytes(CS)
    finally:
        done.wait(60)
        h.close()
        dev.close()
        release_pool(pool)
    assert check_pool(path).clean


def test_a_large_disk_s_chunks_all_have_a_place_in_its_chunk_table(
        tmp_path: os.PathLike[str]) -> None:
    """The chunk table covers a disk of 2**17 chunks whole (512 MiB of 4 KiB chunks, sparse):
    two chunks 2**16 apart, which shared a slot when tables had 2**16, are both read by the
    native loop once written; emptying the table (as a rolled-back commit does) sends the next
    READs to Python, which puts the entries back."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 24)
    n = 1 << 17
    dev = DedupHandler.open(DeviceConfig("c0", "dedup", f"pool={path}", n * CS, block_size=BS,
                                         write_cache=True))
    h = harness.RingHarness(dev)
    per = CS // BS
    idxs = (5, 5 + (1 << 16), n - 1)
    try:
        h.run(cdbs.test_unit_ready())  # power-on unit attention
        for i in idxs:
            assert h.run(cdbs.write16(i * per, per), data_out=chunk(i)).good

        def read_all() -> tuple[int, int]:
            before = dev.backend.c_reads
            for i in idxs:
                r = h.run(cdbs.read16(i * per, per), data_in_len=CS)
                assert r.good and r.data == chunk(i), i
            after = dev.backend.c_reads
            return after[0] - before[0], after[1] - before[1]

        assert read_all() == (3, 0)  # the writes told the table: every READ in C
        assert read_all() == (3, 0)
        pool = dev.backend.pool
        with pool.lock:
            pool._forget()  # noqa: SLF001 - what a rollback does to the caches and tables
        assert read_all() == (0, 3)  # emptied: Python's, which tells the table again
        assert read_all() == (3, 0)
    finally:
        h.close()
        dev.close()
    assert check_pool(path).clean


def test_collector_steps_are_bounded_and_keep_revived_chunks(tmp_path: os.PathLike[str]
                                                            ) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    with DedupPool.open(path, container_bytes=16 * CS) as pool:
        disk = pool.open_disk("a", 64 * CS)
        disk.write(0, [memoryview(b"".join(chunk(i) for i in range(16)))])
        disk.unmap(0, 8 * CS)  # container 1: half dead, 8 live chunks
        steps = []
        step = pool.collect_step(batch_bytes=3 * CS)
        assert step is not None and step.moved == 3 * CS and not step.containers
        st = pool.status()
        assert st.collector == "off" and st.progress == pytest.approx(3 / 8)
        disk.write(0, [memoryview(chunk(0))])  # a dead chunk of the container comes back
        while (step := pool.collect_step(batch_bytes=3 * CS)) is not None:
            steps.append(step)
            assert step.moved <= 3 * CS
        # 5 + 1 (revived) live chunks left: two more moving steps, then the deleting one.
        assert [s.moved for s in steps] == [3 * CS, 3 * CS, 0] and steps[-1].freed == 16 * CS
        assert read(disk, 0, 16 * CS) == chunk(0) + bytes(7 * CS) + b"".join(
            chunk(i) for i in range(8, 16))
        assert pool.used == container_bytes_on_disk(path) == 9 * CS
        assert pool.status().compacted == 1 and pool.verify().clean
        disk.close()
    assert check_pool(path).clean


def test_served_pool_gives_space_back_without_gc(tmp_path: os.PathLike[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector runs in the serving process: UNMAP of most of a disk returns its containers
    to the file system with no `tcmu-py dedup gc`, status shows it, and closing stops it."""
    monkeypatch.setattr(store, "COLLECT_INTERVAL", 0.01)
    monkeypatch.setattr(store, "DEFAULT_CONTAINER_BYTES", 8 * CS)
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    dev = DedupHandler.open(device_config(f"pool={path}"))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())  # power-on unit attention
        data = b"".join(chunk(i) for i in range(32))
        assert harness.run_command(dev, cdbs.write10(0, 256), data_out=data).good
        assert harness.run_command(dev, cdbs.synchronize_cache10()).good
        assert container_bytes_on_disk(path) == 32 * CS
        params = cdbs.unmap_parameters([(0, 28 * CS // BS)])
        assert harness.run_command(dev, cdbs.unmap(len(params)), data_out=params).good
        deadline = time.monotonic() + 20
        while container_bytes_on_disk(path) > 4 * CS:
            assert time.monotonic() < deadline, DedupHandler.status([dev])
            time.sleep(0.01)
        (row,) = DedupHandler.status([dev])["dedup_pools"]
        # Three containers all dead, the fourth half dead: its live half moved to a new one.
        assert row["collected"] == 32 * CS and row["compacted"] == 4 and row["used"] == 4 * CS
        assert row["collector"] in ("idle", "compacting")
        (table,) = DedupHandler.status_tables({"dedup_pools": [row]})
        assert table.rows[0][11] in ("idle", "compacting 0%")
        got = harness.run_command(dev, cdbs.read10(0, 256), data_in_len=32 * CS)
        assert got.data == bytes(28 * CS) + data[28 * CS:]
        pool = dev.backend.pool  # type: ignore[attr-defined]
        thread = pool._collector.thread
    finally:
        dev.close()
    assert not thread.is_alive() and pool._collector is None
    assert check_pool(path).clean


@pytest.mark.parametrize("fingerprint", ["sha256", "xxh3-128"])
def test_compression_is_recorded_per_chunk(tmp_path: os.PathLike[str], fingerprint: str) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, compression="zstd", fingerprint=fingerprint)
    text = b"".join(b"line %06d of a compressible chunk\n" % i for i in range(200))[:CS]
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * CS)
        disk.write(0, [memoryview(text + chunk(1) + text)])  # compressible, random, duplicate
        st = pool.status()
        assert (st.chunks, st.unique, st.logical, st.compression) == (2, 2 * CS, 3 * CS, "zstd")
        assert CS < st.stored < CS + CS // 2 and st.compression_ratio > 1.3
        assert pool.used == st.stored  # capacity counts stored bytes
        # New chunks are stored as the setting says now; the old ones keep theirs.
        ensure_pool(path, "p", 1 << 22, compression="none")
        more = bytes(reversed(text))
        disk.write(3 * CS, [memoryview(more)])
        assert read(disk, 0, 4 * CS) == text + chunk(1) + text + more
        disk.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    codes = sorted(r[0] for r in db.execute("SELECT compression FROM chunks"))
    db.close()
    assert codes == [0, 0, 1]  # random: not worth it; the later text: compression off
    with open(os.path.join(path, "pool.json")) as f:
        doc = json.load(f)
    # Compression off again: the pool still holds compressed chunks, so its version stays 2
    # (before: 1, and a version without compression served chunk 0's zstd frame as its
    # data); an XXH3 pool is 3 anyway (an older version would deduplicate by the wrong hash).
    assert "compression" not in doc
    assert (doc["version"], doc.get("fingerprint")) == ((2, None) if fingerprint == "sha256"
                                                         else (3, "xxh3-128"))
    assert check_pool(path).clean
    # A compressed chunk whose bytes changed is found by check (and dropped by repair).
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    cid, off, n = db.execute("SELECT container, offset, length FROM chunks WHERE "
                             "compression=1").fetchone()
    db.close()
    with open(container_file(path, cid), "r+b") as f:
        f.seek(off + n // 2)
        f.write(b"\xff\x00\xff")
    report = check_pool(path)
    assert any("do not match its fingerprint" in p for p in report.problems), report
    report = check_pool(path, repair=True)
    # The repair names what now reads zeros (before: only how many chunks it dropped).
    assert ("dropped 1 damaged chunk(s); the blocks that named them read zeros: disk a: "
            f"bytes 0-{CS - 1}, {2 * CS}-{3 * CS - 1}") in report.repaired, report
    assert check_pool(path).clean
    with pytest.raises(ConfigError, match="compression 'lz4': expected one of none, zstd"):
        create_pool(os.path.join(tmp_path, "q"), "q", 1 << 20, compression="lz4")


def test_dead_chunk_is_revived_by_equal_content(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 2 * CS)
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 8 * CS)
        disk.write(0, [memoryview(chunk(1) + chunk(2))])
        disk.unmap(0, 2 * CS)
        # The pool is full of garbage, but content it still holds costs nothing.
        disk.write(4 * CS, [memoryview(chunk(2))])
        assert pool.status().unique == CS and pool.used == 2 * CS
        disk.close()
    assert check_pool(path).clean


# ------------------------------------------------------------------------------------------
# Through SCSI


def test_conformance(pool_dir: str) -> None:
    ensure_pool(pool_dir, "dd", 1 << 24, 50)
    devices = []

    def make() -> object:
        dev = DedupHandler.open(device_config())
        devices.append(dev)
        return dev

    try:
        conformance.check_block_handler(make)  # type: ignore[arg-type]
    finally:
        for dev in devices:
            dev.close()


def test_thin_provisioning_over_scsi(pool_dir: str) -> None:
    run = harness.run_command
    dev = DedupHandler.open(device_config(write_cache=False))
    try:
        run(dev, cdbs.test_unit_ready())  # power-on unit attention
        r = run(dev, cdbs.read_capacity16(), data_in_len=32)
        assert r.good and r.data[14] & 0xC0 == 0xC0  # LBPME and LBPRZ
        r = run(dev, cdbs.inquiry(evpd=True, page_code=0xB2), data_in_len=64)
        assert r.good and r.data[6] & 0x07 == 0b010  # SBC-4 6.6.4: PROVISIONING TYPE thin
        r = run(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64)
        assert struct.unpack_from(">I", r.data, 28)[0] == CS // BS  # OPTIMAL UNMAP GRANULARITY
        # SBC-4 6.6.3: OPTIMAL TRANSFER LENGTH GRANULARITY is the chunk (a part: read-modify-write).
        assert struct.unpack_from(">H", r.data, 6)[0] == CS // BS
        per = CS // BS
        # Four distinct chunks written twice each: 4 of 8 chunks used = the soft threshold.
        data = b"".join(chunk(i) for i in range(4))
        assert run(dev, cdbs.write10(0, 4 * per), data_out=data).good
        assert run(dev, cdbs.test_unit_ready()).sense_codes == (0x06, 0x38, 0x07)
        assert run(dev, cdbs.write10(8 * per, 4 * per), data_out=data).good
        assert run(dev, cdbs.test_unit_ready()).good
        r = run(dev, cdbs.log_sense(0x0C), data_in_len=64)
        assert r.good
        # SBC-4 6.4.5: parameter 0002h, used LBA mapping resources: physical use, not logical.
        # Counted in units of 2**THRESHOLD EXPONENT blocks: one chunk here (VPD B2h).
        params = {struct.unpack_from(">H", r.data, o)[0]: struct.unpack_from(">I", r.data, o + 4)[0]
                  for o in range(4, len(r.data), 12)}
        assert params[2] == 4 and params[1] == 4
        # SBC-4 6.4.5.5-6.4.5.7: 8 chunks mapped, 4 distinct: 4 made available by
        # de-duplication, none by compression (off), 4 by both.
        assert (params[0x100], params[0x101], params[0x102]) == (4, 0, 4)
        # Full: 5 new chunks do not fit -> DATA PROTECT 27h/07h and nothing changed.
        before = run(dev, cdbs.read10(16 * per, 6 * per), data_in_len=6 * CS).data
        new = b"".join(chunk(i) for i in range(10, 15)) + chunk(0)
        r = run(dev, cdbs.write10(16 * per, 6 * per), data_out=new)
        assert r.sense_codes == (0x07, 0x27, 0x07)
        assert run(dev, cdbs.read10(16 * per, 6 * per), data_in_len=6 * CS).data == before
        backend = dev.backend  # type: ignore[attr-defined]
        assert backend.pool.used == 4 * CS
        # Fill it exactly: 4 more distinct chunks.
        more = b"".join(chunk(i) for i in range(20, 24))
        assert run(dev, cdbs.write10(40 * per, 4 * per), data_out=more).good
        assert backend.pool.used == 8 * CS
        # Content the pool holds still writes when it is full (and a partial chunk whose
        # result is zeros too).
        assert run(dev, cdbs.write10(20 * per, per), data_out=chunk(3)).good
        assert run(dev, cdbs.write_same16(30 * per, 8 * per), data_out=bytes(BS)).good
        # COMPARE AND WRITE: unchanged content passes when full, a miscompare changes nothing,
        # new content does not fit.
        r = run(dev, cdbs.compare_and_write(0, 1), data_out=chunk(0)[:BS] * 2)
        assert r.good
        r = run(dev, cdbs.compare_and_write(0, 1), data_out=chunk(1)[:BS] + chunk(0)[:BS])
        assert r.sense_codes[0] == 0x0E  # MISCOMPARE
        r = run(dev, cdbs.compare_and_write(0, 1), data_out=chunk(0)[:BS] + bytes(BS))
        assert r.sense_codes == (0x07, 0x27, 0x07)  # the changed chunk is new content: full
        r = run(dev, cdbs.compare_and_write(8 * per, 1), data_out=chunk(0)[:BS] + chunk(1)[:BS])
        assert r.sense_codes == (0x07, 0x27, 0x07)
    finally:
        dev.close()
    assert check_pool(pool_dir).clean


def test_check_config_and_open_errors(pool_dir: str) -> None:
    for cfg, match in [("", "missing pool="), ("pool=nosuch", "declared dedup pool name"),
                       ("pool=dd;unit=3", "unknown key 'unit'"),
                       ("pool=dd;disk=../x", "disk name")]:
        with pytest.raises(ConfigError, match=match):
            DedupHandler.check_config(cfg)
    DedupHandler.check_config("pool=/nonexistent/pool")  # apply creates it later
    with pytest.raises(ConfigError, match="named 'dd', expected 'other'"):
        register_pool("other", pool_dir)
        try:
            DedupHandler.check_config("pool=other")
        finally:
            unregister_pool("other")
    dev = DedupHandler.open(device_config(name="x0", size=32 * CS))
    try:
        with pytest.raises(ConfigError, match="already open"):
            DedupHandler.open(device_config(name="x0"))
    finally:
        dev.close()
    with pytest.raises(ConfigError, match="larger than the device size"):
        DedupHandler.open(device_config(name="x0", size=16 * CS))
    with pytest.raises(ConfigError, match="divisor of the pool's chunk size"):
        DedupHandler.open(DeviceConfig("x1", "dedup", "pool=dd", 64 * CS, block_size=8192))
    with pytest.raises(ConfigError, match="already open"), DedupPool.open(pool_dir):
        DedupPool.open(pool_dir)


# ------------------------------------------------------------------------------------------
# Repair and check


def _dirty_pool(path: str) -> None:
    """A pool with shared, dead and live chunks, closed cleanly."""
    create_pool(path, "p", 1 << 22)
    with DedupPool.open(path, container_bytes=4 * CS) as pool:
        disk = pool.open_disk("a", 32 * CS)
        disk.write(0, [memoryview(b"".join(chunk(i % 6) for i in range(12)))])
        disk.unmap(0, 2 * CS)
        disk.close()


def test_open_reclaims_leaks_and_recounts_after_unclean_shutdown(
        tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    _dirty_pool(path)
    # What a crash leaves: bytes past a container's committed end, a container file no
    # committed row names, a reference count that disagrees, the pool not closed cleanly.
    with open(container_file(path, 1), "ab") as f:
        f.write(b"\xee" * 1000)
    with open(container_file(path, 99), "wb") as f:
        f.write(b"\xdd" * CS)
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    db.execute("UPDATE chunks SET refcount = refcount + 3 WHERE id = 2")
    db.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
    db.commit()
    db.close()
    report = check_pool(path)
    assert len(report.leaks) == 2
    assert report.problems == ["chunk 2: refcount 4, 1 map entries refer to it"]
    with DedupPool.open(path):
        pass
    assert check_pool(path).clean
    assert not os.path.exists(container_file(path, 99))
    assert os.stat(container_file(path, 1)).st_size == 4 * CS


def test_check_finds_damaged_chunks_and_repair_drops_them(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    _dirty_pool(path)
    with open(container_file(path, 2), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff")
    report = check_pool(path)
    assert any("do not match its fingerprint" in p for p in report.problems), report
    fixed = check_pool(path, repair=True)
    assert fixed.repaired and any("dropped 1 damaged" in r for r in fixed.repaired)
    assert check_pool(path).clean


# ------------------------------------------------------------------------------------------
# YAML, status, commands


def _registry() -> dict[str, object]:
    reg = load_handlers()
    return {n: reg[n] for n in ("raw", "thin", "dedup")}


def test_yaml_section_reports_every_problem(tmp_path: os.PathLike[str]) -> None:
    doc = {
        "dedup_pools": [
            {"name": "a", "path": "rel", "capacity": "0", "chunk_size": "3K"},
            {"name": "a", "path": "/srv/b", "capacity": "1G", "soft_threshold": 0, "x": 1},
            {"name": "ok", "path": "/srv/ok", "capacity": "1G", "chunk_size": "64K"},
        ],
        "pools": [{"name": "thinp", "path": "/srv/t", "capacity": "1G"}],
        "devices": [
            {"name": "d0", "handler": "dedup", "size": "1G", "pool": "nope"},
            {"name": "d1", "handler": "dedup", "size": "1G"},
            {"name": "d2", "handler": "dedup", "size": "1G", "pool": "thinp"},
            {"name": "d3", "handler": "thin", "size": "1G", "pool": "ok"},
        ],
    }
    with pytest.raises(ConfigError) as exc:
        load_config_text(yaml.safe_dump(doc), "c.yaml", registry=_registry())  # type: ignore[arg-type]
    text = str(exc.value)
    for needle in ["dedup_pools[0].path: got 'rel', expected an absolute path",
                   "dedup_pools[0].capacity: got '0'",
                   "dedup_pools[0].chunk_size: got '3K', expected a power of two from 4096",
                   "dedup_pools[1].name: got 'a', expected a pool name not used before",
                   "dedup_pools[1].soft_threshold: got 0",
                   "dedup_pools[1].x: got 1, expected one of the keys",
                   "devices[0].pool: got 'nope', expected the name of a pool in dedup_pools",
                   "devices[1].pool: got nothing, expected the name of a pool in dedup_pools",
                   "devices[2].pool: got 'thinp', expected the name of a pool in dedup_pools",
                   "devices[3].pool: got 'ok', expected the name of a pool in pools"]:
        assert needle in text, (needle, text)


def test_yaml_device_gets_its_pool_directory_and_prepare_creates_it(
        tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "dp")
    doc = {"dedup_pools": [{"name": "p", "path": path, "capacity": "1M", "chunk_size": "8K"}],
           "pools": [{"name": "p", "path": "/srv/thin", "capacity": "1G"}],
           "devices": [{"name": "d0", "handler": "dedup", "size": "1M", "pool": "p"},
                       {"name": "t0", "handler": "thin", "size": "1M", "pool": "p"}]}
    cfg = load_config_text(yaml.safe_dump(doc), "c.yaml", registry=_registry())  # type: ignore[arg-type]
    d0, t0 = cfg.devices
    assert d0.config_items == (("pool", path),)
    assert t0.config_items == (("pool", "/srv/thin"),)
    dedup_config.prepare(cfg)
    try:
        st = read_pool_status(path)
        assert (st.name, st.capacity, st.chunk_size, st.soft_threshold) == ("p", 1 << 20,
                                                                            8192, 80)
        with pytest.raises(ConfigError, match="chunk_size 4096: the pool was created with 8192"):
            ensure_pool(path, "p", 1 << 20, 80, 4096)
    finally:
        unregister_pool("p")


def test_hard_limit_is_what_the_pool_enforces_as_thin_pools_do(
        tmp_path: os.PathLike[str]) -> None:
    """``hard_limit`` (a percentage or a size up to capacity) is the pool's enforced capacity,
    the soft threshold a percentage of it, and a bad value is one line naming the key, as for
    ``pools:``."""
    bad = {"dedup_pools": [{"name": "a", "path": "/srv/a", "capacity": "1M",
                            "hard_limit": "150%"},
                           {"name": "b", "path": "/srv/b", "capacity": "1M", "hard_limit": "2M",
                            "compression": "lz4"}],
           "pools": [{"name": "t", "path": "/srv/t", "capacity": "1M", "hard_limit": "2M"}]}
    with pytest.raises(ConfigError) as exc:
        load_config_text(yaml.safe_dump(bad), "c.yaml", registry=_registry())  # type: ignore[arg-type]
    for key in ("dedup_pools[0].hard_limit: got '150%'", "dedup_pools[1].hard_limit: got '2M'",
                "pools[0].hard_limit: got '2M'"):
        assert f"{key}, expected a percentage of capacity like '95%' or a size not above " \
            "capacity" in str(exc.value), (key, str(exc.value))
    assert "dedup_pools[1].compression: got 'lz4', expected one of none, zstd" in str(exc.value)
    path = os.path.join(tmp_path, "dp")
    doc = {"dedup_pools": [{"name": "p", "path": path, "capacity": 16 * CS, "hard_limit": "50%",
                            "soft_threshold": 50}]}
    cfg = load_config_text(yaml.safe_dump(doc), "c.yaml", registry=_registry())  # type: ignore[arg-type]
    (spec,) = cfg.section("dedup_pools")
    assert (spec.capacity, spec.hard_limit) == (16 * CS, 8 * CS)
    dedup_config.prepare(cfg)
    try:
        assert read_pool_status(path).capacity == 8 * CS
        dev = DedupHandler.open(device_config("pool=p"))
        run = harness.run_command
        per = CS // BS
        try:
            run(dev, cdbs.test_unit_ready())  # power-on unit attention
            data = b"".join(chunk(i) for i in range(4))
            assert run(dev, cdbs.write10(0, 4 * per), data_out=data).good
            # 4 of 8 chunks: the soft threshold is 50 % of the hard limit, not of capacity.
            assert run(dev, cdbs.test_unit_ready()).sense_codes == (0x06, 0x38, 0x07)
            data = b"".join(chunk(i) for i in range(4, 8))
            assert run(dev, cdbs.write10(4 * per, 4 * per), data_out=data).good
            r = run(dev, cdbs.write10(8 * per, per), data_out=chunk(8))
            assert r.sense_codes == (0x07, 0x27, 0x07)  # above the hard limit: DATA PROTECT
            assert run(dev, cdbs.read10(8 * per, per), data_in_len=CS).data == bytes(CS)
        finally:
            dev.close()
    finally:
        unregister_pool("p")


def test_status_rows_and_commands(tmp_path: os.PathLike[str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(tmp_path, "p")
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "1M"]) == 0
    dev = DedupHandler.open(device_config(f"pool={path}"))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())  # power-on unit attention
        assert harness.run_command(dev, cdbs.write10(0, 16), data_out=chunk(1) * 2).good
        st = DedupHandler.status([dev])
        (row,) = st["dedup_pools"]
        assert (row["logical"], row["unique"], row["ratio"]) == (2 * CS, CS, 2.0)
        (table,) = DedupHandler.status_tables(json.loads(json.dumps(st)))
        assert table.title == "dedup pools" and table.rows[0][7] == "2.00"
    finally:
        dev.close()
    capsys.readouterr()
    assert dedup_config.main(["status", path, "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["unique"] == CS and found["logical"] == 2 * CS and not found["live"]
    # Read from the pool's files: what a serving daemon's collector does is not known here.
    (offline,) = DedupHandler.status_tables({"dedup_pools": [found]})
    assert offline.rows[0][-3:-1] == ("-", "-")  # collected, collector
    assert dedup_config.main(["check", path]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    with DedupPool.open(path) as pool:
        disk = pool.open_disk(dev.backend.name, 64 * CS)  # type: ignore[attr-defined]
        disk.unmap(0, 2 * CS)
        disk.close()
    assert dedup_config.main(["gc", path]) == 0
    assert "100.0%" in capsys.readouterr().out
    assert read_pool_status(path).used == 0 == container_bytes_on_disk(path)
    assert "dedup" in DedupHandler.commands()


def test_drop_disk_deletes_a_disk_and_a_new_one_of_its_name_starts_empty(
        tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a disk could leave its pool only through the Python API; a device removed from
    the YAML kept its data (and its chunks' references) for good, and a new device of that
    name served the old one's data. `tcmu-py dedup drop-disk` deletes it, in bounded steps."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, None)
    with DedupPool.open(path) as pool:
        a, b = pool.open_disk("a", 8 * CS), pool.open_disk("b", 8 * CS)
        a.write(0, [memoryview(chunk(1) + chunk(2))])
        b.write(0, [memoryview(chunk(1) + chunk(3))])  # chunk 1 shared, chunk 3 b's own
        a.close()
        b.close()
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"disk c: no such disk, expected one of .*\(a, b\)"):
        dedup_config.main(["drop-disk", path, "c"])
    assert dedup_config.main(["drop-disk", path, "b"]) == 0
    assert "disk b dropped" in capsys.readouterr().out
    assert dedup_config.main(["check", path]) == 0
    assert dedup_config.main(["gc", path]) == 0
    st = read_pool_status(path)
    assert [d.name for d in st.disks] == ["a"] and st.unique == 2 * CS and st.dead == 0
    with DedupPool.open(path) as pool:
        b = pool.open_disk("b", 8 * CS)
        out = bytearray(2 * CS)
        b.read(0, [memoryview(out)])
        assert out == bytes(2 * CS)
        a = pool.open_disk("a", 8 * CS)
        a.read(0, [memoryview(out)])
        assert out == chunk(1) + chunk(2)
        a.close()
        b.close()


def test_fast_fingerprint_collisions_never_merge_different_bytes(
        tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An "xxh3-128" pool takes a fingerprint match only once the bytes compare equal; a chunk
    whose fast fingerprint equals a different chunk's (stored, or earlier in the same command)
    is stored under its SHA-256, and later copies of it deduplicate by that."""
    from tcmu_py.handlers.dedup import store

    monkeypatch.setattr(store, "fast_fingerprint", lambda data: bytes(16))  # always collides
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    a, b, c = chunk(1), chunk(2), chunk(3)
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("d", 16 * CS)
        disk.write(0, [memoryview(a + b + a + c)])  # b and c collide with a in the command
        disk.write(4 * CS, [memoryview(c + b + a)])  # and with the stored a
        assert read(disk, 0, 7 * CS) == a + b + a + c + c + b + a
        st = pool.status()
        assert (st.chunks, st.logical) == (3, 7 * CS)
        disk.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    lengths = sorted(len(r[0]) for r in db.execute("SELECT fp FROM chunks"))
    db.close()
    assert lengths == [16, 32, 32]  # a by the fast fingerprint; b and c by SHA-256
    assert check_pool(path).clean


def test_fingerprint_is_chosen_at_creation_and_fixed(tmp_path: os.PathLike[str]) -> None:
    """`create-pool --fingerprint sha256` makes a SHA-256 pool (pool.json version 1, readable
    by older versions); a declaration naming another fingerprint later is refused, one naming
    none leaves it; a new pool without one gets XXH3-128."""
    path = os.path.join(tmp_path, "p")
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "1M",
                              "--fingerprint", "sha256"]) == 0
    with open(os.path.join(path, "pool.json")) as f:
        doc = json.load(f)
    assert doc["version"] == 1 and "fingerprint" not in doc
    with pytest.raises(ConfigError, match="fingerprint 'xxh3-128'.*cannot change"):
        ensure_pool(path, "p", 1 << 20, fingerprint="xxh3-128")
    assert ensure_pool(path, "p", 1 << 21).fingerprint == "sha256"
    other = os.path.join(tmp_path, "q")
    assert ensure_pool(other, "q", 1 << 20).fingerprint == "xxh3-128"


def test_a_capacity_below_what_the_pool_holds_is_warned_of(
        tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture) -> None:
    """Before: `create-pool --capacity` (or a YAML's `capacity`) below the pool's use was taken
    without a word, and every write of new data then answered SPACE ALLOCATION FAILED."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, None)
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 8 * CS)
        disk.write(0, [memoryview(chunk(1) + chunk(2) + chunk(3))])
        disk.close()
    with caplog.at_level("WARNING"):
        assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "8K"]) == 0
    assert "capacity 8192 is below the 12288 bytes the pool holds" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "16K"]) == 0
    assert "below" not in caplog.text


def test_log_sense_counts_what_compression_and_deduplication_save(tmp_path: os.PathLike[str]
                                                                 ) -> None:
    """Before: log page 0Ch had only 0001h/0002h, so an initiator could not see what the pool
    saves. Now 0100h (de-duplicated), 0101h (compressed) and 0102h (both), in threshold sets
    (one chunk here), follow the pool's counters."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "z", 64 * CS, 80, CS, "zstd")
    dev = DedupHandler.open(DeviceConfig("z0", "dedup", f"pool={path}", 64 * CS, block_size=BS,
                                         write_cache=True))
    run = harness.run_command
    per = CS // BS

    def saved() -> tuple[int, int, int]:
        r = run(dev, cdbs.log_sense(0x0C), data_in_len=64)
        assert r.good, r
        p = {struct.unpack_from(">H", r.data, o)[0]: struct.unpack_from(">I", r.data, o + 4)[0]
             for o in range(4, len(r.data), 12)}
        return p[0x100], p[0x101], p[0x102]

    try:
        run(dev, cdbs.test_unit_ready())  # power-on unit attention
        assert saved() == (0, 0, 0)
        # 6 chunks of text that compresses well, each written 3 times: 12 chunks saved by
        # de-duplication, most of the 6 distinct ones by compression.
        text = b"".join(bytes(f"chunk {i} ", "ascii") * (CS // 8) for i in range(6))
        data = b"".join(c[:CS] for c in (text[i * CS:(i + 1) * CS] for i in range(6)))
        for copy in range(3):
            assert run(dev, cdbs.write10(copy * 6 * per, 6 * per), data_out=data).good
        dedup, comp, total = saved()
        assert dedup == 12 and 4 <= comp < 6 and total == (12 * CS + comp * CS) // CS
        status = dev.backend.pool.status()  # type: ignore[attr-defined]
        assert comp == (status.unique - status.stored) // CS
        # UNMAP of two copies: nothing left to de-duplicate.
        params = cdbs.unmap_parameters([(0, 12 * per)])
        assert run(dev, cdbs.unmap(len(params)), data_out=params).good
        assert saved()[0] == 0
    finally:
        dev.close()


def _failing_fdatasync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`os.fdatasync` failing with EIO as many times as the returned list's one item says
    (0 at first), then as itself."""
    real = os.fdatasync
    fail = [0]

    def flaky(fd: int) -> None:
        if fail[0]:
            fail[0] -= 1
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)
    return fail


@pytest.mark.parametrize("failing", ["another disk's write-through write", "a group commit",
                                     "the collector's commit"])
def test_writes_a_failed_commit_lost_fail_the_next_flush(tmp_path: os.PathLike[str],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         failing: str) -> None:
    """Before: a commit that failed (an EIO from fdatasync; a full file system) rolled back
    every write the pool's write-cached disks had acknowledged since the last commit, and
    nothing remembered it: the next SYNCHRONIZE CACHE of a disk that lost writes answered GOOD
    (its data read back as it was before). Now that SYNCHRONIZE CACHE answers WRITE ERROR
    once, as fsync(2) does after a failed write-back (a FUA write in between, durable, is
    GOOD and does not take the report); the one after it is GOOD."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS)
    per = CS // BS
    a = DedupHandler.open(DeviceConfig("a", "dedup", f"pool={path};disk=a", 16 * CS,
                                       block_size=BS, write_cache=True))
    b = DedupHandler.open(DeviceConfig("b", "dedup", f"pool={path};disk=b", 16 * CS,
                                       block_size=BS, write_cache=False))
    run = harness.run_command
    fail = _failing_fdatasync(monkeypatch)
    pool = a.backend.pool  # type: ignore[attr-defined]
    try:
        for dev in (a, b):
            run(dev, cdbs.test_unit_ready())  # power-on unit attention
        if failing == "the collector's commit":  # a dead chunk for the collector to take
            assert run(a, cdbs.write10(2 * per, per, fua=True), data_out=chunk(7)).good
            assert run(a, cdbs.write10(2 * per, per, fua=True), data_out=chunk(8)).good
        assert run(a, cdbs.write10(0, per), data_out=chunk(1)).good  # acknowledged, cached
        fail[0] = 1
        if failing == "another disk's write-through write":
            assert run(b, cdbs.write10(0, per), data_out=chunk(2)).sense_codes[0] in (3, 7)
        elif failing == "a group commit":
            monkeypatch.setattr(store, "GROUP_CHANGES", 2)
            assert not run(a, cdbs.write10(per, per), data_out=chunk(3)).good
        else:
            with pytest.raises(OSError):
                pool.collect_step(dead_percent=1)
        assert run(a, cdbs.read10(0, per), data_in_len=CS).data == bytes(CS)  # lost
        assert run(a, cdbs.write10(4 * per, per, fua=True), data_out=chunk(9)).good
        assert run(a, cdbs.synchronize_cache10()).sense_codes == (0x03, 0x0C, 0x00)
        assert run(a, cdbs.synchronize_cache10()).good  # told once
        if failing != "a group commit":  # b's own write failed: it has nothing else to lose
            assert run(b, cdbs.synchronize_cache10()).good
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("damage", ["row deleted", "size shrunk"])
@pytest.mark.parametrize("repair", ["open", "check --repair"])
def test_container_bytes_chunk_rows_name_are_never_reclaimed(tmp_path: os.PathLike[str],
                                                              damage: str, repair: str) -> None:
    """Before: a container the index had no row for, or a row shorter than the chunks in it
    (an index damaged, edited or restored from a backup), was taken for a crash's leftovers:
    `check` called it a leak, and an open (or `check --repair`) deleted the file or cut the
    bytes — live chunks, read back as MEDIUM ERROR or zeros afterwards with "OK after repair".
    Now it is a problem, and the repair restores the row: every block reads back."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    data = [chunk(40 + i) for i in range(4)]
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * CS)
        disk.write(0, [memoryview(b"".join(data))])
        disk.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    with db:
        if damage == "row deleted":
            db.execute("DELETE FROM containers")
        else:
            db.execute("UPDATE containers SET size = ?, dead = 0", (CS,))
    db.close()
    report = check_pool(path)
    assert any("though chunk rows name its bytes up to" in p for p in report.problems), report
    assert not report.leaks, report
    if repair == "check --repair":
        report = check_pool(path, repair=True)
        assert any("row restored" in r for r in report.repaired), report
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * CS)
        assert read(disk, 0, 4 * CS) == b"".join(data)
        disk.close()
    assert check_pool(path).clean


def test_check_names_what_a_repair_turns_to_zeros(tmp_path: os.PathLike[str]) -> None:
    """A chunk row gone from the index (the map rows still name it): `check` names the disk
    by name, and the repair says which bytes of which disk now read zeros (before: disk ids,
    and the repair only "recounted")."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22)
    with DedupPool.open(path) as pool:
        for name in ("a", "b"):
            disk = pool.open_disk(name, 16 * CS)
            disk.write(0, [memoryview(chunk(1) + chunk(2) + chunk(1) + chunk(3))])
            disk.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    with db:
        gone = db.execute("SELECT chunk FROM map WHERE idx = 0").fetchone()[0]
        db.execute("DELETE FROM chunks WHERE id = ?", (gone,))
    db.close()
    report = check_pool(path)
    assert f"disk a chunk 2: names chunk {gone}, which does not exist (reads zeros once " \
        "repaired)" in report.problems, report
    report = check_pool(path, repair=True)
    assert ("removed the map rows naming no chunk; these now read zeros: disk a: bytes "
            f"0-{CS - 1}, {2 * CS}-{3 * CS - 1}; disk b: bytes 0-{CS - 1}, {2 * CS}-{3 * CS - 1}"
            ) in report.repaired, report
    assert check_pool(path).clean


def test_a_lost_pool_json_is_written_again_from_the_index(tmp_path: os.PathLike[str]) -> None:
    """Before: with pool.json gone (index and containers whole), `check` and the open said
    "create it first" and `create-pool` refused, offering only to remove the data. Now
    `create-pool` writes pool.json again from the index (its chunk size and fingerprint),
    and every block reads back."""
    path = os.path.join(tmp_path, "p")
    big = 4 * CS
    create_pool(path, "p", 1 << 22, chunk_size=big, compression="zstd")
    text = b"".join(b"line %06d\n" % i for i in range(2000))[:big]
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * big)
        disk.write(0, [memoryview(text + chunk(5) * 4)])
        disk.close()
    os.unlink(os.path.join(path, "pool.json"))
    with pytest.raises(ConfigError, match="create-pool .* writes it again from the index"):
        check_pool(path)
    with pytest.raises(ConfigError, match=f"records chunk size {big}, not {CS}; expected "
                       f"--chunk-size {big}"):
        create_pool(path, "p", 1 << 22)
    assert not os.path.exists(os.path.join(path, "pool.json"))
    config = create_pool(path, "p2", 1 << 23, 70, chunk_size=big, fingerprint="sha256")
    assert (config.fingerprint, config.chunk_size, config.capacity) == ("xxh3-128", big, 1 << 23)
    with open(os.path.join(path, "pool.json")) as f:
        assert json.load(f)["version"] == 3
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * big)
        assert read(disk, 0, 2 * big) == text + chunk(5) * 4
        disk.close()
    assert check_pool(path).clean


def test_a_loss_is_not_reported_to_a_disk_that_did_not_have_it(tmp_path: os.PathLike[str],
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A disk that lost writes to a failed commit, then closed and was dropped: a new disk
    given its id does not inherit the report (before the fix of the review: its first
    SYNCHRONIZE CACHE answered WRITE ERROR)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS)
    run = harness.run_command
    a = DedupHandler.open(DeviceConfig("a", "dedup", f"pool={path};disk=a", 16 * CS,
                                       block_size=BS, write_cache=False))
    b = DedupHandler.open(DeviceConfig("b", "dedup", f"pool={path};disk=b", 16 * CS,
                                       block_size=BS, write_cache=True))
    fail = _failing_fdatasync(monkeypatch)
    try:
        for dev in (a, b):
            run(dev, cdbs.test_unit_ready())
        assert run(b, cdbs.write10(0, CS // BS), data_out=chunk(1)).good
        fail[0] = 1
        assert not run(a, cdbs.write10(0, CS // BS), data_out=chunk(2)).good  # b's lost
        b.close()
        pool = a.backend.pool  # type: ignore[attr-defined]
        pool.drop_disk("b")
        c = DedupHandler.open(DeviceConfig("c", "dedup", f"pool={path};disk=c", 16 * CS,
                                           block_size=BS, write_cache=True))
        try:
            assert c.backend.disk_id == 2  # type: ignore[attr-defined]  # b's id again
            run(c, cdbs.test_unit_ready())
            assert run(c, cdbs.synchronize_cache10()).good
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_rewriting_pool_json_takes_the_index_chunk_size_and_retries_a_bare_index(
        tmp_path: os.PathLike[str]) -> None:
    """An index that records no chunk size (made before it was recorded): its uncompressed
    chunks say it, and a different one asked for is refused (before: the one asked for was
    taken, and the open then recorded it: every disk read with the wrong chunk size). An empty
    index left by an interrupted `create_pool`: a new `create_pool` makes the pool (before:
    refused as a damaged index)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 1 << 22, chunk_size=2 * CS)
    with DedupPool.open(path) as pool:
        disk = pool.open_disk("a", 16 * CS)
        disk.write(0, [memoryview(chunk(1) + chunk(2))])
        disk.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    with db:
        db.execute("DELETE FROM meta WHERE key = 'chunk_size'")
    db.close()
    os.unlink(os.path.join(path, "pool.json"))
    with pytest.raises(ConfigError, match=f"records chunk size {2 * CS}, not {CS}"):
        create_pool(path, "p", 1 << 22)
    assert create_pool(path, "p", 1 << 22, chunk_size=2 * CS).chunk_size == 2 * CS
    assert check_pool(path).clean
    bare = os.path.join(tmp_path, "q")
    os.makedirs(bare)
    open(os.path.join(bare, DB_FILE), "wb").close()
    create_pool(bare, "q", 1 << 22)
    assert check_pool(bare).clean
