"""The runner's guard (issue 11 D1), TMR aborts of completed commands (D2) and closing a device
under a running command (D3), through the production Ring and DeviceRunner with FakeKernel."""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.daemon.status import render_status
from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.device.command import Command, Response
from tcmu_py.device.runner import DeviceRunner, serve_in_thread
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullBackend
from tcmu_py.handlers.raw import RawBackend, RawHandler
from tcmu_py.ring import MB_CMD_HEAD, TmrType
from tcmu_py.scsi.constants import Status
from tcmu_py.testing import FakeKernel, FakeUio, RingHarness, cdbs
from tcmu_py.testing.harness import _SerialisedUio

BS = 512
BLOCKS = 64
HARDWARE_ERROR = (4, 0x44, 0)


def null_config(name: str = "n0") -> DeviceConfig:
    return DeviceConfig(name, "null", "", BLOCKS * BS)


def raw_device(path: Path, name: str = "r0") -> BlockDevice:
    return RawHandler.open(DeviceConfig(name, "raw", str(path), BLOCKS * BS))


class Served:
    """A device served by `run()` on its own thread over a FakeKernel (as the daemon does)."""

    def __init__(self, device: Any, *, workers: int = 4) -> None:
        self.kernel = FakeKernel(cmdr_size=16384, data_size=256 * 1024)
        self.lock = threading.Condition()
        self.uio = _SerialisedUio(FakeUio(self.kernel), self.lock)
        self.runner = DeviceRunner(self.uio, device, workers=workers, name=device.config.name,
                                   native=False)  # stepped with process()
        self.thread, self._stop = serve_in_thread(self.runner)

    def submit(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Any:
        with self.lock:
            return self.kernel.submit(cdb, data_out, data_in_len)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Submit a batch the loop thread sees at once: the harness lock keeps the fake kernel
        to this thread, and the runner's ring lock keeps `process()` from dequeuing until the
        whole batch is on the ring. (The kernel publishes each command on its own, so without
        this the loop may wake after the first one and take the batch in several wake-ups.)"""
        with self.lock, self.runner._ring_lock:
            yield

    def wait(self, pending: Sequence[Any], timeout: float = 10.0) -> None:
        with self.lock:
            ok = self.lock.wait_for(lambda: all(p.done for p in pending), timeout=timeout)
        assert ok, f"not completed within {timeout}s: {[p for p in pending if not p.done]}"

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Any:
        p = self.submit(cdb, data_out, data_in_len)
        self.wait([p])
        return p

    def close(self) -> None:
        self._stop()
        with self.lock:
            self.kernel.assert_idle()
        self.runner.close()
        self.uio.close()


def codes(p: Any) -> tuple[int, int, int]:
    from tcmu_py.scsi.sense import parse_sense

    s = parse_sense(p.sense)
    return (s.sense_key, s.asc, s.ascq)


# --- D1: nothing a device throws kills the loop thread or leaves a command uncompleted ----------


class ExecuteOverrideRaises(BlockDevice):
    """Like the VTL drive: `execute` is overridden (to apply a pending load), and that raises."""

    def __init__(self) -> None:
        super().__init__(null_config(), NullBackend(BLOCKS * BS, BS))
        self.raise_on: set[int] = set()

    def execute(self, cmd: Command) -> Response | Future[Response]:
        if cmd.opcode in self.raise_on:
            raise ValueError("mam.json: expected an object, got a list")
        return super().execute(cmd)


def test_execute_raising_on_the_loop_thread_answers_hardware_error_and_keeps_serving(caplog):
    dev = ExecuteOverrideRaises()
    s = Served(dev)
    try:
        assert s.run(cdbs.test_unit_ready()).status == Status.CHECK_CONDITION  # power-on UA
        dev.raise_on = {0x00}
        with caplog.at_level(logging.ERROR):
            p = s.run(cdbs.test_unit_ready())  # inline: runs on the loop thread
        assert p.status == Status.CHECK_CONDITION and codes(p) == HARDWARE_ERROR
        assert "mam.json" in caplog.text and "Traceback" in caplog.text
        assert s.thread.is_alive()
        dev.raise_on = set()
        assert s.run(cdbs.test_unit_ready()).status == Status.GOOD
        assert isinstance(s.runner.failed, ValueError)
        snap = s.runner.counters.snapshot()
        assert snap["failures"] == 1 and snap["stopped"] == ""
    finally:
        s.close()


def test_execute_raising_in_a_pool_chunk_completes_every_command():
    dev = ExecuteOverrideRaises()
    dev._all_inline = False  # WRITEs go to the pool, dealt in chunks
    h = RingHarness(dev, workers=2)
    try:
        h.run(cdbs.test_unit_ready())
        dev.raise_on = {0x2A}
        pend = [h.submit(cdbs.write10(i, 1), data_out=bytes(BS)) for i in range(6)]
        pend.append(h.submit(cdbs.read10(0, 1), data_in_len=BS))
        h.wait(pend, timeout=5)
        assert [codes(p) for p in pend[:6]] == [HARDWARE_ERROR] * 6
        assert pend[6].status == Status.GOOD
        assert h.runner.counters.failures == 6
    finally:
        h.close()  # asserts no lost or doubled completion


class FailingFuture(BlockDevice):
    """READ(10) answers through a Future that fails, or resolves to something not a Response."""

    def __init__(self) -> None:
        super().__init__(null_config(), NullBackend(BLOCKS * BS, BS))
        self._all_inline = False
        self.mode = "raise"

    def execute(self, cmd: Command) -> Response | Future[Response]:
        if cmd.opcode != 0x28:
            return super().execute(cmd)
        fut: Future[Any] = Future()

        def later() -> None:
            if self.mode == "raise":
                fut.set_exception(OSError(5, "backend vanished"))
            else:
                fut.set_result("not a response")

        threading.Timer(0.01, later).start()
        return fut


@pytest.mark.parametrize("mode", ["raise", "garbage"])
def test_a_failing_future_is_answered_by_the_callback_guard(mode):
    dev = FailingFuture()
    dev.mode = mode
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        pend = [h.submit(cdbs.read10(i, 1), data_in_len=BS) for i in range(3)]
        h.wait(pend, timeout=5)
        assert [codes(p) for p in pend] == [HARDWARE_ERROR] * 3
        assert h.runner.counters.failures == 3
    finally:
        h.close()


def test_a_response_the_ring_cannot_carry_is_replaced_by_hardware_error():
    dev = ExecuteOverrideRaises()
    dev.execute = lambda cmd: Response(Status.CHECK_CONDITION, b"\x70" * 200)  # type: ignore
    h = RingHarness(dev)
    try:
        p = h.submit(cdbs.test_unit_ready())
        h.wait([p], timeout=5)
        assert codes(p) == HARDWARE_ERROR
    finally:
        h.close()


def test_a_loop_thread_stopped_by_a_corrupt_ring_shows_in_status(caplog):
    dev = BlockDevice(null_config(), NullBackend(BLOCKS * BS, BS))
    s = Served(dev)
    try:
        s.run(cdbs.test_unit_ready())
        with s.lock, caplog.at_level(logging.CRITICAL):
            struct.pack_into("<I", s.kernel.buffer, MB_CMD_HEAD, 3)  # not 8-byte aligned
            s.kernel._notify()
        s.thread.join(10)
        assert not s.thread.is_alive()
        snap = s.runner.counters.snapshot()
        assert snap["stopped"].startswith("RingError: TCMU ring: cmd_head"), snap["stopped"]
        status = {
            "pid": 1,
            "devices": [
                {
                    "name": "n0",
                    "handler": "null",
                    "uio": "uio0",
                    "size": BLOCKS * BS,
                    "failed": None,
                    "counters": snap,
                }
            ],
        }
        assert "STOPPED: RingError" in render_status(status)
        assert "no longer served" in caplog.text
    finally:
        s.runner.close()
        s.uio.close()


def test_status_reports_handler_failures_next_to_ok():
    dev = ExecuteOverrideRaises()
    s = Served(dev)
    try:
        s.run(cdbs.test_unit_ready())
        dev.raise_on = {0x00}
        s.run(cdbs.test_unit_ready())
        snap = s.runner.counters.snapshot()
        dev_status = {
            "name": "n0",
            "handler": "null",
            "uio": "uio0",
            "size": 0,
            "failed": None,
            "counters": snap,
        }
        assert "ok (1 handler failures" in render_status({"pid": 1, "devices": [dev_status]})
    finally:
        s.close()


# --- D2: a TMR naming a completed-but-unreaped command ------------------------------------------


class HeldKicks:
    """Hold the fake kernel's reaping: userspace completes (cmd_tail moves), the kernel has not
    looked yet — the window in which a TMR can still name the completed command."""

    def __init__(self, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kernel = kernel
        self.real = kernel.kick
        monkeypatch.setattr(kernel, "kick", lambda: 0)

    def release(self) -> None:
        self.kernel.kick = self.real  # type: ignore[method-assign]
        self.real()


@pytest.mark.parametrize("same_pass", [False, True], ids=["tmr-alone", "tmr-and-reuse-in-one-pass"])
def test_tmr_for_a_completed_command_does_not_abort_the_next_one_with_its_id(
    tmp_path, monkeypatch, same_pass
):
    dev = raw_device(tmp_path / "img")
    h = RingHarness(dev, workers=1, native=False)  # stepped with process()
    try:
        h.run(cdbs.test_unit_ready())
        first = h.submit(cdbs.write10(0, 1), data_out=b"\x11" * BS)
        held = HeldKicks(h.kernel, monkeypatch)
        h.runner.process()  # completed by userspace, not reaped
        assert not first.done and h.runner.ring.in_flight == 0
        with h._lock:
            h.kernel.submit_tmr(TmrType.ABORT_TASK, [first])
            held.release()  # now the kernel reaps it: its id is free again
        assert first.done and first.status == Status.GOOD
        if not same_pass:
            h.runner.process()  # the TMR alone
        second = h.submit(cdbs.write10(1, 1), data_out=b"\x22" * BS)
        assert second.cmd_id == first.cmd_id  # the kernel reused the id
        h.wait([second], timeout=5)
        assert second.status == Status.GOOD, second
        assert h.runner._aborted == set()
        with open(tmp_path / "img", "rb") as f:
            assert f.read(2 * BS) == b"\x11" * BS + b"\x22" * BS
    finally:
        h.close()


def test_tmr_for_a_command_still_in_flight_aborts_it_before_it_starts(tmp_path):
    dev = raw_device(tmp_path / "img")
    dev._all_inline = False
    h = RingHarness(dev, workers=1, native=False)  # stepped with process()
    try:
        h.run(cdbs.test_unit_ready())
        gate = threading.Event()
        real_write = dev.backend.write

        def slow_write(offset: int, bufs: Sequence[memoryview]) -> None:
            assert gate.wait(5)
            real_write(offset, bufs)

        dev.backend.write = slow_write  # type: ignore[method-assign]
        with h._lock:
            pend = [h.submit(cdbs.write10(i, 1), data_out=bytes([i + 1]) * BS) for i in range(3)]
            h.kernel.submit_tmr(TmrType.ABORT_TASK, pend[1:])
        h.runner.process()  # one chunk: the first blocks, the TMR names the other two
        gate.set()
        h.wait(pend, timeout=5)
        assert [p.status for p in pend] == [Status.GOOD, Status.TASK_ABORTED, Status.TASK_ABORTED]
        assert h.runner._aborted == set() and h.runner.counters.aborted == 2
    finally:
        gate.set()
        h.close()


# --- D3: a device is never closed under a running command ---------------------------------------


class GatedBackend(RawBackend):
    """A raw image whose writes wait for `gate`; records the order of write and close."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), BLOCKS * BS, BS)
        self.blocking = True
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.inside = 0  # writes waiting at the gate, under `changed`
        self.changed = threading.Condition()
        self.events: list[str] = []

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        with self.changed:
            self.inside += 1
            self.changed.notify_all()
        self.entered.set()
        assert self.gate.wait(10)
        super().write(offset, bufs)
        self.events.append("written")

    def close(self) -> None:
        self.events.append("closed")
        super().close()


@pytest.mark.parametrize("queued", [1, 3], ids=["on-the-loop-thread", "in-a-pool-chunk"])
def test_removing_a_device_under_a_running_write_never_writes_into_the_next_image(
    tmp_path, caplog, queued
):
    backend = GatedBackend(tmp_path / "a.img")
    dev_a = open_block_device(
        DeviceConfig("a", "raw", str(tmp_path / "a.img"), BLOCKS * BS), backend
    )
    a = Served(dev_a)
    b = None
    try:
        a.run(cdbs.test_unit_ready())
        with a.hold():  # one wake-up: a lone write runs on the loop thread, 3 go to the pool
            pend = [
                a.kernel.submit(cdbs.write10(i, 1), data_out=b"\xaa" * BS) for i in range(queued)
            ]
        with backend.changed:  # every write is running (stuck at the gate) when the device goes
            assert backend.changed.wait_for(lambda: backend.inside == queued, timeout=5)
        # Daemon.remove: stop, join (gives up: the write is stuck), close.
        a.runner.stop()
        a.thread.join(0.2)
        assert a.thread.is_alive()
        with caplog.at_level(logging.INFO):
            closed = a.runner.close()
            events_at_close = list(backend.events)
            # The next device opened: with the first image's fd closed it would get its number.
            b = Served(raw_device(tmp_path / "b.img", name="b"))
            backend.gate.set()
            a.thread.join(10)
        with open(tmp_path / "b.img", "rb") as f:
            assert f.read() == bytes(BLOCKS * BS), "a write of device a landed in b's image"
        with open(tmp_path / "a.img", "rb") as f:
            assert f.read(BS) == b"\xaa" * BS
        assert not a.thread.is_alive()
        assert closed is False and events_at_close == []
        assert "closed when the last one finishes" in caplog.text
        assert backend.events[-1] == "closed" and backend.events.count("written") == queued
        assert "closing the device" in caplog.text
        assert all(p.done and p.status == Status.GOOD for p in pend)
        assert b.run(cdbs.test_unit_ready()).status == Status.CHECK_CONDITION  # b serves
    finally:
        backend.gate.set()
        if b is not None:
            b.close()
        a.uio.close()


def test_close_with_nothing_running_closes_at_once():
    dev = BlockDevice(null_config(), NullBackend(BLOCKS * BS, BS))
    s = Served(dev)
    s.run(cdbs.test_unit_ready())
    s._stop()
    called: list[int] = []
    assert s.runner.close(on_closed=lambda: called.append(1)) is True
    assert called == [1]
    assert s.runner.close() is True  # idempotent
    s.runner.stop()  # after close: no write to a closed (maybe reused) pipe fd
    s.uio.close()


def test_a_stuck_asynchronous_command_defers_the_close():
    class Async(BlockDevice):
        def __init__(self) -> None:
            super().__init__(null_config(), NullBackend(BLOCKS * BS, BS))
            self._all_inline = False
            self.future: Future[Response] = Future()
            self.closed_at: list[bool] = []

        def execute(self, cmd: Command) -> Response | Future[Response]:
            return self.future if cmd.opcode == 0x2A else super().execute(cmd)

        def close(self) -> None:
            self.closed_at.append(self.future.done())

    dev = Async()
    h = RingHarness(dev)
    p = h.submit(cdbs.write10(0, 1), data_out=bytes(BS))
    h.runner.process()
    h.runner.drain()
    uio_closed: list[bool] = []
    assert h.runner.close(on_closed=lambda: uio_closed.append(True)) is False
    assert dev.closed_at == [] and uio_closed == []
    dev.future.set_result(Response())
    assert dev.closed_at == [True] and uio_closed == [True]
    assert p.done and p.status == Status.GOOD
    h.uio.close()


def test_loop_thread_keeps_answering_after_many_failures():
    dev = ExecuteOverrideRaises()
    s = Served(dev)
    try:
        s.run(cdbs.test_unit_ready())
        dev.raise_on = {0x00, 0x28}
        t0 = time.monotonic()
        for i in range(50):
            p = s.run(cdbs.read10(i % BLOCKS, 1), data_in_len=BS)
            assert codes(p) == HARDWARE_ERROR
        assert time.monotonic() - t0 < 10 and s.thread.is_alive()
        assert s.runner.counters.failures == 50
    finally:
        s.close()


def test_tmr_in_the_same_batch_aborts_inline_commands_before_they_run():
    dev = BlockDevice(null_config(), NullBackend(BLOCKS * BS, BS))  # every command inline
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        with h._lock:
            pend = [h.kernel.submit(cdbs.write10(i, 1), data_out=bytes(BS)) for i in range(3)]
            h.kernel.submit_tmr(TmrType.ABORT_TASK_SET, pend[:2])
        h.wait(pend, timeout=5)
        assert [p.status for p in pend] == [Status.TASK_ABORTED, Status.TASK_ABORTED, Status.GOOD]
        assert h.runner._aborted == set() and h.runner.counters.writes == 1
    finally:
        h.close()


def test_a_device_whose_commands_may_wait_long_keeps_a_lone_command_off_the_loop_thread(
    tmp_path,
):
    """`lone_commands_on_loop` False (a mirror with NBD legs): a lone write stuck in its
    backend does not hold the loop thread, so a read arriving meanwhile is answered."""
    backend = GatedBackend(tmp_path / "a.img")
    dev = open_block_device(DeviceConfig("a", "raw", str(tmp_path / "a.img"), BLOCKS * BS),
                            backend)
    dev.lone_commands_on_loop = False
    a = Served(dev)
    try:
        a.run(cdbs.test_unit_ready())  # takes the power-on unit attention
        with a.lock:
            stuck = a.kernel.submit(cdbs.write10(0, 1), data_out=b"\xbb" * BS)
        assert backend.entered.wait(5)
        read = a.run(cdbs.read10(8, 1), data_in_len=BS)  # waits (with a deadline) for it
        assert read.status == Status.GOOD and not stuck.done
        backend.gate.set()
        a.wait([stuck])
        assert stuck.status == Status.GOOD
    finally:
        backend.gate.set()
        a.close()


class SlowThenGatedBackend(GatedBackend):
    """A write at offset 0 takes 0.2 s; every other write waits for `gate`."""

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if offset == 0:
            time.sleep(0.2)
            RawBackend.write(self, offset, bufs)
            return
        super().write(offset, bufs)


def test_a_long_command_of_a_pool_chunk_is_answered_without_waiting_for_the_next(tmp_path):
    """Before: a pool chunk's commands were completed together once the last had run, so a
    command answered by a stalled backend after one timeout waited, answered, for the one
    behind it (a ceph WRITE SAME answered NOT READY at 25 s was reported at 50 s, past the
    kernel's cmd_time_out). A command that took longer than `PROMPT_SECONDS` is completed at
    once now."""
    backend = SlowThenGatedBackend(tmp_path / "a.img")
    dev = open_block_device(DeviceConfig("a", "raw", str(tmp_path / "a.img"), BLOCKS * BS),
                            backend)
    a = Served(dev, workers=1)
    try:
        a.run(cdbs.test_unit_ready())  # takes the power-on unit attention
        with a.hold():  # one batch: one chunk for the one worker, slow first
            slow = a.kernel.submit(cdbs.write10(0, 1), data_out=b"\xaa" * BS)
            gated = a.kernel.submit(cdbs.write10(8, 1), data_out=b"\xbb" * BS)
        a.wait([slow], timeout=5)
        assert slow.status == Status.GOOD and not gated.done
        backend.gate.set()
        a.wait([gated])
        assert gated.status == Status.GOOD
    finally:
        backend.gate.set()
        a.close()
