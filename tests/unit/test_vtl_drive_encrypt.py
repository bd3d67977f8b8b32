"""Tape data encryption (SSC-5 8.5): SECURITY PROTOCOL IN/OUT pages, encrypted records on the
cartridge, reads with the right key, another key and none. The drive runs behind the production
Ring + DeviceRunner with the FakeKernel as initiator, as stenc 1.0.7 would drive it."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from vtl_fakes import FakeLibrary

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import encryption as enc
from tcmu_py.handlers.vtl.cartridge import (
    DATA_FILE,
    DATA_VERSION_ENCRYPTED,
    FORMAT_VERSION,
    Cartridge,
    RecordType,
    dump,
    format_dump,
)
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.scsi import ssc
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.harness import Result, RingHarness

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
# A pattern that cannot appear by chance in ciphertext, metadata or headers.
MARKER = b"PLAINTEXT-MARKER-0123456789-tcmu-py-vtl-encryption!"
NO_KEY = (7, 0x74, 0x01)
WRONG_KEY = (7, 0x74, 0x03)
CLEAR_WHILE_DECRYPTING = (7, 0x74, 0x02)


def sde_page(
    encryption: int = enc.ENCRYPT_ENCRYPT,
    decryption: int = enc.DECRYPT_DECRYPT,
    key: bytes = KEY,
    *,
    scope: int = enc.SCOPE_ALL,
    algorithm: int = 1,
    ckod: bool = False,
    rdmc: int = 0,
    ukad: bytes = b"",
    akad: bytes = b"",
    key_format: int = 0,
) -> bytes:
    """A Set Data Encryption page laid out as stenc 1.0.7 builds it (SSC-5 8.5.3.2)."""
    body = bytes([scope << 5, (rdmc << 4) | (0x04 if ckod else 0), encryption, decryption,
                  algorithm, key_format]) + bytes(8) + struct.pack(">H", len(key)) + key
    if ukad:
        body += struct.pack(">BBH", enc.KAD_UKAD, 0, len(ukad)) + ukad
    if akad:
        body += struct.pack(">BBH", enc.KAD_AKAD, 0, len(akad)) + akad
    return struct.pack(">HH", 0x0010, len(body)) + body


class Drive:
    """A TapeDrive behind the ring, with the CDBs of the tests."""

    def __init__(self, lib: FakeLibrary) -> None:
        self.dev = TapeDrive(DeviceConfig(name="t", subtype="vtl", cfgstring="", size=0), lib, 0)
        self.h = RingHarness(self.dev)

    def close(self) -> None:
        self.h.close()
        self.dev.close()

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        return self.h.run(cdb, data_out, data_in_len)

    def settle(self) -> None:
        for _ in range(10):
            if self.run(bytes(6)).status == 0:
                return
        raise AssertionError("unit attentions do not clear")

    def spin(self, page: int, protocol: int = 0x20, alloc: int = 8192) -> Result:
        cdb = bytes([0xA2, protocol]) + struct.pack(">H", page) + bytes(2) + \
            struct.pack(">I", alloc) + bytes(2)
        return self.run(cdb, data_in_len=alloc)

    def spout(self, data: bytes, page: int = 0x10, protocol: int = 0x20) -> Result:
        cdb = bytes([0xB5, protocol]) + struct.pack(">H", page) + bytes(2) + \
            struct.pack(">I", len(data)) + bytes(2)
        return self.run(cdb, data)

    def write(self, data: bytes) -> Result:
        return self.run(ssc.ReadWrite6(False, False, len(data)).build(0x0A), data)

    def read(self, n: int) -> Result:
        return self.run(ssc.ReadWrite6(False, True, n).build(0x08), data_in_len=n)

    def weof(self) -> Result:
        return self.run(ssc.WriteFilemarks6(False, False, 1).build())

    def rewind(self) -> Result:
        return self.run(bytes([0x01, 0, 0, 0, 0, 0]))

    def unload(self) -> Result:
        return self.run(bytes([0x1B, 0, 0, 0, 0, 0]))

    def load(self) -> Result:
        return self.run(bytes([0x1B, 0, 0, 0, 1, 0]))


@pytest.fixture
def lib(tmp_path: Path) -> FakeLibrary:
    lib = FakeLibrary(tmp_path)
    lib.create("ENC001L8")
    lib.slots[0] = "ENC001L8"
    return lib


@pytest.fixture
def drive(lib: FakeLibrary) -> Iterator[Drive]:
    d = Drive(lib)
    d.settle()
    yield d
    d.close()


def status_page(d: Drive) -> bytes:
    r = d.spin(0x0020)
    assert r.status == 0, r
    return r.data


def written_with_key(d: Drive, blocks: list[bytes]) -> None:
    assert d.spout(sde_page()).status == 0
    for b in blocks:
        assert d.write(b).status == 0
    assert d.weof().status == 0
    assert d.rewind().status == 0


# --- SECURITY PROTOCOL IN pages --------------------------------------------------------------


def test_spin_supported_protocols_and_pages(drive: Drive) -> None:
    assert drive.spin(0x0000, protocol=0x00).data == bytes(6) + b"\x00\x02\x00\x20"
    assert drive.spin(0x0001, protocol=0x00).data == bytes(4)  # no certificate
    assert drive.spin(0x0000).data == bytes.fromhex(
        "0000 000e 0000 0001 0010 0011 0012 0020 0021")
    assert drive.spin(0x0001).data == bytes.fromhex("0001 0002 0010")
    assert drive.spin(0x0011).data == bytes.fromhex("0011 0001 00")
    # management capabilities: CKOD_C; scopes PUBLIC and ALL I_T NEXUS
    assert drive.spin(0x0012).data == bytes.fromhex("0012 000c 00 04 00 05") + bytes(8)


def test_spin_capabilities_page_reports_aes256_gcm_as_lto_drives(drive: Drive) -> None:
    p = drive.spin(0x0010).data
    assert p[:4] == bytes.fromhex("0010 0028") and len(p) == 44
    assert p[4] == 0x01  # CFG_P 01b
    d = p[20:]
    assert d[0] == 0x01 and d[2:4] == b"\x00\x14"  # algorithm index 01h, length 14h
    assert d[4] == 0x80 | 0x20 | 0x10 | 0x08 | 0x02  # AVFMV (LTO-8 medium), MAC, DELB, HW
    assert struct.unpack_from(">HHH", d, 6) == (32, 12, 32)  # U-KAD, A-KAD, key size
    assert struct.unpack_from(">I", d, 20)[0] == 0x00010014  # AES-GCM, 16-byte tag


def test_spin_unknown_page_protocol_and_inc512_are_invalid_field_in_cdb(drive: Drive) -> None:
    r = drive.spin(0x0030)
    assert r.sense_codes == (5, 0x24, 0) and parse_sense(r.sense).field_pointer == 2
    r = drive.spin(0x0000, protocol=0xEF)
    assert r.sense_codes == (5, 0x24, 0) and parse_sense(r.sense).field_pointer == 1
    r = drive.run(bytes([0xA2, 0x20, 0, 0x20, 0x80, 0, 0, 0, 1, 0, 0, 0]), data_in_len=256)
    s = parse_sense(r.sense)
    assert r.sense_codes == (5, 0x24, 0) and (s.field_pointer, s.bit_pointer) == (4, 7)


def test_spin_allocation_length_truncates(drive: Drive) -> None:
    assert drive.spin(0x0000, alloc=6).data == bytes.fromhex("0000 000e 0000")


def test_status_page_before_and_after_setting_a_key(drive: Drive) -> None:
    p = status_page(drive)
    assert p[:4] == bytes.fromhex("0020 0014") and p[5:8] == b"\x00\x00\x00"
    before = struct.unpack_from(">I", p, 8)[0]
    assert drive.spout(sde_page(ukad=b"monday-key")).status == 0
    p = status_page(drive)
    assert p[4] == (2 << 5) | 2  # I_T NEXUS SCOPE and KEY SCOPE: ALL I_T NEXUS
    assert p[5:8] == b"\x02\x02\x01"  # encrypt, decrypt, algorithm 1 (stenc: "on")
    assert struct.unpack_from(">I", p, 8)[0] == before + 1  # key instance counter
    assert p[24:] == b"\x00\x01\x00\x0amonday-key"  # U-KAD descriptor
    assert KEY not in p
    assert drive.spout(sde_page(enc.ENCRYPT_DISABLE, enc.DECRYPT_DISABLE, bytes(32))).status == 0
    p = status_page(drive)  # stenc -e off: a zeroed key, ignored
    assert p[5:8] == b"\x00\x00\x00" and len(p) == 24


# --- Writing and reading -----------------------------------------------------------------------


def test_encrypted_records_read_back_with_the_key(drive: Drive, lib: FakeLibrary) -> None:
    blocks = [MARKER * (i + 1) for i in range(5)] + [MARKER * 2000]
    written_with_key(drive, blocks)
    for b in blocks:
        r = drive.read(len(b) + 10)
        assert r.status == 0 and r.data == b
    entries = list(dump(lib.media_path("ENC001L8")))
    assert [e.encrypted for e in entries] == [True] * 6 + [False]
    lines = list(format_dump(lib.media_path("ENC001L8")))
    assert lines[0].endswith(f"({entries[0].stored_length} stored, encrypted)"), lines
    assert all(e.logical_length == len(b) for e, b in zip(entries, blocks, strict=False))


def test_cartridge_files_hold_no_plain_text_and_no_key(drive: Drive, lib: FakeLibrary) -> None:
    written_with_key(drive, [MARKER * 50, MARKER])
    drive.unload()
    path = lib.media_path("ENC001L8")
    for f in path.iterdir():
        raw = f.read_bytes()
        assert MARKER[:16] not in raw, f
        assert KEY not in raw and KEY.hex().encode() not in raw, f


def test_blocks_are_compressed_then_encrypted(drive: Drive, lib: FakeLibrary) -> None:
    drive.dev.compression = True  # MODE SELECT page 0Fh DCE (test_vtl_drive covers the page)
    block = MARKER * 2000
    written_with_key(drive, [block])
    e = next(iter(dump(lib.media_path("ENC001L8"))))
    assert e.compressed and e.encrypted and e.stored_length < len(block) // 10
    assert drive.read(len(block)).data == block


def test_read_without_a_key_is_unable_to_decrypt(drive: Drive) -> None:
    written_with_key(drive, [MARKER])
    assert drive.spout(sde_page(enc.ENCRYPT_DISABLE, enc.DECRYPT_DISABLE, b"")).status == 0
    r = drive.read(4096)
    assert r.sense_codes == NO_KEY and MARKER not in r.data
    # the position stays at the block: with the key the same read succeeds
    assert drive.spout(sde_page()).status == 0
    assert drive.read(4096).data == MARKER


def test_read_with_another_key_is_incorrect_key(drive: Drive) -> None:
    written_with_key(drive, [MARKER])
    assert drive.spout(sde_page(key=OTHER_KEY)).status == 0
    r = drive.read(4096)
    assert r.sense_codes == WRONG_KEY and MARKER not in r.data
    nbes = drive.spin(0x0021).data
    assert nbes[12] & 0x0F == 0x6  # encrypted, cannot decrypt with this key


def test_tampered_record_fails_integrity_validation(drive: Drive, lib: FakeLibrary) -> None:
    written_with_key(drive, [MARKER * 8])
    drive.unload()
    path = lib.media_path("ENC001L8") / DATA_FILE
    e = next(iter(dump(lib.media_path("ENC001L8"))))
    raw = bytearray(path.read_bytes())
    at = e.offset + 32 + e.stored_length - 20  # inside the ciphertext
    raw[at] ^= 0x01
    # keep the record's stored checksum valid, so only the AEAD tag can notice
    from tcmu_py.handlers.vtl.cartridge import (  # noqa: PLC0415
        _pack_record_header,
        _parse_record_header,
        payload_checksum,
    )
    kind, flags, obj, stored, logical, _crc = _parse_record_header(raw[e.offset:])  # type: ignore[misc]
    payload = bytes(raw[e.offset + 32 : e.offset + 32 + stored])
    raw[e.offset : e.offset + 32] = _pack_record_header(
        kind, flags, obj, stored, logical, payload_checksum((payload,), flags))
    path.write_bytes(raw)
    assert drive.load().status == 0
    drive.settle()
    assert drive.spout(sde_page()).status == 0
    r = drive.read(4096)
    assert r.sense_codes == (7, 0x74, 0x04) and MARKER not in r.data


def test_mixed_mode_reads_clear_records_decrypt_mode_refuses_them(drive: Drive) -> None:
    assert drive.write(b"clear block").status == 0
    assert drive.spout(sde_page(decryption=enc.DECRYPT_MIXED)).status == 0
    assert drive.write(MARKER).status == 0
    assert drive.rewind().status == 0
    assert drive.read(100).data == b"clear block"
    assert drive.read(100).data == MARKER
    assert drive.rewind().status == 0
    assert drive.spout(sde_page()).status == 0  # DECRYPT: encrypted blocks only
    assert drive.read(100).sense_codes == CLEAR_WHILE_DECRYPTING


def test_raw_mode_returns_the_stored_envelope(drive: Drive) -> None:
    written_with_key(drive, [MARKER])
    assert drive.spout(sde_page(enc.ENCRYPT_DISABLE, enc.DECRYPT_RAW, b"")).status == 0
    r = drive.read(4096)
    assert r.status == 0 and r.data[:4] == b"VTLE" and MARKER not in r.data
    assert len(r.data) == enc.ENVELOPE_HEADER_SIZE + len(MARKER) + enc.TAG_SIZE


def test_raw_mode_refused_for_blocks_written_protected(drive: Drive) -> None:
    assert drive.spout(sde_page(rdmc=enc.RDMC_PROTECT)).status == 0
    assert drive.write(MARKER).status == 0
    assert drive.rewind().status == 0
    assert drive.spout(sde_page(enc.ENCRYPT_DISABLE, enc.DECRYPT_RAW, b"")).status == 0
    assert drive.read(4096).sense_codes == (7, 0x74, 0x0A)


def test_next_block_encryption_status(drive: Drive) -> None:
    assert drive.write(b"clear").status == 0
    assert drive.spout(sde_page(decryption=enc.DECRYPT_MIXED, ukad=b"label")).status == 0
    assert drive.write(MARKER).status == 0
    assert drive.weof().status == 0
    assert drive.rewind().status == 0

    def nbes() -> bytes:
        return drive.spin(0x0021).data

    p = nbes()
    assert p[:4] == bytes.fromhex("0021 000c") and p[4:12] == bytes(8) and p[12] == 0x03
    drive.read(100)
    p = nbes()
    assert struct.unpack_from(">Q", p, 4)[0] == 1
    assert (p[12], p[13]) == (0x05, 0x01) and p[16:] == b"\x00\x01\x00\x05label"
    drive.read(100)
    assert nbes()[12] == 0x02  # a filemark
    drive.read(100)
    assert nbes()[12] == 0x01  # end of data


def test_key_cleared_on_demount_with_ckod_only(drive: Drive, lib: FakeLibrary) -> None:
    assert drive.spout(sde_page()).status == 0
    drive.unload()
    drive.load()
    drive.settle()
    assert status_page(drive)[5:7] == b"\x02\x02"  # without CKOD the key stays
    assert drive.spout(sde_page(ckod=True)).status == 0
    assert drive.write(MARKER).status == 0
    lib.move(None)  # the changer takes the cartridge out: demount
    lib.move("ENC001L8")
    drive.settle()
    assert status_page(drive)[5:7] == b"\x00\x00"
    assert drive.read(4096).sense_codes == NO_KEY


def test_key_cleared_at_power_on(lib: FakeLibrary) -> None:
    d = Drive(lib)
    d.settle()
    written_with_key(d, [MARKER])
    key = d.dev.encryption.params.key
    assert key is not None
    d.close()  # power off: the key is wiped from memory
    assert key._key == bytearray(32)
    d = Drive(lib)  # power on: defaults, no key (nothing was persisted)
    try:
        d.settle()
        assert status_page(d)[5:7] == b"\x00\x00" and len(status_page(d)) == 24
        assert d.read(4096).sense_codes == NO_KEY
    finally:
        d.close()


def test_repr_and_logs_never_show_the_key(drive: Drive, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    written_with_key(drive, [MARKER])
    key = drive.dev.encryption.params.key
    assert KEY.hex() not in repr(key) and repr(KEY) not in repr(key)
    assert KEY.hex() not in caplog.text and repr(KEY)[2:20] not in caplog.text


# --- Bad SPOUT parameter lists -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "field", "bit"),
    [
        (sde_page()[:2] + b"\x00\x40" + sde_page()[4:], 2, None),  # page length past the data
        (b"\x00\x11" + sde_page()[2:], 0, None),  # page code
        (sde_page(scope=enc.SCOPE_LOCAL), 4, 7),
        (sde_page()[:4] + b"\x41" + sde_page()[5:], 4, 0),  # LOCK
        (sde_page(rdmc=1), 5, 5),
        (sde_page()[:5] + b"\x08" + sde_page()[6:], 5, 3),  # SDK
        (sde_page()[:5] + b"\x02" + sde_page()[6:], 5, 1),  # CKORP
        (sde_page(encryption=enc.ENCRYPT_EXTERNAL), 6, None),
        (sde_page(decryption=4), 7, None),
        (sde_page(algorithm=2), 8, None),
        (sde_page(key_format=2), 9, None),
        (sde_page(key=KEY[:16]), 18, None),
        (sde_page(ukad=b"u" * 33), 54, None),  # KAD too long: its length field
        (sde_page() + b"\x02\x00\x00\x01x", 52, None),  # a NONCE descriptor
        (sde_page() + b"\x00\x00", 52, None),  # a truncated descriptor
    ],
    ids=["page-length", "page-code", "scope-local", "lock", "rdmc-01", "sdk", "ckorp",
         "external", "decryption-mode", "algorithm", "key-format", "key-length", "ukad-long",
         "nonce-kad", "truncated-kad"],
)
def test_bad_set_data_encryption_page_is_invalid_field_in_parameter_list(
    drive: Drive, page: bytes, field: int, bit: int | None
) -> None:
    if page[2:4] != b"\x00\x40":  # keep the page length consistent with what is sent
        page = page[:2] + struct.pack(">H", len(page) - 4) + page[4:]
    assert drive.spout(sde_page(ukad=b"old")).status == 0
    before = status_page(drive)
    r = drive.spout(page)
    s = parse_sense(r.sense)
    assert r.sense_codes == (5, 0x26, 0), r
    assert (s.field_pointer, s.bit_pointer, s.in_cdb) == (field, bit, False)
    assert status_page(drive) == before  # nothing changed


def test_short_spout_list_and_other_pages(drive: Drive) -> None:
    assert drive.spout(sde_page()[:12]).sense_codes == (5, 0x1A, 0)
    r = drive.spout(sde_page(), page=0x0011)
    assert r.sense_codes == (5, 0x24, 0) and parse_sense(r.sense).field_pointer == 2
    r = drive.spout(sde_page(), protocol=0x00)
    assert r.sense_codes == (5, 0x24, 0) and parse_sense(r.sense).field_pointer == 1


# --- Cartridge format compatibility ------------------------------------------------------------


def test_clear_cartridge_stays_version_1_and_encrypted_one_becomes_2(
    drive: Drive, lib: FakeLibrary
) -> None:
    path = lib.media_path("ENC001L8")
    assert drive.write(b"clear").status == 0
    assert drive.weof().status == 0
    assert struct.unpack_from(">H", (path / DATA_FILE).read_bytes(), 8)[0] == FORMAT_VERSION
    assert drive.spout(sde_page()).status == 0
    assert drive.write(MARKER).status == 0
    assert drive.weof().status == 0
    raw = (path / DATA_FILE).read_bytes()
    assert struct.unpack_from(">H", raw, 8)[0] == DATA_VERSION_ENCRYPTED
    drive.unload()
    with Cartridge.open(path, read_only=True) as cart:  # reopens (index and scan) fine
        assert cart.data_version == DATA_VERSION_ENCRYPTED and cart.object_count == 4
        buf = bytearray(100)
        assert cart.read(0, [memoryview(buf)])[1] == 5 and bytes(buf[:5]) == b"clear"


def test_header_upgrade_is_durable_before_the_first_encrypted_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version-2 header reaches the disk (fdatasync) before any encrypted record is written,
    so a crash in between leaves a version-2 cartridge with the old records, readable."""
    Cartridge.create(tmp_path / "c", "ENC002L8")
    events: list[str] = []
    with Cartridge.open(tmp_path / "c") as cart:
        cart.append(RecordType.DATA, [[b"clear"]])
        cart.sync()
        real_pwrite, real_sync, real_pwritev = os.pwrite, os.fdatasync, os.pwritev

        def pwrite(fd: int, data: bytes, off: int) -> int:
            events.append(f"pwrite@{off}")
            return real_pwrite(fd, data, off)

        def fdatasync(fd: int) -> None:
            events.append("fdatasync")
            real_sync(fd)

        def crash(fd: int, bufs: object, off: int) -> int:
            events.append(f"pwritev@{off}")
            raise OSError(5, "simulated crash during the record write")

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwritev", crash)
        key = enc.DataKey(KEY)
        with pytest.raises(OSError):
            cart.append(RecordType.DATA, [[MARKER]],
                        seal=lambda o, p, z: key.seal(o, p, compressed=z, rdmd=False))
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        monkeypatch.setattr(os, "fdatasync", real_sync)
    assert events[:2] == ["pwrite@0", "fdatasync"] and events[2].startswith("pwritev@"), events
    with Cartridge.open(tmp_path / "c", read_only=True) as cart:
        assert cart.data_version == DATA_VERSION_ENCRYPTED and cart.object_count == 1
        buf = bytearray(10)
        assert cart.read(0, [memoryview(buf)]) == (RecordType.DATA, 5)



def test_every_record_has_its_own_nonce_and_names_the_key_not_holds_it(
    drive: Drive, lib: FakeLibrary
) -> None:
    written_with_key(drive, [MARKER] * 200)
    drive.unload()
    with Cartridge.open(lib.media_path("ENC001L8"), read_only=True) as cart:
        envs = [cart.next_object(i)[1] for i in range(200)]
    assert all(e is not None for e in envs)
    assert len({e.nonce for e in envs if e is not None}) == 200
    assert {e.key_id for e in envs if e is not None} == {enc.key_identifier(KEY)}
    assert enc.key_identifier(KEY) != enc.key_identifier(OTHER_KEY)


def test_a_fixed_read_stopping_at_an_encrypted_block_reports_the_residue(drive: Drive) -> None:
    """Two clear blocks, then one written with a key; the key gone, a fixed READ(6) of three
    ends at the third with DATA PROTECT 74h/01h (SSC-5 8.5), VALID=1 and INFORMATION = 1 (the
    blocks not read), the two clear blocks transferred. Before: no INFORMATION, nothing
    transferred, the position past both."""
    mode = bytes([0, 0, 0x10, 8, 0, 0, 0, 0, 0]) + (512).to_bytes(3, "big")
    assert drive.run(bytes([0x15, 0x10, 0, 0, len(mode), 0]), mode).good
    assert drive.run(ssc.ReadWrite6(True, False, 2).build(0x0A), b"A" * 1024).good
    assert drive.spout(sde_page()).good
    assert drive.run(ssc.ReadWrite6(True, False, 1).build(0x0A), b"C" * 512).good
    assert drive.spout(sde_page(enc.ENCRYPT_DISABLE, enc.DECRYPT_DISABLE, b"")).good
    assert drive.rewind().good
    r = drive.run(ssc.ReadWrite6(True, False, 3).build(0x08), data_in_len=3 * 512)
    s = parse_sense(r.sense)
    assert (s.sense_key, s.asc, s.ascq) == (7, 0x74, 0x01) and s.info == 1, r
    assert r.data == b"A" * 1024
