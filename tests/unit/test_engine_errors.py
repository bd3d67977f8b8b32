"""`ScsiDevice.respond_error` always answers (issue 11 D7): the one place an exception becomes
CHECK CONDITION cannot itself fail, whatever the error object or its field pointer."""

from __future__ import annotations

from concurrent.futures import Future

from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.device.block import BlockDevice
from tcmu_py.device.command import Command
from tcmu_py.device.core import command
from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.null import NullBackend
from tcmu_py.scsi.constants import Status
from tcmu_py.scsi.sense import InvalidFieldInParameterList, ScsiError
from tcmu_py.testing import RingHarness, cdbs, run_command

BS = 512
BLOCKS = 64
WRITE_ATTRIBUTE = 0x8D


class Raiser(BlockDevice):
    """WRITE ATTRIBUTE (as a tape drive parses a long attribute list) raises `self.error`."""

    def __init__(self) -> None:
        super().__init__(DeviceConfig("e", "null", "", BLOCKS * BS), NullBackend(BLOCKS * BS, BS))
        self.error: BaseException = ScsiError()

    @command(WRITE_ATTRIBUTE)
    def write_attribute(self, cmd: Command) -> None:
        raise self.error


def write_attribute_cdb(length: int) -> bytes:
    return bytes([WRITE_ATTRIBUTE, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + length.to_bytes(4, "big") + b"\0\0"


@given(st.integers(-(2**40), 2**40), st.booleans())
def test_any_field_pointer_gives_a_valid_check_condition(field_pointer, d_sense):
    dev = Raiser()
    dev.d_sense = d_sense
    dev.error = InvalidFieldInParameterList("attribute", field_pointer=field_pointer)
    r = run_command(dev, cdbs.test_unit_ready())  # the power-on unit attention first
    r = run_command(dev, write_attribute_cdb(70000), data_out=bytes(70000))
    assert r.status == Status.CHECK_CONDITION
    assert r.sense_codes == (5, 0x26, 0)


def test_write_attribute_over_64k_through_the_ring():
    dev = Raiser()
    dev.error = InvalidFieldInParameterList("attribute", field_pointer=0x10004)
    h = RingHarness(dev, data_size=256 * 1024)
    try:
        h.run(cdbs.test_unit_ready())
        r = h.run(write_attribute_cdb(0x10010), data_out=bytes(0x10010))
        assert r.status == Status.CHECK_CONDITION and r.sense_codes == (5, 0x26, 0)
        assert h.runner.counters.failures == 0  # answered by the device, not the runner's guard
    finally:
        h.close()


class BrokenSense(ScsiError):
    def sense(self, descriptor: bool = False) -> bytes:
        raise RuntimeError("sense builder bug")


def test_an_error_whose_sense_cannot_be_built_answers_hardware_error(caplog):
    dev = Raiser()
    run_command(dev, cdbs.test_unit_ready())
    dev.error = BrokenSense()
    r = run_command(dev, write_attribute_cdb(8), data_out=bytes(8))
    assert r.status == Status.CHECK_CONDITION and r.sense_codes == (4, 0x44, 0)
    assert "sense builder bug" in caplog.text


def test_a_cancelled_future_still_answers():
    dev = Raiser()
    run_command(dev, cdbs.test_unit_ready())
    inner: Future[None] = Future()
    dev.write_attribute = lambda cmd: inner  # type: ignore[method-assign,assignment]
    dev._direct = None
    outer = dev.execute(Command(write_attribute_cdb(0)))
    assert isinstance(outer, Future)
    inner.cancel()
    resp = outer.result(timeout=5)
    assert resp.status == Status.CHECK_CONDITION
