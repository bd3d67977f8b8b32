"""Boot the distribution kernel under QEMU (virtme-ng) to run code against real LIO/TCMU.

The host kernel here has no LIO, configfs or UIO and cannot load modules; Debian's own kernel
(``linux-image-amd64``) has them all as modules and boots under QEMU with ``vng``. virtme-ng shares
the host's root filesystem read-only with the guest, so the checkout, its virtualenv and every
installed tool are visible at the same paths. Only ``--rwdir`` directories write through to the
host; /etc, /lib, /usr, /var, /tmp, /home, /opt and /srv get throw-away overlays in the guest.

Contracts:
- ``find_kernel()`` returns the newest ``/boot/vmlinuz-*-amd64`` whose module tree contains
  ``target_core_user``; raises ``LabError`` when there is none.
- ``run_in_vm(script, ...)`` boots that kernel once, runs ``script`` (bash) as root in the guest and
  returns when the guest powers off. Its exit status is the script's. It never waits longer than
  ``timeout`` seconds: on expiry the whole ``vng``/QEMU process group is killed and
  ``LabTimeout`` (a ``subprocess.TimeoutExpired``) is raised carrying the console output so far.
- ``guest_prelude()`` is shell text to run first in every guest script: it loads the target
  modules, mounts configfs, brings up loopback networking and prepares writable scratch space.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from tcmu_py.errors import TcmuError

__all__ = [
    "GUEST_MODULES",
    "LabError",
    "LabTimeout",
    "compile_checkout",
    "find_kernel",
    "find_vng",
    "guest_prelude",
    "kernel_version_key",
    "run_in_vm",
]

# Modules every guest loads: configfs + LIO core + TCMU, the loopback fabric that turns a LUN
# into a local SCSI device, the upper-level SCSI drivers (disk, generic, tape, changer) and the
# iSCSI target fabric.
GUEST_MODULES: tuple[str, ...] = (
    "target_core_user",
    "tcm_loop",
    "sd_mod",
    "sg",
    "st",
    "ch",
    "iscsi_target_mod",
)

# Scratch tmpfs inside the guest (the guest's /tmp is itself an overlay; a dedicated tmpfs makes
# the space and its size explicit).
GUEST_SCRATCH = "/tmp/scratch"
GUEST_HOME = "/tmp/home"

_VMLINUZ_RE = re.compile(r"^vmlinuz-(?P<ver>.+-amd64)$")


class LabError(TcmuError):
    """The VM lab cannot run here (no suitable kernel, vng or QEMU missing)."""


class LabTimeout(subprocess.TimeoutExpired):  # noqa: N818 - it is a TimeoutExpired
    """The guest did not power off within the timeout; the VM was killed."""


def kernel_version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for kernel release strings: numeric runs compare as numbers ("6.10" > "6.9")."""
    parts = re.findall(r"\d+|[^\d.+-]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _has_tcmu(modules_dir: Path) -> bool:
    target_dir = modules_dir / "kernel" / "drivers" / "target"
    # Debian ships plain .ko; other distributions compress (.ko.xz, .ko.zst).
    return any(target_dir.glob("target_core_user.ko*"))


def find_kernel(boot: Path | str = "/boot", modules: Path | str = "/lib/modules") -> Path:
    """Return the newest ``vmlinuz-*-amd64`` under ``boot`` that has ``target_core_user``.

    Raises LabError naming what is missing when no kernel qualifies.
    """
    boot, modules = Path(boot), Path(modules)
    candidates: list[tuple[str, Path]] = []
    for image in boot.glob("vmlinuz-*"):
        m = _VMLINUZ_RE.match(image.name)
        if m and _has_tcmu(modules / m["ver"]):
            candidates.append((m["ver"], image))
    if not candidates:
        raise LabError(
            f"no {boot}/vmlinuz-*-amd64 with target_core_user.ko under {modules}/<version>; "
            "install linux-image-amd64 (bash scripts/bootstrap.sh does)"
        )
    candidates.sort(key=lambda c: kernel_version_key(c[0]))
    return candidates[-1][1]


def find_vng() -> Path:
    """Locate the ``vng`` launcher: next to the running interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / "vng"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("vng")
    if found:
        return Path(found)
    raise LabError("vng (virtme-ng) not found; pip install virtme-ng (scripts/bootstrap.sh does)")


def _check_host_tools() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 not found; apt-get install qemu-system-x86")
    # virtme-ng's initramfs needs a statically linked busybox.
    for path in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"):
        if Path(path).exists():
            return
    raise LabError("static busybox not found; apt-get install busybox-static")


def guest_prelude(*, scratch_size: str = "50%") -> str:
    """Shell text that prepares a fresh guest; run it before anything else in a guest script.

    After it: configfs is mounted at /sys/kernel/config with LIO, TCMU, tcm_loop, iSCSI and the
    SCSI upper-level drivers loaded; ``lo`` is up (127.0.0.1 usable); /etc/target exists (rtslib-fb
    refuses to work without it); HOME points at a writable directory; ``$TCMU_PY_SCRATCH`` is a
    fresh tmpfs. It fails the script (``exit 97``) if a module cannot be loaded.
    """
    modules = " ".join(GUEST_MODULES)
    return f"""\
# --- tcmu-py guest prelude ---
export HOME={GUEST_HOME} PYTHONDONTWRITEBYTECODE=1 TCMU_PY_SCRATCH={GUEST_SCRATCH}
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
mkdir -p "$HOME" /etc/target {GUEST_SCRATCH}
mount -t tmpfs -o size={scratch_size} tcmu-py-scratch {GUEST_SCRATCH}
modprobe configfs
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
# modprobe -a: every argument is a module (without -a the rest would be module parameters).
modprobe -a {modules} || {{ echo "tcmu-py prelude: modprobe failed" >&2; exit 97; }}
ip link set lo up
# --- end of prelude ---
"""


def guest_epilogue() -> str:
    """Shell text run after every guest script (run_in_vm adds it): takes the SCSI devices of
    tcm_loop offline so that power-off does not hang.

    At power-off the kernel's sd driver sends SYNCHRONIZE CACHE to every disk with a write cache.
    A TCMU device whose daemon has stopped (or left it blocked, as ``tcmu-py serve`` does on
    SIGTERM so that I/O waits for its restart) never answers, and the guest would never power
    off. An offline SCSI device fails new commands at once instead.
    """
    return """\
# --- tcmu-py guest epilogue ---
offlined=0
for sdev in /sys/class/scsi_device/*/device; do
    case "$(readlink -f "$sdev")" in
        */tcm_loop_adapter_*) echo offline > "$sdev/state" && offlined=$((offlined + 1)) ;;
    esac
done
echo "tcmu-py epilogue: $offlined tcm_loop SCSI device(s) taken offline; powering off"
"""


class _Terminated(BaseException):  # noqa: N818 - a signal, not an error
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the VM runs, turn SIGTERM/SIGHUP into _Terminated so that the VM's process group
    is killed before this process exits (it runs in its own session and would survive us).
    Only possible in the main thread; elsewhere signals keep their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise _Terminated(signum)

    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, raise_terminated) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


#: QEMU 7.2's C virtiofsd (Debian 12's qemu-system-common). Debian 12 has no Rust virtiofsd.
_QEMU_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")

_VIRTIOFSD_SHIM = """#!/bin/sh
# Written by tcmu_py.lab: virtme-ng speaks the Rust virtiofsd's options; run QEMU's C virtiofsd
# with the same meaning, and write the pid file virtme-ng waits for.
real={real}
sock= dir= cache=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --version|-V) exec "$real" --version ;;
        --help|-h) exec "$real" --help ;;
        --socket-path) sock=$2; shift ;;
        --shared-dir) dir=$2; shift ;;
        --cache) cache=$2; shift ;;
        --sandbox) shift ;;
    esac
    shift
done
[ -n "$sock" ] && [ -n "$dir" ] || exit 2
"$real" --socket-path="$sock" -o source="$dir",cache="$cache",sandbox=chroot,log_level=err \
    </dev/null >/dev/null 2>&1 &
echo $! >"$sock.pid"
"""


def _virtiofsd_shim(tmp: Path) -> Path | None:
    """A directory holding a ``virtiofsd`` that virtme-ng can drive, or None to leave it be.

    virtme-ng shares the host root over virtio-fs when it finds the Rust virtiofsd, else over 9p
    with no guest caching: every file a guest process opens is a round trip to the host, and a
    Python start in the guest took 4-6 s (1.3 s over virtio-fs, whose cache=always lets the
    guest keep pages). Debian 12 ships only QEMU's C virtiofsd, whose options differ and which
    must run as root; virtme-ng rejects it and falls back. This shim translates. The guest
    mounts the root read-only either way (the C daemon has no --readonly; virtme-ng asks for it
    only when ``--help`` lists it). TCMU_PY_LAB_9P=1 keeps 9p.
    """
    if os.environ.get("TCMU_PY_LAB_9P") == "1" or os.geteuid() != 0:
        return None
    if shutil.which("virtiofsd") is not None or not _QEMU_VIRTIOFSD.is_file():
        return None
    shim_dir = tmp / "virtiofsd-shim"
    shim_dir.mkdir()
    shim = shim_dir / "virtiofsd"
    shim.write_text(_VIRTIOFSD_SHIM.format(real=shlex.quote(str(_QEMU_VIRTIOFSD))))
    shim.chmod(0o755)
    return shim_dir


def compile_checkout() -> None:
    """Write the bytecode of this checkout's Python files (tcmu_py, handlers, tests) on the host.

    The guest sees the checkout read-only, so without ``__pycache__`` written here every Python
    process in it compiles each module it imports from source, under software emulation: that
    was most of the ~18 s a ``tcmu-py status`` took in the guest. Environments that set
    PYTHONDONTWRITEBYTECODE (or never ran the code on the host) have no bytecode otherwise.
    Best effort: an unwritable tree only costs time.
    """
    import compileall

    root = Path(__file__).resolve().parent.parent
    for sub in ("tcmu_py", "handlers", "tests"):
        if (root / sub).is_dir():
            with contextlib.suppress(OSError):
                compileall.compile_dir(root / sub, quiet=2, workers=0)


def run_in_vm(
    script: str,
    *,
    rwdirs: Sequence[str | os.PathLike[str]] = (),
    disks: Sequence[str | os.PathLike[str]] = (),
    memory: str = "2G",
    timeout: float,
    cpus: int | None = None,
    kernel: Path | str | None = None,
    log: Path | str | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Boot the lab kernel, run ``script`` with bash as root, return when the guest powers off.

    ``script`` may be any length: it is written to a temporary file on the host (visible to the
    guest through the shared root) rather than passed on the kernel command line, and run by a
    wrapper that then runs ``guest_epilogue()`` and exits with the script's status. Prepend
    ``guest_prelude()`` yourself if the script needs LIO. ``rwdirs`` are host directories the guest
    may write through to (they must exist). ``disks`` are host image files attached as virtio-blk
    disks, /dev/vda, /dev/vdb, ... in the guest in that order (the root is 9p, so they are the
    only vd* devices): unlike an rwdir, what the guest has not flushed to such a disk is lost
    when the guest crashes, as on real hardware. The console output (stdout and stderr of the guest
    command, merged, plus kernel messages) is returned as ``stdout``; with ``log`` it is also
    streamed to that file as it arrives. Raises LabError if the lab cannot run here and LabTimeout
    after killing the VM if it has not finished within ``timeout`` seconds.
    """
    _check_host_tools()
    vng = find_vng()
    image = Path(kernel) if kernel is not None else find_kernel()
    compile_checkout()
    for d in rwdirs:
        if not Path(d).is_dir():
            raise LabError(f"rwdir {d} does not exist")
    for d in disks:
        if not Path(d).is_file():
            raise LabError(f"disk image {d} does not exist")

    with tempfile.TemporaryDirectory(prefix="tcmu-py-lab-") as tmp:
        body_path = Path(tmp) / "body.sh"
        body_path.write_text(script)
        script_path = Path(tmp) / "guest.sh"
        script_path.write_text(
            f"bash {shlex.quote(str(body_path))}\nrc=$?\n{guest_epilogue()}exit $rc\n"
        )
        argv = [
            str(vng),
            "--disable-kvm",  # vm-lab.md: the stock kernel does not boot on this machine's KVM
            "--run",
            str(image),
            "--user",
            "root",
            "--memory",
            memory,
        ]
        if cpus is not None:
            argv += ["--cpus", str(cpus)]
        for d in rwdirs:
            argv += ["--rwdir", str(Path(d).resolve())]
        for d in disks:
            argv += ["--disk", str(Path(d).resolve())]
        argv += ["--", f"bash {shlex.quote(str(script_path))}"]

        run_env = dict(os.environ if env is None else env)
        # vng starts virtme-run by name: its directory must be on PATH.
        path = f"{vng.parent}{os.pathsep}{run_env.get('PATH', '/usr/bin:/bin')}"
        shim = _virtiofsd_shim(Path(tmp))
        if shim is not None:
            path = f"{shim}{os.pathsep}{path}"
        run_env["PATH"] = path
        log_file = open(log, "wb") if log is not None else None  # noqa: SIM115 - closed below
        chunks: list[bytes] = []
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(cwd) if cwd is not None else tmp,
                env=run_env,
                start_new_session=True,  # own process group: a timeout kills vng AND qemu
            )
            assert proc.stdout is not None
            deadline = time.monotonic() + timeout
            try:
                with _signals_raise():
                    _pump(proc, chunks, log_file, deadline)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out = b"".join(chunks).decode(errors="replace")
                raise LabTimeout(argv, timeout, output=out) from None
            except _Terminated as t:
                # We are being terminated (e.g. `timeout` around pytest): take the VM with us,
                # then let the signal do what it would have done.
                _kill_group(proc)
                signal.raise_signal(t.signum)
                raise
            except BaseException:
                _kill_group(proc)
                raise
            # The guest powered off; make sure no stray helper (virtiofsd, qemu) outlives it.
            _kill_group(proc)
        finally:
            if log_file is not None:
                log_file.close()
        out = b"".join(chunks).decode(errors="replace")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout=out, stderr="")


def _pump(
    proc: subprocess.Popen[bytes],
    chunks: list[bytes],
    log_file: BinaryIO | None,
    deadline: float,
) -> None:
    """Copy the VM's output until EOF and exit, raising TimeoutExpired at ``deadline``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        eof = False
        while not eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            if not sel.select(timeout=min(remaining, 1.0)):
                continue
            data = os.read(fd, 65536)
            if not data:
                eof = True
                break
            chunks.append(data)
            if log_file is not None:
                log_file.write(data)
                log_file.flush()
    remaining = deadline - time.monotonic()
    proc.wait(timeout=max(remaining, 0.001))


DEFAULT_LAB_COMMAND = "tcmu-py status; lsscsi"
SERVE_READY_TIMEOUT = 300  # seconds for `tcmu-py serve` to create and serve its devices
SERVE_STOP_TIMEOUT = 30  # seconds for it to drain and exit on SIGTERM


def serve_script(config: str | os.PathLike[str] | None, command: str) -> str:
    """Guest shell text: start ``tcmu-py serve`` (with ``-c config``, or the embedded default),
    wait (bounded) for its ready file, run ``command``, then stop the daemon with SIGTERM
    (bounded, then SIGKILL) and show the end of its log. Exits with ``command``'s status, or
    98 if the daemon did not become ready."""
    tcmu_py = shlex.quote(str(Path(sys.executable).parent / "tcmu-py"))
    source = f"-c {shlex.quote(str(Path(config).resolve()))}" if config else "--default"
    return f"""export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"
SERVE_LOG=$TCMU_PY_SCRATCH/serve.log SERVE_READY=$TCMU_PY_SCRATCH/serve.ready
mkdir -p /var/lib/tcmu-py  # the embedded default configuration keeps its images here
{tcmu_py} serve {source} --ready-file "$SERVE_READY" >"$SERVE_LOG" 2>&1 &
SERVE_PID=$!
deadline=$((SECONDS + {SERVE_READY_TIMEOUT}))
until [ -e "$SERVE_READY" ]; do
    if ! kill -0 $SERVE_PID 2>/dev/null; then
        echo "tcmu-py lab: tcmu-py serve exited before it was ready:"; cat "$SERVE_LOG"; exit 98
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "tcmu-py lab: tcmu-py serve not ready after {SERVE_READY_TIMEOUT}s:"; cat "$SERVE_LOG"
        kill -KILL $SERVE_PID; exit 98
    fi
    sleep 0.1
done
echo "tcmu-py lab: tcmu-py serve is ready (pid $SERVE_PID)"
( {command} )
rc=$?
kill -TERM $SERVE_PID
deadline=$((SECONDS + {SERVE_STOP_TIMEOUT}))
while kill -0 $SERVE_PID 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
        echo "tcmu-py lab: tcmu-py serve ignored SIGTERM for {SERVE_STOP_TIMEOUT}s; killing"
        kill -KILL $SERVE_PID; [ $rc -eq 0 ] && rc=99; break
    fi
    sleep 0.1
done
wait $SERVE_PID; echo "tcmu-py lab: tcmu-py serve exited with $?"
echo "--- end of the tcmu-py serve log ---"; tail -n 40 "$SERVE_LOG"
exit $rc
"""


def main(
    argv: Sequence[str] | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    command: str | Sequence[str] | None = None,
) -> int:
    """``tcmu-py lab`` / ``python -m tcmu_py.lab``: boot the lab kernel, run ``tcmu-py serve``
    there (configuration ``config``, default: the embedded one), run ``command`` in the guest
    (a shell command line; default: ``tcmu-py status; lsscsi``), stop the daemon, print the
    console output and the wall time. Exit status: the guest command's; 2 if the lab cannot run
    here; 124 if the VM timed out. Called with ``argv`` it parses options instead (see --help).
    """
    import argparse

    ap = argparse.ArgumentParser(prog="tcmu-py lab", description=main.__doc__)
    ap.add_argument("-c", "--config", default=config, help="YAML configuration for tcmu-py serve")
    ap.add_argument("--no-serve", action="store_true", help="only the prelude, no daemon")
    ap.add_argument("--fabrics", action="store_true",
                    help="bring up soft-RoCE (SRP, iSER) and FCoE on a veth pair, and a dummy"
                    " UDC with the out-of-tree usb_f_tcm (USB), in the guest first"
                    " (tcmu_py.lab_fabrics; prints the port names as JSON)")
    ap.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    ap.add_argument("--cpus", type=int, default=None, help="guest CPUs (default: vng's)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before the VM is killed")
    ap.add_argument("--rwdir", action="append", default=[], help="host dir writable in the guest")
    ap.add_argument("--kernel", default=None, help="kernel image (default: find_kernel())")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="shell command to run in the guest")
    args = ap.parse_args(list(argv) if argv is not None else [])
    words = args.command if argv is not None else (
        [command] if isinstance(command, str) else list(command or [])
    )
    line = " ".join(w for w in words if w != "--") or DEFAULT_LAB_COMMAND
    body = line if args.no_serve else serve_script(args.config, line)
    if args.fabrics:
        body = f"{shlex.quote(sys.executable)} -m tcmu_py.lab_fabrics up\n" + body
    start = time.monotonic()
    try:
        proc = run_in_vm(
            guest_prelude() + body + "\n",
            rwdirs=args.rwdir,
            memory=args.memory,
            cpus=args.cpus,
            timeout=args.timeout,
            kernel=args.kernel,
            cwd=os.getcwd(),
        )
    except LabError as e:
        print(f"tcmu-py lab: {e}", file=sys.stderr)
        return 2
    except LabTimeout as e:
        sys.stdout.write(str(e.output or ""))
        print(f"tcmu-py lab: VM killed after {args.timeout:g}s", file=sys.stderr)
        return 124
    sys.stdout.write(proc.stdout)
    print(f"tcmu-py lab: guest exited {proc.returncode} after {time.monotonic() - start:.1f}s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
