"""A mirror across a power cut (issue 16): two boots share one host image file, attached to each
as /dev/vdd (ext4 holding the three leg images). The first ends in a reset without sync
(``sysrq b``) while fio writes to ext4 on the mirror with periodic fsync; the second checks the
legs offline, serves the mirror again and reads the fsynced files back. The guest side is
tests/kernel/scenarios/mirror_reboot.py; the boots are those of conftest.POWER_LOSS_CHAIN, shared
with the other power-loss tests.
"""

from __future__ import annotations

import pytest
from conftest import PowerLossChain

pytestmark = pytest.mark.kernel

BEFORE = "mirror_reboot.before_power_loss"
AFTER = "mirror_reboot.after_power_loss"


def test_mirror_survives_power_loss(power_loss_chain: PowerLossChain) -> None:
    details = power_loss_chain.check(BEFORE, AFTER)
    assert details["fsynced_files_intact"] == 6
    assert not details["after_cut"]["unnamed_differing"]
    assert details["status_after_open"]["state"] == "optimal"
