"""Copy domains: which logical units one EXTENDED COPY may read from and write to.

TCMU hands the device no initiator identity, so the copy manager cannot tell whether the
initiator that sent an EXTENDED COPY was given the logical units its CSCD descriptors name. A copy
domain is the explicit answer: a copy may only address devices of the domain of the device that
received it. By default every block device is alone in a private domain (copies within one LUN);
the daemon puts devices an operator grouped into one shared domain (`BlockDevice.join`).

Threads: `add`, `remove` and `find` may be called from any thread (device worker threads look
devices up while the daemon adds and removes them).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcmu_py.device.block import BlockDevice


class CopyDomain:
    """A named set of block devices that may copy to and from each other."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._devices: list[BlockDevice] = []

    def add(self, dev: BlockDevice) -> None:
        """Make `dev` reachable by copies of this domain (adding it twice changes nothing)."""
        with self._lock:
            if not any(d is dev for d in self._devices):
                self._devices.append(dev)

    def remove(self, dev: BlockDevice) -> None:
        """`dev` is no longer reachable (a no-op if it was not in the domain)."""
        with self._lock:
            self._devices = [d for d in self._devices if d is not dev]

    def find(self, naa: bytes) -> BlockDevice | None:
        """The device of this domain whose VPD 83h NAA designator is `naa`, or None."""
        with self._lock:
            devices = list(self._devices)
        for dev in devices:
            if dev.naa_designator() == naa:
                return dev
        return None

    def devices(self) -> list[BlockDevice]:
        """The devices of the domain, in the order they were added."""
        with self._lock:
            return list(self._devices)

    def __repr__(self) -> str:
        return f"CopyDomain({self.name!r}, {len(self.devices())} devices)"
