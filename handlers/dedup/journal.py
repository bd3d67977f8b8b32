"""A dedup pool's write journal: whole-chunk WRITEs acknowledged after one append, deduplicated
into the index afterwards (post-process deduplication).

Why: an inline write pays, per 4 KiB chunk, a fingerprint, an index lookup and SQLite rows (a
chunk row with its fingerprint and container index entries, a map row, a reference count)
before it is acknowledged: 0.07-0.10x a raw disk's 1 MiB writes in the lab
(docs/benchmarks.md). With a journal a WRITE costs one ``pwritev`` into space that is already
allocated (and one ``fdatasync`` without write cache); a background thread (the *drainer*)
does the deduplication when writes pause or the journal is half full. Sustained writes longer
than the journal run at the drainer's speed; bursts shorter than it at the append's.

Rules this file obeys
---------------------
* ``journal.dat`` in the pool's directory (0600), made whole at the pool's open (zeros
  written, so an append overwrites allocated blocks), of the pool's ``journal`` bytes
  (pool.json; a new size is taken at an open that finds the journal empty). A circular log of
  *records*, each a `HEADER` of 64 bytes and the data of ``count`` whole chunks of one disk::

      magic  8s  b"TCMUJNL1"     seq    u64   the record's number (+1 per record)
      epoch  u32 (see below)     disk   u64   the disk's id in the index
      flags  u32 (0)             first  u64   the first chunk's index
      count  u32 chunks          (4 bytes zero)
      sum    u64 XXH3-64 of the header's first 48 bytes and the data; 8 bytes zero

  A record lies where the previous one ends, or at 0 when it would pass the file's end.
* The index's ``meta`` holds ``journal_pos``, ``journal_seq`` and ``journal_epoch``: where the
  first record not yet in the index lies, its number, and the epoch records of this open carry.
  A drain puts records' chunks into the pool's transaction (`DedupPool.put`, ``journaled``)
  and moves ``journal_pos``/``journal_seq`` past them in the same transaction: "in the index"
  and "behind the tail" are one committed fact, and a record's space is written again only
  after that commit.

Crash ordering
--------------
1. A record is written whole before its chunks are visible to a read (the overlay, the native
   loop's chunk table) and before the WRITE is acknowledged; without write cache the journal
   is fdatasync'd first, after every record numbered before it is written too (`sync`): replay
   stops at the first record that is not whole, so a durable record needs whole ones before it.
2. SYNCHRONIZE CACHE and FUA (`DedupBackend.flush`) fdatasync the journal the same way, then
   commit the pool (the writes that went to the index directly).
3. Replay (the pool's open): from ``journal_pos`` expecting ``journal_seq``, take each record
   whose magic, epoch, number and checksum hold (trying offset 0 when the one at the position
   does not: the writer wrapped), put it into the index, stop at the first that does not hold,
   and commit with the tail past the last one taken. Putting a record already in the index
   again changes nothing, so a replay that is itself interrupted is safe to repeat.
4. Every open then takes a new epoch (committed before any record is written): records an
   earlier open wrote never match again, wherever they lie and whatever their number, so stale
   bytes past the end of a replay can never be taken for a record of this one. Epoch 0 in
   ``meta`` says there is no journal file (it is removed after that commit); a file found
   then is left from a removal cut short, and is made anew of zeros before any epoch is
   taken (epochs restart from 1 after epoch 0).
5. A record whose write failed is never drained (its bytes are unknown) and the chain after it
   is broken for replay: `sync` then drains everything written into the index (committed)
   before it reports anything durable. Likewise after an fdatasync of the journal failed (the
   kernel reports a lost write-back once): every later `sync` drains instead, until the records
   before the failure are in the index. A drain reads each record back with its checksum; one
   that does not hold (its pages were lost) is not put in the index, and its disk's next
   SYNCHRONIZE CACHE answers WRITE ERROR (`DedupPool.record_loss`).

What else holds
---------------
* Reads: a chunk whose newest write is in the journal is read from there (the *overlay*:
  (disk, chunk) -> record number and offset); the drainer removes an entry only after the
  commit that put its record in the index, and only if no newer record wrote the chunk since.
  A Python read reads the index, then the overlay, and reads again if entries were removed in
  between (`removals`). The native loop's chunk table names the journal for such chunks; the
  pool tells it index locations only for chunks the overlay does not hold (`tell_table`).
* Space: journaled chunks count against the pool's capacity as if unique (`reserved`) until
  drained; a WRITE they would not fit goes to the index directly (which decides exactly). The
  soft threshold's crossing is counted by the append that takes the use plus `reserved` across
  it (`DedupPool.crossing_hint`), so the WRITE reports it; a drain never raises that sum.
* Every command other than a whole-chunk WRITE (a part of a chunk, UNMAP, WRITE SAME, GET LBA
  STATUS, a disk's removal) first drains every record written before it (`drain_all`), so it
  works on the index alone; records written while it runs are newer and stay on top.

The native loops' appends
-------------------------
When a native loop serves a disk of the pool (write cache on), the journal *leases* the loops
a run of its file after its newest record, the record numbers from the next one on, and a
budget of bytes that stays under the capacity and the soft threshold (`_grant`,
`DedupPool.journal_budget`; ``struct tcmu_py_jl`` in tcmu_py/_ring.h). While the lease holds, a
loop writes a plain WRITE of whole chunks without FUA itself: one record in the format above,
back to back in the run (the first may lie at 0: replay looks there too), the disk's chunk
table pointed at it, the command completed. The rules above hold for these records as for
Python's:

6. The journal learns of a loop's record from its notice (`_absorb`), which the loop queues
   after the record is written whole and the chunk table names it. Everything that reads the
   records, the overlay or the figures absorbs first: the WRITE was acknowledged before any
   command after it reached Python (the loop takes the ring in order), so a read, a SYNCHRONIZE
   CACHE or a drain that follows it knows of it.
7. The records' numbers and places are one sequence: Python's own append revokes the lease
   (which waits for an append under way) and absorbs before it numbers its record, and grants
   a new lease from after it at once, before writing it (the loops' records after it may then
   be written first: rules 1 and 5 and `_written_seq` hold as for Python's records that finish
   out of order). A drain grants one too (the space it freed); a decision on the
   pool's space takes it back (`held`), so that the loops never append into room an index write
   is counting on, and a crossing of the soft threshold is always a WRITE of Python's, which
   reports it. No lease after a failed write or fdatasync (rule 5), or while stopping.
8. A loop's record whose write failed is void (its notice says so, rule 5 applies) and ends the
   lease; its command goes to Python, which writes it again or fails it.
9. The chunk table's entries naming the journal carry their record's number: a location from
   the index never replaces one (the backend may not know of the loop's record yet), and a
   drained record's location replaces only its own (`ChunkTable.set_drained`), so no order in
   which the loops and Python tell the table leaves it naming older bytes.

Threads and locks: ``_mu`` (a Condition) guards the records, the overlay and the tables'
journal entries; ``_drain_mu`` makes one drain at a time. The order is: the pool's lock before
``_mu``; ``_drain_mu`` before both; nothing takes the pool's lock while holding ``_mu``. The
lease's C mutex comes after ``_mu``; a loop holds it with no Python lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from tcmu_py.buffers import skip
from tcmu_py.statefile import fsync_dir
from tcmu_py.threadname import name_os_thread

if TYPE_CHECKING:
    from tcmu_py.backend import ChunkTable, JournalLease, NativeKit

    from .store import DedupPool

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.dat"
MAGIC = b"TCMUJNL1"
_HEAD = struct.Struct("<8sIIQQQI4x")  # 48 bytes: magic, epoch, flags, seq, disk, first, count
HEADER = 64
_SUM = struct.Struct("<Q8x")
#: The drainer starts once writes have paused this long, or the journal is half full.
IDLE_SECONDS = 0.1
#: Data one drain step puts into the index before it commits (the pool's lock is held that long).
STEP_BYTES = 2 << 20
#: The longest a WRITE waits for room in the journal (drained by itself meanwhile; then it goes
#: to the index), the longest `drain_all` goes without progress, and the longest either waits
#: for records being written.
WAIT_SECONDS = 20.0
_IDX_BITS = 48  # as store.py's map cache keys
#: An overlay value: the record's number above these bits, the chunk's offset in the journal
#: below (a journal is at most 256 MiB: 2**28).
_SEQ_SHIFT = 40
_OFF_MASK = (1 << _SEQ_SHIFT) - 1


@dataclass
class _Record:
    seq: int
    pos: int  # of its header
    did: int
    first: int
    count: int
    end: int  # pos + HEADER + data
    done: bool = False  # written whole (or failed: void)
    void: bool = False  # its write failed: never drained


def _checksum(head: bytes, data: Sequence[bytes | memoryview]) -> bytes:
    h = xxhash.xxh3_64(head)
    for piece in data:
        h.update(piece)
    return _SUM.pack(h.intdigest())


def pack_header(epoch: int, seq: int, did: int, first: int, count: int,
                data: Sequence[bytes | memoryview]) -> bytes:
    """A record's header for `data` (`count` whole chunks)."""
    head = _HEAD.pack(MAGIC, epoch, 0, seq, did, first, count)
    return head + _checksum(head, data)


def unpack_header(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(epoch, seq, disk, first, count) of a header that has the magic; None if not."""
    if len(raw) < HEADER:
        return None
    magic, epoch, _flags, seq, did, first, count = _HEAD.unpack_from(raw)
    return None if magic != MAGIC else (epoch, seq, did, first, count)


class Journal:
    """A pool's open write journal (`DedupPool.journal`). Made by `open_journal`."""

    #: Whether `start` runs the drainer thread (tests turn it off to drain at known points
    #: only: when the journal is full, before other commands, at close).
    background = True

    def __init__(self, pool: DedupPool, fd: int, size: int, epoch: int, pos: int,
                 seq: int) -> None:
        self.pool = pool
        self.fd = fd
        self.size = size
        self.chunk_size = pool.chunk_size
        #: Bytes the records may take before writers drain it themselves (the pool's
        #: MAX_JOURNAL bounds it: what a command needing the index to itself waits for).
        self._limit = size
        self._epoch = epoch
        self._mu = threading.Condition(threading.Lock())
        self._drain_mu = threading.Lock()
        self._records: collections.deque[_Record] = collections.deque()
        self._tail = pos  # where the next record goes when none is held
        self._next_seq = seq
        self._tail_seq = seq  # the first record not committed to the index
        self._written_seq = seq  # every record before it is written whole (or void)
        self._synced_seq = seq  # every record before it is durable
        #: key (disk << _IDX_BITS | chunk) -> seq << _SEQ_SHIFT | offset of the chunk's bytes
        self._overlay: dict[int, int] = {}
        self._by_seq: dict[int, _Record] = {}  # the records of `_records`, by number
        self._shown = seq - 1  # every record shown so far is numbered at most this
        self.reserved = 0  # bytes of undrained records' chunks (count against the capacity)
        self.removals = 0  # overlay removals so far (a Python read re-reads when it moves)
        self._last_append = 0.0
        self._voids = 0
        self._sync_failed = 0  # an fdatasync failed: records before this number are drained
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: The native loops' lease (`lease_for`), and why it was last not granted (None: it
        #: was), for `lease_figures`.
        self._lease: JournalLease | None = None
        self._not_granted: str | None = None
        #: A grant is wanted that only the drainer can make: one found the pool's lock held,
        #: or a decision on space took the lease back (`_retry_grant`).
        self._regrant = False
        self._c_voids = 0

    # ------------------------------------------------------------------------------------------
    # Figures

    @property
    def pending(self) -> int:
        """Bytes of chunks written to the journal and not yet committed to the index."""
        with self._mu:
            self._absorb()
            return self.reserved

    def take_back(self) -> None:
        """End the loops' lease (the pool's capacity or threshold changed: a budget granted
        before may no longer fit); the next append of Python's, drain or the drainer's next
        look (once the pool's lock is free) grants a new one."""
        with self._mu:
            self._revoke("taken back (the pool's capacity or threshold changed)")

    def held(self) -> int:
        """The bytes the journal counts against the pool's capacity (its records' chunks),
        for a decision on space: the native loops' lease is taken back first, so that they do
        not append into the room being decided on (the next append of Python's, drain or the
        drainer's next look once the decision released the pool's lock grants it again)."""
        with self._mu:
            self._revoke("taken back (a decision on space)")
            return self.reserved

    def _used(self) -> int:
        if not self._records:
            return 0
        tail, head = self._records[0].pos, self._records[-1].end
        return head - tail if head > tail else self.size - tail + head

    # ------------------------------------------------------------------------------------------
    # Writing

    def append(self, did: int, first: int, data: Sequence[memoryview], *,
               durable: bool) -> bool:
        """Write chunks ``first..`` of disk `did` (`data`: whole chunks, back to back) as one
        record and make them what reads return; with `durable` make it durable first. False
        (nothing done) if the record cannot go to the journal (larger than a quarter of it, its
        chunks would not fit in the pool's capacity, or no room came in `WAIT_SECONDS`): the
        caller writes to the index.
        OSError if the write fails (the chunks keep their old bytes)."""
        cs = self.chunk_size
        nbytes = sum(v.nbytes for v in data)
        count = nbytes // cs
        need = HEADER + nbytes
        if need > self._limit // 4 or not count:
            return False
        deadline = time.monotonic() + WAIT_SECONDS
        with self._mu:
            self._revoke()  # the records' numbers and places are Python's until it is granted
            while True:
                if not self.pool.room_for(self.reserved + nbytes):
                    self._grant()
                    return False
                pos = self._place(need) if self._used() + need <= self._limit else None
                if pos is not None:
                    break
                if time.monotonic() > deadline:  # no room came: the index takes it
                    self._grant()
                    return False
                self._mu.release()
                try:  # full: drain in this thread (writes then run at the drainer's speed)
                    if not self._drain_step(wait=True):
                        time.sleep(0.01)
                finally:
                    self._mu.acquire()
                    self._revoke()  # the drain granted the loops a lease again
            rec = _Record(self._next_seq, pos, did, first, count, pos + need)
            self._next_seq += 1
            self._records.append(rec)
            self._by_seq[rec.seq] = rec
            self.pool.crossing_hint(self.reserved, nbytes)
            self.reserved += nbytes
            self._last_append = time.monotonic()
            epoch = self._epoch
            # The loops append after this record from now on, while it is written: revoked
            # only for the numbering, a lease does not wait for Python's writes (WRITEs coming
            # meanwhile would each come to Python too, and revoke it again).
            self._grant()
        try:
            head = pack_header(epoch, rec.seq, did, first, count, data)
            pieces: list[memoryview] = [memoryview(head), *data]
            at, total = pos, need
            while total:
                n = os.pwritev(self.fd, pieces, at)
                if n <= 0:
                    raise OSError(errno.EIO, "short write to the journal")
                at, total = at + n, total - n
                pieces = skip(pieces, n)
        except BaseException:
            with self._mu:
                rec.done = rec.void = True
                self._voids += 1
                self._advance_written()
                self._mu.notify_all()
            raise
        with self._mu:  # visible and drainable at once: a drain finds its overlay entries
            self._show(rec)
            rec.done = True
            self._advance_written()
            self._mu.notify_all()
        if durable:
            self.sync(rec.seq + 1)
        return True

    def _place(self, need: int) -> int | None:
        """Where a record of `need` bytes goes now, or None if the journal has no room (`_mu`
        held)."""
        if not self._records:
            head = self._tail
            if head + need <= self.size:
                return head
            return 0
        tail, head = self._records[0].pos, self._records[-1].end
        if head > tail:  # one run from tail to head: room after it, or before the tail
            if head + need <= self.size:
                return head
            if need > tail:
                return None
            return 0
        return head if head + need <= tail else None  # wrapped: room between head and tail

    def _advance_written(self) -> None:
        seq, by_seq = self._written_seq, self._by_seq
        while (rec := by_seq.get(seq)) is not None and rec.done:
            seq += 1
        self._written_seq = seq

    def _show(self, rec: _Record, *, tell: bool = True) -> None:
        """Make the record's chunks what reads return (the overlay and, with `tell`, the chunk
        table: a native loop's record is in it already), each unless a newer record wrote it
        already (`_mu` held)."""
        cs, n = self.chunk_size, rec.count
        key = rec.did << _IDX_BITS | rec.first
        at = rec.pos + HEADER
        overlay = self._overlay
        if rec.seq > self._shown:  # no newer record shown yet: all its chunks, in C loops
            self._shown = rec.seq
            first = rec.seq << _SEQ_SHIFT | at
            overlay.update(zip(range(key, key + n), range(first, first + n * cs, cs),
                               strict=True))
            idxs = list(range(rec.first, rec.first + n))
            offs = list(range(at, at + n * cs, cs))
        else:  # a newer record (a WRITE that finished first) may hold some of them
            idxs, offs = [], []
            for k in range(n):
                old = overlay.get(key + k)
                if old is None or old >> _SEQ_SHIFT < rec.seq:
                    overlay[key + k] = rec.seq << _SEQ_SHIFT | (at + k * cs)
                    idxs.append(rec.first + k)
                    offs.append(at + k * cs)
        table = self.pool.table_of(rec.did) if tell else None
        if table is not None and idxs:
            table.set_journal(idxs, offs, self.fd, rec.seq)

    # ------------------------------------------------------------------------------------------
    # The native loops' appends (`tcmu_py.backend.JournalLease`)

    def lease_for(self, kit: NativeKit) -> JournalLease | None:
        """The lease the native loops of the pool's disks append under (made with `kit` the
        first time; None if the kit cannot make one). A loop appends a WRITE only while the
        journal has granted it: from here on, after each append of Python's and each drain."""
        if kit.journal_lease is None:
            return None
        with self._mu:
            if self._lease is None:
                self._lease = kit.journal_lease(self.fd, self.chunk_size)
                self._grant()
            return self._lease

    def lease_figures(self) -> tuple[int, int]:
        """(WRITEs the native loops appended, WRITEs of whole chunks offered while a lease was
        active that they sent to Python); (0, 0) without a lease."""
        lease = self._lease
        return (0, 0) if lease is None else (lease.appends, lease.declined)

    def lease_state(self) -> dict[str, object]:
        """For the live status: the loops' appends and declines, their records whose write
        failed, and why the lease is not granted now (absent when it is, or there is none)."""
        appends, declined = self.lease_figures()
        st: dict[str, object] = {"journal_c_appends": appends,
                                 "journal_c_declined": declined,
                                 "journal_c_failed": self._c_voids}
        if self._lease is not None and self._not_granted is not None:
            st["journal_c_not_granted"] = self._not_granted
        return st

    def _absorb(self) -> None:
        """Take the records the native loops appended since the last call as if this journal
        had written them: numbered, placed, counted, shown (`_mu` held). Every reader of the
        records, the overlay or the figures calls it first: a loop's WRITE was acknowledged
        before the command that follows it reached Python."""
        lease = self._lease
        if lease is None:
            return
        notices = lease.take()
        if not notices:
            return
        cs = self.chunk_size
        for seq, pos, did, first, count, failed in notices:
            if seq != self._next_seq:  # the lease's numbers start where ours end (`_grant`)
                raise AssertionError(f"journal record {seq} from the native loop, expected "
                                     f"{self._next_seq}")
            rec = _Record(seq, pos, did, first, count, pos + HEADER + count * cs, done=True,
                          void=failed)
            self._next_seq = seq + 1
            self._records.append(rec)
            self._by_seq[seq] = rec
            self.reserved += count * cs
            if failed:
                self._voids += 1
                self._c_voids += 1
                log.warning("pool %s: the native loop's write of journal record %d failed; its "
                            "WRITE goes to Python, and the records are drained into the index "
                            "at the next SYNCHRONIZE CACHE", self.pool.name, seq)
            else:
                self._show(rec, tell=False)
        self._last_append = time.monotonic()
        self._advance_written()
        self._mu.notify_all()

    def _revoke(self, why: str | None = None) -> None:
        """End the loops' lease and take what they appended (`_mu` held). `why`: for the
        status, and the drainer grants again (`_retry_grant`); None: the caller does."""
        if self._lease is not None:
            self._lease.revoke()
            self._absorb()
            if why is not None:
                if self._not_granted is None:  # a lasting reason (a failed write...) stays
                    self._not_granted = why
                self._regrant = True
                self._mu.notify_all()  # the drainer grants as soon as the pool's lock is free

    def _grant(self) -> None:
        """Lease the loops the journal's free run after its newest record, for what fits under
        the pool's capacity and soft threshold (`_mu` held). None while stopping, or after a
        failed write or fdatasync (Python's own path handles those, rule 5)."""
        lease = self._lease
        self._regrant = False
        if lease is None:
            return
        self._revoke()
        if self._stopping or self._voids or self._sync_failed:
            self._not_granted = ("stopping" if self._stopping else
                                 "a failed write" if self._voids else "a failed fdatasync")
            return
        # The budget is read under the pool's lock (tried, never waited for: it comes before
        # `_mu` in the lock order): a thread holding it may be deciding on space, counting on
        # room a lease would give away; the drainer waits for it and grants then
        # (`_retry_grant`), unless a drain or an append of Python's does first.
        if not self.pool.lock.acquire(blocking=False):
            self._not_granted = "the pool's lock was held (a decision on space)"
            self._regrant = True
            self._mu.notify_all()
            return
        try:
            pos, end = self._free_run()
            budget = min(self.pool.journal_budget(self.reserved), end - pos)
            if budget < self.chunk_size:
                self._not_granted = (f"no room: {end - pos} bytes free after the newest record"
                                     if end - pos < self.chunk_size else
                                     "the pool's capacity or soft threshold")
                return
            self._not_granted = None
            lease.grant(pos, end, self._next_seq, self._epoch, budget, self._limit // 4)
        finally:
            self.pool.lock.release()

    def _free_run(self) -> tuple[int, int]:
        """The bytes [pos, end) where the next records may go back to back (`_mu` held): after
        the newest record up to the oldest one or the file's end, or from 0 (a record there
        follows one that ended anywhere: replay looks at 0 too)."""
        big = self._limit // 4
        room = self._limit - self._used()
        if not self._records:
            head = self._tail
            pos, end = (head, self.size) if self.size - head >= big else (0, self.size)
        else:
            tail, head = self._records[0].pos, self._records[-1].end
            if head > tail:
                pos, end = (head, self.size) if self.size - head >= min(big, tail) else (0, tail)
            else:
                pos, end = head, tail
        return pos, max(pos, min(end, pos + room))

    def sync(self, upto: int | None = None) -> None:
        """Make every record numbered before `upto` (all written so far: None) durable: wait
        until each is written whole, then fdatasync. With a record whose write failed among
        them, drain them all into the index instead (rule 5)."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._mu:
            self._absorb()
            target = self._next_seq if upto is None else upto
            if self._synced_seq >= target:
                return
            while self._written_seq < target:
                if not self._mu.wait(max(0.0, deadline - time.monotonic())):
                    raise OSError(errno.EIO, f"pool {self.pool.name}: journal records not "
                                  f"written after {WAIT_SECONDS:.0f} s")
            voids, failed = self._voids, self._sync_failed
        if voids or failed:
            self.drain_all(max(target, failed))
            with self._mu:
                if self._sync_failed == failed:
                    self._sync_failed = 0
                    if failed:  # the drains' grants found it failed: the loops' lease again
                        self._grant()
            return
        try:
            os.fdatasync(self.fd)
        except OSError:
            # Linux reports a failed write-back once and marks the pages clean: a later
            # fdatasync succeeding says nothing of these records, so every later sync drains
            # them into the index (read back and checked) until they are behind the tail.
            with self._mu:
                self._sync_failed = max(self._sync_failed, target)
            raise
        with self._mu:
            self._synced_seq = max(self._synced_seq, target)

    # ------------------------------------------------------------------------------------------
    # Reading

    def patch(self, did: int, offset: int, view: memoryview, removals: int) -> bool:
        """Put into `view` (disk `did`'s bytes from `offset`, read from the index) the chunks
        whose newest bytes are in the journal. False (nothing done) if overlay entries were
        removed since `removals` was read: the index may have changed under the read, read
        again."""
        cs = self.chunk_size
        end = offset + view.nbytes
        base = did << _IDX_BITS
        with self._mu:
            self._absorb()
            if self.removals != removals:
                return False
            overlay = self._overlay
            if not overlay:
                return True
            for idx in range(offset // cs, -(-end // cs)):
                hit = overlay.get(base | idx)
                if hit is None:
                    continue
                a, b = max(idx * cs, offset), min((idx + 1) * cs, end)
                _pread_into(self.fd, view[a - offset : b - offset],
                            (hit & _OFF_MASK) + a - idx * cs)
            return True

    def tell_table(self, did: int, table: ChunkTable, idxs: Sequence[int],
                   fds: Sequence[int], offs: Sequence[int]) -> None:
        """`table.set` for the entries of chunks the overlay does not hold (the pool's lock
        held): an index location must not replace a journal one that is newer. The loops'
        records are absorbed first: a record appended before it whose table entry is gone (the
        table was cleared) is in the overlay then; one appended after it left its entry, which
        no index location replaces (`ChunkTable.set`)."""
        base = did << _IDX_BITS
        with self._mu:
            self._absorb()
            overlay = self._overlay
            if overlay:
                keep = [k for k, idx in enumerate(idxs) if base | idx not in overlay]
                if len(keep) != len(idxs):
                    idxs = [idxs[k] for k in keep]
                    fds = [fds[k] for k in keep]
                    offs = [offs[k] for k in keep]
            if idxs:
                table.set(idxs, fds, offs)

    def steady(self) -> threading.Lock:
        """Held, no drain moves records into the index (a read that raced drains thrice)."""
        return self._drain_mu

    # ------------------------------------------------------------------------------------------
    # Draining

    def drain_all(self, upto: int | None = None) -> None:
        """Put every record numbered before `upto` (all written so far: None) into the index
        and commit. OSError if that fails, or makes no progress for `WAIT_SECONDS` (the records
        stay in the journal). Bounded by the journal's size (store.MAX_JOURNAL)."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._mu:
            self._absorb()
            target = self._next_seq if upto is None else upto
        while True:
            with self._mu:
                if self._tail_seq >= target:
                    return
            if time.monotonic() > deadline:
                raise OSError(errno.EIO, f"pool {self.pool.name}: the write journal could not "
                              f"be drained: no progress in {WAIT_SECONDS:.0f} s")
            if self._drain_step(wait=True, upto=target):
                deadline = time.monotonic() + WAIT_SECONDS

    def _drain_step(self, *, wait: bool, upto: int | None = None) -> bool:
        """Put the next written records (up to `STEP_BYTES` of data, before `upto`) into the
        index, commit with the tail past them, then drop their overlay entries. `wait`: wait
        for the next record being written rather than return. True if it drained any."""
        with self._drain_mu:
            deadline = time.monotonic() + WAIT_SECONDS
            with self._mu:
                while True:
                    self._absorb()
                    batch = self._next_batch(upto)
                    if batch or not wait or not self._pending_before(upto):
                        break
                    if not self._mu.wait(max(0.0, deadline - time.monotonic())):
                        raise OSError(errno.EIO, f"pool {self.pool.name}: journal records not"
                                      f" written after {WAIT_SECONDS:.0f} s")
            if not batch:
                return False
            items = [(rec, None if rec.void else self._read(rec)) for rec in batch]
            end = batch[-1]
            tail_pos = end.end
            self.pool.put_journaled(items, tail_pos, end.seq + 1, self._commit_done)
            return True

    def _pending_before(self, upto: int | None) -> bool:
        """Whether a record before `upto` is not yet committed (`_mu` held)."""
        return bool(self._records) and (upto is None or self._records[0].seq < upto)

    def _next_batch(self, upto: int | None) -> list[_Record]:
        """Written records from the front of those not yet committed, up to `STEP_BYTES` of
        data (at least one) and before `upto` (`_mu` held)."""
        batch: list[_Record] = []
        nbytes = 0
        for rec in self._records:
            if not rec.done or (upto is not None and rec.seq >= upto):
                break
            if batch and nbytes + rec.count * self.chunk_size > STEP_BYTES:
                break
            batch.append(rec)
            nbytes += rec.count * self.chunk_size
        return batch

    def _read(self, rec: _Record) -> bytes | None:
        """The record's data, read back and checked against its header (rule 5); None (and
        a loss its disk is told of) if it does not hold."""
        n = rec.count * self.chunk_size
        raw = bytearray(HEADER + n)
        _pread_into(self.fd, memoryview(raw), rec.pos)
        head = bytes(raw[:HEADER])
        data = memoryview(raw)[HEADER:]
        if (unpack_header(head) != (self._epoch, rec.seq, rec.did, rec.first, rec.count)
                or _checksum(head[:_HEAD.size], [data]) != head[_HEAD.size:]):
            self.pool.record_loss(rec.did, f"journal record {rec.seq} read back wrong (a "
                                  "write-back of the journal failed)")
            return None
        return bytes(data)

    def _commit_done(self, drained: Sequence[_Record], locate: dict[int, tuple[int, int]]
                     ) -> None:
        """After the commit that put `drained` into the index (the pool's lock held): drop
        their overlay entries that no newer record replaced, point the chunk tables at the
        chunks' index locations (`locate`: key -> (fd, offset), -1 zeros, -2 unknown), free
        their space."""
        with self._mu:
            overlay = self._overlay
            per_record: dict[tuple[int, int], tuple[list[int], list[int], list[int]]] = {}
            mask = (1 << _IDX_BITS) - 1
            for rec in drained:
                base = rec.did << _IDX_BITS
                for k in range(rec.count):
                    key = base | (rec.first + k)
                    hit = overlay.get(key)
                    if hit is not None and hit >> _SEQ_SHIFT == rec.seq:
                        del overlay[key]
                        fd, off = locate.get(key, (-2, 0))
                        idxs, fds, offs = per_record.setdefault((rec.did, rec.seq),
                                                                ([], [], []))
                        idxs.append(key & mask)
                        fds.append(fd)
                        offs.append(off)
                self.reserved -= rec.count * self.chunk_size
                if rec.void:
                    self._voids -= 1
            for (did, seq), (idxs, fds, offs) in per_record.items():
                table = self.pool.table_of(did)
                if table is not None:  # unless a native loop's record wrote it since
                    table.set_drained(idxs, fds, offs, seq)
            self.removals += 1
            for _ in drained:
                rec = self._records.popleft()
                del self._by_seq[rec.seq]
                self._tail = rec.end
                self._tail_seq = rec.seq + 1
            self._grant()  # the space freed
            self._mu.notify_all()

    # ------------------------------------------------------------------------------------------
    # The drainer thread

    def start(self) -> None:
        if not self.background:
            return
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"dedup-jnl-{self.pool.name}")
        self._thread.start()

    def _due(self) -> bool:
        """Whether the drainer should run now (`_mu` held): written records wait and writes
        paused, the journal is half full, or it is stopping."""
        self._absorb()
        if not self._records or not self._records[0].done:
            return False
        if self._stopping or self._used() * 2 >= self._limit:
            return True
        return time.monotonic() - self._last_append >= IDLE_SECONDS

    def _retry_grant(self) -> None:
        """Grant the lease a grant elsewhere could not (`_regrant`): here, on the drainer's
        thread, the pool's lock may be waited for, before `_mu` as the lock order has it (for
        at most `IDLE_SECONDS`: tried again at the next look). Without it the loops' WRITEs
        would go to Python until its next append or drain."""
        if not self.pool.lock.acquire(timeout=IDLE_SECONDS):
            return
        try:
            with self._mu:
                if self._regrant:
                    self._grant()
        finally:
            self.pool.lock.release()

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._mu:
                due = self._due()
                while not self._stopping and not self._regrant and not due:
                    self._mu.wait(IDLE_SECONDS)
                    due = self._due()
                if self._stopping:
                    return
                regrant = self._regrant
            if not due:
                if regrant:
                    self._retry_grant()
                continue
            try:
                self._drain_step(wait=False)
            except Exception as exc:  # noqa: BLE001 - the records stay; retried
                log.error("pool %s: draining the write journal failed (%s); the writes stay "
                          "in the journal and are retried", self.pool.name, exc)
                with self._mu:
                    self._mu.wait(1.0)

    def close(self) -> None:
        """Stop the drainer, drain everything into the index, close the file. A drain that
        fails is logged: its records stay in the file for the next open to replay."""
        with self._mu:
            self._stopping = True
            self._revoke()  # for good: no grant while stopping
            self._mu.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.drain_all()
        except OSError as exc:
            log.error("pool %s: the write journal could not be drained at close (%s); its "
                      "records are replayed at the next open", self.pool.name, exc)
        finally:
            os.close(self.fd)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < view.nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            raise OSError(errno.EIO, f"the write journal ends at {offset + got}")
        got += n


def open_journal(pool: DedupPool) -> Journal | None:
    """Replay ``journal.dat`` into the index (rule 3), then open it for writing with a new epoch
    (rule 4) at the pool's configured size (made, or made again at a new size, once empty).
    None if the pool has no journal; a file left by one is replayed and removed."""
    file = os.path.join(pool.path, JOURNAL_FILE)
    want = pool.config.journal
    pos, seq, epoch = pool.journal_meta()
    fd: int | None
    try:
        fd = os.open(file, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None
    if fd is None and epoch:  # a journal was open before, and its file is gone
        log.error("pool %s: %s is missing (the pool had a write journal): writes acknowledged "
                  "from it and not yet in the index are lost", pool.name, file)
    if fd is not None:
        try:
            size = os.fstat(fd).st_size
            pos, seq = _replay(pool, fd, size, pos, seq, epoch)
        except BaseException:
            os.close(fd)
            raise
        if size != want:  # every record is in the index: the file can go, once that is recorded
            pool.set_journal_meta(0, seq, 0)
            os.close(fd)
            fd = None
            os.unlink(file)
            fsync_dir(pool.path)
            pos = epoch = 0
    if not want:  # epoch 0: no journal (a later one starts from a new file of zeros)
        pool.set_journal_meta(0, seq, 0)
        return None
    if fd is not None and not epoch:
        # A file the index says is gone (epoch 0): its removal was cut short (a power cut
        # after that commit, or a failed unlink). Its records carry epochs this open would
        # take again, so it is made anew, as if missing (rule 4).
        os.close(fd)
        fd = None
    if fd is None:
        fd = _make_file(file, want)
        pos = 0
    try:
        epoch += 1
        pool.set_journal_meta(pos % want, seq, epoch)  # before any record of the new epoch
        return Journal(pool, fd, want, epoch, pos % want, seq)
    except BaseException:
        os.close(fd)
        raise


def _replay(pool: DedupPool, fd: int, size: int, pos: int, seq: int, epoch: int
            ) -> tuple[int, int]:
    """Put the records from (`pos`, `seq`) into the index, committing as it goes; where the
    next record would lie and its number."""
    batch: list[tuple[_Record, bytes | None]] = []
    nbytes = applied = 0
    while True:
        found = _read_record(fd, size, pos, seq, epoch, pool.chunk_size)
        if found is None:
            break
        rec, data = found
        batch.append((rec, data))
        nbytes += len(data)
        applied += 1
        pos, seq = rec.end, rec.seq + 1
        if nbytes >= STEP_BYTES:
            pool.put_journaled(batch, pos, seq, None)
            batch, nbytes = [], 0
    if batch:
        pool.put_journaled(batch, pos, seq, None)
    if applied:
        log.warning("pool %s: replayed %d write(s) from the write journal into the index",
                    pool.name, applied)
    return pos, seq


def pending_records(pool: DedupPool) -> tuple[int, int]:
    """Records of the pool's journal not yet in the index, and the bytes of their chunks, as
    the next open's replay would take them (read-only: `check_pool`). (0, 0) without one."""
    return scan_pending(pool.path, pool.chunk_size, *pool.journal_meta())


def scan_pending(path: str, chunk_size: int, pos: int, seq: int, epoch: int
                 ) -> tuple[int, int]:
    """`pending_records` for the pool at `path` whose index's committed journal tail is
    (`pos`, `seq`, `epoch`): read-only, from the journal file as it is now."""
    try:
        fd = os.open(os.path.join(path, JOURNAL_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0, 0
    try:
        size = os.fstat(fd).st_size
        records = nbytes = 0
        while (found := _read_record(fd, size, pos, seq, epoch, chunk_size)) is not None:
            rec, data = found
            records, nbytes = records + 1, nbytes + len(data)
            pos, seq = rec.end, rec.seq + 1
        return records, nbytes
    finally:
        os.close(fd)


def _read_record(fd: int, size: int, pos: int, seq: int, epoch: int, chunk_size: int
                 ) -> tuple[_Record, bytes] | None:
    """The record numbered `seq` of `epoch`, at `pos` or (the writer wrapped) at 0, if it is
    whole; None if not (the journal ends before it)."""
    for at in (pos, 0) if pos else (0,):
        if at + HEADER > size:
            continue
        raw = os.pread(fd, HEADER, at)
        head = unpack_header(raw)
        if head is None or head[0] != epoch or head[1] != seq:
            continue
        _, _, did, first, count = head
        n = count * chunk_size
        if not count or at + HEADER + n > size:
            continue
        data = bytearray(n)
        try:
            _pread_into(fd, memoryview(data), at + HEADER)
        except OSError:
            continue
        if _checksum(raw[:_HEAD.size], [memoryview(data)]) != raw[_HEAD.size : HEADER]:
            continue
        return _Record(seq, at, did, first, count, at + HEADER + n, done=True), bytes(data)
    return None


def _make_file(file: str, size: int) -> int:
    """A journal file of `size` zero bytes, written (allocated) and durable."""
    tmp = file + ".tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        zeros = bytes(1 << 20)
        for at in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), size - at)], at)
        os.fsync(fd)
        os.rename(tmp, file)
        fsync_dir(os.path.dirname(file))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd
