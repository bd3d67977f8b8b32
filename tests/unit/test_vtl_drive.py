"""The tape drive device, driven through Command objects (no ring)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
from vtl_fakes import FORM, FakeLibrary, Tape

from tcmu_py.handlers.vtl.cartridge import Cartridge
from tcmu_py.scsi import ssc
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.harness import Result

GOOD = (0, 0, 0)


def sense(r: Result):  # type: ignore[no-untyped-def]
    return parse_sense(r.sense)


# ---------------------------------------------------------------------------------------------


def test_empty_drive_then_load_raises_medium_changed(lib: FakeLibrary) -> None:
    lib.create("TST001L8")
    t = Tape(lib)
    assert t.run(bytes(6)).sense_codes == (6, 0x29, 0)  # power on
    assert t.run(bytes(6)).sense_codes == (2, 0x3A, 0)
    lib.move("TST001L8")
    assert t.run(bytes(6)).sense_codes == (6, 0x28, 0)
    assert t.run(bytes(6)).good
    lib.move(None)
    assert t.run(bytes(6)).sense_codes == (2, 0x3A, 0)


def test_inquiry_identifies_personality(lib: FakeLibrary) -> None:
    t = Tape(lib, "HP-LTO7")
    r = t.run(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    assert r.data[0] == 0x01 and r.data[1] & 0x80  # tape, removable
    assert r.data[8:16].rstrip() == b"HP" and r.data[16:32].rstrip() == b"Ultrium 7-SCSI"
    r = t.run(bytes([0x12, 1, 0x80, 0, 64, 0]), data_in_len=64)
    assert b"SN000000" in r.data


def test_variable_round_trip_and_ili(tape: Tape) -> None:
    assert tape.write(b"A" * 100).good
    assert tape.write(b"B" * 50).good
    assert tape.write(b"C" * 10).good
    assert tape.rewind().good
    r = tape.read(100)
    assert r.good and r.data == b"A" * 100
    # block shorter than requested: ILI, INFORMATION = +residue, the short block returned
    r = tape.read(80)
    s = sense(r)
    assert (s.sense_key, s.ili, s.info_signed) == (0, True, 30) and r.data == b"B" * 50
    # block longer than requested: ILI, negative residue, truncated data
    r = tape.read(4)
    s = sense(r)
    assert (s.ili, s.info_signed, r.data) == (True, -6, b"CCCC")
    assert tape.tell().object_id == 3
    # SILI suppresses the underlength report in variable mode
    tape.rewind()
    tape.read(100)
    r = tape.read(80, sili=True)
    assert r.good and r.data == b"B" * 50


def test_filemark_and_eod_on_read(tape: Tape) -> None:
    tape.write(b"x" * 10)
    tape.weof(1)
    tape.rewind()
    assert tape.read(10).good
    r = tape.read(10)
    s = sense(r)
    assert (s.sense_key, s.asc, s.ascq, s.filemark, s.info) == (0, 0, 1, True, 10)
    assert tape.tell().object_id == 2 and tape.tell().file_id == 1
    r = tape.read(10)
    s = sense(r)
    assert (s.sense_key, s.asc, s.ascq, s.info) == (8, 0, 5, 10)


def test_blank_tape_read_is_blank_check(tape: Tape) -> None:
    assert tape.read(512).sense_codes == (8, 0, 5)


def test_fixed_block_mode(tape: Tape) -> None:
    assert tape.write_fixed(b"z" * 512, 1).sense_codes == (5, 0x24, 0)  # variable mode
    assert tape.mode_select_block(0, 512).good
    r = tape.mode_sense(0x0F)
    assert r.data[6:8] == b"\x00\x08" and r.data[13:16] == (512).to_bytes(3, "big")
    data = os.urandom(4 * 512)
    assert tape.write_fixed(data, 4).good
    tape.weof(1)
    assert tape.tell().object_id == 5
    tape.rewind()
    r = tape.read_fixed(3, 512)
    assert r.good and r.data == data[:1536]
    r = tape.read_fixed(3, 512)  # one block, then the filemark
    s = sense(r)
    assert s.filemark and s.info == 2 and r.data == data[1536:]
    # a variable block read in fixed mode with the wrong size -> ILI
    tape.mode_select_block(0, 0)
    tape.write(b"q" * 100)
    tape.mode_select_block(0, 512)
    tape.locate(5)
    r = tape.read_fixed(2, 512)
    s = sense(r)
    assert s.ili and s.info == 2 and tape.tell().object_id == 6
    assert tape.mode_select_block(0, 0xFFFFFF).sense_codes == (5, 0x26, 0)


def test_mode_select_rejects_unknown_density(tape: Tape) -> None:
    assert tape.mode_select_block(0x42, 512).sense_codes == (5, 0x26, 0)


def test_read_block_limits(tape: Tape) -> None:
    r = tape.run(bytes([0x05, 0, 0, 0, 0, 0]), data_in_len=6)
    gran, mx, mn = struct.unpack(">B3sH", r.data)
    assert int.from_bytes(mx, "big") == 512 * 1024 and mn == 1


def test_write_filemarks_zero_flushes(tape: Tape, lib: FakeLibrary) -> None:
    tape.write(b"d" * 4096)
    assert tape.weof(0).good
    # durable: an independent reader sees the block (index checkpoint written)
    assert (lib.media_path("TST001L8") / "index").exists()
    assert tape.tell().object_id == 1


def build_tape(tape: Tape, layout: str) -> None:
    """'b' = 10-byte block, 'f' = filemark."""
    for c in layout:
        r = tape.write(b"b" * 10) if c == "b" else tape.weof(1)
        assert r.good, r
    tape.rewind()


def test_space_blocks_and_filemarks(tape: Tape) -> None:
    build_tape(tape, "bbbfbbffb")  # objects 0..8
    assert tape.space(0, 2).good and tape.tell().object_id == 2
    r = tape.space(0, 5)  # crosses filemark at 3
    s = sense(r)
    assert s.filemark and s.info == 4 and tape.tell().object_id == 4
    r = tape.space(0, -3)  # back over 4? object 3 is a filemark -> stop at its BOP side
    s = sense(r)
    assert s.filemark and s.info == 3 and tape.tell().object_id == 3
    tape.rewind()
    assert tape.space(1, 2).good and tape.tell().object_id == 7
    r = tape.space(1, 5)  # only one filemark left
    s = sense(r)
    assert (s.sense_key, s.ascq, s.info) == (8, 5, 4) and tape.tell().object_id == 9
    assert tape.space(1, -2).good and tape.tell().object_id == 6
    r = tape.space(1, -5)
    s = sense(r)
    assert (s.sense_key, s.ascq, s.eom, s.info) == (0, 4, True, 4) and tape.tell().bop
    assert tape.space(2, 2).good and tape.tell().object_id == 8  # sequential filemarks
    tape.rewind()
    assert tape.space(3, 0).good and tape.tell().object_id == 9  # EOD
    assert tape.space(0, -1, sixteen=True).good and tape.tell().object_id == 8
    r = tape.space(0, 5, sixteen=True)
    assert sense(r).sense_key == 8 and sense(r).info == 4


def test_space_backward_hits_bop(tape: Tape) -> None:
    build_tape(tape, "bbb")
    tape.space(0, 2)
    r = tape.space(0, -5)
    s = sense(r)
    assert (s.ascq, s.eom, s.info) == (4, True, 3) and tape.tell().object_id == 0


def test_locate_and_read_position(tape: Tape) -> None:
    build_tape(tape, "bbfbbfb")
    assert tape.locate(4).good
    p = tape.tell()
    assert (p.object_id, p.file_id, p.bop) == (4, 1, False)
    assert tape.tell(FORM.SHORT).object_id == 4 and tape.tell(FORM.EXTENDED).object_id == 4
    assert tape.locate(6, sixteen=True).good and tape.tell().object_id == 6
    assert tape.locate(2, sixteen=True, dest=1).good and tape.tell().object_id == 6  # file 2
    assert tape.locate(0, sixteen=True, dest=3).good and tape.tell().object_id == 7  # EOD
    r = tape.locate(50)
    assert r.sense_codes == (8, 0, 5) and tape.tell().object_id == 7
    assert tape.locate(0).good and tape.tell().bop
    # extended form honours the allocation length
    r = tape.run(ssc.ReadPosition(FORM.EXTENDED, 8).build(), data_in_len=32)
    assert r.good and len(r.data) == 8
    assert tape.run(ssc.ReadPosition(3, 0).build(), data_in_len=32).sense_codes == (5, 0x24, 0)


def test_overwrite_in_the_middle_truncates(tape: Tape) -> None:
    build_tape(tape, "bbbfbb")
    tape.locate(2)
    tape.write(b"new")
    assert tape.read(10).sense_codes == (8, 0, 5)
    tape.rewind()
    assert tape.space(3, 0).good and tape.tell().object_id == 3


def test_early_warning_then_volume_overflow(lib: FakeLibrary) -> None:
    lib.create("SML001L8", capacity=64 * 1024, early_warning=16 * 1024)
    t = Tape(lib)
    lib.move("SML001L8")
    t.clear_ua()
    block = b"w" * 4000
    warned = 0
    written = 0
    for _ in range(40):
        r = t.write(block)
        if r.good:
            written += 1
            continue
        s = sense(r)
        if (s.sense_key, s.asc, s.ascq) == (0, 0, 2):
            assert s.eom and s.info == 0
            warned += 1
            written += 1
            continue
        assert (s.sense_key, s.asc, s.ascq, s.eom, s.info) == (0xD, 0, 2, True, 4000)
        break
    else:
        pytest.fail("never overflowed")
    assert warned >= 1
    r = t.weof(1)  # closing the file after the overflow still works (EOM, NO SENSE)
    assert r.sense_codes == (0, 0, 2) and sense(r).eom
    t.rewind()
    for _ in range(written):
        assert t.read(4000).data == block
    assert parse_sense(t.read(4000).sense).filemark
    assert t.read(4000).sense_codes == (8, 0, 5)


def test_worm_refuses_overwrite_allows_append(lib: FakeLibrary) -> None:
    lib.create("WRM001LY")
    t = Tape(lib)
    lib.move("WRM001LY")
    t.clear_ua()
    assert t.mode_sense(0x1D).data[16 + 2] & 0x01  # WORMM
    build_tape(t, "bbf")
    assert t.write(b"x").sense_codes == (7, 0x30, 0x0C)
    assert t.run(bytes([0x19, 0, 0, 0, 0, 0])).sense_codes == (7, 0x30, 0x0C)
    t.locate(2)  # over the trailing filemark: allowed
    assert t.write(b"append").good
    assert t.space(3, 0).good and t.write(b"more").good
    t.rewind()
    assert t.read(10).data == b"b" * 10


def test_write_protected(lib: FakeLibrary) -> None:
    lib.create("WPT001L8", write_protected=True)
    t = Tape(lib)
    lib.move("WPT001L8")
    t.clear_ua()
    assert t.write(b"x").sense_codes == (7, 0x27, 0)
    assert t.mode_sense(0x0F).data[3] & 0x80
    assert t.weof(0).good  # nothing to write: allowed
    assert t.log_sense(0x2E).data[4 + 5 * 8 + 4] == 1  # flag 09h WRITE PROTECT
    assert t.log_sense(0x2E).data[4 + 5 * 8 + 4] == 0  # cleared after reading


@pytest.mark.parametrize(
    ("model", "barcode", "read", "write"),
    [
        ("IBM-LTO8", "GEN001L8", GOOD, GOOD),
        ("IBM-LTO8", "GEN001L7", GOOD, GOOD),
        ("IBM-LTO8", "GEN001L6", (3, 0x30, 2), (7, 0x30, 5)),
        ("IBM-LTO8", "GEN001L9", (3, 0x30, 2), (7, 0x30, 5)),
        ("IBM-LTO7", "GEN001L5", (8, 0, 5), (7, 0x30, 5)),  # N-2: read only
        ("HP-LTO6", "GEN001L4", (8, 0, 5), (7, 0x30, 5)),
        ("IBM-LTO5", "GEN001L6", (3, 0x30, 2), (7, 0x30, 5)),
    ],
)
def test_generation_rules(
    lib: FakeLibrary, model: str, barcode: str, read: tuple[int, int, int],
    write: tuple[int, int, int],
) -> None:
    lib.create(barcode)
    t = Tape(lib, model)
    lib.move(barcode)
    t.clear_ua()
    assert t.run(bytes(6)).good
    assert t.read(10).sense_codes == (read if read != GOOD else (8, 0, 5))
    assert t.write(b"x" * 10).sense_codes == write


def test_cleaning_cartridge(lib: FakeLibrary) -> None:
    lib.create("CLN001L1")
    t = Tape(lib)
    lib.move("CLN001L1")
    t.clear_ua()
    assert t.run(bytes(6)).sense_codes == (2, 0x30, 3)
    assert t.read(10).sense_codes == (2, 0x30, 3)


def test_prevent_allow_and_load_unload(tape: Tape, lib: FakeLibrary) -> None:
    assert tape.run(bytes([0x1E, 0, 0, 0, 1, 0])).good
    assert lib.prevent[0] is True
    assert tape.run(ssc.LoadUnload(False, False, False, False, False).build()).sense_codes == (
        5, 0x53, 2,
    )
    assert tape.run(bytes([0x1E, 0, 0, 0, 0, 0])).good and lib.prevent[0] is False
    tape.write(b"kept")
    assert tape.run(ssc.LoadUnload(False, False, False, False, False).build()).good
    assert tape.run(bytes(6)).sense_codes == (2, 4, 2)
    assert tape.run(ssc.LoadUnload(False, False, False, False, True).build()).good
    assert tape.run(bytes(6)).good and tape.tell().bop
    assert tape.read(10).data == b"kept"
    assert tape.run(ssc.LoadUnload(False, False, True, False, True).build()).sense_codes == (
        5, 0x24, 0,
    )
    assert tape.run(bytes([0x1E, 0, 0, 0, 2, 0])).sense_codes == (5, 0x24, 0)


def test_erase_truncates_at_position(tape: Tape) -> None:
    build_tape(tape, "bbbb")
    tape.locate(1)
    assert tape.run(ssc.Erase6(False, True).build()).good
    tape.rewind()
    assert tape.space(3, 0).good and tape.tell().object_id == 1


def test_report_density_support(tape: Tape) -> None:
    r = tape.run(ssc.ReportDensitySupport(False, False, 4096).build(), data_in_len=4096)
    n = int.from_bytes(r.data[:2], "big")
    descs = [r.data[4 + i * 52 : 4 + (i + 1) * 52] for i in range((n - 2) // 52)]
    assert [d[0] for d in descs] == [0x5E, 0x5C]
    assert descs[0][2] & 0xA0 == 0xA0  # WRTOK, DEFLT
    assert descs[0][24:32].rstrip() == b"U-832"
    r = tape.run(ssc.ReportDensitySupport(True, False, 4096).build(), data_in_len=4096)
    assert (int.from_bytes(r.data[:2], "big") - 2) // 52 == 1 and r.data[4] == 0x5E
    r = tape.run(ssc.ReportDensitySupport(False, True, 4096).build(), data_in_len=4096)
    assert r.good and r.data[4] == 0x88 and r.data[4 + 56] == 0x8C


def test_mode_pages_and_compression(tape: Tape, lib: FakeLibrary) -> None:
    for code, sub, length in [(0x0F, 0, 16), (0x10, 0, 16), (0x10, 1, 32), (0x11, 0, 16),
                              (0x1D, 0, 32)]:
        r = tape.mode_sense(code, sub)
        assert r.good, (code, r)
        body = r.data[16:]  # 8-byte MODE SENSE(10) header + one block descriptor
        assert body[0] & 0x3F == code and len(body) == length, (code, sub, body.hex())
    r = tape.mode_sense(0x0F)
    page = bytearray(r.data[16:32])
    assert not page[2] & 0x80
    page[2] |= 0x80  # DCE on
    page[0] &= 0x3F
    hdr = bytes([0, 0, 0, 0x10, 0, 0, 0, 0])
    assert tape.run(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 24, 0]), hdr + bytes(page)).good
    assert tape.dev.compression
    assert tape.mode_sense(0x10).data[16 + 14] == 1
    tape.write(bytes(100_000))
    tape.weof(0)
    assert Cartridge.open(lib.media_path("TST001L8"), read_only=True).used < 10_000
    tape.rewind()
    assert tape.read(100_000).data == bytes(100_000)


@pytest.mark.parametrize("field", [4, 8])  # COMPRESSION, DECOMPRESSION ALGORITHM
@pytest.mark.parametrize("algorithm", [0x00, 0x02, 0x10, 0xFF, 0x0100_0001])
def test_an_unsupported_compression_algorithm_is_refused_naming_its_field(
        tape: Tape, field: int, algorithm: int) -> None:
    """SSC-5 8.3.3: an algorithm the drive does not support (it has 01h, the default one) is
    ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, the field pointer at the field's first
    byte and the bit pointer at bit 7 (SPC-5 4.4.5.2); nothing changes. Before: the pointer
    named the last byte that differed (byte 11 for 02h) and its highest differing bit."""
    page = bytearray(tape.mode_sense(0x0F).data[16:32])
    page[0] &= 0x3F
    page[2] |= 0x80  # DCE on, with the algorithm asked for
    page[field:field + 4] = algorithm.to_bytes(4, "big")
    plist = bytes([0, 0, 0, 0x10, 0, 0, 0, 0]) + bytes(page)
    r = tape.run(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0]), plist)
    assert r.sense_codes == (0x05, 0x26, 0x00), r
    s = parse_sense(r.sense)
    assert (s.in_cdb, s.field_pointer, s.bit_pointer) == (False, 8 + field, 7)
    assert not tape.dev.compression
    assert tape.mode_sense(0x0F).data[16 + 4:16 + 12] == bytes.fromhex("0000000100000001")


def _st_compression(tape: Tape, state: bool, c_algo: int) -> Result:
    """What Linux st's `st_compression` sends for `mt compression <state>` with the st option
    `c_algo`: MODE SENSE(6) of page 0Fh with the block descriptor, DCE set or cleared and,
    when `c_algo` is not zero, byte 7 (the COMPRESSION ALGORITHM's last byte) set to `c_algo`
    (on) or 0 (off), the header's reserved fields cleared, MODE SELECT(6) with PF."""
    r = tape.run(bytes([0x1A, 0, 0x0F, 0, 0xFF, 0]), data_in_len=0xFF)
    assert r.good, r
    data = bytearray(r.data[:r.data[0] + 1])
    page = 4 + data[3]
    assert data[page] & 0x3F == 0x0F and data[page + 2] & 0x40  # DCC: st gives up without it
    if state:
        data[page + 2] |= 0x80
    else:
        data[page + 2] &= ~0x80
    if c_algo:
        data[page + 7] = c_algo if state else 0
    data[0] = data[1] = 0
    data[2] &= 0x7F
    data[page] &= 0x3F
    return tape.run(bytes([0x15, 0x10, 0, 0, len(data), 0]), bytes(data))


def test_st_turns_compression_off_with_algorithm_0_and_on_again(tape: Tape) -> None:
    """SSC-5 8.3.3: COMPRESSION ALGORITHM 00h means no algorithm selected; with DCE zero the
    drive accepts it (Linux st sends it so when compression is turned off with `c_algo` set)
    and keeps reporting its one algorithm, 01h, so that st turning compression on again
    without `c_algo` (the field untouched) still asks for a supported one. Before: the
    first MODE SELECT with 00h was INVALID FIELD IN PARAMETER LIST (byte 4 of the page)."""
    algorithms = slice(16 + 4, 16 + 12)
    assert _st_compression(tape, True, 1).good and tape.dev.compression
    r = _st_compression(tape, False, 1)
    assert r.good, r
    assert not tape.dev.compression
    page = tape.mode_sense(0x0F).data
    assert not page[16 + 2] & 0x80 and page[algorithms] == bytes.fromhex("0000000100000001")
    assert tape.mode_sense(0x10).data[16 + 14] == 0  # SELECT DATA COMPRESSION ALGORITHM
    assert _st_compression(tape, True, 0).good and tape.dev.compression
    assert _st_compression(tape, False, 0).good and not tape.dev.compression


@pytest.mark.parametrize("algorithm", [0x02, 0x10, 0xFF, 0x0100_0000])
def test_compression_off_still_refuses_an_algorithm_the_drive_lacks(
        tape: Tape, algorithm: int) -> None:
    """SSC-5 8.3.3: only 00h (none) is taken in place of the drive's 01h with DCE zero; any
    other algorithm it does not have is refused naming the field's first byte, bit 7."""
    page = bytearray(tape.mode_sense(0x0F).data[16:32])
    page[0] &= 0x3F
    page[4:8] = algorithm.to_bytes(4, "big")
    plist = bytes([0, 0, 0, 0x10, 0, 0, 0, 0]) + bytes(page)
    r = tape.run(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0]), plist)
    assert r.sense_codes == (0x05, 0x26, 0x00), r
    s = parse_sense(r.sense)
    assert (s.in_cdb, s.field_pointer, s.bit_pointer) == (False, 8 + 4, 7)


@pytest.mark.parametrize("byte,bits,named", [
    (7, 0x01, (6, 7)),  # WRITE DELAY TIME (bytes 6-7)
    (13, 0x10, (11, 7)),  # BUFFER SIZE AT EARLY WARNING (bytes 11-13)
    (10, 0x20, (10, 7)),  # EOD DEFINED (byte 10 bits 7-5)
])
def test_a_device_configuration_field_is_named_by_its_first_byte_and_bit(
        tape: Tape, byte: int, bits: int, named: tuple[int, int]) -> None:
    """SSC-5 8.3.4 / SPC-5 4.4.5.2: a field MODE SELECT may not change is named by its first
    byte and most significant bit. Before: the byte and bit that differed."""
    page = bytearray(tape.mode_sense(0x10).data[16:32])
    page[0] &= 0x3F
    page[byte] ^= bits
    plist = bytes([0, 0, 0, 0x10, 0, 0, 0, 0]) + bytes(page)
    r = tape.run(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0]), plist)
    assert r.sense_codes == (0x05, 0x26, 0x00), r
    s = parse_sense(r.sense)
    assert (s.field_pointer, s.bit_pointer) == (8 + named[0], named[1])


def test_log_pages(tape: Tape) -> None:
    r = tape.log_sense(0x00)
    pages = list(r.data[4 : 4 + int.from_bytes(r.data[2:4], "big")])
    assert {0x02, 0x03, 0x0C, 0x2E, 0x31} <= set(pages)
    tape.write(b"x" * 1000)
    r = tape.log_sense(0x0C)
    assert r.data[0] == 0x0C and int.from_bytes(r.data[8:16], "big") == 1000
    r = tape.log_sense(0x31)
    assert int.from_bytes(r.data[4 + 2 * 8 + 4 : 4 + 2 * 8 + 8], "big") == 12 * 10**12 // (1 << 20)
    r = tape.log_sense(0x2E)
    assert int.from_bytes(r.data[2:4], "big") == 64 * 5


def test_attributes(tape: Tape) -> None:
    def read_attr(first: int, sa: int = 0) -> Result:
        return tape.run(ssc.ReadAttribute(sa, 0, 0, first, 4096, False).build(),
                        data_in_len=4096)

    r = read_attr(0x0401)
    assert r.good
    ident, flags, n = struct.unpack_from(">HBH", r.data, 4)
    assert ident == 0x0401 and flags & 0x80 and r.data[9 : 9 + n].rstrip() == b"TST001L8"
    assert read_attr(0x0800).sense_codes == (5, 0x24, 0)  # not present yet
    attr = ssc.Attribute(0x0800, 1, b"ACME    ").build()
    plist = len(attr).to_bytes(4, "big") + attr
    assert tape.run(ssc.WriteAttribute(False, 0, 0, len(plist)).build(), plist).good
    r = read_attr(0x0800)
    assert struct.unpack_from(">HBH", r.data, 4) == (0x0800, 1, 8) and r.data[9:17] == b"ACME    "
    ro = ssc.Attribute(0x0401, 1, b"X").build()
    plist = len(ro).to_bytes(4, "big") + ro
    assert tape.run(ssc.WriteAttribute(False, 0, 0, len(plist)).build(), plist).sense_codes == (
        5, 0x26, 0,
    )
    bad = ssc.Attribute(0x0800, 1, b"TOO LONG VENDOR").build()
    plist = len(bad).to_bytes(4, "big") + bad
    assert tape.run(ssc.WriteAttribute(False, 0, 0, len(plist)).build(), plist).sense_codes == (
        5, 0x26, 0,
    )
    r = read_attr(0, sa=ssc.AttributeAction.SUPPORTED_ATTRIBUTES)
    ids = struct.unpack_from(f">{int.from_bytes(r.data[:4], 'big') // 2}H", r.data, 4)
    assert 0x0800 in ids and 0x0401 in ids and list(ids) == sorted(ids)
    assert tape.run(ssc.ReadAttribute(0, 0, 1, 0, 4096, False).build(),
                    data_in_len=4096).sense_codes == (5, 0x24, 0)


def test_report_supported_opcodes_lists_tape_commands(tape: Tape) -> None:
    r = tape.run(bytes([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), data_in_len=4096)
    n = int.from_bytes(r.data[:4], "big")
    ops = {r.data[4 + i] for i in range(0, n, 8)}
    assert {0x01, 0x05, 0x08, 0x0A, 0x10, 0x11, 0x19, 0x1B, 0x1E, 0x2B, 0x34, 0x44, 0x8C,
            0x8D, 0x91, 0x92} <= ops


def test_state_survives_reload(tape: Tape, lib: FakeLibrary) -> None:
    build_tape(tape, "bbf")
    lib.move(None)
    lib.move("TST001L8")
    tape.clear_ua()
    assert tape.space(3, 0).good and tape.tell().object_id == 3


class LockingLibrary(FakeLibrary):
    """A library that calls listeners with its (non-reentrant) lock held, like a real changer."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()

    def move(self, barcode: str | None, drive_index: int = 0) -> None:
        with self.lock:
            super().move(barcode, drive_index)

    def set_drive_prevent(self, drive_index: int, prevented: bool) -> None:
        with self.lock:
            super().set_drive_prevent(drive_index, prevented)

    def media_path(self, barcode: str) -> Path:
        with self.lock:
            return super().media_path(barcode)


def test_no_deadlock_between_changer_moves_and_drive_commands(tmp_path: Path) -> None:
    lib = LockingLibrary(tmp_path)
    lib.create("LCK001L8")
    t = Tape(lib)
    stop = threading.Event()

    def changer() -> None:
        while not stop.is_set():
            lib.move("LCK001L8")
            lib.move(None)

    thread = threading.Thread(target=changer, daemon=True)
    thread.start()
    try:
        for i in range(300):
            t.run(bytes([0x1E, 0, 0, 0, i & 1, 0]))
            t.run(bytes(6))
            t.write(b"x")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    lib.move("LCK001L8")
    t.clear_ua()
    assert t.run(bytes(6)).good


def test_allow_overwrite_is_checked_noop(tape: Tape) -> None:
    build_tape(tape, "bb")
    tape.locate(1)
    assert tape.run(ssc.AllowOverwrite(1, 0, 1).build()).good
    assert tape.run(ssc.AllowOverwrite(1, 0, 0).build()).sense_codes == (5, 0x3B, 0)
    assert tape.run(ssc.AllowOverwrite(3, 0, 0).build()).sense_codes == (5, 0x24, 0)
    assert tape.run(ssc.AllowOverwrite(0, 1, 0).build()).sense_codes == (5, 0x24, 0)
    assert tape.write(b"over").good


def test_mode_sense_page_zero_for_st(tape: Tape) -> None:
    """st's open: MODE SENSE(6), page 0, 12 bytes -> header + block descriptor."""
    r = tape.run(bytes([0x1A, 0, 0, 0, 12, 0]), data_in_len=12)
    assert r.good and len(r.data) == 12
    assert r.data[1] == 0x88 and r.data[2] == 0x10 and r.data[3] == 8  # LTO-8 data, buffered
    assert r.data[4] == 0x5E and r.data[9:12] == b"\x00\x00\x00"


def test_vpd_pages(tape: Tape) -> None:
    r = tape.run(bytes([0x12, 1, 0x00, 0, 64, 0]), data_in_len=64)
    pages = set(r.data[4 : 4 + r.data[3]])
    assert {0x80, 0x83, 0xB0, 0xB1, 0xB2} <= pages
    r = tape.run(bytes([0x12, 1, 0xB0, 0, 64, 0]), data_in_len=64)
    assert r.data[:6] == bytes([0x01, 0xB0, 0, 2, 1, 0])  # WORM supported
    r = tape.run(bytes([0x12, 1, 0xB1, 0, 64, 0]), data_in_len=64)
    assert r.data[4:] == b"SN000000"
    r = tape.run(bytes([0x12, 1, 0xB2, 0, 64, 0]), data_in_len=64)
    bitmap = int.from_bytes(r.data[4:12], "big")
    assert bitmap >> (64 - 9) & 1 and not bitmap >> (64 - 1) & 1  # flag 09h yes, 01h no


def test_missing_cartridge_file_is_not_ready_not_hardware_error(lib: FakeLibrary) -> None:
    t = Tape(lib)
    t.clear_ua()
    lib.move("GHOST1L8")  # the library names a cartridge whose directory is gone
    assert t.run(bytes(6)).sense_codes == (2, 0x04, 0x03)
    assert t.read(10).sense_codes == (2, 0x04, 0x03)
    lib.move(None)
    assert t.run(bytes(6)).sense_codes == (2, 0x3A, 0)


# ---------------------------------------------------------------------------------------------
# Data-Out size and bounded WRITE FILEMARKS (issue 11, fuzzer escapes F3, F5, F6)


def _attr_0800(tape: Tape) -> Result:
    return tape.run(ssc.ReadAttribute(0, 0, 0, 0x0800, 4096, False).build(), data_in_len=4096)


def test_write_attribute_refuses_a_data_out_shorter_than_its_list(tape: Tape) -> None:
    """F3: the list is whole and valid, but the CDB announces 16 bytes more than arrive: refused
    with INVALID FIELD IN CDB at PARAMETER LIST LENGTH (byte 10) before any attribute changes."""
    attr = ssc.Attribute(0x0800, 1, b"ACME    ").build()
    plist = len(attr).to_bytes(4, "big") + attr
    r = tape.run(ssc.WriteAttribute(False, 0, 0, len(plist) + 16).build(), plist)
    assert r.sense_codes == (5, 0x24, 0) and sense(r).field_pointer == 10
    assert _attr_0800(tape).sense_codes == (5, 0x24, 0)  # still not present
    # A longer Data-Out is used up to the list length (a control CDB, as LIO).
    r = tape.run(ssc.WriteAttribute(False, 0, 0, len(plist)).build(), plist + bytes(16))
    assert r.good
    assert _attr_0800(tape).data[9:17] == b"ACME    "


def test_write6_refuses_a_data_out_of_another_size(tape: Tape, lib: FakeLibrary) -> None:
    """F5: WRITE(6) is a data CDB: a Data-Out longer or shorter than the transfer length
    (variable: the length; fixed: count x block length; zero: none) is ILLEGAL REQUEST 0Eh/03h
    (LIO's target_cmd_size_check) and nothing reaches the medium."""
    variable = ssc.ReadWrite6(False, False, 100).build(0x0A)
    assert tape.run(variable, b"v" * 200).sense_codes == (5, 0x0E, 3)
    assert tape.run(variable, b"v" * 50).sense_codes == (5, 0x0E, 3)
    assert tape.run(ssc.ReadWrite6(False, False, 0).build(0x0A), b"v" * 8).sense_codes == (
        5, 0x0E, 3,
    )
    assert tape.mode_select_block(0, 512).good
    assert tape.write_fixed(b"f" * 3 * 512, 2).sense_codes == (5, 0x0E, 3)
    assert tape.write_fixed(b"f" * 512, 2).sense_codes == (5, 0x0E, 3)
    assert tape.tell().object_id == 0
    assert tape.write_fixed(b"f" * 2 * 512, 2).good  # the exact size still writes
    assert tape.tell().object_id == 2


def test_write_filemarks_of_the_largest_count_is_bounded(lib: FakeLibrary) -> None:
    """F6: COUNT 2^24-1 on a 64 KiB cartridge writes the 2048 filemarks that fit (32-byte
    records) and answers VOLUME OVERFLOW, EOM, INFORMATION = those not written (SSC-5 4.2.5),
    without a list of COUNT entries (~130 MiB before the fix)."""
    import tracemalloc

    lib.create("SML002L8", capacity=64 * 1024, early_warning=16 * 1024)
    t = Tape(lib)
    lib.move("SML002L8")
    t.clear_ua()
    count = (1 << 24) - 1
    tracemalloc.start()
    try:
        r = t.weof(count)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s = sense(r)
    assert (s.sense_key, s.asc, s.ascq, s.eom, s.info) == (0xD, 0, 2, True, count - 2048)
    assert peak < 2 << 20, f"peak {peak} bytes"
    assert t.tell().object_id == 2048 and t.tell().file_id == 2048
    t.rewind()
    assert t.space(1, 2048).good  # every one is a filemark
    assert t.read(10).sense_codes == (8, 0, 5)  # then EOD


def _corrupt(lib: FakeLibrary, barcode: str, obj: int, size: int) -> None:
    """Flip a bit in the data of object `obj` (all objects `size` bytes) of a cartridge."""
    from tcmu_py.handlers.vtl.cartridge import DATA_FILE, FILE_HEADER_SIZE, RECORD_HEADER_SIZE

    p = lib.media_path(barcode) / DATA_FILE
    data = bytearray(p.read_bytes())
    data[FILE_HEADER_SIZE + obj * (RECORD_HEADER_SIZE + size) + RECORD_HEADER_SIZE + 7] ^= 0x40
    p.write_bytes(data)


def test_unrecovered_read_error_reports_the_residue(tape: Tape, lib: FakeLibrary) -> None:
    """SSC-5 READ(6): a block that cannot be read ends the command with VALID=1 and INFORMATION
    = requested blocks minus the blocks read before it (FIXED=1), or the requested length
    (FIXED=0), and the blocks read are transferred. Before: no INFORMATION and nothing
    transferred, though the position had moved past the good blocks (st lost its place)."""
    assert tape.mode_select_block(0, 512).good
    assert tape.write_fixed(b"".join(bytes([65 + i]) * 512 for i in range(3)), 3).good
    assert tape.weof().good
    lib.move(None)
    _corrupt(lib, "TST001L8", 1, 512)
    lib.move("TST001L8")
    tape.clear_ua()
    assert tape.mode_select_block(0, 512).good
    r = tape.read_fixed(3, 512)
    s = sense(r)
    assert (s.sense_key, s.asc, s.ascq) == (3, 0x11, 0) and s.info == 2, r
    assert r.data == b"A" * 512
    assert tape.tell().object_id == 1  # at the block that could not be read

    lib.create("TST002L8")
    lib.move("TST002L8")
    tape.clear_ua()
    assert tape.mode_select_block(0, 0).good
    assert tape.write(b"v" * 100).good and tape.weof().good
    lib.move(None)
    _corrupt(lib, "TST002L8", 0, 100)
    lib.move("TST002L8")
    tape.clear_ua()
    s = sense(tape.read(100))
    assert (s.sense_key, s.asc) == (3, 0x11) and s.info == 100


def _log_params(r: Result) -> dict[int, int]:
    out, at, end = {}, 4, 4 + int.from_bytes(r.data[2:4], "big")
    while at < end:
        code, n = int.from_bytes(r.data[at:at + 2], "big"), r.data[at + 3]
        out[code] = int.from_bytes(r.data[at + 4:at + 4 + n], "big")
        at += 4 + n
    return out


def test_tape_capacity_log_reports_both_partitions(lib: FakeLibrary) -> None:
    """Page 31h: 0001h/0003h partition 0, 0002h/0004h partition 1 (LTO drives' and LTFS's
    layout), whichever is active; before: the active partition's under 0001h/0003h, 0 else."""
    mib = 1 << 20
    lib.create("TST001L8", capacity=200 * mib)
    cart = Cartridge.open(lib.media_path("TST001L8"))
    cart.format([50 * mib, 150 * mib])
    cart.close()
    t = Tape(lib)
    lib.move("TST001L8")
    t.clear_ua()
    assert _log_params(t.log_sense(0x31)) == {1: 50, 2: 150, 3: 50, 4: 150}
    assert t.run(ssc.Locate(0, True, False, 1, 0).build()).good  # mt setpartition 1
    assert t.write(b"b" * (mib // 2)).good
    assert _log_params(t.log_sense(0x31)) == {1: 50, 2: 149, 3: 50, 4: 150}


def test_tape_alerts_are_cleared_only_once_delivered(tape: Tape) -> None:
    """SSC-5: TapeAlert flags are cleared once read. Before: also by a LOG SENSE refused for
    its PARAMETER POINTER and by a 4-byte read of the header (sg_logs sizes a page so): the
    flag never reached the initiator."""
    def no_removal() -> None:  # PREVENT, then UNLOAD refused: TapeAlert 0Ah
        assert tape.run(bytes([0x1E, 0, 0, 0, 1, 0])).good
        assert tape.run(bytes([0x1B, 0, 0, 0, 0, 0])).sense_codes == (5, 0x53, 2)
        assert tape.run(bytes([0x1E, 0, 0, 0, 0, 0])).good

    def alerts(pointer: int = 0, alloc: int = 4096) -> Result:
        return tape.run(bytes([0x4D, 0, 0x40 | 0x2E, 0, 0, pointer >> 8, pointer & 0xFF,
                               alloc >> 8, alloc & 0xFF, 0]), data_in_len=alloc)

    def raised(r: Result) -> list[int]:
        return [code for code, value in _log_params(r).items() if value]

    no_removal()
    assert alerts(pointer=0x41).sense_codes == (5, 0x24, 0)
    assert len(alerts(alloc=4).data) == 4
    assert raised(alerts()) == [0x0A]
    assert raised(alerts()) == []  # read whole: cleared


def test_fixed_read_stopped_by_a_filemark_counts_the_bytes_delivered(tape: Tape) -> None:
    """LOG SENSE 0Ch 0003h (bytes read to the initiator) counts the blocks a fixed READ(6)
    delivered before a filemark; before: none of them."""
    assert tape.mode_select_block(0, 512).good
    assert tape.write_fixed(b"x" * 2048, 4).good and tape.weof().good
    assert tape.rewind().good
    before = _log_params(tape.log_sense(0x0C))[3]
    r = tape.read_fixed(10, 512)
    assert sense(r).info == 6 and len(r.data) == 2048
    assert _log_params(tape.log_sense(0x0C))[3] == before + 2048
