"""The piece path: the piece server (sendfile) and the strict recv_into client."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path

import h11
import httpx
import pytest
import trio

from p2pd import peers
from p2pd.blobs import BlobManager, Download
from p2pd.clusterauth import ClusterAuth
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import SMALLEST_PIECE_SIZE, PieceLayout
from p2pd.http.server import FileRegion, Request, ServerLimits, bound_port, serve
from p2pd.peers import (
    BODY_LOWAT,
    HAVE_HEADER,
    UPLOADS_HEADER,
    WATCH_SECONDS,
    PieceClient,
    PieceFetchError,
    PieceServer,
    RateLimiter,
    _Conn,
    decode_have,
    set_lowat,
)
from p2pd.store import BlobStore

SIZE = 2 * SMALLEST_PIECE_SIZE + 1000


def put_complete(store: BlobStore, data: bytes) -> Digest:
    digest = Digest.from_bytes(hashlib.sha256(data).digest())
    layout = PieceLayout.for_size(len(data))
    part = store.open_partial(digest, layout)
    for i in range(layout.count):
        off, n = layout.span(i)
        part.write_piece(i, data[off : off + n])
    part.commit()
    part.close()
    return digest


async def start_server(
    nursery: trio.Nursery, tmp_path: Path, limits: ServerLimits | None = None
) -> tuple[str, Digest, bytes]:
    return await start_server_with(nursery, tmp_path, limits)


async def start_server_with(
    nursery: trio.Nursery,
    tmp_path: Path,
    limits: ServerLimits | None = None,
    auth: ClusterAuth | None = None,
) -> tuple[str, Digest, bytes]:
    data = random.Random(1).randbytes(SIZE)
    store = BlobStore(tmp_path)
    digest = put_complete(store, data)
    server = PieceServer(BlobManager(store, nursery, []), upload_slots=2, auth=auth)
    listeners = await nursery.start(
        lambda task_status: serve(
            server.handle, "127.0.0.1", 0, limits=limits, task_status=task_status
        )
    )
    return f"127.0.0.1:{bound_port(listeners)}", digest, data


async def test_fetch_pieces_over_one_kept_alive_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address, digest, data = await start_server(nursery, tmp_path)
    client = PieceClient()
    layout = PieceLayout.for_size(SIZE)
    for index in (2, 0, 1):
        off, n = layout.span(index)
        buf = bytearray(n)
        await client.fetch(address, digest, index, memoryview(buf))
        assert buf == data[off : off + n]
    assert len(client._idle[address]) == 1  # the same connection served all three
    assert client.bytes_received == SIZE
    await client.aclose()


async def test_fetch_errors(nursery: trio.Nursery, tmp_path: Path) -> None:
    address, digest, _ = await start_server(nursery, tmp_path)
    client = PieceClient()
    other = Digest("ab" * 32)
    with pytest.raises(PieceFetchError) as info:
        await client.fetch(address, other, 0, memoryview(bytearray(10)))
    assert info.value.not_found
    with pytest.raises(PieceFetchError, match="want 10"):
        await client.fetch(address, digest, 2, memoryview(bytearray(10)))
    with pytest.raises(PieceFetchError, match="answered 400"):
        await client.fetch(address, digest, 3, memoryview(bytearray(10)))
    with pytest.raises(PieceFetchError, match="cannot connect"):
        await client.fetch("127.0.0.1:1", digest, 0, memoryview(bytearray(10)))
    await client.aclose()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/pieces/" + "AB" * 32 + "/0", 400),
        ("/pieces/" + "ab" * 32 + "/01", 400),
        ("/pieces/" + "ab" * 32 + "/-1", 400),
        ("/pieces/%2e%2e/%2e%2e/etc/passwd/0", 400),
        ("/pieces/../../etc/passwd/0", 404),  # httpx folds the dots: /etc/passwd/0
        ("/pieces/" + "ab" * 32 + "/0/extra", 400),
        ("/other", 404),
        ("/pieces/" + "ab" * 32 + "/0", 404),
    ],
)
async def test_hostile_paths(nursery: trio.Nursery, tmp_path: Path, path: str, status: int) -> None:
    address, _, _ = await start_server(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=f"http://{address}") as client:
        assert (await client.get(path)).status_code == status
        assert (await client.get("/healthz")).status_code == 200


async def test_rate_limiter_paces_transfers(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1_000_000, burst=100_000)
    start = trio.current_time()
    for _ in range(10):
        await limiter.consume(100_000)
    # 1 MB at 1 MB/s, less the initial burst
    assert trio.current_time() - start == pytest.approx(0.9, abs=0.01)


async def test_a_pooled_connection_the_server_closed_is_retried_fresh(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address, digest, data = await start_server(nursery, tmp_path, ServerLimits(head_timeout=0.1))
    client = PieceClient(idle_seconds=60)  # keep it longer than the server does
    buf = bytearray(PieceLayout.for_size(SIZE).length(2))
    await client.fetch(address, digest, 2, memoryview(buf))
    await trio.sleep(0.3)  # the server has dropped the idle connection by now
    buf[:] = bytes(len(buf))
    await client.fetch(address, digest, 2, memoryview(buf))
    assert buf == data[2 * SMALLEST_PIECE_SIZE :]
    await client.aclose()


async def test_busy_and_missing_are_told_apart(nursery: trio.Nursery, tmp_path: Path) -> None:
    address, digest, _ = await start_server(nursery, tmp_path)
    client = PieceClient()
    with pytest.raises(PieceFetchError) as info:
        await client.fetch(address, Digest("cd" * 32), 0, memoryview(bytearray(1)))
    assert info.value.not_found and not info.value.busy and not info.value.unreachable
    with pytest.raises(PieceFetchError) as info:
        await client.fetch("127.0.0.1:1", digest, 0, memoryview(bytearray(1)))
    assert info.value.unreachable
    await client.aclose()


async def trickle_server(
    nursery: trio.Nursery,
    body: bytes,
    chunk: int = 1000,
    pause: float = 0.0005,
    extra_head: bytes = b"",
) -> str:
    """A parent that answers a piece request with `body`, sent `chunk` bytes at a time with a
    pause between (a link slower than the reader), then the next request on the same
    connection with a short 404."""

    async def handle(stream: trio.SocketStream) -> None:
        buffered = b""
        for number in itertools.count():
            while b"\r\n\r\n" not in buffered:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffered += data
            buffered = buffered.partition(b"\r\n\r\n")[2]
            if number > 0:
                await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno\n")
                continue
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra_head)
            await stream.send_all(head)
            for start in range(0, len(body), chunk):
                await stream.send_all(body[start : start + chunk])
                await trio.sleep(pause)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"127.0.0.1:{bound_port(listeners)}"


async def test_a_slow_body_is_read_in_few_large_reads(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body trickling in 1000-byte packets: SO_RCVLOWAT wakes the reader once per
    BODY_LOWAT bytes, not per packet; the tail (less than BODY_LOWAT) still arrives, and the
    kept-alive connection then reads a short response (a 404) without waiting for more
    bytes than it has."""
    length = 2 * BODY_LOWAT + 12_345  # the last read wants less than BODY_LOWAT
    body = random.Random(2).randbytes(length)
    address = await trickle_server(nursery, body)
    reads: list[int] = []
    lowats: list[int] = []  # the low-water mark each read was asked with
    receive_into = _Conn.receive_into

    async def counting(self: _Conn, view: memoryview, drained: bool = False) -> int:
        n = await receive_into(self, view, drained=drained)
        reads.append(n)
        lowats.append(self.lowat)
        return n

    monkeypatch.setattr(_Conn, "receive_into", counting)
    client = PieceClient()
    digest = Digest("ab" * 32)
    buf = bytearray(length)
    with trio.fail_after(30):  # a wait for bytes that never come would hang here
        await client.fetch(address, digest, 0, memoryview(buf))
        assert buf == body
        # ~700 packets; a read per wake-up, each with at least the mark it waited for
        # (trying a read before waiting brought a short one after every wake-up)
        assert len(reads) <= length // min(lowats) + 1, reads
        assert all(n >= lowat for n, lowat in zip(reads, lowats, strict=True)), reads
        with pytest.raises(PieceFetchError) as info:
            await client.fetch(address, digest, 1, memoryview(buf))
        assert info.value.not_found
    await client.aclose()


async def test_the_low_water_mark_stays_under_a_quarter_of_the_receive_buffer() -> None:
    """Linux clamps the receive window to a mark near the buffer's size; the mark asked for
    is cut to a quarter of the buffer, and 1 (the default) is always allowed."""
    sock = trio.socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # Linux doubles it
        assert set_lowat(sock, BODY_LOWAT, 1) == buffer // 4 < BODY_LOWAT
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == buffer // 4
        assert set_lowat(sock, 1000, buffer // 4) == 1000
        assert set_lowat(sock, 1, 1000) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    finally:
        sock.close()


async def test_nearly_done_comes_once_shortly_before_the_last_bytes(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next request to a parent should reach it while this body still fills its link:
    `nearly_done` fires once, when the rest is due within the lead at the rate measured so
    far -- not at the first read (a slow link would then carry two bodies at once), not
    only at the end (the parent would idle a round trip)."""
    length = 3_000_000  # ~10 MB/s below: about 0.3 s, a read per BODY_LOWAT
    body = random.Random(3).randbytes(length)
    address = await trickle_server(nursery, body, chunk=32 * 1024, pause=0.003)
    received = 0
    receive_into = _Conn.receive_into

    async def counting(self: _Conn, view: memoryview, drained: bool = False) -> int:
        nonlocal received
        n = await receive_into(self, view, drained=drained)
        received += n
        return n

    monkeypatch.setattr(_Conn, "receive_into", counting)
    calls: list[int] = []
    client = PieceClient(lead_seconds=0.05)
    buf = bytearray(length)
    with trio.fail_after(30):
        await client.fetch(
            address, Digest("ab" * 32), 0, memoryview(buf), lambda: calls.append(received)
        )
    assert buf == body
    assert len(calls) == 1
    assert length // 2 <= calls[0] < length, calls
    await client.aclose()


@pytest.mark.parametrize(("uploads", "early"), [(b"1", True), (b"2", False), (b"17", False)])
async def test_nearly_done_is_early_only_for_a_parent_that_serves_no_one_else(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, uploads: bytes, early: bool
) -> None:
    """A parent busy with other children fills its upload while our next request travels:
    asking early there would only split its upload further (UPLOADS_HEADER)."""
    length = 3_000_000
    body = random.Random(4).randbytes(length)
    head = b"%s: %s\r\n" % (UPLOADS_HEADER.encode(), uploads)
    address = await trickle_server(nursery, body, 32 * 1024, 0.003, extra_head=head)
    calls: list[str] = []
    reads_after = 0  # body reads after `nearly_done`: none when it came at the end
    receive_into = _Conn.receive_into

    async def counting(self: _Conn, view: memoryview, drained: bool = False) -> int:
        nonlocal reads_after
        reads_after += bool(calls)
        return await receive_into(self, view, drained=drained)

    monkeypatch.setattr(_Conn, "receive_into", counting)
    client = PieceClient(lead_seconds=0.05)
    buf = bytearray(length)
    with trio.fail_after(30):
        await client.fetch(
            address, Digest("ab" * 32), 0, memoryview(buf), lambda: calls.append("x")
        )
    assert buf == body and len(calls) == 1
    assert (reads_after > 0) is early, reads_after
    await client.aclose()


def get(target: str) -> Request:
    event = h11.Request(method="GET", target=target, headers=[("host", "test")])

    async def no_body() -> h11.Event:
        raise AssertionError("a GET has no body to read")

    return Request(event, h11.Connection(h11.SERVER), no_body, "test")


async def test_a_piece_response_counts_the_uploads_under_way(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        store = BlobStore(tmp_path)
        digest = put_complete(store, random.Random(1).randbytes(SIZE))
        server = PieceServer(BlobManager(store, nursery, []), upload_slots=2)
        first = await server.handle(get(f"/pieces/{digest.hex}/0"))
        second = await server.handle(get(f"/pieces/{digest.hex}/1"))
        assert (dict(first.headers)[UPLOADS_HEADER], dict(second.headers)[UPLOADS_HEADER]) == (
            "1",
            "2",
        )
        for response in (first, second):
            assert isinstance(response.body, FileRegion) and response.body.on_done is not None
            response.body.on_done()  # sent
        assert server.busy == 0
        nursery.cancel_scope.cancel()


async def test_a_malformed_uploads_header_is_a_protocol_error(nursery: trio.Nursery) -> None:
    head = b"%s: many\r\n" % UPLOADS_HEADER.encode()
    address = await trickle_server(nursery, b"x" * 10, extra_head=head)
    client = PieceClient()
    with pytest.raises(PieceFetchError, match=UPLOADS_HEADER):
        await client.fetch(address, Digest("ab" * 32), 0, memoryview(bytearray(10)))
    await client.aclose()


async def test_fetch_returns_what_the_parent_says_it_holds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address, digest, _ = await start_server(nursery, tmp_path)
    layout = PieceLayout.for_size(SIZE)
    client = PieceClient()
    have = await client.fetch(address, digest, 1, memoryview(bytearray(layout.length(1))))
    assert have is not None and decode_have(have, layout.count) == Bitfield.full(layout.count)
    await client.aclose()


@pytest.mark.parametrize("value", [b"not base64!", b"AAAA", b"/w=="])
async def test_an_unreadable_have_header_is_ignored_not_an_error(
    nursery: trio.Nursery, value: bytes
) -> None:
    # advice only (the piece is judged by its hash): not base64, another length, bits past
    # the end -- the piece is delivered and the header names nothing
    head = b"%s: %s\r\n" % (HAVE_HEADER.encode(), value)
    address = await trickle_server(nursery, b"x" * 10, extra_head=head)
    client = PieceClient()
    buf = bytearray(10)
    have = await client.fetch(address, Digest("ab" * 32), 0, memoryview(buf))
    assert buf == b"x" * 10 and have == value
    assert decode_have(have, 3) is None
    await client.aclose()


async def start_watchable(
    nursery: trio.Nursery, tmp_path: Path, auth: ClusterAuth | None = None
) -> tuple[str, PieceServer, Download, Digest]:
    """A piece server holding one complete blob and one download in progress (nothing
    written yet): its address, the server, the download and the complete blob's digest."""
    store = BlobStore(tmp_path)
    complete = put_complete(store, random.Random(1).randbytes(SIZE))
    manager = BlobManager(store, nursery, [])
    digest = Digest("ef" * 32)
    download = Download(digest, store.open_partial(digest, PieceLayout.for_size(SIZE)))
    manager.downloads[digest] = download
    server = PieceServer(manager, upload_slots=2, auth=auth, max_watching=1)
    listeners = await nursery.start(
        lambda task_status: serve(server.handle, "127.0.0.1", 0, task_status=task_status)
    )
    return f"127.0.0.1:{bound_port(listeners)}", server, download, complete


async def test_a_watch_is_answered_once_the_parent_holds_more_than_the_child_knows(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address, server, download, complete = await start_watchable(nursery, tmp_path)
    client = PieceClient()
    count = download.layout.count
    answers: list[Bitfield | None] = []

    async def watch(known: int) -> None:
        value = await client.watch(address, download.digest, known)
        answers.append(None if value is None else decode_have(value, count))

    with trio.fail_after(WATCH_SECONDS / 2):
        nursery.start_soon(watch, 0)
        await wait_until(lambda: server.watching == 1)
        assert answers == []  # nothing held yet: it waits
        download.mark_written(2, "test")
        await wait_until(lambda: answers != [])
        assert answers == [Bitfield.from_indexes(count, [2])] and server.watching == 0
        # knowing less than it holds: answered at once
        await watch(0)
        assert answers[-1] == Bitfield.from_indexes(count, [2])
        # a complete blob: everything, at once
        value = await client.watch(address, complete, 10**6)
        assert value is not None and decode_have(value, count) == Bitfield.full(count)
    await client.aclose()


async def test_a_watch_is_answered_after_watch_seconds_with_what_is_held(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers, "WATCH_SECONDS", 0.2)
    address, server, download, _ = await start_watchable(nursery, tmp_path)
    client = PieceClient()
    with trio.fail_after(5):
        value = await client.watch(address, download.digest, 0)
    assert value is not None and decode_have(value, download.layout.count) == Bitfield(
        download.layout.count
    )
    assert server.watching == 0
    await client.aclose()


async def test_watches_that_cannot_be_answered_are_refused_clearly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    auth = ClusterAuth(b"s" * 32)
    address, server, download, _ = await start_watchable(nursery, tmp_path, auth)
    client = PieceClient(auth=auth)
    with trio.fail_after(WATCH_SECONDS / 2):
        with pytest.raises(PieceFetchError, match="watch answered 404"):
            await client.watch(address, Digest("ab" * 32), 0)  # not on this host
        with pytest.raises(PieceFetchError, match="watch answered 401"):
            await PieceClient().watch(address, download.digest, 0)  # unsigned
        nursery.start_soon(client.watch, address, download.digest, 0)
        await wait_until(lambda: server.watching == 1)
        with pytest.raises(PieceFetchError, match="watch answered 503"):  # max_watching 1
            await PieceClient(auth=auth).watch(address, download.digest, 0)
        async with await trio.open_tcp_stream("127.0.0.1", int(address.rpartition(":")[2])) as s:
            await s.send_all(
                f"GET /have/{download.digest.hex} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            answer = await s.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"want one x-p2p-known" in answer
        download.mark_written(0, "test")  # frees the watch
        await wait_until(lambda: server.watching == 0)
    await client.aclose()


async def wait_until(condition: Callable[[], bool]) -> None:
    """(The server's counters have no event to wait on.)"""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def test_nearly_done_comes_at_the_end_of_a_short_body_and_never_on_an_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    address, digest, data = await start_server(nursery, tmp_path)
    client = PieceClient(lead_seconds=0.0)  # never early
    layout = PieceLayout.for_size(SIZE)
    calls: list[int] = []
    off, n = layout.span(2)
    buf = bytearray(n)
    await client.fetch(address, digest, 2, memoryview(buf), lambda: calls.append(2))
    assert calls == [2] and buf == data[off : off + n]
    with pytest.raises(PieceFetchError):
        await client.fetch(
            address, Digest("cd" * 32), 0, memoryview(bytearray(1)), lambda: calls.append(0)
        )
    assert calls == [2]
    await client.aclose()


async def test_an_upload_cancelled_in_the_limiters_wait_frees_its_slot_and_fd(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        store = BlobStore(tmp_path)
        digest = put_complete(store, random.Random(1).randbytes(SIZE))
        server = PieceServer(
            BlobManager(store, nursery, []), upload_slots=2, limiter=RateLimiter(1000, burst=1)
        )
        fd, _, length, _ = server.check("GET", f"/pieces/{digest.hex}/0", digest.hex, 0, None)
        with trio.move_on_after(0.05):
            await server.start_upload(fd, length)  # ~35 min at 1000 bytes/s
        assert server.busy == 0
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
        store.close_readers()
        nursery.cancel_scope.cancel()
