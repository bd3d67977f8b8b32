"""Legs for the mirror tests: a byte store in memory whose legs fail on command."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable


class Store:
    """One leg's medium. `down` makes every operation (and opening) fail with EIO, like a
    dead server; `fail_reads` only reads; `fail_writes` only writes (a leg still readable);
    `crash` (shared by the legs) drops every write after a count of them, like a power
    cut: what was written before is all the medium keeps."""

    def __init__(self, name: str, size: int, crash: Crash | None = None) -> None:
        self.name = name
        self.data = bytearray(size)
        self.down = False
        self.fail_reads = False
        self.fail_writes = False
        self.crash = crash
        self.writes = 0  # data-area writes (below `meta_from`), counted for the resync tests
        self.meta_from = size
        #: When set, writes wait for it (a slow leg); cleared by the test, set to release.
        self.gate: threading.Event | None = None
        #: The same for data-area writes only (metadata writes go through).
        self.data_gate: threading.Event | None = None
        #: Seconds every data-area write takes (a slow leg that still answers).
        self.delay = 0.0
        #: When set, reads wait for it (a leg that stopped answering reads); and the seconds
        #: every read takes (a slow leg that still answers).
        self.read_gate: threading.Event | None = None
        self.read_delay = 0.0
        #: The same for data-area reads only (below `meta_from`): metadata reads go through.
        self.data_read_gate: threading.Event | None = None
        #: Seconds every metadata write (at or past `meta_from`) takes: a slow superblock.
        self.meta_delay = 0.0
        #: When set, metadata writes (superblocks, bitmap blocks) wait for it (a leg that
        #: stops answering while its metadata is written); data-area writes go through.
        self.meta_gate: threading.Event | None = None

    def check(self, what: str) -> None:
        if self.down:
            raise OSError(errno.EIO, f"{self.name}: {what}: leg down")


class Crash:
    """Shared by the stores of one test: after `after` writes, every write is lost and fails."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.count = 0
        self.lock = threading.Lock()
        self.on_write: Callable[[], None] | None = None

    def take(self) -> bool:
        with self.lock:
            self.count += 1
            return self.count <= self.after


class MemoryLeg:
    can_fua = True

    def __init__(self, store: Store) -> None:
        store.check("open")
        self.store = store
        self.spec = store.name
        self.size = len(store.data)

    def read(self, offset: int, buf: memoryview) -> None:
        self.store.check("read")
        if self.store.fail_reads:
            raise OSError(errno.EIO, f"{self.spec}: read error")
        gate = self.store.read_gate
        if gate is not None:
            assert gate.wait(30), "test read gate never opened"
            self.store.check("read")
        data_gate = self.store.data_read_gate
        if data_gate is not None and offset < self.store.meta_from:
            assert data_gate.wait(30), "test data read gate never opened"
            self.store.check("read")
        if self.store.read_delay:
            time.sleep(self.store.read_delay)
        buf[:] = self.store.data[offset:offset + len(buf)]

    def write(self, offset: int, buf: memoryview | bytes, fua: bool = False) -> None:
        self.store.check("write")
        if self.store.fail_writes:
            raise OSError(errno.EIO, f"{self.spec}: write error")
        gate = self.store.gate
        if gate is not None:
            assert gate.wait(30), "test gate never opened"
            self.store.check("write")
        data_gate = self.store.data_gate
        if data_gate is not None and offset < self.store.meta_from:
            assert data_gate.wait(30), "test data gate never opened"
            self.store.check("write")
        meta_gate = self.store.meta_gate
        if meta_gate is not None and offset >= self.store.meta_from:
            assert meta_gate.wait(30), "test metadata gate never opened"
        if self.store.delay and offset < self.store.meta_from:
            time.sleep(self.store.delay)
        if self.store.meta_delay and offset >= self.store.meta_from:
            time.sleep(self.store.meta_delay)
        crash = self.store.crash
        if crash is not None and not crash.take():
            raise OSError(errno.EIO, f"{self.spec}: power cut")
        self.store.data[offset:offset + len(buf)] = buf
        if offset < self.store.meta_from:
            self.store.writes += 1

    def flush(self) -> None:
        self.store.check("flush")

    def close(self) -> None:
        pass


def opener(stores: dict[str, Store]) -> Callable[[str, int], MemoryLeg]:
    def open_(spec: str, size: int) -> MemoryLeg:
        store = stores[spec]
        assert len(store.data) >= size
        return MemoryLeg(store)
    return open_
