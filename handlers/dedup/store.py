"""Dedup pools: chunks stored once per distinct content, shared by several disks.

Rules this file obeys
---------------------
* A pool is a directory (0700; every file 0600)::

      pool.json          {"version": 1, "kind": "dedup", "name", "capacity", "soft_threshold",
                          "chunk_size"}; with compression {"version": 2, ...,
                          "compression": "zstd"} (2 kept when it is turned off: compressed
                          chunks stay); with a fingerprint other than SHA-256
                          {"version": 3, ..., "fingerprint": "xxh3-128"}
                                                           (replaced atomically, statefile)
      index.sqlite       the fingerprint index, the block maps, the containers (+ -wal, -shm);
                         made by `create_pool` only (an open refuses one missing, empty or
                         without schema); its ``meta`` records ``clean`` and ``chunk_size``
                         (an open refuses a pool.json whose chunk size differs)
      containers/NNNNNNNN.dat   chunk data, append-only
      .lock              flock'd while a process has the pool open
      .pool.json.lock    flock'd around every read-modify-write of pool.json

* A disk is cut into chunks of ``chunk_size`` bytes (a power of two, 4 KiB..64 KiB; a short
  last chunk is stored padded with zeros). Chunk ``i`` of disk ``d`` is the row ``map(d, i)``
  naming a row of ``chunks``; **no row means zeros** (LBPRZ=1): an all-zero chunk costs no data
  and no chunk, and writing zeros, UNMAP and WRITE SAME with UNMAP all just delete map rows.
* Identity: a fingerprint of the chunk's bytes (``chunks.fp`` is UNIQUE), chosen when the pool
  is created (``pool.json`` ``fingerprint``):

  - ``xxh3-128`` (new pools): XXH3-128 (``xxhash``, 16 bytes), **confirmed by comparing
    bytes**: a write whose fingerprint names a stored chunk (or an earlier chunk of the same
    command) reads that chunk back and takes it only if the bytes are equal. A chunk whose XXH3
    equals a different chunk's is stored under its SHA-256 (32 bytes: the two kinds never
    meet in the index), which later copies find in turn. So a collision, accidental or
    crafted, costs a second lookup and never merges different data. A stored copy damaged on
    disk (it reads back different, or does not decompress) is such a mismatch too: the write's
    chunk is stored apart under its SHA-256, and the damaged copy stays for `check` to name.
  - ``sha256`` (pools made before, or asked for): SHA-256 as identity (a collision has never
    been found; 2**64 chunks have a ~2**-128 chance of one), a match confirmed by bytes as
    well, against damage: a stored copy that reads back different has been damaged (the
    write's bytes have the chunk's SHA-256, so they are its content), and is *rewritten* from
    them (`_relocate`: a new copy appended, the row pointed at it in the same transaction,
    the damaged bytes left dead for the collector), so every disk naming the chunk reads its
    content again.

  Measured on the development machine (x86-64 with SHA extensions, CPython 3.11): SHA-256
  0.72 ms per MiB (2.8 us per 4 KiB chunk), XXH3-128 0.047 ms per MiB; the comparison costs a
  4 KiB ``pread`` (~2 us) per duplicate chunk. A 1 MiB write of unique chunks went from 3.4-3.9
  to 2.5-2.8 ms CPU, of 90 % duplicates from 2.2-2.4 to 1.8-2.0 ms (benchmarks/dedup_profile.py,
  docs/benchmarks.md). BLAKE2b took 1.3 ms per MiB. `check` verifies each chunk against the
  fingerprint its row holds (the length says which).
* Compression (optional, per pool, changeable): a new chunk is stored zstd-compressed (the
  ``zstandard`` binding of the reference C library) when that saves at least 512 bytes, and
  its row records how (``compression`` 0 none, 1 zstd; ``length`` the stored bytes), so a pool
  holds both kinds and a setting change needs no rewrite. The fingerprint is of the data, not of
  the stored bytes; `check` decompresses and compares it. Capacity counts stored bytes.
* ``chunks`` rows hold (fp, container, offset, length, refcount, compression): ``refcount`` is
  exactly the number of map rows naming the chunk, changed in the same transaction as the maps.
  A chunk whose refcount reaches 0 is garbage but keeps its row (a later write of the same
  content revives it at no cost) until the collector (`DedupPool.collect`) compacts its
  container. ``containers`` rows hold (id, size, dead): ``size`` the committed length of the
  file, ``dead`` = size - bytes of chunks with refcount > 0 (garbage and leaked bytes).
* The store is SQLite (stdlib ``sqlite3``) in WAL mode: the best-kept embedded database there is
  (aviation-grade test suite, ubiquitous, in the standard library: no dependency to vet),
  transactional across the index and the maps, B-trees on disk so the index need not fit in RAM
  (memory is the page cache, ``cache_size``, independent of the pool's size), and readable by a
  second process (``tcmu-py status``) while a daemon writes.
* Memory per pool: the SQLite page cache (`CACHE_KIB`), the map cache (`MAP_CACHE_ENTRIES`
  chunk locations, ~6 MB: reads of recently read or written chunks skip the index) and one
  file descriptor per container read; per disk a native loop serves, its chunk table (24
  bytes per chunk of the disk read or written, at most 24 MiB: `backend.TABLE_SLOTS`); nothing
  grows with the number of chunks in the pool.
* The native loop's READs (`tcmu_py.backend.ChunkExtent`): a disk's chunk table holds
  locations as the map cache does; `attach_table` makes the pool tell it every location a put
  gives (before the write returns) or a read finds, empty it where the cache is dropped
  (`_forget`) and drop a container's fd from it before that fd is closed
  (`_forget_container`). Compressed chunks are forgotten there.
* Cost per command: a fixed number of SQL statements whatever the number of chunks
  (`DedupPool.put`: ``IN`` lookups, one range query, one ``executemany`` per table, the new
  chunks appended with one ``pwritev`` per container), so a 1 MiB write is dominated by
  SQLite's B-tree inserts (chunk row, its fingerprint and container index entries, map row),
  not by Python per chunk. A read goes from the map cache straight into the command's buffer
  (one ``preadv`` per run of chunks that lie back to back in a container).

Crash ordering (what makes a power cut safe)
--------------------------------------------
1. New chunk bytes are appended to a container file (page cache only).
2. Before any transaction that refers to them commits, every container appended to since the
   last commit is fdatasync'd, and the containers directory is fsync'd if a container file was
   created. Only then is ``COMMIT`` issued.
3. SQLite runs with ``synchronous=FULL``: in WAL mode that fsyncs the WAL at every commit, so a
   commit is durable when it returns (measured 0.40 ms per commit here, against 0.025 ms with
   NORMAL). NORMAL would make a commit durable only at the next checkpoint; we commit only where
   durability is owed (FUA, SYNCHRONIZE CACHE, every write of a disk without write cache, or
   every `GROUP_CHANGES` map changes), so FULL costs one fsync exactly where one is needed.
4. A write is acknowledged after step 3 when its disk has no write cache; with a write cache it
   is acknowledged when in the open transaction (visible to reads on the same connection), and
   made durable by `DedupBackend.flush` (FUA, SYNCHRONIZE CACHE), which runs steps 2-3. A
   commit that fails (whoever runs it: another disk's write, a group commit, the collector)
   rolls the transaction back, and with it the acknowledged writes of every disk in it: each
   such disk's next SYNCHRONIZE CACHE fails (`DedupPool.take_loss`, the backend's
   `lost_writes`), as fsync(2) does after a lost write-back, so none answers GOOD over writes
   that are gone (a FUA write in between is answered for itself alone).
5. A container is deleted (the collector) only after the commit that stopped referring to it.
6. Hence after any crash: no map row names a chunk whose bytes are not durable; container bytes
   past the committed ``size`` and container files without a row were never referred to by a
   committed transaction; both are *leaked* and reclaimed at open (truncated / deleted).
   Reference counts are committed with the maps, so they are exact; an open after an unclean
   shutdown recounts them anyway (and ``dead``) from the maps, repairing any drift.

Threads: one `threading.RLock` per pool serialises every use of its SQLite connection and its
containers (reads included: the collector moves chunks). The backend hashes whole chunks before
taking it; the read-modify-write of a partial chunk runs under it, so two writes to different
blocks of one chunk never lose each other's bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import xxhash

from tcmu_py.errors import ConfigError
from tcmu_py.scsi.sbc import merge_ranges
from tcmu_py.statefile import (
    fsync_dir,
    invalid,
    make_private_dirs,
    read_json,
    remove_stale_temporaries,
    write_json,
)
from tcmu_py.threadname import name_os_thread

from .._pool import PhysicalPool, ThresholdFigures, reaches
from .journal import Journal, _Record, open_journal, pending_records, scan_pending

if TYPE_CHECKING:
    from tcmu_py.backend import ChunkTable

    from .backend import DedupBackend

log = logging.getLogger(__name__)

POOL_FILE = "pool.json"
DB_FILE = "index.sqlite"
CONTAINER_DIR = "containers"
LOCK_FILE = ".lock"
CONFIG_LOCK_FILE = ".pool.json.lock"
#: pool.json's version: 1 without compression, 2 with (a version that cannot decompress
#: refuses such a pool instead of reading compressed bytes as data).
POOL_FORMAT_VERSION = 1
POOL_FORMAT_COMPRESSED = 2
#: pool.json's version when its ``fingerprint`` is not SHA-256 (with or without compression):
#: a version that only knows SHA-256 refuses the pool instead of deduplicating by the wrong hash.
POOL_FORMAT_FINGERPRINT = 3
#: pool.json's version when the pool has a write journal (``journal`` > 0, journal.py): a
#: version without one would ignore ``journal.dat`` and lose the writes not yet moved out of it.
POOL_FORMAT_JOURNAL = 4
#: The fingerprint of a pool's chunks (``pool.json`` ``fingerprint``; a pool without one:
#: "sha256"): "sha256" is trusted as identity; "xxh3-128" (new pools) is confirmed by comparing
#: bytes, and a chunk whose XXH3 equals a stored chunk's while its bytes differ is stored under
#: its SHA-256 instead (see the module doc). A stored fingerprint's length says which it is.
FINGERPRINTS = ("sha256", "xxh3-128")
DEFAULT_FINGERPRINT = "xxh3-128"
#: Per-chunk compression codes (``chunks.compression``) by the pool's ``compression`` setting.
COMPRESSION_CODES = {"none": 0, "zstd": 1}
#: zstd level: 3 (the library's default) costs ~10-40 us per 4 KiB chunk here.
ZSTD_LEVEL = 3
SCHEMA_VERSION = 1

DEFAULT_CHUNK = 4096
#: Problems `PRAGMA integrity_check` lists at most (`DedupPool.verify`).
INDEX_PROBLEMS = 20
#: Damage messages a pool keeps for `status` (more are counted, and logged).
DAMAGE_SHOWN = 8
MIN_CHUNK = 4096
MAX_CHUNK = 65536
#: A container is sealed once it holds this many bytes (the collector's unit of work).
DEFAULT_CONTAINER_BYTES = 64 << 20
#: Map changes in one open transaction before it is committed without being asked (bounds what
#: a crash loses of a write-cached disk, and the WAL's growth).
GROUP_CHANGES = 8192
#: SQLite page cache per pool, KiB: the index's memory, whatever the pool's size.
CACHE_KIB = 16384
#: The collector compacts a container once this share of it is dead (percent).
DEFAULT_DEAD_PERCENT = 50
RELOAD_SECONDS = 1.0
#: The in-daemon collector (`DedupPool.start_collector`): seconds between its looks at the pool,
#: and the most live bytes one step copies while holding the pool lock.
COLLECT_INTERVAL = 2.0
COLLECT_BATCH_BYTES = 1 << 20
#: Map rows one step of `DedupPool.drop_disk` releases (its memory is bounded, not the disk's).
DROP_STEP_CHUNKS = 1 << 16
#: The longest a write that does not fit spends compacting dead chunks before it is refused
#: (`DedupPool.put`): well inside the kernel's command timeout (30 s by default).
RECLAIM_SECONDS = 5.0

#: Map cache entries per pool (`DedupPool.read_chunks`), at most: ~100 bytes each (about
#: 6 MB), so a 256 MiB disk of 4 KiB chunks is served from memory; bounded whatever the pool's
#: size.
MAP_CACHE_ENTRIES = 1 << 16
#: Parameters per ``IN (...)`` query (SQLite allows at least 999).
_IN_BATCH = 500
#: A chunk index's bits in a map cache key (a disk of 4 KiB chunks up to 2**60 bytes).
_IDX_BITS = 48
#: A map cache value: the chunk's location packed in one int (`_pack_loc`), or `_ZEROS`.
_ZEROS = -1
_OFFSET_MASK = (1 << 40) - 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_CONTAINER_RE = re.compile(r"(\d{8})\.dat\Z")

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE containers(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    size INTEGER NOT NULL,
    dead INTEGER NOT NULL
);
CREATE TABLE chunks(
    id INTEGER PRIMARY KEY,
    fp BLOB NOT NULL UNIQUE,
    container INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    refcount INTEGER NOT NULL,
    compression INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX chunks_by_container ON chunks(container);
CREATE TABLE disks(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL);
CREATE TABLE map(
    disk INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    PRIMARY KEY(disk, idx)
) WITHOUT ROWID;
"""


def fingerprint(data: bytes | memoryview) -> bytes:
    """SHA-256: the identity of a chunk of a "sha256" pool, and of a chunk of an "xxh3-128"
    pool whose XXH3 collides with a different stored chunk (32 bytes)."""
    return hashlib.sha256(data).digest()


def fast_fingerprint(data: bytes | memoryview) -> bytes:
    """XXH3-128: the fingerprint of an "xxh3-128" pool's chunks, confirmed by comparing bytes
    (16 bytes, so it is never taken for a SHA-256 one)."""
    return xxhash.xxh3_128_digest(data)


def is_zero_chunk(piece: bytes | memoryview, zero: bytes) -> bool:
    """Whether `piece` (of ``len(zero)`` bytes) is all zeros. A memoryview compares with
    ``==`` item by item (~55 us per 4 KiB when equal); bytes compare with memcmp, so a view is
    copied first, and only when its first byte is zero."""
    return not piece[0] and (piece if isinstance(piece, bytes) else bytes(piece)) == zero


def _encoded(items: Mapping[Any, bytes | memoryview], code: int
             ) -> list[tuple[Any, bytes | memoryview, int]]:
    """(key, bytes to store, compression used) for each of `items` under compression `code`
    (0: none, `_compress` otherwise)."""
    if code == 0:
        return [(key, data, 0) for key, data in items.items()]
    return [(key, *_compress(data, code)) for key, data in items.items()]


def _as_bytes(data: bytes | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def fingerprint_matches(data: bytes | memoryview, fp: bytes) -> bool:
    """Whether `fp`, a stored fingerprint of either kind (told by its length), is `data`'s."""
    return (fingerprint(data) if len(fp) == 32 else fast_fingerprint(data)) == fp


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid pool/disk name, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{kind} name {name!r}: expected 1..64 characters A-Z a-z 0-9 _ . - "
                          "starting with a letter or digit")
    return name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_chunk_size(value: object) -> bool:
    return (_is_int(value) and MIN_CHUNK <= value <= MAX_CHUNK  # type: ignore[operator]
            and not value & (value - 1))  # type: ignore[operator]


_CHUNK_EXPECTED = f"a power of two from {MIN_CHUNK} to {MAX_CHUNK}"


#: The write journal's size: 0 (none) or MIN_JOURNAL..MAX_JOURNAL bytes, a multiple of 1 MiB.
#: At most 256 MiB: what waits to be drained is what a command needing the index to itself
#: (UNMAP, a write of part of a chunk) may wait for (~2 s at the drainer's ~140 MB/s here, ~16 s
#: under the lab's emulation: inside the kernel's 30 s command timeout).
MIN_JOURNAL = 4 << 20
MAX_JOURNAL = 256 << 20
JOURNAL_EXPECTED = ("0 (no write journal) or a size from 4 MiB to 256 MiB, a multiple of "
                    "1 MiB")


def is_journal_size(value: object) -> bool:
    return _is_int(value) and (value == 0 or (  # type: ignore[operator]
        MIN_JOURNAL <= value <= MAX_JOURNAL and not value % (1 << 20)))  # type: ignore[operator]


def _check_pool_args(where: str, capacity: object, soft_threshold: object,
                     chunk_size: object) -> None:
    if not _is_int(capacity) or capacity <= 0:  # type: ignore[operator]
        raise ConfigError(f"{where}: capacity {capacity!r}: expected a positive number of bytes")
    if soft_threshold is not None and (not _is_int(soft_threshold)
                                       or not 1 <= soft_threshold <= 100):  # type: ignore[operator]
        raise ConfigError(f"{where}: soft_threshold {soft_threshold!r}: expected a percentage "
                          "1..100 or null")
    if not is_chunk_size(chunk_size):
        raise ConfigError(f"{where}: chunk_size {chunk_size!r}: expected {_CHUNK_EXPECTED}")


def _check_journal(where: str, journal: object) -> None:
    if not is_journal_size(journal):
        raise ConfigError(f"{where}: journal {journal!r}: expected {JOURNAL_EXPECTED}")


def _check_compression(where: str, compression: object) -> None:
    if compression not in COMPRESSION_CODES:
        raise ConfigError(f"{where}: compression {compression!r}: expected one of "
                          f"{', '.join(COMPRESSION_CODES)}")


_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "nothing"})()


@dataclass(frozen=True)
class DedupPoolConfig:
    """The persistent settings of a pool (``pool.json``)."""

    name: str
    capacity: int
    soft_threshold: int | None
    chunk_size: int
    compression: str = "none"  # how new chunks are stored; each chunk records its own
    fingerprint: str = "sha256"  # fixed when the pool is created (`FINGERPRINTS`)
    #: Bytes of the write journal (``journal.dat``, journal.py); 0: none, writes go straight
    #: to the index.
    journal: int = 0
    #: The version pool.json had when read: never written lower. Turning compression off
    #: leaves the chunks stored compressed as they are, which a reader of version 1 would
    #: return as data (its version must refuse the pool, not serve zstd frames).
    version: int = field(default=POOL_FORMAT_VERSION, compare=False)

    def to_doc(self) -> dict[str, Any]:
        doc = {"version": self.version, "kind": "dedup", "name": self.name,
               "capacity": self.capacity, "soft_threshold": self.soft_threshold,
               "chunk_size": self.chunk_size}
        if self.compression != "none":
            doc |= {"version": max(self.version, POOL_FORMAT_COMPRESSED),
                    "compression": self.compression}
        if self.fingerprint != "sha256":
            doc |= {"version": POOL_FORMAT_FINGERPRINT, "fingerprint": self.fingerprint}
        if self.journal or self.version >= POOL_FORMAT_JOURNAL:
            doc |= {"version": POOL_FORMAT_JOURNAL, "journal": self.journal}
        return doc

    @classmethod
    def from_doc(cls, doc: object, where: str) -> DedupPoolConfig:
        """Validate a parsed pool.json; StateFileError names `where`, the key, the value and
        what was expected."""
        if not isinstance(doc, dict):
            raise invalid(where, "(top level)", doc, "a JSON object (a dedup pool file)")
        if doc.get("version", _MISSING) not in (POOL_FORMAT_VERSION, POOL_FORMAT_COMPRESSED,
                                                POOL_FORMAT_FINGERPRINT, POOL_FORMAT_JOURNAL):
            raise invalid(where, "version", doc.get("version", _MISSING),
                          f"{POOL_FORMAT_VERSION}, {POOL_FORMAT_COMPRESSED}, "
                          f"{POOL_FORMAT_FINGERPRINT} or {POOL_FORMAT_JOURNAL} (the pool "
                          "formats this version reads)")
        if doc.get("kind", _MISSING) != "dedup":
            raise invalid(where, "kind", doc.get("kind", _MISSING), "'dedup' (a dedup pool)")

        def get(key: str, ok: Callable[[Any], bool], expected: str,
                default: Any = _MISSING) -> Any:
            value = doc.get(key, default)
            if value is _MISSING or not ok(value):
                raise invalid(where, key, value, expected)
            return value

        return cls(
            get("name", lambda v: isinstance(v, str) and bool(_NAME_RE.match(v)),
                "a pool name: 1..64 characters A-Z a-z 0-9 _ . - starting with a letter or "
                "digit"),
            get("capacity", lambda v: _is_int(v) and v > 0, "a positive number of bytes"),
            get("soft_threshold", lambda v: v is None or (_is_int(v) and 1 <= v <= 100),
                "a percentage 1..100 or null", default=None),
            get("chunk_size", is_chunk_size, _CHUNK_EXPECTED),
            get("compression", lambda v: v in COMPRESSION_CODES,
                f"one of {', '.join(COMPRESSION_CODES)}", default="none"),
            get("fingerprint", lambda v: v in FINGERPRINTS,
                f"one of {', '.join(FINGERPRINTS)}", default="sha256"),
            get("journal", is_journal_size, JOURNAL_EXPECTED, default=0),
            version=doc["version"],
        )


def load_pool_config(path: str) -> DedupPoolConfig:
    """Read ``<path>/pool.json``; ConfigError naming the file if missing or invalid."""
    file = os.path.join(path, POOL_FILE)
    try:
        doc = read_json(file, "a dedup pool file (pool.json)")
    except FileNotFoundError:
        more = (f"; its {DB_FILE} is here: `tcmu-py dedup create-pool {path} --name NAME "
                "--capacity SIZE --chunk-size SIZE` (the index's chunk size) writes it again "
                "from the index, keeping the data"
                if _has_schema(os.path.join(path, DB_FILE)) else "")
        raise ConfigError(f"{file}: no dedup pool here (missing {POOL_FILE}); create it "
                          f"first{more}") from None
    return DedupPoolConfig.from_doc(doc, file)


@contextlib.contextmanager
def _config_lock(path: str) -> Iterator[None]:
    """Every writer of pool.json, in any process, holds this around its read-modify-write."""
    fd = os.open(os.path.join(path, CONFIG_LOCK_FILE),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(os.path.join(path, POOL_FILE))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def container_file(path: str, cid: int) -> str:
    return os.path.join(path, CONTAINER_DIR, f"{cid:08d}.dat")


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"container ends at {offset + len(data)}, short of the "
                          f"{n} bytes at {offset}")
        data += more
    return data


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


#: Buffers per ``pwritev`` (Linux's IOV_MAX is 1024).
_IOV_MAX = 1024


def _pwritev_all(fd: int, datas: Sequence[bytes | memoryview], offset: int) -> None:
    """Write `datas` back to back at `offset`, all of them (a short write is continued)."""
    for i in range(0, len(datas), _IOV_MAX):
        part = datas[i : i + _IOV_MAX]
        want = sum(len(d) for d in part)
        n = os.pwritev(fd, part, offset)
        if n < want:  # rare (a signal, a full file system): finish with plain writes
            _pwrite_all(fd, b"".join(part)[n:], offset + n)
        offset += want


def _compress(data: bytes | memoryview, code: int) -> tuple[bytes | memoryview, int]:
    """(bytes to store, their compression code): compressed with `code` when that saves at
    least one 512-byte sector's worth, else as is (code 0)."""
    if code == 0:
        return data, 0
    import zstandard

    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return (packed, code) if len(packed) + 512 <= len(data) else (data, 0)


def _decompress(raw: bytes, code: int, size: int) -> bytes:
    if code != COMPRESSION_CODES["zstd"]:
        raise OSError(errno.EIO, f"chunk compressed with unknown code {code}")
    import zstandard

    try:
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise OSError(errno.EIO, f"chunk does not decompress: {exc}") from None
    if len(data) != size:
        raise OSError(errno.EIO, f"chunk decompresses to {len(data)} bytes, expected {size}")
    return data


def _pack_loc(container: int, offset: int, length: int, compression: int) -> int:
    """A chunk's location as one int (a map cache value: a third of a tuple's memory)."""
    return ((container << 40 | offset) << 20 | length) << 4 | compression


def _unpack_loc(loc: int) -> tuple[int, int, int, int]:
    return loc >> 64, loc >> 24 & _OFFSET_MASK, loc >> 4 & (1 << 20) - 1, loc & 15


def _db_error(exc: sqlite3.Error) -> OSError:
    """sqlite3 errors as the backend contract wants them: ENOSPC when the file system is full
    (SPACE ALLOCATION FAILED), EIO otherwise (WRITE/MEDIUM ERROR)."""
    full = "full" in str(exc).lower()
    return OSError(errno.ENOSPC if full else errno.EIO, f"dedup index: {exc}")


@dataclass
class _Figures:
    """Counters kept exact under the pool lock (recomputed at open)."""

    used: int = 0  # bytes in containers, committed or appended in the open transaction
    live_bytes: int = 0  # bytes of chunks with refcount > 0
    live_chunks: int = 0
    mapped: int = 0  # map rows, all disks


@dataclass(frozen=True)
class CollectProgress:
    """What one `DedupPool.collect` call did and what is left."""

    containers: int  # containers compacted or deleted
    moved: int  # live bytes copied to the active container
    freed: int  # bytes of the containers deleted (gross: the live bytes moved out of them
    #            were appended elsewhere; what the file system got back is `moved` less)
    dead_left: int  # dead bytes still in containers (moved bytes count until their container
    #                 is deleted: this may grow while a container is compacted)
    done: bool  # no container is left that this call's threshold would compact


@dataclass(frozen=True)
class DiskStatus:
    name: str
    size: int
    mapped: int  # bytes of the disk's chunks that are not zeros (logical data)


@dataclass(frozen=True)
class DedupPoolStatus(ThresholdFigures):
    """Figures of one pool (bytes unless noted)."""

    path: str
    name: str
    capacity: int
    soft_threshold: int | None
    chunk_size: int
    used: int  # physical: container bytes, live and dead
    logical: int  # bytes the disks map to data (not zeros)
    unique: int  # bytes of distinct live chunks (as written: chunks x chunk size)
    chunks: int  # distinct live chunks
    dead: int  # bytes the collector may give back
    disks: tuple[DiskStatus, ...]
    collected: int = 0  # bytes the collector gave back since the pool opened
    live: bool = False  # figures of the pool open in this process
    collector: str = "off"  # "off" (no collector thread), "idle", "compacting"
    compacted: int = 0  # containers the collector compacted since the pool opened
    progress: float | None = None  # share of the container being compacted done, 0..1
    stored: int = -1  # bytes the distinct live chunks take in containers (compressed); -1: unique
    compression: str = "none"
    journal: int = 0  # bytes of the write journal (0: none)
    #: bytes of chunks in the journal not yet in the index (the figures above leave them out:
    #: they catch up as it drains); -1: unknown (the pool is not open in this process)
    journal_pending: int = 0
    #: Damage the open pool has met (the first `DAMAGE_SHOWN` messages) and how many in all:
    #: data some chunks held cannot be read until ``tcmu-py dedup check --repair`` (offline)
    damage: tuple[str, ...] = ()
    damage_count: int = 0

    @property
    def ratio(self) -> float:
        """Deduplication ratio: logical data / unique data (1.0 for an empty pool)."""
        return self.logical / self.unique if self.unique else 1.0

    @property
    def compression_ratio(self) -> float:
        """Unique data / the bytes it takes stored (1.0 without compression or data)."""
        stored = self.unique if self.stored < 0 else self.stored
        return self.unique / stored if stored else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "name": self.name, "capacity": self.capacity,
            "soft_threshold": self.soft_threshold, "chunk_size": self.chunk_size,
            "used": self.used, "logical": self.logical, "unique": self.unique,
            "chunks": self.chunks, "dead": self.dead, "ratio": round(self.ratio, 3),
            "collected": self.collected, "above_threshold": self.above_threshold,
            "live": self.live, "collector": self.collector, "compacted": self.compacted,
            "progress": None if self.progress is None else round(self.progress, 3),
            "compression": self.compression,
            "stored": self.unique if self.stored < 0 else self.stored,
            "compression_ratio": round(self.compression_ratio, 3),
            "journal": self.journal, "journal_pending": self.journal_pending,
            "damage": list(self.damage), "damage_count": self.damage_count,
            "disks": [{"name": d.name, "size": d.size, "mapped": d.mapped} for d in self.disks],
        }


@dataclass
class CheckReport:
    """`check_pool`'s findings. `problems`: the pool is damaged (a map row naming no chunk, a
    chunk whose bytes do not match its fingerprint, wrong counts); `leaks`: space no committed
    state refers to (left by a crash, reclaimed at open); `repaired`: what ``repair`` did."""

    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    #: What is worth knowing and is not wrong (writes in the write journal, not yet in the
    #: index the check looked at).
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems and not self.leaks


_open_pools: dict[str, DedupPool] = {}
_open_pools_lock = threading.Lock()


class DedupPool(PhysicalPool):
    """An open pool: one SQLite connection and the container files, shared by its disks.
    Thread-safe (one lock per pool, see the module doc)."""

    def __init__(self, path: str, config: DedupPoolConfig, lock_fd: int,
                 db: sqlite3.Connection, container_bytes: int) -> None:
        self.path = path
        self._config = config
        self._lock_fd = lock_fd
        self._db = db
        self.container_bytes = container_bytes
        self.lock = threading.RLock()
        self._fds: dict[int, int] = {}
        self._ends: dict[int, int] = {}  # container -> end of its bytes (appended included)
        self._active: int | None = None  # the container new chunks go to
        self._dirty: set[int] = set()  # appended since the last commit
        self._new_files = False  # a container file was created since the last commit
        self._in_txn = False
        self._changes = 0  # map changes in the open transaction
        #: Disks with acknowledged changes in the open transaction (a write-cached disk's
        #: WRITEs and UNMAPs, not yet committed); a commit that fails loses them, and then
        #: `_lost` says so to each such disk's next SYNCHRONIZE CACHE (`take_loss`).
        self._pending: set[int] = set()
        self._lost: dict[int, str] = {}
        #: Damage found since the open (a container missing or short at the open, a chunk that
        #: could not be read), for `status`: the first `DAMAGE_SHOWN` messages and how many.
        self._damage: list[str] = []
        self._damage_mu = threading.Lock()  # not the pool's lock: readers note damage too
        self._damage_count = 0
        self._figures = _Figures()
        self._collected = 0
        self._closed = False
        self._config_seen = _signature(path)
        self._next_reload = time.monotonic() + RELOAD_SECONDS
        self._disk_ids: dict[str, int] = {}
        self._open_disks: set[str] = set()
        self._marks_clean = False
        self._collector: _Collector | None = None
        self._compacting: int | None = None  # the container being compacted, between steps
        self._compact_live = 0  # its live bytes when compaction began
        self._compact_moved = 0  # of which moved so far
        self._compacted = 0  # containers compacted since the pool opened
        self._next_chunk = 1  # the id the next new chunk row gets (`_load`)
        #: The map cache: (disk << _IDX_BITS | index) -> packed location (`_pack_loc`) or
        #: `_ZEROS`, in two generations: entries go to the young one; when it holds half of
        #: `MAP_CACHE_ENTRIES` it becomes the old one (the previous old one is dropped); a hit
        #: in the old one is copied to the young one (least recently used out, approximately,
        #: in O(1)). Young is looked up first, so a stale old entry is never used. Both are
        #: dropped whenever rows may have changed behind them (`_forget`: a rollback, a disk's
        #: removal). A chunk the collector moves keeps its cached old location, which stays
        #: right (its bytes are not touched) until the collector deletes that container and
        #: drops the entries naming it (`_forget_container`).
        self._locs: dict[int, int] = {}
        self._old_locs: dict[int, int] = {}
        #: The chunk tables of disks a native loop serves (`attach_table`), by disk id: every
        #: location a write gives or a read finds is told there too, and they are dropped
        #: with the map cache (`tcmu_py.backend.ChunkExtent`'s contract).
        self._tables: dict[int, ChunkTable] = {}
        self._zero_chunk = bytes(config.chunk_size)
        #: The fingerprint function of the pool's chunks. A match is taken only once the
        #: stored bytes compare equal (`_confirmed`): with the fast, non-cryptographic one
        #: against a collision; with SHA-256 against a stored copy damaged on disk, which the
        #: write's bytes then replace (they have the chunk's SHA-256: they are its content).
        self.fingerprint: Callable[[bytes | memoryview], bytes] = (
            fingerprint if config.fingerprint == "sha256" else fast_fingerprint)
        self._strong_fp = config.fingerprint == "sha256"
        #: The write journal (journal.py) when the pool has one and was opened to write.
        self.journal: Journal | None = None

    # ------------------------------------------------------------------------------------------
    # Opening and closing

    @classmethod
    def open(cls, path: str, expected_name: str | None = None, *,
             container_bytes: int | None = None, repair: bool = True) -> DedupPool:
        """Open the pool in directory `path`; with `repair` (always, except for `check_pool`)
        reclaim leaked container bytes and, after an unclean shutdown, recount the references.

        Raises ConfigError (no valid pool.json, another name than `expected_name`, already
        open in another process) or OSError.
        """
        path = os.path.realpath(path)
        config = load_pool_config(path)
        if expected_name is not None and config.name != expected_name:
            raise ConfigError(f"{os.path.join(path, POOL_FILE)}: pool is named "
                              f"{config.name!r}, expected {expected_name!r}")
        lock_fd = os.open(os.path.join(path, LOCK_FILE),
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        db: sqlite3.Connection | None = None
        pool: DedupPool | None = None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{path}: dedup pool is already open (another daemon or "
                                  "tool holds its lock)") from None
            with _config_lock(path):
                stale = remove_stale_temporaries(os.path.join(path, POOL_FILE))
            if stale:
                log.warning("pool %s: removed %s left by an interrupted write", path, stale)
            containers = os.path.join(path, CONTAINER_DIR)
            if os.path.lexists(containers) and not os.path.isdir(containers):
                raise ConfigError(f"{containers}: not a directory, expected the pool's "
                                  "directory of container files")
            make_private_dirs(containers)
            index = os.path.join(path, DB_FILE)
            db = _connect(index)
            pool = cls(path, config, lock_fd, db, DEFAULT_CONTAINER_BYTES
                       if container_bytes is None else container_bytes)
            try:
                pool._check_chunk_size(record=repair)
                if repair:
                    pool._reclaim_leaks()
                    if not pool._meta("clean", 1):
                        log.warning("pool %s: not closed cleanly; recounting references", path)
                        pool._recount()
                pool._load()
                pool._marks_clean = repair  # `check_pool` leaves the flag as it found it
                if repair:
                    pool._set_meta("clean", 0)
                    pool.journal = open_journal(pool)
            except sqlite3.Error as exc:  # a damaged page met past the header, read-only
                raise _unreadable_index(index, exc) from None
            pool._opened()
            if pool.journal is not None:
                pool.journal.start()
        except BaseException:
            if pool is not None and pool.journal is not None:
                with contextlib.suppress(OSError):
                    os.close(pool.journal.fd)
            if db is not None:
                db.close()
            os.close(lock_fd)
            raise
        with _open_pools_lock:
            _open_pools[path] = pool
        return pool

    def close(self) -> None:
        """Stop the collector, commit what is pending, mark the pool closed cleanly, release
        everything."""
        with _open_pools_lock:
            if _open_pools.get(self.path) is self:
                del _open_pools[self.path]
        self.stop_collector()
        journal, self.journal = self.journal, None
        if journal is not None:
            journal.close()  # drains it into the index
        with self.lock:
            if self._closed:
                return
            try:
                self.commit()
                if self._marks_clean:
                    self._set_meta("clean", 1)
            finally:
                self._closed = True
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
                self._db.close()
                os.close(self._lock_fd)

    def __enter__(self) -> DedupPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        with self.lock:
            self._begin()
            self._db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))
            self.commit()

    def _check_chunk_size(self, *, record: bool) -> None:
        """ConfigError if pool.json's chunk size is not the one the index records (meta
        ``chunk_size``, written by `create_pool`): the maps' chunk numbers and the chunks'
        lengths are in units of it, so another would read every disk wrong. An index of a pool
        made before it was recorded takes pool.json's (when `record`: not by `check_pool`)."""
        if not _check_recorded_chunk_size(self.path, self._db, self.chunk_size) and record:
            self._set_meta("chunk_size", self.chunk_size)

    def _load(self) -> None:
        """Counters, container ends and disk ids from the database."""
        db = self._db
        f = _Figures()
        f.used = db.execute("SELECT COALESCE(SUM(size), 0) FROM containers").fetchone()[0]
        f.live_chunks, f.live_bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM chunks WHERE refcount > 0"
        ).fetchone()
        f.mapped = db.execute("SELECT COUNT(*) FROM map").fetchone()[0]
        self._figures = f
        self._ends = dict(db.execute("SELECT id, size FROM containers"))
        self._disk_ids = {n: i for i, n in db.execute("SELECT id, name FROM disks")}
        self._next_chunk = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM chunks").fetchone()[0]
        self._forget()
        self._active = None
        if self._ends:
            last = max(self._ends)
            if self._ends[last] < self.container_bytes:
                self._active = last

    # ------------------------------------------------------------------------------------------
    # Repair (see "Crash ordering" in the module doc)

    def _container_files(self) -> dict[int, str]:
        out = {}
        for entry in os.listdir(os.path.join(self.path, CONTAINER_DIR)):
            m = _CONTAINER_RE.match(entry)
            if m:
                out[int(m[1])] = os.path.join(self.path, CONTAINER_DIR, entry)
        return out

    def _reclaim_leaks(self, report: CheckReport | None = None, fix: bool = True) -> None:
        """Container files no row names are deleted; bytes past a container's committed size
        are cut off. A container shorter than its committed size, or missing, is damage:
        reported (to `report`, else logged as an ERROR naming the file).

        Only an index `create_pool` made for this directory gets here (`_connect` refuses a
        missing, empty or schema-less one, `create_pool` a directory holding containers), so a
        file no row names was created by this index's uncommitted transaction, or deleted by
        the collector after its commit (rule 5): never the containers of a lost index.

        Bytes committed chunk rows name are never reclaimed (rule 6 says none are past a
        committed size; an index damaged, edited or restored from a backup may say otherwise):
        a container row missing or shorter than the chunks it holds is a problem, and with
        `fix` the row is restored to the end of those chunks (the counts recomputed), its
        bytes kept, the rest past it reclaimed as above."""
        db = self._db
        rows = dict(db.execute("SELECT id, size FROM containers"))
        named = dict(db.execute("SELECT container, MAX(offset + length) FROM chunks "
                                "GROUP BY container"))
        restored = False
        changed = False
        for cid, file in sorted(self._container_files().items()):
            size = os.stat(file).st_size
            end = named.get(cid, 0)
            if end > rows.get(cid, 0):
                had = "no row" if cid not in rows else f"a row of {rows[cid]} bytes"
                msg = (f"container {cid}: {had}, though chunk rows name its bytes up to {end}"
                       " (a damaged, edited or restored index)")
                if report is not None:
                    report.problems.append(msg)
                else:
                    self._note_damage(msg)
                if not fix:
                    continue
                keep = min(end, size)  # a file shorter still: verify reports its chunks
                db.execute("INSERT INTO containers (id, size, dead) VALUES (?, ?, 0) "
                           "ON CONFLICT (id) DO UPDATE SET size = excluded.size", (cid, keep))
                rows[cid] = keep
                restored = True
                if report is not None:
                    report.repaired.append(f"container {cid}: row restored to {keep} bytes")
            if cid not in rows:
                msg = f"container {cid}: {size} bytes no committed state refers to"
                if fix:
                    os.unlink(file)
                    changed = True
                    log.warning("pool %s: removed %s", self.path, msg)
            elif size > rows[cid]:
                msg = f"container {cid}: {size - rows[cid]} bytes past its committed end"
                if fix:
                    fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
                    try:
                        os.ftruncate(fd, rows[cid])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    log.warning("pool %s: cut %s", self.path, msg)
            elif size < rows[cid]:
                if report is not None:
                    report.problems.append(f"container {cid}: file holds {size} bytes, "
                                           f"{rows[cid]} committed")
                else:
                    self._note_damage(f"container {cid}: {file} holds {size} bytes, "
                                      f"{rows[cid]} committed (chunks past its end cannot be "
                                      "read; `tcmu-py dedup check --repair` drops them)")
                continue
            else:
                continue
            if report is not None:
                report.leaks.append(msg)
                if fix:
                    report.repaired.append("reclaimed " + msg)
        for cid in sorted(set(rows) - set(self._container_files())):
            if not rows[cid]:
                continue
            if report is not None:
                report.problems.append(f"container {cid}: file missing ({rows[cid]} bytes "
                                       "committed)")
            else:
                self._note_damage(f"container {cid}: {container_file(self.path, cid)} missing, "
                                  f"{rows[cid]} bytes committed (its chunks cannot be read; "
                                  "`tcmu-py dedup check --repair` drops them)")
        if changed:
            fsync_dir(os.path.join(self.path, CONTAINER_DIR))
        if restored:
            self._recount()

    def _repair_short_containers(self, report: CheckReport, sizes: Mapping[int, int]) -> None:
        """After `verify` dropped the chunks they could not hold: forget the rows of missing
        container files and cut the committed size of short ones to the file's (`sizes`: the
        files' sizes by container id), so the damage reported once is repaired, not reported
        again at every check. Inside the open transaction."""
        db = self._db
        for cid, size in db.execute("SELECT id, size FROM containers").fetchall():
            have = sizes.get(cid)
            if have is not None and have >= size or not size:
                continue
            self._begin()
            if have is None:
                db.execute("DELETE FROM containers WHERE id=?", (cid,))
                self._dirty.discard(cid)
                report.repaired.append(f"container {cid}: forgot it, its file "
                                       f"{container_file(self.path, cid)} was missing")
            else:
                db.execute("UPDATE containers SET size=? WHERE id=?", (have, cid))
                report.repaired.append(f"container {cid}: committed size cut to its file's "
                                       f"{have} bytes (was {size})")

    def _count_problems(self) -> list[str]:
        """Refcounts and dead bytes that disagree with a recount from the maps."""
        db = self._db
        out = [f"chunk {cid}: refcount {rc}, {n} map entries refer to it"
               for cid, rc, n in db.execute(
                   "SELECT c.id, c.refcount, COALESCE(m.n, 0) FROM chunks c LEFT JOIN "
                   "(SELECT chunk, COUNT(*) AS n FROM map GROUP BY chunk) m ON m.chunk = c.id "
                   "WHERE c.refcount != COALESCE(m.n, 0)")]
        out += [f"container {cid}: dead {dead}, recount {want}"
                for cid, dead, want in db.execute(
                    "SELECT k.id, k.dead, k.size - COALESCE(l.live, 0) FROM containers k LEFT "
                    "JOIN (SELECT container, SUM(length) AS live FROM chunks WHERE refcount > 0 "
                    "GROUP BY container) l ON l.container = k.id "
                    "WHERE k.dead != k.size - COALESCE(l.live, 0)")]
        return out

    def _recount(self) -> int:
        """Set every refcount and dead figure from the maps; returns how many were wrong."""
        with self.lock:
            wrong = len(self._count_problems())
            if not wrong:
                return 0
            self._begin()
            db = self._db
            db.execute("UPDATE chunks SET refcount = 0")
            db.execute("UPDATE chunks SET refcount = m.n FROM (SELECT chunk, COUNT(*) AS n "
                       "FROM map GROUP BY chunk) AS m WHERE m.chunk = chunks.id")
            db.execute("UPDATE containers SET dead = size - COALESCE((SELECT SUM(length) FROM "
                       "chunks WHERE container = containers.id AND refcount > 0), 0)")
            self.commit()
            log.warning("pool %s: %d reference or dead-byte counts repaired", self.path, wrong)
            return wrong

    # ------------------------------------------------------------------------------------------
    # Figures

    @property
    def config(self) -> DedupPoolConfig:
        return self._config

    @property
    def chunk_size(self) -> int:
        return self._config.chunk_size

    @property
    def used(self) -> int:
        """Physical use: bytes in container files (live and dead)."""
        return self._figures.used

    def savings(self) -> tuple[int, int]:
        """Bytes deduplication saves (data the disks map, less the distinct chunks) and bytes
        compression saves (the distinct chunks, less what they take in containers), from the
        pool's counters (no query: LOG SENSE asks on the loop thread)."""
        f, chunk = self._figures, self.chunk_size
        unique = f.live_chunks * chunk
        return max(f.mapped * chunk - unique, 0), max(unique - f.live_bytes, 0)

    def disk_mapped(self, disk: str) -> int:
        with self.lock:
            did = self._disk_ids.get(disk)
            if did is None:
                return 0
            n = self._db.execute("SELECT COUNT(*) FROM map WHERE disk=?", (did,)).fetchone()[0]
            return int(n) * self.chunk_size

    def status(self) -> DedupPoolStatus:
        with self.lock:
            self._reload()
            f = self._figures
            dead = self._db.execute("SELECT COALESCE(SUM(dead), 0) FROM containers").fetchone()[0]
            c = self._config
            return DedupPoolStatus(
                self.path, c.name, c.capacity, c.soft_threshold, c.chunk_size, f.used,
                f.mapped * c.chunk_size, f.live_chunks * c.chunk_size, f.live_chunks, dead,
                _disk_rows(self._db, c.chunk_size), self._collected, live=True,
                collector=("off" if self._collector is None else
                           "idle" if self._compacting is None else "compacting"),
                compacted=self._compacted,
                progress=(None if self._compacting is None else
                          min(1.0, self._compact_moved / self._compact_live)
                          if self._compact_live else 1.0),
                stored=f.live_bytes, compression=c.compression,
                journal=0 if self.journal is None else self.journal.size,
                journal_pending=0 if self.journal is None else self.journal.pending,
                damage=tuple(self._damage), damage_count=self._damage_count)

    def _note_damage(self, msg: str) -> None:
        """Log `msg` (damage: data cannot be read) as an ERROR and keep it for `status`, each
        message once."""
        with self._damage_mu:
            if msg in self._damage:
                return
            self._damage_count += 1
            if len(self._damage) < DAMAGE_SHOWN:
                self._damage.append(msg)
        log.error("pool %s: %s", self.path, msg)

    # ------------------------------------------------------------------------------------------
    # pool.json (shared with `tcmu-py apply` in another process, as thin's)

    def _reload(self) -> None:
        """Adopt capacity, threshold and compression another process wrote to pool.json (lock
        held)."""
        self._next_reload = time.monotonic() + RELOAD_SECONDS
        seen = _signature(self.path)
        if seen == self._config_seen:
            return
        self._config_seen = seen
        try:
            config = load_pool_config(self.path)
        except ConfigError as exc:
            log.error("pool %s: keeping capacity %d: %s", self.name, self.capacity, exc)
            return
        self._adopt(replace(self._config, capacity=config.capacity,
                            soft_threshold=config.soft_threshold,
                            compression=config.compression))

    def _adopt(self, config: Any) -> None:
        """`PhysicalPool._adopt`, and the write journal's lease taken back: its budget was
        counted against the old capacity and threshold."""
        super()._adopt(config)
        journal = getattr(self, "journal", None)  # (none yet at the pool's first config)
        if journal is not None:
            journal.take_back()

    def _update(self, change: Callable[[DedupPoolConfig], DedupPoolConfig]) -> None:
        with _config_lock(self.path):
            current = load_pool_config(self.path)
            new = change(current)
            if new != current:
                write_json(os.path.join(self.path, POOL_FILE), new.to_doc(), indent=2)
            self._config_seen = _signature(self.path)
        self._adopt(new)

    def set_soft_threshold(self, percent: int | None) -> None:
        _check_pool_args(self.path, self.capacity, percent, self.chunk_size)
        with self.lock:
            self._update(lambda c: replace(c, soft_threshold=percent))

    def set_capacity(self, capacity: int) -> None:
        _check_pool_args(self.path, capacity, self.soft_threshold, self.chunk_size)
        with self.lock:
            self._update(lambda c: replace(c, capacity=capacity))

    def set_compression(self, compression: str) -> None:
        """How new chunks are stored from now on; chunks stored already keep their own."""
        _check_compression(self.path, compression)
        with self.lock:
            self._update(lambda c: replace(c, compression=compression))

    def set_journal(self, journal: int) -> None:
        """The write journal's size from the pool's next open on (the journal open now keeps
        its size: its records lie where it put them)."""
        _check_journal(self.path, journal)
        with self.lock:
            self._update(lambda c: replace(c, journal=journal))

    # ------------------------------------------------------------------------------------------
    # Transactions

    def _begin(self) -> None:
        if not self._in_txn:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_txn = True

    def commit(self) -> None:
        """Make everything done so far durable: fdatasync the containers appended to (and the
        containers directory if a file was created), then COMMIT (synchronous=FULL). On failure
        the open transaction is rolled back and the figures reloaded: the writes since the last
        commit are lost (the caller reports WRITE ERROR)."""
        with self.lock:
            if not self._in_txn:
                return
            try:
                for cid in sorted(self._dirty):
                    os.fdatasync(self._fds[cid])  # rule 2: data before what refers to it
                if self._new_files:
                    fsync_dir(os.path.join(self.path, CONTAINER_DIR))
                self._db.executemany("UPDATE containers SET size=? WHERE id=?",
                                     [(self._ends[cid], cid) for cid in self._dirty])
                self._db.execute("COMMIT")  # rule 3
            except (OSError, sqlite3.Error) as exc:
                self._abort(f"a commit of the pool failed ({exc})")
                raise exc if isinstance(exc, OSError) else _db_error(exc) from exc
            self._in_txn = False
            self._dirty.clear()
            self._new_files = False
            self._changes = 0
            self._pending.clear()

    def _abort(self, why: str = "the pool's open transaction was rolled back") -> None:
        """Roll the open transaction back. The acknowledged changes in it (`_pending`) are
        lost: each disk that had some is told at its next SYNCHRONIZE CACHE (`take_loss`)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        if self._pending:
            names = sorted(n for n, d in self._disk_ids.items() if d in self._pending)
            log.error("pool %s: %s: writes acknowledged since the last commit are lost on "
                      "disk(s) %s; their next SYNCHRONIZE CACHE answers WRITE ERROR", self.name,
                      why, ", ".join(names))
            for did in self._pending:
                self._lost.setdefault(did, why)
            self._pending.clear()
        self._in_txn = False
        self._dirty.clear()
        self._new_files = False
        self._changes = 0
        self._load()

    def record_loss(self, did: int, why: str) -> None:
        """Writes disk `did` acknowledged are gone (`why`): its next SYNCHRONIZE CACHE answers
        WRITE ERROR (`take_loss`)."""
        with self.lock:
            log.error("pool %s: %s: writes acknowledged on disk %s are lost; its next "
                      "SYNCHRONIZE CACHE answers WRITE ERROR", self.name, why,
                      next((n for n, d in self._disk_ids.items() if d == did), did))
            self._lost.setdefault(did, why)

    def take_loss(self, did: int) -> str | None:
        """Why writes disk `did` acknowledged were lost (a commit failed and rolled them back)
        since this was last asked, once; None if none were. Like fsync(2) after a failed
        write-back: the SYNCHRONIZE CACHE that follows the loss fails, later ones need not
        (`DedupBackend.lost_writes`; a closed or dropped disk's report is discarded)."""
        with self.lock:
            return self._lost.pop(did, None)

    # ------------------------------------------------------------------------------------------
    # Containers

    def _fd(self, cid: int) -> int:
        fd = self._fds.get(cid)
        if fd is None:
            fd = os.open(container_file(self.path, cid), os.O_RDWR | os.O_CLOEXEC)
            self._fds[cid] = fd
        return fd

    def _append(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the active container; (container, offset) (`_append_many`)."""
        return self._append_many([data])[0]

    def _append_many(self, datas: Sequence[bytes | memoryview]) -> list[tuple[int, int]]:
        """Append each of `datas` to the active container (a new one when it is full), one
        ``pwritev`` per container (the pieces are not joined first); their (container,
        offset). Inside the open transaction; durable at `commit`."""
        out: list[tuple[int, int]] = []
        ends = self._ends
        i = 0
        while i < len(datas):
            cid = self._active
            if cid is None or ends[cid] + len(datas[i]) > self.container_bytes and ends[cid]:
                cid = self._new_container()
            start = pos = ends[cid]
            j = i
            while j < len(datas) and (pos + len(datas[j]) <= self.container_bytes
                                      or pos == start):
                out.append((cid, pos))
                pos += len(datas[j])
                j += 1
            _pwritev_all(self._fd(cid), datas[i:j], start)
            ends[cid] = pos
            self._dirty.add(cid)
            self._figures.used += pos - start
            i = j
        return out

    def _new_container(self) -> int:
        """Create the next container file and make it the active one (inside the
        transaction)."""
        # AUTOINCREMENT: a container id is never reused, so a deleted container's file that
        # a crash brings back can never be taken for a newer one.
        cid = self._db.execute("INSERT INTO containers(size, dead) VALUES(0, 0)").lastrowid
        assert cid is not None
        # O_TRUNC: a file of that id can only be one no committed state names (a put
        # rolled back after creating it).
        fd = os.open(container_file(self.path, cid),
                     os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._fds[cid] = fd
        self._ends[cid] = 0
        self._new_files = True
        self._active = cid
        return cid

    def _read_chunk(self, cid: int, offset: int, length: int) -> bytes:
        """The chunk's bytes as stored (compressed if it was)."""
        try:
            return _pread_exact(self._fd(cid), length, offset)
        except OSError as exc:
            if exc.filename is not None:
                raise
            # The operator is told which file (`_pread_exact` knows only the fd).
            raise OSError(exc.errno, exc.strerror, container_file(self.path, cid)) from None

    def _chunk_data(self, cid: int, offset: int, length: int, compression: int) -> bytes:
        """The chunk's data (decompressed); OSError EIO if it does not decompress to a chunk."""
        raw = self._read_chunk(cid, offset, length)
        return raw if compression == 0 else _decompress(raw, compression, self.chunk_size)

    # ------------------------------------------------------------------------------------------
    # Disks and their maps (called by DedupBackend with `lock` held where it says so)

    def disk_id(self, disk: str, size: int) -> int:
        """The id of `disk`, registering it (committed) if new or larger than recorded."""
        check_name("disk", disk)
        with self.lock:
            row = self._db.execute("SELECT size FROM disks WHERE name=?", (disk,)).fetchone()
            if row is not None and row[0] > size:
                raise ConfigError(f"{self.path}: disk {disk}: {row[0]} bytes recorded, larger "
                                  f"than the device size {size}; expected size >= {row[0]} "
                                  "(data is never cut off on open)")
            if row is None or row[0] < size:
                self._begin()
                self._db.execute("INSERT INTO disks(name, size) VALUES(?, ?) ON CONFLICT(name) "
                                 "DO UPDATE SET size=excluded.size", (disk, size))
                self.commit()
            did = self._db.execute("SELECT id FROM disks WHERE name=?", (disk,)).fetchone()[0]
            self._disk_ids[disk] = did
            return int(did)

    def _locations(self, did: int, first: int, last: int) -> list[tuple[int, int]]:
        """(index, packed location or `_ZEROS`) of chunks [first, last) of disk `did` (lock
        held): from the pool's bounded map cache (`MAP_CACHE_ENTRIES`) when it has every index
        of the range, else from one range query that refills it."""
        base = did << _IDX_BITS
        locs, old_locs = self._locs, self._old_locs
        found: list[tuple[int, int]] = []
        for idx in range(first, last):
            key = base | idx
            loc = locs.get(key)
            if loc is None:
                loc = old_locs.get(key)
                if loc is None:
                    return self._lookup(did, first, last)
                self._remember(((key, loc),))
            found.append((idx, loc))
        return found

    def read_chunks(self, did: int, first: int, last: int) -> dict[int, bytes]:
        """Chunks [first, last) of disk `did` that hold data, by index (absent: zeros)."""
        with self.lock, self._damage_noted():
            return {idx: self._chunk_data(*_unpack_loc(loc))
                    for idx, loc in self._locations(did, first, last) if loc != _ZEROS}

    @contextlib.contextmanager
    def _damage_noted(self) -> Iterator[None]:
        """An OSError of the block (a chunk that cannot be read) or an error of the index (a
        damaged page) noted for `status`, then raised on as an OSError (`_db_error`)."""
        try:
            yield
        except OSError as exc:
            self._note_damage(f"a read failed: {exc}")
            raise
        except sqlite3.Error as exc:
            self._note_damage(f"a read of the index failed: {exc} (`tcmu-py dedup check`)")
            raise _db_error(exc) from exc

    def read_into(self, did: int, offset: int, view: memoryview) -> None:
        """Fill `view` (a contiguous byte buffer) with disk `did`'s bytes from `offset` (absent
        chunks: zeros). Stored uncompressed chunks are read straight into `view`, one
        ``preadv`` per run of chunks that lie back to back in one container (a sequential
        write's chunks do), so a read costs no copy and no intermediate bytes. Under the pool
        lock, as every container read (the collector deletes containers)."""
        cs = self._config.chunk_size
        end = offset + view.nbytes
        first, last = offset // cs, -(-end // cs)
        with self.lock, self._damage_noted():
            tabled = did in self._tables
            if last - first == 1 and not tabled:  # the usual small read: one cached chunk
                loc = self._locs.get(did << _IDX_BITS | first)
                if loc is not None and loc != _ZEROS and not loc & 15:
                    cid, off = loc >> 64, (loc >> 24 & _OFFSET_MASK) + offset - first * cs
                    fd = self._fds.get(cid)
                    if fd is None or os.preadv(fd, [view], off) != view.nbytes:
                        self._read_run(cid, off, view)
                    return
            found = self._locations(did, first, last)
            if tabled:  # the native loop missed some of them: it finds them next time
                self._tell_table(did, self._tables[did], found)
            run_cid = run_off = run_at = run_n = 0  # pending preadv: container, offset, view
            for idx, loc in found:
                a, b = max(idx * cs, offset), min((idx + 1) * cs, end)
                at, n, inner = a - offset, b - a, a - idx * cs
                if loc != _ZEROS and loc & 15 == 0:
                    cid, off = loc >> 64, (loc >> 24 & _OFFSET_MASK) + inner
                    if run_n and cid == run_cid and off == run_off + run_n:
                        run_n += n
                        continue
                    if run_n:
                        self._read_run(run_cid, run_off, view[run_at : run_at + run_n])
                    run_cid, run_off, run_at, run_n = cid, off, at, n
                    continue
                if run_n:
                    self._read_run(run_cid, run_off, view[run_at : run_at + run_n])
                    run_n = 0
                if loc == _ZEROS:
                    view[at : at + n] = self._zero_chunk[:n]
                else:
                    view[at : at + n] = self._chunk_data(*_unpack_loc(loc))[inner : inner + n]
            if run_n:
                self._read_run(run_cid, run_off, view[run_at : run_at + run_n])

    def _read_run(self, cid: int, offset: int, view: memoryview) -> None:
        """Read container `cid` from `offset` into all of `view` (lock held); OSError EIO if
        the container ends first."""
        fd = self._fd(cid)
        got = os.preadv(fd, [view], offset)
        while got < view.nbytes:
            more = os.preadv(fd, [view[got:]], offset + got)
            if not more:
                raise OSError(errno.EIO, f"container {cid} ends at {offset + got}, expected "
                              f"{view.nbytes} bytes at {offset}")
            got += more

    def _lookup(self, did: int, first: int, last: int) -> list[tuple[int, int]]:
        """Packed locations of chunks [first, last) of disk `did` from the index (`_ZEROS`:
        none), remembered in the map cache (lock held)."""
        rows = {idx: _pack_loc(cid, off, n, z) for idx, cid, off, n, z in self._db.execute(
            "SELECT m.idx, c.container, c.offset, c.length, c.compression FROM map m JOIN "
            "chunks c ON c.id = m.chunk WHERE m.disk=? AND m.idx>=? AND m.idx<?",
            (did, first, last))}
        out = [(idx, rows.get(idx, _ZEROS)) for idx in range(first, last)]
        base = did << _IDX_BITS
        self._remember([(base | idx, loc) for idx, loc in out])
        return out

    def attach_table(self, did: int, table: ChunkTable) -> None:
        """Keep `table` (a native loop's, `tcmu_py.backend.ChunkExtent`) up to date with disk
        `did`'s chunk locations from now on: the map cache's entries for it go there too."""
        with self.lock:
            self._tables[did] = table
            mask = (1 << _IDX_BITS) - 1
            for cache in (self._old_locs, self._locs):
                self._tell_table(did, table, [(k & mask, v) for k, v in cache.items()
                                              if k >> _IDX_BITS == did])

    def detach_table(self, did: int) -> None:
        with self.lock:
            table = self._tables.pop(did, None)
        if table is not None:
            table.clear()

    def _tell_table(self, did: int, table: ChunkTable, found: Sequence[tuple[int, int]]
                    ) -> None:
        """Make (index, packed location) entries of disk `did` known to its chunk table (lock
        held): a stored uncompressed chunk by its container's fd and offset, zeros as zeros, a
        compressed chunk forgotten (the loop reads stored bytes only); a chunk whose newest
        bytes are in the write journal keeps the journal's entry (`Journal.tell_table`)."""
        fd = self._fd
        idxs = [idx for idx, _ in found]
        fds = [-1 if loc == _ZEROS else -2 if loc & 15 else fd(loc >> 64) for _, loc in found]
        offs = [loc >> 24 & _OFFSET_MASK if loc > 0 else 0 for _, loc in found]
        if self.journal is not None:
            self.journal.tell_table(did, table, idxs, fds, offs)
        else:
            table.set(idxs, fds, offs)

    def table_of(self, did: int) -> ChunkTable | None:
        """Disk `did`'s chunk table if a native loop serves it."""
        return self._tables.get(did)

    def _remember(self, entries: Sequence[tuple[int, int]]) -> None:
        """Put (key, packed location) entries in the map cache (lock held)."""
        half = max(1, MAP_CACHE_ENTRIES // 2)
        i = max(0, len(entries) - MAP_CACHE_ENTRIES)
        while i < len(entries):
            locs = self._locs  # holds fewer than `half` entries
            n = half - len(locs)
            locs.update(entries[i : i + n])
            i += n
            if len(locs) >= half:
                self._old_locs, self._locs = locs, {}

    def _forget(self) -> None:
        """Drop the map cache and the chunk tables' entries (rows may have changed behind
        them)."""
        self._locs, self._old_locs = {}, {}
        for table in self._tables.values():
            table.clear()

    def _forget_container(self, cid: int) -> None:
        """Drop the map cache and chunk table entries naming container `cid` (about to be
        deleted: its fd closed)."""
        fd = self._fds.get(cid)
        if fd is not None:
            for table in self._tables.values():
                table.drop_fd(fd)
        # Drop such a key from both generations: an entry of the new one shadows an older
        # entry of the same key in the old one (a put or a lookup after the rotation), which
        # must not come back in its place (it may say "zeros" or name a place since reused).
        gone = {k for cache in (self._locs, self._old_locs) for k, v in cache.items()
                if v >> 64 == cid}
        if gone:
            self._locs = {k: v for k, v in self._locs.items() if k not in gone}
            self._old_locs = {k: v for k, v in self._old_locs.items() if k not in gone}

    def mapped_indexes(self, did: int, first: int, last: int) -> list[int]:
        with self.lock:
            return [r[0] for r in self._db.execute(
                "SELECT idx FROM map WHERE disk=? AND idx>=? AND idx<? ORDER BY idx",
                (did, first, last))]

    def put(self, did: int, chunks: Sequence[tuple[int, bytes | memoryview | None, bytes | None]],
            *, durable: bool, deallocating: bool = False, journaled: bool = False) -> None:
        """Map chunk index -> content for disk `did`: each item is (index, data, fingerprint),
        data and fingerprint None for zeros; an index appears at most once. All or nothing:
        SpaceAllocationFailed (the new unique bytes do not fit under the capacity) or OSError
        leave the maps as they were. `durable`: commit before returning (a disk without write
        cache, an UNMAP of one). `deallocating`: the change is a deallocation (UNMAP, WRITE
        SAME with UNMAP), whose new chunks are the partly deallocated chunks at its ends, zeros
        patched in: they are stored even past the capacity (at most two per range, and each
        replaces a reference to an older chunk), so a deallocation never fails for want of the
        space it is meant to give back (SBC-4 4.7.3.8 applies to writes). `journaled`: the
        change of a record of the write journal, acknowledged already (and still in the
        journal until committed): stored even past the capacity (its space was reserved when
        the journal took it) and not a loss if rolled back (drained again).

        Cost: a fixed number of statements per command whatever its number of chunks (the
        fingerprints and old map rows looked up with ``IN``/range queries, the new chunks'
        bytes appended with one ``pwrite`` per container, the chunk rows, map rows,
        reference counts and dead bytes written with one ``executemany`` each).
        An error of the index (a damaged page met by a lookup) is such an OSError too
        (`_db_error`)."""
        try:
            self._put(did, chunks, durable=durable, deallocating=deallocating,
                      journaled=journaled)
        except sqlite3.Error as exc:
            raise _db_error(exc) from exc

    def _put(self, did: int, chunks: Sequence[tuple[int, bytes | memoryview | None, bytes | None]],
             *, durable: bool, deallocating: bool = False, journaled: bool = False) -> None:
        """The body of `put`."""
        with self.lock:
            if self._closed:
                raise OSError(errno.EIO, f"pool {self.name} is closed")
            if time.monotonic() >= self._next_reload:
                self._reload()
            if not chunks:
                return
            db = self._db
            given, reclaimed = chunks, False
            while True:
                # chunk id -> [refcount, container, offset, length, compression]
                info: dict[int, list[int]] = {}
                found: dict[bytes, int] = {}  # fp -> chunk id
                heal: dict[int, bytes | memoryview] = {}  # damaged chunk id -> its content
                self._find({fp for _, _, fp in given if fp is not None}, found, info)
                chunks = self._confirmed(given, found, info, heal)
                new: dict[bytes, bytes | memoryview] = {}
                for _, data, fp in chunks:
                    if fp is not None and fp not in found and fp not in new:
                        assert data is not None
                        new[fp] = data
                code = COMPRESSION_CODES[self._config.compression]
                stored = _encoded(new, code)
                healed = _encoded(heal, code)
                need = sum(len(d) for _, d, _ in stored) + sum(len(d) for _, d, _ in healed)
                if deallocating:  # admitted past the capacity, still a crossing
                    self._count_crossing(self._figures.used, need)
                    break
                if journaled:  # admitted past the capacity: the journal counted the crossing
                    break  # (of used + reserved, which a drain never raises: `crossing_hint`)
                # A reclaim deletes dead chunks `found` may name: look them up again after it.
                if reclaimed or not self._reclaim(need):
                    self._reserve(need)
                    break
                reclaimed = True
            f = self._figures
            saved = (_Figures(f.used, f.live_bytes, f.live_chunks, f.mapped), dict(self._ends),
                     self._active, set(self._dirty), self._new_files, self._changes,
                     self._next_chunk)
            self._begin()
            db.execute("SAVEPOINT put")
            try:
                new_ids = range(self._next_chunk, self._next_chunk + len(stored))
                dead: dict[int, int] = {}  # container -> dead bytes this change adds
                damaged: list[tuple[int, int]] = []
                if stored or healed:
                    places = self._append_many([d for _, d, _ in stored] +
                                               [d for _, d, _ in healed])
                    for new_id, (fp, data, used_code), (cid, off) in zip(
                            new_ids, stored, places[: len(stored)], strict=True):
                        found[fp] = new_id
                        info[new_id] = [0, cid, off, len(data), used_code]
                    self._next_chunk += len(stored)
                    damaged = self._relocate(healed, places[len(stored):], info, dead)
                idxs = [idx for idx, _, _ in chunks]
                old: dict[int, int] = dict(db.execute(
                    "SELECT idx, chunk FROM map WHERE disk=? AND idx>=? AND idx<=?",
                    (did, min(idxs), max(idxs))))
                deltas: dict[int, int] = {}
                upserts: list[tuple[int, int, int]] = []
                deletes: list[tuple[int, int]] = []
                mapped = 0
                for idx, _, fp in chunks:
                    chunk = None if fp is None else found[fp]
                    prev = old.get(idx)
                    if prev == chunk:
                        continue
                    if chunk is None:
                        deletes.append((did, idx))
                        old.pop(idx)
                        mapped -= 1
                    else:
                        upserts.append((did, idx, chunk))
                        old[idx] = chunk
                        deltas[chunk] = deltas.get(chunk, 0) + 1
                        mapped += prev is None
                    if prev is not None:
                        deltas[prev] = deltas.get(prev, 0) - 1
                unknown = [c for c in deltas if c not in info]
                for i in range(0, len(unknown), _IN_BATCH):
                    ids = unknown[i : i + _IN_BATCH]
                    for chunk, rc, cid, off, length, z in db.execute(
                            "SELECT id, refcount, container, offset, length, compression FROM "
                            f"chunks WHERE id IN ({','.join('?' * len(ids))})", ids):
                        info[chunk] = [rc, cid, off, length, z]
                refs: list[tuple[int, int]] = []
                for chunk in new_ids:  # counted dead until a reference makes them live
                    cid, length = info[chunk][1], info[chunk][3]
                    dead[cid] = dead.get(cid, 0) + length
                for chunk, delta in deltas.items():
                    row = info[chunk]
                    rc, n = row[0], row[0] + delta
                    if n < 0:
                        raise AssertionError(f"pool {self.name}: chunk {chunk} refcount below "
                                             "zero")
                    row[0] = n
                    if chunk not in new_ids and delta:
                        refs.append((n, chunk))
                    if (rc == 0) != (n == 0):  # became live or dead
                        sign = 1 if rc == 0 else -1
                        dead[row[1]] = dead.get(row[1], 0) - sign * row[3]
                        f.live_bytes += sign * row[3]
                        f.live_chunks += sign
                f.mapped += mapped
                if new_ids:
                    db.executemany(
                        "INSERT INTO chunks(id, fp, container, offset, length, refcount, "
                        "compression) VALUES(?, ?, ?, ?, ?, ?, ?)",
                        [(chunk, fp, row[1], row[2], row[3], row[0], row[4])
                         for chunk, (fp, _, _) in zip(new_ids, stored, strict=True)
                         for row in (info[chunk],)])
                if upserts:
                    db.executemany("INSERT OR REPLACE INTO map VALUES(?, ?, ?)", upserts)
                if deletes:
                    db.executemany("DELETE FROM map WHERE disk=? AND idx=?", deletes)
                if refs:
                    db.executemany("UPDATE chunks SET refcount=? WHERE id=?", refs)
                dead_rows = [(d, cid) for cid, d in dead.items() if d]
                if dead_rows:
                    db.executemany("UPDATE containers SET dead = dead + ? WHERE id=?", dead_rows)
                db.execute("RELEASE put")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK TO put")
                    db.execute("RELEASE put")
                (self._figures, self._ends, self._active, self._dirty, self._new_files,
                 self._changes, self._next_chunk) = saved
                for cid in set(self._fds) - set(self._ends):  # created by the rolled-back put
                    os.close(self._fds.pop(cid))
                if isinstance(exc, sqlite3.Error):
                    raise _db_error(exc) from exc
                raise
            if damaged:  # cached places name the damaged copies (a collector's move too)
                self._forget()
            for cid, off in damaged:
                log.warning("pool %s: a chunk stored in %s at %d did not hold its content "
                            "(damaged on disk); rewriting it from a write of that content "
                            "(durable with the write), the damaged copy left for the collector",
                            self.name, container_file(self.path, cid), off)
            base = did << _IDX_BITS
            packed = {fp: _pack_loc(*info[chunk][1:5])  # type: ignore[misc]
                      for fp, chunk in found.items()}
            packed[None] = _ZEROS  # type: ignore[index]
            placed = [(idx, packed[fp]) for idx, _, fp in chunks]  # type: ignore[index]
            self._remember([(base | idx, loc) for idx, loc in placed])
            table = self._tables.get(did)
            if table is not None:  # before the write is acknowledged (ChunkExtent)
                self._tell_table(did, table, placed)
            self._changes += len(chunks)
            if durable or self._changes >= GROUP_CHANGES:
                self.commit()  # a failure loses this command's change and the others' pending
            elif not journaled:
                self._pending.add(did)  # acknowledged, durable at the next commit

    def _find(self, fps: set[bytes], found: dict[bytes, int],
              info: dict[int, list[int]]) -> None:
        """Look the fingerprints `fps` up (``IN`` queries): found[fp] = chunk id, info[chunk id]
        = [refcount, container, offset, length, compression] (lock held)."""
        want = list(fps)
        for i in range(0, len(want), _IN_BATCH):
            part = want[i : i + _IN_BATCH]
            for chunk, fp, rc, cid, off, length, z in self._db.execute(
                    "SELECT id, fp, refcount, container, offset, length, compression FROM "
                    f"chunks WHERE fp IN ({','.join('?' * len(part))})", part):
                found[fp] = chunk
                info[chunk] = [rc, cid, off, length, z]

    def _confirmed(self, chunks: Sequence[tuple[int, bytes | memoryview | None, bytes | None]],
                   found: dict[bytes, int], info: dict[int, list[int]],
                   heal: dict[int, bytes | memoryview]
                   ) -> list[tuple[int, bytes | memoryview | None, bytes | None]]:
        """`chunks` with each match confirmed by bytes (lock held): a chunk whose fingerprint
        names a stored chunk or an earlier chunk of the command keeps it only if the bytes are
        equal (a stored copy that cannot be read or decompressed is not). Else, in a pool of
        fast fingerprints it takes its SHA-256 (`fingerprint`), looked up in turn (into `found`
        and `info`): equal fingerprints never merge different bytes. A SHA-256 match (in a
        SHA-256 pool, or such a second lookup) whose stored copy differs means that copy is
        damaged (its content has that SHA-256, these bytes do): the chunk keeps its match and
        ``heal[chunk id]`` gets the bytes, which replace the damaged copy (`_relocate`; they
        count against the capacity as a new chunk would: a write of nothing but duplicates
        can then be refused on a full pool)."""
        seen: dict[bytes, bytes | memoryview | None] = {}  # fp -> the bytes it stands for here
        out: list[tuple[int, bytes | memoryview | None, bytes | None]] = []
        strong: set[bytes] = set()
        for item in chunks:
            idx, data, fp = item
            if fp is None:
                out.append(item)
                continue
            assert data is not None
            chunk = found.get(fp)
            if fp in seen:
                ref = seen[fp]
            elif chunk is None:
                ref = seen[fp] = data
            else:
                ref = seen[fp] = self._stored_data(chunk, info)
            # bytes == bytes is a memcmp; a memoryview compares item by item (~55 us per 4 KiB)
            if data is ref or (ref is not None and _as_bytes(data) == _as_bytes(ref)):
                out.append(item)
            elif self._strong_fp:
                if chunk is not None and chunk not in heal:
                    heal[chunk] = data
                    seen[fp] = data
                out.append(item)
            else:  # a different chunk with the same XXH3, or a damaged copy: by its SHA-256
                key = fingerprint(data)
                strong.add(key)
                out.append((idx, data, key))
        if strong:
            self._find(strong, found, info)
            for _, piece, sfp in out:  # a SHA-256 match: its stored copy damaged is healed
                chunk = found.get(sfp) if sfp is not None and sfp in strong else None
                if chunk is not None and chunk not in heal and piece is not None:
                    stored = self._stored_data(chunk, info)
                    if stored is None or _as_bytes(piece) != stored:
                        heal[chunk] = piece
        return out

    def _stored_data(self, chunk: int, info: dict[int, list[int]]) -> bytes | None:
        """Chunk `chunk`'s data as stored (`info` holds its row), or None if it cannot be read
        or decompressed: damaged (a disk's read of it says so too)."""
        try:
            return self._chunk_data(*info[chunk][1:5])
        except OSError:
            return None

    def _relocate(self, healed: Sequence[tuple[int, bytes | memoryview, int]],
                  places: Sequence[tuple[int, int]], info: dict[int, list[int]],
                  dead: dict[int, int]) -> list[tuple[int, int]]:
        """Point each damaged chunk of `healed` (id, its content as stored, compression) at
        its new copy in `places` (appended in this transaction: durable before the commit
        that names it, rule 2), keeping its id, fingerprint and references; the damaged bytes
        count as dead in their container, and `dead` takes the new copy's when the chunk is
        dead itself. Returns the damaged copies' (container, offset) (lock held, inside
        `put`'s savepoint)."""
        f = self._figures
        damaged: list[tuple[int, int]] = []
        rows: list[tuple[int, int, int, int, int]] = []
        for (chunk, data, code), (cid, off) in zip(healed, places, strict=True):
            row = info[chunk]
            rc, old_cid, old_off, old_len = row[0], row[1], row[2], row[3]
            if rc:
                dead[old_cid] = dead.get(old_cid, 0) + old_len
                f.live_bytes += len(data) - old_len
            else:  # dead already; the new copy is dead until a reference revives it
                dead[cid] = dead.get(cid, 0) + len(data)
            info[chunk] = [rc, cid, off, len(data), code]
            rows.append((cid, off, len(data), code, chunk))
            damaged.append((old_cid, old_off))
        self._db.executemany("UPDATE chunks SET container=?, offset=?, length=?, compression=? "
                             "WHERE id=?", rows)
        return damaged

    def _reclaim(self, need: int) -> bool:
        """Make room for `need` more bytes by compacting containers that hold dead chunks (any
        share dead, most dead first) when they do not fit now but would once the dead bytes
        are gone; True if anything was compacted (lock held, no transaction of a `put` open).

        The hard limit is reached when live data fills the pool, not dead bytes the collector
        has yet to compact (SBC-4 4.7.3.8: SPACE ALLOCATION FAILED is resource exhaustion): a
        write that fits after compaction waits for it, at most `RECLAIM_SECONDS` (one step,
        `COLLECT_BATCH_BYTES` copied, past it). A pool whose live data leaves no room is
        refused at once, without compacting anything."""
        journal = self.journal  # its records' space is taken already, and what it leased
        capacity = self._config.capacity - (0 if journal is None else journal.held())
        if need <= 0 or self._figures.used + need <= capacity:
            return False
        if self._figures.used - self.dead_bytes() + need > capacity:
            return False
        deadline = time.monotonic() + RECLAIM_SECONDS
        compacted = False
        while self._figures.used + need > capacity and time.monotonic() < deadline:
            if self.collect_step(dead_percent=1) is None:
                break
            compacted = True
        if compacted:
            log.info("pool %s: compacted dead chunks for a write of %d new bytes (used %d of "
                     "%d)", self.name, need, self._figures.used, capacity)
        return compacted

    def _reserve(self, need: int) -> None:
        """Raise SpaceAllocationFailed unless `need` more bytes fit; count a soft-threshold
        crossing (lock held; `PhysicalPool`)."""
        if need > 0:
            journal = self.journal
            self._take_space(self._figures.used + (0 if journal is None else journal.held()),
                             need, "new chunks")

    def crossing_hint(self, before: int, need: int) -> None:
        """A write journal took `need` more bytes on top of `before` (its records' before
        them): count a soft-threshold crossing of the use plus the journal's bytes, as an
        inline write counts one (`_reserve`), so that the write reports it (SBC-4 4.7.3.7), not
        the drain, which no command follows. No lock: the use is read as `room_for` reads it.
        The drain adds to the use at most what it takes from the journal's bytes: no second
        crossing."""
        self._count_crossing(self._figures.used + before, need)

    def room_for(self, need: int) -> bool:
        """Whether `need` more bytes fit under the capacity now (no lock: a hint for the
        journal, whose records are stored past the capacity if it moved meanwhile)."""
        return self._figures.used + need <= self._config.capacity

    def journal_budget(self, before: int) -> int:
        """Bytes a write journal holding `before` may take more without passing the capacity
        or reaching the soft threshold from below (no lock, as `room_for`): what the native
        loops may append by themselves (`Journal`'s lease), whose WRITEs report no crossing."""
        c = self._config
        used = self._figures.used + before
        room = c.capacity - used
        t = c.soft_threshold
        if t is not None and reaches(used, c.capacity, t):
            # None above the threshold: were the use to fall below it (the collector compacts,
            # the threshold is raised), the loops' WRITEs would cross it unreported.
            return 0
        if room > 0 and t is not None:
            room = min(room, -(-c.capacity * t // 100) - 1 - used)  # stays below it
        return max(0, room)

    # ------------------------------------------------------------------------------------------
    # The write journal's side (journal.py)

    def journal_meta(self) -> tuple[int, int, int]:
        """The journal's committed tail: (position, record number, epoch)."""
        with self.lock:
            return (self._meta("journal_pos", 0), self._meta("journal_seq", 1),
                    self._meta("journal_epoch", 0))

    def set_journal_meta(self, pos: int, seq: int, epoch: int) -> None:
        with self.lock:
            self._begin()
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES(?, ?)", [
                ("journal_pos", pos), ("journal_seq", seq), ("journal_epoch", epoch)])
            self.commit()

    def put_journaled(self, items: Sequence[tuple[_Record, bytes | None]], pos: int, seq: int,
                      done: Callable[[Sequence[_Record], dict[int, tuple[int, int]]], None]
                      | None) -> None:
        """Put journal records (`items`: record, its data; None: a record whose write failed,
        skipped) into the index and commit with the journal's tail at (`pos`, `seq`); then,
        still under the lock, `done(records, locations)` with each chunk's new location by
        map cache key ((fd, offset); (-1, 0) zeros; (-2, 0) unknown). Records of a disk no
        longer registered are skipped. OSError if the commit fails (nothing committed)."""
        cs = self._config.chunk_size
        zero, fingerprint = self._zero_chunk, self.fingerprint
        changes: list[tuple[int, list[tuple[int, bytes | memoryview | None, bytes | None]]]] = []
        for rec, data in items:  # hashed before the lock, as a backend's write is
            if data is None:
                continue
            view = memoryview(data)
            entries: list[tuple[int, bytes | memoryview | None, bytes | None]] = []
            for k in range(rec.count):
                piece = view[k * cs : (k + 1) * cs]
                if is_zero_chunk(piece, zero):
                    entries.append((rec.first + k, None, None))
                else:
                    entries.append((rec.first + k, piece, fingerprint(piece)))
            changes.append((rec.did, entries))
        with self.lock:
            known = set(self._disk_ids.values())
            for did, entries in changes:
                if did in known:
                    self.put(did, entries, durable=False, journaled=True)
            self._begin()
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES(?, ?)", [
                ("journal_pos", pos), ("journal_seq", seq)])
            self.commit()
            if done is None:
                return
            where: dict[int, tuple[int, int]] = {}
            for did, entries in changes:
                base = did << _IDX_BITS
                for idx, _, _ in entries:
                    key = base | idx
                    loc = self._locs.get(key)
                    if loc is None:
                        loc = self._old_locs.get(key)
                    where[key] = ((-2, 0) if loc is None or (loc != _ZEROS and loc & 15) else
                                  (-1, 0) if loc == _ZEROS else
                                  (self._fd(loc >> 64), loc >> 24 & _OFFSET_MASK))
            done([rec for rec, _ in items], where)

    def open_disk(self, disk: str, size: int, *, block_size: int = 512,
                  write_cache: bool = False, on_close: Callable[[], None] | None = None
                  ) -> DedupBackend:
        """Open disk `disk` of `size` bytes (registered if new; a larger recorded size is an
        error: data is never cut off). The block size must divide the chunk size."""
        from .backend import DedupBackend

        where = f"{self.path}: disk {disk}"
        if not isinstance(size, int) or size <= 0 or size % block_size:
            raise ConfigError(f"{where}: size {size!r}: expected a positive multiple of the "
                              f"block size {block_size}")
        if self.chunk_size % block_size:
            raise ConfigError(f"{where}: block size {block_size}: expected a divisor of the "
                              f"pool's chunk size {self.chunk_size}")
        with self.lock:
            if self._closed:
                raise ConfigError(f"{self.path}: pool is closed")
            if disk in self._open_disks:
                raise ConfigError(f"{where}: already open")
            did = self.disk_id(disk, size)
            self._open_disks.add(disk)
        return DedupBackend(self, disk, did, size, block_size=block_size,
                            write_cache=write_cache, on_close=on_close)

    def _disk_closed(self, disk: str) -> None:
        with self.lock:
            self._open_disks.discard(disk)

    def drop_disk(self, disk: str) -> None:
        """Delete a disk that is not open: its map rows and registration (committed). Its
        chunks' references go with it; the collector gives back what no other disk names.
        The map is released in steps of `DROP_STEP_CHUNKS` rows, each a change of its own
        (a crash between them leaves the disk registered, with part of its map)."""
        if self.journal is not None:  # its records first: a new disk may get its id
            self.journal.drain_all()
        with self.lock:
            if disk in self._open_disks:
                raise ConfigError(f"{self.path}: disk {disk}: is open; close it first")
            did = self._disk_ids.get(disk)
            if did is None:
                known = ", ".join(sorted(self._disk_ids)) or "none"
                raise ConfigError(f"{self.path}: disk {disk}: no such disk, expected one of "
                                  f"the pool's disks ({known})")
            while True:
                idxs = [r[0] for r in self._db.execute(
                    "SELECT idx FROM map WHERE disk=? ORDER BY idx LIMIT ?",
                    (did, DROP_STEP_CHUNKS))]
                if not idxs:
                    break
                self.put(did, [(idx, None, None) for idx in idxs], durable=False)
                self._pending.discard(did)  # nothing acknowledged to anyone: not a loss
            self._begin()
            self._db.execute("DELETE FROM disks WHERE id=?", (did,))
            self.commit()
            self._lost.pop(did, None)  # its id may be given to a new disk
            del self._disk_ids[disk]
            self._forget()

    # ------------------------------------------------------------------------------------------
    # Collector

    def dead_bytes(self) -> int:
        with self.lock:
            return int(self._db.execute(
                "SELECT COALESCE(SUM(dead), 0) FROM containers").fetchone()[0])

    def container_figures(self) -> dict[int, tuple[int, int]]:
        """Each container's (size, dead bytes) by id, the open transaction's included (a
        collector's progress: moved live bytes count as dead until the container goes)."""
        with self.lock:
            return {int(cid): (int(size), int(dead)) for cid, size, dead in
                    self._db.execute("SELECT id, size, dead FROM containers")}

    def collect(self, max_seconds: float, *, dead_percent: int = DEFAULT_DEAD_PERCENT
                ) -> CollectProgress:
        """Compact containers at least `dead_percent` dead (1: any dead byte), most dead first,
        until none is left or `max_seconds` passed (checked between containers: one container's
        work, at most `container_bytes` copied, is the bound on the overrun). Runs in
        `collect_step`s, so the disks' I/O is served between them."""
        deadline = time.monotonic() + max_seconds
        done_containers = moved = freed = 0
        while True:
            step = self.collect_step(dead_percent)
            if step is not None:
                moved += step.moved
                freed += step.freed
                done_containers += step.containers
            if step is None or time.monotonic() >= deadline and done_containers:
                return CollectProgress(done_containers, moved, freed, self.dead_bytes(),
                                       step is None)

    def collect_step(self, dead_percent: int = DEFAULT_DEAD_PERCENT,
                     batch_bytes: int = COLLECT_BATCH_BYTES) -> CollectProgress | None:
        """One bounded piece of collection under the pool lock; None when no container needs
        it (none at least `dead_percent` dead and none half-compacted).

        A container is compacted over several steps: each moves at most `batch_bytes` of its
        live chunks to the active container and points their rows there, committed (data first,
        rule 2); the moved bytes count as dead in the old container. The step that finds no
        live chunk left deletes its dead chunk rows and its row, commits, then deletes the file
        (rule 5). A chunk revived between steps (equal content written again) is moved by a
        later step. A crash anywhere leaves each chunk's row naming a durable copy; the other
        copy is dead or leaked bytes, reclaimed at open."""
        with self.lock:
            if self._closed:
                return None
            db = self._db
            cid = self._compacting
            if cid is not None and cid not in self._ends:
                cid = None  # gone meanwhile (an abort reloaded the figures)
            if cid is None:
                # Read inside the open transaction, if any: what it unmapped counts as dead.
                row = db.execute(
                    "SELECT id FROM containers WHERE dead > 0 AND dead * 100 >= size * ? "
                    "ORDER BY dead DESC, id LIMIT 1", (max(dead_percent, 1),)).fetchone()
                if row is None:
                    self._compacting = None
                    return None
                cid = int(row[0])
                self._compacting = cid
                self._compact_moved = 0
                self._compact_live = int(db.execute(
                    "SELECT COALESCE(SUM(length), 0) FROM chunks WHERE container=? AND "
                    "refcount > 0", (cid,)).fetchone()[0])
            if self._active == cid:
                self._active = None  # seal it: its live chunks go to another container
            self.commit()  # the writes before this step: committed on their own
            live = db.execute("SELECT id, offset, length FROM chunks WHERE container=? AND "
                              "refcount > 0 ORDER BY offset", (cid,)).fetchall()
            self._begin()
            try:
                if live:
                    moved = 0
                    for chunk, off, length in live:
                        if moved and moved + length > batch_bytes:
                            break
                        data = self._read_chunk(cid, off, length)
                        ncid, noff = self._append(data)
                        db.execute("UPDATE chunks SET container=?, offset=? WHERE id=?",
                                   (ncid, noff, chunk))
                        db.execute("UPDATE containers SET dead = dead + ? WHERE id=?",
                                   (length, cid))
                        moved += length
                    # The map cache keeps the moved chunks' old locations: their bytes stay
                    # there, unchanged, until the container is deleted (below).
                    self.commit()
                    self._compact_moved += moved
                    return CollectProgress(0, moved, 0, self.dead_bytes(), False)
                size = self._ends[cid]
                db.execute("DELETE FROM chunks WHERE container=? AND refcount = 0", (cid,))
                db.execute("DELETE FROM containers WHERE id=?", (cid,))
                self._dirty.discard(cid)
                self.commit()
            except BaseException:
                if self._in_txn:
                    self._abort()
                raise
            self._compacting = None
            self._forget_container(cid)
            fd = self._fds.pop(cid, None)
            if fd is not None:
                os.close(fd)
            self._ends.pop(cid, None)
            self._figures.used -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(container_file(self.path, cid))  # rule 5: after the commit
            fsync_dir(os.path.join(self.path, CONTAINER_DIR))
            self._collected += size
            self._compacted += 1
            return CollectProgress(1, 0, size, self.dead_bytes(), False)

    def start_collector(self, interval: float | None = None,
                        dead_percent: int = DEFAULT_DEAD_PERCENT) -> None:
        """Run the collector in a thread of its own while the pool is open (`close` stops it):
        every `interval` seconds it compacts what `collect_step` finds, one step at a time,
        resting after each step as long as the step took (the disks' I/O waits at most one
        step, `COLLECT_BATCH_BYTES` copied, for the pool lock)."""
        with self.lock:
            if self._collector is None and not self._closed:
                self._collector = _Collector(self, COLLECT_INTERVAL if interval is None
                                             else interval, dead_percent)

    def stop_collector(self) -> None:
        """Stop the collector thread and wait for it (it finishes its step: bounded)."""
        collector, self._collector = self._collector, None
        if collector is not None:
            collector.stop()

    # ------------------------------------------------------------------------------------------
    # Offline verification

    def _check_index(self, report: CheckReport, repair: bool) -> None:
        """SQLite's own check of the index file (``PRAGMA integrity_check``: every page, every
        index entry against its table row; ``quick_check``'s page checks when the former
        stops at a damaged page), whose damage the checks of the tables (scans and primary
        keys) do not meet: a damaged fingerprint index fails writes, not reads. With `repair`
        the index is rebuilt from its tables (`_rebuild_index`). Lock held."""
        db = self._db
        try:
            found = [str(r[0]) for r in db.execute(
                f"PRAGMA integrity_check({INDEX_PROBLEMS})")]
        except sqlite3.DatabaseError as exc:
            found = [str(r[0]) for r in db.execute(f"PRAGMA quick_check({INDEX_PROBLEMS})")]
            if found == ["ok"]:
                found = [str(exc)]
        if found == ["ok"]:
            return
        file = os.path.join(self.path, DB_FILE)
        report.problems += [f"index {file}: {line}" for text in found
                            for line in text.splitlines() if line and not line.startswith("***")]
        if repair:
            try:
                kept = self._rebuild_index()
            except (OSError, sqlite3.Error) as exc:
                report.repaired.append(f"index: could not be rebuilt from its tables ({exc}): "
                                       f"restore {file} from a backup, or recreate the pool")
                return
            report.repaired.append(f"index: rebuilt from its tables (the damaged file kept as "
                                   f"{kept})")

    def _rebuild_index(self) -> str:
        """Make the index file anew from its tables' rows (read by scanning each table, not
        through its indexes, which may be what is damaged), swap it in and reconnect; the
        damaged file is renamed aside, its name returned. sqlite3.Error (nothing changed) if a
        table itself cannot be read. Lock held, no transaction open."""
        file = os.path.join(self.path, DB_FILE)
        new, kept = file + ".rebuilt", file + ".damaged"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)
        os.close(os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         stat.S_IMODE(os.stat(file).st_mode)))
        out = sqlite3.connect(new, isolation_level=None)
        try:
            out.executescript(f"BEGIN;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};")
            for table in ("meta", "containers", "chunks", "disks", "map", "sqlite_sequence"):
                rows = self._db.execute(f"SELECT * FROM {table}").fetchall()
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    out.executemany(f"INSERT OR REPLACE INTO {table} VALUES({marks})", rows)
            out.execute("COMMIT")
        finally:
            out.close()
        fd = os.open(new, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._db.close()  # its WAL checkpointed into the damaged file, which goes aside whole
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(file + suffix, kept + suffix)
        os.replace(new, file)
        fsync_dir(self.path)
        self._db = _connect(file)
        self._load()
        return kept

    def verify(self, *, repair: bool = False) -> CheckReport:
        """Check every invariant (see `check_pool`); with `repair`, fix what can be fixed."""
        report = CheckReport()
        with self.lock:
            self.commit()
            self._check_index(report, repair)
            self._reclaim_leaks(report, fix=repair)
            db = self._db
            cs = self.chunk_size
            names = {d: n for n, d in self._disk_ids.items()}
            dangling = db.execute("SELECT m.disk, m.idx, m.chunk FROM map m LEFT JOIN chunks c "
                                  "ON c.id = m.chunk WHERE c.id IS NULL").fetchall()
            for did, idx, chunk in dangling:
                report.problems.append(f"disk {names.get(did, did)} chunk {idx}: names chunk "
                                       f"{chunk}, which does not exist (reads zeros once "
                                       "repaired)")
            if repair and dangling:
                self._begin()
                db.executemany("DELETE FROM map WHERE disk=? AND idx=?",
                               [(did, idx) for did, idx, _ in dangling])
                report.repaired.append("removed the map rows naming no chunk; these now read "
                                       "zeros: " + _where(dangling, names, cs))
            for did, idx, size in db.execute(
                    "SELECT m.disk, m.idx, d.size FROM map m LEFT JOIN disks d ON d.id = m.disk "
                    "WHERE d.id IS NULL OR m.idx * ? >= d.size", (cs,)).fetchall():
                report.problems.append(f"disk {did} chunk {idx}: outside its disk ({size})")
            sizes = {cid: os.stat(f).st_size for cid, f in self._container_files().items()}
            bad: list[int] = []
            for chunk, fp, cid, off, length, z in db.execute(
                    "SELECT id, fp, container, offset, length, compression FROM chunks"
            ).fetchall():
                if off + length > sizes.get(cid, -1):
                    report.problems.append(f"chunk {chunk}: container {cid} [{off}, "
                                           f"{off + length}) is missing")
                    bad.append(chunk)
                    continue
                try:
                    data = self._chunk_data(cid, off, length, z)
                except OSError:
                    data = b""
                if not fingerprint_matches(data, fp):
                    report.problems.append(f"chunk {chunk}: bytes in container {cid} at {off} "
                                           "do not match its fingerprint")
                    bad.append(chunk)
            if repair and bad:
                self._begin()
                lost = []
                for chunk in bad:
                    lost += db.execute("SELECT disk, idx, chunk FROM map WHERE chunk=?",
                                       (chunk,)).fetchall()
                    db.execute("DELETE FROM map WHERE chunk=?", (chunk,))
                    db.execute("DELETE FROM chunks WHERE id=?", (chunk,))
                report.repaired.append(f"dropped {len(bad)} damaged chunk(s); the blocks that "
                                       "named them read zeros: "
                                       + (_where(lost, names, cs) if lost else "none did"))
            if repair:
                self._repair_short_containers(report, sizes)
            if repair and self._in_txn:
                self.commit()
            counts = self._count_problems()
            report.problems += counts
            if repair and counts:
                self._recount()
                report.repaired.append(f"recounted {len(counts)} reference/dead count(s)")
            if repair:
                self._load()
        return report


def _where(rows: Sequence[tuple[int, int, int]], names: Mapping[int, str], chunk_size: int,
           limit: int = 16) -> str:
    """``disk a: bytes 0-16383, 40960-45055; disk b: ...`` for map rows (disk, idx, chunk):
    what an operator tells the initiators is lost, runs of chunks merged, at most `limit` runs
    per disk named."""
    by_disk: dict[int, list[int]] = {}
    for did, idx, _ in rows:
        by_disk.setdefault(did, []).append(idx)
    parts = []
    for did in sorted(by_disk):
        runs = merge_ranges((idx, 1) for idx in by_disk[did])
        spans = [f"{a * chunk_size}-{(a + n) * chunk_size - 1}" for a, n in runs[:limit]]
        more = f" and {len(runs) - limit} more runs" if len(runs) > limit else ""
        parts.append(f"disk {names.get(did, did)}: bytes {', '.join(spans)}{more}")
    return "; ".join(parts)


class _Collector:
    """The pool's in-process collector thread (`DedupPool.start_collector`)."""

    def __init__(self, pool: DedupPool, interval: float, dead_percent: int) -> None:
        self.pool = pool
        self.interval = interval
        self.dead_percent = dead_percent
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"dedup-gc-{pool.name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        name_os_thread()
        pool = self.pool
        while not self._stop.wait(self.interval):
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    step = pool.collect_step(self.dead_percent)
                except Exception:  # noqa: BLE001 - a failed step is retried at the next look
                    log.exception("pool %s: collector step failed; retrying in %.1f s",
                                  pool.name, self.interval)
                    break
                if step is None:
                    break
                self._stop.wait(time.monotonic() - started)  # the disks' I/O goes first

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join()


def _index_gone(file: str, what: str) -> ConfigError:
    """The refusal to open a pool whose index `file` is `what` (missing, empty, without
    schema): a new empty index would make every container a leak, deleted at open."""
    pool_file = os.path.join(os.path.dirname(file), POOL_FILE)
    return ConfigError(f"{file}: dedup index {what}, expected the index of the pool described "
                       f"by {pool_file}; not opened, the pool's containers are kept; restore "
                       "the index from a backup (only create-pool makes a new index)")


def _check_index_file(file: str) -> None:
    """ConfigError (`_index_gone`) if the index `file` is missing or 0 bytes."""
    try:
        size = os.stat(file).st_size
    except FileNotFoundError:
        raise _index_gone(file, "missing") from None
    if not size:
        raise _index_gone(file, "empty (0 bytes)")


def _unreadable_index(file: str, exc: sqlite3.Error) -> ConfigError:
    """`exc`, met using the index `file`, as the operator's error: a damaged file (restore it)
    or one this process cannot use (permissions, read-only, I/O: fix that, the index is kept)."""
    if isinstance(exc, sqlite3.OperationalError):
        return ConfigError(f"{file}: cannot use the dedup index ({exc}), expected a file (and "
                           "directory) this user can read and write")
    return ConfigError(f"{file}: unreadable dedup index ({exc}), expected an SQLite database "
                       "made by tcmu-py; the pool's containers are kept; restore the index from "
                       "a backup")


def _connect(file: str, *, create: bool = False, readonly: bool = False) -> sqlite3.Connection:
    """The pool's index `file`, in WAL mode with ``synchronous=FULL``, or `readonly` (no lock,
    no pragma written: what `read_pool_status` reads while another process serves the pool).
    Only `create` (what `create_pool` passes) makes the file and its schema; otherwise a
    missing or empty index, or one without schema, is a ConfigError and nothing is written
    (opening the pool with a new empty index would take every container file for a leak). An
    unreadable file, or one of another schema version, is a ConfigError naming it."""
    assert not (create and readonly)
    if not create:
        _check_index_file(file)
    elif not os.path.exists(file):
        os.close(os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    try:
        if readonly:
            # (urllib.parse.quote is urllib.request.pathname2url on POSIX, without importing
            # urllib.request's HTTP client: ~0.2 s of every process listing the handlers
            # under the lab's emulation.)
            db = sqlite3.connect(f"file:{urllib.parse.quote(file)}?mode=ro", uri=True)
        else:
            db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _unreadable_index(file, exc) from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not create:
            raise _index_gone(file, "without schema (user_version 0)")
        if readonly:
            _check_schema_version(file, version)
            return db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ConfigError(f"{file}: cannot use SQLite's WAL mode here (got {mode!r})")
        db.execute("PRAGMA synchronous=FULL")  # rule 3
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if version == 0:
            # One transaction (executescript would commit a BEGIN issued before it): a crash
            # leaves no schema or all of it.
            db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};"
                             "COMMIT;")
        else:
            _check_schema_version(file, version)
    except sqlite3.Error as exc:
        db.close()
        raise _unreadable_index(file, exc) from None
    except BaseException:
        db.close()
        raise
    return db


def _check_schema_version(file: str, version: int) -> None:
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{file}: index schema version {version}, expected {SCHEMA_VERSION}"
                          " (made by another version of tcmu-py)")


def _check_recorded_chunk_size(path: str, db: sqlite3.Connection, chunk_size: int) -> int:
    """The chunk size the index of the pool at `path` records (0: none, an index made before
    it was), after checking it is pool.json's `chunk_size`: ConfigError naming both files
    if not (the maps' chunk numbers are in units of it: another would read every disk wrong)."""
    row = db.execute("SELECT value FROM meta WHERE key='chunk_size'").fetchone()
    recorded = 0 if row is None else int(row[0])
    if recorded and recorded != chunk_size:
        raise ConfigError(f"{os.path.join(path, POOL_FILE)}: chunk_size: got {chunk_size}, "
                          f"expected {recorded} (the chunk size the pool was created with, "
                          f"recorded in {os.path.join(path, DB_FILE)}; it cannot change)")
    return recorded


def _disk_rows(db: sqlite3.Connection, chunk_size: int) -> tuple[DiskStatus, ...]:
    return tuple(DiskStatus(name, size, n * chunk_size) for name, size, n in db.execute(
        "SELECT d.name, d.size, (SELECT COUNT(*) FROM map WHERE disk = d.id) FROM disks d "
        "ORDER BY d.name"))


# ----------------------------------------------------------------------------------------------
# Admin API (CLI / daemon)


def create_pool(path: str, name: str, capacity: int, soft_threshold: int | None = 80,
                chunk_size: int = DEFAULT_CHUNK, compression: str = "none",
                fingerprint: str = DEFAULT_FINGERPRINT, journal: int = 0) -> DedupPoolConfig:
    """Create a pool in directory `path` (created if missing; must hold no pool yet), with its
    empty index. Raises ConfigError for a bad name/capacity/threshold/chunk size/compression/
    fingerprint/journal size, a pool there already, or a capacity the file system cannot hold.
    `journal`: bytes of the write journal (journal.py; 0: none), made at the first open.

    A directory whose pool.json is gone but whose index is whole (`_connect` opens it) gets
    its pool.json back instead, written from the index (`_pool_json_from_index`): no data
    is touched."""
    check_name("pool", name)
    _check_pool_args(path, capacity, soft_threshold, chunk_size)
    _check_compression(path, compression)
    if fingerprint not in FINGERPRINTS:
        raise ConfigError(f"{path}: fingerprint {fingerprint!r}: expected one of "
                          f"{', '.join(FINGERPRINTS)}")
    _check_journal(path, journal)
    make_private_dirs(path)
    path = os.path.realpath(path)
    with _config_lock(path):
        if os.path.exists(os.path.join(path, POOL_FILE)):
            raise ConfigError(f"{path}: a pool already exists here")
        if _has_schema(os.path.join(path, DB_FILE)):
            config = _pool_json_from_index(path, DedupPoolConfig(
                name, capacity, soft_threshold, chunk_size, compression, fingerprint, journal))
            write_json(os.path.join(path, POOL_FILE), config.to_doc(), indent=2)
            return config
        containers = os.path.join(path, CONTAINER_DIR)
        if os.path.isdir(containers) and any(map(_CONTAINER_RE.match, os.listdir(containers))):
            raise ConfigError(f"{containers}: holds container files of a pool whose {POOL_FILE}"
                              " is gone; expected a directory without a pool (restore "
                              f"{POOL_FILE} and {DB_FILE} from a backup, or remove them)")
        st = os.statvfs(path)
        if capacity > st.f_bavail * st.f_frsize:
            raise ConfigError(f"{path}: capacity {capacity} is more than the file system has "
                              f"free ({st.f_bavail * st.f_frsize}); expected a capacity it can "
                              "hold")
        make_private_dirs(os.path.join(path, CONTAINER_DIR))
        db = _connect(os.path.join(path, DB_FILE), create=True)
        try:  # the index's own record of its unit (`DedupPool._check_chunk_size`)
            db.execute("INSERT OR REPLACE INTO meta VALUES('chunk_size', ?)", (chunk_size,))
        finally:
            db.close()
        config = DedupPoolConfig(name, capacity, soft_threshold, chunk_size, compression,
                                 fingerprint, journal)
        # pool.json last: a pool exists once its index does.
        write_json(os.path.join(path, POOL_FILE), config.to_doc(), indent=2)
    return config


def _has_schema(index: str) -> bool:
    """Whether `index` is an index with its schema (a `create_pool` interrupted before the
    schema left an empty or schema-less file, which a new `create_pool` makes again)."""
    try:
        if not os.path.getsize(index):
            return False
        db = sqlite3.connect(f"file:{urllib.parse.quote(index)}?mode=ro", uri=True)
    except (OSError, sqlite3.Error):
        return False
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0]) > 0
    except sqlite3.Error:
        return False
    finally:
        db.close()


def _pool_json_from_index(path: str, asked: DedupPoolConfig) -> DedupPoolConfig:
    """The pool.json for the index at `path` whose pool.json is gone: name, capacity,
    threshold and compression as `asked`; the chunk size the index records (a different one
    asked for is a ConfigError naming both: the index's is the one its chunks have); the
    fingerprint its chunks have (16-byte fingerprints: XXH3-128; only 32-byte ones: SHA-256;
    none: as asked); version 2 at least if it holds compressed chunks."""
    index = os.path.join(path, DB_FILE)
    db = _connect(index)  # a missing, empty or schema-less index: ConfigError naming it
    try:
        any_fp = db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone()
        row = db.execute("SELECT value FROM meta WHERE key='chunk_size'").fetchone()
        if row is None:  # an index older than the record: its uncompressed chunks say
            row = db.execute("SELECT length FROM chunks WHERE compression = 0 LIMIT 1"
                             ).fetchone()
        if row is None and any_fp:
            raise ConfigError(f"{index}: records no chunk size and holds only compressed "
                              f"chunks; expected a {POOL_FILE} restored from a backup")
        chunk = asked.chunk_size if row is None else int(row[0])
        short = db.execute("SELECT 1 FROM chunks WHERE length(fp) = 16 LIMIT 1").fetchone()
        compressed = db.execute("SELECT 1 FROM chunks WHERE compression != 0 LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        raise _unreadable_index(index, exc) from None
    finally:
        db.close()
    if chunk != asked.chunk_size:
        raise ConfigError(f"{path}: {POOL_FILE} is gone and {DB_FILE} records chunk size "
                          f"{chunk}, not {asked.chunk_size}; expected --chunk-size {chunk} to "
                          f"write {POOL_FILE} again")
    fingerprint = ("xxh3-128" if short else "sha256" if any_fp else asked.fingerprint)
    log.warning("pool %s: %s written again from %s (chunk size %d, fingerprint %s); the data "
                "is as it was", path, POOL_FILE, DB_FILE, chunk, fingerprint)
    return replace(asked, fingerprint=fingerprint,
                   version=POOL_FORMAT_COMPRESSED if compressed else POOL_FORMAT_VERSION)


def declaration_mismatches(current: DedupPoolConfig, name: str, chunk_size: int,
                           fingerprint: str | None = None) -> list[tuple[str, object, object]]:
    """``(key, declared, recorded)`` for each of an existing pool's fixed settings (its name,
    chunk size and, unless `fingerprint` is None, fingerprint) that a declaration gives
    differently; empty when it matches. `ensure_pool` refuses the first; the YAML check
    (`handlers.dedup.config`) reports each against its key."""
    declared = (("name", name, current.name), ("chunk_size", chunk_size, current.chunk_size),
                ("fingerprint", fingerprint, current.fingerprint))
    return [(key, given, recorded) for key, given, recorded in declared
            if given is not None and given != recorded]


def ensure_pool(path: str, name: str, capacity: int, soft_threshold: int | None = 80,
                chunk_size: int = DEFAULT_CHUNK, compression: str = "none",
                fingerprint: str | None = None, journal: int = 0) -> DedupPoolConfig:
    """Make the pool at `path` match a declaration: create it, or update its capacity, soft
    threshold, compression and journal size (the live pool's if open here; a journal size
    takes effect at the pool's next open). The chunk size and fingerprint
    of an existing pool cannot change: a different one is a ConfigError (`fingerprint` None:
    `DEFAULT_FINGERPRINT` for a new pool, whatever an existing one has)."""
    real = os.path.realpath(path)
    if not os.path.exists(os.path.join(real, POOL_FILE)):
        return create_pool(path, name, capacity, soft_threshold, chunk_size, compression,
                           DEFAULT_FINGERPRINT if fingerprint is None else fingerprint, journal)
    _check_pool_args(real, capacity, soft_threshold, chunk_size)
    _check_compression(real, compression)
    _check_journal(real, journal)
    with _open_pools_lock:
        live = _open_pools.get(real)
    current = live.config if live is not None else load_pool_config(real)
    where = os.path.join(real, POOL_FILE)
    for key, given, recorded in declaration_mismatches(current, name, chunk_size, fingerprint):
        raise ConfigError(f"{where}: {key} {given!r}: the pool was created with {recorded!r},"
                          " which cannot change")
    if capacity < current.capacity:
        used = live.used if live is not None else read_pool_status(real).used
        if capacity < used:
            # Allowed (an operator may mean to stop the pool's growth), but said: every write
            # of new data is refused until enough is unmapped and collected.
            log.warning("%s: capacity %d is below the %d bytes the pool holds: writes of new "
                        "data answer SPACE ALLOCATION FAILED until that much is unmapped and "
                        "collected, or the capacity is raised", where, capacity, used)
    if live is not None:
        if live.capacity != capacity:
            live.set_capacity(capacity)
        if live.soft_threshold != soft_threshold:
            live.set_soft_threshold(soft_threshold)
        if live.config.compression != compression:
            live.set_compression(compression)
        if live.config.journal != journal:
            live.set_journal(journal)
        return live.config
    with _config_lock(real):
        config = load_pool_config(real)
        new = replace(config, capacity=capacity, soft_threshold=soft_threshold,
                      compression=compression, journal=journal)
        if new != config:
            write_json(where, new.to_doc(), indent=2)
    return new


def _pool_key(path: str) -> str:
    return "dedup-pool:" + os.path.realpath(path)


def acquire_pool(path: str, expected_name: str | None = None) -> DedupPool:
    """The pool at `path` shared by everything in this process (`tcmu_py.handler.shared`), with
    its collector running (`DedupPool.start_collector`) until the last user releases it: the
    space its disks free (UNMAP, overwrites) goes back to the file system while they are
    served."""
    from tcmu_py.handler import shared

    key = _pool_key(path)
    pool = shared.acquire(key, lambda: _open_collecting(path, expected_name))
    if expected_name is not None and pool.name != expected_name:
        shared.release(key, DedupPool.close)
        raise ConfigError(f"{pool.path}: pool is named {pool.name!r}, expected {expected_name!r}")
    return pool


@dataclass(frozen=True)
class CollectorSettings:
    """How the in-daemon collector of a pool runs (`DedupPool.start_collector`): seconds
    between its looks at the pool, and the share of a container (percent) that must be dead
    before it is compacted."""

    interval: float = COLLECT_INTERVAL
    dead_percent: int = DEFAULT_DEAD_PERCENT


_collector_settings: dict[str, CollectorSettings] = {}


def configure_collector(path: str, settings: CollectorSettings) -> None:
    """Use `settings` for the collector of the pool at `path` in this process (the YAML's
    ``collector_interval`` / ``collector_dead_percent``): from its next open, and at once if it
    is open here with its collector running."""
    real = os.path.realpath(path)
    with _open_pools_lock:
        _collector_settings[real] = settings
        live = _open_pools.get(real)
    collector = live._collector if live is not None else None
    if collector is not None:
        collector.interval, collector.dead_percent = settings.interval, settings.dead_percent


def collector_settings(path: str) -> CollectorSettings:
    """The settings `configure_collector` gave the pool at `path` (else the defaults)."""
    with _open_pools_lock:
        return _collector_settings.get(os.path.realpath(path), CollectorSettings())


def _open_collecting(path: str, expected_name: str | None) -> DedupPool:
    pool = DedupPool.open(path, expected_name)
    settings = collector_settings(path)
    pool.start_collector(settings.interval, settings.dead_percent)
    return pool


def release_pool(pool: DedupPool) -> None:
    from tcmu_py.handler import shared

    shared.release(_pool_key(pool.path), DedupPool.close)


def read_pool_status(path: str) -> DedupPoolStatus:
    """Figures of the pool at `path`: live if open in this process, else read from its index
    (read-only, no lock: safe while another process serves it; that process's uncommitted
    writes are not seen)."""
    real = os.path.realpath(path)
    with _open_pools_lock:
        live = _open_pools.get(real)
    if live is not None:
        return live.status()
    config = load_pool_config(real)
    file = os.path.join(real, DB_FILE)
    db = _connect(file, readonly=True)
    try:
        _check_recorded_chunk_size(real, db, config.chunk_size)
        used, dead = db.execute(
            "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(dead), 0) FROM containers").fetchone()
        chunks, stored = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM chunks WHERE refcount > 0"
        ).fetchone()
        mapped = db.execute("SELECT COUNT(*) FROM map").fetchone()[0]
        disks = _disk_rows(db, config.chunk_size)
        tail = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('journal_pos', "
                               "'journal_seq', 'journal_epoch')").fetchall())
    except sqlite3.Error as exc:
        raise _unreadable_index(file, exc) from None
    finally:
        db.close()
    # The journal's records past the index's committed tail: what a served pool reports as
    # journal_pending (the next open's replay puts them into the index).
    epoch = int(tail.get("journal_epoch", 0))
    _, pending = (scan_pending(real, config.chunk_size, int(tail.get("journal_pos", 0)),
                               int(tail.get("journal_seq", 1)), epoch)
                  if epoch else (0, 0))
    return DedupPoolStatus(real, config.name, config.capacity, config.soft_threshold,
                           config.chunk_size, used, mapped * config.chunk_size,
                           chunks * config.chunk_size, chunks, dead, disks, stored=stored,
                           compression=config.compression, journal=config.journal,
                           journal_pending=pending)


def check_pool(path: str, *, repair: bool = False) -> CheckReport:
    """Verify the pool at `path` offline (it must not be open elsewhere): every map entry
    names an existing chunk inside its disk, every chunk's bytes are in its container and match
    its fingerprint, reference counts and dead bytes agree with a recount, no container bytes
    are leaked. With `repair`: reclaim leaks, recount, and drop damaged chunks (the blocks
    naming them then read zeros; reported)."""
    with DedupPool.open(path, repair=False) as pool:
        report = pool.verify(repair=repair)
        records, nbytes = pending_records(pool)
        if records:
            report.notes.append(f"the write journal holds {records} write(s), {nbytes} bytes, "
                                "not yet in the index (checked without them); the next open "
                                "for writing (serve, dedup gc) replays them")
        return report


def open_pools() -> Mapping[str, DedupPool]:
    """The pools open in this process, by real path (a snapshot)."""
    with _open_pools_lock:
        return dict(_open_pools)
