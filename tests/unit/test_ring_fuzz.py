"""Ring corruption: what the kernel's side of the mapping may hold, against the production Ring.

`tcmu_py.testing.fuzz.fuzz_ring` builds rings with a FakeKernel (moved along by a real Ring, so
entries wrap and PAD/TMR entries appear), corrupts the mailbox, cmd_head, entry headers, iovecs,
CDB offsets and TMR entries, and attaches a Ring to a copy placed between inaccessible pages: an
out-of-bounds access by the C code kills the test process. The Ring must refuse a corrupt ring with
RingError or return commands that lie inside the mapping; uncorrupted controls are checked end to
end against the FakeKernel.

R1 (found here, fixed): `Ring.dequeue` was not atomic when it raised. Commands it parsed earlier in
the same call — a full batch of 256 before a bad entry, or the entries before a duplicate cmd_id —
were added to the in-flight set but never returned (and the C cursor had moved past the entries
after them too), so nobody ever completed them. Only a corrupt ring gets there. A failing call is
now undone (in-flight set and cursor).
"""

from __future__ import annotations

import struct

import pytest

from tcmu_py.errors import RingError
from tcmu_py.ring import MAILBOX_SIZE, REQ_CDB_OFF, Ring, command_entry_size
from tcmu_py.testing import FakeKernel
from tcmu_py.testing.fuzz import RingFuzzReport, fuzz_ring

SEED, CASES = 21, 1500  # about 2 s on a quiet machine

@pytest.fixture(scope="module")
def report() -> RingFuzzReport:
    return fuzz_ring(seed=SEED, cases=CASES)


def test_corrupt_rings_are_refused_or_parsed_inside_the_mapping(report: RingFuzzReport) -> None:
    assert report.guarded  # the mapping really sits between PROT_NONE pages
    assert report.cases == CASES and report.clean >= CASES // 10
    assert report.rejected >= CASES // 4 and report.held >= CASES // 10  # both paths exercised
    others = [e for e in report.escapes if e.kind != "lost-in-flight"]
    assert not others, report.describe()


def test_no_command_is_left_in_flight_unreturned(report: RingFuzzReport) -> None:
    lost = [e for e in report.escapes if e.kind == "lost-in-flight"]
    assert not lost, report.describe()


def _three_commands() -> FakeKernel:
    k = FakeKernel()
    for _ in range(3):
        k.submit(bytes(6))
    return k


def test_a_bad_entry_after_a_full_batch_loses_nothing() -> None:
    k = _three_commands()
    third = MAILBOX_SIZE + 2 * command_entry_size(0, 6)
    struct.pack_into("<Q", k.buffer, third + REQ_CDB_OFF, 0)  # CDB outside its entry
    ring = Ring(k.buffer, adopt=True, batch=2)
    returned = []
    with pytest.raises(RingError):
        returned += ring.dequeue()[0]
    assert ring.in_flight_ids == {c.cmd_id for c in returned}


def test_a_duplicate_cmd_id_loses_nothing() -> None:
    k = _three_commands()
    second = MAILBOX_SIZE + command_entry_size(0, 6)
    struct.pack_into("<H", k.buffer, second + 4, 1)  # the second entry repeats cmd_id 1
    ring = Ring(k.buffer, adopt=True)
    returned = []
    with pytest.raises(RingError):
        returned += ring.dequeue()[0]
    # Either the commands before the bad entry come back, or none is held in flight; and the
    # third (valid) entry must not have been consumed without being returned.
    assert ring.in_flight_ids == {c.cmd_id for c in returned}
    assert ring.cursor != ring.head or 3 in {c.cmd_id for c in returned}
