"""The fast storm simulator: the real scheduling core on a simulated network, event by event.

What is real: every scheduling decision. Each virtual host runs one `DownloadSession` (with its
`PiecePicker`) per layer -- the very objects `p2pd` drives -- and each supernode is a real
`Scheduler`. Layers get the daemon's `PieceLayout`; the seeder publishes pieces as its own
fetch from the registry completes them, as the real seeder does; sessions batch announces at
the daemon's intervals and report bad or unreachable parents, and a piece from a peer of the
child's zone brings that peer's bitfield as it was when the transfer started, as the daemon's
piece responses do (`p2pd.peers.HAVE_HEADER`; ``piggyback=False`` leaves it out), and a pull
watches each parent of its zone that offers it nothing it lacks, hearing of that parent's next
piece half a round trip after it (`p2pd.peers.KNOWN_HEADER`), with ``watch=True`` (off, as
in the daemon: `p2pd.swarm.SwarmConfig.watch_parents`).

What is simulated: bytes. A transfer is a flow of a size on `Network` (per-host upload and
download capacity shared among active flows, the registry's egress, zone links), and time is a
heap of events, not trio. The same scenario is also run with every host pulling straight from
the registry (the naive time), on the same network model.

Deterministic for a seed: all randomness comes from ``random.Random(scenario.seed)`` streams,
events at equal times are ordered by a sequence number, and no set of strings is iterated
where order matters.

A supernode failing mid-storm (``Scenario.supernode_failure_at``: supernode 0 dies then) is
modelled as the daemon meets it: its host leaves the network (transfers from its seeder break),
its scheduler state is lost, and each pull of its layers finds out at its next control call --
connection refused -- and registers with the next live supernode, carrying the pieces it holds
(`p2pd.tracker.TrackerSession`); that supernode's seeder fetches the layer from the registry
again. With no live supernode left the pull falls back to the registry for what it lacks.
Layers are dealt to supernodes by index, not by the daemon's rendezvous hashing.

Latency and a busy supernode (``Scenario.latency``, ``Scenario.supernode_rate``), when set: a
pull's control call (register, announce, reports) reaches its supernode half a round trip after
it is sent, waits there behind the calls that came first (each takes ``1 / supernode_rate`` of
the supernode's time), and its reply arrives half a round trip after it was decided; meanwhile
the pull waits for the reply as the daemon's loop does (transfers go on, their results are
handled when it resumes). A poll's reports and its announce travel as one call of that many
messages (the daemon sends them one after another: a round trip each). A host's announces
for its layers at one supernode travel together, as p2pd's coalescer sends them (with
``batch``, the default): when one pull's announce is due, the host's other pulls at that
supernode that may announce now (`DownloadSession.may_ride_along`) ride along, and the call
counts one control message and costs ``message_overhead + k x (1 - message_overhead)``
messages of the supernode's time for k announces (`SchedulerConfig.message_overhead`, measured
with ``p2p-bench dataplane``); every pull in it waits for the reply. A piece starts
flowing one round trip after it is asked for. The last announce of a finished layer is sent
without waiting. Calls queued at a supernode that dies are refused at once. With both at 0
every call is answered at once, as before. Not modelled: TCP dynamics, latency of the
seeder's registry fetch and of the naive pulls (one request per blob).
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.storm.network import Network
from benchmarks.storm.report import Scenario, StormResult, lower_bound
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.picker import Request
from p2pd.core.scheduler import Assignment, Scheduler, SchedulerConfig
from p2pd.core.session import (
    REPORT_UNREACHABLE,
    DownloadSession,
    SessionConfig,
)
from p2pd.core.uplink import upload_slots_for
from p2pd.peers import LEAD_SECONDS

SEEDER = "supernode"
# Samples of the download links' use per lower bound (`Sim._sample`)
USE_SAMPLES = 100


@dataclass
class _Layer:
    index: int
    digest: Digest
    layout: PieceLayout
    supernode: int  # index into Sim.supernodes
    known: int = 0  # pieces the seeder holds (published hashes)
    fetching: bool = False
    sizes: list[int] = field(init=False)  # piece index -> length: every flow's size

    def __post_init__(self) -> None:
        self.sizes = [self.layout.length(i) for i in range(self.layout.count)]


@dataclass
class _Supernode:
    host: int
    scheduler: Scheduler
    uploaded: float = 0.0
    dead: bool = False
    free_at: float = 0.0  # when it has answered every call that reached it


@dataclass
class _Pull:
    """One node's download of one layer."""

    node: int
    layer: _Layer
    session: DownloadSession
    flows: dict[Request, int] = field(default_factory=dict)
    wake: float = math.inf
    done: bool = False
    fallback_flow: int | None = None
    supernode: int = 0  # the supernode this pull is registered with
    calling: bool = False  # waiting for a supernode's reply (latency / a busy supernode)
    call: _Call | None = None  # that call, while no supernode has decided it
    asked: dict[Request, int] = field(default_factory=dict)  # requests not flowing yet: token
    watching: set[str] = field(default_factory=set)  # parents it watches (`Sim._watch`)
    # Replies applied, and (pieces held, replies applied) when `Sim._watch` last looked:
    # only a new piece or a new reply can leave another parent offering nothing we lack.
    applied: int = 0
    looked: tuple[int, int] = (-1, -1)


@dataclass
class _Node:
    index: int
    peer_id: str
    host: int
    zone: str
    start: float
    pulls: list[_Pull] = field(default_factory=list)
    completion: float | None = None
    gone: bool = False


@dataclass
class _Call:
    """A control call on its way: what its supernode does with it, once it gets to it."""

    pull: _Pull
    supernode: int
    decide: Callable[[Scheduler], Assignment | None]
    wait: bool  # the pull waits for the reply (every call but a finished layer's last)
    assignment: Assignment | None = None
    refused: bool = False  # its supernode died before getting to it
    # other pulls of the host whose announces ride along, with what the supernode does
    # with each and, once decided, its answer
    riders: list[tuple[_Pull, Callable[[Scheduler], Assignment]]] = field(default_factory=list)
    answers: list[Assignment] = field(default_factory=list)


class Sim:
    def __init__(
        self,
        scenario: Scenario,
        *,
        session_config: SessionConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        upload_slots: int = 8,
        piggyback: bool = True,
        watch: bool = False,
        batch: bool = True,
        progress: Callable[[int, float], None] | None = None,
    ) -> None:
        self.s = scenario
        self.piggyback = piggyback
        self.watch = watch
        # (parent peer id, layer index) -> pulls waiting for that parent's next piece
        self.watchers: dict[tuple[str, int], list[_Pull]] = {}
        self.watches = 0  # watches answered: peer-to-peer calls, not the supernode's
        self.batch = batch  # a host's announces to one supernode in one call (module doc)
        self.rng = random.Random(scenario.seed)
        self.session_config = session_config or SessionConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.upload_slots = upload_slots
        self.progress = progress
        self.net = Network(scenario.sharing)
        self.registry = self.net.add_host(scenario.registry_up, math.inf, zone=0)
        if scenario.zones > 1 and scenario.zone_link is not None:
            for a in range(scenario.zones):
                for b in range(a + 1, scenario.zones):
                    self.net.set_link(a, b, scenario.zone_link)
        self.supernodes = [
            _Supernode(
                self.net.add_host(scenario.supernode_up, scenario.supernode_down, zone=0),
                Scheduler(
                    random.Random(self.rng.random()),
                    self.scheduler_config,
                    seeder_id=SEEDER,
                    seeder_address=SEEDER,  # how sessions tell it from the peers
                    seeder_zone="z0",  # the zone of its host, as the supernode's `zone`
                ),
            )
            for _ in range(max(1, scenario.supernodes))
        ]
        self.layers = [
            _Layer(i, _digest(i), PieceLayout.for_size(size), i % len(self.supernodes))
            for i, size in enumerate(scenario.layers)
        ]
        self.nodes: list[_Node] = []
        self.node_up: list[float] = []
        self.node_down: list[float] = []
        slow = set(
            self.rng.sample(range(scenario.nodes), round(scenario.slow_share * scenario.nodes))
        )
        for i in range(scenario.nodes):
            up, down = (
                (scenario.slow_up, scenario.slow_down)
                if i in slow
                else (scenario.node_up, scenario.node_down)
            )
            zone = i % max(1, scenario.zones)
            start = self.rng.uniform(0, scenario.arrival_spread) if scenario.arrival_spread else 0.0
            host = self.net.add_host(up, down, zone=zone)
            self.nodes.append(_Node(i, f"n{i}", host, f"z{zone}", start))
            self.node_up.append(up)
            self.node_down.append(down)
        self.by_peer = {n.peer_id: n for n in self.nodes}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.now = 0.0
        self.control_messages = 0
        self.egress = 0.0
        self.egress_timeline: list[tuple[float, float]] = [(0.0, 0.0)]
        self.completed = 0
        self.settled = 0  # nodes completed or gone: the run ends when all are
        self.tags: dict[int, object] = {}  # flow id -> what it carries (for cut flows)
        # control calls and piece requests take time (see the module docstring)
        self.delayed = scenario.latency > 0 or scenario.supernode_rate > 0
        self.service = 1 / scenario.supernode_rate if scenario.supernode_rate > 0 else 0.0
        self.tokens = 0
        leavers = self.rng.sample(range(scenario.nodes), round(scenario.churn * scenario.nodes))
        self.leave_at = {i: -1.0 for i in leavers}  # decided once the naive time is known
        self.download_use: list[tuple[float, int, float, int]] = []
        self.use_step = 0.0  # the lower bound / USE_SAMPLES, once the run starts

    # -- event plumbing -----------------------------------------------------------------------

    def _push(self, at: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def run(self) -> StormResult:
        # The cyclic garbage collector is off while the storm runs: the simulator makes
        # next to no reference cycles (a Storm-A run leaves a handful of objects to it), yet
        # each full collection walks every live object -- sessions, pickers, flows -- and
        # their number and size both grow with the hosts. Counting is not affected.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> StormResult:
        wall = time.monotonic()
        naive = naive_completion(
            self.s, self.node_up, self.node_down, [n.start for n in self.nodes]
        )
        # leave at a random moment while the host is surely still pulling: within the time
        # the lower bound says nobody can finish in
        horizon = lower_bound(self.s, self.node_up, self.node_down)
        for i in self.leave_at:
            self.leave_at[i] = self.nodes[i].start + self.rng.uniform(0.05, 0.95) * horizon
            self._push(self.leave_at[i], "leave", self.nodes[i])
        for node in self.nodes:
            self._push(node.start, "start", node)
        if 0 < horizon < math.inf and self.nodes:
            self.use_step = horizon / USE_SAMPLES
            self._push(min(n.start for n in self.nodes), "sample", None)
        if self.s.supernode_failure_at is not None:
            self._push(self.s.supernode_failure_at, "supernode_fails", 0)
        while True:
            upcoming = self.net.next_completion()
            if self.events and (upcoming is None or self.events[0][0] <= upcoming[0]):
                at, _, kind, payload = heapq.heappop(self.events)
                self.now = max(self.now, at)
                self._dispatch(kind, payload)
            elif upcoming is not None:
                at, flow = upcoming
                self.now = max(self.now, at)
                self.tags.pop(flow, None)
                self._flow_done(flow, self.net.complete(flow, self.now))
            else:
                break
            if self.settled == len(self.nodes):
                break  # every node completed or left
        return StormResult(
            scenario=self.s,
            engine="fast",
            start=[n.start for n in self.nodes],
            completion=[None if n.gone else n.completion for n in self.nodes],
            node_up=self.node_up,
            node_down=self.node_down,
            node_zone=[i % max(1, self.s.zones) for i in range(self.s.nodes)],
            registry_egress_bytes=self.egress,
            registry_egress_timeline=self.egress_timeline,
            cross_zone_bytes=self.net.bytes_between_zones,
            supernode_upload_bytes=sum(self.net.bytes_sent(sn.host) for sn in self.supernodes),
            control_messages=self.control_messages,
            naive_completion=naive,
            wall_seconds=time.monotonic() - wall,
            download_use=self.download_use,
            download_use_step=self.use_step,
        )

    def _dispatch(self, kind: str, payload: object) -> None:
        if kind == "start":
            assert isinstance(payload, _Node)
            self._start_node(payload)
        elif kind == "wake":
            assert isinstance(payload, _Pull)
            if not payload.done and self.now >= payload.wake:
                payload.wake = math.inf
                self._drive(payload)
        elif kind == "leave":
            assert isinstance(payload, _Node)
            self._leave(payload)
        elif kind == "supernode_fails":
            assert isinstance(payload, int)
            self._supernode_fails(payload)
        elif kind == "decide":
            assert isinstance(payload, _Call)
            self._decide(payload)
        elif kind == "reply":
            assert isinstance(payload, _Call)
            self._reply(payload)
        elif kind == "request":
            assert isinstance(payload, tuple)
            self._request_arrives(*payload)
        elif kind == "nearly":
            assert isinstance(payload, tuple)
            self._nearly_received(*payload)
        elif kind == "watched":
            assert isinstance(payload, tuple)
            self._watched(*payload)
        elif kind == "sample":
            self._sample()

    def _sample(self) -> None:
        """Note how the download links of the nodes still pulling are used now
        (`StormResult.download_use`); again in `use_step` while anything else is to come."""
        pulling = idle = 0
        used = 0.0
        for node in self.nodes:
            if node.completion is not None or node.gone or node.start > self.now:
                continue
            down = self.node_down[node.index]
            if not down > 0:
                continue
            pulling += 1
            rate = self.net.receiving(node.host)
            if rate > 0:
                used += min(1.0, rate / down)
            else:
                idle += 1
        self.download_use.append((self.now, pulling, used, idle))
        # as long as the run itself goes on (`_run`'s loop): a flow that never ends (no
        # capacity) must not keep a run with nothing else to come alive
        if self.events or self.net.next_completion() is not None:
            self._push(self.now + self.use_step, "sample", None)

    # -- the seeder ---------------------------------------------------------------------------

    def _seed(self, layer: _Layer) -> None:
        """Fetch the next piece of `layer` from the registry (the seeder reads in order)."""
        if self.supernodes[layer.supernode].dead:
            return
        if layer.known >= layer.layout.count:
            sn = self.supernodes[layer.supernode]
            sn.scheduler.seeder_done(layer.digest, ok=True)
            return
        sn = self.supernodes[layer.supernode]
        size = layer.sizes[layer.known]
        self.net.start_flow(self.registry, sn.host, size, self.now, ("seed", layer))

    # -- nodes --------------------------------------------------------------------------------

    def _start_node(self, node: _Node) -> None:
        if node.gone:
            return
        for layer in self.layers:
            sn = self.supernodes[layer.supernode]
            if not layer.fetching:
                layer.fetching = True
                sn.scheduler.add_task(layer.digest, layer.layout, self.now)
                if layer.layout.count == 0:
                    sn.scheduler.seeder_done(layer.digest, ok=True)
                else:
                    self._seed(layer)
            session = DownloadSession(
                layer.layout,
                node.peer_id,
                random.Random(self.rng.random()),
                self.session_config,
                now=self.now,
                zone=node.zone,
            )
            pull = _Pull(node.index, layer, session, supernode=layer.supernode)
            node.pulls.append(pull)
            if sn.dead:
                # no supernode left for this layer: straight to the registry
                self._fall_back(pull)
                continue
            self.control_messages += 1
            self._register(pull, layer.supernode)
            self._drive(pull)

    def _apply(self, pull: _Pull, assignment: Assignment) -> None:
        pull.applied += 1
        pull.session.apply(
            assignment.state.value,
            pull.layer.known,
            assignment.parents,
            self.now,
            assignment.pace,
            SEEDER,
        )

    def _drive(self, pull: _Pull) -> None:
        """Carry out what the session decided, as the daemon's swarm loop does."""
        node = self.nodes[pull.node]
        session = pull.session
        supernodes = self.supernodes
        while not pull.done and not node.gone and not pull.calling:
            if (pull.fallback_flow is not None or supernodes[pull.supernode].dead) and (
                not self._control(pull) or pull.calling
            ):
                return  # gone to the registry, or registering with another supernode
            out = session.poll(self.now)
            for request in out.cancel:
                pull.asked.pop(request, None)
                flow = pull.flows.pop(request, None)
                if flow is not None:
                    self.net.cancel_flow(flow, self.now)
                    self.tags.pop(flow, None)
            for request in out.fetch:
                self._fetch(pull, request)
            # only a verdict completes a layer, and none comes in this loop
            complete = session.is_complete()
            announce = out.announce and out.gave_up is None and not complete
            if out.reports or announce:
                self._report_and_announce(pull, out.reports, announce)
            if out.gave_up is not None:
                self._fall_back(pull)
                return
            if complete:
                self._last_announce(pull)
                self._layer_done(pull)
                return
            if out.reports or announce:
                continue
            if not out.cancel and not out.fetch:
                break
        if pull.calling:
            return  # the reply drives it on
        if not pull.done:
            if self.watch:
                self._watch(pull)
            wake = session.next_wakeup()
            if wake < pull.wake:
                pull.wake = wake
                self._push(wake, "wake", pull)

    def _report_and_announce(
        self, pull: _Pull, reports: list[tuple[str, int, str]], announce: bool
    ) -> None:
        """Send the session's reports, then (with `announce`) its announce, in the daemon's
        order; the last reply's parents are the ones kept. With latency they travel as one
        call of that many messages (the daemon waits a round trip for each)."""
        node = self.nodes[pull.node]
        digest = pull.layer.digest
        self.control_messages += len(reports)
        riders: list[tuple[_Pull, Callable[[Scheduler], Assignment]]] = []
        if announce:
            pieces, want = pull.session.take_announce(self.now)
            self.control_messages += 1
            riders = self._riders(pull)

        def decide(sched: Scheduler) -> Assignment | None:
            a: Assignment | None = None
            for parent, index, reason in reports:
                if reason == REPORT_UNREACHABLE:
                    a = sched.report_unreachable(digest, node.peer_id, parent, self.now)
                else:
                    a = sched.report_bad_piece(digest, node.peer_id, parent, index, self.now)
                if not self.delayed:
                    self._apply(pull, a)  # each reply at once, as before (same results)
            if announce:
                return sched.announce(digest, node.peer_id, pieces, self.now, want)
            return None if not self.delayed else a  # answered at once: applied above

        cost = len(reports) + self._announce_cost(announce + len(riders))
        self._call(pull, pull.supernode, cost, decide, riders=riders)

    def _riders(self, pull: _Pull) -> list[tuple[_Pull, Callable[[Scheduler], Assignment]]]:
        """The host's other pulls at `pull`'s supernode whose announces go with its own (the
        daemon's `p2pd.coalescer.Coalescer.gather`), taken now."""
        if not self.batch:
            return []
        node = self.nodes[pull.node]
        riders: list[tuple[_Pull, Callable[[Scheduler], Assignment]]] = []
        for other in node.pulls:
            if (
                other is pull
                or other.done
                or other.calling
                or other.fallback_flow is not None
                or other.supernode != pull.supernode
                or not other.session.may_ride_along(self.now)
            ):
                continue
            pieces, want = other.session.take_announce(self.now)
            riders.append((other, self._announcer(other.layer.digest, node.peer_id, pieces, want)))
        return riders

    def _announcer(
        self, digest: Digest, peer_id: str, pieces: list[int], want: bool
    ) -> Callable[[Scheduler], Assignment]:
        def decide(sched: Scheduler) -> Assignment:
            return sched.announce(digest, peer_id, pieces, self.now, want)

        return decide

    def _announce_cost(self, k: int) -> float:
        """The supernode's time for k announces in one message, in messages."""
        if k <= 1:
            return float(k)
        share = self.scheduler_config.message_overhead
        return share + k * (1 - share)

    def _last_announce(self, pull: _Pull) -> None:
        """A finished layer's last announce: nothing waits for its reply."""
        pieces, _ = pull.session.take_announce(self.now)
        self.control_messages += 1
        digest, peer_id = pull.layer.digest, self.nodes[pull.node].peer_id

        def decide(sched: Scheduler) -> None:
            sched.announce(digest, peer_id, pieces, self.now, want_parents=False)

        self._call(pull, pull.supernode, 1, decide, wait=False)

    def _control(self, pull: _Pull) -> bool:
        """Whether this pull still talks to a supernode, after failing over if its supernode
        died (as the daemon finds out: its next call is refused). False: no supernode is left
        and the pull went to the registry."""
        if pull.fallback_flow is not None:
            return False  # already fetching the rest from the registry
        if not self.supernodes[pull.supernode].dead:
            return True
        if self.supernodes[pull.layer.supernode].dead:
            self.control_messages += 1  # the refused call
            self._fall_back(pull)
            return False
        self.control_messages += 2  # the refused call, then the register elsewhere
        pull.supernode = pull.layer.supernode
        self._register(pull, pull.supernode)
        return True

    def _register(self, pull: _Pull, index: int) -> None:
        """`pull` registers with supernode `index`, carrying the pieces it holds."""
        node = self.nodes[pull.node]
        have = pull.session.have
        digest = pull.layer.digest
        # as p2pd registers: one slot per 100 Mbit/s of the NIC's speed, `upload_slots` at most
        slots = upload_slots_for(self.node_up[pull.node], self.upload_slots)

        def decide(sched: Scheduler) -> Assignment:
            return sched.register(
                digest,
                node.peer_id,
                node.peer_id,
                node.zone,
                self.now,
                upload_slots=slots,
                have=None if have.is_empty() else have,
            )

        self._call(pull, index, 1, decide)

    # -- control calls ------------------------------------------------------------------------

    def _call(
        self,
        pull: _Pull,
        index: int,
        messages: float,
        decide: Callable[[Scheduler], Assignment | None],
        *,
        wait: bool = True,
        riders: list[tuple[_Pull, Callable[[Scheduler], Assignment]]] | None = None,
    ) -> None:
        """Make a call costing `messages` messages of supernode `index`'s time: answered at
        once, or with latency and a busy supernode (see the module docstring) while the pull
        (and each of the `riders`, pulls whose announces go along) waits."""
        sn = self.supernodes[index]
        riders = riders or []
        if not self.delayed:
            assignment = decide(sn.scheduler)
            if assignment is not None and wait:
                self._apply(pull, assignment)
            for rider, decide_rider in riders:
                self._apply(rider, decide_rider(sn.scheduler))
                rider.wake = self.now  # it acts on the answer as soon as this pull is done
                self._push(self.now, "wake", rider)
            return
        arrives = self.now + self.s.latency / 2
        sn.free_at = max(arrives, sn.free_at) + messages * self.service
        call = _Call(pull, index, decide, wait, riders=riders)
        if wait:
            pull.calling, pull.call = True, call
        for rider, _ in riders:
            rider.calling, rider.call = True, call
        self._push(sn.free_at, "decide", call)

    def _decide(self, call: _Call) -> None:
        """The supernode got to `call`: it decides now, and the reply sets off back."""
        pull = call.pull
        if call.refused or self.nodes[pull.node].gone:
            return
        for p in (pull, *(rider for rider, _ in call.riders)):
            if p.call is call:
                p.call = None
        if self.supernodes[call.supernode].dead:
            # refused: the pulls find out now and fail over (or go to the registry)
            for rider, _ in call.riders:
                rider.calling = False
                self._drive(rider)
            if call.wait:
                pull.calling = False
                self._drive(pull)
            return
        scheduler = self.supernodes[call.supernode].scheduler
        call.assignment = call.decide(scheduler)
        call.answers = [decide(scheduler) for _, decide in call.riders]
        if call.wait or call.riders:
            self._push(self.now + self.s.latency / 2, "reply", call)

    def _reply(self, call: _Call) -> None:
        for (rider, _), answer in zip(call.riders, call.answers, strict=True):
            rider.calling = False
            if not rider.done and not self.nodes[rider.node].gone:
                self._apply(rider, answer)
                self._drive(rider)
        if not call.wait:
            return
        pull = call.pull
        pull.calling = False
        if pull.done or self.nodes[pull.node].gone:
            return
        if call.assignment is not None:
            self._apply(pull, call.assignment)
        self._drive(pull)

    def _supernode_fails(self, index: int) -> None:
        """Supernode `index` dies: its transfers break, its layers move to the next live
        supernode (whose seeder fetches them again), and pulls find out at their next call."""
        dead = self.supernodes[index]
        if dead.dead:
            return
        dead.dead = True
        self._cut_host(dead.host, drive=False)
        alive = [k for k, sn in enumerate(self.supernodes) if not sn.dead]
        for layer in self.layers:
            if layer.supernode != index:
                continue
            layer.known = 0
            if alive:
                layer.supernode = alive[(index + 1) % len(alive)] if len(alive) > 1 else alive[0]
                heir = self.supernodes[layer.supernode]
                heir.scheduler.add_task(layer.digest, layer.layout, self.now)
                if layer.layout.count == 0:
                    heir.scheduler.seeder_done(layer.digest, ok=True)
                else:
                    self._seed(layer)
        # Every pull of the lost layers makes a call soon (its announce timer, at most
        # announce_interval away) and fails over then; wake them all now, as a refused
        # connection is noticed at once -- also those whose call was waiting in its queue.
        for node in self.nodes:
            for pull in node.pulls:
                if pull.call is not None and pull.call.supernode == index:
                    pull.call.refused = True
                    pull.calling, pull.call = False, None
                if not pull.done and pull.supernode == index:
                    self._drive(pull)

    def _fetch(self, pull: _Pull, request: Request) -> None:
        """Ask a parent for a piece: its bytes start flowing a round trip later."""
        if self.s.latency > 0:
            self.tokens += 1
            pull.asked[request] = self.tokens
            event = (pull, request, self.tokens, pull.layer.supernode)
            self._push(self.now + self.s.latency, "request", event)
        else:
            self._start_transfer(pull, request, pull.layer.supernode)

    def _request_arrives(self, pull: _Pull, request: Request, token: int, sn: int) -> None:
        if pull.asked.get(request) != token:
            return  # cancelled meanwhile
        del pull.asked[request]
        if pull.done or self.nodes[pull.node].gone:
            return
        self._start_transfer(pull, request, sn)
        if request not in pull.flows:
            self._drive(pull)  # it failed: act on it

    def _start_transfer(self, pull: _Pull, request: Request, supernode: int) -> None:
        """Start the bytes of `request` flowing; a request for the seeder goes to the
        supernode it was asked of (`supernode`), which may have died since."""
        node = self.nodes[pull.node]
        if request.parent == SEEDER:
            sn = self.supernodes[supernode]
            if sn.dead:
                pull.session.on_failure(request, False, self.now)
                return
            src = sn.host
        else:
            parent = self.by_peer[request.parent]
            if parent.gone:
                pull.session.on_failure(request, False, self.now)
                return
            src = parent.host
        size = pull.layer.sizes[request.index]
        tag = (pull, request, self._holds(pull, request))
        flow = self.net.start_flow(src, node.host, size, self.now, tag)
        pull.flows[request] = flow
        self.tags[flow] = tag
        if self.net.uploads(src) == 1:
            # a parent serving no one else: the daemon's piece client overlaps the next
            # request with this body's end (see _nearly_received)
            self._nearly_received(pull, request, flow, self.now)

    def _nearly_received(self, pull: _Pull, request: Request, flow: int, start: float) -> None:
        """The daemon's piece client (`p2pd.peers.PieceClient.fetch`) tells the session a
        body's last bytes are due within `LEAD_SECONDS` at the rate seen so far, once it has
        watched that rate for `LEAD_SECONDS` or over half the body; the session frees the
        parent's slot and the next request to it overlaps this body's end. It does so only
        when the parent's response said it served no one else (`UPLOADS_HEADER`): a parent
        with other children has their requests to fill its upload meanwhile, and a second
        request in flight would only slow this child's pieces (Storm-A, 200 hosts, with
        every body overlapped: 1.17x -> 1.25x the bound). Checked here at the flow's
        rate now, looked at again while too early."""
        if pull.flows.get(request) != flow or pull.done:
            return  # ended, cancelled or the layer is done
        net = self.net
        rate = net.rate(flow)
        if rate <= 0:
            return  # stalled: the body's end (or a rate change) comes first
        size = pull.layer.sizes[request.index]
        left = net.remaining(flow, self.now)
        elapsed = self.now - start
        # the daemon's test, with the rate so far taken as the rate now
        if left > rate * LEAD_SECONDS * (1 + 1e-9) or (
            elapsed < LEAD_SECONDS and 2 * (size - left) < size
        ):
            due = left / rate
            at = max(due - LEAD_SECONDS, min(LEAD_SECONDS - elapsed, (left - size / 2) / rate))
            self._push(self.now + max(at, 1e-6), "nearly", (pull, request, flow, start))
            return
        pull.session.on_received(request)
        self._drive(pull)

    def _flow_done(self, flow: int, tag: object) -> None:
        assert isinstance(tag, tuple)
        piece_pull = tag[0]
        if isinstance(piece_pull, _Pull):
            # a piece: most flows (tested first: `==` on a _Pull is a dataclass __eq__ call)
            request = tag[1]
            assert isinstance(request, Request)
            if piece_pull.flows.pop(request, None) is None or piece_pull.done:
                return
            if request in piece_pull.session.live:
                # The daemon's loop hears of the bytes (the parent's slot is free) before
                # their verdict and acts on that first: a request to the parent, or -- with
                # nothing more on offer -- the starved announce (`DownloadSession.poll`).
                # With the verdict straight away this engine never saw that moment: its
                # peers waited for the idle timer and heard of new parents 0.05 s after the
                # daemons (16 hosts, 4 + 12 MiB: p50 0.291 s against the daemons' 0.245 s,
                # 118 control messages against 145). Not modelled: the daemon's cap of two
                # such early releases pending per download (`_EARLY_RELEASES`), which binds
                # for about one piece in four thousand on Storm-A at 200 hosts.
                piece_pull.session.on_received(request)
                self._drive(piece_pull)
                if piece_pull.done or piece_pull.fallback_flow is not None:
                    return
            holds = tag[2]
            assert holds is None or isinstance(holds, Bitfield)
            fresh = piece_pull.session.on_piece(request, True, self.now, holds)
            self._drive(piece_pull)
            if fresh and self.watch:
                self._tell_watchers(piece_pull)
            return
        if tag[0] == "seed":
            layer = tag[1]
            assert isinstance(layer, _Layer)
            size = layer.sizes[layer.known]
            self.egress += size
            self.egress_timeline.append((self.now, self.egress))
            layer.known += 1
            sn = self.supernodes[layer.supernode]
            sn.scheduler.seeder_progress(layer.digest, layer.known, self.now)
            self._seed(layer)
            return
        if tag[0] == "fallback":
            pull = tag[1]
            assert isinstance(pull, _Pull)
            self._layer_done(pull)
            return
        raise AssertionError(f"unknown flow tag {tag!r}")  # pragma: no cover

    def _holds(self, pull: _Pull, request: Request) -> Bitfield | None:
        """The parent's bitfield as its piece response carries it (the response's headers,
        so as it was when the transfer starts): a peer sends it (`p2pd.peers.HAVE_HEADER`),
        the seeder does not; the child's session takes it only from a peer of its own zone
        (`DownloadSession.offered_in_full`). Off with ``piggyback=False``."""
        if not self.piggyback or request.parent == SEEDER:
            return None
        parent = self.by_peer[request.parent]
        index = pull.layer.index
        return parent.pulls[index].session.have if len(parent.pulls) > index else None

    def _watch(self, pull: _Pull) -> None:
        """Watch each parent offered in full that offers the pull nothing it lacks
        (`DownloadSession.exhausted`: peers of its zone), as the daemon does
        (`p2pd.peers.KNOWN_HEADER`): the parent answers once it holds more pieces than the
        child knows of, at once if it already does."""
        session = pull.session
        state = (session.picker.have_count(), pull.applied)
        if state == pull.looked:
            return
        pull.looked = state
        index = pull.layer.index
        for name in session.exhausted():
            if name in pull.watching:
                continue
            parent = self.by_peer[name]
            if len(parent.pulls) <= index:
                continue
            pull.watching.add(name)
            known = session.known_of(name)
            if parent.pulls[index].session.picker.have_count() > known:
                self._answer_watch(pull, name, self.s.latency)  # a round trip
            else:
                self.watchers.setdefault((name, index), []).append(pull)

    def _tell_watchers(self, pull: _Pull) -> None:
        """`pull`'s host has a new piece: answer those watching it (half a round trip)."""
        waiting = self.watchers.pop((self.nodes[pull.node].peer_id, pull.layer.index), None)
        if waiting:
            name = self.nodes[pull.node].peer_id
            for child in waiting:
                self._answer_watch(child, name, self.s.latency / 2)

    def _answer_watch(self, child: _Pull, parent: str, delay: float) -> None:
        if delay > 0:
            self._push(self.now + delay, "watched", (child, parent))
        else:
            self._watched(child, parent)

    def _watched(self, child: _Pull, parent: str) -> None:
        child.watching.discard(parent)
        child.looked = (-1, -1)  # it may offer nothing more still: look again
        if child.done or self.nodes[child.node].gone:
            return
        self.watches += 1
        holder = self.by_peer[parent]
        if holder.gone:
            return  # (its transfers fail and tell the child)
        child.session.on_have(parent, holder.pulls[child.layer.index].session.have)
        if not child.calling:
            self._drive(child)

    def _fall_back(self, pull: _Pull) -> None:
        """The swarm gave up on this layer: fetch the missing bytes from the registry."""
        for flow in pull.flows.values():
            self.net.cancel_flow(flow, self.now)
            self.tags.pop(flow, None)
        pull.flows.clear()
        pull.asked.clear()
        layout = pull.layer.layout
        missing = sum(layout.length(i) for i in range(layout.count) if i not in pull.session.have)
        self.egress += missing
        self.egress_timeline.append((self.now, self.egress))
        node = self.nodes[pull.node]
        pull.fallback_flow = self.net.start_flow(
            self.registry, node.host, missing, self.now, ("fallback", pull)
        )

    def _layer_done(self, pull: _Pull) -> None:
        pull.done = True
        node = self.nodes[pull.node]
        if all(p.done for p in node.pulls) and len(node.pulls) == len(self.layers):
            if node.completion is None and not node.gone:
                self.settled += 1
            node.completion = self.now
            self.completed += 1
            if self.progress is not None:
                self.progress(self.completed, self.now)

    def _cut_host(self, host: int, *, drive: bool) -> None:
        """Take `host` off the network: children whose transfers from it were cut see
        failures (and, with `drive`, act on each at once). Every cut flow comes off the books
        first: a child reacting to one failure may cancel its other requests to this host,
        whose flows the network has already dropped."""
        cut = [self.tags.pop(flow, None) for flow in self.net.remove_host(host, self.now)]
        failed: list[tuple[_Pull, Request]] = []
        for tag in cut:
            if not isinstance(tag, tuple) or not isinstance(tag[0], _Pull):
                continue
            pull, request, _ = tag
            if not pull.done and pull.flows.pop(request, None) is not None:
                failed.append((pull, request))
        for pull, request in failed:
            if not pull.done:
                pull.session.on_failure(request, False, self.now)
                if drive:
                    self._drive(pull)

    def _leave(self, node: _Node) -> None:
        """A host crashes mid-pull: its flows stop; others find out by failing to reach it."""
        if node.completion is not None or node.gone:
            return
        node.gone = True
        self.settled += 1
        for pull in node.pulls:
            pull.done = True
            pull.flows.clear()
        self._cut_host(node.host, drive=True)
        if self.progress is not None:
            self.progress(self.completed, self.now)


def naive_completion(
    scenario: Scenario, node_up: list[float], node_down: list[float], start: list[float]
) -> list[float]:
    """Every host pulls every layer straight from the registry, on the same network model."""
    symmetric = (
        not scenario.arrival_spread
        and len(set(node_down)) <= 1
        and (scenario.zones <= 1 or scenario.zone_link is None)
    )
    if symmetric and scenario.nodes:
        return _naive_symmetric(scenario, node_down[0])
    net = Network(scenario.sharing)
    registry = net.add_host(scenario.registry_up, math.inf, zone=0)
    if scenario.zones > 1 and scenario.zone_link is not None:
        for a in range(scenario.zones):
            for b in range(a + 1, scenario.zones):
                net.set_link(a, b, scenario.zone_link)
    hosts = [
        net.add_host(node_up[i], node_down[i], zone=i % max(1, scenario.zones))
        for i in range(scenario.nodes)
    ]
    pending = [len(scenario.layers)] * scenario.nodes
    done = [0.0] * scenario.nodes
    starts = sorted(range(scenario.nodes), key=lambda i: (start[i], i))
    k = 0
    now = 0.0
    while True:
        upcoming = net.next_completion()
        if k < len(starts) and (upcoming is None or start[starts[k]] <= upcoming[0]):
            i = starts[k]
            k += 1
            now = max(now, start[i])
            for size in scenario.layers:
                net.start_flow(registry, hosts[i], size, now, i)
            if not scenario.layers:
                done[i] = now
        elif upcoming is not None:
            now = max(now, upcoming[0])
            owner = net.complete(upcoming[1], now)
            assert isinstance(owner, int)
            pending[owner] -= 1
            if pending[owner] == 0:
                done[owner] = now
        else:
            return done


def _naive_symmetric(scenario: Scenario, down: float) -> list[float]:
    """The naive storm when every host is alike and starts at once, without N x L flows.

    Every host then runs the same schedule: its m active layer flows each get
    min(registry_up / (N * m), down / m) -- with every flow alike, water-filling and an equal
    split agree; the smallest layer ends first and the rest speed up. (Host upload capacity
    plays no part: the registry sends everything.)
    """
    n = scenario.nodes
    now = 0.0
    done_bytes = 0.0
    sizes = sorted(scenario.layers)
    for k, size in enumerate(sizes):
        active = len(sizes) - k
        rate = min(scenario.registry_up / (n * active), down / active)
        now += (size - done_bytes) / rate
        done_bytes = float(size)
    return [now] * n


def _digest(i: int) -> Digest:
    return Digest.from_bytes(hashlib.sha256(f"storm-layer-{i}".encode()).digest())
