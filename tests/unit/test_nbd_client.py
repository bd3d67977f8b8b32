"""The libnbd binding (tcmu_py.handlers.mirror.nbd) against a real nbdkit memory server."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbdkit_server import NbdkitServer

from tcmu_py.handlers.mirror import nbd


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NbdkitServer]:
    s = NbdkitServer(tmp_path, "n", 1 << 20)
    s.start()
    yield s
    s.stop()


def test_round_trip_and_queries(server: NbdkitServer) -> None:
    with nbd.connect(server.uri) as c:
        assert c.get_size() == 1 << 20
        assert not c.is_read_only()
        assert c.can_flush() and c.can_fua() and c.can_trim()
        c.pwrite(b"abc" * 1000, 4096)
        c.pwrite(memoryview(b"Z" * 512), 8192, fua=True)
        buf = bytearray(3512)
        c.pread(memoryview(buf), 4096)
        assert bytes(buf[:3000]) == b"abc" * 1000
        z = bytearray(512)
        c.pread(z, 8192)
        assert z == b"Z" * 512
        c.flush()
        c.trim(8192, 4096)
        out = bytearray(512)
        c.pread(out, 4096)
        assert out == bytes(512)  # nbdkit memory: trimmed blocks read as zeros
        c.shutdown()


def test_errors_carry_libnbd_message_and_errno(server: NbdkitServer) -> None:
    with nbd.connect(server.uri) as c:
        with pytest.raises(nbd.NbdError) as info:
            c.pread(bytearray(512), 2 << 20)
        assert info.value.errno == errno.EINVAL
        assert "out of bounds" in str(info.value) and server.sock in str(info.value)


def test_connect_refused_and_closed_handle(server: NbdkitServer) -> None:
    server.stop()
    with pytest.raises(nbd.NbdError) as info:
        nbd.connect(server.uri)
    assert info.value.errno in (errno.ECONNREFUSED, errno.ENOENT)
    c = nbd.NbdClient()
    c.close()
    c.close()
    with pytest.raises(nbd.NbdError) as closed:
        c.get_size()
    assert closed.value.errno == errno.EBADF


def test_server_killed_mid_session_is_an_error_not_a_hang(server: NbdkitServer) -> None:
    c = nbd.connect(server.uri)
    try:
        c.pwrite(b"x" * 512, 0)
        server.stop()
        with pytest.raises(OSError):
            c.pwrite(b"y" * 512, 0)
    finally:
        c.close()


def test_a_leg_uses_several_connections_when_the_server_offers_multi_conn(
        tmp_path: Path) -> None:
    """libnbd runs one synchronous command per handle at a time: an NBD leg opens
    NBD_CONNECTIONS connections to a multi-conn server and has that many commands in flight
    (a server that delays reads by 2 s holds every connection busy at once), data written
    through one is read through the others; a server without multi-conn gets one."""
    import threading
    import time

    from tcmu_py.handlers.mirror.legs import NBD_CONNECTIONS, NbdLeg

    slow = NbdkitServer(tmp_path, "slow", 1 << 20, ("--filter=delay", "rdelay=2"))
    slow.start()
    try:
        leg = NbdLeg(slow.uri, 1 << 20)
        try:
            assert leg.connections == NBD_CONNECTIONS > 1
            for i in range(NBD_CONNECTIONS):  # each on whichever connection is idle
                leg.write(i * 4096, bytes([i + 1]) * 4096)
            leg.flush()
            bufs = [bytearray(4096) for _ in range(NBD_CONNECTIONS)]
            readers = [threading.Thread(target=leg.read, args=(i * 4096, memoryview(b)))
                       for i, b in enumerate(bufs)]
            for t in readers:
                t.start()
            deadline = time.monotonic() + 10
            while leg._idle.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = NBD_CONNECTIONS - leg._idle.qsize()
            for t in readers:
                t.join(30)
            assert busy == NBD_CONNECTIONS, f"only {busy} reads were in flight at once"
            assert [b[0] for b in bufs] == [i + 1 for i in range(NBD_CONNECTIONS)]
        finally:
            leg.close()
    finally:
        slow.stop()
    single = NbdkitServer(tmp_path, "single", 1 << 20,
                          ("--filter=multi-conn", "multi-conn-mode=disable"))
    single.start()
    try:
        leg = NbdLeg(single.uri, 1 << 20)
        try:
            assert leg.connections == 1
            leg.write(0, b"q" * 512)
            out = bytearray(512)
            leg.read(0, memoryview(out))
            assert out == b"q" * 512
        finally:
            leg.close()
    finally:
        single.stop()
