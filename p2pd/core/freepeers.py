"""The free peers of one zone of a scheduler task, kept in the order parent selection wants.

`Scheduler` chooses a child's new parents among the task's *free* peers (a free upload slot,
some piece, not banned), best first by the total order

    (load, -useful, tie, peer id)

with load = children / upload slots, useful = how many pieces the peer holds that the child
lacks, and tie = a random key drawn when the peer registered. Only `useful` depends on the
child. Computing the key of every free peer for every selection costs O(free peers), and a
storm makes O(hosts) selections among O(hosts) free peers: at 2000 hosts that was 36 million
keys, a tenth of the simulator's time, and growing with the square of the hosts.

`FreePeers` gives the same answer while looking at few peers:

- It keeps the peers sorted by (load, -count, tie, id), count = pieces held. No peer is useful
  for more than ``most`` pieces, the number of lacking pieces some peer here holds, so
  ``(load, -min(count, most), tie, id)`` bounds an entry's key from below, and along the sorted
  order that bound never decreases once count <= most. The walk (a slice at a time) stops as
  soon as the `wanted` best keys found beat the bound; among peers holding more than ``most``
  pieces (which tie on ``-most``) it jumps over the rest of each run of equal (load, count),
  whose bounds only grow.
  A child holding nothing finds its parents among the first entries; so does a child that
  lacks a few pieces which complete peers all hold.
- It counts, per piece, the peers holding it. A child lacking none of the pieces held here
  has no candidate, known without a walk. In a storm most selections are of that kind: every
  free peer holds the pieces the swarm got first, and so does the child.

- It keeps, per piece, a bitmask of the peers holding it (each peer has a bit of its own, a
  *slot*, until the scheduler says it left the task for good: `forget`; the masks are rebuilt
  once forgotten slots outnumber the others, so a task that lives for weeks while hosts come
  and go keeps masks as wide as its peers, not as all the peers it ever had). When the first
  slice of the walk does not settle the answer and the peers holding some lacking piece --
  the union of those masks -- are few next to the entries still to walk, it ranks exactly
  those instead of walking on. That is the case the walk is slowest in: a child lacking
  pieces only a few free peers hold, late in a storm, with fewer candidates than it wants,
  walks every entry. At 3000 hosts those walks took 13 % of the simulator's time, growing
  with the square of the hosts.

- It keeps, per load, the slots of the peers at that load. When the first slice does not settle
  the answer, the holders are many, and the lacking pieces some peer here holds are few (at
  most ``_COUNT_MOST``), it counts instead of walking: from the holder masks of those pieces,
  the slots holding at least j of them for each j, a few operations on wide ints per piece and
  j; the best keys then come class by class, least loaded first and most useful first, ranking
  only the peers of the classes it takes. That is the walk's other slow case: a child lacking
  a few pieces that most free peers hold some of, where no bound settles the walk before the
  end of the least loaded peers (10 000 hosts, 1.0-1.5 s into the storm: selections took 23 %
  of the simulator's time, three quarters of it in walks of this kind, ~4 ms each).

The answer is exactly the `wanted` smallest keys that sorting every candidate would give
(`tests/core/test_freepeers.py` checks it against that on random swarms), so decisions, and the
storm simulator's results, are the same as with a full scan.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Container

from p2pd.core.bitfield import iter_bits

#: (load, -useful, tie, peer id): the order parent selection prefers, best first.
Key = tuple[float, int, float, str]

_FIRST_SLICE = 32
#: Rank the holders of the lacking pieces directly when there are at most this share of the
#: entries still to walk (a key from a slot costs a few times a key in the walk).
_UNION_SHARE = 4
#: Count the holders' useful pieces (see the module docstring) when at most this many lacking
#: pieces are held here: the counts cost about this many squared operations on wide ints.
_COUNT_MOST = 32


class FreePeers:
    __slots__ = (
        "_bits",
        "_dead",
        "_entries",
        "_held",
        "_holders",
        "_ids",
        "_masked",
        "_present",
        "_slot",
        "_tiers",
        "_where",
        "pieces",
    )

    def __init__(self, count: int) -> None:
        """An empty index for a blob of `count` pieces."""
        self._entries: list[Key] = []  # (load, -count, tie, id), sorted
        self._where: dict[str, Key] = {}  # id -> its entry
        self._bits: dict[str, int] = {}  # id -> the pieces it holds
        self._held = [0] * count  # piece -> how many peers here hold it
        self.pieces = 0  # the pieces some peer here holds
        # Slots: a peer keeps its slot (and its bits in `_holders`) when it leaves the index,
        # so that leaving and coming back, which free peers do all the time, costs one bit of
        # `_present` rather than a pass over every piece it holds.
        self._slot: dict[str, int] = {}  # id -> its slot
        self._ids: list[str] = []  # slot -> id
        self._holders = [0] * count  # piece -> slots whose `_masked` bits hold it
        self._masked: list[int] = []  # slot -> the pieces its bits in `_holders` say
        self._present = 0  # slots of the peers in the index now
        self._tiers: dict[float, int] = {}  # load -> slots of the peers in the index at it
        self._dead = 0  # slots of forgotten peers, not reused until the next rebuild

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._where

    def put(self, peer_id: str, load: float, tie: float, bits: int) -> None:
        """Add `peer_id`, or bring its load and pieces up to date."""
        slot = self._slot.get(peer_id)
        if slot is None:
            slot = self._slot[peer_id] = len(self._ids)
            self._ids.append(peer_id)
            self._masked.append(0)
        flag = 1 << slot
        entry = (load, -bits.bit_count(), tie, peer_id)
        old = self._where.get(peer_id)
        if old != entry:
            if old is not None:
                del self._entries[bisect_left(self._entries, old)]
            insort(self._entries, entry)
            self._where[peer_id] = entry
            if old is None or old[0] != load:
                if old is not None:
                    self._untier(old[0], flag)
                self._tiers[load] = self._tiers.get(load, 0) | flag
        had = self._bits.get(peer_id, 0)
        if bits != had:
            self._count(bits & ~had, 1)
            self._count(had & ~bits, -1)
            self._bits[peer_id] = bits
        if old is None:
            # a slot's bit is set exactly while its peer is in the index: an int as wide as
            # the task's peers, not rebuilt for each of their updates
            self._present |= flag
        masked = self._masked[slot]
        if bits != masked:
            holders = self._holders
            for i in iter_bits(bits & ~masked):
                holders[i] |= flag
            for i in iter_bits(masked & ~bits):
                holders[i] &= ~flag
            self._masked[slot] = bits

    def discard(self, peer_id: str) -> None:
        entry = self._where.pop(peer_id, None)
        if entry is not None:
            del self._entries[bisect_left(self._entries, entry)]
            self._count(self._bits.pop(peer_id), -1)
            flag = 1 << self._slot[peer_id]
            self._present &= ~flag
            self._untier(entry[0], flag)

    def _untier(self, load: float, flag: int) -> None:
        slots = self._tiers[load] & ~flag
        if slots:
            self._tiers[load] = slots
        else:
            del self._tiers[load]

    def forget(self, peer_id: str) -> None:
        """`peer_id` left the task (or this zone) for good: drop it and its slot."""
        self.discard(peer_id)
        self._bits.pop(peer_id, None)
        if self._slot.pop(peer_id, None) is None:
            return
        self._dead += 1
        if self._dead > len(self._slot) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        """Number the live slots afresh, in their old order, and recompute the masks."""
        masked = self._masked
        live = sorted(self._slot.items(), key=lambda item: item[1])
        self._ids = [pid for pid, _ in live]
        self._masked = [masked[slot] for _, slot in live]
        self._slot = {pid: slot for slot, pid in enumerate(self._ids)}
        holders = [0] * len(self._holders)
        present = 0
        tiers: dict[float, int] = {}
        for slot, (pid, bits) in enumerate(zip(self._ids, self._masked, strict=True)):
            flag = 1 << slot
            for i in iter_bits(bits):
                holders[i] |= flag
            entry = self._where.get(pid)
            if entry is not None:
                present |= flag
                tiers[entry[0]] = tiers.get(entry[0], 0) | flag
        self._holders = holders
        self._present = present
        self._tiers = tiers
        self._dead = 0

    def best(
        self, lacking: int, wanted: int, parents: Container[str], shunned: Container[str]
    ) -> list[Key]:
        """The `wanted` smallest keys, smallest first, of the peers holding some piece of
        `lacking` (raw bits) that are in neither `parents` nor `shunned`."""
        # Only the lacking pieces some peer here holds count. As a non-negative int: the
        # scheduler passes ``~pieces``, negative, and a big int's `&` with a negative one
        # costs a two's complement copy of each (a quarter of the walk's time at 10 000 hosts)
        lacking &= self.pieces
        most = lacking.bit_count()
        if not most or wanted <= 0:
            return []
        entries = self._entries
        bits = self._bits
        best: list[Key] = []
        # The keys are computed a slice at a time (a comprehension is several times faster
        # than a loop per entry), and the bound checked between slices; slices double, so a
        # selection that needs many peers costs few checks.
        start = 0
        step = _FIRST_SLICE
        end = len(entries)
        while start < end:
            if start == _FIRST_SLICE:
                held = self._holders_of(lacking)
                if held.bit_count() * _UNION_SHARE <= end - start:
                    return self._rank(held, lacking, wanted, parents, shunned)
                if most <= _COUNT_MOST:
                    return self._by_count(lacking, most, wanted, parents, shunned)
            stop = start + step
            best = heapq.nsmallest(
                wanted,
                best
                + [
                    (load, -useful, tie, pid)
                    for load, _, tie, pid in entries[start:stop]
                    if (useful := (bits[pid] & lacking).bit_count())
                    and pid not in parents
                    and pid not in shunned
                ],
            )
            start = stop
            step *= 2
            if len(best) == wanted and start < end:
                load, neg_count, tie, pid = entries[start]
                worst = best[-1]
                if worst < (load, neg_count if neg_count > -most else -most, tie, pid):
                    if neg_count >= -most or worst < (load, -most):
                        break  # no key still to come is below this entry's bound
                    # the rest of this run of equal (load, count) is bounded likewise
                    start = bisect_left(entries, (load, neg_count, math.inf), start)
        return best

    def _holders_of(self, pieces: int) -> int:
        """Slots of the peers in the index holding some piece of `pieces`."""
        holders = self._holders
        out = 0
        for i in iter_bits(pieces):
            out |= holders[i]
        return out & self._present

    def _rank(
        self,
        slots: int,
        lacking: int,
        wanted: int,
        parents: Container[str],
        shunned: Container[str],
    ) -> list[Key]:
        """`best` among the peers of `slots` only (each holds some piece of `lacking`)."""
        where = self._where
        bits = self._bits
        keys: list[Key] = []
        for pid in self._ids_of(slots):
            if pid not in parents and pid not in shunned:
                load, _, tie, _ = where[pid]
                keys.append((load, -(bits[pid] & lacking).bit_count(), tie, pid))
        return heapq.nsmallest(wanted, keys)

    def _by_count(
        self,
        lacking: int,
        most: int,
        wanted: int,
        parents: Container[str],
        shunned: Container[str],
    ) -> list[Key]:
        """`best` by counting (see the module docstring); `lacking` holds `most` pieces, all
        held here."""
        # at_least[j]: the slots of peers here holding at least j of the lacking pieces,
        # built up one piece at a time
        at_least = [self._present] + [0] * most
        holders = self._holders
        for seen, i in enumerate(iter_bits(lacking), 1):
            holding = holders[i]
            for j in range(seen, 0, -1):
                at_least[j] |= at_least[j - 1] & holding
        at_least.append(0)
        where = self._where
        best: list[Key] = []
        for load in sorted(self._tiers):
            tier = self._tiers[load]
            for useful in range(most, 0, -1):
                slots = tier & at_least[useful] & ~at_least[useful + 1]
                if not slots:
                    continue
                keys = [
                    (load, -useful, where[pid][2], pid)
                    for pid in self._ids_of(slots)
                    if pid not in parents and pid not in shunned
                ]
                best += heapq.nsmallest(wanted - len(best), keys)
                if len(best) == wanted:
                    return best
        return best

    def _ids_of(self, slots: int) -> list[str]:
        """The peers of `slots`, lowest slot first."""
        ids = self._ids
        out = []
        # set bits of a wide int, lowest first, without a big-int operation per bit
        text = bin(slots)[:1:-1]
        slot = text.find("1")
        while slot >= 0:
            out.append(ids[slot])
            slot = text.find("1", slot + 1)
        return out

    def _count(self, bits: int, step: int) -> None:
        held = self._held
        for i in iter_bits(bits):
            held[i] += step
            if step > 0 and held[i] == 1:
                self.pieces |= 1 << i
            elif step < 0 and held[i] == 0:
                self.pieces &= ~(1 << i)
