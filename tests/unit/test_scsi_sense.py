"""Sense data: build/parse round trips and exact layouts (SPC-5 4.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.errors import TcmuError
from tcmu_py.scsi import sense as s
from tcmu_py.scsi.constants import SenseKey

keys = st.integers(0, 15)
bytes8 = st.integers(0, 255)
flags = st.booleans()


@given(
    key=keys,
    asc=bytes8,
    ascq=bytes8,
    info=st.none() | st.integers(-(2**31), 2**32 - 1),
    fp=st.none() | st.integers(0, 0xFFFF),
    bp=st.none() | st.integers(0, 7),
    in_cdb=flags,
    filemark=flags,
    eom=flags,
    ili=flags,
    descriptor=flags,
)
def test_round_trip(key, asc, ascq, info, fp, bp, in_cdb, filemark, eom, ili, descriptor):
    build = s.build_descriptor_sense if descriptor else s.build_fixed_sense
    data = build(
        key, asc, ascq, info=info, field_pointer=fp, bit_pointer=bp, in_cdb=in_cdb,
        filemark=filemark, eom=eom, ili=ili,
    )
    parsed = s.parse_sense(data)
    assert parsed.descriptor is descriptor
    assert (parsed.sense_key, parsed.asc, parsed.ascq) == (key, asc, ascq)
    assert parsed.info_signed == (None if info is None else (info if info < 2**31 or
                                   descriptor else info - 2**32))
    assert (parsed.filemark, parsed.eom, parsed.ili) == (filemark, eom, ili)
    if key == SenseKey.ILLEGAL_REQUEST and fp is not None:
        assert parsed.field_pointer == fp
        assert parsed.bit_pointer == bp
        assert parsed.in_cdb is in_cdb
    else:
        assert parsed.field_pointer is None
    if not descriptor:
        assert len(data) == 18
        assert data[7] == 10


def test_fixed_layout_invalid_field_in_cdb():
    data = s.InvalidFieldInCdb(field_pointer=2, bit_pointer=7).sense()
    assert data == bytes.fromhex("700005000000000a00000000240000cf0002")


def test_fixed_valid_bit_only_with_info():
    assert s.build_fixed_sense(3, 0x11, 0)[0] == 0x70
    assert s.build_fixed_sense(3, 0x11, 0, info=0)[0] == 0xF0
    # SPC-5 4.4.3: a value that does not fit the 4-byte INFORMATION field leaves VALID zero.
    big = s.build_fixed_sense(3, 0x11, 0, info=2**32)
    assert big[0] == 0x70 and big[3:7] == b"\0\0\0\0"
    assert s.parse_sense(s.build_descriptor_sense(3, 0x11, 0, info=2**40)).info == 2**40


def test_descriptor_layout_miscompare():
    data = s.Miscompare(info=0x1234).sense(descriptor=True)
    assert data[:8] == bytes([0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 12])
    assert data[8:] == bytes([0, 0x0A, 0x80, 0]) + (0x1234).to_bytes(8, "big")


def test_descriptor_without_details_is_header_only():
    assert s.build_descriptor_sense(6, 0x29, 0) == bytes([0x72, 6, 0x29, 0, 0, 0, 0, 0])


def test_descriptor_stream_and_sks():
    data = s.build_descriptor_sense(5, 0x24, 0, field_pointer=4, ili=True)
    parsed = s.parse_sense(data)
    assert parsed.field_pointer == 4 and parsed.bit_pointer is None and parsed.ili
    assert data[7] == 8 + 4


def test_progress_indication():
    parsed = s.parse_sense(s.NotReadyBecoming().sense())
    assert parsed.progress is None
    parsed = s.parse_sense(s.build_fixed_sense(2, 4, 1, progress=0x8000))
    assert parsed.progress == 0x8000


@pytest.mark.parametrize(
    "cls,codes",
    [
        (s.InvalidOpcode, (5, 0x20, 0)),
        (s.LbaOutOfRange, (5, 0x21, 0)),
        (s.InvalidFieldInCdb, (5, 0x24, 0)),
        (s.InvalidFieldInParameterList, (5, 0x26, 0)),
        (s.ParameterListLengthError, (5, 0x1A, 0)),
        (s.SavingParametersNotSupported, (5, 0x39, 0)),
        (s.Miscompare, (0xE, 0x1D, 0)),
        (s.MediumError, (3, 0x11, 0)),
        (s.WriteError, (3, 0x0C, 0)),
        (s.HardwareError, (4, 0x44, 0)),
        (s.NotReady, (2, 0x04, 0)),
        (s.NotReadyBecoming, (2, 0x04, 1)),
        (s.MediumNotPresent, (2, 0x3A, 0)),
        (s.PowerOnReset, (6, 0x29, 0)),
        (s.CapacityDataChanged, (6, 0x2A, 9)),
        (s.ModeParametersChanged, (6, 0x2A, 1)),
        (s.MediumMayHaveChanged, (6, 0x28, 0)),
        (s.SoftThresholdReached, (6, 0x38, 7)),
        (s.SpaceAllocationFailed, (7, 0x27, 7)),
        (s.WriteProtected, (7, 0x27, 0)),
    ],
)
def test_error_codes(cls, codes):
    err = cls("x")
    assert isinstance(err, s.ScsiError) and isinstance(err, TcmuError)
    for descriptor in (False, True):
        parsed = s.parse_sense(err.sense(descriptor))
        assert (parsed.sense_key, parsed.asc, parsed.ascq) == codes


def test_parameter_list_error_points_into_data():
    parsed = s.parse_sense(s.InvalidFieldInParameterList(field_pointer=9).sense())
    assert parsed.in_cdb is False and parsed.field_pointer == 9


def test_instance_override_and_transferred():
    err = s.ScsiError(sense_key=8, asc=0, ascq=5, transferred=100, info=3, filemark=True)
    assert err.transferred == 100
    parsed = s.parse_sense(err.sense())
    assert (parsed.sense_key, parsed.asc, parsed.ascq, parsed.info) == (8, 0, 5, 3)
    assert parsed.filemark
    # the override does not leak into the class
    assert s.ScsiError().sense_key == SenseKey.HARDWARE_ERROR


@pytest.mark.parametrize("bad", [b"", b"\x70" * 5, b"\x72\x00", b"\x10" * 18])
def test_parse_rejects_malformed(bad):
    with pytest.raises(ValueError):
        s.parse_sense(bad)


def test_parse_accepts_truncated_fixed():
    full = s.build_fixed_sense(5, 0x24, 0, field_pointer=1)
    parsed = s.parse_sense(full[:14])
    assert (parsed.sense_key, parsed.asc) == (5, 0x24)


any_int = st.integers(-(2**70), 2**70)


@given(
    key=st.integers(-100, 100),
    asc=any_int,
    ascq=any_int,
    info=st.none() | any_int,
    fp=st.none() | any_int,
    bp=st.none() | any_int,
    progress=st.none() | any_int,
    command_specific=st.none() | any_int,
    in_cdb=flags,
    descriptor=flags,
)
def test_building_sense_never_raises(
    key, asc, ascq, info, fp, bp, progress, command_specific, in_cdb, descriptor
):
    """Issue 11 D7: sense is built while a command fails; any integer in any field gives
    well-formed sense data, and a field pointer that does not fit 16 bits is left out (SKSV 0)
    rather than raising or pointing at another byte (SPC-5 4.4.2.4.2)."""
    build = s.build_descriptor_sense if descriptor else s.build_fixed_sense
    raw = build(
        key,
        asc,
        ascq,
        info=info,
        field_pointer=fp,
        bit_pointer=bp,
        in_cdb=in_cdb,
        progress=progress,
        command_specific=command_specific,
    )
    parsed = s.parse_sense(raw)
    assert (parsed.sense_key, parsed.asc, parsed.ascq) == (key & 0x0F, asc & 0xFF, ascq & 0xFF)
    if not descriptor:
        assert len(raw) == s.FIXED_SENSE_LENGTH
    if (key & 0x0F) == SenseKey.ILLEGAL_REQUEST and fp is not None:
        fits = 0 <= fp <= 0xFFFF
        assert parsed.field_pointer == (fp if fits else None)
        if fits:
            assert parsed.bit_pointer == (bp if bp is not None and 0 <= bp <= 7 else None)


def test_field_pointer_beyond_64k_is_omitted_from_an_error():
    err = s.InvalidFieldInParameterList("attribute at byte 70000", field_pointer=70000)
    for descriptor in (False, True):
        parsed = s.parse_sense(err.sense(descriptor=descriptor))
        assert (parsed.sense_key, parsed.asc, parsed.field_pointer) == (5, 0x26, None)


def test_describe_sense():
    text = s.describe_sense(s.InvalidFieldInCdb(field_pointer=2, bit_pointer=7).sense())
    assert text == "ILLEGAL REQUEST: INVALID FIELD IN CDB (5h/24h/00h) at CDB byte 2 bit 7"
    tape = s.describe_sense(s.build_descriptor_sense(0, 0, 1, info=-3, filemark=True))
    assert tape == ("NO SENSE: FILEMARK DETECTED (0h/00h/01h) info=-3 FILEMARK")
    assert s.describe_sense(s.build_fixed_sense(9, 0x80, 1)) == "VENDOR SPECIFIC (9h/80h/01h)"
    assert s.describe_sense(b"").startswith("malformed")


def test_every_error_class_has_a_name():
    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    for cls in walk(s.ScsiError):
        if cls.__module__ == s.__name__:
            assert (cls.asc, cls.ascq) in s.ASC_NAMES, cls
