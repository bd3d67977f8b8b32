"""Everything the VTL creates is private: files 0600, directories 0700, whatever the umask
(issue 11, D6: cartridges hold backed-up data and were created 0644 under umask 022)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handlers.vtl import admin
from tcmu_py.handlers.vtl.cartridge import Cartridge, RecordType
from tcmu_py.handlers.vtl.library import Library
from tcmu_py.scsi.smc import ElementType


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=lambda u: f"umask{u:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


@pytest.fixture
def renamed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(name, mode) of every file at the moment it is renamed into place (the temporary files)."""
    seen: list[tuple[str, int]] = []
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((os.fspath(src), stat.S_IMODE(os.stat(src).st_mode)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def _modes(top: Path) -> dict[str, int]:
    out = {str(top): stat.S_IMODE(top.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p)] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _check_private(top: Path) -> int:
    bad = {}
    for path, mode in _modes(top).items():
        want = 0o700 if Path(path).is_dir() else 0o600
        if mode != want:
            bad[path] = oct(mode)
    assert not bad, bad
    return len(_modes(top))


def test_everything_the_library_creates_is_private(
    tmp_path: Path, umask: int, renamed: list[tuple[str, int]]
) -> None:
    top = tmp_path / "new"
    lib = Library.create(top / "deeper" / "lib", name="L", drives=[("D1", "IBM-LTO8")], slots=3,
                         import_export=1)
    admin.create_cartridges(lib, "AAA000L8..AAA002L8")
    slot = lib.addresses(ElementType.STORAGE)[0]
    lib.move(slot, lib.drive_address(0))
    lib.set_ie_prevent(True)
    path = lib.media_path("AAA000L8")
    # A temporary file a crash left (here with a wide mode) is removed at the next writable open.
    leftover = path / ".mam.json.crashed.tmp"
    leftover.write_bytes(b"{}")
    os.chmod(leftover, 0o666)
    with Cartridge.open(path) as cart:
        cart.record_load()
        cart.append(RecordType.DATA, [[b"x" * 5000]] * 200)
        cart.append(RecordType.FILEMARK, [()])
        cart.sync()  # index and filemarks files
        cart.set_mam_attributes({0x0800: (1, b"TCMU")})
        cart.set_write_protected(False)
        cart.truncate(100)
        cart.bytes_read = 5_000_000  # close persists the counters (mam.json again)
    lib.close()
    assert not leftover.exists()
    count = _check_private(top)
    assert count >= 20  # dirs, library.json, .lock, 3 cartridges x 3-5 files
    assert renamed and all(mode == 0o600 for _, mode in renamed), renamed
    assert any(name.endswith(".tmp") and "mam.json" in name for name, _ in renamed)


def test_the_cli_creates_private_files(tmp_path: Path, umask: int) -> None:
    top = tmp_path / "cli"
    assert admin.main(["create-library", str(top), "--name", "C", "--drive", "IBM-LTO8:S1",
                       "--slots", "2"]) == 0
    assert admin.main(["create-cartridges", str(top), "BBB000L8..BBB001L8"]) == 0
    _check_private(top)


def test_an_existing_library_directory_keeps_its_mode(tmp_path: Path) -> None:
    """The operator's own directory is theirs: only what the VTL creates is made private."""
    root = tmp_path / "mine"
    root.mkdir(mode=0o750)
    os.chmod(root, 0o750)
    Library.create(root, name="L", drives=[], slots=1, import_export=0).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "media").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "library.json").stat().st_mode) == 0o600
