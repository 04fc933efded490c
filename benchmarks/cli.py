"""The ``p2p-bench`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p-bench",
        description="Benchmarks of the container-layer swarm. Figures are printed and written "
        "as JSON; they are measurements, not pass/fail tests.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    micro = sub.add_parser(
        "micro",
        help="core microbenchmarks: scheduler decisions/s (1000 peers x 256 pieces), manifest "
        "encode/decode (2560 pieces), piece verification vs raw xxh3-128",
    )
    micro.add_argument("--out", type=Path, help="also write the JSON report to this file")
    micro.add_argument("--seed", type=int, default=1, help="seed for the scheduler run")
    micro.add_argument(
        "--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)"
    )
    demo = sub.add_parser(
        "demo",
        help="real registry + supernode + N p2pd daemons on loopback; containerd pulls a "
        "generated image through each at once, then straight from the registry",
        add_help=False,
    )
    del demo  # parsed by benchmarks.demo itself
    sub.add_parser(
        "hosts",
        help="a bandwidth-limited fleet in network namespaces (root): real registry, supernode, "
        "p2pd and containerd per host; the same storm through p2pd and straight from the registry",
        add_help=False,
    )
    sub.add_parser(
        "dataplane",
        help="piece transfer between two p2pd against the raw ceiling, supernode control "
        "messages per second, p2pd peak RSS on a 1 GiB layer",
        add_help=False,
    )
    sub.add_parser(
        "storm",
        help="simulate a thousand-node pull storm on the real scheduling core; compare with "
        "the lower bound and a naive pull in the same run",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        # the demo and the storm simulator have parsers (and --help) of their own
        from benchmarks.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["storm"]:
        from benchmarks.storm.cli import main as storm_main

        return storm_main(argv[1:])
    if argv[:1] == ["hosts"]:
        from benchmarks.hosts.bench import main as hosts_main

        return hosts_main(argv[1:])
    if argv[:1] == ["dataplane"]:
        from benchmarks.hosts.micro_dataplane import main as dataplane_main

        return dataplane_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "micro":
        from benchmarks.micro import run_all

        report = run_all(seed=args.seed, quick=args.quick)
        text = json.dumps(report, indent=2)
        print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 0
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
