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
device's loop thread, with no hand-off to a worker (see `tcmu_py.backend.BlockBackend`).

The image may also be a block device (``raw//dev/vg/lun``): it is used as it is — never
truncated or extended — and must hold at least the device size; its commands always go to the
workers (the node may sit on a tmpfs /dev, but the I/O goes to the device).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from tcmu_py.buffers import skip, zero
from tcmu_py.configspec import Checker, Device
from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.errors import ConfigError
from tcmu_py.handler import (
    DeviceConfig,
    Handler,
    on_memory_filesystem,
    split_copy_domain,
    split_data_plane,
    split_wwn,
)

log = logging.getLogger(__name__)


class RawBackend:
    """A raw image file. Thread-safe: positional I/O only.

    Capabilities (`tcmu_py.backend`): `CopyRange`, `Resizable`, `Closable`, `FileExtent` (the C
    data plane moves plain READ/WRITE bytes itself). No `Unmap`: the image
    keeps every block it was given, so the device reports LBPME=0 (tcmu-runner's file handler
    claims it).
    """

    def __init__(self, path: str, size: int, block_size: int, write_cache: bool = True) -> None:
        self.path = path
        self.block_size = block_size
        self.write_cache = write_cache
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if write_cache else os.O_DSYNC)
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            # A device made without `apply` (targetcli's user:raw, as tcmu-runner's file
            # handler) gets its image made here; one that existed before and is gone (deleted,
            # or its file system not mounted yet) is made anew too, and empty: said loudly.
            self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            log.warning("raw: image %s did not exist: created empty (%d bytes); if it held "
                        "data, it is not this file (a file system not mounted yet?)", path,
                        size)
        try:
            mode = os.fstat(self.fd).st_mode
            #: A block device: sized by the device, never truncated (st_size is 0 for it).
            self.is_block_device = stat.S_ISBLK(mode)
            if self.is_block_device:
                self._check_device_size(size)
            elif not stat.S_ISREG(mode):
                raise ConfigError(
                    f"raw: image {path}: a {_file_type(mode)}; expected a regular file or a "
                    "block device"
                )
            elif os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self._shrunk_said = False
        st = os.fstat(self.fd)
        #: The image's identity: two backends on one file are one store (`copy_range`).
        self.identity = (st.st_dev, st.st_ino)
        #: False on tmpfs/ramfs: I/O is a memory copy, cheaper on the loop thread than handed off.
        #: A device node's own file system says nothing about the device: always True there.
        self.blocking = self.is_block_device or not on_memory_filesystem(self.fd)

    def _check_device_size(self, size: int) -> None:
        available = os.lseek(self.fd, 0, os.SEEK_END)
        if available < size:
            raise ConfigError(
                f"raw: image {self.path}: block device of {available} bytes; expected at least "
                f"the device size, {size} bytes"
            )

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        got = os.preadv(self.fd, bufs, offset)
        if got < want:  # the image shrank under us: the tail reads as zeros (as LIO's fileio)
            zero(skip(bufs, got))
            if not self._shrunk_said:  # said once: an operator must learn the data is gone
                self._shrunk_said = True
                log.error("raw: image %s is %d bytes, shorter than the device's %d: it was "
                          "truncated while served; the blocks past its end read as zeros",
                          self.path, os.fstat(self.fd).st_size, self.size)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        want = sum(len(b) for b in bufs)
        done = os.pwritev(self.fd, bufs, offset)
        while done < want:  # short write: finish it, or raise the OSError that stops it
            rest = skip(bufs, done)
            done += os.pwritev(self.fd, rest, offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def file_extent(self) -> tuple[int, int] | None:
        """The whole image, from byte 0: `read` and `write` are plain preadv/pwritev on it.
        None when `read` or `write` is not this class's own (a subclass or a test that
        overrides them wants them called for every command)."""
        if (getattr(self.read, "__func__", None) is not RawBackend.read
                or getattr(self.write, "__func__", None) is not RawBackend.write):
            return None
        return self.fd, 0

    def copy_range(self, source: object, source_offset: int, offset: int, length: int) -> bool:
        """EXTENDED COPY from another raw image with ``copy_file_range`` (the kernel moves the
        bytes, or shares the extents on a file system that can). Declines a source of another
        kind, and overlapping ranges of one image: copy_file_range refuses those (EINVAL), and
        memmove semantics need the source read whole first. Declines, too, where the kernel
        cannot copy between the two files (EXDEV, EINVAL for block devices, ENOSYS)."""
        if not isinstance(source, RawBackend):
            return False
        if (source.identity == self.identity
                and source_offset < offset + length and offset < source_offset + length):
            return False
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(source.fd, self.fd, length - done,
                                       source_offset + done, offset + done)
            except OSError as exc:
                if exc.errno in _NO_COPY_FILE_RANGE:
                    return False
                raise
            if n == 0:  # the source image shrank under us: let the device read zeros
                return False
            done += n
        if not self.write_cache:
            # O_DSYNC covers write(2); copy_file_range makes no such promise.
            os.fdatasync(self.fd)
        return True

    def resize(self, size: int) -> None:
        if self.is_block_device:
            self._check_device_size(size)
        elif os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.size = size

    def close(self) -> None:
        os.close(self.fd)


#: copy_file_range errors that mean "not between these two files": move the bytes instead.
_NO_COPY_FILE_RANGE = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"file of mode {mode:o}"


#: tcmu-py's record of the LIO objects it made, in the state directory
#: (`tcmu_py.daemon.lio.STATE_FILE`; handlers do not import the daemon).
_STATE_FILE = "lio-state.json"


def _image_problem(img: str, state_dir: str) -> str | None:
    """Why `img` cannot be a raw image, as far as the file system says before ``apply`` (which
    creates a missing one): what to give instead, or None. Before, a directory or a device
    node passed ``check`` and ``apply`` died with a traceback, and the state file itself was
    taken and padded with zeros (its record of the LIO objects lost)."""
    if os.path.realpath(img) == os.path.realpath(os.path.join(state_dir, _STATE_FILE)):
        return f"an image path other than tcmu-py's own state file ({_STATE_FILE})"
    kind = _other_node(img)
    return None if kind is None else f"an image file or a block device, not a {kind}"


def _other_node(path: str) -> str | None:
    """What is at `path` when it is neither a regular file nor a block device (a directory, a
    device node...), or None: such a file, or nothing (made at the open), or nothing this user
    can see (the open names the error)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # (ValueError: a NUL in the path)
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISBLK(mode) else _file_type(mode)


class RawHandler(Handler):
    subtype = "raw"
    description = "raw image file: <absolute path of the image file or block device>"

    # -- YAML: a device's options are its image, ``options: {path: /abs/img}`` ----------------

    @classmethod
    def load_options(
        cls, raw: object, path: str, checker: Checker, name: str | None, state_dir: str
    ) -> tuple[tuple[str, str], ...] | None:
        """``(("path", <absolute image path>),)``: ``options.path``, by default
        ``<state_dir>/<device name>.img``."""
        m = checker.mapping(raw, path, {"path"})
        if m is None:
            return None
        img = (checker.abspath(m["path"], f"{path}.path") if "path" in m
               else str(Path(state_dir) / f"{name}.img"))
        if img is not None and split_wwn(img)[1] is not None:
            checker.fail(f"{path}.path", img, "an image path that does not end in ';wwn=naa...'"
                         " (the daemon would take that for the device's wwn)")
            return None
        if img is not None and split_copy_domain(img)[1] is not None:
            checker.fail(f"{path}.path", img, "an image path that does not end in"
                         " ';copy_domain=...' (the daemon would take that for the device's"
                         " copy domain)")
            return None
        if img is not None and not split_data_plane(img)[1]:
            checker.fail(f"{path}.path", img, "an image path that does not end in"
                         " ';data_plane=off' (the daemon would take that for the device's"
                         " data plane switch)")
            return None
        if img is not None and (why := _image_problem(img, state_dir)) is not None:
            checker.fail(f"{path}.path", img, why)
            return None
        return None if img is None else (("path", img),)

    @classmethod
    def config_string(
        cls, options: tuple[tuple[str, str], ...], items: tuple[tuple[str, str], ...]
    ) -> str:
        """The image path alone (tcmu-runner's file handler's form): ``raw//var/lib/d.img``."""
        return dict(options)["path"]

    @classmethod
    def device_image(cls, device: Device) -> str | None:
        return os.path.realpath(device.options_dict()["path"])

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        if not cfgstring.startswith("/"):
            raise ConfigError(
                f"raw: config string {cfgstring!r}: expected the absolute path of the image"
            )
        if cfgstring.endswith("/"):
            raise ConfigError(f"raw: config string {cfgstring!r}: expected a file, not a directory")
        # what exists must be able to hold the disk (targetcli asks before it creates)
        if (kind := _other_node(cfgstring)) is not None:
            raise ConfigError(f"raw: image {cfgstring}: a {kind}; expected a regular file or a "
                              "block device")

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
