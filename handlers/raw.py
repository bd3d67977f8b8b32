"""`raw`: a disk backed by a raw image file — the reference handler to copy.

Config string (as tcmu-runner's file handler): the absolute path of the image, so
``targetcli /backstores/user:raw create name=d size=1G cfgstring=/var/lib/d.img`` gives the
TCMU dev_config ``raw//var/lib/d.img``. A missing image is created sparse; a shorter one is
extended (sparse) to the device size.

Data moves with `os.preadv` / `os.pwritev` straight between the file and the ring's buffers: no
copy in Python. With the device's write cache on (LIO attribute `emulate_write_cache=1`, YAML
`write_cache: true`) writes land in the page cache, the device reports WCE=1 and makes them
durable with `fdatasync` on SYNCHRONIZE CACHE and FUA. With it off the image is opened O_DSYNC:
every write is durable when it completes, and WCE=0 says so.

An image on a memory filesystem (tmpfs, ramfs) never waits for a disk: its commands run on the
device's loop thread, with no hand-off to a worker (see `BlockBackend.blocking`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig, Handler, on_memory_filesystem


class RawBackend:
    """A raw image file. Thread-safe: positional I/O only."""

    def __init__(self, path: str, size: int, block_size: int, write_cache: bool = True) -> None:
        self.path = path
        self.block_size = block_size
        self.write_cache = write_cache
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if write_cache else os.O_DSYNC)
        self.fd = os.open(path, flags, 0o600)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = size
        #: False on tmpfs/ramfs: I/O is a memory copy, cheaper on the loop thread than handed off.
        self.blocking = not on_memory_filesystem(self.fd)

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = os.preadv(self.fd, bufs, offset)
        if got < want:  # the image shrank under us: the tail reads as zeros
            _zero_tail(bufs, got)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        done = os.pwritev(self.fd, bufs, offset)
        while done < want:  # short write: finish it, or raise the OSError that stops it
            rest = _skip(bufs, done)
            done += os.pwritev(self.fd, rest, offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def resize(self, size: int) -> None:
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = size

    def close(self) -> None:
        os.close(self.fd)


def _skip(bufs: Sequence[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _zero_tail(bufs: Sequence[memoryview], n: int) -> None:
    for b in _skip(bufs, n):
        b[:] = bytes(len(b))


class RawHandler(Handler):
    subtype = "raw"
    description = "raw image file: raw/<absolute path of the image>"

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        if not cfgstring.startswith("/"):
            raise ConfigError(
                f"raw: config string {cfgstring!r}: expected the absolute path of the image"
            )
        if cfgstring.endswith("/"):
            raise ConfigError(f"raw: config string {cfgstring!r}: expected a file, not a directory")

    @classmethod
    def open(cls, config: DeviceConfig) -> BlockDevice:
        cls.check_config(config.cfgstring)
        try:
            backend = RawBackend(
                config.cfgstring, config.size, config.block_size, config.write_cache
            )
        except OSError as exc:
            raise ConfigError(f"raw: cannot open image {config.cfgstring}: {exc.strerror}") from exc
        return open_block_device(config, backend)
