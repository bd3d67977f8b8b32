"""Build CDBs by name and fields, so tests read like the spec instead of hex.

Every function returns the CDB bytes, built by the CDB dataclasses of :mod:`tcmu_py.scsi.cdb`
(``X(...).build()``): this module only names them and gives the fields test-friendly defaults.
Field names follow T10 (snake_case). Nothing here validates: tests use it to build malformed
commands too (a value wider than its field is cut to the field's width).
"""

from __future__ import annotations

from tcmu_py.scsi import cdb as c
from tcmu_py.scsi import sbc
from tcmu_py.scsi.constants import Opcode as Op


def _rw(op: int, lba: int, blocks: int, **flags: bool | int) -> bytes:
    return c.RwCdb(op, lba, blocks, **flags).build()  # type: ignore[arg-type]


def test_unit_ready() -> bytes:
    return bytes(6)


def request_sense(allocation_length: int = 252, desc: bool = False) -> bytes:
    return c.RequestSense(desc, allocation_length).build()


def inquiry(evpd: bool = False, page_code: int = 0, allocation_length: int = 255) -> bytes:
    return c.Inquiry(evpd, page_code, allocation_length).build()


def read6(lba: int, blocks: int) -> bytes:
    return _rw(Op.READ_6, lba, blocks)


def write6(lba: int, blocks: int) -> bytes:
    return _rw(Op.WRITE_6, lba, blocks)


def read10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.READ_10, lba, blocks, fua=fua)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.WRITE_10, lba, blocks, fua=fua)


def read12(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.READ_12, lba, blocks, fua=fua)


def write12(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.WRITE_12, lba, blocks, fua=fua)


def read16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.READ_16, lba, blocks, fua=fua)


def write16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.WRITE_16, lba, blocks, fua=fua)


def verify10(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _rw(Op.VERIFY_10, lba, blocks, bytchk=bytchk)


def verify16(lba: int, blocks: int, bytchk: int = 0) -> bytes:
    return _rw(Op.VERIFY_16, lba, blocks, bytchk=bytchk)


def write_and_verify10(lba: int, blocks: int, bytchk: int = 1) -> bytes:
    # SBC-4 5.51: WRITE AND VERIFY's BYTCHK is one bit wide in use (1xb reserved).
    return _rw(Op.WRITE_AND_VERIFY_10, lba, blocks, bytchk=bytchk & 1)


def write_and_verify16(lba: int, blocks: int, bytchk: int = 1) -> bytes:
    return _rw(Op.WRITE_AND_VERIFY_16, lba, blocks, bytchk=bytchk & 1)


def compare_and_write(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _rw(Op.COMPARE_AND_WRITE, lba, blocks, fua=fua)


def write_same10(lba: int, blocks: int, unmap: bool = False, anchor: bool = False) -> bytes:
    return _rw(Op.WRITE_SAME_10, lba, blocks, unmap=unmap, anchor=anchor)


def write_same16(
    lba: int, blocks: int, unmap: bool = False, ndob: bool = False, anchor: bool = False
) -> bytes:
    return _rw(Op.WRITE_SAME_16, lba, blocks, unmap=unmap, ndob=ndob, anchor=anchor)


def unmap(parameter_list_length: int, anchor: bool = False) -> bytes:
    return c.Unmap(anchor, 0, parameter_list_length).build()


def unmap_parameters(ranges: list[tuple[int, int]]) -> bytes:
    """SBC-4 5.32.2: the UNMAP parameter list for (lba, count) ranges."""
    return sbc.build_unmap_parameters(ranges)


def synchronize_cache10(lba: int = 0, blocks: int = 0, immed: bool = False) -> bytes:
    return c.SynchronizeCache(Op.SYNCHRONIZE_CACHE_10, lba, blocks, immed).build()


def synchronize_cache16(lba: int = 0, blocks: int = 0, immed: bool = False) -> bytes:
    return c.SynchronizeCache(Op.SYNCHRONIZE_CACHE_16, lba, blocks, immed).build()


def read_capacity10() -> bytes:
    return c.ReadCapacity10(0, False).build()


def read_capacity16(allocation_length: int = 32) -> bytes:
    return c.ReadCapacity16(0, allocation_length, False).build()


def get_lba_status(lba: int, allocation_length: int = 4096) -> bytes:
    return c.GetLbaStatus(lba, allocation_length).build()


def mode_sense6(
    page_code: int, subpage: int = 0, pc: int = 0, dbd: bool = False, allocation_length: int = 255
) -> bytes:
    return c.ModeSense(False, dbd, False, pc, page_code, subpage, allocation_length).build()


def mode_sense10(
    page_code: int,
    subpage: int = 0,
    pc: int = 0,
    dbd: bool = False,
    llbaa: bool = False,
    allocation_length: int = 1024,
) -> bytes:
    return c.ModeSense(True, dbd, llbaa, pc, page_code, subpage, allocation_length).build()


def mode_select6(parameter_list_length: int, pf: bool = True, sp: bool = False) -> bytes:
    return c.ModeSelect(False, pf, sp, parameter_list_length).build()


def mode_select10(parameter_list_length: int, pf: bool = True, sp: bool = False) -> bytes:
    return c.ModeSelect(True, pf, sp, parameter_list_length).build()


def log_sense(
    page_code: int, subpage: int = 0, pc: int = 1, allocation_length: int = 1024
) -> bytes:
    return c.LogSense(False, False, pc, page_code, subpage, 0, allocation_length).build()


def report_supported_operation_codes(
    reporting_options: int = 0,
    requested_opcode: int = 0,
    requested_service_action: int = 0,
    rctd: bool = False,
    allocation_length: int = 8192,
) -> bytes:
    return c.ReportSupportedOpcodes(
        rctd, reporting_options, requested_opcode, requested_service_action, allocation_length
    ).build()


def start_stop_unit(start: bool = True, loej: bool = False, immed: bool = False) -> bytes:
    return c.StartStopUnit(immed, 0, 0, False, loej, start).build()


def pre_fetch10(lba: int, blocks: int) -> bytes:
    return _rw(Op.PRE_FETCH_10, lba, blocks)


def extended_copy(parameter_list_length: int) -> bytes:
    """EXTENDED COPY (LID1); build the parameter list with :mod:`tcmu_py.scsi.xcopy`."""
    return c.ExtendedCopy(parameter_list_length).build()


def receive_copy_results(
    service_action: int, list_identifier: int = 0, allocation_length: int = 1024
) -> bytes:
    """RECEIVE COPY RESULTS: 00h COPY STATUS, 03h OPERATING PARAMETERS, 04h FAILED SEGMENT
    DETAILS."""
    return c.ReceiveCopyResults(service_action, list_identifier, allocation_length).build()
