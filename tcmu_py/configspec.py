"""What the YAML loader and the handlers that own YAML sections share (neither imports the other).

The daemon's loader (`tcmu_py.daemon.config`) walks the document; a handler that owns a section
(`tcmu_py.handler.Handler.config_sections`, e.g. thin's ``pools:``) validates it with the same
`Checker`, so every problem is reported the same way, all at once: one problem is one line,
``<file>: <key path>: got <value!r>, expected <what>``; several are a count and then one such
line each (the first MAX_PROBLEMS). Values are quoted cut short, so a line stays a line whatever
the file holds.

`Defaults` and `Device` are the validated, frozen specs handlers are shown (a device's
``dev_config`` is built from them, `config_string_problem` says what the kernel would mangle).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tcmu_py.statefile import short_repr

__all__ = [
    "EXPECT_SIZE",
    "MAX_PROBLEMS",
    "MISSING",
    "NAME_RE",
    "OPTION_KEY_RE",
    "TCMU_CONFIG_MAX",
    "Checker",
    "Defaults",
    "Device",
    "Entry",
    "config_string_problem",
    "join_config_items",
    "load_device_options",
    "parse_size",
    "raw_names",
]

# target_core_user.h: #define TCMU_CONFIG_LEN 256 (NUL included).
TCMU_CONFIG_MAX = 255
#: Problems listed in one ConfigError; the rest are counted.
MAX_PROBLEMS = 20

#: An LIO object name (storage objects, pools, libraries): rtslib-fb refuses ``/`` and spaces.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A key of a device's ``options:`` (it becomes a ``key=value`` item of the dev_config).
OPTION_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGTP]?)(i?B)?", re.IGNORECASE)
_SIZE_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
#: The largest size a configuration may give (bytes): the kernel's sizes are 64-bit.
MAX_SIZE = (1 << 64) - 1
#: RFC 3720 3.2.6.1: an iSCSI name is at most 223 bytes (the kernel refuses longer ones).
MAX_ISCSI_NAME = 223
# RFC 3720 3.2.6.3.1: "iqn." yyyy-mm "." reversed domain name, optionally ":" unique string.
_IQN_RE = re.compile(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[^\s]+)?")
# RFC 3720 3.2.6.3.2: "eui." 16 hex digits (EUI-64).
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}")
# RFC 3980: "naa." 16 or 32 hex digits.
_NAA_RE = re.compile(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})")


EXPECT_SIZE = "a size: a byte count or an integer with K, M, G, T or P (powers of 1024), e.g. 512M"


def parse_size(value: object) -> int:
    """Return the byte count of ``10G`` / ``512M`` / ``4KiB`` / ``1048576`` (powers of 1024).

    Raises ValueError for anything else (floats, negative numbers, booleans, unknown suffixes).
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_MULT[m.group(2).upper()]
    raise ValueError(value)


@dataclass(frozen=True)
class Defaults:
    """Per-device values used when a device does not set its own."""

    block_size: int = 512
    hw_max_sectors: int = 1024
    max_data_area_mb: int = 128
    cmd_time_out: int = 30
    write_cache: bool = False


@dataclass(frozen=True)
class Device:
    """One TCMU backstore. ``options`` keeps the YAML order; for ``raw`` it holds exactly
    ``("path", <absolute image path>)``. ``pool`` is the name of a pool the device draws from
    (declared in a section some handler owns, e.g. thin's ``pools:``); ``config_items`` are the
    items that section's owner adds to the device's dev_config (`Handler.device_config_items`,
    e.g. ``("pool", <pool directory>)``), so the dev_config describes the device on its own."""

    name: str
    handler: str
    size: int
    block_size: int
    hw_max_sectors: int
    max_data_area_mb: int
    cmd_time_out: int
    write_cache: bool
    options: tuple[tuple[str, str], ...] = ()
    serial: str | None = None
    wwn: str | None = None
    pool: str | None = None
    config_items: tuple[tuple[str, str], ...] = ()
    #: The copy domain the device belongs to (EXTENDED COPY between its members); None: its own.
    copy_domain: str | None = None
    #: False: every command of this device in Python, even with `serve --data-plane`.
    data_plane: bool = True

    def options_dict(self) -> dict[str, str]:
        return dict(self.options)


def config_string_problem(cfg: str) -> str | None:
    """What the kernel or rtslib-fb would do wrong with dev_config `cfg`, or None if nothing.

    target_core_user.c parses ``control`` with ``strsep(&opts, ",\\n")`` into a
    ``char dev_config[TCMU_CONFIG_LEN]``; rtslib-fb refuses ``:``.
    """
    if len(cfg) > TCMU_CONFIG_MAX:
        return f"at most {TCMU_CONFIG_MAX} characters (TCMU_CONFIG_LEN), got {len(cfg)}"
    for ch, why in ((":", "rtslib-fb refuses ':'"), (",", "the kernel cuts control at ','"),
                    ("\n", "the kernel cuts control at a newline")):
        if ch in cfg:
            return f"no {ch!r} ({why})"
    return None


def join_config_items(items: Sequence[tuple[str, str]]) -> str:
    """``key=value;key=value``: the config string of a device whose handler takes options
    (`tcmu_py.handler.Handler.config_string`). ``;``, never ``,``: the kernel cuts ``control``
    at a comma (`config_string_problem`)."""
    return ";".join(f"{k}={v}" for k, v in items)


def load_device_options(c: Checker, raw: object, path: str) -> tuple[tuple[str, str], ...] | None:
    """A device's ``options:`` mapping as ``(key, text)`` pairs in YAML order (booleans as 1/0),
    every problem reported to `c`; None if `raw` is not a mapping. The default
    `tcmu_py.handler.Handler.load_options`."""
    m = c.mapping(raw, path, None)
    if m is None:
        return None
    out: list[tuple[str, str]] = []
    for key, value in m.items():
        kp = f"{path}.{key}"
        if not isinstance(key, str) or not OPTION_KEY_RE.fullmatch(key):
            c.fail(kp, key, "an option name of letters, digits, _ . -")
            continue
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, int | str):
            text = str(value)
        else:
            c.fail(kp, value, "a string, integer or boolean")
            continue
        if any(ch in text for ch in ";=,:\n"):
            c.fail(kp, value, "a value without ';', '=', ',', ':' or newline")
            continue
        out.append((key, text))
    return tuple(out)


def raw_names(items: object) -> set[str]:
    """The ``name:`` strings of a YAML list of mappings as written, valid or not: names of
    entries that failed validation still count for cross references, so one bad entry does not
    cascade into a "no such name" problem everywhere it is named."""
    if not isinstance(items, list):
        return set()
    return {i["name"] for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)}


class Entry(NamedTuple):
    """One mapping of a YAML list of named objects (`Checker.named_entries`)."""

    #: Its key path, ``pools[2]``.
    path: str
    #: The mapping as written.
    fields: dict[str, Any]
    #: Its ``name:``, None when missing or invalid.
    name: str | None
    #: How many problems the checker had before this entry (`Checker.clean_since`).
    before: int


#: The value of a required key that is absent (`Checker.fail` says "got nothing").
MISSING = object()


class Checker:
    """Collects problems while walking the parsed YAML; every getter returns None on a problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        #: Directories a section's entry has taken for its own (a pool's, a library's), by
        #: real path: the key path that took each first (`claim_directory`).
        self.directories: dict[str, str] = {}

    def claim_directory(self, directory: str, path: str, value: object) -> None:
        """Take `directory` for the entry at `path` (`value` as given); a problem naming the
        entry that has it if another entry (of any section) took it first: a pool and a
        library, or two pools, in one directory would take each other's files."""
        first = self.directories.setdefault(os.path.realpath(directory), path)
        if first != path:
            self.fail(path, value, f"a directory no other pool or library uses ({first} has it)")

    def report(self) -> str:
        """The ConfigError message: the problem itself when there is one, else a count and the
        first MAX_PROBLEMS of them, one per line."""
        if len(self.problems) == 1:
            return self.problems[0]
        shown = self.problems[:MAX_PROBLEMS]
        more = len(self.problems) - len(shown)
        tail = [f"{self.source}: ... and {more} more problem(s)"] if more else []
        return "\n".join([f"{len(self.problems)} problem(s) in {self.source}:", *shown, *tail])

    def fail(self, path: str, value: object, expected: str) -> None:
        got = "nothing" if value is MISSING else short_repr(value)
        self.problems.append(f"{self.source}: {path or '(top level)'}: got {got},"
                             f" expected {expected}")

    def mapping(self, value: object, path: str, allowed: set[str] | None,
                required: frozenset[str] = frozenset()) -> dict[str, Any] | None:
        """``allowed`` None: any key (the caller checks them)."""
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            keys = f" with keys {', '.join(sorted(allowed))}" if allowed else ""
            self.fail(path, value, f"a mapping{keys}")
            return None
        for key in value:
            if allowed is not None and key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, value[key], f"one of the keys {', '.join(sorted(allowed))}"
                          " (unknown key)")
        for key in sorted(required):
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, MISSING, "this required key")
        return value

    def named_entries(self, raw: object, path: str, allowed: set[str],
                      required: frozenset[str], noun: str) -> Iterator[Entry]:
        """Each mapping of the list `raw` (key path `path`) with the keys `allowed`, its
        `required` ones present, and its ``name:`` an LIO object name no earlier entry has (``a
        <noun> name not used before``). Entries that are not mappings are reported and
        skipped; an entry's own problems are reported and it is yielded all the same (its
        caller checks `clean_since`)."""
        seen: set[str] = set()
        for i, item in enumerate(self.seq(raw, path) or []):
            p = f"{path}[{i}]"
            before = len(self.problems)
            m = self.mapping(item, p, allowed, required)
            if m is None:
                continue
            name = self.name(m["name"], f"{p}.name") if "name" in m else None
            if name is not None:
                if name in seen:
                    self.fail(f"{p}.name", name, f"a {noun} name not used before (duplicate)")
                seen.add(name)
            yield Entry(p, m, name, before)

    def clean_since(self, entry: Entry) -> bool:
        """Whether no problem was reported since `entry` was yielded."""
        return len(self.problems) == entry.before

    def seq(self, value: object, path: str) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, value, "a list")
            return None
        return value

    def integer(self, value: object, path: str, lo: int, hi: int | None = None,
                what: str | None = None) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
                hi is not None and value > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            self.fail(path, value, what or f"an integer {rng}")
            return None
        return value

    def boolean(self, value: object, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(path, value, "true or false")
            return None
        return value

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None,
               what: str = "a string") -> str | None:
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(path, value, what)
            return None
        return value

    def name(self, value: object, path: str) -> str | None:
        return self.string(value, path, NAME_RE,
                           "a name of 1..64 characters A-Z a-z 0-9 _ . - starting with a letter"
                           " or digit (LIO object name)")

    def abspath(self, value: object, path: str) -> str | None:
        if (not isinstance(value, str) or not value.startswith("/") or "\n" in value
                or "\0" in value):
            self.fail(path, value, "an absolute path")
            return None
        return str(Path(value))

    def size(self, value: object, path: str, positive: bool = True) -> int | None:
        try:
            n = parse_size(value)
        except ValueError:
            self.fail(path, value, EXPECT_SIZE)
            return None
        if positive and n == 0:
            self.fail(path, value, "a size greater than zero")
            return None
        if n > MAX_SIZE:
            # The kernel's sizes (dev_size, block counts) are 64-bit: a larger one passed the
            # check and failed `apply` with a traceback.
            self.fail(path, value, f"a size of at most {MAX_SIZE} bytes (16 EiB)")
            return None
        return n

    def wwn(self, value: object, path: str) -> str | None:
        if isinstance(value, str):
            norm = value.strip().lower()
            if len(norm) <= MAX_ISCSI_NAME and (
                    _IQN_RE.fullmatch(norm) or _EUI_RE.fullmatch(norm)
                    or _NAA_RE.fullmatch(norm)):
                return norm
        self.fail(path, value, "an iSCSI name: iqn.yyyy-mm.reversed.domain[:id] (RFC 3720),"
                  " eui.<16 hex digits> or naa.<16 or 32 hex digits>, at most "
                  f"{MAX_ISCSI_NAME} bytes")
        return None
