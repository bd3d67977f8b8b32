"""targetcli saveconfig -> reboot -> targetctl restore brings a tcmu-py disk back (issue 13).

Two boots of the VM share one host image file, attached to each as /dev/vda (ext4 inside): the
raw image and targetcli's /etc/target live there. The guest side is
tests/kernel/scenarios/targetcli_restore.py; the first boot ends in ``sync`` + ``sysrq b``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import boot_across_power_loss

pytestmark = pytest.mark.kernel

BEFORE = "targetcli_restore.before_reboot"
AFTER = "targetcli_restore.after_reboot"
DISK_BYTES = 512 << 20  # sparse; the image is 64 MiB


def test_targetcli_saveconfig_reboot_restore(lab_results: Path, tmp_path: Path) -> None:
    results = lab_results / "targetcli-restore"
    disk = tmp_path / "restore-disk.img"
    details = boot_across_power_loss(BEFORE, AFTER, results, disk, DISK_BYTES)
    assert details["seconds"] > 0
