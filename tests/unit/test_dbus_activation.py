"""The D-Bus activation file (issue 13): a call to org.kernel.TCMUService1 with no daemon
running (e.g. `targetcli ls`) starts tcmu-py. scripts/install-system.sh installs it with the
absolute path of tcmu-py (dbus-daemon's launch helper runs Exec= with an empty environment)
where the bus reads it before tcmu-runner's file for the same name."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "dbus" / "org.kernel.TCMUService1.service"
INSTALLED = "usr/local/share/dbus-1/system-services/org.kernel.TCMUService1.service"


def _install(tmp_path: Path, tcmu_py: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(tmp_path / "root"), "TCMU_PY": tcmu_py}
    return subprocess.run(["sh", str(ROOT / "scripts/install-system.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def _service(path: Path) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    assert cp.sections() == ["D-BUS Service"]
    return cp["D-BUS Service"]


def test_install_system_puts_every_file_in_place(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "tcmu-py"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "env: $(env | grep -c .)"\n')
    fake.chmod(0o755)
    res = _install(tmp_path, str(fake))
    assert res.returncode == 0, res.stderr
    root = tmp_path / "root"
    for rel in ("etc/udev/rules.d/60-tcmu-py.rules", "etc/systemd/system/tcmu-py.service",
                "etc/dbus-1/system.d/tcmu-py.conf", INSTALLED):
        assert (root / rel).is_file(), rel
    svc = _service(root / INSTALLED)
    # The bus name is the file name (the system bus's launch helper requires it), run as root,
    # and under systemd the bus starts the project's unit instead.
    assert svc["Name"] == "org.kernel.TCMUService1" == Path(INSTALLED).stem
    assert svc["User"] == "root"
    assert svc["SystemdService"] == "tcmu-py.service"
    assert (ROOT / "udev" / svc["SystemdService"]).is_file()
    argv = shlex.split(svc["Exec"])
    assert "@TCMU_PY@" not in svc["Exec"] and str(fake) in svc["Exec"]
    # As the launch helper runs it: an empty environment. Without /etc/tcmu-py/config.yaml
    # (none on a test machine) the daemon starts with `serve` alone.
    if Path("/etc/tcmu-py/config.yaml").exists():
        pytest.skip("this machine has /etc/tcmu-py/config.yaml")
    out = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "argv: serve\n" in out.stdout, out


def test_install_system_refuses_a_relative_tcmu_py(tmp_path: Path) -> None:
    res = _install(tmp_path, "tcmu-py")
    assert res.returncode == 2
    assert "TCMU_PY=tcmu-py: expected the absolute path of tcmu-py" in res.stderr
    assert not (tmp_path / "root" / INSTALLED).exists()


def test_source_file_has_the_placeholder_only_in_exec() -> None:
    svc = _service(SOURCE)
    assert svc["Exec"].count("@TCMU_PY@") == 2
    assert all("@" not in v for k, v in svc.items() if k != "Exec")
