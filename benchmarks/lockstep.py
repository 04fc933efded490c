"""A lockstep swarm: the real scheduling core driven in rounds, with no network model.

Every round each peer receives the pieces it asked for in the previous round (a parent that
left fails the request, a parent that lacks the piece answers "not here", a corrupt parent
serves bad bytes), announces what it completed to the `Scheduler`, syncs its `PiecePicker`
with the parents the scheduler assigned, and picks new requests. Transfers have no size and no
duration: this answers "does the core always finish, and what does it decide", not "how fast".
The storm simulator answers the latter with a network model; the unit tests and the
microbenchmark use this one.

Deterministic for a seed: peers act in a fixed order and all randomness comes from one
`random.Random`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.picker import BadParent, Cancel, PickerConfig, PiecePicker, Request
from p2pd.core.scheduler import Assignment, Scheduler, SchedulerConfig, TaskState

DIGEST = Digest("0" * 64)  # any digest: the lockstep swarm moves no bytes
SEEDER = "seeder"


@dataclass
class SwarmResult:
    rounds: int
    complete: list[str]
    incomplete: list[str]
    scheduler_calls: int
    scheduler_seconds: float
    pieces_from_seeder: int
    pieces_from_peers: int
    bad_pieces_served: int
    trace: list[tuple[int, str, tuple[str, ...]]] = field(default_factory=list)


class LockstepSwarm:
    def __init__(
        self,
        n_peers: int,
        pieces: int,
        seed: int,
        *,
        zones: int = 1,
        upload_slots: int = 8,
        scheduler_config: SchedulerConfig | None = None,
        picker_config: PickerConfig | None = None,
        seeder_pieces_per_round: int | None = None,
        corrupt: frozenset[str] = frozenset(),
        leave_at: dict[str, int] | None = None,
        timer: Callable[[], float] | None = None,
        keep_trace: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.layout = PieceLayout(pieces, 1)
        self.scheduler = Scheduler(
            random.Random(self.rng.random()), scheduler_config or SchedulerConfig(), SEEDER
        )
        self.picker_config = picker_config or PickerConfig(request_timeout=1e9)
        self.ids = [f"p{i}" for i in range(n_peers)]
        self.zones = {pid: f"z{i % zones}" for i, pid in enumerate(self.ids)}
        self.slots = upload_slots
        self.seeder_rate = seeder_pieces_per_round
        self.corrupt = corrupt
        self.leave_at = leave_at or {}
        self.timer = timer
        self.keep_trace = keep_trace
        self.seeder_known = 0
        self.pickers: dict[str, PiecePicker] = {}
        self.pending: dict[str, list[Request]] = {}
        self.gone: set[str] = set()
        self.calls = 0
        self.sched_time = 0.0
        self.from_seeder = 0
        self.from_peers = 0
        self.bad_served = 0
        self.trace: list[tuple[int, str, tuple[str, ...]]] = []

    # -- timing of scheduler calls ------------------------------------------------------------

    def _call(self, fn: Callable[[], Assignment | None]) -> Assignment | None:
        self.calls += 1
        if self.timer is None:
            return fn()
        t0 = self.timer()
        try:
            return fn()
        finally:
            self.sched_time += self.timer() - t0

    # -- the run ------------------------------------------------------------------------------

    def run(self, max_rounds: int = 10_000) -> SwarmResult:
        sched = self.scheduler
        sched.add_task(DIGEST, self.layout, 0.0)
        self._advance_seeder()
        for pid in self.ids:
            picker = PiecePicker(self.layout, random.Random(self.rng.random()), self.picker_config)
            self.pickers[pid] = picker
            self.pending[pid] = []
            assignment = self._call(
                lambda pid=pid: sched.register(  # type: ignore[misc]
                    DIGEST, pid, f"{pid}:1", self.zones[pid], 0.0, upload_slots=self.slots
                )
            )
            assert assignment is not None
            self._sync(pid, assignment, 0)
        rounds = 0
        while rounds < max_rounds and not self._done():
            rounds += 1
            self._advance_seeder()
            for pid in self.ids:
                if pid in self.gone:
                    continue
                if self.leave_at.get(pid) == rounds:
                    self.gone.add(pid)
                    self._call(lambda pid=pid: sched.leave(DIGEST, pid))  # type: ignore[misc]
                    continue
                self._round(pid, rounds)
        active = [p for p in self.ids if p not in self.gone]
        return SwarmResult(
            rounds=rounds,
            complete=[p for p in active if self.pickers[p].is_complete()],
            incomplete=[p for p in active if not self.pickers[p].is_complete()],
            scheduler_calls=self.calls,
            scheduler_seconds=self.sched_time,
            pieces_from_seeder=self.from_seeder,
            pieces_from_peers=self.from_peers,
            bad_pieces_served=self.bad_served,
            trace=self.trace,
        )

    def scheduler_digest(self) -> Digest:
        return DIGEST

    def _done(self) -> bool:
        return all(self.pickers[p].is_complete() for p in self.ids if p not in self.gone)

    def _advance_seeder(self) -> None:
        count = self.layout.count
        rate = self.seeder_rate
        known = count if rate is None else min(count, self.seeder_known + rate)
        if known != self.seeder_known or (known == count and self._fetching()):
            self.seeder_known = known
            self.scheduler.seeder_progress(DIGEST, known)
            if known == count:
                self.scheduler.seeder_done(DIGEST, ok=True)
        for picker in self.pickers.values():
            picker.set_verifiable(self.seeder_known)

    def _fetching(self) -> bool:
        return self.scheduler.task_state(DIGEST) is TaskState.FETCHING

    def _holder_has(self, parent: str, index: int) -> bool:
        if parent == SEEDER:
            return index < self.seeder_known
        return parent not in self.gone and index in self.pickers[parent].have

    def _round(self, pid: str, now: int) -> None:
        picker = self.pickers[pid]
        completed: list[int] = []
        for req in self.pending[pid]:
            if req.parent not in picker.parents() or req.index in picker.have:
                continue  # cancelled or lost to an endgame duplicate
            if not self._holder_has(req.parent, req.index):
                picker.on_failure(req.parent, req.index, lacks_piece=True)
                continue
            ok = req.parent not in self.corrupt
            if not ok:
                self.bad_served += 1
            actions = picker.on_piece(req.parent, req.index, ok, float(now))
            if ok:
                completed.append(req.index)
                if req.parent == SEEDER:
                    self.from_seeder += 1
                else:
                    self.from_peers += 1
            for action in actions:
                if isinstance(action, BadParent):
                    self._call(
                        lambda a=action: self.scheduler.report_bad_piece(  # type: ignore[misc]
                            DIGEST, pid, a.parent, a.index, float(now)
                        )
                    )
                elif isinstance(action, Cancel):
                    pass  # the pending entry is skipped above: its parent or piece moved on
        assignment = self._call(lambda: self.scheduler.announce(DIGEST, pid, completed, float(now)))
        assert assignment is not None
        self._sync(pid, assignment, now)

    def _sync(self, pid: str, assignment: Assignment, now: int) -> None:
        picker = self.pickers[pid]
        wanted = {p.peer_id: p.pieces for p in assignment.parents}
        for parent in picker.parents():
            if parent not in wanted:
                picker.remove_parent(parent)
        for parent, pieces in wanted.items():
            picker.add_parent(parent, pieces)
        self.pending[pid] = picker.pick(float(now))
        if self.keep_trace:
            picks = tuple(f"{r.parent}#{r.index}" for r in self.pending[pid])
            self.trace.append((now, pid, tuple(sorted(wanted)) + picks))


def run_swarm(n_peers: int, pieces: int, seed: int, **kwargs: object) -> SwarmResult:
    return LockstepSwarm(n_peers, pieces, seed, **kwargs).run()  # type: ignore[arg-type]


__all__ = ["Bitfield", "LockstepSwarm", "SwarmResult", "run_swarm"]
