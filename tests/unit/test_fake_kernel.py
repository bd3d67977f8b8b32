"""FakeKernel behaves like target_core_user.c: layout, block allocation, back-pressure, checks."""

from __future__ import annotations

import select
import struct
import weakref
from collections.abc import Sequence
from typing import Any

import pytest

from tcmu_py.errors import RingError
from tcmu_py.ring import (
    HDR_UFLAGS,
    MAILBOX_SIZE,
    MB_CMD_TAIL,
    Completion,
    Ring,
    RingCommand,
    TmrType,
    UFlag,
    command_entry_size,
)
from tcmu_py.testing.fake_kernel import FakeKernel, FakeKernelError
from tcmu_py.testing.fake_uio import FakeUio

GOOD = 0x00
TASK_ABORTED = 0x40


def cdb10(opcode: int, tag: int) -> bytes:
    return struct.pack(">BBIBHB", opcode, 0, tag, 0, 0, 0)


def read(tag: int = 0) -> bytes:
    return cdb10(0x28, tag)


def write(tag: int = 0) -> bytes:
    return cdb10(0x2A, tag)


def tag_of(cdb: bytes) -> int:
    return int.from_bytes(cdb[2:6], "big")


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag * 7 + i) & 0xFF for i in range(length))


def fill(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)
    assert pos == len(data)


def gather(views: list[memoryview]) -> bytes:
    return b"".join(v.tobytes() for v in views)


def entry_iovecs(fk: FakeKernel, ring_off: int) -> list[tuple[int, int]]:
    base = MAILBOX_SIZE + ring_off
    n_out, n_bidi = struct.unpack_from("<II", fk.buffer, base + 8)
    return [struct.unpack_from("<QQ", fk.buffer, base + 48 + 16 * i) for i in range(n_out + n_bidi)]


def entry_len(fk: FakeKernel, ring_off: int) -> int:
    return int(struct.unpack_from("<I", fk.buffer, MAILBOX_SIZE + ring_off)[0] & ~7)


def serve_all(fk: FakeKernel, ring: Ring, outstanding: Sequence[RingCommand] = ()) -> None:
    """Complete everything GOOD, newest first, until the fake kernel has nothing pending.

    ``outstanding``: commands dequeued earlier and not completed yet.
    """
    todo = list(outstanding)
    for _ in range(1000):
        todo += ring.dequeue()[0]
        for c in reversed(todo):
            ring.complete(c.cmd_id, GOOD)
        todo = []
        fk.kick()
        if not fk.pending:
            return
    raise AssertionError("did not drain")


def test_mailbox_layout() -> None:
    fk = FakeKernel(cmdr_size=4096 - 128, data_size=16 * 4096)
    version, flags, cmdr_off, cmdr_size, head = struct.unpack_from("<HHIII", fk.buffer, 0)
    assert (version, flags, cmdr_off, cmdr_size, head) == (2, 15, 128, 4096 - 128, 0)
    assert len(fk.buffer) == 4096 + 16 * 4096 and fk.data_off == 4096


@pytest.mark.parametrize(
    "kw",
    [
        {"cmdr_size": 1001},
        {"cmdr_size": 64},
        {"data_size": 1000},
        {"ring_offset": 12},
        {"ring_offset": 4096},
    ],
)
def test_rejects_bad_geometry(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeKernel(**{"cmdr_size": 4096, "data_size": 8192, **kw})


def test_entry_size_and_cdb_placement() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=64 * 512, page_size=512)
    fk.submit(write(1), data_out=bytes(700))  # 2 blocks, contiguous: 1 iovec
    assert entry_len(fk, 0) == command_entry_size(1, 10) == 112 + 16
    cdb_off = struct.unpack_from("<Q", fk.buffer, MAILBOX_SIZE + 24)[0]
    assert cdb_off == MAILBOX_SIZE + 112  # right after the 112-byte base
    assert entry_iovecs(fk, 0) == [(fk.data_off, 700)]
    fk.submit(bytes([0x88]) + bytes(15))  # 16-byte CDB, no data
    assert entry_len(fk, 128) == 112 + 16


def test_blocks_merge_when_contiguous_and_split_when_not() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=8 * 1024, page_size=512, data_pages_per_blk=2)
    ring = Ring(fk.buffer)
    blk = 1024
    a = fk.submit(write(1), data_out=pattern(1, blk))  # block 0
    b = fk.submit(write(2), data_out=pattern(2, blk))  # block 1
    c = fk.submit(write(3), data_out=pattern(3, blk))  # block 2
    cmds = {tag_of(x.cdb): x for x in ring.dequeue()[0]}
    ring.complete(cmds[2].cmd_id, GOOD)  # frees block 1 only
    fk.kick()
    assert b.done and not a.done and not c.done
    d = fk.submit(write(4), data_out=pattern(4, 3 * blk - 100))  # blocks 1, 3, 4
    off = fk.head - entry_len(fk, fk.head - command_entry_size(2, 10))
    assert entry_iovecs(fk, off) == [
        (fk.data_off + 1 * blk, blk),
        (fk.data_off + 3 * blk, 2 * blk - 100),
    ]
    assert entry_len(fk, off) == command_entry_size(2, 10) == 112 + 16
    [cmd_d] = ring.dequeue()[0]
    assert [len(v) for v in cmd_d.data_out] == [blk, 2 * blk - 100]
    assert gather(cmd_d.data_out) == pattern(4, 3 * blk - 100)
    ring.complete_many([Completion(x, GOOD) for x in (cmds[1].cmd_id, cmds[3].cmd_id,
                                                      cmd_d.cmd_id)])
    fk.kick()
    assert d.done
    fk.assert_idle()


def test_many_iovecs_grow_the_entry() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=16 * 256, page_size=256)
    ring = Ring(fk.buffer)
    holders = [fk.submit(write(i), data_out=bytes(256)) for i in range(8)]
    cmds = ring.dequeue()[0]
    # free every other block: 1, 3, 5, 7
    ring.complete_many([Completion(c.cmd_id, GOOD) for c in cmds if tag_of(c.cdb) % 2])
    fk.kick()
    big = fk.submit(read(99), data_in_len=256 * 8)  # blocks 1,3,5,7-11 -> 4 iovecs
    [cmd] = ring.dequeue()[0]
    assert [len(v) for v in cmd.data_in] == [256, 256, 256, 256 * 5]
    assert fk.head - ring.cursor == 0
    fill(cmd.data_in, pattern(9, 2048))
    rest = [c for c in cmds if not tag_of(c.cdb) % 2] + [cmd]
    ring.complete_many([Completion(c.cmd_id, GOOD) for c in rest])
    fk.kick()
    assert big.data_in == pattern(9, 2048)
    assert all(h.done for h in holders)
    fk.assert_idle()


def test_bidi_iovecs_count_separately() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=16 * 256, page_size=256)
    fk.submit(cdb10_bidi(), data_out=bytes(300), bidi_in_len=200)
    n_out, n_bidi = struct.unpack_from("<II", fk.buffer, MAILBOX_SIZE + 8)
    assert (n_out, n_bidi) == (1, 1)
    # blocks 0-1 for Data-Out, block 2 for Data-In: contiguous, but never merged across parts
    assert entry_iovecs(fk, 0) == [(fk.data_off, 300), (fk.data_off + 512, 200)]


def cdb10_bidi() -> bytes:
    return bytes([0x53]) + bytes(9)


def test_cmd_ids_lowest_free_first() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=8192, page_size=512)
    ring = Ring(fk.buffer)
    ps = [fk.submit(read(i), data_in_len=10) for i in range(3)]
    assert [p.cmd_id for p in ps] == [1, 2, 3]
    cmds = ring.dequeue()[0]
    ring.complete(cmds[1].cmd_id, GOOD)
    fk.kick()
    assert fk.submit(read(9), data_in_len=10).cmd_id == 2
    assert fk.submit(read(9), data_in_len=10).cmd_id == 4


def test_ring_full_back_pressure_keeps_fifo_order() -> None:
    # 128-byte entries in a 512-byte ring: 3 fit (one byte always stays free)
    fk = FakeKernel(cmdr_size=512, data_size=64 * 256, page_size=256)
    ring = Ring(fk.buffer)
    events = []
    fk.add_listener(lambda: events.append(fk.head))
    ps = [fk.submit(read(i), data_in_len=10) for i in range(6)]
    assert (fk.in_flight, fk.queued, len(events)) == (3, 3, 3)
    cmds = ring.dequeue()[0]
    assert [tag_of(c.cdb) for c in cmds] == [0, 1, 2]
    ring.complete(cmds[2].cmd_id, GOOD)  # steals slot 0
    fk.kick()
    assert (fk.in_flight, fk.queued) == (3, 2)  # one slot freed, the oldest waiter went in
    [fourth] = ring.dequeue()[0]
    assert tag_of(fourth.cdb) == 3
    serve_all(fk, ring, [cmds[0], cmds[1], fourth])
    assert all(p.done and p.status == GOOD for p in ps)
    fk.assert_idle()


def test_data_area_full_back_pressure() -> None:
    fk = FakeKernel(cmdr_size=4096, data_size=4 * 256, page_size=256)
    ring = Ring(fk.buffer)
    ps = [fk.submit(write(i), data_out=pattern(i, 512)) for i in range(3)]
    assert (fk.in_flight, fk.queued, fk.free_blocks) == (2, 1, 0)
    small = fk.submit(read(7), data_in_len=1)  # would fit, but waits behind the queue
    assert fk.queued == 2
    seen = []
    for _ in range(5):
        cmds = ring.dequeue()[0]
        for c in cmds:
            if c.data_out is not c.data_in or tag_of(c.cdb) != 7:
                assert gather(c.data_out) == pattern(tag_of(c.cdb), 512)
            seen.append(tag_of(c.cdb))
            ring.complete(c.cmd_id, GOOD)
        fk.kick()
    assert seen == [0, 1, 2, 7]
    assert all(p.done for p in [*ps, small])
    fk.assert_idle()


def test_oversized_requests_rejected() -> None:
    fk = FakeKernel(cmdr_size=512, data_size=4 * 256, page_size=256)
    with pytest.raises(ValueError, match="data blocks"):
        fk.submit(write(), data_out=bytes(5 * 256))
    fk2 = FakeKernel(cmdr_size=256, data_size=64 * 256, page_size=256)
    with pytest.raises(ValueError, match="half"):
        fk2.submit(write(), data_out=bytes(20 * 256))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((bytes(10),), "implies 6"),
        ((read(), b"x", 5), "one data direction"),
        ((read(), b"", 5, 5), "BIDI"),
    ],
)
def test_submit_validation(args: tuple, message: str) -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    with pytest.raises(ValueError, match=message):
        fk.submit(*args)


# --- protocol violations fail loudly


def test_unknown_cmd_id_at_tail_breaks_the_ring() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    fk.submit(read(1), data_in_len=10)
    struct.pack_into("<H", fk.buffer, MAILBOX_SIZE + 4, 777)
    struct.pack_into("<I", fk.buffer, MB_CMD_TAIL, fk.head)
    with pytest.raises(FakeKernelError, match="cmd_id 777"):
        fk.kick()
    assert fk.broken
    with pytest.raises(FakeKernelError, match="broken"):
        fk.submit(read(2))


def test_double_completion_through_the_raw_ring_is_caught() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=10)
    fk.submit(read(2), data_in_len=10)
    first, second = ring.dequeue()[0]
    ring.complete(first.cmd_id, GOOD)
    fk.kick()
    # bypass Ring's own check: write first's id into the next slot as a buggy daemon would
    slot = ring.tail
    struct.pack_into("<H", fk.buffer, MAILBOX_SIZE + slot + 4, first.cmd_id)
    struct.pack_into("<I", fk.buffer, MB_CMD_TAIL, fk.head)
    with pytest.raises(FakeKernelError, match="double completion"):
        fk.kick()


def test_tail_beyond_head_is_caught() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    fk.submit(read(1), data_in_len=10)
    struct.pack_into("<I", fk.buffer, MB_CMD_TAIL, fk.head + 8)
    with pytest.raises(FakeKernelError, match="beyond cmd_head"):
        fk.kick()


def test_tail_inside_an_entry_is_caught() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    fk.submit(read(1), data_in_len=10)
    fk.submit(read(2), data_in_len=10)
    struct.pack_into("<I", fk.buffer, MB_CMD_TAIL, 64)
    with pytest.raises(FakeKernelError, match="entry boundary"):
        fk.kick()


def test_lost_command_is_reported() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=10)
    ring.dequeue()
    with pytest.raises(FakeKernelError, match=r"never completed: 1 \(opcode 28h\)"):
        fk.assert_idle()


def test_missing_kick_is_reported() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=10)
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    with pytest.raises(FakeKernelError, match="missing completion or kick"):
        fk.assert_idle()
    fk.kick()
    fk.assert_idle()


def test_write_after_completion_is_caught() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    cmd.data_in[0][0] = 1  # a stale view: SIGBUS on a real kernel
    with pytest.raises(FakeKernelError, match="no in-flight command"):
        fk.assert_idle()


def test_stale_write_caught_when_the_block_is_reused() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    cmd.data_in[0][5] = 1
    with pytest.raises(FakeKernelError, match="data block 0"):
        fk.submit(read(2), data_in_len=100)


def test_write_past_the_iovec_is_caught() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    start = struct.unpack_from("<Q", fk.buffer, MAILBOX_SIZE + 48)[0]
    fk.buffer[start + 100] = 0  # one byte past the 100-byte iovec, same block
    ring.complete(cmd.cmd_id, GOOD)
    with pytest.raises(FakeKernelError, match="past the end of an iovec"):
        fk.kick()


def test_unknown_op_flag_on_a_command_completes_with_check_condition() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    p = fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    fk.buffer[MAILBOX_SIZE + HDR_UFLAGS] |= UFlag.UNKNOWN_OP
    fk.kick()
    assert p.unknown_op and p.status == 0x02 and p.data_in == b""


def test_keep_buf_is_not_modelled() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    ring = Ring(fk.buffer)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    fk.buffer[MAILBOX_SIZE + HDR_UFLAGS] |= UFlag.KEEP_BUF
    with pytest.raises(FakeKernelError, match="KEEP_BUF"):
        fk.kick()


# --- TMR


def test_tmr_completes_queued_commands_as_aborted() -> None:
    # three 128-byte entries leave 15 free bytes of a 400-byte ring: no room for the TMR
    fk = FakeKernel(cmdr_size=400, data_size=64 * 256, page_size=256)
    ring = Ring(fk.buffer)
    ps = [fk.submit(read(i), data_in_len=10) for i in range(4)]
    assert fk.queued == 1
    fk.submit_tmr(TmrType.LUN_RESET, ps)
    assert ps[3].done and ps[3].aborted and ps[3].status == TASK_ABORTED
    assert ps[3].cmd_id is None
    # the ring is full: the TMR waits, and goes in once space frees up
    cmds, tmrs = ring.dequeue()
    assert len(cmds) == 3 and tmrs == []
    ring.complete(cmds[0].cmd_id, GOOD)
    fk.kick()
    _, tmrs = ring.dequeue()
    assert [(t.tmr_type, t.cmd_ids) for t in tmrs] == [(TmrType.LUN_RESET, [1, 2, 3])]
    serve_all(fk, ring, cmds[1:])
    fk.assert_idle()


def test_tmr_notification_off_writes_no_entry() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512, tmr_notification=False)
    p = fk.submit(read(1), data_in_len=10)
    head = fk.head
    fk.submit_tmr(TmrType.ABORT_TASK, [p])
    assert fk.head == head


def test_tmr_rejects_ids_not_in_flight() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    with pytest.raises(ValueError, match="not in flight"):
        fk.submit_tmr(TmrType.ABORT_TASK, [5])


# --- FakeUio


def test_fake_uio_event_and_kick() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    with FakeUio(fk) as uio:
        ring = Ring(uio.buffer)
        assert select.select([uio], [], [], 0)[0] == []
        p = fk.submit(read(1), data_in_len=10)
        fk.submit(read(2), data_in_len=10)
        assert select.select([uio], [], [], 0)[0] == [uio]
        assert fk.events == 2
        uio.clear_event()
        uio.clear_event()  # nothing pending: no error, no blocking
        assert select.select([uio], [], [], 0)[0] == []
        for c in ring.dequeue()[0]:
            ring.complete(c.cmd_id, GOOD)
        uio.kick()
        assert p.done and uio.kicks == 1
        fk.assert_idle()
    with pytest.raises(ValueError, match="closed"):
        uio.fileno()


def test_fake_uio_sees_events_queued_before_it_opened() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    fk.submit(read(1), data_in_len=10)
    uio = FakeUio(fk)
    assert select.select([uio], [], [], 0)[0] == [uio]
    uio.close()
    uio.close()


@pytest.mark.parametrize(("level", "status"), [(1, 0x08), (2, 0x02)])
def test_reset_ring_fails_in_flight_commands_and_restarts_at_zero(level: int, status: int) -> None:
    fk = FakeKernel(cmdr_size=400, data_size=64 * 256, page_size=256, ring_offset=128)
    ring = Ring(fk.buffer)
    ps = [fk.submit(read(i), data_in_len=10) for i in range(4)]  # 2 fit before the wrap...
    assert fk.queued >= 1
    ring.dequeue()
    struct.pack_into("<H", fk.buffer, MAILBOX_SIZE + 128 + 4, 999)  # and userspace broke it
    struct.pack_into("<I", fk.buffer, MB_CMD_TAIL, 256)
    with pytest.raises(FakeKernelError):
        fk.kick()
    on_ring = [p for p in ps if p.cmd_id is not None]
    fk.reset_ring(level)
    assert not fk.broken and all(p.done and p.status == status for p in on_ring)
    waiting = [p for p in ps if p not in on_ring]
    assert all(not p.done and p.cmd_id is not None for p in waiting)  # queued again from 0
    ring.close()
    assert fk.tail == 0 and fk.head > 0  # the waiting commands are already on the ring
    with pytest.raises(RingError, match="adopt=True"):
        Ring(fk.buffer)
    ring = Ring(fk.buffer, adopt=True)  # a fresh Ring after the reset takes them
    serve_all(fk, ring)
    assert all(p.done for p in ps)
    fk.assert_idle()


def test_reaped_commands_are_not_kept() -> None:
    """A long run must not keep every reaped command (and its data) alive: a 100 s fuzz of the
    null disk grew by 80 MiB/s until the address space ran out."""
    k = FakeKernel()
    ring = Ring(k.buffer)
    refs = []
    for _ in range(500):
        p = k.submit(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0]), bytes(4096))
        refs.append(weakref.ref(p))
        del p
        for c in ring.dequeue()[0]:
            ring.complete(c.cmd_id, 0)
        k.kick()
    assert sum(r() is not None for r in refs) <= 100
    assert k.pending == []
