"""The storm report: the lower bound, the summary's numbers and goals, and the output files."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.storm.report import (
    ProgressBar,
    Scenario,
    StormResult,
    format_table,
    lower_bound,
    node_bound,
    percentile,
    plot_png,
    storm_bound,
    summarize,
    write_json,
)

GB = 1e9
MBPS = 1e6  # bytes/s

# The brief's example: N=1000, F=1 GB, 1 Gbit/s nodes, 2 Gbit/s registry, 10 Gbit/s supernode.
BIG = Scenario(
    name="big",
    nodes=1000,
    layers=(200_000_000, 800_000_000),
    node_up=125 * MBPS,
    node_down=125 * MBPS,
    registry_up=250 * MBPS,
    supernode_up=1250 * MBPS,
    supernode_down=1250 * MBPS,
)


def uniform(n: int, rate: float) -> list[float]:
    return [rate] * n


# -- the bound --------------------------------------------------------------------------------


def test_bound_terms_by_hand() -> None:
    b = storm_bound(BIG, uniform(1000, 125 * MBPS), uniform(1000, 125 * MBPS))
    assert b.image == 1 * GB
    assert b.registry == pytest.approx(4.0)  # 1 GB / 250 MB/s
    assert b.download == pytest.approx(8.0)  # 1 GB / 125 MB/s
    # u_s = registry + supernode = 1.5 GB/s; 1000 GB / (1.5 + 125) GB/s
    assert b.source_upload == pytest.approx(1.5 * GB)
    assert b.aggregate == pytest.approx(1000 / 126.5)
    assert b.zones == 0.0
    assert b.dominant == "download"
    assert b.seconds == pytest.approx(8.0)
    assert lower_bound(BIG, uniform(1000, 125 * MBPS), uniform(1000, 125 * MBPS)) == b.seconds


def test_aggregate_dominates_when_uploads_are_slow() -> None:
    ups = uniform(1000, 12.5 * MBPS)  # 100 Mbit/s up, 1 Gbit/s down
    b = storm_bound(BIG, ups, uniform(1000, 125 * MBPS))
    assert b.dominant == "aggregate"
    assert b.seconds == pytest.approx(1000 / 14.0)  # 1000 GB / (1.5 + 12.5) GB/s


def test_registry_dominates_a_lone_node_behind_a_slow_registry() -> None:
    s = replace(BIG, nodes=1, registry_up=10 * MBPS)
    b = storm_bound(s, [125 * MBPS], [125 * MBPS])
    assert b.dominant == "registry"
    assert b.seconds == pytest.approx(100.0)


def test_every_supernode_counts_as_a_source() -> None:
    b = storm_bound(replace(BIG, supernodes=3), uniform(1000, 125 * MBPS), [125 * MBPS])
    assert b.source_upload == pytest.approx(250 * MBPS + 3 * 1250 * MBPS)


def test_churned_nodes_upload_but_need_not_finish() -> None:
    ups = uniform(1000, 12.5 * MBPS)
    all_finish = storm_bound(BIG, ups, uniform(1000, 125 * MBPS)).aggregate
    some_leave = storm_bound(BIG, ups, uniform(900, 125 * MBPS)).aggregate
    assert some_leave == pytest.approx(all_finish * 0.9)
    # an explicit count wins over the length of node_down
    assert storm_bound(BIG, ups, [125 * MBPS], nodes_present=900).aggregate == some_leave


def test_heterogeneous_node_bounds() -> None:
    # 10% at 100 Mbit/s: the aggregate (8.68 s) is above the fast nodes' F/d (8 s).
    ups = [12.5 * MBPS if i % 10 == 0 else 125 * MBPS for i in range(1000)]
    s = replace(BIG, slow_share=0.1, slow_up=12.5 * MBPS, slow_down=12.5 * MBPS)
    aggregate = 1000 / (1.5 + 112.5 + 1.25)
    assert node_bound(s, 1, ups, ups) == pytest.approx(aggregate)
    assert node_bound(s, 0, ups, ups) == pytest.approx(80.0)  # its own F/d_i
    assert lower_bound(s, ups, ups) == pytest.approx(80.0)  # the storm waits for the slowest


def test_node_bound_with_arrival_spread_keeps_only_what_is_left() -> None:
    s = replace(BIG, nodes=2, registry_up=50 * MBPS)  # F/registry = 20 s
    ups = uniform(2, 125 * MBPS)
    assert node_bound(s, 0, ups, ups, start=[3.0, 8.0]) == pytest.approx(20.0)
    assert node_bound(s, 1, ups, ups, start=[3.0, 8.0]) == pytest.approx(15.0)
    assert node_bound(s, 1, ups, ups, start=[0.0, 50.0]) == pytest.approx(8.0)  # F/d_i


def test_zone_term_only_for_nodes_outside_zone_zero() -> None:
    s = replace(BIG, nodes=3, zones=3, zone_link=25 * MBPS)  # 1 GB / (2 x 25 MB/s) = 20 s
    ups = uniform(3, 125 * MBPS)
    assert storm_bound(s, ups, ups).zones == pytest.approx(20.0)
    assert lower_bound(s, ups, ups) == pytest.approx(8.0)  # zones unknown: term left out
    assert lower_bound(s, ups, ups, node_zone=[0, 0, 0]) == pytest.approx(8.0)
    assert lower_bound(s, ups, ups, node_zone=[0, 1, 2]) == pytest.approx(20.0)
    assert node_bound(s, 0, ups, ups, node_zone=[0, 1, 2]) == pytest.approx(8.0)
    assert node_bound(s, 2, ups, ups, node_zone=[0, 1, 2]) == pytest.approx(20.0)


def test_more_nodes_never_lower_the_bound() -> None:
    # Adding a node with u_i <= (u_s + sum u)/N never lowers n F / (u_s + sum u).
    for rate in (12.5 * MBPS, 125 * MBPS, 1250 * MBPS):
        bounds = [
            lower_bound(BIG, uniform(n, rate), uniform(n, 125 * MBPS)) for n in range(1, 3000, 37)
        ]
        assert bounds == sorted(bounds)


def test_more_supernode_bandwidth_never_raises_the_bound() -> None:
    ups = uniform(1000, 12.5 * MBPS)
    bounds = [
        lower_bound(replace(BIG, supernode_up=k * 100 * MBPS), ups, uniform(1000, 125 * MBPS))
        for k in range(0, 200, 7)
    ]
    assert bounds == sorted(bounds, reverse=True)
    assert bounds[0] > bounds[-1]


def test_zero_capacity_and_empty_image() -> None:
    assert lower_bound(replace(BIG, registry_up=0.0), [1.0], [1.0]) == math.inf
    assert lower_bound(replace(BIG, layers=()), [0.0], [0.0]) == 0.0


# -- percentiles ------------------------------------------------------------------------------


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert [percentile([1.0, 2.0, 3.0], p) for p in (1, 34, 50, 67, 100)] == [1, 2, 2, 3, 3]
    assert percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None


# -- the summary ------------------------------------------------------------------------------

SMALL = Scenario(
    name="storm-test",
    nodes=11,
    layers=(400, 600),  # F = 1000 bytes
    node_up=100.0,
    node_down=100.0,  # F/d = 10 s
    registry_up=200.0,  # F/registry = 5 s
    supernode_up=100.0,  # aggregate = 10 F / (300 + 1100) = 7.14 s
    supernode_down=100.0,
    churn=0.1,
)
# Ten finishers, listed out of order, and node 3 leaves.
DURATIONS = [11.0, 10.0, 14.0, None, 10.4, 10.1, 12.0, 10.2, 11.8, 10.3, 11.5]


def small_result(**changes: object) -> StormResult:
    result = StormResult(
        scenario=SMALL,
        engine="fast",
        start=[0.0] * 11,
        completion=list(DURATIONS),
        node_up=[100.0] * 11,
        node_down=[100.0] * 11,
        registry_egress_bytes=1005.0,
        registry_egress_timeline=[(0.0, 0.0), (2.0, 400.0), (5.0, 1000.0), (6.0, 1005.0)],
        cross_zone_bytes=0.0,
        supernode_upload_bytes=3000.0,
        control_messages=55,
        naive_completion=[50.0 + i for i in range(11)],
        wall_seconds=0.25,
    )
    return replace(result, **changes)  # type: ignore[arg-type]


def test_summary_numbers() -> None:
    s = summarize(small_result())
    assert (s["nodes"], s["completed"], s["left"]) == (11, 10, 1)
    assert s["image_bytes"] == 1000
    assert s["bound"]["seconds"] == pytest.approx(10.0)
    assert s["bound"]["dominant"] == "download"
    assert s["bound"]["terms"]["aggregate"] == pytest.approx(10_000 / 1400)
    # sorted: 10, 10.1, 10.2, 10.3, 10.4, 11, 11.5, 11.8, 12, 14 (the leaver is not among them)
    d = s["durations"]
    assert (d["p50"], d["p90"], d["p99"], d["max"]) == (10.4, 12.0, 14.0, 14.0)
    assert d["ratio"]["p50"] == pytest.approx(1.04)
    assert d["ratio"]["max"] == pytest.approx(1.4)
    assert s["node_ratio"]["p90"] == pytest.approx(1.2)
    assert s["makespan"] == {"seconds": 14.0, "bound": 10.0, "ratio": pytest.approx(1.4)}
    # naive: 50..60 for all 11 nodes, the leaver too (it did not leave the naive run)
    n = s["naive"]
    assert (n["p50"], n["p99"], n["max"]) == (55.0, 60.0, 60.0)
    assert n["ratio"]["p50"] == pytest.approx(5.5)
    assert s["registry_egress"]["ratio_to_image"] == pytest.approx(1.005)
    assert s["supernode_upload"]["ratio_to_image"] == pytest.approx(3.0)
    assert s["control_messages"] == {"total": 55, "per_node": 5.0}
    assert s["cross_zone"]["ratio_to_minimum"] is None  # one zone: nothing has to cross
    assert s["heterogeneous"] is False
    assert s["wall_seconds"] == 0.25


def test_download_use_splits_the_unused_capacity_by_when_and_how() -> None:
    # bound 10 s, samples every 0.5 s: the first 2 s (20 % of the bound) are the ramp
    samples = [
        (0.0, 11, 0.0, 11),  # nobody receives yet: 11 links unused, all idle
        (0.5, 11, 5.5, 3),  # half the capacity in use, 3 links idle
        (1.5, 11, 10.0, 0),
        (2.0, 11, 11.0, 0),  # from here on, the early part is over
        (6.0, 10, 9.0, 1),
    ]
    use = summarize(small_result(download_use=samples, download_use_step=0.5))["download_use"]
    lost = (11 + 5.5 + 1 + 0 + 1) * 0.5
    assert use["node_seconds"] == pytest.approx(lost)
    assert use["per_node"] == pytest.approx(lost / 11)
    assert use["per_node_ratio"] == pytest.approx(lost / 11 / 10)
    assert use["early_seconds"] == pytest.approx(2.0)
    assert use["early_share"] == pytest.approx((11 + 5.5 + 1) * 0.5 / lost)
    assert use["idle_share"] == pytest.approx((11 + 3 + 1) * 0.5 / lost)
    assert use["samples"] == 5
    table = format_table(summarize(small_result(download_use=samples, download_use_step=0.5)))
    assert "unused download" in table and "in the first 2.00 s" in table
    # without samples (the full engine) there is nothing to say, and the table says nothing
    assert summarize(small_result())["download_use"] is None
    assert "unused download" not in format_table(summarize(small_result()))
    # every link full all along: nothing lost, and no shares of nothing
    full = summarize(small_result(download_use=[(0.0, 11, 11.0, 0)], download_use_step=1.0))
    assert full["download_use"]["per_node"] == 0.0
    assert full["download_use"]["early_share"] is None


def test_goal_flags() -> None:
    goals = summarize(small_result())["goals"]
    assert set(goals) == {"p50", "p99", "max", "registry_egress"}
    assert goals["p50"]["met"] and goals["registry_egress"]["met"]
    assert not goals["p99"]["met"]  # 1.4 > 1.20
    assert not goals["max"]["met"]  # 1.4 > 1.35
    assert goals["max"]["limit"] == 1.35
    good = summarize(small_result(completion=[10.0] * 10 + [13.5]))
    assert good["goals"]["max"]["met"]  # 1.35 exactly is within the goal
    assert not good["goals"]["p99"]["met"]
    assert good["all_goals_met"] is False
    assert summarize(small_result(completion=[10.5] * 11))["all_goals_met"] is True


def test_heterogeneous_run_is_judged_node_by_node() -> None:
    # Node 0 is ten times slower and takes 100 s: exactly its own bound, so it excuses nothing.
    down = [10.0] + [100.0] * 10
    result = small_result(
        node_down=down, node_up=down, completion=[100.0] + [12.0] * 10, naive_completion=[]
    )
    s = summarize(result)
    assert s["heterogeneous"] is True
    assert s["bound"]["seconds"] == pytest.approx(100.0)
    assert s["durations"]["ratio"]["p50"] == pytest.approx(0.12)  # against the storm bound
    assert s["node_ratio"]["p50"] == pytest.approx(1.2)  # against their own
    assert not s["goals"]["p50"]["met"]
    assert s["naive"]["p50"] is None


def test_arrival_spread_measures_from_each_start() -> None:
    s0 = replace(SMALL, nodes=2, registry_up=50.0, arrival_spread=5.0)  # F/registry = 20 s
    result = small_result(
        scenario=s0,
        start=[100.0, 105.0],
        completion=[121.0, 121.0],
        node_up=[100.0] * 2,
        node_down=[100.0] * 2,
        naive_completion=[140.0, 150.0],
    )
    s = summarize(result)
    assert s["arrival_spread"] == 5.0
    assert (s["durations"]["p50"], s["durations"]["max"]) == (16.0, 21.0)
    # own bounds: 20 s and 20 - 5 = 15 s
    assert sorted([s["node_ratio"]["p50"], s["node_ratio"]["max"]]) == pytest.approx(
        [1.05, 16 / 15]
    )
    assert s["makespan"]["seconds"] == 21.0
    assert s["makespan"]["bound"] == pytest.approx(20.0)
    assert s["naive"]["max"] == 45.0


def test_zones_goal_and_bound() -> None:
    sz = replace(SMALL, nodes=3, zones=3, zone_link=50.0, churn=0.0)  # F/(2*50) = 10 s
    result = small_result(
        scenario=sz,
        start=[0.0] * 3,
        completion=[10.0, 10.5, 10.2],
        node_up=[1000.0] * 3,
        node_down=[1000.0] * 3,  # F/d = 1 s
        naive_completion=[30.0] * 3,
        cross_zone_bytes=2090.0,
        node_zone=[0, 1, 2],
    )
    s = summarize(result)
    assert s["bound"]["dominant"] == "zones"
    assert s["bound"]["seconds"] == pytest.approx(10.0)
    assert s["cross_zone"]["ratio_to_minimum"] == pytest.approx(1.045)
    assert s["goals"]["cross_zone"]["met"]
    # node 0 lives in zone 0: judged on max(F/d, registry 5 s, aggregate) = 5 s, so 2.0x
    assert s["node_ratio"]["max"] == pytest.approx(2.0)
    missed = summarize(replace(result, cross_zone_bytes=2200.0))["goals"]["cross_zone"]
    assert missed["met"] is False and missed["value"] == pytest.approx(1.1)


def test_nobody_finished() -> None:
    s = summarize(small_result(completion=[None] * 11))
    assert (s["completed"], s["left"]) == (0, 11)
    assert s["durations"]["p50"] is None and s["makespan"]["seconds"] is None
    assert not s["goals"]["p50"]["met"]
    assert "MISSED (no value)" in format_table(s)


def test_mismatched_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="node_down"):
        summarize(small_result(node_down=[100.0]))


def test_summary_is_strict_json_even_with_infinite_capacities() -> None:
    s = summarize(small_result(scenario=replace(SMALL, registry_up=math.inf)))
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text)["scenario"]["registry_up"] is None


# -- output -----------------------------------------------------------------------------------


def test_table_shows_the_key_numbers() -> None:
    table = format_table(summarize(small_result()))
    for expected in (
        "storm-test",
        "11 nodes (10 completed, 1 left)",
        "lower bound 10.00 s",
        "download dominates",
        "10.40",
        "1.040x",
        "1.400x",
        "55.00",
        "1.005x image",
        "5.0 per node",
        "MISSED by 16.7%",  # p99: 1.4 / 1.2
        "met",
    ):
        assert expected in table, expected
    assert "round trip 0 ms  supernode answers at once" in table
    widths = {len(line) for line in table.splitlines()[4:10]}
    assert len(widths) == 1  # the percentile block is aligned


def test_json_round_trip(tmp_path: Path) -> None:
    result = small_result()
    summary = summarize(result)
    path = tmp_path / "storm.json"
    write_json(summary, result, path)
    with path.open() as f:
        doc = json.load(f)
    assert doc["summary"] == summary
    assert doc["per_node"]["duration"][3] is None
    assert doc["per_node"]["duration"][2] == 14.0
    assert doc["per_node"]["own_bound"][2] == pytest.approx(10.0)
    assert doc["per_node"]["naive_duration"][10] == 60.0
    assert doc["registry_egress_timeline"][-1] == [6.0, 1005.0]
    assert doc["download_use"] == []  # no samples in this result
    sampled = small_result(download_use=[(0.0, 11, 2.5, 7)], download_use_step=0.1)
    write_json(summarize(sampled), sampled, path)
    with path.open() as f:
        assert json.load(f)["download_use"] == [[0.0, 11, 2.5, 7]]


def test_png(tmp_path: Path) -> None:
    path = tmp_path / "storm.png"
    plot_png(small_result(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    # the fast engine's samples add a third panel: how the download links were used
    wide = tmp_path / "wide.png"
    samples = [(0.0, 11, 0.0, 11), (5.0, 11, 9.0, 1), (10.0, 5, 5.0, 0)]
    plot_png(small_result(download_use=samples, download_use_step=5.0), wide)
    width = int.from_bytes(wide.read_bytes()[16:20], "big")  # IHDR
    assert width > int.from_bytes(data[16:20], "big") * 1.4


# -- the progress bar -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_redraws_at_most_every_interval() -> None:
    clock, out = FakeClock(), Terminal()
    bar = ProgressBar(10, out, every=0.2, width=10, clock=clock)
    bar.update(1, 0.5)
    bar.update(2, 0.6)  # same instant: not redrawn
    clock.now = 0.3
    bar.update(5, 1.25)
    with bar:
        pass
    bar.close()  # closing twice prints once
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "1/10" in text and "2/10" not in text
    assert "[#####-----] 5/10 nodes  sim 1.25 s  wall 0.3 s" in text


def test_progress_bar_elsewhere_prints_only_the_final_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(4, out, clock=FakeClock(), width=4)
    for k in range(5):
        bar.update(k, float(k))
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue() == "[####] 4/4 nodes  sim 4.00 s  wall 0.0 s\n"
