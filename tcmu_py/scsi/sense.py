"""Sense data and the exceptions that carry it.

Theory of operation: any layer raises a :class:`ScsiError` subclass; the device core is the one
place that turns it into ``CHECK CONDITION`` plus ``exc.sense(descriptor=d_sense)``.  Each subclass
carries its sense key / ASC / ASCQ as class attributes (hyperframe style); per-instance details
(INFORMATION, field pointer, tape flags) are keyword arguments.

Formats (SPC-5 4.4):

* fixed, response code 70h, 18 bytes (4.4.3);
* descriptor, response code 72h: an 8-byte header followed by descriptors (4.4.2).  We emit the
  information descriptor 00h, the sense-key-specific descriptor 02h and the stream commands
  descriptor 04h, each only when it has something to say.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from tcmu_py.errors import TcmuError
from tcmu_py.scsi.constants import SenseKey, Status

FIXED_SENSE_LENGTH = 18
RESPONSE_FIXED_CURRENT = 0x70
RESPONSE_FIXED_DEFERRED = 0x71
RESPONSE_DESC_CURRENT = 0x72
RESPONSE_DESC_DEFERRED = 0x73

DESC_INFORMATION = 0x00
DESC_COMMAND_SPECIFIC = 0x01
DESC_SENSE_KEY_SPECIFIC = 0x02
DESC_STREAM_COMMANDS = 0x04

# SPC-5 4.4.3 table 46: fixed format sense data.
#   B code | B obsolete | B flags+key | I information | B add. length | I cmd-specific |
#   B asc | B ascq | B fru | 3s sense-key-specific
_FIXED = struct.Struct(">BBBIBIBBB3s")
# SPC-5 4.4.2 table 38: descriptor header (code, key, asc, ascq, sdat_ovfl, 2 rsvd, add. length).
_DESC_HEADER = struct.Struct(">BBBBB2xB")
# SPC-5 4.4.2.2 table 40: information descriptor (type, len=0Ah, VALID, reserved, 8-byte info).
_DESC_INFO = struct.Struct(">BBBxQ")
# SPC-5 4.4.2.3 table 42: command-specific information descriptor (type, len=0Ah, 2 rsvd, 8 bytes).
_DESC_CMD_SPECIFIC = struct.Struct(">BB2xQ")
# SPC-5 4.4.2.4 table 43: sense key specific descriptor (type, len=06h, 2 rsvd, 3 bytes, rsvd).
_DESC_SKS = struct.Struct(">BB2x3sx")
# SPC-5 4.4.2.6 / SSC-5 4.2.25: stream commands descriptor (type, len=02h, rsvd, flags).
_DESC_STREAM = struct.Struct(">BBxB")
_SKS_FIELD = struct.Struct(">BH")

_FILEMARK = 0x80
_EOM = 0x40
_ILI = 0x20
_VALID = 0x80
_SKSV = 0x80
_CD = 0x40
_BPV = 0x08


def _sense_key_specific(
    field_pointer: int | None, bit_pointer: int | None, in_cdb: bool, progress: int | None
) -> bytes | None:
    """The 3-byte SENSE KEY SPECIFIC field, or None when SKSV would be zero. Never raises: sense
    is built while a command is failing, and that answer must always go out."""
    if field_pointer is not None:
        # SPC-5 4.4.2.4.2: FIELD POINTER is two bytes. A byte beyond 65535 (a parameter
        # list over 64 KiB) cannot be pointed at: report the error without the pointer (SKSV
        # 0) rather than a pointer to some other byte.
        if not 0 <= field_pointer <= 0xFFFF:
            return None
        # SPC-5 4.4.2.4.2: SKSV, C/D (1 = CDB), BPV + BIT POINTER, FIELD POINTER.
        flags = _SKSV | (_CD if in_cdb else 0)
        if bit_pointer is not None and 0 <= bit_pointer <= 7:  # else BPV 0: no bit named
            flags |= _BPV | bit_pointer
        return _SKS_FIELD.pack(flags, field_pointer)
    if progress is not None:
        # SPC-5 4.4.2.4.4: progress indication, numerator over 65536 (held in range).
        return _SKS_FIELD.pack(_SKSV, min(max(progress, 0), 0xFFFF))
    return None


def build_fixed_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    info: int | None = None,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    in_cdb: bool = True,
    filemark: bool = False,
    eom: bool = False,
    ili: bool = False,
    command_specific: int | None = None,
    progress: int | None = None,
) -> bytes:
    """18 bytes of fixed-format current sense data (SPC-5 4.4.3).

    ``info`` may be negative (tape residues, SSC-5 4.2.25) and is stored as 32-bit two's complement;
    a value that does not fit in 32 bits leaves VALID zero (use descriptor format for 64-bit LBAs).
    ``field_pointer``/``bit_pointer``/``in_cdb`` fill the ILLEGAL REQUEST sense-key-specific field
    (left out when the pointer does not fit its 16 bits); ``progress`` (0..65535) fills the
    progress indication used with NOT READY / NO SENSE. Never raises for any integer argument.
    """
    code = RESPONSE_FIXED_CURRENT
    information = 0
    # SPC-5 4.4.3: VALID = 1 only when INFORMATION holds the value the command defines.
    if info is not None and -(1 << 31) <= info <= 0xFFFFFFFF:
        code |= _VALID
        information = info & 0xFFFFFFFF
    flags = (key & 0x0F) | (_FILEMARK if filemark else 0) | (_EOM if eom else 0)
    flags |= _ILI if ili else 0
    sks = _sense_key_specific(field_pointer, bit_pointer, in_cdb, progress) or b"\x00\x00\x00"
    cmd_specific = (command_specific or 0) & 0xFFFFFFFF
    # SPC-5 4.4.3: ADDITIONAL SENSE LENGTH = n - 7 = 10 for the 18-byte form.
    return _FIXED.pack(
        code,
        0,
        flags,
        information,
        FIXED_SENSE_LENGTH - 8,
        cmd_specific,
        asc & 0xFF,
        ascq & 0xFF,
        0,
        sks,
    )


def build_descriptor_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    info: int | None = None,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    in_cdb: bool = True,
    filemark: bool = False,
    eom: bool = False,
    ili: bool = False,
    command_specific: int | None = None,
    progress: int | None = None,
) -> bytes:
    """Descriptor-format current sense data (SPC-5 4.4.2), response code 72h.

    Same keywords as :func:`build_fixed_sense`; ``info`` is stored as 64-bit two's complement in an
    information descriptor, tape flags go to a stream commands descriptor (only if one is set).
    """
    descriptors = bytearray()
    if info is not None:
        # SPC-5 4.4.2.2: the VALID bit of the information descriptor shall be set to one.
        descriptors += _DESC_INFO.pack(DESC_INFORMATION, 0x0A, _VALID, info & (2**64 - 1))
    if command_specific is not None:
        descriptors += _DESC_CMD_SPECIFIC.pack(
            DESC_COMMAND_SPECIFIC, 0x0A, command_specific & (2**64 - 1)
        )
    sks = _sense_key_specific(field_pointer, bit_pointer, in_cdb, progress)
    if sks is not None:
        descriptors += _DESC_SKS.pack(DESC_SENSE_KEY_SPECIFIC, 0x06, sks)
    if filemark or eom or ili:
        stream = (_FILEMARK if filemark else 0) | (_EOM if eom else 0) | (_ILI if ili else 0)
        descriptors += _DESC_STREAM.pack(DESC_STREAM_COMMANDS, 0x02, stream)
    header = _DESC_HEADER.pack(
        RESPONSE_DESC_CURRENT, key & 0x0F, asc & 0xFF, ascq & 0xFF, 0, len(descriptors)
    )
    return header + bytes(descriptors)


@dataclass(frozen=True, slots=True)
class SenseData:
    """Decoded sense data of either format (what :func:`parse_sense` returns).

    ``info`` is the raw unsigned INFORMATION value (None when not valid / absent); ``info_signed``
    interprets it as two's complement of the field's width (32 bits fixed, 64 bits descriptor).
    """

    response_code: int
    sense_key: int
    asc: int
    ascq: int
    info: int | None = None
    filemark: bool = False
    eom: bool = False
    ili: bool = False
    field_pointer: int | None = None
    bit_pointer: int | None = None
    in_cdb: bool | None = None
    progress: int | None = None
    command_specific: int | None = None

    @property
    def descriptor(self) -> bool:
        return self.response_code in (RESPONSE_DESC_CURRENT, RESPONSE_DESC_DEFERRED)

    @property
    def deferred(self) -> bool:
        return self.response_code in (RESPONSE_FIXED_DEFERRED, RESPONSE_DESC_DEFERRED)

    @property
    def info_signed(self) -> int | None:
        if self.info is None:
            return None
        bits = 64 if self.descriptor else 32
        return self.info - (1 << bits) if self.info >> (bits - 1) else self.info


def _decode_sks(key: int, raw: bytes) -> dict[str, object]:
    flags, value = _SKS_FIELD.unpack(raw)
    if not flags & _SKSV:
        return {}
    if key == SenseKey.ILLEGAL_REQUEST:
        return {
            "field_pointer": value,
            "in_cdb": bool(flags & _CD),
            "bit_pointer": (flags & 0x07) if flags & _BPV else None,
        }
    if key in (SenseKey.NOT_READY, SenseKey.NO_SENSE):
        return {"progress": value}
    return {}


def parse_sense(data: bytes | bytearray | memoryview) -> SenseData:
    """Decode fixed (70h/71h) or descriptor (72h/73h) sense data; raises ValueError if malformed.

    Truncated fixed-format data is accepted down to 14 bytes (through ASCQ), as SPC-5 4.4.3 lets an
    application client request fewer bytes.
    """
    buf = bytes(data)
    if not buf:
        raise ValueError("empty sense data")
    code = buf[0] & 0x7F
    if code in (RESPONSE_FIXED_CURRENT, RESPONSE_FIXED_DEFERRED):
        if len(buf) < 14:
            raise ValueError(f"fixed sense data too short ({len(buf)} bytes)")
        padded = buf[:FIXED_SENSE_LENGTH].ljust(FIXED_SENSE_LENGTH, b"\x00")
        _, _, flags, information, _, cmd_spec, asc, ascq, _, sks = _FIXED.unpack(padded)
        key = flags & 0x0F
        return SenseData(
            response_code=code,
            sense_key=key,
            asc=asc,
            ascq=ascq,
            info=information if buf[0] & _VALID else None,
            filemark=bool(flags & _FILEMARK),
            eom=bool(flags & _EOM),
            ili=bool(flags & _ILI),
            command_specific=cmd_spec or None,
            **_decode_sks(key, sks),  # type: ignore[arg-type]
        )
    if code in (RESPONSE_DESC_CURRENT, RESPONSE_DESC_DEFERRED):
        if len(buf) < 8:
            raise ValueError(f"descriptor sense data too short ({len(buf)} bytes)")
        _, key_byte, asc, ascq, _, add_len = _DESC_HEADER.unpack_from(buf)
        key = key_byte & 0x0F
        end = min(len(buf), 8 + add_len)
        fields: dict[str, object] = {}
        pos = 8
        while pos + 2 <= end:
            dtype, dlen = buf[pos], buf[pos + 1]
            body = buf[pos : pos + 2 + dlen]
            if len(body) < 2 + dlen:
                raise ValueError(f"sense descriptor {dtype:02X}h truncated")
            if dtype == DESC_INFORMATION and dlen >= 0x0A:
                _, _, valid, information = _DESC_INFO.unpack_from(body)
                if valid & _VALID:
                    fields["info"] = information
            elif dtype == DESC_COMMAND_SPECIFIC and dlen >= 0x0A:
                fields["command_specific"] = _DESC_CMD_SPECIFIC.unpack_from(body)[2]
            elif dtype == DESC_SENSE_KEY_SPECIFIC and dlen >= 0x06:
                fields.update(_decode_sks(key, _DESC_SKS.unpack_from(body)[2]))
            elif dtype == DESC_STREAM_COMMANDS and dlen >= 0x02:
                stream = body[3]
                fields["filemark"] = bool(stream & _FILEMARK)
                fields["eom"] = bool(stream & _EOM)
                fields["ili"] = bool(stream & _ILI)
            pos += 2 + dlen
        return SenseData(code, key, asc, ascq, **fields)  # type: ignore[arg-type]
    raise ValueError(f"unknown sense response code {code:02X}h")


#: Names of the additional sense codes tcmu-py reports (SPC-5 4.4.9 table 63), for logs.
ASC_NAMES: dict[tuple[int, int], str] = {
    (0x00, 0x00): "NO ADDITIONAL SENSE INFORMATION",
    (0x00, 0x01): "FILEMARK DETECTED",
    (0x00, 0x02): "END-OF-PARTITION/MEDIUM DETECTED",
    (0x00, 0x04): "BEGINNING-OF-PARTITION/MEDIUM DETECTED",
    (0x00, 0x05): "END-OF-DATA DETECTED",
    (0x04, 0x00): "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE",
    (0x04, 0x01): "LOGICAL UNIT IS IN PROCESS OF BECOMING READY",
    (0x04, 0x02): "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED",
    (0x04, 0x03): "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED",
    (0x00, 0x16): "OPERATION IN PROGRESS",
    (0x0C, 0x00): "WRITE ERROR",
    (0x0D, 0x02): "COPY TARGET DEVICE NOT REACHABLE",
    (0x0E, 0x03): "INVALID FIELD IN COMMAND INFORMATION UNIT",
    (0x11, 0x00): "UNRECOVERED READ ERROR",
    (0x1A, 0x00): "PARAMETER LIST LENGTH ERROR",
    (0x1D, 0x00): "MISCOMPARE DURING VERIFY OPERATION",
    (0x20, 0x00): "INVALID COMMAND OPERATION CODE",
    (0x21, 0x00): "LOGICAL BLOCK ADDRESS OUT OF RANGE",
    (0x21, 0x01): "INVALID ELEMENT ADDRESS",
    (0x24, 0x00): "INVALID FIELD IN CDB",
    (0x25, 0x00): "LOGICAL UNIT NOT SUPPORTED",
    (0x26, 0x00): "INVALID FIELD IN PARAMETER LIST",
    (0x26, 0x02): "PARAMETER VALUE INVALID",
    (0x26, 0x06): "TOO MANY TARGET DESCRIPTORS",
    (0x26, 0x07): "UNSUPPORTED TARGET DESCRIPTOR TYPE CODE",
    (0x26, 0x08): "TOO MANY SEGMENT DESCRIPTORS",
    (0x26, 0x09): "UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE",
    (0x26, 0x0B): "INLINE DATA LENGTH EXCEEDED",
    (0x27, 0x00): "WRITE PROTECTED",
    (0x27, 0x07): "SPACE ALLOCATION FAILED WRITE PROTECT",
    (0x28, 0x00): "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED",
    (0x28, 0x01): "IMPORT OR EXPORT ELEMENT ACCESSED",
    (0x29, 0x00): "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED",
    (0x2A, 0x01): "MODE PARAMETERS CHANGED",
    (0x2A, 0x09): "CAPACITY DATA HAS CHANGED",
    (0x2C, 0x00): "COMMAND SEQUENCE ERROR",
    (0x30, 0x00): "INCOMPATIBLE MEDIUM INSTALLED",
    (0x30, 0x01): "CANNOT READ MEDIUM - UNKNOWN FORMAT",
    (0x30, 0x02): "CANNOT READ MEDIUM - INCOMPATIBLE FORMAT",
    (0x30, 0x03): "CLEANING CARTRIDGE INSTALLED",
    (0x30, 0x05): "CANNOT WRITE MEDIUM - INCOMPATIBLE FORMAT",
    (0x30, 0x0C): "WORM MEDIUM - OVERWRITE ATTEMPTED",
    (0x37, 0x00): "ROUNDED PARAMETER",
    (0x38, 0x07): "THIN PROVISIONING SOFT THRESHOLD REACHED",
    (0x39, 0x00): "SAVING PARAMETERS NOT SUPPORTED",
    (0x3A, 0x00): "MEDIUM NOT PRESENT",
    (0x3A, 0x02): "MEDIUM NOT PRESENT - TRAY OPEN",
    (0x3B, 0x00): "SEQUENTIAL POSITIONING ERROR",
    (0x3B, 0x0C): "POSITION PAST BEGINNING OF MEDIUM",
    (0x3B, 0x0D): "MEDIUM DESTINATION ELEMENT FULL",
    (0x3B, 0x0E): "MEDIUM SOURCE ELEMENT EMPTY",
    (0x3F, 0x03): "INQUIRY DATA HAS CHANGED",
    (0x3F, 0x0E): "REPORTED LUNS DATA HAS CHANGED",
    (0x44, 0x00): "INTERNAL TARGET FAILURE",
    (0x53, 0x02): "MEDIUM REMOVAL PREVENTED",
    (0x55, 0x03): "INSUFFICIENT RESOURCES",
    (0x55, 0x06): "AUXILIARY MEMORY OUT OF SPACE",
}


def describe_sense(data: bytes | bytearray | memoryview) -> str:
    """One-line human description of sense data for logs; never raises."""
    try:
        sd = parse_sense(data)
    except ValueError as exc:
        return f"malformed sense data ({exc})"
    try:
        key = SenseKey(sd.sense_key).name.replace("_", " ")
    except ValueError:
        key = f"SENSE KEY {sd.sense_key:X}h"
    text = ASC_NAMES.get((sd.asc, sd.ascq), "")
    out = f"{key}: {text} ({sd.sense_key:X}h/{sd.asc:02X}h/{sd.ascq:02X}h)".replace(":  (", " (")
    if sd.field_pointer is not None:
        where = "CDB" if sd.in_cdb else "parameter list"
        bit = "" if sd.bit_pointer is None else f" bit {sd.bit_pointer}"
        out += f" at {where} byte {sd.field_pointer}{bit}"
    if sd.info is not None:
        out += f" info={sd.info_signed}"
    flags = [n for n, v in (("FILEMARK", sd.filemark), ("EOM", sd.eom), ("ILI", sd.ili)) if v]
    if flags:
        out += " " + "+".join(flags)
    return out


class ScsiError(TcmuError):
    """A command failed with CHECK CONDITION; the class attributes give the sense codes.

    The base class stands for 04h/44h/00h INTERNAL TARGET FAILURE.  ``sense_key``/``asc``/``ascq``
    keywords override the class codes for one instance (for codes without a subclass).
    ``transferred`` is the number of Data-In bytes that are valid despite the error (TCMU READ_LEN),
    used by tape short reads; None means no data. ``command_specific`` fills the COMMAND-SPECIFIC
    INFORMATION field (SPC-5 4.4.2.3 / 4.4.3; None: zero in fixed format, no descriptor in
    descriptor format), e.g. the number of the failing segment of an EXTENDED COPY.
    """

    status: ClassVar[int] = Status.CHECK_CONDITION
    sense_key: int = SenseKey.HARDWARE_ERROR
    asc: int = 0x44
    ascq: int = 0x00

    def __init__(
        self,
        msg: str = "",
        *,
        sense_key: int | None = None,
        asc: int | None = None,
        ascq: int | None = None,
        info: int | None = None,
        field_pointer: int | None = None,
        bit_pointer: int | None = None,
        in_cdb: bool = True,
        filemark: bool = False,
        eom: bool = False,
        ili: bool = False,
        transferred: int | None = None,
        command_specific: int | None = None,
    ) -> None:
        super().__init__(msg or type(self).__name__)
        if sense_key is not None:
            self.sense_key = sense_key
        if asc is not None:
            self.asc = asc
        if ascq is not None:
            self.ascq = ascq
        self.info = info
        self.field_pointer = field_pointer
        self.bit_pointer = bit_pointer
        self.in_cdb = in_cdb
        self.filemark = filemark
        self.eom = eom
        self.ili = ili
        self.transferred = transferred
        self.command_specific = command_specific

    def sense(self, descriptor: bool = False) -> bytes:
        """Sense data for this error: fixed 70h, or descriptor 72h when D_SENSE is set."""
        build = build_descriptor_sense if descriptor else build_fixed_sense
        return build(
            self.sense_key,
            self.asc,
            self.ascq,
            info=self.info,
            field_pointer=self.field_pointer,
            bit_pointer=self.bit_pointer,
            in_cdb=self.in_cdb,
            filemark=self.filemark,
            eom=self.eom,
            ili=self.ili,
            command_specific=self.command_specific,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.args[0]!r}, key={self.sense_key:X}h, "
            f"asc={self.asc:02X}h, ascq={self.ascq:02X}h)"
        )


# --- ILLEGAL REQUEST ------------------------------------------------------------------------


class IllegalRequest(ScsiError):
    sense_key = SenseKey.ILLEGAL_REQUEST
    asc, ascq = 0x20, 0x00


class InvalidOpcode(IllegalRequest):
    """05h/20h/00h INVALID COMMAND OPERATION CODE."""

    asc, ascq = 0x20, 0x00


class InvalidFieldInCommandIu(IllegalRequest):
    """05h/0Eh/03h INVALID FIELD IN COMMAND INFORMATION UNIT: the transport's data length does
    not match what the CDB transfers (FCP-4 9.4.2 b; LIO's answer to a WRITE over/underflow)."""

    asc, ascq = 0x0E, 0x03


class LbaOutOfRange(IllegalRequest):
    """05h/21h/00h LOGICAL BLOCK ADDRESS OUT OF RANGE."""

    asc, ascq = 0x21, 0x00


class InvalidFieldInCdb(IllegalRequest):
    """05h/24h/00h INVALID FIELD IN CDB; pass ``field_pointer`` (byte) and ``bit_pointer``."""

    asc, ascq = 0x24, 0x00


class LogicalUnitNotSupported(IllegalRequest):
    """05h/25h/00h LOGICAL UNIT NOT SUPPORTED."""

    asc, ascq = 0x25, 0x00


class InvalidFieldInParameterList(IllegalRequest):
    """05h/26h/00h INVALID FIELD IN PARAMETER LIST; ``in_cdb=False`` is implied."""

    asc, ascq = 0x26, 0x00

    def __init__(self, msg: str = "", **kwargs: object) -> None:
        kwargs.setdefault("in_cdb", False)
        super().__init__(msg, **kwargs)  # type: ignore[arg-type]


class ParameterListLengthError(IllegalRequest):
    """05h/1Ah/00h PARAMETER LIST LENGTH ERROR."""

    asc, ascq = 0x1A, 0x00


class CommandSequenceError(IllegalRequest):
    """05h/2Ch/00h COMMAND SEQUENCE ERROR."""

    asc, ascq = 0x2C, 0x00


class SavingParametersNotSupported(IllegalRequest):
    """05h/39h/00h SAVING PARAMETERS NOT SUPPORTED (SP=1 without saveable pages)."""

    asc, ascq = 0x39, 0x00


class PositionPastBeginningOfMedium(IllegalRequest):
    """05h/3Bh/0Ch POSITION PAST BEGINNING OF MEDIUM (SSC-5: FORMAT MEDIUM away from BOP 0)."""

    asc, ascq = 0x3B, 0x0C


class MediumDestinationElementFull(IllegalRequest):
    """05h/3Bh/0Dh MEDIUM DESTINATION ELEMENT FULL (SMC)."""

    asc, ascq = 0x3B, 0x0D


class MediumSourceElementEmpty(IllegalRequest):
    """05h/3Bh/0Eh MEDIUM SOURCE ELEMENT EMPTY (SMC)."""

    asc, ascq = 0x3B, 0x0E


class InvalidElementAddress(IllegalRequest):
    """05h/21h/01h INVALID ELEMENT ADDRESS (SMC-3: no such element, or not of the needed type)."""

    asc, ascq = 0x21, 0x01


class MediumRemovalPrevented(IllegalRequest):
    """05h/53h/02h MEDIUM REMOVAL PREVENTED (a drive or the changer's PREVENT is in effect)."""

    asc, ascq = 0x53, 0x02


class ParameterValueInvalid(IllegalRequest):
    """05h/26h/02h PARAMETER VALUE INVALID."""

    asc, ascq = 0x26, 0x02


class _ParameterListError(IllegalRequest):
    """Base of the errors found in a parameter list: ``in_cdb=False`` is implied, so a
    ``field_pointer`` names a byte of the parameter list (SPC-5 4.4.2.4.2, C/D 0)."""

    def __init__(self, msg: str = "", **kwargs: object) -> None:
        kwargs.setdefault("in_cdb", False)
        super().__init__(msg, **kwargs)  # type: ignore[arg-type]


class TooManyTargetDescriptors(_ParameterListError):
    """05h/26h/06h TOO MANY TARGET DESCRIPTORS: more CSCD descriptors than the copy manager's
    MAXIMUM CSCD DESCRIPTOR COUNT (SPC-4 6.3.1)."""

    asc, ascq = 0x26, 0x06


class UnsupportedTargetDescriptorTypeCode(_ParameterListError):
    """05h/26h/07h UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (SPC-4 6.3.6.1)."""

    asc, ascq = 0x26, 0x07


class TooManySegmentDescriptors(_ParameterListError):
    """05h/26h/08h TOO MANY SEGMENT DESCRIPTORS: more than MAXIMUM SEGMENT DESCRIPTOR COUNT
    (SPC-4 6.3.1)."""

    asc, ascq = 0x26, 0x08


class UnsupportedSegmentDescriptorTypeCode(_ParameterListError):
    """05h/26h/09h UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (SPC-4 6.3.7.1)."""

    asc, ascq = 0x26, 0x09


class InlineDataLengthExceeded(_ParameterListError):
    """05h/26h/0Bh INLINE DATA LENGTH EXCEEDED: INLINE DATA LENGTH above the MAXIMUM INLINE
    DATA LENGTH the copy manager reports (SPC-4 6.3.1)."""

    asc, ascq = 0x26, 0x0B


class OperationInProgress(IllegalRequest):
    """05h/00h/16h OPERATION IN PROGRESS: an EXTENDED COPY names a LIST IDENTIFIER that a copy
    still running uses (SPC-4 6.3.1)."""

    asc, ascq = 0x00, 0x16


class InsufficientResources(IllegalRequest):
    """05h/55h/03h INSUFFICIENT RESOURCES: more concurrent copies than the copy manager reports
    it runs (SPC-4 6.3.1)."""

    asc, ascq = 0x55, 0x03


class AuxiliaryMemoryOutOfSpace(IllegalRequest):
    """05h/55h/06h AUXILIARY MEMORY OUT OF SPACE (WRITE ATTRIBUTE, SPC-5 6.47)."""

    asc, ascq = 0x55, 0x06


# --- RECOVERED ERROR ------------------------------------------------------------------------


class RoundedParameter(ScsiError):
    """01h/37h/00h ROUNDED PARAMETER (SPC-5 5.9): the command was done with a parameter the
    device rounded to a value it can hold (MODE SELECT then reports the rounded value)."""

    sense_key = SenseKey.RECOVERED_ERROR
    asc, ascq = 0x37, 0x00


# --- MISCOMPARE / MEDIUM / HARDWARE ------------------------------------------------------------


class Miscompare(ScsiError):
    """0Eh/1Dh/00h MISCOMPARE DURING VERIFY OPERATION; ``info`` = offset of the first difference."""

    sense_key = SenseKey.MISCOMPARE
    asc, ascq = 0x1D, 0x00


class MediumError(ScsiError):
    """03h/11h/00h UNRECOVERED READ ERROR."""

    sense_key = SenseKey.MEDIUM_ERROR
    asc, ascq = 0x11, 0x00


class WriteError(MediumError):
    """03h/0Ch/00h WRITE ERROR."""

    asc, ascq = 0x0C, 0x00


class CannotReadIncompatibleFormat(MediumError):
    """03h/30h/02h CANNOT READ MEDIUM - INCOMPATIBLE FORMAT (generation the drive cannot read)."""

    asc, ascq = 0x30, 0x02


class SequentialPositioningError(MediumError):
    """03h/3Bh/00h SEQUENTIAL POSITIONING ERROR."""

    asc, ascq = 0x3B, 0x00


class HardwareError(ScsiError):
    """04h/44h/00h INTERNAL TARGET FAILURE."""

    sense_key = SenseKey.HARDWARE_ERROR
    asc, ascq = 0x44, 0x00


# --- NOT READY ------------------------------------------------------------------------------


class NotReady(ScsiError):
    """02h/04h/00h LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE."""

    sense_key = SenseKey.NOT_READY
    asc, ascq = 0x04, 0x00


class NotReadyBecoming(NotReady):
    """02h/04h/01h LOGICAL UNIT IS IN PROCESS OF BECOMING READY."""

    asc, ascq = 0x04, 0x01


class NotReadyManualIntervention(NotReady):
    """02h/04h/03h LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED."""

    asc, ascq = 0x04, 0x03


class NotReadyInitializingCommandRequired(NotReady):
    """02h/04h/02h LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED (medium unloaded)."""

    asc, ascq = 0x04, 0x02


class MediumNotPresent(NotReady):
    """02h/3Ah/00h MEDIUM NOT PRESENT."""

    asc, ascq = 0x3A, 0x00


class ImportExportElementOpen(NotReady):
    """02h/3Ah/02h MEDIUM NOT PRESENT - TRAY OPEN: the import/export element is open to the
    operator, so the medium transport cannot reach it (SMC-3)."""

    asc, ascq = 0x3A, 0x02


class CannotReadUnknownFormat(NotReady):
    """02h/30h/01h CANNOT READ MEDIUM - UNKNOWN FORMAT: a cartridge is in the drive, but what its
    format is cannot be told (a damaged cartridge memory or format header). NOT READY like 30h/03h
    CLEANING CARTRIDGE INSTALLED: the medium is present and unusable until it is replaced."""

    asc, ascq = 0x30, 0x01


class CleaningCartridgeInstalled(NotReady):
    """02h/30h/03h CLEANING CARTRIDGE INSTALLED."""

    asc, ascq = 0x30, 0x03


# --- UNIT ATTENTION -------------------------------------------------------------------------


class UnitAttention(ScsiError):
    """Base of unit attention conditions; on its own 06h/29h/00h POWER ON, RESET OR BDR OCCURRED."""

    sense_key = SenseKey.UNIT_ATTENTION
    asc, ascq = 0x29, 0x00


class PowerOnReset(UnitAttention):
    """06h/29h/00h POWER ON, RESET, OR BUS DEVICE RESET OCCURRED."""

    asc, ascq = 0x29, 0x00


class MediumMayHaveChanged(UnitAttention):
    """06h/28h/00h NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED."""

    asc, ascq = 0x28, 0x00


class ImportExportElementAccessed(UnitAttention):
    """06h/28h/01h IMPORT OR EXPORT ELEMENT ACCESSED (SMC)."""

    asc, ascq = 0x28, 0x01


class ModeParametersChanged(UnitAttention):
    """06h/2Ah/01h MODE PARAMETERS CHANGED."""

    asc, ascq = 0x2A, 0x01


class CapacityDataChanged(UnitAttention):
    """06h/2Ah/09h CAPACITY DATA HAS CHANGED."""

    asc, ascq = 0x2A, 0x09


class SoftThresholdReached(UnitAttention):
    """06h/38h/07h THIN PROVISIONING SOFT THRESHOLD REACHED."""

    asc, ascq = 0x38, 0x07


class InquiryDataChanged(UnitAttention):
    """06h/3Fh/03h INQUIRY DATA HAS CHANGED."""

    asc, ascq = 0x3F, 0x03


class ReportedLunsDataChanged(UnitAttention):
    """06h/3Fh/0Eh REPORTED LUNS DATA HAS CHANGED."""

    asc, ascq = 0x3F, 0x0E


# --- DATA PROTECT ---------------------------------------------------------------------------


class WriteProtected(ScsiError):
    """07h/27h/00h WRITE PROTECTED."""

    sense_key = SenseKey.DATA_PROTECT
    asc, ascq = 0x27, 0x00


class SpaceAllocationFailed(WriteProtected):
    """07h/27h/07h SPACE ALLOCATION FAILED WRITE PROTECT (thin pool exhausted)."""

    asc, ascq = 0x27, 0x07


class CannotWriteIncompatibleFormat(WriteProtected):
    """07h/30h/05h CANNOT WRITE MEDIUM - INCOMPATIBLE FORMAT (read-only generation, e.g. N-2)."""

    asc, ascq = 0x30, 0x05


class WormOverwriteAttempted(WriteProtected):
    """07h/30h/0Ch WORM MEDIUM - OVERWRITE ATTEMPTED (SSC-5 4.2.20)."""

    asc, ascq = 0x30, 0x0C


# --- ABORTED COMMAND ------------------------------------------------------------------------


class AbortedCommand(ScsiError):
    """0Bh/00h/00h ABORTED COMMAND, no additional sense information."""

    sense_key = SenseKey.ABORTED_COMMAND
    asc, ascq = 0x00, 0x00


# --- COPY ABORTED -----------------------------------------------------------------------------


class CopyAborted(ScsiError):
    """0Ah/00h/00h COPY ABORTED, no additional sense information: an EXTENDED COPY stopped while
    processing its segments (SPC-4 6.3.3 / SPC-5 4.4.5: the COPY ABORTED sense key). The copy
    manager uses it, with 00h/00h, for a segment whose blocks lie beyond a copy target's
    capacity: libiscsi's ExtendedCopy.ValidSegDescr accepts 00h/00h, 08h/04h or 0Dh/02h there."""

    sense_key = SenseKey.COPY_ABORTED
    asc, ascq = 0x00, 0x00


class CopyTargetDeviceNotReachable(CopyAborted):
    """0Ah/0Dh/02h COPY TARGET DEVICE NOT REACHABLE: a CSCD descriptor names a logical unit the
    copy manager cannot address — here, one outside the device's copy domain (SPC-4 6.3.6.1;
    LIO answers the same, so an initiator falls back to READ and WRITE)."""

    asc, ascq = 0x0D, 0x02


# --- TAPE (SSC-5) -----------------------------------------------------------------------------
# Conditions of sequential-access devices, with the stream flags (FILEMARK, EOM, ILI) preset where
# SSC-5 requires them.


class TapeCondition(ScsiError):
    """Base of SSC conditions reported with NO SENSE (they carry stream flags, not failures)."""

    sense_key = SenseKey.NO_SENSE
    asc, ascq = 0x00, 0x00


class FilemarkDetected(TapeCondition):
    """00h/00h/01h FILEMARK DETECTED, FILEMARK bit set (SSC-5 4.2.8: read or space hit a mark)."""

    asc, ascq = 0x00, 0x01

    def __init__(self, msg: str = "", **kw: Any) -> None:
        kw.setdefault("filemark", True)
        super().__init__(msg, **kw)


class EarlyWarning(TapeCondition):
    """00h/00h/02h END-OF-PARTITION/MEDIUM DETECTED with EOM: the write succeeded in the EW zone."""

    asc, ascq = 0x00, 0x02

    def __init__(self, msg: str = "", **kw: Any) -> None:
        kw.setdefault("eom", True)
        super().__init__(msg, **kw)


class BeginningOfPartition(TapeCondition):
    """00h/00h/04h BEGINNING-OF-PARTITION/MEDIUM DETECTED with EOM (backward motion hit BOP)."""

    asc, ascq = 0x00, 0x04

    def __init__(self, msg: str = "", **kw: Any) -> None:
        kw.setdefault("eom", True)
        super().__init__(msg, **kw)


class IncorrectLength(TapeCondition):
    """00h/00h/00h with ILI: the block read was not the requested length (SSC-5 4.2.22)."""

    def __init__(self, msg: str = "", **kw: Any) -> None:
        kw.setdefault("ili", True)
        super().__init__(msg, **kw)


class EndOfData(ScsiError):
    """08h/00h/05h END-OF-DATA DETECTED (BLANK CHECK): read, space or locate ran into EOD."""

    sense_key = SenseKey.BLANK_CHECK
    asc, ascq = 0x00, 0x05


class VolumeOverflow(ScsiError):
    """0Dh/00h/02h END-OF-PARTITION/MEDIUM DETECTED with EOM: no room for the write."""

    sense_key = SenseKey.VOLUME_OVERFLOW
    asc, ascq = 0x00, 0x02

    def __init__(self, msg: str = "", **kw: Any) -> None:
        kw.setdefault("eom", True)
        super().__init__(msg, **kw)
