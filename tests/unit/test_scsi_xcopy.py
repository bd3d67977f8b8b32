"""Copy offload wire formats (tcmu_py.scsi.xcopy) and the EXTENDED COPY / RECEIVE COPY RESULTS
CDBs: round trips, and the sense of every malformed parameter list (SPC-4 6.3, libiscsi's
ExtendedCopy family)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py.scsi import cdb as c
from tcmu_py.scsi import xcopy as x
from tcmu_py.scsi.constants import SenseKey
from tcmu_py.scsi.sense import (
    CopyTargetDeviceNotReachable,
    InlineDataLengthExceeded,
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    ParameterListLengthError,
    ScsiError,
    TooManySegmentDescriptors,
    TooManyTargetDescriptors,
    UnsupportedSegmentDescriptorTypeCode,
    UnsupportedTargetDescriptorTypeCode,
    parse_sense,
)
from tcmu_py.testing import cdbs

LIMITS = x.CopyLimits(
    max_cscd_descriptors=2,
    max_segment_descriptors=4,
    max_descriptor_list_length=2 * x.CSCD_LENGTH + 4 * x.B2B_LENGTH,
    max_segment_length=8 << 20,
)
NAA = bytes.fromhex("6001405" + "0" * 25)
SETTINGS = settings(max_examples=150, derandomize=True, deadline=None)

designators = st.one_of(
    st.binary(min_size=16, max_size=16).map(lambda b: bytes([0x60 | b[0] & 0xF]) + b[1:]),
    st.binary(min_size=8, max_size=8).map(lambda b: bytes([0x50 | b[0] & 0xF]) + b[1:]),
)
cscds = st.builds(
    x.IdentificationCscd,
    designator=designators,
    block_length=st.sampled_from([512, 4096, 0xFFFFFF]),
    lu_id_type=st.integers(0, 3),
    nul=st.booleans(),
    relative_initiator_port=st.integers(0, 0xFFFF),
    pad=st.booleans(),
    piv=st.booleans(),
    protocol_identifier=st.integers(0, 15),
)


def segments_for(n_cscd: int) -> st.SearchStrategy[x.BlockToBlockSegment]:
    return st.builds(
        x.BlockToBlockSegment,
        source_index=st.integers(0, n_cscd - 1),
        destination_index=st.integers(0, n_cscd - 1),
        number_of_blocks=st.integers(0, 0xFFFF),
        source_lba=st.integers(0, 2**64 - 1),
        destination_lba=st.integers(0, 2**64 - 1),
        dc=st.booleans(),
        cat=st.booleans(),
    )


@st.composite
def parameter_lists(draw: st.DrawFn) -> x.ParameterList:
    targets = tuple(draw(st.lists(cscds, min_size=1, max_size=LIMITS.max_cscd_descriptors)))
    segs = tuple(draw(st.lists(segments_for(len(targets)), max_size=4)))
    usage = draw(st.sampled_from([0, 2, 3]))
    header = x.ParameterHeader(
        list_identifier=0 if usage == 3 else draw(st.integers(0, 255)),
        str_=draw(st.booleans()),
        list_id_usage=usage,
        priority=draw(st.integers(0, 7)),
        cscd_descriptor_list_length=len(targets) * x.CSCD_LENGTH,
        segment_descriptor_list_length=len(segs) * x.B2B_LENGTH,
        inline_data_length=0,
    )
    return x.ParameterList(header, targets, segs)


def one_copy(blocks: int = 8, src: int = 0, dst: int = 0, n_cscd: int = 1) -> x.ParameterList:
    header = x.ParameterHeader(1, False, 0, 0, 0, 0, 0)
    targets = tuple(x.IdentificationCscd(NAA, 512) for _ in range(n_cscd))
    return x.ParameterList(header, targets, (x.BlockToBlockSegment(src, dst, blocks, 0, 100),))


def sense_of(exc: ScsiError) -> tuple[int, int, int]:
    sd = parse_sense(exc.sense())
    return sd.sense_key, sd.asc, sd.ascq


# --- round trips ----------------------------------------------------------------------------


@SETTINGS
@given(parameter_lists())
def test_parameter_list_round_trip(plist):
    data = plist.build()
    assert x.parse_parameter_list(data, LIMITS) == plist
    for i, cscd in enumerate(plist.cscds):
        at = plist.cscd_offset(i)
        assert data[at] == 0xE4 and data[at + 8 : at + 8 + len(cscd.designator)] == cscd.designator
    for j in range(len(plist.segments)):
        assert data[plist.segment_offset(j)] == 0x02


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_extended_copy_cdb_round_trip(length):
    cdb = cdbs.extended_copy(length)
    assert len(cdb) == 16 and cdb[0] == 0x83 and cdb[1] == 0
    assert c.ExtendedCopy.parse(cdb) == c.ExtendedCopy(length)


@SETTINGS
@given(st.sampled_from([0, 1, 3, 4]), st.integers(0, 255), st.integers(0, 2**32 - 1))
def test_receive_copy_results_cdb_round_trip(sa, list_id, alloc):
    cdb = cdbs.receive_copy_results(sa, list_id, alloc)
    assert len(cdb) == 16 and cdb[0] == 0x84
    assert c.ReceiveCopyResults.parse(cdb) == c.ReceiveCopyResults(sa, list_id, alloc)


def test_extended_copy_lid4_service_action_is_refused():
    cdb = bytearray(cdbs.extended_copy(60))
    cdb[1] = 0x01  # EXTENDED COPY (LID4)
    with pytest.raises(InvalidFieldInCdb) as err:
        c.ExtendedCopy.parse(bytes(cdb))
    assert (err.value.field_pointer, err.value.bit_pointer) == (1, 4)


@SETTINGS
@given(st.sampled_from(list(x.CopyManagerStatus)), st.integers(0, 0xFFFF),
       st.integers(0, 2**50))
def test_copy_status_round_trip(status, segs, count):
    data = x.CopyStatus(status, segs, count).build()
    assert len(data) == 12 and int.from_bytes(data[:4], "big") == 8
    back = x.CopyStatus.parse(data)
    assert (back.status, back.segments_processed) == (status, segs)
    # TRANSFER COUNT UNITS scale the count down to 32 bits; what comes back is within one unit.
    unit = 1 << (10 * data[7])
    assert back.transfer_count <= count < back.transfer_count + unit
    assert data[7] == 0 or count > 0xFFFFFFFF


@SETTINGS
@given(st.integers(1, 0xFFFF), st.integers(1, 0xFFFF), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(1, 0xFFFF), st.integers(1, 255),
       st.integers(0, 31), st.lists(st.integers(0, 255), max_size=8))
def test_operating_parameters_round_trip(cscd, segs, dll, seglen, total, ident, gran, codes):
    limits = x.CopyLimits(cscd, segs, dll, seglen, 0, total, ident, gran)
    data = x.OperatingParameters(limits, tuple(codes)).build()
    assert len(data) == 44 + len(codes)
    assert int.from_bytes(data[:4], "big") == len(data) - 4  # SPC-4 6.18.4: n - 3
    assert x.OperatingParameters.parse(data) == x.OperatingParameters(limits, tuple(codes))


def test_vpd_third_party_copy_layout():
    page = x.build_vpd_third_party_copy(0, LIMITS, {0x83: [0x00], 0x84: [0x00, 0x03]}, [2, 0xE4])
    assert page[:2] == b"\x00\x8f" and int.from_bytes(page[2:4], "big") == len(page) - 4
    descs = x.parse_vpd_third_party_copy(page)
    assert set(descs) == {0x0001, 0x0004, 0x0008, 0x000C, 0x8001}
    assert all(len(body) % 4 == 0 for body in descs.values())  # SPC-4 7.8.17.1 padding
    assert x.parse_supported_commands(descs[0x0001]) == {0x83: (0,), 0x84: (0, 3)}
    params = descs[0x0004]
    assert int.from_bytes(params[4:6], "big") == LIMITS.max_cscd_descriptors
    assert int.from_bytes(params[6:8], "big") == LIMITS.max_segment_descriptors
    assert int.from_bytes(params[8:12], "big") == LIMITS.max_descriptor_list_length
    assert descs[0x0008][:3] == bytes([2, 2, 0xE4])
    general = descs[0x8001]
    assert int.from_bytes(general[8:12], "big") == LIMITS.max_segment_length
    assert general[12] == LIMITS.data_segment_granularity


def test_failed_segment_details_layout():
    data = x.build_failed_segment_details(0x02, b"\x70" + bytes(17))
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert data[56] == 0x02 and int.from_bytes(data[58:60], "big") == 18 and data[60] == 0x70


# --- malformed lists -------------------------------------------------------------------------


def test_empty_list_is_no_copy():
    # SPC-4 6.3.1 / libiscsi ExtendedCopy.ParamHdr: PARAMETER LIST LENGTH zero is GOOD.
    assert x.parse_parameter_list(b"", LIMITS) is None


@pytest.mark.parametrize("cut", [1, 8, 15, 16 + 31, 16 + 32 + 27])
def test_truncated_list_is_parameter_list_length_error(cut):
    data = one_copy().build()
    with pytest.raises(ParameterListLengthError) as err:
        x.parse_parameter_list(data[:cut], LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)


def _with_header(plist: x.ParameterList, **fields: int) -> bytes:
    data = bytearray(plist.build())
    h = x.ParameterHeader.parse(data)
    values = {f: getattr(h, f) for f in h.__dataclass_fields__}
    values.update(fields)
    data[:16] = x.ParameterHeader(**values).build()
    return bytes(data)


def test_too_many_cscd_descriptors():
    plist = one_copy(n_cscd=3)
    with pytest.raises(TooManyTargetDescriptors) as err:
        x.parse_parameter_list(plist.build(), LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x06)


def test_too_many_segment_descriptors():
    base = one_copy()
    plist = x.ParameterList(base.header, base.cscds, base.segments * 5)
    with pytest.raises(TooManySegmentDescriptors) as err:
        x.parse_parameter_list(plist.build(), LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x08)


def test_descriptor_lists_over_maximum_are_length_error_before_counts():
    # libiscsi DescrLimits: too many CSCDs *and* lists beyond MAXIMUM DESCRIPTOR LIST LENGTH
    # -> PARAMETER LIST LENGTH ERROR.
    base = one_copy(n_cscd=3)
    plist = x.ParameterList(base.header, base.cscds, base.segments * 6)
    with pytest.raises(ParameterListLengthError):
        x.parse_parameter_list(plist.build(), LIMITS)


def test_unsupported_cscd_type():
    data = bytearray(one_copy().build())
    data[16] = 0xE0  # Fibre Channel N_Port_Name (libiscsi DescrType)
    with pytest.raises(UnsupportedTargetDescriptorTypeCode) as err:
        x.parse_parameter_list(bytes(data), LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x07)
    assert err.value.field_pointer == 16 and not err.value.in_cdb


def test_unsupported_segment_type():
    data = bytearray(one_copy().build())
    data[48] = 0x03  # stream to stream... any type but 02h
    with pytest.raises(UnsupportedSegmentDescriptorTypeCode) as err:
        x.parse_parameter_list(bytes(data), LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x09)
    assert err.value.field_pointer == 48


def test_segment_index_beyond_cscd_list_is_copy_aborted():
    # libiscsi ExtendedCopy.ValidSegDescr: inaccessible DESTINATION CSCD DESCRIPTOR INDEX.
    with pytest.raises(CopyTargetDeviceNotReachable) as err:
        x.parse_parameter_list(one_copy(dst=1).build(), LIMITS)
    assert sense_of(err.value) == (SenseKey.COPY_ABORTED, 0x0D, 0x02)


@pytest.mark.parametrize(
    "fields,pointer",
    [({"list_id_usage": 1}, 1), ({"list_id_usage": 3, "list_identifier": 5}, 0)],
)
def test_bad_list_id_usage(fields, pointer):
    with pytest.raises(InvalidFieldInParameterList) as err:
        x.parse_parameter_list(_with_header(one_copy(), **fields), LIMITS)
    assert err.value.field_pointer == pointer


def test_inline_data_exceeded():
    data = _with_header(one_copy(), inline_data_length=4) + bytes(4)
    with pytest.raises(InlineDataLengthExceeded) as err:
        x.parse_parameter_list(data, LIMITS)
    assert sense_of(err.value) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x0B)


@pytest.mark.parametrize(
    "offset,value,pointer",
    [
        (17, 0x05, 17),  # PERIPHERAL DEVICE TYPE 05h (CD/DVD)
        (20, 0x02, 20),  # CODE SET ASCII
        (21, 0x13, 21),  # ASSOCIATION target port
        (21, 0x01, 21),  # DESIGNATOR TYPE T10 vendor ID
        (23, 12, 23),  # DESIGNATOR LENGTH 12
        (51, 0x00, 50),  # DESCRIPTOR LENGTH 0 of the 02h segment (bytes 50..51)
    ],
)
def test_bad_fields_point_at_them(offset, value, pointer):
    data = bytearray(one_copy().build())
    data[offset] = value
    with pytest.raises(InvalidFieldInParameterList) as err:
        x.parse_parameter_list(bytes(data), LIMITS)
    assert err.value.field_pointer == pointer and not err.value.in_cdb


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.data())
def test_fuzzed_lists_parse_or_raise_scsi_error(data):
    """Any byte string: a ParameterList or a ScsiError with ILLEGAL REQUEST / COPY ABORTED —
    never another exception."""
    base = bytearray(one_copy(n_cscd=2).build())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(base) - 1))
        base[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    try:
        got = x.parse_parameter_list(bytes(base[:cut]), LIMITS)
    except ScsiError as exc:
        assert exc.sense_key in (SenseKey.ILLEGAL_REQUEST, SenseKey.COPY_ABORTED)
        return
    assert got is None or len(got.segments) <= LIMITS.max_segment_descriptors
