"""The mirror: one disk made of 2-3 legs, a persisted write-intent bitmap, resync, split brain.

Rules this file obeys
---------------------
* On-leg format. Every leg keeps the mirror's metadata in a reserved area at its end (so an NBD
  export carries its own; no sidecar file), ``meta_length(size, region)`` bytes ending at the
  leg's end (its size rounded down to 4 KiB)::

      end - 8192 - B   bitmap              B bytes: one bit per region (1: the legs may differ
                                           there), rounded up to 4 KiB
      end - 8192       superblock slot 0   4 KiB   (written when the generation is even)
      end - 4096       superblock slot 1   4 KiB   (odd)

  The superblocks sit at a fixed place from the end: a tool finds them (`read_superblock`)
  without knowing the size and region they describe.

  The data area is ``[0, size)``: the device's logical size. A superblock (`Superblock`) holds
  a magic, the format version, the mirror's UUID, the leg's index, the logical size, the region
  size, the number of legs, the *generation* (event counter), the *active mask* (the legs this
  leg believed in sync at that generation), a clean flag, and a CRC-32 of all that. The slot
  with the highest generation whose CRC verifies is the leg's superblock: a torn superblock
  write leaves the other slot, one generation older, intact.
* Generation. Bumped, and the superblock written (FUA) to every leg that takes writes, at each
  change of the active mask (a leg fails, a resync completes), at open and at clean close.
* Write-intent bitmap, per write:
    1. the regions' bits are set in memory and, for bits not already set, the bitmap block is
       queued (a FUA write) on the FIFO of every leg that takes writes (in-sync and resyncing
       legs), under one lock, so that on **each leg** the bit is durable before any data of the
       write reaches that leg; a write whose bit was already set queues its data behind the
       block that set it. (Per leg is enough: a leg holding new data holds its bit, and the
       unclean open below reads the bits of every in-sync leg.)
    2. the data goes to every leg that takes writes through the same FIFO (one worker per leg:
       writes, bitmap blocks and flushes reach one leg in the order they were queued);
    3. a leg whose write fails is marked out of sync and the new active mask is written (FUA) to
       the remaining legs **before** the write is acknowledged; with several writes waiting on
       one failing leg, one thread writes the record and no write or flush is acknowledged
       until it is durable (`Mirror._recording`, `Mirror._owed`);
    4. with quorum ``all`` the write is acknowledged once every leg taking writes answered
       and at least one in-sync leg holds it; with a number N, once N in-sync legs hold it
       (with the device's write cache off each leg's write is FUA: durable on return; with it
       on, SYNCHRONIZE CACHE is such an operation too: durable on N legs). The other legs keep
       writing in the background (rule 4b). A leg that has not answered within
       ``leg_timeout`` counts as failed: it is marked out of sync and recorded on the others
       (rule 3) by the waiting command, or, for a leg nobody waits for any more, by the next
       write or flush (`_reap`), which then go on without it (its late answer is ignored; its
       worker, stuck in the call, keeps the leg from being reattached until the call returns).
       The calls made straight to a leg, not through its FIFO, are bounded the same way on an
       NBD leg: reads, superblock writes (made under `_meta_lock`, which every write takes),
       the resync's reads, writes and flushes (made while the region is held from the
       initiator's writes), the superblock (and bitmap) read of `reattach`, and at open the
       superblock and bitmap reads and the unclean open's reconcile (reads, writes,
       flushes; see the open below). Each runs on one of the leg's call threads while its
       caller waits at most ``leg_timeout`` (`Mirror._begin`); a leg that has not answered
       by then is marked out of sync and recorded on the others (rule 3), and the
       operations queued on it go on without it (`_give_up`). A late answer
       touches only memory of the call's own (a read's buffer; a write's bytes, immutable),
       and the leg is neither reattached nor closed until the call returned;
    4b. lagging legs. Before a write is acknowledged without an in-sync leg, that leg's bit is
       set in the *lag mask* of the superblocks of the legs not lagging (one superblock write,
       FUA, when the leg starts lagging; none while it stays behind). A leg leaves the lag
       mask (in memory; on the legs at the next superblock write) once nothing is queued on
       it and a flush completed after its last write. Meanwhile: reads avoid it for any range
       it still has queued writes for (`pending`), overlapping writes reach it in order (its
       FIFO), the regions stay dirty in the bitmap (bits are cleared only after a flush
       answered by every leg, rule 5), and a leg more than ``max_lag`` bytes behind is
       marked out of sync instead of queuing more (bounded memory; a resync catches it up).
       At an unclean open the freshest superblock's lag mask names the legs that may lack
       acknowledged writes: they are resynced over the bitmap's regions (the union of every
       in-sync leg's bits, theirs included) instead of being trusted;
    5. bits are cleared lazily: after a flush reached every leg, with every leg in sync, for the
       regions no write touched since that flush started. A clear that is lost (a crash) only
       costs a resync of that region; a set that is lost cannot happen (1 before 2).
    6. writes in C (`file_extent` gives a `FanOutExtent`: every leg in sync, quorum all). The
       native loop writes a WRITE to every leg itself only in *armed* regions. A region is
       armed after a write made here put its bit on every leg and every leg took the data
       (the first write to a region after each new extent queues the bitmap block again even
       when the bit is set: a leg back from a resync may lack it), with nothing moved since
       (`_fan_gen`). C marks the regions it writes with the current epoch; a flush starts a
       new epoch, and rule 5 clears a region's bit only if `FanOutRegions.disarm` finds no C
       write there since the previous flush began (since this one began for the first flush
       on these regions: a region C keeps writing stays armed, as md's bitmap keeps a busy
       region's bit) and none in flight, disarming it in the same step. A C write any leg
       fails comes here and is written again (rules 3 and 4 then apply).
* Consequence for a crash at any point: a region that may differ between the in-sync legs has
  its bit set on at least one of them (the one holding newer data). At an unclean open (clean
  flag off) the regions of the union of their bits are reconciled before the device serves:
  the content a majority of the in-sync, not lagging legs agree on wins, else the freshest
  leg's (every such leg holds every acknowledged write, rules 4 and 4b: either is one the
  initiator may see).
  A leg out of sync is copied in the background (regions of the freshest leg's bitmap: bits
  are never cleared while a leg is out of sync) from a leg in sync; each region is read while
  held from the initiator's writes, and the source must still be in sync after the read (a
  leg failing a write is failed before that write ends): a pass whose source left sync,
  maybe still readable but missing a write, copies nothing more from it, and the next pass
  copies from another leg: a target is marked in sync only by a pass that copied every
  region so.
* Acknowledgement counts a leg only while it is in sync in the attachment the write was
  queued on: a leg whose own failure record (or another leg's) could not be written is
  failed too and holds nothing for the initiator; a leg resyncing when the write was queued
  counts once its resync marked it in sync (it then holds every acknowledged write, this one
  too; with a numeric quorum it is waited for, or made lagging, like the in-sync legs).
* A failure is of one *attachment* of a leg (`reattach` starts a new one, only for a failed
  leg): a call that failed before the leg was reattached and is reported after it changes
  nothing. Every acknowledged write is on the last leg to fail in sync and not lagging
  (rule 4b), unless a write was acknowledged after it failed (by a lagging leg, quorum N);
  when every leg has failed, `reattach` brings that leg back in sync and the others resync
  from it. If the last in sync was lagging (it may lack acknowledged writes, and the last
  not lagging one lacks those acknowledged after it failed), no leg is brought back in
  sync: reattached legs wait as resync targets with no source, writes are refused
  (QuorumLost) and reads fail until the mirror is reopened (the open's rules below decide).
* Freshest leg, split brain (at open). Leg X *excludes* leg Y when Y is not in X's active mask.
  Two legs that exclude each other were each written while apart: a split brain, refused
  (ConfigError naming both legs); nothing is written to any leg then. Otherwise the freshest
  leg is the one of highest generation whose mask holds itself; the legs in its mask are in
  sync, the others stale (resynced from the bitmap), blank legs get a full copy.
* Opening with legs unreachable needs a majority of the legs reachable (two disjoint sets of
  legs can then never both open, so no split brain can be made by opening), unless the config
  says ``degraded_open=1`` (a leg lost for good; an operator staging a test). A leg that does
  not answer its superblock or bitmap read within ``leg_timeout`` (an NBD server up, its
  packets dropped) is unreachable too: out of sync, reattached later, and then its own bitmap
  is merged in (it may hold writes, never acknowledged, that only its bits name). A leg that
  fails or does not answer the reconcile is failed (in memory, recorded by the open's
  superblock write, after the bitmap) and the open goes on with the others while a majority
  remains, one in sync; else it is refused (ConfigError naming the leg, "no answer within N
  s"; the superblocks untouched, so the next open reconciles again). No refusal for want of
  legs writes anything before the reconcile; the reconcile only writes, to the flagged
  regions, a copy an in-sync leg held.

Threads: the device's workers call `read`/`write`/`flush` concurrently; each leg has one worker
thread running its writes, bitmap blocks and flushes in order; the resync runs on its own
thread, `reattach` on the monitor's (or the caller's); the calls made straight to an NBD leg
(reads, superblock writes, the resync's copies and flushes, the reattach probe, the open's
metadata reads and reconcile) run on its call threads (`_Callers`, started on demand) while
the caller waits at most ``leg_timeout`` for them (rule 4); a local leg's, or any with
``leg_timeout`` 0, run on the caller's thread, since the hand-off costs (`Mirror._read_leg`).
`_lock` (a Condition) guards all state below.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tcmu_py.backend import FanOutExtent, FanOutRegions, FanOutWriter, NativeKit, ReadExtent
from tcmu_py.errors import ConfigError
from tcmu_py.scsi.sense import WriteProtected
from tcmu_py.threadname import name_os_thread

from .legs import FileLeg, Leg, NbdLeg

log = logging.getLogger(__name__)

MAGIC = b"TCMUMIR1"
VERSION = 1
SLOT = 4096
#: magic, version, flags, uuid, leg index, nlegs, region size, size, generation, active mask
_SB = struct.Struct("<8sII16sIIIQQI")
FLAG_CLEAN = 0x1
#: flags bits 8-15: the *lag mask* (bit 8 + i: leg i may lack writes acknowledged without it)
LAG_SHIFT = 8
MAX_LEGS = 3
#: Most data writes, and bytes, a leg's worker sends together to a leg that takes batches.
BATCH_WRITES = 64
BATCH_BYTES = 16 << 20
_NO_ITEM = object()

#: Seconds a write that has its quorum still waits for a leg before making it lagging.
LAG_GRACE = 0.005
DEFAULT_REGION = 1 << 20


class QuorumLost(WriteProtected):
    """Fewer legs hold the data than the write quorum: the write is refused, reads go on.

    DATA PROTECT / LOGICAL UNIT SOFTWARE WRITE PROTECTED (SPC-5 Annex D, ASC 27h/02h): the
    state of a RAID controller that keeps a degraded volume readable and refuses writes
    (SBC-4 4.13 write protection: reads allowed, writes terminated with DATA PROTECT). Linux
    sd fails such a write at once, without retries: no hang."""

    asc, ascq = 0x27, 0x02


def bitmap_bytes(size: int, region: int) -> int:
    regions = -(-size // region)
    return -(-regions // 8)


def meta_length(size: int, region: int) -> int:
    """Bytes the metadata takes at the end of every leg."""
    bm = bitmap_bytes(size, region)
    return 2 * SLOT + -(-bm // SLOT) * SLOT


@dataclass(frozen=True)
class Superblock:
    mirror_uuid: bytes
    leg: int
    nlegs: int
    region: int
    size: int
    generation: int
    active: int  # bit i: leg i in sync
    clean: bool
    #: bit i: leg i (in sync) may lack a write acknowledged at the write quorum without it
    lag: int = 0

    def pack(self) -> bytes:
        flags = (FLAG_CLEAN if self.clean else 0) | (self.lag & 0xFF) << LAG_SHIFT
        body = _SB.pack(MAGIC, VERSION, flags, self.mirror_uuid,
                        self.leg, self.nlegs, self.region, self.size, self.generation,
                        self.active)
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(SLOT, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock | None:
        """The superblock in `raw`, or None when it is not one (blank, torn, foreign)."""
        body = raw[: _SB.size]
        (crc,) = struct.unpack_from("<I", raw, _SB.size)
        if raw[:8] != MAGIC or zlib.crc32(body) != crc:
            return None
        _, version, flags, uid, leg, nlegs, region, size, gen, active = _SB.unpack(body)
        if version != VERSION:
            return None
        return cls(uid, leg, nlegs, region, size, gen, active, bool(flags & FLAG_CLEAN),
                   flags >> LAG_SHIFT & 0xFF)

    def has(self, index: int) -> bool:
        return bool(self.active >> index & 1)


@dataclass
class MirrorConfig:
    legs: tuple[str, ...]
    size: int
    region: int = DEFAULT_REGION
    #: Legs that must hold a write before it is acknowledged; 0: every in-sync leg ("all").
    quorum: int = 0
    #: The device's write cache: False makes every leg write FUA.
    write_cache: bool = True
    #: Resync throttle, bytes per second; 0: unthrottled.
    resync_rate: int = 64 << 20
    #: Seconds between attempts to reopen a failed leg; 0: only on `reattach`.
    retry_interval: float = 5.0
    degraded_open: bool = False
    #: A new mirror (all legs blank) starts in sync without a first copy (legs known zero).
    assume_clean: bool = False
    #: "least-busy" (the in-sync leg with the fewest reads in flight, a local leg on a tie),
    #: or "round-robin".
    read_policy: str = "least-busy"
    #: Seconds a leg gets to answer a write, flush or metadata write before it is marked out
    #: of sync (recorded on the others) and the command goes on without it; 0: no limit.
    leg_timeout: float = 10.0
    #: Bytes of writes a leg may be behind the write quorum (acknowledged without it, still
    #: queued for it) before it is marked out of sync instead (bounds the memory a slow leg
    #: holds); only with a numeric quorum.
    max_lag: int = 64 << 20


IN_SYNC, RESYNCING, FAILED = "in-sync", "resyncing", "failed"
#: What a leg's FIFO runs: a data write, a flush, a bitmap block write (FUA).
WRITE, FLUSH, META = "write", "flush", "meta"


class _LegState:
    def __init__(self, index: int, spec: str) -> None:
        self.index = index
        self.spec = spec
        self.leg: Leg | None = None
        self.state = FAILED
        self.error = ""
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.stopping = False  # the worker was sent its end (None on its queue)
        #: In-flight writes on this leg: id -> (start, end); reads avoid legs where they overlap.
        self.pending: dict[int, tuple[int, int]] = {}
        self.reads = 0
        #: Reads in flight on its leg, including reads given up on (a silent leg's) whose
        #: call has not returned: the leg is not closed (nor reattached) while any is.
        self.busy = 0
        #: The same for its other direct calls (`Mirror._begin`: superblock writes, resync
        #: copies and flushes, the reattach probe); kept apart: reads count for least-busy.
        self.calls = 0
        #: Bumped at each reattach: a resync pass promotes only the leg it copied to.
        self.attached = 0
        self.callers = _Callers(f"mirror-leg{index}-call")
        #: An image file or block device of this machine (not NBD): preferred by least-busy
        self.local = spec.startswith("/")
        self.errors = 0
        #: Operations queued on this leg and not answered, oldest first (timeouts, lag).
        self.ops: dict[int, _WriteOp] = {}
        self.backlog = 0  # bytes of data writes queued and not answered
        self.call_started = 0.0  # monotonic time its worker entered its current call; 0: idle

    @property
    def takes_writes(self) -> bool:
        return self.leg is not None and self.state in (IN_SYNC, RESYNCING)

    def name(self) -> str:
        return f"leg {self.index} ({self.spec})"


class Mirror:
    """A `BlockBackend` over 2-3 legs. Build with `Mirror.open`."""

    blocking = True

    def __init__(self, cfg: MirrorConfig, block_size: int,
                 opener: Callable[[str, int], Leg]) -> None:
        if not 2 <= len(cfg.legs) <= MAX_LEGS:
            raise ConfigError(f"mirror: {len(cfg.legs)} legs; expected 2 to {MAX_LEGS}")
        if cfg.region % 4096 or cfg.region <= 0:
            raise ConfigError(f"mirror: region size {cfg.region}: expected a multiple of 4096")
        if not 0 <= cfg.quorum <= len(cfg.legs):
            raise ConfigError(f"mirror: quorum {cfg.quorum}: expected 1 to {len(cfg.legs)} or "
                              "all")
        self.cfg = cfg
        #: The device's name (status rows); the handler sets it.
        self.name = ""
        self.size = cfg.size
        self.block_size = block_size
        self.write_cache = cfg.write_cache
        self.region = cfg.region
        self.nregions = -(-cfg.size // cfg.region)
        self.meta_len = meta_length(cfg.size, cfg.region)
        self._opener = opener
        #: `_lock` is a Condition over `_mutex`; each write waits on a Condition of its own
        #: over the same mutex (`_WriteOp.cond`), woken by its legs' answers alone: with N
        #: writes in flight a leg's answer wakes one waiter, not N. What may concern every
        #: waiter (a leg failed, a failure recorded, a region freed) wakes all (`_wake_all`).
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        #: Operations in `_WriteOp.wait` / `wait_all` (their conditions, for `_wake_all`).
        self._waiters: set[_WriteOp] = set()
        #: Held while metadata (superblocks, bitmap blocks) is written: taken before `_lock`.
        self._meta_lock = threading.RLock()
        self._legs = [_LegState(i, spec) for i, spec in enumerate(cfg.legs)]
        self.bitmap = bytearray(bitmap_bytes(cfg.size, cfg.region))
        #: region -> sequence number of the last write that set or kept its bit
        self._last_write: dict[int, int] = {}
        self._writers: dict[int, int] = {}  # region -> writes in flight (until every leg is done)
        self._resync_busy: set[int] = set()  # regions the resync is copying
        self._seq = 0
        self._rr = 0
        self.uuid = b""
        self.generation = 0
        self._closing = False
        self._closed = False
        self._resync_thread: threading.Thread | None = None
        self._resync_wake = threading.Event()
        self.resync_total = 0  # regions to copy in the current (or last) pass
        self.resync_done = 0
        self.regions_copied = 0  # over the mirror's life in this process
        self._monitor: threading.Thread | None = None
        #: The last leg in sync (not lagging) when every leg had failed: the one to come back
        #: in sync; forgotten once a write is acknowledged without it (`_WriteOp._acknowledged`).
        self._last_standing: int | None = None
        #: Lag mask (rule 4b): in-sync legs that may lack an acknowledged write; in memory,
        #: and as last written to the superblocks (failed legs' bits added: their exclusion
        #: from the active mask covers them just as well).
        self._lag = 0
        self._lag_written = 0
        self.lag_acks = 0  # writes acknowledged before every leg had them (status)
        #: Rule 3 with several waiters: legs whose failure record is being written
        #: (`_fail_leg`), and legs a waiter dropped from its operations and is about to fail
        #: (`_reap`, `_WriteOp._time_out`); no write or flush is acknowledged while either
        #: holds a leg (`_WriteOp.wait`), since it may have been counted without that leg.
        self._recording: set[int] = set()
        self._owed: set[int] = set()
        #: Legs unreachable at open (`_open`): their bitmaps were not read (`_probe`).
        self._unread: set[int] = set()
        #: Set by the device (`tcmu_py.backend.FileExtent`): called when `file_extent` may
        #: answer differently (`_extent_moved`).
        self.extent_listener: Callable[[], None] | None = None
        #: Set by the device (`tcmu_py.backend.NativeKit`): without it no `FanOutExtent`.
        self.native_kit: NativeKit | None = None
        #: The write-intent regions of the last `FanOutExtent` given (None: the last extent
        #: given was none or a `ReadExtent`: C writes nothing), and a counter bumped at every
        #: `_extent_moved` (a write arms its regions only if it did not move meanwhile).
        self._fan: FanOutRegions | None = None
        self._fan_gen = 0
        self._fan_writes = 0  # C writes through earlier regions objects (status)
        #: The regions and epoch the last flush started (rule 6: C's busy regions stay armed)
        self._flush_epoch: tuple[FanOutRegions | None, int] = (None, 0)

    # -- open ------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: MirrorConfig, block_size: int = 512,
             opener: Callable[[str, int], Leg] | None = None) -> Mirror:
        from .legs import open_leg

        m = cls(cfg, block_size, opener or open_leg)
        try:
            m._open()
        except BaseException:
            m._close_legs()
            raise
        return m

    def _bitmap_offset(self, ls: _LegState) -> int:
        assert ls.leg is not None
        return ls.leg.size - self.meta_len

    def _bitmap_of(self, leg: Leg) -> bytearray:
        """`leg`'s bitmap, read into a buffer of the call's own (`_begin`'s contract)."""
        raw = bytearray(len(self.bitmap))
        leg.read(leg.size - self.meta_len, memoryview(raw))
        return raw

    def _on_legs(self, calls: Sequence[tuple[_LegState, Callable[[Leg], Any]]], what: str
                 ) -> tuple[dict[int, Any], dict[int, OSError]]:
        """``fn(leg)`` for each (leg state, fn) of `calls`, all started at once (an NBD leg's
        wait overlaps the others'), each bounded by ``leg_timeout`` on an NBD leg (`_begin`):
        (results, errors) by leg index."""
        results: dict[int, Any] = {}
        errors: dict[int, OSError] = {}
        jobs: list[tuple[_LegState, _Job]] = []
        for ls, fn in calls:
            try:
                jobs.append((ls, self._begin(ls, what, fn)))
            except OSError as exc:
                errors[ls.index] = exc
        for ls, job in jobs:
            try:
                results[ls.index] = job.wait()
            except OSError as exc:
                errors[ls.index] = exc
        return results, errors

    def _read_metadata(self, reachable: list[_LegState], legs: list[_LegState], what: str,
                       fn: Callable[[Leg], Any]) -> dict[int, Any]:
        """Metadata of each of `legs` (``fn(leg)``, bounded: `_on_legs`). A leg that
        does not answer in time is unreachable, like one that did not open: removed from
        `reachable` (its leg stays open until the call returned: `reattach` closes it), and
        the majority rule checked again. Any other error refuses the open (ConfigError).
        Nothing is written."""
        results, errors = self._on_legs([(ls, fn) for ls in legs], what)
        for i, exc in errors.items():
            ls = self._legs[i]
            if not isinstance(exc, _LegTimeout):
                raise ConfigError(f"mirror: {ls.name()}: cannot read its metadata: {exc}") \
                    from exc
            ls.error = str(exc)
            log.warning("mirror: %s unreachable at open: %s", ls.name(), exc)
            reachable.remove(ls)
        self._check_majority(reachable)
        return results

    def _check_majority(self, reachable: list[_LegState]) -> None:
        """Opening needs a majority of the legs reachable, unless ``degraded_open``."""
        majority = len(self._legs) // 2 + 1
        if len(reachable) < majority and not self.cfg.degraded_open:
            missing = ", ".join(f"{ls.name()}: {ls.error}" for ls in self._legs
                                if ls not in reachable)
            raise ConfigError(
                f"mirror: {len(reachable)} of {len(self._legs)} legs reachable; expected a "
                f"majority ({majority}) to open, or degraded_open=1 ({missing})")

    def _open(self) -> None:
        """Open the legs, read their metadata, choose (rules at the top), reconcile an
        unclean stop, write the new generation. Every call to an NBD leg is bounded by
        ``leg_timeout``: a leg silent to its superblock or bitmap read is unreachable (out of
        sync, reattached later); one silent mid-reconcile is failed (`_failed_at_open`)."""
        need = self.size + self.meta_len
        for ls in self._legs:
            try:
                ls.leg = self._opener(ls.spec, need)
            except OSError as exc:
                ls.error = str(exc)
                log.warning("mirror: %s unreachable at open: %s", ls.name(), exc)
        reachable = [ls for ls in self._legs if ls.leg is not None]
        self._check_majority(reachable)
        sbs: dict[int, Superblock | None] = self._read_metadata(
            reachable, list(reachable), "a superblock read", read_superblock)
        formatted = {i: sb for i, sb in sbs.items() if sb is not None}
        self._check_agreement(formatted)
        if not formatted:
            self._create(reachable)
            return
        bitmaps: dict[int, bytearray] = {}
        while True:  # bounded: each round removes a leg or ends
            live = {ls.index: formatted[ls.index] for ls in reachable if ls.index in formatted}
            fresh = self._freshest(live)
            fsb = formatted[fresh]
            # the freshest leg's bitmap; after an unclean stop, every in-sync leg's too
            want = [self._legs[i] for i, sb in live.items() if i not in bitmaps and (
                i == fresh or (not fsb.clean and fsb.has(i) and sb.has(i)))]
            if not want:
                break
            bitmaps.update(self._read_metadata(reachable, want, "a bitmap read",
                                               self._bitmap_of))
        self.uuid = fsb.mirror_uuid
        self.generation = fsb.generation
        self.bitmap = bitmaps[fresh]
        for ls in reachable:
            sb = sbs[ls.index]
            if ls.index == fresh or (sb is not None and fsb.has(ls.index) and sb.has(ls.index)):
                ls.state = IN_SYNC
                if ls.index != fresh and not fsb.clean:
                    # an unclean stop: whatever any in-sync leg flagged may differ
                    self.bitmap = bytearray(a | b for a, b in zip(self.bitmap, bitmaps[ls.index],
                                                                  strict=True))
            else:
                ls.state = RESYNCING
                if sb is None:  # a blank (new or replaced) leg: everything is to copy
                    self._set_all_bits()
        for ls in self._legs:
            if ls not in reachable:
                ls.state = FAILED
                self._unread.add(ls.index)
            elif ls.state == IN_SYNC and fsb.lag >> ls.index & 1:
                # rule 4b: it may lack acknowledged writes; its bits are in the union above
                ls.state = RESYNCING
                log.info("mirror: %s was lagging at the last stop; resyncing what the bitmap "
                         "names", ls.name())
        self._start_workers()
        in_sync = [ls for ls in self._legs if ls.state == IN_SYNC]
        if not fsb.clean and len(in_sync) > 1 and any(self.bitmap):
            # before serving: the in-sync legs must agree on every region a crash left flagged
            self._reconcile(self._legs[fresh], in_sync, self._dirty_regions())
        self.generation += 1
        self._write_bitmap_all()
        self._write_superblocks(clean=False)
        if not any(ls.state == IN_SYNC for ls in self._legs):
            raise ConfigError("mirror: no leg left in sync at open (" + ", ".join(
                f"{ls.name()}: {ls.error}" for ls in self._legs) + ")")
        self._after_open()

    def _check_agreement(self, formatted: dict[int, Superblock]) -> None:
        first: tuple[int, Superblock] | None = None
        for i, sb in formatted.items():
            ls = self._legs[i]
            if (sb.size, sb.region, sb.nlegs) != (self.size, self.region, len(self._legs)):
                raise ConfigError(
                    f"mirror: {ls.name()}: its metadata says size {sb.size}, region {sb.region}, "
                    f"{sb.nlegs} legs; the configuration says size {self.size}, region "
                    f"{self.region}, {len(self._legs)} legs (neither can change)")
            if sb.leg != i:
                raise ConfigError(f"mirror: {ls.name()}: its metadata says it is leg {sb.leg} of "
                                  f"the mirror; expected the legs in their original order")
            if first is None:
                first = (i, sb)
            elif sb.mirror_uuid != first[1].mirror_uuid:
                raise ConfigError(
                    f"mirror: {ls.name()} belongs to mirror {uuid.UUID(bytes=sb.mirror_uuid)}, "
                    f"{self._legs[first[0]].name()} to mirror "
                    f"{uuid.UUID(bytes=first[1].mirror_uuid)}; expected legs of one mirror")
        for i, a in formatted.items():
            for j, b in formatted.items():
                if i < j and not a.has(j) and not b.has(i):
                    raise ConfigError(
                        f"mirror: split brain: {self._legs[i].name()} (generation "
                        f"{a.generation}) and {self._legs[j].name()} (generation {b.generation})"
                        " were each written without the other; refusing to choose (nothing "
                        "written). Keep one side: 'tcmu-py mirror forget <the other leg>' "
                        "erases its metadata, and it gets a full copy")

    def _freshest(self, formatted: dict[int, Superblock]) -> int:
        candidates = [i for i, sb in formatted.items() if sb.has(i)]
        if not candidates:
            raise ConfigError("mirror: no reachable leg holds an in-sync copy (every one was "
                              "being resynced); expected the freshest leg reachable")
        best = max(formatted[i].generation for i in candidates)
        top = [i for i in candidates if formatted[i].generation == best]
        masks = {formatted[i].active for i in top}
        if len(masks) > 1:
            names = ", ".join(self._legs[i].name() for i in top)
            raise ConfigError(f"mirror: legs {names} have generation {best} with different "
                              "members; refusing to choose")
        return top[0]

    def _create(self, reachable: list[_LegState]) -> None:
        if len(reachable) < len(self._legs):
            raise ConfigError("mirror: a new mirror needs every leg reachable; unreachable: "
                              + ", ".join(f"{ls.name()} ({ls.error})" for ls in self._legs
                                          if ls not in reachable))
        self.uuid = uuid.uuid4().bytes
        self.generation = 1
        self._legs[0].state = IN_SYNC
        for ls in self._legs[1:]:
            ls.state = IN_SYNC if self.cfg.assume_clean else RESYNCING
        if not self.cfg.assume_clean:
            self._set_all_bits()
        self._start_workers()
        self._write_bitmap_all()
        self._write_superblocks(clean=False)
        log.info("mirror: new mirror %s over %d legs", uuid.UUID(bytes=self.uuid), len(self._legs))
        self._after_open()

    def _after_open(self) -> None:
        if any(ls.state == RESYNCING for ls in self._legs):
            self._start_resync()
        if self.cfg.retry_interval > 0:
            self._monitor = threading.Thread(target=self._monitor_loop, name="mirror-monitor",
                                             daemon=True)
            self._monitor.start()

    def _set_all_bits(self) -> None:
        for r in range(self.nregions):
            self.bitmap[r >> 3] |= 1 << (r & 7)

    # -- metadata writes -----------------------------------------------------------------------

    def _active_mask(self) -> int:
        return sum(1 << ls.index for ls in self._legs if ls.state == IN_SYNC)

    def _write_superblocks(self, clean: bool) -> None:
        """The current generation, active mask and lag mask to every leg taking writes (FUA)
        but the lagging ones (they are slow: their older superblock loses to the others' at
        open anyway), all at once: each NBD leg's on one of its call threads, waited for at
        most ``leg_timeout`` (`_begin`; `_meta_lock` is held meanwhile, and every write takes
        it). Caller holds no leg worker; legs that fail, or do not answer in time, are marked
        failed (which writes again)."""
        with self._meta_lock:  # snapshots taken in write order: the last one written is newest
            with self._lock:
                lag = 0 if clean else self._lag
                targets = [ls for ls in self._legs
                           if ls.takes_writes and not lag >> ls.index & 1]
                attached = {ls.index: ls.attached for ls in targets}
                gen, mask = self.generation, self._active_mask()
            calls: list[tuple[_LegState, Callable[[Leg], Any]]] = []
            for ls in targets:
                raw = Superblock(self.uuid, ls.index, len(self._legs), self.region, self.size,
                                 gen, mask, clean, lag).pack()

                def put(leg: Leg, raw: bytes = raw) -> None:
                    leg.write(leg.size - (2 - gen % 2) * SLOT, raw, fua=True)

                calls.append((ls, put))
            _, failed = self._on_legs(calls, "a superblock write")
            if len(failed) < len(targets):
                with self._lock:
                    everyone = (1 << len(self._legs)) - 1
                    self._lag_written = (lag | ~mask) & everyone
        for i, cause in failed.items():
            self._lost(self._legs[i], cause, attached[i])

    def _record_lag(self, legs: int) -> bool:
        """Rule 4b: before a write is acknowledged without the in-sync legs in mask `legs`,
        the superblocks of the others say those legs may lag (a failed leg's exclusion from
        the active mask says as much). True when that is so already; otherwise writes a
        superblock (the lock released meanwhile) and returns False: the caller looks again.
        Caller holds `_lock`."""
        if not legs & ~self._lag_written:
            return True
        self._lock.release()
        try:
            with self._lock:
                self.generation += 1
            self._write_superblocks(clean=False)
        finally:
            self._lock.acquire()
        return False

    def _lag_budget(self, legs: int) -> bool:
        """Whether the in-sync legs in mask `legs` may become lagging: the in-sync legs not
        lagging afterwards must still be a write quorum (so one of them, holding every
        acknowledged write, is always there to read from and to resync from). Caller holds
        `_lock`."""
        keep = [ls for ls in self._legs if ls.state == IN_SYNC
                and not (self._lag | legs) >> ls.index & 1]
        return len(keep) >= (self.cfg.quorum or len(self._legs))

    def _lag_check(self, ls: _LegState) -> bool:
        """`ls` caught up (nothing queued: it did every write the others did, as durably):
        no longer lagging. Its bit stays in the superblocks until the next one is written (a
        superset is safe). Caller holds `_lock`; True when the leg left the lag mask (the
        caller then calls `_extent_moved`, the lock released)."""
        if self._lag >> ls.index & 1 and not ls.ops:
            self._lag &= ~(1 << ls.index)
            # a write waiting until it may make another leg lag (`_lag_budget`) looks again
            self._wake_all()
            return True
        return False

    def _bitmap_block(self, lo: int, hi: int | None) -> tuple[int, bytes]:
        """(offset in the bitmap, bytes) of bitmap bytes [lo, hi) widened to 4 KiB blocks.
        Caller holds `_lock`."""
        hi = len(self.bitmap) if hi is None else hi
        lo -= lo % SLOT
        hi = min(len(self.bitmap), -(-hi // SLOT) * SLOT)
        return lo, bytes(self.bitmap[lo:hi])

    def _queue_bitmap(self, targets: list[_LegState], lo: int, data: bytes,
                      op: _WriteOp | None) -> None:
        """Queue a bitmap write (FUA) on each leg's FIFO: on every leg it lands before whatever
        is queued after it (rule 1). Caller holds `_meta_lock`, so the snapshots reach every
        FIFO in the order they were taken."""
        for ls in targets:
            ls.queue.put((op, META, lo, data))

    def _write_bitmap_all(self, lo: int = 0, hi: int | None = None) -> None:
        """Bitmap bytes [lo, hi) to every leg taking writes, and wait for them."""
        with self._meta_lock:
            with self._lock:
                start, data = self._bitmap_block(lo, hi)
                targets = [ls for ls in self._legs if ls.takes_writes]
                op = _WriteOp(self, range(0))
                op.start(targets, 0)
            self._queue_bitmap(targets, start, data, op)
        op.wait_all()

    def _fail_leg(self, ls: _LegState, exc: BaseException, attached: int) -> bool:
        """Mark `ls` out of sync and record it (generation + 1) on the legs left, durably,
        before returning (rule 3). `attached` is the leg's attachment (``ls.attached``) the
        failed call was made on: the failure of an earlier one (a call that failed before
        `reattach` reopened the leg, reported after it) was recorded when that attachment
        failed (a leg is reattached only once failed) and says nothing of the leg now: it is
        ignored (False returned; it used to fail the leg again, maybe the last standing one
        just brought back in sync, leaving the mirror with no leg to resync from)."""
        with self._lock:
            if ls.attached != attached:
                log.info("mirror: %s: a failure of its previous attachment (%s) ignored",
                         ls.name(), exc)
                return False
            self._owed.discard(ls.index)
            if ls.state == FAILED:
                # recorded already, or being recorded (in `_recording` until durable: the
                # acknowledgements wait for it, not this caller, who may hold `_meta_lock`)
                return True
            self._recording.add(ls.index)
            was = ls.state
            lagging = bool(self._lag >> ls.index & 1)
            ls.state = FAILED
            self._lag &= ~(1 << ls.index)  # its exclusion from the active mask says more
            ls.error = str(exc)
            ls.errors += 1
            self.generation += 1
            if was == IN_SYNC and not lagging and not any(
                    x.state == IN_SYNC and not self._lag >> x.index & 1 for x in self._legs):
                # the last leg holding every acknowledged write (a lagging leg left in sync
                # may not: rule 4b); nobody could record its failure
                self._last_standing = ls.index
            self._wake_all()
        # Before any write is acknowledged without it: those wait for `_recording`.
        self._extent_moved(1 << ls.index)
        log.error("mirror: %s failed (%s, was %s): out of sync", ls.name(), exc, was)
        try:
            self._write_superblocks(clean=False)
        finally:
            with self._lock:
                self._recording.discard(ls.index)
                self._wake_all()
        return True

    def _wake_all(self) -> None:
        """Wake every thread waiting on `_lock` and every write waiting for its legs. Caller
        holds `_lock`."""
        self._lock.notify_all()
        for op in self._waiters:
            op.cond.notify_all()

    # -- the C data plane --------------------------------------------------------------------

    def file_extent(self) -> ReadExtent | FanOutExtent | None:
        """READs may go straight to a local leg (image file or block device: the data area is
        its bytes ``[0, size)``) while it is in sync and not lagging: it then holds every
        acknowledged write (rules 4 and 4b). None otherwise, while closing, and with
        ``read=round-robin``: an operator who spreads reads over every leg gets that
        (least-busy reads the local leg when it is free, as C does). The C data plane asks
        again after each `_extent_moved`.

        WRITEs too (a `FanOutExtent`: the native loop writes every leg itself) when every leg
        is in sync, the quorum is ``all`` (C waits for every leg; a numeric quorum's lagging
        legs stay Python's) and every NBD leg has a C writer (its server offers multi-conn:
        SYNCHRONIZE CACHE, sent on the mirror's own connection, then covers the writer's
        writes too). Its regions start disarmed: a region is armed by the first write to it
        that Python makes (rule 6)."""
        if self.cfg.read_policy != "least-busy":
            return None
        with self._lock:
            self._retire_fan()
            if self._closing:
                return None
            local = [ls for ls in self._legs
                     if ls.local and ls.state == IN_SYNC and not self._lag >> ls.index & 1
                     and isinstance(ls.leg, FileLeg)]
            if not local:
                return None
            read_fd = local[0].leg.fd  # type: ignore[union-attr]
            legs = list(self._legs)
            kit = self.native_kit
            fan_ok = (kit is not None and not self.cfg.quorum and not self._lag
                      and not self._recording and not self._owed
                      and all(ls.state == IN_SYNC for ls in legs))
        if not fan_ok:
            return ReadExtent(read_fd, 0)
        fds: list[int] = []
        writers: list[FanOutWriter] = []
        assert kit is not None
        for ls in legs:
            leg = ls.leg
            if isinstance(leg, FileLeg):
                fds.append(leg.fd)
                continue
            w = leg.writer(kit, self.cfg.leg_timeout) if isinstance(leg, NbdLeg) else None
            if w is None:
                return ReadExtent(read_fd, 0)  # no writer: the writes stay the mirror's
            writers.append(w)
        with self._lock:
            if any(ls.state != IN_SYNC for ls in legs) or self._closing:
                return ReadExtent(read_fd, 0)  # moved meanwhile: asked again after it
            self._fan = kit.regions(self.region, self.nregions)
        return FanOutExtent(read_fd, 0, tuple(fds), tuple(writers), self._fan)

    def _retire_fan(self) -> None:
        """Forget the current regions (C no longer writes through them: the plane asks for a
        new extent only once it is drained). Caller holds `_lock`."""
        if self._fan is not None:
            self._fan_writes += self._fan.writes
            self._fan = None

    def _extent_moved(self, legs: int) -> None:
        """The state of the legs in mask `legs` changed (in sync, failed, lagging): if one is
        local, the data plane stops reading it until it asked `file_extent` again. Called
        before the change matters: before a write acknowledged without that leg returns,
        before its fd is closed (a failed leg is closed only by `reattach` or `close`). With
        a `NativeKit`, whatever the legs: C writes every leg, or may again once every leg is
        back in sync (the plane asks `file_extent` again). Without `_lock` held:
        the listener waits for the data plane's reads and writes in flight."""
        listener = self.extent_listener
        with self._lock:
            self._fan_gen += 1
            # with a kit, any leg's change may start or stop C's writes
            fan = self.native_kit is not None
        if listener is not None and (fan or any(ls.local for ls in self._legs
                                                 if legs >> ls.index & 1)):
            listener()

    # -- the BlockBackend ----------------------------------------------------------------------

    def _regions(self, offset: int, length: int) -> range:
        return range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1)

    def _need(self) -> int:
        """Successes a write needs, or QuorumLost (OSError once closed: no worker to run it)."""
        if self._closed:
            raise OSError(9, "mirror: closed")
        in_sync = sum(1 for ls in self._legs if ls.state == IN_SYNC)
        need = self.cfg.quorum or 1
        if in_sync < need:
            raise QuorumLost(
                f"mirror: {in_sync} legs in sync; the write quorum is {need}")
        return self.cfg.quorum or in_sync

    def _stuck(self, ls: _LegState, now: float) -> bool:
        """Whether `ls` has been in one call for `leg_timeout` or longer. Caller holds
        `_lock`."""
        t = self.cfg.leg_timeout
        return bool(t > 0 and ls.call_started and now - ls.call_started >= t)

    def _reap(self) -> None:
        """Rule 4: a leg stuck in one call for `leg_timeout` counts as failed, whoever waits
        for it (a lagging leg nobody waits for is timed out here): every operation queued on
        it goes on without it, and it is marked out of sync and recorded on the others (the
        lock released meanwhile). Caller holds `_lock`."""
        for ls in self._legs:
            if ls.state == FAILED or not self._stuck(ls, time.monotonic()):
                continue
            exc = OSError(110, f"mirror: no answer within {self.cfg.leg_timeout:g} s from "
                               f"{ls.name()}")
            self._owed.add(ls.index)  # recorded before the dropped ops acknowledge (rule 3)
            for op in list(ls.ops.values()):
                op.drop(ls, exc)
            attached = ls.attached
            self._lock.release()
            try:
                log.error("mirror: %s did not answer within %g s", ls.name(),
                          self.cfg.leg_timeout)
                self._fail_leg(ls, exc, attached)
            finally:
                self._lock.acquire()

    def _overloaded(self, nbytes: int) -> list[_LegState]:
        """Lagging legs that would be more than `max_lag` bytes behind with `nbytes` more:
        they are failed rather than let grow (rule 4b). Caller holds `_lock`."""
        if not self.cfg.quorum or not self.cfg.max_lag:
            return []
        return [ls for ls in self._legs if ls.state == IN_SYNC and self._lag >> ls.index & 1
                and ls.backlog + nbytes > self.cfg.max_lag]

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        data = b"".join(bufs)
        regions = self._regions(offset, len(data))
        with self._lock:
            self._reap()
            behind = [(ls, ls.attached) for ls in self._overloaded(len(data))]
            # A leg whose C writer died (no answer within leg_timeout, or its connection lost)
            # failed a write C made: it is failed now, not after another leg_timeout here
            silent = [(ls, ls.attached) for ls in self._legs if ls.state == IN_SYNC
                      and isinstance(ls.leg, NbdLeg) and ls.leg.writer_dead]
        for ls, attached in behind:
            self._fail_leg(ls, OSError(105, f"mirror: more than {self.cfg.max_lag} bytes "
                                       "behind the write quorum"), attached)
        for ls, attached in silent:
            self._fail_leg(ls, OSError(110, f"mirror: {ls.name()}: a write made in C got no "
                                       f"answer within {self.cfg.leg_timeout:g} s, or its "
                                       "connection was lost"), attached)
        with self._lock:
            self._need()
            while any(r in self._resync_busy for r in regions):
                self._lock.wait()
            self._seq += 1
            seq = self._seq
            for r in regions:  # from here the resync leaves these regions alone
                self._writers[r] = self._writers.get(r, 0) + 1
                self._last_write[r] = self._seq
        op = _WriteOp(self, regions, WRITE, len(data))
        op.seq = seq
        try:
            # Bits are set, and their block queued, under `_meta_lock`: a write finding its bit
            # already set queues its data after the block that set it, on every leg.
            with self._meta_lock:
                with self._lock:
                    need = self._need()
                    new_bits = False
                    fan, fan_gen = self._fan, self._fan_gen
                    for r in regions:
                        if not self.bitmap[r >> 3] >> (r & 7) & 1:
                            self.bitmap[r >> 3] |= 1 << (r & 7)
                            new_bits = True
                        elif fan is not None and not fan.armed(r):
                            new_bits = True  # rule 6: the block again, to arm the region
                    block = (self._bitmap_block(regions[0] >> 3, (regions[-1] >> 3) + 1)
                             if new_bits else None)
                    targets = [ls for ls in self._legs if ls.takes_writes]
                    op.start(targets, need)
                if block is not None:  # rule 1: on each leg, the bit before the data
                    self._queue_bitmap(targets, block[0], block[1], None)
                for ls in targets:
                    ls.queue.put((op, WRITE, offset, data))
        except BaseException:
            op.abandon()
            raise
        op.wait()
        if fan is not None:
            with self._lock:
                # rule 6: every leg took the block, then the data (quorum all), and nothing
                # moved since (a leg failing moves it before the write is acknowledged)
                if (fan is self._fan and fan_gen == self._fan_gen
                        and len(targets) == len(self._legs)
                        and all(ls.state == IN_SYNC for ls in self._legs)
                        and all(self.bitmap[r >> 3] >> (r & 7) & 1 for r in regions)):
                    fan.arm(regions[0], regions[-1])

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Read from one in-sync leg (``read_policy``); a leg that fails the read, or does not
        answer within ``leg_timeout``, is marked out of sync (recorded on the others) and the
        read is retried on another in-sync leg before the initiator sees an error."""
        length = sum(len(b) for b in bufs)
        end = offset + length
        tried: set[int] = set()
        last: OSError | None = None
        while True:
            with self._lock:
                legs = [ls for ls in self._legs if ls.state == IN_SYNC and ls.index not in tried]
                if not legs:
                    break
                free = [ls for ls in legs
                        if not any(s < end and offset < e for s, e in ls.pending.values())]
                # a leg still writing this range (acknowledged by the quorum without it) is
                # read only if no other is free; its FIFO then finishes the write first
                pool = free or legs
                if self.cfg.read_policy == "least-busy":
                    # reads in flight, then a local leg (an NBD read costs a network round
                    # trip and the server's work), then the fewest reads so far
                    pick = min(pool, key=lambda x: (x.busy, not x.local, x.reads))
                else:
                    pick = pool[self._rr % len(pool)]
                    self._rr += 1
                pick.busy += 1
                attached = pick.attached
                wait_for = None if free else pick
            tried.add(pick.index)
            try:
                if wait_for is not None:
                    self._drain(wait_for, offset, end)
                self._read_leg(pick, offset, bufs, length)
                pick.reads += 1
                return
            except OSError as exc:
                last = exc
                self._lost(pick, exc, attached)
        if last is not None:
            raise last
        raise OSError(5, "mirror: no leg in sync to read from")

    def _read_leg(self, ls: _LegState, offset: int, bufs: Sequence[memoryview],
                  length: int) -> None:
        """Fill `bufs` from `ls` (whose ``busy`` the caller raised; dropped here once the
        leg's call returned). With a ``leg_timeout`` the call runs on one of the leg's
        threads (`_begin`) into a buffer of its own, copied into `bufs` only when it answered
        in time (`_LegTimeout` otherwise): a late answer never lands in `bufs` (the ring's
        memory, by then another command's). A local leg (image file, block device) is read on
        the caller's thread, unbounded: the hand-off costs reads a third of their rate in the
        lab (benchmarks.md), and a local store that hangs holds its writes' worker too."""
        leg = ls.leg
        timeout = self.cfg.leg_timeout
        if leg is None or timeout <= 0 or ls.local:
            try:
                if leg is None:
                    raise OSError(5, f"{ls.name()} is closed")
                pos = offset
                for b in bufs:
                    leg.read(pos, b)
                    pos += len(b)
            finally:
                with self._lock:
                    ls.busy -= 1
            return
        own = bytearray(length)
        self._begin(ls, "a read", lambda leg: leg.read(offset, memoryview(own)), leg=leg,
                    read=True).wait()
        pos = 0
        for b in bufs:
            b[:] = own[pos:pos + len(b)]
            pos += len(b)

    def _bounded(self, ls: _LegState) -> bool:
        """Whether a direct call of `ls` runs on one of its threads, waited for at most
        ``leg_timeout`` (`_begin`): an NBD leg with a ``leg_timeout``."""
        return self.cfg.leg_timeout > 0 and not ls.local

    def _begin(self, ls: _LegState, what: str, fn: Callable[[Leg], Any],
               leg: Leg | None = None, read: bool = False) -> _Job:
        """Start ``fn(leg)`` (`leg`: `ls`'s by default), a call made straight to the leg (not
        through its FIFO), and return its `_Job`, whose ``wait`` returns its result or raises
        its error, or `_LegTimeout` (ETIMEDOUT, "no answer within N s to `what`") once
        ``leg_timeout`` has passed since this call. On a bounded leg (`_bounded`) the call
        runs on one of the leg's threads (`_Callers`), else here, before this returns.

        Contract for `fn`: a call given up on may still run, and complete, later; `fn` must
        then touch no memory its caller may reuse (it reads into a buffer of its own, which
        the caller copies from after ``wait``; it writes immutable bytes). Until the call
        returns it is counted in ``ls.calls`` (``ls.busy`` with `read`, whose caller raised
        it already), and the leg is neither reattached nor closed meanwhile."""
        with self._lock:
            if leg is None:
                leg = ls.leg
            if leg is None:
                if read:
                    ls.busy -= 1
                raise OSError(5, f"mirror: {ls.name()} is closed")
            if not read:
                ls.calls += 1

        def call() -> Any:
            try:
                return fn(leg)
            finally:
                with self._lock:
                    if read:
                        ls.busy -= 1
                    else:
                        ls.calls -= 1
                    self._lock.notify_all()

        timeout = self.cfg.leg_timeout
        job = _Job(call, f"mirror: {ls.name()}: no answer within {timeout:g} s to {what}",
                   time.monotonic() + timeout if timeout > 0 else None)
        if self._bounded(ls):
            ls.callers.submit(job)
        else:
            job.run()
        return job

    def _call(self, ls: _LegState, what: str, fn: Callable[[Leg], Any],
              leg: Leg | None = None) -> Any:
        """``fn(leg)`` bounded by ``leg_timeout`` on an NBD leg (`_begin`, its contract)."""
        return self._begin(ls, what, fn, leg).wait()

    def _lost(self, ls: _LegState, exc: OSError, attached: int) -> None:
        """`ls` failed a call made on its attachment `attached` (`exc`): mark it out of sync
        and record that on the others (`_fail_leg`: nothing if it has been reattached since);
        a leg that did not answer in time also releases the operations queued on it
        (`_give_up`)."""
        if isinstance(exc, _LegTimeout):
            log.error("%s", exc)
            self._give_up(ls, exc, attached)
        else:
            self._fail_leg(ls, exc, attached)

    def _give_up(self, ls: _LegState, exc: OSError, attached: int) -> None:
        """`ls` did not answer in time: mark it out of sync and record that on the others
        (rule 3), then the writes and flushes queued on it go on without it (in that order:
        none is acknowledged on the strength of the others before the record). Nothing if
        `ls` has been reattached since the call (`attached`): its operations are the new
        attachment's."""
        if not self._fail_leg(ls, exc, attached):
            return
        with self._lock:
            for op in list(ls.ops.values()):
                op.drop(ls, exc)

    def _drain(self, ls: _LegState, start: int, end: int) -> None:
        with self._lock:
            while any(s < end and start < e for s, e in ls.pending.values()) \
                    and ls.state == IN_SYNC:
                self._reap()  # a leg stuck in the write this read waits for
                self._lock.wait(0.1)

    def flush(self, every_leg: bool = False) -> None:
        """SYNCHRONIZE CACHE: returns once the write quorum (``all``: every in-sync leg) has
        every write completed before the call durable; `every_leg` waits for the lagging legs
        too (close)."""
        with self._meta_lock, self._lock:  # queued in the same order as the writes
            self._reap()
            start_seq = self._seq
            need = self._need()
            targets = [ls for ls in self._legs if ls.takes_writes]
            op = _WriteOp(self, range(0), FLUSH)
            fan = self._fan
            epoch = fan.epoch() if fan is not None else 0  # C's writes from here on: kept
            # Regions C writes stay armed while busy (rule 6): their bits are cleared only
            # when C wrote none of them since the *previous* flush began (this one covers
            # that too); until a second flush on these regions, since this one began.
            prev_fan, prev_epoch = self._flush_epoch
            self._flush_epoch = (fan, epoch)
            keep_since = prev_epoch if fan is not None and prev_fan is fan else epoch
            # rule 5 needs the flush on every leg, not just the quorum: the last leg to answer
            # clears the bits (maybe after the flush was acknowledged)
            op.on_complete = lambda: self._clear_clean_bits(start_seq, fan, keep_since)
            op.start(targets, need)
            for ls in targets:
                ls.queue.put((op, FLUSH, 0, b""))
        op.wait()
        if every_leg:
            op.wait_all()

    def _clear_clean_bits(self, before: int, fan: FanOutRegions | None = None,
                          epoch: int = 0) -> None:
        """Rule 5: with every leg in sync, clear the bits of regions not written since `before`
        and not being written, by Python or by C (`fan`, the regions C wrote through when the
        flush started, in `epoch`: a region C wrote since is kept; one it did not is disarmed
        as it is cleared)."""
        with self._lock:
            if any(ls.state != IN_SYNC for ls in self._legs) or fan is not self._fan:
                return  # C's regions changed since the flush started: nothing is known
            cleared = [r for r in self._dirty_regions()
                       if self._last_write.get(r, 0) <= before and not self._writers.get(r)
                       and (fan is None or fan.disarm(r, epoch))]
            for r in cleared:
                self.bitmap[r >> 3] &= ~(1 << (r & 7)) & 0xFF
                self._last_write.pop(r, None)
        if cleared:  # lazily: nobody waits for a clear (rule 5)
            with self._meta_lock:
                with self._lock:
                    lo, data = self._bitmap_block(min(cleared) >> 3, (max(cleared) >> 3) + 1)
                    targets = [ls for ls in self._legs if ls.takes_writes]
                self._queue_bitmap(targets, lo, data, None)

    # -- leg workers -----------------------------------------------------------------------

    def _start_workers(self) -> None:
        for ls in self._legs:
            if ls.leg is not None and ls.thread is None:
                self._start_worker(ls)

    def _start_worker(self, ls: _LegState) -> None:
        ls.queue = queue.SimpleQueue()
        ls.thread = threading.Thread(target=self._worker, args=(ls, ls.queue, ls.attached),
                                     name=f"mirror-leg{ls.index}", daemon=True)
        ls.thread.start()

    def _worker(self, ls: _LegState, q: queue.SimpleQueue[Any], attached: int) -> None:
        """Run `ls`'s FIFO in order. To a leg that takes batches (an NBD leg's `write_many`)
        consecutive data writes that do not overlap go at once, up to `BATCH_WRITES` /
        `BATCH_BYTES`: at queue depth N an NBD leg costs one round trip per batch, not N.
        A bitmap block, a flush or an overlapping write ends a batch, so everything queued
        after one of those still reaches the leg after it (rule 1 and the ordering of rule 2:
        only writes the server may reorder without changing the result go together)."""
        name_os_thread()
        carry: Any = _NO_ITEM
        while True:
            item = q.get() if carry is _NO_ITEM else carry
            carry = _NO_ITEM
            if item is None:
                return
            leg = ls.leg
            batch = [item]
            if item[1] == WRITE and getattr(leg, "write_many", None) is not None:
                spans = [(item[2], item[2] + len(item[3]))]
                nbytes = len(item[3])
                while len(batch) < BATCH_WRITES and nbytes < BATCH_BYTES:
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or nxt[1] != WRITE or any(
                            s < nxt[2] + len(nxt[3]) and nxt[2] < e for s, e in spans):
                        carry = nxt
                        break
                    batch.append(nxt)
                    spans.append((nxt[2], nxt[2] + len(nxt[3])))
                    nbytes += len(nxt[3])
            results = self._run_items(ls, leg, batch)
            first = next((r for r in results if r is not None), None)
            if first is not None and ls.state != FAILED:
                self._fail_leg(ls, first, attached)
            for (op, *_), result in zip(batch, results, strict=True):
                if op is not None:
                    op.done(ls, result)

    def _run_items(self, ls: _LegState, leg: Leg | None, items: list[Any]) -> list[OSError | None]:
        """Run FIFO items on `leg` (several: data writes for `write_many`); each one's error
        or None."""
        try:
            if leg is None or ls.state == FAILED:
                raise OSError(5, f"{ls.name()} is out of sync")
            ls.call_started = time.monotonic()
            try:
                if len(items) > 1:
                    return list(leg.write_many(  # type: ignore[attr-defined]
                        [(offset, data, not self.write_cache) for _, _, offset, data in items]))
                _, kind, offset, data = items[0]
                if kind == FLUSH:
                    leg.flush()
                elif kind == META:
                    leg.write(self._bitmap_offset(ls) + offset, data, fua=True)
                else:
                    leg.write(offset, data, fua=not self.write_cache)
                return [None]
            finally:
                ls.call_started = 0.0
        except OSError as exc:
            return [exc] * len(items)

    # -- resync ------------------------------------------------------------------------------

    def _dirty_regions(self) -> list[int]:
        return [r for r in range(self.nregions) if self.bitmap[r >> 3] >> (r & 7) & 1]

    def _start_resync(self) -> None:
        with self._lock:
            # `_resync_thread` is None from the moment a pass decides it has nothing left
            # (under the lock): a leg reattached after that starts a new thread, one reattached
            # before it is picked up by the running thread's next pass.
            if self._resync_thread is not None:
                self._resync_wake.set()
                return
            self._resync_thread = threading.Thread(target=self._resync_loop,
                                                   name="mirror-resync", daemon=True)
            self._resync_thread.start()

    def _resync_loop(self) -> None:
        name_os_thread()
        while not self._closing:
            with self._lock:
                targets = [ls for ls in self._legs if ls.state == RESYNCING]
                sources = [ls for ls in self._legs if ls.state == IN_SYNC]
                if not targets or not sources:
                    self._resync_thread = None
                    if targets:
                        log.error("mirror: no leg in sync to resync from")
                    return
                regions = self._dirty_regions()
                self.resync_total = len(regions)
                self.resync_done = 0
                # a target failed and reattached during the pass missed regions: not promoted
                attached = {ls.index: ls.attached for ls in targets + sources[:1]}
            try:
                if not self._copy_regions(sources[0], targets, regions, attached,
                                          throttle=True):
                    continue  # the source left sync (next pass picks another) or closing
            except OSError as exc:  # the source failed: next pass picks another
                self._lost(sources[0], exc, attached[sources[0].index])
                continue
            for ls in targets:
                if ls.state != RESYNCING or ls.attached != attached[ls.index]:
                    continue
                try:
                    self._call(ls, "a flush", lambda leg: leg.flush())
                except OSError as exc:
                    self._lost(ls, exc, attached[ls.index])
                    continue
                with self._lock:
                    if ls.state != RESYNCING or ls.attached != attached[ls.index]:
                        continue
                    ls.state = IN_SYNC
                    ls.error = ""
                    self.generation += 1
                    self._wake_all()  # one more leg for the quorum and the lag budget
                self._extent_moved(1 << ls.index)
                log.info("mirror: %s in sync (%d regions copied)", ls.name(), len(regions))
            self._write_superblocks(clean=False)
            with self._lock:
                all_in = all(ls.state == IN_SYNC for ls in self._legs)
            if all_in:  # every leg holds every region: the bits of quiet regions can go
                self.flush()
            # next pass: legs reattached during this one (the loop's top ends the thread)
        with self._lock:
            self._resync_thread = None

    def _reconcile(self, fresh: _LegState, legs: list[_LegState], regions: list[int]) -> None:
        """Unclean open: make the in-sync `legs` agree on `regions`: the content a majority of
        them hold, else `fresh`'s (any in-sync leg's will do: each holds every acknowledged
        write; another's once `fresh` is failed). Nothing is served yet: no lock needed
        against writes. Each region's reads, then its writes, run on every leg at once, each
        bounded by ``leg_timeout`` on an NBD leg (`_on_legs`); then the flushes. A leg that
        fails or does not answer is failed (`_failed_at_open`) and the rest go on (a region
        whose reads it failed is read again from them)."""
        legs = list(legs)
        for r in regions:
            off = r * self.region
            n = min(self.region, self.size - off)

            def get(leg: Leg, off: int = off, n: int = n) -> bytes:
                buf = bytearray(n)  # the call's own (`_begin`'s contract)
                leg.read(off, memoryview(buf))
                return bytes(buf)

            copies: dict[int, bytes] = {}
            while len(legs) > 1:
                copies, errors = self._on_legs([(ls, get) for ls in legs], "a reconcile read")
                if not errors:
                    break
                legs = self._failed_at_open(legs, errors)
            if len(legs) < 2:
                break  # one leg left: nothing to agree on
            if len(set(copies.values())) == 1:
                continue
            votes: dict[bytes, int] = {}
            for data in copies.values():
                votes[data] = votes.get(data, 0) + 1
            best = max(votes.values())
            if fresh not in legs:
                fresh = legs[0]
            winner = next(d for d, v in votes.items() if v == best) \
                if best * 2 > len(legs) else copies[fresh.index]

            def put(leg: Leg, off: int = off, winner: bytes = winner) -> None:
                leg.write(off, winner)

            stale = [ls for ls in legs if copies[ls.index] != winner]
            done, errors = self._on_legs([(ls, put) for ls in stale], "a reconcile write")
            self.regions_copied += len(done)
            legs = self._failed_at_open(legs, errors)
        _, errors = self._on_legs([(ls, lambda leg: leg.flush()) for ls in legs], "a flush")
        self._failed_at_open(legs, errors)

    def _failed_at_open(self, legs: list[_LegState], errors: dict[int, OSError]
                        ) -> list[_LegState]:
        """The legs in `errors` failed a call at open (an error, or no answer within
        ``leg_timeout``): marked out of sync (in memory; the open's superblock write records
        it on the others, after the bitmap, before anything is served) and `legs` without
        them returned. ConfigError, naming them, when the open rule (a majority of the legs
        taking writes, unless ``degraded_open``) no longer holds or no leg is left in sync:
        the superblocks are then untouched, and the next open reconciles again."""
        for i, exc in errors.items():
            ls = self._legs[i]
            with self._lock:
                ls.state = FAILED
                ls.error = str(exc)
                ls.errors += 1
            log.error("mirror: %s failed at open (%s): out of sync", ls.name(), exc)
        left = [ls for ls in self._legs if ls.takes_writes]
        majority = len(self._legs) // 2 + 1
        if errors and (not any(ls.state == IN_SYNC for ls in left)
                       or len(left) < majority and not self.cfg.degraded_open):
            lost = "; ".join(str(exc) for exc in errors.values())
            raise ConfigError(
                f"mirror: {lost}; {len(left)} of {len(self._legs)} legs left, expected a "
                f"majority ({majority}) with one in sync to open, or degraded_open=1 "
                "(the superblocks are unchanged)")
        return [ls for ls in legs if ls.index not in errors]

    def _copy_regions(self, source: _LegState, targets: list[_LegState], regions: list[int],
                      attached: dict[int, int], throttle: bool) -> bool:
        """Copy `regions` from `source` to `targets`, each region held from the initiator's
        writes meanwhile (``_resync_busy``); `attached`: the legs' attachments at the pass's
        start. Calls to an NBD leg are bounded (`_begin`): a target that fails or does not
        answer is marked out of sync and left out; the source's error is raised (the caller
        fails it). False, the rest left uncopied, once the source is no longer in sync (or
        the mirror closes): a source failed by a write it missed (maybe still readable)
        may lack an acknowledged write, so nothing read from it after that counts (the
        region's writes ended before its read, and a leg failing a write is failed before
        the write ends: in sync after the read, it held the region's every write). Runs
        on the resync thread."""
        buf = bytearray(self.region)
        started = time.monotonic()
        copied = 0
        for r in regions:
            if self._closing:
                return False
            with self._lock:
                while self._writers.get(r):
                    self._lock.wait()
                self._resync_busy.add(r)
            done = False
            try:
                off = r * self.region
                n = min(self.region, self.size - off)
                data = self._read_region(source, off, memoryview(buf)[:n], targets)
                with self._lock:
                    if (source.state != IN_SYNC or source.index in self._owed
                            or source.attached != attached[source.index]):
                        log.info("mirror: resync: %s left sync mid-pass; the next pass "
                                 "copies from another leg", source.name())
                        return False

                def put(leg: Leg, off: int = off, data: memoryview | bytes = data) -> None:
                    leg.write(off, data)

                _, errors = self._on_legs([(ls, put) for ls in targets
                                           if ls.state != FAILED and ls.leg is not None],
                                          "a resync write")
                for i, exc in errors.items():
                    self._lost(self._legs[i], exc, attached[i])
                done = True
            finally:
                with self._lock:
                    self._resync_busy.discard(r)
                    self.resync_done += done
                    self.regions_copied += done
                    self._lock.notify_all()
            copied += n
            if throttle and self.cfg.resync_rate:
                due = started + copied / self.cfg.resync_rate - time.monotonic()
                if due > 0:
                    self._resync_wake.wait(due)  # close() and reattach() cut it short
        return not self._closing

    def _read_region(self, source: _LegState, off: int, view: memoryview,
                     targets: list[_LegState]) -> memoryview | bytes:
        """`source`'s bytes at `off` (``len(view)`` of them) for the copy to `targets`: read
        into `view` (reused for the next region) from a local source, into a buffer of the
        call's own from a bounded one (a late answer lands there); copied out of `view` when
        a bounded target may still write them after being given up on. OSError: the
        source's failure."""
        if self._bounded(source):
            own = bytearray(len(view))
            self._call(source, "a resync read", lambda leg: leg.read(off, memoryview(own)))
            return memoryview(own)  # nothing writes it any more
        assert source.leg is not None
        source.leg.read(off, view)
        if any(self._bounded(ls) for ls in targets):
            return bytes(view)
        return view

    # -- failed legs coming back -------------------------------------------------------------

    def reattach(self, index: int) -> bool:
        """Try to reopen failed leg `index`; when it opens and carries this mirror's metadata
        (or none), it becomes a resync target and the resync starts. Returns whether it did:
        not while a call of the old leg's is still running (up to 1 s is waited for one to
        end), nor when the reopened leg's superblock read fails or (an NBD leg) gets no answer
        within ``leg_timeout`` (the leg is then kept open until that call returned)."""
        ls = self._legs[index]
        with self._lock:
            if ls.state != FAILED or self._closing:
                return False
        if not self._stop_worker(ls, wait=1.0):
            return False  # still in its last call (its error says why): next round
        with self._lock:
            # a call of the leg's still running (one given up on: maybe for long): next round
            if not self._lock.wait_for(lambda: not (ls.busy or ls.calls), 1.0):
                return False
            old, ls.leg = ls.leg, None
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        try:
            leg = self._opener(ls.spec, self.size + self.meta_len)
        except (OSError, ConfigError) as exc:
            ls.error = str(exc)
            return False
        try:
            sb, bits = self._call(ls, "a superblock read",
                                  lambda leg: self._probe(index, leg), leg=leg)
        except _LegTimeout as exc:
            ls.error = str(exc)
            log.error("%s; not reattached", exc)
            with self._lock:
                ls.leg = leg  # closed by the next attempt, once its call returned
            return False
        except OSError as exc:
            leg.close()
            ls.error = str(exc)
            return False
        if sb is not None and (sb.mirror_uuid != self.uuid or sb.generation > self.generation):
            leg.close()
            ls.error = ("carries the metadata of another mirror" if sb.mirror_uuid != self.uuid
                        else f"was written elsewhere meanwhile (generation {sb.generation} > "
                             f"{self.generation}): split brain")
            log.error("mirror: %s: %s; not reattached", ls.name(), ls.error)
            return False
        with self._lock:
            if sb is None:
                self._set_all_bits()
            elif bits is not None:  # what it may hold that the others lack (`_probe`)
                self.bitmap[:] = bytes(a | b for a, b in zip(self.bitmap, bits, strict=True))
            self._unread.discard(index)
            ls.leg = leg
            ls.error = ""
            ls.attached += 1
            self.generation += 1
            if (sb is not None and self._last_standing == index
                    and not any(x.state == IN_SYNC for x in self._legs)):
                ls.state = IN_SYNC  # every acknowledged write is on it: the others copy it
                self._last_standing = None
                self._wake_all()
            else:
                ls.state = RESYNCING
        self._extent_moved(1 << ls.index)  # in sync again (last standing), or resyncing
        self._start_worker(ls)
        self._write_bitmap_all()
        self._write_superblocks(clean=False)
        log.info("mirror: %s back; resyncing", ls.name())
        self._start_resync()
        return True

    def _probe(self, index: int, leg: Leg) -> tuple[Superblock | None, bytearray | None]:
        """Reopened leg `index`'s superblock, and its bitmap when the leg was unreachable at
        open (its bits never read: `_unread`) and stopped unclean in this mirror: it may
        then hold writes (never acknowledged) the others lack, in regions only its own
        bitmap names (the open's bitmap is the union of the others'); the resync copies
        those too. (A leg whose bits were read keeps them in memory while out of sync.)"""
        sb = read_superblock(leg)
        bits = None
        if (index in self._unread and sb is not None and not sb.clean
                and sb.mirror_uuid == self.uuid and sb.generation <= self.generation):
            bits = self._bitmap_of(leg)
        return sb, bits

    def _stop_worker(self, ls: _LegState, wait: float = 10.0) -> bool:
        """End the leg's worker; False if it is still in a call after `wait` seconds (a leg
        that timed out: it stays, and ends when the call returns)."""
        if ls.thread is not None:
            if not ls.stopping:
                ls.queue.put(None)
                ls.stopping = True
            ls.thread.join(wait)
            if ls.thread.is_alive():
                return False
            ls.thread = None
            ls.stopping = False
        return True

    def _monitor_loop(self) -> None:
        name_os_thread()
        while not self._closing:
            self._resync_wake.wait(self.cfg.retry_interval)
            if self._closing:
                return
            self._resync_wake.clear()  # set by a reattach during a pass: no busy loop here
            with self._lock:  # a lagging leg stuck with no command coming to time it out
                self._reap()
            for ls in self._legs:
                if ls.state == FAILED:
                    self.reattach(ls.index)

    @property
    def has_remote_legs(self) -> bool:
        """Whether a leg is reached over the network (NBD): a command may then wait for
        it up to ``leg_timeout`` (without one, until TCP gives up)."""
        return any(not ls.local for ls in self._legs)

    def wait_resync(self, timeout: float) -> bool:
        """Wait until no leg is resyncing (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        t = self._resync_thread
        if t is not None:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(ls.state == RESYNCING for ls in self._legs)

    # -- status and close --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            resyncing = any(ls.state == RESYNCING for ls in self._legs)
            in_sync = sum(1 for ls in self._legs if ls.state == IN_SYNC)
            try:
                self._need()
                state = "degraded" if in_sync < len(self._legs) else "optimal"
            except QuorumLost:
                state = "read-only"
            return {
                "uuid": str(uuid.UUID(bytes=self.uuid)) if self.uuid else "",
                "generation": self.generation,
                "state": state,
                "quorum": self.cfg.quorum or "all",
                "region": self.region,
                "regions": self.nregions,
                "dirty_regions": sum(bin(b).count("1") for b in self.bitmap),
                "resync": {"active": resyncing, "total": self.resync_total,
                           "done": self.resync_done},
                "regions_copied": self.regions_copied,
                "c_writes": self._fan_writes + (self._fan.writes if self._fan else 0),
                "lag_acks": self.lag_acks,
                "legs": [{"index": ls.index, "spec": ls.spec, "state": ls.state,
                          "error": ls.error, "reads": ls.reads, "errors": ls.errors,
                          "lagging": bool(self._lag >> ls.index & 1),
                          "backlog": ls.backlog}
                         for ls in self._legs],
            }

    def close(self) -> None:
        """Stop the resync, drain the legs; with every leg in sync and flushed, clear the bitmap
        and write the clean flag (the next open then copies nothing). Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._resync_wake.set()
        if self._resync_thread is not None:
            self._resync_thread.join(30)
        if self._monitor is not None:
            self._monitor.join(30)
        clean = False
        try:
            # Clean: the in-sync legs agree everywhere (flushed, nothing in flight); the bitmap
            # is emptied only when no leg is out of sync (else it names what that leg misses).
            if any(ls.state == IN_SYNC for ls in self._legs):
                self.flush(every_leg=True)
                with self._lock:
                    clean = not self._writers
                    emptied = clean and all(ls.state == IN_SYNC for ls in self._legs)
                    if emptied:
                        self.bitmap[:] = bytes(len(self.bitmap))
                        self._last_write.clear()
                if emptied:
                    self._write_bitmap_all()
            with self._lock:
                self.generation += 1
            self._write_superblocks(clean=clean)
        except (OSError, QuorumLost) as exc:
            log.warning("mirror: close: %s (the next open resyncs what the bitmap names)", exc)
        finally:
            self._close_legs()

    def _close_legs(self) -> None:
        self._closed = self._closing = True
        self._resync_wake.set()
        for ls in self._legs:
            ls.callers.stop()
            if not self._stop_worker(ls) or ls.busy or ls.calls:
                log.warning("mirror: %s still in a call; left open", ls.name())
                continue  # closing it under the call is not safe
            if ls.leg is not None:
                with contextlib.suppress(OSError):
                    ls.leg.close()


class _LegTimeout(OSError):
    """A leg did not answer a direct call within ``leg_timeout`` (`Mirror._begin`)."""


class _Job:
    """One direct call of a leg's (`Mirror._begin`), run by whichever thread calls `run`;
    its caller waits for it with `wait`, until `deadline` (monotonic; None: no limit)."""

    def __init__(self, fn: Callable[[], Any], late: str, deadline: float | None) -> None:
        self.fn = fn
        self.late = late  # the timeout's message
        self.deadline = deadline
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            self.error = exc
        finally:
            self.fn = _nothing  # nothing of the call (its buffer) kept past its end
            self.done.set()

    def wait(self) -> Any:
        """The call's result, or its error; `_LegTimeout` once past the deadline (the call
        goes on: its result is dropped)."""
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if not self.done.wait(left):
            raise _LegTimeout(110, self.late)
        if self.error is not None:
            raise self.error
        return self.result


def _nothing() -> None:
    pass


class _Callers:
    """One leg's call threads: a direct call (a read, a superblock write, a resync copy)
    runs on one of them so that its caller can stop waiting (`Mirror._begin`). Started on
    demand (a new one when none is idle), daemon threads: one stuck in a silent leg's call
    never holds up the process's exit. Threads stay idle for the next call; `stop` ends the
    idle ones and the others when their call returns."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1  # that idle thread takes it
            else:
                self._threads += 1
                threading.Thread(target=self._loop, name=self.name, daemon=True).start()
            self._q.put(job)

    def _loop(self) -> None:
        name_os_thread()
        while True:
            job = self._q.get()
            if job is None:
                return
            job.run()
            del job
            with self._lock:
                self._idle += 1

    def stop(self) -> None:
        with self._lock:
            for _ in range(self._threads):
                self._q.put(None)
            self._threads = self._idle = 0


class _WriteOp:
    """One write (or flush) across the legs: acknowledged at `need` successes, finished when
    every leg answered (then its regions' in-flight counts drop)."""

    def __init__(self, mirror: Mirror, regions: range, kind: str = META,
                 nbytes: int = 0) -> None:
        self.m = mirror
        self.regions = regions
        self.kind = kind
        self.nbytes = nbytes
        #: legs that did it; they count once in sync (a resyncing leg may come in sync
        #: meanwhile) and only while in the same attachment: a leg failed since (its
        #: failure, or another's, not recorded) does not hold the write for us (`held`)
        self.succeeded: set[int] = set()
        self.left = 0
        self.need = 0
        self.error: OSError | None = None
        self.started = False
        self.seq = 0
        #: Legs that have not answered yet (a leg timed out is removed by the waiter).
        self.waiting: dict[int, _LegState] = {}
        self.deadline = 0.0
        self.id = id(self)
        #: Called (no lock held) when every leg answered and none failed.
        self.on_complete: Callable[[], None] | None = None
        #: What `wait` / `wait_all` sleep on (over the mirror's mutex): a leg's answer to this
        #: operation wakes this one waiter (`done`); `Mirror._wake_all` wakes it too.
        self.cond = threading.Condition(mirror._mutex)

    ok = 0

    def start(self, targets: list[_LegState], need: int) -> None:
        """Caller holds the mirror's lock."""
        self.left = len(targets)
        self.need = need
        self.started = True
        self.waiting = {ls.index: ls for ls in targets}
        timeout = self.m.cfg.leg_timeout
        now = time.monotonic()
        self.deadline = now + timeout if timeout > 0 else 0.0
        #: Until then a leg the quorum does not need is still waited for before it is made
        #: lagging (legs about as fast as each other do not take turns lagging)
        self.grace = now + LAG_GRACE
        self.in_sync = {ls.index for ls in targets if ls.state == IN_SYNC}
        self.attached = {ls.index: ls.attached for ls in targets}
        for ls in targets:
            ls.ops[self.id] = self
            ls.backlog += self.nbytes
        if self.regions:
            span = (self.regions[0] * self.m.region, (self.regions[-1] + 1) * self.m.region)
            for ls in targets:
                ls.pending[self.id] = span
        if not targets:
            self._finish()

    def abandon(self) -> None:
        with self.m._lock:
            if not self.started:
                self._finish()

    def _forget(self, ls: _LegState) -> None:
        """`ls` is done with this operation (answered or timed out). Caller holds the lock."""
        ls.pending.pop(self.id, None)
        if ls.ops.pop(self.id, None) is not None:
            ls.backlog -= self.nbytes

    def done(self, ls: _LegState, exc: OSError | None) -> None:
        with self.m._lock:
            self._forget(ls)
            caught_up = self.m._lag_check(ls)
            run = self._answer(ls, exc)
        if caught_up:
            self.m._extent_moved(1 << ls.index)
        if run is not None:
            run()

    def _answer(self, ls: _LegState, exc: OSError | None) -> Callable[[], None] | None:
        """`done`'s part under the lock: count `ls`'s answer; the callback to run then."""
        if self.waiting.pop(ls.index, None) is None:
            return None  # answered after its timeout: counted failed already
        if exc is None:
            self.succeeded.add(ls.index)
        elif exc is not None:
            self.error = exc
        self._one_less()
        return self.on_complete if self.left == 0 and self.error is None else None

    def _one_less(self) -> None:
        """A leg is done with this operation (answered or timed out): the last one finishes
        it; any other wakes its waiter, and a read waiting for the leg's pending writes
        (`Mirror._drain`). Caller holds the lock."""
        self.left -= 1
        if self.left == 0:
            self._finish()
        else:
            self.cond.notify_all()
            self.m._lock.notify_all()

    def _finish(self) -> None:
        for r in self.regions:
            n = self.m._writers.get(r, 0) - 1
            if n > 0:
                self.m._writers[r] = n
            else:
                self.m._writers.pop(r, None)
        self.m._lock.notify_all()  # the resync, writes waiting for its regions
        self.cond.notify_all()

    def _time_out(self) -> bool:
        """Caller holds the lock. Past the deadline, the legs that have not answered count as
        failed; each is marked out of sync and recorded on the others (rule 3) before this
        returns (the lock is released meanwhile). True if it did anything."""
        now = time.monotonic()
        if not self.deadline or not self.waiting or now < self.deadline:
            return False
        # a lagging leg is late only when stuck in a call (its queue is long by design)
        late = [ls for ls in self.waiting.values()
                if not self.m._lag >> ls.index & 1 or self.m._stuck(ls, now)]
        if not late:
            return False
        attached = {ls.index: ls.attached for ls in late}
        for ls in late:
            del self.waiting[ls.index]
            self._forget(ls)
            self.m._owed.add(ls.index)  # recorded before anyone acknowledges (rule 3)
        self.left -= len(late)
        self.error = OSError(110, f"mirror: no answer within {self.m.cfg.leg_timeout:g} s "
                             f"from {', '.join(ls.name() for ls in late)}")
        if self.left == 0:
            self._finish()
        self.m._lock.release()
        try:
            for ls in late:
                log.error("mirror: %s did not answer within %g s", ls.name(),
                          self.m.cfg.leg_timeout)
                self.m._fail_leg(ls, self.error, attached[ls.index])
        finally:
            self.m._lock.acquire()
        self.m._wake_all()
        return True

    def held(self) -> int:
        """Legs in sync now that did this operation (on the attachment it was queued on):
        a leg resyncing when it was queued counts once the resync marked it in sync, since
        it then holds every other acknowledged write too. Caller holds the lock."""
        legs = self.m._legs
        return sum(1 for i in self.succeeded
                   if legs[i].state == IN_SYNC and legs[i].attached == self.attached[i])

    def drop(self, ls: _LegState, exc: OSError) -> None:
        """`ls` timed out (`Mirror._reap`): this operation goes on without it. Caller holds
        the lock."""
        self._forget(ls)
        if self.waiting.pop(ls.index, None) is None:
            return
        self.error = exc
        self._one_less()

    def _sleep(self) -> None:
        """Wait for an answer (caller holds the lock), at most until the deadline (past it,
        50 ms: a lagging leg is timed out by its call's start, not the deadline)."""
        if self.deadline:
            left = self.deadline - time.monotonic()
            self.cond.wait(left + 0.001 if left > 0 else 0.05)
        else:
            self.cond.wait()

    def wait(self) -> None:
        """Rule 4: return once the quorum holds the write (``all``: once every leg answered,
        the failed ones recorded as out of sync; a number: once that many in-sync legs did,
        the others recorded as lagging, rule 4b); QuorumLost or the legs' error otherwise."""
        m = self.m
        try:
            with m._lock:
                m._waiters.add(self)
                try:
                    self._wait_quorum()
                finally:
                    m._waiters.discard(self)
        finally:
            if self.lag_started:  # before the acknowledgement, the lock released
                m._extent_moved(self.lag_started)

    #: Legs this write made lagging (`_wait_quorum`), for `Mirror._extent_moved`.
    lag_started = 0

    def _wait_quorum(self) -> None:
        """`wait`'s loop (caller holds the lock, and is among the mirror's waiters)."""
        m = self.m
        rounds = 0
        while True:
            m._reap()
            self._time_out()
            self.ok = self.held()
            if m.cfg.quorum:
                if self.ok >= self.need:
                    # in-sync legs not answered (a failing one answers once recorded; one
                    # resyncing at the start and in sync now is waited for, or lags, too)
                    missing = sum(1 << i for i in self.waiting
                                  if i in self.in_sync or m._legs[i].state == IN_SYNC)
                    blockers = missing & ~m._lag
                    if blockers and time.monotonic() >= self.grace \
                            and m._lag_budget(blockers):
                        m._lag |= blockers  # they become lagging (recorded below)
                        self.lag_started |= blockers
                        blockers = 0
                    if not blockers:
                        if missing and not m._record_lag(missing):
                            # the lock was released: count again (bounded: each round
                            # records the lag or fails a leg it could not write to)
                            rounds += 1
                            if rounds > len(m._legs) + 1:
                                raise QuorumLost("mirror: could not record which legs "
                                                 "lag")
                            continue
                        if self._record_pending():
                            continue
                        m.lag_acks += bool(missing)
                        self._acknowledged()
                        return
                    if time.monotonic() < self.grace:
                        self.cond.wait(max(0.0, self.grace - time.monotonic()) + 0.0005)
                        continue
                if self.left == 0:
                    raise QuorumLost(f"mirror: {self.ok} legs hold the write; the write "
                                     f"quorum is {self.need}")
            elif self.left == 0:
                if self._record_pending():
                    continue
                if self.ok == 0:
                    if not any(ls.state == IN_SYNC for ls in m._legs):
                        raise QuorumLost("mirror: no leg left in sync")
                    raise self.error or OSError(5, "mirror: no leg took the write")
                self._acknowledged()
                return
            self._sleep()

    def _acknowledged(self) -> None:
        """A write is acknowledged: the last leg standing, out of sync since, lacks it and is
        no longer one to bring back in sync (`Mirror.reattach`); a leg holding it that fails
        last takes its place (`_fail_leg`). Caller holds the lock (as when the states that
        let the write through were read: a failure recorded after this sets it again)."""
        if self.kind == WRITE:
            self.m._last_standing = None

    def _record_pending(self) -> bool:
        """Rule 3: while a leg's failure is not yet durable on the others (another thread is
        writing the record, or about to), wait a little and say so: the caller counts again
        (that record may fail more legs). Caller holds the lock."""
        m = self.m
        if not (m._recording or m._owed):
            return False
        self.cond.wait(0.05)
        return True

    def wait_all(self) -> None:
        """Until every leg answered or timed out (failures are the legs' own: they are marked
        failed)."""
        with self.m._lock:
            self.m._waiters.add(self)
            try:
                while self.left:
                    self.m._reap()
                    if self.left and not self._time_out():
                        self._sleep()
            finally:
                self.m._waiters.discard(self)

    @property
    def complete(self) -> bool:
        """Every leg answered and every one succeeded (caller holds the lock)."""
        return self.left == 0 and self.error is None


def read_superblock(leg: Leg) -> Superblock | None:
    """The superblock of `leg` (the newer valid slot of its last 8 KiB), None if it has none."""
    raw = bytearray(2 * SLOT)
    leg.read(leg.size - 2 * SLOT, memoryview(raw))
    found = [sb for sb in (Superblock.unpack(bytes(raw[:SLOT])),
                           Superblock.unpack(bytes(raw[SLOT:]))) if sb is not None]
    return max(found, key=lambda sb: sb.generation) if found else None


def wipe_superblocks(leg: Leg) -> None:
    """Erase `leg`'s superblocks (durably): it opens as a blank leg and gets a full copy."""
    leg.write(leg.size - 2 * SLOT, bytes(2 * SLOT), fua=True)


def checksum_regions(leg: Leg, size: int, region: int) -> list[int]:
    """CRC-32 of each region of `leg`'s data area (`tcmu-py mirror verify`)."""
    out = []
    buf = bytearray(region)
    for off in range(0, size, region):
        n = min(region, size - off)
        view = memoryview(buf)[:n]
        leg.read(off, view)
        out.append(zlib.crc32(view))
    return out


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll `pred` (every 10 ms) until true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return pred()
        time.sleep(0.01)
    return True


__all__ = ["Mirror", "MirrorConfig", "QuorumLost", "Superblock", "checksum_regions",
           "meta_length", "read_superblock", "wipe_superblocks"]
