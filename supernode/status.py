"""``supernode status``: a running supernode's tasks, peers and progress as a table.

It reads the supernode's ``GET /status`` (the JSON behind the status page). The address comes
from ``--url``, else ``--listen``, ``SUPERNODE_LISTEN`` or the config file's ``listen`` (file:
``--config`` or ``SUPERNODE_CONFIG``), else the default; a wildcard listen address is asked on
loopback. While a blob is being fetched it samples twice, ``--interval`` apart, to show the
fetch rate. Exit status: 0, or 1 with one line saying why when nothing usable answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.status import StatusError, get_json, human
from supernode.config import DEFAULT_LISTEN, format_hostport, parse_hostport


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supernode status",
        description="Print a running supernode's tasks, peers, progress and fetch rates.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="take `listen` from here")
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}")
    parser.add_argument("--url", help="the supernode's base URL, e.g. http://10.0.0.2:65002")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between the two samples for rates while fetching (0: one sample, no rates)",
    )
    parser.add_argument("--json", action="store_true", help="print /status as JSON")
    return parser


def main(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = base_url(args, os.environ if environ is None else environ)
        first = fetch(url)
        second, seconds = None, 0.0
        if args.interval > 0 and not args.json and _fetching(first):
            started = time.monotonic()
            time.sleep(args.interval)
            second = fetch(url)
            seconds = time.monotonic() - started
    except StatusError as exc:
        print(f"supernode status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(first, indent=2))
    else:
        print(render(url, second or first, first if second else None, seconds))
    return 0


def base_url(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    listen = args.listen or environ.get("SUPERNODE_LISTEN", "").strip()
    if not listen:
        path = args.config or (
            Path(environ["SUPERNODE_CONFIG"]) if environ.get("SUPERNODE_CONFIG") else None
        )
        if path is not None:
            try:
                listen = str(tomllib.loads(path.read_text()).get("listen", ""))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise StatusError(f"cannot read {path}: {exc}") from None
    try:
        host, port = parse_hostport(listen or DEFAULT_LISTEN)
    except ValueError as exc:
        raise StatusError(f"bad listen address: {exc}") from None
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{format_hostport(host, port)}"


def fetch(url: str) -> dict[str, Any]:
    return get_json(
        f"{url}/status",
        "supernode",
        "not a supernode?",
        lambda body: isinstance(body.get("tasks"), list),
    )


def _fetching(status: Mapping[str, Any]) -> bool:
    return any(t.get("state") == "fetching" for t in status["tasks"])


def seeded_bytes(task: Mapping[str, Any]) -> int:
    """Bytes of the pieces the supernode holds (its `seeded` count of pieces), cut by the
    task's piece size (a supernode before 'piece_size' was in /status: the rule's)."""
    try:
        size = int(task["size"])
        piece_size = task.get("piece_size")
        layout = (
            PieceLayout.for_size(size) if piece_size is None else PieceLayout(size, int(piece_size))
        )
    except (LayoutError, ValueError, TypeError):
        return 0
    seeded = int(task.get("seeded", 0))
    if seeded >= layout.count:
        return layout.total_size
    return seeded * layout.piece_size


def render(
    url: str,
    status: Mapping[str, Any],
    before: Mapping[str, Any] | None = None,
    seconds: float = 0.0,
) -> str:
    """The table `supernode status` prints; `before` (taken `seconds` earlier) gives rates."""
    tasks: list[Mapping[str, Any]] = status["tasks"]
    # rates for what was being fetched at the first sample (it may have finished since)
    earlier = {
        t["digest"]: seeded_bytes(t)
        for t in (before or {}).get("tasks", [])
        if t.get("state") == "fetching"
    }
    states: dict[str, int] = {}
    for task in tasks:
        states[task["state"]] = states.get(task["state"], 0) + 1
    stats = status.get("scheduler", {})
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    lines = [
        f"supernode {url} (seeder {status.get('seeder') or '?'})",
        f"tasks: {len(tasks)} ({summary}); peers: {stats.get('peers', 0)}; "
        f"parent links: {stats.get('active_links', 0)}",
    ]
    if tasks:
        rows = [("DIGEST", "STATE", "PROGRESS", "SIZE", "RATE", "PEERS", "DONE", "REPOSITORY")]
        failures = []
        total = held = 0
        for task in tasks:
            size, have = int(task["size"]), seeded_bytes(task)
            total, held = total + size, held + have
            rate = "-"
            if task["digest"] in earlier and seconds > 0:
                rate = f"{human((have - earlier[task['digest']]) / seconds)}/s"
            percent = 100.0 if size == 0 else 100.0 * have / size
            rows.append(
                (
                    str(task["digest"])[:19],
                    str(task["state"]),
                    f"{percent:.1f}%",
                    human(size),
                    rate,
                    str(task.get("peers", 0)),
                    str(task.get("peers_complete", 0)),
                    str(task.get("repository", "")),
                )
            )
            if task.get("failure"):
                failures.append(f"  {task['digest']}: {task['failure']}")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.append("")
        lines.append(f"held: {human(held)} of {human(total)}")
        if failures:
            lines.append("failures:")
            lines += failures
    return "\n".join(lines)
