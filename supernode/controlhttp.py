"""The supernode's lean HTTP/1.1 path for control POSTs on kept-alive connections.

Why: a storm's pace is set by how many control messages the supernode answers per CPU
second, and h11's general machinery (event objects, state machine, header normalisation) was
about a third of each announce's CPU. Control calls have one shape -- ``POST /v1/<call>
HTTP/1.1`` with a ``Content-Length`` body of at most `wire.MAX_MESSAGE_SIZE` bytes -- so this
module recognises exactly that shape and answers it directly.

Rules:

* Recognise, never guess. A request head is served here only if every line of it is plainly
  well-formed: the request line is ``POST`` to one of `CONTROL_PATHS` with no query, over
  HTTP/1.1; every header is ``token: visible-ASCII``; there is exactly one ``Host`` and one
  all-digit ``Content-Length``; and no ``Transfer-Encoding``, ``Expect`` or ``Upgrade``.
  Anything else -- another route, another method, a malformed or unusual head, a head over
  `ServerLimits.max_head` -- hands the connection, with the bytes read so far, to the general
  h11 server (`p2pd.http.server.serve_stream`) for the rest of its life. That server answers
  malformed input with its usual 4xx, so this path adds no parsing rule of its own to get wrong.
* A declared body over `wire.MAX_MESSAGE_SIZE` gets 413 (a ``wire.Error``) and the connection
  is closed without reading the body.
* A request (head and body) must arrive within ``head_timeout`` of when it is awaited, the
  idle time of a kept-alive connection included; a slower client is dropped, as the general
  server drops a client slow to send a head. Each write may stall ``send_timeout`` at most.
* Pipelined requests are answered in order; ``Connection: close`` is honoured after the
  answer. A refused call (4xx) keeps the connection, as on the general server.
* A socket is read and written without trio's stream layer (see `_Lean`); the task still
  yields every `STREAK` requests it serves without waiting, so a client that pipelines
  without pause cannot starve the others.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import trio

from p2pd import wire
from p2pd.http.lean import HEAD_END, STREAK, Closed, LeanConnection
from p2pd.http.server import Handler, ServerLimits, linger, serve_stream

log = logging.getLogger(__name__)

CONTROL_PATHS = (
    "/v1/register",
    "/v1/announce",
    "/v1/announce-batch",
    "/v1/report",
    "/v1/leave",
)

# (path, target, auth header value or None, body, client) -> (status, extra headers, body)
ControlCall = Callable[[str, str | None, bytes, str], tuple[int, list[tuple[str, str]], bytes]]

# The whole head, validated in one pass. Every part is unambiguous (a token stops at the
# first ":", a line at the first CR, and OWS is stripped afterwards, not matched), so the match
# is linear in the head's length: a pattern that let optional whitespace be split two ways
# took seconds on a line of spaces.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEAD = re.compile(
    rb"POST ("
    + b"|".join(re.escape(p.encode()) for p in CONTROL_PATHS)
    + rb") HTTP/1\.1((?:\r\n"
    + _TOKEN
    + rb":[\t -~]*)*)"
)
_FIELDS = re.compile(rb"\r\n(" + _TOKEN + rb"):([\t -~]*)")
_FALLBACK_NAMES = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_MAX_BODY = wire.MAX_MESSAGE_SIZE


class _Head:
    """A recognised control request head."""

    __slots__ = ("auth", "close", "length", "path")

    def __init__(self, path: str, length: int, auth: str | None, close: bool) -> None:
        self.path = path
        self.length = length
        self.auth = auth
        self.close = close


def parse_head(head: bytes, auth_header: bytes) -> _Head | None:
    """The control request in `head` (without its final blank line), or None when it is not
    plainly one (the general server then takes it). `auth_header`: lower-case name of the
    header whose value the caller wants."""
    key = (head, auth_header)
    known = _HEADS.get(key)
    if known is not None:
        return known
    parsed = _parse_head(head, auth_header)
    if parsed is not None and len(head) <= _HEADS_HEAD_MAX:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = parsed
    return parsed


# Control heads parsed lately: a p2pd's heads differ only in their Content-Length (without
# cluster auth), and parsing one was a twentieth of a lone announce's CPU. Bounded (cleared
# when full), and long heads are not kept.
_HEADS: dict[tuple[bytes, bytes], _Head] = {}
_HEADS_MAX = 256
_HEADS_HEAD_MAX = 1024


def _parse_head(head: bytes, auth_header: bytes) -> _Head | None:
    match = _HEAD.fullmatch(head)
    if match is None:
        return None
    length: int | None = None
    hosts = 0
    auth: str | None = None
    close = False
    for raw_name, raw_value in _FIELDS.findall(match[2]):
        name = raw_name.lower()
        value = raw_value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 10:
                return None
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == auth_header:
            if auth is not None:
                return None
            auth = value.decode("ascii")
        elif name == b"connection":
            # any "close" among them closes, as on the general server
            close = close or b"close" in (t.strip(b" \t").lower() for t in value.split(b","))
        elif name in _FALLBACK_NAMES:
            return None
    if length is None or hosts != 1:
        return None
    return _Head(match[1].decode("ascii"), length, auth, close)


def render(status: int, headers: list[tuple[str, str]], body: bytes, *, close: bool) -> bytes:
    """One whole response: status line, headers, Content-Length, then the body."""
    key = (status, *headers)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        # No reason phrase, as h11 writes it: the answer is byte for byte the general server's.
        lines = [b"HTTP/1.1 %d " % status]
        lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
        lines.append(b"content-length: ")
        prefix = b"\r\n".join(lines)
        if len(_PREFIXES) < _PREFIXES_MAX:
            _PREFIXES[key] = prefix
    end = b"\r\nconnection: close\r\n\r\n" if close else HEAD_END
    return b"%s%d%s%s" % (prefix, len(body), end, body)


# A response's lines up to its Content-Length, by status and headers: the server answers with
# a handful of different ones, and joining them for every answer was a few percent of its CPU.
_PREFIXES: dict[tuple[object, ...], bytes] = {}
_PREFIXES_MAX = 64


async def serve_connection(
    stream: trio.abc.HalfCloseableStream,
    control: ControlCall,
    fallback: Handler,
    limits: ServerLimits,
    *,
    auth_header: str,
    client: str = "?",
) -> None:
    """Serve one connection: control POSTs here, everything else through `fallback` on the
    general server. Never raises except on cancellation."""
    try:
        handed = await _Lean(stream, control, limits, auth_header.lower().encode(), client).run()
    except Exception:
        log.exception("control connection from %s failed", client)
        handed = None
    if handed is None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()
    else:
        await serve_stream(stream, fallback, limits, initial=handed)


class _Lean(LeanConnection):
    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        control: ControlCall,
        limits: ServerLimits,
        auth_header: bytes,
        client: str,
    ) -> None:
        super().__init__(limits, client, log)
        self.stream = stream
        self.control = control
        self.auth_header = auth_header
        # A socket is read and written directly (os.read / os.write, waiting for readiness
        # only when it would block): trio's stream methods add a trip through the scheduler
        # after every successful call, two or three per request, about a tenth of a control
        # call's CPU. Other streams (the storm's in-memory network) use the stream methods.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    def _dropped(self) -> None:
        if self.buffer:
            log.info("control request from %s too slow; dropped", self.client)

    async def _serve(self) -> bytes | None:
        """`run`'s loop, inside `self.scope`: `self.since` is set while a request is awaited
        (the watchdog's business) and None otherwise."""
        buffer = self.buffer
        while True:
            end = buffer.find(HEAD_END)
            head = self._parse(end) if end >= 0 else None
            if end >= 0 and head is None:
                return bytes(buffer)
            # Most requests arrive whole in one read: wait (and note it for the watchdog)
            # only when this one has not.
            missing = head is None or (
                head.length <= _MAX_BODY and len(buffer) < end + 4 + head.length
            )
            if missing:
                self.since = trio.current_time()  # see _watch
                if head is None:
                    end = await self._until_head()
                    head = self._parse(end) if end >= 0 else None
                    if head is None:
                        return bytes(buffer)
                if head.length <= _MAX_BODY:
                    await self._until(end + 4 + head.length)
                self.since = None
            assert head is not None
            if head.length > _MAX_BODY:
                await self._too_large()
                return None
            start = end + 4
            body = bytes(buffer[start : start + head.length])
            del buffer[: start + head.length]
            try:
                status, headers, payload = self.control(head.path, head.auth, body, self.client)
            except Exception:
                log.exception("control call %s from %s failed", head.path, self.client)
                text = [("content-type", "text/plain; charset=utf-8")]
                await self._send(render(500, text, b"internal error\n", close=True))
                return None
            await self._send(render(status, headers, payload, close=head.close))
            if head.close:
                return None
            if self.waited:
                self.waited, self.streak = False, 0
            else:
                # a client pipelining without pause must not starve the others
                self.streak += 1
                if self.streak >= STREAK:
                    self.streak = 0
                    await trio.lowlevel.checkpoint()

    def _parse(self, end: int) -> _Head | None:
        return parse_head(bytes(self.buffer[:end]), self.auth_header)

    async def _receive(self) -> None:
        if self.fd < 0:
            data = await self.stream.receive_some(65536)
        else:
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
        return len(buffer) < 5 or buffer.startswith(b"POST ")

    async def _until(self, size: int) -> None:
        while len(self.buffer) < size:
            await self._receive()

    async def _send(self, data: bytes) -> None:
        if self.fd < 0:
            with trio.fail_after(self.limits.send_timeout):
                await self.stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                self.waited = True
                with trio.fail_after(self.limits.send_timeout):
                    await trio.lowlevel.wait_writable(self.fd)

    async def _too_large(self) -> None:
        message = f"request body over the {wire.MAX_MESSAGE_SIZE}-byte limit"
        log.info("%s POST -> 413 too_large: %s", self.client, message)
        body = wire.encode(wire.Error("too_large", message))
        await self._send(render(413, [("content-type", "application/msgpack")], body, close=True))
        await linger(self.stream)
