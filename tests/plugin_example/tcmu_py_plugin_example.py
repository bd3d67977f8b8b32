"""`ramdisk`: disks in memory, declared in their own YAML section (an out-of-tree handler).

The section::

    ramdisks:
      limit: 64M                 # optional: the memory all of them may take together
      disks:
        - {name: r0, size: 16M}  # a device named r0, exported by name like any other

Each disk is a device of subtype ``ramdisk`` (dev_config ``ramdisk/``); its data lives as long
as the device is open. ``tcmu-py status`` shows a "ram disks" table (``--json``: ``ramdisks``),
``tcmu-py ramdisk pages SIZE...`` how many 4 KiB pages disks of those sizes pin.
"""

from __future__ import annotations

import argparse
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tcmu_py.device.block import BlockDevice, open_block_device
from tcmu_py.device.core import ScsiDevice
from tcmu_py.handler import (
    Checker,
    CliCommand,
    ConfigView,
    Defaults,
    Device,
    DeviceConfig,
    Handler,
    StatusTable,
)

SECTION = "ramdisks"
PAGE = 4096
_SIZE = re.compile(r"(\d+)([KMG]?)")


@dataclass(frozen=True)
class RamDiskSpec:
    name: str
    size: int


class RamBackend:
    """The disk's bytes in a bytearray; nothing waits, so commands run on the loop thread.

    Besides `tcmu_py.backend.BlockBackend` it declares `tcmu_py.backend.Unmap`: an unmapped
    range reads as zeros, and it says so (``lbprz``), so the device reports LBPRZ=1.
    """

    write_cache = False
    blocking = False
    lbprz = True

    def __init__(self, size: int, block_size: int) -> None:
        self.size = size
        self.block_size = block_size
        self.data = bytearray(size)
        self.written = 0  # bytes written since open (for the status table)
        self._lock = threading.Lock()

    def read(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = self.data[offset:offset + len(b)]
            offset += len(b)

    def write(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.data[offset:offset + len(b)] = b
            offset += len(b)
            with self._lock:
                self.written += len(b)

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)


class RamDiskHandler(Handler):
    subtype = "ramdisk"
    description = "a disk in memory (example of an out-of-tree handler)"
    config_sections = (SECTION,)

    @classmethod
    def open(cls, config: DeviceConfig) -> ScsiDevice:
        return open_block_device(config, RamBackend(config.size, config.block_size))

    @classmethod
    def load_section(
        cls, key: str, raw: object, checker: Checker, doc: Mapping[str, Any]
    ) -> tuple[Any, ...]:
        m = checker.mapping(raw, SECTION, {"limit", "disks"})
        if not m:
            return ()
        limit = checker.size(m["limit"], f"{SECTION}.limit") if "limit" in m else None
        out: list[RamDiskSpec] = []
        used = 0
        for i, item in enumerate(checker.seq(m.get("disks"), f"{SECTION}.disks") or []):
            p = f"{SECTION}.disks[{i}]"
            d = checker.mapping(item, p, {"name", "size"}, frozenset({"name", "size"}))
            if not d or "name" not in d or "size" not in d:
                continue
            name = checker.name(d["name"], f"{p}.name")
            size = checker.size(d["size"], f"{p}.size")
            if size is not None and size % 512:
                checker.fail(f"{p}.size", d["size"], "a multiple of 512 bytes")
                size = None
            if size is not None and limit is not None and used + size > limit:
                checker.fail(f"{p}.size", d["size"], f"a size within {SECTION}.limit ({limit}"
                             f" bytes in all; the disks before it take {used})")
                size = None
            if name is None or size is None:
                continue
            used += size
            out.append(RamDiskSpec(name, size))
        return tuple(out)

    @classmethod
    def section_devices(
        cls, key: str, specs: tuple[Any, ...], defaults: Defaults
    ) -> list[tuple[Device, str]]:
        return [
            (Device(s.name, cls.subtype, s.size, 512, defaults.hw_max_sectors,
                    defaults.max_data_area_mb, defaults.cmd_time_out, False),
             f"{SECTION}.disks[{i}]")
            for i, s in enumerate(specs)
        ]

    @classmethod
    def prepare(cls, config: ConfigView) -> None:
        return None  # memory needs nothing made beforehand

    @classmethod
    def status(cls, devices: Sequence[ScsiDevice]) -> dict[str, Any]:
        out = []
        for dev in devices:
            backend = dev.backend if isinstance(dev, BlockDevice) else None
            if isinstance(backend, RamBackend):
                out.append({"name": dev.config.name, "size": backend.size,
                            "written": backend.written})
        return {SECTION: out}

    @classmethod
    def status_tables(cls, status: Mapping[str, Any]) -> list[StatusTable]:
        rows = tuple((d["name"], str(d["size"]), str(d["written"]))
                     for d in status.get(SECTION) or [])
        return [StatusTable("ram disks", ("ramdisk", "bytes", "written"), rows)] if rows else []

    @classmethod
    def commands(cls) -> Mapping[str, CliCommand]:
        return {"ramdisk": CliCommand("RAM disk sizes (tcmu-py ramdisk --help)", _main)}


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected bytes or a size like 16M")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tcmu-py ramdisk", description="RAM disk sizes")
    sub = p.add_subparsers(dest="cmd", required=True)
    pages = sub.add_parser("pages", help="4 KiB pages RAM disks of these sizes pin")
    pages.add_argument("sizes", nargs="+", type=_size, metavar="SIZE")
    args = p.parse_args(argv)
    total = sum(-(-s // PAGE) for s in args.sizes)
    print(f"{total} pages ({total * PAGE} bytes)")
    return 0
