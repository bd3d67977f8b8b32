"""DeviceRunner: moves commands between one device's ring and its `ScsiDevice`.

The cycle (as tcmu-runner does it, and as the kernel expects): wait for the uio fd to be readable
-> clear the event -> dequeue every new entry in one call -> run each command -> complete -> one
kick per batch.

Where a command runs:
- commands whose handler is marked `inline` (INQUIRY, READ CAPACITY, MODE SENSE ...) run on the
  loop thread, and are completed together with one kick;
- everything else goes to a bounded worker pool (`workers` threads; the backend's blocking I/O
  releases the GIL there), dealt round-robin in one chunk per worker, each chunk completed with
  one kick — except a wake-up that brings a single such command (queue depth 1), which runs on
  the loop thread: the hand-off would cost more than it saves;
- a device with `serial_commands` (tapes, changers) gets exactly one worker, and its commands run
  one at a time, in arrival order: once one of them is queued for the worker, everything after
  it is queued behind it (inline ones too), and a lone command runs on the loop thread only while
  the worker is idle.

Every dequeued command is completed exactly once, including commands named by a TMR abort: a
command that has not started yet is completed with TASK ABORTED without running; one that is
running finishes normally (the kernel discards the status of a command it aborted).

Ring completions are serialised by `self._ring_lock` (cmd_tail has one writer at a time).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from tcmu_py.device.command import Command, Response
from tcmu_py.device.core import ScsiDevice
from tcmu_py.ring import Ring, RingCommand
from tcmu_py.scsi.constants import Status

log = logging.getLogger(__name__)

_READ_OPS = frozenset({0x08, 0x28, 0xA8, 0x88})
_WRITE_OPS = frozenset({0x0A, 0x2A, 0xAA, 0x8A})


class UioLike(Protocol):
    """The surface of `tcmu_py.uio.UioDevice` (and `tcmu_py.testing.FakeUio`) the runner uses."""

    buffer: Any

    def fileno(self) -> int: ...
    def clear_event(self) -> None: ...
    def kick(self) -> None: ...


#: Latency histogram: bucket 0 holds commands under 1 µs, bucket i >= 1 those in
#: [2^((i-1)/4), 2^(i/4)) µs — four buckets per doubling, so a percentile read from it is within
#: 19 % of the true value. The last bucket also takes everything longer (2^(127/4) µs ≈ 58 min).
LATENCY_BUCKETS = 128


def latency_bucket(seconds: float) -> int:
    """The `Counters.latency_hist` index of a command that took `seconds`."""
    us = seconds * 1e6
    if us < 1.0:
        return 0
    return min(LATENCY_BUCKETS - 1, int(math.log2(us) * 4) + 1)


def latency_bucket_upper(index: int) -> float:
    """Upper edge of bucket `index`, in seconds."""
    return float(2.0 ** (index / 4) / 1e6)


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
    busy_seconds: float = 0.0
    latency_seconds: float = 0.0
    latency_hist: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    started: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, Any]:
        """All counters (the histogram as a list copy) plus `uptime` (seconds since started)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["latency_hist"] = list(self.latency_hist)
        out["uptime"] = time.monotonic() - self.started
        return out


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
    ) -> None:
        """`adopt`: take over entries already on the ring; only right after `reset_ring`
        (see `tcmu_py.ring.Ring`). `poll_seconds`: the longest busy-poll watch for the next
        command after a wake-up that brought a single one; 0 turns it off (see `run`)."""
        self.uio = uio
        self.device = device
        self.name = name or device.config.name
        self.log = logging.LoggerAdapter(log, {"device": self.name})
        self.ring = Ring(uio.buffer, adopt=adopt)
        self.counters = Counters()
        self._ring_lock = threading.Lock()
        self._workers = 1 if device.serial_commands else max(1, workers)
        self._pool = ThreadPoolExecutor(
            max_workers=1 if device.serial_commands else max(1, workers),
            thread_name_prefix=f"tcmu-{self.name}",
        )
        self._aborted: set[int] = set()
        self._logger = self.log.logger  # isEnabledFor without the adapter's extra call
        self._pool_busy = 0  # chunks handed to the pool and not finished; under _ring_lock
        self.poll_seconds = poll_seconds
        self._gap = 0.0  # average gap between the end of a wake-up's work and the next command
        self._stop_r, self._stop_w = os.pipe()
        self._stopping = False
        self.failed: BaseException | None = None

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
        poller = select.poll()
        poller.register(self.uio.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        uio_fd = self.uio.fileno()
        gone = select.POLLERR | select.POLLHUP | select.POLLNVAL
        usual = [(uio_fd, select.POLLIN)]
        clock = time.monotonic
        ready = False  # the watch saw new entries: skip poll(2)
        idle_since = 0.0  # when the last wake-up's work ended (0: no work yet)
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
        finally:
            self.drain()

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
        os.write(self._stop_w, b"x")

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every command handed to the pool; True if none is left."""
        self._pool.shutdown(wait=True)
        return self.ring.in_flight == 0

    def close(self) -> None:
        """Stop the pool, close the device, release the ring's hold on the mapping (so the uio
        can be unmapped) and close the stop pipe. The uio itself is the caller's to close."""
        self._pool.shutdown(wait=True)
        try:
            self.device.close()
        finally:
            self.ring.close()
            os.close(self._stop_r)
            os.close(self._stop_w)

    def process(self) -> int:
        """One wake-up: clear the event, dequeue everything new, run it. Returns commands seen."""
        self.uio.clear_event()
        with self._ring_lock:
            commands, tmrs = self.ring.dequeue()
            for tmr in tmrs:
                self._aborted.update(tmr.cmd_ids)
        for tmr in tmrs:
            self.log.info("%s: TMR type %d for commands %s", self.name, tmr.tmr_type, tmr.cmd_ids)
        if not commands:
            if tmrs:
                self.uio.kick()
            return 0
        inline: list[tuple[RingCommand, Response]] = []
        blocking: list[tuple[RingCommand, Command]] = []
        now = time.monotonic()
        debug = self._logger.isEnabledFor(logging.DEBUG)
        serial = self.device.serial_commands
        queue_rest = serial and self._pool_busy > 0  # keep arrival order behind the worker
        is_inline = self.device.is_inline
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
            )
            if not queue_rest and is_inline(rc.cdb):
                result = self.device.execute(cmd)
                if isinstance(result, Future):
                    result = result.result()
                inline.append((rc, result))
            else:
                blocking.append((rc, cmd))
                queue_rest = serial
        if len(blocking) == 1 and not inline and not (serial and self._pool_busy):
            # A lone blocking command (queue depth 1): handing it to a worker costs two thread
            # switches and the loop would only wait for it anyway, so run it here.
            self._run_chunk(blocking, pooled=False)
        elif blocking:
            # One pool task per worker, commands dealt round-robin: a batch of 32 costs 4 thread
            # hand-offs and 4 kicks instead of 32 of each. A serial device gets one task, so
            # its commands keep their arrival order.
            n = 1 if serial else min(self._workers, len(blocking))
            with self._ring_lock:
                self._pool_busy += n
            for i in range(n):
                self._pool.submit(self._run_chunk, blocking[i::n], pooled=True)
        if inline:
            with self._ring_lock:
                for rc, resp in inline:
                    self._complete_locked(rc, resp)
                self.counters.batches += 1
            self.uio.kick()
        return len(commands)

    # ------------------------------------------------------------------------------------------
    # Execution and completion

    def _run_chunk(self, items: list[tuple[RingCommand, Command]], pooled: bool) -> None:
        """Run `items` in order, then complete them together with one kick. `pooled`: this is a
        pool task (counted in `_pool_busy` until it has completed its commands)."""
        done: list[tuple[RingCommand, Response]] = []
        for rc, cmd in items:
            try:
                if rc.cmd_id in self._aborted:  # a TMR named it before it started
                    done.append((rc, Response(status=Status.TASK_ABORTED)))
                    continue
                result = self.device.execute(cmd)
                if isinstance(result, Future):
                    result.add_done_callback(
                        lambda f, rc=rc: self._complete(rc, f.result())  # type: ignore[misc]
                    )
                    continue
                done.append((rc, result))
            except BaseException as exc:  # pragma: no cover - execute() never raises
                self.log.exception("%s: runner failure on cmd %d", self.name, rc.cmd_id)
                self.failed = exc
                done.append((rc, Response(status=Status.BUSY)))
        with self._ring_lock:
            for rc, resp in done:
                self._complete_locked(rc, resp)
            if pooled:
                self._pool_busy -= 1
        if done:
            self.uio.kick()

    def _complete(self, rc: RingCommand, resp: Response) -> None:
        with self._ring_lock:
            self._complete_locked(rc, resp)
        self.uio.kick()

    def _complete_locked(self, rc: RingCommand, resp: Response) -> None:
        c = self.counters
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
