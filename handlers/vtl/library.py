"""Library state: which cartridge sits in which element, persisted transactionally.

Theory of operation
-------------------
A library is a directory::

    <library>/library.json   the state below (replaced atomically on every change)
    <library>/.lock          flock(2) target: serialises the daemon and `tcmu-py vtl` processes
    <library>/media/<barcode>  one cartridge each (format owned by the drive's cartridge module)

The layout (element address ranges, drives) is fixed at `create`. The state is: the occupant of
every element (barcode, the storage element it last came from, whether the operator put it
there), the PREVENT MEDIUM REMOVAL flag of the import/export elements and which import/export
elements are open. Cartridges in `media/` that sit in no element are "on the shelf" (exported).

Durability rule: every change is computed on a copy, written to a temporary file, fsynced,
renamed over `library.json`, and the directory fsynced; only then does the in-memory state
change. A crash at any instant therefore leaves either the old or the new state on disk, never
a mix, and an acknowledged MOVE MEDIUM is never lost. Leftover temporary files are ignored.
Everything the library creates is private (files 0600, directories 0700: `tcmu_py.statefile`).

Validation rule: library.json is checked whole — layout, drives, every occupant against the
layout — before any of it is used, and a state re-read from another process's write is adopted
(and its identity recorded) only after it passed. A malformed file is a `LibraryStateError`
naming the file, the key, the value and what was expected; while library.json stays malformed,
every operation refuses with it (the changer answers NOT READY, MANUAL INTERVENTION REQUIRED)
and nothing is written over the operator's file.

Sharing: one `Library` object serves the changer and every drive of the library in the daemon
(shared through `tcmu_py.handler.shared`), so methods are thread-safe (one RLock). Another
process (the `tcmu-py vtl` tool) may change the file too: every operation takes the flock and
re-reads the file when its inode changed. Listeners (drive contents, external changes) run after
the locks are released, on the thread that made or noticed the change; they must not block long.

Drive prevent flags are not persisted: PREVENT ALLOW MEDIUM REMOVAL of a drive is cleared by a
power on, which is what a daemon restart is to the initiator (SPC-5 6.18).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tcmu_py.errors import ConfigError, TcmuError
from tcmu_py.handlers.vtl.changer_personality import CHANGER_PERSONALITIES, changer_personality
from tcmu_py.handlers.vtl.statefile import FILE_MODE, Fields, StateFileError, check_serial
from tcmu_py.scsi.sense import (
    ImportExportElementOpen,
    InvalidElementAddress,
    MediumDestinationElementFull,
    MediumRemovalPrevented,
    MediumSourceElementEmpty,
    NotReadyManualIntervention,
)
from tcmu_py.scsi.smc import ELEMENT_TYPES, ElementType, MediumType
from tcmu_py.statefile import make_private_dirs, read_json, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)

STATE_FILE = "library.json"
LOCK_FILE = ".lock"
MEDIA_DIR = "media"
FORMAT = "tcmu-py-vtl-library"
VERSION = 1
#: Largest library.json read: a library of 65536 full elements writes about 6 MiB.
STATE_LIMIT = 32 << 20
#: Drive models are looked up by the drive (personality table); here only their shape is checked.
MODEL_MAX = 64

#: Barcodes (volume identifiers) we accept: they become file names, so no path characters.
#: The one barcode rule (volume identifier, SMC-3 primary volume tag: at most 32 bytes) of the
#: library, its tools and the daemon's YAML loader: `is_barcode` / `check_barcode`.
BARCODE_RE = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,31}")
BARCODE_RULE = "1..32 characters A-Z 0-9 _ - (not starting with _ or -)"

#: Default first element address per type (IBM-like layout, room for 511 drives).
DEFAULT_FIRST_ADDRESS: dict[ElementType, int] = {
    ElementType.MEDIUM_TRANSPORT: 0x0001,
    ElementType.DATA_TRANSFER: 0x0100,
    ElementType.IMPORT_EXPORT: 0x0300,
    ElementType.STORAGE: 0x0400,
}

_TYPE_KEYS = {
    ElementType.MEDIUM_TRANSPORT: "medium_transport",
    ElementType.STORAGE: "storage",
    ElementType.IMPORT_EXPORT: "import_export",
    ElementType.DATA_TRANSFER: "data_transfer",
}

DriveListener = Callable[[str | None], None]


class LibraryError(TcmuError):
    """An operator request cannot be done (the message says why); nothing was changed."""


class LibraryStateError(LibraryError, StateFileError, NotReadyManualIntervention):
    """library.json is malformed: the one-line message names the file, key, value and what was
    expected. A `StateFileError` like every state file's (exit 2 from the command line); a
    `LibraryError` for the operator tools; and, raised from a changer command, 02h/04h/03h
    LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED (SPC-5 4.4.9 table 63): the library
    cannot tell where its cartridges are until someone repairs or restores the file."""

    @classmethod
    def of(cls, exc: StateFileError) -> LibraryStateError:
        return cls(str(exc))


def is_barcode(text: str) -> bool:
    """True if `text` is a barcode the library can hold (`BARCODE_RULE`)."""
    return BARCODE_RE.fullmatch(text) is not None


def check_barcode(barcode: str) -> str:
    """Return `barcode` if it is a valid volume identifier, else raise LibraryError."""
    if not is_barcode(barcode):
        raise LibraryError(f"barcode {barcode!r}: expected {BARCODE_RULE}")
    return barcode


def medium_type_for(barcode: str) -> MediumType:
    """The SMC medium type a barcode announces (LTO labels: CLN* cleaning, L[T-Y] suffix WORM)."""
    if barcode.startswith("CLN"):
        return MediumType.CLEANING
    if len(barcode) >= 2 and barcode[-2] == "L" and barcode[-1] in "TUVWXY":
        return MediumType.WORM
    return MediumType.DATA


@dataclass(frozen=True, slots=True)
class Occupant:
    """A cartridge in an element. `source`: the storage or import/export element it was last
    moved from (SMC-3 SOURCE STORAGE ELEMENT ADDRESS), None if it never moved; `imported`: the
    operator placed it (IMPEXP bit), as opposed to the medium transport."""

    barcode: str
    source: int | None = None
    imported: bool = False


@dataclass(frozen=True, slots=True)
class ChangerIdentity:
    """What the changer LUN answers in standard INQUIRY (SPC-5 6.7.2: ASCII, space padded)."""

    vendor: str = "TCMU-PY"
    product: str = "VTL LIBRARY"
    revision: str = "0100"

    def check(self) -> ChangerIdentity:
        for value, limit, what in (
            (self.vendor, 8, "vendor"),
            (self.product, 16, "product"),
            (self.revision, 4, "revision"),
        ):
            if not value or len(value) > limit or not all(" " <= c <= "~" for c in value):
                raise LibraryError(f"changer {what} {value!r}: 1..{limit} printable ASCII")
        return self


@dataclass(frozen=True, slots=True)
class DriveInfo:
    serial: str
    model: str


@dataclass(slots=True)
class _State:
    contents: dict[int, Occupant] = field(default_factory=dict)
    ie_prevent: bool = False
    ie_open: frozenset[int] = frozenset()
    generation: int = 0

    def copy(self) -> _State:
        return _State(dict(self.contents), self.ie_prevent, self.ie_open, self.generation)

    def same(self, other: _State) -> bool:
        return (self.contents, self.ie_prevent, self.ie_open) == (
            other.contents,
            other.ie_prevent,
            other.ie_open,
        )


class Library:
    """One tape library's elements and what they hold. See the module docstring for the rules."""

    def __init__(
        self,
        path: Path,
        name: str,
        ranges: dict[ElementType, tuple[int, int]],
        drives: list[DriveInfo],
        dvcid: str,
        state: _State,
        file_id: tuple[int, int, int],
        changer: ChangerIdentity | None = None,
        personality: str | None = None,
    ) -> None:
        """Use `create` or `open`."""
        self.path = path
        self.name = name
        self.dvcid = dvcid
        self.changer_identity = changer or ChangerIdentity()
        #: Key of the changer personality the library was created with (`changer_personality`);
        #: None for a library created before personalities existed (it behaves as "tcmu-py").
        self.personality = personality
        self._ranges = dict(ranges)
        self._drives = list(drives)
        self._state = state
        self._lock = threading.RLock()
        self._lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._file_id = file_id
        self._bad_file_id: tuple[int, int, int] | None = None  # last malformed file logged
        self._drive_prevent = [False] * len(drives)
        self._drive_listeners: list[list[DriveListener]] = [[] for _ in drives]
        self._change_listeners: list[Callable[[], None]] = []
        self._types = _element_types(self._ranges)
        self._addresses = sorted(self._types)

    # ------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str,
        drives: list[tuple[str, str]],
        slots: int,
        import_export: int,
        transports: int = 1,
        first_address: dict[ElementType, int] | None = None,
        dvcid: str | None = None,
        changer: ChangerIdentity | None = None,
        personality: str | None = None,
    ) -> Library:
        """Create the library directory (or use an empty existing one) and write library.json.

        `drives` is [(serial, model)] in data transfer element order; `dvcid` selects the device
        identifier READ ELEMENT STATUS reports for drives: "serial" (the drive's unit serial, as
        in its VPD page 80h) or "t10" (T10 vendor ID: vendor, product, serial); `changer` is the
        INQUIRY identity of the changer LUN (some backup software keys on it). `personality`
        names a changer personality (`changer_personality`): its first addresses, identity and
        DVCID form are the defaults of `first_address`, `changer` and `dvcid`, and its key is
        recorded in library.json. Raises ConfigError-like `LibraryError` for a bad layout or an
        unknown personality, and FileExistsError if a library exists.
        """
        root = Path(path)
        pers = None
        if personality is not None:
            try:
                pers = changer_personality(personality)
            except ConfigError as exc:
                raise LibraryError(str(exc)) from None
            personality = pers.key
            first_address = {**pers.first_address, **(first_address or {})}
            changer = changer or ChangerIdentity(pers.vendor, pers.product, pers.revision)
            dvcid = dvcid or pers.dvcid
        dvcid = dvcid or "serial"
        if transports < 1:
            raise LibraryError("a library needs at least one medium transport element")
        if slots < 0 or import_export < 0:
            raise LibraryError("slot counts must not be negative")
        if dvcid not in ("serial", "t10"):
            raise LibraryError(f"dvcid {dvcid!r}: expected 'serial' or 't10'")
        serials = [s for s, _ in drives]
        for i, (serial, model) in enumerate(drives):
            problem = check_serial(serial)
            if problem is not None:
                raise LibraryError(f"drives[{i}].serial {serial!r}: expected {problem}")
            problem = _check_model(model)
            if problem is not None:
                raise LibraryError(f"drives[{i}].model {model!r}: expected {problem}")
        if len(set(serials)) != len(serials):
            raise LibraryError(f"drive serials {serials}: expected unique serials")
        firsts = {**DEFAULT_FIRST_ADDRESS, **(first_address or {})}
        counts = {
            ElementType.MEDIUM_TRANSPORT: transports,
            ElementType.STORAGE: slots,
            ElementType.IMPORT_EXPORT: import_export,
            ElementType.DATA_TRANSFER: len(drives),
        }
        ranges = {t: (firsts[t], counts[t]) for t in ELEMENT_TYPES}
        if any(first == 0 and count and t != ElementType.MEDIUM_TRANSPORT
               for t, (first, count) in ranges.items()):
            # mtx's all-elements scan stops at an element reported with address 0. A transport
            # may have it (StorageTek libraries put their hand there): MOVE MEDIUM's transport
            # address 0, "the default transport", then names that very transport.
            raise LibraryError("element address 0 is reserved for the medium transport; "
                               "first addresses of the other types start at 1")
        _check_ranges(ranges)
        make_private_dirs(root)
        if (root / STATE_FILE).exists():
            raise FileExistsError(f"{root / STATE_FILE} exists; a library is already there")
        make_private_dirs(root / MEDIA_DIR)
        infos = [DriveInfo(s, m) for s, m in drives]
        identity = (changer or ChangerIdentity()).check()
        doc = _document(name, ranges, infos, dvcid, _State(), identity, personality)
        write_json(root / STATE_FILE, doc)
        return cls.open(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Library:
        """Open an existing library. Raises FileNotFoundError or LibraryError (bad file)."""
        root = Path(path)
        # Identify the file before reading it: if another process replaces it in between, the
        # older identity only causes one extra re-read later, never a missed change.
        file_id = _file_identity(root)
        doc = _read_document(root)
        name, ranges, drives, dvcid, changer, personality = _layout_from(root / STATE_FILE, doc)
        state = _state_from(root / STATE_FILE, doc, _element_types(ranges))
        return cls(root, name, ranges, drives, dvcid, state, file_id, changer, personality)

    def close(self) -> None:
        """Release the lock file descriptor. The state is always already on disk."""
        with self._lock:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # ------------------------------------------------------------------------------------------
    # Layout (immutable)

    def ranges(self) -> dict[ElementType, tuple[int, int]]:
        """{element type: (first address, count)} — what mode page 1Dh reports."""
        return dict(self._ranges)

    def addresses(self, element_type: ElementType = ElementType.ALL) -> list[int]:
        """Element addresses of one type (or all), ascending."""
        if element_type == ElementType.ALL:
            return list(self._addresses)
        first, count = self._ranges[element_type]
        return list(range(first, first + count))

    def element_type(self, address: int) -> ElementType:
        """The type of the element at `address`; InvalidElementAddress if there is none."""
        try:
            return self._types[address]
        except KeyError:
            raise InvalidElementAddress(f"no element at address {address:#06x}") from None

    @property
    def drive_count(self) -> int:
        return len(self._drives)

    def drive_address(self, drive_index: int) -> int:
        first, count = self._ranges[ElementType.DATA_TRANSFER]
        if not 0 <= drive_index < count:
            raise IndexError(f"library {self.name} has no drive {drive_index}")
        return first + drive_index

    def drive_index(self, address: int) -> int:
        """Index of the drive at data transfer element `address` (InvalidElementAddress if not)."""
        if self.element_type(address) != ElementType.DATA_TRANSFER:
            raise InvalidElementAddress(f"{address:#06x} is not a data transfer element")
        return address - self._ranges[ElementType.DATA_TRANSFER][0]

    def drive_serial(self, drive_index: int) -> str:
        return self._drives[drive_index].serial

    def drive_model(self, drive_index: int) -> str:
        return self._drives[drive_index].model

    def media_path(self, barcode: str) -> Path:
        """Where the cartridge `barcode` is stored: `<library>/media/<barcode>`."""
        return self.path / MEDIA_DIR / check_barcode(barcode)

    # ------------------------------------------------------------------------------------------
    # Reading the state

    def occupant(self, address: int) -> Occupant | None:
        """What sits in the element (None: empty). InvalidElementAddress for a bad address."""
        self.element_type(address)
        with self._locked():
            return self._state.contents.get(address)

    def contents(self) -> dict[int, Occupant]:
        """A snapshot {address: occupant} of every full element."""
        with self._locked():
            return dict(self._state.contents)

    def drive_barcode(self, drive_index: int) -> str | None:
        """The barcode of the cartridge in drive `drive_index`, None if it is empty."""
        occ = self.occupant(self.drive_address(drive_index))
        return occ.barcode if occ else None

    def locate(self, barcode: str) -> int | None:
        """The element holding `barcode`, None if it is on the shelf or unknown."""
        with self._locked():
            for addr, occ in self._state.contents.items():
                if occ.barcode == barcode:
                    return addr
        return None

    def cartridges(self) -> list[str]:
        """Every cartridge that exists in `media/` (sorted barcodes)."""
        media = self.path / MEDIA_DIR
        return sorted(p.name for p in media.iterdir() if BARCODE_RE.fullmatch(p.name))

    def shelf(self) -> list[str]:
        """Cartridges that exist but sit in no element (exported, or never imported)."""
        placed = {o.barcode for o in self.contents().values()}
        return [b for b in self.cartridges() if b not in placed]

    @property
    def ie_prevented(self) -> bool:
        with self._locked():
            return self._state.ie_prevent

    def ie_is_open(self, address: int) -> bool:
        with self._locked():
            return address in self._state.ie_open

    def drive_prevented(self, drive_index: int) -> bool:
        with self._lock:
            return self._drive_prevent[drive_index]

    # ------------------------------------------------------------------------------------------
    # Listeners

    def add_drive_listener(self, drive_index: int, cb: DriveListener) -> None:
        """Call `cb(barcode or None)` whenever the cartridge in drive `drive_index` changes."""
        self.drive_address(drive_index)
        with self._lock:
            self._drive_listeners[drive_index].append(cb)

    def remove_drive_listener(self, drive_index: int, cb: DriveListener) -> None:
        with self._lock:
            self._drive_listeners[drive_index].remove(cb)

    def add_change_listener(self, cb: Callable[[], None]) -> None:
        """Call `cb()` after the operator changed the library (another process's write, or an
        operator method of this object): what the changer reports as IMPORT/EXPORT ACCESSED."""
        with self._lock:
            self._change_listeners.append(cb)

    def remove_change_listener(self, cb: Callable[[], None]) -> None:
        with self._lock:
            self._change_listeners.remove(cb)

    def refresh(self) -> None:
        """Re-read library.json if another process replaced it (fires listeners)."""
        with self._locked():
            pass

    # ------------------------------------------------------------------------------------------
    # Medium transport operations (what the changer's commands do)

    def set_drive_prevent(self, drive_index: int, prevented: bool) -> None:
        """The drive's PREVENT ALLOW MEDIUM REMOVAL: while set, nothing moves out of it."""
        self.drive_address(drive_index)
        with self._lock:
            self._drive_prevent[drive_index] = prevented

    def move(self, src_addr: int, dst_addr: int) -> None:
        """MOVE MEDIUM (SMC-3) from `src_addr` to `dst_addr`, durably.

        Checks, in this order: both addresses name storage, import/export or data transfer
        elements (InvalidElementAddress); the source is full (MediumSourceElementEmpty); the
        destination is empty (MediumDestinationElementFull); no import/export element involved is
        open
        (ImportExportElementOpen); the source is not a drive whose removal is prevented
        (MediumRemovalPrevented). On any error nothing changed.
        """
        for addr in (src_addr, dst_addr):
            self._check_holder(addr)
        with self._transaction() as state:
            occ = state.contents.get(src_addr)
            if occ is None:
                raise MediumSourceElementEmpty(f"element {src_addr:#06x} is empty")
            if dst_addr in state.contents:
                raise MediumDestinationElementFull(f"element {dst_addr:#06x} is full")
            self._check_open(state, src_addr, dst_addr)
            self._check_prevent(src_addr)
            del state.contents[src_addr]
            state.contents[dst_addr] = self._moved(occ, src_addr)

    def exchange(self, src_addr: int, dst1_addr: int, dst2_addr: int) -> None:
        """EXCHANGE MEDIUM (SMC-3): the medium in `src_addr` goes to `dst1_addr` and the one
        that was in `dst1_addr` goes to `dst2_addr` (which may be `src_addr`), durably.

        Errors as for `move`; `src_addr == dst1_addr` is InvalidElementAddress; an empty first
        destination is MediumSourceElementEmpty (its medium is the second move's source); a full
        second destination other than the source, or one equal to the first, is
        MediumDestinationElementFull.
        Removal must be allowed for both drives media leave.
        """
        for addr in (src_addr, dst1_addr, dst2_addr):
            self._check_holder(addr)
        if src_addr == dst1_addr:
            raise InvalidElementAddress("source and first destination are the same element")
        with self._transaction() as state:
            first = state.contents.get(src_addr)
            second = state.contents.get(dst1_addr)
            if first is None:
                raise MediumSourceElementEmpty(f"element {src_addr:#06x} is empty")
            if second is None:
                raise MediumSourceElementEmpty(f"first destination {dst1_addr:#06x} is empty")
            if dst2_addr == dst1_addr or (dst2_addr != src_addr and dst2_addr in state.contents):
                raise MediumDestinationElementFull(f"second destination {dst2_addr:#06x} is full")
            self._check_open(state, src_addr, dst1_addr, dst2_addr)
            self._check_prevent(src_addr)
            self._check_prevent(dst1_addr)
            del state.contents[src_addr]
            state.contents[dst1_addr] = self._moved(first, src_addr)
            state.contents[dst2_addr] = self._moved(second, dst1_addr)

    def set_ie_prevent(self, prevented: bool) -> None:
        """The changer's PREVENT ALLOW MEDIUM REMOVAL: lock the import/export elements against
        the operator (the medium transport still reaches them). Persisted."""
        with self._transaction() as state:
            state.ie_prevent = prevented

    def open_ie(self, address: int) -> None:
        """OPEN IMPORT/EXPORT ELEMENT: present the element to the operator (the transport then
        cannot reach it). MediumRemovalPrevented while the changer prevents removal."""
        self._check_ie(address)
        with self._transaction() as state:
            if state.ie_prevent:
                raise MediumRemovalPrevented("import/export elements are locked")
            state.ie_open = state.ie_open | {address}

    def close_ie(self, address: int) -> None:
        """CLOSE IMPORT/EXPORT ELEMENT: give the element back to the medium transport."""
        self._check_ie(address)
        with self._transaction() as state:
            state.ie_open = state.ie_open - {address}

    # ------------------------------------------------------------------------------------------
    # Operator operations (the `tcmu-py vtl` tool). Raise LibraryError; fire change listeners.

    def place(self, barcode: str, address: int | None = None) -> int:
        """Put cartridge `barcode` (which must exist in media/ and be on the shelf) straight into
        storage element `address` (default: the first empty one), as an operator filling a
        magazine. Returns the address."""
        return self._operator_insert(barcode, address, ElementType.STORAGE)

    def import_cartridge(self, barcode: str, address: int | None = None) -> int:
        """The operator puts `barcode` into import/export element `address` (default: first
        empty one). Refused while removal is prevented. Returns the address."""
        return self._operator_insert(barcode, address, ElementType.IMPORT_EXPORT)

    def export_cartridge(self, barcode: str) -> int:
        """The operator takes `barcode` out of the import/export element holding it (it goes to
        the shelf). Refused while removal is prevented. Returns the address it left."""
        check_barcode(barcode)
        with self._transaction(operator=True) as state:
            addr = next((a for a, o in state.contents.items() if o.barcode == barcode), None)
            if addr is None or self._types[addr] != ElementType.IMPORT_EXPORT:
                where = "is not in the library" if addr is None else f"is in element {addr:#06x}"
                raise LibraryError(
                    f"{barcode} {where}; only cartridges in import/export elements can be exported"
                )
            if state.ie_prevent:
                raise LibraryError("import/export elements are locked (PREVENT MEDIUM REMOVAL)")
            del state.contents[addr]
        return addr

    # ------------------------------------------------------------------------------------------
    # Internals

    def _operator_insert(self, barcode: str, address: int | None, etype: ElementType) -> int:
        check_barcode(barcode)
        if not self.media_path(barcode).exists():
            raise LibraryError(f"cartridge {barcode} does not exist (create it first)")
        with self._transaction(operator=True) as state:
            if any(o.barcode == barcode for o in state.contents.values()):
                raise LibraryError(f"{barcode} is already in the library")
            candidates = self.addresses(etype)
            if address is None:
                free = [a for a in candidates if a not in state.contents]
                if not free:
                    raise LibraryError(f"no empty {_TYPE_KEYS[etype]} element")
                address = free[0]
            elif address not in candidates:
                raise LibraryError(f"{address:#06x} is not a {_TYPE_KEYS[etype]} element")
            elif address in state.contents:
                raise LibraryError(f"element {address:#06x} is full")
            if etype == ElementType.IMPORT_EXPORT and state.ie_prevent:
                raise LibraryError("import/export elements are locked (PREVENT MEDIUM REMOVAL)")
            state.contents[address] = Occupant(
                barcode, None, imported=etype == ElementType.IMPORT_EXPORT
            )
        return address

    def _check_holder(self, address: int) -> None:
        # SMC-3 device capabilities page: our medium transport is not a storage location (STOR MT =
        # 0).
        if self.element_type(address) == ElementType.MEDIUM_TRANSPORT:
            raise InvalidElementAddress(f"{address:#06x} is the medium transport")

    def _check_ie(self, address: int) -> None:
        if self.element_type(address) != ElementType.IMPORT_EXPORT:
            raise InvalidElementAddress(f"{address:#06x} is not an import/export element")

    @staticmethod
    def _check_open(state: _State, *addresses: int) -> None:
        for addr in addresses:
            if addr in state.ie_open:
                raise ImportExportElementOpen(f"import/export element {addr:#06x} is open")

    def _check_prevent(self, address: int) -> None:
        if (
            self._types[address] == ElementType.DATA_TRANSFER
            and self._drive_prevent[self.drive_index(address)]
        ):
            raise MediumRemovalPrevented(f"drive at {address:#06x} prevents medium removal")

    def _moved(self, occ: Occupant, from_addr: int) -> Occupant:
        if self._types[from_addr] in (ElementType.STORAGE, ElementType.IMPORT_EXPORT):
            return Occupant(occ.barcode, from_addr, imported=False)
        return replace(occ, imported=False)

    def _stat_id(self) -> tuple[int, int, int]:
        return _file_identity(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread lock and the file lock, with the state re-read if it changed."""
        events: list[Callable[[], None]] = []
        try:
            with self._lock:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    self._reload_if_changed(events)
                    yield
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            _fire(events)  # also when the block raised: a re-read's changes were still adopted

    @contextlib.contextmanager
    def _transaction(self, *, operator: bool = False) -> Iterator[_State]:
        """Yield a copy of the state; if the block returns normally, persist it, then adopt it."""
        events: list[Callable[[], None]] = []
        try:
            with self._lock:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    self._reload_if_changed(events)
                    new = self._state.copy()
                    yield new
                    if not new.same(self._state):
                        new.generation = self._state.generation + 1
                        doc = _document(
                            self.name,
                            self._ranges,
                            self._drives,
                            self.dvcid,
                            new,
                            self.changer_identity,
                            self.personality,
                        )
                        # Under the flock: no other writer can be between its temporary
                        # file and its rename, so any temporary file left is a crash's.
                        remove_stale_temporaries(self.path / STATE_FILE)
                        write_json(self.path / STATE_FILE, doc)
                        self._file_id = self._stat_id()
                        events += self._adopt(new, external=operator)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            _fire(events)  # also when the block refused the change: a re-read was adopted

    def _reload_if_changed(self, events: list[Callable[[], None]]) -> None:
        """Adopt library.json if another process replaced it: validated whole first, then its
        identity recorded, so a malformed file is refused (LibraryStateError) every time until
        it is repaired, and never marks itself as seen."""
        try:
            file_id = self._stat_id()
        except FileNotFoundError:
            return
        if file_id == self._file_id:
            return
        try:
            state = _state_from(
                self.path / STATE_FILE, _read_document(self.path), self._types
            )
        except LibraryStateError as exc:
            if file_id != self._bad_file_id:  # log each bad version once, not every command
                self._bad_file_id = file_id
                log.error("library %s: %s; keeping the last valid state until it is repaired",
                          self.name, exc)
            raise
        self._file_id = file_id
        events += self._adopt(state, external=True)

    def _adopt(self, new: _State, *, external: bool) -> list[Callable[[], None]]:
        """Make `new` current; return the listener calls its differences call for."""
        old, self._state = self._state, new
        events: list[Callable[[], None]] = []
        first = self._ranges[ElementType.DATA_TRANSFER][0]
        for index, listeners in enumerate(self._drive_listeners):
            before, after = old.contents.get(first + index), new.contents.get(first + index)
            if (before and before.barcode) != (after and after.barcode):
                barcode = after.barcode if after else None
                events += [_bind(cb, barcode) for cb in listeners]
        if external and not old.same(new):
            events += list(self._change_listeners)
        return events


def _fire(events: list[Callable[[], None]]) -> None:
    """Run listener calls; one failing listener is logged and does not undo or stop the rest
    (the change they report is already durable)."""
    for event in events:
        try:
            event()
        except Exception:
            log.exception("library listener %r failed", event)


def _bind(cb: DriveListener, barcode: str | None) -> Callable[[], None]:
    return lambda: cb(barcode)


def _file_identity(root: Path) -> tuple[int, int, int]:
    """What changes whenever library.json is replaced (a rename gives a new inode)."""
    st = os.stat(root / STATE_FILE)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _element_types(ranges: dict[ElementType, tuple[int, int]]) -> dict[int, ElementType]:
    """{address: element type} of a layout."""
    types: dict[int, ElementType] = {}
    for etype, (first, count) in ranges.items():
        for addr in range(first, first + count):
            types[addr] = etype
    return types


def _check_model(model: object) -> str | None:
    """Why `model` is not a drive model string (None if it is one)."""
    if (
        not isinstance(model, str)
        or not 1 <= len(model) <= MODEL_MAX
        or not all(" " <= c <= "~" for c in model)
    ):
        return f"a drive model of 1..{MODEL_MAX} printable ASCII characters"
    return None


def _check_ranges(ranges: dict[ElementType, tuple[int, int]]) -> None:
    spans = []
    for etype, (first, count) in ranges.items():
        if count < 0 or first < 0 or first + count - 1 > 0xFFFF:
            raise LibraryError(f"{_TYPE_KEYS[etype]} elements {first}+{count} exceed 16 bits")
        if count:
            spans.append((first, first + count, etype))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise LibraryError(f"{_TYPE_KEYS[a]} and {_TYPE_KEYS[b]} element addresses overlap")


def _document(
    name: str,
    ranges: dict[ElementType, tuple[int, int]],
    drives: list[DriveInfo],
    dvcid: str,
    state: _State,
    changer: ChangerIdentity,
    personality: str | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "generation": state.generation,
        "name": name,
        "elements": {_TYPE_KEYS[t]: list(ranges[t]) for t in ELEMENT_TYPES},
        "drives": [{"serial": d.serial, "model": d.model} for d in drives],
        "dvcid": dvcid,
        "changer": {
            "vendor": changer.vendor,
            "product": changer.product,
            "revision": changer.revision,
        },
        "contents": {
            str(addr): {"barcode": o.barcode, "source": o.source, "imported": o.imported}
            for addr, o in sorted(state.contents.items())
        },
        "ie_prevent": state.ie_prevent,
        "ie_open": sorted(state.ie_open),
    }
    if personality is not None:
        doc["personality"] = personality
    return doc


_ADDRESS_RE = re.compile(r"[0-9]{1,5}")
_Layout = tuple[
    str, dict[ElementType, tuple[int, int]], list[DriveInfo], str, ChangerIdentity | None,
    str | None,
]


def _layout_from(path: Path, doc: dict[str, Any]) -> _Layout:
    """(name, ranges, drives, dvcid, changer identity, personality key) of a parsed
    library.json, every field checked; LibraryStateError otherwise."""
    try:
        f = Fields(path, doc)
        name = f.string("name")
        elements = f.mapping("elements")
        ranges: dict[ElementType, tuple[int, int]] = {}
        for etype, key in _TYPE_KEYS.items():
            pair = elements.get(key)
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not (0 <= pair[1] <= 0x10000 and pair[0] + pair[1] <= 0x10000)
                or not (pair[0] > 0 or etype == ElementType.MEDIUM_TRANSPORT and pair[0] == 0)
            ):
                low = 0 if etype == ElementType.MEDIUM_TRANSPORT else 1
                elements.fail(key, pair, f"[first address {low}..65535, count] within 16 bits")
            ranges[etype] = (pair[0], pair[1])
        if ranges[ElementType.MEDIUM_TRANSPORT][1] < 1:
            elements.fail("medium_transport", list(ranges[ElementType.MEDIUM_TRANSPORT]),
                          "at least one medium transport element")
        try:
            _check_ranges(ranges)
        except LibraryError as exc:
            f.fail("elements", elements.doc, f"element ranges that do not overlap ({exc})")
        raw_drives = f.array("drives")
        if len(raw_drives) != ranges[ElementType.DATA_TRANSFER][1]:
            f.fail("drives", raw_drives, f"one drive per data transfer element "
                   f"({ranges[ElementType.DATA_TRANSFER][1]})")
        drives = []
        for i, raw in enumerate(raw_drives):
            d = Fields(path, raw, f"drives[{i}]")
            serial = d.get("serial")
            problem = check_serial(serial)
            if problem is not None:
                d.fail("serial", serial, problem)
            model = d.get("model")
            problem = _check_model(model)
            if problem is not None:
                d.fail("model", model, problem)
            drives.append(DriveInfo(serial, model))
        serials = [d.serial for d in drives]
        if len(set(serials)) != len(serials):
            f.fail("drives", raw_drives, "drives with unique serials")
        dvcid = f.string("dvcid", lambda v: v in ("serial", "t10"), "'serial' or 't10'", "serial")
        changer = None
        if "changer" in doc:
            c = f.mapping("changer")
            extra = set(c.doc) - {"vendor", "product", "revision"}
            if extra:
                c.fail(sorted(extra)[0], c.doc[sorted(extra)[0]], "only vendor, product, revision")
            changer = ChangerIdentity(
                c.string("vendor"), c.string("product"), c.string("revision")
            )
            try:
                changer.check()
            except LibraryError as exc:
                f.fail("changer", c.doc, str(exc))
        personality = None
        if "personality" in doc:
            personality = f.string("personality", lambda v: v in CHANGER_PERSONALITIES,
                                   f"one of {', '.join(CHANGER_PERSONALITIES)}")
    except LibraryStateError:
        raise
    except StateFileError as exc:
        raise LibraryStateError.of(exc) from None
    return name, ranges, drives, dvcid, changer, personality


def _state_from(path: Path, doc: dict[str, Any], types: dict[int, ElementType]) -> _State:
    """The element contents of a parsed library.json, checked against the layout `types`
    (occupants only in holders, sources in storage or import/export elements, each barcode
    once); LibraryStateError otherwise."""
    try:
        f = Fields(path, doc)
        holders = {ElementType.STORAGE, ElementType.IMPORT_EXPORT, ElementType.DATA_TRANSFER}
        sources = {ElementType.STORAGE, ElementType.IMPORT_EXPORT}
        contents: dict[int, Occupant] = {}
        raw_contents = f.mapping("contents", {})
        seen: set[str] = set()
        for key, raw in raw_contents.doc.items():
            addr = int(key) if _ADDRESS_RE.fullmatch(key) else -1
            if types.get(addr) not in holders:
                raw_contents.fail(key, raw, "a storage, import/export or data transfer element "
                                  "address of this library (decimal)")
            o = raw_contents.mapping(key)
            barcode = o.string("barcode", is_barcode, BARCODE_RULE)
            if barcode in seen:
                o.fail("barcode", barcode, "each barcode in one element only")
            seen.add(barcode)
            source = o.get("source", None)
            if source is not None and (
                not isinstance(source, int) or isinstance(source, bool)
                or types.get(source) not in sources
            ):
                o.fail("source", source, "null or a storage or import/export element address")
            contents[addr] = Occupant(barcode, source, o.boolean("imported", False))
        ie_open = f.array("ie_open", [])
        for i, addr in enumerate(ie_open):
            if (
                not isinstance(addr, int) or isinstance(addr, bool)
                or types.get(addr) != ElementType.IMPORT_EXPORT
            ):
                f.fail(f"ie_open[{i}]", addr, "an import/export element address")
        return _State(
            contents,
            f.boolean("ie_prevent", False),
            frozenset(ie_open),
            f.integer("generation", 0, (1 << 63) - 1, 0),
        )
    except LibraryStateError:
        raise
    except StateFileError as exc:
        raise LibraryStateError.of(exc) from None


def _read_document(root: Path) -> dict[str, Any]:
    """library.json parsed, its format and version checked (LibraryStateError otherwise)."""
    path = root / STATE_FILE
    try:
        f = Fields(path, read_json(path, "a tcmu-py library state file", limit=STATE_LIMIT))
        f.string("format", lambda v: v == FORMAT, repr(FORMAT))
        f.integer("version", VERSION, VERSION)
    except StateFileError as exc:
        raise LibraryStateError.of(exc) from None
    return f.doc
