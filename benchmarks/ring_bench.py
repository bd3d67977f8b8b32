"""Ring microbenchmark: FakeKernel -> Ring -> DeviceRunner -> null / raw / thin handler, one core.

    .venv/bin/python benchmarks/ring_bench.py [--seconds 3] [--qd 32] [--plane on|off|both]
        [--handlers null,raw,thin] [--workloads 4k-randread,4k-randwrite,1m-seqread,1m-seqwrite]
        [--json out.json]

Workloads: 4 KiB random read, 4 KiB random write (commands/s), 1 MiB sequential read and write
(MB/s). Each figure is split into the engine's side (ring dequeue, dispatch, handler, completion:
what runs in production) and the fake kernel's (building entries, copying data, reaping), measured
by timing the fake kernel's calls separately. The engine-side rate is the one that matters: the
real kernel's side costs what it costs whatever the daemon is written in. On a loaded host the
wall-clock split counts other processes' time too: `engine_cpu_*` is the loop thread's CPU time
(less the fake kernel's kicks), which holds better under load; it counts everything only for
devices served entirely on the loop thread (null, raw on tmpfs — as here), not for worker pools.

`--plane` runs the engine with the C data plane (`tcmu_py.ring.DataPlane`) on, off, or both (the
default): the raw handler declares its image as a file extent, so with the plane on its plain
READ/WRITE never reach Python; the null handler declares none and is served by Python either way.
The thin disk (a pool in the same tmpfs directory) is written whole before each run, so every
unit is allocated and the plane serves all of it (`in_c` 1.0), as on a disk in use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from typing import Any

from tcmu_py.device.runner import DeviceRunner
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullHandler
from tcmu_py.handlers.raw import RawHandler
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.testing import FakeKernel, FakeUio, cdbs

BS = 512
SIZE = 256 * 1024 * 1024


class TimedUio:
    """FakeUio whose kick (the fake kernel reaping) is timed apart from the engine."""

    def __init__(self, uio: FakeUio) -> None:
        self._uio = uio
        self.buffer = uio.buffer
        self.kernel_seconds = 0.0
        self.kernel_cpu = 0.0  # CPU of the kicking thread in the fake kernel
        # The real kernel serialises itself; the fake one is plain Python, and workers kick
        # from their own threads.
        self.lock = threading.Lock()

    def fileno(self) -> int:
        return self._uio.fileno()

    def clear_event(self) -> None:
        self._uio.clear_event()

    def kick(self) -> None:
        with self.lock:
            t = time.perf_counter()
            c = time.thread_time()
            self._uio.kick()
            self.kernel_cpu += time.thread_time() - c
            self.kernel_seconds += time.perf_counter() - t


def run(
    handler: Any, cfgstring: str, workload: str, seconds: float, qd: int, plane: bool = True,
    prefill: bool = False,
) -> dict[str, Any]:
    xfer = 4096 if workload.startswith("4k") else 1 << 20
    writing = "write" in workload
    kernel = FakeKernel(cmdr_size=1 << 20, data_size=max(64, 2 * qd) * xfer + (1 << 20))
    uio = TimedUio(FakeUio(kernel))
    config = DeviceConfig("bench", handler.subtype, cfgstring, SIZE, BS, hw_max_sectors=2048)
    device = handler.open(config)
    if handler is ThinHandler or (prefill and handler.subtype == "raw"):
        # Allocate every unit first (as after a first pass of writes): the plane serves only
        # allocated units, and the workload would otherwise measure allocation. A raw image is
        # sparse until written: `prefill` measures writes into allocated pages, as a disk in use.
        chunk = memoryview(b"\x5a" * (1 << 20))
        for off in range(0, SIZE, len(chunk)):
            device.backend.write(off, [chunk])  # type: ignore[attr-defined]
    # Stepped with process(): the stage-1 plane, in this thread (the native loop's own thread
    # is measured in the VM, benchmarks/vm_bench.py).
    runner = DeviceRunner(uio, device, workers=4, data_plane=plane, native=False)
    blocks = xfer // BS
    nblk = SIZE // BS
    rng = random.Random(1)
    payload = os.urandom(xfer)
    kernel_s = engine_s = engine_cpu = 0.0
    done = 0
    lba = 0
    # consume the power-on unit attention
    kernel.submit(cdbs.test_unit_ready())
    runner.process()
    t_end = time.perf_counter() + seconds
    wall0 = time.perf_counter()
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        pend = []
        for _ in range(qd):
            if workload.startswith("4k"):
                lba = rng.randrange(0, nblk - blocks) // 8 * 8
            else:
                lba = (lba + blocks) % (nblk - blocks)
            with uio.lock:
                if writing:
                    pend.append(kernel.submit(cdbs.write16(lba, blocks), data_out=payload))
                else:
                    pend.append(kernel.submit(cdbs.read16(lba, blocks), data_in_len=xfer))
        t1 = time.perf_counter()
        kernel_s += t1 - t0
        uio.kernel_seconds = uio.kernel_cpu = 0.0
        c1 = time.thread_time()
        while not all(p.done for p in pend):
            runner.process()
        engine_s += time.perf_counter() - t1 - uio.kernel_seconds
        engine_cpu += time.thread_time() - c1 - uio.kernel_cpu
        kernel_s += uio.kernel_seconds
        done += len(pend)
        bad = [p for p in pend if p.status != 0]
        if bad:
            raise SystemExit(f"{workload}: command failed: {bad[0]}")
    wall = time.perf_counter() - wall0
    executed = runner.plane.executed if runner.plane is not None else 0
    runner.close()
    out = {
        "handler": handler.subtype,
        "workload": workload,
        "plane": "on" if plane else "off",
        "in_c": round(executed / max(1, done), 3),
        "commands": done,
        "wall_s": round(wall, 3),
        "engine_us_per_cmd": round(1e6 * engine_s / done, 2),
        "kernel_us_per_cmd": round(1e6 * kernel_s / done, 2),
        "engine_cmds_per_s": round(done / engine_s),
        # CPU time of the loop thread (less the fake kernel's kicks): the figure that holds better
        # on a loaded host; complete only for devices served on the loop thread (null, raw/tmpfs).
        "engine_cpu_us_per_cmd": round(1e6 * engine_cpu / done, 2),
        "engine_cpu_cmds_per_s": round(done / engine_cpu) if engine_cpu > 0 else None,
        "total_cmds_per_s": round(done / wall),
    }
    if xfer >= 1 << 20:
        out["engine_MB_per_s"] = round(done * xfer / engine_s / 1e6, 1)
        out["total_MB_per_s"] = round(done * xfer / wall / 1e6, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--plane", choices=("on", "off", "both"), default="both")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--prefill", action="store_true",
                    help="write the raw image whole first (writes then land in allocated pages)")
    ap.add_argument("--handlers", default="null,raw,thin",
                    help="comma-separated, of null, raw, thin (default all)")
    ap.add_argument("--workloads", default="4k-randread,4k-randwrite,1m-seqread,1m-seqwrite",
                    help="comma-separated (default all four)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        img = os.path.join(d, "bench.img")
        pool = os.path.join(d, "pool")
        planes = {"on": (True,), "off": (False,), "both": (False, True)}[args.plane]
        handlers = {"null": (NullHandler, ""), "raw": (RawHandler, img),
                    "thin": (ThinHandler, f"pool={pool};disk=bench")}
        wanted = [handlers[h] for h in args.handlers.split(",")]
        if ThinHandler in (h for h, _ in wanted):
            create_pool(pool, "bench", 2 * SIZE, None)
        for handler, cfg in wanted:
            for wl in args.workloads.split(","):
                qd = args.qd if wl.startswith("4k") else 8
                for plane in planes:
                    r = run(handler, cfg, wl, args.seconds, qd, plane, args.prefill)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"cpu": os.cpu_count(), "python": sys.version.split()[0], "results": results},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
