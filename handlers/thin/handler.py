"""ThinHandler: the `thin` subtype — thin-provisioned disks in shared pools.

Config string (after ``thin/``), options separated by ``;`` (the kernel cuts ``dev_config`` at
``,``, so ``,`` is accepted only for hand-written strings)::

    pool=<absolute pool directory | pool name>[;disk=<name>][;unit=<bytes>]

- ``pool``: an absolute path, or the name of a pool declared to this process with
  `register_pool` (the daemon registers the pools of its YAML).
- ``disk``: the disk's file in the pool (``<disk>.img``); default: the device name.
- ``unit``: allocation unit of a *new* disk (default: the pool's); an existing disk keeps its own.
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
from .pool import POOL_FILE, acquire_pool, check_name, check_unit, load_pool_config, release_pool

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

_pool_paths: dict[str, str] = {}
_pool_paths_lock = threading.Lock()


def register_pool(name: str, path: str) -> None:
    """Let config strings name the pool at `path` as ``pool=<name>`` (process-wide)."""
    check_name("pool", name)
    with _pool_paths_lock:
        _pool_paths[name] = os.path.realpath(path)


def unregister_pool(name: str) -> None:
    with _pool_paths_lock:
        _pool_paths.pop(name, None)


def _unit(value: str) -> int:
    return check_unit(int(value, 0))


_OPTIONS: dict[str, Any] = {"pool": str, "disk": lambda v: check_name("disk", v), "unit": _unit}


def _parse(cfgstring: str) -> tuple[str, str | None, str | None, int | None]:
    """(pool path, pool name if given by name, disk or None, unit or None)."""
    opts = parse_options(cfgstring.replace(";", ","), _OPTIONS)
    pool = opts.get("pool")
    if not pool:
        raise ConfigError(f"config string {cfgstring!r}: missing pool=<pool directory or name>")
    name = None
    if not pool.startswith("/"):
        with _pool_paths_lock:
            path = _pool_paths.get(pool)
        if path is None:
            raise ConfigError(
                f"config string {cfgstring!r}: pool {pool!r}: expected an absolute pool directory "
                f"or a declared pool name ({', '.join(sorted(_pool_paths)) or 'none declared'})"
            )
        name, pool = pool, path
    return pool, name, opts.get("disk"), opts.get("unit")


class ThinHandler(Handler):
    """Thin disks: sparse files in a pool, UNMAP / WRITE SAME+UNMAP / GET LBA STATUS, soft
    threshold unit attentions and out-of-space DATA PROTECT."""

    subtype = "thin"
    #: What targetcli's ``help create`` shows as CFGSTRING FORMAT.
    description = ("thin-provisioned disk in a shared pool: pool=<pool directory>"
                   "[;disk=<name>][;unit=<bytes>] (pool made with `tcmu-py thin create`)")
    config_sections = ("pools",)
    takes_pool = True

    # The rest of the contract lives in `.config`.

    @classmethod
    def load_section(
        cls, key: str, raw: object, checker: Checker, doc: Mapping[str, Any]
    ) -> tuple[Any, ...]:
        return _section.load_pools(raw, checker, doc)

    @classmethod
    def device_config_items(
        cls, device: Device, sections: Mapping[str, tuple[Any, ...]]
    ) -> tuple[tuple[str, str], ...]:
        return _section.device_config_items(device, sections.get("pools", ()))

    @classmethod
    def device_image(cls, device: Device) -> str | None:
        return _section.device_image(device)

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
        return {"thin": CliCommand("thin pool administration (tcmu-py thin --help)", _section.main)}

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        """Raise ConfigError unless the options parse and, when the pool already exists, agree
        with its pool.json (name; `unit` of an existing disk). A pool that does not exist yet is
        not an error here: `tcmu-py apply` creates the YAML's pools after validating the whole
        file; `open` fails with a message naming the directory if it is still missing.
        Creates nothing."""
        path, name, disk, unit = _parse(cfgstring)
        if not os.path.exists(os.path.join(path, POOL_FILE)):
            return
        config = load_pool_config(path)
        where = os.path.join(path, POOL_FILE)
        if name is not None and config.name != name:
            raise ConfigError(f"{where}: pool is named {config.name!r}, expected {name!r}")
        if disk is not None and unit is not None and config.disks.get(disk, unit) != unit:
                raise ConfigError(f"{where}: disk {disk}: unit {unit}: the disk was created with "
                                  f"unit {config.disks[disk]} and cannot change")

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Open (creating if missing) the disk in its pool and wrap it in a BlockDevice (product
        "THIN DISK"). The pool is shared by every thin device of this process naming its
        directory; the last device closed closes it."""
        from tcmu_py.device.block import open_block_device

        path, name, disk, unit = _parse(config.cfgstring)
        disk = disk or check_name("disk", config.name)
        pool = acquire_pool(path, expected_name=name)
        try:
            backend = pool.open_disk(
                disk,
                config.size,
                block_size=config.block_size,
                write_cache=config.write_cache,
                unit=unit,
                on_close=lambda: release_pool(pool),
            )
        except BaseException:
            release_pool(pool)
            raise
        try:
            return open_block_device(config, backend)
        except BaseException:
            backend.close()
            raise
