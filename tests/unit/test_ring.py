"""tcmu_py.ring.Ring paired with the FakeKernel: parsing, wrap-around, slot stealing, errors."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from tcmu_py.errors import RingError
from tcmu_py.ring import (
    HDR_UFLAGS,
    MAILBOX_SIZE,
    MB_CMD_HEAD,
    MB_VERSION,
    REQ_CDB_OFF,
    REQ_IOV,
    Completion,
    Ring,
    RingOp,
    TmrType,
    UFlag,
    command_entry_size,
    scsi_command_size,
)
from tcmu_py.testing.fake_kernel import FakeKernel, Pending

GOOD = 0x00
CHECK_CONDITION = 0x02
# 70h fixed sense, MEDIUM ERROR, ILI, additional length 10 (18 bytes)
SENSE = bytes([0x70, 0, 0x23, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])


def cdb10(opcode: int, tag: int = 0) -> bytes:
    """A 10-byte CDB carrying ``tag`` in the LBA field, so tests can tell commands apart."""
    return struct.pack(">BBIBHB", opcode, 0, tag, 0, 0, 0)


def write(tag: int = 0) -> bytes:
    return cdb10(0x2A, tag)


def read(tag: int = 0) -> bytes:
    return cdb10(0x28, tag)


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag * 7 + i) & 0xFF for i in range(length))


def tag_of(cdb: bytes) -> int:
    return int.from_bytes(cdb[2:6], "big")


def fill(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)
    assert pos == len(data)


def gather(views: list[memoryview]) -> bytes:
    return b"".join(v.tobytes() for v in views)


def make(**kw: Any) -> tuple[FakeKernel, Ring]:
    fk = FakeKernel(**kw)
    return fk, Ring(fk.buffer)


# --- attaching


def test_attach_reads_mailbox() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    assert ring.cmdr_size == 1024
    assert ring.data_off == MAILBOX_SIZE + 1024
    assert ring.flags == 15
    assert (ring.head, ring.tail, ring.cursor, ring.in_flight) == (0, 0, 0, 0)


def test_attach_rejects_wrong_version() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=8192, page_size=512)
    fk.buffer[MB_VERSION] = 1
    with pytest.raises(RingError, match="mailbox"):
        Ring(fk.buffer)


def test_attach_rejects_ring_larger_than_mapping() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=8192, page_size=512)
    with pytest.raises(RingError, match="mailbox"):
        Ring(fk.buffer[: MAILBOX_SIZE + 512])


def test_attach_rejects_unreaped_entries_unless_adopting() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=8192, page_size=512, ring_offset=256)
    p = fk.submit(read(), data_in_len=512)
    with pytest.raises(RingError, match="reset_ring"):
        Ring(fk.buffer)
    ring = Ring(fk.buffer, adopt=True)
    assert ring.cursor == 256
    [cmd] = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    assert p.done
    fk.assert_idle()


def test_attach_rejects_read_only_buffer() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=8192, page_size=512)
    with pytest.raises(RingError, match="writable"):
        Ring(bytes(fk.buffer))


def test_close_releases_the_buffer() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=8192, page_size=512)
    mapping = bytearray(fk.buffer)  # a copy nobody else holds views of
    ring = Ring(mapping)
    with pytest.raises(BufferError):
        mapping.append(0)  # a bytearray with live exports cannot be resized
    ring.close()
    mapping.append(0)


# --- CDBs and data


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x00] + [0] * 5),  # group 0: 6
        bytes([0x28] + [0] * 9),  # group 1: 10
        bytes([0x5A] + [0] * 9),  # group 2: 10
        bytes([0x7E] + [0] * 11),  # group 3: 12
        bytes([0x88] + [0] * 15),  # group 4: 16
        bytes([0xA0] + [0] * 11),  # group 5: 12
        bytes([0xC1] + [0] * 9),  # group 6 (vendor): 10
        bytes([0xE5] + [0] * 9),  # group 7 (vendor): 10
        bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(range(0x18)),  # variable: 8 + 24
        bytes([0x7F, 0, 0, 0, 0, 0, 0, 0xFF]) + bytes(0xFF),  # longest variable CDB
    ],
    ids=lambda c: f"{c[0]:02x}-{len(c)}",
)
def test_cdb_copied_with_kernel_length(cdb: bytes) -> None:
    fk, ring = make(cmdr_size=2048, data_size=8192, page_size=512)
    assert scsi_command_size(cdb) == len(cdb)
    p = fk.submit(cdb)
    cmds, tmrs = ring.dequeue()
    assert [c.cdb for c in cmds] == [cdb] and tmrs == []
    assert cmds[0].data_out == [] and cmds[0].data_in == []
    ring.complete(cmds[0].cmd_id, GOOD)
    fk.kick()
    assert p.done and p.status == GOOD
    fk.assert_idle()


def test_data_out_is_a_view_of_the_mapping() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(write(1), data_out=pattern(1, 1500))
    [cmd], _ = ring.dequeue()
    assert cmd.data_out is cmd.data_in  # non-BIDI: one list, direction from the CDB
    assert gather(cmd.data_out) == pattern(1, 1500)
    view = cmd.data_out[0]
    assert view.obj is fk.buffer or view.readonly is False
    view[0] = 0xEE
    start = struct.unpack_from("<Q", fk.buffer, MAILBOX_SIZE + 0 + REQ_IOV)[0]
    assert fk.buffer[start] == 0xEE
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    assert p.status == GOOD and p.data_in == b""
    fk.assert_idle()


def test_data_in_round_trip() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(read(3), data_in_len=1300)
    [cmd], _ = ring.dequeue()
    assert sum(len(v) for v in cmd.data_in) == 1300
    fill(cmd.data_in, pattern(3, 1300))
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    assert p.data_in == pattern(3, 1300) and p.read_len is None
    fk.assert_idle()


def test_bidi_splits_data_out_and_data_in() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(cdb10(0x53, 4), data_out=pattern(4, 1100), bidi_in_len=700)
    [cmd], _ = ring.dequeue()
    assert cmd.data_out is not cmd.data_in
    assert gather(cmd.data_out) == pattern(4, 1100)
    assert sum(len(v) for v in cmd.data_in) == 700
    fill(cmd.data_in, pattern(5, 700))
    ring.complete(cmd.cmd_id, GOOD)
    fk.kick()
    assert p.data_in == pattern(5, 700)
    fk.assert_idle()


# --- wrap-around and PAD


RING = 512


@pytest.mark.parametrize("offset", range(0, RING, 8))
def test_wrap_at_every_offset(offset: int) -> None:
    fk, ring = make(cmdr_size=RING, data_size=16 * 256, page_size=256, ring_offset=offset)
    assert ring.cursor == offset
    submitted = [
        fk.submit(write(1), data_out=pattern(1, 600)),
        fk.submit(read(2), data_in_len=300),
        fk.submit(cdb10(0x35, 3)),
    ]
    seen: list[int] = []
    for _ in range(10):
        cmds, _ = ring.dequeue()
        for cmd in cmds:
            tag = tag_of(cmd.cdb)
            seen.append(tag)
            if tag == 1:
                assert gather(cmd.data_out) == pattern(1, 600)
            elif tag == 2:
                fill(cmd.data_in, pattern(2, 300))
        # complete newest first: every completion but the last steals a slot
        for cmd in reversed(cmds):
            ring.complete(cmd.cmd_id, GOOD)
        fk.kick()
        if not fk.pending:
            break
    assert sorted(seen) == [1, 2, 3]
    assert all(p.done and p.status == GOOD for p in submitted)
    assert submitted[1].data_in == pattern(2, 300)
    assert ring.in_flight == 0 and ring.tail == ring.head == ring.cursor
    fk.assert_idle()


def test_pad_entry_written_and_skipped() -> None:
    size = command_entry_size(1, 10)  # 128
    fk, ring = make(cmdr_size=1024, data_size=4096, page_size=512, ring_offset=1024 - 64)
    p = fk.submit(read(9), data_in_len=100)
    pad = struct.unpack_from("<I", fk.buffer, MAILBOX_SIZE + 1024 - 64)[0]
    assert pad == 64 | RingOp.PAD
    assert fk.head == size  # the command went to offset 0
    [cmd], _ = ring.dequeue()
    assert ring.cursor == size
    ring.complete(cmd.cmd_id, GOOD)
    assert ring.tail == size  # stepped over the PAD, then over the command's slot
    fk.kick()
    assert p.done
    fk.assert_idle()


# --- slot stealing and completion


def test_out_of_order_completion_steals_the_tail_slot() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    a = fk.submit(read(1), data_in_len=200)
    b = fk.submit(read(2), data_in_len=200)
    cmd_a, cmd_b = ring.dequeue()[0]
    fill(cmd_b.data_in, pattern(2, 200))
    ring.complete(cmd_b.cmd_id, GOOD)
    slot0 = MAILBOX_SIZE
    assert struct.unpack_from("<H", fk.buffer, slot0 + 4)[0] == cmd_b.cmd_id
    fk.kick()
    assert b.done and b.data_in == pattern(2, 200) and not a.done
    # a's views still work: its data blocks are untouched by b's completion
    fill(cmd_a.data_in, pattern(1, 200))
    ring.complete(cmd_a.cmd_id, GOOD)
    fk.kick()
    assert a.done and a.data_in == pattern(1, 200)
    fk.assert_idle()


def test_check_condition_carries_sense() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(read(1), data_in_len=512)
    [cmd], _ = ring.dequeue()
    ring.complete(cmd.cmd_id, CHECK_CONDITION, SENSE)
    fk.kick()
    assert p.status == CHECK_CONDITION and p.sense == SENSE
    assert p.data_in == b""  # CHECK CONDITION without READ_LEN: no data
    fk.assert_idle()


def test_sense_is_zero_filled_over_request_fields() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=512)
    [cmd], _ = ring.dequeue()
    ring.complete(cmd.cmd_id, CHECK_CONDITION, SENSE)
    raw = bytes(fk.buffer[MAILBOX_SIZE + 16 : MAILBOX_SIZE + 112])
    assert raw == SENSE + bytes(96 - len(SENSE))
    fk.kick()


def test_read_len_short_read() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(read(1), data_in_len=2048)
    [cmd], _ = ring.dequeue()
    fill(cmd.data_in, pattern(1, 2048))
    ring.complete(cmd.cmd_id, GOOD, read_len=1000)
    assert fk.buffer[MAILBOX_SIZE + HDR_UFLAGS] == UFlag.READ_LEN
    fk.kick()
    assert p.read_len == 1000 and p.data_in == pattern(1, 1000)
    fk.assert_idle()


def test_read_len_with_check_condition_delivers_data_and_sense() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(read(1), data_in_len=2048)
    [cmd], _ = ring.dequeue()
    fill(cmd.data_in, pattern(1, 2048))
    ring.complete(cmd.cmd_id, CHECK_CONDITION, SENSE, read_len=1000)
    fk.kick()
    assert p.status == CHECK_CONDITION and p.sense == SENSE
    assert p.read_len == 1000 and p.data_in == pattern(1, 1000)


@pytest.mark.parametrize("read_len", [0, 5000])
def test_read_len_zero_or_too_long_means_whole_buffer(read_len: int) -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(read(1), data_in_len=2048)
    [cmd], _ = ring.dequeue()
    fill(cmd.data_in, pattern(1, 2048))
    ring.complete(cmd.cmd_id, GOOD, read_len=read_len)
    fk.kick()
    assert p.data_in == pattern(1, 2048)
    assert p.read_len == (None if read_len == 0 else 2048)


def test_read_len_ignored_for_data_out() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    p = fk.submit(write(1), data_out=pattern(1, 600))
    [cmd], _ = ring.dequeue()
    ring.complete(cmd.cmd_id, GOOD, read_len=10)
    fk.kick()
    assert p.read_len is None and p.status == GOOD


def test_complete_many_publishes_once() -> None:
    fk, ring = make(cmdr_size=2048, data_size=8192, page_size=512)
    ps = [fk.submit(read(i), data_in_len=100) for i in range(5)]
    cmds, _ = ring.dequeue()
    for c in cmds:
        fill(c.data_in, pattern(tag_of(c.cdb), 100))
    order = [cmds[3], cmds[0], cmds[4], cmds[1], cmds[2]]
    ring.complete_many(
        [Completion(c.cmd_id, CHECK_CONDITION if c is cmds[4] else GOOD,
                    SENSE if c is cmds[4] else b"", 60 if c is cmds[0] else None)
         for c in order]
    )
    assert ring.in_flight == 0 and ring.tail == ring.head
    fk.kick()
    assert [p.data_in for p in ps] == [
        pattern(0, 60), pattern(1, 100), pattern(2, 100), pattern(3, 100), b""
    ]
    assert ps[4].sense == SENSE
    fk.assert_idle()


# --- detecting misuse


def test_unknown_completion_raises() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    [cmd], _ = ring.dequeue()
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(cmd.cmd_id + 1, GOOD)
    assert ring.tail == 0


def test_double_completion_raises() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    fk.submit(read(2), data_in_len=100)
    cmd, _ = ring.dequeue()[0]
    ring.complete(cmd.cmd_id, GOOD)
    tail = ring.tail
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(cmd.cmd_id, GOOD)
    assert ring.tail == tail


def test_complete_many_checks_everything_first() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    fk.submit(read(2), data_in_len=100)
    a, b = ring.dequeue()[0]
    with pytest.raises(RingError, match="duplicate"):
        ring.complete_many([Completion(a.cmd_id, GOOD), Completion(a.cmd_id, GOOD)])
    with pytest.raises(RingError, match="not in flight"):
        ring.complete_many([Completion(a.cmd_id, GOOD), Completion(999, GOOD)])
    assert ring.tail == 0 and ring.in_flight == 2


def test_sense_too_long_rejected_before_writing() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    [cmd], _ = ring.dequeue()
    with pytest.raises(ValueError, match="96"):
        ring.complete(cmd.cmd_id, CHECK_CONDITION, bytes(97))
    assert ring.tail == 0 and ring.in_flight == 1


def test_dequeue_rejects_an_id_already_in_flight() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    [cmd], _ = ring.dequeue()
    fk.submit(read(2), data_in_len=100)
    struct.pack_into("<H", fk.buffer, MAILBOX_SIZE + ring.cursor + 4, cmd.cmd_id)
    with pytest.raises(RingError, match="already in flight"):
        ring.dequeue()


def test_zero_length_entry_is_an_error_naming_the_offset() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    fk.submit(read(2), data_in_len=100)
    second = command_entry_size(1, 10)
    struct.pack_into("<I", fk.buffer, MAILBOX_SIZE + second, RingOp.CMD)
    cmds, _ = ring.dequeue()  # the first command still comes out
    assert [tag_of(c.cdb) for c in cmds] == [1]
    with pytest.raises(RingError, match=f"ring offset {second}"):
        ring.dequeue()


def test_iovec_outside_data_area_is_an_error() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    struct.pack_into("<QQ", fk.buffer, MAILBOX_SIZE + REQ_IOV, len(fk.buffer) - 50, 100)
    with pytest.raises(RingError, match="iovec"):
        ring.dequeue()


def test_cdb_outside_entry_is_an_error() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    struct.pack_into("<Q", fk.buffer, MAILBOX_SIZE + REQ_CDB_OFF, MAILBOX_SIZE + 500)
    with pytest.raises(RingError, match="CDB"):
        ring.dequeue()


def test_head_out_of_ring_is_an_error() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    struct.pack_into("<I", fk.buffer, MB_CMD_HEAD, 1024)
    with pytest.raises(RingError, match="cmd_head"):
        ring.dequeue()


# --- unknown opcodes and TMR


def test_unknown_opcode_is_marked_and_stepped_over() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    # An entry a future kernel might write: opcode 5, 16 bytes.
    struct.pack_into("<IHBB", fk.buffer, MAILBOX_SIZE, 16 | 5, 0, 0, 0)
    struct.pack_into("<I", fk.buffer, MB_CMD_HEAD, 16)
    cmds, tmrs = ring.dequeue()
    assert (cmds, tmrs) == ([], [])
    assert fk.buffer[MAILBOX_SIZE + HDR_UFLAGS] == UFlag.UNKNOWN_OP
    assert ring.unknown_ops == 1
    assert ring.tail == 16  # nothing to complete: the slot is handed back


def test_tmr_surfaces_ids_and_commands_still_complete() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    a = fk.submit(read(1), data_in_len=100)
    b = fk.submit(read(2), data_in_len=100)
    cmds, _ = ring.dequeue()
    fk.submit_tmr(TmrType.ABORT_TASK_SET, [a, b])
    new, tmrs = ring.dequeue()
    assert new == []
    assert [(t.tmr_type, t.cmd_ids) for t in tmrs] == [
        (TmrType.ABORT_TASK_SET, [a.cmd_id, b.cmd_id])
    ]
    for c in reversed(cmds):
        ring.complete(c.cmd_id, GOOD)
    fk.kick()
    assert a.done and b.done
    assert ring.tail == ring.head  # the TMR slot was stepped over too
    fk.assert_idle()


def test_tmr_alone_is_stepped_over_at_dequeue() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit_tmr(TmrType.LUN_RESET)
    _, [tmr] = ring.dequeue()
    assert tmr.tmr_type == TmrType.LUN_RESET and tmr.cmd_ids == []
    assert ring.tail == ring.head == 32
    fk.kick()
    fk.assert_idle()


def test_many_entries_in_one_dequeue_cross_the_batch_size() -> None:
    fk = FakeKernel(cmdr_size=64 * 1024, data_size=64 * 512, page_size=512)
    ring = Ring(fk.buffer, batch=4)
    ps = [fk.submit(read(i), data_in_len=10) for i in range(30)]
    cmds, _ = ring.dequeue()
    assert [tag_of(c.cdb) for c in cmds] == list(range(30))
    ring.complete_many([Completion(c.cmd_id, GOOD) for c in cmds])
    fk.kick()
    assert all(p.done for p in ps)
    fk.assert_idle()


def test_pending_type_is_exported() -> None:
    fk = FakeKernel(cmdr_size=1024, data_size=4096, page_size=512)
    assert isinstance(fk.submit(read()), Pending)


def test_closed_ring_refuses_work() -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    ring.close()
    ring.close()
    with pytest.raises(RingError, match="closed"):
        ring.dequeue()
    with pytest.raises(RingError, match="not in flight"):
        ring.complete(cmd.cmd_id, GOOD)


@pytest.mark.parametrize("status", [-1, 0x100])
def test_status_must_fit_a_byte(status: int) -> None:
    fk, ring = make(cmdr_size=1024, data_size=8192, page_size=512)
    fk.submit(read(1), data_in_len=100)
    [cmd] = ring.dequeue()[0]
    with pytest.raises(ValueError, match="status"):
        ring.complete(cmd.cmd_id, status)
    with pytest.raises(ValueError, match="status"):
        ring.complete_many([(cmd.cmd_id, status, b"", None)])
    assert ring.tail == 0 and ring.in_flight == 1
