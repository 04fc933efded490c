"""The h11 server: routing to a handler, file bodies, streaming, limits, hostile input."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import trio

from p2pd.http.server import (
    FileRegion,
    HTTPError,
    Request,
    Response,
    ResponseAborted,
    ServerLimits,
    bound_port,
    serve,
)

BLOB = os.urandom(300_000)


@pytest.fixture
def blob_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.write(BLOB)
        f.flush()
        yield f.fileno()


async def handler(request: Request) -> Response:
    if request.path == "/echo" and request.method == "POST":
        body = await request.read_body(1000)
        return Response(200, [("x-n", str(len(body)))], body)
    if request.path == "/headers":
        seen = [v for k, v in request.headers if k == "accept"]
        return Response(200, [("x-accept", v) for v in seen], b"ok")
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/teapot":
        raise HTTPError(418, "short and stout")
    if request.path == "/stream":

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield bytes([65 + i]) * 10
                await trio.lowlevel.checkpoint()

        return Response(200, [], chunks())
    if request.path == "/slow":

        async def slow() -> AsyncIterator[bytes]:
            for _ in range(6):
                await trio.sleep(0.1)
                yield b"s" * 10

        return Response(200, [], slow(), content_length=60)
    if request.path == "/abort":

        async def broken() -> AsyncIterator[bytes]:
            yield b"x" * 10
            raise ResponseAborted("digest mismatch")

        return Response(200, [], broken(), content_length=100)
    if request.path.startswith("/file/"):
        fd = int(request.query_one("fd") or "-1")
        off, length = (int(x) for x in request.path.split("/")[2:4])
        return Response(200, [], FileRegion(fd, off, length))
    raise HTTPError(404, "no such thing")


async def start(nursery: trio.Nursery, limits: ServerLimits | None = None) -> int:
    listeners = await nursery.start(
        lambda task_status: serve(handler, "127.0.0.1", 0, limits=limits, task_status=task_status)
    )
    return bound_port(listeners)


async def raw(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    out = b""
    with trio.move_on_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
            if not read_until_close and b"\r\n\r\n" in out:
                break
    await stream.aclose()
    return out


async def test_basic_routes(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/echo", content=b"hello")
        assert (r.status_code, r.content, r.headers["x-n"]) == (200, b"hello", "5")
        r = await client.post("/echo", content=b"x" * 2000)
        assert r.status_code == 413 and "limit" in r.text
        r = await client.get("/boom")
        assert r.status_code == 500
        r = await client.get("/teapot")
        assert (r.status_code, r.text) == (418, "short and stout\n")
        r = await client.get("/nope")
        assert r.status_code == 404
        r = await client.get("/stream")
        assert r.content == b"A" * 10 + b"B" * 10 + b"C" * 10 + b"D" * 10 + b"E" * 10
        # the server survived all of that on the same connection pool
        r = await client.post("/echo", content=b"again")
        assert r.content == b"again"


async def test_repeated_headers_reach_the_handler(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    out = await raw(
        port,
        b"GET /headers HTTP/1.1\r\nHost: x\r\nAccept: a/b\r\nAccept: c/d\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert b"x-accept: a/b\r\nx-accept: c/d\r\n" in out


async def test_file_region_is_sent_with_sendfile(nursery: trio.Nursery, blob_fd: int) -> None:
    fd = blob_fd
    port = await start(nursery)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.get(f"/file/1000/250000?fd={fd}")
        assert r.content == BLOB[1000:251000]
        r = await client.head(f"/file/0/10?fd={fd}")
        assert r.headers["content-length"] == "10" and r.content == b""


async def test_aborted_stream_truncates_and_server_lives(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/abort")
        assert (await client.post("/echo", content=b"ok")).content == b"ok"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\x13 garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_malformed_requests_get_4xx(nursery: trio.Nursery, garbage: bytes) -> None:
    port = await start(nursery)
    out = await raw(port, garbage)
    assert out.startswith(b"HTTP/1.1 4"), out[:100]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.post("/echo", content=b"alive")).content == b"alive"


async def test_slow_client_is_dropped(nursery: trio.Nursery) -> None:
    port = await start(nursery, ServerLimits(head_timeout=0.2))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\n")
    with trio.fail_after(3):
        assert await stream.receive_some(100) == b""
    await stream.aclose()


async def test_client_that_resets_after_garbage_does_not_kill_the_server(
    nursery: trio.Nursery,
) -> None:
    import socket
    import struct

    port = await start(nursery)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port))
        # a TLS ClientHello-like start, then an abortive close (RST), as skopeo does
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    await trio.sleep(0.2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.post("/echo", content=b"alive")).content == b"alive"


async def test_a_slow_but_progressing_response_is_not_cut(nursery: trio.Nursery) -> None:
    port = await start(nursery, ServerLimits(send_timeout=0.3))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.get("/slow")  # 0.6 s in all, no single write stalls
        assert r.content == b"s" * 60


async def test_small_answers_leave_in_one_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head and body of a small bytes answer go out together: one trip through the TCP stack
    per control message, not two."""
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def counting(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", counting)
    port = await start(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    writes.clear()
    await send_all(stream, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"hello"):
            got += await stream.receive_some(65536)
    await stream.aclose()
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"\r\n\r\nhello")
