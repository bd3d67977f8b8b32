"""CephHandler: the `ceph` subtype — an RBD image of a Ceph cluster through librbd. Config
string: `.config`; the device and its asynchronous commands: `.device`; the C binding:
`.librbd`."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from tcmu_py.configspec import Device, join_config_items
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig, Handler

from . import config as _config

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

log = logging.getLogger(__name__)


class CephHandler(Handler):
    """A disk on an RBD image (replicated, thin and distributed by Ceph). Named ``ceph``, not
    ``rbd``: that subtype is tcmu-runner's, and both daemons may share a host."""

    subtype = "ceph"
    #: What targetcli's ``help create`` shows as CFGSTRING FORMAT.
    description = ("RBD image through librbd: image=POOL/[NAMESPACE/]IMAGE[;conf=PATH][;id=ID]"
                   "[;keyring=PATH][;create=0|1][;lock=exclusive|shared][;osd_op_timeout=S]"
                   "[;rbd_cache=0|1], or tcmu-runner's POOL/IMAGE[;key=value...]")

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        _config.parse(cfgstring)

    @classmethod
    def device_image(cls, device: Device) -> str | None:
        """The image of a ``lock=exclusive`` device, as ``ceph:<conf>:<pool>/[ns/]image``:
        two such devices on one image would leave one NOT READY for good (the other holds the
        lock), so the YAML check refuses the second. ``lock=shared`` devices may share one
        (the initiators coordinate); a device whose options do not parse has none (its own
        check reports them)."""
        try:
            cfg = _config.parse(join_config_items(device.options))
        except ConfigError:
            return None
        if cfg.lock != "exclusive":
            return None
        return f"ceph:{os.path.realpath(cfg.conf)}:{cfg.spec}"

    @classmethod
    def device_warnings(cls, device: Device) -> list[str]:
        """An ``osd_op_timeout`` not below half the device's ``cmd_time_out``
        (`config.osd_timeout_warning`; the open logs the same)."""
        try:
            cfg = _config.parse(join_config_items(device.options), device.cmd_time_out)
        except ConfigError:
            return []  # reported as an error by the check of its options
        why = _config.osd_timeout_warning(cfg.osd_op_timeout, device.cmd_time_out)
        return [] if why is None else [why]

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Connect to the cluster, open (or with ``create=1`` make) the image and serve it.
        The device's size is the kernel's ``dev_size`` (0: the image's size); it may not exceed
        the image's. WCE follows librbd's cache (``rbd_cache=1``), not the device's
        ``write_cache`` (see `.config`)."""
        from .device import CephDevice, open_backend

        cfg = _config.parse(config.cfgstring, config.cmd_time_out)
        why = _config.osd_timeout_warning(cfg.osd_op_timeout, config.cmd_time_out)
        if why is not None:
            log.warning("ceph device %s: %s", config.name, why)
        backend = open_backend(cfg, config.size, config.block_size)
        try:
            return CephDevice(config, backend)
        except BaseException:
            backend.close()
            raise
