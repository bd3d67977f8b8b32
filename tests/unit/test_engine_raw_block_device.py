"""`raw` on a block device node (issue 11 hardening): it opens, sized by the device, and is never
truncated; a device smaller than the LUN, or a node that is neither a file nor a block device,
is a configuration error naming the image."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.errors import ConfigError
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers import raw
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.scsi.constants import Status
from tcmu_py.testing import cdbs, run_command

MIB = 1 << 20
BS = 512


def config(path: Path | str, size: int) -> DeviceConfig:
    return DeviceConfig("r", "raw", str(path), size)


def exercise(path: Path | str, size: int) -> None:
    """Write two blocks through the device, read them back; the device answers GOOD."""
    dev = RawHandler.open(config(path, size))
    try:
        assert dev.backend.blocking  # type: ignore[attr-defined]
        run_command(dev, cdbs.test_unit_ready())
        data = bytes(range(256)) * 4
        assert run_command(dev, cdbs.write10(size // BS - 2, 2), data_out=data).good
        r = run_command(dev, cdbs.read10(size // BS - 2, 2), data_in_len=2 * BS)
        assert r.status == Status.GOOD and r.data == data
    finally:
        dev.close()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    done = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"losetup: {done.stderr.strip()}")
    node = done.stdout.strip()
    try:
        yield node
    finally:
        subprocess.run(["losetup", "-d", node], check=False)


def test_raw_on_a_loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(MIB))
    with loop_device(backing) as node:
        assert stat.S_ISBLK(os.stat(node).st_mode)
        exercise(node, MIB)
        with pytest.raises(ConfigError, match=f"{node}: block device of {MIB} bytes"):
            RawHandler.open(config(node, 2 * MIB))
    assert backing.stat().st_size == MIB
    assert backing.read_bytes()[-2 * BS :] == bytes(range(256)) * 4


def test_the_block_device_branch_without_root(tmp_path, monkeypatch):
    """Where no loop device can be made: a regular file presented as a block device (fstat
    says S_IFBLK). Its size must come from the device and it must never be extended."""
    image = tmp_path / "dev"
    image.write_bytes(bytes(MIB))
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if os.path.samestat(st, os.stat(image)):
            fields = list(st)
            fields[stat.ST_MODE] = stat.S_IFBLK | 0o600
            fields[stat.ST_SIZE] = 0  # what fstat says for a block device
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(raw.os, "fstat", fstat)
    exercise(image, MIB)
    with pytest.raises(ConfigError, match=f"{image}: block device of {MIB} bytes"):
        RawHandler.open(config(image, 2 * MIB))
    assert image.stat().st_size == MIB  # never truncated or extended


def test_resize_of_a_block_device_beyond_its_end_is_refused(tmp_path, monkeypatch):
    image = tmp_path / "dev"
    image.write_bytes(bytes(MIB))
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        fields = list(st)
        fields[stat.ST_MODE] = stat.S_IFBLK | 0o600
        return os.stat_result(fields)

    monkeypatch.setattr(raw.os, "fstat", fstat)
    backend = raw.RawBackend(str(image), MIB // 2, BS)
    try:
        backend.resize(MIB)
        assert backend.size == MIB
        with pytest.raises(ConfigError, match="expected at least"):
            backend.resize(2 * MIB)
        assert image.stat().st_size == MIB
    finally:
        backend.close()


def test_a_fifo_or_character_device_is_a_config_error(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=f"image {fifo}: a FIFO; expected a regular file"):
        RawHandler.open(config(fifo, MIB))
    with pytest.raises(ConfigError, match="/dev/null: a character device"):
        RawHandler.open(config("/dev/null", MIB))
