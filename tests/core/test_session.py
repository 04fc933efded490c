"""The peer-side download session: batching, idle back-off, failures, give-ups."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import PieceLayout
from p2pd.core.picker import PickerConfig, Request
from p2pd.core.session import (
    MAX_PACE,
    REPORT_BAD_PIECE,
    REPORT_UNREACHABLE,
    DownloadSession,
    ParentView,
    SessionConfig,
)

LAYOUT = PieceLayout(8, 1)
CONFIG = SessionConfig(
    announce_interval=1.0,
    min_announce_gap=0.1,
    stall_timeout=10.0,
    max_connect_failures=2,
    early_bytes=0,
    picker=PickerConfig(max_in_flight_per_parent=2, prefix_window=0),
)


def parent(name: str, pieces: str = "11111111") -> ParentView:
    bits = Bitfield.from_indexes(len(pieces), [i for i, c in enumerate(pieces) if c == "1"])
    return ParentView(name, f"{name}:1", bits)


def session(now: float = 0.0) -> DownloadSession:
    return DownloadSession(LAYOUT, "me", random.Random(1), CONFIG, now=now)


def test_fetches_only_known_pieces_and_batches_announces() -> None:
    s = session()
    s.apply("fetching", 3, [parent("a")], 0.0)
    out = s.poll(0.0)
    assert sorted(r.index for r in out.fetch) == [0, 1]  # 2 in flight, only hashed pieces
    assert not out.announce
    for r in out.fetch:
        assert s.on_piece(r, True, 0.2)
    out = s.poll(0.2)
    assert [r.index for r in out.fetch] == [2]
    assert not out.announce  # batched until the interval
    assert s.poll(1.0).announce
    pieces, want_parents = s.take_announce(1.0)
    assert sorted(pieces) == [0, 1] and want_parents
    assert not s.poll(1.5).announce


def test_a_poll_again_at_the_same_instant_with_nothing_new_hands_over_nothing() -> None:
    s = session(now=4.0)
    s.apply("ready", 8, [parent("a"), parent("b")], 4.0)
    first = s.poll(4.5)
    assert len(first.fetch) == 4
    assert s.last_busy == 4.0  # nothing was in flight when it looked
    again = s.poll(4.5)
    assert (again.fetch, again.cancel, again.reports, again.announce) == ([], [], [], False)
    assert s.last_busy == 4.5  # as a full poll: transfers are in flight now
    s.on_failure(first.fetch[0], False, 4.5)  # an input: acted on at the same instant
    assert [r.index for r in s.poll(4.5).fetch] == [first.fetch[0].index]
    assert s.poll(5.0).announce
    assert s.poll(5.0).announce  # an announce not taken is still due
    s.take_announce(5.0)
    assert not s.poll(5.0).announce


@pytest.mark.parametrize("seed", range(4))
def test_polls_again_at_one_instant_decide_as_full_polls_would(seed: int) -> None:
    """The quiet path of `poll` changes nothing a full poll would have decided: two sessions
    driven alike, one made to take every poll the full way (a no-op input before it),
    make the same requests, announces and reports throughout."""
    rng = random.Random(seed)
    n = 64
    layout = PieceLayout(n, 1)
    cfg = replace(CONFIG, picker=PickerConfig(max_in_flight_per_parent=2, prefix_window=4))
    holdings = {f"p{i}": rng.getrandbits(n) for i in range(5)}
    views = [ParentView(name, f"{name}:1", Bitfield(n, bits)) for name, bits in holdings.items()]
    sessions = [DownloadSession(layout, "me", random.Random(seed), cfg) for _ in range(2)]
    logs: list[list[object]] = [[], []]
    for s in sessions:
        s.apply("ready", n, views, 0.0)
    for step in range(300):
        now = step * 0.05
        for k, s in enumerate(sessions):
            for _ in range(3):  # a driver polls again after acting
                if k:
                    s.on_received(Request("nobody", 0))  # counts as an input, does nothing
                out = s.poll(now)
                logs[k].append((now, out.fetch, out.cancel, out.reports, out.announce, out.gave_up))
                if out.announce:
                    s.take_announce(now)
                    s.apply("ready", n, views, now)
        # the same results reach both, decided once
        live = sorted(sessions[0].live)
        assert live == sorted(sessions[1].live)
        for request in live:
            roll = rng.random()
            for s in sessions:
                if roll < 0.6:
                    s.on_piece(request, True, now)
                elif roll < 0.65:
                    s.on_failure(request, False, now)
    assert logs[0] == logs[1]
    assert sessions[0].have == sessions[1].have


def test_idle_session_asks_soon_then_backs_off() -> None:
    s = session()
    s.apply("fetching", 0, [], 0.0)
    times = []
    now = 0.0
    for _ in range(6):
        s.poll(now)
        now = s.next_wakeup()
        out = s.poll(now)
        assert out.announce
        s.take_announce(now)
        s.apply("fetching", 0, [], now)  # its reply: still no parents
        times.append(round(now, 3))
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert gaps == [0.2, 0.4, 0.8, 1.0, 1.0]


def test_early_in_a_download_the_session_calls_often_then_settles() -> None:
    config = SessionConfig(
        announce_interval=1.0,
        min_announce_gap=0.1,
        early_announce_interval=0.25,
        early_bytes=2 * LAYOUT.piece_size,
        picker=PickerConfig(max_in_flight_per_parent=1, prefix_window=0),
    )
    s = DownloadSession(LAYOUT, "me", random.Random(1), config, now=0.0)
    s.apply("fetching", 8, [], 0.0)
    # Idle and holding nothing: back-off starts at the gap but never passes the early cadence.
    times = []
    now = 0.0
    for _ in range(4):
        s.poll(now)
        now = s.next_wakeup()
        assert s.poll(now).announce
        s.take_announce(now)
        s.apply("fetching", 8, [], now)  # its reply: still no parents
        times.append(round(now, 3))
    assert [round(b - a, 3) for a, b in itertools.pairwise(times)] == [0.2, 0.25, 0.25]
    # Busy with one piece held: still the early cadence, not the full interval.
    s.apply("fetching", 8, [parent("a")], now)
    (first,) = s.poll(now).fetch
    assert s.on_piece(first, True, now + 0.1)
    (second,) = s.poll(now + 0.1).fetch
    pieces, _ = s.take_announce(now + 0.1)
    assert pieces == [first.index]
    assert s.next_wakeup() == pytest.approx(now + 0.35)
    # Two pieces held: the batch interval again.
    assert s.on_piece(second, True, now + 0.2)
    s.poll(now + 0.2)
    s.take_announce(now + 0.35)
    assert s.next_wakeup() == pytest.approx(now + 1.35)


def test_picker_default_is_one_request_per_parent() -> None:
    s = DownloadSession(LAYOUT, "me", random.Random(1), SessionConfig(), now=0.0)
    s.apply("ready", 8, [parent("a"), parent("b")], 0.0)
    fetch = s.poll(0.0).fetch
    assert sorted(r.parent for r in fetch) == ["a", "b"]


def test_bad_piece_reports_and_shuns_the_parent() -> None:
    s = session()
    s.apply("ready", 8, [parent("a"), parent("b", "00000000")], 0.0)
    (first, *_rest) = s.poll(0.0).fetch
    assert first.parent == "a"
    assert not s.on_piece(first, False, 0.1)
    out = s.poll(0.1)
    assert out.reports == [("a", first.index, REPORT_BAD_PIECE)]
    assert {r.parent for r in out.cancel} <= {"a"}
    s.apply("ready", 8, [parent("a"), parent("b")], 0.2)  # the supernode still names it
    assert "a" not in s.picker.parents()
    assert {r.parent for r in s.poll(0.2).fetch} == {"b"}


def test_repeated_transfer_failures_report_the_parent_unreachable() -> None:
    s = session()
    s.apply("ready", 8, [parent("a"), parent("b")], 0.0)
    a_requests = [r for r in s.poll(0.0).fetch if r.parent == "a"]
    s.on_failure(a_requests[0], False, 0.1)
    assert s.poll(0.1).reports == []
    s.on_failure(a_requests[1], False, 0.2)
    out = s.poll(0.2)
    assert out.reports == [("a", a_requests[1].index, REPORT_UNREACHABLE)]
    assert s.picker.parents() == ["b"]


def test_not_found_is_not_a_failure() -> None:
    s = session()
    s.apply("ready", 8, [parent("a")], 0.0)
    for r in s.poll(0.0).fetch:
        s.on_failure(r, True, 0.1)
    assert s.poll(0.1).reports == []
    assert s.picker.parents() == ["a"]


def test_stall_and_failed_task_give_up() -> None:
    s = session()
    s.apply("fetching", 0, [], 0.0)
    assert s.poll(9.9).gave_up is None
    assert "no piece arrived for 10 s" in (s.poll(10.0).gave_up or "")
    t = session()
    t.apply("failed", 0, [], 0.0)
    assert "could not fetch" in (t.poll(0.0).gave_up or "")


def _run_until_it_gives_up(
    s: DownloadSession, now: float, state: str, known: int, parents: list[ParentView]
) -> float:
    """Wake the session exactly when `next_wakeup` says, as the drivers do (every announce
    answered with the same reply), until it gives up; returns that time."""
    for _ in range(500):
        out = s.poll(now)
        if out.gave_up is not None:
            return now
        if out.announce:
            s.take_announce(now)
            s.apply(state, known, parents, now)
        wake = s.next_wakeup()
        assert wake > now, f"woken at {now!r} as it asked, it asked for that time again"
        now = wake
    raise AssertionError("never gave up")


@pytest.mark.parametrize(
    ("start", "parents"),
    [
        # (start + 10) - start < 10: an idle session's stall_timeout
        (7.111917696952796, []),
        # (start + 60) - start < 60: a hung parent's busy_stall_timeout
        (9.364405867994597, [parent("hung")]),
    ],
)
def test_giving_up_happens_at_the_time_next_wakeup_gives(
    start: float, parents: list[ParentView]
) -> None:
    """Timeouts that round: the session gives up when woken at the time it asked for, not
    hands that time back (the storm simulator spun at one instant)."""
    timeout = CONFIG.busy_stall_timeout if parents else CONFIG.stall_timeout
    assert (start + timeout) - start < timeout  # the rounding this is about
    state, known = ("ready", 8) if parents else ("fetching", 0)
    s = session(start)
    s.apply(state, known, parents, start)
    assert _run_until_it_gives_up(s, start, state, known, parents) == start + timeout


def test_a_congested_swarm_is_not_a_stalled_one() -> None:
    """Slow transfers and a seeder still publishing pieces keep the session in the swarm;
    only idleness with neither gives up, ``stall_timeout`` after the last sign of life."""
    s = session()
    s.apply("fetching", 2, [parent("a")], 0.0)
    slow = s.poll(0.0).fetch
    assert slow  # in flight for longer than the stall timeout (the request timeout is 30 s)
    assert s.poll(25.0).gave_up is None
    for r in slow:
        s.on_failure(r, True, 25.0)  # the parent lacks them after all: nothing in flight now
    s.apply("fetching", 2, [], 25.0)
    assert s.poll(34.9).gave_up is None
    s.apply("fetching", 3, [], 34.9)  # the seeder published a piece: still alive
    assert s.poll(44.8).gave_up is None
    assert "no piece arrived" in (s.poll(44.9).gave_up or "")


def test_a_parent_that_never_delivers_does_not_hold_the_download_for_ever() -> None:
    """Requests to a hung parent expire and are asked again, so something is always in
    flight; the download still gives up once nothing arrived for busy_stall_timeout."""
    s = session()
    s.apply("ready", 8, [parent("hung")], 0.0)
    now, gave_up = 0.0, None
    while gave_up is None and now < 600:
        out = s.poll(now)
        gave_up = out.gave_up
        if gave_up is None:
            now += 1.0  # nothing ever arrives; the picker re-issues what expires
    assert gave_up is not None and "transfers in flight" in gave_up
    assert now == pytest.approx(CONFIG.busy_stall_timeout)


def test_late_results_for_cancelled_requests_are_ignored() -> None:
    s = session()
    s.apply("ready", 8, [parent("a")], 0.0)
    (r, *_rest) = s.poll(0.0).fetch
    s.apply("ready", 8, [], 0.1)  # the supernode took parent a away
    assert r in s.poll(0.1).cancel
    assert not s.on_piece(r, True, 0.2)
    s.on_failure(Request("a", 5), False, 0.3)  # never issued: ignored as well
    assert s.have.is_empty()


def test_completion_ends_the_session() -> None:
    s = session()
    s.apply("ready", 8, [parent("a"), parent("b")], 0.0)
    now = 0.0
    while not s.is_complete():
        now += 0.1
        for r in s.poll(now).fetch:
            s.on_piece(r, True, now)
        assert now < 5
    pieces, want = s.take_announce(now)
    assert sorted(pieces) == list(range(8)) and not want
    assert s.poll(now + 100).gave_up is None


def test_a_busy_supernode_stretches_the_announce_timers_not_the_reports() -> None:
    s = session()
    s.apply("fetching", 8, [parent("a"), parent("b")], 0.0, pace=3.0)
    out = s.poll(0.0)
    assert out.fetch and not out.announce
    s.on_piece(out.fetch[0], True, 0.1)
    assert not s.poll(1.5).announce  # our own interval (1 s) is not enough for the supernode
    assert s.next_wakeup() == pytest.approx(3.0)
    assert s.poll(3.0).announce
    s.take_announce(3.0)
    assert s.next_wakeup() == pytest.approx(6.0)
    # a bad piece is reported at once however busy the supernode is
    live = sorted(s.live, key=lambda r: r.index)
    s.on_piece(live[0], False, 3.5)
    assert [r[2] for r in s.poll(3.5).reports] == [REPORT_BAD_PIECE]
    # unpaced again by the next reply; an absurd pace is capped below the peer TTL
    s.apply("fetching", 8, [parent("b")], 3.6, pace=0.0)
    s.take_announce(3.6)
    assert s.next_wakeup() == pytest.approx(4.6)
    s.apply("fetching", 8, [parent("b")], 3.6, pace=1e9)
    s.take_announce(3.6)
    assert s.next_announce == pytest.approx(3.6 + MAX_PACE)


def test_an_idle_peer_is_not_paced_it_needs_parents() -> None:
    s = session()
    s.apply("fetching", 8, [], 0.0, pace=3.0)
    assert not s.poll(0.0).fetch
    assert s.next_wakeup() == pytest.approx(CONFIG.min_announce_gap)


def test_an_idle_peer_waits_the_pace_while_the_supernodes_replies_come_late() -> None:
    slow = CONFIG.slow_reply
    s = session()
    s.apply("fetching", 8, [], 0.0, pace=3.0)  # the register's reply: no announce timed
    assert not s.poll(0.0).announce
    assert s.next_wakeup() == pytest.approx(CONFIG.min_announce_gap)
    assert s.poll(0.1).announce
    s.take_announce(0.1)
    # the reply comes back late: the supernode's calls queue
    s.apply("fetching", 8, [], 0.1 + 2 * slow, pace=3.0)
    assert not s.poll(0.1 + 2 * slow).announce
    assert s.next_wakeup() == pytest.approx(0.1 + 2 * slow + 3.0)
    assert not s.poll(3.0).announce
    now = 0.1 + 2 * slow + 3.0
    assert s.poll(now).announce
    s.take_announce(now)
    # a reply in time again: back to its own back-off
    s.apply("fetching", 8, [], now + slow / 2, pace=3.0)
    assert not s.poll(now + slow / 2).announce
    assert s.next_wakeup() < now + 1.0
    # off: never paced while idle, however late the replies
    off = DownloadSession(LAYOUT, "me", random.Random(1), replace(CONFIG, slow_reply=0.0))
    off.apply("fetching", 8, [], 0.0, pace=3.0)
    off.poll(0.0)
    off.take_announce(0.1)
    off.apply("fetching", 8, [], 5.0, pace=3.0)
    assert not off.poll(5.0).announce
    assert off.next_wakeup() < 5.0 + 1.0


def test_a_starved_peer_tells_the_supernode_what_it_finished_at_once() -> None:
    # One parent (the seeder under its one-copy rule) offers two pieces at a time: once both
    # are in, the next ones come only with a reply to news of them, so that news goes out
    # as soon as the last bytes are in, not at the next announce tick.
    s = session()
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0)
    first, second = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.take_announce(0.0)  # just announced: the next tick is at 1.0
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0)  # its reply
    s.on_received(first)
    assert s.on_piece(first, True, 0.3)
    assert not s.poll(0.3).announce  # the second piece's bytes are still coming
    s.on_received(second)
    out = s.poll(0.35)
    assert out.announce and not out.fetch  # starved: both in, nothing more offered
    pieces, _ = s.take_announce(0.35)
    assert pieces == [0]
    # starved again right after an announce: it waits the minimum gap
    s.apply("fetching", 8, [parent("sn", "11100000")], 0.37)
    (third,) = s.poll(0.37).fetch
    s.on_received(third)
    assert s.on_piece(second, True, 0.4)
    assert not s.poll(0.4).announce
    assert s.next_wakeup() == pytest.approx(0.35 + CONFIG.min_announce_gap)
    assert s.poll(0.35 + CONFIG.min_announce_gap).announce


def test_a_peer_with_bytes_still_coming_keeps_its_announce_tick() -> None:
    s = session()
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0)
    first, _still_coming = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.take_announce(0.0)
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0)  # its reply
    s.on_received(first)
    assert s.on_piece(first, True, 0.3)
    for now in (0.3, 0.5, 0.9):
        assert not s.poll(now).announce  # `second` is still arriving: not starved
    assert s.next_wakeup() == pytest.approx(1.0)


def test_a_starved_peer_still_respects_the_supernodes_pace() -> None:
    s = session()
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0, pace=2.0)
    first, second = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.take_announce(0.0)
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0, pace=2.0)  # its reply
    for r in (first, second):
        s.on_received(r)
    assert s.on_piece(first, True, 0.3)
    assert not s.poll(0.3).announce
    assert s.poll(2.0).announce


def test_stream_ahead_lets_pieces_past_the_hashes_be_asked_of_a_parent_offering_them() -> None:
    config = SessionConfig(
        early_bytes=0, stream_ahead=2, picker=PickerConfig(max_in_flight_per_parent=8)
    )
    s = DownloadSession(LAYOUT, "me", random.Random(1), config)
    # hashes of 0..2 known; the seeder offers 3 and 4 too (streamed), and 6 (not contiguous)
    s.apply("fetching", 3, [parent("seeder", "11111010")], 0.0)
    assert sorted(r.index for r in s.poll(0.0).fetch) == [0, 1, 2, 3, 4]
    # without stream_ahead only hashed pieces are asked for (see the first test)
    plain = session()
    plain.apply("fetching", 3, [parent("seeder", "11111010")], 0.0)
    assert all(r.index < 3 for r in plain.poll(0.0).fetch)


def test_hashes_wanted_brings_the_next_announce_forward_within_pacing() -> None:
    s = session()
    s.apply("fetching", 8, [parent("a")], 0.0, pace=0.3)
    assert s.next_wakeup() >= 0.3
    s.take_announce(0.0)
    s.hashes_wanted(0.1)
    assert s.next_announce == pytest.approx(0.3)  # not before the pace allows
    s.hashes_wanted(0.5)
    assert s.next_announce == pytest.approx(0.3)


def test_an_announce_may_ride_along_once_half_its_own_gap_has_passed() -> None:
    s = session()
    s.apply("ready", 8, [parent("a")], 0.0, pace=3.0)  # paced: next announce at 3.0
    assert s.next_announce == 3.0
    assert not s.may_ride_along(1.4)
    assert s.may_ride_along(1.5)
    s.take_announce(1.5)  # riding along restarts its timer like its own announce
    assert s.next_announce == 1.5 + 3.0
    assert not s.may_ride_along(2.9) and s.may_ride_along(3.0)
    # however short its own gap, never sooner than min_announce_gap
    fast = session()
    fast.next_announce = 0.05
    assert not fast.may_ride_along(0.09) and fast.may_ride_along(0.1)
    # a complete download has nothing to ride along with (its last announce is its own)
    done = DownloadSession(LAYOUT, "me", random.Random(1), CONFIG, have=Bitfield.full(8))
    assert not done.may_ride_along(100.0)


def test_a_piece_whose_bytes_are_in_survives_a_reply_that_drops_its_parent() -> None:
    # The starved announce goes out as the last bytes come in; its reply may move the peer to
    # other parents. The bytes in hand are checked all the same; only what is still coming
    # from the dropped parent is cancelled, and nothing more is asked of it.
    s = session()
    s.apply("ready", 8, [parent("a", "11000000")], 0.0)
    first, second = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.on_received(first)
    s.apply("ready", 8, [parent("b")], 0.1)
    out = s.poll(0.1)
    assert out.cancel == [second]
    assert first in s.live and first not in out.cancel
    assert {r.parent for r in out.fetch} == {"b"}
    assert first.index not in {r.index for r in out.fetch}  # already being checked
    assert "a" in s.picker.parents()  # until the verdict, offering nothing
    assert s.on_piece(first, True, 0.2)
    assert first.index in s.have
    assert s.picker.parents() == ["b"]
    assert not s.poll(0.2).cancel


def test_a_bad_piece_from_a_dropped_parent_is_still_reported() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "10000000")], 0.0)
    (first,) = s.poll(0.0).fetch
    s.on_received(first)
    s.apply("ready", 8, [parent("b", "10000000")], 0.1)
    (duplicate,) = s.poll(0.1).fetch  # endgame: piece 0 is in flight from a only
    assert duplicate == Request("b", 0)
    assert not s.on_piece(first, False, 0.2)
    out = s.poll(0.2)
    assert out.reports == [("a", 0, REPORT_BAD_PIECE)]
    assert s.picker.parents() == ["b"]
    assert s.on_piece(duplicate, True, 0.3)
    assert 0 in s.have


def test_a_dropped_parent_named_again_is_a_parent_again() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "11000000")], 0.0)
    first, _ = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.on_received(first)
    s.apply("ready", 8, [], 0.1)
    s.poll(0.1)
    s.apply("ready", 8, [parent("a", "11100000")], 0.2)
    assert s.on_piece(first, True, 0.3)
    assert s.picker.parents() == ["a"]  # not dropped with the verdict: named again
    assert sorted(r.index for r in s.poll(0.3).fetch) == [1, 2]


def test_no_announce_timer_is_pulled_in_while_a_reply_is_due() -> None:
    # The daemon sends announces in the background and applies the reply when it comes,
    # which may be after the verdict of the very piece that left the peer idle. The reply
    # brings what an early call would ask for; the peer waits for it, then decides.
    s = session()
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.0)
    first, second = sorted(s.poll(0.0).fetch, key=lambda r: r.index)
    s.take_announce(0.0)
    for r in (first, second):
        s.on_received(r)
        assert s.on_piece(r, True, 0.3)
    assert not s.poll(0.3).announce
    assert s.next_wakeup() == pytest.approx(1.0)  # the tick, not the idle or starved gap
    s.apply("fetching", 8, [parent("sn", "11000000")], 0.31)  # nothing new on offer
    assert not s.poll(0.31).fetch
    assert s.next_wakeup() == pytest.approx(0.31 + CONFIG.min_announce_gap)  # idle again


# -- slow parents ---------------------------------------------------------------------------

SPEED_LAYOUT = PieceLayout(256 * 1000, 1000)  # 256 pieces


def _pull_with_speeds(
    seconds_per_piece: dict[str, float],
    offers: dict[str, str] | None = None,
    config: SessionConfig | None = None,
    until: float = 1000.0,
) -> tuple[DownloadSession, dict[str, int]]:
    """Drive a session whose parents each take a fixed time per piece, one request each at
    a time, every reply naming the same parents (all pieces unless `offers` says); returns
    the session and how many pieces each parent delivered."""
    cfg = config or SessionConfig(
        early_bytes=0, picker=PickerConfig(max_in_flight_per_parent=1, prefix_window=0)
    )
    n = SPEED_LAYOUT.count
    views = [parent(name, (offers or {}).get(name, "1" * n)) for name in sorted(seconds_per_piece)]
    s = DownloadSession(SPEED_LAYOUT, "me", random.Random(7), cfg)
    s.apply("ready", n, views, 0.0)
    due: list[tuple[float, Request]] = []
    served = dict.fromkeys(seconds_per_piece, 0)
    now = 0.0
    while not s.is_complete() and now < until:
        out = s.poll(now)
        assert out.gave_up is None
        due.extend((now + seconds_per_piece[r.parent], r) for r in out.fetch)
        if out.announce:
            s.take_announce(now)
            s.apply("ready", n, views, now)
        if not due:
            now = s.next_wakeup()
            continue
        due.sort()
        now, request = due.pop(0)
        if request in s.live:
            served[request.parent] += 1
        s.on_piece(request, True, now)
    return s, served


def test_a_parent_far_slower_than_the_others_is_set_aside_and_not_taken_back() -> None:
    s, served = _pull_with_speeds({"a": 0.1, "b": 0.1, "c": 0.12, "slow": 1.0})
    assert s.is_complete()
    assert s.slow == {"slow"}
    assert "slow" not in s.picker.parents()  # replies kept naming it
    assert served["slow"] == SessionConfig().slow_parent_samples
    assert s.shunned == set()  # set aside, not reported: no report went out


def test_parents_slowed_alike_are_all_kept() -> None:
    """A slow host's own parents are all capped by its link: none stands out."""
    s, served = _pull_with_speeds({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.2})
    assert s.slow == set()
    assert all(count > 10 for count in served.values())


def test_a_slow_parent_that_alone_offers_what_we_lack_is_kept() -> None:
    n = SPEED_LAYOUT.count
    only_some = "1" * (n - 4) + "0000"
    s, served = _pull_with_speeds(
        {"a": 0.1, "b": 0.1, "c": 0.1, "sn": 1.0},
        offers={"a": only_some, "b": only_some, "c": only_some},
    )
    assert s.is_complete()  # set aside while it alone had pieces, the pull would have stalled
    assert served["sn"] >= 4


def test_slow_parents_are_kept_when_the_ratio_is_zero() -> None:
    config = SessionConfig(
        early_bytes=0,
        slow_parent_ratio=0.0,
        picker=PickerConfig(max_in_flight_per_parent=1, prefix_window=0),
    )
    s, served = _pull_with_speeds({"a": 0.1, "b": 0.1, "c": 0.1, "slow": 1.0}, config=config)
    assert s.slow == set()
    assert served["slow"] > SessionConfig().slow_parent_samples


def test_a_slow_parent_alone_offering_something_new_is_taken_back() -> None:
    """The seeder, say: set aside while peers covered what it offered, it is needed again as
    soon as a reply has it offering a piece no other parent does (its claims would otherwise
    be held from everyone)."""
    s, _ = _pull_with_speeds(
        {"a": 0.1, "b": 0.1, "c": 0.12, "slow": 1.0}, until=3.0
    )  # set aside, download not complete
    assert s.slow == {"slow"} and not s.is_complete()
    n = SPEED_LAYOUT.count
    missing = next(i for i in range(n) if i not in s.have and not s.picker.requesters(i))
    only = "".join("1" if i == missing else "0" for i in range(n))
    others = "".join("0" if i == missing else "1" for i in range(n))
    views = [parent("a", others), parent("b", others), parent("c", others)]
    s.apply("ready", n, [*views, parent("slow", only)], 3.0)
    assert "slow" not in s.slow and "slow" in s.picker.parents()
    assert any(r.parent == "slow" and r.index == missing for r in s.poll(3.0).fetch)
    # the same reply without anything new from it leaves it aside
    t, _ = _pull_with_speeds({"a": 0.1, "b": 0.1, "c": 0.12, "slow": 1.0}, until=3.0)
    t.apply("ready", n, [*views, parent("slow", others)], 3.0)
    assert t.slow == {"slow"} and "slow" not in t.picker.parents()


def bits(pieces: str) -> Bitfield:
    return Bitfield.from_indexes(len(pieces), [i for i, c in enumerate(pieces) if c == "1"])


def test_a_parents_own_bitfield_offers_its_new_pieces_at_once() -> None:
    # The supernode's view of a parent lags its announces; the parent's piece response says
    # what it holds now (p2pd.peers.HAVE_HEADER), and its new pieces are asked for at once.
    s = session()
    s.apply("ready", 8, [parent("a", "10000000")], 0.0)
    (first,) = s.poll(0.0).fetch
    assert s.on_piece(first, True, 0.1, parent_has=bits("11100000"))
    assert sorted(r.index for r in s.poll(0.1).fetch) == [1, 2]


def test_a_later_reply_does_not_take_back_what_the_parent_said_it_holds() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "10000000")], 0.0)
    (first,) = s.poll(0.0).fetch
    assert s.on_piece(first, True, 0.1, parent_has=bits("11100000"))
    s.poll(0.1)
    s.apply("ready", 8, [parent("a", "10010000")], 0.2)  # announced before it got 1 and 2
    assert s.picker.offers("a") == bits("11110000").bits


def test_what_a_dropped_parent_said_is_forgotten() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "10000000")], 0.0)
    (first,) = s.poll(0.0).fetch
    assert s.on_piece(first, True, 0.1, parent_has=bits("11000000"))
    s.apply("ready", 8, [], 0.2)
    s.poll(0.2)
    assert s.picker.parents() == []
    s.apply("ready", 8, [parent("a", "10000000")], 0.3)  # named again, as the supernode saw it
    assert s.picker.offers("a") == bits("10000000").bits


def test_a_bitfield_of_another_length_is_ignored() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "10000000")], 0.0)
    (first,) = s.poll(0.0).fetch
    assert s.on_piece(first, True, 0.1, parent_has=bits("1111"))
    assert s.picker.offers("a") == bits("10000000").bits


def test_parents_offering_nothing_we_lack_are_exhausted_until_they_say_they_have_more() -> None:
    s = session()
    s.apply("ready", 8, [parent("a", "10000000"), parent("b", "11000000")], 0.0)
    for request in s.poll(0.0).fetch:
        s.on_piece(request, True, 0.1)
    assert s.have == bits("11000000")
    assert s.exhausted() == ["a", "b"]
    s.on_have("b", bits("11100000"))  # b watched, and got piece 2
    assert s.exhausted() == ["a"]
    assert [r.index for r in s.poll(0.2).fetch] == [2]
    s.on_have("x", bits("11111111"))  # not a parent of ours: nothing
    assert "x" not in s.picker.parents()


def test_only_a_parent_offered_in_full_is_taken_at_its_word_or_watched() -> None:
    # The seeder's offers are its rare-piece claims and a parent's in another zone are
    # rationed by zone claims: what they say they hold must not undo that. Only a peer of our
    # own zone (here "z1") that is not the seeder (the parent at the supernode's address).
    s = DownloadSession(LAYOUT, "me", random.Random(1), CONFIG, zone="z1")
    peer, far = parent("peer", "10000000"), parent("far", "01000000")
    seeder = ParentView("seeder", "sn:1", bits("00100000"), "z1")
    near = ParentView(peer.peer_id, peer.address, peer.pieces, "z1")
    s.apply("ready", 8, [near, replace(far, zone="z2"), seeder], 0.0, seeder_address="sn:1")
    assert [s.offered_in_full(p) for p in ("peer", "far", "seeder")] == [True, False, False]
    for request in s.poll(0.0).fetch:
        s.on_piece(request, True, 0.1, parent_has=bits("11111111"))
    assert s.have == bits("11100000")
    assert s.picker.offers("peer") == bits("11111111").bits  # its word taken
    assert s.picker.offers("far") == bits("01000000").bits  # theirs not
    assert s.picker.offers("seeder") == bits("00100000").bits
    s.on_have("far", bits("11111111"))
    s.on_have("seeder", bits("11111111"))
    assert s.picker.offers("far") == bits("01000000").bits
    assert s.picker.offers("seeder") == bits("00100000").bits
    # the supernode moved: the parent at the old address is a peer now like any other
    s.apply("ready", 8, [near, seeder], 0.3, seeder_address="sn2:1")
    assert s.offered_in_full("seeder") and not s.offered_in_full("far")


def test_only_parents_offered_in_full_are_named_to_watch() -> None:
    s = DownloadSession(LAYOUT, "me", random.Random(1), CONFIG, zone="z1")
    names = {"peer": ("peer:1", "z1"), "far": ("far:1", "z2"), "seeder": ("sn:1", "z1")}
    parents = [ParentView(n, a, bits("10000000"), z) for n, (a, z) in names.items()]
    s.apply("ready", 8, parents, 0.0, seeder_address="sn:1")
    fetch = s.poll(0.0).fetch  # piece 0, from more than one of them (endgame)
    assert s.on_piece(fetch[0], True, 0.1)
    s.poll(0.1)
    assert sorted(s.picker.exhausted()) == ["far", "peer", "seeder"]  # nothing more anywhere
    assert s.exhausted() == ["peer"]
