"""Hypothesis profiles for the unit tests.

``ci`` (the default): derandomized, so every run of the suite tries the same examples and CI
cannot turn red by chance; no per-example deadline (Hypothesis's 200 ms default failed
test_parsers_only_raise_invalid_field[ModeSelect] on a loaded machine: timing is the
benchmarks' business, not the tests'). ``explore``: random examples, more of them, for
hunting bugs by hand (``pytest tests/unit --hypothesis-profile=explore``); a failure it
finds gets a deterministic regression test (as test_dedup_model's short-last-chunk test came
from one).
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("ci")


# -- a real Ceph cluster, shared by the session's tests (tcmu_py/testing/ceph_cluster.py) ---

import os  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[object]:
    """A minimal native Ceph cluster (1 mon, 1 mgr, 3 memstore OSDs, pool ``rbd`` size 2) in
    a temporary directory, started on first use and stopped at the end of the session. A
    cluster that cannot start fails the tests that use it (`ClusterError`, with the daemons'
    logs): it is never a skip. The start time is printed and kept as ``start_seconds``."""
    import shutil

    from tcmu_py.testing.ceph_cluster import start_cluster

    root = Path(tempfile.mkdtemp(prefix="tcmu-py-ceph-", dir=os.environ.get("TMPDIR")))
    cluster = start_cluster(root / "c")
    print(f"\nceph cluster started in {cluster.start_seconds:.1f} s: {cluster.timings}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- a tape drive with a cartridge loaded (tests/unit/vtl_fakes.py) ---------------------------

if TYPE_CHECKING:
    from vtl_fakes import FakeLibrary, Tape


@pytest.fixture
def lib(tmp_path: Path) -> FakeLibrary:
    """An empty fake tape library keeping its cartridges in `tmp_path`."""
    from vtl_fakes import FakeLibrary

    return FakeLibrary(tmp_path)


@pytest.fixture
def tape(lib: FakeLibrary) -> Tape:
    """A drive of `lib` with cartridge `vtl_fakes.BARCODE` loaded, unit attentions consumed."""
    from vtl_fakes import load_tape

    return load_tape(lib)
