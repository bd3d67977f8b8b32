"""The whole path without a kernel: FakeKernel -> Ring -> DeviceRunner -> device -> back."""

from __future__ import annotations

import random
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.core import command
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullBackend
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.ring import scsi_command_size
from tcmu_py.scsi.constants import Status
from tcmu_py.testing import RingHarness, cdbs, wait_until

BS = 512
BLOCKS = 64


def raw_device(path) -> BlockDevice:
    cfg = DeviceConfig(name="r0", subtype="raw", cfgstring=str(path), size=BLOCKS * BS)
    return RawHandler.open(cfg)


def well_formed(p) -> bool:
    if p.status == Status.GOOD:
        return True
    if p.status == Status.CHECK_CONDITION:
        return len(p.sense) >= 18 and p.sense[0] & 0x7F == 0x70
    return p.status in (Status.BUSY, Status.TASK_ABORTED)


# One operation of the model test: (kind, lba, blocks, seed)
ops = st.tuples(
    st.sampled_from(["read", "write", "write_same", "caw", "caw_bad", "verify"]),
    st.integers(0, BLOCKS + 2),
    st.integers(0, 9),
    st.integers(0, 2**32),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(ops, min_size=1, max_size=6), min_size=1, max_size=8))
def test_raw_matches_bytearray_model(tmp_path_factory, batches):
    """Random batches of commands, each batch in flight at once (out-of-order completion)."""
    path = tmp_path_factory.mktemp("m") / "img"
    h = RingHarness(raw_device(path), cmdr_size=8192, data_size=256 * 1024)
    model = bytearray(BLOCKS * BS)
    try:
        assert h.run(cdbs.test_unit_ready()).status == Status.CHECK_CONDITION  # POWER ON
        for batch in batches:
            # Commands in one batch overlap in time: keep their LBA ranges disjoint from every
            # write in the batch, so the model's result does not depend on execution order.
            pend, expect, used = [], [], []
            for kind, lba, n, seed in batch:
                span = (lba, lba + max(n, 1))
                if any(a < span[1] and span[0] < b for a, b in used):
                    continue
                used.append(span)
                rng = random.Random(seed)
                in_range = lba + n <= BLOCKS
                if kind == "read":
                    pend.append(h.submit(cdbs.read16(lba, n), data_in_len=n * BS))
                    expect.append(("read", lba, n, in_range))
                elif kind == "write":
                    data = rng.randbytes(n * BS)
                    pend.append(h.submit(cdbs.write10(lba, n), data_out=data))
                    expect.append(("ok", None, None, in_range))
                    if in_range:
                        model[lba * BS : (lba + n) * BS] = data
                elif kind == "write_same":
                    block = rng.randbytes(BS)
                    pend.append(h.submit(cdbs.write_same16(lba, n), data_out=block))
                    ok = in_range and n > 0
                    expect.append(("ok", None, None, ok))
                    if ok:
                        model[lba * BS : (lba + n) * BS] = block * n
                elif kind in ("caw", "caw_bad"):
                    n = min(n, 4)
                    in_range = lba + n <= BLOCKS
                    cur = bytes(model[lba * BS : (lba + n) * BS]).ljust(n * BS, b"\0")
                    bad = kind == "caw_bad" and n > 0
                    if bad:
                        cur = bytes([cur[0] ^ 1]) + cur[1:]
                    new = rng.randbytes(n * BS)
                    pend.append(h.submit(cdbs.compare_and_write(lba, n), data_out=cur + new))
                    if not in_range if n else lba > BLOCKS:
                        expect.append(("sense", 0x05, 0x21, False))
                    elif bad:
                        expect.append(("sense", 0x0E, 0x1D, False))
                    else:
                        expect.append(("ok", None, None, True))
                        model[lba * BS : (lba + n) * BS] = new
                else:
                    data = bytes(model[lba * BS : (lba + n) * BS])
                    pend.append(h.submit(cdbs.verify16(lba, n, bytchk=1), data_out=data or b""))
                    expect.append(("ok", None, None, in_range))
            h.wait(pend)
            for p, (what, a, b, ok) in zip(pend, expect, strict=True):
                assert well_formed(p), p
                if what == "sense":
                    assert (p.status, p.sense[2] & 0x0F, p.sense[12]) == (2, a, b), p
                    continue
                assert (p.status == Status.GOOD) == ok, (what, p)
                if what == "read" and ok:
                    assert p.data_in == bytes(model[a * BS : (a + b) * BS])
        # Everything the model holds is on the medium.
        p = h.run(cdbs.read16(0, BLOCKS), data_in_len=BLOCKS * BS)
        assert p.data == bytes(model)
    finally:
        h.close()


def test_random_cdbs_for_every_opcode_through_the_ring(tmp_path):
    h = RingHarness(raw_device(tmp_path / "img"), cmdr_size=16384, data_size=512 * 1024)
    rng = random.Random(1234)
    try:
        for op in range(256):
            pend = []
            for _ in range(3):
                cdb = bytearray(rng.randbytes(16))
                cdb[0] = op
                if op == 0x7F:
                    cdb[7] = 8  # variable length: 8 + ADDITIONAL CDB LENGTH
                size = scsi_command_size(bytes(cdb))
                data = rng.randbytes(rng.choice((0, 512, 4096)))
                if rng.random() < 0.5:
                    pend.append(h.submit(bytes(cdb[:size]), data_out=data))
                else:
                    pend.append(h.submit(bytes(cdb[:size]), data_in_len=len(data)))
            h.wait(pend)
            for p in pend:
                assert well_formed(p), (hex(op), p)
    finally:
        h.close()  # asserts no lost or doubled completion


class SlowDevice(BlockDevice):
    """A block device whose READ(10) completes asynchronously, from another thread."""

    _pool = ThreadPoolExecutor(2)

    @command(0x28)
    def read(self, cmd: Command) -> Future[int]:
        def later() -> int:
            cmd.write_data_in(b"\x5a" * cmd.data_in_length)
            return cmd.data_in_length

        return self._pool.submit(later)


def test_asynchronous_completion():
    dev = SlowDevice(DeviceConfig("s", "null", "", BLOCKS * BS), NullBackend(BLOCKS * BS, BS))
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        pend = [h.submit(cdbs.read10(i, 1), data_in_len=BS) for i in range(20)]
        h.wait(pend)
        assert all(p.status == 0 and p.data_in == b"\x5a" * BS for p in pend)
    finally:
        h.close()


def test_tmr_abort_completes_every_command_once(tmp_path):
    h = RingHarness(raw_device(tmp_path / "img"), workers=1)
    try:
        h.run(cdbs.test_unit_ready())
        pend = [h.submit(cdbs.write10(i, 1), data_out=bytes(BS)) for i in range(8)]
        with h._lock:
            h.kernel.submit_tmr(1, pend[3:6])  # ABORT TASK for three of them
        h.wait(pend)
        assert all(p.done for p in pend)
        assert h.runner.counters.commands >= 8
    finally:
        h.close()


def test_handler_exception_does_not_stop_the_device(tmp_path, monkeypatch):
    dev = raw_device(tmp_path / "img")
    # Python path: the C data plane would serve the READ from the image without calling `read`.
    h = RingHarness(dev, data_plane=False)
    try:
        h.run(cdbs.test_unit_ready())
        monkeypatch.setattr(dev.backend, "read", lambda *a: 1 / 0)
        r = h.run(cdbs.read10(0, 1), data_in_len=BS)
        assert r.status == Status.CHECK_CONDITION and r.sense_codes == (4, 0x44, 0)
        monkeypatch.undo()
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).good
    finally:
        h.close()


def test_short_inquiry_reports_residual_via_read_len(tmp_path):
    h = RingHarness(raw_device(tmp_path / "img"))
    try:
        p = h.submit(cdbs.inquiry(allocation_length=4096), data_in_len=4096)
        h.wait([p])
        assert p.status == 0 and p.read_len is not None and len(p.data_in) == p.read_len < 4096
        assert struct.unpack_from(">B", p.data_in, 4)[0] + 5 == len(p.data_in)
    finally:
        h.close()


@pytest.mark.parametrize("ring_offset", range(0, 1024, 8))
def test_wrap_at_every_offset_with_the_engine(tmp_path, ring_offset):
    h = RingHarness(
        raw_device(tmp_path / "img"), cmdr_size=1024, data_size=64 * 1024, ring_offset=ring_offset
    )
    try:
        data = bytes(range(256)) * 2
        assert h.run(cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
        for i in range(6):
            assert h.run(cdbs.write10(i, 1), data_out=data).good
            assert h.run(cdbs.read10(i, 1), data_in_len=BS).data == data
    finally:
        h.close()


class SerialProbe(BlockDevice):
    """A serial device whose WRITEs wait for `release`; records what ran and any overlap."""

    serial_commands = True

    def __init__(self) -> None:
        super().__init__(DeviceConfig("p", "null", "", BLOCKS * BS), NullBackend(BLOCKS * BS, BS))
        self.release = threading.Event()
        self.order: list[int] = []
        self.running = 0
        self.overlap = False

    def _enter(self, cmd: Command) -> None:
        self.running += 1
        self.overlap |= self.running > 1
        self.order.append(struct.unpack_from(">I", cmd.cdb, 2)[0] if cmd.opcode else -1)

    @command(0x2A)
    def slow_write(self, cmd: Command) -> None:
        self._enter(cmd)
        try:
            assert self.release.wait(10)
        finally:
            self.running -= 1

    @command(0x28)
    @command(0x00)
    def quick(self, cmd: Command) -> int:
        self._enter(cmd)
        self.running -= 1
        return 0


def test_serial_device_never_runs_two_commands_at_once():
    """A lone command arriving while the worker is busy queues behind it (it used to run on the
    loop thread at once, beside the worker), and so does an inline one (TEST UNIT READY)."""
    dev = SerialProbe()
    dev.is_inline = lambda cdb: cdb[0] == 0x00  # type: ignore[method-assign]
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        dev.order.clear()
        with h._lock:
            first = [
                h.submit(cdbs.write10(1, 1), data_out=bytes(BS)),
                h.submit(cdbs.write10(2, 1), data_out=bytes(BS)),
            ]
        h.runner.process()  # both to the one worker; the first blocks there
        later = [h.submit(cdbs.read10(3, 1), data_in_len=BS)]
        h.runner.process()  # one command while the worker is busy
        later.append(h.submit(cdbs.test_unit_ready()))
        h.runner.process()
        # The worker takes the first WRITE when its thread is up: wait for that, bounded; the
        # READ and TEST UNIT READY must still not have run.
        wait_until(lambda: dev.order)
        assert not dev.overlap and dev.order == [1]
        dev.release.set()
        h.wait(first + later)
        assert not dev.overlap and dev.order == [1, 2, 3, -1]
        assert all(p.status == Status.GOOD for p in first + later)
    finally:
        dev.release.set()
        h.close()


def _serve_fake(poll_seconds: float):
    """A null device served by `run()` on its own thread over a FakeKernel; (kernel, lock,
    runner, close)."""
    from tcmu_py.device.runner import DeviceRunner, serve_in_thread
    from tcmu_py.testing import FakeKernel, FakeUio
    from tcmu_py.testing.harness import _SerialisedUio

    kernel = FakeKernel()
    lock = threading.Condition()
    uio = _SerialisedUio(FakeUio(kernel), lock)
    dev = BlockDevice(DeviceConfig("p", "null", "", BLOCKS * BS), NullBackend(BLOCKS * BS, BS))
    runner = DeviceRunner(uio, dev, poll_seconds=poll_seconds)
    _, stop = serve_in_thread(runner)

    def close() -> None:
        t0 = time.monotonic()
        stop()
        # A stop that waited out the watch the loop is in (after the last command) would take
        # up to `poll_seconds`: the watched tests use 20 s, twice this bound.
        assert time.monotonic() - t0 < 10, "stop() waited out a busy-poll watch"
        with lock:
            kernel.assert_idle()
        runner.close()
        uio.close()

    return kernel, lock, runner, close


def _one_at_a_time(kernel, lock, n: int, pause: float = 0.0) -> None:
    for i in range(n):
        if pause:
            time.sleep(pause)  # the gap between commands under test, not a wait for a result
        with lock:
            p = kernel.submit(cdbs.read10(i, 1), data_in_len=BS)
            assert lock.wait_for(lambda p=p: p.done, timeout=30), "command not completed"


@pytest.mark.parametrize("poll_seconds", [0.0, 20.0])
def test_busy_poll_takes_the_next_command_without_a_wake_up(poll_seconds):
    """Queue depth 1, commands back to back: with busy-polling the loop learns the gap between
    commands and takes most of them without sleeping in poll(2); without it every command costs
    a wake-up."""
    kernel, lock, runner, close = _serve_fake(poll_seconds)
    try:
        _one_at_a_time(kernel, lock, 40)
        c = runner.counters
        assert c.commands == 40 and c.wakeups + c.polled == 40
        if poll_seconds:
            assert c.polled >= 20, (c.wakeups, c.polled, c.poll_misses)
        else:
            assert c.polled == 0 and c.poll_misses == 0 and c.wakeups == 40
    finally:
        close()


def test_busy_poll_stops_spinning_when_commands_are_far_apart():
    """Gaps longer than poll_seconds: after the first miss the loop stops watching (an idle or
    slow device does not burn CPU)."""
    kernel, lock, runner, close = _serve_fake(0.002)
    try:
        _one_at_a_time(kernel, lock, 8, pause=0.05)
        c = runner.counters
        assert c.commands == 8 and c.polled == 0
        assert c.poll_misses <= 1, c.poll_misses
    finally:
        close()
