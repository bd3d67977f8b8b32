"""Library (changer) personalities: the identity, element address ranges and READ ELEMENT STATUS
details of real tape libraries, selected by ``libraries[].personality`` in the YAML.

A personality is pure data. It is applied once, when a library is created: its identity and
first element addresses are written into library.json with its key (`Library.create`), and the
changer reads them from there, so a library keeps the layout it was created with. Changing the
personality of an existing library would move every element address under the backup
software's catalogue; `admin.ensure_library` refuses it (see docs/configuration.md).

Facts encoded, with where they come from
----------------------------------------
``tcmu-py`` (the default; what every library created before personalities existed reports):
  vendor ``TCMU-PY``, product ``VTL LIBRARY``, revision ``0100``; medium transport 0001h, data
  transfer 0100h, import/export 0300h, storage 0400h (an IBM-like layout with room for 511
  drives); DVCID identifier: the drive's unit serial, vendor specific, no padding.

``stk-sl150`` (Oracle StorageTek SL150 modular library):
  * Element addresses — Oracle, "StorageTek SL150 Modular Tape Library Interface Reference
    Manual" (E51473-03, July 2017), Mode Select/Mode Sense element address assignment page,
    table 4-47: first medium transport element 0000h (one hand), first storage element 03E8h
    (1000), first import/export element 000Ah (10), first data transfer element 01F4h (500);
    the library does not support changing them. The same values are in Oracle's SL150 User's
    Guide (docs.oracle.com/cd/E35103_07/SLOFS/app_slot_map.htm, table A-1: hand 0, mailslot
    10, drives 500, storage slots 1000).
  * DVCID — Oracle ACSLS SCSI reference (docs.oracle.com/cd/F12888_01/ACSIR, the data transfer
    element descriptor with DvcID=1, shared by the StorageTek SCSI libraries): code set 2
    (ASCII), identifier type 0 (vendor specific), the drive's ASCII serial number, padded to a
    32-byte identifier field. The SL150/SL500 manuals show the same identifier layout.
  * Import/export (mailslot) elements report InEnab = ExEnab = 1 (SL500 Interface Reference
    Manual 96122, import/export element descriptor, table 6-75); alternate volume tags are not
    supported (AVolTag 0, SL150 manual table 4-103) — both as our changer does.
  * Vendor ``STK`` and product ``SL150``: the library's model name under StorageTek's vendor
    id, as Oracle's SL-series report it; the revision ``0300`` is a plausible firmware level
    in the 4-character format, not taken from a device.
  * Default drive: ``HP-LTO8`` — the SL150 was sold with HP (later HPE) half-height LTO
    drives; IBM LTO drives were added later. Not from a SCSI reference.
  * Vendor specific bytes after each descriptor's identification fields (SL150 manual, Read
    Element Status, element descriptor tables such as 4-104): MEDIA DOMAIN and MEDIA TYPE, two
    ASCII characters from the cartridge label — 'L' and the generation digit for LTO data
    ('1'..'7' listed; '8', '9' follow the pattern), 'L' and the WORM letter ('T'..'X' listed,
    'Y', 'Z' follow), 'C' and 'U' for a universal cleaning cartridge; FFh FFh "cannot be
    determined" (we report that for an empty element, where the manual calls the fields not
    valid) — then two reserved bytes, or for a data transfer element TRANSPORT DOMAIN 'L' and
    TRANSPORT TYPE: 3Bh HP LTO-5, 3Dh HP LTO-6, 3Eh IBM LTO-6, 2Dh IBM LTO-7, FFh for a drive
    the manual lists no code for. A drive's identifier field is 32 bytes when DVCID is set;
    without DVCID we send an empty identifier (the manual's descriptor then keeps a 32-byte
    pad: not modelled), and storage / import/export descriptors carry no identifier pad.

``quantum-scalar-i500`` (Quantum Scalar i500):
  * Vendor ``QUANTUM`` and product ``Scalar i500`` — Quantum, "Scalar Intelligent Libraries
    SCSI Reference Guide", INQUIRY: vendor "ADIC" or "QUANTUM", product by library type, among
    them "Scalar i500" (space filled to 16 bytes); the revision is "the ASCII representation of
    the revision level, such as 100A or 203A" — we report ``100A``, that document's example.
  * Element addresses — Dell "PowerVault ML6000 SCSI Reference Guide" (the ML6000 is Quantum's
    Scalar i500 sold by Dell), element address assignment page 1Dh: first medium transport
    0001h, first storage 1000h, first import/export 0010h, first data transfer 0100h.
  * DVCID — not established from a public reference: we report the T10 vendor ID form
    (identifier type 1: vendor 8, product 16, serial), a plausible choice for a library that
    reports its drives' INQUIRY identity.
  * Default drive: ``IBM-LTO8`` (Scalar i500 libraries ship with IBM LTO drives; HP drives were
    offered too). Not from a SCSI reference.

Both non-default personalities keep our transport (no VOLTAG for an always-empty hand),
import/export and device capabilities behaviour; the differences an initiator sees are the
identity, the element address ranges and the drive identifier format.

Pure data; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tcmu_py.errors import ConfigError
from tcmu_py.handlers.vtl.personality import MediumKind, parse_barcode
from tcmu_py.scsi.smc import ElementType

__all__ = [
    "CHANGER_PERSONALITIES",
    "DEFAULT_CHANGER_PERSONALITY",
    "ChangerPersonality",
    "changer_personality",
]


@dataclass(frozen=True)
class ChangerPersonality:
    """How a library presents itself: INQUIRY identity of the changer LUN, the first element
    address of each element type, the DVCID identifier form of its drives, and the drive model
    its drives default to."""

    key: str  # stable lower-case name, as written in the YAML and in library.json
    title: str  # what it imitates, for docs and messages
    vendor: str  # INQUIRY VENDOR IDENTIFICATION (8)
    product: str  # INQUIRY PRODUCT IDENTIFICATION (16)
    revision: str  # INQUIRY PRODUCT REVISION LEVEL (4)
    first_address: Mapping[ElementType, int]
    dvcid: str  # "serial" (vendor specific: the drive serial) or "t10" (T10 vendor ID form)
    identifier_length: int  # DVCID identifier field padded to at least this length (0: none)
    default_drive: str  # drive personality key (personality.PERSONALITIES)
    #: StorageTek's vendor specific bytes after each element descriptor's identifier: MEDIA
    #: DOMAIN, MEDIA TYPE, and for drives TRANSPORT DOMAIN, TRANSPORT TYPE (`stk_media_bytes`).
    stk_media_bytes: bool = False


def _addresses(mt: int, st: int, ie: int, dt: int) -> Mapping[ElementType, int]:
    return MappingProxyType({
        ElementType.MEDIUM_TRANSPORT: mt,
        ElementType.STORAGE: st,
        ElementType.IMPORT_EXPORT: ie,
        ElementType.DATA_TRANSFER: dt,
    })


CHANGER_PERSONALITIES: Mapping[str, ChangerPersonality] = MappingProxyType({
    p.key: p
    for p in (
        ChangerPersonality("tcmu-py", "tcmu-py virtual library", "TCMU-PY", "VTL LIBRARY",
                           "0100", _addresses(0x0001, 0x0400, 0x0300, 0x0100), "serial", 0,
                           "IBM-LTO8"),
        ChangerPersonality("stk-sl150", "Oracle StorageTek SL150", "STK", "SL150", "0300",
                           _addresses(0x0000, 0x03E8, 0x000A, 0x01F4), "serial", 32, "HP-LTO8",
                           stk_media_bytes=True),
        ChangerPersonality("quantum-scalar-i500", "Quantum Scalar i500", "QUANTUM",
                           "Scalar i500", "100A", _addresses(0x0001, 0x1000, 0x0010, 0x0100),
                           "t10", 0, "IBM-LTO8"),
    )
})

DEFAULT_CHANGER_PERSONALITY = CHANGER_PERSONALITIES["tcmu-py"]


#: SL150 TRANSPORT TYPE codes of the drives its manual lists (drive personality key -> code).
STK_TRANSPORT_TYPE: Mapping[str, int] = MappingProxyType({
    "HP-LTO5": 0x3B, "HP-LTO6": 0x3D, "IBM-LTO6": 0x3E, "IBM-LTO7": 0x2D,
})


def stk_media_bytes(barcode: str | None) -> bytes:
    """MEDIA DOMAIN and MEDIA TYPE of a StorageTek element holding `barcode` (None: empty):
    the LTO label's last two characters (``L8``, WORM ``LY``), ``CU`` for a cleaning cartridge,
    FFFFh when empty or not an LTO label."""
    if barcode is None:
        return b"\xff\xff"
    try:
        media = parse_barcode(barcode)
    except ConfigError:
        return b"\xff\xff"
    if media.kind is MediumKind.CLEANING:
        return b"CU"
    # parse_barcode accepted the label: it ends in "L" and the generation's digit or WORM letter
    return barcode.strip().upper()[-2:].encode()


def stk_transport_bytes(drive_key: str) -> bytes:
    """TRANSPORT DOMAIN and TRANSPORT TYPE of a StorageTek data transfer element."""
    return b"L" + bytes([STK_TRANSPORT_TYPE.get(drive_key, 0xFF)])


def changer_personality(name: str) -> ChangerPersonality:
    """The personality named `name` (case-insensitive; ``_`` and spaces read as ``-``).
    ConfigError naming the accepted keys otherwise."""
    key = "-".join(name.strip().lower().replace("_", " ").split())
    try:
        return CHANGER_PERSONALITIES[key]
    except KeyError:
        raise ConfigError(
            f"library personality {name!r}: expected one of {', '.join(CHANGER_PERSONALITIES)}"
        ) from None
