"""The mirror's config string, YAML ``options:``, ``tcmu-py status`` rows and ``tcmu-py mirror``.

Config string (after ``mirror/``), items separated by ``;`` (``,`` too in hand-written ones)::

    legs=<spec>|<spec>[|<spec>][;quorum=all|N][;region=<size>][;read=round-robin|least-busy]
    [;resync_rate=<size per second, 0: unthrottled>][;retry=<seconds>][;degraded_open=0|1]
    [;assume_clean=0|1][;leg_timeout=<seconds, 0: none>][;max_lag=<size, 0: unbounded>]

A leg spec is an absolute path (image file or block device) or an NBD URI (`legs`), with
``%``, ``:``, ``;``, ``,`` and ``|`` percent-encoded (`encode_spec`: rtslib-fb refuses ``:`` in a
dev_config, the kernel cuts it at ``,``): ``legs=/img|nbd%3A//10.0.0.2%3A10809/m0``.
Defaults: quorum ``all``, region 1M, read ``least-busy``, resync_rate 64M, retry 5 s,
leg_timeout 10 s (a leg that does not answer a write or flush in time is marked out of sync),
max_lag 64M (with a numeric quorum, a leg more than this far behind the acknowledged writes is
marked out of sync rather than queue more).

YAML::

    devices:
      - name: m0
        handler: mirror
        size: 10G
        options:
          legs: [/var/lib/tcmu-py/m0.img, "nbd://10.0.0.2/m0", "nbd://10.0.0.3/m0"]
          quorum: 2          # or all (default)
          region: 1M
          read: least-busy   # or round-robin
          resync_rate: 64M
          leg_timeout: 10    # seconds; 0: no limit
          max_lag: 64M       # quorum N: bytes a slow leg may be behind; 0: no limit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from tcmu_py.configspec import Checker, parse_size
from tcmu_py.errors import ConfigError
from tcmu_py.handler import Gauge, StatusTable

from .legs import check_spec, open_leg
from .mirror import (
    DEFAULT_REGION,
    MAX_LEGS,
    Mirror,
    MirrorConfig,
    checksum_regions,
    meta_length,
    read_superblock,
    wipe_superblocks,
)

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

SECTION = "mirrors"
READ_POLICIES = ("least-busy", "round-robin")
_KEYS = ("legs", "quorum", "region", "read", "resync_rate", "retry", "degraded_open",
         "assume_clean", "leg_timeout", "max_lag")


@dataclass(frozen=True)
class Parsed:
    legs: tuple[str, ...]
    quorum: int = 0
    region: int = DEFAULT_REGION
    read: str = "least-busy"
    resync_rate: int = 64 << 20
    retry: float = 5.0
    degraded_open: bool = False
    assume_clean: bool = False
    leg_timeout: float = 10.0
    max_lag: int = 64 << 20

    def mirror_config(self, size: int, write_cache: bool) -> MirrorConfig:
        return MirrorConfig(legs=self.legs, size=size, region=self.region, quorum=self.quorum,
                            write_cache=write_cache, resync_rate=self.resync_rate,
                            retry_interval=self.retry, degraded_open=self.degraded_open,
                            assume_clean=self.assume_clean, read_policy=self.read,
                            leg_timeout=self.leg_timeout, max_lag=self.max_lag)


def encode_spec(spec: str) -> str:
    """`spec` as a dev_config item value: ``%``, ``:``, ``;``, ``,`` percent-encoded."""
    return quote(spec, safe="/?=&+@[]!$'()*~")  # not | either: it separates the legs


def _flag(cfg: str, key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ConfigError(f"mirror: config string {cfg!r}: {key}={value!r}: expected 0 or 1")
    return value == "1"


def parse(cfgstring: str) -> Parsed:
    """The options of a config string; ConfigError naming the item otherwise."""
    legs: list[str] = []
    out: dict[str, Any] = {}
    for item in cfgstring.replace(",", ";").split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"mirror: config string {cfgstring!r}: item {item!r}: expected "
                              "key=value")
        if key not in _KEYS:
            raise ConfigError(f"mirror: config string {cfgstring!r}: unknown key {key!r}; "
                              f"expected one of {sorted(_KEYS)}")
        try:
            if key == "legs":
                for spec in map(unquote, value.split("|")):
                    check_spec(spec)
                    if spec in legs:
                        raise ConfigError(f"mirror: leg {spec!r} named twice")
                    legs.append(spec)
            elif key == "quorum":
                out["quorum"] = 0 if value == "all" else int(value)
                if not 1 <= out["quorum"] <= MAX_LEGS and value != "all":
                    raise ValueError(value)
            elif key in ("region", "resync_rate", "max_lag"):
                out[key] = parse_size(value)
            elif key == "read":
                if value not in READ_POLICIES:
                    raise ValueError(value)
                out["read"] = value
            elif key in ("retry", "leg_timeout"):
                out[key] = float(value)
                if not 0 <= out[key] <= 3600:
                    raise ValueError(value)
            else:
                out[key] = _flag(cfgstring, key, value)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"mirror: config string {cfgstring!r}: {key}={value!r}: expected "
                              + _EXPECT[key]) from None
    if not 2 <= len(legs) <= MAX_LEGS:
        raise ConfigError(f"mirror: config string {cfgstring!r}: {len(legs)} legs; "
                          f"expected 2 to {MAX_LEGS} in legs=<spec>|<spec>[|<spec>]")
    p = Parsed(legs=tuple(legs), **out)
    if p.region % 4096 or p.region == 0:
        raise ConfigError(f"mirror: config string {cfgstring!r}: region={p.region}: expected a "
                          "multiple of 4096")
    if p.quorum > len(legs):
        raise ConfigError(f"mirror: config string {cfgstring!r}: quorum={p.quorum}: expected "
                          f"at most the number of legs, {len(legs)}, or all")
    return p


_EXPECT = {
    "quorum": f"all or 1..{MAX_LEGS}",
    "region": "a size (e.g. 1M)",
    "resync_rate": "a size per second (e.g. 64M), 0 for unthrottled",
    "read": " or ".join(READ_POLICIES),
    "retry": "seconds, 0..3600 (0: no automatic reattach)",
    "leg_timeout": "seconds, 0..3600 (0: no limit)",
    "max_lag": "a size (e.g. 64M), 0 for no limit",
}


# -- YAML ---------------------------------------------------------------------------------------


def local_legs(legs: str) -> list[str]:
    """The real paths of the local legs in `legs` (the ``legs`` option: specs joined by ``|``,
    each as `encode_spec` made it); NBD legs are not files of this host."""
    specs = (unquote(spec) for spec in legs.split("|") if spec)
    return [os.path.realpath(spec) for spec in specs if spec.startswith("/")]


def load_options(raw: object, path: str, checker: Checker) -> tuple[tuple[str, str], ...] | None:
    m = checker.mapping(raw, path, set(_KEYS), frozenset({"legs"}))
    if m is None or "legs" not in m:
        return None
    before = len(checker.problems)
    items: list[tuple[str, str]] = []
    specs: list[str] = []
    legs = checker.seq(m["legs"], f"{path}.legs") or []
    if not 2 <= len(legs) <= MAX_LEGS:
        checker.fail(f"{path}.legs", m["legs"], f"a list of 2 to {MAX_LEGS} legs")
    for i, leg in enumerate(legs):
        where = f"{path}.legs[{i}]"
        if not isinstance(leg, str):
            checker.fail(where, leg, "a leg: an absolute path or an NBD URI")
            continue
        try:
            check_spec(leg)
        except ConfigError:
            checker.fail(where, leg, "an absolute path (image file or block device) or an NBD "
                         "URI (nbd://, nbd+unix://, nbds://, nbds+unix://)")
            continue
        specs.append(encode_spec(leg))
    items.append(("legs", "|".join(specs)))
    if "quorum" in m:
        q = m["quorum"]
        if q == "all":
            items.append(("quorum", "all"))
        elif (n := checker.integer(q, f"{path}.quorum", 1, max(1, len(legs)),
                                   f"all or an integer 1..{max(1, len(legs))}")) is not None:
            items.append(("quorum", str(n)))
    if "region" in m and (r := checker.size(m["region"], f"{path}.region")) is not None:
        if r % 4096:
            checker.fail(f"{path}.region", m["region"], "a multiple of 4096 bytes")
        items.append(("region", str(r)))
    if "read" in m and checker.string(m["read"], f"{path}.read", None,
                                      " or ".join(READ_POLICIES)) is not None:
        if m["read"] not in READ_POLICIES:
            checker.fail(f"{path}.read", m["read"], " or ".join(READ_POLICIES))
        items.append(("read", m["read"]))
    if "resync_rate" in m and (
            rate := checker.size(m["resync_rate"], f"{path}.resync_rate", positive=False)
    ) is not None:
        items.append(("resync_rate", str(rate)))
    if "max_lag" in m and (
            lag := checker.size(m["max_lag"], f"{path}.max_lag", positive=False)
    ) is not None:
        items.append(("max_lag", str(lag)))
    for key in ("retry", "leg_timeout"):
        if key in m and (t := checker.integer(m[key], f"{path}.{key}", 0, 3600)) is not None:
            items.append((key, str(t)))
    for key in ("degraded_open", "assume_clean"):
        if key in m and (b := checker.boolean(m[key], f"{path}.{key}")) is not None:
            items.append((key, "1" if b else "0"))
    return tuple(items) if len(checker.problems) == before else None


# -- tcmu-py status --------------------------------------------------------------------------


def status(devices: Sequence[ScsiDevice]) -> dict[str, Any]:
    """``{"mirrors": [...]}``: one entry per served mirror device (`Mirror.status`)."""
    out = []
    for device in devices:
        backend = getattr(device, "backend", None)
        if isinstance(backend, Mirror):
            out.append({"device": backend.name, **backend.status()})
    return {SECTION: out}


def progress(m: Mapping[str, Any]) -> str:
    r = m.get("resync") or {}
    if not r.get("active"):
        return "-"
    total, done = int(r.get("total", 0)), int(r.get("done", 0))
    return f"{100 * done // max(total, 1)}% ({done}/{total})"


def status_tables(st: Mapping[str, Any]) -> list[StatusTable]:
    mirrors = st.get(SECTION) or []
    if not mirrors:
        return []
    rows = tuple((str(m.get("device", "?")), str(m.get("state", "?")), str(m.get("quorum", "?")),
                  str(m.get("generation", "?")),
                  f"{m.get('dirty_regions', 0)}/{m.get('regions', 0)}", progress(m))
                 for m in mirrors)
    legs = tuple((str(m.get("device", "?")), str(leg.get("index", "?")), str(leg.get("spec")),
                  str(leg.get("state")),
                  # lagging: acknowledged at the quorum without it, bytes still queued for it
                  f"{leg.get('backlog', 0) >> 10} KiB" if leg.get("lagging") else "-",
                  str(leg.get("reads", 0)), str(leg.get("errors", 0)),
                  str(leg.get("error") or "-")[:60])
                 for m in mirrors for leg in m.get("legs") or [])
    return [StatusTable("mirrors", ("device", "state", "quorum", "generation", "dirty regions",
                                    "resync"), rows),
            StatusTable("mirror legs", ("device", "leg", "spec", "state", "behind", "reads",
                                        "errors", "last error"), legs)]


def metrics(st: Mapping[str, Any]) -> list[Gauge]:
    out = []
    for m in st.get(SECTION) or []:
        labels = {"device": str(m.get("device", ""))}
        out.append(Gauge("tcmu_py_mirror_dirty_regions", "regions the write-intent bitmap names",
                         labels, float(m.get("dirty_regions", 0))))
        out.append(Gauge("tcmu_py_mirror_legs_in_sync", "legs in sync", labels,
                         float(sum(1 for leg in m.get("legs") or []
                                   if leg.get("state") == "in-sync"))))
    return out


# -- tcmu-py mirror ------------------------------------------------------------------------------


def _daemon_status(run_dir: str | None) -> dict[str, Any]:
    """The daemon's status through ``tcmu-py status --json`` (the layer contract keeps handlers
    away from the daemon's modules)."""
    cmd = [sys.executable, "-m", "tcmu_py", "status", "--json"]
    if run_dir:
        cmd[4:4] = ["--run-dir", run_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or "tcmu-py status failed")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1):3d}% " \
           f"{done}/{total} regions"


def _resync(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    tty = sys.stdout.isatty()
    while True:
        try:
            st = _daemon_status(args.run_dir)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            print(f"tcmu-py mirror resync: {exc}", file=sys.stderr)
            if not args.wait or time.monotonic() > deadline:
                return 1
            time.sleep(args.interval)  # --wait: a daemon too busy to answer once is asked again
            continue
        mirrors = [m for m in st.get(SECTION) or []
                   if args.device is None or m.get("device") == args.device]
        if not mirrors:
            print(f"tcmu-py mirror resync: no mirror{' ' + args.device if args.device else ''} "
                  "served", file=sys.stderr)
            return 1
        active = [m for m in mirrors if (m.get("resync") or {}).get("active")]
        line = "  ".join(f"{m.get('device')}: "
                         + (bar(int(m['resync'].get('done', 0)), int(m['resync'].get('total', 0)))
                            if m in active else f"{m.get('state')}, nothing to copy")
                         for m in mirrors)
        print(("\r" if tty else "") + line, end="" if tty else "\n", flush=True)
        if not active or not args.wait:
            if tty:
                print()
            failed = [m for m in mirrors if any(leg.get("state") == "failed"
                                                for leg in m.get("legs") or [])]
            for m in failed:
                names = ", ".join(str(leg.get("spec")) for leg in m.get("legs") or []
                                  if leg.get("state") == "failed")
                print(f"{m.get('device')}: legs out of sync, not reachable: {names}",
                      file=sys.stderr)
            return 1 if failed and args.wait else 0
        if time.monotonic() > deadline:
            print(f"\ntcmu-py mirror resync: still copying after {args.timeout:g} s",
                  file=sys.stderr)
            return 1
        time.sleep(args.interval)


def _open_legs(specs: Sequence[str]) -> list[Any]:
    legs = []
    for spec in specs:
        check_spec(spec)
        try:
            legs.append(open_leg(spec, 0) if not spec.startswith("/") else _file_leg(spec))
        except OSError as exc:
            raise ConfigError(f"mirror: leg {spec}: cannot open: {exc}") from exc
    return legs


def _file_leg(path: str) -> Any:
    if not os.path.exists(path):
        raise ConfigError(f"mirror: leg {path}: no such file")
    return open_leg(path, 0)


def _verify(args: argparse.Namespace) -> int:
    legs = _open_legs(args.legs)
    try:
        sbs = [read_superblock(leg) for leg in legs]
        known = [sb for sb in sbs if sb is not None]
        if not known:
            raise ConfigError("mirror: none of the legs carries mirror metadata; expected the "
                              "legs of one mirror")
        size, region = known[0].size, args.region or known[0].region
        for spec, leg in zip(args.legs, legs, strict=True):
            if leg.size < size + meta_length(size, known[0].region):
                raise ConfigError(f"mirror: leg {spec}: {leg.size} bytes, smaller than the "
                                  f"mirror ({size} bytes and metadata)")
        sums = [checksum_regions(leg, size, region) for leg in legs]
        differ = [r for r in range(len(sums[0])) if len({s[r] for s in sums}) > 1]
        for r in differ[: args.limit]:
            cells = "  ".join(f"{spec}={s[r]:08x}" for spec, s in zip(args.legs, sums,
                                                                        strict=True))
            print(f"region {r} (bytes {r * region}..{min(size, (r + 1) * region) - 1}): {cells}")
        if len(differ) > args.limit:
            print(f"... and {len(differ) - args.limit} more regions")
        print(f"{len(sums[0])} regions of {region} bytes compared over {len(legs)} legs: "
              f"{len(differ)} differ")
        return 1 if differ else 0
    finally:
        for leg in legs:
            leg.close()


def _show(args: argparse.Namespace) -> int:
    legs = _open_legs(args.legs)
    try:
        for spec, leg in zip(args.legs, legs, strict=True):
            sb = read_superblock(leg)
            if sb is None:
                print(f"{spec}: no mirror metadata (blank)")
                continue
            import uuid

            active = ",".join(str(i) for i in range(sb.nlegs) if sb.has(i))
            print(f"{spec}: mirror {uuid.UUID(bytes=sb.mirror_uuid)} leg {sb.leg} of "
                  f"{sb.nlegs}, generation {sb.generation}, in sync: {active or 'none'}, "
                  f"{'clean' if sb.clean else 'not clean'}, size {sb.size}, region {sb.region}"
                  + (f", lagging: {','.join(str(i) for i in range(sb.nlegs) if sb.lag >> i & 1)}"
                     if sb.lag else ""))
        return 0
    finally:
        for leg in legs:
            leg.close()


def _forget(args: argparse.Namespace) -> int:
    if not args.yes:
        print("tcmu-py mirror forget: erases the leg's mirror metadata: it rejoins as a blank "
              "leg and its data is overwritten by a full copy; add --yes", file=sys.stderr)
        return 2
    (leg,) = _open_legs([args.leg])
    try:
        wipe_superblocks(leg)
    finally:
        leg.close()
    print(f"{args.leg}: metadata erased; the next open copies the other legs onto it")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tcmu-py mirror", description=(
        "mirror disks: resync progress, leg comparison, metadata. A split brain (legs each "
        "written without the other) is never resolved automatically: choose the side to keep "
        "and run 'forget' on the other leg."))
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resync", help="the resync's progress (the daemon resyncs by itself)")
    r.add_argument("--wait", action="store_true", help="until no leg is copying (progress bar)")
    r.add_argument("--device", help="only this mirror device")
    r.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    r.add_argument("--timeout", type=float, default=86400.0, help="give up after S seconds")
    r.add_argument("--run-dir", help="the daemon's run directory")
    v = sub.add_parser("verify", help="compare legs region by region (CRC-32); exit 1 if any "
                       "differ (run it on a mirror not served, or quiet)")
    v.add_argument("legs", nargs="+", help="the legs' specs (paths, NBD URIs)")
    v.add_argument("--region", type=parse_size, default=0,
                   help="compare in units of this size (default: the mirror's region)")
    v.add_argument("--limit", type=int, default=20, help="differing regions listed at most")
    s = sub.add_parser("show", help="each leg's metadata (generation, legs in sync, clean)")
    s.add_argument("legs", nargs="+")
    f = sub.add_parser("forget", help="erase one leg's metadata (the side of a split brain "
                       "you discard): it rejoins blank and gets a full copy")
    f.add_argument("leg")
    f.add_argument("--yes", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "verify" and len(args.legs) < 2:
        p.error("verify: expected at least two legs")
    return int({"resync": _resync, "verify": _verify, "show": _show,
                "forget": _forget}[args.cmd](args))
