"""``POST /v1/announce-batch`` on a real supernode (127.0.0.1, fake registry): the lean control
path and the general h11 server answer it alike, each item as if it came alone, a refused item
does not fail the others, the reply stays under the size limit, and cluster signatures apply."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given

from p2pd import wire
from p2pd.clusterauth import ClusterAuth
from p2pd.core.digest import Digest
from supernode.controlhttp import parse_head
from supernode.tracker import _size_bound
from tests.supernode.helpers import (
    BLOB,
    DIGEST,
    PIECE,
    FakeRegistry,
    Harness,
    make_blob,
    register_msg,
    running,
)
from tests.supernode.test_controlhttp import AUTH, Conn, connect, head_of, post
from tests.test_wire import FUZZ, assignments

PATH = "/v1/announce-batch"
OTHER, OTHER_BLOB = make_blob(3 * PIECE // 4 + 5, seed=11)  # one piece
UNKNOWN, _ = make_blob(10, seed=12)


def registry() -> FakeRegistry:
    return FakeRegistry(blobs={str(DIGEST): BLOB, str(OTHER): OTHER_BLOB})


def chunked(path: str, body: bytes, *extra: str) -> bytes:
    """The same POST with a chunked body: the lean path hands it to the h11 server."""
    headers = "".join(f"{h}\r\n" for h in extra)
    return (
        f"POST {path} HTTP/1.1\r\nHost: sn\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )


def batch(peer: str, *items: tuple[Digest, tuple[int, ...]]) -> wire.AnnounceBatch:
    return wire.AnnounceBatch(tuple(wire.Announce(d, peer, p, 0, True) for d, p in items))


async def both_ready(h: Harness) -> None:
    await h.register("a")
    await h.register("a", digest=OTHER, size=len(OTHER_BLOB))
    await h.register("b", digest=OTHER, size=len(OTHER_BLOB))
    await h.wait_done()
    await h.wait_done(OTHER)


async def exchange(c: Conn, request: bytes) -> tuple[bytes, wire.Message]:
    await c.stream.send_all(request)
    status, fields, body = await c.response()
    assert fields[b"content-type"] == b"application/msgpack"
    return status, wire.decode(body)


def test_the_lean_path_takes_batches() -> None:
    head = parse_head(head_of(post(PATH, b"abc")), AUTH)
    assert head is not None and (head.path, head.length) == (PATH, 3)
    for near in ("/v1/announce-batc", "/v1/announce-batchx", "/v1/announce-batch/"):
        assert parse_head(head_of(post(near, b"abc")), AUTH) is None


@pytest.mark.parametrize("framing", [post, chunked], ids=["lean", "h11"])
async def test_each_item_is_answered_as_if_alone(tmp_path: Path, framing: object) -> None:
    frame = post if framing is post else chunked
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        await both_ready(h)
        scheduler = h.supernode.tracker.scheduler
        messages = h.supernode.messages
        msg = batch(
            "a",
            (DIGEST, (0, 2)),
            (UNKNOWN, (0,)),  # no such task
            (OTHER, (0,)),  # completes "a"'s copy of OTHER
            (Digest("ef" * 32), ()),  # no such task either
        )
        status, reply = await exchange(c, frame(PATH, wire.encode(msg)))
        assert status == b"HTTP/1.1 200 " and isinstance(reply, wire.BatchReply)
        first, unknown, other, unknown2 = reply.items
        assert isinstance(first, wire.Assignment) and first.digest == DIGEST
        assert isinstance(unknown, wire.Error) and unknown.code == "unknown_task"
        assert isinstance(other, wire.Assignment) and other.digest == OTHER
        assert isinstance(unknown2, wire.Error) and unknown2.code == "unknown_task"
        assert list(scheduler.peer_pieces(DIGEST, "a")) == [0, 2]
        assert scheduler.peer_pieces(OTHER, "a").is_full()
        assert h.supernode.messages == messages + 1  # one message, whatever it carries

        # "b" is no peer of DIGEST; an index out of range is that item's bad request alone
        strange = batch("b", (DIGEST, ()), (OTHER, (0,)))
        status, reply = await exchange(c, frame(PATH, wire.encode(strange)))
        assert status == b"HTTP/1.1 200 " and isinstance(reply, wire.BatchReply)
        assert [type(i) for i in reply.items] == [wire.Error, wire.Assignment]
        assert isinstance(reply.items[0], wire.Error) and reply.items[0].code == "unknown_peer"
        bad = batch("a", (OTHER, (5,)), (DIGEST, (1,)))
        status, reply = await exchange(c, frame(PATH, wire.encode(bad)))
        assert isinstance(reply, wire.BatchReply)
        assert isinstance(reply.items[0], wire.Error) and reply.items[0].code == "bad_request"
        assert "out of range" in reply.items[0].message
        assert isinstance(reply.items[1], wire.Assignment)
        assert scheduler.peer_pieces(DIGEST, "a").is_full()


@pytest.mark.parametrize("framing", [post, chunked], ids=["lean", "h11"])
async def test_a_bad_batch_is_refused_whole(tmp_path: Path, framing: object) -> None:
    frame = post if framing is post else chunked
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        await h.register("a")
        good = wire.encode(batch("a", (DIGEST, (0,))))
        cases = [
            (good[:-3], "malformed MessagePack"),
            (wire.encode(wire.Announce(DIGEST, "a", (), 0, True)), "unexpected message type"),
            (good.replace(b"\xa1a", b"\xa1!"), "AnnounceBatch.items[0]: Announce.peer_id"),
        ]
        for body, fragment in cases:
            status, reply = await exchange(c, frame(PATH, body))
            assert status == b"HTTP/1.1 400 "
            assert isinstance(reply, wire.Error) and reply.code == "bad_request"
            assert fragment in reply.message
        # nothing was taken from the refused ones; the connection and server go on
        assert h.supernode.tracker.scheduler.peer_pieces(DIGEST, "a").is_empty()
        status, reply = await exchange(c, frame(PATH, good))
        assert status == b"HTTP/1.1 200 " and isinstance(reply, wire.BatchReply)
        await h.wait_done()


async def test_batches_are_signed_like_every_control_call(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    signer = ClusterAuth(secret.read_bytes())
    async with (
        running(tmp_path / "sn", registry(), cluster_secret_file=str(secret)) as h,
        connect(h.port) as c,
    ):
        body = wire.encode(register_msg("a"))
        sig = signer.sign("POST", "/v1/register", body)
        assert (await exchange(c, post("/v1/register", body, f"X-P2P-Auth: {sig}")))[0] == (
            b"HTTP/1.1 200 "
        )
        body = wire.encode(batch("a", (DIGEST, (0,))))
        for frame in (post, chunked):
            status, reply = await exchange(c, frame(PATH, body))
            assert status == b"HTTP/1.1 401 " and isinstance(reply, wire.Error)
            # a signature for another route does not do
            wrong = signer.sign("POST", "/v1/announce", body)
            status, _ = await exchange(c, frame(PATH, body, f"X-P2P-Auth: {wrong}"))
            assert status == b"HTTP/1.1 401 "
            sig = signer.sign("POST", PATH, body)
            status, reply = await exchange(c, frame(PATH, body, f"X-P2P-Auth: {sig}"))
            assert status == b"HTTP/1.1 200 " and isinstance(reply, wire.BatchReply)
        await h.wait_done()


async def test_the_reply_stays_under_the_limit(tmp_path: Path) -> None:
    """Items that would not fit go without their hashes, then as ``deferred``: the announce
    itself was taken either way."""
    async with running(tmp_path, registry()) as h:
        await both_ready(h)
        tracker = h.supernode.tracker
        msg = batch("a", (DIGEST, (0,)), (OTHER, ()))
        full = [i for i in tracker.announce_batch(msg).items if isinstance(i, wire.Assignment)]
        assert len(full) == 2 and all(a.hashes for a in full)
        sizes = [_size_bound(a) for a in full]
        # room for the first whole and the second without its hashes
        limit = 64 + 128 * 2 + sizes[0] + sizes[1] - len(full[1].hashes)
        tight = tracker.announce_batch(batch("a", (DIGEST, (1,)), (OTHER, ())), limit)
        first, second = tight.items
        assert isinstance(first, wire.Assignment) and first.hashes == full[0].hashes
        assert isinstance(second, wire.Assignment) and second.hashes == b""
        assert len(wire.encode(tight)) <= limit
        # no room for the second at all: deferred, though its pieces were taken
        tighter = tracker.announce_batch(batch("a", (DIGEST, ()), (OTHER, (0,))), limit - 1000)
        assert isinstance(tighter.items[0], wire.Assignment)
        assert isinstance(tighter.items[1], wire.Error) and tighter.items[1].code == "deferred"
        assert tracker.scheduler.peer_pieces(OTHER, "a").is_full()
        assert list(tracker.scheduler.peer_pieces(DIGEST, "a")) == [0, 1]


@FUZZ
@given(assignments())
def test_the_size_bound_bounds_an_items_encoding(reply: wire.Assignment) -> None:
    assert len(wire.encode(reply)) <= _size_bound(reply)  # an item is that less "v": 2
