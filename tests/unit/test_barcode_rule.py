"""One barcode rule: the daemon's YAML loader accepts exactly the barcodes the library holds.

Before, the loader allowed A-Z 0-9 only while the library (and `tcmu-py vtl`) also allowed
_ and -: a library created with the tools could hold cartridges its YAML could not name.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_py.handlers.vtl.config import count_barcodes, expand_barcodes
from tcmu_py.handlers.vtl.library import LibraryError, check_barcode, is_barcode


def _loader_accepts(code: str) -> bool:
    try:
        return expand_barcodes(code) == [code] and count_barcodes(code) == 1
    except ValueError:
        return False


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(alphabet="AZ09_-a .", max_size=34))
def test_loader_and_library_agree_on_every_barcode(code: str) -> None:
    assert _loader_accepts(code) == is_barcode(code)


@pytest.mark.parametrize(
    ("code", "ok"),
    [("ABC000L8", True), ("AB_C01L8", True), ("AB-C01L8", True), ("X" * 32, True),
     ("X" * 33, False), ("_ABC", False), ("-ABC", False), ("abc", False), ("", False)],
)
def test_the_rule(code: str, ok: bool) -> None:
    assert _loader_accepts(code) is ok
    if ok:
        assert check_barcode(code) == code
    else:
        with pytest.raises(LibraryError):
            check_barcode(code)


def test_a_range_of_barcodes_with_an_underscore_expands() -> None:
    assert expand_barcodes("AB_000L8..AB_002L8") == ["AB_000L8", "AB_001L8", "AB_002L8"]
