"""The fast simulator's model of batched announces: a host's announces to one supernode ride in
one call, counted as one control message and costing the supernode what the measured model
says, as p2pd's coalescer sends them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from benchmarks.storm.presets import GBIT, PRESETS, MiB
from benchmarks.storm.report import StormResult
from benchmarks.storm.sim import Sim
from p2pd.core.scheduler import SchedulerConfig

SMALL = replace(
    PRESETS["small"], nodes=40, layers=(2 * MiB, 9 * MiB, 17 * MiB), registry_up=1 * GBIT
)


class Counting(Sim):
    """Records every call: its cost in messages of the supernode's time and its riders."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, int]] = []

    def _call(self, pull: Any, index: int, messages: float, decide: Any, **kw: Any) -> None:
        self.calls.append((messages, len(kw.get("riders") or ())))
        super()._call(pull, index, messages, decide, **kw)


def decisions(sim: Sim) -> int:
    """Register, announce and report calls the schedulers answered, and the last announces
    of finished layers still queued when the storm ended (nobody waits for those)."""
    queued = sum(1 for _, _, kind, _ in sim.events if kind == "decide")
    return queued + sum(sn.scheduler.stats()["decisions"] for sn in sim.supernodes)


@pytest.mark.parametrize("delayed", [False, True], ids=["instant", "latency+rate"])
def test_a_batch_is_one_control_message_carrying_several_announces(delayed: bool) -> None:
    scenario = replace(SMALL, latency=0.002, supernode_rate=20000.0) if delayed else SMALL
    lone = Counting(scenario, batch=False)
    a = lone.run()
    assert all(c is not None for c in a.completion)
    # without batching every announce is a message of its own: the schedulers answered one
    # call per control message
    assert decisions(lone) == a.control_messages
    assert not any(riders for _, riders in lone.calls)

    batched = Counting(scenario)
    b = batched.run()
    assert all(c is not None for c in b.completion)
    riders = sum(r for _, r in batched.calls)
    # each rider is one more announce answered, in a message already counted
    assert decisions(batched) == b.control_messages + riders
    # Besides a register and a last announce per layer (never batched), messages carry the
    # announces of the three layers mid-download: about half as many messages for them
    fixed = 2 * SMALL.nodes * len(SMALL.layers)
    assert riders > 0
    assert b.control_messages - fixed < 0.6 * (a.control_messages - fixed)


def test_a_batch_costs_the_supernode_what_the_measured_model_says() -> None:
    overhead = 0.4
    sim = Counting(
        replace(SMALL, latency=0.002, supernode_rate=20000.0),
        scheduler_config=SchedulerConfig(message_overhead=overhead),
    )
    sim.run()
    batches = [(cost, riders) for cost, riders in sim.calls if riders]
    assert batches
    for cost, riders in batches:
        reports = cost - (overhead + (1 + riders) * (1 - overhead))  # a message each
        assert reports == pytest.approx(round(reports)) and round(reports) >= 0
    lone = [cost for cost, riders in sim.calls if not riders]
    assert all(cost == int(cost) for cost in lone)  # whole messages


def test_batching_stays_deterministic_and_completes_with_failures() -> None:
    def run(**changes: Any) -> StormResult:
        return Sim(replace(SMALL, latency=0.002, supernode_rate=5000.0, **changes)).run()

    a, b = run(seed=3), run(seed=3)
    assert a.completion == b.completion and a.control_messages == b.control_messages
    r = run(churn=0.2, supernodes=2, supernode_failure_at=0.1)
    assert sum(c is not None for c in r.completion) == 32
    lost = SMALL.layers[0] + SMALL.layers[2]
    assert SMALL.image_size < r.registry_egress_bytes <= SMALL.image_size + lost + 1
