"""Tests of the storm simulator's network model: exact small cases, then properties.

The property tests drive the network with a tiny event loop that integrates every flow's rate
itself, so completion times and cancelled byte counts are checked against an independent sum;
with the equal split every rate is checked against its formula recomputed from scratch, with
water-filling every side against its capacity and every flow against starving; flows that only
start get at least their equal-split rate; small hand cases have their max-min answers.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.storm.network import SHARING, Network

MB = 1_000_000.0


def net_with(*hosts: tuple[float, float, int], sharing: str = "fill") -> Network:
    net = Network(sharing)
    for up, down, zone in hosts:
        net.add_host(up, down, zone)
    return net


def finish(net: Network) -> tuple[float, int]:
    nc = net.next_completion()
    assert nc is not None
    return nc


# -- exact small cases ----------------------------------------------------------------------


def test_one_flow_gets_min_of_up_and_down() -> None:
    net = net_with((10.0, 100.0, 0), (100.0, 5.0, 0))
    f = net.start_flow(0, 1, 50.0, now=0.0, tag="x")
    assert net.rate(f) == 5.0
    assert finish(net) == (10.0, f)
    assert net.complete(f, 10.0) == "x"
    assert net.next_completion() is None
    assert net.bytes_sent(0) == 50.0 and net.bytes_received(1) == 50.0


def test_two_uploads_split_the_host_and_an_ending_flow_speeds_the_other() -> None:
    net = net_with((10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 100.0, 0))
    a = net.start_flow(0, 1, 50.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    assert net.rate(a) == net.rate(b) == 5.0
    assert finish(net) == (10.0, a)
    net.complete(a, 10.0)
    assert net.rate(b) == 10.0
    assert net.remaining(b, 10.0) == 50.0
    assert finish(net) == (15.0, b)
    net.complete(b, 15.0)


def test_completion_times_when_a_flow_joins_midway() -> None:
    # 100 MB at 10 MB/s; at t=5 a second 100 MB upload joins: both at 5 MB/s until the first
    # ends at t=15 (50 MB left at 5 MB/s), then the second runs alone at 10 MB/s: 50 MB -> t=20.
    net = net_with((10 * MB, 0.0, 0), (0.0, math.inf, 0), (0.0, math.inf, 0))
    a = net.start_flow(0, 1, 100 * MB, now=0.0)
    assert finish(net) == (10.0, a)
    b = net.start_flow(0, 2, 100 * MB, now=5.0)
    assert net.remaining(a, 5.0) == 50 * MB
    assert finish(net) == (15.0, a)
    net.complete(a, 15.0)
    assert net.remaining(b, 15.0) == 50 * MB
    assert finish(net) == (20.0, b)
    net.complete(b, 20.0)
    assert net.bytes_sent(0) == 200 * MB


def test_a_speed_up_moves_a_flow_ahead_of_an_unrelated_one() -> None:
    net = net_with((2.0, 0.0, 0), (0.0, 9.0, 0), (0.0, 9.0, 0), (1.0, 0.0, 0), (0.0, 9.0, 0))
    a = net.start_flow(0, 1, 10.0, now=0.0)
    b = net.start_flow(0, 2, 20.0, now=0.0)  # due at 20 while sharing host 0
    c = net.start_flow(3, 4, 17.0, now=0.0)  # due at 17
    assert finish(net) == (10.0, a)
    net.complete(a, 10.0)
    assert finish(net) == (15.0, b)  # 10 bytes left at 2/s, ahead of c
    net.complete(b, 15.0)
    assert finish(net) == (17.0, c)


def test_download_side_splits_too() -> None:
    net = net_with((100.0, 0.0, 0), (100.0, 0.0, 0), (0.0, 10.0, 0))
    a = net.start_flow(0, 2, 10.0, now=0.0)
    b = net.start_flow(1, 2, 10.0, now=0.0)
    assert net.rate(a) == net.rate(b) == 5.0


def test_equal_split_leaves_unused_share_unused() -> None:
    # Documented pessimism: host 0's second flow is held to 1 by host 2's download, but the
    # first flow still only gets half of host 0's upload (max-min would give it 9).
    net = net_with((10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 1.0, 0), sharing="equal")
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    assert (net.rate(a), net.rate(b)) == (5.0, 1.0)


def test_water_filling_gives_what_a_flow_held_elsewhere_leaves_to_the_others() -> None:
    # the same flows: b is held to 1 by host 2's download, a takes the other 9 (max-min)
    net = net_with((10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 1.0, 0))
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    assert (net.rate(a), net.rate(b)) == (9.0, 1.0)
    # b ends: a gets all of host 0's upload; a third flow halves it again
    net.cancel_flow(b, now=1.0)
    assert net.rate(a) == 10.0
    assert net.remaining(a, 1.0) == 91.0
    c = net.start_flow(0, 2, 100.0, now=2.0)
    assert (net.rate(a), net.rate(c)) == (9.0, 1.0)


def test_water_filling_reaches_a_neighbour_when_a_flow_ends() -> None:
    # host 2 downloads b (from host 0, shared with a) and c (from host 3): all at 5. When c
    # ends, b is still held to 5 by host 0; when a ends too, b may take host 0's whole upload,
    # which it gets only if host 2 -- whose download no flow started or ended on -- is asked
    # again: it had allotted b no more than host 0's level then (5).
    net = net_with((10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 10.0, 0), (100.0, 0.0, 0))
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    c = net.start_flow(3, 2, 100.0, now=0.0)
    assert (net.rate(a), net.rate(b), net.rate(c)) == (5.0, 5.0, 5.0)
    net.cancel_flow(c, now=1.0)  # host 2's download is b's alone now: b gets host 0's 5 ...
    assert net.rate(b) == 5.0
    net.cancel_flow(a, now=2.0)  # ... and host 0's whole upload once a has gone
    assert net.rate(b) == 10.0
    assert net.remaining(b, 2.0) == 90.0


def test_only_flows_a_changed_share_limited_or_tied_change_rate() -> None:
    # host 0 uploads a (to a fast host) and b (to host 2, whose download c shares): all at 5,
    # b tied between host 0's upload share and host 2's download share.
    net = net_with(
        (10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 10.0, 0), (100.0, 0.0, 0), sharing="equal"
    )
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    c = net.start_flow(3, 2, 100.0, now=0.0)
    assert (net.rate(a), net.rate(b), net.rate(c)) == (5.0, 5.0, 5.0)
    net.cancel_flow(a, now=1.0)  # host 0's share rises to 10; b is still held to 5 by host 2
    assert (net.rate(b), net.rate(c)) == (5.0, 5.0)
    net.cancel_flow(c, now=2.0)  # host 2's share rises to 10: b, tied before, now gets 10
    assert net.rate(b) == 10.0
    assert net.remaining(b, 2.0) == 90.0
    d = net.start_flow(0, 1, 100.0, now=3.0)  # host 0's share falls to 5: b is above it
    assert (net.rate(b), net.rate(d)) == (5.0, 5.0)
    assert net.remaining(b, 3.0) == 80.0
    assert finish(net) == (19.0, b)


@pytest.mark.parametrize(("sharing", "local_rate"), [("equal", 50.0), ("fill", 90.0)])
def test_zone_link_limits_cross_flows_only_and_each_direction_separately(
    sharing: str, local_rate: float
) -> None:
    hosts = [(100.0, 100.0, 0), (100.0, 100.0, 1), (100.0, 100.0, 0), (100.0, 100.0, 1)]
    net = net_with(*hosts, sharing=sharing)
    net.set_link(0, 1, 10.0)
    cross = net.start_flow(0, 1, 100.0, now=0.0)
    local = net.start_flow(0, 2, 100.0, now=0.0)
    # the cross flow is held to the link's 10; the local one gets half the upload, or the rest
    assert (net.rate(cross), net.rate(local)) == (10.0, local_rate)
    cross2 = net.start_flow(2, 3, 100.0, now=0.0)
    assert net.rate(cross) == net.rate(cross2) == 5.0
    back = net.start_flow(1, 0, 100.0, now=0.0)  # the other direction has its own 10
    assert net.rate(back) == 10.0
    net.cancel_flow(cross2, now=1.0)
    assert net.rate(cross) == 10.0


def test_link_set_mid_run_takes_effect_on_existing_flows() -> None:
    net = net_with((100.0, 100.0, 0), (100.0, 100.0, 1))
    f = net.start_flow(0, 1, 1000.0, now=0.0)
    assert net.rate(f) == 100.0
    net.set_link(1, 0, 20.0, now=2.0)
    assert net.rate(f) == 20.0
    assert finish(net) == (2.0 + 800.0 / 20.0, f)


def test_bytes_between_zones_counts_completed_and_cancelled_cross_traffic() -> None:
    net = net_with((10.0, 10.0, 0), (10.0, 10.0, 1), (10.0, 10.0, 0))
    a = net.start_flow(0, 1, 30.0, now=0.0)
    b = net.start_flow(2, 1, 100.0, now=0.0)
    c = net.start_flow(1, 2, 5.0, now=0.0)
    assert net.rate(a) == net.rate(b) == 5.0
    net.complete(c, 0.5)
    net.complete(a, 6.0)
    assert net.cancel_flow(b, now=7.0) == 40.0
    assert net.bytes_between_zones == 30.0 + 40.0 + 5.0
    assert net.bytes_received(1) == 70.0
    assert net.bytes_sent(1) == 5.0


def test_cancel_returns_transferred_bytes_and_frees_the_share() -> None:
    net = net_with((10.0, 0.0, 0), (0.0, 100.0, 0), (0.0, 100.0, 0))
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    assert net.cancel_flow(a, now=4.0) == 20.0
    assert net.rate(b) == 10.0
    assert finish(net) == (12.0, b)
    with pytest.raises(KeyError):
        net.rate(a)


def test_remove_host_cancels_its_flows_and_speeds_up_others() -> None:
    net = net_with((10.0, 10.0, 0), (10.0, 10.0, 0), (10.0, 10.0, 0), (10.0, 10.0, 0))
    a = net.start_flow(0, 1, 100.0, now=0.0)
    b = net.start_flow(0, 2, 100.0, now=0.0)
    c = net.start_flow(3, 2, 100.0, now=0.0)
    d = net.start_flow(2, 3, 100.0, now=0.0)
    z = net.start_flow(1, 2, 0.0, now=0.0)
    assert net.rate(a) == 5.0
    assert net.remove_host(2, now=2.0) == sorted([b, c, d, z])
    assert net.rate(a) == 10.0
    assert net.remaining(a, 2.0) == 90.0
    assert net.bytes_received(2) == 20.0  # b and c ran at 5 for 2 s
    assert net.bytes_sent(2) == 20.0  # d ran at 10 for 2 s
    assert finish(net) == (11.0, a)
    with pytest.raises(ValueError, match="removed"):
        net.start_flow(2, 1, 1.0, now=3.0)


def test_zero_size_flow_completes_at_once_and_holds_no_share() -> None:
    net = net_with((10.0, 10.0, 0), (10.0, 10.0, 0), (10.0, 10.0, 0))
    a = net.start_flow(0, 1, 100.0, now=0.0)
    z = net.start_flow(0, 2, 0.0, now=3.0, tag="empty")
    assert net.rate(a) == 10.0
    assert finish(net) == (3.0, z)
    assert net.complete(z, 3.0) == "empty"
    assert finish(net) == (10.0, a)


def test_zero_capacity_never_completes() -> None:
    net = net_with((0.0, 10.0, 0), (10.0, 10.0, 0))
    f = net.start_flow(0, 1, 100.0, now=0.0)
    assert net.rate(f) == 0.0
    assert net.next_completion() is None
    assert net.remaining(f, 50.0) == 100.0
    with pytest.raises(ValueError, match="not complete"):
        net.complete(f, 50.0)
    assert net.cancel_flow(f, now=60.0) == 0.0


def test_infinite_capacity_is_instant() -> None:
    net = net_with((math.inf, math.inf, 0), (math.inf, math.inf, 0))
    f = net.start_flow(0, 1, 100.0, now=4.0)
    assert net.rate(f) == math.inf
    assert finish(net) == (4.0, f)
    net.complete(f, 4.0)
    assert net.bytes_received(1) == 100.0


def test_misuse_is_refused() -> None:
    net = net_with((10.0, 10.0, 0), (10.0, 10.0, 0))
    f = net.start_flow(0, 1, 100.0, now=1.0)
    with pytest.raises(ValueError, match="not complete"):
        net.complete(f, 5.0)
    with pytest.raises(ValueError, match="backwards"):
        net.start_flow(1, 0, 1.0, now=0.5)
    with pytest.raises(ValueError, match="itself"):
        net.start_flow(1, 1, 1.0, now=2.0)
    with pytest.raises(KeyError):
        net.start_flow(0, 7, 1.0, now=2.0)
    with pytest.raises(ValueError):
        net.set_link(3, 3, 1.0)


def test_complete_accepts_the_announced_time_of_a_tiny_flow_late_in_the_run() -> None:
    # At t=1e5 one ulp of time is ~1.5e-11 s, i.e. ~0.015 bytes at 1 GB/s: far more than
    # 1e-9 of a 1 kB flow. The time handed out by next_completion must still be accepted.
    net = net_with((1e9, 1e9, 0), (1e9, 1e9, 0))
    f = net.start_flow(0, 1, 1000.0 + 1 / 3, now=1e5 + 1 / 7)
    t, fid = finish(net)
    net.complete(fid, t)
    assert net.bytes_received(1) == 1000.0 + 1 / 3
    assert fid == f


def test_a_due_flow_re_rated_at_its_finish_time_stays_due() -> None:
    # The caller may handle other events at a flow's finish time before completing it; a new
    # flow then re-rates the due one, which must not slip by a rounding residue.
    net = net_with((1e9, 1e9, 0), (1e9, 1e9, 0), (1e9, 1e9, 0))
    f = net.start_flow(0, 1, 1000.0 + 1 / 3, now=1e5 + 1 / 7)
    t, _ = finish(net)
    g = net.start_flow(0, 2, 5000.0, now=t)
    assert net.remaining(f, t) == 0.0
    assert finish(net) == (t, f)
    net.complete(f, t)
    assert net.rate(g) == 1e9


# -- properties -----------------------------------------------------------------------------

CAPS = st.sampled_from([0.0, 1.0, 2.5, 3.0, 10.0, 7.25, 1.0, 4.0, math.inf])
SIZES = st.one_of(st.sampled_from([0.0, 1.0, 100.0]), st.floats(0.001, 1000.0))
Op = tuple[str, int, int, float]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[float, float, int]], list[Op], list[Op]]:
    n = draw(st.integers(2, 7))
    hosts = [(draw(CAPS), draw(CAPS), draw(st.integers(0, 2))) for _ in range(n)]
    host = st.integers(0, n - 1)
    links = draw(
        st.lists(st.tuples(st.just("link"), host, host, st.sampled_from([0.5, 4.0, 0.0]))),
    )
    # Weighted so that most runs keep several flows alive and overlapping.
    kinds = st.sampled_from(["start"] * 5 + ["next"] * 3 + ["wait"] * 2 + ["cancel", "remove"])
    ops: list[Op] = []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(kinds)
        if kind == "start":
            ops.append((kind, draw(host), draw(host), draw(SIZES)))
        elif kind == "cancel":
            ops.append((kind, draw(st.integers(0, 99)), 0, 0.0))
        elif kind == "wait":
            ops.append((kind, 0, 0, draw(st.floats(0.0, 20.0))))
        elif kind == "remove":
            ops.append((kind, draw(host), 0, 0.0))
        else:
            ops.append((kind, 0, 0, 0.0))
    return hosts, links, ops


@dataclass
class Driver:
    """A tiny event loop that checks the network against its own bookkeeping."""

    hosts: list[tuple[float, float, int]]
    sharing: str = "fill"
    net: Network = field(init=False)
    now: float = 0.0
    flows: dict[int, tuple[int, int, float]] = field(default_factory=dict)
    delivered: dict[int, float] = field(default_factory=dict)
    links: dict[tuple[int, int], float] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    log: list[tuple[object, ...]] = field(default_factory=list)
    completed_bytes: float = 0.0
    cancelled_bytes: float = 0.0

    def __post_init__(self) -> None:
        self.net = Network(self.sharing)
        for up, down, zone in self.hosts:
            self.net.add_host(up, down, zone)

    def zone(self, h: int) -> int:
        return self.hosts[h][2]

    def run(self, links: list[Op], ops: list[Op]) -> None:
        for _, a, b, cap in links:
            za, zb = self.zone(a), self.zone(b)
            if za != zb:
                self.net.set_link(za, zb, cap)
                self.links[za, zb] = self.links[zb, za] = cap
        for kind, a, b, x in ops:
            getattr(self, f"op_{kind}")(a, b, x)
            self.check_rates()
        self.advance_to(math.inf)
        self.check_totals()

    def op_start(self, src: int, dst: int, size: float) -> None:
        if src == dst or src in self.dead or dst in self.dead:
            return
        fid = self.net.start_flow(src, dst, size, self.now, tag=("t", src, dst))
        self.flows[fid] = (src, dst, size)
        self.delivered[fid] = 0.0
        self.log.append(("start", fid, self.now))

    def op_cancel(self, i: int, _b: int, _x: float) -> None:
        if self.flows:
            fid = sorted(self.flows)[i % len(self.flows)]
            self.settle_instant()
            got = self.net.cancel_flow(fid, self.now)
            self.forget(fid, got)

    def settle_instant(self) -> None:
        # A flow at infinite rate is due at once: all of it counts as moved, even if cut now.
        for fid, (_, _, size) in self.flows.items():
            if self.net.rate(fid) == math.inf:
                self.delivered[fid] = size

    def forget(self, fid: int, got: float) -> None:
        size = self.flows.pop(fid)[2]
        assert 0.0 <= got <= size
        assert got == pytest.approx(self.delivered.pop(fid), rel=1e-7, abs=1e-9)
        self.cancelled_bytes += got
        self.log.append(("cancel", fid, self.now, got))

    def op_wait(self, _a: int, _b: int, dt: float) -> None:
        self.advance_to(self.now + dt)

    def op_next(self, _a: int, _b: int, _x: float) -> None:
        nc = self.net.next_completion()
        if nc is not None:
            self.advance_to(nc[0])

    def op_remove(self, h: int, _b: int, _x: float) -> None:
        if h in self.dead:
            return
        self.settle_instant()
        before = {fid: self.net.remaining(fid, self.now) for fid in self.flows}
        mine = sorted(fid for fid, (s, d, _) in self.flows.items() if h in (s, d))
        assert self.net.remove_host(h, self.now) == mine
        self.dead.add(h)
        for fid in mine:
            self.forget(fid, self.flows[fid][2] - before[fid])

    def integrate(self, t: float) -> None:
        if t > self.now:
            for fid in self.flows:
                rate = self.net.rate(fid)
                assert rate < math.inf, "an instant flow was left pending while time passed"
                self.delivered[fid] += rate * (t - self.now)
            self.now = t

    def advance_to(self, t: float) -> None:
        while (nc := self.net.next_completion()) is not None and nc[0] <= t:
            when, fid = nc
            assert when >= self.now, "completion in the past"
            self.integrate(when)
            src, dst, size = self.flows.pop(fid)
            delivered = self.delivered.pop(fid)
            if self.net.rate(fid) < math.inf:
                assert delivered == pytest.approx(size, rel=1e-7, abs=1e-9)
            assert self.net.complete(fid, when) == ("t", src, dst)
            self.completed_bytes += size
            self.log.append(("done", fid, when))
            self.check_rates()
        if t < math.inf:
            self.integrate(t)

    def check_rates(self) -> None:
        n_up: dict[int, int] = {}
        n_down: dict[int, int] = {}
        n_link: dict[tuple[int, int], int] = {}
        live = {fid: f for fid, f in self.flows.items() if f[2] > 0}
        for src, dst, _ in live.values():
            n_up[src] = n_up.get(src, 0) + 1
            n_down[dst] = n_down.get(dst, 0) + 1
            key = (self.zone(src), self.zone(dst))
            n_link[key] = n_link.get(key, 0) + 1
        up_sum: dict[int, float] = {}
        down_sum: dict[int, float] = {}
        link_sum: dict[tuple[int, int], float] = {}
        for fid, (src, dst, _) in live.items():
            key = (self.zone(src), self.zone(dst))
            shares = [self.hosts[src][0] / n_up[src], self.hosts[dst][1] / n_down[dst]]
            if key in self.links:
                shares.append(self.links[key] / n_link[key])
            rate = self.net.rate(fid)
            # only the flows whose allotment changed are re-rated: none may be left behind
            flow = self.net._flows[fid]
            assert rate == min(flow.a_up, flow.a_down, flow.a_link), fid
            if self.sharing == "equal":
                assert rate == min(shares)
            else:
                # every side's capacity is checked below; none starves a flow it could carry
                assert rate <= min(self.caps(src, dst))
                assert rate > 0 or min(self.caps(src, dst)) == 0
            up_sum[src] = up_sum.get(src, 0.0) + rate
            down_sum[dst] = down_sum.get(dst, 0.0) + rate
            link_sum[key] = link_sum.get(key, 0.0) + rate
        for h, total in up_sum.items():
            assert total <= self.hosts[h][0] * (1 + 1e-9)
        for h, total in down_sum.items():
            assert total <= self.hosts[h][1] * (1 + 1e-9)
        for key, total in link_sum.items():
            if key in self.links:
                assert total <= self.links[key] * (1 + 1e-9)
        nc = self.net.next_completion()
        assert nc is None or nc[0] >= self.now

    def caps(self, src: int, dst: int) -> list[float]:
        """The capacities of the sides a flow from `src` to `dst` crosses."""
        key = (self.zone(src), self.zone(dst))
        caps = [self.hosts[src][0], self.hosts[dst][1]]
        if key in self.links:
            caps.append(self.links[key])
        return caps

    def check_totals(self) -> None:
        n = len(self.hosts)
        received = sum(self.net.bytes_received(h) for h in range(n))
        sent = sum(self.net.bytes_sent(h) for h in range(n))
        moved = self.completed_bytes + self.cancelled_bytes
        assert received == pytest.approx(moved, rel=1e-9, abs=1e-9)
        assert sent == pytest.approx(moved, rel=1e-9, abs=1e-9)
        assert self.net.bytes_between_zones <= received * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("sharing", SHARING)
@settings(max_examples=300, deadline=None)
@given(scenario=scenarios())
def test_random_runs_keep_rates_capacities_and_bytes_right(
    sharing: str,
    scenario: tuple[list[tuple[float, float, int]], list[Op], list[Op]],
) -> None:
    hosts, links, ops = scenario
    Driver(hosts, sharing).run(links, ops)


@pytest.mark.parametrize("sharing", SHARING)
@settings(max_examples=50, deadline=None)
@given(scenario=scenarios())
def test_same_ops_give_same_results(
    sharing: str,
    scenario: tuple[list[tuple[float, float, int]], list[Op], list[Op]],
) -> None:
    hosts, links, ops = scenario
    first, second = Driver(hosts, sharing), Driver(hosts, sharing)
    first.run(links, ops)
    second.run(links, ops)
    assert first.log == second.log
    assert first.net.bytes_between_zones == second.net.bytes_between_zones


@settings(max_examples=200, deadline=None)
@given(
    hosts=st.lists(st.tuples(CAPS, CAPS), min_size=2, max_size=7),
    pairs=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=14),
)
def test_water_filling_gives_every_flow_at_least_its_equal_split(
    hosts: list[tuple[float, float]], pairs: list[tuple[int, int]]
) -> None:
    # Flows that only start (none ends): every side's level is at least its capacity over its
    # flows, and a cap a side took from a neighbour was the neighbour's level when it had no
    # more flows than now, so each allotment is at least the equal split's share.
    flows = [(a % len(hosts), b % len(hosts)) for a, b in pairs if a % len(hosts) != b % len(hosts)]
    nets = {sharing: Network(sharing) for sharing in SHARING}
    for net in nets.values():
        for up, down in hosts:
            net.add_host(up, down)
    ids = {
        sharing: [net.start_flow(s, d, 1e9, now=0.0) for s, d in flows]
        for sharing, net in nets.items()
    }
    for fill, equal in zip(ids["fill"], ids["equal"], strict=True):
        assert nets["fill"].rate(fill) >= nets["equal"].rate(equal)


# -- throughput (printed, not asserted) -----------------------------------------------------


def churn(hosts: int, flows_per_host: int, steps: int, zones: int = 1, seed: int = 1) -> float:
    """Fill ``hosts`` with ~``flows_per_host`` concurrent flows each (half up, half down), then
    complete the earliest flow and start a fresh one ``steps`` times; return ops/s (a start
    and a complete are two ops)."""
    rng = random.Random(seed)
    net = Network()
    for _ in range(hosts):
        up = rng.uniform(10 * MB, 100 * MB)
        net.add_host(up, 2 * up, rng.randrange(zones))
    if zones > 1:
        for a in range(zones):
            for b in range(a + 1, zones):
                net.set_link(a, b, 1000 * MB)

    def start(now: float) -> None:
        src = rng.randrange(hosts)
        dst = (src + rng.randrange(1, hosts)) % hosts
        net.start_flow(src, dst, rng.uniform(1 * MB, 64 * MB), now)

    for _ in range(hosts * flows_per_host // 2):
        start(0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        nc = net.next_completion()
        assert nc is not None
        when, fid = nc
        net.complete(fid, when)
        start(when)
    return 2 * steps / (time.perf_counter() - t0)


def test_churn_throughput() -> None:
    for hosts, per_host in [(10_000, 4), (1_000, 40)]:
        ops = churn(hosts, per_host, steps=5_000)
        print(f"\nchurn: {hosts} hosts x ~{per_host} flows: {ops:,.0f} start+complete ops/s")


if __name__ == "__main__":  # the full-size run: python -m tests.storm.test_network
    # With zones, ~2/3 of the random flows cross a link: each start/end on a link touches all of
    # that link direction's flows, so the zone runs are kept small.
    for hosts, per_host, zones in [
        (10_000, 40, 1),
        (10_000, 10, 1),
        (1_000, 10, 3),
    ]:
        ops = churn(hosts, per_host, steps=50_000, zones=zones)
        print(f"churn: {hosts} hosts x ~{per_host} flows, {zones} zone(s): {ops:,.0f} ops/s")
