"""Virtual tape library: one medium changer LUN and N tape drive LUNs sharing one `Library`.

Each LUN is its own TCMU device of subtype ``vtl`` with the config string
``library=<library dir>;unit=changer`` or ``library=<library dir>;unit=drive<N>`` (N from 0).
The library directory must be an absolute path, as the image path of ``raw`` and a pool
directory of ``thin`` are: the daemon's working directory is no base an operator can see, so a
relative ``library=`` is a ConfigError (symbolic links in it are resolved; the resolved path
keys the shared `Library`).
Options are separated by ``;`` (``,`` is accepted too, but cannot reach us through configfs:
target_core_user splits its ``control`` writes at commas, so ``dev_config=vtl/a=1,b=2`` arrives
as ``vtl/a=1``; tcmu-runner's handlers use ``;`` for the same reason).
All devices of one library in the daemon share a single `Library` object through
`tcmu_py.handler.shared`, keyed by the resolved library directory; it is closed when the last of
them closes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tcmu_py.configspec import Checker, Defaults, Device
from tcmu_py.errors import ConfigError
from tcmu_py.handler import (
    CliCommand,
    ConfigView,
    DeviceConfig,
    Gauge,
    Handler,
    StatusTable,
    parse_options,
    shared,
)

if TYPE_CHECKING:
    from tcmu_py.device.core import ScsiDevice
    from tcmu_py.handlers.vtl.library import Library

__all__ = ["VtlHandler", "acquire_library", "release_library"]

_UNIT_RE = re.compile(r"changer|drive(\d+)")
_OPTIONS: dict[str, Callable[[str], Any]] = {"library": str, "unit": str}


def _parse(cfgstring: str) -> tuple[Path, int | None]:
    """(library dir, drive index or None for the changer). Raises ConfigError."""
    opts = parse_options(cfgstring.replace(";", ","), _OPTIONS)
    for key in _OPTIONS:
        if key not in opts:
            raise ConfigError(
                f"config string {cfgstring!r}: missing {key}=; expected "
                "library=<dir>;unit=changer|drive<N>"
            )
    m = _UNIT_RE.fullmatch(opts["unit"])
    if m is None:
        raise ConfigError(
            f"config string {cfgstring!r}: unit={opts['unit']!r}: expected changer or drive<N>"
        )
    drive = int(m.group(1)) if m.group(1) is not None else None
    if not os.path.isabs(opts["library"]):
        raise ConfigError(
            f"config string {cfgstring!r}: library={opts['library']!r}: expected an absolute "
            "library directory"
        )
    return Path(os.path.realpath(opts["library"])), drive


def _key(root: Path) -> str:
    return f"vtl-library:{root}"


def acquire_library(root: str | os.PathLike[str]) -> Library:
    """The process-wide shared `Library` of directory `root` (opened on first use)."""
    from tcmu_py.handlers.vtl.library import Library

    path = Path(os.path.realpath(root))
    return shared.acquire(_key(path), lambda: Library.open(path))


def release_library(root: str | os.PathLike[str]) -> None:
    """Drop one reference taken by `acquire_library`; the last one closes the library."""
    path = Path(os.path.realpath(root))
    shared.release(_key(path), lambda lib: lib.close())


class VtlHandler(Handler):
    """Subtype ``vtl``: the changer or one drive of a library directory made by `tcmu-py vtl`."""

    subtype = "vtl"
    #: What targetcli's ``help create`` shows as CFGSTRING FORMAT.
    description = ("virtual tape library unit: library=<library directory>;unit=changer|drive<N>"
                   " (library made with `tcmu-py vtl create-library`)")
    config_sections = ("libraries",)

    # The YAML section, preparation and commands live in `.config` and `.admin`.

    @classmethod
    def load_section(
        cls, key: str, raw: object, checker: Checker, doc: Mapping[str, Any]
    ) -> tuple[Any, ...]:
        from .config import load_libraries

        return load_libraries(raw, checker, doc)

    @classmethod
    def section_devices(
        cls, key: str, specs: tuple[Any, ...], defaults: Defaults
    ) -> list[tuple[Device, str]]:
        from .config import library_devices

        out = []
        for i, lib in enumerate(specs):
            keys = ["changer"] + [f"drives[{j}]" for j in range(len(lib.drives))]
            out += [(dev, f"{key}[{i}].{k}")
                    for dev, k in zip(library_devices(lib, defaults), keys, strict=True)]
        return out

    @classmethod
    def prepare(cls, config: ConfigView) -> None:
        from .config import prepare

        prepare(config)

    @classmethod
    def commands(cls) -> Mapping[str, CliCommand]:
        from .admin import main

        return {"vtl": CliCommand("virtual tape library administration (tcmu-py vtl --help)",
                              main)}

    @classmethod
    def status(cls, devices: Sequence[ScsiDevice]) -> dict[str, Any]:
        from .status import status

        return status(devices)

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        from .status import status_tables

        return status_tables(status)

    @classmethod
    def metrics(cls, status: Mapping[str, Any]) -> list[Gauge]:
        from .status import metrics

        return metrics(status)

    @classmethod
    def check_config(cls, cfgstring: str) -> None:
        from tcmu_py.handlers.vtl.library import Library, LibraryError

        root, drive = _parse(cfgstring)
        try:
            lib = Library.open(root)
        except (OSError, LibraryError) as exc:  # LibraryStateError names library.json itself
            raise ConfigError(f"config string {cfgstring!r}: {exc}") from None
        try:
            if drive is not None and drive >= lib.drive_count:
                raise ConfigError(
                    f"config string {cfgstring!r}: library {root} has {lib.drive_count} drives "
                    f"(drive0..drive{lib.drive_count - 1})"
                )
        finally:
            lib.close()

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        from tcmu_py.handlers.vtl.library import LibraryError

        cls.check_config(config.cfgstring)
        root, drive = _parse(config.cfgstring)
        try:
            library = acquire_library(root)
        except LibraryError as exc:
            raise ConfigError(f"library {root}: {exc}") from None
        try:
            device: Any
            if drive is None:
                from tcmu_py.handlers.vtl.changer import Changer

                device = Changer(config, library, on_close=lambda: release_library(root))
            else:
                from tcmu_py.handlers.vtl.drive import TapeDrive

                device = TapeDrive(config, library, drive)
                _release_on_close(device, root)
        except BaseException:
            release_library(root)
            raise
        return device  # type: ignore[no-any-return]


def _release_on_close(device: Any, root: Path) -> None:
    """Wrap `device.close` so the shared library reference is dropped exactly once."""
    inner = device.close
    done = False

    def close() -> None:
        nonlocal done
        try:
            inner()
        finally:
            if not done:
                done = True
                release_library(root)

    device.close = close
