"""tcmu_py.uio against a fake sysfs tree and a regular file standing in for /dev/uioN."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.errors import TcmuError
from tcmu_py.ring import Ring
from tcmu_py.testing.fake_kernel import FakeKernel
from tcmu_py.uio import (
    UioDevice,
    UioError,
    UioName,
    find_tcmu_device,
    list_tcmu_devices,
)


def add_uio(root: Path, n: int, name: str, size: int = 0x10000) -> Path:
    d = root / f"uio{n}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "maps" / "map0" / "size").write_text(f"{size:#x}\n")
    return d


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tcm-user/3/n0/raw//tmp/n.img", UioName(3, "n0", "raw", "/tmp/n.img")),
        ("tcm-user/1/lun/thin/pool=a/b:c", UioName(1, "lun", "thin", "pool=a/b:c")),
        ("tcm-user/12/d/null/", UioName(12, "d", "null", "")),
        ("tcm-user/12/d/null", UioName(12, "d", "null", "")),
        # enabled without a dev_config: the kernel's "tcm-user/%u/%s"
        ("tcm-user/7/bare", UioName(7, "bare", "", "")),
    ],
)
def test_parse_uio_name(name: str, expected: UioName) -> None:
    assert UioName.parse(name) == expected


@pytest.mark.parametrize(
    "name", ["uio_pdrv", "tcm-user/x/d/raw/", "tcm-user/1//raw/", "tcm-user/1"]
)
def test_parse_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError):
        UioName.parse(name)


@given(
    hba=st.integers(0, 2**32 - 1),
    device=st.text(st.characters(blacklist_characters="/\0\n"), min_size=1),
    subtype=st.text(st.characters(blacklist_characters="/\0\n"), min_size=1),
    cfg=st.text(st.characters(blacklist_characters="\0\n")),
)
def test_uio_name_round_trip(hba: int, device: str, subtype: str, cfg: str) -> None:
    name = UioName(hba, device, subtype, cfg)
    assert UioName.parse(name.build()) == name


def test_list_finds_only_tcmu_devices_in_order(tmp_path: Path) -> None:
    add_uio(tmp_path, 10, "tcm-user/1/b/raw//x", 0x40800000)
    add_uio(tmp_path, 2, "tcm-user/1/a/null/")
    add_uio(tmp_path, 3, "uio_pdrv_genirq")
    (tmp_path / "not-uio").mkdir()
    found = list_tcmu_devices(str(tmp_path), dev_root="/dev")
    assert [(i.uio, i.dev_path, i.parsed.device, i.map_size) for i in found] == [
        ("uio2", "/dev/uio2", "a", 0x10000),
        ("uio10", "/dev/uio10", "b", 0x40800000),
    ]
    assert find_tcmu_device("tcm-user/1/b/raw//x", str(tmp_path)).uio == "uio10"
    with pytest.raises(UioError, match="no uio device"):
        find_tcmu_device("tcm-user/9/z/raw/", str(tmp_path))


def test_list_without_sysfs_is_empty(tmp_path: Path) -> None:
    assert list_tcmu_devices(str(tmp_path / "absent")) == []


def fake_device(tmp_path: Path) -> tuple[FakeKernel, Path, Path]:
    fk = FakeKernel(cmdr_size=4096 - 128, data_size=16 * 4096)
    dev = tmp_path / "uio0"
    dev.write_bytes(bytes(fk.buffer))
    sysfs = add_uio(tmp_path / "sys", 0, "tcm-user/1/d/raw//img", len(fk.buffer))
    return fk, dev, sysfs


def test_open_maps_the_whole_area_and_a_ring_attaches(tmp_path: Path) -> None:
    fk, dev, sysfs = fake_device(tmp_path)
    with UioDevice(str(dev), str(sysfs)) as uio:
        assert uio.name == "tcm-user/1/d/raw//img"
        assert uio.buffer is not None and len(uio.buffer) == len(fk.buffer)
        assert os.get_blocking(uio.fileno()) is False
        ring = Ring(uio.buffer)
        assert ring.cmdr_size == 4096 - 128
        with pytest.raises(UioError, match="still alive"):
            uio.close()
        ring.close()
    with pytest.raises(ValueError, match="closed"):
        uio.fileno()
    uio.close()  # idempotent


def test_busy_device_names_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev, sysfs = fake_device(tmp_path)

    def busy(*_args: object) -> int:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(UioError, match=r"uio0 \(tcm-user/1/d/raw//img\) is busy") as info:
        UioDevice(str(dev), str(sysfs))
    assert info.value.errno == errno.EBUSY
    assert isinstance(info.value, TcmuError) and isinstance(info.value, OSError)


def test_map_larger_than_device_fails_clearly(tmp_path: Path) -> None:
    _, dev, sysfs = fake_device(tmp_path)
    (sysfs / "maps" / "map0" / "size").write_text("0x40800000\n")
    with pytest.raises(UioError, match="cannot map 0x40800000 bytes"):
        UioDevice(str(dev), str(sysfs))


def test_missing_sysfs_dir(tmp_path: Path) -> None:
    _, dev, _ = fake_device(tmp_path)
    with pytest.raises(UioError, match="cannot read") as info:
        UioDevice(str(dev), str(tmp_path / "nowhere"))
    assert info.value.errno == errno.ENOENT


def test_bad_size_file(tmp_path: Path) -> None:
    _, dev, sysfs = fake_device(tmp_path)
    (sysfs / "maps" / "map0" / "size").write_text("lots\n")
    with pytest.raises(UioError, match="not a hex size"):
        UioDevice(str(dev), str(sysfs))


def test_clear_event_and_kick_use_four_byte_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, dev, sysfs = fake_device(tmp_path)
    uio = UioDevice(str(dev), str(sysfs))
    calls: list[tuple[str, int, object]] = []
    pending = [True]

    def fake_read(fd: int, n: int) -> bytes:
        calls.append(("read", fd, n))
        if pending.pop() if pending else False:
            return (7).to_bytes(4, "little")
        raise BlockingIOError(errno.EAGAIN, "no event")

    def fake_write(fd: int, data: bytes) -> int:
        calls.append(("write", fd, data))
        return len(data)

    monkeypatch.setattr(os, "read", fake_read)
    monkeypatch.setattr(os, "write", fake_write)
    uio.clear_event()
    uio.clear_event()  # EAGAIN: swallowed
    uio.kick()
    fd = uio.fileno()
    assert calls == [("read", fd, 4), ("read", fd, 4), ("write", fd, b"\x01\0\0\0")]
    monkeypatch.undo()
    uio.close()
