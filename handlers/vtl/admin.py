"""Operator functions behind `tcmu-py vtl`: libraries, cartridges, inventory, import/export, dump.

These work on the library directory directly and may run while the daemon serves the library:
`Library` serialises the two processes with its lock file, and the daemon's changer reports
IMPORT OR EXPORT ELEMENT ACCESSED when it notices the change. Every function raises
`LibraryError` (or `ConfigError` for bad arguments) with a message naming what is wrong, before
changing anything where that can be checked up front.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tcmu_py.errors import ConfigError, TcmuError
from tcmu_py.handlers.vtl.changer_personality import (
    CHANGER_PERSONALITIES,
    DEFAULT_CHANGER_PERSONALITY,
    changer_personality,
)
from tcmu_py.handlers.vtl.config import expand_barcodes
from tcmu_py.handlers.vtl.library import (
    ChangerIdentity,
    Library,
    LibraryError,
    Occupant,
    check_barcode,
)
from tcmu_py.handlers.vtl.statefile import check_serial
from tcmu_py.scsi.smc import ElementType

#: More cartridges than this in one range is almost certainly a typo.
MAX_RANGE = 100_000

_TYPE_NAMES = {
    ElementType.MEDIUM_TRANSPORT: "transport",
    ElementType.STORAGE: "slot",
    ElementType.IMPORT_EXPORT: "import/export",
    ElementType.DATA_TRANSFER: "drive",
}


def parse_barcode_range(spec: str) -> list[str]:
    """Barcodes named by `spec`: one barcode, or `FIRST..LAST` where the two differ only in one
    run of digits (`ABC000L8..ABC019L8` -> ABC000L8, ABC001L8, ..., ABC019L8; zero padding
    kept). Several specs may be joined with commas. Raises ConfigError."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        first, sep, last = part.partition("..")
        if not sep:
            out.append(_barcode(part))
            continue
        out += _expand(_barcode(first), _barcode(last))
    if len(set(out)) != len(out):
        raise ConfigError(f"barcode range {spec!r} names a barcode twice")
    return out


def _barcode(text: str) -> str:
    try:
        return check_barcode(text)
    except LibraryError as exc:
        raise ConfigError(str(exc)) from None


def _expand(first: str, last: str) -> list[str]:
    try:
        codes = expand_barcodes(f"{first}..{last}")
    except ValueError:
        raise ConfigError(
            f"barcode range {first}..{last}: expected two barcodes of the same length that "
            "differ in one run of digits only, the first not larger than the last"
        ) from None
    if len(codes) > MAX_RANGE:
        raise ConfigError(f"barcode range {first}..{last}: more than {MAX_RANGE} cartridges")
    return codes


def create_library(
    path: str | Path,
    *,
    name: str,
    drives: Sequence[tuple[str, str]],
    slots: int,
    import_export: int,
    dvcid: str | None = None,
    changer: ChangerIdentity | None = None,
    personality: str | None = None,
) -> Library:
    """Create a library directory; drive models are checked against the known personalities,
    `personality` (a changer personality key, see `changer_personality`) against those."""
    from tcmu_py.handlers.vtl.personality import personality as drive_personality

    for _, model in drives:
        drive_personality(model)  # raises ConfigError naming the accepted models
    if personality is not None:
        changer_personality(personality)  # ConfigError naming the accepted keys
    return Library.create(
        path,
        name=name,
        drives=list(drives),
        slots=slots,
        import_export=import_export,
        dvcid=dvcid,
        changer=changer,
        personality=personality,
    )


def ensure_library(
    path: str | Path,
    *,
    name: str,
    drives: Sequence[tuple[str, str]],
    slots: int,
    import_export: int,
    cartridges: Sequence[str] = (),
    dvcid: str | None = None,
    changer: ChangerIdentity | None = None,
    personality: str | None = None,
) -> Library:
    """Make the library at `path` what a declaration (e.g. the daemon's YAML) says, idempotently.

    A missing library is created. An existing one must have the declared layout (drive serials
    and models in order, slot and import/export counts, and the changer personality when one is
    declared; a library created before personalities existed counts as "tcmu-py"): addresses
    would move otherwise, so a mismatch is a `LibraryError` naming the difference, and nothing
    changes. Cartridges of
    `cartridges` (barcodes or ranges) that do not exist yet are created into free storage slots;
    existing cartridges stay where they are.
    """
    root = Path(path)
    if (root / "library.json").exists():
        lib = Library.open(root)
        have = {
            "name": lib.name,
            "drives": [(lib.drive_serial(i), lib.drive_model(i)) for i in range(lib.drive_count)],
            "slots": lib.ranges()[ElementType.STORAGE][1],
            "import_export": lib.ranges()[ElementType.IMPORT_EXPORT][1],
        }
        want = {
            "name": name,
            "drives": list(drives),
            "slots": slots,
            "import_export": import_export,
        }
        if personality is not None:
            # A personality fixes the element addresses: adopting another one would remap
            # every cartridge under the backup software's catalogue, so it is never done here.
            have["personality"] = lib.personality or DEFAULT_CHANGER_PERSONALITY.key
            want["personality"] = changer_personality(personality).key
        diff = [
            f"{k}: library has {have[k]!r}, declared {want[k]!r}"
            for k in have
            if have[k] != want[k]
        ]
        if diff:
            lib.close()
            raise LibraryError(f"library {root} does not match its declaration: {'; '.join(diff)}")
    else:
        lib = create_library(
            root,
            name=name,
            drives=drives,
            slots=slots,
            import_export=import_export,
            dvcid=dvcid,
            changer=changer,
            personality=personality,
        )
    missing = [b for spec in cartridges for b in parse_barcode_range(spec)]
    missing = [b for b in missing if not lib.media_path(b).exists()]
    if missing:
        create_cartridges(lib, ",".join(missing))
    return lib


def create_cartridges(
    library: Library,
    spec: str,
    *,
    load: bool = True,
    generation: int | None = None,
    worm: bool | None = None,
    capacity: int | None = None,
) -> list[tuple[str, int | None]]:
    """Create blank cartridges for the barcodes of `spec` and, with `load`, put each into the next
    empty storage slot (the rest stay on the shelf). Returns [(barcode, slot or None)].

    Checked before anything is created: the range, each barcode's media type, and that none of
    the cartridges exists yet.
    """
    from tcmu_py.handlers.vtl.cartridge import Cartridge
    from tcmu_py.handlers.vtl.personality import parse_barcode

    barcodes = parse_barcode_range(spec)
    for barcode in barcodes:
        parse_barcode(barcode)
        if library.media_path(barcode).exists():
            raise LibraryError(f"cartridge {barcode} already exists")
    free = [a for a in library.addresses(ElementType.STORAGE) if library.occupant(a) is None]
    result: list[tuple[str, int | None]] = []
    for barcode in barcodes:
        Cartridge.create(
            library.media_path(barcode),
            barcode,
            capacity=capacity,
            generation=generation,
            worm=worm,
        )
        slot = library.place(barcode, free.pop(0)) if load and free else None
        result.append((barcode, slot))
    return result


@dataclass(frozen=True, slots=True)
class InventoryRow:
    """One element of the library, or (address None) one cartridge on the shelf."""

    address: int | None
    element_type: ElementType | None
    number: int  # 1-based number within its type, as mtx prints it (0 for the shelf)
    occupant: Occupant | None
    note: str = ""


def inventory(library: Library) -> list[InventoryRow]:
    """Every element in address order, then the shelf."""
    contents = library.contents()
    rows = []
    for etype in (
        ElementType.MEDIUM_TRANSPORT,
        ElementType.DATA_TRANSFER,
        ElementType.IMPORT_EXPORT,
        ElementType.STORAGE,
    ):
        for number, addr in enumerate(library.addresses(etype), start=1):
            note = ""
            if etype == ElementType.DATA_TRANSFER:
                index = library.drive_index(addr)
                note = f"{library.drive_model(index)} serial {library.drive_serial(index)}"
                if library.drive_prevented(index):
                    note += ", removal prevented"
            elif etype == ElementType.IMPORT_EXPORT and library.ie_is_open(addr):
                note = "open"
            rows.append(InventoryRow(addr, etype, number, contents.get(addr), note))
    rows += [InventoryRow(None, None, 0, Occupant(b), "shelf") for b in library.shelf()]
    return rows


def format_inventory(library: Library) -> Iterator[str]:
    """`inventory` as text lines."""
    locked = " (import/export locked)" if library.ie_prevented else ""
    ident = library.changer_identity
    pers = library.personality or f"{DEFAULT_CHANGER_PERSONALITY.key} (implied)"
    yield f"library {library.name} at {library.path}{locked}"
    yield f"personality {pers}: {ident.vendor} {ident.product} {ident.revision}"
    for row in inventory(library):
        if row.address is None:
            yield f"{'shelf':>22}        {row.occupant.barcode if row.occupant else ''}"
            continue
        assert row.element_type is not None
        kind = _TYPE_NAMES[row.element_type]
        occ = row.occupant
        what = occ.barcode if occ else "empty"
        if occ and occ.source is not None:
            what += f" (from {occ.source:#06x})"
        if occ and occ.imported:
            what += " (operator)"
        note = f"  [{row.note}]" if row.note else ""
        yield f"{kind:>14} {row.number:<5} {row.address:#06x}  {what}{note}"


def dump_cartridge(library: Library, barcode: str) -> Iterator[str]:
    """The cartridge's contents as text (blocks, filemarks, sizes), via the cartridge module."""
    from tcmu_py.handlers.vtl.cartridge import format_dump

    path = library.media_path(barcode)
    if not path.exists():
        raise LibraryError(f"cartridge {barcode} does not exist")
    yield from format_dump(path)


# ---------------------------------------------------------------------------------------------
# Command line: `tcmu-py vtl <command> ...`


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 800G or 1048576")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def _drive(text: str) -> tuple[str, str]:
    model, sep, serial = text.partition(":")
    if not sep or not model or not serial:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL:SERIAL, e.g. IBM-LTO8:XYZ001")
    problem = check_serial(serial)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"serial {serial!r}: expected {problem}")
    return serial, model


def _address(text: str) -> int:
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcmu-py vtl", description="virtual tape library tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("create-library", help="create a library directory")
    s.add_argument("library", type=Path)
    s.add_argument("--name", required=True)
    s.add_argument("--drive", action="append", type=_drive, default=[], metavar="MODEL:SERIAL")
    s.add_argument("--slots", type=int, required=True)
    s.add_argument("--import-export", type=int, default=0)
    s.add_argument("--personality", type=str.lower, choices=list(CHANGER_PERSONALITIES),
                   help="library personality: identity, element addresses, drive identifiers"
                        f" (default {DEFAULT_CHANGER_PERSONALITY.key})")
    s.add_argument("--dvcid", choices=["serial", "t10"],
                   help="drive identifier form (default: the personality's)")
    s.add_argument("--vendor", help="changer INQUIRY vendor (default: the personality's)")
    s.add_argument("--product", help="changer INQUIRY product (default: the personality's)")
    s.add_argument("--revision", help="changer revision (default: the personality's)")

    s = sub.add_parser("create-cartridges", help="create blank cartridges from a barcode range")
    s.add_argument("library", type=Path)
    s.add_argument("barcodes", help="e.g. ABC000L8..ABC019L8")
    s.add_argument("--no-load", action="store_true", help="leave them on the shelf")
    s.add_argument("--generation", type=int)
    s.add_argument("--worm", action="store_true", default=None)
    s.add_argument("--capacity", type=_size)

    s = sub.add_parser("list", help="show the inventory")
    s.add_argument("library", type=Path)

    s = sub.add_parser("import", help="put a shelf cartridge into an import/export element")
    s.add_argument("library", type=Path)
    s.add_argument("barcode")
    s.add_argument("--element", type=_address, help="import/export element address")

    s = sub.add_parser("export", help="take a cartridge out of its import/export element")
    s.add_argument("library", type=Path)
    s.add_argument("barcode")

    s = sub.add_parser("dump", help="show a cartridge's blocks and filemarks")
    s.add_argument("library", type=Path)
    s.add_argument("barcode")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `tcmu-py vtl` command; returns the exit status, errors go to stderr as one line.

    Exit 2 (as `tcmu-py` for a configuration error, and argparse for a bad argument) when an input
    is wrong: a bad argument value (ConfigError) or a malformed library.json, meta.json, mam.json
    or cartridge data header (StateFileError, naming the file, key, value and expectation).
    Exit 1 when the library refuses the request (LibraryError) or the system does (OSError).
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:  # StateFileError included
        print(f"tcmu-py vtl {args.command}: {exc}", file=sys.stderr)
        return 2
    except (TcmuError, OSError, ValueError) as exc:
        print(f"tcmu-py vtl {args.command}: {exc}", file=sys.stderr)
        return 1


def _identity(args: argparse.Namespace) -> ChangerIdentity | None:
    """The changer identity of --vendor/--product/--revision over the personality's; None (the
    personality's own) when none is given."""
    if args.vendor is None and args.product is None and args.revision is None:
        return None
    p = changer_personality(args.personality or DEFAULT_CHANGER_PERSONALITY.key)
    return ChangerIdentity(args.vendor or p.vendor, args.product or p.product,
                           args.revision or p.revision)


def _run(args: argparse.Namespace) -> int:
    if args.command == "create-library":
        lib = create_library(
            args.library,
            name=args.name,
            drives=args.drive,
            slots=args.slots,
            import_export=args.import_export,
            dvcid=args.dvcid,
            changer=_identity(args),
            personality=args.personality,
        )
        print(f"created library {lib.name} at {lib.path}")
        lib.close()
        return 0
    lib = Library.open(args.library)
    try:
        if args.command == "create-cartridges":
            created = create_cartridges(
                lib,
                args.barcodes,
                load=not args.no_load,
                generation=args.generation,
                worm=args.worm,
                capacity=args.capacity,
            )
            for barcode, slot in created:
                print(f"{barcode}  {'shelf' if slot is None else f'slot {slot:#06x}'}")
        elif args.command == "list":
            for line in format_inventory(lib):
                print(line)
        elif args.command == "import":
            addr = lib.import_cartridge(check_barcode(args.barcode), args.element)
            print(f"{args.barcode} in import/export element {addr:#06x}")
        elif args.command == "export":
            addr = lib.export_cartridge(check_barcode(args.barcode))
            print(f"{args.barcode} taken out of import/export element {addr:#06x}")
        elif args.command == "dump":
            for line in dump_cartridge(lib, check_barcode(args.barcode)):
                print(line)
    finally:
        lib.close()
    return 0
