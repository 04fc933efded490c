"""Network model of the storm simulator: how fast each transfer goes and when it ends.

Transfers carry sizes, not bytes. No clock, no trio, no randomness: the simulator's event loop
owns the clock and passes ``now`` into every call that changes something; this module answers
with rates and completion times. The same sequence of calls always gives the same numbers.

Theory of operation
-------------------
*Hosts* have an upload and a download capacity in bytes/s (``math.inf`` allowed, 0 allowed) and a
zone. The registry and the supernode are ordinary hosts (the registry's upload capacity is its
egress). A removed host (churn) loses its flows and may not start new ones.

*Zone links* are optional. ``set_link(a, b, c)`` models a full-duplex link: the direction a->b and
the direction b->a each get capacity ``c``, shared by the flows going that way. Traffic between
two zones without a link, and all traffic inside a zone, is limited by the hosts only.

*A flow* moves ``size`` bytes from ``src`` to ``dst``. It starts moving at ``now``; latency is the
caller's business (schedule ``start_flow`` one RTT later, or whatever the protocol needs).

*Rate sharing* is "equal split, min of the shares". Every host splits its upload capacity equally
among its active uploads, its download capacity equally among its active downloads, and every
link direction splits its capacity equally among the flows crossing it; a flow's rate is

    rate = min(up[src] / n_up[src], down[dst] / n_down[dst], link / n_link)

This is cheap and local, but it is *not* max-min fair: a flow bottlenecked elsewhere leaves part
of its share unused and nobody picks it up. For a given set of flows, every flow's rate is at
most its max-min fair rate (roughly what competing TCP flows converge to), so the model errs on
the slow side: simulated times are pessimistic. True max-min (progressive filling) is not
offered: one flow starting can change the fair rates of the whole connected component of the
flow graph, which in a storm is the whole swarm, so no cheap incremental update exists.

*Progress* is integrated exactly: each flow keeps ``remaining``, ``last`` (time of its last rate
change) and ``rate``; when the rate changes at ``now``, ``remaining -= rate * (now - last)``.
Rates only change when a flow starts or ends, and then only for the flows sharing a share with
it: the uploads of its src, the downloads of its dst and the flows on its link direction. A flow
whose rate did not actually change (it is bottlenecked elsewhere) is left alone.

*Completion times* live in a heap of ``(time, flow id)`` with lazy invalidation. Each flow knows
its true ``finish`` and the time ``queued`` of its one live entry, with ``queued <= finish``: an
entry is a lower bound. A rate change that makes the flow finish earlier pushes a new entry; one
that makes it finish later pushes nothing, and the early entry is requeued at the true time when
it reaches the top. A newcomer slows every flow it shares with, so starts cost no heap pushes.
Entries whose time is not their flow's ``queued`` are garbage, dropped when they surface; the
heap is rebuilt when garbage outnumbers live entries. Ties at equal times break by flow id, so
runs are reproducible. A flow at rate 0 has no entry and waits for rates to change. A zero-size
flow holds no share and is due at once.

*Time* never goes back (a call with an earlier ``now`` is refused; a refused call changes
nothing). A flow is done once its announced finish time has come: from then on it has 0 bytes
left, even if a rate change at that very instant would re-integrate a rounding residue, so the
caller may handle other events at that time before calling ``complete``.

Life-cycle of a flow: ``start_flow`` -> (``complete`` at the time ``next_completion`` gave, or
``cancel_flow``, or ``remove_host`` of either end). Counters (``bytes_sent``, ``bytes_received``,
``bytes_between_zones``) include completed flows in full and cancelled flows up to their cut.

Costs: start/end of a flow is O(k_src + k_dst + k_link) rate checks plus a heap push per flow
that now finishes earlier. A link carrying thousands of flows makes every start/end on it touch
all of them: fine for a few hundred cross-zone flows, slow for a swarm whose peer choice ignores
zones. (The cure, if needed: give each link a virtual clock of per-flow service, like a
processor-sharing queue, so link-limited flows move together in O(log n).)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

_INF = math.inf
#: A flow may be completed when what is left is within this fraction of its size.
REL_TOL = 1e-9


class _Link:
    """One direction of a zone link."""

    __slots__ = ("capacity", "flows", "share")

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.share = capacity
        self.flows: dict[int, _Flow] = {}

    def reshare(self) -> None:
        self.share = self.capacity / len(self.flows) if self.flows else self.capacity


class _Flow:
    __slots__ = (
        "cross",
        "dst",
        "finish",
        "id",
        "last",
        "link",
        "queued",
        "rate",
        "remaining",
        "size",
        "src",
        "tag",
    )

    def __init__(self, fid: int, src: int, dst: int, size: float, now: float, tag: object) -> None:
        self.id = fid
        self.src = src
        self.dst = dst
        self.size = size
        self.remaining = size
        self.rate = 0.0
        self.last = now
        self.finish = _INF
        self.queued = _INF  # time of this flow's live heap entry; <= finish
        self.link: _Link | None = None
        self.cross = False
        self.tag = tag


class Network:
    """Hosts, zone links and the flows between them; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._up: list[float] = []
        self._down: list[float] = []
        self._zone: list[int] = []
        self._alive: list[bool] = []
        # Active flows per host, keyed by flow id (dicts keep insertion order: deterministic).
        self._ups: list[dict[int, _Flow]] = []
        self._downs: list[dict[int, _Flow]] = []
        self._up_share: list[float] = []
        self._down_share: list[float] = []
        self._sent: list[float] = []
        self._received: list[float] = []
        self._links: dict[tuple[int, int], _Link] = {}
        self._flows: dict[int, _Flow] = {}
        # Zero-size flows: no share, due at once; kept apart so remove_host can find them.
        self._instant: dict[int, _Flow] = {}
        self._heap: list[tuple[float, int]] = []
        self._next_id = 0
        self._now = -_INF
        self.bytes_between_zones = 0.0

    # -- topology ---------------------------------------------------------------------------

    def add_host(self, up: float, down: float, zone: int = 0) -> int:
        if not (up >= 0 and down >= 0):
            raise ValueError(f"capacities must be >= 0, got up={up} down={down}")
        self._up.append(up)
        self._down.append(down)
        self._zone.append(zone)
        self._alive.append(True)
        self._ups.append({})
        self._downs.append({})
        self._up_share.append(up)
        self._down_share.append(down)
        self._sent.append(0.0)
        self._received.append(0.0)
        return len(self._up) - 1

    def set_link(
        self, zone_a: int, zone_b: int, capacity: float, *, now: float | None = None
    ) -> None:
        """Give both directions between two zones ``capacity`` bytes/s each.

        Meant for setup; mid-run it is O(active flows) and takes effect at ``now`` (default: the
        latest time the network has been told).
        """
        if zone_a == zone_b:
            raise ValueError("traffic inside a zone is not limited by links")
        if not capacity >= 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        t = self._advance_clock(self._now if now is None else now)
        for key in ((zone_a, zone_b), (zone_b, zone_a)):
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = _Link(capacity)
                zone = self._zone
                for f in self._flows.values():
                    if f.cross and (zone[f.src], zone[f.dst]) == key:
                        f.link = link
                        link.flows[f.id] = f
            link.capacity = capacity
            link.reshare()
            self._refresh(link.flows.values(), t)

    def remove_host(self, host: int, now: float) -> list[int]:
        """Churn: cancel every flow to or from ``host``; return their ids, ascending."""
        self._check_alive(host)
        self._advance_clock(now)
        instant = (fid for fid, f in self._instant.items() if host in (f.src, f.dst))
        victims = sorted({*self._ups[host], *self._downs[host], *instant})
        self._alive[host] = False
        self._release([self._flows.pop(fid) for fid in victims], now, credit_size=False)
        return victims

    # -- flows ------------------------------------------------------------------------------

    def start_flow(self, src: int, dst: int, size: float, now: float, tag: object = None) -> int:
        """Start moving ``size`` bytes from ``src`` to ``dst`` at ``now``; return the flow id.

        ``tag`` is the caller's, handed back by ``complete``.
        """
        self._check_alive(src)
        self._check_alive(dst)
        if src == dst:
            raise ValueError(f"host {src} cannot send to itself")
        if not (0 <= size < _INF):
            raise ValueError(f"size must be finite and >= 0, got {size}")
        self._advance_clock(now)
        fid = self._next_id
        self._next_id += 1
        f = _Flow(fid, src, dst, size, now, tag)
        self._flows[fid] = f
        f.cross = self._zone[src] != self._zone[dst]
        if size == 0:
            self._instant[fid] = f
            f.finish = f.queued = now
            heapq.heappush(self._heap, (now, fid))
            return fid
        ups = self._ups[src]
        ups[fid] = f
        self._up_share[src] = self._up[src] / len(ups)
        downs = self._downs[dst]
        downs[fid] = f
        self._down_share[dst] = self._down[dst] / len(downs)
        # All three shares are updated before any re-rating, so that the newcomer is never
        # rated from a partial view (an instant rate would make it due at once).
        link = self._links.get((self._zone[src], self._zone[dst])) if f.cross else None
        if link is not None:
            f.link = link
            link.flows[fid] = f
            link.reshare()
        self._refresh(ups.values(), now)
        self._refresh(downs.values(), now)
        if link is not None:
            self._refresh(link.flows.values(), now)
        self._maybe_compact()
        return fid

    def cancel_flow(self, flow: int, now: float) -> float:
        """Stop ``flow``; return the bytes it had transferred (they count in the counters)."""
        if flow not in self._flows:
            raise KeyError(flow)
        self._advance_clock(now)
        f = self._flows.pop(flow)
        self._release([f], now, credit_size=False)
        return f.size - f.remaining

    def complete(self, flow: int, now: float) -> object:
        """End ``flow`` at the completion time ``next_completion`` announced; return its tag."""
        f = self._flows.get(flow)
        if f is None:
            raise KeyError(flow)
        self._check_time(now)
        if self.remaining(flow, now) > REL_TOL * f.size:
            raise ValueError(
                f"flow {flow} is not complete at {now}: {self.remaining(flow, now)} of "
                f"{f.size} bytes left, due at {f.finish}"
            )
        self._advance_clock(now)
        del self._flows[flow]
        self._release([f], now, credit_size=True)
        return f.tag

    def next_completion(self) -> tuple[float, int] | None:
        """Earliest ``(time, flow id)`` among active flows, or None if none will complete."""
        heap = self._heap
        flows = self._flows
        while heap:
            t, fid = heap[0]
            f = flows.get(fid)
            if f is not None and t == f.queued:
                if t == f.finish:
                    return t, fid
                # A lower bound left by a slow-down: requeue at the real time.
                f.queued = f.finish
                if f.finish < _INF:
                    heapq.heapreplace(heap, (f.finish, fid))
                    continue
            heapq.heappop(heap)
        return None

    # -- queries ----------------------------------------------------------------------------

    def rate(self, flow: int) -> float:
        return self._flows[flow].rate

    def remaining(self, flow: int, now: float) -> float:
        f = self._flows[flow]
        if now < f.last:
            raise ValueError(f"time {now} is before the flow's last rate change at {f.last}")
        return _left(f, now)

    def bytes_sent(self, host: int) -> float:
        return self._sent[host]

    def bytes_received(self, host: int) -> float:
        return self._received[host]

    def active_flows(self) -> int:
        return len(self._flows)

    # -- internals --------------------------------------------------------------------------

    def _check_time(self, now: float) -> None:
        # Time never goes back: a caller doing so has a bug that would corrupt integration.
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")

    def _advance_clock(self, now: float) -> float:
        # Called after a call's other checks, so that a refused call changes nothing.
        self._check_time(now)
        self._now = now
        return now

    def _check_alive(self, host: int) -> None:
        if not 0 <= host < len(self._alive):
            raise KeyError(host)
        if not self._alive[host]:
            raise ValueError(f"host {host} has been removed")

    def _release(self, gone: list[_Flow], now: float, *, credit_size: bool) -> None:
        """Detach ended flows, credit their bytes, then re-rate every flow that shared with them.

        Shares are recomputed once per touched host and link, so removing a host with k flows
        costs O(k) re-rates per neighbour rather than O(k^2).
        """
        srcs: dict[int, None] = {}
        dsts: dict[int, None] = {}
        links: dict[int, _Link] = {}
        for f in gone:
            if credit_size:
                done = f.size
                f.remaining = 0.0
            else:
                f.remaining = _left(f, now)
                done = f.size - f.remaining
            self._sent[f.src] += done
            self._received[f.dst] += done
            if f.cross:
                self.bytes_between_zones += done
            if f.size == 0:
                del self._instant[f.id]
                continue  # never held a share
            self._ups[f.src].pop(f.id)
            self._downs[f.dst].pop(f.id)
            srcs[f.src] = None
            dsts[f.dst] = None
            if f.link is not None:
                f.link.flows.pop(f.id)
                links[id(f.link)] = f.link
            f.rate = 0.0
        # Shares first, re-rating after: no flow is rated from a half-updated view.
        for h in srcs:
            n = len(self._ups[h])
            self._up_share[h] = self._up[h] / n if n else self._up[h]
        for h in dsts:
            n = len(self._downs[h])
            self._down_share[h] = self._down[h] / n if n else self._down[h]
        for link in links.values():
            link.reshare()
        for h in srcs:
            self._refresh(self._ups[h].values(), now)
        for h in dsts:
            self._refresh(self._downs[h].values(), now)
        for link in links.values():
            self._refresh(link.flows.values(), now)
        self._maybe_compact()

    def _refresh(self, group: Iterable[_Flow], now: float) -> None:
        """Re-rate ``group`` from the current shares; integrate and reschedule the changed ones."""
        up_share = self._up_share
        down_share = self._down_share
        heap = self._heap
        for g in group:
            # Comparisons, not min(): this loop is the simulator's hot spot.
            r = up_share[g.src]
            d = down_share[g.dst]
            r = d if d < r else r
            link = g.link
            if link is not None and link.share < r:
                r = link.share
            if r == g.rate:
                continue
            if now >= g.finish:
                g.remaining = 0.0  # see _left
            elif now > g.last and g.rate > 0:
                left = g.remaining - g.rate * (now - g.last)
                g.remaining = left if left > 0 else 0.0
            g.last = now
            g.rate = r
            if r > 0:
                fin = now + g.remaining / r
            elif g.remaining > 0:
                fin = _INF
            else:
                fin = now
            g.finish = fin
            # A later finish keeps the old, earlier entry as a lower bound (fixed up when it
            # reaches the top): flows slowed by a newcomer cost no heap push.
            if fin < g.queued:
                g.queued = fin
                heapq.heappush(heap, (fin, g.id))

    def _maybe_compact(self) -> None:
        # Stale entries cost memory and pops; rebuilding is O(flows), amortised by the slack.
        if len(self._heap) <= 2 * len(self._flows) + 1024:
            return
        for f in self._flows.values():
            f.queued = f.finish
        self._heap = [(f.finish, f.id) for f in self._flows.values() if f.finish < _INF]
        heapq.heapify(self._heap)


def _left(f: _Flow, now: float) -> float:
    """Bytes ``f`` still has to move at ``now`` (``now >= f.last``), clamped at 0."""
    if now >= f.finish:
        # Announced due means done: re-integrating up to the announced time can leave a
        # rounding residue (rate * ulp(now)) far above REL_TOL of a tiny flow late in a run,
        # and a flow re-rated at its own finish time must not slip by an ulp.
        return 0.0
    if now == f.last or f.rate == 0:
        return f.remaining
    left = f.remaining - f.rate * (now - f.last)  # inf rate -> -inf -> 0
    return left if left > 0 else 0.0
