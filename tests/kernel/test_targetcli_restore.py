"""targetcli saveconfig -> reboot -> targetctl restore brings a tcmu-py disk back (issue 13).

Two boots of the VM share one host image file, attached to each as /dev/vda (ext4 inside): the
raw image and targetcli's /etc/target live there. The guest side is
tests/kernel/scenarios/targetcli_restore.py; the first boot ends in ``sync`` + ``sysrq b``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import boot_scenarios

pytestmark = pytest.mark.kernel

BEFORE = "targetcli_restore.before_reboot"
AFTER = "targetcli_restore.after_reboot"
DISK_BYTES = 512 << 20  # sparse; the image is 64 MiB


def test_targetcli_saveconfig_reboot_restore(lab_results: Path, tmp_path: Path) -> None:
    results = lab_results / "targetcli-restore"
    disk = tmp_path / "restore-disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)

    first = boot_scenarios([BEFORE], results, disks=(disk,))
    expected = results / BEFORE / "expected.json"
    if not expected.exists():
        first.error = None  # ending without _done.json is this boot's plan; show why it failed
        first.check(BEFORE)
        pytest.fail(f"{BEFORE} left no {expected.name}\n{first.console_tail()}", pytrace=False)
    assert not (results / "_done.json").exists(), (
        "the first boot finished its scenarios: the reset did not happen")
    os.replace(results / "console.log", results / "console-before.log")

    second = boot_scenarios([AFTER], results, disks=(disk,))
    details = second.check(AFTER)
    assert details["seconds"] > 0
