"""Two dedup disks of one pool, driven through SCSI commands (FakeKernel -> ring ->
DeviceRunner -> BlockDevice -> DedupBackend), against a dict-of-blocks model (Hypothesis).

The model is the contract, stated without the backend's arithmetic:

- WRITE, WRITE SAME (without UNMAP, or with a non-zero block) and COMPARE AND WRITE (when the
  compare matches) give the blocks their data; UNMAP and WRITE SAME with UNMAP and a zero block
  make them zeros. Reads always equal the model, on both disks.
- GET LBA STATUS: a chunk is mapped exactly when it holds a non-zero byte.
- After the collector ran to completion, the pool holds exactly one chunk per distinct non-zero
  chunk content of the two disks, and its physical use is that many chunks; `check` is clean.
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.dedup import (
    DedupHandler,
    DedupPool,
    acquire_pool,
    create_pool,
    journal,
    release_pool,
    store,
)
from tcmu_py.handlers.dedup import backend as dedup_backend
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness

BS = 512
CS = 4096
BPC = CS // BS
SIZE = 12 * CS + 3 * BS  # a short last chunk
NBLOCKS = SIZE // BS
NCHUNKS = -(-SIZE // CS)


def block(seed: int) -> bytes:
    """Seed 0 is zeros; a few patterns, so that chunks repeat within and across disks."""
    return bytes(BS) if seed == 0 else bytes([seed]) * (BS - 2) + bytes([seed, 255 - seed])


class Model:
    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}

    def write(self, lba: int, data: list[bytes]) -> None:
        for i, b in enumerate(data):
            self.blocks[lba + i] = b

    def zero(self, lba: int, n: int) -> None:
        for b in range(lba, lba + n):
            self.blocks.pop(b, None)

    def get(self, b: int) -> bytes:
        return self.blocks.get(b, bytes(BS))

    def read(self) -> bytes:
        return b"".join(self.get(b) for b in range(NBLOCKS))

    def chunks(self) -> list[bytes]:
        """Chunk contents, the short last one padded with zeros as stored."""
        data = self.read() + bytes(NCHUNKS * CS - SIZE)
        return [data[i * CS : (i + 1) * CS] for i in range(NCHUNKS)]

    def status(self, lba: int) -> list[tuple[int, int, int]]:
        runs: list[tuple[int, int, int]] = []
        chunks = self.chunks()
        for b in range(lba, NBLOCKS):
            s = 0 if any(chunks[b // BPC]) else 1
            if runs and runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, s)
            else:
                runs.append((b, 1, s))
        return runs


extent = st.integers(0, NBLOCKS - 1).flatmap(
    lambda lba: st.tuples(st.just(lba), st.integers(1, min(NBLOCKS - lba, 3 * BPC))))
#: Whole chunks (what a pool's write journal takes; other writes go to the index).
chunks_extent = st.integers(0, SIZE // CS - 1).flatmap(
    lambda c: st.tuples(st.just(c * BPC), st.integers(1, min(SIZE // CS - c, 3)).map(
        lambda n: n * BPC)))
disk = st.integers(0, 1)
seeds = st.lists(st.integers(0, 3), min_size=1, max_size=3)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), disk, extent, seeds),
        st.tuples(st.just("write"), disk, chunks_extent, seeds),
        st.tuples(st.just("write_same"), disk, extent, st.integers(0, 3)),
        st.tuples(st.just("write_same_unmap"), disk, extent, st.integers(0, 2)),
        st.tuples(st.just("unmap"), disk, st.lists(extent, min_size=1, max_size=3), st.just(0)),
        st.tuples(st.just("compare_and_write"), disk, st.integers(0, NBLOCKS - 2),
                  st.tuples(st.booleans(), st.integers(0, 3))),
        st.tuples(st.just("status"), disk, st.integers(0, NBLOCKS - 1), st.just(0)),
        st.tuples(st.just("flush"), disk, st.just(0), st.just(0)),
        st.tuples(st.just("read"), disk, extent, st.just(0)),
    ),
    max_size=20,
)


@pytest.fixture(scope="module", autouse=True)
def small_map_cache() -> Iterator[None]:
    """A map cache of 16 entries (two generations of 8) for two disks of 13 chunks: reads hit,
    miss and straddle both generations, and entries are dropped all the time; likewise the
    native loop's chunk table of each disk has 4 slots (chunks 0, 4, 8, 12 share one). And a fast
    fingerprint that collides all the time (a chunk's last 16 bytes: every chunk whose last
    block has the same pattern), so that the byte comparison and the SHA-256 fallback of an
    "xxh3-128" pool carry the dedup of most chunks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "MAP_CACHE_ENTRIES", 16)
        mp.setattr(dedup_backend, "TABLE_SLOTS", 4)  # the native loop's table: collisions
        mp.setattr(store, "fast_fingerprint", lambda data: bytes(data[-16:]))
        yield


@pytest.fixture(scope="module", params=[0, 64 << 10], ids=["inline", "journal"])
def pool(request: pytest.FixtureRequest) -> Iterator[DedupPool]:
    """The pool of the model's disks: without a write journal, or with one of 64 KiB (records
    of up to 4 chunks: it fills, wraps and drains all the time), drained only when full, before
    other commands and at close (no drainer thread: the runs stay reproducible)."""
    root = tempfile.mkdtemp(prefix="dedup-model-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "is_journal_size", lambda v: isinstance(v, int) and v >= 0)
        mp.setattr(journal.Journal, "background", False)
        create_pool(os.path.join(root, "pool"), "model", 1 << 30, journal=request.param)
        p = acquire_pool(os.path.join(root, "pool"))  # shared with the devices the handler opens
        p.container_bytes = 6 * CS  # several containers: the collector compacts some
        yield p
        if p.journal is not None:  # the examples wrote through it, and wrapped it
            assert p.journal._next_seq > 1, "no WRITE went to the journal"
        release_pool(p)
    shutil.rmtree(root)


_names = itertools.count()


def parse_lba_status(data: bytes) -> list[tuple[int, int, int]]:
    (length,) = struct.unpack_from(">I", data)
    count = (min(length + 4, len(data)) - 8) // 16
    return [(lba, n, s & 0x0F) for lba, n, s in
            (struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range(count))]


def read_chunkwise(ring: RingHarness, model: Model, what: object) -> None:
    """Read the disk chunk by chunk and compare: a read is the native loop's when the disk's
    chunk table holds the chunk (left there by an earlier read or write), so a stale entry
    shows."""
    data = model.read()
    for i in range(NCHUNKS):
        n = min(BPC, NBLOCKS - i * BPC)
        got = ring.run(cdbs.read16(i * BPC, n), data_in_len=n * BS)
        assert got.good and got.data == data[i * CS : i * CS + n * BS], (what, i)


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_two_disks_match_the_model(pool: DedupPool, ops: list[tuple[str, int, Any, Any]]) -> None:
    n = next(_names)
    names = [f"a{n}", f"b{n}"]
    devs = [DedupHandler.open(DeviceConfig(name, "dedup", f"pool={pool.path}", SIZE,
                                           block_size=BS, write_cache=True)) for name in names]
    rings = [RingHarness(dev) for dev in devs]
    models = [Model(), Model()]
    try:
        for ring in rings:
            ring.run(cdbs.test_unit_ready())  # the power-on unit attention
        for op, d, arg, seed in ops:
            ring, model = rings[d], models[d]
            if op == "write":
                lba, count = arg
                data = [block(seed[i % len(seed)]) for i in range(count)]
                r = ring.run(cdbs.write16(lba, count), data_out=b"".join(data))
                model.write(lba, data)
            elif op.startswith("write_same"):
                lba, count = arg
                unmap = op == "write_same_unmap"
                r = ring.run(cdbs.write_same16(lba, count, unmap=unmap), data_out=block(seed))
                model.write(lba, [block(seed)] * count)
            elif op == "unmap":
                params = cdbs.unmap_parameters(list(arg))
                r = ring.run(cdbs.unmap(len(params)), data_out=params)
                for lba, count in arg:
                    model.zero(lba, count)
            elif op == "compare_and_write":
                lba, (matches, s) = arg, seed
                current = model.get(lba) + model.get(lba + 1)
                verify = current if matches else block(9) * 2
                r = ring.run(cdbs.compare_and_write(lba, 2), data_out=verify + block(s) * 2)
                if matches or verify == current:
                    assert r.good, r
                    model.write(lba, [block(s)] * 2)
                else:
                    assert r.sense_codes[0] == 0x0E, r  # SBC-4 5.3: MISCOMPARE
                    continue
            elif op == "read":  # twice: the second from the native loop's table if it fits
                lba, count = arg
                want = model.read()[lba * BS : (lba + count) * BS]
                for _ in range(2):
                    r = ring.run(cdbs.read16(lba, count), data_in_len=count * BS)
                    assert r.good and r.data == want, (op, arg, r)
            elif op == "status":
                r = ring.run(cdbs.get_lba_status(arg, 4096), data_in_len=4096)
                assert parse_lba_status(r.data) == model.status(arg)
            else:
                r = ring.run(cdbs.synchronize_cache10())
            assert r.good, (op, arg, r)
            read_chunkwise(ring, model, (op, arg))
        for ring, model in zip(rings, models, strict=True):
            assert ring.run(cdbs.read16(0, NBLOCKS), data_in_len=SIZE).data == model.read()
        assert 0 < len(pool._locs) + len(pool._old_locs) <= store.MAP_CACHE_ENTRIES
        for ring, model in zip(rings, models, strict=True):  # a miss, then the native loop's
            for lba in [lba for lba in range(0, NBLOCKS - BPC, BPC) for _ in range(2)]:
                assert ring.run(cdbs.read16(lba, BPC), data_in_len=BPC * BS).data == \
                    model.read()[lba * BS : (lba + BPC) * BS]
        assert all(dev.backend.c_reads[0] > 0 for dev in devs), [d.backend.c_reads for d in devs]
        if pool.journal is not None:  # the figures below are the index's
            pool.journal.drain_all()
        progress = pool.collect(30, dead_percent=1)
        assert progress.done and progress.dead_left == 0
        distinct = {c for m in models for c in m.chunks() if any(c)}
        st_ = pool.status()
        assert st_.chunks == len(distinct) and st_.unique == len(distinct) * CS
        assert pool.used == len(distinct) * CS  # physical chunks == distinct non-zero contents
        assert st_.logical == sum(1 for m in models for c in m.chunks() if any(c)) * CS
        for ring, model in zip(rings, models, strict=True):
            assert ring.run(cdbs.read16(0, NBLOCKS), data_in_len=SIZE).data == model.read()
            read_chunkwise(ring, model, "after collection")  # moved chunks, deleted containers
        report = pool.verify()
        assert report.clean, report
    finally:
        for ring, dev in zip(rings, devs, strict=True):
            ring.close()
            dev.close()
        for name in names:
            pool.drop_disk(name)
    pool.collect(30, dead_percent=1)
    assert pool.used == 0


def test_write_same_over_the_short_last_chunk_stores_zeros_past_the_end(pool: DedupPool) -> None:
    """The last chunk of a disk whose size is not a multiple of the chunk size is stored padded
    with zeros, also by WRITE SAME (which once stored its pattern past the end: two different
    contents shared one chunk, and a disk grown later read the pattern in its new blocks)."""
    name = f"tail{next(_names)}"
    tail = 96  # blocks 96..98: the short last chunk (SIZE is 12 chunks and 3 blocks)
    try:
        for size in (SIZE, SIZE + 5 * BS):  # then grown to whole chunks
            dev = DedupHandler.open(DeviceConfig(name, "dedup", f"pool={pool.path}", size,
                                                 block_size=BS, write_cache=True))
            ring = RingHarness(dev)
            try:
                ring.run(cdbs.test_unit_ready())
                if size == SIZE:
                    assert ring.run(cdbs.write_same16(0, BPC), data_out=block(1)).good
                    assert ring.run(cdbs.write_same16(tail, 3), data_out=block(1)).good
                    st_ = pool.status()
                    assert st_.chunks == 2, st_  # block(1) x8 and block(1) x3 + zeros
                else:
                    got = ring.run(cdbs.read16(tail, 8), data_in_len=8 * BS)
                    assert got.good and got.data == block(1) * 3 + bytes(5 * BS)
            finally:
                ring.close()
                dev.close()
    finally:
        pool.drop_disk(name)
        pool.collect(30, dead_percent=1)
