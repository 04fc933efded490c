"""Prometheus metrics of p2pd, read from the daemon's own counters at scrape time.

The counters live where the work happens (the blob manager, the piece server, the swarm, the
supernode's tracker); a custom collector turns them into Prometheus families when ``/metrics``
is scraped, so the data path never touches the metrics library. The supernode uses the same
collector with its own tables. Each daemon has its own registry (no global state), so
several daemons in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


Table = dict[str, tuple[str, str]]  # metric name -> (help text, key in the read() dict)

P2PD_COUNTERS: Table = {
    "p2pd_registry_bytes": ("bytes fetched straight from registries", "bytes_from_registry"),
    "p2pd_peer_bytes_received": ("bytes of pieces received from peers", "bytes_from_peers"),
    "p2pd_peer_bytes_sent": ("bytes of pieces served to other hosts", "bytes_to_peers"),
    "p2pd_client_bytes": ("blob bytes served to container runtimes", "bytes_to_clients"),
    "p2pd_cache_hits": ("blob requests served from the complete cache", "cache_hits"),
    "p2pd_pieces_verified": ("pieces that matched their hash", "pieces_verified"),
    "p2pd_pieces_failed": ("pieces that failed their hash", "bad_pieces"),
    "p2pd_back_to_source": ("downloads handed to the registry fallback", "back_to_source"),
    "p2pd_downloads_completed": ("downloads verified and cached", "downloads_completed"),
    "p2pd_downloads_failed": ("downloads that failed", "downloads_failed"),
    "p2pd_announce_batches": (
        "messages to supernodes carrying several downloads' announces (p2pd.coalescer)",
        "announce_batches",
    ),
    "p2pd_announces_batched": ("announces that went in those messages", "announces_batched"),
    "p2pd_uncached_streams": (
        "blobs streamed from the registry uncached: no room in the cache or on the disk",
        "uncached",
    ),
}
P2PD_GAUGES: Table = {
    "p2pd_downloads_active": ("downloads in progress", "downloads_active"),
    "p2pd_cache_bytes": ("bytes in the cache (complete and partial)", "cache_bytes"),
    "p2pd_uploads_active": ("piece uploads in progress", "uploads_active"),
}


class _Collector(Collector):
    def __init__(
        self, read: Callable[[], dict[str, float]], counters: Table, gauges: Table
    ) -> None:
        self.read = read
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        values = self.read()
        for name, (doc, key) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=values.get(key, 0))
        for name, (doc, key) in self.gauges.items():
            yield GaugeMetricFamily(name, doc, value=values.get(key, 0))


def registry_for(
    read: Callable[[], dict[str, float]],
    counters: Table = P2PD_COUNTERS,
    gauges: Table = P2PD_GAUGES,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(read, counters, gauges))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
