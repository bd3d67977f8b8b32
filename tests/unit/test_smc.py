"""SMC-3 wire formats: CDB parse/build, element status data, mode pages, sense codes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.scsi import sense, smc
from tcmu_py.scsi.constants import CodeSet
from tcmu_py.scsi.sense import InvalidFieldInCdb, parse_sense
from tcmu_py.scsi.smc import (
    ACCESS,
    FULL,
    ElementDescriptor,
    ElementStatus,
    ElementStatusPage,
    ElementType,
    VolumeTag,
)

u16 = st.integers(0, 0xFFFF)


@given(
    st.builds(
        smc.ReadElementStatus,
        element_type=st.integers(0, 4),
        voltag=st.booleans(),
        starting_address=u16,
        number_of_elements=u16,
        curdata=st.booleans(),
        dvcid=st.booleans(),
        allocation_length=st.integers(0, 0xFFFFFF),
    )
)
def test_read_element_status_round_trip(req: smc.ReadElementStatus) -> None:
    cdb = req.build()
    assert len(cdb) == 12 and cdb[0] == 0xB8
    assert smc.ReadElementStatus.parse(cdb) == req


def test_read_element_status_field_positions() -> None:
    # SMC-3 6.12 table 20, as Linux ch builds it for one data transfer element.
    cdb = bytes([0xB8, 0x10 | 4, 0x01, 0x00, 0, 1, 0x01, 0, 0, 255, 0, 0])
    req = smc.ReadElementStatus.parse(cdb)
    assert (req.element_type, req.voltag, req.starting_address) == (4, True, 0x100)
    assert (req.number_of_elements, req.dvcid, req.curdata, req.allocation_length) == (
        1,
        True,
        False,
        255,
    )


@pytest.mark.parametrize("code", range(5, 16))
def test_reserved_element_type_codes_are_rejected(code: int) -> None:
    cdb = bytes([0xB8, code, 0, 0, 0, 1, 0, 0, 0, 255, 0, 0])
    with pytest.raises(InvalidFieldInCdb) as exc:
        smc.ReadElementStatus.parse(cdb)
    sense = parse_sense(exc.value.sense())
    assert (sense.field_pointer, sense.bit_pointer) == (1, 3)


@given(st.builds(smc.MoveMedium, u16, u16, u16, st.booleans()))
def test_move_medium_round_trip(req: smc.MoveMedium) -> None:
    assert smc.MoveMedium.parse(req.build()) == req


@given(st.builds(smc.ExchangeMedium, u16, u16, u16, u16, st.booleans(), st.booleans()))
def test_exchange_medium_round_trip(req: smc.ExchangeMedium) -> None:
    assert smc.ExchangeMedium.parse(req.build()) == req


@given(st.builds(smc.PositionToElement, u16, u16, st.booleans()))
def test_position_round_trip(req: smc.PositionToElement) -> None:
    cdb = req.build()
    assert len(cdb) == 10
    assert smc.PositionToElement.parse(cdb) == req


@given(st.builds(smc.InitializeElementStatusWithRange, st.booleans(), st.booleans(), u16, u16))
def test_initialize_with_range_round_trip(req: smc.InitializeElementStatusWithRange) -> None:
    assert smc.InitializeElementStatusWithRange.parse(req.build()) == req


def test_linux_ch_cdbs_decode() -> None:
    # drivers/scsi/ch.c ch_move / ch_exchange / ch_position byte layouts.
    move = bytes([0xA5, 0, 0, 1, 0x04, 0x00, 0x01, 0x00, 0, 0, 1, 0])
    assert smc.MoveMedium.parse(move) == smc.MoveMedium(1, 0x400, 0x100, invert=True)
    exch = bytes([0xA6, 0, 0, 1, 0x04, 0x00, 0x01, 0x00, 0x04, 0x01, 2, 0])
    assert smc.ExchangeMedium.parse(exch) == smc.ExchangeMedium(
        1, 0x400, 0x100, 0x401, invert1=True, invert2=False
    )
    pos = bytes([0x2B, 0, 0, 1, 0x03, 0x00, 0, 0, 0, 0])
    assert smc.PositionToElement.parse(pos) == smc.PositionToElement(1, 0x300)


def test_open_close_action_codes() -> None:
    for action in smc.OpenCloseAction:
        req = smc.OpenCloseImportExportElement(0x300, action)
        assert smc.OpenCloseImportExportElement.parse(req.build()) == req
    bad = bytes([0x1B, 0, 0x03, 0x00, 0x02, 0])
    with pytest.raises(InvalidFieldInCdb):
        smc.OpenCloseImportExportElement.parse(bad)


@pytest.mark.parametrize(
    ("error", "codes"),
    [
        (sense.MediumDestinationElementFull, (0x5, 0x3B, 0x0D)),
        (sense.MediumSourceElementEmpty, (0x5, 0x3B, 0x0E)),
        (sense.InvalidElementAddress, (0x5, 0x21, 0x01)),
        (sense.MediumRemovalPrevented, (0x5, 0x53, 0x02)),
        (sense.ImportExportElementOpen, (0x2, 0x3A, 0x02)),
        (sense.ImportExportElementAccessed, (0x6, 0x28, 0x01)),
    ],
)
def test_error_sense_codes(error: type[sense.ScsiError], codes: tuple[int, int, int]) -> None:
    sense = parse_sense(error("x").sense())
    assert (sense.sense_key, sense.asc, sense.ascq) == codes


# ---------------------------------------------------------------------------------------------
# Element status data


def test_descriptor_layout_with_voltag_and_dvcid() -> None:
    desc = ElementDescriptor(
        address=0x100,
        flags=FULL | ACCESS,
        source=0x400,
        medium_type=smc.MediumType.DATA,
        primary_tag=VolumeTag("ABC000L8"),
        code_set=CodeSet.ASCII,
        identifier=b"SER1",
    )
    raw = desc.build(pvoltag=True, avoltag=False, identifier_length=10)
    assert len(raw) == smc.descriptor_length(pvoltag=True, avoltag=False, identifier_length=10)
    assert len(raw) == 12 + 36 + 4 + 10
    assert raw[0:2] == b"\x01\x00" and raw[2] == 0x09
    assert raw[9] == 0x80 | 1 and raw[10:12] == b"\x04\x00"  # SVALID, data medium, source
    assert raw[12:48] == b"ABC000L8" + b" " * 24 + b"\x00" * 4  # SMC-3 volume tag
    assert raw[48:52] == bytes([2, 0, 0, 10])  # code set ASCII, type 0, length 10
    assert raw[52:] == b"SER1      "


def test_descriptor_without_tags_is_sixteen_bytes() -> None:
    # What Linux ch copies (16 bytes at offset 16 of the response).
    raw = ElementDescriptor(address=7).build(pvoltag=False, avoltag=False, identifier_length=0)
    assert raw == b"\x00\x07" + bytes(14)


descriptors = st.builds(
    ElementDescriptor,
    address=u16,
    flags=st.integers(0, 255),
    asc=st.integers(0, 255),
    ascq=st.integers(0, 255),
    source=st.none() | u16,
    medium_type=st.integers(0, 7),
    invert=st.booleans(),
    disabled=st.booleans(),
    primary_tag=st.none() | st.builds(VolumeTag, st.from_regex(r"[A-Z0-9]{1,32}", fullmatch=True)),
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(smc.ELEMENT_TYPES)),
            st.lists(descriptors, max_size=5),
            st.booleans(),
        ),
        max_size=4,
    )
)
def test_element_status_round_trip(spec: list) -> None:
    pages = [
        ElementStatusPage(etype, tuple(descs), pvoltag=voltag) for etype, descs, voltag in spec
    ]
    data = smc.build_element_status(pages)
    parsed = ElementStatus.parse(data)
    n = sum(len(p.descriptors) for p in pages)
    assert parsed.number_available == n
    assert parsed.byte_count == len(data) - 8
    expect = [
        (p.element_type, [d if p.pvoltag else _untagged(d) for d in p.descriptors]) for p in pages
    ]
    assert [(p.element_type, list(p.descriptors)) for p in parsed.pages] == expect


def _untagged(d: ElementDescriptor) -> ElementDescriptor:
    from dataclasses import replace

    return replace(d, primary_tag=None)


def test_header_counts_are_not_reduced_by_truncation() -> None:
    page = ElementStatusPage(
        ElementType.STORAGE,
        tuple(ElementDescriptor(0x400 + i, ACCESS) for i in range(10)),
        pvoltag=True,
    )
    data = smc.build_element_status([page])
    assert data[5:8] == (8 + 10 * 52).to_bytes(3, "big")  # page header + descriptors
    truncated = ElementStatus.parse(data[: 8 + 8 + 3 * 52 + 20])
    assert truncated.number_available == 10
    assert truncated.byte_count == 8 + 10 * 52
    assert len(truncated.pages[0].descriptors) == 3  # only complete descriptors parse


# ---------------------------------------------------------------------------------------------
# Mode pages


def test_element_address_assignment_page() -> None:
    page = smc.element_address_assignment_page(
        {
            ElementType.MEDIUM_TRANSPORT: (1, 1),
            ElementType.STORAGE: (0x400, 20),
            ElementType.IMPORT_EXPORT: (0x300, 2),
            ElementType.DATA_TRANSFER: (0x100, 4),
        }
    )
    assert len(page) == 20 and page[:2] == b"\x1d\x12"
    words = [int.from_bytes(page[i : i + 2], "big") for i in range(2, 18, 2)]
    assert words == [1, 1, 0x400, 20, 0x300, 2, 0x100, 4]  # SMC-3 7.3.3 table 34 order
    # What Linux ch_readconfig reads at buffer[4 + bdlen + 2 ..] (page offset 2..17).


def test_transport_geometry_page() -> None:
    assert smc.transport_geometry_page(2) == bytes([0x1E, 4, 0, 0, 0, 0])
    assert smc.transport_geometry_page(1, rotate=True) == bytes([0x1E, 2, 1, 0])


def test_device_capabilities_page() -> None:
    holders = [ElementType.STORAGE, ElementType.IMPORT_EXPORT, ElementType.DATA_TRANSFER]
    page = smc.device_capabilities_page(
        holders, {t: holders for t in holders}, {ElementType.STORAGE: [ElementType.STORAGE]}
    )
    assert len(page) == 20 and page[:2] == b"\x1f\x12"
    assert page[2] == 0b1110  # STOR DT, STOR I/E, STOR ST; not STOR MT
    assert list(page[4:8]) == [0, 0b1110, 0b1110, 0b1110]  # MT->, ST->, I/E->, DT->
    assert list(page[12:16]) == [0, 0b0010, 0, 0]  # ST<>ST only


def test_vendor_specific_bytes_round_trip() -> None:
    """SMC-3: vendor specific bytes may end an element descriptor; the page's descriptor length
    covers them and the parser keeps them apart from the identifier."""
    d = ElementDescriptor(address=500, flags=1, code_set=2, identifier_type=0,
                          identifier=b"SER1", vendor_specific=b"L8L")
    page = smc.ElementStatusPage(smc.ElementType.DATA_TRANSFER, (d,), True, False, 32, 4)
    assert page.descriptor_length == 12 + 36 + 4 + 32 + 4
    (got,) = smc.ElementStatus.parse(smc.build_element_status([page])).pages
    assert got.identifier_length == 32 and got.vendor_length == 4
    assert got.descriptors[0].identifier == b"SER1"
    assert got.descriptors[0].vendor_specific == b"L8L\x00"
    with pytest.raises(ValueError):
        d.build(pvoltag=False, avoltag=False, identifier_length=4, vendor_length=2)
