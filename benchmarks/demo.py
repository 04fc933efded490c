"""The demo (`make demo`): a real pull storm in miniature, on this machine, on loopback.

A real docker-registry holds a generated image; one supernode and N p2pd daemons run as real
processes; on every host a real containerd pulls the image through that host's p2pd, all at
once, with containerd's fallback to the registry disabled (so every byte came through p2pd).
For comparison, the same number of containerds then pull the image straight from the registry,
all at once. The report: time per host, what the registry served against the image size,
what the hosts sent each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.harness.clients import Containerd, pull_concurrently, write_hosts_toml
from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import make_image, push_image
from benchmarks.harness.procs import HarnessError
from benchmarks.harness.registry import Registry

REF = "example.test/demo/app:v1"
MB = 1_000_000


def run(hosts: int, layers_mb: list[int], workdir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        print(f"building an image of {'+'.join(map(str, layers_mb))} MB …", flush=True)
        registry = stack.enter_context(Registry(workdir / "registry"))
        image = make_image(1, [n * MB for n in layers_mb], workdir=workdir / "image")
        push_image(registry.url, "demo/app", "v1", image)
        baseline = registry.blob_bytes_served()

        print(f"starting a supernode and {hosts} p2pd daemons …", flush=True)
        supernode = stack.enter_context(SupernodeProcess(workdir / "supernode", [registry.url]))
        fleet = []
        for i in range(hosts):
            p2pd = stack.enter_context(
                P2pdProcess(
                    workdir / "hosts",
                    f"host{i}",
                    supernodes=[supernode.url],
                    registries={"example.test": registry.url},
                )
            )
            hosts_dir = workdir / "hosts" / f"host{i}-hosts.d"
            write_hosts_toml(
                hosts_dir, "example.test", registry.url, p2pd.mirror_url, fallback=False
            )
            containerd = stack.enter_context(Containerd(workdir / "hosts" / f"host{i}-ctd"))
            fleet.append((p2pd, hosts_dir, containerd))

        print(f"pulling {REF} on {hosts} hosts at once through p2pd …", flush=True)
        started = time.monotonic()
        times = pull_concurrently({p.name: (c, d) for p, d, c in fleet}, REF)
        storm_seconds = time.monotonic() - started
        _check(times)
        swarm_bytes = registry.blob_bytes_served() - baseline
        stats = {p2pd.name: p2pd.stats() for p2pd, _, _ in fleet}

        print(f"pulling it on {hosts} hosts at once straight from the registry …", flush=True)
        direct_dir = workdir / "direct-hosts.d"
        write_hosts_toml(direct_dir, "example.test", registry.url)
        direct_fleet = {
            f"host{i}": (
                stack.enter_context(Containerd(workdir / "direct" / f"ctd{i}")),
                direct_dir,
            )
            for i in range(hosts)
        }
        before = registry.blob_bytes_served()
        started = time.monotonic()
        direct_times = pull_concurrently(direct_fleet, REF)
        direct_storm_seconds = time.monotonic() - started
        _check(direct_times)
        direct_bytes = registry.blob_bytes_served() - before

    return {
        "hosts": hosts,
        "image_bytes": image.total_size,
        "layers_mb": layers_mb,
        "pull_seconds": times,
        "storm_seconds": round(storm_seconds, 3),
        "registry_bytes_for_storm": swarm_bytes,
        "registry_bytes_ratio": round(swarm_bytes / image.total_size, 4),
        "bytes_between_peers": sum(s["bytes_to_peers"] for s in stats.values()),
        "daemon_stats": stats,
        "direct_pull_seconds": direct_times,
        "direct_storm_seconds": round(direct_storm_seconds, 3),
        "direct_registry_bytes": direct_bytes,
    }


def _check(results: dict[str, float | str]) -> None:
    failed = {name: r for name, r in results.items() if isinstance(r, str)}
    if failed:
        raise HarnessError(f"pulls failed: {failed}")


def print_report(r: dict[str, Any]) -> None:
    size = r["image_bytes"]
    print()
    print(f"image: {size / MB:.1f} MB in layers of {r['layers_mb']} MB; {r['hosts']} hosts")
    print(f"{'host':8} {'pull s':>7} {'from peers MB':>14} {'to peers MB':>12} {'registry MB':>12}")
    for name, seconds in sorted(r["pull_seconds"].items()):
        s = r["daemon_stats"][name]
        print(
            f"{name:8} {seconds:7.2f} {s['bytes_from_peers'] / MB:14.1f} "
            f"{s['bytes_to_peers'] / MB:12.1f} {s['bytes_from_registry'] / MB:12.1f}"
        )
    print(
        f"registry served {r['registry_bytes_for_storm'] / MB:.1f} MB for {r['hosts']} pulls "
        f"= {r['registry_bytes_ratio']:.2f}x the image (naive: {r['hosts']}.00x)"
    )
    print(f"hosts sent each other {r['bytes_between_peers'] / MB:.1f} MB")
    print(
        f"whole storm through p2pd: {r['storm_seconds']:.2f} s; the same storm straight from "
        f"the registry: {r['direct_storm_seconds']:.2f} s, which served "
        f"{r['direct_registry_bytes'] / MB:.1f} MB"
    )
    print(
        "(loopback on one machine: the registry is not a bottleneck here, so this shows the "
        "registry bytes saved and our overhead, not the speed-up of a real fleet)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2p-bench demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hosts", type=int, default=4, help="p2pd hosts (default 4)")
    parser.add_argument("--layers-mb", default="1,20,100", help="comma-separated layer sizes")
    parser.add_argument("--out", type=Path, default=Path("bench-out/demo.json"))
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers_mb.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="p2p-demo-") as tmp:
        report = run(args.hosts, layers, Path(tmp))
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
