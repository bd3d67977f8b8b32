"""Scatter/gather lists: the byte ranges of a command's data buffers, without copying.

A TCMU command's data is a list of views of the kernel's data area (iovecs); a handler addresses
it as one run of bytes, the concatenation of the list. These are the few operations every layer
needs on such a list (the block device, the raw image backend, the tape drive and the cartridge
file): one home, so that the edge cases (a range ending inside a view, empty views, a range past
the end) are handled once.

Rules this module obeys:

- Pure: no I/O, no state; views in, views out. Nothing is copied except by `gather`.
- A range beyond the end of the list is cut at the end (as allocation-length truncation is);
  the functions never raise for it.
- The views returned are views of the same memory: they die with the command (see
  `tcmu_py.device.command`).
- Hot path: each function is one Python call with a plain loop; callers on the READ/WRITE path
  call at most one of them per command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

Buffer = bytes | bytearray | memoryview
B = TypeVar("B", bound=Buffer)


def slice_views(bufs: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """The sub-views of `bufs` covering bytes [offset, offset+length) of their concatenation."""
    out = []
    pos = 0
    end = offset + length
    for buf in bufs:
        n = len(buf)
        lo = max(offset, pos)
        hi = min(end, pos + n)
        if lo < hi:
            out.append(buf[lo - pos : hi - pos])
        pos += n
        if pos >= end:
            break
    return out


def gather(bufs: Sequence[memoryview], offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the concatenation of `bufs`, copied into one object."""
    return b"".join(slice_views(bufs, offset, length))


def scatter(bufs: Sequence[memoryview], offset: int, data: Buffer) -> int:
    """Copy `data` into bytes [offset, offset+len(data)) of the concatenation of `bufs`, as much
    of it as fits; returns the bytes copied (fewer than `data` when the list ends first)."""
    src = memoryview(data).cast("B")
    done = 0
    for view in slice_views(bufs, offset, len(src)):
        n = len(view)
        view[:] = src[done : done + n]
        done += n
    return done


def skip(bufs: Sequence[B], n: int) -> list[B | memoryview]:
    """`bufs` without their first `n` bytes (what is left after a short read or write); whole
    buffers are kept as they are, the one cut in two is sliced through a memoryview."""
    out: list[B | memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:] if n else b)
        n = 0
    return out


def zero(bufs: Sequence[memoryview]) -> None:
    """Fill every view of `bufs` with zero bytes."""
    for b in bufs:
        b[:] = bytes(len(b))
