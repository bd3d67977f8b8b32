"""The handler API: how a subtype becomes a SCSI device.

A *handler* is registered for a TCMU subtype (the first path element of the device's `dev_config`,
e.g. `raw` in `raw//var/lib/img`). When the daemon finds a device of that subtype it calls
`Handler.open(config)`, which returns a `ScsiDevice` (see `tcmu_py.device.core`). Block handlers
usually just build a `BlockDevice` around a `BlockBackend`, declaring optional capabilities
(`Unmap`, `WriteSame`, `LbaStatus`, `ThinProvisioning`, `Resizable`, `Closable`) by implementing
them: see `tcmu_py.backend`, re-exported here. Tape drives, changers and other exotic
devices subclass `ScsiDevice` and take over the opcodes they need.

Handlers never see the ring, the uio file descriptor or the daemon.

Registration: the entry-point group ``tcmu_py.handlers`` maps a subtype name to a `Handler`
subclass, so a third-party package adds a subtype with one line in its own pyproject.toml::

    [project.entry-points."tcmu_py.handlers"]
    mydisk = "my_package:MyDiskHandler"

Beyond `open`, a handler may own more of the system through class attributes and methods whose
defaults do nothing (raw and null use none of them); the daemon, the YAML loader and the CLI find
them through the registry and import no handler module:

- `Handler.config_sections` / `Handler.load_section`: top-level YAML sections (thin's ``pools:``)
  and their validation, reported like every other problem (`tcmu_py.configspec.Checker`);
- `Handler.load_options` / `Handler.config_string`: a device's ``options:`` and the dev_config
  built from them (raw's image ``path``, by default ``key=value`` items);
- `Handler.device_config_items`: what a section adds to a device's dev_config (a pool's
  directory), `Handler.device_image`: the file holding a device's data (no two devices share one);
- `Handler.prepare`: what must exist before its devices open (pools, libraries), run by
  ``tcmu-py apply`` and ``serve -c`` after the whole file validated;
- `Handler.status` / `Handler.status_tables`: what it adds to ``tcmu-py status`` (``--json`` and
  text), and `Handler.metrics`: the gauges it adds to ``serve --metrics`` (read from that status);
- `Handler.commands`: its own ``tcmu-py <name> ...`` subcommands.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from tcmu_py.backend import (
    BlockBackend,
    Capabilities,
    CapabilityError,
    Closable,
    LbaStatus,
    ProvisioningInfo,
    Resizable,
    ThinProvisioning,
    Unmap,
    WriteSame,
)
from tcmu_py.configspec import (
    Checker,
    Defaults,
    Device,
    join_config_items,
    load_device_options,
)
from tcmu_py.errors import ConfigError
from tcmu_py.table import format_size, render_table

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice

__all__ = [
    "BlockBackend",
    "Capabilities",
    "CapabilityError",
    "Checker",
    "Closable",
    "CliCommand",
    "ConfigView",
    "Defaults",
    "Device",
    "DeviceConfig",
    "ENTRY_POINT_GROUP",
    "Handler",
    "HandlerRegistry",
    "LbaStatus",
    "MEMORY_FILESYSTEMS",
    "ProvisioningInfo",
    "Resizable",
    "SharedRegistry",
    "StatusTable",
    "TCMU_RUNNER_SUBTYPES",
    "format_size",
    "ThinProvisioning",
    "Unmap",
    "WriteSame",
    "load_handlers",
    "on_memory_filesystem",
    "parse_options",
    "render_table",
    "shared",
    "split_copy_domain",
    "split_daemon_items",
    "split_data_plane",
    "daemon_data_plane",
    "split_dev_config",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tcmu_py.handlers"

#: Subtypes served by tcmu-runner; ours must never collide with them so both daemons share a host.
TCMU_RUNNER_SUBTYPES = frozenset({"file", "rbd", "glfs", "qcow", "zbc", "fbo"})


@dataclass(frozen=True)
class DeviceConfig:
    """Everything a handler is told about one TCMU device.

    `cfgstring` is the part of `dev_config` after `<subtype>/`, without the daemon's own
    ``wwn=`` item (`split_wwn`). `size` is in bytes (the kernel's `dev_size`). `serial` is LIO's
    unit serial for the device when known (VPD 80h/83h). `wwn` (``naa.<16 or 32 hex digits>``)
    is the NAA designator the device reports in VPD 83h; None: one derived from the serial.
    `copy_domain` names the devices EXTENDED COPY may copy between (`split_copy_domain`);
    None: this device alone. `data_plane` False keeps every command in Python even when the
    backend declares a `FileExtent` (YAML ``data_plane: false``, ``serve --no-data-plane``).
    `cmd_time_out` is the kernel's ``attrib/cmd_time_out``: the seconds a command may take
    before the kernel fails it itself (LOGICAL UNIT COMMUNICATION FAILURE 02h/08h/00h, which sd
    does not retry); 0: no limit. A handler whose backend has a timeout of its own keeps it
    below this one, so that a stall is answered with its retryable sense first.
    """

    name: str
    subtype: str
    cfgstring: str
    size: int
    block_size: int = 512
    hw_max_sectors: int = 1024
    write_cache: bool = False
    serial: str | None = None
    uio_name: str = ""
    wwn: str | None = None
    copy_domain: str | None = None
    data_plane: bool = True
    cmd_time_out: int = 30


@dataclass(frozen=True)
class StatusTable:
    """A table a handler adds to the text of ``tcmu-py status`` (after the device table)."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def render(self) -> str:
        """The table without its title (`render_table`)."""
        return render_table(self.headers, self.rows)


@dataclass(frozen=True)
class Gauge:
    """One sample a handler adds to the daemon's metrics endpoint (`Handler.metrics`).

    `name` follows Prometheus' rules (``tcmu_py_<handler>_<what>_<unit>``, e.g.
    ``tcmu_py_thin_pool_used_bytes``); every sample of one name carries the same label names."""

    name: str
    help: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class CliCommand:
    """A ``tcmu-py <name> ...`` subcommand of a handler: `main` gets every argument after the
    name, parses them itself (its own `argparse` parser, so ``tcmu-py <name> --help`` is its
    help) and returns the exit status (0 success, 1 failure, 2 usage). A `ConfigError` it raises
    is printed as a configuration error and exits 2, a `TcmuError` exits 1."""

    help: str
    main: Callable[[list[str]], int]


class ConfigView(Protocol):
    """What `Handler.prepare` is shown of a validated configuration (`tcmu_py.daemon.config`)."""

    @property
    def source(self) -> str: ...

    @property
    def state_dir(self) -> str: ...

    @property
    def devices(self) -> tuple[Device, ...]: ...

    def section(self, key: str) -> tuple[Any, ...]:
        """The specs `load_section` returned for top-level key `key` (() if none)."""
        ...


class Handler(ABC):
    """One subtype. Subclasses set `subtype` and `description` and implement `open`; the rest
    of the contract (YAML sections, preparation, status, commands) is optional."""

    subtype: ClassVar[str]
    description: ClassVar[str] = ""
    #: Top-level YAML keys this handler owns; each is validated by `load_section`.
    config_sections: ClassVar[tuple[str, ...]] = ()
    #: Whether this subtype's devices draw from a pool named by the device key ``pool:``
    #: (thin, dedup); its `load_section` checks the name. Any other device with ``pool:`` is
    #: refused by the loader.
    takes_pool: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        """Raise `ConfigError` naming what is wrong with `cfgstring`; return None when it is usable.

        Called before a device is created (also by `tcmu-py apply`); must not create anything.
        """
        return None

    @classmethod
    @abstractmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        """Open the backing store and return the device. Errors: `ConfigError` or `OSError`."""

    # -- YAML configuration ------------------------------------------------------------------

    @classmethod
    def load_section(
        cls, key: str, raw: object, checker: Checker, doc: Mapping[str, Any]
    ) -> tuple[Any, ...]:
        """Validate top-level section `key` (one of `config_sections`): `raw` is its YAML value
        (None when the file has none), `doc` the whole document (for cross references, e.g.
        ``devices[3].pool`` naming a pool). Report every problem with `checker.fail` (key paths
        from the top: ``pools[2].capacity``) and return the frozen specs of what is valid
        (`ConfigView.section` gives them back). Runs before ``devices:`` is loaded; creates
        nothing."""
        return ()

    @classmethod
    def load_options(
        cls, raw: object, path: str, checker: Checker, name: str | None, state_dir: str
    ) -> tuple[tuple[str, str], ...] | None:
        """Validate the ``options:`` of one of this subtype's ``devices:`` entries (`raw` its
        YAML value, None when absent; `path` its key path, ``devices[3].options``; `name` the
        device's name, None if that is invalid; `state_dir` the file's ``state_dir``). Report
        problems with `checker.fail` and return the options as ``(key, text)`` pairs, None on a
        problem. Default: any keys of letters, digits, ``_ . -`` with scalar values
        (`tcmu_py.configspec.load_device_options`); raw takes only ``path`` (default
        ``<state_dir>/<name>.img``)."""
        return load_device_options(checker, raw, path)

    @classmethod
    def config_string(
        cls, options: tuple[tuple[str, str], ...], items: tuple[tuple[str, str], ...]
    ) -> str:
        """The dev_config after ``<subtype>/`` for a YAML device: its `options` (as
        `load_options` returned them) and the `items` section owners add
        (`device_config_items`). It must parse with `check_config`. Default:
        ``key=value;key=value``, options first; raw: the image path alone."""
        return join_config_items(options + items)

    @classmethod
    def device_config_items(
        cls, device: Device, sections: Mapping[str, tuple[Any, ...]]
    ) -> tuple[tuple[str, str], ...]:
        """Items this handler's sections add to `device`'s dev_config (any subtype's device; a
        thin pool's directory for a device naming the pool), so that a daemon started without
        the YAML (udev, a restart) can open the device from its dev_config alone. `sections`
        holds this handler's own sections' specs."""
        return ()

    @classmethod
    def section_devices(
        cls, key: str, specs: tuple[Any, ...], defaults: Defaults
    ) -> list[tuple[Device, str]]:
        """Devices implied by section `key` (a tape library's changer and drives), each with
        the key path that declares it; they are exported by name like any ``devices:`` entry."""
        return []

    @classmethod
    def device_image(cls, device: Device) -> str | None:
        """The file holding this subtype's `device`'s data, symbolic links resolved, or None:
        two devices may not share one (they would corrupt each other)."""
        return None

    @classmethod
    def device_images(cls, device: Device) -> list[str]:
        """Every file holding `device`'s data (`device_image`'s, by default; a subtype with
        more than one, as a mirror's local legs, lists them all)."""
        image = cls.device_image(device)
        return [] if image is None else [image]

    @classmethod
    def device_warnings(cls, device: Device) -> list[str]:
        """What `tcmu-py check` warns of in `device`'s settings: valid, but likely to hurt
        (each message names the key, the value and what is expected). Default: none."""
        return []

    @classmethod
    def prepare(cls, config: ConfigView) -> None:
        """Create or update what the configuration's devices of this subtype need before they
        open (pools, libraries), idempotently. Runs in ``tcmu-py apply`` and ``serve -c`` once
        the whole file validated, before any LIO object is created. Errors: `ConfigError`,
        `TcmuError`, `OSError`."""
        return None

    # -- tcmu-py status ------------------------------------------------------------------------

    @classmethod
    def status(cls, devices: Sequence[ScsiDevice]) -> dict[str, Any]:
        """Top-level entries this handler adds to the daemon's status (JSON-serialisable, shown
        as is by ``tcmu-py status --json``); `devices` are the open devices of this subtype the
        daemon serves (maybe none). Keys must not collide with ``pid``, ``devices`` and
        ``handlers``."""
        return {}

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        """The text of what `status` added: tables read from the whole status (as received from
        the daemon, possibly from another version: tolerate missing keys)."""
        return []

    @classmethod
    def metrics(cls, status: Mapping[str, Any]) -> list[Gauge]:
        """Gauges for ``serve --metrics``, read from the whole daemon status (what `status` added:
        pool use, library state). Called on the metrics server's thread at each scrape."""
        return []

    # -- tcmu-py <command> --------------------------------------------------------------------

    @classmethod
    def commands(cls) -> Mapping[str, CliCommand]:
        """This handler's ``tcmu-py`` subcommands by name."""
        return {}


#: Filesystems whose files live in memory: I/O on them is a memory copy and never waits for a disk.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def on_memory_filesystem(fd: int, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether the open file `fd` lives on a memory filesystem (`MEMORY_FILESYSTEMS`).

    The file's device number is looked up in `mountinfo` (proc(5): field 3 is major:minor, the
    filesystem type follows the " - " separator). Any doubt (no match, unreadable) answers False,
    the safe side: the backend is then treated as one that may block.
    """
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[2] == dev and " - " in line:
                    fstype = line.split(" - ", 1)[1].split()[0]
                    return fstype in MEMORY_FILESYSTEMS
    except OSError:
        return False
    return False


# ---------------------------------------------------------------------------------------------
# Registry


class HandlerRegistry(Mapping[str, "type[Handler]"]):
    """Registered handlers by subtype, each imported the first time it is looked up.

    Membership (`subtype in registry`) never imports anything, so the daemon starts without
    importing every handler, and a handler that fails to import, or that claims one of
    tcmu-runner's subtypes, is logged and treated as absent: one broken third-party package must
    not take the other subtypes down with it.
    """

    def __init__(self) -> None:
        self._points: dict[str, Any] = {}
        self._loaded: dict[str, type[Handler]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in TCMU_RUNNER_SUBTYPES:
                log.error(
                    "handler %s: subtype %r belongs to tcmu-runner; expected a name other than %s",
                    ep.value,
                    ep.name,
                    sorted(TCMU_RUNNER_SUBTYPES),
                )
                continue
            self._points[ep.name] = ep

    def __getitem__(self, subtype: str) -> type[Handler]:
        if subtype in self._loaded:
            return self._loaded[subtype]
        ep = self._points[subtype]
        try:
            cls = ep.load()
        except Exception:
            log.exception("handler %s for subtype %r failed to load", ep.value, subtype)
            del self._points[subtype]
            raise KeyError(subtype) from None
        self._loaded[subtype] = cls
        return cls  # type: ignore[no-any-return]

    def __contains__(self, subtype: object) -> bool:
        return subtype in self._points

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._points))

    def __len__(self) -> int:
        return len(self._points)


def load_handlers() -> HandlerRegistry:
    """Every registered handler by subtype (imported lazily, see `HandlerRegistry`)."""
    return HandlerRegistry()


def split_dev_config(dev_config: str) -> tuple[str, str]:
    """Split a TCMU `dev_config` (`<subtype>/<cfg>`) into subtype and cfgstring."""
    subtype, sep, cfg = dev_config.partition("/")
    if not sep or not subtype:
        raise ConfigError(f"dev_config {dev_config!r}: expected '<subtype>/<config string>'")
    return subtype, cfg


#: The daemon's ``wwn=`` item: last in a config string (or all of it), never seen by a handler.
#: SPC-5 7.7.6.6.1: NAA 2h, 3h and 5h designators are 8 bytes, NAA 6h is 16.
_WWN_ITEM = re.compile(r"(?:^|;)wwn=(naa\.(?:[235][0-9a-f]{15}|6[0-9a-f]{31}))\Z")


def split_wwn(cfgstring: str) -> tuple[str, str | None]:
    """Split a config string into the handler's part and the device's ``wwn`` (or None).

    tcmu-py writes a YAML device's ``wwn:`` as the last item of its dev_config
    (``thin/pool=/p;wwn=naa.5001405...``, ``raw//img/d0.img;wwn=naa.5001405...``,
    ``null/wwn=naa.5001405...``), so a daemon started without the YAML still reports it.
    """
    m = _WWN_ITEM.search(cfgstring)
    if m is None:
        return cfgstring, None
    return cfgstring[: m.start()], m.group(1)


#: The daemon's ``copy_domain=`` item: just before ``wwn=`` (or last), never seen by a handler.
_COPY_DOMAIN_ITEM = re.compile(r"(?:^|;)copy_domain=([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\Z")


def split_copy_domain(cfgstring: str) -> tuple[str, str | None]:
    """Split a config string (its ``wwn=`` item already split off, `split_wwn`) into the
    handler's part and the device's copy domain (or None: the device is a domain of its own).

    tcmu-py writes a YAML device's ``copy_domain:`` as an item of its dev_config, before any
    ``wwn=``, so a daemon started without the YAML still groups the device with the others.
    """
    m = _COPY_DOMAIN_ITEM.search(cfgstring)
    if m is None:
        return cfgstring, None
    return cfgstring[: m.start()], m.group(1)


#: The daemon's ``data_plane=off`` item: just before ``copy_domain=`` / ``wwn=`` (or last).
_DATA_PLANE_ITEM = re.compile(r"(?:^|;)data_plane=off\Z")


def split_data_plane(cfgstring: str) -> tuple[str, bool]:
    """Split a config string (its ``copy_domain=`` and ``wwn=`` items already split off) into
    the handler's part and whether the device may use the C data plane: tcmu-py writes a YAML
    device's ``data_plane: false`` as the item ``data_plane=off``."""
    m = _DATA_PLANE_ITEM.search(cfgstring)
    if m is None:
        return cfgstring, True
    return cfgstring[: m.start()], False


def split_daemon_items(cfgstring: str) -> tuple[str, str | None, str | None]:
    """(the handler's part, wwn, copy domain) of a config string: the daemon's own trailing
    items (``;data_plane=off;copy_domain=NAME;wwn=naa...``) removed (`daemon_data_plane` reads
    the first)."""
    rest, wwn = split_wwn(cfgstring)
    rest, domain = split_copy_domain(rest)
    rest, _ = split_data_plane(rest)
    return rest, wwn, domain


def daemon_data_plane(cfgstring: str) -> bool:
    """False when the config string carries the daemon's ``data_plane=off`` item."""
    return split_data_plane(split_copy_domain(split_wwn(cfgstring)[0])[0])[1]


def parse_options(cfgstring: str, known: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Parse `key=value;key=value` against `known` (key -> converter), each key at most once.
    Errors name the key.

    `;` is the separator tcmu-py writes: the kernel splits every configfs `control` write at
    `,`, so a dev_config holding commas arrives cut. `,` is accepted here too (a config string
    written whole, as through a device's ``attrib/dev_config``, may hold one), but the D-Bus
    CheckConfig refuses a targetcli ``cfgstring`` with one: rtslib-fb writes it through
    ``control``, and the device would be served with the part before the comma.
    """
    out: dict[str, Any] = {}
    if not cfgstring:
        return out
    for item in cfgstring.replace(",", ";").split(";"):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config string {cfgstring!r}: item {item!r}: expected key=value")
        if key not in known:
            raise ConfigError(
                f"config string {cfgstring!r}: unknown key {key!r}; expected one of {sorted(known)}"
            )
        if key in out:
            raise ConfigError(f"config string {cfgstring!r}: key {key!r} given twice; expected "
                              "each key at most once")
        try:
            out[key] = known[key](value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"config string {cfgstring!r}: key {key!r}: {value!r}: {exc}"
            ) from None
    return out


# ---------------------------------------------------------------------------------------------
# Shared backends: several devices (LUNs) resolving to one object, e.g. a tape library.

T = TypeVar("T")


class SharedRegistry:
    """Reference-counted objects shared by several devices, keyed by a string from their config.

    `acquire(key, factory)` returns the existing object or creates it with `factory()`;
    `release(key, closer)` drops one reference and calls `closer(obj)` when the last one goes.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[Any, int]] = {}

    def acquire(self, key: str, factory: Callable[[], T]) -> T:
        with self._lock:
            if key in self._objects:
                obj, refs = self._objects[key]
                self._objects[key] = (obj, refs + 1)
                return obj  # type: ignore[no-any-return]
            obj = factory()
            self._objects[key] = (obj, 1)
            return obj

    def release(self, key: str, closer: Callable[[Any], None] | None = None) -> None:
        with self._lock:
            obj, refs = self._objects[key]
            if refs > 1:
                self._objects[key] = (obj, refs - 1)
                return
            del self._objects[key]
        if closer is not None:
            closer(obj)


#: The process-wide registry handlers use for shared backends.
shared = SharedRegistry()
