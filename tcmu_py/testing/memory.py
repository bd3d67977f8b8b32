"""`MemoryDisk`: a disk in a bytearray, the smallest `tcmu_py.backend.BlockBackend`.

For tests of the device engine and of what runs around a backend (the runner, the fuzzer, the
conformance checks): subclass it to add or break a capability (``unmap``, ``lbprz``) and wrap
it with `tcmu_py.device.block.open_block_device`. It declares no optional capability itself.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MemoryDisk"]


class MemoryDisk:
    """`size` bytes of `block_size`-byte blocks in `data`, all zero at first.

    `blocking` False (the default: a memory copy never waits) runs its commands on the device's
    loop thread; True sends them to the workers, the path of a backend that may block. No write
    cache: a write is "durable" when it returns, `flush` has nothing to do.
    """

    write_cache = False

    def __init__(self, size: int, block_size: int = 512, *, blocking: bool = False) -> None:
        self.size = size
        self.block_size = block_size
        self.blocking = blocking
        self.data = bytearray(size)

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)

    def flush(self) -> None:
        pass
