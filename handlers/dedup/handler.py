"""DedupHandler: the ``dedup`` subtype — deduplicating disks in shared pools.

Config string (after ``dedup/``), options separated by ``;``::

    pool=<absolute pool directory | pool name>[;disk=<name>]

- ``pool``: an absolute path, or the name of a pool declared to this process with
  `register_pool` (the daemon registers the pools of its YAML's ``dedup_pools``).
- ``disk``: the disk's name inside the pool; default: the device name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tcmu_py.configspec import Checker, Device
from tcmu_py.errors import ConfigError
from tcmu_py.handler import (
    CliCommand,
    ConfigView,
    DeviceConfig,
    Gauge,
    Handler,
    StatusTable,
    parse_options,
)

from . import config as _section
from .store import POOL_FILE, acquire_pool, check_name, load_pool_config, release_pool

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

_pool_paths: dict[str, str] = {}
_pool_paths_lock = threading.Lock()


def register_pool(name: str, path: str) -> None:
    """Let config strings name the dedup pool at `path` as ``pool=<name>`` (process-wide)."""
    check_name("pool", name)
    with _pool_paths_lock:
        _pool_paths[name] = os.path.realpath(path)


def unregister_pool(name: str) -> None:
    with _pool_paths_lock:
        _pool_paths.pop(name, None)


_OPTIONS: dict[str, Any] = {"pool": str, "disk": lambda v: check_name("disk", v)}


def _parse(cfgstring: str) -> tuple[str, str | None, str | None]:
    """(pool path, pool name if given by name, disk or None)."""
    opts = parse_options(cfgstring, _OPTIONS)
    pool = opts.get("pool")
    if not pool:
        raise ConfigError(f"config string {cfgstring!r}: missing pool=<pool directory or name>")
    name = None
    if not pool.startswith("/"):
        with _pool_paths_lock:
            path = _pool_paths.get(pool)
            known = ", ".join(sorted(_pool_paths)) or "none declared"
        if path is None:
            raise ConfigError(f"config string {cfgstring!r}: pool {pool!r}: expected an absolute "
                              f"pool directory or a declared dedup pool name ({known})")
        name, pool = pool, path
    return pool, name, opts.get("disk")


class DedupHandler(Handler):
    """Dedup disks: chunks stored once per content across the disks of a pool; UNMAP / WRITE
    SAME+UNMAP / GET LBA STATUS, soft threshold unit attentions, DATA PROTECT when full."""

    subtype = "dedup"
    #: What targetcli's ``help create`` shows as CFGSTRING FORMAT.
    description = ("deduplicating disk in a shared pool: pool=<pool directory>[;disk=<name>] "
                   "(pool made with `tcmu-py dedup create-pool`)")
    config_sections = (_section.SECTION,)
    takes_pool = True

    @classmethod
    def load_section(cls, key: str, raw: object, checker: Checker, doc: Mapping[str, Any]
                     ) -> tuple[Any, ...]:
        return _section.load_pools(raw, checker, doc)

    @classmethod
    def device_config_items(cls, device: Device, sections: Mapping[str, tuple[Any, ...]]
                            ) -> tuple[tuple[str, str], ...]:
        return _section.device_config_items(device, sections.get(_section.SECTION, ()))

    @classmethod
    def prepare(cls, config: ConfigView) -> None:
        _section.prepare(config)

    @classmethod
    def status(cls, devices: Sequence[ScsiDevice]) -> dict[str, Any]:
        return _section.status(devices)

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        return _section.status_tables(status)

    @classmethod
    def metrics(cls, status: Mapping[str, Any]) -> list[Gauge]:
        return _section.metrics(status)

    @classmethod
    def commands(cls) -> Mapping[str, CliCommand]:
        return {"dedup": CliCommand("dedup pool administration (tcmu-py dedup --help)",
                                    _section.main)}

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        """Raise ConfigError unless the options parse and, when the pool exists, its name
        agrees. A pool not created yet is no error (``apply`` creates it). Creates nothing."""
        path, name, _ = _parse(cfgstring)
        if not os.path.exists(os.path.join(path, POOL_FILE)):
            return
        config = load_pool_config(path)
        if name is not None and config.name != name:
            raise ConfigError(f"{os.path.join(path, POOL_FILE)}: pool is named "
                              f"{config.name!r}, expected {name!r}")

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Open (registering if new) the disk in its pool, wrapped in a BlockDevice. The pool is
        shared by every dedup device of this process naming its directory; the last device
        closed closes it."""
        from tcmu_py.device.block import open_block_device

        path, name, disk = _parse(config.cfgstring)
        disk = disk or check_name("disk", config.name)
        pool = acquire_pool(path, expected_name=name)
        try:
            backend = pool.open_disk(disk, config.size, block_size=config.block_size,
                                     write_cache=config.write_cache,
                                     on_close=lambda: release_pool(pool))
        except BaseException:
            release_pool(pool)
            raise
        try:
            return open_block_device(config, backend)
        except BaseException:
            backend.close()
            raise
