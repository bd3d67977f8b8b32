"""The YAML configuration: load, validate completely, then freeze.

Rules this module obeys:

- Nothing is created here. `load_config` reads one file and returns frozen dataclasses, or raises
  one `ConfigError`: one problem is one line, ``<file>: <key path>: got <value!r>, expected
  <what>``; several are a count and then one such line each (the first MAX_PROBLEMS). Values
  are quoted cut short, so a line stays a line whatever the file holds.
- Hostile files cost bounded time and memory: at most MAX_CONFIG_BYTES are read, nesting
  beyond MAX_DEPTH and alias bombs (more than MAX_NODES nodes once aliases are expanded) are
  refused while parsing, barcode ranges are counted before they are expanded, and anything
  the YAML layer refuses (unhashable or duplicate keys, values their tag cannot hold, bytes that
  are not UTF-8) is a ConfigError naming the line.
- Unknown keys are errors (a typo must not silently fall back to a default).
- Cross references are checked: exports name devices that exist, devices name pools that exist,
  names / LUN numbers / initiators / portals are unique where LIO needs them unique; devices
  are distinct disks (no shared serial, wwn or image file).
- Every device's TCMU ``dev_config`` string (`dev_config_string`) is built and checked at load
  time, so the kernel never sees one it would truncate.

Facts about the kernel that shape the checks (drivers/target/target_core_user.c):

- ``control`` is parsed with ``strsep(&opts, ",\\n")``: a ``dev_config=`` value is cut at the first
  ``,`` or newline, and it is copied into ``char dev_config[TCMU_CONFIG_LEN]`` (256, so at most
  255 characters). Handler options are therefore joined with ``;`` (as tcmu-runner's handlers do),
  never with ``,``.
- rtslib-fb refuses ``:`` in the config string, and a storage object name containing ``/``,
  whitespace or newline.
- The uio device is named ``tcm-user/<hba>/<name>/<dev_config>``, so the handler subtype is the
  first path element of ``dev_config``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from tcmu_py.errors import ConfigError
from tcmu_py.handler import split_wwn
from tcmu_py.statefile import short_repr

try:
    from yaml._yaml import CParser as _EventSource
except ImportError:  # pragma: no cover - PyYAML without libyaml: the pure-Python parser
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventSource(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

__all__ = [
    "DEFAULT_STATE_DIR",
    "Acl",
    "Chap",
    "Config",
    "Defaults",
    "Device",
    "Drive",
    "Exports",
    "IscsiTarget",
    "Library",
    "LunMap",
    "Pool",
    "Portal",
    "dev_config_string",
    "expand_barcodes",
    "library_devices",
    "load_config",
    "load_config_text",
    "load_default_config",
    "parse_size",
]

DEFAULT_STATE_DIR = "/var/lib/tcmu-py"
# target_core_user.h: #define TCMU_CONFIG_LEN 256 (NUL included).
TCMU_CONFIG_MAX = 255
# LIO's per-TPG LUN index limit on the kernels we target (TRANSPORT_MAX_LUNS_PER_TPG = 256 before
# 5.x raised it); 0..255 is valid everywhere.
MAX_LUN = 255
# target_core_user.c: global_max_data_area_mb defaults to 2048; larger per-device values are
# silently clamped to it, so we reject them instead.
MAX_DATA_AREA_MB = 2048

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SUBTYPE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_OPTION_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGTP]?)(i?B)?", re.IGNORECASE)
_SIZE_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# RFC 3720 3.2.6.3.1: "iqn." yyyy-mm "." reversed domain name, optionally ":" unique string.
_IQN_RE = re.compile(r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[^\s]+)?")
# RFC 3720 3.2.6.3.2: "eui." 16 hex digits (EUI-64).
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}")
# RFC 3980: "naa." 16 or 32 hex digits.
_NAA_RE = re.compile(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})")
_SERIAL_RE = re.compile(r"[\x21-\x7e]{1,64}")
_DEVICE_WWN_RE = re.compile(r"naa\.([235][0-9a-f]{15}|6[0-9a-f]{31})")
_BARCODE_RE = re.compile(r"[A-Z0-9]{1,32}")
# Attributes of an iSCSI TPG in configfs (drivers/target/iscsi/iscsi_target_configfs.c).
ISCSI_TPG_ATTRIBUTES = frozenset(
    {
        "authentication",
        "cache_dynamic_acls",
        "default_cmdsn_depth",
        "default_erl",
        "demo_mode_discovery",
        "demo_mode_write_protect",
        "fabric_prot_type",
        "generate_node_acls",
        "login_keys_workaround",
        "login_timeout",
        "netif_timeout",
        "prod_mode_write_protect",
        "t10_pi",
        "tpg_enabled_sendtargets",
    }
)

# Every library unit is a TCMU device with these settings (not configurable: they follow from
# tape, not from the host). The size only has to be non-zero (LIO refuses 0; tapes have no LBAs).
LIBRARY_DEVICE_SIZE = 1 << 20
# Rewind, locate and erase of a full LTO cartridge take minutes on a real drive; a changer move
# tens of seconds. The kernel fails a command that the daemon has not completed in cmd_time_out.
LIBRARY_CMD_TIME_OUT = 300
# 2048 x 512-byte sectors = 1 MiB per command, so tape blocks of 256 KiB .. 1 MiB pass whole
# (LIO's default of 128 sectors would cap a block at 64 KiB).
LIBRARY_HW_MAX_SECTORS = 2048

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


def _barcode_range(spec: str) -> tuple[str, int, int, int, str]:
    """(prefix, first number, last number, digits, suffix) of ``ABC000L8..ABC019L8``; a single
    barcode is a range of one. Raises ValueError unless the ends differ in one run of digits of
    equal width."""
    first, sep, last = spec.partition("..")
    if not sep:
        last = first
    for code in (first, last):
        if not _BARCODE_RE.fullmatch(code):
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


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Defaults:
    """Per-device values used when a device does not set its own."""

    block_size: int = 512
    hw_max_sectors: int = 1024
    max_data_area_mb: int = 128
    cmd_time_out: int = 30
    write_cache: bool = False


@dataclass(frozen=True)
class Pool:
    """A thin-provisioning pool. ``capacity`` and ``hard_limit`` are bytes (hard_limit <= capacity);
    ``soft_threshold`` is a percentage of ``capacity`` (1..100)."""

    name: str
    path: str
    capacity: int
    soft_threshold: int = 80
    hard_limit: int = 0  # the loader always sets it (default: capacity)


@dataclass(frozen=True)
class Device:
    """One TCMU backstore. ``options`` keeps the YAML order; for ``raw`` it holds exactly
    ``("path", <absolute image path>)``."""

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
    pool_path: str | None = None  # the named pool's directory

    def options_dict(self) -> dict[str, str]:
        return dict(self.options)


@dataclass(frozen=True)
class Drive:
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
class Library:
    """A virtual tape library. ``media_dir`` is the library directory (library.json, the
    cartridges under ``media/``); ``cartridges`` keeps the range strings as written (see
    `barcodes`). The loader adds one ``vtl`` `Device` per unit (the changer, then each drive) to
    `Config.devices` (see `library_devices`), so units are exported like any device."""

    name: str
    changer: str
    drives: tuple[Drive, ...]
    slots: int
    import_export: int
    cartridges: tuple[str, ...]
    media_dir: str

    def barcodes(self) -> list[str]:
        return [code for spec in self.cartridges for code in expand_barcodes(spec)]

    def units(self) -> list[tuple[str, str, str | None]]:
        """[(device name, unit option, serial)]: the changer, then drive0..driveN-1."""
        return [(self.changer, "changer", None)] + [
            (d.name, f"drive{i}", d.unit_serial()) for i, d in enumerate(self.drives)]


@dataclass(frozen=True)
class LunMap:
    """A device exported as LUN ``lun`` of a target portal group."""

    device: str
    lun: int


@dataclass(frozen=True)
class Chap:
    """CHAP credentials; the mutual pair is either both set or both None."""

    userid: str
    password: str
    mutual_userid: str | None = None
    mutual_password: str | None = None


@dataclass(frozen=True)
class Acl:
    """An initiator allowed into an iSCSI TPG. ``luns`` names the devices it sees (LUN masking);
    each is mapped at the same LUN number it has in the TPG. None means every TPG LUN."""

    initiator: str
    chap: Chap | None = None
    luns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Portal:
    ip: str
    port: int = 3260

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class IscsiTarget:
    """An iSCSI target with one TPG. ``attributes`` are extra TPG attributes (they override the
    ones derived from ``generate_node_acls`` and ``chap``)."""

    iqn: str
    tpg: int = 1
    portals: tuple[Portal, ...] = (Portal("127.0.0.1", 3260),)
    luns: tuple[LunMap, ...] = ()
    acls: tuple[Acl, ...] = ()
    chap: Chap | None = None
    generate_node_acls: bool = False
    attributes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Exports:
    loopback: tuple[LunMap, ...] = ()
    iscsi: tuple[IscsiTarget, ...] = ()


@dataclass(frozen=True)
class Config:
    """A validated configuration. ``source`` is the file it came from (for messages)."""

    source: str
    state_dir: str = DEFAULT_STATE_DIR
    defaults: Defaults = field(default_factory=Defaults)
    pools: tuple[Pool, ...] = ()
    devices: tuple[Device, ...] = ()
    libraries: tuple[Library, ...] = ()
    exports: Exports = field(default_factory=Exports)

    def device(self, name: str) -> Device:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


# --------------------------------------------------------------------------- dev_config


def _config_string_problem(cfg: str) -> str | None:
    if len(cfg) > TCMU_CONFIG_MAX:
        return f"at most {TCMU_CONFIG_MAX} characters (TCMU_CONFIG_LEN), got {len(cfg)}"
    for ch, why in ((":", "rtslib-fb refuses ':'"), (",", "the kernel cuts control at ','"),
                    ("\n", "the kernel cuts control at a newline")):
        if ch in cfg:
            return f"no {ch!r} ({why})"
    return None


def _build_config_string(handler: str, options: tuple[tuple[str, str], ...],
                         pool: str | None, wwn: str | None = None) -> str:
    """``pool`` is the pool's directory: the dev_config must describe the device on its own,
    so a daemon started without this YAML file (udev, systemd, a restart) can still open it.
    For the same reason ``wwn`` goes in too, as the last item (`tcmu_py.handler.split_wwn`)."""
    if handler == "raw":
        cfg = f"raw/{dict(options)['path']}"
    else:
        pairs = list(options)
        if pool is not None and "pool" not in dict(pairs):
            pairs.append(("pool", pool))
        cfg = f"{handler}/" + ";".join(f"{k}={v}" for k, v in pairs)
    if wwn is not None:
        cfg += f"{'' if cfg.endswith('/') else ';'}wwn={wwn}"
    return cfg


def dev_config_string(device: Device) -> str:
    """The TCMU ``dev_config`` for ``device``: ``raw/<absolute image path>`` for ``raw``,
    otherwise ``<subtype>/key=value;key=value`` (options in YAML order, then
    ``pool=<pool directory>`` if the device names a pool and its options do not); then
    ``;wwn=<wwn>`` if the device sets one (the daemon strips it before the handler sees it).

    Raises ConfigError if the kernel or rtslib-fb would mangle or refuse it.
    """
    cfg = _build_config_string(device.handler, device.options, device.pool_path, device.wwn)
    problem = _config_string_problem(cfg)
    if problem:
        raise ConfigError(f"devices {device.name}: dev_config {cfg!r}: expected {problem}")
    return cfg


# --------------------------------------------------------------------------- loading


#: Largest configuration file read, in bytes. libyaml parses ~0.8 MB/s here, so a hostile file
#: costs a fraction of a second; a configuration of a thousand devices is ~60 KiB.
MAX_CONFIG_BYTES = 256 * 1024
#: Deepest nesting of mappings and lists (a configuration needs six levels).
MAX_DEPTH = 32
#: Most nodes a document may have once every alias is expanded: an alias bomb ("billion
#: laughs") is a few lines that expand to billions, which validation would walk and print.
MAX_NODES = 200_000
#: Problems listed in one ConfigError; the rest are counted.
MAX_PROBLEMS = 20


class _Refused(yaml.MarkedYAMLError):
    """The document breaks one of our limits; ``expected`` says what we accept instead."""

    def __init__(self, problem: str, expected: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.expected = expected


class _ConfigLoader(Composer, _EventSource, SafeConstructor, Resolver):  # type: ignore[misc]
    """Safe YAML with limits: libyaml's parser (events; it refuses nesting beyond 1000 itself),
    PyYAML's composer and safe constructor, and:

    - nesting deeper than MAX_DEPTH is refused before the composer recurses into it;
    - nodes are counted with every alias standing for the whole node it names, and a document
      over MAX_NODES is refused (alias bombs); an alias to a node that contains it (a
      recursive structure, which validation would walk forever) is refused;
    - a mapping key given twice, or one that cannot be a key (a list or mapping), is refused;
    - a value its tag cannot hold (``!!int x``, a 5000-digit integer, the date 2024-13-45) is
      refused with the position of the value, not a raw ValueError.
    """

    def __init__(self, stream: str) -> None:
        _EventSource.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0
        self._expanded: dict[int, int] = {}  # id(anchored node) -> nodes it stands for

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _Refused(f"a document of more than {MAX_NODES} nodes once its aliases are"
                           " expanded", "a configuration without alias bombs (fewer aliases"
                           " of large nodes)", mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            named = self.anchors.get(event.anchor)  # None: the composer reports it undefined
            if named is not None:
                size = self._expanded.get(id(named))
                if size is None:
                    raise _Refused(f"alias *{event.anchor} inside the node it names (a recursive"
                                   " structure)", "aliases to complete nodes only",
                                   event.start_mark)
                self._count(size, event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH} levels", "a configuration nested"
                           f" at most {MAX_DEPTH} levels deep", event.start_mark)
        before = self._nodes
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if getattr(event, "anchor", None) is not None:
            self._expanded[id(node)] = self._nodes - before
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise _Refused(f"{node.tag.rpartition(':')[2]} value {short_repr(node.value)}"
                           f" ({exc})", "a value its type can hold", node.start_mark) from None

    def construct_unique_mapping(self, node: yaml.MappingNode,
                                 deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise _Refused(f"an unhashable key (a {type(key).__name__})", "a mapping key"
                               " that is a scalar (text, number, true/false)",
                               key_node.start_mark)
            if key in seen:
                raise _Refused(f"duplicate key {short_repr(key)}", "each key once per mapping (a"
                               " silent override is a typo trap)", key_node.start_mark)
            seen.add(key)
        return self.construct_mapping(node, deep=deep)  # type: ignore[no-untyped-call]


_ConfigLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _ConfigLoader.construct_unique_mapping)  # type: ignore[type-var, arg-type]


_MISSING = object()


class _Checker:
    """Collects problems while walking the parsed YAML; every getter returns None on a problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

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
        got = "nothing" if value is _MISSING else short_repr(value)
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
                self.fail(f"{path}.{key}" if path else key, _MISSING, "this required key")
        return value

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
        return self.string(value, path, _NAME_RE,
                           "a name of 1..64 characters A-Z a-z 0-9 _ . - starting with a letter"
                           " or digit (LIO object name)")

    def abspath(self, value: object, path: str) -> str | None:
        if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
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
        return n

    def wwn(self, value: object, path: str) -> str | None:
        if isinstance(value, str):
            norm = value.strip().lower()
            if _IQN_RE.fullmatch(norm) or _EUI_RE.fullmatch(norm) or _NAA_RE.fullmatch(norm):
                return norm
        self.fail(path, value, "an iSCSI name: iqn.yyyy-mm.reversed.domain[:id] (RFC 3720),"
                  " eui.<16 hex digits> or naa.<16 or 32 hex digits>")
        return None


def _check_block_size(c: _Checker, value: object, path: str) -> int | None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < 512
            or value > 65536 or value & (value - 1)):
        c.fail(path, value, "a power of two from 512 to 65536")
        return None
    return value


def _load_defaults(c: _Checker, raw: object) -> Defaults:
    base = Defaults()
    m = c.mapping(raw, "defaults", {"block_size", "hw_max_sectors", "max_data_area_mb",
                                    "cmd_time_out", "write_cache"})
    if not m:
        return base
    vals: dict[str, Any] = {}
    if "block_size" in m:
        vals["block_size"] = _check_block_size(c, m["block_size"], "defaults.block_size")
    if "hw_max_sectors" in m:
        vals["hw_max_sectors"] = c.integer(m["hw_max_sectors"], "defaults.hw_max_sectors", 1,
                                           65535)
    if "max_data_area_mb" in m:
        vals["max_data_area_mb"] = c.integer(m["max_data_area_mb"], "defaults.max_data_area_mb",
                                             1, MAX_DATA_AREA_MB)
    if "cmd_time_out" in m:
        vals["cmd_time_out"] = c.integer(m["cmd_time_out"], "defaults.cmd_time_out", 0, 3600,
                                         "seconds 0..3600 (0 = no timeout)")
    if "write_cache" in m:
        vals["write_cache"] = c.boolean(m["write_cache"], "defaults.write_cache")
    vals = {k: v for k, v in vals.items() if v is not None}
    return Defaults(**{**base.__dict__, **vals})


def _load_pools(c: _Checker, raw: object) -> list[Pool]:
    pools: list[Pool] = []
    seen: set[str] = set()
    for i, item in enumerate(c.seq(raw, "pools") or []):
        p = f"pools[{i}]"
        m = c.mapping(item, p, {"name", "path", "capacity", "soft_threshold", "hard_limit"},
                      frozenset({"name", "path", "capacity"}))
        if m is None:
            continue
        name = c.name(m["name"], f"{p}.name") if "name" in m else None
        if name is not None:
            if name in seen:
                c.fail(f"{p}.name", name, "a pool name not used before (duplicate)")
            seen.add(name)
        path = c.abspath(m["path"], f"{p}.path") if "path" in m else None
        cap = c.size(m["capacity"], f"{p}.capacity") if "capacity" in m else None
        soft = c.integer(m.get("soft_threshold", 80), f"{p}.soft_threshold", 1, 100,
                         "a percentage 1..100")
        hard: int | None = cap
        if "hard_limit" in m and cap is not None:
            hard = _pool_limit(c, m["hard_limit"], f"{p}.hard_limit", cap)
        if None in (name, path, cap, soft, hard):
            continue
        assert name and path and cap and soft and hard
        pools.append(Pool(name, path, cap, soft, hard))
    return pools


def _pool_limit(c: _Checker, value: object, path: str, capacity: int) -> int | None:
    expected = "a percentage of capacity like '95%' or a size not above capacity"
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = int(value.strip()[:-1])
        except ValueError:
            pct = -1
        if 1 <= pct <= 100:
            return capacity * pct // 100
        c.fail(path, value, expected)
        return None
    try:
        n = parse_size(value)
    except ValueError:
        n = -1
    if 0 < n <= capacity:
        return n
    c.fail(path, value, expected)
    return None


_DEVICE_KEYS = {"name", "handler", "size", "block_size", "options", "hw_max_sectors",
                "max_data_area_mb", "cmd_time_out", "write_cache", "serial", "wwn", "pool"}


def _load_devices(c: _Checker, raw: object, defaults: Defaults, state_dir: str,
                  handlers: Mapping[str, Callable[[str], None]] | None,
                  pool_paths: Mapping[str, str] | None = None,
                  where: dict[str, str] | None = None) -> list[Device]:
    """``where`` (if given) receives each valid device's key path (``devices[3]``)."""
    devices: list[Device] = []
    seen: set[str] = set()
    for i, item in enumerate(c.seq(raw, "devices") or []):
        p = f"devices[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, _DEVICE_KEYS, frozenset({"name", "handler", "size"}))
        if m is None:
            continue
        name = c.name(m["name"], f"{p}.name") if "name" in m else None
        if name is not None:
            if name in seen:
                c.fail(f"{p}.name", name, "a device name not used before (duplicate)")
            seen.add(name)
        handler = None
        if "handler" in m:
            handler = c.string(m["handler"], f"{p}.handler", _SUBTYPE_RE,
                               "a handler subtype: lowercase letters, digits, _ or -")
            if handler is not None and handlers is not None and handler not in handlers:
                c.fail(f"{p}.handler", handler,
                       f"an installed handler ({', '.join(sorted(handlers)) or 'none found'})")
        size = c.size(m["size"], f"{p}.size") if "size" in m else None
        block_size = (_check_block_size(c, m["block_size"], f"{p}.block_size")
                      if "block_size" in m else defaults.block_size)
        hw_max = c.integer(m.get("hw_max_sectors", defaults.hw_max_sectors),
                           f"{p}.hw_max_sectors", 1, 65535)
        area = c.integer(m.get("max_data_area_mb", defaults.max_data_area_mb),
                         f"{p}.max_data_area_mb", 1, MAX_DATA_AREA_MB)
        tmo = c.integer(m.get("cmd_time_out", defaults.cmd_time_out), f"{p}.cmd_time_out", 0,
                        3600, "seconds 0..3600 (0 = no timeout)")
        wc = c.boolean(m.get("write_cache", defaults.write_cache), f"{p}.write_cache")
        serial = (c.string(m["serial"], f"{p}.serial", _SERIAL_RE,
                           "a unit serial number of 1..64 printable ASCII characters, no spaces")
                  if m.get("serial") is not None else None)
        wwn = None
        if m.get("wwn") is not None:
            # SPC-5 7.7.6.6.1: NAA 2h, 3h, 5h designators are 8 bytes, NAA 6h is 16.
            raw_wwn = m["wwn"]
            if isinstance(raw_wwn, str) and _DEVICE_WWN_RE.fullmatch(raw_wwn.strip().lower()):
                wwn = raw_wwn.strip().lower()
            else:
                c.fail(f"{p}.wwn", raw_wwn, "naa. and 16 hex digits starting 2, 3 or 5 (NAA"
                       " 2h/3h/5h) or 32 starting 6 (NAA 6h): the NAA designator of VPD 83h")
        pool = c.name(m["pool"], f"{p}.pool") if m.get("pool") is not None else None
        options = _device_options(c, m.get("options"), f"{p}.options", handler, name, state_dir)

        if size is not None and block_size is not None and size % block_size:
            c.fail(f"{p}.size", m["size"], f"a multiple of the block size {block_size}")
        if hw_max is not None and block_size is not None and area is not None and (
                hw_max * block_size > area << 20):
            c.fail(f"{p}.hw_max_sectors", hw_max,
                   f"hw_max_sectors x block_size ({block_size}) to fit in max_data_area_mb"
                   f" ({area} MiB); the kernel rejects larger commands")
        if len(c.problems) != before:
            continue
        assert name and handler and size and block_size and hw_max and area and options is not None
        assert tmo is not None and wc is not None
        pool_path = (pool_paths or {}).get(pool) if pool is not None else None
        dev = Device(name, handler, size, block_size, hw_max, area, tmo, wc, options,
                     serial, wwn, pool, pool_path)
        cfg = _build_config_string(handler, options, pool_path, wwn)
        problem = _config_string_problem(cfg)
        if problem:
            c.fail(f"{p}.options", m.get("options"), f"options whose dev_config {cfg!r} has"
                   f" {problem}")
            continue
        if handlers is not None:
            try:
                handlers[handler](_build_config_string(handler, options, pool_path)
                                  .partition("/")[2])
            except ConfigError as exc:
                c.fail(f"{p}.options", m.get("options"), f"options the {handler!r} handler"
                       f" accepts: {exc}")
                continue
        devices.append(dev)
        if where is not None:
            where[name] = p
    return devices


def _device_options(c: _Checker, raw: object, path: str, handler: str | None,
                    name: str | None, state_dir: str) -> tuple[tuple[str, str], ...] | None:
    m = c.mapping(raw, path, {"path"} if handler == "raw" else None)
    if m is None:
        return None
    if handler == "raw":
        img = (c.abspath(m["path"], f"{path}.path") if "path" in m
               else str(Path(state_dir) / f"{name}.img"))
        if img is not None and split_wwn(img)[1] is not None:
            c.fail(f"{path}.path", img, "an image path that does not end in ';wwn=naa...' (the"
                   " daemon would take that for the device's wwn)")
            return None
        return None if img is None else (("path", img),)
    out: list[tuple[str, str]] = []
    for key, value in m.items():
        kp = f"{path}.{key}"
        if not isinstance(key, str) or not _OPTION_KEY_RE.fullmatch(key):
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


def _load_libraries(c: _Checker, raw: object) -> list[Library]:
    libs: list[Library] = []
    seen: set[str] = set()
    dirs: dict[str, str] = {}
    keys = {"name", "changer", "drives", "slots", "import_export", "cartridges", "media_dir"}
    for i, item in enumerate(c.seq(raw, "libraries") or []):
        p = f"libraries[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, keys, frozenset({"name", "changer", "drives", "slots",
                                                "media_dir"}))
        if m is None:
            continue
        name = c.name(m["name"], f"{p}.name") if "name" in m else None
        if name is not None:
            if name in seen:
                c.fail(f"{p}.name", name, "a library name not used before (duplicate)")
            seen.add(name)
        changer = c.name(m["changer"], f"{p}.changer") if "changer" in m else None
        drives: list[Drive] = []
        for j, d in enumerate(c.seq(m.get("drives"), f"{p}.drives") or []):
            dp = f"{p}.drives[{j}]"
            dm = c.mapping(d, dp, {"name", "model", "serial"}, frozenset({"name", "model"}))
            if dm is None or "name" not in dm or "model" not in dm:
                continue
            dn = c.name(dm["name"], f"{dp}.name")
            model = c.string(dm["model"], f"{dp}.model", re.compile(r"[\x20-\x7e]{1,16}"),
                             "a product identification of 1..16 printable ASCII characters")
            if model is not None:
                model = _check_drive_model(c, model, f"{dp}.model")
            serial = ""
            if dm.get("serial") is not None:
                serial = c.string(dm["serial"], f"{dp}.serial", re.compile(r"[A-Za-z0-9_-]{1,32}"),
                                  "a drive serial of 1..32 characters A-Z a-z 0-9 _ -") or ""
            if dn and model:
                drives.append(Drive(dn, model, serial))
        if "drives" in m and not drives and len(c.problems) == before:
            c.fail(f"{p}.drives", m["drives"], "at least one drive")
        slots = c.integer(m["slots"], f"{p}.slots", 1, 65535) if "slots" in m else None
        ie = c.integer(m.get("import_export", 0), f"{p}.import_export", 0, 255)
        carts: list[str] = []
        room = (slots or 65535) + (ie or 0)  # what the library can hold: never expand beyond
        held = 0
        for j, spec in enumerate(c.seq(m.get("cartridges"), f"{p}.cartridges") or []):
            try:
                if not isinstance(spec, str):
                    raise ValueError(spec)
                count = count_barcodes(spec)
            except ValueError:
                c.fail(f"{p}.cartridges[{j}]", spec,
                       "a barcode (A-Z 0-9, up to 32) or a range like ABC000L8..ABC019L8")
                continue
            if held + count > room:
                c.fail(f"{p}.cartridges[{j}]", spec, f"at most slots + import_export = {room}"
                       f" cartridges in all (this range holds {count}, the ones before it"
                       f" {held})")
                continue
            held += count
            if _check_media_types(c, expand_barcodes(spec), spec, f"{p}.cartridges[{j}]"):
                carts.append(spec)
        media = c.abspath(m["media_dir"], f"{p}.media_dir") if "media_dir" in m else None
        if media is not None:
            if media in dirs:
                c.fail(f"{p}.media_dir", m["media_dir"],
                       f"a directory of its own (library {dirs[media]} uses it)")
            dirs[media] = name or "?"
            cfg = _build_config_string("vtl", (("library", media), ("unit", "drive00")), None)
            problem = _config_string_problem(cfg)
            if problem:
                c.fail(f"{p}.media_dir", m["media_dir"], f"a path whose dev_config {cfg!r} has"
                       f" {problem}")
        units = ([changer] if changer else []) + [d.name for d in drives]
        for unit in units:
            if units.count(unit) > 1:
                c.fail(f"{p}.drives", m.get("drives"),
                       f"unit names used once in the library ({unit!r} repeats)")
                break
        if len(c.problems) != before:
            continue
        assert name and changer and slots and media is not None and ie is not None
        libs.append(Library(name, changer, tuple(drives), slots, ie, tuple(carts), media))
    return libs


def _check_drive_model(c: _Checker, model: str, path: str) -> str | None:
    """The model if the VTL's personality table knows it (skipped without the vtl handler)."""
    try:
        from tcmu_py.handlers.vtl.personality import personality
    except ImportError:
        return model
    try:
        personality(model)
    except ConfigError as exc:
        c.fail(path, model, f"a known drive model ({exc})")
        return None
    return model


def _check_media_types(c: _Checker, codes: list[str], spec: str, path: str) -> bool:
    """True if every barcode names an LTO media type (L5..L9 data, LT..LZ WORM, CLN...)."""
    try:
        from tcmu_py.handlers.vtl.personality import parse_barcode
    except ImportError:
        return True
    for code in codes:
        try:
            parse_barcode(code)
        except ConfigError:
            c.fail(path, spec, f"barcodes with an LTO media suffix (L3..L9 data, LT..LZ WORM)"
                   f" or a CLN prefix; {code!r} has none")
            return False
    return True


def library_devices(lib: Library, defaults: Defaults) -> list[Device]:
    """The ``vtl`` devices of a library: the changer, then each drive, with the library
    settings (LIBRARY_DEVICE_SIZE, LIBRARY_HW_MAX_SECTORS, LIBRARY_CMD_TIME_OUT) and
    ``max_data_area_mb`` from ``defaults`` (at least what one command of hw_max_sectors needs)."""
    area = max(defaults.max_data_area_mb, (LIBRARY_HW_MAX_SECTORS * 512) >> 20)
    return [Device(name, "vtl", LIBRARY_DEVICE_SIZE, 512, LIBRARY_HW_MAX_SECTORS, area,
                   LIBRARY_CMD_TIME_OUT, False, (("library", lib.media_dir), ("unit", unit)),
                   serial)
            for name, unit, serial in lib.units()]


def _device_image(dev: Device) -> str | None:
    """The file holding `dev`'s data, symbolic links resolved: a ``raw`` image, or a ``thin``
    disk's file in its pool (``<pool>/<disk or device name>.img``); None for others."""
    opts = dev.options_dict()
    if dev.handler == "raw":
        return os.path.realpath(opts["path"])
    if dev.handler == "thin":
        pool = dev.pool_path or opts.get("pool", "")
        if pool.startswith("/"):
            return os.path.join(os.path.realpath(pool), f"{opts.get('disk') or dev.name}.img")
    return None


def _check_identities(c: _Checker, devices: list[Device], where: Mapping[str, str]) -> None:
    """Devices are distinct disks: no two share a unit serial (VPD 80h, and the designators of
    VPD 83h derived from it: multipath would merge two disks into one), a wwn (VPD 83h NAA), or
    an image file (two devices writing one file corrupt each other)."""
    serials: dict[str, str] = {}
    wwns: dict[str, str] = {}
    images: dict[str, str] = {}
    for dev in devices:
        at = where.get(dev.name, f"device {dev.name}")
        if dev.serial is not None:
            other = serials.setdefault(dev.serial, dev.name)
            if other != dev.name:
                c.fail(f"{at}.serial", dev.serial, f"a serial no other device has ({other} has"
                       " it: identical VPD 80h/83h, multipath would take both for one disk)")
        if dev.wwn is not None:
            other = wwns.setdefault(dev.wwn, dev.name)
            if other != dev.name:
                c.fail(f"{at}.wwn", dev.wwn, f"a wwn no other device has ({other} has it)")
        image = _device_image(dev)
        if image is not None:
            other = images.setdefault(image, dev.name)
            if other != dev.name:
                c.fail(f"{at}.options", dict(dev.options), f"an image file of its own ({other}"
                       f" uses {image})")


def _load_lunmaps(c: _Checker, raw: object, path: str, devices: set[str]) -> list[LunMap]:
    out: list[LunMap] = []
    used: dict[int, str] = {}
    seen_dev: set[str] = set()
    for i, item in enumerate(c.seq(raw, path) or []):
        p = f"{path}[{i}]"
        m = c.mapping(item, p, {"device", "lun"}, frozenset({"device"}))
        if m is None or "device" not in m:
            continue
        dev = c.name(m["device"], f"{p}.device")
        if dev is not None and dev not in devices:
            c.fail(f"{p}.device", dev, f"the name of a device in devices"
                   f" ({', '.join(sorted(devices)) or 'none declared'})")
            dev = None
        if dev is not None and dev in seen_dev:
            c.fail(f"{p}.device", dev, "a device exported once per target (duplicate)")
            dev = None
        lun_raw = m.get("lun")
        if lun_raw is None:
            lun: int | None = min(n for n in range(MAX_LUN + 2) if n not in used)
            if lun is not None and lun > MAX_LUN:
                c.fail(f"{p}.lun", _MISSING, f"a free LUN number 0..{MAX_LUN}")
                lun = None
        else:
            lun = c.integer(lun_raw, f"{p}.lun", 0, MAX_LUN)
            if lun is not None and lun in used:
                c.fail(f"{p}.lun", lun, f"a LUN number not used before (taken by {used[lun]})")
                lun = None
        if dev is None or lun is None:
            continue
        used[lun] = dev
        seen_dev.add(dev)
        out.append(LunMap(dev, lun))
    return out


def _load_chap(c: _Checker, raw: object, path: str) -> Chap | None:
    m = c.mapping(raw, path, {"userid", "password", "mutual_userid", "mutual_password"},
                  frozenset({"userid", "password"}))
    if not m or "userid" not in m or "password" not in m:
        return None
    cred = re.compile(r"[\x21-\x7e]{1,255}")
    uid = c.string(m["userid"], f"{path}.userid", cred, "a CHAP name of printable characters")
    pw = c.string(m["password"], f"{path}.password", cred,
                  "a CHAP secret of printable characters")
    mu = m.get("mutual_userid")
    mp = m.get("mutual_password")
    if (mu is None) != (mp is None):
        missing = "mutual_password" if mp is None else "mutual_userid"
        c.fail(f"{path}.{missing}", _MISSING, "both mutual_userid and mutual_password, or neither")
        return None
    if mu is not None:
        mu = c.string(mu, f"{path}.mutual_userid", cred, "a CHAP name of printable characters")
        mp = c.string(mp, f"{path}.mutual_password", cred,
                      "a CHAP secret of printable characters")
        if mu is None or mp is None:
            return None
        if mp == pw:
            c.fail(f"{path}.mutual_password", "<hidden>",
                   "a mutual secret different from the initiator secret (RFC 3720 8.2.1)")
            return None
    if uid is None or pw is None:
        return None
    # RFC 1994 / RFC 3720 11.1.4: LIO requires secrets of 12..16 bytes for Microsoft
    # initiators only; we do not enforce length so Linux-only setups keep working.
    return Chap(uid, pw, mu, mp)


def _load_portal(c: _Checker, raw: object, path: str) -> Portal | None:
    text = raw if isinstance(raw, str) else None
    if text is not None:
        host, port_s = text, "3260"
        m6 = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", text)
        if m6:
            host, port_s = m6.group(1), m6.group(2) or "3260"
        elif text.count(":") == 1:
            host, port_s = text.split(":")
        try:
            ip = ipaddress.ip_address(host)
            port = int(port_s)
            if 1 <= port <= 65535:
                return Portal(str(ip), port)
        except ValueError:
            pass
    c.fail(path, raw, "a portal 'IPv4:port', '[IPv6]:port' or an address (port 3260)")
    return None


def _load_iscsi(c: _Checker, raw: object, devices: set[str]) -> list[IscsiTarget]:
    out: list[IscsiTarget] = []
    seen: set[str] = set()
    keys = {"iqn", "tpg", "portals", "luns", "acls", "chap", "generate_node_acls", "attributes"}
    for i, item in enumerate(c.seq(raw, "exports.iscsi") or []):
        p = f"exports.iscsi[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, keys, frozenset({"iqn"}))
        if m is None:
            continue
        iqn = c.wwn(m["iqn"], f"{p}.iqn") if "iqn" in m else None
        if iqn is not None:
            if iqn in seen:
                c.fail(f"{p}.iqn", m["iqn"], "a target name not used before (duplicate)")
            seen.add(iqn)
        tag = c.integer(m.get("tpg", 1), f"{p}.tpg", 1, 65535)
        portals: list[Portal] = []
        raw_portals = m.get("portals", ["127.0.0.1:3260"])
        for j, pr in enumerate(c.seq(raw_portals, f"{p}.portals") or []):
            portal = _load_portal(c, pr, f"{p}.portals[{j}]")
            if portal is not None:
                if portal in portals:
                    c.fail(f"{p}.portals[{j}]", pr, "a portal not listed before (duplicate)")
                portals.append(portal)
        luns = _load_lunmaps(c, m.get("luns"), f"{p}.luns", devices)
        lun_devs = {lm.device for lm in luns}
        chap = _load_chap(c, m["chap"], f"{p}.chap") if m.get("chap") is not None else None
        demo = c.boolean(m.get("generate_node_acls", False), f"{p}.generate_node_acls")
        attrs: list[tuple[str, int]] = []
        am = c.mapping(m.get("attributes"), f"{p}.attributes", set(ISCSI_TPG_ATTRIBUTES))
        for key, value in (am or {}).items():
            if key in ISCSI_TPG_ATTRIBUTES:
                v = c.integer(value, f"{p}.attributes.{key}", 0, 1 << 31)
                if v is not None:
                    attrs.append((key, v))
        acls: list[Acl] = []
        initiators: set[str] = set()
        for j, a in enumerate(c.seq(m.get("acls"), f"{p}.acls") or []):
            ap = f"{p}.acls[{j}]"
            am2 = c.mapping(a, ap, {"initiator", "chap", "luns"}, frozenset({"initiator"}))
            if am2 is None or "initiator" not in am2:
                continue
            ini = c.wwn(am2["initiator"], f"{ap}.initiator")
            if ini is not None and ini in initiators:
                c.fail(f"{ap}.initiator", am2["initiator"],
                       "an initiator listed once per target (duplicate)")
                ini = None
            acl_chap = (_load_chap(c, am2["chap"], f"{ap}.chap")
                        if am2.get("chap") is not None else None)
            acl_luns: tuple[str, ...] | None = None
            if "luns" in am2:
                names: list[str] = []
                for k, dn in enumerate(c.seq(am2["luns"], f"{ap}.luns") or []):
                    if not isinstance(dn, str) or dn not in lun_devs:
                        c.fail(f"{ap}.luns[{k}]", dn, "a device exported in this target's luns"
                               f" ({', '.join(sorted(lun_devs)) or 'none'})")
                    elif dn in names:
                        c.fail(f"{ap}.luns[{k}]", dn, "a device listed once (duplicate)")
                    else:
                        names.append(dn)
                acl_luns = tuple(names)
            if ini is not None:
                initiators.add(ini)
                acls.append(Acl(ini, acl_chap, acl_luns))
        if chap is not None or any(a.chap is not None for a in acls):
            # LIO's TPG attribute `authentication` is one switch for every initiator: once
            # CHAP is on, an ACL without credentials (or demo mode without TPG credentials)
            # can never log in.
            for j, a in enumerate(acls):
                if a.chap is None:
                    c.fail(f"{p}.acls[{j}].chap", _MISSING, "CHAP credentials (this target"
                           " uses CHAP, so every initiator needs them)")
            if demo and chap is None:
                c.fail(f"{p}.chap", _MISSING, "CHAP credentials for demo-mode initiators"
                       " (generate_node_acls is on and an ACL uses CHAP)")
        if demo is False and not acls and "acls" not in m and len(c.problems) == before:
            c.fail(f"{p}.acls", _MISSING, "at least one ACL, or generate_node_acls: true"
                   " (otherwise no initiator can log in)")
        if len(c.problems) != before:
            continue
        assert iqn is not None and tag is not None and demo is not None
        out.append(IscsiTarget(iqn, tag, tuple(portals), tuple(luns), tuple(acls), chap, demo,
                               tuple(attrs)))
    return out


def _raw_names(items: object) -> set[str]:
    if not isinstance(items, list):
        return set()
    return {i["name"] for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)}


def _build(c: _Checker, doc: object,
           handlers: Mapping[str, Callable[[str], None]] | None) -> Config | None:
    top = c.mapping(doc, "", {"state_dir", "defaults", "pools", "devices", "libraries",
                              "exports"})
    if top is None:
        return None
    state_dir = c.abspath(top.get("state_dir", DEFAULT_STATE_DIR), "state_dir")
    defaults = _load_defaults(c, top.get("defaults"))
    pools = _load_pools(c, top.get("pools"))
    where: dict[str, str] = {}
    devices = _load_devices(c, top.get("devices"), defaults, state_dir or DEFAULT_STATE_DIR,
                            handlers, {p.name: p.path for p in pools}, where)
    # Names given to devices / pools that failed validation still count for cross-references,
    # so one bad device does not cascade into a "no such device" error for every export.
    dev_names = _raw_names(top.get("devices"))
    pool_names = _raw_names(top.get("pools"))
    raw_devices = top.get("devices")
    for i, dev in enumerate(raw_devices if isinstance(raw_devices, list) else []):
        if isinstance(dev, dict) and isinstance(dev.get("pool"), str) and (
                dev["pool"] not in pool_names):
            c.fail(f"devices[{i}].pool", dev["pool"], "the name of a pool in pools"
                   f" ({', '.join(sorted(pool_names)) or 'none declared'})")
    libraries = _load_libraries(c, top.get("libraries"))
    # Library units are devices too (exported by name like any other); they are implied by
    # `libraries:`, so naming one in `devices:` as well is a duplicate.
    raw_libs = top.get("libraries")
    for i, lib_raw in enumerate(raw_libs if isinstance(raw_libs, list) else []):
        if not isinstance(lib_raw, dict):
            continue
        raw_drives = lib_raw.get("drives")
        names = [("changer", lib_raw.get("changer"))] + [
            (f"drives[{j}].name", d.get("name"))
            for j, d in enumerate(raw_drives if isinstance(raw_drives, list) else [])
            if isinstance(d, dict)]
        for key, unit in names:
            if not isinstance(unit, str):
                continue
            if unit in dev_names:
                c.fail(f"libraries[{i}].{key}", unit, "a name no device or other library unit"
                       " uses (library units are devices of their own; do not list them in"
                       " devices)")
            dev_names.add(unit)
    if libraries and handlers is not None and "vtl" not in handlers:
        c.fail("libraries", [lib.name for lib in libraries],
               f"the vtl handler installed ({', '.join(sorted(handlers)) or 'none found'})")
    for i, lib in enumerate(libraries):
        devices.extend(library_devices(lib, defaults))
        where[lib.changer] = f"libraries[{i}].changer"
        for j, drive in enumerate(lib.drives):
            where[drive.name] = f"libraries[{i}].drives[{j}]"
    _check_identities(c, devices, where)
    em = c.mapping(top.get("exports"), "exports", {"loopback", "iscsi"})
    loop = _load_lunmaps(c, (em or {}).get("loopback"), "exports.loopback", dev_names)
    iscsi = _load_iscsi(c, (em or {}).get("iscsi"), dev_names)
    if c.problems or state_dir is None:
        return None
    return Config(c.source, state_dir, defaults, tuple(pools),
                  tuple(devices), tuple(libraries), Exports(tuple(loop), tuple(iscsi)))


def load_config_text(text: str, source: str = "<string>", *,
                     handlers: Mapping[str, Callable[[str], None]] | None = None) -> Config:
    """Parse and validate YAML ``text``; ``source`` names it in messages.

    ``handlers`` maps each installed subtype to its ``Handler.check_config(cfgstring)`` (the
    dev_config after ``<subtype>/``). When given, a device naming another subtype is an error, and
    each device's cfgstring is passed to its handler's check (a ConfigError it raises is reported
    like any other problem). Checks run before `lio.prepare_storage`, so a check that requires
    files to exist (image directory, pool.json) fails on a fresh host: omit ``handlers`` then, or
    prepare storage first.
    Raises ConfigError listing every problem; returns a fully validated Config otherwise.
    """
    c = _Checker(source)
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: got a file larger than {MAX_CONFIG_BYTES} bytes, expected"
                          " a configuration file of at most that size")
    try:
        doc = yaml.load(text, Loader=_ConfigLoader)  # type: ignore[arg-type]  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "(document)"
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if isinstance(exc, yaml.reader.ReaderError):  # no mark: a character offset
            line = text.count("\n", 0, exc.position) + 1
            where = f"line {line} column {exc.position - text.rfind(chr(10), 0, exc.position)}"
            what = f"character {exc.character!r} ({exc.reason})"
        context = getattr(exc, "context", None)
        if context and not isinstance(exc, _Refused):
            what += f" {' '.join(str(context).split())}"
        expected = getattr(exc, "expected", "valid YAML: a mapping of the configuration keys")
        raise ConfigError(f"{source}: {where}: got {what}, expected {expected}") from None
    if doc is None:
        doc = {}
    cfg = _build(c, doc, handlers)
    if cfg is None:
        raise ConfigError(c.report())
    return cfg


def load_config(path: str | Path, *,
                handlers: Mapping[str, Callable[[str], None]] | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (see `load_config_text`); a file larger
    than MAX_CONFIG_BYTES is refused unread."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: got an unreadable file ({exc.strerror}), expected a readable"
                          " YAML file") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: got a file larger than {MAX_CONFIG_BYTES} bytes, expected a"
                          " configuration file of at most that size")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{p}: line {line}: got bytes that are not UTF-8"
                          f" ({data[exc.start:exc.start + 4]!r}), expected a UTF-8 text"
                          " file") from None
    return load_config_text(text, str(p), handlers=handlers)


def load_default_config(*, handlers: Mapping[str, Callable[[str], None]] | None = None
                        ) -> Config:
    """The embedded default configuration (package data ``tcmu_py/daemon/default.yaml``)."""
    ref = resources.files("tcmu_py.daemon").joinpath("default.yaml")
    return load_config_text(ref.read_text(encoding="utf-8"), "<default config>",
                            handlers=handlers)
