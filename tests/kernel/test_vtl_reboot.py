"""A true reboot of the VM between writing a library and reading it back (issue: "cartridge
contents and library inventory survive ... a reboot of the VM").

Two boots share one host image file, attached to each as /dev/vda (ext4 inside). The first boot
ends in a reset without sync (``sysrq b``) while the daemon runs and a drive holds unterminated
blocks; the second serves the same library. The guest side is tests/kernel/scenarios/
vtl_reboot.py; this test boots the VM twice and reports each half.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import boot_across_power_loss

pytestmark = pytest.mark.kernel

BEFORE = "vtl_reboot.before_power_loss"
AFTER = "vtl_reboot.after_power_loss"
DISK_BYTES = 1 << 30  # sparse; the scenarios write a few tens of MiB


def test_library_survives_power_loss_and_reboot(lab_results: Path, tmp_path: Path) -> None:
    results = lab_results / "power-loss"
    disk = tmp_path / "library-disk.img"
    details = boot_across_power_loss(BEFORE, AFTER, results, disk, DISK_BYTES)
    assert details["unterminated_blocks_survived"] <= details["unterminated_blocks_written"]
