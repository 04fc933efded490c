"""A fleet whose supernode cuts blobs by another rule than the daemons' own: the supernode's
layout is the one every p2pd follows (p2pd.core.layout), so nothing goes to the registry.

In-process and real on loopback: a `Supernode` (with its `layout_rule` seam) and two
`run_daemon` daemons with their mirror and peer listeners, pieces over real sockets between
them; only the registry is a fake (httpx.MockTransport), reached by the supernode's fetch and
the daemons' access checks.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from benchmarks.harness.procs import free_port
from p2pd.config import P2pdConfig
from p2pd.core.layout import PieceLayout
from p2pd.daemon import Running, run_daemon
from p2pd.peers import PieceClient
from tests.supernode.helpers import REPO, UPSTREAM, FakeRegistry, make_blob, running

SIZE = 600_000
DIGEST, BLOB = make_blob(SIZE, seed=21)
RULES = PieceLayout.for_size(SIZE)  # the daemons' rule: 3 pieces of 256 KiB
CHOSEN = PieceLayout(SIZE, 64 * 1024)  # the supernode's: 10 pieces of 64 KiB


def sixty_four_kib(size: int) -> PieceLayout:
    """The supernode's rule in this test (not this version's)."""
    return PieceLayout(size, 64 * 1024)


class Network(httpx.AsyncBaseTransport):
    """A daemon's HTTP: the fake registry (whose GETs it shares with the supernode), with the
    HEAD of the access check answered here; anything else over real loopback sockets, on a
    connection pool of its own (the daemon closes it)."""

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry.transport()
        self.loopback = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "registry.test":
            assert request.url.host == "127.0.0.1"  # the supernode: never off the machine
            return await self.loopback.handle_async_request(request)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-length": str(SIZE)})
        return await self.registry.handle_async_request(request)

    async def aclose(self) -> None:
        await self.loopback.aclose()


@asynccontextmanager
async def fleet(
    tmp_path: Path, supernode: str, registry: FakeRegistry, names: tuple[str, ...]
) -> AsyncIterator[dict[str, Running]]:
    async with trio.open_nursery() as nursery:
        daemons = {}
        for name in names:
            port = free_port()
            config = P2pdConfig.from_mapping(
                {
                    "mirror_listen": "127.0.0.1:0",
                    "peer_listen": f"127.0.0.1:{port}",
                    "advertise": f"127.0.0.1:{port}",
                    "peer_id": name,
                    "data_dir": str(tmp_path / name),
                    "supernodes": [supernode],
                    "registries": {"registry.test": UPSTREAM},
                }
            )
            start = functools.partial(run_daemon, config, transport=Network(registry))
            daemons[name] = await nursery.start(start)
        yield daemons
        nursery.cancel_scope.cancel()


async def pull(daemon: Running) -> bytes:
    url = f"http://127.0.0.1:{daemon.ports.mirror}/v2/{REPO}/blobs/{DIGEST}?ns=registry.test"
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    return response.content


async def test_a_fleet_follows_a_supernode_that_cuts_blobs_by_another_rule(
    tmp_path: Path,
) -> None:
    assert RULES != CHOSEN
    registry = FakeRegistry(blobs={str(DIGEST): BLOB})
    with trio.fail_after(60):
        async with (
            running(tmp_path / "sn", registry, layout_rule=sixty_four_kib) as supernode,
            fleet(tmp_path, f"http://127.0.0.1:{supernode.port}", registry, ("a", "b")) as hosts,
        ):
            a, b = hosts["a"].daemon, hosts["b"].daemon
            assert await pull(hosts["a"]) == BLOB
            # "a" seeds it now (cut as the supernode cuts it); "b" gets it from "a"
            assert await pull(hosts["b"]) == BLOB
            assert a.store.layout_of(DIGEST) == CHOSEN == b.store.layout_of(DIGEST)
            assert a.piece_server.bytes_served > 0
            for daemon in (a, b):
                stats = daemon.stats()
                assert stats["bytes_from_registry"] == 0 and stats["back_to_source"] == 0
                assert stats["bytes_from_peers"] == SIZE
            # a requester of an older version names no piece size: it gets "a"'s layout
            client = PieceClient()
            last = bytearray(CHOSEN.length(CHOSEN.count - 1))
            await client.fetch(f"127.0.0.1:{hosts['a'].ports.peer}", DIGEST, 9, memoryview(last))
            await client.aclose()
            assert bytes(last) == BLOB[CHOSEN.offset(9) :]
    assert len(registry.blob_gets()) == 1  # the supernode's one fetch
    assert (tmp_path / "a" / "layouts" / DIGEST.hex).exists()
