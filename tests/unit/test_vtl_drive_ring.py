"""The drive behind the production Ring + DeviceRunner, with the FakeKernel as initiator."""

from __future__ import annotations

from pathlib import Path

from vtl_fakes import FakeLibrary

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.vtl.drive import TapeDrive
from tcmu_py.scsi import ssc
from tcmu_py.scsi.sense import parse_sense
from tcmu_py.testing.harness import RingHarness


def test_tape_session_through_the_ring(tmp_path: Path) -> None:
    lib = FakeLibrary(tmp_path)
    lib.create("RNG001L8")
    dev = TapeDrive(DeviceConfig(name="t", subtype="vtl", cfgstring="", size=0), lib, 0)
    lib.move("RNG001L8")
    h = RingHarness(dev)
    try:
        while h.run(bytes(6)).status != 0:
            pass
        # several writes in flight at once: the serial runner must keep their order
        blocks = [bytes([i]) * (1000 + 37 * i) for i in range(8)]
        pending = [h.submit(ssc.ReadWrite6(False, False, len(b)).build(0x0A), b) for b in blocks]
        pending.append(h.submit(ssc.WriteFilemarks6(False, False, 1).build()))
        h.wait(pending)
        assert all(p.status == 0 for p in pending)
        assert h.run(bytes([0x01, 0, 0, 0, 0, 0])).status == 0
        for b in blocks[:7]:
            r = h.run(ssc.ReadWrite6(False, False, len(b)).build(0x08), data_in_len=len(b))
            assert r.status == 0 and r.data == b
        # short block: CHECK CONDITION *and* the data (TCMU READ_LEN), ILI with the residue
        r = h.run(ssc.ReadWrite6(False, False, 65536).build(0x08), data_in_len=65536)
        s = parse_sense(r.sense)
        assert r.status == 2 and s.ili and s.info == 65536 - len(blocks[7])
        assert r.data == blocks[7]
        r = h.run(ssc.ReadWrite6(False, False, 512).build(0x08), data_in_len=512)
        assert r.status == 2 and parse_sense(r.sense).filemark and r.data == b""
        r = h.run(ssc.ReadWrite6(False, False, 512).build(0x08), data_in_len=512)
        assert r.sense_codes == (8, 0, 5)
    finally:
        h.close()
        dev.close()
