"""The picker and the scheduler together: a swarm driven by the core alone always completes.

`benchmarks.lockstep` drives the real `Scheduler` and one real `PiecePicker` per peer in rounds
(no network model). Whatever the swarm's shape -- zones, tight upload slots, a seeder still
reading the blob, corrupt peers, peers leaving mid-way -- every peer that stays must end up
holding every piece, and the same seed must give the same decisions.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.lockstep import LockstepSwarm
from p2pd.core.picker import PickerConfig
from p2pd.core.scheduler import SchedulerConfig


@st.composite
def swarms(draw: st.DrawFn) -> LockstepSwarm:
    n = draw(st.integers(1, 25))
    pieces = draw(st.integers(0, 40))
    ids = [f"p{i}" for i in range(n)]
    corrupt = draw(st.sets(st.sampled_from(ids), max_size=2))
    leavers = draw(st.sets(st.sampled_from(ids), max_size=max(0, n // 3)))
    return LockstepSwarm(
        n,
        pieces,
        draw(st.integers(0, 2**32)),
        zones=draw(st.integers(1, 3)),
        upload_slots=draw(st.integers(1, 6)),
        scheduler_config=SchedulerConfig(
            max_parents=draw(st.integers(1, 5)), seeder_upload_slots=draw(st.integers(1, 8))
        ),
        seeder_pieces_per_round=draw(st.none() | st.integers(1, 8)),
        corrupt=frozenset(corrupt),
        leave_at={p: draw(st.integers(1, 6)) for p in leavers},
    )


@settings(max_examples=150, deadline=None)
@given(swarms())
def test_every_remaining_peer_completes(swarm: LockstepSwarm) -> None:
    result = swarm.run(max_rounds=2000)
    assert result.incomplete == []
    assert len(result.complete) == len(swarm.ids) - len(swarm.gone)
    # a corrupt peer can serve a bad piece at most once per child before it is dropped
    assert result.bad_pieces_served <= len(swarm.ids) * max(1, len(swarm.corrupt))


def test_peers_feed_each_other_when_the_seeder_is_scarce() -> None:
    result = LockstepSwarm(40, 64, 7, scheduler_config=SchedulerConfig(seeder_upload_slots=2)).run()
    assert result.incomplete == []
    total = 40 * 64
    assert result.pieces_from_seeder + result.pieces_from_peers == total
    # the seeder sent each piece about once per slot, peers did the rest
    assert result.pieces_from_seeder < total // 4


def test_corrupt_peer_is_banned_and_the_swarm_still_completes() -> None:
    swarm = LockstepSwarm(
        20,
        32,
        3,
        corrupt=frozenset({"p1"}),
        scheduler_config=SchedulerConfig(seeder_upload_slots=1),
    )
    result = swarm.run()
    assert result.incomplete == []
    assert result.bad_pieces_served >= 1
    assert swarm.scheduler.is_banned(swarm.scheduler_digest(), "p1")


def test_same_seed_same_decisions() -> None:
    def trace(seed: int) -> list[tuple[int, str, tuple[str, ...]]]:
        swarm = LockstepSwarm(
            15,
            24,
            seed,
            zones=2,
            seeder_pieces_per_round=3,
            scheduler_config=SchedulerConfig(seeder_upload_slots=3),
            # no prefix window: every pick then depends on the seeded piece priorities
            picker_config=PickerConfig(prefix_window=0, request_timeout=1e9),
            keep_trace=True,
        )
        return swarm.run().trace

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)
