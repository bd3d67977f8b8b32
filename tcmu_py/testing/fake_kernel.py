"""A fake TCMU kernel: plays target_core_user.c's side of the ring over a bytearray.

:class:`FakeKernel` does, in pure Python and synchronously, what the kernel does for one
TCMU device, so the real :class:`tcmu_py.ring.Ring` (and everything above it) can be
tested without a kernel:

- mailbox set up as ``tcmu_configure_device`` does (version 2, flags 15, ``cmdr_off``
  128, the command ring, then the data area);
- ``queue_cmd_ring``: data blocks of ``page_size * data_pages_per_blk`` bytes taken
  lowest-free-first from a bitmap (``tcmu_get_empty_block``), one iovec per run of
  consecutive blocks (``new_block_to_iov``), Data-In (BIDI) iovecs after the Data-Out
  ones, entry size ``max(48 + 16 * iovecs, 112) + roundup(cdb_len, 8)``, a PAD entry
  when the entry does not fit before the end of the ring, Data-Out copied in, cmd_ids
  from 1..0xFFFF lowest free first (``xa_alloc`` with ``XA_LIMIT(1, 0xffff)``);
- back-pressure: a command that finds no ring or data space waits in a FIFO (the
  kernel's ``qfull_queue``), and so does every command after it, until a kick frees space;
- ``tcmu_handle_completions`` on :meth:`FakeKernel.kick`: reap slots from the last
  reaped one up to ``cmd_tail``, stepping over PAD/TMR, finding each command by the
  cmd_id in the slot, copying Data-In back (honouring READ_LEN as the kernel does);
- ``tcmu_tmr_notify`` via :meth:`FakeKernel.submit_tmr`.

Where the kernel would log and mark the device broken, or where userspace would have
been killed by SIGBUS, the fake raises :class:`FakeKernelError` (an AssertionError):
unknown or repeated cmd_id at the tail, ``cmd_tail`` outside the unreaped region or in the
middle of an entry, writes to data blocks that belong to no in-flight command (checked
with a poison pattern), and, in :meth:`FakeKernel.assert_idle`, commands never completed.

Single-threaded: call it from the thread that drives the ring (or serialise calls).
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import NoReturn

from tcmu_py.ring import (
    CMD_ENTRY_SIZE,
    HDR_CMD_ID,
    HDR_LEN_OP,
    HDR_UFLAGS,
    MAILBOX_SIZE,
    MAILBOX_VERSION,
    MB_CMD_HEAD,
    MB_CMD_TAIL,
    OP_ALIGN_SIZE,
    OP_MASK,
    REQ_CDB_OFF,
    REQ_IOV,
    REQ_IOV_BIDI_CNT,
    REQ_IOV_CNT,
    RSP_READ_LEN,
    RSP_SCSI_STATUS,
    RSP_SENSE,
    SENSE_BUFFERSIZE,
    TMR_CMD_CNT,
    TMR_CMD_IDS,
    TMR_ENTRY_SIZE,
    TMR_TYPE,
    MailboxFlag,
    RingOp,
    UFlag,
    command_entry_size,
    scsi_command_size,
)

__all__ = ["FakeKernel", "FakeKernelError", "Pending"]

PAGE_SIZE = 4096
POISON = 0xA5  # fills data blocks that belong to no command
MAX_CMD_ID = 0xFFFF
STATUS_CHECK_CONDITION = 0x02  # SAM-6 5.3.1
STATUS_BUSY = 0x08
STATUS_TASK_ABORTED = 0x40

_MAILBOX = struct.Struct("<HHII")  # version, flags, cmdr_off, cmdr_size
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_IOVEC = struct.Struct("<QQ")


class FakeKernelError(AssertionError):
    """Userspace broke the TCMU ring protocol (a real kernel would break the device or SIGBUS)."""


class _Dir(Enum):
    NONE = "none"
    TO_DEVICE = "to_device"  # Data-Out
    FROM_DEVICE = "from_device"  # Data-In
    BIDI = "bidi"


@dataclass(eq=False)
class Pending:
    """One submitted command; the kernel fills the result fields when it reaps it.

    ``sense`` is the sense data the kernel copied (trimmed to the length its format
    implies: 8 + ADDITIONAL SENSE LENGTH for response codes 70h-73h); ``data_in`` the
    Data-In bytes delivered to the initiator (``read_len`` of them when READ_LEN was
    honoured, else the whole buffer; nothing on CHECK CONDITION without READ_LEN).
    ``aborted`` is set when a TMR removed the command while it still waited in the queue
    (completed by the kernel with TASK ABORTED, never seen by userspace).
    """

    cdb: bytes
    data_out: bytes = b""
    data_in_len: int = 0
    bidi_in_len: int = 0
    cmd_id: int | None = None
    done: bool = False
    status: int | None = None
    sense: bytes = b""
    data_in: bytes = b""
    read_len: int | None = None
    unknown_op: bool = False
    aborted: bool = False
    _dir: _Dir = field(default=_Dir.NONE, repr=False)
    _dbis: list[int] = field(default_factory=list, repr=False)
    _n_data_blocks: int = field(default=0, repr=False)

    @property
    def data_length(self) -> int:
        """The command's data buffer length (Data-Out or Data-In; the Data-Out part if BIDI)."""
        return len(self.data_out) if self._dir in (_Dir.TO_DEVICE, _Dir.BIDI) else self.data_in_len


def _trim_sense(raw: bytes) -> bytes:
    # SPC-5 4.4.2/4.4.3: fixed (70h/71h) and descriptor (72h/73h) sense both carry the
    # ADDITIONAL SENSE LENGTH in byte 7, counting the bytes after byte 7.
    if raw and raw[0] & 0x7F in (0x70, 0x71, 0x72, 0x73):
        return raw[: min(len(raw), 8 + raw[7])]
    return raw.rstrip(b"\0")


class FakeKernel:
    """The kernel side of one TCMU device, over ``buffer`` (a bytearray of the whole mapping).

    ``cmdr_size``: command ring bytes (multiple of 8). ``data_size``: data area bytes
    (multiple of the block size ``page_size * data_pages_per_blk``). ``ring_offset``: start
    with cmd_head = cmd_tail = that ring offset, as if that many bytes had already gone
    through (to test wrap-around at a chosen place). ``tmr_notification``: the device
    attribute of the same name (TMR entries are only queued when it is on).
    """

    def __init__(
        self,
        *,
        cmdr_size: int = 64 * 1024 - MAILBOX_SIZE,
        data_size: int = 1024 * 1024,
        page_size: int = PAGE_SIZE,
        data_pages_per_blk: int = 1,
        ring_offset: int = 0,
        tmr_notification: bool = True,
    ) -> None:
        if cmdr_size % OP_ALIGN_SIZE or cmdr_size < 2 * CMD_ENTRY_SIZE:
            raise ValueError(f"cmdr_size {cmdr_size} must be a multiple of 8 and >= 224")
        blk_size = page_size * data_pages_per_blk
        if blk_size <= 0 or data_size < blk_size or data_size % blk_size:
            raise ValueError(f"data_size {data_size} must be a positive multiple of {blk_size}")
        if ring_offset % OP_ALIGN_SIZE or not 0 <= ring_offset < cmdr_size:
            raise ValueError(f"ring_offset {ring_offset} must be 8-aligned and inside the ring")
        self.cmdr_size = cmdr_size
        self.data_off = MAILBOX_SIZE + cmdr_size
        self.data_size = data_size
        self.page_size = page_size
        self.data_pages_per_blk = data_pages_per_blk
        self.blk_size = blk_size
        self.max_blocks = data_size // blk_size
        self.tmr_notification = tmr_notification
        self.buffer = bytearray(self.data_off + data_size)
        self._mv = memoryview(self.buffer)
        self._poison_block = bytes([POISON]) * blk_size
        self.buffer[self.data_off :] = bytes([POISON]) * data_size
        self._bitmap = bytearray(self.max_blocks)
        self._used_blocks = 0
        self._commands: dict[int, Pending] = {}
        self._free_ids: list[int] = []
        self._fresh_id = 1
        self._qfull: deque[Pending] = deque()
        self._tmr_queue: deque[tuple[int, list[int]]] = deque()
        self._submitted: list[Pending] = []
        self._last_cleaned = ring_offset
        self._listeners: list[Callable[[], None]] = []
        self.events = 0
        self.broken = False
        flags = (
            MailboxFlag.CAP_OOOC
            | MailboxFlag.CAP_READ_LEN
            | MailboxFlag.CAP_TMR
            | MailboxFlag.CAP_KEEP_BUF
        )
        _MAILBOX.pack_into(self.buffer, 0, MAILBOX_VERSION, flags, MAILBOX_SIZE, cmdr_size)
        _U32.pack_into(self.buffer, MB_CMD_HEAD, ring_offset)
        _U32.pack_into(self.buffer, MB_CMD_TAIL, ring_offset)

    # --- observation

    @property
    def head(self) -> int:
        """``mailbox.cmd_head`` (ring offset where the next entry goes)."""
        return int(_U32.unpack_from(self.buffer, MB_CMD_HEAD)[0])

    @property
    def tail(self) -> int:
        """``mailbox.cmd_tail`` as userspace last stored it."""
        return int(_U32.unpack_from(self.buffer, MB_CMD_TAIL)[0])

    @property
    def last_cleaned(self) -> int:
        """The kernel's private reap position (``cmdr_last_cleaned``)."""
        return self._last_cleaned

    @property
    def pending(self) -> list[Pending]:
        """Submitted commands not yet completed, in submission order."""
        self._submitted = [p for p in self._submitted if not p.done]
        return list(self._submitted)

    @property
    def in_flight(self) -> int:
        """Commands on the ring (have a cmd_id) and not yet reaped."""
        return len(self._commands)

    @property
    def queued(self) -> int:
        """Commands waiting for ring or data space (the kernel's qfull queue)."""
        return len(self._qfull)

    @property
    def free_blocks(self) -> int:
        """Data blocks not allocated to any command."""
        return self.max_blocks - self._used_blocks

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on every ``uio_event_notify`` (entry queued on the ring)."""
        self._listeners.append(callback)

    # --- the initiator side

    def submit(
        self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0, bidi_in_len: int = 0
    ) -> Pending:
        """Queue a command as LIO would hand it to ``tcmu_queue_cmd``.

        ``data_out`` alone: Data-Out (WRITE-like). ``data_in_len`` alone: Data-In of that
        length (READ-like). ``data_out`` + ``bidi_in_len``: BIDI. Neither: no data. The
        command goes on the ring now if there is space, else waits (see :attr:`queued`).
        Raises ValueError for what the kernel rejects outright (TCM_INVALID_CDB_FIELD:
        larger than the data area or an entry over half the ring).
        """
        cdb = bytes(cdb)
        if not cdb or len(cdb) != scsi_command_size(cdb):
            raise ValueError(f"CDB of {len(cdb)} bytes; opcode {cdb[:1].hex()} implies "
                             f"{scsi_command_size(cdb) if cdb else '?'}")
        if bidi_in_len:
            if not data_out or data_in_len:
                raise ValueError("BIDI needs data_out and bidi_in_len (and no data_in_len)")
            direction = _Dir.BIDI
        elif data_out and data_in_len:
            raise ValueError("a command has one data direction; use bidi_in_len for BIDI")
        elif data_out:
            direction = _Dir.TO_DEVICE
        elif data_in_len:
            direction = _Dir.FROM_DEVICE
        else:
            direction = _Dir.NONE
        p = Pending(cdb, bytes(data_out), data_in_len, bidi_in_len, _dir=direction)
        p._n_data_blocks = -(-p.data_length // self.blk_size)
        n_blocks = p._n_data_blocks + -(-bidi_in_len // self.blk_size)
        if n_blocks > self.max_blocks:
            raise ValueError(f"{n_blocks} data blocks needed; the data area has {self.max_blocks}")
        # The kernel rejects an entry over half the ring when it builds it (with the real
        # iovec count); checking the worst case (one iovec per block) here keeps the
        # rejection synchronous even for commands that first wait in the queue.
        worst = command_entry_size(n_blocks, len(cdb))
        if worst > self.cmdr_size // 2:
            raise ValueError(f"entry of up to {worst} bytes is over half the "
                             f"{self.cmdr_size}-byte ring")
        if self.broken:
            raise FakeKernelError("the ring is broken (an earlier protocol error); reset needed")
        self._submitted.append(p)
        if len(self._submitted) > 2 * (len(self._commands) + len(self._qfull)) + 64:
            # Forget reaped commands (amortised): a long run would otherwise keep every
            # command's data alive until someone reads `pending`.
            self._submitted = [q for q in self._submitted if not q.done]
        # target_core_user.c queue_cmd_ring: once anything waits, everything waits behind it.
        if self._qfull or not self._queue_cmd_ring(p):
            self._qfull.append(p)
        return p

    def submit_tmr(self, tmr_type: int, aborted: Iterable[Pending | int] = ()) -> None:
        """A task management function aborted ``aborted`` (handles or in-flight cmd_ids).

        As ``tcmu_tmr_notify``: aborted commands still waiting in the queue are completed
        here with TASK ABORTED; the cmd_ids of those on the ring are listed in a TMR entry
        (if ``tmr_notification``) and still need their normal completion from userspace.
        """
        ids: list[int] = []
        for item in aborted:
            if isinstance(item, Pending):
                if item in self._qfull:
                    self._qfull.remove(item)
                    item.done, item.aborted, item.status = True, True, STATUS_TASK_ABORTED
                    continue
                if item.cmd_id is None or self._commands.get(item.cmd_id) is not item:
                    raise ValueError(f"{item!r} is neither queued nor in flight")
                ids.append(item.cmd_id)
            else:
                if item not in self._commands:
                    raise ValueError(f"cmd_id {item} is not in flight")
                ids.append(item)
        if not self.tmr_notification:
            return
        if self._tmr_queue or not self._queue_tmr_ring(tmr_type, ids):
            self._tmr_queue.append((tmr_type, ids))

    # --- the uio side

    def kick(self) -> int:
        """Userspace wrote to the uio fd: reap up to ``cmd_tail``, then run the wait queues.

        Returns how many commands were completed. Raises :class:`FakeKernelError` on a
        protocol violation (and the device stays broken, as in the kernel).
        """
        if self.broken:
            raise FakeKernelError("the ring is broken (an earlier protocol error); reset needed")
        tail = self.tail
        head = self.head
        if tail >= self.cmdr_size or tail % OP_ALIGN_SIZE:
            self._break(f"cmd_tail {tail} is outside the ring or not 8-byte aligned")
        if self._dist(self._last_cleaned, tail) > self._dist(self._last_cleaned, head):
            self._break(
                f"cmd_tail {tail} is beyond cmd_head {head} (kernel reaped up to "
                f"{self._last_cleaned}): userspace advanced past entries it never saw"
            )
        freed = False
        reaped = 0
        while self._last_cleaned != tail:
            off = self._last_cleaned
            base = MAILBOX_SIZE + off
            len_op = _U32.unpack_from(self.buffer, base + HDR_LEN_OP)[0]
            length, op = len_op & ~OP_MASK, len_op & OP_MASK
            if length < 8 or length > self._dist(off, tail) or off + length > self.cmdr_size:
                self._break(
                    f"cmd_tail {tail} does not fall on an entry boundary (entry at {off} is "
                    f"{length} bytes): userspace advanced cmd_tail by a wrong length"
                )
            freed = True
            if op in (RingOp.PAD, RingOp.TMR):
                self._last_cleaned = (off + length) % self.cmdr_size
                continue
            if op != RingOp.CMD:
                self._break(f"entry at ring offset {off} has opcode {op}: len_op overwritten?")
            uflags = self.buffer[base + HDR_UFLAGS]
            if uflags & UFlag.KEEP_BUF:
                self._break("TCMU_UFLAG_KEEP_BUF is not modelled by FakeKernel")
            cmd_id = _U16.unpack_from(self.buffer, base + HDR_CMD_ID)[0]
            p = self._commands.pop(cmd_id, None)
            if p is None:
                self._break(
                    f"cmd_id {cmd_id} in the slot at ring offset {off} is not in flight "
                    "(unknown id or double completion): the kernel marks the ring broken"
                )
            self._handle_completion(p, base, uflags)
            reaped += 1
            self._last_cleaned = (off + length) % self.cmdr_size
        # tcmu_handle_completions / tcmu_irqcontrol: TMRs first, then waiting commands.
        if freed and self._run_tmr_queue():
            self._run_qfull_queue()
        return reaped

    def reset_ring(self, err_level: int = 1) -> None:
        """``echo <err_level> > action/reset_ring`` (``tcmu_reset_ring``).

        Every command on the ring is completed by the kernel, with BUSY (``err_level`` 1:
        retryable) or CHECK CONDITION (2); cmd_head, cmd_tail and the reap position go back
        to 0; a broken ring is usable again; waiting TMRs are dropped and waiting commands
        are queued again. Userspace must attach a fresh :class:`~tcmu_py.ring.Ring`.
        """
        if err_level not in (1, 2):
            raise ValueError("reset_ring takes 1 (BUSY) or 2 (CHECK CONDITION)")
        status = STATUS_BUSY if err_level == 1 else STATUS_CHECK_CONDITION
        for cmd_id, p in sorted(self._commands.items()):
            self._free_blocks(p)
            heapq.heappush(self._free_ids, cmd_id)
            p.status, p.done = status, True
        self._commands.clear()
        self._last_cleaned = 0
        _U32.pack_into(self.buffer, MB_CMD_TAIL, 0)
        _U32.pack_into(self.buffer, MB_CMD_HEAD, 0)
        self.broken = False
        self._tmr_queue.clear()
        self._run_qfull_queue()

    def assert_idle(self) -> None:
        """Raise :class:`FakeKernelError` unless every command was completed and reaped.

        Also checks that no data block outside any command was written.
        """
        problems = []
        if self._commands:
            lost = ", ".join(
                f"{i} (opcode {p.cdb[0]:02X}h)" for i, p in sorted(self._commands.items())
            )
            problems.append(f"commands never completed: {lost}")
        if self._qfull:
            problems.append(f"{len(self._qfull)} commands still wait for ring space")
        if self._tmr_queue:
            problems.append(f"{len(self._tmr_queue)} TMR notifications still wait")
        if self._last_cleaned != self.head:
            problems.append(
                f"ring not fully reaped: kernel at {self._last_cleaned}, cmd_tail "
                f"{self.tail}, cmd_head {self.head} (missing completion or kick?)"
            )
        for dbi in range(self.max_blocks):
            if not self._bitmap[dbi]:
                self._check_poison(dbi)
        if problems:
            raise FakeKernelError("; ".join(problems))

    # --- target_core_user.c, queue side

    def _dist(self, from_off: int, to_off: int) -> int:
        return (to_off - from_off) % self.cmdr_size

    def _space_avail(self, cmd_size: int) -> bool:
        # is_ring_space_avail: the entry needs room for a PAD to the end if it does not
        # fit there; keep 1 byte unused so full and empty differ.
        head = self.head
        to_end = self.cmdr_size - head
        needed = cmd_size if to_end >= cmd_size else cmd_size + to_end
        free = self.cmdr_size - self._dist(self._last_cleaned, head) - 1
        return free >= needed

    def _insert_padding(self, cmd_size: int) -> int:
        head = self.head
        to_end = self.cmdr_size - head
        if to_end < cmd_size:
            base = MAILBOX_SIZE + head
            _U32.pack_into(self.buffer, base + HDR_LEN_OP, to_end | RingOp.PAD)
            self.buffer[base + HDR_CMD_ID : base + 8] = b"\0\0\0\0"
            _U32.pack_into(self.buffer, MB_CMD_HEAD, 0)
            head = 0
        return head

    def _alloc_blocks(self, n_data: int, n_bidi: int) -> tuple[list[int], int, int] | None:
        # tcmu_alloc_data_space / tcmu_get_empty_blocks: lowest free block first; an iovec
        # per run of consecutive blocks, counted separately for the Data-In (BIDI) part.
        if self.free_blocks < n_data + n_bidi:
            return None
        dbis: list[int] = []
        counts = []
        start = 0
        for n in (n_data, n_bidi):
            prev, iovs = -2, 0
            for _ in range(n):
                dbi = self._bitmap.index(0, start)
                start = dbi + 1
                self._check_poison(dbi)
                self._bitmap[dbi] = 1
                dbis.append(dbi)
                if dbi != prev + 1:
                    iovs += 1
                prev = dbi
            counts.append(iovs)
        self._used_blocks += len(dbis)
        return dbis, counts[0], counts[1]

    def _free_blocks(self, p: Pending) -> None:
        for dbi in p._dbis:
            self._bitmap[dbi] = 0
            off = self.data_off + dbi * self.blk_size
            self.buffer[off : off + self.blk_size] = self._poison_block
        self._used_blocks -= len(p._dbis)
        p._dbis = []

    def _check_poison(self, dbi: int, start: int = 0) -> None:
        off = self.data_off + dbi * self.blk_size
        # bytearray slices compare with memcmp (memoryview comparison unpacks item by item)
        if self.buffer[off + start : off + self.blk_size] != self._poison_block[start:]:
            self._break(
                f"data block {dbi} (mapping offset {off:#x}) was written while it belonged to "
                "no in-flight command (after completion, or past the end of an iovec): "
                "a real kernel would SIGBUS or lose the data"
            )

    def _alloc_cmd_id(self) -> int:
        # xa_alloc(XA_LIMIT(1, 0xffff)): the lowest free id.
        if self._free_ids and self._free_ids[0] < self._fresh_id:
            return heapq.heappop(self._free_ids)
        if self._fresh_id > MAX_CMD_ID:
            raise FakeKernelError("all 65535 cmd_ids are in flight (TCM_OUT_OF_RESOURCES)")
        self._fresh_id += 1
        return self._fresh_id - 1

    def _iovecs(self, dbis: list[int], length: int) -> list[tuple[int, int]]:
        # new_block_to_iov: extend the current iovec while blocks are consecutive.
        iovs: list[list[int]] = []
        prev = -2
        for dbi in dbis:
            chunk = min(length, self.blk_size)
            length -= chunk
            if dbi != prev + 1:
                iovs.append([self.data_off + dbi * self.blk_size, 0])
            iovs[-1][1] += chunk
            prev = dbi
        return [(b, n) for b, n in iovs]

    def _queue_cmd_ring(self, p: Pending) -> bool:
        n_data = p._n_data_blocks
        n_bidi = -(-p.bidi_in_len // self.blk_size)
        got = self._alloc_blocks(n_data, n_bidi)
        if got is None:
            return False
        dbis, iov_cnt, iov_bidi_cnt = got
        p._dbis = dbis
        cdb_len = len(p.cdb)
        size = command_entry_size(iov_cnt + iov_bidi_cnt, cdb_len)
        assert size <= self.cmdr_size // 2  # checked (worst case) by submit()
        if not self._space_avail(size):
            self._free_blocks(p)
            return False
        p.cmd_id = self._alloc_cmd_id()
        self._commands[p.cmd_id] = p
        head = self._insert_padding(size)
        base = MAILBOX_SIZE + head
        self.buffer[base : base + size] = bytes(size)
        _U32.pack_into(self.buffer, base + HDR_LEN_OP, size | RingOp.CMD)
        _U16.pack_into(self.buffer, base + HDR_CMD_ID, p.cmd_id)
        iovs = self._iovecs(dbis[:n_data], p.data_length)
        iovs += self._iovecs(dbis[n_data:], p.bidi_in_len)
        for i, (iov_base, iov_len) in enumerate(iovs):
            _IOVEC.pack_into(self.buffer, base + REQ_IOV + 16 * i, iov_base, iov_len)
        _U32.pack_into(self.buffer, base + REQ_IOV_CNT, iov_cnt)
        _U32.pack_into(self.buffer, base + REQ_IOV_BIDI_CNT, iov_bidi_cnt)
        if p._dir in (_Dir.TO_DEVICE, _Dir.BIDI):
            self._copy(dbis[:n_data], p.data_out, to_ring=True)
        cdb_off = base + max(REQ_IOV + 16 * len(iovs), CMD_ENTRY_SIZE)
        self.buffer[cdb_off : cdb_off + cdb_len] = p.cdb
        _U64.pack_into(self.buffer, base + REQ_CDB_OFF, cdb_off)
        _U32.pack_into(self.buffer, MB_CMD_HEAD, (head + size) % self.cmdr_size)
        self._notify()
        return True

    def _queue_tmr_ring(self, tmr_type: int, ids: list[int]) -> bool:
        size = -(-(TMR_ENTRY_SIZE + 2 * len(ids)) // OP_ALIGN_SIZE) * OP_ALIGN_SIZE
        if not self._space_avail(size):
            return False
        head = self._insert_padding(size)
        base = MAILBOX_SIZE + head
        self.buffer[base : base + size] = bytes(size)
        _U32.pack_into(self.buffer, base + HDR_LEN_OP, size | RingOp.TMR)
        self.buffer[base + TMR_TYPE] = tmr_type
        _U32.pack_into(self.buffer, base + TMR_CMD_CNT, len(ids))
        for i, cmd_id in enumerate(ids):
            _U16.pack_into(self.buffer, base + TMR_CMD_IDS + 2 * i, cmd_id)
        _U32.pack_into(self.buffer, MB_CMD_HEAD, (head + size) % self.cmdr_size)
        self._notify()
        return True

    def _notify(self) -> None:
        self.events += 1
        for callback in self._listeners:
            callback()

    # --- target_core_user.c, completion side

    def _copy(self, dbis: list[int], data: bytes, *, to_ring: bool) -> bytes:
        out = bytearray()
        pos = 0
        for dbi in dbis:
            off = self.data_off + dbi * self.blk_size
            chunk = min(self.blk_size, len(data) - pos) if to_ring else self.blk_size
            if to_ring:
                self.buffer[off : off + chunk] = data[pos : pos + chunk]
                pos += chunk
            else:
                out += self._mv[off : off + chunk]
        return bytes(out)

    def _gather(self, dbis: list[int], length: int) -> bytes:
        return self._copy(dbis, b"", to_ring=False)[:length]

    def _handle_completion(self, p: Pending, base: int, uflags: int) -> None:
        status = self.buffer[base + RSP_SCSI_STATUS]
        data_in = b""
        read_len_valid = False
        if uflags & UFlag.UNKNOWN_OP:
            # tcmu_handle_completion: userspace did not understand the entry.
            status = STATUS_CHECK_CONDITION
            p.unknown_op = True
        else:
            read_len = p.data_length
            rsp_read_len = _U32.unpack_from(self.buffer, base + RSP_READ_LEN)[0]
            # READ_LEN is honoured for DMA_FROM_DEVICE only, and only when non-zero.
            if p._dir is _Dir.FROM_DEVICE and uflags & UFlag.READ_LEN and rsp_read_len:
                read_len_valid = True
                read_len = min(read_len, rsp_read_len)
            skip_data = False
            if status == STATUS_CHECK_CONDITION:
                raw = bytes(self._mv[base + RSP_SENSE : base + RSP_SENSE + SENSE_BUFFERSIZE])
                p.sense = _trim_sense(raw)
                skip_data = not read_len_valid
            if not skip_data:
                if p._dir is _Dir.BIDI:
                    # gather_data_area(bidi=True) is passed se_cmd->data_length (the
                    # Data-Out length) and stops when the Data-In buffer is full.
                    n = min(read_len, p.bidi_in_len)
                    data_in = self._gather(p._dbis[p._n_data_blocks :], n)
                elif p._dir is _Dir.FROM_DEVICE:
                    data_in = self._gather(p._dbis, read_len)
            if read_len_valid:
                p.read_len = read_len
        self._check_iovec_tails(p)
        p.status = status
        p.data_in = data_in
        self._free_blocks(p)
        heapq.heappush(self._free_ids, p.cmd_id or 0)
        p.done = True

    def _check_iovec_tails(self, p: Pending) -> None:
        # The last block of each part is only partly covered by its iovec; the rest must
        # still hold the poison written when the block was freed.
        n = p._n_data_blocks
        for dbis, length in ((p._dbis[:n], p.data_length), (p._dbis[n:], p.bidi_in_len)):
            used = length % self.blk_size
            if dbis and used:
                self._check_poison(dbis[-1], used)

    def _run_tmr_queue(self) -> bool:
        while self._tmr_queue:
            tmr_type, ids = self._tmr_queue[0]
            if not self._queue_tmr_ring(tmr_type, ids):
                return False
            self._tmr_queue.popleft()
        return True

    def _run_qfull_queue(self) -> None:
        while self._qfull:
            if not self._queue_cmd_ring(self._qfull[0]):
                return
            self._qfull.popleft()

    def _break(self, message: str) -> NoReturn:
        self.broken = True
        raise FakeKernelError(message)
