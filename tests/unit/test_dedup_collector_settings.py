"""The dedup pool's collector settings as YAML keys (``collector_interval``,
``collector_dead_percent`` of a ``dedup_pools`` entry): validated with one line naming file,
key, value and what was expected; applied to the in-daemon collector from the pool's open, and
at once to a pool already open."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
import yaml

from tcmu_py.daemon.config import load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import load_handlers
from tcmu_py.handlers.dedup import (
    CollectorSettings,
    acquire_pool,
    collector_settings,
    configure_collector,
    create_pool,
    release_pool,
)
from tcmu_py.handlers.dedup import config as dedup_config
from tcmu_py.handlers.dedup.handler import unregister_pool
from tcmu_py.handlers.dedup.store import COLLECT_INTERVAL, DEFAULT_DEAD_PERCENT
from tcmu_py.testing import wait_until

CS = 4096


def _load(doc: dict[str, object]) -> object:
    reg = load_handlers()
    registry = {n: reg[n] for n in ("raw", "dedup")}
    return load_config_text(yaml.safe_dump(doc), "c.yaml", registry=registry)  # type: ignore[arg-type]


def _pool(path: str, **keys: object) -> dict[str, object]:
    return {"name": "p", "path": path, "capacity": "64M", **keys}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("collector_interval", 0, "seconds, a number from 0.1 to 3600"),
    ("collector_interval", "2s", "seconds, a number from 0.1 to 3600"),
    ("collector_interval", True, "seconds, a number from 0.1 to 3600"),
    ("collector_interval", 3601, "seconds, a number from 0.1 to 3600"),
    ("collector_dead_percent", 0, "a percentage 1..100"),
    ("collector_dead_percent", 101, "a percentage 1..100"),
    ("collector_dead_percent", "50%", "a percentage 1..100"),
    ("collector_dead_percent", 2.5, "a percentage 1..100"),
])
def test_bad_collector_keys_name_file_key_value_and_expected(key: str, value: object,
                                                             expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load({"dedup_pools": [_pool("/srv/p", **{key: value})]})
    assert str(exc.value) == (f"c.yaml: dedup_pools[0].{key}: got {value!r}, expected "
                              f"{expected}"), str(exc.value)


def test_collector_keys_default_and_parse(tmp_path: os.PathLike[str]) -> None:
    cfg = _load({"dedup_pools": [_pool("/srv/a", collector_interval=0.5,
                                       collector_dead_percent=10), _pool("/srv/b") | {
                                           "name": "q"}]})
    a, b = cfg.section("dedup_pools")  # type: ignore[attr-defined]
    assert (a.collector_interval, a.collector_dead_percent) == (0.5, 10)
    assert (b.collector_interval, b.collector_dead_percent) == (COLLECT_INTERVAL,
                                                                DEFAULT_DEAD_PERCENT)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    assert wait_until(predicate, timeout, 0.01), f"timed out after {timeout} s waiting for {what}"


def test_prepared_settings_drive_the_collector_of_the_served_pool(
        tmp_path: os.PathLike[str]) -> None:
    """``collector_dead_percent: 10`` makes the daemon's collector compact a container 20 %
    dead, which the default (50) leaves alone; a later prepare changes the running collector."""
    path = os.path.join(tmp_path, "dp")
    cfg = _load({"dedup_pools": [_pool(path, collector_interval=0.1,
                                       collector_dead_percent=10)]})
    dedup_config.prepare(cfg)  # type: ignore[arg-type]
    pool = None
    try:
        assert collector_settings(path) == CollectorSettings(0.1, 10)
        pool = acquire_pool(path, "p")
        disk = pool.open_disk("d", 16 * CS)
        rng = random.Random(4)
        disk.write(0, [memoryview(rng.randbytes(10 * CS))])
        disk.unmap(0, 2 * CS)  # 2 of 10 chunks dead: 20 %
        _wait(lambda: pool.status().collected >= 2 * CS, 20,
              "the collector to compact the 20 % dead container")
        assert pool.status().used == 8 * CS
        cfg2 = _load({"dedup_pools": [_pool(path, collector_interval=7,
                                            collector_dead_percent=60)]})
        dedup_config.prepare(cfg2)  # type: ignore[arg-type]
        collector = pool._collector
        assert collector is not None
        assert (collector.interval, collector.dead_percent) == (7.0, 60)
        disk.close()
    finally:
        if pool is not None:
            release_pool(pool)
        unregister_pool("p")
        configure_collector(path, CollectorSettings())


def test_a_pool_without_settings_gets_the_defaults(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "dp")
    create_pool(path, "p", 1 << 20)
    pool = acquire_pool(path)
    try:
        collector = pool._collector
        assert collector is not None
        assert (collector.interval, collector.dead_percent) == (COLLECT_INTERVAL,
                                                                DEFAULT_DEAD_PERCENT)
    finally:
        release_pool(pool)
