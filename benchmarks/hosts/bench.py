"""`p2p-bench hosts`: a pull storm on real hosts with real bandwidth limits.

One invocation builds a fleet in network namespaces (`benchmarks.hosts.cluster`): a real
docker-registry, a supernode and N p2pd hosts, each link limited with ``tc tbf``. It pushes a
generated image, then:

1. **storm through p2pd** - every host's containerd (``ctr images pull`` inside the host's
   namespace, the registry fallback disabled) pulls the image through its p2pd, all at once;
2. **direct storm** - the same hosts, with cold containerds, pull it straight from the
   registry, all at once;
3. **one host alone** - host 1 pulls a second image (same layer sizes, never seen by the
   supernode: a cold swarm) through p2pd, then, cold again, straight from the registry.

It reports per-host completion (p50, p99, max; seconds from the first start, ``ctr`` start to
exit, so the manifest round trips and the unpack are in), registry egress against the image
size (from the registry's access log), the Kumar-Ross lower bound
T >= max(F/u_s, F/d_min, N F/(u_s + sum u_i)) for the configured links
(`benchmarks.storm.report.storm_bound`, with u_s = registry + supernode upload), the direct
times and the ratios, as a table, JSON and a PNG (the storm report's plot). The JSON also
holds what explains the times: the supernode's and each host's link bytes and CPU seconds in
the storm, p2pd's ``/stats`` and peak RSS, and ``storm_summary``, the run in the storm
simulator's format (judged there against the simulator's own goals). Goals (issue 5):
p99 <= 1.5x the bound, registry egress 1.00x the image, one host through p2pd <= 1.10x its
direct pull. Figures, not pass/fail: the exit status is 0 whenever the run completed.

Needs root (namespaces), docker-registry and containerd; cleans up everything it made, also
on failure, Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.harness.image import Image, make_image
from benchmarks.harness.netns import (
    delete_leftovers,
    proc_net_bytes,
    require_root,
    signals_raise,
)
from benchmarks.harness.procs import HarnessError
from benchmarks.hosts.cluster import (
    Cluster,
    ClusterConfig,
    EgressSampler,
    PullOutcome,
    check_pulls,
    cpu_seconds,
)
from benchmarks.storm.report import (
    Scenario,
    StormResult,
    jsonable,
    percentile,
    plot_png,
    storm_bound,
    summarize,
)

T = TypeVar("T")

MB = 1_000_000
MIB = 1024 * 1024
STORM_REPO, SOLO_REPO, TAG = "bench/storm", "bench/solo", "v1"
GOAL_P99 = 1.5
GOAL_EGRESS = 1.0
GOAL_SOLO = 1.10


def mbit_to_bytes(mbit: float | None) -> float:
    """Link rate in bytes/s; an unlimited link is infinitely fast."""
    return math.inf if not mbit else mbit * 1e6 / 8  # tc's mbit is 10^6 bit/s


def _times(outcomes: dict[str, PullOutcome]) -> dict[str, float]:
    return {name: round(o.end, 3) for name, o in outcomes.items()}


def _stats(values: list[float], bound: float) -> dict[str, Any]:
    ordered = sorted(values)
    out: dict[str, Any] = {}
    for name, p in (("p50", 50), ("p99", 99), ("max", 100)):
        v = percentile(ordered, p)
        out[name] = v
        out[f"{name}_ratio"] = v / bound if v is not None and 0 < bound < math.inf else None
    return out


def _cluster_config(args: argparse.Namespace, hosts: int) -> ClusterConfig:
    return ClusterConfig(
        hosts=hosts,
        host_up_mbit=args.host_up_mbit or args.host_mbit,
        host_down_mbit=args.host_down_mbit or args.host_mbit,
        registry_mbit=args.registry_mbit,
        supernode_mbit=args.supernode_mbit,
        tbf_latency=args.tbf_latency,
    )


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], StormResult]:
    load_before = os.getloadavg()
    sizes = [round(float(x) * MB) for x in args.layers_mb.split(",") if x]
    config = _cluster_config(args, args.hosts)
    print(f"building images of {args.layers_mb} MB …", flush=True)
    storm_image = make_image(args.seed, sizes, workdir=workdir / "image-storm")
    solo_images = [
        make_image(args.seed + 1 + k, sizes, workdir=workdir / f"image-solo{k}")
        for k in range(args.solo_runs)
    ]
    wall = time.monotonic()
    print(f"building {args.hosts} hosts + registry + supernode in namespaces …", flush=True)
    with Cluster(workdir / "fleet", config) as cluster:
        cluster.push(storm_image, STORM_REPO, TAG)
        for k, image in enumerate(solo_images):
            cluster.push(image, f"{SOLO_REPO}{k}", TAG)
        storm_ref = f"example.test/{STORM_REPO}:{TAG}"

        print(f"storm: {args.hosts} hosts pull through p2pd at once …", flush=True)
        before = cluster.registry.blob_bytes_by_remote()
        links_before = link_counters(cluster)
        cpu_before = cpu_usage(cluster)
        sampler = EgressSampler(cluster.registry.pid)
        sampler.start()
        started = time.monotonic()
        p2p = cluster.pull_all(storm_ref, via_p2pd=True, timeout=args.timeout)
        timeline = sampler.stop()
        cpu = {k: round(v - cpu_before[k], 2) for k, v in cpu_usage(cluster).items()}
        check_pulls(p2p, "storm through p2pd")
        after = cluster.registry.blob_bytes_by_remote()
        by_remote = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        links = {
            name: {"received": rx - links_before[name][0], "sent": tx - links_before[name][1]}
            for name, (rx, tx) in link_counters(cluster).items()
        }
        stats = {h.name: h.stats() for h in cluster.hosts}
        rss = {h.name: h.peak_rss() for h in cluster.hosts}

        print(f"direct: {args.hosts} hosts pull straight from the registry at once …", flush=True)
        cluster.reset_containerds()
        before_direct = sum(cluster.registry.blob_bytes_by_remote().values())
        direct = cluster.pull_all(storm_ref, via_p2pd=False, timeout=args.timeout)
        check_pulls(direct, "direct storm")
        direct_egress = sum(cluster.registry.blob_bytes_by_remote().values()) - before_direct

        solo = solo_runs(args, cluster)
    wall = time.monotonic() - wall

    result = storm_result(args, config, storm_image, p2p, direct, by_remote, timeline, started)
    result.wall_seconds = wall
    result.supernode_upload_bytes = float(links["supernode"]["sent"])
    report = build_report(args, config, storm_image, result, p2p, direct, by_remote)
    report["direct"]["registry_egress_bytes"] = direct_egress
    report["direct"]["registry_egress_ratio"] = direct_egress / storm_image.total_size
    report["solo"] = solo_report(solo)
    report["daemon_stats"] = stats
    report["storm_link_bytes"] = links
    report["storm_cpu_seconds"] = cpu
    report["supernode_upload_ratio"] = links["supernode"]["sent"] / storm_image.total_size
    report["p2pd_peak_rss_bytes"] = rss
    report["goals"]["solo"] = _goal(report["solo"]["ratio"], GOAL_SOLO)
    report["all_goals_met"] = all(g["met"] for g in report["goals"].values())
    report["wall_seconds"] = round(wall, 1)
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    report["workdir"] = str(workdir)
    return report, result


def run_solo(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Only the one-host comparisons (``--solo-only``): a fleet of one host, no storm.

    The fleet is the same as the full run's (registry, supernode, host 1, same links), so the
    figure is the full run's solo figure without the 8-host storm before it.
    """
    load_before = os.getloadavg()
    sizes = [round(float(x) * MB) for x in args.layers_mb.split(",") if x]
    config = _cluster_config(args, 1)
    print(f"building images of {args.layers_mb} MB …", flush=True)
    images = [
        make_image(args.seed + 1 + k, sizes, workdir=workdir / f"image-solo{k}")
        for k in range(args.solo_runs)
    ]
    wall = time.monotonic()
    with Cluster(workdir / "fleet", config) as cluster:
        for k, image in enumerate(images):
            cluster.push(image, f"{SOLO_REPO}{k}", TAG)
        cpu_before = cpu_usage(cluster)
        solo = solo_runs(args, cluster)
        cpu = {k: round(v - cpu_before[k], 2) for k, v in cpu_usage(cluster).items()}
        stats = cluster.hosts[0].stats()
    report: dict[str, Any] = {
        "config": {"solo_only": True, **vars_report(args, config)},
        "solo": solo_report(solo),
        "daemon_stats": {"h1": stats},
        # all runs, through p2pd and direct (the supernode and p2pd work in the former only)
        "cpu_seconds": cpu,
        "wall_seconds": round(time.monotonic() - wall, 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "workdir": str(workdir),
    }
    report["goals"] = {"solo": _goal(report["solo"]["ratio"], GOAL_SOLO)}
    return report


def solo_runs(args: argparse.Namespace, cluster: Cluster) -> list[dict[str, float]]:
    """Host 1 pulls each solo image through p2pd, then (cold again) straight from the registry."""
    solo: list[dict[str, float]] = []
    first = cluster.hosts[:1]
    for k in range(args.solo_runs):
        print(f"one host alone, run {k + 1}: through p2pd, then direct …", flush=True)
        ref = f"example.test/{SOLO_REPO}{k}:{TAG}"
        cluster.reset_containerds(first)
        alone = cluster.pull_all(ref, first, via_p2pd=True, timeout=args.timeout)
        check_pulls(alone, "one host through p2pd")
        cluster.reset_containerds(first)
        plain = cluster.pull_all(ref, first, via_p2pd=False, timeout=args.timeout)
        check_pulls(plain, "one host direct")
        p, d = alone["h1"].seconds, plain["h1"].seconds
        solo.append({"p2pd_seconds": round(p, 3), "direct_seconds": round(d, 3)})
        print(f"  {p:.2f} s through p2pd, {d:.2f} s direct ({p / d:.3f}x)", flush=True)
    return solo


def vars_report(args: argparse.Namespace, config: ClusterConfig) -> dict[str, Any]:
    """The links and image of a run, for the JSON."""
    return {
        "host_up_mbit": config.host_up_mbit,
        "host_down_mbit": config.host_down_mbit,
        "registry_mbit": config.registry_mbit,
        "supernode_mbit": config.supernode_mbit,
        "tbf": {"burst": config.tbf_burst, "latency": config.tbf_latency},
        "layers_mb": args.layers_mb,
        "seed": args.seed,
    }


def format_solo(r: dict[str, Any]) -> str:
    """The ``--solo-only`` report: each run and the median ratio against the goal."""
    c = r["config"]
    lines = [
        f"one host at {c['host_up_mbit']}/{c['host_down_mbit']} Mbit/s up/down, registry "
        f"{c['registry_mbit']} Mbit/s, supernode {c['supernode_mbit']} Mbit/s; "
        f"layers {c['layers_mb']} MB"
    ]
    for run_ in r["solo"]["runs"]:
        lines.append(
            f"one host alone: {run_['p2pd_seconds']:.2f} s through p2pd, "
            f"{run_['direct_seconds']:.2f} s direct "
            f"({run_['p2pd_seconds'] / run_['direct_seconds']:.3f}x)"
        )
    cpu = r["cpu_seconds"]
    lines.append(
        f"CPU seconds over all runs: supernode {cpu['supernode']:.1f}, p2pd {cpu['h1']:.1f}, "
        f"registry {cpu['registry']:.1f}"
    )
    load = r["load_average"]
    lines.append(
        f"machine load average (1 min) {load['before'][0]:.1f} before, {load['after'][0]:.1f} "
        f"after, on {os.cpu_count()} CPUs"
    )
    g = r["goals"]["solo"]
    value = "-" if g["value"] is None else f"{g['value']:.3f}x"
    verdict = "met" if g["met"] else "MISSED"
    lines.append(f"goal  one host: p2pd / direct (median) {value} <= {g['limit']:.2f}x  {verdict}")
    return "\n".join(lines)


def link_counters(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """(received, sent) bytes on eth0 of the supernode and of every host, from /proc.

    Link level, so TCP/IP headers (about 3%) and control calls are in.
    """
    assert cluster.supernode is not None
    counters = {"supernode": proc_net_bytes(cluster.supernode.pid)}
    for host in cluster.hosts:
        counters[host.name] = proc_net_bytes(host.process.pid)
    return counters


def cpu_usage(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far of the registry, the supernode and every p2pd."""
    assert cluster.supernode is not None
    usage = {
        "registry": cpu_seconds(cluster.registry.pid),
        "supernode": cpu_seconds(cluster.supernode.pid),
    }
    for host in cluster.hosts:
        usage[host.name] = cpu_seconds(host.process.pid)
    return usage


def storm_result(
    args: argparse.Namespace,
    config: ClusterConfig,
    image: Image,
    p2p: dict[str, PullOutcome],
    direct: dict[str, PullOutcome],
    by_remote: dict[str, int],
    timeline: list[tuple[float, int]],
    started: float,
) -> StormResult:
    """The run in the storm simulator's terms, so its bound, summary and plot apply as is."""
    up = mbit_to_bytes(config.host_up_mbit)
    down = mbit_to_bytes(config.host_down_mbit)
    scenario = Scenario(
        name=f"hosts-{args.hosts}x{args.host_mbit or 'unlimited'}mbit",
        nodes=args.hosts,
        layers=tuple(b.size for b in (image.config, *image.layers)),
        node_up=up,
        node_down=down,
        registry_up=mbit_to_bytes(config.registry_mbit),
        supernode_up=mbit_to_bytes(config.supernode_mbit),
        supernode_down=mbit_to_bytes(config.supernode_mbit),
        seed=args.seed,
    )
    n = len(p2p)
    return StormResult(
        scenario=scenario,
        engine="real hosts",
        start=[0.0] * n,
        completion=[o.end for o in p2p.values()],
        node_up=[up] * n,
        node_down=[down] * n,
        registry_egress_bytes=float(sum(by_remote.values())),
        # link-level bytes (headers included), from the registry namespace's eth0
        registry_egress_timeline=[(t - started, float(b)) for t, b in timeline],
        cross_zone_bytes=0.0,
        supernode_upload_bytes=0.0,  # filled in by the caller (link level)
        control_messages=0,
        naive_completion=[o.end for o in direct.values()],
        wall_seconds=0.0,
    )


def _goal(value: float | None, limit: float) -> dict[str, Any]:
    return {"value": value, "limit": limit, "met": value is not None and value <= limit}


def build_report(
    args: argparse.Namespace,
    config: ClusterConfig,
    image: Image,
    result: StormResult,
    p2p: dict[str, PullOutcome],
    direct: dict[str, PullOutcome],
    by_remote: dict[str, int],
) -> dict[str, Any]:
    bound = storm_bound(result.scenario, result.node_up, result.node_down)
    t = bound.seconds
    egress = sum(by_remote.values())
    p2p_stats = _stats([o.end for o in p2p.values()], t)
    direct_stats = _stats([o.end for o in direct.values()], t)
    return {
        "config": {
            "hosts": args.hosts,
            "host_up_mbit": config.host_up_mbit,
            "host_down_mbit": config.host_down_mbit,
            "registry_mbit": config.registry_mbit,
            "supernode_mbit": config.supernode_mbit,
            "tbf": {"burst": config.tbf_burst, "latency": config.tbf_latency},
            "layers_mb": args.layers_mb,
            "seed": args.seed,
        },
        "image": {
            "bytes": image.total_size,
            "blobs": {b.digest: b.size for b in (image.config, *image.layers)},
        },
        "bound": {
            "seconds": t,
            "dominant": bound.dominant,
            "terms": bound.terms(),
            "source_upload_bytes_per_s": bound.source_upload,
        },
        "p2p": {"per_host_seconds": _times(p2p), **p2p_stats},
        "direct": {"per_host_seconds": _times(direct), **direct_stats},
        "speedup_p99": (direct_stats["p99"] / p2p_stats["p99"] if p2p_stats["p99"] else None),
        "registry_egress": {
            "bytes": egress,
            "ratio_to_image": egress / image.total_size,
            "by_client": by_remote,
        },
        "goals": {
            "p99": _goal(p2p_stats["p99_ratio"], GOAL_P99),
            "registry_egress": _goal(egress / image.total_size, GOAL_EGRESS),
        },
        "storm_summary": summarize(result),
    }


def solo_report(runs: list[dict[str, float]]) -> dict[str, Any]:
    if not runs:
        return {"runs": [], "ratio": None}
    ratios = sorted(r["p2pd_seconds"] / r["direct_seconds"] for r in runs)
    return {"runs": runs, "ratio": ratios[len(ratios) // 2]}  # the median (upper) run


def format_report(r: dict[str, Any]) -> str:
    c, b = r["config"], r["bound"]
    terms = "  ".join(f"{k} {v:.2f}" for k, v in b["terms"].items() if v)
    lines = [
        f"{c['hosts']} hosts at {c['host_up_mbit']}/{c['host_down_mbit']} Mbit/s up/down, "
        f"registry {c['registry_mbit']} Mbit/s, supernode {c['supernode_mbit']} Mbit/s; "
        f"image {r['image']['bytes'] / MB:.1f} MB ({c['layers_mb']} MB)",
        f"lower bound {b['seconds']:.2f} s ({b['dominant']} dominates; {terms})",
        "",
        f"{'host':8}{'p2pd s':>10}{'direct s':>10}{'from peers MB':>15}{'to peers MB':>13}"
        f"{'link sent MB':>14}{'peak RSS MiB':>14}",
    ]
    for name, seconds in r["p2p"]["per_host_seconds"].items():
        s = r["daemon_stats"][name]
        lines.append(
            f"{name:8}{seconds:10.2f}{r['direct']['per_host_seconds'][name]:10.2f}"
            f"{s['bytes_from_peers'] / MB:15.1f}{s['bytes_to_peers'] / MB:13.1f}"
            f"{r['storm_link_bytes'][name]['sent'] / MB:14.1f}"
            f"{r['p2pd_peak_rss_bytes'][name] / MIB:14.1f}"
        )
    lines.append("")
    for label, key in (("through p2pd", "p2p"), ("direct", "direct")):
        s = r[key]
        lines.append(
            f"{label:14} p50 {s['p50']:7.2f} s  p99 {s['p99']:7.2f} s  max {s['max']:7.2f} s"
            f"   ({s['p50_ratio']:.2f}x / {s['p99_ratio']:.2f}x / {s['max_ratio']:.2f}x bound)"
        )
    lines.append(
        f"supernode sent {r['storm_link_bytes']['supernode']['sent'] / MB:.1f} MB in the storm "
        f"= {r['supernode_upload_ratio']:.2f}x the image (link level)"
    )
    cpu = r["storm_cpu_seconds"]
    p2pd_cpu = sum(v for k, v in cpu.items() if k not in ("registry", "supernode"))
    lines.append(
        f"CPU seconds in the storm: supernode {cpu['supernode']:.1f}, registry "
        f"{cpu['registry']:.1f}, all p2pd {p2pd_cpu:.1f} (wall {r['p2p']['max']:.1f} s)"
    )
    e = r["registry_egress"]
    lines.append(
        f"registry egress: {e['bytes'] / MB:.1f} MB = {e['ratio_to_image']:.3f}x the image "
        f"(direct storm: {r['direct']['registry_egress_ratio']:.2f}x)"
    )
    for run_ in r["solo"]["runs"]:
        lines.append(
            f"one host alone: {run_['p2pd_seconds']:.2f} s through p2pd, "
            f"{run_['direct_seconds']:.2f} s direct"
        )
    load = r["load_average"]
    lines.append(
        f"machine load average (1 min) {load['before'][0]:.1f} before, {load['after'][0]:.1f} "
        f"after, on {os.cpu_count()} CPUs; work dir {r['workdir']}"
    )
    lines += ["", "goals"]
    labels = {
        "p99": "p99 / lower bound",
        "registry_egress": "registry egress / image",
        "solo": "one host: p2pd / direct",
    }
    for key, g in r["goals"].items():
        value = "-" if g["value"] is None else f"{g['value']:.3f}x"
        verdict = "met" if g["met"] else "MISSED"
        lines.append(f"  {labels[key]:<26}{value:>9}  <= {g['limit']:.2f}x  {verdict}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p-bench hosts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hosts", type=int, default=8, help="p2pd hosts (default 8)")
    parser.add_argument(
        "--host-mbit", type=float, default=100.0, help="each host's link, each way (default 100)"
    )
    parser.add_argument("--host-up-mbit", type=float, help="override the upload rate")
    parser.add_argument("--host-down-mbit", type=float, help="override the download rate")
    parser.add_argument(
        "--registry-mbit", type=float, default=100.0, help="registry egress (default 100)"
    )
    parser.add_argument(
        "--supernode-mbit", type=float, default=100.0, help="supernode link (default 100)"
    )
    parser.add_argument(
        "--layers-mb", default="1,20,100", help="comma-separated layer sizes (default 1,20,100)"
    )
    parser.add_argument(
        "--solo-runs", type=int, default=1, help="one-host comparisons, each on a fresh image"
    )
    parser.add_argument(
        "--solo-only",
        action="store_true",
        help="only the one-host comparisons (a fleet of host 1 alone; no storm, no plot)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tbf-latency", default="50ms", help="tbf queue bound (default 50ms)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one pull")
    parser.add_argument(
        "--delete-leftovers",
        action="store_true",
        help="first delete namespaces left by killed runs (their creating process is gone)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/hosts.json"))
    parser.add_argument("--png", type=Path, help="plot file (default: the JSON path with .png)")
    parser.add_argument(
        "--keep", type=Path, help="work in this directory and keep it (logs, configs)"
    )
    parser.add_argument(
        "--tmp-base",
        type=Path,
        help="where the temporary work directory goes, e.g. /dev/shm: the hosts of a real "
        "fleet have a disk each, the fleet here shares one (default: the system's temp dir)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.solo_only and args.solo_runs < 1:
        print("p2p-bench hosts: --solo-only needs --solo-runs >= 1", file=sys.stderr)
        return 2
    if args.hosts < 1 or args.solo_runs < 0:
        print("p2p-bench hosts: --hosts must be >= 1 and --solo-runs >= 0", file=sys.stderr)
        return 2
    try:
        require_root("p2p-bench hosts")
    except HarnessError as exc:
        print(f"p2p-bench hosts: {exc}", file=sys.stderr)
        return 2
    if args.delete_leftovers:
        for name in delete_leftovers():
            print(f"deleted leftover namespace {name}")
    if args.solo_only:
        return main_solo(args)
    with signals_raise():
        report, result = _in_workdir(args, "p2p-hosts-", run)
    print()
    print(format_report(report))
    _write_json(args.out, report)
    png = args.png or args.out.with_suffix(".png")
    plot_png(result, png)
    print(f"\nJSON: {args.out}\nplot: {png}")
    return 0


def _in_workdir(
    args: argparse.Namespace, prefix: str, work: Callable[[argparse.Namespace, Path], T]
) -> T:
    """Run `work` in `--keep`'s directory (kept), or in a temporary one under `--tmp-base`."""
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return work(args, args.keep)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=args.tmp_base) as tmp:
        return work(args, Path(tmp))


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")


def main_solo(args: argparse.Namespace) -> int:
    with signals_raise():
        report = _in_workdir(args, "p2p-solo-", run_solo)
    print()
    print(format_solo(report))
    _write_json(args.out, report)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
