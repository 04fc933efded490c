"""`p2p-bench hosts --solo-only`: argument checks and the report (no fleet is built here)."""

from __future__ import annotations

import pytest

from benchmarks.hosts import bench


def test_solo_only_needs_at_least_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--solo-only", "--solo-runs", "0"]) == 2
    assert "--solo-only needs --solo-runs >= 1" in capsys.readouterr().err


def test_the_solo_report_gives_each_run_and_judges_the_median() -> None:
    runs = [
        {"p2pd_seconds": 12.0, "direct_seconds": 10.0},
        {"p2pd_seconds": 10.5, "direct_seconds": 10.0},
        {"p2pd_seconds": 13.0, "direct_seconds": 10.0},
    ]
    solo = bench.solo_report(runs)
    assert solo["ratio"] == pytest.approx(1.2)
    report = {
        "config": {
            "host_up_mbit": 100.0,
            "host_down_mbit": 100.0,
            "registry_mbit": 100.0,
            "supernode_mbit": 100.0,
            "layers_mb": "1,20,100",
        },
        "solo": solo,
        "load_average": {"before": (0.5, 0, 0), "after": (1.0, 0, 0)},
        "cpu_seconds": {"supernode": 2.0, "h1": 3.0, "registry": 1.0},
        "goals": {"solo": bench._goal(solo["ratio"], bench.GOAL_SOLO)},
    }
    text = bench.format_solo(report)
    assert "10.50 s through p2pd, 10.00 s direct (1.050x)" in text
    assert "1.200x <= 1.10x  MISSED" in text
