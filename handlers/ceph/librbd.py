"""A minimal binding of librados' and librbd's C APIs (Debian's ``librados2`` / ``librbd1``,
declared in ``librados-dev`` / ``librbd-dev``) through cffi in ABI mode.

Only what the ``ceph`` handler and its test cluster need: a cluster handle from a conf file and
a client id, monitor commands (`Cluster.mon_command`, JSON in and out), I/O contexts with a
namespace, image create / open / size / resize / exclusive lock, the allocated extents of an
image (`Image.extents`), a watch on its header (`Image.watch`: another client resized it), and
the asynchronous I/O calls (`Image.aio`) whose completions resolve
`concurrent.futures.Future` objects.

Our Python is not Debian's, so ``python3-rados`` / ``python3-rbd`` cannot be imported; the
libraries are opened with ``dlopen`` on first use, and a missing one is a `RadosError` naming
the package to install. The declarations are parsed on first use too (`tcmu_py.lazy_ffi`).

Threads: librados and librbd handles are thread-safe. Asynchronous completions run on librbd's
own finisher thread: the callback there only takes the return value and resolves the Future
(with the GIL, taken by cffi for the callback); the buffers an operation reads or fills are
kept alive by the operation until then.

Errors: a failing call raises `RadosError`, an `OSError` with the positive errno librados /
librbd returned and a message naming the call.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from tcmu_py.lazy_ffi import LazyFFI

_CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
struct iovec { void *iov_base; size_t iov_len; };
typedef enum { RBD_LOCK_MODE_EXCLUSIVE = 0, RBD_LOCK_MODE_SHARED = 1 } rbd_lock_mode_t;

int rados_create2(rados_t *pcluster, const char *const clustername, const char * const name,
                  uint64_t flags);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
int rados_pool_reverse_lookup(rados_t cluster, int64_t id, char *buf, size_t maxlen);
int64_t rados_ioctx_get_id(rados_ioctx_t io);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);
void rados_set_pool_full_try(rados_ioctx_t io);
int rados_mon_command(rados_t cluster, const char **cmd, size_t cmdlen, const char *inbuf,
                      size_t inbuflen, char **outbuf, size_t *outbuflen, char **outs,
                      size_t *outslen);
void rados_buffer_free(char *buf);
int rados_getaddrs(rados_t cluster, char **addrs);

int rbd_create2(rados_ioctx_t io, const char *name, uint64_t size, uint64_t features,
                int *order);
int rbd_remove(rados_ioctx_t io, const char *name);
int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_by_id(rados_ioctx_t io, const char *id, rbd_image_t *image, const char *snap_name);
int rbd_get_id(rbd_image_t image, char *id, size_t id_len);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
typedef struct { uint64_t size; uint64_t obj_size; uint64_t num_objs; int order;
                 char block_name_prefix[24]; int64_t parent_pool; char parent_name[96]; }
    rbd_image_info_t;
int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize);
int rbd_get_features(rbd_image_t image, uint64_t *features);
int rbd_resize(rbd_image_t image, uint64_t size);
int rbd_pool_init(rados_ioctx_t io, bool force);
int rbd_namespace_create(rados_ioctx_t io, const char *namespace_name);
int rbd_namespace_exists(rados_ioctx_t io, const char *namespace_name, bool *exists);
int rbd_is_exclusive_lock_owner(rbd_image_t image, int *is_owner);
int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode);
int rbd_lock_release(rbd_image_t image);
int rbd_lock_get_owners(rbd_image_t image, rbd_lock_mode_t *lock_mode, char **lock_owners,
                        size_t *max_lock_owners);
void rbd_lock_get_owners_cleanup(char **lock_owners, size_t lock_owner_count);
int rbd_flush(rbd_image_t image);

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int rbd_aio_readv(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                  rbd_completion_t c);
int rbd_aio_writev(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                   rbd_completion_t c);
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int rbd_aio_writesame(rbd_image_t image, uint64_t off, size_t len, const char *buf,
                      size_t data_len, rbd_completion_t c, int op_flags);
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags);
ssize_t rbd_aio_compare_and_write(rbd_image_t image, uint64_t off, size_t len,
                                  const char *cmp_buf, const char *buf, rbd_completion_t c,
                                  uint64_t *mismatch_off, int op_flags);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
int rbd_diff_iterate2(rbd_image_t image, const char *fromsnapname, uint64_t ofs, uint64_t len,
                      uint8_t include_parent, uint8_t whole_object,
                      int (*cb)(uint64_t, size_t, int, void *), void *arg);
typedef enum { RBD_MIRROR_IMAGE_DISABLING = 0, RBD_MIRROR_IMAGE_ENABLED = 1,
               RBD_MIRROR_IMAGE_DISABLED = 2 } rbd_mirror_image_state_t;
typedef struct { char *global_id; rbd_mirror_image_state_t state; bool primary; }
    rbd_mirror_image_info_t;
int rbd_mirror_image_get_info(rbd_image_t image, rbd_mirror_image_info_t *mirror_image_info,
                              size_t info_size);
void rbd_mirror_image_get_info_cleanup(rbd_mirror_image_info_t *mirror_image_info);
typedef void (*rbd_update_callback_t)(void *arg);
int rbd_update_watch(rbd_image_t image, uint64_t *handle, rbd_update_callback_t watch_cb,
                     void *arg);
int rbd_update_unwatch(rbd_image_t image, uint64_t handle);
"""

#: rbd/features.h: the features of a new image (layering, exclusive-lock, object-map,
#: fast-diff, deep-flatten: ``rbd create``'s defaults).
FEATURE_LAYERING = 1 << 0
FEATURE_EXCLUSIVE_LOCK = 1 << 2
FEATURE_OBJECT_MAP = 1 << 3
FEATURE_FAST_DIFF = 1 << 4
FEATURE_DEEP_FLATTEN = 1 << 5
#: librbd's RBD_MAX_OBJECT_MAP_OBJECT_COUNT: the most objects an image with an object map has.
OBJECT_MAP_MAX_OBJECTS = 256_000_000
#: The object size of the images `IoCtx.create_image` makes (order 22: 4 MiB), whatever
#: ``rbd default order`` the cluster's conf sets.
CREATE_ORDER = 22
#: The largest image `IoCtx.create_image` makes: 0.95 PiB.
MAX_CREATE_SIZE = OBJECT_MAP_MAX_OBJECTS << CREATE_ORDER
FEATURES_DEFAULT = (FEATURE_LAYERING | FEATURE_EXCLUSIVE_LOCK | FEATURE_OBJECT_MAP
                    | FEATURE_FAST_DIFF | FEATURE_DEEP_FLATTEN)
#: librbd.h: rbd_aio_write_zeroes's flag to write the zeros, deallocating nothing.
WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0
LOCK_MODE_EXCLUSIVE = 0

LIBRADOS = "librados.so.2"
LIBRBD = "librbd.so.1"

_ffi: Any = LazyFFI(_CDEF)
_libs: dict[str, Any] = {}
_lib_lock = threading.Lock()


class RadosError(OSError):
    """A librados / librbd call failed: ``errno`` is the (positive) error, ``str()`` names the
    call."""


class ConfError(RadosError):
    """`Cluster` could not read its conf file (it does not parse: librados says EINVAL),
    before any contact with the cluster."""


def _library(name: str, package: str) -> Any:
    with _lib_lock:
        if name not in _libs:
            try:
                _libs[name] = _ffi.dlopen(name)
            except OSError as exc:
                raise RadosError(_errno.ENOENT, f"cannot load {name} ({exc}); expected "
                                 f"Debian's {package} package installed") from None
        return _libs[name]


def rados() -> Any:
    return _library(LIBRADOS, "librados2")


def rbd() -> Any:
    return _library(LIBRBD, "librbd1")


#: `aio_addresses`' keys (the fields of `tcmu_py.backend.RbdExtent`) and librbd's functions.
AIO_FUNCTIONS = {
    "create_completion": "rbd_aio_create_completion",
    "aio_readv": "rbd_aio_readv",
    "aio_writev": "rbd_aio_writev",
    "aio_get_return_value": "rbd_aio_get_return_value",
    "aio_release": "rbd_aio_release",
}


def aio_addresses() -> dict[str, int]:
    """The C addresses of librbd's asynchronous I/O functions (`AIO_FUNCTIONS`), for C code
    that calls them without linking librbd (the native loop: `tcmu_py.backend.RbdExtent`). In
    ABI mode a function of the ``dlopen``ed library is a function-pointer cdata, so casting it
    to ``uintptr_t`` gives the address ``dlsym`` would."""
    lib = rbd()
    return {key: int(_ffi.cast("uintptr_t", getattr(lib, name)))
            for key, name in AIO_FUNCTIONS.items()}


def check(rc: int, what: str) -> int:
    """`rc` when it is 0 or more, else `RadosError` for ``-rc``."""
    if rc < 0:
        raise RadosError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class Cluster:
    """A connected librados handle (``rados_create2`` + conf file + ``rados_connect``).

    `conf`: the ceph.conf to read; `client`: the client's id, ``admin`` or ``iscsi.gw1``, or
    its entity name, ``client.admin``;
    `options`: more ``rados_conf_set`` settings (``keyring``, ``rados_osd_op_timeout`` ...).
    """

    def __init__(self, conf: str, client: str = "admin", options: dict[str, str] | None = None,
                 *, connect_timeout: float = 30.0) -> None:
        # client_mount_timeout: whole seconds (librados refuses a fraction)
        lib = rados()
        # a client id may hold dots itself (``iscsi.gw1`` is client.iscsi.gw1)
        entity = client if client.startswith("client.") else f"client.{client}"
        h = _ffi.new("rados_t *")
        check(lib.rados_create2(h, b"ceph", entity.encode(), 0), f"rados_create2 {entity}")
        self._lib = lib
        self._h: Any = h[0]
        self.conf = conf
        self.client = entity
        try:
            rc = lib.rados_conf_read_file(self._h, conf.encode())
            if rc < 0:
                raise ConfError(-rc, f"read conf {conf}: {os.strerror(-rc)}")
            mount = str(max(1, round(connect_timeout)))
            settings = {"client_mount_timeout": mount, **(options or {})}
            for key, value in settings.items():
                check(lib.rados_conf_set(self._h, key.encode(), value.encode()),
                      f"conf set {key}={value}")
            check(lib.rados_connect(self._h), f"connect to the cluster of {conf} as {entity}")
        except BaseException:
            self.shutdown()
            raise

    def mon_command(self, cmd: dict[str, Any], inbuf: bytes = b"") -> tuple[Any, str]:
        """Run one monitor command (the JSON the ``ceph`` tool sends); returns (the output
        parsed as JSON, or the raw text if it is not JSON; the status string). Raises
        `RadosError` when the monitor answers an error."""
        cmdbuf = _ffi.new("char[]", json.dumps(cmd).encode())
        cmds = _ffi.new("const char *[1]", [cmdbuf])
        outbuf = _ffi.new("char **")
        outlen = _ffi.new("size_t *")
        outs = _ffi.new("char **")
        outslen = _ffi.new("size_t *")
        rc = self._lib.rados_mon_command(self._h, cmds, 1, inbuf, len(inbuf), outbuf, outlen,
                                         outs, outslen)
        out = bytes(_ffi.buffer(outbuf[0], outlen[0])) if outbuf[0] != _ffi.NULL else b""
        status = (bytes(_ffi.buffer(outs[0], outslen[0])).decode("utf-8", "replace")
                  if outs[0] != _ffi.NULL else "")
        for p in (outbuf[0], outs[0]):
            if p != _ffi.NULL:
                self._lib.rados_buffer_free(p)
        if rc < 0:
            raise RadosError(-rc, f"mon command {cmd.get('prefix')}: {os.strerror(-rc)}: "
                             f"{status}")
        text = out.decode("utf-8", "replace")
        try:
            return (json.loads(text) if text.strip() else None), status
        except ValueError:
            return text, status

    def ioctx(self, pool: str, namespace: str = "") -> IoCtx:
        return IoCtx(self, pool, namespace)

    def address(self) -> str:
        """This client's address as the cluster sees it (what ``ceph osd blocklist`` takes)."""
        out = _ffi.new("char **")
        check(self._lib.rados_getaddrs(self._h, out), "rados_getaddrs")
        try:
            return str(_ffi.string(out[0]).decode())
        finally:
            self._lib.rados_buffer_free(out[0])

    def pool_id_exists(self, pool_id: int) -> bool:
        """Whether the cluster has the pool of id `pool_id` (renamed or not): looked up in the
        map this client holds, and only when it is not there, in the monitors' latest map
        (librados asks for it and waits: not on librbd's callback threads). An error other
        than "no such pool" counts as existing (nothing is known)."""
        buf = _ffi.new("char[]", 256)
        return int(self._lib.rados_pool_reverse_lookup(self._h, pool_id, buf, 256)) \
            != -_errno.ENOENT

    def shutdown(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            self._lib.rados_shutdown(h)


class IoCtx:
    """An I/O context on one pool (by name) and namespace, its operations marked *full try*
    (``rados_set_pool_full_try``; librbd copies the flag to the images opened with it): on a
    pool at its quota or full, an OSD then answers an operation that would store more with
    EDQUOT / ENOSPC at once and carries out the others (overwrites in place, deletions), where
    librados would hold every write until the pool had room (measured: a write, an overwrite,
    a discard and a flush each waited ``osd_op_timeout``; with the flag a new write fails at
    once, the rest succeed)."""

    def __init__(self, cluster: Cluster, pool: str, namespace: str = "") -> None:
        p = _ffi.new("rados_ioctx_t *")
        check(cluster._lib.rados_ioctx_create(cluster._h, pool.encode(), p),
              f"open pool {pool!r}")
        self._lib = cluster._lib
        self._h: Any = p[0]
        self.pool = pool
        self.namespace = namespace
        if namespace:
            self._lib.rados_ioctx_set_namespace(self._h, namespace.encode())
        self._lib.rados_set_pool_full_try(self._h)

    @property
    def pool_id(self) -> int:
        """The pool's id (it stays when the pool is renamed)."""
        return int(self._lib.rados_ioctx_get_id(self._h))

    def namespace_exists(self, namespace: str) -> bool:
        out = _ffi.new("bool *")
        check(rbd().rbd_namespace_exists(self._h, namespace.encode(), out),
              f"namespace_exists {self.pool}/{namespace}")
        return bool(out[0])

    def namespace_create(self, namespace: str) -> None:
        check(rbd().rbd_namespace_create(self._h, namespace.encode()),
              f"create namespace {self.pool}/{namespace}")

    def pool_init(self) -> None:
        check(rbd().rbd_pool_init(self._h, False), f"rbd pool init {self.pool}")

    def create_image(self, name: str, size: int, features: int = FEATURES_DEFAULT) -> None:
        """Create image `name` of `size` bytes, 4 MiB objects (`CREATE_ORDER`, given: order 0
        would take the conf's ``rbd default order``, and with it another size limit) and
        `features` (``rbd create``'s defaults). ValueError for a size above `MAX_CREATE_SIZE`,
        which librbd (16.2) either refuses or, when the object count overflows 64 bits (sizes
        within an object of 2**64), makes an image whose first write aborts the process."""
        if size > MAX_CREATE_SIZE:
            raise ValueError(f"{size} bytes is above {MAX_CREATE_SIZE} ({OBJECT_MAP_MAX_OBJECTS} "
                             "objects of 4 MiB, the object map's limit)")
        order = _ffi.new("int *", CREATE_ORDER)
        check(rbd().rbd_create2(self._h, name.encode(), size, features, order),
              f"create image {self.pool}/{name}")

    def remove_image(self, name: str) -> None:
        check(rbd().rbd_remove(self._h, name.encode()), f"remove image {self.pool}/{name}")

    def open_image(self, name: str, image_id: str | None = None) -> Image:
        """The image `name`, or with `image_id` the image of that id (whatever its name is
        now: ``rbd rename`` keeps the id; `name` then only names it in messages)."""
        return Image(self, name, image_id)

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            self._lib.rados_ioctx_destroy(h)


#: `_Op.value` by default: the Future gives librbd's return value.
RETURN_VALUE: Any = object()


class _Op:
    """One asynchronous operation in flight: its Future, and every C object librbd may touch
    until the completion callback ran (buffers, iovecs, the mismatch offset). With `value`
    set, the Future resolves to it instead of librbd's return value; with `map_error`, a
    failure is ``map_error(RadosError)`` (the device's sense) instead of the `RadosError`: the
    caller gets its final answer from this one Future, with no second Future chained to it."""

    __slots__ = ("future", "keep", "mismatch", "handle", "value", "map_error", "expect")

    def __init__(self, value: Any = RETURN_VALUE, map_error: Any = None,
                 expect: int | None = None) -> None:
        self.future: Future[Any] = Future()
        self.keep: list[Any] = []
        self.mismatch: Any = None
        self.handle: Any = None
        self.value = value
        self.map_error = map_error
        #: The return value a success must have (a read's byte count: librbd clips a read at
        #: the image's end and reports the bytes it read, leaving the rest of the buffers as
        #: they were; -1 for a write, whatever librbd returns): otherwise the error ERANGE,
        #: as is EINVAL (an operation starting past the image's end) for either.
        self.expect = expect


#: Operations in flight: keeps each `_Op` (and its cffi handle) alive until its callback.
#: (A set's add and discard are atomic under the GIL: no lock on the I/O path.)
_inflight: set[_Op] = set()


def _complete(c: Any, arg: Any) -> None:
    op: _Op = _ffi.from_handle(arg)
    lib = rbd()
    rc = int(lib.rbd_aio_get_return_value(c))
    lib.rbd_aio_release(c)
    _inflight.discard(op)
    # Break op <-> handle and drop the buffers now, by reference counting: left to the cycle
    # collector, a cffi view could be cleared after the memoryview it exports (BufferError,
    # then a crash in the collector).
    op.handle = None
    op.keep.clear()
    expect = op.expect
    short = expect is not None and expect >= 0 and 0 <= rc != expect
    if short or (expect is not None and rc == -_errno.EINVAL):
        # A read short of its buffers, or a read or write librbd refuses as starting past
        # the image's end (EINVAL): the image is smaller than the range, shrunk by another
        # client. (librbd clips a write crossing the end and says nothing.)
        rc = -_errno.ERANGE
    if rc < 0:
        err: BaseException = RadosError(-rc, os.strerror(-rc))
        if rc == -_errno.EILSEQ and op.mismatch is not None:
            err.mismatch = int(op.mismatch[0])  # type: ignore[attr-defined]
        if op.map_error is not None:
            err = op.map_error(err)
        op.future.set_exception(err)
    else:
        op.future.set_result(rc if op.value is RETURN_VALUE else op.value)


def _extent(offset: int, length: int, exists: int, arg: Any) -> int:
    out: _Extents = _ffi.from_handle(arg)
    out.runs.append((int(offset), int(length), bool(exists)))
    # A negative return stops the iteration (rbd_diff_iterate2 returns it): enough runs.
    return -_errno.ECANCELED if len(out.runs) >= out.limit else 0


class _Extents:
    __slots__ = ("runs", "limit")

    def __init__(self, limit: int) -> None:
        self.runs: list[tuple[int, int, bool]] = []
        self.limit = limit


#: Watch callbacks by handle: each stays referenced while its watch is registered.
_watchers: dict[tuple[int, int], Any] = {}


def _updated(arg: Any) -> None:
    fn = _ffi.from_handle(arg)
    try:
        fn()
    except Exception:  # noqa: BLE001 - never unwind into librbd's thread
        import logging
        logging.getLogger(__name__).exception("image watch callback failed")


#: The C callbacks made of `_complete`, `_extent` and `_updated` (`_callback`), kept for the
#: life of the process: librbd may call one as long as any operation or watch is registered.
_callbacks: dict[Any, Any] = {}
_CALLBACK_TYPES = {_complete: "void(rbd_completion_t, void *)",
                   _extent: "int(uint64_t, size_t, int, void *)",
                   _updated: "void(void *)"}


def _callback(fn: Any) -> Any:
    """The C function pointer librbd calls for `fn`, made once (under `_lib_lock`: a second
    one made by a racing thread and then dropped would leave librbd a dangling pointer)."""
    made = _callbacks.get(fn)
    if made is None:
        with _lib_lock:
            made = _callbacks.get(fn)
            if made is None:
                made = _callbacks[fn] = _ffi.callback(_CALLBACK_TYPES[fn])(fn)
    return made


class Image:
    """An open RBD image. The ``aio_*`` methods start an operation and return a Future of its
    result (bytes moved, or 0), failing with `RadosError`; the caller's buffers must stay
    valid until the Future resolves (the Future holds cffi views of them, not copies)."""

    def __init__(self, ioctx: IoCtx, name: str, image_id: str | None = None) -> None:
        lib = rbd()
        p = _ffi.new("rbd_image_t *")
        where = f"{ioctx.pool}/{ioctx.namespace + '/' if ioctx.namespace else ''}{name}"
        if image_id is None:
            check(lib.rbd_open(ioctx._h, name.encode(), p, _ffi.NULL), f"open image {where}")
        else:
            check(lib.rbd_open_by_id(ioctx._h, image_id.encode(), p, _ffi.NULL),
                  f"open image {where} by its id {image_id}")
        self._lib = lib
        self._h: Any = p[0]
        self.name = name

    # -- metadata ---------------------------------------------------------------------------

    @property
    def address(self) -> int:
        """The ``rbd_image_t`` as an address (for C code: valid until `close`)."""
        return int(_ffi.cast("uintptr_t", self._h))

    def size(self) -> int:
        out = _ffi.new("uint64_t *")
        check(self._lib.rbd_get_size(self._h, out), f"get_size {self.name}")
        return int(out[0])

    def object_size(self) -> int:
        """The image's object size in bytes (``rbd info``'s order)."""
        info = _ffi.new("rbd_image_info_t *")
        check(self._lib.rbd_stat(self._h, info, _ffi.sizeof("rbd_image_info_t")),
              f"stat {self.name}")
        return int(info.obj_size)

    def max_size(self) -> int:
        """The largest size librbd can serve this image at: with an object map,
        `OBJECT_MAP_MAX_OBJECTS` of its objects (librbd resizes past it, then aborts the
        process at the next write); without one, a whole object below 2**64."""
        obj = self.object_size()
        if self.features() & FEATURE_OBJECT_MAP:
            return OBJECT_MAP_MAX_OBJECTS * obj
        return (1 << 64) - 2 * obj

    def features(self) -> int:
        out = _ffi.new("uint64_t *")
        check(self._lib.rbd_get_features(self._h, out), f"get_features {self.name}")
        return int(out[0])

    def resize(self, size: int) -> None:
        check(self._lib.rbd_resize(self._h, size), f"resize {self.name} to {size}")

    def lock_acquire(self) -> None:
        """Take the exclusive lock (``RBD_LOCK_MODE_EXCLUSIVE``); fails (EROFS / EBUSY) when
        another client holds it and does not give it up."""
        check(self._lib.rbd_lock_acquire(self._h, LOCK_MODE_EXCLUSIVE),
              f"acquire the exclusive lock of {self.name}")

    def lock_release(self) -> None:
        check(self._lib.rbd_lock_release(self._h), f"release the lock of {self.name}")

    def is_lock_owner(self) -> bool:
        out = _ffi.new("int *")
        check(self._lib.rbd_is_exclusive_lock_owner(self._h, out), f"lock owner {self.name}")
        return bool(out[0])

    def lock_owners(self) -> list[str]:
        """The clients holding the image's lock, as librbd names them: their addresses
        (``127.0.0.1:0/3421580341``, what ``ceph osd blocklist add`` takes), maybe none."""
        mode = _ffi.new("rbd_lock_mode_t *")
        owners = _ffi.new("char *[8]")
        count = _ffi.new("size_t *", 8)
        rc = self._lib.rbd_lock_get_owners(self._h, mode, owners, count)
        if rc == -_errno.ENOENT:
            return []
        check(rc, f"lock owners of {self.name}")
        names = [_ffi.string(owners[i]).decode() for i in range(count[0])]
        self._lib.rbd_lock_get_owners_cleanup(owners, count[0])
        return names

    def image_id(self) -> str:
        """The image's id in its pool: what stays when the image is renamed."""
        buf = _ffi.new("char[]", 128)
        check(self._lib.rbd_get_id(self._h, buf, 128), f"id of {self.name}")
        return str(_ffi.string(buf).decode())

    def mirror_non_primary(self) -> bool:
        """Whether rbd-mirror mirrors the image and this copy is not the primary (read-only
        here: another cluster's copy takes the writes). False if mirroring is off for it, or
        librbd cannot say."""
        info = _ffi.new("rbd_mirror_image_info_t *")
        if self._lib.rbd_mirror_image_get_info(self._h, info, _ffi.sizeof(info[0])) < 0:
            return False
        try:
            return info.state == 1 and not info.primary  # RBD_MIRROR_IMAGE_ENABLED
        finally:
            self._lib.rbd_mirror_image_get_info_cleanup(info)

    def flush(self) -> None:
        check(self._lib.rbd_flush(self._h), f"flush {self.name}")

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int, bool]]:
        """The image's data extents in ``[offset, offset + length)`` as librbd reports them
        (``rbd_diff_iterate2`` from the image's creation, parent included, ``whole_object`` 0;
        16.2 still reports per object the span from its start to the end of its data):
        ``(offset, length, exists)`` in ascending order, at most `limit` of them. Bytes in no
        extent, or in one with ``exists`` False, hold no data (read zeros).
        Costs one request per RADOS object of the range."""
        out = _Extents(max(limit, 1))
        handle = _ffi.new_handle(out)
        rc = self._lib.rbd_diff_iterate2(self._h, _ffi.NULL, offset, length, 1, 0,
                                         _callback(_extent), handle)
        if rc != -_errno.ECANCELED:
            check(rc, f"diff_iterate {self.name}")
        return out.runs

    def watch(self, callback: Any) -> int:
        """Call ``callback()`` (on a librbd thread, which it must not block on librbd) whenever
        the image's header changes: a resize by another client, a snapshot, a lock change.
        Returns the handle for `unwatch`."""
        arg = _ffi.new_handle(callback)
        out = _ffi.new("uint64_t *")
        check(self._lib.rbd_update_watch(self._h, out, _callback(_updated), arg),
              f"watch {self.name}")
        _watchers[(id(self), int(out[0]))] = arg
        return int(out[0])

    def unwatch(self, handle: int) -> None:
        try:
            check(self._lib.rbd_update_unwatch(self._h, handle), f"unwatch {self.name}")
        finally:
            _watchers.pop((id(self), handle), None)

    # -- asynchronous I/O -------------------------------------------------------------------

    def _start(self, what: str, call: Any, *, keep: Sequence[Any] = (),
               op: _Op | None = None) -> Future[Any]:
        """Create a completion, run ``call(image, completion)`` (a lambda around one
        ``rbd_aio_*``) and return the operation's Future; `keep` stays referenced until the
        callback ran."""
        op = op or _Op()
        op.keep.extend(keep)
        op.handle = _ffi.new_handle(op)
        c = _ffi.new("rbd_completion_t *")
        check(self._lib.rbd_aio_create_completion(op.handle, _callback(_complete), c),
              "rbd_aio_create_completion")
        _inflight.add(op)
        rc = call(self._h, c[0])
        if rc < 0:
            _inflight.discard(op)
            self._lib.rbd_aio_release(c[0])
            op.handle = None
            op.keep.clear()
            err: BaseException = RadosError(-rc, f"{what} {self.name}: {os.strerror(-rc)}")
            op.future.set_exception(err if op.map_error is None else op.map_error(err))
        return op.future

    @staticmethod
    def _iovecs(bufs: Sequence[memoryview], writable: bool) -> tuple[Any, list[Any]]:
        iov = _ffi.new("struct iovec[]", len(bufs))
        keep: list[Any] = [iov]
        for i, b in enumerate(bufs):
            c = _ffi.from_buffer(b, require_writable=writable)
            keep.append(c)
            iov[i].iov_base = c
            iov[i].iov_len = len(b)
        return iov, keep

    def aio_readv(self, offset: int, bufs: Sequence[memoryview], *, value: Any = RETURN_VALUE,
                  map_error: Any = None) -> Future[Any]:
        """Read into `bufs` from `offset`. The Future gives librbd's return value (bytes
        read), or `value` if given (None included); it fails with a `RadosError`, or what
        `map_error` makes of it (`_Op`): ERANGE when librbd read fewer bytes than `bufs` hold
        (the image ends first)."""
        iov, keep = self._iovecs(bufs, True)
        n = len(bufs)
        return self._start("readv", lambda h, c: self._lib.rbd_aio_readv(h, iov, n, offset, c),
                           keep=keep, op=_Op(value, map_error, sum(len(b) for b in bufs)))

    def aio_writev(self, offset: int, bufs: Sequence[memoryview], *, value: Any = RETURN_VALUE,
                   map_error: Any = None) -> Future[Any]:
        """Write `bufs` at `offset`; the Future as for `aio_readv` (ERANGE: starting past the
        image's end)."""
        iov, keep = self._iovecs(bufs, False)
        n = len(bufs)
        return self._start("writev", lambda h, c: self._lib.rbd_aio_writev(h, iov, n, offset, c),
                           keep=keep, op=_Op(value, map_error, -1))

    def aio_discard(self, offset: int, length: int) -> Future[int]:
        return self._start("discard",
                           lambda h, c: self._lib.rbd_aio_discard(h, offset, length, c))

    def aio_write_zeroes(self, offset: int, length: int, *, thick: bool = False) -> Future[int]:
        """Zero the range: deallocated where whole objects allow, else zeros written; with
        `thick`, zeros written everywhere and the range left allocated
        (``RBD_WRITE_ZEROES_FLAG_THICK_PROVISION``)."""
        flags = WRITE_ZEROES_FLAG_THICK_PROVISION if thick else 0
        return self._start(
            "write_zeroes",
            lambda h, c: self._lib.rbd_aio_write_zeroes(h, offset, length, c, flags, 0))

    def aio_writesame(self, offset: int, length: int, block: bytes) -> Future[int]:
        buf = _ffi.from_buffer(block)
        n = len(block)
        return self._start(
            "writesame",
            lambda h, c: self._lib.rbd_aio_writesame(h, offset, length, buf, n, c, 0),
            keep=[buf, block])

    def aio_compare_and_write(self, offset: int, compare: bytes, data: bytes) -> Future[int]:
        """Write `data` at `offset` only if the image holds `compare` there, atomically on the
        cluster. A miscompare fails with EILSEQ and the error's ``mismatch`` attribute holds
        librbd's offset of the first byte that differs — librbd 16.2 counts it from the start
        of the RADOS object holding `offset` (measured: 100 for byte 100 of a compare at image
        offset 1024, 4194404 for byte 100 at offset 4194304), not from `offset`."""
        cmp_c = _ffi.from_buffer(compare)
        data_c = _ffi.from_buffer(data)
        op = _Op()
        op.mismatch = mismatch = _ffi.new("uint64_t *")
        n = len(data)
        return self._start(
            "compare_and_write",
            lambda h, c: self._lib.rbd_aio_compare_and_write(h, offset, n, cmp_c, data_c, c,
                                                             mismatch, 0),
            keep=[cmp_c, data_c, compare, data], op=op)

    def aio_flush(self) -> Future[int]:
        return self._start("flush", lambda h, c: self._lib.rbd_aio_flush(h, c))

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            check(self._lib.rbd_close(h), f"close {self.name}")
