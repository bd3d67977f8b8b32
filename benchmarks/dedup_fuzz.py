"""A byte-model fuzzer of the dedup handler (it found D43: a container's deletion let a shadowed
map cache entry come back, and a READ returned zeros for data).

    .venv/bin/python benchmarks/dedup_fuzz.py --seeds 0-39 --configs a-h --batches 400 [--serial]

What it drives: two or three dedup disks of one pool (`CONFIGS`: chunk size, compression, block
sizes and write cache of the disks, a small container size, and small map caches and chunk
tables, so that eviction, rotation and compaction happen within a few hundred commands), each
opened with `DedupHandler.open` behind a `RingHarness` (the production ring and runner, the
native loop serving READs from the chunk table). Per batch, one disk gets 1-10 random commands
submitted at once: READ(16) (some FUA), WRITE(16), WRITE AND VERIFY(16), WRITE SAME(16) (UNMAP
and NDOB bits), UNMAP, COMPARE AND WRITE (matching or not), SYNCHRONIZE CACHE(10); the blocks
each batch wrote or zeroed are read back at the start of that disk's next batch. Between
batches, at random: collector steps by hand (the pool's own collector runs too, every 10 ms,
unless `--serial`), every chunk of every disk read twice (a miss, then the chunk table), the
pool's compression switched, and the pool closed, checked offline (`check_pool`) and reopened.

The model: the bytes of each disk. Writes of one batch never overlap, so a block has at most two
values during a batch: a READ overlapping a write of its own batch may see either value per
block (the commands run concurrently); every other READ must see the model's bytes exactly.
With `--serial` the commands of a batch run one at a time in order (and the pool's collector
only by hand), so every READ must see exactly what the commands before it left: nothing depends
on timing, which is what the unit smoke (tests/unit/test_dedup_fuzz.py) runs. A command other
than a miscomparing COMPARE AND WRITE must end GOOD; a miscomparing one must not.

Every (seed, config) pair is one deterministic command stream (up to the order concurrent
commands run in). Exit status 0 when every run passed; 1 at the first wrong READ (or failed
command, or unclean `check_pool`), printed with its seed, config and batch. Each pool lives in a
temporary directory removed at the end of its run; a run stops early (and passes) after
`--max-seconds`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.dedup import DedupHandler, acquire_pool, create_pool, release_pool, store
from tcmu_py.handlers.dedup import backend as dedup_backend
from tcmu_py.testing import Pending, cdbs
from tcmu_py.testing.harness import RingHarness

#: Chunks per disk (the last one may be short by 4 KiB).
NCHUNKS = 12
#: Seconds a batch's commands may take before the run fails.
WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class Config:
    chunk: int
    compression: str
    #: (block size, write cache) per disk.
    disks: tuple[tuple[int, bool], ...]
    #: The pool's container size, in chunks.
    container_chunks: int
    #: `backend.TABLE_SLOTS` (None: the default).
    table_slots: int | None = None
    #: `store.MAP_CACHE_ENTRIES` (None: the default).
    map_cache: int | None = None


CONFIGS: dict[str, Config] = {
    "a": Config(4096, "none", ((512, True), (4096, False)), 3),
    "b": Config(16384, "none", ((512, False), (4096, True), (512, True)), 4, map_cache=64),
    "c": Config(65536, "zstd", ((4096, True), (512, False)), 2),
    "d": Config(4096, "zstd", ((512, True), (512, False), (4096, True)), 3, 4, 16),
    "e": Config(16384, "none", ((4096, False), (4096, True)), 2, 4, 16),
    "f": Config(4096, "none", ((512, True), (4096, True), (512, False)), 2, map_cache=32),
    "g": Config(65536, "none", ((512, True), (4096, False)), 2, table_slots=8),
    "h": Config(16384, "zstd", ((512, False), (4096, False)), 3),
}


class FuzzFailure(AssertionError):
    """A wrong READ, a command that did not end as the model says, or an unclean pool."""


def pattern(kind: int, bs: int) -> bytes:
    """A block: zeros (0), almost zeros (1: a 1 at the end, 2: at the start), else `kind`s
    ending in (kind, 255 - kind)."""
    if kind == 0:
        return bytes(bs)
    if kind == 1:
        return bytes(bs - 1) + b"\x01"
    if kind == 2:
        return b"\x01" + bytes(bs - 1)
    return bytes([kind]) * (bs - 2) + bytes([kind, 255 - kind])


def _show(block: bytes) -> str:
    return f"{block[:4].hex()}..{block[-2:].hex()}"


class _Disk:
    def __init__(self, name: str, bs: int, write_cache: bool, size: int, workers: int) -> None:
        self.name, self.bs, self.write_cache, self.workers = name, bs, write_cache, workers
        self.size = size
        self.nblocks = size // bs
        self.model = bytearray(size)
        self._dev: Any = None
        self._ring: RingHarness | None = None
        #: (lba, count) written or zeroed by the last batch: read first in the next one.
        self.recent: list[tuple[int, int]] = []

    @property
    def ring(self) -> RingHarness:
        assert self._ring is not None, f"{self.name} is closed"
        return self._ring

    def open(self, path: str) -> None:
        self._dev = DedupHandler.open(DeviceConfig(self.name, "dedup", f"pool={path}",
                                                   self.size, block_size=self.bs,
                                                   write_cache=self.write_cache))
        self._ring = RingHarness(self._dev, workers=self.workers)
        self.ring.run(cdbs.test_unit_ready())  # the power-on unit attention

    def close(self) -> None:
        ring, dev, self._ring, self._dev = self._ring, self._dev, None, None
        try:
            if ring is not None:
                ring.close()
        finally:
            if dev is not None:
                dev.close()

    def block(self, b: int) -> bytes:
        return bytes(self.model[b * self.bs:(b + 1) * self.bs])


@dataclass
class _Read:
    item: int
    lba: int
    count: int
    what: str
    #: The bytes the commands submitted before it leave (what a serial run must read).
    expected: bytes


@dataclass
class _Batch:
    """One batch of commands for one disk, and what its READs may return."""

    disk: _Disk
    items: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    reads: list[_Read] = field(default_factory=list)
    #: Item index of each COMPARE AND WRITE, and whether it matches.
    caws: dict[int, bool] = field(default_factory=dict)
    #: The values a block written in this batch may have during it (old and new).
    allowed: dict[int, set[bytes]] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)
    new_model: bytearray = field(default_factory=bytearray)

    def free(self, lba: int, count: int) -> bool:
        return not any(b in self.written for b in range(lba, lba + count))

    def read(self, lba: int, count: int, what: str, fua: bool = False) -> None:
        bs = self.disk.bs
        self.items.append((cdbs.read16(lba, count, fua=fua), b"", count * bs))
        self.reads.append(_Read(len(self.items) - 1, lba, count, what,
                                bytes(self.new_model[lba * bs:(lba + count) * bs])))

    def write(self, cdb: bytes, data_out: bytes, lba: int, blocks: list[bytes]) -> None:
        self.items.append((cdb, data_out, 0))
        self.mark(lba, blocks)

    def mark(self, lba: int, blocks: list[bytes]) -> None:
        """Blocks from `lba` on hold `blocks` after this batch."""
        bs = self.disk.bs
        for i, data in enumerate(blocks):
            b = lba + i
            self.written.add(b)
            self.allowed.setdefault(b, {self.disk.block(b)}).add(data)
            self.new_model[b * bs:(b + 1) * bs] = data


def _build(rng: random.Random, disk: _Disk, chunk: int) -> _Batch:
    batch = _Batch(disk, new_model=bytearray(disk.model))
    bs, nb = disk.bs, disk.nblocks
    bpc = chunk // bs

    def extent(max_chunks: int = 3) -> tuple[int, int]:
        if rng.random() < 0.5:  # whole chunks
            lba = rng.randrange(NCHUNKS) * bpc
            count = bpc * rng.randint(1, max_chunks)
        else:
            lba = rng.randrange(nb)
            count = rng.randint(1, max_chunks * bpc)
        lba = min(lba, nb - 1)
        return lba, max(1, min(count, nb - lba))

    for lba, count in disk.recent[-8:]:
        batch.read(lba, count, "recent")
    disk.recent.clear()
    for _ in range(rng.randint(1, 10)):
        r = rng.random()
        if r < 0.25:
            batch.read(*extent(), "read", fua=rng.random() < 0.2)
            continue
        for _try in range(5):
            lba, count = extent()
            if batch.free(lba, count):
                break
        else:
            continue
        if r < 0.42:
            kinds = [rng.choice([0, 0, 1, 2, 3, 4, 5]) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.3:  # one content throughout: duplicate chunks
                kinds = kinds[:1]
            blocks = [pattern(kinds[i % len(kinds)], bs) for i in range(count)]
            if rng.random() < 0.6:
                cdb = cdbs.write16(lba, count, fua=rng.random() < 0.3)
            else:
                cdb = cdbs.write_and_verify16(lba, count, bytchk=rng.choice([0, 1]))
            batch.write(cdb, b"".join(blocks), lba, blocks)
            disk.recent.append((lba, count))
        elif r < 0.62:
            unmap, ndob = rng.random() < 0.6, rng.random() < 0.25
            block = pattern(0 if ndob else rng.choice([0, 0, 0, 1, 3]), bs)
            batch.write(cdbs.write_same16(lba, count, unmap=unmap, ndob=ndob),
                        b"" if ndob else block, lba, [block] * count)
            disk.recent.append((lba, count))
        elif r < 0.85:
            ranges = [(lba, count)]
            for _ in range(rng.randint(0, 2)):
                l2, c2 = extent()
                if batch.free(l2, c2) and all(l2 + c2 <= a or a + c <= l2 for a, c in ranges):
                    ranges.append((l2, c2))
            params = cdbs.unmap_parameters(ranges)
            batch.items.append((cdbs.unmap(len(params)), params, 0))
            for a, c in ranges:  # zeros: the pool's disks report LBPRZ
                batch.mark(a, [bytes(bs)] * c)
                disk.recent.append((a, c))
        elif r < 0.93:
            n = min(2, nb - lba)
            if not batch.free(lba, n):
                continue
            current = bytes(disk.model[lba * bs:(lba + n) * bs])
            verify = current if rng.random() < 0.7 else pattern(9, bs) * n
            new = pattern(rng.choice([0, 3, 4]), bs)
            matches = verify == current
            batch.caws[len(batch.items)] = matches
            if matches:
                batch.write(cdbs.compare_and_write(lba, n), verify + new * n, lba, [new] * n)
            else:
                batch.items.append((cdbs.compare_and_write(lba, n), verify + new * n, 0))
                batch.written.update(range(lba, lba + n))  # nothing else writes there
        else:
            batch.items.append((cdbs.synchronize_cache10(), b"", 0))
    for _ in range(rng.randint(0, 3)):  # after the writes in submission order too
        batch.read(*extent(), "read after")
    return batch


def _check(batch: _Batch, done: list[Pending], serial: bool, where: str) -> None:
    disk = batch.disk
    bs = disk.bs
    opcodes = " ".join(f"{cdb[0]:02X}h" for cdb, _, _ in batch.items)
    for i, p in enumerate(done):
        mismatch = batch.caws.get(i) is False
        if (p.status != 0) != mismatch:
            raise FuzzFailure(f"{where} disk {disk.name}: command {batch.items[i][0].hex()} "
                              f"status {p.status:#x} sense {p.sense.hex()} "
                              f"({'a miscompare expected' if mismatch else 'GOOD expected'})")
    for r in batch.reads:
        got = done[r.item].data_in
        for k in range(r.count):
            b = r.lba + k
            block = bytes(got[k * bs:(k + 1) * bs])
            if serial:
                allowed = {r.expected[k * bs:(k + 1) * bs]}
            else:
                allowed = batch.allowed.get(b, {disk.block(b)})
            if block not in allowed:
                raise FuzzFailure(
                    f"WRONG READ {where} disk {disk.name} (bs {bs}, write cache "
                    f"{disk.write_cache}): {r.what} lba {r.lba} count {r.count}: block {b} "
                    f"is {_show(block)}, expected {' or '.join(sorted(map(_show, allowed)))}; "
                    f"the batch: {opcodes}")
    disk.model[:] = batch.new_model


def _read_all(disks: list[_Disk], chunk: int, where: str, counts: Counter[str]) -> None:
    """Every chunk of every disk, twice (a miss, then the chunk table), against the model."""
    for d in disks:
        bpc = chunk // d.bs
        for c in range(NCHUNKS):
            lba = c * bpc
            n = min(bpc, d.nblocks - lba)
            want = bytes(d.model[lba * d.bs:(lba + n) * d.bs])
            for attempt in ("first", "second"):
                r = d.ring.run(cdbs.read16(lba, n), data_in_len=n * d.bs)
                counts["commands"] += 1
                if r.good and r.data == want:
                    continue
                bad = [k for k in range(n) if r.data[k * d.bs:(k + 1) * d.bs]
                       != want[k * d.bs:(k + 1) * d.bs]]
                raise FuzzFailure(
                    f"WRONG READ {where} disk {d.name} (bs {d.bs}, write cache "
                    f"{d.write_cache}): chunk {c} read whole ({attempt} time): {r}, "
                    f"{len(bad)} wrong blocks, lba {[lba + k for k in bad[:8]]}...")


@contextlib.contextmanager
def _module_settings(config: Config) -> Iterator[None]:
    """The config's table and map cache sizes, restored after."""
    slots, entries = dedup_backend.TABLE_SLOTS, store.MAP_CACHE_ENTRIES
    if config.table_slots is not None:
        dedup_backend.TABLE_SLOTS = config.table_slots
    if config.map_cache is not None:
        store.MAP_CACHE_ENTRIES = config.map_cache
    try:
        yield
    finally:
        dedup_backend.TABLE_SLOTS, store.MAP_CACHE_ENTRIES = slots, entries


def run(seed: int, config: str, batches: int, serial: bool = False, *,
        max_seconds: float = 600.0, counts: Counter[str] | None = None) -> None:
    """Run `batches` batches of (seed, config); raise FuzzFailure at the first wrong READ, a
    command not ending as the model says, or an unclean `check_pool`. `counts` (if given)
    gets the numbers of batches, commands, READs checked, collector steps and reopens."""
    cfg = CONFIGS[config]
    counts = Counter() if counts is None else counts
    rng = random.Random(f"dedup-fuzz {seed} {config}")
    deadline = time.monotonic() + max_seconds
    chunk = cfg.chunk
    with tempfile.TemporaryDirectory(prefix=f"dedup-fuzz-{seed}{config}-") as root, \
            _module_settings(cfg):
        path = os.path.join(root, "pool")
        create_pool(path, "fuzz", 1 << 30, chunk_size=chunk, compression=cfg.compression)
        store.configure_collector(path, store.CollectorSettings(
            interval=3600.0 if serial else 0.01, dead_percent=1))
        size = NCHUNKS * chunk - 4096 * rng.randrange(2)  # maybe a short last chunk
        disks = [_Disk(f"d{i}", bs, wc, size, rng.randint(4, 8))
                 for i, (bs, wc) in enumerate(cfg.disks)]
        pool: store.DedupPool | None = None

        def open_all() -> store.DedupPool:
            p = acquire_pool(path)
            p.container_bytes = cfg.container_chunks * chunk
            for d in disks:
                d.open(path)
            return p

        def close_all() -> None:
            nonlocal pool
            try:
                for d in disks:
                    d.close()
            finally:
                if pool is not None:
                    release_pool(pool)
                pool = None

        def check(where: str) -> None:
            report = store.check_pool(path)
            if not report.clean:
                raise FuzzFailure(f"{where}: check_pool not clean: {report}")

        try:
            pool = open_all()
            for number in range(batches):
                if time.monotonic() > deadline:
                    break
                where = f"seed {seed} config {config} batch {number}"
                batch = _build(rng, rng.choice(disks), chunk)
                ring = batch.disk.ring
                if serial:
                    done: list[Pending] = []
                    for item in batch.items:
                        one = ring.submit_many([item])
                        ring.wait(one, timeout=WAIT_SECONDS)
                        done += one
                else:
                    done = ring.submit_many(batch.items)
                    ring.wait(done, timeout=WAIT_SECONDS)
                counts["batches"] += 1
                counts["commands"] += len(done)
                counts["reads"] += len(batch.reads)
                _check(batch, done, serial, where)
                if rng.random() < 0.15:
                    for _ in range(rng.randint(1, 4)):
                        if pool.collect_step(dead_percent=1) is None:
                            break
                        counts["collect steps"] += 1
                if rng.random() < 0.08:
                    _read_all(disks, chunk, where, counts)
                if rng.random() < 0.03:
                    pool.set_compression(rng.choice(["none", "zstd"]))
                if rng.random() < 0.02:
                    close_all()
                    check(where)
                    pool = open_all()
                    counts["reopens"] += 1
            _read_all(disks, chunk, f"seed {seed} config {config} at the end", counts)
            close_all()
            check(f"seed {seed} config {config} at the end")
        finally:
            close_all()


def _numbers(text: str) -> list[int]:
    """'0-39' or '1,5,7-9'."""
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def _configs(text: str) -> list[str]:
    """'a-h' or 'bdf'."""
    if len(text) == 3 and text[1] == "-":
        names = [chr(c) for c in range(ord(text[0]), ord(text[2]) + 1)]
    else:
        names = list(text.replace(",", ""))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configs {unknown}; known: {''.join(CONFIGS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=_numbers, default=_numbers("0-9"))
    ap.add_argument("--configs", type=_configs, default=list(CONFIGS))
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--serial", action="store_true",
                    help="one command at a time, collector by hand only: exact READs")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="per run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(threadName)s %(name)s %(message)s")
    started = time.monotonic()
    runs = 0
    for seed in args.seeds:
        for config in args.configs:
            counts: Counter[str] = Counter()
            t0 = time.monotonic()
            try:
                run(seed, config, args.batches, args.serial, max_seconds=args.max_seconds,
                    counts=counts)
            except FuzzFailure as exc:
                print(f"FAIL {exc}", flush=True)
                print(f"  after {dict(counts)}; rerun: benchmarks/dedup_fuzz.py --seeds {seed} "
                      f"--configs {config} --batches {args.batches}"
                      f"{' --serial' if args.serial else ''}", flush=True)
                return 1
            runs += 1
            print(f"ok seed {seed} config {config}: {dict(counts)}, "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
    print(f"{runs} runs passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
