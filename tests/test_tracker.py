"""Rendezvous ranking of supernodes and failover of a tracker session."""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

import httpx
import pytest
import trio

from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.http.server import bound_port
from p2pd.tracker import (
    ControlClient,
    TrackerRejected,
    TrackerSession,
    TrackerUnavailable,
    rank_supernodes,
)
from tests.supernode.helpers import BLOB, DIGEST, LAYOUT, FakeRegistry, running
from tests.supernode.helpers import register_msg as sn_register_msg

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


# -- the raw control client against real servers on loopback ----------------------------------


async def test_raw_control_messages_reach_a_real_supernode_over_one_connection(
    tmp_path: Path,
) -> None:
    """Register, announce and leave through `ControlClient(raw=True)` against a supernode on
    loopback: real answers, and one kept-alive connection for all of them."""
    opened: list[str] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        opened.append(f"{host}:{port}")
        return await trio.open_tcp_stream(host, port)

    upstream = FakeRegistry(blobs={str(DIGEST): BLOB})
    async with (
        running(tmp_path, upstream) as h,
        httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as fallback,
    ):
        client = ControlClient(fallback, raw=True, connect=connect)
        base = f"http://127.0.0.1:{h.port}"
        session = TrackerSession(client, [base], sn_register_msg("p1"))
        first = await session.register(None)
        assert first.digest == DIGEST and first.state in ("fetching", "ready")
        await h.wait_done()
        ready = await session.announce([], 0, Bitfield(LAYOUT.count))
        assert ready.state == "ready" and len(ready.hashes) == 16 * LAYOUT.count
        await session.leave()
        assert opened == [f"127.0.0.1:{h.port}"]
        assert h.supernode.messages == 3
        await client.aclose()


async def test_raw_control_replaces_a_kept_connection_the_server_closed(
    nursery: trio.Nursery,
) -> None:
    """A server that closes each connection after one answer (its keep-alive expired, say):
    the next message finds the kept connection dead and goes out on a fresh one."""
    d = digest(13)
    answer = assignment(d)
    paths: list[str] = []

    async def handle(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(65536)
        paths.append(request.split(b" ")[1].decode())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
        await stream.send_all(answer)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    base = f"http://127.0.0.1:{bound_port(listeners)}"
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as fallback:
        client = ControlClient(fallback, raw=True)
        session = TrackerSession(client, [base], register_msg(d))
        await session.register(None)
        await trio.sleep(0.1)  # the server's close has arrived
        assert (await session.announce([], 0, Bitfield(3))).digest == d
        assert paths == ["/v1/register", "/v1/announce"]  # the announce itself, on a fresh one
        await client.aclose()


def refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the fallback client was used for {request.url}")


async def bad_server(nursery: trio.Nursery, answer: bytes | None) -> str:
    """A server that reads a request and answers `answer` (None: never answers)."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        if answer is None:
            await trio.sleep_forever()
        await stream.send_all(answer)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{bound_port(listeners)}"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "closed at 5 of 100"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "no Content-Length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "unreadable reply"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 9000, "head over"),
        (b"", "closed before an answer"),
        (None, "no answer within 0.3 s"),
    ],
)
async def test_raw_control_answers_that_are_not_http_are_an_unavailable_supernode(
    nursery: trio.Nursery, answer: bytes | None, message: str
) -> None:
    base = await bad_server(nursery, answer)
    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as fallback:
        client = ControlClient(fallback, raw=True)
        session = TrackerSession(client, [base], register_msg(digest(11)), timeout=0.3)
        with pytest.raises(TrackerUnavailable, match=message):
            await session.register(None)
        await client.aclose()


async def test_raw_control_leaves_https_and_refused_ports_to_their_own_errors() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=assignment(digest(12)))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as fallback:
        client = ControlClient(fallback, raw=True)
        session = TrackerSession(client, ["https://sn.test:65002"], register_msg(digest(12)))
        await session.register(None)
        assert seen == ["https://sn.test:65002/v1/register"]
        session = TrackerSession(client, ["http://127.0.0.1:1"], register_msg(digest(12)))
        with pytest.raises(TrackerUnavailable, match="cannot connect"):
            await session.register(None)
