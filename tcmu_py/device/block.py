"""BlockDevice: SBC-4 direct-access semantics over a `BlockBackend`.

A backend moves bytes; this module decides what the bytes mean. It enforces bounds
(LBA OUT OF RANGE), FUA, COMPARE AND WRITE atomicity, VERIFY, WRITE SAME, UNMAP, GET LBA STATUS,
READ CAPACITY and the block VPD / mode / log pages, and advertises exactly what the backend
declares (`tcmu_py.backend`): its capabilities are resolved once, at construction, into
`self.caps`. UNMAP, LBPME and VPD B2h appear only for an `Unmap` backend (B2h's PROVISIONING
TYPE thin, or resource where the backend declares it: `resolve_provisioning_type`), LBPRZ only
when it promises `lbprz`, GET LBA STATUS only for `LbaStatus`, provisioning pages only for
`ThinProvisioning`.

Threads: handlers run on the device's worker pool, several at once. Writes and COMPARE AND WRITE
take the range lock for the LBAs they touch, so a COMPARE AND WRITE is atomic against every
overlapping write (SBC-4 5.3); reads take no lock.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial

from tcmu_py.backend import (
    BlockBackend,
    Capabilities,
    CapabilityError,
    ChunkExtent,
    FanOutExtent,
    NativeKit,
    ProvisioningInfo,
    RbdExtent,
    ReadExtent,
    UnitMap,
)
from tcmu_py.buffers import gather, slice_views
from tcmu_py.device.command import Command
from tcmu_py.device.copydomain import CopyDomain
from tcmu_py.device.core import DataExtent, ScsiDevice, check_data_out, command
from tcmu_py.device.xcopy_commands import CopyManager
from tcmu_py.errors import TcmuError
from tcmu_py.handler import DeviceConfig
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import sbc, spc
from tcmu_py.scsi.constants import Opcode, PeripheralType, ProvisioningType, ServiceAction
from tcmu_py.scsi.sense import (
    CapacityDataChanged,
    InvalidFieldInCdb,
    LbaOutOfRange,
    MediumError,
    Miscompare,
    RoundedParameter,
    ScsiError,
    SoftThresholdReached,
    SpaceAllocationFailed,
    WriteError,
)

#: Largest WRITE SAME we accept in one command (blocks); advertised in VPD B0h.
MAX_WRITE_SAME_BLOCKS = 1 << 22
#: Largest COMPARE AND WRITE (blocks); advertised in VPD B0h.
MAX_COMPARE_AND_WRITE_BLOCKS = 255
#: UNMAP limits advertised in VPD B0h.
MAX_UNMAP_BLOCK_DESCRIPTORS = 256
MAX_UNMAP_LBA_COUNT = 0xFFFFFFFF
#: START STOP UNIT's POWER CONDITION codes that are not reserved (SBC-4 5.27: START_VALID,
#: ACTIVE, IDLE, STANDBY, obsolete 5h, LU_CONTROL, FORCE_IDLE_0, FORCE_STANDBY_0).
_POWER_CONDITIONS = frozenset({0x0, 0x1, 0x2, 0x3, 0x5, 0x7, 0xA, 0xB})
_RW10 = struct.Struct(">IxH")  # LBA, group, TRANSFER LENGTH (bytes 2..8 of a 10-byte CDB)
_RW16 = struct.Struct(">QI")  # LBA, TRANSFER LENGTH (bytes 2..13 of a 16-byte CDB)
#: Bytes read or written at a time where a command covers more than its own buffers (WRITE
#: SAME without backend support, VERIFY): memory stays bounded whatever the CDB asks for.
_IO_CHUNK = 1 << 20
#: Most buffers one preadv/pwritev takes (IOV_MAX; more is EINVAL). A command as large as the
#: data area may come in one iovec per data-area page, so backends are called per group.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: The MAXIMUM TRANSFER LENGTH field of VPD B0h is four bytes (SBC-4 6.6.3).
_MAX_TRANSFER_FIELD = 0xFFFFFFFF


def _threshold_count(capacity: int, percent: int, unit: int) -> int:
    """THRESHOLD COUNT (SBC-4 6.5.8) of a soft threshold at `percent` % of `capacity` bytes, in
    `unit`-byte units, rounded up: the pool reports the crossing once its use reaches `percent`
    % (`handlers._pool.reaches`), i.e. when LOG SENSE 0Ch's used count reaches this count."""
    return -(-capacity * percent // (100 * unit))


def _iov_groups(
    offset: int, bufs: Sequence[memoryview]
) -> list[tuple[int, Sequence[memoryview]]]:
    """`bufs` at byte `offset` as (offset, buffers) groups of at most `_IOV_MAX` buffers."""
    if len(bufs) <= _IOV_MAX:
        return [(offset, bufs)]
    groups: list[tuple[int, Sequence[memoryview]]] = []
    for i in range(0, len(bufs), _IOV_MAX):
        group = bufs[i : i + _IOV_MAX]
        groups.append((offset, group))
        offset += sum(len(b) for b in group)
    return groups


def _length_field(opcode: int) -> int:
    """CDB byte of the TRANSFER / VERIFICATION LENGTH of a READ/WRITE/VERIFY opcode: 6-byte
    CDBs 4, 10-byte 7, 12-byte 6, 16-byte 10 (the SBC-4 CDB layouts)."""
    return {0x08: 4, 0x0A: 4}.get(opcode) or {0xA0: 6, 0x80: 10}.get(opcode & 0xE0, 7)


class RangeLock:
    """Mutual exclusion between overlapping LBA ranges (half-open [start, end)), first come first
    served: a request also waits for earlier overlapping requests still waiting, so a stream of
    writes cannot starve a COMPARE AND WRITE on the same blocks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int, int]] = []
        self._waiting: list[tuple[int, int, int]] = []
        self._tickets = itertools.count()

    def acquire(self, start: int, end: int) -> tuple[int, int, int]:
        with self._cond:
            me = (start, end, next(self._tickets))
            self._waiting.append(me)
            while any(s < end and start < e for s, e, _ in self._held) or any(
                t < me[2] and s < end and start < e for s, e, t in self._waiting
            ):
                self._cond.wait()
            self._waiting.remove(me)
            self._held.append(me)
            return me

    def release(self, item: tuple[int, int, int]) -> None:
        with self._cond:
            self._held.remove(item)
            self._cond.notify_all()


def resolve_provisioning_type(backend: object, caps: Capabilities) -> ProvisioningType:
    """VPD B2h PROVISIONING TYPE of a device over `backend` (SBC-4 6.6.4), from what it declares.

    A backend without `Unmap` is fully provisioned (000b; LBPME 0, no B2h page). With `Unmap`
    the device reports LBPME 1, and SBC-4 4.7.3.1 makes such a logical unit resource provisioned
    (001b) or thin provisioned (010b), never 000b: the backend says which with the attribute
    ``provisioning_type`` (`ProvisioningType.RESOURCE`: mapping resources are kept for every LBA,
    a deallocated one too, so no write fails for want of them, SBC-4 4.7.3.2;
    `ProvisioningType.THIN`: a write may find none left, SPACE ALLOCATION FAILED, 4.7.3.3). Not
    declared: thin, the one that promises nothing about resources. A `ThinProvisioning` backend
    is thin. Raises `CapabilityError` naming the attribute for a value that cannot be
    advertised (another value or type, the attribute without `Unmap`, RESOURCE with
    `ThinProvisioning`)."""
    kind = type(backend).__name__
    declared = getattr(backend, "provisioning_type", None)
    if caps.unmap is None:
        if declared is not None:
            raise CapabilityError(
                f"backend {kind}: provisioning_type: declared without Unmap (unmap); expected "
                "no provisioning_type, or the capability"
            )
        return ProvisioningType.FULL
    if declared is None:
        return ProvisioningType.THIN
    if (not isinstance(declared, int) or isinstance(declared, bool)
            or declared not in (ProvisioningType.RESOURCE, ProvisioningType.THIN)):
        raise CapabilityError(
            f"backend {kind}: provisioning_type: got {declared!r}, expected "
            "ProvisioningType.RESOURCE or ProvisioningType.THIN (SBC-4 4.7.3.1: a logical unit "
            "that deallocates is one of the two)"
        )
    if caps.thin is not None and declared != ProvisioningType.THIN:
        raise CapabilityError(
            f"backend {kind}: provisioning_type: got {declared!r} with ThinProvisioning, "
            "expected ProvisioningType.THIN"
        )
    return ProvisioningType(declared)


def _io_error(exc: OSError, writing: bool) -> ScsiError:
    """Map a backend OSError to sense (SBC-4 4.18 / SPC-5 Annex D)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceAllocationFailed(str(exc))
    return WriteError(str(exc)) if writing else MediumError(str(exc))


class BlockDevice(ScsiDevice):
    """A direct-access block device (peripheral type 00h) over `backend`."""

    peripheral_type = PeripheralType.DISK
    product = "BLOCK DEVICE"
    #: MAXIMUM COMPARE AND WRITE LENGTH advertised in VPD B0h (blocks; 0: not supported). A
    #: subclass whose store compares atomically only up to a size lowers it.
    max_compare_and_write_blocks: int = MAX_COMPARE_AND_WRITE_BLOCKS

    def __init__(self, config: DeviceConfig, backend: BlockBackend) -> None:
        #: What the backend declares, checked once here (CapabilityError names a bad attribute).
        self.caps = Capabilities.of(backend)
        #: VPD B2h PROVISIONING TYPE, resolved with the capabilities (`resolve_provisioning_type`).
        self.provisioning_type = resolve_provisioning_type(backend, self.caps)
        super().__init__(config)
        self.backend = backend
        self.block_size = backend.block_size
        self.num_blocks = backend.size // backend.block_size
        #: VPD B0h OPTIMAL TRANSFER LENGTH: LIO's ``hw_max_sectors`` (in logical blocks, as LIO
        #: counts it), the size Linux sd then uses for its requests (io_opt and max_sectors).
        self.optimal_transfer_blocks = max(1, config.hw_max_sectors)
        #: VPD B0h MAXIMUM TRANSFER LENGTH: what one command may carry. Until the runner says
        #: how much the ring takes (`set_max_data_length`), no more than the optimal length.
        self.max_transfer_blocks = self.optimal_transfer_blocks
        self._ranges = RangeLock()
        if self.caps.file_extent is not None and hasattr(backend, "extent_listener"):
            backend.extent_listener = self._extent_moved  # see FileExtent
        thin = self.caps.thin
        self._threshold_event: Callable[[], bool] | None = (
            thin.take_threshold_event if thin is not None else None
        )
        if thin is not None and hasattr(backend, "threshold_listener"):
            # Another disk of the pool crossed the threshold: reported with this one's next
            # command (SBC-4 4.7.3.7), not only after its next write.
            backend.threshold_listener = self._threshold_crossed
        # A backend that never blocks (memory, /dev/null-like) is cheaper run on the loop
        # thread than handed to the pool: no thread hand-off per command.
        self._all_inline = not self.caps.blocking
        #: The devices an EXTENDED COPY received here may address: by default this one alone
        #: (copies within the LUN); the daemon makes devices of one configured domain `join` it.
        self.copy_domain = CopyDomain(config.name)
        self.copy_domain.add(self)
        self.copy_manager = CopyManager(self)

    def set_max_data_length(self, length: int) -> None:
        """Advertise and accept commands of up to `length` data bytes (the ring's limit): a
        larger one the kernel refuses before it reaches us (`tcmu_py.ring.Ring.max_data_length`).
        OPTIMAL TRANSFER LENGTH stays `hw_max_sectors` unless that is larger."""
        blocks = min(length // self.block_size, _MAX_TRANSFER_FIELD)
        self.max_transfer_blocks = max(1, blocks)
        self.optimal_transfer_blocks = min(self.optimal_transfer_blocks, self.max_transfer_blocks)
        self.extent_version += 1

    def offer_native(self, kit: NativeKit) -> None:
        """A native loop serves the device: a backend that builds its extent from the loop's C
        objects (it has a ``native_kit`` attribute: a mirror's `tcmu_py.backend.FanOutExtent`,
        a dedup disk's `tcmu_py.backend.ChunkExtent`) gets the kit to do it."""
        if self.caps.file_extent is not None and hasattr(self.backend, "native_kit"):
            self.backend.native_kit = kit

    def _extent_moved(self) -> None:
        """The backend's extent changed on its own (`FileExtent`'s ``extent_listener``)."""
        self.extent_version += 1

    def extent_may_come(self) -> bool:
        """An extent now, a backend whose extent comes and goes on its own (it has an
        ``extent_listener``: a mirror's leg coming back in sync, an RBD image's exclusive lock
        taken over), or one that builds it from a native loop's objects (a ``native_kit``: a
        dedup disk)."""
        if self.caps.file_extent is None or not self.config.data_plane:
            return False
        return (hasattr(self.backend, "extent_listener") or hasattr(self.backend, "native_kit")
                or self.data_extent() is not None)

    def data_extent(self) -> DataExtent | None:
        """The backend's `FileExtent`, unless the device's config turns the data plane off. A
        thin backend (`ThinProvisioning`) qualifies only with a `UnitMap` (its writes allocate:
        only commands on allocated units may bypass it); without one it stays in Python. A
        `ReadExtent` gives READs only; an `RbdExtent`, the native loop's librbd calls; a
        `ChunkExtent`, the native loop's READs of a dedup disk."""
        fx = self.caps.file_extent
        if fx is None or not self.config.data_plane:
            return None
        got = fx.file_extent()
        if got is None:
            return None
        units: bytearray | None = None
        unit_blocks = 0
        reads_only = False
        if isinstance(got, RbdExtent):
            return DataExtent(-1, 0, self.block_size, self.num_blocks, self.max_transfer_blocks,
                              self.backend.write_cache, rbd=got)
        if isinstance(got, ChunkExtent):
            return DataExtent(-1, 0, self.block_size, self.num_blocks, self.max_transfer_blocks,
                              self.backend.write_cache, reads_only=True, chunks=got)
        if isinstance(got, FanOutExtent):
            return DataExtent(got.fd, got.base, self.block_size, self.num_blocks,
                              self.max_transfer_blocks, self.backend.write_cache,
                              reads_only=True, fanout=got)
        if isinstance(got, ReadExtent):
            fd, base, reads_only = got.fd, got.base, True
        elif len(got) == 3:
            fd, base, umap = got  # type: ignore[misc]
            if (not isinstance(umap, UnitMap) or umap.unit <= 0
                    or umap.unit % self.block_size):
                return None
            units, unit_blocks = umap.units, umap.unit // self.block_size
        elif self.caps.thin is not None:
            return None
        else:
            fd, base = got  # type: ignore[misc]
        return DataExtent(
            fd, base, self.block_size, self.num_blocks, self.max_transfer_blocks,
            self.backend.write_cache, units, unit_blocks, reads_only,
        )

    def join(self, domain: CopyDomain) -> None:
        """Leave the current copy domain for `domain` (copies may then address its devices)."""
        self.copy_domain.remove(self)
        domain.add(self)
        self.copy_domain = domain

    # ------------------------------------------------------------------------------------------
    # Capabilities and pages

    def is_inline(self, cdb: bytes) -> bool:
        if cdb[0] == Opcode.EXTENDED_COPY:
            return False  # reads and writes other devices' backends, which may block
        return self._all_inline or super().is_inline(cdb)

    def supports(self, opcode: int, service_action: int | None) -> bool:
        if opcode == Opcode.UNMAP:
            return self.caps.unmap is not None
        if opcode == Opcode.SERVICE_ACTION_IN_16 and service_action == ServiceAction.GET_LBA_STATUS:
            return self.caps.lba_status is not None
        return True

    @property
    def lbprz(self) -> bool:
        """Deallocated blocks read as zeros (the `Unmap` promise; False without unmap)."""
        return self.caps.unmap is not None and self.caps.lbprz

    def version_descriptors(self) -> tuple[int, ...]:
        # libiscsi's iscsi-test-cu treats a disk as SBC-3 only when 04C0h is listed.
        return (*super().version_descriptors(), 0x04C0, 0x0600)  # SBC-3, SBC-4

    def vpd_pages(self) -> dict[int, Callable[[], bytes]]:
        pages = super().vpd_pages()
        caps = self.caps
        can_unmap = caps.unmap is not None
        pages[0xB0] = lambda: sbc.build_vpd_block_limits(
            wsnz=True,  # WRITE SAME with zero blocks is refused, not "to the end" (SBC-4 6.6.3)
            # SBC-4 6.6.3: transfers not a multiple of this may cost more (the backend's unit).
            optimal_transfer_length_granularity=caps.transfer_granularity // self.block_size,
            max_transfer_length=self.max_transfer_blocks,
            # SBC-4 6.6.3: OPTIMAL TRANSFER LENGTH <= MAXIMUM TRANSFER LENGTH; Linux sd takes
            # it as the request size (io_opt), so it stays the configured hw_max_sectors.
            optimal_transfer_length=self.optimal_transfer_blocks,
            # SBC-4 6.6.3: unmap limits and granularity only for a device that can unmap.
            max_unmap_lba_count=MAX_UNMAP_LBA_COUNT if can_unmap else 0,
            max_unmap_descriptor_count=MAX_UNMAP_BLOCK_DESCRIPTORS if can_unmap else 0,
            optimal_unmap_granularity=caps.unmap_granularity // self.block_size
            if can_unmap
            else 0,
            unmap_granularity_alignment=caps.unmap_granularity_alignment // self.block_size
            if can_unmap
            else None,
            max_write_same_length=MAX_WRITE_SAME_BLOCKS,
            max_compare_and_write_length=self.max_compare_and_write_blocks,
        )
        pages[0xB1] = lambda: sbc.build_vpd_block_device_characteristics(rotation_rate=1)
        pages[0x8F] = self.copy_manager.vpd_page  # SPC-4 7.8.17: third-party copy
        if can_unmap:
            # SBC-4 6.6.4: UNMAP and WRITE SAME(10)/(16) with the UNMAP bit all deallocate here.
            pages[0xB2] = lambda: sbc.build_vpd_lbp(
                lbpu=True,
                lbpws=True,
                lbpws10=True,
                lbprz=self.lbprz,
                anc_sup=False,
                # SBC-4 6.6.4 / 4.7.3.1: with LBPME 1, resource (001b) or thin (010b).
                provisioning_type=self.provisioning_type,
                threshold_exponent=self._threshold_exponent(self._provisioning()),
            )
        return pages

    def _provisioning(self) -> ProvisioningInfo | None:
        thin = self.caps.thin
        return thin.provisioning() if thin is not None else None

    def _threshold_exponent(self, info: ProvisioningInfo | None) -> int:
        """SBC-4 6.6.4: thresholds count in units of 2**exponent blocks (0 = no thresholds): at
        least the unmap granularity, and large enough that both the disk's blocks and its
        pool's capacity fit a 32-bit count (THRESHOLD COUNT, SBC-4 6.5.8, and LOG SENSE 0Ch's
        resource counts are 32-bit; a pool may be far larger than one of its disks). `info` is
        the pool's figures the caller has read (`_provisioning`), so that one command reads
        them once under the pool's lock."""
        if self.caps.thin is None:
            return 0
        blocks = max(self.num_blocks, info.capacity // self.block_size if info else 0)
        exp = 0
        while (blocks >> exp) > 0xFFFFFFFF or (
            1 << exp
        ) * self.block_size < self.caps.unmap_granularity:
            exp += 1
        return max(exp, 1)

    def mode_pages(self) -> list[spc.ModePage]:
        pages = super().mode_pages()
        pages.append(sbc.read_write_error_recovery_page())
        # SBC-4 7.5.5: WCE tells whether acknowledged writes may still be in a volatile cache.
        pages.append(sbc.caching_mode_page(wce=bool(self.backend.write_cache)))
        info = self._provisioning()
        if info is not None:
            # SBC-4 6.5.8: one soft threshold on the used LBA mapping resource, counted in
            # 2**THRESHOLD EXPONENT blocks; disabled (count 0) when the pool has none. Rounded
            # up: the pool reports the crossing once its use reaches pct % of the capacity,
            # i.e. when LOG SENSE 0Ch's used count reaches this count (SBC-4 4.7.3.7).
            unit = self.block_size << self._threshold_exponent(info)
            pct = info.soft_threshold
            count = _threshold_count(info.capacity, pct, unit) if pct is not None else 0
            pages.append(
                sbc.logical_block_provisioning_mode_page(
                    [sbc.ThresholdDescriptor(pct is not None, threshold_count=count)]
                )
            )
        return pages

    def mode_page_changed(self, page_code: int, subpage: int, new_current: bytes) -> None:
        if (page_code, subpage) != (0x1C, 0x02):
            super().mode_page_changed(page_code, subpage, new_current)
            return
        thin = self.caps.thin
        if thin is None:
            return
        info = thin.provisioning()
        page = next(p for p in self.mode_pages() if (p.page_code, p.subpage) == (0x1C, 0x02))
        thresholds = sbc.lbp_thresholds(page.with_current(new_current))
        t = thresholds[0] if thresholds else None
        unit = self.block_size << self._threshold_exponent(info)
        percent = None
        if t is not None and t.enabled:
            # The whole percent whose count (rounded up, `_threshold_count`) is the one asked
            # for when there is one, else the nearest below it (1 % at least, 100 % at most).
            percent = max(1, min(100, t.threshold_count * unit * 100 // info.capacity))
        thin.set_soft_threshold(percent)
        # The pool holds the threshold (shared by its disks): regenerate the page from it.
        self.forget_mode_page(0x1C, 0x02)
        if t is not None and t.enabled and percent is not None and (
                _threshold_count(info.capacity, percent, unit) != t.threshold_count):
            # SPC-5 5.9: the pool keeps whole percents: the threshold asked for was rounded to
            # one it can hold (MODE SENSE reports it). Done, and said so.
            raise RoundedParameter(f"threshold count {t.threshold_count} rounded to {percent} %"
                                   " of the pool")

    def block_descriptors(self) -> list[tuple[int, int, int]]:
        # The whole count: a long LBA descriptor (LLBAA) carries 64 bits (SBC-4 6.5.2.3); the
        # short form's builder gives FFFFFFFFh for more (6.5.2.2).
        return [(0, self.num_blocks, self.block_size)]

    def device_specific_parameter(self) -> int:
        return 0x10  # SBC-4 6.5.1: DPOFUA — DPO and FUA are supported

    def log_pages(self) -> dict[tuple[int, int], Callable[[], bytes]]:
        pages = super().log_pages()
        if self._provisioning() is not None:
            pages[(0x0C, 0x00)] = self._lbp_log_page
        return pages

    def _lbp_log_page(self) -> bytes:
        info = self._provisioning()
        assert info is not None
        exp = self._threshold_exponent(info)
        unit = self.block_size << exp
        saved = [None if n is None else n // unit for n in (info.deduplicated, info.compressed)]
        return sbc.build_lbp_log_page(
            available=max(info.capacity - info.used, 0) // unit,
            used=info.device_used // unit,
            # SBC-4 6.4.5: the resources come from a pool other logical units may share, so their
            # scope is "not dedicated to the logical unit" (10b).
            scope=sbc.LbpScope.NOT_DEDICATED,
            # SBC-4 6.4.5.5-6.4.5.7: the resources made available by de-duplication, by
            # compression, and by both, in the same units.
            deduplicated=saved[0],
            compressed=saved[1],
            total_efficiency=(None if info.deduplicated is None else
                              (info.deduplicated + (info.compressed or 0)) // unit),
        )

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _check_range(self, lba: int, blocks: int) -> None:
        # SBC-4 4.5: LBA + count beyond the capacity -> LOGICAL BLOCK ADDRESS OUT OF RANGE.
        if lba + blocks > self.num_blocks:
            raise LbaOutOfRange(f"lba {lba} + {blocks} > {self.num_blocks}", info=lba)

    def _check_transfer(self, blocks: int, field: int) -> None:
        if blocks > self.max_transfer_blocks:
            # SBC-4 6.6.3: above MAXIMUM TRANSFER LENGTH -> INVALID FIELD IN CDB.
            raise InvalidFieldInCdb(f"transfer length {blocks}", field_pointer=field)

    def _threshold_crossed(self) -> None:
        self.queue_unit_attention(SoftThresholdReached())

    def _after_write(self) -> None:
        if self._threshold_event is not None and self._threshold_event():
            # SBC-4 4.7.3.7: report crossing the soft threshold as a unit attention.
            self.queue_unit_attention(SoftThresholdReached())

    def _write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        try:
            for at, group in _iov_groups(offset, bufs):
                self.backend.write(at, group)
        except OSError as exc:
            raise _io_error(exc, writing=True) from exc

    def _read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        try:
            for at, group in _iov_groups(offset, bufs):
                self.backend.read(at, group)
        except OSError as exc:
            raise _io_error(exc, writing=False) from exc

    def _flush(self) -> None:
        try:
            self.backend.flush()
        except OSError as exc:
            raise WriteError(str(exc)) from exc

    # Primitives the copy manager (`tcmu_py.device.xcopy_commands`) uses on source and
    # destination devices: the same locks and error mapping as this device's own commands.

    def lock_range(self, start: int, end: int) -> tuple[int, int, int]:
        """Take the write range lock on blocks [start, end) (see `RangeLock`)."""
        return self._ranges.acquire(start, end)

    def unlock_range(self, held: tuple[int, int, int]) -> None:
        self._ranges.release(held)

    def read_at(self, offset: int, buf: memoryview) -> None:
        """Read `len(buf)` bytes at byte `offset`; MediumError on a backend failure."""
        self._read(offset, [buf])

    def write_at(self, offset: int, buf: memoryview) -> None:
        """Write `buf` at byte `offset` (the caller holds the range lock); WriteError or
        SpaceAllocationFailed on a backend failure."""
        self._write(offset, [buf])

    def copy_in(self, source: BlockDevice, source_offset: int, offset: int, length: int) -> bool:
        """Have the backend copy `length` bytes from `source`'s backend at `source_offset` to
        byte `offset` (the caller holds the range lock): True when it did (`CopyRange`), False
        when it cannot or declines and the caller must move the bytes. WriteError or
        SpaceAllocationFailed on a backend failure."""
        if self.caps.copy_range is None:
            return False
        try:
            return self.caps.copy_range.copy_range(source.backend, source_offset, offset, length)
        except OSError as exc:
            raise _io_error(exc, writing=True) from exc

    def after_write(self) -> None:
        """Report a crossed thin-provisioning threshold after data was written."""
        self._after_write()

    def _check_medium(
        self, lba: int, length: int, expected: Callable[[int, int], bytes] | None = None
    ) -> None:
        """Read `length` bytes from `lba` in chunks of at most `_IO_CHUNK` (one buffer, reused),
        comparing each with `expected(position, size)` unless None. Raises Miscompare with the
        offset of the first byte that differs (SBC-4 5.3, 5.40)."""
        if not length:
            return
        step = max(1, _IO_CHUNK // self.block_size) * self.block_size
        buf = bytearray(min(length, step))
        view = memoryview(buf)
        base = lba * self.block_size
        pos = 0
        while pos < length:
            n = min(len(buf), length - pos)
            self._read(base + pos, [view[:n]])
            if expected is not None:
                want = expected(pos, n)
                got = buf if n == len(buf) else buf[:n]
                if got != want:
                    first = next(i for i in range(n) if got[i] != want[i])
                    # SBC-4 5.3: INFORMATION = offset of the first byte that did not match.
                    raise Miscompare(f"at byte {pos + first}", info=pos + first)
            pos += n

    # ------------------------------------------------------------------------------------------
    # Reads and writes

    def _rw(self, cdb: bytes) -> tuple[int, int, bool]:
        """(lba, blocks, fua) of a READ/WRITE, range- and length-checked.

        READ/WRITE(10)/(16) with no protection field set (the common case) are decoded right
        here; everything else, and anything to reject, goes through `cdb.parse_rw`, which owns
        the validation rules.
        """
        op = cdb[0]
        if op in (0x28, 0x2A) and len(cdb) >= 10 and not cdb[1] & 0xE0:
            lba, blocks = _RW10.unpack_from(cdb, 2)
            fua = bool(cdb[1] & 0x08)
            field = 7
        elif op in (0x88, 0x8A) and len(cdb) >= 16 and not cdb[1] & 0xE0:
            lba, blocks = _RW16.unpack_from(cdb, 2)
            fua = bool(cdb[1] & 0x08)
            field = 10
        else:
            rw = cdbs.parse_rw(cdb)
            lba, blocks, fua = rw.lba, rw.transfer_length, rw.fua
            field = _length_field(op)
        if lba + blocks > self.num_blocks or blocks > self.max_transfer_blocks:
            self._check_range(lba, blocks)  # both raise; the test above is their fast path
            self._check_transfer(blocks, field)
        return lba, blocks, fua

    @command(Opcode.READ_6)
    @command(Opcode.READ_10)
    @command(Opcode.READ_12)
    @command(Opcode.READ_16)
    def read(self, cmd: Command) -> int:
        lba, blocks, _ = self._rw(cmd.cdb)
        length = min(blocks * self.block_size, cmd.data_in_length)
        if length:
            bufs = cmd.data_in
            if length != cmd.data_in_length:
                bufs = slice_views(bufs, 0, length)
            self._read(lba * self.block_size, bufs)
        return length

    @command(Opcode.WRITE_6)
    @command(Opcode.WRITE_10)
    @command(Opcode.WRITE_12)
    @command(Opcode.WRITE_16)
    def write(self, cmd: Command) -> None:
        lba, blocks, fua = self._rw(cmd.cdb)
        length = blocks * self.block_size
        if length != cmd.data_out_length:
            check_data_out(cmd, length, data=True)  # raises: nothing is written
        if length:
            bufs = cmd.data_out
            if self._all_inline:
                # Every command runs on the one loop thread: nothing can overlap this write.
                self._write(lba * self.block_size, bufs)
            else:
                held = self._ranges.acquire(lba, lba + blocks)
                try:
                    self._write(lba * self.block_size, bufs)
                finally:
                    self._ranges.release(held)
            if self._threshold_event is not None:
                self._after_write()
        # SBC-4 5.49: FUA — the data must be on non-volatile media before GOOD.
        if fua and self.backend.write_cache:
            self._flush()

    @command(Opcode.SYNCHRONIZE_CACHE_10)
    @command(Opcode.SYNCHRONIZE_CACHE_16)
    def synchronize_cache(self, cmd: Command) -> None:
        req = cdbs.SynchronizeCache.parse(cmd.cdb)
        self._check_range(req.lba, req.blocks)
        lost = self.caps.lost_writes
        try:
            self._flush()
        except WriteError:
            if lost is not None:
                lost.lost_writes()  # this failure reports them
            raise
        why = lost.lost_writes() if lost is not None else None
        if why is not None:
            # SBC-4 5.24: the cache could not make every acknowledged write durable.
            raise WriteError(f"writes acknowledged since the last SYNCHRONIZE CACHE were lost: "
                             f"{why}")

    @command(Opcode.VERIFY_10)
    @command(Opcode.VERIFY_12)
    @command(Opcode.VERIFY_16)
    def verify(self, cmd: Command) -> None:
        rw = cdbs.parse_rw(cmd.cdb)
        self._check_range(rw.lba, rw.transfer_length)
        # SBC-4 5.40-5.42 / 6.6.4: VERIFY is bounded by the MAXIMUM TRANSFER LENGTH we
        # advertise in VPD B0h; above it -> INVALID FIELD IN CDB (VERIFICATION LENGTH).
        self._check_transfer(rw.transfer_length, _length_field(cmd.opcode))
        length = rw.transfer_length * self.block_size
        if rw.bytchk == 0:
            # SBC-4 5.40: BYTCHK 0 — verify the medium is readable (chunk by chunk).
            self._check_medium(rw.lba, length)
            return
        if rw.bytchk == 2:
            raise InvalidFieldInCdb("BYTCHK 10b", field_pointer=1, bit_pointer=1)
        if not length:
            return
        if rw.bytchk == 1:
            # BYTCHK 01b: the Data-Out holds every block to compare.
            check_data_out(cmd, length, field_pointer=_length_field(cmd.opcode))
            self._check_medium(rw.lba, length, partial(gather, cmd.data_out))
            return
        # BYTCHK 11b: one block, compared with every LBA of the range.
        check_data_out(cmd, self.block_size)
        block = cmd.read_data_out(self.block_size)
        pattern = block * max(1, min(length, _IO_CHUNK) // self.block_size)
        self._check_medium(rw.lba, length, lambda pos, n: pattern[:n])

    def _compare(self, lba: int, expected: bytes) -> None:
        self._check_medium(lba, len(expected), lambda pos, n: expected[pos : pos + n])

    @command(Opcode.WRITE_AND_VERIFY_10)
    @command(Opcode.WRITE_AND_VERIFY_12)
    @command(Opcode.WRITE_AND_VERIFY_16)
    def write_and_verify(self, cmd: Command) -> None:
        rw = cdbs.parse_rw(cmd.cdb)
        if rw.bytchk not in (0, 1):
            raise InvalidFieldInCdb("BYTCHK", field_pointer=1, bit_pointer=1)
        # The write checks the Data-Out length first. A subclass's WRITE may answer with a
        # Future (an asynchronous backend's): its outcome is the write's, waited for here, so
        # a failed write is its sense and not covered by the flush and compare below.
        written: object = self.write(cmd)
        if isinstance(written, Future):
            written.result()
        # SBC-4 5.41: after writing, check the medium (read back and compare when BYTCHK 1).
        self._flush()
        length = rw.transfer_length * self.block_size
        if length and rw.bytchk:
            self._check_medium(rw.lba, length, partial(gather, cmd.data_out))

    @command(Opcode.COMPARE_AND_WRITE)
    def compare_and_write(self, cmd: Command) -> None:
        rw = cdbs.parse_rw(cmd.cdb)
        if rw.transfer_length > MAX_COMPARE_AND_WRITE_BLOCKS:
            raise InvalidFieldInCdb("NUMBER OF LOGICAL BLOCKS", field_pointer=13)
        self._check_range(rw.lba, rw.transfer_length)
        length = rw.transfer_length * self.block_size
        if length == 0 and cmd.data_out_length:
            # A transfer the one-byte count cannot describe (256 blocks reads as 0): the CDB's
            # NUMBER OF LOGICAL BLOCKS is what is wrong, as libiscsi's CompareAndWrite.Simple
            # expects past MAXIMUM COMPARE AND WRITE LENGTH (SBC-4 5.3, 6.6.4).
            raise InvalidFieldInCdb("NUMBER OF LOGICAL BLOCKS", field_pointer=13)
        # SBC-4 5.3: the Data-Out holds exactly the verify and the write instances; a transfer
        # of another size is refused.
        check_data_out(cmd, 2 * length, data=True)
        if length == 0:
            return
        held = self._ranges.acquire(rw.lba, rw.lba + rw.transfer_length)
        try:
            self._compare(rw.lba, cmd.read_data_out(length))
            self._write(rw.lba * self.block_size, slice_views(cmd.data_out, length, length))
        finally:
            self._ranges.release(held)
        self._after_write()
        if rw.fua and self.backend.write_cache:
            self._flush()

    @command(Opcode.WRITE_SAME_10)
    @command(Opcode.WRITE_SAME_16)
    def write_same(self, cmd: Command) -> None:
        rw = cdbs.parse_rw(cmd.cdb)
        if rw.transfer_length == 0:
            # We advertise WSNZ=1 (VPD B0h), so zero blocks is an invalid field (SBC-4 5.50).
            raise InvalidFieldInCdb(
                "NUMBER OF LOGICAL BLOCKS is zero",
                field_pointer=10 if cmd.cdb[0] == Opcode.WRITE_SAME_16 else 7,
            )
        if rw.transfer_length > MAX_WRITE_SAME_BLOCKS:
            raise InvalidFieldInCdb(
                "NUMBER OF LOGICAL BLOCKS",
                field_pointer=10 if cmd.cdb[0] == Opcode.WRITE_SAME_16 else 7,
            )
        if rw.anchor:
            raise InvalidFieldInCdb("ANCHOR", field_pointer=1, bit_pointer=4)
        if rw.unmap and self.caps.unmap is None:
            raise InvalidFieldInCdb("UNMAP", field_pointer=1, bit_pointer=3)
        self._check_range(rw.lba, rw.transfer_length)
        if rw.ndob:
            block = bytes(self.block_size)
        else:
            check_data_out(cmd, self.block_size)  # SBC-4 5.50: one logical block of Data-Out
            block = cmd.read_data_out(self.block_size)
        offset = rw.lba * self.block_size
        length = rw.transfer_length * self.block_size
        held = self._ranges.acquire(rw.lba, rw.lba + rw.transfer_length)
        try:
            # SBC-4 5.50: with UNMAP, a zero block may be deallocated if LBPRZ makes reads zero.
            if rw.unmap and self.lbprz and not any(block):
                self._unmap(offset, length)
            elif self.caps.write_same is not None:
                try:
                    self.caps.write_same.write_same(offset, length, block, False)
                except OSError as exc:
                    raise _io_error(exc, writing=True) from exc
            else:
                self._fill(offset, length, block)
        finally:
            self._ranges.release(held)
        self._after_write()

    def _fill(self, offset: int, length: int, block: bytes) -> None:
        chunk = block * max(1, min(length, _IO_CHUNK) // len(block))
        view = memoryview(chunk)
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            self._write(offset + done, [view[:n]])
            done += n

    def _unmap(self, offset: int, length: int) -> None:
        assert self.caps.unmap is not None  # UNMAP is not dispatched without it (`supports`)
        try:
            self.caps.unmap.unmap(offset, length)
        except OSError as exc:
            raise _io_error(exc, writing=True) from exc

    @command(Opcode.UNMAP)
    def unmap(self, cmd: Command) -> None:
        req = cdbs.Unmap.parse(cmd.cdb)
        if req.anchor:
            raise InvalidFieldInCdb("ANCHOR", field_pointer=1, bit_pointer=0)
        if req.parameter_list_length == 0:
            return
        check_data_out(cmd, req.parameter_list_length, field_pointer=7)
        data = cmd.read_data_out(req.parameter_list_length)
        ranges = sbc.parse_unmap_parameters(data, MAX_UNMAP_BLOCK_DESCRIPTORS,
                                            max_lba_count=MAX_UNMAP_LBA_COUNT)
        for lba, count in ranges:
            self._check_range(lba, count)
        for lba, count in sbc.merge_ranges(ranges):
            held = self._ranges.acquire(lba, lba + count)
            try:
                self._unmap(lba * self.block_size, count * self.block_size)
            finally:
                self._ranges.release(held)
        # A deallocation of part of a dedup pool's chunk stores a new chunk: the use may grow.
        self._after_write()

    @command(Opcode.PRE_FETCH_10)
    @command(Opcode.PRE_FETCH_16)
    def pre_fetch(self, cmd: Command) -> None:
        rw = cdbs.parse_rw(cmd.cdb)
        self._check_range(rw.lba, rw.transfer_length)
        # SBC-4 5.9: a device without a cache reports GOOD (nothing to stage).

    # ------------------------------------------------------------------------------------------
    # Capacity and provisioning

    @command(Opcode.READ_CAPACITY_10, inline=True)
    def read_capacity_10(self, cmd: Command) -> int:
        cdbs.ReadCapacity10.parse(cmd.cdb)  # SBC-4 5.20.1: LBA without PMI is refused
        return cmd.write_data_in(sbc.build_read_capacity_10(self.num_blocks, self.block_size))

    @command(Opcode.SERVICE_ACTION_IN_16, ServiceAction.READ_CAPACITY_16, inline=True)
    def read_capacity_16(self, cmd: Command) -> int:
        req = cdbs.ReadCapacity16.parse(cmd.cdb)
        data = sbc.build_read_capacity_16(
            self.num_blocks,
            self.block_size,
            lbpme=self.caps.unmap is not None,
            lbprz=self.lbprz,
            lowest_aligned=0,
        )
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))

    @command(Opcode.SERVICE_ACTION_IN_16, ServiceAction.GET_LBA_STATUS)
    def get_lba_status(self, cmd: Command) -> int:
        req = cdbs.GetLbaStatus.parse(cmd.cdb)
        if req.lba >= self.num_blocks:
            raise LbaOutOfRange(f"lba {req.lba}", info=req.lba)
        # SBC-4 5.8: descriptors from the starting LBA; as many as fit the allocation length
        # and the Data-In buffer (not more: the list is built in memory).
        room = max((min(req.allocation_length, cmd.data_in_length) - 8) // 16, 1)
        span = self.num_blocks - req.lba
        assert self.caps.lba_status is not None  # not dispatched without it (`supports`)
        runs = self.caps.lba_status.lba_status(
            req.lba * self.block_size, span * self.block_size, max_runs=room
        )
        descs = [(off // self.block_size, n // self.block_size, st) for off, n, st in runs][:room]
        return cmd.write_data_in(
            spc.truncate(sbc.build_get_lba_status(descs), req.allocation_length)
        )

    @command(Opcode.START_STOP_UNIT, inline=True)
    def start_stop_unit(self, cmd: Command) -> None:
        req = cdbs.StartStopUnit.parse(cmd.cdb)
        if req.power_condition not in _POWER_CONDITIONS:
            # SBC-4 5.27: a reserved POWER CONDITION code is an invalid field in the CDB.
            raise InvalidFieldInCdb(f"POWER CONDITION {req.power_condition:#x}",
                                    field_pointer=4, bit_pointer=7)
        # SBC-4 5.27: nothing spins here; starting and stopping are accepted and change nothing.

    def resize(self, size: int) -> None:
        """The device was resized: new capacity, and CAPACITY DATA HAS CHANGED (SBC-4 4.6).

        Only a `Resizable` backend follows a new size; for any other the resize is refused
        (TcmuError) and nothing changes. The backend resizes first: if it fails, the device
        keeps its old capacity."""
        if self.caps.resize is None:
            raise TcmuError(
                f"{type(self.backend).__name__}: cannot be resized (implements no "
                "tcmu_py.backend.Resizable)"
            )
        self.caps.resize.resize(size)
        self.num_blocks = size // self.block_size
        self.queue_unit_attention(CapacityDataChanged())
        self.extent_version += 1  # the data plane's capacity (`data_extent`) changed too

    # ------------------------------------------------------------------------------------------
    # Copy offload (SPC-4 6.3, 6.18): the copy manager does the work

    @command(
        Opcode.EXTENDED_COPY,
        0x00,
        usage=bytes.fromhex("83000000000000000000ffffffff0000"),
    )
    def extended_copy(self, cmd: Command) -> None:
        self.copy_manager.extended_copy(cmd)

    @command(
        Opcode.RECEIVE_COPY_RESULTS,
        0x00,
        inline=True,
        usage=bytes.fromhex("840000ff000000000000ffffffff0000"),
    )
    @command(
        Opcode.RECEIVE_COPY_RESULTS,
        0x03,
        inline=True,
        usage=bytes.fromhex("84030000000000000000ffffffff0000"),
    )
    @command(
        Opcode.RECEIVE_COPY_RESULTS,
        0x04,
        inline=True,
        usage=bytes.fromhex("840400ff000000000000ffffffff0000"),
    )
    def receive_copy_results(self, cmd: Command) -> int:
        return self.copy_manager.receive_copy_results(cmd)

    def close(self) -> None:
        self.copy_domain.remove(self)
        if self.caps.close is not None:
            self.caps.close.close()


def open_block_device(config: DeviceConfig, backend: BlockBackend) -> BlockDevice:
    """Convenience for handlers: a BlockDevice whose product string names the subtype."""
    dev = BlockDevice(config, backend)
    dev.product = f"{config.subtype.upper()} DISK"[:16]
    return dev
