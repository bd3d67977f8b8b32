"""The changer LUN: commands as mtx / Linux ch send them, READ ELEMENT STATUS data, sense."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import VtlHandler
from tcmu_py.handlers.vtl.changer import Changer
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.scsi import smc
from tcmu_py.scsi.constants import CodeSet, DesignatorType
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.scsi.smc import ElementStatus, ElementType
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import Result, run_command

MT, DT, IE, ST = 0x0001, 0x0100, 0x0300, 0x0400
SERIALS = ["SN00000001", "SN00000002"]


def res(
    element_type: int = 0,
    start: int = 0,
    count: int = 0xFFFF,
    *,
    voltag: bool = True,
    dvcid: bool = False,
    alloc: int = 0xFFFF,
) -> bytes:
    return smc.ReadElementStatus(element_type, voltag, start, count, False, dvcid, alloc).build()


def make(tmp_path: Path, *, dvcid: str = "serial", cartridges: int = 3) -> Changer:
    lib = Library.create(
        tmp_path / "lib",
        name="t",
        drives=[(SERIALS[0], "IBM-LTO8"), (SERIALS[1], "IBM-LTO8")],
        slots=8,
        import_export=2,
        dvcid=dvcid,
    )
    for i in range(cartridges):
        lib.media_path(f"ABC{i:03d}L8").write_bytes(b"")
        lib.place(f"ABC{i:03d}L8", ST + i)
    dev = Changer(DeviceConfig(name="ch0", subtype="vtl", cfgstring="", size=0), lib)
    assert run_command(dev, cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
    return dev


def status(dev: Changer, cdb: bytes | None = None) -> ElementStatus:
    r = run_command(dev, cdb or res(), data_in_len=0xFFFF)
    assert r.good, r
    return ElementStatus.parse(r.data)


def full_map(dev: Changer) -> dict[int, str]:
    return {
        d.address: d.primary_tag.identifier
        for p in status(dev).pages
        for d in p.descriptors
        if d.full and d.primary_tag
    }


def run(dev: Changer, cdb: bytes) -> Result:
    return run_command(dev, cdb)


def test_inquiry_and_rsoc(tmp_path: Path) -> None:
    dev = make(tmp_path)
    r = run_command(dev, cdbs.inquiry(), data_in_len=96)
    assert r.data[0] == 0x08 and r.data[1] & 0x80  # medium changer, removable
    r = run_command(dev, cdbs.report_supported_operation_codes(), data_in_len=4096)
    assert r.good
    listed = {r.data[i] for i in range(4, len(r.data), 8)}
    assert {0x07, 0x1B, 0x1E, 0x2B, 0x37, 0xA5, 0xA6, 0xB8} <= listed


def test_mode_pages_as_ch_reads_them(tmp_path: Path) -> None:
    dev = make(tmp_path)
    r = run_command(dev, cdbs.mode_sense6(0x1D), data_in_len=255)
    b = r.data
    page = b[4 + b[3] :]  # ch: buffer[buffer[3] + 6] is the first transport address
    assert page[0] & 0x3F == 0x1D and page[1] == 0x12
    pairs = struct.unpack_from(">8H", page, 2)
    assert pairs == (MT, 1, ST, 8, IE, 2, DT, 2)
    r = run_command(dev, cdbs.mode_sense6(0x1F), data_in_len=255)
    caps = r.data[4 + r.data[3] :]
    assert caps[2] == 0x0E and list(caps[4:8]) == [0, 0x0E, 0x0E, 0x0E]
    r = run_command(dev, cdbs.mode_sense6(0x1E), data_in_len=255)
    geo = r.data[4 + r.data[3] :]
    assert list(geo[:4]) == [0x1E, 2, 0, 0]


def test_mode_select_names_an_element_address_field_by_its_first_byte(tmp_path: Path) -> None:
    """SPC-5 4.4.5.2: changing the low byte of FIRST STORAGE ELEMENT ADDRESS (page 1Dh bytes
    6-7, not changeable) is refused naming byte 6, bit 7. Before: byte 7 and the bit."""
    dev = make(tmp_path)
    r = run_command(dev, cdbs.mode_sense6(0x1D, dbd=True), data_in_len=255)
    plist = bytearray(r.data)
    plist[0] = 0
    plist[4 + 7] ^= 0x01
    r = run_command(dev, cdbs.mode_select6(len(plist)), bytes(plist))
    assert r.sense_codes == (0x05, 0x26, 0x00), r
    s = parse_sense(r.sense)
    assert (s.in_cdb, s.field_pointer, s.bit_pointer) == (False, 4 + 6, 7)


def test_read_element_status_all(tmp_path: Path) -> None:
    dev = make(tmp_path)
    es = status(dev)
    assert es.first_address == MT and es.number_available == 1 + 2 + 2 + 8
    # SMC-3 6.12.1: type 0 reports in ascending address order, one page per type run.
    assert [p.element_type for p in es.pages] == [
        ElementType.MEDIUM_TRANSPORT,
        ElementType.DATA_TRANSFER,
        ElementType.IMPORT_EXPORT,
        ElementType.STORAGE,
    ]
    storage = es.pages[3].descriptors
    assert [d.full for d in storage] == [True] * 3 + [False] * 5
    assert storage[0].primary_tag == smc.VolumeTag("ABC000L8")
    assert storage[0].medium_type == smc.MediumType.DATA
    assert all(d.flags & smc.ACCESS for d in storage)
    ie = es.pages[2].descriptors
    assert all(d.flags & (smc.INENAB | smc.EXENAB | smc.ACCESS) for d in ie)
    assert es.byte_count == sum(8 + len(p.descriptors) * p.descriptor_length for p in es.pages)


def test_ch_per_element_query(tmp_path: Path) -> None:
    # drivers/scsi/ch.c ch_read_element_status: VOLTAG, 1 element, allocation 255; it checks
    # that bytes 16..17 are the address it asked for and copies 16 bytes from there.
    dev = make(tmp_path)
    for addr in [DT, DT + 1, ST + 2, IE]:
        etype = {DT: 4, DT + 1: 4, ST + 2: 2, IE: 3}[addr]
        r = run_command(dev, res(etype, addr, 1, alloc=255), data_in_len=256)
        assert r.good
        assert struct.unpack_from(">H", r.data, 16)[0] == addr
        assert r.data[16 + 6] & 0xB0 == 0  # ID/LUN not valid: ch falls back to its own mapping


def test_starting_address_and_count(tmp_path: Path) -> None:
    dev = make(tmp_path)
    es = status(dev, res(ElementType.STORAGE, ST + 2, 3))
    assert [d.address for p in es.pages for d in p.descriptors] == [ST + 2, ST + 3, ST + 4]
    assert es.first_address == ST + 2 and es.number_available == 3
    # A start below the type's range is fine: it is a minimum, not an element.
    es = status(dev, res(ElementType.DATA_TRANSFER, 0, 10))
    assert [d.address for d in es.pages[0].descriptors] == [DT, DT + 1]
    # Nothing of that type at or above start: an empty report.
    es = status(dev, res(ElementType.DATA_TRANSFER, IE, 10))
    assert (es.number_available, es.byte_count, es.pages) == (0, 0, ())
    es = status(dev, res(ElementType.STORAGE, ST, 0))
    assert es.number_available == 0
    r = run_command(dev, res(0, ST + 8), data_in_len=100)
    assert r.sense_codes == (5, 0x21, 0x01)
    assert parse_sense(r.sense).field_pointer == 2


@pytest.mark.parametrize("alloc", [0, 1, 7, 8, 9, 16, 60, 100, 463, 464, 465, 1000])
def test_allocation_length_truncates_data_not_counts(tmp_path: Path, alloc: int) -> None:
    dev = make(tmp_path)
    full = run_command(dev, res(alloc=0xFFFF), data_in_len=0xFFFF).data
    r = run_command(dev, res(alloc=alloc), data_in_len=alloc)
    assert r.good and r.data == full[:alloc]
    if alloc >= 8:
        assert r.data[:8] == full[:8]  # the header always tells the full size


def test_voltag_and_dvcid(tmp_path: Path) -> None:
    dev = make(tmp_path)
    run(dev, smc.MoveMedium(0, ST, DT + 1).build())
    es = status(dev, res(ElementType.DATA_TRANSFER, dvcid=True))
    page = es.pages[0]
    assert page.descriptor_length == 12 + 36 + 4 + len(SERIALS[1])
    drives = page.descriptors
    # The identifier is the drive's serial: what software matches against VPD page 80h.
    assert [d.identifier.decode() for d in drives] == SERIALS
    assert all(d.code_set == CodeSet.ASCII for d in drives)
    assert drives[1].full and drives[1].source == ST
    assert drives[1].primary_tag == smc.VolumeTag("ABC000L8")
    es = status(dev, res(ElementType.DATA_TRANSFER, voltag=False))
    assert es.pages[0].descriptor_length == 16 and not es.pages[0].pvoltag
    # DVCID on non-drive elements adds nothing.
    es = status(dev, res(ElementType.STORAGE, dvcid=True))
    assert es.pages[0].descriptor_length == 52


def test_dvcid_t10_form(tmp_path: Path) -> None:
    dev = make(tmp_path, dvcid="t10")
    drive = status(dev, res(ElementType.DATA_TRANSFER, dvcid=True)).pages[0].descriptors[0]
    assert drive.identifier_type == DesignatorType.T10_VENDOR_ID
    text = drive.identifier.decode()
    assert text.endswith(SERIALS[0]) and len(text) == 24 + len(SERIALS[0])


def test_move_medium_like_mtx(tmp_path: Path) -> None:
    dev = make(tmp_path)
    # mtx load 1 0: storage 1 -> drive 0 with the transport from the report.
    assert run(dev, smc.MoveMedium(MT, ST, DT).build()).good
    assert dev.library.drive_barcode(0) == "ABC000L8"
    # mtx unload: back to the SVALID source.
    src = status(dev, res(ElementType.DATA_TRANSFER)).pages[0].descriptors[0].source
    assert src == ST
    assert run(dev, smc.MoveMedium(0, DT, src).build()).good
    assert full_map(dev) == {ST: "ABC000L8", ST + 1: "ABC001L8", ST + 2: "ABC002L8"}


@pytest.mark.parametrize(
    ("cdb", "codes", "field"),
    [
        (smc.MoveMedium(MT, ST + 5, DT).build(), (5, 0x3B, 0x0E), None),
        (smc.MoveMedium(MT, ST, ST + 1).build(), (5, 0x3B, 0x0D), None),
        (smc.MoveMedium(ST, ST, DT).build(), (5, 0x21, 0x01), 2),
        (smc.MoveMedium(MT, 0x0999, DT).build(), (5, 0x21, 0x01), 4),
        (smc.MoveMedium(MT, ST, MT).build(), (5, 0x21, 0x01), 6),
        (smc.MoveMedium(MT, ST, DT, invert=True).build(), (5, 0x24, 0x00), 10),
        (smc.ExchangeMedium(MT, ST, ST + 1, 0x0999).build(), (5, 0x21, 0x01), 8),
        (smc.ExchangeMedium(MT, ST, ST, ST + 1).build(), (5, 0x21, 0x01), 6),
        (smc.ExchangeMedium(MT, ST, ST + 5, ST).build(), (5, 0x3B, 0x0E), None),
        (smc.ExchangeMedium(MT, ST, ST + 1, ST + 2).build(), (5, 0x3B, 0x0D), None),
        (smc.PositionToElement(MT, 0x0999).build(), (5, 0x21, 0x01), 4),
        (smc.PositionToElement(DT, ST).build(), (5, 0x21, 0x01), 2),
        (smc.OpenCloseImportExportElement(ST, smc.OpenCloseAction.OPEN).build(), (5, 0x21, 1), 2),
        (bytes([0x1E, 0, 0, 0, 2, 0]), (5, 0x24, 0), 4),
        (res(5), (5, 0x24, 0), 1),
    ],
)
def test_errors(tmp_path: Path, cdb: bytes, codes: tuple[int, int, int], field: int | None) -> None:
    dev = make(tmp_path)
    before = full_map(dev)
    r = run_command(dev, cdb, data_in_len=256 if cdb[0] == 0xB8 else 0)
    assert r.sense_codes == codes
    if field is not None:
        assert parse_sense(r.sense).field_pointer == field
    assert full_map(dev) == before


def test_exchange_and_position(tmp_path: Path) -> None:
    dev = make(tmp_path)
    assert run(dev, smc.MoveMedium(MT, ST, DT).build()).good
    assert run(dev, smc.ExchangeMedium(MT, ST + 1, DT, ST).build()).good
    assert full_map(dev) == {DT: "ABC001L8", ST: "ABC000L8", ST + 2: "ABC002L8"}
    assert run(dev, smc.PositionToElement(MT, ST + 7).build()).good
    assert run(dev, smc.PositionToElement(0, DT).build()).good


def test_drive_prevent_is_53_02(tmp_path: Path) -> None:
    dev = make(tmp_path)
    assert run(dev, smc.MoveMedium(MT, ST, DT).build()).good
    dev.library.set_drive_prevent(0, True)  # what the drive does on PREVENT MEDIUM REMOVAL
    assert run(dev, smc.MoveMedium(MT, DT, ST).build()).sense_codes == (5, 0x53, 0x02)
    dev.library.set_drive_prevent(0, False)
    assert run(dev, smc.MoveMedium(MT, DT, ST).build()).good


def test_prevent_locks_import_export_against_the_operator(tmp_path: Path) -> None:
    dev = make(tmp_path)
    lib = dev.library
    assert run(dev, bytes([0x1E, 0, 0, 0, 1, 0])).good
    assert Library.open(lib.path).ie_prevented  # persisted
    opened = smc.OpenCloseImportExportElement(IE, smc.OpenCloseAction.OPEN).build()
    assert run(dev, opened).sense_codes == (5, 0x53, 0x02)
    assert run(dev, smc.MoveMedium(MT, ST, IE).build()).good  # the robot still may
    assert run(dev, bytes([0x1E, 0, 0, 0, 0, 0])).good
    assert run(dev, opened).good
    es = status(dev, res(ElementType.IMPORT_EXPORT))
    assert not es.pages[0].descriptors[0].flags & smc.ACCESS  # open: the transport cannot reach
    assert run(dev, smc.MoveMedium(MT, IE, ST).build()).sense_codes == (2, 0x3A, 0x02)
    closed = smc.OpenCloseImportExportElement(IE, smc.OpenCloseAction.CLOSE).build()
    assert run(dev, closed).good
    assert run(dev, smc.MoveMedium(MT, IE, ST).build()).good


def test_operator_import_raises_unit_attention(tmp_path: Path) -> None:
    dev = make(tmp_path)
    other = Library.open(dev.library.path)  # e.g. the `tcmu-py vtl` process
    other.media_path("NEW000L8").write_bytes(b"")
    other.import_cartridge("NEW000L8")
    r = run_command(dev, res(ElementType.IMPORT_EXPORT), data_in_len=1000)
    assert r.sense_codes == (6, 0x28, 0x01)
    es = status(dev, res(ElementType.IMPORT_EXPORT))
    desc = es.pages[0].descriptors[0]
    assert desc.full and desc.flags & smc.IMPEXP and desc.primary_tag == smc.VolumeTag("NEW000L8")
    assert run(dev, smc.MoveMedium(MT, IE, ST + 7).build()).good
    assert not status(dev, res(ElementType.STORAGE, ST + 7, 1)).pages[0].descriptors[0].flags & (
        smc.IMPEXP
    )


def test_initialize_element_status(tmp_path: Path) -> None:
    dev = make(tmp_path)
    assert run(dev, bytes([0x07, 0, 0, 0, 0, 0])).good
    ranged = smc.InitializeElementStatusWithRange(True, False, ST, 4).build()
    assert run(dev, ranged).good
    bad = smc.InitializeElementStatusWithRange(True, False, 0x0999, 4).build()
    assert run(dev, bad).sense_codes == (5, 0x21, 0x01)
    assert run(dev, smc.InitializeElementStatusWithRange(False, True, 0x0999, 0).build()).good


def test_handler_opens_changer_and_shares_the_library(tmp_path: Path) -> None:
    dev = make(tmp_path)
    root = dev.library.path
    cfg = f"library={root};unit=changer"
    VtlHandler.check_config(cfg)
    for bad in ["library=/nonexistent,unit=changer", f"library={root};unit=drive9", "unit=x"]:
        with pytest.raises(Exception):  # noqa: B017 - ConfigError for each
            VtlHandler.check_config(bad)
    a = VtlHandler.open(DeviceConfig(name="c1", subtype="vtl", cfgstring=cfg, size=0))
    b = VtlHandler.open(DeviceConfig(name="c2", subtype="vtl", cfgstring=cfg, size=0))
    assert isinstance(a, Changer) and a.library is b.library
    a.close()
    b.close()


def test_changer_and_drive_luns_together(tmp_path: Path) -> None:
    """The drive LUN of the same library: DVCID = its VPD 80h serial, loads follow moves, and its
    PREVENT MEDIUM REMOVAL makes the changer refuse to unload it."""
    from tcmu_py.handlers.vtl.cartridge import Cartridge

    lib = Library.create(
        tmp_path / "lib",
        name="t",
        drives=[("DRVSER0001", "IBM-LTO8")],
        slots=2,
        import_export=0,
    )
    Cartridge.create(lib.media_path("ABC000L8"), "ABC000L8")
    lib.place("ABC000L8", ST)
    lib.close()
    root = tmp_path / "lib"
    changer = VtlHandler.open(
        DeviceConfig(name="c", subtype="vtl", cfgstring=f"library={root};unit=changer", size=0)
    )
    drive = VtlHandler.open(
        DeviceConfig(name="d", subtype="vtl", cfgstring=f"library={root},unit=drive0", size=0)
    )
    try:
        run_command(changer, cdbs.test_unit_ready())
        run_command(drive, cdbs.test_unit_ready())
        vpd80 = run_command(drive, cdbs.inquiry(evpd=True, page_code=0x80), data_in_len=255).data
        serial = vpd80[4 : 4 + vpd80[3]].decode().strip()
        es = status(changer, res(ElementType.DATA_TRANSFER, dvcid=True))
        assert es.pages[0].descriptors[0].identifier.decode() == serial == "DRVSER0001"

        assert run(changer, smc.MoveMedium(MT, ST, DT).build()).good
        # NOT READY TO READY CHANGE / MEDIUM MAY HAVE CHANGED attentions come first.
        tur = [run_command(drive, cdbs.test_unit_ready()) for _ in range(4)]
        assert tur[-1].good, tur
        assert run(drive, bytes([0x1E, 0, 0, 0, 1, 0])).good  # PREVENT on the drive
        assert run(changer, smc.MoveMedium(MT, DT, ST).build()).sense_codes == (5, 0x53, 0x02)
        assert run(drive, bytes([0x1E, 0, 0, 0, 0, 0])).good
        assert run(changer, smc.MoveMedium(MT, DT, ST + 1).build()).good
        assert run_command(drive, cdbs.test_unit_ready()).sense_codes[0] in (2, 6)
    finally:
        drive.close()
        changer.close()


def test_through_the_ring_commands_run_in_order(tmp_path: Path) -> None:
    """FakeKernel -> Ring -> DeviceRunner -> changer: a batch of dependent moves submitted at once
    completes in order (serial_commands), as a robot would do them."""
    from tcmu_py.testing.harness import RingHarness

    dev = make(tmp_path)
    ring = RingHarness(dev, workers=4)
    try:
        chain = [ST, DT, ST + 7, DT + 1, IE, ST + 3, DT, IE + 1, ST + 6]
        pending = [
            ring.submit(smc.MoveMedium(MT, a, b).build())
            for a, b in zip(chain, chain[1:], strict=False)
        ]
        pending.append(ring.submit(res(), data_in_len=4096))
        ring.wait(pending)
        assert [p.status for p in pending] == [0] * len(pending)
        es = ElementStatus.parse(pending[-1].data_in)
        full = {
            d.address: d.primary_tag.identifier
            for p in es.pages
            for d in p.descriptors
            if d.full and d.primary_tag
        }
        assert full == {ST + 6: "ABC000L8", ST + 1: "ABC001L8", ST + 2: "ABC002L8"}
    finally:
        ring.close()


def test_spc_conformance(tmp_path: Path) -> None:
    """The project's generic SPC checks (INQUIRY/VPD, RSOC truth, sense format, fuzzed CDBs)."""
    from tcmu_py.testing.conformance import check_any_device

    made = iter(range(1000))

    def new() -> Changer:
        root = tmp_path / f"lib{next(made)}"
        lib = Library.create(root, name="c", drives=[("S1", "IBM-LTO8")], slots=4, import_export=1)
        return Changer(DeviceConfig(name="c", subtype="vtl", cfgstring="", size=0), lib)

    assert check_any_device(new) == []


def test_changer_identity_from_the_library(tmp_path: Path) -> None:
    from tcmu_py.handlers.vtl.library import ChangerIdentity, LibraryError

    ident = ChangerIdentity("STK", "L700", "0104")
    lib = Library.create(
        tmp_path / "lib", name="i", drives=[], slots=1, import_export=0, changer=ident
    )
    lib.close()
    dev = Changer(
        DeviceConfig(name="c", subtype="vtl", cfgstring="", size=0), Library.open(tmp_path / "lib")
    )
    r = run_command(dev, cdbs.inquiry(), data_in_len=36)
    assert r.data[8:36] == b"STK     L700            0104"
    with pytest.raises(LibraryError):
        Library.create(
            tmp_path / "l2",
            name="x",
            drives=[],
            slots=1,
            import_export=0,
            changer=ChangerIdentity("TOOLONGVENDOR"),
        )


def test_mtx_status_flows(tmp_path: Path) -> None:
    """What mtx 1.3 does for `status` (mtxl.c ReadElementStatus), both polling methods."""
    dev = make(tmp_path)
    # ReadAssignmentPage: MODE SENSE(6), DBD=1, page 1Dh, allocation 136.
    r = run_command(dev, bytes([0x1A, 0x08, 0x1D, 0, 136, 0]), data_in_len=136)
    page = r.data[4 + r.data[3] :]
    mt, n_mt, st_, n_st, ie, n_ie, dt, n_dt = struct.unpack_from(">8H", page, 2)
    # Original method: per type, with a too-small allocation first, then `byte count + 8`.
    seen: dict[int, bool] = {}
    for etype, first, count in [(2, st_, n_st), (3, ie, n_ie), (4, dt, n_dt), (1, mt, 1)]:
        small = run_command(dev, res(etype, first, count, alloc=40), data_in_len=40).data
        need = int.from_bytes(small[5:8], "big") + 8
        assert need > 40
        data = run_command(dev, res(etype, first, count, alloc=need), data_in_len=need).data
        es = ElementStatus.parse(data)
        assert es.number_available == count
        seen |= {d.address: d.full for p in es.pages for d in p.descriptors}
    assert len(seen) == 1 + 8 + 2 + 2 and sum(seen.values()) == 3
    # Alternative method: all types from address 0, next start = last address + 1, until
    # INVALID ELEMENT ADDRESS says the scan passed the end.
    addresses: list[int] = []
    start = 0
    while True:
        r = run_command(dev, res(0, start, n_st - n_ie), data_in_len=0xFFFF)
        if not r.good:
            assert r.sense_codes == (5, 0x21, 0x01)
            break
        got = [d.address for p in ElementStatus.parse(r.data).pages for d in p.descriptors]
        assert got and 0 not in got
        addresses += got
        start = got[-1] + 1
    assert addresses == sorted(seen)


def test_rsoc_usage_masks_are_the_changer_commands(tmp_path: Path) -> None:
    from tcmu_py.scsi import spc

    dev = make(tmp_path)
    for op in (0x1B, 0x2B, 0x1E, 0x07, 0x37, 0xA5, 0xA6, 0xB8):
        cdb = cdbs.report_supported_operation_codes(reporting_options=1, requested_opcode=op)
        r = run_command(dev, cdb, data_in_len=64)
        want = spc.cdb_usage_mask(op, peripheral_type=0x08)
        assert r.data[4 : 4 + len(want)] == want, hex(op)
