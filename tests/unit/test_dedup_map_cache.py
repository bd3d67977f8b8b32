"""A dedup pool's map cache after the collector deletes a container (found by a fuzzer of the
handler, D43).

The cache keeps two generations of chunk locations; a newer entry for a chunk may shadow an
older one of the same chunk in the older generation. When the collector deleted a container,
only the entries naming it were dropped, so the shadowed older entry came back: a READ (from
Python and from the native loop's chunk table, which it fills) returned zeros for a chunk
holding data, or data the chunk held before an UNMAP, and a partial WRITE stored the wrong
bytes for good while `check_pool` stayed clean. Serial commands, the collector run by hand:
no timing involved."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.dedup import DedupHandler, acquire_pool, create_pool, release_pool, store
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness

BS, CS = 512, 4096
BPC = CS // BS


def _blk(s: int) -> bytes:
    return bytes([s]) * BS


class _Disk:
    def __init__(self, path: str, name: str) -> None:
        self.dev = DedupHandler.open(DeviceConfig(name, "dedup", f"pool={path}", 8 * CS,
                                                  block_size=BS, write_cache=False))
        self.ring = RingHarness(self.dev, workers=2)
        self.ring.run(cdbs.test_unit_ready())  # the power-on unit attention

    def read(self, chunk: int) -> bytes:
        r = self.ring.run(cdbs.read16(chunk * BPC, BPC), data_in_len=CS)
        assert r.good, r
        return r.data

    def write(self, lba: int, data: bytes) -> None:
        assert self.ring.run(cdbs.write16(lba, len(data) // BS), data_out=data).good

    def close(self) -> None:
        self.ring.close()
        self.dev.close()


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(store, "MAP_CACHE_ENTRIES", 8)  # two generations of 4 entries
    path = os.path.join(tmp_path, "pool")
    create_pool(path, "cache", 1 << 30, chunk_size=CS)
    store.configure_collector(path, store.CollectorSettings(interval=3600, dead_percent=1))
    p = acquire_pool(path)
    p.container_bytes = 2 * CS  # two chunks per container: compaction moves chunks often
    try:
        yield p
    finally:
        release_pool(p)
        assert store.check_pool(path).clean


def test_a_chunk_moved_by_the_collector_reads_its_data_not_an_older_zeros_entry(
        pool: Any) -> None:
    d = _Disk(pool.path, "d")
    try:
        for c in (0, 2, 3):  # the cache learns "zeros" for chunk 0 (and two more)
            assert d.read(c) == bytes(CS)
        d.write(1 * BPC, _blk(1) * BPC)  # the 4th entry: the generations rotate
        d.write(0, _blk(7) * BPC)  # chunk 0's new entry shadows the old "zeros"
        d.write(1 * BPC, _blk(2) * BPC)  # chunk 0's container is now half dead
        assert d.read(0) == _blk(7) * BPC
        pool.collect(30, dead_percent=1)  # moves chunk 0, deletes its container
        for _ in ("from Python", "from the chunk table"):
            assert d.read(0) == _blk(7) * BPC
        d.write(3, _blk(9))  # a partial write keeps the chunk's other blocks
        with pool.lock:
            pool._forget()  # what is stored, not what a cache says
        assert d.read(0) == _blk(7) * 3 + _blk(9) + _blk(7) * 4
    finally:
        d.close()


def test_an_unmapped_part_stays_zeros_after_the_collector_runs(pool: Any) -> None:
    d = _Disk(pool.path, "e")
    try:
        d.write(0, _blk(17) * BPC)
        d.write(6 * BPC, _blk(17) * BPC)  # the same content: kept live by chunk 6
        for c in (2, 3):  # the 4th entry: chunk 0's entry is now in the older generation
            assert d.read(c) == bytes(CS)
        d.write(1 * BPC, _blk(14) * BPC)
        params = cdbs.unmap_parameters([(0, 4)])
        assert d.ring.run(cdbs.unmap(len(params)), data_out=params).good
        d.write(5 * BPC, _blk(12) * BPC)
        d.write(5 * BPC, _blk(13) * BPC)  # the container of chunk 0's new bytes: half dead
        want = bytes(4 * BS) + _blk(17) * 4
        assert d.read(0) == want
        pool.collect(30, dead_percent=1)
        for _ in ("from Python", "from the chunk table"):
            assert d.read(0) == want
    finally:
        d.close()
