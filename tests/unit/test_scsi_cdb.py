"""CDB parsing (SPC-5 4.2, SBC-4 5.x): every READ/WRITE form, boundaries, field pointers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.scsi import cdb as c
from tcmu_py.scsi.constants import Opcode as Op
from tcmu_py.scsi.sense import InvalidFieldInCdb, LbaOutOfRange

# (opcode, cdb size, lba bytes offset/size, length offset/size, group offset)
LAYOUT = {
    Op.READ_10: (10, 2, 4, 7, 2, 6),
    Op.WRITE_10: (10, 2, 4, 7, 2, 6),
    Op.VERIFY_10: (10, 2, 4, 7, 2, 6),
    Op.WRITE_AND_VERIFY_10: (10, 2, 4, 7, 2, 6),
    Op.PRE_FETCH_10: (10, 2, 4, 7, 2, 6),
    Op.WRITE_SAME_10: (10, 2, 4, 7, 2, 6),
    Op.READ_12: (12, 2, 4, 6, 4, 10),
    Op.WRITE_12: (12, 2, 4, 6, 4, 10),
    Op.VERIFY_12: (12, 2, 4, 6, 4, 10),
    Op.WRITE_AND_VERIFY_12: (12, 2, 4, 6, 4, 10),
    Op.READ_16: (16, 2, 8, 10, 4, 14),
    Op.WRITE_16: (16, 2, 8, 10, 4, 14),
    Op.ORWRITE_16: (16, 2, 8, 10, 4, 14),
    Op.VERIFY_16: (16, 2, 8, 10, 4, 14),
    Op.WRITE_AND_VERIFY_16: (16, 2, 8, 10, 4, 14),
    Op.PRE_FETCH_16: (16, 2, 8, 10, 4, 14),
    Op.WRITE_SAME_16: (16, 2, 8, 10, 4, 14),
    Op.COMPARE_AND_WRITE: (16, 2, 8, 13, 1, 14),
}


def make_cdb(opcode: int, lba: int, length: int, byte1: int = 0, group: int = 0) -> bytes:
    """Independent encoder used as the reference for parse_rw."""
    size, lo, ls, to, ts, go = LAYOUT[opcode]
    cdb = bytearray(size)
    cdb[0] = opcode
    cdb[1] = byte1
    cdb[lo : lo + ls] = lba.to_bytes(ls, "big")
    cdb[to : to + ts] = length.to_bytes(ts, "big")
    cdb[go] = group
    return bytes(cdb)


@st.composite
def rw_cases(draw):
    opcode = draw(st.sampled_from(sorted(LAYOUT)))
    size, lo, ls, to, ts, go = LAYOUT[opcode]
    lba = draw(st.integers(0, 2 ** (8 * ls) - 1))
    length = draw(st.integers(0, 2 ** (8 * ts) - 1))
    group = draw(st.integers(0, 0x3F))
    low_bits = draw(st.integers(0, 0x1F))  # byte 1 without the protection field
    return opcode, lba, length, low_bits, group


@given(rw_cases())
def test_parse_rw_round_trip(case):
    opcode, lba, length, low, group = case
    cdb = make_cdb(opcode, lba, length, low, group)
    assert c.cdb_length(cdb) == len(cdb)
    bytchk = (low >> 1) & 3
    verifies = {Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16}
    wvs = {Op.WRITE_AND_VERIFY_10, Op.WRITE_AND_VERIFY_12, Op.WRITE_AND_VERIFY_16}
    if (opcode in verifies and bytchk == 2) or (opcode in wvs and bytchk >= 2):
        with pytest.raises(InvalidFieldInCdb) as exc:
            c.parse_rw(cdb)
        assert (exc.value.field_pointer, exc.value.bit_pointer) == (1, 2)
        return
    if opcode in (Op.WRITE_SAME_10, Op.WRITE_SAME_16) and low & 0x10 and not low & 0x08:
        # SBC-4 5.50: ANCHOR without UNMAP
        with pytest.raises(InvalidFieldInCdb) as exc:
            c.parse_rw(cdb)
        assert (exc.value.field_pointer, exc.value.bit_pointer) == (1, 4)
        return
    rw = c.parse_rw(cdb)
    assert (rw.opcode, rw.lba, rw.transfer_length, rw.group) == (opcode, lba, length, group)
    assert rw.protect == 0
    if opcode in (Op.PRE_FETCH_10, Op.PRE_FETCH_16):
        assert rw.immed == bool(low & 2) and not rw.fua
    elif opcode in (Op.WRITE_SAME_10, Op.WRITE_SAME_16):
        assert rw.unmap == bool(low & 8) and rw.anchor == bool(low & 0x10)
        assert rw.ndob == (opcode == Op.WRITE_SAME_16 and bool(low & 1))
    elif opcode in verifies | wvs:
        assert rw.bytchk == bytchk and rw.dpo == bool(low & 0x10) and not rw.fua
    else:
        assert rw.fua == bool(low & 8) and rw.dpo == bool(low & 0x10)


@pytest.mark.parametrize("opcode", [Op.READ_6, Op.WRITE_6])
@pytest.mark.parametrize(
    "lba,length,want_lba,want_len",
    [(0, 0, 0, 256), (0x1FFFFF, 1, 0x1FFFFF, 1), (0x12345, 255, 0x12345, 255)],
)
def test_rw6(opcode, lba, length, want_lba, want_len):
    cdb = bytes([opcode, (lba >> 16) | 0xE0, (lba >> 8) & 0xFF, lba & 0xFF, length, 0])
    rw = c.parse_rw(cdb)
    # SBC-4 5.18: 21-bit LBA (the old LUN bits 7..5 are ignored), length 0 = 256 blocks.
    assert (rw.lba, rw.transfer_length) == (want_lba, want_len)


@pytest.mark.parametrize("opcode", sorted(LAYOUT))
def test_protect_field_rejected_without_protection(opcode):
    cdb = make_cdb(opcode, 0, 1, byte1=0x20)
    if opcode in (Op.PRE_FETCH_10, Op.PRE_FETCH_16):
        assert c.parse_rw(cdb).protect == 0
        return
    with pytest.raises(InvalidFieldInCdb) as exc:
        c.parse_rw(cdb)
    assert (exc.value.field_pointer, exc.value.bit_pointer) == (1, 7)
    assert c.parse_rw(cdb, protection=True).protect == 1


def test_parse_rw_rejects_foreign_opcode():
    with pytest.raises(ValueError):
        c.parse_rw(bytes(10))


def test_truncated_cdb():
    with pytest.raises(InvalidFieldInCdb):
        c.parse_rw(bytes([Op.READ_16]) + bytes(5))


@pytest.mark.parametrize(
    "lba,length,num_blocks,ok",
    [
        (0, 0, 100, True),
        (99, 1, 100, True),
        (0, 100, 100, True),
        (99, 2, 100, False),
        (100, 0, 100, True),
        (101, 0, 100, False),
        (2**64 - 1, 1, 100, False),
        (0, 1, 0, False),
        (0, 0, 0, True),
    ],
)
def test_check_range(lba, length, num_blocks, ok):
    rw = c.RwCdb(Op.READ_16, lba, length)
    if ok:
        rw.check_range(num_blocks)
    else:
        with pytest.raises(LbaOutOfRange):
            rw.check_range(num_blocks)


@given(st.integers(0, 255), st.integers(0, 255))
def test_cdb_length_table(opcode, add_len):
    cdb = bytes([opcode]) + bytes(6) + bytes([add_len])
    want = {0: 6, 1: 10, 2: 10, 3: 12, 4: 16, 5: 12, 6: 10, 7: 10}[opcode >> 5]
    assert c.cdb_length(cdb) == (8 + add_len if opcode == 0x7F else want)


def test_service_action():
    assert c.service_action(bytes([0x9E, 0x10]) + bytes(14)) == 0x10
    assert c.service_action(bytes([0xA3, 0xEC]) + bytes(10)) == 0x0C
    assert c.service_action(bytes([0x28]) + bytes(9)) is None
    assert c.service_action(bytes([0x7F]) + bytes(7) + b"\x00\x09" + bytes(22)) == 9


def test_inquiry():
    q = c.Inquiry.parse(bytes([0x12, 1, 0x83, 0x01, 0x00, 0]))
    assert (q.evpd, q.page_code, q.allocation_length) == (True, 0x83, 256)
    with pytest.raises(InvalidFieldInCdb) as exc:
        c.Inquiry.parse(bytes([0x12, 0, 0x80, 0, 36, 0]))
    assert exc.value.field_pointer == 2
    with pytest.raises(InvalidFieldInCdb) as exc:
        c.Inquiry.parse(bytes([0x12, 2, 0, 0, 36, 0]))
    assert (exc.value.field_pointer, exc.value.bit_pointer) == (1, 1)


def test_mode_sense_select():
    m6 = c.ModeSense.parse(bytes([0x1A, 0x08, 0xBF, 0xFF, 0xFC, 0]))
    assert (m6.ten, m6.dbd, m6.pc, m6.page_code, m6.subpage_code, m6.allocation_length) == (
        False, True, 2, 0x3F, 0xFF, 0xFC)
    m10 = c.ModeSense.parse(bytes([0x5A, 0x10, 0x48, 0, 0, 0, 0, 0x10, 0x00, 0]))
    assert (m10.ten, m10.llbaa, m10.dbd, m10.pc, m10.page_code, m10.allocation_length) == (
        True, True, False, 1, 8, 0x1000)
    s6 = c.ModeSelect.parse(bytes([0x15, 0x11, 0, 0, 24, 0]))
    assert (s6.ten, s6.pf, s6.sp, s6.parameter_list_length) == (False, True, True, 24)
    s10 = c.ModeSelect.parse(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 1, 2, 0]))
    assert (s10.ten, s10.pf, s10.sp, s10.parameter_list_length) == (True, True, False, 0x102)


def test_log_sense_and_select():
    ls = c.LogSense.parse(bytes([0x4D, 0x03, 0x4C, 0x01, 0, 0x12, 0x34, 0x02, 0x00, 0]))
    assert (ls.ppc, ls.sp, ls.pc, ls.page_code, ls.subpage) == (True, True, 1, 0x0C, 1)
    assert (ls.parameter_pointer, ls.allocation_length) == (0x1234, 0x200)
    sel = c.LogSelect.parse(bytes([0x4C, 0x02, 0xC0, 0, 0, 0, 0, 0, 0, 0]))
    assert (sel.pcr, sel.pc, sel.parameter_list_length) == (True, 3, 0)


def test_rsoc():
    r = c.ReportSupportedOpcodes.parse(bytes([0xA3, 0x0C, 0x82, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0]))
    assert (r.rctd, r.reporting_options, r.requested_opcode) == (True, 2, 0x9E)
    assert (r.requested_service_action, r.allocation_length) == (0x10, 256)
    with pytest.raises(InvalidFieldInCdb) as exc:
        c.ReportSupportedOpcodes.parse(bytes([0xA3, 0x0C, 0x04]) + bytes(9))
    assert (exc.value.field_pointer, exc.value.bit_pointer) == (2, 2)


def test_small_commands():
    assert c.RequestSense.parse(bytes([3, 1, 0, 0, 252, 0])) == c.RequestSense(True, 252)
    assert c.Unmap.parse(bytes([0x42, 1, 0, 0, 0, 0, 5, 0, 24, 0])) == c.Unmap(True, 5, 24)
    ssu = c.StartStopUnit.parse(bytes([0x1B, 1, 0, 2, 0x37, 0]))
    assert (ssu.immed, ssu.power_condition_modifier, ssu.power_condition) == (True, 2, 3)
    assert (ssu.no_flush, ssu.loej, ssu.start) == (True, True, True)
    assert c.PreventAllow.parse(bytes([0x1E, 0, 0, 0, 3, 0])).prevent == 3
    sc = c.SynchronizeCache.parse(bytes([0x35, 2, 0, 0, 1, 0, 0, 0, 8, 0]))
    assert (sc.lba, sc.blocks, sc.immed) == (256, 8, True)
    lba5 = (5).to_bytes(8, "big")
    sc16 = c.SynchronizeCache.parse(bytes([0x91, 0]) + lba5 + bytes([0, 0, 0, 9, 0, 0]))
    assert (sc16.lba, sc16.blocks, sc16.immed) == (5, 9, False)
    lba7 = (7).to_bytes(8, "big")
    g = c.GetLbaStatus.parse(bytes([0x9E, 0x12]) + lba7 + bytes([0, 0, 0x10, 0, 1, 0]))
    assert (g.lba, g.allocation_length, g.report_type) == (7, 0x1000, 1)


@pytest.mark.parametrize("cls,op", [(c.ReadCapacity16, 0x9E), (c.ReadCapacity10, 0x25)])
def test_read_capacity_pmi(cls, op):
    size = 16 if op == 0x9E else 10
    cdb = bytearray(size)
    cdb[0] = op
    cdb[5] = 1  # LBA != 0
    with pytest.raises(InvalidFieldInCdb):
        cls.parse(bytes(cdb))
    cdb[14 if size == 16 else 8] = 1  # PMI
    assert cls.parse(bytes(cdb)).pmi


def test_read_defect_data():
    r10 = c.ReadDefectData.parse(bytes([0x37, 0, 0x1D, 0, 0, 0, 0, 0, 32, 0]))
    assert r10 == c.ReadDefectData(False, True, True, 5, 32)
    r12 = c.ReadDefectData.parse(bytes([0xB7, 0x08, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]))
    assert r12 == c.ReadDefectData(True, False, True, 0, 256)


def test_format_unit_and_diagnostics():
    fu = c.FormatUnit.parse(bytes([0x04, 0xDB, 0, 0, 0, 0]))
    assert (fu.fmtpinfo, fu.longlist, fu.fmtdata, fu.cmplst, fu.defect_list_format) == (
        3, False, True, True, 3)
    sd = c.SendDiagnostic.parse(bytes([0x1D, 0x14, 0, 0, 8, 0]))
    assert sd.selftest and sd.pf and sd.parameter_list_length == 8
    with pytest.raises(InvalidFieldInCdb):
        c.SendDiagnostic.parse(bytes([0x1D, 0x24, 0, 0, 0, 0]))
    rd = c.ReceiveDiagnostic.parse(bytes([0x1C, 1, 0, 1, 0, 0]))
    assert rd == c.ReceiveDiagnostic(True, 0, 256)
    with pytest.raises(InvalidFieldInCdb) as exc:
        c.ReceiveDiagnostic.parse(bytes([0x1C, 0, 5, 1, 0, 0]))
    assert exc.value.field_pointer == 2


PARSERS = [
    (c.SynchronizeCache, [0x35, 0x91]),
    (c.ReadCapacity10, [0x25]),
    (c.ReadCapacity16, [0x9E]),
    (c.GetLbaStatus, [0x9E]),
    (c.Unmap, [0x42]),
    (c.StartStopUnit, [0x1B]),
    (c.PreventAllow, [0x1E]),
    (c.ReadDefectData, [0x37, 0xB7]),
    (c.FormatUnit, [0x04]),
    (c.Inquiry, [0x12]),
    (c.RequestSense, [0x03]),
    (c.ModeSense, [0x1A, 0x5A]),
    (c.ModeSelect, [0x15, 0x55]),
    (c.LogSense, [0x4D]),
    (c.LogSelect, [0x4C]),
    (c.ReportSupportedOpcodes, [0xA3]),
    (c.ReportSupportedTmf, [0xA3]),
    (c.ReportLuns, [0xA0]),
    (c.SendDiagnostic, [0x1D]),
    (c.ReceiveDiagnostic, [0x1C]),
]


@pytest.mark.parametrize("cls,opcodes", PARSERS, ids=[p[0].__name__ for p in PARSERS])
@given(data=st.data())
def test_parsers_only_raise_invalid_field(cls, opcodes, data):
    """Any CDB of the right size parses or is INVALID FIELD IN CDB with a pointer inside it."""
    opcode = data.draw(st.sampled_from(opcodes))
    size = c.cdb_length(bytes([opcode]))
    cdb = bytes([opcode]) + data.draw(st.binary(min_size=size - 1, max_size=size - 1))
    try:
        parsed = cls.parse(cdb)
    except InvalidFieldInCdb as exc:
        assert exc.field_pointer is not None and 0 < exc.field_pointer < size
        return
    assert parsed == cls.parse(bytearray(cdb)) == cls.parse(memoryview(cdb))


@given(st.sampled_from(sorted(c.RW_OPCODES)), st.binary(min_size=15, max_size=15))
def test_parse_rw_only_raises_invalid_field(opcode, rest):
    cdb = bytes([opcode]) + rest[: c.cdb_length(bytes([opcode])) - 1]
    try:
        rw = c.parse_rw(cdb)
    except InvalidFieldInCdb as exc:
        assert exc.field_pointer == 1 and exc.bit_pointer in (2, 4, 7)
        return
    assert 0 <= rw.lba < 2**64 and 0 <= rw.transfer_length <= 2**32


def test_the_kit_builds_a_ten_byte_log_sense_the_device_answers():
    """tcmu_py.testing.cdbs.log_sense is a whole LOG SENSE CDB (it was nine bytes long)."""
    from tcmu_py.device.block import BlockDevice
    from tcmu_py.handler import DeviceConfig
    from tcmu_py.handlers.null import NullBackend
    from tcmu_py.testing import cdbs
    from tcmu_py.testing.harness import run_command

    cdb = cdbs.log_sense(0x00)
    assert len(cdb) == 10 and c.cdb_length(cdb) == 10
    config = DeviceConfig(name="n", subtype="null", cfgstring="", size=1 << 20)
    dev = BlockDevice(config, NullBackend(1 << 20, 512))
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    assert run_command(dev, cdb, data_in_len=1024).good
