"""Cartridge partitions: FORMAT layout, per-partition end of data, durability across reopen,
crash points of a format, and old (format 1) cartridges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tcmu_py.errors import StateFileError
from tcmu_py.handlers.vtl import cartridge as cartridge_module
from tcmu_py.handlers.vtl.cartridge import (
    META_FILE,
    Cartridge,
    CartridgeBusy,
    CartridgeFull,
    RecordType,
    dump,
    format_dump,
)

MB = 10**6


def make(tmp_path: Path, barcode: str = "PAR001L8", **kw: object) -> Path:
    path = tmp_path / barcode
    Cartridge.create(path, barcode, capacity=100 * MB, **kw)  # type: ignore[arg-type]
    return path


def blocks(cart: Cartridge) -> list[bytes | None]:
    """Every object of the active partition: bytes for blocks, None for filemarks."""
    out: list[bytes | None] = []
    buf = bytearray(1 << 16)
    for i in range(cart.object_count):
        kind, n = cart.read(i, [memoryview(buf)])
        out.append(None if kind == RecordType.FILEMARK else bytes(buf[:n]))
    return out


def write(cart: Cartridge, *payloads: bytes) -> None:
    cart.append(RecordType.DATA, [[p] for p in payloads])
    cart.append_filemarks(1)


def test_new_cartridge_has_one_partition_and_format_1(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        assert cart.partition_count == 1
        assert cart.partition_sizes == [100 * MB]
        with pytest.raises(IndexError):
            cart.select_partition(1)
    assert json.loads((path / META_FILE).read_text())["format"] == 1


def test_format_two_partitions_each_with_own_eod_survives_reopen(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write(cart, b"old data")
        cart.format([60 * MB, 40 * MB])
        assert cart.partition == 0 and cart.object_count == 0
        assert cart.partition_sizes == [60 * MB, 40 * MB]
        write(cart, b"p0-a", b"p0-b")
        cart.select_partition(1)
        assert cart.object_count == 0
        assert cart.capacity == 40 * MB
        write(cart, b"p1-a")
        cart.select_partition(0)
        assert cart.object_count == 3
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format"] == 2 and meta["partitions"] == [60 * MB, 40 * MB]
    with Cartridge.open(path) as cart:
        assert cart.partition_count == 2
        assert blocks(cart) == [b"p0-a", b"p0-b", None]
        cart.select_partition(1)
        assert blocks(cart) == [b"p1-a", None]
        # Overwriting in partition 1 leaves partition 0 alone.
        cart.truncate(0)
        write(cart, b"p1-new")
    with Cartridge.open(path, read_only=True) as cart:
        cart.select_partition(1)
        assert blocks(cart) == [b"p1-new", None]
        cart.select_partition(0)
        assert blocks(cart) == [b"p0-a", b"p0-b", None]
    assert [e.logical_length for e in dump(path, 1)] == [6, 0]
    text = list(format_dump(path))
    assert text[0].startswith("partition 0") and any(t.startswith("partition 1") for t in text)


def test_partition_end_of_medium_is_its_size(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.format([99 * MB, 1 * MB])
        cart.select_partition(1)
        with pytest.raises(CartridgeFull) as full:
            cart.append(RecordType.DATA, [[bytes(100_000)]] * 20)
        assert full.value.written == 9
        assert cart.in_early_warning()
        cart.select_partition(0)
        cart.append(RecordType.DATA, [[bytes(1 << 20)]] * 2)  # partition 0 has room


def test_format_back_to_one_partition_removes_the_others(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.format([50 * MB, 30 * MB, 20 * MB])
        cart.select_partition(2)
        write(cart, b"x")
        cart.format([])
        assert cart.partition_count == 1 and cart.object_count == 0
    assert not (path / "partition1").exists() and not (path / "partition2").exists()
    assert json.loads((path / META_FILE).read_text())["format"] == 1
    with Cartridge.open(path) as cart:
        assert cart.partition_count == 1


@pytest.mark.parametrize("sizes", [[MB] * 5, [0, MB], [100 * MB, 1]])
def test_format_refuses_bad_layouts_and_changes_nothing(tmp_path: Path, sizes: list[int]) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write(cart, b"kept")
        with pytest.raises(ValueError):
            cart.format(sizes)
        assert blocks(cart) == [b"kept", None]


def test_all_partitions_are_locked(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.format([50 * MB, 50 * MB])
        with pytest.raises(CartridgeBusy):
            Cartridge.open(path)
    with Cartridge.open(path):
        pass


@pytest.mark.parametrize("point", ["before-meta", "after-meta"])
def test_crash_during_format_leaves_one_whole_layout(
    tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before meta.json is replaced leaves the old layout (new directories are stale
    and removed at the next writable open); after it, the new layout."""
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.format([50 * MB, 30 * MB, 20 * MB])
    class Crash(Exception):
        pass

    real_write = cartridge_module._atomic_write_json
    real_rmtree = shutil.rmtree

    def write_then_maybe_crash(p: Path, obj: dict[str, object]) -> None:
        if point == "before-meta" and p.name == META_FILE:
            raise Crash
        real_write(p, obj)

    def crash_rmtree(p: object, *a: object, **kw: object) -> None:
        raise Crash

    monkeypatch.setattr(cartridge_module, "_atomic_write_json", write_then_maybe_crash)
    if point == "after-meta":
        monkeypatch.setattr(shutil, "rmtree", crash_rmtree)
    cart = Cartridge.open(path)
    with pytest.raises(Crash):
        cart.format([60 * MB, 40 * MB] if point == "after-meta" else
                    [10 * MB, 10 * MB, 10 * MB, 10 * MB])
    cart._close_fds()  # the process died: no sync, no sidecar writes
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    monkeypatch.setattr(cartridge_module, "_atomic_write_json", real_write)
    with Cartridge.open(path) as cart:
        want = [60 * MB, 40 * MB] if point == "after-meta" else [50 * MB, 30 * MB, 20 * MB]
        assert cart.partition_sizes == want
        for i in range(cart.partition_count):
            cart.select_partition(i)
            assert cart.object_count == 0
    assert not (path / f"partition{len(want)}").exists()


def test_format_1_meta_of_an_old_cartridge_opens(tmp_path: Path) -> None:
    """A cartridge written before partitions existed (meta without "partitions") opens as one
    partition and keeps its records."""
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        write(cart, b"legacy")
    meta = json.loads((path / META_FILE).read_text())
    assert "partitions" not in meta and meta["format"] == 1
    with Cartridge.open(path) as cart:
        assert blocks(cart) == [b"legacy", None]


def test_missing_partition_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = make(tmp_path)
    with Cartridge.open(path) as cart:
        cart.format([50 * MB, 50 * MB])
    shutil.rmtree(path / "partition1")
    with pytest.raises(FileNotFoundError):
        Cartridge.open(path)
    meta = json.loads((path / META_FILE).read_text())
    meta["partitions"] = [90 * MB, 20 * MB]
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StateFileError, match="partitions"):
        Cartridge.open(path)
