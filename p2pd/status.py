"""``p2pd status``: the local daemon's traffic, cache and downloads, readable at a glance.

It reads the daemon's ``GET /stats`` on the peer port (JSON: the same counters as
``/metrics`` plus the downloads in progress). With ``--interval`` above 0 it samples twice to
show rates. The raw counters follow the summary, one ``name value`` per line, for scripts
(``--json`` prints the JSON itself).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx


class StatusError(Exception):
    """Nothing usable answered; the text says where and why."""


def human(n: float) -> str:
    """Bytes in decimal units, the way link speeds and disk sizes are usually quoted."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def get_json(
    url: str, who: str, hint: str, valid: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """GET `url` and return its JSON object; `StatusError` naming `who` (the daemon asked)
    and `hint` (what else the address may be) when nothing answers or the answer is not the
    JSON object `valid` accepts."""
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError as exc:
        raise StatusError(f"no {who} answers at {url}: {exc}") from None
    if response.status_code != 200:
        raise StatusError(f"{url} answered {response.status_code}: {hint}")
    try:
        body = response.json()
    except ValueError:
        raise StatusError(f"{url} did not answer JSON: {hint}") from None
    if not isinstance(body, dict) or not valid(body):
        raise StatusError(f"{url} has no {who} status in its answer: {hint}")
    return body


def fetch(url: str) -> dict[str, Any]:
    return get_json(url, "daemon", "not p2pd's peer port?", lambda b: "bytes_to_clients" in b)


def sample(url: str, interval: float) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
    """(latest, earlier or None, seconds between them)."""
    first = fetch(url)
    if interval <= 0:
        return first, None, 0.0
    started = time.monotonic()
    time.sleep(interval)
    return fetch(url), first, time.monotonic() - started


_TRAFFIC = (
    ("from the registry", "bytes_from_registry"),
    ("from peers", "bytes_from_peers"),
    ("to peers", "bytes_to_peers"),
    ("to runtimes", "bytes_to_clients"),
)


def render(
    stats: Mapping[str, Any], before: Mapping[str, Any] | None = None, seconds: float = 0.0
) -> str:
    def num(key: str) -> int:
        value = stats.get(key, 0)
        return int(value) if isinstance(value, int | float) else 0

    lines = [
        f"p2pd {stats.get('peer_id', '?')}",
        f"cache: {human(num('cache_bytes'))}"
        + (f" of {human(num('cache_quota'))}" if num("cache_quota") else "")
        + f", {num('cache_hits')} hits, {num('uncached')} streamed uncached; downloads: "
        f"{num('downloads_active')} active, {num('downloads_completed')} completed, "
        f"{num('downloads_failed')} failed; uploads active: {num('uploads_active')}",
        f"pieces verified: {num('pieces_verified')}, bad: {num('bad_pieces')}; "
        f"fallbacks to the registry: {num('back_to_source')}",
        "",
    ]
    rows: list[tuple[str, ...]] = [("TRAFFIC", "TOTAL", "RATE")]
    for label, key in _TRAFFIC:
        rate = "-"
        if before is not None and seconds > 0:
            rate = f"{human((num(key) - int(before.get(key, 0))) / seconds)}/s"
        rows.append((label, human(num(key)), rate))
    downloads = stats.get("downloads")
    if isinstance(downloads, list) and downloads:
        earlier = {d["digest"]: d["have"] for d in (before or {}).get("downloads", [])}
        lines += [*_table(rows), ""]
        rows = [("DOWNLOAD", "PROGRESS", "SIZE", "RATE", "SOURCES")]
        for d in downloads:
            size, have = int(d["size"]), int(d["have"])
            rate = "-"
            if d["digest"] in earlier and seconds > 0:
                rate = f"{human((have - earlier[d['digest']]) / seconds)}/s"
            sources = ", ".join(f"{k}={human(v)}" for k, v in d.get("sources", {}).items())
            percent = 100.0 if size == 0 else 100.0 * have / size
            rows.append(
                (str(d["digest"])[:19], f"{percent:.1f}%", human(size), rate, sources or "-")
            )
    lines += _table(rows)
    lines += ["", "counters:"]
    counters = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    width = max(map(len, counters), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in counters.items()]
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
