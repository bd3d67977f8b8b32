"""What `ScsiDevice` checks for every handler (issue 11, fuzzer escapes F7 and F9): a CDB shorter
than its opcode's group code defines is refused before dispatch, and REPORT SUPPORTED OPERATION
CODES answers for a handler's vendor opcode that no CDB usage table knows."""

from __future__ import annotations

import struct

import pytest

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.core import command, short_cdb
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullBackend
from tcmu_py.scsi import spc
from tcmu_py.scsi.cdb import cdb_length
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import cdbs, run_command

BS = 512
BLOCKS = 64
VENDOR_USAGE = bytes.fromhex("c6 01 ff 00 00 00 00 00 00 00")


class VendorDisk(BlockDevice):
    """A null disk with two vendor commands: C5h without CDB usage data (it trusts its CDB to
    be the 10 bytes its group code defines), C6h with usage data."""

    def __init__(self) -> None:
        super().__init__(DeviceConfig("v", "null", "", BLOCKS * BS), NullBackend(BLOCKS * BS, BS))

    @command(0xC5)
    def vendor_c5(self, cmd: Command) -> None:
        if cmd.cdb[9]:  # the CONTROL byte: an IndexError on a short CDB without the guard
            return None
        return None

    @command(0xC6, usage=VENDOR_USAGE)
    def vendor_c6(self, cmd: Command) -> None:
        return None


@pytest.fixture
def dev() -> VendorDisk:
    d = VendorDisk()
    run_command(d, cdbs.test_unit_ready())  # the power-on unit attention
    return d


def test_every_short_cdb_is_invalid_field_in_cdb_at_byte_0(dev: VendorDisk) -> None:
    """F7: each supported command cut to every shorter length: ILLEGAL REQUEST 24h/00h, field
    pointer 0 (the group code in byte 0 defines the length, SPC-5 4.2.5.1), never HARDWARE
    ERROR from a handler reading past the end."""
    checked = 0
    for op, sa in dev.supported_commands():
        full = bytearray(cdb_length(bytes([op])))
        full[0] = op
        if sa is not None:
            full[1] = sa
        for n in range(1, len(full)):
            r = run_command(dev, bytes(full[:n]))
            s = parse_sense(r.sense)
            assert (s.sense_key, s.asc, s.ascq) == (5, 0x24, 0), (bytes(full[:n]).hex(), s)
            assert s.field_pointer == 0
            checked += 1
    assert checked > 100
    assert run_command(dev, bytes([0xC5]) + bytes(9)).good  # whole, it runs
    # An opcode the device does not implement is that, whatever its length (SPC-5 4.2.5.1).
    assert run_command(dev, bytes([0xFF]) + bytes(5)).sense_codes == (5, 0x20, 0)


def test_short_cdb_lengths() -> None:
    assert short_cdb(bytes(6)) is None and short_cdb(bytes(5)) == 6
    assert short_cdb(bytes([0x88]) + bytes(14)) == 16
    assert short_cdb(bytes([0xA3]) + bytes(11)) is None
    assert short_cdb(bytes([0x7F, 0, 0, 0, 0])) == 8
    assert short_cdb(bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(8)) == 32


def _rsoc_all(dev: VendorDisk) -> dict[int, int]:
    r = run_command(dev, cdbs.report_supported_operation_codes(), data_in_len=8192)
    assert r.good, r
    n = int.from_bytes(r.data[:4], "big")
    out = {}
    for i in range(4, 4 + n, 8):
        op, _, _, cdb_len = struct.unpack_from(">BxHxBH", r.data, i)
        out[op] = cdb_len
    return out


def test_rsoc_reports_vendor_opcodes(dev: VendorDisk) -> None:
    """F9: a vendor opcode registered without CDB usage data made RSOC raise KeyError (44/00
    for the whole device). Now: derived from the group code (C5h is group 6: 10 bytes), every
    bit up to the CONTROL byte marked as evaluated; `usage=` is reported as given."""
    listed = _rsoc_all(dev)
    assert listed[0xC5] == 10 and listed[0xC6] == 10 and listed[0x28] == 10
    r = run_command(dev, cdbs.report_supported_operation_codes(1, 0xC5), data_in_len=64)
    assert r.good and r.data[1] & 0x07 == 3  # SUPPORTED
    assert r.data[4:14] == bytes.fromhex("c5 ff ff ff ff ff ff ff ff 00")
    r = run_command(dev, cdbs.report_supported_operation_codes(1, 0xC6), data_in_len=64)
    assert r.good and r.data[4:14] == VENDOR_USAGE
    # The tables still answer for the commands tcmu-py knows.
    r = run_command(dev, cdbs.report_supported_operation_codes(1, 0x28), data_in_len=64)
    assert r.data[4:14] == spc.cdb_usage_mask(0x28, peripheral_type=0)


def test_derived_cdb_usage() -> None:
    assert spc.derived_cdb_usage(0xC0) == bytes.fromhex("c0 ff ff ff ff ff ff ff ff 00")
    assert spc.derived_cdb_usage(0x02) == bytes.fromhex("02 ff ff ff ff 00")
    assert spc.derived_cdb_usage(0xA3, 0x1F)[:3] == bytes.fromhex("a3 1f ff")
    assert len(spc.derived_cdb_usage(0x9E, 0x10)) == 16
    with pytest.raises(ValueError):
        spc.derived_cdb_usage(0x7F)


def test_command_checks_usage_data() -> None:
    with pytest.raises(ValueError, match="start with the opcode"):
        command(0xC5, usage=bytes.fromhex("c6 00 00 00 00 00 00 00 00 00"))
    with pytest.raises(ValueError, match="group code defines 10"):
        command(0xC5, usage=bytes.fromhex("c5 00 00 00 00 00"))
    with pytest.raises(ValueError, match="VARIABLE LENGTH"):
        command(0x7F, 0x0001)
    command(0x7F, 0x0001, usage=bytes([0x7F]) + bytes(31))  # given: accepted
