"""MAXIMUM TRANSFER LENGTH: what the device advertises in VPD B0h is what the ring carries.

The kernel refuses a command whose data does not fit the ring's data area (or whose entry would
take over half the command ring) with INVALID FIELD IN CDB before userspace sees it
(target_core_user.c ``queue_cmd_ring``). The device advertises exactly that bound and accepts
every command within it, so a standard initiator's large WRITE (libiscsi ExtendedCopy.Simple
writes 2048 blocks at once) works. OPTIMAL TRANSFER LENGTH stays ``hw_max_sectors``: Linux sd
sizes its requests by it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tcmu_py.device.block import BlockDevice
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.ring import Ring
from tcmu_py.scsi.constants import Status
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import FakeKernel, RingHarness, cdbs, run_command

BS = 512
SIZE = 16 << 20
DATA_AREA = 2 << 20  # 4096 blocks of 512
CDB_FIELD = (5, 0x24, 0x00)


def open_raw(tmp_path: Path, hw_max_sectors: int = 1024) -> BlockDevice:
    return RawHandler.open(
        DeviceConfig("r", "raw", str(tmp_path / "img"), SIZE, hw_max_sectors=hw_max_sectors)
    )


def block_limits(result_data: bytes) -> tuple[int, int]:
    """(MAXIMUM TRANSFER LENGTH, OPTIMAL TRANSFER LENGTH) of a VPD B0h page (SBC-4 6.6.3)."""
    return int.from_bytes(result_data[8:12], "big"), int.from_bytes(result_data[12:16], "big")


@pytest.fixture
def ring_raw(tmp_path: Path):
    h = RingHarness(open_raw(tmp_path), data_size=DATA_AREA)
    h.run(cdbs.test_unit_ready())
    yield h, tmp_path / "img"
    h.close()


def test_vpd_b0_advertises_the_data_area_and_keeps_the_optimal_length(ring_raw):
    h, _ = ring_raw
    r = h.run(cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64)
    assert r.good
    assert block_limits(r.data) == (DATA_AREA // BS, 1024)


def test_a_device_off_the_ring_advertises_hw_max_sectors(tmp_path):
    dev = open_raw(tmp_path, hw_max_sectors=256)
    try:
        run_command(dev, cdbs.test_unit_ready())
        r = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64)
        assert block_limits(r.data) == (256, 256)
        # A ring smaller than hw_max_sectors caps both (OPTIMAL <= MAXIMUM, SBC-4 6.6.3).
        dev.set_max_data_length(100 * BS + 7)
        r = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64)
        assert block_limits(r.data) == (100, 100)
    finally:
        dev.close()


@pytest.mark.parametrize("blocks", [2048, DATA_AREA // BS])
def test_a_write_up_to_the_data_area_is_written(ring_raw, blocks):
    h, img = ring_raw
    data = random.Random(blocks).randbytes(blocks * BS)
    assert h.run(cdbs.write16(8, blocks), data_out=data).good
    assert img.read_bytes()[8 * BS : (8 + blocks) * BS] == data
    r = h.run(cdbs.read16(8, blocks), data_in_len=blocks * BS)
    assert r.good and r.data == data


def test_the_kernel_refuses_what_does_not_fit_the_data_area(ring_raw):
    h, _ = ring_raw
    blocks = DATA_AREA // BS + 1
    with pytest.raises(ValueError, match="data area"):
        h.submit(cdbs.write16(0, blocks), data_out=bytes(blocks * BS))


@pytest.mark.parametrize(
    ("cdb", "field", "data_out", "data_in"),
    [
        (cdbs.write16(0, DATA_AREA // BS + 1), 10, bytes(BS), 0),
        (cdbs.read16(0, DATA_AREA // BS + 1), 10, b"", BS),
        (cdbs.write10(0, DATA_AREA // BS + 1), 7, bytes(BS), 0),
        (cdbs.verify16(0, DATA_AREA // BS + 1), 10, b"", 0),
    ],
    ids=["WRITE(16)", "READ(16)", "WRITE(10)", "VERIFY(16)"],
)
def test_a_cdb_beyond_the_maximum_transfer_length_is_an_invalid_field(
    ring_raw, cdb, field, data_out, data_in
):
    # SBC-4 6.6.3: a TRANSFER LENGTH above MAXIMUM TRANSFER LENGTH -> INVALID FIELD IN CDB,
    # with the field pointer on the length; nothing is written.
    h, img = ring_raw
    r = h.run(cdb, data_out=data_out, data_in_len=data_in)
    assert r.status == Status.CHECK_CONDITION
    assert r.sense_codes == CDB_FIELD
    assert parse_sense(r.sense).field_pointer == field
    assert img.read_bytes() == bytes(SIZE)


@pytest.mark.parametrize("split", [1, 1025, 3000])
def test_more_buffers_than_iov_max_are_read_and_written_whole(tmp_path, split):
    # A command the size of the data area may come in one iovec per page: more than the
    # 1024 buffers one pwritev/preadv takes (EINVAL, once reported as WRITE ERROR).
    dev = open_raw(tmp_path, hw_max_sectors=4096)
    try:
        run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
        data = random.Random(split).randbytes(4096 * BS)
        rng = random.Random(split)
        r = run_command(dev, cdbs.write16(4, 4096), data_out=data, split=split, rng=rng)
        assert r.good, r
        assert (tmp_path / "img").read_bytes()[4 * BS : 4100 * BS] == data
        r = run_command(dev, cdbs.read16(4, 4096), data_in_len=4096 * BS, split=split, rng=rng)
        assert r.good and r.data == data
    finally:
        dev.close()


@pytest.mark.parametrize(
    ("cmdr_size", "data_size"),
    [(64 * 1024 - 128, 1 << 20), (4096 - 128, 1 << 20), (1 << 20, 256 << 10)],
)
def test_the_ring_limit_is_what_the_fake_kernel_accepts(cmdr_size, data_size):
    k = FakeKernel(cmdr_size=cmdr_size, data_size=data_size)
    ring = Ring(k.buffer)
    try:
        limit = ring.max_data_length
        assert 0 < limit <= data_size
        k.submit(cdbs.write16(0, limit // BS), data_out=bytes(limit))  # accepted
        # Past it the kernel refuses; the iovec bound counts a 32-byte CDB, so a 16-byte one
        # may still pass one page beyond it.
        over = limit + (BS if limit == data_size else 2 * k.page_size)
        with pytest.raises(ValueError):
            k.submit(cdbs.write16(0, over // BS), data_out=bytes(over))
    finally:
        ring.close()
