"""Run commands against a device, directly or through the real ring code and a FakeKernel.

`run_command(device, cdb, ...)` calls the device's dispatcher with buffers of the given sizes: the
fastest way to test command semantics. `RingHarness` goes the whole way — FakeKernel queues the
command into a ring, the production `DeviceRunner` dequeues and completes it, and the fake kernel
reaps it byte for byte — so a handler tested with it is tested with the code that serves it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tcmu_py.device.command import Command
from tcmu_py.device.core import ScsiDevice
from tcmu_py.scsi.sense import parse_sense


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
