"""Drive serials and the identifiers built from them (issue 11, D14).

A serial that is not printable ASCII is refused where the library is created or its state file
read, with an error naming the key and the value; and the builders of the ASCII fields (VPD 80h,
83h, B1h, DVCID identifiers, volume tags) never raise for any string (SPC-5 4.3.1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import admin
from tcmu_py.handlers.vtl.changer import Changer
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.handlers.vtl.library import Library, LibraryError
from tcmu_py.scsi import smc, spc, ssc
from tcmu_py.scsi.smc import ElementStatus, ElementType
from tcmu_py.testing.harness import run_command

BAD_SERIALS = ["DRV\u00e9001", "DRV\x00001", "DRV 001", "DRV\t001", "", "X" * 65, "\u2603"]


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in raw)


@pytest.mark.parametrize("serial", BAD_SERIALS, ids=repr)
def test_create_refuses_a_serial_that_is_not_printable_ascii(tmp_path: Path, serial: str) -> None:
    with pytest.raises(LibraryError) as info:
        Library.create(tmp_path / "lib", name="L", slots=2, import_export=0,
                       drives=[("OK1", "IBM-LTO8"), (serial, "IBM-LTO8")])
    msg = str(info.value)
    assert "drives[1].serial" in msg and repr(serial) in msg and "\n" not in msg
    assert not (tmp_path / "lib" / "library.json").exists()


@pytest.mark.parametrize("serial", BAD_SERIALS, ids=repr)
def test_open_refuses_a_state_file_with_such_a_serial(tmp_path: Path, serial: str) -> None:
    Library.create(tmp_path / "lib", name="L", drives=[("OK1", "IBM-LTO8")], slots=2,
                   import_export=0).close()
    state = tmp_path / "lib" / "library.json"
    doc = json.loads(state.read_text())
    doc["drives"][0]["serial"] = serial
    state.write_text(json.dumps(doc))
    with pytest.raises(LibraryError) as info:
        Library.open(tmp_path / "lib")
    msg = str(info.value)
    assert str(state) in msg and "drives[0].serial" in msg and "\n" not in msg


@pytest.mark.parametrize("serial", BAD_SERIALS[:4], ids=repr)
def test_cli_refuses_such_a_serial_with_exit_2(
    tmp_path: Path, serial: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        admin.main(["create-library", str(tmp_path / "lib"), "--name", "L", "--slots", "1",
                    "--drive", f"IBM-LTO8:{serial}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert repr(serial) in err and "Traceback" not in err
    assert not (tmp_path / "lib").exists()


@given(st.text())
def test_ascii_builders_never_raise(text: str) -> None:
    assert _printable(spc.ascii_text(text).encode("ascii"))
    page = ssc.build_vpd_manufacturer_serial(1, text)
    assert page[:2] == b"\x01\xb1" and _printable(page[4:]) and len(page) <= 4 + 255
    tag = smc.VolumeTag(text).build()
    assert len(tag) == 36 and _printable(tag[:32])
    ident = smc.ascii_identifier(text)
    assert _printable(ident) and len(ident) <= 255


class _Lib:
    """The drive's view of a library whose drive serial slipped past validation."""

    def __init__(self, serial: str) -> None:
        self.serial = serial

    def media_path(self, barcode: str) -> Path:
        raise AssertionError("no cartridge")

    def drive_barcode(self, drive_index: int) -> str | None:
        return None

    def set_drive_prevent(self, drive_index: int, prevented: bool) -> None:
        pass

    def add_drive_listener(self, drive_index: int, cb: object) -> None:
        pass

    def drive_serial(self, drive_index: int) -> str:
        return self.serial

    def drive_model(self, drive_index: int) -> str:
        return "IBM-LTO8"


@pytest.mark.parametrize("serial", ["DRV\u00e9001", "SN\x00\x7f1", "\U0001f4fc" * 3])
def test_drive_vpd_pages_answer_for_any_serial(serial: str) -> None:
    drive = TapeDrive(DeviceConfig(name="d", subtype="vtl", cfgstring="", size=0), _Lib(serial), 0)
    run_command(drive, bytes(6))  # power-on unit attention
    for page in (0x80, 0x83, 0xB1):
        r = run_command(drive, bytes([0x12, 1, page, 0, 255, 0]), data_in_len=255)
        assert r.good, (hex(page), r)
    r80 = run_command(drive, bytes([0x12, 1, 0x80, 0, 255, 0]), data_in_len=255)
    assert _printable(r80.data[4 : 4 + r80.data[3]])


@pytest.mark.parametrize("dvcid", ["serial", "t10"])
def test_changer_dvcid_answers_for_any_serial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dvcid: str
) -> None:
    lib = Library.create(tmp_path / "lib", name="L", drives=[("SN1", "IBM-LTO8")], slots=2,
                         import_export=0, dvcid=dvcid)
    monkeypatch.setattr(lib, "drive_serial", lambda i: "SN\u00e9\x00" + "x" * 300)
    changer = Changer(DeviceConfig(name="c", subtype="vtl", cfgstring="", size=0), lib)
    run_command(changer, bytes(6))  # power-on unit attention
    cdb = smc.ReadElementStatus(ElementType.DATA_TRANSFER, True, 0, 10, False, True, 0xFFFF).build()
    r = run_command(changer, cdb, data_in_len=0xFFFF)
    assert r.good, r
    desc = ElementStatus.parse(r.data).pages[0].descriptors[0]
    assert _printable(desc.identifier) and 0 < len(desc.identifier) <= 255
