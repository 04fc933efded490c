"""The supernode's lean HTTP path for control POSTs (`supernode.controlhttp`): what it accepts,
what it hands to the general server, and how it treats pipelined, malformed, oversized and
slow requests -- against a real supernode on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from p2pd import wire
from p2pd.clusterauth import ClusterAuth
from p2pd.http.server import ServerLimits
from supernode.controlhttp import parse_head
from supernode.server import Supernode
from tests.supernode.helpers import (
    BLOB,
    DIGEST,
    FakeRegistry,
    config_for,
    register_msg,
    running,
)

AUTH = b"x-p2p-auth"


def post(path: str, body: bytes, *extra: str, host: str = "Host: sn\r\n") -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return (
        f"POST {path} HTTP/1.1\r\n{host}{headers}Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def leave(peer: str = "a") -> bytes:
    return wire.encode(wire.Leave(DIGEST, peer))


class Conn:
    """A raw client connection that reads whole responses (by Content-Length)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.carry = b""

    async def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """(status line, lower-cased headers, body) of the next response."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.carry:
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"closed mid-head: {self.carry!r}"
                self.carry += chunk
            top, _, self.carry = self.carry.partition(b"\r\n\r\n")
            lines = top.split(b"\r\n")
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
            length = int(fields[b"content-length"])
            while len(self.carry) < length:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "closed mid-body"
                self.carry += chunk
            body, self.carry = self.carry[:length], self.carry[length:]
            return lines[0], fields, body

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


def registry() -> FakeRegistry:
    return FakeRegistry(blobs={str(DIGEST): BLOB})


# -- recognising a control request ----------------------------------------------------------


def head_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[0]


def test_plain_control_posts_are_recognised() -> None:
    for path in ("/v1/register", "/v1/announce", "/v1/report", "/v1/leave"):
        head = parse_head(head_of(post(path, b"abc")), AUTH)
        assert head is not None
        assert (head.path, head.length, head.auth, head.close) == (path, 3, None, False)
    head = parse_head(
        b"POST /v1/leave HTTP/1.1\r\nHOST:sn\r\ncontent-LENGTH:   17  \r\n"
        b"X-P2P-Auth: 123.abc\r\nConnection: keep-alive, Close\r\nUser-Agent: a b\tc",
        AUTH,
    )
    assert head is not None
    assert (head.length, head.auth, head.close) == (17, "123.abc", True)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"post /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"POST /v1/leave?x=1 HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"POST /v1/leave/ HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"POST /healthz HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"POST /v1/leave HTTP/1.0\r\nHost: sn\r\nContent-Length: 0",
        b"POST  /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"\r\nPOST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0",
        b"POST /v1/leave HTTP/1.1\r\nContent-Length: 0",  # no Host
        b"POST /v1/leave HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn",  # no Content-Length
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 1\r\nContent-Length: 1",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: -1",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 1 1",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0x10",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 12345678901",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nTransfer-Encoding: chunked",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nExpect: 100-continue",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nUpgrade: h2c",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nBad Name: x",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nName : x",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nX: a\x00b",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nX: caf\xc3\xa9",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nX: a\rb",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nX: a\r\n folded",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\n",  # empty line
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\nx-p2p-auth: 1\r\n"
        b"X-P2P-Auth: 2",
    ],
)
def test_anything_else_goes_to_the_general_server(head: bytes) -> None:
    assert parse_head(head, AUTH) is None


@pytest.mark.parametrize(
    "line",
    [
        b"X: a" + b" \t" * 30_000 + b"\x01",
        b"X: a" + b" a" * 30_000 + b" \x01",
        b"X:" + b" " * 60_000 + b"\x01",  # took 15 s with a pattern that matched OWS twice
        b"X:" + b" " * 60_000,
        b"X" * 60_000,
        b"X: a\r\n" * 10_000 + b"X: \x01",
    ],
)
def test_a_hostile_head_is_parsed_in_linear_time(line: bytes) -> None:
    head = b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 0\r\n" + line
    started = time.perf_counter()
    parse_head(head, AUTH)
    assert time.perf_counter() - started < 0.2


# -- a real supernode ---------------------------------------------------------------------


async def test_pipelined_and_kept_alive_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        register = wire.encode(register_msg("a"))
        announce = wire.encode(wire.Announce(DIGEST, "a", (), 0, True))
        # three requests in one write, the last split so its body arrives later
        batch = post("/v1/register", register) + post("/v1/announce", announce)
        tail = post("/v1/leave", leave("a"))
        await c.stream.send_all(batch + tail[:-3])
        await trio.sleep(0.05)
        await c.stream.send_all(tail[-3:])
        kinds = []
        for _ in range(3):
            status, fields, body = await c.response()
            assert status == b"HTTP/1.1 200 "
            assert fields[b"content-type"] == b"application/msgpack"
            kinds.append(type(wire.decode(body)))
        assert kinds == [wire.Assignment, wire.Assignment, wire.Ack]
        # a refusal keeps the connection too
        await c.stream.send_all(post("/v1/leave", leave("a")))
        status, _, body = await c.response()
        assert status == b"HTTP/1.1 404 "
        assert wire.decode(body, expect=wire.Error).code == "unknown_peer"
        await c.stream.send_all(post("/v1/register", register))
        assert (await c.response())[0] == b"HTTP/1.1 200 "
        assert h.supernode.messages == 4
        await h.wait_done()


async def test_a_request_trickling_in_byte_by_byte_is_answered(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        for byte in post("/v1/register", wire.encode(register_msg("a"))):
            await c.stream.send_all(bytes([byte]))
        status, _, body = await c.response()
        assert status == b"HTTP/1.1 200 "
        assert wire.decode(body, expect=wire.Assignment).digest == DIGEST
        await h.wait_done()


async def test_lean_and_general_answers_are_the_same_bytes(tmp_path: Path) -> None:
    """A chunked body makes the general (h11) server answer: same status line, headers and
    body as the lean path's, for success and refusal alike."""
    body = leave("nobody")
    chunked = (
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.wait_done()  # a register's answer carries the seeder's progress: hold it still
        answers = []
        for request in (post("/v1/leave", body), chunked):
            async with connect(h.port) as c:
                await c.stream.send_all(request)
                await c.stream.send_all(post("/v1/register", wire.encode(register_msg("a"))))
                answers.append([await c.response(), await c.response()])
        assert answers[0] == answers[1]
        (status, _, error), (ok, _, _) = answers[0]
        assert (status, ok) == (b"HTTP/1.1 404 ", b"HTTP/1.1 200 ")
        assert wire.decode(error, expect=wire.Error).code == "unknown_peer"


async def test_other_routes_on_a_control_connection_go_to_the_general_server(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        await c.stream.send_all(post("/v1/register", wire.encode(register_msg("a"))))
        assert (await c.response())[0] == b"HTTP/1.1 200 "
        await c.stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: sn\r\n\r\n")
        status, _, body = await c.response()
        assert (status, body) == (b"HTTP/1.1 200 ", b"ok\n")
        # the rest of the connection is the general server's, control calls included
        await c.stream.send_all(post("/v1/leave", leave("a")))
        status, _, body = await c.response()
        assert status == b"HTTP/1.1 200 "
        assert type(wire.decode(body)) is wire.Ack
        await c.stream.send_all(b"GET /v1/leave HTTP/1.1\r\nHost: sn\r\n\r\n")
        status, fields, body = await c.response()
        assert (status, fields[b"allow"]) == (b"HTTP/1.1 405 ", b"POST")
        await h.wait_done()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/leave HTTP/1.1\r\nContent-Length: 2\r\n\r\nxx",  # no Host
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nBad Name: 1\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /v1/leave HTTP/1.1\r\nHost: sn\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"NONSENSE\r\n\r\n",
    ],
)
async def test_malformed_requests_get_a_4xx_and_the_server_goes_on(
    tmp_path: Path, request_bytes: bytes
) -> None:
    async with running(tmp_path, registry()) as h:
        async with connect(h.port) as c:
            await c.stream.send_all(post("/v1/register", wire.encode(register_msg("a"))))
            assert (await c.response())[0] == b"HTTP/1.1 200 "
            await c.stream.send_all(request_bytes)
            status, _, _ = await c.response()
            assert status.startswith(b"HTTP/1.1 4"), status
            assert await c.closed()
        assert (await h.register("b")).digest == DIGEST
        await h.wait_done()


async def test_a_body_over_the_limit_is_refused_unread_and_the_connection_closed(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, registry()) as h:
        async with connect(h.port) as c:
            head = post("/v1/register", b"")
            big = head.replace(b"Length: 0", f"Length: {wire.MAX_MESSAGE_SIZE + 1}".encode())
            await c.stream.send_all(big + b"x" * 1000)
            status, fields, body = await c.response()
            assert (status, fields[b"connection"]) == (b"HTTP/1.1 413 ", b"close")
            assert wire.decode(body, expect=wire.Error).code == "too_large"
            assert await c.closed()
        # exactly at the limit is read (and refused only as a malformed message)
        async with connect(h.port) as c:
            await c.stream.send_all(post("/v1/leave", b"\xc1" * wire.MAX_MESSAGE_SIZE))
            status, _, body = await c.response()
            assert status == b"HTTP/1.1 400 "
            assert "malformed MessagePack" in wire.decode(body, expect=wire.Error).message
        assert (await h.register("a")).digest == DIGEST
        await h.wait_done()


async def test_connection_close_is_honoured(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        await c.stream.send_all(post("/v1/leave", leave(), "Connection: close"))
        status, fields, _ = await c.response()
        assert (status, fields[b"connection"]) == (b"HTTP/1.1 404 ", b"close")
        assert await c.closed()


async def test_any_connection_close_among_several_headers_closes(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        request = post("/v1/leave", leave(), "Connection: close", "Connection: keep-alive")
        await c.stream.send_all(request)
        status, fields, _ = await c.response()
        assert (status, fields[b"connection"]) == (b"HTTP/1.1 404 ", b"close")
        assert await c.closed()


async def test_a_head_with_bare_line_feeds_goes_to_the_general_server_at_once(
    tmp_path: Path,
) -> None:
    # h11 accepts lines ended by a bare LF; the lean path must not sit waiting for a CRLF
    # blank line that never comes (it waited for head_timeout)
    async with running(tmp_path, registry()) as h, connect(h.port) as c:
        body = leave()
        head = b"POST /v1/leave HTTP/1.1\nHost: sn\nContent-Length: %d\n\n" % len(body)
        await c.stream.send_all(head + body)
        with trio.fail_after(3):
            status, _, _ = await c.response()
        assert status == b"HTTP/1.1 404 "


@asynccontextmanager
async def head_timeout_1s(tmp_path: Path) -> AsyncIterator[tuple[Supernode, int]]:
    """A supernode whose head timeout is one second, and its port."""
    supernode = Supernode(
        config_for(tmp_path), transport=registry().transport(), limits=ServerLimits(head_timeout=1)
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(supernode.run)
        yield supernode, port
        nursery.cancel_scope.cancel()


async def test_slow_clients_are_dropped_without_holding_up_others(tmp_path: Path) -> None:
    async with head_timeout_1s(tmp_path) as (supernode, port):
        request = post("/v1/register", wire.encode(register_msg("a")))
        async with connect(port) as idle, connect(port) as mid_head, connect(port) as mid_body:
            await mid_head.stream.send_all(request[:20])
            await mid_body.stream.send_all(request[:-5])
            # meanwhile another client is served at once
            async with connect(port) as c:
                await c.stream.send_all(request)
                assert (await c.response())[0] == b"HTTP/1.1 200 "
            started = trio.current_time()
            for slow in (idle, mid_head, mid_body):
                assert await slow.closed()
            assert trio.current_time() - started < 3
        task = supernode.tracker.task(DIGEST)
        assert task is not None
        with trio.fail_after(20):
            await task.done.wait()


async def test_the_head_timeout_runs_from_each_wait_not_from_the_first(tmp_path: Path) -> None:
    # the lean path's watchdog: a kept-alive client calling more often than head_timeout is
    # served for longer than head_timeout in all, and dropped head_timeout after going idle
    async with head_timeout_1s(tmp_path) as (_, port):
        request = post("/v1/register", wire.encode(register_msg("a")))
        async with connect(port) as c:
            started = trio.current_time()
            for _ in range(5):
                await trio.sleep(0.6)
                await c.stream.send_all(request)
                assert (await c.response())[0] == b"HTTP/1.1 200 "
            assert trio.current_time() - started > 2.5
            idle = trio.current_time()
            assert await c.closed()
            assert 0.9 < trio.current_time() - idle < 3


def test_a_head_seen_before_is_parsed_the_same() -> None:
    # parse_head keeps what it parsed: a head differing in its Content-Length alone is
    # another head
    first = head_of(post("/v1/announce", b"x" * 10))
    again = parse_head(first, b"x-auth")
    assert again is not None and again is parse_head(first, b"x-auth")
    other = parse_head(head_of(post("/v1/announce", b"x" * 11)), b"x-auth")
    assert (again.path, again.length) == ("/v1/announce", 10)
    assert other is not None and (other.path, other.length) == ("/v1/announce", 11)


async def test_cluster_auth_on_the_lean_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123")
    signer = ClusterAuth(secret.read_bytes())
    async with (
        running(tmp_path / "sn", registry(), cluster_secret_file=str(secret)) as h,
        connect(h.port) as c,
    ):
        body = wire.encode(register_msg("a"))
        await c.stream.send_all(post("/v1/register", body))
        status, _, error = await c.response()
        assert status == b"HTTP/1.1 401 "
        assert wire.decode(error, expect=wire.Error).message == "missing cluster signature"
        forged = signer.sign("POST", "/v1/register", body + b"!")
        await c.stream.send_all(post("/v1/register", body, f"X-P2P-Auth: {forged}"))
        assert (await c.response())[0] == b"HTTP/1.1 401 "
        signature = signer.sign("POST", "/v1/register", body)
        await c.stream.send_all(post("/v1/register", body, f"X-P2P-Auth: {signature}"))
        assert (await c.response())[0] == b"HTTP/1.1 200 "
        assert h.supernode.messages == 1
        await h.wait_done()


async def test_a_stream_that_is_no_socket_is_served_through_its_methods(tmp_path: Path) -> None:
    """The storm's in-memory network hands the supernode streams without a socket."""
    async with running(tmp_path, registry()) as h, trio.open_nursery() as nursery:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(h.supernode.serve_connection, server)
        c = Conn(client)  # type: ignore[arg-type]
        requests = [post("/v1/register", wire.encode(register_msg(p))) for p in ("a", "b")]
        await client.send_all(b"".join(requests) + post("/v1/leave", leave("a")))
        kinds = [type(wire.decode((await c.response())[2])) for _ in range(3)]
        assert kinds == [wire.Assignment, wire.Assignment, wire.Ack]
        await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: sn\r\n\r\n")
        assert (await c.response())[2] == b"ok\n"
        await client.aclose()
        await h.wait_done()


def _flood(port: int, request: bytes, count: int) -> None:
    """Send `count` copies of `request` from a blocking socket (another thread, so the server
    never runs dry) and read the answers as they come."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(request * count,))
        sender.start()
        marker = b"HTTP/1.1 200 "
        tail = b""
        answers = 0
        while answers < count:
            chunk = sock.recv(1 << 20)
            assert chunk, "closed mid-flood"
            data = tail + chunk  # a marker split between two reads is counted once
            answers += data.count(marker)
            tail = data[1 - len(marker) :]
        sender.join()


async def test_a_client_pipelining_without_pause_does_not_starve_another(tmp_path: Path) -> None:
    async with running(tmp_path, registry()) as h:
        await h.register("a")
        await h.register("b")
        before = h.supernode.messages
        announce = wire.encode(wire.Announce(DIGEST, "a", (), 0, True))
        count = 4000
        async with connect(h.port) as other, trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync, _flood, h.port, post("/v1/announce", announce), count
            )
            with trio.fail_after(20):
                while h.supernode.messages - before < 50:  # the flood is being answered
                    await trio.lowlevel.checkpoint()
            await other.stream.send_all(
                post("/v1/announce", wire.encode(wire.Announce(DIGEST, "b", (), 0, True)))
            )
            assert (await other.response())[0] == b"HTTP/1.1 200 "
            # answered long before the flood's last request
            assert h.supernode.messages - before < count // 2
        assert h.supernode.messages - before == count + 1
        await h.wait_done()
