"""Host-side tests of tcmu_py.lab that need no VM: kernel selection, the prelude, and
run_in_vm's process handling (against a fake ``vng`` that runs the command locally)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcmu_py import lab


def _kernel(boot: Path, modules: Path, ver: str, tcmu: str | None = "target_core_user.ko") -> None:
    (boot / f"vmlinuz-{ver}").write_bytes(b"")
    target = modules / ver / "kernel" / "drivers" / "target"
    target.mkdir(parents=True)
    if tcmu:
        (target / tcmu).write_bytes(b"")


def test_find_kernel_picks_newest_with_tcmu(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    _kernel(boot, modules, "6.1.0-9-amd64")
    _kernel(boot, modules, "6.1.0-56-amd64")  # numerically newer than -9
    _kernel(boot, modules, "6.12.0-1-amd64", tcmu=None)  # newest, but no TCMU module
    _kernel(boot, modules, "6.2.0-1-cloud-amd64", tcmu="target_core_user.ko.xz")
    (boot / "vmlinuz-7.0.0-1-arm64").write_bytes(b"")  # wrong architecture
    assert lab.find_kernel(boot, modules) == boot / "vmlinuz-6.2.0-1-cloud-amd64"


def test_find_kernel_orders_versions_numerically(tmp_path: Path) -> None:
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    _kernel(boot, modules, "6.9.0-1-amd64")
    _kernel(boot, modules, "6.10.0-1-amd64")
    assert lab.find_kernel(boot, modules).name == "vmlinuz-6.10.0-1-amd64"


def test_find_kernel_without_candidates_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(lab.LabError, match="linux-image-amd64"):
        lab.find_kernel(tmp_path / "boot", tmp_path / "modules")


def test_prelude_loads_every_module_with_modprobe_a() -> None:
    text = lab.guest_prelude()
    # Without -a, modprobe treats every name after the first as a module parameter.
    line = next(ln for ln in text.splitlines() if ln.startswith("modprobe -a "))
    assert line.split()[2 : 2 + len(lab.GUEST_MODULES)] == list(lab.GUEST_MODULES)
    for needed in ("mount -t configfs", "ip link set lo up", "mkdir -p", "/etc/target",
                   "HOME=/tmp/home", "mount -t tmpfs"):
        assert needed in text


@pytest.fixture
def fake_vng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``vng`` that checks the arguments it must receive, then runs the command after ``--``
    with bash on the host (so the tests exercise run_in_vm's I/O and process handling)."""
    vng = tmp_path / "bin" / "vng"
    vng.parent.mkdir()
    vng.write_text(
        "#!/bin/bash\n"
        'echo "ARGS: $*"\n'
        'case " $* " in *" --disable-kvm "*) ;; *) echo "no --disable-kvm"; exit 64;; esac\n'
        'while [ "$1" != "--" ]; do shift; done; shift\n'
        'exec bash -c "$1"\n'
    )
    vng.chmod(vng.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(lab, "find_vng", lambda: vng)
    monkeypatch.setattr(lab, "_check_host_tools", lambda: None)
    return vng


def test_run_in_vm_passes_script_status_and_output(fake_vng: Path, tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    rw.mkdir()
    log = tmp_path / "console.log"
    script = 'echo "hello from $0"; echo "$PATH" | tr : "\\n" | head -2; exit 3\n' + "#" * 5000
    proc = lab.run_in_vm(script, rwdirs=[rw], timeout=30, kernel="/boot/vmlinuz-x-amd64", log=log)
    assert proc.returncode == 3
    assert "hello from " in proc.stdout
    # vng runs virtme-run by name: its own directory leads PATH (after the virtiofsd shim's,
    # when there is one).
    assert f"\n{fake_vng.parent}\n" in proc.stdout
    assert f"--rwdir {rw}" in proc.stdout and "--memory 2G" in proc.stdout
    assert "--user root" in proc.stdout and "--run /boot/vmlinuz-x-amd64" in proc.stdout
    assert log.read_text() == proc.stdout


def test_run_in_vm_timeout_kills_the_whole_process_group(fake_vng: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The "VM" starts a grandchild that would outlive a kill of vng alone.
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait\n"
    start = time.monotonic()
    with pytest.raises(lab.LabTimeout) as info:
        lab.run_in_vm(script, timeout=2, kernel="/k")
    assert time.monotonic() - start < 15
    assert "started" in info.value.output
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"grandchild {child} survived the timeout"


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (killed, waiting to be reaped by init)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def test_run_in_vm_rejects_missing_rwdir(fake_vng: Path, tmp_path: Path) -> None:
    with pytest.raises(lab.LabError, match="does not exist"):
        lab.run_in_vm("true", rwdirs=[tmp_path / "nope"], timeout=5, kernel="/k")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace run_in_vm: record the script and options, pretend the guest exited 7."""
    calls: list[dict] = []

    def fake_run(script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        calls.append({"script": script, **kw})
        return subprocess.CompletedProcess(["vng"], 7, stdout="console\n", stderr="")

    monkeypatch.setattr(lab, "run_in_vm", fake_run)
    return calls


def test_main_serves_the_config_then_runs_the_command(captured: list[dict], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # As `tcmu-py lab -c my.yaml -- sg_inq /dev/sda` calls it.
    assert lab.main(config="my.yaml", command=["--", "sg_inq", "/dev/sda"]) == 7
    script = captured[0]["script"]
    assert script.startswith(lab.guest_prelude())
    assert f"serve -c {tmp_path / 'my.yaml'} --ready-file" in script
    assert "( sg_inq /dev/sda )" in script
    # The command runs only after the ready file appeared, and the daemon is stopped after it.
    assert script.index('until [ -e "$SERVE_READY" ]') < script.index("( sg_inq") < script.index(
        "kill -TERM $SERVE_PID")


def test_main_defaults_and_no_serve(captured: list[dict]) -> None:
    assert lab.main() == 7
    assert "serve --default" in captured[0]["script"]
    assert f"( {lab.DEFAULT_LAB_COMMAND} )" in captured[0]["script"]
    assert lab.main(["--no-serve", "--memory", "3G", "--", "lsmod"]) == 7
    assert captured[1]["script"] == lab.guest_prelude() + "lsmod\n"
    assert captured[1]["memory"] == "3G"


def test_main_reports_a_lab_that_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def no_lab(script: str, **kw: object) -> None:
        raise lab.LabError("qemu-system-x86_64 not found")

    monkeypatch.setattr(lab, "run_in_vm", no_lab)
    assert lab.main(["--no-serve"]) == 2
    assert "qemu-system-x86_64 not found" in capsys.readouterr().err


def test_sigterm_to_the_caller_takes_the_vm_down(fake_vng: Path, tmp_path: Path) -> None:
    """A caller killed with SIGTERM (e.g. `timeout` around pytest) must not leave the VM's
    process group running: it runs in its own session."""
    pidfile = tmp_path / "grandchild.pid"
    program = tmp_path / "caller.py"
    program.write_text(
        "import sys\nfrom pathlib import Path\nfrom tcmu_py import lab\n"
        f"lab.find_vng = lambda: Path({str(fake_vng)!r})\n"
        "lab._check_host_tools = lambda: None\n"
        f"lab.run_in_vm('sleep 300 & echo $! > {pidfile}; wait', timeout=120, kernel='/k')\n"
    )
    caller = subprocess.Popen([sys.executable, str(program)])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "fake VM never started"
            assert caller.poll() is None, f"caller exited early with {caller.returncode}"
            time.sleep(0.05)
        grandchild = int(pidfile.read_text())
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=30) == -signal.SIGTERM
    finally:
        if caller.poll() is None:
            caller.kill()
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the VM's process group survived its caller's SIGTERM"


def test_virtiofsd_shim_drives_qemus_daemon_as_virtme_ng_drives_the_rust_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """virtme-ng starts ``virtiofsd --syslog ... --socket-path S --shared-dir D --sandbox none
    --cache C`` in the background and waits for ``S.pid``; QEMU's C daemon takes ``-o`` options
    and writes no pid file. The shim translates and writes it."""
    if os.geteuid() != 0:
        pytest.skip("the shim is used only as root (QEMU's C virtiofsd needs it)")
    calls = tmp_path / "calls"
    fake = tmp_path / "qemu-virtiofsd"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setattr(lab, "_QEMU_VIRTIOFSD", fake)
    monkeypatch.delenv("TCMU_PY_LAB_9P", raising=False)
    monkeypatch.setattr(lab.shutil, "which", lambda name, *a, **k: None)
    shim_dir = lab._virtiofsd_shim(tmp_path)
    assert shim_dir is not None
    shim = shim_dir / "virtiofsd"
    assert subprocess.run([shim, "--version"], check=False).returncode == 0
    sock = tmp_path / "virtme.sock"
    argv = [str(shim), "--syslog", "--no-announce-submounts", "--socket-path", str(sock),
            "--shared-dir", "/", "--sandbox", "none", "--cache", "always"]
    assert subprocess.run(argv, check=False).returncode == 0
    pid = int((tmp_path / "virtme.sock.pid").read_text())
    assert pid > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(calls.read_text().splitlines()) < 2:
        time.sleep(0.05)
    lines = calls.read_text().splitlines()
    assert lines[0] == "--version"
    assert lines[1] == (f"--socket-path={sock} -o source=/,cache=always,sandbox=chroot,"
                        "log_level=err")
    monkeypatch.setenv("TCMU_PY_LAB_9P", "1")
    assert lab._virtiofsd_shim(tmp_path / "other") is None
