"""A tape drive for the unit tests: a fake library holding cartridges in a directory and a
drive driven through Command objects (no ring). The loaded-tape fixtures (`lib`, `tape`)
are in conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl import personality as pers
from tcmu_py.handlers.vtl.cartridge import Cartridge
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.scsi import ssc
from tcmu_py.testing.harness import Result, run_command

FORM = ssc.ReadPositionForm

#: The cartridge the `tape` fixture loads (an LTO-8 one).
BARCODE = "TST001L8"


class FakeLibrary:
    """The Library surface a drive uses, with cartridges in a directory."""

    def __init__(self, root: Path, model: str = "IBM-LTO8") -> None:
        self.root = root
        self.model = model
        self.slots: dict[int, str | None] = {0: None}
        self.prevent: dict[int, bool] = {}
        self.listeners: dict[int, list[Callable[[str | None], None]]] = {}

    def media_path(self, barcode: str) -> Path:
        return self.root / barcode

    def drive_barcode(self, drive_index: int) -> str | None:
        return self.slots.get(drive_index)

    def set_drive_prevent(self, drive_index: int, prevented: bool) -> None:
        self.prevent[drive_index] = prevented

    def add_drive_listener(self, drive_index: int, cb: Callable[[str | None], None]) -> None:
        self.listeners.setdefault(drive_index, []).append(cb)

    def drive_serial(self, drive_index: int) -> str:
        return f"SN{drive_index:06d}"

    def drive_model(self, drive_index: int) -> str:
        return self.model

    # test helpers
    def create(self, barcode: str, **kw: object) -> None:
        Cartridge.create(self.media_path(barcode), barcode, **kw)  # type: ignore[arg-type]

    def move(self, barcode: str | None, drive_index: int = 0) -> None:
        self.slots[drive_index] = barcode
        for cb in self.listeners.get(drive_index, []):
            cb(barcode)


class Tape:
    """A drive plus CDB helpers returning harness Results."""

    def __init__(self, lib: FakeLibrary, model: str | None = None) -> None:
        self.lib = lib
        cfg = DeviceConfig(name="tape0", subtype="vtl", cfgstring="", size=0)
        self.dev = TapeDrive(cfg, lib, 0, personality=pers.personality(model) if model else None)

    def run(self, cdb: bytes, data_out: bytes = b"", data_in_len: int = 0) -> Result:
        return run_command(self.dev, cdb, data_out, data_in_len)

    def clear_ua(self) -> None:
        while self.run(bytes(6)).sense_codes[0] == 6:
            pass

    def write(self, data: bytes) -> Result:
        return self.run(ssc.ReadWrite6(False, False, len(data)).build(0x0A), data)

    def write_fixed(self, data: bytes, blocks: int) -> Result:
        return self.run(ssc.ReadWrite6(True, False, blocks).build(0x0A), data)

    def read(self, n: int, sili: bool = False) -> Result:
        return self.run(ssc.ReadWrite6(False, sili, n).build(0x08), data_in_len=n)

    def read_fixed(self, blocks: int, size: int) -> Result:
        return self.run(ssc.ReadWrite6(True, False, blocks).build(0x08), data_in_len=blocks * size)

    def weof(self, n: int = 1) -> Result:
        return self.run(ssc.WriteFilemarks6(False, False, n).build())

    def space(self, code: int, count: int, sixteen: bool = False) -> Result:
        return self.run(ssc.Space(code, count).build(sixteen))

    def locate(self, obj: int, sixteen: bool = False, dest: int = 0) -> Result:
        return self.run(ssc.Locate(dest, False, False, 0, obj).build(sixteen))

    def rewind(self) -> Result:
        return self.run(bytes([0x01, 0, 0, 0, 0, 0]))

    def tell(self, form: int = FORM.LONG) -> ssc.Position:
        r = self.run(ssc.ReadPosition(form, 32).build(), data_in_len=32)
        assert r.good, r
        return ssc.parse_read_position(r.data, form)

    def mode_select_block(self, density: int, length: int) -> Result:
        # MODE SELECT(6): 4-byte header + one 8-byte block descriptor.
        data = bytes([0, 0, 0x10, 8, density, 0, 0, 0, 0]) + length.to_bytes(3, "big")
        return self.run(bytes([0x15, 0x10, 0, 0, len(data), 0]), data)

    def mode_sense(self, page: int, subpage: int = 0, pc: int = 0) -> Result:
        return self.run(bytes([0x5A, 0, (pc << 6) | page, subpage, 0, 0, 0, 0x10, 0, 0]),
                        data_in_len=4096)

    def log_sense(self, page: int) -> Result:
        return self.run(bytes([0x4D, 0, 0x40 | page, 0, 0, 0, 0, 0x10, 0, 0]), data_in_len=4096)


def load_tape(lib: FakeLibrary, barcode: str = BARCODE) -> Tape:
    """A drive of `lib` with a new cartridge `barcode` loaded and the unit attentions of
    power-on and of the load consumed: ready at the beginning of the tape."""
    lib.create(barcode)
    t = Tape(lib)
    lib.move(barcode)
    t.clear_ua()
    return t
