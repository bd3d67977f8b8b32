"""SPC-5 wire formats every device type shares: INQUIRY, VPD, mode pages, log pages, RSOC.

Rules this module follows:

* Builders take explicit values and return the *complete* response; the caller cuts it to the
  ALLOCATION LENGTH with :func:`truncate` (SPC-5 4.2.5.6: the device server returns
  min(allocation length, available) bytes and the length fields still describe all the data).
* Parsers of parameter lists raise :class:`ParameterListLengthError` or
  :class:`InvalidFieldInParameterList` with the byte offset into the parameter list.
* A mode page is kept as whole page bytes (header included) for its current, changeable and
  default values; MODE SELECT may change only the bits set in the changeable mask
  (SPC-5 6.11, 7.5.1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tcmu_py.scsi.cdb import cdb_length
from tcmu_py.scsi.constants import (
    ALL_SUBPAGES,
    Association,
    CodeSet,
    DesignatorType,
    LogPageControl,
    LogParameterFormat,
    ModePageCode,
    Opcode,
    PageControl,
    PeripheralType,
    RsocSupport,
    ServiceAction,
    VersionDescriptor,
    VpdPage,
)
from tcmu_py.scsi.sense import (
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    ParameterListLengthError,
    SavingParametersNotSupported,
    build_descriptor_sense,
    build_fixed_sense,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_VPD_HEADER = struct.Struct(">BBH")  # SPC-5 7.7.1: qualifier/type, page code, page length


def truncate(data: bytes, allocation_length: int) -> bytes:
    """The first ``allocation_length`` bytes of ``data`` (SPC-5 4.2.5.6)."""
    return data[:allocation_length]


def build_no_sense(descriptor: bool = False) -> bytes:
    """REQUEST SENSE data when nothing is pending: NO SENSE, 00h/00h (SPC-5 6.39.2)."""
    if descriptor:
        return build_descriptor_sense(0, 0, 0)
    return build_fixed_sense(0, 0, 0)


def _ascii(value: str, width: int, what: str) -> bytes:
    """SPC-5 4.3.1: ASCII 20h..7Eh, left-aligned, padded with spaces to the field width."""
    raw = value.encode("ascii", "strict") if value.isascii() else b""
    if len(raw) != len(value) or any(not 0x20 <= b <= 0x7E for b in raw):
        raise ValueError(f"{what} {value!r} must be printable ASCII")
    if len(raw) > width:
        raise ValueError(f"{what} {value!r} longer than {width} bytes")
    return raw.ljust(width, b" ")


def ascii_text(value: str) -> str:
    """`value` made fit for an ASCII field without failing: every character outside 20h..7Eh
    (SPC-5 4.3.1) becomes "?". For identifiers that were validated earlier and must never turn
    a later INQUIRY or READ ELEMENT STATUS into an exception."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(c if " " <= c <= "~" else "?" for c in value)


# --- INQUIRY --------------------------------------------------------------------------------

#: Version descriptor codes (SPC-5 6.7.2 table 153).

_V = VersionDescriptor
_DEFAULT_VERSIONS: dict[int, tuple[int, ...]] = {
    PeripheralType.DISK: (_V.SAM5, _V.SPC4, _V.SBC3),
    PeripheralType.TAPE: (_V.SAM5, _V.SPC4, _V.SSC3),
    PeripheralType.CHANGER: (_V.SAM5, _V.SPC4, _V.SMC3),
}

STANDARD_INQUIRY_LENGTH = 96
# SPC-5 6.7.2 table 148: bytes 0..7 flags, 8..15 vendor, 16..31 product, 32..35 revision,
# 36..55 vendor specific, 56..57 (SPI), 58..73 eight version descriptors, 74..95 reserved.
_STD_INQUIRY = struct.Struct(">BBBBBBBB8s16s4s20s2x16s22x")


def build_standard_inquiry(
    peripheral_type: int,
    vendor: str,
    product: str,
    revision: str,
    *,
    removable: bool = False,
    version: int = 6,
    cmdque: bool = True,
    protect: bool = False,
    tpgs: int = 0,
    three_pc: bool = False,
    hisup: bool = True,
    version_descriptors: Sequence[int] | None = None,
    extra_version_descriptors: Sequence[int] = (),
    vendor_specific: bytes = b"",
) -> bytes:
    """96 bytes of standard INQUIRY data (SPC-5 6.7.2).

    ``version`` 6 claims SPC-4, 7 SPC-5.  ``version_descriptors`` replaces the per-type default
    (SAM-5, SPC-4 and SBC-3 / SSC-3 / SMC-3); ``extra_version_descriptors`` are appended; at most
    eight fit.  Raises ValueError for identification strings that are not printable ASCII or too
    long (8 / 16 / 4 bytes).
    """
    versions = list(
        _DEFAULT_VERSIONS.get(peripheral_type, (VersionDescriptor.SAM5, VersionDescriptor.SPC4))
        if version_descriptors is None
        else version_descriptors
    )
    versions += extra_version_descriptors
    if len(versions) > 8:
        raise ValueError("at most eight version descriptors fit in standard INQUIRY data")
    if not 0 <= tpgs <= 3:
        raise ValueError(f"TPGS {tpgs} out of range")
    return _STD_INQUIRY.pack(
        peripheral_type & 0x1F,  # PERIPHERAL QUALIFIER 000b: the LU is connected
        0x80 if removable else 0,  # RMB
        version,
        (0x10 if hisup else 0) | 0x02,  # HISUP; RESPONSE DATA FORMAT 2 (SPC-5 6.7.2)
        STANDARD_INQUIRY_LENGTH - 5,  # ADDITIONAL LENGTH = n - 4
        (tpgs << 4) | (0x08 if three_pc else 0) | (0x01 if protect else 0),
        0,
        0x02 if cmdque else 0,  # CMDQUE
        _ascii(vendor, 8, "T10 vendor identification"),
        _ascii(product, 16, "product identification"),
        _ascii(revision, 4, "product revision level"),
        vendor_specific[:20].ljust(20, b" ") if vendor_specific else b" " * 20,
        b"".join(_U16.pack(v) for v in versions).ljust(16, b"\0"),
    )


# --- VPD pages ------------------------------------------------------------------------------


def build_vpd_page(peripheral_type: int, page_code: int, payload: bytes) -> bytes:
    """A VPD page: 4-byte header (SPC-5 7.7.1, page length 2 bytes) followed by ``payload``."""
    if len(payload) > 0xFFFF:
        raise ValueError("VPD page too long")
    return _VPD_HEADER.pack(peripheral_type & 0x1F, page_code, len(payload)) + payload


def build_vpd_supported_pages(peripheral_type: int, pages: Iterable[int]) -> bytes:
    """Supported VPD pages 00h (SPC-5 7.7.18): page codes in ascending order, 00h included."""
    codes = sorted(set(pages) | {VpdPage.SUPPORTED_VPD_PAGES})
    return build_vpd_page(peripheral_type, VpdPage.SUPPORTED_VPD_PAGES, bytes(codes))


def build_vpd_unit_serial(peripheral_type: int, serial: str) -> bytes:
    """Unit Serial Number VPD 80h (SPC-5 7.7.19): the serial as ASCII, unpadded."""
    return build_vpd_page(
        peripheral_type, VpdPage.UNIT_SERIAL_NUMBER, _ascii(serial, len(serial), "serial")
    )


def serial_from_name(name: str) -> str:
    """A stable unit serial for a device that has none configured: a UUID derived from ``name``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tcmu-py:{name}"))


def naa_from_serial(serial: str, oui: int = 0x001405) -> bytes:
    """16-byte NAA 6 (IEEE Registered Extended) designator for ``serial`` (SPC-5 7.7.6.6.5).

    NAA 6h | 24-bit IEEE company id ``oui`` (default 001405h, the one LIO uses) | 100 bits taken
    from SHA-256 of the serial (vendor specific identifier + extension).  Equal serials give equal
    designators; distinct serials collide with negligible probability.
    """
    if not 0 <= oui <= 0xFFFFFF:
        raise ValueError(f"OUI {oui:#x} out of range")
    digest = int.from_bytes(hashlib.sha256(serial.encode()).digest(), "big")
    value = (0x6 << 124) | (oui << 100) | (digest >> (256 - 100))
    return value.to_bytes(16, "big")


# SPC-5 7.7.6.1 table 486: designation descriptor header.


def build_designator(
    code_set: int,
    designator_type: int,
    designator: bytes,
    *,
    association: int = Association.LOGICAL_UNIT,
    protocol: int | None = None,
) -> bytes:
    """One designation descriptor (SPC-5 7.7.6.1); ``protocol`` sets PROTOCOL IDENTIFIER + PIV."""
    if len(designator) > 255:
        raise ValueError("designator longer than 255 bytes")
    b0 = ((protocol or 0) << 4) | code_set
    b1 = (0x80 if protocol is not None else 0) | (association << 4) | designator_type
    return bytes([b0, b1, 0, len(designator)]) + designator


def relative_target_port_designator(port: int, protocol: int | None = None) -> bytes:
    """RELATIVE TARGET PORT designator (SPC-5 7.7.6.7), association = target port."""
    return build_designator(
        CodeSet.BINARY,
        DesignatorType.RELATIVE_TARGET_PORT,
        b"\0\0" + _U16.pack(port),
        association=Association.TARGET_PORT,
        protocol=protocol,
    )


def target_port_group_designator(group: int) -> bytes:
    """TARGET PORT GROUP designator (SPC-5 7.7.6.8), association = target port."""
    return build_designator(
        CodeSet.BINARY,
        DesignatorType.TARGET_PORT_GROUP,
        b"\0\0" + _U16.pack(group),
        association=Association.TARGET_PORT,
    )


def build_vpd_device_identification(
    peripheral_type: int,
    *,
    naa: bytes | None = None,
    t10_vendor: str | None = None,
    t10_id: str | None = None,
    extra_designators: Sequence[bytes] = (),
) -> bytes:
    """Device Identification VPD 83h (SPC-5 7.7.6).

    ``naa``: a 16-byte NAA 6 value (see :func:`naa_from_serial`) -> binary NAA designator.
    ``t10_vendor`` + ``t10_id``: T10 vendor ID designator (8-byte vendor, then the id).
    ``extra_designators``: complete descriptors from :func:`build_designator` (port designators).
    """
    descs = bytearray()
    if naa is not None:
        if len(naa) not in (8, 16) or naa[0] >> 4 not in (2, 3, 5, 6):
            raise ValueError("NAA designator must be 8 or 16 bytes with a valid NAA field")
        descs += build_designator(CodeSet.BINARY, DesignatorType.NAA, naa)
    if t10_vendor is not None:
        ident = _ascii(t10_vendor, 8, "T10 vendor identification")
        if t10_id:
            ident += _ascii(t10_id, len(t10_id), "T10 vendor specific identifier")
        descs += build_designator(CodeSet.ASCII, DesignatorType.T10_VENDOR_ID, ident)
    for extra in extra_designators:
        descs += extra
    return build_vpd_page(peripheral_type, VpdPage.DEVICE_IDENTIFICATION, bytes(descs))


def build_vpd_extended_inquiry(
    peripheral_type: int,
    *,
    headsup: bool = False,
    ordsup: bool = False,
    simpsup: bool = True,
    v_sup: bool = False,
    nv_sup: bool = False,
    luiclr: bool = False,
    max_sense_length: int = 0,
) -> bytes:
    """Extended INQUIRY Data VPD 86h (SPC-5 7.7.7), page length 3Ch.

    ``v_sup`` / ``nv_sup`` claim a volatile / non-volatile cache (FUA meaningful); the task
    attribute bits claim HEAD OF QUEUE / ORDERED / SIMPLE support.
    """
    payload = bytearray(0x3C)
    payload[1] = (0x04 if headsup else 0) | (0x02 if ordsup else 0) | (0x01 if simpsup else 0)
    payload[2] = (0x02 if nv_sup else 0) | (0x01 if v_sup else 0)
    payload[3] = 0x01 if luiclr else 0
    payload[9] = max_sense_length  # byte 13: MAXIMUM SUPPORTED SENSE DATA LENGTH
    return build_vpd_page(peripheral_type, VpdPage.EXTENDED_INQUIRY_DATA, bytes(payload))


# --- Mode pages -----------------------------------------------------------------------------

_PS = 0x80
_SPF = 0x40


def mode_page_header(page_code: int, subpage: int, length: int, saveable: bool = False) -> bytes:
    """page_0 (2-byte) or sub_page (4-byte) header for ``length`` parameter bytes (SPC-5 7.5.7)."""
    ps = _PS if saveable else 0
    if subpage:
        return bytes([ps | _SPF | page_code, subpage]) + _U16.pack(length)
    if length > 0xFF:
        raise ValueError("page_0 mode page longer than 255 bytes")
    return bytes([ps | page_code, length])


class Field(NamedTuple):
    """Where a field wider than one bit sits in a mode page, as the standard's page table shows
    it: its first (most significant) byte, counted from the page's first byte (header
    included), the most significant bit in that byte, and its width in bits (a 2-byte field
    starting a byte is ``Field(byte, 7, 16)``)."""

    byte: int
    bit: int
    width: int

    def holds(self, byte: int, bit: int) -> bool:
        """Whether bit `bit` of byte `byte` of the page belongs to this field."""
        at = byte * 8 + 7 - bit
        first = self.byte * 8 + 7 - self.bit
        return first <= at < first + self.width


@dataclass(frozen=True, slots=True)
class ModePage:
    """One mode page: current, changeable-mask and default values as whole pages (header included).

    All three have the same length.  Build with :meth:`make`; MODE SELECT produces a new current
    value through :func:`apply_mode_select`, stored with :meth:`with_current`.  ``fields`` lists
    the page's fields wider than one bit (:class:`Field`), so that a refusal names a field as
    SPC-5 4.4.5.2 asks; a bit in none of them is a field of its own.
    """

    page_code: int
    subpage: int
    current: bytes
    changeable: bytes
    default: bytes
    saveable: bool = False
    fields: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.current) == len(self.changeable) == len(self.default):
            raise ValueError(f"mode page {self.page_code:02X}h: value lengths differ")
        if len(self.current) < self.header_length:
            raise ValueError(f"mode page {self.page_code:02X}h shorter than its header")
        for f in self.fields:
            if not (0 <= f.bit <= 7 and f.width > 1
                    and (f.byte * 8 + 7 - f.bit + f.width) <= 8 * len(self.current)):
                raise ValueError(f"mode page {self.page_code:02X}h: {f} is not in the page")

    def field_of(self, byte: int, bit: int) -> tuple[int, int]:
        """(byte, bit) naming the field that holds bit `bit` of byte `byte` (SPC-5 4.4.5.2: a
        multiple-byte field by its first byte, a multiple-bit one by its most significant bit);
        the bit itself when no listed field holds it."""
        for f in self.fields:
            if f.holds(byte, bit):
                return f.byte, f.bit
        return byte, bit

    @classmethod
    def make(
        cls,
        page_code: int,
        subpage: int,
        params: bytes,
        changeable: bytes | None = None,
        default: bytes | None = None,
        *,
        saveable: bool = False,
        fields: Iterable[Field] = (),
    ) -> ModePage:
        """A page from its parameter bytes (after the header); ``changeable`` defaults to none.
        ``fields`` are placed in the whole page (header included), as the standard's tables
        number the bytes."""
        header = mode_page_header(page_code, subpage, len(params), saveable)
        mask = bytes(len(params)) if changeable is None else changeable
        dflt = params if default is None else default
        if not len(mask) == len(dflt) == len(params):
            raise ValueError(f"mode page {page_code:02X}h: value lengths differ")
        return cls(page_code, subpage, header + params, header + mask, header + dflt, saveable,
                   tuple(fields))

    @property
    def header_length(self) -> int:
        return 4 if self.subpage else 2

    @property
    def params(self) -> bytes:
        """Current parameter bytes, without the header."""
        return self.current[self.header_length :]

    def with_current(self, current: bytes) -> ModePage:
        """This page with a new current value (whole page bytes, same length)."""
        return dataclasses.replace(self, current=bytes(current))

    def value(self, pc: int) -> bytes:
        """The page as MODE SENSE returns it for page control ``pc`` (SPC-5 6.14.1 table 178)."""
        if pc == PageControl.CHANGEABLE:
            data = self.changeable
        elif pc == PageControl.DEFAULT:
            data = self.default
        else:  # current; saved pages are the current ones (written through when saveable)
            data = self.current
        header = mode_page_header(
            self.page_code, self.subpage, len(data) - self.header_length, self.saveable
        )
        return header + data[self.header_length :]


def apply_mode_select(page: ModePage, body: bytes, offset: int) -> bytes:
    """New current value of ``page`` after MODE SELECT sent ``body`` (whole page) at ``offset``.

    SPC-5 6.11 / 7.5.1: a page whose length differs from ours is INVALID FIELD IN PARAMETER LIST
    (pointing at the PAGE LENGTH field); a bit outside the changeable mask that differs from the
    current value is INVALID FIELD IN PARAMETER LIST naming the field that holds it, the first
    such field in the page: SPC-5 4.4.5.2, the field pointer at a multiple-byte field's first
    (most significant) byte, the bit pointer at a multiple-bit field's most significant bit
    (the page's ``fields``; a bit in none of them is named itself).  The header of the result
    is ours (PS is reserved in MODE SELECT).  Nothing is changed on failure.
    """
    hlen = page.header_length
    if len(body) != len(page.current):
        raise InvalidFieldInParameterList(
            f"mode page {page.page_code:02X}h/{page.subpage:02X}h length {len(body) - hlen}",
            field_pointer=offset + (2 if page.subpage else 1),
        )
    for i in range(hlen, len(body)):
        diff = (body[i] ^ page.current[i]) & ~page.changeable[i] & 0xFF
        if diff:
            byte, bit = page.field_of(i, diff.bit_length() - 1)
            raise InvalidFieldInParameterList(
                f"mode page {page.page_code:02X}h/{page.subpage:02X}h byte {i} is not changeable",
                field_pointer=offset + byte,
                bit_pointer=bit,
            )
    return page.current[:hlen] + bytes(body[hlen:])


_DIRECT_ACCESS_TYPES = frozenset(
    {PeripheralType.DISK, PeripheralType.SIMPLIFIED_DISK, PeripheralType.ZONED_BLOCK}
)
_SHORT_BD = struct.Struct(">I x 3s")  # SBC-4 6.5.2.2: NUMBER OF LOGICAL BLOCKS, rsvd, LENGTH
_GENERAL_BD = struct.Struct(">B3s x 3s")  # SPC-5 7.5.6.2: DENSITY CODE, NUMBER OF BLOCKS, LENGTH
_LONG_BD = struct.Struct(">Q 4x I")  # SBC-4 6.5.2.3: NUMBER OF LOGICAL BLOCKS, rsvd, LENGTH
_MODE6_HEADER = struct.Struct(">BBBB")
_MODE10_HEADER = struct.Struct(">HBBBxH")


def _u24(value: int) -> bytes:
    return min(value, 0xFFFFFF).to_bytes(3, "big")


def build_block_descriptor(
    density: int, num_blocks: int, block_length: int, *, direct_access: bool, long: bool = False
) -> bytes:
    """One mode parameter block descriptor.

    Direct access (SBC-4 6.5.2): short form with a 32-bit NUMBER OF LOGICAL BLOCKS (FFFFFFFFh when
    larger; the density is ignored) or the 16-byte long LBA form; other types use the general
    form (SPC-5 7.5.6.2: density code, 24-bit number of blocks, block length).
    """
    if direct_access and long:
        return _LONG_BD.pack(num_blocks, block_length)
    if direct_access:
        return _SHORT_BD.pack(min(num_blocks, 0xFFFFFFFF), _u24(block_length))
    return _GENERAL_BD.pack(density, _u24(num_blocks), _u24(block_length))


def _select_pages(pages: Sequence[ModePage], page_code: int, subpage: int) -> list[ModePage]:
    if page_code == ModePageCode.ALL_PAGES:
        if subpage == 0:
            chosen = [p for p in pages if p.subpage == 0]
        elif subpage == ALL_SUBPAGES:
            chosen = list(pages)
        else:
            # SPC-5 6.14.1 table 179: 3Fh with a subpage other than 00h/FFh is not defined.
            raise InvalidFieldInCdb(f"all pages with subpage {subpage:02X}h", field_pointer=3)
    elif subpage == ALL_SUBPAGES:
        chosen = [p for p in pages if p.page_code == page_code]
    else:
        chosen = [p for p in pages if (p.page_code, p.subpage) == (page_code, subpage)]
    if not chosen and page_code != ModePageCode.ALL_PAGES:
        exists = any(p.page_code == page_code for p in pages)
        raise InvalidFieldInCdb(
            f"mode page {page_code:02X}h/{subpage:02X}h not supported",
            field_pointer=3 if exists else 2,
            bit_pointer=None if exists else 5,
        )
    # SPC-5 6.14.1: pages in ascending page code order, vendor page 00h last.
    return sorted(chosen, key=lambda p: (p.page_code == 0, p.page_code, p.subpage))


def build_mode_sense(
    pages: Sequence[ModePage],
    *,
    ten: bool,
    pc: int,
    page_code: int,
    subpage: int,
    dbd: bool = False,
    block_descriptors: Sequence[tuple[int, int, int]] = (),
    device_specific: int = 0,
    llbaa: bool = False,
    medium_type: int = 0,
    peripheral_type: int = PeripheralType.DISK,
) -> bytes:
    """Complete MODE SENSE (6)/(10) parameter data: header, block descriptors, selected pages.

    ``block_descriptors`` are (density, number of blocks, block length) tuples in the form the
    device type uses (see :func:`build_block_descriptor`); for PC=changeable the caller passes the
    changeable mask values.  Raises InvalidFieldInCdb for an unsupported page/subpage and
    SavingParametersNotSupported for PC=saved when no selected page is saveable (SPC-5 6.14.1).
    """
    chosen = _select_pages(pages, page_code, subpage)
    if pc == PageControl.SAVED and not any(p.saveable for p in chosen):
        raise SavingParametersNotSupported("no saveable mode pages", field_pointer=2, bit_pointer=7)
    direct = peripheral_type in _DIRECT_ACCESS_TYPES
    long = ten and llbaa and direct
    descs = b""
    if not dbd:
        descs = b"".join(
            build_block_descriptor(d, n, length, direct_access=direct, long=long)
            for d, n, length in block_descriptors
        )
    body = descs + b"".join(p.value(pc) for p in chosen)
    if ten:
        total = _MODE10_HEADER.size + len(body)
        header = _MODE10_HEADER.pack(
            min(total - 2, 0xFFFF), medium_type, device_specific, 0x01 if long and descs else 0,
            len(descs),
        )
    else:
        if len(descs) > 0xFF:
            raise ValueError("block descriptors do not fit MODE SENSE(6)")
        total = _MODE6_HEADER.size + len(body)
        # SPC-5 7.5.5: MODE DATA LENGTH is n - 1 (one byte; clipped when the pages overflow it).
        header = _MODE6_HEADER.pack(min(total - 1, 0xFF), medium_type, device_specific, len(descs))
    return header + body


class ModeSelectPage(NamedTuple):
    """A page found in a MODE SELECT parameter list: ``data`` is the whole page, header included."""

    page_code: int
    subpage: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ModeParameterList:
    """A parsed MODE SELECT parameter list (SPC-5 7.5.4).

    ``block_descriptors`` are (density, number of blocks, block length); ``pages_offset`` is the
    offset of the first page in the parameter list (each next page follows the previous one).
    """

    medium_type: int
    device_specific: int
    longlba: bool
    block_descriptors: list[tuple[int, int, int]]
    pages: list[ModeSelectPage]
    pages_offset: int

    def page_offsets(self) -> list[int]:
        """Offset of each page of ``pages`` within the parameter list."""
        offsets, pos = [], self.pages_offset
        for page in self.pages:
            offsets.append(pos)
            pos += len(page.data)
        return offsets


def parse_mode_select(
    data: bytes | bytearray | memoryview,
    ten: bool,
    *,
    peripheral_type: int = PeripheralType.DISK,
) -> ModeParameterList:
    """Split a MODE SELECT (6)/(10) parameter list into header, block descriptors and pages.

    SPC-5 6.11/6.12: a list shorter than its header, block descriptors or any page is PARAMETER
    LIST LENGTH ERROR; a BLOCK DESCRIPTOR LENGTH that is not a multiple of the descriptor size is
    INVALID FIELD IN PARAMETER LIST.  Page contents are checked by :func:`apply_mode_select`.
    """
    buf = bytes(data)
    direct = peripheral_type in _DIRECT_ACCESS_TYPES
    if ten:
        if len(buf) < _MODE10_HEADER.size:
            raise ParameterListLengthError("MODE SELECT(10) header truncated")
        _, medium, specific, flags, bdl = _MODE10_HEADER.unpack_from(buf)
        longlba = bool(flags & 0x01)
        pos, bdl_field = _MODE10_HEADER.size, 6
    else:
        if len(buf) < _MODE6_HEADER.size:
            raise ParameterListLengthError("MODE SELECT(6) header truncated")
        _, medium, specific, bdl = _MODE6_HEADER.unpack_from(buf)
        longlba = False
        pos, bdl_field = _MODE6_HEADER.size, 3
    size = 16 if longlba else 8
    if bdl % size:
        raise InvalidFieldInParameterList(
            f"BLOCK DESCRIPTOR LENGTH {bdl}", field_pointer=bdl_field
        )
    if pos + bdl > len(buf):
        raise ParameterListLengthError("block descriptors truncated")
    descriptors: list[tuple[int, int, int]] = []
    for off in range(pos, pos + bdl, size):
        if longlba:
            blocks, length = _LONG_BD.unpack_from(buf, off)
            descriptors.append((0, blocks, length))
        elif direct:
            blocks, length3 = _SHORT_BD.unpack_from(buf, off)
            descriptors.append((0, blocks, int.from_bytes(length3, "big")))
        else:
            density, blocks3, length3 = _GENERAL_BD.unpack_from(buf, off)
            descriptors.append(
                (density, int.from_bytes(blocks3, "big"), int.from_bytes(length3, "big"))
            )
    pos += bdl
    pages_offset = pos
    pages: list[ModeSelectPage] = []
    while pos < len(buf):
        if buf[pos] & _SPF:
            if pos + 4 > len(buf):
                raise ParameterListLengthError("sub_page mode page header truncated")
            code, sub, hlen = buf[pos] & 0x3F, buf[pos + 1], 4
            plen = _U16.unpack_from(buf, pos + 2)[0]
        else:
            if pos + 2 > len(buf):
                raise ParameterListLengthError("mode page header truncated")
            code, sub, plen, hlen = buf[pos] & 0x3F, 0, buf[pos + 1], 2
        end = pos + hlen + plen
        if end > len(buf):
            # SPC-5 6.11: a parameter list truncating a mode page -> PARAMETER LIST LENGTH ERROR.
            raise ParameterListLengthError(f"mode page {code:02X}h truncated")
        pages.append(ModeSelectPage(code, sub, buf[pos:end]))
        pos = end
    return ModeParameterList(medium, specific, longlba, descriptors, pages, pages_offset)


# --- standard mode pages --------------------------------------------------------------------


#: Control mode page byte offsets and bits (SPC-5 7.5.8 table 457), as positions in the page.
CONTROL_D_SENSE_BYTE = 2
CONTROL_D_SENSE_BIT = 0x04
CONTROL_SWP_BYTE = 4
CONTROL_SWP_BIT = 0x08


#: Control mode page fields wider than a bit (SPC-5 7.5.8 table 457): TST, QUEUE ALGORITHM
#: MODIFIER, QERR, UA_INTLCK_CTRL, AUTOLOAD MODE, BUSY TIMEOUT PERIOD, EXTENDED SELF-TEST
#: COMPLETION TIME.
CONTROL_FIELDS = (Field(2, 7, 3), Field(3, 7, 4), Field(3, 2, 2), Field(4, 5, 2),
                  Field(5, 2, 3), Field(8, 7, 16), Field(10, 7, 16))
#: Control Extension (SPC-5 7.5.9): INITIAL COMMAND PRIORITY.
CONTROL_EXTENSION_FIELDS = (Field(5, 3, 4),)
#: Informational Exceptions Control (SPC-5 7.5.13): MRIE, INTERVAL TIMER, REPORT COUNT.
INFORMATIONAL_EXCEPTIONS_FIELDS = (Field(3, 3, 4), Field(4, 7, 32), Field(8, 7, 32))


def control_mode_page(
    d_sense: bool = False,
    *,
    tst: int = 0,
    qam: int = 1,
    qerr: int = 0,
    tas: bool = True,
    swp: bool = False,
    gltsd: bool = True,
    busy_timeout: int = 0,
    d_sense_changeable: bool = True,
    swp_changeable: bool = False,
) -> ModePage:
    """Control 0Ah (SPC-5 7.5.8), page length 0Ah; only D_SENSE is changeable by default.

    QAM 1 = unrestricted reordering (commands run concurrently); GLTSD = log parameters are not
    saved; TAS = aborted commands of other I_T nexuses end with TASK ABORTED.  Make SWP
    changeable only if the device then refuses writes with WRITE PROTECTED (SBC-4 4.11; libiscsi's
    ModeSense6.Control-SWP skips when it is not changeable).
    """
    params = bytearray(0x0A)
    params[0] = (tst << 5) | (0x04 if d_sense else 0) | (0x02 if gltsd else 0)
    params[1] = (qam << 4) | (qerr << 1)
    params[2] = 0x08 if swp else 0
    params[3] = 0x40 if tas else 0
    params[6:8] = _U16.pack(busy_timeout)
    mask = bytearray(0x0A)
    mask[0] = 0x04 if d_sense_changeable else 0
    mask[2] = 0x08 if swp_changeable else 0
    return ModePage.make(ModePageCode.CONTROL, 0, bytes(params), bytes(mask),
                         fields=CONTROL_FIELDS)


def control_extension_mode_page() -> ModePage:
    """Control Extension 0Ah/01h (SPC-5 7.5.9), page length 1Ch; nothing changeable."""
    return ModePage.make(ModePageCode.CONTROL, 0x01, bytes(0x1C),
                         fields=CONTROL_EXTENSION_FIELDS)


def informational_exceptions_control_page() -> ModePage:
    """Informational Exceptions Control 1Ch (SPC-5 7.5.13): DEXCPT=1, nothing is reported."""
    params = bytearray(0x0A)
    params[0] = 0x08  # DEXCPT
    return ModePage.make(ModePageCode.INFORMATIONAL_EXCEPTIONS_CONTROL, 0, bytes(params),
                         fields=INFORMATIONAL_EXCEPTIONS_FIELDS)


# --- LOG SENSE ------------------------------------------------------------------------------


_LOG_HEADER = struct.Struct(">BBH")
_LOG_PARAM = struct.Struct(">HBB")


def build_log_parameter(code: int, flags: int, value: bytes) -> bytes:
    """One log parameter: code, control byte, length, value (SPC-5 7.3.2.2)."""
    if len(value) > 0xFF:
        raise ValueError("log parameter value longer than 255 bytes")
    return _LOG_PARAM.pack(code, flags, len(value)) + value


def build_log_page(
    page_code: int,
    subpage: int,
    parameters: Iterable[tuple[int, int, bytes]],
    *,
    ds: bool = True,
    parameter_pointer: int = 0,
) -> bytes:
    """A log page from (parameter code, control byte, value) tuples (SPC-5 7.3.2).

    Parameters are emitted in ascending code order from ``parameter_pointer`` on (SPC-5 6.8: a
    pointer beyond the largest code is INVALID FIELD IN CDB).  ``ds`` = saving not supported.
    """
    params = sorted(parameters, key=lambda p: p[0])
    if parameter_pointer and (not params or parameter_pointer > params[-1][0]):
        raise InvalidFieldInCdb("PARAMETER POINTER beyond the last parameter", field_pointer=5)
    body = b"".join(build_log_parameter(*p) for p in params if p[0] >= parameter_pointer)
    b0 = (0x80 if ds else 0) | (_SPF if subpage else 0) | page_code
    return _LOG_HEADER.pack(b0, subpage, len(body)) + body


#: FORMAT AND LINKING of the data counter parameters (SPC-5 7.3.2.2.2), whose values PC selects.
_COUNTER_FORMATS = frozenset(
    {LogParameterFormat.BOUNDED_COUNTER, LogParameterFormat.UNBOUNDED_COUNTER}
)


def log_page_values(page: bytes, pc: int) -> bytes:
    """`page` (a whole log page in parameter format, as a device builds it: its current
    cumulative values) as LOG SENSE with PAGE CONTROL `pc` reports it (SPC-5 6.8, 6.7.1 table
    184).

    PC 01b: the page as it is. PC 11b (default cumulative values), 10b (default threshold
    values) and 00b (threshold values): tcmu-py implements no LOG SELECT and keeps neither
    thresholds nor saved values, so each of these is the vendor specific default (table 184,
    footnote a), zero for a data counter parameter (FORMAT AND LINKING 00b or 10b, SPC-5
    7.3.2.2.2; the value PCR resets it to, SPC-5 6.7.1). PC is ignored for a list parameter
    (ASCII or binary format list, SPC-5 6.7.1): TapeAlert flags, capacities, provisioning
    counts keep their current value. A malformed page is returned as it is."""
    if pc == LogPageControl.CUMULATIVE:
        return page
    out = bytearray(page)
    at, end = _LOG_HEADER.size, min(len(page), _LOG_HEADER.size + _U16.unpack_from(page, 2)[0])
    while at + _LOG_PARAM.size <= end:
        _code, flags, n = _LOG_PARAM.unpack_from(page, at)
        value = at + _LOG_PARAM.size
        if flags & 0x03 in _COUNTER_FORMATS:
            out[value : min(value + n, end)] = bytes(min(value + n, end) - value)
        at = value + n
    return bytes(out)


def log_page_from(page: bytes, parameter_pointer: int) -> bytes:
    """`page` (a whole log page in parameter format, ascending codes) with only the parameters
    whose code is at least `parameter_pointer` (SPC-5 6.8 LOG SENSE: PARAMETER POINTER; a
    pointer beyond the largest code is INVALID FIELD IN CDB). A malformed page is returned as
    it is."""
    if not parameter_pointer:
        return page
    at, end = _LOG_HEADER.size, min(len(page), _LOG_HEADER.size + _U16.unpack_from(page, 2)[0])
    kept: list[bytes] = []
    largest = -1
    while at + _LOG_PARAM.size <= end:
        code, _flags, n = _LOG_PARAM.unpack_from(page, at)
        nxt = at + _LOG_PARAM.size + n
        if code >= parameter_pointer:
            kept.append(page[at:nxt])
        largest = max(largest, code)
        at = nxt
    if parameter_pointer > largest:
        raise InvalidFieldInCdb("PARAMETER POINTER beyond the last parameter", field_pointer=5)
    body = b"".join(kept)
    return page[:2] + _U16.pack(len(body)) + body


def build_supported_log_pages(pages: Iterable[int]) -> bytes:
    """Supported Log Pages 00h (SPC-5 7.3.19): one byte per page code, ascending."""
    codes = sorted(set(pages) | {0})
    return _LOG_HEADER.pack(0, 0, len(codes)) + bytes(codes)


def build_supported_log_subpages(pages: Iterable[tuple[int, int]]) -> bytes:
    """Supported Log Pages and Subpages 00h/FFh (SPC-5 7.3.20): (page, subpage) pairs, ascending."""
    pairs = sorted(set(pages) | {(0, 0), (0, 0xFF)})
    body = b"".join(bytes(p) for p in pairs)
    return _LOG_HEADER.pack(_SPF, 0xFF, len(body)) + body


def build_temperature_log_page(temperature: int | None, reference: int | None = None) -> bytes:
    """Temperature 0Dh (SPC-5 7.3.21): degrees Celsius; None = not available (FFh)."""

    def val(t: int | None) -> bytes:
        return bytes([0, 0xFF if t is None else max(0, min(t, 0xFE))])

    params = [(0x0000, LogParameterFormat.BINARY_LIST, val(temperature))]
    if reference is not None:
        params.append((0x0001, LogParameterFormat.BINARY_LIST, val(reference)))
    return build_log_page(0x0D, 0, params)


# --- diagnostics and task management ---------------------------------------------------


def build_supported_diagnostic_pages(pages: Iterable[int] = ()) -> bytes:
    """Supported Diagnostic Pages 00h (SPC-5 7.2.2): page codes ascending, 00h included."""
    codes = sorted(set(pages) | {0})
    return bytes([0, 0]) + _U16.pack(len(codes)) + bytes(codes)


def build_report_supported_tmf(
    *,
    repd: bool = False,
    abort_task: bool = True,
    abort_task_set: bool = True,
    clear_aca: bool = False,
    clear_task_set: bool = False,
    lu_reset: bool = True,
    query_task: bool = False,
    target_reset: bool = False,
    wakeup: bool = False,
    query_unit_attention: bool = False,
    query_task_set: bool = False,
    it_nexus_reset: bool = False,
) -> bytes:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data (SPC-5 6.36.2): 4 bytes, 16 with REPD.

    The task management functions themselves are carried out by LIO, not by the TCMU device, so
    the caller states what the kernel really does.
    """
    b0 = (
        (0x80 if abort_task else 0)
        | (0x40 if abort_task_set else 0)
        | (0x20 if clear_aca else 0)
        | (0x10 if clear_task_set else 0)
        | (0x08 if lu_reset else 0)
        | (0x04 if query_task else 0)
        | (0x02 if target_reset else 0)
        | (0x01 if wakeup else 0)
    )
    b1 = (0x04 if query_unit_attention else 0) | (0x02 if query_task_set else 0)
    b1 |= 0x01 if it_nexus_reset else 0
    if not repd:
        return bytes([b0, b1, 0, 0])
    # SPC-5 6.36.2: with REPD the ADDITIONAL DATA LENGTH is 0Ch (no TMF timeouts reported).
    return bytes([b0, b1, 0, 0x0C]) + bytes(12)


# --- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------

_RSOC_DESC = struct.Struct(">BxHxBH")  # SPC-5 6.35.3 table 268: all_commands descriptor
_RSOC_ONE = struct.Struct(">xBH")  # SPC-5 6.35.4 table 270: one_command header
_TIMEOUTS = struct.Struct(">HxBII")  # SPC-5 6.35.5 table 272: command timeouts descriptor


@dataclass(frozen=True, slots=True)
class OpcodeInfo:
    """What REPORT SUPPORTED OPERATION CODES says about one command.

    ``cdb_usage``: CDB USAGE DATA (SPC-5 6.35.4): byte 0 the opcode, the service action where the
    CDB carries one, then a 1 for every bit the device server evaluates.  Timeouts in seconds.
    """

    opcode: int
    service_action: int | None
    cdb_usage: bytes
    nominal_timeout: int = 0
    recommended_timeout: int = 0
    command_specific: int = 0

    def timeouts_descriptor(self) -> bytes:
        return _TIMEOUTS.pack(
            0x0A, self.command_specific, self.nominal_timeout, self.recommended_timeout
        )


def opcode_info(
    opcode: int,
    service_action: int | None = None,
    *,
    peripheral_type: int | None = None,
    nominal_timeout: int = 0,
    recommended_timeout: int = 0,
) -> OpcodeInfo:
    """OpcodeInfo with the CDB usage data of :func:`cdb_usage_mask`."""
    return OpcodeInfo(
        opcode,
        service_action,
        cdb_usage_mask(opcode, service_action, peripheral_type=peripheral_type),
        nominal_timeout,
        recommended_timeout,
    )


def build_rsoc_all(infos: Iterable[OpcodeInfo], rctd: bool = False) -> bytes:
    """All_commands parameter data (SPC-5 6.35.3), descriptors sorted by (opcode, SA)."""
    body = bytearray()
    for info in sorted(infos, key=lambda i: (i.opcode, i.service_action or 0)):
        flags = (0x02 if rctd else 0) | (0x01 if info.service_action is not None else 0)
        body += _RSOC_DESC.pack(info.opcode, info.service_action or 0, flags, len(info.cdb_usage))
        if rctd:
            body += info.timeouts_descriptor()
    return _U32.pack(len(body)) + bytes(body)


def build_rsoc_one(
    infos: Iterable[OpcodeInfo],
    *,
    reporting_options: int,
    opcode: int,
    service_action: int,
    rctd: bool = False,
) -> bytes:
    """One_command parameter data (SPC-5 6.35.4) for REPORTING OPTIONS 001b, 010b or 011b.

    SPC-5 6.35.1 table 265: option 001b on an opcode with service actions, and 010b on an opcode
    the device implements without service actions, are INVALID FIELD IN CDB.  An opcode (or
    service action) that is not implemented reports SUPPORT 001b with no CDB usage data.
    """
    same_op = [i for i in infos if i.opcode == opcode]
    has_sa = any(i.service_action is not None for i in same_op)
    if reporting_options == 1:
        if has_sa:
            raise InvalidFieldInCdb(
                f"opcode {opcode:02X}h has service actions", field_pointer=2, bit_pointer=2
            )
        found = same_op[0] if same_op else None
    elif reporting_options == 2:
        if same_op and not has_sa:
            raise InvalidFieldInCdb(
                f"opcode {opcode:02X}h has no service actions", field_pointer=2, bit_pointer=2
            )
        found = next((i for i in same_op if i.service_action == service_action), None)
    elif reporting_options == 3:
        if has_sa:
            found = next((i for i in same_op if i.service_action == service_action), None)
        else:
            found = same_op[0] if same_op else None
    else:
        raise InvalidFieldInCdb(
            f"REPORTING OPTIONS {reporting_options:03b}b", field_pointer=2, bit_pointer=2
        )
    if found is None:
        return _RSOC_ONE.pack(RsocSupport.NOT_SUPPORTED, 0)
    data = _RSOC_ONE.pack((0x80 if rctd else 0) | RsocSupport.SUPPORTED, len(found.cdb_usage))
    data += found.cdb_usage
    if rctd:
        data += found.timeouts_descriptor()
    return data


# CDB usage data: bits the device server evaluates (SPC-5 6.35.4).  GROUP NUMBER and the CONTROL
# byte are ignored by tcmu-py (as by LIO) and so are reported as zero.
_H = bytes.fromhex
_COMMON_USAGE: dict[tuple[int, int | None], bytes] = {
    (Opcode.TEST_UNIT_READY, None): _H("00 00 00 00 00 00"),
    (Opcode.REQUEST_SENSE, None): _H("03 01 00 00 ff 00"),
    (Opcode.INQUIRY, None): _H("12 01 ff ff ff 00"),
    (Opcode.MODE_SELECT_6, None): _H("15 11 00 00 ff 00"),
    (Opcode.MODE_SENSE_6, None): _H("1a 08 ff ff ff 00"),
    (Opcode.RECEIVE_DIAGNOSTIC, None): _H("1c 01 ff ff ff 00"),
    (Opcode.SEND_DIAGNOSTIC, None): _H("1d f7 00 ff ff 00"),
    (Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None): _H("1e 00 00 00 03 00"),
    (Opcode.WRITE_BUFFER, None): _H("3b ff ff ff ff ff ff ff ff 00"),
    (Opcode.READ_BUFFER, None): _H("3c ff ff ff ff ff ff ff ff 00"),
    (Opcode.LOG_SELECT, None): _H("4c 03 ff ff 00 00 00 ff ff 00"),
    (Opcode.LOG_SENSE, None): _H("4d 03 ff ff 00 ff ff ff ff 00"),
    (Opcode.MODE_SELECT_10, None): _H("55 11 00 00 00 00 00 ff ff 00"),
    (Opcode.MODE_SENSE_10, None): _H("5a 18 ff ff 00 00 00 ff ff 00"),
    (Opcode.REPORT_LUNS, None): _H("a0 00 ff 00 00 00 ff ff ff ff 00 00"),
    (Opcode.SECURITY_PROTOCOL_IN, None): _H("a2 ff ff ff 80 00 ff ff ff ff 00 00"),
    (Opcode.SECURITY_PROTOCOL_OUT, None): _H("b5 ff ff ff 80 00 ff ff ff ff 00 00"),
    (Opcode.MAINTENANCE_IN, ServiceAction.REPORT_TARGET_PORT_GROUPS): _H(
        "a3 0a e0 00 00 00 ff ff ff ff 00 00"
    ),
    (Opcode.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_OPERATION_CODES): _H(
        "a3 0c 87 ff ff ff ff ff ff ff 00 00"
    ),
    (Opcode.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_TMF): _H(
        "a3 0d 80 00 00 00 ff ff ff ff 00 00"
    ),
}
_DISK_USAGE: dict[tuple[int, int | None], bytes] = {
    (Opcode.FORMAT_UNIT, None): _H("04 ff 00 00 00 00"),
    (Opcode.READ_6, None): _H("08 1f ff ff ff 00"),
    (Opcode.WRITE_6, None): _H("0a 1f ff ff ff 00"),
    (Opcode.START_STOP_UNIT, None): _H("1b 01 00 0f f7 00"),
    (Opcode.READ_CAPACITY_10, None): _H("25 00 ff ff ff ff 00 00 01 00"),
    (Opcode.READ_10, None): _H("28 f8 ff ff ff ff 00 ff ff 00"),
    (Opcode.WRITE_10, None): _H("2a f8 ff ff ff ff 00 ff ff 00"),
    (Opcode.WRITE_AND_VERIFY_10, None): _H("2e f6 ff ff ff ff 00 ff ff 00"),
    (Opcode.VERIFY_10, None): _H("2f f6 ff ff ff ff 00 ff ff 00"),
    (Opcode.PRE_FETCH_10, None): _H("34 02 ff ff ff ff 00 ff ff 00"),
    (Opcode.SYNCHRONIZE_CACHE_10, None): _H("35 02 ff ff ff ff 00 ff ff 00"),
    (Opcode.READ_DEFECT_DATA_10, None): _H("37 00 1f 00 00 00 00 ff ff 00"),
    (Opcode.WRITE_SAME_10, None): _H("41 f8 ff ff ff ff 00 ff ff 00"),
    (Opcode.UNMAP, None): _H("42 01 00 00 00 00 00 ff ff 00"),
    (Opcode.READ_16, None): _H("88 f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.COMPARE_AND_WRITE, None): _H("89 f8 ff ff ff ff ff ff ff ff 00 00 00 ff 00 00"),
    (Opcode.WRITE_16, None): _H("8a f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.ORWRITE_16, None): _H("8b f8 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.WRITE_AND_VERIFY_16, None): _H("8e f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.VERIFY_16, None): _H("8f f6 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.PRE_FETCH_16, None): _H("90 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.SYNCHRONIZE_CACHE_16, None): _H("91 02 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.WRITE_SAME_16, None): _H("93 f9 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.SERVICE_ACTION_IN_16, ServiceAction.READ_CAPACITY_16): _H(
        "9e 10 ff ff ff ff ff ff ff ff ff ff ff ff 01 00"
    ),
    # REPORT TYPE (byte 14) is not evaluated: every descriptor is returned and the response's
    # RTP bit is zero, which says so (SBC-4 5.8).
    (Opcode.SERVICE_ACTION_IN_16, ServiceAction.GET_LBA_STATUS): _H(
        "9e 12 ff ff ff ff ff ff ff ff ff ff ff ff 00 00"
    ),
    (Opcode.READ_12, None): _H("a8 f8 ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.WRITE_12, None): _H("aa f8 ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.WRITE_AND_VERIFY_12, None): _H("ae f6 ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.VERIFY_12, None): _H("af f6 ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.READ_DEFECT_DATA_12, None): _H("b7 1f 00 00 00 00 ff ff ff ff 00 00"),
}
_TAPE_USAGE: dict[tuple[int, int | None], bytes] = {
    (Opcode.REWIND, None): _H("01 01 00 00 00 00"),
    (Opcode.READ_BLOCK_LIMITS, None): _H("05 01 00 00 00 00"),
    (Opcode.READ_6, None): _H("08 03 ff ff ff 00"),
    (Opcode.WRITE_6, None): _H("0a 01 ff ff ff 00"),
    (Opcode.WRITE_FILEMARKS_6, None): _H("10 01 ff ff ff 00"),
    (Opcode.SPACE_6, None): _H("11 0f ff ff ff 00"),
    (Opcode.ERASE_6, None): _H("19 03 00 00 00 00"),
    (Opcode.LOAD_UNLOAD, None): _H("1b 01 00 00 0f 00"),
    (Opcode.LOCATE_10, None): _H("2b 07 00 ff ff ff ff 00 ff 00"),
    (Opcode.READ_POSITION, None): _H("34 1f 00 00 00 00 00 ff ff 00"),
    (Opcode.REPORT_DENSITY_SUPPORT, None): _H("44 03 00 00 00 00 00 ff ff 00"),
    (Opcode.ALLOW_OVERWRITE, None): _H("82 00 0f ff ff ff ff ff ff ff ff ff 00 00 00 00"),
    (Opcode.READ_ATTRIBUTE, None): _H("8c 1f 00 00 00 ff 00 ff ff ff ff ff ff ff 01 00"),
    (Opcode.WRITE_ATTRIBUTE, None): _H("8d 01 00 00 00 ff 00 ff 00 00 ff ff ff ff 00 00"),
    (Opcode.SPACE_16, None): _H("91 0f 00 00 ff ff ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.LOCATE_16, None): _H("92 3b 01 ff ff ff ff ff ff ff ff ff 00 00 00 00"),
    (Opcode.ERASE_16, None): _H("93 03 ff 00 ff ff ff ff ff ff ff ff 00 00 00 00"),
}
_CHANGER_USAGE: dict[tuple[int, int | None], bytes] = {
    (Opcode.INITIALIZE_ELEMENT_STATUS, None): _H("07 00 00 00 00 00"),
    (Opcode.OPEN_CLOSE_IMPORT_EXPORT_ELEMENT, None): _H("1b 00 ff ff 1f 00"),
    (Opcode.POSITION_TO_ELEMENT, None): _H("2b 00 ff ff ff ff 00 00 00 00"),
    (Opcode.INITIALIZE_ELEMENT_STATUS_WITH_RANGE, None): _H("37 03 ff ff 00 00 ff ff 00 00"),
    (Opcode.MOVE_MEDIUM, None): _H("a5 00 ff ff ff ff ff ff 00 00 00 00"),
    (Opcode.EXCHANGE_MEDIUM, None): _H("a6 00 ff ff ff ff ff ff ff ff 00 00"),
    (Opcode.READ_ELEMENT_STATUS, None): _H("b8 1f ff ff ff ff 03 ff ff ff 00 00"),
}
_USAGE_BY_TYPE: Mapping[int, Mapping[tuple[int, int | None], bytes]] = {
    PeripheralType.DISK: _DISK_USAGE,
    PeripheralType.TAPE: _TAPE_USAGE,
    PeripheralType.CHANGER: _CHANGER_USAGE,
}


def cdb_usage_mask(
    opcode: int, service_action: int | None = None, *, peripheral_type: int | None = None
) -> bytes:
    """CDB USAGE DATA for a command tcmu-py implements (SPC-5 6.35.4).

    The same opcode means different commands on a disk and a tape, so pass ``peripheral_type``:
    its table is searched first, then the SPC commands.  Without it the disk, tape and changer
    tables are searched in that order (an opcode shared by several types resolves to the disk
    command).  Raises KeyError for a command without a table entry, so a device cannot advertise
    a command whose CDB usage nobody wrote down.
    """
    key = (opcode, service_action)
    if peripheral_type is None:
        tables = [*_USAGE_BY_TYPE.values(), _COMMON_USAGE]
    else:
        tables = [_USAGE_BY_TYPE.get(peripheral_type, {}), _COMMON_USAGE]
    for table in tables:
        if key in table:
            return table[key]
    sa = "" if service_action is None else f"/{service_action:02X}h"
    raise KeyError(f"no CDB usage data for opcode {opcode:02X}h{sa} (type {peripheral_type})")


def derived_cdb_usage(opcode: int, service_action: int | None = None) -> bytes:
    """Conservative CDB USAGE DATA (SPC-5 6.35.4) for a command without a table entry (a
    handler's vendor opcode): the length the group code defines (SPC-5 4.2.5.1 table 4), byte 0
    the opcode, the SERVICE ACTION in byte 1 (bits 4..0, bits 7..5 zero) where it has one,
    every other bit up to the CONTROL byte set (the device server may evaluate it), the CONTROL
    byte zero (tcmu-py, like LIO, supports neither NACA nor linked commands). VARIABLE LENGTH
    CDBs have no derivable length: ValueError.
    """
    if opcode == Opcode.VARIABLE_LENGTH:
        raise ValueError("a VARIABLE LENGTH (7Fh) CDB has no length to derive usage from")
    length = cdb_length(bytes([opcode]))
    usage = bytearray([opcode] + [0xFF] * (length - 2) + [0x00])
    if service_action is not None:
        usage[1] = service_action & 0x1F  # as the tables: the SA value, bits 7..5 zero
    return bytes(usage)
