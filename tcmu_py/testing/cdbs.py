"""Build CDBs by name and fields, so tests read like the spec instead of hex.

Every function returns the CDB bytes. Field names follow T10 (snake_case). Nothing here validates:
tests use it to build malformed commands too.
"""

from __future__ import annotations

import struct


def _rw10(
    op: int, lba: int, blocks: int, flags: int = 0, group: int = 0, control: int = 0
) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, group, blocks & 0xFFFF, control)


def _rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba & 0xFFFFFFFF, blocks & 0xFFFFFFFF, 0, 0)


def _rw16(op: int, lba: int, blocks: int, flags: int = 0, group: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks & 0xFFFFFFFF, group, 0)


def _fua(fua: bool, dpo: bool = False) -> int:
    return (0x08 if fua else 0) | (0x10 if dpo else 0)


def test_unit_ready() -> bytes:
    return bytes(6)


def request_sense(allocation_length: int = 252, desc: bool = False) -> bytes:
    return bytes([0x03, 1 if desc else 0, 0, 0, allocation_length & 0xFF, 0])


def inquiry(evpd: bool = False, page_code: int = 0, allocation_length: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, 1 if evpd else 0, page_code, allocation_length, 0)


def read6(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBHBB", 0x08, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)


def write6(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBHBB", 0x0A, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, 0)


def read10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw10(0x28, lba, blocks, _fua(fua))


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw10(0x2A, lba, blocks, _fua(fua))


def read12(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw12(0xA8, lba, blocks, _fua(fua))


def write12(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw12(0xAA, lba, blocks, _fua(fua))


def read16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw16(0x88, lba, blocks, _fua(fua))


def write16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw16(0x8A, lba, blocks, _fua(fua))


def verify10(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _rw10(0x2F, lba, blocks, (bytchk & 3) << 1)


def verify16(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _rw16(0x8F, lba, blocks, (bytchk & 3) << 1)


def write_and_verify10(lba: int, blocks: int, bytchk: int = 1) -> bytes:
    return _rw10(0x2E, lba, blocks, (bytchk & 1) << 1)


def write_and_verify16(lba: int, blocks: int, bytchk: int = 1) -> bytes:
    return _rw16(0x8E, lba, blocks, (bytchk & 1) << 1)


def compare_and_write(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, _fua(fua), lba, blocks & 0xFF, 0, 0)


def write_same10(lba: int, blocks: int, unmap: bool = False, anchor: bool = False) -> bytes:
    return _rw10(0x41, lba, blocks, (0x08 if unmap else 0) | (0x10 if anchor else 0))


def write_same16(
    lba: int, blocks: int, unmap: bool = False, ndob: bool = False, anchor: bool = False
) -> bytes:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0) | (0x10 if anchor else 0)
    return _rw16(0x93, lba, blocks, flags)


def unmap(parameter_list_length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 1 if anchor else 0, 0, parameter_list_length, 0)


def unmap_parameters(ranges: list[tuple[int, int]]) -> bytes:
    """SBC-4 5.32.2: the UNMAP parameter list for (lba, count) ranges."""
    descs = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def synchronize_cache10(lba: int = 0, blocks: int = 0, immed: bool = False) -> bytes:
    return _rw10(0x35, lba, blocks, 0x02 if immed else 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0, immed: bool = False) -> bytes:
    return _rw16(0x91, lba, blocks, 0x02 if immed else 0)


def read_capacity10() -> bytes:
    return bytes([0x25]) + bytes(9)


def read_capacity16(allocation_length: int = 32) -> bytes:
    return struct.pack(">BB8xIBB", 0x9E, 0x10, allocation_length, 0, 0)


def get_lba_status(lba: int, allocation_length: int = 4096) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, allocation_length, 0, 0)


def mode_sense6(
    page_code: int, subpage: int = 0, pc: int = 0, dbd: bool = False, allocation_length: int = 255
) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page_code, subpage, allocation_length, 0])


def mode_sense10(
    page_code: int,
    subpage: int = 0,
    pc: int = 0,
    dbd: bool = False,
    llbaa: bool = False,
    allocation_length: int = 1024,
) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(
        ">BBBB3xHB", 0x5A, flags, (pc << 6) | page_code, subpage, allocation_length, 0
    )


def mode_select6(parameter_list_length: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes([0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, parameter_list_length, 0])


def mode_select10(parameter_list_length: int, pf: bool = True, sp: bool = False) -> bytes:
    return struct.pack(
        ">BB5xHB", 0x55, (0x10 if pf else 0) | (1 if sp else 0), parameter_list_length, 0
    )


def log_sense(
    page_code: int, subpage: int = 0, pc: int = 1, allocation_length: int = 1024
) -> bytes:
    # SPC-5 6.8: opcode, SP, PC|page, subpage, reserved, PARAMETER POINTER (2), ALLOCATION
    # LENGTH (2), CONTROL — ten bytes.
    return struct.pack(
        ">BBBBxHHB", 0x4D, 0, (pc << 6) | page_code, subpage, 0, allocation_length, 0
    )


def report_supported_operation_codes(
    reporting_options: int = 0,
    requested_opcode: int = 0,
    requested_service_action: int = 0,
    rctd: bool = False,
    allocation_length: int = 8192,
) -> bytes:
    return struct.pack(
        ">BBBBHIBB",
        0xA3,
        0x0C,
        (0x80 if rctd else 0) | reporting_options,
        requested_opcode,
        requested_service_action,
        allocation_length,
        0,
        0,
    )


def start_stop_unit(start: bool = True, loej: bool = False, immed: bool = False) -> bytes:
    return bytes([0x1B, 1 if immed else 0, 0, 0, (2 if loej else 0) | (1 if start else 0), 0])


def pre_fetch10(lba: int, blocks: int) -> bytes:
    return _rw10(0x34, lba, blocks)
