"""FakeUio: the :class:`tcmu_py.uio.UioDevice` surface over a :class:`FakeKernel`.

``fileno()`` is a real eventfd, so ``select``/``poll``/``selectors`` loops work unchanged:
it becomes readable whenever the fake kernel queues an entry on the ring (the kernel's
``uio_event_notify``), :meth:`FakeUio.clear_event` drains it, and :meth:`FakeUio.kick`
makes the fake kernel reap completions, as a 4-byte write to ``/dev/uioN`` does.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from types import TracebackType

from tcmu_py.testing.fake_kernel import FakeKernel

__all__ = ["FakeUio", "KickRelay", "RelayedKicks"]


class KickRelay:
    """An eventfd whose every write (a native loop's kick from C) makes a thread call `kick`.

    The real uio takes a kick as a write to its fd; the fake kernel's kick is a Python call,
    so C writes here and this thread makes the call."""

    def __init__(self, kick: Callable[[], None], name: str = "fake-kick") -> None:
        self._kick = kick
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == self._stop_r for fd, _ in events):
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.fd)
            self._kick()

    def close(self) -> None:
        """Stop the thread (after one last kick for what C wrote before) and close the fds."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=10)
        with contextlib.suppress(BlockingIOError):
            if os.eventfd_read(self.fd):
                self._kick()
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


class RelayedKicks:
    """What a native loop needs of a fake uio: 8-byte event reads (an eventfd) and a kick fd
    whose writes reach the class's `kick()` through a `KickRelay`. Call `_close_relay` in
    `close`."""

    event_size = 8
    kick_size = 8
    _relay: KickRelay | None = None

    def kick(self) -> None:
        raise NotImplementedError

    def kick_fd(self) -> int:
        """An eventfd the native loop's C thread kicks through (`KickRelay`)."""
        if self._relay is None:
            self._relay = KickRelay(self.kick)
        return self._relay.fd

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None


class FakeUio(RelayedKicks):
    """A stand-in for an open ``/dev/uioN`` of a TCMU device, backed by ``kernel``.

    ``kick()`` runs the fake kernel's completion handling in the calling thread and
    propagates its :class:`~tcmu_py.testing.FakeKernelError`.
    """

    def __init__(self, kernel: FakeKernel, name: str = "tcm-user/1/fake/fake/") -> None:
        self.kernel = kernel
        self.name = name
        self.buffer = kernel.buffer
        self.kicks = 0
        self._fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        kernel.add_listener(self._on_event)
        if kernel.events:
            # Entries queued before we "opened" the device are already waiting.
            self._on_event()

    def _on_event(self) -> None:
        if self._fd is not None:
            os.eventfd_write(self._fd, 1)

    def fileno(self) -> int:
        """The eventfd; readable while kernel events are unacknowledged."""
        if self._fd is None:
            raise ValueError("FakeUio is closed")
        return self._fd

    def clear_event(self) -> None:
        """Acknowledge pending events (non-blocking; nothing happens if there are none)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fileno())

    def kick(self) -> None:
        """Tell the fake kernel that cmd_tail moved: it reaps and requeues waiting commands."""
        self.fileno()
        self.kicks += 1
        self.kernel.kick()

    def close(self) -> None:
        """Close the eventfd (idempotent). The fake kernel and its buffer stay usable."""
        self._close_relay()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FakeUio:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
