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
it: the uploads of its src, the downloads of its dst and the flows on its link direction. A
start only lowers shares, so only the flows above a lowered share can change; an end only raises
shares, so only the flows at a raised share's old value (the ones it limited, or tied) can
change. The rest are passed over with one comparison each, and a flow whose rate did not
actually change (it is bottlenecked elsewhere) is left alone.

*Completion times* live in a heap of ``(time, flow id)`` with lazy invalidation. Each flow knows
its true ``finish`` and the time ``queued`` of its one live entry, with ``queued <= finish``: an
entry is a lower bound (between queries: see below). A rate change that makes the flow finish
earlier pushes a new entry, at the next query and only if it is still earlier then (a flow's end
speeds its neighbours up, and the next piece starting at the same instant slows them back down);
one that makes it finish later pushes nothing, and the early entry is requeued at the true time
when it reaches the top. A newcomer slows every flow it shares with, so starts cost no pushes.
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

Costs: start/end of a flow is O(k_src + k_dst + k_link) comparisons, plus a re-rate (and a heap
push if it now finishes earlier) per flow whose rate changed. A link carrying thousands of flows
makes every start/end on it scan all of them: fine for a few hundred cross-zone flows, slow for a
swarm whose peer choice ignores zones.

Why no per-share virtual clock (flows limited by the same share moving together, like a
processor-sharing queue, O(log n) per event for them): it was built and measured. On Storm-A the
work is in small shares (a host's ~10 downloads), whose flows switch between being upload- and
download-limited every few events; moving a flow between clocks costs more than re-rating it,
and the simulator got 1.3-1.6x slower. It pays off only for a share carrying hundreds of flows
that it limits (a slow zone link). It also rounds differently, which reorders completions that
tie to the last bit and, through the scheduler's choices, moves single hosts' simulated times by
a few per cent (not the distribution). The skipping above changes no arithmetic: results are
bit-for-bit those of re-rating every flow that shares a changed share.
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
        # Flows whose finish moved before their heap entry: queued at the next query
        self._sooner: list[_Flow] = []
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
        # The checks of _check_alive and _advance_clock, inline: every piece starts here.
        alive = self._alive
        if not (0 <= src < len(alive) and alive[src]):
            self._check_alive(src)
        if not (0 <= dst < len(alive) and alive[dst]):
            self._check_alive(dst)
        if src == dst:
            raise ValueError(f"host {src} cannot send to itself")
        if not (0 <= size < _INF):
            raise ValueError(f"size must be finite and >= 0, got {size}")
        if now < self._now:
            self._check_time(now)
        self._now = now
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
        up_share = self._up_share[src]
        self._up_share[src] = new_up = self._up[src] / len(ups)
        downs = self._downs[dst]
        downs[fid] = f
        down_share = self._down_share[dst]
        self._down_share[dst] = new_down = self._down[dst] / len(downs)
        # All three shares are updated before any re-rating, so that the newcomer is never
        # rated from a partial view (an instant rate would make it due at once).
        link = self._links.get((self._zone[src], self._zone[dst])) if f.cross else None
        link_share = _INF
        if link is not None:
            f.link = link
            link.flows[fid] = f
            link_share = link.share
            link.reshare()
        # Shares only fell: a flow's rate changes only if it was above a fallen share.
        if new_up != up_share:
            self._refresh(ups.values(), now, new_up)
        if new_down != down_share:
            self._refresh(downs.values(), now, new_down)
        if link is not None and link.share != link_share:
            self._refresh(link.flows.values(), now, link.share)
        # The newcomer, as _refresh would rate it (its remaining is its size).
        r = new_down if new_down < new_up else new_up
        if link is not None and link.share < r:
            r = link.share
        if r > 0:
            f.rate = r
            f.finish = f.queued = fin = now + size / r
            heapq.heappush(self._heap, (fin, fid))
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()
        return fid

    def cancel_flow(self, flow: int, now: float) -> float:
        """Stop ``flow``; return the bytes it had transferred (they count in the counters)."""
        if flow not in self._flows:
            raise KeyError(flow)
        self._advance_clock(now)
        f = self._flows.pop(flow)
        self._end(f, now, credit_size=False)
        return f.size - f.remaining

    def complete(self, flow: int, now: float) -> object:
        """End ``flow`` at the completion time ``next_completion`` announced; return its tag."""
        f = self._flows.get(flow)
        if f is None:
            raise KeyError(flow)
        self._check_time(now)  # so also now >= f.last: what remaining() checks
        if _left(f, now) > REL_TOL * f.size:
            raise ValueError(
                f"flow {flow} is not complete at {now}: {self.remaining(flow, now)} of "
                f"{f.size} bytes left, due at {f.finish}"
            )
        self._now = now
        del self._flows[flow]
        self._end(f, now, credit_size=True)
        return f.tag

    def next_completion(self) -> tuple[float, int] | None:
        """Earliest ``(time, flow id)`` among active flows, or None if none will complete."""
        if self._sooner:
            self._queue_sooner()
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

    def uploads(self, host: int) -> int:
        """Flows ``host`` is sending now (zero-size flows hold no share and do not count)."""
        return len(self._ups[host])

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

    def _end(self, f: _Flow, now: float, *, credit_size: bool) -> None:
        """``_release([f])``, unrolled: this is every completion's path."""
        if credit_size:
            done = f.size
            f.remaining = 0.0
        else:
            f.remaining = _left(f, now)
            done = f.size - f.remaining
        src, dst, fid = f.src, f.dst, f.id
        self._sent[src] += done
        self._received[dst] += done
        if f.cross:
            self.bytes_between_zones += done
        if f.size == 0:
            del self._instant[fid]
            return  # never held a share
        f.rate = 0.0
        ups = self._ups[src]
        del ups[fid]
        downs = self._downs[dst]
        del downs[fid]
        up_share = self._up_share
        old_up = up_share[src]
        n = len(ups)
        up_share[src] = new_up = self._up[src] / n if n else self._up[src]
        down_share = self._down_share
        old_down = down_share[dst]
        n = len(downs)
        down_share[dst] = new_down = self._down[dst] / n if n else self._down[dst]
        link = f.link
        old_link = 0.0
        if link is not None:
            del link.flows[fid]
            old_link = link.share
            link.reshare()
        # As in _release: only flows at a risen share's old value can change.
        if ups and new_up != old_up:
            self._refresh(ups.values(), now, math.nextafter(old_up, -_INF))
        if downs and new_down != old_down:
            self._refresh(downs.values(), now, math.nextafter(old_down, -_INF))
        if link is not None and link.flows and link.share != old_link:
            self._refresh(link.flows.values(), now, math.nextafter(old_link, -_INF))
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()

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
        # Shares first, re-rating after: no flow is rated from a half-updated view. Shares only
        # rose: a flow's rate can change only if it was at a risen side's old share.
        up, down, up_share, down_share = self._up, self._down, self._up_share, self._down_share
        rose: list[tuple[Iterable[_Flow], float]] = []
        for h in srcs:
            n = len(self._ups[h])
            old = up_share[h]
            up_share[h] = up[h] / n if n else up[h]
            if n and up_share[h] != old:
                rose.append((self._ups[h].values(), math.nextafter(old, -_INF)))
        for h in dsts:
            n = len(self._downs[h])
            old = down_share[h]
            down_share[h] = down[h] / n if n else down[h]
            if n and down_share[h] != old:
                rose.append((self._downs[h].values(), math.nextafter(old, -_INF)))
        for link in links.values():
            old = link.share
            link.reshare()
            if link.flows and link.share != old:
                rose.append((link.flows.values(), math.nextafter(old, -_INF)))
        for group, above in rose:
            self._refresh(group, now, above)
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()

    def _refresh(self, group: Iterable[_Flow], now: float, above: float = -1.0) -> None:
        """Re-rate the flows of ``group`` whose rate is above ``above`` from the current shares;
        integrate and reschedule the changed ones."""
        up_share = self._up_share
        down_share = self._down_share
        sooner = self._sooner
        for g in group:
            rate = g.rate
            if rate <= above:
                continue  # the caller knows its rate cannot have changed
            # Comparisons, not min(): this loop is the simulator's hot spot.
            r = up_share[g.src]
            d = down_share[g.dst]
            r = d if d < r else r
            link = g.link
            if link is not None and link.share < r:
                r = link.share
            if r == rate:
                continue
            if now >= g.finish:
                g.remaining = 0.0  # see _left
            elif now > g.last and rate > 0:
                left = g.remaining - rate * (now - g.last)
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
            # reaches the top): flows slowed by a newcomer cost no heap push. An earlier one
            # is queued at the next query, if it still is earlier then: a flow ending and the
            # next one starting at the same instant speed their neighbours up and slow them
            # back down.
            if fin < g.queued:
                sooner.append(g)

    def _queue_sooner(self) -> None:
        """Push an entry for each flow that now finishes before its entry: the invariant
        ``queued <= finish`` holds again, so queries give the same answer as if each had been
        pushed when it sped up (the answer is the least (finish, id), whatever the garbage)."""
        flows = self._flows
        heap = self._heap
        for f in self._sooner:
            if f.finish < f.queued and flows.get(f.id) is f:
                f.queued = f.finish
                heapq.heappush(heap, (f.finish, f.id))
        self._sooner.clear()

    def _compact(self) -> None:
        """Drop the stale entries: called when they outnumber the live ones (plus slack), so the
        O(flows) rebuild is amortised."""
        self._sooner.clear()  # every live flow gets its true entry
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
