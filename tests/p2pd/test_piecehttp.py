"""p2pd's lean HTTP path for piece GETs (`p2pd.piecehttp`): what it accepts, what it hands to
the general server, that its answers are the general server's byte for byte, and how it
treats pipelined, slow and vanishing clients -- against real sockets on 127.0.0.1."""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pd import piecehttp
from p2pd.blobs import BlobManager
from p2pd.clusterauth import ClusterAuth
from p2pd.config import P2pdConfig
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import SMALLEST_PIECE_SIZE, PieceLayout
from p2pd.daemon import Running, run_daemon
from p2pd.http.server import Request, Response, ServerLimits, bound_port, serve
from p2pd.peers import (
    HAVE_HEADER,
    PieceClient,
    PieceFetchError,
    PieceServer,
    decode_have,
    encode_have,
)
from p2pd.store import BlobStore
from tests.test_peers import SIZE, put_complete

SECRET = b"0123456789abcdef0123"


@dataclass
class Setup:
    server: PieceServer
    digest: Digest
    data: bytes
    lean: int  # port of the lean path (general server behind it)
    general: int  # port of the general server alone
    handed: list[str]  # targets the lean path's connections handed to the general server


async def start(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    auth: ClusterAuth | None = None,
    limits: ServerLimits | None = None,
) -> Setup:
    data = random.Random(1).randbytes(SIZE)
    store = BlobStore(tmp_path)
    digest = put_complete(store, data)
    server = PieceServer(BlobManager(store, nursery, []), upload_slots=2, auth=auth)
    limits = limits or ServerLimits()
    general = await nursery.start(
        functools.partial(serve, server.handle, "127.0.0.1", 0, limits=limits)
    )
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    handed: list[str] = []

    async def fallback(request: Request) -> Response:
        handed.append(request.target)
        return await server.handle(request)

    async def on_connection(stream: trio.SocketStream) -> None:
        await piecehttp.serve_connection(stream, server, fallback, limits)

    nursery.start_soon(trio.serve_listeners, on_connection, listeners)
    return Setup(server, digest, data, bound_port(listeners), bound_port(general), handed)


class Conn:
    """A raw client connection that reads whole responses (by Content-Length)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.carry = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self, *, head_only: bool = False) -> bytes:
        """The next whole response, head and body (none with `head_only`), as it came."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.carry:
                chunk = await self.stream.receive_some(1 << 20)
                assert chunk, f"closed mid-head: {self.carry!r}"
                self.carry += chunk
            end = self.carry.index(b"\r\n\r\n") + 4
            length = 0
            for line in self.carry[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length" and not head_only:
                    length = int(value)
            while len(self.carry) < end + length:
                chunk = await self.stream.receive_some(1 << 20)
                assert chunk, "closed mid-body"
                self.carry += chunk
            whole, self.carry = self.carry[: end + length], self.carry[end + length :]
            return whole

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF) within a few seconds."""
        with trio.move_on_after(5):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return True
                if not chunk:
                    return True
        return False


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Conn]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield Conn(stream)


def get(target: str, *extra: str, method: str = "GET") -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return f"{method} {target} HTTP/1.1\r\nHost: peer\r\n{headers}\r\n".encode()


def piece(digest: Digest | str, index: int) -> str:
    hex_ = digest.hex if isinstance(digest, Digest) else digest
    return f"/pieces/{hex_}/{index}"


# -- recognising a piece request --------------------------------------------------------------


def test_plain_piece_gets_are_recognised() -> None:
    head = piecehttp.parse_head(get(piece("ab" * 32, 7)).partition(b"\r\n\r\n")[0])
    assert head is not None
    assert (head.target, head.digest, head.index, head.auth, head.close) == (
        piece("ab" * 32, 7),
        "ab" * 32,
        7,
        None,
        False,
    )
    head = piecehttp.parse_head(
        b"GET /pieces/" + b"cd" * 32 + b"/0 HTTP/1.1\r\nhOsT:x\r\nX-P2P-Auth:  12.ab \r\n"
        b"Connection: keep-alive, Close\r\nUser-Agent: a b\tc"
    )
    assert head is not None
    assert (head.index, head.auth, head.close, head.piece_size) == (0, "12.ab", True, None)
    head = piecehttp.parse_head(
        get(piece("ab" * 32, 3), "X-P2P-Piece-Size:  65536 ").partition(b"\r\n\r\n")[0]
    )
    assert head is not None and (head.index, head.piece_size) == (3, 65536)


@pytest.mark.parametrize(
    "head",
    [
        b"HEAD /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x",
        b"POST /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x",
        b"GET /pieces/" + b"ab" * 32 + b"/0?x=1 HTTP/1.1\r\nHost: x",
        b"GET /pieces/" + b"AB" * 32 + b"/0 HTTP/1.1\r\nHost: x",
        b"GET /pieces/" + b"ab" * 32 + b"/01 HTTP/1.1\r\nHost: x",
        b"GET /pieces/" + b"ab" * 32 + b"/1234567890 HTTP/1.1\r\nHost: x",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.0\r\nHost: x",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nHost: y",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 0",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nUpgrade: h2c",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nx-p2p-auth: 1\r\nX-P2P-Auth: 2",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nBad Name: y",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nx-p2p-piece-size: 0x10",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nx-p2p-piece-size: 065536",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nx-p2p-piece-size: 12345678901",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nx-p2p-piece-size:",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\n"
        b"x-p2p-piece-size: 65536\r\nX-P2P-Piece-Size: 65536",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: \xff",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\n Host: x",
        b"GET /stats HTTP/1.1\r\nHost: x",
    ],
)
def test_anything_else_goes_to_the_general_server(head: bytes) -> None:
    assert piecehttp.parse_head(head) is None


# -- answers ----------------------------------------------------------------------------------


async def exchange(port: int, requests: list[bytes]) -> list[bytes]:
    async with connect(port) as conn:
        out = []
        for request in requests:
            await conn.send(request)
            out.append(await conn.response())
        return out


async def test_lean_and_general_answers_are_the_same_bytes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    layout = PieceLayout.for_size(SIZE)
    requests = [
        get(piece(s.digest, 0)),
        get(piece(s.digest, layout.count - 1)),  # the short last piece
        get(piece(s.digest, layout.count)),  # 400: past the end
        get(piece("cd" * 32, 0)),  # 404: not on this host
        get(piece(s.digest, 1), "User-Agent: test", "Accept: */*"),
    ]
    lean = await exchange(s.lean, requests)
    general = await exchange(s.general, requests)
    assert lean == general
    assert s.handed == []  # all of them answered on the lean path
    off, n = layout.span(layout.count - 1)
    assert lean[1].endswith(s.data[off : off + n])
    assert b"x-p2p-uploads: 1\r\n" in lean[0]
    assert [r.split(b" ", 2)[1] for r in lean] == [b"200", b"200", b"400", b"404", b"200"]
    # busy: 503 with its retry-after, the same bytes again (once the uploads above have
    # given their slots back: the server may finish one after the client has read it all)
    await trio.testing.wait_all_tasks_blocked()
    assert s.server.busy == 0
    s.server.busy = s.server.slots
    busy = [get(piece(s.digest, 0))]
    assert (await exchange(s.lean, busy)) == (await exchange(s.general, busy))
    assert (await exchange(s.lean, busy))[0].startswith(b"HTTP/1.1 503 \r\n")
    s.server.busy = 0
    assert s.server.bytes_served == 2 * (2 * SMALLEST_PIECE_SIZE + (SIZE - 2 * SMALLEST_PIECE_SIZE))


async def test_connection_close_is_honoured_with_the_same_head(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    for request in (
        get(piece(s.digest, 2), "Connection: close"),
        get(piece("cd" * 32, 0), "Connection: keep-alive, close"),
    ):
        answers = []
        for port in (s.lean, s.general):
            async with connect(port) as conn:
                await conn.send(request)
                answers.append(await conn.response())
                assert await conn.closed()
        assert answers[0] == answers[1]
        assert b"\r\nConnection: close\r\n" in answers[0]
    assert s.handed == []


async def test_cluster_auth_is_checked_on_the_lean_path(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    auth = ClusterAuth(SECRET)
    s = await start(nursery, tmp_path, auth=auth)
    target = piece(s.digest, 0)
    signed = get(target, f"X-P2P-Auth: {auth.sign('GET', target)}")
    other = ClusterAuth(b"another secret of 16+ bytes").sign("GET", target)
    requests = [
        get(target),  # 401: missing
        get(target, f"X-P2P-Auth: {other}"),  # 401: bad
        get(target, f"X-P2P-Auth: {auth.sign('GET', piece(s.digest, 1))}"),  # 401: another
        signed,
    ]
    lean = await exchange(s.lean, requests)
    assert lean == await exchange(s.general, requests)
    assert [r.split(b" ", 2)[1] for r in lean] == [b"401", b"401", b"401", b"200"]
    assert s.handed == []
    assert lean[3].endswith(s.data[:SMALLEST_PIECE_SIZE])


async def test_pipelined_requests_are_answered_in_order_and_the_rest_by_the_general_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    requests = [
        get(piece(s.digest, 1)),
        get(piece("cd" * 32, 0)),
        get(piece(s.digest, 0)),
        get("/healthz"),  # from here on, the general server
        get(piece(s.digest, 2)),
        get(piece(s.digest, 0), method="HEAD"),
    ]
    async with connect(s.lean) as conn:
        await conn.send(b"".join(requests))
        lean = [await conn.response() for _ in requests[:-1]]
        head = await conn.response(head_only=True)  # a length but no body
    general = await exchange(s.general, requests[:-1])
    assert lean == general
    assert lean[3].endswith(b"\r\n\r\nok\n")
    assert s.handed == ["/healthz", piece(s.digest, 2), piece(s.digest, 0)]
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")


async def test_a_request_trickling_in_byte_by_byte_is_answered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    request = get(piece(s.digest, 2))
    async with connect(s.lean) as conn:
        for i in range(len(request)):
            await conn.send(request[i : i + 1])
            await trio.sleep(0.001)
        answer = await conn.response()
    assert answer.endswith(s.data[2 * SMALLEST_PIECE_SIZE :])
    assert s.handed == []


async def test_malformed_requests_get_the_general_servers_4xx(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    for bad in (
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
        b"GET /pieces/" + b"ab" * 32 + b"/0 HTTP/1.1\r\n\r\n",  # no Host
        b"GET /pieces/ HTTP/1.1\r\nHost: x\r\n" + b"x-pad: " + b"a" * 70_000 + b"\r\n\r\n",
    ):
        async with connect(s.lean) as conn:
            await conn.send(bad)
            answer = await conn.response()
            assert answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:80]
    assert (await exchange(s.lean, [get(piece(s.digest, 0))]))[0].startswith(b"HTTP/1.1 200 ")


async def test_an_idle_connection_is_dropped_after_the_head_timeout_from_each_wait(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path, limits=ServerLimits(head_timeout=0.5))
    async with connect(s.lean) as conn:
        for _ in range(3):  # each request comes within the timeout of the last answer
            await trio.sleep(0.3)
            await conn.send(get(piece(s.digest, 2)))
            await conn.response()
        started = trio.current_time()
        assert await conn.closed()
        assert 0.4 < trio.current_time() - started < 2
    async with connect(s.lean) as conn:
        await conn.send(get(piece(s.digest, 2))[:20])  # half a head
        assert await conn.closed()


def stalled_client(port: int, request: bytes) -> socket.socket:
    """A client with a tiny receive window that sends `request` and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll the server's state (it has no event to wait on) for up to 5 s."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_receiver_that_stops_reading_is_dropped_and_its_slot_freed(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pd.piecehttp")
    s = await start(nursery, tmp_path, limits=ServerLimits(send_timeout=0.3))
    sock = stalled_client(s.lean, get(piece(s.digest, 0)))
    try:
        await wait_until(lambda: s.server.busy == 1)
        await wait_until(lambda: s.server.busy == 0)  # send_timeout later
        assert "timed out" in caplog.text
    finally:
        sock.close()
    # one that goes away mid-body frees its slot too
    sock = stalled_client(s.lean, get(piece(s.digest, 0)))
    await wait_until(lambda: s.server.busy == 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset
    await wait_until(lambda: s.server.busy == 0)
    assert (await exchange(s.lean, [get(piece(s.digest, 2))]))[0].endswith(
        s.data[2 * SMALLEST_PIECE_SIZE :]
    )


@contextmanager
def in_progress(s: Setup, tmp_path: Path, layout: PieceLayout, have: Bitfield) -> Iterator[Digest]:
    """A download in progress of `s.data` under a digest of its own, holding `have` in
    `layout`, as the piece server sees one (`BlobManager.downloads`); its digest."""

    @dataclass
    class Partial:
        fd: int

    @dataclass
    class InProgress:
        layout: PieceLayout
        have: Bitfield
        partial: Partial

    part_path = tmp_path / "partial.bin"
    part_path.write_bytes(s.data)
    fd = os.open(part_path, os.O_RDONLY)
    digest = Digest("ef" * 32)
    s.server.blobs.downloads[digest] = InProgress(layout, have, Partial(fd))  # type: ignore[assignment]
    try:
        yield digest
    finally:
        del s.server.blobs.downloads[digest]
        os.close(fd)


async def test_a_download_in_progress_serves_the_pieces_it_holds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    layout = PieceLayout.for_size(SIZE)
    have = Bitfield(layout.count)
    have.add(1)
    with in_progress(s, tmp_path, layout, have) as digest:
        requests = [get(piece(digest, 0)), get(piece(digest, 1)), get(piece(digest, 3))]
        lean = await exchange(s.lean, requests)
        assert lean == await exchange(s.general, requests)
        assert [r.split(b" ", 2)[1] for r in lean] == [b"404", b"200", b"400"]
        assert b"not held yet" in lean[0]
        assert lean[1].endswith(s.data[SMALLEST_PIECE_SIZE : 2 * SMALLEST_PIECE_SIZE])
        # it names what it holds so far, for the child to ask for more (HAVE_HEADER)
        assert f"\r\n{HAVE_HEADER}: {encode_have(have)}\r\n".encode() in lean[1]
        head = lean[1].split(b"\r\n\r\n", 1)[0]
        (value,) = [
            v
            for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n"))
            if k == HAVE_HEADER.encode()
        ]
        assert decode_have(value, layout.count) == have
        assert s.server.busy == 0
        assert s.handed == []


async def test_a_blob_deleted_behind_the_store_is_404_not_500(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await start(nursery, tmp_path)
    monkeypatch.setattr("p2pd.store._STAMP_EVERY_NS", 0)
    s.server.blobs.store.path_of(s.digest).unlink()
    for port in (s.lean, s.general):
        answer = (await exchange(port, [get(piece(s.digest, 0))]))[0]
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:80]


async def test_the_daemons_peer_port_serves_pieces_and_its_other_routes(
    tmp_path: Path,
) -> None:
    config = P2pdConfig.from_mapping(
        {
            "mirror_listen": "127.0.0.1:0",
            "peer_listen": "127.0.0.1:0",
            "advertise": "127.0.0.1:65003",
            "data_dir": str(tmp_path / "data"),
        }
    )
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(run_daemon, config)
        data = random.Random(2).randbytes(SIZE)
        digest = put_complete(running.daemon.store, data)
        requests = [get(piece(digest, 2)), get("/stats"), get("/healthz")]
        answers = await exchange(running.ports.peer, requests)
        assert answers[0].endswith(data[2 * SMALLEST_PIECE_SIZE :])
        assert b'"bytes_to_peers": 1000' in answers[1]
        assert answers[2].endswith(b"\r\n\r\nok\n")
        nursery.cancel_scope.cancel()


async def test_a_stream_that_is_no_socket_goes_to_the_general_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The storm's in-memory network has no socket to read or sendfile from."""
    s = await start(nursery, tmp_path)
    client, server_end = trio.testing.memory_stream_pair()

    async def fallback(request: Request) -> Response:
        s.handed.append(request.target)
        return await s.server.handle(request)

    nursery.start_soon(piecehttp.serve_connection, server_end, s.server, fallback, ServerLimits())
    conn = Conn(client)  # type: ignore[arg-type]
    await client.send_all(get(piece(s.digest, 2)))
    assert (await conn.response()).endswith(s.data[2 * SMALLEST_PIECE_SIZE :])
    assert s.handed == [piece(s.digest, 2)]
    await client.aclose()


# -- the layout a requester names -----------------------------------------------------------


async def test_a_complete_blob_is_served_in_the_layout_the_requester_names(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)  # held in the rule's 256 KiB pieces
    small = PieceLayout(SIZE, 64 * 1024)  # 9 pieces, the last 1000 bytes
    named = "x-p2p-piece-size: 65536"
    requests = [
        get(piece(s.digest, 5), named),
        get(piece(s.digest, 8), named),  # the short last piece of that layout
        get(piece(s.digest, 9), named),  # 400: past the end in that layout
        get(piece(s.digest, 1), f"x-p2p-piece-size: {SMALLEST_PIECE_SIZE}"),
        get(piece(s.digest, 1)),  # none named: the layout it is held in
        get(piece(s.digest, 0), "x-p2p-piece-size: 65535"),  # no layout has it: 400
    ]
    lean = await exchange(s.lean, requests)
    assert lean == await exchange(s.general, requests)
    assert s.handed == []
    assert [r.split(b" ", 2)[1] for r in lean] == [b"200", b"200", b"400", b"200", b"200", b"400"]
    for answer, (offset, length) in zip(lean[:2], map(small.span, (5, 8)), strict=True):
        assert answer.endswith(b"\r\n\r\n" + s.data[offset : offset + length])
        # a complete blob: every piece, in the layout asked for
        assert f"{HAVE_HEADER}: {encode_have(Bitfield.full(small.count))}\r\n".encode() in answer
    held = s.data[SMALLEST_PIECE_SIZE : 2 * SMALLEST_PIECE_SIZE]
    assert lean[3].endswith(b"\r\n\r\n" + held) and lean[4].endswith(b"\r\n\r\n" + held)
    assert b"not a power of two" in lean[5]
    # a malformed piece size goes to the general server, which refuses it
    (bad,) = await exchange(s.lean, [get(piece(s.digest, 0), "x-p2p-piece-size: 0x10")])
    assert bad.startswith(b"HTTP/1.1 400 ") and s.handed == [piece(s.digest, 0)]


async def test_a_download_cut_otherwise_is_refused_and_the_client_takes_it_as_not_held(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start(nursery, tmp_path)
    layout = PieceLayout.for_size(SIZE)
    client = PieceClient()
    try:
        with in_progress(s, tmp_path, layout, Bitfield.full(layout.count)) as digest:
            requests = [
                get(piece(digest, 1), "x-p2p-piece-size: 65536"),
                get(piece(digest, 1), f"x-p2p-piece-size: {SMALLEST_PIECE_SIZE}"),
            ]
            lean = await exchange(s.lean, requests)
            assert lean == await exchange(s.general, requests)
            assert [r.split(b" ", 2)[1] for r in lean] == [b"409", b"200"]
            assert b"cut in 262144-byte pieces here, not 65536" in lean[0]
            address = f"127.0.0.1:{s.lean}"
            with pytest.raises(PieceFetchError, match="answered 409") as info:
                await client.fetch(
                    address, digest, 1, memoryview(bytearray(65536)), piece_size=65536
                )
            assert info.value.not_found and not info.value.busy
            buf = bytearray(SMALLEST_PIECE_SIZE)
            await client.fetch(address, digest, 1, memoryview(buf), piece_size=SMALLEST_PIECE_SIZE)
            assert buf == s.data[SMALLEST_PIECE_SIZE : 2 * SMALLEST_PIECE_SIZE]
            await wait_until(lambda: s.server.busy == 0)
    finally:
        await client.aclose()


async def test_a_watch_does_not_send_the_piece_gets_after_it_to_the_general_server(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # the lean path hands a connection that carried a watch to the general server for good:
    # the client keeps watch connections apart from piece connections
    s = await start(nursery, tmp_path)
    address = f"127.0.0.1:{s.lean}"
    client = PieceClient()
    layout = PieceLayout.for_size(SIZE)
    with trio.fail_after(10):
        have = await client.watch(address, s.digest, 0)
        assert have is not None and decode_have(have, layout.count) == Bitfield.full(layout.count)
        for index in (0, 1, 0):
            buffer = bytearray(layout.length(index))
            await client.fetch(address, s.digest, index, memoryview(buffer))
            offset, length = layout.span(index)
            assert buffer == s.data[offset : offset + length]
        await client.watch(address, s.digest, 0)
    assert s.handed == [f"/have/{s.digest.hex}"] * 2  # the piece GETs stayed on the lean path
    assert len(client._idle_watches[address]) == len(client._idle[address]) == 1
    await client.aclose()
