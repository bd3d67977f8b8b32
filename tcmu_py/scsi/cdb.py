"""Command descriptor blocks: length, and frozen dataclasses with ``parse(cdb)`` and ``build()``.

Every ``parse`` takes the CDB bytes (bytes, bytearray or memoryview, at least as long as
:func:`cdb_length` says), validates the fields the standard requires a device server to check and
raises :class:`~tcmu_py.scsi.sense.InvalidFieldInCdb` with the byte / bit pointer of the offending
field (SPC-5 4.4.5.2: the bit pointer names the most significant bit of the field).  Reserved bits
are *not* checked in general (SPC-5 4.2.2: recipients are not required to check them; old initiators
still put a LUN in byte 1 of 6-byte CDBs).  Checks that need device state (capacity, limits,
protection, ANC_SUP) are left to the caller; :meth:`RwCdb.check_range` does the capacity one.

``build()`` is the inverse: the CDB bytes of the fields, CONTROL 0, reserved bits 0.  It does not
validate (tests build malformed commands with it): a value wider than its field is cut to the
field's width, as it would be on the wire.  ``parse(x.build()) == x`` for every valid ``x``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Self

from tcmu_py.scsi.constants import SERVICE_ACTION_OPCODES, Opcode, ServiceAction
from tcmu_py.scsi.sense import InvalidFieldInCdb, LbaOutOfRange

Cdb = bytes | bytearray | memoryview

# Kernel include/scsi/scsi_common.h scsi_command_size_tbl: CDB length by opcode group (bits 7..5).
_GROUP_LENGTH = (6, 10, 10, 12, 16, 12, 10, 10)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# byte0 opcode | byte1 flags | LBA | TL | group   (shapes shared by the READ/WRITE family)
_RW10 = struct.Struct(">BBIBH")  # LBA 2..5, group 6, length 7..8
_RW12 = struct.Struct(">BBIIB")  # LBA 2..5, length 6..9, group 10
_RW16 = struct.Struct(">BBQIB")  # LBA 2..9, length 10..13, group 14
_CAW = struct.Struct(">BBQ3xBB")  # COMPARE AND WRITE: LBA 2..9, rsvd 10..12, NLB 13, group 14
# The same shapes with CONTROL, for build().
_RW10C = struct.Struct(">BBIBHB")
_RW12C = struct.Struct(">BBIIBB")
_RW16C = struct.Struct(">BBQIBB")
_CAWC = struct.Struct(">BBQ3xBBB")
_ALLOC6 = struct.Struct(">BBBHB")  # opcode, byte 1, byte 2, 16-bit length 3..4, CONTROL
_U8 = 0xFF
_M16 = 0xFFFF
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def cdb_length(cdb: Cdb) -> int:
    """Length of the CDB starting at ``cdb[0]``, computed as the kernel's ``scsi_command_size``.

    VARIABLE LENGTH (7Fh) CDBs are 8 + ADDITIONAL CDB LENGTH (byte 7) long (SPC-5 4.2.4); every
    other opcode's length comes from its group code (SPC-5 4.2.5.1 table 4): 6, 10, 10, 12, 16,
    12, and 10 for the vendor-specific groups 6 and 7, exactly as the kernel assumes.
    """
    opcode = cdb[0]
    if opcode == Opcode.VARIABLE_LENGTH:
        if len(cdb) < 8:
            raise ValueError("VARIABLE LENGTH CDB shorter than its 8-byte header")
        return 8 + cdb[7]
    return _GROUP_LENGTH[(opcode >> 5) & 7]


#: NACA, bit 2 of the CONTROL byte (SAM-5 5.2).
NACA = 0x04


def control_byte_index(cdb: Cdb) -> int:
    """Where the CONTROL byte of the CDB starting at ``cdb[0]`` is (SAM-5 5.2): the last byte of
    the length :func:`cdb_length` gives, except in a VARIABLE LENGTH (7Fh) CDB, which has it in
    byte 1 (SPC-5 4.2.4)."""
    if cdb[0] == Opcode.VARIABLE_LENGTH:
        return 1
    return cdb_length(cdb) - 1


def check_control_byte(cdb: Cdb) -> None:
    """Refuse a CDB whose CONTROL byte asks for NACA (normal ACA).

    tcmu-py's standard INQUIRY reports NORMACA 0 (SPC-5 6.7.2: the device server supports neither
    a NACA bit set to one nor the ACA task attribute), so a command with NACA set to one is
    terminated with CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB, the field pointer at
    the CONTROL byte and the bit pointer at bit 2 (SAM-5 5.2; SCST answers the same). The other
    CONTROL bits (vendor specific, reserved, the obsolete LINK) are not looked at. ``cdb`` is at
    least as long as its opcode requires (`tcmu_py.device.core.short_cdb`).
    """
    at = control_byte_index(cdb)
    if cdb[at] & NACA:
        raise _reject("NACA is not supported (NORMACA 0)", at, 2)


def service_action(cdb: Cdb) -> int | None:
    """SERVICE ACTION of the CDB (byte 1 bits 4..0, or bytes 8..9 of 7Fh), None if it has none."""
    opcode = cdb[0]
    if opcode == Opcode.VARIABLE_LENGTH:
        return _U16.unpack_from(cdb, 8)[0] if len(cdb) >= 10 else None
    if opcode in SERVICE_ACTION_OPCODES:
        return cdb[1] & 0x1F
    return None


def _check_length(cdb: Cdb, need: int) -> None:
    if len(cdb) < need:
        # A truncated CDB cannot come from the kernel; report it as a bad CDB rather than crash.
        raise InvalidFieldInCdb(f"CDB has {len(cdb)} bytes, opcode needs {need}", field_pointer=0)


def _reject(msg: str, byte: int, bit: int | None = None) -> InvalidFieldInCdb:
    return InvalidFieldInCdb(msg, field_pointer=byte, bit_pointer=bit)


# --- READ / WRITE family ----------------------------------------------------------------------

_READS = frozenset({Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16})
_WRITES = frozenset(
    {Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16, Opcode.ORWRITE_16}
)
_VERIFIES = frozenset({Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16})
_WRITE_VERIFIES = frozenset(
    {Opcode.WRITE_AND_VERIFY_10, Opcode.WRITE_AND_VERIFY_12, Opcode.WRITE_AND_VERIFY_16}
)
_PRE_FETCHES = frozenset({Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16})
_WRITE_SAMES = frozenset({Opcode.WRITE_SAME_10, Opcode.WRITE_SAME_16})
_TEN = frozenset(
    {
        Opcode.READ_10,
        Opcode.WRITE_10,
        Opcode.VERIFY_10,
        Opcode.WRITE_AND_VERIFY_10,
        Opcode.PRE_FETCH_10,
        Opcode.WRITE_SAME_10,
    }
)
_TWELVE = frozenset({Opcode.READ_12, Opcode.WRITE_12, Opcode.VERIFY_12, Opcode.WRITE_AND_VERIFY_12})
_SIXTEEN = frozenset(
    {
        Opcode.READ_16,
        Opcode.WRITE_16,
        Opcode.ORWRITE_16,
        Opcode.VERIFY_16,
        Opcode.WRITE_AND_VERIFY_16,
        Opcode.PRE_FETCH_16,
        Opcode.WRITE_SAME_16,
    }
)

#: Every opcode :func:`parse_rw` accepts.
RW_OPCODES: frozenset[int] = frozenset(
    {Opcode.READ_6, Opcode.WRITE_6, Opcode.COMPARE_AND_WRITE} | _TEN | _TWELVE | _SIXTEEN
)
#: Opcodes of the family that carry Data-Out (for COMPARE AND WRITE: verify + write data).
RW_DATA_OUT_OPCODES: frozenset[int] = frozenset(
    _WRITES | _WRITE_VERIFIES | _WRITE_SAMES | {Opcode.COMPARE_AND_WRITE}
)


@dataclass(frozen=True, slots=True)
class RwCdb:
    """The READ/WRITE family in one normalised form (SBC-4 5.3, 5.10, 5.11, 5.15-5.17, 5.40-5.52).

    ``transfer_length`` is in logical blocks: TRANSFER LENGTH, VERIFICATION LENGTH, PRE-FETCH
    LENGTH or NUMBER OF LOGICAL BLOCKS by opcode.  READ(6)/WRITE(6) length 0 is already turned into
    256; for WRITE SAME 0 means "to the last LBA" (SBC-4 5.50, subject to WSNZ) and is kept as 0.
    ``protect`` is RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT.  ``bytchk`` is only meaningful
    for VERIFY and WRITE AND VERIFY; ``unmap``/``anchor``/``ndob`` only for WRITE SAME; ``immed``
    only for PRE-FETCH.
    """

    opcode: int
    lba: int
    transfer_length: int
    fua: bool = False
    dpo: bool = False
    protect: int = 0
    bytchk: int = 0
    group: int = 0
    unmap: bool = False
    anchor: bool = False
    ndob: bool = False
    immed: bool = False

    @property
    def is_read(self) -> bool:
        return self.opcode in _READS

    @property
    def has_data_out(self) -> bool:
        """True if the command transfers Data-Out (ignoring BYTCHK=0 VERIFY and NDOB)."""
        if self.opcode in _VERIFIES:
            return self.bytchk != 0
        if self.opcode in _WRITE_SAMES:
            return not self.ndob
        return self.opcode in RW_DATA_OUT_OPCODES

    def check_range(self, num_blocks: int) -> None:
        """Raise LbaOutOfRange unless [lba, lba + transfer_length) lies within ``num_blocks``.

        SBC-4 4.5 / 5.15: LBA + TRANSFER LENGTH beyond the capacity is LOGICAL BLOCK ADDRESS OUT
        OF RANGE.  A zero-length transfer at LBA == capacity is accepted, as LIO does and as
        libiscsi expects for UNMAP (test_unmap_0blocks); one past it is rejected.
        """
        if self.lba + self.transfer_length > num_blocks:
            raise LbaOutOfRange(
                f"LBA {self.lba}+{self.transfer_length} beyond {num_blocks} blocks", info=self.lba
            )

    def build(self) -> bytes:
        """The CDB for ``opcode`` (byte 1 flags as :func:`parse_rw` reads them back)."""
        op, lba, length = self.opcode, self.lba, self.transfer_length
        if op in (Opcode.READ_6, Opcode.WRITE_6):
            # SBC-4 5.18/5.48: 21-bit LBA; 256 blocks is TRANSFER LENGTH 0.
            return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & _U8, lba & _U8, length & _U8, 0])
        flags = (self.protect & 7) << 5
        if op in _PRE_FETCHES:
            flags = 0x02 if self.immed else 0
        elif op in _WRITE_SAMES:
            flags |= (0x10 if self.anchor else 0) | (0x08 if self.unmap else 0)
            flags |= 0x01 if self.ndob else 0
        else:
            flags |= (0x10 if self.dpo else 0) | (0x08 if self.fua else 0)
            flags |= (self.bytchk & 3) << 1
        group = self.group & 0x3F
        if op == Opcode.COMPARE_AND_WRITE:
            return _CAWC.pack(op, flags, lba & _M64, length & _U8, group, 0)
        if op in _TEN:
            return _RW10C.pack(op, flags, lba & _M32, group, length & _M16, 0)
        if op in _TWELVE:
            return _RW12C.pack(op, flags, lba & _M32, length & _M32, group, 0)
        return _RW16C.pack(op, flags, lba & _M64, length & _M32, group, 0)


def parse_rw(cdb: Cdb, *, protection: bool = False) -> RwCdb:
    """Parse any opcode of :data:`RW_OPCODES` into a :class:`RwCdb`.

    ``protection`` says whether the logical unit is formatted with protection information; when it
    is not, a non-zero RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT is INVALID FIELD IN CDB (SBC-4 5.15
    table 52 and the matching tables of each command).  Raises ValueError for an opcode outside
    the family (a dispatch bug, not an initiator error).
    """
    opcode = cdb[0]
    if opcode not in RW_OPCODES:
        raise ValueError(f"opcode {opcode:02X}h is not in the READ/WRITE family")
    if opcode in (Opcode.READ_6, Opcode.WRITE_6):
        _check_length(cdb, 6)
        # SBC-4 5.18/5.48: 21-bit LBA; TRANSFER LENGTH 0 means 256 logical blocks.
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        return RwCdb(opcode, lba, cdb[4] or 256)

    flags = cdb[1]
    if opcode == Opcode.COMPARE_AND_WRITE:
        _check_length(cdb, 16)
        _, _, lba, nlb, group = _CAW.unpack_from(cdb)
        length = nlb
    elif opcode in _TEN:
        _check_length(cdb, 10)
        _, _, lba, group, length = _RW10.unpack_from(cdb)
    elif opcode in _TWELVE:
        _check_length(cdb, 12)
        _, _, lba, length, group = _RW12.unpack_from(cdb)
    else:
        _check_length(cdb, 16)
        _, _, lba, length, group = _RW16.unpack_from(cdb)
    group &= 0x3F

    protect = flags >> 5
    if opcode in _PRE_FETCHES:
        # SBC-4 5.11/5.12: byte 1 has IMMED only.
        return RwCdb(opcode, lba, length, group=group, immed=bool(flags & 0x02))
    if protect and not protection:
        # SBC-4 5.15 (and 5.3, 5.10, 5.40, 5.47, 5.50, 5.51): protection field set while the
        # logical unit has no protection information -> INVALID FIELD IN CDB.
        raise _reject("protection field set without protection information", 1, 7)
    if opcode in _WRITE_SAMES:
        ndob = opcode == Opcode.WRITE_SAME_16 and bool(flags & 0x01)
        if flags & 0x10 and not flags & 0x08:
            # SBC-4 5.50 (ANCHOR/UNMAP/ANC_SUP table): ANCHOR=1 with UNMAP=0 -> INVALID FIELD
            # IN CDB whatever ANC_SUP says; ANCHOR=1 UNMAP=1 needs ANC_SUP (the caller knows).
            raise _reject("ANCHOR without UNMAP", 1, 4)
        return RwCdb(
            opcode,
            lba,
            length,
            protect=protect,
            group=group,
            anchor=bool(flags & 0x10),
            unmap=bool(flags & 0x08),
            ndob=ndob,
        )
    dpo = bool(flags & 0x10)
    if opcode in _VERIFIES or opcode in _WRITE_VERIFIES:
        bytchk = (flags >> 1) & 0x03
        # SBC-4 5.40 table 99: VERIFY BYTCHK 10b is reserved; SBC-4 5.51 table 107: WRITE AND
        # VERIFY BYTCHK 10b and 11b are reserved -> INVALID FIELD IN CDB.
        if bytchk == 2 or (bytchk == 3 and opcode in _WRITE_VERIFIES):
            raise _reject(f"BYTCHK {bytchk:02b}b is reserved", 1, 2)
        return RwCdb(opcode, lba, length, dpo=dpo, protect=protect, bytchk=bytchk, group=group)
    return RwCdb(opcode, lba, length, fua=bool(flags & 0x08), dpo=dpo, protect=protect, group=group)


# --- other SBC commands -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynchronizeCache:
    """SYNCHRONIZE CACHE (10)/(16) (SBC-4 5.24/5.25); ``blocks`` 0 means through the last LBA."""

    opcode: int
    lba: int
    blocks: int
    immed: bool
    group: int = 0

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        if cdb[0] == Opcode.SYNCHRONIZE_CACHE_10:
            _check_length(cdb, 10)
            op, flags, lba, group, blocks = _RW10.unpack_from(cdb)
        elif cdb[0] == Opcode.SYNCHRONIZE_CACHE_16:
            _check_length(cdb, 16)
            op, flags, lba, blocks, group = _RW16.unpack_from(cdb)
        else:
            raise ValueError(f"opcode {cdb[0]:02X}h is not SYNCHRONIZE CACHE")
        return cls(op, lba, blocks, bool(flags & 0x02), group & 0x3F)

    def build(self) -> bytes:
        flags = 0x02 if self.immed else 0
        if self.opcode == Opcode.SYNCHRONIZE_CACHE_10:
            return _RW10C.pack(
                self.opcode, flags, self.lba & _M32, self.group, self.blocks & _M16, 0
            )
        return _RW16C.pack(self.opcode, flags, self.lba & _M64, self.blocks & _M32, self.group, 0)


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    """READ CAPACITY (10) (SBC-4 5.20)."""

    lba: int
    pmi: bool

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        lba = _U32.unpack_from(cdb, 2)[0]
        pmi = bool(cdb[8] & 0x01)
        if not pmi and lba:
            # SBC-4 5.20.1: PMI zero with a non-zero LOGICAL BLOCK ADDRESS -> INVALID FIELD IN CDB.
            raise _reject("LBA set without PMI", 2, 7)
        return cls(lba, pmi)

    def build(self) -> bytes:
        return struct.pack(">BxIxxBx", Opcode.READ_CAPACITY_10, self.lba & _M32, int(self.pmi))


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    """READ CAPACITY (16) (SBC-4 5.21), service action 10h of SERVICE ACTION IN (16)."""

    lba: int
    allocation_length: int
    pmi: bool

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 16)
        lba = _U64.unpack_from(cdb, 2)[0]
        alloc = _U32.unpack_from(cdb, 10)[0]
        pmi = bool(cdb[14] & 0x01)
        if not pmi and lba:
            # SBC-4 5.21.1: same rule as READ CAPACITY (10).
            raise _reject("LBA set without PMI", 2, 7)
        return cls(lba, alloc, pmi)

    def build(self) -> bytes:
        return struct.pack(
            ">BBQIBx",
            Opcode.SERVICE_ACTION_IN_16,
            ServiceAction.READ_CAPACITY_16,
            self.lba & _M64,
            self.allocation_length & _M32,
            int(self.pmi),
        )


@dataclass(frozen=True, slots=True)
class GetLbaStatus:
    """GET LBA STATUS (16) (SBC-4 5.8), service action 12h of SERVICE ACTION IN (16).

    ``report_type`` (byte 14 bits 1..0, SBC-4 r17+) selects which descriptors are returned;
    0 = all.
    """

    lba: int
    allocation_length: int
    report_type: int = 0

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 16)
        lba = _U64.unpack_from(cdb, 2)[0]
        alloc = _U32.unpack_from(cdb, 10)[0]
        return cls(lba, alloc, cdb[14] & 0x03)

    def build(self) -> bytes:
        return struct.pack(
            ">BBQIBx",
            Opcode.SERVICE_ACTION_IN_16,
            ServiceAction.GET_LBA_STATUS,
            self.lba & _M64,
            self.allocation_length & _M32,
            self.report_type & 0x03,
        )


@dataclass(frozen=True, slots=True)
class Unmap:
    """UNMAP (SBC-4 5.32); the parameter list is parsed by ``sbc.parse_unmap_parameters``."""

    anchor: bool
    group: int
    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        return cls(bool(cdb[1] & 0x01), cdb[6] & 0x3F, _U16.unpack_from(cdb, 7)[0])

    def build(self) -> bytes:
        return struct.pack(
            ">BB4xBHx",
            Opcode.UNMAP,
            int(self.anchor),
            self.group & 0x3F,
            self.parameter_list_length & _M16,
        )


@dataclass(frozen=True, slots=True)
class StartStopUnit:
    """START STOP UNIT (SBC-4 5.27)."""

    immed: bool
    power_condition_modifier: int
    power_condition: int
    no_flush: bool
    loej: bool
    start: bool

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        b4 = cdb[4]
        return cls(
            immed=bool(cdb[1] & 0x01),
            power_condition_modifier=cdb[3] & 0x0F,
            power_condition=b4 >> 4,
            no_flush=bool(b4 & 0x04),
            loej=bool(b4 & 0x02),
            start=bool(b4 & 0x01),
        )

    def build(self) -> bytes:
        b4 = (self.power_condition & 0x0F) << 4 | (0x04 if self.no_flush else 0)
        b4 |= (0x02 if self.loej else 0) | (0x01 if self.start else 0)
        pcm = self.power_condition_modifier & 0x0F
        return bytes([Opcode.START_STOP_UNIT, int(self.immed), 0, pcm, b4, 0])


@dataclass(frozen=True, slots=True)
class PreventAllow:
    """PREVENT ALLOW MEDIUM REMOVAL (SBC-4 5.13 / SSC-5 7.x / SMC-3 6.x); ``prevent`` 0..3."""

    prevent: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        return cls(cdb[4] & 0x03)

    def build(self) -> bytes:
        return bytes([Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, self.prevent & 0x03, 0])


@dataclass(frozen=True, slots=True)
class ReadDefectData:
    """READ DEFECT DATA (10) / (12) (SBC-4 5.19, 5.20); ``twelve`` tells which."""

    twelve: bool
    req_plist: bool
    req_glist: bool
    defect_list_format: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        if cdb[0] == Opcode.READ_DEFECT_DATA_10:
            _check_length(cdb, 10)
            flags, alloc, twelve = cdb[2], _U16.unpack_from(cdb, 7)[0], False
        elif cdb[0] == Opcode.READ_DEFECT_DATA_12:
            _check_length(cdb, 12)
            flags, alloc, twelve = cdb[1], _U32.unpack_from(cdb, 6)[0], True
        else:
            raise ValueError(f"opcode {cdb[0]:02X}h is not READ DEFECT DATA")
        return cls(twelve, bool(flags & 0x10), bool(flags & 0x08), flags & 0x07, alloc)

    def build(self) -> bytes:
        flags = (0x10 if self.req_plist else 0) | (0x08 if self.req_glist else 0)
        flags |= self.defect_list_format & 0x07
        if self.twelve:
            return struct.pack(
                ">BBxxxxIxB", Opcode.READ_DEFECT_DATA_12, flags, self.allocation_length & _M32, 0
            )
        return struct.pack(
            ">BxB4xHB", Opcode.READ_DEFECT_DATA_10, flags, self.allocation_length & _M16, 0
        )


@dataclass(frozen=True, slots=True)
class FormatUnit:
    """FORMAT UNIT (SBC-4 5.4): byte 1 FMTPINFO, LONGLIST, FMTDATA, CMPLST, DEFECT LIST FORMAT."""

    fmtpinfo: int
    longlist: bool
    fmtdata: bool
    cmplst: bool
    defect_list_format: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        b1 = cdb[1]
        return cls(b1 >> 6, bool(b1 & 0x20), bool(b1 & 0x10), bool(b1 & 0x08), b1 & 0x07)

    def build(self) -> bytes:
        b1 = (self.fmtpinfo & 3) << 6 | (0x20 if self.longlist else 0)
        b1 |= (0x10 if self.fmtdata else 0) | (0x08 if self.cmplst else 0)
        return bytes([Opcode.FORMAT_UNIT, b1 | self.defect_list_format & 0x07, 0, 0, 0, 0])


# --- SPC commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inquiry:
    """INQUIRY (SPC-5 6.7)."""

    evpd: bool
    page_code: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        evpd = bool(cdb[1] & 0x01)
        if cdb[1] & 0x02:
            # SPC-5 6.7.1: CMDDT is obsolete; a device server not supporting it rejects it.
            raise _reject("CMDDT is not supported", 1, 1)
        if not evpd and cdb[2]:
            # SPC-5 6.7.1: EVPD zero with a non-zero PAGE CODE -> INVALID FIELD IN CDB.
            raise _reject("PAGE CODE set without EVPD", 2, 7)
        return cls(evpd, cdb[2], _U16.unpack_from(cdb, 3)[0])

    def build(self) -> bytes:
        return _ALLOC6.pack(
            Opcode.INQUIRY, int(self.evpd), self.page_code & _U8, self.allocation_length & _M16, 0
        )


@dataclass(frozen=True, slots=True)
class RequestSense:
    """REQUEST SENSE (SPC-5 6.39)."""

    desc: bool
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        return cls(bool(cdb[1] & 0x01), cdb[4])

    def build(self) -> bytes:
        return bytes([Opcode.REQUEST_SENSE, int(self.desc), 0, 0, self.allocation_length & _U8, 0])


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE (6) and (10) (SPC-5 6.13, 6.14); ``ten`` tells which.

    ``pc``: 0 current, 1 changeable, 2 default, 3 saved (saved is refused by the mode page
    framework with SAVING PARAMETERS NOT SUPPORTED unless pages are saveable).
    """

    ten: bool
    dbd: bool
    llbaa: bool
    pc: int
    page_code: int
    subpage_code: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        if cdb[0] == Opcode.MODE_SENSE_6:
            _check_length(cdb, 6)
            ten, alloc, llbaa = False, cdb[4], False
        elif cdb[0] == Opcode.MODE_SENSE_10:
            _check_length(cdb, 10)
            ten, alloc, llbaa = True, _U16.unpack_from(cdb, 7)[0], bool(cdb[1] & 0x10)
        else:
            raise ValueError(f"opcode {cdb[0]:02X}h is not MODE SENSE")
        return cls(ten, bool(cdb[1] & 0x08), llbaa, cdb[2] >> 6, cdb[2] & 0x3F, cdb[3], alloc)

    def build(self) -> bytes:
        """MODE SENSE (10) when ``ten``, else (6) (which has no LLBAA: it is dropped)."""
        b2 = (self.pc & 3) << 6 | self.page_code & 0x3F
        flags = 0x08 if self.dbd else 0
        if self.ten:
            flags |= 0x10 if self.llbaa else 0
            return struct.pack(
                ">BBBB3xHB",
                Opcode.MODE_SENSE_10,
                flags,
                b2,
                self.subpage_code & _U8,
                self.allocation_length & _M16,
                0,
            )
        return bytes(
            [
                Opcode.MODE_SENSE_6,
                flags,
                b2,
                self.subpage_code & _U8,
                self.allocation_length & _U8,
                0,
            ]
        )


@dataclass(frozen=True, slots=True)
class ModeSelect:
    """MODE SELECT (6) and (10) (SPC-5 6.11, 6.12)."""

    ten: bool
    pf: bool
    sp: bool
    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        if cdb[0] == Opcode.MODE_SELECT_6:
            _check_length(cdb, 6)
            ten, length = False, cdb[4]
        elif cdb[0] == Opcode.MODE_SELECT_10:
            _check_length(cdb, 10)
            ten, length = True, _U16.unpack_from(cdb, 7)[0]
        else:
            raise ValueError(f"opcode {cdb[0]:02X}h is not MODE SELECT")
        return cls(ten, bool(cdb[1] & 0x10), bool(cdb[1] & 0x01), length)

    def build(self) -> bytes:
        flags = (0x10 if self.pf else 0) | (0x01 if self.sp else 0)
        if self.ten:
            return struct.pack(
                ">BB5xHB", Opcode.MODE_SELECT_10, flags, self.parameter_list_length & _M16, 0
            )
        return bytes([Opcode.MODE_SELECT_6, flags, 0, 0, self.parameter_list_length & _U8, 0])


@dataclass(frozen=True, slots=True)
class LogSense:
    """LOG SENSE (SPC-5 6.8)."""

    ppc: bool
    sp: bool
    pc: int
    page_code: int
    subpage: int
    parameter_pointer: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        return cls(
            ppc=bool(cdb[1] & 0x02),
            sp=bool(cdb[1] & 0x01),
            pc=cdb[2] >> 6,
            page_code=cdb[2] & 0x3F,
            subpage=cdb[3],
            parameter_pointer=_U16.unpack_from(cdb, 5)[0],
            allocation_length=_U16.unpack_from(cdb, 7)[0],
        )

    def build(self) -> bytes:
        # SPC-5 6.8: ten bytes; PARAMETER POINTER 5..6, ALLOCATION LENGTH 7..8.
        return struct.pack(
            ">BBBBxHHB",
            Opcode.LOG_SENSE,
            (0x02 if self.ppc else 0) | int(self.sp),
            (self.pc & 3) << 6 | self.page_code & 0x3F,
            self.subpage & _U8,
            self.parameter_pointer & _M16,
            self.allocation_length & _M16,
            0,
        )


@dataclass(frozen=True, slots=True)
class LogSelect:
    """LOG SELECT (SPC-5 6.6)."""

    pcr: bool
    sp: bool
    pc: int
    page_code: int
    subpage: int
    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 10)
        return cls(
            pcr=bool(cdb[1] & 0x02),
            sp=bool(cdb[1] & 0x01),
            pc=cdb[2] >> 6,
            page_code=cdb[2] & 0x3F,
            subpage=cdb[3],
            parameter_list_length=_U16.unpack_from(cdb, 7)[0],
        )

    def build(self) -> bytes:
        return struct.pack(
            ">BBBB3xHB",
            Opcode.LOG_SELECT,
            (0x02 if self.pcr else 0) | int(self.sp),
            (self.pc & 3) << 6 | self.page_code & 0x3F,
            self.subpage & _U8,
            self.parameter_list_length & _M16,
            0,
        )


@dataclass(frozen=True, slots=True)
class ReportSupportedOpcodes:
    """REPORT SUPPORTED OPERATION CODES (SPC-5 6.35), MAINTENANCE IN service action 0Ch.

    ``reporting_options``: 0 all commands, 1 one opcode without service action, 2 one opcode +
    service action, 3 one opcode with or without service action.
    """

    rctd: bool
    reporting_options: int
    requested_opcode: int
    requested_service_action: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        options = cdb[2] & 0x07
        if options > 3:
            # SPC-5 6.35.1 table 265: REPORTING OPTIONS 100b..111b are reserved.
            raise _reject(f"REPORTING OPTIONS {options:03b}b reserved", 2, 2)
        return cls(
            rctd=bool(cdb[2] & 0x80),
            reporting_options=options,
            requested_opcode=cdb[3],
            requested_service_action=_U16.unpack_from(cdb, 4)[0],
            allocation_length=_U32.unpack_from(cdb, 6)[0],
        )

    def build(self) -> bytes:
        return struct.pack(
            ">BBBBHIxB",
            Opcode.MAINTENANCE_IN,
            ServiceAction.REPORT_SUPPORTED_OPERATION_CODES,
            (0x80 if self.rctd else 0) | self.reporting_options & 0x07,
            self.requested_opcode & _U8,
            self.requested_service_action & _M16,
            self.allocation_length & _M32,
            0,
        )


@dataclass(frozen=True, slots=True)
class ReportSupportedTmf:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-5 6.36), MAINTENANCE IN 0Dh."""

    repd: bool
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        return cls(bool(cdb[2] & 0x80), _U32.unpack_from(cdb, 6)[0])

    def build(self) -> bytes:
        return struct.pack(
            ">BBB3xIxB",
            Opcode.MAINTENANCE_IN,
            ServiceAction.REPORT_SUPPORTED_TMF,
            0x80 if self.repd else 0,
            self.allocation_length & _M32,
            0,
        )


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS (SPC-5 6.33)."""

    select_report: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 12)
        return cls(cdb[2], _U32.unpack_from(cdb, 6)[0])

    def build(self) -> bytes:
        return struct.pack(
            ">BxB3xIxB",
            Opcode.REPORT_LUNS,
            self.select_report & _U8,
            self.allocation_length & _M32,
            0,
        )


@dataclass(frozen=True, slots=True)
class SendDiagnostic:
    """SEND DIAGNOSTIC (SPC-5 6.42)."""

    self_test_code: int
    pf: bool
    selftest: bool
    devoffl: bool
    unitoffl: bool
    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        b1 = cdb[1]
        code = b1 >> 5
        if b1 & 0x04 and code:
            # SPC-5 6.42: SELFTEST=1 with a non-zero SELF-TEST CODE -> INVALID FIELD IN CDB.
            raise _reject("SELF-TEST CODE with SELFTEST", 1, 7)
        return cls(
            code,
            bool(b1 & 0x10),
            bool(b1 & 0x04),
            bool(b1 & 0x02),
            bool(b1 & 0x01),
            _U16.unpack_from(cdb, 3)[0],
        )

    def build(self) -> bytes:
        b1 = (self.self_test_code & 7) << 5 | (0x10 if self.pf else 0)
        b1 |= (0x04 if self.selftest else 0) | (0x02 if self.devoffl else 0)
        b1 |= 0x01 if self.unitoffl else 0
        return _ALLOC6.pack(Opcode.SEND_DIAGNOSTIC, b1, 0, self.parameter_list_length & _M16, 0)


@dataclass(frozen=True, slots=True)
class ReceiveDiagnostic:
    """RECEIVE DIAGNOSTIC RESULTS (SPC-5 6.32)."""

    pcv: bool
    page_code: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 6)
        pcv = bool(cdb[1] & 0x01)
        if not pcv and cdb[2]:
            # SPC-5 6.32: PCV zero with a non-zero PAGE CODE -> INVALID FIELD IN CDB.
            raise _reject("PAGE CODE without PCV", 2, 7)
        return cls(pcv, cdb[2], _U16.unpack_from(cdb, 3)[0])

    def build(self) -> bytes:
        return _ALLOC6.pack(
            Opcode.RECEIVE_DIAGNOSTIC,
            int(self.pcv),
            self.page_code & _U8,
            self.allocation_length & _M16,
            0,
        )


# --- Copy offload -------------------------------------------------------------------------------

# 83h/84h: opcode | service action | 8 bytes (list id in byte 2 for 84h) | 32-bit length 10..13 |
# reserved | CONTROL.
_COPY16 = struct.Struct(">BBB7xIxB")


@dataclass(frozen=True, slots=True)
class ExtendedCopy:
    """EXTENDED COPY (LID1) (SPC-4 6.3): opcode 83h, service action 00h."""

    parameter_list_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 16)
        if cdb[1] & 0x1F:
            # SPC-4 6.3: only the LID1 service action (00h) is implemented here.
            raise _reject(f"service action {cdb[1] & 0x1F:#04x}", 1, 4)
        return cls(_U32.unpack_from(cdb, 10)[0])

    def build(self) -> bytes:
        return _COPY16.pack(Opcode.EXTENDED_COPY, 0, 0, self.parameter_list_length & _M32, 0)


@dataclass(frozen=True, slots=True)
class ReceiveCopyResults:
    """RECEIVE COPY RESULTS (SPC-4 6.18): opcode 84h; ``service_action`` 00h COPY STATUS,
    03h OPERATING PARAMETERS, 04h FAILED SEGMENT DETAILS (01h RECEIVE DATA is for held data,
    which no supported segment descriptor produces)."""

    service_action: int
    list_identifier: int
    allocation_length: int

    @classmethod
    def parse(cls, cdb: Cdb) -> Self:
        _check_length(cdb, 16)
        return cls(cdb[1] & 0x1F, cdb[2], _U32.unpack_from(cdb, 10)[0])

    def build(self) -> bytes:
        return _COPY16.pack(
            Opcode.RECEIVE_COPY_RESULTS,
            self.service_action & 0x1F,
            self.list_identifier & _U8,
            self.allocation_length & _M32,
            0,
        )
