"""The TCMU command ring: dequeue SCSI commands, complete them out of order.

Facts about the TCMU ring
=========================

The kernel (drivers/target/target_core_user.c) and userspace share one mapping of
``/dev/uioN``: a 128-byte mailbox, the command ring (``cmdr_size`` bytes from
``cmdr_off``), then the data area. Offsets inside entries (``cdb_off``, ``iov_base``)
count from the start of the mapping, not of the ring or the entry.

- The kernel is the only producer. It writes a whole entry, then publishes it by storing
  ``cmd_head`` with release ordering; we load ``cmd_head`` with acquire ordering before
  reading anything the kernel wrote.
- Entries are 8-byte aligned and never wrap: when one does not fit before the end of the
  ring the kernel first writes a PAD entry covering the rest, then starts at offset 0.
- A command entry is ``max(48 + 16 * iovecs, 112) + roundup(cdb_len, 8)`` bytes, the CDB
  right after the iovec array, ``cdb_len`` as the kernel's ``scsi_command_size()``
  computes it (see :func:`scsi_command_size`).
- Data buffers live in the data area in blocks of ``data_pages_per_blk`` pages. An iovec
  spans consecutive blocks; a command usually has several. For BIDI commands
  ``iov_bidi_cnt`` Data-In iovecs follow the ``iov_cnt`` Data-Out ones. Touching data-area
  bytes that belong to no in-flight command kills the process with SIGBUS, because the
  kernel unmaps freed blocks: so the memoryviews of a command die with its completion.
- TMR entries (only with the device attribute ``tmr_notification=1``) list the cmd_ids a
  task management function aborted. They are information only: every aborted command
  still needs its normal completion, and the TMR slot itself is just stepped over. A TMR
  may name a command userspace completed that the kernel has not reaped yet (its response
  sits between the last reap and ``cmd_tail``); once reaped, its id is free and the next
  command can get it — even one queued after the TMR entry and dequeued in the same pass.
- Userspace owns ``cmd_tail``. The kernel reaps slots strictly in ring order from its
  private copy up to ``cmd_tail``, skipping PAD and TMR slots, and finds each command by
  the ``cmd_id`` *it reads in the slot*. Completing out of order therefore means "slot
  stealing": the response of whichever command finished goes into the oldest unreaped
  CMD slot, whose own command stays in flight (its CDB and iovecs were copied out at
  dequeue). The response overlays the request: ``scsi_status`` @8, ``read_len`` @12,
  ``sense_buffer[96]`` @16.
- ``cmd_tail`` is stored with release ordering after the response bytes, and the kernel
  only looks at it when userspace writes 4 bytes to the uio fd ("kick"): once per batch.
- ``TCMU_UFLAG_READ_LEN`` + ``read_len`` reports a short Data-In transfer; the kernel
  honours it only for Data-In (not BIDI) commands and only when ``read_len`` is non-zero
  (0 means "the whole buffer"). With CHECK CONDITION plus READ_LEN both the data and the
  sense reach the initiator (tape short reads).
- A ``cmd_id`` the kernel does not know at the tail marks the device broken until
  ``action/reset_ring``; a ring that still holds unreaped entries when we attach can only
  be recovered the same way (slot stealing leaves no record of which slot holds whom).
  The reset completes every command on the ring with BUSY (1) or CHECK CONDITION (2), sets
  cmd_head = cmd_tail = 0 and at once queues the commands that were waiting for space, so
  a fresh ring may already hold entries from offset 0.
- An entry with an opcode we do not know gets ``TCMU_UFLAG_UNKNOWN_OP`` and is stepped
  over like a PAD.

Checked against Debian's Linux 6.1 in the VM lab (a RAM disk served through tcm_loop): dd
and fio (randrw, queue depth 32, crc32c verify) with every batch completed in shuffled
order, a READ_LEN short read (sg_raw received exactly read_len bytes), and a LUN RESET that
arrived as a TMR entry naming the one command held back.

Theory of operation: :class:`Ring` keeps a consumer cursor. :meth:`Ring.dequeue` makes one
C call that walks from the cursor to ``cmd_head`` and returns descriptors; Python then
copies each CDB and slices memoryviews for the iovecs (no payload copy).
:meth:`Ring.complete` (or :meth:`Ring.complete_many`) makes one C call that writes the
response into the tail slot and advances ``cmd_tail``. A Ring is not thread-safe: calls
must be serialised (one thread, or one lock around every call).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

from tcmu_py import _sources, _tcmu_ring
from tcmu_py._tcmu_ring import ffi, lib
from tcmu_py.errors import RingError


def check_binding(directory: str = os.path.dirname(os.path.abspath(__file__))) -> None:
    """Refuse (ImportError) a compiled binding built from other sources than those in
    `directory` (see `tcmu_py._sources`); nothing to check when the sources are not there."""
    want = _sources.digest(directory)
    if want is None:
        return
    try:
        have = ffi.string(lib.tcmu_py_source_digest()).decode()
    except AttributeError:  # built before the digest existed
        have = "none"
    if have != want:
        raise ImportError(
            f"tcmu_py: the compiled ring binding {_tcmu_ring.__file__} was built from other "
            f"sources than {directory} (digest {have}, sources {want}): "
            "rebuild it with `python -m pip install --no-deps -e .` in the project (the test "
            "command, bash .ci/run, does it too)"
        )


check_binding()

__all__ = [
    "CMD_ENTRY_SIZE",
    "MAILBOX_SIZE",
    "SENSE_BUFFERSIZE",
    "Completion",
    "DataPlane",
    "MailboxFlag",
    "Ring",
    "RingCommand",
    "RingOp",
    "RingTmr",
    "TmrType",
    "UFlag",
    "command_entry_size",
    "scsi_command_size",
]

# --- Layout of <linux/target_core_user.h>, for code that must not need the C binding (the
# fake kernel). tests/unit/test_ffi_offsets.py checks each against the compiled header.

MAILBOX_VERSION = 2
MB_VERSION = 0  # u16 struct tcmu_mailbox.version
MB_FLAGS = 2  # u16 .flags
MB_CMDR_OFF = 4  # u32 .cmdr_off
MB_CMDR_SIZE = 8  # u32 .cmdr_size
MB_CMD_HEAD = 12  # u32 .cmd_head (kernel)
MB_CMD_TAIL = 64  # u32 .cmd_tail (userspace; own cacheline)
MAILBOX_SIZE = 128  # sizeof(struct tcmu_mailbox) == the kernel's CMDR_OFF

HDR_LEN_OP = 0  # u32 struct tcmu_cmd_entry_hdr.len_op: length | opcode (low 3 bits)
HDR_CMD_ID = 4  # u16 .cmd_id
HDR_KFLAGS = 6  # u8 .kflags
HDR_UFLAGS = 7  # u8 .uflags
HDR_SIZE = 8
OP_MASK = 0x7
OP_ALIGN_SIZE = 8  # TCMU_OP_ALIGN_SIZE

REQ_IOV_CNT = 8  # u32 struct tcmu_cmd_entry.req.iov_cnt
REQ_IOV_BIDI_CNT = 12  # u32 .req.iov_bidi_cnt
REQ_IOV_DIF_CNT = 16  # u32 .req.iov_dif_cnt
REQ_CDB_OFF = 24  # u64 .req.cdb_off (mapping-relative)
REQ_IOV = 48  # struct iovec .req.iov[]: {u64 iov_base (mapping-relative), u64 iov_len}
IOVEC_SIZE = 16
RSP_SCSI_STATUS = 8  # u8 .rsp.scsi_status
RSP_READ_LEN = 12  # u32 .rsp.read_len
RSP_SENSE = 16  # .rsp.sense_buffer[96]
SENSE_BUFFERSIZE = 96  # TCMU_SENSE_BUFFERSIZE
CMD_ENTRY_SIZE = 112  # sizeof(struct tcmu_cmd_entry)

TMR_TYPE = 8  # u8 struct tcmu_tmr_entry.tmr_type
TMR_CMD_CNT = 12  # u32 .cmd_cnt
TMR_CMD_IDS = 32  # u16 .cmd_ids[]
TMR_ENTRY_SIZE = 32  # sizeof(struct tcmu_tmr_entry)


class RingOp(IntEnum):
    """`enum tcmu_opcode`: the low 3 bits of an entry's ``len_op``."""

    PAD = 0
    CMD = 1
    TMR = 2


class UFlag(IntEnum):
    """Flags userspace sets in ``hdr.uflags``."""

    UNKNOWN_OP = 0x1
    READ_LEN = 0x2
    KEEP_BUF = 0x4


class MailboxFlag(IntEnum):
    """Capabilities the kernel advertises in ``mailbox.flags`` (Linux 6.1 sets all four)."""

    CAP_OOOC = 1 << 0
    CAP_READ_LEN = 1 << 1
    CAP_TMR = 1 << 2
    CAP_KEEP_BUF = 1 << 3


class TmrType(IntEnum):
    """``tcmu_tmr_entry.tmr_type`` (TCMU_TMR_*)."""

    UNKNOWN = 0
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    LUN_RESET_PRO = 128  # pseudo reset after PERSISTENT RESERVE OUT


_CDB_SIZE_BY_GROUP = (6, 10, 10, 12, 16, 12, 10, 10)
_VARIABLE_LENGTH_CMD = 0x7F


def scsi_command_size(cdb: bytes | bytearray | memoryview) -> int:
    """CDB length exactly as the kernel's ``scsi_command_size()`` computes it.

    Opcode group (top 3 bits) → 6, 10, 10, 12, 16, 12, 10, 10 bytes; opcode 7Fh (variable
    length, SPC-5 4.2.3) → 8 + ADDITIONAL CDB LENGTH (byte 7). Needs ``cdb[0]`` (and
    ``cdb[7]`` for 7Fh).
    """
    if cdb[0] == _VARIABLE_LENGTH_CMD:
        return 8 + cdb[7]
    return _CDB_SIZE_BY_GROUP[cdb[0] >> 5]


def command_entry_size(iov_count: int, cdb_len: int) -> int:
    """Bytes the kernel's ``queue_cmd_ring`` gives a CMD entry with ``iov_count`` iovecs."""
    base = max(REQ_IOV + IOVEC_SIZE * iov_count, CMD_ENTRY_SIZE)
    return base + -(-cdb_len // OP_ALIGN_SIZE) * OP_ALIGN_SIZE


@dataclass(slots=True)
class RingCommand:
    """A SCSI command taken off the ring.

    ``data_out`` / ``data_in`` are memoryviews of the shared mapping (no copy). For a
    non-BIDI command the kernel gives one iovec list whose direction only the CDB tells, so
    ``data_out`` and ``data_in`` are the *same list object*. For a BIDI command
    ``data_out`` holds the first ``iov_cnt`` iovecs and ``data_in`` the ``iov_bidi_cnt``
    that follow. The views must not be used after the command is completed: the kernel
    frees (and may unmap) its data blocks then.
    """

    cmd_id: int
    cdb: bytes
    data_out: list[memoryview]
    data_in: list[memoryview]
    #: Total bytes of `data_out` / `data_in` (the iovec lengths, summed once at dequeue).
    out_len: int
    in_len: int
    #: `time.monotonic()` when the runner took it (for latency figures); 0.0 until then.
    started: float = 0.0
    #: The errno a native loop's own attempt at it failed with (librbd's), 0 if none: the
    #: loop hands such a command to Python, whose answer may rest on it (`Command`).
    native_error: int = 0
    #: A native loop's RBD job that failed and was handed over (its I/O tried, not
    #: answered): it comes before the commands the loop handed while it ran, which wait for
    #: it (D124).
    retried: bool = False
    #: `time.monotonic()` when C dequeued it (CLOCK_MONOTONIC, the clock of both): a native
    #: loop's hand-off reaches Python later, by as long as a loaded machine takes to wake
    #: Python's thread, and the kernel's ``cmd_time_out`` runs from about here.
    arrived: float = 0.0


@dataclass(slots=True)
class RingTmr:
    """A task management notification: ``cmd_ids`` were aborted (they still need a completion).

    ``live_ids``: those of ``cmd_ids`` still in flight (dequeued, not completed) at the TMR's
    place in the ring. The others were completed before the kernel reaped them; their ids may
    already belong to commands queued after the TMR entry (the kernel reuses the lowest free
    id), so they name nothing that can still be aborted.
    """

    tmr_type: int
    cmd_ids: list[int]
    live_ids: list[int] = field(default_factory=list)


class Completion(NamedTuple):
    """One response for :meth:`Ring.complete_many`; fields as for :meth:`Ring.complete`.

    A NamedTuple (cheap to build in the completion hot path); plain tuples work too.
    """

    cmd_id: int
    status: int
    sense: bytes = b""
    read_len: int | None = None


_ERRORS = {
    lib.TCMU_PY_E_MAILBOX: "mailbox inconsistent with the mapping (version, cmdr_off, cmdr_size)",
    lib.TCMU_PY_E_HEAD: "cmd_head/cmd_tail outside the ring or not 8-byte aligned",
    lib.TCMU_PY_E_ENTRY: "malformed entry length (zero, crossing the ring end or cmd_head)",
    lib.TCMU_PY_E_CDB: "CDB offset/length outside its entry",
    lib.TCMU_PY_E_IOV: "iovec outside the data area or too many iovecs for the entry",
    lib.TCMU_PY_E_TMR: "TMR entry too short for its cmd_cnt",
    lib.TCMU_PY_E_NOSLOT: "no command slot between cmd_tail and the cursor",
    lib.TCMU_PY_E_SENSE: "sense data longer than 96 bytes",
}

# struct tcmu_py_entry (_ring.h): cdb_off, array_off, offset, length, op, cmd_id, iov_cnt,
# iov_bidi_cnt, cdb_len, reserved, error, retried, arrived_ns. tests/unit/test_ffi_offsets.py
# checks it.
_ENTRY = struct.Struct("=QQ10IQ")
_IOVEC = struct.Struct("<QQ")
# struct tcmu_py_rsp: cmd_id, scsi_status, sense_len, has_read_len, read_len, sense[96]
_RSP = struct.Struct("=5I96s")
_OP_CMD = int(RingOp.CMD)
_iov_structs: dict[int, struct.Struct] = {}
_id_structs: dict[int, struct.Struct] = {}


def _iov_struct(count: int) -> struct.Struct:
    s = _iov_structs.get(count)
    if s is None:
        s = _iov_structs[count] = struct.Struct(f"<{2 * count}Q")
    return s


def _id_struct(count: int) -> struct.Struct:
    s = _id_structs.get(count)
    if s is None:
        s = _id_structs[count] = struct.Struct(f"<{count}H")
    return s


class Ring:
    """The userspace side of one TCMU command ring over a shared mapping.

    ``buf`` is any writable buffer holding the whole mapping (the uio ``mmap``, or the
    ``bytearray`` of a :class:`tcmu_py.testing.FakeKernel`). The first :meth:`dequeue`
    starts at ``cmd_tail``. Entries between ``cmd_tail`` and ``cmd_head`` at attach time are
    only safe to take after ``action/reset_ring`` (which leaves fresh commands from the
    kernel's wait queue there): pass ``adopt=True`` then. Without it such a ring raises
    :class:`RingError`, because a previous user that completed out of order leaves slots
    that no longer say which commands are still in flight.
    Not thread-safe: serialise all calls (one thread or one lock). Call :meth:`close`
    before closing the mapping.
    """

    def __init__(self, buf: Any, *, adopt: bool = False, batch: int = 256) -> None:
        mv = memoryview(buf)
        if mv.readonly or mv.ndim != 1 or mv.itemsize != 1:
            raise RingError("the ring mapping must be a writable, flat byte buffer")
        self._mv = mv.cast("B") if mv.format != "B" else mv
        self._cbuf = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        self._ctx = ffi.new("struct tcmu_py_ring *")
        self._batch = batch
        self._entries = ffi.new("struct tcmu_py_entry[]", batch)
        self._entries_raw = ffi.buffer(self._entries)
        self._in_flight: set[int] = set()
        #: The native loop thread that owns the consumer side (`NativeLoop`), or None.
        self._loop: Any = None
        try:
            self._check(lib.tcmu_py_ring_init(self._ctx, self._cbuf, len(self._mv)))
            head = lib.tcmu_py_load_head(self._ctx)
            if head != self._ctx.cursor and not adopt:
                raise RingError(
                    f"the ring holds unreaped entries (cmd_tail={self._ctx.cursor}, "
                    f"cmd_head={head}): a previous user may have completed some out of order;"
                    " reset it ('echo 1 > .../action/reset_ring'), then attach with adopt=True"
                )
        except RingError:
            self.close()
            raise

    # --- introspection

    @property
    def cmdr_size(self) -> int:
        """Size of the command ring in bytes (``mailbox.cmdr_size``)."""
        return int(self._ctx.cmdr_size)

    @property
    def data_off(self) -> int:
        """Mapping offset of the data area (first byte after the ring)."""
        return int(self._ctx.data_off)

    @property
    def max_data_length(self) -> int:
        """The largest data transfer (bytes) the kernel queues for one command on this ring.

        target_core_user.c ``queue_cmd_ring`` fails a command with INVALID FIELD IN CDB when
        its data does not fit the whole data area (``max_blocks * data_blk_size``: the mapping
        after `data_off`), or when its entry would take more than half the command ring. The
        entry holds one 16-byte iovec per data-area block in the worst case (blocks are at
        least one page), plus a 48-byte header and a CDB of at most 32 bytes.
        """
        data_area = len(self._mv) - self.data_off
        iovecs = (self.cmdr_size // 2 - 48 - 32) // 16
        return max(0, min(data_area, iovecs * mmap.PAGESIZE))

    @property
    def flags(self) -> int:
        """``mailbox.flags``: the kernel's :class:`MailboxFlag` capabilities."""
        return int(self._mv[MB_FLAGS]) | int(self._mv[MB_FLAGS + 1]) << 8

    def has_new(self) -> bool:
        """Whether the kernel has published entries not dequeued yet (one acquire load of
        cmd_head; for busy-polling between wake-ups, `dequeue` does the real work)."""
        if self._cbuf is None:
            return False
        return bool(lib.tcmu_py_load_head(self._ctx) != self._ctx.cursor)

    @property
    def in_flight(self) -> int:
        """Commands dequeued and not yet completed."""
        return len(self._in_flight)

    @property
    def in_flight_ids(self) -> frozenset[int]:
        """cmd_ids dequeued and not yet completed."""
        return frozenset(self._in_flight)

    @property
    def cursor(self) -> int:
        """Ring offset of the next entry :meth:`dequeue` will parse."""
        return int(self._ctx.cursor)

    @property
    def head(self) -> int:
        """``mailbox.cmd_head`` (acquire load)."""
        return int(lib.tcmu_py_load_head(self._ctx))

    @property
    def tail(self) -> int:
        """``mailbox.cmd_tail``."""
        return int(lib.tcmu_py_load_tail(self._ctx))

    @property
    def unknown_ops(self) -> int:
        """Entries with an unknown TCMU opcode seen (and marked UNKNOWN_OP) so far."""
        return int(self._ctx.unknown_ops)

    # --- the protocol

    def dequeue(self) -> tuple[list[RingCommand], list[RingTmr]]:
        """Everything the kernel published since the last call (possibly nothing).

        Also steps ``cmd_tail`` over PAD/TMR slots at the tail (no kick needed for
        correctness; the next completion kick reaps them). Raises :class:`RingError` on a
        malformed entry or a cmd_id that is already in flight; the call is then undone: none of
        the entries it parsed is held in flight and the cursor is back where the call found it
        (commands of earlier calls stay in flight and are completed as usual).
        """
        if self._cbuf is None:
            raise RingError("the ring is closed")
        cmds: list[RingCommand] = []
        tmrs: list[RingTmr] = []
        start = self._ctx.cursor
        try:
            return self._dequeue(cmds, tmrs)
        except RingError:
            # Undo the call: a command parsed here but never returned would be held in flight
            # with nobody to complete it.
            self._in_flight.difference_update(c.cmd_id for c in cmds)
            self._ctx.cursor = start
            raise

    def dequeue_plane(self, plane: DataPlane) -> tuple[list[RingCommand], list[RingTmr]]:
        """As `dequeue`, through the C data plane (`DataPlane`): the commands it executed
        are completed already (cmd_tail advanced, no kick) and are not returned; the others
        come back in ring order, each with its fence held by `plane`. On RingError nothing is
        undone (C may have completed commands): the ring must be reset.
        """
        if self._cbuf is None:
            raise RingError("the ring is closed")
        cmds: list[RingCommand] = []
        tmrs: list[RingTmr] = []
        try:
            return self._dequeue(cmds, tmrs, plane)
        except RingError:
            self._in_flight.difference_update(c.cmd_id for c in cmds)
            plane.complete(self._ctx)  # what C executed is answered all the same (no-op if done)
            raise

    def _dequeue(
        self, cmds: list[RingCommand], tmrs: list[RingTmr], plane: DataPlane | None = None
    ) -> tuple[list[RingCommand], list[RingTmr]]:
        mv, ctx, batch, raw = self._mv, self._ctx, self._batch, self._entries_raw
        unpack_entry = _ENTRY.unpack_from
        while True:
            if plane is None:
                n = taken = lib.tcmu_py_dequeue(ctx, self._entries, batch)
            else:
                batch = min(self._batch, lib.TCMU_PY_DP_MAX)
                n, taken = plane.call(ctx, self._entries, batch)
            if n < 0:
                self._check(n)
            for i in range(n):
                (cdb_off, array_off, offset, _, op, cmd_id, n_out, n_bidi, cdb_len, _, _, _,
                 arrived_ns) = unpack_entry(raw, i * _ENTRY.size)
                if op != _OP_CMD:
                    self._tmr(tmrs, mv, array_off, n_out, n_bidi)
                    continue
                self._command(cmds, mv, cdb_off, array_off, offset, cmd_id, n_out, n_bidi,
                              cdb_len, arrived_ns)
                if plane is not None:
                    plane.deferred(cmd_id, i)
            if plane is not None:
                # Only now: C's responses steal the oldest slots, which may be those just read.
                done = plane.complete(ctx)
                if done < 0:
                    self._check(done)
            if taken < batch:
                return cmds, tmrs

    def _tmr(self, tmrs: list[RingTmr], meta: Any, array_off: int, n_ids: int,
             tmr_type: int) -> None:
        """Append the TMR whose cmd_id array is at `meta[array_off:]`."""
        ids = list(_id_struct(n_ids).unpack_from(meta, array_off)) if n_ids else []
        # In ring order: commands after this entry are not in `in_flight` yet.
        in_flight = self._in_flight
        tmrs.append(RingTmr(tmr_type, ids, [i for i in ids if i in in_flight]))

    def _command(self, cmds: list[RingCommand], meta: Any, cdb_off: int, array_off: int,
                 offset: int, cmd_id: int, n_out: int, n_bidi: int, cdb_len: int,
                 arrived_ns: int, native_error: int = 0, retried: int = 0) -> None:
        """Append the command whose CDB and iovec array are in `meta` (the mapping, or a
        native loop's hand-off record); its buffers are views of the mapping's data area.
        `arrived_ns`: when C dequeued it (CLOCK_MONOTONIC). `native_error`: the errno of the
        native loop's failed attempt at it (0: none); `retried`: the record of a failed RBD job."""
        if cmd_id in self._in_flight:
            raise RingError(f"cmd_id {cmd_id} at ring offset {offset} is already in flight")
        mv = self._mv
        cdb = bytes(meta[cdb_off : cdb_off + cdb_len])
        n_all = n_out + n_bidi
        if n_all == 1:
            base, length = _IOVEC.unpack_from(meta, array_off)
            views = [mv[base : base + length]]
        elif n_all:
            flat = _iov_struct(n_all).unpack_from(meta, array_off)
            views = [mv[flat[j] : flat[j] + flat[j + 1]] for j in range(0, 2 * n_all, 2)]
            length = sum(flat[1::2])
        else:
            views = []
            length = 0
        self._in_flight.add(cmd_id)
        if n_bidi:
            out_len = sum(len(v) for v in views[:n_out])
            cmd = RingCommand(cmd_id, cdb, views[:n_out], views[n_out:], out_len, length - out_len)
        else:
            cmd = RingCommand(cmd_id, cdb, views, views, length, length)
        cmd.arrived = arrived_ns * 1e-9
        if native_error:
            cmd.native_error = native_error
        if retried:
            cmd.retried = True
        cmds.append(cmd)

    def take_native(self, loop: NativeLoop) -> tuple[list[RingCommand], list[RingTmr]]:
        """The entries `loop`'s thread handed over since the last call, in ring order (the
        commands it executed itself are completed already and are not among them). Serialise
        with `complete` as for `dequeue`. Raises RingError on a record that makes no sense
        (a cmd_id already in flight): the loop's ring is then unusable."""
        if self._cbuf is None:
            raise RingError("the ring is closed")
        cmds: list[RingCommand] = []
        tmrs: list[RingTmr] = []
        unpack_entry = _ENTRY.unpack_from
        while True:
            raw, used = loop._take()
            pos = 0
            while pos < used:
                (cdb_off, array_off, offset, _, op, cmd_id, n_out, n_bidi, cdb_len, size,
                 error, retried, arrived_ns) = unpack_entry(raw, pos)
                if op != _OP_CMD:
                    self._tmr(tmrs, raw, pos + array_off, n_out, n_bidi)
                else:
                    self._command(cmds, raw, pos + cdb_off, pos + array_off, offset, cmd_id,
                                  n_out, n_bidi, cdb_len, arrived_ns, error, retried)
                pos += size
            if not used:
                return cmds, tmrs


    def complete(
        self, cmd_id: int, status: int, sense: bytes = b"", read_len: int | None = None
    ) -> None:
        """Write the response for ``cmd_id`` into the tail slot and advance ``cmd_tail``.

        ``sense``: fixed or descriptor sense data, at most 96 bytes (zero-filled to 96).
        ``read_len``: bytes of Data-In actually produced (sets READ_LEN; see the module
        facts: ignored by the kernel unless Data-In and non-zero). Does not kick. Raises
        :class:`RingError` if ``cmd_id`` is not in flight (unknown or already completed);
        nothing is written then. The command's memoryviews are dead afterwards.
        """
        if cmd_id not in self._in_flight:
            raise RingError(f"cmd_id {cmd_id} is not in flight (unknown or already completed)")
        if status or sense:  # GOOD without sense (the common case) needs no checks
            if not 0 <= status <= 0xFF:
                raise ValueError(f"SCSI status {status:#x} does not fit a byte")
            if len(sense) > SENSE_BUFFERSIZE:
                raise ValueError(f"sense data is {len(sense)} bytes; TCMU carries at most 96")
        has_len, rl = (0, 0) if read_len is None else self._read_len(read_len)
        # Out of the set first: once cmd_tail moves, a native loop's kick may let the kernel
        # reap it (and reuse its id) before this thread runs again.
        self._in_flight.discard(cmd_id)
        if self._loop is None:
            rc = lib.tcmu_py_complete(self._ctx, cmd_id, status, sense, len(sense), has_len, rl)
        else:
            rc = lib.tcmu_py_loop_complete(
                self._loop, cmd_id, status, sense, len(sense), has_len, rl
            )
        if rc < 0:
            self._in_flight.add(cmd_id)
            self._check(rc)

    def complete_many(
        self, completions: Iterable[Completion | tuple[int, int, bytes, int | None]]
    ) -> None:
        """Complete several commands with one C call and one release store of ``cmd_tail``.

        All ids are checked first (in flight, no duplicates): on error nothing is written.
        """
        items = [c if len(c) == 4 else Completion(*c) for c in completions]
        if not items:
            return
        ids = [c[0] for c in items]
        if len(set(ids)) != len(ids):
            raise RingError(f"duplicate cmd_id in one batch: {sorted(ids)}")
        in_flight = self._in_flight
        raw = bytearray(_RSP.size * len(items))
        pack, size = _RSP.pack_into, _RSP.size
        for i, (cmd_id, status, sense, read_len) in enumerate(items):
            if cmd_id not in in_flight:
                raise RingError(f"cmd_id {cmd_id} is not in flight (unknown or already completed)")
            if len(sense) > SENSE_BUFFERSIZE:
                raise ValueError(f"sense data is {len(sense)} bytes; TCMU carries at most 96")
            if not 0 <= status <= 0xFF:
                raise ValueError(f"SCSI status {status:#x} does not fit a byte")
            if read_len is None:
                pack(raw, i * size, cmd_id, status, len(sense), 0, 0, sense)
            else:
                pack(raw, i * size, cmd_id, status, len(sense), *self._read_len(read_len), sense)
        done = ffi.new("int *")
        rsps = ffi.from_buffer("struct tcmu_py_rsp[]", raw)
        in_flight.difference_update(ids)  # first: as in `complete`
        if self._loop is None:
            rc = lib.tcmu_py_complete_batch(self._ctx, rsps, len(items), done)
        else:
            rc = lib.tcmu_py_loop_complete_batch(self._loop, rsps, len(items), done)
        in_flight.update(ids[done[0]:])
        if rc < 0:
            self._check(rc)

    def close(self) -> None:
        """Release this ring's hold on the mapping (live command views keep their own).

        Idempotent; afterwards ``dequeue``/``complete`` raise RingError. In-flight commands
        are forgotten (recovering them needs ``action/reset_ring``).
        """
        if self._cbuf is not None:
            ffi.release(self._cbuf)
            self._cbuf = None
            self._mv.release()
            self._in_flight.clear()

    # --- helpers

    @staticmethod
    def _read_len(read_len: int | None) -> tuple[int, int]:
        if read_len is None:
            return 0, 0
        if not 0 <= read_len <= 0xFFFFFFFF:
            raise ValueError(f"read_len {read_len} does not fit the u32 rsp.read_len")
        return 1, read_len

    def _check(self, rc: int) -> None:
        if rc < 0:
            what = _ERRORS.get(rc, f"error {rc}")
            raise RingError(f"TCMU ring: {what} (ring offset {self._ctx.bad_off})")


class DataPlane:
    """The C data plane, Python side: one device's extent, the fences of the commands Python
    holds, and the figures of the calls not yet taken into the runner's counters.

    Rules this module obeys (issue 17, stage 1)
    ===========================================

    - One C call per ring chunk (`tcmu_py_dp_batch` in ``_ring.c``) dequeues, executes every plain
      READ/WRITE(6/10/12/16) of a device whose data is a declared file extent, completes those GOOD
      and returns the other entries, in ring order, to Python. C never builds sense data: any
      error, short transfer or command it does not fully understand is Python's, unanswered.
    - No command C took is in flight when the call returns: C's commands never enter the ring's
      in-flight set, the runner's counters take them from the call's figures.
    - Fences: every command Python holds (from its dequeue to its completion) has the LBA range it
      may touch (none for INQUIRY-like commands, the whole device for UNMAP and anything C cannot
      size). C does not execute a command that overlaps a fence, including the fences of entries
      handed to Python earlier in the same call: a command on a worker (COMPARE AND WRITE, WRITE
      SAME, UNMAP, a slow write) is never overtaken by an overlapping C command.
    - Thin (an extent with a unit map, `tcmu_py.backend.UnitMap`): C takes a command only when
      every allocation unit it touches is allocated (reads of holes and allocating writes are
      Python's), and a fence keeps C off every *unit* it touches, since a deallocation works on
      whole units. The backend clears a unit before it deallocates it by any other way.
    - The runner disables execution (the call still dequeues and fences) while a unit attention is
      pending, so the command that must report it reaches Python; C executes nothing in a call that
      brought a TMR entry, so Python sees every command a TMR may name; a resize or a new transfer
      limit bumps `ScsiDevice.extent_version` and the extent is declared again.

    Thread: every method runs under the runner's ring lock (the fence array is shared by the loop
    thread's calls and the completions of the workers).
    """

    def __init__(self) -> None:
        self._extent = ffi.new("struct tcmu_py_extent *")
        self._extent.fd = -1
        self._units: Any = None  # the thin unit map's cdata (keeps the buffer exported)
        self._stats = ffi.new("struct tcmu_py_dp_stats *")
        #: cmd_id -> LBA range [start, end) of each command Python holds that touches the medium.
        self._fences: dict[int, tuple[int, int]] = {}
        self._cap = 0
        self._arr: Any = None
        self._n = 0  # fences in `_arr` passed to the next call
        self._base = 0  # index in `_arr` of the last call's first returned entry
        self._stale = True  # `_arr` does not mirror `_fences`
        #: Commands executed in C since the plane was made (the counters do not tell them apart).
        self.executed = 0
        self.reset_figures()

    @property
    def declared(self) -> bool:
        """Whether an extent is declared (else the runner uses the plain dequeue)."""
        return bool(self._extent.fd >= 0)

    @property
    def fences(self) -> dict[int, tuple[int, int]]:
        """A copy of the fences: cmd_id -> LBA range (for tests and `tcmu-py status`)."""
        return dict(self._fences)

    def declare(self, extent: Any) -> None:
        """Serve from `extent` (a `tcmu_py.device.core.DataExtent`) from the next call on; None:
        serve nothing in C."""
        self._units = _fill_extent(self._extent, extent)

    def begin(self, enabled: bool) -> None:
        """Before a wake-up's first call: `enabled` False fences but executes nothing."""
        self._extent.enabled = 1 if enabled else 0
        if self._stale or self._n != len(self._fences):
            self._n = 0
            self._reserve(len(self._fences))
            for start, end in self._fences.values():
                f = self._arr[self._n]
                f.start, f.end = start, end
                self._n += 1
            self._stale = False

    def call(self, ctx: Any, entries: Any, batch: int) -> tuple[int, int]:
        """One `tcmu_py_dp_batch`: (entries left for Python or a negative status, entries
        dequeued). The caller copies what it needs of the entries, then calls `complete`."""
        self._reserve(self._n + batch)
        rc = lib.tcmu_py_dp_batch(
            ctx, self._extent, self._arr, self._n, entries, batch, self._stats
        )
        if rc > 0:
            self._base = self._n
            self._n += rc  # later calls of this wake-up see these entries' fences too
        return rc, self._stats.dequeued

    def complete(self, ctx: Any) -> int:
        """Complete the commands the last `call` executed (their responses may overwrite the
        slots of the entries it returned): the number completed, or a negative status. Folds
        the call's figures into this object's."""
        st = self._stats
        if not st.done:
            return 0
        rc = lib.tcmu_py_dp_complete(ctx, st)
        if rc < 0:
            st.done = 0  # the ring is broken: never again
            return int(rc)
        self.executed += st.done
        self.done += st.done
        st.done = 0  # completed: a second `complete` does nothing
        self.reads += st.reads
        self.writes += st.writes
        self.bytes_read += st.bytes_read
        self.bytes_written += st.bytes_written
        self.latency_seconds += st.latency_seconds
        for b in range(st.hist_lo, st.hist_hi):
            if st.hist[b]:
                self.hist[b] = self.hist.get(b, 0) + st.hist[b]
        return int(rc)

    def deferred(self, cmd_id: int, index: int) -> None:
        """Entry `index` of the last call is command `cmd_id`, now Python's: hold its fence."""
        f = self._arr[self._base + index]
        if f.end > f.start:
            self._fences[cmd_id] = (f.start, f.end)

    def release(self, cmd_id: int) -> None:
        """Python completed `cmd_id`: its fence goes."""
        if self._fences.pop(cmd_id, None) is not None:
            self._stale = True

    def reset_figures(self) -> None:
        """Forget the figures (the runner took them into its counters)."""
        self.done = self.reads = self.writes = self.bytes_read = self.bytes_written = 0
        self.latency_seconds = 0.0
        self.hist: dict[int, int] = {}

    def _reserve(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = max(64, 2 * n)
        arr = ffi.new("struct tcmu_py_fence[]", cap)
        if self._arr is not None and self._n:
            ffi.memmove(arr, self._arr, self._n * ffi.sizeof("struct tcmu_py_fence"))
        self._arr, self._cap = arr, cap


def _fill_extent(x: Any, extent: Any) -> Any:
    """Fill the `struct tcmu_py_extent` `x` from `extent` (a `tcmu_py.device.core.DataExtent`;
    None: no extent). Returns what keeps a thin unit map exported (unresizable) and alive
    while it is declared (hold it as long as C may read the map), and a fan-out's objects, or
    None."""
    rbd = extent.rbd if extent is not None else None
    if rbd is None:
        x.rbd_image = x.rbd_create_completion = x.rbd_aio_readv = x.rbd_aio_writev = ffi.NULL
        x.rbd_aio_get_return_value = x.rbd_aio_release = ffi.NULL
    else:
        x.rbd_image = ffi.cast("void *", rbd.image)
        x.rbd_create_completion = ffi.cast("void *", rbd.create_completion)
        x.rbd_aio_readv = ffi.cast("void *", rbd.aio_readv)
        x.rbd_aio_writev = ffi.cast("void *", rbd.aio_writev)
        x.rbd_aio_get_return_value = ffi.cast("void *", rbd.aio_get_return_value)
        x.rbd_aio_release = ffi.cast("void *", rbd.aio_release)
    chunks = extent.chunks if extent is not None else None
    x.cm = ffi.NULL if chunks is None else chunks.table.ptr
    lease = None if chunks is None else chunks.lease
    x.jl = ffi.NULL if lease is None else lease.ptr
    x.jl_disk = 0 if chunks is None else chunks.disk
    fan = extent.fanout if extent is not None else None
    x.wi = ffi.NULL if fan is None else fan.regions.ptr
    x.mw_n_fds = x.mw_n_nbd = 0
    if fan is not None:
        if len(fan.fds) > 3 or len(fan.nbd) > 3:
            raise ValueError("a fan-out extent has at most 3 legs of each kind")
        for i, fd in enumerate(fan.fds):
            x.mw_fds[i] = fd
        for i, w in enumerate(fan.nbd):
            x.mw_nbd[i] = w.ptr
        x.mw_n_fds, x.mw_n_nbd = len(fan.fds), len(fan.nbd)
    if extent is None:
        x.fd = -1
        x.units, x.n_units, x.unit_blocks = ffi.NULL, 0, 0
        return None
    units_cdata: Any = None
    if extent.unit_blocks:
        # The map stays the backend's bytearray: C sees its updates as they are made.
        units = extent.units if extent.units is not None else bytearray()
        units_cdata = ffi.from_buffer("uint8_t[]", units)
        x.units, x.n_units, x.unit_blocks = units_cdata, len(units), extent.unit_blocks
    else:
        x.units, x.n_units, x.unit_blocks = ffi.NULL, 0, 0
    x.fd = extent.fd
    x.block_size = extent.block_size
    x.base = extent.base
    x.num_blocks = extent.num_blocks
    x.max_blocks = extent.max_blocks
    x.flush_fua = 1 if extent.flush_fua else 0
    x.reads_only = 1 if extent.reads_only else 0
    # The fan-out's regions and the chunk table stay alive at least as long as this is held (a
    # fan-out's writers are freed only by their leg's `close`, after the backend withdrew the
    # extent).
    return units_cdata if fan is None and chunks is None else (units_cdata, fan, chunks)


#: Worker threads of a native loop, and the smallest transfer (bytes) they take: a large READ or
#: WRITE is executed, completed and kicked on a worker, so that its copy overlaps the loop's next
#: command and the kernel's completion work for it (which runs in the kicking thread: for a READ,
#: the copy out of the data area). Smaller commands stay on the loop thread, where they cost less.
NATIVE_WORKERS = 2
NATIVE_BIG_BYTES = 64 * 1024


class PollJudge:
    """The native loop's busy-poll judge (`struct tcmu_py_poll_judge` in _ring.h, which says
    how it decides), for tests and tools: `step` it with the time and the commands of each
    wake-up."""

    def __init__(self, every_ns: int, probe_ns: int, now_ns: int) -> None:
        self._j = ffi.new("struct tcmu_py_poll_judge *")
        lib.tcmu_py_poll_judge_init(self._j, every_ns, probe_ns, now_ns)

    def step(self, now_ns: int, commands: int) -> int:
        """Whether to busy-poll after a wake-up at `now_ns` that brought `commands`: 0 no, 1
        yes (if commands follow each other within the watch), 2 yes (a probe: whatever the
        gap)."""
        return int(lib.tcmu_py_poll_judge_step(self._j, now_ns, commands))

    @property
    def polling(self) -> bool:
        return bool(self._j.polling)

    @property
    def probes(self) -> int:
        return int(self._j.probes)

    @property
    def switches(self) -> int:
        return int(self._j.switches)


class NativeLoop:
    """Issue 17, stage 2: a C thread (`tcmu_py_loop_*` in ``_ring.c``) that serves one ring.

    Rules this class and its C side obey
    ====================================

    - The thread owns the consumer side of the ring: it polls the uio fd, clears its event and
      calls the stage-1 batch (`DataPlane`'s rules: fences, unit maps, no execution in a call
      that brought a TMR or while disabled) until the ring is empty. It completes and kicks the
      commands it executed itself: neither Python nor the GIL is on their path.
    - Every other entry is copied (CDB, iovecs, TMR ids) into a hand-off record before C's
      completions can steal its slot, and `fileno()` (an eventfd) becomes readable. Python takes
      the records with `Ring.take_native`, in ring order, and completes those commands through
      `Ring.complete`, which takes the loop's mutex (cmd_tail has one writer at a time) and
      drops the command's fence. The loop holds the fence of every command it handed over until
      then, so a command on a worker is never overtaken by an overlapping C command.
    - `enable(False)` stops execution at once (everything goes to Python): the runner calls it
      when a unit attention is queued or the extent changes, and enables again after Python
      reported the attention and declared the new extent.
    - Large READ/WRITE (`NATIVE_BIG_BYTES`) go to a few C worker threads that execute, complete
      and kick them; an entry that overlaps one of them (C's or Python's) waits until the workers
      are idle, so overlapping commands keep ring order. Every entry of a wake-up is copied before
      any of it runs, so completions may steal any slot while the loop waits.
    - An RBD extent (`tcmu_py.backend.RbdExtent`, declared by the ``ceph`` backend) has no fd:
      every plain READ/WRITE of it takes a job slot and is submitted to librbd
      (``rbd_aio_readv`` / ``rbd_aio_writev``, through the function addresses the extent
      carries); librbd's completion callback, on librbd's thread, completes it or hands it to
      Python as a worker does, and frees the slot after its kick, so `enable(False)` and
      `stop()` wait for every operation submitted (each bounded by ``osd_op_timeout``). An
      entry that overlaps an operation in flight is handed to Python at once, which waits for
      the operations it overlaps before it runs it (`fence_busy`): the loop goes on with the
      entries after it (when it waited itself, one READ of blocks a WRITE was writing held
      every later command of a stalled cluster a whole ``osd_op_timeout`` more, and each such
      pair added one: answers came after the kernel's ``cmd_time_out``).
    - `stop()` joins the thread and the workers; records it left are still taken afterwards,
      so every command dequeued is completed exactly once. `error` says why the thread stopped
      by itself (a corrupt ring, or the uio gone).

    Thread: `take`, `figures` and the completions are safe from any thread (the mutex);
    `declare`/`enable` too. `close` after `stop`, once nothing completes any more.
    """

    def __init__(self, ring: Ring, uio: Any, poll_seconds: float = 0.0,
                 workers: int | None = None, big: int | None = None) -> None:
        """`uio`: a `tcmu_py.uio.UioDevice`, or anything with `fileno()`, `event_size` (bytes
        one read of its event takes: 4 for uio, 8 for an eventfd), `kick_fd()` and
        `kick_size` (the fd and size of a kick write). `workers`, `big`: see
        `NATIVE_WORKERS` (None: the module's values when the loop is made)."""
        if ring._cbuf is None:
            raise RingError("the ring is closed")
        self.ring = ring
        self._notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._extent = ffi.new("struct tcmu_py_extent *")
        self._extent.fd = -1
        self._units: Any = None
        self._buf = bytearray(65536)
        self._cbuf = ffi.from_buffer("uint8_t[]", self._buf)
        self._used = ffi.new("uint32_t *")
        ptr = lib.tcmu_py_loop_new(
            ring._ctx, uio.fileno(), getattr(uio, "event_size", 4), uio.kick_fd(),
            getattr(uio, "kick_size", 4), self._notify, max(0, round(poll_seconds * 1e6)),
            NATIVE_WORKERS if workers is None else workers,
            NATIVE_BIG_BYTES if big is None else big,
        )
        if ptr == ffi.NULL:
            os.close(self._notify)
            raise MemoryError("the native loop could not be made (memory or eventfd)")
        self._ptr: Any = ptr
        ring._loop = ptr
        self._running = False
        #: Commands executed in C so far (`figures` moves them into the runner's counters).
        self.executed = 0

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def fileno(self) -> int:
        """An eventfd, readable when records wait or the thread stopped on an error."""
        return self._notify

    def clear(self) -> None:
        """Acknowledge `fileno()`'s event (before taking the records)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._notify)

    def start(self) -> None:
        rc = lib.tcmu_py_loop_start(self._ptr)
        if rc:
            raise OSError(rc, f"starting the native loop thread: {os.strerror(rc)}")
        self._running = True

    def stop(self) -> None:
        """Stop the thread and wait for it (idempotent)."""
        if self._ptr is not None:
            lib.tcmu_py_loop_stop(self._ptr)
        self._running = False

    def close(self) -> None:
        """Stop, free the C side and detach from the ring (idempotent): completions go straight
        to the ring again."""
        if self._ptr is None:
            return
        lib.tcmu_py_loop_free(self._ptr)
        self.ring._loop = None
        self._ptr = None
        os.close(self._notify)

    def declare(self, extent: Any) -> None:
        """Serve from `extent` (a `tcmu_py.device.core.DataExtent`, None: nothing in C)."""
        units = _fill_extent(self._extent, extent)
        lib.tcmu_py_loop_declare(self._ptr, self._extent)
        self._units = units  # after C switched: the old map may go

    def enable(self, enabled: bool) -> None:
        lib.tcmu_py_loop_enable(self._ptr, 1 if enabled else 0)

    def probe(self, every_us: int, probe_us: int) -> None:
        """How often (`every_us`; 0: never, always busy-poll) and how long (`probe_us`) the
        busy-poll judge tries the other setting (`struct tcmu_py_poll_judge` in _ring.h)."""
        lib.tcmu_py_loop_probe(self._ptr, every_us, probe_us)

    @property
    def polling(self) -> bool:
        """Whether the loop busy-polls after a wake-up that brought one command (the judge's
        current choice; `poll_us` 0 turns the busy-poll off whatever it says)."""
        return bool(lib.tcmu_py_loop_polling(self._ptr))

    @property
    def mapped(self) -> bool:
        """Whether C copies through a mapping of the declared file (a file on tmpfs whose
        extent is fully allocated: `tcmu_py_loop_declare` in _ring.h) rather than with
        preadv/pwritev."""
        return self._ptr is not None and bool(lib.tcmu_py_loop_mapped(self._ptr))

    @property
    def error(self) -> int:
        """0, a negative ring status, or an errno (> 0) the thread stopped on."""
        return int(lib.tcmu_py_loop_error(self._ptr)) if self._ptr is not None else 0

    def describe_error(self) -> str:
        err = self.error
        if err < 0:
            what = _ERRORS.get(err, os.strerror(-err) if err > -200 else f"error {err}")
            return f"TCMU ring: {what} (ring offset {self.ring._ctx.bad_off})"
        return os.strerror(err) if err else ""

    @property
    def fences(self) -> int:
        """Fences the loop holds for commands Python has not completed."""
        return int(lib.tcmu_py_loop_fences(self._ptr))

    def fence_busy(self, cmd_id: int, wait_seconds: float = 0.0) -> bool:
        """Whether a job of the loop (a worker's copy, a librbd operation) still overlaps
        the fence of `cmd_id` (a command handed to Python) after waiting up to `wait_seconds`
        for it (the GIL released meanwhile). Python runs such a command only once this is
        False: it comes after the jobs in ring order."""
        if self._ptr is None:
            return False
        return bool(lib.tcmu_py_loop_fence_busy(self._ptr, cmd_id,
                                                max(0, round(wait_seconds * 1000))))

    def hold(self) -> None:
        """Keep the thread from dequeuing until `release` (tests: submit a batch at once)."""
        lib.tcmu_py_loop_hold(self._ptr)

    def release(self) -> None:
        lib.tcmu_py_loop_release(self._ptr)

    def figures(self) -> dict[str, Any]:
        """What the thread did since the last call (and forget it): done, reads, writes,
        bytes_read, bytes_written, latency_seconds, wakeups, polled, poll_misses, batches,
        handed, mapped (of done: copied through the mapped image), probes and poll_switches
        (the busy-poll judge's probes and changes of mind), merged (of done: RBD commands sent
        within an adjacent one's librbd operation), hist (bucket -> count)."""
        f = ffi.new("struct tcmu_py_loop_figures *")
        lib.tcmu_py_loop_figures(self._ptr, f)
        out: dict[str, Any] = {k: getattr(f, k) for k in (
            "done", "reads", "writes", "bytes_read", "bytes_written", "latency_seconds",
            "wakeups", "polled", "poll_misses", "batches", "handed", "mapped", "probes",
            "poll_switches", "merged")}
        out["hist"] = {b: f.hist[b] for b in range(lib.TCMU_PY_DP_HIST) if f.hist[b]} \
            if f.done else {}
        self.executed += f.done
        return out

    def _take(self) -> tuple[memoryview, int]:
        """Move waiting records into this object's buffer: (the buffer, bytes used; 0: none)."""
        while True:
            n = lib.tcmu_py_loop_take(self._ptr, self._cbuf, len(self._buf), self._used)
            if n >= 0:
                return memoryview(self._buf), int(self._used[0])
            self._buf = bytearray(max(2 * len(self._buf), -n))
            self._cbuf = ffi.from_buffer("uint8_t[]", self._buf)


# ------------------------------------------------------------------------------------------
# A mirror's write fan-out (issue 16): the C objects a `tcmu_py.backend.FanOutExtent` names

class WriteRegions:
    """A mirror's write-intent regions as the native loop sees them (`struct tcmu_py_wi` in
    _ring.h; `tcmu_py.backend.FanOutRegions`): `n` regions of `region` bytes, none armed,
    epoch 1. Thread-safe (a C mutex). Must outlive every extent naming it."""

    def __init__(self, region: int, n: int) -> None:
        ptr = lib.tcmu_py_wi_new(region, n)
        if ptr == ffi.NULL:
            raise MemoryError("write regions")
        self.ptr: Any = ptr
        self.region = region
        self.n = n

    def arm(self, lo: int, hi: int) -> None:
        """Regions `lo` to `hi` (inclusive) may be written by C: their bits are set and durable
        on every leg."""
        lib.tcmu_py_wi_arm(self.ptr, lo, hi)

    def epoch(self) -> int:
        """Start a new epoch (a flush starts) and return it."""
        return int(lib.tcmu_py_wi_epoch(self.ptr))

    def disarm(self, r: int, epoch: int) -> bool:
        """Disarm region `r` and return True when no C write touched it in `epoch` or later and
        none is in flight there (its bit may then be cleared); else False, `r` unchanged."""
        return bool(lib.tcmu_py_wi_disarm(self.ptr, r, epoch))

    def armed(self, r: int) -> bool:
        return bool(lib.tcmu_py_wi_armed(self.ptr, r))

    @property
    def writes(self) -> int:
        """Writes C started through these regions."""
        return int(lib.tcmu_py_wi_writes(self.ptr))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.tcmu_py_wi_free(ptr)

    def __del__(self) -> None:
        self.close()


class NbdWriter:
    """`tcmu_py.backend.FanOutWriter` (`struct tcmu_py_nbdq` in _ring.h): a C thread owning
    the libnbd handle at address `handle` (a connection of its own: it closes it in `close`),
    answering the writes the loop sends on it; a write not answered within `timeout` seconds
    (0: never) kills
    the writer (`dead`): its writes fail and go to Python. `functions`: a
    `tcmu_py.backend.NbdFunctions`."""

    def __init__(self, handle: int, functions: Any, timeout: float) -> None:
        f = functions

        def p(addr: int) -> Any:
            return ffi.cast("void *", addr)

        ptr = lib.tcmu_py_nbdq_new(p(handle), p(f.aio_pwrite), p(f.aio_get_fd),
                                   p(f.aio_get_direction), p(f.aio_notify_read),
                                   p(f.aio_notify_write), p(f.close),
                                   max(0, int(timeout * 1000)))
        if ptr == ffi.NULL:
            raise MemoryError("nbd writer")
        self.ptr: Any = ptr

    @property
    def dead(self) -> bool:
        return self.ptr is None or bool(lib.tcmu_py_nbdq_dead(self.ptr))

    def close(self) -> None:
        """Stop the thread and close the connection. No declared extent may name it."""
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.tcmu_py_nbdq_free(ptr)


# ------------------------------------------------------------------------------------------
# A dedup disk's chunk locations (issue 14): the table a `tcmu_py.backend.ChunkExtent` names

class ChunkTable:
    """`tcmu_py.backend.ChunkTable` (`struct tcmu_py_cm` in _ring.h): where the chunks of one
    dedup disk lie, for the native loop's READs; `slots` entries (a power of two), chunks of
    `chunk` bytes. Thread-safe (a C mutex). Must outlive every extent naming it."""

    def __init__(self, chunk: int, slots: int) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError(f"chunk table: {slots} slots, expected a power of two")
        ptr = lib.tcmu_py_cm_new(chunk, slots.bit_length() - 1)
        if ptr == ffi.NULL:
            raise MemoryError("chunk table")
        self.ptr: Any = ptr
        self.chunk = chunk
        self.slots = slots

    def _entries(self, idx: Sequence[int], offs: Sequence[int],
                 fds: Sequence[int] | None = None) -> tuple[Any, Any, Any] | None:
        """`idx`, `offs` and `fds` as the C arrays the setters take, or None when there is
        nothing to set (no entries, or the table is closed). ValueError on unequal lengths."""
        n = len(idx)
        if not n or self.ptr is None:
            return None
        if len(offs) != n or (fds is not None and len(fds) != n):
            raise ValueError("chunk table: entries of unequal lengths")
        return (ffi.new("uint64_t[]", idx), ffi.new("uint64_t[]", offs),
                None if fds is None else ffi.new("int32_t[]", fds))

    def set(self, idx: Sequence[int], fds: Sequence[int], offs: Sequence[int]) -> None:
        """Chunk ``idx[k]`` is at ``offs[k]`` of ``fds[k]`` (-1: zeros; -2: forget it)."""
        if (a := self._entries(idx, offs, fds)) is not None:
            lib.tcmu_py_cm_set(self.ptr, a[0], a[2], a[1], len(idx))

    def set_journal(self, idx: Sequence[int], offs: Sequence[int], fd: int, seq: int) -> None:
        """Chunk ``idx[k]`` is at ``offs[k]`` of the journal `fd`, in record `seq` (unless its
        entry names a newer record)."""
        if (a := self._entries(idx, offs)) is not None:
            lib.tcmu_py_cm_set_journal(self.ptr, a[0], a[1], len(idx), fd, seq)

    def set_drained(self, idx: Sequence[int], fds: Sequence[int], offs: Sequence[int],
                    seq: int) -> None:
        """Record `seq`'s chunk ``idx[k]`` is at ``offs[k]`` of ``fds[k]`` now (-1 zeros, -2
        forget), unless its entry names a newer record."""
        if (a := self._entries(idx, offs, fds)) is not None:
            lib.tcmu_py_cm_set_drained(self.ptr, a[0], a[2], a[1], len(idx), seq)

    def get(self, idx: int) -> tuple[int, int] | None:
        """Chunk `idx`'s entry: (fd, offset), fd -1 for zeros; None when it has none."""
        if self.ptr is None:
            return None
        fd, off = ffi.new("int32_t *"), ffi.new("uint64_t *")
        if not lib.tcmu_py_cm_get(self.ptr, idx, fd, off):
            return None
        return int(fd[0]), int(off[0])

    def clear(self) -> None:
        if self.ptr is not None:
            lib.tcmu_py_cm_clear(self.ptr)

    def drop_fd(self, fd: int) -> None:
        if self.ptr is not None:
            lib.tcmu_py_cm_drop_fd(self.ptr, fd)

    @property
    def hits(self) -> int:
        return 0 if self.ptr is None else int(lib.tcmu_py_cm_hits(self.ptr))

    @property
    def misses(self) -> int:
        return 0 if self.ptr is None else int(lib.tcmu_py_cm_misses(self.ptr))

    def close(self) -> None:
        """Free the table; no declared extent may name it any more."""
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            lib.tcmu_py_cm_free(ptr)

    def __del__(self) -> None:
        self.close()


def journal_checksum(head: bytes, data: bytes, build: int | None = None) -> int:
    """A dedup journal record's checksum as the native loop computes it (XXH3-64 of `head`
    then `data`): `build` 0 with SIMD, 1 without, None the one the loop uses."""
    if build is None:
        build = int(lib.tcmu_py_jl_sum_build())
    return int(lib.tcmu_py_jl_checksum(ffi.from_buffer(head), len(head), ffi.from_buffer(data),
                                       len(data), build))


class JournalLease:
    """`tcmu_py.backend.JournalLease` (`struct tcmu_py_jl` in _ring.h) for the write journal
    open as `fd`, chunks of `chunk` bytes. Freed when the last reference goes (a declared
    extent naming it holds one, `_fill_extent`)."""

    #: Notices the loops may queue before the journal takes them; then WRITEs go to Python.
    NOTICES = 4096

    def __init__(self, fd: int, chunk: int) -> None:
        ptr = lib.tcmu_py_jl_new(fd, chunk, self.NOTICES)
        if ptr == ffi.NULL:
            raise MemoryError("journal lease")
        self.ptr: Any = ptr
        self._out = ffi.new("struct tcmu_py_jl_rec[]", self.NOTICES)

    def grant(self, pos: int, end: int, seq: int, epoch: int, budget: int,
              max_record: int) -> None:
        lib.tcmu_py_jl_grant(self.ptr, pos, end, seq, epoch, budget, max_record)

    def revoke(self) -> None:
        lib.tcmu_py_jl_revoke(self.ptr)

    def take(self) -> list[tuple[int, int, int, int, int, bool]]:
        out = self._out
        n = int(lib.tcmu_py_jl_take(self.ptr, out, self.NOTICES))
        return [(int(r.seq), int(r.pos), int(r.disk), int(r.first), int(r.count),
                 bool(r.failed)) for r in (out[k] for k in range(n))]

    @property
    def appends(self) -> int:
        return int(lib.tcmu_py_jl_appends(self.ptr))

    @property
    def declined(self) -> int:
        return int(lib.tcmu_py_jl_declined(self.ptr))

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr is not None:
            lib.tcmu_py_jl_free(ptr)
