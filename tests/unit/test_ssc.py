"""scsi.ssc wire formats: CDB parse/build round trips, parameter data layouts, conditions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.scsi import sense, ssc
from tcmu_py.scsi.sense import InvalidFieldInParameterList, parse_sense

u8 = st.integers(0, 0xFF)


@given(st.sampled_from([0x08, 0x0A]), st.booleans(), st.booleans(), st.integers(0, 0xFFFFFF))
def test_read_write6_round_trip(op: int, fixed: bool, sili: bool, n: int) -> None:
    cdb = ssc.ReadWrite6(fixed, sili, n).build(op)
    assert len(cdb) == 6 and cdb[0] == op
    assert ssc.ReadWrite6.parse(cdb) == ssc.ReadWrite6(fixed, sili, n)


@given(st.integers(0, 3), st.integers(-(1 << 23), (1 << 23) - 1))
def test_space6_round_trip(code: int, count: int) -> None:
    assert ssc.Space.parse(ssc.Space(code, count).build()) == ssc.Space(code, count)


@given(st.integers(0, 3), st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 0xFFFF))
def test_space16_round_trip(code: int, count: int, plen: int) -> None:
    cdb = ssc.Space(code, count, plen).build(sixteen=True)
    assert len(cdb) == 16 and ssc.Space.parse(cdb) == ssc.Space(code, count, plen)


@given(st.booleans(), st.booleans(), u8, st.integers(0, 0xFFFFFFFF), st.booleans())
def test_locate10_round_trip(cp: bool, immed: bool, part: int, ident: int, bt: bool) -> None:
    loc = ssc.Locate(0, cp, immed, part, ident, bt=bt)
    cdb = loc.build()
    assert len(cdb) == 10 and ssc.Locate.parse(cdb) == loc


@given(st.integers(0, 7), st.booleans(), st.booleans(), u8, st.integers(0, (1 << 64) - 1))
def test_locate16_round_trip(dest: int, cp: bool, immed: bool, part: int, ident: int) -> None:
    loc = ssc.Locate(dest, cp, immed, part, ident)
    cdb = loc.build(sixteen=True)
    assert len(cdb) == 16 and ssc.Locate.parse(cdb) == loc


@given(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_load_unload_round_trip(
    immed: bool, hold: bool, eot: bool, reten: bool, load: bool
) -> None:
    lu = ssc.LoadUnload(immed, hold, eot, reten, load)
    assert ssc.LoadUnload.parse(lu.build()) == lu


@given(st.integers(0, 0x1F), u8, u8, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
       st.booleans())
def test_read_attribute_round_trip(sa: int, vol: int, part: int, first: int, alloc: int,
                                   cache: bool) -> None:
    ra = ssc.ReadAttribute(sa, vol, part, first, alloc, cache)
    cdb = ra.build()
    assert len(cdb) == 16 and ssc.ReadAttribute.parse(cdb) == ra


@given(st.booleans(), u8, u8, st.integers(0, 0xFFFFFFFF))
def test_write_attribute_round_trip(wtc: bool, vol: int, part: int, n: int) -> None:
    wa = ssc.WriteAttribute(wtc, vol, part, n)
    assert ssc.WriteAttribute.parse(wa.build()) == wa


def test_short_cdb_is_invalid_field() -> None:
    with pytest.raises(sense.ScsiError) as info:
        ssc.Space.parse(bytes([0x91, 0, 0]))
    assert (info.value.sense_key, info.value.asc) == (5, 0x24)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 40), st.booleans(), st.booleans())
def test_read_position_forms(obj: int, file_id: int, bop: bool, eop: bool) -> None:
    p = ssc.Position(0, obj, file_id, bop, eop, False)
    long = ssc.build_read_position_long(p)
    ext = ssc.build_read_position_extended(p)
    short = ssc.build_read_position_short(p)
    assert len(long) == len(ext) == 32 and len(short) == 20
    assert ssc.parse_read_position(long, ssc.ReadPositionForm.LONG) == p
    e = ssc.parse_read_position(ext, ssc.ReadPositionForm.EXTENDED)
    assert (e.object_id, e.bop, e.eop) == (obj, bop, eop)
    assert int.from_bytes(ext[2:4], "big") == 0x1C
    s = ssc.parse_read_position(short, ssc.ReadPositionForm.SHORT)
    if obj <= 0xFFFFFFFF:
        assert s.object_id == obj and not short[0] & ssc.PERR
    else:
        assert short[0] & ssc.PERR  # SSC-5: position does not fit the short form


def test_block_limits_layout() -> None:
    assert ssc.build_read_block_limits(0x800000, 1) == bytes([0, 0x80, 0, 0, 0, 1])
    assert len(ssc.build_read_block_limits_mloi(5)) == 20


def test_density_descriptor_layout() -> None:
    d = ssc.DensityDescriptor(0x5E, 0x5E, True, True, 20669, 127, 6656, 12_000_000, "LTO-CVE",
                              "U-832", "Ultrium 8/32T")
    data = ssc.build_density_support([d, d])
    assert int.from_bytes(data[:2], "big") == 2 + 2 * 52 and len(data) == 4 + 2 * 52
    desc = data[4:56]
    assert desc[0] == 0x5E and desc[2] == 0xA1
    # DLV=1 says DESCRIPTOR LENGTH is valid: the 47 bytes after it (a zero made sg_rep_density
    # and backup software's parsers read a descriptor of no length)
    assert int.from_bytes(desc[3:5], "big") == 0x2F == len(desc) - 5
    assert int.from_bytes(desc[5:8], "big") == 20669 and desc[16:24] == b"LTO-CVE "
    mt = ssc.build_medium_type_support(
        [ssc.MediumTypeDescriptor(0x88, (0x5E,), 127, 960, "LTO-CVE", "U-8", "Ultrium 8")]
    )
    assert len(mt) == 4 + 56 and mt[4] == 0x88 and mt[7] == 0x34 and mt[8] == 1 and mt[9] == 0x5E


@pytest.mark.parametrize(
    ("pair", "code", "length"),
    [
        (ssc.data_compression_page(True), 0x0F, 16),
        (ssc.device_configuration_page(False), 0x10, 16),
        (ssc.device_configuration_extension_page(), 0x50, 32),
        (ssc.medium_partition_page([12_000_000], 0), 0x11, 10),
        (ssc.medium_partition_page([12_000_000], 1), 0x11, 12),
        (ssc.medium_partition_page([6_000_000, 6_000_000], 3), 0x11, 16),
        (ssc.medium_configuration_page(True), 0x1D, 32),
    ],
)
def test_mode_page_lengths(pair: tuple[bytes, bytes], code: int, length: int) -> None:
    cur, chg = pair
    assert len(cur) == len(chg) == length and cur[0] == code
    page_len = int.from_bytes(cur[2:4], "big") + 4 if code & 0x40 else cur[1] + 2
    assert page_len == length


def test_log_pages_are_well_formed() -> None:
    for page in (
        ssc.error_counter_page(0x02, bytes_processed=5, uncorrected=1),
        ssc.sequential_access_page(written_in=1, written_media=2, read_media=3, read_out=4,
                                   cleaning=False),
        ssc.tape_alert_page({9, 0x14}),
        ssc.tape_capacity_page(10, 20),
    ):
        length = int.from_bytes(page[2:4], "big")
        assert len(page) == 4 + length
        pos, codes = 4, []
        while pos < len(page):
            code, _ctl, n = struct.unpack_from(">HBB", page, pos)
            codes.append(code)
            pos += 4 + n
        assert pos == len(page) and codes == sorted(codes)
    ta = ssc.tape_alert_page({9})
    flag = [ta[4 + 5 * (k - 1) + 4] for k in range(1, 0x41)]  # 5-byte parameters 01h..40h
    assert [k for k, v in enumerate(flag, 1) if v] == [9]


@given(st.lists(st.tuples(st.integers(0x800, 0xBFF), st.integers(0, 2), st.binary(max_size=40)),
                max_size=6))
def test_attribute_list_round_trip(attrs: list[tuple[int, int, bytes]]) -> None:
    objs = [ssc.Attribute(i, f, v) for i, f, v in attrs]
    body = b"".join(a.build() for a in objs)
    assert ssc.parse_attribute_list(len(body).to_bytes(4, "big") + body) == objs
    values = ssc.build_attribute_values(objs)
    assert int.from_bytes(values[:4], "big") == len(body)


def test_attribute_list_truncated() -> None:
    a = ssc.Attribute(0x800, 1, b"ABCDEFGH").build()
    with pytest.raises(sense.ScsiError) as info:
        ssc.parse_attribute_list(len(a).to_bytes(4, "big") + a[:-2])
    assert (info.value.sense_key, info.value.asc) == (5, 0x26)


@pytest.mark.parametrize(
    ("err", "codes", "flag"),
    [
        (sense.FilemarkDetected(info=3), (0, 0, 1), "filemark"),
        (sense.EarlyWarning(info=0), (0, 0, 2), "eom"),
        (sense.BeginningOfPartition(info=1), (0, 0, 4), "eom"),
        (sense.IncorrectLength(info=-5), (0, 0, 0), "ili"),
        (sense.EndOfData(info=7), (8, 0, 5), None),
        (sense.VolumeOverflow(info=2), (0xD, 0, 2), "eom"),
        (sense.CannotReadIncompatibleFormat(), (3, 0x30, 2), None),
        (sense.CannotWriteIncompatibleFormat(), (7, 0x30, 5), None),
        (sense.CleaningCartridgeInstalled(), (2, 0x30, 3), None),
        (sense.WormOverwriteAttempted(), (7, 0x30, 0x0C), None),
    ],
)
def test_conditions_carry_their_sense(err: sense.ScsiError, codes: tuple[int, int, int],
                                      flag: str | None) -> None:
    for descriptor in (False, True):
        s = parse_sense(err.sense(descriptor=descriptor))
        assert (s.sense_key, s.asc, s.ascq) == codes
        if flag:
            assert getattr(s, flag)
        if err.info is not None:
            assert s.info_signed == err.info


@given(st.binary(min_size=0, max_size=24), st.integers(1, 1 << 50), st.integers(0, 3))
def test_partition_page_select_sizes_fit_or_field_pointer(
    body: bytes, capacity: int, max_additional: int
) -> None:
    """Whatever page 11h a MODE SELECT sends: partition sizes > 0 within the capacity, one per
    defined partition, or INVALID FIELD IN PARAMETER LIST pointing inside the page."""
    cur, _ = ssc.medium_partition_page([capacity // 10**6], max_additional)
    page = bytes([0x11, max(len(body), 2) - 2]) + body[2:]
    try:
        sizes = ssc.parse_medium_partition_select(page, 100, cur, capacity)
    except InvalidFieldInParameterList as exc:
        assert exc.field_pointer is not None and 100 <= exc.field_pointer < 100 + len(page)
        return
    if sizes is not None:
        assert len(sizes) == page[3] + 1 <= max_additional + 1
        assert all(n > 0 for n in sizes)
        assert sum(sizes) <= capacity
