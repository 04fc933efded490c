"""The ``supernode`` command: tracker and first seed.

This release ships the scheduling state (``p2pd.core.scheduler``) the supernode is built on;
the server itself is not in this release yet, and the command says so.
"""

from __future__ import annotations

import argparse
import sys

from p2pd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supernode",
        description=(
            "Tracker and first seed of the container-layer swarm. NOT YET RUNNABLE: this "
            "release contains the scheduling core only; the HTTP server and seeder come in a "
            "later release."
        ),
    )
    parser.add_argument("--version", action="version", version=f"supernode {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help(sys.stderr)
    print("\nsupernode: the server is not implemented in this release", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
