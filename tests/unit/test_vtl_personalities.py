"""Library personalities: the changer LUN's identity, element addresses, DVCID form and MOVE
MEDIUM per personality; library.json records them; YAML and `tcmu-py vtl` select them; an
existing library never changes personality; HP/HPE drive identities."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import admin
from tcmu_py.handlers.vtl.changer import Changer
from tcmu_py.handlers.vtl.changer_personality import (
    CHANGER_PERSONALITIES,
    changer_personality,
)
from tcmu_py.handlers.vtl.library import Library, LibraryError, LibraryStateError
from tcmu_py.handlers.vtl.personality import personality
from tcmu_py.scsi import smc
from tcmu_py.scsi.constants import CodeSet, DesignatorType
from tcmu_py.scsi.smc import ElementStatus, ElementType
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import run_command

SERIALS = ["SN00000001", "SN00000002"]
MT, ST, IE, DT = (ElementType.MEDIUM_TRANSPORT, ElementType.STORAGE, ElementType.IMPORT_EXPORT,
                  ElementType.DATA_TRANSFER)

#: personality -> (INQUIRY bytes 8..36, first addresses MT, ST, IE, DT) as the products report.
EXPECTED = {
    "tcmu-py": (b"TCMU-PY VTL LIBRARY     0100", (0x0001, 0x0400, 0x0300, 0x0100)),
    "stk-sl150": (b"STK     SL150           0300", (0, 1000, 10, 500)),
    "quantum-scalar-i500": (b"QUANTUM Scalar i500     100A", (0x0001, 0x1000, 0x0010, 0x0100)),
}


def make(tmp_path: Path, key: str, *, slots: int = 8, ie: int = 2) -> Changer:
    lib = Library.create(
        tmp_path / key,
        name=key,
        drives=[(SERIALS[0], "IBM-LTO8"), (SERIALS[1], "HP-LTO8")],
        slots=slots,
        import_export=ie,
        personality=key,
    )
    first_slot = EXPECTED[key][1][1]
    for i in range(3):
        lib.media_path(f"ABC{i:03d}L8").write_bytes(b"")
        lib.place(f"ABC{i:03d}L8", first_slot + i)
    dev = Changer(DeviceConfig(name="ch", subtype="vtl", cfgstring="", size=0), lib)
    assert run_command(dev, cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
    return dev


def res(element_type: int = 0, start: int = 0, *, dvcid: bool = False) -> bytes:
    return smc.ReadElementStatus(element_type, True, start, 0xFFFF, False, dvcid, 0xFFFF).build()


def status(dev: Changer, cdb: bytes) -> ElementStatus:
    r = run_command(dev, cdb, data_in_len=0xFFFF)
    assert r.good, r
    return ElementStatus.parse(r.data)


def test_table_is_complete_and_lookup_is_lenient() -> None:
    assert set(CHANGER_PERSONALITIES) == set(EXPECTED)
    assert changer_personality("STK-SL150").key == "stk-sl150"
    assert changer_personality(" Quantum Scalar_i500 ").key == "quantum-scalar-i500"
    with pytest.raises(ConfigError, match="expected one of tcmu-py, stk-sl150"):
        changer_personality("ibm-ts4500")
    for p in CHANGER_PERSONALITIES.values():
        personality(p.default_drive)  # every default drive is a known drive personality
        assert len(p.vendor) <= 8 and len(p.product) <= 16 and len(p.revision) == 4


@pytest.mark.parametrize("key", list(EXPECTED))
def test_inquiry_identity(tmp_path: Path, key: str) -> None:
    dev = make(tmp_path, key)
    r = run_command(dev, cdbs.inquiry(), data_in_len=36)
    assert r.data[0] == 0x08 and r.data[8:36] == EXPECTED[key][0]


@pytest.mark.parametrize("key", list(EXPECTED))
def test_mode_sense_element_address_assignment_page(tmp_path: Path, key: str) -> None:
    mt, st, ie, dt = EXPECTED[key][1]
    dev = make(tmp_path, key)
    # As mtx reads it: MODE SENSE(6), DBD=1, page 1Dh, allocation 136.
    r = run_command(dev, bytes([0x1A, 0x08, 0x1D, 0, 136, 0]), data_in_len=136)
    page = r.data[4 + r.data[3]:]
    assert page[0] & 0x3F == 0x1D and page[1] == 0x12
    assert struct.unpack_from(">8H", page, 2) == (mt, 1, st, 8, ie, 2, dt, 2)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_read_element_status_layout(tmp_path: Path, key: str) -> None:
    mt, st, ie, dt = EXPECTED[key][1]
    dev = make(tmp_path, key)
    es = status(dev, res())
    layout = {ElementType(p.element_type): [d.address for d in p.descriptors] for p in es.pages}
    assert layout == {MT: [mt], ST: list(range(st, st + 8)), IE: [ie, ie + 1],
                      DT: [dt, dt + 1]}
    assert es.first_address == min(mt, st, ie, dt) and es.number_available == 13
    full = {d.address: d.primary_tag.identifier for p in es.pages for d in p.descriptors
            if d.full and d.primary_tag}
    assert full == {st: "ABC000L8", st + 1: "ABC001L8", st + 2: "ABC002L8"}
    # Per type from the first address of the type, as mtx and ch ask.
    for etype, first in ((ST, st), (IE, ie), (DT, dt), (MT, mt)):
        got = status(dev, res(etype, first))
        assert [d.address for p in got.pages for d in p.descriptors][0] == first


@pytest.mark.parametrize("key", list(EXPECTED))
def test_move_medium_with_the_personality_addresses(tmp_path: Path, key: str) -> None:
    mt, st, ie, dt = EXPECTED[key][1]
    dev = make(tmp_path, key)
    # Transport 0 (the default transport) and the transport's own address both work.
    for transport, src, dst in ((0, st, dt), (mt, dt, ie + 1), (mt, ie + 1, st + 7)):
        r = run_command(dev, smc.MoveMedium(transport, src, dst).build())
        assert r.good, (r, transport, src, dst)
    es = status(dev, res())
    by_addr = {d.address: d for p in es.pages for d in p.descriptors}
    assert not by_addr[st].full and by_addr[st + 7].full
    assert by_addr[st + 7].source == ie + 1  # SOURCE STORAGE ELEMENT ADDRESS: the last holder
    # An address of the default layout that this personality does not have.
    bad = 0x0400 if key != "tcmu-py" else 0x1000
    r = run_command(dev, smc.MoveMedium(0, bad, dt).build())
    assert r.sense_codes == (5, 0x21, 0x01)


def test_dvcid_forms(tmp_path: Path) -> None:
    # StorageTek: vendor specific ASCII serial, in a 32-byte identifier field.
    es = status(make(tmp_path, "stk-sl150"), res(DT, 500, dvcid=True))
    page = es.pages[0]
    assert page.identifier_length == 32
    d = page.descriptors[0]
    assert (d.code_set, d.identifier_type, d.identifier) == (
        CodeSet.ASCII, DesignatorType.VENDOR_SPECIFIC, SERIALS[0].encode())
    # Quantum: T10 vendor ID form (vendor 8, product 16, serial) of each drive.
    es = status(make(tmp_path, "quantum-scalar-i500"), res(DT, 0x100, dvcid=True))
    d0, d1 = es.pages[0].descriptors
    assert d0.identifier_type == DesignatorType.T10_VENDOR_ID
    assert d0.identifier == b"IBM     ULT3580-TD8     " + SERIALS[0].encode()
    assert d1.identifier == b"HPE     Ultrium 8-SCSI  " + SERIALS[1].encode()
    # The default keeps the serial, unpadded.
    es = status(make(tmp_path, "tcmu-py"), res(DT, 0x100, dvcid=True))
    assert es.pages[0].identifier_length == len(SERIALS[0])


def test_stk_media_and_transport_bytes(tmp_path: Path) -> None:
    """SL150: MEDIA DOMAIN / MEDIA TYPE after every descriptor, TRANSPORT DOMAIN / TYPE for
    drives; mtx and ch step by the page's descriptor length, which includes them."""
    dev = make(tmp_path, "stk-sl150")
    lib = dev.library
    lib.media_path("WRM000LY").write_bytes(b"")
    lib.place("WRM000LY", 1003)
    lib.media_path("CLN001L1").write_bytes(b"")
    lib.import_cartridge("CLN001L1", 10)
    run_command(dev, cdbs.test_unit_ready())  # the operator's change: a unit attention
    assert run_command(dev, smc.MoveMedium(0, 1001, 501).build()).good
    for dvcid in (False, True):
        es = status(dev, res(dvcid=dvcid))
        for page in es.pages:
            assert page.vendor_length == 4
            ident = 32 if dvcid and page.element_type == DT else 0
            assert page.descriptor_length == 12 + 36 + 4 + ident + 4
        vendor = {d.address: d.vendor_specific for p in es.pages for d in p.descriptors}
        assert vendor[1000] == b"L8\x00\x00" and vendor[1003] == b"LY\x00\x00"
        assert vendor[10] == b"CU\x00\x00" and vendor[1001] == b"\xff\xff\x00\x00"
        assert vendor[0] == b"\xff\xff\x00\x00"  # the hand: empty
        # Drive 0 (IBM LTO-8: no code in the manual) empty; drive 1 (HP LTO-8) holds ABC001L8.
        assert vendor[500] == b"\xff\xffL\xff" and vendor[501] == b"L8L\xff"
    # A drive model the manual lists gets its TRANSPORT TYPE (HP LTO-6: 3Bh is LTO-5, 3Dh LTO-6).
    lib6 = Library.create(tmp_path / "six", name="six", drives=[("S6", "HP-LTO6")], slots=1,
                          import_export=0, personality="stk-sl150")
    dev6 = Changer(DeviceConfig(name="c6", subtype="vtl", cfgstring="", size=0), lib6)
    run_command(dev6, cdbs.test_unit_ready())
    (d,) = status(dev6, res(DT, 500)).pages[0].descriptors
    assert d.vendor_specific == b"\xff\xffL\x3d"
    # Other personalities send none.
    es = status(make(tmp_path, "quantum-scalar-i500"), res())
    assert all(p.vendor_length == 0 and p.descriptor_length == 52 for p in es.pages)


def test_library_json_records_the_personality(tmp_path: Path) -> None:
    make(tmp_path, "stk-sl150").close()
    doc = json.loads((tmp_path / "stk-sl150" / "library.json").read_text())
    assert doc["personality"] == "stk-sl150" and doc["dvcid"] == "serial"
    assert doc["changer"] == {"vendor": "STK", "product": "SL150", "revision": "0300"}
    assert doc["elements"]["medium_transport"] == [0, 1]
    assert doc["elements"]["storage"] == [1000, 8] and doc["elements"]["data_transfer"] == [500, 2]
    lib = Library.open(tmp_path / "stk-sl150")
    assert lib.personality == "stk-sl150" and lib.ranges()[MT] == (0, 1)
    lib.close()
    doc["personality"] = "ibm-ts4500"
    (tmp_path / "stk-sl150" / "library.json").write_text(json.dumps(doc))
    with pytest.raises(LibraryStateError, match="personality: got 'ibm-ts4500', expected one of"):
        Library.open(tmp_path / "stk-sl150")


def test_only_a_transport_may_have_address_zero(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match="reserved for the medium transport"):
        Library.create(tmp_path / "l", name="x", drives=[], slots=2, import_export=0,
                       personality="stk-sl150", first_address={ST: 0})
    with pytest.raises(LibraryError, match="expected one of"):
        Library.create(tmp_path / "m", name="x", drives=[], slots=2, import_export=0,
                       personality="nope")


def _ensure(path: Path, personality: str | None) -> Library:
    return admin.ensure_library(path, name="lab", drives=[(SERIALS[0], "IBM-LTO8")], slots=4,
                                import_export=1, personality=personality)


def test_existing_library_keeps_its_personality(tmp_path: Path) -> None:
    # A library created before personalities existed (no key) is "tcmu-py".
    legacy = tmp_path / "legacy"
    _ensure(legacy, None).close()
    assert "personality" not in json.loads((legacy / "library.json").read_text())
    lib = _ensure(legacy, "tcmu-py")
    assert lib.personality is None and lib.ranges()[ST] == (0x0400, 4)
    lib.close()
    with pytest.raises(LibraryError, match="personality: library has 'tcmu-py', declared "
                                           "'stk-sl150'"):
        _ensure(legacy, "stk-sl150")
    # And one created with a personality refuses another, leaving library.json as it was.
    sl = tmp_path / "sl150"
    _ensure(sl, "STK-SL150").close()
    before = (sl / "library.json").read_bytes()
    with pytest.raises(LibraryError, match="declared 'quantum-scalar-i500'"):
        _ensure(sl, "quantum-scalar-i500")
    assert (sl / "library.json").read_bytes() == before
    _ensure(sl, "stk-sl150").close()


def test_cli_create_library_with_a_personality(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lib_dir = tmp_path / "q"
    assert admin.main(["create-library", str(lib_dir), "--name", "q", "--personality",
                       "QUANTUM-SCALAR-I500", "--drive", "IBM-LTO8:S1", "--slots", "4"]) == 0
    assert admin.main(["list", str(lib_dir)]) == 0
    listing = capsys.readouterr().out
    assert "personality quantum-scalar-i500: QUANTUM Scalar i500 100A" in listing
    assert "drive 1     0x0100" in listing and "slot 1     0x1000" in listing, listing
    lib = Library.open(lib_dir)
    assert lib.personality == "quantum-scalar-i500" and lib.dvcid == "t10"
    assert lib.changer_identity.product == "Scalar i500" and lib.ranges()[ST] == (0x1000, 4)
    lib.close()
    # --product over the personality's identity; the addresses stay the personality's.
    assert admin.main(["create-library", str(tmp_path / "s"), "--name", "s", "--personality",
                       "stk-sl150", "--product", "SL150 LAB", "--slots", "2"]) == 0
    lib = Library.open(tmp_path / "s")
    assert (lib.changer_identity.vendor, lib.changer_identity.product) == ("STK", "SL150 LAB")
    assert lib.ranges()[ST] == (1000, 2)
    lib.close()
    with pytest.raises(SystemExit):
        admin.main(["create-library", str(tmp_path / "x"), "--name", "x", "--personality",
                    "sl500", "--slots", "2"])
    assert "invalid choice: 'sl500'" in capsys.readouterr().err


LIB_YAML = """\
libraries:
  - name: lab
    changer: ch
    {personality}
    drives: [{{name: d0}}, {{name: d1, model: IBM-LTO9}}]
    slots: 4
    media_dir: /m
"""


def load(personality_line: str) -> object:
    text = LIB_YAML.format(personality=personality_line)
    return load_config_text(textwrap.dedent(text), "cfg.yaml")


def test_yaml_personality_and_default_drive() -> None:
    (lib,) = load("personality: STK-SL150").section("libraries")  # type: ignore[attr-defined]
    assert lib.personality == "stk-sl150"
    # A drive without a model is the personality's usual drive; a model given wins.
    assert [d.model for d in lib.drives] == ["HP-LTO8", "IBM-LTO9"]
    (lib,) = load("").section("libraries")  # type: ignore[attr-defined]
    assert lib.personality == "tcmu-py" and lib.drives[0].model == "IBM-LTO8"


@pytest.mark.parametrize("value", ["sl500", "42", "[stk-sl150]"])
def test_yaml_bad_personality_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load(f"personality: {value}")
    msg = str(ei.value)
    assert msg.count("\n") == 0, msg
    assert msg.startswith("cfg.yaml: libraries[0].personality: got ")
    assert msg.endswith("expected a library personality, one of tcmu-py, stk-sl150, "
                        "quantum-scalar-i500 (case-insensitive)")


def test_hp_drive_identities() -> None:
    """HP up to LTO-7, HPE from LTO-8 on; product "Ultrium N-SCSI"; four-character revisions."""
    assert [(personality(f"HP-LTO{n}").vendor, personality(f"HP-LTO{n}").product)
            for n in range(5, 10)] == [
        ("HP", "Ultrium 5-SCSI"), ("HP", "Ultrium 6-SCSI"), ("HP", "Ultrium 7-SCSI"),
        ("HPE", "Ultrium 8-SCSI"), ("HPE", "Ultrium 9-SCSI")]
    assert all(len(personality(f"HP-LTO{n}").revision) == 4 for n in range(5, 10))
    for alias in ("HPE-LTO8", "HPE Ultrium 8-SCSI", "HP Ultrium 8-SCSI"):
        assert personality(alias).key == "HP-LTO8"
