"""The mirror's legs: a local image file, a block device or an NBD export behind one interface.

A leg moves bytes at absolute offsets of its whole store (the mirror keeps its metadata in the
last part of it, see `tcmu_py.handlers.mirror.mirror`). Methods raise `OSError` on failure
(`NbdError` is one); the mirror takes any OSError for the leg's failure.

Leg specs (config strings and YAML): an absolute path (an image file, created sparse and
extended to the size the mirror needs, or a block device, used as it is), or an NBD URI as
libnbd takes it: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=/path``, and the TLS
forms ``nbds://`` / ``nbds+unix://``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Protocol

from tcmu_py.backend import FanOutWriter, NativeKit
from tcmu_py.errors import ConfigError

from .nbd import NbdClient, connect

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")


class Leg(Protocol):
    """One copy of the mirror's data. Thread-safe."""

    #: The spec it was opened from (shown by status and in messages).
    spec: str
    #: Bytes the store holds (data area + metadata), a multiple of 4096.
    size: int
    #: Whether `write(..., fua=True)` costs less than write + `flush`.
    can_fua: bool

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill all of `buf` from `offset`."""

    def write(self, offset: int, buf: memoryview | bytes, fua: bool = False) -> None:
        """Write all of `buf` at `offset`; durable on return when `fua`."""

    def flush(self) -> None:
        """Make every completed write durable."""

    def close(self) -> None:
        """Release the store (idempotent)."""

    # Optional: ``write_many(writes: list[(offset, data, fua)]) -> list[OSError | None]``, the
    # writes (which never overlap) in flight at once; the mirror's leg worker then sends
    # queued writes together (`NbdLeg`). Without it they go one `write` at a time.


def check_spec(spec: str) -> None:
    """Raise ConfigError unless `spec` is an absolute path or an NBD URI."""
    if spec.startswith("/"):
        if spec.endswith("/"):
            raise ConfigError(f"mirror: leg {spec!r}: expected a file, not a directory")
        return
    if spec.startswith(NBD_SCHEMES):
        return
    raise ConfigError(
        f"mirror: leg {spec!r}: expected an absolute path (image file or block device) or an NBD "
        f"URI ({', '.join(s + '...' for s in NBD_SCHEMES)})"
    )


class FileLeg:
    """An image file (created sparse, extended to `size`) or a block device (at least `size`)."""

    can_fua = False

    def __init__(self, path: str, size: int) -> None:
        self.spec = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            mode = os.fstat(self.fd).st_mode
            if stat.S_ISBLK(mode):
                available = os.lseek(self.fd, 0, os.SEEK_END)
                if available < size:
                    raise ConfigError(f"mirror: leg {path}: block device of {available} bytes; "
                                      f"expected at least {size} (data and metadata)")
                self.size = available - available % 4096
            elif stat.S_ISREG(mode):
                if os.fstat(self.fd).st_size < size:
                    os.ftruncate(self.fd, size)
                st_size = os.fstat(self.fd).st_size
                self.size = st_size - st_size % 4096
            else:
                raise ConfigError(f"mirror: leg {path}: expected a regular file or a block "
                                  "device")
        except BaseException:
            os.close(self.fd)
            raise
        self._closed = False

    def read(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # past the end of a file that shrank: zeros
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def write(self, offset: int, buf: memoryview | bytes, fua: bool = False) -> None:
        view = memoryview(buf)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class NbdLeg:
    """An NBD export through libnbd. Its size must hold the data and the metadata."""

    def __init__(self, uri: str, size: int) -> None:
        self.spec = uri
        self.client: NbdClient = connect(uri)
        try:
            if self.client.is_read_only():
                raise ConfigError(f"mirror: leg {uri}: the server exports it read-only")
            total = self.client.get_size()
            if total < size:
                raise ConfigError(f"mirror: leg {uri}: export of {total} bytes; expected at "
                                  f"least {size} (data and metadata)")
            self.size = total - total % 4096
            self.can_fua = self.client.can_fua()
            self._can_flush = self.client.can_flush()
        except BaseException:
            self.client.close()
            raise
        self._lock = threading.Lock()
        self._writer: FanOutWriter | None = None
        #: Writers that died: freed at `close` (a declared extent may still name one).
        self._dead: list[FanOutWriter] = []
        #: Whether the server lets a second connection see this one's writes (multi-conn)
        self.multi_conn = self.client.can_multi_conn()

    def writer(self, kit: NativeKit, timeout: float) -> FanOutWriter | None:
        """A C writer on a connection of its own (`NativeKit.nbd_writer`), made on first
        use and again after one died; None when the server does not offer multi-conn (a
        flush on one connection would then not cover the other's writes) or the connection
        fails. Closed with the leg."""
        with self._lock:
            if self._writer is not None and not self._writer.dead:
                return self._writer
            if not self.multi_conn:
                return None
            if self._writer is not None:
                self._dead.append(self._writer)
                self._writer = None
            try:
                handle, fns = connect(self.spec).detach()
            except OSError:
                return None
            self._writer = kit.nbd_writer(handle, fns, timeout)
            return self._writer

    @property
    def writer_dead(self) -> bool:
        """Whether the C writer died: a write got no answer within its timeout, or its
        connection was lost."""
        w = self._writer
        return w is not None and w.dead

    def read(self, offset: int, buf: memoryview) -> None:
        self.client.pread(buf, offset)

    def write(self, offset: int, buf: memoryview | bytes, fua: bool = False) -> None:
        if fua and not self.can_fua:
            self.client.pwrite(buf, offset)
            self.flush()
        else:
            self.client.pwrite(buf, offset, fua=fua)

    def write_many(self, writes: list[tuple[int, bytes, bool]]) -> list[OSError | None]:
        """Each ``(offset, data, fua)`` of `writes` (which do not overlap), all in flight on
        the connection at once: one round trip for the batch instead of one per write. Returns
        each write's error or None. A server without FUA gets one flush after the batch,
        whose failure fails the writes that asked for FUA."""
        fua_ok = self.can_fua
        results: list[OSError | None] = list(self.client.pwrite_many(
            [(data, offset, fua and fua_ok) for offset, data, fua in writes]))
        if not fua_ok and any(fua for _, _, fua in writes):
            try:
                self.flush()
            except OSError as exc:
                results = [exc if fua and r is None else r
                           for (_, _, fua), r in zip(writes, results, strict=True)]
        return results

    def flush(self) -> None:
        # A server that offers no flush writes through (NBD protocol: NBD_FLAG_SEND_FLUSH).
        if self._can_flush:
            self.client.flush()

    def close(self) -> None:
        """Also frees the C writers: the mirror withdrew any extent naming them first."""
        with self._lock:
            for w in [*self._dead, *([self._writer] if self._writer else [])]:
                w.close()
            self._dead.clear()
            self._writer = None
            with contextlib.suppress(OSError):  # a server gone already needs no goodbye
                self.client.shutdown()
            self.client.close()


def open_leg(spec: str, size: int) -> Leg:
    """Open the leg named by `spec`, holding at least `size` bytes. Errors: ConfigError (a
    leg that can never serve), OSError (one that cannot now: unreachable, I/O error)."""
    check_spec(spec)
    if spec.startswith("/"):
        return FileLeg(spec, size)
    return NbdLeg(spec, size)
