"""An httpx transport over the in-memory `Fabric`: real HTTP/1.1 (h11) on a `MemoryStream`.

The daemons' httpx clients (p2pd's tracker and registry clients, the supernode's seeder) get
this transport in the full-stack storm engine, so their requests cross the simulated network
as bytes and reach the real HTTP servers (`p2pd.http.server.serve_stream`). One connection per
request, closed when the response is closed: simple, and the bytes are what the model counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import h11
import httpx
import trio

from benchmarks.storm.full.net import Fabric, MemoryStream

_RECEIVE = 1 << 22


class Sequencer(Protocol):
    """Orders some requests of several hosts (see `benchmarks.storm.full.engine`)."""

    async def turn(self, path: str, body: bytes) -> Callable[[], None]:
        """Wait until a request to `path` with `body` may be sent; returns what to call once
        its bytes are delivered (or failed to be)."""
        ...


class FabricTransport(httpx.AsyncBaseTransport):
    """Requests from host `src` of `fabric` to whatever host the URL names; a `sequencer`
    may hold some back until their turn."""

    def __init__(self, fabric: Fabric, src: int, sequencer: Sequencer | None = None) -> None:
        self.fabric = fabric
        self.src = src
        self.sequencer = sequencer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout", {})
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            stream = await self.fabric.connect(self.src, url.host, port)
        except OSError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        conn = h11.Connection(h11.CLIENT)
        try:
            body = b"".join([bytes(c) async for c in request.stream])  # type: ignore[union-attr]
            headers = [(b"host", url.netloc)]
            headers += [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
            if body and not any(k.lower() == b"content-length" for k, _ in headers):
                headers.append((b"content-length", str(len(body)).encode()))
            out = conn.send(
                h11.Request(method=request.method, target=url.raw_path, headers=headers)
            )
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            if self.sequencer is None:
                await stream.send_all(out)
            else:
                delivered = await self.sequencer.turn(url.path, body)
                try:
                    await stream.send_all(out)
                finally:
                    delivered()
            with trio.fail_after(timeouts.get("read") or 3600.0):
                event = await _next_event(conn, stream)
            if not isinstance(event, h11.Response):
                raise httpx.RemoteProtocolError(f"unexpected {event!r}", request=request)
        except trio.TooSlowError as exc:
            await stream.aclose()
            raise httpx.ReadTimeout("no response in time", request=request) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            await stream.aclose()
            raise httpx.ReadError(f"{url.host}:{port}: {exc}", request=request) from exc
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        return httpx.Response(
            event.status_code,
            headers=[(bytes(k), bytes(v)) for k, v in event.headers],
            stream=_Body(conn, stream, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
        )


async def _next_event(conn: h11.Connection, stream: MemoryStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(_RECEIVE))


class _Body(httpx.AsyncByteStream):
    def __init__(self, conn: h11.Connection, stream: MemoryStream, request: httpx.Request) -> None:
        self.conn = conn
        self.stream = stream
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                event = await _next_event(self.conn, self.stream)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise httpx.RemoteProtocolError(
                        f"unexpected {type(event).__name__} in a body", request=self.request
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            raise httpx.ReadError(str(exc), request=self.request) from exc

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
