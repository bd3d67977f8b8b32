"""The CONTROL byte's NACA bit: tcmu-py's standard INQUIRY says NORMACA 0 (SPC-5 6.7.2), so a
command with NACA set is refused, whatever its opcode, before its handler runs: CHECK CONDITION,
ILLEGAL REQUEST, INVALID FIELD IN CDB, the field pointer at the CONTROL byte (the last byte of the
CDB, byte 1 of a VARIABLE LENGTH one), bit 2 (SAM-5 5.2). Before, every command ran."""

from __future__ import annotations

import pytest
from vtl_fakes import Tape

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.core import ScsiDevice, command
from tcmu_py.handler import DeviceConfig
from tcmu_py.scsi.cdb import cdb_length
from tcmu_py.scsi.constants import Opcode
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing import MemoryDisk, cdbs, run_command

BS = 512
BLOCKS = 64
NACA = 0x04
#: A VARIABLE LENGTH command of 12 bytes: opcode, CONTROL, 5 bytes, ADDITIONAL CDB LENGTH 4,
#: SERVICE ACTION F800h (vendor specific), 2 bytes.
VAR_USAGE = bytes.fromhex("7f 00 00 00 00 00 00 04 f8 00 ff ff")


class Disk(BlockDevice):
    """A disk in memory with a VARIABLE LENGTH vendor command that counts its calls."""

    def __init__(self) -> None:
        self.backend_disk = MemoryDisk(BLOCKS * BS, BS)
        super().__init__(DeviceConfig("d", "memory", "", BLOCKS * BS), self.backend_disk)
        self.variable_calls = 0

    @command(Opcode.VARIABLE_LENGTH, 0xF800, usage=VAR_USAGE)
    def vendor_variable(self, cmd: Command) -> None:
        self.variable_calls += 1


@pytest.fixture
def disk() -> Disk:
    d = Disk()
    run_command(d, cdbs.test_unit_ready())  # the power-on unit attention
    return d


def _full_cdb(op: int, sa: int | None) -> bytearray:
    """A CDB of `op`'s whole length, zero but for the opcode and service action."""
    if op == Opcode.VARIABLE_LENGTH:
        cdb = bytearray(VAR_USAGE)
        cdb[10:12] = b"\0\0"
        return cdb
    cdb = bytearray(cdb_length(bytes([op])))
    cdb[0] = op
    if sa is not None:
        cdb[1] = sa
    return cdb


def _assert_naca_refused(dev: ScsiDevice, cdb: bytes, control_at: int) -> None:
    r = run_command(dev, cdb, data_in_len=4096)
    assert r.sense_codes == (0x05, 0x24, 0x00), (cdb.hex(), r)
    s = parse_sense(r.sense)
    assert (s.in_cdb, s.field_pointer, s.bit_pointer) == (True, control_at, 2), cdb.hex()


def _check_every_command(dev: ScsiDevice) -> int:
    checked = 0
    for op, sa in dev.supported_commands():
        cdb = _full_cdb(op, sa)
        at = 1 if op == Opcode.VARIABLE_LENGTH else len(cdb) - 1
        cdb[at] |= NACA
        _assert_naca_refused(dev, bytes(cdb), at)
        checked += 1
    return checked


def test_naca_is_refused_for_every_command_of_a_disk(disk: Disk) -> None:
    assert _check_every_command(disk) > 30
    assert disk.variable_calls == 0  # the handler never ran


def test_naca_is_refused_for_every_command_of_a_tape_drive(tape: Tape) -> None:
    assert _check_every_command(tape.dev) > 20
    assert tape.tell().object_id == 0  # no SPACE or LOCATE moved it


def test_a_write_with_naca_writes_nothing(disk: Disk) -> None:
    for cdb in (cdbs.write10(3, 1), cdbs.write16(3, 1), cdbs.write6(3, 1)):
        bad = bytearray(cdb)
        bad[-1] |= NACA
        _assert_naca_refused(disk, bytes(bad), len(bad) - 1)
    assert disk.backend_disk.data == bytearray(BLOCKS * BS)
    assert run_command(disk, cdbs.write10(3, 1), b"\x5a" * BS).good  # without NACA: written


def test_naca_of_a_variable_length_cdb_is_in_byte_1(disk: Disk) -> None:
    cdb = _full_cdb(Opcode.VARIABLE_LENGTH, 0xF800)
    last = bytearray(cdb)
    last[-1] |= NACA  # not the CONTROL byte of a 7Fh CDB
    assert run_command(disk, bytes(last)).good
    cdb[1] |= NACA
    _assert_naca_refused(disk, bytes(cdb), 1)
    assert disk.variable_calls == 1


def test_other_control_bits_are_not_looked_at(disk: Disk) -> None:
    """Vendor specific bits 7-6, reserved 5-3, the obsolete FLAG and LINK (SAM-5 5.2): a
    command carrying them runs as before."""
    cdb = bytearray(cdbs.inquiry())
    cdb[-1] = 0xFF & ~NACA
    r = run_command(disk, bytes(cdb), data_in_len=96)
    assert r.good and r.data[3] & 0x20 == 0  # and NORMACA is 0


def test_an_unknown_opcode_with_naca_stays_invalid_opcode(disk: Disk) -> None:
    """INVALID COMMAND OPERATION CODE comes first: the CDB of a command the device server does
    not know has no CONTROL byte it can place."""
    r = run_command(disk, bytes([0xC9, 0, 0, 0, 0, 0, 0, 0, 0, NACA]))
    assert r.sense_codes == (0x05, 0x20, 0x00)
