"""Three hosts in network namespaces pull one image through p2pd with real containerd.

The small CI version of `p2p-bench hosts`: a real docker-registry, a real supernode and three
p2pd hosts, each in its own namespace on a bridge with light tbf limits; a containerd per host
pulls through that host's p2pd with the fallback to the registry disabled. Asserted: every
blob left the registry exactly once (and to the supernode), and each host's mirror served the
whole image (``/stats``, read from inside the host's namespace).

Needs root (CI runs as root). Without it the test fails with a message saying so rather than
skipping, so a CI that lost its root does not go quietly green.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.harness.image import Image, make_image
from benchmarks.harness.netns import signals_raise
from benchmarks.hosts.cluster import Cluster, ClusterConfig, check_pulls

REF = "example.test/ci/app:v1"
LAYERS = [100_000, 2_000_000, 6_000_000]
MBIT = 200.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("tests/hosts builds network namespaces and needs root (CI runs as root)")
    workdir = tmp_path_factory.mktemp("hosts")
    config = ClusterConfig(
        hosts=3,
        host_up_mbit=MBIT,
        host_down_mbit=MBIT,
        registry_mbit=MBIT,
        supernode_mbit=MBIT,
        prefix=f"p2pt{os.getpid()}",
    )
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the namespaces go even then.
    with signals_raise(), Cluster(workdir, config) as running:
        yield running


@pytest.fixture(scope="module")
def image(cluster: Cluster) -> Image:
    built = make_image(5, LAYERS, workdir=cluster.workdir / "image")
    cluster.push(built, "ci/app", "v1")
    return built


def test_three_hosts_pull_through_p2pd_and_each_blob_leaves_the_registry_once(
    cluster: Cluster, image: Image
) -> None:
    before = cluster.registry.blob_bytes_by_digest()
    assert not before, "the push should not have served any blob"

    outcomes = cluster.pull_all(REF, via_p2pd=True, timeout=120)
    check_pulls(outcomes, "pull through p2pd")

    assert {d: cluster.registry.blob_gets(d) for d in image.blobs} == dict.fromkeys(image.blobs, 1)
    supernode = cluster.fleet.host("sn").address
    assert cluster.registry.blob_bytes_by_remote() == {supernode: image.total_size}
    for host in cluster.hosts:
        stats = host.stats()
        assert stats["bytes_to_clients"] == image.total_size, (host.name, stats)
        assert stats["bytes_from_registry"] == 0, (host.name, stats)
        assert stats["bytes_from_peers"] == image.total_size, (host.name, stats)


def test_the_fleet_is_isolated_and_named_per_run(cluster: Cluster) -> None:
    # Host namespaces have no default route: nothing inside can reach the outside world.
    routes = cluster.fleet.run_in("h1", ["ip", "route", "show"], timeout=10, what="routes")
    assert "default" not in routes.stdout
    names = {h.netns for h in cluster.fleet.hosts.values()}
    assert all(n.startswith(f"p2pt{os.getpid()}-") for n in names)
    assert Path(f"/run/netns/{cluster.fleet.switch}").exists()
