"""The supernode's scheduling state: task and peer life-cycles, parent selection, swarms.

Bitfields are written compactly: ``bf("11.1")`` holds pieces 0, 1 and 3 of four.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.core.bitfield import Bitfield, iter_bits
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.scheduler import (
    Assignment,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    TaskState,
)

D = Digest("ab" * 32)
D2 = Digest("cd" * 32)
SEEDER = "seeder"


def bf(text: str) -> Bitfield:
    return Bitfield.from_indexes(len(text), (i for i, c in enumerate(text) if c == "1"))


def sched(pieces: int = 4, *, ready: bool = True, seed: int = 0, **cfg: Any) -> Scheduler:
    # striping the seeder's offer is tested on its own; elsewhere the seeder offers all it has
    cfg.setdefault("seeder_stripes", 1)
    cfg.setdefault("control_rate", 0.0)  # pacing is tested on its own
    cfg.setdefault("zone_claims", False)  # and so are a zone's claims on pieces from outside
    cfg.setdefault("seeder_elders", 0)  # and the complete seeder serving the first children
    s = Scheduler(random.Random(seed), SchedulerConfig(**cfg))
    s.add_task(D, PieceLayout(pieces, 1), 0.0)
    if ready:
        s.seeder_done(D, True)
    return s


def names(a: Assignment) -> list[str]:
    return [p.peer_id for p in a.parents]


def check_links(s: Scheduler, digest: Digest, slots: dict[str, int]) -> None:
    """Both sides of every link agree, and nobody has more children than upload slots."""
    cfg = s.config
    for pid in [SEEDER, *s.peers(digest)]:
        kids = s.children(digest, pid)
        limit = cfg.seeder_upload_slots if pid == SEEDER else slots[pid]
        assert len(kids) <= limit, (pid, kids, limit)
        assert pid not in kids
        for kid in kids:
            assert pid in s.parents_of(digest, kid)
        if pid == SEEDER:
            continue
        parents = s.parents_of(digest, pid)
        assert len([p for p in parents if p != SEEDER]) <= cfg.max_parents
        for parent in parents:
            assert pid in s.children(digest, parent)
            assert not s.is_banned(digest, parent)


# -- task life-cycle -------------------------------------------------------------------------


def test_task_fetching_to_ready() -> None:
    s = sched(ready=False)
    assert s.has_task(D) and not s.has_task(D2)
    assert s.task_state(D) is TaskState.FETCHING
    s.seeder_progress(D, 2)
    assert s.peer_pieces(D, SEEDER) == bf("11..")
    s.seeder_progress(D, 2)  # repeating the same prefix is harmless
    s.seeder_done(D, True)
    assert s.task_state(D) is TaskState.READY
    assert s.peer_pieces(D, SEEDER) == bf("1111")


@pytest.mark.parametrize("first", [True, False])
def test_task_final_states_are_final(first: bool) -> None:
    s = sched(ready=False)
    s.seeder_done(D, first)
    assert s.task_state(D) is (TaskState.READY if first else TaskState.FAILED)
    for again in (True, False):
        with pytest.raises(SchedulerError, match="illegal transition"):
            s.seeder_done(D, again)
    with pytest.raises(SchedulerError, match="seeder progress"):
        s.seeder_progress(D, 4)


@pytest.mark.parametrize("known", [1, 5, -1, 2.0])
def test_seeder_progress_is_monotonic_and_bounded(known: Any) -> None:
    s = sched(ready=False)
    s.seeder_progress(D, 2)
    with pytest.raises(SchedulerError, match="seeder progress"):
        s.seeder_progress(D, known)


def test_failed_task_drops_links_and_gives_no_parents() -> None:
    s = sched(ready=False)
    s.seeder_progress(D, 2)
    s.register(D, "a", "", "", 0.0, have=bf("1..."))
    assert names(s.register(D, "b", "", "", 0.0)) == ["a", SEEDER]
    s.seeder_done(D, False)
    assert s.parents_of(D, "b") == [] and s.children(D, "a") == []
    for a in (s.register(D, "c", "", "", 1.0), s.announce(D, "b", [1], 1.0)):
        assert (a.state, a.parents) == (TaskState.FAILED, ())


def test_add_and_remove_task() -> None:
    s = sched()
    with pytest.raises(SchedulerError, match="already exists"):
        s.add_task(D, PieceLayout(4, 1), 0.0)
    s.register(D, "a", "", "", 0.0)
    s.remove_task(D)
    assert not s.has_task(D)
    assert s.next_deadline() is None
    assert s.expire(1e9) == []
    with pytest.raises(SchedulerError, match="unknown task"):
        s.remove_task(D)


def test_unknown_task_is_refused_everywhere() -> None:
    s = sched()
    calls = [
        lambda: s.task_state(D2),
        lambda: s.seeder_progress(D2, 1),
        lambda: s.seeder_done(D2, True),
        lambda: s.register(D2, "a", "", "", 0.0),
        lambda: s.announce(D2, "a", [], 0.0),
        lambda: s.report_bad_piece(D2, "a", "b", 0, 0.0),
        lambda: s.leave(D2, "a"),
        lambda: s.peer_pieces(D2, "a"),
        lambda: s.children(D2, "a"),
        lambda: s.parents_of(D2, "a"),
    ]
    for call in calls:
        with pytest.raises(SchedulerError, match="unknown task"):
            call()


@pytest.mark.parametrize(
    "cfg",
    [
        {"max_parents": -1},
        {"default_upload_slots": 1.5},
        {"seeder_upload_slots": -2},
        {"peer_ttl": 0},
        {"max_blame": 0},
    ],
)
def test_config_is_checked(cfg: dict[str, Any]) -> None:
    with pytest.raises(SchedulerError):
        SchedulerConfig(**cfg)


# -- peer life-cycle -------------------------------------------------------------------------


def test_register_misuse() -> None:
    s = sched()
    with pytest.raises(SchedulerError, match="reserved"):
        s.register(D, SEEDER, "", "", 0.0)
    with pytest.raises(SchedulerError, match="non-empty"):
        s.register(D, "", "", "", 0.0)
    with pytest.raises(SchedulerError, match="upload_slots"):
        s.register(D, "a", "", "", 0.0, upload_slots=-1)
    with pytest.raises(SchedulerError, match="bitfield of 3"):
        s.register(D, "a", "", "", 0.0, have=bf("111"))
    assert s.peers(D) == []


def test_announce_misuse() -> None:
    s = sched()
    with pytest.raises(SchedulerError, match="unknown peer"):
        s.announce(D, "a", [0], 0.0)
    s.register(D, "a", "", "", 0.0)
    with pytest.raises(SchedulerError, match="out of range"):
        s.announce(D, "a", [4], 0.0)
    with pytest.raises(SchedulerError, match="3 pieces"):
        s.announce(D, "a", bf("111"), 0.0)
    s.announce(D, "a", bf("1.1."), 0.0)
    assert s.peer_pieces(D, "a") == bf("1.1.")


def test_register_while_fetching_gets_the_seeder_prefix() -> None:
    s = sched(ready=False)
    assert s.register(D, "a", "", "", 0.0) == Assignment(TaskState.FETCHING, ())
    s.seeder_progress(D, 1)
    a = s.announce(D, "a", [], 1.0)
    assert names(a) == [SEEDER] and a.parents[0].pieces == bf("1...")
    a = s.announce(D, "a", [0], 2.0)
    assert names(a) == []  # nothing more to give until the seeder reads on
    s.seeder_progress(D, 3)
    assert names(s.announce(D, "a", [], 3.0)) == [SEEDER]


def test_assignment_carries_parent_snapshots() -> None:
    s = Scheduler(
        random.Random(0),
        SchedulerConfig(seeder_stripes=1, seeder_rare_below=2),
        seeder_address="sn:1",
        seeder_zone="z",
    )
    s.add_task(D, PieceLayout(2, 1), 0.0)
    s.seeder_done(D, True)
    s.register(D, "a", "a:1", "z", 0.0, have=bf("1."))
    a = s.register(D, "b", "b:1", "z", 0.0)
    assert [(p.peer_id, p.address, p.zone, p.pieces) for p in a.parents] == [
        ("a", "a:1", "z", bf("1.")),
        (SEEDER, "sn:1", "z", bf("11")),
    ]
    s.announce(D, "a", [1], 1.0, want_parents=False)
    assert a.parents[0].pieces == bf("1.")  # a copy, not a live view


def test_reregister_updates_the_peer() -> None:
    s = sched()
    s.register(D, "p", "p:1", "x", 0.0, upload_slots=3, have=bf("1111"))
    for kid in "abc":
        s.register(D, kid, "", "x", 0.0)
    assert s.children(D, "p") == ["a", "b", "c"]
    s.register(D, "p", "p:2", "y", 1.0, upload_slots=1, have=bf("11.."))
    assert s.children(D, "p") == ["a"]  # the newest children are shed first
    assert s.peer_pieces(D, "p") == bf("11..")
    a = s.register(D, "d", "", "y", 1.0)
    assert names(a) == [SEEDER]  # p is full; same zone does not beat the slot limit
    check_links(s, D, {"p": 1, "a": 8, "b": 8, "c": 8, "d": 8})


def test_leave_cleans_both_sides() -> None:
    s = sched()
    s.register(D, "a", "", "", 0.0, have=bf("1111"))
    s.register(D, "b", "", "", 0.0, have=bf("11.."))
    s.register(D, "c", "", "", 0.0)
    assert s.parents_of(D, "c") == ["b", "a"]  # b is less loaded
    assert s.parents_of(D, "b") == ["a"]
    s.leave(D, "a")
    assert s.peers(D) == ["b", "c"]
    assert s.parents_of(D, "c") == ["b"] and s.parents_of(D, "b") == []
    assert names(s.announce(D, "c", [], 1.0)) == ["b", SEEDER]
    with pytest.raises(SchedulerError, match="unknown peer"):
        s.leave(D, "a")


def test_peer_state_is_per_task() -> None:
    s = sched()
    s.add_task(D2, PieceLayout(2, 1), 0.0)
    s.register(D, "a", "", "", 0.0, have=bf("1111"))
    s.register(D2, "a", "", "", 0.0)
    assert s.peer_pieces(D2, "a") == bf("..")
    s.leave(D, "a")
    assert s.peers(D2) == ["a"]
    assert s.stats()["tasks"] == 2 and s.stats()["peers"] == 1


def test_zero_piece_blob_needs_no_parents() -> None:
    s = Scheduler(random.Random(0))
    s.add_task(D, PieceLayout(0, 1), 0.0)
    s.seeder_done(D, True)
    assert s.register(D, "a", "", "", 0.0) == Assignment(TaskState.READY, ())


# -- liveness --------------------------------------------------------------------------------


def test_deadlines_and_expiry() -> None:
    s = sched(peer_ttl=10.0)
    assert s.next_deadline() is None
    s.register(D, "a", "", "", 0.0, have=bf("1111"))
    s.register(D, "b", "", "", 2.0)
    assert s.parents_of(D, "b") == ["a"]
    assert s.next_deadline() == 10.0
    s.announce(D, "a", [], 5.0)  # refresh moves a behind b
    assert s.next_deadline() == 12.0
    assert s.expire(12.0) == []  # the deadline itself is still alive
    assert s.expire(12.5) == [(D, "b")]
    assert s.children(D, "a") == [] and s.peers(D) == ["a"]
    assert s.next_deadline() == 15.0
    s.register(D, "c", "", "", 1.0)  # a clock running backwards counts as the latest time seen
    assert s.expire(15.5) == [(D, "a")]
    assert s.next_deadline() == 22.5
    assert s.stats()["expired"] == 2
    with pytest.raises(SchedulerError, match="unknown peer"):
        s.announce(D, "a", [], 16.0)


def test_seeder_never_expires() -> None:
    s = sched(peer_ttl=1.0)
    s.register(D, "a", "", "", 0.0)
    assert s.expire(100.0) == [(D, "a")]
    assert s.next_deadline() is None
    assert s.children(D, SEEDER) == []


# -- parent selection ------------------------------------------------------------------------


def test_zone_comes_first() -> None:
    s = sched(max_parents=1)
    s.register(D, "far", "", "b", 0.0, have=bf("1111"))
    s.register(D, "near", "", "a", 0.0, have=bf("1..."))
    s.register(D, "busy", "", "b", 0.0)  # loads far, so load alone would favour near anyway
    assert names(s.register(D, "kid", "", "b", 0.0)) == ["far"]
    assert names(s.register(D, "kid2", "", "a", 0.0)) == ["near", SEEDER]


def test_other_zones_fill_what_the_own_zone_cannot() -> None:
    s = sched(max_parents=3, seeder_stripes=1, max_cross_zone_parents=3)
    s.register(D, "x1", "", "b", 0.0, have=bf("1..."))
    s.register(D, "x2", "", "c", 0.0, have=bf(".1.."))
    s.register(D, "near", "", "a", 0.0, have=bf("..1."))
    a = s.register(D, "kid", "", "a", 0.0)
    assert names(a)[0] == "near"
    assert sorted(names(a)[1:3]) == ["x1", "x2"]
    assert names(a)[3:] == [SEEDER]


def test_own_zone_wins_even_when_worse() -> None:
    for seed in range(5):
        s = sched(max_parents=2, seed=seed)
        s.register(D, "x1", "", "b", 0.0, have=bf("1111"))
        s.register(D, "x2", "", "c", 0.0, have=bf("1111"))
        s.register(D, "near", "", "a", 0.0, upload_slots=2, have=bf("1..."))
        s.register(D, "other", "", "a", 0.0)
        assert s.parents_of(D, "other")[0] == "near"  # near: load 1/2, 1 useful piece
        a = s.register(D, "kid", "", "a", 0.0)
        assert names(a)[0] == "near" and names(a)[1] in ("x1", "x2")


def test_least_loaded_comes_next() -> None:
    s = sched(max_parents=1)
    s.register(D, "big", "", "", 0.0, upload_slots=8, have=bf("1111"))
    s.register(D, "small", "", "", 0.0, upload_slots=2, have=bf("1111"))
    order = [names(s.register(D, f"k{i}", "", "", 0.0))[0] for i in range(5)]
    # The first pick is the seeded tie-break; then load 0 beats 1/8, and 1/8..3/8 beat 1/2.
    assert order[1] != order[0]
    assert order[2:] == ["big"] * 3


def test_more_useful_pieces_come_next() -> None:
    for seed in range(10):  # whatever the seeded keys, usefulness decides first
        s = sched(max_parents=1, seed=seed)
        s.register(D, "few", "", "", 0.0, have=bf("1..."))
        s.register(D, "many", "", "", 0.0, have=bf("11.1"))
        assert names(s.register(D, "kid", "", "", 0.0, have=bf("..1.")))[0] == "many"


def test_seeded_tie_break_is_reproducible_and_random() -> None:
    def first(seed: int) -> str:
        s = sched(max_parents=1, seed=seed)
        for p in "abcd":
            s.register(D, p, "", "", 0.0, have=bf("1111"))
        return names(s.register(D, "kid", "", "", 0.0))[0]

    assert [first(7)] * 3 == [first(7) for _ in range(3)]
    assert len({first(seed) for seed in range(40)}) > 1


def test_never_itself_never_a_parent_it_has() -> None:
    s = sched(max_parents=4)
    s.register(D, "a", "", "", 0.0, have=bf("1..."))
    assert names(s.register(D, "b", "", "", 0.0, have=bf(".1.."))) == ["a", SEEDER]
    a = s.register(D, "a", "", "", 1.0, have=bf("1..."))
    assert names(a) == ["b", SEEDER]
    assert s.parents_of(D, "b") == ["a", SEEDER]
    assert names(s.announce(D, "b", [], 2.0)) == ["a", SEEDER]


def test_slot_limits_and_zero_slots() -> None:
    s = sched(max_parents=2, seeder_upload_slots=1)
    s.register(D, "one", "", "", 0.0, upload_slots=1, have=bf("1111"))
    s.register(D, "none", "", "", 0.0, upload_slots=0, have=bf("1111"))
    assert names(s.register(D, "k1", "", "", 0.0)) == ["one"]
    assert names(s.register(D, "k2", "", "", 0.0)) == [SEEDER]
    assert names(s.register(D, "k3", "", "", 0.0)) == []  # every slot is taken
    s.leave(D, "k1")
    assert names(s.announce(D, "k3", [], 1.0)) == ["one"]


def test_seeder_is_last_resort_and_released_later() -> None:
    s = sched(ready=False, max_parents=1)
    s.seeder_progress(D, 2)
    s.register(D, "a", "", "", 0.0, have=bf("1..."))
    assert names(s.register(D, "b", "", "", 0.0)) == ["a", SEEDER]  # only the seeder has 1
    s.announce(D, "a", [1], 1.0)
    assert names(s.announce(D, "b", [], 1.0)) == ["a"]  # a covers the seeder's 0 and 1
    assert s.children(D, SEEDER) == []  # a holds the whole prefix too
    s.seeder_progress(D, 3)
    assert names(s.announce(D, "b", [], 2.0)) == ["a", SEEDER]  # now it has piece 2
    # The seeder is not counted against max_parents=1.
    assert s.parents_of(D, "b") == ["a", SEEDER]


def test_seeder_not_given_when_peers_cover_everything() -> None:
    s = sched()
    s.register(D, "a", "", "", 0.0, have=bf("11.."))
    s.register(D, "b", "", "", 0.0, have=bf("..11"))
    assert sorted(names(s.register(D, "c", "", "", 0.0))) == ["a", "b"]
    assert "c" not in s.children(D, SEEDER)


def test_useless_parents_are_dropped_on_announce() -> None:
    s = sched(max_parents=2)
    s.register(D, "slow", "", "", 0.0, have=bf("1..."))  # both still downloading
    s.register(D, "ahead", "", "", 0.0, have=bf("11.."))
    assert names(s.register(D, "kid", "", "", 0.0)) == ["ahead", "slow", SEEDER]
    a = s.announce(D, "kid", [0, 1], 1.0)
    assert names(a) == [SEEDER]  # neither has anything more for kid right now
    assert s.children(D, "slow") == [] and s.children(D, "ahead") == []


def test_want_parents_false_keeps_the_set() -> None:
    s = sched(max_parents=2)
    s.register(D, "a", "", "", 0.0, have=bf("1..."))
    assert names(s.register(D, "kid", "", "", 0.0)) == ["a", SEEDER]
    s.register(D, "b", "", "", 0.0, have=bf("1111"))
    a = s.announce(D, "kid", [0], 1.0, want_parents=False)
    assert names(a) == ["a", SEEDER]  # neither dropped nor refilled
    assert names(s.announce(D, "kid", [], 2.0)) == ["b"]


@pytest.mark.parametrize("want_parents", [True, False])
def test_completion_releases_every_slot(want_parents: bool) -> None:
    s = sched(max_parents=2)
    s.register(D, "a", "", "", 0.0, have=bf("11.."))
    s.register(D, "b", "", "", 0.0, have=bf("..1."))
    assert s.parents_of(D, "b") == ["a", SEEDER]
    assert names(s.register(D, "kid", "", "", 0.0)) == ["b", "a", SEEDER]  # b: less loaded
    a = s.announce(D, "kid", range(4), 1.0, want_parents=want_parents)
    assert a == Assignment(TaskState.READY, ())
    assert s.children(D, "a") == ["b"] and s.children(D, "b") == []
    assert "kid" not in s.children(D, SEEDER)
    assert names(s.register(D, "next", "", "", 2.0)) == ["kid", "b"]  # and serves on


# -- blame -----------------------------------------------------------------------------------


def test_one_report_bans_by_default() -> None:
    s = sched(max_parents=2)
    s.register(D, "bad", "", "", 0.0, have=bf("1111"))
    s.register(D, "good", "", "", 0.0, have=bf("11.."))
    s.register(D, "k1", "", "", 0.0)
    s.register(D, "k2", "", "", 0.0)
    assert s.children(D, "bad") == ["good", "k1", "k2"]
    a = s.report_bad_piece(D, "k1", "bad", 3, 1.0)
    assert s.is_banned(D, "bad")
    assert "bad" not in names(a) and names(a) == ["good", SEEDER]
    assert s.children(D, "bad") == []
    assert "bad" not in s.parents_of(D, "k2")
    assert "bad" not in names(s.register(D, "k3", "", "", 1.0))
    s.leave(D, "bad")
    s.register(D, "bad", "", "", 2.0, have=bf("1111"))  # the ban outlives leaving
    assert s.is_banned(D, "bad")
    assert "bad" not in names(s.register(D, "k4", "", "", 2.0))
    assert names(s.announce(D, "bad", [], 2.0)) == []  # it may still download, but is complete
    st_ = s.stats()
    assert st_["bans"] == 1 and st_["bad_reports"] == 1


def test_ban_needs_distinct_reporters() -> None:
    s = sched(max_parents=1, max_blame=2)
    s.register(D, "bad", "", "", 0.0, have=bf("1111"))
    s.register(D, "alt", "", "", 0.0, have=bf("1111"))
    s.register(D, "k1", "", "", 0.0)
    s.register(D, "k2", "", "", 0.0)
    first = s.parents_of(D, "k1")[0]
    assert first in ("bad", "alt")
    bad = first
    s.report_bad_piece(D, "k1", bad, 0, 1.0)
    a = s.report_bad_piece(D, "k1", bad, 1, 1.0)
    assert not s.is_banned(D, bad)
    assert bad not in names(a)  # but k1 never gets it again
    assert bad not in names(s.announce(D, "k1", [], 2.0))
    s.report_bad_piece(D, "k2", bad, 0, 2.0)
    assert s.is_banned(D, bad) and s.children(D, bad) == []


def test_report_against_the_seeder_is_counted_not_banned() -> None:
    s = sched()
    assert names(s.register(D, "k", "", "", 0.0)) == [SEEDER]
    a = s.report_bad_piece(D, "k", SEEDER, 2, 1.0)
    assert names(a) == [SEEDER]
    assert not s.is_banned(D, SEEDER)
    assert s.stats()["seeder_reports"] == 1 and s.stats()["bans"] == 0


def test_report_misuse_and_races() -> None:
    s = sched()
    s.register(D, "k", "", "", 0.0)
    with pytest.raises(SchedulerError, match="reported itself"):
        s.report_bad_piece(D, "k", "k", 0, 0.0)
    with pytest.raises(SchedulerError, match="out of range"):
        s.report_bad_piece(D, "k", SEEDER, 4, 0.0)
    with pytest.raises(SchedulerError, match="unknown peer"):
        s.report_bad_piece(D, "nobody", SEEDER, 0, 0.0)
    s.report_bad_piece(D, "k", "gone", 0, 0.0)  # a parent that already left
    assert not s.is_banned(D, "gone")
    assert s.stats()["ignored_reports"] == 1


def test_stats() -> None:
    s = sched()
    s.register(D, "a", "", "", 0.0)
    st_ = s.stats()
    assert st_["tasks"] == 1 and st_["peers"] == 1 and st_["active_links"] == 1
    assert st_["links"] == 1 and st_["decisions"] == 1


# -- property tests: random event sequences ---------------------------------------------------

# One event: (kind, peer number, argument). Interpreted against the current state so that every
# sequence is meaningful; the interpretation itself is deterministic.
events = st.lists(
    st.tuples(st.integers(0, 8), st.integers(0, 7), st.integers(0, 2**16)), max_size=100
)


def check_books(s: Scheduler, digest: Digest) -> None:
    """A zone's claims on pieces from outside, the pacing count, the count of the seeder's
    children per host and the counts of peer parents `_borrow` reads agree with the peers."""
    task = s._tasks[digest]
    seeder = task.seeder.peer_id
    for p in task.peers.values():
        assert p.peer_parents == len(p.parents) - (seeder in p.parents), p.peer_id
    floor = s.config.borrow_from
    if floor:
        assert task.rich == sum(p.peer_parents >= floor for p in task.peers.values())
    counts: dict[str, dict[int, int]] = {}
    for p in task.peers.values():
        zone = counts.setdefault(p.zone, {})
        for i in iter_bits(p.claimed):
            zone[i] = zone.get(i, 0) + 1
    assert {z: c for z, c in task.claims.items() if c} == {z: c for z, c in counts.items() if c}
    for zone_name, offered in task.offered.items():
        assert offered == sum(1 << i for i in counts.get(zone_name, {})), zone_name
    downloading = sum(not p.pieces.is_full() for t in s._tasks.values() for p in t.peers.values())
    assert s._downloaders == downloading
    assert s._fed == fed(s)
    hosts: dict[str, int] = {}
    for t in s._tasks.values():
        for p in t.peers.values():
            if p.peer_parents:
                hosts[p.peer_id] = hosts.get(p.peer_id, 0) + p.peer_parents
    assert s._host_parents == hosts  # what `_even_out` weighs


def play(
    seed: int, pieces: int, cfg: SchedulerConfig, evs: list[tuple[int, int, int]]
) -> list[tuple[str, str, tuple[str, ...]]]:
    """Run `evs`, checking the invariants after each; return the log of decisions."""
    s = Scheduler(random.Random(seed), cfg)
    s.add_task(D, PieceLayout(pieces, 1), 0.0)
    slots: dict[str, int] = {}
    known, now = 0, 0.0
    log: list[tuple[str, str, tuple[str, ...]]] = []
    banned: set[str] = set()

    def seen(op: str, pid: str, a: Assignment, revised: bool) -> None:
        log.append((op, pid, tuple(names(a))))
        mine = s.peer_pieces(D, pid).bits
        for p in a.parents:
            assert p.peer_id != pid
            assert p.peer_id not in banned
            if revised:
                assert p.pieces.bits & ~mine, (op, pid, p)

    for kind, n, arg in evs:
        pid = f"p{n}"
        now += arg % 7
        if kind == 8:
            if s.task_state(D) is TaskState.FETCHING:
                if arg % 4:
                    known = min(pieces, known + arg % 4)
                    s.seeder_progress(D, known)
                else:
                    s.seeder_done(D, arg % 5 != 0)
        elif kind <= 1 or pid not in s.peers(D):
            slots[pid] = arg % 4
            have = Bitfield(pieces, arg % (1 << pieces)) if arg % 3 == 0 else None
            a = s.register(D, pid, "", f"z{arg % 3}", now, upload_slots=slots[pid], have=have)
            seen("register", pid, a, True)
        elif kind <= 4:
            got = [i for i in range(pieces) if arg >> i & 1]
            want = kind != 4
            seen("announce", pid, s.announce(D, pid, got, now, want_parents=want), want)
        elif kind == 5:
            parents = s.parents_of(D, pid)
            target = parents[arg % len(parents)] if parents else SEEDER
            a = s.report_bad_piece(D, pid, target, arg % pieces, now)
            if s.is_banned(D, target):
                banned.add(target)
            seen("report", pid, a, True)
        elif kind == 6:
            s.leave(D, pid)
        else:
            log.extend(("expired", p, ()) for _, p in s.expire(now))
            deadline = s.next_deadline()
            assert deadline is None or deadline >= now
        check_links(s, D, slots)
        check_books(s, D)
    log.append(("stats", repr(sorted(s.stats().items())), ()))
    return log


configs = st.builds(
    SchedulerConfig,
    max_parents=st.integers(0, 4),
    seeder_upload_slots=st.integers(0, 4),
    peer_ttl=st.sampled_from([5.0, 30.0]),
    max_blame=st.integers(1, 2),
)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 3), pieces=st.integers(1, 10), cfg=configs, evs=events)
def test_random_events_keep_the_invariants(
    seed: int, pieces: int, cfg: SchedulerConfig, evs: list[tuple[int, int, int]]
) -> None:
    assert play(seed, pieces, cfg, evs) == play(seed, pieces, cfg, evs)


# -- a tiny synchronous swarm ----------------------------------------------------------------


def swarm(
    seed: int,
    n: int,
    pieces: int,
    *,
    zones: int = 1,
    slots: int = 8,
    max_parents: int = 4,
    seeder_slots: int = 8,
    fetch_rate: int = 0,
    leavers: int = 0,
) -> tuple[int, list[tuple[str, tuple[str, ...]]]]:
    """Each round every peer takes one piece from each parent, then announces.

    The seeder reads `fetch_rate` pieces a round (0: it starts READY); `leavers` peers leave
    half-way. Returns the rounds taken and the log of assignments; fails on a stall.
    """
    rng = random.Random(seed)
    s = Scheduler(
        random.Random(seed),
        SchedulerConfig(
            max_parents=max_parents, default_upload_slots=slots, seeder_upload_slots=seeder_slots
        ),
    )
    s.add_task(D, PieceLayout(pieces, 1), 0.0)
    if fetch_rate == 0:
        s.seeder_done(D, True)
    peers = [f"p{i}" for i in range(n)]
    full = (1 << pieces) - 1
    have = dict.fromkeys(peers, 0)
    log: list[tuple[str, tuple[str, ...]]] = []
    for pid in peers:
        log.append((pid, tuple(names(s.register(D, pid, "", f"z{rng.randrange(zones)}", 0.0)))))
    leave_at = rng.randrange(1, pieces + 2)
    idle, rnd, slot_map = 0, 0, dict.fromkeys(peers, slots)
    while any(have[p] != full for p in peers):
        rnd += 1
        moved = 0
        if s.task_state(D) is TaskState.FETCHING:
            known = min(pieces, s.peer_pieces(D, SEEDER).count() + fetch_rate)
            s.seeder_progress(D, known)
            if known == pieces:
                s.seeder_done(D, True)
            idle = 0
        if rnd == leave_at and leavers:
            for pid in rng.sample(peers, min(leavers, n - 1)):
                s.leave(D, pid)
                peers.remove(pid)
            idle = 0
        for pid in peers:
            before = have[pid]
            for parent in s.parents_of(D, pid):
                held = s.peer_pieces(D, parent).bits
                assert held & ~before, (pid, parent)  # it had something at pid's last call
                if useful := held & ~have[pid]:
                    have[pid] |= 1 << rng.choice(list(iter_bits(useful)))
                    moved += 1
            a = s.announce(D, pid, iter_bits(have[pid]), float(rnd))
            log.append((pid, tuple(names(a))))
        check_links(s, D, slot_map)
        idle = 0 if moved else idle + 1
        assert idle < 3, f"stalled at round {rnd}: {[(p, bin(have[p])) for p in peers]}"
    for pid in peers:
        assert s.peer_pieces(D, pid).is_full()
        assert s.parents_of(D, pid) == []
    assert s.stats()["active_links"] == 0
    return rnd, log


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 40),
    pieces=st.integers(1, 32),
    zones=st.integers(1, 3),
    slots=st.integers(0, 4),
    max_parents=st.integers(1, 4),
    seeder_slots=st.integers(1, 4),
    fetch_rate=st.integers(0, 5),
    leavers=st.integers(0, 5),
)
def test_swarm_always_completes(
    seed: int,
    n: int,
    pieces: int,
    zones: int,
    slots: int,
    max_parents: int,
    seeder_slots: int,
    fetch_rate: int,
    leavers: int,
) -> None:
    swarm(
        seed,
        n,
        pieces,
        zones=zones,
        slots=slots,
        max_parents=max_parents,
        seeder_slots=seeder_slots,
        fetch_rate=fetch_rate,
        leavers=leavers,
    )


def test_swarm_beats_the_seeder_alone() -> None:
    # 40 peers, 32 pieces, a seeder that feeds 2 at a time: alone it would need 40*32/2 rounds.
    rounds, _ = swarm(1, 40, 32, zones=2, seeder_slots=2)
    assert rounds < 60


def assignment_fingerprint(seed: int) -> str:
    _, log = swarm(seed, 30, 16, zones=3, slots=3, seeder_slots=2, fetch_rate=2, leavers=4)
    return hashlib.sha256(repr(log).encode()).hexdigest()


def test_same_seed_same_assignments() -> None:
    assert assignment_fingerprint(5) == assignment_fingerprint(5)
    assert assignment_fingerprint(5) != assignment_fingerprint(6)


def test_same_assignments_under_any_string_hash_seed() -> None:
    """Set iteration order changes with PYTHONHASHSEED; the decisions must not."""
    root = Path(__file__).resolve().parents[2]
    code = "from tests.core.test_scheduler import assignment_fingerprint as f; print(f(5))"
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        outs.add(out.stdout.strip())
    assert outs == {assignment_fingerprint(5)}


def test_unreachable_parent_is_shunned_then_dropped() -> None:
    s = sched(max_unreachable=2)
    s.register(D, "dead", "", "", 0.0, have=bf("1111"))
    for child in ("a", "b"):
        assert names(s.register(D, child, "", "", 0.0)) == ["dead"]
    # a's report: a never gets it again and, nobody else covering, gets the seeder; no ban
    assert names(s.report_unreachable(D, "a", "dead", 1.0)) == [SEEDER]
    assert not s.is_banned(D, "dead")
    assert "dead" in s.peers(D) and s.parents_of(D, "b") == ["dead"]
    # a second reporter: the parent is dropped at once, its children's links with it
    assert names(s.report_unreachable(D, "b", "dead", 2.0)) == [SEEDER]
    assert "dead" not in s.peers(D)
    assert s.stats()["dropped_unreachable"] == 1 and s.stats()["bans"] == 0
    # it may come back: registering again is allowed and it is not banned
    s.register(D, "dead", "", "", 3.0, have=bf("1111"))
    assert not s.is_banned(D, "dead")
    assert "dead" not in s.parents_of(D, "a")  # a still shuns it


def test_unreachable_reports_against_the_seeder_or_strangers_are_only_counted() -> None:
    s = sched()
    s.register(D, "k", "", "", 0.0)
    assert names(s.report_unreachable(D, "k", SEEDER, 1.0)) == [SEEDER]
    s.report_unreachable(D, "k", "ghost", 1.0)
    stats = s.stats()
    assert stats["seeder_unreachable"] == 1 and stats["ignored_reports"] == 1
    with pytest.raises(SchedulerError, match="reported itself"):
        s.report_unreachable(D, "k", "k", 1.0)


def test_seeder_children_are_offered_different_stripes_of_rare_pieces() -> None:
    s = sched(16, seeder_stripes=4, seeder_upload_slots=64)
    for i in range(12):
        s.register(D, f"k{i}", "", "", 0.0)
    offers = []
    for i in range(12):
        (seeder,) = s.announce(D, f"k{i}", [], 1.0).parents
        assert seeder.peer_id == SEEDER
        offers.append(seeder.pieces.bits)
    # every offer is one stripe (every 4th piece), dealt in order of arrival
    stripes = [sum(1 << i for i in range(r, 16, 4)) for r in range(4)]
    assert offers == [stripes[i % 4] for i in range(12)]


def test_fewer_peers_than_stripes_still_cover_every_piece() -> None:
    s = sched(12, seeder_stripes=32, seeder_upload_slots=64)
    for i in range(3):
        s.register(D, f"k{i}", "", "", 0.0)
    union = 0
    for i in range(3):
        (seeder,) = s.announce(D, f"k{i}", [], 1.0).parents
        union |= seeder.pieces.bits
        assert seeder.pieces.count() == 4  # 3 stripes of the 12 pieces, not 32
    assert union == (1 << 12) - 1


def test_pieces_held_by_enough_peers_are_not_offered_by_the_seeder() -> None:
    s = sched(4, seeder_stripes=1, seeder_rare_below=2)
    s.register(D, "a", "", "", 0.0, have=bf("11.."))
    s.register(D, "b", "", "", 0.0, have=bf("1..."))
    kid = s.register(D, "kid", "", "", 0.0)
    offer = {p.peer_id: p.pieces for p in kid.parents}[SEEDER]
    assert list(offer) == [1, 2, 3]  # piece 0 is held by two peers: get it from them
    s.leave(D, "b")  # now piece 0 is rare again
    kid = s.announce(D, "kid", [], 1.0)
    offer = {p.peer_id: p.pieces for p in kid.parents}[SEEDER]
    assert list(offer) == [0, 1, 2, 3]


def test_parents_from_other_zones_are_capped() -> None:
    s = sched(max_parents=4, max_cross_zone_parents=1)
    s.register(D, "x1", "", "b", 0.0, have=bf("1..."))
    s.register(D, "x2", "", "c", 0.0, have=bf(".1.."))
    s.register(D, "near", "", "a", 0.0, have=bf("..1."))
    kid = s.register(D, "kid", "", "a", 0.0)
    peers = [n for n in names(kid) if n != SEEDER]
    assert peers[0] == "near" and len(peers) == 2  # one own-zone parent, one from elsewhere
    assert SEEDER in names(kid)  # what nobody reachable covers comes from the seeder


def test_the_seeder_counts_rarity_per_zone() -> None:
    s = sched(2, seeder_stripes=1, seeder_rare_below=1, max_cross_zone_parents=0)
    s.register(D, "far", "", "b", 0.0, have=bf("1."))
    kid = s.register(D, "kid", "", "a", 0.0)
    # piece 0 exists in zone b, but zone a has no copy: the seeder still offers it there
    offer = {p.peer_id: p.pieces for p in kid.parents}[SEEDER]
    assert list(offer) == [0, 1]
    s.register(D, "near", "", "a", 0.0, have=bf("1."))
    kid = s.announce(D, "kid", [], 1.0)
    assert "near" in names(kid)
    offer = {p.peer_id: p.pieces for p in kid.parents}[SEEDER]
    assert list(offer) == [1]  # zone a has piece 0 now


def test_an_evicted_seeder_offers_nothing_and_peers_carry_on() -> None:
    s = sched(4, seeder_stripes=1)
    s.register(D, "full", "", "", 0.0, have=bf("1111"))
    kid = s.register(D, "kid", "", "", 0.0, have=bf("1..."))
    assert (s.downloading(D), s.coverage(D)) == (1, bf("1111"))
    s.seeder_evicted(D)
    assert s.task_state(D) is TaskState.READY and s.children(D, SEEDER) == []
    kid = s.announce(D, "kid", [], 1.0)
    assert names(kid) == ["full"]  # the peer that holds everything; no seeder
    new = s.register(D, "new", "", "", 1.0)
    assert SEEDER not in names(new)
    s.leave(D, "full")
    assert s.coverage(D) == bf("1...")
    with pytest.raises(SchedulerError, match="state FETCHING"):
        fetching = sched(4, ready=False)
        fetching.seeder_evicted(D)


# -- one copy at a time behind a slow seeder -----------------------------------------------------


def seeder_offer(a: Assignment) -> list[int]:
    return next((list(p.pieces) for p in a.parents if p.peer_id == SEEDER), [])


def slow_seeder(**cfg: Any) -> Scheduler:
    """Two peers calling every 0.1 s or so, a seeder reading a piece every 2 s."""
    s = sched(4, ready=False, **cfg)
    s.register(D, "a", "", "", 0.0)
    s.register(D, "b", "", "", 0.0)
    s.announce(D, "a", [], 0.1)
    s.announce(D, "b", [], 0.1)
    s.seeder_progress(D, 1, 2.0)
    return s


def test_a_slow_seeder_offers_a_rare_piece_to_one_child_at_a_time() -> None:
    s = slow_seeder()
    assert seeder_offer(s.announce(D, "a", [], 2.1)) == [0]
    b = s.announce(D, "b", [], 2.1)
    assert names(b) == []  # piece 0 is on its way to a: b waits for a, not for the seeder
    s.seeder_progress(D, 2, 4.0)
    assert seeder_offer(s.announce(D, "b", [], 4.1)) == [1]  # the next piece goes to b
    assert seeder_offer(s.announce(D, "a", [], 4.1)) == [0]  # a keeps its piece, not b's
    s.announce(D, "a", [0], 4.2)
    b = s.announce(D, "b", [], 4.3)
    assert sorted(names(b)) == ["a", SEEDER] and seeder_offer(b) == [1]  # piece 0 from a now


def test_a_childs_rare_pieces_stay_offered_until_it_holds_them() -> None:
    s = slow_seeder(seeder_stripes=2)  # stripes: a the even pieces, b the odd ones
    assert seeder_offer(s.announce(D, "b", [], 2.1)) == [0]  # b's stripe is empty: any rare
    s.seeder_progress(D, 2, 4.0)
    # piece 1 is b's stripe; piece 0 stays in b's offer, and a does not get it
    assert seeder_offer(s.announce(D, "b", [], 4.1)) == [0, 1]
    assert names(s.announce(D, "a", [], 4.1)) == []
    assert seeder_offer(s.register(D, "c", "", "", 4.2)) == []


def test_a_slow_seeder_still_gives_the_last_resort_to_each_child_without_peers() -> None:
    s = slow_seeder()
    s.register(D, "h", "", "", 2.0, upload_slots=1, have=bf("1..."))  # holds 0 ...
    s.register(D, "k", "", "", 2.0)  # ... and its one slot goes to k
    # piece 0 is not rare (h holds it), so no claim: every child with no peer parent gets it
    assert seeder_offer(s.announce(D, "a", [], 2.1)) == [0]
    assert seeder_offer(s.announce(D, "b", [], 2.1)) == [0]


def test_a_fast_seeder_offers_a_rare_piece_to_every_child() -> None:
    s = sched(4, ready=False)
    s.seeder_progress(D, 1, 0.01)  # pieces come in much faster than peers call
    s.register(D, "a", "", "", 0.0)
    s.register(D, "b", "", "", 0.0)
    s.announce(D, "a", [], 1.0)
    s.announce(D, "b", [], 1.0)
    assert seeder_offer(s.announce(D, "a", [], 2.0)) == [0]
    assert seeder_offer(s.announce(D, "b", [], 2.0)) == [0]


def test_without_timing_or_with_the_rule_off_every_child_is_offered_the_piece() -> None:
    for s in (slow_seeder(seeder_one_copy_above=0.0), sched(4, ready=False)):
        if s.config.seeder_one_copy_above:  # no time given with the progress: no measure
            s.register(D, "a", "", "", 0.0)
            s.register(D, "b", "", "", 0.0)
            s.announce(D, "a", [], 0.1)
            s.announce(D, "b", [], 0.1)
            s.seeder_progress(D, 1)
        assert seeder_offer(s.announce(D, "a", [], 2.1)) == [0]
        assert seeder_offer(s.announce(D, "b", [], 2.1)) == [0]


def test_a_claim_ends_when_its_child_leaves_or_changes_zone() -> None:
    s = slow_seeder()
    assert seeder_offer(s.announce(D, "a", [], 2.1)) == [0]
    s.leave(D, "a")
    assert seeder_offer(s.announce(D, "b", [], 2.2)) == [0]
    s.register(D, "b", "", "elsewhere", 2.3)  # its old zone's claim goes with it
    s.register(D, "c", "", "", 2.3)
    assert seeder_offer(s.announce(D, "c", [], 2.4)) == [0]
    assert seeder_offer(s.announce(D, "b", [], 2.4)) == [0]  # its new zone has no copy


def test_seeder_one_copy_above_must_not_be_negative() -> None:
    with pytest.raises(SchedulerError, match="seeder_one_copy_above"):
        SchedulerConfig(seeder_one_copy_above=-1.0)


def test_one_copy_is_judged_per_blob_and_a_child_claims_only_a_few_pieces() -> None:
    """A slow fetch of one blob says nothing about another served from the store; and under
    the rule a lone first child does not hold every rare piece for those who come later."""
    s = slow_seeder()
    s.add_task(D2, PieceLayout(16, 1), 3.0)
    s.seeder_done(D2, True)  # from the store: never slow
    for peer in "pqr":
        s.register(D2, peer, "", "", 3.0)
        s.announce(D2, peer, [], 3.1)
    assert len(seeder_offer(s.announce(D2, "q", [], 3.2))) == 16  # every rare piece, as before
    assert s.children(D, SEEDER) == []  # and the slow blob is unchanged by it

    t = sched(8, ready=False)
    t.register(D, "a", "", "", 0.0)
    t.announce(D, "a", [], 0.1)
    t.seeder_progress(D, 1, 2.0)
    t.seeder_progress(D, 6, 8.0)  # slow: 1.6 s a piece against 0.1 s between calls
    first = seeder_offer(t.announce(D, "a", [], 8.1))  # alone: one stripe, every piece rare
    assert len(first) == 2
    late = seeder_offer(t.register(D, "late", "", "", 8.2))
    assert late and not set(late) & set(first)  # pieces were left for the newcomer


def _storm_start(**cfg: Any) -> Scheduler:
    """Two holders with one slot each, both taken by `rich`; the seeder has no slot."""
    s = sched(seeder_upload_slots=0, **cfg)
    s.register(D, "h1", "", "a", 0.0, upload_slots=1, have=bf("11.."))
    s.register(D, "h2", "", "a", 0.0, upload_slots=1, have=bf("11.."))
    rich = s.register(D, "rich", "", "a", 0.0)
    assert sorted(names(rich)) == ["h1", "h2"]
    return s


def test_a_child_without_parents_borrows_a_slot_from_a_child_with_several() -> None:
    s = _storm_start(borrow_below=1, borrow_from=2)
    check_books(s, D)  # `rich` has parents to spare...
    assert s._tasks[D].rich == 1
    poor = s.register(D, "poor", "", "a", 1.0)
    assert len(names(poor)) == 1  # one slot borrowed: enough to get going
    lender = names(poor)[0]
    assert s.children(D, lender) == ["poor"]
    assert s.parents_of(D, "rich") == [p for p in ("h1", "h2") if p != lender]
    check_links(s, D, {"h1": 1, "h2": 1, "rich": 8, "poor": 8})
    check_books(s, D)  # ...and no longer
    assert s._tasks[D].rich == 0
    s.leave(D, lender)
    check_books(s, D)


def test_no_borrowing_from_a_child_without_parents_to_spare_or_when_off() -> None:
    for cfg in ({"borrow_below": 0}, {"borrow_below": 1, "borrow_from": 3}):
        s = _storm_start(even_out=False, **cfg)  # evening out: its own tests below
        assert names(s.register(D, "poor", "", "a", 1.0)) == [], cfg
        assert sorted(s.parents_of(D, "rich")) == ["h1", "h2"], cfg


def test_no_borrowing_from_a_holder_with_nothing_the_child_lacks() -> None:
    s = _storm_start(borrow_below=1, borrow_from=2)
    poor = s.register(D, "poor", "", "a", 1.0, have=bf("11.."))
    assert names(poor) == []
    assert sorted(s.parents_of(D, "rich")) == ["h1", "h2"]


def test_no_borrowing_across_zones() -> None:
    s = _storm_start(borrow_below=1, borrow_from=2)
    assert names(s.register(D, "poor", "", "b", 1.0)) == []


def _two_rich(holders: int = 8, **cfg: Any) -> Scheduler:
    """One-slot holders, every slot taken by `rich1` and `rich2` (half each); borrowing
    below 1 from 2, at most 4 parents; task D2 (2 pieces) exists too."""
    cfg = {"max_parents": 4, "borrow_below": 1, "borrow_from": 2, "borrow_sample": 64, **cfg}
    s = sched(seeder_upload_slots=0, **cfg)
    s.add_task(D2, PieceLayout(2, 1), 0.0)
    for i in range(holders):
        s.register(D, f"h{i}", "", "a", 0.0, upload_slots=1, have=bf("11.."))
    for rich in ("rich1", "rich2"):
        assert len(names(s.register(D, rich, "", "a", 0.0))) == holders // 2
    return s


def rich_parents(s: Scheduler) -> list[int]:
    return sorted(len(s.parents_of(D, r)) for r in ("rich1", "rich2"))


def test_a_hosts_only_download_evens_out_with_hosts_that_have_two_more_parents() -> None:
    s = _two_rich()
    # one slot by borrowing (from a child with 4 >= 2), one by evening out (from the other,
    # still at 4 against its 1); not a third: 3 against its 2 is not two more
    assert len(names(s.register(D, "poor", "", "a", 1.0))) == 2
    assert rich_parents(s) == [3, 3]
    check_links(s, D, {**{f"h{i}": 1 for i in range(8)}, "rich1": 8, "rich2": 8, "poor": 8})
    check_books(s, D)
    s.leave(D, "rich1")
    check_books(s, D)

    s = _two_rich(holders=6, max_parents=3)  # three parents each
    assert len(names(s.register(D, "poor", "", "a", 1.0))) == 2
    assert rich_parents(s) == [2, 2]  # evened out: nobody has two more than another

    s = _two_rich(even_out=False)
    assert len(names(s.register(D, "poor", "", "a", 1.0))) == 1  # borrowing only
    assert rich_parents(s) == [3, 4]


def test_a_host_with_another_download_here_evens_out_once_that_one_is_done() -> None:
    s = _two_rich()
    s.register(D2, "poor", "", "a", 1.0)  # downloading D2 at this supernode too
    assert len(names(s.register(D, "poor", "", "a", 1.0))) == 1
    s.announce(D2, "poor", [0, 1], 2.0)  # D2 complete: D is its only download here
    assert len(names(s.announce(D, "poor", [], 2.0))) == 2
    check_books(s, D)


def test_the_supernode_paces_its_downloading_peers_to_its_control_rate() -> None:
    s = sched(2, control_rate=10.0, message_overhead=0.0)  # every announce a message of its own
    s.add_task(D2, PieceLayout(2, 1), 0.0)
    assert s.pace() == 0.0
    for i in range(4):
        s.register(D, f"p{i}", "", "", 0.0)
    s.register(D2, "p0", "", "", 0.0)  # every (blob, peer) download calls on its own
    a = s.register(D, "full", "", "", 0.0, have=bf("11"))  # seeding peers are not counted
    assert a.pace == pytest.approx(5 / 10) == s.pace()
    s.announce(D, "p1", [0, 1], 1.0)  # p1 completes
    s.leave(D, "p2")
    assert s.announce(D, "p0", [], 1.0).pace == pytest.approx(3 / 10)
    s.remove_task(D2)
    assert s.pace() == pytest.approx(2 / 10)
    s.expire(100.0)
    assert s.pace() == 0.0
    unpaced = sched(2, control_rate=0.0)
    assert unpaced.register(D, "p", "", "", 0.0).pace == 0.0
    with pytest.raises(SchedulerError, match="control_rate"):
        SchedulerConfig(control_rate=-1.0)


def test_pacing_counts_a_hosts_batched_announces_as_one_message_plus_their_items() -> None:
    # cost per interval: 0.25 per downloading host + 0.75 per downloading membership
    s = sched(2, control_rate=10.0, message_overhead=0.25)
    s.add_task(D2, PieceLayout(2, 1), 0.0)
    for i in range(3):
        s.register(D, f"p{i}", "", "", 0.0)
    assert s.pace() == pytest.approx((0.25 * 3 + 0.75 * 3) / 10)
    s.register(D2, "p0", "", "", 0.0)  # p0 downloads two blobs here: one more item
    s.register(D2, "p1", "", "", 0.0)
    assert s.pace() == pytest.approx((0.25 * 3 + 0.75 * 5) / 10)
    s.announce(D, "p0", [0, 1], 1.0)  # p0 completes one blob, still downloads the other
    assert s.pace() == pytest.approx((0.25 * 3 + 0.75 * 4) / 10)
    s.leave(D2, "p0")  # p0 downloads nothing more: no message, no item
    assert s.announce(D, "p1", [], 1.0).pace == pytest.approx((0.25 * 2 + 0.75 * 3) / 10)
    s.remove_task(D2)
    s.remove_task(D)
    assert s.pace() == 0.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SchedulerError, match="message_overhead"):
            SchedulerConfig(message_overhead=bad)


def _zoned(**cfg: Any) -> Scheduler:
    """A supernode in zone "a", every piece ready, the seeder offering any rare piece."""
    cfg.setdefault("control_rate", 0.0)
    cfg.setdefault("zone_claims", True)
    s = Scheduler(
        random.Random(0),
        SchedulerConfig(seeder_stripes=1, max_cross_zone_parents=1, **cfg),
        seeder_id=SEEDER,
        seeder_zone="a",
    )
    s.add_task(D, PieceLayout(4, 1), 0.0)
    s.seeder_done(D, True)
    return s


def offers(a: Assignment) -> dict[str, list[int]]:
    return {p.peer_id: list(p.pieces) for p in a.parents}


def test_a_piece_enters_a_foreign_zone_from_the_seeder_once() -> None:
    s = _zoned()
    first = offers(s.register(D, "b1", "", "b", 0.0))[SEEDER]
    second = offers(s.register(D, "b2", "", "b", 0.0)).get(SEEDER, [])
    assert first and not set(first) & set(second)  # no piece offered to both
    # in the seeder's own zone, every child lacking a rare piece is offered it
    assert offers(s.register(D, "a1", "", "a", 0.0))[SEEDER] == [0, 1, 2, 3]
    assert offers(s.register(D, "a2", "", "a", 0.0))[SEEDER] == [0, 1, 2, 3]


def test_a_piece_another_zone_holds_crosses_once_per_zone() -> None:
    s = _zoned(seeder_upload_slots=0)  # no seeder: pieces can only come across
    s.register(D, "c", "", "c", 0.0, have=bf("1111"))
    one = offers(s.register(D, "b1", "", "b", 0.0))["c"]
    two = offers(s.register(D, "b2", "", "b", 0.0)).get("c", [])
    assert one and not set(one) & set(two)
    # once a peer of zone b holds a piece, nobody there fetches it across any more
    s.announce(D, "b1", [one[0]], 1.0)
    assert one[0] not in offers(s.announce(D, "b2", [], 1.0)).get("c", [])


def test_without_zone_claims_every_child_may_fetch_across() -> None:
    s = _zoned(seeder_upload_slots=0, zone_claims=False)
    s.register(D, "c", "", "c", 0.0, have=bf("1111"))
    assert offers(s.register(D, "b1", "", "b", 0.0))["c"] == [0, 1, 2, 3]
    assert offers(s.register(D, "b2", "", "b", 0.0))["c"] == [0, 1, 2, 3]


def test_peers_that_left_do_not_pile_up_among_the_holders() -> None:
    s = sched(2)
    for i in range(300):
        s.register(D, f"p{i}", "", "", float(i), have=bf("1."))
        if i >= 10:
            s.leave(D, f"p{i - 10}")
    holders = s._tasks[D].holders
    assert len(holders) <= 2 * len(s.peers(D)) + 65
    assert {p.peer_id for p in holders} >= set(s.peers(D))


def test_borrowing_from_children_that_would_have_to_borrow_back_is_refused() -> None:
    with pytest.raises(SchedulerError, match="borrow_from"):
        SchedulerConfig(borrow_below=2, borrow_from=2)
    SchedulerConfig(borrow_below=0, borrow_from=0)  # off: anything goes


def test_a_child_that_leaves_gives_its_zone_claims_back() -> None:
    s = _zoned(seeder_upload_slots=0)
    s.register(D, "c", "", "c", 0.0, have=bf("1111"))
    claimed = offers(s.register(D, "b1", "", "b", 0.0))["c"]
    s.leave(D, "b1")
    assert set(claimed) <= set(offers(s.register(D, "b2", "", "b", 1.0))["c"])


def test_pieces_of_a_peer_that_serves_nobody_are_still_rare() -> None:
    s = _zoned()
    s.register(D, "b0", "", "b", 0.0, upload_slots=0, have=bf("1111"))
    assert offers(s.register(D, "b1", "", "b", 0.0)).get(SEEDER)  # not stuck behind b0


# -- the seeder's slots spread over hosts -----------------------------------------------------

D3 = Digest("ef" * 32)


def fed(s: Scheduler) -> dict[str, int]:
    """In how many tasks the seeder is each peer's parent, counted from the links."""
    counts: dict[str, int] = {}
    for digest in s._tasks:
        for kid in s.children(digest, SEEDER):
            counts[kid] = counts.get(kid, 0) + 1
    return counts


def test_a_lone_host_gets_the_seeder_in_every_task() -> None:
    s = sched(seeder_upload_slots=2, seeder_spread=0.5)
    for digest in (D2, D3):
        s.add_task(digest, PieceLayout(4, 1), 0.0)
        s.seeder_done(digest, True)
    for digest in (D, D2, D3):
        assert names(s.register(digest, "h", "", "", 0.0)) == [SEEDER]
    assert s._fed == fed(s) == {"h": 3}


def test_seeder_slots_past_half_go_to_hosts_it_feeds_nowhere_else() -> None:
    s = sched(seeder_upload_slots=4, max_parents=0, seeder_spread=0.5)  # all need the seeder
    s.add_task(D2, PieceLayout(4, 1), 0.0)
    s.seeder_done(D2, True)
    # hosts register both layers, one host after the other (a storm's order)
    for n in range(6):
        s.register(D, f"h{n}", "", "", 0.0)
        s.register(D2, f"h{n}", "", "", 0.0)
    # h0 and h1 took the first half of D2's slots while fed in D; h2 and h3 (fed in D) were
    # refused the second half; h4 and h5, fed nowhere, took it
    assert s.children(D, SEEDER) == ["h0", "h1", "h2", "h3"]
    assert s.children(D2, SEEDER) == ["h0", "h1", "h4", "h5"]
    assert s._fed == fed(s)
    # a slot freed in D2 (h0 completes) is refused to a host fed in D, taken by one fed nowhere
    s.announce(D2, "h0", [0, 1, 2, 3], 1.0)
    assert names(s.announce(D2, "h2", [], 1.0)) == []
    assert names(s.register(D2, "h6", "", "", 1.0)) == [SEEDER]
    # once leaving frees more than half of D's slots, a host fed in D2 may take one
    for n in range(3):
        s.leave(D, f"h{n}")
    assert names(s.announce(D, "h4", [], 2.0)) == [SEEDER]
    assert s._fed == fed(s)
    s.remove_task(D2)
    assert s._fed == fed(s) == {"h3": 1, "h4": 1}


def kids_by_zone(s: Scheduler, digest: Digest = D) -> dict[str, int]:
    """The seeder's children in each zone, counted from the links."""
    task = s._tasks[digest]
    counts: dict[str, int] = {}
    for kid in s.children(digest, SEEDER):
        zone = task.peers[kid].zone
        counts[zone] = counts.get(zone, 0) + 1
    return counts


def test_the_zones_share_the_seeders_slots_equally() -> None:
    s = sched(seeder_upload_slots=6, max_parents=0)  # every child needs the seeder
    for zone in "bc":
        s.register(D, f"{zone}0", "", zone, 0.0)
    for n in range(4):
        s.register(D, f"a{n}", "", "a", 0.0)
    # peers in three zones: zone a's children take 6 / 3 of the slots, the rest wait
    assert s.children(D, SEEDER) == ["b0", "c0", "a0", "a1"]
    assert names(s.announce(D, "a2", [], 1.0)) == []
    # the other zones' shares stay free for them
    assert names(s.register(D, "b1", "", "b", 1.0)) == [SEEDER]
    # a child of zone a that completes frees a place for the next one of its zone
    s.announce(D, "a0", [0, 1, 2, 3], 2.0)
    assert names(s.announce(D, "a2", [], 2.0)) == [SEEDER]
    # a child that moves to another zone (re-register) is counted there
    s.register(D, "a1", "", "c", 3.0)
    assert {k: v for k, v in s._tasks[D].seeder_kids.items() if v} == kids_by_zone(s)
    assert kids_by_zone(s) == {"a": 1, "b": 2, "c": 2}
    s.leave(D, "b0")
    assert {k: v for k, v in s._tasks[D].seeder_kids.items() if v} == kids_by_zone(s)


def test_one_zone_takes_every_slot_of_the_seeder() -> None:
    s = sched(seeder_upload_slots=6, max_parents=0)
    for n in range(7):
        s.register(D, f"a{n}", "", "a", 0.0)
    assert len(s.children(D, SEEDER)) == 6


def test_seeder_spread_zero_is_first_come() -> None:
    assert SchedulerConfig().seeder_spread == 0.5  # see Scheduler._seeder_slot
    s = sched(seeder_upload_slots=2, seeder_spread=0.0)
    s.add_task(D2, PieceLayout(4, 1), 0.0)
    s.seeder_done(D2, True)
    for n in range(3):
        s.register(D, f"h{n}", "", "", 0.0)
        s.register(D2, f"h{n}", "", "", 0.0)
    assert s.children(D2, SEEDER) == ["h0", "h1"]
    with pytest.raises(SchedulerError, match="seeder_spread"):
        SchedulerConfig(seeder_spread=1.5)


def test_a_lone_child_under_the_one_copy_rule_keeps_two_pieces_claimed() -> None:
    s = _zoned()
    assert offers(s.register(D, "b1", "", "b", 0.0))[SEEDER] == [0, 1]
    # one of its two claims arrived: it is offered the next piece at once, not only the other
    assert offers(s.announce(D, "b1", [0], 1.0))[SEEDER] == [1, 2]
    # with a second child, claims are no longer topped up (stripes and one copy per zone)
    s.register(D, "b2", "", "b", 1.0)
    assert offers(s.announce(D, "b1", [1], 2.0))[SEEDER] == [2]


# -- cut-through: the seeder streams pieces to a lone child -------------------------------------


def test_a_lone_child_is_offered_the_pieces_the_seeder_streams() -> None:
    s = sched(6, ready=False)
    s.seeder_progress(D, 0, 0.0, streaming=2)
    # nothing held yet, but the seeder streams pieces 0 and 1: it is the child's parent at once
    a = s.register(D, "a", "", "", 0.0)
    assert seeder_offer(a) == [0, 1]
    assert s.seeder_streams(D, 1) and not s.seeder_streams(D, 2)
    s.seeder_progress(D, 1, 1.0, streaming=2)
    assert seeder_offer(s.announce(D, "a", [0], 1.0)) == [0, 1, 2]  # held 0, streams 1, 2
    s.seeder_done(D, True)  # done: nothing streams any more
    assert not s.seeder_streams(D, 5)


def test_streamed_pieces_are_offered_to_no_swarm_and_not_by_default() -> None:
    s = sched(6, ready=False)
    s.seeder_progress(D, 2, 0.0)  # streaming=0, as the storm simulator calls it
    assert seeder_offer(s.register(D, "a", "", "", 0.0)) == [0, 1]
    s.seeder_progress(D, 2, 0.0, streaming=2)
    assert seeder_offer(s.announce(D, "a", [], 0.1)) == [0, 1, 2, 3]
    s.register(D, "b", "", "", 0.2)  # a second peer: hops through peers matter more
    assert all(i < 2 for i in seeder_offer(s.announce(D, "a", [], 0.3)))
    assert not s.seeder_streams(D, 2)
    with pytest.raises(SchedulerError, match="streaming"):
        s.seeder_progress(D, 2, 0.4, streaming=-1)


def test_the_complete_seeder_serves_the_first_children_still_downloading_everything() -> None:
    s = sched(seeder_elders=2)
    s.register(D, "full", "", "", 0.0, upload_slots=8, have=bf("1111"))  # complete: no elder
    for c in ("c0", "c1", "c2", "c3"):
        s.register(D, c, "", "", 0.0)
    # "full" covers everything each child lacks: the super-seeder alone would offer nothing
    served = {c: offers(s.announce(D, c, [], 1.0)) for c in ("c0", "c1", "c2", "c3")}
    assert served["c0"][SEEDER] == served["c1"][SEEDER] == [0, 1, 2, 3]
    assert SEEDER not in served["c2"] and SEEDER not in served["c3"]
    s.announce(D, "c0", [0, 1, 2, 3], 2.0)  # done: its place goes to the next in line
    assert offers(s.announce(D, "c2", [], 2.0))[SEEDER] == [0, 1, 2, 3]
    assert SEEDER not in offers(s.announce(D, "c3", [], 2.0))
    s.leave(D, "c1")  # gone: likewise
    assert offers(s.announce(D, "c3", [], 3.0))[SEEDER] == [0, 1, 2, 3]
    check_books(s, D)


def test_a_first_child_that_registers_again_complete_gives_its_place_on() -> None:
    s = sched(seeder_elders=1)
    s.register(D, "full", "", "", 0.0, upload_slots=8, have=bf("1111"))
    s.register(D, "c0", "", "", 0.0)
    s.register(D, "c1", "", "", 0.0)
    assert offers(s.announce(D, "c0", [], 1.0))[SEEDER] == [0, 1, 2, 3]
    assert SEEDER not in offers(s.announce(D, "c1", [], 1.0))  # the place is taken
    s.register(D, "c0", "", "", 2.0, have=bf("1111"))  # restarted with the whole blob cached
    assert offers(s.announce(D, "c1", [], 2.0))[SEEDER] == [0, 1, 2, 3]
    check_books(s, D)


def test_the_seeder_serves_first_children_in_full_only_with_the_blob_and_nothing_rare() -> None:
    s = sched(seeder_elders=2, ready=False)
    s.seeder_progress(D, 2, 0.0)  # pieces 0 and 1 in
    s.register(D, "p", "", "", 0.0, upload_slots=8, have=bf("11.."))
    assert SEEDER not in offers(s.register(D, "c0", "", "", 0.0))  # p covers what it has
    s.seeder_progress(D, 4, 1.0)
    s.seeder_done(D, True)
    # pieces 2 and 3 are rare (no peer holds them): the seeder offers just those
    assert offers(s.announce(D, "c0", [], 1.0))[SEEDER] == [2, 3]
    s.announce(D, "p", [2, 3], 2.0)  # now nothing is rare
    assert offers(s.announce(D, "c0", [], 2.0))[SEEDER] == [0, 1, 2, 3]


def test_the_seeder_serves_no_first_children_in_full_outside_its_zone() -> None:
    s = Scheduler(
        random.Random(0),
        SchedulerConfig(seeder_stripes=1, control_rate=0.0, zone_claims=False, seeder_elders=2),
        seeder_id=SEEDER,
        seeder_zone="a",
    )
    s.add_task(D, PieceLayout(4, 1), 0.0)
    s.seeder_done(D, True)
    s.register(D, "fb", "", "b", 0.0, upload_slots=8, have=bf("1111"))
    s.register(D, "fa", "", "a", 0.0, upload_slots=8, have=bf("1111"))
    assert SEEDER not in offers(s.register(D, "b0", "", "b", 0.0))
    assert offers(s.register(D, "a0", "", "a", 0.0))[SEEDER] == [0, 1, 2, 3]


def test_peers_that_left_do_not_pile_up_in_the_seeders_queue() -> None:
    s = sched(seeder_elders=2, ready=False)  # the seeder fetching: nobody is served in full
    for i in range(1000):
        s.register(D, f"p{i}", "", "", float(i))
        s.leave(D, f"p{i}")
    s.register(D, "stays", "", "", 1000.0)
    assert len(s._tasks[D].queue) <= 2 * len(s.peers(D)) + 65
    assert s._tasks[D].queue[-1].peer_id == "stays"
