"""Sparse-file primitives: punching holes and finding the allocated runs of a file.

Facts this module relies on (Linux, fallocate(2) and lseek(2)):

- ``fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len)`` deallocates the whole
  file-system blocks inside the range and zeroes the partial blocks at its edges; the file size does
  not change and the range reads as zeros afterwards. Python's `os` has no binding for the punch
  flags, so it is called through libc with ctypes.
- ``lseek(fd, pos, SEEK_DATA)`` / ``SEEK_HOLE`` find the next allocated / unallocated byte at or
  after `pos`; ``SEEK_DATA`` fails with ENXIO when no data follows. Data still in the page cache
  (delayed allocation) counts as data on ext4, XFS, btrfs and tmpfs.
- Some file systems (ZFS with compression) turn written zero blocks into holes. Thin accounting
  assumes written data stays allocated until we punch it, so `probe_filesystem` refuses those.

All functions work on raw file descriptors and use positional I/O only; none depends on or keeps
the file offset, so they may run on several threads at once on the same descriptor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Largest iovec count one preadv/pwritev call takes (Linux UIO_MAXIOV).
IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length); it reads as zeros afterwards. Raises OSError."""
    if length <= 0:
        return
    while _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(PUNCH_HOLE, {offset}, {length}): {os.strerror(err)}")


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Allocated byte runs ``(run_start, run_end)`` of the file within [start, end), in order."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def unit_runs(fd: int, unit: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Merged ranges ``(first_unit, last_unit)`` of `unit`-byte units holding any allocated byte
    of [start, end), in order. After a hole the search resumes at the next unit boundary, so the
    cost is two lseeks per run of mapped units, however fragmented the units are inside."""
    pos = start
    cur_a = cur_b = -1
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        a, b = data // unit, -(-min(hole, end) // unit)
        if a <= cur_b:
            cur_b = b
        else:
            if cur_b >= 0:
                yield cur_a, cur_b
            cur_a, cur_b = a, b
        pos = b * unit
    if cur_b >= 0:
        yield cur_a, cur_b


def allocated_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of [start, end) that the file system reports as data."""
    return sum(e - s for s, e in data_runs(fd, start, end))


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The part of `bufs` left after the first `n` bytes."""
    while n and bufs:
        first = bufs[0]
        if n >= first.nbytes:
            n -= first.nbytes
            bufs = bufs[1:]
        else:
            bufs = [first[n:], *bufs[1:]]
            n = 0
    return bufs


def _flat(bufs: Sequence[memoryview]) -> list[memoryview]:
    return [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in bufs if b.nbytes]


def pread_all(fd: int, offset: int, bufs: Sequence[memoryview]) -> None:
    """Fill every byte of `bufs` from `offset`. Raises OSError(EIO) if the file ends first."""
    if len(bufs) <= IOV_MAX:  # fast path: one call fills it all
        n = os.preadv(fd, bufs, offset)
        if n == sum(b.nbytes for b in bufs):
            return
        if n == 0:
            raise OSError(errno.EIO, f"read at {offset}: unexpected end of file")
        pread_all(fd, offset + n, _advance(_flat(bufs), n))
        return
    todo = _flat(bufs)
    while todo:
        n = os.preadv(fd, todo[:IOV_MAX], offset)
        if n == 0:
            raise OSError(errno.EIO, f"read at {offset}: unexpected end of file")
        offset += n
        todo = _advance(todo, n)


def pwrite_all(fd: int, offset: int, bufs: Sequence[memoryview], length: int = -1) -> None:
    """Write every byte of `bufs` at `offset` (retrying short writes). `length`, if known, is
    their total size. Raises OSError."""
    if length >= 0 and len(bufs) <= IOV_MAX:  # fast path: one call writes it all
        n = os.pwritev(fd, bufs, offset)
        if n == length:
            return
        pwrite_all(fd, offset + n, _advance(_flat(bufs), n))
        return
    todo = _flat(bufs)
    while todo:
        n = os.pwritev(fd, todo[:IOV_MAX], offset)
        offset += n
        todo = _advance(todo, n)


def probe_filesystem(directory: str) -> int:
    """Check that `directory`'s file system can back thin disks; return its block size.

    Writes a scratch file there and verifies that written blocks (even all-zero ones) stay
    allocated, that SEEK_DATA/SEEK_HOLE see them, and that punching deallocates them. Raises
    OSError naming `directory` and what is missing.
    """
    block = os.statvfs(directory).f_bsize
    fd, path = tempfile.mkstemp(prefix=".probe-", dir=directory)
    try:
        os.unlink(path)
        os.pwrite(fd, bytes(block), 0)  # zeros: must not be turned into a hole
        os.pwrite(fd, b"\x01" * block, 3 * block)
        if allocated_bytes(fd, 0, 4 * block) < 2 * block:
            raise OSError(
                errno.EOPNOTSUPP,
                f"{directory}: file system does not keep written zero blocks allocated or lacks "
                "SEEK_DATA/SEEK_HOLE (ZFS compression?); thin accounting needs both",
            )
        try:
            punch_hole(fd, 0, block)
        except OSError as exc:
            raise OSError(exc.errno, f"{directory}: cannot punch holes: {exc}") from None
        if allocated_bytes(fd, 0, 4 * block) != block:
            raise OSError(errno.EOPNOTSUPP, f"{directory}: punching a hole did not deallocate it")
    finally:
        os.close(fd)
    return block
