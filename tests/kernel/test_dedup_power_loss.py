"""A dedup disk across a power cut (issue 14): two boots share one host image file, attached to
each as /dev/vda (ext4 holding the dedup pool). The first ends in a reset without sync
(``sysrq b``) while fio writes to ext4 on the dedup disk with periodic fsync; the second checks
the pool, serves it again and reads the fsynced files back. The guest side is
tests/kernel/scenarios/dedup_reboot.py; this test boots the VM twice and reports each half.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import boot_across_power_loss

pytestmark = pytest.mark.kernel

BEFORE = "dedup_reboot.before_power_loss"
AFTER = "dedup_reboot.after_power_loss"
DISK_BYTES = 512 << 20  # sparse; the pool takes a few tens of MiB


def test_dedup_pool_survives_power_loss(lab_results: Path, tmp_path: Path) -> None:
    results = lab_results / "dedup-power-loss"
    disk = tmp_path / "dedup-disk.img"
    details = boot_across_power_loss(BEFORE, AFTER, results, disk, DISK_BYTES)
    assert details["fsynced_files_intact"] == 8
    assert not details["check_after_cut"]["problems"]
