"""One pytest test per guest scenario (tests/kernel/scenarios/*.py), all run in ONE VM boot.

See conftest.py for the mechanism and README.md ("Kernel tests") for adding a scenario.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from guestlib import discover_scenarios

from tcmu_py.lab import GUEST_MODULES

if TYPE_CHECKING:
    from conftest import LabRun

pytestmark = pytest.mark.kernel

SCENARIOS = discover_scenarios()


def test_guest_boots_with_lio(kernel_lab: LabRun) -> None:
    """The guest came up with configfs, every module of the prelude, and udev."""
    kernel_lab.result("_guest")  # fails with the console tail if the VM did not run
    facts = kernel_lab.facts
    assert facts["configfs_target"], "/sys/kernel/config/target missing in the guest"
    missing = [m for m in GUEST_MODULES if m not in facts["modules"]]
    assert not missing, f"modules not loaded in the guest: {missing}"
    assert facts["udevd_running"], "systemd-udevd is not running in the guest"


@pytest.mark.parametrize("scenario_name",
                         [n for n, s in SCENARIOS.items() if not s.own_boot])
def test_scenario(kernel_lab: LabRun, scenario_name: str) -> None:
    kernel_lab.check(scenario_name)
