"""The copy manager of a block device: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS.

Rules this module obeys:

* A CSCD descriptor resolves only to a device of the receiving device's copy domain
  (`tcmu_py.device.copydomain`). Any other name is COPY ABORTED / COPY TARGET DEVICE NOT
  REACHABLE (SPC-4 6.3.6.1, as LIO answers), and that is decided — with every other check of
  every segment — before the first byte is read or written.
* Data moves backend to backend, never to the initiator: by the destination backend's own copy
  (`tcmu_py.backend.CopyRange`) when it offers one, else through one buffer per segment. A
  segment is at most `LIMITS.max_segment_length` bytes and a command at most
  `LIMITS.max_segment_descriptors` segments, so memory and time per command are bounded by the
  limits reported in VPD 8Fh and OPERATING PARAMETERS (the same `LIMITS` value builds both).
* Segments run in order; a segment is read whole before it is written, so a source and a
  destination that overlap within one device behave like memmove (SPC-4 6.3.7.5 copies the
  source as it was).
* Locks: a segment holds the destination device's range lock over the destination blocks for
  its read and write — the lock WRITE SAME and COMPARE AND WRITE take (block.py), so COMPARE
  AND WRITE stays atomic against a copy. Reads take no lock, as READ does not. A copy holds at
  most one range lock at a time, so two devices copying to each other cannot deadlock.
* Copy status (LIST ID USAGE 00b) is kept per device for a bounded number of list identifiers
  (TCMU gives no I_T nexus to key it by) and dropped once RECEIVE COPY RESULTS has reported a
  completed copy, or a failed copy's FAILED SEGMENT DETAILS whole (SPC-4 6.18.5).
* TRANSFER COUNT counts the bytes really written to a destination, piece by piece, so a copy
  that fails within a segment reports what it did write (SPC-4 6.18.2).
* COPY ABORTED from a segment carries the segment's number (0-based, in the order of the list)
  in COMMAND-SPECIFIC INFORMATION (SPC-4 6.3.3).
* A destination's post-write hook (thin-provisioning threshold) runs after every segment, also
  one that failed part-way: the blocks it did write count (SBC-4 4.7.3.7).

Threads: EXTENDED COPY runs on a worker thread (never inline: it may read another device's
blocking backend); the status table is guarded by the manager's lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tcmu_py.device.command import Command
from tcmu_py.device.core import check_data_out
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import spc, xcopy
from tcmu_py.scsi.constants import Opcode
from tcmu_py.scsi.sense import (
    CopyAborted,
    CopyTargetDeviceNotReachable,
    InsufficientResources,
    InvalidFieldInCdb,
    InvalidFieldInParameterList,
    OperationInProgress,
    ScsiError,
)

if TYPE_CHECKING:
    from tcmu_py.device.block import BlockDevice

#: What one EXTENDED COPY may ask for. Two CSCD descriptors (a source and a destination), four
#: segments of at most 8 MiB: 32 MiB per command, a few seconds on a slow disk, and every
#: segment libiscsi's ExtendedCopy tests send (2048 blocks of up to 4096 bytes) fits.
LIMITS = xcopy.CopyLimits(
    max_cscd_descriptors=2,
    max_segment_descriptors=4,
    # The longest list of descriptors the counts allow (E4h CSCDs, 02h segments).
    max_descriptor_list_length=2 * xcopy.CSCD_LENGTH + 4 * xcopy.B2B_LENGTH,
    max_segment_length=8 << 20,
    max_inline_data_length=0,
    total_concurrent_copies=4,
    max_identified_concurrent_copies=4,
)
#: Descriptor type codes accepted (OPERATING PARAMETERS and VPD 8Fh Supported Descriptors).
DESCRIPTOR_TYPES = (xcopy.SEGMENT_BLOCK_TO_BLOCK, xcopy.CSCD_IDENTIFICATION)
#: Service actions, for VPD 8Fh Supported Commands and the dispatch table.
COMMANDS = {
    Opcode.EXTENDED_COPY: (0x00,),
    Opcode.RECEIVE_COPY_RESULTS: (
        xcopy.CopyResultsAction.COPY_STATUS,
        xcopy.CopyResultsAction.OPERATING_PARAMETERS,
        xcopy.CopyResultsAction.FAILED_SEGMENT_DETAILS,
    ),
}
#: Completed copies whose status is held for RECEIVE COPY RESULTS (oldest dropped first).
HELD_STATUSES = 16
#: Bytes read or written per backend call within a segment.
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Step:
    """One checked segment: the devices, the byte offsets and the length to copy."""

    source: BlockDevice
    source_offset: int
    destination: BlockDevice
    destination_lba: int
    destination_blocks: int
    length: int


@dataclass(slots=True)
class _Status:
    """The copy status of one EXTENDED COPY: COPY MANAGER STATUS, SEGMENTS PROCESSED (whole
    segments), ``transferred`` (bytes written to destinations so far, partial segments
    included) and the sense data it ended with (empty unless it failed)."""

    status: int = xcopy.CopyManagerStatus.IN_PROGRESS
    segments: int = 0
    transferred: int = 0
    sense: bytes = b""


class CopyManager:
    """The EXTENDED COPY / RECEIVE COPY RESULTS state of one block device."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._running = 0
        self._statuses: OrderedDict[int, _Status] = OrderedDict()

    # --- pages -----------------------------------------------------------------------------

    def limits(self) -> xcopy.CopyLimits:
        """LIMITS with this device's block length as DATA SEGMENT GRANULARITY (log2)."""
        granularity = self.device.block_size.bit_length() - 1
        return xcopy.CopyLimits(
            LIMITS.max_cscd_descriptors,
            LIMITS.max_segment_descriptors,
            LIMITS.max_descriptor_list_length,
            LIMITS.max_segment_length,
            LIMITS.max_inline_data_length,
            LIMITS.total_concurrent_copies,
            LIMITS.max_identified_concurrent_copies,
            granularity,
        )

    def vpd_page(self) -> bytes:
        """Third-party Copy VPD page 8Fh (SPC-4 7.8.17)."""
        commands = {int(op): [int(sa) for sa in sas] for op, sas in COMMANDS.items()}
        return xcopy.build_vpd_third_party_copy(
            self.device.peripheral_type, self.limits(), commands, DESCRIPTOR_TYPES
        )

    # --- EXTENDED COPY ---------------------------------------------------------------------

    def extended_copy(self, cmd: Command) -> None:
        """EXTENDED COPY (LID1): check every descriptor, then run the segments in order.

        Any failure while a segment runs ends the command with COPY ABORTED whose
        COMMAND-SPECIFIC INFORMATION is the failing segment's number; the copy status then
        holds the segments completed and the bytes written, partial segment included."""
        req = cdbs.ExtendedCopy.parse(cmd.cdb)
        if req.parameter_list_length == 0:
            return  # SPC-4 6.3.1: not an error; nothing is copied
        check_data_out(cmd, req.parameter_list_length, field_pointer=10)
        data = cmd.read_data_out(req.parameter_list_length)
        plist = xcopy.parse_parameter_list(data, self.limits())
        assert plist is not None
        targets = [self._resolve(plist, i) for i in range(len(plist.cscds))]
        steps = [self._plan(plist, j, targets) for j in range(len(plist.segments))]
        header = plist.header
        held = header.list_id_usage != xcopy.ListIdUsage.NONE
        status = self._start(header.list_identifier if held else None)
        try:
            for step in steps:
                self._copy(step, status)
                status.segments += 1
        except ScsiError as exc:
            aborted = exc if isinstance(exc, CopyAborted) else _aborted(exc)
            if aborted.command_specific is None:
                # SPC-4 6.3.3: COMMAND-SPECIFIC INFORMATION bytes 2-3 hold the number of the
                # segment descriptor being processed when the copy failed: segments run in
                # order, so its number is the count of those completed.
                aborted.command_specific = status.segments
            status.status = xcopy.CopyManagerStatus.FAILED
            status.sense = aborted.sense()
            raise aborted from exc
        else:
            status.status = xcopy.CopyManagerStatus.COMPLETED
        finally:
            self._finish(header.list_identifier if held else None, header.list_id_usage)

    def _resolve(self, plist: xcopy.ParameterList, index: int) -> BlockDevice:
        cscd = plist.cscds[index]
        at = plist.cscd_offset(index)
        dev = self.device.copy_domain.find(cscd.designator)
        if dev is None:
            # SPC-4 6.3.6.1: the designator names no logical unit this copy manager may address
            # (none of the device's copy domain): COPY TARGET DEVICE NOT REACHABLE.
            raise CopyTargetDeviceNotReachable(
                f"no device {cscd.designator.hex()} in copy domain "
                f"{self.device.copy_domain.name!r}",
                field_pointer=at + 8,
                in_cdb=False,
            )
        if cscd.block_length != dev.block_size:
            # SPC-4 6.3.6.4.1: DISK BLOCK LENGTH is the copy target's logical block length.
            raise InvalidFieldInParameterList(
                f"DISK BLOCK LENGTH {cscd.block_length}, device has {dev.block_size}",
                field_pointer=at + 29,
            )
        return dev

    def _plan(self, plist: xcopy.ParameterList, index: int, targets: list[BlockDevice]) -> _Step:
        seg = plist.segments[index]
        at = plist.segment_offset(index)
        src, dst = targets[seg.source_index], targets[seg.destination_index]
        # SPC-4 6.3.7.5: DC 0 counts source blocks, DC 1 destination blocks.
        length = seg.number_of_blocks * (dst.block_size if seg.dc else src.block_size)
        if length % src.block_size or length % dst.block_size:
            raise InvalidFieldInParameterList(
                "NUMBER OF BLOCKS is no whole number of blocks of both devices",
                field_pointer=at + 10,
            )
        if length > LIMITS.max_segment_length:
            # SPC-4 6.18.4: MAXIMUM SEGMENT LENGTH bounds the bytes one segment copies.
            raise InvalidFieldInParameterList(
                f"segment of {length} bytes", field_pointer=at + 10
            )
        for dev, lba, where in ((src, seg.source_lba, 12), (dst, seg.destination_lba, 20)):
            if lba + length // dev.block_size > dev.num_blocks:
                # A copy target would refuse the blocks (LBA OUT OF RANGE); the copy manager
                # reports COPY ABORTED before copying anything (libiscsi ValidSegDescr).
                # SPC-4 6.3.3: the segment's number in COMMAND-SPECIFIC INFORMATION bytes 2-3.
                raise CopyAborted(
                    f"segment {index}: LBA {lba}+{length // dev.block_size} beyond "
                    f"{dev.num_blocks} blocks",
                    field_pointer=at + where,
                    in_cdb=False,
                    command_specific=index,
                )
        return _Step(
            src,
            seg.source_lba * src.block_size,
            dst,
            seg.destination_lba,
            length // dst.block_size,
            length,
        )

    def _copy(self, step: _Step, status: _Status) -> None:
        """Copy one segment, adding the bytes written to ``status.transferred``.

        Raises the copy target's ScsiError on failure, after running the destination's
        post-write hook: a segment that fails after writing part of its blocks may still have
        crossed a thin-provisioning soft threshold, which the destination must report
        (SBC-4 4.7.3.7). A failure of the hook itself never replaces the copy's error."""
        if not step.length:
            return
        dst = step.destination
        held = dst.lock_range(step.destination_lba, step.destination_lba + step.destination_blocks)
        try:
            try:
                base = step.destination_lba * dst.block_size
                # The destination's backend may copy the whole segment itself (`CopyRange`, e.g.
                # copy_file_range between two images). It is offered whole — never in pieces,
                # which would read, from overlapping ranges of one image, bytes an earlier piece
                # already overwrote — and declines what it cannot copy as memmove would.
                if dst.copy_in(step.source, step.source_offset, base, step.length):
                    status.transferred += step.length
                else:
                    self._move(step, base, status)
            finally:
                dst.unlock_range(held)
        except BaseException:
            try:
                dst.after_write()
            except Exception:
                dst.log.exception("post-write hook after a failed copy segment")
            raise
        dst.after_write()

    @staticmethod
    def _move(step: _Step, base: int, status: _Status) -> None:
        """Copy the segment through one buffer: the whole source is read before the first
        write, so an overlapping destination gets the source as it was (memmove), whichever way
        the ranges overlap. Each piece written whole is added to ``status.transferred`` at
        once (SPC-4 6.18.2: TRANSFER COUNT is the data written to a destination), so a segment
        that fails part-way reports the pieces before the failing one."""
        view = memoryview(bytearray(step.length))
        for pos in range(0, step.length, CHUNK):
            step.source.read_at(step.source_offset + pos, view[pos : pos + CHUNK])
        for pos in range(0, step.length, CHUNK):
            piece = view[pos : pos + CHUNK]
            step.destination.write_at(base + pos, piece)
            status.transferred += len(piece)

    def _start(self, list_id: int | None) -> _Status:
        status = _Status()
        with self._lock:
            if self._running >= LIMITS.total_concurrent_copies:
                # SPC-4 6.18.4: TOTAL CONCURRENT COPIES is what the copy manager runs at once.
                raise InsufficientResources(f"{self._running} copies running")
            if list_id is not None:
                old = self._statuses.get(list_id)
                if old is not None and old.status == xcopy.CopyManagerStatus.IN_PROGRESS:
                    # SPC-4 6.3.1: a LIST IDENTIFIER of a copy still running.
                    raise OperationInProgress(f"list identifier {list_id} in use")
                self._statuses.pop(list_id, None)
                self._statuses[list_id] = status
            self._running += 1
        return status

    def _finish(self, list_id: int | None, usage: int) -> None:
        with self._lock:
            self._running -= 1
            if list_id is None:
                return
            if usage != xcopy.ListIdUsage.HOLD:
                # LIST ID USAGE 10b: the identifier is free again, nothing is held.
                self._statuses.pop(list_id, None)
                return
            done = [k for k, v in self._statuses.items()
                    if v.status != xcopy.CopyManagerStatus.IN_PROGRESS]
            for k in done[: max(0, len(done) - HELD_STATUSES)]:
                del self._statuses[k]

    # --- RECEIVE COPY RESULTS --------------------------------------------------------------

    def receive_copy_results(self, cmd: Command) -> int:
        """RECEIVE COPY RESULTS (LID1): COPY STATUS, OPERATING PARAMETERS or FAILED SEGMENT
        DETAILS. Returns the Data-In length.

        Held status is discarded: a completed copy's once COPY STATUS reported it; a finished
        copy's once FAILED SEGMENT DETAILS were transferred whole or asked for with ALLOCATION
        LENGTH 0 — never when the allocation length cut the details short (SPC-4 6.18.5)."""
        req = cdbs.ReceiveCopyResults.parse(cmd.cdb)
        action = req.service_action
        if action == xcopy.CopyResultsAction.OPERATING_PARAMETERS:
            data = xcopy.OperatingParameters(self.limits(), DESCRIPTOR_TYPES).build()
            return cmd.write_data_in(spc.truncate(data, req.allocation_length))
        with self._lock:
            status = self._statuses.get(req.list_identifier)
            if status is None or (
                action == xcopy.CopyResultsAction.FAILED_SEGMENT_DETAILS
                and status.status == xcopy.CopyManagerStatus.IN_PROGRESS
            ):
                # SPC-4 6.18.2: a LIST IDENTIFIER with no copy status held -> INVALID FIELD
                # IN CDB (libiscsi ReceiveCopyResults.CopyStatus, "no copy in progress").
                raise InvalidFieldInCdb(
                    f"no copy status for list identifier {req.list_identifier}",
                    field_pointer=2,
                )
            if action == xcopy.CopyResultsAction.COPY_STATUS:
                data = xcopy.CopyStatus(status.status, status.segments, status.transferred).build()
                # SPC-4 6.18.2: a completed copy's status is discarded once reported.
                done = status.status == xcopy.CopyManagerStatus.COMPLETED
            else:
                data = _failed_segment_details(status)
                # SPC-4 6.18.5: the details are discarded once transferred whole, or when asked
                # for with ALLOCATION LENGTH 0; if the allocation length cut them short, they
                # shall not be discarded (the client reads AVAILABLE DATA, then asks again).
                done = req.allocation_length == 0 or len(data) <= req.allocation_length
            if done:
                del self._statuses[req.list_identifier]
        return cmd.write_data_in(spc.truncate(data, req.allocation_length))


def _failed_segment_details(status: _Status) -> bytes:
    """FAILED SEGMENT DETAILS parameter data for a finished copy: its COPY COMMAND STATUS
    (CHECK CONDITION) and sense data if it failed. A copy that succeeded has no failed segment
    details: SPC-4 6.18.5 sets AVAILABLE DATA to zero and returns nothing beyond it."""
    if not status.sense:
        return bytes(4)
    return xcopy.build_failed_segment_details(0x02, status.sense)


def _aborted(exc: ScsiError) -> CopyAborted:
    """A copy target's error during a copy, as the copy manager reports it: COPY ABORTED with the
    target's additional sense code (SPC-4 6.3.3), e.g. 11h/00h for an unreadable source block.
    The caller sets COMMAND-SPECIFIC INFORMATION to the failing segment's number."""
    return CopyAborted(str(exc), asc=exc.asc, ascq=exc.ascq)
