"""``tcmu-py status`` for libraries: the room on the filesystems their cartridges live on.

A drive's end of medium is the cartridge's capacity or its backing filesystem's room, whichever
comes first (`Cartridge.end_of_medium`). An operator sees here, per served library, each
filesystem holding its media directory or a cartridge directory (a cartridge may be a mount
of its own), and a warning when one runs low (LOW: drives writing there report or soon report
early warning; FULL: no room past the reserve, writes end in VOLUME OVERFLOW).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tcmu_py.handler import StatusTable
from tcmu_py.handlers.vtl import cartridge as cartmod
from tcmu_py.handlers.vtl.library import MEDIA_DIR
from tcmu_py.table import format_size

log = logging.getLogger(__name__)

KEY = "vtl_libraries"
#: A filesystem with less than this fraction of its size free is reported LOW.
LOW_FRACTION = 0.10


def filesystem_state(free: int, total: int) -> str:
    """"FULL" (no room past the reserve), "LOW" or "ok".

    LOW: under `LOW_FRACTION` free, or so little that a drive writing there is in early warning
    (the room past the reserve is within the early-warning zone `Cartridge._room` gives a
    filesystem of this size; on a filesystem smaller than a cartridge, that comes first).
    """
    if free <= cartmod.BACKING_RESERVE:
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


def status(devices: Sequence[Any]) -> dict[str, Any]:
    """``{KEY: [{"name", "path", "filesystems": [...]}]}`` for each library a device serves."""
    libraries: dict[str, Any] = {}
    for device in devices:
        lib = getattr(device, "library", None)
        path = getattr(lib, "path", None)
        if path is None or str(path) in libraries:
            continue
        libraries[str(path)] = {"name": getattr(lib, "name", ""), "path": str(path),
                                "filesystems": library_filesystems(Path(path) / MEDIA_DIR)}
    return {KEY: list(libraries.values())}


def _rows(libraries: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, ...], ...]:
    rows = []
    for lib in libraries:
        for fs in lib.get("filesystems") or []:
            size, free = int(fs["size"]), int(fs["free"])
            pct = 100 * free / size if size else 0.0
            rows.append((str(lib.get("name", "")), str(fs["path"]), format_size(size),
                         format_size(free), f"{pct:.1f}%", str(fs["state"])))
    return tuple(rows)


def status_tables(st: Mapping[str, Any]) -> list[StatusTable]:
    """The table, titled with a warning when a filesystem is LOW or FULL."""
    rows = _rows(st.get(KEY) or [])
    if not rows:
        return []
    low = [r for r in rows if r[-1] != "ok"]
    title = "tape library filesystems"
    if low:
        title += (f" -- WARNING: {len(low)} low on space (LOW: drives writing there reach early"
                  " warning soon; FULL: writes end in VOLUME OVERFLOW)")
    return [StatusTable(title, ("library", "filesystem", "size", "free", "free%", "state"),
                        rows)]
