"""What thin pools (`tcmu_py.handlers.thin`) and dedup pools (`tcmu_py.handlers.dedup`) share:
a physical capacity their disks draw from, with a hard limit and a soft threshold that behave
the same in both.

- `PhysicalPool`: the capacity and threshold state of an open pool. A request that does not fit
  under the capacity is refused before anything changes (SBC-4 4.7.3.8: DATA PROTECT, SPACE
  ALLOCATION FAILED WRITE PROTECT, 27h/07h). Each rise of the use from below
  ``capacity * soft_threshold / 100`` to at or above it, and each change of capacity or
  threshold that puts the pool above it, adds one to `generation`; a pool opened above its
  threshold starts at generation 1.
- `PoolDisk`: what a disk of such a pool implements of `tcmu_py.backend.ThinProvisioning` for
  the threshold: each disk reports each generation once (SBC-4 4.7.3.7: the unit attention
  SOFT THRESHOLD REACHED, 38h/07h), and MODE SELECT's threshold is the pool's.
- `ThresholdFigures`: ``above_threshold`` of a status snapshot; `pool_cells`: the capacity, use
  and state cells of both handlers' status rows; `pool_gauges`: the same figures for
  ``serve --metrics``.
- `hard_limit`: the YAML ``hard_limit`` key of both sections; `pool_entries`: the keys every
  entry of both sections has (name, path, capacity, soft_threshold, hard_limit);
  `check_device_pools`: each device's ``pool:`` names a pool of its handler's section;
  `check_existing_pool`: an existing pool is the one declared; `pool_devices`: the devices
  naming a declared pool; `pool_config_items`: the pool's directory in such a device's
  dev_config.

Threads: the owner serialises `PhysicalPool`'s methods with its own pool lock (they are called
with it held); `PoolDisk.take_threshold_event` runs on any worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from tcmu_py.configspec import MISSING, Checker, Device, Entry, parse_size, raw_names
from tcmu_py.errors import ConfigError
from tcmu_py.handler import Gauge
from tcmu_py.scsi.sense import SpaceAllocationFailed
from tcmu_py.table import format_size

__all__ = ["POOL_KEYS", "PhysicalPool", "PoolDevice", "PoolDisk", "PoolEntry",
           "ThresholdFigures", "check_device_pools", "check_existing_pool", "device_pool_ref",
           "hard_limit", "pool_cells", "pool_config_items", "pool_devices",
           "pool_entries", "pool_gauges"]

log = logging.getLogger(__name__)


class PoolLimits(Protocol):
    """What `PhysicalPool` reads of its owner's persistent settings."""

    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def soft_threshold(self) -> int | None: ...


def reaches(used: int, capacity: int, threshold: int | None) -> bool:
    """Whether `used` bytes are at or above `threshold` percent of `capacity`."""
    return threshold is not None and used * 100 >= capacity * threshold


#: Held for a change of a pool's `generation` (its counters are changed under the pool's lock,
#: and by a dedup pool's write journal under the journal's: `_count_crossing`).
_generation_lock = threading.Lock()


class PhysicalPool:
    """Capacity and soft threshold of an open pool. The subclass sets `_config` (a
    `PoolLimits`, replaced through `_adopt`) and provides `used` (bytes taken now)."""

    _config: Any
    _generation: int = 0
    _members: weakref.WeakSet[PoolDisk[Any]] | None = None

    @property
    def members(self) -> weakref.WeakSet[PoolDisk[Any]]:
        """The disks of this pool opened in this process (`PoolDisk._join_pool`)."""
        if self._members is None:
            self._members = weakref.WeakSet()
        return self._members

    @property
    def name(self) -> str:
        return str(self._config.name)

    @property
    def capacity(self) -> int:
        return int(self._config.capacity)

    @property
    def soft_threshold(self) -> int | None:
        t: int | None = self._config.soft_threshold
        return t

    @property
    def used(self) -> int:
        raise NotImplementedError

    @property
    def generation(self) -> int:
        """Soft-threshold crossings since the pool opened (see the module doc)."""
        return self._generation

    @property
    def above_threshold(self) -> bool:
        return reaches(self.used, self.capacity, self.soft_threshold)

    def _opened(self) -> None:
        """Call once the figures of a newly opened pool are known."""
        self._generation = 1 if self.above_threshold else 0

    def _take_space(self, before: int, need: int, what: str) -> None:
        """Admit `need` more bytes on top of `before` (the use now), or raise
        SpaceAllocationFailed naming `what`; count a soft-threshold crossing (pool lock held).
        The caller then accounts the bytes."""
        c = self._config
        if before + need > c.capacity:
            # SBC-4 4.7.3.8: resource exhaustion -> DATA PROTECT, SPACE ALLOCATION FAILED WRITE
            # PROTECT; nothing of the command is done.
            raise SpaceAllocationFailed(f"pool {c.name}: {need} bytes for {what} do not fit "
                                        f"(used {before} of {c.capacity})")
        self._count_crossing(before, need)

    def _count_crossing(self, before: int, need: int) -> None:
        """Count a soft-threshold crossing if `need` more bytes on top of `before` reach the
        threshold from below (pool lock held, or for a dedup pool's write journal, its own):
        for every growth of the use, also one admitted past the capacity (a dedup pool's
        deallocation of part of a chunk, a journaled write)."""
        c = self._config
        t = c.soft_threshold
        if not reaches(before, c.capacity, t) and reaches(before + need, c.capacity, t):
            with _generation_lock:
                self._generation += 1
            log.warning("pool %s: usage %d of %d crossed the soft threshold of %d%%", c.name,
                        before + need, c.capacity, t)

    def _adopt(self, config: Any) -> None:
        """Take `config` (capacity, threshold) as the pool's (pool lock held); going above the
        threshold by it counts as a crossing."""
        was_above = self.above_threshold
        self._config = config
        if not was_above and self.above_threshold:
            with _generation_lock:
                self._generation += 1

    def set_soft_threshold(self, percent: int | None) -> None:
        raise NotImplementedError


P = TypeVar("P", bound=PhysicalPool)


class PoolDisk(Generic[P]):
    """The threshold part of `ThinProvisioning` for a disk of a `PhysicalPool` `pool`."""

    pool: P
    _seen_generation: int = 0
    _threshold_lock = threading.Lock()  # shared by all disks: held for a compare and a store

    #: Set by the device serving this disk (`tcmu_py.device.BlockDevice`): called, on the
    #: thread of another disk of the pool whose write crossed the threshold and with no lock
    #: of the pool held, once this disk has taken that crossing's event for itself; the device
    #: queues the unit attention for its next command.
    threshold_listener: Callable[[], None] | None = None

    def _join_pool(self, pool: P) -> None:
        """Take `pool` as this disk's: a pool above its threshold now is reported once (the
        disk has not said so yet); a crossing of the pool's past, undone since (its use is
        below the threshold again), is not reported by a disk opened after it."""
        self.pool = pool
        generation = pool.generation
        self._seen_generation = generation - 1 if pool.above_threshold else generation
        with self._threshold_lock:
            pool.members.add(self)

    def _take_event(self) -> bool:
        """True once per soft-threshold crossing of the pool since this disk last took one."""
        generation = self.pool.generation
        if generation == self._seen_generation:  # the usual answer, without the lock
            return False
        with self._threshold_lock:
            if generation == self._seen_generation:
                return False
            self._seen_generation = generation
            return True

    def take_threshold_event(self) -> bool:
        """True once per soft-threshold crossing of the pool since this disk last reported one.
        The pool's other disks take it too (each its `threshold_listener`): SBC-4 4.7.3.7
        reports a crossing on every logical unit of the resource, and one that only reads, or
        whose writes the full pool refuses, would otherwise hear of it last or never."""
        if not self._take_event():
            return False
        with self._threshold_lock:
            others = [disk for disk in self.pool.members if disk is not self]
        for disk in others:
            listener = disk.threshold_listener
            if listener is not None and disk._take_event():
                listener()
        return True

    def set_soft_threshold(self, percent: int | None) -> None:
        """Set the pool's soft threshold (mode page 1Ch/02h is per pool: its disks share it)."""
        self.pool.set_soft_threshold(percent)


class ThresholdFigures:
    """``above_threshold`` for a status snapshot with `used`, `capacity`, `soft_threshold`."""

    used: int
    capacity: int
    soft_threshold: int | None

    @property
    def above_threshold(self) -> bool:
        return reaches(self.used, self.capacity, self.soft_threshold)


#: The headers of `pool_cells`.
POOL_HEADERS = ("pool", "path", "capacity", "used", "used%")


def pool_cells(pool: Mapping[str, Any]) -> tuple[str, ...]:
    """The first cells of a pool's status row (`POOL_HEADERS`), from its ``as_dict``."""
    cap = pool.get("capacity") or 0
    used = pool.get("used", 0)
    return (str(pool.get("name", "?")), str(pool.get("path", "?")), format_size(cap),
            format_size(used), f"{100 * used / cap:.1f}%" if cap else "-")


def pool_gauges(kind: str, pool: Mapping[str, Any]) -> tuple[dict[str, str], list[Gauge]]:
    """The labels of a pool (``pool``, ``path``) and its gauges
    ``tcmu_py_<kind>_pool_capacity_bytes``, ``_used_bytes`` and ``_above_threshold``, from its
    ``as_dict``."""
    labels = {"pool": str(pool.get("name", "")), "path": str(pool.get("path", ""))}
    name = f"tcmu_py_{kind}_pool"
    return labels, [
        Gauge(f"{name}_capacity_bytes", f"{kind} pool physical capacity (its hard limit)",
              labels, pool.get("capacity") or 0),
        Gauge(f"{name}_used_bytes", f"{kind} pool physical bytes in use", labels,
              pool.get("used", 0)),
        Gauge(f"{name}_above_threshold", "1 while the pool's use is at or above its soft "
              "threshold", labels, 1.0 if pool.get("above_threshold") else 0.0),
    ]


def state_cell(pool: Mapping[str, Any]) -> str:
    """``ABOVE`` when the pool is at or above its soft threshold, else ``ok``."""
    return "ABOVE" if pool.get("above_threshold") else "ok"


def hard_limit(c: Checker, value: object, path: str, capacity: int) -> int | None:
    """A pool's ``hard_limit`` in bytes: ``'95%'`` (1..100 % of `capacity`) or a size up to
    `capacity`; None (reported to `c`) when it is neither."""
    expected = "a percentage of capacity like '95%' or a size not above capacity"
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = int(value.strip()[:-1])
        except ValueError:
            pct = -1
        if 1 <= pct <= 100:
            return capacity * pct // 100
        c.fail(path, value, expected)
        return None
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if 0 < n <= capacity:
        return n
    c.fail(path, value, expected)
    return None


# --------------------------------------------------------------------------------------------
# The YAML sections of both (``pools:`` for thin, ``dedup_pools:`` for dedup)

#: The keys every pool entry has; `pool_entries` checks them, a handler adds its own.
POOL_KEYS = frozenset({"name", "path", "capacity", "soft_threshold", "hard_limit"})
_REQUIRED_KEYS = frozenset({"name", "path", "capacity"})


class PoolEntry(NamedTuple):
    """One entry of a pool section with its shared keys checked: each figure None when missing
    or invalid (reported to the checker). ``hard_limit`` defaults to ``capacity``."""

    entry: Entry
    path: str | None
    capacity: int | None
    soft_threshold: int | None
    hard_limit: int | None


def pool_entries(c: Checker, raw: object, section: str,
                 extra_keys: frozenset[str] = frozenset()) -> Iterator[PoolEntry]:
    """Each entry of the pool section `raw` (top-level key `section`) with ``name``, ``path``
    (absolute), ``capacity`` (a size > 0), ``soft_threshold`` (1..100, default 80; null: no
    soft threshold, as MODE SELECT can make it) and ``hard_limit`` (`hard_limit`) checked;
    `extra_keys` are the handler's own, which it checks itself. `Checker.clean_since` on
    ``.entry`` says whether the entry is whole (a None field may be a failed one)."""
    for entry in c.named_entries(raw, section, set(POOL_KEYS | extra_keys), _REQUIRED_KEYS,
                                 "pool"):
        p, m = entry.path, entry.fields
        path = c.abspath(m["path"], f"{p}.path") if "path" in m else None
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            # apply would fail to make it (or its lock file) with a bare OSError
            c.fail(f"{p}.path", m["path"], "a directory, or a path where one can be made: it is"
                   " a file")
            path = None
        if path is not None:  # one directory holds one pool (or library), of any section
            c.claim_directory(path, f"{p}.path", m["path"])
        cap = c.size(m["capacity"], f"{p}.capacity") if "capacity" in m else None
        soft = m.get("soft_threshold", 80)
        if soft is not None:
            soft = c.integer(soft, f"{p}.soft_threshold", 1, 100,
                             "a percentage 1..100, or null for none")
        hard: int | None = cap
        if "hard_limit" in m and cap is not None:
            hard = hard_limit(c, m["hard_limit"], f"{p}.hard_limit", cap)
        yield PoolEntry(entry, path, cap, soft, hard)


def device_pool_ref(dev: Mapping[str, Any]) -> tuple[str, object] | None:
    """Where a raw ``devices[]`` entry names its pool, and what it gives: ``("pool", v)``, else
    ``("options.pool", v)`` (a declared name there is the same as ``pool:``; an absolute
    directory is the handler's own option), else None (a null counts as absent). The daemon's
    loader reads the two keys the same way (`tcmu_py.daemon.config`)."""
    if dev.get("pool") is not None:
        return "pool", dev["pool"]
    opts = dev.get("options")
    if isinstance(opts, dict) and opts.get("pool") is not None:
        return "options.pool", opts["pool"]
    return None


def check_device_pools(c: Checker, doc: Mapping[str, Any], subtype: str, section: str,
                       raw: object, *, required: bool) -> None:
    """Every ``devices[]`` entry of handler `subtype` whose ``pool:`` does not name a pool of
    `raw` (the section `section`; names of entries that failed validation still count, so one
    bad pool does not cascade) is reported; with `required`, so is one with neither ``pool:``
    nor ``options.pool``."""
    names = raw_names(raw)
    expected = f"the name of a pool in {section} ({', '.join(sorted(names)) or 'none declared'})"
    devices = doc.get("devices")
    for i, dev in enumerate(devices if isinstance(devices, list) else []):
        if not isinstance(dev, dict) or dev.get("handler") != subtype:
            continue
        ref = device_pool_ref(dev)
        key, pool = ref if ref is not None else ("pool", None)
        if key == "pool" and isinstance(pool, str):
            if pool not in names:
                c.fail(f"devices[{i}].pool", pool, expected)
        elif isinstance(pool, str) and not pool.startswith("/"):
            if pool not in names:  # ``options: {pool: <name>}`` names a declared pool too
                c.fail(f"devices[{i}].options.pool", pool,
                       f"an absolute pool directory or {expected}")
        elif required and ref is None:
            c.fail(f"devices[{i}].pool", dev.get("pool", MISSING),
                   f"{expected}: a {subtype} device needs one")


class NamedPool(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...


T = TypeVar("T")
S = TypeVar("S", bound=NamedPool)


class PoolDevice(NamedTuple, Generic[S]):
    """A raw ``devices[]`` entry (`entry`, ``devices[at]``) of a pool handler naming a declared
    `pool` (by name, or by its directory in ``options.pool``): the handler's own pool spec."""

    at: int
    entry: Mapping[str, Any]
    pool: S


def pool_devices(doc: Mapping[str, Any], subtype: str, pools: Sequence[S]
                 ) -> Iterator[PoolDevice[S]]:
    """The devices of handler `subtype` in the raw YAML `doc` naming one of `pools` (the
    section's valid entries); others are `check_device_pools`' to report."""
    by_name = {pool.name: pool for pool in pools}
    by_path = {os.path.realpath(pool.path): pool for pool in pools}
    devices = doc.get("devices")
    for i, dev in enumerate(devices if isinstance(devices, list) else []):
        if not isinstance(dev, dict) or dev.get("handler") != subtype:
            continue
        ref = device_pool_ref(dev)
        if ref is None or not isinstance(ref[1], str):
            continue
        named = ref[1]
        pool = by_path.get(os.path.realpath(named)) if named.startswith("/") else by_name.get(
            named)
        if pool is not None:
            yield PoolDevice(i, dev, pool)


def check_existing_pool(c: Checker, p: str, path: str, pool_file: str, load: Callable[[str], T],
                        mismatches: Callable[[T], Iterable[tuple[str, object, object]]]
                        ) -> T | None:
    """A pool declared at `p` whose directory `path` holds one already (its `pool_file`) must
    be the one declared: each ``(key, declared, recorded)`` of `mismatches` (settings that
    cannot change) is reported, so `check` refuses what ``apply`` would, before anything is
    created. Returns the existing pool's settings (`load`), None for a new or unreadable one
    (reported)."""
    file = os.path.join(path, pool_file)
    if not os.path.lexists(file):
        return None
    try:
        current = load(path)
    except ConfigError as exc:
        c.fail(f"{p}.path", path, f"a pool directory with a valid {pool_file} ({exc})")
        return None
    for key, given, recorded in mismatches(current):
        c.fail(f"{p}.{key}", given, f"{recorded!r}, what the pool at {path} was created with"
               f" (recorded in {file}; it cannot change)")
    return current


def pool_config_items(device: Device, subtype: str, pools: Sequence[NamedPool]
                      ) -> tuple[tuple[str, str], ...]:
    """``("pool", <directory>)`` for a device of `subtype` naming a declared pool: its
    dev_config then names the directory, which a daemon started without the YAML can open."""
    if device.handler != subtype:
        return ()
    for pool in pools:
        if pool.name == device.pool:
            return (("pool", pool.path),)
    return ()
