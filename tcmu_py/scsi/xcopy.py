"""Copy offload wire formats: EXTENDED COPY (LID1) parameter lists, RECEIVE COPY RESULTS
answers and the Third-party Copy VPD page (8Fh). Pure: bytes in, frozen dataclasses out, no I/O.

Rules this module obeys:

* What it accepts is what the copy manager of `tcmu_py.device` executes: CSCD (target)
  descriptors of type E4h (identification descriptor) naming a direct-access logical unit by an
  NAA designator, and block-to-block segment descriptors (02h). Everything else is refused with
  the sense SPC-4 gives for it, before a byte is copied.
* Limits are a :class:`CopyLimits` value handed in by the caller; the same value builds the
  OPERATING PARAMETERS answer and VPD 8Fh, so the limits reported are the limits enforced.
* Field pointers name bytes of the parameter list (C/D 0), counted from its first byte.
* Checks are made in the order libiscsi's ExtendedCopy tests and LIO agree on: header and
  lengths (PARAMETER LIST LENGTH ERROR, including descriptor lists longer than the MAXIMUM
  DESCRIPTOR LIST LENGTH), then descriptor types, then descriptor counts, then fields.

Layouts (SPC-4):

* EXTENDED COPY (LID1) parameter list, 6.3.1 table 106: 16-byte header, CSCD descriptors,
  segment descriptors, inline data.
* Identification CSCD descriptor E4h, 6.3.6.2: 32 bytes; a designation descriptor (7.8.6.1) in
  bytes 4..27, the block device type specific parameters (6.3.6.4.1) in bytes 28..31.
* Block device to block device segment descriptor 02h, 6.3.7.5: 28 bytes.
* RECEIVE COPY RESULTS (SPC-4 6.18): COPY STATUS 00h (6.18.2), OPERATING PARAMETERS 03h (6.18.4),
  FAILED SEGMENT DETAILS 04h (6.18.5).
* Third-party Copy VPD page 8Fh, 7.8.17: third-party copy descriptors Supported Commands 0001h,
  Parameter Data 0004h, Supported Descriptors 0008h, Supported CSCD Descriptor IDs 000Ch,
  General Copy Operations 8001h.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Self

from tcmu_py.scsi.sense import (
    CopyTargetDeviceNotReachable,
    InlineDataLengthExceeded,
    InvalidFieldInParameterList,
    ParameterListLengthError,
    TooManySegmentDescriptors,
    TooManyTargetDescriptors,
    UnsupportedSegmentDescriptorTypeCode,
    UnsupportedTargetDescriptorTypeCode,
)

Buffer = bytes | bytearray | memoryview

#: Bytes of the EXTENDED COPY (LID1) parameter list header (SPC-4 6.3.1 table 106).
HEADER_LENGTH = 16
#: Bytes of an identification (E4h) CSCD descriptor, and of every descriptor E0h..E9h.
CSCD_LENGTH = 32
#: Bytes of a block-to-block (02h) segment descriptor, DESCRIPTOR LENGTH 0018h + 4.
B2B_LENGTH = 28

#: CSCD descriptor type code: identification descriptor (SPC-4 6.3.6.2).
CSCD_IDENTIFICATION = 0xE4
#: Segment descriptor type code: block device to block device (SPC-4 6.3.7.5).
SEGMENT_BLOCK_TO_BLOCK = 0x02

# SPC-4 6.3.1 table 106: list id | STR, LIST ID USAGE, PRIORITY | CSCD list length | 4 rsvd |
# segment list length | inline data length.
_HEADER = struct.Struct(">BBH4xII")
# SPC-4 6.3.6.2: type | LU ID TYPE, NUL, PERIPHERAL DEVICE TYPE | RELATIVE INITIATOR PORT ID |
# designation descriptor header (code set, association + designator type, rsvd, length).
_CSCD = struct.Struct(">BBHBBxB")
# SPC-4 6.3.7.5: type | DC, CAT | DESCRIPTOR LENGTH | source index | destination index | 2 rsvd |
# NUMBER OF BLOCKS | source LBA | destination LBA.
_B2B = struct.Struct(">BBHHH2xHQQ")
_SEG_HEADER = struct.Struct(">BBH")
# SPC-4 6.18.2 table 408: AVAILABLE DATA | HDD, COPY MANAGER STATUS | SEGMENTS PROCESSED |
# TRANSFER COUNT UNITS | TRANSFER COUNT.
_COPY_STATUS = struct.Struct(">IBHBI")
# SPC-4 6.18.4 table 412, bytes 0..43.
_OP_PARAMS = struct.Struct(">IB3xHHIIIII2xHBBBB3xB")
_TPC_DESC = struct.Struct(">HH")

#: Largest designator an identification descriptor holds (bytes 8..27).
_MAX_DESIGNATOR = 20


class ListIdUsage(IntEnum):
    """LIST ID USAGE (SPC-4 6.3.1 table 107)."""

    HOLD = 0b00  # list id in use; status held for RECEIVE COPY RESULTS
    RESERVED = 0b01
    NO_HOLD = 0b10  # list id in use while the copy runs; nothing held afterwards
    NONE = 0b11  # LIST IDENTIFIER unused (shall be zero)


class CopyManagerStatus(IntEnum):
    """COPY MANAGER STATUS of RECEIVE COPY RESULTS, COPY STATUS (SPC-4 6.18.2 table 409)."""

    IN_PROGRESS = 0x00
    COMPLETED = 0x01
    FAILED = 0x02


class CopyResultsAction(IntEnum):
    """RECEIVE COPY RESULTS service actions (SPC-4 6.18.1 table 407)."""

    COPY_STATUS = 0x00
    RECEIVE_DATA = 0x01
    OPERATING_PARAMETERS = 0x03
    FAILED_SEGMENT_DETAILS = 0x04


@dataclass(frozen=True, slots=True)
class CopyLimits:
    """What the copy manager accepts in one EXTENDED COPY; reported in OPERATING PARAMETERS
    (SPC-4 6.18.4) and VPD 8Fh (SPC-4 7.8.17), enforced by :func:`parse_parameter_list` and the
    device. ``max_segment_length`` is in bytes; ``data_segment_granularity`` is log2 bytes."""

    max_cscd_descriptors: int
    max_segment_descriptors: int
    max_descriptor_list_length: int
    max_segment_length: int
    max_inline_data_length: int = 0
    total_concurrent_copies: int = 1
    max_identified_concurrent_copies: int = 1
    data_segment_granularity: int = 9
    inline_data_granularity: int = 0


@dataclass(frozen=True, slots=True)
class ParameterHeader:
    """The 16-byte EXTENDED COPY (LID1) parameter list header (SPC-4 6.3.1)."""

    list_identifier: int
    str_: bool
    list_id_usage: int
    priority: int
    cscd_descriptor_list_length: int
    segment_descriptor_list_length: int
    inline_data_length: int

    @classmethod
    def parse(cls, data: Buffer) -> Self:
        if len(data) < HEADER_LENGTH:
            raise ParameterListLengthError(f"parameter list of {len(data)} bytes, header is 16")
        list_id, flags, tdll, sdll, inline = _HEADER.unpack_from(data)
        return cls(
            list_identifier=list_id,
            str_=bool(flags & 0x20),
            list_id_usage=(flags >> 3) & 0x03,
            priority=flags & 0x07,
            cscd_descriptor_list_length=tdll,
            segment_descriptor_list_length=sdll,
            inline_data_length=inline,
        )

    def build(self) -> bytes:
        flags = (0x20 if self.str_ else 0) | (self.list_id_usage & 3) << 3 | self.priority & 7
        return _HEADER.pack(
            self.list_identifier & 0xFF,
            flags,
            self.cscd_descriptor_list_length & 0xFFFF,
            self.segment_descriptor_list_length & 0xFFFFFFFF,
            self.inline_data_length & 0xFFFFFFFF,
        )


@dataclass(frozen=True, slots=True)
class IdentificationCscd:
    """Identification CSCD descriptor E4h (SPC-4 6.3.6.2) for a block device (peripheral device
    type 00h, type specific parameters of SPC-4 6.3.6.4.1).

    ``lu_id_type`` and ``nul`` are kept as sent: SPC-4 made LU ID TYPE reserved for this
    descriptor and NUL obsolete, so the copy manager ignores both (as libiscsi's
    ExtendedCopy.ValidTgtDescr expects of an SPC-4 device). ``designator`` is the designator
    value alone (DESIGNATOR LENGTH bytes)."""

    designator: bytes
    block_length: int
    code_set: int = 1  # binary
    association: int = 0  # logical unit
    designator_type: int = 3  # NAA
    piv: bool = False
    protocol_identifier: int = 0
    peripheral_type: int = 0
    lu_id_type: int = 0
    nul: bool = False
    relative_initiator_port: int = 0
    pad: bool = False

    def build(self) -> bytes:
        head = _CSCD.pack(
            CSCD_IDENTIFICATION,
            (self.lu_id_type & 3) << 6 | (0x20 if self.nul else 0) | self.peripheral_type & 0x1F,
            self.relative_initiator_port & 0xFFFF,
            (self.protocol_identifier & 0xF) << 4 | self.code_set & 0xF,
            (0x80 if self.piv else 0) | (self.association & 3) << 4 | self.designator_type & 0xF,
            len(self.designator),
        )
        body = self.designator[:_MAX_DESIGNATOR].ljust(_MAX_DESIGNATOR, b"\0")
        tail = bytes([0x04 if self.pad else 0]) + (self.block_length & 0xFFFFFF).to_bytes(3, "big")
        return head + body + tail


@dataclass(frozen=True, slots=True)
class BlockToBlockSegment:
    """Block device to block device segment descriptor 02h (SPC-4 6.3.7.5).

    ``dc`` 0: NUMBER OF BLOCKS counts source blocks; 1: destination blocks. ``cat`` is kept as
    sent (it only matters for residues, which equal block lengths never leave)."""

    source_index: int
    destination_index: int
    number_of_blocks: int
    source_lba: int
    destination_lba: int
    dc: bool = False
    cat: bool = False

    def build(self) -> bytes:
        return _B2B.pack(
            SEGMENT_BLOCK_TO_BLOCK,
            (0x02 if self.dc else 0) | (0x01 if self.cat else 0),
            B2B_LENGTH - 4,
            self.source_index & 0xFFFF,
            self.destination_index & 0xFFFF,
            self.number_of_blocks & 0xFFFF,
            self.source_lba & 0xFFFFFFFFFFFFFFFF,
            self.destination_lba & 0xFFFFFFFFFFFFFFFF,
        )


@dataclass(frozen=True, slots=True)
class ParameterList:
    """A parsed EXTENDED COPY (LID1) parameter list."""

    header: ParameterHeader
    cscds: tuple[IdentificationCscd, ...]
    segments: tuple[BlockToBlockSegment, ...]

    def cscd_offset(self, index: int) -> int:
        """Parameter list byte where CSCD descriptor ``index`` starts (for field pointers)."""
        return HEADER_LENGTH + index * CSCD_LENGTH

    def segment_offset(self, index: int) -> int:
        """Parameter list byte where segment descriptor ``index`` starts."""
        return HEADER_LENGTH + self.header.cscd_descriptor_list_length + index * B2B_LENGTH

    def build(self) -> bytes:
        """The parameter list; the header's lengths are recomputed from the descriptors."""
        cscds = b"".join(c.build() for c in self.cscds)
        segs = b"".join(s.build() for s in self.segments)
        h = self.header
        header = ParameterHeader(
            h.list_identifier, h.str_, h.list_id_usage, h.priority, len(cscds), len(segs), 0
        )
        return header.build() + cscds + segs


def _cscd_length(code: int) -> int | None:
    """Length of a CSCD descriptor by its type code (SPC-4 6.3.6.1 table 110), None if the
    type code is not one SPC-4 defines (its length cannot be known)."""
    if 0xE0 <= code <= 0xE9:
        return CSCD_LENGTH
    if code in (0xEA, 0xEB):  # IPv6, IP copy service
        return 64
    return None


def parse_parameter_list(data: Buffer, limits: CopyLimits) -> ParameterList | None:
    """Parse and check an EXTENDED COPY (LID1) parameter list of exactly ``len(data)`` bytes
    (the PARAMETER LIST LENGTH). None for an empty list: SPC-4 6.3.1, a PARAMETER LIST LENGTH of
    zero is not an error and no copy is made.

    Raises the ILLEGAL REQUEST of every malformed field, and COPY ABORTED / COPY TARGET DEVICE
    NOT REACHABLE for a segment naming a CSCD descriptor the list does not hold. Device-level
    checks (which logical unit a designator names, capacities, block lengths) are the caller's.
    """
    if not data:
        return None
    buf = bytes(data)
    header = ParameterHeader.parse(buf)
    if header.list_id_usage == ListIdUsage.RESERVED:
        # SPC-4 6.3.1 table 107: LIST ID USAGE 01b is reserved.
        raise InvalidFieldInParameterList("LIST ID USAGE 01b", field_pointer=1, bit_pointer=4)
    if header.list_id_usage == ListIdUsage.NONE and header.list_identifier:
        # SPC-4 6.3.1: LIST ID USAGE 11b requires a LIST IDENTIFIER of zero.
        raise InvalidFieldInParameterList("LIST IDENTIFIER with usage 11b", field_pointer=0)
    tdll = header.cscd_descriptor_list_length
    sdll = header.segment_descriptor_list_length
    inline = header.inline_data_length
    if inline > limits.max_inline_data_length:
        # SPC-4 6.3.1: INLINE DATA LENGTH above MAXIMUM INLINE DATA LENGTH.
        raise InlineDataLengthExceeded(f"inline data {inline}", field_pointer=12)
    if HEADER_LENGTH + tdll + sdll + inline > len(buf):
        # SPC-4 6.3.1: the lengths describe more than PARAMETER LIST LENGTH transferred.
        raise ParameterListLengthError(
            f"header describes {HEADER_LENGTH + tdll + sdll + inline} bytes, list has {len(buf)}"
        )
    if tdll + sdll > limits.max_descriptor_list_length:
        # SPC-4 6.3.1 / 6.18.4: the descriptor lists together exceed MAXIMUM DESCRIPTOR LIST
        # LENGTH (libiscsi ExtendedCopy.DescrLimits expects PARAMETER LIST LENGTH ERROR).
        raise ParameterListLengthError(f"descriptor lists of {tdll + sdll} bytes")
    cscd_starts = _walk_cscds(buf, tdll)
    seg_starts = _walk_segments(buf, HEADER_LENGTH + tdll, sdll)
    if len(cscd_starts) > limits.max_cscd_descriptors:
        # SPC-4 6.3.1: more CSCD descriptors than MAXIMUM CSCD DESCRIPTOR COUNT.
        raise TooManyTargetDescriptors(f"{len(cscd_starts)} CSCD descriptors", field_pointer=2)
    if len(seg_starts) > limits.max_segment_descriptors:
        # SPC-4 6.3.1: more segment descriptors than MAXIMUM SEGMENT DESCRIPTOR COUNT.
        raise TooManySegmentDescriptors(f"{len(seg_starts)} segment descriptors", field_pointer=8)
    cscds = tuple(_parse_cscd(buf, at) for at in cscd_starts)
    segments = tuple(_parse_segment(buf, at, len(cscds)) for at in seg_starts)
    return ParameterList(header, cscds, segments)


def _walk_cscds(buf: bytes, tdll: int) -> list[int]:
    starts = []
    at, end = HEADER_LENGTH, HEADER_LENGTH + tdll
    while at < end:
        length = _cscd_length(buf[at])
        if buf[at] != CSCD_IDENTIFICATION:
            # SPC-4 6.3.6.1: a CSCD descriptor type code the copy manager does not support.
            raise UnsupportedTargetDescriptorTypeCode(
                f"CSCD descriptor type {buf[at]:#04x}", field_pointer=at
            )
        assert length is not None
        if at + length > end:
            # SPC-4 6.3.1: CSCD DESCRIPTOR LIST LENGTH ends inside a descriptor.
            raise InvalidFieldInParameterList("CSCD DESCRIPTOR LIST LENGTH", field_pointer=2)
        starts.append(at)
        at += length
    return starts


def _walk_segments(buf: bytes, start: int, sdll: int) -> list[int]:
    starts = []
    at, end = start, start + sdll
    while at < end:
        if at + _SEG_HEADER.size > end:
            raise InvalidFieldInParameterList("SEGMENT DESCRIPTOR LIST LENGTH", field_pointer=8)
        code, _, length = _SEG_HEADER.unpack_from(buf, at)
        if code != SEGMENT_BLOCK_TO_BLOCK:
            # SPC-4 6.3.7.1: a segment descriptor type code the copy manager does not support.
            raise UnsupportedSegmentDescriptorTypeCode(
                f"segment descriptor type {code:#04x}", field_pointer=at
            )
        if length != B2B_LENGTH - 4:
            # SPC-4 6.3.7.5: DESCRIPTOR LENGTH of a block-to-block descriptor is 0018h.
            raise InvalidFieldInParameterList(f"DESCRIPTOR LENGTH {length}", field_pointer=at + 2)
        if at + B2B_LENGTH > end:
            raise InvalidFieldInParameterList("SEGMENT DESCRIPTOR LIST LENGTH", field_pointer=8)
        starts.append(at)
        at += B2B_LENGTH
    return starts


def _parse_cscd(buf: bytes, at: int) -> IdentificationCscd:
    _, b1, port, proto_code, assoc_type, dlen = _CSCD.unpack_from(buf, at)
    pdt = b1 & 0x1F
    if pdt != 0x00:
        # SPC-4 6.3.6.1: the copy manager copies between direct-access block devices only.
        raise InvalidFieldInParameterList(
            f"PERIPHERAL DEVICE TYPE {pdt:#04x}", field_pointer=at + 1, bit_pointer=4
        )
    code_set, assoc, dtype = proto_code & 0xF, (assoc_type >> 4) & 3, assoc_type & 0xF
    # SPC-4 6.3.6.2: the designation descriptor names the logical unit; the copy manager
    # resolves binary NAA designators of the logical unit (those VPD 83h reports).
    if code_set != 1:
        raise InvalidFieldInParameterList("CODE SET", field_pointer=at + 4, bit_pointer=3)
    if assoc != 0:
        raise InvalidFieldInParameterList("ASSOCIATION", field_pointer=at + 5, bit_pointer=5)
    if dtype != 3:
        raise InvalidFieldInParameterList("DESIGNATOR TYPE", field_pointer=at + 5, bit_pointer=3)
    if dlen not in (8, 16):
        # SPC-4 7.8.6.6: an NAA designator is 8 or 16 bytes (NAA 2, 3, 5 or 6).
        raise InvalidFieldInParameterList(f"DESIGNATOR LENGTH {dlen}", field_pointer=at + 7)
    pad_byte = buf[at + 28]
    return IdentificationCscd(
        designator=buf[at + 8 : at + 8 + dlen],
        block_length=int.from_bytes(buf[at + 29 : at + 32], "big"),
        code_set=code_set,
        association=assoc,
        designator_type=dtype,
        piv=bool(assoc_type & 0x80),
        protocol_identifier=proto_code >> 4,
        peripheral_type=pdt,
        lu_id_type=b1 >> 6,
        nul=bool(b1 & 0x20),
        relative_initiator_port=port,
        pad=bool(pad_byte & 0x04),
    )


def _parse_segment(buf: bytes, at: int, cscd_count: int) -> BlockToBlockSegment:
    _, flags, _, src, dst, blocks, src_lba, dst_lba = _B2B.unpack_from(buf, at)
    for index, where in ((src, at + 4), (dst, at + 6)):
        if index >= cscd_count:
            # SPC-4 6.3.7.1: the index names no CSCD descriptor of the list, so no copy target
            # can be addressed (LIO and libiscsi ExtendedCopy.ValidSegDescr: COPY ABORTED).
            raise CopyTargetDeviceNotReachable(
                f"CSCD descriptor index {index} of {cscd_count}", field_pointer=where, in_cdb=False
            )
    return BlockToBlockSegment(
        source_index=src,
        destination_index=dst,
        number_of_blocks=blocks,
        source_lba=src_lba,
        destination_lba=dst_lba,
        dc=bool(flags & 0x02),
        cat=bool(flags & 0x01),
    )


# --- RECEIVE COPY RESULTS -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CopyStatus:
    """RECEIVE COPY RESULTS, COPY STATUS parameter data (SPC-4 6.18.2).

    ``transfer_count`` is in bytes here; :meth:`build` picks TRANSFER COUNT UNITS (00h bytes,
    then 01h kibibytes, 02h mebibytes, ...) so it fits the 32-bit field, rounding down."""

    status: int
    segments_processed: int
    transfer_count: int
    hdd: bool = False

    def build(self) -> bytes:
        units, count = 0, self.transfer_count
        while count > 0xFFFFFFFF and units < 6:
            units, count = units + 1, count >> 10
        # SPC-4 6.18.2: AVAILABLE DATA = n - 3 = 8 for the 12-byte answer.
        return _COPY_STATUS.pack(
            8,
            (0x80 if self.hdd else 0) | self.status & 0x7F,
            min(self.segments_processed, 0xFFFF),
            units,
            min(count, 0xFFFFFFFF),
        )

    @classmethod
    def parse(cls, data: Buffer) -> Self:
        _, b4, segs, units, count = _COPY_STATUS.unpack_from(bytes(data))
        return cls(b4 & 0x7F, segs, count << (10 * units), bool(b4 & 0x80))


@dataclass(frozen=True, slots=True)
class OperatingParameters:
    """RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4)."""

    limits: CopyLimits
    implemented_descriptors: tuple[int, ...]
    snlid: bool = True
    held_data_limit: int = 0

    def build(self) -> bytes:
        lim = self.limits
        head = _OP_PARAMS.pack(
            0,  # AVAILABLE DATA, set below
            0x01 if self.snlid else 0,
            lim.max_cscd_descriptors,
            lim.max_segment_descriptors,
            lim.max_descriptor_list_length,
            lim.max_segment_length,
            lim.max_inline_data_length,
            self.held_data_limit,
            0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE: no stream devices
            lim.total_concurrent_copies,
            min(lim.max_identified_concurrent_copies, 0xFF),
            lim.data_segment_granularity,
            lim.inline_data_granularity,
            0,  # HELD DATA GRANULARITY
            len(self.implemented_descriptors),
        )
        data = head + bytes(self.implemented_descriptors)
        # SPC-4 6.18.4: AVAILABLE DATA = n - 3.
        return struct.pack(">I", len(data) - 4) + data[4:]

    @classmethod
    def parse(cls, data: Buffer) -> Self:
        buf = bytes(data)
        f = _OP_PARAMS.unpack_from(buf)
        limits = CopyLimits(
            max_cscd_descriptors=f[2],
            max_segment_descriptors=f[3],
            max_descriptor_list_length=f[4],
            max_segment_length=f[5],
            max_inline_data_length=f[6],
            total_concurrent_copies=f[9],
            max_identified_concurrent_copies=f[10],
            data_segment_granularity=f[11],
            inline_data_granularity=f[12],
        )
        codes = tuple(buf[_OP_PARAMS.size : _OP_PARAMS.size + f[14]])
        return cls(limits, codes, bool(f[1] & 1), f[7])


def build_failed_segment_details(copy_command_status: int, sense: bytes) -> bytes:
    """RECEIVE COPY RESULTS, FAILED SEGMENT DETAILS parameter data (SPC-4 6.18.5): 56 reserved
    bytes after AVAILABLE DATA, COPY COMMAND STATUS, SENSE DATA LENGTH and the sense data."""
    body = bytes(52) + struct.pack(">BxH", copy_command_status & 0xFF, len(sense)) + sense
    return struct.pack(">I", len(body)) + body


# --- VPD 8Fh ------------------------------------------------------------------------------------


def _tpc_descriptor(code: int, body: bytes) -> bytes:
    # SPC-4 7.8.17.1: each third-party copy descriptor is padded to a multiple of four bytes;
    # THIRD-PARTY COPY DESCRIPTOR LENGTH counts the bytes after itself.
    body = body + bytes(-(len(body) + 4) % 4)
    return _TPC_DESC.pack(code, len(body)) + body


def build_vpd_third_party_copy(
    peripheral_type: int,
    limits: CopyLimits,
    commands: Mapping[int, Sequence[int]],
    descriptor_types: Sequence[int],
) -> bytes:
    """Third-party Copy VPD page 8Fh (SPC-4 7.8.17) for a copy manager with ``limits``.

    ``commands``: opcode -> its supported service actions (Supported Commands, 7.8.17.3);
    ``descriptor_types``: the CSCD and segment descriptor type codes it accepts (Supported
    Descriptors, 7.8.17.6). Also carries Parameter Data (7.8.17.5), an empty Supported CSCD
    Descriptor IDs list (7.8.17.7: the LID1 list addresses CSCDs by index only) and General
    Copy Operations (7.8.17.9), the mandatory ones for an EXTENDED COPY(LID1) copy manager.
    """
    cmds = bytearray()
    for opcode, actions in commands.items():
        cmds += bytes([opcode, len(actions), *actions])
    body = _tpc_descriptor(0x0001, bytes([len(cmds)]) + cmds)
    body += _tpc_descriptor(
        0x0004,
        struct.pack(
            ">4xHHII",
            limits.max_cscd_descriptors,
            limits.max_segment_descriptors,
            limits.max_descriptor_list_length,
            limits.max_inline_data_length,
        )
        + bytes(12),
    )
    body += _tpc_descriptor(0x0008, bytes([len(descriptor_types), *descriptor_types]))
    body += _tpc_descriptor(0x000C, struct.pack(">H", 0))
    body += _tpc_descriptor(
        0x8001,
        struct.pack(
            ">IIIBB",
            limits.total_concurrent_copies,
            limits.max_identified_concurrent_copies,
            limits.max_segment_length,
            limits.data_segment_granularity,
            limits.inline_data_granularity,
        )
        + bytes(18),
    )
    # SPC-4 7.7.1: qualifier/type, page code, PAGE LENGTH.
    return struct.pack(">BBH", peripheral_type & 0x1F, 0x8F, len(body)) + body


def parse_vpd_third_party_copy(data: Buffer) -> dict[int, bytes]:
    """Third-party copy descriptor type -> its bytes after the 4-byte descriptor header, for
    each descriptor of a VPD 8Fh page (what libiscsi and sg_vpd walk)."""
    buf = bytes(data)
    end = 4 + struct.unpack_from(">H", buf, 2)[0]
    out: dict[int, bytes] = {}
    at = 4
    while at + 4 <= end:
        code, length = _TPC_DESC.unpack_from(buf, at)
        out[code] = buf[at + 4 : at + 4 + length]
        at += 4 + length
    return out


def parse_supported_commands(body: bytes) -> dict[int, tuple[int, ...]]:
    """Opcode -> service actions, from a Supported Commands descriptor's body (7.8.17.3)."""
    out: dict[int, tuple[int, ...]] = {}
    at, end = 1, 1 + body[0]
    while at + 2 <= end:
        n = body[at + 1]
        out[body[at]] = tuple(body[at + 2 : at + 2 + n])
        at += 2 + n
    return out
