"""An RBD image as a SCSI disk: `RbdBackend` (the `BlockBackend`, synchronous) and
`CephDevice` (a `BlockDevice` whose hot commands complete asynchronously).

Theory of operation
-------------------
Plain READ and WRITE never reach Python while the device may serve (issue 15): the backend
declares its image as a `tcmu_py.backend.RbdExtent` (`RbdBackend.file_extent`), and the
runner's native loop submits them with ``rbd_aio_readv`` / ``rbd_aio_writev`` from C, the
completion callback completing the TCMU command in C, as tcmu-runner's ``rbd`` handler does.
The extent is withdrawn while the exclusive lock is another client's (every command then comes
here and answers NOT READY), and declared again when it is taken over (``extent_listener``).
What C does not take comes here: a READ/WRITE that failed in C (answered NOT READY at once
when librbd's errno says the cluster did not answer, `Command.native_error`; else run again
here, so that the sense below answers it), a FUA WRITE with the cache on, one overlapping a
command Python runs, and every other command. READ, WRITE (with FUA), SYNCHRONIZE CACHE,
UNMAP and COMPARE AND WRITE start ``rbd_aio_*`` operations and return a `Future` that librbd's
completion callback resolves: the runner completes the TCMU command from that callback, so
many commands are in flight with no thread waiting on any of them. Everything else (WRITE
SAME, VERIFY, EXTENDED COPY, WRITE AND VERIFY) goes through `BlockDevice` and the backend's
synchronous methods, which start the same operations and wait for them on the worker thread.

What the device promises, and why it is true:

- UNMAP and WRITE SAME with UNMAP use ``rbd_aio_write_zeroes``: librbd deallocates whole
  objects and writes zeros elsewhere, so an unmapped range always reads zeros (LBPRZ=1). (Plain
  ``rbd_aio_discard`` skips the parts smaller than ``rbd_discard_granularity_bytes``: it would
  not be honest with LBPRZ.) WRITE SAME of a zero block without UNMAP writes zeros and leaves
  the range allocated (the THICK_PROVISION flag; librbd's own write-same would deallocate it).
- COMPARE AND WRITE is librbd's own ``rbd_aio_compare_and_write``, atomic on the cluster: the
  OSD compares and writes in one transaction, against every other client too. librbd takes one
  512-byte sector per call, so MAXIMUM COMPARE AND WRITE LENGTH is 1 (512-byte blocks; larger
  blocks: no COMPARE AND WRITE). A miscompare is
  0Eh/1Dh/00h with INFORMATION = the offset of the first differing byte from the start of the
  compared data (SBC-4 5.3).
- GET LBA STATUS asks librbd which extents of the image hold data (``rbd_diff_iterate2``,
  parent included), at most `LBA_STATUS_WINDOW` bytes per command: the rest of the range is
  deallocated, and reads zeros (LBPRZ). librbd 16.2 reports, per RADOS object, the span from
  the object's start to the end of its data (measured: 8 blocks written at LBA 100 report LBAs
  0-107 mapped; a partial UNMAP inside an object leaves it mapped): "mapped" may be
  conservative, "deallocated" never is. An object UNMAP covers whole is removed: deallocated
  (on a clone whose parent has data there, still reported mapped: the walk includes the
  parent, which the clone's reads no longer reach; conservative too).
- The capacity follows the image: a resize through the kernel (RECONFIG, `resize`) grows the
  image when it is larger than the image, and never shrinks it (a device may be smaller than
  its image; what lies past its end stays). One made by another client (``rbd resize``) reaches
  the device through a watch on the image header: until the next command has looked at the
  image's size, the native loop hands every command to Python, so the very next one (a READ
  too) reports CAPACITY DATA HAS CHANGED with the new capacity (the kernel's ``dev_size``
  attribute keeps the old figure until set; TCMU passes every command through, so no command
  depends on it). A header change that leaves the size as it was (a snapshot, a lock change)
  changes nothing; a device smaller than its image keeps its size while the image holds it,
  follows it down when it is shrunk below, and grows back to its own size, no further. A
  command that arrives while the new size is taken waits for it; a READ that librbd answers
  short, or a READ or WRITE it refuses as starting past the end, is LBA OUT OF RANGE and has
  the device look at the size (so a shrink reaches it even if its watch failed).
- WCE follows librbd's cache (the config's ``rbd_cache``, off by default, whatever the
  device's ``write_cache``): with it, FUA writes and SYNCHRONIZE CACHE flush
  (``rbd_aio_flush``); without it every write is on the OSDs when acknowledged (WCE=0), so a
  killed daemon or another gateway on the image loses or misses nothing acknowledged, and
  SYNCHRONIZE CACHE still calls ``rbd_aio_flush`` (nothing to write back). A flush that fails
  once librbd's cache writes back is WRITE ERROR, not NOT READY (`RbdBackend.aio_flush`): librbd
  drops the writes it could not write back, and the retry NOT READY invites would succeed.

Errors: a cluster that cannot answer (ETIMEDOUT after ``osd_op_timeout``, ESHUTDOWN when this
client was blocklisted, ENOTCONN, EAGAIN) is NOT READY 02h/04h/01h, which initiators retry;
so is an operation librbd has not answered within ``osd_op_timeout`` of the command's arrival
(`bounded`, `RbdBackend.time_left`): librbd times out each RADOS operation, and a discard or
write-zeroes over several objects runs more than one in turn (two timeouts measured for two
objects), so the device keeps one timeout per command itself, counted from when the command
was taken from the ring as the kernel's ``cmd_time_out`` is (a command that waited for a worker
behind a WRITE SAME held by a stalled cluster has that much less, and none left is NOT READY at
once). A pool at its quota or full refuses a write that would store more with EDQUOT / ENOSPC
at once (the I/O contexts are *full try*, `librbd.IoCtx`): DATA PROTECT 07h/27h/07h (SPACE
ALLOCATION FAILED WRITE PROTECT, as a thin pool's), which initiators do not retry; overwrites
in place, UNMAP and SYNCHRONIZE CACHE go on (they waited ``osd_op_timeout`` and answered NOT
READY, retried for ever). A failure once the image's pool is deleted (`_gone`) makes the device
NOT READY 02h/04h/03h from then on, TEST UNIT READY included. Any other librbd error is MEDIUM
ERROR on reads and WRITE ERROR on writes. A device that does not hold the image's exclusive
lock (another client has it) answers NOT READY 02h/04h/03h to every medium access, with the
holder in the log, and tries to take the lock again every `LOCK_RETRY_INTERVAL` seconds: when
the holder releases it or dies (librbd breaks a dead client's lock), this device takes over and
serves. A client the cluster blocklisted (its lock broken by another gateway that took it over,
or an operator's ``ceph osd blocklist add``) can do nothing more: the first ESHUTDOWN from the
current image connects a new client every `RECONNECT_INTERVAL` seconds until one opens the
image, which takes the lock again (waiting for it as above) and serves; commands meanwhile
answer NOT READY 02h/04h/01h, and 02h/04h/03h once the new client finds the lock another's (a
standby).
The given-up client's handles are closed with the device.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from tcmu_py.backend import RbdExtent
from tcmu_py.buffers import slice_views
from tcmu_py.device.block import (
    MAX_UNMAP_BLOCK_DESCRIPTORS,
    BlockDevice,
)
from tcmu_py.device.command import Command
from tcmu_py.device.core import check_data_out, command
from tcmu_py.errors import ConfigError, DeviceUnavailable
from tcmu_py.handler import DeviceConfig
from tcmu_py.scsi import cdb as cdbs
from tcmu_py.scsi import sbc
from tcmu_py.scsi.constants import Opcode, ProvisioningType
from tcmu_py.scsi.sense import (
    CapacityDataChanged,
    InvalidFieldInCdb,
    LbaOutOfRange,
    MediumError,
    Miscompare,
    NotReady,
    NotReadyBecoming,
    NotReadyManualIntervention,
    ScsiError,
    SpaceAllocationFailed,
    WriteError,
    WriteProtected,
)
from tcmu_py.threadname import name_os_thread

from .config import CephConfig
from .librbd import (
    FEATURE_EXCLUSIVE_LOCK,
    Cluster,
    ConfError,
    Image,
    IoCtx,
    RadosError,
    aio_addresses,
)

log = logging.getLogger(__name__)

#: How much of the image one GET LBA STATUS examines (librbd asks one RADOS object at a time).
LBA_STATUS_WINDOW = 1 << 30

#: Seconds between attempts to take an exclusive lock another client holds.
LOCK_RETRY_INTERVAL = 5.0

#: Seconds between attempts to connect a new client once the cluster blocklisted this one.
RECONNECT_INTERVAL = 5.0

#: The one size librbd's compare-and-write takes (bytes, 512-aligned).
CAW_SECTOR = 512

#: librbd / librados errors that mean "the cluster cannot answer now": retryable NOT READY.
#: (Ceph reports a blocklisted client as ESHUTDOWN.)
UNAVAILABLE = frozenset({errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.EAGAIN,
                         errno.ECONNREFUSED})

#: Errors whose sense says what happened (`scsi_error`); after any other, the device looks
#: whether the image's pool still exists (`RbdBackend._check_pool_later`: librbd answers a
#: pool deleted under an open image with EPERM, ENOENT or EROFS, measured).
_OWN_SENSE = UNAVAILABLE | {errno.ERANGE, errno.EDQUOT, errno.ENOSPC, errno.EILSEQ}


def scsi_error(exc: BaseException, writing: bool) -> BaseException:
    """The sense a failed librbd operation answers with (module docstring); other exceptions
    pass through (the device's one converter turns them into HARDWARE ERROR)."""
    if isinstance(exc, ScsiError) or not isinstance(exc, OSError):
        return exc
    if exc.errno in UNAVAILABLE:
        return NotReadyBecoming(f"ceph cluster unavailable: {exc}")
    if exc.errno == errno.ERANGE:
        # A READ librbd answered short, or a READ or WRITE it refused as starting past the
        # image's end (`librbd._complete`): the image ends before the range, shrunk by another
        # client before this device took the new size (SBC-4 4.5).
        return LbaOutOfRange(f"ceph image shorter than the device's capacity: {exc}")
    if exc.errno in (errno.EDQUOT, errno.ENOSPC) and writing:
        # The pool is at its quota, or full (its OSDs past their full ratio): an operation
        # that would store more is refused at once (`librbd.IoCtx`: full try), with nothing
        # stored; overwrites in place and deallocations still succeed. SBC-4 4.7.3.6: a thin
        # provisioned disk out of space answers DATA PROTECT, which initiators do not retry.
        return SpaceAllocationFailed(f"ceph pool full: {exc}")
    if exc.errno == errno.EROFS and writing:
        # librbd refuses writes while another client holds the exclusive lock of an image
        # this device shares (lock=shared): write protected, not a medium defect
        return WriteProtected(f"ceph image read-only for this client: {exc}")
    return WriteError(str(exc)) if writing else MediumError(str(exc))


class _Deadlines:
    """One thread for every ceph device in the process: each Future given to `add` that is
    still pending at its deadline fails with the exception its `make` returns. A Future
    resolved first keeps its outcome (the later attempt to fail it does nothing)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Future[Any], Callable[[], BaseException]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, fut: Future[Any], seconds: float, make: Callable[[], BaseException]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), fut, make))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ceph-deadlines",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, fut, make = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
            if not fut.done():
                with contextlib.suppress(InvalidStateError):  # resolved meanwhile
                    fut.set_exception(make())


_deadlines = _Deadlines()


def bounded(fut: Future[Any], seconds: float, what: str) -> Future[Any]:
    """A Future of `fut`'s outcome, or of NOT READY 02h/04h/01h (retryable) if `fut` has not
    resolved within `seconds`: one timeout per command, whatever librbd does in turn inside
    one operation (module docstring). librbd's operation goes on; its late outcome is
    dropped (a retried discard, write-zeroes or write-same writes the same again)."""
    out: Future[Any] = Future()

    def copy(f: Future[Any]) -> None:
        exc = f.exception()
        with contextlib.suppress(InvalidStateError):  # the deadline answered first
            if exc is None:
                out.set_result(f.result())
            else:
                out.set_exception(exc)

    fut.add_done_callback(copy)
    if not out.done():
        _deadlines.add(out, seconds, lambda: NotReadyBecoming(
            f"ceph cluster unavailable: {what}: no answer within {seconds:g} s"))
    return out


def when_all(futures: Sequence[Future[int]], result: Any, writing: bool,
             sense: Callable[[BaseException, bool], BaseException] = scsi_error) -> Future[Any]:
    """A Future of `result` once every one of `futures` resolved, or of the first failure's
    sense (`sense`: `scsi_error`, or a backend's `RbdBackend.sense`)."""
    out: Future[Any] = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one(_: Future[int]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(sense(errors[0], writing))  # type: ignore[arg-type]
        else:
            out.set_result(result)

    if not futures:
        out.set_result(result)
    for f in futures:
        f.add_done_callback(one)
    return out


def then(first: Future[Any], nxt: Callable[[], Future[Any]]) -> Future[Any]:
    """`first`, and when it succeeded, the Future `nxt()` starts (its result is the result)."""
    out: Future[Any] = Future()

    def step(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        try:
            second = nxt()
        except BaseException as e:  # noqa: BLE001 - carried by the Future
            out.set_exception(e)
            return
        second.add_done_callback(
            lambda g: out.set_exception(g.exception())  # type: ignore[arg-type]
            if g.exception() is not None else out.set_result(g.result()))

    first.add_done_callback(step)
    return out


class RbdBackend:
    """A `BlockBackend` over an open RBD image (`Unmap` with LBPRZ, `WriteSame`, `Resizable`,
    `Closable`, and `FileExtent` as an `RbdExtent`: the native loop calls librbd itself).
    Synchronous methods start librbd's asynchronous operations and wait; the device's
    asynchronous commands use `image` directly."""

    lbprz = True
    #: VPD B2h (SBC-4 6.6.4, 4.7.3.3): an RBD image is thin provisioned. Its objects are
    #: allocated by the writes that first reach them, UNMAP frees them, and a pool at its quota
    #: or full refuses new data (SPACE ALLOCATION FAILED WRITE PROTECT, `sense`).
    provisioning_type = ProvisioningType.THIN

    def __init__(self, cfg: CephConfig, cluster: Cluster, ioctx: IoCtx, image: Image,
                 size: int, block_size: int, image_size: int) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image
        #: The image's id: a new client opens the image by it (`_reconnect`), so an image
        #: renamed while open (``rbd rename``) is found again. None if librbd cannot say.
        self.image_id: str | None
        try:
            self.image_id = image.image_id()
        except RadosError:
            self.image_id = None
        self.size = size
        #: The image's size when last looked at (open, `resize`, a header change): a header
        #: change that leaves it as it was (a snapshot, a lock change) is not a resize.
        self.image_size = image_size
        self.block_size = block_size
        #: The size the device was made smaller than its image with (its config, a kernel
        #: resize), which it never grows past when the image grows; None: it follows the image.
        self.size_cap = self._cap(size, image_size)
        #: The flush promise (`BlockBackend`): only librbd's cache (``rbd_cache=1``) holds writes.
        self.write_cache = cfg.rbd_cache
        #: librbd's cache has switched to write-back (a flush succeeded; `aio_flush`).
        self._cache_writes_back = False
        #: Why medium access is refused (another client holds the exclusive lock), or None.
        self.not_ready: str | None = None
        #: Set by the device (`FileExtent`): called when `file_extent` changes (the lock).
        self.extent_listener: Callable[[], None] | None = None
        self._extent = RbdExtent(image.address, **aio_addresses())
        self._closing = threading.Event()
        self._retry: threading.Thread | None = None
        #: Set by the device: called (on the reconnecting thread) once `image` is the handle
        #: of a new client, so that it watches that image's header (`_reconnect`).
        self.reconnect_listener: Callable[[], None] | None = None
        #: Called (on librbd's completion thread) when a READ or WRITE failed as one past the
        #: image's end fails (ERANGE: a short read, or EINVAL from librbd): the image may have
        #: shrunk before the header watch said so; the device looks at its size before its
        #: next command.
        self.size_listener: Callable[[], None] | None = None
        #: The thread connecting a new client after this one was blocklisted, while it runs.
        self._reconnecting: threading.Thread | None = None
        #: That thread has connected, and another client holds the exclusive lock: the device
        #: is a standby until the holder lets go (NOT READY 04h/03h, as at open).
        self._standing_by = False
        #: When the command this thread runs was taken from the ring (`CephDevice.execute`):
        #: a wait is bounded by one ``osd_op_timeout`` from then (`time_left`).
        self._arrival = threading.local()
        #: The handles of clients given up after a blocklisting: closed with the backend,
        #: when nothing can be in flight on them any more (the device has stopped).
        self._retired: list[tuple[Image, IoCtx, Cluster]] = []
        self._state_lock = threading.Lock()
        #: The reconnect thread's new client was blocklisted as well (`take_lock`): it
        #: connects another (`_reconnect`).
        self._new_client_lost = False
        #: The thread looking whether the image's pool still exists (`_check_pool_later`).
        self._pool_check: threading.Thread | None = None
        #: Why the image is gone (`_gone`): for good, whatever the lock or a reconnect says.
        self._missing: str | None = None

    def sense(self, exc: BaseException, writing: bool, image: Image | None = None
              ) -> BaseException:
        """`scsi_error` of a failure of an operation on `image` (None: the current one). An
        ESHUTDOWN from the current image says the cluster blocklisted this client (another
        gateway broke its lock, or an operator): every later operation of this client fails
        too, so a new client is connected (`_blocklisted`). One from an image already given
        up is only that operation's."""
        if (isinstance(exc, OSError) and exc.errno == errno.ESHUTDOWN
                and (image is None or image is self.image)):
            self._blocklisted(exc)
        if (isinstance(exc, OSError) and exc.errno not in _OWN_SENSE
                and (image is None or image is self.image)):
            self._check_pool_later(exc)
        listener = self.size_listener
        if isinstance(exc, OSError) and exc.errno == errno.ERANGE and listener:
            listener()
        return scsi_error(exc, writing)

    def _check_pool_later(self, exc: BaseException) -> None:
        """After `exc` (an error without a sense of its own) from the current image: look, on
        a thread of its own (one at a time), whether the image's pool still exists (`_gone`
        if not). Not here: this runs on librbd's callback threads, and the lookup of a pool
        this client's map lacks waits for the monitors."""
        with self._state_lock:
            if self._pool_check is not None or self._missing or self._closing.is_set():
                return
            thread = threading.Thread(target=self._check_pool, args=(exc, self.cluster,
                                                                      self.ioctx.pool_id),
                                      name=f"poolcheck-{self.cfg.spec}", daemon=True)
            self._pool_check = thread
        thread.start()

    def _check_pool(self, exc: BaseException, cluster: Cluster, pool_id: int) -> None:
        name_os_thread()
        try:
            gone = not cluster.pool_id_exists(pool_id)
        finally:
            with self._state_lock:
                self._pool_check = None
        if gone:
            self._gone(exc)

    def _gone(self, exc: BaseException) -> None:
        """An operation on the open image failed (not for a reason with a sense of its own)
        and its pool (looked up by id: a rename is not this) is gone from the cluster: it was
        deleted under the image (librbd refuses to remove an image a client has open, not a
        pool; measured: writes then fail with EPERM, ENOENT or EROFS). Nothing brings it back:
        every command from then on, TEST UNIT READY included, answers NOT READY 02h/04h/03h
        (manual intervention) with the reason in the log and in ``tcmu-py status``, where each
        answered MEDIUM ERROR / WRITE ERROR while TEST UNIT READY said GOOD; the lock and
        reconnect threads stop."""
        why = (f"ceph image {self.cfg.spec}: its pool no longer exists in the cluster (deleted"
               f" under the open image: {exc}); expected the device removed, or the pool and "
               "image restored and the device opened again")
        with self._state_lock:
            if self._missing is not None:
                return
            self._missing = why
        log.error("%s", why)
        self._set_not_ready(why)

    def _blocklisted(self, exc: BaseException) -> None:
        with self._state_lock:
            if self._reconnecting is not None or self._closing.is_set():
                return
            thread = threading.Thread(target=self._reconnect, name=f"reconnect-{self.cfg.spec}",
                                      daemon=True)
            self._reconnecting = thread
            self._standing_by = False
        log.error("ceph image %s: the cluster blocklisted this client (%s); connecting a new "
                  "one", self.cfg.spec, exc)
        # Often on librbd's callback thread (a failed operation's completion, `sense`): the
        # native loop is told from another, as for a header change (`_set_not_ready`).
        self._set_not_ready(f"ceph image {self.cfg.spec}: the cluster blocklisted this client;"
                            " reconnecting", tell_later=True)
        thread.start()

    def _reconnect(self) -> None:
        """Connect a new client and open the image again, every `RECONNECT_INTERVAL` seconds
        until it works or the backend closes; then take the lock again (``lock=exclusive``: at
        once, else waiting for it as `start_lock_retry` does, `_wait_for_lock`) and serve. The
        blocklisted client's handles are kept until `close`: operations of the device may still
        be in flight on them."""
        name_os_thread()
        while not self._closing.wait(RECONNECT_INTERVAL) and self._missing is None:
            try:
                cluster = _connect(self.cfg)
                try:
                    ioctx, image = _open_image(self.cfg, cluster, 0, self.image_id)
                except BaseException:
                    cluster.shutdown()
                    raise
            except (OSError, ConfigError) as exc:
                log.warning("ceph image %s: reconnecting: %s; trying again in %g s",
                            self.cfg.spec, exc, RECONNECT_INTERVAL)
                continue
            with self._state_lock:
                if self._closing.is_set():
                    image.close()
                    ioctx.close()
                    cluster.shutdown()
                    return
                self._retired.append((self.image, self.ioctx, self.cluster))
                self.cluster, self.ioctx, self.image = cluster, ioctx, image
                self._extent = RbdExtent(image.address, **aio_addresses())
            listener = self.reconnect_listener
            if listener is not None:
                listener()
            if self.cfg.lock == "exclusive":
                if not self.take_lock() and not self._new_client_lost:
                    # Connected; another gateway holds the lock (it broke ours): a standby,
                    # NOT READY 04h/03h as at open, not 04h/01h (nothing is on its way: an
                    # initiator retrying "becoming ready" would not fail over).
                    self._standing_by = True
                    log.warning("ceph image %s: reconnected as a new client; the exclusive "
                                "lock is another's: standing by", self.cfg.spec)
                    self._wait_for_lock(LOCK_RETRY_INTERVAL)
                if self._new_client_lost:
                    # This client was blocklisted too (an operator, or a gateway breaking
                    # locks): it can take no lock, ever. Another one, as after the first.
                    self._new_client_lost = False
                    with self._state_lock:
                        self._standing_by = False
                    log.error("ceph image %s: the cluster blocklisted the new client too; "
                              "connecting another one", self.cfg.spec)
                    self._set_not_ready(f"ceph image {self.cfg.spec}: the cluster blocklisted "
                                        "this client; reconnecting")
                    continue
                if self.not_ready is not None:
                    return  # closed before the lock was ours
            else:
                self._set_not_ready(None)
            with self._state_lock:
                self._reconnecting = None
                self._standing_by = False
            log.warning("ceph image %s: reconnected as a new client; serving", self.cfg.spec)
            return

    def take_lock(self) -> bool:
        """Try to take the image's exclusive lock once. On failure `not_ready` names the
        holder; on success it is cleared."""
        try:
            self.image.lock_acquire()
        except RadosError as exc:
            if exc.errno == errno.ESHUTDOWN and self._reconnecting is None:
                self._blocklisted(exc)  # a standby blocklisted: no lock with this client
                return False
            if exc.errno == errno.ESHUTDOWN and self._reconnecting is threading.current_thread():
                self._new_client_lost = True  # `_reconnect` connects another
                return False
            if self.image.mirror_non_primary():
                # librbd refuses the lock (EINVAL, EROFS) of a copy rbd-mirror keeps read-only
                self._set_not_ready(f"ceph image {self.cfg.spec}: a non-primary rbd-mirror "
                                    f"image, read-only in this cluster ({exc}); expected it "
                                    "promoted (`rbd mirror image promote`; the device then "
                                    "serves by itself), or lock=shared to read it")
                return False
            if not self._has_lock_feature():
                # Disabled while open (`rbd feature disable ... exclusive-lock`): librbd
                # refuses the lock (EINVAL) and no client holds one; serving would let this
                # gateway write beside the one that had it.
                self._set_not_ready(f"ceph image {self.cfg.spec}: its exclusive-lock feature "
                                    f"was disabled ({exc}), so lock=exclusive cannot keep "
                                    "other clients out; expected `rbd feature enable "
                                    f"{self.cfg.pool}/"
                                    f"{self.cfg.namespace + '/' if self.cfg.namespace else ''}"
                                    f"{self.cfg.image} exclusive-lock` (the device then "
                                    "takes the lock by itself), or lock=shared")
                return False
            try:
                owners = ", ".join(self.image.lock_owners()) or "another client"
            except RadosError:
                owners = "another client"
            self._set_not_ready(f"ceph image {self.cfg.spec}: the exclusive lock is held by "
                                f"{owners} ({exc}); expected it free, or lock=shared")
            return False
        self._set_not_ready(None)
        return True

    def _has_lock_feature(self) -> bool:
        """Whether the image has its exclusive-lock feature now (True if that cannot be
        read: the usual refusal's message then stands)."""
        try:
            return bool(self.image.features() & FEATURE_EXCLUSIVE_LOCK)
        except RadosError:
            return True

    def _set_not_ready(self, why: str | None, *, tell_later: bool = False) -> None:
        """Make every command answer NOT READY for `why` (None: serve again), and tell the
        device that the extent changed (the native loop serves the image only while the lock
        is ours). `tell_later`: tell it from a thread of its own. A caller that may run on
        librbd's callback thread must: turning the native loop's execution off waits for the
        librbd operations C has in flight, whose completions librbd runs on that very thread
        (it would wait for itself for good). Commands meanwhile see `not_ready` at once
        (Python's) or fail at librbd like the one that found it (C's)."""
        why = self._missing or why  # a deleted image stays so
        changed = (why is None) != (self.not_ready is None)
        self.not_ready = why
        listener = self.extent_listener
        if changed and listener is not None:
            if tell_later:
                def tell() -> None:
                    name_os_thread()
                    listener()

                threading.Thread(target=tell, name=f"plane-{self.cfg.spec}",
                                 daemon=True).start()
            else:
                listener()

    def file_extent(self) -> RbdExtent | None:
        """`FileExtent`: the image, for the native loop's librbd calls, while medium access is
        allowed (the exclusive lock is ours, or lock=shared); None otherwise, so that every
        command reaches the device and answers NOT READY."""
        return self._extent if self.not_ready is None and self._missing is None else None

    def start_lock_retry(self, interval: float = LOCK_RETRY_INTERVAL) -> None:
        """Keep trying to take the lock every `interval` seconds, on a thread of its own, until
        it is ours or the backend closes: the holder may release it, or die (librbd then
        blocklists it and breaks its lock), and this device takes over (a gateway failover).
        Commands meanwhile answer NOT READY; none waits for the lock."""

        def retry() -> None:
            name_os_thread()
            if self._wait_for_lock(interval):
                log.warning("ceph image %s: exclusive lock taken; serving", self.cfg.spec)

        self._retry = threading.Thread(target=retry, name=f"lock-{self.cfg.spec}", daemon=True)
        self._retry.start()

    def _wait_for_lock(self, interval: float) -> bool:
        """Try to take the lock (`take_lock`) every `interval` seconds, the first try one
        interval from now, until it is ours: True. False when the backend closes first, or when
        another thread than this one is connecting a new client (`_reconnecting`): that thread
        takes the lock with the new client (`_reconnect`, which waits here itself)."""
        while not self._closing.wait(interval) and self._missing is None:
            reconnecting = self._reconnecting
            if reconnecting is not None and reconnecting is not threading.current_thread():
                return False
            if self.take_lock():
                return True
            if self._new_client_lost:
                return False
        return False

    def check_ready(self) -> None:
        why = self._missing or self.not_ready
        if why is not None:
            if self._reconnecting is not None and not self._standing_by and not self._missing:
                raise NotReadyBecoming(why)  # a new client is on its way: retry
            raise NotReadyManualIntervention(why)

    def command_arrived(self, when: float | None) -> None:
        """The command this thread runs now was taken from the ring at `when` (None: it is
        done): `time_left` counts from then (`CephDevice.execute`)."""
        self._arrival.when = when

    def time_left(self) -> float:
        """Seconds left of one ``osd_op_timeout`` counted from the arrival of the command
        this thread runs (a whole one outside a command). The kernel's ``cmd_time_out`` runs
        from the arrival too: a command that waited for a worker behind another (a WRITE SAME
        held a whole timeout by a stalled cluster) has that much less. NOT READY 02h/04h/01h
        (retryable) when nothing is left: nothing is started that would be abandoned."""
        when = getattr(self._arrival, "when", None)
        timeout = self.cfg.osd_op_timeout
        left = timeout if when is None else timeout - (time.monotonic() - when)
        if left <= 0:
            raise NotReadyBecoming(f"ceph image {self.cfg.spec}: no time left of the command's "
                                   f"{timeout:g} s (osd_op_timeout): it waited for a worker")
        return left

    def _wait(self, start: Callable[[], Future[int]], writing: bool, *,
              bound: bool = True) -> int:
        """The result of the operation `start()` begins, within what is left of one
        ``osd_op_timeout`` (`time_left`) unless not `bound` (`bounded`); its failure as sense.
        A deadline answers before librbd is done with the operation's buffers: only buffers
        Python owns come here (librbd's operation keeps them alive until its callback: an
        EXTENDED COPY's, a VERIFY's); a command's ring buffers go through the device's
        asynchronous commands, which complete only once librbd has."""
        left = self.time_left() if bound else 0.0
        try:
            fut = start()
            return int((bounded(fut, left, self.cfg.spec) if bound else fut).result())
        except OSError as exc:
            raise self.sense(exc, writing) from exc

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.check_ready()
        self._wait(lambda: self.image.aio_readv(offset, bufs), False)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.check_ready()
        self._wait(lambda: self.image.aio_writev(offset, bufs), True)

    def flush(self) -> None:
        self.check_ready()
        # librbd's own outcome, not a deadline's NOT READY: a write-back that failed is WRITE
        # ERROR (`aio_flush`), which a retried flush would answer GOOD.
        self._wait(self.aio_flush, True, bound=False)

    def aio_flush(self) -> Future[int]:
        """librbd's flush, its failure already a sense. With librbd's cache in write-back
        mode (``rbd_cache=1``, after the first flush that succeeded: librbd's cache writes
        through until then) a failed flush means writes acknowledged from the cache did not
        reach the cluster, and librbd does not keep them (a second flush succeeds at once,
        measured with every OSD stopped): WRITE ERROR 03h/0Ch/00h, which an initiator does not
        retry, rather than NOT READY, which sd retries into a GOOD that hides the loss."""
        out: Future[int] = Future()

        def done(f: Future[int]) -> None:
            exc = f.exception()
            if exc is None:
                self._cache_writes_back = self.write_cache
                out.set_result(f.result())
            elif self._cache_writes_back and isinstance(exc, OSError):
                log.error("ceph image %s: librbd's cache could not write back (%s): writes "
                          "acknowledged from it may be lost; SYNCHRONIZE CACHE answers WRITE "
                          "ERROR", self.cfg.spec, exc)
                out.set_exception(WriteError(f"librbd's cache could not write back: {exc}"))
            elif isinstance(exc, OSError) and exc.errno == errno.EROFS:
                # librbd refuses a flush, as it does a write, while another client holds the
                # exclusive lock of an image this device shares (lock=shared). Nothing of ours
                # is in its cache (the branch above), so there is nothing to write: GOOD, as LIO
                # answers SYNCHRONIZE CACHE on a read-only LUN (sd sends one at every unmount
                # and detach; WRITE PROTECTED there would be an error for nothing).
                out.set_result(0)
            else:
                out.set_exception(self.sense(exc, True, image))

        image = self.image
        image.aio_flush().add_done_callback(done)
        return out

    def unmap(self, offset: int, length: int) -> None:
        self.check_ready()
        self._wait(lambda: self.image.aio_write_zeroes(offset, length), True)

    def write_same(self, offset: int, length: int, block: bytes, unmap: bool) -> None:
        self.check_ready()
        if not any(block):
            # Without UNMAP a zero block is written, not deallocated (SBC-4 5.50): what an
            # eager-zeroed ("thick") disk is made with stays allocated.
            self._wait(lambda: self.image.aio_write_zeroes(offset, length, thick=not unmap),
                       True)
        else:
            self._wait(lambda: self.image.aio_writesame(offset, length, block), True)

    def lba_status(self, offset: int, length: int, *,
                   max_runs: int) -> list[tuple[int, int, int]]:
        """`LbaStatus`: runs (offset, length, 0 mapped / 1 deallocated) from `offset`, over at
        most `LBA_STATUS_WINDOW` bytes (module docstring)."""
        self.check_ready()
        end = offset + min(length, LBA_STATUS_WINDOW)
        try:
            extents = self.image.extents(offset, end - offset, max_runs)
        except OSError as exc:
            raise self.sense(exc, False) from exc
        bs = self.block_size
        runs: list[tuple[int, int, int]] = []

        def add(start: int, stop: int, status: int) -> None:
            if stop <= start:
                return
            if runs and runs[-1][2] == status:
                first = runs[-1][0]
                runs[-1] = (first, stop - first, status)
            else:
                runs.append((start, stop - start, status))

        pos = offset
        for off, n, exists in extents:
            if not exists:
                continue
            start = max(off // bs * bs, pos)
            stop = min(-(-(off + n) // bs) * bs, end)
            add(pos, start, 1)
            add(max(start, pos), stop, 0)
            pos = max(pos, stop)
        if len(extents) < max_runs:
            add(pos, end, 1)  # the iteration ran to `end`: the rest holds no data
        return runs[:max_runs]

    def resize(self, size: int) -> None:
        """`Resizable`: the device's new size (the kernel's ``dev_size``). The image grows to
        it if smaller, and is never shrunk: the data past the device's new end stays in the
        image (shrinking an image is the operator's decision, ``rbd resize --allow-shrink``)."""
        have = self.image.size()
        if size > have:
            limit = self.image.max_size()  # librbd takes larger sizes, then aborts on a write
            if size > limit:
                raise ConfigError(f"ceph: {self.cfg.spec}: dev_size {size} is above "
                                  f"{limit} bytes (the object map's limit for its objects of "
                                  f"{self.image.object_size()} bytes); the image keeps its "
                                  "size")
            self.image.resize(size)
            have = size
        self.image_size = have
        self.size = size
        self.size_cap = self._cap(size, have)

    def _cap(self, size: int, image_size: int) -> int | None:
        """`size_cap` for a device of `size` bytes on an image of `image_size`."""
        return size if size < image_size - image_size % self.block_size else None

    def close(self) -> None:
        self._closing.set()
        with self._state_lock:
            check = self._pool_check  # in librados: the clients must outlive it
        for thread in (self._retry, self._reconnecting, check):
            if thread is not None:
                thread.join()
        with self._state_lock:
            handles = [*self._retired, (self.image, self.ioctx, self.cluster)]
            self._retired = []
        for image, ioctx, cluster in handles:
            try:
                image.close()
            except OSError as exc:  # a blocklisted client's image: what it held is gone
                log.warning("ceph image %s: close: %s", self.cfg.spec, exc)
            finally:
                try:
                    ioctx.close()
                finally:
                    cluster.shutdown()


def open_backend(cfg: CephConfig, size: int, block_size: int) -> RbdBackend:
    """Connect, open (or with ``create`` make) the image, take its exclusive lock unless
    ``lock=shared``. `ConfigError` names the key for a pool, namespace or image that does not
    exist or a size that does not fit; `DeviceUnavailable` when the cluster does not answer
    (one of `UNAVAILABLE`: the monitors or OSDs down or unreachable, within
    ``osd_op_timeout``): the daemon serves the device NOT READY (becoming ready) and opens it
    again until the cluster answers; any other `RadosError` (an OSError: bad credentials, a
    refused keyring) is for the operator."""
    try:
        return _open_backend(cfg, size, block_size)
    except RadosError as exc:
        if exc.errno not in UNAVAILABLE:
            raise
        raise DeviceUnavailable(f"ceph: {cfg.spec}: the cluster does not answer ({exc})"
                                ) from exc


def _open_backend(cfg: CephConfig, size: int, block_size: int) -> RbdBackend:
    for key, path, what in (("conf", cfg.conf, "the cluster's ceph.conf"),
                            ("keyring", cfg.keyring, "the client's keyring")):
        if path is None:
            continue
        if not os.path.exists(path):
            why = "no such file"
        elif os.path.isdir(path):
            why = "a directory"
        elif not os.access(path, os.R_OK):
            why = "not readable by the daemon"
        else:
            continue
        raise ConfigError(f"ceph: key {key!r}: {path}: {why}; expected {what}, readable")
    cluster = _connect(cfg)
    ioctx = image = None
    try:
        ioctx, image = _open_image(cfg, cluster, size)
        have = image.size()
        if size > have:
            # The size is the device's (a YAML device's `size`, a backstore's `dev_size`), not
            # the config string's: name it as the operator wrote it.
            raise ConfigError(f"ceph: the device's size (YAML `size`, configfs `dev_size`): "
                              f"{size} bytes, larger than the image {cfg.spec} ({have} bytes); "
                              "expected a size up to the image's, or the image grown first "
                              "(`rbd resize`)")
        if cfg.lock == "exclusive" and not image.features() & FEATURE_EXCLUSIVE_LOCK:
            # Without the feature librbd takes no lock: a second gateway would write alongside.
            raise ConfigError(f"ceph: key 'lock': {cfg.spec}: the image has no exclusive-lock "
                              "feature, so lock=exclusive cannot keep other clients out; "
                              f"expected `rbd feature enable {cfg.pool}/"
                              f"{cfg.namespace + '/' if cfg.namespace else ''}{cfg.image} "
                              "exclusive-lock`, or lock=shared where the initiators coordinate")
        backend = RbdBackend(cfg, cluster, ioctx, image, size or have, block_size, have)
        if cfg.lock == "exclusive" and not backend.take_lock():
            log.error("%s", backend.not_ready)
            backend.start_lock_retry()
        return backend
    except BaseException:
        if image is not None:
            image.close()
        if ioctx is not None:
            ioctx.close()
        cluster.shutdown()
        raise


def _connect(cfg: CephConfig) -> Cluster:
    """A new client of the cluster `cfg` names; ConfigError for a conf or credentials the
    cluster refuses (naming the key)."""
    options = {"rados_osd_op_timeout": str(cfg.osd_op_timeout),
               "rados_mon_op_timeout": str(cfg.osd_op_timeout),
               "rbd_cache": "true" if cfg.rbd_cache else "false"}
    if cfg.keyring:
        options["keyring"] = cfg.keyring
    try:
        return Cluster(cfg.conf, cfg.client, options, connect_timeout=cfg.osd_op_timeout)
    except ConfError as exc:
        raise ConfigError(f"ceph: key 'conf': {cfg.conf}: librados cannot use it ({exc}); "
                          "expected a ceph.conf naming the cluster's monitors") from None
    except RadosError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EINVAL, errno.EIO):
            raise
        if exc.errno == errno.ENOENT and not _names_monitors(cfg.conf):
            raise ConfigError(f"ceph: key 'conf': {cfg.conf}: names no monitor ({exc}); "
                              "expected a ceph.conf with mon_host") from None
        keyring = cfg.keyring or f"the keyring {cfg.conf} names"
        raise ConfigError(f"ceph: keys 'id' and 'keyring': the cluster of {cfg.conf} did not "
                          f"let client.{cfg.client} in with {keyring} ({exc}); expected a "
                          "client the cluster knows and its keyring") from None


def _names_monitors(conf: str) -> bool:
    """Whether the ceph.conf `conf` has a ``mon_host`` / ``mon host`` setting or a ``mon addr``
    (of a ``[mon.X]`` section): without one, librados' ENOENT at connect is the conf's, not the
    client's credentials'. An unreadable file answers True: the error stays the credentials'
    one, as it was."""
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return True
    return re.search(r"(?im)^\s*(mon[ _]host|mon[ _]addr)\s*=\s*\S", text) is not None


def _open_image(cfg: CephConfig, cluster: Cluster, size: int, image_id: str | None = None
                ) -> tuple[IoCtx, Image]:
    """The I/O context and the open image `cfg` names, through `cluster` (with ``create``
    making a missing namespace and image of `size` bytes); ConfigError naming the key for
    what does not exist. With `image_id`, the image of that id whatever its name now (a
    reconnect: the image may have been renamed), nothing created. Nothing is left open on
    failure."""
    ioctx = None
    try:
        if image_id is not None:
            ioctx = cluster.ioctx(cfg.pool, cfg.namespace)
            return ioctx, ioctx.open_image(cfg.image, image_id)
        try:
            ioctx = cluster.ioctx(cfg.pool)
        except RadosError as exc:
            if exc.errno != errno.ENOENT:
                raise
            raise ConfigError(f"ceph: key 'image': {cfg.spec}: pool {cfg.pool!r} does not "
                              f"exist in the cluster of {cfg.conf}") from None
        if cfg.namespace:
            if not ioctx.namespace_exists(cfg.namespace):
                if not cfg.create:
                    raise ConfigError(f"ceph: key 'image': {cfg.spec}: namespace "
                                      f"{cfg.namespace!r} does not exist in pool {cfg.pool!r}; "
                                      "expected an existing namespace, or create=1")
                ioctx.namespace_create(cfg.namespace)
            ioctx.close()
            ioctx = cluster.ioctx(cfg.pool, cfg.namespace)
        try:
            image = ioctx.open_image(cfg.image)
        except RadosError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise ConfigError(f"ceph: key 'id': {cfg.spec}: client.{cfg.client} may not "
                                  f"open the image ({exc}); expected a client whose OSD caps "
                                  "allow writing it (`profile rbd`)") from None
            if exc.errno != errno.ENOENT:
                raise
            if not cfg.create:
                raise ConfigError(f"ceph: key 'image': {cfg.spec}: no such image in the "
                                  f"cluster of {cfg.conf}; expected an existing image, or "
                                  "create=1 to make one of the device's size") from None
            if not size:
                raise ConfigError(f"ceph: key 'create': {cfg.spec}: no such image, and the "
                                  "device has no size to make it with (0: the image's size); "
                                  "expected a device size, or an existing image") from None
            try:
                ioctx.create_image(cfg.image, size)
            except ValueError as exc:
                raise ConfigError(f"ceph: key 'create': {cfg.spec}: the device's size, {exc}; "
                                  "expected a smaller device, or an existing image") from None
            except RadosError as exc:
                if exc.errno == errno.EINVAL:  # name and size checked: the pool
                    raise ConfigError(f"ceph: key 'image': {cfg.spec}: librbd refused to make "
                                      f"an image in pool {cfg.pool!r} ({exc}); expected a "
                                      "replicated pool with the rbd application (an erasure-"
                                      "coded pool can only be an image's data pool: create "
                                      "the image with `rbd create --data-pool`)") from None
                if exc.errno not in (errno.EDQUOT, errno.ENOSPC):
                    raise
                raise ConfigError(f"ceph: key 'create': {cfg.spec}: pool {cfg.pool!r} is full "
                                  f"(at its quota, or its OSDs full: {exc}); expected room for "
                                  "the image (`ceph osd pool get-quota`, `ceph df`)") from None
            image = ioctx.open_image(cfg.image)
        return ioctx, image
    except BaseException:
        if ioctx is not None:
            ioctx.close()
        raise


class CephDevice(BlockDevice):
    """`BlockDevice` over `RbdBackend` whose READ, WRITE, SYNCHRONIZE CACHE, UNMAP and COMPARE
    AND WRITE return Futures resolved by librbd's completions (module docstring)."""

    backend: RbdBackend

    def __init__(self, config: DeviceConfig, backend: RbdBackend) -> None:
        super().__init__(config, backend)
        self.product = "CEPH RBD DISK"
        # librbd (16.2) compares and writes one 512-byte sector at a time and refuses more
        # (EINVAL, measured for 1024 to 8192 bytes): advertise one 512-byte block, and no
        # COMPARE AND WRITE at all for larger blocks, rather than a non-atomic loop.
        self.max_compare_and_write_blocks = 1 if self.block_size == CAW_SECTOR else 0
        #: Set by librbd's watch when the image header changed (maybe resized elsewhere).
        self._header_changed = threading.Event()
        self._watch: int | None = None
        backend.reconnect_listener = self._rewatch
        backend.size_listener = self._on_header_change
        #: Held while the image's size is looked at after a header change; `_following` is
        #: True from before the change's flag is cleared until the new size is in force, so
        #: a command another worker starts meanwhile waits for it (`execute`).
        self._follow_lock = threading.Lock()
        self._following = False
        try:
            self._watch = self.image.watch(self._on_header_change)
        except OSError as exc:
            self.log.warning("no watch on the image header (%s): a resize by another client "
                             "is not followed", exc)

    @property
    def not_ready_reason(self) -> str | None:
        return self.backend.not_ready

    @property
    def image(self) -> Image:
        """The backend's image handle now (a new one after a blocklisting: `RbdBackend`)."""
        return self.backend.image

    def _rewatch(self) -> None:
        """The backend reconnected (a new client, a new image handle): watch its header."""
        self._watch = None  # the watch of the client given up went with it
        try:
            self._watch = self.image.watch(self._on_header_change)
        except OSError as exc:
            self.log.warning("no watch on the image header after reconnecting (%s): a resize "
                             "by another client is not followed", exc)
        self._plane_changed()

    def _on_header_change(self) -> None:
        """librbd's watch (on its thread, which must not call librbd): the header changed.
        Until the next command has looked at the image's size (`execute`), the native loop
        hands every command to Python (`unit_attention_pending`), so the very next command,
        a READ or WRITE included, reports a resize. The loop is told on a thread of its own:
        turning C's execution off waits for the librbd operations C has in flight, whose
        completions librbd runs on this very thread (its one ``io_context_pool`` thread) —
        waiting here hung the device for good when a resize met writes in flight."""
        self._header_changed.set()
        threading.Thread(target=self._plane_changed, name="ceph-header",
                         daemon=True).start()

    @property
    def unit_attention_pending(self) -> bool:
        return (self._header_changed.is_set() or self._following
                or super().unit_attention_pending)

    def execute(self, cmd: Command) -> Any:
        """Follow a resize made by another client before running `cmd`, so its UNIT ATTENTION
        comes with this very command; a command that arrives on another worker meanwhile waits
        for the new size (before: it ran against the old one, and a READ past a shrunk
        image's end could answer GOOD)."""
        if self._header_changed.is_set() or self._following:
            with self._follow_lock:
                if self._header_changed.is_set():
                    self._following = True  # before the flag goes: no window of neither
                    self._header_changed.clear()
                    try:
                        self._follow_image_size()
                    finally:
                        self._following = False
                    self._plane_changed()  # C may serve again (unless a UA now waits)
        backend = self.backend
        backend.command_arrived(cmd.arrived)
        try:
            return super().execute(cmd)
        finally:
            backend.command_arrived(None)

    def _follow_image_size(self) -> None:
        """The image's size after a header change. Unchanged (a snapshot, a lock change):
        nothing. Changed: a device as large as the image was follows it; a device made
        smaller than its image (`RbdBackend.size_cap`) keeps its size unless the image is now
        smaller than it, and grows back to that size, never past it, when the image grows."""
        backend = self.backend
        try:
            have = self.image.size()
        except OSError as exc:
            self.log.warning("image size unknown after a header change: %s", exc)
            return
        before, backend.image_size = backend.image_size, have
        if have == before:
            return
        size = have - have % self.block_size
        if backend.size_cap is not None:
            size = min(size, backend.size_cap)
        if size == backend.size:
            return
        self.log.info("image %s resized by another client: %d -> %d bytes",
                      backend.cfg.spec, backend.size, size)
        backend.size = size
        self.num_blocks = size // self.block_size
        # SBC-4 4.6: the capacity changed: CAPACITY DATA HAS CHANGED with the next command.
        self.queue_unit_attention(CapacityDataChanged())
        self.extent_version += 1

    def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                self.image.unwatch(watch)
            except OSError as exc:
                self.log.warning("unwatch: %s", exc)
        super().close()

    def check_ready(self) -> None:
        self.backend.check_ready()

    @staticmethod
    def _unanswered_in_c(cmd: Command, writing: bool) -> None:
        """A READ/WRITE the native loop submitted to librbd itself and that failed because
        the cluster did not answer (within ``osd_op_timeout``): NOT READY now, as if it had
        failed here — trying it again would hold it one more timeout, past the kernel's
        ``cmd_time_out`` with the defaults. Any other failure is tried again here, whose
        error then gives the sense."""
        if cmd.native_error in UNAVAILABLE and cmd.native_error != errno.ESHUTDOWN:
            raise scsi_error(OSError(cmd.native_error, os.strerror(cmd.native_error)), writing)
        # ESHUTDOWN (this client blocklisted): tried again here, where it fails at once on the
        # current image (and a new client is connected: `RbdBackend.sense`), or succeeds if the
        # loop's try was on an image already given up.

    @command(Opcode.READ_6)
    @command(Opcode.READ_10)
    @command(Opcode.READ_12)
    @command(Opcode.READ_16)
    def read(self, cmd: Command) -> Future[int] | int:  # type: ignore[override]
        lba, blocks, _ = self._rw(cmd.cdb)
        length = min(blocks * self.block_size, cmd.data_in_length)
        if not length:
            return 0
        self.check_ready()
        self._unanswered_in_c(cmd, False)
        self.backend.time_left()  # NOT READY if it waited its timeout away (for a job of C's)
        bufs = cmd.data_in
        if length != cmd.data_in_length:
            bufs = slice_views(bufs, 0, length)
        # One Future, resolved by librbd's completion with the final answer (no second one
        # chained to it): this path runs for every READ.
        image = self.image
        return image.aio_readv(lba * self.block_size, bufs, value=length,
                               map_error=lambda exc: self.backend.sense(exc, False, image))

    @command(Opcode.WRITE_6)
    @command(Opcode.WRITE_10)
    @command(Opcode.WRITE_12)
    @command(Opcode.WRITE_16)
    def write(self, cmd: Command) -> Future[None] | None:  # type: ignore[override]
        lba, blocks, fua = self._rw(cmd.cdb)
        length = blocks * self.block_size
        if length != cmd.data_out_length:
            check_data_out(cmd, length, data=True)  # raises: nothing is written
        if not length:
            return None
        self.check_ready()
        self._unanswered_in_c(cmd, True)
        self.backend.time_left()  # as READ
        image = self.image
        if not (fua and self.backend.write_cache):
            return image.aio_writev(lba * self.block_size, cmd.data_out,  # as READ
                                    value=None,
                                    map_error=lambda exc: self.backend.sense(exc, True, image))
        fut = image.aio_writev(lba * self.block_size, cmd.data_out)
        # SBC-4 5.49: FUA — on non-volatile media (librbd's cache flushed) before GOOD.
        return when_all([then(fut, self.backend.aio_flush)], None, True, self.backend.sense)

    @command(Opcode.SYNCHRONIZE_CACHE_10)
    @command(Opcode.SYNCHRONIZE_CACHE_16)
    def synchronize_cache(self, cmd: Command) -> Future[None]:  # type: ignore[override]
        req = cdbs.SynchronizeCache.parse(cmd.cdb)
        self._check_range(req.lba, req.blocks)
        self.check_ready()
        return when_all([self.backend.aio_flush()], None, True, self.backend.sense)

    @command(Opcode.UNMAP)
    def unmap(self, cmd: Command) -> Future[None] | None:  # type: ignore[override]
        req = cdbs.Unmap.parse(cmd.cdb)
        if req.anchor:
            raise InvalidFieldInCdb("ANCHOR", field_pointer=1, bit_pointer=0)
        if req.parameter_list_length == 0:
            return None
        check_data_out(cmd, req.parameter_list_length, field_pointer=7)
        ranges = sbc.parse_unmap_parameters(cmd.read_data_out(req.parameter_list_length),
                                            MAX_UNMAP_BLOCK_DESCRIPTORS)
        for lba, count in ranges:
            self._check_range(lba, count)
        self.check_ready()
        bs = self.block_size
        image = self.image
        left = self.backend.time_left()
        return bounded(when_all([image.aio_write_zeroes(lba * bs, count * bs)
                                 for lba, count in sbc.merge_ranges(ranges)], None, True,
                                lambda exc, writing: self.backend.sense(exc, writing, image)),
                       left, self.backend.cfg.spec)

    @command(Opcode.COMPARE_AND_WRITE)
    def compare_and_write(self, cmd: Command) -> Future[None] | None:  # type: ignore[override]
        rw = cdbs.parse_rw(cmd.cdb)
        if rw.transfer_length > self.max_compare_and_write_blocks:
            # SBC-4 5.3: above MAXIMUM COMPARE AND WRITE LENGTH (VPD B0h).
            raise InvalidFieldInCdb("NUMBER OF LOGICAL BLOCKS", field_pointer=13)
        self._check_range(rw.lba, rw.transfer_length)
        length = rw.transfer_length * self.block_size
        if length == 0 and cmd.data_out_length:
            raise InvalidFieldInCdb("NUMBER OF LOGICAL BLOCKS", field_pointer=13)
        # SBC-4 5.3: the Data-Out holds exactly the verify and the write instances.
        check_data_out(cmd, 2 * length, data=True)
        if length == 0:
            return None
        self.check_ready()
        data = cmd.read_data_out(2 * length)
        offset = rw.lba * self.block_size
        image = self.image
        fut = image.aio_compare_and_write(offset, data[:length], data[length:])
        if rw.fua and self.backend.write_cache:
            fut = then(fut, self.backend.aio_flush)
        out: Future[None] = Future()

        def done(f: Future[int]) -> None:
            exc = f.exception()
            if exc is None:
                out.set_result(None)
            elif isinstance(exc, OSError) and exc.errno == errno.EILSEQ:
                # SBC-4 5.3: INFORMATION = offset of the first byte that did not match, from
                # the start of the compared data. librbd 16.2 counts it from the start of the
                # RADOS object holding `offset` (measured: 4194604 for byte 300 of LBA 8192),
                # a later one may count from `offset` or from the image's start: the compared
                # data is one 512-byte sector at a 512-byte aligned offset inside one object,
                # whose start is aligned too, so the byte's offset is the remainder in all three.
                first = int(getattr(exc, "mismatch", 0)) % length
                out.set_exception(Miscompare(f"at byte {first}", info=first))
            else:
                out.set_exception(self.backend.sense(exc, True, image))

        fut.add_done_callback(done)
        return out

    def supports(self, opcode: int, service_action: int | None) -> bool:
        if opcode == Opcode.COMPARE_AND_WRITE:
            return self.max_compare_and_write_blocks > 0
        return super().supports(opcode, service_action)


__all__ = ["CephDevice", "NotReady", "RbdBackend", "open_backend", "scsi_error"]
