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


def test_a_failed_command_leaves_no_buffer_exported(server: NbdkitServer) -> None:
    """A command that fails must not keep the caller's buffer exported: its exception (and
    the frames of its traceback, which hold the buffer) may end in a reference cycle, and the
    cycle collector clearing an exported memoryview is a BufferError, then a crash (seen in
    the daemon as "Exception ignored in tp_clear of memoryview")."""
    import gc
    import sys

    seen: list[BaseException | None] = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        c = nbd.connect(server.uri)
        server.stop()
        for _ in range(20):
            for call in (lambda b: c.pread(b, 0), lambda b: c.pwrite(b, 0)):
                view = memoryview(bytearray(4096))
                try:
                    call(view)
                except nbd.NbdError as exc:
                    cycle: list[object] = [exc]
                    cycle.append(cycle)
                else:
                    raise AssertionError("a command to a dead server succeeded")
                del view, cycle
            gc.collect()
        c.close()
    finally:
        sys.unraisablehook = old
    assert not [e for e in seen if isinstance(e, BufferError)], seen
