"""The C data plane (`tcmu_py.ring.DataPlane`, issue 17 stage 1) against the Python path.

The property test runs one random program twice — the engine with the data plane on and off, the
same device on FakeKernel — and demands the same answer to every command (status, sense, Data-In),
the same image bytes and the same counters. The programs mix plain READ/WRITE(6/10/12/16) with FUA,
transfer lengths that do not match the buffers, LBAs past the end, COMPARE AND WRITE, WRITE SAME
(with UNMAP), UNMAP, TEST UNIT READY, TMR aborts of commands of the same wake-up, resizes (unit
attentions) and a ring small enough to wrap every few wake-ups. Every command of a wake-up is in
flight together, so they overlap each other. One worker makes the Python path itself keep ring
order for overlapping commands, so both runs must agree exactly.

The other tests pin the rules one at a time: a command running on a worker fences overlapping C
commands off (and only those), no C command is in flight when `process()` returns, an I/O error
goes back to Python, the extent follows a resize, and the switch turns the plane off.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_py import ring as ring_module
from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.raw import RawBackend
from tcmu_py.handlers.thin import Pool, ThinBackend, create_pool
from tcmu_py.ring import TmrType
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness

BS = 512
BLOCKS = 64


class UnmapRaw(RawBackend):
    """A raw image that also deallocates (writes zeros: LBPRZ), so UNMAP and WRITE SAME with
    UNMAP run on a device whose data is a file extent."""

    lbprz = True

    def unmap(self, offset: int, length: int) -> None:
        self.write(offset, [memoryview(bytes(length))])


class GatedRaw(UnmapRaw):
    """WRITE SAME waits for `gate`: a slow command held on a worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write_same(self, offset: int, length: int, block: bytes, unmap: bool) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.write(offset, [memoryview(block * (length // len(block)))])


def make_device(tmp: Path, name: str, backend_cls: type[RawBackend] = UnmapRaw,
                write_cache: bool = True) -> BlockDevice:
    img = str(tmp / f"{name}.img")
    config = DeviceConfig(name, "raw", img, BLOCKS * BS, BS, write_cache=write_cache)
    return open_block_device(config, backend_cls(img, config.size, BS, write_cache))


#: The thin disks' allocation unit: 8 blocks, so commands of a few blocks straddle units.
UNIT = 4096


def make_thin(tmp: Path, name: str, backend_cls: type[ThinBackend] = ThinBackend) -> BlockDevice:
    """A thin disk of BLOCKS blocks in a pool of twice that, no soft threshold (a threshold
    unit attention is raised by whichever command allocates first, a race the property test
    would see as a difference). Its file is at ``<tmp>/pool-<name>/<name>.img``-like path
    (`thin_image`)."""
    path = str(tmp / f"pool-{name}")
    create_pool(path, "p", 2 * BLOCKS * BS, None, unit=UNIT)
    pool = Pool.open(path)
    backend = pool.open_disk("d", BLOCKS * BS, write_cache=True, on_close=pool.close)
    if backend_cls is not ThinBackend:
        backend.__class__ = backend_cls
    config = DeviceConfig(name, "thin", f"pool={path}", BLOCKS * BS, BS, write_cache=True)
    return open_block_device(config, backend)


def thin_image(device: BlockDevice) -> str:
    backend = device.backend
    assert isinstance(backend, ThinBackend)
    return os.readlink(f"/proc/self/fd/{backend._fd}")


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm): a fully allocated image there is one the native loop
    maps and copies through (`tcmu_py_loop_declare`)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tcmu-py-test-") as d:
        yield Path(d)


# --- the property test ----------------------------------------------------------------------

_READS = {6: cdbs.read6, 10: cdbs.read10, 12: cdbs.read12, 16: cdbs.read16}
_WRITES = {6: cdbs.write6, 10: cdbs.write10, 12: cdbs.write12, 16: cdbs.write16}

lbas = st.integers(0, BLOCKS + 2)
counts = st.integers(0, 6)
#: (kind, lba, blocks, variant, fua, length slip in blocks)
commands = st.tuples(
    st.sampled_from(["read"] * 5 + ["write"] * 5 + ["caw", "ws", "ws_unmap", "unmap", "tur"]),
    lbas,
    counts,
    st.sampled_from([6, 10, 12, 16]),
    st.booleans(),
    st.sampled_from([0] * 8 + [-1, 1]),
)
batches = st.tuples(
    st.lists(commands, min_size=1, max_size=10),
    st.lists(st.integers(0, 9), max_size=2),  # which commands a TMR aborts (if in range)
    st.sampled_from([None] * 6 + [BLOCKS - 8, BLOCKS, BLOCKS + 8]),  # resize after the batch
)
programs = st.tuples(st.lists(batches, min_size=1, max_size=8), st.integers(0, 2**32 - 1))


def _cdb(cmd: tuple[Any, ...], rng: random.Random) -> tuple[bytes, bytes, int]:
    """(cdb, data_out, data_in_len) of one generated command."""
    kind, lba, n, variant, fua, slip = cmd
    if kind in ("read", "write"):
        if variant == 6:
            lba, n = lba & 0x1FFFFF, n or 256
            make = (_READS if kind == "read" else _WRITES)[6]
            cdb = make(lba, n & 0xFF)
        else:
            cdb = (_READS if kind == "read" else _WRITES)[variant](lba, n, fua=fua)
        length = max(0, n + slip) * BS
        if kind == "read":
            return cdb, b"", length
        return cdb, rng.randbytes(length), 0
    if kind == "caw":
        n = max(1, min(n, 2))
        compare = bytes(n * BS) if rng.random() < 0.5 else rng.randbytes(n * BS)
        return cdbs.compare_and_write(lba, n, fua=fua), compare + rng.randbytes(n * BS), 0
    if kind in ("ws", "ws_unmap"):
        unmap = kind == "ws_unmap"
        block = bytes(BS) if unmap else rng.randbytes(BS)
        make = cdbs.write_same16 if variant == 16 else cdbs.write_same10
        return make(lba, max(1, n), unmap=unmap), block, 0
    if kind == "unmap":
        params = cdbs.unmap_parameters([(lba, n), (max(0, lba - 3), 1)])
        return cdbs.unmap(len(params)), params, 0
    return cdbs.test_unit_ready(), b"", 0


def _run_program(tmp: Path, name: str, plane: bool, program: Any,
                 kind: str = "raw", native: bool = False, big: int | None = None,
                 mapped: Path | None = None) -> dict[str, Any]:
    """Run `program` with the plane on or off on a `kind` ("raw" or "thin") disk, with `native`
    on its own C thread (stage 2); everything an initiator or `status` sees (for thin also the
    allocation map and the pool's use). A native loop is held while a batch is submitted, so
    it takes the batch at once, as one wake-up of the other modes does. `big`: the native
    loop's worker threshold (`tcmu_py.ring.NATIVE_BIG_BYTES`; 1: every C command on a worker).
    `mapped`: a tmpfs directory for a raw image written whole first, which the native loop maps
    (until a resize that grows it leaves a hole)."""
    batches_, seed = program
    rng = random.Random(seed)
    if mapped is not None:
        tmp = mapped
        (tmp / f"{name}.img").write_bytes(bytes(BLOCKS * BS))
    device = make_device(tmp, name) if kind == "raw" else make_thin(tmp, name)
    path = str(tmp / f"{name}.img") if kind == "raw" else thin_image(device)
    # A 4 KiB command ring: it wraps (PAD entries) every few wake-ups.
    saved = ring_module.NATIVE_BIG_BYTES
    if big is not None:
        ring_module.NATIVE_BIG_BYTES = big
    try:
        h = RingHarness(device, workers=1, data_plane=plane, native=native, cmdr_size=4096,
                        data_size=256 * 1024)
    finally:
        ring_module.NATIVE_BIG_BYTES = saved
    assert (h.runner.native is not None) == (plane and native)
    answers: list[tuple[int | None, bytes, bytes, bool]] = []
    try:
        h.run(cdbs.test_unit_ready())  # the power-on unit attention: later batches may reach C
        for cmds, aborts, resize in batches_:
            with h.hold():
                pend = [h.kernel.submit(*_cdb(c, rng)) for c in cmds]
                named = [pend[i] for i in sorted(set(aborts)) if i < len(pend)]
                if named:
                    h.kernel.submit_tmr(TmrType.ABORT_TASK, named)
            h.wait(pend)
            # The invariant: after the wake-ups, nothing C took is still in flight.
            assert h.runner.ring.in_flight == 0
            answers.extend((p.status, p.sense, p.data_in, p.aborted) for p in pend)
            if resize is not None:
                device.resize(resize * BS)
        c = h.runner.refresh_counters()
        counters = {k: getattr(c, k) for k in (
            "commands", "reads", "writes", "bytes_read", "bytes_written", "errors", "aborted",
            "failures")}
        mapped_copies = c.mapped
        assert sum(c.latency_hist) == c.commands
        assert c.latency_seconds >= 0
        executed = (h.runner.plane.executed if h.runner.plane is not None
                    else h.runner.native.executed if h.runner.native is not None else 0)
        alloc: Any = None
        if kind == "thin":
            backend = device.backend
            assert isinstance(backend, ThinBackend)
            alloc = (bytes(backend._units), backend.pool.used,
                     backend.lba_status(0, backend.size))
    finally:
        h.close()
    image = Path(path).read_bytes()
    return {"answers": answers, "counters": counters, "image": image, "executed": executed,
            "alloc": alloc, "mapped": mapped_copies}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=programs)
@pytest.mark.parametrize("kind", ["raw", "thin"])
def test_plane_on_and_off_agree(tmp: Path, shm: Path, kind: str, program: Any) -> None:
    """Raw, and thin: there C takes only commands on allocated units, so reads of holes and
    allocating writes stay Python's, and UNMAP / WRITE SAME UNMAP must clear the map before a
    later C command could write into a deallocated unit (the allocation map, the pool's use and
    GET LBA STATUS's view agree too). The plane runs in the loop thread's dequeue (stage 1) and
    on its own C thread (stage 2), and there also copying through a mapped tmpfs image (raw):
    all agree with the plane off."""
    tag = os.urandom(4).hex()
    off = _run_program(tmp, f"off-{tag}", False, program, kind)
    # Stage 1; the native loop; the native loop with every C command on its worker threads;
    # for raw, the last two again with the image on tmpfs, written whole, so mapped. They are
    # held to a plane-off run of that image: a device on tmpfs runs READ/WRITE on its loop
    # thread, in ring order, not on the pool, so with several commands in one wake-up another
    # one may meet a pending unit attention first (implementation-defined, SAM-5 5.14).
    runs: list[tuple[bool, int | None, Path | None, dict[str, Any]]] = [
        (False, None, None, off), (True, None, None, off), (True, 1, None, off)]
    if kind == "raw":
        off_shm = _run_program(tmp, f"off-shm-{tag}", False, program, kind, mapped=shm)
        runs += [(True, None, shm, off_shm), (True, 1, shm, off_shm)]
    for native, big, mapped, ref in runs:
        on = _run_program(tmp, f"on-{tag}-{native}-{big}-{mapped is not None}", True, program,
                          kind, native=native, big=big, mapped=mapped)
        assert on["answers"] == ref["answers"]
        assert on["counters"] == ref["counters"]
        assert on["image"] == ref["image"]
        assert on["alloc"] == ref["alloc"]
    assert off["executed"] == 0


def test_the_property_test_reaches_c(tmp: Path) -> None:
    """The program mix does reach C (else the comparison above proves nothing)."""
    rng = random.Random(5)
    program = ([([("write", rng.randrange(BLOCKS - 8), 4, v, f, 0) for v in (10, 16)
                  for f in (False, True)] + [("read", 3, 2, 12, False, 0)], [], None)], 1)
    on = _run_program(tmp, "reach", True, program)
    assert on["executed"] == 5
    assert _run_program(tmp, "reach-native", True, program, native=True)["executed"] == 5
    assert _run_program(tmp, "reach-workers", True, program, native=True, big=1)["executed"] == 5


def test_the_property_test_reaches_the_mapping(tmp: Path, shm: Path) -> None:
    """The mapped modes do copy through the mapping (inline and on the workers); a resize that
    grows the image leaves a hole, so the loop stops mapping it and C goes on with pwritev."""
    program = ([([("write", 3, 4, 10, False, 0), ("read", 3, 4, 16, False, 0),
                  ("write", 20, 2, 12, True, 0)], [], BLOCKS + 8),
                ([("write", 3, 4, 10, False, 0)], [], None),  # the resize's attention
                ([("write", 3, 4, 10, False, 0)], [], None)], 1)
    for big in (None, 1):
        on = _run_program(tmp, f"reach-map-{big}", True, program, native=True, big=big,
                          mapped=shm)
        assert (on["executed"], on["mapped"]) == (4, 3)


def test_the_thin_property_test_reaches_c(tmp: Path) -> None:
    """On thin, the writes that allocate are Python's, the same writes and reads again (now on
    allocated units) are C's, and a read of a never-written unit is Python's."""
    program = ([([("write", 8, 8, 10, False, 0), ("write", 20, 2, 16, True, 0)], [], None),
                ([("write", 8, 8, 10, False, 0), ("write", 20, 2, 16, True, 0),
                  ("read", 10, 4, 12, False, 0), ("read", 40, 1, 10, False, 0)], [], None)], 1)
    on = _run_program(tmp, "reach", True, program, "thin")
    assert on["executed"] == 3
    assert _run_program(tmp, "reach-native", True, program, "thin", native=True)["executed"] == 3


# --- the rules, one at a time -------------------------------------------------------------


def test_no_c_command_in_flight_after_one_call(tmp: Path) -> None:
    h = RingHarness(make_device(tmp, "d"), workers=2, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())  # the power-on unit attention
    data = os.urandom(8 * BS)
    pend = h.submit_many([(cdbs.write10(8 * i, 8, fua=bool(i % 2)), data, 0) for i in range(6)]
                  + [(cdbs.read16(8 * i, 8), b"", 8 * BS) for i in range(6)])
    h.runner.process()  # one wake-up, nothing waited for
    assert all(p.done and p.status == 0 for p in pend)
    assert h.runner.ring.in_flight == 0 and h.kernel.in_flight == 0
    assert [p.data_in for p in pend[6:]] == [data] * 6
    assert h.runner.plane is not None and h.runner.plane.executed == 12
    c = h.runner.counters
    assert (c.reads, c.writes, c.bytes_read, c.bytes_written) == (6, 6, 6 * 8 * BS, 6 * 8 * BS)
    h.close()


def test_worker_command_fences_overlapping_c_commands(tmp: Path) -> None:
    """A WRITE SAME held on a worker: overlapping READ/WRITE wait for it (they come after it, in
    ring order, with its data), the others are served in C at once."""
    device = make_device(tmp, "g", GatedRaw)
    backend = device.backend
    assert isinstance(backend, GatedRaw)
    h = RingHarness(device, workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    fill = b"\xab" * BS
    # Two Python commands, so they go to the worker (a lone one would run on the loop thread).
    ws = h.submit_many([(cdbs.write_same10(0, 8), fill, 0), (cdbs.verify10(60, 1), b"", 0)])
    h.runner.process()
    assert backend.entered.wait(10)
    assert h.runner.plane is not None
    assert h.runner.plane.fences == {ws[0].cmd_id: (0, 8), ws[1].cmd_id: (60, 61)}
    new = os.urandom(2 * BS)
    far = os.urandom(2 * BS)
    pend = h.submit_many([
        (cdbs.read10(0, 8), b"", 8 * BS),  # overlaps: waits
        (cdbs.write16(6, 2), new, 0),  # overlaps: waits, and lands after the fill
        (cdbs.write10(40, 2), far, 0),  # clear: C, now
        (cdbs.read10(40, 2), b"", 2 * BS),  # clear: C, now, sees the write before it
    ])
    h.runner.process()
    assert [p.done for p in pend] == [False, False, True, True]
    assert pend[3].data_in == far
    assert not ws[0].done
    backend.gate.set()
    h.wait(ws + pend)
    assert [p.status for p in ws + pend] == [0] * 6
    assert pend[0].data_in == fill * 8
    assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == fill * 6 + new
    assert h.runner.plane.fences == {}
    h.close()


def test_deferred_command_fences_later_ones_of_the_same_call(tmp: Path) -> None:
    """COMPARE AND WRITE goes to Python; a WRITE after it in the same wake-up on the same block
    must not run before it (it would make the compare fail)."""
    h = RingHarness(make_device(tmp, "caw"), workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    new, later = os.urandom(BS), os.urandom(BS)
    pend = h.submit_many([(cdbs.compare_and_write(5, 1), bytes(BS) + new, 0),
                      (cdbs.write10(5, 1), later, 0)])
    h.wait(pend)
    assert [p.status for p in pend] == [0, 0]
    assert h.run(cdbs.read10(5, 1), data_in_len=BS).data == later
    h.close()


def test_unit_attention_goes_to_python_and_resize_is_declared(tmp: Path) -> None:
    device = make_device(tmp, "ua")
    h = RingHarness(device, workers=1, data_plane=True, native=False)
    first = h.run(cdbs.read10(0, 1), data_in_len=BS)  # power-on reset, from Python
    assert first.sense_codes == (6, 0x29, 0)
    device.resize((BLOCKS + 16) * BS)
    ua = h.run(cdbs.read10(BLOCKS + 8, 1), data_in_len=BS)
    assert ua.sense_codes == (6, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
    assert h.runner.plane is not None
    before = h.runner.plane.executed
    assert h.run(cdbs.read10(BLOCKS + 8, 1), data_in_len=BS).good  # the new capacity, in C
    assert h.runner.plane.executed == before + 1
    h.close()


def test_io_error_goes_back_to_python(tmp: Path) -> None:
    """A short read (the image shrank under the device) is Python's: it zero-fills."""
    device = make_device(tmp, "short")
    h = RingHarness(device, workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    assert h.run(cdbs.write10(BLOCKS - 2, 2), os.urandom(2 * BS)).good
    os.truncate(tmp / "short.img", (BLOCKS - 1) * BS)
    assert h.runner.plane is not None
    before = h.runner.plane.executed
    r = h.run(cdbs.read10(BLOCKS - 2, 2), data_in_len=2 * BS)
    assert r.good and r.data[BS:] == bytes(BS)
    assert h.runner.plane.executed == before
    h.close()


@pytest.mark.parametrize("switch", ["runner", "config"])
def test_the_switch_turns_the_plane_off(tmp: Path, switch: str) -> None:
    if switch == "config":
        img = str(tmp / "cfg.img")
        config = DeviceConfig("cfg", "raw", img, BLOCKS * BS, BS, data_plane=False)
        device = open_block_device(config, UnmapRaw(img, config.size, BS))
        # on for the runner, off for the device
        h = RingHarness(device, data_plane=True, native=False)
    else:
        h = RingHarness(make_device(tmp, "sw"), data_plane=False)
    h.run(cdbs.test_unit_ready())
    assert h.run(cdbs.write10(0, 1), os.urandom(BS)).good
    assert h.runner.plane is None or h.runner.plane.executed == 0
    h.close()


def test_daemon_and_runner_defaults_agree() -> None:
    from tcmu_py import daemon
    from tcmu_py.device import runner

    assert daemon.DEFAULT_DATA_PLANE == runner.DEFAULT_DATA_PLANE
    assert daemon.DEFAULT_NATIVE_LOOP == runner.DEFAULT_NATIVE_LOOP


def test_yaml_data_plane_false_travels_in_the_dev_config(tmp: Path) -> None:
    """``data_plane: false`` (per device) becomes the daemon's ``data_plane=off`` item, which the
    handler never sees and which turns the plane off for that device alone."""
    from tcmu_py.daemon.config import dev_config_string, load_config_text
    from tcmu_py.errors import ConfigError
    from tcmu_py.handler import daemon_data_plane, split_daemon_items

    wwn = "naa.5001405000000abc"
    text = (f"state_dir: {tmp}\ndevices:\n"
            f"  - {{name: a, handler: raw, size: 1M, data_plane: false, copy_domain: v,"
            f" wwn: {wwn}}}\n"
            f"  - {{name: b, handler: raw, size: 1M}}\n")
    a, b = load_config_text(text).devices
    assert (a.data_plane, b.data_plane) == (False, True)
    cfg_a, cfg_b = dev_config_string(a), dev_config_string(b)
    assert cfg_a == f"raw/{tmp}/a.img;data_plane=off;copy_domain=v;wwn={wwn}"
    assert cfg_b == f"raw/{tmp}/b.img"
    assert split_daemon_items(cfg_a.partition("/")[2]) == (f"{tmp}/a.img", wwn, "v")
    assert daemon_data_plane(cfg_a.partition("/")[2]) is False
    assert daemon_data_plane(cfg_b.partition("/")[2]) is True
    with pytest.raises(ConfigError, match="data_plane"):
        load_config_text(text.replace("data_plane: false", "data_plane: maybe"))


def test_raw_image_path_may_not_end_in_the_switch(tmp: Path) -> None:
    from tcmu_py.daemon.config import load_config_text
    from tcmu_py.errors import ConfigError

    with pytest.raises(ConfigError, match="data_plane=off"):
        load_config_text(f"state_dir: {tmp}\ndevices:\n  - {{name: a, handler: raw, size: 1M,"
                         f" options: {{path: '{tmp}/x;data_plane=off'}}}}\n")


def test_a_raw_subclass_that_overrides_write_keeps_its_write(tmp: Path) -> None:
    """Overriding `read`/`write` withdraws the extent: the override is called for every command."""
    calls: list[int] = []

    class Counting(UnmapRaw):
        def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
            calls.append(offset)
            super().write(offset, bufs)

    h = RingHarness(make_device(tmp, "sub", Counting), data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    assert h.run(cdbs.write10(3, 1), os.urandom(BS)).good
    assert calls == [3 * BS]
    assert h.runner.plane is not None and not h.runner.plane.declared
    h.close()


# --- thin: the unit map ---------------------------------------------------------------------


class GatedThin(ThinBackend):
    """A deallocation (UNMAP, WRITE SAME UNMAP) waits for `gate` (a slow command on a worker)."""

    gate: threading.Event
    entered: threading.Event

    def unmap(self, offset: int, length: int) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        super().unmap(offset, length)


def _gated_thin(tmp: Path, name: str) -> tuple[BlockDevice, GatedThin]:
    device = make_thin(tmp, name, GatedThin)
    backend = device.backend
    assert isinstance(backend, GatedThin)
    backend.gate, backend.entered = threading.Event(), threading.Event()
    return device, backend


def test_thin_only_allocated_units_go_through_c(tmp: Path) -> None:
    h = RingHarness(make_thin(tmp, "alloc"), workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    plane = h.runner.plane
    assert plane is not None and plane.declared
    data = os.urandom(8 * BS)
    assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == bytes(8 * BS)  # a hole: Python
    assert h.run(cdbs.write10(0, 8), data).good  # allocates unit 0: Python
    assert plane.executed == 0
    assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == data  # allocated: C
    assert h.run(cdbs.write10(2, 2), data[:2 * BS]).good  # allocated: C
    assert plane.executed == 2
    # Blocks 6..9 straddle unit 0 (allocated) and unit 1 (not): Python, which allocates unit 1.
    assert h.run(cdbs.write10(6, 4), data[:4 * BS]).good
    assert plane.executed == 2
    assert h.run(cdbs.read10(6, 4), data_in_len=4 * BS).good
    assert plane.executed == 3
    h.close()


def test_thin_fence_covers_whole_units(tmp: Path) -> None:
    """A WRITE SAME UNMAP of blocks 0..1 held on a worker deallocates unit 0 (blocks 0..7) once
    the rest of it reads as zeros: a C write to block 5, in the same unit but outside its LBAs,
    must not run beside it (the punch could drop it): it goes to Python, which takes unit 0 in
    turn with the deallocation; unit 3 is served in C at once."""
    device, backend = _gated_thin(tmp, "fence")
    h = RingHarness(device, workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    assert h.run(cdbs.write10(0, 32), os.urandom(32 * BS)).good  # allocates units 0..3
    ws = h.submit_many([(cdbs.write_same10(0, 2, unmap=True), bytes(BS), 0),
                    (cdbs.verify10(60, 1), b"", 0)])
    h.runner.process()
    assert backend.entered.wait(10)
    plane = h.runner.plane
    assert plane is not None
    before = plane.executed
    mine, far = os.urandom(BS), os.urandom(BS)
    pend = h.submit_many([(cdbs.write10(5, 1), mine, 0), (cdbs.write10(25, 1), far, 0)])
    h.runner.process()
    # Block 25 in C; block 5 in Python (which takes unit 0 in turn with the deallocation).
    assert plane.executed == before + 1
    backend.gate.set()
    h.wait(ws + pend)
    assert [p.status for p in ws + pend] == [0] * 4
    assert h.run(cdbs.read10(5, 1), data_in_len=BS).data == mine
    assert h.run(cdbs.read10(0, 2), data_in_len=2 * BS).data == bytes(2 * BS)
    h.close()


def test_thin_unmap_clears_the_map_before_later_c_commands(tmp: Path) -> None:
    device = make_thin(tmp, "unmap")
    backend = device.backend
    assert isinstance(backend, ThinBackend)
    h = RingHarness(device, workers=1, data_plane=True, native=False)
    h.run(cdbs.test_unit_ready())
    assert h.run(cdbs.write10(8, 8), os.urandom(8 * BS)).good  # unit 1
    plane = h.runner.plane
    assert plane is not None
    params = cdbs.unmap_parameters([(8, 8)])
    assert h.run(cdbs.unmap(len(params)), params).good
    assert backend._units[1] == 0
    before = plane.executed
    assert h.run(cdbs.read10(8, 8), data_in_len=8 * BS).data == bytes(8 * BS)  # Python
    new = os.urandom(BS)
    assert h.run(cdbs.write10(9, 1), new).good  # Python: it allocates again
    assert plane.executed == before
    assert backend.pool.disk_used("d") == UNIT
    h.close()


def test_thin_deallocation_clears_units_before_it_punches(tmp: Path) -> None:
    """The map's contract for deallocations no fence covers: the units read unallocated from the
    moment the deallocation takes them (before the punch), and `resize` leaves the old map all
    unallocated (the plane gets the new one with the next declaration)."""
    device = make_thin(tmp, "contract")
    backend = device.backend
    assert isinstance(backend, ThinBackend)
    backend.write(0, [memoryview(os.urandom(4 * UNIT))])
    assert bytes(backend._units[:4]) == b"\x01" * 4
    seen: list[bytes] = []
    real = backend._deallocate

    def spy(offset: int, end: int) -> None:
        seen.append(bytes(backend._units[:4]))
        real(offset, end)

    backend._deallocate = spy  # type: ignore[method-assign]
    backend.unmap(UNIT, UNIT)
    assert seen == [b"\x01\x00\x01\x01"]
    assert bytes(backend._units[:4]) == b"\x01\x00\x01\x01"
    extent = device.data_extent()
    assert extent is not None and extent.units is backend._units and extent.unit_blocks == 8
    old = backend._units
    device.resize(BLOCKS * BS // 2)
    assert not any(old)
    new = device.data_extent()
    assert new is not None and new.units is backend._units and new.units is not old
    assert bytes(new.units) == b"\x01\x00\x01\x01"
    device.close()


@pytest.mark.parametrize("native", [False, True], ids=["plane", "native"])
def test_a_naca_read_or_write_is_refused_not_executed_in_c(tmp: Path, native: bool) -> None:
    """NACA set in a READ's or WRITE's CONTROL byte: C leaves the command to Python, which
    refuses it (NORMACA is 0: INVALID FIELD IN CDB, SAM-5 5.2), and a WRITE writes nothing.
    Before, C executed both (the plain-command checks ignored the CONTROL byte)."""
    h = RingHarness(make_device(tmp, "n"), workers=1, data_plane=True, native=native)
    try:
        h.run(cdbs.test_unit_ready())  # the power-on unit attention
        data = os.urandom(8 * BS)
        assert h.run(cdbs.write10(0, 8), data_out=data).good
        for cdb, out, n in ((cdbs.read10(0, 8), b"", 8 * BS),
                            (cdbs.write16(0, 8), b"\xee" * 8 * BS, 0)):
            naca = bytearray(cdb)
            naca[-1] |= 0x04
            r = h.run(bytes(naca), data_out=out, data_in_len=n)
            assert r.sense_codes == (0x5, 0x24, 0x00), r
        assert h.run(cdbs.read10(0, 8), data_in_len=8 * BS).data == data
    finally:
        h.close()
