"""MirrorHandler: the `mirror` subtype — one disk replicated over 2-3 legs (image files, block
devices, NBD exports). Config string and YAML options: `.config`; the logic: `.mirror`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tcmu_py.configspec import Checker, Device
from tcmu_py.errors import ConfigError
from tcmu_py.handler import CliCommand, DeviceConfig, Gauge, Handler, StatusTable

from . import config as _config
from .mirror import Mirror

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice


class MirrorHandler(Handler):
    """A replicated disk: writes to every leg (acknowledged at the write quorum), reads from
    one, a write-intent bitmap and background resync, split brain refused at open."""

    subtype = "mirror"
    #: What targetcli's ``help create`` shows as CFGSTRING FORMAT.
    description = ("replicated disk: legs=<path or nbd URI>|<...>[|<...>][;quorum=all|N]"
                   "[;read=round-robin|least-busy][;key=value...] (see docs/configuration.md)")

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        _config.parse(cfgstring)

    @classmethod
    def load_options(
        cls, raw: object, path: str, checker: Checker, name: str | None, state_dir: str
    ) -> tuple[tuple[str, str], ...] | None:
        """``legs`` (required, 2-3), ``quorum``, ``region``, ``read``, ``resync_rate``,
        ``retry``, ``degraded_open``, ``assume_clean``, ``leg_timeout``, ``max_lag`` (see
        `.config`)."""
        return _config.load_options(raw, path, checker)

    @classmethod
    def device_images(cls, device: Device) -> list[str]:
        """The local legs (image files and block devices), symbolic links resolved: no other
        device may write them (`check` refused a raw disk on a mirror's leg, or two mirrors
        sharing one, only for images of the same kind before)."""
        return _config.local_legs(device.options_dict().get("legs", ""))

    @classmethod
    def status(cls, devices: Sequence[ScsiDevice]) -> dict[str, Any]:
        return _config.status(devices)

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        return _config.status_tables(status)

    @classmethod
    def metrics(cls, status: Mapping[str, Any]) -> list[Gauge]:
        return _config.metrics(status)

    @classmethod
    def commands(cls) -> Mapping[str, CliCommand]:
        return {"mirror": CliCommand("mirror disks: resync progress, verify, metadata "
                                     "(tcmu-py mirror --help)", _config.main)}

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Open the legs (see `Mirror.open`) and wrap the mirror in a BlockDevice. The mirror
        reports a write cache (WCE=1) when the device has one: FUA and SYNCHRONIZE CACHE then
        flush every leg; without it every leg write is FUA."""
        from tcmu_py.device.block import open_block_device

        parsed = _config.parse(config.cfgstring)
        if config.size % 4096:
            raise ConfigError(f"mirror: device {config.name}: size {config.size}: expected a "
                              "multiple of 4096")
        mirror = Mirror.open(parsed.mirror_config(config.size, config.write_cache),
                             config.block_size)
        mirror.name = config.name
        try:
            dev = open_block_device(config, mirror)
        except BaseException:
            mirror.close()
            raise
        # a read or write waiting for a silent NBD leg must not hold the ring's loop thread:
        # the commands behind it would wait with it (a lone command runs there otherwise)
        dev.lone_commands_on_loop = not mirror.has_remote_legs
        return dev
