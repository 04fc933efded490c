"""Rendezvous ranking of supernodes and failover of a tracker session."""

from __future__ import annotations

import hashlib
import random

import httpx
import pytest

from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.tracker import TrackerRejected, TrackerSession, TrackerUnavailable, rank_supernodes

NODES = [f"http://sn{i}.test:65002" for i in range(1, 6)]  # MockTransport: nothing is sent


def digest(i: int) -> Digest:
    return Digest.from_bytes(hashlib.sha256(str(i).encode()).digest())


def test_ranking_is_stable_and_spreads_blobs() -> None:
    firsts = [rank_supernodes(NODES, digest(i))[0] for i in range(2000)]
    counts = {n: firsts.count(n) for n in NODES}
    assert all(300 <= c <= 500 for c in counts.values()), counts
    shuffled = NODES[:]
    random.Random(1).shuffle(shuffled)
    assert all(
        rank_supernodes(shuffled, digest(i)) == rank_supernodes(NODES, digest(i)) for i in range(50)
    )


def test_removing_a_supernode_moves_only_its_blobs() -> None:
    gone = NODES[2]
    rest = [n for n in NODES if n != gone]
    for i in range(500):
        before = rank_supernodes(NODES, digest(i))
        after = rank_supernodes(rest, digest(i))
        assert after == [n for n in before if n != gone]


def assignment(d: Digest) -> bytes:
    return wire.encode(wire.Assignment(d, "fetching", 10, 4, 0, b"", False, ()))


def register_msg(d: Digest) -> wire.Register:
    return wire.Register(d, 10, "me", "127.0.0.1:1", "", 8, "http://r.test", "app", None, None)


async def test_register_fails_over_in_ranking_order_and_announce_follows() -> None:
    d = digest(7)
    ranking = rank_supernodes(NODES[:3], d)
    down = {ranking[0]}
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        seen.append(f"{base}{request.url.path}")
        if base in down:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, content=assignment(d))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        session = TrackerSession(client, NODES[:3], register_msg(d))
        await session.register(None)
        assert session.current == ranking[1]
        assert seen == [f"{ranking[0]}/v1/register", f"{ranking[1]}/v1/register"]
        # the second one dies too: the announce re-registers with the third, carrying `have`
        down.add(ranking[1])
        seen.clear()
        await session.announce([1], 0, Bitfield.from_indexes(3, [1]))
        assert session.current == ranking[2]
        assert seen[-1] == f"{ranking[2]}/v1/register"
        down.add(ranking[2])
        with pytest.raises(TrackerUnavailable):
            await session.announce([], 0, Bitfield(3))


async def test_refusals_are_not_failovers() -> None:
    d = digest(8)

    def handler(request: httpx.Request) -> httpx.Response:
        body = wire.encode(wire.Error("upstream_not_allowed", "no"))
        return httpx.Response(403, content=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        session = TrackerSession(client, NODES[:2], register_msg(d))
        with pytest.raises(TrackerRejected) as info:
            await session.register(None)
        assert info.value.code == "upstream_not_allowed"


async def test_a_restarted_supernode_is_joined_again_not_abandoned() -> None:
    d = digest(9)
    ranking = rank_supernodes(NODES[:2], d)
    forgot = [True]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        seen.append(f"{base}{request.url.path}")
        if request.url.path.endswith("/announce") and forgot[0]:
            forgot[0] = False
            return httpx.Response(404, content=wire.encode(wire.Error("unknown_peer", "who?")))
        return httpx.Response(200, content=assignment(d))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        session = TrackerSession(client, NODES[:2], register_msg(d))
        await session.register(None)
        await session.announce([0], 0, Bitfield(3))
        assert session.current == ranking[0]
        assert seen[-1] == f"{ranking[0]}/v1/register"


async def test_a_reply_of_the_wrong_type_is_an_unavailable_supernode() -> None:
    d = digest(10)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=wire.encode(wire.Ack()))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        session = TrackerSession(client, NODES[:2], register_msg(d))
        with pytest.raises(TrackerUnavailable, match="Ack to register"):
            await session.register(None)
