"""The ``p2pd`` command: the per-host daemon (registry mirror, swarm downloader, piece server).

This release ships the sans-IO scheduling core and the control-message wire format that the
daemon is built on; the daemon itself (mirror, peer server, swarm download) is not in this
release yet, and the command says so instead of pretending to run.
"""

from __future__ import annotations

import argparse
import sys

from p2pd import __version__
from p2pd.core.layout import PieceLayout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pd",
        description=(
            "Per-host daemon of the container-layer swarm. NOT YET RUNNABLE: this release "
            "contains the scheduling core and wire protocol only; the registry mirror, peer "
            "server and swarm download come in a later release."
        ),
    )
    parser.add_argument("--version", action="version", version=f"p2pd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    parser.print_help(sys.stderr)
    print("\np2pd: the daemon is not implemented in this release", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
