"""Host-side checks of benchmarks/vm_bench.py (no VM): medians, ratios, profile summaries.

.venv/bin/pytest -q benchmarks/test_vm_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vm_bench  # noqa: E402


def run(target: str, iops: float, rep: int = 0, **extra: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "rep": rep,
        "target": target,
        "workload": "randread-4k-qd1",
        "iops": iops,
        "bw_bytes": iops * 4096,
        "lat_mean_us": 1e6 / iops,
        "lat_p99_us": 3e6 / iops,
        "runtime_s": 9.0,
    }
    rec.update(extra)
    return rec


def test_median_over_reps_and_ratios_to_both_references() -> None:
    runs = [
        run("runner", 1000, 0),
        run("runner", 1400, 1),
        run("runner", 1200, 2),
        run("fileio", 10000, 0),
        run("fileio", 9000, 1),
        run("fileio", 11000, 2),
        run("pyraw", 2400, 0, daemon_cpu_s=0.9),
        run("pyraw", 100, 1, failed="fio exit 1"),  # a failed run is left out, not averaged in
        run("pyraw", 2600, 2, daemon_cpu_s=1.1),
    ]
    table = vm_bench.aggregate(runs)["randread-4k-qd1"]
    assert table["runner"]["iops"] == 1200
    assert table["fileio"]["iops"] == 10000
    raw = table["pyraw"]
    assert raw["n"] == 2 and raw["iops"] == 2500
    assert raw["ratio_runner"]["iops"] == pytest.approx(2500 / 1200)
    assert raw["ratio_fileio"]["iops"] == pytest.approx(0.25)
    # Latency ratio of the medians: lower than tcmu-runner's means < 1.
    assert raw["ratio_runner"]["lat_mean_us"] == pytest.approx(
        vm_bench.statistics.median([1e6 / 2400, 1e6 / 2600]) / (1e6 / 1200)
    )
    assert raw["spread"] == pytest.approx(200 / 2500)
    # CPU per I/O: CPU seconds over IOPS x runtime, median over the runs.
    assert raw["cpu_us_per_io"] == pytest.approx(
        vm_bench.statistics.median([0.9e6 / (2400 * 9), 1.1e6 / (2600 * 9)])
    )
    assert table["runner"]["ratio_runner"]["iops"] == 1.0


def test_missing_reference_gives_no_ratio() -> None:
    table = vm_bench.aggregate([run("pyraw", 100)])["randread-4k-qd1"]
    assert table["pyraw"]["ratio_runner"]["iops"] is None
    assert "| – |" in vm_bench.render_table({"randread-4k-qd1": table})


def test_profile_summary_self_inclusive_and_threads() -> None:
    text = "\n".join(
        [
            "thread (1): tcmu-d;run (runner.py:10);process (runner.py:20);dequeue (ring.py:5) 6",
            "thread (2): tcmu-d_0;_worker (thread.py:83);read (raw.py:40) 3",
            "thread (3): tcmu-d_1;_worker (thread.py:83);read (raw.py:40) 1",
            "garbage line without a count",
        ]
    )
    p = vm_bench.summarize_profile(text)
    assert p["samples"] == 10
    assert dict(p["self_by_function"]) == {"dequeue (ring.py)": 60.0, "read (raw.py)": 40.0}
    incl = dict(p["inclusive_by_function"])
    assert incl["run (runner.py)"] == 60.0 and incl["_worker (thread.py)"] == 40.0
    assert dict(p["self_by_file"]) == {"ring.py": 60.0, "raw.py": 40.0}
    # Pool workers are grouped by name prefix.
    assert dict(p["by_thread"]) == {"tcmu-d": 60.0, "tcmu-d_N": 40.0}
