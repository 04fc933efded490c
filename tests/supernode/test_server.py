"""The supernode's HTTP API, in-process on 127.0.0.1 with a fake registry behind it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
import trio.testing

from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import piece_hash
from p2pd.peers import UPLOADS_HEADER
from p2pd.wire import PROTOCOL_VERSION
from tests.supernode.helpers import (
    BLOB,
    DIGEST,
    LAYOUT,
    PIECE,
    SIZE,
    UPSTREAM,
    FakeRegistry,
    make_blob,
    manifest_of,
    raw_request,
    register_msg,
    running,
)

EVIL = "https://evil.test"


def registry() -> FakeRegistry:
    return FakeRegistry(blobs={str(DIGEST): BLOB})


async def test_register_fetches_once_and_serves_verified_pieces(tmp_path: Path) -> None:
    upstream = registry()
    upstream.token = "Bearer for-team-app"
    async with running(tmp_path, upstream) as h:
        first = await h.register("a", authorization="Bearer for-team-app")
        assert (first.size, first.piece_size, first.digest) == (SIZE, PIECE, DIGEST)
        await h.wait_done()
        for peer in ("b", "c"):
            await h.register(peer)  # later registrants need no credentials of their own
        got = await h.announce("a")
        assert (got.state, got.sealed, got.manifest_start) == ("ready", True, 0)
        manifest = manifest_of(got)
        assert manifest.known == LAYOUT.count
        # Nothing to get from other peers yet: the seeder is the only parent.
        assert [(p.peer_id, p.address) for p in got.parents] == [("supernode", h.advertise)]
        # super-seeding: with three peers the seeder offers each every third piece, dealt in
        # order of arrival ("a" came first); it still serves every piece it holds
        assert got.parents[0].pieces == Bitfield.from_indexes(
            LAYOUT.count, range(0, LAYOUT.count, 3)
        )

        pieces = []
        for index in range(LAYOUT.count):
            r = await h.piece(index)
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/octet-stream"
            assert int(r.headers["content-length"]) == LAYOUT.length(index)
            assert manifest.verify(index, r.content)
            # one piece at a time: the peer may ask for its next one early (UPLOADS_HEADER)
            assert r.headers[UPLOADS_HEADER] == "1"
            pieces.append(r.content)
        assert hashlib.sha256(b"".join(pieces)).digest() == DIGEST.raw
        assert h.supernode.uploads == 0
        head = await h.http.head(f"/pieces/{DIGEST.hex}/2")
        assert (head.status_code, head.headers["content-length"]) == (200, str(SIZE - 2 * PIECE))

    assert h.task().source.authorization is None  # credentials are not kept after the fetch
    gets = upstream.blob_gets()
    assert len(gets) == 1
    assert gets[0].headers["authorization"] == "Bearer for-team-app"
    assert gets[0].url.path == f"/v2/team/app/blobs/{DIGEST}"
    assert (tmp_path / "blobs" / DIGEST.hex).read_bytes() == BLOB


async def test_peers_see_hashes_and_pieces_before_the_seeder_finishes(tmp_path: Path) -> None:
    upstream = registry()
    upstream.hold_after = 2 * PIECE
    async with running(tmp_path, upstream) as h:
        await h.register("a")
        with trio.fail_after(10):
            await upstream.held.wait()  # the registry has sent pieces 0 and 1, no more
            # ... and the seeder has absorbed them (in a worker thread: nothing to wait on)
            while h.task().manifest.known < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        got = await h.announce("a")
        assert (got.state, got.sealed) == ("fetching", False)
        manifest = manifest_of(got)
        assert manifest.known == 2
        assert [p.peer_id for p in got.parents] == ["supernode"]
        # the lone peer is also offered piece 2, cut-through: streamed as it arrives
        assert list(got.parents[0].pieces) == [0, 1, 2]
        r = await h.piece(1)
        assert r.status_code == 200 and manifest.verify(1, r.content)
        streamed: list[httpx.Response] = []

        async def get_piece_2() -> None:
            streamed.append(await h.piece(2))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_piece_2)
            await trio.sleep(0.2)
            assert not streamed  # its bytes are still held by the registry
            upstream.release.set()
        await h.wait_done()
        later = await h.announce("a", (1,), known=2)
        assert (later.state, later.sealed, later.manifest_start) == ("ready", True, 2)
        manifest_of(later, manifest)
        assert manifest.known == 3
        assert streamed[0].status_code == 200 and manifest.verify(2, streamed[0].content)
        r = await h.piece(2)
        assert manifest.verify(2, r.content)


async def test_pieces_past_the_prefix_are_not_held_for_a_swarm(tmp_path: Path) -> None:
    upstream = registry()
    upstream.hold_after = 2 * PIECE
    async with running(tmp_path, upstream) as h:
        await h.register("a")
        await h.register("b")  # two peers: no cut-through (see Scheduler.seeder_progress)
        with trio.fail_after(10):
            await upstream.held.wait()
            while h.task().manifest.known < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        got = await h.announce("a")
        assert all(i < 2 for p in got.parents for i in p.pieces)
        assert (await h.piece(2)).status_code == 404  # not held yet, nor streamed
        upstream.release.set()
        await h.wait_done()


async def test_two_peers_become_each_others_parents(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.register("b")
        await h.wait_done()
        await h.announce("a", (0,))
        b = await h.announce("b", (1,))
        assert "a" in [p.peer_id for p in b.parents]
        a = await h.announce("a")
        by_id = {p.peer_id: p for p in a.parents}
        assert list(by_id["b"].pieces) == [1]
        assert by_id["b"].address == register_msg("b").address

        # Once "a" holds everything, peers cover a newcomer; the seeder, holding the blob with
        # nothing rare left, serves it in full too: it is among the first children still
        # downloading (SchedulerConfig.seeder_elders).
        await h.announce("a", (1, 2))
        c = await h.register("c")
        assert sorted(p.peer_id for p in c.parents) == ["a", "b", "supernode"]
        assert list({p.peer_id: p for p in c.parents}["supernode"].pieces) == [0, 1, 2]


async def test_leave_and_report(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.register("b")
        await h.wait_done()
        await h.announce("b", (0, 1, 2))
        a = await h.announce("a")
        # (the complete seeder too: "a" is among its first children, seeder_elders)
        assert [p.peer_id for p in a.parents] == ["b", "supernode"]

        report = wire.Report(DIGEST, "a", "b", 1, "xxh3 mismatch")
        after = await h.call("/v1/report", report)
        assert "b" not in [p.peer_id for p in after.parents]
        assert h.supernode.tracker.scheduler.is_banned(DIGEST, "b")  # max_blame defaults to 1
        status, error = await h.refused("/v1/report", wire.Report(DIGEST, "a", "b", 3, "bad"))
        assert (status, error.code) == (400, "bad_request") and "out of range" in error.message

        r = await h.post("/v1/leave", wire.Leave(DIGEST, "b"))
        assert r.status_code == 200 and wire.decode(r.content) == wire.Ack()
        status, error = await h.refused("/v1/leave", wire.Leave(DIGEST, "b"))
        assert (status, error.code) == (404, "unknown_peer")
        status, error = await h.refused("/v1/announce", wire.Announce(DIGEST, "b", (), 0, True))
        assert (status, error.code) == (404, "unknown_peer")


async def test_refusals_are_msgpack_errors(tmp_path: Path) -> None:
    other, _ = make_blob(10, seed=99)
    async with running(tmp_path, registry()) as h:
        cases: list[tuple[str, wire.Message | bytes, int, str]] = [
            ("/v1/announce", wire.Announce(other, "a", (), 0, True), 404, "unknown_task"),
            ("/v1/leave", wire.Leave(other, "a"), 404, "unknown_task"),
            ("/v1/register", b"\xc1 not msgpack", 400, "bad_request"),
            (
                "/v1/register",
                msgpack.packb({"v": PROTOCOL_VERSION, "type": "register"}),
                400,
                "bad_request",
            ),
            ("/v1/register", wire.Leave(DIGEST, "a"), 400, "bad_request"),  # wrong type
            ("/v1/register", register_msg("a", upstream=EVIL), 403, "upstream_not_allowed"),
        ]
        for path, body, status, code in cases:
            got_status, error = await h.refused(path, body)
            assert (got_status, error.code) == (status, code), (path, error)
        assert h.supernode.tracker.task(DIGEST) is None  # the 403 started nothing
        assert "evil.test" in error.message

        r = await h.http.get("/v1/register")
        assert (r.status_code, r.headers["allow"]) == (405, "POST")
        assert wire.decode(r.content, expect=wire.Error).code == "method_not_allowed"
        assert (await h.http.get("/nope")).status_code == 404
        assert (await h.http.post("/healthz")).status_code == 405
        r = await h.http.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")

        # Over the message limit: refused from the declared length, before any body is read.
        head = (
            f"POST /v1/register HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {wire.MAX_MESSAGE_SIZE + 1}\r\n\r\n"
        ).encode()
        out = await raw_request(h.port, head)
        status_line, _, rest = out.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 413 "
        body = rest.split(b"\r\n\r\n", 1)[1]
        assert wire.decode(body, expect=wire.Error).code == "too_large"

        # The server is still fine.
        assert (await h.register("a")).state in ("fetching", "ready")
        await h.wait_done()


async def test_shutdown_mid_fetch_leaves_no_partial_file(tmp_path: Path) -> None:
    upstream = registry()
    upstream.hold_after = PIECE
    async with running(tmp_path, upstream) as h:
        await h.register("a")
        with trio.fail_after(10):
            await upstream.held.wait()
        assert len(list((tmp_path / "partial").iterdir())) == 2  # .part and .meta
        task = h.task()
    assert task.done.is_set() and task.partial is None
    assert list((tmp_path / "partial").iterdir()) == []
    assert list((tmp_path / "blobs").iterdir()) == []


async def test_bad_register_and_announce_arguments(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        bad = [
            register_msg("b", size=SIZE + 1),
            register_msg("b", have=Bitfield(LAYOUT.count + 1)),
            register_msg("supernode"),  # the seeder's reserved id
            wire.Announce(DIGEST, "a", (LAYOUT.count,), 0, True),
            wire.Announce(DIGEST, "a", (), LAYOUT.count + 1, True),
        ]
        for msg in bad:
            path = "/v1/register" if isinstance(msg, wire.Register) else "/v1/announce"
            status, error = await h.refused(path, msg)
            assert (status, error.code) == (400, "bad_request"), msg
        status, error = await h.refused("/v1/register", bad[0])
        assert "size mismatch" in error.message
        # Nothing half-applied: "a" still holds nothing.
        assert h.supernode.tracker.scheduler.peer_pieces(DIGEST, "a").is_empty()
        ok = await h.register("b", have=Bitfield.from_indexes(LAYOUT.count, [2]))
        assert ok.size == SIZE
        await h.wait_done()


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (f"/pieces/{DIGEST.hex.upper()}/0", 400),
        (f"/pieces/{DIGEST.hex}/01", 400),
        (f"/pieces/{DIGEST.hex}/-1", 400),
        (f"/pieces/{DIGEST.hex}/3", 400),  # the blob has pieces 0..2
        (f"/pieces/{DIGEST.hex}/99999999999999999999", 400),
        (f"/pieces/{DIGEST.hex}/0/..", 400),
        (f"/pieces/{DIGEST.hex}%2F0", 400),
        (f"/pieces/..%2F..%2Fblobs%2F{DIGEST.hex}/0", 400),
        (f"/pieces/../blobs/{DIGEST.hex}", 400),
        (f"/pieces/sha256:{DIGEST.hex}/0", 400),
        (f"/pieces/{DIGEST.hex[:-1]}/0", 400),
        (f"/pieces/{make_blob(1, seed=5)[0].hex}/0", 404),  # well-formed, unknown task
        (f"/pieces/{DIGEST.hex}/0", 200),
    ],
)
async def test_piece_paths(tmp_path: Path, target: str, status: int) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.wait_done()
        out = await raw_request(
            h.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert out.startswith(f"HTTP/1.1 {status} ".encode()), out[:200]
        if status == 200:
            assert out.endswith(BLOB[:PIECE])
        r = await h.http.post(f"/pieces/{DIGEST.hex}/0")
        assert r.status_code == 405


async def test_silent_peers_expire(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with running(tmp_path, registry(), scheduler={"peer_ttl": 10}) as h:
        tracker = h.supernode.tracker
        await h.register("a")
        await h.register("b")
        await h.wait_done()
        mock_clock.jump(6)
        await h.announce("a")
        mock_clock.jump(5)  # b silent for 11 s, a for 5 s
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.scheduler.peers(DIGEST) == ["a"]
        status, error = await h.refused("/v1/announce", wire.Announce(DIGEST, "b", (), 0, True))
        assert (status, error.code) == (404, "unknown_peer")
        assert (await h.announce("a")).state == "ready"
        mock_clock.jump(10.5)
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.scheduler.peers(DIGEST) == []
        assert tracker.scheduler.stats()["expired"] == 2
        # The loop waits for the next peer instead of spinning, and expires it too.
        await h.register("c")
        mock_clock.jump(11)
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.scheduler.peers(DIGEST) == []


async def test_restart_serves_the_stored_blob_without_the_registry(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.wait_done()
    empty = FakeRegistry()  # knows no blobs: anything asked of it would fail
    async with running(tmp_path, empty) as h:
        await h.register("a")
        task = await h.wait_done()
        assert task.failure is None
        got = await h.announce("a")
        assert (got.state, got.sealed) == ("ready", True)
        manifest = manifest_of(got)
        for index in range(LAYOUT.count):
            assert manifest.verify(index, (await h.piece(index)).content)
    assert empty.requests == []


async def test_restart_refetches_a_corrupted_stored_blob(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.wait_done()
    stored = tmp_path / "blobs" / DIGEST.hex
    stored.write_bytes(b"\0" * SIZE)
    upstream = registry()
    async with running(tmp_path, upstream) as h:
        await h.register("a")
        await h.wait_done()
        got = await h.announce("a")
        assert got.state == "ready"
        assert manifest_of(got).hash_of(0) == piece_hash(BLOB[:PIECE])
    assert len(upstream.blob_gets()) == 1
    assert stored.read_bytes() == BLOB


async def test_quota_evicts_idle_blobs_only(tmp_path: Path) -> None:
    other_digest, other = make_blob(SIZE, seed=8)
    third_digest, third = make_blob(SIZE, seed=9)
    blobs = {str(DIGEST): BLOB, str(other_digest): other, str(third_digest): third}
    upstream = FakeRegistry(blobs=blobs)
    async with running(tmp_path, upstream, quota_bytes=SIZE * 3 // 2) as h:
        await h.register("a")
        await h.wait_done()
        r = await h.post("/v1/leave", wire.Leave(DIGEST, "a"))
        assert r.status_code == 200
        # DIGEST has no peers left: fetching another blob evicts it.
        await h.register("b", digest=other_digest)
        await h.wait_done(other_digest)
        assert h.supernode.tracker.task(DIGEST) is None
        assert not (tmp_path / "blobs" / DIGEST.hex).exists()
        # other_digest still has peer "b": a third blob cannot evict it and fails for room.
        got = await h.register("c", digest=third_digest)
        task = await h.wait_done(third_digest)
        assert task.failure is not None and "storage" in str(task.failure)
        assert (await h.announce("c", digest=third_digest)).state == "failed"
        assert (tmp_path / "blobs" / other_digest.hex).exists()
        assert got.size == SIZE


async def test_seeding_peers_do_not_pin_a_blob_in_the_quota(tmp_path: Path) -> None:
    """After a rollout peers seed for minutes; their blobs may still be evicted for the next
    image. The task stays and its peers serve it; a newcomer that needs pieces no peer holds
    any more makes the supernode fetch the blob again."""
    other_digest, other = make_blob(SIZE, seed=8)
    upstream = FakeRegistry(blobs={str(DIGEST): BLOB, str(other_digest): other})
    every = tuple(range(LAYOUT.count))
    async with running(tmp_path, upstream, quota_bytes=SIZE * 3 // 2) as h:
        await h.register("a")
        await h.wait_done()
        await h.announce("a", every)  # "a" is complete and seeds DIGEST
        await h.register("b", digest=other_digest)  # no room unless DIGEST goes
        task = await h.wait_done(other_digest)
        assert task.failure is None
        assert not (tmp_path / "blobs" / DIGEST.hex).exists()
        row = {t["digest"]: t for t in h.supernode.tracker.status()["tasks"]}[str(DIGEST)]
        assert (row["state"], row["evicted"], row["peers"]) == ("ready", True, 1)
        assert (await h.piece(0)).status_code == 404
        # the seeding peer still talks to its task, and a newcomer is sent to it, not to us
        assert (await h.announce("a")).state == "ready"
        newcomer = await h.register("n")
        assert [p.peer_id for p in newcomer.parents] == ["a"]
        assert manifest_of(newcomer).known == LAYOUT.count  # hashes to verify a's pieces
        assert len([r for r in upstream.blob_gets() if DIGEST.hex in str(r.url)]) == 1
        # "a" registering again has lost its copy, and "n" has nothing yet: nobody covers the
        # blob, so it is fetched again -- making room by evicting other_digest, which "b" now
        # seeds (and so keeps serving).
        await h.announce("b", every, digest=other_digest)
        assert (await h.register("a")).state == "fetching"
        refetched = await h.wait_done()
        assert refetched.failure is None
        assert (await h.piece(0)).content == BLOB[:PIECE]
        assert len([r for r in upstream.blob_gets() if DIGEST.hex in str(r.url)]) == 2
        rows = {t["digest"]: t for t in h.supernode.tracker.status()["tasks"]}
        assert rows[str(DIGEST)]["evicted"] is False and rows[str(other_digest)]["evicted"]
        assert (await h.announce("b", digest=other_digest)).state == "ready"


async def test_zero_byte_blob(tmp_path: Path) -> None:
    digest, data = make_blob(0)
    async with running(tmp_path, FakeRegistry(blobs={str(digest): data})) as h:
        first = await h.register("a", digest=digest, size=0)
        assert first.layout == PieceLayout(0, PIECE)
        await h.wait_done(digest)
        got = await h.announce("a", digest=digest)
        assert (got.state, got.sealed, got.hashes, got.parents) == ("ready", True, b"", ())
        r = await h.piece(0, digest)
        assert r.status_code == 400


async def test_upstream_allowlist_is_normalised(tmp_path: Path) -> None:
    upstream = registry()
    async with running(tmp_path, upstream) as h:
        got = await h.register("a", upstream="https://Registry.TEST:443/")
        assert got.size == SIZE
        await h.wait_done()
    [get] = upstream.blob_gets()
    assert str(get.url) == f"{UPSTREAM}/v2/team/app/blobs/{DIGEST}"


async def test_the_registry_is_read_while_a_piece_is_being_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a piece (in a worker thread; its bytes are written as they arrive) must not
    pause the registry download (storing it did, issue 5)."""
    import threading

    from p2pd.core.manifest import ManifestBuilder

    unblock = threading.Event()
    original = ManifestBuilder.feed
    calls = []

    def slow_feed(self: ManifestBuilder, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            unblock.wait(10)
        return original(self, data)

    monkeypatch.setattr(ManifestBuilder, "feed", slow_feed)
    upstream = registry()
    upstream.hold_after = 2 * PIECE
    async with running(tmp_path, upstream) as h:
        await h.register("a")
        try:
            with trio.fail_after(10):
                await upstream.held.wait()  # two pieces read while piece 0 is still stored
            assert h.task().manifest.known == 0
        finally:
            unblock.set()
            upstream.release.set()
        task = await h.wait_done()
        assert task.failure is None and task.manifest.known == LAYOUT.count
        assert (await h.piece(0)).content == BLOB[:PIECE]


async def test_replies_pace_downloading_peers_to_the_control_rate(tmp_path: Path) -> None:
    async with running(tmp_path, registry(), scheduler={"control_rate": 4.0}) as h:
        a = await h.register("a")
        assert a.pace_ms == 250  # one downloading peer, 4 messages/s
        b = await h.register("b")
        assert b.pace_ms == 500
        assert h.supernode.counters()["pace"] == 0.5  # what /metrics shows operators
        await h.wait_done()
        done = await h.announce("a", tuple(range(a.layout.count)))
        assert done.pace_ms == 250  # "a" holds everything: only "b" still calls


async def test_a_supernode_cuts_blobs_by_its_own_rule_and_refuses_pieces_cut_otherwise(
    tmp_path: Path,
) -> None:
    small = PieceLayout(SIZE, 64 * 1024)
    assert small != LAYOUT  # the rule's
    async with running(
        tmp_path, registry(), layout_rule=lambda size: PieceLayout(size, 65536)
    ) as h:
        first = await h.register("a")
        assert (first.size, first.piece_size) == (SIZE, 65536)
        await h.wait_done()
        manifest = manifest_of(await h.announce("a"))
        assert manifest.known == small.count
        status = (await h.http.get("/status")).json()["tasks"]
        assert [(t["pieces"], t["piece_size"]) for t in status] == [(small.count, 65536)]
        path = f"/pieces/{DIGEST.hex}/{small.count - 1}"
        for named in ({"x-p2p-piece-size": "65536"}, {}):
            r = await h.http.get(path, headers=named)
            assert r.status_code == 200 and manifest.verify(small.count - 1, r.content)
        r = await h.http.get(path, headers={"x-p2p-piece-size": str(PIECE)})
        assert r.status_code == 409
        assert "cut in 65536-byte pieces here, not 262144" in r.text
        r = await h.http.get(path, headers={"x-p2p-piece-size": "lots"})
        assert r.status_code == 400
