"""TMR/abort stress and device add/remove-under-load stress, through the production Ring and
DeviceRunner over FakeKernel (issue 11: they found D2 and D3).

    .venv/bin/python benchmarks/stress_tmr.py [--suite tmr|remove|all] [--seed 1] [--seeds 4]
        [--commands 20000] [--rounds 400] [--minutes 2] [--json out.json]

`tmr`: random writes and reads on a raw image, random ABORT TASK / ABORT TASK SET / LUN RESET
naming commands on the ring — including commands userspace has completed and the kernel has not
reaped yet (kicks are held back at random) — and the kernel reusing their ids. Checks: every
command is completed exactly once (FakeKernel breaks the ring on a double or unknown completion,
`assert_idle` finds lost ones); no command that no TMR named is answered TASK ABORTED
("escapes"); every write answered GOOD is in the image and every read returns what the image
held ("lost"); no other status appears. Half the seeds run every command on the driving thread
(deterministic), half hand writes to the worker pool.

`remove`: several raw devices served by `run()` on their own threads, each image written with
its own tag; devices are removed (stop, a short join, close — as `Daemon.remove` does) while
their backend is inside a write, and new devices are opened at once (taking the freed fd
numbers). Checks: no block of any image holds another device's tag ("misplaced"), every write
answered GOOD is in its own image, and every removed device is closed once its last command
ends ("hung": not within the deadline).

The unit suite (tests/unit/test_engine_stress.py) runs both with fixed seeds and small counts;
this script runs them longer and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.device.runner import DeviceRunner
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.raw import RawBackend
from tcmu_py.ring import TmrType
from tcmu_py.scsi.constants import Status
from tcmu_py.testing import FakeKernel, FakeUio, Pending, cdbs

BS = 512


class _LockedUio:
    """FakeUio whose kernel side is entered under `lock`; kicks can be held back (the kernel
    has not looked at cmd_tail yet: completed commands stay unreaped)."""

    def __init__(self, kernel: FakeKernel, lock: threading.Condition) -> None:
        self._uio = FakeUio(kernel)
        self.kernel = kernel
        self.buffer = kernel.buffer
        self.lock = lock
        self.hold = False

    def fileno(self) -> int:
        return self._uio.fileno()

    def clear_event(self) -> None:
        self._uio.clear_event()

    def kick(self) -> None:
        with self.lock:
            if not self.hold:
                self._uio.kick()
            self.lock.notify_all()

    def release(self) -> None:
        """Deliver held kicks (call with `lock` held)."""
        self.hold = False
        self._uio.kick()
        self.lock.notify_all()

    def close(self) -> None:
        self._uio.close()


# --------------------------------------------------------------------------------------------
# TMR / abort stress


@dataclass
class TmrFigures:
    seed: int
    mode: str = ""
    commands: int = 0  # commands submitted, every one completed exactly once
    writes_good: int = 0
    reads_good: int = 0
    tmrs: int = 0
    named: int = 0  # commands named by a TMR, of which:
    named_before_dequeue: int = 0  # ... still on the ring (or queued) for userspace
    named_in_flight: int = 0  # ... dequeued, not completed
    named_after_completion: int = 0  # ... completed by userspace, not reaped by the kernel
    ids_reused_after_tmr: int = 0  # later commands that got the id of such a command
    aborted: int = 0  # TASK ABORTED answers (all for named commands)
    aborted_in_queue: int = 0  # ... by the kernel: named while waiting for ring space
    escapes: int = 0  # TASK ABORTED for a command no TMR named
    lost: int = 0  # GOOD writes missing from the image, reads that returned other data
    unexpected: int = 0  # any other status
    seconds: float = 0.0


@dataclass(eq=False)
class _Cmd:
    p: Pending
    kind: str
    lba: int
    blocks: int
    data: bytes = b""
    named: bool = False
    dequeued: bool = False


class _SlowWrites(RawBackend):
    """Every seventh block's writes take a millisecond: pool chunks are still running when later
    TMRs arrive. (The delay depends on the offset only: the same for every run of a seed.)"""

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if offset // BS % 7 == 0:
            time.sleep(0.001)  # the simulated disk
        super().write(offset, bufs)


def tmr_stress(
    seed: int, commands: int, workdir: Path, *, blocks: int = 256, timeout: float = 60.0
) -> TmrFigures:
    """Run `commands` commands with random TMRs on a raw image under `workdir`."""
    rng = random.Random(seed)
    inline = seed % 2 == 1
    fig = TmrFigures(seed, "inline" if inline else "pool")
    t0 = time.monotonic()
    path = workdir / f"tmr-{seed}.img"
    backend = _SlowWrites(str(path), blocks * BS, BS)
    dev = open_block_device(DeviceConfig(f"t{seed}", "raw", str(path), blocks * BS), backend)
    dev._all_inline = inline  # both execution paths of the runner, whatever file system
    # A data area of 12 pages for up to 24 commands: some wait for space (the kernel's qfull
    # queue), where an abort is answered by the kernel itself.
    kernel = FakeKernel(cmdr_size=8192, data_size=12 * 4096)
    lock = threading.Condition()
    uio = _LockedUio(kernel, lock)
    runner = DeviceRunner(uio, dev, workers=4, name=f"t{seed}")
    model = bytearray(blocks * BS)
    live: list[_Cmd] = []  # submitted, not done
    completed_named: set[int] = set()  # ids named while completed-but-unreaped
    submitted = 0
    deadline = t0 + timeout

    def busy(lba: int, n: int) -> bool:
        return any(c.lba < lba + n and lba < c.lba + c.blocks for c in live)

    def settle() -> None:
        """Account for commands the kernel has answered (call with `lock` held)."""
        for c in [c for c in live if c.p.done]:
            live.remove(c)
            st = c.p.status
            if st == Status.TASK_ABORTED:
                fig.aborted += 1
                fig.aborted_in_queue += c.p.aborted
                fig.escapes += not c.named
            elif st != Status.GOOD:
                fig.unexpected += 1
            elif c.kind == "write":
                fig.writes_good += 1
                model[c.lba * BS : (c.lba + c.blocks) * BS] = c.data
            else:
                fig.reads_good += 1
                fig.lost += c.p.data_in != c.data

    def submit() -> None:
        nonlocal submitted
        n = rng.randint(1, 8)
        for _ in range(4):
            lba = rng.randrange(blocks - n + 1)
            if not busy(lba, n):
                break
        else:
            return
        if rng.random() < 0.75:
            data = rng.randbytes(n * BS)
            c = _Cmd(kernel.submit(cdbs.write10(lba, n), data_out=data), "write", lba, n, data)
        else:
            # Nothing overlapping is in flight: the read must see the model as it is now.
            expect = bytes(model[lba * BS : (lba + n) * BS])
            c = _Cmd(kernel.submit(cdbs.read10(lba, n), data_in_len=n * BS), "read", lba, n, expect)
        submitted += 1
        if c.p.cmd_id is not None and c.p.cmd_id in completed_named:
            fig.ids_reused_after_tmr += 1
            completed_named.discard(c.p.cmd_id)
        live.append(c)

    def tmr() -> None:
        candidates = [c for c in live if not c.p.done]
        if not candidates:
            return
        kind = rng.choice([TmrType.ABORT_TASK] * 3 + [TmrType.ABORT_TASK_SET, TmrType.LUN_RESET])
        if kind == TmrType.ABORT_TASK:
            chosen = [rng.choice(candidates)]
        else:
            chosen = [c for c in candidates if rng.random() < 0.5] or candidates[:1]
        in_flight = runner.ring.in_flight_ids
        for c in chosen:
            c.named = True
            if not c.dequeued:
                fig.named_before_dequeue += 1
            elif c.p.cmd_id in in_flight:
                fig.named_in_flight += 1
            else:
                fig.named_after_completion += 1  # completed by userspace, not reaped yet
                completed_named.add(c.p.cmd_id or 0)
        fig.tmrs += 1
        fig.named += len(chosen)
        kernel.submit_tmr(kind, [c.p for c in chosen])

    def process() -> None:
        with lock:
            for c in live:  # everything on the ring now is dequeued by this call
                c.dequeued |= c.p.cmd_id is not None
        runner.process()

    try:
        with lock:
            tur = kernel.submit(cdbs.test_unit_ready())  # takes the power-on unit attention
        while not tur.done:
            runner.process()
        while submitted < commands or live:
            if time.monotonic() > deadline:
                raise AssertionError(f"seed {seed}: {len(live)} commands not completed in time")
            r = rng.random()
            ending = submitted >= commands
            if r < 0.35 or ending:
                process()
            with lock:
                if r < 0.35:
                    pass
                elif r < 0.75 and not ending and len(live) < 24:
                    submit()
                elif r < 0.83:
                    tmr()
                elif r < 0.92:
                    if uio.hold:
                        uio.release()
                    else:
                        uio.hold = True
                if ending:
                    if uio.hold:
                        uio.release()
                    if live and not any(c.p.cmd_id is not None and not c.dequeued for c in live):
                        lock.wait(0.002)  # the rest is on the workers: wait for their kicks
                settle()
        runner.drain()
        runner.process()
        with lock:
            uio.release()
            settle()
            kernel.assert_idle()  # nothing lost, nothing completed twice
        fig.commands = submitted
        with open(path, "rb") as f:
            image = f.read()
        for lba in range(blocks):
            fig.lost += image[lba * BS : (lba + 1) * BS] != model[lba * BS : (lba + 1) * BS]
    finally:
        runner.close()
        uio.close()
    fig.seconds = round(time.monotonic() - t0, 3)
    return fig


# --------------------------------------------------------------------------------------------
# Device add/remove under load


@dataclass
class RemoveFigures:
    seed: int
    devices: int = 0  # devices opened
    removed_under_load: int = 0  # removals while the backend was inside a write
    deferred_closes: int = 0  # closes that waited for a running command
    commands: int = 0
    writes_good: int = 0
    misplaced: int = 0  # blocks holding another device's tag
    lost: int = 0  # GOOD writes not in their own image
    hung: int = 0  # devices not closed within the deadline after removal
    seconds: float = 0.0


class _SlowRaw(RawBackend):
    """A raw image whose writes take a while (a busy disk): removal meets them mid-write."""

    def __init__(self, path: str, size: int, delays: Sequence[float]) -> None:
        super().__init__(path, size, BS)
        self.blocking = True
        self.delays = list(delays)
        self.writing = 0
        self.entered = threading.Event()
        self.closed = threading.Event()

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self.writing += 1
        self.entered.set()
        try:
            time.sleep(self.delays[offset // BS % len(self.delays)])  # the simulated disk
            super().write(offset, bufs)
        finally:
            self.writing -= 1

    def close(self) -> None:
        super().close()
        self.closed.set()


@dataclass(eq=False)
class _Served:
    index: int
    tag: bytes
    path: Path
    backend: _SlowRaw
    kernel: FakeKernel
    lock: threading.Condition
    uio: _LockedUio
    runner: DeviceRunner
    thread: threading.Thread
    writes: list[tuple[Pending, int, int]] = field(default_factory=list)
    uio_closed: threading.Event = field(default_factory=threading.Event)


def _tag(index: int) -> bytes:
    return struct.pack(">H", index + 1) * (BS // 2)


def remove_stress(
    seed: int,
    rounds: int,
    workdir: Path,
    *,
    alive: int = 3,
    blocks: int = 64,
    timeout: float = 60.0,
) -> RemoveFigures:
    """Open, load and remove devices for `rounds` rounds under `workdir`."""
    rng = random.Random(seed)
    fig = RemoveFigures(seed)
    t0 = time.monotonic()
    serving: list[_Served] = []
    removed: list[_Served] = []

    def open_one() -> None:
        i = fig.devices
        fig.devices += 1
        path = workdir / f"remove-{seed}-{i}.img"
        delays = [rng.choice((0.0, 0.0005, 0.002, 0.005)) for _ in range(8)]
        backend = _SlowRaw(str(path), blocks * BS, delays)
        dev: BlockDevice = open_block_device(
            DeviceConfig(f"d{i}", "raw", str(path), blocks * BS), backend
        )
        kernel = FakeKernel(cmdr_size=8192, data_size=128 * 1024)
        lock = threading.Condition()
        uio = _LockedUio(kernel, lock)
        runner = DeviceRunner(uio, dev, workers=rng.choice((1, 4)), name=f"d{i}")
        with lock:
            kernel.submit(cdbs.test_unit_ready())  # takes the power-on unit attention
        thread = threading.Thread(target=runner.run, name=f"stress-d{i}", daemon=True)
        thread.start()
        serving.append(_Served(i, _tag(i), path, backend, kernel, lock, uio, runner, thread))

    def load(s: _Served) -> None:
        with s.lock:
            for _ in range(rng.randint(1, 6)):
                n = rng.randint(1, 4)
                lba = rng.randrange(blocks - n + 1)
                p = s.kernel.submit(cdbs.write10(lba, n), data_out=s.tag * n)
                s.writes.append((p, lba, n))
                fig.commands += 1

    def remove(s: _Served) -> None:
        serving.remove(s)
        removed.append(s)
        fig.removed_under_load += s.backend.writing > 0
        # Daemon.remove: stop, join (bounded; here short, so commands are often still running),
        # close — the uio closes when the runner lets go of it.
        s.runner.stop()
        s.thread.join(rng.choice((0.0, 0.001, 0.01)))

        def close_uio() -> None:
            s.uio.close()
            s.uio_closed.set()

        if not s.runner.close(on_closed=close_uio):
            fig.deferred_closes += 1

    try:
        for _ in range(rounds):
            while len(serving) < alive:
                open_one()
            for s in serving:
                load(s)
            victim = rng.choice(serving)
            victim.backend.entered.wait(2)  # bounded: a write of it is (or was) under way
            remove(victim)
            open_one()  # at once: it takes the fd numbers just freed, if any were
        for s in list(serving):
            remove(s)
        deadline = time.monotonic() + timeout
        for s in removed:
            s.thread.join(max(0.0, deadline - time.monotonic()))
            ok = s.uio_closed.wait(max(0.0, deadline - time.monotonic()))
            fig.hung += s.thread.is_alive() or not ok or not s.backend.closed.is_set()
        images = {s.index: s.path.read_bytes() for s in removed}
        zero = bytes(BS)
        for s in removed:
            image = images[s.index]
            for b in range(blocks):
                block = image[b * BS : (b + 1) * BS]
                fig.misplaced += block not in (zero, s.tag)
            for p, lba, n in s.writes:
                if p.done and p.status == Status.GOOD:
                    fig.writes_good += 1
                    fig.lost += image[lba * BS : (lba + n) * BS] != s.tag * n
    finally:
        for s in serving + removed:
            if s.thread.is_alive():
                s.runner.stop()
    fig.seconds = round(time.monotonic() - t0, 3)
    return fig


# --------------------------------------------------------------------------------------------


def _bad(figures: Any) -> int:
    return int(
        getattr(figures, "escapes", 0)
        + getattr(figures, "lost", 0)
        + getattr(figures, "unexpected", 0)
        + getattr(figures, "misplaced", 0)
        + getattr(figures, "hung", 0)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=("tmr", "remove", "all"), default="all")
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per suite (consecutive)")
    ap.add_argument("--commands", type=int, default=20000, help="commands per tmr seed")
    ap.add_argument("--rounds", type=int, default=400, help="removals per remove seed")
    ap.add_argument("--minutes", type=float, default=0.0, help="repeat until this much time")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    import logging
    import tempfile

    # The guard's and the deferred closes' log lines are expected here; errors are not.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    suites: list[tuple[str, Callable[[int, Path], Any]]] = []
    if args.suite in ("tmr", "all"):
        suites.append(("tmr", lambda seed, d: tmr_stress(seed, args.commands, d)))
    if args.suite in ("remove", "all"):
        suites.append(("remove", lambda seed, d: remove_stress(seed, args.rounds, d)))
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    seed = args.seed
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        while True:
            for _ in range(args.seeds):
                for name, run in suites:
                    fig = run(seed, Path(tmp))
                    results.append({"suite": name, **asdict(fig)})
                    print(json.dumps(results[-1]), flush=True)
                    for f in Path(tmp).iterdir():
                        f.unlink()
                seed += 1
            if time.monotonic() - t0 >= args.minutes * 60:
                break
    total: dict[str, Any] = {"seconds": round(time.monotonic() - t0, 1), "seeds": seed - args.seed}
    for name, _ in suites:
        rows = [r for r in results if r["suite"] == name]
        keys = [k for k in rows[0] if k not in ("suite", "seed", "mode", "seconds")]
        total[name] = {k: sum(r[k] for r in rows) for k in keys} | {"runs": len(rows)}
    bad = sum(_bad(argparse.Namespace(**{k: v for k, v in r.items()})) for r in results)
    total["failures"] = bad
    print(json.dumps(total, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "total": total}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
