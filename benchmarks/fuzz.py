"""Long fuzz runs over the built-in devices and the ring (the CI test runs short ones).

    .venv/bin/python benchmarks/fuzz.py --device all --minutes 10 --seed 1
    .venv/bin/python benchmarks/fuzz.py --device raw --commands 50000 --seed 7 --depth 8
    .venv/bin/python benchmarks/fuzz.py --device drive --seed 7 --replay 1234 --start 0

Prints, per device: commands, the status histogram, the most frequent sense codes, escapes by kind
with the first few cases (CDB hex, Data-Out / Data-In lengths, how to replay), restarts and the
run's duration. `--minutes` is shared evenly by the devices chosen; `--commands` caps each.
`ring` is the ring-corruption fuzzer (cases instead of commands). The process caps its address
space (`--max-memory`, default 8 GiB) so a command that tries to allocate without bound fails
with MemoryError (an escape) instead of waking the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from tcmu_py.testing.fuzz import (
    Escape,
    FuzzReport,
    RingFuzzReport,
    builtin_targets,
    fuzz,
    fuzz_ring,
    replay,
)

DEVICES = ["raw", "null", "thin", "drive", "changer"]


def _cap_memory(limit: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _print_device(r: FuzzReport, show: int, depth: int) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    for (kind, _), n in r.escape_counts.items():
        kinds[kind] += n
    print(f"== {r.target}: seed {r.seed}, depth {depth}, {r.commands} commands, "
          f"{r.duration:.1f} s, "
          f"{r.commands / max(r.duration, 1e-9):.0f} commands/s, {r.restarts} restarts, "
          f"{r.rejected_by_kernel} refused by the kernel, peak growth per command "
          f"{r.max_memory_growth / 2**20:.1f} MiB")
    print("   statuses: " + ", ".join(f"{k} {v}" for k, v in r.statuses.most_common()))
    print("   sense:    " + ", ".join(f"{k} {v}" for k, v in r.senses.most_common(10)))
    never = [op for op in r.supported if not r.opcodes.get(op, Counter())["GOOD"]]
    print(f"   opcodes: {len(r.supported)} reported by the device, {len(r.opcodes)} sent; "
          f"reported but never GOOD: {' '.join(f'{o:02X}h' for o in never) or 'none'}")
    print(f"   escapes: {r.escape_total}"
          + (" (" + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")" if kinds else ""))
    groups: dict[tuple[str, int], list[Escape]] = {}
    for e in r.escapes:
        groups.setdefault((e.kind, e.case.cdb[0]), []).append(e)
    for (kind, op), items in sorted(groups.items()):
        print(f"   - {kind}, opcode {op:02X}h: {r.escape_counts[(kind, op)]}")
        for e in items[:show]:
            print(f"       {e}")
    return {
        "device": r.target, "seed": r.seed, "depth": depth, "commands": r.commands,
        "seconds": r.duration,
        "restarts": r.restarts, "statuses": dict(r.statuses), "senses": dict(r.senses),
        "escape_counts": {f"{k}/{op:02X}": n for (k, op), n in sorted(r.escape_counts.items())},
        "escapes": [
            {"kind": e.kind, "index": e.case.index, "start": e.start, "cdb": e.case.cdb.hex(),
             "data_out": e.data_out_length, "data_in": e.case.data_in_len,
             "direct": e.case.direct, "detail": e.detail}
            for e in r.escapes
        ],
    }


def _print_ring(r: RingFuzzReport, show: int) -> dict[str, Any]:
    print("== " + r.describe(limit=show))
    return {"device": "ring", "seed": r.seed, "cases": r.cases, "seconds": r.duration,
            "rejected": r.rejected, "held": r.held, "clean": r.clean,
            "escapes": [str(e) for e in r.escapes]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="all", choices=[*DEVICES, "ring", "all"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--commands", type=int, default=None,
                    help="commands (ring: cases) per device; default 5000 without --minutes")
    ap.add_argument("--minutes", type=float, default=None, help="total time, shared evenly")
    ap.add_argument("--depth", type=int, default=1,
                    help="commands in flight at once (memory escapes then name a batch)")
    ap.add_argument("--show", type=int, default=3, help="cases shown per escape group")
    ap.add_argument("--replay", type=int, default=None, metavar="INDEX",
                    help="replay case INDEX of --device (cases --start..INDEX)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--max-memory", type=int, default=8 << 30, help="RLIMIT_AS in bytes")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    _cap_memory(args.max_memory)
    logging.getLogger().addHandler(logging.NullHandler())  # the engine logs every 44/00
    devices = [*DEVICES, "ring"] if args.device == "all" else [args.device]
    commands = args.commands or (1 << 62 if args.minutes else 5000)
    share = args.minutes * 60 / len(devices) if args.minutes else None
    out: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tcmu-py-fuzz-") as work:
        targets = builtin_targets(work)
        if args.replay is not None:
            if args.device not in targets:
                ap.error("--replay needs one of " + ", ".join(DEVICES))
            found = replay(targets[args.device], seed=args.seed, index=args.replay,
                           start=args.start, depth=args.depth)
            for e in found:
                print(e)
            print(f"{len(found)} escapes at case {args.replay}")
            return 1 if found else 0
        for name in devices:
            if name == "ring":
                out.append(_print_ring(fuzz_ring(seed=args.seed, cases=commands,
                                                  seconds=share), args.show))
            else:
                report = fuzz(targets[name], seed=args.seed, commands=commands, seconds=share,
                              depth=args.depth)
                out.append(_print_device(report, args.show, args.depth))
            sys.stdout.flush()
    total = time.monotonic() - began
    print(f"total: {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "minutes": total / 60, "devices": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
