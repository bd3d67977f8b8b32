"""Property tests: the drive against a list-of-objects model, and every command in every state.

The model is deliberately naive (a Python list of blocks/filemarks and an index, stepping one
object at a time), so it shares no code or shortcuts with the drive's bisect-based positioning.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from vtl_fakes import FakeLibrary, Tape

from tcmu_py.handlers.vtl import cartridge as cartridge_module
from tcmu_py.handlers.vtl.cartridge import Cartridge
from tcmu_py.scsi import ssc
from tcmu_py.scsi.constants import Opcode
from tcmu_py.scsi.sense import parse_sense

Obj = bytes | None  # None = filemark


def expect(r, key: int, asc: int, ascq: int, info: int | None = None, **flags: bool) -> None:  # type: ignore[no-untyped-def]
    assert r.sense_codes == (key, asc, ascq), r
    s = parse_sense(r.sense)
    if info is not None:
        assert s.info_signed == info, (s.info_signed, info)
    for name, value in flags.items():
        assert getattr(s, name) == value, name


class DriveMachine(RuleBasedStateMachine):
    """Random WRITE/WEOF/SPACE/LOCATE/REWIND/READ/ERASE/LOAD/UNLOAD/MOVE sequences."""

    @initialize()
    def setup(self) -> None:
        # A tiny sparse-index stride makes every positioning walk record headers.
        self.saved_stride = cartridge_module.INDEX_STRIDE
        cartridge_module.INDEX_STRIDE = 3
        self.tmp = tempfile.TemporaryDirectory()
        self.lib = FakeLibrary(Path(self.tmp.name))
        self.lib.create("MDL001L8")
        self.tape = Tape(self.lib)
        self.lib.move("MDL001L8")
        self.tape.clear_ua()
        self.objs: list[Obj] = []
        self.pos = 0
        self.state = "loaded"  # loaded | unloaded | empty

    def teardown(self) -> None:
        if hasattr(self, "tape"):
            self.tape.dev.close()
            self.tmp.cleanup()
            cartridge_module.INDEX_STRIDE = self.saved_stride

    # --- model helpers ---------------------------------------------------------------------

    def loaded(self) -> bool:
        return self.state == "loaded"

    def not_ready(self) -> tuple[int, int, int]:
        return (2, 0x3A, 0) if self.state == "empty" else (2, 0x04, 0x02)

    # --- medium movement -------------------------------------------------------------------

    @rule()
    def unload(self) -> None:
        r = self.tape.run(ssc.LoadUnload(False, False, False, False, False).build())
        if self.state == "empty":
            assert r.sense_codes == (2, 0x3A, 0)
            return
        assert r.good, r
        self.state, self.pos = "unloaded", 0

    @rule()
    def load(self) -> None:
        r = self.tape.run(ssc.LoadUnload(False, False, False, False, True).build())
        if self.state == "empty":
            assert r.sense_codes == (2, 0x3A, 0)
            return
        assert r.good, r
        self.state, self.pos = "loaded", 0

    @rule(present=st.booleans())
    def move(self, present: bool) -> None:
        self.lib.move(None)
        self.state = "empty"
        if present:
            self.lib.move("MDL001L8")
            assert self.tape.run(bytes(6)).sense_codes == (6, 0x28, 0)
            self.state, self.pos = "loaded", 0

    # --- data and positioning ----------------------------------------------------------------

    @rule(data=st.binary(min_size=0, max_size=300))
    def write(self, data: bytes) -> None:
        r = self.tape.write(data)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        assert r.good, r
        if data:
            self.objs[self.pos :] = [data]
            self.pos += 1

    @rule(n=st.integers(0, 3))
    def weof(self, n: int) -> None:
        r = self.tape.weof(n)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        assert r.good, r
        if n:
            self.objs[self.pos :] = [None] * n
            self.pos += n

    @rule(n=st.integers(1, 400), sili=st.booleans())
    def read(self, n: int, sili: bool) -> None:
        r = self.tape.read(n, sili=sili)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        if self.pos == len(self.objs):
            expect(r, 8, 0, 5, info=n)
            return
        obj = self.objs[self.pos]
        self.pos += 1
        if obj is None:
            expect(r, 0, 0, 1, info=n, filemark=True)
            assert r.data == b""
            return
        assert r.data == obj[:n]
        if len(obj) == n or (sili and len(obj) < n) or (sili and len(obj) > n):
            assert r.good, r
        else:
            expect(r, 0, 0, 0, info=n - len(obj), ili=True)

    @rule(count=st.integers(-6, 6), sixteen=st.booleans())
    def space_blocks(self, count: int, sixteen: bool) -> None:
        r = self.tape.space(0, count, sixteen)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        for i in range(abs(count)):
            if count > 0:
                if self.pos == len(self.objs):
                    return expect(r, 8, 0, 5, info=count - i)
                self.pos += 1
                if self.objs[self.pos - 1] is None:
                    return expect(r, 0, 0, 1, info=count - i, filemark=True)
            else:
                if self.pos == 0:
                    return expect(r, 0, 0, 4, info=-count - i, eom=True)
                self.pos -= 1
                if self.objs[self.pos] is None:
                    return expect(r, 0, 0, 1, info=-count - i, filemark=True)
        assert r.good, r

    @rule(count=st.integers(-4, 4), sixteen=st.booleans())
    def space_filemarks(self, count: int, sixteen: bool) -> None:
        r = self.tape.space(1, count, sixteen)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        for i in range(abs(count)):
            if count > 0:
                while self.pos < len(self.objs) and self.objs[self.pos] is not None:
                    self.pos += 1
                if self.pos == len(self.objs):
                    return expect(r, 8, 0, 5, info=count - i)
                self.pos += 1
            else:
                while self.pos > 0 and self.objs[self.pos - 1] is not None:
                    self.pos -= 1
                if self.pos == 0:
                    return expect(r, 0, 0, 4, info=-count - i, eom=True)
                self.pos -= 1
        assert r.good, r

    @rule()
    def space_eod(self) -> None:
        r = self.tape.space(3, 0)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        assert r.good
        self.pos = len(self.objs)

    @rule(dest=st.integers(0, 40), sixteen=st.booleans())
    def locate(self, dest: int, sixteen: bool) -> None:
        r = self.tape.locate(dest, sixteen)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        if dest > len(self.objs):
            expect(r, 8, 0, 5)
            self.pos = len(self.objs)
        else:
            assert r.good, r
            self.pos = dest

    @rule(file_id=st.integers(0, 6))
    def locate_file(self, file_id: int) -> None:
        r = self.tape.locate(file_id, sixteen=True, dest=1)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        marks = [i for i, o in enumerate(self.objs) if o is None]
        if file_id == 0:
            self.pos = 0
        elif file_id <= len(marks):
            self.pos = marks[file_id - 1] + 1
        else:
            expect(r, 8, 0, 5)
            self.pos = len(self.objs)
            return
        assert r.good, r

    @rule()
    def rewind(self) -> None:
        r = self.tape.rewind()
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        assert r.good
        self.pos = 0

    @rule()
    def erase(self) -> None:
        r = self.tape.run(ssc.Erase6(False, False).build())
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        assert r.good, r
        del self.objs[self.pos :]

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def position_matches(self) -> None:
        if not hasattr(self, "tape"):
            return
        r = self.tape.run(ssc.ReadPosition(ssc.ReadPositionForm.LONG, 0).build(), data_in_len=32)
        if not self.loaded():
            assert r.sense_codes == self.not_ready()
            return
        p = ssc.parse_read_position(r.data, ssc.ReadPositionForm.LONG)
        assert p.object_id == self.pos
        assert p.file_id == sum(1 for o in self.objs[: self.pos] if o is None)
        assert p.bop == (self.pos == 0)

    @precondition(lambda self: hasattr(self, "tape") and self.loaded())
    @rule()
    def contents_match(self) -> None:
        """Read the whole tape back and return to where we were."""
        t = self.tape
        assert t.rewind().good
        for obj in self.objs:
            r = t.read(400)
            if obj is None:
                assert parse_sense(r.sense).filemark
            else:
                assert r.data == obj
        assert t.read(1).sense_codes == (8, 0, 5)
        assert t.locate(self.pos).good


DriveMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDriveModel = DriveMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Fuzz: any CDB of a supported opcode, in any state, completes with a defined status and leaves a
# valid state behind; nothing is ever reported as an internal (HARDWARE ERROR 44h) failure.

TAPE_OPCODES = [
    Opcode.TEST_UNIT_READY, Opcode.REWIND, Opcode.REQUEST_SENSE, Opcode.READ_BLOCK_LIMITS,
    Opcode.READ_6, Opcode.WRITE_6, Opcode.WRITE_FILEMARKS_6, Opcode.SPACE_6, Opcode.INQUIRY,
    Opcode.MODE_SELECT_6, Opcode.ERASE_6, Opcode.MODE_SENSE_6, Opcode.LOAD_UNLOAD,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, Opcode.LOCATE_10, Opcode.READ_POSITION,
    Opcode.REPORT_DENSITY_SUPPORT, Opcode.LOG_SENSE, Opcode.MODE_SELECT_10, Opcode.MODE_SENSE_10,
    Opcode.READ_ATTRIBUTE, Opcode.WRITE_ATTRIBUTE, Opcode.SPACE_16, Opcode.LOCATE_16,
    Opcode.MAINTENANCE_IN, Opcode.ALLOW_OVERWRITE, 0xC0, 0x7E,
]

CDB_LEN = {0x00: 6, 0x01: 6, 0x03: 6, 0x05: 6, 0x08: 6, 0x0A: 6, 0x10: 6, 0x11: 6, 0x12: 6,
           0x15: 6, 0x19: 6, 0x1A: 6, 0x1B: 6, 0x1E: 6}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    state=st.sampled_from(["empty", "loaded", "unloaded", "data"]),
    steps=st.lists(
        st.tuples(st.sampled_from(TAPE_OPCODES), st.binary(min_size=15, max_size=15),
                  st.integers(0, 2048)),
        min_size=1, max_size=8,
    ),
)
def test_any_command_in_any_state(tmp_path_factory, state: str, steps) -> None:  # type: ignore[no-untyped-def]
    lib = FakeLibrary(tmp_path_factory.mktemp("fuzz"))
    lib.create("FZZ001L8", capacity=1 << 20, early_warning=1 << 18)
    t = Tape(lib)
    if state != "empty":
        lib.move("FZZ001L8")
        t.clear_ua()
    if state == "data":
        for c in "bbfbbbff":
            assert (t.write(b"d" * 100) if c == "b" else t.weof(1)).good
    if state == "unloaded":
        t.run(ssc.LoadUnload(False, False, False, False, False).build())
    for opcode, tail, buflen in steps:
        n = CDB_LEN.get(opcode, 10 if opcode < 0x80 else 16)
        if opcode in (0x82, 0x88, 0x8C, 0x8D, 0x91, 0x92, 0xA3):
            n = 16 if opcode != 0xA3 else 12
        cdb = bytes([opcode]) + tail[: n - 1]
        r = t.run(cdb, data_out=bytes(buflen), data_in_len=buflen)
        assert r.status in (0x00, 0x02), r
        if r.status == 0x02:
            s = parse_sense(r.sense)
            assert not (s.sense_key == 4 and s.asc == 0x44), (cdb.hex(), r)
            assert s.sense_key in (0, 2, 5, 6, 7, 8, 0xD), (cdb.hex(), r)
        dev = t.dev
        if dev.cartridge is not None:
            assert 0 <= dev.pos <= dev.cartridge.object_count
    t.dev.close()
    # whatever happened, the cartridge reopens cleanly and agrees with itself
    with Cartridge.open(lib.media_path("FZZ001L8"), read_only=True) as cart:
        assert cart.used <= cart.capacity
