"""TCM-USER netlink: messages built byte by byte as the kernel does, parsed; replies checked
field by field; the socket class driven over a socketpair and (family lookup) the host kernel."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.daemon.netlink import (
    DeviceEvent,
    NetlinkAck,
    NetlinkError,
    TcmuAttr,
    TcmuCmd,
    TcmuNetlink,
    UioName,
    build_reply,
    build_set_features,
    parse_messages,
    parse_uio_name,
    should_reply,
)

FAMILY_ID = 0x1F
NLMSG_ERROR = 2


def nla(attr: int, payload: bytes) -> bytes:
    """struct nlattr {u16 nla_len; u16 nla_type} + payload, padded to 4 (NLA_ALIGN)."""
    raw = struct.pack("=HH", 4 + len(payload), attr) + payload
    return raw + b"\0" * (-len(raw) % 4)


def kernel_event(cmd: int, device: str, minor: int, dev_id: int, *extra: bytes,
                 seq: int = 0, family: int = FAMILY_ID) -> bytes:
    """What tcmu_netlink_event_init() + genlmsg_put() produce: nlmsghdr, genlmsghdr (cmd,
    version 2), DEVICE string (NUL-terminated), MINOR u32, DEVICE_ID u32, then extras."""
    body = struct.pack("=BBH", cmd, 2, 0)
    body += nla(TcmuAttr.DEVICE, device.encode() + b"\0")
    body += nla(TcmuAttr.MINOR, struct.pack("=I", minor))
    body += nla(TcmuAttr.DEVICE_ID, struct.pack("=I", dev_id))
    body += b"".join(extra)
    return struct.pack("=IHHII", 16 + len(body), family, 0, seq, 0) + body


def nlmsg_error(err: int, req_seq: int) -> bytes:
    echoed = struct.pack("=IHHII", 36, FAMILY_ID, 5, req_seq, 1234)
    body = struct.pack("=i", err) + echoed
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, 0, req_seq, 0) + body


def parse_attrs(data: bytes) -> tuple[tuple[int, int, int, int, int], tuple[int, int],
                                      dict[int, bytes]]:
    hdr = struct.unpack_from("=IHHII", data, 0)
    cmd, version, _ = struct.unpack_from("=BBH", data, 16)
    attrs: dict[int, bytes] = {}
    off = 20
    while off < hdr[0]:
        ln, typ = struct.unpack_from("=HH", data, off)
        attrs[typ] = data[off + 4:off + ln]
        off += (ln + 3) & ~3
    return hdr, (cmd, version), attrs


DEV = "tcm-user/3/disk0/raw//var/lib/tcmu-py/disk0.img"


def test_added_event_decodes() -> None:
    (ev,) = parse_messages(kernel_event(1, DEV, 7, 42, seq=5), FAMILY_ID)
    assert ev == DeviceEvent(TcmuCmd.ADDED_DEVICE, DEV, 7, 42, seq=5)
    assert isinstance(ev, DeviceEvent)
    assert ev.subtype == "raw" and ev.uio == UioName(3, "disk0", "raw//var/lib/tcmu-py/disk0.img")


@pytest.mark.parametrize(("extra", "field", "value"), [
    (nla(TcmuAttr.DEV_CFG, b"raw//new/path\0"), "dev_cfg", "raw//new/path"),
    (nla(TcmuAttr.DEV_SIZE, struct.pack("=Q", 1 << 40)), "dev_size", 1 << 40),
    # nla_put_u64_64bit() may put a PAD attribute first on strict-alignment architectures.
    (nla(TcmuAttr.PAD, b"") + nla(TcmuAttr.DEV_SIZE, struct.pack("=Q", 5 << 30)), "dev_size",
     5 << 30),
    (nla(TcmuAttr.WRITECACHE, b"\x01"), "writecache", True),
    (nla(TcmuAttr.WRITECACHE, b"\x00"), "writecache", False),
])
def test_reconfig_event_decodes(extra: bytes, field: str, value: object) -> None:
    (ev,) = parse_messages(kernel_event(3, DEV, 0, 1, extra), FAMILY_ID)
    assert isinstance(ev, DeviceEvent) and ev.cmd is TcmuCmd.RECONFIG_DEVICE
    assert getattr(ev, field) == value
    others = {"dev_cfg", "dev_size", "writecache"} - {field}
    assert all(getattr(ev, f) is None for f in others)


def test_several_messages_in_one_datagram_and_foreign_ones_skipped() -> None:
    data = (kernel_event(1, DEV, 0, 1) + kernel_event(1, DEV, 0, 9, family=FAMILY_ID + 1)
            + nlmsg_error(-errno.EINVAL, 77) + kernel_event(2, DEV, 0, 1)
            + kernel_event(4, DEV, 0, 1))  # a *_DONE (ours, echoed): not an event
    items = parse_messages(data, FAMILY_ID)
    assert [type(i).__name__ for i in items] == ["DeviceEvent", "NetlinkAck", "DeviceEvent"]
    assert items[1] == NetlinkAck(77, -errno.EINVAL)
    assert isinstance(items[2], DeviceEvent) and items[2].cmd is TcmuCmd.REMOVED_DEVICE


def test_truncated_message_stops_parse() -> None:
    whole = kernel_event(1, DEV, 0, 1)
    assert parse_messages(whole + whole[:-4], FAMILY_ID) == parse_messages(whole, FAMILY_ID)


def test_event_missing_device_id_is_dropped() -> None:
    body = struct.pack("=BBH", 1, 2, 0) + nla(TcmuAttr.DEVICE, DEV.encode() + b"\0")
    data = struct.pack("=IHHII", 16 + len(body), FAMILY_ID, 0, 0, 0) + body
    assert parse_messages(data, FAMILY_ID) == []


@pytest.mark.parametrize(("cmd", "done"), [(1, 4), (2, 5), (3, 6)])
@pytest.mark.parametrize("status", [0, -errno.EINVAL, -errno.ENODEV])
def test_reply_wire_format(cmd: int, done: int, status: int) -> None:
    ev = DeviceEvent(TcmuCmd(cmd), DEV, 0, 0xDEADBEEF)
    data = build_reply(FAMILY_ID, ev, status, seq=99)
    hdr, (gcmd, version), attrs = parse_attrs(data)
    assert hdr[0] == len(data) and hdr[1] == FAMILY_ID and hdr[3] == 99
    assert hdr[2] & 0x1  # NLM_F_REQUEST
    assert (gcmd, version) == (done, 2)
    # tcmu_genl_cmd_done(): nla_get_s32(CMD_STATUS), nla_get_u32(DEVICE_ID)
    assert set(attrs) == {TcmuAttr.CMD_STATUS, TcmuAttr.DEVICE_ID}
    assert struct.unpack("=i", attrs[TcmuAttr.CMD_STATUS]) == (status,)
    assert struct.unpack("=I", attrs[TcmuAttr.DEVICE_ID]) == (0xDEADBEEF,)


def test_reply_rejects_positive_status() -> None:
    with pytest.raises(ValueError):
        build_reply(FAMILY_ID, DeviceEvent(TcmuCmd.ADDED_DEVICE, DEV, 0, 1), 5, 1)


@pytest.mark.parametrize("on", [True, False])
def test_set_features_wire_format(on: bool) -> None:
    hdr, (gcmd, version), attrs = parse_attrs(build_set_features(FAMILY_ID, 3, on))
    assert (gcmd, version) == (TcmuCmd.SET_FEATURES, 2)
    assert attrs == {TcmuAttr.SUPP_KERN_CMD_REPLY: bytes([int(on)])}


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_event_round_trip(cfg: str, minor: int, dev_id: int, size: int) -> None:
    name = f"tcm-user/0/d/{cfg}"
    data = kernel_event(3, name, minor, dev_id, nla(TcmuAttr.DEV_SIZE, struct.pack("=Q", size)))
    (ev,) = parse_messages(data, FAMILY_ID)
    assert ev == DeviceEvent(TcmuCmd.RECONFIG_DEVICE, name, minor, dev_id, dev_size=size)


@pytest.mark.parametrize(("name", "want"), [
    ("tcm-user/0/disk0/raw//img", UioName(0, "disk0", "raw//img")),
    ("tcm-user/12/t/thin/pool=a;unit=64K", UioName(12, "t", "thin/pool=a;unit=64K")),
    ("tcm-user/1/nocfg", UioName(1, "nocfg", "")),
])
def test_parse_uio_name(name: str, want: UioName) -> None:
    assert parse_uio_name(name) == want


def test_uio_name_parts() -> None:
    u = parse_uio_name("tcm-user/0/disk0/raw//var/x.img")
    assert (u.subtype, u.cfgstring) == ("raw", "/var/x.img")
    assert parse_uio_name("tcm-user/1/n").subtype == ""


@pytest.mark.parametrize("bad", ["uio0", "tcm-user/x/d/raw/", "tcm-user/0//raw/", "tcm-user/0"])
def test_parse_uio_name_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_uio_name(bad)


@pytest.mark.parametrize(("device", "served", "no_reply", "want"), [
    ("tcm-user/0/d/raw//x", {"raw"}, set(), True),
    ("tcm-user/0/d/qcow//x", {"raw"}, set(), False),         # tcmu-runner's: leave it alone
    ("tcm-user/0/d/raw//x", {"raw"}, {"d"}, False),          # created with nl_reply_supported=-1
    ("tcm-user/0/d", {"raw"}, set(), False),                 # no dev_config: no subtype
    ("garbage", {"raw"}, set(), False),
])
def test_should_reply(device: str, served: set[str], no_reply: set[str], want: bool) -> None:
    assert should_reply(DeviceEvent(TcmuCmd.ADDED_DEVICE, device, 0, 1), served, no_reply) is want


def test_socket_receive_and_reply_over_socketpair() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with TcmuNetlink.attach(ours, FAMILY_ID) as nl:
        assert nl.receive() == []                        # non-blocking when idle
        kernel.send(kernel_event(1, DEV, 2, 11))
        kernel.send(kernel_event(3, DEV, 2, 11, nla(TcmuAttr.WRITECACHE, b"\x01")))
        evs = nl.receive()
        assert [e.cmd for e in evs] == [TcmuCmd.ADDED_DEVICE, TcmuCmd.RECONFIG_DEVICE]
        nl.reply(evs[0], 0)
        nl.reply(evs[1], -errno.EINVAL)
        first, second = kernel.recv(4096), kernel.recv(4096)
        h1, c1, a1 = parse_attrs(first)
        h2, c2, a2 = parse_attrs(second)
        assert c1[0] == TcmuCmd.ADDED_DEVICE_DONE and c2[0] == TcmuCmd.RECONFIG_DEVICE_DONE
        assert struct.unpack("=I", a1[TcmuAttr.DEVICE_ID]) == (11,)
        assert struct.unpack("=i", a2[TcmuAttr.CMD_STATUS]) == (-errno.EINVAL,)
        assert h1[3] != h2[3]                             # distinct sequence numbers
        # The kernel's ACK for the second reply: consumed, not returned as an event.
        kernel.send(nlmsg_error(0, h1[3]) + nlmsg_error(-errno.EINVAL, h2[3]))
        assert nl.receive() == []
        assert nl._pending == {}
    kernel.close()


def test_reply_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with TcmuNetlink.attach(ours, FAMILY_ID) as nl:
        ev = DeviceEvent(TcmuCmd.REMOVED_DEVICE, DEV, 0, 4)
        nl.reply(ev)
        seq = parse_attrs(kernel.recv(4096))[0][3]
        kernel.send(nlmsg_error(-errno.ENODEV, seq))
        nl.receive()
    kernel.close()
    assert "REMOVED_DEVICE_DONE for " + DEV in caplog.text
    assert "No such device" in caplog.text


def _netlink_available() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _netlink_available(), reason="no AF_NETLINK on this host")
def test_family_lookup_against_host_kernel() -> None:
    # nlctrl always exists and has the multicast group "notify": exercises GETFAMILY parsing
    # and group membership on a real kernel.
    with TcmuNetlink(family="nlctrl", group="notify") as nl:
        assert nl.family_id == 0x10 and nl.group_id > 0
        assert nl.receive() == []
    with pytest.raises(NetlinkError) as ei:
        TcmuNetlink(family="nlctrl", group="no-such-group")
    assert ei.value.errno == errno.ENOENT


@pytest.mark.skipif(not _netlink_available(), reason="no AF_NETLINK on this host")
def test_missing_family_names_the_module() -> None:
    if os.path.exists("/sys/module/target_core_user"):
        pytest.skip("target_core_user is loaded here")
    with pytest.raises(NetlinkError) as ei:
        TcmuNetlink()
    assert ei.value.errno == errno.ENOENT and "target_core_user" in str(ei.value)


@pytest.mark.skipif(not _netlink_available(), reason="no AF_NETLINK on this host")
def test_messages_from_userspace_ports_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    """Any local process can unicast to our port id: a forged ADDED/REMOVED event or a forged
    ACK must not be taken for the kernel's (sender port id 0)."""
    ours = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    ours.bind((0, 0))
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)
    forger.bind((0, 0))
    with TcmuNetlink.attach(ours, FAMILY_ID) as nl, forger:
        seq = 77
        nl._pending[seq] = DeviceEvent(TcmuCmd.ADDED_DEVICE, DEV, 0, 4)  # a reply in flight
        port = ours.getsockname()[0]
        forger.sendto(kernel_event(TcmuCmd.REMOVED_DEVICE, DEV, 2, 11), (port, 0))
        forger.sendto(kernel_event(TcmuCmd.ADDED_DEVICE, DEV, 3, 12), (port, 0))
        forger.sendto(nlmsg_error(0, seq), (port, 0))
        assert nl.receive() == []
        assert nl.spoofed == 3
        assert seq in nl._pending  # the forged ACK did not count
    assert "dropped a message from userspace port" in caplog.text
