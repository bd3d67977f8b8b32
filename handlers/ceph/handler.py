"""CephHandler: the `ceph` subtype — an RBD image of a Ceph cluster through librbd. Config
string: `.config`; the device and its asynchronous commands: `.device`; the C binding:
`.librbd`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tcmu_py.handler import DeviceConfig, Handler

from . import config as _config

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice


class CephHandler(Handler):
    """A disk on an RBD image (replicated, thin and distributed by Ceph). Named ``ceph``, not
    ``rbd``: that subtype is tcmu-runner's, and both daemons may share a host."""

    subtype = "ceph"
    description = "RBD image of a Ceph cluster through librbd (asynchronous I/O)"

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        _config.parse(cfgstring)

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Connect to the cluster, open (or with ``create=1`` make) the image and serve it.
        The device's size is the kernel's ``dev_size`` (0: the image's size); it may not exceed
        the image's. WCE follows librbd's cache (``rbd_cache=1``), not the device's
        ``write_cache`` (see `.config`)."""
        from .device import CephDevice, open_backend

        cfg = _config.parse(config.cfgstring)
        backend = open_backend(cfg, config.size, config.block_size)
        try:
            return CephDevice(config, backend)
        except BaseException:
            backend.close()
            raise
