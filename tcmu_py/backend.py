"""The block backend API: what a block handler implements, and what it may promise.

A block handler hands `BlockDevice` a *backend*, an object that moves bytes. `BlockBackend` is the
part every backend implements. Everything else is an optional *capability*: one of the
`typing.Protocol` classes below. A backend declares a capability by implementing every method of
its protocol (no base class needed; subclassing a protocol is allowed). Where a capability comes
with a *promise* that is a value (LBPRZ, unmap granularity), the backend states it as a class or
instance attribute of the documented type; an attribute left out takes the documented default.

The device reads the declaration once, when it is built (`Capabilities.of`), and advertises
exactly that; nothing is probed per command:

- `Unmap`: ``unmap(offset, length)``, with the promises ``lbprz``, ``unmap_granularity`` and
  ``unmap_granularity_alignment``. Advertised: UNMAP in REPORT SUPPORTED OPERATION CODES, LBPME
  and LBPRZ in READ CAPACITY(16), the unmap limits and granularity of VPD B0h, VPD B2h with LBPU,
  LBPWS, LBPWS10 and LBPRZ, and WRITE SAME with the UNMAP bit.
- `WriteSame`: ``write_same(offset, length, block, unmap)``. Advertised: nothing new (WRITE SAME
  is always served); the device hands the whole fill to the backend in one call.
- `LbaStatus`: ``lba_status(offset, length, *, max_runs)``. Advertised: GET LBA STATUS.
- `ThinProvisioning`: ``provisioning()``, ``set_soft_threshold(percent)``,
  ``take_threshold_event()``. Advertised: PROVISIONING TYPE 010b and a THRESHOLD EXPONENT in VPD
  B2h, log page 0Ch, mode page 1Ch/02h with a changeable soft threshold, SOFT THRESHOLD REACHED.
- `CopyRange`: ``copy_range(source, source_offset, offset, length)``. Advertised: nothing new
  (EXTENDED COPY is always served); the copy manager offers each segment to the destination's
  backend first, and moves the bytes itself when it declines.
- `Resizable`: ``resize(size)``. The device accepts a new size (TCMU reconfig) only with it.
- `Closable`: ``close()``. Called once when the device goes away.
- `FileExtent`: ``file_extent()``. Advertised: nothing; the data *is* a file extent, so the C
  data plane (`tcmu_py.ring.DataPlane`) moves plain READ/WRITE bytes between that file and the ring
  without calling `read` / `write`. With `ThinProvisioning` only as ``(fd, base, UnitMap)``:
  the plane then serves only commands whose every allocation unit is allocated. An `RbdExtent`
  (an RBD image) is served by the native loop through librbd's asynchronous C calls.
- ``blocking`` (`BlockBackend` attribute, default True): False runs every command on the
  device's loop thread instead of its worker pool.
- ``transfer_granularity`` (`BlockBackend` attribute, bytes, default 0 = not reported): the unit
  below which a transfer costs the backend more (a dedup chunk: a partial one is read, patched
  and rehashed). Advertised: OPTIMAL TRANSFER LENGTH GRANULARITY in VPD B0h.

A declaration the device cannot advertise as written is refused when the device is built, with a
`CapabilityError` naming the attribute: a promise of the wrong type, a promise without its
capability (``lbprz`` without ``unmap``), a capability half implemented (``provisioning`` without
``set_soft_threshold``), a capability that needs another one (`ThinProvisioning` without `Unmap`).
A subclass withdraws an inherited capability by setting its methods to None.

`tcmu_py.testing.check_block_handler` checks promises against behaviour: a backend whose unmapped
blocks read as zeros but which does not declare ``lbprz = True`` fails it, and so does one that
declares it falsely.

Threads, for every method here unless its protocol says otherwise: commands run on the device's
worker pool, several at once (or all on its one loop thread when ``blocking`` is False), so
methods must be thread-safe; the device serialises only what SCSI requires (COMPARE AND WRITE and
WRITE SAME against overlapping writes and unmaps). Offsets and lengths are in bytes, always whole
blocks. Errors: `ScsiError` for conditions with their own sense (e.g. `SpaceAllocationFailed`),
`OSError` for I/O failures (MEDIUM ERROR on reads, WRITE ERROR on writes; ENOSPC/EDQUOT become
SPACE ALLOCATION FAILED), anything else is a bug (HARDWARE ERROR, traceback logged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tcmu_py.errors import TcmuError
from tcmu_py.scsi.constants import ProvisioningType


class CapabilityError(TcmuError, TypeError):
    """A backend's declaration cannot be advertised as written (raised when the device is built).

    The message names the backend class, the attribute, what it holds and what was expected.
    """


@runtime_checkable
class BlockBackend(Protocol):
    """What every block backend implements.

    `size` and `block_size` are read once, when the device is built (`Resizable` changes the
    size later). `write_cache` is the flush promise: True when an acknowledged write may sit in a
    volatile cache until `flush` (the caching mode page then reports WCE=1, and the device calls
    `flush` for FUA writes and SYNCHRONIZE CACHE); False when every write is durable on return
    (WCE=0; `flush` is still called by SYNCHRONIZE CACHE and may do nothing).

    Optional attribute ``blocking: bool`` (default True): False promises that no method ever
    waits (memory-backed stores, /dev/null-like backends); the device then runs every command on
    its loop thread, one at a time, and skips the range lock for WRITE. A file backend can set it
    from `tcmu_py.handler.on_memory_filesystem`.
    """

    size: int
    block_size: int
    write_cache: bool

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill every byte of `bufs`, in order, with data from `offset`.

        The views are the ring's Data-In buffers: valid only until this call returns. On failure
        they may be partly filled; the device answers with sense and no data.
        """

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write all of `bufs`, in order, at `offset`; durable on return unless `write_cache`.

        The views are valid only until this call returns. On `OSError` a part may be written
        (SBC-4 allows it: the initiator sees WRITE ERROR and the range is indeterminate); raise a
        `ScsiError` such as `SpaceAllocationFailed` before writing anything.
        """

    def flush(self) -> None:
        """Make every acknowledged write (and unmap) durable. `OSError` -> WRITE ERROR."""


@runtime_checkable
class LostWrites(Protocol):
    """A backend whose acknowledged writes can be lost while it runs, before a flush made them
    durable, by something other than its own flush (a shared pool's commit that failed rolls
    back every disk's pending writes). SYNCHRONIZE CACHE asks after flushing, and answers
    WRITE ERROR if some were: as fsync(2) reports a write-back lost since the last one."""

    def lost_writes(self) -> str | None:
        """Why writes acknowledged since the last SYNCHRONIZE CACHE were lost, once (the next
        call says None unless more were lost); None if none were."""


@runtime_checkable
class Unmap(Protocol):
    """Deallocation: UNMAP, and WRITE SAME with the UNMAP bit (SBC-4 4.7, 5.32, 5.50).

    Promises, as attributes of the backend (bytes, multiples of the block size):

    - ``lbprz: bool = False`` -- after `unmap`, every byte of the range reads as zero (LBPRZ=1 in
      READ CAPACITY(16) and VPD B2h). Only then does the device deallocate for WRITE SAME with
      UNMAP and a zero block; otherwise it writes the zeros. Declare it whenever it is true:
      initiators (Linux ``sd``, mkfs) rely on it to skip zeroing.
    - ``unmap_granularity: int = block_size`` -- the unit the backend deallocates in (OPTIMAL
      UNMAP GRANULARITY, VPD B0h).
    - ``unmap_granularity_alignment: int = 0`` -- offset of the first whole granule (UNMAP
      GRANULARITY ALIGNMENT, VPD B0h); less than the granularity.
    """

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length); any range of whole blocks, aligned or not.

        With ``lbprz`` the whole range reads as zeros afterwards, including blocks of partial
        granules (zero them). On failure a part of the range may be deallocated, but every block
        reads either its old data or (with ``lbprz``) zeros. Runs under the device's range lock:
        no write to the range runs at the same time.
        """


@runtime_checkable
class WriteSame(Protocol):
    """A fill the backend does better than a loop of writes (WRITE SAME, SBC-4 5.50)."""

    def write_same(self, offset: int, length: int, block: bytes, unmap: bool) -> None:
        """Fill [offset, offset+length) with `block` (one logical block) repeated.

        `unmap` True allows deallocating instead of writing when `block` is all zeros. The device
        passes False: when the initiator allows it and the backend is `Unmap` with ``lbprz`` it
        calls `unmap` itself. Runs under the range lock. On failure a part may be filled.
        """


@runtime_checkable
class LbaStatus(Protocol):
    """Mapped/deallocated state of the LBAs (GET LBA STATUS, SBC-4 5.8)."""

    def lba_status(
        self, offset: int, length: int, *, max_runs: int
    ) -> Sequence[tuple[int, int, int]]:
        """Runs ``(offset, length, status)`` from `offset` (the first run starts there), in
        order, contiguous, at most `max_runs` of them; status 0 mapped, 1 deallocated, 2
        anchored. Reads only: no side effects, nothing partly done."""


@dataclass(frozen=True)
class ProvisioningInfo:
    """Thin provisioning figures a backend reports (bytes unless noted).

    The allocation unit is the `Unmap` promise ``unmap_granularity``; LBPRZ is ``lbprz``.
    """

    capacity: int  # physical capacity of the pool behind this device
    used: int  # allocated in the pool (all devices)
    device_used: int  # allocated for this device
    soft_threshold: int | None = None  # percent of capacity, or None
    #: Bytes the pool does not take thanks to deduplication (data mapped minus the distinct
    #: data) and to compression (distinct data minus what it takes stored); None: the backend
    #: does neither (log page 0Ch then has no 0100h/0101h/0102h parameters).
    deduplicated: int | None = None
    compressed: int | None = None


@runtime_checkable
class ThinProvisioning(Protocol):
    """A thin-provisioned backend: space is allocated on write from a resource that can run out
    (SBC-4 4.7.3.3). Needs `Unmap`.

    The device reports the figures in log page 0Ch and keeps one soft threshold on the used
    resource in mode page 1Ch/02h (changeable: MODE SELECT calls `set_soft_threshold`); a write
    that crosses it raises SOFT THRESHOLD REACHED (SBC-4 4.7.3.7), found by
    `take_threshold_event` after each write. Out of space: raise `SpaceAllocationFailed` (or
    OSError ENOSPC) from `write`.
    """

    def provisioning(self) -> ProvisioningInfo:
        """Current figures. Called on the loop thread (INQUIRY, MODE SENSE, LOG SENSE): cheap,
        no I/O that may wait."""

    def set_soft_threshold(self, percent: int | None) -> None:
        """MODE SELECT set the soft threshold to `percent` (1..100) of capacity, or disabled
        (None). Called on a worker thread; on failure nothing changed."""

    def take_threshold_event(self) -> bool:
        """True once per crossing of the soft threshold not reported yet. Called after every
        write, on the thread that ran it: must be cheap and thread-safe. A backend whose
        resource other devices share may also have an attribute ``threshold_listener``
        (None): the device sets it to a function that queues SOFT THRESHOLD REACHED for its
        next command, for the backend to call (holding none of its locks) when another
        device's write crossed the threshold and this one's event is thereby taken."""


@runtime_checkable
class CopyRange(Protocol):
    """An efficient copy into this backend from another one (EXTENDED COPY, SPC-4 6.3), e.g.
    ``os.copy_file_range`` between two image files, without the bytes passing through Python."""

    def copy_range(self, source: object, source_offset: int, offset: int, length: int) -> bool:
        """Copy `length` bytes at `source_offset` of backend `source` to `offset` of this one, and
        return True; or return False to decline (a source of another kind, ranges of one store
        that overlap), when the copy manager reads and writes the bytes itself. After a
        decline the range may be partly written: the copy manager writes all of it again.

        The result must be what reading the whole source range and then writing it gives
        (memmove), and durable on return unless `write_cache`. Called on a worker thread with
        the destination blocks' range lock held. `OSError` -> WRITE ERROR."""


@runtime_checkable
class Resizable(Protocol):
    """The backing store follows a change of the device size (TCMU reconfig)."""

    def resize(self, size: int) -> None:
        """Become `size` bytes (a multiple of the block size) long. Called on the daemon's thread
        while commands may run; on failure (raise) the device keeps its old size."""


@runtime_checkable
class Closable(Protocol):
    """The backend holds resources to release."""

    def close(self) -> None:
        """Release everything. Called once, after the last command of the device completed."""


@dataclass(frozen=True)
class UnitMap:
    """A thin backend's allocation map, shared with the C data plane: ``units[i]`` is nonzero
    when allocation unit ``i`` (bytes ``[i * unit, (i + 1) * unit)``, ``unit`` a multiple of the
    block size) is allocated. The plane reads it, never writes it; it serves a READ/WRITE only
    when every unit the command touches reads nonzero, and fences a command of the device off
    every unit it touches, not just its LBAs.

    The backend's contract: the `bytearray` is never resized (a new one comes with a new
    `file_extent`, after a change the device declares: resize); a unit is set only once its data
    is in the file (after an allocating write, never before); a unit is cleared *before* anything
    other than a command of this device (which its fence covers) deallocates it — `resize`, for
    instance, clears every unit before it truncates. A plane command already past its check when
    that happens is the same race a Python command racing a resize has."""

    unit: int
    units: bytearray


@dataclass(frozen=True)
class ReadExtent:
    """What `FileExtent.file_extent` returns for a backend whose *reads* are a file extent and
    whose writes are not (a mirror reads its local leg and writes every leg): the data plane
    then serves READ from ``fd`` at ``base`` and hands every WRITE to the backend. A WRITE
    fences the plane off its LBAs until it completes, so no C READ overtakes it; the backend's
    side of the contract is that every write it acknowledged is in ``fd`` by then, or that it
    has withdrawn the extent first (``extent_listener``, `FileExtent`)."""

    fd: int
    base: int


@dataclass(frozen=True)
class RbdExtent:
    """What `FileExtent.file_extent` returns for a backend whose data is an open RBD image: the
    native loop (`tcmu_py.ring.NativeLoop`, not the stage-1 `DataPlane`) then submits plain
    READ/WRITE to librbd itself (``rbd_aio_readv`` / ``rbd_aio_writev`` on the ring's buffers),
    and librbd's completion callback completes the command in C; a command that fails is handed
    to the backend's device, which runs it again and answers the sense. A FUA WRITE with
    `write_cache` goes to the device (it flushes after the write).

    Every field is a C address, as an int: ``image`` the ``rbd_image_t``, the others librbd's
    functions of those names (``int(ffi.cast("uintptr_t", lib.rbd_aio_readv))`` of an ABI-mode
    cffi ``dlopen``): `tcmu_py` does not link librbd. The backend's side of the contract: the
    image stays open while the extent is declared and until the runner stopped (the loop waits
    for every operation it submitted before `enable(False)` and `stop()` return), and it
    withdraws the extent (returns None, calls ``extent_listener``) whenever the device must
    not be served from it (the exclusive lock is another client's)."""

    image: int
    create_completion: int
    aio_readv: int
    aio_writev: int
    aio_get_return_value: int
    aio_release: int


@dataclass(frozen=True)
class NbdFunctions:
    """Addresses (ints) of libnbd's functions of these names, from the caller's dlopen."""

    aio_pwrite: int
    aio_get_fd: int
    aio_get_direction: int
    aio_notify_read: int
    aio_notify_write: int
    close: int


class FanOutRegions(Protocol):
    """A mirror's write-intent regions shared with the native loop (`FanOutExtent`). A region
    is *armed* when the backend knows its bit is set and durable on every leg: C writes only
    there. C marks each region it writes with the current *epoch*; the backend starts a new
    one when a flush starts, and clears a region's bit only after `disarm` said C did not
    write it since (and disarmed it)."""

    def arm(self, lo: int, hi: int) -> None:
        """Regions `lo` to `hi` (inclusive) may be written by C."""

    def epoch(self) -> int:
        """Start a new epoch and return it."""

    def disarm(self, r: int, epoch: int) -> bool:
        """True, and `r` disarmed, when no C write touched `r` in `epoch` or later and none is
        in flight there; else False and nothing changed."""

    def armed(self, r: int) -> bool: ...

    @property
    def writes(self) -> int:
        """Writes C made through these regions."""


class FanOutWriter(Protocol):
    """One NBD export on a connection of its own, on which the native loop sends writes and
    whose C thread answers them; a write not answered in time kills it (`dead`): its writes
    go to the backend."""

    @property
    def dead(self) -> bool: ...

    def close(self) -> None:
        """Stop, and close the connection. No declared extent may name it any more."""


class ChunkTable(Protocol):
    """Where a dedup disk's chunks lie, shared with the native loop (`ChunkExtent`): a bounded
    table from a chunk index to (container fd, byte offset) of the chunk's stored bytes, or to
    zeros. The loop serves a READ when every chunk it touches has an entry. Thread-safe; each
    call returns once no READ uses what it replaced."""

    def set(self, idx: Sequence[int], fds: Sequence[int], offs: Sequence[int]) -> None:
        """Chunk ``idx[k]`` lies at byte ``offs[k]`` of ``fds[k]``; fd -1: it reads as zeros;
        -2: forget it. An entry naming a write journal's record is left as it is (the record is
        newer than anything the index knows: `set_journal`)."""

    def set_journal(self, idx: Sequence[int], offs: Sequence[int], fd: int, seq: int) -> None:
        """Chunk ``idx[k]`` lies at byte ``offs[k]`` of the write journal `fd`, in record
        `seq`; unless its entry names a newer record."""

    def set_drained(self, idx: Sequence[int], fds: Sequence[int], offs: Sequence[int],
                    seq: int) -> None:
        """Record `seq`'s chunk ``idx[k]`` now lies at ``offs[k]`` of ``fds[k]`` in the index
        (-1 zeros, -2 forget); unless its entry names a newer record."""

    def clear(self) -> None:
        """Forget every entry."""

    def drop_fd(self, fd: int) -> None:
        """Forget the entries naming `fd` (before it is closed)."""

    @property
    def hits(self) -> int:
        """READs the loop served from the table."""

    @property
    def misses(self) -> int:
        """READs it found an entry missing for (served by the backend instead)."""


class JournalLease(Protocol):
    """A dedup pool's write journal's lease to the native loops of its disks
    (`ChunkExtent.lease`; `struct tcmu_py_jl` in _ring.h): while granted, a loop appends a plain
    WRITE of whole chunks (write cache on, no FUA) to the journal itself as one record in
    [pos, end), numbered from `seq`, of at most `budget` bytes of chunks in all, points the
    disk's chunk table at it and completes it; the journal learns of each record from `take`.
    Thread-safe."""

    def grant(self, pos: int, end: int, seq: int, epoch: int, budget: int,
              max_record: int) -> None:
        """Start a lease (ending any earlier one)."""

    def revoke(self) -> None:
        """End the lease; when this returns no append is under way and none starts."""

    def take(self) -> list[tuple[int, int, int, int, int, bool]]:
        """The records appended since the last call, oldest first, as (seq, pos, disk, first
        chunk, count, failed)."""

    @property
    def appends(self) -> int:
        """WRITEs the loops appended."""

    @property
    def declined(self) -> int:
        """WRITEs of whole chunks offered while a lease was active and sent to the backend."""


@dataclass(frozen=True)
class NativeKit:
    """What the device gives a backend that has a ``native_kit`` attribute (None) when a native
    loop serves it, to build its extent with: for a mirror's `FanOutExtent`,
    ``regions(region_bytes, n)`` makes a `FanOutRegions` and ``nbd_writer(handle, functions,
    timeout)`` a `FanOutWriter` owning the libnbd handle at address ``handle`` (an int;
    `NbdFunctions`), `timeout` seconds per write (0: none); for a dedup disk's `ChunkExtent`,
    ``chunk_table(chunk_bytes, slots)`` makes a `ChunkTable` of `slots` entries (a power of
    two), and ``journal_lease(fd, chunk_bytes)`` a `JournalLease` for a pool's write journal
    open as `fd`."""

    regions: Callable[[int, int], FanOutRegions]
    nbd_writer: Callable[[int, NbdFunctions, float], FanOutWriter]
    chunk_table: Callable[[int, int], ChunkTable]
    journal_lease: Callable[[int, int], JournalLease] | None = None


@dataclass(frozen=True)
class ChunkExtent:
    """What `FileExtent.file_extent` returns for a dedup disk: the native loop serves a plain
    READ itself when `table` knows where every chunk it touches lies (LBA ``n`` is byte
    ``n * block_size`` of the disk), reading the containers straight into the command's
    buffers; every other command, WRITEs included, goes to the backend, whose fence keeps the
    loop's READs off its LBAs until it completes.

    The backend's side: an entry names the chunk's current bytes. Before it acknowledges a
    command that changes a chunk, before the bytes an entry names may change (a rollback, a
    container compacted away) and before it closes an fd an entry names, it sets or forgets
    those entries. A change to part of a chunk leaves the rest of the chunk's bytes where the
    old entry says until then, so a READ of the other blocks racing it reads right.

    With `lease` (the pool's write journal's, `JournalLease`), the loop also appends WRITEs of
    whole chunks to the journal itself while the lease allows, as records of disk `disk`."""

    table: ChunkTable
    lease: JournalLease | None = None
    disk: int = 0


@dataclass(frozen=True)
class FanOutExtent:
    """What `FileExtent.file_extent` returns for a mirror whose writes C may make itself: READs
    from ``fd`` at ``base`` (as with a `ReadExtent`), and a plain WRITE of regions `regions`
    has armed written by the native loop to every leg — ``pwritev`` to each of ``fds`` (at
    ``base`` too) and a write through each of ``nbd`` (`FanOutWriter`) — and
    completed GOOD once every leg took it; a write any leg failed goes to the backend, which
    writes it again and decides. Other WRITEs (a region not armed, FUA with `write_cache`) go
    to the backend. The stage-1 `DataPlane` takes it as a `ReadExtent`.

    The backend's side: ``fds`` and ``nbd`` are every leg of the mirror, all in sync, for as
    long as the extent is declared (it withdraws the extent, ``extent_listener``, before that
    changes); a region is armed only while its write-intent bit is set and durable on every
    leg, and its bit cleared only after `FanOutRegions.disarm` said so."""

    fd: int
    base: int
    fds: tuple[int, ...]
    nbd: tuple[FanOutWriter, ...]
    regions: FanOutRegions


@runtime_checkable
class FileExtent(Protocol):
    """The device's blocks are bytes of one open file: LBA ``n`` is at ``base + n * block_size``
    of ``fd``, and `read` / `write` do nothing but ``preadv`` / ``pwritev`` there (a short read
    past the end of the file may zero-fill: the data plane hands such a command back to the
    device, which then calls `read`).

    With it the C data plane serves READ/WRITE(6/10/12/16) itself (FUA with ``fdatasync`` when
    `write_cache`); every other command, and any of those whose I/O fails or comes up short,
    still reaches the backend's methods. The device fences the data plane off the LBAs of every
    command it runs (WRITE SAME, UNMAP, COMPARE AND WRITE, a slow write), so the backend's own
    methods never see a C write overtake or tear theirs.
    """

    def file_extent(
        self,
    ) -> (tuple[int, int] | tuple[int, int, UnitMap] | ReadExtent | FanOutExtent | RbdExtent
          | ChunkExtent | None):
        """``(fd, base)`` now — ``(fd, base, UnitMap)`` for a thin backend, whose unallocated
        units stay with `read` / `write`; a `ReadExtent` when only reads are; a `FanOutExtent`
        when reads are and writes go to every leg; an `RbdExtent`
        for an RBD image, or a `ChunkExtent` for a dedup disk's reads, served by the native
        loop only — or None when
        the data is not a plain extent (any more). Called on the loop thread when the device
        is built and after each change the device knows of (resize); the fd must stay open
        until `close`.

        A backend whose extent changes on its own (a mirror's local leg fails, lags or comes
        back in sync) also has an attribute ``extent_listener`` (None): the device sets it to a
        callable, which the backend calls, from any thread, after each such change and before
        it matters (before acknowledging a write the old extent lacks, before closing its
        fd). When it returns, the plane no longer touches the old extent; it asks
        `file_extent` again before it serves anything more."""


#: The optional capabilities, in the order they are checked.
CAPABILITIES: tuple[type, ...] = (
    Unmap,
    WriteSame,
    LbaStatus,
    ThinProvisioning,
    CopyRange,
    Resizable,
    Closable,
    FileExtent,
    LostWrites,
)

#: Promise attributes: name -> (type, the capability it belongs to or None for BlockBackend).
PROMISES: dict[str, tuple[type, type | None]] = {
    "lbprz": (bool, Unmap),
    "unmap_granularity": (int, Unmap),
    "unmap_granularity_alignment": (int, Unmap),
    "blocking": (bool, None),
    "transfer_granularity": (int, None),
}


def _methods(proto: type) -> list[str]:
    return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]


def _declares(backend: object, proto: type) -> bool:
    """Whether `backend` implements `proto`: all its methods or none (None counts as absent)."""
    names = _methods(proto)
    present = [n for n in names if getattr(backend, n, None) is not None]
    kind = type(backend).__name__
    for n in present:
        value = getattr(backend, n)
        if not callable(value):
            raise CapabilityError(
                f"backend {kind}: {n}: got {value!r}, expected a method "
                f"(tcmu_py.backend.{proto.__name__})"
            )
    if present and len(present) < len(names):
        missing = [n for n in names if n not in present]
        raise CapabilityError(
            f"backend {kind}: implements {', '.join(present)} but not {', '.join(missing)}: "
            f"expected all of {proto.__name__} ({', '.join(names)}) or none"
        )
    return bool(present)


def _typed(backend: object, name: str, typ: type, default: Any) -> Any:
    value = getattr(backend, name, default)
    # bool is an int subclass: neither stands for the other here.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CapabilityError(
            f"backend {type(backend).__name__}: {name}: got {value!r} "
            f"({type(value).__name__}), expected {typ.__name__}"
        )
    return value


@dataclass(frozen=True)
class Capabilities:
    """What one backend declares, checked and resolved once (`Capabilities.of`).

    Each capability is the backend itself, typed as its protocol, or None when not declared;
    the promises are plain values with their defaults filled in.
    """

    unmap: Unmap | None
    lbprz: bool
    unmap_granularity: int
    unmap_granularity_alignment: int
    write_same: WriteSame | None
    lba_status: LbaStatus | None
    thin: ThinProvisioning | None
    copy_range: CopyRange | None
    resize: Resizable | None
    close: Closable | None
    blocking: bool
    transfer_granularity: int = 0
    file_extent: FileExtent | None = None
    lost_writes: LostWrites | None = None

    @property
    def provisioning_type(self) -> ProvisioningType:
        """B2h PROVISIONING TYPE: thin with `ThinProvisioning`, else 000b (not reported)."""
        return ProvisioningType.THIN if self.thin is not None else ProvisioningType.FULL

    @classmethod
    def of(cls, backend: object) -> Capabilities:
        """Check `backend` against `BlockBackend`, its capabilities and promises, and resolve
        them. Raises `CapabilityError` naming the first attribute that cannot be advertised."""
        kind = type(backend).__name__
        for name in _methods(BlockBackend):
            if not callable(getattr(backend, name, None)):
                raise CapabilityError(
                    f"backend {kind}: {name}: missing, expected a method (BlockBackend)"
                )
        size = _typed(backend, "size", int, None)
        block_size = _typed(backend, "block_size", int, None)
        _typed(backend, "write_cache", bool, None)
        if block_size <= 0 or size < 0:
            raise CapabilityError(
                f"backend {kind}: size {size}, block_size {block_size}: expected a positive "
                "block size and a size of zero or more"
            )
        declared = {proto: _declares(backend, proto) for proto in CAPABILITIES}
        for name, (_, needs) in PROMISES.items():
            if needs is not None and not declared[needs] and hasattr(backend, name):
                raise CapabilityError(
                    f"backend {kind}: {name}: declared without {needs.__name__} "
                    f"({', '.join(_methods(needs))}); expected no {name}, or the capability"
                )
        if declared[ThinProvisioning] and not declared[Unmap]:
            raise CapabilityError(
                f"backend {kind}: implements ThinProvisioning but not Unmap (unmap): the device "
                "advertises provisioning (VPD B2h) only for a backend that can deallocate"
            )
        granularity = _typed(backend, "unmap_granularity", int, block_size)
        alignment = _typed(backend, "unmap_granularity_alignment", int, 0)
        if granularity <= 0 or granularity % block_size:
            raise CapabilityError(
                f"backend {kind}: unmap_granularity: got {granularity}, expected a positive "
                f"multiple of the block size {block_size}"
            )
        if alignment < 0 or alignment % block_size or alignment >= granularity:
            raise CapabilityError(
                f"backend {kind}: unmap_granularity_alignment: got {alignment}, expected a "
                f"multiple of the block size {block_size} below unmap_granularity {granularity}"
            )
        transfer = _typed(backend, "transfer_granularity", int, 0)
        if transfer < 0 or transfer % block_size:
            raise CapabilityError(
                f"backend {kind}: transfer_granularity: got {transfer}, expected 0 (not "
                f"reported) or a positive multiple of the block size {block_size}"
            )
        return cls(
            unmap=backend if declared[Unmap] and isinstance(backend, Unmap) else None,
            lbprz=_typed(backend, "lbprz", bool, False),
            unmap_granularity=granularity,
            unmap_granularity_alignment=alignment,
            write_same=backend if declared[WriteSame] and isinstance(backend, WriteSame) else None,
            lba_status=backend if declared[LbaStatus] and isinstance(backend, LbaStatus) else None,
            thin=backend
            if declared[ThinProvisioning] and isinstance(backend, ThinProvisioning)
            else None,
            copy_range=backend
            if declared[CopyRange] and isinstance(backend, CopyRange)
            else None,
            resize=backend if declared[Resizable] and isinstance(backend, Resizable) else None,
            close=backend if declared[Closable] and isinstance(backend, Closable) else None,
            blocking=_typed(backend, "blocking", bool, True),
            transfer_granularity=transfer,
            file_extent=backend
            if declared[FileExtent] and isinstance(backend, FileExtent)
            else None,
            lost_writes=backend
            if declared[LostWrites] and isinstance(backend, LostWrites)
            else None,
        )
