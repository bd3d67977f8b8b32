"""The YAML configuration: load, validate completely, then freeze.

Rules this module obeys:

- Nothing is created here. `load_config` reads one file and returns frozen dataclasses, or raises
  one `ConfigError`: one problem is one line, ``<file>: <key path>: got <value!r>, expected
  <what>``; several are a count and then one such line each (the first MAX_PROBLEMS). Values
  are quoted cut short, so a line stays a line whatever the file holds.
- Hostile files cost bounded time and memory: at most MAX_CONFIG_BYTES are read, nesting
  beyond MAX_DEPTH and alias bombs (more than MAX_NODES nodes once aliases are expanded) are
  refused while parsing, barcode ranges are counted before they are expanded (vtl), and anything
  the YAML layer refuses (unhashable or duplicate keys, values their tag cannot hold, bytes that
  are not UTF-8) is a ConfigError naming the line.
- Unknown keys are errors (a typo must not silently fall back to a default).
- This module knows the generic keys (state_dir, defaults, devices, exports); every other
  top-level section belongs to the handler that declares it (`Handler.config_sections`: thin's
  ``pools``, the VTL's ``libraries``), found through the registry and validated by it with the
  same `Checker` (handlers/thin/config.py, handlers/vtl/config.py).
- Cross references are checked: exports name devices that exist (also a section's devices, a
  library's units), devices name pools that exist (thin's check), names / LUN numbers /
  initiators / portals are unique where LIO needs them unique; devices are distinct disks (no
  shared serial, wwn or image file).
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

import contextlib
import functools
import ipaddress
import logging
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from tcmu_py.configspec import (  # MAX_PROBLEMS, TCMU_CONFIG_MAX: re-exported
    MAX_PROBLEMS,  # noqa: F401
    MISSING,
    TCMU_CONFIG_MAX,  # noqa: F401
    Checker,
    Defaults,
    Device,
    config_string_problem,
    parse_size,
    raw_names,
)
from tcmu_py.errors import ConfigError
from tcmu_py.handler import Handler, load_handlers
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

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STATE_DIR",
    "Acl",
    "Chap",
    "Config",
    "Defaults",
    "Device",
    "Exports",
    "FabricAcl",
    "FcTarget",
    "IscsiTarget",
    "LunMap",
    "Portal",
    "SrpTarget",
    "UsbTarget",
    "dev_config_string",
    "load_config",
    "load_config_text",
    "load_default_config",
    "parse_size",
    "section_owners",
]

DEFAULT_STATE_DIR = "/var/lib/tcmu-py"
# LIO's per-TPG LUN index limit on the kernels we target (TRANSPORT_MAX_LUNS_PER_TPG = 256 before
# 5.x raised it); 0..255 is valid everywhere.
MAX_LUN = 255
# target_core_user.c: global_max_data_area_mb defaults to 2048; larger per-device values are
# silently clamped to it, so we reject them instead.
MAX_DATA_AREA_MB = 2048

_SUBTYPE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SERIAL_RE = re.compile(r"[\x21-\x7e]{1,64}")
_DEVICE_WWN_RE = re.compile(r"naa\.([235][0-9a-f]{15}|6[0-9a-f]{31})")
# Attributes of an iSCSI TPG in configfs (drivers/target/iscsi/iscsi_target_configfs.c), with
# the values the kernel takes (iscsi_target_tpg.c, iscsit_ta_*; TA_*_MIN/MAX in
# iscsi_target_core.h): anything else is refused with EINVAL when `apply` writes it.
ISCSI_TPG_ATTRIBUTE_VALUES: dict[str, tuple[int, ...] | range] = {
    "authentication": range(2),
    "cache_dynamic_acls": range(2),
    "default_cmdsn_depth": range(1, 513),
    "default_erl": range(3),
    "demo_mode_discovery": range(2),
    "demo_mode_write_protect": range(2),
    "fabric_prot_type": (0, 1, 3),
    "generate_node_acls": range(2),
    "login_keys_workaround": range(2),
    "login_timeout": range(5, 31),
    "netif_timeout": range(2, 16),
    "prod_mode_write_protect": range(2),
    "t10_pi": range(2),
    "tpg_enabled_sendtargets": range(2),
}
ISCSI_TPG_ATTRIBUTES = frozenset(ISCSI_TPG_ATTRIBUTE_VALUES)

# --------------------------------------------------------------------------- dataclasses


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
class FabricAcl:
    """An initiator allowed into an SRP or FC target port (neither ib_srpt nor tcm_fc has a demo
    mode). ``luns`` as in `Acl`."""

    initiator: str
    luns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SrpTarget:
    """An ib_srpt target port with one TPG (tag 1). ``port`` is the name ib_srpt gives the RDMA
    port in configfs: its GUID ``xxxx:xxxx:xxxx:xxxx`` or its GID ``0x<32 hex digits>``.
    ``rdma_cm_port``: the TCP port ib_srpt listens on for RDMA/CM logins (RoCE has no subnet
    administrator, so IB CM logins do not work there); a setting of the whole srpt fabric."""

    port: str
    luns: tuple[LunMap, ...] = ()
    acls: tuple[FabricAcl, ...] = ()
    rdma_cm_port: int | None = None


@dataclass(frozen=True)
class FcTarget:
    """A tcm_fc target port (an FCoE local port, named by its WWPN ``naa.<16 hex digits>``)
    with one TPG (tag 1)."""

    wwpn: str
    luns: tuple[LunMap, ...] = ()
    acls: tuple[FabricAcl, ...] = ()


@dataclass(frozen=True)
class UsbTarget:
    """LIO's USB gadget fabric (usb_f_tcm): a usb_gadget target port ``wwn`` with TPG 1 whose
    I_T nexus is named ``nexus``, served through the libcomposite gadget ``gadget`` (USB IDs
    ``vendor_id``:``product_id``, one configuration holding the tcm function) bound to the
    USB device controller ``udc``. The host sees a USB mass-storage device (Bulk-Only and UAS
    interfaces; see `tcmu_py.daemon.fabric_lio` for what works over each)."""

    wwn: str
    udc: str
    nexus: str
    gadget: str = "tcmu-py"
    vendor_id: int = 0x1D6B  # Linux Foundation
    product_id: int = 0x0104  # Multifunction Composite Gadget
    luns: tuple[LunMap, ...] = ()


@dataclass(frozen=True)
class Exports:
    loopback: tuple[LunMap, ...] = ()
    iscsi: tuple[IscsiTarget, ...] = ()
    #: iSCSI targets whose portals also listen for iSER (the portal's ``iser`` attribute).
    iser: tuple[IscsiTarget, ...] = ()
    srp: tuple[SrpTarget, ...] = ()
    fc: tuple[FcTarget, ...] = ()
    #: At most one: usb_f_tcm serves one TPG in the whole system.
    usb: tuple[UsbTarget, ...] = ()


@dataclass(frozen=True)
class Config:
    """A validated configuration. ``source`` is the file it came from (for messages)."""

    source: str
    state_dir: str = DEFAULT_STATE_DIR
    defaults: Defaults = field(default_factory=Defaults)
    devices: tuple[Device, ...] = ()
    exports: Exports = field(default_factory=Exports)
    #: (top-level key, specs) of each section a handler owns (`Handler.load_section`).
    sections: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def section(self, key: str) -> tuple[Any, ...]:
        """The specs of top-level section `key` owned by a handler (thin's ``pools``); () if the
        file has none or no installed handler owns it."""
        return dict(self.sections).get(key, ())

    def device(self, name: str) -> Device:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)


# --------------------------------------------------------------------------- dev_config


def _handler(subtype: str | None, registry: Mapping[str, type[Handler]]) -> type[Handler]:
    """The registered handler of `subtype`, or the `Handler` base (whose defaults take any
    ``key=value`` options) for a subtype not installed (or that failed to import: logged)."""
    owner = registry.get(subtype) if subtype is not None else None
    return owner if owner is not None else Handler


def _build_config_string(subtype: str, owner: type[Handler], options: tuple[tuple[str, str], ...],
                         items: tuple[tuple[str, str], ...] = (), wwn: str | None = None,
                         copy_domain: str | None = None, data_plane: bool = True) -> str:
    """``items`` are what section owners add (`Handler.device_config_items`, a pool's
    directory): the dev_config must describe the device on its own, so a daemon started without
    this YAML file (udev, systemd, a restart) can still open it. For the same reason ``wwn``
    goes in too, as the last item (`tcmu_py.handler.split_wwn`). What follows ``<subtype>/``
    is the handler's (`Handler.config_string`)."""
    cfg = f"{subtype}/" + owner.config_string(options, items)
    if not data_plane:  # `tcmu_py.handler.split_data_plane`
        cfg += f"{'' if cfg.endswith('/') else ';'}data_plane=off"
    if copy_domain is not None:  # `tcmu_py.handler.split_copy_domain`
        cfg += f"{'' if cfg.endswith('/') else ';'}copy_domain={copy_domain}"
    if wwn is not None:
        cfg += f"{'' if cfg.endswith('/') else ';'}wwn={wwn}"
    return cfg


def dev_config_string(device: Device) -> str:
    """The TCMU ``dev_config`` for ``device``: ``<subtype>/`` and what its handler makes of
    its options and the items section owners add (`Handler.config_string`: by default
    ``key=value;key=value``, options in YAML order, then e.g. ``pool=<pool directory>`` if the
    device names a thin pool; raw's is the image path); then ``;copy_domain=<name>`` and
    ``;wwn=<wwn>`` if the device sets them (the daemon strips both before the handler sees it).

    Raises ConfigError if the kernel or rtslib-fb would mangle or refuse it.
    """
    cfg = _build_config_string(device.handler, _handler(device.handler, _installed()),
                               device.options, device.config_items, device.wwn,
                               device.copy_domain, device.data_plane)
    problem = config_string_problem(cfg)
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
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *defaults`: the keys it brings may be given again here (that is what a
                # merge is for); SafeConstructor merges them (before: "could not determine a
                # constructor for the tag", as the key was built as a value)
                continue
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


def _check_block_size(c: Checker, value: object, path: str) -> int | None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < 512
            or value > 65536 or value & (value - 1)):
        c.fail(path, value, "a power of two from 512 to 65536")
        return None
    return value


def _load_defaults(c: Checker, raw: object) -> Defaults:
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


_DEVICE_KEYS = {"name", "handler", "size", "block_size", "options", "hw_max_sectors",
                "max_data_area_mb", "cmd_time_out", "write_cache", "serial", "wwn", "pool",
                "copy_domain", "data_plane"}


def _load_devices(c: Checker, raw: object, defaults: Defaults, state_dir: str,
                  handlers: Mapping[str, Callable[[str], None]] | None,
                  owners: Mapping[str, type[Handler]] | None = None,
                  sections: Mapping[str, tuple[Any, ...]] | None = None,
                  where: dict[str, str] | None = None,
                  registry: Mapping[str, type[Handler]] | None = None) -> list[Device]:
    """``where`` (if given) receives each valid device's key path (``devices[3]``); ``owners``
    maps each handler-owned section to its handler, ``sections`` holds their specs (each owner
    adds its `Handler.device_config_items` to every device's dev_config); ``registry`` gives
    each subtype's handler, which validates a device's ``options`` (`Handler.load_options`) and
    builds its dev_config (`Handler.config_string`)."""
    registry = _installed() if registry is None else registry
    devices: list[Device] = []
    for entry in c.named_entries(raw, "devices", _DEVICE_KEYS,
                                 frozenset({"name", "handler", "size"}), "device"):
        p, m, name, _ = entry
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
        domain = (c.name(m["copy_domain"], f"{p}.copy_domain")
                  if m.get("copy_domain") is not None else None)
        plane = (c.boolean(m["data_plane"], f"{p}.data_plane")
                 if m.get("data_plane") is not None else True)
        owner = _handler(handler, registry)
        options = owner.load_options(m.get("options"), f"{p}.options", c, name, state_dir)

        if size is not None and block_size is not None and size % block_size:
            c.fail(f"{p}.size", m["size"], f"a multiple of the block size {block_size}")
        if hw_max is not None and block_size is not None and area is not None and (
                hw_max * block_size > area << 20):
            c.fail(f"{p}.hw_max_sectors", hw_max,
                   f"hw_max_sectors x block_size ({block_size}) to fit in max_data_area_mb"
                   f" ({area} MiB); the kernel rejects larger commands")
        if not c.clean_since(entry):
            continue
        assert name and handler and size and block_size and hw_max and area and options is not None
        assert tmo is not None and wc is not None
        if pool is not None and not owner.takes_pool:
            # The handlers that take one check its name against their section (thin's pools:,
            # dedup's dedup_pools:); any other device has no pool to draw from.
            takers = sorted(s for s in registry if _handler(s, registry).takes_pool)
            c.fail(f"{p}.pool", pool, "no pool: only devices of a handler with pools take one"
                   f" ({', '.join(takers) or 'none installed'})")
            continue
        named = dict(options).get("pool")
        if pool is not None and named is not None:
            # Both keys: the same pool said twice is that pool; two pools are a mistake (before,
            # the device vanished from the configuration without a word).
            if named != pool:
                c.fail(f"{p}.options.pool", named, f"the pool {p}.pool names ({pool!r}), or no"
                       " options.pool: a device draws from one pool")
                continue
            options = tuple(kv for kv in options if kv[0] != "pool")
        if pool is None and owner.takes_pool and named is not None and not named.startswith("/"):
            # ``options: {pool: <declared name>}`` is ``pool: <name>``: the dev_config names
            # the pool's directory, which a daemon started without this YAML can open
            pool, options = named, tuple(kv for kv in options if kv[0] != "pool")
        dev = Device(name, handler, size, block_size, hw_max, area, tmo, wc, options,
                     serial, wwn, pool, copy_domain=domain,
                     data_plane=True if plane is None else plane)
        items = _config_items(dev, owners or {}, sections or {})
        if items:
            dev = replace(dev, config_items=items)
        elif pool is not None:
            continue  # a pool no section declares: its owner's section check reported it
        cfg = _build_config_string(handler, owner, options, items, wwn, domain, dev.data_plane)
        problem = config_string_problem(cfg)
        if problem:
            c.fail(f"{p}.options", m.get("options"), f"options whose dev_config {cfg!r} has"
                   f" {problem}")
            continue
        if handlers is not None:
            try:
                handlers[handler](owner.config_string(options, items))
            except ConfigError as exc:
                c.fail(f"{p}.options", m.get("options"), f"options the {handler!r} handler"
                       f" accepts: {exc}")
                continue
        devices.append(dev)
        if where is not None:
            where[name] = p
    return devices


def _config_items(dev: Device, owners: Mapping[str, type[Handler]],
                  sections: Mapping[str, tuple[Any, ...]]) -> tuple[tuple[str, str], ...]:
    """What each section owner adds to `dev`'s dev_config, options naming a key first winning
    (an explicit ``options: {pool: ...}`` is kept as written)."""
    out: list[tuple[str, str]] = []
    keys = {k for k, _ in dev.options}
    for owner in dict.fromkeys(owners.values()):
        own = {key: sections.get(key, ()) for key in owner.config_sections}
        for key, value in owner.device_config_items(dev, own):
            if key not in keys:
                keys.add(key)
                out.append((key, value))
    return tuple(out)


def _check_identities(c: Checker, devices: list[Device], where: Mapping[str, str],
                      registry: Mapping[str, type[Handler]]) -> None:
    """Devices are distinct disks: no two share a unit serial (VPD 80h, and the designators of
    VPD 83h derived from it: multipath would merge two disks into one), a wwn (VPD 83h NAA), or
    an image file (`Handler.device_image`: two devices writing one file corrupt each other)."""
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
        handler = registry.get(dev.handler)  # None also if it failed to import (logged)
        for image in handler.device_images(dev) if handler is not None else []:
            other = images.setdefault(image, dev.name)
            if other != dev.name:
                c.fail(f"{at}.options", dict(dev.options), f"an image file of its own ({other}"
                       f" uses {image})")
                break


def _load_lunmaps(c: Checker, raw: object, path: str, devices: set[str]) -> list[LunMap]:
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
                c.fail(f"{p}.lun", MISSING, f"a free LUN number 0..{MAX_LUN}")
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


def _load_chap(c: Checker, raw: object, path: str) -> Chap | None:
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
        c.fail(f"{path}.{missing}", MISSING, "both mutual_userid and mutual_password, or neither")
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


def _load_portal(c: Checker, raw: object, path: str) -> Portal | None:
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


def _rtslib_normalize_wwn() -> Callable[[tuple[str, ...], str], Any] | None:
    """rtslib-fb's own WWN check (`rtslib_fb.utils.normalize_wwn`), None if it is not installed
    (`check` then applies only our RFC 3720 rules; `apply` cannot run without it anyway)."""
    try:
        from rtslib_fb.utils import normalize_wwn
    except ImportError:
        return None
    return normalize_wwn  # type: ignore[no-any-return]


#: The name types rtslib-fb's iSCSI fabric module accepts (ISCSIFabricModule.wwn_types), for
#: targets (Target) and initiators (NodeACL) alike.
_ISCSI_WWN_TYPES = ("iqn", "naa", "eui")


def _acl_luns(
    c: Checker, acl: Mapping[str, Any], path: str, lun_devs: set[str]
) -> tuple[str, ...] | None:
    """The devices an ACL at ``path`` maps (its ``luns``: each one of the target's exported
    ``lun_devs``, listed once), or None when the ACL has no ``luns`` key (it maps them all).
    Problems are reported on ``c``."""
    if "luns" not in acl:
        return None
    names: list[str] = []
    for k, dn in enumerate(c.seq(acl["luns"], f"{path}.luns") or []):
        if not isinstance(dn, str) or dn not in lun_devs:
            c.fail(f"{path}.luns[{k}]", dn, "a device exported in this target's luns"
                   f" ({', '.join(sorted(lun_devs)) or 'none'})")
        elif dn in names:
            c.fail(f"{path}.luns[{k}]", dn, "a device listed once (duplicate)")
        else:
            names.append(dn)
    return tuple(names)


def _iscsi_name(c: Checker, value: object, path: str) -> str | None:
    """An iSCSI target or initiator name: RFC 3720's syntax (`Checker.wwn`), then, when
    rtslib-fb is installed, its own rules, so that `check` passing means `apply` will not refuse
    the name (rtslib-fb refuses, e.g., an underscore anywhere in an iqn, a 32-digit naa, an iqn
    whose naming authority has no dot)."""
    norm = c.wwn(value, path)
    normalize = _rtslib_normalize_wwn()
    if norm is None or normalize is None:
        return norm
    try:
        normalize(_ISCSI_WWN_TYPES, norm)
    except Exception:  # noqa: BLE001 - rtslib raises its bare RTSLibError
        c.fail(path, value, "a name rtslib-fb accepts: iqn.yyyy-mm.<domain with a dot>[:id] "
               "without '_' or spaces, eui.<16 hex digits> or naa.<16 hex digits starting 1, 2, "
               "5 or c-f>")
        return None
    return norm


def _load_iscsi(c: Checker, raw: object, devices: set[str], key: str = "iscsi",
                seen: set[str] | None = None) -> list[IscsiTarget]:
    """The targets of ``exports.<key>`` (``iscsi``, or ``iser``: the same schema); ``seen``
    holds the target names already used (iSCSI and iSER targets share LIO's iscsi fabric)."""
    out: list[IscsiTarget] = []
    seen = set() if seen is None else seen
    keys = {"iqn", "tpg", "portals", "luns", "acls", "chap", "generate_node_acls", "attributes"}
    for i, item in enumerate(c.seq(raw, f"exports.{key}") or []):
        p = f"exports.{key}[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, keys, frozenset({"iqn"}))
        if m is None:
            continue
        iqn = _iscsi_name(c, m["iqn"], f"{p}.iqn") if "iqn" in m else None
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
                allowed = ISCSI_TPG_ATTRIBUTE_VALUES[key]
                what = (f"an integer {allowed.start}..{allowed.stop - 1}"
                        if isinstance(allowed, range)
                        else "one of " + ", ".join(map(str, allowed)))
                v = c.integer(value, f"{p}.attributes.{key}", 0, 1 << 31, what)
                if v is not None and v not in allowed:
                    c.fail(f"{p}.attributes.{key}", value, what + " (the kernel refuses others)")
                elif v is not None:
                    attrs.append((key, v))
        acls: list[Acl] = []
        initiators: set[str] = set()
        for j, a in enumerate(c.seq(m.get("acls"), f"{p}.acls") or []):
            ap = f"{p}.acls[{j}]"
            am2 = c.mapping(a, ap, {"initiator", "chap", "luns"}, frozenset({"initiator"}))
            if am2 is None or "initiator" not in am2:
                continue
            ini = _iscsi_name(c, am2["initiator"], f"{ap}.initiator")
            if ini is not None and ini in initiators:
                c.fail(f"{ap}.initiator", am2["initiator"],
                       "an initiator listed once per target (duplicate)")
                ini = None
            acl_chap = (_load_chap(c, am2["chap"], f"{ap}.chap")
                        if am2.get("chap") is not None else None)
            acl_luns = _acl_luns(c, am2, ap, lun_devs)
            if ini is not None:
                initiators.add(ini)
                acls.append(Acl(ini, acl_chap, acl_luns))
        if chap is not None or any(a.chap is not None for a in acls):
            # LIO's TPG attribute `authentication` is one switch for every initiator: once
            # CHAP is on, an ACL without credentials (or demo mode without TPG credentials)
            # can never log in.
            for j, a in enumerate(acls):
                if a.chap is None:
                    c.fail(f"{p}.acls[{j}].chap", MISSING, "CHAP credentials (this target"
                           " uses CHAP, so every initiator needs them)")
            if demo and chap is None:
                c.fail(f"{p}.chap", MISSING, "CHAP credentials for demo-mode initiators"
                       " (generate_node_acls is on and an ACL uses CHAP)")
        if demo is False and not acls and "acls" not in m and len(c.problems) == before:
            c.fail(f"{p}.acls", MISSING, "at least one ACL, or generate_node_acls: true"
                   " (otherwise no initiator can log in)")
        if len(c.problems) != before:
            continue
        assert iqn is not None and tag is not None and demo is not None
        out.append(IscsiTarget(iqn, tag, tuple(portals), tuple(luns), tuple(acls), chap, demo,
                               tuple(attrs)))
    return out


# --------------------------------------------------------------------------- SRP and FC

# ib_srpt names each RDMA port twice in configfs (srpt_refresh_port, drivers/infiniband/ulp/srpt):
# by the GUID of its GID 0, "%04x:%04x:%04x:%04x", and by the whole GID, "0x%016llx%016llx".
_SRP_GUID_RE = re.compile(r"[0-9a-f]{4}(:[0-9a-f]{4}){3}")
_SRP_GID_RE = re.compile(r"0x[0-9a-f]{32}")
_SRP_PORT = ("an ib_srpt port name: the port GUID xxxx:xxxx:xxxx:xxxx or its GID 0x<32 hex"
             " digits> (ib.<32 hex digits> as rtslib-fb writes it)")
# rtslib-fb's naa test (utils.normalize_wwn), which tcm_fc target and ACL names must pass.
_FC_WWPN_RE = re.compile(r"naa\.[125c-f][0-9a-f]{15}")
_FC_WWPN = ("an FC port name: naa.<16 hex digits> starting 1, 2, 5 or c-f, or the same 8 bytes as"
            " 20:00:xx:xx:xx:xx:xx:xx (an FCoE WWPN is 20:00 and the MAC address)")


def _srp_port(c: Checker, value: object, path: str) -> str | None:
    if isinstance(value, str):
        v = value.strip().lower()
        if v.startswith("ib.") and _SRP_GID_RE.fullmatch("0x" + v[3:]):
            return "0x" + v[3:]
        if _SRP_GUID_RE.fullmatch(v) or _SRP_GID_RE.fullmatch(v):
            return v
    c.fail(path, value, _SRP_PORT)
    return None


def _srp_initiator(c: Checker, value: object, path: str) -> str | None:
    """ib_srpt's session name, which an ACL must carry: the initiator's source IP address for
    an RDMA/CM login to any port name; for an IB CM login, the initiator port GUID (to a port
    named by GUID) or the 128-bit initiator port ID 0x<32 hex digits> (to one named by GID)."""
    if isinstance(value, str):
        v = value.strip().lower()
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(v))
        if v.startswith("ib.") and _SRP_GID_RE.fullmatch("0x" + v[3:]):
            return "0x" + v[3:]
        if _SRP_GUID_RE.fullmatch(v) or _SRP_GID_RE.fullmatch(v):
            return v
    c.fail(path, value, "an SRP initiator as ib_srpt names its sessions: the initiator's IP"
           " address (RDMA/CM login), its port GUID xxxx:xxxx:xxxx:xxxx or its port ID 0x<32 hex"
           " digits> (IB CM login)")
    return None


def _fc_wwpn(c: Checker, value: object, path: str) -> str | None:
    if isinstance(value, str):
        v = value.strip().lower()
        if re.fullmatch(r"([0-9a-f]{2}:){7}[0-9a-f]{2}", v):
            v = "naa." + v.replace(":", "")
        elif v.startswith("0x"):
            v = "naa." + v[2:]
        if _FC_WWPN_RE.fullmatch(v):
            return v
    c.fail(path, value, _FC_WWPN)
    return None


def _load_fabric_acls(c: Checker, raw: object, path: str, luns: list[LunMap],
                      initiator: Callable[[Checker, object, str], str | None],
                      fabric: str) -> list[FabricAcl] | None:
    """The ``acls`` of an SRP or FC target: at least one (``fabric`` has no demo mode), each
    initiator once, ``luns`` naming devices of this target's luns. None if ``raw`` is not a
    list."""
    lun_devs = {lm.device for lm in luns}
    items = c.seq(raw, path)
    if items is None:
        return None
    if not items:
        c.fail(path, MISSING if raw is None else raw, f"at least one ACL ({fabric} has no demo"
               " mode: an initiator without an ACL cannot log in)")
        return None
    out: list[FabricAcl] = []
    for j, a in enumerate(items):
        ap = f"{path}[{j}]"
        am = c.mapping(a, ap, {"initiator", "luns"}, frozenset({"initiator"}))
        if am is None or "initiator" not in am:
            continue
        ini = initiator(c, am["initiator"], f"{ap}.initiator")
        if ini is not None and ini in {x.initiator for x in out}:
            c.fail(f"{ap}.initiator", am["initiator"],
                   "an initiator listed once per target (duplicate)")
            continue
        acl_luns = _acl_luns(c, am, ap, lun_devs)
        if ini is not None:
            out.append(FabricAcl(ini, acl_luns))
    return out


def _load_srp(c: Checker, raw: object, devices: set[str]) -> list[SrpTarget]:
    out: list[SrpTarget] = []
    seen: set[str] = set()
    cm_ports: set[int] = set()
    for i, item in enumerate(c.seq(raw, "exports.srp") or []):
        p = f"exports.srp[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, {"port", "luns", "acls", "rdma_cm_port"}, frozenset({"port"}))
        if m is None:
            continue
        port = _srp_port(c, m["port"], f"{p}.port") if "port" in m else None
        if port is not None:
            if port in seen:
                c.fail(f"{p}.port", m["port"], "a target port not used before (duplicate)")
            seen.add(port)
        cm_port = (c.integer(m["rdma_cm_port"], f"{p}.rdma_cm_port", 1, 65535,
                             "a TCP port 1..65535 for RDMA/CM logins")
                   if m.get("rdma_cm_port") is not None else None)
        if cm_port is not None:
            cm_ports.add(cm_port)
            if len(cm_ports) > 1:
                # discovery_auth/rdma_cm_port is one setting of the whole srpt fabric.
                c.fail(f"{p}.rdma_cm_port", cm_port, f"the same port as the other SRP targets"
                       f" ({min(cm_ports - {cm_port})}: ib_srpt has one RDMA/CM port)")
        luns = _load_lunmaps(c, m.get("luns"), f"{p}.luns", devices)
        acls = _load_fabric_acls(c, m.get("acls"), f"{p}.acls", luns, _srp_initiator, "ib_srpt")
        if len(c.problems) != before:
            continue
        assert port is not None and acls is not None
        out.append(SrpTarget(port, tuple(luns), tuple(acls), cm_port))
    return out


def _load_fc(c: Checker, raw: object, devices: set[str]) -> list[FcTarget]:
    out: list[FcTarget] = []
    seen: set[str] = set()
    for i, item in enumerate(c.seq(raw, "exports.fc") or []):
        p = f"exports.fc[{i}]"
        before = len(c.problems)
        m = c.mapping(item, p, {"wwpn", "luns", "acls"}, frozenset({"wwpn"}))
        if m is None:
            continue
        wwpn = _fc_wwpn(c, m["wwpn"], f"{p}.wwpn") if "wwpn" in m else None
        if wwpn is not None:
            if wwpn in seen:
                c.fail(f"{p}.wwpn", m["wwpn"], "a target port not used before (duplicate)")
            seen.add(wwpn)
        luns = _load_lunmaps(c, m.get("luns"), f"{p}.luns", devices)
        acls = _load_fabric_acls(c, m.get("acls"), f"{p}.acls", luns, _fc_wwpn, "tcm_fc")
        if len(c.problems) != before:
            continue
        assert wwpn is not None and acls is not None
        out.append(FcTarget(wwpn, tuple(luns), tuple(acls)))
    return out


# --------------------------------------------------------------------------- USB

# usb_f_tcm (drivers/usb/gadget/function/f_tcm.c) takes any "naa." name of up to 31 characters
# for the target port and the nexus (usbg_check_wwn, tcm_usbg_tpg_nexus_store: USBG_NAMELEN 32);
# we ask for the NAA form LIO generates elsewhere.
_USB_WWN_RE = re.compile(r"naa\.[0-9a-f]{16}")
_USB_WWN = "a USB target or nexus name naa.<16 hex digits>"
# A gadget is a directory of /sys/kernel/config/usb_gadget; a UDC a name in /sys/class/udc.
_GADGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UDC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _usb_wwn(c: Checker, value: object, path: str) -> str | None:
    if isinstance(value, str) and _USB_WWN_RE.fullmatch(value.strip().lower()):
        return value.strip().lower()
    c.fail(path, value, _USB_WWN)
    return None


def _nexus_for(wwn: str) -> str:
    """The default nexus name of the USB target ``wwn``: the same NAA with its last digit's
    lowest bit flipped (a fixed, distinct name, so a re-apply finds the same objects)."""
    return wwn[:-1] + format(int(wwn[-1], 16) ^ 1, "x")


def _load_usb(c: Checker, raw: object, devices: set[str]) -> list[UsbTarget]:
    out: list[UsbTarget] = []
    keys = {"wwn", "udc", "nexus", "gadget", "vendor_id", "product_id", "luns"}
    items = c.seq(raw, "exports.usb") or []
    for i, item in enumerate(items):
        p = f"exports.usb[{i}]"
        before = len(c.problems)
        if i > 0:
            # f_tcm.c: TPG_INSTANCES is 1 (one tcm function, one TPG in the whole system).
            c.fail(p, item, "at most one USB target (usb_f_tcm serves one in the whole system)")
            continue
        m = c.mapping(item, p, keys, frozenset({"wwn", "udc"}))
        if m is None:
            continue
        wwn = _usb_wwn(c, m["wwn"], f"{p}.wwn") if "wwn" in m else None
        nexus = (_usb_wwn(c, m["nexus"], f"{p}.nexus") if m.get("nexus") is not None
                 else None if wwn is None else _nexus_for(wwn))
        udc = (c.string(m["udc"], f"{p}.udc", _UDC_RE, "a USB device controller as"
                        " /sys/class/udc names it (dummy_udc.0 in the lab)")
               if "udc" in m else None)
        gadget = c.string(m.get("gadget", "tcmu-py"), f"{p}.gadget", _GADGET_RE,
                          "a gadget name of 1..64 characters A-Z a-z 0-9 _ . - (a directory of"
                          " /sys/kernel/config/usb_gadget)")
        vid = c.integer(m.get("vendor_id", 0x1D6B), f"{p}.vendor_id", 0, 0xFFFF,
                        "a USB vendor ID 0..0xffff")
        pid = c.integer(m.get("product_id", 0x0104), f"{p}.product_id", 0, 0xFFFF,
                        "a USB product ID 0..0xffff")
        luns = _load_lunmaps(c, m.get("luns"), f"{p}.luns", devices)
        numbers = sorted(lm.lun for lm in luns)
        if len(c.problems) == before and (numbers != list(range(len(numbers)))
                                          or len(numbers) > 16):
            # USB MSC Bulk-Only 3.2: a host asks GET MAX LUN (0..15) and scans 0..max; usb_f_tcm
            # answers with its LUN count - 1 (f_tcm.c, US_BULK_GET_MAX_LUN).
            c.fail(f"{p}.luns", numbers, "at most 16 LUNs numbered 0, 1, ... without gaps (a"
                   " Bulk-Only host scans LUNs 0..GET MAX LUN, which usb_f_tcm answers with the"
                   " LUN count - 1)")
        if len(c.problems) != before:
            continue
        assert wwn is not None and udc is not None and nexus is not None
        assert gadget is not None and vid is not None and pid is not None
        out.append(UsbTarget(wwn, udc, nexus, gadget, vid, pid, tuple(luns)))
    return out


_TOP_KEYS = ("state_dir", "defaults", "devices", "exports")


@functools.cache
def _installed() -> Mapping[str, type[Handler]]:
    """The registered handlers, looked up once per process (reading every installed package's
    entry points takes milliseconds, twenty times the load of a small file)."""
    return load_handlers()


def section_owners(registry: Mapping[str, type[Handler]]) -> dict[str, type[Handler]]:
    """Top-level YAML key -> the registered handler owning it (`Handler.config_sections`).

    A handler that fails to import is skipped (the registry logs it); a key the loader or an
    earlier handler already owns is logged and left to its first owner."""
    owners: dict[str, type[Handler]] = {}
    for subtype in registry:
        try:
            handler = registry[subtype]
        except KeyError:
            continue
        for key in handler.config_sections:
            if key in _TOP_KEYS or key in owners:
                first = "the loader" if key in _TOP_KEYS else f"handler {owners[key].subtype!r}"
                log.error("handler %r: YAML section %r belongs to %s; ignored", subtype, key,
                          first)
                continue
            owners[key] = handler
    return owners


def _build(c: Checker, doc: object,
           handlers: Mapping[str, Callable[[str], None]] | None,
           registry: Mapping[str, type[Handler]]) -> Config | None:
    owners = section_owners(registry)
    top = c.mapping(doc, "", {*_TOP_KEYS, *owners})
    if top is None:
        return None
    state_dir = c.abspath(top.get("state_dir", DEFAULT_STATE_DIR), "state_dir")
    defaults = _load_defaults(c, top.get("defaults"))
    sections: dict[str, tuple[Any, ...]] = {}
    for key, owner in owners.items():
        sections[key] = tuple(owner.load_section(key, top.get(key), c, top))
    where: dict[str, str] = {}
    devices = _load_devices(c, top.get("devices"), defaults, state_dir or DEFAULT_STATE_DIR,
                            handlers, owners, sections, where, registry)
    # Names given to devices that failed validation still count for cross-references, so one
    # bad device does not cascade into a "no such device" error for every export.
    dev_names = raw_names(top.get("devices"))
    for key, owner in owners.items():
        implied = owner.section_devices(key, sections[key], defaults)
        if implied and handlers is not None and owner.subtype not in handlers:
            # Its devices could not be served: say so once, at the section.
            c.fail(key, [getattr(spec, "name", spec) for spec in sections[key]],
                   f"the {owner.subtype} handler installed"
                   f" ({', '.join(sorted(handlers)) or 'none found'})")
        for dev, at in implied:
            if dev.name in dev_names:
                c.fail(f"{at}.name", dev.name, "a name no other device uses (the devices of"
                       f" {key} are devices of their own; do not list them in devices)")
                continue
            devices.append(dev)
            where[dev.name] = at
            dev_names.add(dev.name)
    _check_identities(c, devices, where, registry)
    em = c.mapping(top.get("exports"), "exports",
                   {"loopback", "iscsi", "iser", "srp", "fc", "usb"})
    loop = _load_lunmaps(c, (em or {}).get("loopback"), "exports.loopback", dev_names)
    iqns: set[str] = set()
    iscsi = _load_iscsi(c, (em or {}).get("iscsi"), dev_names, "iscsi", iqns)
    iser = _load_iscsi(c, (em or {}).get("iser"), dev_names, "iser", iqns)
    srp = _load_srp(c, (em or {}).get("srp"), dev_names)
    fc = _load_fc(c, (em or {}).get("fc"), dev_names)
    usb = _load_usb(c, (em or {}).get("usb"), dev_names)
    if c.problems or state_dir is None:
        return None
    return Config(c.source, state_dir, defaults, tuple(devices),
                  Exports(tuple(loop), tuple(iscsi), tuple(iser), tuple(srp), tuple(fc),
                          tuple(usb)),
                  tuple(sections.items()))


def _parse(text: str, source: str) -> object:
    """The YAML document of ``text`` (None for an empty one); ConfigError naming ``source``,
    the line and column, what was found and what was expected otherwise."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: got a file larger than {MAX_CONFIG_BYTES} bytes, expected"
                          " a configuration file of at most that size")
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # type: ignore[arg-type]  # noqa: S506
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


def load_config_text(text: str, source: str = "<string>", *,
                     handlers: Mapping[str, Callable[[str], None]] | None = None,
                     registry: Mapping[str, type[Handler]] | None = None) -> Config:
    """Parse and validate YAML ``text``; ``source`` names it in messages.

    ``handlers`` maps each installed subtype to its ``Handler.check_config(cfgstring)`` (the
    dev_config after ``<subtype>/``). When given, a device naming another subtype is an error, and
    each device's cfgstring is passed to its handler's check (a ConfigError it raises is reported
    like any other problem). Checks run before `lio.prepare_storage`, so a check that requires
    files to exist (image directory, pool.json) fails on a fresh host: omit ``handlers`` then, or
    prepare storage first.
    ``registry`` (default: every registered handler, `load_handlers`) gives the handlers that
    own top-level sections (`Handler.config_sections`: thin's ``pools``) and validate them.
    Raises ConfigError listing every problem; returns a fully validated Config otherwise.
    """
    c = Checker(source)
    doc = _parse(text, source)
    if doc is None:
        doc = {}
    cfg = _build(c, doc, handlers, _installed() if registry is None else registry)
    if cfg is None:
        raise ConfigError(c.report())
    return cfg


def _read(p: Path) -> str:
    """The text of the configuration file ``p``; ConfigError naming it when it is unreadable,
    larger than MAX_CONFIG_BYTES (refused unread) or not UTF-8."""
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
    return text


def load_config(path: str | Path, *,
                handlers: Mapping[str, Callable[[str], None]] | None = None,
                registry: Mapping[str, type[Handler]] | None = None) -> Config:
    """Read and validate the YAML file at ``path`` (see `load_config_text`); a file larger
    than MAX_CONFIG_BYTES is refused unread."""
    p = Path(path)
    text = _read(p)
    return load_config_text(text, str(p), handlers=handlers, registry=registry)


def load_default_config(*, handlers: Mapping[str, Callable[[str], None]] | None = None,
                        registry: Mapping[str, type[Handler]] | None = None) -> Config:
    """The embedded default configuration (package data ``tcmu_py/daemon/default.yaml``)."""
    ref = resources.files("tcmu_py.daemon").joinpath("default.yaml")
    return load_config_text(ref.read_text(encoding="utf-8"), "<default config>",
                            handlers=handlers, registry=registry)


def load_state_dir(path: str | Path | None) -> str:
    """Only the ``state_dir`` of the configuration file at ``path`` (None: the embedded default),
    validated as `load_config` would; the rest of the file is not looked at. ``tcmu-py down``
    needs nothing else: it removes what the state file there records, and must work even when
    other parts of the file no longer validate (or name a handler no longer installed)."""
    if path is None:
        ref = resources.files("tcmu_py.daemon").joinpath("default.yaml")
        text, source = ref.read_text(encoding="utf-8"), "<default config>"
    else:
        text, source = _read(Path(path)), str(path)
    doc = _parse(text, source)
    c = Checker(source)
    top = c.mapping({} if doc is None else doc, "", None)
    state_dir = c.abspath((top or {}).get("state_dir", DEFAULT_STATE_DIR), "state_dir")
    if c.problems or state_dir is None:
        raise ConfigError(c.report())
    return state_dir
