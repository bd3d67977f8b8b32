"""DedupBackend: a `BlockBackend` over one disk of a dedup pool (`ThinProvisioning`).

Theory of operation:

- The disk is a sequence of chunks of the pool's ``chunk_size``; a chunk is either mapped to a
  stored chunk or absent (zeros, deallocated). Every change is "chunk index -> new content":
  whole chunks covered by the command take their bytes from it (hashed before the pool lock is
  taken); a chunk only partly covered is read, patched and hashed under the pool lock
  (read-modify-write), so concurrent writes to different blocks of one chunk never lose each
  other's bytes. An all-zero result unmaps the chunk.
- **UNMAP** is a write of zeros: whole chunks lose their map entry (and their reference), partly
  covered ones are patched with zeros and deallocated if that leaves them all zeros (SBC-4
  4.7.3.4: with LBPRZ=1 unmapped LBAs read as zeros). WRITE SAME with UNMAP and a zero block is
  the same; WRITE SAME with any block stores one chunk whatever the length.
- **Space**: only new distinct content takes space; a command whose new chunks do not fit under
  the pool's capacity fails with SPACE ALLOCATION FAILED before anything changes (`DedupPool.put`).
  A deallocation never does: the partly deallocated chunks at its ends (zeros patched in) are
  stored even on a full pool, as the thin pool zeroes part of a unit in place.
- **Durability**: without write cache every write and unmap is committed before it returns
  (container fdatasync, then SQLite commit); with write cache it is acknowledged from the pool's
  open transaction and `flush` (FUA, SYNCHRONIZE CACHE) commits it. A commit makes every disk of
  the pool durable, not only this one.

Threads: methods run on the device's worker threads, several at once; each pool operation takes
the pool's lock (`DedupPool.lock`), so the pool's disks run their metadata work one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tcmu_py.backend import ChunkExtent, ChunkTable, NativeKit
from tcmu_py.handler import ProvisioningInfo

from .._pool import PoolDisk
from .store import is_zero_chunk

if TYPE_CHECKING:
    from .store import DedupPool


#: Entries of a disk's chunk table at most: 24 bytes each, 24 MiB of address space, a 4 GiB
#: disk of 4 KiB chunks (64 GiB of 64 KiB chunks) whole; a smaller disk gets one entry per
#: chunk (rounded up to a power of two). The table is an anonymous mapping: a page of it is
#: resident only once an entry in it was set, and emptying the table gives its pages back.
TABLE_SLOTS = 1 << 20


#: Chunks one step of a deallocation handles at most (`DedupBackend.unmap`): the pool's lock is
#: given up between steps and the memory of a step is bounded (~20 MB for 65536 chunks), where
#: a whole-disk UNMAP in one step took ~75 MB per GiB of 4 KiB chunks and held every other disk
#: of the pool for its duration.
UNMAP_STEP_CHUNKS = 1 << 16

#: Chunks one GET LBA STATUS examines at most (`DedupBackend.lba_status`): the map rows it reads
#: under the pool's lock are bounded (~0.1 s), where a disk mapped whole answered in time
#: growing with the rest of the disk (1.1 s at 4 GiB, minutes at 1 TiB) and held the pool's
#: other disks meanwhile. SBC-4 5.8: the descriptors need not reach the end of the range; the
#: initiator asks again from where the last one ends.
LBA_STATUS_CHUNKS = 1 << 16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class DedupBackend(PoolDisk["DedupPool"]):
    """One dedup disk. Create with `DedupPool.open_disk`; `close` it when the device goes away.

    Capabilities (`tcmu_py.backend`): `Unmap` (``lbprz``, ``unmap_granularity`` = chunk size),
    `WriteSame`, `LbaStatus`, `ThinProvisioning`, `Closable`, `FileExtent` (a `ChunkExtent`
    when a native loop serves the disk); ``transfer_granularity`` = chunk size.
    """

    #: `Unmap` promise: an absent chunk reads as zeros (SBC-4 LBPRZ).
    lbprz = True

    def __init__(self, pool: DedupPool, name: str, disk_id: int, size: int, *,
                 block_size: int = 512, write_cache: bool = False,
                 on_close: Callable[[], None] | None = None) -> None:
        self._join_pool(pool)
        self.name = name
        self.disk_id = disk_id
        self.size = size
        self.block_size = block_size
        self.write_cache = write_cache
        self.chunk_size = pool.chunk_size
        #: `Unmap` promise: the chunk is what a deallocation frees (VPD B0h).
        self.unmap_granularity = pool.chunk_size
        #: `BlockBackend` promise: a write of part of a chunk is a read-modify-write (VPD B0h
        #: OPTIMAL TRANSFER LENGTH GRANULARITY).
        self.transfer_granularity = pool.chunk_size
        self._zero = bytes(pool.chunk_size)
        self._on_close = on_close
        self._closed = False
        #: Set by the device when a native loop serves it (`tcmu_py.backend.NativeKit`): the
        #: disk then declares a `ChunkExtent`, and the loop serves READs whose chunks it knows.
        self.native_kit: NativeKit | None = None
        self._table: ChunkTable | None = None

    # ------------------------------------------------------------------------------------------
    # BlockBackend

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill `bufs` from `offset`; absent chunks read as zeros."""
        if len(bufs) == 1:
            view = bufs[0]
            if view.nbytes:
                self._check_bounds(offset, view.nbytes)
                self._read_into(offset, view.cast("B"))
            return
        length = sum(b.nbytes for b in bufs)
        if length == 0:
            return
        self._check_bounds(offset, length)
        data = memoryview(bytearray(length))
        self._read_into(offset, data)
        pos = 0
        for view in bufs:
            n = view.nbytes
            view[:] = data[pos : pos + n]
            pos += n

    def _read_into(self, offset: int, view: memoryview) -> None:
        """`view` (contiguous bytes) from `offset`: the index's chunks, and over them those
        whose newest bytes are in the write journal (read again if the journal moved chunks
        into the index meanwhile, `Journal.patch`)."""
        pool, did = self.pool, self.disk_id
        journal = pool.journal
        if journal is None:
            pool.read_into(did, offset, view)
            return
        for _ in range(3):
            removals = journal.removals
            pool.read_into(did, offset, view)
            if journal.patch(did, offset, view, removals):
                return
        with journal.steady():  # no drain moves anything while this holds
            removals = journal.removals
            pool.read_into(did, offset, view)
            journal.patch(did, offset, view, removals)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Store `bufs` at `offset`. SpaceAllocationFailed (nothing changed) if the new distinct
        chunks do not fit in the pool; OSError if the file system fails (nothing changed).
        Whole chunks go to the pool's write journal if it has one (and room)."""
        length = sum(b.nbytes for b in bufs)
        if not length:
            return
        self._check_bounds(offset, length)
        journal = self.pool.journal
        if journal is not None:
            cs = self.chunk_size
            if not offset % cs and not length % cs and journal.append(
                    self.disk_id, offset // cs, bufs, durable=not self.write_cache):
                return
            journal.drain_all()  # the index takes it: after every write before it
        # One buffer (the usual case) is used in place: it is the command's and stays valid
        # until this returns, and nothing keeps a reference to it past that (new chunks are
        # appended to their container inside `DedupPool.put`).
        view = bufs[0].cast("B") if len(bufs) == 1 else memoryview(b"".join(bufs))
        self._store(offset, view.nbytes, lambda a, b: view[a - offset : b - offset], view=view)

    def flush(self) -> None:
        """Make every acknowledged write and unmap durable: the write journal's records (of
        every disk of the pool), then the pool's open transaction."""
        journal = self.pool.journal
        if journal is not None:
            journal.sync()
        self.pool.commit()

    def _settle(self) -> None:
        """Before a command that works on the index alone: every journaled write before it
        is in the index (`Journal.drain_all`; not under the pool's lock)."""
        journal = self.pool.journal
        if journal is not None:
            journal.drain_all()

    def lost_writes(self) -> str | None:
        """`LostWrites`: writes this disk acknowledged were rolled back by a commit that failed
        since the last SYNCHRONIZE CACHE (another disk's, the collector's, a group commit, a
        FUA write's): a SYNCHRONIZE CACHE answering GOOD would hide it."""
        return self.pool.take_loss(self.disk_id)

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): it reads as zeros afterwards; whole chunks drop
        their reference, partial chunks are zeroed (and dropped once all zeros). In steps of at
        most `UNMAP_STEP_CHUNKS` chunks, each its own change of the pool: an error leaves the
        steps before it done (SBC-4 does not make UNMAP all-or-nothing)."""
        if length <= 0:
            return
        self._check_bounds(offset, length)
        self._settle()
        zero = self._zero
        step = UNMAP_STEP_CHUNKS * self.chunk_size
        pos, end = offset, offset + length
        while pos < end:  # in steps of whole chunks: only the range's ends cut a chunk
            stop = min(end, (pos // step + 1) * step)
            self._store(pos, stop - pos, lambda a, b: zero[: b - a], uniform=zero,
                        deallocating=True)
            pos = stop

    def write_same(self, offset: int, length: int, block: bytes, unmap: bool) -> None:
        """Fill [offset, offset+length) with `block`: one stored chunk for all whole chunks."""
        block = bytes(block)
        if len(block) != self.block_size or length % self.block_size:
            raise ValueError(f"write_same: block of {len(block)} bytes, length {length}")
        if length <= 0:
            return
        self._check_bounds(offset, length)
        self._settle()
        pattern = block * (self.chunk_size // self.block_size)
        cs = self.chunk_size

        def source(a: int, b: int) -> bytes:
            # Every chunk starts on a block boundary: its bytes are the pattern's from there.
            return pattern[a % cs : a % cs + (b - a)]

        self._store(offset, length, source, uniform=pattern)

    def _store(self, offset: int, length: int,
               source: Callable[[int, int], bytes | memoryview], *,
               uniform: bytes | None = None, view: memoryview | None = None,
               deallocating: bool = False) -> None:
        """Give [offset, offset+length) the bytes `source(a, b)` returns for [a, b) in it;
        `uniform`: every whole chunk of the range holds these bytes (hashed once); `view`:
        the bytes of the whole range (what `source` slices), cut into chunks in one pass;
        `deallocating`: zeros of a deallocation, never refused for space (`DedupPool.put`)."""
        cs, size, end = self.chunk_size, self.size, offset + length
        first, last = offset // cs, _ceil_div(end, cs)
        zero = self._zero
        fingerprint = self.pool.fingerprint
        uniform_fp = None if uniform is None or uniform == zero else fingerprint(uniform)
        whole: list[tuple[int, bytes | memoryview | None, bytes | None]] = []
        partial: list[int] = []
        rest: Sequence[int] = range(first, last)
        if view is not None and uniform is None:
            lo, hi = _ceil_div(offset, cs), end // cs  # the chunks [offset, end) covers whole
            if lo < hi:
                pieces = [view[a : a + cs] for a in range(lo * cs - offset, hi * cs - offset, cs)]
                whole = [(idx, None, None) if is_zero_chunk(piece, zero)
                         else (idx, piece, fingerprint(piece))
                         for idx, piece in zip(range(lo, hi), pieces, strict=True)]
                rest = [*range(first, lo), *range(hi, last)]
        for idx in rest:
            a, b = idx * cs, min((idx + 1) * cs, size)  # the short last chunk counts up to size
            if a < offset or b > end:
                partial.append(idx)
            elif uniform is not None and b - a == cs:  # the short last chunk: zero-padded below
                whole.append((idx, None, None) if uniform_fp is None
                             else (idx, uniform, uniform_fp))
            else:
                piece = source(a, b)
                if len(piece) < cs:
                    piece = bytes(piece) + zero[len(piece):]
                whole.append((idx, None, None) if is_zero_chunk(piece, zero) else
                             (idx, piece, fingerprint(piece)))
        pool = self.pool
        with pool.lock:
            entries = whole
            if partial:
                old = pool.read_chunks(self.disk_id, partial[0], partial[-1] + 1)
                for idx in partial:
                    buf = bytearray(old.get(idx, zero))
                    a, b = max(idx * cs, offset), min((idx + 1) * cs, end)
                    buf[a - idx * cs : b - idx * cs] = source(a, b)
                    piece = bytes(buf)
                    entries.append((idx, None, None) if piece == zero else
                                   (idx, piece, fingerprint(piece)))
            pool.put(self.disk_id, entries, durable=not self.write_cache,
                     deallocating=deallocating)

    # ------------------------------------------------------------------------------------------
    # The native loop's READs (`tcmu_py.backend.FileExtent`)

    def file_extent(self) -> ChunkExtent | None:
        """A `ChunkExtent` once the device offered a native kit (None before): a chunk table
        of up to `TABLE_SLOTS` entries, kept by the pool (`DedupPool.attach_table`) with every
        location its map cache learns of this disk, and changed before anything moves; with
        the pool's write journal's lease (`Journal.lease_for`) when it has one and the write
        cache is on, so that the loop appends this disk's WRITEs of whole chunks itself."""
        kit = self.native_kit
        if kit is None or self._closed:
            return None
        if self._table is None:
            chunks = max(1, _ceil_div(self.size, self.chunk_size))
            slots = min(TABLE_SLOTS, 1 << (chunks - 1).bit_length())
            self._table = kit.chunk_table(self.chunk_size, slots)
            self.pool.attach_table(self.disk_id, self._table)
        journal = self.pool.journal
        lease = (journal.lease_for(kit) if journal is not None and self.write_cache
                 else None)
        return ChunkExtent(self._table, lease, self.disk_id)

    @property
    def c_reads(self) -> tuple[int, int]:
        """READs the native loop served from the chunk table, and READs it missed."""
        table = self._table
        return (0, 0) if table is None else (table.hits, table.misses)

    @property
    def c_writes(self) -> tuple[int, int]:
        """WRITEs the native loops of the pool's disks appended to its write journal, and WRITEs
        of whole chunks they offered it while leased and sent here instead."""
        journal = self.pool.journal
        return (0, 0) if journal is None else journal.lease_figures()

    # ------------------------------------------------------------------------------------------
    # Provisioning

    def lba_status(self, offset: int, length: int, *, max_runs: int | None = None
                   ) -> list[tuple[int, int, int]]:
        """Runs ``(offset, length, status)`` from `offset` (SBC-4 5.8: the first descriptor
        starts at the requested LBA), status 0 mapped, 1 deallocated, per chunk; at most
        `LBA_STATUS_CHUNKS` chunks from `offset`."""
        self._settle()
        cs = self.chunk_size
        end = min(offset + length, self.size, (offset // cs + LBA_STATUS_CHUNKS) * cs)
        runs: list[tuple[int, int, int]] = []
        pos = offset
        for idx in self.pool.mapped_indexes(self.disk_id, offset // cs, _ceil_div(end, cs)):
            ms, me = max(idx * cs, offset), min((idx + 1) * cs, end)
            if ms > pos:
                runs.append((pos, ms - pos, 1))
            if runs and runs[-1][2] == 0 and runs[-1][0] + runs[-1][1] == ms:
                runs[-1] = (runs[-1][0], me - runs[-1][0], 0)
            else:
                runs.append((ms, me - ms, 0))
            pos = me
            if max_runs is not None and len(runs) > max_runs:
                return runs[:max_runs]
        if pos < end:
            runs.append((pos, end - pos, 1))
        return runs if max_runs is None else runs[:max_runs]

    def provisioning(self) -> ProvisioningInfo:
        """Pool figures; the device's "used" is the pool's physical use too: a deduplicated
        chunk belongs to every disk naming it, so per-disk physical use has no meaning."""
        pool = self.pool
        deduplicated, compressed = pool.savings()
        # Journaled chunks not yet in the index count as if unique, as they do against the
        # capacity and for the soft threshold (`DedupPool.crossing_hint`): LOG SENSE 0Ch's
        # used count is the one the threshold is met on (SBC-4 4.7.3.7).
        journal = pool.journal
        used = pool.used + (0 if journal is None else journal.pending)
        return ProvisioningInfo(capacity=pool.capacity, used=used, device_used=used,
                                soft_threshold=pool.soft_threshold, deduplicated=deduplicated,
                                compressed=compressed)

    def close(self) -> None:
        """Commit and leave the pool (idempotent)."""
        with self.pool.lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.pool.commit()
            finally:
                self.pool.take_loss(self.disk_id)  # nobody left to tell; its id may be reused
                self.pool.detach_table(self.disk_id)
                self.pool._disk_closed(self.name)
        if self._on_close is not None:
            self._on_close()

    def _check_bounds(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) beyond the disk ({self.size})")

