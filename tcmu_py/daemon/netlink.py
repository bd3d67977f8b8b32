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

Wire encoding and decoding are this module's own (`parse_messages`, `build_reply`,
`build_set_features`, `_parse_attrs`: struct nlmsghdr, struct genlmsghdr and struct nlattr of
<linux/netlink.h> and <linux/genetlink.h>, pure functions with no I/O). They replaced pyroute2,
whose package import alone took 4.4 s of a daemon's start under the lab's emulation (140 ms on
the host): its ``__init__`` loads every netlink protocol it knows, and we use two messages. The
socket is a plain non-blocking netlink socket so the daemon can put `TcmuNetlink.fileno` in its
own selector, with no helper threads or event loops.
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

from tcmu_py.errors import TcmuError
from tcmu_py.uio import UioName

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
    "should_reply",
]

log = logging.getLogger(__name__)

FAMILY = "TCM-USER"
GROUP = "config"
FAMILY_VERSION = 2          # tcmu_genl_family.version
NETLINK_GENERIC = 16        # <linux/netlink.h>
SOL_NETLINK = 270           # <linux/socket.h>
NETLINK_ADD_MEMBERSHIP = 1  # <linux/netlink.h>

NLM_F_REQUEST = 0x1         # <linux/netlink.h>
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
GENL_ID_CTRL = 0x10         # <linux/genetlink.h>: the "nlctrl" family
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1     # NLA_U16
CTRL_ATTR_FAMILY_NAME = 2   # NLA_NUL_STRING
CTRL_ATTR_MCAST_GROUPS = 7  # nested: one nested attribute per group
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2  # NLA_U32
_NLA_TYPE_MASK = 0x3FFF     # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

# struct nlmsghdr: u32 len, u16 type, u16 flags, u32 seq, u32 pid
_NLMSGHDR = struct.Struct("=IHHII")
# struct genlmsghdr: u8 cmd, u8 version, u16 reserved
_GENLMSGHDR = struct.Struct("=BBH")
# struct nlattr: u16 nla_len (header included, padding not), u16 nla_type
_NLATTR = struct.Struct("=HH")
# struct nlmsgerr: int error, then the offending nlmsghdr
_NLMSGERR = struct.Struct("=i")
_U8, _U16, _U32, _S32, _U64 = (struct.Struct(f) for f in ("=B", "=H", "=I", "=i", "=Q"))


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


class NetlinkError(TcmuError, OSError):
    """A netlink operation failed; ``errno`` is set when the kernel said why."""


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
        """The parts of ``device`` (ValueError if it is not a TCMU uio name)."""
        return UioName.parse(self.device)

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


def _align(n: int) -> int:
    """NLMSG_ALIGN / NLA_ALIGN: 4 bytes."""
    return (n + 3) & ~3


def _parse_attrs(data: bytes, off: int = 0) -> dict[int, bytes]:
    """The attributes (struct nlattr) from `off` to the end of `data`, by type (flags masked
    off; a repeated type keeps its first payload). A truncated or malformed attribute ends the
    parse: the ones before it are kept."""
    attrs: dict[int, bytes] = {}
    while off + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, off)
        if length < _NLATTR.size or off + length > len(data):
            break
        attrs.setdefault(kind & _NLA_TYPE_MASK, data[off + _NLATTR.size:off + length])
        off += _align(length)
    return attrs


def _nla(kind: int, payload: bytes) -> bytes:
    """One struct nlattr with its payload, padded to 4 bytes."""
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _string(payload: bytes) -> str:
    """An NLA_STRING / NLA_NUL_STRING payload: up to its first NUL."""
    return payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(attrs: dict[int, bytes], kind: int, fmt: struct.Struct) -> int | None:
    """The integer attribute `kind` of format `fmt`, None if absent or of another size."""
    payload = attrs.get(kind)
    if payload is None or len(payload) < fmt.size:
        return None
    return int(fmt.unpack_from(payload)[0])


def _decode_event(chunk: bytes, seq: int) -> DeviceEvent | None:
    if len(chunk) < _NLMSGHDR.size + _GENLMSGHDR.size:
        return None
    try:
        cmd = TcmuCmd(chunk[_NLMSGHDR.size])
    except ValueError:
        return None
    if cmd not in DONE_FOR:
        return None
    attrs = _parse_attrs(chunk, _NLMSGHDR.size + _GENLMSGHDR.size)
    device = attrs.get(TcmuAttr.DEVICE)
    minor = _number(attrs, TcmuAttr.MINOR, _U32)
    dev_id = _number(attrs, TcmuAttr.DEVICE_ID, _U32)
    if device is None or minor is None or dev_id is None:
        log.warning("TCM-USER %s event without DEVICE/MINOR/DEVICE_ID ignored", cmd.name)
        return None
    cfg = attrs.get(TcmuAttr.DEV_CFG)
    wc = _number(attrs, TcmuAttr.WRITECACHE, _U8)
    return DeviceEvent(cmd, _string(device), minor, dev_id,
                       None if cfg is None else _string(cfg),
                       _number(attrs, TcmuAttr.DEV_SIZE, _U64),
                       None if wc is None else bool(wc), seq)


def _build(family_id: int, cmd: int, version: int, attrs: bytes, seq: int, flags: int) -> bytes:
    """One generic netlink message: nlmsghdr (port id 0: the kernel fills ours in), genlmsghdr,
    then the already encoded attributes."""
    body = _GENLMSGHDR.pack(cmd, version, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family_id, flags, seq, 0) + body


def build_reply(family_id: int, event: DeviceEvent, status: int, seq: int,
                flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """The *_DONE message answering ``event``: CMD_STATUS ``status`` (0 or -errno) and the
    event's DEVICE_ID (tcmu_genl_cmd_done() needs both)."""
    if status > 0:
        raise ValueError(f"status must be 0 or -errno, got {status}")
    return _build(family_id, DONE_FOR[event.cmd], FAMILY_VERSION,
                  _nla(TcmuAttr.CMD_STATUS, _S32.pack(status))
                  + _nla(TcmuAttr.DEVICE_ID, _U32.pack(event.device_id)), seq, flags)


def build_set_features(family_id: int, seq: int, kern_cmd_reply: bool = True,
                       flags: int = NLM_F_REQUEST | NLM_F_ACK) -> bytes:
    """SET_FEATURES(SUPP_KERN_CMD_REPLY): with 1, the kernel waits for our replies."""
    return _build(family_id, TcmuCmd.SET_FEATURES, FAMILY_VERSION,
                  _nla(TcmuAttr.SUPP_KERN_CMD_REPLY, _U8.pack(int(kern_cmd_reply))), seq, flags)


def should_reply(event: DeviceEvent, served: Container[str],
                 no_reply: Container[str] = ()) -> bool:
    """True if this daemon must answer ``event``: its subtype is one we serve, and the device is
    not one created with ``nl_reply_supported=-1`` (``no_reply`` holds their LIO names).
    Never answering for other subtypes keeps a tcmu-runner on the same host working."""
    try:
        uio = event.uio
    except ValueError:
        return False
    return uio.subtype in served and uio.device not in no_reply


class TcmuNetlink:
    """A non-blocking TCM-USER socket joined to the "config" group.

    Use from one thread at a time (the daemon's loop receives and the threads handling the
    events reply, all under one lock): put `fileno` in a selector, call `receive` when it is
    readable, and `reply` to each event `should_reply` accepts. ``family``/``group`` exist so
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
        seq = self._next_seq()
        name = self.family_name.encode() + b"\0"
        self._sock.send(_build(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1,
                               _nla(CTRL_ATTR_FAMILY_NAME, name), seq, NLM_F_REQUEST))
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
        attrs = _parse_attrs(data[:length], _NLMSGHDR.size + _GENLMSGHDR.size)
        self.family_id = _number(attrs, CTRL_ATTR_FAMILY_ID, _U16) or 0
        groups = _parse_attrs(attrs.get(CTRL_ATTR_MCAST_GROUPS, b""))
        for group in groups.values():
            fields = _parse_attrs(group)
            if _string(fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"")) == self.group_name:
                self.group_id = _number(fields, CTRL_ATTR_MCAST_GRP_ID, _U32) or 0
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

