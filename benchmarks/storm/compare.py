"""The honesty check: the fast simulator against the full stack on the same scenario.

The fast engine (`benchmarks.storm.sim`) drives the scheduling core on an event heap; the full
engine (`benchmarks.storm.full`) runs the real daemons on the same network model. Issue 4
asks them to agree within 10% on p50 and p99 of the per-node completion times; a larger gap
means the simulator's picture of the daemons is wrong somewhere (or the daemons are).

Agreement is judged on the per-node durations (completion - start) at p50 and p99, as
relative differences ``(full - fast) / fast``. The other figures are shown side by side for
the reader, not judged: registry egress, supernode upload and control messages differ by
design in small ways (HTTP heads count as bytes in the full engine; its daemons also leave and
heartbeat).
"""

from __future__ import annotations

from typing import Any

AGREEMENT = 0.10  # |relative difference| allowed on p50 and p99
JUDGED = ("p50", "p99")


def _rel(fast: float | None, full: float | None) -> float | None:
    if fast is None or full is None or fast == 0:
        return None
    return (full - fast) / fast


def compare(fast: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Side by side figures of two `summarize` results, and whether they agree."""
    rows: list[dict[str, Any]] = []

    def row(name: str, a: float | None, b: float | None, judged: bool = False) -> None:
        rows.append({"figure": name, "fast": a, "full": b, "rel": _rel(a, b), "judged": judged})

    for key in ("p50", "p90", "p99", "max"):
        row(f"duration {key} (s)", fast["durations"][key], full["durations"][key], key in JUDGED)
    for key in ("p50", "p99", "max"):
        row(f"{key} / own bound", fast["node_ratio"][key], full["node_ratio"][key])
    row("makespan (s)", fast["makespan"]["seconds"], full["makespan"]["seconds"])
    row(
        "registry egress / image",
        fast["registry_egress"]["ratio_to_image"],
        full["registry_egress"]["ratio_to_image"],
    )
    row(
        "supernode upload / image",
        fast["supernode_upload"]["ratio_to_image"],
        full["supernode_upload"]["ratio_to_image"],
    )
    if fast["scenario"]["zones"] > 1:
        row(
            "cross-zone / minimum",
            fast["cross_zone"]["ratio_to_minimum"],
            full["cross_zone"]["ratio_to_minimum"],
        )
    row(
        "control messages / node",
        fast["control_messages"]["per_node"],
        full["control_messages"]["per_node"],
    )
    row("completed nodes", fast["completed"], full["completed"])
    row("wall seconds", fast["wall_seconds"], full["wall_seconds"])
    judged = [r for r in rows if r["judged"]]
    agree = all(r["rel"] is not None and abs(r["rel"]) <= AGREEMENT for r in judged)
    return {
        "scenario": fast["scenario"]["name"],
        "nodes": fast["nodes"],
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
    lines = [
        f"fast vs full: {result['scenario']!r}, {result['nodes']} nodes "
        f"(p50 and p99 must agree within {result['tolerance'] * 100:.0f}%)",
        f"{'':<28}{'fast':>10}{'full':>10}{'full/fast-1':>13}",
    ]
    for r in result["rows"]:
        rel = "-" if r["rel"] is None else f"{r['rel'] * 100:+.1f}%"
        mark = "  <- judged" if r["judged"] else ""
        lines.append(f"{r['figure']:<28}{_num(r['fast']):>10}{_num(r['full']):>10}{rel:>13}{mark}")
    lines.append("agree" if result["agree"] else "DISAGREE (see the judged rows)")
    return "\n".join(lines)
