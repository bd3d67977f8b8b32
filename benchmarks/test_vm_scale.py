"""Host-side checks of benchmarks/vm_scale.py (no VM): medians, one-vs-many ratios, rendering.

.venv/bin/pytest -q benchmarks/test_vm_scale.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vm_scale  # noqa: E402


def run(target: str, devices: int, iops: float, rep: int = 0, **extra: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "rep": rep,
        "target": target,
        "workload": "randread-4k-qd32",
        "devices": devices,
        "iops": iops,
        "lat_mean_us": 32e6 * devices / iops,
        "runtime_s": 6.0,
        "server_cpu_s": 6.0,
        "guest_busy": 0.9,
    }
    rec.update(extra)
    return rec


def test_ratio_is_median_of_four_over_median_of_one_and_failures_are_left_out() -> None:
    runs = [
        run("py-native", 1, 1000, 0),
        run("py-native", 1, 1200, 1),
        run("py-native", 1, 1100, 2),
        run("py-native", 4, 1800, 0, device_commands={"py0": 100, "py1": 50}),
        run("py-native", 4, 2200, 1, device_commands={"py0": 100, "py1": 100}),
        run("py-native", 4, 9999, 2, failed="fio exit 1"),
        run("runner", 1, 500, 0),
    ]
    table = vm_scale.aggregate(runs, 4)
    e = table["randread-4k-qd32"]["py-native"]
    assert e["one"]["iops"] == 1100
    assert e["many"]["iops"] == 2000  # median of the two that succeeded
    assert e["ratio"] == pytest.approx(2000 / 1100)
    assert e["many"]["min_max_device_share"] == pytest.approx(0.75)
    assert e["one"]["server_cores"] == pytest.approx(1.0)
    assert table["randread-4k-qd32"]["runner"]["ratio"] is None  # no four-device run
    md = vm_scale.render_table(table, 4)
    assert "| randread-4k-qd32 | tcmu-py (native loop) | 1,100 | 2,000 | 1.82× | met |" in md
    assert "tcmu-runner qcow | 500 | – | – | – |" in md


def test_analyze_writes_summary_and_table(tmp_path: Path) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    runs = [run("py-stage1", 1, 1000), run("py-stage1", 4, 1200)]
    (guest / "runs.json").write_text(json.dumps(runs))
    (guest / "env.json").write_text(json.dumps({"devices": 4, "cpus": 2}))
    assert vm_scale.analyze(tmp_path, "cmd") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["table"]["randread-4k-qd32"]["py-stage1"]["ratio"] == pytest.approx(1.2)
    table = (tmp_path / "table.md").read_text()
    assert "**2 vCPUs**" in table and "1.20× | not met" in table
