"""What every block device's SCSI engine now gets right that an SPC/SBC audit found wrong: 3PC
in standard INQUIRY, the long LBA block descriptor, a block descriptor of zero blocks, mode
page defaults, START STOP UNIT's reserved power conditions, READ CAPACITY(10)'s LBA/PMI."""

from __future__ import annotations

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullHandler
from tcmu_py.scsi.cdb import StartStopUnit
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import cdbs, run_command

BS = 512


def _disk(blocks: int = 1024):  # type: ignore[no-untyped-def]
    dev = NullHandler.open(DeviceConfig("n", "null", "", blocks * BS))
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    return dev


def test_standard_inquiry_says_a_copy_manager_is_there() -> None:
    """SPC-5 6.7.2: 3PC=1 when EXTENDED COPY is supported (VAAI and sg_inq look at it)."""
    r = run_command(_disk(), cdbs.inquiry(), data_in_len=96)
    assert r.good and r.data[5] & 0x08


def test_the_long_lba_block_descriptor_carries_the_whole_count() -> None:
    """SBC-4 6.5.2.3: 64 bits with LLBAA; before: FFFFFFFFh, and a MODE SELECT(10) sending
    the real count back was refused."""
    blocks = (1 << 33) + 5
    dev = _disk(blocks)
    ms = run_command(dev, bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0]), data_in_len=255)
    assert ms.good and ms.data[4] & 1 and int.from_bytes(ms.data[6:8], "big") == 16, ms
    assert int.from_bytes(ms.data[8:16], "big") == blocks
    plist = bytearray(ms.data)
    plist[0:2] = b"\0\0"
    assert run_command(dev, bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0]),
                       bytes(plist)).good
    short = run_command(dev, bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_in_len=255)
    assert short.good and short.data[3] == 8 and short.data[4:8] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("blocks", [0, 1024])
def test_a_block_descriptor_keeping_the_capacity_is_accepted(blocks: int) -> None:
    """SBC-4 6.5.2.2: NUMBER OF LOGICAL BLOCKS zero keeps the capacity (sg_format sends it);
    before: INVALID FIELD IN PARAMETER LIST."""
    dev = _disk()
    plist = bytes([0, 0, 0, 8]) + blocks.to_bytes(4, "big") + bytes(1) + BS.to_bytes(3, "big")
    assert run_command(dev, bytes([0x15, 0x10, 0, 0, len(plist), 0]), plist).good
    other = bytes([0, 0, 0, 8]) + (5).to_bytes(4, "big") + bytes(1) + BS.to_bytes(3, "big")
    assert run_command(dev, bytes([0x15, 0x10, 0, 0, len(other), 0]), other).sense_codes == (
        0x05, 0x26, 0x00)


def test_mode_sense_defaults_do_not_follow_mode_select() -> None:
    """SPC-5 6.14: PC 10b reports the default values; before, D_SENSE set by MODE SELECT showed
    in the defaults too."""
    dev = _disk()

    def control(pc: int) -> bytes:
        r = run_command(dev, bytes([0x1A, 0x08, pc << 6 | 0x0A, 0, 255, 0]), data_in_len=255)
        assert r.good, r
        return bytes(r.data[4:])

    page = bytearray(control(0))
    page[2] |= 0x04  # D_SENSE
    plist = bytes(4) + bytes(page)
    assert run_command(dev, bytes([0x15, 0x10, 0, 0, len(plist), 0]), plist).good
    assert control(0)[2] & 0x04 and not control(2)[2] & 0x04


@pytest.mark.parametrize("condition", range(16))
def test_start_stop_unit_refuses_reserved_power_conditions(condition: int) -> None:
    """SBC-4 5.27: codes 4h, 6h, 8h-9h and Ch-Fh are reserved: INVALID FIELD IN CDB."""
    cdb = StartStopUnit(True, 0, condition, False, False, True).build()
    r = run_command(_disk(), cdb)
    if condition in (0x4, 0x6, 0x8, 0x9, 0xC, 0xD, 0xE, 0xF):
        assert r.sense_codes == (0x05, 0x24, 0x00), r
    else:
        assert r.good, r


def test_read_capacity_10_refuses_an_lba_without_pmi() -> None:
    """SBC-4 5.20.1, as READ CAPACITY(16) already did."""
    dev = _disk()
    assert run_command(dev, bytes([0x25, 0, 0, 0, 0, 5, 0, 0, 0, 0]),
                       data_in_len=8).sense_codes == (0x05, 0x24, 0x00)
    assert run_command(dev, bytes([0x25, 0, 0, 0, 0, 5, 0, 0, 1, 0]), data_in_len=8).good


def test_mode_select_names_a_two_byte_field_by_its_first_byte() -> None:
    """SPC-5 4.4.5.2: MODE SELECT changing the low byte of MAXIMUM PRE-FETCH (caching page 08h
    bytes 8-9, SBC-4 6.5.5; not changeable) is refused with the field pointer at byte 8 of
    the page, bit 7. Before: byte 9 and its highest differing bit."""
    dev = _disk()
    ms = run_command(dev, cdbs.mode_sense10(0x08, dbd=True), data_in_len=1024)
    assert ms.good, ms
    plist = bytearray(ms.data)
    plist[0:2] = b"\0\0"
    page = 8  # MODE SELECT(10) header, no block descriptor
    assert plist[page] & 0x3F == 0x08
    plist[page + 9] ^= 0x01
    r = run_command(dev, cdbs.mode_select10(len(plist)), bytes(plist))
    assert r.sense_codes == (0x05, 0x26, 0x00), r
    s = parse_sense(r.sense)
    assert (s.in_cdb, s.field_pointer, s.bit_pointer) == (False, page + 8, 7)

