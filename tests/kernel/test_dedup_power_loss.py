"""A dedup disk across a power cut (issue 14): two boots share one host image file, attached to
each as /dev/vda (ext4 holding the dedup pool). The first ends in a reset without sync
(``sysrq b``) while fio writes to ext4 on the dedup disk with periodic fsync; the second checks
the pool, serves it again and reads the fsynced files back. The guest side is
tests/kernel/scenarios/dedup_reboot.py; the boots are those of conftest.POWER_LOSS_CHAIN, shared
with the other power-loss tests.
"""

from __future__ import annotations

import pytest
from conftest import PowerLossChain

pytestmark = pytest.mark.kernel

BEFORE = "dedup_reboot.before_power_loss"
AFTER = "dedup_reboot.after_power_loss"


def test_dedup_pool_survives_power_loss(power_loss_chain: PowerLossChain) -> None:
    details = power_loss_chain.check(BEFORE, AFTER)
    assert details["fsynced_files_intact"] == 8
    assert not details["check_after_cut"]["problems"]
    # The pool with a write journal (replayed at the daemon's open).
    assert details["fsynced_files_intact_journal"] == 8
    assert not details["check_after_cut_journal"]["problems"]
