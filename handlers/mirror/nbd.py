"""A minimal binding of libnbd's C API (Debian's ``libnbd0``) through cffi in ABI mode.

Only what the mirror's NBD legs need: connect by URI (``nbd://host[:port]/export``,
``nbd+unix:///export?socket=/path``, ``nbds://`` where libnbd was built with TLS), size, the
synchronous read / write / flush / trim commands, a batch of writes in flight at once
(`NbdClient.pwrite_many`), the server's ``can_*`` answers, and shutdown.
The NBD protocol itself is libnbd's: no protocol code here.

Our Python is not Debian's, so Debian's ``python3-libnbd`` cannot be imported; the library is
opened with ``dlopen`` the first time a handle is created, and a missing library is a
`NbdError` naming the package to install.

Threads: a libnbd handle is thread-safe (it has its own lock); the synchronous calls here wait
for their reply with the GIL released (cffi releases it around every foreign call), so
commands from several threads on one handle are serialised by libnbd, not by Python.

Errors: every failing call raises `NbdError` carrying libnbd's message (``nbd_get_error``) and
errno (``nbd_get_errno``, 0 when unknown); `NbdError` is an `OSError`, so a leg's failure reaches
the SCSI engine as an I/O error when nothing above catches it.
"""

from __future__ import annotations

import errno as _errno
import threading
from typing import Any

from tcmu_py.backend import NbdFunctions
from tcmu_py.lazy_ffi import LazyFFI

_CDEF = """
struct nbd_handle;
struct nbd_handle *nbd_create (void);
void nbd_close (struct nbd_handle *h);
const char *nbd_get_error (void);
int nbd_get_errno (void);
int nbd_connect_uri (struct nbd_handle *h, const char *uri);
int64_t nbd_get_size (struct nbd_handle *h);
int nbd_is_read_only (struct nbd_handle *h);
int nbd_can_flush (struct nbd_handle *h);
int nbd_can_fua (struct nbd_handle *h);
int nbd_can_trim (struct nbd_handle *h);
int nbd_can_multi_conn (struct nbd_handle *h);
int nbd_pread (struct nbd_handle *h, void *buf, size_t count, uint64_t offset, uint32_t flags);
int nbd_pwrite (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                uint32_t flags);
int nbd_flush (struct nbd_handle *h, uint32_t flags);
typedef struct {
  int (*callback) (void *user_data, int *error);
  void *user_data;
  void (*free) (void *user_data);
} nbd_completion_callback;
int64_t nbd_aio_pwrite (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                        nbd_completion_callback completion_callback, uint32_t flags);
int nbd_aio_command_completed (struct nbd_handle *h, uint64_t cookie);
int nbd_poll (struct nbd_handle *h, int timeout);
int nbd_aio_get_fd (struct nbd_handle *h);
unsigned nbd_aio_get_direction (struct nbd_handle *h);
int nbd_aio_notify_read (struct nbd_handle *h);
int nbd_aio_notify_write (struct nbd_handle *h);
int nbd_trim (struct nbd_handle *h, uint64_t count, uint64_t offset, uint32_t flags);
int nbd_shutdown (struct nbd_handle *h, uint32_t flags);
"""

#: ``LIBNBD_CMD_FLAG_FUA`` (libnbd.h): the write is durable when its reply arrives.
CMD_FLAG_FUA = 0x01
#: Longest wait (ms) of one `nbd_poll` in `NbdClient.pwrite_many` before it looks again.
POLL_MS = 10

LIBRARY = "libnbd.so.0"

_ffi: Any = LazyFFI(_CDEF)  # parsed on first use
_lib: Any = None
_lib_lock = threading.Lock()


class NbdError(OSError):
    """A libnbd call failed: ``str()`` is libnbd's message, ``errno`` its errno (EIO if none)."""


def library() -> Any:
    """The dlopened libnbd (loaded once)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen(LIBRARY)
            except OSError as exc:
                raise NbdError(
                    _errno.ENOENT,
                    f"cannot load {LIBRARY} ({exc}); expected Debian's libnbd0 package installed",
                ) from None
        return _lib


def _error(what: str) -> NbdError:
    lib = library()
    msg = lib.nbd_get_error()
    text = _ffi.string(msg).decode("utf-8", "replace") if msg != _ffi.NULL else "unknown error"
    code = lib.nbd_get_errno() or _errno.EIO
    return NbdError(code, f"{what}: {text}")


class NbdClient:
    """One connection to one NBD export. Methods raise `NbdError`; `close` is idempotent."""

    def __init__(self) -> None:
        lib = library()
        h = lib.nbd_create()
        if h == _ffi.NULL:
            raise _error("nbd_create")
        self._lib = lib
        self._h: Any = h
        self.uri = ""

    # -- connection ------------------------------------------------------------------------

    def connect_uri(self, uri: str) -> None:
        self.uri = uri
        if self._handle_call(self._lib.nbd_connect_uri, uri.encode()) == -1:
            raise _error(f"connect {uri}")

    def _handle_call(self, fn: Any, *args: Any) -> int:
        if self._h is None:
            raise NbdError(_errno.EBADF, f"{self.uri or 'nbd'}: handle closed")
        return int(fn(self._h, *args))

    def _check(self, what: str, rc: int) -> int:
        if rc == -1:
            raise _error(f"{self.uri} {what}")
        return rc

    def get_size(self) -> int:
        return self._check("get_size", self._handle_call(self._lib.nbd_get_size))

    def is_read_only(self) -> bool:
        return self._check("is_read_only", self._handle_call(self._lib.nbd_is_read_only)) == 1

    def can_flush(self) -> bool:
        return self._check("can_flush", self._handle_call(self._lib.nbd_can_flush)) == 1

    def can_fua(self) -> bool:
        return self._check("can_fua", self._handle_call(self._lib.nbd_can_fua)) == 1

    def can_trim(self) -> bool:
        return self._check("can_trim", self._handle_call(self._lib.nbd_can_trim)) == 1

    def can_multi_conn(self) -> bool:
        return self._check("can_multi_conn",
                           self._handle_call(self._lib.nbd_can_multi_conn)) == 1

    # -- commands ----------------------------------------------------------------------------

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill all of the writable `buf` from `offset`."""
        if len(buf) == 0:
            return
        rc = self._with_buffer(buf, True, lambda c: self._handle_call(
            self._lib.nbd_pread, c, len(buf), offset, 0))
        self._check(f"pread {len(buf)}@{offset}", rc)

    def pwrite(self, buf: memoryview | bytes | bytearray, offset: int, fua: bool = False) -> None:
        """Write all of `buf` at `offset`; with `fua` durable on return (the server must
        `can_fua`: libnbd refuses the flag otherwise)."""
        if len(buf) == 0:
            return
        flags = CMD_FLAG_FUA if fua else 0
        rc = self._with_buffer(buf, False, lambda c: self._handle_call(
            self._lib.nbd_pwrite, c, len(buf), offset, flags))
        self._check(f"pwrite {len(buf)}@{offset}", rc)

    def pwrite_many(self, writes: list[tuple[bytes, int, bool]]) -> list[NbdError | None]:
        """Write every ``(data, offset, fua)`` of `writes`, all in flight at once (libnbd's
        asynchronous commands on this connection), and wait for every answer. The server may
        run them in any order: the caller passes writes that do not overlap. Returns each
        write's error, or None. A connection that dies fails the writes not answered yet."""
        lib, h = self._lib, self._h
        if h is None:
            err = NbdError(_errno.EBADF, f"{self.uri or 'nbd'}: handle closed")
            return [err] * len(writes)
        results: list[NbdError | None] = [None] * len(writes)
        no_callback = _ffi.new("nbd_completion_callback *")[0]  # LIBNBD_NULL_COMPLETION
        views = []
        cookies: dict[int, int] = {}
        try:
            for i, (data, offset, fua) in enumerate(writes):
                c = _ffi.from_buffer(data)
                views.append(c)
                cookie = lib.nbd_aio_pwrite(h, c, len(data), offset, no_callback,
                                            CMD_FLAG_FUA if fua else 0)
                if cookie < 0:
                    results[i] = _error(f"{self.uri} pwrite {len(data)}@{offset}")
                else:
                    cookies[i] = cookie
            while cookies:
                for i, cookie in list(cookies.items()):
                    rc = lib.nbd_aio_command_completed(h, cookie)
                    if rc != 0:
                        del cookies[i]
                        if rc < 0:
                            data, offset, _ = writes[i]
                            results[i] = _error(f"{self.uri} pwrite {len(data)}@{offset}")
                # Bounded: another thread's synchronous call on this handle may have read
                # our replies between the check above and this poll, which would then wait
                # for traffic that never comes.
                if cookies and lib.nbd_poll(h, POLL_MS) < 0:
                    dead = _error(f"{self.uri} poll")
                    for i, cookie in cookies.items():  # answered meanwhile, or lost
                        if lib.nbd_aio_command_completed(h, cookie) != 1:
                            results[i] = dead
                    cookies.clear()
        finally:
            # Every command is answered or retired with the connection: libnbd holds no
            # pointer into the buffers any more.
            for c in views:
                _ffi.release(c)
        return results

    @staticmethod
    def _with_buffer(buf: Any, writable: bool, call: Any) -> int:
        """``call(c)`` with `c` a cffi view of `buf`, released before returning or raising:
        the caller's buffer is never left exported. (An error raised while the view lived
        would keep it, through its traceback's frames, for as long as the exception lives;
        if that ends in a reference cycle, the collector may clear the exported memoryview
        first: BufferError, then a crash.)"""
        c = _ffi.from_buffer(buf, require_writable=writable)
        try:
            return int(call(c))
        finally:
            _ffi.release(c)

    def flush(self) -> None:
        self._check("flush", self._handle_call(self._lib.nbd_flush, 0))

    def trim(self, length: int, offset: int) -> None:
        self._check(f"trim {length}@{offset}",
                    self._handle_call(self._lib.nbd_trim, length, offset, 0))

    # -- end ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Tell the server we are done (NBD_CMD_DISC after in-flight commands)."""
        self._check("shutdown", self._handle_call(self._lib.nbd_shutdown, 0))

    def detach(self) -> tuple[int, NbdFunctions]:
        """Give the handle away: its address and those of the functions a C user of it needs
        (`tcmu_py.backend.NativeKit.nbd_writer`, whose writer closes it). The object is
        unusable afterwards."""
        h, self._h = self._h, None
        if h is None:
            raise NbdError(_errno.EBADF, f"{self.uri or 'nbd'}: handle closed")
        lib = self._lib

        def addr(fn: Any) -> int:
            return int(_ffi.cast("uintptr_t", fn))

        return addr(h), NbdFunctions(
            aio_pwrite=addr(lib.nbd_aio_pwrite), aio_get_fd=addr(lib.nbd_aio_get_fd),
            aio_get_direction=addr(lib.nbd_aio_get_direction),
            aio_notify_read=addr(lib.nbd_aio_notify_read),
            aio_notify_write=addr(lib.nbd_aio_notify_write), close=addr(lib.nbd_close))

    def close(self) -> None:
        """Free the handle (closing the socket); the object is unusable afterwards."""
        h, self._h = self._h, None
        if h is not None:
            self._lib.nbd_close(h)

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(uri: str) -> NbdClient:
    """A client connected to `uri` (closed again if the connection fails)."""
    client = NbdClient()
    try:
        client.connect_uri(uri)
    except BaseException:
        client.close()
        raise
    return client
