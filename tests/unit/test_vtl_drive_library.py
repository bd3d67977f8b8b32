"""The drive with the real Library: moves load it, PREVENT blocks moves out, state persists."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.admin import create_cartridges
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.scsi import ssc
from tcmu_py.scsi.sense import MediumRemovalPrevented
from tcmu_py.scsi.smc import ElementType
from tcmu_py.testing.harness import run_command


@pytest.fixture
def library(tmp_path: Path) -> Library:
    lib = Library.create(
        tmp_path / "lib", name="L1", drives=[("DRV0001", "IBM-LTO8"), ("DRV0002", "HP-LTO7")],
        slots=4, import_export=1,
    )
    create_cartridges(lib, "AAA000L8..AAA001L8", load=True)
    return lib


def drive(lib: Library, index: int) -> TapeDrive:
    config = DeviceConfig(name=f"d{index}", subtype="vtl", cfgstring="", size=0)
    return TapeDrive(config, lib, index)


def test_move_loads_drive_and_data_follows_cartridge(library: Library) -> None:
    d0, d1 = drive(library, 0), drive(library, 1)
    assert d0.serial == "DRV0001" and d1.product == "Ultrium 7-SCSI"
    slot = library.locate("AAA000L8")
    assert slot is not None
    run_command(d0, bytes(6))  # power-on UA
    assert run_command(d0, bytes(6)).sense_codes == (2, 0x3A, 0)
    library.move(slot, library.drive_address(0))
    assert run_command(d0, bytes(6)).sense_codes == (6, 0x28, 0)
    w = ssc.ReadWrite6(False, False, 5).build(0x0A)
    assert run_command(d0, w, b"hello").good
    assert run_command(d0, ssc.WriteFilemarks6(False, False, 1).build()).good
    # prevent: the changer may not take it out
    assert run_command(d0, bytes([0x1E, 0, 0, 0, 1, 0])).good
    with pytest.raises(MediumRemovalPrevented):
        library.move(library.drive_address(0), slot)
    assert run_command(d0, bytes([0x1E, 0, 0, 0, 0, 0])).good
    assert run_command(d0, ssc.LoadUnload(False, False, False, False, False).build()).good
    library.move(library.drive_address(0), library.drive_address(1))
    assert run_command(d0, bytes(6)).sense_codes == (2, 0x3A, 0)
    run_command(d1, bytes(6))
    assert run_command(d1, bytes(6)).sense_codes == (6, 0x28, 0)
    # an LTO-7 drive cannot read LTO-8 media: a specific sense, not a hardware error
    r = run_command(d1, ssc.ReadWrite6(False, False, 5).build(0x08), data_in_len=5)
    assert r.sense_codes == (3, 0x30, 2)
    d0.close()
    d1.close()


def test_drive_opened_with_cartridge_inside(library: Library, tmp_path: Path) -> None:
    slot = library.locate("AAA001L8")
    assert slot is not None
    library.move(slot, library.drive_address(0))
    d0 = drive(library, 0)
    run_command(d0, bytes(6))  # power on
    assert run_command(d0, bytes(6)).good
    assert library.addresses(ElementType.DATA_TRANSFER)[0] == library.drive_address(0)
    d0.close()
    assert run_command(d0, bytes(6)).sense_codes == (2, 0x3A, 0)
