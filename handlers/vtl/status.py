"""``tcmu-py status`` for libraries: what the changer holds, and the room on the filesystems
their cartridges live on (also as ``serve --metrics`` gauges).

A drive's end of medium is the cartridge's capacity or its backing filesystem's room, whichever
comes first (`Cartridge.end_of_medium`). An operator sees here, per served library, each
filesystem holding its media directory or a cartridge directory (a cartridge may be a mount
of its own), and a warning when one runs low (LOW: drives writing there report or soon report
early warning; FULL: no room past the reserve for a 256 KiB block, such writes end in
VOLUME OVERFLOW).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tcmu_py.handler import Gauge, StatusTable
from tcmu_py.handlers.vtl import cartridge as cartmod
from tcmu_py.handlers.vtl.library import MEDIA_DIR
from tcmu_py.scsi.smc import ElementType
from tcmu_py.table import format_size

log = logging.getLogger(__name__)

KEY = "vtl_libraries"
#: A filesystem with less than this fraction of its size free is reported LOW.
LOW_FRACTION = 0.10
#: The block a FULL filesystem no longer takes: 256 KiB, a block size backup software commonly
#: writes to LTO (GNU tar -b 512; Bacula's default is 64,512 bytes), half the largest block a
#: drive accepts by default (hw_max_sectors 1024 x 512).
FULL_BLOCK = 256 << 10


def filesystem_state(free: int, total: int) -> str:
    """"FULL", "LOW" or "ok".

    FULL: the room past the reserve (`cartridge.BACKING_RESERVE`, and the filemark reserve a
    drive keeps after data) holds no record of `FULL_BLOCK` bytes, so a drive writing there
    answers such a write with VOLUME OVERFLOW (`Cartridge._append`): after an overflow the
    filesystem reads FULL, not LOW with a fraction of a block left.
    LOW: under `LOW_FRACTION` free, or so little that a drive writing there is in early warning
    (the room past the reserve is within the early-warning zone `Cartridge._room` gives a
    filesystem of this size; on a filesystem smaller than a cartridge, that comes first).
    """
    room = free - cartmod.BACKING_RESERVE - cartmod.FILEMARK_RESERVE
    if room < cartmod.RECORD_HEADER_SIZE + FULL_BLOCK:
        return "FULL"
    zone = cartmod.filesystem_early_warning(total)
    if free < LOW_FRACTION * total or free - cartmod.BACKING_RESERVE <= zone:
        return "LOW"
    return "ok"


def library_filesystems(media: Path) -> list[dict[str, Any]]:
    """Each distinct filesystem under the media directory `media` (itself and every cartridge
    directory in it): its first path, size, free bytes and state."""
    paths = [media]
    try:
        paths += sorted(p for p in media.iterdir() if p.is_dir())
    except OSError as exc:
        log.warning("%s: %s", media, exc)
    seen: set[int] = set()
    out = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
            if dev in seen:
                continue
            seen.add(dev)
            free, total = cartmod.backing_space(path)
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            continue
        out.append({"path": str(path), "size": total, "free": free,
                    "state": filesystem_state(free, total)})
    return out


#: Element types as the status names them.
_ELEMENT_NAMES = {
    ElementType.MEDIUM_TRANSPORT: "transport",
    ElementType.STORAGE: "storage",
    ElementType.IMPORT_EXPORT: "import_export",
    ElementType.DATA_TRANSFER: "drive",
}


def library_state(lib: Any) -> dict[str, Any]:
    """What the changer holds: per element type the element count and how many are full, the
    cartridges that exist (in `media/`) and how many sit in no element (the shelf), and each
    drive's cartridge (barcode, None when empty)."""
    contents = lib.contents()
    elements = {}
    for etype, (first, count) in lib.ranges().items():
        full = sum(1 for a in range(first, first + count) if a in contents)
        elements[_ELEMENT_NAMES.get(etype, str(int(etype)))] = {"total": count, "full": full}
    cartridges = lib.cartridges()
    placed = {occ.barcode for occ in contents.values()}
    first_drive = lib.ranges()[ElementType.DATA_TRANSFER][0]
    drives = []
    for i in range(lib.drive_count):
        occ = contents.get(first_drive + i)
        drives.append({"index": i, "serial": lib.drive_serial(i),
                       "barcode": occ.barcode if occ else None})
    return {"elements": elements, "cartridges": len(cartridges),
            "shelf": sum(1 for b in cartridges if b not in placed), "drives": drives}


def status(devices: Sequence[Any]) -> dict[str, Any]:
    """``{KEY: [{"name", "path", "filesystems": [...], **library_state}]}`` for each library a
    device serves."""
    libraries: dict[str, Any] = {}
    for device in devices:
        lib = getattr(device, "library", None)
        path = getattr(lib, "path", None)
        if path is None or str(path) in libraries:
            continue
        entry = {"name": getattr(lib, "name", ""), "path": str(path),
                 "filesystems": library_filesystems(Path(path) / MEDIA_DIR)}
        try:
            entry |= library_state(lib)
        except (OSError, AttributeError) as exc:  # a library object of another shape
            log.warning("%s: library state: %s", path, exc)
        libraries[str(path)] = entry
    return {KEY: list(libraries.values())}


def metrics(st: Mapping[str, Any]) -> list[Gauge]:
    """Per library (labels ``library``, ``path``): elements and full elements per type,
    cartridges and those on the shelf, whether each drive holds a cartridge; per filesystem its
    size, free bytes and whether it is LOW or FULL."""
    out: list[Gauge] = []
    for lib in st.get(KEY) or []:
        labels = {"library": str(lib.get("name", "")), "path": str(lib.get("path", ""))}
        for etype, e in (lib.get("elements") or {}).items():
            el = labels | {"type": etype}
            out.append(Gauge("tcmu_py_vtl_elements", "elements of a type in the library", el,
                             e["total"]))
            out.append(Gauge("tcmu_py_vtl_elements_full",
                             "elements of a type holding a cartridge", el, e["full"]))
        if "cartridges" in lib:
            out.append(Gauge("tcmu_py_vtl_cartridges", "cartridges in the library's media "
                             "directory", labels, lib["cartridges"]))
            out.append(Gauge("tcmu_py_vtl_cartridges_on_shelf",
                             "cartridges in no element (exported or never imported)", labels,
                             lib["shelf"]))
        for d in lib.get("drives") or []:
            out.append(Gauge("tcmu_py_vtl_drive_loaded", "1 while the drive holds a cartridge",
                             labels | {"drive": str(d["index"]), "serial": str(d["serial"])},
                             0.0 if d["barcode"] is None else 1.0))
        for fs in lib.get("filesystems") or []:
            fl = labels | {"filesystem": str(fs["path"])}
            out.append(Gauge("tcmu_py_vtl_filesystem_size_bytes",
                             "size of a filesystem holding cartridges", fl, fs["size"]))
            out.append(Gauge("tcmu_py_vtl_filesystem_free_bytes",
                             "free bytes of a filesystem holding cartridges", fl, fs["free"]))
            out.append(Gauge("tcmu_py_vtl_filesystem_low",
                             "1 while the filesystem is LOW or FULL (see tcmu-py status)", fl,
                             0.0 if fs["state"] == "ok" else 1.0))
    return out


def _rows(libraries: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, ...], ...]:
    rows = []
    for lib in libraries:
        for fs in lib.get("filesystems") or []:
            size, free = int(fs["size"]), int(fs["free"])
            pct = 100 * free / size if size else 0.0
            rows.append((str(lib.get("name", "")), str(fs["path"]), format_size(size),
                         format_size(free), f"{pct:.1f}%", str(fs["state"])))
    return tuple(rows)


def _library_rows(libraries: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, ...], ...]:
    rows = []
    for lib in libraries:
        el = lib.get("elements")
        if not el:
            continue

        def cell(name: str, el: Mapping[str, Any] = el) -> str:
            e = el.get(name)
            return f"{e['full']}/{e['total']}" if e else "-"

        drives = ", ".join(f"{d['index']}={d['barcode'] or '-'}" for d in lib.get("drives") or [])
        rows.append((str(lib.get("name", "")), cell("storage"), cell("import_export"), drives,
                     str(lib.get("cartridges", "")), str(lib.get("shelf", ""))))
    return tuple(rows)


def status_tables(st: Mapping[str, Any]) -> list[StatusTable]:
    """The libraries' state, then their filesystems, titled with a warning when one is LOW or
    FULL."""
    libraries = st.get(KEY) or []
    tables = []
    state = _library_rows(libraries)
    if state:
        tables.append(StatusTable("tape libraries", ("library", "slots full", "i/e full",
                                                     "drives", "cartridges", "on shelf"), state))
    rows = _rows(libraries)
    if not rows:
        return tables
    low = [r for r in rows if r[-1] != "ok"]
    title = "tape library filesystems"
    if low:
        title += (f" -- WARNING: {len(low)} low on space (LOW: drives writing there reach early"
                  " warning soon; FULL: a 256 KiB block ends in VOLUME OVERFLOW)")
    return [*tables, StatusTable(title, ("library", "filesystem", "size", "free", "free%", "state"),
                                 rows)]
