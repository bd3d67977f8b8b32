"""The dedup pool's write journal size as a YAML key (``journal`` of a ``dedup_pools`` entry, a
size) and as ``tcmu-py dedup create-pool --journal SIZE``: validated with one line naming the
file (or flag), key, value and what was expected; written to pool.json (``"journal": N``,
version 4) for a new pool and an existing one alike; left out, a new pool has none and an
existing pool keeps its own (create-pool) or has it taken away (the YAML declares the pool)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tcmu_py import cli
from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.dedup import config as dedup_config
from tcmu_py.handlers.dedup.handler import unregister_pool
from tcmu_py.handlers.dedup.store import JOURNAL_EXPECTED, POOL_FILE, create_pool

MIB = 1 << 20


def _load(doc: dict[str, Any]) -> Any:
    reg = load_handlers()
    registry = {n: reg[n] for n in ("raw", "dedup")}
    handlers = {n: h.check_config for n, h in registry.items()}
    return load_config_text(yaml.safe_dump(doc), "c.yaml", registry=registry,  # type: ignore[arg-type]
                            handlers=handlers)


def _doc(path: str, **keys: object) -> dict[str, Any]:
    return {"dedup_pools": [{"name": "p", "path": path, "capacity": "64M", **keys}],
            "devices": [{"name": "vm7", "handler": "dedup", "size": "8M", "pool": "p"}]}


def _pool_json(path: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(path, POOL_FILE).read_text())
    return doc


@pytest.fixture
def registered() -> Iterator[None]:
    """`prepare` registers the pool's name in this process: forgotten after the test."""
    yield
    unregister_pool("p")


@pytest.mark.parametrize(("value", "size"), [
    ("256MiB", 256 * MIB), ("4M", 4 * MIB), (64 * MIB, 64 * MIB), ("256M", 256 << 20), (0, 0),
    ("0", 0),
])
def test_the_journal_key_is_a_size(tmp_path: Path, value: object, size: int) -> None:
    cfg = _load(_doc(str(tmp_path / "p"), journal=value))
    (pool,) = cfg.section("dedup_pools")
    assert pool.journal == size
    assert not os.path.exists(tmp_path / "p")  # loading creates nothing


def test_no_journal_key_is_no_journal(tmp_path: Path) -> None:
    (pool,) = _load(_doc(str(tmp_path / "p"))).section("dedup_pools")
    assert pool.journal == 0


@pytest.mark.parametrize("value", ["1KiB", -1, "abc", "3M", "4097K", "257M", True, 1.5,
                                   5 * MIB + 1])
def test_a_bad_journal_names_file_key_value_and_expected(tmp_path: Path, value: object
                                                         ) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(_doc(str(tmp_path / "p"), journal=value))
    assert str(exc.value) == (f"c.yaml: dedup_pools[0].journal: got {value!r}, expected "
                              f"{JOURNAL_EXPECTED}"), str(exc.value)
    assert not os.path.exists(tmp_path / "p")


def test_the_journal_reaches_pool_json(tmp_path: Path, registered: None) -> None:
    """A new pool gets it; a later YAML changes it (in pool.json, for the pool's next open);
    a YAML without the key takes it away (0: the version stays 4)."""
    path = str(tmp_path / "p")
    cli.prepare_handlers(_load(_doc(path, journal="256MiB")))
    doc = _pool_json(path)
    assert (doc["journal"], doc["version"]) == (256 * MIB, 4)
    cli.prepare_handlers(_load(_doc(path, journal="8M")))
    doc = _pool_json(path)
    assert (doc["journal"], doc["version"]) == (8 * MIB, 4)
    cli.prepare_handlers(_load(_doc(path)))
    doc = _pool_json(path)
    assert (doc["journal"], doc["version"]) == (0, 4)


def test_a_pool_declared_without_journal_stays_as_it_was(tmp_path: Path,
                                                        registered: None) -> None:
    path = str(tmp_path / "p")
    cli.prepare_handlers(_load(_doc(path)))
    doc = _pool_json(path)
    assert "journal" not in doc and doc["version"] < 4


def test_an_existing_pool_gets_a_journal_from_the_yaml(tmp_path: Path,
                                                       registered: None) -> None:
    path = str(tmp_path / "p")
    create_pool(path, "p", 64 * MIB, compression="zstd")
    cli.prepare_handlers(_load(_doc(path, journal="16M", compression="zstd")))
    doc = _pool_json(path)
    assert (doc["journal"], doc["version"], doc["compression"]) == (16 * MIB, 4, "zstd")


def test_create_pool_journal_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--journal``: a new pool's journal size (default none); on an existing pool, a given
    value changes it and a missing one keeps it."""
    path = str(tmp_path / "p")
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "64M",
                              "--journal", "32M"]) == 0
    doc = _pool_json(path)
    assert (doc["journal"], doc["version"]) == (32 * MIB, 4)
    assert dedup_config.main(["create-pool", path, "--name", "p", "--capacity", "128M"]) == 0
    doc = _pool_json(path)
    assert (doc["journal"], doc["capacity"]) == (32 * MIB, 128 * MIB)  # kept
    assert dedup_config.main(["create-pool", path, "--name", "p", "--journal", "0"]) == 0
    assert _pool_json(path)["journal"] == 0
    q = str(tmp_path / "q")
    assert dedup_config.main(["create-pool", q, "--name", "q", "--capacity", "64M"]) == 0
    assert "journal" not in _pool_json(q)  # a new pool: none
    for bad in ("1KiB", "abc", "-1", "5000K"):
        capsys.readouterr()
        assert cli.main(["dedup", "create-pool", path, "--name", "p", "--journal", bad]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"tcmu-py: configuration error: --journal: got {bad!r}, "
                               f"expected {JOURNAL_EXPECTED}"), err
    assert _pool_json(path)["journal"] == 0  # untouched by the refusals
