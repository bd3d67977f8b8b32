"""What the ``dedup`` subtype owns outside its devices (`tcmu_py.handler.Handler` contract):

- the YAML section ``dedup_pools:`` (`DedupPoolSpec`, validated by `load_pools`) and the
  ``pool:`` key of a ``dedup`` device, whose pool's directory goes into the device's dev_config
  (`device_config_items`);
- the pools' creation before devices open (`prepare`);
- the ``dedup pools`` rows of ``tcmu-py status`` (`status`, `status_tables`);
- ``tcmu-py dedup create-pool|status|check|gc`` (`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from tcmu_py.configspec import Checker, Device, parse_size
from tcmu_py.errors import ConfigError
from tcmu_py.handler import ConfigView, Gauge, StatusTable
from tcmu_py.table import format_size

from .._pool import (
    POOL_HEADERS,
    check_device_pools,
    check_existing_pool,
    pool_cells,
    pool_config_items,
    pool_devices,
    pool_entries,
    pool_gauges,
    state_cell,
)
from .backend import DedupBackend
from .store import (
    COLLECT_INTERVAL,
    COMPRESSION_CODES,
    CONTAINER_DIR,
    DB_FILE,
    DEFAULT_CHUNK,
    DEFAULT_DEAD_PERCENT,
    DEFAULT_FINGERPRINT,
    FINGERPRINTS,
    JOURNAL_EXPECTED,
    MAX_CHUNK,
    MIN_CHUNK,
    POOL_FILE,
    CollectorSettings,
    DedupPool,
    check_pool,
    configure_collector,
    declaration_mismatches,
    ensure_pool,
    is_chunk_size,
    is_journal_size,
    load_pool_config,
    read_pool_status,
)

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

#: The top-level YAML key of dedup pools.
SECTION = "dedup_pools"
#: The subtype whose devices name these pools.
SUBTYPE = "dedup"
#: ``collector_interval``: seconds, from a tenth of a second to an hour.
MIN_COLLECT_INTERVAL = 0.1
MAX_COLLECT_INTERVAL = 3600.0


@dataclass(frozen=True)
class DedupPoolSpec:
    """A dedup pool declared in the YAML, as a thin pool is: ``capacity`` and ``hard_limit``
    (bytes of chunk data the pool lets its disks take; hard_limit <= capacity, default
    capacity), ``soft_threshold`` (percent of the hard limit; None: none), ``chunk_size``
    (bytes), ``journal`` (bytes of the pool's write journal; 0: none)."""

    name: str
    path: str
    capacity: int
    soft_threshold: int | None = 80
    chunk_size: int = DEFAULT_CHUNK
    hard_limit: int = 0  # the loader always sets it (default: capacity)
    compression: str = "none"  # "none" or "zstd": how new chunks are stored
    collector_interval: float = COLLECT_INTERVAL
    collector_dead_percent: int = DEFAULT_DEAD_PERCENT
    journal: int = 0  # bytes of the write journal (journal.dat); 0: none


def load_pools(raw: object, c: Checker, doc: Mapping[str, Any]) -> tuple[DedupPoolSpec, ...]:
    """The ``dedup_pools:`` section, and every ``dedup`` device's ``pool:`` naming one of them
    (names of pools that failed validation still count: one bad pool does not cascade)."""
    pools: list[DedupPoolSpec] = []
    for entry, path, cap, soft, hard in pool_entries(
            c, raw, SECTION, frozenset({"chunk_size", "compression", "collector_interval",
                                        "collector_dead_percent", "journal"})):
        p, m, name = entry.path, entry.fields, entry.name
        chunk = m.get("chunk_size", DEFAULT_CHUNK)
        try:
            chunk_ok = is_chunk_size(parse_size(chunk))
        except ValueError:
            chunk_ok = False
        if not chunk_ok:
            c.fail(f"{p}.chunk_size", chunk, f"a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
                   " (4K..64K)")
        compression = m.get("compression", "none")
        if compression not in COMPRESSION_CODES:
            c.fail(f"{p}.compression", compression, f"one of {', '.join(COMPRESSION_CODES)}")
        interval = m.get("collector_interval", COLLECT_INTERVAL)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not (
                MIN_COLLECT_INTERVAL <= interval <= MAX_COLLECT_INTERVAL):
            c.fail(f"{p}.collector_interval", interval,
                   f"seconds, a number from {MIN_COLLECT_INTERVAL:g} to {MAX_COLLECT_INTERVAL:g}")
        dead = c.integer(m.get("collector_dead_percent", DEFAULT_DEAD_PERCENT),
                         f"{p}.collector_dead_percent", 1, 100, "a percentage 1..100")
        journal_raw = m.get("journal", 0)
        try:
            journal = parse_size(journal_raw)
        except ValueError:
            journal = -1
        if not is_journal_size(journal):
            c.fail(f"{p}.journal", journal_raw, JOURNAL_EXPECTED)
        if not c.clean_since(entry):
            continue
        assert name and path and cap and hard and dead
        spec = DedupPoolSpec(name, path, cap, soft, parse_size(chunk), hard, compression,
                             float(interval), dead, journal)
        check_existing_pool(c, p, path, POOL_FILE, load_pool_config,
                            partial(declaration_mismatches, name=spec.name,
                                    chunk_size=spec.chunk_size))
        pools.append(spec)
    check_device_pools(c, doc, SUBTYPE, SECTION, raw, required=True)
    _check_devices(c, doc, pools)
    return tuple(pools)


def _check_devices(c: Checker, doc: Mapping[str, Any], pools: Sequence[DedupPoolSpec]
                   ) -> None:
    """Each dedup device's block size divides its pool's chunk size (a chunk holds whole
    blocks), as the pool checks when the disk opens, and no two devices are one disk of a pool
    (the disk's name is its ``options.disk``, else the device's name): the second would be
    refused at open, "already open"."""
    disks: dict[tuple[str, str], int] = {}
    for dev in pool_devices(doc, SUBTYPE, pools):
        opts = dev.entry.get("options")
        given = opts.get("disk") if isinstance(opts, dict) else None
        disk, key = (given, "options.disk") if given is not None else (dev.entry.get("name"),
                                                                      "name")
        if isinstance(disk, str):
            first = disks.setdefault((os.path.realpath(dev.pool.path), disk), dev.at)
            if first != dev.at:
                c.fail(f"devices[{dev.at}].{key}", disk, f"a disk of pool {dev.pool.name!r} no "
                       f"other device uses (devices[{first}] is that disk)")
        block = dev.entry.get("block_size", 512)
        chunk = dev.pool.chunk_size
        if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
            continue  # the device check reports it
        if chunk % block:
            c.fail(f"devices[{dev.at}].block_size", block, f"a divisor of pool "
                   f"{dev.pool.name!r}'s chunk_size ({chunk}): a chunk holds whole blocks")


def device_config_items(device: Device, pools: Sequence[DedupPoolSpec]
                        ) -> tuple[tuple[str, str], ...]:
    """``("pool", <directory>)`` for a ``dedup`` device naming a declared pool."""
    return pool_config_items(device, SUBTYPE, pools)


def prepare(config: ConfigView) -> None:
    """Create (or update capacity, threshold, compression and journal size of) the YAML's
    dedup pools and register their names in this process. As for thin pools, the hard limit
    is what the pool enforces as its capacity (pool.json); the soft threshold is a percentage
    of it. A journal size takes effect at the pool's next open. The collector settings apply
    in this process (`configure_collector`): from the pool's open, or at once if open."""
    from .handler import register_pool

    for pool in config.section(SECTION):
        ensure_pool(pool.path, pool.name, pool.hard_limit or pool.capacity, pool.soft_threshold,
                    pool.chunk_size, pool.compression, journal=pool.journal)
        register_pool(pool.name, pool.path)
        configure_collector(pool.path, CollectorSettings(pool.collector_interval,
                                                         pool.collector_dead_percent))


def status(devices: Sequence[ScsiDevice]) -> dict[str, Any]:
    """``{"dedup_pools": [...]}``: each pool behind a served device once."""
    pools: dict[str, dict[str, Any]] = {}
    for device in devices:
        backend = getattr(device, "backend", None)
        if isinstance(backend, DedupBackend):
            st = backend.pool.status().as_dict()
            if backend.pool.journal is not None:  # WRITEs the native loops appended themselves
                st.update(backend.pool.journal.lease_state())
            pools[st["path"]] = st
    return {SECTION: list(pools.values())}


_HEADERS = (*POOL_HEADERS, "logical", "unique", "ratio", "compr", "dead", "collected",
            "collector", "state")


def _collector(pool: Mapping[str, Any]) -> str:
    """``off`` (no collector thread), ``idle``, or the compaction's progress: ``compacting
    40%``; ``-`` for figures read from the pool's files (``tcmu-py dedup status``), which
    cannot tell what a daemon serving the pool is doing (``tcmu-py status`` shows that)."""
    if not pool.get("live", True):
        return "-"
    state = str(pool.get("collector", "off"))
    progress = pool.get("progress")
    return f"{state} {100 * progress:.0f}%" if state == "compacting" and progress is not None \
        else state


def _row(pool: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        *pool_cells(pool),
        format_size(pool.get("logical", 0)),
        format_size(pool.get("unique", 0)),
        f"{pool.get('ratio', 1.0):.2f}",
        f"{pool.get('compression_ratio', 1.0):.2f}" if pool.get("compression", "none") != "none"
        else "-",
        format_size(pool.get("dead", 0)),
        format_size(pool.get("collected", 0)) if pool.get("live", True) else "-",
        _collector(pool),
        f"DAMAGED ({pool['damage_count']})" if pool.get("damage_count") else state_cell(pool),
    )


def status_tables(st: Mapping[str, Any]) -> list[StatusTable]:
    rows = tuple(_row(pool) for pool in st.get(SECTION) or [])
    return [StatusTable("dedup pools", _HEADERS, rows)] if rows else []


def _size_arg(flag: str, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise ConfigError(f"{flag}: got {value!r}, expected a size like 10G") from None


def _journal_arg(value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        size = -1
    if not is_journal_size(size):
        raise ConfigError(f"--journal: got {value!r}, expected {JOURNAL_EXPECTED}")
    return size


def main(argv: list[str]) -> int:
    """``tcmu-py dedup create-pool|status|check|gc|drop-disk`` (see ``--help``)."""
    p = argparse.ArgumentParser(prog="tcmu-py dedup", description="dedup pool administration")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create-pool", help="create a pool, or change an existing pool's "
                       "capacity, threshold, compression and journal size (options not given "
                       "keep its values)")
    c.add_argument("path", metavar="PATH", help="pool directory")
    c.add_argument("--name", required=True, help="the pool's name")
    c.add_argument("--capacity", help="bytes of chunk data, or with K, M, G, T (required for a "
                   "new pool)")
    c.add_argument("--soft-threshold", type=int, default=None, metavar="PCT",
                   help="percentage of capacity that raises a unit attention (new pool: 80)")
    c.add_argument("--compression", choices=sorted(COMPRESSION_CODES), default=None,
                   help="how new chunks are stored (new pool: none)")
    c.add_argument("--fingerprint", choices=FINGERPRINTS, default=None,
                   help=f"chunk identity of a new pool: xxh3-128 (confirmed by comparing "
                   f"bytes) or sha256 (default {DEFAULT_FINGERPRINT})")
    c.add_argument("--chunk-size", default=None,
                   help=f"chunk size of a new pool, {MIN_CHUNK}..{MAX_CHUNK} (default 4K); "
                   "an existing pool's cannot change")
    c.add_argument("--journal", default=None, metavar="SIZE",
                   help="bytes of the pool's write journal (post-process deduplication): "
                   "4M..256M in whole MiB, or 0 for none (new pool: 0); a change takes effect "
                   "at the pool's next open")
    s = sub.add_parser("status", help="a pool's figures (also while it is served)")
    s.add_argument("paths", nargs="+", metavar="PATH", help="pool directory")
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    k = sub.add_parser("check", help="verify a pool that no daemon serves")
    k.add_argument("path", metavar="PATH", help="pool directory")
    k.add_argument("--repair", action="store_true",
                   help="reclaim leaks, recount references, drop damaged chunks, then check "
                   "again: exit 0 if nothing is left, 1 with what could not be repaired")
    g = sub.add_parser("gc", help="run the collector to completion (pool not served)")
    g.add_argument("path", metavar="PATH", help="pool directory")
    d = sub.add_parser("drop-disk", help="delete a disk of a pool no daemon serves: its data "
                       "is gone, and a device of that name later starts empty; `gc` gives "
                       "back the space no other disk shares")
    d.add_argument("path", metavar="PATH", help="pool directory")
    d.add_argument("disk", metavar="DISK", help="the disk's name in the pool (its device's "
                   "name, or the device's disk= option; `status --json` lists them)")
    args = p.parse_args(argv)
    if args.cmd == "status":
        # Every pool that can be read is shown; each one that cannot is a line on stderr (as a
        # configuration error), and then the exit status is 2.
        found, failed = [], []
        for path in args.paths:
            try:
                with _operator_errors(path):
                    found.append(read_pool_status(path).as_dict())
            except ConfigError as exc:
                failed.append(str(exc))
        if args.json:
            print(json.dumps(found, indent=1))
        elif found:
            (table,) = status_tables({SECTION: found})
            print(table.render())
        for text in failed:
            print(f"tcmu-py: configuration error: {text}", file=sys.stderr)
        return 2 if failed else 0
    with _operator_errors(args.path):
        return _run(args)


def _create_pool(args: argparse.Namespace) -> None:
    """``create-pool``: an option given is the pool's new value; one not given is the existing
    pool's (read from its pool.json), or for a new pool the default (``--capacity`` has none)."""
    current = (load_pool_config(args.path)
               if os.path.lexists(os.path.join(args.path, POOL_FILE)) else None)

    def chosen(given: Any, key: str, default: Any) -> Any:
        return given if given is not None else default if current is None else getattr(
            current, key)

    if args.capacity is None and current is None:
        raise ConfigError(f"--capacity: missing, expected the capacity of the new pool at "
                          f"{args.path} (a size like 10G)")
    capacity = chosen(None if args.capacity is None else _size_arg("--capacity", args.capacity),
                      "capacity", None)
    chunk = chosen(None if args.chunk_size is None else _size_arg("--chunk-size",
                                                                  args.chunk_size),
                   "chunk_size", DEFAULT_CHUNK)
    soft = chosen(args.soft_threshold, "soft_threshold", 80)
    compression = chosen(args.compression, "compression", "none")
    journal = chosen(None if args.journal is None else _journal_arg(args.journal), "journal", 0)
    ensure_pool(args.path, args.name, capacity, soft, chunk, compression, args.fingerprint,
                journal)


def _os_expected(path: str, file: str, exc: OSError) -> str:
    """What the operator should find at `file` of the pool at `path`, for `exc`."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "expected a file (and directory) this user can read and write: run as the " \
            "pool's owner"
    if os.path.dirname(os.path.abspath(file)) == os.path.join(os.path.realpath(path),
                                                             CONTAINER_DIR):
        return (f"expected the container file the pool's index names, whole; `tcmu-py dedup "
                f"check {path}` lists the damage, `--repair` drops the chunks that cannot be "
                "read")
    return "expected a dedup pool directory this user can read and write"


@contextlib.contextmanager
def _operator_errors(path: str) -> Iterator[None]:
    """The OS and SQLite errors of a command on the pool at `path` as one ConfigError line
    (exit 2) naming the file and what was expected, as a bad pool.json already is; the store
    names the file where it knows it (`OSError.filename`)."""
    try:
        yield
    except sqlite3.Error as exc:
        index = os.path.join(path, DB_FILE)
        raise ConfigError(f"{index}: dedup index error ({exc}), expected a readable and "
                          "writable SQLite index made by tcmu-py") from None
    except OSError as exc:
        file = str(exc.filename) if exc.filename is not None else path
        what = exc.strerror or str(exc)
        raise ConfigError(f"{file}: {what}, {_os_expected(path, file, exc)}") from None


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "create-pool":
        _create_pool(args)
        return 0
    if args.cmd == "drop-disk":
        with DedupPool.open(args.path) as pool:
            pool.drop_disk(args.disk)
            dead = pool.dead_bytes()
        print(f"{args.path}: disk {args.disk} dropped; {format_size(dead)} dead in the pool "
              f"(`tcmu-py dedup gc {args.path}` gives it back)")
        return 0
    if args.cmd == "check":
        report = check_pool(args.path, repair=args.repair)
        for line in report.problems:
            print(f"{args.path}: problem: {line}")
        for line in report.leaks:
            print(f"{args.path}: leak: {line}")
        for line in report.repaired:
            print(f"{args.path}: repaired: {line}")
        for line in report.notes:
            print(f"{args.path}: note: {line}")
        if args.repair and not report.clean:
            # What the repair left: the pool checked again; exit 0 only if nothing is.
            report = check_pool(args.path)
            for line in report.problems + report.leaks:
                print(f"{args.path}: not repaired: {line}")
            if report.clean:
                print(f"{args.path}: OK after repair")
        elif report.clean:
            print(f"{args.path}: OK")
        sys.stdout.flush()
        return 0 if report.clean else 1
    return _gc(args.path)


def _gc(path: str) -> int:
    """Compact every container with a dead byte, showing progress and what was freed.

    Progress is the share done of the bytes of the containers that had dead bytes at the start:
    a container counts its live bytes as they are moved out (its dead bytes grow by them),
    then all of it once deleted; shown monotonic, 0..100 %. Freed is net: physical use at the
    start less physical use now (the live bytes moved into new containers are not freed)."""
    with DedupPool.open(path) as pool:
        before = pool.used
        start = {cid: fig for cid, fig in pool.container_figures().items() if fig[1] > 0}
        total = sum(size for size, _ in start.values())
        shown = 0.0
        while True:
            step = pool.collect(0.5, dead_percent=1)
            now = pool.container_figures()
            done = sum(size if cid not in now else min(size, max(0, now[cid][1] - dead))
                       for cid, (size, dead) in start.items())
            pct = 100.0 if step.done or not total else min(100.0, 100 * done / total)
            shown = max(shown, pct)
            freed = max(0, before - pool.used)
            bar = "#" * int(shown // 5)
            print(f"\r{path}: [{bar:<20}] {shown:5.1f}%  freed {format_size(freed)}", end="",
                  flush=True)
            if step.done:
                break
        print()
    return 0


#: Dedup figures beyond the shared pool gauges: (status key, metric suffix, help).
_DEDUP_GAUGES = (
    ("logical", "logical_bytes", "bytes the pool's disks map (what initiators wrote)"),
    ("unique", "unique_bytes", "bytes of distinct chunks, before compression"),
    ("stored", "stored_bytes", "bytes the distinct chunks take in containers"),
    ("ratio", "dedup_ratio", "logical bytes / unique bytes"),
    ("compression_ratio", "compression_ratio", "unique bytes / stored bytes"),
    ("dead", "dead_bytes", "container bytes no chunk refers to (the collector's work)"),
    ("collected", "collected_bytes", "bytes the collector returned to the filesystem"),
)


def metrics(st: Mapping[str, Any]) -> list[Gauge]:
    """Per pool (labels ``pool``, ``path``): the shared capacity/use/threshold gauges, then
    logical and unique data, the dedup and compression ratios, dead and collected bytes."""
    out: list[Gauge] = []
    for pool in st.get(SECTION) or []:
        labels, gauges = pool_gauges("dedup", pool)
        out += gauges
        out += [Gauge(f"tcmu_py_dedup_pool_{suffix}", text, labels, pool[key])
                for key, suffix, text in _DEDUP_GAUGES if key in pool]
    return out
