"""`tcmu-py check` refuses what `apply` or the device's open would then refuse for a pool that
exists already: a thin pool declared under another name than its pool.json's, and a thin or
dedup device smaller than what its pool holds for its disk (the open never cuts data off) —
each naming the key, before anything is created."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.dedup.store import DedupPool
from tcmu_py.handlers.dedup.store import create_pool as create_dedup_pool
from tcmu_py.handlers.thin.pool import Pool
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


def test_a_thin_device_smaller_than_its_disk_is_refused(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_thin_pool(path, "fast", 32 * MIB)
    with Pool.open(path) as pool:
        pool.open_disk("vm7", 8 * MIB).close()
    assert _refusal(_thin(path, size="4M")) == (
        "c.yaml: devices[0].size: got '4M', expected at least 8388608 bytes, what disk 'vm7' "
        "of pool 'fast' holds already (a device never cuts off its disk's data)")
    _load(_thin(path))                       # the same size
    _load(_thin(path, size="16M"))           # larger: the open grows the disk
    _load(_thin(path, size="4M", options={"disk": "other"}))  # another disk: new


def test_a_dedup_device_smaller_than_its_recorded_disk_is_refused(
        tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "p")
    create_dedup_pool(path, "images", 32 * MIB)
    with DedupPool.open(path) as pool:
        pool.open_disk("vm7", 8 * MIB).close()
    doc = _dedup(path, size="4M")
    assert _refusal(doc) == (
        "c.yaml: devices[0].size: got '4M', expected at least 8388608 bytes, what disk 'vm7' "
        "of pool 'images' holds already (a device never cuts off its disk's data)")
    # by the pool's directory in options, and by its name there: the same disk
    by_dir = _dedup(path, size="4M")
    del by_dir["devices"][0]["pool"]
    by_dir["devices"][0]["options"] = {"pool": path}
    assert "devices[0].size: got '4M'" in _refusal(by_dir)
    _load(_dedup(path))
    _load(_dedup(path, size="4M", options={"disk": "other"}))


def test_new_pools_and_disks_pass(tmp_path: os.PathLike[str]) -> None:
    _load(_thin(os.path.join(tmp_path, "t")))
    _load(_dedup(os.path.join(tmp_path, "d")))
    assert not os.path.exists(os.path.join(tmp_path, "t"))
    assert not os.path.exists(os.path.join(tmp_path, "d"))
