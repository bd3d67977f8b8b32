"""FakeUio: the :class:`tcmu_py.uio.UioDevice` surface over a :class:`FakeKernel`.

``fileno()`` is a real eventfd, so ``select``/``poll``/``selectors`` loops work unchanged:
it becomes readable whenever the fake kernel queues an entry on the ring (the kernel's
``uio_event_notify``), :meth:`FakeUio.clear_event` drains it, and :meth:`FakeUio.kick`
makes the fake kernel reap completions, as a 4-byte write to ``/dev/uioN`` does.
"""

from __future__ import annotations

import contextlib
import os
from types import TracebackType

from tcmu_py.testing.fake_kernel import FakeKernel

__all__ = ["FakeUio"]


class FakeUio:
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
