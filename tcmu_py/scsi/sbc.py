"""SBC-4 wire formats: READ CAPACITY, block VPD pages, UNMAP parameters, GET LBA STATUS, and the
block-only mode pages (read-write error recovery, caching, logical block provisioning) and the
logical block provisioning log page (built on spc's mode and log page framework).

Builders return complete responses (truncate with ``spc.truncate``); the UNMAP parser validates
the parameter list as SBC-4 5.32 requires and leaves the capacity check to the caller, which
knows the capacity and takes the range locks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import NamedTuple

from tcmu_py.scsi.constants import (
    LogParameterFormat,
    ModePageCode,
    PeripheralType,
    ProvisioningType,
    VpdPage,
)
from tcmu_py.scsi.sense import InvalidFieldInParameterList, ParameterListLengthError
from tcmu_py.scsi.spc import Field, ModePage, build_log_page, build_vpd_page

_RC10 = struct.Struct(">II")
# SBC-4 5.21.2 table 68: RETURNED LBA, BLOCK LENGTH, byte 12 (RC BASIS, P_TYPE, PROT_EN),
# byte 13 (P_I_EXPONENT, LBPPBE), bytes 14..15 (LBPME, LBPRZ, LOWEST ALIGNED LBA), 16 reserved.
_RC16 = struct.Struct(">QIBBH16x")
# SBC-4 6.6.3 table 263: Block Limits payload (after the 4-byte VPD header), 60 bytes.
_BLOCK_LIMITS = struct.Struct(">BBHIIIIIIIQIIIII")
_UNMAP_HEADER = struct.Struct(">HH4x")
_UNMAP_DESC = struct.Struct(">QI4x")
_LBA_STATUS_HEADER = struct.Struct(">I4x")
_LBA_STATUS_DESC = struct.Struct(">QIBB2x")

#: SBC-4 5.21.2: RC BASIS 01b - the RETURNED LOGICAL BLOCK ADDRESS is the LU's last LBA.
_RC_BASIS_LAST_LBA = 0x10


def build_read_capacity_10(num_blocks: int, block_size: int) -> bytes:
    """READ CAPACITY (10) data (SBC-4 5.20.2): last LBA and block length, 8 bytes.

    A last LBA that does not fit 32 bits is reported as FFFFFFFFh, which tells the initiator to
    use READ CAPACITY (16).
    """
    return _RC10.pack(min(max(num_blocks - 1, 0), 0xFFFFFFFF), block_size)


def build_read_capacity_16(
    num_blocks: int,
    block_size: int,
    *,
    lbpme: bool = False,
    lbprz: bool = False,
    lbppbe: int = 0,
    lowest_aligned: int = 0,
    prot_en: bool = False,
    p_type: int = 0,
    p_i_exponent: int = 0,
) -> bytes:
    """READ CAPACITY (16) parameter data (SBC-4 5.21.2), 32 bytes.

    LBPME only for a device that really deallocates; LBPRZ only if deallocated blocks read as
    zeros, and never without LBPME (SBC-4 5.21.2: LBPRZ is defined only when LBPME is one).
    ``lbppbe``: logical blocks per physical block exponent.
    """
    if not 0 <= lowest_aligned <= 0x3FFF:
        raise ValueError(f"lowest aligned LBA {lowest_aligned} out of range")
    b12 = _RC_BASIS_LAST_LBA | ((p_type & 0x07) << 1) | (0x01 if prot_en else 0)
    b13 = ((p_i_exponent & 0x0F) << 4) | (lbppbe & 0x0F)
    b14 = (0x8000 if lbpme else 0) | (0x4000 if lbpme and lbprz else 0) | lowest_aligned
    return _RC16.pack(max(num_blocks - 1, 0), block_size, b12, b13, b14)


def build_vpd_block_limits(
    *,
    wsnz: bool = False,
    max_compare_and_write_length: int = 0,
    optimal_transfer_length_granularity: int = 0,
    max_transfer_length: int = 0,
    optimal_transfer_length: int = 0,
    max_prefetch_length: int = 0,
    max_unmap_lba_count: int = 0,
    max_unmap_descriptor_count: int = 0,
    optimal_unmap_granularity: int = 0,
    unmap_granularity_alignment: int | None = None,
    max_write_same_length: int = 0,
    max_atomic_transfer_length: int = 0,
    atomic_alignment: int = 0,
    atomic_transfer_length_granularity: int = 0,
    max_atomic_transfer_length_with_boundary: int = 0,
    max_atomic_boundary_size: int = 0,
    peripheral_type: int = PeripheralType.DISK,
) -> bytes:
    """Block Limits VPD B0h (SBC-4 6.6.3), page length 3Ch. Lengths are in logical blocks.

    ``unmap_granularity_alignment`` None leaves UGAVALID zero; an int sets UGAVALID and the
    31-bit alignment.  0 in a limit field means "no limit reported".  Linux ``sd`` uses UNMAP only
    when MAXIMUM UNMAP LBA COUNT > 0 (and LBPU in B2h).
    """
    if max_compare_and_write_length > 0xFF:
        raise ValueError("MAXIMUM COMPARE AND WRITE LENGTH is one byte")
    uga = 0
    if unmap_granularity_alignment is not None:
        if not 0 <= unmap_granularity_alignment <= 0x7FFFFFFF:
            raise ValueError("UNMAP GRANULARITY ALIGNMENT is 31 bits")
        uga = 0x80000000 | unmap_granularity_alignment
    payload = _BLOCK_LIMITS.pack(
        0x01 if wsnz else 0,
        max_compare_and_write_length,
        optimal_transfer_length_granularity,
        max_transfer_length,
        optimal_transfer_length,
        max_prefetch_length,
        max_unmap_lba_count,
        max_unmap_descriptor_count,
        optimal_unmap_granularity,
        uga,
        max_write_same_length,
        max_atomic_transfer_length,
        atomic_alignment,
        atomic_transfer_length_granularity,
        max_atomic_transfer_length_with_boundary,
        max_atomic_boundary_size,
    )
    return build_vpd_page(peripheral_type, VpdPage.BLOCK_LIMITS, payload)


def build_vpd_block_device_characteristics(
    *,
    rotation_rate: int = 1,
    product_type: int = 0,
    nominal_form_factor: int = 0,
    wabereq: int = 0,
    wacereq: int = 0,
    fuab: bool = False,
    vbuls: bool = False,
    peripheral_type: int = PeripheralType.DISK,
) -> bytes:
    """Block Device Characteristics VPD B1h (SBC-4 6.6.2), page length 3Ch.

    ``rotation_rate`` 1 = non-rotating medium (solid state), 0 = not reported, else RPM.
    """
    payload = bytearray(0x3C)
    payload[0:2] = rotation_rate.to_bytes(2, "big")
    payload[2] = product_type
    payload[3] = ((wabereq & 3) << 6) | ((wacereq & 3) << 4) | (nominal_form_factor & 0x0F)
    payload[4] = (0x02 if fuab else 0) | (0x01 if vbuls else 0)
    return build_vpd_page(peripheral_type, VpdPage.BLOCK_DEVICE_CHARACTERISTICS, bytes(payload))


def build_vpd_lbp(
    *,
    threshold_exponent: int = 0,
    lbpu: bool = False,
    lbpws: bool = False,
    lbpws10: bool = False,
    lbprz: bool | int = False,
    anc_sup: bool = False,
    dp: bool = False,
    minimum_percentage: int = 0,
    provisioning_type: int = ProvisioningType.FULL,
    threshold_percentage: int = 0,
    provisioning_group_descriptor: bytes = b"",
    peripheral_type: int = PeripheralType.DISK,
) -> bytes:
    """Logical Block Provisioning VPD B2h (SBC-4 6.6.4).

    ``lbprz`` is the 3-bit field: True/1 = deallocated blocks read as zeros (001b); other values
    are passed through.  ``dp`` is set automatically when a provisioning group descriptor is given.
    """
    rz = (1 if lbprz else 0) if isinstance(lbprz, bool) else lbprz
    if not 0 <= rz <= 7:
        raise ValueError("LBPRZ is a 3-bit field")
    dp = dp or bool(provisioning_group_descriptor)
    b5 = (0x80 if lbpu else 0) | (0x40 if lbpws else 0) | (0x20 if lbpws10 else 0)
    b5 |= (rz << 2) | (0x02 if anc_sup else 0) | (0x01 if dp else 0)
    b6 = ((minimum_percentage & 0x1F) << 3) | (provisioning_type & 0x07)
    payload = bytes([threshold_exponent, b5, b6, threshold_percentage])
    return build_vpd_page(
        peripheral_type, VpdPage.LOGICAL_BLOCK_PROVISIONING, payload + provisioning_group_descriptor
    )


def parse_unmap_parameters(
    data: bytes | bytearray | memoryview,
    max_descriptors: int,
    *,
    max_lba_count: int | None = None,
) -> list[tuple[int, int]]:
    """The (LBA, number of logical blocks) ranges of an UNMAP parameter list (SBC-4 5.32.2).

    * an empty list means nothing to do (PARAMETER LIST LENGTH 0 is not an error);
    * 1..7 bytes: PARAMETER LIST LENGTH ERROR (SBC-4 5.32.1);
    * the descriptors are those the UNMAP BLOCK DESCRIPTOR DATA LENGTH covers within the data
      received; a trailing partial descriptor is ignored (SBC-4 5.32.2: "the last UNMAP block
      descriptor is incomplete and shall be ignored");
    * more than ``max_descriptors`` descriptors, or more than ``max_lba_count`` blocks in total
      (the B0h limits), is INVALID FIELD IN PARAMETER LIST.

    The capacity check (LBA OUT OF RANGE) is the caller's, over all ranges before any is unmapped.
    """
    buf = bytes(data)
    if not buf:
        return []
    if len(buf) < _UNMAP_HEADER.size:
        raise ParameterListLengthError(f"UNMAP parameter list of {len(buf)} bytes")
    _, bd_length = _UNMAP_HEADER.unpack_from(buf)
    usable = min(bd_length, len(buf) - _UNMAP_HEADER.size)
    count = usable // _UNMAP_DESC.size
    if count > max_descriptors:
        # SBC-4 5.32.1: descriptor count above MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
        raise InvalidFieldInParameterList(
            f"{count} UNMAP descriptors > {max_descriptors}", field_pointer=2
        )
    ranges = []
    total = 0
    for i in range(count):
        off = _UNMAP_HEADER.size + i * _UNMAP_DESC.size
        lba, blocks = _UNMAP_DESC.unpack_from(buf, off)
        total += blocks
        if max_lba_count is not None and total > max_lba_count:
            # SBC-4 5.32.1: blocks above MAXIMUM UNMAP LBA COUNT.
            raise InvalidFieldInParameterList(
                f"UNMAP of {total} blocks > {max_lba_count}", field_pointer=off + 8
            )
        ranges.append((lba, blocks))
    return ranges


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (LBA, count) ranges covering exactly the blocks of `ranges`, sorted, none empty,
    overlapping or adjacent ones merged. An UNMAP deallocates the union of its descriptors
    (SBC-4 5.32: descriptors may overlap and come in any order), so a list with one descriptor
    per block (libiscsi's UNMAP tests; initiators freeing scattered blocks) costs the handler
    one call per run of blocks, not one per block."""
    out: list[tuple[int, int]] = []
    for lba, count in sorted(r for r in ranges if r[1]):
        if out and lba <= out[-1][0] + out[-1][1]:
            first, n = out[-1]
            out[-1] = (first, max(n, lba + count - first))
        else:
            out.append((lba, count))
    return out


def build_unmap_parameters(ranges: Iterable[tuple[int, int]]) -> bytes:
    """An UNMAP parameter list for ``ranges`` (initiator side; used by tests and tools)."""
    descs = b"".join(_UNMAP_DESC.pack(lba, n) for lba, n in ranges)
    return _UNMAP_HEADER.pack(len(descs) + 6, len(descs)) + descs


class ProvisioningStatus(IntEnum):
    """PROVISIONING STATUS of an LBA status descriptor (SBC-4 5.8.2 table 41)."""

    MAPPED = 0x0
    DEALLOCATED = 0x1
    ANCHORED = 0x2
    UNKNOWN = 0x3


def build_get_lba_status(
    descriptors: Iterable[tuple[int, int, int]],
    *,
    start_lba: int | None = None,
    max_descriptors: int | None = None,
) -> bytes:
    """GET LBA STATUS parameter data (SBC-4 5.8.2) from (LBA, blocks, provisioning status) runs.

    Runs are taken in order.  With ``start_lba`` the runs ending at or before it are dropped and
    the first one is clipped to start there (SBC-4 5.8.2: the first descriptor describes the
    STARTING LOGICAL BLOCK ADDRESS); adjacent runs with the same status are merged; a run longer
    than the 32-bit NUMBER OF LOGICAL BLOCKS field is split; at most ``max_descriptors`` are
    returned (the caller derives it from the allocation length).
    """
    runs: list[list[int]] = []
    for lba, blocks, status in descriptors:
        if blocks <= 0:
            continue
        if start_lba is not None:
            if lba + blocks <= start_lba:
                continue
            if lba < start_lba:
                lba, blocks = start_lba, lba + blocks - start_lba
        if runs and runs[-1][2] == status and runs[-1][0] + runs[-1][1] == lba:
            runs[-1][1] += blocks
        else:
            runs.append([lba, blocks, status])
    body = bytearray()
    count = 0
    for lba, blocks, status in runs:
        while blocks > 0 and (max_descriptors is None or count < max_descriptors):
            n = min(blocks, 0xFFFFFFFF)
            body += _LBA_STATUS_DESC.pack(lba, n, status & 0x0F, 0)
            lba, blocks, count = lba + n, blocks - n, count + 1
    # SBC-4 5.8.2: PARAMETER DATA LENGTH = n - 3 (excludes itself).
    return _LBA_STATUS_HEADER.pack(len(body) + 4) + bytes(body)


def build_read_defect_data(
    *, twelve: bool, req_plist: bool, req_glist: bool, defect_list_format: int
) -> bytes:
    """READ DEFECT DATA parameter data for a device without defects (SBC-4 5.19.2 / 5.20.2).

    PLISTV / GLISTV echo the lists requested (both are valid and empty); DEFECT LIST LENGTH 0.
    The (12) form has a 2-byte generation code (0: not supported) and a 4-byte length.
    """
    b1 = (0x10 if req_plist else 0) | (0x08 if req_glist else 0) | (defect_list_format & 0x07)
    if twelve:
        return bytes([0, b1, 0, 0, 0, 0, 0, 0])
    return bytes([0, b1, 0, 0])


# --- mode pages (SBC-4 6.5) ------------------------------------------------------------------


#: Read-Write Error Recovery (SBC-4 6.5.10): RECOVERY TIME LIMIT.
READ_WRITE_ERROR_RECOVERY_FIELDS = (Field(10, 7, 16),)
#: Caching (SBC-4 6.5.5): DEMAND READ and WRITE RETENTION PRIORITY, DISABLE PRE-FETCH TRANSFER
#: LENGTH, MINIMUM PRE-FETCH, MAXIMUM PRE-FETCH, MAXIMUM PRE-FETCH CEILING, SYNC_PROG, CACHE
#: SEGMENT SIZE.
CACHING_FIELDS = (Field(3, 7, 4), Field(3, 3, 4), Field(4, 7, 16), Field(6, 7, 16),
                  Field(8, 7, 16), Field(10, 7, 16), Field(12, 2, 2), Field(14, 7, 16))


def read_write_error_recovery_page() -> ModePage:
    """Read-Write Error Recovery 01h (SBC-4 6.5.10): no retries or reallocation to report."""
    return ModePage.make(ModePageCode.READ_WRITE_ERROR_RECOVERY, 0, bytes(0x0A),
                         fields=READ_WRITE_ERROR_RECOVERY_FIELDS)


def caching_mode_page(wce: bool, *, rcd: bool = False, wce_changeable: bool = False) -> ModePage:
    """Caching 08h (SBC-4 6.5.5): WCE (byte 2 bit 2) and RCD (byte 2 bit 0), page length 12h.

    WCE must tell the truth: set only when acknowledged writes may sit in a volatile cache.
    ``wce_changeable`` only when the device really switches its cache on MODE SELECT.
    """
    params = bytearray(0x12)
    params[0] = (0x04 if wce else 0) | (0x01 if rcd else 0)
    mask = bytearray(0x12)
    mask[0] = 0x04 if wce_changeable else 0
    return ModePage.make(ModePageCode.CACHING, 0, bytes(params), bytes(mask),
                         fields=CACHING_FIELDS)


class ThresholdResource(IntEnum):
    """THRESHOLD RESOURCE of a threshold descriptor (SBC-4 6.5.8 table 209)."""

    AVAILABLE = 0x01  # available LBA mapping resources
    USED = 0x02  # used LBA mapping resources


class ThresholdArming(IntEnum):
    """THRESHOLD ARMING of a threshold descriptor (SBC-4 6.5.8 table 208)."""

    DECREASING = 0b000
    INCREASING = 0b001


class ThresholdType(IntEnum):
    """THRESHOLD TYPE of a threshold descriptor (SBC-4 6.5.8)."""

    SOFT = 0b000


_THRESHOLD = struct.Struct(">BB2xI")


class ThresholdDescriptor(NamedTuple):
    """A logical block provisioning threshold descriptor (SBC-4 6.5.8, table 207).

    ``threshold_count`` is in units of 2**THRESHOLD EXPONENT logical blocks (VPD B2h).
    """

    enabled: bool
    resource: int = ThresholdResource.USED
    threshold_count: int = 0
    arming: int = ThresholdArming.INCREASING
    threshold_type: int = ThresholdType.SOFT


def logical_block_provisioning_mode_page(
    thresholds: Sequence[ThresholdDescriptor] | None = None,
    *,
    threshold_count: int | None = None,
    situa: bool = False,
) -> ModePage:
    """Logical Block Provisioning 1Ch/02h (SBC-4 6.5.8): 16-byte head + 8-byte descriptors.

    ``threshold_count`` alone gives one enabled soft threshold on the used LBA mapping resource,
    armed increasing.  ENABLED and THRESHOLD COUNT are changeable.
    """
    if thresholds is None:
        thresholds = []
        if threshold_count is not None:
            thresholds.append(ThresholdDescriptor(True, threshold_count=threshold_count))
    params = bytearray(12)
    params[0] = 0x01 if situa else 0
    mask = bytearray(12)
    fields: list[Field] = []
    for t in thresholds:
        at = 4 + len(params)  # the descriptor's first byte in the page (4-byte header)
        # SBC-4 6.5.8 table 207: THRESHOLD TYPE, THRESHOLD ARMING, THRESHOLD COUNT.
        fields += [Field(at, 5, 3), Field(at, 2, 3), Field(at + 4, 7, 32)]
        flags = (0x80 if t.enabled else 0) | (t.threshold_type << 3) | t.arming
        params += _THRESHOLD.pack(flags, t.resource, t.threshold_count)
        mask += _THRESHOLD.pack(0x80, 0, 0xFFFFFFFF)
    return ModePage.make(ModePageCode.LOGICAL_BLOCK_PROVISIONING, 0x02, bytes(params), bytes(mask),
                         fields=fields)


def lbp_thresholds(page: ModePage) -> list[ThresholdDescriptor]:
    """The threshold descriptors of a current logical block provisioning page (1Ch/02h)."""
    body = page.params[12:]
    out = []
    for off in range(0, len(body) - len(body) % 8, 8):
        flags, resource, count = _THRESHOLD.unpack_from(body, off)
        out.append(
            ThresholdDescriptor(bool(flags & 0x80), resource, count, flags & 0x07, (flags >> 3) & 7)
        )
    return out


# --- log pages (SBC-4 6.4) -------------------------------------------------------------------


class LbpScope(IntEnum):
    """SCOPE of a Logical Block Provisioning log parameter (SBC-4 6.4.5 table 196)."""

    NOT_REPORTED = 0
    DEDICATED = 1  # dedicated to this logical unit
    NOT_DEDICATED = 2  # shared with other logical units (a pool)


_LBP_PARAM = struct.Struct(">IB3x")


def build_lbp_log_page(
    available: int | None = None,
    used: int | None = None,
    *,
    scope: int = LbpScope.DEDICATED,
    deduplicated: int | None = None,
    compressed: int | None = None,
    total_efficiency: int | None = None,
    parameter_pointer: int = 0,
) -> bytes:
    """Logical Block Provisioning log page 0Ch (SBC-4 6.4.5).

    Counts are in units of 2**THRESHOLD EXPONENT blocks, clipped to 32 bits: 0001h available and
    0002h used LBA mapping resources, 0100h de-duplicated, 0101h compressed and 0102h total
    efficiency LBA resource counts.  Omitted (None) parameters are not reported.
    """
    params = []
    for code, count in (
        (0x0001, available),
        (0x0002, used),
        (0x0100, deduplicated),
        (0x0101, compressed),
        (0x0102, total_efficiency),
    ):
        if count is not None:
            value = _LBP_PARAM.pack(min(max(count, 0), 0xFFFFFFFF), scope & 0x03)
            params.append((code, LogParameterFormat.BINARY_LIST, value))
    return build_log_page(0x0C, 0, params, parameter_pointer=parameter_pointer)
