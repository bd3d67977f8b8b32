"""Operator tools: barcode ranges and the `tcmu-py vtl` commands end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.errors import ConfigError
from tcmu_py.handlers.vtl import admin
from tcmu_py.handlers.vtl.library import Library, LibraryError, Occupant


def test_range_from_the_issue() -> None:
    got = admin.parse_barcode_range("ABC000L8..ABC019L8")
    assert len(got) == 20
    assert got[0] == "ABC000L8" and got[9] == "ABC009L8" and got[-1] == "ABC019L8"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ABC008L7..ABC012L7", ["ABC008L7", "ABC009L7", "ABC010L7", "ABC011L7", "ABC012L7"]),
        ("A09..A11", ["A09", "A10", "A11"]),
        ("X1Y..X3Y", ["X1Y", "X2Y", "X3Y"]),
        ("CLN001L1", ["CLN001L1"]),
        ("AB0001L8..AB0001L8", ["AB0001L8"]),
        ("A01L8..A02L8,B01L8", ["A01L8", "A02L8", "B01L8"]),
        ("0998..1001", ["0998", "0999", "1000", "1001"]),
    ],
)
def test_ranges(spec: str, expected: list[str]) -> None:
    assert admin.parse_barcode_range(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "ABC019L8..ABC000L8",  # reversed
        "ABC000L8..ABD000L8",  # differs in a letter
        "A1B1..A2B2",  # two digit runs differ
        "A9..A10",  # different lengths
        "abc000l8",  # lower case
        "ABC000L8..",  # missing end
        "A1..A3,A2",  # duplicate
        "A000000..A999999",  # too many
    ],
)
def test_bad_ranges(spec: str) -> None:
    with pytest.raises(ConfigError):
        admin.parse_barcode_range(spec)


@given(
    prefix=st.from_regex(r"[A-Z]{1,3}", fullmatch=True),
    suffix=st.sampled_from(["", "L8", "LW"]),
    width=st.integers(1, 4),
    start=st.integers(0, 9999),
    count=st.integers(1, 50),
)
def test_range_expands_like_a_counter(
    prefix: str, suffix: str, width: int, start: int, count: int
) -> None:
    stop = start + count - 1
    if len(str(stop)) > width:
        return
    first, last = f"{prefix}{start:0{width}d}{suffix}", f"{prefix}{stop:0{width}d}{suffix}"
    got = admin.parse_barcode_range(f"{first}..{last}")
    assert got == [f"{prefix}{n:0{width}d}{suffix}" for n in range(start, stop + 1)]


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lib_dir = tmp_path / "lib"
    assert (
        admin.main(
            [
                "create-library", str(lib_dir), "--name", "vtl1",
                "--drive", "IBM-LTO8:SN0001", "--drive", "IBM-LTO8:SN0002",
                "--slots", "4", "--import-export", "1",
            ]
        )
        == 0
    )  # fmt: skip
    assert admin.main(["create-cartridges", str(lib_dir), "ABC000L8..ABC004L8"]) == 0
    out = capsys.readouterr().out
    assert "ABC000L8  slot 0x0400" in out and "ABC004L8  shelf" in out
    lib = Library.open(lib_dir)
    assert lib.shelf() == ["ABC004L8"]
    assert [lib.occupant(0x400 + i).barcode for i in range(4)] == [f"ABC00{i}L8" for i in range(4)]
    # The same barcodes again: refused before anything is created.
    assert admin.main(["create-cartridges", str(lib_dir), "ABC003L8..ABC005L8"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not lib.media_path("ABC005L8").exists()

    assert admin.main(["import", str(lib_dir), "ABC004L8"]) == 0
    assert lib.occupant(0x300) == Occupant("ABC004L8", imported=True)
    lib.set_ie_prevent(True)
    assert admin.main(["export", str(lib_dir), "ABC004L8"]) == 1
    assert "locked" in capsys.readouterr().err
    lib.set_ie_prevent(False)
    assert admin.main(["export", str(lib_dir), "ABC004L8"]) == 0
    assert lib.shelf() == ["ABC004L8"]

    assert admin.main(["list", str(lib_dir)]) == 0
    listing = capsys.readouterr().out
    assert "serial SN0002" in listing and "ABC000L8" in listing and "shelf" in listing

    assert admin.main(["dump", str(lib_dir), "ABC000L8"]) == 0
    assert "end of data" in capsys.readouterr().out
    assert admin.main(["dump", str(lib_dir), "NOPE00L8"]) == 1


def test_unknown_drive_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        admin.create_library(
            tmp_path / "l", name="x", drives=[("S1", "FLOPPY")], slots=1, import_export=0
        )
    assert not (tmp_path / "l" / "library.json").exists()


def test_ensure_library_is_idempotent_and_refuses_layout_changes(tmp_path: Path) -> None:
    decl = {
        "name": "yaml1",
        "drives": [("YS0001", "IBM-LTO8")],
        "slots": 3,
        "import_export": 1,
        "cartridges": ["ABC000L8..ABC001L8"],
    }
    lib = admin.ensure_library(tmp_path / "l", **decl)
    assert lib.contents() == {0x400: Occupant("ABC000L8"), 0x401: Occupant("ABC001L8")}
    lib.move(0x400, 0x100)
    lib.close()
    # Same declaration plus one more cartridge: only the new one is created, nothing moves.
    lib = admin.ensure_library(tmp_path / "l", **{**decl, "cartridges": ["ABC000L8..ABC002L8"]})
    assert lib.contents() == {
        0x100: Occupant("ABC000L8", source=0x400),
        0x401: Occupant("ABC001L8"),
        0x400: Occupant("ABC002L8"),
    }
    lib.close()
    with pytest.raises(LibraryError, match="slots: library has 3, declared 4"):
        admin.ensure_library(tmp_path / "l", **{**decl, "slots": 4})
