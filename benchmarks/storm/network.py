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

*Rate sharing* is water-filling, side by side ("fill", the default). Each *side* -- a host's
upload, a host's download, one direction of a zone link -- has a capacity and a *level*, and
allots each of its flows ``min(level, cap)``, where the flow's cap is the level of its other
side(s): what it could get there. The level is the water level that spends the capacity:
``sum(min(level, cap)) == capacity`` (a flow held to less elsewhere leaves the rest to the
others); with capacity to spare it is the largest cap plus the spare. A flow's rate is the
least of its allotments:

    rate = min(allot_up[src], allot_down[dst], allot_link)

Every side's allotments sum to at most its capacity, so the rates never overbook a side,
whatever the order in which sides were refilled. A side is refilled when its flows change --
at the next query (`next_completion`, `rate`, `remaining`) or before the next change at a
later time, so that a piece ending and the next starting at one instant refill it once -- and
its flows are re-rated then. Its neighbours are refilled too, but only those that give a flow
less than this side now offers it (else a flow ending would never speed up its neighbours'
flows held back here); the others refill at their own next change, with the level this side
has now. When nothing changes for a while this is the
asynchronous form of the classic iteration towards max-min fairness (each side's level
computed from its neighbours'); in a storm every side changes every few milliseconds, so
levels stay close to the max-min ones (the fair share that competing TCP flows approach).
Measured against an exact max-min solution (progressive filling) of the same flows at one
instant: Storm-A's ramp, 300 hosts, t=0.5 s, 0.841 of the hosts' downlinks against 0.863 for
max-min and 0.725 for an equal split; slow-hosts, t=6 s, 0.913 / 0.933 / 0.755 of the fast
hosts' downlinks.

The former rule, *an equal split* ("equal", kept to compare), ignores the caps: every side
gives each of its flows ``capacity / n``, and a flow bottlenecked elsewhere leaves part of its
share unused that nobody picks up (every rate at most its max-min rate: pessimistic, most when
hosts differ or flows per host vary, as in a storm's first seconds).

Refilling a side reads its k flows' caps (O(k)) and sorts them only when one is below an
equal share (O(k log k)); only the flows whose allotment changed are re-rated (a flow keeps
its allotments, so the others' rates cannot have moved). Exact max-min (progressive filling)
is not offered: one flow starting can change the fair rates of the whole connected component of the
flow graph, which in a storm is the whole swarm.

*Progress* is integrated exactly: each flow keeps ``remaining``, ``last`` (time of its last rate
change) and ``rate``; when the rate changes at ``now``, ``remaining -= rate * (now - last)``.

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

Costs: start/end of a flow refills its sides, O(k) for a side's k flows (O(k log k) when one
is held below an equal share), and the neighbours asked again, plus a re-rate (and a heap push
if it now finishes earlier) per flow whose allotment changed. In Storm-A (300 hosts, ~10 flows
a side) a start or end costs about 3.5 fills: 1.1 upload and 1 download side whose flows
changed, 1.35 neighbours asked again; each fill is ~2-4 us, so the model's own time is about
twice the equal split's. A link carrying thousands of flows makes every start/end on it read
(and sort) all of them: fine for a few hundred cross-zone flows, slow for a swarm whose peer
choice ignores zones.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

_INF = math.inf

#: How a side's capacity is shared among its flows (see the module docstring).
SHARING = ("fill", "equal")
#: A flow may be completed when what is left is within this fraction of its size.
REL_TOL = 1e-9


class _Link:
    """One direction of a zone link."""

    __slots__ = ("capacity", "flows", "level")

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.level = capacity
        self.flows: dict[int, _Flow] = {}


class _Flow:
    __slots__ = (
        "a_down",
        "a_link",
        "a_up",
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
        # what its upload side, download side and zone link allot it (see the module doc);
        # -1 until its upload side first allots it: always a change, so it gets rated
        self.a_up = -1.0
        self.a_down = _INF
        self.a_link = _INF


class Network:
    """Hosts, zone links and the flows between them; see the module docstring for the rules."""

    def __init__(self, sharing: str = "fill") -> None:
        if sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
        self.sharing = sharing
        self._equal = sharing == "equal"
        self._up: list[float] = []
        self._down: list[float] = []
        self._zone: list[int] = []
        self._alive: list[bool] = []
        # Active flows per host, keyed by flow id (dicts keep insertion order: deterministic).
        self._ups: list[dict[int, _Flow]] = []
        self._downs: list[dict[int, _Flow]] = []
        # Each side's level: what it allots a flow not held lower elsewhere (module doc)
        self._up_level: list[float] = []
        self._down_level: list[float] = []
        self._sent: list[float] = []
        self._received: list[float] = []
        self._links: dict[tuple[int, int], _Link] = {}
        self._flows: dict[int, _Flow] = {}
        # Zero-size flows: no share, due at once; kept apart so remove_host can find them.
        self._instant: dict[int, _Flow] = {}
        self._heap: list[tuple[float, int]] = []
        # Flows whose finish moved before their heap entry: queued at the next query
        self._sooner: list[_Flow] = []
        # Sides whose flows changed at time _dirty_at, refilled at the next query (`_flush`)
        self._dirty_ups: dict[int, None] = {}
        self._dirty_downs: dict[int, None] = {}
        self._dirty_links: dict[int, _Link] = {}
        self._dirty_at = -_INF
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
        self._up_level.append(up)
        self._down_level.append(down)
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
            self._touch(t)
            self._dirty_links[id(link)] = link

    def remove_host(self, host: int, now: float) -> list[int]:
        """Churn: cancel every flow to or from ``host``; return their ids, ascending."""
        self._check_alive(host)
        self._advance_clock(now)
        self._touch(now)
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
        if now != self._dirty_at:
            self._touch(now)
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
        downs = self._downs[dst]
        downs[fid] = f
        link = self._links.get((self._zone[src], self._zone[dst])) if f.cross else None
        if link is not None:
            f.link = link
            link.flows[fid] = f
        self._dirty_ups[src] = None
        self._dirty_downs[dst] = None
        if link is not None:
            self._dirty_links[id(link)] = link
        return fid

    def cancel_flow(self, flow: int, now: float) -> float:
        """Stop ``flow``; return the bytes it had transferred (they count in the counters)."""
        if flow not in self._flows:
            raise KeyError(flow)
        self._advance_clock(now)
        self._touch(now)
        f = self._flows.pop(flow)
        self._release([f], now, credit_size=False)
        return f.size - f.remaining

    def complete(self, flow: int, now: float) -> object:
        """End ``flow`` at the completion time ``next_completion`` announced; return its tag."""
        f = self._flows.get(flow)
        if f is None:
            raise KeyError(flow)
        if now < self._now:
            self._check_time(now)  # so also now >= f.last: what remaining() checks
        if now != self._dirty_at:
            self._touch(now)
        if _left(f, now) > REL_TOL * f.size:
            raise ValueError(
                f"flow {flow} is not complete at {now}: {self.remaining(flow, now)} of "
                f"{f.size} bytes left, due at {f.finish}"
            )
        self._now = now
        del self._flows[flow]
        self._release([f], now, credit_size=True)
        return f.tag

    def next_completion(self) -> tuple[float, int] | None:
        """Earliest ``(time, flow id)`` among active flows, or None if none will complete."""
        if self._dirty_ups or self._dirty_downs or self._dirty_links:
            self._flush()
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
        self._flush()
        return self._flows[flow].rate

    def remaining(self, flow: int, now: float) -> float:
        self._flush()
        f = self._flows[flow]
        if now < f.last:
            raise ValueError(f"time {now} is before the flow's last rate change at {f.last}")
        return _left(f, now)

    def bytes_sent(self, host: int) -> float:
        return self._sent[host]

    def bytes_received(self, host: int) -> float:
        return self._received[host]

    def receiving(self, host: int) -> float:
        """Bytes/s flowing into ``host`` now."""
        self._flush()
        return sum(f.rate for f in self._downs[host].values())

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

    def _release(self, gone: list[_Flow], now: float, *, credit_size: bool) -> None:
        """Detach ended flows, credit their bytes, and mark every side they held a share of
        to be refilled (its flows re-rated) at the next query."""
        dirty_ups = self._dirty_ups
        dirty_downs = self._dirty_downs
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
            del self._ups[f.src][f.id]
            del self._downs[f.dst][f.id]
            dirty_ups[f.src] = None
            dirty_downs[f.dst] = None
            link = f.link
            if link is not None:
                del link.flows[f.id]
                self._dirty_links[id(link)] = link
            f.rate = 0.0
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()

    def _touch(self, now: float) -> None:
        """About to change flows at `now`: sides left dirty at an earlier time are refilled
        as of that time first (their rates held until now)."""
        if now != self._dirty_at:
            self._flush()
            self._dirty_at = now

    def _flush(self) -> None:
        """Refill the sides whose flows changed at `_dirty_at` (`_settle`). Deferred to the
        next query, so that a flow ending and the next starting at one instant -- a piece
        and the next, the common case -- refill each side once, not twice."""
        if self._dirty_ups or self._dirty_downs or self._dirty_links:
            ups, downs, links = self._dirty_ups, self._dirty_downs, self._dirty_links
            self._dirty_ups, self._dirty_downs, self._dirty_links = {}, {}, {}
            self._settle(ups, downs, links.values(), self._dirty_at)

    def _settle(
        self, srcs: Iterable[int], dsts: Iterable[int], links: Iterable[_Link], now: float
    ) -> None:
        """Refill the sides whose flows changed, then the other sides of every flow one of
        them now allots more (else that flow stays held to what its other side allotted it
        while this one was short: one flow ending would never speed its neighbours up), then
        re-rate every flow whose allotment changed. Levels first, re-rating after: no flow is
        rated from a half-updated view (a newcomer's instant rate would make it due at once)."""
        rose: list[_Flow] = []
        changed: list[_Flow] = []
        for h in srcs:
            self._fill_up(h, rose, changed)
        for h in dsts:
            self._fill_down(h, rose, changed)
        for link in links:
            self._fill_link(link, rose, changed)
        if rose:
            # A side filled above may be asked again: it was filled with its neighbours' levels
            # from before this call (uploads are filled before the downloads they feed).
            ups_again: set[int] = set()
            downs_again: set[int] = set()
            links_again: set[int] = set()
            for g in rose:
                # only the sides that allot it less than the most it may now get are asked
                most = g.a_down if g.a_down > g.a_up else g.a_up
                if g.a_link > most and g.link is not None:
                    most = g.a_link
                if g.a_up < most and g.src not in ups_again:
                    ups_again.add(g.src)
                    self._fill_up(g.src, None, changed)
                if g.a_down < most and g.dst not in downs_again:
                    downs_again.add(g.dst)
                    self._fill_down(g.dst, None, changed)
                cross = g.link
                if cross is not None and g.a_link < most and id(cross) not in links_again:
                    links_again.add(id(cross))
                    self._fill_link(cross, None, changed)
        if changed:
            self._rerate(changed, now)
        if len(self._heap) > 2 * len(self._flows) + 1024:
            self._compact()

    def _fill_up(self, host: int, rose: list[_Flow] | None, changed: list[_Flow]) -> None:
        """Refill `host`'s upload: its level, and each upload's allotment (module doc). The
        flows whose allotment changed go to `changed` (to be re-rated), those it now allots
        more to `rose` too (if given; not a newcomer, allotted nothing yet)."""
        ups = self._ups[host]
        capacity = self._up[host]
        if self._equal or not ups:
            self._up_level[host] = level = capacity / len(ups) if ups else capacity
            for g in ups.values():
                if g.a_up != level:
                    g.a_up = level
                    changed.append(g)
            return
        down_level = self._down_level
        if self._links:
            # the flow's cap: its other host side's level, or its zone link's if less
            caps = [
                c if (link := g.link) is None or c <= link.level else link.level
                for g in ups.values()
                for c in (down_level[g.dst],)
            ]
        else:
            caps = [down_level[g.dst] for g in ups.values()]
        level = capacity / len(caps)
        if min(caps) >= level:  # no flow held below an equal share: no water level to find
            self._up_level[host] = level
            if rose is None:
                for g in ups.values():
                    if g.a_up != level:
                        g.a_up = level
                        changed.append(g)
            else:
                for g in ups.values():
                    old = g.a_up
                    if old != level:
                        if old < level and old >= 0:
                            rose.append(g)
                        g.a_up = level
                        changed.append(g)
            return
        self._up_level[host] = level = _water_level(capacity, caps)
        if rose is None:
            for g, c in zip(ups.values(), caps, strict=True):
                a = c if c < level else level
                if g.a_up != a:
                    g.a_up = a
                    changed.append(g)
        else:
            for g, c in zip(ups.values(), caps, strict=True):
                a = c if c < level else level
                old = g.a_up
                if old != a:
                    if old < a and old >= 0:
                        rose.append(g)
                    g.a_up = a
                    changed.append(g)

    def _fill_down(self, host: int, rose: list[_Flow] | None, changed: list[_Flow]) -> None:
        """Refill `host`'s download, as `_fill_up` its upload."""
        downs = self._downs[host]
        capacity = self._down[host]
        if self._equal or not downs:
            self._down_level[host] = level = capacity / len(downs) if downs else capacity
            for g in downs.values():
                if g.a_down != level:
                    g.a_down = level
                    changed.append(g)
            return
        up_level = self._up_level
        if self._links:
            # the flow's cap: its other host side's level, or its zone link's if less
            caps = [
                c if (link := g.link) is None or c <= link.level else link.level
                for g in downs.values()
                for c in (up_level[g.src],)
            ]
        else:
            caps = [up_level[g.src] for g in downs.values()]
        level = capacity / len(caps)
        if min(caps) >= level:  # no flow held below an equal share: no water level to find
            self._down_level[host] = level
            if rose is None:
                for g in downs.values():
                    if g.a_down != level:
                        g.a_down = level
                        changed.append(g)
            else:
                for g in downs.values():
                    old = g.a_down
                    if old != level:
                        if old < level:
                            rose.append(g)
                        g.a_down = level
                        changed.append(g)
            return
        self._down_level[host] = level = _water_level(capacity, caps)
        if rose is None:
            for g, c in zip(downs.values(), caps, strict=True):
                a = c if c < level else level
                if g.a_down != a:
                    g.a_down = a
                    changed.append(g)
        else:
            for g, c in zip(downs.values(), caps, strict=True):
                a = c if c < level else level
                old = g.a_down
                if old != a:
                    if old < a:
                        rose.append(g)
                    g.a_down = a
                    changed.append(g)

    def _fill_link(self, link: _Link, rose: list[_Flow] | None, changed: list[_Flow]) -> None:
        """Refill one direction of a zone link, as `_fill_up` a host's upload."""
        flows = link.flows
        capacity = link.capacity
        if self._equal or not flows:
            link.level = level = capacity / len(flows) if flows else capacity
            for g in flows.values():
                if g.a_link != level:
                    g.a_link = level
                    changed.append(g)
            return
        up_level = self._up_level
        down_level = self._down_level
        caps = []
        for g in flows.values():
            u = up_level[g.src]
            d = down_level[g.dst]
            caps.append(d if d < u else u)
        link.level = level = _water_level(capacity, caps)
        for g, c in zip(flows.values(), caps, strict=True):
            a = c if c < level else level
            old = g.a_link
            if a != old:
                if rose is not None and old < a:
                    rose.append(g)
                g.a_link = a
                changed.append(g)

    def _rerate(self, group: list[_Flow], now: float) -> None:
        """Rate the flows of ``group`` by their allotments; integrate and reschedule the ones
        whose rate changed."""
        sooner = self._sooner
        for g in group:
            # Comparisons, not min(): this loop is the simulator's hot spot.
            r = g.a_up
            d = g.a_down
            r = d if d < r else r
            a = g.a_link
            r = a if a < r else r
            rate = g.rate
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
            # (and a newcomer's first) is queued at the next query, if it still is earlier
            # then: a flow ending and the next one starting at the same instant speed their
            # neighbours up and slow them back down.
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


def _water_level(capacity: float, caps: list[float]) -> float:
    """The level L of one side: its flows held to ``caps`` elsewhere take
    ``sum(min(cap, L)) == capacity`` -- each gets its cap or L, whichever is less. When the
    caps leave capacity over, L is the largest cap plus what is left (what one flow could take
    if it alone were free to grow). ``capacity`` may be 0 or inf."""
    ordered = sorted(caps)
    left = capacity
    n = len(ordered)
    for i, c in enumerate(ordered):
        share = left / (n - i)
        if c >= share:
            return share
        left -= c
    return ordered[-1] + left


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
