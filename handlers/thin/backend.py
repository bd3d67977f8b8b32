"""ThinBackend: a `BlockBackend` over one sparse file of a thin pool (`ThinProvisioning`).

Theory of operation:

- The disk is cut into allocation units of `unit` bytes (the last one may be short). A unit is
  **mapped** when the file holds any allocated byte in it, **deallocated** otherwise (then it reads
  as zeros: LBPRZ). The pool accounts whole units; GET LBA STATUS reports whole units (clipped to
  the requested range). The file is the truth, read with SEEK_DATA/SEEK_HOLE.
- **Writes** (`write`, `write_same`): under the disk lock, find the units of the range that are
  holes, reserve them in the pool (all or nothing: SpaceAllocationFailed before a byte is written),
  register the range as in flight, then write outside the lock. Units reserved but not yet holding
  data are *unconfirmed*; a concurrent write to the same unit sees it unconfirmed and does not
  reserve it again. When the last in-flight write covering an unconfirmed unit ends, the unit is
  checked: if it is still a hole (the writes failed) its reservation is released. Invariant, under
  the lock: accounted units = units with data in the file + unconfirmed units.
- **Deallocation** (`unmap`, `write_same` with UNMAP and a zero block, `resize`) takes its unit
  range exclusively: it waits for in-flight writes touching those units and holds off new ones,
  punches, recounts the range and releases the difference. Whole units are punched; a partial unit
  at an edge is zeroed by punching just that byte range (SBC-4 logical block provisioning: with
  LBPRZ=1 LBAs left mapped by an unmap read as zeros), and then, if the whole unit now reads as
  zeros, the unit is punched, so that several small discards covering a unit (fstrim of 4 KiB
  blocks) give it back.
- **The C data plane** (`file_extent`): the device's plain READ/WRITE of units that `_units` says
  are allocated go straight to the file in C (they allocate nothing, so they need none of the
  above). `_units` is that map: set only once a write's data is in the file, and cleared under the
  lock when a deallocation takes its units exclusively, before it punches (`_begin_exclusive`),
  so no later plane command takes a unit being deallocated; `resize` clears every unit of the old
  map before it truncates, and declares a new map (`file_extent` again, after the device's
  resize). The device fences the plane off every unit its own commands touch.
- **Durability**: with `write_cache=False` the file is opened O_DSYNC, so every write is durable on
  return, and unmaps end with fdatasync; with `write_cache=True` writes go to the page cache and
  `flush` (fdatasync) makes them durable, so the caching page's WCE=1 tells the truth.

Methods run on the device's worker threads, several at once.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tcmu_py.backend import UnitMap
from tcmu_py.handler import ProvisioningInfo, on_memory_filesystem

from .._pool import PoolDisk
from .pool import count_units
from .sparse import data_runs, pread_all, punch_hole, pwrite_all, unit_runs

if TYPE_CHECKING:
    from .pool import Pool

#: Bytes per pwrite when filling a pattern (WRITE SAME) and per read when checking for zeros.
CHUNK = 1 << 20
_ZEROS = memoryview(bytes(CHUNK))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _overlaps(ranges: list[tuple[int, int]], first: int, last: int) -> bool:
    return any(a < last and first < b for a, b in ranges)


@dataclass(frozen=True)
class ThinProvisioningInfo(ProvisioningInfo):
    """`ProvisioningInfo` plus the pool's soft-threshold generation (see `Pool.generation`)."""

    threshold_generation: int = 0


class ThinBackend(PoolDisk["Pool"]):
    """One thin disk. Create with `Pool.open_disk`; `close` it when the device goes away.

    Capabilities (`tcmu_py.backend`): `Unmap` (with ``lbprz`` and ``unmap_granularity``),
    `WriteSame`, `LbaStatus`, `ThinProvisioning`, `Resizable`, `Closable`, `FileExtent` (with a
    `UnitMap`).
    """

    #: `Unmap` promise: deallocated units read as zeros (holes) — SBC-4 LBPRZ.
    lbprz = True

    def __init__(
        self,
        pool: Pool,
        name: str,
        fd: int,
        size: int,
        unit: int,
        *,
        block_size: int = 512,
        write_cache: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._join_pool(pool)
        self.name = name
        self.size = size
        self.block_size = block_size
        self.write_cache = write_cache
        self.unit = unit
        #: `Unmap` promise: the unit deallocated whole (VPD B0h OPTIMAL UNMAP GRANULARITY).
        self.unmap_granularity = unit
        self._fd = fd
        self._on_close = on_close
        #: False on tmpfs/ramfs: I/O is a memory copy, cheaper on the loop thread than handed off.
        #: Every command of the disk then runs on that one thread, so the waits below never occur.
        self.blocking = not on_memory_filesystem(fd)
        # `with self._lock` where no wait is needed: the same lock as the condition's, without
        # Condition's Python-level __enter__/__exit__ (two calls per write saved).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writing: list[tuple[int, int]] = []  # unit ranges of in-flight writes
        self._exclusive: list[tuple[int, int]] = []  # unit ranges being deallocated
        self._unconfirmed: set[int] = set()
        self._closed = False
        #: One byte per unit, 1 if the file holds data in it, 0 if it is a hole: the write path
        #: reads it instead of asking the file system (SEEK_DATA on tmpfs scans to the next data
        #: or end of file: a fresh disk paid a scan per write). Read from the file once here,
        #: then kept exact under `_lock`: set by completed writes, re-read from the file for
        #: units a failed write or a deallocation touched.
        self._units = bytearray(_ceil_div(size, unit))
        self._load_units(0, len(self._units))

    # ------------------------------------------------------------------------------------------
    # Unit bookkeeping (all offsets in bytes, unit ranges half-open)

    def _unit_range(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.unit, _ceil_div(offset + length, self.unit)

    def _mapped(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """Merged unit ranges within [first, last) that hold data, in order."""
        u = self.unit
        return unit_runs(self._fd, u, first * u, min(last * u, self.size))

    def _holes(self, first: int, last: int) -> list[tuple[int, int]]:
        """Unit ranges within [first, last) without data (from `_units`; caller holds `_lock`)."""
        units = self._units
        if last - first == 1:  # the common small write
            return [] if units[first] else [(first, last)]
        out = []
        pos = first
        while pos < last:
            a = units.find(0, pos, last)
            if a < 0:
                break
            b = units.find(1, a, last)
            b = last if b < 0 else b
            out.append((a, b))
            pos = b
        return out

    def _load_units(self, first: int, last: int) -> None:
        """Set `_units[first:last]` from the file (caller holds `_lock`, or owns the disk)."""
        units = self._units
        units[first:last] = bytes(last - first)
        for a, b in self._mapped(first, last):
            units[a:b] = b"\x01" * (b - a)

    def _has_data(self, start: int, end: int) -> bool:
        try:
            return os.lseek(self._fd, start, os.SEEK_DATA) < end
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after start
                return False
            raise

    # ------------------------------------------------------------------------------------------
    # Write admission

    def _begin_write(self, first: int, last: int) -> None:
        """Reserve the unallocated units of [first, last) and register the write, or raise
        SpaceAllocationFailed having changed nothing."""
        with self._lock:
            while self._exclusive and _overlaps(self._exclusive, first, last):
                self._cond.wait()
            holes = self._holes(first, last)
            if not holes:  # every unit already holds data: nothing to reserve
                self._writing.append((first, last))
                return
            if self._unconfirmed:
                new = [u for a, b in holes for u in range(a, b) if u not in self._unconfirmed]
                self.pool.reserve(self.name, len(new))
                self._unconfirmed.update(new)
            else:
                count = sum(b - a for a, b in holes)
                self.pool.reserve(self.name, count)
                for a, b in holes:
                    self._unconfirmed.update(range(a, b))
            self._writing.append((first, last))

    def _end_write(self, first: int, last: int, *, written: bool = False) -> None:
        """Unregister the write; release reservations of units that stayed holes. `written`:
        every byte of the range was written, so each of its units now holds data (written zeros
        stay allocated: `probe_filesystem`) and none needs checking."""
        with self._lock:
            self._writing.remove((first, last))
            if written:
                self._units[first:last] = b"\x01" * (last - first)
            if self._unconfirmed:
                if last - first <= len(self._unconfirmed):
                    mine = [u for u in range(first, last) if u in self._unconfirmed]
                else:
                    mine = [u for u in self._unconfirmed if first <= u < last]
                done = [u for u in mine if not _overlaps(self._writing, u, u + 1)]
                if done:
                    self._unconfirmed.difference_update(done)
                if done and not written:
                    mapped = list(self._mapped(min(done), max(done) + 1))
                    stale = 0
                    for x in done:
                        has_data = any(a <= x < b for a, b in mapped)
                        self._units[x] = has_data
                        stale += not has_data
                    self.pool.release(self.name, stale)
            if self._exclusive:
                self._cond.notify_all()

    def _begin_exclusive(self, first: int, last: int) -> tuple[int, int]:
        with self._lock:
            while _overlaps(self._exclusive, first, last):
                self._cond.wait()
            item = (first, last)
            self._exclusive.append(item)  # from here on new writes to these units wait
            # ... and the data plane's: it sees these units unallocated until `_load_units`.
            lo, hi = min(first, len(self._units)), min(last, len(self._units))
            self._units[lo:hi] = bytes(hi - lo)
            while _overlaps(self._writing, first, last):
                self._cond.wait()
            return item

    def _end_exclusive(self, item: tuple[int, int]) -> None:
        with self._lock:
            self._exclusive.remove(item)
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------
    # BlockBackend

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill `bufs` from `offset`; deallocated units read as zeros."""
        pread_all(self._fd, offset, bufs)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write `bufs` at `offset`. Raises SpaceAllocationFailed (nothing written) if the pool
        cannot hold the units this write allocates; OSError if the file system fails (then a
        part may have been written)."""
        length = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        if length == 0:
            return
        if offset < 0 or offset + length > self.size:
            self._check_bounds(offset, length)  # raises
        first, last = self._unit_range(offset, length)
        self._begin_write(first, last)
        written = False
        try:
            pwrite_all(self._fd, offset, bufs, length)
            written = True
        finally:
            self._end_write(first, last, written=written)

    def file_extent(self) -> tuple[int, int, UnitMap] | None:
        """`FileExtent` for the C data plane: the disk is the file from byte 0, and `_units` the
        allocation map (see the module docstring). None when `read` or `write` is not this
        class's own (a subclass that overrides them wants them called for every command)."""
        if (getattr(self.read, "__func__", None) is not ThinBackend.read
                or getattr(self.write, "__func__", None) is not ThinBackend.write):
            return None
        return self._fd, 0, UnitMap(self.unit, self._units)

    def flush(self) -> None:
        """fdatasync: every acknowledged write and unmap is durable afterwards."""
        os.fdatasync(self._fd)

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): it reads as zeros afterwards. Whole units are
        punched and returned to the pool; partial units are zeroed (and returned if they end up all
        zeros). Raises OSError on file-system failure (accounting stays exact)."""
        if length <= 0:
            return
        self._check_bounds(offset, length)
        first, last = self._unit_range(offset, length)
        item = self._begin_exclusive(first, last)
        try:
            u = self.unit
            before = count_units(self._fd, u, first * u, min(last * u, self.size))
            try:
                self._deallocate(offset, offset + length)
            finally:
                after = count_units(self._fd, u, first * u, min(last * u, self.size))
                self.pool.release(self.name, before - after)
                with self._lock:
                    self._load_units(first, last)
        finally:
            self._end_exclusive(item)
        if not self.write_cache:
            os.fdatasync(self._fd)

    def _deallocate(self, offset: int, end: int) -> None:
        u, size = self.unit, self.size
        full_lo = _ceil_div(offset, u)
        # The short last unit counts as whole when the range reaches the end of the disk.
        full_hi = _ceil_div(size, u) if end == size else end // u
        pieces: list[tuple[int, int]] = []
        if full_lo <= full_hi:
            if full_lo < full_hi:
                # Punch whole units even past the end of the file (KEEP_SIZE): a short last unit
                # may end inside a file-system block, which only a punch beyond EOF deallocates.
                punch_hole(self._fd, full_lo * u, (full_hi - full_lo) * u)
            if offset < full_lo * u:
                pieces.append((offset, min(full_lo * u, end)))
            if full_hi * u < end:
                pieces.append((full_hi * u, end))
        else:
            pieces.append((offset, end))
        for s, e in pieces:
            us = s // u * u
            ue = min(us + u, size)
            if not self._has_data(us, ue):
                continue  # already reads as zeros
            punch_hole(self._fd, s, e - s)  # zeroes partial fs blocks, frees whole ones
            if self._has_data(us, ue) and self._reads_zero(us, ue):
                punch_hole(self._fd, us, u)

    def _reads_zero(self, start: int, end: int) -> bool:
        buf = bytearray(min(CHUNK, end - start))
        view = memoryview(buf)
        for s, e in data_runs(self._fd, start, end):
            pos = s
            while pos < e:
                n = min(len(buf), e - pos)
                pread_all(self._fd, pos, [view[:n]])
                if view[:n] != _ZEROS[:n]:
                    return False
                pos += n
        return True

    def write_same(self, offset: int, length: int, block: bytes, unmap: bool) -> None:
        """Fill [offset, offset+length) with `block` repeated. With `unmap` and an all-zero block
        the range is deallocated as by `unmap` (SBC-4 WRITE SAME, UNMAP bit); otherwise written
        like `write` (same all-or-nothing allocation)."""
        block = bytes(block)
        if len(block) != self.block_size or length % self.block_size:
            raise ValueError(f"write_same: block of {len(block)} bytes, length {length}")
        if length <= 0:
            return
        self._check_bounds(offset, length)
        zero = block.count(0) == len(block)
        if unmap and zero:
            self.unmap(offset, length)
            return
        chunk = memoryview(block * max(1, min(length, CHUNK) // len(block)))
        first, last = self._unit_range(offset, length)
        self._begin_write(first, last)
        written = False
        try:
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(chunk), end - pos)
                pwrite_all(self._fd, pos, [chunk[:n]])
                pos += n
            written = True
        finally:
            self._end_write(first, last, written=written)

    def lba_status(
        self, offset: int, length: int, *, max_runs: int | None = None
    ) -> list[tuple[int, int, int]]:
        """Runs ``(offset, length, status)`` covering [offset, offset+length) from `offset`
        (SBC-4 GET LBA STATUS: the first descriptor starts at the requested LBA): status 0 mapped, 1
        deallocated, per allocation unit. Stops after `max_runs` runs if given."""
        end = min(offset + length, self.size)
        runs: list[tuple[int, int, int]] = []
        pos = offset
        u = self.unit
        first, last = self._unit_range(offset, end - offset)
        for a, b in self._mapped(first, last):
            ms, me = max(a * u, offset), min(b * u, end)
            if ms > pos:
                runs.append((pos, ms - pos, 1))
            runs.append((ms, me - ms, 0))
            pos = me
            if max_runs is not None and len(runs) >= max_runs:
                return runs[:max_runs]
        if pos < end:
            runs.append((pos, end - pos, 1))
        return runs if max_runs is None else runs[:max_runs]

    def provisioning(self) -> ThinProvisioningInfo:
        pool = self.pool
        return ThinProvisioningInfo(
            capacity=pool.capacity,
            used=pool.used,
            device_used=pool.disk_used(self.name),
            soft_threshold=pool.soft_threshold,
            threshold_generation=pool.generation,
        )

    def resize(self, size: int) -> None:
        """Grow or shrink the file to `size` bytes; units cut off return to the pool."""
        if size <= 0 or size % self.block_size:
            raise ValueError(f"resize: {size}: expected a positive multiple of {self.block_size}")
        item = self._begin_exclusive(0, 1 << 62)
        try:
            u = self.unit
            start = min(size, self.size) // u * u
            before = count_units(self._fd, u, start, self.size)
            try:
                os.ftruncate(self._fd, size)
                self.size = size
            finally:
                after = count_units(self._fd, u, start, os.fstat(self._fd).st_size)
                self.pool.release(self.name, before - after)
                with self._lock:
                    self._units = bytearray(_ceil_div(self.size, u))
                    self._load_units(0, len(self._units))
        finally:
            self._end_exclusive(item)

    def close(self) -> None:
        """Close the file and leave the pool (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.close(self._fd)
        self.pool._disk_closed(self.name)
        if self._on_close is not None:
            self._on_close()

    def _check_bounds(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) beyond the disk ({self.size})")
