"""The org.kernel.TCMUService1 D-Bus service targetcli lists user backstores from (issue 13):
the message logic on its own, then the service on a private dbus-daemon, as a client such as
targetcli sees it (GetManagedObjects, Properties.GetAll, CheckConfig)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

from tcmu_py.daemon.dbus import BUS_NAME, HANDLER_IFACE, ROOT_PATH, DBusService, TcmuService
from tcmu_py.daemon.serve import Daemon
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler

HANDLERS = {"raw": RawHandler, "null": NullHandler, "thin": ThinHandler}


def _call(path: str, iface: str, member: str, sig: str | None = None,
          body: tuple[object, ...] = ()) -> Any:
    addr = DBusAddress(path, bus_name=BUS_NAME, interface=iface)
    return new_method_call(addr, member, sig, body)


# -- the message logic, no bus ---------------------------------------------------------------

def test_managed_objects_one_per_subtype_with_config_desc() -> None:
    svc = TcmuService(HANDLERS)
    reply = svc.handle(_call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                             "GetManagedObjects"))
    assert reply.header.message_type is MessageType.method_return
    (objects,) = reply.body
    assert sorted(objects) == [f"{ROOT_PATH}/{s}" for s in ("null", "raw", "thin")]
    assert objects[f"{ROOT_PATH}/raw"] == {
        HANDLER_IFACE: {"ConfigDesc": ("s", RawHandler.description)}}


def test_check_config_runs_the_handlers_check() -> None:
    svc = TcmuService(HANDLERS)

    def check(sub: str, cfg: str) -> tuple[bool, str]:
        reply = svc.handle(_call(f"{ROOT_PATH}/{sub}", HANDLER_IFACE, "CheckConfig", "s", (cfg,)))
        return tuple(reply.body)  # type: ignore[return-value]

    assert check("raw", "raw//var/lib/d0.img") == (True, "success")
    # targetcli passes "<subtype>/<cfgstring>": the handler's own message comes back.
    assert check("raw", "raw/relative.img") == (
        False, "raw: config string 'relative.img': expected the absolute path of the image")
    assert check("raw", "raw//var/lib/") == (
        False, "raw: config string '/var/lib/': expected a file, not a directory")
    # the daemon's own trailing items are not the handler's
    assert check("raw", "raw//d.img;wwn=naa.5001405000000001") == (True, "success")
    ok, text = check("raw", "thin/pool=/p")
    assert not ok and "subtype 'thin'" in text
    ok, text = check("raw", "no-slash")
    assert not ok and "expected 'raw/<config string>'" in text
    # rtslib-fb writes dev_config through `control`, which the kernel cuts at ',': a config
    # string with one would be served cut (another disk of the pool, or refused at the open)
    ok, text = check("thin", "thin/pool=/p,disk=data")
    assert not ok and "expected no ','" in text and "with ';'" in text
    # what exists at the path must be able to hold the disk (before: True, then the open
    # refused it)
    for node, what in (("/", "a directory"), ("/dev/null", "a character device")):
        ok, text = check("raw", f"raw/{node}" if node != "/" else "raw//tmp")
        assert not ok and what in text, text


def test_properties_and_errors() -> None:
    svc = TcmuService(HANDLERS)
    props = "org.freedesktop.DBus.Properties"
    reply = svc.handle(_call(f"{ROOT_PATH}/null", props, "GetAll", "s", (HANDLER_IFACE,)))
    assert reply.body == ({"ConfigDesc": ("s", NullHandler.description)},)
    reply = svc.handle(_call(f"{ROOT_PATH}/null", props, "Get", "ss",
                             (HANDLER_IFACE, "ConfigDesc")))
    assert reply.body == (("s", NullHandler.description),)
    reply = svc.handle(_call(f"{ROOT_PATH}/null", props, "Get", "ss", (HANDLER_IFACE, "Nope")))
    assert reply.header.message_type is MessageType.error
    reply = svc.handle(_call(f"{ROOT_PATH}/qcow", HANDLER_IFACE, "CheckConfig", "s", ("q/x",)))
    assert reply.header.message_type is MessageType.error  # an object nobody exports
    reply = svc.handle(_call(f"{ROOT_PATH}/raw", HANDLER_IFACE, "CheckConfig", "u", (3,)))
    assert reply.header.message_type is MessageType.error  # a wrong argument type
    xml = svc.handle(_call(ROOT_PATH, "org.freedesktop.DBus.Introspectable", "Introspect")).body[0]
    assert '<node name="raw"/>' in xml and "GetManagedObjects" in xml


def test_subtype_not_a_path_element_is_left_out() -> None:
    class Dashed(NullHandler):
        subtype = "my-disk"

    assert TcmuService({"my-disk": Dashed, "raw": RawHandler}).objects == {
        f"{ROOT_PATH}/raw": RawHandler}


# -- on a private dbus-daemon -----------------------------------------------------------------

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("dbus-daemon")
    if exe is None:
        pytest.skip("dbus-daemon is not installed (Debian package dbus; scripts/bootstrap.sh)")
    sock = tmp_path / "bus"
    conf = tmp_path / "bus.conf"
    conf.write_text(POLICY.format(socket=sock))
    proc = subprocess.Popen([exe, f"--config-file={conf}", "--nofork", "--nopidfile"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dbus-daemon did not start: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.01)
        yield f"unix:path={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_service_on_a_bus_as_targetcli_sees_it(bus: str) -> None:
    svc = DBusService(HANDLERS, bus)
    assert svc.start()
    try:
        with open_dbus_connection(bus) as client:
            def call(msg: Any) -> Any:
                return client.send_and_get_reply(msg, timeout=10)

            reply = call(_call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects"))
            (objects,) = reply.body
            assert sorted(p.rsplit("/", 1)[1] for p in objects) == ["null", "raw", "thin"]
            assert objects[f"{ROOT_PATH}/thin"][HANDLER_IFACE]["ConfigDesc"] == (
                "s", ThinHandler.description)
            # many calls in flight at once: every one answered, in order
            msgs = [_call(f"{ROOT_PATH}/raw", HANDLER_IFACE, "CheckConfig", "s",
                          (f"raw/{'/' if i % 2 else ''}d{i}.img",)) for i in range(50)]
            for i, m in enumerate(msgs):
                client.send(m, serial=1000 + i)
            got: dict[int, tuple[object, ...]] = {}
            deadline = time.monotonic() + 10
            while len(got) < 50:
                r = client.receive(timeout=max(0.0, deadline - time.monotonic()))
                serial = r.header.fields.get(5)  # reply_serial
                if serial is not None:
                    got[serial - 1000] = tuple(r.body)
            for i in range(50):
                assert got[i][0] is bool(i % 2), (i, got[i])
        # a second daemon finds the name taken: off, not an error
        other = DBusService(HANDLERS, bus)
        assert not other.start()
        other.close()
    finally:
        svc.close()
    # the name is released with the connection: a new service takes it
    again = DBusService(HANDLERS, bus)
    assert again.start()
    again.close()


def test_no_bus_is_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = DBusService(HANDLERS, f"unix:path={tmp_path}/none")
    with caplog.at_level("INFO", logger="tcmu_py.daemon.dbus"):
        assert not svc.start()
    svc.close()
    lines = [r for r in caplog.records if r.name == "tcmu_py.daemon.dbus"]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert "D-Bus service off: no" in lines[0].getMessage()


def test_daemon_offers_the_service_while_it_runs(bus: str, tmp_path: Path) -> None:
    d = Daemon(handlers=HANDLERS, configfs_root=tmp_path / "cfs", uio_class=tmp_path / "uio",
               dev_dir=tmp_path / "dev", run_dir=tmp_path / "run", use_netlink=False,
               use_udev=False, dbus_bus=bus)
    d.start()
    try:
        with open_dbus_connection(bus) as client:
            reply = client.send_and_get_reply(
                _call(f"{ROOT_PATH}/raw", HANDLER_IFACE, "CheckConfig", "s", ("raw/x",)),
                timeout=10)
            assert reply.body[0] is False and "absolute path" in reply.body[1]
    finally:
        d.shutdown()
    with open_dbus_connection(bus) as client:  # gone with the daemon
        reply = client.send_and_get_reply(
            _call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
            timeout=10)
        assert reply.header.message_type is MessageType.error
    assert os.path.exists(tmp_path / "run")


_GIO_CLIENT = """
import sys
from gi.repository import Gio
bus = Gio.DBusConnection.new_for_address_sync(
    sys.argv[1], Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
mgr = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, None, "org.kernel.TCMUService1",
                             "/org/kernel/TCMUService1", "org.freedesktop.DBus.ObjectManager",
                             None)
for path, props in sorted(mgr.GetManagedObjects().items()):
    iface = Gio.DBusProxy.new_sync(bus, Gio.DBusProxyFlags.NONE, None,
                                   "org.kernel.TCMUService1", path, "org.kernel.TCMUService1",
                                   None)
    name = path[path.rfind("/") + 1:]
    desc = props.get("org.kernel.TCMUService1", {}).get("ConfigDesc", "No description.")
    ok, msg = iface.CheckConfig("(s)", name + "/relative")
    print(name, desc, ok, msg, sep="|")
"""


def test_gio_client_like_targetcli(bus: str) -> None:
    """The calls targetcli-fb makes (ui_backstore.UIBackstores._user_backstores and
    UIUserBackedBackstore.ui_command_create) through GDBus, with the host's python3-gi."""
    python = shutil.which("python3", path="/usr/bin")
    if python is None or subprocess.run([python, "-c", "from gi.repository import Gio"],
                                        capture_output=True, timeout=30).returncode != 0:
        pytest.skip("python3-gi (a dependency of targetcli-fb) is not installed")
    svc = DBusService(HANDLERS, bus)
    assert svc.start()
    try:
        out = subprocess.run([python, "-c", _GIO_CLIENT, bus], capture_output=True, text=True,
                             timeout=60)
    finally:
        svc.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("|")[0] for line in lines] == ["null", "raw", "thin"]
    raw = lines[1].split("|")
    assert raw == ["raw", RawHandler.description, "False",
                   "raw: config string 'relative': expected the absolute path of the image"]
    assert lines[0].split("|")[2] == "True"  # null takes any string
