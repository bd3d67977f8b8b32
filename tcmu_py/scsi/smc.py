"""Medium changer (SMC-3) wire formats: CDBs, READ ELEMENT STATUS data, mode pages 1Dh/1Eh/1Fh.

Pure: bytes in, dataclasses / bytes / exceptions out. What a changer *does* with them (which
element holds which cartridge) lives in the VTL handler.

Facts this file encodes (from SMC-3, checked against what Linux `ch` and `mtx` send and parse):

* Element types: 1 medium transport, 2 storage, 3 import/export, 4 data transfer; 0 in a
  READ ELEMENT STATUS CDB means "all types". Every element has a 16-bit address; the four
  ranges are announced by the element address assignment mode page (1Dh), which `ch` reads with
  MODE SENSE(6) before anything else.
* READ ELEMENT STATUS data: an 8-byte header, then one *element status page* per run of
  consecutive reported elements of one type (8-byte page header + fixed-length descriptors).
  The header's NUMBER OF ELEMENTS AVAILABLE and BYTE COUNT OF REPORT AVAILABLE are computed for
  the whole report and are *not* reduced to fit the allocation length; the data itself is simply
  cut at the allocation length (SPC-5 4.2.5.6). `mtx` and backup software ask with a small
  allocation length first and repeat with `byte count + 8`.
* An element descriptor is 12 bytes, the 36-byte primary volume tag when PVOLTAG,
  the alternate tag when AVOLTAG, then always a 4-byte identification descriptor header (CODE SET,
  IDENTIFIER TYPE, reserved, IDENTIFIER LENGTH) and the identifier; the identifier is non-empty
  only for data transfer elements when DVCID was set. `ch` reads the descriptor at byte 16 of the
  response with VOLTAG=1, NUMBER OF ELEMENTS 1 and allocation length 255.
* A volume tag (volume tag information) is a 32-byte left-aligned space-padded identifier,
  2 reserved bytes and a 2-byte volume sequence number.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Self

from tcmu_py.scsi import spc
from tcmu_py.scsi.constants import CodeSet, Opcode
from tcmu_py.scsi.sense import InvalidFieldInCdb

Cdb = bytes | bytearray | memoryview

VOLUME_TAG_LENGTH = 36
VOLUME_IDENTIFIER_LENGTH = 32
ELEMENT_DESCRIPTOR_BASE = 12
IDENTIFICATION_HEADER_LENGTH = 4
ELEMENT_STATUS_HEADER_LENGTH = 8
ELEMENT_PAGE_HEADER_LENGTH = 8


class ElementType(IntEnum):
    """ELEMENT TYPE CODE (SMC-3 READ ELEMENT STATUS)."""

    ALL = 0
    MEDIUM_TRANSPORT = 1
    STORAGE = 2
    IMPORT_EXPORT = 3
    DATA_TRANSFER = 4


#: The element types a library has, in the order the 1Dh page and the capability bits list them.
ELEMENT_TYPES: tuple[ElementType, ...] = (
    ElementType.MEDIUM_TRANSPORT,
    ElementType.STORAGE,
    ElementType.IMPORT_EXPORT,
    ElementType.DATA_TRANSFER,
)


class MediumType(IntEnum):
    """MEDIUM TYPE of an element descriptor, byte 9 bits 2..0 (SMC-3 READ ELEMENT STATUS)."""

    UNSPECIFIED = 0
    DATA = 1
    CLEANING = 2
    DIAGNOSTIC = 3
    WORM = 4
    MICROCODE = 5


class OpenCloseAction(IntEnum):
    """ACTION CODE of OPEN/CLOSE IMPORT/EXPORT ELEMENT (SMC-3)."""

    OPEN = 0x00
    CLOSE = 0x01


# CODE SET and IDENTIFIER TYPE of a DVCID identification descriptor are those of SPC-5 7.7.6.1:
# constants.CodeSet and constants.DesignatorType.


# ---------------------------------------------------------------------------------------------
# CDBs

_U16 = struct.Struct(">H")
# READ ELEMENT STATUS (SMC-3): op | VOLTAG+type | start | count | CURDATA+DVCID |
# allocation length (24 bits, 7..9) | rsvd | control
_RES = struct.Struct(">BBHHB3sxB")
# MOVE MEDIUM (SMC-3): op | rsvd | transport | source | destination | rsvd 8..9 |
# INVERT | control
_MOVE = struct.Struct(">BxHHH2xBB")
# EXCHANGE MEDIUM (SMC-3): op | rsvd | transport | source | first dest | second dest |
# INV1+INV2 | control
_EXCHANGE = struct.Struct(">BxHHHHBB")
# POSITION TO ELEMENT (SMC-3): op | rsvd | transport | destination | rsvd 6..7 |
# INVERT | control
_POSITION = struct.Struct(">BxHH2xBB")
# INITIALIZE ELEMENT STATUS WITH RANGE (SMC-3): op | FAST+RANGE | start | rsvd 4..5 |
# number of elements | rsvd 8 | control
_INIT_RANGE = struct.Struct(">BBH2xHxB")
# OPEN/CLOSE IMPORT/EXPORT ELEMENT (SMC-3): op | rsvd | element | action | control
_OPEN_CLOSE = struct.Struct(">BxHBB")


def _check_length(cdb: Cdb, need: int) -> None:
    if len(cdb) < need:
        raise InvalidFieldInCdb(f"CDB has {len(cdb)} bytes, opcode needs {need}", field_pointer=0)


@dataclass(frozen=True, slots=True)
class ReadElementStatus:
    """READ ELEMENT STATUS (B8h), SMC-3."""

    element_type: int
    voltag: bool
    starting_address: int
    number_of_elements: int
    curdata: bool
    dvcid: bool
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        _, b1, start, count, b6, alloc, _ = _RES.unpack_from(cdb)
        element_type = b1 & 0x0F
        if element_type > ElementType.DATA_TRANSFER:
            # SMC-3 READ ELEMENT STATUS: element type codes 5h..Fh are reserved.
            raise InvalidFieldInCdb(
                f"element type code {element_type}", field_pointer=1, bit_pointer=3
            )
        return cls(
            element_type=element_type,
            voltag=bool(b1 & 0x10),
            starting_address=start,
            number_of_elements=count,
            curdata=bool(b6 & 0x02),
            dvcid=bool(b6 & 0x01),
            allocation_length=int.from_bytes(alloc, "big"),
        )

    def build(self) -> bytes:
        b1 = (self.element_type & 0x0F) | (0x10 if self.voltag else 0)
        b6 = (0x02 if self.curdata else 0) | (0x01 if self.dvcid else 0)
        return _RES.pack(
            Opcode.READ_ELEMENT_STATUS,
            b1,
            self.starting_address,
            self.number_of_elements,
            b6,
            self.allocation_length.to_bytes(3, "big"),
            0,
        )


@dataclass(frozen=True, slots=True)
class MoveMedium:
    """MOVE MEDIUM (A5h), SMC-3. A transport address of 0 selects the default transport."""

    transport: int
    source: int
    destination: int
    invert: bool = False

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        _, transport, source, destination, b10, _ = _MOVE.unpack_from(cdb)
        return cls(transport, source, destination, bool(b10 & 0x01))

    def build(self) -> bytes:
        return _MOVE.pack(
            Opcode.MOVE_MEDIUM,
            self.transport,
            self.source,
            self.destination,
            1 if self.invert else 0,
            0,
        )


@dataclass(frozen=True, slots=True)
class ExchangeMedium:
    """EXCHANGE MEDIUM (A6h), SMC-3: the medium in `source` goes to `first_destination`, the
    medium that was there goes to `second_destination` (which may be `source`: a swap)."""

    transport: int
    source: int
    first_destination: int
    second_destination: int
    invert1: bool = False
    invert2: bool = False

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        _, transport, source, first, second, b10, _ = _EXCHANGE.unpack_from(cdb)
        # SMC-3 EXCHANGE MEDIUM: byte 10 bit 1 INV1, bit 0 INV2.
        return cls(transport, source, first, second, bool(b10 & 0x02), bool(b10 & 0x01))

    def build(self) -> bytes:
        b10 = (0x02 if self.invert1 else 0) | (0x01 if self.invert2 else 0)
        return _EXCHANGE.pack(
            Opcode.EXCHANGE_MEDIUM,
            self.transport,
            self.source,
            self.first_destination,
            self.second_destination,
            b10,
            0,
        )


@dataclass(frozen=True, slots=True)
class PositionToElement:
    """POSITION TO ELEMENT (2Bh), SMC-3."""

    transport: int
    destination: int
    invert: bool = False

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        _, transport, destination, b8, _ = _POSITION.unpack_from(cdb)
        return cls(transport, destination, bool(b8 & 0x01))

    def build(self) -> bytes:
        return _POSITION.pack(
            Opcode.POSITION_TO_ELEMENT,
            self.transport,
            self.destination,
            1 if self.invert else 0,
            0,
        )


@dataclass(frozen=True, slots=True)
class InitializeElementStatusWithRange:
    """INITIALIZE ELEMENT STATUS WITH RANGE (37h), SMC-3. RANGE=0: every element."""

    range: bool
    fast: bool
    starting_address: int
    number_of_elements: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        _, b1, start, count, _ = _INIT_RANGE.unpack_from(cdb)
        # SMC-3 INITIALIZE ELEMENT STATUS WITH RANGE: byte 1 bit 1 FAST, bit 0 RANGE.
        return cls(bool(b1 & 0x01), bool(b1 & 0x02), start, count)

    def build(self) -> bytes:
        b1 = (0x01 if self.range else 0) | (0x02 if self.fast else 0)
        return _INIT_RANGE.pack(
            Opcode.INITIALIZE_ELEMENT_STATUS_WITH_RANGE,
            b1,
            self.starting_address,
            self.number_of_elements,
            0,
        )


@dataclass(frozen=True, slots=True)
class OpenCloseImportExportElement:
    """OPEN/CLOSE IMPORT/EXPORT ELEMENT (1Bh), SMC-3."""

    element: int
    action: OpenCloseAction

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        _, element, b4, _ = _OPEN_CLOSE.unpack_from(cdb)
        code = b4 & 0x1F
        try:
            action = OpenCloseAction(code)
        except ValueError:
            # SMC-3 OPEN/CLOSE IMPORT/EXPORT ELEMENT: action codes 02h..1Fh are reserved.
            raise InvalidFieldInCdb(
                f"action code {code:#x}", field_pointer=4, bit_pointer=4
            ) from None
        return cls(element, action)

    def build(self) -> bytes:
        return _OPEN_CLOSE.pack(
            Opcode.OPEN_CLOSE_IMPORT_EXPORT_ELEMENT, self.element, self.action, 0
        )


# ---------------------------------------------------------------------------------------------
# READ ELEMENT STATUS data

# SMC-3 READ ELEMENT STATUS: first element address reported | number of elements available |
# reserved | byte count of report available (24 bits).
_STATUS_HEADER = struct.Struct(">HHx3s")
# SMC-3 READ ELEMENT STATUS: element type | PVOLTAG/AVOLTAG | descriptor length | reserved |
# byte count of descriptor data available (24 bits).
_PAGE_HEADER = struct.Struct(">BBHx3s")
# SMC-3 READ ELEMENT STATUS: address | flags | rsvd | ASC | ASCQ | 3 bytes (DT: NOT BUS/ID/LU) |
# SVALID/INVERT/ED/MEDIUM TYPE | source storage element address
_DESCRIPTOR = struct.Struct(">HBxBB3sBH")
# Identification descriptor header: CODE SET | IDENTIFIER TYPE | rsvd | IDENTIFIER LENGTH.
_IDENT = struct.Struct(">BBxB")

#: IDENTIFIER LENGTH is one byte (SMC-3 READ ELEMENT STATUS identification descriptor).
MAX_IDENTIFIER_LENGTH = 255


def ascii_identifier(text: str, limit: int = MAX_IDENTIFIER_LENGTH) -> bytes:
    """`text` as the bytes of an ASCII identifier of at most `limit` bytes, for any str: the
    characters outside 20h..7Eh become "?" (SPC-5 4.3.1), the rest is cut off. A DVCID identifier
    (a drive's serial, or its T10 vendor ID designator text) and volume tags are built with it."""
    return spc.ascii_text(text).encode("ascii")[:limit]

# Element descriptor byte 2 flags (SMC-3 READ ELEMENT STATUS; not every bit exists for every type).
FULL = 0x01
IMPEXP = 0x02
EXCEPT = 0x04
ACCESS = 0x08
EXENAB = 0x10
INENAB = 0x20
CMC = 0x40
OIR = 0x80
_SVALID = 0x80
_INVERT = 0x40
_ED = 0x08
_PVOLTAG = 0x80
_AVOLTAG = 0x40


@dataclass(frozen=True, slots=True)
class VolumeTag:
    """Volume tag information (SMC-3): identifier (barcode) and volume sequence number."""

    identifier: str
    sequence: int = 0

    def build(self) -> bytes:
        """The 36 bytes. Never raises: the identifier is made ASCII 20h..7Eh (SPC-5 4.3.1) and
        cut at 32 bytes (the library never stores a barcode that needs either)."""
        raw = ascii_identifier(self.identifier, VOLUME_IDENTIFIER_LENGTH)
        # SMC-3: the VOLUME IDENTIFIER is left-aligned and padded with spaces (20h).
        return (
            raw.ljust(VOLUME_IDENTIFIER_LENGTH, b" ")
            + b"\x00\x00"
            + _U16.pack(self.sequence & 0xFFFF)
        )

    @classmethod
    def parse(cls, data: bytes | memoryview) -> VolumeTag | None:
        """The tag in 36 bytes, or None when the field is all zeros (no tag)."""
        raw = bytes(data[:VOLUME_TAG_LENGTH])
        if not any(raw):
            return None
        ident = raw[:VOLUME_IDENTIFIER_LENGTH].decode("ascii", "replace").rstrip(" \x00")
        return cls(ident, _U16.unpack_from(raw, 34)[0])


@dataclass(frozen=True, slots=True)
class ElementDescriptor:
    """One element's status. `flags` holds the byte-2 bits (FULL, ACCESS, IMPEXP, ...);
    `identifier` is the DVCID identifier of a data transfer element (empty otherwise)."""

    address: int
    flags: int = 0
    asc: int = 0
    ascq: int = 0
    source: int | None = None  # SVALID + SOURCE STORAGE ELEMENT ADDRESS
    medium_type: int = MediumType.UNSPECIFIED
    invert: bool = False
    disabled: bool = False  # ED
    dt_bus_info: bytes = b"\x00\x00\x00"  # data transfer bytes 6..8 (NOT BUS, ID/LU VALID, ...)
    primary_tag: VolumeTag | None = None
    alternate_tag: VolumeTag | None = None
    code_set: int = 0
    identifier_type: int = 0
    identifier: bytes = b""
    vendor_specific: bytes = b""  # bytes after the identifier (SMC-3: vendor specific)

    @property
    def full(self) -> bool:
        return bool(self.flags & FULL)

    def build(
        self, *, pvoltag: bool, avoltag: bool, identifier_length: int, vendor_length: int = 0
    ) -> bytes:
        """The descriptor with the page's layout; the identifier is space-padded (ASCII) or
        zero-padded to `identifier_length`, the vendor specific bytes zero-padded to
        `vendor_length`: the lengths every descriptor of the page shares. ValueError if either
        is longer."""
        b9 = (self.medium_type & 0x07) | (_ED if self.disabled else 0)
        b9 |= _INVERT if self.invert else 0
        b9 |= _SVALID if self.source is not None else 0
        out = bytearray(
            _DESCRIPTOR.pack(
                self.address,
                self.flags,
                self.asc,
                self.ascq,
                self.dt_bus_info,
                b9,
                self.source or 0,
            )
        )
        if pvoltag:
            # SMC-3 READ ELEMENT STATUS: an element without a tag returns the field as zeros.
            out += self.primary_tag.build() if self.primary_tag else bytes(VOLUME_TAG_LENGTH)
        if avoltag:
            out += self.alternate_tag.build() if self.alternate_tag else bytes(VOLUME_TAG_LENGTH)
        if len(self.identifier) > identifier_length:
            raise ValueError("identifier longer than the page's identifier length")
        pad = b" " if self.code_set == CodeSet.ASCII else b"\x00"
        ident = self.identifier.ljust(identifier_length, pad) if identifier_length else b""
        code_set, ident_type = (
            (self.code_set, self.identifier_type) if identifier_length else (0, 0)
        )
        out += _IDENT.pack(code_set & 0x0F, ident_type & 0x0F, identifier_length) + ident
        if len(self.vendor_specific) > vendor_length:
            raise ValueError("vendor specific bytes longer than the page's")
        # SMC-3 READ ELEMENT STATUS: vendor specific bytes may end each element descriptor (the
        # ELEMENT DESCRIPTOR LENGTH covers them).
        out += self.vendor_specific.ljust(vendor_length, b"\x00")
        return bytes(out)


def descriptor_length(
    *, pvoltag: bool, avoltag: bool, identifier_length: int, vendor_length: int = 0
) -> int:
    """Length of every element descriptor of one page (SMC-3 READ ELEMENT STATUS ELEMENT DESCRIPTOR
    LENGTH)."""
    return (
        ELEMENT_DESCRIPTOR_BASE
        + (VOLUME_TAG_LENGTH if pvoltag else 0)
        + (VOLUME_TAG_LENGTH if avoltag else 0)
        + IDENTIFICATION_HEADER_LENGTH
        + identifier_length
        + vendor_length
    )


@dataclass(frozen=True, slots=True)
class ElementStatusPage:
    """One element status page: consecutive reported elements of one type."""

    element_type: ElementType
    descriptors: tuple[ElementDescriptor, ...]
    pvoltag: bool = False
    avoltag: bool = False
    identifier_length: int = 0
    vendor_length: int = 0  # vendor specific bytes after each descriptor's identifier

    @property
    def descriptor_length(self) -> int:
        return descriptor_length(
            pvoltag=self.pvoltag,
            avoltag=self.avoltag,
            identifier_length=self.identifier_length,
            vendor_length=self.vendor_length,
        )

    def build(self) -> bytes:
        length = self.descriptor_length
        body = b"".join(
            d.build(
                pvoltag=self.pvoltag,
                avoltag=self.avoltag,
                identifier_length=self.identifier_length,
                vendor_length=self.vendor_length,
            )
            for d in self.descriptors
        )
        flags = (_PVOLTAG if self.pvoltag else 0) | (_AVOLTAG if self.avoltag else 0)
        # SMC-3 READ ELEMENT STATUS: BYTE COUNT OF DESCRIPTOR DATA AVAILABLE excludes the page
        # header.
        return (
            _PAGE_HEADER.pack(self.element_type, flags, length, len(body).to_bytes(3, "big")) + body
        )


def build_element_status(pages: Sequence[ElementStatusPage]) -> bytes:
    """The complete (untruncated) READ ELEMENT STATUS data for `pages`.

    FIRST ELEMENT ADDRESS REPORTED is the lowest address reported (0 when nothing is reported),
    NUMBER OF ELEMENTS AVAILABLE the number of descriptors, BYTE COUNT OF REPORT AVAILABLE the
    length of all pages (SMC-3 READ ELEMENT STATUS: header excluded). The caller truncates to the
    allocation
    length; the header is deliberately not adjusted (SMC-3 READ ELEMENT STATUS).
    """
    body = b"".join(p.build() for p in pages)
    addresses = [d.address for p in pages for d in p.descriptors]
    first = min(addresses) if addresses else 0
    header = _STATUS_HEADER.pack(first, len(addresses), len(body).to_bytes(3, "big"))
    return header + body


@dataclass(frozen=True, slots=True)
class ElementStatus:
    """Parsed READ ELEMENT STATUS data (for tests and tools): header fields and pages."""

    first_address: int
    number_available: int
    byte_count: int
    pages: tuple[ElementStatusPage, ...] = field(default=())

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Self:
        """Parse as much as `data` holds; a truncated last page keeps its complete descriptors."""
        data = bytes(data)
        first, count, raw_bytes = _STATUS_HEADER.unpack_from(data)
        byte_count = int.from_bytes(raw_bytes, "big")
        end = min(len(data), ELEMENT_STATUS_HEADER_LENGTH + byte_count)
        pos = ELEMENT_STATUS_HEADER_LENGTH
        pages: list[ElementStatusPage] = []
        while pos + ELEMENT_PAGE_HEADER_LENGTH <= end:
            etype, flags, length, raw_page = _PAGE_HEADER.unpack_from(data, pos)
            page_bytes = int.from_bytes(raw_page, "big")
            pos += ELEMENT_PAGE_HEADER_LENGTH
            pvoltag, avoltag = bool(flags & _PVOLTAG), bool(flags & _AVOLTAG)
            descs = []
            page_end = min(end, pos + page_bytes)
            while length and pos + length <= page_end:
                descs.append(
                    _parse_descriptor(data[pos : pos + length], pvoltag=pvoltag, avoltag=avoltag)
                )
                pos += length
            # The identifier length is the descriptors' IDENTIFIER LENGTH; what follows the
            # identifier up to the descriptor length is vendor specific.
            room = length - descriptor_length(pvoltag=pvoltag, avoltag=avoltag,
                                              identifier_length=0)
            ident_len = max(room, 0)
            if descs:
                ident_len = _ident_length_field(data, pos - len(descs) * length, pvoltag, avoltag)
            pages.append(
                ElementStatusPage(
                    ElementType(etype), tuple(descs), pvoltag, avoltag, max(ident_len, 0),
                    max(room - ident_len, 0),
                )
            )
            pos = page_end
        return cls(first, count, byte_count, tuple(pages))


def _ident_length_field(data: bytes, pos: int, pvoltag: bool, avoltag: bool) -> int:
    """IDENTIFIER LENGTH of the descriptor at `pos`."""
    at = pos + descriptor_length(pvoltag=pvoltag, avoltag=avoltag, identifier_length=0) - 1
    return data[at] if at < len(data) else 0


def _parse_descriptor(raw: bytes, *, pvoltag: bool, avoltag: bool) -> ElementDescriptor:
    address, flags, asc, ascq, bus, b9, source = _DESCRIPTOR.unpack_from(raw)
    pos = ELEMENT_DESCRIPTOR_BASE
    primary = alternate = None
    if pvoltag:
        primary = VolumeTag.parse(raw[pos : pos + VOLUME_TAG_LENGTH])
        pos += VOLUME_TAG_LENGTH
    if avoltag:
        alternate = VolumeTag.parse(raw[pos : pos + VOLUME_TAG_LENGTH])
        pos += VOLUME_TAG_LENGTH
    code_set, ident_type, ident_len = _IDENT.unpack_from(raw, pos)
    pos += IDENTIFICATION_HEADER_LENGTH
    identifier = raw[pos : pos + ident_len]
    vendor_specific = raw[pos + ident_len :]
    if code_set & 0x0F == CodeSet.ASCII:
        identifier = identifier.rstrip(b" ")
    return ElementDescriptor(
        address=address,
        flags=flags,
        asc=asc,
        ascq=ascq,
        source=source if b9 & _SVALID else None,
        medium_type=b9 & 0x07,
        invert=bool(b9 & _INVERT),
        disabled=bool(b9 & _ED),
        dt_bus_info=bus,
        primary_tag=primary,
        alternate_tag=alternate,
        code_set=code_set & 0x0F,
        identifier_type=ident_type & 0x0F,
        identifier=identifier,
        vendor_specific=vendor_specific,
    )


# ---------------------------------------------------------------------------------------------
# Mode pages (SMC-3 mode parameters). Each builder returns the whole page: code, length, parameters.

# SMC-3 element address assignment page: four (first address, count) pairs, 2 reserved bytes; PAGE
# LENGTH 12h.
_EAA = struct.Struct(">BBHHHHHHHH2x")
_DEVCAP = struct.Struct(">BBBx4B4x4B4x")

ELEMENT_ADDRESS_ASSIGNMENT_PAGE = 0x1D
#: The element address assignment page's 2-byte fields (bytes 2-17): for each element type its
#: first element address and its number of elements.
ELEMENT_ADDRESS_ASSIGNMENT_FIELDS = tuple(spc.Field(b, 7, 16) for b in range(2, 18, 2))
TRANSPORT_GEOMETRY_PAGE = 0x1E
DEVICE_CAPABILITIES_PAGE = 0x1F


def element_address_assignment_page(ranges: dict[ElementType, tuple[int, int]]) -> bytes:
    """Page 1Dh from {element type: (first address, count)} for the four element types."""
    args: list[int] = []
    for etype in ELEMENT_TYPES:
        first, count = ranges.get(etype, (0, 0))
        args += [first, count]
    return _EAA.pack(ELEMENT_ADDRESS_ASSIGNMENT_PAGE, _EAA.size - 2, *args)


def transport_geometry_page(transports: int, *, rotate: bool = False) -> bytes:
    """Page 1Eh (SMC-3 transport geometry page): one 2-byte descriptor (ROTATE, MEMBER NUMBER) per
    transport."""
    body = b"".join(bytes([0x01 if rotate else 0x00, 0]) for _ in range(transports))
    return bytes([TRANSPORT_GEOMETRY_PAGE, len(body)]) + body


def _type_bits(types: Iterable[ElementType]) -> int:
    # SMC-3 device capabilities page: bit 0 MT, bit 1 ST, bit 2 I/E, bit 3 DT in every capability
    # byte.
    bits = 0
    for t in types:
        bits |= 1 << (t - 1)
    return bits


def device_capabilities_page(
    storage: Iterable[ElementType],
    move: dict[ElementType, Iterable[ElementType]],
    exchange: dict[ElementType, Iterable[ElementType]],
) -> bytes:
    """Page 1Fh (SMC-3 device capabilities page): which element types can hold media (STOR xx), and
    for each source
    type the destination types MOVE MEDIUM (byte 4..7) and EXCHANGE MEDIUM (12..15) support."""
    moves = [_type_bits(move.get(t, ())) for t in ELEMENT_TYPES]
    exchanges = [_type_bits(exchange.get(t, ())) for t in ELEMENT_TYPES]
    return _DEVCAP.pack(
        DEVICE_CAPABILITIES_PAGE, _DEVCAP.size - 2, _type_bits(storage), *moves, *exchanges
    )
