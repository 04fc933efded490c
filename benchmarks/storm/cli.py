"""``p2p-bench storm``: simulate a pull storm on the real scheduling core.

Prints a table, writes JSON (and a PNG plot with ``--plot``). Every figure is also given as a
ratio to the lower bound computed for the same scenario in the same run, next to the time a
naive pull (every host straight from the registry) takes on the same network model.

Engines: ``fast`` (default) is the discrete-event simulator on the scheduling core; ``full``
runs the real p2pd daemons and supernode in one process on an in-memory network with the same
model, on a virtual clock (up to ~100 nodes and small images: every byte is really moved,
hashed and written, under ``--workdir``); ``compare`` runs both and prints them side by side
(the issue's honesty check: p50 and p99 must agree within 10%).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.storm.compare import compare, format_comparison
from benchmarks.storm.network import SHARING
from benchmarks.storm.presets import GBIT, MBIT, PRESETS, MiB
from benchmarks.storm.report import (
    ProgressBar,
    Scenario,
    StormResult,
    format_table,
    jsonable,
    plot_png,
    summarize,
    write_json,
)
from benchmarks.storm.sim import Sim
from p2pd.core.scheduler import SchedulerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2p-bench storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="storm-a")
    p.add_argument("--nodes", type=int, help="number of hosts")
    p.add_argument("--layers-mib", help="comma-separated layer sizes in MiB")
    p.add_argument("--node-gbit", type=float, help="host upload and download, Gbit/s")
    p.add_argument("--registry-gbit", type=float, help="registry egress, Gbit/s")
    p.add_argument("--supernode-gbit", type=float, help="supernode up and down, Gbit/s")
    p.add_argument("--supernodes", type=int, help="number of supernodes")
    p.add_argument("--slow-share", type=float, help="share of slow hosts (0..1)")
    p.add_argument("--slow-mbit", type=float, default=100.0, help="slow hosts' up/down, Mbit/s")
    p.add_argument("--churn", type=float, help="share of hosts that leave mid-pull (0..1)")
    p.add_argument("--zones", type=int, help="number of zones (registry, supernode in zone 0)")
    p.add_argument("--zone-link-gbit", type=float, help="capacity between two zones, Gbit/s")
    p.add_argument("--arrival-spread", type=float, help="seconds over which hosts start")
    p.add_argument(
        "--supernode-failure-at",
        type=float,
        metavar="SECONDS",
        help="supernode 0 dies at this time (fast engine only)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        help="round-trip time of a request (control call, piece request), ms (fast engine only)",
    )
    p.add_argument(
        "--supernode-msgs-per-s",
        type=float,
        help="control messages one supernode answers per second; calls queue behind "
        "(default: no limit; fast engine only)",
    )
    p.add_argument(
        "--sharing",
        choices=SHARING,
        help="how a host's capacity is shared among its transfers: 'fill' (water-filling, "
        "near max-min fair, as competing TCP flows; the default) or 'equal' (an equal split; "
        "pessimistic: a transfer held back elsewhere leaves its share unused)",
    )
    p.add_argument(
        "--no-batch",
        action="store_true",
        help="every announce a message of its own, and pacing that counts each download as "
        "a caller (as before batching; fast engine only)",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="children watch parents that offer nothing more (p2pd's watch_parents, off by "
        "default: see p2pd.swarm.SwarmConfig; fast engine only)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--engine",
        choices=("fast", "full", "compare"),
        default="fast",
        help="fast simulator, full stack, or both side by side",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="compare: runs per engine, seeds --seed, --seed+1, ...; the means are compared",
    )
    p.add_argument(
        "--free-below",
        type=int,
        default=0,
        metavar="BYTES",
        help="full engine: sends under BYTES (control messages, HTTP heads) take no time, as in "
        "the fast engine (default 0: every byte is paced)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="full engine: where the stores go (default: the system temp dir)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out/storm.json"), help="JSON report")
    p.add_argument("--plot", type=Path, help="also write a PNG plot here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = PRESETS[args.preset]
    changes: dict[str, object] = {}
    if args.nodes is not None:
        changes["nodes"] = args.nodes
    if args.layers_mib:
        changes["layers"] = tuple(int(float(x) * MiB) for x in args.layers_mib.split(",") if x)
    if args.node_gbit is not None:
        changes["node_up"] = changes["node_down"] = args.node_gbit * GBIT
    if args.registry_gbit is not None:
        changes["registry_up"] = args.registry_gbit * GBIT
    if args.supernode_gbit is not None:
        changes["supernode_up"] = changes["supernode_down"] = args.supernode_gbit * GBIT
    if args.supernodes is not None:
        changes["supernodes"] = args.supernodes
    if args.slow_share is not None:
        changes["slow_share"] = args.slow_share
        changes["slow_up"] = changes["slow_down"] = args.slow_mbit * MBIT
    if args.churn is not None:
        changes["churn"] = args.churn
    if args.zones is not None:
        changes["zones"] = args.zones
    if args.zone_link_gbit is not None:
        changes["zone_link"] = args.zone_link_gbit * GBIT
    if args.arrival_spread is not None:
        changes["arrival_spread"] = args.arrival_spread
    if args.supernode_failure_at is not None:
        changes["supernode_failure_at"] = args.supernode_failure_at
    if args.latency_ms is not None:
        changes["latency"] = args.latency_ms / 1000
    if args.supernode_msgs_per_s is not None:
        changes["supernode_rate"] = args.supernode_msgs_per_s
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.sharing is not None:
        changes["sharing"] = args.sharing
    scenario = replace(s, **changes) if changes else s  # type: ignore[arg-type]
    if scenario.latency < 0 or scenario.supernode_rate < 0:
        print("p2p-bench storm: latency and supernode rate must not be negative", file=sys.stderr)
        return 2
    fast_only = [
        what
        for what, used in (
            ("a supernode failure", scenario.supernode_failure_at is not None),
            ("latency", scenario.latency > 0),
            ("a supernode message rate", scenario.supernode_rate > 0),
        )
        if used
    ]
    if args.no_batch:
        fast_only.append("announces without batching")
    if args.watch:
        fast_only.append("watches")
    if args.engine != "fast" and fast_only:
        print(
            f"p2p-bench storm: {', '.join(fast_only)}: modelled by the fast engine only",
            file=sys.stderr,
        )
        return 2
    # Make the output directories before the run, not after it: a storm of 10 000 hosts takes
    # ten minutes, and a missing bench-out/ used to lose it at the very end.
    for path in (args.out, args.plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.engine != "compare":
        result = _run(scenario, args.engine, args)
        summary = summarize(result)
        print(format_table(summary))
        write_json(summary, result, args.out)
        print(f"\nJSON: {args.out}")
        if args.plot is not None:
            plot_png(result, args.plot)
            print(f"plot: {args.plot}")
        return 0
    summaries: dict[str, list[dict[str, Any]]] = {"fast": [], "full": []}
    for k in range(max(1, args.repeat)):
        run_scenario = replace(scenario, seed=scenario.seed + k)
        for engine in ("fast", "full"):
            result = _run(run_scenario, engine, args)
            summary = summarize(result)
            summaries[engine].append(summary)
            tag = engine if args.repeat <= 1 else f"{engine}-seed{run_scenario.seed}"
            if args.repeat <= 1:
                print(format_table(summary) + "\n")
            else:
                d = summary["durations"]
                print(
                    f"seed {run_scenario.seed} {engine}: p50 {d['p50']:.3f} s  "
                    f"p99 {d['p99']:.3f} s  wall {summary['wall_seconds']:.1f} s"
                )
            path = args.out.with_name(f"{args.out.stem}-{tag}{args.out.suffix}")
            write_json(summary, result, path)
            if args.plot is not None:
                plot = args.plot.with_name(f"{args.plot.stem}-{tag}{args.plot.suffix}")
                plot_png(result, plot)
    verdict = compare(summaries["fast"], summaries["full"])
    print("\n" + format_comparison(verdict))
    with args.out.open("w", encoding="utf-8") as out:
        json.dump(jsonable({"comparison": verdict, **summaries}), out, indent=1, allow_nan=False)
        out.write("\n")
    print(f"\nJSON: {args.out}")
    return 0


def _run(scenario: Scenario, engine: str, args: argparse.Namespace) -> StormResult:
    bar = None if args.no_progress else ProgressBar(scenario.nodes)
    progress = bar.update if bar else None
    try:
        if engine == "full":
            from benchmarks.storm.full.engine import FullStorm

            return FullStorm(
                scenario, workdir=args.workdir, progress=progress, free_below=args.free_below
            ).run()
        if args.no_batch:
            config = SchedulerConfig(message_overhead=0.0)
            return Sim(
                scenario, progress=progress, batch=False, scheduler_config=config, watch=args.watch
            ).run()
        return Sim(scenario, progress=progress, watch=args.watch).run()
    finally:
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
