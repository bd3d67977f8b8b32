"""The native loop's RBD *group* when librbd fails it, without a Ceph cluster.

The native loop sends plain READs / WRITEs that are adjacent in the ring and on the image as
ONE librbd operation (`tcmu_py_rbd_join` / `tcmu_py_rbd_send` in ``tcmu_py/_ring.c``), and
librbd's completion (`tcmu_py_rbd_done`) ends every command of the group alike
(`tcmu_py_job_end`). Here librbd is a fake: its six entry points (`tcmu_py.backend.RbdExtent`)
are cffi callbacks with the C signatures of ``_ring.c``'s typedefs, over a bytearray the
device's Python path shares. Each test sets how the fake fails the next operation:

1. ``rbd_aio_create_completion`` returns < 0: nothing is submitted, every command of the group
   is handed to Python, which runs it again (GOOD);
2. ``rbd_aio_writev`` / ``rbd_aio_readv`` returns < 0: the completion is released (once) and
   never called back, every command is handed to Python, which runs it again;
3. the completion returns a negative errno: every command's record carries it
   (`Command.native_error`), and Python answers as the ``ceph`` device does
   (`CephDevice._unanswered_in_c`): NOT READY at once for ETIMEDOUT (not run again), run again
   for EIO (GOOD, or WRITE ERROR / MEDIUM ERROR when the retry fails too);
4. a short result (a READ's return value not its length, a WRITE's neither 0 nor its length):
   every command handed to Python, no errno, run again.

Completions come both on a thread of the fake's (librbd's finisher) and synchronously inside
the submitting call. Every test checks: the group formed (the ``merged`` counter, one librbd
operation covering the four commands), every command answered exactly once (the harness checks
the ring is idle at close; each completion created is released exactly once), the statuses and
sense, the data afterwards, and that C serves the next group itself after the failure.

`test_a_read_after_a_failed_write_group_sees_the_writes`: a READ handed over while an
overlapping group was at librbd still comes after the group's WRITEs when the group fails and
they are run again by Python (D124).
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cffi
import pytest

from tcmu_py.backend import RbdExtent
from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.core import command
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.ceph.device import CephDevice
from tcmu_py.scsi.constants import Opcode
from tcmu_py.testing import cdbs, wait_until
from tcmu_py.testing.harness import RingHarness

BS = 512
BLOCKS = 2048  # 1 MiB
GROUP = 4  # commands in a group
CMD_BLOCKS = 8  # blocks per command
TIMEOUT = 20.0  # seconds any wait of this module may take

_FFI = cffi.FFI()
_FFI.cdef("""
struct iovec { void *iov_base; size_t iov_len; };
typedef void (*rbd_cb_t)(void *completion, void *arg);
""")
# _ring.c's tcmu_py_rbd_create_t, tcmu_py_rbd_rw_t, tcmu_py_rbd_ret_t, tcmu_py_rbd_release_t.
_CREATE = "int(void *, rbd_cb_t, void **)"
_RW = "int(void *, const struct iovec *, int, uint64_t, void *)"
_RET = "ssize_t(void *)"
_RELEASE = "void(void *)"


@dataclass
class Fault:
    """How the fake fails one librbd operation: ``create`` (the completion's creation returns
    -value), ``submit`` (the readv / writev call returns -value), ``errno`` (the completion
    returns -value, no byte moved), ``short`` (the completion returns `value`, no byte moved)."""

    kind: str
    value: int


@dataclass
class Op:
    """One operation submitted to the fake."""

    writing: bool
    offset: int
    iovcnt: int
    length: int


@dataclass
class _Completion:
    cb: Any
    arg: Any
    fault: Fault | None
    ret: int | None = None
    released: int = 0
    called: int = 0
    returned: bool = False  # its callback returned: C freed the group's job slots


@dataclass
class FakeLibrbd:
    """librbd's asynchronous vectored I/O over `store`, as C function addresses (`extent`).

    `faults` are taken one per operation (at its completion's creation), in order; with none
    left an operation moves its bytes and returns as librbd does (a READ its length, a WRITE
    0, or its length when `write_returns_length`). `inline`: complete inside the submitting
    call, else on the fake's finisher thread. Anything wrong seen in a callback (an unknown or
    twice released completion, a Python error) is kept in `errors`."""

    store: bytearray
    lock: threading.Lock
    inline: bool = False
    write_returns_length: bool = False
    faults: list[Fault] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    created: int = 0
    errors: list[str] = field(default_factory=list)
    #: The finisher completes an operation only once this is set (the test holds it open).
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()
        self._image = _FFI.new("char[1]")  # a real address for rbd_image_t
        self._completions: dict[int, _Completion] = {}
        self._next = 0x1000
        self._finisher_q: queue.SimpleQueue[tuple[int, Any, list[tuple[int, int]], int] | None]
        self._finisher_q = queue.SimpleQueue()
        self._finisher = threading.Thread(target=self._finish_loop, name="fake-librbd-fin",
                                          daemon=True)
        self._finisher.start()
        self._callbacks = (  # kept alive as long as C may call them
            _FFI.callback(_CREATE, self._create, onerror=self._on_error_int),
            _FFI.callback(_RW, self._readv, onerror=self._on_error_int),
            _FFI.callback(_RW, self._writev, onerror=self._on_error_int),
            _FFI.callback(_RET, self._ret, onerror=self._on_error_int),
            _FFI.callback(_RELEASE, self._release, onerror=self._on_error),
        )

    @property
    def extent(self) -> RbdExtent:
        def addr(c: Any) -> int:
            return int(_FFI.cast("uintptr_t", c))

        create, readv, writev, ret, release = self._callbacks
        return RbdExtent(addr(self._image), addr(create), addr(readv), addr(writev), addr(ret),
                         addr(release))

    # -- the C entry points ----------------------------------------------------------------

    def _on_error(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.errors.append(f"{exc_type.__name__}: {exc}")

    def _on_error_int(self, exc_type: Any, exc: Any, tb: Any) -> int:
        self._on_error(exc_type, exc, tb)
        return -errno.EFAULT

    def _create(self, arg: Any, cb: Any, out: Any) -> int:
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            self.created += 1
            if fault is not None and fault.kind == "create":
                return -fault.value
            cid = self._next
            self._next += 16
            self._completions[cid] = _Completion(cb, arg, fault)
        out[0] = _FFI.cast("void *", cid)
        return 0

    def _readv(self, image: Any, iov: Any, iovcnt: int, off: int, comp: Any) -> int:
        return self._submit(False, image, iov, iovcnt, off, comp)

    def _writev(self, image: Any, iov: Any, iovcnt: int, off: int, comp: Any) -> int:
        return self._submit(True, image, iov, iovcnt, off, comp)

    def _submit(self, writing: bool, image: Any, iov: Any, iovcnt: int, off: int,
                comp: Any) -> int:
        cid = int(_FFI.cast("uintptr_t", comp))
        if image != self._image:
            self.errors.append("an operation on another image")
        bufs = [(int(_FFI.cast("uintptr_t", iov[i].iov_base)), int(iov[i].iov_len))
                for i in range(iovcnt)]
        with self.lock:
            c = self._completions.get(cid)
            if c is None or c.released:
                self.errors.append(f"submitted on completion {cid:#x}, not a live one")
                return -errno.EINVAL
            self.ops.append(Op(writing, off, iovcnt, sum(n for _, n in bufs)))
            if c.fault is not None and c.fault.kind == "submit":
                return -c.fault.value  # C releases it; it never completes
        if self.inline:
            self._complete(cid, writing, bufs, off)
        else:
            self._finisher_q.put((cid, writing, bufs, off))
        return 0

    def _ret(self, comp: Any) -> int:
        with self.lock:
            c = self._completions.get(int(_FFI.cast("uintptr_t", comp)))
            if c is None or c.released or c.ret is None:
                self.errors.append("return value of a completion not complete")
                return -errno.EFAULT
            return c.ret

    def _release(self, comp: Any) -> None:
        with self.lock:
            c = self._completions.get(int(_FFI.cast("uintptr_t", comp)))
            if c is None:
                self.errors.append("an unknown completion released")
                return
            c.released += 1

    # -- librbd's side ---------------------------------------------------------------------

    def _complete(self, cid: int, writing: bool, bufs: list[tuple[int, int]], off: int) -> None:
        """Do the operation's I/O (unless it fails) and call the completion's callback."""
        total = sum(n for _, n in bufs)
        with self.lock:
            c = self._completions[cid]
            fault = c.fault
            if fault is not None and fault.kind == "errno":
                c.ret = -fault.value
            elif fault is not None and fault.kind == "short":
                c.ret = fault.value
            else:
                pos = off
                for base, n in bufs:
                    p = _FFI.cast("void *", base)
                    if writing:
                        self.store[pos:pos + n] = _FFI.buffer(p, n)[:]
                    else:
                        _FFI.memmove(p, self.store[pos:pos + n], n)
                    pos += n
                c.ret = total if not writing or self.write_returns_length else 0
            c.called += 1
            cb, arg = c.cb, c.arg
        cb(_FFI.cast("void *", cid), arg)  # C's tcmu_py_rbd_done: it calls _ret, _release
        with self.lock:
            c.returned = True

    def settled(self) -> bool:
        """No operation in flight: every callback returned, so C freed every job slot (it
        frees them after the kick that shows the commands done: a command sent at once
        after could find them still taken, and go to Python as overlapping)."""
        with self.lock:
            return all(c.returned or (c.released and not c.called)
                       for c in self._completions.values())

    def _finish_loop(self) -> None:
        while True:
            item = self._finisher_q.get()
            if item is None:
                return
            if not self.gate.wait(TIMEOUT):
                self.errors.append("the test never opened the gate")
            try:
                self._complete(*item)
            except Exception as exc:  # noqa: BLE001 - kept for the test to report
                self.errors.append(f"finisher: {exc!r}")

    def close(self) -> None:
        self._finisher_q.put(None)
        self._finisher.join(TIMEOUT)
        assert not self._finisher.is_alive(), "the fake's finisher did not stop"

    def check(self) -> None:
        """Nothing went wrong in a callback, and every completion created was released
        exactly once, and called back at most once (never after a refused submission)."""
        assert not self.errors, self.errors
        with self.lock:
            for cid, c in self._completions.items():
                assert c.released == 1, f"completion {cid:#x} released {c.released} times"
                assert c.called <= 1, f"completion {cid:#x} called back {c.called} times"


class MemBackend:
    """The device's Python path over the fake's bytearray: what the device runs again."""

    block_size = BS
    write_cache = False

    def __init__(self, rbd: FakeLibrbd) -> None:
        self.rbd = rbd
        self.size = len(rbd.store)
        #: Python's I/O: ("r" | "w", offset, length).
        self.calls: list[tuple[str, int, int]] = []
        #: errno Python's I/O fails with (0: it succeeds).
        self.fail_errno = 0

    def _check(self, kind: str, offset: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append((kind, offset, sum(len(b) for b in bufs)))
        if self.fail_errno:
            raise OSError(self.fail_errno, "fake librbd refuses")

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self.rbd.lock:
            self._check("r", offset, bufs)
            for b in bufs:
                b[:] = self.rbd.store[offset:offset + len(b)]
                offset += len(b)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self.rbd.lock:
            self._check("w", offset, bufs)
            for b in bufs:
                self.rbd.store[offset:offset + len(b)] = b
                offset += len(b)

    def flush(self) -> None:
        pass

    def file_extent(self) -> RbdExtent | None:
        return self.rbd.extent


class FakeRbdDevice(BlockDevice):
    """A `BlockDevice` answering a READ / WRITE the loop handed over as the ``ceph`` device
    does (`CephDevice._unanswered_in_c`: NOT READY from a "cluster did not answer" errno, else
    run again here), and noting every one with its errno."""

    backend: MemBackend

    def __init__(self, config: DeviceConfig, backend: MemBackend) -> None:
        super().__init__(config, backend)
        #: (opcode, LBA, native_error) of every READ / WRITE Python got.
        self.handed: list[tuple[int, int, int]] = []
        #: Seconds a WRITE run again here takes (a slow re-run: a READ that did not wait
        #: for it would overtake it every time, not by chance).
        self.write_delay = 0.0

    def _note(self, cmd: Command) -> None:
        lba = int.from_bytes(cmd.cdb[2:6], "big") if cmd.cdb[0] in (0x28, 0x2A) else -1
        self.handed.append((cmd.cdb[0], lba, cmd.native_error))

    @command(Opcode.READ_6)
    @command(Opcode.READ_10)
    @command(Opcode.READ_12)
    @command(Opcode.READ_16)
    def read(self, cmd: Command) -> int:
        self._note(cmd)
        CephDevice._unanswered_in_c(cmd, False)
        return super().read(cmd)

    @command(Opcode.WRITE_6)
    @command(Opcode.WRITE_10)
    @command(Opcode.WRITE_12)
    @command(Opcode.WRITE_16)
    def write(self, cmd: Command) -> None:
        self._note(cmd)
        CephDevice._unanswered_in_c(cmd, True)
        if self.write_delay:
            time.sleep(self.write_delay)
        super().write(cmd)


@dataclass
class Rig:
    rbd: FakeLibrbd
    backend: MemBackend
    device: FakeRbdDevice
    h: RingHarness

    def merged(self) -> int:
        return self.h.runner.refresh_counters().merged

    def executed(self) -> int:
        self.h.runner.refresh_counters()
        loop = self.h.runner.native
        assert loop is not None
        return int(loop.executed)


@contextlib.contextmanager
def _rig(inline: bool, workers: int = 4) -> Iterator[Rig]:
    """A device served by a native loop over the fake librbd; its POWER ON RESET unit
    attention taken. Completions on the fake's thread, or (`inline`) inside the submitting
    call. At the end: every command answered exactly once, every completion released once."""
    store = bytearray(BLOCKS * BS)
    rbd = FakeLibrbd(store, threading.Lock(), inline=inline)
    backend = MemBackend(rbd)
    config = DeviceConfig("fakerbd0", "fakerbd", "", BLOCKS * BS, BS, write_cache=False)
    device = FakeRbdDevice(config, backend)
    h = RingHarness(device, workers=workers, native=True)
    try:
        assert h.runner.native is not None, "no native loop for an RbdExtent"
        first = h.submit(cdbs.test_unit_ready())
        h.wait([first], TIMEOUT)
        assert (first.status, first.sense[12], first.sense[13]) == (2, 0x29, 0x00)
        yield Rig(rbd, backend, device, h)
    finally:
        rbd.gate.set()
        h.close()  # every command answered exactly once
        rbd.close()
    rbd.check()


@pytest.fixture(params=["finisher", "inline"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    with _rig(request.param == "inline") as r:
        yield r


def _pattern(lba: int, tag: int) -> bytes:
    return bytes([(lba + tag) & 0xFF, tag & 0xFF]) * (CMD_BLOCKS * BS // 2)


def _lbas(start: int) -> list[int]:
    return [start + k * CMD_BLOCKS for k in range(GROUP)]


def _write_group(r: Rig, start: int, tag: int) -> list[Any]:
    """Four adjacent WRITE(10)s at `start` in one batch; waits for their answers."""
    items = [(cdbs.write10(lba, CMD_BLOCKS), _pattern(lba, tag), 0) for lba in _lbas(start)]
    pending = r.h.submit_many(items)
    r.h.wait(pending, TIMEOUT)
    assert wait_until(r.rbd.settled, TIMEOUT), "librbd operations still in flight"
    return pending


def _read_group(r: Rig, start: int) -> list[Any]:
    items = [(cdbs.read10(lba, CMD_BLOCKS), b"", CMD_BLOCKS * BS) for lba in _lbas(start)]
    pending = r.h.submit_many(items)
    r.h.wait(pending, TIMEOUT)
    assert wait_until(r.rbd.settled, TIMEOUT), "librbd operations still in flight"
    return pending


def _one_op(r: Rig, ops_before: int, writing: bool, start: int) -> None:
    """The group went to librbd as one operation (or was meant to: `ops` counts only those
    submitted), covering its four commands."""
    assert len(r.rbd.ops) == ops_before + 1, r.rbd.ops[ops_before:]
    op = r.rbd.ops[-1]
    assert (op.writing, op.offset, op.length) == (writing, start * BS, GROUP * CMD_BLOCKS * BS)
    assert op.iovcnt >= GROUP


def _c_serves_again(r: Rig, start: int, tag: int) -> None:
    """After the failure, a new group of WRITEs and one of READs are C's: one librbd
    operation each, merged, nothing for Python, the data read back."""
    handed, calls, merged = len(r.device.handed), len(r.backend.calls), r.merged()
    executed, ops = r.executed(), len(r.rbd.ops)
    assert [p.status for p in _write_group(r, start, tag)] == [0] * GROUP
    _one_op(r, ops, True, start)
    reads = _read_group(r, start)
    assert [p.status for p in reads] == [0] * GROUP
    assert [p.data_in for p in reads] == [_pattern(lba, tag) for lba in _lbas(start)]
    _one_op(r, ops + 1, False, start)
    assert r.merged() - merged == 2 * (GROUP - 1)
    assert r.executed() - executed == 2 * GROUP
    assert (len(r.device.handed), len(r.backend.calls)) == (handed, calls), \
        "C handed commands to Python after the failure"


def _prepare(r: Rig, start: int, tag: int) -> None:
    """Known data at `start`, written by C (for a READ group to read back)."""
    assert [p.status for p in _write_group(r, start, tag)] == [0] * GROUP


def _sense(p: Any) -> tuple[int, int, int, int]:
    """Status, sense key, ASC, ASCQ (-1s: no sense)."""
    if len(p.sense) < 14:
        return (p.status, -1, -1, -1)
    return (p.status, p.sense[2] & 0xF, p.sense[12], p.sense[13])


def _fail_group(r: Rig, writing: bool, start: int, fault: Fault) -> tuple[list[Any], int]:
    """Send a group (WRITEs of tag 2, or READs) that the fake fails with `fault`. Returns the
    answers and how many operations the fake saw before."""
    ops, merged, created = len(r.rbd.ops), r.merged(), r.rbd.created
    r.rbd.faults.append(fault)
    pending = _write_group(r, start, 2) if writing else _read_group(r, start)
    assert not r.rbd.faults, "the fault was not used"
    assert r.rbd.created == created + 1, "not one completion for the group"
    assert r.merged() - merged == GROUP - 1, "the commands did not form one group"
    return pending, ops


def _answered_good(rig: Rig, pending: Sequence[Any], writing: bool, start: int) -> None:
    """Every command of the group at `start` GOOD after Python ran it again: the image holds
    the WRITEs' data (pattern 2) or still the prepared one (1), which the READs returned."""
    assert [p.status for p in pending] == [0] * GROUP
    tag = 2 if writing else 1
    assert _data(rig, start) == [_pattern(lba, tag) for lba in _lbas(start)]
    if not writing:
        assert [p.data_in for p in pending] == [_pattern(lba, 1) for lba in _lbas(start)]


def _sent_failed_and_run_again(rig: Rig, writing: bool, start: int, fault: Fault) -> None:
    """A group at `start` sent to librbd as one operation that `fault` fails without an
    errno: every command Python's, run again there, GOOD; then C serves the next ones."""
    _prepare(rig, start, 1)
    pending, ops = _fail_group(rig, writing, start, fault)
    _one_op(rig, ops, writing, start)
    assert sorted(rig.device.handed) == _handed(rig, writing, start, 0)
    _answered_good(rig, pending, writing, start)
    _c_serves_again(rig, start, 3)


def _handed(r: Rig, writing: bool, start: int, native_error: int) -> list[tuple[int, int, int]]:
    op = 0x2A if writing else 0x28
    return [(op, lba, native_error) for lba in _lbas(start)]


def _data(r: Rig, start: int) -> list[bytes]:
    with r.rbd.lock:
        return [bytes(r.rbd.store[lba * BS:(lba + CMD_BLOCKS) * BS]) for lba in _lbas(start)]


@pytest.mark.parametrize("writing", [True, False], ids=["write", "read"])
def test_a_group_whose_completion_cannot_be_created_is_run_again_by_python(
        rig: Rig, writing: bool) -> None:
    """``rbd_aio_create_completion`` fails (no memory): nothing is submitted, every command of
    the group is Python's, without an errno, and Python runs it again: GOOD, data right."""
    start = 64
    _prepare(rig, start, 1)
    pending, ops = _fail_group(rig, writing, start, Fault("create", errno.ENOMEM))
    assert len(rig.rbd.ops) == ops, "submitted without a completion"
    assert sorted(rig.device.handed) == _handed(rig, writing, start, 0)
    _answered_good(rig, pending, writing, start)
    _c_serves_again(rig, start, 3)


@pytest.mark.parametrize("writing", [True, False], ids=["write", "read"])
@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOMEM])
def test_a_group_librbd_refuses_at_submission_is_run_again_by_python(
        rig: Rig, writing: bool, err: int) -> None:
    """``rbd_aio_writev`` / ``rbd_aio_readv`` returns < 0: the completion is released once and
    never called back (`FakeLibrbd.check`), every command is Python's, which runs it again."""
    _sent_failed_and_run_again(rig, writing, 256, Fault("submit", err))


@pytest.mark.parametrize("writing", [True, False], ids=["write", "read"])
def test_a_group_failing_with_etimedout_answers_not_ready_without_running_again(
        rig: Rig, writing: bool) -> None:
    """The cluster did not answer within osd_op_timeout: every command's record carries
    ETIMEDOUT and Python answers NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY at
    once, without running it again (the image keeps its old data)."""
    start = 512
    _prepare(rig, start, 1)
    calls = len(rig.backend.calls)
    pending, ops = _fail_group(rig, writing, start, Fault("errno", errno.ETIMEDOUT))
    _one_op(rig, ops, writing, start)
    for p in pending:
        assert _sense(p) == (2, 2, 4, 1), p
    assert sorted(rig.device.handed) == _handed(rig, writing, start, errno.ETIMEDOUT)
    assert len(rig.backend.calls) == calls, "run again after ETIMEDOUT"
    assert _data(rig, start) == [_pattern(lba, 1) for lba in _lbas(start)]
    _c_serves_again(rig, start, 3)


@pytest.mark.parametrize("writing", [True, False], ids=["write", "read"])
@pytest.mark.parametrize("retry_fails", [False, True], ids=["retry-ok", "retry-fails"])
def test_a_group_failing_with_eio_is_run_again_with_its_errno(
        rig: Rig, writing: bool, retry_fails: bool) -> None:
    """The completion returns -EIO: every command's record carries EIO and Python runs it
    again. GOOD when that succeeds; WRITE ERROR / UNRECOVERED READ ERROR when it fails too."""
    start = 768
    _prepare(rig, start, 1)
    if retry_fails:
        rig.backend.fail_errno = errno.EIO
    pending, ops = _fail_group(rig, writing, start, Fault("errno", errno.EIO))
    rig.backend.fail_errno = 0
    _one_op(rig, ops, writing, start)
    assert sorted(rig.device.handed) == _handed(rig, writing, start, errno.EIO)
    assert sorted(c[:2] for c in rig.backend.calls[-GROUP:]) == [
        ("w" if writing else "r", lba * BS) for lba in _lbas(start)]
    if retry_fails:
        want = (3, 0x0C, 0x00) if writing else (3, 0x11, 0x00)
        for p in pending:
            assert _sense(p) == (2, *want), p
        assert _data(rig, start) == [_pattern(lba, 1) for lba in _lbas(start)]
    else:
        _answered_good(rig, pending, writing, start)
    _c_serves_again(rig, start, 3)


@pytest.mark.parametrize(("writing", "ret"), [
    (True, GROUP * CMD_BLOCKS * BS - BS),  # a WRITE: neither 0 nor its length
    (True, BS),
    (False, GROUP * CMD_BLOCKS * BS - BS),  # a READ: not its length
    (False, 0),
], ids=["write-one-block-short", "write-one-block", "read-one-block-short", "read-nothing"])
def test_a_short_group_is_run_again_by_python(rig: Rig, writing: bool, ret: int) -> None:
    """librbd's return value says not every byte moved: every command is Python's, without
    an errno, and Python runs it again: GOOD, data right."""
    _sent_failed_and_run_again(rig, writing, 1024, Fault("short", ret))


def test_a_write_returning_its_length_is_good(rig: Rig) -> None:
    """librbd answers a WRITE 0 or its length (both GOOD in C, `tcmu_py_rbd_done`): with the
    length, the group is C's alone, nothing for Python."""
    rig.rbd.write_returns_length = True
    _c_serves_again(rig, 1536, 4)



def test_a_read_after_a_failed_write_group_sees_the_writes() -> None:
    """Ring order among overlapping READ/WRITEs (docs/reliability.md D87, D124), as
    `test_native_loop.py::test_a_failed_worker_command_is_python_s_and_fences_what_overlaps_it`
    demands of a file worker's failed command: a READ after a WRITE group in the ring, of the
    group's blocks, is handed to Python *ordered* while the group is at librbd (it waits for
    the group: `fence_busy`). The group then fails with EIO, and its WRITEs go to Python to be
    run again (the ``ceph`` device runs again any failure but the cluster's silence). The READ
    must return what they write: the WRITEs are handed ordered, numbered as they came, so the
    READ still waits for them, and Python runs them on its loop thread, never behind the READ.
    (Before D124 the READ returned the old data: it ran as soon as the group ended.)"""
    with _rig(inline=False) as r:
        start = 1280
        _prepare(r, start, 1)
        loop = r.h.runner.native
        assert loop is not None
        r.rbd.gate.clear()  # the group stays at librbd until the READ was handed over
        r.rbd.faults.append(Fault("errno", errno.EIO))
        r.device.write_delay = 0.1
        items = [(cdbs.write10(lba, CMD_BLOCKS), _pattern(lba, 2), 0) for lba in _lbas(start)]
        items.append((cdbs.read10(start, CMD_BLOCKS), b"", CMD_BLOCKS * BS))
        pending = r.h.submit_many(items)
        assert wait_until(lambda: loop.fences == 1, TIMEOUT), "the READ was not handed over"
        r.rbd.gate.set()
        r.h.wait(pending, TIMEOUT)
        assert [p.status for p in pending] == [0] * (GROUP + 1)
        assert _data(r, start) == [_pattern(lba, 2) for lba in _lbas(start)]
        assert pending[-1].data_in == _pattern(start, 2), "the READ overtook the WRITE"
