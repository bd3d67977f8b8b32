"""`tcmu-py check` refuses what `apply` would then refuse for a thin pool that exists already
under another name than its declaration's (as for dedup pools), naming the key, before
anything is created.

A device smaller than what its pool holds for its disk is not refused at load: the disk's own
open refuses it (data is never cut off), for that device alone — a YAML left behind by a
resize through the kernel (``dev_size``) must not keep the daemon from serving the others."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.thin.pool import create_pool as create_thin_pool

MIB = 1 << 20


def _load(doc: dict[str, Any]) -> Any:
    reg = load_handlers()
    registry = {n: reg[n] for n in ("raw", "thin", "dedup")}
    handlers = {n: h.check_config for n, h in registry.items()}
    return load_config_text(yaml.safe_dump(doc), "c.yaml", registry=registry,  # type: ignore[arg-type]
                            handlers=handlers)


def _refusal(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        _load(doc)
    return str(exc.value)


def _thin(path: str, **device: Any) -> dict[str, Any]:
    return {"pools": [{"name": "fast", "path": path, "capacity": "32M"}],
            "devices": [{"name": "vm7", "handler": "thin", "size": "8M", "pool": "fast",
                         **device}]}


def _dedup(path: str, **device: Any) -> dict[str, Any]:
    return {"dedup_pools": [{"name": "images", "path": path, "capacity": "32M"}],
            "devices": [{"name": "vm7", "handler": "dedup", "size": "8M", "pool": "images",
                         **device}]}


def test_a_thin_pool_declared_under_another_name_is_refused(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_thin_pool(path, "slow", 32 * MIB)
    doc = _thin(path)
    assert _refusal(doc) == (
        f"c.yaml: pools[0].name: got 'fast', expected 'slow', what the pool at {path} was "
        f"created with (recorded in {path}/pool.json; it cannot change)")


def test_new_pools_and_existing_ones_declared_alike_pass(tmp_path: os.PathLike[str]) -> None:
    _load(_thin(os.path.join(tmp_path, "t")))
    _load(_dedup(os.path.join(tmp_path, "d")))
    create_thin_pool(os.path.join(tmp_path, "t2"), "fast", 32 * MIB)
    _load(_thin(os.path.join(tmp_path, "t2")))  # the same name: fine
    assert not os.path.exists(os.path.join(tmp_path, "t"))
    assert not os.path.exists(os.path.join(tmp_path, "d"))
