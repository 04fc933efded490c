"""The full-stack storm engine: the real daemons, in one process, on a virtual clock.

What runs is the product: every node is a `p2pd.daemon.Daemon` (registry mirror, blob
manager, swarm, tracker client, piece client and server, store on disk), the supernode is a
`supernode.server.Supernode` (HTTP API, tracker, scheduler, seeder fetching from the
registry), and a runtime on each host pulls the image's layers through its mirror with HTTP
GETs, as containerd would. The registry is a small fake serving generated layers (their
content is real and hashes to their digests, since every layer of the stack verifies).

What is simulated is the same as in the fast engine, and on the same model: all sockets are
`MemoryStream`s of a `Fabric`, whose flows share capacities on `benchmarks.storm.network.Network`
(per-host upload and download, registry egress, supernode uplink, zone links). Time is trio's
`MockClock` with autojump, so a run takes as many simulated seconds as the storm does and as
much wall time as the CPU work (hashing, copying, the daemons' Python) costs. Worker threads
are switched off (`p2pd.offload.inline`): their work runs inline and costs no virtual time.

Scenario details follow the fast engine (`benchmarks.storm.sim.Sim`) exactly where they are
random: the same slow hosts, start times and leavers (and their leave times) for a seed, so
the two engines can be compared node population for node population. A leaver crashes: its
flows are cut, its connections reset, nothing is said to the supernode.

Not modelled: supernode failure (the fast engine has it), latency. Several supernodes work,
but the real daemons pick a blob's supernode by rendezvous hashing, not by layer index.
Trio's scheduler breaks ties between runnable tasks at random, so runs vary a little for a
seed (unlike the fast engine's); one tie the outcome hangs on, the order in which hosts that
start together register each blob, is broken as the fast engine does (`_ArrivalOrder`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import random
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from benchmarks.storm.full.net import Fabric
from benchmarks.storm.full.transport import FabricTransport, Sequencer
from benchmarks.storm.report import Scenario, StormResult, lower_bound
from benchmarks.storm.sim import Sim, naive_completion
from p2pd import offload, wire
from p2pd.config import Address, P2pdConfig
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.daemon import Daemon
from p2pd.http.server import HTTPError, Request, Response, serve_stream
from supernode.config import SupernodeConfig, normalize_upstream
from supernode.server import Supernode

REGISTRY = "registry"
REGISTRY_PORT = 5000
REPOSITORY = "storm/app"
MIRROR_PORT = 65001
PEER_PORT = 65003
SUPERNODE_PORT = 65002
_PATTERN = 1 << 20  # bytes of random pattern a generated layer repeats
_QUIET = ("p2pd", "supernode", "benchmarks.storm.full")
# Longest wait (simulated seconds) of a host's first register of a blob for that of the host
# before it in `_ArrivalOrder`: ample for a message, short should that one never come.
_TURN_WAIT = 0.01


class Stuck(RuntimeError):
    """The storm did not finish within the engine's simulated-time limit."""


@dataclass
class _Layer:
    digest: Digest
    content: bytes
    layout: PieceLayout


def make_layers(scenario: Scenario) -> list[_Layer]:
    """The image's layers: deterministic bytes for the seed, a unique prefix per layer."""
    layers = []
    for i, size in enumerate(scenario.layers):
        rng = random.Random(f"{scenario.seed}/{i}")
        pattern = rng.randbytes(_PATTERN)
        head = f"storm layer {i} of seed {scenario.seed}\n".encode()
        body = head + pattern * (size // _PATTERN + 1)
        content = body[:size]
        digest = Digest.from_bytes(hashlib.sha256(content).digest())
        layers.append(_Layer(digest, content, PieceLayout.for_size(size)))
    return layers


class FakeRegistry:
    """GET/HEAD of the image's blobs, with ``Range: bytes=N-``; bodies go out a piece at a
    time, so that each piece is one flow as in the fast engine's seeder fetch."""

    _PATH = re.compile(rf"/v2/{re.escape(REPOSITORY)}/blobs/(sha256:[0-9a-f]{{64}})")

    def __init__(self, layers: list[_Layer]) -> None:
        self.blobs = {layer.digest: layer for layer in layers}
        self.gets = 0

    async def handle(self, request: Request) -> Response:
        match = self._PATH.fullmatch(request.path)
        if match is None:
            raise HTTPError(404, "no such path")
        layer = self.blobs.get(Digest.parse(match[1]))
        if layer is None:
            raise HTTPError(404, "blob unknown")
        size = len(layer.content)
        start = 0
        status = 200
        headers = [("docker-content-digest", str(layer.digest))]
        wanted = request.header("range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-", wanted)
            if m is None or int(m[1]) >= size:
                raise HTTPError(416, "unsatisfiable range")
            start, status = int(m[1]), 206
            headers.append(("content-range", f"bytes {start}-{size - 1}/{size}"))
        if request.method == "HEAD":
            return Response(status, [*headers, ("content-length", str(size - start))])
        self.gets += 1
        return Response(
            status,
            [*headers, ("content-type", "application/octet-stream")],
            self._chunks(layer, start),
            content_length=size - start,
        )

    @staticmethod
    async def _chunks(layer: _Layer, start: int) -> AsyncIterator[bytes]:
        view = memoryview(layer.content)
        piece = layer.layout.piece_size
        while start < len(view):
            end = min(len(view), (start // piece + 1) * piece)
            yield bytes(view[start:end])
            start = end


@dataclass
class _Node:
    index: int
    name: str
    host: int
    zone: int
    start: float
    up: float
    down: float
    leave_at: float | None = None
    completion: float | None = None
    gone: bool = False
    scope: trio.CancelScope | None = None


class _ArrivalOrder:
    """Hosts that start at the same instant register each blob in the fast engine's order
    (by node index), as `Sequencer` of their daemons' control transports.

    Why: the supernode deals its seeder's stripes (`Scheduler._seeder_offer`) by order of
    arrival in each blob's task, and at one instant that order is a tie. The fast engine
    breaks it by node index, the same in every layer; here trio's scheduler broke it at
    random, for each layer apart, and a storm's p99 hangs on it: 16 hosts, 4 + 12 MiB, one
    host 0.275 s or 0.34 s from run to run (the one last to get a piece of the small layer
    also the one whose large-layer stripe holds a piece it is already fetching: it asks when
    starved, just before peers announce the pieces it lacks, and then waits out the
    announce gap). Given the same orders the fast engine gives the same times (within 2 ms,
    every host, twelve orders tried), so the engines differ in the tie-break, not the model.

    A host's first register of a blob is sent once that of the host before it (same start)
    has been delivered: its bytes then take longer than the supernode's handling of the
    earlier one, which costs no simulated time."""

    def __init__(self, names: list[str], starts: list[float]) -> None:
        self._before: dict[str, str] = {}
        last: dict[float, str] = {}
        for name, start in zip(names, starts, strict=True):
            if start in last:
                self._before[name] = last[start]
            last[start] = name
        self._delivered: dict[tuple[Digest, str], trio.Event] = {}

    def _event(self, digest: Digest, name: str) -> trio.Event:
        return self._delivered.setdefault((digest, name), trio.Event())

    async def turn(self, path: str, body: bytes) -> Callable[[], None]:
        if path != "/v1/register":
            return _nothing
        try:
            message = wire.decode(body, wire.Register)
        except wire.ProtocolError:
            return _nothing  # the supernode says what is wrong with it
        mine = self._event(message.digest, message.peer_id)
        if mine.is_set():
            return _nothing  # registering again (the supernode forgot it): no tie to break
        before = self._before.get(message.peer_id)
        if before is not None:
            with trio.move_on_after(_TURN_WAIT):
                await self._event(message.digest, before).wait()
        return mine.set


def _nothing() -> None:
    pass


class FullStorm:
    """One storm on the real daemons. `run` is synchronous: it owns its trio run."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        workdir: Path | None = None,
        progress: Callable[[int, float], None] | None = None,
        time_limit: float | None = None,
        free_below: int = 0,
    ) -> None:
        if scenario.supernode_failure_at is not None:
            raise ValueError("a supernode failing mid-storm is modelled by the fast engine only")
        if scenario.latency > 0 or scenario.supernode_rate > 0:
            raise ValueError("latency and a supernode message rate: the fast engine only")
        self.s = scenario
        self.free_below = free_below  # see `Fabric`: sends this small cost no time
        self.workdir = workdir
        self.progress = progress
        # The fast engine's draws, so both engines storm with the same population.
        twin = Sim(scenario)
        self.node_up = list(twin.node_up)
        self.node_down = list(twin.node_down)
        self.starts = [n.start for n in twin.nodes]
        horizon = lower_bound(scenario, self.node_up, self.node_down)
        self.leave_at = {
            i: self.starts[i] + twin.rng.uniform(0.05, 0.95) * horizon for i in twin.leave_at
        }
        self.naive = naive_completion(scenario, self.node_up, self.node_down, self.starts)
        self.time_limit = time_limit or 20 * max(self.naive, default=60.0) + 60.0
        self.layers = make_layers(scenario)

    def run(self) -> StormResult:
        wall = time.monotonic()
        with _workdir(self.workdir) as root, _quiet():
            clock = trio.testing.MockClock(autojump_threshold=0)
            result = trio.run(self._main, root, clock=clock)
        result.wall_seconds = time.monotonic() - wall
        return result

    async def _main(self, root: Path) -> StormResult:
        s = self.s
        with offload.inline():
            fabric = Fabric(self.free_below, self.s.sharing)
            registry_host = fabric.add_host(REGISTRY, s.registry_up, math.inf, zone=0)
            if s.zones > 1 and s.zone_link is not None:
                for a in range(s.zones):
                    for b in range(a + 1, s.zones):
                        fabric.set_link(a, b, s.zone_link)
            egress = [0.0]
            timeline: list[tuple[float, float]] = [(0.0, 0.0)]

            def sent(src: int, dst: int, size: int, now: float) -> None:
                if src == registry_host:
                    egress[0] += size
                    timeline.append((now, egress[0]))

            fabric.on_sent = sent
            supernode_names = [f"supernode{k}" for k in range(max(1, s.supernodes))]
            supernode_hosts = [
                fabric.add_host(name, s.supernode_up, s.supernode_down, zone=0)
                for name in supernode_names
            ]
            nodes = []
            for i in range(s.nodes):
                zone = i % max(1, s.zones)
                name = f"n{i}"
                host = fabric.add_host(name, self.node_up[i], self.node_down[i], zone=zone)
                nodes.append(
                    _Node(i, name, host, zone, self.starts[i], self.node_up[i], self.node_down[i])
                )
                nodes[-1].leave_at = self.leave_at.get(i)
            finished = trio.Event()
            state = _Progress(len(nodes), finished, self.progress)
            registry = FakeRegistry(self.layers)
            upstream = f"http://{REGISTRY}:{REGISTRY_PORT}"
            supernodes: list[Supernode] = []
            order = _ArrivalOrder([n.name for n in nodes], self.starts)
            async with trio.open_nursery() as nursery:
                await nursery.start(fabric.run)
                fabric.listen(
                    REGISTRY,
                    REGISTRY_PORT,
                    functools.partial(serve_stream, handler=registry.handle),
                    nursery,
                )
                for k, name in enumerate(supernode_names):
                    sn = await nursery.start(
                        self._supernode, fabric, name, supernode_hosts[k], root, upstream, k
                    )
                    supernodes.append(sn)
                urls = tuple(f"http://{name}:{SUPERNODE_PORT}" for name in supernode_names)
                for node in nodes:
                    nursery.start_soon(self._node, fabric, node, root, urls, upstream, state, order)
                    if node.leave_at is not None:
                        nursery.start_soon(self._leave, fabric, node, state)
                with trio.move_on_after(self.time_limit):
                    await finished.wait()
                fabric.close()
                nursery.cancel_scope.cancel()
            if not finished.is_set():
                raise Stuck(
                    f"{state.done} of {len(nodes)} nodes finished in {self.time_limit:.0f} "
                    "simulated seconds"
                )
            return StormResult(
                scenario=s,
                engine="full",
                start=self.starts,
                completion=[None if n.gone else n.completion for n in nodes],
                node_up=self.node_up,
                node_down=self.node_down,
                node_zone=[n.zone for n in nodes],
                registry_egress_bytes=egress[0],
                registry_egress_timeline=timeline,
                cross_zone_bytes=fabric.net.bytes_between_zones,
                supernode_upload_bytes=sum(fabric.net.bytes_sent(h) for h in supernode_hosts),
                control_messages=sum(sn.messages for sn in supernodes),
                naive_completion=self.naive,
                wall_seconds=0.0,
            )

    async def _supernode(
        self,
        fabric: Fabric,
        name: str,
        host: int,
        root: Path,
        upstream: str,
        k: int,
        *,
        task_status: trio.TaskStatus[Supernode],
    ) -> None:
        config = SupernodeConfig(
            data_dir=root / name,
            allowed_upstreams=(normalize_upstream(upstream),),
            advertise=f"{name}:{SUPERNODE_PORT}",
            seed=self.s.seed * 1000 + k,
            zone="z0",  # its host's zone, as the fast engine's schedulers are told
        )
        sn = Supernode(config, transport=FabricTransport(fabric, host))
        async with sn.client, trio.open_nursery() as nursery:
            await nursery.start(sn.tracker.run)
            sn.tracker.advertise = config.advertise_for(SUPERNODE_PORT)
            fabric.listen(
                name, SUPERNODE_PORT, functools.partial(serve_stream, handler=sn.handle), nursery
            )
            task_status.started(sn)

    async def _node(
        self,
        fabric: Fabric,
        node: _Node,
        root: Path,
        supernodes: tuple[str, ...],
        upstream: str,
        state: _Progress,
        order: Sequencer,
    ) -> None:
        config = P2pdConfig(
            mirror_listen=Address(node.name, MIRROR_PORT),
            peer_listen=Address(node.name, PEER_PORT),
            advertise=Address(node.name, PEER_PORT),
            peer_id=node.name,
            supernodes=supernodes,
            default_upstream=upstream,
            data_dir=root / node.name,
            zone=f"z{node.zone}",
        )
        with trio.CancelScope() as scope:
            node.scope = scope
            async with trio.open_nursery() as nursery:
                await trio.sleep_until(node.start)
                transport = FabricTransport(fabric, node.host, order)
                daemon = Daemon(
                    config,
                    nursery,
                    transport=transport,
                    connect=functools.partial(fabric.connect, node.host),
                    rng=random.Random(f"{self.s.seed}/node/{node.index}"),
                    nic_speed=lambda _host: node.up,  # the host's modelled uplink
                )
                fabric.listen(
                    node.name,
                    MIRROR_PORT,
                    functools.partial(serve_stream, handler=daemon.mirror.handle),
                    nursery,
                )
                fabric.listen(
                    node.name,
                    PEER_PORT,
                    functools.partial(serve_stream, handler=daemon.handle_peer),
                    nursery,
                )
                async with trio.open_nursery() as pulls:
                    for layer in self.layers:
                        pulls.start_soon(_pull, fabric, node, layer)
                node.completion = fabric.now()
                state.node_done(fabric.now())
                await trio.sleep_forever()  # keep serving pieces until the storm is over

    async def _leave(self, fabric: Fabric, node: _Node, state: _Progress) -> None:
        assert node.leave_at is not None
        await trio.sleep_until(node.leave_at)
        if node.completion is not None:
            return
        node.gone = True
        fabric.remove_host(node.name)
        if node.scope is not None:
            node.scope.cancel()
        state.node_done(fabric.now())


class _Progress:
    def __init__(
        self, total: int, finished: trio.Event, report: Callable[[int, float], None] | None
    ) -> None:
        self.total = total
        self.done = 0
        self.finished = finished
        self.report = report

    def node_done(self, now: float) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, now)
        if self.done >= self.total:
            self.finished.set()


class PullFailed(RuntimeError):
    """A runtime's GET through its mirror did not deliver the layer."""


async def _pull(fabric: Fabric, node: _Node, layer: _Layer) -> None:
    """What a container runtime does for one layer: GET it from the mirror, read it whole.

    A bare HTTP/1.1 exchange rather than an HTTP client: the body is only counted, and a
    hundred runtimes copying every byte through a parser would cost wall time for nothing.
    The mirror's answer must be a 200 with the layer's exact Content-Length."""
    stream = await fabric.connect(node.host, node.name, MIRROR_PORT)
    try:
        target = f"/v2/{REPOSITORY}/blobs/{layer.digest}"
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {node.name}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise PullFailed(f"{node.name}: the mirror closed in the head for {layer.digest}")
            head += chunk
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split(" ")[1] != "200":
            raise PullFailed(f"{node.name}: GET {layer.digest} answered {lines[0]!r}")
        lengths = [
            v for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
        ]
        want = len(layer.content)
        if lengths != [str(want)] and [x.strip() for x in lengths] != [str(want)]:
            raise PullFailed(f"{node.name}: {layer.digest} has Content-Length {lengths}")
        got = len(body)
        while got < want:
            chunk = await stream.receive_some(1 << 24)
            if not chunk:
                raise PullFailed(f"{node.name}: {layer.digest} ended at {got} of {want} bytes")
            got += len(chunk)
        if got != want:
            raise PullFailed(f"{node.name}: {layer.digest} gave {got} of {want} bytes")
    finally:
        await stream.aclose()


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    """A fresh directory for the stores, under `given` or the system's temporary directory.

    Not tmpfs by default: a 50-host storm of an 84 MiB image keeps 4 GB of stores, which on
    tmpfs is memory taken from a shared machine (``--workdir /dev/shm`` is faster where that
    is affordable)."""
    with tempfile.TemporaryDirectory(prefix="storm-full-", dir=given) as path:
        yield Path(path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A hundred daemons' info lines and warnings are noise here; errors still show."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
