"""Run commands against a device, directly or through the real ring code and a FakeKernel.

`run_command(device, cdb, ...)` calls the device's dispatcher with buffers of the given sizes: the
fastest way to test command semantics. `RingHarness` goes the whole way — FakeKernel queues the
command into a ring, the production `DeviceRunner` dequeues and completes it, and the fake kernel
reaps it byte for byte — so a handler tested with it is tested with the code that serves it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tcmu_py.device.command import Command
from tcmu_py.device.core import ScsiDevice
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.fake_uio import RelayedKicks


@dataclass
class Result:
    """A completed command as the initiator sees it."""

    status: int
    sense: bytes
    data: bytes  # the Data-In bytes the initiator received (after any residual)

    @property
    def good(self) -> bool:
        return self.status == 0

    @property
    def sense_codes(self) -> tuple[int, int, int]:
        """(sense key, ASC, ASCQ), or (0, 0, 0) without sense."""
        if not self.sense:
            return (0, 0, 0)
        s = parse_sense(self.sense)
        return (s.sense_key, s.asc, s.ascq)

    @property
    def information(self) -> int | None:
        return parse_sense(self.sense).info if self.sense else None

    def __repr__(self) -> str:
        k, a, q = self.sense_codes
        return (
            f"Result(status={self.status:#x}, sense={k:X}/{a:02X}/{q:02X}, data={len(self.data)}B)"
        )


def _split(data: bytearray, pieces: int, rng: random.Random | None) -> list[memoryview]:
    view = memoryview(data)
    if pieces <= 1 or len(data) < 2 or rng is None:
        return [view] if len(data) else []
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1)))
    bounds = [0, *cuts, len(data)]
    return [view[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def run_command(
    device: ScsiDevice,
    cdb: bytes,
    data_out: bytes = b"",
    data_in_len: int = 0,
    *,
    split: int = 1,
    rng: random.Random | None = None,
) -> Result:
    """Execute one command on `device` synchronously, without a ring.

    The data buffer is `data_out` for a Data-Out command, or `data_in_len` zero bytes for a Data-In
    command (as TCMU passes one buffer list whose direction follows the CDB); `split` cuts it into
    that many iovec-like views at random points.
    """
    buf = bytearray(data_out) if data_out else bytearray(data_in_len)
    views: Sequence[memoryview] = _split(buf, split, rng)
    cmd = Command(bytes(cdb), views)
    resp: Any = device.execute(cmd)
    if isinstance(resp, Future):
        resp = resp.result(timeout=30)
    n = len(buf) if resp.data_in_length is None else resp.data_in_length
    data = bytes(buf[:n]) if not data_out else b""
    return Result(resp.status, resp.sense, data)


class _SerialisedUio(RelayedKicks):
    """A FakeUio whose kernel side is entered by one thread at a time.

    The production runner kicks from its worker threads; the real kernel serialises itself, the
    FakeKernel (plain Python) does not, so every call into it takes the harness lock.
    """

    def __init__(self, uio: Any, lock: threading.Condition) -> None:
        self._uio = uio
        self._lock = lock
        self.buffer = uio.buffer

    def fileno(self) -> int:
        return int(self._uio.fileno())

    def clear_event(self) -> None:
        self._uio.clear_event()

    def kick(self) -> None:
        with self._lock:
            self._uio.kick()
            self._lock.notify_all()

    def close(self) -> None:
        self._close_relay()
        self._uio.close()


class RingHarness:
    """FakeKernel -> the production Ring and DeviceRunner -> `device`, and back.

    The runner is driven on the calling thread (`process()` per wake-up), its worker pool runs
    blocking commands as in production. `run()` submits one command and waits (bounded) for the
    fake kernel to reap it. `close()` checks that every command was completed exactly once.
    """

    def __init__(
        self,
        device: ScsiDevice,
        *,
        workers: int = 4,
        data_plane: bool | None = None,
        native: bool | None = None,
        poll_seconds: float | None = None,
        **kernel_args: Any,
    ) -> None:
        """`data_plane`, `native`, `poll_seconds`: as `DeviceRunner`'s (the C data plane for a
        device with a file extent, on its own C thread; the busy-poll's watch); None: the
        runner's defaults. With a native loop the runner serves from a thread of its own
        (`run()`), and `wait` only waits."""
        from tcmu_py.device.runner import DeviceRunner
        from tcmu_py.testing.fake_kernel import FakeKernel
        from tcmu_py.testing.fake_uio import FakeUio

        self.kernel = FakeKernel(**kernel_args)
        self._lock = threading.Condition()
        self.uio = _SerialisedUio(FakeUio(self.kernel), self._lock)
        extra: dict[str, Any] = {}
        if data_plane is not None:
            extra["data_plane"] = data_plane
        if native is not None:
            extra["native"] = native
        if poll_seconds is not None:
            extra["poll_seconds"] = poll_seconds
        self.runner = DeviceRunner(self.uio, device, workers=workers, **extra)
        self.device = device
        self._serving: Any = None
        if self.runner.native is not None:
            from tcmu_py.device.runner import serve_in_thread

            self._serving = serve_in_thread(self.runner)

    def hold(self) -> Any:
        """A context manager that keeps a native loop from dequeuing while a batch is submitted
        (so that it sees the batch at once, as `process()` would); without one, the lock."""
        import contextlib

        loop = self.runner.native

        @contextlib.contextmanager
        def held() -> Any:
            with self._lock:
                if loop is None:
                    yield
                    return
                loop.hold()
                try:
                    yield
                finally:
                    loop.release()

        return held()

    def submit(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Any:
        with self._lock:
            return self.kernel.submit(cdb, data_out, data_in_len)

    def submit_many(self, items: Sequence[tuple[bytes, bytes, int]]) -> list[Any]:
        """Submit (cdb, data_out, data_in_len) items as one batch (`hold`): the runner's next
        wake-up, or the native loop, sees them all at once. Returns their `Pending`s."""
        with self.hold():
            return [self.kernel.submit(*item) for item in items]

    def wait(self, pending: Sequence[Any], timeout: float = 30.0) -> None:
        """Process the ring until every one of `pending` is reaped, or fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if self._serving is None:
                self.runner.process()
            with self._lock:
                if all(p.done for p in pending):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"commands not completed in {timeout}s: "
                        f"{[p for p in pending if not p.done]}"
                    )
                self._lock.wait(min(left, 0.05))

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        p = self.submit(cdb, data_out, data_in_len)
        self.wait([p])
        return Result(p.status, p.sense, p.data_in)

    def close(self) -> None:
        """Stop the runner and check the ring is idle (no lost or doubled completion)."""
        if self._serving is not None:
            self._serving[1]()  # stop and join: the runner drains as it leaves run()
            self.uio.kick()  # C's last kick may still be on its way through the relay thread
        else:
            self.runner.drain()
            self.runner.process()
        with self._lock:
            self.kernel.assert_idle()
        self.runner.close()
        self.uio.close()
