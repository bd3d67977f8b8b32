"""systemd readiness (Type=notify, issue 13): `tcmu-py serve` says READY=1 once devices are
served, not before, and STOPPING=1 when it stops."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tcmu_py import cli
from tcmu_py.daemon import serve
from tcmu_py.daemon.sdnotify import notify


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def test_notify_path_and_abstract(tmp_path: Path) -> None:
    with _listener(str(tmp_path / "notify")) as sock:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert sock.recv(4096) == b"READY=1"
    name = f"tcmu-py-test-{os.getpid()}"
    with _listener("\0" + name) as sock:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "relative"})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert "not notified" in caplog.text and "failed" in caplog.text


def test_serve_says_ready_after_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    sock = _listener(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    class FakeDaemon:
        def __init__(self, **kw: Any) -> None:
            self.served = {"uio0": None, "uio1": None}

        def start_serving(self) -> None:
            events.append("serving")

        def subscribe(self) -> None:
            events.append("subscribed")

        def run(self) -> None:
            sock.settimeout(0)
            events.append("ready seen" if sock.recv(4096).startswith(b"READY=1\n") else "no")
            events.append("run")

        def shutdown(self) -> None:  # pragma: no cover - only on failure
            events.append("shutdown")

    monkeypatch.setattr(serve, "Daemon", FakeDaemon)
    try:
        assert cli.main(["serve", "--run-dir", str(tmp_path / "run")]) == 0
        sock.settimeout(10)
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()
    assert events == ["serving", "subscribed", "ready seen", "run"]


def test_unit_is_type_notify() -> None:
    unit = (Path(__file__).resolve().parents[2] / "udev" / "tcmu-py.service").read_text()
    lines = [line.strip() for line in unit.splitlines()]
    assert "Type=notify" in lines and "NotifyAccess=main" in lines
    assert any(line.startswith("Before=") and "target.service" in line for line in lines)
