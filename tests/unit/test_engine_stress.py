"""The TMR/abort stress and the device add/remove-under-load stress (issue 11: they found D2 and
D3), with fixed seeds and small counts; `benchmarks/stress_tmr.py` runs the same code longer.

Through the production Ring and DeviceRunner over FakeKernel: every command completed exactly
once, no TASK ABORTED for a command no TMR named, every acknowledged write in its own image,
nothing written into another device's image, nothing left hanging.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from stress_tmr import remove_stress, tmr_stress  # noqa: E402

TMR_SEEDS = [1, 2, 3, 4]  # odd: every command on the driving thread; even: the worker pool
REMOVE_SEEDS = [1, 2, 3]


@pytest.mark.parametrize("seed", TMR_SEEDS)
def test_tmr_stress(tmp_path, seed):
    fig = tmr_stress(seed, 2500, tmp_path, timeout=30)
    assert fig.commands == 2500
    assert (fig.escapes, fig.lost, fig.unexpected) == (0, 0, 0), fig
    # The stress reached what it is for: TMRs naming completed-but-unreaped commands whose ids
    # the kernel then reused, and aborts answered by the runner and by the kernel.
    assert fig.named_after_completion > 0 and fig.ids_reused_after_tmr > 0, fig
    assert fig.aborted > fig.aborted_in_queue > 0, fig
    assert fig.named_before_dequeue > 0, fig
    if fig.mode == "pool":
        assert fig.named_in_flight > 0, fig


@pytest.mark.parametrize("seed", REMOVE_SEEDS)
def test_remove_under_load_stress(tmp_path, seed):
    fig = remove_stress(seed, 60, tmp_path, timeout=30)
    assert (fig.misplaced, fig.lost, fig.hung) == (0, 0, 0), fig
    assert fig.removed_under_load > 0 and fig.deferred_closes > 0, fig
    assert fig.writes_good > 0, fig
