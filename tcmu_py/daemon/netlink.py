"""TCM-USER generic netlink: device events from target_core_user and our *_DONE replies.

Facts (drivers/target/target_core_user.c, include/uapi/linux/target_core_user.h):

- Family "TCM-USER", version 2, one multicast group "config". Every event carries DEVICE (the
  uio name ``tcm-user/<hba>/<name>/<dev_config>``), MINOR (uio minor) and DEVICE_ID (the LIO
  se_device index); RECONFIG_DEVICE adds exactly one of DEV_CFG, DEV_SIZE or WRITECACHE.
- Once any process sends SET_FEATURES(SUPP_KERN_CMD_REPLY=1), the kernel waits, without a
  timeout, for a *_DONE reply carrying CMD_STATUS (s32, 0 or -errno) and DEVICE_ID (u32) after
  each event for a device whose ``nl_reply_supported`` is >= 0. The configfs write that caused
  the event blocks until then, and CMD_STATUS becomes its result.
- Devices created with ``nl_reply_supported=-1`` (what tcmu-py does itself) are never waited
  for; a reply for them is an error (the kernel logs "Mismatched commands" or "could not find
  device" and acks -EINVAL / -ENODEV). So: reply only for subtypes we serve, and never for
  devices created with -1 (`should_reply`).
- Replies and SET_FEATURES need CAP_NET_ADMIN (GENL_ADMIN_PERM).
- Any process may send a datagram to our socket's port id (netlink unicast to a userspace port
  needs no privilege); only the kernel sends from port id 0. A message from any other port
  would let a local user fake ADDED/REMOVED events or ACKs: it is dropped and logged
  (`TcmuNetlink.receive`, and the family lookup at open).

Wire encoding and decoding is pyroute2's (``genlmsg`` with our ``nla_map``); this module owns only
a plain non-blocking netlink socket so the daemon can put `TcmuNetlink.fileno` in its own
selector, with no helper threads or event loops.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Container
from dataclasses import dataclass
from enum import IntEnum

from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    ctrlmsg,
    genlmsg,
)

from tcmu_py.errors import TcmuError

__all__ = [
    "DONE_FOR",
    "DeviceEvent",
    "NetlinkAck",
    "NetlinkError",
    "TcmuAttr",
    "TcmuCmd",
    "TcmuNetlink",
    "UioName",
    "build_reply",
    "build_set_features",
    "parse_messages",
    "parse_uio_name",
    "should_reply",
    "tcmu_msg",
]

log = logging.getLogger(__name__)

FAMILY = "TCM-USER"
GROUP = "config"
FAMILY_VERSION = 2          # tcmu_genl_family.version
NETLINK_GENERIC = 16        # <linux/netlink.h>
SOL_NETLINK = 270           # <linux/socket.h>
NETLINK_ADD_MEMBERSHIP = 1  # <linux/netlink.h>

# struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid
_NLMSGHDR = struct.Struct("=IHHII")
# struct nlmsgerr: int error, then the offending nlmsghdr
_NLMSGERR = struct.Struct("=i")


class TcmuCmd(IntEnum):
    """enum tcmu_genl_cmd."""

    UNSPEC = 0
    ADDED_DEVICE = 1
    REMOVED_DEVICE = 2
    RECONFIG_DEVICE = 3
    ADDED_DEVICE_DONE = 4
    REMOVED_DEVICE_DONE = 5
    RECONFIG_DEVICE_DONE = 6
    SET_FEATURES = 7


class TcmuAttr(IntEnum):
    """enum tcmu_genl_attr."""

    UNSPEC = 0
    DEVICE = 1
    MINOR = 2
    PAD = 3
    DEV_CFG = 4
    DEV_SIZE = 5
    WRITECACHE = 6
    CMD_STATUS = 7
    DEVICE_ID = 8
    SUPP_KERN_CMD_REPLY = 9


DONE_FOR = {
    TcmuCmd.ADDED_DEVICE: TcmuCmd.ADDED_DEVICE_DONE,
    TcmuCmd.REMOVED_DEVICE: TcmuCmd.REMOVED_DEVICE_DONE,
    TcmuCmd.RECONFIG_DEVICE: TcmuCmd.RECONFIG_DEVICE_DONE,
}


class tcmu_msg(genlmsg):  # noqa: N801 - pyroute2 naming convention for message classes
    """A TCM-USER generic netlink message; attribute order follows enum tcmu_genl_attr."""

    prefix = "TCMU_ATTR_"
    nla_map = (
        ("TCMU_ATTR_UNSPEC", "none"),
        ("TCMU_ATTR_DEVICE", "asciiz"),              # NLA_STRING
        ("TCMU_ATTR_MINOR", "uint32"),               # NLA_U32
        ("TCMU_ATTR_PAD", "hex"),
        ("TCMU_ATTR_DEV_CFG", "asciiz"),             # nla_put_string
        ("TCMU_ATTR_DEV_SIZE", "uint64"),            # nla_put_u64_64bit
        ("TCMU_ATTR_WRITECACHE", "uint8"),           # nla_put_u8
        ("TCMU_ATTR_CMD_STATUS", "int32"),           # NLA_S32
        ("TCMU_ATTR_DEVICE_ID", "uint32"),           # NLA_U32
        ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", "uint8"),  # NLA_U8
    )


class NetlinkError(TcmuError, OSError):
    """A netlink operation failed; ``errno`` is set when the kernel said why."""


@dataclass(frozen=True)
class UioName:
    """The parts of a TCMU uio name ``tcm-user/<hba>/<name>/<dev_config>``.

    ``subtype`` is the first path element of dev_config and ``cfgstring`` the rest (for
    ``raw//var/x.img``: subtype ``raw``, cfgstring ``/var/x.img``); both are "" when the device
    was enabled without a dev_config.
    """

    hba: int
    name: str
    dev_config: str

    @property
    def subtype(self) -> str:
        return self.dev_config.partition("/")[0]

    @property
    def cfgstring(self) -> str:
        return self.dev_config.partition("/")[2]


def parse_uio_name(uio_name: str) -> UioName:
    """Split a uio name; raises ValueError if it is not a tcm-user name.

    tcmu_update_uio_info(): "tcm-user/%u/%s/%s" (hba host_id, device name, dev_config), or
    "tcm-user/%u/%s" without a dev_config. dev_config itself may contain '/'.
    """
    parts = uio_name.split("/", 3)
    if len(parts) < 3 or parts[0] != "tcm-user" or not parts[1].isdigit() or not parts[2]:
        raise ValueError(f"not a TCMU uio name: {uio_name!r}")
    return UioName(int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")


@dataclass(frozen=True)
class DeviceEvent:
    """One ADDED / REMOVED / RECONFIG event. For RECONFIG exactly one of ``dev_cfg`` (new
    dev_config), ``dev_size`` (bytes) or ``writecache`` is set; ``device`` is the uio name as it
    was *before* the change (the kernel renames the uio device after replying)."""

    cmd: TcmuCmd
    device: str
    minor: int
    device_id: int
    dev_cfg: str | None = None
    dev_size: int | None = None
    writecache: bool | None = None
    seq: int = 0

    @property
    def uio(self) -> UioName:
        return parse_uio_name(self.device)

    @property
    def subtype(self) -> str:
        """Handler subtype of the device ("" if the name is not a TCMU name)."""
        try:
            return self.uio.subtype
        except ValueError:
            return ""


@dataclass(frozen=True)
class NetlinkAck:
    """An NLMSG_ERROR message: ``error`` 0 is an ACK, otherwise -errno for request ``seq``."""

    seq: int
    error: int


def parse_messages(data: bytes, family_id: int) -> list[DeviceEvent | NetlinkAck]:
    """Decode every netlink message in one datagram. Messages of other families / unknown
    commands are skipped; a truncated message ends the parse (the rest is dropped)."""
    out: list[DeviceEvent | NetlinkAck] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        chunk = data[off:off + length]
        if mtype == NLMSG_ERROR and length >= _NLMSGHDR.size + _NLMSGERR.size:
            (err,) = _NLMSGERR.unpack_from(chunk, _NLMSGHDR.size)
            # The echoed header names the request this error answers.
            req_seq = seq
            if length >= _NLMSGHDR.size * 2 + _NLMSGERR.size:
                req_seq = _NLMSGHDR.unpack_from(chunk, _NLMSGHDR.size + _NLMSGERR.size)[3]
            out.append(NetlinkAck(req_seq, err))
        elif mtype == family_id:
            ev = _decode_event(chunk, seq)
            if ev is not None:
                out.append(ev)
        # NLMSG_DONE / NLMSG_NOOP / other families: nothing to do.
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return out


def _decode_event(chunk: bytes, seq: int) -> DeviceEvent | None:
    msg = tcmu_msg(chunk)
    msg.decode()
    try:
        cmd = TcmuCmd(msg["cmd"])
    except ValueError:
        return None
    if cmd not in DONE_FOR:
        return None
    device = msg.get_attr("TCMU_ATTR_DEVICE")
    minor = msg.get_attr("TCMU_ATTR_MINOR")
    dev_id = msg.get_attr("TCMU_ATTR_DEVICE_ID")
    if device is None or minor is None or dev_id is None:
        log.warning("TCM-USER %s event without DEVICE/MINOR/DEVICE_ID ignored", cmd.name)
        return None
    wc = msg.get_attr("TCMU_ATTR_WRITECACHE")
    return DeviceEvent(cmd, device, minor, dev_id, msg.get_attr("TCMU_ATTR_DEV_CFG"),
                       msg.get_attr("TCMU_ATTR_DEV_SIZE"), None if wc is None else bool(wc), seq)


def _build(family_id: int, cmd: TcmuCmd, attrs: list[tuple[str, int]], seq: int,
           flags: int) -> bytes:
    msg = tcmu_msg()
    msg["cmd"] = cmd
    msg["version"] = FAMILY_VERSION
    msg["attrs"] = [list(a) for a in attrs]
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def build_reply(family_id: int, event: DeviceEvent, status: int, seq: int,
                flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """The *_DONE message answering ``event``: CMD_STATUS ``status`` (0 or -errno) and the
    event's DEVICE_ID (tcmu_genl_cmd_done() needs both)."""
    if status > 0:
        raise ValueError(f"status must be 0 or -errno, got {status}")
    return _build(family_id, DONE_FOR[event.cmd],
                  [("TCMU_ATTR_CMD_STATUS", status), ("TCMU_ATTR_DEVICE_ID", event.device_id)],
                  seq, flags)


def build_set_features(family_id: int, seq: int, kern_cmd_reply: bool = True,
                       flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """SET_FEATURES(SUPP_KERN_CMD_REPLY): with 1, the kernel waits for our replies."""
    return _build(family_id, TcmuCmd.SET_FEATURES,
                  [("TCMU_ATTR_SUPP_KERN_CMD_REPLY", int(kern_cmd_reply))], seq, flags)


def should_reply(event: DeviceEvent, served: Container[str],
                 no_reply: Container[str] = ()) -> bool:
    """True if this daemon must answer ``event``: its subtype is one we serve, and the device is
    not one created with ``nl_reply_supported=-1`` (``no_reply`` holds their LIO names).
    Never answering for other subtypes keeps a tcmu-runner on the same host working."""
    try:
        uio = event.uio
    except ValueError:
        return False
    return uio.subtype in served and uio.name not in no_reply


class TcmuNetlink:
    """A non-blocking TCM-USER socket joined to the "config" group.

    Use from one thread (the daemon's loop): put `fileno` in a selector, call `receive` when it
    is readable, and `reply` to each event `should_reply` accepts. ``family``/``group`` exist so
    tests can bind another family; leave them alone otherwise.
    """

    def __init__(self, family: str = FAMILY, group: str = GROUP) -> None:
        self._setup(family, group)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._resolve()
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.group_id)
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def _setup(self, family: str, group: str) -> None:
        self.family_name = family
        self.group_name = group
        self.family_id = 0
        self.group_id = 0
        self.overruns = 0
        #: Messages dropped because they came from a userspace port, not the kernel.
        self.spoofed = 0
        self._seq = 0
        self._pending: dict[int, DeviceEvent | None] = {}

    @classmethod
    def attach(cls, sock: socket.socket, family_id: int) -> TcmuNetlink:
        """Wrap a socket that is already bound and joined (tests use a socketpair)."""
        self = cls.__new__(cls)
        self._setup(FAMILY, GROUP)
        self._sock = sock
        self.family_id = family_id
        sock.setblocking(False)
        return self

    # ------------------------------------------------------------------ setup

    def _next_seq(self) -> int:
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        return self._seq

    def _from_kernel(self, address: object) -> bool:
        """Whether a datagram came from the kernel (netlink port id 0). Sockets given to
        `attach` that are not netlink sockets (tests' socketpairs) have no sender to check."""
        if self._sock.family != socket.AF_NETLINK:
            return True
        if isinstance(address, tuple) and address and address[0] == 0:
            return True
        self.spoofed += 1
        log.warning("TCM-USER netlink: dropped a message from userspace port %s (only the "
                    "kernel, port 0, sends events)", address[0] if isinstance(address, tuple)
                    else address)
        return False

    def _resolve(self) -> None:
        """CTRL_CMD_GETFAMILY: family id and multicast group id (blocking, at open)."""
        req = ctrlmsg()
        req["cmd"] = CTRL_CMD_GETFAMILY
        req["version"] = 1
        req["attrs"] = [["CTRL_ATTR_FAMILY_NAME", self.family_name]]
        req["header"]["type"] = GENL_ID_CTRL
        req["header"]["flags"] = NLM_F_REQUEST
        req["header"]["sequence_number"] = seq = self._next_seq()
        req.encode()
        self._sock.send(req.data)
        for _ in range(64):  # skip what other processes may send to our port meanwhile
            data, address = self._sock.recvfrom(65536)
            if self._from_kernel(address):
                break
        else:
            raise NetlinkError(errno.EPROTO, "no reply from the kernel to CTRL_CMD_GETFAMILY")
        length, mtype, _f, rseq, _p = _NLMSGHDR.unpack_from(data, 0)
        if mtype == NLMSG_ERROR:
            (err,) = _NLMSGERR.unpack_from(data, _NLMSGHDR.size)
            hint = (" (is target_core_user loaded?)" if err == -errno.ENOENT else "")
            raise NetlinkError(-err, f"generic netlink family {self.family_name!r}: "
                               f"{os.strerror(-err)}{hint}")
        if mtype != GENL_ID_CTRL or rseq != seq:
            raise NetlinkError(errno.EPROTO, f"unexpected reply type {mtype} seq {rseq}")
        msg = ctrlmsg(data[:length])
        msg.decode()
        self.family_id = msg.get_attr("CTRL_ATTR_FAMILY_ID")
        for grp in msg.get_attr("CTRL_ATTR_MCAST_GROUPS", []) or []:
            if grp.get_attr("CTRL_ATTR_MCAST_GRP_NAME") == self.group_name:
                self.group_id = grp.get_attr("CTRL_ATTR_MCAST_GRP_ID")
        if not self.group_id:
            raise NetlinkError(errno.ENOENT, f"family {self.family_name!r} has no multicast"
                               f" group {self.group_name!r}")

    def set_features(self, kern_cmd_reply: bool = True) -> None:
        """Tell the kernel we answer events (from now on it waits for replies; see module doc).
        The kernel's verdict arrives as an ACK through `receive`."""
        seq = self._next_seq()
        self._pending[seq] = None
        self._sock.send(build_set_features(self.family_id, seq, kern_cmd_reply))

    # ------------------------------------------------------------------ events

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[DeviceEvent]:
        """Everything queued now, without blocking. ACKs for our replies are consumed here (a
        failed reply is logged with the event it answered). ENOBUFS means the kernel dropped
        events: `overruns` is incremented and the caller should rescan /sys/class/uio. A
        message that does not come from the kernel is dropped and counted in `spoofed`."""
        events: list[DeviceEvent] = []
        while True:
            try:
                data, address = self._sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("TCM-USER netlink receive buffer overrun: events were lost")
                    continue
                raise
            if not self._from_kernel(address):
                continue
            for item in parse_messages(data, self.family_id):
                if isinstance(item, NetlinkAck):
                    self._acked(item)
                else:
                    events.append(item)

    def _acked(self, ack: NetlinkAck) -> None:
        if ack.seq not in self._pending:
            return
        ev = self._pending.pop(ack.seq)
        if ack.error == 0:
            return
        what = "SET_FEATURES" if ev is None else f"{DONE_FOR[ev.cmd].name} for {ev.device}"
        log.error("kernel refused %s: %s", what, os.strerror(-ack.error))

    def reply(self, event: DeviceEvent, status: int = 0) -> None:
        """Send the *_DONE for ``event`` with CMD_STATUS ``status`` (0 or -errno): the kernel
        returns it to whoever wrote configfs (e.g. -EINVAL fails `enable`)."""
        seq = self._next_seq()
        self._pending[seq] = event
        if len(self._pending) > 1024:  # ACKs never came (should not happen); bound the memory
            self._pending.pop(next(iter(self._pending)))
        self._sock.send(build_reply(self.family_id, event, status, seq))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> TcmuNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

