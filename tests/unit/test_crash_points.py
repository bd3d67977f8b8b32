"""Crash points of the VTL's on-disk formats (issue 11): cut after every write, reopen, check.

`handlers/vtl/crashcheck.py` runs a library workload under `tcmu_py.testing.crashfs.CrashFS`
and checks every state a crash may leave at every crash point (see their module docs). Here:
one fixed seed (CI), the checker failing on formats with a durability bug planted (so a green
run means something), and the two defects the checker found in the formats.
benchmarks/crash_points.py runs more seeds and operations.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handlers.vtl import cartridge as cartridge_module
from tcmu_py.handlers.vtl import crashcheck, library
from tcmu_py.handlers.vtl.cartridge import (
    DATA_FILE,
    FILE_HEADER_SIZE,
    INDEX_FILE,
    Cartridge,
    RecordType,
    _index_epoch,
)
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.testing.crashfs import CrashFS, materialize

SEED = 11
OPERATIONS = 80


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory on tmpfs when there is one: the checks create and delete many small trees."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as d:
        yield Path(d)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tcmu_py.handlers.vtl.cartridge")


def test_every_crash_point_of_a_library_workload(workdir: Path) -> None:
    report = crashcheck.run(workdir, SEED, OPERATIONS)
    print(f"\nVTL crash points: seed {report.seed}, {report.operations} operations, "
          f"{report.crash_points} crash points, {report.states_checked} states checked, "
          f"{report.failure_count} failures")
    assert report.failures == []
    assert report.operations > OPERATIONS and report.crash_points > 300
    assert report.states_checked > report.crash_points


# ---------------------------------------------------------------------------------------------
# The checker finds planted durability bugs


def _no_fsync_of(calls_to_skip: set[int], fn_name: str, monkeypatch: pytest.MonkeyPatch,
                 module: object, attr: str) -> None:
    """Wrap `module.attr` so that, inside it, the listed calls of os.`fn_name` do nothing."""
    inner = getattr(module, attr)

    def wrapper(*args: object, **kw: object) -> object:
        real = getattr(os, fn_name)
        count = 0

        def fake(fd: int) -> None:
            nonlocal count
            count += 1
            if count not in calls_to_skip:
                real(fd)

        setattr(os, fn_name, fake)
        try:
            return inner(*args, **kw)
        finally:
            setattr(os, fn_name, real)

    monkeypatch.setattr(module, attr, wrapper)


def test_checker_finds_a_sync_that_does_not_sync(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_fsync_of({1}, "fdatasync", monkeypatch, cartridge_module.Cartridge, "sync")
    report = crashcheck.run(workdir, SEED, 30)
    assert report.failure_count > 0
    assert any("durable" in f for f in report.failures), report.failures


def test_checker_finds_a_rename_of_an_unsynced_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (library, cartridge_module):  # both call tcmu_py.statefile.write_json
        _no_fsync_of({1}, "fsync", monkeypatch, module, "write_json")
    report = crashcheck.run(workdir, SEED, 30)
    assert report.failure_count > 0
    assert any("library.json" in f and "invalid JSON" in f for f in report.failures), \
        report.failures


def test_checker_finds_a_stale_record_coming_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overwrite that does not cut the file leaves the discarded records to be found again."""
    truncate = cartridge_module.Cartridge.truncate

    def leaky(self: Cartridge, obj: int) -> None:
        real = os.ftruncate
        os.ftruncate = lambda fd, n: None  # type: ignore[assignment]
        try:
            truncate(self, obj)
        finally:
            os.ftruncate = real

    monkeypatch.setattr(cartridge_module.Cartridge, "truncate", leaky)
    report = crashcheck.run(workdir, 1, 40)
    assert report.failure_count > 0
    assert any("not a prefix" in f for f in report.failures), report.failures


# ---------------------------------------------------------------------------------------------
# What the checker found


def test_created_library_and_cartridges_survive_a_power_cut(workdir: Path) -> None:
    """Creating a directory fsyncs its parent: a library, and a cartridge named in library.json,
    are still there after a power cut that keeps only what was fsynced."""
    live = workdir / "live"
    live.mkdir()
    with CrashFS(live, lambda fs: None) as fs:
        lib = Library.create(live / "lib", name="L", drives=[], slots=2, import_export=0)
        Cartridge.create(lib.media_path("AAA000L8"), "AAA000L8")
        lib.place("AAA000L8")
        lib.close()
        synced = fs.tree("synced")
    root = materialize(synced, workdir / "cut")
    after = Library.open(root / "lib")
    assert after.locate("AAA000L8") is not None
    with Cartridge.open(after.media_path("AAA000L8")) as cart:
        assert cart.object_count == 0
    after.close()


def test_torn_file_header_still_opens_with_every_record(tmp_path: Path) -> None:
    """An overwrite rewrites the data file header in place; a crash may tear that write. The
    records are then found by scanning, and a writable open gives the file an epoch the index
    does not have (so the index of the old contents is never adopted)."""
    path = tmp_path / "ABC001L8"
    Cartridge.create(path, "ABC001L8")
    payloads = [bytes([i]) * (500 + i) for i in range(130)]
    with Cartridge.open(path) as cart:
        for p in payloads:
            cart.append(RecordType.DATA, [[p]])
    old_index_epoch = _index_epoch(path)
    data = bytearray((path / DATA_FILE).read_bytes())
    data[FILE_HEADER_SIZE // 2 : FILE_HEADER_SIZE] = bytes(FILE_HEADER_SIZE // 2)  # torn
    (path / DATA_FILE).write_bytes(data)
    for read_only in (True, False):
        with Cartridge.open(path, read_only=read_only) as cart:
            assert cart.object_count == len(payloads)
            for i in (0, 64, 129):
                buf = bytearray(1024)
                assert cart.read(i, [memoryview(buf)]) == (RecordType.DATA, len(payloads[i]))
                assert bytes(buf[: len(payloads[i])]) == payloads[i]
    header = (path / DATA_FILE).read_bytes()[:FILE_HEADER_SIZE]
    epoch, intact = cartridge_module._unpack_file_header(header, path / DATA_FILE)
    assert intact and epoch != old_index_epoch
    assert (path / INDEX_FILE).exists() and _index_epoch(path) == epoch  # rewritten at close
