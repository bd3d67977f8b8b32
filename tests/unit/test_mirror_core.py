"""The mirror's logic (tcmu_py.handlers.mirror.mirror) over legs in memory that fail on command."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator

import pytest
from mirror_fakes import Crash, MemoryLeg, Store, opener

from tcmu_py.errors import ConfigError
from tcmu_py.handlers.mirror.config import status_tables
from tcmu_py.handlers.mirror.mirror import (
    FAILED,
    IN_SYNC,
    SLOT,
    Mirror,
    MirrorConfig,
    QuorumLost,
    meta_length,
    read_superblock,
    wait_until,
)
from tcmu_py.scsi.sense import SenseKey

REGION = 64 << 10
SIZE = 16 * REGION
DEADLINE = 20.0


def stores(n: int, crash: Crash | None = None) -> dict[str, Store]:
    out = {}
    for i in range(n):
        s = Store(f"leg{i}", SIZE + meta_length(SIZE, REGION), crash)
        s.meta_from = SIZE
        out[s.name] = s
    return out


def open_mirror(st: dict[str, Store], **kw: object) -> Mirror:
    cfg = MirrorConfig(legs=tuple(st), size=SIZE, region=REGION, resync_rate=0,
                       retry_interval=0, **kw)  # type: ignore[arg-type]
    return Mirror.open(cfg, 512, opener(st))


@pytest.fixture
def three() -> Iterator[tuple[dict[str, Store], Mirror]]:
    st = stores(3)
    m = open_mirror(st, assume_clean=True)
    yield st, m
    m.close()


def write(m: Mirror, offset: int, data: bytes) -> None:
    m.write(offset, [memoryview(data)])


def read(m: Mirror, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    m.read(offset, [memoryview(buf)])
    return bytes(buf)


def data_areas(st: dict[str, Store]) -> list[bytes]:
    return [bytes(s.data[:SIZE]) for s in st.values()]


def back_in_sync(m: Mirror, st: dict[str, Store], index: int) -> None:
    """Leg `index` reattaches (within DEADLINE), its resync ends, and every leg's data is
    the same."""
    assert wait_until(lambda: m.reattach(index), DEADLINE)
    assert m.wait_resync(DEADLINE)
    areas = data_areas(st)
    assert all(a == areas[0] for a in areas), "the legs differ after the resync"


def test_writes_reach_every_leg_and_reads_come_back(three: tuple[dict[str, Store], Mirror]
                                                    ) -> None:
    st, m = three
    write(m, 4096, b"a" * 8192)
    write(m, SIZE - 512, b"z" * 512)
    assert read(m, 4096, 8192) == b"a" * 8192
    assert read(m, SIZE - 512, 512) == b"z" * 512
    a, b, c = data_areas(st)
    assert a == b == c
    # round robin: three reads went to three legs
    for _ in range(3):
        read(m, 0, 512)
    assert all(leg["reads"] >= 1 for leg in m.status()["legs"])


def test_new_mirror_copies_leg0_to_the_others_in_the_background() -> None:
    st = stores(2)
    st["leg0"].data[:SIZE] = random.Random(1).randbytes(SIZE)
    m = open_mirror(st)
    try:
        assert m.wait_resync(DEADLINE)
        assert m.regions_copied == SIZE // REGION
        a, b = data_areas(st)
        assert a == b
        assert m.status()["dirty_regions"] == 0  # cleared once every leg is in sync
    finally:
        m.close()


def test_a_leg_fails_mid_sequence_writes_go_on_and_resync_copies_only_dirty_regions(
        three: tuple[dict[str, Store], Mirror]) -> None:
    st, m = three
    for r in range(16):
        write(m, r * REGION, bytes([r]) * 4096)
    m.flush()
    assert m.status()["dirty_regions"] == 0
    st["leg1"].down = True
    written = {3, 7, 8, 15}
    for r in sorted(written):
        write(m, r * REGION + 512, b"N" * 1024)  # no error: two legs remain
    s = m.status()
    assert s["state"] == "degraded" and s["legs"][1]["state"] == FAILED
    assert s["dirty_regions"] == len(written)
    m.flush()  # bits stay while a leg is out of sync
    assert m.status()["dirty_regions"] == len(written)
    st["leg1"].down = False
    before = st["leg1"].writes
    assert m.reattach(1)
    assert m.wait_resync(DEADLINE)
    assert m.regions_copied == len(written)
    assert st["leg1"].writes - before == len(written)
    a, b, c = data_areas(st)
    assert a == b == c
    assert m.status()["legs"][1]["state"] == IN_SYNC
    assert m.status()["dirty_regions"] == 0


def test_a_leg_reattached_while_a_resync_pass_runs_is_resynced_too(
        three: tuple[dict[str, Store], Mirror]) -> None:
    """The pass running when a second leg comes back took its targets before: the resync
    thread runs another pass for the newcomer instead of ending with it still resyncing."""
    st, m = three
    st["leg1"].down = st["leg2"].down = True
    for r in (1, 5, 9):
        write(m, r * REGION, bytes([r]) * 8192)
    st["leg1"].down = st["leg2"].down = False
    gate = threading.Event()
    st["leg1"].data_gate = gate  # pass 1 (leg 1 only) holds at its first region
    assert m.reattach(1)
    assert wait_until(lambda: m.status()["resync"]["active"] and m._resync_busy, DEADLINE)
    assert m.reattach(2)  # during pass 1
    gate.set()
    assert wait_until(lambda: [leg["state"] for leg in m.status()["legs"]] == [IN_SYNC] * 3,
                      DEADLINE), m.status()
    a, b, c = data_areas(st)
    assert a == b == c
    assert wait_until(lambda: m._resync_thread is None, DEADLINE)


def test_a_failed_read_is_retried_on_another_leg(three: tuple[dict[str, Store], Mirror]) -> None:
    st, m = three
    write(m, 0, b"r" * 4096)
    st["leg0"].fail_reads = True
    st["leg2"].fail_reads = True
    for _ in range(4):
        assert read(m, 0, 4096) == b"r" * 4096
    legs = m.status()["legs"]
    assert [leg["state"] for leg in legs] == [FAILED, IN_SYNC, FAILED]


def test_a_read_a_leg_does_not_answer_is_retried_on_another_within_leg_timeout() -> None:
    """A read sent to a leg that stopped answering waits leg_timeout, not until the leg's
    transport gives up: it is retried on another in-sync leg, the silent leg is marked out of
    sync (recorded on the others before the data is returned), and its late answer never
    reaches the caller's buffer. Reads and writes meanwhile see the latest data; the leg is
    reattached only once its call returned, then resynced."""
    st = stores(3)
    leg_timeout = 2.0
    m = open_mirror(st, assume_clean=True, leg_timeout=leg_timeout)
    gate = threading.Event()
    try:
        write(m, 0, b"a" * 8192)
        st["leg0"].read_gate = gate  # leg 0 stops answering reads
        buf = bytearray(8192)
        took = []
        for _ in range(3):  # round robin: one of these is sent to leg 0 first
            started = time.monotonic()
            m.read(0, [memoryview(buf)])
            took.append(time.monotonic() - started)
            assert bytes(buf) == b"a" * 8192
        assert max(took) >= 0.95 * leg_timeout, took  # one waited for leg 0's timeout ...
        assert max(took) < leg_timeout + 2, took  # ... and not more than a retry after it
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [FAILED, IN_SYNC, IN_SYNC], s
        assert "read" in s["legs"][0]["error"], s
        for name in ("leg1", "leg2"):  # recorded on the others
            sb = read_superblock(MemoryLeg(st[name]))
            assert sb is not None and not sb.has(0), sb
        # the latest data from here on, from the legs in sync, at once
        write(m, 0, b"b" * 8192)
        started = time.monotonic()
        assert read(m, 0, 8192) == b"b" * 8192
        # Not another leg_timeout: a read sent to leg 0 (its gate still shut) takes one.
        assert time.monotonic() - started < leg_timeout
        assert not m.reattach(0)  # its read is still in the leg's call
        # leg 0 answers at last, with other bytes: they never reach the caller's buffer
        st["leg0"].data[:8192] = b"z" * 8192
        gate.set()
        assert wait_until(lambda: m.status()["legs"][0]["state"] == FAILED
                          and not m._legs[0].busy, DEADLINE)
        assert bytes(buf) == b"a" * 8192
        assert wait_until(lambda: m.reattach(0), DEADLINE)
        assert m.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and a[:8192] == b"b" * 8192
    finally:
        gate.set()
        st["leg0"].read_gate = None
        m.close()


def test_a_read_waiting_for_a_silent_leg_releases_the_writes_queued_on_it() -> None:
    """Quorum all: writes in flight on a leg whose read timed out go on without it as soon as
    its failure is recorded, not at their own deadline."""
    st = stores(2)
    m = open_mirror(st, assume_clean=True, leg_timeout=1.5)
    gate, wgate = threading.Event(), threading.Event()
    try:
        write(m, 0, b"a" * 4096)
        st["leg0"].read_gate = gate
        st["leg0"].data_gate = wgate  # its writes hang too (a silent server)
        done: list[float] = []

        def writer() -> None:
            time.sleep(1.0)  # after the read was sent, before its timeout
            t0 = time.monotonic()
            write(m, 65536, b"w" * 4096)
            done.append(time.monotonic() - t0)

        t = threading.Thread(target=writer)
        t.start()
        started = time.monotonic()
        assert read(m, 0, 4096) == b"a" * 4096  # the first read goes to leg 0
        assert 1.45 <= time.monotonic() - started < 4
        t.join(DEADLINE)
        # Released by the read's timeout (0.5 s after it started), not its own (1.5 s: no
        # sooner). A writer late from its sleep (a loaded machine) finds leg 0 failed: sooner.
        assert done and done[0] < 1.5, done
        assert [leg["state"] for leg in m.status()["legs"]] == [FAILED, IN_SYNC]
        assert read(m, 65536, 4096) == b"w" * 4096
    finally:
        gate.set()
        wgate.set()
        st["leg0"].read_gate = st["leg0"].data_gate = None
        m.close()


def test_a_slow_leg_that_answers_reads_within_leg_timeout_stays_in_sync(
        three: tuple[dict[str, Store], Mirror]) -> None:
    st, m = three
    write(m, 0, b"s" * 4096)
    st["leg1"].read_delay = 0.05  # well within the default leg_timeout
    for _ in range(6):
        assert read(m, 0, 4096) == b"s" * 4096
    s = m.status()
    assert [leg["state"] for leg in s["legs"]] == [IN_SYNC] * 3, s
    assert s["legs"][1]["reads"] == 2, s


def test_least_busy_reads_the_local_leg_unless_it_has_more_reads_in_flight() -> None:
    """The default read policy: fewest reads in flight, a local leg (a path) on a tie: at
    queue depth 1 every read goes to the local leg; with one in flight there, the next goes
    to the NBD leg."""
    st = {}
    for name in ("nbd://far/a", "/near"):
        s = Store(name, SIZE + meta_length(SIZE, REGION))
        s.meta_from = SIZE
        st[name] = s
    m = open_mirror(st, assume_clean=True)
    gate = threading.Event()
    try:
        write(m, 0, b"l" * 4096)
        for _ in range(5):
            assert read(m, 0, 4096) == b"l" * 4096
        assert [leg["reads"] for leg in m.status()["legs"]] == [0, 5]
        st["/near"].read_gate = gate
        t = threading.Thread(target=read, args=(m, 0, 4096))
        t.start()
        assert wait_until(lambda: m._legs[1].busy == 1, DEADLINE)
        assert read(m, 0, 4096) == b"l" * 4096  # the local leg is busy: the NBD leg
        assert m.status()["legs"][0]["reads"] == 1
        gate.set()
        t.join(DEADLINE)
        assert [leg["reads"] for leg in m.status()["legs"]] == [1, 6]
        names = {t.name for t in threading.enumerate()}
        assert "mirror-leg0-call" in names and "mirror-leg1-call" not in names  # local: inline
    finally:
        gate.set()
        m.close()


def test_without_leg_timeout_reads_run_on_the_callers_thread() -> None:
    st = stores(2)
    m = open_mirror(st, assume_clean=True, leg_timeout=0)
    try:
        write(m, 0, b"c" * 4096)
        assert read(m, 0, 4096) == b"c" * 4096
        assert not [t for t in threading.enumerate() if t.name.startswith("mirror-leg0-call")]
    finally:
        m.close()


def test_quorum_loss_refuses_writes_with_data_protect_and_reads_go_on() -> None:
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2)
    try:
        write(m, 0, b"q" * 4096)
        st["leg0"].down = True
        write(m, 4096, b"w" * 4096)  # 2 of 3 left: still the quorum
        st["leg2"].down = True
        with pytest.raises(QuorumLost) as info:
            write(m, 8192, b"x" * 4096)
        assert (info.value.sense_key, info.value.asc, info.value.ascq) == \
            (SenseKey.DATA_PROTECT, 0x27, 0x02)
        assert m.status()["state"] == "read-only"
        assert read(m, 0, 4096) == b"q" * 4096
        assert read(m, 4096, 4096) == b"w" * 4096
        st["leg0"].down = st["leg2"].down = False
        assert m.reattach(0) and m.reattach(2)
        assert m.wait_resync(DEADLINE)
        write(m, 8192, b"x" * 4096)
        a, b, c = data_areas(st)
        assert a == b == c
    finally:
        m.close()


def test_quorum_all_keeps_writing_while_one_leg_is_left() -> None:
    st = stores(2)
    m = open_mirror(st, assume_clean=True)
    try:
        st["leg0"].down = True
        write(m, 0, b"1" * 512)
        st["leg1"].down = True
        with pytest.raises(QuorumLost):
            write(m, 0, b"2" * 512)
    finally:
        m.close()


def _lag_bits(st: dict[str, Store], name: str) -> int:
    sb = read_superblock(MemoryLeg(st[name]))
    assert sb is not None
    return sb.lag


def test_quorum_two_acknowledges_without_the_slow_leg_and_never_reads_it_stale() -> None:
    """Rule 4b: with quorum 2 of 3 a write (and a flush) completes once two legs hold it; the
    third is recorded as lagging on the others first, is never read for the range it still
    owes, and its region stays dirty until it has the write and a flush."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2)
    gate = threading.Event()
    try:
        st["leg2"].data_gate = gate  # leg 2's data writes hang until the gate opens
        started = time.monotonic()
        write(m, 0, b"s" * 4096)
        assert time.monotonic() - started < 5
        assert st["leg0"].data[:4096] == st["leg1"].data[:4096] == b"s" * 4096
        assert st["leg2"].data[:4096] == bytes(4096)  # not there yet
        for name in ("leg0", "leg1"):  # recorded before the acknowledgement
            assert _lag_bits(st, name) == 0b100
        for _ in range(6):  # round robin would reach leg 2: it is skipped for this range
            assert read(m, 0, 4096) == b"s" * 4096
        legs_table = status_tables({"mirrors": [dict(m.status(), device="m0")]})[1]
        assert "behind" in legs_table.headers
        assert [row[4] for row in legs_table.rows] == ["-", "-", "4 KiB"]
        assert read(m, REGION, 512) == bytes(512)  # other ranges may be read from it
        m.flush()  # SYNCHRONIZE CACHE at the quorum, with leg 2 still behind
        assert m.status()["dirty_regions"] == 1  # the bit stays: leg 2 lacks the region
        assert m.status()["lag_acks"] >= 2
        gate.set()
        assert wait_until(lambda: st["leg2"].data[:4096] == b"s" * 4096, DEADLINE)
        m.flush()
        assert wait_until(lambda: m.status()["dirty_regions"] == 0, DEADLINE)
        assert wait_until(lambda: m.status()["legs"][2]["lagging"] is False, DEADLINE)
        assert [leg["state"] for leg in m.status()["legs"]] == [IN_SYNC] * 3
    finally:
        gate.set()
        m.close()
    for name in st:  # a clean close: no leg recorded as lagging
        assert _lag_bits(st, name) == 0


def test_overlapping_writes_reach_a_lagging_leg_in_order() -> None:
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2)
    gate = threading.Event()
    try:
        st["leg1"].data_gate = gate
        for i in range(8):
            write(m, 1024 * (i % 3), bytes([i + 1]) * 4096)
        assert read(m, 0, 8192) == data_areas(st)[0][:8192]
        gate.set()
        m.flush(every_leg=True)
        a, b, c = data_areas(st)
        assert a == b == c
    finally:
        gate.set()
        m.close()


def test_a_leg_too_far_behind_is_marked_out_of_sync_and_resynced_later() -> None:
    """max_lag bounds what a slow leg holds queued: past it the leg is failed (its regions
    stay dirty), the writes go on at the quorum; back, it is resynced to identical."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2, max_lag=4 * 4096)
    gate = threading.Event()
    try:
        st["leg2"].data_gate = gate
        for i in range(8):
            write(m, i * REGION, bytes([i + 1]) * 4096)
        s = m.status()
        assert s["legs"][2]["state"] == FAILED and "behind" in s["legs"][2]["error"], s
        assert s["dirty_regions"] == 8
        for name in ("leg0", "leg1"):
            sb = read_superblock(MemoryLeg(st[name]))
            assert sb is not None and not sb.has(2)
        gate.set()
        back_in_sync(m, st, 2)
    finally:
        gate.set()
        m.close()


def test_a_lagging_leg_that_stops_answering_is_timed_out_by_the_next_write() -> None:
    st = stores(3)
    leg_timeout = 2.0
    m = open_mirror(st, assume_clean=True, quorum=2, leg_timeout=leg_timeout)
    gate = threading.Event()
    try:
        st["leg2"].data_gate = gate
        started = time.monotonic()
        write(m, 0, b"q" * 4096)
        # Not waited for: a write that waited for leg 2 would take leg_timeout.
        assert time.monotonic() - started < leg_timeout
        time.sleep(leg_timeout + 0.05)  # past its deadline, with nobody waiting for it
        write(m, 4096, b"r" * 4096)
        s = m.status()
        assert s["legs"][2]["state"] == FAILED and "within" in s["legs"][2]["error"], s
        for name in ("leg0", "leg1"):
            sb = read_superblock(MemoryLeg(st[name]))
            assert sb is not None and not sb.has(2)
    finally:
        gate.set()
        m.close()


def test_two_lagging_legs_do_not_outvote_the_leg_holding_the_write_after_a_crash() -> None:
    """Quorum 1 of 3, legs 1 and 2 behind: after a crash the majority of the legs holds the
    old bytes; the lag mask keeps them from winning the reconcile (they are resynced from
    leg 0, which alone holds the acknowledged write)."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=1)
    gate = threading.Event()
    for name in ("leg1", "leg2"):
        st[name].data_gate = gate
    write(m, 5 * REGION, b"W" * 4096)
    m.flush()
    m._closing = True  # the process dies with legs 1 and 2 behind
    assert _lag_bits(st, "leg0") == 0b110
    for s in st.values():
        s.data_gate = None
    m2 = open_mirror(st)
    try:
        assert read(m2, 5 * REGION, 4096) == b"W" * 4096
        assert m2.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and a[5 * REGION:5 * REGION + 4096] == b"W" * 4096
    finally:
        gate.set()
        m2.close()
        m._close_legs()


def test_a_lagging_leg_that_answers_slowly_is_not_timed_out_by_its_queue() -> None:
    """leg_timeout bounds one call of a lagging leg, not the time its writes wait queued:
    a leg 50 ms per write, 20 writes queued behind the quorum, stays in sync."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2, leg_timeout=0.3)
    try:
        st["leg2"].delay = 0.05
        for i in range(20):
            write(m, i * 4096, bytes([i + 1]) * 4096)
        m.flush(every_leg=True)
        assert [leg["state"] for leg in m.status()["legs"]] == [IN_SYNC] * 3
        a, b, c = data_areas(st)
        assert a == b == c
    finally:
        m.close()


def test_a_lagging_leg_is_resynced_at_the_next_unclean_open() -> None:
    """The process dies with leg 2 behind acknowledged writes: at open the lag mask names
    it; it is not trusted (not read, not a reconcile source) and is resynced to identical."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, quorum=2)
    gate = threading.Event()
    st["leg2"].data_gate = gate
    write(m, 3 * REGION, b"L" * 4096)
    m.flush()
    m._closing = True
    assert _lag_bits(st, "leg0") == 0b100
    # the process dies: leg 2 never gets the write
    for s in st.values():
        s.data_gate = None
    m2 = open_mirror(st)
    try:
        assert m2.status()["legs"][2]["state"] in ("resyncing", IN_SYNC)
        for _ in range(6):
            assert read(m2, 3 * REGION, 4096) == b"L" * 4096
        assert m2.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and a[3 * REGION:3 * REGION + 4096] == b"L" * 4096
        assert m2.regions_copied >= 1
    finally:
        gate.set()
        m2.close()
        m._close_legs()


def test_a_leg_that_does_not_answer_in_time_is_marked_out_of_sync_and_the_write_goes_on(
) -> None:
    """leg_timeout: a leg silent past the deadline is failed (recorded on the others before
    the acknowledgement) and the write completes with the quorum; the leg is not reattached
    while its worker is still in the call, and resyncs once the call returned."""
    st = stores(3)
    # quorum all: the write waits for leg 2 (with a number it would not: see the lag tests)
    m = open_mirror(st, assume_clean=True, leg_timeout=0.3)
    gate = threading.Event()
    try:
        st["leg2"].gate = gate  # leg 2 hangs (a server that stopped answering)
        started = time.monotonic()
        write(m, 0, b"t" * 4096)
        took = time.monotonic() - started
        assert 0.25 <= took < 5, took
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [IN_SYNC, IN_SYNC, FAILED], s
        assert "did not answer" in s["legs"][2]["error"] or "within" in s["legs"][2]["error"]
        for name in ("leg0", "leg1"):  # rule 3: recorded before the acknowledgement
            sb = read_superblock(MemoryLeg(st[name]))
            assert sb is not None and not sb.has(2), sb
        write(m, 4096, b"u" * 4096)  # leg 2 no longer waited for
        assert not m.reattach(2)  # its worker is still in the call
        gate.set()
        back_in_sync(m, st, 2)
    finally:
        gate.set()
        st["leg2"].gate = None
        m.close()


def test_no_write_is_acknowledged_before_a_timed_out_legs_failure_is_recorded() -> None:
    """Rule 3 with several writers: when a silent leg times out, every write waiting for it
    returns only once the leg's failure is durable on the others, not just the one whose
    waiter writes the record (the others found the leg already marked failed and returned
    at once while the slow superblock write was still going)."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, leg_timeout=1.0)
    gate = threading.Event()
    seen: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            write(m, i * REGION, bytes([i]) * 4096)
            recorded = all(not sb.has(2) for sb in (read_superblock(MemoryLeg(st[name]))
                                                    for name in ("leg0", "leg1"))
                           if sb is not None)
            seen.append((i, recorded))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        for name in ("leg0", "leg1"):
            st[name].meta_delay = 0.1  # the failure record takes a while to write
        st["leg2"].gate = gate  # leg 2 stops answering
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert not errors, errors
        assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
        assert all(ok for _, ok in seen), seen
    finally:
        gate.set()
        st["leg2"].gate = None
        for name in ("leg0", "leg1"):
            st[name].meta_delay = 0.0
        m.close()


#: Seconds a command may take when a leg stops answering a direct call (a superblock write,
#: a resync copy): a few times `leg_timeout` (0.5 s below) does it; the bound is half the
#: 30 s the fake's gates hold a call for (what a silent NBD leg does until TCP gives up),
#: which a command that waited for the silent leg takes whole, with room for a loaded machine.
SILENT_BOUND = 30 / 2


def _writer(m: Mirror, offset: int, data: bytes, done: list[float],
            errors: list[BaseException]) -> threading.Thread:
    """A thread writing `data` (daemon: one held by a leg the test leaves hung never keeps
    the test run alive); appends its duration to `done` or its exception to `errors`."""
    def run() -> None:
        started = time.monotonic()
        try:
            write(m, offset, data)
            done.append(time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _join_all(threads: list[threading.Thread], bound: float) -> bool:
    """Whether every thread ended within `bound` seconds from now."""
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def test_a_leg_silent_while_a_superblock_is_written_is_failed_and_writes_go_on() -> None:
    """Issue 16: the superblock write recording leg 0's failure is made with the metadata
    lock held, which every write takes; leg 2 stops answering it. The call is bounded by
    `leg_timeout` (it runs on a thread of leg 2's): leg 2 is failed ("no answer within"),
    the writes behind the lock complete, and leg 2 is reattached only once its call
    returned, then resynced to identical data."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, leg_timeout=0.5)
    gate = threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []
    try:
        for r in range(4):  # the bits are set: the writes below queue no bitmap block
            write(m, r * REGION, b"0" * 4096)
        st["leg2"].meta_gate = gate  # leg 2 stops answering metadata writes
        st["leg0"].down = True  # the first write fails leg 0: the record goes to legs 1, 2
        threads = [_writer(m, 0, b"\1" * 4096, done, errors)]
        assert wait_until(lambda: m._recording or errors, DEADLINE)
        threads += [_writer(m, r * REGION, bytes([r + 1]) * 4096, done, errors)
                    for r in range(1, 4)]  # behind the metadata lock
        assert _join_all(threads, SILENT_BOUND), "writes held by the silent leg"
        assert not errors, errors
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [FAILED, IN_SYNC, FAILED], s
        assert "no answer within" in s["legs"][2]["error"], s
        sb = read_superblock(MemoryLeg(st["leg1"]))
        assert sb is not None and sb.active == 0b010, sb  # both failures recorded
        for r in range(4):
            assert read(m, r * REGION, 4096) == bytes([r + 1]) * 4096
        assert not m.reattach(2)  # its superblock write is still in the leg's call
        gate.set()
        st["leg2"].meta_gate = None
        st["leg0"].down = False
        assert wait_until(lambda: m.reattach(2), DEADLINE)
        assert m.reattach(0)
        assert m.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c
        assert all(a[r * REGION:r * REGION + 4096] == bytes([r + 1]) * 4096 for r in range(4))
    finally:
        gate.set()
        st["leg2"].meta_gate = None
        m.close()


def _resync_holding_region_1(st: dict[str, Store], m: Mirror) -> None:
    """Leg 2 misses regions 1, 5, 9 and is reattached: the resync starts with region 1 and
    is in it when this returns."""
    st["leg2"].down = True
    for r in (1, 5, 9):
        write(m, r * REGION, bytes([r]) * 8192)
    st["leg2"].down = False
    assert m.reattach(2)
    assert wait_until(lambda: 1 in m._resync_busy, DEADLINE)


def test_a_resync_target_silent_mid_copy_is_given_up_and_writes_to_its_region_go_on(
) -> None:
    """Issue 16: the resync writes a region to its target directly (the region held from
    the initiator's writes meanwhile); a target that stops answering is failed after
    `leg_timeout` and the write waiting for the region completes. Once the call returned
    it is reattached and resynced to identical data."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, leg_timeout=0.5)
    gate = threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []
    try:
        st["leg2"].data_gate = gate  # the copy of region 1 to leg 2 hangs
        _resync_holding_region_1(st, m)
        t = _writer(m, REGION + 512, b"W" * 1024, done, errors)
        assert _join_all([t], SILENT_BOUND), "the write waited for the silent resync target"
        assert not errors, errors
        assert wait_until(lambda: m.status()["legs"][2]["state"] == FAILED, SILENT_BOUND)
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [IN_SYNC, IN_SYNC, FAILED], s
        assert "no answer within" in s["legs"][2]["error"], s
        assert read(m, REGION + 512, 1024) == b"W" * 1024
        assert not m.reattach(2)  # the copy's write is still in the leg's call
        gate.set()
        st["leg2"].data_gate = None
        assert wait_until(lambda: m.reattach(2), DEADLINE)
        assert m.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and a[REGION + 512:REGION + 1536] == b"W" * 1024
    finally:
        gate.set()
        st["leg2"].data_gate = None
        m.close()


def test_a_resync_source_silent_mid_copy_is_given_up_and_another_leg_is_copied_from(
) -> None:
    """The resync reads its source directly: a source that stops answering is failed after
    `leg_timeout`, the write waiting for the region completes, and the next pass copies
    from the other in-sync leg; the target ends identical to it."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, leg_timeout=0.5)
    gate = threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []
    try:
        st["leg0"].read_gate = gate  # the resync's source (leg 0) stops answering reads
        _resync_holding_region_1(st, m)
        t = _writer(m, REGION + 512, b"S" * 1024, done, errors)
        assert _join_all([t], SILENT_BOUND), "the write waited for the silent resync source"
        assert not errors, errors
        assert m.wait_resync(DEADLINE)
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [FAILED, IN_SYNC, IN_SYNC], s
        assert "no answer within" in s["legs"][0]["error"], s
        _, b, c = data_areas(st)
        assert b == c and b[REGION + 512:REGION + 1536] == b"S" * 1024
        assert b[5 * REGION:5 * REGION + 8192] == b"\5" * 8192
        gate.set()
        st["leg0"].read_gate = None
        back_in_sync(m, st, 0)
    finally:
        gate.set()
        st["leg0"].read_gate = None
        m.close()


def test_a_leg_silent_to_its_reattach_probe_stays_failed_and_is_probed_again() -> None:
    """`reattach` reads the superblock of the reopened leg directly: a leg that does not
    answer is left failed after `leg_timeout` (reattach returns False), kept open until
    its call returns, and reattached on a later attempt."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True, leg_timeout=0.5)
    gate = threading.Event()
    try:
        st["leg2"].down = True
        write(m, 3 * REGION, b"p" * 4096)
        st["leg2"].down = False
        st["leg2"].read_gate = gate
        started = time.monotonic()
        assert not m.reattach(2)
        assert time.monotonic() - started < SILENT_BOUND
        s = m.status()
        assert s["legs"][2]["state"] == FAILED and "no answer within" in s["legs"][2]["error"]
        assert not m.reattach(2)  # its probe is still in the leg's call
        gate.set()
        st["leg2"].read_gate = None
        back_in_sync(m, st, 2)
    finally:
        gate.set()
        st["leg2"].read_gate = None
        m.close()


def _crashed_with_a_write_on_one_leg(st: dict[str, Store], name: str, region: int,
                                     fill: bytes) -> None:
    """The three legs of `st` stop unclean (the process dies) after writes to regions 2 and
    6 (their bits set on every leg), with a write to `region` that reached only leg `name`:
    its data and its bit, on that leg only (rule 1), never acknowledged."""
    m = open_mirror(st, assume_clean=True, leg_timeout=0.5)
    for r in (2, 6):
        write(m, r * REGION, bytes([r]) * 4096)
    m._close_legs()  # the process dies: no clean close
    s = st[name]
    s.data[region * REGION:region * REGION + 4096] = fill * 4096
    s.data[SIZE + (region >> 3)] |= 1 << (region & 7)  # the bitmap starts at SIZE here


def test_an_unclean_open_with_a_silent_leg_opens_without_it_and_resyncs_it_later() -> None:
    """Issue 16: a leg that does not answer its superblock read at open (an NBD server up,
    packets dropped) counts as unreachable after `leg_timeout`, like one that does not
    connect: the open (a reconcile of the other two) completes without it, it is out of
    sync, and once its call returned it is reattached and resynced to identical data,
    including a region only its own bitmap names (a write that reached it alone)."""
    st = stores(3)
    _crashed_with_a_write_on_one_leg(st, "leg2", 7, b"Z")
    gate = threading.Event()
    st["leg2"].read_gate = gate  # leg 2 stops answering reads
    started = time.monotonic()
    m = open_mirror(st, leg_timeout=0.5)
    try:
        assert time.monotonic() - started < SILENT_BOUND, "the open waited for the silent leg"
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [IN_SYNC, IN_SYNC, FAILED], s
        assert "no answer within 0.5 s" in s["legs"][2]["error"], s
        sb = read_superblock(MemoryLeg(st["leg0"]))
        assert sb is not None and sb.active == 0b011, sb
        for r in (2, 6):
            assert read(m, r * REGION, 4096) == bytes([r]) * 4096
        assert not m.reattach(2)  # its superblock read is still in the leg's call
        gate.set()
        st["leg2"].read_gate = None
        assert wait_until(lambda: m.reattach(2), DEADLINE)
        assert m.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and a[7 * REGION:7 * REGION + 4096] == bytes(4096)
    finally:
        gate.set()
        st["leg2"].read_gate = None
        m.close()


def test_a_leg_silent_mid_reconcile_is_failed_and_the_open_goes_on_with_the_others() -> None:
    """The unclean open reads and writes the in-sync legs directly: leg 1 answers its
    metadata reads, then not its data reads. It is failed after `leg_timeout` (recorded on
    the others), the reconcile finishes on legs 0 and 2 (they disagree on region 7: the
    freshest leg's copy wins), and leg 1 is resynced once back."""
    st = stores(3)
    _crashed_with_a_write_on_one_leg(st, "leg0", 7, b"Y")
    gate = threading.Event()
    st["leg1"].data_read_gate = gate
    started = time.monotonic()
    m = open_mirror(st, leg_timeout=0.5)
    try:
        assert time.monotonic() - started < SILENT_BOUND, "the open waited for the silent leg"
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [IN_SYNC, FAILED, IN_SYNC], s
        assert "no answer within 0.5 s to a reconcile read" in s["legs"][1]["error"], s
        sb = read_superblock(MemoryLeg(st["leg2"]))
        assert sb is not None and sb.active == 0b101, sb
        a, _, c = data_areas(st)
        assert a == c and a[7 * REGION:7 * REGION + 4096] == b"Y" * 4096
        gate.set()
        st["leg1"].data_read_gate = None
        back_in_sync(m, st, 1)
    finally:
        gate.set()
        st["leg1"].data_read_gate = None
        m.close()


@pytest.mark.parametrize("gate_name", ["read_gate", "data_read_gate"])
def test_an_open_with_two_of_three_legs_silent_is_refused_naming_them_writing_nothing(
        gate_name: str) -> None:
    """Two legs of three stop answering at open, at their superblock reads (read_gate) or
    in the reconcile (data_read_gate): the open is refused within a few `leg_timeout`s
    with a ConfigError naming both, and no byte of any leg was written."""
    st = stores(3)
    _crashed_with_a_write_on_one_leg(st, "leg0", 7, b"X")
    gate = threading.Event()
    for name in ("leg1", "leg2"):
        setattr(st[name], gate_name, gate)
    before = [bytes(s.data) for s in st.values()]
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError) as err:
            open_mirror(st, leg_timeout=0.5)
        assert time.monotonic() - started < SILENT_BOUND, "the open waited for the silent legs"
        msg = str(err.value)
        assert "no answer within 0.5 s" in msg, msg
        assert "leg 1 (leg1)" in msg and "leg 2 (leg2)" in msg, msg
    finally:
        gate.set()
    assert wait_until(lambda: [bytes(s.data) for s in st.values()] == before, 1.0), \
        "a leg was written by the refused open"
    m = open_mirror(st, leg_timeout=0.5)  # every leg back: it opens, the legs agree
    try:  # on region 7 the majority holds the old bytes (the write was never acknowledged)
        a, b, c = data_areas(st)
        assert a == b == c and a[7 * REGION:7 * REGION + 4096] == bytes(4096)
    finally:
        m.close()


def test_a_leg_silent_to_the_opens_metadata_writes_is_failed_and_the_open_completes() -> None:
    """The open writes the bitmap through the legs' FIFOs and the superblocks directly:
    leg 2, silent to metadata writes, is failed after `leg_timeout` (recorded on the
    others) and the open completes; once its call returned it is reattached and resynced."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True)
    write(m, 4 * REGION, b"m" * 4096)
    m.close()
    gate = threading.Event()
    st["leg2"].meta_gate = gate
    started = time.monotonic()
    m = open_mirror(st, leg_timeout=0.5)
    try:
        assert time.monotonic() - started < SILENT_BOUND, "the open waited for the silent leg"
        s = m.status()
        assert [leg["state"] for leg in s["legs"]] == [IN_SYNC, IN_SYNC, FAILED], s
        assert "no answer within" in s["legs"][2]["error"], s
        sb = read_superblock(MemoryLeg(st["leg0"]))
        assert sb is not None and sb.active == 0b011, sb
        gate.set()
        st["leg2"].meta_gate = None
        back_in_sync(m, st, 2)
        assert data_areas(st)[0][4 * REGION:4 * REGION + 4096] == b"m" * 4096
    finally:
        gate.set()
        st["leg2"].meta_gate = None
        m.close()


def test_a_target_failed_and_reattached_during_a_resync_pass_is_not_promoted_by_it() -> None:
    """A resync target that fails mid-pass (here at region 1) and is reattached before the
    pass ends missed the regions copied meanwhile: that pass does not mark it in sync (it
    did before: region 1 was never copied to it); the next pass copies every dirty region."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True)
    hold_write, hold_read = threading.Event(), threading.Event()
    try:
        st["leg2"].data_gate = hold_write  # the copy of region 1 to leg 2 waits
        _resync_holding_region_1(st, m)
        assert wait_until(lambda: m._legs[2].calls == 1, DEADLINE)
        st["leg0"].read_gate = hold_read  # the pass's next source read (region 5) waits
        st["leg2"].down = True
        hold_write.set()  # region 1's copy to leg 2 fails: leg 2 is failed mid-pass
        assert wait_until(lambda: m.status()["legs"][2]["state"] == FAILED
                          and 5 in m._resync_busy, DEADLINE)
        st["leg2"].down = False
        st["leg2"].data_gate = None
        assert m.reattach(2)  # during the pass
        hold_read.set()
        st["leg0"].read_gate = None
        assert m.wait_resync(DEADLINE)
        a, b, c = data_areas(st)
        assert a == b == c and c[REGION:REGION + 8192] == b"\1" * 8192
    finally:
        hold_write.set()
        hold_read.set()
        m.close()


def test_a_late_failure_of_a_leg_before_its_reattach_does_not_fail_it_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reads fail on the last leg in sync; one thread records it failed (the last one
    standing), the other reports its own failure only after `reattach` brought the leg back
    (in sync again: it holds every acknowledged write). That late report is of the leg's
    previous attachment and changes nothing: the leg stays in sync and the other resyncs
    from it (it was failed again, left the mirror with no source: the random test, seed 3)."""
    st = stores(2)
    m = open_mirror(st, assume_clean=True)
    late = threading.current_thread()
    reached, go = threading.Event(), threading.Event()
    real = m._lost

    def lost(ls: object, exc: OSError, *args: object) -> None:
        if threading.current_thread() is late:
            reached.set()
            assert go.wait(DEADLINE)
        real(ls, exc, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(m, "_lost", lost)
    try:
        write(m, 0, b"a" * 4096)
        st["leg1"].down = True
        write(m, REGION, b"b" * 4096)  # leg 1 fails: leg 0 is the last in sync
        st["leg0"].down = True
        errors: list[BaseException] = []

        def late_read() -> None:
            try:
                read(m, 0, 4096)
            except OSError as exc:
                errors.append(exc)

        late = threading.Thread(target=late_read)
        late.start()
        assert reached.wait(DEADLINE)  # its read failed; its report waits
        with pytest.raises(OSError):
            read(m, 0, 4096)  # fails leg 0: no leg in sync
        assert m.status()["legs"][0]["state"] == FAILED
        st["leg0"].down = st["leg1"].down = False
        assert m.reattach(0)
        assert m.status()["legs"][0]["state"] == IN_SYNC  # the last one standing
        go.set()
        late.join(DEADLINE)
        assert errors  # that read had no leg left to try
        assert m.status()["legs"][0]["state"] == IN_SYNC
        back_in_sync(m, st, 1)
        assert data_areas(st)[1][REGION:REGION + 4096] == b"b" * 4096
    finally:
        go.set()
        m.close()


def test_a_resync_pass_whose_source_fails_copies_nothing_more_from_it() -> None:
    """The resync's source (leg 0) fails a write mid-pass but still answers reads: the
    write is acknowledged by leg 2, and leg 0 lacks it. The pass copies nothing more from
    leg 0 (it used to copy that region from it, stale, and mark the target in sync: leg 1
    then lacked an acknowledged write); the next pass copies from leg 2."""
    st = stores(3)
    m = open_mirror(st, assume_clean=True)
    hold = threading.Event()
    try:
        st["leg1"].down = True
        for r in (2, 6):
            write(m, r * REGION, bytes([r]) * 4096)
        st["leg1"].down = False
        st["leg0"].data_read_gate = hold  # the pass's read of region 2 from leg 0 waits
        assert m.reattach(1)
        assert wait_until(lambda: 2 in m._resync_busy, DEADLINE)
        st["leg0"].fail_writes = True
        write(m, 6 * REGION, b"N" * 4096)  # leg 0 fails it; leg 2 holds it
        assert m.status()["legs"][0]["state"] == FAILED
        st["leg0"].data_read_gate = None
        hold.set()
        assert m.wait_resync(DEADLINE)
        assert m.status()["legs"][1]["state"] == IN_SYNC
        b, c = data_areas(st)[1:]
        assert b == c and b[6 * REGION:6 * REGION + 4096] == b"N" * 4096
        assert read(m, 6 * REGION, 4096) == b"N" * 4096
    finally:
        hold.set()
        m.close()


def test_a_write_held_by_a_leg_that_came_in_sync_meanwhile_is_acknowledged() -> None:
    """A write reaches leg 0 (in sync) and leg 1 (resyncing); leg 1 writes it and its
    resync ends; then leg 0 fails it. Leg 1, in sync, holds it: it is acknowledged (it
    failed with leg 0's EIO, a leg in sync holding it: the random test, seed 3)."""
    st = stores(2)
    m = open_mirror(st, assume_clean=True)
    hold_read, hold_write = threading.Event(), threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []
    try:
        st["leg1"].down = True
        write(m, 0, b"x" * 4096)
        st["leg1"].down = False
        st["leg0"].data_read_gate = hold_read  # the pass's read of region 0 waits
        assert m.reattach(1)
        assert wait_until(lambda: 0 in m._resync_busy, DEADLINE)
        st["leg0"].data_gate = hold_write  # the write waits on leg 0 ...
        t = _writer(m, 5 * REGION, b"W" * 4096, done, errors)
        assert wait_until(  # ... and is on leg 1
            lambda: st["leg1"].data[5 * REGION:5 * REGION + 4096] == b"W" * 4096, DEADLINE)
        st["leg0"].data_read_gate = None
        hold_read.set()
        assert wait_until(lambda: m.status()["legs"][1]["state"] == IN_SYNC, DEADLINE)
        st["leg0"].down = True
        hold_write.set()  # leg 0 fails the write
        assert _join_all([t], DEADLINE)
        assert not errors, errors
        assert m.status()["legs"][0]["state"] == FAILED
        assert read(m, 5 * REGION, 4096) == b"W" * 4096
        st["leg0"].down = False
        st["leg0"].data_gate = None
        back_in_sync(m, st, 0)
        assert data_areas(st)[0][5 * REGION:5 * REGION + 4096] == b"W" * 4096
    finally:
        hold_read.set()
        hold_write.set()
        m.close()


def test_a_last_leg_standing_that_missed_an_acknowledged_write_is_not_brought_back() -> None:
    """Quorum 1: leg 1 lags (its writes held), leg 0 fails a write and is the last leg
    standing that is not lagging; leg 1 then acknowledges that write and fails the next one
    while still lagging. Leg 0 lacks an acknowledged write: reattached, it is not brought
    back in sync (it was, and served the old bytes); no leg is, and the mirror refuses."""
    st = stores(2)
    m = open_mirror(st, assume_clean=True, quorum=1, leg_timeout=0)
    hold, acked = threading.Event(), threading.Event()
    done: list[float] = []
    errors: list[BaseException] = []
    try:
        write(m, 0, b"0" * 4096)  # region 0's bit set: no bitmap block queued below
        st["leg1"].gate = hold
        write(m, 0, b"a" * 4096)  # acknowledged by leg 0; leg 1 lags
        assert m.status()["legs"][1]["lagging"]
        st["leg0"].fail_writes = True
        w1 = _writer(m, 4096, b"b" * 4096, done, errors)  # leg 0 fails it: waits for leg 1
        assert wait_until(lambda: m.status()["legs"][0]["state"] == FAILED
                          and len(m._legs[1].ops) == 2, DEADLINE)
        w2 = _writer(m, 8192, b"c" * 4096, done, errors)
        assert wait_until(lambda: len(m._legs[1].ops) == 3, DEADLINE)
        class ThirdFails(Crash):
            """Leg 1 does the first two writes, fails the third once "b" is acknowledged."""

            def take(self) -> bool:
                if super().take():
                    return True
                assert acked.wait(DEADLINE)
                return False

        st["leg1"].crash = ThirdFails(2)
        hold.set()
        assert wait_until(lambda: len(done) + len(errors) >= 1, DEADLINE)
        acked.set()
        assert _join_all([w1, w2], DEADLINE)
        assert len(done) == 1 and len(errors) == 1, (done, errors)  # "b" acknowledged
        assert m.status()["legs"][1]["state"] == FAILED
        st["leg0"].fail_writes = False
        st["leg1"].crash = None
        st["leg1"].gate = None
        m.reattach(0)
        m.reattach(1)
        assert not any(leg["state"] == IN_SYNC for leg in m.status()["legs"])
        with pytest.raises(OSError):
            read(m, 4096, 4096)
        with pytest.raises(QuorumLost):
            write(m, 0, b"d" * 512)
    finally:
        hold.set()
        acked.set()
        m.close()


def test_reopen_after_clean_close_copies_nothing() -> None:
    st = stores(2)
    m = open_mirror(st, assume_clean=True)
    write(m, 0, b"c" * 4096)
    m.close()
    m = open_mirror(st)
    try:
        assert m.status()["dirty_regions"] == 0 and m.regions_copied == 0
        assert read(m, 0, 4096) == b"c" * 4096
    finally:
        m.close()


def test_a_stale_leg_is_resynced_from_the_freshest_at_open() -> None:
    st = stores(3)
    m = open_mirror(st, assume_clean=True)
    st["leg0"].down = True
    write(m, 5 * REGION, b"f" * 4096)
    write(m, 9 * REGION, b"g" * 4096)
    m.close()
    st["leg0"].down = False
    m = open_mirror(st)
    try:
        assert m.wait_resync(DEADLINE)
        assert m.regions_copied == 2
        a, b, c = data_areas(st)
        assert a == b == c and a[5 * REGION:5 * REGION + 4096] == b"f" * 4096
    finally:
        m.close()


def test_open_without_a_majority_is_refused_unless_degraded_open() -> None:
    st = stores(2)
    open_mirror(st, assume_clean=True).close()
    st["leg1"].down = True
    with pytest.raises(ConfigError, match=r"1 of 2 legs reachable.*majority \(2\).*leg1"):
        open_mirror(st)
    open_mirror(st, degraded_open=True).close()


def test_split_brain_is_refused_naming_the_legs_and_touching_neither() -> None:
    st = stores(2)
    open_mirror(st, assume_clean=True).close()
    for alive, dead, fill in (("leg0", "leg1", b"A"), ("leg1", "leg0", b"B")):
        st[dead].down = True
        st[alive].down = False
        m = open_mirror(st, degraded_open=True)
        write(m, 0, fill * 4096)
        m.close()
    st["leg0"].down = st["leg1"].down = False
    before = [bytes(s.data) for s in st.values()]
    with pytest.raises(ConfigError, match=r"split brain: leg 0 \(leg0\).*leg 1 \(leg1\)"):
        open_mirror(st)
    assert [bytes(s.data) for s in st.values()] == before


def test_legs_of_another_mirror_are_refused() -> None:
    a, b = stores(2), stores(2)
    open_mirror(a, assume_clean=True).close()
    open_mirror(b, assume_clean=True).close()
    mixed = {"leg0": a["leg0"], "leg1": b["leg1"]}
    with pytest.raises(ConfigError, match="expected legs of one mirror"):
        open_mirror(mixed)


def test_a_torn_superblock_falls_back_to_the_other_slot() -> None:
    st = stores(2)
    m = open_mirror(st, assume_clean=True)
    write(m, 0, b"t" * 512)
    uid, gen = m.uuid, m.generation
    m.close()
    for s in st.values():
        slots = len(s.data) - 2 * SLOT
        # tear the newest slot of each leg (the close wrote it last)
        newest = max((0, 1), key=lambda k: int.from_bytes(
            s.data[slots + k * SLOT + 52:slots + k * SLOT + 60], "little"))
        s.data[slots + newest * SLOT + 20] ^= 0xFF
    m = open_mirror(st)
    try:
        assert m.uuid == uid and m.generation == gen + 1  # the older slot, then this open
        assert read(m, 0, 512) == b"t" * 512
    finally:
        m.close()


@pytest.mark.parametrize("seed", range(10))  # 7: the lagging leg left last in sync
def test_random_operations_match_a_byte_model(seed: int) -> None:
    rng = random.Random(seed)
    st = stores(3)
    quorum = rng.choice([0, 2])
    m = open_mirror(st, assume_clean=True, quorum=quorum)
    if quorum:  # a slow leg: acknowledged writes it still owes must never be read from it
        st[rng.choice(list(st))].delay = 0.003
    model = bytearray(SIZE)
    try:
        for _ in range(120):
            op = rng.random()
            names = list(st)
            if op < 0.5:
                off = rng.randrange(0, SIZE // 512) * 512
                n = min(SIZE - off, rng.randrange(1, 40) * 512)
                data = rng.randbytes(n)
                try:
                    write(m, off, data)
                    model[off:off + n] = data
                except QuorumLost:
                    # the refused write may have reached some legs: the model keeps both answers
                    # out of the picture by writing it again once the quorum is back
                    for s in st.values():
                        s.down = False
                    for i in range(3):
                        m.reattach(i)
                    assert m.wait_resync(DEADLINE)
                    write(m, off, data)
                    model[off:off + n] = data
            elif op < 0.8:
                off = rng.randrange(0, SIZE // 512) * 512
                n = min(SIZE - off, rng.randrange(1, 40) * 512)
                try:
                    assert read(m, off, n) == model[off:off + n]
                except OSError:
                    # every leg failed (the others may be back, but stale, with no source yet)
                    assert not any(leg["state"] == IN_SYNC for leg in m.status()["legs"])
            elif op < 0.88:
                st[rng.choice(names)].down = True
            elif op < 0.96:
                for i, name in enumerate(names):
                    if st[name].down and rng.random() < 0.7:
                        st[name].down = False
                        m.reattach(i)
            else:
                with contextlib.suppress(QuorumLost):
                    m.flush()
        for s in st.values():
            s.down = False
        for i in range(3):
            m.reattach(i)
        assert m.wait_resync(DEADLINE)
        m.flush(every_leg=True)  # the slow leg too
        for area in data_areas(st):
            assert area == model
    finally:
        m.close()


def _workload(m: Mirror, acked: list[tuple[int, bytes]], tried: list[tuple[int, bytes]]
              ) -> None:
    rng = random.Random(7)
    for i in range(24):
        off = rng.randrange(0, SIZE // 4096) * 4096
        data = bytes([i + 1]) * rng.choice([512, 4096, REGION + 4096])
        data = data[:SIZE - off]
        tried.append((off, data))
        write(m, off, data)
        acked.append((off, data))
        if i % 7 == 6:
            m.flush()


def _crash_run(after: int, legs: int, quorum: int, slow: bool = False
               ) -> tuple[dict[str, Store], list[tuple[int, bytes]], tuple[int, bytes] | None]:
    """The workload cut by a power cut after `after` leg writes: (the stores, the acknowledged
    writes, the write that was in flight, None if none was)."""
    crash = Crash(10 ** 9)
    st = stores(legs, crash)
    m = open_mirror(st, assume_clean=True, quorum=quorum)
    if slow:  # the last leg lags: writes are acknowledged by the quorum without it
        st[f"leg{legs - 1}"].delay = 0.002
    crash.count, crash.after = 0, after
    acked: list[tuple[int, bytes]] = []
    tried: list[tuple[int, bytes]] = []
    inflight = None
    try:
        _workload(m, acked, tried)
    except (OSError, QuorumLost):
        if len(tried) > len(acked):
            inflight = tried[-1]
    m._close_legs()  # the process dies: no clean close
    return st, acked, inflight


@pytest.mark.parametrize(("legs", "quorum", "slow"),
                         [(2, 0, False), (3, 0, False), (3, 2, False), (3, 2, True),
                          (2, 1, True)])
def test_a_crash_at_every_write_leaves_legs_that_open_identical_with_every_acked_write(
        legs: int, quorum: int, slow: bool) -> None:
    """Power cut after each of the first N leg writes (data, bitmap or superblock): the mirror
    opens, its legs are identical afterwards, and every acknowledged write reads back (where
    the write in flight at the cut overlaps it, each block holds one or the other)."""
    points = 0
    for after in range(0, 70 * legs, 3):
        st, acked, inflight = _crash_run(after, legs, quorum, slow)
        for s in st.values():
            s.crash = None
            s.delay = 0.0
        m = open_mirror(st)
        try:
            expect = bytearray(SIZE)
            for off, data in acked:
                expect[off:off + len(data)] = data
            landed = bytearray(expect)
            if inflight is not None:
                landed[inflight[0]:inflight[0] + len(inflight[1])] = inflight[1]
            before_resync = read(m, 0, SIZE)  # served at once: from legs holding every ack
            assert m.wait_resync(DEADLINE)  # a leg that lagged is resynced first
            areas = data_areas(st)
            assert areas.count(areas[0]) == legs, f"crash after {after}: legs differ after open"
            got = read(m, 0, SIZE)
            assert got == before_resync, f"crash after {after}: the resync changed data"
            for blk in range(0, SIZE, 512):
                ok = [expect[blk:blk + 512], landed[blk:blk + 512]]
                assert got[blk:blk + 512] in ok, f"crash after {after}: block {blk}"
        finally:
            m.close()
        points += inflight is not None
    # most points crashed inside a write (fewer with a slow leg: it acknowledges nothing)
    assert points >= (10 if slow else 20)


class BatchingLeg(MemoryLeg):
    """A leg that takes batches (`write_many`, as an NBD leg does) and, like a server free to
    reorder what is in flight, applies each batch last write first."""

    def __init__(self, store: Store, batches: list[int]) -> None:
        super().__init__(store)
        self.batches = batches

    def write_many(self, writes: list[tuple[int, bytes, bool]]) -> list[OSError | None]:
        self.batches.append(len(writes))
        results: list[OSError | None] = [None] * len(writes)
        for i in reversed(range(len(writes))):
            offset, data, fua = writes[i]
            try:
                self.write(offset, data, fua)
            except OSError as exc:
                results[i] = exc
        return results


def test_writes_queued_on_a_batching_leg_go_together_and_the_legs_stay_identical() -> None:
    """Eight writers, overlapping at random, while leg 1 (which takes batches and reorders
    them) is held: its queue fills, and once released its worker sends runs of writes that do
    not overlap together; a bitmap block, a flush or an overlapping write starts a new run.
    The legs end identical, and every block holds one of the writes made to it."""
    st = stores(3)
    batches: list[int] = []

    def open_leg(spec: str, size: int) -> MemoryLeg:
        store = st[spec]
        return BatchingLeg(store, batches) if spec == "leg1" else MemoryLeg(store)

    cfg = MirrorConfig(legs=tuple(st), size=SIZE, region=REGION, resync_rate=0,
                       retry_interval=0, assume_clean=True)
    m = Mirror.open(cfg, 512, open_leg)
    written: dict[int, set[bytes]] = {}
    lock = threading.Lock()
    gate = threading.Event()
    st["leg1"].data_gate = gate

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            off = rng.randrange(0, SIZE // 512 - 16) * 512
            data = rng.randbytes(rng.randrange(1, 16) * 512)
            with lock:
                for blk in range(off, off + len(data), 512):
                    written.setdefault(blk, set()).add(data[blk - off:blk - off + 512])
            write(m, off, data)
            if rng.random() < 0.1:
                m.flush()

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    try:
        for t in threads:
            t.start()
        # let the writers queue behind the held leg, then release it
        assert wait_until(lambda: len(m._legs[1].ops) >= 6, DEADLINE)
        gate.set()
        assert _join_all(threads, DEADLINE)
        areas = data_areas(st)
        assert areas[0] == areas[1] == areas[2], "the batching leg differs"
        for blk, options in written.items():
            assert areas[0][blk:blk + 512] in options, f"block {blk}"
        assert max(batches) > 1, f"no batch formed: {batches}"
    finally:
        gate.set()
        m.close()
