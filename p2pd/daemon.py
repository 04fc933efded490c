"""The p2pd daemon: wires the cache, the swarm, the registry fallback and the two listeners.

    mirror listener (loopback)  ── Mirror ──▶ BlobManager ──▶ Swarm ──▶ parents' piece servers
                                                   │            └──▶ supernode (control)
                                                   └──▶ BackSource ──▶ registry
    peer listener               ── PieceServer (pieces this host holds), /stats, /healthz

Everything runs in one trio nursery; cancelling it (SIGINT/SIGTERM) stops the listeners, and
running downloads keep their verified pieces on disk for a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from p2pd import metrics, nic, piecehttp, sdnotify
from p2pd.blobs import BackSource, BlobManager, Filler
from p2pd.clusterauth import ClusterAuth
from p2pd.config import P2pdConfig
from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import PieceLayout
from p2pd.core.session import SessionConfig
from p2pd.core.uplink import upload_slots_for
from p2pd.http.server import (
    PIECE_CONGESTION,
    Handler,
    Request,
    Response,
    ServerLimits,
    bound_port,
    prefer_congestion,
    serve,
)
from p2pd.mirror import Mirror, upstream_client
from p2pd.peers import STREAM_AHEAD, Connector, PieceClient, PieceServer, RateLimiter
from p2pd.store import BlobStore
from p2pd.swarm import Swarm, SwarmConfig
from p2pd.tracker import ControlClient

log = logging.getLogger(__name__)

# Upper bound of the random wait before falling back to the registry: a fleet that loses its
# supernode at once does not hit the registry at the same instant.
FALLBACK_JITTER = 2.0


@dataclass(frozen=True, slots=True)
class Ports:
    mirror: int
    peer: int


@dataclass(frozen=True, slots=True)
class Running:
    daemon: Daemon
    ports: Ports


# Options SIGHUP applies to a running daemon.
_RELOADABLE = ("upload_rate", "download_rate", "log_level")


class Daemon:
    """`transport`, `connect` and `rng` replace the network and the randomness (the storm's
    full-stack engine runs many daemons in one process on an in-memory network); by default
    the daemon uses real sockets and an unseeded generator. `nic_speed` gives, for the advertised
    host, the speed of the interface other hosts reach this one on, in bytes/s (None: unknown);
    by default the kernel's figure (`p2pd.nic`)."""

    def __init__(
        self,
        config: P2pdConfig,
        nursery: trio.Nursery,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        connect: Connector | None = None,
        rng: random.Random | None = None,
        nic_speed: Callable[[str], float | None] = nic.uplink_of,
    ) -> None:
        self.config = config
        self.nic_speed = nic_speed(config.advertise.host)
        rng = rng or random.Random()
        self.store = BlobStore(config.data_dir, config.quota_bytes or None)
        self.upstream = upstream_client(transport=transport)
        self.control = httpx.AsyncClient(timeout=10.0, transport=transport)
        # On real sockets control messages skip httpx (p2pd.tracker.ControlClient); an
        # injected network (the storm's full-stack engine) keeps them on its transport.
        self.control_client = ControlClient(self.control, raw=transport is None, connect=connect)
        self.auth = ClusterAuth.from_file(config.cluster_secret_file)
        if not self.auth.enabled:
            log.warning(
                "no cluster_secret_file: any host that reaches %s can fetch the pieces held here",
                config.peer_listen,
            )
        self.pieces = PieceClient(
            RateLimiter(config.download_rate), auth=self.auth, connect=connect
        )
        self.swarm = Swarm(
            SwarmConfig(
                peer_id=config.peer_id,
                advertise=str(config.advertise),
                zone=config.zone,
                upload_slots=self.upload_slots(config),
                session=SessionConfig(
                    stall_timeout=config.back_to_source_after, stream_ahead=STREAM_AHEAD
                ),
            ),
            self.control_client,
            self.pieces,
            list(config.supernodes),
            nursery,
            rng=random.Random(rng.random()),
            auth=self.auth,
        )
        fillers: list[Filler] = [self.swarm, BackSource(self.upstream)]
        self.blobs = BlobManager(
            self.store, nursery, fillers, rng=rng, fallback_jitter=FALLBACK_JITTER
        )
        self.mirror = Mirror(config, self.upstream, self.blobs)
        self.piece_server = PieceServer(
            self.blobs, config.upload_slots, RateLimiter(config.upload_rate), auth=self.auth
        )
        self.metrics = metrics.registry_for(self.counters)

    def counters(self) -> dict[str, float]:
        blobs = self.blobs
        return {
            "bytes_to_peers": self.piece_server.bytes_served,
            "bytes_from_peers": blobs.bytes_from.get("peer", 0),
            "bytes_from_registry": blobs.bytes_from.get("registry", 0),
            "bytes_to_clients": blobs.bytes_to_clients,
            "cache_hits": blobs.cache_hits,
            "pieces_verified": self.swarm.pieces_verified,
            "bad_pieces": self.swarm.bad_pieces,
            "announce_batches": self.swarm.coalescer.batches,
            "announces_batched": self.swarm.coalescer.batched,
            "back_to_source": blobs.back_to_source,
            "uncached": blobs.uncached,
            "downloads_completed": blobs.completed,
            "downloads_failed": blobs.failed,
            "downloads_active": len(blobs.downloads),
            "uploads_active": self.piece_server.busy,
            "cache_bytes": self.store.usage(),
            "cache_quota": self.config.quota_bytes,
        }

    def stats(self) -> dict[str, object]:
        """/stats: the counters, and each download in progress (`p2pd status` shows them)."""
        downloads = [
            {
                "digest": str(d.digest),
                "size": d.layout.total_size,
                "have": _have_bytes(d.layout, d.have),
                "sources": dict(sorted(d.sources.items())),
            }
            for d in list(self.blobs.downloads.values())
        ]
        return {
            "peer_id": self.config.peer_id,
            "upload_slots": self.swarm.config.upload_slots,
            **self.counters(),
            "downloads": downloads,
        }

    def upload_slots(self, config: P2pdConfig) -> int:
        """Children this host offers to feed per blob: one per 100 Mbit/s of uplink (the
        ``upload_rate`` limit if set, else the interface's speed), ``upload_slots`` at most
        (`p2pd.core.uplink`)."""
        uplink = config.upload_rate or self.nic_speed or 0.0
        slots = upload_slots_for(uplink, config.upload_slots)
        log.info(
            "upload slots per blob: %d (uplink %s, upload_slots %d)",
            slots,
            f"{uplink * 8 / 1e6:.0f} Mbit/s" if uplink else "unknown",
            config.upload_slots,
        )
        return slots

    def reload(self, config: P2pdConfig) -> None:
        """SIGHUP: take the new rate limits and log level; the rest needs a restart."""
        self.piece_server.limiter.rate = config.upload_rate
        if config.upload_rate != self.config.upload_rate:  # downloads registering from now on
            slots = self.upload_slots(
                dataclasses.replace(self.config, upload_rate=config.upload_rate)
            )
            self.swarm.config = dataclasses.replace(self.swarm.config, upload_slots=slots)
        self.pieces.limiter.rate = config.download_rate
        logging.getLogger().setLevel(config.log_level_number)
        changed = [
            f.name
            for f in dataclasses.fields(config)
            if f.name not in _RELOADABLE and getattr(config, f.name) != getattr(self.config, f.name)
        ]
        if changed:
            log.warning("reload: %s change only with a restart", ", ".join(changed))
        self.config = dataclasses.replace(
            self.config, **{name: getattr(config, name) for name in _RELOADABLE}
        )
        log.info(
            "reloaded: upload_rate=%d download_rate=%d log_level=%s",
            config.upload_rate,
            config.download_rate,
            config.log_level,
        )

    async def handle_peer(self, request: Request) -> Response:
        if request.method == "GET" and request.path == "/stats":
            body = json.dumps(self.stats()).encode()
            return Response(200, [("content-type", "application/json")], body)
        if request.method == "GET" and request.path == "/metrics":
            return Response(
                200, [("content-type", metrics.CONTENT_TYPE)], metrics.render(self.metrics)
            )
        return await self.piece_server.handle(request)

    async def aclose(self) -> None:
        self.store.close_readers()
        await self.upstream.aclose()
        await self.control_client.aclose()
        await self.control.aclose()
        await self.pieces.aclose()


def _have_bytes(layout: PieceLayout, have: Bitfield) -> int:
    """Bytes of the pieces in `have`: every piece is full-sized but the last. Counted, not
    summed piece by piece: /stats is polled while a download runs (the data-plane benchmark
    asks every 20 ms), on the loop that also drives the transfers."""
    if layout.count == 0:
        return 0
    last = layout.count - 1
    short = layout.piece_size - layout.length(last) if last in have else 0
    return have.count() * layout.piece_size - short


async def run_daemon(
    config: P2pdConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled; `task_status` receives the daemon once both listeners listen.
    `transport`: for the registry and the supernodes (see `Daemon`), the real network if
    None."""
    daemon: Daemon | None = None
    try:
        async with trio.open_nursery() as nursery:
            daemon = Daemon(config, nursery, transport=transport)
            mirror = await nursery.start(
                _serve, daemon.mirror.handle, config.mirror_listen.host, config.mirror_listen.port
            )
            peer = await nursery.start(
                _serve_peers, daemon, config.peer_listen.host, config.peer_listen.port
            )
            log.info(
                "p2pd %s: mirror on %s:%d, pieces on %s:%d, supernodes %s",
                config.peer_id,
                config.mirror_listen.host,
                mirror,
                config.peer_listen.host,
                peer,
                ", ".join(config.supernodes) or "none (registry only)",
            )
            task_status.started(Running(daemon, Ports(mirror, peer)))
            await trio.sleep_forever()
    finally:
        # once every task is done: seeding tasks send their leave on the way out
        if daemon is not None:
            with trio.CancelScope(shield=True):
                await daemon.aclose()


async def _serve(
    handler: Handler,
    host: str,
    port: int,
    congestion: str | None = None,
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """`serve`, reporting the bound port instead of the listeners."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(serve, handler, host, port, congestion=congestion)
        )
        task_status.started(bound_port(listeners))


async def _serve_peers(
    daemon: Daemon, host: str, port: int, *, task_status: trio.TaskStatus[int]
) -> None:
    """The peer port: piece GETs on the lean path (`p2pd.piecehttp`), the rest through
    `Daemon.handle_peer` on the general server; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    prefer_congestion(listeners, PIECE_CONGESTION)  # pieces go out on these (see there)
    limits = ServerLimits()

    async def on_connection(stream: trio.SocketStream) -> None:
        await piecehttp.serve_connection(stream, daemon.piece_server, daemon.handle_peer, limits)

    async with trio.open_nursery() as nursery:
        task_status.started(bound_port(listeners))
        await trio.serve_listeners(on_connection, listeners, handler_nursery=nursery)


async def main_async(config: P2pdConfig, reload: Callable[[], P2pdConfig] | None = None) -> None:
    """Run the daemon as a service: READY=1 to systemd once both listeners listen, SIGHUP
    reloads what can change live (`reload` re-reads the configuration), SIGINT/SIGTERM stop
    it (STOPPING=1); a download cut short keeps its verified pieces for the next start."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(run_daemon, config)
            sdnotify.notify(
                f"READY=1\nSTATUS=mirror on port {running.ports.mirror}, "
                f"pieces on port {running.ports.peer}"
            )
            async for signum in signals:
                if signum == signal.SIGHUP:
                    sdnotify.notify("RELOADING=1")
                    try:
                        if reload is not None:
                            running.daemon.reload(reload())
                    except Exception as exc:
                        log.error("reload failed, keeping the running configuration: %s", exc)
                    sdnotify.notify("READY=1")
                    continue
                log.info("received %s; stopping", signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
