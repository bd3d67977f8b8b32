"""Tape partitions through the ring (FakeKernel as initiator), with the Linux st driver's exact
CDB sequences: `mt mkpartition` (LOAD, MODE SENSE(6) page 11h with block descriptor, MODE
SELECT(6) PF of the edited page, FORMAT MEDIUM 1), `setpartition` + I/O (LOCATE(10) CP),
`partseek` (LOCATE(10) BT CP), `tell` (READ POSITION 01h); bad page 11h fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vtl_fakes import FakeLibrary

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.cartridge import Cartridge
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.scsi import ssc
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.harness import Result, RingHarness

MB = 10**6
GOOD = 0
CHECK = 2


class St:
    """What drivers/scsi/st.c sends for the partition ioctls (read for facts, not copied)."""

    def __init__(self, h: RingHarness) -> None:
        self.h = h

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        return self.h.run(cdb, data_out, data_in_len)

    def ok(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        r = self.run(cdb, data_out, data_in_len)
        assert r.status == GOOD, (cdb.hex(), r.sense_codes)
        return r

    def read_part_page(self, omit_bd: bool) -> bytearray:
        # read_mode_page(): MODE SENSE(6), DBD when omitting block descriptors, length 255.
        r = self.ok(bytes([0x1A, 0x08 if omit_bd else 0, 0x11, 0, 255, 0]), data_in_len=255)
        return bytearray(r.data)

    def nbr_partitions(self) -> int:
        bp = self.read_part_page(True)
        return bp[4 + 3] + 1

    def mkpartition_select(self, size: int) -> tuple[bytearray, bool]:
        """partition_tape() up to the MODE SELECT parameter list; (list, needs_format)."""
        bp = self.read_part_page(False)
        target = 1
        if size < 0:
            target, size = 0, -size
        pgo = 4 + bp[3]
        psd_cnt = (bp[pgo + 1] + 2 - 8) // 2
        needs_format = bool(bp[pgo + 4] & 0x04)
        psum, units = 0x10, 0
        if needs_format:
            psd_cnt = 2
        if (bp[pgo + 4] & 0x18) == 0x18 and size >= 1000 and size % 1000 == 0:
            size, psum, units = size // 1000, 0x18, 9
        if psum == 0x10 and size >= 65534:
            size, psum, units = size // 1000, 0x18, 9
        psdo = pgo + 8
        if target > 0 and (psd_cnt > bp[pgo + 2] or bp[pgo + 2] != 1):
            bp[psdo : psdo + 2] = b"\xff\xff"
            psdo += 2
        bp[psdo : psdo + 2 * bp[pgo + 3]] = bytes(2 * bp[pgo + 3])
        if size == 0:
            bp[pgo + 3] = 0
        else:
            bp[psdo : psdo + 2] = size.to_bytes(2, "big")
            if target == 0:
                bp[psdo + 2 : psdo + 4] = b"\xff\xff"
            bp[pgo + 3] = 1
        bp[pgo + 6] = units
        bp[pgo + 7] = 0
        bp[pgo + 4] = 0x20 | psum | (bp[pgo + 4] & 0x07)
        bp[pgo + 1] = 6 + psd_cnt * 2
        # write_mode_page(): mode data length 0, WP cleared, PS cleared.
        bp[0] = 0
        bp[2] &= 0x7F
        bp[pgo] &= 0x3F
        return bp[: pgo + bp[pgo + 1] + 2], needs_format

    def mode_select(self, param: bytes) -> Result:
        return self.run(bytes([0x15, 0x10, 0, 0, len(param), 0]), param)

    def mkpartition(self, size_mb: int) -> None:
        self.ok(bytes([0x1B, 0, 0, 0, 1, 0]))  # do_load_unload(1)
        param, needs_format = self.mkpartition_select(size_mb)
        assert needs_format
        self.ok(bytes([0x15, 0x10, 0, 0, len(param), 0]), bytes(param))
        self.ok(bytes([0x04, 0, 1, 0, 0, 0]))  # format_medium(1)

    def locate(self, block: int, partition: int | None, *, logical: bool) -> Result:
        """set_location(): LOCATE(10), BT unless logical, CP + partition when it changes."""
        cdb = bytearray(10)
        cdb[0] = 0x2B
        cdb[3:7] = block.to_bytes(4, "big")
        if not logical:
            cdb[1] = 4
        if partition is not None:
            cdb[1] |= 2
            cdb[8] = partition
        return self.run(bytes(cdb))

    def tell(self, logical: bool = False) -> tuple[int, int]:
        """get_location(): READ POSITION (01h unless logical), 20 bytes; (block, partition)."""
        r = self.ok(bytes([0x34, 0 if logical else 1, 0, 0, 0, 0, 0, 0, 0, 0]), data_in_len=20)
        assert not r.data[0] & 0x04  # BPU
        return int.from_bytes(r.data[4:8], "big"), r.data[1]

    def write(self, *blocks: bytes) -> None:
        for b in blocks:
            self.ok(ssc.ReadWrite6(False, False, len(b)).build(0x0A), b)
        self.ok(ssc.WriteFilemarks6(False, False, 1).build())

    def read(self, n: int = 65536) -> Result:
        return self.run(ssc.ReadWrite6(False, False, n).build(0x08), data_in_len=n)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[St, FakeLibrary, TapeDrive]]:
    lib = FakeLibrary(tmp_path)
    lib.create("PRT001L8", capacity=1000 * MB)
    dev = TapeDrive(DeviceConfig(name="t", subtype="vtl", cfgstring="", size=0), lib, 0)
    lib.move("PRT001L8")
    h = RingHarness(dev)
    try:
        for _ in range(5):
            if h.run(bytes(6)).status == GOOD:
                break
        yield St(h), lib, dev
    finally:
        h.close()
        dev.close()


def test_page_11h_as_st_reads_it(setup: tuple[St, FakeLibrary, TapeDrive]) -> None:
    st, _, _ = setup
    bp = st.read_part_page(True)
    page = bp[4:]
    # LTO-8 medium: 3 additional partitions possible, none defined, IDP|PSUM MB|POFM, MFR 03h.
    assert page[0] == 0x11 and page[1] == 6 + 2 * 4
    assert page[2] == 3 and page[3] == 0 and page[4] == 0x20 | 0x10 | 0x04 and page[5] == 3
    assert int.from_bytes(page[8:10], "big") == 1000
    assert st.nbr_partitions() == 1


def test_mkpartition_write_each_partition_read_back_after_reload(
    setup: tuple[St, FakeLibrary, TapeDrive], tmp_path: Path
) -> None:
    st, lib, _dev = setup
    st.ok(bytes([0x01, 0, 0, 0, 0, 0]))
    st.write(b"to be erased")
    st.ok(bytes([0x01, 0, 0, 0, 0, 0]))
    st.mkpartition(100)  # mt mkpartition 100: partition 1 of 100 MB, 0 the rest
    assert st.nbr_partitions() == 2
    bp = st.read_part_page(True)
    assert int.from_bytes(bp[12:14], "big") == 900 and int.from_bytes(bp[14:16], "big") == 100
    assert st.tell() == (0, 0)
    assert st.read().sense_codes == (8, 0, 5)  # partition 0 is blank now
    # setpartition 1 then tar: switch_partition() -> LOCATE(10) CP, block 0, logical
    assert st.locate(0, 1, logical=True).status == GOOD
    st.write(b"one-a" * 100, b"one-b")
    assert st.tell() == (3, 1)
    assert st.locate(0, 0, logical=True).status == GOOD
    st.write(b"zero-a")
    assert st.tell() == (2, 0)
    # mode page 10h reports the active partition
    r = st.ok(bytes([0x1A, 0x08, 0x10, 0, 255, 0]), data_in_len=255)
    assert r.data[4 + 3] == 0
    # unload, move out and in (mtx), load: partition 0, both partitions' data intact
    st.ok(bytes([0x1B, 0, 0, 0, 0, 0]))
    lib.move(None)
    lib.move("PRT001L8")
    assert st.run(bytes(6)).status == CHECK  # UA: medium may have changed
    assert st.tell() == (0, 0)
    r = st.read()
    assert r.data == b"zero-a"
    # partseek 1 1: LOCATE(10) BT, CP, partition 1, block 1
    assert st.locate(1, 1, logical=False).status == GOOD
    assert st.tell() == (1, 1)
    assert st.read().data == b"one-b"
    assert parse_sense(st.read().sense).filemark
    assert st.read().sense_codes == (8, 0, 5)  # EOD of partition 1
    # SPACE to EOD stays in the partition; REWIND too
    st.ok(bytes([0x01, 0, 0, 0, 0, 0]))
    assert st.tell() == (0, 1)
    assert st.read().data == b"one-a" * 100
    # READ POSITION long form names the partition
    r = st.ok(bytes([0x34, 0x06, 0, 0, 0, 0, 0, 0, 0, 0]), data_in_len=32)
    assert int.from_bytes(r.data[4:8], "big") == 1 and int.from_bytes(r.data[8:16], "big") == 1
    # LOCATE(16) with CP to partition 0's end of data
    cdb = ssc.Locate(ssc.DestType.END_OF_DATA, True, False, 0, 0).build(sixteen=True)
    assert st.run(cdb).status == GOOD
    assert st.tell() == (2, 0)
    with Cartridge.open(tmp_path / "PRT001L8", read_only=True) as cart:
        assert cart.partition_sizes == [900 * MB, 100 * MB]


def test_mkpartition_0_back_to_one_partition(setup: tuple[St, FakeLibrary, TapeDrive]) -> None:
    st, _, _ = setup
    st.mkpartition(100)
    assert st.locate(0, 1, logical=True).status == GOOD
    st.write(b"p1")
    # mt mkpartition 0 with POFM: partition_tape() sends FORMAT MEDIUM 0 at once.
    st.ok(bytes([0x1B, 0, 0, 0, 1, 0]))
    st.ok(bytes([0x04, 0, 0, 0, 0, 0]))
    assert st.nbr_partitions() == 1
    assert st.locate(0, 1, logical=True).sense_codes == (5, 0x24, 0)


def test_mkpartition_negative_size_sizes_partition_0(
    setup: tuple[St, FakeLibrary, TapeDrive],
) -> None:
    st, _, _ = setup
    st.mkpartition(-300)  # partition 0 of 300 MB, 1 the rest
    bp = st.read_part_page(True)
    assert int.from_bytes(bp[12:14], "big") == 300 and int.from_bytes(bp[14:16], "big") == 700


def test_format_medium_away_from_bop_0(setup: tuple[St, FakeLibrary, TapeDrive]) -> None:
    st, _, _ = setup
    st.write(b"x")
    r = st.run(bytes([0x04, 0, 1, 0, 0, 0]))
    assert r.sense_codes == (5, 0x3B, 0x0C)
    st.ok(bytes([0x01, 0, 0, 0, 0, 0]))
    assert st.read().data == b"x"  # nothing erased


@pytest.mark.parametrize(
    ("cdb", "field"),
    [(bytes([0x04, 0, 3, 0, 0, 0]), 2), (bytes([0x04, 0, 1, 0, 8, 0]), 3)],
    ids=["format-3", "transfer-length"],
)
def test_format_medium_bad_cdb(
    setup: tuple[St, FakeLibrary, TapeDrive], cdb: bytes, field: int
) -> None:
    st, _, _ = setup
    r = st.run(cdb)
    s = parse_sense(r.sense)
    assert r.sense_codes == (5, 0x24, 0) and s.field_pointer == field


def _edit(param: bytearray, byte: int, value: int) -> bytearray:
    pgo = 4 + param[3]
    param[pgo + byte] = value
    return param


@pytest.mark.parametrize(
    ("byte", "value", "bit"),
    [
        (2, 5, None),  # MAXIMUM ADDITIONAL PARTITIONS changed
        (3, 4, None),  # more additional partitions than the maximum
        (4, 0x20 | 0x10 | 0x04 | 0x80, 7),  # FDP and IDP
        (4, 0x20 | 0x10, 2),  # POFM cleared
        (4, 0x20 | 0x10 | 0x04 | 0x02, 1),  # CLEAR
        (5, 0x01, None),  # MEDIUM FORMAT RECOGNITION
        (6, 0x10, 7),  # PARTITIONING TYPE
        (8, 0x00, None),  # a size of 0 (descriptor 0 high byte, low byte set below)
        (10, 0x40, None),  # partition 1 beyond the capacity (0x40xx MB > 1000 MB)
    ],
)
def test_bad_partition_page_fields_are_illegal_request_with_pointer(
    setup: tuple[St, FakeLibrary, TapeDrive], byte: int, value: int, bit: int | None
) -> None:
    st, _, _ = setup
    param, _ = st.mkpartition_select(100)
    pgo = 4 + param[3]
    if byte == 8:
        param[pgo + 8 : pgo + 10] = b"\x00\x00"
    param = _edit(param, byte, value)
    r = st.mode_select(bytes(param))
    s = parse_sense(r.sense)
    assert r.sense_codes == (5, 0x26, 0), r.sense_codes
    assert s.field_pointer == pgo + byte
    if bit is not None:
        assert s.bit_pointer == bit
    # nothing pending: FORMAT MEDIUM 1 keeps one partition
    st.ok(bytes([0x04, 0, 1, 0, 0, 0]))
    assert st.nbr_partitions() == 1


def test_page_length_too_short_for_partitions(setup: tuple[St, FakeLibrary, TapeDrive]) -> None:
    st, _, _ = setup
    param, _ = st.mkpartition_select(100)
    pgo = 4 + param[3]
    param[pgo + 3] = 2  # three partitions, two descriptors
    r = st.mode_select(bytes(param))
    assert r.sense_codes == (5, 0x26, 0) and parse_sense(r.sense).field_pointer == pgo + 1


def test_locate_to_a_partition_that_does_not_exist(
    setup: tuple[St, FakeLibrary, TapeDrive],
) -> None:
    st, _, _ = setup
    r = st.locate(0, 1, logical=True)
    assert r.sense_codes == (5, 0x24, 0) and parse_sense(r.sense).field_pointer == 8


def test_read_only_lto4_medium_cannot_be_partitioned(tmp_path: Path) -> None:
    lib = FakeLibrary(tmp_path, model="IBM-LTO6")
    lib.create("OLD001L4")
    dev = TapeDrive(DeviceConfig(name="t", subtype="vtl", cfgstring="", size=0), lib, 0)
    lib.move("OLD001L4")
    h = RingHarness(dev)
    try:
        for _ in range(5):
            if h.run(bytes(6)).status == GOOD:
                break
        st = St(h)
        bp = st.read_part_page(True)
        assert bp[4 + 2] == 0  # MAXIMUM ADDITIONAL PARTITIONS
        param, _ = st.mkpartition_select(100)
        r = st.mode_select(bytes(param))
        assert r.sense_codes == (5, 0x26, 0)
    finally:
        h.close()
        dev.close()
