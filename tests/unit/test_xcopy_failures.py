"""EXTENDED COPY that fails, and what RECEIVE COPY RESULTS and the sense data then report:

* FAILED SEGMENT DETAILS survive a read cut short by ALLOCATION LENGTH (SPC-4 6.18.5);
* a copy that succeeded has no failed segment details (AVAILABLE DATA 0, SPC-4 6.18.5);
* TRANSFER COUNT counts the pieces written before a failure within a segment (SPC-4 6.18.2);
* COPY ABORTED names the failing segment in COMMAND-SPECIFIC INFORMATION (SPC-4 6.3.3);
* a thin destination reports a soft threshold crossed by a segment that then failed
  (SBC-4 4.7.3.7)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_xcopy_device import param_list

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.copydomain import CopyDomain
from tcmu_py.device.xcopy_commands import CHUNK
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.scsi import xcopy as x
from tcmu_py.scsi.constants import SenseKey
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import Result, run_command
from tcmu_py.testing.memory import MemoryDisk

BS = 512
BLOCKS = 256
MiB = 1 << 20
FAILED_SEGMENT_DETAILS = x.CopyResultsAction.FAILED_SEGMENT_DETAILS
SOFT_THRESHOLD_REACHED = (SenseKey.UNIT_ATTENTION, 0x38, 0x07)


class UnreadableDisk(MemoryDisk):
    """Every read fails with EIO: MEDIUM ERROR 11h/00h on the copy target."""

    def read(self, offset, bufs):  # noqa: ANN001, ANN201
        raise OSError(5, "EIO")


class FullAfter(MemoryDisk):
    """Writes at or beyond byte `limit` fail with ENOSPC (a backend out of space mid-segment)."""

    limit = 2 * CHUNK

    def write(self, offset, bufs):  # noqa: ANN001, ANN201
        if offset >= self.limit:
            raise OSError(28, "ENOSPC")
        return super().write(offset, bufs)


def disk(name: str, blocks: int = BLOCKS, backend: MemoryDisk | None = None) -> BlockDevice:
    if backend is None:
        backend = MemoryDisk(blocks * BS, BS)
        for i in range(blocks):  # every block distinct
            backend.data[i * BS : (i + 1) * BS] = (f"{name}:{i:05d}:".encode() * BS)[:BS]
    dev = BlockDevice(DeviceConfig(name, "mem", "", blocks * BS, BS), backend)
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    return dev


def domain(*devs: BlockDevice) -> None:
    d = CopyDomain("d")
    for dev in devs:
        dev.join(d)




def xcopy(dev: BlockDevice, data: bytes) -> Result:
    return run_command(dev, cdbs.extended_copy(len(data)), data)


def failed_copy(list_id: int) -> BlockDevice:
    """Device `a` after a held EXTENDED COPY from an unreadable device that failed."""
    a, b = disk("a"), disk("b", backend=UnreadableDisk(BLOCKS * BS, BS))
    domain(a, b)
    seg = x.BlockToBlockSegment(1, 0, 8, 0, 100)
    r = xcopy(a, param_list([a, b], [seg], list_id=list_id, usage=x.ListIdUsage.HOLD))
    assert r.sense_codes == (SenseKey.COPY_ABORTED, 0x11, 0x00)
    return a


# --- FAILED SEGMENT DETAILS -------------------------------------------------------------------


def test_failed_segment_details_survive_a_short_allocation_length():
    a = failed_copy(7)
    first = run_command(
        a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 7, allocation_length=4),
        data_in_len=4,
    )
    assert first.good and len(first.data) == 4
    available = int.from_bytes(first.data[:4], "big")
    assert available > 56
    # SPC-4 6.18.5: cut short by the allocation length, the details are not discarded ...
    whole = run_command(
        a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 7, allocation_length=256),
        data_in_len=256,
    )
    assert whole.good and len(whole.data) == 4 + available
    assert whole.data[56] == 0x02  # COPY COMMAND STATUS: CHECK CONDITION
    assert parse_sense(whole.data[60:]).sense_key == SenseKey.COPY_ABORTED
    # ... but once transferred whole, they are.
    again = run_command(a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 7), data_in_len=256)
    assert again.sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_failed_segment_details_discarded_by_allocation_length_zero():
    a = failed_copy(5)
    zero = run_command(
        a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 5, allocation_length=0),
        data_in_len=0,
    )
    assert zero.good
    after = run_command(a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 5), data_in_len=256)
    assert after.sense_codes == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_successful_copy_has_no_failed_segment_details():
    a = disk("a")
    seg = x.BlockToBlockSegment(0, 0, 8, 0, 100)
    assert xcopy(a, param_list([a], [seg], list_id=8, usage=x.ListIdUsage.HOLD)).good
    r = run_command(a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 8), data_in_len=256)
    # SPC-4 6.18.5: no failed segment details -> AVAILABLE DATA 0 and nothing beyond it.
    assert r.good and r.data == bytes(4)


# --- TRANSFER COUNT ---------------------------------------------------------------------------


def test_transfer_count_counts_pieces_written_before_a_failure():
    blocks = 4 * CHUNK // BS
    a = disk("a", blocks)
    full = FullAfter(blocks * BS, BS)
    b = disk("b", blocks, backend=full)
    domain(a, b)
    ok = x.BlockToBlockSegment(0, 1, 8, 0, 0)  # 4 KiB, completes
    big = x.BlockToBlockSegment(0, 1, blocks, 0, 0)  # fails at its third 1 MiB piece
    r = xcopy(a, param_list([a, b], [ok, big], list_id=9, usage=x.ListIdUsage.HOLD))
    assert r.sense_codes[0] == SenseKey.COPY_ABORTED
    got = x.CopyStatus.parse(
        run_command(a, cdbs.receive_copy_results(0, 9), data_in_len=64).data
    )
    assert got.status == x.CopyManagerStatus.FAILED
    assert got.segments_processed == 1
    # SPC-4 6.18.2: the data written to the destination — segment 0 and two pieces of segment 1.
    assert got.transfer_count == 8 * BS + 2 * CHUNK
    source = a.backend
    assert isinstance(source, MemoryDisk)
    assert full.data[: 2 * CHUNK] == source.data[: 2 * CHUNK]


# --- COMMAND-SPECIFIC INFORMATION: the failing segment ----------------------------------------


@pytest.mark.parametrize("descriptor", [False, True])
def test_copy_aborted_names_the_failing_segment(descriptor: bool):
    a, b = disk("a"), disk("b", backend=UnreadableDisk(BLOCKS * BS, BS))
    domain(a, b)
    a.d_sense = descriptor
    ok = x.BlockToBlockSegment(0, 0, 8, 0, 100)
    bad = x.BlockToBlockSegment(1, 0, 8, 0, 100)
    r = xcopy(a, param_list([a, b], [ok, ok, bad], list_id=3, usage=x.ListIdUsage.HOLD))
    sense = parse_sense(r.sense)
    assert sense.descriptor is descriptor
    assert (sense.sense_key, sense.asc, sense.ascq) == (SenseKey.COPY_ABORTED, 0x11, 0x00)
    # SPC-4 6.3.3: COMMAND-SPECIFIC INFORMATION bytes 2-3 = the segment being processed.
    assert sense.command_specific == 2
    if not descriptor:
        assert r.sense[10:12] == b"\x00\x02"
    details = run_command(a, cdbs.receive_copy_results(FAILED_SEGMENT_DETAILS, 3),
                          data_in_len=256)
    assert parse_sense(details.data[60:]).command_specific == 2


def test_segment_beyond_capacity_names_its_segment():
    a = disk("a")
    ok = x.BlockToBlockSegment(0, 0, 8, 0, 100)
    beyond = x.BlockToBlockSegment(0, 0, 8, 0, BLOCKS - 4)
    r = xcopy(a, param_list([a], [ok, beyond]))
    sense = parse_sense(r.sense)
    assert sense.sense_key == SenseKey.COPY_ABORTED
    assert sense.command_specific == 1


# --- post-write hook after a failed segment ---------------------------------------------------


def thin_disk(tmp_path: Path, name: str, size: int, capacity: int, soft: int) -> BlockDevice:
    path = str(tmp_path / "pool")
    create_pool(path, "p", capacity, soft, unit=64 * 1024)
    dev = ThinHandler.open(
        DeviceConfig(name=name, subtype="thin", cfgstring=f"pool={path}", size=size,
                     block_size=BS)
    )
    assert isinstance(dev, BlockDevice)
    run_command(dev, cdbs.test_unit_ready())
    return dev


def test_thin_destination_reports_threshold_crossed_by_a_failed_segment(tmp_path: Path):
    # Pool of 2.5 MiB, soft threshold 50 %: the segment's first two 1 MiB pieces cross it, the
    # third finds the pool full. SBC-4 4.7.3.7: the crossing is reported all the same.
    t = thin_disk(tmp_path, "t", 16 * MiB, 2 * MiB + MiB // 2, 50)
    a = disk("a", 4 * MiB // BS)
    domain(a, t)
    r = xcopy(a, param_list([a, t], [x.BlockToBlockSegment(0, 1, 4 * MiB // BS, 0, 0)],
                            list_id=4, usage=x.ListIdUsage.HOLD))
    assert r.sense_codes[0] == SenseKey.COPY_ABORTED  # the write's error, not hidden
    assert run_command(t, cdbs.test_unit_ready()).sense_codes == SOFT_THRESHOLD_REACHED
    got = x.CopyStatus.parse(run_command(a, cdbs.receive_copy_results(0, 4), data_in_len=64).data)
    assert got.transfer_count == 2 * MiB


def test_failing_post_write_hook_does_not_hide_the_copy_error(monkeypatch: pytest.MonkeyPatch):
    a, b = disk("a"), disk("b", backend=UnreadableDisk(BLOCKS * BS, BS))
    domain(a, b)
    calls: list[int] = []

    def broken_hook() -> None:
        calls.append(1)
        raise RuntimeError("hook")

    monkeypatch.setattr(a, "after_write", broken_hook)
    r = xcopy(a, param_list([a, b], [x.BlockToBlockSegment(1, 0, 8, 0, 100)]))
    assert r.sense_codes == (SenseKey.COPY_ABORTED, 0x11, 0x00)
    assert calls == [1]
