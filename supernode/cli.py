"""The ``supernode`` command: run the tracker and first seed, or show a running one's status.

``supernode [run] [FLAGS]`` runs until SIGINT or SIGTERM. Configuration comes from the TOML
file (``--config FILE`` or ``SUPERNODE_CONFIG``, see `supernode.config`), then the
``SUPERNODE_*`` environment variables, then the flags below (one per option). A bad
configuration exits 2 with a message naming the option (and the variable or flag that set it);
a start-up failure (the port is taken, the data directory is not writable) exits 1; a signal
shuts down cleanly (open connections and fetches are cancelled) and exits 0. Logs go to
stderr, as text or one JSON object per line (``--log-format json``).

``supernode status`` prints a running supernode's tasks, peers and progress (`supernode.status`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from p2pd import __version__, excgroups, logs, sdnotify
from p2pd.store import StorageError
from supernode.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    OPTIONS,
    ConfigError,
    Option,
    SupernodeConfig,
    load_config,
    parse_bool,
)

log = logging.getLogger("supernode")


_METAVARS = {
    "listen": "HOST:PORT",
    "advertise": "HOST:PORT",
    "data_dir": "DIR",
    "cluster_secret_file": "FILE",
    "seeder_id": "ID",
    "scheduler.control_rate": "PER_SECOND",
}


def _dest(option: Option) -> str:
    return option.name.replace(".", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supernode",
        description=(
            "Tracker and first seed of the container-layer swarm: fetches each layer from an "
            "allowed upstream registry once, serves its pieces, and tells p2pd peers who holds "
            "what. Runs until SIGINT/SIGTERM."
        ),
        epilog=(
            "Every option is also an environment variable: SUPERNODE_ and its name in capitals "
            "(SUPERNODE_QUOTA_BYTES, SUPERNODE_FETCH_RETRIES, SUPERNODE_CONFIG; lists "
            "comma-separated). Precedence: file < environment < flags. "
            "`supernode status --help`: show a running supernode's tasks."
        ),
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML config file; the flags below override it"
    )
    choices = {"log_level": LOG_LEVELS, "log_format": LOG_FORMATS}
    for option in OPTIONS:
        flags = [option.flag]
        if option.name == "quota_bytes":
            flags.append("--quota-bytes")
        kwargs: dict[str, object] = {"dest": _dest(option), "help": option.help}
        if option.kind is list:
            kwargs.update(nargs="+", action="extend", metavar="URL")
        elif option.kind is bool:
            kwargs.update(type=parse_bool, metavar="true|false")
        elif option.kind in (int, float):
            metavar = "N" if option.kind is int else "SECONDS"
            kwargs.update(type=option.kind, metavar=_METAVARS.get(option.name, metavar))
        elif option.name in choices:
            kwargs.update(choices=choices[option.name])
        else:
            kwargs.update(metavar=_METAVARS.get(option.name, option.name.upper()))
        parser.add_argument(*flags, **kwargs)  # type: ignore[arg-type]
    parser.add_argument("--version", action="version", version=f"supernode {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        from supernode.status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    flags = {o.name: getattr(args, _dest(o)) for o in OPTIONS}
    try:
        config = load_config(
            args.config, {k: v for k, v in flags.items() if v is not None}, os.environ
        )
    except ConfigError as exc:
        print(f"supernode: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(logging.getLevelNamesMapping()[config.log_level.upper()], config.log_format)
    # httpcore's debug lines carry request targets; redirects to blob storage carry a
    # signature in their query: keep those out of the log.
    logging.getLogger("httpcore").setLevel(logging.INFO)
    try:
        trio.run(_serve_until_signalled, config)
    except BaseException as exc:
        # the OS or storage error that stopped it: an operator's problem, no traceback
        failure = excgroups.find(exc, OSError, StorageError)
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


if __name__ == "__main__":
    sys.exit(main())
