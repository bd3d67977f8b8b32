"""Minimal TCMU responder: a read-only disk of zeros. Proves the VM lab end to end.

Usage (in the guest): python _zero_responder.py [--tcmu-py] /dev/uioN /sys/class/uio/uioN BLOCKS

Default mode is deliberately independent of tcmu_py (standard library only, in-order
completion, one thread) so that the harness is validated apart from the real ring code; the
facts it uses are the kernel's include/uapi/linux/target_core_user.h (kernel-abi.md).
With ``--tcmu-py`` the same disk is served through ``tcmu_py.uio.UioDevice`` and
``tcmu_py.ring.Ring``, completing each batch in REVERSE order (slot stealing) to exercise the
binding against the real kernel; it holds completions briefly so that concurrent commands
really do complete out of order.

It prints "ready" once the ring is mapped and, on SIGTERM, a JSON line with opcode counts (and
in --tcmu-py mode the largest batch completed out of order), then exits 0.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import struct
import sys
from collections import Counter

# struct tcmu_mailbox: version u16 @0, flags u16 @2, cmdr_off u32 @4, cmdr_size u32 @8,
# cmd_head u32 @12, cmd_tail u32 @64.
MB_HEAD = struct.Struct("<HHIII")
MB_TAIL = struct.Struct("<I")
MB_TAIL_OFF = 64
# struct tcmu_cmd_entry_hdr: len_op u32, cmd_id u16, kflags u8, uflags u8.
HDR = struct.Struct("<IHBB")
# req: iov_cnt u32 @8, iov_bidi_cnt u32 @12, iov_dif_cnt u32 @16, cdb_off u64 @24; iovecs @48.
REQ = struct.Struct("<III4xQ")
REQ_OFF = 8
IOV = struct.Struct("<QQ")
IOV_OFF = 48
# rsp: scsi_status u8 @8, read_len u32 @12, sense_buffer[96] @16.
RSP_STATUS_OFF = 8
RSP_SENSE_OFF = 16

OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_UNKNOWN_OP = 0x1
OP_MASK = 0x7

GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST = 0x05
BLOCK_SIZE = 512

# SPC-5 4.2.5.1: CDB length by operation code group (bits 7..5).
GROUP_LEN = (6, 10, 10, 12, 16, 12, 10, 10)


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """SPC-5 4.4.3: fixed format sense data, response code 70h, additional length 10."""
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


class CheckCondition(Exception):
    def __init__(self, key: int, asc: int, ascq: int) -> None:
        super().__init__(f"{key:02x}/{asc:02x}/{ascq:02x}")
        self.sense = fixed_sense(key, asc, ascq)


def invalid_opcode() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x20, 0x00)  # SPC-5: INVALID COMMAND OPERATION CODE


def invalid_field() -> CheckCondition:
    return CheckCondition(ILLEGAL_REQUEST, 0x24, 0x00)  # SPC-5: INVALID FIELD IN CDB


class ZeroDisk:
    """Answers the commands the Linux sd driver and dd need; everything else is 05/20/00."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    def execute(self, cdb: bytes) -> bytes | None:
        """Return Data-In bytes (None for no data); raise CheckCondition on error."""
        op = cdb[0]
        if op == 0x00:  # TEST UNIT READY
            return None
        if op == 0x12:  # INQUIRY
            return self.inquiry(cdb)
        if op == 0x25:  # READ CAPACITY(10), SBC-4 5.20
            return struct.pack(">II", min(self.blocks - 1, 0xFFFFFFFF), BLOCK_SIZE)
        if op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY(16), SBC-4 5.21
            return struct.pack(">QI", self.blocks - 1, BLOCK_SIZE).ljust(32, b"\0")
        if op in (0x08, 0x28, 0x88):  # READ(6/10/16): zeros, range checked
            lba, count = self.read_range(cdb)
            if lba + count > self.blocks:
                raise CheckCondition(ILLEGAL_REQUEST, 0x21, 0x00)  # SBC-4: LBA OUT OF RANGE
            return bytes(count * BLOCK_SIZE)
        if op == 0x1A:  # MODE SENSE(6): header only, SPC-5 7.5.6
            return bytes([3, 0, 0x80, 0])  # WP bit: this disk is read-only
        if op == 0x5A:  # MODE SENSE(10)
            return bytes([0, 6, 0, 0x80, 0, 0, 0, 0])
        if op == 0x35:  # SYNCHRONIZE CACHE(10): nothing cached
            return None
        raise invalid_opcode()

    @staticmethod
    def read_range(cdb: bytes) -> tuple[int, int]:
        if cdb[0] == 0x08:  # SBC-4 5.15: 21-bit LBA, length 0 means 256
            lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
            return lba, cdb[4] or 256
        if cdb[0] == 0x28:
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")

    def inquiry(self, cdb: bytes) -> bytes:
        evpd, page = cdb[1] & 1, cdb[2]
        if not evpd:
            if page:
                raise invalid_field()
            # SPC-5 6.7.2: direct-access device, version SPC-4 (06h), response format 2,
            # additional length 31, CMDQUE.
            std = bytes([0x00, 0x00, 0x06, 0x02, 31, 0, 0, 0x02])
            return std + b"TCMUPY  " + b"ZERO-RESPONDER  " + b"0001"
        if page == 0x00:  # SPC-5 7.7.17 Supported VPD pages
            return bytes([0, 0x00, 0, 2, 0x00, 0x80])
        if page == 0x80:  # SPC-5 7.7.19 Unit serial number
            serial = b"ZERO0001"
            return bytes([0, 0x80, 0, len(serial)]) + serial
        raise invalid_field()


def cdb_length(first: int, buf: mmap.mmap, off: int) -> int:
    if first == 0x7F:  # variable length CDB: 8 + ADDITIONAL CDB LENGTH
        return 8 + buf[off + 7]
    return GROUP_LEN[first >> 5]


def serve(uio_path: str, sysfs_dir: str, blocks: int) -> None:
    with open(os.path.join(sysfs_dir, "maps/map0/size")) as f:
        size = int(f.read(), 16)
    fd = os.open(uio_path, os.O_RDWR | os.O_NONBLOCK)
    buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    version, flags, cmdr_off, cmdr_size, _ = MB_HEAD.unpack_from(buf, 0)
    (tail,) = MB_TAIL.unpack_from(buf, MB_TAIL_OFF)
    disk = ZeroDisk(blocks)
    counts: Counter[str] = Counter()

    def on_term(signum: int, frame: object) -> None:
        print(json.dumps({"opcodes": dict(counts)}), flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"ready version={version} flags={flags} cmdr_size={cmdr_size} map={size:#x}", flush=True)

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll(1000)
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 4)  # clears the uio event
        # In-order completion: our consumer cursor and cmd_tail move together, so each entry is
        # answered in its own slot. cmd_head is read after the event (x86: loads are ordered).
        head = MB_HEAD.unpack_from(buf, 0)[4]
        if head == tail:
            continue
        while tail != head:
            ent = cmdr_off + tail
            len_op, cmd_id, _kflags, uflags = HDR.unpack_from(buf, ent)
            op, length = len_op & OP_MASK, len_op & ~OP_MASK
            if op == OP_CMD:
                counts[f"{handle(buf, ent, disk):02x}"] += 1
            elif op not in (OP_PAD, OP_TMR):
                HDR.pack_into(buf, ent, len_op, cmd_id, _kflags, uflags | UFLAG_UNKNOWN_OP)
            tail = (tail + length) % cmdr_size
        MB_TAIL.pack_into(buf, MB_TAIL_OFF, tail)  # x86: stores are not reordered with stores
        os.write(fd, b"\0\0\0\0")  # kick: the kernel reaps everything up to cmd_tail


def handle(buf: mmap.mmap, ent: int, disk: ZeroDisk) -> int:
    iov_cnt, _bidi, _dif, cdb_off = REQ.unpack_from(buf, ent + REQ_OFF)
    first = buf[cdb_off]
    cdb = bytes(buf[cdb_off : cdb_off + cdb_length(first, buf, cdb_off)])
    iovs = [IOV.unpack_from(buf, ent + IOV_OFF + 16 * i) for i in range(iov_cnt)]
    status, sense = GOOD, b""
    try:
        data = disk.execute(cdb)
    except CheckCondition as cc:
        data, status, sense = None, CHECK_CONDITION, cc.sense
    if data is not None:
        # Fill the whole Data-In buffer (pad with zeros) so no stale data-area bytes leak out.
        pos = 0
        for base, length in iovs:
            chunk = data[pos : pos + length]
            buf[base : base + len(chunk)] = chunk
            if len(chunk) < length:
                buf[base + len(chunk) : base + length] = bytes(length - len(chunk))
            pos += length
    buf[ent + RSP_STATUS_OFF] = status
    if sense:
        buf[ent + RSP_SENSE_OFF : ent + RSP_SENSE_OFF + len(sense)] = sense
    return first


def scatter(data: bytes, bufs: list[memoryview]) -> None:
    """Copy ``data`` into the Data-In buffers, zero-filling what it does not cover."""
    pos = 0
    for view in bufs:
        chunk = data[pos : pos + len(view)]
        view[: len(chunk)] = chunk
        if len(chunk) < len(view):
            view[len(chunk) :] = bytes(len(view) - len(chunk))
        pos += len(view)


# --tcmu-py mode: hold completions until this many commands are pending or the oldest has waited
# this long, so that concurrent commands complete out of order.
HOLD_COMMANDS = 4
HOLD_SECONDS = 0.05


def serve_tcmu_py(uio_path: str, sysfs_dir: str, blocks: int) -> None:
    import time

    from tcmu_py.ring import Completion, Ring
    from tcmu_py.uio import UioDevice

    dev = UioDevice(uio_path, sysfs_dir)
    ring = Ring(dev.buffer)
    disk = ZeroDisk(blocks)
    counts: Counter[str] = Counter()
    stats = {"max_reversed_batch": 0, "commands": 0}

    def on_term(signum: int, frame: object) -> None:
        print(json.dumps({"opcodes": dict(counts), **stats}), flush=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"ready (tcmu_py) {dev.name} flags={ring.flags}", flush=True)
    poller = select.poll()
    poller.register(dev.fileno(), select.POLLIN)
    pending: list[Completion] = []
    oldest = 0.0
    while True:
        wait = 1.0 if not pending else max(0.0, oldest + HOLD_SECONDS - time.monotonic())
        poller.poll(int(wait * 1000))
        dev.clear_event()
        cmds, _tmrs = ring.dequeue()
        for cmd in cmds:
            try:
                data = disk.execute(cmd.cdb)
                status, sense = GOOD, b""
            except CheckCondition as cc:
                data, status, sense = None, CHECK_CONDITION, cc.sense
            if data is not None:
                scatter(data, cmd.data_in)
            counts[f"{cmd.cdb[0]:02x}"] += 1
            if not pending:
                oldest = time.monotonic()
            pending.append(Completion(cmd.cmd_id, status, sense))
        if pending and (len(pending) >= HOLD_COMMANDS or time.monotonic() >= oldest + HOLD_SECONDS):
            # Newest first: every completion but the last steals an older command's slot.
            ring.complete_many(list(reversed(pending)))
            stats["max_reversed_batch"] = max(stats["max_reversed_batch"], len(pending))
            stats["commands"] += len(pending)
            pending.clear()
            dev.kick()


if __name__ == "__main__":
    if sys.argv[1] == "--tcmu-py":
        serve_tcmu_py(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
