"""SSC (sequential-access / tape) wire formats: CDBs, parameter data, mode and log pages, MAM.

Pure: no I/O, no state. CDB classes are frozen dataclasses with ``parse(cdb)``; parameter data has
``build_*`` functions (and ``parse_*`` where an initiator sends it). Tape-only conditions are
`ScsiError` subclasses in sense.py, with every other sense class.

Citations are to SSC-5 (T10/BSR INCITS 503) and SPC-5; the section numbers name the command or
page being enforced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from tcmu_py.scsi import spc
from tcmu_py.scsi.sense import (
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    ParameterListLengthError,
)

# ---------------------------------------------------------------------------------------------
# CDBs

_U24 = struct.Struct(">I")


def _u24(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 3], "big")


def _s24(cdb: bytes, at: int) -> int:
    return int.from_bytes(cdb[at : at + 3], "big", signed=True)


def _need(cdb: bytes, n: int) -> None:
    if len(cdb) < n:
        raise InvalidFieldInCdb(f"CDB of {len(cdb)} bytes, expected {n}", field_pointer=0)


@dataclass(frozen=True, slots=True)
class ReadWrite6:
    """READ(6) 08h / WRITE(6) 0Ah: FIXED byte 1 bit 0, SILI bit 1 (READ only), 24-bit length."""

    fixed: bool
    sili: bool
    transfer_length: int  # blocks when fixed, bytes when variable

    @classmethod
    def parse(cls, cdb: bytes) -> ReadWrite6:
        _need(cdb, 6)
        return cls(bool(cdb[1] & 0x01), bool(cdb[1] & 0x02), _u24(cdb, 2))

    def build(self, opcode: int) -> bytes:
        flags = (0x01 if self.fixed else 0) | (0x02 if self.sili else 0)
        return bytes([opcode, flags]) + self.transfer_length.to_bytes(3, "big") + b"\x00"


@dataclass(frozen=True, slots=True)
class WriteFilemarks6:
    """WRITE FILEMARKS(6) 10h: IMMED bit 0, WSMK bit 1, 24-bit count (0 = flush only)."""

    immed: bool
    wsmk: bool
    count: int

    @classmethod
    def parse(cls, cdb: bytes) -> WriteFilemarks6:
        _need(cdb, 6)
        return cls(bool(cdb[1] & 0x01), bool(cdb[1] & 0x02), _u24(cdb, 2))

    def build(self) -> bytes:
        flags = (0x01 if self.immed else 0) | (0x02 if self.wsmk else 0)
        return bytes([0x10, flags]) + self.count.to_bytes(3, "big") + b"\x00"


class SpaceCode(IntEnum):
    """SPACE CODE field (SSC-5 7.x table: SPACE(6)/(16))."""

    BLOCKS = 0
    FILEMARKS = 1
    SEQUENTIAL_FILEMARKS = 2
    END_OF_DATA = 3


@dataclass(frozen=True, slots=True)
class Space:
    """SPACE(6) 11h (24-bit signed count) / SPACE(16) 91h (64-bit signed count)."""

    code: int
    count: int
    parameter_length: int = 0

    @classmethod
    def parse(cls, cdb: bytes) -> Space:
        if cdb[0] == 0x11:
            _need(cdb, 6)
            return cls(cdb[1] & 0x0F, _s24(cdb, 2))
        _need(cdb, 16)
        count = int.from_bytes(cdb[4:12], "big", signed=True)
        return cls(cdb[1] & 0x0F, count, int.from_bytes(cdb[12:14], "big"))

    def build(self, sixteen: bool = False) -> bytes:
        if not sixteen:
            return (
                bytes([0x11, self.code & 0x0F])
                + self.count.to_bytes(3, "big", signed=True)
                + b"\x00"
            )
        return (
            bytes([0x91, self.code & 0x0F, 0, 0])
            + self.count.to_bytes(8, "big", signed=True)
            + self.parameter_length.to_bytes(2, "big")
            + b"\x00\x00"
        )


class DestType(IntEnum):
    """LOCATE(16) DEST_TYPE (SSC-5 7.x)."""

    LOGICAL_OBJECT = 0
    LOGICAL_FILE = 1
    END_OF_DATA = 3


@dataclass(frozen=True, slots=True)
class Locate:
    """LOCATE(10) 2Bh / LOCATE(16) 92h."""

    dest_type: int
    change_partition: bool
    immed: bool
    partition: int
    identifier: int
    bt: bool = False  # LOCATE(10) block address type (vendor-specific when set)

    @classmethod
    def parse(cls, cdb: bytes) -> Locate:
        if cdb[0] == 0x2B:
            _need(cdb, 10)
            return cls(
                DestType.LOGICAL_OBJECT,
                bool(cdb[1] & 0x02),
                bool(cdb[1] & 0x01),
                cdb[8],
                int.from_bytes(cdb[3:7], "big"),
                bt=bool(cdb[1] & 0x04),
            )
        _need(cdb, 16)
        return cls(
            (cdb[1] >> 3) & 0x07,
            bool(cdb[1] & 0x02),
            bool(cdb[1] & 0x01),
            cdb[3],
            int.from_bytes(cdb[4:12], "big"),
        )

    def build(self, sixteen: bool = False) -> bytes:
        flags = (0x02 if self.change_partition else 0) | (0x01 if self.immed else 0)
        if not sixteen:
            flags |= 0x04 if self.bt else 0
            return (
                bytes([0x2B, flags, 0])
                + self.identifier.to_bytes(4, "big")
                + bytes([0, self.partition, 0])
            )
        flags |= (self.dest_type & 0x07) << 3
        return (
            bytes([0x92, flags, 0, self.partition]) + self.identifier.to_bytes(8, "big") + bytes(4)
        )


class ReadPositionForm(IntEnum):
    """READ POSITION service actions (SSC-5 7.x table)."""

    SHORT = 0x00
    SHORT_VENDOR = 0x01
    LONG = 0x06
    EXTENDED = 0x08


@dataclass(frozen=True, slots=True)
class ReadPosition:
    """READ POSITION 34h: service action byte 1 bits 4..0, allocation length bytes 7..8."""

    service_action: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: bytes) -> ReadPosition:
        _need(cdb, 10)
        return cls(cdb[1] & 0x1F, int.from_bytes(cdb[7:9], "big"))

    def build(self) -> bytes:
        return (
            bytes([0x34, self.service_action & 0x1F])
            + bytes(5)
            + self.allocation_length.to_bytes(2, "big")
            + b"\x00"
        )


@dataclass(frozen=True, slots=True)
class LoadUnload:
    """LOAD UNLOAD 1Bh: IMMED byte 1 bit 0; byte 4 HOLD bit 3, EOT 2, RETEN 1, LOAD 0."""

    immed: bool
    hold: bool
    eot: bool
    reten: bool
    load: bool

    @classmethod
    def parse(cls, cdb: bytes) -> LoadUnload:
        _need(cdb, 6)
        b = cdb[4]
        return cls(bool(cdb[1] & 1), bool(b & 8), bool(b & 4), bool(b & 2), bool(b & 1))

    def build(self) -> bytes:
        b = (8 if self.hold else 0) | (4 if self.eot else 0) | (2 if self.reten else 0)
        return bytes([0x1B, int(self.immed), 0, 0, b | int(self.load), 0])


@dataclass(frozen=True, slots=True)
class Erase6:
    """ERASE(6) 19h: IMMED byte 1 bit 1, LONG bit 0."""

    immed: bool
    long: bool

    @classmethod
    def parse(cls, cdb: bytes) -> Erase6:
        _need(cdb, 6)
        return cls(bool(cdb[1] & 0x02), bool(cdb[1] & 0x01))

    def build(self) -> bytes:
        return bytes([0x19, (0x02 if self.immed else 0) | (0x01 if self.long else 0), 0, 0, 0, 0])


@dataclass(frozen=True, slots=True)
class ReportDensitySupport:
    """REPORT DENSITY SUPPORT 44h: MEDIA bit 0, MEDIUM TYPE bit 1, allocation length bytes 7..8."""

    media: bool
    medium_type: bool
    allocation_length: int

    @classmethod
    def parse(cls, cdb: bytes) -> ReportDensitySupport:
        _need(cdb, 10)
        return cls(bool(cdb[1] & 1), bool(cdb[1] & 2), int.from_bytes(cdb[7:9], "big"))

    def build(self) -> bytes:
        flags = (1 if self.media else 0) | (2 if self.medium_type else 0)
        return bytes([0x44, flags]) + bytes(5) + self.allocation_length.to_bytes(2, "big") + b"\x00"


@dataclass(frozen=True, slots=True)
class AllowOverwrite:
    """ALLOW OVERWRITE 82h (SSC-5 7.x): ALLOW OVERWRITE byte 2 bits 3..0, partition byte 3,
    logical object identifier bytes 4..11."""

    allow_overwrite: int  # 0 disabled, 1 current position, 2 format
    partition: int
    identifier: int

    @classmethod
    def parse(cls, cdb: bytes) -> AllowOverwrite:
        _need(cdb, 16)
        return cls(cdb[2] & 0x0F, cdb[3], int.from_bytes(cdb[4:12], "big"))

    def build(self) -> bytes:
        return (
            bytes([0x82, 0, self.allow_overwrite & 0x0F, self.partition])
            + self.identifier.to_bytes(8, "big")
            + bytes(4)
        )


class AttributeAction(IntEnum):
    """READ ATTRIBUTE service actions (SPC-5 6.17 table)."""

    VALUES = 0x00
    LIST = 0x01
    LOGICAL_VOLUME_LIST = 0x02
    PARTITION_LIST = 0x03
    SUPPORTED_ATTRIBUTES = 0x05


@dataclass(frozen=True, slots=True)
class ReadAttribute:
    """READ ATTRIBUTE 8Ch (SPC-5 6.17)."""

    service_action: int
    logical_volume: int
    partition: int
    first_attribute: int
    allocation_length: int
    cache: bool

    @classmethod
    def parse(cls, cdb: bytes) -> ReadAttribute:
        _need(cdb, 16)
        return cls(
            cdb[1] & 0x1F,
            cdb[5],
            cdb[7],
            int.from_bytes(cdb[8:10], "big"),
            int.from_bytes(cdb[10:14], "big"),
            bool(cdb[14] & 1),
        )

    def build(self) -> bytes:
        return (
            bytes([0x8C, self.service_action & 0x1F, 0, 0, 0, self.logical_volume, 0])
            + bytes([self.partition])
            + self.first_attribute.to_bytes(2, "big")
            + self.allocation_length.to_bytes(4, "big")
            + bytes([int(self.cache), 0])
        )


@dataclass(frozen=True, slots=True)
class WriteAttribute:
    """WRITE ATTRIBUTE 8Dh (SPC-5 6.48)."""

    wtc: bool
    logical_volume: int
    partition: int
    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: bytes) -> WriteAttribute:
        _need(cdb, 16)
        return cls(bool(cdb[1] & 1), cdb[5], cdb[7], int.from_bytes(cdb[10:14], "big"))

    def build(self) -> bytes:
        return (
            bytes([0x8D, int(self.wtc), 0, 0, 0, self.logical_volume, 0, self.partition, 0, 0])
            + self.parameter_list_length.to_bytes(4, "big")
            + bytes(2)
        )


# ---------------------------------------------------------------------------------------------
# READ BLOCK LIMITS (SSC-5 7.x)

_BLOCK_LIMITS = struct.Struct(">B3sH")


def build_read_block_limits(max_length: int, min_length: int, granularity: int = 0) -> bytes:
    """6 bytes: GRANULARITY, MAXIMUM BLOCK LENGTH LIMIT (24 bits), MINIMUM BLOCK LENGTH LIMIT."""
    return _BLOCK_LIMITS.pack(granularity & 0x1F, max_length.to_bytes(3, "big"), min_length)


def build_read_block_limits_mloi(max_object_id: int) -> bytes:
    """20 bytes for MLOI=1: bytes 12..19 MAXIMUM LOGICAL OBJECT IDENTIFIER."""
    return bytes(12) + max_object_id.to_bytes(8, "big")


# ---------------------------------------------------------------------------------------------
# READ POSITION data (SSC-5 7.x)

_RP_SHORT = struct.Struct(">BBxxIIx3sI")
_RP_LONG = struct.Struct(">B3xIQQ8x")
_RP_EXTENDED = struct.Struct(">BBHx3sQQQ")

BOP, EOP, LOCU, BYCU, LOLU, PERR, BPEW = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02, 0x01
MPU, LONU = 0x08, 0x04


@dataclass(frozen=True, slots=True)
class Position:
    """What READ POSITION reports; the buffer is always empty (writes go straight to the file)."""

    partition: int
    object_id: int
    file_id: int
    bop: bool
    eop: bool
    bpew: bool


def build_read_position_short(p: Position) -> bytes:
    """20-byte short form. A location beyond 32 bits sets PERR and reports 0xFFFFFFFF."""
    flags = (BOP if p.bop else 0) | (EOP if p.eop else 0) | (BPEW if p.bpew else 0)
    loc = p.object_id
    if loc > 0xFFFFFFFF:
        # SSC-5: PERR = 1 when a location field cannot represent the position.
        flags |= PERR
        loc = 0xFFFFFFFF
    return _RP_SHORT.pack(flags, p.partition & 0xFF, loc, loc, b"\x00\x00\x00", 0)


def build_read_position_long(p: Position) -> bytes:
    """32-byte long form: partition, 64-bit logical object number and logical file identifier."""
    flags = (BOP if p.bop else 0) | (EOP if p.eop else 0) | (BPEW if p.bpew else 0)
    return _RP_LONG.pack(flags, p.partition, p.object_id, p.file_id)


def build_read_position_extended(p: Position) -> bytes:
    """32-byte extended form: ADDITIONAL LENGTH 1Ch, 64-bit first/last object locations."""
    flags = (BOP if p.bop else 0) | (EOP if p.eop else 0) | (BPEW if p.bpew else 0)
    return _RP_EXTENDED.pack(
        flags, p.partition & 0xFF, 0x1C, b"\x00\x00\x00", p.object_id, p.object_id, 0
    )


def parse_read_position(data: bytes, form: int) -> Position:
    """Decode READ POSITION data of `form` (ReadPositionForm); `file_id` is -1 where absent."""
    if form == ReadPositionForm.LONG:
        flags, part, obj, file_id = _RP_LONG.unpack_from(data)
    elif form == ReadPositionForm.EXTENDED:
        flags, part, _len, _n, obj, _last, _bytes = _RP_EXTENDED.unpack_from(data)
        file_id = -1
    else:
        flags, part, obj, _last, _n, _bytes = _RP_SHORT.unpack_from(data)
        file_id = -1
    return Position(part, obj, file_id, bool(flags & BOP), bool(flags & EOP), bool(flags & BPEW))


# ---------------------------------------------------------------------------------------------
# REPORT DENSITY SUPPORT (SSC-5 7.x, 7.x.2 density support descriptor, 7.x.3 medium type)

_DENSITY_DESC = struct.Struct(">BBBH3sHHI8s8s20s")
#: DESCRIPTOR LENGTH of a density support descriptor: the bytes after the field (52 - 5).
_DENSITY_DESC_LENGTH = 0x2F
_MEDIUM_TYPE_DESC = struct.Struct(">BxHB9sHHxx8s8s20s")


@dataclass(frozen=True, slots=True)
class DensityDescriptor:
    primary_code: int
    secondary_code: int
    writable: bool  # WRTOK
    default: bool  # DEFLT
    bits_per_mm: int
    media_width: int  # tenths of a millimetre
    tracks: int
    capacity_mb: int  # 10^6 bytes
    organization: str
    name: str
    description: str


def _ascii(s: str, n: int) -> bytes:
    """SPC-5 4.3.1: an ASCII field of `n` bytes (20h..7Eh, space padded); never raises."""
    return spc.ascii_text(s).encode("ascii")[:n].ljust(n)


def build_density_support(descs: list[DensityDescriptor]) -> bytes:
    """Header (AVAILABLE DENSITY SUPPORT LENGTH) + 52-byte descriptors."""
    body = b"".join(
        _DENSITY_DESC.pack(
            d.primary_code,
            d.secondary_code,
            (0x80 if d.writable else 0) | (0x20 if d.default else 0) | 0x01,  # DLV: length valid
            _DENSITY_DESC_LENGTH,
            d.bits_per_mm.to_bytes(3, "big"),
            d.media_width,
            d.tracks,
            d.capacity_mb,
            _ascii(d.organization, 8),
            _ascii(d.name, 8),
            _ascii(d.description, 20),
        )
        for d in descs
    )
    return struct.pack(">H2x", len(body) + 2) + body


@dataclass(frozen=True, slots=True)
class MediumTypeDescriptor:
    medium_type: int
    density_codes: tuple[int, ...]
    media_width: int
    medium_length: int  # metres
    organization: str
    name: str
    description: str


def build_medium_type_support(descs: list[MediumTypeDescriptor]) -> bytes:
    """Header + 56-byte medium type descriptors (DESCRIPTOR LENGTH 34h)."""
    body = b"".join(
        _MEDIUM_TYPE_DESC.pack(
            d.medium_type,
            0x34,
            len(d.density_codes),
            bytes(d.density_codes[:9]).ljust(9, b"\x00"),
            d.media_width,
            d.medium_length,
            _ascii(d.organization, 8),
            _ascii(d.name, 8),
            _ascii(d.description, 20),
        )
        for d in descs
    )
    return struct.pack(">H2x", len(body) + 2) + body


# ---------------------------------------------------------------------------------------------
# Mode pages: each builder returns (current, changeable) as whole pages, headers included.

#: The fields wider than a bit of the pages MODE SELECT checks against their changeable mask
#: (`spc.ModePage.fields`), by (page code, subpage). Page 11h has its own check
#: (`parse_medium_partition_select`); page 1Dh has none.
MODE_PAGE_FIELDS: dict[tuple[int, int], tuple[spc.Field, ...]] = {
    # SSC-5 8.3.3 Data Compression: RED, COMPRESSION ALGORITHM, DECOMPRESSION ALGORITHM.
    (0x0F, 0): (spc.Field(3, 6, 2), spc.Field(4, 7, 32), spc.Field(8, 7, 32)),
    # SSC-5 8.3.4 Device Configuration: ACTIVE FORMAT, WRITE DELAY TIME, SOCF, EOD DEFINED,
    # BUFFER SIZE AT EARLY WARNING, WTRE, REWIND ON RESET.
    (0x10, 0): (spc.Field(2, 4, 5), spc.Field(6, 7, 16), spc.Field(8, 3, 2), spc.Field(10, 7, 3),
                spc.Field(11, 7, 24), spc.Field(15, 7, 2), spc.Field(15, 4, 2)),
    # SSC-5 8.3.5 Device Configuration Extension: PROGRAMMABLE EARLY WARNING SIZE.
    (0x10, 1): (spc.Field(6, 7, 16),),
}

COMPRESSION_ALGORITHM = 0x01  # SSC-5 8.3.3: 01h = the device's default algorithm


def data_compression_page(dce: bool, dcc: bool = True) -> tuple[bytes, bytes]:
    """Page 0Fh (SSC-5 8.3.3), 16 bytes. DCE changeable; DDE always set (decompression on)."""
    cur = struct.pack(
        ">BBBBII4x",
        0x0F,
        0x0E,
        (0x80 if dce else 0) | (0x40 if dcc else 0),
        0x80,  # DDE
        COMPRESSION_ALGORITHM,
        COMPRESSION_ALGORITHM,
    )
    chg = struct.pack(">BBBBII4x", 0x0F, 0x0E, 0x80, 0, 0, 0)
    return cur, chg


_ALGORITHM = struct.Struct(">I")


def accept_compression_algorithms(body: bytes, offset: int) -> bytes:
    """`body` (a MODE SELECT of the Data Compression page 0Fh, whole page as sent, at `offset`
    of the parameter list) as the generic changeable-mask check should see it, or
    INVALID FIELD IN PARAMETER LIST for an algorithm this drive does not have.

    SSC-5 8.3.3: the COMPRESSION ALGORITHM is the one used when DCE is one; one the device
    server does not support is INVALID FIELD IN PARAMETER LIST; 00h means that no algorithm
    is selected (the page's wording since SCSI-2, as QIC-157 rev B carries it; drives such as
    the StorageTek T10000 list 00h among the values MODE SELECT takes). This drive has one
    algorithm, `COMPRESSION_ALGORITHM` (01h, the default):

    * with DCE zero, 00h (no compression) is accepted and read as 01h, the algorithm the drive
      keeps for when compression is enabled again: Linux st (`st_compression`) writes 00h
      there with DCE zero when compression is turned off and its `c_algo` option is set, and
      turns compression on again without touching the field when `c_algo` is zero;
    * with DCE one, only 01h (00h would enable compression with no algorithm);
    * the DECOMPRESSION ALGORITHM is 01h (DDE is always one and not changeable).

    The sense points at the 4-byte field itself: its first byte and bit 7 (SPC-5 4.4.5.2: a
    multiple-byte field is named by its most significant byte, a multiple-bit one by its
    most significant bit). A page of another length is returned as it is, for the generic
    check (PAGE LENGTH)."""
    if len(body) != 16:
        return body
    out = bytearray(body)
    dce = bool(body[2] & 0x80)
    if not dce and _ALGORITHM.unpack_from(body, 4)[0] == 0:
        _ALGORITHM.pack_into(out, 4, COMPRESSION_ALGORITHM)
    for at, name in ((4, "COMPRESSION ALGORITHM"), (8, "DECOMPRESSION ALGORITHM")):
        value = _ALGORITHM.unpack_from(out, at)[0]
        if value != COMPRESSION_ALGORITHM:
            raise InvalidFieldInParameterList(
                f"data compression page: {name} {value:#x} is not supported"
                + (" with DCE one" if at == 4 and value == 0 else ""),
                field_pointer=offset + at, bit_pointer=7,
            )
    return bytes(out)


def device_configuration_page(
    compression: bool, *, active_partition: int = 0
) -> tuple[bytes, bytes]:
    """Page 10h (SSC-5 8.3.4), 16 bytes: LOIS=1, EEG=1, SEW=1, SELECT DATA COMPRESSION ALGORITHM."""
    cur = bytearray(16)
    cur[0], cur[1] = 0x10, 0x0E
    cur[3] = active_partition
    cur[8] = 0x40  # LOIS: logical object identifiers are reported by READ POSITION
    cur[10] = 0x18  # EEG (early-warning EOM generation) | SEW (synchronize at early warning)
    cur[14] = 0x01 if compression else 0x00
    chg = bytearray(16)
    chg[0], chg[1] = 0x10, 0x0E
    chg[14] = 0xFF
    return bytes(cur), bytes(chg)


def device_configuration_extension_page(pews_mb: int = 0) -> tuple[bytes, bytes]:
    """Page 10h subpage 01h (SSC-5 8.3.5), 32 bytes; PROGRAMMABLE EARLY WARNING SIZE in MB."""
    cur = bytearray(32)
    cur[0], cur[1] = 0x50, 0x01  # SPF | 10h
    cur[2:4] = (0x1C).to_bytes(2, "big")
    cur[6:8] = pews_mb.to_bytes(2, "big")
    chg = bytearray(32)
    chg[0], chg[1] = 0x50, 0x01
    chg[2:4] = (0x1C).to_bytes(2, "big")
    return bytes(cur), bytes(chg)


# Medium partition page flags (SSC-5 8.3.6, byte 4).
FDP, SDP, IDP, PSUM_MASK, POFM, CLEAR, ADDP = 0x80, 0x40, 0x20, 0x18, 0x04, 0x02, 0x01
#: PARTITION SIZE value that means "the rest of the medium" (SSC-5 8.3.6).
PARTITION_REST = 0xFFFF
#: MEDIUM FORMAT RECOGNITION this drive reports: format and partition recognition (03h).
MEDIUM_FORMAT_RECOGNITION = 0x03


def medium_partition_page(sizes_mb: list[int], max_additional: int) -> tuple[bytes, bytes]:
    """Page 11h (SSC-5 8.3.6): current value and changeable mask.

    MAXIMUM ADDITIONAL PARTITIONS `max_additional`, ADDITIONAL PARTITIONS DEFINED from `sizes_mb`
    (one entry per partition), IDP and PSUM 10b (MB), POFM 1 (a FORMAT MEDIUM makes the
    partitions, as on LTO-5 and later), MEDIUM FORMAT RECOGNITION 03h, and max_additional + 1
    partition size descriptors (sizes capped at FFFEh, unused ones 0). Changeable: ADDITIONAL
    PARTITIONS DEFINED, FDP/SDP/IDP, PSUM, PARTITION UNITS and the sizes (when partitions can be
    made at all).
    """
    n = max_additional + 1
    descs = [min(mb, PARTITION_REST - 1) for mb in sizes_mb[:n]] + [0] * (n - len(sizes_mb))
    flags = IDP | 0x10 | POFM
    cur = bytes([0x11, 6 + 2 * n, max_additional, len(sizes_mb) - 1, flags,
                 MEDIUM_FORMAT_RECOGNITION, 0, 0])
    cur += b"".join(d.to_bytes(2, "big") for d in descs)
    can = 0xFF if max_additional else 0
    chg = bytes([0x11, 6 + 2 * n, 0, can & 0x03, can & (FDP | SDP | IDP | PSUM_MASK), 0,
                 can & 0x0F, 0]) + bytes([can, can]) * n
    return cur, chg


def parse_medium_partition_select(
    body: bytes, offset: int, current: bytes, capacity: int
) -> list[int] | None:
    """The partition sizes in bytes that a MODE SELECT of page 11h (`body`, the whole page, at
    `offset` in the parameter list) asks for, None if it asks for no change (none of FDP, SDP,
    IDP set); `current` is the page as reported (`medium_partition_page`), `capacity` the
    medium's bytes.

    The page length may differ from ours (SSC-5 8.3.6: as many size descriptors as sent, st
    sends two); every field this drive cannot honour is INVALID FIELD IN PARAMETER LIST
    pointing at it: MAXIMUM ADDITIONAL PARTITIONS or MEDIUM FORMAT RECOGNITION changed, more
    additional partitions than the maximum, more than one of FDP/SDP/IDP, POFM cleared, CLEAR
    or ADDP set, a PARTITIONING TYPE, too few size descriptors, a size of 0, more than one
    size of FFFFh, or sizes beyond the capacity.
    """
    def bad(what: str, byte: int, bit: int | None = None) -> InvalidFieldInParameterList:
        return InvalidFieldInParameterList(f"medium partition page: {what}",
                                           field_pointer=offset + byte, bit_pointer=bit)

    if len(body) < 8 or len(body) % 2:
        raise bad(f"page length {len(body) - 2}", 1)
    if body[2] != current[2]:
        raise bad(f"MAXIMUM ADDITIONAL PARTITIONS {body[2]}", 2)
    additional = body[3]
    if additional > current[2]:
        raise bad(f"ADDITIONAL PARTITIONS DEFINED {additional}", 3)
    flags = body[4]
    how = flags & (FDP | SDP | IDP)
    if how & (how - 1):
        raise bad("more than one of FDP, SDP, IDP", 4, how.bit_length() - 1)
    if not flags & POFM:
        raise bad("POFM 0 (partitions are made by FORMAT MEDIUM)", 4, 2)
    for bit, name in ((CLEAR, "CLEAR"), (ADDP, "ADDP")):
        if flags & bit:
            raise bad(name, 4, bit.bit_length() - 1)
    if body[5] != current[5]:
        raise bad(f"MEDIUM FORMAT RECOGNITION {body[5]:#x}", 5)
    if body[6] & 0xF0:
        raise bad(f"PARTITIONING TYPE {body[6] >> 4}", 6, 7)
    if not how:
        return None
    n = additional + 1
    if how != IDP:  # FDP / SDP: the drive chooses; equal partitions
        if capacity < n:
            raise bad(f"{n} partitions on {capacity} bytes", 3)
        return [capacity // n] * n
    if (len(body) - 8) // 2 < n:
        raise bad(f"{(len(body) - 8) // 2} partition size descriptor(s) for {n} partitions", 1)
    psum = (flags & PSUM_MASK) >> 3
    unit = (1, 10**3, 10**6, 10 ** (body[6] & 0x0F))[psum]
    values = [int.from_bytes(body[8 + 2 * i : 10 + 2 * i], "big") for i in range(n)]
    sizes: list[int | None] = []
    for i, v in enumerate(values):
        if v == 0:
            raise bad(f"partition {i} size 0", 8 + 2 * i)
        if v == PARTITION_REST:
            if None in sizes:
                raise bad("a second partition size FFFFh", 8 + 2 * i)
            sizes.append(None)
        else:
            sizes.append(v * unit)
        if sum(s for s in sizes if s is not None) > capacity:
            raise bad(f"partition {i} ends beyond the capacity {capacity}", 8 + 2 * i)
    rest = capacity - sum(s for s in sizes if s is not None)
    if None in sizes:
        if rest <= 0:
            raise bad("no room for the partition of size FFFFh", 8 + 2 * sizes.index(None))
        return [rest if s is None else s for s in sizes]
    return [s for s in sizes if s is not None]


@dataclass(frozen=True, slots=True)
class FormatMedium:
    """FORMAT MEDIUM 04h (SSC-5 7.x): VERIFY byte 1 bit 1, IMMED bit 0, FORMAT byte 2 bits 3..0
    (0 default format, 1 partition as page 11h says, 2 default then partition), TRANSFER
    LENGTH bytes 3..4."""

    verify: bool
    immed: bool
    format: int
    transfer_length: int

    @classmethod
    def parse(cls, cdb: bytes) -> FormatMedium:
        _need(cdb, 6)
        return cls(bool(cdb[1] & 0x02), bool(cdb[1] & 0x01), cdb[2] & 0x0F,
                   int.from_bytes(cdb[3:5], "big"))

    def build(self) -> bytes:
        return bytes([0x04, (0x02 if self.verify else 0) | (0x01 if self.immed else 0),
                      self.format & 0x0F]) + self.transfer_length.to_bytes(2, "big") + b"\x00"


def medium_configuration_page(worm: bool) -> tuple[bytes, bytes]:
    """Page 1Dh (SSC-5 8.3.7), 32 bytes: WORMM, WORM MODE LABEL/FILEMARK RESTRICTIONS.

    Label restrictions 01h (no logical block may be overwritten); filemark restrictions 02h
    (filemarks after the last logical block may be overwritten) — what LTO WORM drives report.
    """
    cur = bytearray(32)
    cur[0], cur[1] = 0x1D, 0x1E
    cur[2] = 0x01 if worm else 0x00
    cur[4] = 0x01
    cur[5] = 0x02
    chg = bytearray(32)
    chg[0], chg[1] = 0x1D, 0x1E
    return bytes(cur), bytes(chg)


# ---------------------------------------------------------------------------------------------
# VPD pages (SSC-5 8.6)


def build_vpd_manufacturer_serial(peripheral_type: int, serial: str) -> bytes:
    """Manufacturer-assigned serial number VPD B1h (SSC-5 8.6.3): the serial as ASCII.

    Never raises: characters outside 20h..7Eh (SPC-5 4.3.1) are sent as "?", and the page is
    cut at 255 bytes.
    """
    raw = spc.ascii_text(serial).encode("ascii")[:255]
    return spc.build_vpd_page(peripheral_type, 0xB1, raw)


# ---------------------------------------------------------------------------------------------
# Log pages (SPC-5 7.3.1 format; SSC-5 8.2 pages)

_LOG_HEADER = struct.Struct(">BBH")
_LOG_PARAM = struct.Struct(">HBB")

#: Parameter control byte for counters: FORMAT AND LINKING 00b (bounded data counter).
CONTROL_COUNTER = 0x00
#: For TapeAlert flags and capacity values: FORMAT AND LINKING 11b (binary format list).
CONTROL_BINARY = 0x03


def build_log_page(page_code: int, params: list[tuple[int, int, bytes]], subpage: int = 0) -> bytes:
    """A log page: header, then (PARAMETER CODE, control byte, value) parameters in order."""
    body = b"".join(_LOG_PARAM.pack(code, ctl, len(val)) + val for code, ctl, val in params)
    first = page_code & 0x3F
    if subpage:
        first |= 0x40  # SPF
    return _LOG_HEADER.pack(first, subpage, len(body)) + body


def _counter(value: int, width: int = 8) -> bytes:
    return min(value, (1 << (8 * width)) - 1).to_bytes(width, "big")


def error_counter_page(page_code: int, *, bytes_processed: int, uncorrected: int) -> bytes:
    """Page 02h/03h (SPC-5 7.3.x): parameters 0000h..0006h; only 0005h/0006h are ever non-zero."""
    params = [(code, CONTROL_COUNTER, _counter(0, 4)) for code in range(5)]
    params.append((0x0005, CONTROL_COUNTER, _counter(bytes_processed)))
    params.append((0x0006, CONTROL_COUNTER, _counter(uncorrected, 4)))
    return build_log_page(page_code, params)


def sequential_access_page(
    *, written_in: int, written_media: int, read_media: int, read_out: int, cleaning: bool
) -> bytes:
    """Page 0Ch (SSC-5 8.2.3): bytes from/to the initiator and the medium; 0100h CLEANING."""
    return build_log_page(
        0x0C,
        [
            (0x0000, CONTROL_COUNTER, _counter(written_in)),
            (0x0001, CONTROL_COUNTER, _counter(written_media)),
            (0x0002, CONTROL_COUNTER, _counter(read_media)),
            (0x0003, CONTROL_COUNTER, _counter(read_out)),
            (0x0100, CONTROL_COUNTER, _counter(int(cleaning))),
        ],
    )


def tape_alert_page(flags: set[int]) -> bytes:
    """Page 2Eh (SSC-5 8.2.4): parameters 0001h..0040h, one byte each, 1 when the flag is set."""
    return build_log_page(
        0x2E,
        [(code, CONTROL_BINARY, b"\x01" if code in flags else b"\x00") for code in range(1, 0x41)],
    )


def tape_capacity_page(remaining_mb: int, maximum_mb: int, alternate_remaining_mb: int = 0,
                       alternate_maximum_mb: int = 0) -> bytes:
    """Page 31h, Tape Capacity (vendor-specific; the layout LTO drives and LTFS use): 0001h/0003h
    the main partition's (partition 0) remaining and maximum capacity, 0002h/0004h the
    alternate partition's (partition 1; 0 without one), in MiB, whichever partition is
    active."""
    return build_log_page(
        0x31,
        [
            (0x0001, CONTROL_BINARY, _counter(remaining_mb, 4)),
            (0x0002, CONTROL_BINARY, _counter(alternate_remaining_mb, 4)),
            (0x0003, CONTROL_BINARY, _counter(maximum_mb, 4)),
            (0x0004, CONTROL_BINARY, _counter(alternate_maximum_mb, 4)),
        ],
    )


class TapeAlert(IntEnum):
    """TapeAlert flags this drive raises (SSC-5 Annex / TapeAlert specification)."""

    MEDIA = 0x04
    READ_FAILURE = 0x05
    WRITE_FAILURE = 0x06
    WRITE_PROTECT = 0x09
    NO_REMOVAL = 0x0A
    CLEANING_MEDIA = 0x0B
    UNSUPPORTED_FORMAT = 0x0C
    READ_ONLY_FORMAT = 0x11


# ---------------------------------------------------------------------------------------------
# MAM attributes (SPC-5 6.17 READ ATTRIBUTE, 6.48 WRITE ATTRIBUTE, 7.4 attributes)

_ATTR_HEADER = struct.Struct(">HBH")


class AttributeFormat(IntEnum):
    BINARY = 0
    ASCII = 1
    TEXT = 2


@dataclass(frozen=True, slots=True)
class Attribute:
    identifier: int
    format: int
    value: bytes
    read_only: bool = False

    def build(self) -> bytes:
        flags = (0x80 if self.read_only else 0) | (self.format & 0x03)
        return _ATTR_HEADER.pack(self.identifier, flags, len(self.value)) + self.value


def build_attribute_values(attrs: list[Attribute]) -> bytes:
    """READ ATTRIBUTE (ATTRIBUTE VALUES): AVAILABLE DATA (4 bytes) + attributes, in order."""
    body = b"".join(a.build() for a in attrs)
    return len(body).to_bytes(4, "big") + body


def build_attribute_list(identifiers: list[int]) -> bytes:
    """READ ATTRIBUTE (ATTRIBUTE LIST / SUPPORTED ATTRIBUTES): AVAILABLE DATA + 2-byte ids."""
    body = b"".join(i.to_bytes(2, "big") for i in identifiers)
    return len(body).to_bytes(4, "big") + body


def build_volume_list(first: int, count: int) -> bytes:
    """LOGICAL VOLUME LIST / PARTITION LIST: AVAILABLE DATA (2 bytes), first, number available."""
    return struct.pack(">HBB", 2, first, count)


def parse_attribute_list(data: bytes) -> list[Attribute]:
    """WRITE ATTRIBUTE parameter list: PARAMETER DATA LENGTH (4 bytes) + attributes.

    Raises ParameterListLengthError-style ILLEGAL REQUEST (26h/00h with the byte offset) when an
    attribute runs past the end of the list.
    """
    if len(data) < 4:
        raise ParameterListLengthError("WRITE ATTRIBUTE list shorter than its header")
    length = int.from_bytes(data[:4], "big")
    end = min(4 + length, len(data))
    out = []
    pos = 4
    while pos < end:
        if pos + 5 > end:
            raise InvalidFieldInParameterList("truncated attribute header", field_pointer=pos)
        ident, flags, n = _ATTR_HEADER.unpack_from(data, pos)
        if pos + 5 + n > end:
            raise InvalidFieldInParameterList(
                "attribute value past the list", field_pointer=pos + 3
            )
        out.append(Attribute(ident, flags & 0x03, bytes(data[pos + 5 : pos + 5 + n])))
        pos += 5 + n
    return out


class MamId(IntEnum):
    """Attribute identifiers this drive supplies or accepts (SPC-5 7.4.2 - 7.4.4)."""

    REMAINING_CAPACITY = 0x0000
    MAXIMUM_CAPACITY = 0x0001
    TAPEALERT_FLAGS = 0x0002
    LOAD_COUNT = 0x0003
    MAM_SPACE_REMAINING = 0x0004
    ASSIGNING_ORGANIZATION_DEVICE = 0x0005
    FORMATTED_DENSITY_CODE = 0x0006
    INITIALIZATION_COUNT = 0x0007
    DEVICE_AT_LAST_LOAD = 0x020A
    TOTAL_MB_WRITTEN = 0x0220
    TOTAL_MB_READ = 0x0221
    MEDIUM_MANUFACTURER = 0x0400
    MEDIUM_SERIAL_NUMBER = 0x0401
    MEDIUM_LENGTH = 0x0402
    MEDIUM_WIDTH = 0x0403
    ASSIGNING_ORGANIZATION_MEDIUM = 0x0404
    MEDIUM_DENSITY_CODE = 0x0405
    MEDIUM_MANUFACTURE_DATE = 0x0406
    MAM_CAPACITY = 0x0407
    MEDIUM_TYPE = 0x0408
    MEDIUM_TYPE_INFORMATION = 0x0409
    # host type attributes 0800h..0BFFh (writable), e.g.
    APPLICATION_VENDOR = 0x0800
    APPLICATION_NAME = 0x0801
    APPLICATION_VERSION = 0x0802
    USER_MEDIUM_TEXT_LABEL = 0x0803
    DATE_AND_TIME_LAST_WRITTEN = 0x0804
    TEXT_LOCALIZATION_IDENTIFIER = 0x0805
    BARCODE = 0x0806
    OWNING_HOST_TEXTUAL_NAME = 0x0807
    MEDIA_POOL = 0x0808
    APPLICATION_FORMAT_VERSION = 0x080B
    VOLUME_COHERENCY_INFORMATION = 0x080C


#: SPC-5 7.4.4 table: host attributes with a fixed format and maximum length.
HOST_ATTRIBUTE_RULES: dict[int, tuple[int, int]] = {
    MamId.APPLICATION_VENDOR: (AttributeFormat.ASCII, 8),
    MamId.APPLICATION_NAME: (AttributeFormat.ASCII, 32),
    MamId.APPLICATION_VERSION: (AttributeFormat.ASCII, 8),
    MamId.USER_MEDIUM_TEXT_LABEL: (AttributeFormat.TEXT, 160),
    MamId.DATE_AND_TIME_LAST_WRITTEN: (AttributeFormat.ASCII, 12),
    MamId.TEXT_LOCALIZATION_IDENTIFIER: (AttributeFormat.BINARY, 1),
    MamId.BARCODE: (AttributeFormat.ASCII, 32),
    MamId.OWNING_HOST_TEXTUAL_NAME: (AttributeFormat.TEXT, 80),
    MamId.MEDIA_POOL: (AttributeFormat.TEXT, 160),
    MamId.APPLICATION_FORMAT_VERSION: (AttributeFormat.ASCII, 16),
}


def host_attribute_writable(identifier: int) -> bool:
    """Host attributes (0800h..0BFFh) and vendor host attributes (1400h..17FFh) are writable."""
    return 0x0800 <= identifier <= 0x0BFF or 0x1400 <= identifier <= 0x17FF
