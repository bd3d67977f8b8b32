"""A cartridge whose files are damaged, moved into a drive: NOT READY naming the file, never a dead
drive (issue 11, D1).

The drive opens a cartridge the changer moved in at its next command (`_apply_pending_load`, run
from its `execute` override). Whatever the cartridge's sidecars or data header hold, that command
and every later one must be answered, the log must name the bad file, and unloading and moving
the cartridge out must work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.admin import create_cartridges
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.scsi import ssc
from tcmu_py.testing.harness import Result, run_command

TUR = bytes(6)
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
UNLOAD = ssc.LoadUnload(False, False, False, False, False).build()
LOAD = ssc.LoadUnload(False, False, False, False, True).build()

UNKNOWN_FORMAT = (2, 0x30, 0x01)  # SPC-5 table 63: CANNOT READ MEDIUM - UNKNOWN FORMAT
MANUAL_INTERVENTION = (2, 0x04, 0x03)
NOT_PRESENT = (2, 0x3A, 0x00)


def _meta(**changes: object) -> bytes:
    meta: dict[str, object] = {
        "format": 1, "barcode": "BAD000L8", "kind": "data", "generation": 8,
        "capacity": 1 << 30, "early_warning": 4 << 20, "write_protected": False,
    }
    meta.update(changes)
    return json.dumps({k: v for k, v in meta.items() if v is not ...}).encode()


#: (file, contents, a word the log line must contain besides the file name)
DAMAGE: list[tuple[str, bytes, str]] = [
    ("mam.json", b"[]", "JSON object"),
    ("mam.json", b'{"load_count": "x"}', "load_count"),
    ("mam.json", b'{"load_count": 1.5}', "load_count"),
    ("mam.json", b'{"load_count": null}', "load_count"),
    ("mam.json", b'{"mb_read": -1}', "mb_read"),
    ("mam.json", b'{"attributes": []}', "attributes"),
    ("mam.json", b'{"attributes": {"0800": {"format": 1, "value": "zz"}}}', "value"),
    ("mam.json", b'{"attributes": {"XYZ": {"format": 1, "value": ""}}}', "XYZ"),
    ("mam.json", b'{"attributes": {"0800": {"format": 9, "value": ""}}}', "format"),
    ("mam.json", b"\xff\xfe{}", "UTF-8"),
    ("mam.json", b'{"load_count": 1', "JSON"),
    ("mam.json", b"", "JSON"),
    ("mam.json", b"[" * 100_000, "deep"),
    ("meta.json", _meta(generation=...), "generation"),
    ("meta.json", _meta(generation="8"), "generation"),
    ("meta.json", _meta(generation=99), "generation"),
    ("meta.json", _meta(generation=True), "generation"),
    ("meta.json", _meta(kind="floppy"), "kind"),
    ("meta.json", _meta(capacity=-5), "capacity"),
    ("meta.json", _meta(capacity=10**40), "capacity"),
    ("meta.json", _meta(early_warning=[1]), "early_warning"),
    ("meta.json", _meta(write_protected="no"), "write_protected"),
    ("meta.json", _meta(barcode=7), "barcode"),
    ("meta.json", b"[1, 2]", "JSON object"),
    ("meta.json", b'{"generation": 8', "JSON"),
    ("meta.json", b"\xc3\x28", "UTF-8"),
    ("meta.json", b"", "JSON"),
    ("meta.json", b"1" * 100_000, "JSON"),
    ("data", b"NOTATAPE" + bytes(56), "magic"),
    ("data", b"TCMUVTL", "header"),
]


@pytest.fixture
def library(tmp_path: Path) -> Library:
    lib = Library.create(
        tmp_path / "lib", name="L", drives=[("DRV0001", "IBM-LTO8")], slots=4, import_export=0
    )
    create_cartridges(lib, "BAD000L8,GUD000L8", load=True)
    return lib


def _drive(lib: Library) -> TapeDrive:
    d = TapeDrive(DeviceConfig(name="d0", subtype="vtl", cfgstring="", size=0), lib, 0)
    run_command(d, TUR)  # power-on unit attention
    return d


def _codes(r: Result) -> tuple[int, int, int]:
    return r.sense_codes


@pytest.mark.parametrize(
    ("name", "content", "word"), DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(DAMAGE)]
)
def test_damaged_cartridge_in_drive_is_not_ready_and_the_drive_lives(
    library: Library, caplog: pytest.LogCaptureFixture, name: str, content: bytes, word: str
) -> None:
    drive = _drive(library)
    bad = library.media_path("BAD000L8") / name
    bad.write_bytes(content)
    slot = library.locate("BAD000L8")
    assert slot is not None
    dte = library.drive_address(0)
    library.move(slot, dte)
    with caplog.at_level(logging.ERROR):
        first = run_command(drive, TUR)  # the pending load runs here
    expected = UNKNOWN_FORMAT
    assert _codes(first) == expected, first
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert str(bad) in logged and word in logged, logged
    assert all("\n" not in r.getMessage() for r in caplog.records)
    # The drive keeps answering: again NOT READY, INQUIRY works, LOAD retries and fails the same.
    assert _codes(run_command(drive, TUR)) == expected
    assert run_command(drive, INQUIRY, data_in_len=96).good
    assert _codes(run_command(drive, LOAD)) == expected
    # Unload, and the changer takes the cartridge out.
    assert run_command(drive, UNLOAD).good
    library.move(dte, slot)
    assert _codes(run_command(drive, TUR)) == NOT_PRESENT
    # A good cartridge loads in the same drive afterwards.
    good = library.locate("GUD000L8")
    assert good is not None
    library.move(good, dte)
    assert _codes(run_command(drive, TUR)) == (6, 0x28, 0)
    assert run_command(drive, TUR).good
    drive.close()


def test_damaged_cartridge_moved_out_without_unload(library: Library) -> None:
    """The changer may take a cartridge that failed to load straight out of the drive."""
    drive = _drive(library)
    (library.media_path("BAD000L8") / "mam.json").write_bytes(b"[]")
    slot = library.locate("BAD000L8")
    assert slot is not None
    library.move(slot, library.drive_address(0))
    assert _codes(run_command(drive, TUR)) == UNKNOWN_FORMAT
    library.move(library.drive_address(0), slot)
    assert _codes(run_command(drive, TUR)) == NOT_PRESENT
    drive.close()


def test_repaired_cartridge_loads_on_load(library: Library) -> None:
    """LOAD retries a failed load: after the operator repairs the file the drive becomes ready."""
    drive = _drive(library)
    mam = library.media_path("BAD000L8") / "mam.json"
    good = mam.read_bytes()
    mam.write_bytes(b'{"load_count": "x"}')
    slot = library.locate("BAD000L8")
    assert slot is not None
    library.move(slot, library.drive_address(0))
    assert _codes(run_command(drive, TUR)) == UNKNOWN_FORMAT
    mam.write_bytes(good)
    assert run_command(drive, LOAD).good
    assert run_command(drive, TUR).good
    drive.close()


def test_missing_cartridge_is_manual_intervention(library: Library) -> None:
    """A cartridge directory without its data file: not a format problem, 04/03."""
    drive = _drive(library)
    (library.media_path("BAD000L8") / "data").unlink()
    slot = library.locate("BAD000L8")
    assert slot is not None
    library.move(slot, library.drive_address(0))
    assert _codes(run_command(drive, TUR)) == MANUAL_INTERVENTION
    drive.close()


def test_damaged_cartridge_present_when_the_drive_starts(library: Library) -> None:
    """The drive's constructor loads a cartridge already in it: same answer, no exception."""
    slot = library.locate("BAD000L8")
    assert slot is not None
    library.move(slot, library.drive_address(0))
    (library.media_path("BAD000L8") / "meta.json").write_bytes(_meta(generation=...))
    drive = _drive(library)
    assert _codes(run_command(drive, TUR)) == UNKNOWN_FORMAT
    drive.close()
