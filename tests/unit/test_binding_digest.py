"""The compiled ring binding carries the digest of its sources; `tcmu_py.ring` refuses a
binding built from other sources (a stale editable install) at import, with a message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tcmu_py
from tcmu_py import _sources
from tcmu_py.ring import check_binding

HERE = Path(tcmu_py.__file__).parent


def copy_sources(dest: Path) -> None:
    for name in _sources.SOURCES:
        shutil.copy(HERE / name, dest / name)


def test_the_binding_in_use_was_built_from_these_sources() -> None:
    check_binding(str(HERE))  # raises if not (the test command rebuilds it first)


def test_a_binding_built_from_other_sources_is_refused_with_how_to_rebuild(tmp_path) -> None:
    copy_sources(tmp_path)
    check_binding(str(tmp_path))  # identical copies: accepted
    with open(tmp_path / "_ring.c", "a", encoding="utf-8") as f:
        f.write("/* changed after the build */\n")
    with pytest.raises(ImportError, match=r"other sources.*pip install --no-deps -e \."):
        check_binding(str(tmp_path))


def test_without_the_sources_there_is_nothing_to_check(tmp_path) -> None:
    copy_sources(tmp_path)
    (tmp_path / "_ring.h").unlink()
    assert _sources.digest(str(tmp_path)) is None
    check_binding(str(tmp_path))
