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
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tcmu_py.handlers.thin import Pool, ThinBackend, create_pool
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
    p = Pool.open(os.path.join(root, "pool"))
    yield p
    p.close()
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
                assert first[0][0] == lba * BS  # SBC-4 5.8: starts at the requested LBA
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
