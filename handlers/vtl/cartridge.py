"""A virtual tape cartridge on disk: append-only records, a checksummed index, sidecar metadata.

Rules this file obeys
---------------------
* A cartridge is a directory::

      <dir>/data        file header + records, append-only between overwrites
      <dir>/index       sparse cache of record offsets (rebuilt whenever it does not verify)
      <dir>/filemarks   cache of filemark object ids (covered by the index header's CRC)
      <dir>/meta.json   barcode, generation, WORM, write protect, capacity (atomic replace)
      <dir>/mam.json    cartridge memory (MAM) host attributes and life counters (atomic replace)

* ``data`` starts with a 64-byte file header (magic, version, *epoch*) followed by records. Each
  record is a 32-byte header (magic, type, flags, 64-bit logical object number, stored and logical
  lengths, checksum of the stored payload, CRC-32 of the header) and its payload. The payload
  checksum is the low 32 bits of XXH64 (seed 0) when the record's flags have `FLAG_XXH64` (every
  record with a payload written since), CRC-32 otherwise: XXH64 costs a tenth of CRC-32 under
  software emulation, where CRC-32 cost as much as copying the record. Logical object
  ``i`` (block or filemark, SSC-5 4.2.x "logical object identifier") is the ``i``-th record. End of
  data is the end of the last valid record: there is no EOD record.
* Durability: records are written with ``pwritev`` and become durable at ``sync()`` (the drive
  calls it at WRITE FILEMARKS, REWIND, unload and close; `append` also syncs by itself every
  `SYNC_INTERVAL` bytes, which bounds both the loss window and the recovery scan). After a crash
  the cartridge opens readable up to the last record whose header and payload verify; anything
  after it is cut off.
* Overwriting in the middle (tape semantics: writing at object ``i`` discards ``i..``) bumps the
  epoch in the file header and truncates the file, made durable before the next append. That
  in-place header write is the one write a crash can tear into a header that fails its CRC;
  such a header (magic and version intact) is not fatal: the records are found by scanning,
  without the index, and a writable open gives the file an epoch no index on disk has.
* End of medium: the capacity, or the backing filesystem's room if less (free space probed
  at every append, less `BACKING_RESERVE` for the index, filemarks cache and sidecars), see
  `Cartridge._room`. A filesystem that fills up anyway (ENOSPC/EDQUOT during an append) is the
  end of medium too: the call's records are cut off (as at any failed append) and CartridgeFull
  raised; an index checkpoint that meets it is skipped (the data is durable, the index a cache).
* The index is a cache: the offset of every `INDEX_STRIDE`-th object (a sparse index: 8 bytes per
  64 objects, so a full LTO-9 cartridge of 256 KiB blocks needs ~9 MB of RAM) plus the list of
  filemarks, and a header with the epoch it belongs to, the object count, the end offset and
  running CRC-32s of both arrays. It is appended at ``sync()`` after the data is durable, so it
  never names a record that is not durable. At open it is used only if its epoch, stride, CRCs
  and end offset verify and the records from its last sparse entry walk exactly to its end; the
  records after it are scanned (payload checksums checked) to find the true end of data. Offsets of
  objects between sparse entries are found by walking record headers (at most stride - 1 reads;
  sequential access is O(1) through a cursor).
* Encryption (SSC-5 tape data encryption, see encryption.py): a data record written while the
  drive encrypts has `FLAG_ENCRYPTED`; its payload is an envelope (clear header with the key
  *identifier*, nonce and key-associated data, then the AES-256-GCM ciphertext and tag) of the
  logical data (compressed first if `FLAG_ZLIB`); the logical length stays the plaintext's. The
  key itself is never stored. Versions: data file header version 1 (`FORMAT_VERSION`) has no
  encrypted record; the header is rewritten in place as version 2 (`DATA_VERSION_ENCRYPTED`) and
  made durable (fdatasync) *before* the first encrypted record is appended, so software that
  knows only version 1 refuses the cartridge (UNKNOWN FORMAT) rather than return ciphertext as
  data. Version 1 files open and read as before; a version stays 2 once reached. The header write
  obeys the torn-header rule above (magic and version survive; the epoch is renewed).
* Partitions (SSC-5 4.2.x, LTO-5 and later; made by FORMAT MEDIUM): the files above are
  partition 0; partition ``i`` >= 1 has its own ``data``, ``index`` and ``filemarks`` in
  ``<dir>/partition<i>/``, under every rule above (its own epoch, end of data, early warning at
  the end of its size; its data file locked like partition 0's). meta.json lists the sizes as
  ``"partitions"`` and has ``"format": 2`` (`META_VERSION_PARTITIONED`), so software that knows
  only format 1 refuses the cartridge instead of showing partition 0 as the whole tape; a
  cartridge of one partition stays format 1 (older cartridges open unchanged). `format` orders
  its writes so that a crash leaves either layout whole: every partition emptied (durable), new
  partition directories created blank (data file and directory entry fsynced), meta.json
  replaced atomically, then directories the layout does not list removed (a writable open
  removes any such leftover). What the partitions held when a format was interrupted is gone
  or going, as on a real tape.

Threads: a Cartridge is used by one drive at a time; its methods are not thread-safe.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import shutil
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import xxhash
from cryptography.exceptions import InvalidTag

from tcmu_py.buffers import Buffer, skip, slice_views
from tcmu_py.handlers.vtl.encryption import ENVELOPE_OVERHEAD, Envelope
from tcmu_py.handlers.vtl.personality import GENERATIONS, MediaType, MediumKind, parse_barcode
from tcmu_py.handlers.vtl.statefile import FILE_MODE, Fields
from tcmu_py.statefile import (
    invalid,
    make_private_dirs,
    read_json,
    remove_stale_temporaries,
    write_json,
)

log = logging.getLogger(__name__)

DATA_FILE = "data"
INDEX_FILE = "index"
META_FILE = "meta.json"
MAM_FILE = "mam.json"

FORMAT_VERSION = 1
#: meta.json "format" of a cartridge with more than one partition (it lists their sizes).
META_VERSION_PARTITIONED = 2
#: Most partitions a cartridge holds (LTO-7 and later: 4; SSC-5 8.3.6).
MAX_PARTITIONS = 4
#: Directory (inside the cartridge directory) of partition ``i`` >= 1's record files.
PARTITION_DIR = "partition{}"
#: Data file header version of a cartridge that may hold encrypted records (`FLAG_ENCRYPTED`).
DATA_VERSION_ENCRYPTED = 2
#: Data file header versions this code reads.
DATA_VERSIONS = (FORMAT_VERSION, DATA_VERSION_ENCRYPTED)

# File header: magic 8s | version H | 6 pad | epoch Q | 36 pad | crc32 of bytes 0..59 I.
_FILE_HEADER = struct.Struct(">8sH6xQ36x")
FILE_MAGIC = b"TCMUVTL\x00"
FILE_HEADER_SIZE = 64

# Record header: magic 4s | type B | flags B | 2 pad | object Q | stored I | logical I |
# payload crc I | header crc I (of the first 28 bytes).
_RECORD = struct.Struct(">4sBB2xQIII")
_CRC = struct.Struct(">I")
RECORD_MAGIC = b"VTLR"
RECORD_HEADER_SIZE = 32

# Index header: magic 4s | version H | stride H | epoch Q | count Q | end Q | sparse crc I |
# filemark count Q | filemark crc I | 12 pad.
_INDEX_HEADER = struct.Struct(">4sHHQQQIQI12x")
INDEX_MAGIC = b"VTLI"
INDEX_HEADER_SIZE = 64
FILEMARKS_FILE = "filemarks"

#: One sparse index entry per this many objects.
INDEX_STRIDE = 64
#: `append` syncs (and checkpoints the index) by itself after this many bytes.
SYNC_INTERVAL = 1 << 30
#: Bytes at the physical end that only filemarks may use: like a real drive, a cartridge that
#: refused a data block with VOLUME OVERFLOW still takes the filemarks that close the file.
FILEMARK_RESERVE = 64 * 32

#: Bytes of the backing filesystem a writer leaves free: what the index checkpoint, the filemarks
#: cache and an atomic rewrite of meta.json/mam.json need after the last data record (a few
#: blocks each), with room for the filesystem's own block rounding.
BACKING_RESERVE = 1 << 20
#: errno values that mean the backing store has no room (not that the medium is damaged).
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

FLAG_ZLIB = 0x01
#: The payload checksum is XXH64's low 32 bits instead of CRC-32 (see the module doc).
FLAG_XXH64 = 0x02
#: The payload is an encryption envelope (encryption.py); only in data file version 2.
FLAG_ENCRYPTED = 0x04


def payload_checksum(parts: Sequence[Buffer], flags: int) -> int:
    """The payload checksum of a record with `flags`, over its stored bytes `parts` in order."""
    if flags & FLAG_XXH64:
        if len(parts) == 1:
            return int(xxhash.xxh64_intdigest(parts[0])) & 0xFFFFFFFF
        h = xxhash.xxh64()
        for b in parts:
            h.update(b)
        return int(h.intdigest()) & 0xFFFFFFFF
    crc = 0
    for b in parts:
        crc = zlib.crc32(b, crc)
    return crc

#: Largest logical block this format stores (LTO's 8 MiB limit).
MAX_RECORD = 0x800000

_IOV_MAX = 512


class RecordType(IntEnum):
    DATA = 1
    FILEMARK = 2


class CartridgeError(Exception):
    """Base of cartridge storage errors (not SCSI: the drive maps them to sense)."""


class CartridgeFull(CartridgeError):
    """An append did not fit in the capacity; `written` records of the call were stored."""

    def __init__(self, written: int) -> None:
        super().__init__(f"cartridge full after {written} record(s)")
        self.written = written


class CorruptRecord(CartridgeError):
    """A record's header or payload fails its checksum (an unrecovered read error)."""


class DecryptionFailed(CartridgeError):
    """An encrypted record's tag does not verify with the key it names (tampered or damaged)."""


class Unsealer(Protocol):
    """A key a read decrypts with (encryption.DataKey)."""

    def unseal(self, env: Envelope, obj: int, stored: bytes, *, compressed: bool) -> bytes: ...


#: A read's encryption policy: called with the record's envelope (None for a clear data record);
#: returns the key to decrypt with, None for the stored bytes as they are, or raises.
ReadPolicy = Callable[[Envelope | None], Unsealer | None]
#: A write's sealer: (object number, plaintext, compressed) -> envelope bytes.
Sealer = Callable[[int, bytes, bool], bytes]


class CartridgeBusy(CartridgeError):
    """Another process or drive holds the cartridge open for writing."""


@dataclass(frozen=True)
class DumpEntry:
    """One record as `dump` reports it."""

    object_id: int
    kind: RecordType
    offset: int
    stored_length: int
    logical_length: int
    compressed: bool
    encrypted: bool = False


def _default_early_warning(capacity: int) -> int:
    """Size of the early-warning zone before the physical end (1% of capacity, 4 MiB..1 GiB)."""
    return min(max(capacity // 100, 4 << 20), 1 << 30, max(capacity // 4, 1))


def backing_space(path: Path) -> tuple[int, int]:
    """(free bytes an unprivileged writer may use, total bytes) of the filesystem holding `path`.

    The free-space probe of every append (a module function, so tests can simulate a small or
    filling filesystem)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def filesystem_early_warning(total: int) -> int:
    """The early-warning zone before the end of a backing filesystem of `total` bytes: the zone
    a cartridge of that capacity would have (a cartridge's own zone caps it)."""
    return _default_early_warning(max(total, 1))


#: Largest capacity a cartridge may declare: 4 PiB, so capacities in MiB fit the 4-byte fields of
#: LOG SENSE page 31h (SSC-5 8.2.5).
MAX_CAPACITY = 1 << 52
_MAM_COUNTERS = ("load_count", "mb_written", "mb_read")
_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})*")
_ATTRIBUTE_ID_RE = re.compile(r"[0-9A-Fa-f]{4}")


def _is_volume_id(text: str) -> bool:
    """A barcode the drive can report: 1..32 printable ASCII (SMC-3 volume identifier)."""
    return 1 <= len(text) <= 32 and all(" " < c <= "~" for c in text)


def _atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace `path` with `obj` as JSON so a crash leaves either the old or the new file."""
    write_json(path, obj)


def check_meta(path: Path, value: Any) -> dict[str, Any]:
    """`value` (meta.json as parsed) if every field the cartridge uses is valid; else
    StateFileError naming the file, the key, the value and what was expected. Unknown keys are
    kept (a newer version's fields survive a rewrite)."""
    f = Fields(path, value)
    fmt = f.integer("format", FORMAT_VERSION, META_VERSION_PARTITIONED)
    f.string("barcode", _is_volume_id, "a volume identifier of 1..32 printable ASCII characters")
    kinds = [k.value for k in MediumKind]
    f.string("kind", lambda k: k in kinds, f"one of {kinds}")
    f.integer("generation", min(GENERATIONS), max(GENERATIONS))
    capacity = f.integer("capacity", 1, MAX_CAPACITY)
    f.integer("early_warning", 0, capacity)
    f.boolean("write_protected", False)
    if fmt == META_VERSION_PARTITIONED:
        sizes = f.array("partitions")
        if not (
            2 <= len(sizes) <= MAX_PARTITIONS
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
            and sum(sizes) <= capacity
        ):
            f.fail("partitions", sizes, f"2..{MAX_PARTITIONS} sizes > 0 adding up to at most"
                   f" the capacity {capacity}")
    elif "partitions" in f.doc:
        f.fail("partitions", f.doc["partitions"], f"no partition list in format {fmt}")
    return dict(f.doc)


def check_mam(path: Path, value: Any) -> dict[str, Any]:
    """`value` (mam.json as parsed) if its counters and host attributes are valid; else
    StateFileError. Missing counters count as 0, missing attributes as none."""
    f = Fields(path, value)
    for name in _MAM_COUNTERS:
        f.integer(name, 0, (1 << 64) - 1, 0)
    attrs = f.mapping("attributes", {})
    for ident in attrs.doc:
        if not _ATTRIBUTE_ID_RE.fullmatch(ident):
            attrs.fail(ident, ident, "an attribute identifier of 4 hex digits")
        attr = attrs.mapping(ident)
        attr.integer("format", 0, 3)  # SPC-5 7.4.2: FORMAT is a 2-bit field
        attr.string(
            "value",
            lambda v: len(v) <= 2 * 0xFFFF and _HEX_RE.fullmatch(v) is not None,
            "an even number of hex digits, at most 65535 bytes (ATTRIBUTE LENGTH is 2 bytes)",
        )
    return {"attributes": {}, **f.doc}


def _pack_file_header(epoch: int, version: int = FORMAT_VERSION) -> bytes:
    body = _FILE_HEADER.pack(FILE_MAGIC, version, epoch)
    return body + _CRC.pack(zlib.crc32(body))


def _read_file_header(raw: bytes, path: Path) -> tuple[int, bool, int]:
    """(epoch, whether the header's CRC verifies, version) of data file `path`; StateFileError
    if it is no cartridge data file of a version we read (see the module doc for a failing CRC).
    """
    if len(raw) < FILE_HEADER_SIZE:
        raise invalid(path, "header", raw, f"a {FILE_HEADER_SIZE}-byte file header")
    body = raw[: FILE_HEADER_SIZE - 4]
    magic, version, epoch = _FILE_HEADER.unpack(body)
    if magic != FILE_MAGIC:
        raise invalid(path, "header magic", magic, f"{FILE_MAGIC!r} (a cartridge data file)")
    if version not in DATA_VERSIONS:
        raise invalid(path, "header version", version, f"format version {DATA_VERSIONS}")
    intact = _CRC.unpack_from(raw, FILE_HEADER_SIZE - 4)[0] == zlib.crc32(body)
    return int(epoch), intact, int(version)


def _unpack_file_header(raw: bytes, path: Path) -> tuple[int, bool]:
    """(epoch, whether the header's CRC verifies) of data file `path` (see `_read_file_header`)."""
    return _read_file_header(raw, path)[:2]


def _create_data_file(directory: Path) -> None:
    """Create `directory`/data holding only a file header (epoch 1), durable with its entry."""
    fd = os.open(directory / DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        os.write(fd, _pack_file_header(1))
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _index_epoch(path: Path) -> int | None:
    """The epoch an index file claims (None if there is no readable index header)."""
    try:
        with open(path / INDEX_FILE, "rb") as f:
            raw = f.read(INDEX_HEADER_SIZE)
    except FileNotFoundError:
        return None
    if len(raw) < INDEX_HEADER_SIZE:
        return None
    return int(_INDEX_HEADER.unpack_from(raw)[3])


def _pack_record_header(
    kind: int, flags: int, obj: int, stored: int, logical: int, crc: int
) -> bytes:
    head = _RECORD.pack(RECORD_MAGIC, kind, flags, obj, stored, logical, crc)
    return head + _CRC.pack(zlib.crc32(head))


def _parse_record_header(raw: bytes | memoryview) -> tuple[int, int, int, int, int, int] | None:
    """(type, flags, object, stored, logical, crc); None if the header does not verify."""
    if len(raw) < RECORD_HEADER_SIZE:
        return None
    head = bytes(raw[: RECORD_HEADER_SIZE - 4])
    magic, kind, flags, obj, stored, logical, crc = _RECORD.unpack(head)
    stored_crc = _CRC.unpack_from(raw, RECORD_HEADER_SIZE - 4)[0]
    if magic != RECORD_MAGIC or stored_crc != zlib.crc32(head):
        return None
    if kind not in (RecordType.DATA, RecordType.FILEMARK) or stored > MAX_RECORD + 1024:
        return None
    return kind, flags, obj, stored, logical, crc


#: The attributes that make up one partition's record state (swapped by `select_partition`).
_PARTITION_STATE = (
    "_fd", "_dir", "_epoch", "_data_version", "_stride", "_count", "_end", "_sparse",
    "_filemarks", "_cursor", "_indexed", "_indexed_sparse", "_indexed_fms", "_sparse_crc",
    "_fm_crc", "_dirty", "_unsynced_bytes",
)


class Cartridge:
    """One open cartridge. Create with `Cartridge.create`, open with `Cartridge.open`."""

    def __init__(self, path: Path, meta: dict[str, Any], fd: int, read_only: bool) -> None:
        self.path = path
        self._meta = meta
        self.read_only = read_only
        self._part = 0  # the active partition
        #: Saved record state of every partition (the active one's is stale until switched away).
        self._parts: list[dict[str, Any]] = []
        self._init_records(fd, path)
        self._mam: dict[str, Any] = {}
        self.bytes_written = 0  # logical bytes written since open
        self.bytes_read = 0

    def _init_records(self, fd: int, directory: Path) -> None:
        """Fresh record state (`_PARTITION_STATE`) of the partition whose files are in
        `directory`, data file open as `fd`; `_recover` fills it in."""
        self._fd = fd
        self._dir = directory
        self._epoch = 0
        self._data_version = FORMAT_VERSION
        self._stride = INDEX_STRIDE
        self._count = 0  # objects on the cartridge; EOD is object `_count`
        self._end = FILE_HEADER_SIZE  # file offset of EOD
        self._sparse = array("Q")  # _sparse[k] = file offset of object k * stride
        self._filemarks = array("Q")  # sorted object ids of filemarks
        self._cursor = (0, FILE_HEADER_SIZE)  # one known (object, offset) pair
        # on-disk index coverage: objects, sparse entries, filemarks, running CRCs
        self._indexed = 0
        self._indexed_sparse = 0
        self._indexed_fms = 0
        self._sparse_crc = 0
        self._fm_crc = 0
        self._dirty = False  # appended since the last sync
        self._unsynced_bytes = 0

    # ------------------------------------------------------------------------------------------
    # Creation and opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        barcode: str,
        *,
        capacity: int | None = None,
        generation: int | None = None,
        worm: bool | None = None,
        early_warning: int | None = None,
        write_protected: bool = False,
    ) -> None:
        """Create an empty (blank) cartridge directory at `path`; raises FileExistsError if present.

        The media type comes from the barcode (`parse_barcode`); `generation`/`worm` override it.
        `capacity` defaults to the generation's native capacity (files grow only as written).
        """
        media = parse_barcode(barcode)
        kind = media.kind
        gen = generation if generation is not None else media.generation
        if worm is not None and kind is not MediumKind.CLEANING:
            kind = MediumKind.WORM if worm else MediumKind.DATA
        if gen is None:
            gen = max(GENERATIONS)
        if gen not in GENERATIONS:
            raise ValueError(f"generation {gen}: expected one of {sorted(GENERATIONS)}")
        cap = capacity if capacity is not None else GENERATIONS[gen].capacity
        if cap <= 0:
            raise ValueError(f"capacity {cap}: expected > 0")
        ew = early_warning if early_warning is not None else _default_early_warning(cap)
        p = Path(path)
        meta = {
            "format": FORMAT_VERSION,
            "barcode": barcode,
            "kind": kind.value,
            "generation": gen,
            "capacity": cap,
            "early_warning": ew,
            "write_protected": write_protected,
        }
        check_meta(p / META_FILE, meta)  # never write what `open` would refuse
        if p.exists():
            raise FileExistsError(f"{p} exists")
        make_private_dirs(p)
        _create_data_file(p)
        _atomic_write_json(p / MAM_FILE, {"attributes": {}, "load_count": 0,
                                          "mb_written": 0, "mb_read": 0})
        _atomic_write_json(p / META_FILE, meta)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> Cartridge:
        """Open and recover a cartridge: finds the end of data, cuts off a torn tail.

        Opening for writing takes an exclusive lock (`CartridgeBusy` if another holder has it)
        and truncates any torn tail left by a crash. A malformed meta.json, mam.json or data file
        header is a `StateFileError` naming the file, key, value and expectation (checked before
        anything is changed); a missing mam.json is an empty cartridge memory.
        """
        p = Path(path)
        meta = check_meta(p / META_FILE, read_json(p / META_FILE, "a cartridge's meta.json"))
        try:
            mam = check_mam(p / MAM_FILE, read_json(p / MAM_FILE, "a cartridge's mam.json"))
        except FileNotFoundError:
            mam = {"attributes": {}}
        fd = os.open(p / DATA_FILE, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            if not read_only:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise CartridgeBusy(f"{p}: in use") from None
            cart = cls(p, meta, fd, read_only)
            cart._mam = mam
            cart._recover()
        except BaseException:
            os.close(fd)
            raise
        try:
            for i in range(1, len(meta.get("partitions", (0,)))):
                cart._open_partition(i)
            cart.select_partition(0)
            if not read_only:  # the only writer of the sidecars now (it holds the lock)
                for name in (META_FILE, MAM_FILE):
                    remove_stale_temporaries(p / name)
                cart._remove_stale_partitions()
        except BaseException:
            cart._close_fds()
            raise
        return cart

    def _open_partition(self, i: int) -> None:
        """Open and recover partition `i` (>= 1) as the next one and make it active."""
        directory = self.path / PARTITION_DIR.format(i)
        fd = os.open(directory / DATA_FILE,
                     (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._save_partition()
        self._part = len(self._parts)
        self._parts.append({})
        self._init_records(fd, directory)  # from now on `_close_fds` closes `fd`
        if not self.read_only:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CartridgeBusy(f"{directory}: in use") from None
        self._recover()

    def _remove_stale_partitions(self) -> None:
        """Delete partition directories the layout does not list (left by an interrupted
        FORMAT MEDIUM that went to fewer partitions, see the module doc)."""
        for i in range(self.partition_count, MAX_PARTITIONS):
            stale = self.path / PARTITION_DIR.format(i)
            if stale.exists():
                log.warning("%s: removing %s, not in the partition layout", self.path, stale.name)
                shutil.rmtree(stale)

    # ------------------------------------------------------------------------------------------
    # Partitions

    def _save_partition(self) -> None:
        if not self._parts:
            self._parts.append({})
        self._parts[self._part] = {k: getattr(self, k) for k in _PARTITION_STATE}

    def select_partition(self, n: int) -> None:
        """Make partition `n` the one every record operation (read, append, truncate, counts,
        filemarks, early warning, sync of the index) applies to. IndexError if there is none."""
        if not 0 <= n < self.partition_count:
            raise IndexError(n)
        if n == self._part:
            return
        self._save_partition()
        for k, v in self._parts[n].items():
            setattr(self, k, v)
        self._part = n

    @property
    def partition(self) -> int:
        """The active partition."""
        return self._part

    @property
    def partition_count(self) -> int:
        return len(self._meta.get("partitions", (0,)))

    @property
    def partition_sizes(self) -> list[int]:
        """Bytes of each partition (one partition: the capacity)."""
        return list(self._meta.get("partitions", [self.medium_capacity]))

    @property
    def medium_capacity(self) -> int:
        """Bytes of the whole cartridge (all partitions)."""
        return int(self._meta["capacity"])

    def _each_partition(self) -> Iterator[int]:
        """Make each partition active in turn (yielding its number), then the one that was."""
        was = self._part
        try:
            for i in range(len(self._parts) or 1):
                self.select_partition(i)
                yield i
        finally:
            self.select_partition(was)

    def partition_figures(self) -> list[tuple[int, int]]:
        """(remaining, capacity) bytes of each partition, in order (`remaining`, `capacity` of
        each made active in turn; the active one stays so)."""
        return [(self.remaining, self.capacity) for _ in self._each_partition()]

    def format(self, sizes: Sequence[int]) -> None:
        """FORMAT MEDIUM: erase everything and lay out `sizes` (bytes per partition; one entry
        or none: a single partition of the whole capacity). Partition 0 is active afterwards.

        Order (see the module doc): every partition emptied (durable), the directories of new
        partitions created blank (durable), then meta.json replaced atomically, then the
        directories the new layout does not list removed. A crash leaves the old or the new
        layout, each partition of it an openable, possibly emptied, cartridge.
        """
        self._check_writable()
        sizes = list(sizes)
        if len(sizes) <= 1:
            sizes = []
        elif not (len(sizes) <= MAX_PARTITIONS and all(n > 0 for n in sizes)
                  and sum(sizes) <= self.medium_capacity):
            raise ValueError(f"partition sizes {sizes}: expected 2..{MAX_PARTITIONS} sizes > 0"
                             f" within {self.medium_capacity}")
        for _ in self._each_partition():
            self.truncate(0)
        self.select_partition(0)
        old = len(self._parts) or 1
        for i in range(old, len(sizes)):
            directory = self.path / PARTITION_DIR.format(i)
            if directory.exists():  # stale, from an interrupted format
                shutil.rmtree(directory)
            make_private_dirs(directory)
            _create_data_file(directory)
        meta = {k: v for k, v in self._meta.items() if k != "partitions"}
        if sizes:
            meta.update(format=META_VERSION_PARTITIONED, partitions=sizes)
        else:
            meta["format"] = FORMAT_VERSION
        check_meta(self.path / META_FILE, meta)
        _atomic_write_json(self.path / META_FILE, meta)
        self._meta = meta
        # The new partitions' state; the ones beyond the layout are closed and removed.
        self._save_partition()
        for i in range(len(sizes) or 1, old):
            os.close(self._parts[i]["_fd"])
        del self._parts[len(sizes) or 1 :]
        for i in range(old, len(sizes)):
            self._open_partition(i)
        self.select_partition(0)
        if len(self._parts) == 1:
            self._parts = []
        self._remove_stale_partitions()

    def _recover(self) -> None:
        self._epoch, intact, self._data_version = _read_file_header(
            os.pread(self._fd, FILE_HEADER_SIZE, 0), self._dir / DATA_FILE
        )
        size = os.fstat(self._fd).st_size
        if intact:
            self._load_index(size)
        else:
            log.warning("%s: data file header fails its CRC (torn by a crash during an "
                        "overwrite?): scanning the records", self._dir / DATA_FILE)
        pos, n = self._end, self._count
        while True:
            rec = self._scan_one(pos, n, size, check_payload=True)
            if rec is None:
                break
            kind, end = rec
            self._note_record(n, pos, kind)
            pos, n = end, n + 1
            self._count, self._end = n, pos
        self._cursor = (self._count, self._end)
        if pos < size and not self.read_only:
            # A torn tail (crash during a write): cut it so appends start at a clean boundary.
            os.ftruncate(self._fd, pos)
            os.fdatasync(self._fd)
        if not intact and not self.read_only:
            # A new epoch that differs from the index's, so that index is never adopted, and the
            # header made whole and durable before anything is appended.
            claimed = _index_epoch(self._dir)
            self._epoch = ((self._epoch if claimed is None else claimed) + 1) & ((1 << 64) - 1)
            os.pwrite(self._fd, _pack_file_header(self._epoch, self._data_version), 0)
            os.fdatasync(self._fd)
            self._write_index_header()

    def _note_record(self, obj: int, offset: int, kind: int) -> None:
        """Index bookkeeping for a record appended (or found) at the end."""
        if obj % self._stride == 0:
            self._sparse.append(offset)
        if kind == RecordType.FILEMARK:
            self._filemarks.append(obj)

    def _scan_one(
        self, pos: int, expect: int, size: int, *, check_payload: bool
    ) -> tuple[int, int] | None:
        """Verify the record at `pos` (must be object `expect`); (type, end offset) or None."""
        if pos + RECORD_HEADER_SIZE > size:
            return None
        hdr = _parse_record_header(os.pread(self._fd, RECORD_HEADER_SIZE, pos))
        if hdr is None:
            return None
        kind, flags, obj, stored, _logical, crc = hdr
        end = pos + RECORD_HEADER_SIZE + stored
        if obj != expect or end > size:
            return None
        if check_payload:
            payload = os.pread(self._fd, stored, pos + RECORD_HEADER_SIZE) if stored else b""
            if len(payload) != stored or payload_checksum((payload,), flags) != crc:
                return None
        return kind, end

    def _load_index(self, size: int) -> None:
        """Adopt the on-disk index if it verifies; otherwise start from an empty one."""
        try:
            raw = (self._dir / INDEX_FILE).read_bytes()
            fm_raw = (self._dir / FILEMARKS_FILE).read_bytes()
        except FileNotFoundError:
            return
        if len(raw) < INDEX_HEADER_SIZE:
            return
        magic, version, stride, epoch, count, end, crc, fm_count, fm_crc = (
            _INDEX_HEADER.unpack_from(raw)
        )
        n_sparse = -(-count // stride) if stride else 0
        body = memoryview(raw)[INDEX_HEADER_SIZE : INDEX_HEADER_SIZE + 8 * n_sparse]
        fm_body = memoryview(fm_raw)[: 8 * fm_count]
        if (
            magic != INDEX_MAGIC
            or version != FORMAT_VERSION
            or stride != self._stride
            or epoch != self._epoch
            or len(body) != 8 * n_sparse
            or len(fm_body) != 8 * fm_count
            or zlib.crc32(body) != crc
            or zlib.crc32(fm_body) != fm_crc
            or end > size
        ):
            return
        sparse, fms = array("Q"), array("Q")
        sparse.frombytes(body)
        fms.frombytes(fm_body)
        if sys.byteorder == "little":
            sparse.byteswap()
            fms.byteswap()
        if count and sparse[0] != FILE_HEADER_SIZE:
            return
        # The records from the last sparse entry must walk exactly to `end`.
        obj, pos = 0, FILE_HEADER_SIZE
        if count:
            obj, pos = (n_sparse - 1) * stride, sparse[-1]
        while obj < count:
            # Headers only, except the last record's payload: the one a torn write could hit.
            rec = self._scan_one(pos, obj, size, check_payload=obj == count - 1)
            if rec is None:
                return
            pos, obj = rec[1], obj + 1
        if pos != end:
            return
        self._sparse, self._filemarks = sparse, fms
        self._count, self._end = count, end
        self._indexed, self._indexed_sparse, self._indexed_fms = count, n_sparse, fm_count
        self._sparse_crc, self._fm_crc = crc, fm_crc

    def offset_of(self, obj: int) -> int:
        """File offset of object `obj` (`object_count` gives EOD). CorruptRecord if unreadable."""
        if obj == self._count:
            return self._end
        if not 0 <= obj < self._count:
            raise IndexError(obj)
        cur_obj, cur_off = self._cursor
        if cur_obj == obj:
            return cur_off
        base = obj - obj % self._stride
        if base <= cur_obj < obj:
            at, pos = cur_obj, cur_off  # walk on from the cursor (sequential access)
        else:
            at, pos = base, self._sparse[base // self._stride]
        while at < obj:
            hdr = _parse_record_header(os.pread(self._fd, RECORD_HEADER_SIZE, pos))
            if hdr is None or hdr[2] != at:
                raise CorruptRecord(f"{self.barcode}: object {at}: header")
            pos += RECORD_HEADER_SIZE + hdr[3]
            at += 1
        self._cursor = (obj, pos)
        return pos

    # ------------------------------------------------------------------------------------------
    # Properties

    @property
    def barcode(self) -> str:
        return str(self._meta["barcode"])

    @property
    def media(self) -> MediaType:
        kind = MediumKind(self._meta["kind"])
        gen = None if kind is MediumKind.CLEANING else int(self._meta["generation"])
        return MediaType(kind, gen)

    @property
    def generation(self) -> int:
        return int(self._meta["generation"])

    @property
    def worm(self) -> bool:
        return self._meta["kind"] == MediumKind.WORM.value

    @property
    def cleaning(self) -> bool:
        return self._meta["kind"] == MediumKind.CLEANING.value

    @property
    def capacity(self) -> int:
        """Bytes of records (headers included) the active partition holds before its physical
        end (the cartridge's capacity when it has one partition)."""
        sizes = self._meta.get("partitions")
        return int(sizes[self._part]) if sizes else int(self._meta["capacity"])

    def _room(self) -> tuple[int, int]:
        """(physical end, early-warning point) in `used` coordinates, as of now.

        The end is the capacity or, when it comes first, the backing filesystem's room: what is
        used plus what the filesystem has free, less `BACKING_RESERVE` (so the index, filemarks
        cache and sidecars still fit after the last record). Its early-warning zone is the
        cartridge's, but no larger than a filesystem of that size would have as a cartridge
        (`_default_early_warning`): on a small filesystem the warning must leave room to write.
        """
        end = self.capacity
        ew_point = end - self.early_warning_size
        try:
            free, total = backing_space(self.path)
        except OSError as exc:  # no probe: the capacity rules; ENOSPC still ends the medium
            log.warning("%s: free space unknown: %s", self.path, exc)
            return end, ew_point
        fs_end = self.used + free - BACKING_RESERVE
        fs_ew = min(self.early_warning_size, filesystem_early_warning(total))
        return max(min(end, fs_end), 0), min(ew_point, fs_end - fs_ew)

    @property
    def end_of_medium(self) -> int:
        """Bytes of records the cartridge can hold now: its capacity, or less if the backing
        filesystem has less room (see `_room`)."""
        return self._room()[0]

    @property
    def data_capacity(self) -> int:
        """Where data blocks stop: the end of medium less the filemark reserve."""
        return max(self.end_of_medium - FILEMARK_RESERVE, 0)

    @property
    def early_warning_size(self) -> int:
        ew = int(self._meta["early_warning"])
        if "partitions" in self._meta:  # a partition's zone is at most what its size gives
            ew = min(ew, _default_early_warning(self.capacity))
        return ew

    @property
    def write_protected(self) -> bool:
        return bool(self._meta.get("write_protected", False))

    def set_write_protected(self, value: bool) -> None:
        """Flip the write-protect tab (persisted atomically)."""
        self._meta = {**self._meta, "write_protected": value}
        _atomic_write_json(self.path / META_FILE, self._meta)

    @property
    def object_count(self) -> int:
        """Logical objects (blocks + filemarks) on the cartridge; EOD is at this object id."""
        return self._count

    @property
    def filemarks(self) -> Sequence[int]:
        """Object ids of filemarks, ascending (read-only view; do not modify)."""
        return self._filemarks

    def used_at(self, obj: int) -> int:
        """Bytes of medium used before object `obj` (its physical position)."""
        return self.offset_of(obj) - FILE_HEADER_SIZE

    @property
    def used(self) -> int:
        return self._end - FILE_HEADER_SIZE

    @property
    def remaining(self) -> int:
        """Bytes left before the end of medium (the backing filesystem's room included)."""
        return max(self.end_of_medium - self.used, 0)

    def in_early_warning(self, obj: int | None = None) -> bool:
        """Whether object `obj` (default: EOD) lies in the early-warning zone before the end
        (of the capacity or of the backing filesystem's room, whichever is nearer)."""
        used = self.used if obj is None else self.used_at(obj)
        return used >= self._room()[1]

    def is_filemark(self, obj: int) -> bool:
        i = bisect.bisect_left(self._filemarks, obj)
        return i < len(self._filemarks) and self._filemarks[i] == obj

    def filemarks_before(self, obj: int) -> int:
        """Number of filemarks among objects 0..obj-1 (the logical file identifier at `obj`)."""
        return bisect.bisect_left(self._filemarks, obj)

    # ------------------------------------------------------------------------------------------
    # Reading

    def read(
        self, obj: int, into: Sequence[memoryview], *, policy: ReadPolicy | None = None
    ) -> tuple[RecordType, int]:
        """Copy object `obj`'s data into `into` (as much as fits); return (type, length).

        `policy` decides for data records (see `ReadPolicy`; it may raise, before anything is
        read): an encrypted record is decrypted with the key it returns, or returned as stored
        (the envelope; the length is then the stored one) when it returns None or there is no
        policy. Raises IndexError past EOD, CorruptRecord if the record fails its checksums,
        DecryptionFailed if its tag does not verify.
        """
        if not 0 <= obj < self.object_count:
            raise IndexError(obj)
        start = self.offset_of(obj)
        hdr = _parse_record_header(os.pread(self._fd, RECORD_HEADER_SIZE, start))
        if hdr is None or hdr[2] != obj:
            raise CorruptRecord(f"{self.barcode}: object {obj}: header")
        kind, flags, _obj, stored, logical, crc = hdr
        encrypted = bool(flags & FLAG_ENCRYPTED) and kind == RecordType.DATA
        if kind == RecordType.DATA and not encrypted and policy is not None:
            policy(None)
        if (kind == RecordType.DATA and stored and not flags & (FLAG_ZLIB | FLAG_ENCRYPTED)
                and stored == logical):
            # Uncompressed: read straight into the caller's buffers (what does not fit goes to
            # a scratch buffer, for the checksum), no intermediate copy.
            bufs = slice_views(into, 0, stored)
            room = stored - sum(map(len, bufs))
            if room:
                bufs.append(memoryview(bytearray(room)))
            got = os.preadv(self._fd, bufs, start + RECORD_HEADER_SIZE)
            if got != stored or payload_checksum(bufs, flags) != crc:
                raise CorruptRecord(f"{self.barcode}: object {obj}: payload checksum")
            self._cursor = (obj + 1, start + RECORD_HEADER_SIZE + stored)
            self.bytes_read += logical
            return RecordType.DATA, logical
        payload = os.pread(self._fd, stored, start + RECORD_HEADER_SIZE) if stored else b""
        if len(payload) != stored or payload_checksum((payload,), flags) != crc:
            raise CorruptRecord(f"{self.barcode}: object {obj}: payload checksum")
        self._cursor = (obj + 1, start + RECORD_HEADER_SIZE + stored)
        if kind == RecordType.FILEMARK:
            return RecordType.FILEMARK, 0
        if encrypted:
            env = Envelope.parse(payload)
            if env is None:
                raise CorruptRecord(f"{self.barcode}: object {obj}: encryption envelope")
            key = policy(env) if policy is not None else None
            if key is None:  # the stored bytes, as a drive's RAW decryption mode returns them
                flags, logical = 0, stored
            else:
                try:
                    payload = key.unseal(env, obj, payload, compressed=bool(flags & FLAG_ZLIB))
                except InvalidTag:
                    raise DecryptionFailed(
                        f"{self.barcode}: object {obj}: authentication tag") from None
        data: Buffer = zlib.decompress(payload) if flags & FLAG_ZLIB else payload
        if len(data) != logical:
            raise CorruptRecord(f"{self.barcode}: object {obj}: length {len(data)} != {logical}")
        src = memoryview(data)
        pos = 0
        for buf in into:
            if pos >= logical:
                break
            take = min(len(buf), logical - pos)
            buf[:take] = src[pos : pos + take]
            pos += take
        self.bytes_read += logical
        return RecordType.DATA, logical

    def next_object(self, obj: int) -> tuple[str, Envelope | None]:
        """What object `obj` is, without reading its data: ("eod", None), ("filemark", None),
        ("data", envelope or None when clear), or ("unknown", None) if it does not verify."""
        if obj >= self.object_count:
            return "eod", None
        try:
            start = self.offset_of(obj)
        except CorruptRecord:
            return "unknown", None
        hdr = _parse_record_header(os.pread(self._fd, RECORD_HEADER_SIZE, start))
        if hdr is None or hdr[2] != obj:
            return "unknown", None
        kind, flags, _obj, stored, _logical, _crc = hdr
        if kind == RecordType.FILEMARK:
            return "filemark", None
        if not flags & FLAG_ENCRYPTED:
            return "data", None
        prefix = os.pread(self._fd, min(stored, ENVELOPE_OVERHEAD), start + RECORD_HEADER_SIZE)
        env = Envelope.parse(prefix)
        return ("data", env) if env is not None else ("unknown", None)

    @property
    def data_version(self) -> int:
        """The data file header's version (`DATA_VERSIONS`)."""
        return self._data_version

    # ------------------------------------------------------------------------------------------
    # Writing

    def _upgrade_for_encryption(self) -> None:
        """Make the data file header version 2 durable before an encrypted record is written."""
        if self._data_version >= DATA_VERSION_ENCRYPTED:
            return
        os.pwrite(self._fd, _pack_file_header(self._epoch, DATA_VERSION_ENCRYPTED), 0)
        os.fdatasync(self._fd)
        self._data_version = DATA_VERSION_ENCRYPTED

    def _check_writable(self) -> None:
        if self.read_only:
            raise CartridgeError(f"{self.barcode}: opened read-only")

    def truncate(self, obj: int) -> None:
        """Make object `obj` the end of data, discarding `obj..` (durable on return).

        Cheap no-op when `obj` already is EOD.
        """
        self._check_writable()
        if not 0 <= obj <= self.object_count:
            raise IndexError(obj)
        if obj == self.object_count:
            return
        end = self.offset_of(obj)
        # New epoch first, so an index written for the old contents can never be adopted again.
        self._epoch += 1
        os.pwrite(self._fd, _pack_file_header(self._epoch, self._data_version), 0)
        os.ftruncate(self._fd, end)
        os.fdatasync(self._fd)
        self._count, self._end = obj, end
        self._cursor = (obj, end)
        del self._sparse[-(-obj // self._stride) :]
        del self._filemarks[bisect.bisect_left(self._filemarks, obj) :]
        if self._indexed > obj:
            self._indexed = obj
            self._indexed_sparse = len(self._sparse)
            self._indexed_fms = len(self._filemarks)
            self._sparse_crc = zlib.crc32(_be(self._sparse))
            self._fm_crc = zlib.crc32(_be(self._filemarks))
        self._write_index_header()
        self._dirty = False
        self._unsynced_bytes = 0

    def append(
        self,
        kind: RecordType,
        payloads: Iterable[Sequence[Buffer]],
        *,
        compress: bool = False,
        seal: Sealer | None = None,
    ) -> None:
        """Append one record per entry of `payloads` (each a list of buffers) at end of data.

        With `seal`, data records are stored encrypted: the payload is what `seal` makes of the
        (compressed) data, after the header became version 2 (see the module doc).

        Filemarks take empty payload lists. Stops before the first record that would cross the
        end of medium (`data_capacity` for data) and raises CartridgeFull(written); a backing
        filesystem that fills up during the call (ENOSPC, EDQUOT) keeps none of the call's
        records and raises CartridgeFull(0). Not durable until `sync()`.
        """
        self._check_writable()
        if seal is not None and kind == RecordType.DATA:
            self._upgrade_for_encryption()
        else:
            seal = None
        base = (self._count, self._end, len(self._sparse), len(self._filemarks))
        base_written = self.bytes_written
        try:
            written, full = self._append(kind, payloads, compress, seal)
        except BaseException as exc:
            # Roll back: forget the records of this call and cut whatever reached the file, so
            # stale bytes past EOD can never be mistaken for records at recovery.
            self._count, self._end = base[0], base[1]
            del self._sparse[base[2] :]
            del self._filemarks[base[3] :]
            self._cursor = (self._count, self._end)
            self.bytes_written = base_written
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
                # The backing filesystem filled up under us (another writer took the room the
                # probe saw): the end of medium, not a damaged cartridge. Nothing of this call
                # is kept, everything before it is intact.
                log.warning("%s: backing filesystem full: %s", self.path, exc)
                raise CartridgeFull(0) from exc
            raise
        if written:
            self._dirty = True
            self._cursor = (self._count, self._end)
            if self._unsynced_bytes >= SYNC_INTERVAL:
                self.sync()
        if full:
            raise CartridgeFull(written)

    def append_filemarks(self, count: int) -> None:
        """Append `count` filemarks at end of data, at a cost bounded by what is written.

        Each filemark is one record header and may use the whole room (`end_of_medium`, not only
        `data_capacity`), so how many fit is known before writing: only those are generated
        (no list of `count` entries: WRITE FILEMARKS may ask for 2^24 - 1), then
        CartridgeFull(written) if some did not fit. The records are those `append` writes.
        """
        fit = min(count, self.remaining // RECORD_HEADER_SIZE)
        if fit:
            self.append(RecordType.FILEMARK, itertools.repeat((), fit))
        if fit < count:
            raise CartridgeFull(fit)

    def _append(
        self, kind: RecordType, payloads: Iterable[Sequence[Buffer]], compress: bool,
        seal: Sealer | None,
    ) -> tuple[int, bool]:
        iov: list[Buffer] = []
        pending = 0  # bytes in iov
        pos = self._end
        written = 0
        full = False
        end = self.end_of_medium  # one probe of the backing filesystem per call
        for parts in payloads:
            logical = sum(map(len, parts))
            if logical > MAX_RECORD:
                raise ValueError(f"record of {logical} bytes exceeds {MAX_RECORD}")
            flags = 0
            stored_parts: Sequence[Buffer] = parts
            if compress and kind == RecordType.DATA and logical:
                packed = zlib.compress(b"".join(parts), 1)
                if len(packed) < logical:
                    stored_parts, flags = (packed,), FLAG_ZLIB
            if seal is not None:
                plain = b"".join(stored_parts)
                stored_parts = (seal(self._count, plain, bool(flags & FLAG_ZLIB)),)
                flags |= FLAG_ENCRYPTED
            stored = sum(map(len, stored_parts))
            limit = end if kind == RecordType.FILEMARK else end - FILEMARK_RESERVE
            if pos + RECORD_HEADER_SIZE + stored - FILE_HEADER_SIZE > limit:
                full = True
                break
            if stored:
                flags |= FLAG_XXH64
            crc = payload_checksum(stored_parts, flags)
            n = self._count
            iov.append(_pack_record_header(kind, flags, n, stored, logical, crc))
            iov.extend(filter(len, stored_parts))
            self._note_record(n, pos, kind)
            pos += RECORD_HEADER_SIZE + stored
            pending += RECORD_HEADER_SIZE + stored
            self._count, self._end = n + 1, pos
            self.bytes_written += logical
            self._unsynced_bytes += RECORD_HEADER_SIZE + stored
            written += 1
            if len(iov) >= _IOV_MAX:
                self._flush_iov(iov, pos - pending)
                pending = 0
        self._flush_iov(iov, pos - pending)
        return written, full

    def _flush_iov(self, iov: list[Buffer], start: int) -> None:
        """Write the gathered iovecs at file offset `start`; clears `iov`."""
        if not iov:
            return
        total = sum(map(len, iov))
        done = 0
        while done < total:
            n = os.pwritev(self._fd, iov, start + done)
            done += n
            if done < total:  # short write: drop what went out and retry the rest
                iov[:] = skip(iov, n)
        iov.clear()

    def sync(self) -> None:
        """Make everything appended durable in every partition, then checkpoint their indexes
        (not themselves fsynced)."""
        if self.read_only:
            return
        if not self._parts:
            self._sync_active()
            return
        for _ in self._each_partition():
            self._sync_active()

    def _sync_active(self) -> None:
        if self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False
            self._unsynced_bytes = 0
        if self._count == self._indexed:
            return
        try:
            self._checkpoint_index()
        except OSError as exc:
            if exc.errno not in NO_ROOM_ERRNOS:
                raise
            # The data is durable; the index is a cache the next open rebuilds by scanning
            # (the header on disk still describes what it covers).
            log.warning("%s: index not checkpointed, backing filesystem full: %s",
                        self.path, exc)

    def _checkpoint_index(self) -> None:
        """Append the index entries and filemarks since the last checkpoint, then the header."""
        new_sparse = _be(self._sparse[self._indexed_sparse :])
        new_fms = _be(self._filemarks[self._indexed_fms :])
        fd = os.open(self._dir / FILEMARKS_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            os.pwrite(fd, new_fms, 8 * self._indexed_fms)
        finally:
            os.close(fd)
        fd = os.open(self._dir / INDEX_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            os.pwrite(fd, new_sparse, INDEX_HEADER_SIZE + 8 * self._indexed_sparse)
            self._sparse_crc = zlib.crc32(new_sparse, self._sparse_crc)
            self._fm_crc = zlib.crc32(new_fms, self._fm_crc)
            self._indexed = self._count
            self._indexed_sparse = len(self._sparse)
            self._indexed_fms = len(self._filemarks)
            os.pwrite(fd, self._index_header(), 0)
        finally:
            os.close(fd)

    def _index_header(self) -> bytes:
        end = self._end if self._indexed == self._count else self.offset_of(self._indexed)
        return _INDEX_HEADER.pack(
            INDEX_MAGIC, FORMAT_VERSION, self._stride, self._epoch, self._indexed, end,
            self._sparse_crc, self._indexed_fms, self._fm_crc,
        )

    def _write_index_header(self) -> None:
        path = self._dir / INDEX_FILE
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self._dir / FILEMARKS_FILE, 8 * self._indexed_fms)
        try:
            os.ftruncate(fd, INDEX_HEADER_SIZE + 8 * self._indexed_sparse)
            os.pwrite(fd, self._index_header(), 0)
            # Durable now (overwrites are rare): otherwise a crash would leave an index of the
            # old epoch and force a full scan at the next open.
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------------
    # Cartridge memory (MAM)

    @property
    def mam_attributes(self) -> dict[int, tuple[int, bytes]]:
        """Host-written MAM attributes: id -> (format, value)."""
        return {
            int(k, 16): (int(v["format"]), bytes.fromhex(v["value"]))
            for k, v in self._mam.get("attributes", {}).items()
        }

    def set_mam_attributes(self, attrs: dict[int, tuple[int, bytes] | None]) -> None:
        """Set (or with None delete) host attributes, all or nothing, persisted atomically."""
        cur = dict(self._mam.get("attributes", {}))
        for ident, val in attrs.items():
            key = f"{ident:04X}"
            if val is None:
                cur.pop(key, None)
            else:
                cur[key] = {"format": val[0], "value": val[1].hex()}
        mam = {**self._mam, "attributes": cur}
        _atomic_write_json(self.path / MAM_FILE, mam)  # first: a failed write changes nothing
        self._mam = mam

    def mam_counter(self, name: str) -> int:
        """Life counters kept in the MAM sidecar: load_count, mb_written, mb_read."""
        return int(self._mam.get(name, 0))

    def record_load(self) -> None:
        """Count one load (MAM LOAD COUNT), persisted."""
        self._mam = {**self._mam, "load_count": self.mam_counter("load_count") + 1}
        _atomic_write_json(self.path / MAM_FILE, self._mam)

    def _persist_counters(self) -> None:
        if self.read_only or not (self.bytes_written or self.bytes_read):
            return
        self._mam = {
            **self._mam,
            "mb_written": self.mam_counter("mb_written") + self.bytes_written // 1_000_000,
            "mb_read": self.mam_counter("mb_read") + self.bytes_read // 1_000_000,
        }
        self.bytes_written = self.bytes_read = 0
        _atomic_write_json(self.path / MAM_FILE, self._mam)

    # ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Sync and release. Idempotent."""
        if self._fd < 0:
            return
        try:
            self.sync()
            self._persist_counters()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        """Close every partition's data file (after a failed open too)."""
        if self._parts:
            self._save_partition()
        fds = [part["_fd"] for part in self._parts] or [self._fd]
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        for part in self._parts:
            part["_fd"] = -1
        self._fd = -1

    def __enter__(self) -> Cartridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _be(values: array[int]) -> bytes:
    """The big-endian bytes of an array of unsigned 64-bit values."""
    out = array("Q", values)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def dump(path: str | os.PathLike[str], partition: int = 0) -> Iterator[DumpEntry]:
    """Every valid record of `partition` of the cartridge at `path`, scanning the data file
    (not the index).

    Stops at the end of data (first record that does not verify). Read-only; safe on a cartridge
    that a drive has open. IndexError if there is no such partition.
    """
    with Cartridge.open(path, read_only=True) as cart:
        cart.select_partition(partition)
        start = FILE_HEADER_SIZE
        for i in range(cart.object_count):
            hdr = _parse_record_header(os.pread(cart._fd, RECORD_HEADER_SIZE, start))
            if hdr is None:
                return
            kind, flags, _obj, stored, logical, _crc = hdr
            yield DumpEntry(i, RecordType(kind), start, stored, logical, bool(flags & FLAG_ZLIB),
                            bool(flags & FLAG_ENCRYPTED))
            start += RECORD_HEADER_SIZE + stored


def format_dump(path: str | os.PathLike[str]) -> Iterator[str]:
    """Human-readable `dump`: one line per run of equal-sized blocks (encrypted ones marked), one
    per filemark, then EOD; of each partition, after a heading line when there are several."""
    with Cartridge.open(path, read_only=True) as cart:
        sizes = cart.partition_sizes
    for i, size in enumerate(sizes):
        if len(sizes) > 1:
            yield f"partition {i} ({size} bytes)"
        yield from _format_partition(path, i)


def _format_partition(path: str | os.PathLike[str], partition: int) -> Iterator[str]:
    run_start = run_len = run_size = 0
    run_stored = 0
    run_encrypted = False
    total = 0
    last = -1

    def flush() -> Iterator[str]:
        if run_len:
            yield (
                f"{run_start:>12}  {run_len} block(s) x {run_size} bytes"
                f" ({run_stored} stored{', encrypted' if run_encrypted else ''})"
            )

    for e in dump(path, partition):
        last = e.object_id
        total += e.logical_length
        if e.kind == RecordType.FILEMARK:
            yield from flush()
            run_len = 0
            yield f"{e.object_id:>12}  filemark"
            continue
        if run_len and e.logical_length == run_size and e.encrypted == run_encrypted:
            run_len += 1
            run_stored += e.stored_length
            continue
        yield from flush()
        run_start, run_len, run_size, run_stored = e.object_id, 1, e.logical_length, e.stored_length
        run_encrypted = e.encrypted
    yield from flush()
    yield f"{last + 1:>12}  end of data ({total} data bytes)"
