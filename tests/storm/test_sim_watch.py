"""The fast simulator's model of parents' news without the supernode: a piece response
carrying its parent's bitfield (on by default, as the daemon sends it) and watches of parents
that offer nothing more (off by default, as in the daemon)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.storm.presets import GBIT, PRESETS, MiB
from benchmarks.storm.report import StormResult
from benchmarks.storm.sim import Sim

SMALL = replace(
    PRESETS["small"], nodes=40, layers=(2 * MiB, 9 * MiB, 17 * MiB), registry_up=1 * GBIT
)


def run(**kw: Any) -> tuple[Sim, StormResult]:
    sim = Sim(replace(SMALL, latency=0.002, churn=0.1), **kw)
    return sim, sim.run()


def test_watches_are_answered_deterministically_and_every_host_still_completes() -> None:
    sim, a = run(watch=True)
    assert sim.watches > 0
    assert sum(c is not None for c in a.completion) == 36  # all but the 10 % that left
    assert a.registry_egress_bytes == SMALL.image_size
    _, b = run(watch=True)
    assert a.completion == b.completion and a.control_messages == b.control_messages


def test_without_watches_or_bitfields_none_is_used() -> None:
    sim, plain = run()
    assert sim.watches == 0 and not sim.watchers
    _, old = run(piggyback=False)
    _, watched = run(watch=True)
    # each changes what the children knew, hence when they finished
    assert plain.completion != old.completion and plain.completion != watched.completion
