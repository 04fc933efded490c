"""What a storm run produced, how it compares with the best possible, and how it is shown.

The simulator fills a `StormResult`; this module judges it against the Kumar-Ross lower bound
and the issue's goals (`summarize`), and shows it as a terminal table, a JSON file and a PNG.

The lower bound
---------------
Kumar and Ross bound the time to send a file of F bytes from one server (upload u_s) to N peers
(upload u_i, download d_i) by  T >= max(F/u_s, F/d_min, N*F/(u_s + sum u_i)).  Our system has
two kinds of source, so each term is argued for it separately. Every term assumes a *cold* storm:
at the first start t0 no node and no supernode holds any byte of the image, so the registry is
the only origin.

- **registry = F / registry_up.** Every byte of the image leaves the registry at least once after
  t0 (whether it goes to a supernode or, on back-to-source, straight to a node), at most at
  ``registry_up``. No node can complete before t0 + F/registry_up. This is Kumar-Ross' F/u_s
  with u_s the registry: the supernode is not a source of new bytes, so F/supernode_up is *not*
  a term (nodes fall back to the registry, and several supernodes split the layers).
- **download = F / d_min**, d_min over the nodes that must finish (churned nodes need not). The
  slowest of them downloads F bytes after its own start.
- **aggregate = n*F / (u_s + sum u_i)**, n the nodes that must finish, sum u_i over *every* node
  (a leaver uploads while present) and u_s = registry_up + supernodes * supernode_up: every
  byte a node receives comes from the registry (back-to-source), a supernode or a peer, so the
  swarm cannot receive faster than all of them can send. Counting the registry in u_s is what
  keeps the bound valid when nodes go back to source; counting a failed supernode for the whole
  run, or the registry's bytes spent on feeding the supernode, only over-states capacity, which
  lowers the bound, so it stays a bound. This term bounds only the *last* completion.
- **zones = F / ((zones - 1) * zone_link)**, only when zone links exist and some node that must
  finish lives outside zone 0 (the result's ``node_zone`` says where nodes live; without it the
  term is left out). The registry sits in zone 0 and every zone pair is linked at ``zone_link``
  per direction (as the simulator wires it), so every byte must leave zone 0 through one of its
  zones - 1 links at least once. The tempting (zones - 1) * F / (zones - 1) * zone_link = F/link
  is *not* valid: zone 0 can send half the image to each of two zones and let them swap halves.
- Latency is left out (it adds at most one round trip per request chain; not worth a term).

The network model is pessimistic (equal split, not max-min; see `network.py`), which can only
make simulated times longer, never shorter than the bound.

Judging times
-------------
A node's *duration* is completion - start: what a user of that host waits. The storm bound above
is measured from t0, so it bounds each duration only when all nodes start at t0 (then the
registry, download and zones terms bound every node, the aggregate term the slowest one).

*Each node against its own bound* (the issue's rule, so slow hosts neither hide nor excuse fast
ones): ``node bound_i = max(F/d_i, T_s - o_i)`` with o_i = start_i - t0 and T_s the largest of the
registry, aggregate and (for nodes outside zone 0) zones terms. With everyone starting at once
this is the issue's max(F/d_i, N*F/(u_s + sum u_i), F/registry_up). With an arrival spread, a
late node is judged only on what is left of the storm bound when it arrives: F/d_i and the
registry/zones terms then stay hard bounds of its duration, the aggregate term stays a yardstick
(a node favoured by the swarm may beat it; the swarm as a whole may not). Goals are judged on
the percentiles of duration_i / node_bound_i; on a homogeneous all-at-once run that equals
percentile(duration) / bound. The *makespan* (last completion - t0) is also reported against
its hard bound max(T, max_i o_i + F/d_i).

Percentiles are nearest-rank: the p-th of n sorted values is the ceil(p*n/100)-th, so p50 and p99
are always times some node actually had, and p100 is the max. Nodes that left (churn) are
excluded from percentiles and counted separately.

Goals (issue 4): p50 <= 1.05, p99 <= 1.20, max <= 1.35 times the bound; registry egress <= 1.01
times the image; bytes crossing zones <= 1.05 * (zones - 1) * image.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from p2pd import native

GOAL_P50 = 1.05
GOAL_P99 = 1.20
GOAL_MAX = 1.35
GOAL_EGRESS = 1.01
GOAL_CROSS_ZONE = 1.05
PERCENTILES = (50, 90, 99, 100)

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    layers: tuple[int, ...]  # layer sizes in bytes; the image size F is their sum
    node_up: float  # bytes/s of ordinary nodes
    node_down: float
    registry_up: float  # registry egress, bytes/s
    supernode_up: float
    supernode_down: float
    slow_share: float = 0.0  # a share of slow nodes, with their own capacities
    slow_up: float = 0.0
    slow_down: float = 0.0
    supernodes: int = 1
    zones: int = 1
    zone_link: float | None = None  # bytes/s between two zones; registry and supernodes in zone 0
    churn: float = 0.0  # share of nodes that leave at a random moment mid-pull
    arrival_spread: float = 0.0  # seconds over which nodes start (0 = all at once)
    supernode_failure_at: float | None = None
    # Round-trip time of one request, seconds: a control call's reply comes this long after it
    # is sent (plus any wait at a busy supernode), a piece starts flowing this long after it is
    # asked for. Fast engine only.
    latency: float = 0.0
    # Control messages one supernode answers per second (its CPU; 0: no limit). Calls queue
    # at a supernode that is behind. Fast engine only.
    supernode_rate: float = 0.0
    seed: int = 1
    # How a host's (or zone link's) capacity is shared among its flows: "fill" (water-filling,
    # near max-min fair: what competing TCP flows approach) or "equal" (an equal split, the
    # model before; pessimistic). See benchmarks.storm.network.
    sharing: str = "fill"

    @property
    def image_size(self) -> int:
        return sum(self.layers)


@dataclass
class StormResult:
    scenario: Scenario
    engine: str  # "fast" or "full"
    start: list[float]  # per node: when it started pulling
    completion: list[float | None]  # per node: when it had the whole image; None if it left
    node_up: list[float]  # per node capacities actually used
    node_down: list[float]
    registry_egress_bytes: float
    registry_egress_timeline: list[tuple[float, float]]  # (time, cumulative bytes), increasing
    cross_zone_bytes: float
    supernode_upload_bytes: float
    control_messages: int  # register + announce + report + leave calls
    naive_completion: list[float]  # same scenario, every node straight from the registry
    wall_seconds: float
    # Per node: its zone. Optional; without it the zones term stays out of the bound.
    node_zone: list[int] = field(default_factory=list)
    # How the download links of the nodes still pulling were used, sampled every
    # `download_use_step` seconds (fast engine; empty otherwise): (time, nodes pulling, links
    # in use in node-equivalents -- the sum of each one's receive rate over its capacity --,
    # nodes receiving nothing). See `download_use`.
    download_use: list[tuple[float, int, float, int]] = field(default_factory=list)
    download_use_step: float = 0.0


# -- the bound --------------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    """a / b for capacities: nothing to send takes no time, zero capacity takes forever."""
    if a == 0:
        return 0.0
    return a / b if b > 0 else math.inf


@dataclass(frozen=True)
class Bound:
    """The Kumar-Ross terms for one storm, in seconds from t0 (see the module docstring)."""

    image: float  # F, bytes
    source_upload: float  # u_s = registry_up + supernodes * supernode_up
    registry: float  # F / registry_up
    download: float  # F / d_min over the nodes that must finish
    aggregate: float  # n F / (u_s + sum u_i)
    zones: float  # F / ((zones - 1) zone_link): 0 without zone links
    zones_apply: bool  # some node that must finish lives outside zone 0

    def terms(self) -> dict[str, float]:
        return {
            "registry": self.registry,
            "download": self.download,
            "aggregate": self.aggregate,
            "zones": self.zones if self.zones_apply else 0.0,
        }

    @property
    def seconds(self) -> float:
        return max(self.terms().values())

    @property
    def dominant(self) -> str:
        terms = self.terms()
        return max(terms, key=lambda k: terms[k])  # first of equals, in the order above

    def for_node(self, down: float, offset: float = 0.0, outside_zone0: bool = False) -> float:
        """The bound a node is judged against: see "Judging times" in the module docstring."""
        storm = max(self.registry, self.aggregate, self.zones if outside_zone0 else 0.0)
        return max(_div(self.image, down), storm - offset)


def storm_bound(
    scenario: Scenario,
    node_up: Sequence[float],
    node_down: Sequence[float],
    nodes_present: int | None = None,
    node_zone: Sequence[int] | None = None,
) -> Bound:
    """The bound's terms. ``node_up``: every node (leavers upload too); ``node_down`` and
    ``node_zone``: the nodes that must finish; ``nodes_present``: how many (default: all)."""
    f = float(scenario.image_size)
    n = len(node_down) if nodes_present is None else nodes_present
    u_s = scenario.registry_up + max(1, scenario.supernodes) * scenario.supernode_up
    zones = 0.0
    if scenario.zones > 1 and scenario.zone_link is not None:
        zones = _div(f, (scenario.zones - 1) * scenario.zone_link)
    return Bound(
        image=f,
        source_upload=u_s,
        registry=_div(f, scenario.registry_up),
        download=_div(f, min(node_down)) if node_down else 0.0,
        aggregate=_div(n * f, u_s + sum(node_up)),
        zones=zones,
        zones_apply=node_zone is not None and any(z != 0 for z in node_zone),
    )


def lower_bound(
    scenario: Scenario,
    node_up: Sequence[float],
    node_down: Sequence[float],
    nodes_present: int | None = None,
    node_zone: Sequence[int] | None = None,
) -> float:
    """T >= max(F/registry_up, F/d_min, n F/(u_s + sum u_i)[, zones term]), seconds from t0."""
    return storm_bound(scenario, node_up, node_down, nodes_present, node_zone).seconds


def node_bound(
    scenario: Scenario,
    i: int,
    node_up: Sequence[float],
    node_down: Sequence[float],
    *,
    start: Sequence[float] | None = None,
    nodes_present: int | None = None,
    node_zone: Sequence[int] | None = None,
) -> float:
    """Node i's own bound, max(F/d_i, T_s - o_i). Lists are per node, all nodes; O(N) a call."""
    bound = storm_bound(scenario, node_up, node_down, nodes_present)
    offset = start[i] - min(start) if start else 0.0
    outside = node_zone is not None and len(node_zone) > 0 and node_zone[i] != 0
    return bound.for_node(node_down[i], offset, outside)


# -- the summary ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: int) -> float | None:
    """Nearest rank: the ceil(p*n/100)-th smallest (integer arithmetic, no rounding surprises)."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))
    return sorted_values[rank - 1]


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {_pname(p): percentile(ordered, p) for p in PERCENTILES}


def _pname(p: int) -> str:
    return "max" if p == 100 else f"p{p}"


def _ratio(value: float | None, reference: float) -> float | None:
    if value is None or reference <= 0 or not math.isfinite(reference):
        return None
    return value / reference


def _goal(value: float | None, limit: float) -> dict[str, Any]:
    return {"value": value, "limit": limit, "met": value is not None and value <= limit}


def node_bounds(result: StormResult, bound: Bound) -> list[float | None]:
    """Every node's own bound (None for nodes that left)."""
    t0 = min(result.start) if result.start else 0.0
    zones = result.node_zone
    return [
        None
        if done is None
        else bound.for_node(
            result.node_down[i], result.start[i] - t0, bool(zones) and zones[i] != 0
        )
        for i, done in enumerate(result.completion)
    ]


def result_bound(result: StormResult) -> Bound:
    """The storm bound for a run: the nodes that finished must get the image, all may upload."""
    finished = [i for i, c in enumerate(result.completion) if c is not None]
    return storm_bound(
        result.scenario,
        result.node_up,
        [result.node_down[i] for i in finished],
        len(finished),
        [result.node_zone[i] for i in finished] if result.node_zone else None,
    )


def _check(result: StormResult) -> None:
    n = len(result.start)
    lists: dict[str, Sequence[object]] = {
        "completion": result.completion,
        "node_up": result.node_up,
        "node_down": result.node_down,
    }
    if result.naive_completion:
        lists["naive_completion"] = result.naive_completion
    if result.node_zone:
        lists["node_zone"] = result.node_zone
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} nodes")


def summarize(result: StormResult) -> dict[str, Any]:
    """Everything the issue asks of a run, as plain JSON-able values (None where undefined)."""
    _check(result)
    s = result.scenario
    n = len(result.start)
    finished = [i for i, c in enumerate(result.completion) if c is not None]
    durations = [_duration(result, i) for i in finished]
    bound = result_bound(result)
    t = bound.seconds
    f = bound.image
    own = node_bounds(result, bound)
    node_ratios = [_div(_duration(result, i), own[i] or 0.0) for i in finished]
    t0 = min(result.start) if result.start else 0.0
    naive = naive_durations(result)

    times = _percentiles(durations)
    naive_times = _percentiles(naive) if naive else dict.fromkeys(times)
    ratios = _percentiles(node_ratios)
    last = max((c for c in result.completion if c is not None), default=None)
    makespan_bound = max(
        [t, *(result.start[i] - t0 + _div(f, result.node_down[i]) for i in finished)]
    )
    zone_floor = (s.zones - 1) * f
    goals = {
        "p50": _goal(ratios["p50"], GOAL_P50),
        "p99": _goal(ratios["p99"], GOAL_P99),
        "max": _goal(ratios["max"], GOAL_MAX),
        "registry_egress": _goal(_ratio(result.registry_egress_bytes, f), GOAL_EGRESS),
    }
    if s.zones > 1:
        goals["cross_zone"] = _goal(_ratio(result.cross_zone_bytes, zone_floor), GOAL_CROSS_ZONE)
    summary = {
        "scenario": asdict(s),
        "engine": result.engine,
        "nodes": n,
        "completed": len(finished),
        "left": n - len(finished),
        "image_bytes": f,
        "heterogeneous": len(set(result.node_down)) > 1 or len(set(result.node_up)) > 1,
        "arrival_spread": max(result.start, default=0.0) - t0,
        "bound": {
            "seconds": t,
            "dominant": bound.dominant,
            "terms": bound.terms(),
            "source_upload": bound.source_upload,
        },
        "durations": {**times, "ratio": {k: _ratio(v, t) for k, v in times.items()}},
        "node_ratio": ratios,
        "makespan": {
            "seconds": None if last is None else last - t0,
            "bound": makespan_bound,
            "ratio": None if last is None else _ratio(last - t0, makespan_bound),
        },
        "naive": {**naive_times, "ratio": {k: _ratio(v, t) for k, v in naive_times.items()}},
        "registry_egress": {
            "bytes": result.registry_egress_bytes,
            "ratio_to_image": _ratio(result.registry_egress_bytes, f),
        },
        "cross_zone": {
            "bytes": result.cross_zone_bytes,
            "ratio_to_minimum": _ratio(result.cross_zone_bytes, zone_floor),
        },
        "supernode_upload": {
            "bytes": result.supernode_upload_bytes,
            "ratio_to_image": _ratio(result.supernode_upload_bytes, f),
        },
        "control_messages": {
            "total": result.control_messages,
            "per_node": result.control_messages / n if n else None,
        },
        "download_use": download_use(result, t),
        "wall_seconds": result.wall_seconds,
        # which scheduling core and model ran (the compiled ones decide identically; wall
        # times differ about twofold): see p2pd.native
        "core": native.status(),
        "goals": goals,
        "all_goals_met": all(g["met"] for g in goals.values()),
    }
    out: dict[str, Any] = jsonable(summary)
    return out


# The share of the bound counted as a storm's start in `download_use`.
EARLY_SHARE = 0.2


def download_use(result: StormResult, bound: float) -> dict[str, Any] | None:
    """Where the time over the bound went: download capacity the pulling nodes left unused.

    A node that receives its image at full speed from its start needs F/d; every second its
    link is not full is what its completion adds to that (less what it received twice).
    So ``per_node`` -- unused download in seconds of a whole link, summed over the samples
    and divided by the nodes -- is about the mean completion time minus F/d in a storm of
    equal hosts: it splits the miss of the goals into *when* (``early_share``: the part in
    the first `EARLY_SHARE` of the bound after the first start, the swarm's ramp) and *how*
    (``idle_share``: links that received nothing at all, against links partly used). None
    without samples (the full engine)."""
    samples, step = result.download_use, result.download_use_step
    if not samples or not step > 0:
        return None
    t0 = min(result.start) if result.start else 0.0
    early_until = t0 + EARLY_SHARE * bound
    lost = idle = early = 0.0
    for at, pulling, used, nothing in samples:
        unused = (pulling - used) * step
        lost += unused
        idle += nothing * step
        if at < early_until:
            early += unused
    n = len(result.start)
    return {
        "step": step,
        "samples": len(samples),
        "node_seconds": lost,
        "per_node": lost / n if n else None,
        "per_node_ratio": _ratio(lost / n, bound) if n else None,
        "early_seconds": early_until - t0,
        "early_share": _ratio(early, lost),
        "idle_share": _ratio(idle, lost),
    }


def naive_durations(result: StormResult) -> list[float]:
    """Naive completion minus start, per node (empty when the run skipped the naive pull)."""
    if not result.naive_completion:
        return []
    return [c - s for c, s in zip(result.naive_completion, result.start, strict=True)]


def _duration(result: StormResult, i: int) -> float:
    done = result.completion[i]
    assert done is not None
    return done - result.start[i]


def jsonable(value: Any) -> Any:
    """Strict JSON: tuples become lists, infinities and NaN become None (unbounded, undefined)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- the terminal table -----------------------------------------------------------------------


def _sec(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}x" if v >= 100 else f"{v:.3f}x"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / _MIB:.1f} MiB"


def _control_model(scenario: dict[str, Any]) -> str:
    latency = scenario.get("latency", 0.0)
    rate = scenario.get("supernode_rate", 0.0)
    sharing = {"fill": "water-filling", "equal": "equal split"}
    return (
        f"round trip {latency * 1000:g} ms  "
        f"supernode {f'{rate:g} messages/s' if rate else 'answers at once'}  "
        f"links shared by {sharing.get(scenario.get('sharing', 'equal'), '?')}"
    )


def format_table(summary: dict[str, Any]) -> str:
    """A fixed-width table of a `summarize` result, for a terminal."""
    b = summary["bound"]
    d, nr, nv = summary["durations"], summary["node_ratio"], summary["naive"]
    terms = "  ".join(f"{k} {_sec(v)}" for k, v in b["terms"].items() if v)
    keys = [_pname(p) for p in PERCENTILES]
    lines = [
        f"storm {summary['scenario']['name']!r}  engine {summary['engine']}  "
        f"{summary['nodes']} nodes ({summary['completed']} completed, {summary['left']} left)  "
        f"image {_mib(summary['image_bytes'])}  wall {_sec(summary['wall_seconds'])} s "
        f"({'compiled' if summary.get('core') == native.COMPILED else 'Python'} core)",
        f"lower bound {_sec(b['seconds'])} s  ({b['dominant']} dominates; {terms})",
        _control_model(summary["scenario"]),
        "",
        f"{'seconds from own start':<24}" + "".join(f"{k:>11}" for k in keys),
        f"{'p2p':<24}" + "".join(f"{_sec(d[k]):>11}" for k in keys),
        f"{'  / lower bound':<24}" + "".join(f"{_x(d['ratio'][k]):>11}" for k in keys),
        f"{'  / own bound (judged)':<24}" + "".join(f"{_x(nr[k]):>11}" for k in keys),
        f"{'naive (registry only)':<24}" + "".join(f"{_sec(nv[k]):>11}" for k in keys),
        f"{'  / lower bound':<24}" + "".join(f"{_x(nv['ratio'][k]):>11}" for k in keys),
        "",
    ]
    m = summary["makespan"]
    cz, eg, sn = summary["cross_zone"], summary["registry_egress"], summary["supernode_upload"]
    rows = [
        ("makespan", f"{_sec(m['seconds'])} s", f"{_x(m['ratio'])} of {_sec(m['bound'])} s"),
        ("registry egress", _mib(eg["bytes"]), f"{_x(eg['ratio_to_image'])} image"),
        ("cross-zone", _mib(cz["bytes"]), f"{_x(cz['ratio_to_minimum'])} (zones-1)*image"),
        ("supernode upload", _mib(sn["bytes"]), f"{_x(sn['ratio_to_image'])} image"),
        ("control messages", str(summary["control_messages"]["total"]), _per_node(summary)),
    ]
    use = summary.get("download_use")
    if use and use["per_node"] is not None:
        rows.append(
            (
                "unused download",
                f"{_sec(use['per_node'])} s/node",
                f"{_x(use['per_node_ratio'])} bound; {_pct(use['early_share'])} in the first "
                f"{_sec(use['early_seconds'])} s, {_pct(use['idle_share'])} on idle links",
            )
        )
    lines += [f"{name:<24}{a:>16}   {b_}" for name, a, b_ in rows]
    lines += ["", "goals"]
    labels = {
        "p50": "p50 / own bound",
        "p99": "p99 / own bound",
        "max": "max / own bound",
        "registry_egress": "registry egress / image",
        "cross_zone": "cross-zone / (zones-1)*image",
    }
    for key, g in summary["goals"].items():
        verdict = "met" if g["met"] else _miss(g)
        lines.append(
            f"  {labels.get(key, key):<30}{_x(g['value']):>10}  <= {g['limit']:.2f}x  {verdict}"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _per_node(summary: dict[str, Any]) -> str:
    per = summary["control_messages"]["per_node"]
    return "-" if per is None else f"{per:.1f} per node"


def _miss(goal: dict[str, Any]) -> str:
    if goal["value"] is None:
        return "MISSED (no value)"
    return f"MISSED by {(goal['value'] / goal['limit'] - 1) * 100:.1f}%"


# -- files ------------------------------------------------------------------------------------


def write_json(summary: dict[str, Any], result: StormResult, path: str | Path) -> None:
    """The summary plus per-node columns (null for nodes that left) and the egress timeline."""
    _check(result)
    own = node_bounds(result, result_bound(result))
    durations = [
        None if c is None else c - s for c, s in zip(result.completion, result.start, strict=True)
    ]
    doc = {
        "summary": summary,
        "per_node": {
            "start": result.start,
            "duration": durations,
            "own_bound": own,
            "naive_duration": naive_durations(result),
            "up": result.node_up,
            "down": result.node_down,
            "zone": result.node_zone,
        },
        "registry_egress_timeline": result.registry_egress_timeline,
        # (time, nodes pulling, download links in use in node-equivalents, links idle)
        "download_use": result.download_use,
    }
    with Path(path).open("w", encoding="utf-8") as out:
        json.dump(jsonable(doc), out, allow_nan=False, indent=1)
        out.write("\n")


def plot_png(result: StormResult, path: str | Path) -> None:
    """Completion-time CDF (p2p, naive, the bound), registry egress over time and, from the
    fast engine, how the pulling nodes' download links were used over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    summary = summarize(result)
    t = summary["bound"]["seconds"]
    f = summary["image_bytes"]
    t0 = min(result.start) if result.start else 0.0
    p2p = sorted(_duration(result, i) for i, c in enumerate(result.completion) if c is not None)
    naive = sorted(naive_durations(result))

    panels = 3 if result.download_use else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), layout="constrained")
    cdf, egress = axes[0], axes[1]
    try:
        for values, label, colour in ((p2p, "p2p", "tab:blue"), (naive, "naive", "tab:orange")):
            if values:
                ys = [(k + 1) / len(values) for k in range(len(values))]
                cdf.step([values[0], *values], [0.0, *ys], where="post", label=label, color=colour)
        if t:
            cdf.axvline(t, color="black", linestyle="--", label=f"lower bound {t:.2f} s")
        # With slow hosts the storm bound is theirs; mark what the fast ones are judged on.
        own = [b for b in node_bounds(result, result_bound(result)) if b is not None]
        if own and min(own) < 0.99 * t:
            cdf.axvline(
                min(own), color="grey", linestyle=":", label=f"fastest nodes' own {min(own):.2f} s"
            )
        # The naive pull is often 100x slower than the swarm: a log axis keeps both readable.
        if p2p and naive and naive[-1] > 10 * p2p[0] > 0:
            cdf.set_xscale("log")
        cdf.set_xlabel("seconds from the node's own start")
        cdf.set_ylabel("fraction of completing nodes")
        cdf.set_title("completion time (CDF)")
        cdf.grid(True, which="both", alpha=0.3)
        cdf.legend(loc="best")

        # Bytes flow between the recorded points, so straight segments, not steps; held flat
        # to the last completion so a registry gone quiet shows as such.
        timeline = list(result.registry_egress_timeline)
        last = max((c for c in result.completion if c is not None), default=None)
        if timeline and last is not None and last > timeline[-1][0]:
            timeline.append((last, timeline[-1][1]))
        if timeline:
            egress.plot(
                [x - t0 for x, _ in timeline],
                [y / _MIB for _, y in timeline],
                label="p2p",
                color="tab:blue",
            )
        egress.axhline(f / _MIB, color="black", linestyle="--", label="image size")
        egress.set_xlabel("seconds from the first start")
        egress.set_ylabel("registry egress, cumulative (MiB)")
        egress.set_title("registry egress")
        egress.grid(True, alpha=0.3)
        egress.legend(loc="best")

        if result.download_use:
            use = axes[2]
            n = len(result.start)
            xs = [at - t0 for at, _, _, _ in result.download_use]
            use.plot(
                xs,
                [used / pulling if pulling else 1.0 for _, pulling, used, _ in result.download_use],
                label="capacity in use (nodes pulling)",
                color="tab:blue",
            )
            use.plot(
                xs,
                [pulling / n for _, pulling, _, _ in result.download_use],
                label="nodes pulling",
                color="tab:grey",
                linestyle=":",
            )
            if t:
                use.axvline(
                    EARLY_SHARE * t, color="black", linestyle="--", label="first 20 % of the bound"
                )
            use.set_ylim(0, 1.05)
            use.set_xlabel("seconds from the first start")
            use.set_ylabel("share")
            use.set_title("download links of the nodes still pulling")
            use.grid(True, alpha=0.3)
            use.legend(loc="lower right")

        fig.suptitle(
            f"{result.scenario.name}: {len(result.start)} nodes, engine {result.engine}"
            f" ({summary['completed']} completed, {summary['left']} left)"
        )
        fig.savefig(Path(path), format="png", dpi=100)
    finally:
        plt.close(fig)  # pyplot keeps every figure alive until closed


# -- progress ---------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal; on anything else, only the final line.

    Wall time here is UI, not simulation: reading the clock does not affect any result.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        every: float = 0.2,
        *,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        # Resolved at call time, so a swapped sys.stderr (pytest's capture) is honoured.
        self.stream = sys.stderr if stream is None else stream
        self.every = every
        self.width = width
        self._clock = clock
        self._began = clock()
        self._drawn = -math.inf
        self._done = 0
        self._sim_time = 0.0
        self._shown = 0  # length of the line on screen, to blank out a longer previous one
        self._closed = False
        self._tty = _isatty(self.stream)

    def update(self, done: int, sim_time: float) -> None:
        self._done, self._sim_time = done, sim_time
        if not self._tty or self._closed:
            return
        now = self._clock()
        if now - self._drawn < self.every:
            return
        self._drawn = now
        line = self.line()
        self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.stream.flush()
        self._shown = len(line)

    def line(self) -> str:
        share = min(1.0, self._done / self.total) if self.total else 1.0
        filled = round(share * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        wall = self._clock() - self._began
        return (
            f"[{bar}] {self._done}/{self.total} nodes  "
            f"sim {self._sim_time:.2f} s  wall {wall:.1f} s"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        line = self.line()
        prefix = "\r" if self._tty else ""
        self.stream.write(prefix + line + " " * max(0, self._shown - len(line)) + "\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or already closed
        return False
