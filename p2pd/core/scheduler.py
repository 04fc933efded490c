"""The supernode's scheduling state: who takes part in each blob, who holds what, who feeds whom.

Theory of operation
-------------------
A *task* is one blob (keyed by its `Digest`). The supernode fetches the blob from the registry
once and is the task's *seeder*: a peer of every task with a fixed id that never expires and is
never banned. Other peers (p2pd daemons) `register` with a task, `announce` the pieces they
complete (batched), and `leave`. Every such call returns an `Assignment`: the task's state and
the peer's current *parents* -- the peers it should download from -- with their bitfields.

This module is the pure state. The supernode's HTTP server and the storm simulator both drive
it; it reads no clock (``now`` is passed in) and draws randomness only from the seeded
``random.Random`` it is given, so the same seed and the same event sequence give the same
assignments. Nothing iterates a set where order matters: peers live in insertion-ordered dicts
and every choice is a total order ending in the peer id.

Assignments are *pulled*: a peer's parent set changes only inside its own `register`,
`announce` or `report_bad_piece` call, except that a parent leaving, expiring or being banned
removes the link at once (the child sees it gone at its next call). Nothing is pushed.

Task life-cycle (`_TASK_TRANSITIONS`)::

    FETCHING --seeder_done(ok=True)--> READY     seeder holds every piece, sha256 checked
    FETCHING --seeder_done(ok=False)-> FAILED    fetch failed or sha256 mismatch

While FETCHING the seeder holds the prefix ``[0, known)`` reported by `seeder_progress`, and
peers may register and be fed from it. A FAILED task drops every link and hands out no parents
(peers fall back to the registry); it stays until `remove_task`.

Peer life-cycle, per task::

    (absent) --register--> MEMBER --leave / expire--> (absent)
    MEMBER --register--> MEMBER      re-register: address, zone, slots, pieces updated
    MEMBER --blamed max_blame times--> MEMBER, banned: nobody's parent again in this task

A ban outlives leave and re-register. A banned peer may still download.

Parent selection (on register, and on announce with ``want_parents``):

1. A complete peer (all pieces) has no parents: its slots go back to its parents at once, and it
   keeps serving as a parent.
2. Drop parents with nothing the child lacks right now (``parent.bits & ~child.bits == 0``),
   whether they are complete or still downloading; their slot is freed for someone else.
3. Refill to ``max_parents`` peer parents from the candidates: same task, not the child, not
   banned, not shunned by the child (it reported them), a free upload slot, not already a parent,
   and holding some piece the child lacks. Preference is a total order: same zone first, then
   least loaded (children / upload_slots), then most useful pieces, then a random key drawn from
   the rng when the peer first registered, then the peer id.
4. Borrow: a child still left with fewer than ``borrow_below`` peer parents takes, for each one
   it lacks, the slot of another child that has at least ``borrow_from`` peer parents, from a
   peer holding something it lacks (same zone, not banned or shunned). Such peers are sampled
   (``borrow_sample`` draws from the rng among the task's holders), not scanned. See `_borrow`.
   Evening out (``even_out``): a child that is its host's only download at this supernode, with
   fewer than ``max_parents`` peer parents, also takes slots from children whose host has at
   least two more peer parents here in all its downloads (and that keep more than
   ``borrow_below`` in this task). See `_even_out`.
5. The seeder is the parent of last resort, *in addition to* the ``max_parents`` peer parents:
   the child gets it (if the seeder has a free slot; see `_seeder_slot` for an option that
   keeps some for children it feeds in no other task) only when the seeder holds some piece
   the child lacks that no peer parent holds, and is released from it as soon as the peer
   parents cover everything the seeder could give.

Blame: `report_bad_piece` drops the link and the reporter never gets that parent again in this
task. The parent is banned once ``max_blame`` *distinct* reporters blamed it, so one lying peer
cannot ban an honest one unless ``max_blame`` is 1. A report against the seeder is only counted
(``stats()["seeder_reports"]``): its pieces are hashed by the supernode itself, so a bad one is
a disk or network fault for the operator, not a reason to stop seeding.

Liveness is per (task, peer): each call refreshes it, and a peer silent for ``peer_ttl`` is
dropped by `expire`. ``now`` never goes backwards here (a smaller value is treated as the latest
one seen), which keeps the deadline queue ordered and `next_deadline` O(1).

Cost: a selection looks among the task's *free* peers (those with a free slot and at least one
piece, indexed per zone); the other zones only when the child's zone cannot fill its parents.
`FreePeers` (freepeers.py) keeps each zone's free peers in preference order with the pieces
they hold, so most selections touch a few peers instead of every free one (a full scan made a
storm's cost grow with the square of its hosts). Peers whose parent set is full and useful
cost no selection.
"""

from __future__ import annotations

import enum
import heapq
import random
import types
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from p2pd.core.bitfield import Bitfield, BitfieldError, iter_bits
from p2pd.core.digest import Digest
from p2pd.core.freepeers import FreePeers
from p2pd.core.layout import PieceLayout


class SchedulerError(Exception):
    """Misuse of the scheduler: unknown task or peer, bad argument, illegal transition."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_parents: int = 8
    default_upload_slots: int = 8
    seeder_upload_slots: int = 64
    peer_ttl: float = 60.0
    max_blame: int = 1
    max_unreachable: int = 2  # distinct peers that must fail to reach a parent to drop it
    # The seeder offers a child only pieces fewer than this many peers (of the child's zone)
    # hold (0: all it has), so it pushes each piece into the swarm about once per zone and
    # peers spread it from there. 1 rather than 2: behind a supernode no faster than its
    # hosts every extra copy slows how fast new pieces get out; Storm-A is unchanged.
    seeder_rare_below: int = 1
    seeder_stripes: int = 32  # see Scheduler._seeder_offer
    max_cross_zone_parents: int = 1  # peer parents from other zones one child may have
    # The seeder offers each rare piece to one child at a time while a piece takes it longer
    # to read than this many times the gap between a peer's calls (both measured; 0: never).
    # See Scheduler._seeder_offer.
    seeder_one_copy_above: float = 1.0
    # A child with fewer peer parents than borrow_below takes slots from children with at
    # least borrow_from (0: never); see Scheduler._borrow.
    borrow_below: int = 3
    borrow_from: int = 5
    borrow_sample: int = 16
    # A host's only download at this supernode takes slots from children whose host has two
    # or more peer parents more here (all its downloads), up to max_parents: its whole
    # downlink waits on this one task. See Scheduler._even_out.
    even_out: bool = True
    # Control messages per second the supernode paces its downloading peers to (0: no pacing):
    # about 75 % of what one supernode process answers per CPU-second (`p2p-bench dataplane
    # --control-only`: ~10 400 lone messages on the 2-core development machine); see
    # Scheduler.pace. At 5700 (75 % of the 7600 it answered before its per-message work was
    # cut) Storm-A gave 1.244 / 1.267 / 1.291 the bound; at 7800 1.205 / 1.242 / 1.259.
    control_rate: float = 7800.0
    # The share of a lone announce's cost at the supernode that is paid per message (HTTP
    # head, reply, trio scheduling, syscalls) rather than per announce in it: p2pd sends the
    # announces of a host's downloads at one supernode as one message, and a batch of k costs
    # message_overhead + k * (1 - message_overhead) lone announces. `p2p-bench dataplane
    # --control-only` (10 layers of 25 pieces, 7800 lone announces per CPU-second) implies 0.52
    # for batches of 3 and 0.58 for batches of 10; 0.5 errs towards pacing harder.
    # 0: every announce costs a whole message (no batching). See Scheduler.pace.
    message_overhead: float = 0.5
    # The share of the seeder's slots in a task that a peer it already feeds in another task
    # may not take (0: none kept, first come first served); see Scheduler._seeder_slot.
    seeder_spread: float = 0.5
    # Once the seeder holds the whole blob, up to this many children of its zone that registered
    # first and still download are offered everything it has (0: never); see Scheduler._elder.
    seeder_elders: int = 64
    # Each piece enters a zone about once: a child outside the seeder's zone is offered a
    # rare piece by the seeder, or by a parent in another zone, only while no other child of
    # its zone has it on offer from outside (see Scheduler._seeder_offer and _zone_scarce).
    zone_claims: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_parents",
            "default_upload_slots",
            "seeder_upload_slots",
            "borrow_below",
            "borrow_from",
            "borrow_sample",
            "seeder_elders",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise SchedulerError(f"{name} must be a non-negative int, got {value!r}")
        if type(self.seeder_rare_below) is not int or self.seeder_rare_below < 0:
            raise SchedulerError(
                f"seeder_rare_below must be a non-negative int, got {self.seeder_rare_below!r}"
            )
        if type(self.max_unreachable) is not int or self.max_unreachable < 1:
            raise SchedulerError(
                f"max_unreachable must be an int >= 1, got {self.max_unreachable!r}"
            )
        if type(self.max_blame) is not int or self.max_blame < 1:
            raise SchedulerError(f"max_blame must be an int >= 1, got {self.max_blame!r}")
        if not self.peer_ttl > 0:
            raise SchedulerError(f"peer_ttl must be positive, got {self.peer_ttl!r}")
        if self.borrow_below and self.borrow_from <= self.borrow_below:
            raise SchedulerError(
                f"borrow_from ({self.borrow_from}) must exceed borrow_below "
                f"({self.borrow_below}): a lending child would have to borrow back"
            )
        if not 0 <= self.seeder_spread <= 1:
            raise SchedulerError(f"seeder_spread must be in [0, 1], got {self.seeder_spread!r}")
        if not 0 <= self.message_overhead <= 1:
            raise SchedulerError(
                f"message_overhead must be in [0, 1], got {self.message_overhead!r}"
            )
        if not self.control_rate >= 0:
            raise SchedulerError(f"control_rate must be >= 0, got {self.control_rate!r}")
        if not self.seeder_one_copy_above >= 0:
            raise SchedulerError(
                f"seeder_one_copy_above must be >= 0, got {self.seeder_one_copy_above!r}"
            )


class TaskState(enum.Enum):
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"


_TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.FETCHING: frozenset({TaskState.READY, TaskState.FAILED}),
    TaskState.READY: frozenset(),
    TaskState.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ParentInfo:
    peer_id: str
    address: str
    zone: str
    pieces: Bitfield  # a copy taken when the assignment was made


def _parent_info(peer_id: str, address: str, zone: str, pieces: Bitfield) -> ParentInfo:
    """``ParentInfo(...)`` through its slots' own setters: the frozen dataclass's
    ``__init__`` sets each field with ``object.__setattr__`` by name, twice the time, and
    `Scheduler._assignment` makes one per parent of every reply (most of a supernode's
    objects). Compiled (p2pd.native), the class is a C struct and its constructor is used."""
    if _PARENT_INFO_SETTERS is None:
        return ParentInfo(peer_id, address, zone, pieces)
    info = object.__new__(ParentInfo)
    set_peer_id, set_address, set_zone, set_pieces = _PARENT_INFO_SETTERS
    set_peer_id(info, peer_id)
    set_address(info, address)
    set_zone(info, zone)
    set_pieces(info, pieces)
    return info


_PARENT_INFO_SETTERS: tuple[Any, ...] | None = (
    None
    if not isinstance(_parent_info, types.FunctionType)  # compiled by mypyc
    else tuple(vars(ParentInfo)[name].__set__ for name in ("peer_id", "address", "zone", "pieces"))
)


@dataclass(frozen=True, slots=True)
class Assignment:
    state: TaskState
    parents: tuple[ParentInfo, ...]
    # The fewest seconds the peer should leave between its calls about this task (0: its own
    # timing): the supernode's pacing, see Scheduler.pace.
    pace: float = 0.0


class _Peer:
    __slots__ = (
        "address",
        "children",
        "claimed",
        "counted",
        "held",
        "is_seeder",
        "last_seen",
        "ordinal",
        "parents",
        "peer_id",
        "peer_parents",
        "pieces",
        "shunned",
        "slots",
        "tie",
        "zone",
    )

    def __init__(
        self, peer_id: str, address: str, zone: str, slots: int, *, pieces: Bitfield, tie: float
    ) -> None:
        self.peer_id = peer_id
        self.address = address
        self.zone = zone
        self.slots = slots
        self.pieces = pieces
        self.tie = tie
        self.ordinal = 0  # order of arrival in the task: picks the seeder stripe
        self.last_seen = 0.0
        self.is_seeder = False
        self.held = False  # in its task's `holders`
        self.counted = False  # among the scheduler's downloaders (see Scheduler.pace)
        # Both sides of every link, insertion-ordered so that reports and releases are stable.
        self.parents: dict[str, _Peer] = {}
        self.children: dict[str, _Peer] = {}
        self.peer_parents = 0  # its parents but the seeder: what `_borrow` weighs
        self.shunned: set[str] = set()  # membership only, never iterated
        # the rare pieces the seeder offers this peer (its last assignment): _seeder_offer
        self.claimed = 0


class _Task:
    __slots__ = (
        "_stripes",
        "avail",
        "banned",
        "blame",
        "call_gap",
        "claims",
        "digest",
        "elders",
        "ended",
        "free",
        "holders",
        "joined",
        "layout",
        "offered",
        "peers",
        "piece_time",
        "progress_at",
        "pruned",
        "queue",
        "ranked",
        "rare",
        "rich",
        "seeder",
        "seeder_kids",
        "state",
        "streaming",
        "unreachable",
    )

    def __init__(self, digest: Digest, layout: PieceLayout, seeder: _Peer, now: float) -> None:
        self.digest = digest
        self.progress_at = now  # when the seeder last reported progress (or started)
        # Moving averages (None until measured) of the time the seeder takes to read a piece
        # of this blob and of the gap between two calls of a peer downloading it: the
        # one-copy rule of Scheduler._seeder_offer. Per task: a blob served from the store
        # was never slow, and seeding peers' heartbeats are no download's rhythm.
        self.piece_time: float | None = None
        self.call_gap: float | None = None
        self.layout = layout
        self.state = TaskState.FETCHING
        self.seeder = seeder
        # pieces past its prefix the seeder serves as they arrive (see seeder_progress)
        self.streaming = 0
        self.peers: dict[str, _Peer] = {}
        # zone -> peers that could take a child now: free slot, some piece, not banned.
        self.free: dict[str, dict[str, _Peer]] = {}
        # zone -> the same peers in the order parent selection wants them (see freepeers.py)
        self.ranked: dict[str, FreePeers] = {}
        self.banned: set[str] = set()  # membership only, never iterated
        self.blame: dict[str, dict[str, None]] = {}  # parent id -> reporters, in report order
        self.unreachable: dict[str, dict[str, None]] = {}  # the same, for "cannot reach"
        # per zone: how many peers (not the seeder) hold each piece, and the pieces held by
        # fewer than seeder_rare_below of them (a zone gets its own copies from the seeder)
        self.avail: dict[str, list[int]] = {}
        self.rare: dict[str, int] = {}
        self.joined = 0  # peers that ever registered
        # peers in order of registration, and the first ones of them still downloading in the
        # seeder's zone: those the complete seeder serves in full (Scheduler._elder)
        self.queue: deque[_Peer] = deque()
        self.elders: dict[str, _Peer] = {}
        # Downloads of the task that ended (complete, or the peer went) or may have (a
        # re-register), counted, and that count when the elders were last pruned: with no
        # end since, pruning would find nothing (Scheduler._elder)
        self.ended = 0
        self.pruned = -1
        # peers that held a piece when they called, in that order (some may have left since):
        # where Scheduler._borrow samples from
        self.holders: list[_Peer] = []
        # peers with at least borrow_from peer parents: with none, `_borrow` finds no slot
        self.rich = 0
        # zone -> piece -> how many of the zone's peers the seeder offers it to as rare, and
        # the pieces it offers to at least one of them
        self.claims: dict[str, dict[int, int]] = {}
        self.offered: dict[str, int] = {}
        # zone -> the seeder's children in this task from that zone (Scheduler._seeder_slot)
        self.seeder_kids: dict[str, int] = {}
        self._stripes: dict[tuple[int, int], int] = {}

    def zone_avail(self, zone: str) -> list[int]:
        avail = self.avail.get(zone)
        if avail is None:
            avail = self.avail[zone] = [0] * self.layout.count
            self.rare[zone] = (1 << self.layout.count) - 1
        return avail

    def rare_in(self, zone: str) -> int:
        return self.rare.get(zone, (1 << self.layout.count) - 1)

    def stripe(self, index: int, k: int) -> int:
        """Bits of the pieces ``i`` with ``i % k == index``."""
        key = (index, k)
        mask = self._stripes.get(key)
        if mask is None:
            mask = sum(1 << i for i in range(index, self.layout.count, k))
            self._stripes[key] = mask
        return mask


_STAT_KEYS = (
    "links",
    "releases",
    "decisions",
    "bans",
    "bad_reports",
    "seeder_reports",
    "seeder_unreachable",
    "unreachable_reports",
    "dropped_unreachable",
    "ignored_reports",
    "expired",
)


class Scheduler:
    def __init__(
        self,
        rng: random.Random,
        config: SchedulerConfig = SchedulerConfig(),
        seeder_id: str = "seeder",
        seeder_address: str = "",
        seeder_zone: str = "",
    ) -> None:
        _check_id(seeder_id)
        self._rng = rng
        self._config = config
        self._seeder_id = seeder_id
        self._seeder_address = seeder_address
        self._seeder_zone = seeder_zone
        self._tasks: dict[Digest, _Task] = {}
        # Every refresh moves its entry to the end, and `now` never decreases, so the entries
        # are in deadline order: the front is always the next one to expire.
        self._alive: OrderedDict[tuple[Digest, str], _Peer] = OrderedDict()
        self._now = float("-inf")
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._downloaders = 0  # (task, peer) memberships still lacking pieces: Scheduler.pace
        self._hosts: dict[str, int] = {}  # peer id -> its memberships among _downloaders
        # peer id -> its peer parents in all tasks here: what feeds its downlink (_even_out)
        self._host_parents: dict[str, int] = {}
        # peer id -> in how many tasks the seeder is its parent (see _seeder_slot)
        self._fed: dict[str, int] = {}

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def seeder_id(self) -> str:
        return self._seeder_id

    # -- tasks --------------------------------------------------------------------------------

    def add_task(self, digest: Digest, layout: PieceLayout, now: float) -> None:
        """The supernode starts fetching `digest`; the seeder holds nothing yet."""
        if digest in self._tasks:
            raise SchedulerError(f"task {digest} already exists")
        self._clock(now)
        seeder = _Peer(
            self._seeder_id,
            self._seeder_address,
            self._seeder_zone,
            self._config.seeder_upload_slots,
            pieces=Bitfield(layout.count),
            tie=0.0,
        )
        seeder.is_seeder = True
        self._tasks[digest] = _Task(digest, layout, seeder, self._now)

    def has_task(self, digest: Digest) -> bool:
        return digest in self._tasks

    def task_state(self, digest: Digest) -> TaskState:
        return self._task(digest).state

    def seeder_progress(
        self, digest: Digest, known: int, now: float | None = None, streaming: int = 0
    ) -> None:
        """The seeder now holds pieces ``[0, known)``; `known` never decreases. With `now`,
        the time per new piece feeds the seeder's one-copy rule (see _seeder_offer).

        `streaming`: the seeder also serves the next that many pieces *cut-through*, their
        bytes sent as they arrive from the registry, before their hashes are known (the child
        checks each once its hash reaches it). Offered to a lone child only (`_seeder_offer`):
        behind a registry no faster than that host, store-and-forward left its link idle
        until each layer's first piece had landed whole at the seeder (~1 s with the registry
        link shared by three layers) and one piece behind the seeder to the end. In a swarm
        a piece's hops are what matter, and the seeder's uplink is shared by its children.
        The storm simulator does not model it (it passes 0)."""
        task = self._task(digest)
        if task.state is not TaskState.FETCHING:
            raise SchedulerError(f"seeder progress on task {digest} in state {task.state.name}")
        held = task.seeder.pieces.count()
        if type(known) is not int or not held <= known <= task.layout.count:
            raise SchedulerError(
                f"seeder progress {known!r} for task {digest}: want {held}..{task.layout.count}"
            )
        if now is not None and known > held:
            now = self._clock(now)
            took = (now - task.progress_at) / (known - held)
            task.progress_at = now
            task.piece_time = _average(task.piece_time, took)
        if type(streaming) is not int or streaming < 0:
            raise SchedulerError(f"seeder streaming count {streaming!r}: want an int >= 0")
        task.seeder.pieces.update((1 << known) - 1)
        task.streaming = streaming

    def seeder_streams(self, digest: Digest, index: int) -> bool:
        """Whether the seeder now offers piece `index` cut-through (see `seeder_progress`)."""
        return bool(self._streamed(self._task(digest)) >> index & 1)

    def seeder_done(self, digest: Digest, ok: bool) -> None:
        """The fetch ended: READY (every piece held, sha256 checked) or FAILED."""
        task = self._task(digest)
        new = TaskState.READY if ok else TaskState.FAILED
        if new not in _TASK_TRANSITIONS[task.state]:
            raise SchedulerError(
                f"task {digest}: illegal transition {task.state.name} -> {new.name}"
            )
        task.state = new
        if ok:
            task.seeder.pieces.update((1 << task.layout.count) - 1)
        else:
            for peer in task.peers.values():
                self._release_parents(task, peer)

    def seeder_evicted(self, digest: Digest) -> None:
        """The supernode dropped a READY blob from its store (quota) while peers hold it:
        the seeder offers nothing from now on and gives up its children, and the peers keep
        serving each other with the hashes already known. The task stays READY."""
        task = self._task(digest)
        if task.state is not TaskState.READY:
            raise SchedulerError(f"seeder eviction of task {digest} in state {task.state.name}")
        task.seeder.pieces = Bitfield(task.layout.count)
        self._release_children(task, task.seeder)

    def remove_task(self, digest: Digest) -> None:
        task = self._task(digest)
        for peer_id, peer in task.peers.items():
            del self._alive[digest, peer_id]
            self._count(peer, False)
            if task.seeder.peer_id in peer.parents:
                self._feed(peer_id, -1)
        del self._tasks[digest]

    # -- peers --------------------------------------------------------------------------------

    def register(
        self,
        digest: Digest,
        peer_id: str,
        address: str,
        zone: str,
        now: float,
        *,
        upload_slots: int | None = None,
        have: Bitfield | None = None,
    ) -> Assignment:
        """Join `peer_id` to the task, or update it if known; its parents are chosen afresh."""
        task = self._task(digest)
        _check_id(peer_id)
        if peer_id == self._seeder_id:
            raise SchedulerError(f"peer id {peer_id!r} is reserved for the seeder")
        slots = self._config.default_upload_slots if upload_slots is None else upload_slots
        if type(slots) is not int or slots < 0:
            raise SchedulerError(f"upload_slots must be a non-negative int, got {upload_slots!r}")
        if have is not None and have.length != task.layout.count:
            raise SchedulerError(
                f"bitfield of {have.length} pieces for task {digest} of {task.layout.count}"
            )
        now = self._clock(now)
        peer = task.peers.get(peer_id)
        if peer is None:
            pieces = Bitfield(task.layout.count) if have is None else have.copy()
            self._gain(task, pieces.bits, zone, peer_id, slots)
            peer = _Peer(peer_id, address, zone, slots, pieces=pieces, tie=self._rng.random())
            peer.ordinal = task.joined
            task.joined += 1
            task.peers[peer_id] = peer
            task.queue.append(peer)
            if len(task.queue) > 2 * len(task.peers) + 64:
                # peers that left wait in the queue until their turn comes (`_elder`): while
                # the seeder fetches, or the elders download on, drop them now and then
                task.queue = deque(p for p in task.queue if task.peers.get(p.peer_id) is p)
        else:
            self._unindex(task, peer)
            if zone != peer.zone and peer.zone in task.ranked:
                task.ranked[peer.zone].forget(peer_id)
            self._lose(task, peer.pieces.bits, peer.zone, peer_id, peer.slots)
            self._claim(task, peer, 0)  # in its old zone
            self._release_parents(task, peer)  # (the seeder counts its children by zone)
            peer.address, peer.zone, peer.slots = address, zone, slots
            if have is not None:
                peer.pieces = have.copy()  # the peer's word is final, e.g. after losing its cache
            self._gain(task, peer.pieces.bits, peer.zone, peer_id, slots)
            # Shed the newest children first if the peer now offers fewer slots.
            for child in list(peer.children.values())[slots:]:
                self._unlink(task, peer, child)
        self._touch(task, peer, now)
        if peer.pieces.bits and not peer.held:
            peer.held = True
            task.holders.append(peer)
        task.ended += 1  # (a re-register may have replaced its pieces)
        self._count(peer, not peer.pieces.is_full())
        self._reindex(task, peer)
        self._revise(task, peer)
        self._stats["decisions"] += 1
        return self._assignment(task, peer)

    def announce(
        self,
        digest: Digest,
        peer_id: str,
        pieces: Iterable[int],
        now: float,
        want_parents: bool = True,
    ) -> Assignment:
        """Record completed pieces and refresh liveness; revise parents if `want_parents`."""
        task = self._task(digest)
        peer = self._peer(task, peer_id)
        downloading = not peer.pieces.is_full()
        try:
            if isinstance(pieces, Bitfield):
                if pieces.length != peer.pieces.length:
                    raise BitfieldError(f"{pieces.length} pieces, task has {peer.pieces.length}")
                self._gain(task, peer.pieces.update(pieces.bits), peer.zone, peer_id, peer.slots)
            else:
                # the new pieces counted in one call, also when an index proves bad midway
                gained = 0
                try:
                    for index in pieces:
                        if peer.pieces.add(index):
                            gained |= 1 << index
                finally:
                    if gained:
                        self._gain(task, gained, peer.zone, peer_id, peer.slots)
        except BitfieldError as exc:
            raise SchedulerError(f"announce for task {digest} by {peer_id!r}: {exc}") from None
        now = self._clock(now)
        if downloading:
            task.call_gap = _average(task.call_gap, now - peer.last_seen)
        self._touch(task, peer, now)
        if peer.pieces.bits and not peer.held:
            peer.held = True
            task.holders.append(peer)
        if downloading and peer.pieces.is_full():
            task.ended += 1
        self._count(peer, not peer.pieces.is_full())
        self._reindex(task, peer)  # its pieces place it among the free peers
        if want_parents:
            self._revise(task, peer)
        elif peer.pieces.is_full():
            self._release_parents(task, peer)
        self._stats["decisions"] += 1
        return self._assignment(task, peer)

    def report_bad_piece(
        self, digest: Digest, reporter: str, parent_id: str, index: int, now: float
    ) -> Assignment:
        """`reporter` got a corrupt piece `index` from `parent_id`; returns its revised parents."""
        task = self._task(digest)
        peer = self._peer(task, reporter)
        if type(index) is not int or not 0 <= index < task.layout.count:
            raise SchedulerError(f"piece index {index!r} out of range for task {digest}")
        if parent_id == reporter:
            raise SchedulerError(f"peer {reporter!r} reported itself")
        self._touch(task, peer, self._clock(now))
        if parent_id == self._seeder_id:
            self._stats["seeder_reports"] += 1
        elif parent_id not in task.peers:
            # Likely a race with its leave or expiry; an unknown id must not grow the ban state.
            self._stats["ignored_reports"] += 1
        else:
            self._stats["bad_reports"] += 1
            bad = task.peers[parent_id]
            peer.shunned.add(parent_id)
            if parent_id in peer.parents:
                self._unlink(task, bad, peer)
            reporters = task.blame.setdefault(parent_id, {})
            reporters[reporter] = None
            if len(reporters) >= self._config.max_blame and parent_id not in task.banned:
                self._ban(task, bad)
        self._revise(task, peer)
        self._stats["decisions"] += 1
        return self._assignment(task, peer)

    def report_unreachable(
        self, digest: Digest, reporter: str, parent_id: str, now: float
    ) -> Assignment:
        """`reporter` cannot reach `parent_id` (refused, reset, timed out).

        The reporter never gets that parent again in this task; no blame, since a network
        fault is not misbehaviour. Once ``max_unreachable`` distinct peers said so, the parent
        is dropped from the task as if it had expired, without waiting out ``peer_ttl``: a
        killed host would otherwise keep looking like the best parent for a minute.
        """
        task = self._task(digest)
        peer = self._peer(task, reporter)
        if parent_id == reporter:
            raise SchedulerError(f"peer {reporter!r} reported itself")
        self._touch(task, peer, self._clock(now))
        if parent_id == self._seeder_id:
            self._stats["seeder_unreachable"] += 1
        elif parent_id not in task.peers:
            self._stats["ignored_reports"] += 1
        else:
            self._stats["unreachable_reports"] += 1
            gone = task.peers[parent_id]
            peer.shunned.add(parent_id)
            if parent_id in peer.parents:
                self._unlink(task, gone, peer)
            reporters = task.unreachable.setdefault(parent_id, {})
            reporters[reporter] = None
            if len(reporters) >= self._config.max_unreachable:
                self._drop(task, gone)
                del task.unreachable[parent_id]
                self._stats["dropped_unreachable"] += 1
        self._revise(task, peer)
        self._stats["decisions"] += 1
        return self._assignment(task, peer)

    def leave(self, digest: Digest, peer_id: str) -> None:
        task = self._task(digest)
        self._drop(task, self._peer(task, peer_id))

    def expire(self, now: float) -> list[tuple[Digest, str]]:
        """Drop every peer whose deadline (last call + ``peer_ttl``) is before `now`."""
        now = self._clock(now)
        ttl = self._config.peer_ttl
        gone: list[tuple[Digest, str]] = []
        while self._alive:
            key, peer = next(iter(self._alive.items()))
            if not now > peer.last_seen + ttl:
                break
            self._drop(self._tasks[key[0]], peer)
            gone.append(key)
        self._stats["expired"] += len(gone)
        return gone

    def next_deadline(self) -> float | None:
        """When the next peer expires (call `expire` after it); None when nobody can."""
        first = next(iter(self._alive.values()), None)
        return None if first is None else first.last_seen + self._config.peer_ttl

    def pace(self) -> float:
        """The fewest seconds between two calls of a downloading peer about one task that
        keeps the supernode under ``control_rate`` messages per second: every membership still
        downloading calls about once per interval, so the interval is their number divided by
        the rate (0 while that is below what peers do on their own anyway).

        Why: a supernode process answers a few thousand messages per second (``p2p-bench
        dataplane``: ~3300 per CPU-second here before its lean control path, ~10 400 now),
        while the peers' own timing (an announce per
        layer every 0.2 s while a download starts, every second after) asks ~15 000 per
        second of 1000 hosts pulling three layers. Beyond its capacity calls queue, every
        reply comes late and the swarm learns of new pieces seconds late (storm simulator,
        Storm-A with a supernode answering 3258 messages/s: 2.03x the bound; paced, 1.63x).
        Small swarms are not slowed: 100 hosts x 3 layers give 0.04 s at 7800 messages/s,
        below the peers' own intervals; 10 000 hosts x 3 layers give 3.8 s (up to
        p2pd.core.session.MAX_PACE): one supernode process is too few for them. Never more
        than a quarter of ``peer_ttl``, so a paced peer is not expired.
        Not a hard limit: idle peers keep their own back-off (they need parents; see
        DownloadSession.apply), so early in a storm the supernode gets more than the rate.

        A host sends the announces of all its downloads at this supernode in one message
        (`wire.AnnounceBatch`), so what one interval costs is a message per downloading host
        plus the announces in them: ``message_overhead`` x hosts + (1 - message_overhead) x
        memberships, in lone-announce units (10 000 hosts x 3 layers at 0.5: 2.6 s, not
        3.8). A host that does not batch (an older p2pd) costs more than it is counted.
        """
        rate = self._config.control_rate
        if not rate:
            return 0.0
        share = self._config.message_overhead
        cost = share * len(self._hosts) + (1 - share) * self._downloaders
        return min(cost / rate, self._config.peer_ttl / 4)

    # -- introspection ------------------------------------------------------------------------

    def peer_pieces(self, digest: Digest, peer_id: str) -> Bitfield:
        return self._any_peer(self._task(digest), peer_id).pieces.copy()

    def children(self, digest: Digest, peer_id: str) -> list[str]:
        return list(self._any_peer(self._task(digest), peer_id).children)

    def parents_of(self, digest: Digest, peer_id: str) -> list[str]:
        return list(self._any_peer(self._task(digest), peer_id).parents)

    def peers(self, digest: Digest) -> list[str]:
        """The task's peers (not the seeder), in registration order."""
        return list(self._task(digest).peers)

    def is_banned(self, digest: Digest, peer_id: str) -> bool:
        return peer_id in self._task(digest).banned

    def downloading(self, digest: Digest) -> int:
        """How many of the task's peers still lack some piece."""
        return sum(1 for p in self._task(digest).peers.values() if not p.pieces.is_full())

    def coverage(self, digest: Digest, excluding: str | None = None) -> Bitfield:
        """The pieces some peer that may serve them holds (banned peers, and `excluding`,
        left out)."""
        task = self._task(digest)
        bits = 0
        for peer in task.peers.values():
            if peer.peer_id not in task.banned and peer.peer_id != excluding:
                bits |= peer.pieces.bits
        return Bitfield(task.layout.count, bits)

    def stats(self) -> dict[str, int]:
        """Counters for status pages and the simulator.

        ``peers`` counts (task, peer) memberships; ``links``/``releases`` count parent links
        made/undone since start, ``active_links`` the current ones; ``decisions`` counts
        register, announce and report calls; ``seeder_reports`` deserve an operator's look.
        """
        out = {
            "tasks": len(self._tasks),
            "peers": sum(len(t.peers) for t in self._tasks.values()),
            "active_links": sum(
                len(p.parents) for t in self._tasks.values() for p in t.peers.values()
            ),
        }
        out.update(self._stats)
        return out

    # -- internals ----------------------------------------------------------------------------

    def _clock(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now

    def _task(self, digest: Digest) -> _Task:
        task = self._tasks.get(digest)
        if task is None:
            raise SchedulerError(f"unknown task {digest}")
        return task

    def _peer(self, task: _Task, peer_id: str) -> _Peer:
        peer = task.peers.get(peer_id)
        if peer is None:
            raise SchedulerError(f"unknown peer {peer_id!r} in task {task.digest}")
        return peer

    def _any_peer(self, task: _Task, peer_id: str) -> _Peer:
        return task.seeder if peer_id == self._seeder_id else self._peer(task, peer_id)

    def _count(self, peer: _Peer, downloading: bool) -> None:
        if downloading != peer.counted:
            peer.counted = downloading
            self._downloaders += 1 if downloading else -1
            left = self._hosts.get(peer.peer_id, 0) + (1 if downloading else -1)
            if left:
                self._hosts[peer.peer_id] = left
            else:
                del self._hosts[peer.peer_id]

    def _touch(self, task: _Task, peer: _Peer, now: float) -> None:
        peer.last_seen = now
        key = (task.digest, peer.peer_id)
        self._alive[key] = peer
        self._alive.move_to_end(key)

    def _zone_scarce(self, task: _Task, zone: str, child: _Peer | None = None) -> int:
        """Pieces a zone should fetch across zones: fewer than seeder_rare_below of its
        peers hold them (everything when rarity is not tracked); with ``zone_claims``, for
        `child`, only those no other child of the zone has on offer from outside.

        Why the claims: without them every child of a zone lacking a piece fetched it across
        at once, from the seeder and from parents in other zones (zones preset, 1000 hosts,
        three zones: 6.0x (zones - 1) x image crossed zones; with them 1.00x, also at 300
        hosts; the median host 8% slower, since a zone's second copy of a piece now comes
        from inside it, a hop later). For the same reason the seeder's last resort (all it
        has, to a child without peer parents) is not offered outside its zone: what is not
        rare in a zone is fetched inside it."""
        if not self._config.seeder_rare_below:
            return (1 << task.layout.count) - 1
        if child is not None and self._config.zone_claims:
            return task.rare_in(zone) & ~(task.offered.get(zone, 0) & ~child.claimed)
        return task.rare_in(zone)

    def _offer(self, task: _Task, parent: _Peer, child: _Peer) -> Bitfield:
        """The pieces `parent` is offered to `child` with: the seeder's super-seeding offer;
        a parent in another zone only for what the child's zone is short of."""
        count = task.layout.count
        if parent.is_seeder:
            return Bitfield(count, self._seeder_offer(task, child) | self._streamed(task))
        if parent.zone != child.zone:
            return Bitfield(count, self._offer_bits(task, parent, child))
        return parent.pieces.copy()

    def _offer_bits(self, task: _Task, parent: _Peer, child: _Peer) -> int:
        """`_offer` of a parent other than the seeder, as bits: `_revise` asks it for every
        parent of every announce, and the Bitfield it built each time was pure overhead."""
        if parent.zone != child.zone:
            bits = parent.pieces.bits & self._zone_scarce(task, child.zone, child)
            if self._config.zone_claims:
                bits &= ~child.pieces.bits
                bits = _first_bits((bits & child.claimed) or bits, _MAX_CLAIMS)
            return bits
        return parent.pieces.bits

    def _assignment(self, task: _Task, peer: _Peer) -> Assignment:
        # One pass, calling `_offer` only for the seeder and parents in other zones: this
        # runs for every parent of every reply. The rare pieces the seeder now offers are
        # this peer's claims (none without it), and with zone_claims those that parents in
        # other zones offer.
        zone, zone_claims = peer.zone, self._config.zone_claims
        parents = []
        claimed = 0
        for p in peer.parents.values():
            if p.is_seeder or p.zone != zone:
                pieces = self._offer(task, p, peer)
                if p.is_seeder or zone_claims:
                    claimed |= pieces.bits
            else:
                pieces = p.pieces.copy()
            parents.append(_parent_info(p.peer_id, p.address, p.zone, pieces))
        if claimed:
            claimed &= task.rare_in(zone) & ~peer.pieces.bits
        self._claim(task, peer, claimed)
        return Assignment(task.state, tuple(parents), self.pace())

    def _claim(self, task: _Task, child: _Peer, bits: int) -> None:
        """The seeder now offers `child` exactly `bits`: keep the zone's counts and mask."""
        old = child.claimed
        if bits == old:
            return
        zone = child.zone
        counts = task.claims.setdefault(zone, {})
        offered = task.offered.get(zone, 0)
        for i in iter_bits(old & ~bits):
            if counts[i] == 1:
                del counts[i]
                offered &= ~(1 << i)
            else:
                counts[i] -= 1
        for i in iter_bits(bits & ~old):
            counts[i] = counts.get(i, 0) + 1
            offered |= 1 << i
        task.offered[zone] = offered
        child.claimed = bits

    def _one_copy(self, task: _Task) -> bool:
        """Whether the seeder should offer each rare piece of `task` to one child at a time:
        its pieces came in slower than downloading peers call (see _seeder_offer)."""
        ratio = self._config.seeder_one_copy_above
        return (
            ratio > 0
            and task.piece_time is not None
            and task.call_gap is not None
            and task.piece_time > ratio * task.call_gap
        )

    def _unindex(self, task: _Task, peer: _Peer) -> None:
        bucket = task.free.get(peer.zone)
        if bucket is not None and bucket.pop(peer.peer_id, None) is not None:
            task.ranked[peer.zone].discard(peer.peer_id)
            if not bucket:
                del task.free[peer.zone]

    def _reindex(self, task: _Task, peer: _Peer) -> None:
        """Keep `task.free` true for `peer` after its slots, pieces or standing changed."""
        if peer.is_seeder:
            return
        if (
            len(peer.children) < peer.slots
            and peer.pieces.bits
            and peer.peer_id not in task.banned
            and task.peers.get(peer.peer_id) is peer
        ):
            task.free.setdefault(peer.zone, {})[peer.peer_id] = peer
            ranked = task.ranked.get(peer.zone)
            if ranked is None:
                ranked = task.ranked[peer.zone] = FreePeers(task.layout.count)
            ranked.put(peer.peer_id, len(peer.children) / peer.slots, peer.tie, peer.pieces.bits)
        else:
            self._unindex(task, peer)

    def _link(self, task: _Task, parent: _Peer, child: _Peer) -> None:
        if parent.is_seeder:
            self._feed(child.peer_id, 1)
            task.seeder_kids[child.zone] = task.seeder_kids.get(child.zone, 0) + 1
        parent.children[child.peer_id] = child
        child.parents[parent.peer_id] = parent
        if not parent.is_seeder:
            child.peer_parents += 1
            if child.peer_parents == self._config.borrow_from:
                task.rich += 1
            self._host_parents[child.peer_id] = self._host_parents.get(child.peer_id, 0) + 1
        self._stats["links"] += 1
        self._reindex(task, parent)

    def _unlink(self, task: _Task, parent: _Peer, child: _Peer) -> None:
        if parent.is_seeder:
            # its claims go, but for those a parent in another zone still offers (zone claims)
            across = 0
            if self._config.zone_claims:
                for other in child.parents.values():
                    if not other.is_seeder and other.zone != child.zone:
                        across |= other.pieces.bits
            self._claim(task, child, child.claimed & across)
            self._feed(child.peer_id, -1)
            task.seeder_kids[child.zone] -= 1
        del parent.children[child.peer_id]
        del child.parents[parent.peer_id]
        if not parent.is_seeder:
            if child.peer_parents == self._config.borrow_from:
                task.rich -= 1
            child.peer_parents -= 1
            left = self._host_parents[child.peer_id] - 1
            if left:
                self._host_parents[child.peer_id] = left
            else:
                del self._host_parents[child.peer_id]
        self._stats["releases"] += 1
        self._reindex(task, parent)

    def _feed(self, peer_id: str, delta: int) -> None:
        fed = self._fed.get(peer_id, 0) + delta
        if fed:
            self._fed[peer_id] = fed
        else:
            del self._fed[peer_id]

    def _seeder_slot(self, task: _Task, seeder: _Peer, child: _Peer) -> bool:
        """Whether `child` may take one of the seeder's slots in this task: any free slot if
        the seeder feeds it in no other task, else only while more than ``seeder_spread`` of
        the slots are free (0.5 by default: half of each task's slots kept for hosts the seeder
        feeds nowhere else).

        Why: every host asks for all of an image's layers at once, so first come first served
        gives the first hosts to register the seeder's slots of every layer (Storm-A: the same
        64 hosts got three flows each while 936 had nothing for a second; with ten layers, 64
        hosts got ten flows each, a piece took a second to arrive and two thirds of the hosts
        uploaded nothing for 3.6 s). Spread over more hosts, the first pieces land sooner and
        more hosts have something to pass on. Storm simulator, 1000 hosts, p50 / p99 / max of
        the bound, first come -> 0.5: `storm-a-cpu` 1.27 / 1.30 / 1.34 -> 1.24 / 1.28 / 1.29,
        the 10-layer image of the README 1.91 / 1.93 / 1.94 -> 1.67 / 1.70 / 1.70, churn max
        1.62 -> 1.35, zones 1.49 / 1.54 / 1.56 -> 1.45 / 1.49 / 1.50, Storm-A unchanged
        (1.24 / 1.27 / 1.29); worse: slow-hosts p99 1.81 -> 1.91. The full-stack engine agrees
        (50-host storm within 1 %; an earlier version of both engines disagreed by 8-11 % on
        what it did, before their agreement fixes). Also tried: letting a host fed nowhere take
        the slot of one fed in several layers (the displaced host's transfer is lost: 1.68x
        behind a 3258 messages/s supernode, against 1.63x).

        With peers in several zones, the children of one zone hold at most an equal share of the
        task's slots (slots / the zones that peers with upload slots registered from). Why: a piece
        enters another zone once (``zone_claims``), through the one child there that has it on
        offer, while the seeder's own zone takes many copies; with every slot open to all, that
        child's flow was one of ~190 sharing the seeder's uplink, the pieces entering each other
        zone crossed at 1-1.5 of the zone link's 10 Gbit/s in the storm's first second and those
        zones' hosts used half their downlinks (storm simulator, zones preset, 1000 hosts, median of
        the bound: the seeder's zone 1.076, the two others 1.162 and 1.144). Capping the seeder's
        zone at a share of the slots -- 1/2, 1/3, 1/4, 1/5, 1/8: p50 1.111, 1.104, 1.103, 1.109,
        1.121 (the seeder's zone itself 1.092 / 1.092 / 1.103 / 1.114 / 1.165) -- the equal share
        gives 1.144 / 1.170 / 1.174 -> 1.104 / 1.121 / 1.131 (zones 1.092, 1.109, 1.106), crossing
        1.031x (zones - 1) x the image, not 1.002x. Swarms in one zone are unchanged. The rule's
        limit: a share the other zones leave idle stays idle, so with many zones the children of one
        may not fill the seeder's uplink alone.
        """
        free = seeder.slots - len(seeder.children)
        if free <= 0:
            return False
        zones = len(task.avail)
        if zones > 1 and task.seeder_kids.get(child.zone, 0) * zones >= seeder.slots:
            return False
        return child.peer_id not in self._fed or free > self._config.seeder_spread * seeder.slots

    def _release_parents(self, task: _Task, peer: _Peer) -> None:
        for parent in list(peer.parents.values()):
            self._unlink(task, parent, peer)

    def _release_children(self, task: _Task, peer: _Peer) -> None:
        for child in list(peer.children.values()):
            self._unlink(task, peer, child)

    def _gain(self, task: _Task, bits: int, zone: str, peer_id: str, slots: int) -> None:
        """`peer_id` now holds `bits` too. The pieces of a banned peer, or of one with no
        upload slot, do not count: nobody may fetch them from it, so they must stay rare
        enough for the seeder (and other zones) to offer."""
        if peer_id in task.banned or not slots:
            return
        limit = self._config.seeder_rare_below
        avail = task.zone_avail(zone)
        for i in iter_bits(bits):
            avail[i] += 1
            if avail[i] == limit:
                task.rare[zone] &= ~(1 << i)

    def _lose(self, task: _Task, bits: int, zone: str, peer_id: str, slots: int) -> None:
        if peer_id in task.banned or not slots:
            return
        limit = self._config.seeder_rare_below
        avail = task.zone_avail(zone)
        for i in iter_bits(bits):
            avail[i] -= 1
            if avail[i] == limit - 1:
                task.rare[zone] |= 1 << i

    def _seeder_offer(self, task: _Task, child: _Peer) -> int:
        """What the seeder offers `child` (super-seeding): of the pieces still rare in the
        swarm, those of the child's stripe (every k-th piece, k = ``seeder_stripes`` or the
        number of peers if fewer, dealt in order of arrival so every stripe has an owner), so
        that children of the seeder get *different* pieces and trade them; when its stripe
        has nothing left for it, any rare piece; when nothing is rare, everything, but only to
        a child with no peer parent at all (the last resort).

        One copy at a time, when the seeder is slow: while a piece takes the seeder longer
        to read from the registry than the average gap between two calls of a peer (both
        moving averages; ``seeder_one_copy_above`` scales the comparison), a rare piece the
        seeder offers one child of a zone is offered to nobody else there, and that child
        keeps being offered it until it holds it or a peer announced it. The others get the
        piece from a peer, one hop later. Why: the seeder's uplink is shared by its copies,
        so behind a seeder no faster than its hosts eight copies of the first pieces each go
        at an eighth of its speed, land late, and the seeder sends each piece several times
        while new ones wait (simulator, 100 Mbit/s everywhere, 8 / 32 hosts: 2.21x -> 1.70x
        and 5.96x -> 2.71x the bound, supernode upload 1.80x -> 1.00x and 5.70x -> 1.98x the
        image; the full-stack engine, 8 hosts: 2.21x -> 1.54x). When pieces come in faster
        than peers call, a hop through a peer costs more than the extra copy, and every
        child lacking a rare piece is offered it as before (a small swarm behind a fast
        supernode waits a hop per piece otherwise: 8 hosts at 1 Gbit/s, 1+3 pieces, 1.75x ->
        4.6x the bound). The reading time stands in for the seeder's uplink, which the
        scheduler cannot see: a proxy that holds while the supernode's uplink is not much
        faster than its registry link (a fast uplink behind a slow registry is held to one
        copy when more would do). Which child of a zone gets a piece first depends on who
        calls first, not on the order of registration. Tried and not kept: holding the last
        resort (everything, to a child without peer parents) to one copy too: less supernode
        upload, no faster, and the two storm engines then disagreed by 16-18% on a 16-host
        slow-seeder storm."""
        seeder = task.seeder.pieces.bits
        if not self._config.seeder_rare_below or self._elder(task, child):
            return seeder
        rare = seeder & task.rare_in(child.zone) & ~child.pieces.bits
        # one copy at a time also for a child outside the seeder's zone: see _zone_scarce
        abroad = (
            self._config.zone_claims
            and bool(task.seeder.zone)
            and bool(child.zone)
            and child.zone != task.seeder.zone
        )
        one_copy = self._one_copy(task) or abroad
        mine = taken = 0
        if one_copy:
            mine = rare & child.claimed
            taken = rare & task.offered.get(child.zone, 0) & ~child.claimed
            rare &= ~taken
        # no more stripes than peers, dealt in order of arrival: every stripe has an owner
        k = min(self._config.seeder_stripes, len(task.peers))
        if k > 1:
            stripe = rare & task.stripe(child.ordinal % k, k)
            if stripe:
                return _first_bits(stripe | mine, _MAX_CLAIMS) if one_copy else stripe | mine
        if mine:
            if k <= 1:
                # a lone child keeps claiming _MAX_CLAIMS ahead: else it waits a verify and an
                # announce's round trip for every second piece (one host behind the seeder,
                # 100 Mbit/s: 1.16x -> 1.09x the bound in the simulator; 8 and 32 hosts
                # unchanged; topping up every child's claims made those 1.70 -> 2.19x and
                # 2.64 -> 3.06x)
                return mine | _first_bits(rare & ~mine, max(0, _MAX_CLAIMS - mine.bit_count()))
            return mine
        if rare:
            # one copy at a time: a child claims a few pieces, not all (a lone first peer
            # would otherwise hold every rare piece for everyone who comes after it)
            return _first_bits(rare, _MAX_CLAIMS) if one_copy else rare
        if taken or abroad or any(not p.is_seeder for p in child.parents.values()):
            return 0
        return seeder

    def _elder(self, task: _Task, child: _Peer) -> bool:
        """Whether the seeder, holding the whole blob, serves `child` everything: it is one of
        the first ``seeder_elders`` peers of the seeder's zone, in order of registration, that
        still download.

        Why: once the blob is in, nothing is rare, the super-seeder offers nothing, and its
        uplink (10 Gbit/s against the hosts' 1 in the presets) idles while the hosts that
        started first are held back by a swarm whose uplinks also feed every newcomer. Rolling
        storm (1000 hosts starting over 30 s): from 5 s on the first hosts ran at 0.6-0.75 of
        their downlink on eight peer parents while the seeder sent nothing; they were the p99.
        Offering its everything to any child went to newcomers (session 7); to the first ones
        it goes where the wait is longest. Its own zone only: bytes between zones stay one
        copy per zone.
        """
        limit = self._config.seeder_elders
        seeder = task.seeder
        if (
            not limit
            or child.zone != seeder.zone
            or not seeder.pieces.is_full()
            or task.rare_in(seeder.zone)  # first copies of rare pieces go first
        ):
            return False
        elders = task.elders
        if len(elders) >= limit and child.peer_id not in elders and task.pruned != task.ended:
            # (with no download ended since the last look, none of them is done or gone: a
            # look at all of them on every call was a fifth of the supernode's CPU once the
            # seeder had the blob, `p2p-bench dataplane --control-only`)
            task.pruned = task.ended
            for peer_id, peer in list(elders.items()):
                if task.peers.get(peer_id) is not peer or peer.pieces.is_full():
                    del elders[peer_id]  # done or gone: its place goes to the next in line
        queue = task.queue
        while len(elders) < limit and queue:
            peer = queue.popleft()
            if (
                task.peers.get(peer.peer_id) is peer
                and not peer.pieces.is_full()
                and peer.zone == seeder.zone
            ):
                elders[peer.peer_id] = peer
        return elders.get(child.peer_id) is child

    def _streamed(self, task: _Task) -> int:
        """The pieces the seeder serves cut-through (see `seeder_progress`): while it is
        fetching, to the task's only peer."""
        if not task.streaming or task.state is not TaskState.FETCHING or len(task.peers) != 1:
            return 0
        known = task.seeder.pieces.first_missing()
        end = min(task.layout.count, known + task.streaming)
        return (1 << end) - (1 << known) if end > known else 0

    def _drop(self, task: _Task, peer: _Peer) -> None:
        task.ended += 1
        self._count(peer, False)
        self._claim(task, peer, 0)  # its zone may be offered those pieces from outside again
        self._lose(task, peer.pieces.bits, peer.zone, peer.peer_id, peer.slots)
        self._release_parents(task, peer)
        self._release_children(task, peer)
        self._unindex(task, peer)
        ranked = task.ranked.get(peer.zone)
        if ranked is not None:
            ranked.forget(peer.peer_id)  # its slot there, for good
        del task.peers[peer.peer_id]
        del self._alive[task.digest, peer.peer_id]
        if len(task.holders) > 2 * len(task.peers) + 64:
            # the holders list keeps peers that left; _borrow skips them, but a long-lived
            # task must not keep every peer that ever held a piece
            task.holders = [p for p in task.holders if task.peers.get(p.peer_id) is p]

    def _ban(self, task: _Task, peer: _Peer) -> None:
        self._lose(task, peer.pieces.bits, peer.zone, peer.peer_id, peer.slots)
        task.banned.add(peer.peer_id)
        self._stats["bans"] += 1
        self._release_children(task, peer)
        self._unindex(task, peer)

    def _revise(self, task: _Task, child: _Peer) -> None:
        """Apply the selection policy of the module docstring to `child`'s parents."""
        if task.state is TaskState.FAILED:
            return
        if child.pieces.is_full():
            self._release_parents(task, child)
            return
        lacking = ~child.pieces.bits
        seeder = task.seeder
        zone = child.zone
        for parent in list(child.parents.values()):
            # useless = nothing it is *offered* with (a parent in another zone only offers
            # what this zone is short of); `_offer_bits` inlined for a parent of the zone
            if parent.is_seeder:
                continue
            offered = (
                parent.pieces.bits if parent.zone == zone else self._offer_bits(task, parent, child)
            )
            if not offered & lacking:
                self._unlink(task, parent, child)
        wanted = self._config.max_parents - len(child.parents) + (seeder.peer_id in child.parents)
        if wanted > 0:
            for parent in self._candidates(task, child, lacking, wanted):
                self._link(task, parent, child)
        have = len(child.parents) - (seeder.peer_id in child.parents)
        if have < self._config.borrow_below:
            self._borrow(task, child, lacking, self._config.borrow_below - have)
        if (
            self._config.even_out
            and self._hosts.get(child.peer_id) == 1
            and self._host_parents.get(child.peer_id, 0) < self._config.max_parents
        ):
            self._even_out(task, child, lacking)
        if self._elder(task, child):
            only_seeder = lacking  # the seeder holds it all, and has bandwidth to spare
        else:
            cover = 0
            for parent in child.parents.values():
                if parent.is_seeder:
                    continue
                if parent.zone == zone:
                    cover |= parent.pieces.bits
                else:
                    cover |= self._offer_bits(task, parent, child)
            offer = self._seeder_offer(task, child) | self._streamed(task)
            only_seeder = offer & lacking & ~cover
        if seeder.peer_id in child.parents:
            if not only_seeder:
                self._unlink(task, seeder, child)
        elif only_seeder and self._seeder_slot(task, seeder, child):
            self._link(task, seeder, child)

    def _borrow(self, task: _Task, child: _Peer, lacking: int, room: int) -> None:
        """Give `child`, left short of peer parents, up to `room` slots taken from children
        with parents to spare.

        Why: in a storm's first seconds the first holders' slots go to whoever asks first --
        mostly the other first holders, each with several parents -- and every later peer finds
        no free parent until a new generation of holders appears. Storm-A, 1000 hosts: at 1 s
        874 hosts had no parent at all while the 64 holders' 8 slots each fed one another;
        borrowing took the median from 1.45x to 1.40x the lower bound. The lender keeps a
        child's slot busy either way; the rich child loses one parent of at least
        ``borrow_from`` and learns it at its next call.

        Which slots: peers drawn at random from the task's holders (``borrow_sample`` draws,
        so the cost is bounded whatever the swarm's size), kept if in the child's zone, not
        banned, not shunned by the child, not already its parent and holding a piece it lacks;
        each lends the slot of its child with the most peer parents, if at least
        ``borrow_from``; the richest such children give first (ties: the lender's tie key).
        """
        holders = task.holders
        floor = self._config.borrow_from
        draws = min(self._config.borrow_sample, len(holders))
        draw_index = self._rng.randrange
        if floor and not task.rich:
            # No child has a slot to lend (a storm's first seconds, when most calls come
            # here): the same draws all the same, so that the rng's stream, and every later
            # decision, is what the full look would have left.
            for _ in range(draws):
                draw_index(len(holders))
            return
        offers: list[tuple[int, float, int, _Peer, _Peer]] = []
        for draw in range(draws):
            lender = holders[draw_index(len(holders))]
            if not self._may_lend(task, lender, child, lacking):
                continue
            richest: _Peer | None = None
            most = floor - 1
            for other in lender.children.values():
                if other.peer_parents > most:
                    richest, most = other, other.peer_parents
            if richest is not None:
                offers.append((-most, lender.tie, draw, lender, richest))
        offers.sort(key=lambda offer: offer[:3])
        for _, _, _, lender, richest in offers:
            if not room:
                return
            if lender.peer_id in child.parents or richest.peer_id not in lender.children:
                continue  # drawn twice, or this child already gave its slot
            if richest.peer_parents < floor:
                continue  # it gave a slot since it was drawn: too few left
            self._unlink(task, lender, richest)
            self._link(task, lender, child)
            room -= 1

    def _may_lend(self, task: _Task, lender: _Peer, child: _Peer, lacking: int) -> bool:
        """Whether a holder drawn by `_borrow` or `_even_out` may give `child` a slot: in its
        zone, still in the task, not banned, not shunned by it, not already its parent, not
        itself, and holding a piece it lacks."""
        return (
            lender.zone == child.zone
            and lender is not child
            and task.peers.get(lender.peer_id) is lender
            and lender.peer_id not in task.banned
            and lender.peer_id not in child.parents
            and lender.peer_id not in child.shunned
            and bool(lender.pieces.bits & lacking)
        )

    def _even_out(self, task: _Task, child: _Peer, lacking: int) -> None:
        """Give `child`, its host's only download here, slots taken from children whose host
        has at least two more peer parents here than its own (in all their downloads), until
        it has ``max_parents``; a lending child keeps more than ``borrow_below`` in this task.

        Why: a parent shares its uplink among its children, so a host's download rate follows
        the number of its parents in all its downloads. When a host's other layers are done,
        the parents they had go to whoever calls next, and its last layer keeps the few it had
        (borrowing stops at ``borrow_below``). Slow-hosts preset, 1000 hosts: the slowest fast
        hosts ran their 800 MiB layer on three parents, at ~0.4 of their downlink, from 4 s
        to 9 s while most had eight; p99 1.33 -> 1.11 the bound, max 1.42 -> 1.16. Two more,
        not one: a slot moves only towards the poorer host, never back and forth. Only for a
        host's only download: evening out every download cost the zones preset's median 2 %
        (slots taken early from the hosts carrying a zone's first copies).

        Which slots: as `_borrow` (``borrow_sample`` draws among the holders, the same
        filters), each lender offering its child whose host has the most peer parents.
        """
        config = self._config
        totals = self._host_parents
        keep = config.borrow_below
        holders = task.holders
        draw_index = self._rng.randrange
        mine = totals.get(child.peer_id, 0)
        offers: list[tuple[int, float, int, _Peer, _Peer]] = []
        for draw in range(min(config.borrow_sample, len(holders))):
            lender = holders[draw_index(len(holders))]
            if not self._may_lend(task, lender, child, lacking):
                continue
            richest: _Peer | None = None
            most = mine + 1
            for other in lender.children.values():
                total = totals.get(other.peer_id, 0)
                if total > most and other.peer_parents > keep:
                    richest, most = other, total
            if richest is not None:
                offers.append((-most, lender.tie, draw, lender, richest))
        offers.sort(key=lambda offer: offer[:3])
        for _, _, _, lender, richest in offers:
            mine = totals.get(child.peer_id, 0)
            if mine >= config.max_parents or child.peer_parents >= config.max_parents:
                return
            if lender.peer_id in child.parents or richest.peer_id not in lender.children:
                continue  # drawn twice, or this child already gave its slot
            if totals.get(richest.peer_id, 0) < mine + 2 or richest.peer_parents <= keep:
                continue  # it gave a slot since it was drawn, or this child has more now
            self._unlink(task, lender, richest)
            self._link(task, lender, child)

    def _candidates(self, task: _Task, child: _Peer, lacking: int, wanted: int) -> list[_Peer]:
        """The `wanted` best new parents for `child`, best first (see the docstring)."""
        zone = child.zone
        picked = self._rank(task, zone, child, lacking, wanted, False)
        # Links between zones are scarce: other zones fill in, up to a cap per child.
        cross = sum(1 for p in child.parents.values() if p.zone != zone and not p.is_seeder)
        room = min(wanted - len(picked), self._config.max_cross_zone_parents - cross)
        if room > 0:
            # ...and only for what the child's zone is short of
            scarce = lacking & self._zone_scarce(task, zone, child)
            others: list[tuple[bool, float, int, float, str]] = []
            for other in task.free:
                if other != zone and scarce:
                    others += self._rank(task, other, child, scarce, room, True)
            picked += heapq.nsmallest(room, others)
        return [task.peers[key[-1]] for key in picked]

    @staticmethod
    def _rank(
        task: _Task, zone: str, child: _Peer, lacking: int, wanted: int, foreign: bool
    ) -> list[tuple[bool, float, int, float, str]]:
        """The `wanted` best keys among the free peers of `zone` holding some piece of
        `lacking`, best first. The child itself needs no check: it never holds a piece it
        lacks."""
        if zone not in task.free:
            return []
        best = task.ranked[zone].best(lacking, wanted, child.parents, child.shunned)
        return [(foreign, *key) for key in best]


_EWMA = 0.1  # weight of a new sample in the scheduler's moving averages
# Pieces one child may claim from the seeder at a time under the one-copy rule: it fetches one
# at a time from a parent anyway, and one more keeps that parent busy.
_MAX_CLAIMS = 2


def _first_bits(bits: int, n: int) -> int:
    """The `n` lowest set bits of `bits`."""
    out = 0
    while bits and n:
        low = bits & -bits
        out |= low
        bits ^= low
        n -= 1
    return out


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + _EWMA * (sample - mean)


def _check_id(peer_id: str) -> None:
    if not isinstance(peer_id, str) or not peer_id:
        raise SchedulerError(f"peer id must be a non-empty string, got {peer_id!r}")
