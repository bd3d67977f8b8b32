"""The D-Bus service LIO's own tools look for: ``org.kernel.TCMUService1`` on the system bus.

targetcli (targetcli-fb's ``UIBackstores``) makes a ``/backstores/user:<subtype>`` node for each
object the ObjectManager at ``/org/kernel/TCMUService1`` reports; the object's path ends in the
subtype. ``help create`` there prints the object's ``ConfigDesc`` property (interface
``org.kernel.TCMUService1``), and ``create`` calls ``CheckConfig(s) -> (b, s)`` on it with the
whole ``<subtype>/<cfgstring>`` before it writes anything to configfs: a false answer is shown as
``cfgstring invalid: <the string>``. tcmu-runner exports the same names (its main.c); targetcli
talks to whichever daemon owns the name.

Here: one object per served subtype, ``ConfigDesc`` is the handler's `Handler.description`,
``CheckConfig`` runs the handler's own `Handler.check_config` (the check `serve` applies when the
kernel adds a device) and answers its message. ``org.freedesktop.DBus.Properties`` (Get, GetAll:
GDBus proxies, which targetcli uses, load properties with GetAll) and ``Introspectable`` are
served too; nothing else.

Connection: jeepney (pure Python, no GLib main loop), one thread of its own (``tcmu-dbus``) as
the control socket has: a slow or hostile bus peer never holds the device loops or netlink. No
system bus: one log line, and `serve` runs without it.

When tcmu-runner owns the name (it was first), tcmu-py joins it the way tcmu-runner accepts
external handlers (its main.c, ``on_register_handler``): for each subtype it owns
``org.kernel.TCMUService1.HandlerManager1.<subtype>``, serves ``CheckConfig`` at
``/org/kernel/TCMUService1/HandlerManager1/<subtype>``, and calls
``HandlerManager1.RegisterHandler(subtype, ConfigDesc) -> (b, s)`` on tcmu-runner, which then
exports ``/org/kernel/TCMUService1/<subtype>`` itself (targetcli lists it, ``help create``
shows our ConfigDesc) and forwards each ``CheckConfig`` to us. That is all RegisterHandler
does: tcmu-runner's netlink side (libtcmu) keeps the handler list it had at start, so it still
answers the kernel's ADDED_DEVICE for these subtypes with -ENOENT ("could not find handler");
a backstore that waits for replies (``nl_reply_supported`` > 0, the default once any daemon
turned replies on) then fails `enable` whichever daemon answers first. So `serve`, once
registered, turns kernel replies off (serve.py, ``_open_netlink``). When tcmu-py owns the name
first, tcmu-runner queues for it and turns replies on: `RUNNER_NOTE` (README.md, "Next to
tcmu-runner") gives the ``control=nl_reply_supported=-1`` such backstores need then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
from collections.abc import Callable, Mapping
from typing import Any
from xml.sax.saxutils import escape

from tcmu_py.configspec import config_string_problem
from tcmu_py.handler import Handler, split_daemon_items
from tcmu_py.threadname import name_os_thread

log = logging.getLogger(__name__)

BUS_NAME = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"
HANDLER_IFACE = "org.kernel.TCMUService1"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"

# RequestName flags and replies (D-Bus specification, "org.freedesktop.DBus.RequestName").
_DO_NOT_QUEUE = 4
_PRIMARY_OWNER = 1
_ALREADY_OWNER = 4

#: tcmu-runner's interface for handlers that live in another process (its main.c).
MANAGER_PATH = ROOT_PATH + "/HandlerManager1"
MANAGER_IFACE = "org.kernel.TCMUService1.HandlerManager1"
MANAGER_NAME = BUS_NAME + ".HandlerManager1"

RUNNER_NOTE = ("tcmu-runner answers the kernel's ADDED_DEVICE for subtypes it does not serve "
               "with -ENOENT: create tcmu-py backstores with control=nl_reply_supported=-1 "
               "while it runs")

#: An object path element: [A-Za-z0-9_] (D-Bus specification, "Valid Object Paths").
_PATH_ELEMENT = re.compile(r"[A-Za-z0-9_]+")

_HANDLER_XML = f"""  <interface name="{HANDLER_IFACE}">
    <method name="CheckConfig">
      <arg name="configstr" type="s" direction="in"/>
      <arg name="is_valid" type="b" direction="out"/>
      <arg name="message" type="s" direction="out"/>
    </method>
    <property name="ConfigDesc" type="s" access="read"/>
  </interface>
"""
_PROPERTIES_XML = f"""  <interface name="{PROPERTIES}">
    <method name="Get">
      <arg type="s" direction="in"/><arg type="s" direction="in"/>
      <arg type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg type="s" direction="in"/><arg type="a{{sv}}" direction="out"/>
    </method>
  </interface>
"""
_INTROSPECT_XML = f"""  <interface name="{INTROSPECTABLE}">
    <method name="Introspect"><arg type="s" direction="out"/></method>
  </interface>
"""
_MANAGER_XML = f"""  <interface name="{OBJECT_MANAGER}">
    <method name="GetManagedObjects">
      <arg type="a{{oa{{sa{{sv}}}}}}" direction="out"/>
    </method>
  </interface>
"""


class TcmuService:
    """The objects and their answers, without any I/O: `handle` maps one incoming method call
    to its reply (a jeepney Message), or None when the caller asked for no reply."""

    def __init__(self, handlers: Mapping[str, type[Handler]]) -> None:
        self.objects: dict[str, type[Handler]] = {}
        #: Objects registered with tcmu-runner's HandlerManager1 (`DBusService.register_with`):
        #: the paths it forwards CheckConfig to; not listed by our ObjectManager.
        self.external: dict[str, type[Handler]] = {}
        for subtype in handlers:
            try:
                handler = handlers[subtype]
            except KeyError:  # failed to import: the registry logged it
                continue
            if not _PATH_ELEMENT.fullmatch(subtype):
                log.warning("D-Bus: subtype %r is not an object path element ([A-Za-z0-9_]);"
                            " targetcli will not list it", subtype)
                continue
            self.objects[f"{ROOT_PATH}/{subtype}"] = handler

    # -- the interface --------------------------------------------------------------------------

    def properties(self, handler: type[Handler]) -> dict[str, tuple[str, Any]]:
        return {"ConfigDesc": ("s", handler.description or f"{handler.subtype} (no description)")}

    def managed_objects(self) -> dict[str, dict[str, dict[str, tuple[str, Any]]]]:
        return {path: {HANDLER_IFACE: self.properties(h)} for path, h in self.objects.items()}

    @staticmethod
    def check_config(handler: type[Handler], configstr: str) -> tuple[bool, str]:
        """targetcli passes ``<subtype>/<cfgstring>``; the handler sees what `serve` would give
        it when the kernel adds the device (the daemon's own ``wwn=``/``copy_domain=`` items
        split off)."""
        subtype, sep, cfgstring = configstr.partition("/")
        if not sep:
            return False, f"expected '{handler.subtype}/<config string>', got {configstr!r}"
        if subtype != handler.subtype:
            return False, (f"config string {configstr!r} is for subtype {subtype!r}, "
                           f"this object checks {handler.subtype!r}")
        problem = config_string_problem(configstr)
        if problem is not None:
            # What rtslib-fb writes to the kernel as dev_config: a ',' there ends it, and the
            # device would be served with the part before it (another disk, or none).
            return False, (f"config string {configstr!r}: expected {problem}; separate options "
                           "with ';'")
        try:
            handler.check_config(split_daemon_items(cfgstring)[0])
        except Exception as exc:  # noqa: BLE001 - any failure is the answer, not a crash
            return False, str(exc) or type(exc).__name__
        return True, "success"

    def subtypes(self) -> list[str]:
        return sorted(p.rsplit("/", 1)[1] for p in self.objects)

    def export_external(self, subtype: str) -> None:
        self.external[f"{MANAGER_PATH}/{subtype}"] = self.objects[f"{ROOT_PATH}/{subtype}"]

    def introspect(self, path: str) -> str | None:
        children = {p[len(ROOT_PATH) + 1:] for p in self.objects}
        if path in self.objects or path in self.external:
            body = _HANDLER_XML + _PROPERTIES_XML + _INTROSPECT_XML
        elif path == ROOT_PATH:
            body = _MANAGER_XML + _INTROSPECT_XML + "".join(
                f'  <node name="{escape(c)}"/>\n' for c in sorted(children))
        elif ROOT_PATH.startswith(path.rstrip("/") + "/") or path == "/":
            nxt = ROOT_PATH[len(path.rstrip("/")) + 1:].split("/")[0]
            body = _INTROSPECT_XML + f'  <node name="{nxt}"/>\n'
        else:
            return None
        return ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"'
                ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
                f"<node>\n{body}</node>\n")

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        from jeepney import MessageFlag, MessageType, new_error, new_method_return
        from jeepney.low_level import HeaderFields

        if msg.header.message_type is not MessageType.method_call:
            return None
        fields = msg.header.fields
        path = fields.get(HeaderFields.path, "")
        iface = fields.get(HeaderFields.interface)
        member = fields.get(HeaderFields.member)
        try:
            answer = self._dispatch(path, iface, member, msg.body)
        except _DBusError as exc:
            reply = new_error(msg, exc.name, "s", (exc.text,))
        else:
            reply = new_method_return(msg, answer[0], answer[1])
        if msg.header.flags & MessageFlag.no_reply_expected:
            return None
        return reply

    def _dispatch(self, path: str, iface: str | None, member: str | None,
                  body: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        handler = self.objects.get(path) or self.external.get(path)
        if member == "Introspect" and iface in (None, INTROSPECTABLE):
            xml = self.introspect(path)
            if xml is not None:
                return "s", (xml,)
        elif path == ROOT_PATH and member == "GetManagedObjects" and iface in (
                None, OBJECT_MANAGER):
            return "a{oa{sa{sv}}}", (self.managed_objects(),)
        elif handler is not None and member == "CheckConfig" and iface in (None, HANDLER_IFACE):
            configstr = _arg_str(body, 0)
            return "bs", self.check_config(handler, configstr)
        elif handler is not None and iface == PROPERTIES and member in ("Get", "GetAll"):
            wanted = _arg_str(body, 0)
            props = self.properties(handler) if wanted in ("", HANDLER_IFACE) else {}
            if member == "GetAll":
                return "a{sv}", (props,)
            name = _arg_str(body, 1)
            if name not in props:
                raise _DBusError("org.freedesktop.DBus.Error.UnknownProperty",
                                 f"no property {name!r} on {wanted!r}")
            return "v", (props[name],)
        if path != ROOT_PATH and handler is None and self.introspect(path) is None:
            raise _DBusError("org.freedesktop.DBus.Error.UnknownObject", f"no object {path}")
        raise _DBusError("org.freedesktop.DBus.Error.UnknownMethod",
                         f"no method {iface}.{member} on {path}")


class _DBusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name, self.text = name, text


def _arg_str(body: tuple[Any, ...], i: int) -> str:
    if len(body) <= i or not isinstance(body[i], str):
        raise _DBusError("org.freedesktop.DBus.Error.InvalidArgs", f"argument {i}: a string")
    return body[i]


class DBusService:
    """`TcmuService` on a bus connection, served by a thread of its own. `start` returns False
    (and logs one line) when there is no bus or the name is taken; `serve` goes on without it."""

    def __init__(self, handlers: Mapping[str, type[Handler]], bus: str = "SYSTEM",
                 connect: Callable[[str], Any] | None = None) -> None:
        self.service = TcmuService(handlers)
        self.bus = bus
        self._connect = connect
        #: Subtypes registered with another owner's HandlerManager1 ([] when we own the name).
        self.registered: list[str] = []
        self._conn: Any = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe()

    def start(self) -> bool:
        try:
            from jeepney import DBusAddress, new_method_call
            from jeepney.io.blocking import open_dbus_connection
        except ImportError:  # pragma: no cover - a core dependency
            log.info("D-Bus service off: jeepney is not installed")
            return False
        try:
            conn = (self._connect or open_dbus_connection)(self.bus)
        except (OSError, ValueError, KeyError) as exc:
            log.info("D-Bus service off: no %s bus (%s); targetcli will not list tcmu-py's"
                     " subtypes", self.bus.lower(), exc)
            return False
        try:
            bus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                              interface="org.freedesktop.DBus")
            reply = conn.send_and_get_reply(
                new_method_call(bus, "RequestName", "su", (BUS_NAME, _DO_NOT_QUEUE)),
                timeout=10)
            code = reply.body[0] if reply.body else None
        except Exception as exc:  # noqa: BLE001 - refused by policy, bus gone: run without it
            conn.close()
            log.info("D-Bus service off: cannot own %s (%s)", BUS_NAME, exc)
            return False
        if code not in (_PRIMARY_OWNER, _ALREADY_OWNER):
            registered = self._register_with_owner(conn)
            if not registered:
                conn.close()
                log.info("D-Bus service off: %s is owned by another daemon that does not take "
                         "tcmu-py's subtypes; targetcli lists that daemon's subtypes only. %s",
                         BUS_NAME, RUNNER_NOTE)
                return False
            log.warning("D-Bus: %s is owned by another daemon (tcmu-runner); registered %s "
                        "with its HandlerManager1: targetcli lists them and it forwards "
                        "CheckConfig here. It answers the kernel's ADDED_DEVICE for them with "
                        "-ENOENT: kernel command replies go off", BUS_NAME,
                        ", ".join(registered))
            self.registered = registered
        else:
            log.info("D-Bus: %s on the %s bus (%s)", BUS_NAME, self.bus.lower(),
                     ", ".join(self.service.subtypes()))
        self._conn = conn
        self._thread = threading.Thread(target=self._run, name="tcmu-dbus", daemon=True)
        self._thread.start()
        return True

    def _register_with_owner(self, conn: Any) -> list[str]:
        """Join the daemon that owns the name (tcmu-runner) as an external handler: own
        ``HandlerManager1.<subtype>``, answer CheckConfig at its path, call RegisterHandler.
        Returns the subtypes it accepted ([] when it has no HandlerManager1)."""
        from jeepney import DBusAddress, MessageType, new_method_call

        bus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                          interface="org.freedesktop.DBus")
        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_IFACE)
        accepted: list[str] = []
        for subtype in self.service.subtypes():
            handler = self.service.objects[f"{ROOT_PATH}/{subtype}"]
            try:
                reply = conn.send_and_get_reply(new_method_call(
                    bus, "RequestName", "su", (f"{MANAGER_NAME}.{subtype}", _DO_NOT_QUEUE)),
                    timeout=10)
                if not reply.body or reply.body[0] not in (_PRIMARY_OWNER, _ALREADY_OWNER):
                    log.warning("D-Bus: %s.%s is taken; %s not registered", MANAGER_NAME,
                                subtype, subtype)
                    continue
                # Served before tcmu-runner is asked: it may call CheckConfig at once.
                self.service.export_external(subtype)
                desc = self.service.properties(handler)["ConfigDesc"][1]
                reply = conn.send_and_get_reply(new_method_call(
                    manager, "RegisterHandler", "ss", (subtype, desc)), timeout=10)
            except Exception as exc:  # noqa: BLE001 - no HandlerManager1, refused, timeout
                log.info("D-Bus: RegisterHandler(%s) on the owner of %s failed: %s", subtype,
                         BUS_NAME, exc)
                self.service.external.pop(f"{MANAGER_PATH}/{subtype}", None)
                continue
            if reply.header.message_type is MessageType.error:  # no HandlerManager1 there
                self.service.external.clear()
                log.debug("D-Bus: the owner of %s has no RegisterHandler: %s", BUS_NAME,
                          reply.body)
                return []
            ok, text = (tuple(reply.body) + (None, None))[:2]
            if ok is True:
                accepted.append(subtype)
            else:
                self.service.external.pop(f"{MANAGER_PATH}/{subtype}", None)
                log.warning("D-Bus: RegisterHandler(%s) refused: %s", subtype, text)
        return accepted

    def _run(self) -> None:
        name_os_thread()
        conn = self._conn
        try:
            while True:
                # jeepney may hold whole messages already read: drain before waiting.
                while True:
                    msg = conn.parser.get_next_message()
                    if msg is None:
                        break
                    self._answer(msg)
                ready, _, _ = select.select([conn.sock, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                try:
                    msg = conn.receive(timeout=0)
                except TimeoutError:
                    continue
                self._answer(msg)
        except (OSError, ConnectionError, ValueError) as exc:
            log.warning("D-Bus connection lost (%s); the service is off", exc)

    def _answer(self, msg: Any) -> None:
        try:
            reply = self.service.handle(msg)
        except Exception:  # noqa: BLE001 - a malformed call must not end the service
            log.exception("D-Bus: cannot answer a call")
            return
        if reply is not None:
            self._conn.send(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = -1
