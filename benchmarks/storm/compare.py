"""The honesty check: the fast simulator against the full stack on the same scenario.

The fast engine (`benchmarks.storm.sim`) drives the scheduling core on an event heap; the full
engine (`benchmarks.storm.full`) runs the real daemons on the same network model. Issue 4
asks them to agree within 10% on p50 and p99 of the per-node completion times; a larger gap
means the simulator's picture of the daemons is wrong somewhere (or the daemons are).

Agreement is judged on the per-node durations (completion - start) at p50 and p99, as
relative differences ``(full - fast) / fast``. With several runs per engine (seeds s, s+1, ...;
``--repeat``) the means are compared and each engine's range is shown: some scenarios are
chaotic (a zone-link-bound storm's p50 moves by tens of per cent with the order of events at
one instant), and there one run per engine compares two samples, not two engines.

The other figures are shown side by side for the reader, not judged: registry egress,
supernode upload and control messages differ by design in small ways (HTTP heads count as
bytes in the full engine; its daemons also leave and heartbeat).
"""

from __future__ import annotations

from typing import Any

AGREEMENT = 0.10  # |relative difference| allowed on p50 and p99
JUDGED = ("p50", "p99")


def _rel(fast: float | None, full: float | None) -> float | None:
    if fast is None or full is None or fast == 0:
        return None
    return (full - fast) / fast


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None) / len(values)


_FIGURES: list[tuple[str, tuple[str, ...], bool]] = [
    *((f"duration {k} (s)", ("durations", k), k in JUDGED) for k in ("p50", "p90", "p99", "max")),
    *((f"{k} / own bound", ("node_ratio", k), False) for k in ("p50", "p99", "max")),
    ("makespan (s)", ("makespan", "seconds"), False),
    ("registry egress / image", ("registry_egress", "ratio_to_image"), False),
    ("supernode upload / image", ("supernode_upload", "ratio_to_image"), False),
    ("cross-zone / minimum", ("cross_zone", "ratio_to_minimum"), False),
    ("control messages / node", ("control_messages", "per_node"), False),
    ("completed nodes", ("completed",), False),
    ("wall seconds", ("wall_seconds",), False),
]


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = summary
    for key in path:
        value = value[key]
    return value


def compare(fast: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, Any]:
    """Side by side figures of `summarize` results (one or more runs per engine, the same
    scenario), and whether the engines agree: the means of p50 and p99 within `AGREEMENT`."""
    if not fast or not full:
        raise ValueError("need at least one run of each engine")
    rows: list[dict[str, Any]] = []
    zones = fast[0]["scenario"]["zones"] > 1
    for name, path, judged in _FIGURES:
        if name.startswith("cross-zone") and not zones:
            continue
        a = [_get(s, path) for s in fast]
        b = [_get(s, path) for s in full]
        ma, mb = _mean(a), _mean(b)
        rows.append(
            {
                "figure": name,
                "fast": ma,
                "full": mb,
                "fast_range": [min(a), max(a)] if ma is not None else None,
                "full_range": [min(b), max(b)] if mb is not None else None,
                "rel": _rel(ma, mb),
                "judged": judged,
            }
        )
    judged_rows = [r for r in rows if r["judged"]]
    agree = all(r["rel"] is not None and abs(r["rel"]) <= AGREEMENT for r in judged_rows)
    return {
        "scenario": fast[0]["scenario"]["name"],
        "nodes": fast[0]["nodes"],
        "runs": {"fast": len(fast), "full": len(full)},
        "seeds": {
            "fast": [s["scenario"]["seed"] for s in fast],
            "full": [s["scenario"]["seed"] for s in full],
        },
        "tolerance": AGREEMENT,
        "rows": rows,
        "agree": agree,
    }


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def format_comparison(result: dict[str, Any]) -> str:
    runs = result["runs"]
    several = runs["fast"] > 1 or runs["full"] > 1
    what = f", means of {runs['fast']} / {runs['full']} runs" if several else ""
    lines = [
        f"fast vs full: {result['scenario']!r}, {result['nodes']} nodes{what} "
        f"(p50 and p99 must agree within {result['tolerance'] * 100:.0f}%)",
        f"{'':<28}{'fast':>10}{'full':>10}{'full/fast-1':>13}"
        + (f"{'fast range':>22}{'full range':>22}" if several else ""),
    ]
    for r in result["rows"]:
        rel = "-" if r["rel"] is None else f"{r['rel'] * 100:+.1f}%"
        mark = "  <- judged" if r["judged"] else ""
        ranges = ""
        if several:
            ranges = "".join(
                f"{'-' if g is None else _num(g[0]) + '..' + _num(g[1]):>22}"
                for g in (r["fast_range"], r["full_range"])
            )
        lines.append(
            f"{r['figure']:<28}{_num(r['fast']):>10}{_num(r['full']):>10}{rel:>13}{ranges}{mark}"
        )
    lines.append("agree" if result["agree"] else "DISAGREE (see the judged rows)")
    return "\n".join(lines)
