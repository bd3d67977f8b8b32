"""tcmu-py: userspace SCSI devices for Linux LIO, served through the kernel's TCMU ring.

The names below are the API a handler author needs (see docs/handlers.md); each is imported the
first time it is used, so ``import tcmu_py`` imports no submodule (the command line starts fast).
The test kit stays in `tcmu_py.testing` (`RingHarness`, `check_block_handler`, `cdbs`,
`MemoryDisk`), the built-in handlers in `tcmu_py.handlers`.

- The handler contract (`tcmu_py.handler`): `Handler`, `DeviceConfig`, `CliCommand`,
  `StatusTable`, `Gauge`, `ConfigView`, `parse_options`, `shared` / `SharedRegistry`,
  `on_memory_filesystem`; the YAML specs handlers are shown and their `Checker`
  (`tcmu_py.configspec`).
- Block backends (`tcmu_py.backend`): `BlockBackend` and the capability Protocols `Unmap`,
  `WriteSame`, `LbaStatus`, `ThinProvisioning` (with `ProvisioningInfo`), `Resizable`,
  `Closable`, `CopyRange`, `FileExtent`; `Capabilities`, `CapabilityError`.
- Devices (`tcmu_py.device`): `ScsiDevice`, `BlockDevice`, `open_block_device`, the `command`
  decorator, `Command` (one SCSI command's CDB and buffers) and `Response`.
- Errors: `TcmuError`, `ConfigError` and `ScsiError` with the common sense classes
  (`tcmu_py.scsi.sense` has them all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Exported name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("CliCommand", "ConfigView", "DeviceConfig", "Gauge", "Handler", "SharedRegistry",
         "StatusTable", "on_memory_filesystem", "parse_options", "shared"), "tcmu_py.handler"),
    **dict.fromkeys(
        ("BlockBackend", "Capabilities", "CapabilityError", "Closable", "CopyRange",
         "FileExtent", "LbaStatus", "ProvisioningInfo", "Resizable", "ThinProvisioning",
         "Unmap", "WriteSame"),
        "tcmu_py.backend"),
    **dict.fromkeys(("Checker", "Defaults", "Device"), "tcmu_py.configspec"),
    **dict.fromkeys(("ScsiDevice", "command"), "tcmu_py.device.core"),
    **dict.fromkeys(("BlockDevice", "open_block_device"), "tcmu_py.device.block"),
    **dict.fromkeys(("Command", "Response"), "tcmu_py.device.command"),
    **dict.fromkeys(("ConfigError", "TcmuError"), "tcmu_py.errors"),
    **dict.fromkeys(
        ("ScsiError", "AbortedCommand", "HardwareError", "IllegalRequest", "InvalidFieldInCdb",
         "InvalidFieldInParameterList", "InvalidOpcode", "LbaOutOfRange", "MediumError",
         "MediumNotPresent", "Miscompare", "NotReady", "ParameterListLengthError",
         "SpaceAllocationFailed", "UnitAttention", "WriteError", "WriteProtected"),
        "tcmu_py.scsi.sense"),
}

# The same names as _EXPORTS (tests/unit/test_public_api.py checks it).
__all__ = [
    "AbortedCommand",
    "BlockBackend",
    "BlockDevice",
    "Capabilities",
    "CapabilityError",
    "Checker",
    "CliCommand",
    "Closable",
    "Command",
    "ConfigError",
    "ConfigView",
    "CopyRange",
    "Defaults",
    "Device",
    "DeviceConfig",
    "FileExtent",
    "Gauge",
    "Handler",
    "HardwareError",
    "IllegalRequest",
    "InvalidFieldInCdb",
    "InvalidFieldInParameterList",
    "InvalidOpcode",
    "LbaOutOfRange",
    "LbaStatus",
    "MediumError",
    "MediumNotPresent",
    "Miscompare",
    "NotReady",
    "ParameterListLengthError",
    "ProvisioningInfo",
    "Resizable",
    "Response",
    "ScsiDevice",
    "ScsiError",
    "SharedRegistry",
    "SpaceAllocationFailed",
    "StatusTable",
    "TcmuError",
    "ThinProvisioning",
    "UnitAttention",
    "Unmap",
    "WriteError",
    "WriteProtected",
    "WriteSame",
    "command",
    "on_memory_filesystem",
    "open_block_device",
    "parse_options",
    "shared",
]

if TYPE_CHECKING:  # what the names are, for type checkers and editors (never run)
    from tcmu_py.backend import (
        BlockBackend,
        Capabilities,
        CapabilityError,
        Closable,
        CopyRange,
        FileExtent,
        LbaStatus,
        ProvisioningInfo,
        Resizable,
        ThinProvisioning,
        Unmap,
        WriteSame,
    )
    from tcmu_py.configspec import Checker, Defaults, Device
    from tcmu_py.device.block import BlockDevice, open_block_device
    from tcmu_py.device.command import Command, Response
    from tcmu_py.device.core import ScsiDevice, command
    from tcmu_py.errors import ConfigError, TcmuError
    from tcmu_py.handler import (
        CliCommand,
        ConfigView,
        DeviceConfig,
        Gauge,
        Handler,
        SharedRegistry,
        StatusTable,
        on_memory_filesystem,
        parse_options,
        shared,
    )
    from tcmu_py.scsi.sense import (
        AbortedCommand,
        HardwareError,
        IllegalRequest,
        InvalidFieldInCdb,
        InvalidFieldInParameterList,
        InvalidOpcode,
        LbaOutOfRange,
        MediumError,
        MediumNotPresent,
        Miscompare,
        NotReady,
        ParameterListLengthError,
        ScsiError,
        SpaceAllocationFailed,
        UnitAttention,
        WriteError,
        WriteProtected,
    )


def __getattr__(name: str) -> Any:
    """Import an exported name on first use (PEP 562) and keep it."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tcmu_py' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
