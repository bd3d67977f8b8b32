"""Cartridge on-disk format: round trips, tape overwrite semantics, capacity, crash recovery."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_py.handlers.vtl import cartridge as cartridge_module
from tcmu_py.handlers.vtl.cartridge import (
    DATA_FILE,
    FILE_HEADER_SIZE,
    INDEX_FILE,
    Cartridge,
    CartridgeBusy,
    CartridgeFull,
    CorruptRecord,
    RecordType,
    dump,
    format_dump,
)


@pytest.fixture(autouse=True, params=[64, 3, 1], ids=lambda s: f"stride{s}")
def stride(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run everything with the real sparse index stride and with tiny ones."""
    monkeypatch.setattr(cartridge_module, "INDEX_STRIDE", request.param)
    return int(request.param)


def make(tmp_path: Path, barcode: str = "ABC001L8", **kw: object) -> Path:
    path = tmp_path / barcode
    Cartridge.create(path, barcode, **kw)  # type: ignore[arg-type]
    return path


def read_all(cart: Cartridge) -> list[bytes | None]:
    """Every object: bytes for a block, None for a filemark."""
    out: list[bytes | None] = []
    for i in range(cart.object_count):
        buf = bytearray(1 << 20)
        kind, n = cart.read(i, [memoryview(buf)])
        out.append(None if kind == RecordType.FILEMARK else bytes(buf[:n]))
    return out


def write_objects(cart: Cartridge, objs: list[bytes | None]) -> None:
    for o in objs:
        if o is None:
            cart.append(RecordType.FILEMARK, [()])
        else:
            cart.append(RecordType.DATA, [[o]])


def test_create_sets_media_from_barcode(tmp_path: Path) -> None:
    with Cartridge.open(make(tmp_path, "WRM001LY")) as cart:
        assert cart.worm and cart.generation == 8 and not cart.cleaning
        assert cart.object_count == 0 and cart.used == 0
    with Cartridge.open(make(tmp_path, "CLN001L1")) as cart:
        assert cart.cleaning
    with Cartridge.open(make(tmp_path, "DAT001L6", capacity=10_000)) as cart:
        assert cart.generation == 6 and cart.capacity == 10_000 and not cart.worm


def test_round_trip_blocks_and_filemarks(tmp_path: Path) -> None:
    path = make(tmp_path)
    objs: list[bytes | None] = [b"a" * 10, b"b" * 70000, None, b"", b"c", None, None]
    with Cartridge.open(path) as cart:
        write_objects(cart, objs)
        assert read_all(cart) == objs
        assert list(cart.filemarks) == [2, 5, 6]
    with Cartridge.open(path) as cart:
        assert read_all(cart) == objs
        assert cart.filemarks_before(3) == 1 and cart.is_filemark(5) and not cart.is_filemark(4)


def test_read_scatter_and_short_buffer(tmp_path: Path) -> None:
    with Cartridge.open(make(tmp_path)) as cart:
        cart.append(RecordType.DATA, [[b"0123456789"]])
        a, b = bytearray(3), bytearray(4)
        kind, n = cart.read(0, [memoryview(a), memoryview(b)])
        assert (kind, n, bytes(a + b)) == (RecordType.DATA, 10, b"0123456")


def test_multi_part_payload_is_one_record(tmp_path: Path) -> None:
    with Cartridge.open(make(tmp_path)) as cart:
        cart.append(RecordType.DATA, [[b"ab", memoryview(b"cd"), bytearray(b"e")]])
        assert read_all(cart) == [b"abcde"]


def test_truncate_discards_tail_and_survives_reopen(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write_objects(cart, [b"1", b"2", None, b"3"])
        cart.sync()
        cart.truncate(2)
        write_objects(cart, [b"new"])
        assert read_all(cart) == [b"1", b"2", b"new"]
        assert list(cart.filemarks) == []
    with Cartridge.open(path) as cart:
        assert read_all(cart) == [b"1", b"2", b"new"]


def test_stale_index_from_before_overwrite_is_not_used(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write_objects(cart, [b"x" * 100] * 5)
        cart.sync()
    saved_index = (path / INDEX_FILE).read_bytes()
    with Cartridge.open(path) as cart:
        cart.truncate(1)
        write_objects(cart, [b"y" * 300, b"z"])
        cart.sync()
    # A crash that kept the old index (e.g. the new header never reached the disk).
    (path / INDEX_FILE).write_bytes(saved_index)
    with Cartridge.open(path) as cart:
        assert read_all(cart) == [b"x" * 100, b"y" * 300, b"z"]


def test_compression_round_trip_and_saves_space(tmp_path: Path) -> None:
    with Cartridge.open(make(tmp_path)) as cart:
        cart.append(RecordType.DATA, [[bytes(100_000)]], compress=True)
        cart.append(RecordType.DATA, [[os.urandom(1000)]], compress=True)  # incompressible
        assert cart.used < 5_000
        data = read_all(cart)
        assert data[0] == bytes(100_000) and len(data[1] or b"") == 1000


def test_capacity_and_early_warning(tmp_path: Path) -> None:
    cap = 10_000 + cartridge_module.FILEMARK_RESERVE
    with Cartridge.open(make(tmp_path, capacity=cap, early_warning=5_000)) as cart:
        cart.append(RecordType.DATA, [[bytes(5000)]])
        assert not cart.in_early_warning()
        cart.append(RecordType.DATA, [[bytes(2000)]])
        assert cart.in_early_warning()
        with pytest.raises(CartridgeFull) as info:
            cart.append(RecordType.DATA, [[bytes(1000)], [bytes(1000)], [bytes(1000)]])
        assert info.value.written == 2
        assert cart.object_count == 4 and cart.used <= cart.data_capacity
        assert cart.remaining == cart.capacity - cart.used
        cart.append(RecordType.FILEMARK, [()] * 2)  # filemarks still fit after the overflow


def test_corrupt_payload_reads_as_corrupt_record(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write_objects(cart, [b"A" * 50, b"B" * 50, b"C" * 50])
        cart.sync()
        offset = FILE_HEADER_SIZE + cart.used_at(1) + 40
    with open(path / DATA_FILE, "r+b") as f:
        f.seek(offset)
        f.write(b"X")
    with Cartridge.open(path) as cart:  # index covers it, so the damage is found at read time
        assert cart.object_count == 3
        with pytest.raises(CorruptRecord):
            cart.read(1, [memoryview(bytearray(50))])
    os.unlink(path / INDEX_FILE)
    with Cartridge.open(path) as cart:  # without the index the scan stops before the damage
        assert cart.object_count == 1


def test_periodic_sync_checkpoints_without_explicit_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cartridge_module, "SYNC_INTERVAL", 10_000)
    path = make(tmp_path)
    cart = Cartridge.open(path)
    for _ in range(30):
        cart.append(RecordType.DATA, [[bytes(1000)]])
    assert (path / INDEX_FILE).exists()  # checkpointed by append itself
    ro = Cartridge.open(path, read_only=True)
    assert ro._indexed >= 20  # adopted from the index, not rescanned
    ro.close()
    cart.close()


def test_exclusive_open(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path):
        with pytest.raises(CartridgeBusy):
            Cartridge.open(path)
        with Cartridge.open(path, read_only=True) as ro:
            assert ro.object_count == 0


def test_mam_attributes_persist(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.set_mam_attributes({0x0800: (1, b"VENDOR  "), 0x0806: (1, b"ABC001L8")})
        cart.set_mam_attributes({0x0800: None})
        cart.record_load()
    with Cartridge.open(path) as cart:
        assert cart.mam_attributes == {0x0806: (1, b"ABC001L8")}
        assert cart.mam_counter("load_count") == 1


def test_write_protect_persists(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.set_write_protected(True)
    with Cartridge.open(path) as cart:
        assert cart.write_protected


def test_dump_lists_records(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write_objects(cart, [b"a" * 512, b"b" * 512, b"c" * 100, None])
    entries = list(dump(path))
    assert [e.kind for e in entries] == [RecordType.DATA] * 3 + [RecordType.FILEMARK]
    assert [e.logical_length for e in entries] == [512, 512, 100, 0]
    lines = list(format_dump(path))
    assert lines[0].split()[:5] == ["0", "2", "block(s)", "x", "512"]
    assert "filemark" in lines[2] and "end of data" in lines[-1]


objects = st.lists(
    st.one_of(st.none(), st.binary(min_size=0, max_size=3000)), min_size=1, max_size=25
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    objs=objects,
    sync_every=st.integers(1, 10),
    cut_frac=st.floats(0, 1),
    garbage=st.binary(max_size=64),
    compress=st.booleans(),
)
def test_crash_at_any_byte_recovers_a_prefix(
    tmp_path_factory: pytest.TempPathFactory,
    objs: list[bytes | None],
    sync_every: int,
    cut_frac: float,
    garbage: bytes,
    compress: bool,
) -> None:
    """Cut the data file anywhere (plus junk): it reopens with exactly the complete records."""
    tmp = tmp_path_factory.mktemp("crash")
    path = make(tmp)
    with Cartridge.open(path) as cart:
        for i, o in enumerate(objs):
            if o is None:
                cart.append(RecordType.FILEMARK, [()])
            else:
                cart.append(RecordType.DATA, [[o]], compress=compress)
            if i % sync_every == 0:
                cart.sync()
        ends = [FILE_HEADER_SIZE + cart.used_at(i + 1) for i in range(cart.object_count)]
        size = FILE_HEADER_SIZE + cart.used
        cut = FILE_HEADER_SIZE + int(cut_frac * (size - FILE_HEADER_SIZE))
        # "crash": copy the files as they are, then damage the copy
        crashed = tmp / "crashed"
        shutil.copytree(path, crashed)
    with open(crashed / DATA_FILE, "r+b") as f:
        original = f.read()
        if garbage and cut < len(original):
            # junk, not a re-creation of the bytes that were cut off
            garbage = bytes([original[cut] ^ 0xFF]) + garbage[1:]
        f.truncate(cut)
        f.seek(cut)
        f.write(garbage)
    expect = sum(1 for e in ends if e <= cut)
    with Cartridge.open(crashed) as cart:
        assert cart.object_count == expect
        assert read_all(cart) == objs[:expect]
        # and it is writable again at the recovered end
        cart.append(RecordType.DATA, [[b"after"]])
    with Cartridge.open(crashed) as cart:
        assert read_all(cart) == [*objs[:expect], b"after"]


def test_payload_checksum_is_xxh64_and_crc32_records_still_read(tmp_path: Path) -> None:
    """New records carry FLAG_XXH64; a record written before it (CRC-32, flag clear) still reads
    back and still fails on a flipped payload byte."""
    import zlib

    from tcmu_py.handlers.vtl.cartridge import (
        FLAG_XXH64,
        RECORD_HEADER_SIZE,
        _pack_record_header,
        _parse_record_header,
    )

    path = make(tmp_path)
    payloads = [os.urandom(1000 + i) for i in range(3)]
    with Cartridge.open(path) as cart:
        write_objects(cart, [*payloads, None])
    data = bytearray((path / DATA_FILE).read_bytes())
    pos = FILE_HEADER_SIZE
    for p in payloads:
        hdr = _parse_record_header(data[pos : pos + RECORD_HEADER_SIZE])
        assert hdr is not None and hdr[1] & FLAG_XXH64
        pos += RECORD_HEADER_SIZE + len(p)
    # Rewrite object 1 as the previous format wrote it: flags 0, CRC-32 of the payload.
    pos = FILE_HEADER_SIZE + RECORD_HEADER_SIZE + len(payloads[0])
    kind, _flags, obj, stored, logical, _ = _parse_record_header(
        data[pos : pos + RECORD_HEADER_SIZE]
    )  # type: ignore[misc]
    old = _pack_record_header(kind, 0, obj, stored, logical, zlib.crc32(payloads[1]))
    data[pos : pos + RECORD_HEADER_SIZE] = old
    (path / DATA_FILE).write_bytes(data)
    with Cartridge.open(path) as cart:
        assert read_all(cart) == [*payloads, None]
    data[pos + RECORD_HEADER_SIZE + 7] ^= 0x40  # corrupt object 1's payload
    (path / DATA_FILE).write_bytes(data)
    with Cartridge.open(path) as cart, pytest.raises(CorruptRecord, match="object 1"):
        cart.read(1, [memoryview(bytearray(1 << 20))])
