"""A backstore of a subtype nobody serves must not hang `enable` (issue 13). `serve` turns on
kernel command replies for the whole module (the kernel has no per-subtype switch) and the
kernel waits for the reply without a time limit; so `serve` gives another daemon
UNSERVED_REPLY_SECONDS to answer, then answers -ENODEV for a device still not enabled."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.daemon import serve
from tcmu_py.daemon.netlink import DeviceEvent, TcmuCmd
from tcmu_py.daemon.serve import Daemon
from tcmu_py.handlers.null import NullHandler
from tcmu_py.testing import wait_until


class FakeNetlink:
    def __init__(self, events: list[DeviceEvent]) -> None:
        self.events = events
        self.replies: list[tuple[DeviceEvent, int]] = []
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")

    def fileno(self) -> int:
        return self.r

    def receive(self) -> list[DeviceEvent]:
        os.read(self.r, 1)
        out, self.events = self.events, []
        return out

    def reply(self, event: DeviceEvent, status: int = 0) -> None:
        self.replies.append((event, status))

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _device(configfs: Path, hba: int, name: str, nl_reply: int, enabled: int) -> None:
    d = configfs / f"user_{hba}" / name
    (d / "attrib").mkdir(parents=True)
    (d / "attrib/nl_reply_supported").write_text(f"{nl_reply}\n")
    (d / "enable").write_text(f"{enabled}\n")


def _added(hba: int, name: str, cfg: str, device_id: int) -> DeviceEvent:
    return DeviceEvent(TcmuCmd.ADDED_DEVICE, f"tcm-user/{hba}/{name}/{cfg}", device_id,
                       device_id)


def test_unserved_added_device_answered_enodev_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "UNSERVED_REPLY_SECONDS", 0.3, raising=False)
    cfs = tmp_path / "configfs"
    _device(cfs, 0, "nobody", 1, 0)       # qcow: nobody serves it, the kernel waits
    _device(cfs, 1, "runners", 1, 1)      # rbd: another daemon answered (enabled)
    _device(cfs, 2, "noreply", -1, 0)     # nl_reply_supported < 0: the kernel never waits
    events = [_added(0, "nobody", "qcow//x.qcow2", 10), _added(1, "runners", "rbd/p/i", 11),
              _added(2, "noreply", "glfs/v@h/f", 12)]
    (tmp_path / "uio").mkdir()
    d = Daemon(handlers={"null": NullHandler}, configfs_root=cfs, uio_class=tmp_path / "uio",
               run_dir=tmp_path / "run", use_netlink=False, use_udev=False)
    d.start()
    fake = FakeNetlink(events)
    d._netlink = fake
    t = threading.Thread(target=d.run, kwargs={"install_signals": False})
    started = time.monotonic()
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not fake.replies and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        assert [(e.device, st) for e, st in fake.replies] == [
            ("tcm-user/0/nobody/qcow//x.qcow2", -errno.ENODEV)]
        assert elapsed >= 0.3  # the other daemon's grace first
        assert not d._unserved
    finally:
        d.stop()
        t.join(timeout=30)
    fake.close()


def _uio(root: Path, minor: int, name: str) -> None:
    (root / f"uio{minor}").mkdir(parents=True)
    (root / f"uio{minor}" / "name").write_text(name + "\n")


def _run_until_replies(d: Daemon, fake: FakeNetlink, count: int) -> float:
    t = threading.Thread(target=d.run, kwargs={"install_signals": False})
    started = time.monotonic()
    t.start()
    try:
        deadline = time.monotonic() + 10
        while len(fake.replies) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        # every deadline passed: nothing more is pending
        while d._unserved and time.monotonic() < deadline:
            time.sleep(0.01)
        return time.monotonic() - started
    finally:
        d.stop()
        t.join(timeout=30)


def test_unserved_removed_and_reconfig_are_bounded_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device of tcmu-runner's subtype enabled while it ran (nl_reply_supported 1), then
    tcmu-runner gone: with `serve` listening, the kernel sends REMOVED_DEVICE / RECONFIG_DEVICE
    and waits for good. `serve` answers them after the grace, only where the kernel still
    waits (its uio node unchanged; the new size not applied)."""
    monkeypatch.setattr(serve, "UNSERVED_REPLY_SECONDS", 0.3, raising=False)
    cfs = tmp_path / "configfs"
    uio = tmp_path / "uio"
    uio.mkdir()
    _device(cfs, 0, "gone", 1, 1)       # REMOVED, nobody answers: uio0 still there
    _uio(uio, 0, "tcm-user/0/gone/file//a.img")
    _device(cfs, 1, "answered", 1, 1)   # REMOVED answered by tcmu-runner: uio1 gone
    _device(cfs, 2, "grow", 1, 1)       # RECONFIG dev_size, nobody answers
    (cfs / "user_2/grow/attrib/dev_size").write_text("1048576\n")
    _uio(uio, 2, "tcm-user/2/grow/file//b.img")
    _device(cfs, 3, "grown", 1, 1)      # RECONFIG dev_size answered: the size is the new one
    (cfs / "user_3/grown/attrib/dev_size").write_text("2097152\n")
    _uio(uio, 3, "tcm-user/3/grown/file//c.img")
    _device(cfs, 4, "renamed", 1, 1)    # RECONFIG dev_config answered: uio4 has the new name
    _uio(uio, 4, "tcm-user/4/renamed/file//new.img")
    events = [
        DeviceEvent(TcmuCmd.REMOVED_DEVICE, "tcm-user/0/gone/file//a.img", 0, 20),
        DeviceEvent(TcmuCmd.REMOVED_DEVICE, "tcm-user/1/answered/file//x.img", 1, 21),
        DeviceEvent(TcmuCmd.RECONFIG_DEVICE, "tcm-user/2/grow/file//b.img", 2, 22,
                    dev_size=2097152),
        DeviceEvent(TcmuCmd.RECONFIG_DEVICE, "tcm-user/3/grown/file//c.img", 3, 23,
                    dev_size=2097152),
        DeviceEvent(TcmuCmd.RECONFIG_DEVICE, "tcm-user/4/renamed/file//old.img", 4, 24,
                    dev_cfg="file//new.img"),
    ]
    d = Daemon(handlers={"null": NullHandler}, configfs_root=cfs, uio_class=uio,
               run_dir=tmp_path / "run", use_netlink=False, use_udev=False)
    d.start()
    fake = FakeNetlink(events)
    d._netlink = fake
    elapsed = _run_until_replies(d, fake, 2)
    assert sorted((e.device_id, e.cmd, st) for e, st in fake.replies) == [
        (20, TcmuCmd.REMOVED_DEVICE, 0), (22, TcmuCmd.RECONFIG_DEVICE, -errno.ENODEV)]
    assert elapsed >= 0.3 and not d._unserved
    fake.close()


def test_removed_device_answered_though_its_configfs_is_gone(tmp_path: Path) -> None:
    """REMOVED_DEVICE arrives while the kernel waits inside the configfs rmdir, whose attributes
    are already gone: the reply must still be sent (it was not: `targetcli ... delete` of a
    served backstore hung for good in the VM)."""
    import shutil

    cfs = tmp_path / "configfs"
    _device(cfs, 3, "d0", 1, 1)
    (tmp_path / "uio").mkdir()
    d: Any = Daemon(handlers={"null": NullHandler}, configfs_root=cfs,
                    uio_class=tmp_path / "uio", run_dir=tmp_path / "run", use_netlink=False,
                    use_udev=False)
    name = "tcm-user/3/d0/null/"
    fake = FakeNetlink([_added(3, "d0", "null/", 7)])
    d._netlink = fake
    d._handle_netlink()  # handled on a thread of its own, answered when done
    assert wait_until(lambda: len(fake.replies) == 1), "ADDED_DEVICE not answered"
    assert [st for _, st in fake.replies] == [0]
    # The kernel sends REMOVED_DEVICE from inside the rmdir, which holds the directory locked:
    # anything below it must not be touched (here: made unreadable, nl_reply_supported 0).
    (cfs / "user_3" / "d0" / "attrib/nl_reply_supported").write_text("0\n")
    shutil.rmtree(cfs / "user_3" / "d0" / "attrib")
    touched: list[str] = []

    class Locked:  # a lookup below the directory being removed would wait for the rmdir
        def __init__(self, *a: object, **kw: object) -> None:
            touched.append("configfs")
            raise AssertionError("configfs touched during REMOVED_DEVICE")

    d_serve: Any = serve
    real = d_serve.TcmuConfigfs
    d_serve.TcmuConfigfs = Locked
    fake.events = [DeviceEvent(TcmuCmd.REMOVED_DEVICE, name, 7, 7)]
    os.write(fake.w, b"x")
    try:
        d._handle_netlink()
        assert wait_until(lambda: len(fake.replies) == 2), "REMOVED_DEVICE not answered"
    finally:
        d_serve.TcmuConfigfs = real
    assert not touched
    assert [(e.cmd, st) for e, st in fake.replies] == [
        (TcmuCmd.ADDED_DEVICE, 0), (TcmuCmd.REMOVED_DEVICE, 0)]
    fake.close()
