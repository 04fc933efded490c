"""Named storm scenarios (`p2p-bench storm --preset NAME`), from the issue's goals."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.storm.report import Scenario

MiB = 1024 * 1024
GBIT = 1e9 / 8  # bytes/s
MBIT = 1e6 / 8

STORM_A = Scenario(
    name="storm-a",
    nodes=1000,
    layers=(30 * MiB, 200 * MiB, 800 * MiB),
    node_up=1 * GBIT,
    node_down=1 * GBIT,
    registry_up=2 * GBIT,
    supernode_up=10 * GBIT,
    supernode_down=10 * GBIT,
)

PRESETS: dict[str, Scenario] = {
    "storm-a": STORM_A,
    "storm-10k": replace(STORM_A, name="storm-10k", nodes=10_000),
    "slow-hosts": replace(
        STORM_A, name="slow-hosts", slow_share=0.1, slow_up=100 * MBIT, slow_down=100 * MBIT
    ),
    "churn": replace(STORM_A, name="churn", churn=0.1),
    "zones": replace(STORM_A, name="zones", zones=3, zone_link=10 * GBIT),
    "rolling": replace(STORM_A, name="rolling", arrival_spread=30.0),
    "small": replace(STORM_A, name="small", nodes=50, layers=(4 * MiB, 20 * MiB, 60 * MiB)),
    # Storm-A with a control plane that costs time: 0.5 ms round trips, and one supernode
    # process answering 10 400 messages/s (what `p2p-bench dataplane --control-only` measured
    # per CPU-second on the 2-core development machine: 3258 before the lean control path,
    # 7600 with it, 10 400 since its per-message work was cut); fast engine only
    "storm-a-cpu": replace(STORM_A, name="storm-a-cpu", latency=0.0005, supernode_rate=10400.0),
    # the same at 10 000 hosts: `storm-10k`'s supernode answers every call at once, and there
    # a host's downloads waiting for parents call far more often than it could (session 14:
    # 2.86x the bound here against 1.41x there; since session 15 they wait the pace while
    # replies are slow, see p2pd.core.session: 2.52x)
    "storm-10k-cpu": replace(
        STORM_A, name="storm-10k-cpu", nodes=10_000, latency=0.0005, supernode_rate=10400.0
    ),
    # two supernodes; the one in charge of layers 0 and 2 dies 3 s into the storm
    "supernode-failure": replace(
        STORM_A, name="supernode-failure", supernodes=2, supernode_failure_at=3.0
    ),
}
