"""ThinBackend against a dict-of-blocks reference model (Hypothesis).

The model states the contract per allocation unit, independently of the backend's arithmetic:

- WRITE / WRITE SAME without deallocation: the blocks get the data; every touched unit is mapped.
- UNMAP (and WRITE SAME with UNMAP and a zero block): a unit whose blocks (up to the end of the
  disk) are all in the range is deallocated; in a unit only partly in the range the covered blocks
  become zeros, and the unit is deallocated if all its blocks are then zeros.
- A deallocated unit reads as zeros (LBPRZ), GET LBA STATUS reports per unit, the pool accounts
  exactly the mapped units, and the file holds no data outside mapped units.
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

from tcmu_py.handlers.thin import Pool, ThinBackend, acquire_pool, create_pool, release_pool
from tcmu_py.handlers.thin.sparse import data_runs

BS = 512
UNIT = 16 * 1024  # 4 file-system blocks of 4 KiB: partial units exercise sub-block zeroing
BPU = UNIT // BS
SIZE = 9 * UNIT + 3 * BS  # a short last unit
NBLOCKS = SIZE // BS
NUNITS = -(-SIZE // UNIT)


class Model:
    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}
        self.mapped: set[int] = set()

    def unit_blocks(self, u: int) -> range:
        return range(u * BPU, min((u + 1) * BPU, NBLOCKS))

    def write(self, lba: int, data: list[bytes]) -> None:
        for i, blk in enumerate(data):
            self.blocks[lba + i] = blk
            self.mapped.add((lba + i) // BPU)

    def unmap(self, lba: int, n: int) -> None:
        covered = range(lba, lba + n)
        for u in range(lba // BPU, (lba + n - 1) // BPU + 1):
            ub = self.unit_blocks(u)
            if ub.start >= covered.start and ub.stop <= covered.stop:
                self.mapped.discard(u)
                for b in ub:
                    self.blocks.pop(b, None)
                continue
            for b in range(max(ub.start, covered.start), min(ub.stop, covered.stop)):
                self.blocks.pop(b, None)
            if all(not any(self.blocks.get(b, b"")) for b in ub):
                self.mapped.discard(u)
                for b in ub:
                    self.blocks.pop(b, None)

    def read(self) -> bytes:
        return b"".join(self.blocks.get(b, bytes(BS)) for b in range(NBLOCKS))

    def status(self, lba: int, n: int) -> list[tuple[int, int, int]]:
        runs: list[tuple[int, int, int]] = []
        for b in range(lba, lba + n):
            st_ = 0 if b // BPU in self.mapped else 1
            if runs and runs[-1][2] == st_:
                runs[-1] = (runs[-1][0], runs[-1][1] + BS, st_)
            else:
                runs.append((b * BS, BS, st_))
        return runs


def block_data(seed: int, n: int) -> list[bytes]:
    """n blocks; seed 0 gives zeros, others a pattern that differs per block."""
    if seed == 0:
        return [bytes(BS)] * n
    return [bytes([(seed + i) % 255 + 1]) * (BS - 8) + (seed * 1000 + i).to_bytes(8, "big")
            for i in range(n)]


extent = st.integers(0, NBLOCKS - 1).flatmap(
    lambda lba: st.tuples(st.just(lba), st.integers(1, min(NBLOCKS - lba, 3 * BPU)))
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), extent, st.integers(0, 5)),
        st.tuples(st.just("unmap"), extent, st.just(0)),
        st.tuples(st.just("write_same"), extent, st.integers(0, 3)),
        st.tuples(st.just("write_same_unmap"), extent, st.integers(0, 2)),
        st.tuples(st.just("status"), extent, st.just(0)),
    ),
    max_size=25,
)


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    root = tempfile.mkdtemp(prefix="thin-model-")
    create_pool(os.path.join(root, "pool"), "model", 1 << 30, 80, unit=UNIT)
    p = acquire_pool(os.path.join(root, "pool"))  # shared with the devices ThinHandler opens
    yield p
    release_pool(p)
    shutil.rmtree(root)


_names = itertools.count()


def check_all(backend: ThinBackend, model: Model, pool: Pool) -> None:
    buf = bytearray(SIZE)
    backend.read(0, [memoryview(buf)[: SIZE // 2], memoryview(buf)[SIZE // 2 :]])
    assert bytes(buf) == model.read()
    assert backend.lba_status(0, SIZE) == model.status(0, NBLOCKS)
    mapped_bytes = sum(min(UNIT, SIZE - u * UNIT) for u in model.mapped)
    assert pool.disk_used(backend.name) == len(model.mapped) * UNIT
    fd = backend._fd
    allocated = sum(e - s for s, e in data_runs(fd, 0, SIZE))
    assert allocated <= mapped_bytes
    for u in set(range(NUNITS)) - model.mapped:
        assert not list(data_runs(fd, u * UNIT, min((u + 1) * UNIT, SIZE))), f"unit {u} has data"


def run_ops(pool: Pool, ops: list[tuple[str, tuple[int, int], int]], write_cache: bool) -> None:
    name = f"m{next(_names)}"
    backend = pool.open_disk(name, SIZE, block_size=BS, write_cache=write_cache)
    model = Model()
    try:
        for op, (lba, n), arg in ops:
            if op == "write":
                data = block_data(arg, n)
                backend.write(lba * BS, [memoryview(b"".join(data))])
                model.write(lba, data)
            elif op == "unmap":
                backend.unmap(lba * BS, n * BS)
                model.unmap(lba, n)
            elif op in ("write_same", "write_same_unmap"):
                block = block_data(arg, 1)[0]
                unmap = op == "write_same_unmap"
                backend.write_same(lba * BS, n * BS, block, unmap)
                if unmap and not any(block):
                    model.unmap(lba, n)
                else:
                    model.write(lba, [block] * n)
            else:
                assert backend.lba_status(lba * BS, n * BS) == model.status(lba, n)
                first = backend.lba_status(lba * BS, n * BS, max_runs=1)
                assert first == model.status(lba, n)[:1]
                assert first[0][0] == lba * BS  # SBC-4 GET LBA STATUS: starts at the requested LBA
            check_all(backend, model, pool)
    finally:
        backend.close()
        pool.delete_disk(name)
    assert pool.used == 0


@settings(max_examples=250, deadline=None)
@given(ops=ops)
def test_backend_matches_model(pool: Pool, ops: list[tuple[str, tuple[int, int], int]]) -> None:
    run_ops(pool, ops, write_cache=True)


@settings(max_examples=40, deadline=None)
@given(ops=ops)
def test_backend_matches_model_dsync(
    pool: Pool, ops: list[tuple[str, tuple[int, int], int]]
) -> None:
    """The same with write_cache=False (O_DSYNC file, fdatasync after unmap)."""
    run_ops(pool, ops, write_cache=False)


# --------------------------------------------------------------------------------------------
# The same contract through SCSI commands: FakeKernel -> ring -> DeviceRunner -> BlockDevice.

scsi_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write10"), extent, st.integers(0, 5)),
        st.tuples(st.just("write16"), extent, st.integers(0, 5)),
        st.tuples(st.just("unmap"), st.lists(extent, min_size=1, max_size=3), st.just(0)),
        st.tuples(st.just("write_same10"), extent, st.integers(0, 2)),
        st.tuples(st.just("write_same16"), extent, st.integers(0, 2)),
        st.tuples(st.just("write_same16_unmap"), extent, st.integers(0, 2)),
        st.tuples(st.just("write_same16_ndob_unmap"), extent, st.just(0)),
        st.tuples(st.just("get_lba_status"), st.integers(0, NBLOCKS - 1), st.integers(0, 1)),
    ),
    max_size=15,
)


def parse_lba_status(data: bytes) -> list[tuple[int, int, int]]:
    """SBC-4 GET LBA STATUS: 8-byte header (PARAMETER DATA LENGTH), 16-byte descriptors."""
    (length,) = struct.unpack_from(">I", data)
    count = (min(length + 4, len(data)) - 8) // 16
    out = []
    for i in range(count):
        lba, n, status = struct.unpack_from(">QIB", data, 8 + 16 * i)
        out.append((lba * BS, n * BS, status & 0x0F))
    return out


@settings(max_examples=60, deadline=None)
@given(ops=scsi_ops)
def test_scsi_commands_match_model(pool: Pool, ops: list[tuple[str, Any, int]]) -> None:
    harness = pytest.importorskip("tcmu_py.testing.harness")
    cdbs = pytest.importorskip("tcmu_py.testing.cdbs")
    from tcmu_py.handler import DeviceConfig
    from tcmu_py.handlers.thin import ThinHandler

    name = f"s{next(_names)}"
    dev = ThinHandler.open(DeviceConfig(name, "thin", f"pool={pool.path}", SIZE, block_size=BS,
                                        write_cache=True))
    ring = harness.RingHarness(dev)
    model = Model()
    try:
        ring.run(cdbs.test_unit_ready())  # the power-on unit attention
        for op, arg, seed in ops:
            if op.startswith("write1"):
                lba, n = arg
                data = block_data(seed, n)
                cdb = (cdbs.write10 if op == "write10" else cdbs.write16)(lba, n)
                r = ring.run(cdb, data_out=b"".join(data))
                model.write(lba, data)
            elif op == "unmap":
                params = cdbs.unmap_parameters(list(arg))
                r = ring.run(cdbs.unmap(len(params)), data_out=params)
                for lba, n in arg:
                    model.unmap(lba, n)
            elif op.startswith("write_same"):
                lba, n = arg
                unmap = op.endswith("unmap")
                ndob = "ndob" in op
                block = bytes(BS) if ndob else block_data(seed, 1)[0]
                if op == "write_same10":
                    cdb = cdbs.write_same10(lba, n)
                else:
                    cdb = cdbs.write_same16(lba, n, unmap=unmap, ndob=ndob)
                r = ring.run(cdb, data_out=b"" if ndob else block)
                if unmap and not any(block):
                    model.unmap(lba, n)
                else:
                    model.write(lba, [block] * n)
            else:
                lba = arg
                alloc = 4096 if seed else 8 + 16  # all descriptors, or just the first
                r = ring.run(cdbs.get_lba_status(lba, alloc), data_in_len=alloc)
                want = model.status(lba, NBLOCKS - lba)
                assert parse_lba_status(r.data) == (want if seed else want[:1])
            assert r.good, (op, arg, r)
        r = ring.run(cdbs.read16(0, NBLOCKS), data_in_len=SIZE)
        assert r.good and r.data == model.read()
        assert pool.disk_used(name) == len(model.mapped) * UNIT
    finally:
        ring.close()
        dev.close()
        pool.delete_disk(name)
