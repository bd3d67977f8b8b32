"""MirrorHandler: config strings, YAML options, SCSI through the ring harness (FakeKernel), real
nbdkit servers on unix sockets as legs, status rows and the ``tcmu-py mirror`` tools."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbdkit_server import START_DEADLINE

from tcmu_py.daemon.config import dev_config_string, load_config_text
from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.mirror import Mirror, MirrorHandler
from tcmu_py.handlers.mirror.config import main as mirror_main
from tcmu_py.handlers.mirror.config import parse, status, status_tables
from tcmu_py.handlers.mirror.mirror import meta_length, wait_until
from tcmu_py.testing import cdbs
from tcmu_py.testing.harness import RingHarness

BS = 512
REGION = 64 << 10
SIZE = 32 * REGION
DEADLINE = 30.0


@pytest.mark.parametrize(("cfg", "match"), [
    ("", "0 legs"),
    ("legs=/a.img", "1 legs"),
    ("legs=/a|/b|/c|/d", "4 legs"),
    ("legs=/a|/a", "named twice"),
    ("legs=relative|/b", "absolute path .* or an NBD URI"),
    ("legs=http://x/y|/b", "NBD URI"),
    ("legs=/a|/b;quorum=3", "quorum=3: expected at most the number of legs"),
    ("legs=/a|/b;quorum=many", "expected all or 1..3"),
    ("legs=/a|/b;region=1000", "multiple of 4096"),
    ("legs=/a|/b;read=random", "least-busy or round-robin"),
    ("legs=/a|/b;frob=1", "unknown key 'frob'"),
    ("legs=/a|/b;degraded_open=yes", "expected 0 or 1"),
    ("legs=/a|/b;leg_timeout=-1", "leg_timeout='-1': expected seconds"),
])
def test_check_config_errors(cfg: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MirrorHandler.check_config(cfg)


def test_config_string_parses() -> None:
    p = parse("legs=/a.img|nbd+unix:///e?socket=/run/s;quorum=2;region=1M;read=least-busy;"
              "resync_rate=0;retry=2;degraded_open=1;leg_timeout=2.5")
    assert p.legs == ("/a.img", "nbd+unix:///e?socket=/run/s")
    assert (p.quorum, p.region, p.read, p.resync_rate, p.retry, p.degraded_open) == \
        (2, 1 << 20, "least-busy", 0, 2.0, True)
    assert p.leg_timeout == 2.5 and p.mirror_config(1 << 20, True).leg_timeout == 2.5
    assert parse("legs=/a|/b").leg_timeout == 10.0
    assert parse("legs=/a|/b").max_lag == 64 << 20
    assert parse("legs=/a|/b;max_lag=1M").mirror_config(1 << 20, True).max_lag == 1 << 20


def test_yaml_options_become_the_config_string() -> None:
    cfg = load_config_text(textwrap.dedent("""\
        devices:
          - name: m0
            handler: mirror
            size: 1G
            options:
              legs: [/srv/m0.img, "nbd://10.0.0.2/m0"]
              quorum: all
              region: 4M
              resync_rate: 16M
              leg_timeout: 20
              max_lag: 8M
    """), "cfg.yaml")
    dev = cfg.device("m0")
    text = dev_config_string(dev)
    assert text.startswith("mirror/legs=/srv/m0.img|nbd%3A//10.0.0.2/m0;quorum=all;"
                           "region=4194304;resync_rate=16777216;max_lag=8388608;leg_timeout=20")
    MirrorHandler.check_config(text.split("/", 1)[1])
    assert parse(text.split("/", 1)[1]).legs == ("/srv/m0.img", "nbd://10.0.0.2/m0")


def test_yaml_problems_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent("""\
            devices:
              - name: m0
                handler: mirror
                size: 1G
                options: {legs: [/srv/a.img, "ftp://x"], quorum: 5, read: random}
        """), "cfg.yaml")
    text = str(info.value)
    assert "devices[0].options.legs[1]: got 'ftp://x'" in text
    assert "devices[0].options.quorum: got 5" in text
    assert "devices[0].options.read: got 'random'" in text


def device_config(cfg: str, name: str = "m0", size: int = SIZE) -> DeviceConfig:
    return DeviceConfig(name=name, subtype="mirror", cfgstring=cfg, size=size, block_size=BS,
                        write_cache=True)


def test_file_legs_through_scsi_and_status_rows(tmp_path: Path) -> None:
    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=0"))
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())  # power-on unit attention
        r = h.run(cdbs.read_capacity16(), data_in_len=32)
        assert int.from_bytes(r.data[:8], "big") == SIZE // BS - 1
        data = bytes(range(256)) * 32
        assert h.run(cdbs.write10(8, 16, fua=True), data_out=data).good
        assert h.run(cdbs.synchronize_cache10()).good
        assert h.run(cdbs.read10(8, 16), data_in_len=len(data)).data == data
        st = status([dev])
        (m,) = st["mirrors"]
        assert m["device"] == "m0" and m["state"] == "optimal" and m["regions"] == 32
        tables = status_tables(st)
        assert [t.title for t in tables] == ["mirrors", "mirror legs"]
        assert "optimal" in tables[0].render() and legs[1] in tables[1].render()
    finally:
        h.close()
        dev.close()
    for leg in legs:  # the image holds the data area and the metadata
        assert Path(leg).stat().st_size == SIZE + meta_length(SIZE, REGION)
        assert Path(leg).read_bytes()[8 * BS:24 * BS] == data


def test_conformance_over_file_legs(tmp_path: Path) -> None:
    conformance = pytest.importorskip("tcmu_py.testing.conformance")
    devices: list[Any] = []

    def make() -> object:
        n = len(devices)
        dev = MirrorHandler.open(device_config(
            f"legs={tmp_path}/c{n}a.img|{tmp_path}/c{n}b.img;region=4096;assume_clean=1;"
            "retry=0", name=f"c{n}", size=64 * 4096))
        devices.append(dev)
        return dev

    try:
        conformance.check_block_handler(make)
    finally:
        for dev in devices:
            dev.close()


# -- real NBD servers -------------------------------------------------------------------------


class FileServer:
    """``nbdkit file <image>`` on a unix socket: killed and restarted, the leg keeps its data
    (a machine that rebooted), unlike ``nbdkit memory``."""

    def __init__(self, directory: Path, name: str, size: int) -> None:
        self.sock = str(directory / f"{name}.sock")
        self.image = directory / f"{name}.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        nbdkit = shutil.which("nbdkit")
        assert nbdkit, "nbdkit missing: scripts/bootstrap.sh installs it (APT_PACKAGES)"
        Path(self.sock).unlink(missing_ok=True)
        self.proc = subprocess.Popen([nbdkit, "--foreground", "--exit-with-parent", "-U",
                                      self.sock, "file", str(self.image)],
                                     stdin=subprocess.DEVNULL)
        assert wait_until(lambda: Path(self.sock).exists() or self.proc.poll() is not None,
                          START_DEADLINE) and self.proc.poll() is None, "nbdkit did not start"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_DEADLINE)
        self.proc = None


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[FileServer]]:
    out = [FileServer(tmp_path, f"s{i}", SIZE + meta_length(SIZE, REGION)) for i in range(2)]
    for s in out:
        s.start()
    yield out
    for s in out:
        s.stop()


def test_three_legs_local_and_nbd_kill_one_server_and_resync_only_dirty_regions(
        tmp_path: Path, servers: list[FileServer]) -> None:
    local = tmp_path / "local.img"
    cfg = (f"legs={local}|{servers[0].uri}|{servers[1].uri};region={REGION};"
           "assume_clean=1;retry=0;resync_rate=0;quorum=2")
    dev = MirrorHandler.open(device_config(cfg))
    mirror = dev.backend  # type: ignore[attr-defined]
    assert isinstance(mirror, Mirror)
    h = RingHarness(dev)
    bpr = REGION // BS
    try:
        h.run(cdbs.test_unit_ready())
        for r in range(32):
            assert h.run(cdbs.write10(r * bpr, 8), data_out=bytes([r]) * 8 * BS).good
        assert h.run(cdbs.synchronize_cache10()).good
        assert wait_until(lambda: mirror.status()["dirty_regions"] == 0, DEADLINE)
        servers[1].stop()
        dirty = [2, 5, 6, 17, 30]
        for r in dirty:  # no I/O error: two legs of three hold every write
            assert h.run(cdbs.write10(r * bpr + 8, 8), data_out=b"D" * 8 * BS).good
        assert h.run(cdbs.read10(5 * bpr + 8, 8), data_in_len=8 * BS).data == b"D" * 8 * BS
        st = mirror.status()
        assert st["state"] == "degraded" and st["legs"][2]["state"] == "failed"
        assert st["dirty_regions"] == len(dirty)
        servers[1].start()
        assert mirror.reattach(2)
        assert mirror.wait_resync(DEADLINE)
        assert mirror.regions_copied == len(dirty)
        assert h.run(cdbs.synchronize_cache10()).good
        assert wait_until(lambda: mirror.status()["dirty_regions"] == 0, DEADLINE)
    finally:
        h.close()
        dev.close()
    images = [local.read_bytes()[:SIZE]] + [s.image.read_bytes()[:SIZE] for s in servers]
    assert images[0] == images[1] == images[2]
    # and the tool agrees
    assert mirror_main(["verify", str(local), servers[0].uri, servers[1].uri]) == 0


def test_losing_the_quorum_refuses_writes_with_data_protect_reads_go_on(
        tmp_path: Path, servers: list[FileServer]) -> None:
    cfg = (f"legs={tmp_path}/l.img|{servers[0].uri}|{servers[1].uri};quorum=2;"
           f"region={REGION};assume_clean=1;retry=0")
    dev = MirrorHandler.open(device_config(cfg))
    h = RingHarness(dev)
    try:
        h.run(cdbs.test_unit_ready())
        assert h.run(cdbs.write10(0, 8), data_out=b"Q" * 8 * BS).good
        servers[0].stop()
        servers[1].stop()
        started = time.monotonic()
        r = h.run(cdbs.write10(0, 8), data_out=b"R" * 8 * BS)
        # SPC-5 Annex D: DATA PROTECT, LOGICAL UNIT SOFTWARE WRITE PROTECTED
        assert r.sense_codes == (0x07, 0x27, 0x02)
        assert time.monotonic() - started < 10  # refused, not hung
        assert h.run(cdbs.write10(64, 8), data_out=b"S" * 8 * BS).sense_codes == \
            (0x07, 0x27, 0x02)
        r = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
        assert r.good and r.data in (b"Q" * 8 * BS, b"R" * 8 * BS)
    finally:
        h.close()
        dev.close()


def test_split_brain_over_nbd_is_refused_and_forget_resolves_it(
        tmp_path: Path, servers: list[FileServer]) -> None:
    a, b = servers
    cfg = f"legs={a.uri}|{b.uri};region={REGION};assume_clean=1;retry=0;degraded_open=1"
    MirrorHandler.open(device_config(cfg)).close()
    for alive, dead, fill in ((a, b, b"A"), (b, a, b"B")):
        dead.stop()
        if alive.proc is None:
            alive.start()
        dev = MirrorHandler.open(device_config(cfg))
        h = RingHarness(dev)
        h.run(cdbs.test_unit_ready())
        assert h.run(cdbs.write10(0, 8), data_out=fill * 8 * BS).good
        h.close()
        dev.close()
    a.start()
    before = [a.image.read_bytes(), b.image.read_bytes()]
    with pytest.raises(ConfigError, match=rf"split brain: leg 0 \({re.escape(a.uri)}\).*"
                                          rf"leg 1 \({re.escape(b.uri)}\)"):
        MirrorHandler.open(device_config(cfg))
    assert [a.image.read_bytes(), b.image.read_bytes()] == before  # neither side touched
    assert mirror_main(["forget", b.uri, "--yes"]) == 0  # keep A's side
    dev = MirrorHandler.open(device_config(cfg))
    try:
        assert dev.backend.wait_resync(DEADLINE)  # type: ignore[attr-defined]
    finally:
        dev.close()
    assert b.image.read_bytes()[:8 * BS] == b"A" * 8 * BS


def test_verify_reports_differing_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    legs = [str(tmp_path / f"v{i}.img") for i in range(2)]
    MirrorHandler.open(device_config(f"legs={legs[0]}|{legs[1]};region={REGION};"
                                     "assume_clean=1;retry=0")).close()
    with open(legs[1], "r+b") as f:
        f.seek(3 * REGION + 100)
        f.write(b"corrupt")
    assert mirror_main(["verify", *legs]) == 1
    out = capsys.readouterr().out
    assert f"region 3 (bytes {3 * REGION}..{4 * REGION - 1})" in out
    assert "32 regions of 65536 bytes compared over 2 legs: 1 differ" in out
    assert mirror_main(["show", *legs]) == 0
    assert "generation" in capsys.readouterr().out


def test_the_cli_lists_the_mirror_command() -> None:
    out = subprocess.run([sys.executable, "-m", "tcmu_py", "mirror", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "resync" in out and "verify" in out and "forget" in out


# -- the C data plane: reads from an in-sync local leg ----------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_reads_come_from_the_local_leg_in_c_and_never_from_a_leg_that_failed(
        tmp_path: Path, native: bool) -> None:
    """The mirror declares its first in-sync local leg as a read-only extent: C serves READs
    from it and every WRITE comes to the mirror. When a write fails on that leg, the mirror
    withdraws the extent before acknowledging the write: the READs after it get the new data
    (from the other leg), not the stale bytes the failed leg still holds."""
    from tcmu_py.handlers.mirror.mirror import FAILED

    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=3600"))
    h = RingHarness(dev, data_plane=True, native=native)
    reads = {"python": 0}
    real_read = dev.backend.read

    def counted(offset: int, bufs: Any) -> None:
        reads["python"] += 1
        real_read(offset, bufs)

    dev.backend.read = counted  # type: ignore[method-assign]
    try:
        h.run(cdbs.test_unit_ready())  # power-on unit attention
        old, new = b"\x11" * 4096, b"\x22" * 4096
        assert h.run(cdbs.write10(0, 8), data_out=old).good
        for _ in range(10):
            assert h.run(cdbs.read10(0, 8), data_in_len=4096).data == old
        in_c = h.runner.refresh_counters().reads - reads["python"]
        assert in_c >= 9, f"only {in_c} of 10 READs in C"

        def broken(offset: int, buf: Any, fua: bool = False) -> None:
            raise OSError(5, "injected write error")

        mirror = dev.backend
        mirror._legs[0].leg.write = broken  # type: ignore[union-attr]
        # FUA with the write cache on: the mirror's (a plain WRITE would be C's, see below)
        assert h.run(cdbs.write10(0, 8, fua=True), data_out=new).good  # leg 1 holds it
        assert mirror._legs[0].state == FAILED
        assert Path(legs[0]).read_bytes()[:4096] == old  # what C would have read
        for _ in range(10):
            assert h.run(cdbs.read10(0, 8), data_in_len=4096).data == new
        # Leg 1 is local too: once the extent was declared again, C serves from it.
        assert h.runner.refresh_counters().reads - reads["python"] >= in_c + 9
    finally:
        h.close()
        dev.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this machine")
def test_a_local_leg_on_tmpfs_is_read_through_its_mapping() -> None:
    """The native loop maps a local leg on tmpfs whose data area is allocated, although its
    metadata area after it has holes (a superblock slot not written yet), and although it was
    written through the mirror after the extent was declared: C's READs copy through the
    mapping, as a raw image's do."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tcmu-py-test-") as d:
        legs = [f"{d}/l{i}.img" for i in range(2)]
        dev = MirrorHandler.open(device_config(
            f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1"))
        h = RingHarness(dev, data_plane=True, native=True)
        try:
            h.run(cdbs.test_unit_ready())  # power-on unit attention
            data = bytes(range(256)) * (SIZE // 256)
            for lba in range(0, SIZE // BS, 256):
                piece = data[lba * BS : (lba + 256) * BS]
                assert h.run(cdbs.write16(lba, 256), data_out=piece).good
            st = Path(legs[0]).stat()
            assert st.st_blocks * 512 < st.st_size  # a hole in the metadata area
            # Declared before it was written (holes), the leg is mapped once the loop looks
            # again (every 100 ms at most, at a wake-up).
            native = h.runner.native
            assert native is not None
            deadline = time.monotonic() + DEADLINE
            while not native.mapped:
                assert time.monotonic() < deadline, "the leg was never mapped"
                got = h.run(cdbs.read10(0, 8), data_in_len=8 * BS)
                assert got.good and got.data == data[: 8 * BS]
            before = h.runner.refresh_counters().mapped
            for lba in range(0, SIZE // BS, 64):
                got = h.run(cdbs.read10(lba, 8), data_in_len=8 * BS)
                assert got.good and got.data == data[lba * BS : (lba + 8) * BS]
            assert h.runner.refresh_counters().mapped - before == SIZE // BS // 64
        finally:
            h.close()
            dev.close()


def test_no_c_reads_from_a_local_leg_that_lags(tmp_path: Path) -> None:
    """With a write quorum of 1 a write may be acknowledged before the local leg has it (the
    leg lags, rule 4b): the extent is withdrawn first, so no READ is served from the leg
    until it caught up."""
    import threading

    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=3600;quorum=1"))
    h = RingHarness(dev, data_plane=True, native=True)
    mirror = dev.backend
    gate = threading.Event()
    leg0 = mirror._legs[0].leg
    real_write = leg0.write  # type: ignore[union-attr]

    def slow(offset: int, buf: Any, fua: bool = False) -> None:
        if offset < SIZE:  # data, not metadata
            gate.wait(30)
        real_write(offset, buf, fua)

    try:
        h.run(cdbs.test_unit_ready())
        old, new = b"\x11" * 4096, b"\x22" * 4096
        assert h.run(cdbs.write10(0, 8), data_out=old).good
        assert h.run(cdbs.read10(0, 8), data_in_len=4096).data == old
        leg0.write = slow  # type: ignore[union-attr]
        assert h.run(cdbs.write10(0, 8), data_out=new).good  # acknowledged by leg 1 alone
        assert mirror._lag & 1, "leg 0 should lag"
        for _ in range(10):
            assert h.run(cdbs.read10(0, 8), data_in_len=4096).data == new
    finally:
        gate.set()
        h.close()
        dev.close()


def test_an_nbd_leg_writes_a_batch_in_flight_at_once_and_reports_each_error(
        servers: list[FileServer]) -> None:
    """`NbdLeg.write_many` against nbdkit: every write of the batch lands, each gets its own
    answer (a write past the export's end fails alone), and a dead server fails them all
    instead of hanging."""
    from tcmu_py.handlers.mirror.legs import NbdLeg

    total = SIZE + meta_length(SIZE, REGION)
    leg = NbdLeg(servers[0].uri, total)
    try:
        writes = [(i * 8192, bytes([i + 1]) * 4096, i % 2 == 0) for i in range(16)]
        beyond = (total, b"x" * 4096, False)
        results = leg.write_many([*writes, beyond])
        assert results[:16] == [None] * 16
        assert isinstance(results[16], OSError)
        for offset, data, _ in writes:
            buf = bytearray(len(data))
            leg.read(offset, memoryview(buf))
            assert bytes(buf) == data
        servers[0].stop()
        dead = leg.write_many(writes[:4])
        assert all(isinstance(r, OSError) for r in dead), dead
    finally:
        leg.close()


def test_round_robin_reads_stay_with_the_mirror(tmp_path: Path) -> None:
    """``read=round-robin`` spreads reads over every leg: no READ is served by C from the
    local leg then (the default, least-busy, reads the local leg when it is free, as C does)."""
    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=3600;read=round-robin"))
    h = RingHarness(dev, data_plane=True, native=True)
    try:
        assert dev.data_extent() is None
        h.run(cdbs.test_unit_ready())
        data = b"\x33" * 4096
        assert h.run(cdbs.write10(0, 8), data_out=data).good
        for _ in range(6):
            assert h.run(cdbs.read10(0, 8), data_in_len=4096).data == data
        assert [leg["reads"] for leg in dev.backend.status()["legs"]] == [3, 3]
    finally:
        h.close()
        dev.close()


def test_an_nbd_write_batch_ends_while_reads_share_the_connection(tmp_path: Path) -> None:
    """A synchronous read on another thread may take the batch's replies off the socket
    between the batch's look at its commands and its wait for more: the wait is bounded, so
    the batch still ends (it used to wait for traffic that never came)."""
    import threading

    from tcmu_py.handlers.mirror.legs import NbdLeg

    nbdkit = shutil.which("nbdkit")
    assert nbdkit, "nbdkit missing: scripts/bootstrap.sh installs it (APT_PACKAGES)"
    image, sock = tmp_path / "d.img", tmp_path / "d.sock"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    proc = subprocess.Popen([nbdkit, "--foreground", "--exit-with-parent", "-U", str(sock),
                             "--filter=delay", "file", str(image), "delay-write=2ms",
                             "delay-read=2ms"], stdin=subprocess.DEVNULL)
    stop = threading.Event()
    rt: threading.Thread | None = None
    try:
        assert wait_until(lambda: sock.exists() or proc.poll() is not None, START_DEADLINE)
        leg = NbdLeg(f"nbd+unix:///?socket={sock}", 4 << 20)

        def reader() -> None:
            buf = memoryview(bytearray(4096))
            while not stop.is_set():
                leg.read(0, buf)

        def writer(results: list[Any]) -> None:
            for _ in range(60):
                results.append(leg.write_many([(k * 8192, b"w" * 4096, False)
                                               for k in range(8)]))

        results: list[Any] = []
        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        t = threading.Thread(target=writer, args=(results,), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), f"a batch never ended ({len(results)} of 60 done)"
        assert all(r == [None] * 8 for r in results)
    finally:
        stop.set()
        if rt is not None:  # its last read ends before the server goes (no stray exception)
            rt.join(START_DEADLINE)
        proc.kill()
        proc.wait(START_DEADLINE)


# -- writes in C (the fan-out extent) ---------------------------------------------------------


def _c_writes(dev: Any) -> int:
    return int(dev.backend.status()["c_writes"])


def test_writes_go_to_every_leg_in_c_once_their_region_is_armed(tmp_path: Path) -> None:
    """With every leg in sync and quorum all, the mirror declares a fan-out extent: the first
    WRITE to a region is the mirror's (its bit set and written to every leg, then the region
    armed); later plain WRITEs there are written by C to both legs. A FUA WRITE (write cache
    on) stays the mirror's. After a SYNCHRONIZE CACHE with no write since, the region's bit
    is cleared and it is disarmed: the next WRITE there is the mirror's again (it sets the bit
    before any data, rule 1)."""
    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=3600"))
    h = RingHarness(dev, data_plane=True, native=True)
    mirror = dev.backend
    try:
        h.run(cdbs.test_unit_ready())  # power-on unit attention
        blocks = REGION // BS
        assert h.run(cdbs.write10(0, 8), data_out=b"\x01" * 4096).good
        assert _c_writes(dev) == 0 and mirror.bitmap[0] & 1
        fan = mirror._fan
        assert fan is not None and fan.armed(0) and not fan.armed(1)
        for i in range(1, 11):
            assert h.run(cdbs.write10(8 * i, 8), data_out=bytes([i + 1]) * 4096).good
        assert _c_writes(dev) == 10
        assert h.run(cdbs.write10(0, 8, fua=True), data_out=b"\x0f" * 4096).good
        assert _c_writes(dev) == 10
        # a write across regions 0 and 1: region 1 is not armed, so the mirror takes it
        assert h.run(cdbs.write10(blocks - 8, 16), data_out=b"\x33" * 8192).good
        assert _c_writes(dev) == 10 and fan.armed(1)
        for leg in legs:
            data = Path(leg).read_bytes()
            assert data[:4096] == b"\x0f" * 4096
            assert all(data[4096 * i:4096 * (i + 1)] == bytes([i + 1]) * 4096
                       for i in range(1, 11))
            assert data[REGION - 4096:REGION + 4096] == b"\x33" * 8192
        for i in range(1, 11):
            assert h.run(cdbs.read10(8 * i, 8), data_in_len=4096).data == bytes([i + 1]) * 4096
        assert h.run(cdbs.synchronize_cache10()).good
        assert wait_until(lambda: mirror.bitmap[0] & 3 == 0, DEADLINE), "bits not cleared"
        assert not fan.armed(0) and not fan.armed(1)
        # from the second flush on, a region C wrote since the flush before stays armed
        assert h.run(cdbs.write10(8, 8), data_out=b"\x43" * 4096).good  # the mirror's
        assert h.run(cdbs.write10(8, 8), data_out=b"\x44" * 4096).good  # C's
        assert _c_writes(dev) == 11
        assert h.run(cdbs.synchronize_cache10()).good
        assert mirror.bitmap[0] & 1 and fan.armed(0)
        assert h.run(cdbs.synchronize_cache10()).good  # no write since the one before
        assert wait_until(lambda: mirror.bitmap[0] & 1 == 0, DEADLINE), "bit not cleared"
        assert not fan.armed(0)
        assert h.run(cdbs.write10(8, 8), data_out=b"\x44" * 4096).good
        assert _c_writes(dev) == 11 and mirror.bitmap[0] & 1 and fan.armed(0)
        assert h.run(cdbs.write10(16, 8), data_out=b"\x45" * 4096).good
        assert _c_writes(dev) == 12
        big = bytes(range(256)) * 256  # a whole region, 64 KiB: a worker writes the legs
        assert h.run(cdbs.write10(2 * blocks, blocks), data_out=big[::-1]).good  # arms
        assert h.run(cdbs.write10(2 * blocks, blocks), data_out=big).good
        assert _c_writes(dev) == 13
        for leg in legs:
            assert Path(leg).read_bytes()[2 * REGION:3 * REGION] == big
    finally:
        h.close()
        dev.close()
    for leg in legs:
        assert Path(leg).read_bytes()[4096:12288] == b"\x44" * 4096 + b"\x45" * 4096


def test_a_c_write_after_a_flush_began_keeps_its_region_dirty(tmp_path: Path) -> None:
    """Rule 5 with C's writes: a region C wrote after a flush started keeps its bit when that
    flush ends (its data may not be durable on every leg); one C wrote before it is cleared."""
    legs = [str(tmp_path / f"l{i}.img") for i in range(2)]
    dev = MirrorHandler.open(device_config(
        f"legs={legs[0]}|{legs[1]};region={REGION};assume_clean=1;retry=3600"))
    h = RingHarness(dev, data_plane=True, native=True)
    mirror = dev.backend
    blocks = REGION // BS
    try:
        h.run(cdbs.test_unit_ready())
        for r in (0, 1):  # arm both regions, then one C write in each
            for _ in range(2):
                assert h.run(cdbs.write10(r * blocks, 8), data_out=b"\x05" * 4096).good
        assert _c_writes(dev) == 2
        fan = mirror._fan
        assert fan is not None
        epoch = fan.epoch()  # what flush() does when it starts
        assert h.run(cdbs.write10(blocks, 8), data_out=b"\x06" * 4096).good  # C, region 1
        assert _c_writes(dev) == 3
        mirror._clear_clean_bits(mirror._seq, fan, epoch)
        assert mirror.bitmap[0] & 3 == 2, "region 0 clean, region 1 written since"
        assert not fan.armed(0) and fan.armed(1)
    finally:
        h.close()
        dev.close()


def _local_and_nbd(tmp_path: Path, server: FileServer, leg_timeout: int
                   ) -> tuple[str, Any, RingHarness]:
    """A mirror of a local image and `server`'s export, served by a native loop."""
    local = str(tmp_path / "local.img")
    dev = MirrorHandler.open(device_config(
        f"legs={local}|{server.uri};region={REGION};assume_clean=1;retry=3600;"
        f"leg_timeout={leg_timeout}"))
    return local, dev, RingHarness(dev, data_plane=True, native=True)


def test_c_writes_reach_an_nbd_leg_and_a_dead_server_fails_the_leg_not_the_write(
        servers: list[FileServer], tmp_path: Path) -> None:
    """A local leg and an nbdkit leg: C writes both (the NBD leg through a connection of its
    own); data equal on both. The server killed, C's write fails on it, the mirror writes
    again, fails the leg and acknowledges GOOD from the local leg; later writes are the
    mirror's (no fan-out without every leg in sync)."""
    from tcmu_py.handlers.mirror.mirror import FAILED

    local, dev, h = _local_and_nbd(tmp_path, servers[0], leg_timeout=5)
    mirror = dev.backend
    try:
        h.run(cdbs.test_unit_ready())
        for i in range(12):
            assert h.run(cdbs.write10(8 * i, 8), data_out=bytes([i + 1]) * 4096).good
        assert _c_writes(dev) == 11
        big = bytes(range(256)) * 512  # 128 KiB: a worker writes the local leg
        assert h.run(cdbs.write10(2048, 256), data_out=big).good  # the mirror's: arms
        assert h.run(cdbs.write10(2048, 256), data_out=big[::-1]).good  # C's
        assert _c_writes(dev) == 12
        assert h.run(cdbs.synchronize_cache10()).good
        for image in (Path(local), servers[0].image):
            assert image.read_bytes()[2048 * BS:2048 * BS + len(big)] == big[::-1]
        want = b"".join(bytes([i + 1]) * 4096 for i in range(12))
        assert Path(local).read_bytes()[:len(want)] == want
        assert servers[0].image.read_bytes()[:len(want)] == want
        # the flush cleared region 0's bit: the mirror's write sets and arms it again
        assert h.run(cdbs.write10(16, 8), data_out=b"\x03" * 4096).good
        assert _c_writes(dev) == 12
        servers[0].stop()
        assert h.run(cdbs.write10(0, 8), data_out=b"\x77" * 4096).good
        assert mirror._legs[1].state == FAILED
        assert h.run(cdbs.write10(8, 8), data_out=b"\x78" * 4096).good
        assert _c_writes(dev) == 12 + 1  # the one that failed on the NBD leg
        assert h.run(cdbs.read10(0, 16), data_in_len=8192).data == b"\x77" * 4096 + b"\x78" * 4096
        # the server back: reattached, resynced, and the writes are C's again
        servers[0].start()
        assert mirror.reattach(1)
        assert wait_until(lambda: mirror._legs[1].state == "in-sync", DEADLINE), "no resync"
        for _ in range(2):
            assert h.run(cdbs.write10(8, 8), data_out=b"\x79" * 4096).good
        assert _c_writes(dev) == 12 + 1 + 1
        assert servers[0].image.read_bytes()[4096:8192] == b"\x79" * 4096
    finally:
        h.close()
        dev.close()


def test_a_silent_nbd_server_costs_a_c_write_the_leg_timeout_not_a_hang(
        servers: list[FileServer], tmp_path: Path) -> None:
    """The NBD server stopped (SIGSTOP: the connection stays up, nothing answers): C's write
    waits at most leg_timeout, then goes to the mirror, which fails the leg at once (its C
    writer died) and acknowledges from the local leg."""
    import signal

    from tcmu_py.handlers.mirror.mirror import FAILED

    local, dev, h = _local_and_nbd(tmp_path, servers[0], leg_timeout=1)
    mirror = dev.backend
    proc = servers[0].proc
    assert proc is not None
    try:
        h.run(cdbs.test_unit_ready())
        for _ in range(2):
            assert h.run(cdbs.write10(0, 8), data_out=b"\x01" * 4096).good
        assert _c_writes(dev) == 1
        proc.send_signal(signal.SIGSTOP)
        # kill() only queues the signal: write once nbdkit is really stopped ("T"), else it
        # may still answer this write (seen under load)
        stat = Path(f"/proc/{proc.pid}/stat")
        assert wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T",
                          DEADLINE), "nbdkit did not stop"
        t0 = time.monotonic()
        assert h.run(cdbs.write10(0, 8), data_out=b"\x02" * 4096).good
        took = time.monotonic() - t0
        assert mirror._legs[1].state == FAILED
        # failed on the C writer's timeout, not after another leg_timeout of the mirror's own
        assert "made in C got no answer within 1 s" in mirror._legs[1].error
        assert took < 20, f"the write took {took:.1f} s"
        assert Path(local).read_bytes()[:4096] == b"\x02" * 4096
    finally:
        proc.send_signal(signal.SIGCONT)
        h.close()
        dev.close()
