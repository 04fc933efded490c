"""p2pd's lean HTTP/1.1 path for piece GETs on kept-alive connections.

Why: with 1 MiB pieces a serving p2pd spent 0.37 ms of CPU per piece request on top of the
bytes' own cost, most of it in the general server's machinery (h11's events and state
machine, header normalisation, a `Request` and a `Response` per request, trio's stream
layer) and in opening, stamping and closing the blob's file. Piece requests have one shape --
``GET /pieces/<hex>/<index> HTTP/1.1`` with no body -- so this module recognises exactly that
shape and answers it directly, with the checks of `PieceServer.check` (the very code the
general path runs), the response head h11 would write, and ``os.sendfile``.

Rules (as in `supernode.controlhttp`, the supernode's lean path for control POSTs):

* Recognise, never guess. A request head is served here only if every line of it is plainly
  well-formed: the request line is ``GET`` of `PIECE_PATH` with no query, over HTTP/1.1; every
  header is ``token: visible-ASCII``; there is exactly one ``Host``, at most one cluster
  signature, at most one piece size (`PIECE_SIZE_HEADER`, a decimal), and no
  ``Content-Length``, ``Transfer-Encoding``, ``Expect`` or ``Upgrade``.
  Anything else -- /stats, /metrics, /healthz, HEAD, a malformed or unusual head, a head over
  `ServerLimits.max_head` -- hands the connection, with the bytes read so far, to the general
  server (`p2pd.http.server.serve_stream`) for the rest of its life; it answers as before.
* Answers are byte for byte the general server's: the same status, headers (in h11's order and
  spelling) and bodies, the same log lines for refusals (401, 404, 400, 503 keep the
  connection, as there), 500 and a traceback in the log if the check itself fails.
* The head of a 200 is sent with ``MSG_MORE``: it leaves in the body's first packet instead of
  a packet of its own, one trip less through the TCP stack for both ends (and one wake-up less
  for the receiver, whose first read then brings head and body).
* A request must arrive within ``head_timeout`` of when it is awaited (the idle time of a
  kept-alive connection included), watched by one task per connection; each write may stall
  ``send_timeout`` at most. Pipelined requests are answered in order; ``Connection: close``
  is honoured after the answer. The task yields every `STREAK` requests it serves without
  waiting, so a client that pipelines without pause cannot starve the others.
* Only socket streams come here (other streams go to the general server at once).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket

import trio

from p2pd.clusterauth import HEADER
from p2pd.http.lean import HEAD_END, STREAK, Closed, LeanConnection
from p2pd.http.server import Handler, HTTPError, ServerLimits, error_response, serve_stream
from p2pd.peers import HAVE_HEADER, PIECE_SIZE_HEADER, UPLOADS_HEADER, PieceServer

log = logging.getLogger(__name__)

# The whole head, validated in one pass (see supernode.controlhttp for why it is linear).
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEAD = re.compile(
    rb"GET (/pieces/([0-9a-f]{64})/(0|[1-9][0-9]{0,8})) HTTP/1\.1((?:\r\n"
    + _TOKEN
    + rb":[\t -~]*)*)"
)
_FIELDS = re.compile(rb"\r\n(" + _TOKEN + rb"):([\t -~]*)")
_FALLBACK_NAMES = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))
_AUTH = HEADER.encode("ascii")
_PIECE_SIZE = PIECE_SIZE_HEADER.encode("ascii")
_DECIMAL = re.compile(rb"[1-9][0-9]{0,9}")
_PREFIX = b"GET /pieces/"
# What h11 writes for `PieceServer.handle`'s 200 (its headers, then Content-Length).
_OK = b"HTTP/1.1 200 \r\ncontent-type: application/octet-stream\r\n%s: %%d\r\n%s: %%s\r\n" % (
    UPLOADS_HEADER.encode("ascii"),
    HAVE_HEADER.encode("ascii"),
)
_LENGTH_END = b"content-length: %d\r\n\r\n"
_LENGTH_CLOSE = b"content-length: %d\r\nConnection: close\r\n\r\n"


class _Head:
    """A recognised piece request head."""

    __slots__ = ("auth", "close", "digest", "index", "piece_size", "target")

    def __init__(
        self,
        target: str,
        digest: str,
        index: int,
        auth: str | None,
        close: bool,
        piece_size: int | None = None,
    ):
        self.target = target
        self.digest = digest
        self.index = index
        self.auth = auth
        self.close = close
        self.piece_size = piece_size


def parse_head(head: bytes) -> _Head | None:
    """The piece request in `head` (without its final blank line), or None when it is not
    plainly one (the general server then takes it)."""
    match = _HEAD.fullmatch(head)
    if match is None:
        return None
    hosts = 0
    auth: str | None = None
    piece_size: int | None = None
    close = False
    for raw_name, raw_value in _FIELDS.findall(match[4]):
        name = raw_name.lower()
        if name == b"host":
            hosts += 1
        elif name == _AUTH:
            if auth is not None:
                return None
            auth = raw_value.strip(b" \t").decode("ascii")
        elif name == _PIECE_SIZE:
            value = raw_value.strip(b" \t")
            if piece_size is not None or not _DECIMAL.fullmatch(value):
                return None
            piece_size = int(value)
        elif name == b"connection":
            # any "close" among them closes, as h11 does
            close = close or b"close" in (t.strip(b" \t").lower() for t in raw_value.split(b","))
        elif name in _FALLBACK_NAMES:
            return None
    if hosts != 1:
        return None
    return _Head(
        match[1].decode("ascii"), match[2].decode("ascii"), int(match[3]), auth, close, piece_size
    )


def render_error(exc: HTTPError, *, close: bool) -> bytes:
    """The general server's answer to `exc` (`error_response`, as h11 writes it)."""
    response = error_response(exc.status, exc.reason, exc.headers)
    body = response.body
    assert isinstance(body, bytes)
    lines = [b"HTTP/1.1 %d " % exc.status]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in response.headers]
    lines.append(b"content-length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + HEAD_END + body


def render_ok(uploads: int, have: str, length: int, *, close: bool) -> bytes:
    """The head of `PieceServer.handle`'s 200, as h11 writes it."""
    return (
        _OK % (uploads, have.encode("ascii")) + (_LENGTH_CLOSE if close else _LENGTH_END) % length
    )


async def serve_connection(
    stream: trio.abc.HalfCloseableStream,
    pieces: PieceServer,
    fallback: Handler,
    limits: ServerLimits,
) -> None:
    """Serve one connection: piece GETs here, everything else through `fallback` on the
    general server. Never raises except on cancellation."""
    if not isinstance(stream, trio.SocketStream):
        await serve_stream(stream, fallback, limits)
        return
    try:
        peer = stream.socket.getpeername()
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    except OSError:
        client = "?"
    handed: bytes | None = b""
    try:
        lean = _Lean(stream, pieces, limits, client)
    except OSError:
        lean = None  # no fd to spare for its duplicate socket (see _Lean): the general path
    if lean is not None:
        try:
            handed = await lean.run()
        except Exception:
            log.exception("piece connection from %s failed", client)
            handed = None
        finally:
            lean.raw.close()
    if handed is None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
    else:
        await serve_stream(stream, fallback, limits, initial=handed)


class _Lean(LeanConnection):
    def __init__(
        self,
        stream: trio.SocketStream,
        pieces: PieceServer,
        limits: ServerLimits,
        client: str,
    ) -> None:
        super().__init__(limits, client, log)
        self.stream = stream
        self.pieces = pieces
        # The socket is read and written without trio's stream layer (whose every call
        # ends in a trip through the scheduler), through a duplicate as a plain socket
        # object: the one way to pass MSG_MORE. The duplicate is closed when this path is
        # done; the connection lives on in trio's socket.
        self.raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        self.raw.setblocking(False)
        self.fd = self.raw.fileno()

    async def _serve(self) -> bytes | None:
        buffer = self.buffer
        while True:
            end = buffer.find(HEAD_END)
            if end < 0:
                self.since = trio.current_time()  # see _watch
                end = await self._until_head()
                self.since = None
            head = parse_head(bytes(buffer[:end])) if 0 <= end <= self.limits.max_head else None
            if head is None:
                return bytes(buffer)
            del buffer[: end + 4]
            await self._answer(head)
            if head.close:
                return None
            if self.waited:
                self.waited, self.streak = False, 0
            else:
                self.streak += 1
                if self.streak >= STREAK:
                    self.streak = 0
                    await trio.lowlevel.checkpoint()

    async def _answer(self, head: _Head) -> None:
        pieces = self.pieces
        try:
            fd, offset, length, have = pieces.check(
                "GET", head.target, head.digest, head.index, head.auth, head.piece_size
            )
        except HTTPError as exc:
            log.info("%s GET %s -> %d %s", self.client, head.target, exc.status, exc.reason)
            await self._send(render_error(exc, close=head.close))
            return
        except Exception:
            log.exception("handler failed on GET %s", head.target)
            await self._send(render_error(HTTPError(500, "internal error"), close=head.close))
            return
        uploads = await pieces.start_upload(fd, length)
        try:
            await self._send(render_ok(uploads, have, length, close=head.close), more=length > 0)
            await self._sendfile(fd, offset, length)
        finally:
            pieces.finish_upload(fd)

    async def _receive(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
                break
            except BlockingIOError:
                self.waited = True
                await trio.lowlevel.wait_readable(self.fd)
        if not data:
            raise Closed
        self.buffer += data

    def _plausible(self, buffer: bytearray) -> bool:
        return buffer.startswith(_PREFIX[: len(buffer)])

    async def _send(self, data: bytes, *, more: bool = False) -> None:
        flags = socket.MSG_MORE if more else 0
        view = memoryview(data)
        while view:
            try:
                view = view[self.raw.send(view, flags) :]
            except BlockingIOError:
                self.waited = True
                with trio.fail_after(self.limits.send_timeout):
                    await trio.lowlevel.wait_writable(self.fd)

    async def _sendfile(self, fd: int, offset: int, length: int) -> None:
        """`p2pd.http.server.sendfile` without a trip through the scheduler after a piece
        that went out in one call (the loop in `_serve` yields now and then instead)."""
        end = offset + length
        while offset < end:
            try:
                sent = os.sendfile(self.fd, fd, offset, end - offset)
            except BlockingIOError:
                self.waited = True
                with trio.fail_after(self.limits.send_timeout):
                    await trio.lowlevel.wait_writable(self.fd)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise trio.BrokenResourceError(str(exc)) from exc
                raise
            if sent == 0:
                raise trio.BrokenResourceError(f"file ended {end - offset} bytes early")
            offset += sent
            if offset < end:
                await trio.lowlevel.checkpoint()
