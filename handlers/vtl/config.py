"""What the ``vtl`` subtype owns outside its devices (`tcmu_py.handler.Handler` contract):

- the YAML section ``libraries:`` (`LibrarySpec`, `DriveSpec`, validated by `load_libraries`:
  the library personality against `changer_personality`, drive models against the drive
  personality table, cartridge ranges against LTO media types);
- the units of each library as devices of their own (`library_devices`);
- the libraries' creation before devices open (`prepare`, `admin.ensure_library`);
- ``tcmu-py vtl ...`` (`admin.main`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcmu_py.configspec import (
    Checker,
    Defaults,
    Device,
    config_string_problem,
    raw_names,
)
from tcmu_py.errors import ConfigError
from tcmu_py.handler import ConfigView

from .changer_personality import (
    CHANGER_PERSONALITIES,
    DEFAULT_CHANGER_PERSONALITY,
    ChangerPersonality,
    changer_personality,
)
from .library import BARCODE_RULE, is_barcode
from .personality import parse_barcode, personality

__all__ = [
    "LIBRARY_CMD_TIME_OUT",
    "LIBRARY_DEVICE_SIZE",
    "LIBRARY_HW_MAX_SECTORS",
    "DriveSpec",
    "LibrarySpec",
    "count_barcodes",
    "expand_barcodes",
    "library_devices",
    "load_libraries",
    "prepare",
]

#: The top-level YAML key of tape libraries.
SECTION = "libraries"

# Every library unit is a TCMU device with these settings (not configurable: they follow from
# tape, not from the host). The size only has to be non-zero (LIO refuses 0; tapes have no LBAs).
LIBRARY_DEVICE_SIZE = 1 << 20
# Rewind, locate and erase of a full LTO cartridge take minutes on a real drive; a changer move
# tens of seconds. The kernel fails a command that the daemon has not completed in cmd_time_out.
LIBRARY_CMD_TIME_OUT = 300
# 2048 x 512-byte sectors = 1 MiB per command, so tape blocks of 256 KiB .. 1 MiB pass whole
# (LIO's default of 128 sectors would cap a block at 64 KiB).
LIBRARY_HW_MAX_SECTORS = 2048


def _barcode_range(spec: str) -> tuple[str, int, int, int, str]:
    """(prefix, first number, last number, digits, suffix) of ``ABC000L8..ABC019L8``; a single
    barcode is a range of one. Raises ValueError unless the ends differ in one run of digits of
    equal width."""
    first, sep, last = spec.partition("..")
    if not sep:
        last = first
    for code in (first, last):
        if not is_barcode(code):  # the library's one barcode rule
            raise ValueError(spec)
    if first == last:
        return first, 0, 0, 0, ""
    if len(first) != len(last):
        raise ValueError(spec)
    start = 0
    while first[start] == last[start]:
        start += 1
    end = len(first)
    while first[end - 1] == last[end - 1]:
        end -= 1
    # Widen the differing part to the whole digit run it sits in.
    while start > 0 and first[start - 1].isdigit():
        start -= 1
    while end < len(first) and first[end].isdigit():
        end += 1
    lo_s, hi_s = first[start:end], last[start:end]
    if not (lo_s.isdigit() and hi_s.isdigit()) or int(lo_s) > int(hi_s):
        raise ValueError(spec)
    return first[:start], int(lo_s), int(hi_s), end - start, first[end:]


def count_barcodes(spec: str) -> int:
    """How many barcodes `expand_barcodes` would give, computed without expanding (a range
    like ``A00000000000L8..A99999999999L8`` holds 10^11). Raises ValueError as it does."""
    _, lo, hi, _, _ = _barcode_range(spec)
    return hi - lo + 1


def expand_barcodes(spec: str) -> list[str]:
    """Expand ``ABC000L8..ABC019L8`` into its 20 barcodes; a single barcode expands to itself.

    The two ends must differ only in one run of digits of equal width; raises ValueError otherwise.
    Check `count_barcodes` first when the range comes from outside.
    """
    prefix, lo, hi, width, suffix = _barcode_range(spec)
    if not width:
        return [prefix]
    return [f"{prefix}{n:0{width}d}{suffix}" for n in range(lo, hi + 1)]


@dataclass(frozen=True)
class DriveSpec:
    """A tape drive of a library: ``name`` is its device (LIO backstore) name, ``model`` a drive
    personality (``IBM-LTO8``, ``ULT3580-TD8``, ...), ``serial`` its unit serial (VPD 80h, and
    the identifier the changer reports for it); empty means derived from the name."""

    name: str
    model: str
    serial: str = ""

    def unit_serial(self) -> str:
        """The serial the drive reports: ``serial``, or ``TP`` + 8 hex digits of SHA-256 of the
        device name (stable across restarts, 10 characters like a real LTO drive's)."""
        if self.serial:
            return self.serial
        return "TP" + hashlib.sha256(self.name.encode()).hexdigest()[:8].upper()


@dataclass(frozen=True)
class LibrarySpec:
    """A virtual tape library. ``media_dir`` is the library directory (library.json, the
    cartridges under ``media/``); ``cartridges`` keeps the range strings as written (see
    `barcodes`). The loader adds one ``vtl`` `Device` per unit (the changer, then each drive) to
    `Config.devices` (`library_devices`), so units are exported like any device."""

    name: str
    changer: str
    drives: tuple[DriveSpec, ...]
    slots: int
    import_export: int
    cartridges: tuple[str, ...]
    media_dir: str
    personality: str = DEFAULT_CHANGER_PERSONALITY.key  # changer personality key

    def barcodes(self) -> list[str]:
        return [code for spec in self.cartridges for code in expand_barcodes(spec)]

    def units(self) -> list[tuple[str, str, str | None]]:
        """[(device name, unit option, serial)]: the changer, then drive0..driveN-1."""
        return [(self.changer, "changer", None)] + [
            (d.name, f"drive{i}", d.unit_serial()) for i, d in enumerate(self.drives)]


def load_libraries(raw: object, c: Checker, doc: Mapping[str, Any]) -> tuple[LibrarySpec, ...]:
    """The ``libraries:`` section. A unit's name must be no device's (raw names of ``devices:``,
    also of ones that failed validation) and no unit's of an earlier library."""
    libs: list[LibrarySpec] = []
    taken = raw_names(doc.get("devices"))
    dirs: dict[str, str] = {}
    keys = {"name", "changer", "drives", "slots", "import_export", "cartridges", "media_dir",
            "personality"}
    required = frozenset({"name", "changer", "drives", "slots", "media_dir"})
    for entry in c.named_entries(raw, "libraries", keys, required, "library"):
        p, m, name, _ = entry
        changer = c.name(m["changer"], f"{p}.changer") if "changer" in m else None
        pers = _check_personality(c, m.get("personality"), f"{p}.personality")
        drives: list[DriveSpec] = []
        for j, d in enumerate(c.seq(m.get("drives"), f"{p}.drives") or []):
            dp = f"{p}.drives[{j}]"
            dm = c.mapping(d, dp, {"name", "model", "serial"}, frozenset({"name"}))
            if dm is None or "name" not in dm:
                continue
            dn = c.name(dm["name"], f"{dp}.name")
            # Without a model a drive is the personality's usual one (HP LTO-8 in an SL150).
            raw_model = dm.get("model", pers.default_drive if pers else None)
            if raw_model is None:
                continue
            model = c.string(raw_model, f"{dp}.model", re.compile(r"[\x20-\x7e]{1,16}"),
                             "a product identification of 1..16 printable ASCII characters")
            if model is not None:
                model = _check_drive_model(c, model, f"{dp}.model")
            serial = ""
            if dm.get("serial") is not None:
                serial = c.string(dm["serial"], f"{dp}.serial", re.compile(r"[A-Za-z0-9_-]{1,32}"),
                                  "a drive serial of 1..32 characters A-Z a-z 0-9 _ -") or ""
            if dn and model:
                drives.append(DriveSpec(dn, model, serial))
        if "drives" in m and not drives and c.clean_since(entry):
            c.fail(f"{p}.drives", m["drives"], "at least one drive")
        slots = c.integer(m["slots"], f"{p}.slots", 1, 65535) if "slots" in m else None
        ie = c.integer(m.get("import_export", 0), f"{p}.import_export", 0, 255)
        carts: list[str] = []
        room = (slots or 65535) + (ie or 0)  # what the library can hold: never expand beyond
        held = 0
        seen: set[str] = set()
        for j, spec in enumerate(c.seq(m.get("cartridges"), f"{p}.cartridges") or []):
            try:
                if not isinstance(spec, str):
                    raise ValueError(spec)
                count = count_barcodes(spec)
            except ValueError:
                c.fail(f"{p}.cartridges[{j}]", spec,
                       f"a barcode ({BARCODE_RULE}) or a range like ABC000L8..ABC019L8")
                continue
            if held + count > room:
                c.fail(f"{p}.cartridges[{j}]", spec, f"at most slots + import_export = {room}"
                       f" cartridges in all (this range holds {count}, the ones before it"
                       f" {held})")
                continue
            held += count
            codes = expand_barcodes(spec)
            again = sorted(seen.intersection(codes))
            if again:
                # one cartridge per barcode: apply made library.json, then refused the second
                c.fail(f"{p}.cartridges[{j}]", spec, "barcodes not listed before in this "
                       f"library ({', '.join(again[:3])}{' ...' if len(again) > 3 else ''} "
                       "already are)")
                continue
            seen.update(codes)
            if _check_media_types(c, codes, spec, f"{p}.cartridges[{j}]"):
                carts.append(spec)
        media = c.abspath(m["media_dir"], f"{p}.media_dir") if "media_dir" in m else None
        if media is not None and os.path.exists(media) and not os.path.isdir(media):
            # apply would fail to make the library in it with a bare NotADirectoryError
            c.fail(f"{p}.media_dir", m["media_dir"], "a directory, or a path where one can be"
                   " made: it is a file")
            media = None
        if media is not None:
            if media in dirs:
                c.fail(f"{p}.media_dir", m["media_dir"],
                       f"a directory of its own (library {dirs[media]} uses it)")
            else:
                c.claim_directory(media, f"{p}.media_dir", m["media_dir"])
            dirs[media] = name or "?"
            cfg = f"vtl/library={media};unit=drive00"
            problem = config_string_problem(cfg)
            if problem:
                c.fail(f"{p}.media_dir", m["media_dir"], f"a path whose dev_config {cfg!r} has"
                       f" {problem}")
        units = ([changer] if changer else []) + [d.name for d in drives]
        for unit in units:
            if units.count(unit) > 1:
                c.fail(f"{p}.drives", m.get("drives"),
                       f"unit names used once in the library ({unit!r} repeats)")
                break
        # Library units are devices too (exported by name like any other); they are implied by
        # `libraries:`, so naming one in `devices:` as well is a duplicate.
        raw_drives = m.get("drives")
        named = [("changer", m.get("changer"))] + [
            (f"drives[{j}].name", d.get("name"))
            for j, d in enumerate(raw_drives if isinstance(raw_drives, list) else [])
            if isinstance(d, dict)]
        for key, unit_name in named:
            if not isinstance(unit_name, str):
                continue
            if unit_name in taken:
                c.fail(f"{p}.{key}", unit_name, "a name no device or other library unit uses"
                       " (library units are devices of their own; do not list them in"
                       " devices)")
            taken.add(unit_name)
        if not c.clean_since(entry):
            continue
        assert name and changer and slots and media is not None and ie is not None and pers
        libs.append(LibrarySpec(name, changer, tuple(drives), slots, ie, tuple(carts),
                                media, pers.key))
    return tuple(libs)


def _check_personality(c: Checker, raw: object, path: str) -> ChangerPersonality | None:
    """The changer personality named by `raw` (absent: the default), or None after a problem."""
    if raw is None:
        return DEFAULT_CHANGER_PERSONALITY
    try:
        if not isinstance(raw, str):
            raise ConfigError(str(raw))
        return changer_personality(raw)
    except ConfigError:
        c.fail(path, raw, f"a library personality, one of {', '.join(CHANGER_PERSONALITIES)}"
               " (case-insensitive)")
        return None


def _check_drive_model(c: Checker, model: str, path: str) -> str | None:
    """The model if the VTL's personality table knows it."""
    try:
        personality(model)
    except ConfigError as exc:
        c.fail(path, model, f"a known drive model ({exc})")
        return None
    return model


def _check_media_types(c: Checker, codes: list[str], spec: str, path: str) -> bool:
    """True if every barcode names an LTO media type (L5..L9 data, LT..LZ WORM, CLN...)."""
    for code in codes:
        try:
            parse_barcode(code)
        except ConfigError:
            c.fail(path, spec, f"barcodes with an LTO media suffix (L3..L9 data, LT..LZ WORM)"
                   f" or a CLN prefix; {code!r} has none")
            return False
    return True


def library_devices(lib: LibrarySpec, defaults: Defaults) -> list[Device]:
    """The ``vtl`` devices of a library: the changer, then each drive, with the library
    settings (LIBRARY_DEVICE_SIZE, LIBRARY_HW_MAX_SECTORS, LIBRARY_CMD_TIME_OUT) and
    ``max_data_area_mb`` from ``defaults`` (at least what one command of hw_max_sectors needs)."""
    area = max(defaults.max_data_area_mb, (LIBRARY_HW_MAX_SECTORS * 512) >> 20)
    return [Device(name, "vtl", LIBRARY_DEVICE_SIZE, 512, LIBRARY_HW_MAX_SECTORS, area,
                   LIBRARY_CMD_TIME_OUT, False, (("library", lib.media_dir), ("unit", unit)),
                   serial)
            for name, unit, serial in lib.units()]


def prepare(config: ConfigView) -> None:
    """Create the YAML's tape libraries (directory, slots, import/export elements, drives) and
    their declared cartridges, idempotently: an existing library is kept as it is (cartridges
    stay where the last moves put them) and only missing cartridges are added. A library whose
    layout differs from its declaration raises LibraryError naming the difference, before any
    LIO object is created."""
    from .admin import ensure_library

    for lib in config.section(SECTION):
        ensure_library(
            lib.media_dir,
            name=lib.name,
            drives=[(d.unit_serial(), d.model) for d in lib.drives],
            slots=lib.slots,
            import_export=lib.import_export,
            cartridges=lib.cartridges,
            personality=lib.personality,
        ).close()
