"""A small HTTP/1.1 server: h11 on trio, one handler coroutine, bodies that may be files.

Why not a framework: every listening port of the system (the mirror, the piece server, the
supernode API) wants the same three things a framework makes awkward -- repeated request
headers passed through untouched, file bodies sent with ``os.sendfile`` (h11's
``send_with_data_passthrough`` lets a placeholder object stand in for the bytes), and a hard
guarantee that a malformed or hostile request costs one 4xx and a log line, never the process.

Rules:
- A handler receives a `Request` and returns a `Response`. It raises `HTTPError` for a
  deliberate error answer; any other exception is logged with its traceback and answered 500.
- Request heads are bounded (`ServerLimits.max_head`), bodies are read only on demand and
  bounded by the caller (`Request.read_body(limit)` raises 413 past it), and a client that is
  slow to send a head is dropped after `head_timeout`.
- Keep-alive is honoured; after an error the connection is closed.
- Response bodies: ``bytes``, a `FileRegion` (sent with ``os.sendfile`` from the caller's open
  file descriptor), or an async iterator of chunks that are bytes or FileRegions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

# Bytes bodies up to this size are sent in the same write as the head (copying them is cheap).
_JOIN_BODY = 64 * 1024

Headers = list[tuple[str, str]]


class HTTPError(Exception):
    """Answer with `status` and a short plain-text reason."""

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class ResponseAborted(Exception):
    """Raised by a streaming body to cut the response off mid-way (the connection is closed
    without completing the message, so the client sees a truncated body and retries)."""


@dataclass(frozen=True, slots=True)
class FileRegion:
    """`length` bytes of the open file `fd` from `offset`, to be sent with sendfile.

    The handler owns `fd`. For a region that is the whole body, `on_done` (if given) is called
    once it is sent or the send failed: where the owner closes the fd or drops a read lease. A
    region yielded by an iterator body is the iterator's to clean up (its ``finally``).
    """

    fd: int
    offset: int
    length: int
    on_done: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self.length


# An iterator may mix bytes and FileRegions (a file that grows while it is being sent).
Body = bytes | AsyncIterator[bytes] | AsyncIterator[bytes | FileRegion] | FileRegion


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers = field(default_factory=list)
    body: Body = b""
    # For an iterator body: the length when known (Content-Length), else chunked.
    content_length: int | None = None


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_head: int = 64 * 1024
    head_timeout: float = 30.0  # also how long an idle keep-alive connection is kept
    send_timeout: float = 60.0  # how long one write may stall (a receiver that stopped reading)


class Request:
    __slots__ = (
        "_conn",
        "_receive",
        "_stream",
        "client",
        "headers",
        "method",
        "path",
        "query",
        "target",
    )

    def __init__(
        self,
        event: h11.Request,
        conn: h11.Connection,
        receive: Callable[[], Awaitable[h11.Event]],
        client: str,
    ) -> None:
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        parts = urlsplit(self.target)
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.headers: Headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
        ]
        self.client = client
        self._conn = conn
        self._receive = receive

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    async def read_body(self, limit: int) -> bytes:
        """The whole request body; 413 if it is longer than `limit` bytes."""
        declared = self.header("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body over the {limit}-byte limit")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._receive()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HTTPError(413, f"request body over the {limit}-byte limit")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise HTTPError(400, "unexpected event in request body")


Handler = Callable[[Request], Awaitable[Response]]


class _Connection:
    """One client connection: read a request, run the handler, send the response, repeat."""

    def __init__(
        self, stream: trio.abc.HalfCloseableStream, handler: Handler, limits: ServerLimits
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        try:
            # Not every stream is a socket (the storm's in-memory network): those say who
            # they are with a `peer` attribute, if at all.
            sock = getattr(stream, "socket", None)
            peer = sock.getpeername() if sock is not None else getattr(stream, "peer", "?")
            self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        except OSError:
            self.client = "?"

    async def _receive(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data if isinstance(data, bytes) else bytes(data))

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(self.limits.send_timeout):
                await self.stream.send_all(data)

    async def run(self) -> None:
        try:
            while True:
                event: h11.Event | None = None
                with trio.move_on_after(self.limits.head_timeout):
                    event = await self._receive()
                if not isinstance(event, h11.Request):
                    return  # closed by the client, or too slow to send a request head
                await self._serve(event)
                if not self._can_reuse():
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            log.info("bad request from %s: %s", self.client, exc)
            await self._send_error_if_possible(exc.error_status_hint, f"malformed request: {exc}")
            await self._linger()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except ResponseAborted as exc:
            log.warning("response to %s aborted: %s", self.client, exc)
        except trio.TooSlowError:
            log.info("response to %s timed out", self.client)
        except Exception:
            log.exception("connection from %s failed", self.client)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await self.stream.aclose()

    async def _linger(self) -> None:
        await linger(self.stream)

    def _can_reuse(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _serve(self, event: h11.Request) -> None:
        request = Request(event, self.conn, self._receive, self.client)
        try:
            response = await self.handler(request)
        except HTTPError as exc:
            log.info(
                "%s %s %s -> %d %s",
                self.client,
                request.method,
                request.target,
                exc.status,
                exc.reason,
            )
            response = error_response(exc.status, exc.reason, exc.headers)
        except h11.RemoteProtocolError:
            raise  # a malformed request body: answered 4xx by run()
        except Exception:
            log.exception("handler failed on %s %s", request.method, request.target)
            response = error_response(500, "internal error")
        await self._respond(request, response)
        await self._drain_or_close()

    async def _drain_or_close(self) -> None:
        """Discard an unread request body so the connection can be reused (bounded)."""
        budget = 1 << 20
        while self.conn.their_state is h11.SEND_BODY and budget > 0:
            event = await self._receive()
            if isinstance(event, h11.Data):
                budget -= len(event.data)
        if self.conn.their_state is h11.SEND_BODY:
            raise trio.BrokenResourceError("request body too large to drain")

    async def _respond(self, request: Request, response: Response) -> None:
        body = response.body
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        names = {k.lower() for k, _ in headers}
        head_only = request.method == "HEAD"
        try:
            if isinstance(body, bytes):
                if b"content-length" not in names:
                    headers.append((b"content-length", str(len(body)).encode()))
            elif isinstance(body, FileRegion):
                if b"content-length" not in names:
                    headers.append((b"content-length", str(body.length).encode()))
            elif response.content_length is not None and b"content-length" not in names:
                headers.append((b"content-length", str(response.content_length).encode()))
            elif response.content_length is None and b"content-length" not in names:
                headers.append((b"transfer-encoding", b"chunked"))
            # No deadline on the whole response: a big layer over a slow link, or one still
            # arriving from the swarm, takes as long as it takes. Each write may stall for at
            # most send_timeout (a receiver that stopped reading).
            head = h11.Response(status_code=response.status, headers=headers)
            if head_only or (isinstance(body, bytes) and len(body) <= _JOIN_BODY):
                # A small answer (every control message) leaves in one send: a second send
                # for the body cost a second trip through the TCP stack (and a second wake-up
                # of the client) for a few hundred bytes.
                data = self.conn.send(head) or b""
                if isinstance(body, bytes) and body and not head_only:
                    data += self.conn.send(h11.Data(data=body)) or b""
                data += self.conn.send(h11.EndOfMessage()) or b""
                with trio.fail_after(self.limits.send_timeout):
                    await self.stream.send_all(data)
                return
            await self._send(head)
            if head_only:
                pass
            elif isinstance(body, bytes):
                if body:
                    await self._send(h11.Data(data=body))
            elif isinstance(body, FileRegion):
                await self._send_file(body)
            else:
                async for chunk in body:
                    if isinstance(chunk, FileRegion):
                        await self._send_file(chunk)
                    elif chunk:
                        await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        finally:
            if isinstance(body, FileRegion) and body.on_done is not None:
                body.on_done()
            if not isinstance(body, bytes | FileRegion):
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()

    async def _send_file(self, region: FileRegion) -> None:
        parts = self.conn.send_with_data_passthrough(h11.Data(data=region))  # type: ignore[arg-type]
        for part in parts or ():
            if cast(object, part) is region:
                await sendfile(
                    self.stream, region.fd, region.offset, region.length, self.limits.send_timeout
                )
            else:
                with trio.fail_after(self.limits.send_timeout):
                    await self.stream.send_all(part)

    async def _send_error_if_possible(self, status: int, reason: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = error_response(status, reason)
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))  # type: ignore[arg-type]
        try:
            await self._send(h11.Response(status_code=status, headers=headers))
            await self._send(h11.Data(data=response.body))  # type: ignore[arg-type]
            await self._send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close `stream` and discard what the client still sends, briefly: closing a socket
    with unread input makes the kernel send a reset that can destroy our error response."""
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_eof()
        budget = 1 << 20
        while budget > 0 and (data := await stream.receive_some(65536)):
            budget -= len(data)


async def sendfile(
    stream: trio.abc.Stream, fd: int, offset: int, length: int, stall: float = math.inf
) -> None:
    """Send `length` bytes of `fd` from `offset` on `stream` with ``os.sendfile``; raise
    `trio.TooSlowError` if the socket stays unwritable for `stall` seconds.

    A stream that is not a socket (the storm's in-memory network) gets the bytes read and
    sent in pieces of at most `READ_CHUNK`, each write bounded by `stall` the same way."""
    if not isinstance(stream, trio.SocketStream):
        await _send_read(stream, fd, offset, length, stall)
        return
    sock = stream.socket
    end = offset + length
    while offset < end:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, end - offset)
        except BlockingIOError:
            with trio.fail_after(stall):
                await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise trio.BrokenResourceError(str(exc)) from exc
            raise
        if sent == 0:
            raise trio.BrokenResourceError(f"file ended {end - offset} bytes early")
        offset += sent
        await trio.lowlevel.checkpoint()


READ_CHUNK = 4 * 1024 * 1024


async def _send_read(
    stream: trio.abc.Stream, fd: int, offset: int, length: int, stall: float
) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(READ_CHUNK, end - offset), offset)
        if not data:
            raise trio.BrokenResourceError(f"file ended {end - offset} bytes early")
        with trio.fail_after(stall):
            await stream.send_all(data)
        offset += len(data)


def error_response(status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
    body = (reason.rstrip() + "\n").encode("utf-8", "replace")
    return Response(status, [("content-type", "text/plain; charset=utf-8"), *headers], body)


# Congestion control for the sockets that upload pieces (a p2pd's piece server, the
# supernode): loss-based, not the BBR many hosts default to. BBR bounds a flow's data in
# flight by about twice its rate times the *smallest* round trip it saw (refreshed every
# 10 s); on a LAN that minimum is a tenth of a millisecond, so when the flow's ACKs queue
# behind someone else's download on the sender's own downlink (a supernode fetching from the
# registry at full link rate while it uploads), the real round trip is ~10 ms and the flow is
# held to ~15 packets per trip: 2-3 MB/s on a 12.5 MB/s link, until its minimum expires.
# Traced in the namespace fleet, one host alone (issue 5): the supernode's piece uploads sat
# at 5-6 MB/s for 8 s with its uplink idle (cwnd 14-18, rtt 10 ms, min_rtt 0.15 ms), the
# pull 14.6-16 s against 11.4 s when the minimum happened to be taken under load.
PIECE_CONGESTION = "cubic"


def prefer_congestion(listeners: Sequence[trio.SocketListener], name: str) -> bool:
    """Set TCP congestion control `name` on `listeners` (accepted sockets inherit it); False,
    leaving the system's default, where the kernel lacks it or refuses (not allowed)."""
    ok = True
    for listener in listeners:
        try:
            listener.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except (OSError, AttributeError) as exc:  # AttributeError: no TCP_CONGESTION here
            log.info("TCP congestion control %s unavailable, keeping the default: %s", name, exc)
            ok = False
    return ok


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: ServerLimits | None = None,
    congestion: str | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled; `task_status` gets the listeners.
    `congestion`: a TCP congestion control for its connections (`prefer_congestion`)."""
    limits = limits or ServerLimits()

    async def on_connection(stream: trio.SocketStream) -> None:
        # Last line of defence: one connection's failure must never take the listener down.
        try:
            await _Connection(stream, handler, limits).run()
        except Exception:
            log.exception("connection handler failed")

    listeners = await trio.open_tcp_listeners(port, host=host)
    if congestion is not None:
        prefer_congestion(listeners, congestion)
    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(on_connection, listeners, handler_nursery=nursery)


async def serve_stream(
    stream: trio.abc.HalfCloseableStream,
    handler: Handler,
    limits: ServerLimits | None = None,
    *,
    initial: bytes = b"",
) -> None:
    """Serve one connection that is already open (any trio stream) until it ends; never
    raises except on cancellation. `serve` does this for every accepted socket. `initial`:
    bytes already read from `stream` at a request boundary (a server with its own fast path
    for some requests hands the rest of a connection over here)."""
    try:
        connection = _Connection(stream, handler, limits or ServerLimits())
        if initial:
            connection.conn.receive_data(initial)
        await connection.run()
    except Exception:
        log.exception("connection handler failed")


def bound_port(listeners: Sequence[trio.SocketListener]) -> int:
    port = listeners[0].socket.getsockname()[1]
    assert isinstance(port, int)
    return port
