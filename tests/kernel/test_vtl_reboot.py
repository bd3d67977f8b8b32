"""A true reboot of the VM between writing a library and reading it back (issue: "cartridge
contents and library inventory survive ... a reboot of the VM").

Two boots share one host image file, attached to each as /dev/vdc (ext4 inside). The first boot
ends in a reset without sync (``sysrq b``) while the daemon runs and a drive holds unterminated
blocks; the second serves the same library. The guest side is tests/kernel/scenarios/
vtl_reboot.py; the boots are those of conftest.POWER_LOSS_CHAIN, shared with the other
power-loss tests.
"""

from __future__ import annotations

import pytest
from conftest import PowerLossChain

pytestmark = pytest.mark.kernel

BEFORE = "vtl_reboot.before_power_loss"
AFTER = "vtl_reboot.after_power_loss"


def test_library_survives_power_loss_and_reboot(power_loss_chain: PowerLossChain) -> None:
    details = power_loss_chain.check(BEFORE, AFTER)
    assert details["unterminated_blocks_survived"] <= details["unterminated_blocks_written"]
