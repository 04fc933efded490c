"""The ``supernode`` command: run the tracker and first seed until SIGINT or SIGTERM.

Configuration comes from ``--config FILE`` (TOML, see `supernode.config`) with the flags below
overriding it. A bad configuration exits 2 with a message naming the option; a start-up
failure (the port is taken, the data directory is not writable) exits 1; a signal shuts down
cleanly (open connections and fetches are cancelled) and exits 0. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from p2pd import __version__, sdnotify
from p2pd.store import StorageError
from supernode.config import DEFAULT_LISTEN, LOG_LEVELS, ConfigError, SupernodeConfig, load_config

log = logging.getLogger("supernode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supernode",
        description=(
            "Tracker and first seed of the container-layer swarm: fetches each layer from an "
            "allowed upstream registry once, serves its pieces, and tells p2pd peers who holds "
            "what. Runs until SIGINT/SIGTERM."
        ),
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML config file; the flags below override it"
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address of the control API and piece server (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="address peers dial for pieces (default: the listen address; required when "
        "listening on 0.0.0.0 or ::)",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="cache directory (required here or in the file)"
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        nargs="+",
        action="extend",
        help="registry base URL the supernode may fetch from (repeatable; replaces the file's "
        "allowed_upstreams; at least one is required)",
    )
    parser.add_argument(
        "--quota", metavar="BYTES", type=int, help="cache quota in bytes (default: unlimited)"
    )
    parser.add_argument(
        "--cluster-secret-file",
        metavar="FILE",
        help="the fleet's shared secret: control messages and piece requests must be signed",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log verbosity (default info)")
    parser.add_argument("--version", action="version", version=f"supernode {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {
        "listen": args.listen,
        "advertise": args.advertise,
        "data_dir": args.data_dir,
        "allowed_upstreams": args.upstream,
        "quota_bytes": args.quota,
        "log_level": args.log_level,
        "cluster_secret_file": args.cluster_secret_file,
    }
    try:
        config = load_config(args.config, {k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        print(f"supernode: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request URL at INFO, redirects included, and a redirect to blob
    # storage carries a signature in its query: keep those out of the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.INFO)
    try:
        trio.run(_serve_until_signalled, config)
    except BaseException as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise
        log.error("cannot run: %s", failure)
        return 1
    log.info("stopped")
    return 0


async def _serve_until_signalled(config: SupernodeConfig) -> None:
    from supernode.server import Supernode  # keeps `--help` fast

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        supernode = Supernode(config)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(supernode.run)
            sdnotify.notify(f"READY=1\nSTATUS=listening on port {port}")
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


def _startup_failure(exc: BaseException) -> BaseException | None:
    """The OS or storage error inside `exc` (possibly an exception group), if that is what
    stopped the daemon: an operator's problem, reported without a traceback."""
    if isinstance(exc, OSError | StorageError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
