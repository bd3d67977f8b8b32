"""Thin pools: a directory of sparse disk files sharing one physical capacity.

Layout of a pool directory::

    pool.json        {"version": 1, "name", "capacity", "soft_threshold", "unit",
                      "disks": {"<disk>": {"unit": <bytes>}}}   (replaced atomically)
    <disk>.img       one sparse file per thin disk
    .lock            flock'd while a process has the pool open
    .pool.json.lock  flock'd around every read-modify-write of pool.json, by any process

Everything is created 0600 (the directory 0700): the images are someone's data.

Theory of operation:

- **Accounting is derived, never stored.** Opening a pool scans every disk file with
  SEEK_DATA/SEEK_HOLE and counts the allocation units holding any data; from then on the open pool
  keeps the count in memory under `Pool._lock`, changed only by `reserve` (before a write lands in
  unallocated units) and `release` (after units were punched). A crash therefore cannot leave the
  figures wrong: the next open recounts the files.
- **Hard limit = capacity.** `reserve` refuses (SpaceAllocationFailed; SBC-4 resource exhaustion)
  any request that would take the pool above its capacity; it reserves all units of one request
  or none.
- **Soft threshold.** Each time usage rises from below ``capacity * soft_threshold / 100`` to at or
  above it, `generation` increases by one. Devices remember the generation they last reported and
  raise UNIT ATTENTION 38h/07h when it moved (SBC-4 logical block provisioning thresholds). A
  pool opened above its threshold starts at generation 1 so every device reports it once after a
  restart.
- **Capacity never exceeds the file system.** Creating a pool needs ``capacity`` bytes free, and
  opening one needs ``capacity - used`` free (statvfs f_bavail), so an accepted write never meets
  ENOSPC from the file system. What other pools open in this process on the same file system
  may still allocate counts as taken; other writers to the file system (or pools of another
  process) can still fill it behind our back, and are caught at the next open.
- **pool.json has several writers.** The process holding the pool registers and deletes disks
  and changes the threshold (MODE SELECT); `tcmu-py apply` (`ensure_pool`), in another process,
  changes capacity and threshold while a daemon holds the pool. Every writer takes the config
  lock, re-reads pool.json under it, changes only what it means to change and writes it back:
  no change is lost in either direction. An open pool adopts the capacity and threshold
  another process wrote at its next write, its next `status`, or within `RELOAD_SECONDS` of
  its next allocation. A malformed pool.json is a StateFileError naming the file, the key, the
  value and what was expected (`tcmu_py.statefile`).
- One process at a time: `Pool.open` takes an exclusive flock on ``.lock``. Inside a process,
  everything shares one `Pool` through `acquire_pool` / `release_pool` (reference-counted in
  `tcmu_py.handler.shared`); calling `Pool.open` a second time fails.
  `read_pool_status` works without the lock (it scans the files, or asks the pool open in this
  process).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tcmu_py.errors import ConfigError
from tcmu_py.statefile import (
    invalid,
    make_private_dirs,
    read_json,
    remove_stale_temporaries,
    write_json,
)

from .._pool import PhysicalPool, ThresholdFigures
from .sparse import probe_filesystem, unit_runs

if TYPE_CHECKING:
    from .backend import ThinBackend

log = logging.getLogger(__name__)

POOL_FILE = "pool.json"
LOCK_FILE = ".lock"
#: flock'd by every writer of pool.json around its read-modify-write (see `_config_lock`).
CONFIG_LOCK_FILE = ".pool.json.lock"
DISK_SUFFIX = ".img"
#: An open pool looks at most this often (seconds) whether another process changed pool.json.
RELOAD_SECONDS = 1.0
POOL_FORMAT_VERSION = 1

#: Default allocation unit: 64 KiB. It is a multiple of the 4 KiB block of ext4/XFS/tmpfs (so
#: punching whole units frees whole file-system blocks), matches the discard granularity Linux
#: file systems use for fstrim on most SSDs, and keeps the file's extent count and the per-write
#: SEEK_DATA cost low: 4 KiB random writes allocate 16x fewer, larger extents than 4 KiB units.
#: Smaller units return space sooner after small discards; any power of two from the file-system
#: block size up to MAX_UNIT works (`create_pool(unit=...)`, or `unit=` for a new disk).
DEFAULT_UNIT = 64 * 1024
MAX_UNIT = 1 << 30

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid pool/disk name, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{kind} name {name!r}: expected 1..64 characters A-Z a-z 0-9 _ . - starting with a "
            "letter or digit"
        )
    return name


def check_unit(unit: int, fs_block: int | None = None, where: str = "") -> int:
    """Return `unit` if it is a usable allocation unit, else raise ConfigError."""
    prefix = f"{where}: " if where else ""
    if not isinstance(unit, int) or unit <= 0 or unit & (unit - 1) or unit > MAX_UNIT:
        raise ConfigError(
            f"{prefix}allocation unit {unit!r}: expected a power of two <= {MAX_UNIT}"
        )
    if fs_block is not None and unit % fs_block:
        # Whole units must be whole file-system blocks, or punching a unit leaves a block allocated.
        raise ConfigError(
            f"{prefix}allocation unit {unit}: expected a multiple of the file-system block size "
            f"{fs_block}"
        )
    return unit


def _check_threshold(value: int | None, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or not 1 <= value <= 100):
        raise ConfigError(
            f"{where}: soft_threshold {value!r}: expected a percentage 1..100 or null"
        )
    return value


@dataclass(frozen=True)
class PoolConfig:
    """The persistent part of a pool (``pool.json``). `disks` maps disk name -> allocation unit."""

    name: str
    capacity: int
    soft_threshold: int | None
    unit: int
    disks: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": POOL_FORMAT_VERSION,
            "name": self.name,
            "capacity": self.capacity,
            "soft_threshold": self.soft_threshold,
            "unit": self.unit,
            "disks": {name: {"unit": unit} for name, unit in sorted(self.disks.items())},
        }

    @classmethod
    def from_doc(cls, doc: object, where: str) -> PoolConfig:
        """Validate a parsed pool.json; errors are StateFileError naming `where`, the key, the
        value and what was expected."""
        if not isinstance(doc, dict):
            raise invalid(where, "(top level)", doc, "a JSON object (a thin pool file)")
        if doc.get("version", _MISSING) != POOL_FORMAT_VERSION:
            raise invalid(where, "version", doc.get("version", _MISSING),
                          f"{POOL_FORMAT_VERSION} (the pool format this version reads)")

        def get(key: str, ok: Callable[[Any], bool], expected: str, default: Any = _MISSING
                ) -> Any:
            value = doc.get(key, default)
            if value is _MISSING or not ok(value):
                raise invalid(where, key, value, expected)
            return value

        name = get("name", lambda v: isinstance(v, str) and bool(_NAME_RE.match(v)),
                   "a pool name: 1..64 characters A-Z a-z 0-9 _ . - starting with a letter or"
                   " digit")
        capacity = get("capacity", lambda v: _is_int(v) and v > 0,
                       "a positive number of bytes")
        unit = get("unit", _is_unit, f"an allocation unit: a power of two <= {MAX_UNIT}")
        threshold = get("soft_threshold", lambda v: v is None or (_is_int(v) and 1 <= v <= 100),
                        "a percentage 1..100 or null", default=None)
        raw_disks = get("disks", lambda v: isinstance(v, dict),
                        'an object {"<disk>": {"unit": <bytes>}}', default={})
        disks: dict[str, int] = {}
        for disk, entry in raw_disks.items():
            if not _NAME_RE.match(disk):
                raise invalid(where, "disks", disk, "disk names of 1..64 characters A-Z a-z 0-9"
                              " _ . - starting with a letter or digit")
            if not isinstance(entry, dict) or not _is_unit(entry.get("unit")):
                raise invalid(where, f"disks.{disk}", entry, '{"unit": <a power of two <='
                              f" {MAX_UNIT}>}}")
            disks[disk] = entry["unit"]
        return cls(name, capacity, threshold, unit, MappingProxyType(disks))


_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "nothing"})()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unit(value: object) -> bool:
    return _is_int(value) and 0 < value <= MAX_UNIT and not value & (value - 1)  # type: ignore[operator]


def load_pool_config(path: str) -> PoolConfig:
    """Read ``<path>/pool.json``. Raises ConfigError naming the file if missing or invalid
    (StateFileError: unreadable, not JSON, or a key holding what a pool file cannot)."""
    file = os.path.join(path, POOL_FILE)
    try:
        doc = read_json(file, "a thin pool file (pool.json)")
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: no thin pool here (missing {POOL_FILE}); create it first"
        ) from None
    return PoolConfig.from_doc(doc, file)


def _write_pool_config(path: str, config: PoolConfig) -> None:
    """Replace ``<path>/pool.json`` atomically and durably (`tcmu_py.statefile.write_json`).
    Callers hold the pool's config lock (`_config_lock`) and wrote what they re-read under it."""
    write_json(os.path.join(path, POOL_FILE), config.to_doc(), indent=2)


@contextlib.contextmanager
def _config_lock(path: str) -> Iterator[None]:
    """Hold the pool's config lock: every writer of pool.json, in any process, takes it and
    re-reads pool.json under it before changing it (read-modify-write), so no writer's change
    is lost to another's. Short: held only around one read and one write."""
    fd = os.open(os.path.join(path, CONFIG_LOCK_FILE),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _file_signature(path: str) -> tuple[int, int, int] | None:
    """What identifies one version of ``<path>/pool.json``: every write replaces the file."""
    try:
        st = os.stat(os.path.join(path, POOL_FILE))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _check_space(path: str, needed: int, what: str) -> None:
    """Raise ConfigError if the file system holding `path` has fewer than `needed` free bytes
    beyond what the other pools open in this process on that file system may still allocate."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    dev = os.stat(path).st_dev
    real = os.path.realpath(path)
    with _open_pools_lock:
        others = [p for p in _open_pools.values() if p.path != real]
    promised = sum(max(p.capacity - p.used, 0) for p in others if p.st_dev == dev)
    if needed + promised > free:
        also = f" after the {promised} bytes other open pools may still use" if promised else ""
        raise ConfigError(
            f"{path}: {what} needs {needed} bytes but the file system has only {free} bytes "
            f"free{also}; expected a capacity the file system can hold (free space or lower the "
            "capacity)"
        )


def disk_file(path: str, disk: str) -> str:
    return os.path.join(path, disk + DISK_SUFFIX)


def count_units(fd: int, unit: int, start: int, end: int) -> int:
    """Allocation units of [start, end) (unit-aligned start) that hold any allocated byte."""
    return sum(b - a for a, b in unit_runs(fd, unit, start, end))


def _scan_file(file: str, unit: int) -> tuple[int, int]:
    """(size, allocated units) of one disk file."""
    fd = os.open(file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return size, count_units(fd, unit, 0, size)
    finally:
        os.close(fd)


def _disk_units(path: str, config: PoolConfig) -> dict[str, int]:
    """Allocation unit of every disk file in the pool (registered ones and stray ``*.img``)."""
    units = dict(config.disks)
    for entry in os.listdir(path):
        if entry.endswith(DISK_SUFFIX) and entry[: -len(DISK_SUFFIX)] not in units:
            stray = entry[: -len(DISK_SUFFIX)]
            log.warning("pool %s: %s is not registered in %s; counting it with unit %d",
                        path, entry, POOL_FILE, config.unit)
            units[stray] = config.unit
    return units


@dataclass(frozen=True)
class DiskStatus:
    """One disk of a pool: `size` (bytes, 0 if its file does not exist yet), `used` (bytes of
    allocated units), `unit` (its allocation unit), `open` (served by this process)."""

    name: str
    size: int
    used: int
    unit: int
    open: bool = False


@dataclass(frozen=True)
class PoolStatus(ThresholdFigures):
    """A pool's figures for `tcmu-py status`. `live` is True when read from the pool open in this
    process, False when computed by scanning the files."""

    path: str
    name: str
    capacity: int
    used: int
    soft_threshold: int | None
    unit: int
    disks: tuple[DiskStatus, ...]
    live: bool

    @property
    def available(self) -> int:
        return max(self.capacity - self.used, 0)

    @property
    def percent_used(self) -> float:
        return 100.0 * self.used / self.capacity

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for YAML/JSON output)."""
        return {
            "path": self.path, "name": self.name, "capacity": self.capacity, "used": self.used,
            "available": self.available, "soft_threshold": self.soft_threshold,
            "above_threshold": self.above_threshold, "unit": self.unit,
            "disks": [
                {"name": d.name, "size": d.size, "used": d.used, "unit": d.unit, "open": d.open}
                for d in self.disks
            ],
        }


# Pools open in this process, by real path (for read_pool_status).
_open_pools: dict[str, Pool] = {}
_open_pools_lock = threading.Lock()


class Pool(PhysicalPool):
    """An open pool (capacity and threshold: `PhysicalPool`). Thread-safe; every method may be
    called from any worker thread."""

    def __init__(self, path: str, config: PoolConfig, lock_fd: int, fs_block: int,
                 disk_units: dict[str, int]) -> None:
        self.path = path
        self.fs_block = fs_block
        self.st_dev = os.stat(path).st_dev
        self._config = config
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._units: dict[str, int] = disk_units  # disk -> allocation unit
        self._allocated: dict[str, int] = {}  # disk -> allocated units
        self._open_disks: dict[str, ThinBackend] = {}
        self._used = 0
        self._closed = False
        self._config_seen = _file_signature(path)  # pool.json as last read or written
        self._next_reload = time.monotonic() + RELOAD_SECONDS

    # ------------------------------------------------------------------------------------------
    # Opening and closing

    @classmethod
    def open(cls, path: str, expected_name: str | None = None) -> Pool:
        """Open the pool in directory `path`, recounting its usage from the disk files.

        Raises ConfigError (missing/invalid pool.json, name differs from `expected_name`, pool
        open in another process, capacity the file system cannot hold, unit unsuitable for the
        file system) or OSError (file system cannot punch holes).
        """
        path = os.path.realpath(path)
        seen = _file_signature(path)
        config = load_pool_config(path)
        if expected_name is not None and config.name != expected_name:
            raise ConfigError(
                f"{os.path.join(path, POOL_FILE)}: pool is named {config.name!r}, expected "
                f"{expected_name!r}"
            )
        lock_fd = os.open(os.path.join(path, LOCK_FILE),
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{path}: thin pool is already open (another daemon or device "
                                  "holds its lock)") from None
            with _config_lock(path):  # no writer is between its temporary file and its rename
                stale = remove_stale_temporaries(os.path.join(path, POOL_FILE))
            if stale:
                log.warning("pool %s: removed %s left by an interrupted write", path, stale)
            fs_block = probe_filesystem(path)
            check_unit(config.unit, fs_block, path)
            units = _disk_units(path, config)
            pool = cls(path, config, lock_fd, fs_block, units)
            pool._config_seen = seen
            for disk, unit in units.items():
                check_unit(unit, fs_block, f"{path}: disk {disk}")
                try:
                    _, n = _scan_file(disk_file(path, disk), unit)
                except FileNotFoundError:
                    n = 0
                pool._allocated[disk] = n
                pool._used += n * unit
            _check_space(path, config.capacity - pool._used,
                         f"pool {config.name!r} (capacity {config.capacity}, used {pool._used})")
            pool._opened()
        except BaseException:
            os.close(lock_fd)
            raise
        with _open_pools_lock:
            _open_pools[path] = pool
        log.info("pool %s at %s: capacity %d, used %d in %d disks", config.name, path,
                 config.capacity, pool._used, len(units))
        return pool

    def close(self) -> None:
        """Release the pool lock. Disks still open keep working but should be closed first."""
        with _open_pools_lock:
            if _open_pools.get(self.path) is self:
                del _open_pools[self.path]
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.close(self._lock_fd)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # Figures

    @property
    def config(self) -> PoolConfig:
        return self._config

    @property
    def used(self) -> int:
        """Bytes in allocated units, all disks."""
        return self._used

    def disk_used(self, disk: str) -> int:
        """Bytes in `disk`'s allocated units."""
        with self._lock:
            return self._allocated.get(disk, 0) * self._units.get(disk, 0)

    def status(self) -> PoolStatus:
        """Live figures (capacity and threshold as pool.json says now, see `_reload`)."""
        with self._lock:
            self._reload()
            disks = []
            for disk, unit in sorted(self._units.items()):
                backend = self._open_disks.get(disk)
                if backend is not None:
                    size = backend.size
                else:
                    try:
                        size = os.stat(disk_file(self.path, disk)).st_size
                    except FileNotFoundError:
                        size = 0
                disks.append(DiskStatus(disk, size, self._allocated.get(disk, 0) * unit, unit,
                                        backend is not None))
            c = self._config
            return PoolStatus(self.path, c.name, c.capacity, self._used, c.soft_threshold, c.unit,
                              tuple(disks), live=True)

    # ------------------------------------------------------------------------------------------
    # Allocation (called by ThinBackend)

    def reserve(self, disk: str, units: int) -> None:
        """Account `units` new allocation units to `disk`, or raise SpaceAllocationFailed and
        account nothing (SBC-4 resource exhaustion: the write fails with DATA PROTECT 27h/07h)."""
        if units <= 0:
            return
        with self._lock:
            if time.monotonic() >= self._next_reload:
                self._reload()
            need = units * self._units[disk]
            self._take_space(self._used, need, f"disk {disk}")
            self._used += need
            self._allocated[disk] += units

    def release(self, disk: str, units: int) -> None:
        """Give back `units` allocation units of `disk` (they were punched)."""
        if units <= 0:
            return
        with self._lock:
            if units > self._allocated[disk]:
                raise AssertionError(f"pool {self.name}: disk {disk} releases {units} units but "
                                     f"holds {self._allocated[disk]}")
            self._allocated[disk] -= units
            self._used -= units * self._units[disk]

    # ------------------------------------------------------------------------------------------
    # Administration: pool.json, shared with other processes (`tcmu-py apply`)

    def _reload(self) -> None:
        """Adopt the capacity and soft threshold another process (`tcmu-py apply`) wrote to
        pool.json since this pool last read or wrote it (self._lock held; cheap when nothing
        changed: one stat). A pool.json that became unreadable is logged and ignored: the pool
        keeps its figures."""
        self._next_reload = time.monotonic() + RELOAD_SECONDS
        seen = _file_signature(self.path)
        if seen == self._config_seen:
            return
        self._config_seen = seen
        try:
            config = load_pool_config(self.path)
        except ConfigError as exc:
            log.error("pool %s: keeping capacity %d: %s", self.name, self.capacity, exc)
            return
        if (config.capacity, config.soft_threshold) != (self.capacity, self.soft_threshold):
            log.info("pool %s: pool.json changed: capacity %d, soft threshold %s", self.name,
                     config.capacity, config.soft_threshold)
            self._adopt(replace(self._config, capacity=config.capacity,
                                soft_threshold=config.soft_threshold))

    def _update(self, change: Callable[[PoolConfig], PoolConfig]) -> None:
        """Read-modify-write pool.json under its config lock (self._lock held): `change` gets
        pool.json as it is now (with what other processes wrote) and returns what to write;
        the result becomes the pool's config. `change` may raise: nothing is written then."""
        with _config_lock(self.path):
            current = load_pool_config(self.path)
            if current.name != self._config.name:
                raise ConfigError(f"{os.path.join(self.path, POOL_FILE)}: pool is named "
                                  f"{current.name!r} now, expected {self._config.name!r}")
            new = change(current)
            if new != current:
                _write_pool_config(self.path, new)
            self._config_seen = _file_signature(self.path)
        self._adopt(new)

    def set_soft_threshold(self, percent: int | None) -> None:
        """Change (and persist) the soft threshold; lowering it below the current usage counts as
        a crossing."""
        _check_threshold(percent, self.path)
        with self._lock:
            self._update(lambda c: replace(c, soft_threshold=percent))

    def set_capacity(self, capacity: int) -> None:
        """Change (and persist) the capacity. It may go below the current usage (then every new
        allocation fails); it may not promise more than the file system has free."""
        if not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(
                f"{self.path}: capacity {capacity!r}: expected a positive number of bytes"
            )

        def change(current: PoolConfig) -> PoolConfig:
            if capacity > current.capacity:
                _check_space(self.path, max(capacity - self._used, 0), f"capacity {capacity}")
            return replace(current, capacity=capacity)

        with self._lock:
            self._update(change)

    # ------------------------------------------------------------------------------------------
    # Disks

    def open_disk(
        self,
        disk: str,
        size: int,
        *,
        block_size: int = 512,
        write_cache: bool = False,
        unit: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> ThinBackend:
        """Open thin disk `disk` of `size` bytes, creating it (registered in pool.json, then an
        empty sparse file) if missing, growing its file if smaller than `size`.

        `unit` chooses the allocation unit of a new disk (default: the pool's); for an existing disk
        it must equal the recorded one. Raises ConfigError for a bad name/size/unit, a disk already
        open, or a file larger than `size` (never truncates data).
        """
        from .backend import ThinBackend

        check_name("disk", disk)
        where = f"{self.path}: disk {disk}"
        if not isinstance(size, int) or size <= 0 or size % block_size:
            raise ConfigError(f"{where}: size {size!r}: expected a positive multiple of the block "
                              f"size {block_size}")
        with self._lock:
            if self._closed:
                raise ConfigError(f"{self.path}: pool is closed")
            if disk in self._open_disks:
                raise ConfigError(f"{where}: already open")
            known = self._units.get(disk)  # registered, or a stray file counted at open
            if known is not None and unit is not None and unit != known:
                raise ConfigError(f"{where}: unit {unit}: the disk was created with unit {known}; "
                                  "the allocation unit of an existing disk cannot change")
            disk_unit = known or unit or self._config.unit
            check_unit(disk_unit, self.fs_block, where)
            if disk_unit % block_size:
                raise ConfigError(f"{where}: unit {disk_unit}: expected a multiple of the block "
                                  f"size {block_size}")
            if disk not in self._config.disks:
                # Register before creating the file: a crash in between leaves a registered disk
                # without a file (counts 0), never an unaccounted file.
                self._update(lambda c: replace(
                    c, disks=MappingProxyType({**c.disks, disk: disk_unit})))
                self._units[disk] = disk_unit
                self._allocated.setdefault(disk, 0)
            file = disk_file(self.path, disk)
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                         | (0 if write_cache else os.O_DSYNC), 0o600)
            try:
                current = os.fstat(fd).st_size
                if current > size:
                    raise ConfigError(f"{file}: file is {current} bytes, larger than the device "
                                      f"size {size}; expected size >= {current} (data is never "
                                      "truncated on open)")
                if current < size:
                    os.ftruncate(fd, size)
                backend = ThinBackend(self, disk, fd, size, disk_unit, block_size=block_size,
                                      write_cache=write_cache, on_close=on_close)
            except BaseException:
                os.close(fd)
                raise
            self._open_disks[disk] = backend
            return backend

    def _disk_closed(self, disk: str) -> None:
        with self._lock:
            self._open_disks.pop(disk, None)

    def delete_disk(self, disk: str) -> None:
        """Delete a closed disk: its file and its registration; its units return to the pool."""
        check_name("disk", disk)
        with self._lock:
            if disk in self._open_disks:
                raise ConfigError(f"{self.path}: disk {disk}: is open; close it first")
            if disk not in self._units:
                raise ConfigError(f"{self.path}: disk {disk}: no such disk")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk_file(self.path, disk))
            self._update(lambda c: replace(c, disks=MappingProxyType(
                {d: u for d, u in c.disks.items() if d != disk})))
            self._used -= self._allocated.pop(disk, 0) * self._units.pop(disk)


# ----------------------------------------------------------------------------------------------
# Admin API (CLI / daemon)


def create_pool(
    path: str,
    name: str,
    capacity: int,
    soft_threshold: int | None = 80,
    unit: int = DEFAULT_UNIT,
) -> PoolConfig:
    """Create a pool in directory `path` (created if missing; must not hold a pool already).

    Raises ConfigError if the name, threshold or unit is invalid, if the file system has less than
    `capacity` bytes free, or if a pool exists there; OSError if the file system cannot punch holes.
    """
    check_name("pool", name)
    _check_threshold(soft_threshold, path)
    if not isinstance(capacity, int) or capacity <= 0:
        raise ConfigError(f"{path}: capacity {capacity!r}: expected a positive number of bytes")
    check_unit(unit, where=path)
    make_private_dirs(path)
    path = os.path.realpath(path)
    with _config_lock(path):
        if os.path.exists(os.path.join(path, POOL_FILE)):
            raise ConfigError(f"{path}: a thin pool already exists here")
        fs_block = probe_filesystem(path)
        check_unit(unit, fs_block, path)
        _check_space(path, capacity, f"pool {name!r} of capacity {capacity}")
        config = PoolConfig(name, capacity, soft_threshold, unit)
        _write_pool_config(path, config)
    return config


def ensure_pool(
    path: str,
    name: str,
    capacity: int,
    soft_threshold: int | None = 80,
    unit: int = DEFAULT_UNIT,
) -> PoolConfig:
    """Make the pool at `path` match a declaration (YAML): create it if missing, else update
    capacity and soft threshold (the live pool if open in this process). The name must match;
    `unit` only applies to a new pool. Raises as `create_pool` / `Pool.set_capacity`."""
    real = os.path.realpath(path)
    if not os.path.exists(os.path.join(real, POOL_FILE)):
        return create_pool(path, name, capacity, soft_threshold, unit)
    with _open_pools_lock:
        live = _open_pools.get(real)
    if live is not None:
        if live.name != name:
            raise ConfigError(f"{real}: pool is named {live.name!r}, expected {name!r}")
        if live.capacity != capacity:
            live.set_capacity(capacity)
        if live.soft_threshold != soft_threshold:
            live.set_soft_threshold(soft_threshold)
        return live.config
    _check_threshold(soft_threshold, real)
    # Another process (a running daemon) may hold the pool and write pool.json too: change it
    # under the config lock, from what it says now; that daemon adopts the new figures.
    with _config_lock(real):
        config = load_pool_config(real)
        if config.name != name:
            raise ConfigError(f"{real}: pool is named {config.name!r}, expected {name!r}")
        if capacity != config.capacity or soft_threshold != config.soft_threshold:
            if capacity > config.capacity:
                used = read_pool_status(real).used
                _check_space(real, max(capacity - used, 0), f"capacity {capacity}")
            config = replace(config, capacity=capacity, soft_threshold=soft_threshold)
            _write_pool_config(real, config)
    return config


def _pool_key(path: str) -> str:
    return "thin-pool:" + os.path.realpath(path)


def acquire_pool(path: str, expected_name: str | None = None) -> Pool:
    """The pool at `path`, shared by everything in this process that uses it (reference-counted
    in `tcmu_py.handler.shared`): opened by the first caller, closed by the last `release_pool`.
    Raises as `Pool.open` (then nothing is held); ConfigError if `expected_name` differs."""
    from tcmu_py.handler import shared

    key = _pool_key(path)
    pool = shared.acquire(key, lambda: Pool.open(path, expected_name))
    if expected_name is not None and pool.name != expected_name:
        shared.release(key, Pool.close)
        raise ConfigError(f"{pool.path}: pool is named {pool.name!r}, expected {expected_name!r}")
    return pool


def release_pool(pool: Pool) -> None:
    """Drop one `acquire_pool` reference; the last one closes the pool."""
    from tcmu_py.handler import shared

    shared.release(_pool_key(pool.path), Pool.close)


def read_pool_status(path: str) -> PoolStatus:
    """Figures of the pool at `path`: live if open in this process, else by scanning its files
    (no lock taken; safe while another process serves it, figures may lag its in-flight writes).
    Raises ConfigError if there is no valid pool."""
    real = os.path.realpath(path)
    with _open_pools_lock:
        live = _open_pools.get(real)
    if live is not None:
        return live.status()
    config = load_pool_config(real)
    disks = []
    used = 0
    for disk, unit in sorted(_disk_units(real, config).items()):
        try:
            size, n = _scan_file(disk_file(real, disk), unit)
        except FileNotFoundError:
            size, n = 0, 0
        disks.append(DiskStatus(disk, size, n * unit, unit))
        used += n * unit
    return PoolStatus(real, config.name, config.capacity, used, config.soft_threshold, config.unit,
                      tuple(disks), live=False)
