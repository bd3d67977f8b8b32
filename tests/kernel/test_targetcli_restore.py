"""targetcli saveconfig -> reboot -> targetctl restore brings a tcmu-py disk back (issue 13).

Two boots of the VM share one host image file, attached to each as /dev/vdb (ext4 inside): the
raw image and targetcli's /etc/target live there. The guest side is
tests/kernel/scenarios/targetcli_restore.py; the first half ends with ``sync`` and its boot in
``sysrq b`` (conftest.POWER_LOSS_CHAIN: the reset of the vtl test, which runs after it).
"""

from __future__ import annotations

import pytest
from conftest import PowerLossChain

pytestmark = pytest.mark.kernel

BEFORE = "targetcli_restore.before_reboot"
AFTER = "targetcli_restore.after_reboot"


def test_targetcli_saveconfig_reboot_restore(power_loss_chain: PowerLossChain) -> None:
    details = power_loss_chain.check(BEFORE, AFTER)
    assert details["seconds"] > 0
