"""EXTENDED COPY between raw images with copy_file_range (`tcmu_py.backend.CopyRange`).

The fast path must give what the buffered copy gives: random segment lists on two raw images of
one copy domain are checked against a byte model (memmove per segment, in order), with the real
``os.copy_file_range`` wrapped to count its calls, to refuse overlapping ranges of one file
(EINVAL, as the kernel does) and, in one run, to copy at most one page per call (short counts).
Kernel refusals (EXDEV, ENOSYS) fall back to reading and writing; a destination without a write
cache is made durable after the copy.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.copydomain import CopyDomain
from tcmu_py.device.xcopy_commands import LIMITS
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.scsi import xcopy as x
from tcmu_py.testing import cdbs, run_command

BS = 512
BLOCKS = 4096  # 2 MiB images
SEED = 19


class Spy:
    """Wraps os.copy_file_range: counts calls, refuses overlap within one file as Linux does,
    optionally caps the bytes per call or fails with `fail`."""

    def __init__(self, real: Callable[..., int]) -> None:
        self.real = real
        self.calls = 0
        self.cap: int | None = None
        self.fail: int | None = None

    def __call__(self, src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        self.calls += 1
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        same = os.fstat(src).st_ino == os.fstat(dst).st_ino
        if same and offset_src < offset_dst + count and offset_dst < offset_src + count:
            raise OSError(errno.EINVAL, "overlapping ranges of one file")
        return self.real(src, dst, min(count, self.cap or count), offset_src, offset_dst)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    s = Spy(os.copy_file_range)
    monkeypatch.setattr(os, "copy_file_range", s)
    return s


def raw_disk(path: Path, name: str, *, write_cache: bool = True) -> BlockDevice:
    rng = random.Random(name)
    path.write_bytes(rng.randbytes(BLOCKS * BS))
    dev = RawHandler.open(DeviceConfig(name, "raw", str(path), BLOCKS * BS, BS,
                                       write_cache=write_cache))
    run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention
    return dev


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[list[BlockDevice], list[Path]]]:
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    devs = [raw_disk(p, p.stem) for p in paths]
    domain = CopyDomain("fast")
    for d in devs:
        d.join(domain)
    yield devs, paths
    for d in devs:
        d.close()


def xcopy(on: BlockDevice, targets: list[BlockDevice], segs: list[x.BlockToBlockSegment]):  # noqa: ANN201
    header = x.ParameterHeader(0, False, x.ListIdUsage.NONE, 0, 0, 0, 0)
    cscds = tuple(x.IdentificationCscd(t.naa_designator(), BS) for t in targets)
    data = x.ParameterList(header, cscds, tuple(segs)).build()
    return run_command(on, cdbs.extended_copy(len(data)), data)


def random_segments(rng: random.Random) -> list[x.BlockToBlockSegment]:
    segs = []
    for _ in range(rng.randint(1, LIMITS.max_segment_descriptors)):
        blocks = rng.choice([1, 7, 64, 2048, rng.randint(0, 4096)])
        src = rng.randint(0, BLOCKS - blocks)
        # Half the time near the source: overlaps both ways when both indexes are one image.
        near = rng.randint(max(0, src - blocks), min(BLOCKS - blocks, src + blocks))
        dst = near if rng.random() < 0.5 else rng.randint(0, BLOCKS - blocks)
        segs.append(x.BlockToBlockSegment(rng.randint(0, 1), rng.randint(0, 1), blocks, src, dst))
    return segs


def apply(model: list[bytearray], seg: x.BlockToBlockSegment) -> None:
    n = seg.number_of_blocks * BS
    chunk = bytes(model[seg.source_index][seg.source_lba * BS : seg.source_lba * BS + n])
    model[seg.destination_index][seg.destination_lba * BS : seg.destination_lba * BS + n] = chunk


@pytest.mark.parametrize("cap", [None, 4096], ids=["whole", "short-counts"])
def test_random_segment_lists_match_the_byte_model(pair, spy, cap):
    devs, paths = pair
    spy.cap = cap
    rng = random.Random(SEED)
    model = [bytearray(p.read_bytes()) for p in paths]
    fast = 0
    for case in range(30):
        segs = random_segments(rng)
        on = devs[rng.randint(0, 1)]
        before = spy.calls
        r = xcopy(on, devs, segs)
        assert r.good, (case, segs, r)
        for seg in segs:
            apply(model, seg)
        assert [bytearray(p.read_bytes()) for p in paths] == model, (case, segs)
        fast += spy.calls > before
    # The fast path ran (a capability that always declined would pass the model too).
    assert fast >= 15, fast


def test_overlapping_ranges_of_one_image_are_memmove(pair, spy):
    devs, paths = pair
    for src, dst in ((100, 164), (164, 100), (0, 1)):  # forward, backward, by one block
        model = bytearray(paths[0].read_bytes())
        calls = spy.calls
        r = xcopy(devs[0], devs, [x.BlockToBlockSegment(0, 0, 2048, src, dst)])
        assert r.good, r
        model[dst * BS : (dst + 2048) * BS] = model[src * BS : (src + 2048) * BS]
        assert paths[0].read_bytes() == model, (src, dst)
        assert spy.calls == calls  # declined before the kernel could refuse it


def test_disjoint_ranges_of_one_image_use_the_fast_path(pair, spy):
    devs, paths = pair
    model = bytearray(paths[0].read_bytes())
    r = xcopy(devs[0], devs, [x.BlockToBlockSegment(0, 0, 1024, 0, 2048)])
    assert r.good and spy.calls >= 1
    model[2048 * BS : 3072 * BS] = model[: 1024 * BS]
    assert paths[0].read_bytes() == model


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL])
def test_a_kernel_that_cannot_copy_falls_back_to_read_and_write(pair, spy, err):
    devs, paths = pair
    spy.fail = err
    want = paths[0].read_bytes()[: 512 * BS]
    r = xcopy(devs[1], devs, [x.BlockToBlockSegment(0, 1, 512, 0, 300)])
    assert r.good and spy.calls == 1
    assert paths[1].read_bytes()[300 * BS : 812 * BS] == want


def test_an_io_error_in_the_copy_is_a_copy_aborted_write_error(pair, spy):
    devs, paths = pair
    spy.fail = errno.EIO
    r = xcopy(devs[1], devs, [x.BlockToBlockSegment(0, 1, 8, 0, 0)])
    assert not r.good
    assert r.sense_codes[0] == 0x0A  # COPY ABORTED (SPC-4 6.3.3), the write error within


def test_without_a_write_cache_the_copy_is_made_durable(tmp_path, spy, monkeypatch):
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    devs = [raw_disk(tmp_path / f"{n}.img", n, write_cache=False) for n in "cd"]
    domain = CopyDomain("durable")
    for d in devs:
        d.join(domain)
    try:
        r = xcopy(devs[0], devs, [x.BlockToBlockSegment(0, 1, 16, 0, 0)])
        assert r.good and spy.calls >= 1
        assert devs[1].backend.fd in synced  # type: ignore[attr-defined]
    finally:
        for d in devs:
            d.close()
