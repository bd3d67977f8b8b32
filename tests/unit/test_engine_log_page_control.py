"""LOG SENSE's PAGE CONTROL (SPC-5 6.8, 6.7.1 table 184): PC 01b reports the current cumulative
values; 11b the default cumulative values, 10b and 00b the (default) threshold values, which
for a data counter parameter are zero (tcmu-py has no LOG SELECT, no thresholds, no saved
values: the vendor specific defaults, PCR's reset value). PC is ignored for list parameters
(TapeAlert flags, capacities, provisioning counts). Before, every PC reported the current
counts as if they were the defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_vtl_drive import _log_params
from vtl_fakes import FakeLibrary, Tape

from tcmu_py.handler import DeviceConfig
from tcmu_py.handlers.thin import ThinHandler, create_pool
from tcmu_py.scsi import spc
from tcmu_py.scsi.constants import LogParameterFormat
from tcmu_py.testing import cdbs, run_command

UNIT = 16 * 1024


def _log_sense(tape: Tape, page: int, pc: int) -> dict[int, int]:
    r = tape.run(bytes([0x4D, 0, pc << 6 | page, 0, 0, 0, 0, 0x10, 0, 0]), data_in_len=4096)
    assert r.good, r
    assert r.data[0] & 0x3F == page
    return _log_params(r)


@pytest.fixture
def counted(tape: Tape) -> Tape:
    """The loaded tape (conftest's `tape`) once a block and a filemark were written and the
    block read back, so that the error counter pages have counts."""
    assert tape.write(b"x" * 1000).good and tape.weof(1).good
    tape.rewind()
    assert tape.read(1000).good
    return tape


@pytest.mark.parametrize("page", [0x02, 0x03, 0x0C])
def test_counters_default_and_threshold_values_are_zero(counted: Tape, page: int) -> None:
    current = _log_sense(counted, page, 1)
    assert any(current.values()), current  # the drive did count something
    for pc in (0, 2, 3):
        assert _log_sense(counted, page, pc) == dict.fromkeys(current, 0), pc
    assert _log_sense(counted, page, 1) == current  # reading the defaults reset nothing


def test_list_parameters_ignore_page_control(counted: Tape) -> None:
    capacity = _log_sense(counted, 0x31, 1)
    assert capacity[3] > 0  # binary format list: the medium's capacity whatever PC says
    for pc in (0, 2, 3):
        assert _log_sense(counted, 0x31, pc) == capacity


def test_tape_alert_flags_read_with_the_defaults_stay_set(tmp_path: Path) -> None:
    """TapeAlert flags (binary format list) show whatever PC says; only a read of the current
    values (PC 01b) clears them (SSC-5 8.2.4)."""
    lib = FakeLibrary(tmp_path)
    lib.create("WPT001L8", write_protected=True)
    t = Tape(lib)
    lib.move("WPT001L8")
    t.clear_ua()
    assert t.write(b"x").sense_codes == (7, 0x27, 0)  # raises WRITE PROTECT (flag 09h)
    assert _log_sense(t, 0x2E, 3)[0x09] == 1
    assert _log_sense(t, 0x2E, 1)[0x09] == 1
    assert _log_sense(t, 0x2E, 1)[0x09] == 0  # cleared by the read of the current values


def test_thin_provisioning_counts_are_list_parameters(tmp_path: Path) -> None:
    pool = os.path.join(tmp_path, "pool")
    create_pool(pool, "fast", 64 * UNIT, 50, unit=UNIT)
    dev = ThinHandler.open(DeviceConfig("t0", "thin", f"pool={pool}", 32 * UNIT))
    try:
        run_command(dev, cdbs.test_unit_ready())
        assert run_command(dev, cdbs.write10(0, 64), b"\x01" * 64 * 512).good
        pages = {pc: run_command(dev, cdbs.log_sense(0x0C, pc=pc), data_in_len=1024)
                 for pc in range(4)}
        assert all(r.good for r in pages.values())
        assert len({r.data for r in pages.values()}) == 1  # available / used: not counters
    finally:
        dev.close()


def test_log_page_values_zeroes_only_data_counters() -> None:
    fmt = LogParameterFormat
    page = spc.build_log_page(0x30, 0, [
        (0x0000, fmt.BOUNDED_COUNTER, b"\x00\x00\x01\x02"),
        (0x0001, fmt.UNBOUNDED_COUNTER | 0x20, b"\x07" * 8),
        (0x0002, fmt.ASCII_LIST, b"ABCD"),
        (0x0003, fmt.BINARY_LIST, b"\x05\x06"),
    ])
    assert spc.log_page_values(page, 1) == page
    want = spc.build_log_page(0x30, 0, [
        (0x0000, fmt.BOUNDED_COUNTER, bytes(4)),
        (0x0001, fmt.UNBOUNDED_COUNTER | 0x20, bytes(8)),
        (0x0002, fmt.ASCII_LIST, b"ABCD"),
        (0x0003, fmt.BINARY_LIST, b"\x05\x06"),
    ])
    for pc in (0, 2, 3):
        assert spc.log_page_values(page, pc) == want
    # A parameter running past the page length is cut there, nothing is read beyond it.
    torn = page[:4 + 4 + 2]
    assert spc.log_page_values(torn, 3) == torn[:8] + bytes(2)
