"""A deallocation never fails for want of the space it gives back: on a full dedup pool an
UNMAP or WRITE SAME with UNMAP of part of a chunk (fstrim's 4 KiB ranges on a disk of 16-64 KiB
chunks) stores the chunk with zeros patched in, answers GOOD and reads zeros there, where it
answered DATA PROTECT 27/07 (after having deallocated the command's earlier ranges). Writes
of new data are still refused on the full pool, with nothing changed (SBC-4 4.7.3.8)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.dedup import DedupHandler, check_pool, create_pool
from tcmu_py.testing import cdbs, harness

CS, BS = 4096, 512
PER = CS // BS  # blocks per chunk


def _chunk(seed: int) -> bytes:
    return random.Random(seed).randbytes(CS)


class _Disk:
    """A harness over a dedup disk whose pool (8 chunks) is full: chunks 0..7 distinct."""

    def __init__(self, path: str) -> None:
        self.path = path
        create_pool(path, "p", 8 * CS, 50)
        self.dev = DedupHandler.open(DeviceConfig(
            name="d0", subtype="dedup", cfgstring=f"pool={path}", size=16 * CS,
            block_size=BS, write_cache=False))
        self.h = harness.RingHarness(self.dev)
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.h.close()
            self.dev.close()


@pytest.fixture
def full(tmp_path: os.PathLike[str]) -> Iterator[_Disk]:
    disk = _Disk(os.path.join(tmp_path, "p"))
    try:
        h = disk.h
        h.run(cdbs.test_unit_ready())
        assert h.run(cdbs.write10(0, 8 * PER), b"".join(_chunk(i) for i in range(8))).good
        assert disk.dev.backend.pool.used == disk.dev.backend.pool.capacity
        h.run(cdbs.test_unit_ready())  # the soft threshold's unit attention
        yield disk
    finally:
        disk.close()


def _read_chunk(h: Any, idx: int) -> bytes:
    r = h.run(cdbs.read10(idx * PER, PER), data_in_len=CS)
    assert r.good
    return bytes(r.data)


def _zeroed(idx: int, first: int, count: int) -> bytes:
    """Chunk `idx`'s data with blocks [first, first+count) of it zeroed."""
    data = bytearray(_chunk(idx))
    data[first * BS:(first + count) * BS] = bytes(count * BS)
    return bytes(data)


def test_unmap_of_part_of_a_chunk_on_a_full_pool(full: _Disk) -> None:
    h = full.h
    params = cdbs.unmap_parameters([(2 * PER, PER), (3 * PER + 1, 1)])  # chunk 2 whole, then part
    r = h.run(cdbs.unmap(len(params)), params)
    assert r.good, r
    assert _read_chunk(h, 2) == bytes(CS)
    assert _read_chunk(h, 3) == _zeroed(3, 1, 1)
    for idx in (0, 1, 4, 5, 6, 7):
        assert _read_chunk(h, idx) == _chunk(idx)


def test_write_same_with_unmap_of_part_of_a_chunk_on_a_full_pool(full: _Disk) -> None:
    h = full.h
    r = h.run(cdbs.write_same16(4 * PER + 1, 2, unmap=True), bytes(BS))
    assert r.good, r
    assert _read_chunk(h, 4) == _zeroed(4, 1, 2)


def test_writes_of_new_data_are_still_refused_with_nothing_changed(full: _Disk
                                                                   ) -> None:
    h = full.h
    h.run(cdbs.unmap(24), cdbs.unmap_parameters([(5 * PER, 1)]))  # the pool goes past full
    r = h.run(cdbs.write10(6 * PER, 1), b"\x5a" * BS)
    assert r.sense_codes == (0x07, 0x27, 0x07)
    assert _read_chunk(h, 6) == _chunk(6)
    r = h.run(cdbs.write_same16(7 * PER + 1, 2, unmap=True), b"\x01" * BS)  # not zeros: a write
    assert r.sense_codes == (0x07, 0x27, 0x07)
    assert _read_chunk(h, 7) == _chunk(7)


def test_a_write_that_fits_once_dead_chunks_are_compacted_is_not_refused(full: _Disk) -> None:
    """The hard limit is live data filling the pool: dead chunks the collector has not yet
    compacted (unmapped, overwritten) are compacted for a write that needs their room, which
    answered DATA PROTECT 27/07 before, until the collector came by (or never, for a container
    less than half dead)."""
    h, pool = full.h, full.dev.backend.pool
    params = cdbs.unmap_parameters([(0, 3 * PER)])  # chunks 0-2: 3 of the 8 chunks dead
    assert h.run(cdbs.unmap(len(params)), params).good
    assert pool.used == pool.capacity
    new = b"".join(_chunk(100 + i) for i in range(3))
    r = h.run(cdbs.write10(8 * PER, 3 * PER), new)
    assert r.good, r
    assert pool.used <= pool.capacity
    assert b"".join(_read_chunk(h, 8 + i) for i in range(3)) == new
    for idx in range(3, 8):
        assert _read_chunk(h, idx) == _chunk(idx)
    # Live data fills the pool now: refused at once, nothing changed.
    r = h.run(cdbs.write10(0, PER), _chunk(200))
    assert r.sense_codes == (0x07, 0x27, 0x07)
    assert _read_chunk(h, 0) == bytes(CS)
    full.close()
    report = check_pool(full.path)
    assert report.clean, report


def test_the_pool_checks_clean_after_deallocating_past_full(full: _Disk) -> None:
    h = full.h
    params = cdbs.unmap_parameters([(PER * i + 3, 2) for i in range(8)])  # part of every chunk
    assert h.run(cdbs.unmap(len(params)), params).good
    for idx in range(8):
        assert _read_chunk(h, idx) == _zeroed(idx, 3, 2)
    full.close()
    report = check_pool(full.path)
    assert report.clean, report


def test_a_pool_far_larger_than_its_disk_keeps_mode_sense_working(
        tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the THRESHOLD EXPONENT was chosen from the disk's size alone, so a 32 TiB pool's
    soft threshold (80 %, in 4 KiB units) overflowed MODE SENSE's 32-bit THRESHOLD COUNT: every
    MODE SENSE (the caching page sd reads at attach too) failed HARDWARE ERROR. Now the unit
    grows with the pool (SBC-4 6.5.8, 6.6.4) and LOG SENSE 0Ch's counts fit too."""
    import struct

    class _Big:
        f_bavail, f_frsize = 1 << 40, 1 << 20

    path = os.path.join(tmp_path, "big")
    with monkeypatch.context() as m:
        m.setattr(os, "statvfs", lambda p: _Big())
        create_pool(path, "big", 32 << 40, 80)
    dev = DedupHandler.open(DeviceConfig("d", "dedup", f"pool={path}", 1 << 30, block_size=512))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())
        for cdb in (cdbs.mode_sense10(0x1C, 0x02, dbd=True), cdbs.mode_sense10(0x3F, 0xFF),
                    cdbs.mode_sense6(0x08, dbd=True)):
            r = harness.run_command(dev, cdb, b"", 4096)
            assert r.good, (cdb.hex(), r)
        exp = harness.run_command(dev, cdbs.inquiry(True, 0xB2), b"", 64).data[4]
        unit = 512 << exp
        page = harness.run_command(dev, cdbs.mode_sense10(0x1C, 0x02, dbd=True), b"", 255).data
        (count,) = struct.unpack(">I", page[8 + 16 + 4:8 + 16 + 8])
        assert count == -(-(32 << 40) * 80 // (100 * unit))  # the pool's 80 %, not clipped
    finally:
        dev.close()


def _open_disk(path: str, name: str) -> Any:
    dev = DedupHandler.open(DeviceConfig(name, "dedup", f"pool={path};disk={name}", 32 * CS,
                                         block_size=BS))
    harness.run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    return dev


def _write_chunks(dev: Any, seeds: range) -> None:
    """Chunks `_chunk(seed)` for each of `seeds`, from LBA 0."""
    data = b"".join(_chunk(i) for i in seeds)
    assert harness.run_command(dev, cdbs.write10(0, len(data) // BS), data).good


def _unmap(dev: Any, lba: int, blocks: int) -> None:
    params = cdbs.unmap_parameters([(lba, blocks)])
    assert harness.run_command(dev, cdbs.unmap(len(params)), params).good


def test_a_deallocation_that_crosses_the_soft_threshold_is_reported(
        tmp_path: os.PathLike[str]) -> None:
    """Before: part of a chunk deallocated (a new chunk stored, past the capacity check) could
    take the use over the soft threshold without counting a crossing, and SOFT THRESHOLD
    REACHED 38h/07h never came, even as later writes filled the pool (SBC-4 4.7.3.7)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 10 * CS, 50)
    dev = _open_disk(path, "d")
    try:
        _write_chunks(dev, range(4))  # 40 %
        assert harness.run_command(dev, cdbs.test_unit_ready()).good
        _unmap(dev, 1, 1)  # one block of chunk 0: a new chunk, 50 %
        assert dev.backend.pool.above_threshold
        r = harness.run_command(dev, cdbs.test_unit_ready())
        assert r.sense_codes == (0x06, 0x38, 0x07), r
    finally:
        dev.close()


def test_a_disk_opened_after_a_crossing_undone_reports_none(tmp_path: os.PathLike[str]
                                                           ) -> None:
    """Before: a disk opened on a pool that had crossed its threshold and gone back below it
    (everything unmapped and collected) reported 38h/07h on its first command after a write.
    A disk opened on a pool above its threshold still reports it once."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 10 * CS, 50)
    a = _open_disk(path, "a")
    try:
        _write_chunks(a, range(6))  # 60 %
        assert harness.run_command(a, cdbs.test_unit_ready()).sense_codes == (0x06, 0x38, 0x07)
        _unmap(a, 0, 6 * PER)
        pool = a.backend.pool
        pool.collect(10)
        assert not pool.above_threshold
        b = _open_disk(path, "b")
        try:
            assert harness.run_command(b, cdbs.write10(0, PER), _chunk(50)).good  # 10 %
            assert harness.run_command(b, cdbs.test_unit_ready()).good
            _write_chunks(a, range(60, 65))
            c = _open_disk(path, "c")  # the pool is above its threshold: reported once
            try:  # (after a write, as every disk of a pool learns of a crossing)
                assert harness.run_command(c, cdbs.write10(0, PER), _chunk(50)).good
                assert harness.run_command(c, cdbs.test_unit_ready()).sense_codes == (
                    0x06, 0x38, 0x07)
                assert harness.run_command(c, cdbs.test_unit_ready()).good
            finally:
                c.close()
        finally:
            b.close()
    finally:
        a.close()


def test_a_crossing_is_reported_on_every_disk_of_the_pool_at_its_next_command(
        tmp_path: os.PathLike[str]) -> None:
    """Before: a disk of the pool learnt of another disk's crossing only after a write of its
    own succeeded: one that only read, or whose writes the full pool refused, never got SOFT
    THRESHOLD REACHED 38h/07h. Now with its next command (SBC-4 4.7.3.7)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 10 * CS, 50)
    a, b = _open_disk(path, "a"), _open_disk(path, "b")
    try:
        _write_chunks(a, range(5))  # 50 %: a's write crosses
        r = harness.run_command(b, cdbs.read10(0, PER), b"", CS)
        assert r.sense_codes == (0x06, 0x38, 0x07), r
        assert harness.run_command(b, cdbs.read10(0, PER), b"", CS).good
        assert harness.run_command(a, cdbs.test_unit_ready()).sense_codes == (0x06, 0x38, 0x07)
        assert harness.run_command(a, cdbs.test_unit_ready()).good
    finally:
        b.close()
        a.close()


def test_an_unmap_runs_in_bounded_steps(tmp_path: os.PathLike[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deallocation is handled in steps of at most UNMAP_STEP_CHUNKS chunks: the same result
    as one step (partial chunks at both ends keep their other blocks), and memory bounded by
    the step, not by the range (before: ~75 MB per GiB of 4 KiB chunks in one step)."""
    import tracemalloc

    from tcmu_py.handlers.dedup import backend as dedup_backend

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, None)
    monkeypatch.setattr(dedup_backend, "UNMAP_STEP_CHUNKS", 2)
    dev = _open_disk(path, "d")  # 32 chunks
    try:
        data = b"".join(_chunk(i) for i in range(10))
        assert harness.run_command(dev, cdbs.write10(0, 10 * PER), data).good
        params = cdbs.unmap_parameters([(3, 8 * PER - 6)])  # blocks 3 .. 8*PER-4
        assert harness.run_command(dev, cdbs.unmap(len(params)), params).good
        got = harness.run_command(dev, cdbs.read10(0, 10 * PER), b"", 10 * CS).data
        want = bytearray(data)
        want[3 * BS:(8 * PER - 3) * BS] = bytes((8 * PER - 6) * BS)
        assert got == bytes(want)
    finally:
        dev.close()
    assert check_pool(path).clean

    monkeypatch.setattr(dedup_backend, "UNMAP_STEP_CHUNKS", 1 << 12)
    big = os.path.join(tmp_path, "big")
    create_pool(big, "big", 64 * CS, None)
    dev = DedupHandler.open(DeviceConfig("b", "dedup", f"pool={big}", 512 << 20, block_size=BS))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())
        assert harness.run_command(dev, cdbs.write10(0, PER), _chunk(1)).good
        params = cdbs.unmap_parameters([(0, (512 << 20) // BS)])
        tracemalloc.start()
        try:
            assert harness.run_command(dev, cdbs.unmap(len(params)), params).good
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 12 << 20, peak  # 512 MiB of 4 KiB chunks in one step: ~40 MB
        assert harness.run_command(dev, cdbs.read10(0, PER), b"", CS).data == bytes(CS)
    finally:
        dev.close()


def test_get_lba_status_says_it_does_not_filter_by_report_type(
        tmp_path: os.PathLike[str]) -> None:
    """Before: REPORT SUPPORTED OPERATION CODES marked GET LBA STATUS's REPORT TYPE (byte 14)
    as evaluated, while every descriptor was returned whatever it asked. Now the usage data
    says it is not, as the response's RTP bit (zero) does (SBC-4 5.8)."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, None)
    dev = _open_disk(path, "d")
    try:
        r = harness.run_command(dev, cdbs.report_supported_operation_codes(
            reporting_options=3, requested_opcode=0x9E, requested_service_action=0x12), b"", 64)
        assert r.good and r.data[1] & 7 == 3, r  # supported, as the standard says
        usage = r.data[4:4 + int.from_bytes(r.data[2:4], "big")]
        assert usage[:2] == b"\x9e\x12" and usage[14] == 0, usage.hex()
        lba = harness.run_command(dev, cdbs.get_lba_status(0, 24), b"", 24)
        assert lba.good and lba.data[7] & 1 == 0  # RTP: REPORT TYPE not acted on
    finally:
        dev.close()


def test_a_threshold_count_the_pool_cannot_hold_is_rounded_and_said_so(
        tmp_path: os.PathLike[str]) -> None:
    """Before: MODE SELECT of page 1Ch/02h with a THRESHOLD COUNT the pool cannot hold (it
    keeps whole percents) answered GOOD and MODE SENSE then showed another count. Now the
    rounded count is in effect and the command says so: RECOVERED ERROR, ROUNDED PARAMETER
    01h/37h/00h (SPC-5 5.9); a count it holds exactly is GOOD."""
    import struct

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, 80)
    dev = _open_disk(path, "d")  # the threshold unit is one chunk: 64 units, 1 % = 0.64

    def page() -> bytearray:
        r = harness.run_command(dev, cdbs.mode_sense10(0x1C, 0x02, dbd=True), b"", 255)
        return bytearray(r.data[8:])

    def select(count: int) -> Any:
        body = page()
        body[0] &= 0x7F  # PS is reserved in MODE SELECT
        struct.pack_into(">I", body, 20, count)
        params = bytes(8) + bytes(body)
        return harness.run_command(dev, cdbs.mode_select10(len(params)), params)

    try:
        for asked, held in ((0, 1), (1000, 64)):
            r = select(asked)
            assert r.sense_codes == (0x01, 0x37, 0x00), (asked, r)
            assert struct.unpack_from(">I", page(), 20)[0] == held, asked
        for asked, percent in ((32, 50), (49, 76), (50, 78)):  # counts rounded up: all held
            assert select(asked).good, asked
            assert struct.unpack_from(">I", page(), 20)[0] == asked
            assert dev.backend.pool.soft_threshold == percent
    finally:
        dev.close()


def test_get_lba_status_examines_a_bounded_window(tmp_path: os.PathLike[str]) -> None:
    """Before: GET LBA STATUS read every map row from its LBA to the end of the disk under the
    pool's lock (1.1 s on a 4 GiB disk mapped whole, minutes at 1 TiB, the pool's other disks
    waiting). Now at most `LBA_STATUS_CHUNKS` chunks: the descriptor of a disk mapped whole
    ends there, and asking again from its end reports the rest (SBC-4 5.8)."""
    from tcmu_py.handlers.dedup.backend import LBA_STATUS_CHUNKS

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 64 * CS, None)
    chunks = LBA_STATUS_CHUNKS + LBA_STATUS_CHUNKS // 2
    blocks = chunks * PER
    dev = DedupHandler.open(DeviceConfig("w", "dedup", f"pool={path}", chunks * CS,
                                         block_size=BS))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())
        step = 1 << 22  # MAXIMUM WRITE SAME LENGTH
        for lba in range(0, blocks, step):
            n = min(step, blocks - lba)
            assert harness.run_command(dev, cdbs.write_same16(lba, n), b"\x42" * BS).good

        def descriptors(lba: int) -> list[tuple[int, int, int]]:
            r = harness.run_command(dev, cdbs.get_lba_status(lba), b"", 4096)
            assert r.good, r
            n = (int.from_bytes(r.data[0:4], "big") - 4) // 16
            return [(int.from_bytes(d[0:8], "big"), int.from_bytes(d[8:12], "big"), d[12] & 0xF)
                    for d in (r.data[8 + 16 * i: 24 + 16 * i] for i in range(n))]

        assert descriptors(0) == [(0, LBA_STATUS_CHUNKS * PER, 0)]
        rest = LBA_STATUS_CHUNKS * PER
        assert descriptors(rest) == [(rest, blocks - rest, 0)]
        assert descriptors(3) == [(3, LBA_STATUS_CHUNKS * PER - 3, 0)]
    finally:
        dev.close()


def test_the_unit_attention_comes_when_the_used_count_reaches_the_threshold_count(
        tmp_path: os.PathLike[str]) -> None:
    """Before: MODE SENSE's THRESHOLD COUNT was rounded down (80 % of 32 chunks: 25), and SOFT
    THRESHOLD REACHED came only at 26 chunks used (the pool's 25.6). The count is rounded up
    now: the unit attention comes when LOG SENSE 0Ch's used count reaches it."""
    import struct

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 32 * CS, 80)
    dev = DedupHandler.open(DeviceConfig("d", "dedup", f"pool={path}", 64 * CS, block_size=BS))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())
        page = harness.run_command(dev, cdbs.mode_sense10(0x1C, 0x02, dbd=True), b"", 255).data
        (count,) = struct.unpack(">I", page[8 + 16 + 4:8 + 16 + 8])
        assert count == 26
        for idx in range(count):
            assert harness.run_command(dev, cdbs.write10(idx * PER, PER), _chunk(idx)).good
            r = harness.run_command(dev, cdbs.test_unit_ready())
            assert r.good == (idx + 1 < count), (idx, r)
            log = bytes(harness.run_command(dev, cdbs.log_sense(0x0C), b"", 64).data)
            # SBC-4 6.4.5: 12-byte parameters (code, control, length 8, count, scope).
            params = {struct.unpack_from(">H", log, o)[0]: struct.unpack_from(">I", log, o + 4)[0]
                      for o in range(4, len(log), 12)}
            assert params[2] == idx + 1  # USED LBA MAPPING RESOURCE COUNT
    finally:
        dev.close()


def test_log_sense_honours_the_parameter_pointer(tmp_path: os.PathLike[str]) -> None:
    """SPC-5 6.8: LOG SENSE returns the parameters from PARAMETER POINTER on, and a pointer past
    the largest code is INVALID FIELD IN CDB (field pointer 5). Before: every parameter, GOOD,
    whatever the pointer (`sg_logs --paramp`)."""
    import struct

    from tcmu_py.scsi.cdb import LogSense

    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 32 * CS, 80)
    dev = DedupHandler.open(DeviceConfig("d", "dedup", f"pool={path}", 64 * CS, block_size=BS))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())

        def codes(pointer: int) -> Any:
            cdb = LogSense(False, False, 1, 0x0C, 0, pointer, 1024).build()
            r = harness.run_command(dev, cdb, b"", 1024)
            if not r.good:
                return r.sense_codes
            log = bytes(r.data)
            assert struct.unpack_from(">H", log, 2)[0] == len(log) - 4
            out, at = [], 4
            while at < len(log):
                out.append(struct.unpack_from(">H", log, at)[0])
                at += 4 + log[at + 3]
            return out

        everything = codes(0)
        assert everything[:2] == [0x0001, 0x0002] and everything[-1] >= 0x0100
        assert codes(0x0002) == everything[1:]
        assert codes(0x0100) == [c for c in everything if c >= 0x0100]
        assert codes(everything[-1] + 1) == (0x05, 0x24, 0x00)
    finally:
        dev.close()


def test_unmap_above_the_maximum_unmap_lba_count_changes_nothing(
        tmp_path: os.PathLike[str]) -> None:
    """SBC-4 5.32.1: descriptors totalling more blocks than VPD B0h's MAXIMUM UNMAP LBA COUNT
    (FFFFFFFFh) are INVALID FIELD IN PARAMETER LIST, nothing unmapped. Before: GOOD, every
    range deallocated."""
    path = os.path.join(tmp_path, "p")
    create_pool(path, "p", 32 * CS, 80)
    blocks = (1 << 32) + 64  # a disk larger than the count (a logical size: nothing stored)
    dev = DedupHandler.open(DeviceConfig("d", "dedup", f"pool={path}", blocks * BS,
                                         block_size=BS))
    try:
        harness.run_command(dev, cdbs.test_unit_ready())
        per = CS // BS
        assert harness.run_command(dev, cdbs.write10(0, per), _chunk(1)).good
        plist = cdbs.unmap_parameters([(0, per), (per, 0xFFFFFFFF)])
        r = harness.run_command(dev, cdbs.unmap(len(plist)), plist)
        assert r.sense_codes == (0x05, 0x26, 0x00), r
        assert bytes(harness.run_command(dev, cdbs.read10(0, per), b"", CS).data) == _chunk(1)
    finally:
        dev.close()
