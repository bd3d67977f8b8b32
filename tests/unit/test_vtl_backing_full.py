"""A cartridge whose backing filesystem fills up: early warning, then VOLUME OVERFLOW, never
MEDIUM ERROR; what was acknowledged reads back and the cartridge reopens consistent.

The small filesystem is simulated: `SmallFs` accounts every byte of the files under the library
directory against a limit, answers the drive's free-space probe (`cartridge.backing_space`) from
it, and makes `os.pwritev`/`os.pwrite` fail with ENOSPC when a write would grow the files past
the limit (as a full tmpfs or ext4 does). `taken` stands for another writer on that filesystem.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vtl_drive import sense
from vtl_fakes import FakeLibrary, Tape

from tcmu_py.handlers.vtl import cartridge as cartmod
from tcmu_py.handlers.vtl.cartridge import BACKING_RESERVE, Cartridge
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.harness import RingHarness

KIB, MIB = 1 << 10, 1 << 20
EW = (0x0, 0x00, 0x02)  # NO SENSE, END-OF-PARTITION/MEDIUM DETECTED (with EOM)
OVERFLOW = (0xD, 0x00, 0x02)  # VOLUME OVERFLOW, END-OF-PARTITION/MEDIUM DETECTED (with EOM)


class SmallFs:
    """A filesystem of `size` bytes holding the files under `root` (and `taken` other bytes)."""

    def __init__(self, root: Path, size: int, monkeypatch: pytest.MonkeyPatch,
                 *, probe: bool = True) -> None:
        self.root, self.size, self.taken = root, size, 0
        self.enospc = 0  # writes refused
        real_pwritev, real_pwrite = os.pwritev, os.pwrite

        def pwritev(fd: int, bufs: Any, offset: int) -> int:
            self._check(fd, offset + sum(len(b) for b in bufs))
            return real_pwritev(fd, bufs, offset)

        def pwrite(fd: int, data: Any, offset: int) -> int:
            self._check(fd, offset + len(data))
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "pwrite", pwrite)
        if probe:
            monkeypatch.setattr(cartmod, "backing_space", lambda path: (self.free, self.size),
                                raising=False)  # raising: the check must fail on old code

    def files(self) -> Iterator[Path]:
        return (p for p in self.root.rglob("*") if p.is_file())

    def fill(self, leave: int) -> None:
        """Another writer takes everything but `leave` bytes."""
        self.taken = 0
        self.taken = max(self.size - self.used - leave, 0)

    @property
    def used(self) -> int:
        return self.taken + sum(p.stat().st_size for p in self.files())

    @property
    def free(self) -> int:
        return max(self.size - self.used, 0)

    def _check(self, fd: int, end: int) -> None:
        growth = end - os.fstat(fd).st_size
        if growth > 0 and self.used + growth > self.size:
            self.enospc += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def lib(tmp_path: Path) -> FakeLibrary:
    return FakeLibrary(tmp_path)


def loaded(lib: FakeLibrary, barcode: str) -> Tape:
    lib.create(barcode)  # an LTO-8 cartridge: 12 TB nominal, far more than the filesystem
    t = Tape(lib)
    lib.move(barcode)
    t.clear_ua()
    return t


def write_until_overflow(write: Callable[[], Any], limit: int) -> tuple[int, int, Any]:
    """Write until VOLUME OVERFLOW; (blocks acknowledged, index of the first EW, overflow)."""
    acked, first_ew = 0, -1
    for _ in range(limit):
        r = write()
        if r.status == 0:
            acked += 1
            continue
        s = parse_sense(r.sense)
        codes = (s.sense_key, s.asc, s.ascq)
        if codes == EW:
            assert s.eom and s.info == 0, s  # SSC-5 4.2.5: written, residue 0
            first_ew = acked if first_ew < 0 else first_ew
            acked += 1
            continue
        assert codes == OVERFLOW, f"{codes} after {acked} blocks (not END OF MEDIUM)"
        return acked, first_ew, s
    pytest.fail("the drive never reported the end of medium")


def test_small_filesystem_gives_early_warning_then_volume_overflow(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = SmallFs(lib.root, 24 * MIB, monkeypatch)
    t = loaded(lib, "FUL001L8")
    block = os.urandom(64 * KIB)
    acked, first_ew, over = write_until_overflow(lambda: t.write(block), 1000)
    # SSC-5 4.2.5: the warning comes before the end, with room left to close the file.
    assert 0 < first_ew < acked, (first_ew, acked)
    assert over.eom and over.info == len(block)  # variable mode: residue = the byte count
    assert fs.enospc == 0, "the drive ran into ENOSPC instead of stopping at its room"
    assert fs.used <= fs.size - BACKING_RESERVE + 64 * KIB
    # The application closes the file after the overflow: the filemark still fits (EW sense).
    r = t.weof(2)
    assert r.sense_codes == EW and sense(r).eom
    assert fs.enospc == 0
    # LOG SENSE 31h / MAM remaining capacity report the filesystem's room, not 12 TB.
    dev_cart = t.dev.cartridge
    assert dev_cart is not None and dev_cart.remaining < 8 * MIB
    t.rewind()
    for i in range(acked):
        r = t.read(len(block))
        assert r.good and r.data == block, f"block {i}"
    assert sense(t.read(len(block))).filemark
    t.dev.close()
    with Cartridge.open(lib.media_path("FUL001L8"), read_only=True) as cart:
        assert cart.object_count == acked + 2


def test_early_warning_leaves_room_on_a_filling_filesystem(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer takes space after the warning: the end moves closer, still no ENOSPC."""
    fs = SmallFs(lib.root, 32 * MIB, monkeypatch)
    t = loaded(lib, "FUL002L8")
    block = os.urandom(256 * KIB)
    while t.write(block).good:
        pass
    fs.taken += 2 * MIB  # someone else writes 2 MiB into the filesystem
    _acked, _ew, over = write_until_overflow(lambda: t.write(block), 100)
    assert over.info == len(block) and fs.enospc == 0
    assert t.weof(1).sense_codes == EW


def test_fixed_blocks_overflow_reports_blocks_not_written(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    SmallFs(lib.root, 12 * MIB, monkeypatch)
    t = loaded(lib, "FUL003L8")
    assert t.mode_select_block(0, 4096).good
    data = os.urandom(64 * 4096)
    acked, _ew, over = write_until_overflow(lambda: t.write_fixed(data, 64), 1000)
    # SSC-5 4.2.5: INFORMATION = blocks of this command not written.
    assert 0 < over.info <= 64
    written = acked * 64 + 64 - over.info
    t.rewind()
    r = t.read_fixed(written, 4096)
    assert r.good and r.data == (data * (acked + 1))[: written * 4096]


def test_enospc_despite_the_probe_is_volume_overflow_and_consistent(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe saw room, then another writer filled the filesystem: the write that hits
    ENOSPC is VOLUME OVERFLOW with nothing of it left behind, never MEDIUM ERROR; the index
    checkpoint at WRITE FILEMARKS tolerates it; the cartridge reopens with exactly what was
    acknowledged. Through the production ring (FakeKernel as the initiator)."""
    fs = SmallFs(lib.root, 64 * MIB, monkeypatch, probe=False)  # statvfs: the real, large fs
    lib.create("FUL004L8")
    from tcmu_py.handler import DeviceConfig
    from tcmu_py.handlers.vtl.drive import TapeDrive
    from tcmu_py.scsi import ssc

    dev = TapeDrive(DeviceConfig(name="t", subtype="vtl", cfgstring="", size=0), lib, 0)
    lib.move("FUL004L8")
    h = RingHarness(dev)
    blocks = [os.urandom(100 * KIB + i) for i in range(12)]
    try:
        while h.run(bytes(6)).status != 0:
            pass
        for b in blocks[:10]:
            assert h.run(ssc.ReadWrite6(False, False, len(b)).build(0x0A), b).status == 0
        fs.fill(50 * KIB)  # the filesystem fills up behind our back
        r = h.run(ssc.ReadWrite6(False, False, len(blocks[10])).build(0x0A), blocks[10])
        s = parse_sense(r.sense)
        assert r.status == 2 and (s.sense_key, s.asc, s.ascq) == OVERFLOW, s
        assert s.eom and s.info == len(blocks[10]) and fs.enospc >= 1
        # A filemark fits in the 50 KiB left; its index checkpoint at WRITE FILEMARKS may not.
        weof = ssc.WriteFilemarks6(False, False, 1).build()
        fs.fill(40)  # room for one 32-byte filemark record, no more
        r = h.run(weof)
        assert r.status == 0, parse_sense(r.sense)
        fs.fill(0)  # completely full: another filemark cannot be written
        r = h.run(weof)
        s = parse_sense(r.sense)
        assert (s.sense_key, s.asc, s.ascq) == OVERFLOW and s.info == 1, s
        fs.taken = 0
        assert h.run(bytes([0x01, 0, 0, 0, 0, 0])).status == 0
        for b in blocks[:10]:
            r = h.run(ssc.ReadWrite6(False, False, len(b)).build(0x08), data_in_len=len(b))
            assert r.status == 0 and r.data == b
        r = h.run(ssc.ReadWrite6(False, False, 512).build(0x08), data_in_len=512)
        assert parse_sense(r.sense).filemark
    finally:
        h.close()
        dev.close()
    with Cartridge.open(lib.media_path("FUL004L8"), read_only=True) as cart:
        assert cart.object_count == 11 and list(cart.filemarks) == [10]
        assert cart.used == sum(32 + len(b) for b in blocks[:10]) + 32


def test_status_warns_when_a_library_filesystem_runs_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tcmu-py status`: each filesystem under a served library's media directory (a cartridge
    mounted on its own counts apart), LOW under 10% free, FULL with no room past the reserve."""
    from tcmu_py.daemon.status import render_status
    from tcmu_py.handlers.vtl import VtlHandler
    from tcmu_py.handlers.vtl.library import Library

    lib = Library.create(tmp_path / "lib", name="lab", drives=[("SER1", "IBM-LTO8")], slots=2,
                         import_export=0)
    try:
        media = lib.media_path("ABC000L8").parent
        media.mkdir(exist_ok=True)
        (media / "ABC000L8").mkdir()
        space = {str(media): (50 * MIB, 1000 * MIB)}
        monkeypatch.setattr(cartmod, "backing_space", lambda p: space[str(p)])

        class Dev:
            library = lib

        st = {"pid": 1, "devices": [], **VtlHandler.status([Dev(), Dev()])}
        text = render_status(st, handlers={"vtl": VtlHandler})
        assert "WARNING: 1 low on space" in text, text
        assert text.splitlines()[-1].split() == ["lab", str(media), "1000.0MiB", "50.0MiB", "5.0%",
                                                 "LOW"]
        space[str(media)] = (BACKING_RESERVE, 1000 * MIB)
        text = render_status({"pid": 1, "devices": [], **VtlHandler.status([Dev()])},
                             handlers={"vtl": VtlHandler})
        assert text.splitlines()[-1].split()[-1] == "FULL"
        space[str(media)] = (500 * MIB, 1000 * MIB)
        text = render_status({"pid": 1, "devices": [], **VtlHandler.status([Dev()])},
                             handlers={"vtl": VtlHandler})
        assert "WARNING" not in text and text.splitlines()[-1].split()[-1] == "ok"
        assert render_status({"pid": 1, "devices": []}, handlers={"vtl": VtlHandler}).count(
            "tape library") == 0  # a report without libraries (another version) shows none
    finally:
        lib.close()


def test_write_attribute_on_a_full_filesystem_changes_nothing(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE ATTRIBUTE whose mam.json cannot be written for lack of room: AUXILIARY MEMORY OUT
    OF SPACE (05/55/06, SPC-5 6.48), not MEDIUM ERROR, and the attribute is not half set (the
    drive's view and the file agree)."""
    from tcmu_py.scsi import ssc

    t = loaded(lib, "FUL005L8")

    def full(path: Path, doc: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cartmod, "_atomic_write_json", full)
    attr = ssc.Attribute(0x0800, 1, b"ACME    ").build()
    plist = len(attr).to_bytes(4, "big") + attr
    r = t.run(ssc.WriteAttribute(False, 0, 0, len(plist)).build(), plist)
    assert r.sense_codes == (5, 0x55, 0x06), r
    r = t.run(ssc.ReadAttribute(0, 0, 0, 0x0800, 4096, False).build(), data_in_len=4096)
    assert r.sense_codes == (5, 0x24, 0)  # not present


def test_status_says_full_when_a_common_block_no_longer_fits(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FULL is what a writer meets, not only an exactly exhausted reserve: in the kernel run of
    09:40 (tests/kernel/scenarios/vtl_fill.py) raw 256 KiB writes past Bacula's end of tape got
    VOLUME OVERFLOW with 1.2 MiB of the 358 MiB ext4 free, and `tcmu-py status` said LOW ("drives
    reach early warning soon"). With less room past the reserve than a `FULL_BLOCK` record, a
    write of that size ends in VOLUME OVERFLOW, and the filesystem is FULL."""
    from tcmu_py.handlers.vtl.status import FULL_BLOCK, filesystem_state

    size = 358 * MIB
    fs = SmallFs(lib.root, size, monkeypatch)
    t = loaded(lib, "FUL005L8")
    fs.fill(leave=BACKING_RESERVE + FULL_BLOCK // 4)  # what the kernel run left, about
    assert filesystem_state(fs.free, size) == "FULL"
    r = t.write(os.urandom(FULL_BLOCK))
    assert r.sense_codes == OVERFLOW, r.sense_codes
    assert fs.enospc == 0
    # Room for one such record past the reserve and the filemark reserve: LOW, and it fits
    # (in the early-warning zone).
    fs.fill(leave=BACKING_RESERVE + cartmod.FILEMARK_RESERVE + cartmod.RECORD_HEADER_SIZE
            + FULL_BLOCK)
    assert filesystem_state(fs.free, size) == "LOW"
    r = t.write(os.urandom(FULL_BLOCK))
    assert r.sense_codes == EW, r.sense_codes
    assert filesystem_state(fs.free, size) == "FULL"
    assert filesystem_state(BACKING_RESERVE, size) == "FULL"
    assert filesystem_state(size // 2, size) == "ok"


def test_cartridges_sharing_a_filesystem_share_its_room(
    lib: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What docs/configuration.md says of a shared filesystem: once one cartridge stopped at
    early warning as backup software does (st's ENOSPC), the next cartridge on the same
    filesystem meets early warning at its first write (still written, NO SENSE with EOM) and the
    end of medium soon after: never MEDIUM ERROR, never ENOSPC from the filesystem."""
    fs = SmallFs(lib.root, 24 * MIB, monkeypatch)
    lib.create("SHR001L8")
    t = loaded(lib, "SHR000L8")
    block = os.urandom(64 * KIB)
    while t.write(block).good:  # up to the first early warning, as Bacula does
        pass
    assert t.weof(1).sense_codes == EW
    lib.move(None)
    lib.move("SHR001L8")
    t.clear_ua()
    r = t.write(block)
    assert r.sense_codes == EW and sense(r).eom, r.sense_codes
    acked, first_ew, over = write_until_overflow(lambda: t.write(block), 200)
    assert first_ew == 0 and over.info == len(block)
    assert fs.enospc == 0
