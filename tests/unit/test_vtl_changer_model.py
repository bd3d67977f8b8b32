"""Hypothesis state machine: the changer LUN against a reference model of SMC-3 behaviour.

Every command, in every reachable state, must either move the library to the state the model
predicts or fail with exactly the sense the model predicts (and change nothing). The machine also
lets the drive set its PREVENT flag, an operator (a second process) import and export cartridges,
and the daemon restart (a crash: new Library and Changer from disk), after which the state must
be what was acknowledged.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.changer import Changer
from tcmu_py.handlers.vtl.library import Library, LibraryError
from tcmu_py.scsi import smc
from tcmu_py.scsi.smc import ElementStatus
from tcmu_py.testing.harness import run_command

MT = 0x0001
DRIVES = [0x0100, 0x0101]
IES = [0x0300, 0x0301]
SLOTS = list(range(0x0400, 0x0406))
HOLDERS = DRIVES + IES + SLOTS
ALL = [MT, *HOLDERS]
BAD = [0x0002, 0x0999]
BARCODES = [f"MOD{i:03d}L8" for i in range(5)]

OK = (0, 0, 0)
INVALID_ADDRESS = (5, 0x21, 0x01)
INVALID_FIELD = (5, 0x24, 0x00)
SOURCE_EMPTY = (5, 0x3B, 0x0E)
DEST_FULL = (5, 0x3B, 0x0D)
PREVENTED = (5, 0x53, 0x02)
IE_OPEN = (2, 0x3A, 0x02)
POWER_ON = (6, 0x29, 0x00)
IE_ACCESSED = (6, 0x28, 0x01)
HARDWARE_ERROR = (4, 0x44, 0x00)

addresses = st.sampled_from(ALL + BAD)
transports = st.sampled_from([0, MT, MT, SLOTS[0], BAD[0]])


@dataclass
class Slot:
    barcode: str
    source: int | None = None
    imported: bool = False


@dataclass
class Model:
    contents: dict[int, Slot] = field(default_factory=dict)
    ie_prevent: bool = False
    ie_open: set[int] = field(default_factory=set)
    drive_prevent: dict[int, bool] = field(default_factory=lambda: dict.fromkeys(DRIVES, False))
    pending_ua: list[tuple[int, int, int]] = field(default_factory=list)

    def ua(self, codes: tuple[int, int, int]) -> None:
        if codes not in self.pending_ua:
            self.pending_ua.append(codes)

    def moved(self, slot: Slot, src: int) -> Slot:
        source = src if src in IES or src in SLOTS else slot.source
        return Slot(slot.barcode, source, imported=False)

    def transport_error(self, t: int) -> tuple[int, int, int] | None:
        return None if t in (0, MT) else INVALID_ADDRESS

    def move(self, t: int, s: int, d: int) -> tuple[int, int, int]:
        if err := self.transport_error(t):
            return err
        if s not in HOLDERS or d not in HOLDERS:
            return INVALID_ADDRESS
        if s not in self.contents:
            return SOURCE_EMPTY
        if d in self.contents:
            return DEST_FULL
        if s in self.ie_open or d in self.ie_open:
            return IE_OPEN
        if self.drive_prevent.get(s):
            return PREVENTED
        self.contents[d] = self.moved(self.contents.pop(s), s)
        return OK

    def exchange(self, t: int, s: int, d1: int, d2: int) -> tuple[int, int, int]:
        if err := self.transport_error(t):
            return err
        if s not in HOLDERS or d1 not in HOLDERS or d2 not in HOLDERS or s == d1:
            return INVALID_ADDRESS
        if s not in self.contents or d1 not in self.contents:
            return SOURCE_EMPTY
        if d2 == d1 or (d2 != s and d2 in self.contents):
            return DEST_FULL
        if {s, d1, d2} & self.ie_open:
            return IE_OPEN
        if self.drive_prevent.get(s) or self.drive_prevent.get(d1):
            return PREVENTED
        first, second = self.contents.pop(s), self.contents.pop(d1)
        self.contents[d1] = self.moved(first, s)
        self.contents[d2] = self.moved(second, d1)
        return OK


class ChangerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vtl-model-"))
        lib = Library.create(
            self.dir / "lib",
            name="model",
            drives=[("SERIAL0", "IBM-LTO8"), ("SERIAL1", "IBM-LTO8")],
            slots=len(SLOTS),
            import_export=len(IES),
        )
        self.model = Model()
        for barcode in BARCODES:
            lib.media_path(barcode).write_bytes(b"")
        for barcode, slot in zip(BARCODES[:3], SLOTS, strict=False):
            lib.place(barcode, slot)
            self.model.contents[slot] = Slot(barcode)
        self.operator = Library.open(lib.path)  # another process: `tcmu-py vtl`
        self.dev = self._new_changer(lib)

    def _new_changer(self, lib: Library) -> Changer:
        self.model.pending_ua = [POWER_ON]
        self.model.drive_prevent = dict.fromkeys(DRIVES, False)
        return Changer(DeviceConfig(name="ch", subtype="vtl", cfgstring="", size=0), lib)

    def teardown(self) -> None:
        self.dev.close()
        self.dev.library.close()
        self.operator.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def send(self, cdb: bytes, predict) -> None:  # type: ignore[no-untyped-def]
        """Run `cdb`; a pending unit attention wins, otherwise `predict()` gives the outcome."""
        r = run_command(self.dev, cdb)
        expected = self.model.pending_ua.pop(0) if self.model.pending_ua else predict()
        assert r.sense_codes == expected, (cdb.hex(), r, expected)
        assert r.good == (expected == OK)

    @rule(t=transports, s=addresses, d=addresses)
    def move(self, t: int, s: int, d: int) -> None:
        self.send(smc.MoveMedium(t, s, d).build(), lambda: self.model.move(t, s, d))

    @rule(t=transports, s=st.sampled_from(HOLDERS), d=st.sampled_from(HOLDERS))
    def move_between_holders(self, t: int, s: int, d: int) -> None:
        self.move(t, s, d)

    @rule(t=transports, s=addresses, d1=addresses, d2=addresses)
    def exchange(self, t: int, s: int, d1: int, d2: int) -> None:
        self.send(
            smc.ExchangeMedium(t, s, d1, d2).build(), lambda: self.model.exchange(t, s, d1, d2)
        )

    @rule(data=st.data())
    def move_from_full(self, data: st.DataObject) -> None:
        """Biased toward moves that can succeed (or hit open / prevented elements)."""
        if not self.model.contents:
            return
        s = data.draw(st.sampled_from(sorted(self.model.contents)))
        d = data.draw(st.sampled_from(HOLDERS))
        self.move(MT, s, d)

    @rule(data=st.data())
    def exchange_full(self, data: st.DataObject) -> None:
        full = sorted(self.model.contents)
        if len(full) < 2:
            return
        s, d1 = data.draw(st.permutations(full))[:2]
        d2 = data.draw(st.sampled_from([s, *HOLDERS]))
        self.exchange(0, s, d1, d2)

    @rule(address=st.sampled_from(IES), action=st.sampled_from(list(smc.OpenCloseAction)))
    def open_close_ie(self, address: int, action: smc.OpenCloseAction) -> None:
        self.open_close(address, action)

    @rule(data=st.data())
    def move_while_the_disk_fails(self, data: st.DataObject) -> None:
        """The state file cannot be replaced (EIO): a move the model would allow fails with
        HARDWARE ERROR and changes nothing, in memory or on disk; any other outcome is as usual."""
        if not self.model.contents:
            return
        s = data.draw(st.sampled_from(sorted(self.model.contents)))
        d = data.draw(st.sampled_from(HOLDERS))

        def predict() -> tuple[int, int, int]:
            saved = copy.deepcopy(self.model.contents)
            outcome = self.model.move(MT, s, d)
            if outcome == OK:
                self.model.contents = saved
                return HARDWARE_ERROR
            return outcome

        def failing_replace(src: object, dst: object) -> None:
            raise OSError(errno.EIO, "injected: disk failed")

        real = os.replace
        os.replace = failing_replace  # type: ignore[assignment]
        try:
            self.send(smc.MoveMedium(MT, s, d).build(), predict)
        finally:
            os.replace = real

    @rule(t=transports, d=addresses)
    def position(self, t: int, d: int) -> None:
        def predict() -> tuple[int, int, int]:
            if self.model.transport_error(t) or d not in ALL:
                return INVALID_ADDRESS
            return OK

        self.send(smc.PositionToElement(t, d).build(), predict)

    @rule(value=st.integers(0, 3))
    def prevent_allow(self, value: int) -> None:
        def predict() -> tuple[int, int, int]:
            if value > 1:
                return INVALID_FIELD
            self.model.ie_prevent = bool(value)
            return OK

        self.send(bytes([0x1E, 0, 0, 0, value, 0]), predict)

    @rule(address=addresses, action=st.sampled_from(list(smc.OpenCloseAction)))
    def open_close(self, address: int, action: smc.OpenCloseAction) -> None:
        def predict() -> tuple[int, int, int]:
            if address not in IES:
                return INVALID_ADDRESS
            if action == smc.OpenCloseAction.OPEN:
                if self.model.ie_prevent:
                    return PREVENTED
                self.model.ie_open.add(address)
            else:
                self.model.ie_open.discard(address)
            return OK

        self.send(smc.OpenCloseImportExportElement(address, action).build(), predict)

    @rule(
        etype=st.integers(0, 4),
        start=st.sampled_from([0, *ALL, 0x0200, 0x0999]),
        count=st.sampled_from([0, 1, 2, 3, 7, 0xFFFF]),
        alloc=st.sampled_from([0, 8, 16, 60, 255, 1000, 0xFFFF]),
        voltag=st.booleans(),
        dvcid=st.booleans(),
    )
    def read_element_status(
        self, etype: int, start: int, count: int, alloc: int, voltag: bool, dvcid: bool
    ) -> None:
        cdb = smc.ReadElementStatus(etype, voltag, start, count, False, dvcid, alloc).build()
        r = run_command(self.dev, cdb, data_in_len=alloc)
        if self.model.pending_ua:
            assert r.sense_codes == self.model.pending_ua.pop(0)
            return
        if start > max(ALL):
            assert r.sense_codes == INVALID_ADDRESS
            return
        assert r.good, r
        kinds = {0: ALL, 1: [MT], 2: SLOTS, 3: IES, 4: DRIVES}
        want = sorted(a for a in kinds[etype] if a >= start)[:count]
        if alloc < 8:
            assert len(r.data) == alloc
            return
        es = ElementStatus.parse(r.data)
        assert es.number_available == len(want)
        assert es.first_address == (want[0] if want else 0)
        got = [d.address for p in es.pages for d in p.descriptors]
        assert got == want[: len(got)]  # only what fitted in the allocation length
        assert len(r.data) == min(alloc, 8 + es.byte_count)
        for page in es.pages:
            assert page.pvoltag == voltag
            for d in page.descriptors:
                slot = self.model.contents.get(d.address)
                assert d.full == (slot is not None)
                if voltag and slot:
                    assert d.primary_tag == smc.VolumeTag(slot.barcode)

    @rule()
    def initialize_element_status(self) -> None:
        self.send(bytes([0x07, 0, 0, 0, 0, 0]), lambda: OK)

    @rule(drive=st.sampled_from([0, 1]), prevented=st.booleans())
    def drive_prevent(self, drive: int, prevented: bool) -> None:
        # What the tape drive LUN does on its own PREVENT ALLOW MEDIUM REMOVAL.
        self.dev.library.set_drive_prevent(drive, prevented)
        self.model.drive_prevent[DRIVES[drive]] = prevented

    @rule(barcode=st.sampled_from(BARCODES), address=st.sampled_from(IES))
    def operator_import(self, barcode: str, address: int) -> None:
        placed = {s.barcode for s in self.model.contents.values()}
        ok = barcode not in placed and address not in self.model.contents
        ok = ok and not self.model.ie_prevent
        try:
            self.operator.import_cartridge(barcode, address)
        except LibraryError:
            assert not ok
            return
        assert ok
        self.model.contents[address] = Slot(barcode, None, imported=True)
        self.model.ua(IE_ACCESSED)

    @rule(barcode=st.sampled_from(BARCODES))
    def operator_export(self, barcode: str) -> None:
        where = [a for a, s in self.model.contents.items() if s.barcode == barcode]
        ok = bool(where) and where[0] in IES and not self.model.ie_prevent
        try:
            self.operator.export_cartridge(barcode)
        except LibraryError:
            assert not ok
            return
        assert ok
        del self.model.contents[where[0]]
        self.model.ua(IE_ACCESSED)

    @rule()
    def restart(self) -> None:
        """The daemon dies and comes back: only what is on disk survives."""
        self.dev.close()
        self.dev.library.close()
        self.dev = self._new_changer(Library.open(self.dir / "lib"))

    @invariant()
    def element_status_matches_model(self) -> None:
        if self.model.pending_ua:
            return  # reading status now would consume the attention the next rule expects
        cdb = smc.ReadElementStatus(0, True, 0, 0xFFFF, False, True, 0xFFFF).build()
        r = run_command(self.dev, cdb, data_in_len=0xFFFF)
        assert r.good, r
        es = ElementStatus.parse(r.data)
        seen = {d.address: d for p in es.pages for d in p.descriptors}
        assert sorted(seen) == ALL
        for addr, desc in seen.items():
            slot = self.model.contents.get(addr)
            assert desc.full == (slot is not None), hex(addr)
            if slot is None:
                assert desc.primary_tag is None and desc.source is None
                continue
            assert desc.primary_tag == smc.VolumeTag(slot.barcode)
            assert desc.source == slot.source, hex(addr)
            if addr in IES:
                assert bool(desc.flags & smc.IMPEXP) == slot.imported
        for addr in IES:
            assert bool(seen[addr].flags & smc.ACCESS) == (addr not in self.model.ie_open)

    @invariant()
    def disk_matches_model(self) -> None:
        on_disk = Library.open(self.dir / "lib")
        try:
            assert {a: o.barcode for a, o in on_disk.contents().items()} == {
                a: s.barcode for a, s in self.model.contents.items()
            }
            assert on_disk.ie_prevented == self.model.ie_prevent
            assert {a for a in IES if on_disk.ie_is_open(a)} == self.model.ie_open
        finally:
            on_disk.close()

    @invariant()
    def drives_see_their_cartridge(self) -> None:
        for index, addr in enumerate(DRIVES):
            slot = self.model.contents.get(addr)
            assert self.dev.library.drive_barcode(index) == (slot.barcode if slot else None)


ChangerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestChangerModel = ChangerMachine.TestCase


def test_model_rejects_a_wrong_sense() -> None:
    """The machine can fail: a changer that reports the wrong sense is caught."""
    machine = ChangerMachine()
    try:
        machine.send(bytes([0x00, 0, 0, 0, 0, 0]), lambda: OK)  # consumes POWER ON as predicted
        try:
            machine.send(smc.MoveMedium(MT, SLOTS[5], DRIVES[0]).build(), lambda: DEST_FULL)
        except AssertionError:
            return
        raise RuntimeError("a wrong prediction went unnoticed")
    finally:
        machine.teardown()
