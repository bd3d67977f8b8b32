"""Guest-side helpers for kernel scenarios: configfs objects, device discovery, processes.

Runs INSIDE the lab VM (root, configfs mounted by ``tcmu_py.lab.guest_prelude()``), standard
library only so that a scenario can use it before any project module works. Importing it on the
host is harmless (nothing happens at import time).

Rules every helper follows:
- every wait is a condition poll bounded by a deadline (``wait_for``); no fixed sleeps;
- every object created is registered on a ``Cleanup`` stack when one is passed, so a scenario
  that fails half-way still leaves the kernel clean for the next one;
- errors carry what was expected and what was found.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CONFIGFS = Path("/sys/kernel/config/target")
CORE = CONFIGFS / "core"
LOOPBACK = CONFIGFS / "loopback"
ISCSI = CONFIGFS / "iscsi"
SYS_UIO = Path("/sys/class/uio")
SYS_SCSI_DEVICE = Path("/sys/class/scsi_device")

# Defaults written to `control` before enable (kernel-abi.md "configfs"): never wait for netlink
# replies (no daemon answers them in most scenarios), a data area big enough for 512 KiB I/Os,
# and a transfer limit above the kernel default of 128 sectors (64 KiB).
DEFAULT_CONTROL: dict[str, str | int] = {
    "nl_reply_supported": -1,
    "max_data_area_mb": 64,
    "hw_max_sectors": 1024,
}


class Cleanup(contextlib.ExitStack):
    """LIFO stack of undo actions; a scenario's context owns one."""


def log(msg: str) -> None:
    """Timestamped line on stdout (captured into the scenario's log)."""
    print(f"[{time.monotonic():10.3f}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Waiting


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    max_interval: float = 0.25,
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned), or TimeoutError after
    ``timeout`` seconds naming ``what``. The poll interval grows from ``interval`` to
    ``max_interval``. Exceptions from the predicate propagate."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, max_interval)


# --------------------------------------------------------------------------------------------
# Processes


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, capturing stdout and stderr (text), logging both.

    On timeout its whole process group is killed and TimeoutError raised. With ``check`` a
    non-zero exit raises CalledProcessError (whose str includes the output).
    """
    log(f"$ {' '.join(argv)}")
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        out_b, err_b = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        out_b, err_b = proc.communicate()
        log(f"  timed out after {timeout:g}s; stdout={out_b[-2000:]!r} stderr={err_b[-2000:]!r}")
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:g}s") from None
    out, err = out_b.decode(errors="replace"), err_b.decode(errors="replace")
    if out:
        log("  stdout: " + out.rstrip()[-4000:])
    if err:
        log("  stderr: " + err.rstrip()[-4000:])
    log(f"  exit {proc.returncode}")
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise _CommandFailed(proc.returncode, list(argv), out, err)
    return result


class _CommandFailed(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Daemon:
    """A background process in its own process group, output appended to ``log_path``.

    ``start()`` waits (bounded) for ``ready()`` to become true and fails early if the process
    exits first. ``stop()`` sends SIGTERM, waits up to ``timeout``, then SIGKILLs the group and
    returns the exit status.
    """

    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, ready: Callable[[], object] | None = None, timeout: float = 30.0) -> Daemon:
        log(f"starting daemon: {' '.join(self.argv)} (log {self.log_path})")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        if ready is not None:
            proc = self.proc

            def ready_or_dead() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.argv[0]} exited with {proc.returncode} before ready; "
                        f"log:\n{self.output()[-4000:]}"
                    )
                return bool(ready())

            wait_for(ready_or_dead, timeout, f"{self.argv[0]} to become ready")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process (idempotent); returns its exit status (negative: killed by signal)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.argv[0]} ignored signal {sig} for {timeout:g}s; killing")
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            _killpg(proc.pid, signal.SIGKILL)  # stray children of an exited leader
        log(f"daemon {self.argv[0]} exited with {proc.returncode}")
        return proc.returncode


# --------------------------------------------------------------------------------------------
# configfs


def write_attr(path: Path, value: str | int) -> None:
    """Write one configfs/sysfs attribute (no trailing newline, one write call)."""
    data = str(value).encode()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_attr(path: Path) -> str:
    return path.read_text().strip()


@dataclass
class UserBackstore:
    """A TCMU (``user_<hba>``) storage object in configfs."""

    hba: int
    name: str
    config: str  # "<subtype>/<cfgstring>", as written to dev_config
    size: int

    @property
    def path(self) -> Path:
        return CORE / f"user_{self.hba}" / self.name

    @property
    def uio_name(self) -> str:
        """The name the uio device gets: tcm-user/<hba>/<name>/<subtype>/<cfgstring>."""
        return f"tcm-user/{self.hba}/{self.name}/{self.config}"

    def find_uio(self) -> tuple[Path, Path] | None:
        """(/dev/uioN, /sys/class/uio/uioN) of this backstore, or None if not there (yet)."""
        if not SYS_UIO.is_dir():
            return None
        for entry in SYS_UIO.iterdir():
            try:
                name = read_attr(entry / "name")
            except OSError:
                continue
            if name == self.uio_name:
                dev = Path("/dev") / entry.name
                if dev.exists():
                    return dev, entry
        return None

    def wait_uio(self, timeout: float = 10.0) -> tuple[Path, Path]:
        return wait_for(self.find_uio, timeout, f"uio device {self.uio_name}")

    def set_attrib(self, key: str, value: str | int) -> None:
        write_attr(self.path / "attrib" / key, value)

    def remove(self) -> None:
        """rmdir the object (must not be linked to a LUN any more) and its HBA if empty."""
        if self.path.exists():
            self.path.rmdir()
        hba = self.path.parent
        if hba.exists() and not any(p.is_dir() for p in hba.iterdir()):
            with contextlib.suppress(OSError):
                hba.rmdir()


def _free_user_hba() -> int:
    used = {int(p.name.split("_", 1)[1]) for p in CORE.glob("user_*") if p.name[5:].isdigit()}
    n = 0
    while n in used:
        n += 1
    return n


def create_user_backstore(
    name: str,
    config: str,
    size: int,
    *,
    control: Mapping[str, str | int] | None = None,
    hba: int | None = None,
    cleanup: Cleanup | None = None,
    uio_timeout: float = 10.0,
) -> UserBackstore:
    """Create and enable ``user_<hba>/<name>`` with dev_config ``config`` ("<subtype>/<cfg>") and
    ``size`` bytes; ``control`` entries override/extend DEFAULT_CONTROL. Returns once the uio device
    exists. With ``cleanup`` the object's removal is registered.
    """
    if ":" in config or len(config) > 255:
        raise ValueError(f"dev_config {config!r}: at most 255 characters and no ':'")
    bs = UserBackstore(hba if hba is not None else _free_user_hba(), name, config, size)
    bs.path.mkdir(parents=True)
    if cleanup is not None:
        cleanup.callback(bs.remove)
    settings: dict[str, str | int] = {"dev_config": config, "dev_size": size}
    settings.update(DEFAULT_CONTROL)
    settings.update(control or {})
    for key, value in settings.items():
        # Each control write takes one key=value; unknown keys are silently ignored by the kernel.
        write_attr(bs.path / "control", f"{key}={value}")
    write_attr(bs.path / "enable", 1)
    log(f"backstore {bs.path} enabled ({bs.uio_name})")
    bs.wait_uio(uio_timeout)
    return bs


@dataclass
class LoopbackLun:
    """A tcm_loop target port (one SCSI host in the guest) exporting one backstore as a LUN."""

    wwn: str
    lun: int
    backstore: UserBackstore

    @property
    def tpg(self) -> Path:
        return LOOPBACK / self.wwn / "tpgt_1"

    @property
    def lun_dir(self) -> Path:
        return self.tpg / "lun" / f"lun_{self.lun}"

    def scsi_address(self) -> str:
        """H:C:T:L of the LUN as the guest's SCSI midlayer numbers it."""
        # tcm_loop's tpg `address` attribute reads "<host>:0:<tpgt>" once the nexus exists.
        return f"{read_attr(self.tpg / 'address')}:{self.lun}"

    def scsi_devices(self) -> dict[str, str]:
        """Upper-level device nodes bound to the LUN: keys among block, scsi_tape,
        scsi_generic, scsi_changer; values like "sda", "nst0" (tape: the no-rewind node)."""
        base = SYS_SCSI_DEVICE / self.scsi_address() / "device"
        found: dict[str, str] = {}
        for kind in ("block", "scsi_tape", "scsi_generic", "scsi_changer"):
            d = base / kind
            if not d.is_dir():
                continue
            names = sorted(p.name for p in d.iterdir())
            if kind == "scsi_tape":
                names = [n for n in names if n.startswith("nst") and n[3:].isdigit()]
            if names:
                found[kind] = names[0]
        return found

    def wait_device(self, kind: str = "block", timeout: float = 60.0) -> Path:
        """/dev node of ``kind`` for this LUN, waiting until the driver bound and udev (or
        devtmpfs) created the node — and, for a disk, until the node opens: devtmpfs makes it
        before the kernel registers the disk behind it (sd's probe), and an open in between
        fails ENXIO (seen once in CI, ceph_disk.two_gateways, 2026-12-04)."""

        def ready() -> Path | None:
            name = self.scsi_devices().get(kind)
            if name is None:
                return None
            dev = Path("/dev") / name
            if not dev.exists():
                return None
            if kind == "block":
                try:
                    os.close(os.open(dev, os.O_RDONLY | os.O_NONBLOCK))
                except OSError as exc:
                    if exc.errno in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
                        return None
                    # any other answer (EIO, ENOMEDIUM ...) comes from a registered disk
            return dev

        return wait_for(ready, timeout, f"{kind} device of {self.wwn} LUN {self.lun}")

    def unlink(self) -> None:
        """Remove the LUN, then the nexus, TPG and target (each only if present)."""
        if self.lun_dir.exists():
            for link in self.lun_dir.iterdir():
                if link.is_symlink():
                    link.unlink()
            self.lun_dir.rmdir()
        if self.tpg.exists():
            if any((self.tpg / "lun").iterdir()):
                return  # other LUNs still use the target
            _drop_nexus(self.tpg)
            self.tpg.rmdir()
        target = LOOPBACK / self.wwn
        if target.exists():
            target.rmdir()


def _nexus(tpg: Path) -> str:
    """The tcm_loop TPG's initiator port name, "" if no nexus (reading then fails ENODEV)."""
    try:
        return read_attr(tpg / "nexus")
    except OSError:
        return ""


def _drop_nexus(tpg: Path) -> None:
    if _nexus(tpg):
        # tcm_loop: writing "NULL" drops the I_T nexus (refused while LUNs are linked).
        write_attr(tpg / "nexus", "NULL")


_wwn_counter = 0


def _next_wwn() -> str:
    global _wwn_counter
    _wwn_counter += 1
    # NAA 5 with the IEEE OUI 00:14:05 used by LIO; pid keeps scenarios in different
    # processes from colliding.
    return f"naa.50014050{os.getpid() & 0xFFFF:04x}{_wwn_counter:04x}"


def create_loopback_lun(
    backstore: UserBackstore,
    *,
    wwn: str | None = None,
    lun: int = 0,
    cleanup: Cleanup | None = None,
) -> LoopbackLun:
    """Export ``backstore`` through tcm_loop: target ``wwn`` (generated if None), TPG 1 with an
    I_T nexus, LUN ``lun``. The kernel scans the LUN at once, so whatever serves the ring must
    already run. Returns without waiting for device nodes (see ``wait_device``)."""
    wwn = wwn or _next_wwn()
    ll = LoopbackLun(wwn, lun, backstore)
    ll.lun_dir.mkdir(parents=True)
    if cleanup is not None:
        cleanup.callback(ll.unlink)
    # One nexus per target port; configfs files always report a size, so reading back is the
    # way to know whether it is set.
    if not _nexus(ll.tpg):
        write_attr(ll.tpg / "nexus", _next_wwn())
    os.symlink(backstore.path, ll.lun_dir / backstore.name)
    log(f"loopback {wwn} lun {lun} -> {backstore.path}")
    return ll


def teardown_all() -> list[str]:
    """Remove every loopback and iSCSI target and every user backstore (best effort). Used
    between scenarios so a failed one does not leak into the next. Returns what it removed."""
    removed: list[str] = []
    for fabric in (LOOPBACK, ISCSI):
        if not fabric.is_dir():
            continue
        targets = [p for p in fabric.iterdir() if p.is_dir() and p.name != "discovery_auth"]
        for target in targets:
            for tpg in [p for p in target.iterdir() if p.name.startswith("tpgt_")]:
                for lun_dir in (tpg / "lun").glob("lun_*"):
                    for link in lun_dir.iterdir():
                        if link.is_symlink():
                            link.unlink()
                    lun_dir.rmdir()
                for sub in ("np", "acls"):
                    for child in sorted((tpg / sub).glob("*"), reverse=True):
                        if child.is_dir():
                            with contextlib.suppress(OSError):
                                _rmtree_configfs(child)
                if fabric == LOOPBACK:
                    _drop_nexus(tpg)
                with contextlib.suppress(OSError):
                    tpg.rmdir()
            with contextlib.suppress(OSError):
                target.rmdir()
                removed.append(str(target))
    if CORE.is_dir():
        for hba in CORE.glob("user_*"):
            for obj in [p for p in hba.iterdir() if p.is_dir()]:
                with contextlib.suppress(OSError):
                    obj.rmdir()
                    removed.append(str(obj))
            with contextlib.suppress(OSError):
                hba.rmdir()
    return removed


def _rmtree_configfs(path: Path) -> None:
    """rmdir a configfs group bottom-up (configfs directories are removed with rmdir only)."""
    for child in path.iterdir():
        if child.is_symlink():
            child.unlink()
        elif child.is_dir():
            _rmtree_configfs(child)
    path.rmdir()


# --------------------------------------------------------------------------------------------
# Small helpers


def tcmu_py(*args: str) -> list[str]:
    """The argv of ``tcmu-py ARGS`` run by this interpreter (the checkout's venv)."""
    import sys

    return [sys.executable, "-m", "tcmu_py.cli", *args]


def serve_config(ctx: Context, cfg: Path, timeout: float = 240) -> tuple[Daemon, Path]:
    """Start ``tcmu-py serve -c cfg`` (run directory ``<workdir>/run``) and wait until it is
    ready; on cleanup the daemon stops and then ``tcmu-py down -c cfg`` runs. Returns the
    daemon and its run directory."""
    run_dir = ctx.workdir / "run"
    ready = ctx.workdir / "ready"
    ready.unlink(missing_ok=True)
    d = Daemon(tcmu_py("serve", "-c", str(cfg), "--run-dir", str(run_dir), "--ready-file",
                       str(ready)), ctx.artifacts / "daemon.log")
    ctx.cleanup.callback(lambda: run(tcmu_py("down", "-c", str(cfg)), timeout=120, check=False))
    ctx.cleanup.callback(d.stop)
    d.start(ready=ready.exists, timeout=ctx.remaining(timeout))
    return d, run_dir


def loopback_disk_of_size(size: int) -> Path | None:
    """/dev/sdX of a tcm_loop LUN of ``size`` bytes, once sd bound it (for disks whose NAA is
    not ours to choose, e.g. tcmu-runner's or a restored one: scenarios give them distinct
    sizes)."""
    for dev in Path("/sys/block").glob("sd*"):
        if ("tcm_loop_adapter" in os.path.realpath(dev / "device")
                and int((dev / "size").read_text()) * 512 == size
                and (Path("/dev") / dev.name).exists()):
            return Path("/dev") / dev.name
    return None


def disk_by_wwn(wwn: str) -> Path | None:
    """/dev/sdX whose VPD 83h NAA designator is ``wwn`` (sysfs ``wwid``), once sd bound it."""
    for dev in Path("/sys/block").glob("sd*"):
        try:
            wwid = (dev / "device" / "wwid").read_text().strip()
        except OSError:
            continue
        node = Path("/dev") / dev.name
        if wwid == wwn and node.exists():
            return node
    return None


def scsi_disk(vendor: str, model: str) -> Path | None:
    """/dev/sdX whose INQUIRY vendor and product are these, once the sd driver bound it."""
    for dev in Path("/sys/block").glob("sd*"):
        try:
            found = ((dev / "device" / "vendor").read_text().strip(),
                     (dev / "device" / "model").read_text().strip())
        except OSError:
            continue
        node = Path("/dev") / dev.name
        if found == (vendor, model) and node.exists():
            return node
    return None


def have(tool: str) -> bool:
    """True if ``tool`` is on PATH in the guest."""
    from shutil import which

    return which(tool) is not None


def read_block(dev: Path, offset: int, length: int) -> bytes:
    """O_DIRECT-free read of ``length`` bytes at ``offset`` from a block device, bypassing
    nothing; use ``run(['dd', ..., 'iflag=direct'])`` when the page cache must be avoided."""
    with open(dev, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(length)


# --------------------------------------------------------------------------------------------
# Power loss (the "before"/"after" pairs of conftest.POWER_LOSS_CHAIN)


def fsync_write(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with ``data``, durable on return (not its name: `fsync_dir`)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_power_loss_disk(ctx: Context, disk: Path, mount: Path) -> Path:
    """Mount ``disk`` (ext4, one of conftest.POWER_LOSS_DISKS) on ``mount`` until cleanup."""
    assert disk.exists(), f"{disk} missing: the host test attaches it (conftest.POWER_LOSS_DISKS)"
    mount.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", str(disk), str(mount)], timeout=ctx.remaining(60))
    ctx.cleanup.callback(lambda: run(["umount", str(mount)], timeout=60, check=False))
    return mount


def fsck_ext4(ctx: Context, dev: Path) -> None:
    """Mount and unmount ``dev`` (its journal replays), then ``e2fsck -fn``: exit 0 or raise."""
    mnt = ctx.workdir / f"fsck-{dev.name}"
    mnt.mkdir(exist_ok=True)
    run(["mount", "-t", "ext4", str(dev), str(mnt)], timeout=ctx.remaining(60))
    run(["umount", str(mnt)], timeout=ctx.remaining(60))
    fsck = run(["e2fsck", "-fn", str(dev)], timeout=ctx.remaining(120), check=False)
    assert fsck.returncode == 0, f"e2fsck -fn {dev}: exit {fsck.returncode}\n{fsck.stdout}"


def save_expected(ctx: Context, name: str, facts: Mapping[str, object]) -> None:
    """``facts`` as JSON in the artifacts (the host's disk, through 9p), durable before a cut."""
    import json

    path = ctx.artifacts / name
    path.write_text(json.dumps(facts))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def power_cut(why: str) -> None:
    """Reset the VM at once with ``sysrq b``: no sync, what the guest has not flushed to its
    disks is lost, as in a power cut. Never returns."""
    log(f"power loss {why}: sysrq b (reset without sync)")
    Path("/proc/sysrq-trigger").write_text("b")
    raise AssertionError("the VM is still running after sysrq b")


def power_cut_during_fio(ctx: Context, target: Path, size: int, cut_after: int,
                         *fio_args: str) -> None:
    """Start fio writing ``size`` bytes sequentially to the new file ``target`` (64 KiB blocks,
    ``fio_args`` added: an fsync interval, a rate, a seed) and `power_cut` once the file holds
    ``cut_after`` bytes. fio creates the file as it writes (no layout pass), so the file's size
    is its progress. Raises if fio ends first."""
    fio = subprocess.Popen(
        ["fio", "--name=powercut", f"--filename={target}", "--rw=write", "--bs=64k",
         f"--size={size}", "--ioengine=psync", "--create_on_open=1", "--fallocate=none",
         *fio_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx.cleanup.callback(fio.kill)

    def written() -> int | None:
        assert fio.poll() is None, f"fio ended (exit {fio.returncode}) before the cut"
        n = target.stat().st_size if target.exists() else 0
        return n if n >= cut_after else None

    at = wait_for(written, ctx.remaining(90), f"fio to write {cut_after} bytes")
    power_cut(f"at {at} bytes of fio's file")


# --------------------------------------------------------------------------------------------
# Scenarios: registration and the context each one runs with


@dataclass
class Context:
    """What a scenario function receives.

    ``workdir``: fresh directory on the guest's scratch tmpfs (fast, discarded). ``artifacts``:
    directory that writes through to the host (results/kernel/<name>/) for files worth keeping.
    ``details``: JSON-serialisable facts reported to the host test (measurements, versions).
    ``cleanup``: undo stack, unwound after the scenario whatever happens. ``deadline``: the
    scenario's absolute time.monotonic() limit; use ``remaining()`` to size waits.
    """

    name: str
    workdir: Path
    artifacts: Path
    deadline: float
    cleanup: Cleanup
    details: dict[str, object] = field(default_factory=dict)

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left before the deadline (at least 0.1), optionally capped."""
        left = max(self.deadline - time.monotonic(), 0.1)
        return min(left, cap) if cap is not None else left


@dataclass(frozen=True)
class Scenario:
    name: str  # "<module>.<function>"
    func: Callable[[Context], None]
    timeout: float
    doc: str
    # False: runs in the shared boot of every scenario. True: needs a VM of its own (e.g. one
    # that crashes the guest on purpose); a host test boots it and names it in --only.
    own_boot: bool = False


SCENARIOS: dict[str, Scenario] = {}
#: Module name -> what ends the resources its scenarios share (``group_teardown``).
GROUP_TEARDOWNS: dict[str, Callable[[], None]] = {}


ScenarioFunc = Callable[[Context], None]


def scenario(
    *, timeout: float = 120.0, own_boot: bool = False
) -> Callable[[ScenarioFunc], ScenarioFunc]:
    """Register a guest scenario ``def name(ctx: Context) -> None`` that raises on failure.

    It is named "<module>.<function>", runs in its own guest process, and is killed (and reported
    failed) after ``timeout`` seconds. With ``own_boot`` it is left out of the shared boot (and of
    ``guest_main.py`` runs without ``--only``): a host test boots a VM for it.
    """

    def register(func: ScenarioFunc) -> ScenarioFunc:
        module = func.__module__.rsplit(".", 1)[-1]
        name = f"{module}.{func.__name__}"
        if name in SCENARIOS:
            raise ValueError(f"duplicate scenario {name}")
        SCENARIOS[name] = Scenario(name, func, timeout, (func.__doc__ or "").strip(), own_boot)
        return func

    return register


def group_teardown(func: Callable[[], None]) -> Callable[[], None]:
    """Register ``func`` as the teardown of its module's scenario group: guest_main calls it
    (in its own process, after the group's cleanup of LIO objects) once the last selected
    scenario of the module has run, whatever their outcome. For what the scenarios of a group
    share and none of them owns, such as a cluster started by the first one that needs it; it
    must be idempotent, bounded in time, and do nothing when there is nothing to end."""
    GROUP_TEARDOWNS[func.__module__.rsplit(".", 1)[-1]] = func
    return func


def discover_scenarios() -> dict[str, Scenario]:
    """Import every module of the ``scenarios`` package (next to this file) and return the
    registry, in module then definition order."""
    import importlib
    import sys

    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    for path in sorted((here / "scenarios").glob("*.py")):
        if path.name.startswith("_"):
            continue
        importlib.import_module(f"scenarios.{path.stem}")
    return SCENARIOS
