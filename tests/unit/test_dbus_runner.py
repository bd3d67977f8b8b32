"""tcmu-runner owns org.kernel.TCMUService1 first (issue 13): tcmu-py joins it as tcmu-runner
accepts handlers of other processes (its main.c, ``on_register_handler``): it owns
``org.kernel.TCMUService1.HandlerManager1.<subtype>``, answers CheckConfig at
``/org/kernel/TCMUService1/HandlerManager1/<subtype>`` and calls ``RegisterHandler(ss) -> (bs)``.
A stand-in for tcmu-runner on a private dbus-daemon does what tcmu-runner does on that call:
checks the name has an owner, and later forwards targetcli's CheckConfig there."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from jeepney import DBusAddress, MessageType, new_method_call, new_method_return
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import HeaderFields
from test_dbus import HANDLERS, bus  # noqa: F401 - the private dbus-daemon fixture

from tcmu_py.daemon.dbus import (
    BUS_NAME,
    HANDLER_IFACE,
    MANAGER_IFACE,
    MANAGER_NAME,
    MANAGER_PATH,
    DBusService,
)
from tcmu_py.handlers.thin import ThinHandler

DBUS = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                   interface="org.freedesktop.DBus")


class FakeRunner:
    """Owns the name and answers HandlerManager1.RegisterHandler as tcmu-runner does (true once
    ``HandlerManager1.<subtype>`` has an owner, false otherwise); `forward` is its
    on_dbus_check_config: the call goes to the registered process."""

    def __init__(self, address: str) -> None:
        self.conn = open_dbus_connection(address)
        reply = self.conn.send_and_get_reply(
            new_method_call(DBUS, "RequestName", "su", (BUS_NAME, 4)), timeout=10)
        assert reply.body == (1,)
        self.registered: dict[str, str] = {}
        self.helper = open_dbus_connection(address)  # its own calls out (call_sync)
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                msg = self.conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            except (OSError, ValueError):
                return
            f = msg.header.fields
            if (msg.header.message_type is MessageType.method_call
                    and f.get(HeaderFields.member) == "RegisterHandler"
                    and f.get(HeaderFields.interface) == MANAGER_IFACE
                    and f.get(HeaderFields.path) == MANAGER_PATH):
                subtype, desc = msg.body
                owner = self.helper.send_and_get_reply(new_method_call(
                    DBUS, "NameHasOwner", "s", (f"{MANAGER_NAME}.{subtype}",)), timeout=10)
                if owner.body == (True,):
                    self.registered[subtype] = desc
                    self.conn.send(new_method_return(msg, "bs", (True, "succeeded")))
                else:
                    self.conn.send(new_method_return(msg, "bs", (False, "Cannot find handler")))

    def forward(self, subtype: str, configstr: str) -> tuple[Any, ...]:
        addr = DBusAddress(f"{MANAGER_PATH}/{subtype}", bus_name=f"{MANAGER_NAME}.{subtype}",
                           interface=HANDLER_IFACE)
        reply = self.helper.send_and_get_reply(
            new_method_call(addr, "CheckConfig", "s", (configstr,)), timeout=10)
        return tuple(reply.body)

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=10)
        self.conn.close()
        self.helper.close()


def test_registers_every_subtype_with_the_owner(
        bus: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    runner = FakeRunner(bus)
    svc = DBusService(HANDLERS, bus)
    try:
        with caplog.at_level("INFO", logger="tcmu_py.daemon.dbus"):
            assert svc.start()
        assert svc.registered == ["null", "raw", "thin"]
        assert runner.registered["thin"] == ThinHandler.description
        # targetcli's CheckConfig as tcmu-runner forwards it: our handler's own check
        assert runner.forward("raw", "raw//var/lib/d0.img") == (True, "success")
        ok, text = runner.forward("raw", "raw/d0.img")
        assert ok is False and "absolute path" in text
        lines = [r.getMessage() for r in caplog.records if r.name == "tcmu_py.daemon.dbus"]
        assert len(lines) == 1 and "registered null, raw, thin" in lines[0], lines
        assert "kernel command replies go off" in lines[0]
    finally:
        svc.close()
        runner.close()


def test_owner_without_handler_manager_is_one_log_line(
        bus: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    first = DBusService(HANDLERS, bus)  # tcmu-py itself: no HandlerManager1
    assert first.start()
    try:
        second = DBusService(HANDLERS, bus)
        with caplog.at_level("INFO", logger="tcmu_py.daemon.dbus"):
            caplog.clear()
            assert not second.start()
        second.close()
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "tcmu_py.daemon.dbus" and r.levelname != "DEBUG"]
        assert len(lines) == 1 and "does not take tcmu-py's subtypes" in lines[0], lines
    finally:
        first.close()


@pytest.mark.parametrize(("registered", "replies"), [([], True), (["raw"], False)])
def test_kernel_replies_off_next_to_tcmu_runner(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, registered: list[str],
        replies: bool) -> None:
    """tcmu-runner answers ADDED_DEVICE of every subtype it lacks with -ENOENT (libtcmu.c,
    device_add): while the kernel waits for replies, our backstores' enable would fail. Once
    registered with it, `serve` turns replies off; alone, it turns them on."""
    from tcmu_py.daemon import netlink
    from tcmu_py.daemon.serve import Daemon

    sent: list[bool] = []

    class FakeNetlink:
        def set_features(self, kern_cmd_reply: bool = True) -> None:
            sent.append(kern_cmd_reply)

    monkeypatch.setattr(netlink, "TcmuNetlink", FakeNetlink)
    d: Any = Daemon(handlers=HANDLERS, configfs_root=tmp_path / "cfs",
                    uio_class=tmp_path / "uio", run_dir=tmp_path / "run", use_udev=False)

    class Registered:
        pass

    d._dbus = Registered()
    d._dbus.registered = registered
    d._open_netlink()
    assert sent == [replies]
