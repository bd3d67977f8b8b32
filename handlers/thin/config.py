"""What the ``thin`` subtype owns outside its devices (`tcmu_py.handler.Handler` contract):

- the YAML section ``pools:`` (`PoolSpec`, validated by `load_pools`) and the ``pool:`` key of a
  device, whose pool's directory goes into the device's dev_config (`device_config_items`);
- the pools' creation before devices open (`prepare`);
- the ``thin pools`` rows of ``tcmu-py status`` (`status`, `status_tables`);
- ``tcmu-py thin status|create`` (`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from tcmu_py.configspec import Checker, Device, parse_size
from tcmu_py.errors import ConfigError
from tcmu_py.handler import ConfigView, Gauge, StatusTable
from tcmu_py.table import format_size

from .._pool import (
    POOL_HEADERS,
    check_device_pools,
    check_existing_pool,
    pool_cells,
    pool_config_items,
    pool_entries,
    pool_gauges,
    state_cell,
)
from .backend import ThinBackend
from .pool import (
    POOL_FILE,
    PoolConfig,
    ensure_pool,
    load_pool_config,
    read_pool_status,
)

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

__all__ = [
    "PoolSpec",
    "device_config_items",
    "device_image",
    "load_pools",
    "main",
    "prepare",
    "status",
    "status_tables",
]

#: The top-level YAML key of thin pools.
SECTION = "pools"
#: The subtype whose devices name these pools.
SUBTYPE = "thin"


@dataclass(frozen=True)
class PoolSpec:
    """A thin pool declared in the YAML. ``capacity`` and ``hard_limit`` are bytes (hard_limit
    <= capacity); ``soft_threshold`` is a percentage of ``capacity`` (1..100; None: none)."""

    name: str
    path: str
    capacity: int
    soft_threshold: int | None = 80
    hard_limit: int = 0  # the loader always sets it (default: capacity)


def load_pools(raw: object, c: Checker, doc: Mapping[str, Any]) -> tuple[PoolSpec, ...]:
    """The ``pools:`` section, and every thin device's ``pool:`` naming one of them (names of
    pools that failed validation still count, so one bad pool does not cascade)."""
    pools: list[PoolSpec] = []
    for entry, path, cap, soft, hard in pool_entries(c, raw, SECTION):
        name = entry.name
        if not c.clean_since(entry):
            continue
        assert name and path and cap and hard
        check_existing_pool(c, entry.path, path, POOL_FILE, load_pool_config,
                            partial(_mismatches, name=name))
        pools.append(PoolSpec(name, path, cap, soft, hard))
    # Each pool-owning handler checks its own devices (dedup's name ``dedup_pools``).
    check_device_pools(c, doc, SUBTYPE, SECTION, raw, required=False)
    return tuple(pools)


def _mismatches(current: PoolConfig, name: str) -> list[tuple[str, object, object]]:
    """What of an existing pool cannot change: its name (its unit is not declared here)."""
    return [("name", name, current.name)] if current.name != name else []


def device_config_items(device: Device, pools: Sequence[PoolSpec]
                        ) -> tuple[tuple[str, str], ...]:
    """``("pool", <directory>)`` for a device naming a declared pool: the dev_config then names
    the directory, which a daemon started without the YAML can open."""
    return pool_config_items(device, SUBTYPE, pools)


def device_image(device: Device) -> str | None:
    """A thin device's file: ``<pool directory>/<disk or device name>.img`` (links resolved);
    None when its pool is given by name only (resolved at open time)."""
    opts = dict(device.config_items) | device.options_dict()
    pool = opts.get("pool", "")
    if not pool.startswith("/"):
        return None
    return os.path.join(os.path.realpath(pool), f"{opts.get('disk') or device.name}.img")


def prepare(config: ConfigView) -> None:
    """Create (or update) the YAML's thin pools and register their names in this process.

    A pool's hard limit is what the thin handler enforces as the pool's capacity; the soft
    threshold is a percentage of it.
    """
    from .handler import register_pool

    for pool in config.section(SECTION):
        ensure_pool(pool.path, pool.name, pool.hard_limit or pool.capacity, pool.soft_threshold)
        register_pool(pool.name, pool.path)


def status(devices: Sequence[ScsiDevice]) -> dict[str, Any]:
    """``{"pools": [...]}``: each pool behind a served device once (capacity, use, per-disk
    use; `PoolStatus.as_dict`)."""
    pools: dict[str, dict[str, Any]] = {}
    for device in devices:
        backend = getattr(device, "backend", None)
        if isinstance(backend, ThinBackend):
            st = backend.pool.status().as_dict()
            pools[st["path"]] = st
    return {SECTION: list(pools.values())}


def _pool_row(pool: Mapping[str, Any]) -> tuple[str, ...]:
    threshold = pool["soft_threshold"]
    return (
        *pool_cells(pool),
        "-" if threshold is None else f"{threshold}%",
        state_cell(pool),
        ", ".join(f"{d['name']}={format_size(d['used'])}" for d in pool["disks"]),
    )


_POOL_HEADERS = (*POOL_HEADERS, "soft", "state", "disks")


def status_tables(st: Mapping[str, Any]) -> list[StatusTable]:
    rows = tuple(_pool_row(pool) for pool in st.get(SECTION) or [])
    return [StatusTable("thin pools", _POOL_HEADERS, rows)] if rows else []


def metrics(st: Mapping[str, Any]) -> list[Gauge]:
    """Per pool (labels ``pool``, ``path``): capacity, use, whether use is above the soft
    threshold; per disk (with ``disk``): the bytes it holds."""
    out: list[Gauge] = []
    for pool in st.get(SECTION) or []:
        labels, gauges = pool_gauges("thin", pool)
        out += gauges
        out += [Gauge("tcmu_py_thin_disk_used_bytes", "bytes allocated to one thin disk",
                      labels | {"disk": str(d["name"])}, d["used"]) for d in pool["disks"]]
    return out


def main(argv: list[str]) -> int:
    """``tcmu-py thin status PATH... [--json]`` / ``tcmu-py thin create PATH --name NAME
    --capacity SIZE [--soft-threshold PCT]``."""
    p = argparse.ArgumentParser(prog="tcmu-py thin", description="thin pool administration")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="a pool's capacity and use (also while it is served)")
    s.add_argument("paths", nargs="+", metavar="PATH", help="pool directory")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    c = sub.add_parser("create", help="create a pool (or update its capacity and threshold)")
    c.add_argument("path", metavar="PATH", help="pool directory")
    c.add_argument("--name", required=True, help="the pool's name")
    c.add_argument("--capacity", required=True, help="bytes, or with K, M, G, T, P")
    c.add_argument("--soft-threshold", type=int, default=80, metavar="PCT",
                   help="percentage of capacity that raises a unit attention (default 80)")
    args = p.parse_args(argv)
    if args.cmd == "create":
        try:
            capacity = parse_size(args.capacity)
        except ValueError:
            raise ConfigError(f"--capacity: got {args.capacity!r}, expected a size like 10G"
                              ) from None
        ensure_pool(args.path, args.name, capacity, args.soft_threshold)
        return 0
    found = [read_pool_status(path).as_dict() for path in args.paths]
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        (table,) = status_tables({SECTION: found})
        print(table.render())
    sys.stdout.flush()
    return 0
