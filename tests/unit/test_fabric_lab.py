"""tcmu_py.lab_fabrics without a guest: it refuses to touch a host's network, derives FCoE port
names as fcoe does, and bounds writes the kernel may block in."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tcmu_py import lab_fabrics as lf


def test_refuses_to_run_outside_the_lab_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lf, "in_guest", lambda: False)
    ran: list[object] = []
    monkeypatch.setattr(lf, "_run", lambda *a, **k: ran.append(a))
    with pytest.raises(lf.FabricLabError, match="only inside the lab guest"):
        lf.bring_up()
    assert ran == []  # not one command (ip, rdma, modprobe) ran
    assert lf.main(["up"]) == 2


def test_in_guest_reads_the_kernel_command_line() -> None:
    # This machine is not a virtme-ng guest (the unit tests never run in one).
    assert lf.in_guest() is ("virtme" in Path("/proc/cmdline").read_text())


def test_fcoe_wwpn_is_2000_and_the_mac() -> None:
    assert lf.fc_wwpn("02:00:00:00:77:01") == "naa.2000020000007701"
    assert lf.FabricLab().fc_initiator_wwpn == "naa.2000020000007702"


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert lf.main([]) == 2
    assert lf.main(["up", "sas"]) == 2
    assert "usage: python -m tcmu_py.lab_fabrics up [srp iser fc usb]" in capsys.readouterr().err


def test_write_bounded_writes_and_reports_errors(tmp_path: Path) -> None:
    f = tmp_path / "attr"
    lf.write_bounded(f, "1", 5)
    assert f.read_text() == "1"
    with pytest.raises(lf.FabricLabError, match="writing '1' to .*/missing/attr: .*No such file"):
        lf.write_bounded(tmp_path / "missing" / "attr", "1", 5)


def test_write_bounded_gives_up_on_a_write_that_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes: a stuck write
    start = time.monotonic()
    with pytest.raises(lf.FabricLabError, match="still blocked in the kernel after 0.3s"):
        lf.write_bounded(fifo, "- - -", 0.3)
    assert time.monotonic() - start < 5
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # release the writer thread
    try:
        deadline = time.monotonic() + 5
        data = b""
        while not data and time.monotonic() < deadline:
            try:
                data = os.read(fd, 16)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(fd)


def test_lab_fabrics_option_brings_the_transports_up_before_the_daemon(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    from tcmu_py import lab

    scripts: list[str] = []

    def fake_run_in_vm(script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        scripts.append(script)
        return subprocess.CompletedProcess(["vng"], 0, "", "")

    monkeypatch.setattr(lab, "run_in_vm", fake_run_in_vm)
    assert lab.main(["--fabrics", "--", "lsscsi"]) == 0
    assert lab.main(["--", "lsscsi"]) == 0
    with_fabrics, without = scripts
    up = f"{sys.executable} -m tcmu_py.lab_fabrics up\n"
    assert up in with_fabrics and up not in without
    # After the prelude (modules, configfs), before `tcmu-py serve` starts.
    assert with_fabrics.index("end of prelude") < with_fabrics.index(up) < with_fabrics.index(
        " serve ")
