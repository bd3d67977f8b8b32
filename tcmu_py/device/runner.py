"""DeviceRunner: moves commands between one device's ring and its `ScsiDevice`.

The cycle (as tcmu-runner does it, and as the kernel expects): wait for the uio fd to be readable
-> clear the event -> dequeue every new entry in one call -> run each command -> complete -> one
kick per batch.

Where a command runs:
- commands whose handler is marked `inline` (INQUIRY, READ CAPACITY, MODE SENSE ...) run on the
  loop thread, and are completed together with one kick;
- everything else goes to a bounded worker pool (`workers` threads; the backend's blocking I/O
  releases the GIL there), dealt round-robin in one chunk per worker, each chunk completed with
  one kick (a command that took longer than `PROMPT_SECONDS` at once) — except a wake-up that
  brings a single such command (queue depth 1), which runs on the loop thread: the hand-off
  would cost more than it saves (unless the device says its commands may wait long:
  `ScsiDevice.lone_commands_on_loop`);
- a device with `serial_commands` (tapes, changers) gets exactly one worker, and its commands run
  one at a time, in arrival order: once one of them is queued for the worker, everything after
  it is queued behind it (inline ones too), and a lone command runs on the loop thread only while
  the worker is idle.

Every dequeued command is completed exactly once, including commands named by a TMR abort: a
command that has not started yet is completed with TASK ABORTED without running; one that is
running finishes normally (the kernel discards the status of a command it aborted). A TMR can
name a command userspace has already completed but the kernel has not reaped yet; the kernel
then reuses its cmd_id for a later command, so only ids still in flight at the TMR's place in
the ring are taken as aborted (`RingTmr.live_ids`).

The guard: `ScsiDevice.execute` never raises, but a subclass that overrides it may, and a
handler's Future may fail or resolve to something that is not a Response. Whatever a device
throws at the runner — on the loop thread, in a pool chunk or in a Future callback — the command
is answered CHECK CONDITION (HARDWARE ERROR 44/00 unless the exception carries its own sense),
the traceback is logged, `failed` and `Counters.failures` record it, and the device keeps being
served (`_failure`). If the loop thread itself has to stop (a corrupt ring), `Counters.stopped`
says why, so `tcmu-py status` does not report a dead device as "ok".

Closing: the device, the ring and the caller's uio (`close(on_closed=...)`) are released only
when nothing can touch them any more — the loop thread has left `run()`, no pool chunk is
queued or running and no asynchronous command is outstanding. `close()` while a command still
runs (a backend stuck in I/O when the kernel removes the device) defers the release to the last
one to finish: an image fd closed under a running command would be reused by the next image
opened, and the late write would land in that other device's image.

The C data plane (`data_plane=True`, `tcmu_py.ring.DataPlane`): for a device that declares a file
extent (`ScsiDevice.data_extent`), the dequeue itself executes and completes the plain READ/WRITE
commands in C, fenced off the LBAs of every command Python holds; `process` sees only the rest
and takes C's figures into the counters. With the native loop (`native=True`, the default; issue
17 stage 2, `tcmu_py.ring.NativeLoop`) a C thread owns the ring instead: `run()` then waits on the
loop's eventfd and runs what it hands over (`_run_native`), `process()` is refused, and the
counters take C's figures when read (`refresh_counters`).

Ring completions are serialised by `self._ring_lock` (cmd_tail has one writer at a time).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from tcmu_py.backend import NativeKit
from tcmu_py.device.command import Command, Response
from tcmu_py.device.core import ScsiDevice
from tcmu_py.device.latency import LATENCY_BUCKETS, latency_bucket
from tcmu_py.errors import RingError
from tcmu_py.ring import (
    ChunkTable,
    DataPlane,
    JournalLease,
    NativeLoop,
    NbdWriter,
    Ring,
    RingCommand,
    RingTmr,
    WriteRegions,
)
from tcmu_py.scsi.constants import Status
from tcmu_py.scsi.sense import HardwareError, ScsiError, build_fixed_sense
from tcmu_py.threadname import name_os_thread

log = logging.getLogger(__name__)

#: Whether a runner serves plain READ/WRITE of a file-extent device in C unless told otherwise
#: (`DeviceRunner(data_plane=...)`, `serve --data-plane / --no-data-plane`).
DEFAULT_DATA_PLANE = True
#: Whether that C data plane runs on its own native thread per device (stage 2) rather than in
#: the Python loop thread's dequeue (stage 1), unless told otherwise (`DeviceRunner(native=)`).
DEFAULT_NATIVE_LOOP = True
#: A command of a pool chunk that took longer than this (seconds) is completed at once rather
#: than with the chunk's later commands (`DeviceRunner._run_chunk`).
PROMPT_SECONDS = 0.05

_READ_OPS = frozenset({0x08, 0x28, 0xA8, 0x88})
_WRITE_OPS = frozenset({0x0A, 0x2A, 0xAA, 0x8A})
#: The answer when even building the device's own error response fails: fixed-format HARDWARE
#: ERROR / INTERNAL TARGET FAILURE (SPC-5 4.4.3), built once.
_HARDWARE_ERROR = Response(Status.CHECK_CONDITION, build_fixed_sense(0x04, 0x44, 0x00))


class UioLike(Protocol):
    """The surface of `tcmu_py.uio.UioDevice` (and `tcmu_py.testing.FakeUio`) the runner uses."""

    buffer: Any

    def fileno(self) -> int: ...
    def clear_event(self) -> None: ...
    def kick(self) -> None: ...


@dataclass
class Counters:
    """Per-device figures, for `tcmu-py status` and benchmarks. Updated under the ring lock.

    Every figure is cumulative since the runner started; rates over a window are differences of
    two snapshots (`tcmu_py.daemon.status.window`).
    """

    commands: int = 0
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    aborted: int = 0
    batches: int = 0
    wakeups: int = 0  # returns from poll(2) with work
    polled: int = 0  # wake-ups saved: the busy-poll (`poll_seconds`) found the next command
    poll_misses: int = 0  # busy-poll watches that ended with nothing new (CPU spent for nothing)
    mapped: int = 0  # commands C copied through the mapped image (memcpy, not preadv/pwritev)
    merged: int = 0  # RBD commands C sent to librbd within an adjacent one's operation
    poll_probes: int = 0  # the native loop's busy-poll judge: probes, and changes of its choice
    poll_switches: int = 0
    busy_seconds: float = 0.0
    latency_seconds: float = 0.0
    latency_hist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    started: float = field(default_factory=time.monotonic)
    #: Commands the device threw an exception at the runner for (answered by the runner's guard).
    failures: int = 0
    #: Why the loop thread stopped serving without being asked to ("" while it serves).
    stopped: str = ""

    def add_executed(self, done: int, reads: int, writes: int, bytes_read: int,
                     bytes_written: int, latency_seconds: float, hist: dict[int, int]) -> None:
        """Count `done` commands the C data plane executed and completed GOOD: the figures
        `DeviceRunner._complete_one` keeps for such a command completed from Python."""
        self.commands += done
        self.reads += reads
        self.writes += writes
        self.bytes_read += bytes_read
        self.bytes_written += bytes_written
        self.latency_seconds += latency_seconds
        for b, k in hist.items():
            self.latency_hist[b] += k

    def snapshot(self) -> dict[str, Any]:
        """All counters (the histogram as a list copy) plus `uptime` (seconds since started)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["latency_hist"] = list(self.latency_hist)
        out["uptime"] = time.monotonic() - self.started
        return out


#: How long `_after_jobs` waits for the native loop's jobs before it looks again.
JOB_WAIT_SECONDS = 1.0


class DeviceRunner:
    """Serves one device: `run()` until `stop()`; or drive it step by step with `process()`."""

    def __init__(
        self,
        uio: UioLike,
        device: ScsiDevice,
        *,
        workers: int = 4,
        name: str | None = None,
        adopt: bool = False,
        poll_seconds: float = 0.0,
        data_plane: bool = DEFAULT_DATA_PLANE,
        native: bool | None = None,
    ) -> None:
        """`adopt`: take over entries already on the ring; only right after `reset_ring`
        (see `tcmu_py.ring.Ring`). `poll_seconds`: the longest busy-poll watch for the next
        command after a wake-up that brought a single one; 0 turns it off (see `run`).
        `data_plane`: serve plain READ/WRITE in C when the device declares a file extent
        (`ScsiDevice.data_extent`, `tcmu_py.ring.DataPlane`); False keeps every command in
        Python. `native` (None: `DEFAULT_NATIVE_LOOP`): with the data plane, and for a device
        that declares an extent or may later (`ScsiDevice.extent_may_come`), `run()` lets a C
        thread own the ring (`tcmu_py.ring.NativeLoop`, issue 17 stage 2) and serves only what
        it hands over."""
        self.uio = uio
        self.device = device
        self.name = name or device.config.name
        self.log = logging.LoggerAdapter(log, {"device": self.name})
        self.ring = Ring(uio.buffer, adopt=adopt)
        device.set_max_data_length(self.ring.max_data_length)
        self.counters = Counters()
        #: The C data plane (None: off); its extent is declared before each wake-up's call
        #: whenever `device.extent_version` moved.
        self.plane: DataPlane | None = DataPlane() if data_plane else None
        self._extent_version = -1
        #: The native loop (None: `process()` dequeues on the loop thread).
        self.native: NativeLoop | None = None
        if native is None:
            native = DEFAULT_NATIVE_LOOP
        if data_plane and native and device.extent_may_come():
            self.plane = None
            self.native = NativeLoop(self.ring, uio, poll_seconds)
            self._plane_lock = threading.Lock()
            device.plane_listener = self._plane_changed
            device.offer_native(NativeKit(WriteRegions, NbdWriter, ChunkTable, JournalLease))
        self._ring_lock = threading.Lock()
        self._workers = 1 if device.serial_commands else max(1, workers)
        self._pool = ThreadPoolExecutor(
            max_workers=1 if device.serial_commands else max(1, workers),
            thread_name_prefix=f"tcmu-{self.name}",
            initializer=name_os_thread, initargs=(f"tcmu-w:{self.name}",),
        )
        self._aborted: set[int] = set()
        self._logger = self.log.logger  # isEnabledFor without the adapter's extra call
        self._pool_busy = 0  # chunks handed to the pool and not finished; under _ring_lock
        self.poll_seconds = poll_seconds
        self._gap = 0.0  # average gap between the end of a wake-up's work and the next command
        self._stop_r, self._stop_w = os.pipe()
        self._stopping = False
        #: The last exception the guard caught from the device (or that stopped the loop).
        self.failed: BaseException | None = None
        # Lifetime (see the module docstring, "Closing"): `_active` counts what may still touch
        # the device, the ring or the uio — `run()`, pool chunks, outstanding Futures.
        self._life = threading.Lock()
        self._active = 0
        self._closing = False
        self._released = False
        self._on_closed: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------------
    # Loop

    def run(self) -> None:
        """Serve until `stop()`. Returns after every dequeued command has been completed.

        Busy-polling (`poll_seconds` > 0) is for queue depth 1: after a wake-up that brought a
        single command and completed it on this thread, the loop watches cmd_head for up to
        `poll_seconds` before sleeping in poll(2), so the next command is taken without a sleep
        and wake-up — a context switch after which an interpreter runs with cold caches and
        TLB, its largest cost per command at depth 1. It stops as soon as a command arrives.
        A running average of the gap between commands gates it: while that gap is longer than
        `poll_seconds` (an idle or slow device) the loop does not watch at all. Wake-ups that
        bring several commands (deeper queues) do not watch either: their wake-up cost is
        shared, and a spinning thread would take CPU from the kernel's own completion work.
        """
        name_os_thread(f"tcmu:{self.name}")
        poller = select.poll()
        poller.register(self.uio.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        uio_fd = self.uio.fileno()
        gone = select.POLLERR | select.POLLHUP | select.POLLNVAL
        usual = [(uio_fd, select.POLLIN)]
        clock = time.monotonic
        ready = False  # the watch saw new entries: skip poll(2)
        idle_since = 0.0  # when the last wake-up's work ended (0: no work yet)
        if not self._enter():
            raise RingError(f"{self.name}: the runner is closed")
        if self.native is not None:
            self._run_native(poller)
            return
        try:
            while not self._stopping:
                if not ready:
                    events = poller.poll()
                    # The common wake-up is exactly [(uio_fd, POLLIN)]: one comparison.
                    if events != usual:
                        if any(fd == self._stop_r for fd, _ in events):
                            break
                        if any(fd == uio_fd and ev & gone for fd, ev in events):
                            self.log.info("%s: the kernel removed the device; stopping", self.name)
                            self.counters.stopped = "the kernel removed the device"
                            break
                    self.counters.wakeups += 1
                    if idle_since:
                        self._gap += (clock() - idle_since - self._gap) / 4
                else:
                    self.counters.polled += 1
                try:
                    ran = self.process()
                except OSError as exc:
                    if exc.errno not in (errno.EIO, errno.ENODEV):
                        raise
                    # uio answers EIO once the device is unregistered (backstore removed).
                    self.log.info("%s: device gone (%s); stopping", self.name, exc.strerror)
                    self.counters.stopped = f"device gone ({exc.strerror})"
                    break
                ready = False
                if ran:
                    idle_since = clock()
                    limit = self.poll_seconds
                    if ran == 1 and limit and self._gap < limit and not self._pool_busy:
                        waited = self._watch(limit)
                        if waited is not None:
                            ready = True
                            self._gap += (waited - self._gap) / 4
                        else:
                            self.counters.poll_misses += 1
        except BaseException as exc:  # noqa: BLE001 - recorded for status, not a silent death
            # Not the device (the guard answers for it): the ring or the uio failed. The device
            # cannot be served any more; say so where `tcmu-py status` looks.
            self.failed = exc
            self.counters.stopped = f"{type(exc).__name__}: {exc}"
            self.log.critical(
                "%s: the loop thread stops; the device is no longer served", self.name, exc_info=exc
            )
            if not isinstance(exc, Exception):
                raise  # SystemExit, KeyboardInterrupt: recorded, and passed on
        finally:
            try:
                self.drain()
            finally:
                self._leave()

    def _run_native(self, poller: select.poll) -> None:
        """`run()` with a native loop: the C thread serves the ring, this thread waits for what
        it hands over (the loop's eventfd instead of the uio fd) and runs it as `process` runs
        a wake-up's commands. Counted in by `run()`; let go here."""
        loop = self.native
        assert loop is not None
        poller.unregister(self.uio.fileno())
        poller.register(loop.fileno(), select.POLLIN)
        try:
            self._refresh_native()
            loop.start()
            while not self._stopping:
                events = poller.poll()
                if any(fd == self._stop_r for fd, _ in events):
                    break
                loop.clear()
                error = loop.error  # before taking: the records it left come first
                self._serve_native()
                if error:
                    why = loop.describe_error()
                    if error in (errno.EIO, errno.ENODEV):
                        self.log.info("%s: device gone (%s); stopping", self.name, why)
                        self.counters.stopped = f"device gone ({why})"
                    else:
                        self.failed = RingError(why)
                        self.counters.stopped = f"RingError: {why}"
                        self.log.critical(
                            "%s: the native loop stopped: %s; the device is no longer served",
                            self.name, why,
                        )
                    break
        except BaseException as exc:  # noqa: BLE001 - recorded for status, as in run()
            self.failed = exc
            self.counters.stopped = f"{type(exc).__name__}: {exc}"
            self.log.critical(
                "%s: the loop thread stops; the device is no longer served", self.name, exc_info=exc
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            try:
                loop.stop()
                try:
                    self._serve_native()  # what it handed over before it stopped
                finally:
                    self.drain()
            finally:
                self._leave()

    def _serve_native(self) -> int:
        """Take what the native loop handed over and run it; the counters take its figures."""
        loop = self.native
        assert loop is not None
        with self._ring_lock:
            commands, tmrs = self.ring.take_native(loop)
            self._pull_native()
            for tmr in tmrs:
                self._aborted.update(tmr.live_ids)
        self._refresh_native()
        if not commands and not tmrs:
            return 0
        ran = self._dispatch(commands, tmrs, 0)
        self._refresh_native()  # an inline command may have reported the unit attention
        return ran

    def _refresh_native(self) -> None:
        """Declare the extent again if it changed; let C execute unless a unit attention waits
        (`_plane_changed` turns it off the moment one is queued)."""
        loop = self.native
        assert loop is not None
        device = self.device
        version = device.extent_version
        if version != self._extent_version:
            loop.declare(device.data_extent())
            self._extent_version = version
        self._plane_changed()

    def _plane_changed(self) -> None:
        """The device queued or reported a unit attention or changed its extent (any thread, in
        the middle of a command): C executes only while no attention waits and the declared
        extent is current. A stale extent is declared again by this loop thread, which the next
        command reaches (C hands everything to Python meanwhile)."""
        loop = self.native
        if loop is not None:
            device = self.device
            with self._plane_lock:
                if not loop.closed:  # (a thread of the device's may call after the close)
                    loop.enable(not device.unit_attention_pending
                                and device.extent_version == self._extent_version)

    def _pull_native(self) -> None:
        """Take the native loop's figures into the counters (under the ring lock)."""
        loop = self.native
        if loop is None or loop.closed:
            return
        f = loop.figures()
        c = self.counters
        c.add_executed(f["done"], f["reads"], f["writes"], f["bytes_read"], f["bytes_written"],
                       f["latency_seconds"], f["hist"])
        c.wakeups += f["wakeups"]
        c.polled += f["polled"]
        c.poll_misses += f["poll_misses"]
        c.batches += f["batches"]
        c.mapped += f["mapped"]
        c.merged += f["merged"]
        c.poll_probes += f["probes"]
        c.poll_switches += f["poll_switches"]

    def refresh_counters(self) -> Counters:
        """The counters, with what the native loop did up to now (its commands never pass
        through Python); without one, `counters` as it is."""
        if self.native is not None:
            with self._ring_lock:
                self._pull_native()
        return self.counters

    def _watch(self, seconds: float) -> float | None:
        """Watch cmd_head for up to `seconds`: the time waited as soon as the kernel publishes an
        entry, None if none came. Each check is a C call that releases the GIL, and between
        checks the thread yields its CPU: whatever else is runnable there (the initiator, the
        kernel's completion work) runs first, so the watch only uses CPU nobody else wants."""
        has_new = self.ring.has_new
        clock = time.monotonic
        yield_cpu = os.sched_yield
        start = clock()
        deadline = start + seconds
        while not has_new():
            if clock() >= deadline or self._stopping:
                return None
            yield_cpu()
        return clock() - start

    def stop(self) -> None:
        """Ask `run()` to return (from any thread)."""
        self._stopping = True
        with self._life:
            if not self._released:
                os.write(self._stop_w, b"x")

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every command handed to the pool; True if none is left."""
        self._pool.shutdown(wait=True)
        return self.ring.in_flight == 0

    def close(self, on_closed: Callable[[], None] | None = None) -> bool:
        """Close the device, release the ring's hold on the mapping (so the uio can be unmapped),
        close the stop pipe, then call `on_closed` (the caller closes the uio there).

        Never under a running command: if `run()` has not returned yet, a pool chunk runs or an
        asynchronous command is outstanding (call `stop()` first), all of this happens when the
        last of them finishes, on its thread. Returns True if it happened now, False if it was
        deferred. Chunks already handed to the pool still run (and count) before that."""
        with self._life:
            if self._closing:
                return self._released
            self._closing = True
            self._on_closed = on_closed
            now = self._active == 0
            self._released = now
        if not now:
            self.log.warning(
                "%s: commands are still running; the device is closed when the last one finishes",
                self.name,
            )
            return False
        self._release()
        return True

    def _enter(self, *, force: bool = False) -> bool:
        """Count one more user of the device, ring and uio; False (nothing counted) once they
        are released. `force`: work already under way (commands dequeued from the ring)."""
        with self._life:
            if self._released and not force:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._life:
            self._active -= 1
            last = self._closing and self._active == 0 and not self._released
            if last:
                self._released = True
        if last:
            self.log.info("%s: the last running command finished; closing the device", self.name)
            self._release()

    def _release(self) -> None:
        self._pool.shutdown(wait=False)  # idle by now: lets its threads go
        try:
            self.device.close()
        except Exception:  # noqa: BLE001 - the ring and the uio must still be let go
            self.log.exception("%s: closing the device failed", self.name)
        finally:
            if self.native is not None:
                with self._ring_lock:
                    self._pull_native()
                self.device.plane_listener = None
                with self._plane_lock:
                    self.native.close()
            self.ring.close()
            os.close(self._stop_r)
            os.close(self._stop_w)
            on_closed, self._on_closed = self._on_closed, None
            if on_closed is not None:
                on_closed()

    def process(self) -> int:
        """One wake-up: clear the event, dequeue everything new, run it. Returns commands seen.
        Not with a native loop (its thread owns the ring: `run()` serves it)."""
        if self.native is not None:
            raise RingError(f"{self.name}: a native loop serves this ring; use run()")
        self.uio.clear_event()
        plane = self.plane
        fast = 0
        with self._ring_lock:
            if plane is not None and self._extent_version != self.device.extent_version:
                extent = self.device.data_extent()
                # A first extent waits until Python holds no command: those taken without the
                # plane have no fences, and C must not overtake them.
                if plane.declared or extent is None or not self.ring.in_flight:
                    self._extent_version = self.device.extent_version
                    plane.declare(extent)
            if plane is not None and plane.declared:
                plane.begin(enabled=not self.device.unit_attention_pending)
                commands, tmrs = self.ring.dequeue_plane(plane)
                if plane.done:
                    fast = plane.done
                    self._count_plane(plane)
            else:
                commands, tmrs = self.ring.dequeue()
            for tmr in tmrs:
                # Only ids in flight where the TMR sits in the ring: an id completed before it
                # may already belong to a later command (the kernel reuses the lowest free id).
                self._aborted.update(tmr.live_ids)
        return self._dispatch(commands, tmrs, fast)

    def _dispatch(self, commands: list[RingCommand], tmrs: list[RingTmr], fast: int) -> int:
        """Run the commands a wake-up gave Python (`fast`: those C executed and completed in the
        same wake-up, not kicked yet). Returns the commands seen."""
        for tmr in tmrs:
            self.log.info(
                "%s: TMR type %d for commands %s (in flight: %s)",
                self.name,
                tmr.tmr_type,
                tmr.cmd_ids,
                tmr.live_ids,
            )
        if fast:
            self.uio.kick()  # the data plane's completions (Python's come with their own)
        if not commands:
            if tmrs and not fast:
                self.uio.kick()
            return fast
        inline: list[tuple[RingCommand, Response]] = []
        blocking: list[tuple[RingCommand, Command]] = []
        retried: list[tuple[RingCommand, Command]] = []
        now = time.monotonic()
        debug = self._logger.isEnabledFor(logging.DEBUG)
        serial = self.device.serial_commands
        queue_rest = serial and self._pool_busy > 0  # keep arrival order behind the worker
        is_inline = self.device.is_inline
        aborted = self._aborted
        native = self.native
        for rc in commands:
            rc.started = now
            if debug:
                self.log.debug("%s: cmd %d cdb %s", self.name, rc.cmd_id, rc.cdb.hex())
            cmd = Command(
                rc.cdb,
                rc.data_out,
                None if rc.data_in is rc.data_out else rc.data_in,
                rc.cmd_id,
                lengths=(rc.out_len, rc.in_len),
                native_error=rc.native_error,
                arrived=rc.arrived or now,  # when C dequeued it: before this thread woke
            )
            if rc.retried:
                # A native loop's failed RBD job: commands the loop handed while it ran may
                # wait for it, on any worker (D124); it waits for nothing older (none overlaps
                # it), so it runs here, first.
                retried.append((rc, cmd))
                continue
            if not queue_rest and self._is_inline(is_inline, rc.cdb) and not (
                    native is not None and native.fence_busy(rc.cmd_id)):
                # (one that must wait for a job of the native loop waits on a worker)
                if aborted and rc.cmd_id in aborted:  # named by a TMR in this very batch
                    inline.append((rc, Response(status=Status.TASK_ABORTED)))
                    continue
                result = self._execute(rc, cmd)
                if isinstance(result, Future):
                    result = self._resolved(rc, result)
                inline.append((rc, result))
            else:
                blocking.append((rc, cmd))
                queue_rest = serial
        if retried:
            self._enter(force=True)
            self._run_chunk(retried, pooled=False)
        if len(blocking) == 1 and not inline and not (serial and self._pool_busy) \
                and self.device.lone_commands_on_loop \
                and not (native is not None and native.fence_busy(blocking[0][0].cmd_id)):
            # A lone blocking command (queue depth 1): handing it to a worker costs two thread
            # switches and the loop would only wait for it anyway, so run it here — unless it
            # waits for the native loop: a job it overlaps that fails comes back through
            # this thread (D124).
            self._enter(force=True)
            self._run_chunk(blocking, pooled=False)
        elif blocking:
            # One pool task per worker, commands dealt round-robin: a batch of 32 costs 4 thread
            # hand-offs and 4 kicks instead of 32 of each. A serial device gets one task, so
            # its commands keep their arrival order.
            n = 1 if serial else min(self._workers, len(blocking))
            with self._ring_lock:
                self._pool_busy += n
            for i in range(n):
                self._enter(force=True)  # a queued chunk counts: close() waits for it
                try:
                    self._pool.submit(self._run_chunk, blocking[i::n], pooled=True)
                except RuntimeError:  # the pool is shut down (drained): run the chunk here
                    self._run_chunk(blocking[i::n], pooled=True)
        if inline:
            with self._ring_lock:
                for rc, resp in inline:
                    self._complete_locked(rc, resp)
                self.counters.batches += 1
            self.uio.kick()
        return len(commands) + fast

    def _count_plane(self, plane: DataPlane) -> None:
        """Take the data plane's figures into the counters (under the ring lock): the same ones
        `_complete_one` keeps for a command completed GOOD from Python."""
        c = self.counters
        c.add_executed(plane.done, plane.reads, plane.writes, plane.bytes_read,
                       plane.bytes_written, plane.latency_seconds, plane.hist)
        c.batches += 1
        plane.reset_figures()

    # ------------------------------------------------------------------------------------------
    # Execution and completion

    def _execute(self, rc: RingCommand, cmd: Command) -> Response | Future[Response]:
        """`device.execute(cmd)` behind the guard: a Response or a Future, whatever it does."""
        try:
            result = self.device.execute(cmd)
        except Exception as exc:  # noqa: BLE001 - the runner's guard (module docstring)
            return self._failure(rc, cmd, exc)
        if isinstance(result, (Response, Future)):
            return result
        return self._failure(rc, cmd, TypeError(f"execute() returned {type(result).__name__}"))

    def _resolved(self, rc: RingCommand, future: Future[Response]) -> Response:
        """The Response a finished (or, on the loop thread, awaited) Future stands for."""
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the runner's guard
            return self._failure(rc, None, exc)
        if isinstance(result, Response):
            return result
        return self._failure(rc, None, TypeError(f"the Future gave {type(result).__name__}"))

    def _failure(self, rc: RingCommand, cmd: Command | None, exc: BaseException) -> Response:
        """The guard's answer for a command whose device threw `exc` at the runner: CHECK
        CONDITION built by the device's one converter (`respond_error`) — the exception's own
        sense if it is a ScsiError, else HARDWARE ERROR 44/00 — or, should that fail too, a
        fixed HARDWARE ERROR. Logs the traceback; `failed` and `Counters.failures` record it."""
        self.failed = exc
        with self._ring_lock:
            self.counters.failures += 1
        self.log.error(
            "%s: cmd %d (cdb %s): %s escaped the device; answering CHECK CONDITION",
            self.name,
            rc.cmd_id,
            rc.cdb.hex(),
            type(exc).__name__,
            exc_info=exc,
        )
        err = exc if isinstance(exc, ScsiError) else HardwareError(f"{type(exc).__name__}: {exc}")
        try:
            resp = self.device.respond_error(cmd or Command(rc.cdb), err)
        except Exception:  # noqa: BLE001 - the last resort must not fail
            self.log.exception("%s: building the error response failed", self.name)
            return _HARDWARE_ERROR
        return resp if isinstance(resp, Response) else _HARDWARE_ERROR

    def _after_jobs(self, rc: RingCommand) -> None:
        """Wait until no job of the native loop overlaps `rc`, nor an older *ordered*
        command Python holds (the loop handed `rc` over rather than wait itself:
        `NativeLoop.fence_busy`). Each job ends by itself (a worker's copy, or a librbd
        operation within ``osd_op_timeout``), and an older command waits only for older ones;
        the caller has answered what its chunk ran before `rc` (it may be what `rc` waits for).
        A device that counts its commands' time from their arrival (``ceph``) then finds what
        the wait took gone."""
        native = self.native
        if native is None:
            return
        while native.fence_busy(rc.cmd_id, JOB_WAIT_SECONDS) and not native.closed:
            self.log.debug("%s: cmd %d waits for the native loop's overlapping jobs",
                           self.name, rc.cmd_id)

    def _is_inline(self, is_inline: Callable[[bytes], bool], cdb: bytes) -> bool:
        try:
            return is_inline(cdb)
        except Exception:  # noqa: BLE001 - the guard: let execute() meet (and report) it
            self.log.exception("%s: is_inline(%s) failed", self.name, cdb.hex())
            return False

    def _run_chunk(self, items: list[tuple[RingCommand, Command]], pooled: bool) -> None:
        """Run `items` in order, then complete them together with one kick — except that a
        command that took longer than `PROMPT_SECONDS` is completed at once (with those done
        before it): its answer, due within the kernel's ``cmd_time_out``, does not wait for
        the chunk's later commands. `pooled`: this is a pool task (counted in `_pool_busy`
        until it has completed its commands). The caller has counted the chunk with
        `_enter`; it is let go here."""
        try:
            done: list[tuple[RingCommand, Response]] = []
            last = len(items) - 1
            for i, (rc, cmd) in enumerate(items):
                if rc.cmd_id in self._aborted:  # a TMR named it before it started
                    done.append((rc, Response(status=Status.TASK_ABORTED)))
                    continue
                began = time.monotonic()
                native = self.native
                if native is not None and native.fence_busy(rc.cmd_id):
                    # It waits for older commands: those this chunk ran are answered first
                    # (the one it waits for may be among them).
                    if done:
                        with self._ring_lock:
                            for rc_done, resp in done:
                                self._complete_locked(rc_done, resp)
                        done.clear()
                        self._kick(quiet=True)
                    self._after_jobs(rc)
                result = self._execute(rc, cmd)
                if isinstance(result, Future):
                    self._enter(force=True)  # the command runs until the Future resolves
                    result.add_done_callback(partial(self._on_done, rc))
                    continue
                done.append((rc, result))
                if i < last and time.monotonic() - began > PROMPT_SECONDS:
                    with self._ring_lock:
                        for rc_done, resp in done:
                            self._complete_locked(rc_done, resp)
                    done.clear()
                    self._kick(quiet=True)
            with self._ring_lock:
                for rc, resp in done:
                    self._complete_locked(rc, resp)
                if pooled:
                    self._pool_busy -= 1
            if done:
                self._kick(quiet=pooled)
        finally:
            self._leave()

    def _on_done(self, rc: RingCommand, future: Future[Response]) -> None:
        """Future callback (on whichever thread resolved it): complete the command."""
        try:
            resp = self._resolved(rc, future)
            with self._ring_lock:
                self._complete_locked(rc, resp)
            self._kick(quiet=True)
        finally:
            self._leave()

    def _kick(self, *, quiet: bool) -> None:
        """Kick the kernel. `quiet` (off the loop thread): a failing kick is logged, not raised
        — the loop thread meets the same error on its own uio calls and stops there."""
        if not quiet:
            self.uio.kick()
            return
        try:
            self.uio.kick()
        except (OSError, ValueError) as exc:
            self.log.warning("%s: kick failed: %s", self.name, exc)

    def _complete_locked(self, rc: RingCommand, resp: Response) -> None:
        """Complete `rc` with `resp` (under `_ring_lock`). A response the ring cannot carry is
        replaced by HARDWARE ERROR; a completion the ring refuses (not in flight) is logged."""
        try:
            self._complete_one(rc, resp)
        except RingError as exc:
            self.failed = exc
            self.log.error("%s: cmd %d: completion refused: %s", self.name, rc.cmd_id, exc)
        except Exception as exc:  # noqa: BLE001 - the guard: a malformed Response
            self.failed = exc
            self.counters.failures += 1
            self.log.error(
                "%s: cmd %d: unusable response %r; answering HARDWARE ERROR",
                self.name,
                rc.cmd_id,
                resp,
                exc_info=exc,
            )
            try:
                self.ring.complete(rc.cmd_id, _HARDWARE_ERROR.status, _HARDWARE_ERROR.sense)
            except RingError as again:
                self.log.error("%s: cmd %d: completion refused: %s", self.name, rc.cmd_id, again)

    def _complete_one(self, rc: RingCommand, resp: Response) -> None:
        c = self.counters
        if self.plane is not None:
            self.plane.release(rc.cmd_id)
        if rc.started:
            took = time.monotonic() - rc.started
            c.latency_seconds += took
            c.latency_hist[latency_bucket(took)] += 1
        c.commands += 1
        if self._aborted and rc.cmd_id in self._aborted:
            self._aborted.discard(rc.cmd_id)
            c.aborted += 1
        op = rc.cdb[0]
        length = resp.data_in_length
        if resp.status:  # not GOOD (0)
            c.errors += 1
            if self._logger.isEnabledFor(logging.DEBUG):
                self.log.debug(
                    "%s: cmd %d cdb %s -> status %#x sense %s",
                    self.name,
                    rc.cmd_id,
                    rc.cdb.hex(),
                    resp.status,
                    resp.sense.hex(),
                )
        elif op in _READ_OPS:
            c.reads += 1
            c.bytes_read += rc.in_len if length is None else length
        elif op in _WRITE_OPS:
            c.writes += 1
            c.bytes_written += rc.out_len
        read_len = None
        if length is not None:
            total_in = rc.in_len
            if 0 < length < total_in:
                read_len = length  # a residual: the initiator receives `length` bytes
            elif length == 0 and total_in and not resp.status:
                # TCMU cannot say "zero bytes" (read_len 0 means the whole buffer): send zeros
                # rather than whatever the data area held.
                for buf in rc.data_in:
                    buf[:] = bytes(len(buf))
        self.ring.complete(rc.cmd_id, resp.status, resp.sense, read_len)


def serve_in_thread(runner: DeviceRunner) -> tuple[threading.Thread, Callable[[], None]]:
    """Start `runner.run()` on a daemon thread; returns the thread and a stop-and-join function."""
    thread = threading.Thread(target=runner.run, name=f"tcmu-loop-{runner.name}", daemon=True)
    thread.start()

    def stop() -> None:
        runner.stop()
        thread.join(timeout=30)

    return thread, stop
