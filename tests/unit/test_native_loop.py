"""The native loop (`tcmu_py.ring.NativeLoop`, issue 17 stage 2): a C thread owns the ring.

`test_dataplane.py`'s property test already runs every random program with the loop and demands
the answers, image and counters of the plane-off run. These tests pin what only a thread of its
own can get wrong: C keeps serving while Python is busy, but never overtakes a fenced command;
a unit attention queued from another thread stops C at once; records left when the loop stops
are still answered; a corrupt ring stops the device with a reason; the counters and `status`
include what C did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_dataplane import BLOCKS, BS, GatedRaw, make_device

from tcmu_py.device.runner import DeviceRunner, serve_in_thread
from tcmu_py.ring import PollJudge
from tcmu_py.testing import cdbs, wait_until
from tcmu_py.testing.fake_kernel import FakeKernel
from tcmu_py.testing.fake_uio import FakeUio
from tcmu_py.testing.harness import RingHarness


def test_c_serves_while_python_is_busy_but_never_overtakes_a_fence(tmp_path: Path) -> None:
    """A WRITE SAME held on a worker: C answers the commands clear of it while it is held (no
    Python thread takes part), and holds back those that overlap it until it is done."""
    device = make_device(tmp_path, "g", GatedRaw)
    backend = device.backend
    assert isinstance(backend, GatedRaw)
    h = RingHarness(device, workers=1, native=True)
    loop = h.runner.native
    assert loop is not None
    try:
        h.run(cdbs.test_unit_ready())
        fill = b"\xab" * BS
        ws = h.submit_many([(cdbs.write_same10(0, 8), fill, 0), (cdbs.verify10(60, 1), b"", 0)])
        assert backend.entered.wait(10)
        assert wait_until(lambda: loop.fences == 2)
        new, far = os.urandom(2 * BS), os.urandom(2 * BS)
        pend = h.submit_many([
            (cdbs.read10(0, 8), b"", 8 * BS),  # overlaps: Python's, after the fill
            (cdbs.write16(6, 2), new, 0),  # overlaps
            (cdbs.write10(40, 2), far, 0),  # clear: C
            (cdbs.read10(40, 2), b"", 2 * BS),  # clear: C
        ])
        assert wait_until(lambda: pend[2].done and pend[3].done)
        assert pend[3].data_in == far
        assert not ws[0].done and not pend[0].done and not pend[1].done
        # 50 more clear reads, one at a time, while the worker is still held.
        for _ in range(50):
            assert h.run(cdbs.read10(40, 2), data_in_len=2 * BS).data == far
        assert not ws[0].done
        backend.gate.set()
        h.wait(ws + pend)
        assert [p.status for p in ws + pend] == [0] * 6
        assert pend[0].data_in == fill * 8
        assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == fill * 6 + new
        assert loop.fences == 0
        h.runner.refresh_counters()  # takes C's figures, `executed` among them
        assert loop.executed >= 52
    finally:
        backend.gate.set()
        h.close()


def test_a_unit_attention_queued_by_another_thread_stops_c_at_once(tmp_path: Path) -> None:
    """A resize from the control socket's thread: the very next READ reports CAPACITY DATA
    HAS CHANGED (Python's answer, not C's data), then the new capacity is served in C."""
    device = make_device(tmp_path, "ua")
    h = RingHarness(device, workers=1, native=True)
    loop = h.runner.native
    assert loop is not None
    try:
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).sense_codes == (6, 0x29, 0)
        assert h.run(cdbs.read10(0, 1), data_in_len=BS).good
        executed = loop.figures()["done"] + loop.executed
        assert executed >= 1  # the plane is on: that READ was C's
        t = threading.Thread(target=device.resize, args=((BLOCKS + 16) * BS,))
        t.start()
        t.join(10)
        ua = h.run(cdbs.read10(BLOCKS + 8, 1), data_in_len=BS)
        assert ua.sense_codes == (6, 0x2A, 0x09)
        before = h.runner.refresh_counters().commands
        loop_before = loop.executed
        assert h.run(cdbs.read10(BLOCKS + 8, 1), data_in_len=BS).good  # the new capacity
        # Served by C once Python caught up (the READ after the attention may be Python's).
        assert wait_until(lambda: h.run(cdbs.read10(BLOCKS + 9, 1), data_in_len=BS).good
                      and (h.runner.refresh_counters(), loop.executed)[1] > loop_before)
        assert h.runner.refresh_counters().commands > before
    finally:
        h.close()


def test_every_command_handed_over_is_answered_when_the_loop_stops(tmp_path: Path) -> None:
    """Stop the runner while the commands C handed over wait for Python (the loop thread is
    held off them): the runner still takes and answers every one on its way out (the harness
    checks that nothing stays in flight)."""
    device = make_device(tmp_path, "stop")
    h = RingHarness(device, workers=2, native=True)
    loop = h.runner.native
    assert loop is not None
    h.run(cdbs.test_unit_ready())
    fill = b"\x5a" * BS
    with h.runner._ring_lock:  # Python takes nothing meanwhile
        pend = h.submit_many([(cdbs.inquiry(), b"", 96)] * 8
                      + [(cdbs.write_same10(4 * i, 2), fill, 0) for i in range(8)])
        assert wait_until(lambda: loop.fences == 8)  # all handed over, none taken
        h.runner.stop()
    h.close()  # joins the runner; checks the fake kernel is idle
    assert all(p.done for p in pend)
    assert {p.status for p in pend} == {0}


def test_a_command_handed_over_arrived_when_c_dequeued_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Command.arrived` of a command C handed to Python is when C dequeued it, not when
    Python took it: a loaded machine wakes Python late, and the kernel's ``cmd_time_out``
    (which ceph's one ``osd_op_timeout`` per command stays within) runs all the same. Before,
    it was when Python took it: here, after the hand-off was seen."""
    device = make_device(tmp_path, "arrived")
    h = RingHarness(device, workers=1, native=True)
    loop = h.runner.native
    assert loop is not None
    arrived: list[float] = []
    execute = device.execute

    def record(cmd: Any) -> Any:
        arrived.append(cmd.arrived)
        return execute(cmd)

    monkeypatch.setattr(device, "execute", record)
    try:
        h.run(cdbs.test_unit_ready())
        arrived.clear()
        with h.runner._ring_lock:  # Python takes nothing meanwhile
            submitted = time.monotonic()
            pend = h.submit_many([(cdbs.write_same10(0, 2), b"\x5a" * BS, 0)])
            assert wait_until(lambda: loop.fences == 1)  # handed over, not taken
            handed = time.monotonic()
        h.wait(pend)
        assert pend[0].status == 0
        assert len(arrived) == 1 and submitted <= arrived[0] <= handed, (
            submitted, arrived, handed)
    finally:
        h.close()


def test_a_corrupt_ring_stops_the_device_with_a_reason(tmp_path: Path) -> None:
    device = make_device(tmp_path, "bad")
    kernel = FakeKernel()
    uio = FakeUio(kernel)
    runner = DeviceRunner(uio, device, workers=1, native=True)
    assert runner.native is not None
    thread, stop = serve_in_thread(runner)
    try:
        p = kernel.submit(cdbs.test_unit_ready())
        assert wait_until(lambda: p.done)
        # cmd_head at an odd offset: no kernel writes that.
        struct.pack_into("<I", kernel.buffer, 12, 13)  # mailbox.cmd_head
        uio._on_event()
        thread.join(10)
        assert not thread.is_alive()
        assert "RingError" in runner.counters.stopped
        assert "cmd_head" in runner.counters.stopped
    finally:
        stop()
        runner.close()
        uio.close()


def test_status_reports_the_native_loop_and_its_commands(tmp_path: Path) -> None:
    h = RingHarness(make_device(tmp_path, "st"), workers=1, native=True)
    try:
        h.run(cdbs.test_unit_ready())
        data = os.urandom(4 * BS)
        assert h.run(cdbs.write10(4, 4), data).good
        assert h.run(cdbs.read10(4, 4), data_in_len=4 * BS).data == data
        c = h.runner.refresh_counters().snapshot()
        assert (c["commands"], c["reads"], c["writes"]) == (3, 1, 1)
        assert (c["bytes_read"], c["bytes_written"]) == (4 * BS, 4 * BS)
        assert sum(c["latency_hist"]) == 3
        assert c["wakeups"] >= 2
        assert h.runner.native is not None and h.runner.native.executed == 2
    finally:
        h.close()


def _thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended
            names.append((task / "comm").read_text().strip())
    return names


def test_the_loop_s_threads_carry_names_the_kernel_shows(tmp_path: Path) -> None:
    """`top -H`, ps and perf tell the native loop, its file workers and the device's Python
    thread apart (Python's threads otherwise all carry the process's name); the loop's
    thread is gone once the device is closed."""
    h = RingHarness(make_device(tmp_path, "named"), workers=2, native=True)
    try:
        assert h.run(cdbs.test_unit_ready()).status is not None
        assert wait_until(lambda: {"tcmu-py-loop", "tcmu:named"} <= set(_thread_names())), \
            _thread_names()
        assert "tcmu-py-io" in _thread_names()
    finally:
        h.close()
    assert wait_until(lambda: "tcmu-py-loop" not in _thread_names()), _thread_names()


def test_a_device_without_an_extent_keeps_the_python_loop(tmp_path: Path) -> None:
    """Nothing for C to execute: a thread hop per command would only cost."""
    device = make_device(tmp_path, "off")
    device.config = dataclasses.replace(device.config, data_plane=False)
    h = RingHarness(device, workers=1, native=True)
    try:
        assert h.runner.native is None
        assert h.run(cdbs.test_unit_ready()).sense_codes == (6, 0x29, 0)
    finally:
        h.close()


def test_large_transfers_run_on_the_workers_in_ring_order(tmp_path: Path) -> None:
    """Commands of at least NATIVE_BIG_BYTES go to the loop's worker threads; a READ that
    overlaps a WRITE still on a worker waits for it (it returns the new data), and the others
    run alongside."""
    from tcmu_py import ring as ring_module

    big = ring_module.NATIVE_BIG_BYTES
    blocks = big // BS
    img = tmp_path / "big.img"
    from tcmu_py.device.block import open_block_device
    from tcmu_py.handler import DeviceConfig
    from tcmu_py.handlers.raw import RawBackend

    size = 8 * big
    config = DeviceConfig("big", "raw", str(img), size, BS, write_cache=True)
    device = open_block_device(config, RawBackend(str(img), size, BS, True))
    h = RingHarness(device, workers=1, native=True, data_size=16 * big)
    assert h.runner.native is not None
    try:
        h.run(cdbs.test_unit_ready())
        for rnd in range(3):
            datas = [os.urandom(big) for _ in range(4)]
            pend = h.submit_many([(cdbs.write10(i * blocks, blocks), datas[i], 0) for i in range(4)]
                          + [(cdbs.read10(i * blocks, blocks), b"", big) for i in range(4)])
            h.wait(pend)
            assert [p.status for p in pend] == [0] * 8, rnd
            assert [p.data_in for p in pend[4:]] == datas, rnd
        assert h.runner.native.executed + h.runner.native.figures()["done"] >= 24
    finally:
        h.close()


def test_a_failed_worker_command_is_python_s_and_fences_what_overlaps_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Every C command on a worker (threshold 1 byte). A READ whose image was cut short fails on
    its worker and becomes Python's (which zero-fills); the WRITE after it to the same blocks
    must not overtake it: the READ returns the zeros, not the WRITE's data."""
    from tcmu_py import ring as ring_module

    monkeypatch.setattr(ring_module, "NATIVE_BIG_BYTES", 1)
    device = make_device(tmp_path, "cut")
    h = RingHarness(device, workers=1, native=True)
    try:
        h.run(cdbs.test_unit_ready())
        assert h.run(cdbs.write10(BLOCKS - 2, 2), os.urandom(2 * BS)).good
        os.truncate(tmp_path / "cut.img", (BLOCKS - 2) * BS)
        for _ in range(5):
            new = os.urandom(2 * BS)
            pend = h.submit_many([(cdbs.read10(BLOCKS - 2, 2), b"", 2 * BS),
                              (cdbs.write10(BLOCKS - 2, 2), new, 0)])
            h.wait(pend)
            assert [p.status for p in pend] == [0, 0]
            assert pend[0].data_in == bytes(2 * BS)
            os.truncate(tmp_path / "cut.img", (BLOCKS - 2) * BS)
    finally:
        h.close()


def test_a_fault_in_a_mapped_copy_goes_to_python(tmp_path: Path) -> None:
    """A fully allocated tmpfs image is mapped, and C copies through the mapping. When the file
    is truncated under the device, a copy beyond its new end faults (SIGBUS): the command goes
    to Python, which answers it with preadv/pwritev (zeros past the end of the file; a WRITE
    extends it again), and the daemon serves on; commands inside the file stay mapped."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="tcmu-py-test-"))
    image = shm / "m.img"
    image.write_bytes(os.urandom(BLOCKS * BS))
    device = make_device(shm, "m")
    h = RingHarness(device, workers=1, native=True)
    loop = h.runner.native
    assert loop is not None
    try:
        h.run(cdbs.test_unit_ready())
        head = h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data
        assert head == image.read_bytes()[:8 * BS]
        assert loop.mapped
        before = h.runner.refresh_counters().mapped
        assert before >= 1
        os.truncate(image, BLOCKS * BS // 2)
        tail = BLOCKS // 2 + 4
        assert h.run(cdbs.read10(tail, 4), data_in_len=4 * BS).data == bytes(4 * BS)
        data = os.urandom(4 * BS)
        h.run(cdbs.write10(tail, 4), data)
        assert image.read_bytes()[tail * BS:(tail + 4) * BS] == data
        assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == head
        c = h.runner.refresh_counters()
        assert c.mapped == before + 1  # the last READ; the two beyond the end were Python's
        assert c.failures == 0 and not c.stopped
    finally:
        h.close()
        shutil.rmtree(shm)


def _judge_run(rates: list[tuple[float, float]], every: int = 1000, probe: int = 100
               ) -> tuple[list[int], PollJudge]:
    """Feed the busy-poll judge (`tcmu_py.ring.PollJudge`) a wake-up every ms of fake time,
    `rates[k] = (commands per wake-up while polling, while not)` for second k of a run of
    len(rates) seconds; returns its choice at the end of each second."""
    ms = 1_000_000
    j = PollJudge(every * ms, probe * ms, 0)
    choices: list[int] = []
    now = 0
    polling = 1
    for on, off in rates:
        for _ in range(1000):
            now += ms
            polling = j.step(now, int(on if polling else off))
            # 2 (poll whatever the gap) is the probe of the poll while the choice is "no"
            assert polling in (0, 1, 2) and (polling != 2 or not j.polling)
        choices.append(int(j.polling))
    return choices, j


def test_the_busy_poll_judge_polls_only_while_it_brings_more_commands() -> None:
    """Queue depth 1 (polling brings 3x the commands): it keeps polling. A deep queue (the same
    rate either way): it stops at the first probe, and starts again once polling pays again.
    A gain below 5/4 does not count; nearly idle windows decide nothing."""
    qd1, deep, slight = (3, 1), (5, 5), (11, 10)
    choices, j = _judge_run([qd1] * 3 + [deep] * 3 + [slight] * 3 + [qd1] * 3)
    assert choices == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    # While the choice is "no", its probe says 2 (watch whatever the gap): a slow depth-1
    # initiator's gaps, longer than the watch, must not veto the probe (db6d199).
    ms = 1_000_000
    off = PollJudge(1000 * ms, 100 * ms, 0)
    says = [off.step(t * ms, 5) for t in range(1, 4000)]
    assert not off.polling and 2 in says and 1 not in says[says.index(2):]
    assert j.probes == 12 and j.switches == 2
    # Idle: a command now and then (fewer than TCMU_PY_PROBE_MIN per window): no change.
    choices, j = _judge_run([(0.01, 0.01)] * 4)
    assert choices == [1, 1, 1, 1] and j.switches == 0
    # every == 0: always poll, never probe.
    choices, j = _judge_run([deep] * 3, every=0)
    assert choices == [1, 1, 1] and j.probes == 0


def test_the_native_loop_consults_its_judge(tmp_path: Path) -> None:
    """Served commands drive the judge's probes (counted in the device's counters); with
    probing off (`probe(0, 0)`) it always busy-polls."""
    h = RingHarness(make_device(tmp_path, "j"), workers=1, native=True)
    loop = h.runner.native
    assert loop is not None
    try:
        loop.probe(50_000, 10_000)
        h.run(cdbs.test_unit_ready())
        deadline = time.monotonic() + 20
        while h.runner.refresh_counters().poll_probes < 3 and time.monotonic() < deadline:
            for _ in range(20):
                assert h.run(cdbs.read10(8, 2), data_in_len=2 * BS).good
        c = h.runner.refresh_counters()
        assert c.poll_probes >= 3, (c.poll_probes, c.commands)
        loop.probe(0, 0)
        assert loop.polling
    finally:
        h.close()


def test_a_chunk_table_keeps_and_forgets_entries_across_its_pages() -> None:
    """`tcmu_py.ring.ChunkTable` (the dedup disks' READs in C): slots in an anonymous mapping.
    Entries set anywhere (slots straddling page boundaries included) are found; `drop_fd`
    forgets exactly those naming the fd, skipping pages never written; `clear` forgets all, and
    the table keeps working after it."""
    from tcmu_py.ring import ChunkTable

    slots = 1 << 12  # 24-byte slots: 96 KiB, 24 pages of 4 KiB (every third starts a slot)
    table = ChunkTable(4096, slots)
    try:
        per_page = 4096 / 24
        idxs = sorted({int(k * per_page) + d for k in range(1, 24, 3) for d in (-1, 0, 1)}
                      | {0, 512, 1024, 1536, slots - 1})  # 512: page 3's first (page 2 unset)

        def fd(i: int) -> int:
            return 3 if i % 2 == 0 else 4

        assert table.get(idxs[1]) is None
        table.set(idxs, [fd(i) for i in idxs], [i * 4096 for i in idxs])
        other = slots + idxs[2]
        table.set([other], [-1], [0])  # same slot, another chunk: replaces it
        assert table.get(idxs[2]) is None and table.get(other) == (-1, 0)
        kept = [i for i in idxs if i != idxs[2]]
        assert all(table.get(i) == (fd(i), i * 4096) for i in kept)
        table.drop_fd(3)
        for i in kept:
            assert table.get(i) == (None if fd(i) == 3 else (4, i * 4096)), i
        assert table.get(other) == (-1, 0)  # zeros name no fd
        table.set([5], [-2], [0])  # forgetting a chunk without an entry changes nothing
        table.clear()
        assert all(table.get(i) is None for i in idxs + [other])
        table.set([7], [9], [123])
        table.drop_fd(9)
        assert table.get(7) is None
        table.set([7], [9], [456])
        assert table.get(7) == (9, 456)
    finally:
        table.close()
