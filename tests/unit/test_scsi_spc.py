"""SPC-5 builders and parsers: INQUIRY, VPD, mode pages, log pages, RSOC."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tcmu_py.scsi import cdb as c
from tcmu_py.scsi import sbc, spc
from tcmu_py.scsi.constants import Opcode, PeripheralType, ServiceAction
from tcmu_py.scsi.sense import (
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    ParameterListLengthError,
    SavingParametersNotSupported,
)

# --- helpers ----------------------------------------------------------------------------------


def designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    """(code set, association, type, designator) of a VPD 83h page."""
    out, pos = [], 4
    assert int.from_bytes(page[2:4], "big") == len(page) - 4
    while pos < len(page):
        n = page[pos + 3]
        out.append((page[pos] & 0x0F, (page[pos + 1] >> 4) & 3, page[pos + 1] & 0x0F,
                    page[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(page)
    return out


def mode_select_list(sense_data: bytes, ten: bool) -> bytes:
    """Turn MODE SENSE data into a MODE SELECT parameter list (MODE DATA LENGTH is reserved)."""
    data = bytearray(sense_data)
    if ten:
        data[0:2] = b"\0\0"
    else:
        data[0] = 0
    # PS is reserved in MODE SELECT: clear it like an application client would.
    return bytes(data)


# --- INQUIRY ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ptype,third", [(PeripheralType.DISK, 0x04C0), (PeripheralType.TAPE, 0x0400),
                    (PeripheralType.CHANGER, 0x0480)]
)
def test_standard_inquiry_layout(ptype, third):
    data = spc.build_standard_inquiry(ptype, "LIO-ORG", "tcmu-py disk", "0001", removable=True)
    assert len(data) == 96
    assert data[0] == ptype and data[1] == 0x80 and data[2] == 6
    assert data[3] & 0x0F == 2  # RESPONSE DATA FORMAT
    assert data[4] == 91  # ADDITIONAL LENGTH = n - 4 (SPC-5 6.7.2)
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"LIO-ORG "
    assert data[16:32] == b"tcmu-py disk    "
    assert data[32:36] == b"0001"
    versions = [int.from_bytes(data[58 + 2 * i : 60 + 2 * i], "big") for i in range(8)]
    assert versions[:4] == [0x00A0, 0x0460, third, 0]


def test_standard_inquiry_options():
    data = spc.build_standard_inquiry(
        0, "V", "P", "R", version=7, tpgs=1, protect=True, cmdque=False,
        version_descriptors=(0x00A0,), extra_version_descriptors=(0x0600,),
    )
    assert data[2] == 7 and data[5] == 0x11 and not data[7] & 0x02
    assert data[58:62] == bytes.fromhex("00a00600") and data[62:64] == b"\0\0"


@pytest.mark.parametrize(
    "vendor,product,revision",
    [("TOOLONGVENDOR", "p", "r"), ("v", "x" * 17, "r"), ("v", "p", "12345"), ("v\u00e9", "p", "r"),
     ("v\n", "p", "r")],
)
def test_standard_inquiry_rejects_bad_strings(vendor, product, revision):
    with pytest.raises(ValueError):
        spc.build_standard_inquiry(0, vendor, product, revision)


def test_vpd_supported_and_serial():
    page = spc.build_vpd_supported_pages(0, [0xB0, 0x83, 0x80, 0x83])
    assert page == bytes([0, 0, 0, 4, 0x00, 0x80, 0x83, 0xB0])
    serial = spc.build_vpd_unit_serial(1, "ABC123")
    assert serial == bytes([1, 0x80, 0, 6]) + b"ABC123"


def test_vpd_device_identification():
    naa = spc.naa_from_serial("serial-1")
    page = spc.build_vpd_device_identification(0, naa=naa, t10_vendor="LIO-ORG", t10_id="x:1")
    assert page[1] == 0x83
    descs = designators(page)
    assert descs[0] == (1, 0, 3, naa)
    assert descs[1] == (2, 0, 1, b"LIO-ORG x:1")


@given(st.text(min_size=1, max_size=40))
def test_naa_from_serial(serial):
    naa = spc.naa_from_serial(serial)
    assert len(naa) == 16 and naa[0] >> 4 == 6
    # 24-bit IEEE company id right after the NAA nibble (SPC-5 7.7.6.6.5).
    assert (int.from_bytes(naa[:4], "big") >> 4) & 0xFFFFFF == 0x001405
    assert naa == spc.naa_from_serial(serial)
    assert naa != spc.naa_from_serial(serial + "x")


def test_serial_from_name_stable_and_ascii():
    a = spc.serial_from_name("disk0")
    assert a == spc.serial_from_name("disk0") != spc.serial_from_name("disk1")
    spc.build_vpd_unit_serial(0, a)  # printable ASCII


def test_extended_inquiry():
    page = spc.build_vpd_extended_inquiry(0, headsup=True, v_sup=True)
    assert len(page) == 64 and page[3] == 0x3C
    assert page[5] == 0x05 and page[6] == 0x01


@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_truncate(data, alloc):
    out = spc.truncate(data, alloc)
    assert out == data[: min(len(data), alloc)]


def test_no_sense():
    assert spc.build_no_sense()[2] == 0 and spc.build_no_sense()[12] == 0
    assert spc.build_no_sense(descriptor=True)[0] == 0x72


# --- mode pages -------------------------------------------------------------------------------


def pages():
    return [
        sbc.read_write_error_recovery_page(),
        sbc.caching_mode_page(wce=True, wce_changeable=True),
        spc.control_mode_page(),
        spc.control_extension_mode_page(),
        spc.informational_exceptions_control_page(),
        sbc.logical_block_provisioning_mode_page(threshold_count=100),
    ]


def walk_pages(body: bytes) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    while pos < len(body):
        if body[pos] & 0x40:
            n = 4 + int.from_bytes(body[pos + 2 : pos + 4], "big")
            out.append((body[pos] & 0x3F, body[pos + 1], n))
        else:
            n = 2 + body[pos + 1]
            out.append((body[pos] & 0x3F, 0, n))
        pos += n
    assert pos == len(body)
    return out


@pytest.mark.parametrize("ten", [False, True])
@pytest.mark.parametrize("dbd", [False, True])
def test_mode_sense_all_pages(ten, dbd):
    data = spc.build_mode_sense(
        pages(), ten=ten, pc=0, page_code=0x3F, subpage=0, dbd=dbd,
        block_descriptors=[(0, 1000, 512)], device_specific=0x10,
    )
    hlen = 8 if ten else 4
    mdl = int.from_bytes(data[0:2], "big") if ten else data[0]
    assert mdl == len(data) - (2 if ten else 1)
    bdl = int.from_bytes(data[6:8], "big") if ten else data[3]
    assert bdl == (0 if dbd else 8)
    assert data[3 if ten else 2] == 0x10
    if not dbd:
        # SBC-4 6.5.2.2 short LBA descriptor: 32-bit number of blocks, 24-bit block length.
        assert data[hlen : hlen + 8] == bytes.fromhex("000003e8 00 000200".replace(" ", ""))
    listed = walk_pages(data[hlen + bdl :])
    # 3Fh/00h: only page_0 pages, in ascending order (SPC-5 6.14.1)
    assert [(p, s) for p, s, _ in listed] == [(0x01, 0), (0x08, 0), (0x0A, 0), (0x1C, 0)]


def test_mode_sense_subpages_and_specific():
    all_sub = spc.build_mode_sense(pages(), ten=True, pc=0, page_code=0x3F, subpage=0xFF, dbd=True)
    assert [(p, s) for p, s, _ in walk_pages(all_sub[8:])] == [
        (0x01, 0), (0x08, 0), (0x0A, 0), (0x0A, 1), (0x1C, 0), (0x1C, 2)]
    ctl = spc.build_mode_sense(pages(), ten=False, pc=0, page_code=0x0A, subpage=0xFF, dbd=True)
    assert [(p, s) for p, s, _ in walk_pages(ctl[4:])] == [(0x0A, 0), (0x0A, 1)]
    lbp = spc.build_mode_sense(pages(), ten=False, pc=0, page_code=0x1C, subpage=2, dbd=True)
    assert lbp[4:6] == bytes([0x5C, 0x02])  # SPF set for the sub_page format


@pytest.mark.parametrize(
    "page_code,subpage,fp", [(0x19, 0, 2), (0x08, 5, 3), (0x3F, 0x10, 3)]
)
def test_mode_sense_unsupported_page(page_code, subpage, fp):
    with pytest.raises(InvalidFieldInCdb) as exc:
        spc.build_mode_sense(pages(), ten=False, pc=0, page_code=page_code, subpage=subpage)
    assert exc.value.field_pointer == fp


def test_mode_sense_pc_values():
    kw = dict(ten=False, page_code=0x08, subpage=0, dbd=True)
    cur = spc.build_mode_sense(pages(), pc=0, **kw)
    chg = spc.build_mode_sense(pages(), pc=1, **kw)
    assert cur[4 + 2] & 0x04 and chg[4 + 2] == 0x04
    with pytest.raises(SavingParametersNotSupported):
        spc.build_mode_sense(pages(), pc=3, **kw)
    saveable = [spc.ModePage.make(0x08, 0, bytes(0x12), saveable=True)]
    saved = spc.build_mode_sense(saveable, pc=3, **kw)
    assert saved[4] == 0x88  # PS bit reports a saveable page


def test_mode_sense_long_lba_and_general_descriptors():
    big = 2**40
    data = spc.build_mode_sense([], ten=True, pc=0, page_code=0x3F, subpage=0,
                                block_descriptors=[(0, big, 4096)], llbaa=True)
    assert data[4] & 0x01 and int.from_bytes(data[6:8], "big") == 16
    assert int.from_bytes(data[8:16], "big") == big
    short = spc.build_mode_sense([], ten=False, pc=0, page_code=0x3F, subpage=0,
                                 block_descriptors=[(0, big, 4096)])
    assert short[4:8] == b"\xff\xff\xff\xff"
    tape = spc.build_mode_sense([], ten=False, pc=0, page_code=0x3F, subpage=0,
                                block_descriptors=[(0x5A, 0, 0)],
                                peripheral_type=PeripheralType.TAPE)
    assert tape[4:12] == bytes([0x5A, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("ten", [False, True])
def test_mode_select_round_trip(ten):
    plist = mode_select_list(
        spc.build_mode_sense(pages(), ten=ten, pc=0, page_code=0x3F, subpage=0xFF,
                             block_descriptors=[(0, 1000, 512)]), ten)
    parsed = spc.parse_mode_select(plist, ten)
    assert parsed.block_descriptors == [(0, 1000, 512)]
    by_key = {(p.page_code, p.subpage): p for p in pages()}
    offsets = parsed.page_offsets()
    assert offsets[0] == parsed.pages_offset == (8 if ten else 4) + 8
    for (code, sub, body), off in zip(parsed.pages, offsets, strict=True):
        page = by_key[(code, sub)]
        assert plist[off : off + len(body)] == body
        assert spc.apply_mode_select(page, body, off) == page.current


def test_mode_select_changes_only_changeable_bits():
    page = spc.control_mode_page(d_sense=False)
    body = bytearray(page.current)
    body[2] |= 0x04
    new = spc.apply_mode_select(page, bytes(body), 4)
    assert new[2] & 0x04
    body[3] ^= 0x10  # QAM is not changeable
    with pytest.raises(InvalidFieldInParameterList) as exc:
        spc.apply_mode_select(page, bytes(body), 4)
    # SPC-5 4.4.5.2: QUEUE ALGORITHM MODIFIER (byte 3 bits 7-4) is named by its bit 7.
    assert (exc.value.field_pointer, exc.value.bit_pointer, exc.value.in_cdb) == (7, 7, False)


def _change(page: spc.ModePage, byte: int, bits: int) -> bytes:
    body = bytearray(page.current)
    body[byte] ^= bits
    return bytes(body)


@pytest.mark.parametrize("page,byte,bits,named", [
    # SBC-4 6.5.5 caching page: 2-byte fields changed in their low byte only.
    (sbc.caching_mode_page(wce=False), 5, 0x01, (4, 7)),  # DISABLE PRE-FETCH TRANSFER LENGTH
    (sbc.caching_mode_page(wce=False), 9, 0x40, (8, 7)),  # MAXIMUM PRE-FETCH
    (sbc.caching_mode_page(wce=False), 15, 0x02, (14, 7)),  # CACHE SEGMENT SIZE
    (sbc.caching_mode_page(wce=False), 14, 0x01, (14, 7)),  # ... in its first byte's LSB
    (sbc.caching_mode_page(wce=False), 3, 0x01, (3, 3)),  # WRITE RETENTION PRIORITY
    (sbc.caching_mode_page(wce=False), 13, 0x01, (13, 0)),  # NUMBER OF CACHE SEGMENTS: 1 byte
    # SPC-5 7.5.8 control page.
    (spc.control_mode_page(), 9, 0x01, (8, 7)),  # BUSY TIMEOUT PERIOD
    (spc.control_mode_page(), 11, 0x80, (10, 7)),  # EXTENDED SELF-TEST COMPLETION TIME
    (spc.control_mode_page(), 2, 0x20, (2, 7)),  # TST
    (spc.control_mode_page(), 3, 0x02, (3, 2)),  # QERR
    (spc.control_mode_page(), 5, 0x40, (5, 6)),  # TAS: a single bit is named itself
    # SPC-5 7.5.13 informational exceptions control: 4-byte fields.
    (spc.informational_exceptions_control_page(), 7, 0x01, (4, 7)),  # INTERVAL TIMER
    (spc.informational_exceptions_control_page(), 10, 0x10, (8, 7)),  # REPORT COUNT
    # SBC-4 6.5.8: THRESHOLD ARMING of the first descriptor (page byte 16, bits 2-0).
    (sbc.logical_block_provisioning_mode_page(threshold_count=1), 16, 0x01, (16, 2)),
])
def test_a_refused_field_is_named_by_its_first_byte_and_bit(page, byte, bits, named):
    """SPC-5 4.4.5.2: a multiple-byte field in error is named by its first (most significant)
    byte, a multiple-bit one by its most significant bit. Before: the pointer named the first
    byte that differed and its highest differing bit (byte 9 for a MAXIMUM PRE-FETCH whose low
    byte changed)."""
    with pytest.raises(InvalidFieldInParameterList) as exc:
        spc.apply_mode_select(page, _change(page, byte, bits), 20)
    assert (exc.value.field_pointer, exc.value.bit_pointer) == (20 + named[0], named[1])


def test_field_placement():
    f = spc.Field(8, 7, 16)
    assert [f.holds(b, 7) for b in (7, 8, 9, 10)] == [False, True, True, False]
    assert spc.Field(3, 2, 2).holds(3, 1) and not spc.Field(3, 2, 2).holds(3, 0)
    assert spc.Field(11, 7, 24).holds(13, 0) and not spc.Field(11, 7, 24).holds(14, 7)
    with pytest.raises(ValueError):
        # Bytes 19-20 of a page that ends at byte 19.
        spc.ModePage.make(0x08, 0, bytes(0x12), fields=[spc.Field(19, 7, 16)])


@st.composite
def page_and_body(draw):
    page = draw(st.sampled_from(pages()))
    body = bytearray(page.current)
    hlen = page.header_length
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(hlen, len(body) - 1))
        body[i] ^= 1 << draw(st.integers(0, 7))
    return page, bytes(body)


@given(page_and_body(), st.integers(0, 100))
def test_mode_select_mask_property(case, offset):
    """SPC-5 7.5.1: accepted iff every differing bit is changeable; error names the first one."""
    page, body = case
    diffs = [
        (i, (b ^ c) & ~m & 0xFF)
        for i, (b, c, m) in enumerate(zip(body, page.current, page.changeable, strict=True))
    ]
    bad = [(i, d) for i, d in diffs if d]
    if not bad:
        new = spc.apply_mode_select(page, body, offset)
        assert new[page.header_length :] == body[page.header_length :]
        assert new[: page.header_length] == page.current[: page.header_length]
    else:
        with pytest.raises(InvalidFieldInParameterList) as exc:
            spc.apply_mode_select(page, body, offset)
        i, d = bad[0]
        bit = d.bit_length() - 1
        # SPC-5 4.4.5.2: the field holding that bit, by its first byte and bit.
        spans = [{(f.byte + (7 - f.bit + k) // 8, 7 - (7 - f.bit + k) % 8)
                  for k in range(f.width)} for f in page.fields]
        named = next(((f.byte, f.bit) for f, span in zip(page.fields, spans, strict=True)
                      if (i, bit) in span), (i, bit))
        assert (exc.value.field_pointer, exc.value.bit_pointer) == (offset + named[0], named[1])


def test_mode_select_wrong_page_length():
    page = sbc.caching_mode_page(wce=False)
    with pytest.raises(InvalidFieldInParameterList) as exc:
        spc.apply_mode_select(page, page.current[:-1], 4)
    assert exc.value.field_pointer == 5


@pytest.mark.parametrize(
    "ten,data,exc",
    [
        (False, b"\0\0\0", ParameterListLengthError),
        (True, bytes(7), ParameterListLengthError),
        (False, bytes([0, 0, 0, 4]) + bytes(4), InvalidFieldInParameterList),  # BDL not 8n
        (False, bytes([0, 0, 0, 8]) + bytes(4), ParameterListLengthError),  # BD truncated
        (False, bytes(4) + bytes([0x08, 0x12]) + bytes(5), ParameterListLengthError),
        (False, bytes(4) + bytes([0x08]), ParameterListLengthError),
        (True, bytes(8) + bytes([0x5C, 0x02, 0x00]), ParameterListLengthError),
    ],
)
def test_parse_mode_select_errors(ten, data, exc):
    with pytest.raises(exc):
        spc.parse_mode_select(data, ten)


def test_parse_mode_select_empty_pages_and_general_descriptor():
    parsed = spc.parse_mode_select(bytes([0, 0, 0x10, 8, 0x5A, 0, 0, 0, 0, 0, 0x80, 0]), False,
                                   peripheral_type=PeripheralType.TAPE)
    assert parsed.block_descriptors == [(0x5A, 0, 0x8000)] and parsed.pages == []
    assert parsed.device_specific == 0x10


def test_lbp_thresholds_round_trip():
    page = sbc.logical_block_provisioning_mode_page(threshold_count=1234)
    assert page.current[:4] == bytes([0x5C, 0x02, 0x00, 20])
    (t,) = sbc.lbp_thresholds(page)
    assert t.enabled and t.threshold_count == 1234 and t.resource == 2 and t.arming == 1
    body = bytearray(page.current)
    body[16 + 4 : 16 + 8] = (99).to_bytes(4, "big")
    new = page.with_current(spc.apply_mode_select(page, bytes(body), 0))
    assert sbc.lbp_thresholds(new)[0].threshold_count == 99


# --- log pages --------------------------------------------------------------------------------


def log_params(page: bytes) -> list[tuple[int, int, bytes]]:
    assert int.from_bytes(page[2:4], "big") == len(page) - 4
    out, pos = [], 4
    while pos < len(page):
        n = page[pos + 3]
        out.append((int.from_bytes(page[pos : pos + 2], "big"), page[pos + 2],
                    page[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(page)
    return out


@given(st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=20), max_size=8),
       st.integers(0, 0x3F), st.integers(0, 0xFE))
def test_log_page_round_trip(params, page_code, subpage):
    plist = [(code, 0x03, value) for code, value in params.items()]
    page = spc.build_log_page(page_code, subpage, plist)
    assert page[0] & 0x3F == page_code and page[1] == subpage
    assert bool(page[0] & 0x40) == bool(subpage)
    assert log_params(page) == sorted(plist)


def test_log_page_parameter_pointer():
    plist = [(1, 3, b"a"), (2, 3, b"b"), (5, 3, b"c")]
    assert [p[0] for p in log_params(spc.build_log_page(0x0C, 0, plist, parameter_pointer=2))] == [
        2, 5]
    with pytest.raises(InvalidFieldInCdb) as exc:
        spc.build_log_page(0x0C, 0, plist, parameter_pointer=6)
    assert exc.value.field_pointer == 5


def test_log_page_from_a_parameter_pointer():
    plist = [(1, 3, b"a"), (2, 3, b"bb"), (5, 3, b"c")]
    page = spc.build_log_page(0x0D, 0, plist)
    for pointer in (0, 1, 2, 3, 5):
        assert spc.log_page_from(page, pointer) == spc.build_log_page(
            0x0D, 0, plist, parameter_pointer=pointer)
    with pytest.raises(InvalidFieldInCdb) as exc:
        spc.log_page_from(page, 6)
    assert exc.value.field_pointer == 5


def test_supported_log_pages():
    assert spc.build_supported_log_pages([0x0D, 0x0C]) == bytes([0, 0, 0, 3, 0, 0x0C, 0x0D])
    sub = spc.build_supported_log_subpages([(0x0C, 0)])
    assert sub[:2] == bytes([0x40, 0xFF])
    assert sub[4:] == bytes([0, 0, 0, 0xFF, 0x0C, 0])


def test_lbp_log_page():
    page = sbc.build_lbp_log_page(available=10, used=2**40, deduplicated=7)
    assert page[0] & 0x3F == 0x0C
    params = log_params(page)
    assert [p[0] for p in params] == [1, 2, 0x100]
    assert params[0][2] == bytes([0, 0, 0, 10, 1, 0, 0, 0])
    assert params[1][2][:4] == b"\xff\xff\xff\xff"  # clipped to 32 bits


def test_temperature_log_page():
    params = log_params(spc.build_temperature_log_page(40, 60))
    assert params == [(0, 3, bytes([0, 40])), (1, 3, bytes([0, 60]))]
    assert log_params(spc.build_temperature_log_page(None)) == [(0, 3, bytes([0, 0xFF]))]


# --- REPORT SUPPORTED OPERATION CODES ---------------------------------------------------------

INFOS = [
    spc.opcode_info(Opcode.READ_10),
    spc.opcode_info(Opcode.INQUIRY, nominal_timeout=1, recommended_timeout=5),
    spc.opcode_info(Opcode.SERVICE_ACTION_IN_16, ServiceAction.READ_CAPACITY_16),
    spc.opcode_info(Opcode.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_OPERATION_CODES),
]


@pytest.mark.parametrize("rctd", [False, True])
def test_rsoc_all(rctd):
    data = spc.build_rsoc_all(INFOS, rctd=rctd)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    step = 20 if rctd else 8
    descs = [data[i : i + step] for i in range(4, len(data), step)]
    got = [(d[0], int.from_bytes(d[2:4], "big"), d[5], int.from_bytes(d[6:8], "big"))
           for d in descs]
    flag = 0x02 if rctd else 0
    assert got == [(0x12, 0, flag, 6), (0x28, 0, flag, 10), (0x9E, 0x10, flag | 1, 16),
                   (0xA3, 0x0C, flag | 1, 12)]
    if rctd:
        assert descs[0][8:20] == bytes.fromhex("000a0000" "00000001" "00000005")


@pytest.mark.parametrize(
    "options,opcode,sa,want",
    [
        (1, 0x28, 0x77, (3, 0x28)),
        (3, 0x28, 0x77, (3, 0x28)),
        (2, 0x9E, 0x10, (3, 0x9E)),
        (3, 0x9E, 0x10, (3, 0x9E)),
        (2, 0x9E, 0x11, (1, None)),
        (3, 0x9E, 0x11, (1, None)),
        (1, 0x2A, 0, (1, None)),
        (2, 0xC0, 0, (1, None)),
        (1, 0x9E, 0x10, InvalidFieldInCdb),
        (2, 0x28, 0, InvalidFieldInCdb),
    ],
)
def test_rsoc_one(options, opcode, sa, want):
    kw = dict(reporting_options=options, opcode=opcode, service_action=sa)
    if want is InvalidFieldInCdb:
        with pytest.raises(InvalidFieldInCdb):
            spc.build_rsoc_one(INFOS, **kw)
        return
    support, op = want
    data = spc.build_rsoc_one(INFOS, **kw)
    assert data[1] & 0x07 == support
    size = int.from_bytes(data[2:4], "big")
    if support == 1:
        assert size == 0 and len(data) == 4
    else:
        assert data[4] == op and size == len(data) - 4 == c.cdb_length(data[4:])


def test_rsoc_one_timeouts():
    data = spc.build_rsoc_one(INFOS, reporting_options=1, opcode=0x12, service_action=0,
                              rctd=True)
    assert data[1] == 0x83 and data[2:4] == b"\0\x06"
    assert data[10:22] == bytes.fromhex("000a0000" "00000001" "00000005")


ALL_USAGE = [
    (ptype, op, sa)
    for ptype, table in [(None, spc._COMMON_USAGE), *spc._USAGE_BY_TYPE.items()]
    for op, sa in table
]


@pytest.mark.parametrize("ptype,opcode,sa", ALL_USAGE)
def test_cdb_usage_tables_well_formed(ptype, opcode, sa):
    mask = spc.cdb_usage_mask(opcode, sa, peripheral_type=ptype)
    # SPC-5 6.35.4: byte 0 is the opcode, CDB size as the kernel computes it, service action
    # in the service action field, control byte not evaluated (like LIO).
    assert mask[0] == opcode and len(mask) == c.cdb_length(mask)
    assert c.service_action(mask) == sa
    assert mask[-1] == 0


def test_cdb_usage_unknown_and_aliases():
    with pytest.raises(KeyError):
        spc.cdb_usage_mask(0xC0)
    assert spc.cdb_usage_mask(0x34)[1] == 0x02  # PRE-FETCH(10) on a disk
    assert spc.cdb_usage_mask(0x34, peripheral_type=PeripheralType.TAPE)[1] == 0x1F
    assert spc.cdb_usage_mask(0x01)[0] == 0x01  # REWIND found without a type


@given(st.sampled_from(sorted(c.RW_OPCODES)), st.binary(min_size=16, max_size=16))
def test_usage_mask_covers_every_bit_parse_rw_reads(opcode, raw):
    """Bits outside the CDB usage data never change what parse_rw decides (group excepted)."""
    mask = spc.cdb_usage_mask(opcode)
    cdb = bytes([opcode]) + raw[1 : len(mask)]
    masked = bytes([opcode]) + bytes(a & m for a, m in zip(cdb[1:], mask[1:], strict=True))

    def outcome(b: bytes):
        try:
            rw = c.parse_rw(b)
        except InvalidFieldInCdb as e:
            return ("error", e.field_pointer, e.bit_pointer)
        return rw.__class__(**{**{f: getattr(rw, f) for f in rw.__slots__}, "group": 0})

    assume(len(cdb) == len(mask))
    assert outcome(cdb) == outcome(masked)


def test_control_page_swp_changeable():
    fixed = spc.control_mode_page()
    assert fixed.changeable[spc.CONTROL_SWP_BYTE] == 0
    page = spc.control_mode_page(swp_changeable=True)
    body = bytearray(page.current)
    body[spc.CONTROL_SWP_BYTE] |= spc.CONTROL_SWP_BIT
    assert spc.apply_mode_select(page, bytes(body), 0)[spc.CONTROL_SWP_BYTE] & 0x08
    with pytest.raises(InvalidFieldInParameterList):
        spc.apply_mode_select(fixed, bytes(body), 0)
    # D_SENSE lives where the constants say
    assert page.changeable[spc.CONTROL_D_SENSE_BYTE] == spc.CONTROL_D_SENSE_BIT


def test_port_designators():
    page = spc.build_vpd_device_identification(
        0,
        naa=spc.naa_from_serial("s"),
        extra_designators=[spc.relative_target_port_designator(2, protocol=5),
                           spc.target_port_group_designator(7)],
    )
    descs = designators(page)
    assert descs[1] == (1, 1, 4, b"\0\0\0\x02") and descs[2] == (1, 1, 5, b"\0\0\0\x07")
    # PIV + iSCSI protocol identifier on the relative port designator
    raw = spc.relative_target_port_designator(2, protocol=5)
    assert raw[0] >> 4 == 5 and raw[1] & 0x80


def test_diagnostic_pages_and_tmf():
    assert spc.build_supported_diagnostic_pages() == bytes([0, 0, 0, 1, 0])
    assert spc.build_report_supported_tmf() == bytes([0xC8, 0, 0, 0])
    long = spc.build_report_supported_tmf(repd=True, it_nexus_reset=True)
    assert len(long) == 16 and long[1] == 1 and long[3] == 0x0C
