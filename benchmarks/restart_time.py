"""Restart-to-serving time of `tcmu-py serve`, natively, against the unit tests' fakes.

    .venv/bin/python benchmarks/restart_time.py [--reps 7] [--devices 2] [--config] [--importtime]

Each repetition starts a fresh interpreter running ``tcmu-py serve`` (`tcmu_py.cli.main`, the
real code path) with the daemon pointed at a fake /sys/class/uio and configfs (as
tests/unit/test_daemon.py does) whose uio devices are `FakeKernel` rings that already hold one
command, as a ring does when a daemon restarts under I/O. The time reported is from just before
the process is spawned to the moment the first of those commands is completed (the fake kernel
reaps it); the child then exits at once. Netlink and the udev monitor are left on, as in
production: where the host has no TCM-USER family or udev socket they fail after their imports,
which is the cost that matters here.

``--config`` also passes ``-c`` with a YAML file declaring the same devices (the daemon loads
and validates it; creating LIO objects fails without configfs, after the first command).
``--importtime`` runs once more with ``python -X importtime`` and lists the slowest top-level
imports done before the first command was served, and whether pyudev, rtslib_fb and yaml were
among them.

Output: one line per repetition, then min / median; ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MIB = 1 << 20
MARKER = "### restart_time: first command served"
WATCHED = ("pyudev", "rtslib_fb", "yaml")

# The child: make tcmu-py serve use the fake host, then run the real command line.
CHILD = textwrap.dedent(
    '''
    import os, sys, threading, time, types
    T_MAIN = time.time()
    FIRST = threading.Lock()  # the first device to complete its command reports and exits
    ROOT, ARGV = sys.argv[1], sys.argv[2:]

    def _fake_kit():
        # tcmu_py.testing's __init__ imports the conformance kit too: load only the two modules
        # the fake host needs, so the measured imports are the daemon's own.
        import tcmu_py
        pkg = types.ModuleType("tcmu_py.testing")
        pkg.__path__ = [os.path.join(os.path.dirname(tcmu_py.__file__), "testing")]
        sys.modules.setdefault("tcmu_py.testing", pkg)
        from tcmu_py.testing.fake_kernel import FakeKernel
        from tcmu_py.testing.fake_uio import FakeUio
        return FakeKernel, FakeUio

    def opener(dev_path, sysfs_dir):
        FakeKernel, FakeUio = _fake_kit()
        kernel = FakeKernel(cmdr_size=16384, data_size=1 << 20)
        # A command waiting on the ring when the daemon (re)starts: TEST UNIT READY.
        pending = kernel.submit(bytes(6), b"", 0)
        uio = FakeUio(kernel)
        kick = uio.kick

        def watched_kick():
            kick()
            if pending.done and FIRST.acquire(blocking=False):
                print(MARKER, file=sys.stderr, flush=True)
                print(repr({"served": time.time(), "main": T_MAIN,
                            "modules": sorted({m.partition(".")[0] for m in sys.modules})}),
                      flush=True)
                os._exit(0)

        uio.kick = watched_kick
        return uio

    from tcmu_py import cli
    from tcmu_py.daemon import serve

    class FakeHostDaemon(serve.Daemon):
        def __init__(self, **kw):
            kw.update(configfs_root=os.path.join(ROOT, "configfs"),
                      uio_class=os.path.join(ROOT, "sys/class/uio"), uio_opener=opener)
            super().__init__(**kw)

    serve.Daemon = FakeHostDaemon
    sys.exit(cli.main(ARGV))
    '''
).replace("MARKER", repr(MARKER))


def make_host(root: Path, devices: int) -> Path:
    """The fake sysfs/configfs tree (as tests/unit/test_daemon.py's Host) and a YAML config
    declaring the same devices: raw images in `root`, every other one a null device."""
    uio_class = root / "sys/class/uio"
    uio_class.mkdir(parents=True)
    yaml_devices = []
    for i in range(devices):
        name = f"disk{i}"
        if i % 2 == 0:
            img = root / f"{name}.img"
            dev_config, handler, opts = f"raw/{img}", "raw", f"{{path: {img}}}"
        else:
            dev_config, handler, opts = "null/", "\"null\"", "{}"
        (uio_class / f"uio{i}").mkdir()
        (uio_class / f"uio{i}" / "name").write_text(f"tcm-user/{i}/{name}/{dev_config}\n")
        d = root / "configfs" / f"user_{i}" / name
        for sub in ("attrib", "action", "wwn"):
            (d / sub).mkdir(parents=True)
        for attr, value in (("dev_size", 4 * MIB), ("hw_block_size", 512),
                            ("hw_max_sectors", 1024), ("emulate_write_cache", 0)):
            (d / "attrib" / attr).write_text(f"{value}\n")
        (d / "wwn" / "vpd_unit_serial").write_text(f"T10 VPD Unit Serial Number: s-{name}\n")
        (d / "enable").write_text("1\n")
        yaml_devices.append(f"  - {{name: {name}, handler: {handler}, size: 4M, options: {opts}}}")
    config = root / "config.yaml"
    config.write_text(f"state_dir: {root / 'state'}\ndevices:\n" + "\n".join(yaml_devices)
                      + "\nexports:\n  loopback: [{device: disk0}]\n")
    return config


def run_once(root: Path, config: Path | None, importtime: bool = False) -> dict:
    run_dir = root / "run"
    argv = ["serve", "--run-dir", str(run_dir)] + (["-c", str(config)] if config else [])
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + [
        "-c", CHILD, str(root), *argv]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"the daemon served nothing (exit {proc.returncode}):\n{proc.stderr}")
    got = eval(lines[-1], {})  # noqa: S307 - our own child's repr of plain data
    out = {"total_s": got["served"] - start, "interpreter_s": got["main"] - start,
           "imported": [m for m in WATCHED if m in got["modules"]]}
    if importtime:
        out["imports"] = _slowest_imports(proc.stderr)
    return out


def _slowest_imports(stderr: str, top: int = 12) -> list[tuple[str, float]]:
    """Top-level imports (cumulative ms) done before the marker, slowest first."""
    found = []
    for line in stderr.splitlines():
        if line.startswith(MARKER):
            break
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        # Top-level imports are indented by one space, the ones they cause by more.
        if not cumulative.strip().isdigit() or name.startswith("  "):
            continue
        found.append((name.strip(), int(cumulative) / 1000))
    return sorted(found, key=lambda x: -x[1])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--config", action="store_true", help="serve -c with a YAML config too")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="tcmu-restart-") as tmp:
            config = make_host(Path(tmp), args.devices)
            r = run_once(Path(tmp), config if args.config else None)
        runs.append(r)
        if not args.json:
            print(f"run {rep}: first command served {r['total_s'] * 1000:7.1f} ms after spawn"
                  f" (interpreter up at {r['interpreter_s'] * 1000:5.1f} ms); imported before:"
                  f" {', '.join(r['imported']) or 'none of ' + '/'.join(WATCHED)}")
    totals = [r["total_s"] * 1000 for r in runs]
    summary = {"reps": len(runs), "devices": args.devices, "config": args.config,
               "min_ms": round(min(totals), 1), "median_ms": round(statistics.median(totals), 1),
               "imported_before_serving": runs[-1]["imported"]}
    if args.importtime:
        with tempfile.TemporaryDirectory(prefix="tcmu-restart-") as tmp:
            config = make_host(Path(tmp), args.devices)
            summary["slowest_imports_ms"] = run_once(
                Path(tmp), config if args.config else None, importtime=True)["imports"]
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"restart to first command served: min {summary['min_ms']} ms, median"
              f" {summary['median_ms']} ms over {len(runs)} runs ({args.devices} devices"
              f"{', with -c' if args.config else ''})")
        for name, ms in summary.get("slowest_imports_ms", []):
            print(f"  import before serving: {name:24s} {ms:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
