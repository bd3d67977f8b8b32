"""Data-Out length against the CDB (issue 11 D4) and the limits the device advertises (D5).

D4: a command whose Data-Out is shorter (or, for a data CDB, longer) than its CDB announces is
refused before anything is written, as LIO's target core refuses it for its own backstores
(target_cmd_size_check): WRITE-class data CDBs with ILLEGAL REQUEST 0Eh/03h INVALID FIELD IN
COMMAND INFORMATION UNIT, parameter lists and WRITE SAME's block with INVALID FIELD IN CDB.
D5: VERIFY is bounded by the MAXIMUM TRANSFER LENGTH of VPD B0h and reads the medium in bounded
chunks; GET LBA STATUS builds no more descriptors than the Data-In buffer holds.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.device.block import MAX_WRITE_SAME_BLOCKS, BlockDevice
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullBackend
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler, create_pool, register_pool, unregister_pool
from tcmu_py.scsi.cdb import RwCdb
from tcmu_py.scsi.constants import Status
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import RingHarness, cdbs, run_command

BS = 512
BLOCKS = 256
UNIT = 16 * 1024
IU = (5, 0x0E, 0x03)  # INVALID FIELD IN COMMAND INFORMATION UNIT
CDB_FIELD = (5, 0x24, 0x00)  # INVALID FIELD IN CDB


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "pool")
    create_pool(path, "limits", 64 * UNIT, None, unit=UNIT)
    register_pool("limits", path)
    yield path
    unregister_pool("limits")


def open_raw(tmp_path: Path) -> tuple[BlockDevice, Callable[[], bytes]]:
    path = tmp_path / "img"
    dev = RawHandler.open(DeviceConfig("r", "raw", str(path), BLOCKS * BS))
    return dev, path.read_bytes


def open_thin(tmp_path: Path) -> tuple[BlockDevice, Callable[[], bytes]]:
    dev = ThinHandler.open(DeviceConfig("t", "thin", "pool=limits", BLOCKS * BS))
    backend: Any = dev.backend

    def image() -> bytes:
        return os.pread(backend._fd, BLOCKS * BS, 0)

    return dev, image


OPENERS = {"raw": open_raw, "thin": open_thin}

# (name, CDB for 4 blocks at LBA 8)
DATA_CDBS = [
    ("WRITE(6)", cdbs.write6(8, 4)),
    ("WRITE(10)", cdbs.write10(8, 4)),
    ("WRITE(12)", cdbs.write12(8, 4)),
    ("WRITE(16)", cdbs.write16(8, 4)),
    ("WRITE AND VERIFY(10)", cdbs.write_and_verify10(8, 4)),
    ("WRITE AND VERIFY(12)", RwCdb(0xAE, 8, 4, bytchk=1).build()),
    ("WRITE AND VERIFY(16)", cdbs.write_and_verify16(8, 4)),
]


def codes(r: Any) -> tuple[int, int, int]:
    return r.sense_codes


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize("kind", sorted(OPENERS))
@pytest.mark.parametrize(("name", "cdb"), DATA_CDBS, ids=[n for n, _ in DATA_CDBS])
@pytest.mark.parametrize("blocks_sent", [0, 1, 3, 5, 8])
def test_a_write_with_the_wrong_data_out_length_writes_nothing(
    tmp_path, kind, name, cdb, blocks_sent
):
    dev, image = OPENERS[kind](tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        before = image()
        data = b"\x5a" * (blocks_sent * BS)
        r = run_command(dev, cdb, data_out=data, split=3)
        assert r.status == Status.CHECK_CONDITION and codes(r) == IU, (name, r)
        assert image() == before
        # The same command with the announced length is written.
        r = run_command(dev, cdb, data_out=b"\x5a" * (4 * BS))
        assert r.good, r
        assert image()[8 * BS : 12 * BS] == b"\x5a" * (4 * BS)
    finally:
        dev.close()


def test_a_short_write_through_the_ring_is_refused(tmp_path):
    dev, image = open_raw(tmp_path)
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        r = h.run(cdbs.write10(0, 8), data_out=b"\x77" * (3 * BS))
        assert codes(r) == IU
        assert image() == bytes(BLOCKS * BS)
    finally:
        h.close()


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize("kind", sorted(OPENERS))
def test_compare_and_write_needs_exactly_both_instances(tmp_path, kind):
    dev, image = OPENERS[kind](tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        for sent in (0, 1, 3, 5):
            r = run_command(dev, cdbs.compare_and_write(2, 2), data_out=bytes(sent * BS))
            assert codes(r) == IU, (sent, r)
        assert image() == bytes(BLOCKS * BS)
        r = run_command(dev, cdbs.compare_and_write(2, 2), data_out=bytes(2 * BS) + b"\1" * 2 * BS)
        assert r.good and image()[2 * BS : 4 * BS] == b"\1" * 2 * BS
    finally:
        dev.close()


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize("kind", sorted(OPENERS))
@pytest.mark.parametrize("ws", [cdbs.write_same10, cdbs.write_same16])
def test_write_same_without_a_whole_block_writes_nothing(tmp_path, kind, ws):
    dev, image = OPENERS[kind](tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        r = run_command(dev, ws(0, 16), data_out=b"\x33" * (BS - 1))
        assert codes(r) == CDB_FIELD
        assert image() == bytes(BLOCKS * BS)
        # A longer Data-Out is used up to the one block (a control CDB's extra bytes).
        r = run_command(dev, ws(0, 2), data_out=b"\x33" * BS + b"\x44" * BS)
        assert r.good and image()[: 3 * BS] == b"\x33" * 2 * BS + bytes(BS)
    finally:
        dev.close()


@pytest.mark.usefixtures("pool")
def test_unmap_with_a_short_parameter_list_unmaps_nothing(tmp_path):
    dev, image = open_thin(tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        assert run_command(dev, cdbs.write10(0, 64), data_out=b"\x11" * 64 * BS).good
        params = cdbs.unmap_parameters([(0, 64)])
        r = run_command(dev, cdbs.unmap(len(params)), data_out=params[:-4])
        assert codes(r) == CDB_FIELD and parse_sense(r.sense).field_pointer == 7
        assert image()[: 64 * BS] == b"\x11" * 64 * BS
        assert run_command(dev, cdbs.unmap(len(params)), data_out=params).good
        assert image()[: 64 * BS] == bytes(64 * BS)
    finally:
        dev.close()


@pytest.mark.parametrize(("select", "field"), [(cdbs.mode_select6, 4), (cdbs.mode_select10, 7)])
def test_mode_select_with_a_short_parameter_list_changes_nothing(tmp_path, select, field):
    dev, _ = open_raw(tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        # The control mode page (0Ah) as MODE SENSE shows it, with D_SENSE set.
        sensed = run_command(dev, cdbs.mode_sense6(0x0A, dbd=True), data_in_len=255).data
        page = bytearray(sensed[4:])
        page[0] &= 0x7F  # PS is reserved in MODE SELECT
        page[2] |= 0x04
        header = bytes(4) if select is cdbs.mode_select6 else bytes(8)
        params = header + bytes(page)
        r = run_command(dev, select(len(params) + 4), data_out=params)
        assert codes(r) == CDB_FIELD and parse_sense(r.sense).field_pointer == field
        assert dev.d_sense is False
        assert run_command(dev, select(len(params)), data_out=params).good
        assert dev.d_sense is True
    finally:
        dev.close()


def test_verify_with_a_short_data_out_is_refused(tmp_path):
    dev, _ = open_raw(tmp_path)
    try:
        run_command(dev, cdbs.test_unit_ready())
        r = run_command(dev, cdbs.verify10(0, 4, bytchk=1), data_out=bytes(3 * BS))
        assert codes(r) == CDB_FIELD and parse_sense(r.sense).field_pointer == 7
        r = run_command(dev, cdbs.verify10(0, 4, bytchk=3), data_out=bytes(BS - 1))
        assert codes(r) == CDB_FIELD
        assert run_command(dev, cdbs.verify10(0, 4, bytchk=1), data_out=bytes(4 * BS)).good
        assert run_command(dev, cdbs.verify10(0, 4, bytchk=3), data_out=bytes(BS)).good
    finally:
        dev.close()


# --- D5 -----------------------------------------------------------------------------------------


def big_null(hw_max_sectors: int = 1024, size: int = 1 << 40) -> BlockDevice:
    cfg = DeviceConfig("big", "null", "", size, hw_max_sectors=hw_max_sectors)
    dev = BlockDevice(cfg, NullBackend(size, BS))
    run_command(dev, cdbs.test_unit_ready())
    return dev


def advertised_max_transfer(dev: BlockDevice) -> int:
    page = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64).data
    return int(struct.unpack_from(">I", page, 8)[0])  # SBC-4 Block Limits: bytes 8..11


@pytest.mark.parametrize(
    ("verify", "field"),
    [
        (cdbs.verify10, 7),
        (lambda lba, n, bytchk=0: RwCdb(0xAF, lba, n, bytchk=bytchk).build(), 6),
        (cdbs.verify16, 10),
    ],
)
def test_verify_over_the_maximum_transfer_length_is_an_invalid_field(verify, field):
    dev = big_null()
    limit = advertised_max_transfer(dev)
    assert limit == dev.max_transfer_blocks == 1024
    assert run_command(dev, verify(0, limit)).good
    r = run_command(dev, verify(0, limit + 1))
    assert codes(r) == CDB_FIELD and parse_sense(r.sense).field_pointer == field


def test_verify_of_the_medium_reads_in_bounded_chunks():
    """BYTCHK 0 over 64 MiB (the advertised maximum here) never holds more than ~1 MiB."""
    dev = big_null(hw_max_sectors=1 << 17)
    blocks = advertised_max_transfer(dev)
    assert blocks * BS == 64 << 20
    tracemalloc.start()
    try:
        r = run_command(dev, cdbs.verify16(0, blocks))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.good
    assert peak < 4 << 20, f"VERIFY held {peak} bytes at once"


def test_verify_bytchk_3_compares_every_block_in_chunks(tmp_path):
    path = tmp_path / "img"
    size = 8 << 20
    dev = RawHandler.open(DeviceConfig("r", "raw", str(path), size, hw_max_sectors=1 << 15))
    try:
        run_command(dev, cdbs.test_unit_ready())
        block = bytes(range(256)) * 2
        blocks = size // BS
        assert run_command(dev, cdbs.write_same16(0, blocks), data_out=block).good
        assert run_command(dev, cdbs.verify16(0, blocks, bytchk=3), data_out=block).good
        with open(path, "r+b") as f:
            f.seek(5 * (1 << 20) + 7)
            f.write(b"\xff")
        r = run_command(dev, cdbs.verify16(0, blocks, bytchk=3), data_out=block)
        assert codes(r) == (0x0E, 0x1D, 0) and r.information == 5 * (1 << 20) + 7
    finally:
        dev.close()


def test_write_same_over_its_advertised_maximum_is_an_invalid_field():
    dev = big_null()
    page = run_command(dev, cdbs.inquiry(evpd=True, page_code=0xB0), data_in_len=64).data
    assert struct.unpack_from(">Q", page, 36)[0] == MAX_WRITE_SAME_BLOCKS
    r = run_command(dev, cdbs.write_same16(0, MAX_WRITE_SAME_BLOCKS + 1), data_out=bytes(BS))
    assert codes(r) == CDB_FIELD and parse_sense(r.sense).field_pointer == 10


def test_get_lba_status_asks_the_backend_for_no_more_than_fits_the_data_in():
    class Spy(NullBackend):
        asked: list[int] = []

        def unmap(self, offset: int, length: int) -> None:
            pass

        def lba_status(self, offset: int, length: int, *, max_runs: int) -> list[Any]:
            self.asked.append(max_runs)
            return [(offset, length, 0)]

    cfg = DeviceConfig("s", "null", "", 1 << 30)
    dev = BlockDevice(cfg, Spy(1 << 30, BS))
    run_command(dev, cdbs.test_unit_ready())
    r = run_command(dev, cdbs.get_lba_status(0, allocation_length=0xFFFFFFFF), data_in_len=4096)
    assert r.good and Spy.asked == [(4096 - 8) // 16]


def test_compare_and_write_of_256_blocks_is_an_invalid_number_of_blocks():
    """libiscsi's CompareAndWrite.Simple past MAXIMUM COMPARE AND WRITE LENGTH (255): 256 blocks
    read as a count of 0 with 2 x 256 blocks of Data-Out; the CDB field is what is wrong, so
    the answer is INVALID FIELD IN CDB at NUMBER OF LOGICAL BLOCKS (byte 13), not a Data-Out
    length error."""
    import struct as _struct

    from tcmu_py.device.block import BlockDevice
    from tcmu_py.handler import DeviceConfig
    from tcmu_py.handlers.null import NullBackend
    from tcmu_py.testing import cdbs as _cdbs
    from tcmu_py.testing.harness import run_command

    config = DeviceConfig(name="n", subtype="null", cfgstring="", size=1 << 20)
    dev = BlockDevice(config, NullBackend(1 << 20, 512))
    run_command(dev, _cdbs.test_unit_ready())  # the power-on unit attention
    cdb = _struct.pack(">BBQ3xBBx", 0x89, 0, 0, 0, 0)
    r = run_command(dev, cdb, data_out=bytes(2 * 256 * 512))
    assert r.sense_codes == (0x05, 0x24, 0x00), r
    assert r.sense[15] & 0x80 and int.from_bytes(r.sense[16:18], "big") == 13


class _AsyncWriteDevice(BlockDevice):
    """A device whose WRITE answers with a Future, as an asynchronous backend's does
    (the ceph device's): here one that fails, as librbd's write does when an OSD refuses it."""

    def write(self, cmd: Any) -> Any:  # type: ignore[override]
        from concurrent.futures import Future

        from tcmu_py.scsi.sense import WriteError

        done: Future[None] = Future()
        done.set_exception(WriteError("injected: the write failed"))
        return done


@pytest.mark.parametrize("bytchk", [0, 1])
def test_write_and_verify_answers_the_outcome_of_an_asynchronous_write(tmp_path: Path,
                                                                      bytchk: int) -> None:
    """Before: WRITE AND VERIFY dropped the Future a subclass's WRITE returned, so a write that
    failed answered GOOD (BYTCHK 0: the flush after it succeeded) or MISCOMPARE (BYTCHK 1)
    with the old data still on the medium. SBC-4 5.41: the write's error is the command's."""
    dev = _AsyncWriteDevice(DeviceConfig("a", "null", "", BLOCKS * BS),
                            NullBackend(BLOCKS * BS, BS))
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    cdb = RwCdb(0x2E, 8, 4, bytchk=bytchk).build()
    r = run_command(dev, cdb, data_out=b"\x5a" * (4 * BS))
    assert r.status == Status.CHECK_CONDITION and codes(r) == (3, 0x0C, 0x00), r
