"""The ``p2pd`` command: the per-host daemon (registry mirror, swarm downloader, piece server)."""

from __future__ import annotations

import argparse
import json
import sys

import trio

from p2pd import __version__, logs
from p2pd.config import ConfigError, P2pdConfig, add_arguments, from_args
from p2pd.core.layout import PieceLayout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pd",
        description=(
            "Per-host daemon of the container-layer swarm: a registry mirror on loopback for "
            "containerd/podman/skopeo that downloads layers through the swarm (falling back to "
            "the registry), verifies every piece and layer, and serves pieces to other hosts."
        ),
    )
    parser.add_argument("--version", action="version", version=f"p2pd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run the daemon until SIGINT/SIGTERM")
    add_arguments(run)
    status = sub.add_parser(
        "status",
        help="print the running daemon's traffic, rates, cache and downloads (its /stats)",
    )
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between the two samples for rates (0: one sample, no rates)",
    )
    status.add_argument("--json", action="store_true", help="print /stats as JSON")
    add_arguments(status)
    preheat = sub.add_parser(
        "preheat",
        help="have the supernodes fetch IMAGE's blobs before a rollout, and wait until ready",
    )
    preheat.add_argument("image", help="e.g. registry.example.com/team/app:1.2 or ubuntu:24.04")
    preheat.add_argument("--platform", default="linux/amd64", help="for multi-arch images")
    preheat.add_argument("--user", metavar="USER:PASSWORD", help="registry credentials")
    preheat.add_argument("--upstream", metavar="URL", help="registry base URL (default: config)")
    preheat.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    add_arguments(preheat)
    layout = sub.add_parser(
        "layout", help="print how a blob of SIZE bytes is cut into pieces (the piece-size rule)"
    )
    layout.add_argument("size", type=int, help="blob size in bytes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "layout":
        try:
            lay = PieceLayout.for_size(args.size)
        except ValueError as exc:
            parser.error(str(exc))
        last = lay.length(lay.count - 1) if lay.count else 0
        print(f"size={lay.total_size} piece_size={lay.piece_size} pieces={lay.count} last={last}")
        return 0
    try:
        config = from_args(args)
    except ConfigError as exc:
        print(f"p2pd: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        return _status(config, args)
    if args.command == "preheat":
        return _preheat(config, args)
    logs.setup(config.log_level_number, config.log_format)
    from p2pd.daemon import main_async

    def reload() -> P2pdConfig:
        return from_args(build_parser().parse_args(argv))

    trio.run(main_async, config, reload)
    return 0


def _preheat(config: P2pdConfig, args: argparse.Namespace) -> int:
    from p2pd.preheat import PreheatError, preheat

    user = tuple(args.user.split(":", 1)) if args.user else None
    if user is not None and len(user) != 2:
        print("p2pd: --user wants USER:PASSWORD", file=sys.stderr)
        return 2
    try:
        states = preheat(
            config,
            args.image,
            upstream=args.upstream,
            user=user,
            platform=args.platform,
            timeout=args.timeout,
        )
    except PreheatError as exc:
        print(f"p2pd: preheat failed: {exc}", file=sys.stderr)
        return 1
    failed = {d: s for d, s in states.items() if s != "ready"}
    for digest, state in failed.items():
        print(f"p2pd: {digest}: {state}", file=sys.stderr)
    return 1 if failed else 0


def _status(config: P2pdConfig, args: argparse.Namespace) -> int:
    from p2pd.status import StatusError, render, sample

    host = config.peer_listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    url = f"http://{format_host(host)}:{config.peer_listen.port}/stats"
    try:
        stats, before, seconds = sample(url, 0.0 if args.json else args.interval)
    except StatusError as exc:
        print(f"p2pd: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else render(stats, before, seconds))
    return 0


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
