"""`null`: reads return zeros, writes are discarded (SCST's NULLIO).

For measuring the framework's own per-command overhead; it stores nothing. Config string: empty,
or anything (ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.handler import DeviceConfig, Handler

_ZEROS = memoryview(bytes(1 << 20))


class NullBackend:
    """Stores nothing. Capabilities (`tcmu_py.backend`): `Resizable` (any size will do)."""

    write_cache = False
    blocking = False  # nothing here waits: the runner executes commands on its loop thread

    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.block_size = block_size

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            n = len(b)
            if n <= len(_ZEROS):
                b[:] = _ZEROS[:n]  # a copy from a shared zero page: no allocation per command
            else:
                b[:] = bytes(n)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        pass

    def flush(self) -> None:
        pass

    def resize(self, size: int) -> None:
        self.size = size


class NullHandler(Handler):
    subtype = "null"
    description = "discards writes, reads zeros (overhead measurements)"

    @classmethod
    def open(cls, config: DeviceConfig) -> BlockDevice:
        return open_block_device(config, NullBackend(config.size, config.block_size))
