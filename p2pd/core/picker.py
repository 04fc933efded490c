"""The peer-side piece picker: which piece to ask which parent for.

One `PiecePicker` lives for one blob download on one peer. The daemon (trio) and the storm
simulator drive the same object: they tell it what the parents hold, what came back and what
time it is, and it answers with actions (`Request`, `Cancel`, `BadParent`). It never reads a
clock, touches a socket or uses global randomness, so the same seed and the same events give
the same decisions.

Piece life-cycle
----------------
Each piece is MISSING, DOWNLOADING (at least one request in flight) or HAVE (verified). The
legal transitions are `PIECE_TRANSITIONS`::

    MISSING     -> DOWNLOADING   first request for it issued by `pick`
    DOWNLOADING -> HAVE          a request delivered a verified piece (`on_piece(ok=True)`)
    DOWNLOADING -> MISSING       its last request failed, expired, was bad or its parent left

MISSING -> HAVE happens only at construction (resume from pieces already on disk). A piece
stays DOWNLOADING while endgame duplicates come and go; only the last request's end moves it.

Which pieces may be asked for
-----------------------------
Piece ``i`` may be requested from parent ``P`` only when P holds i, ``i < verifiable`` (its
hash is in the manifest, so we can check it), we do not HAVE it, and P has fewer than
``max_in_flight_per_parent`` requests whose bytes are still coming. A request whose bytes
arrived, or whose last ones are about to (`on_received`), stays on the books until
`on_piece`, but no longer holds P's slot: the limit is about sharing P's upload, and checking
and writing the piece is local work, so the next request to P overlaps it (and the end of the
body) instead of leaving P's upload idle meanwhile.

Order of preference
-------------------
1. The prefix window ``[first_missing, first_missing + prefix_window)`` in index order: the
   runtime reads the blob front to back, so the next bytes it needs come first.
2. Rarest first: availability is how many of *this peer's* current parents hold the piece.
   Ties go to a per-piece priority, a seeded permutation drawn once at construction (so peers
   sharing parents spread out instead of all fetching the same piece); priorities are unique,
   so the order is total.

Parents take turns: `pick` walks the parents in id order, starting one further along on every
call, and gives each parent with a free slot the best piece *it* can serve, one slot per turn.
In normal mode a piece in flight is not requested again.

Endgame: once no parent holds a piece that is free to request (every verifiable missing piece
that any parent holds is in flight), a parent with a free slot may duplicate an in-flight piece
it holds and is not already serving, if fewer than ``endgame_duplicates`` requests for it are
in flight; fewest requests first, then the order above. The first verified copy wins and the
others come back as `Cancel`.

Failures
--------
A bad hash restores the request and returns `BadParent` for the supernode; that parent is not
asked for that piece again while it stays a parent, and after ``max_bad_pieces`` it is dropped
and its other requests come back as `Cancel`. A transfer error (`on_failure`) just restores the
request; with ``lacks_piece`` (the parent said 404) the piece also leaves that parent's bitfield
until it announces it again. A request older than ``request_timeout`` is failed by `expire`.
Requests the picker hands back to cancel (`Cancel`, `expire`, `remove_parent`) are already off
its books: the driver must not report them again. The one late result accepted quietly is one
for a piece already HAVE (an endgame race lost before its cancel landed).

Cost
----
Candidate sets are int bitmasks. Free pieces, availability levels and each parent's pieces are
also kept in *priority-rank space* (bit r is the piece with priority rank r), so the rarest,
best-priority candidate of a parent is the lowest set bit of ``parent & free & level[k]`` for
the first non-empty level k: a handful of big-int operations, no loop over pieces. Per-piece
loops happen only where bitfields change (a parent's new pieces, newly verifiable pieces).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Final, NamedTuple

from p2pd.core.bitfield import Bitfield, iter_bits
from p2pd.core.layout import PieceLayout


class PickerError(Exception):
    """Misuse by the caller: unknown parent, a piece not requested from that parent, …"""


@dataclass(frozen=True, slots=True)
class PickerConfig:
    # One request per parent: a parent's upload is shared by its children, so every extra
    # request in flight slows each piece's hop by as much again, and in a storm the hop time
    # is what sets how fast a piece reaches the swarm (Storm-A, 200 hosts: 4 -> 1 took the
    # median from 1.76x to 1.48x of the bound). Parallelism comes from several parents.
    max_in_flight_per_parent: int = 1
    # Optionally keep at least this many requests in flight in all, spread over the parents,
    # so that a peer with a single parent still pipelines (0: off). Off by default: in the
    # storm simulator (which has no per-request latency) 4 made Storm-A at 200 hosts 1.30x ->
    # 1.56x and an 8-host storm 2.2x -> 9.5x, as the seeder's children each took four
    # requests again; on loopback one request per parent costs the single-parent piece path
    # (see the issue notes). Needs a latency-aware measurement before it is turned on.
    pipeline_depth: int = 0
    endgame_duplicates: int = 2
    prefix_window: int = 4
    request_timeout: float = 30.0
    max_bad_pieces: int = 1

    def __post_init__(self) -> None:
        if self.pipeline_depth < 0:
            raise PickerError("pipeline_depth must not be negative")
        if self.max_in_flight_per_parent < 1:
            raise PickerError("max_in_flight_per_parent must be at least 1")
        if self.endgame_duplicates < 1:
            raise PickerError("endgame_duplicates must be at least 1 (1 disables duplicates)")
        if self.prefix_window < 0:
            raise PickerError("prefix_window must not be negative")
        if not self.request_timeout > 0:
            raise PickerError("request_timeout must be positive")
        if self.max_bad_pieces < 1:
            raise PickerError("max_bad_pieces must be at least 1")


class PieceState(enum.Enum):
    MISSING = "."
    DOWNLOADING = "D"
    HAVE = "H"


PIECE_TRANSITIONS: Final = frozenset(
    {
        (PieceState.MISSING, PieceState.DOWNLOADING),
        (PieceState.DOWNLOADING, PieceState.HAVE),
        (PieceState.DOWNLOADING, PieceState.MISSING),
    }
)


class Request(NamedTuple):
    """A piece asked of a parent. A named tuple rather than a dataclass: requests key the
    session's and its drivers' books, and a tuple hashes and compares in C (the same hash
    as the frozen dataclass this was, so sets of requests iterate in the same order)."""

    parent: str
    index: int  # type: ignore[assignment]  # shadows tuple.index, which nothing here calls


@dataclass(frozen=True, slots=True)
class Cancel:
    parent: str
    index: int


@dataclass(frozen=True, slots=True)
class BadParent:
    parent: str
    index: int


def _lowest(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


class _Parent:
    __slots__ = (
        "bad",
        "banned",
        "bits",
        "bits_r",
        "busy",
        "inflight",
        "inflight_bits",
        "received_bits",
        "reported",
    )

    def __init__(self) -> None:
        self.reported = 0  # what the parent announced
        self.banned = 0  # pieces it served corrupt: never asked for again
        self.bits = 0  # reported & ~banned: what we may ask it for
        self.bits_r = 0  # the same, in rank space
        self.inflight: dict[int, int] = {}  # piece -> request sequence number
        self.inflight_bits = 0
        self.received_bits = 0  # those of `inflight` whose bytes arrived (being verified)
        # Slots taken: requests in flight whose bytes are still coming. A counter, not a
        # method: `pick` asks it of every parent on every call.
        self.busy = 0
        self.bad = 0


class PiecePicker:
    def __init__(
        self,
        layout: PieceLayout,
        rng: random.Random,
        config: PickerConfig = PickerConfig(),  # frozen, so one shared default is safe
        have: Bitfield | None = None,
    ) -> None:
        n = layout.count
        if have is not None and have.length != n:
            raise PickerError(f"have bitfield of {have.length} pieces for a layout of {n}")
        self._n = n
        self._config = config
        self._have = Bitfield(n) if have is None else have.copy()
        self._left = n - self._have.count()  # pieces not HAVE: drivers ask is_complete() a lot
        pieces = list(range(n))
        order = pieces.copy()
        rng.shuffle(order)
        self._order = order  # rank -> piece
        # piece -> rank, with the int objects of `order` (a storm holds tens of thousands)
        self._rank = [0] * n
        for r, i in enumerate(order):
            self._rank[i] = pieces[r]
        # for _to_rank's dense sets; built on first use
        self._rank_digits: Callable[[str], tuple[str, ...]] | None = None
        self._digits_format = f"0{n}b"
        self._verifiable = 0
        # Requestable in normal mode: verifiable, not HAVE, not in flight.
        self._free = 0
        self._free_r = 0
        self._downloading: dict[int, set[str]] = {}
        self._downloading_bits = 0
        self._by_avail_r = [(1 << n) - 1]  # level k: rank bits of pieces k parents hold
        self._parents: dict[str, _Parent] = {}
        self._names: list[str] = []  # sorted parent ids
        self._turn = 0
        self._busy = 0  # slots taken, summed over the parents (`_Parent.busy`)
        self._deadlines: list[tuple[float, int, str, int]] = []  # lazy: stale entries skipped
        self._seq = 0
        self._live = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def have(self) -> Bitfield:
        return self._have.copy()

    @property
    def verifiable(self) -> int:
        return self._verifiable

    def is_complete(self) -> bool:
        return not self._left

    def first_missing(self) -> int:
        return self._have.first_missing()

    def have_count(self) -> int:
        return self._have.count()

    def state(self, index: int) -> PieceState:
        self._check_index(index)
        if index in self._have:
            return PieceState.HAVE
        if index in self._downloading:
            return PieceState.DOWNLOADING
        return PieceState.MISSING

    def requesters(self, index: int) -> list[str]:
        """Parents piece `index` is in flight from, sorted."""
        self._check_index(index)
        return sorted(self._downloading.get(index, ()))

    def availability(self, index: int) -> int:
        self._check_index(index)
        return self._avail(index)

    def in_endgame(self) -> bool:
        """Nothing fresh to request: every missing piece a parent holds is in flight.

        Also true while no parent holds anything we still need.
        """
        return not self.is_complete() and not self._free_r & ~self._by_avail_r[0]

    def parents(self) -> list[str]:
        return list(self._names)

    def offers(self, parent: str) -> int:
        """What we may ask `parent` for, as bits (piece i is bit i)."""
        return self._parent(parent).bits

    def exhausted(self) -> list[str]:
        """Parents offering nothing we lack, in name order."""
        if not self._left:
            return []
        have, parents = self._have.bits, self._parents
        return [name for name in self._names if not parents[name].bits & ~have]

    def reported(self, parent: str) -> int:
        """What `parent` was said to hold, as bits, corrupt pieces from it included."""
        return self._parent(parent).reported

    def in_flight(self, parent: str) -> int:
        return len(self._parent(parent).inflight)

    def received(self, parent: str) -> list[int]:
        """Pieces in flight from `parent` whose bytes arrived (`on_received`), verdicts due."""
        return list(iter_bits(self._parent(parent).received_bits))

    def receiving(self) -> bool:
        """Some request's bytes are still coming (a slot is taken; see `on_received`)."""
        return self._busy > 0

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def __repr__(self) -> str:
        shown = "".join(self.state(i).value for i in range(min(self._n, 64)))
        more = "…" if self._n > 64 else ""
        return f"PiecePicker({shown}{more}, parents={self._names})"

    # -- manifest and parents -----------------------------------------------------------------

    def set_verifiable(self, known: int) -> None:
        """Pieces ``[0, known)`` have known hashes (or, from the session, streamed ones whose
        hashes the driver awaits); only those may be requested."""
        if type(known) is not int or not 0 <= known <= self._n:
            raise PickerError(f"verifiable count {known!r} out of range 0..{self._n}")
        if known < self._verifiable:
            raise PickerError(f"verifiable count went back from {self._verifiable} to {known}")
        if known == self._verifiable:
            return  # most replies: no new hash
        new = ((1 << known) - (1 << self._verifiable)) & ~self._have.bits
        self._verifiable = known
        self._free |= new
        self._free_r |= self._to_rank(new)

    def add_parent(self, parent: str, pieces: Bitfield, extra: int = 0) -> None:
        """A new parent, or a known one's bitfield replaced; `extra`: pieces it holds besides,
        by its own word (as `add_pieces` adds them, in one change of its pieces)."""
        self._check_bitfield(pieces)
        reported = pieces.bits | extra
        if extra and (extra < 0 or extra >> self._n):
            raise PickerError(f"bits set beyond the blob's {self._n} pieces")
        p = self._parents.get(parent)
        if p is None:
            p = self._parents[parent] = _Parent()
            bisect.insort(self._names, parent)
            self._by_avail_r.append(0)
        elif p.reported == reported:
            return  # the same as before: every reply names every parent again
        p.reported = reported
        self._set_bits(p, reported & ~p.banned)

    def update_parent(self, parent: str, pieces: Bitfield) -> None:
        """A parent's fresh bitfield; its requests in flight stay in flight either way."""
        self._check_bitfield(pieces)
        p = self._parent(parent)
        p.reported = pieces.bits
        self._set_bits(p, p.reported & ~p.banned)

    def add_pieces(self, parent: str, bits: int) -> None:
        """Pieces `parent` has besides those reported so far (its own word, fresher than the
        supernode's: see `DownloadSession.on_piece`)."""
        p = self._parent(parent)
        if bits & ~p.reported:
            if bits < 0 or bits >> self._n:
                raise PickerError(f"bits set beyond the blob's {self._n} pieces")
            p.reported |= bits
            self._set_bits(p, p.reported & ~p.banned)

    def remove_parent(self, parent: str) -> list[int]:
        """Drop `parent`; return the pieces that were in flight from it (now restored)."""
        self._parent(parent)
        return self._remove(parent)

    # -- picking ------------------------------------------------------------------------------

    def in_flight_limit(self) -> int:
        """Requests allowed in flight per parent with the current number of parents."""
        depth = self._config.pipeline_depth
        limit = self._config.max_in_flight_per_parent
        if depth and self._names:
            limit = max(limit, -(-depth // len(self._names)))
        return limit

    def pass_turn(self) -> None:
        """What a `pick` that can ask for nothing does: the next pick starts one parent on."""
        if self._names:
            self._turn += 1

    def pick(self, now: float) -> list[Request]:
        """Fill every parent's free slots; each piece picked becomes DOWNLOADING."""
        out: list[Request] = []
        names = self._names
        if not names:
            return out
        start = self._turn % len(names)
        self._turn += 1
        limit = self.in_flight_limit()
        parents = self._parents
        # Without pipelining the limit never changes, so no parent holds more than it and
        # the total of slots taken tells how many are free.
        free = -1 if self._config.pipeline_depth else limit * len(names) - self._busy
        if free == 0:
            return out  # every parent busy: most polls end here
        if free == 1:  # one parent has a free slot: found without rotating the names
            turn = [next((name, p) for name, p in parents.items() if p.busy < limit)]
        else:
            turn = [
                (name, parents[name])
                for name in names[start:] + names[:start]
                if parents[name].busy < limit
            ]
            if not turn:
                return out
        window = ((1 << self._config.prefix_window) - 1) << self._have.first_missing()
        while turn:
            again = []
            progress = False
            for name, p in turn:
                if not p.bits & self._free and self._free_r & ~self._by_avail_r[0]:
                    # nothing fresh for it while others have some (`_choose`'s first test,
                    # inline: idle parents are asked again in every round)
                    again.append((name, p))
                    continue
                index = self._choose(p, window)
                if index is None:
                    if self._free_r & ~self._by_avail_r[0]:
                        # Idle only until the fresh pieces run out: endgame may begin in
                        # this very call, and then this parent can take a duplicate.
                        again.append((name, p))
                    continue
                self._request(name, p, index, now)
                out.append(Request(name, index))
                progress = True
                if p.busy < limit:
                    again.append((name, p))
            if not progress:
                break
            turn = again
        return out

    def _choose(self, p: _Parent, window: int) -> int | None:
        if p.bits & self._free:
            in_window = p.bits & self._free & window
            if in_window:
                return _lowest(in_window)
            candidates = p.bits_r & self._free_r
            for level in self._by_avail_r[1:]:
                rarest = candidates & level
                if rarest:
                    return self._order[_lowest(rarest)]
            raise AssertionError("a held piece has no availability level")  # pragma: no cover
        if self._free_r & ~self._by_avail_r[0]:
            return None  # another parent can still get a fresh piece: not endgame yet
        best: tuple[int, int, int, int] | None = None
        most = self._config.endgame_duplicates
        for i in iter_bits(p.bits & self._downloading_bits & ~p.inflight_bits):
            count = len(self._downloading[i])
            if count < most:
                key = (count, *self._order_key(i, window))
                if best is None or key < best:
                    best = key
        return None if best is None else self._order[best[3]]

    def _order_key(self, index: int, window: int) -> tuple[int, int, int]:
        # (window first, then availability, then rank); the rank is last so callers can
        # map the winning key back to its piece.
        if window >> index & 1:
            return (0, index, self._rank[index])
        return (1, self._avail(index), self._rank[index])

    def _avail(self, index: int) -> int:
        rbit = 1 << self._rank[index]
        return next(k for k, level in enumerate(self._by_avail_r) if level & rbit)

    # -- results ------------------------------------------------------------------------------

    def on_piece(self, parent: str, index: int, ok: bool, now: float) -> list[Cancel | BadParent]:
        """A request delivered piece `index`; `ok` says whether it matched its hash."""
        self._check_index(index)
        if index in self._have:
            return []
        p = self._in_flight_from(parent, index)
        out: list[Cancel | BadParent] = []
        if ok:
            requesters = self._downloading[index]
            if len(requesters) > 1:  # endgame duplicates
                for other in sorted(requesters - {parent}):
                    self._forget(other, self._parents[other], index)
                    out.append(Cancel(other, index))
            self._forget(parent, p, index)
            self._transition(index, PieceState.HAVE)
            return out
        self._end_request(parent, p, index)
        out.append(BadParent(parent, index))
        p.bad += 1
        p.banned |= 1 << index
        self._set_bits(p, p.reported & ~p.banned)
        if p.bad >= self._config.max_bad_pieces:
            out.extend(Cancel(parent, i) for i in self._remove(parent))
        return out

    def on_received(self, parent: str, index: int) -> None:
        """A request's bytes arrived; its verdict (`on_piece`) follows once they are checked.

        The request stays in flight (cancels, endgame and blame work as before) but frees
        the parent's slot, so `pick` may ask that parent for the next piece meanwhile.
        Idempotent.
        """
        p = self._in_flight_from(parent, index)
        if not p.received_bits >> index & 1:
            p.received_bits |= 1 << index
            p.busy -= 1
            self._busy -= 1

    def on_failure(self, parent: str, index: int, *, lacks_piece: bool = False) -> None:
        """A transfer failed (broken connection, cancelled, 404); the request is restored.

        `lacks_piece` says the parent answered that it does not hold the piece: it is not
        asked for it again until a bitfield from it says otherwise, which keeps a stale
        bitfield from turning into a request/404 loop.
        """
        self._check_index(index)
        p = self._requested(parent, index)
        self._end_request(parent, p, index)
        if lacks_piece:
            p.reported &= ~(1 << index)
            self._set_bits(p, p.reported & ~p.banned)

    def expire(self, now: float) -> list[Request]:
        """Fail and return the requests whose deadline is at or before `now`."""
        out: list[Request] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._is_live(entry):
                _, _, name, index = entry
                self._end_request(name, self._parents[name], index)
                out.append(Request(name, index))
        return out

    # -- bookkeeping --------------------------------------------------------------------------

    def _transition(self, index: int, new: PieceState) -> None:
        # PIECE_TRANSITIONS spelled out: DOWNLOADING is entered only from MISSING, and left
        # only towards HAVE or MISSING. Checked without building the old state (an enum
        # lookup and a hash per piece event): this is on every request's path.
        if new is PieceState.DOWNLOADING:
            legal = index not in self._downloading and index not in self._have
        else:
            legal = index in self._downloading
        if not legal:
            old = self.state(index)
            raise PickerError(f"piece {index}: illegal transition {old.name} -> {new.name}")
        bit = 1 << index
        rbit = 1 << self._rank[index]
        if new is PieceState.DOWNLOADING:
            self._downloading[index] = set()
            self._downloading_bits |= bit
            self._free &= ~bit
            self._free_r &= ~rbit
            return
        del self._downloading[index]
        self._downloading_bits &= ~bit
        if new is PieceState.HAVE:
            self._have.add(index)
            self._left -= 1
        else:
            self._free |= bit
            self._free_r |= rbit

    def _request(self, name: str, p: _Parent, index: int, now: float) -> None:
        if index not in self._downloading:
            self._transition(index, PieceState.DOWNLOADING)
        self._downloading[index].add(name)
        self._seq += 1
        p.inflight[index] = self._seq
        p.busy += 1
        self._busy += 1
        p.inflight_bits |= 1 << index
        self._live += 1
        heapq.heappush(
            self._deadlines, (now + self._config.request_timeout, self._seq, name, index)
        )
        if len(self._deadlines) > 2 * self._live + 64:
            # Finished requests leave their entries behind; sweep them now and then.
            self._deadlines = [e for e in self._deadlines if self._is_live(e)]
            heapq.heapify(self._deadlines)

    def _forget(self, name: str, p: _Parent, index: int) -> None:
        """Take one request off the books without touching the piece's state."""
        del p.inflight[index]
        p.inflight_bits &= ~(1 << index)
        if p.received_bits >> index & 1:
            p.received_bits &= ~(1 << index)
        else:
            p.busy -= 1
            self._busy -= 1
        self._downloading[index].discard(name)
        self._live -= 1

    def _end_request(self, name: str, p: _Parent, index: int) -> None:
        """A request ended without the piece: it is MISSING again unless others are in flight."""
        self._forget(name, p, index)
        if not self._downloading[index]:
            self._transition(index, PieceState.MISSING)

    def _remove(self, name: str) -> list[int]:
        p = self._parents.pop(name)
        self._names.remove(name)
        self._set_bits(p, 0)
        self._by_avail_r.pop()  # the top level is empty now that one parent fewer exists
        restored = sorted(p.inflight)
        for index in restored:
            self._end_request(name, p, index)
        return restored

    def _set_bits(self, p: _Parent, bits: int) -> None:
        """Change what `p` may be asked for, keeping availability levels in step."""
        added = self._to_rank(bits & ~p.bits)
        if added:
            self._shift_levels(added, 1)
        removed = self._to_rank(p.bits & ~bits)
        if removed:
            self._shift_levels(removed, -1)
        p.bits = bits
        p.bits_r = (p.bits_r | added) & ~removed

    def _shift_levels(self, moving: int, by: int) -> None:
        """Move the pieces of `moving` (rank bits) one availability level up (`by` 1) or down
        (-1). Each piece sits at exactly one level: they are found from the rarest level up,
        stopping once all are, and moved after, so that none is moved twice."""
        levels = self._by_avail_r
        found: list[tuple[int, int]] = []
        rest = moving
        for k, level in enumerate(levels):
            here = rest & level
            if here:
                found.append((k, here))
                rest ^= here
                if not rest:
                    break
        for k, here in found:
            levels[k] ^= here
            levels[k + by] |= here

    def _to_rank(self, bits: int) -> int:
        """The same set of pieces in rank space."""
        if not bits:
            return 0
        rank = self._rank
        if bits.bit_count() < 16:
            out = 0
            while bits:  # iter_bits, inline: most calls move a few pieces
                low = bits & -bits
                out |= 1 << rank[low.bit_length() - 1]
                bits ^= low
            return out
        # Dense sets: permute the binary digits instead of a big-int operation per piece.
        # Read least significant first, digit i is piece i, and output digit r is the digit
        # of the piece with rank r.
        if self._rank_digits is None:
            self._rank_digits = itemgetter(*self._order)
        digits = format(bits, self._digits_format)[::-1]
        return int("".join(self._rank_digits(digits))[::-1], 2)

    def _is_live(self, entry: tuple[float, int, str, int]) -> bool:
        _, seq, name, index = entry
        p = self._parents.get(name)
        return p is not None and p.inflight.get(index) == seq

    def _parent(self, name: str) -> _Parent:
        p = self._parents.get(name)
        if p is None:
            raise PickerError(f"unknown parent {name!r}")
        return p

    def _in_flight_from(self, name: str, index: int) -> _Parent:
        """`_requested` with the index checked too, the common case first: every piece's
        bytes and verdict come through here."""
        p = self._parents.get(name)
        if p is None or type(index) is not int or index not in p.inflight:
            self._check_index(index)
            return self._requested(name, index)  # raises, saying what is wrong
        return p

    def _requested(self, name: str, index: int) -> _Parent:
        p = self._parent(name)
        if index not in p.inflight:
            raise PickerError(f"piece {index} is not in flight from parent {name!r}")
        return p

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self._n:
            raise PickerError(f"piece index {index!r} out of range for {self._n} pieces")

    def _check_bitfield(self, pieces: Bitfield) -> None:
        if pieces.length != self._n:
            raise PickerError(f"bitfield of {pieces.length} pieces for a layout of {self._n}")
