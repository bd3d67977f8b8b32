"""LTO drive personalities and cartridge media types.

Facts this module encodes (LTO Program compatibility rules, IBM/HP LTO SCSI references):

* Density codes (MODE SENSE block descriptor, REPORT DENSITY SUPPORT): LTO-3 44h, LTO-4 46h,
  LTO-5 58h, LTO-6 5Ah, LTO-7 5Ch, LTO-8 5Eh, LTO-9 60h.
* An LTO-N drive up to LTO-7 reads generations N, N-1 and N-2 and writes N and N-1. From LTO-8 on
  the drive reads and writes N and N-1 only (no N-2 read).
* Barcode suffixes: ``L3``..``L9`` data cartridges of that generation; ``LT``/``LU``/``LV``/``LW``/
  ``LX``/``LY``/``LZ`` WORM cartridges of generations 3..9; a barcode starting with ``CLN`` is a
  cleaning cartridge (suffix ``CU`` or ``L1``.. is then irrelevant).
* The IBM MODE SENSE medium type is ``gen << 4 | 8`` for data and ``gen << 4 | 0Ch`` for WORM.

Pure data; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from tcmu_py.errors import ConfigError

#: Largest logical block an LTO drive accepts (READ BLOCK LIMITS: 8 MiB).
LTO_MAX_BLOCK_LENGTH = 0x800000


@dataclass(frozen=True)
class Generation:
    """One LTO generation as a recording format."""

    number: int  # 3..9
    density_code: int
    capacity: int  # native (uncompressed) capacity in bytes
    bits_per_mm: int
    tracks: int
    density_name: str  # REPORT DENSITY SUPPORT DENSITY NAME (8 ASCII)
    description: str  # REPORT DENSITY SUPPORT DESCRIPTION (20 ASCII)
    medium_length_m: int

    @property
    def name(self) -> str:
        return f"LTO-{self.number}"


GENERATIONS: dict[int, Generation] = {
    g.number: g
    for g in (
        Generation(3, 0x44, 400 * 10**9, 9638, 704, "U-316", "Ultrium 3/16T", 680),
        Generation(4, 0x46, 800 * 10**9, 12725, 896, "U-416", "Ultrium 4/16T", 820),
        Generation(5, 0x58, 1500 * 10**9, 15142, 1280, "U-516", "Ultrium 5/16T", 846),
        Generation(6, 0x5A, 2500 * 10**9, 15142, 2176, "U-616", "Ultrium 6/16T", 846),
        Generation(7, 0x5C, 6000 * 10**9, 19107, 3584, "U-732", "Ultrium 7/32T", 960),
        Generation(8, 0x5E, 12000 * 10**9, 20669, 6656, "U-832", "Ultrium 8/32T", 960),
        Generation(9, 0x60, 18000 * 10**9, 21456, 8960, "U-932", "Ultrium 9/48T", 1035),
    )
}

#: Density code -> generation number.
DENSITY_TO_GENERATION: dict[int, int] = {g.density_code: n for n, g in GENERATIONS.items()}

#: WORM barcode suffix letter (second character after ``L``) per generation.
_WORM_SUFFIX = {"T": 3, "U": 4, "V": 5, "W": 6, "X": 7, "Y": 8, "Z": 9}


class MediumKind(Enum):
    DATA = "data"
    WORM = "worm"
    CLEANING = "cleaning"


@dataclass(frozen=True)
class MediaType:
    """What a barcode says about a cartridge."""

    kind: MediumKind
    generation: int | None  # None for a cleaning cartridge

    @property
    def worm(self) -> bool:
        return self.kind is MediumKind.WORM

    @property
    def cleaning(self) -> bool:
        return self.kind is MediumKind.CLEANING

    @property
    def ibm_medium_type(self) -> int:
        """MODE SENSE header MEDIUM TYPE as IBM LTO drives report it (0 for cleaning)."""
        if self.generation is None:
            return 0
        return (self.generation << 4) | (0x0C if self.worm else 0x08)


def parse_barcode(barcode: str) -> MediaType:
    """Classify a cartridge by its barcode (volume tag); ConfigError if it names no LTO type."""
    tag = barcode.strip().upper()
    if tag.startswith("CLN"):
        return MediaType(MediumKind.CLEANING, None)
    if len(tag) < 3 or tag[-2] != "L":
        raise ConfigError(
            f"barcode {barcode!r}: expected an LTO suffix L3..L9, LT..LZ, or CLN prefix"
        )
    last = tag[-1]
    if last.isdigit() and int(last) in GENERATIONS:
        return MediaType(MediumKind.DATA, int(last))
    if last in _WORM_SUFFIX:
        return MediaType(MediumKind.WORM, _WORM_SUFFIX[last])
    raise ConfigError(f"barcode {barcode!r}: suffix L{last} is not an LTO-3..9 data or WORM type")


@dataclass(frozen=True)
class DrivePersonality:
    """How a drive presents itself (INQUIRY) and which generations it handles."""

    key: str  # stable short name, e.g. "IBM-LTO8"
    vendor: str
    product: str
    revision: str
    generation: int
    max_block_length: int = LTO_MAX_BLOCK_LENGTH
    min_block_length: int = 1

    @property
    def native(self) -> Generation:
        return GENERATIONS[self.generation]

    @cached_property  # the personality is frozen: computed once
    def reads(self) -> frozenset[int]:
        """Generations this drive reads (LTO rules: N, N-1, and N-2 up to LTO-7)."""
        n = self.generation
        gens = {n, n - 1} if n >= 8 else {n, n - 1, n - 2}
        return frozenset(g for g in gens if g in GENERATIONS)

    @cached_property
    def writes(self) -> frozenset[int]:
        """Generations this drive writes: N and N-1."""
        return frozenset(g for g in (self.generation, self.generation - 1) if g in GENERATIONS)

    @property
    def densities(self) -> list[Generation]:
        """Every readable generation, newest first (REPORT DENSITY SUPPORT order)."""
        return [GENERATIONS[g] for g in sorted(self.reads, reverse=True)]


#: HP / HPE Ultrium drives: INQUIRY vendor and revision per generation. The vendor is "HP" up to
#: LTO-7 and "HPE" from LTO-8 on (Hewlett Packard Enterprise), the product "Ultrium N-SCSI" for
#: every interface (IBM's LTFS, tape_drivers/hp_tape.c, lists HP "Ultrium 5/6/7-SCSI" and HPE
#: "Ultrium 8-SCSI"; LTO-9 continues the HPE pattern). HP revisions are four characters; the
#: LTO-6 one (J5SW) is what a real HP Ultrium 6-SCSI drive reported in a public diagnostic
#: log; the others are plausible values of the same shape, not taken from devices.
_HP = {5: ("HP", "I6RZ"), 6: ("HP", "J5SW"), 7: ("HP", "J5TW"), 8: ("HPE", "J4DB"),
       9: ("HPE", "P3FW")}


def _make() -> dict[str, DrivePersonality]:
    out: dict[str, DrivePersonality] = {}
    for n in range(5, 10):
        ibm = DrivePersonality(f"IBM-LTO{n}", "IBM", f"ULT3580-TD{n}", "TP10", n)
        vendor, revision = _HP[n]
        hp = DrivePersonality(f"HP-LTO{n}", vendor, f"Ultrium {n}-SCSI", revision, n)
        out[ibm.key] = ibm
        out[hp.key] = hp
    return out


PERSONALITIES: dict[str, DrivePersonality] = _make()
DEFAULT_PERSONALITY = PERSONALITIES["IBM-LTO8"]


def personality(model: str) -> DrivePersonality:
    """Find a personality by key or by how people name drives.

    Accepted (case-insensitive): ``IBM-LTO8``, ``HP-LTO6``, ``HPE-LTO8``, ``ULT3580-TD8``,
    ``IBM ULT3580-TD8``, ``Ultrium 8-SCSI``, ``HP Ultrium 8-SCSI``, ``HPE Ultrium 8-SCSI``,
    ``LTO8``, ``LTO-8``, ``L8`` (these mean IBM).
    """
    text = " ".join(model.strip().upper().split())
    for p in PERSONALITIES.values():
        names = {
            p.key.upper(),
            p.product.upper(),
            f"{p.vendor} {p.product}".upper(),
        }
        if p.vendor == "HPE":  # HP-LTO8 is also HPE-LTO8, and "HP Ultrium 8-SCSI" as before
            names |= {f"HPE-LTO{p.generation}", f"HP {p.product}".upper()}
        if text in names:
            return p
    for prefix in ("LTO-", "LTO", "L"):
        rest = text.removeprefix(prefix)
        if rest != text and rest.isdigit() and f"IBM-LTO{rest}" in PERSONALITIES:
            return PERSONALITIES[f"IBM-LTO{rest}"]
    raise ConfigError(
        f"drive model {model!r}: expected one of {sorted(PERSONALITIES)} or a product id such as "
        "'ULT3580-TD8' / 'Ultrium 8-SCSI'"
    )
