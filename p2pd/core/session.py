"""One peer's download of one blob through the swarm: the policy around the piece picker.

A `DownloadSession` decides everything about a swarm download that is not moving bytes: which
pieces to fetch from which parent (through its `PiecePicker`), when to tell the supernode what
arrived and ask for parents again, which parents to give up on, and when the swarm has failed
this blob. The p2pd daemon (`p2pd/swarm.py`) drives it with real transfers and a real
supernode; the storm simulator drives it with simulated ones. Same code, two drivers.

Driving it::

    session.apply(state, known, parents, now, pace, seeder_address)  # each supernode reply
    loop:
        out = session.poll(now)                    # advance timers, collect decisions
        cancel out.cancel; start out.fetch         # transfers
        send out.reports; apply each reply
        if out.gave_up: fall back to the registry
        if out.announce: pieces, want = session.take_announce(); send; apply the reply
        if session.is_complete(): done
        wait for a transfer result or session.next_wakeup()
        session.on_received(request)               # bytes here, being verified (optional)
        session.on_piece(request, ok, now, parent_has) / session.on_failure(request, not_found, now)
        session.exhausted() -> parents to watch; session.on_have(parent, pieces)  # (optional)

Rules:
- Pieces become fetchable only once their hash is known (``known`` of the manifest), or,
  with ``stream_ahead``, up to that many pieces after them while a parent offers them: the
  seeder streaming them cut-through (`Scheduler.seeder_progress`). The driver checks such a
  piece only once its hash came with a later reply, and asks for one soon (`hashes_wanted`).
- Announces are batched every ``announce_interval``; while nothing is in flight (no parents yet,
  the seeder still reading) the session asks sooner, from ``min_announce_gap`` doubling back to
  the interval, so idle peers stay cheap for the supernode.
- While the peer holds less than ``early_bytes`` of the blob it calls the supernode (announce
  and ask for parents) at least every ``early_announce_interval``, idle or not. Early in a
  download each new piece is a large share of what the peer can offer, and in a storm every
  peer is early at once: a piece reaches the swarm hop by hop, and each hop waits for the
  holder's announce and then for the child's next call. Measured on Storm-A (200 hosts):
  1.48x -> 1.29x of the bound for about fifty more messages per host; fast announces all the
  way only cost more messages. (Without the idle peers in it: 1.48x -- peers still waiting
  for their first piece are the very ones that must find the first holders.) The threshold is
  in bytes, not pieces, so that it means the same whatever the piece size: with 2 MiB pieces
  a threshold of 40 pieces (what 160 MiB was at 4 MiB) left Storm-A at 200 hosts at 1.29x
  the bound where 80 pieces gave 1.17x.
- The intervals are short (announces every 0.2 s, early ones every 0.05 s, an idle peer's
  from 0.01 s): the supernode's pacing (`Scheduler.pace`), not the peer's timer, is what keeps
  a large fleet's calls within what it can answer, and in a small one a piece's news should
  travel at once. Storm simulator, 1000 hosts, with the supernode answering 10 400 messages per
  second and pacing to 7800 (p50 / p99 / max of the bound; 1 s / 0.2 s / 0.05 s before):
  Storm-A 1.205 / 1.242 / 1.259 -> 1.191 / 1.203 / 1.208, `storm-a-cpu` (calls queue at the
  supernode) 1.222 / 1.268 / 1.292 -> 1.209 / 1.221 / 1.224, for 35 -> 63 messages per host.
  With the supernode at 7600 messages per second they made `storm-a-cpu` no faster (its
  queue grew): they pay only with a supernode fast enough for them.
- A download with nothing in flight is not paced (it needs parents) unless the supernode's
  replies come back later than ``slow_reply``: its calls queue, and the idle downloads' quick
  calls are what overrun it (see `apply`).
- A parent that served a bad piece, or failed ``max_connect_failures`` transfers in a row
  (refused, reset, garbled), is dropped, reported (bad piece / unreachable) and never taken
  back from an assignment.
- ``stall_timeout`` without a new verified piece, without a transfer in flight and without
  the seeder publishing a new piece -- or ``busy_stall_timeout`` without a verified or newly
  published piece, transfers in flight or not (a parent that takes requests and never
  delivers) -- or a task the supernode reports as failed -- means the swarm gave up on this
  blob (`Outbox.gave_up`); the driver falls back. A congested swarm
  (transfers slow, the seeder behind a slow registry) is not a failed one: falling back there
  sends every host to the registry at once, the very storm the swarm exists to prevent
  (measured in the storm simulator, 32 hosts behind a 100 Mbit/s supernode: 8.8x the image
  from the registry, and 33x when the seeder also fed everyone the same first pieces).
- Requests the session cancelled are off its books: a late result for one is ignored.
- Every announce taken is answered by an `apply` (or the driver gives up). Until then no rule
  pulls the announce timer in: the reply brings what an early call would ask for.
- A reply that no longer names a parent cancels what is still coming from it, but not pieces
  whose bytes are in: those are checked, and the parent dropped once their verdicts are in.
  Which comes first, a reply or the verdict of bytes that arrived at the same moment, is a
  race in the daemon; neither rule lets the outcome hang on it.
- What a parent says of itself (its bitfield in a piece response or a watch's answer) is taken
  only from a parent the supernode offers in full: a peer of this host's zone that is not the
  seeder (`offered_in_full`; the seeder's offers are its rare-piece claims, a parent's in
  another zone are rationed by zone claims: `Scheduler._assignment`). Only those are watched.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import PieceLayout
from p2pd.core.picker import BadParent, Cancel, PickerConfig, PiecePicker, Request

# Report reasons understood by the supernode (see Scheduler.report_bad_piece/_unreachable).
REPORT_BAD_PIECE = "hash mismatch"
REPORT_UNREACHABLE = "unreachable"
# The longest gap between calls a supernode's pacing can ask for: well inside its peer TTL
# (60 s by default), so a paced peer is never expired for silence.
MAX_PACE = 10.0


@dataclass(frozen=True, slots=True)
class SessionConfig:
    announce_interval: float = 0.2
    min_announce_gap: float = 0.01
    early_announce_interval: float = 0.05
    early_bytes: int = 160 * 1024 * 1024  # 0: no early announces
    stall_timeout: float = 15.0
    # Transfers in flight hold off the stall timeout, but not for ever: a parent that takes
    # requests and never delivers (requests expire and are asked again) must not keep the
    # download in the swarm. No verified piece for this long gives up regardless.
    busy_stall_timeout: float = 60.0
    max_connect_failures: int = 2
    # A parent whose pieces come at less than this share of the median rate of our parents
    # is set aside for the rest of the download (0: never); see `_judge_speed`.
    slow_parent_ratio: float = 0.2
    slow_parent_samples: int = 2  # pieces from it before it is judged
    # Pieces past the known hashes that may be asked of a parent offering them (the seeder
    # streaming them); 0 = only hashed pieces. The daemon takes its seeder's cut-through
    # (p2pd.peers.STREAM_AHEAD); the storm simulator does not model it.
    stream_ahead: int = 0
    # A reply to an announce slower than this tells of calls queueing at the supernode:
    # until one comes back faster, a download with nothing in flight waits the supernode's
    # pace between calls too (see `apply`); 0: never. Above a round trip on a LAN or within
    # a region, so that only a queue crosses it. Storm simulator, `storm-10k-cpu`: 0.05 s
    # 2.52x the bound at the median, 0.1 s 2.59x, any reply (always paced) 2.67x, never
    # 2.86x; `storm-a-cpu` (1000 hosts): 0.02 / 0.05 / 0.2 s alike (1.119-1.122x; never 1.129x).
    slow_reply: float = 0.05
    picker: PickerConfig = field(default_factory=PickerConfig)


@dataclass(frozen=True, slots=True)
class ParentView:
    """A parent as an assignment names it."""

    peer_id: str
    address: str
    pieces: Bitfield
    zone: str = ""


class Parent(Protocol):
    """What `DownloadSession.apply` reads of a parent: a `ParentView`, or any object with
    these fields. The storm simulator passes the scheduler's `ParentInfo` as it is rather
    than copying every parent of every reply into a view (a tenth of its `apply` time)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def pieces(self) -> Bitfield: ...

    @property
    def zone(self) -> str: ...


class Outbox:
    """What the driver must do now, in this order: cancel, fetch, report, announce.

    A plain class rather than a dataclass: every `poll` makes one, and the dataclass's
    ``__init__`` (a default factory per list) took twice as long."""

    __slots__ = ("announce", "cancel", "fetch", "gave_up", "reports")

    def __init__(self) -> None:
        self.cancel: list[Request] = []
        self.fetch: list[Request] = []
        self.reports: list[tuple[str, int, str]] = []  # parent, piece, reason
        self.announce = False
        self.gave_up: str | None = None


class DownloadSession:
    def __init__(
        self,
        layout: PieceLayout,
        peer_id: str,
        rng: random.Random,
        config: SessionConfig | None = None,
        have: Bitfield | None = None,
        now: float = 0.0,
        zone: str = "",
    ) -> None:
        self.layout = layout
        self.peer_id = peer_id
        self.zone = zone  # this host's: parents of it are offered in full (`offered_in_full`)
        self.config = config or SessionConfig()
        self.picker = PiecePicker(layout, rng, self.config.picker, have=have)
        self.addresses: dict[str, str] = {}
        self.live: set[Request] = set()
        self.completed: list[int] = []
        self.shunned: set[str] = set()
        self.slow: set[str] = set()  # parents set aside as slow (`_judge_speed`); not reported
        self._asked: dict[Request, float] = {}  # when each live request was made
        self._rates: dict[str, tuple[float, int]] = {}  # parent -> (bytes/s, pieces measured)
        self._fastest = 0.0  # the highest of those averages ever: above any median of them
        # Parents the supernode took away while pieces of theirs were being checked: kept on
        # the picker's books, offering nothing, until those verdicts are in (see `_let_go`).
        self.leaving: set[str] = set()
        self.failures: dict[str, int] = {}
        # Pieces parents' own responses showed them to hold (`on_piece`'s parent_has), by
        # parent: a reply's older view of them must not take these back.
        self._fresh: dict[str, int] = {}
        # Parents of the last reply the supernode offers in full (`offered_in_full`), less
        # those dropped since: never a parent let go, nor one off the picker's books
        self._in_full: set[str] = set()
        self.known = 0
        self.requestable = 0  # >= known: also the pieces parents stream (see apply)
        self.failed_task = False
        self.last_progress = now  # a verified piece, or the seeder publishing a new one
        self.last_busy = now  # the last poll that found transfers in flight
        self.next_announce = now + self.config.announce_interval
        self.last_announce = now
        self.idle_gap = self.config.min_announce_gap
        self.awaiting_reply = False  # an announce was taken and its reply not applied yet
        self.pace = 0.0  # the supernode's floor on the gap between our calls
        self.queued = False  # the last announce's reply was slow: the supernode is behind
        # early_bytes in whole pieces (rounded up; the blob's last piece may be shorter)
        self._early_pieces = -(-self.config.early_bytes // max(1, layout.piece_size))
        self._out = Outbox()
        # Inputs taken (each input method counts one), and when the last poll that left
        # nothing pending was, with that count: a poll again at that instant with no input
        # since has nothing to hand over (see `poll`).
        self._inputs = 0
        self._quiet: tuple[float, int] = (-1.0, -1)

    # -- queries ------------------------------------------------------------------------------

    @property
    def have(self) -> Bitfield:
        return self.picker.have

    def is_complete(self) -> bool:
        return self.picker.is_complete()

    def next_wakeup(self) -> float:
        """When `poll` has something to do even if no transfer finishes."""
        # Comparisons, not min() and max(): drivers ask after every event.
        config = self.config
        progress, busy = self.last_progress, self.last_busy
        wake = self.next_announce
        stall = (progress if progress > busy else busy) + config.stall_timeout
        wake = stall if stall < wake else wake
        stall = progress + config.busy_stall_timeout
        wake = stall if stall < wake else wake
        deadline = self.picker.next_deadline()
        return wake if deadline is None or wake <= deadline else deadline

    # -- inputs -------------------------------------------------------------------------------

    def apply(
        self,
        state: str,
        known: int,
        parents: Iterable[Parent],
        now: float,
        pace: float = 0.0,
        seeder_address: str | None = None,
    ) -> None:
        """A supernode reply: the task's state, how many hashes are known, the parents, and
        the fewest seconds it wants between our calls (`pace`: it is busy; 0 = our timing).
        Pacing stretches the announce timers of a peer with transfers under way; not the
        calls of an idle one (it needs new parents, and its back-off doubles anyway: churn
        storm, p99 2.08x -> 1.77x the bound) while the supernode keeps up, not reports of bad
        or unreachable parents, and never beyond MAX_PACE. `seeder_address`: where the
        supernode's seeder is (its own address), to tell it from the peers (`offered_in_full`).

        The reply to an announce that took longer than ``slow_reply`` to come back says the
        supernode's calls queue: it gets more than it answers, and every reply, to every
        peer, is late by the queue. Then an idle download waits the pace too, until a reply
        comes back in time again. Idle downloads are what overruns it: the pace is reckoned
        for calls once per interval, while a download waiting for parents calls every 0.01 to
        0.2 s (storm simulator, 10 000 hosts behind one supernode answering 10 400 messages
        per second: ~26 000 messages/s asked; replies a second late). A supernode that keeps
        up is not slowed by it: the same download's calls are what spread the first pieces
        (session 14, Storm-A with idle downloads paced whatever the reply time: 1.089 -> 1.135
        the bound at the median). The last reply alone decides, so a download lets go as soon
        as the queue drains: with the reply time smoothed (1/8 per reply, as TCP does) every
        download stayed paced at 10 000 hosts, 2.67x the bound against 2.52x."""
        self._inputs += 1
        if self.awaiting_reply and self.config.slow_reply:
            self.queued = now - self.last_announce > self.config.slow_reply
        self.awaiting_reply = False
        self.pace = min(max(0.0, pace), MAX_PACE)
        if self.pace:
            self.next_announce = max(self.next_announce, now + self.pace)
        if state == "failed":
            self.failed_task = True
            return
        known = min(known, self.layout.count)
        if known > self.known:
            # the seeder is still bringing the blob in: the swarm is alive, merely behind it
            self.last_progress = max(self.last_progress, now)
            self.known = known
        wanted = {
            p.peer_id: p
            for p in parents
            if p.peer_id != self.peer_id and p.peer_id not in self.shunned
        }
        if self.slow:
            self._keep_slow_aside(wanted)
        # pieces right after the known hashes that a parent offers: it streams them
        requestable = max(self.known, self.requestable)
        end = min(self.layout.count, self.known + self.config.stream_ahead)
        if requestable < end:
            offered = 0
            for info in wanted.values():
                offered |= info.pieces.bits
            while requestable < end and offered >> requestable & 1:
                requestable += 1
        self.requestable = requestable
        self.picker.set_verifiable(requestable)
        for parent in self.picker.parents():
            if parent not in wanted:
                self._let_go(parent)
        fresh = self._fresh
        zone, in_full = self.zone, self._in_full
        in_full.clear()
        for parent_id, info in wanted.items():
            if info.zone == zone and info.address != seeder_address:
                in_full.add(parent_id)
            self.addresses[parent_id] = info.address
            self.leaving.discard(parent_id)
            self.picker.add_parent(parent_id, info.pieces, fresh.get(parent_id, 0))

    def on_received(self, request: Request) -> None:
        """A transfer's bytes arrived, or their last ones are about to (the daemon calls it
        shortly before the end so that the parent's next request overlaps them); they are
        then checked and written, and `on_piece` follows. The parent's slot is free
        meanwhile (see the picker), and the session may act on that before the verdict (a
        request to that parent; the starved announce in `poll`): drivers that model the
        daemon (the storm simulator) call it and poll before `on_piece` even when the
        verdict is due at the same instant."""
        self._inputs += 1
        if request in self.live:
            self.picker.on_received(request.parent, request.index)

    def on_piece(
        self, request: Request, ok: bool, now: float, parent_has: Bitfield | None = None
    ) -> bool:
        """A transfer delivered its bytes; `ok` says they matched the manifest (the driver
        wrote them). `parent_has` is the parent's bitfield as its response carried it: fresher
        than the supernode's, which lags by an announce interval; what it adds is kept
        whatever later replies say of the parent (a parent's pieces only grow while it is
        ours). Taken only from a parent the supernode offers in full (`offered_in_full`).
        Returns True when this was a new verified piece."""
        self._inputs += 1
        if request not in self.live:
            return False  # cancelled meanwhile: the picker has already moved on
        self.live.discard(request)
        asked = self._asked.pop(request, now)
        self.failures.pop(request.parent, None)
        if parent_has is not None:
            self._take_word(request.parent, parent_has)
        for action in self.picker.on_piece(request.parent, request.index, ok, now):
            if isinstance(action, Cancel):
                self._cancel(Request(action.parent, action.index))
                self._settle(action.parent)
            elif isinstance(action, BadParent):
                self.shunned.add(action.parent)
                self._out.reports.append((action.parent, action.index, REPORT_BAD_PIECE))
                self._drop_parent(action.parent)
        self._settle(request.parent)
        if ok:
            self.completed.append(request.index)
            self.last_progress = now
            self.idle_gap = self.config.min_announce_gap
            if now > asked:
                self._judge_speed(request.parent, self.layout.length(request.index) / (now - asked))
        return ok

    def on_have(self, parent: str, pieces: Bitfield) -> None:
        """A parent's bitfield, sent when it got a piece while we were watching it (see
        `exhausted`); taken as `on_piece`'s `parent_has` is."""
        self._inputs += 1
        self._take_word(parent, pieces)

    def offered_in_full(self, parent: str) -> bool:
        """Whether the last reply offered all `parent` holds, so that what it says of itself
        may be taken: a peer of our zone, not the seeder. The seeder's offers are its
        rare-piece claims and a parent's in another zone are rationed by zone claims
        (`Scheduler._assignment`): their own word would undo that rationing."""
        return parent in self._in_full

    def exhausted(self) -> list[str]:
        """Parents offered in full that offer nothing we lack: to watch for their next
        piece."""
        in_full = self._in_full
        return [p for p in self.picker.exhausted() if p in in_full]

    def known_of(self, parent: str) -> int:
        """How many pieces `parent` was said to hold, corrupt ones included: what a watch of
        it names, so that its answer at once always brings a piece we did not know of."""
        return self.picker.reported(parent).bit_count()

    def _take_word(self, parent: str, pieces: Bitfield) -> None:
        """What `parent` said it holds: kept (`_fresh`) and offered to the picker, if it is
        a parent of ours offered in full and the bitfield is of this blob's layout."""
        if pieces.length == self.layout.count and parent in self._in_full:
            self._merge(parent, pieces.bits)

    def _merge(self, parent: str, bits: int) -> None:
        self._fresh[parent] = self._fresh.get(parent, 0) | bits
        self.picker.add_pieces(parent, bits)

    def on_failure(
        self, request: Request, not_found: bool, now: float, *, busy: bool = False
    ) -> None:
        """A transfer failed. `not_found`: the parent answered it lacks the piece; `busy`: it
        had no free upload slot. Neither counts against the parent; anything else does."""
        self._inputs += 1
        if request not in self.live:
            return
        self.live.discard(request)
        self._asked.pop(request, None)
        self.picker.on_failure(request.parent, request.index, lacks_piece=not_found)
        self._settle(request.parent)
        if not_found or busy:
            return
        parent = request.parent
        self.failures[parent] = self.failures.get(parent, 0) + 1
        if self.failures[parent] >= self.config.max_connect_failures:
            # a killed host looks alive to the supernode until its TTL: say so now
            self.shunned.add(parent)
            self._out.reports.append((parent, request.index, REPORT_UNREACHABLE))
            self._drop_parent(parent)

    # -- outputs ------------------------------------------------------------------------------

    def poll(self, now: float) -> Outbox:
        """Advance timers to `now` and hand over every decision made since the last poll.

        A poll at the instant of the last one, with no input since and nothing handed over
        by that one that stays due (an announce, a give-up), finds nothing new and returns at
        once: the drivers poll again after every fetch, in case starting it failed at once,
        and most do not."""
        if self._quiet == (now, self._inputs):
            if self.live:
                self.last_busy = now
            if not self.picker.is_complete():
                self.picker.pass_turn()
            return Outbox()
        for request in self.picker.expire(now):
            self.live.discard(request)
            self._asked.pop(request, None)
            self._out.cancel.append(request)
            self._settle(request.parent)
        complete = self.picker.is_complete()  # neither expiring nor picking changes it
        if self.failed_task:
            self._out.gave_up = "the supernode could not fetch the blob from the registry"
        # The timeouts are tested as `next_wakeup` computes them (a sum, not a difference):
        # `(t + 15) - t` can round below 15, and a driver woken at the time next_wakeup
        # gave then found nothing to do and was given the same time again (the storm
        # simulator spun at one instant).
        elif not complete and now >= self.last_progress + self.config.busy_stall_timeout:
            self._out.gave_up = (
                f"no piece arrived for {self.config.busy_stall_timeout:g} s, transfers in "
                f"flight or not ({self.picker.have.count()}/{self.layout.count} pieces)"
            )
        elif self.live:
            # transfers are under way (each has its own deadline): waiting on them is not a
            # stall, however congested the swarm is -- up to busy_stall_timeout
            self.last_busy = now
        elif (
            not complete
            and now >= max(self.last_progress, self.last_busy) + self.config.stall_timeout
        ):
            self._out.gave_up = (
                f"no piece arrived for {self.config.stall_timeout:g} s "
                f"({self.picker.have.count()}/{self.layout.count} pieces)"
            )
        if self._out.gave_up is None and not complete:
            fresh = self.picker.pick(now)
            if fresh:  # most polls pick nothing
                self.live.update(fresh)
                for request in fresh:
                    self._asked[request] = now
                self._out.fetch.extend(fresh)
            if self.awaiting_reply:
                # An announce's reply is due: it brings the parents and pieces the rules
                # below would ask for. The daemon often applies it after the verdicts of the
                # same instant, and a timer pulled in then outlived the moment: a peer its
                # last piece left idle announced again 0.05 s later, mid-piece, and was moved
                # off the parent sending it (full-stack storm, 8 hosts); at 16 hosts such
                # calls came all at once and the outcome hung on their order (p50 0.245 s
                # or 0.342 s from run to run).
                pass
            elif not self.live:
                gap = self.idle_gap
                if self.queued and self.pace > gap:
                    gap = self.pace
                self.next_announce = min(self.next_announce, now + gap)
            elif self.completed and not fresh and not self.picker.receiving():
                # Starved: every request in flight has its bytes (being checked) and no
                # parent offers anything more. The supernode may be waiting for news of what
                # we finished before it offers more (the seeder's one-copy claims): tell it
                # now rather than at the next tick (one host alone behind the seeder: the
                # parent idled a round trip per piece for it).
                self.hashes_wanted(now)
            if now >= self.next_announce:
                self._out.announce = True
        out, self._out = self._out, Outbox()
        if not out.announce and out.gave_up is None:
            self._quiet = (now, self._inputs)
        return out

    def hashes_wanted(self, now: float) -> None:
        """Call the supernode as soon as pacing allows: pieces wait for news from it (their
        hashes, or more pieces on offer)."""
        self._inputs += 1
        soonest = self.last_announce + max(self.config.min_announce_gap, self.pace)
        self.next_announce = min(self.next_announce, max(now, soonest))

    def may_ride_along(self, now: float) -> bool:
        """Whether this session's announce may go now, with another download's of this host
        to the same supernode in one message (`wire.AnnounceBatch`), before its own timer:
        it is not complete (so it has news or wants parents) and at least half of its own
        gap since the last announce has passed. Joining a due call costs the supernode a
        fraction of a message and aligns the host's downloads on one timer; the half keeps a
        download whose timer runs fast (an idle one's back-off) from dragging the others into
        every call of its own: a rider calls at most twice as often as it would alone."""
        if self.is_complete():
            return False
        gap = max(self.config.min_announce_gap, (self.next_announce - self.last_announce) / 2)
        return now - self.last_announce >= gap

    def take_announce(self, now: float) -> tuple[list[int], bool]:
        """The pieces completed since the last announce; restarts the announce timer."""
        self._inputs += 1
        if not self.live:
            self.idle_gap = min(2 * self.idle_gap, self.config.announce_interval)
        interval = self.config.announce_interval
        if self.picker.have_count() < self._early_pieces:
            interval = min(interval, self.config.early_announce_interval)
        self.next_announce = now + max(interval, self.pace)
        self.last_announce = now
        self.awaiting_reply = True
        batch, self.completed = self.completed, []
        return batch, not self.is_complete()

    # -- internals ----------------------------------------------------------------------------

    def _cancel(self, request: Request) -> None:
        if request in self.live:
            self.live.discard(request)
            self._asked.pop(request, None)
            self._out.cancel.append(request)

    def _let_go(self, parent: str) -> None:
        """The supernode's reply no longer names `parent`. Requests whose bytes are still
        coming are cancelled, but pieces whose bytes are in (being checked, or due within the
        daemon's lead time) are kept: the parent is dropped only once their verdicts are in.
        A starved peer announces exactly then (see `poll`), and a reply moving it to other
        parents threw those bytes away: the piece was fetched again from the new parent,
        behind its other children (16 hosts, the storm simulator driving the session in the
        daemon's order: a 4 MiB layer's second piece, in hand at 0.149 s, was had at
        0.283 s). In the daemon the reply takes a round trip and the verdict a hash and a
        write: on a LAN either may come first."""
        checking = self.picker.received(parent) if parent not in self.leaving else []
        if not checking:
            if parent not in self.leaving:
                self._drop_parent(parent)
            return
        self.leaving.add(parent)
        self.picker.update_parent(parent, Bitfield(self.layout.count))  # nothing more from it
        for request in [r for r in self.live if r.parent == parent]:
            if request.index not in checking:
                self.picker.on_failure(parent, request.index)
                self._cancel(request)

    def _judge_speed(self, parent: str, rate: float) -> None:
        """Fold a piece's rate from `parent` (bytes over the time from request to verdict)
        into its average, and set the parent aside if it is far slower than our others.

        Why: a parent on a slow link (a 100 Mbit/s host in a 1 Gbit/s fleet) shares that link
        among its children, so each of its pieces takes ten or more times as long as from a
        fast parent, and in the storm simulator the fast hosts that drew such parents were the
        slowest of all (`slow-hosts` preset: the last 2 % of fast hosts got ~45 pieces each
        from slow parents). A parent slower than ``slow_parent_ratio`` of the median of our
        measured parents, after ``slow_parent_samples`` pieces, is dropped for the rest of
        this download, unless a later reply has it alone offering something we lack (see
        `_keep_slow_aside`). The supernode is not told: an older supernode would take any
        report but "unreachable" for a bad piece. The rate is relative, so a slow host's own
        parents -- all capped by its link -- look alike and none is dropped. Never dropped:
        the last two parents, and a parent that alone offers something we lack (the seeder
        is linked for exactly such pieces). Measured (`p2p-bench storm --preset slow-hosts`):
        p50 / p99 / max of each host's own bound 1.31 / 1.91 / 2.08 -> 1.31 / 1.78 / 2.01;
        the storms of hosts alike are unchanged.
        """
        old, count = self._rates.get(parent, (rate, 0))
        average = rate if not count else (old + rate) / 2
        count += 1
        self._rates[parent] = (average, count)
        self._fastest = max(self._fastest, average)
        config = self.config
        if (
            not config.slow_parent_ratio
            or count < config.slow_parent_samples
            or average >= config.slow_parent_ratio * self._fastest
        ):
            return  # (no median of our parents' rates is above the fastest ever measured)
        picker = self.picker
        current = picker.parents()
        if parent in self.leaving or parent not in current or len(current) <= 2:
            return
        rates = self._rates
        measured = sorted([rates[p][0] for p in current if p in rates])
        if len(measured) < 3 or average >= config.slow_parent_ratio * measured[len(measured) // 2]:
            return
        others = 0
        for p in current:
            if p != parent:
                others |= picker.offers(p)
        if picker.offers(parent) & ~picker.have.bits & ~others:
            return  # the only one offering something we lack (the seeder's rare pieces)
        self.slow.add(parent)
        self._drop_parent(parent)

    def _keep_slow_aside(self, wanted: dict[str, Parent]) -> None:
        """Leave out of `wanted` the parents set aside as slow, except one that now alone
        offers something we lack: it is taken back (slow beats none). Above all the seeder:
        the supernode links it for exactly such pieces, and while it is slow (behind a slow
        registry) it hands each rare piece to one child at a time; a child ignoring it would
        hold those pieces from everyone."""
        cover = 0
        for peer_id, info in wanted.items():
            if peer_id not in self.slow:
                cover |= info.pieces.bits
        lacking = ~self.picker.have.bits & ~cover
        for peer_id in [p for p in wanted if p in self.slow]:
            if wanted[peer_id].pieces.bits & lacking:
                self.slow.discard(peer_id)
            else:
                del wanted[peer_id]

    def _settle(self, parent: str) -> None:
        """Drop a parent that was let go once its last request is over."""
        if parent in self.leaving and not any(r.parent == parent for r in self.live):
            self.leaving.discard(parent)
            self.picker.remove_parent(parent)
            self._fresh.pop(parent, None)

    def _drop_parent(self, parent: str) -> None:
        self._in_full.discard(parent)
        self.leaving.discard(parent)
        self._fresh.pop(parent, None)
        if parent in self.picker.parents():
            self.picker.remove_parent(parent)
        for request in [r for r in self.live if r.parent == parent]:
            self._cancel(request)
