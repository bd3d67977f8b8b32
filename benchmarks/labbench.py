"""What the lab benchmarks share (`dedup_vs_raw`, `mirror_vs_raw`, `thin_vs_raw`, `ceph_vs_runner`):
one lab VM boot runs the benchmark script again inside with ``--guest``; there one
`tcmu-py serve` serves the disks under test, exported through tcm_loop.

Host side: `boot_guest`. Guest side (import inside the guest only: it uses tests/kernel's
guestlib): `full_image`, `GuestDisks`. Options: `arg_parser`. Workload selection: `select`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from guestlib import UserBackstore

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
#: Seconds before the kernel (TCMU and the SCSI midlayer) gives up on a command: a loaded,
#: emulated guest can take longer than the default 30 s for a queue of 1 MiB writes; a
#: benchmark measures throughput, a timeout would only fail it.
CMD_TIMEOUT = 300

W = TypeVar("W", bound=tuple[Any, ...])


def py_spy_record(pid: int | str, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling process `pid` for `seconds` (97 Hz, every thread, without
    stopping it) into `output` as collapsed stacks; the caller `communicate`s with it. py-spy is
    the one on PATH, else the one beside this interpreter (the venv's)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(seconds),
                             "--rate", "97", "--format", "raw", "--threads", "--nonblocking",
                             "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def select(workloads: Sequence[W], only: str | None) -> tuple[W, ...]:
    """The workloads (tuples named by their first item) listed in `only` (comma-separated;
    all when None). SystemExit naming the known ones for an unknown name."""
    if only is None:
        return tuple(workloads)
    names = only.split(",")
    unknown = set(names) - {w[0] for w in workloads}
    if unknown:
        raise SystemExit(f"--only: unknown workload(s) {sorted(unknown)}; expected names from "
                         f"{[w[0] for w in workloads]}")
    return tuple(w for w in workloads if w[0] in names)


def arg_parser(doc: str, name: str, *, seconds: float, reps: int, size_mib: int,
               only: bool = True) -> argparse.ArgumentParser:
    """The options every lab benchmark takes: ``--out`` (default results/`name`),
    ``--seconds`` per run, ``--reps``, ``--size-mib`` of each disk, ``--only`` (a
    comma-separated workload list, for `select`; left out with `only` False) and the hidden
    ``--guest`` (the script's run inside the VM). The script adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / name)
    ap.add_argument("--seconds", type=float, default=seconds)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--size-mib", type=int, default=size_mib)
    if only:
        ap.add_argument("--only", default=None,
                        help="comma-separated workload names (default: all)")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    return ap


# --------------------------------------------------------------------------------------------
# Host side


def boot_guest(script: Path, guest_args: Sequence[str], out: Path, timeout: float) -> Any:
    """Boot the lab kernel once and run ``script --guest --out OUT *guest_args`` inside (OUT
    writable, stale ``runs.json``/``done.json`` removed first). Returns the parsed
    ``OUT/runs.json``, or None (after saying where to look) when the guest wrote none."""
    from tcmu_py import lab

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs.json", "done.json"):
        (out / stale).unlink(missing_ok=True)
    cmd = [sys.executable, str(script.resolve()), "--guest", "--out", str(out), *guest_args]
    shell = lab.guest_prelude() + f"cd {shlex.quote(str(REPO))}\nexec {shlex.join(cmd)}\n"
    t0 = time.monotonic()
    proc = lab.run_in_vm(shell, rwdirs=[out], memory="2G", timeout=timeout,
                         log=out / "console.log", cwd=REPO)
    print(f"VM exit {proc.returncode} after {time.monotonic() - t0:.0f}s")
    runs_file = out / "runs.json"
    if not runs_file.exists():
        print("no runs.json: see", out / "console.log")
        return None
    return json.loads(runs_file.read_text())


# --------------------------------------------------------------------------------------------
# Guest side


def full_image(path: Path, size: int) -> None:
    """A raw image of `size` bytes (a multiple of 1 MiB) written whole with random data:
    fully allocated, like a provisioned one."""
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(block)


class GuestDisks:
    """One `tcmu-py serve` (run dir under `work`, log ``OUT/serve.log``) and the disks it
    serves, each exported through tcm_loop with the benchmarks' settings: WCE=1
    (``emulate_write_cache``), 512 KiB commands, a 64 MiB data area, `CMD_TIMEOUT`, I/O
    scheduler "none". Everything is removed, and the daemon stopped, by `cleanup`
    (guestlib's `Cleanup`)."""

    def __init__(self, work: Path, out: Path, cleanup: Any,
                 serve_args: Sequence[str] = ()) -> None:
        """`serve_args`: more options of `tcmu-py serve` (``--no-native-loop``)."""
        sys.path.insert(0, str(REPO / "tests" / "kernel"))
        from guestlib import Daemon

        self.cleanup = cleanup
        self.run_dir = work / "run"
        ready = work / "ready"
        daemon = Daemon([sys.executable, "-m", "tcmu_py.cli", "serve", "--run-dir",
                         str(self.run_dir), "--ready-file", str(ready), *serve_args],
                        out / "serve.log")
        cleanup.callback(daemon.stop)
        daemon.start(ready=ready.exists, timeout=300)
        self._hba = 0

    def served(self, name: str) -> bool:
        """Whether the daemon serves device `name` (and it did not fail to open)."""
        from tcmu_py.daemon.control import query_status
        from tcmu_py.errors import TcmuError

        try:
            st = query_status(self.run_dir, timeout=2)
        except TcmuError:
            return False
        return any(d["name"] == name and not d["failed"] for d in st["devices"])

    def export(self, name: str, config: str, size: int,
               served: Callable[[UserBackstore], bool] | None = None,
               write_cache: bool = True, cleanup: Any = None) -> Path:
        """Create backstore `name` (dev_config `config`, `size` bytes), wait until the daemon
        serves it (`served`, for a backstore another daemon serves, e.g. tcmu-runner; by
        default: this daemon's status lists it), export it on a tcm_loop LUN; returns its
        block device. `write_cache`: ``emulate_write_cache`` (WCE), on by default. `cleanup`:
        where the LUN's and the backstore's removal is registered (an `ExitStack`; default:
        the daemon's, i.e. at the end)."""
        from guestlib import (
            DEFAULT_CONTROL,
            UserBackstore,
            create_loopback_lun,
            log,
            wait_for,
            write_attr,
        )

        self._hba += 1
        bs = UserBackstore(self._hba, name, config, size)
        owner = cleanup if cleanup is not None else self.cleanup
        bs.path.mkdir(parents=True)
        owner.callback(bs.remove)
        control = {"dev_config": config, "dev_size": size, **DEFAULT_CONTROL,
                   "hw_max_sectors": 1024, "max_data_area_mb": 64}
        for key, value in control.items():
            write_attr(bs.path / "control", f"{key}={value}")
        write_attr(bs.path / "attrib" / "emulate_write_cache", int(write_cache))
        write_attr(bs.path / "enable", 1)
        wait_for(lambda: served(bs) if served else self.served(name), 120,
                 f"daemon serving {name}")
        write_attr(bs.path / "attrib" / "cmd_time_out", CMD_TIMEOUT)
        lun = create_loopback_lun(bs, cleanup=owner)
        dev: Path = lun.wait_device("block", 180)
        write_attr(Path("/sys/block") / dev.name / "device" / "timeout", CMD_TIMEOUT)
        write_attr(Path("/sys/block") / dev.name / "queue" / "scheduler", "none")
        log(f"{name}: {dev}")
        return dev
