"""SBC semantics of BlockDevice over the raw and null handlers, without a ring."""

from __future__ import annotations

import fcntl
import os
import pathlib
import struct
import tempfile
import threading

import pytest

from tcmu_py.device.block import BlockDevice
from tcmu_py.handler import DeviceConfig, on_memory_filesystem
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawBackend, RawHandler
from tcmu_py.testing import cdbs
from tcmu_py.testing.conformance import check_block_handler
from tcmu_py.testing.harness import run_command

BS = 512
BLOCKS = 256


def make_raw(
    tmp_path, name: str = "d.img", blocks: int = BLOCKS, write_cache: bool = True
) -> BlockDevice:
    cfg = DeviceConfig(
        name="d0",
        subtype="raw",
        cfgstring=str(tmp_path / name),
        size=blocks * BS,
        write_cache=write_cache,
    )
    return RawHandler.open(cfg)


@pytest.fixture
def dev(tmp_path):
    d = make_raw(tmp_path)
    run_command(d, cdbs.test_unit_ready())  # consume POWER ON
    yield d
    d.close()


def test_raw_conformance(tmp_path):
    counter = iter(range(1000))
    check_block_handler(lambda: make_raw(tmp_path, f"c{next(counter)}.img"))


def test_null_conformance():
    cfg = DeviceConfig(name="n0", subtype="null", cfgstring="", size=BLOCKS * BS)
    with pytest.raises(AssertionError, match="READ back"):
        # null discards writes, so the read-back checks must fail: the checker can fail.
        check_block_handler(lambda: NullHandler.open(cfg))


def test_power_on_ua_once(tmp_path):
    d = make_raw(tmp_path)
    assert run_command(d, cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
    assert run_command(d, cdbs.test_unit_ready()).good


def test_read_capacity_and_lbp_truth(dev):
    r = run_command(dev, cdbs.read_capacity16(), data_in_len=32)
    last, bs = struct.unpack_from(">QI", r.data)
    assert (last, bs) == (BLOCKS - 1, BS)
    # raw cannot deallocate: LBPME and LBPRZ must be clear (scsi-notes: tcmu-runner's bug).
    assert r.data[14] & 0xC0 == 0


def test_vendor_opcodes_are_completed(dev):
    for op in range(0xC0, 0x100):
        r = run_command(dev, bytes([op]) + bytes(9), data_in_len=64)
        assert r.sense_codes[:2] == (5, 0x20)


def test_read6_zero_means_256(tmp_path):
    d = make_raw(tmp_path, blocks=300)
    run_command(d, cdbs.test_unit_ready())
    r = run_command(d, cdbs.read6(0, 0), data_in_len=256 * BS)
    assert r.good and len(r.data) == 256 * BS


def test_fua_flushes(tmp_path, monkeypatch):
    d = make_raw(tmp_path)
    run_command(d, cdbs.test_unit_ready())
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    assert run_command(d, cdbs.write10(0, 1), data_out=bytes(BS)).good
    assert calls == []
    assert run_command(d, cdbs.write10(0, 1, fua=True), data_out=bytes(BS)).good
    assert len(calls) == 1
    assert run_command(d, cdbs.synchronize_cache16()).good
    assert len(calls) == 2


@pytest.mark.parametrize("write_cache", [True, False])
def test_caching_page_wce_matches_backend(tmp_path, write_cache):
    dev = make_raw(tmp_path, write_cache=write_cache)
    run_command(dev, cdbs.test_unit_ready())
    r = run_command(dev, cdbs.mode_sense10(0x08), data_in_len=1024)
    assert r.good
    block_desc_len = struct.unpack_from(">H", r.data, 6)[0]
    page = r.data[8 + block_desc_len :]
    assert page[0] & 0x3F == 0x08
    # WCE: with the cache on, raw writes land in the page cache until fdatasync; with it off
    # the image is O_DSYNC and WCE must be 0.
    assert bool(page[2] & 0x04) == write_cache
    flags = fcntl.fcntl(dev.backend.fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DSYNC) == (not write_cache)
    dev.close()


def test_handler_exception_is_hardware_error(dev, monkeypatch, caplog):
    def boom(offset, bufs):
        raise RuntimeError("backend bug")

    monkeypatch.setattr(dev.backend, "read", boom)
    r = run_command(dev, cdbs.read10(0, 1), data_in_len=BS)
    assert r.sense_codes == (4, 0x44, 0)
    assert "backend bug" in caplog.text
    # The device keeps working for other commands.
    assert run_command(dev, cdbs.test_unit_ready()).good


def test_io_error_is_medium_error(dev, monkeypatch):
    def eio(offset, bufs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dev.backend, "read", eio)
    monkeypatch.setattr(dev.backend, "write", eio)
    assert run_command(dev, cdbs.read10(0, 1), data_in_len=BS).sense_codes == (3, 0x11, 0)
    assert run_command(dev, cdbs.write10(0, 1), data_out=bytes(BS)).sense_codes == (3, 0x0C, 0)


def test_resize_reports_capacity_changed(dev):
    dev.resize(2 * BLOCKS * BS)
    assert run_command(dev, cdbs.test_unit_ready()).sense_codes == (6, 0x2A, 0x09)
    r = run_command(dev, cdbs.read_capacity10(), data_in_len=8)
    assert struct.unpack(">II", r.data) == (2 * BLOCKS - 1, BS)


def test_compare_and_write_is_atomic_against_writes(dev):
    """Concurrent WRITEs of A/B patterns vs COMPARE AND WRITE: never a torn block."""
    # Threads call the device directly here, as the worker pool does: if tmp_path is a tmpfs the
    # device would assume one thread (it skips the range lock then), so say it is not.
    dev._all_inline = False
    a, b = b"\xaa" * BS, b"\xbb" * BS
    assert run_command(dev, cdbs.write10(5, 1), data_out=a).good
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            run_command(dev, cdbs.write10(5, 1), data_out=a)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            r = run_command(dev, cdbs.compare_and_write(5, 1), data_out=a + b)
            assert r.good or r.sense_codes == (0x0E, 0x1D, 0)
            got = run_command(dev, cdbs.read10(5, 1), data_in_len=BS).data
            assert got in (a, b)
    finally:
        stop.set()
        t.join()


def test_rsoc_lists_no_unmap_for_raw(dev):
    r = run_command(
        dev,
        cdbs.report_supported_operation_codes(reporting_options=1, requested_opcode=0x42),
        data_in_len=64,
    )
    assert r.good and r.data[1] & 7 == 1  # not supported


def test_raw_backend_short_image_reads_zeros(tmp_path, caplog):
    """As LIO's fileio; and said once in the log (before: nothing said, an operations audit)."""
    path = tmp_path / "short.img"
    be = RawBackend(str(path), 4 * BS, BS)
    os.ftruncate(be.fd, BS)  # shrinks under us
    buf = bytearray(b"\xff" * 2 * BS)
    be.read(0, [memoryview(buf)])
    assert buf == bytes(2 * BS)
    assert caplog.text.count(f"image {path} is {BS} bytes, shorter than the device's") == 1
    be.read(0, [memoryview(buf)])
    assert caplog.text.count("shorter than the device's") == 1
    be.close()


# --- memory-backed images run on the loop thread -------------------------------------------------


def _mountinfo_for(tmp_path, fd: int, fstype: str):
    st = os.fstat(fd)
    line = (
        f"36 25 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / /mnt rw,relatime shared:1"
        f" - {fstype} {fstype} rw\n"
    )
    path = tmp_path / f"mountinfo-{fstype}"
    path.write_text("22 1 0:1 / / rw - rootfs rootfs rw\n" + line)
    return str(path)


@pytest.mark.parametrize(("fstype", "memory"), [("tmpfs", True), ("ramfs", True), ("ext4", False)])
def test_on_memory_filesystem_reads_the_type_of_the_files_mount(tmp_path, fstype, memory):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert on_memory_filesystem(fd, _mountinfo_for(tmp_path, fd, fstype)) is memory
        # no line for the file's device, or no mountinfo at all: the safe answer
        (tmp_path / "other").write_text("36 25 999:999 / /x rw - tmpfs tmpfs rw\n")
        assert on_memory_filesystem(fd, str(tmp_path / "other")) is False
        assert on_memory_filesystem(fd, str(tmp_path / "missing")) is False
    finally:
        os.close(fd)


def _is_tmpfs(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2] == "tmpfs" for line in f)


@pytest.mark.skipif(not _is_tmpfs("/dev/shm"), reason="/dev/shm is not a tmpfs on this machine")
def test_raw_image_on_tmpfs_runs_inline(tmp_path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        d = make_raw(pathlib.Path(shm))
        try:
            assert d.backend.blocking is False
            assert d.is_inline(cdbs.write10(0, 1)) and d.is_inline(cdbs.read10(0, 1))
        finally:
            d.close()
    disk = make_raw(tmp_path)
    try:  # a disk file keeps the worker pool (tmp_path may itself be a tmpfs somewhere)
        assert disk.is_inline(cdbs.read10(0, 1)) is (not disk.backend.blocking)
    finally:
        disk.close()
