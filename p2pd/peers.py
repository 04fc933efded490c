"""The piece path between hosts: the piece server and the piece client.

Wire: ``GET /pieces/<hex>/<index>`` answers 200 with exactly the piece's bytes, 404 when this
host does not hold that piece (yet), 400 for a malformed digest or index, 503 when all upload
slots are busy. The supernode's seeder serves the same route.

A piece index means something only in a layout, and the layout is the supernode's, not a
rule every version shares (p2pd.core.layout), so a requester names the piece size it cuts the
blob by (`PIECE_SIZE_HEADER`). A complete blob is served in that layout, whatever the one it
was downloaded with (the bytes of a piece follow from its offset and length alone); a blob
still being downloaded here, cut otherwise, answers 409, which the requester takes as "does
not have it". A request without the header (an older requester) gets the layout the blob is
held in. An older server ignores the header: it is in the same task as the requester, so it
holds the blob in the same layout.

Serving uses ``os.sendfile`` (through `FileRegion` on the general HTTP server, directly on
the lean path of `p2pd.piecehttp` that a daemon's peer port runs); receiving reads the head
with a small parser and the body with ``recv_into`` straight into the caller's buffer -- the
two choices the measurements in DESIGN.md favour by an order of magnitude over a general
HTTP client. Both
ends are ours, so the client is strict: anything but a well-formed 200 with the expected
Content-Length is an error and the connection is dropped.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable

import trio

from p2pd.blobs import BlobManager
from p2pd.clusterauth import HEADER, ClusterAuth, ClusterAuthError
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.http.server import FileRegion, HTTPError, Request, Response

log = logging.getLogger(__name__)

PIECE_PATH = re.compile(r"/pieces/([0-9a-f]{64})/(0|[1-9][0-9]{0,8})")
HAVE_PATH = re.compile(r"/have/([0-9a-f]{64})")
_PIECE_SIZE_VALUE = re.compile(r"[1-9][0-9]{0,9}")
_KNOWN_VALUE = re.compile(r"0|[1-9][0-9]{0,8}")
_MAX_HEAD = 8192
_HEAD_READ = 65536  # a response head is read with what follows of the body, up to this


class RateLimiter:
    """A token bucket shared by all transfers in one direction; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 1 << 20)
        self._tokens = self.burst
        self._stamp: float | None = None
        self._lock = trio.Lock()

    async def consume(self, amount: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            now = trio.current_time()
            if self._stamp is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:
                # pay the debt before anyone else goes: transfers larger than the burst work
                await trio.sleep(-self._tokens / self.rate)
                self._stamp = trio.current_time()
                self._tokens = 0.0


class PieceServer:
    """Serves the pieces this host holds: from complete blobs and from running downloads.

    `handle` answers through the general HTTP server; `p2pd.piecehttp` serves plain piece
    GETs on its lean path with the same checks, in the same order (`check`, `start_upload`,
    `finish_upload`)."""

    def __init__(
        self,
        blobs: BlobManager,
        upload_slots: int,
        limiter: RateLimiter | None = None,
        auth: ClusterAuth | None = None,
        max_watching: int = 1024,
    ) -> None:
        self.blobs = blobs
        self.auth = auth or ClusterAuth(None)
        self.slots = upload_slots * 4  # each child may pipeline a few requests
        self.busy = 0
        self.limiter = limiter or RateLimiter(0)
        self.bytes_served = 0
        self.watching = 0  # watches waiting for a piece (`watch`)
        self.max_watching = max_watching

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return Response(200, [("content-type", "text/plain")], b"ok\n")
        watched = HAVE_PATH.fullmatch(request.path)
        if watched is not None:
            if request.method != "GET":
                raise HTTPError(405, "a watch is a GET", [("allow", "GET")])
            have = await self.watch(
                request.target, watched.group(1), request.header(HEADER), _known(request)
            )
            return Response(200, [(HAVE_HEADER, have)])
        match = PIECE_PATH.fullmatch(request.path)
        if match is None:
            raise HTTPError(
                404 if not request.path.startswith("/pieces/") else 400,
                "not a piece path: want /pieces/<64 hex>/<index>",
            )
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, "pieces are read-only", [("allow", "GET, HEAD")])
        fd, offset, length, have = self.check(
            request.method,
            request.target,
            match.group(1),
            int(match.group(2)),
            request.header(HEADER),
            named_piece_size(request),
        )
        if request.method == "HEAD":
            os.close(fd)
            return Response(200, [("content-length", str(length))])
        uploads = await self.start_upload(fd, length)
        return Response(
            200,
            [
                ("content-type", "application/octet-stream"),
                (UPLOADS_HEADER, str(uploads)),
                (HAVE_HEADER, have),
            ],
            FileRegion(fd, offset, length, on_done=functools.partial(self.finish_upload, fd)),
        )

    def check(
        self,
        method: str,
        target: str,
        hex_digest: str,
        index: int,
        auth: str | None,
        piece_size: int | None = None,
    ) -> tuple[int, int, int, str]:
        """``(fd, offset, length, have)`` of piece `index` of the blob `hex_digest` (64
        lowercase hex), requested as `method` `target` with cluster signature `auth`, in the
        layout of `piece_size` (None: the one the blob is held in); the caller owns the fd.
        `have` is the `HAVE_HEADER` value: the pieces held here now, in that layout.
        `HTTPError` if it may not or cannot be served now: 401, 404 (not held here, or not
        yet), 409 (being downloaded here in another layout), 400 (past the blob's end, or a
        piece size no layout has), 503 (every upload slot busy)."""
        try:
            self.auth.check(auth, method, target)
        except ClusterAuthError as exc:
            raise HTTPError(401, str(exc)) from None
        digest = Digest(hex_digest)
        download = self.blobs.active(digest)
        if download is not None:
            layout = download.layout
            if piece_size is not None and piece_size != layout.piece_size:
                raise HTTPError(
                    409,
                    f"{digest} is cut in {layout.piece_size}-byte pieces here, not {piece_size}",
                )
            if index < layout.count and index not in download.have:
                raise HTTPError(404, f"piece {index} of {digest} not held yet")
            held = download.have
            fd = -1
        else:
            opened = self.blobs.store.open_reader(digest)  # (None: gone, maybe just now)
            if opened is None:
                raise HTTPError(404, f"{digest} is not on this host")
            fd = opened
        try:
            if download is None:
                layout = self._complete_layout(digest, piece_size)
                held = Bitfield.full(layout.count)
            if index >= layout.count:
                raise HTTPError(400, f"piece {index} out of range (blob has {layout.count})")
            if self.busy >= self.slots:
                raise HTTPError(503, "all upload slots busy", [("retry-after", "1")])
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if fd < 0:
            assert download is not None
            # a private fd: the download may end (and close its own) while this is sent
            fd = os.dup(download.partial.fd)
        offset, length = layout.span(index)
        return fd, offset, length, encode_have(held)

    async def watch(self, target: str, hex_digest: str, auth: str | None, known: int) -> str:
        """The `HAVE_HEADER` value for blob `hex_digest` once this host holds more than
        `known` of its pieces, or after `WATCH_SECONDS` at the latest (a child that has
        taken all this parent offered waits here for its next piece instead of for the
        supernode to hear of it). 401, 404 (not held here), 503 (too many watches)."""
        try:
            self.auth.check(auth, "GET", target)
        except ClusterAuthError as exc:
            raise HTTPError(401, str(exc)) from None
        digest = Digest(hex_digest)
        download = self.blobs.active(digest)
        if download is None:
            layout = self.blobs.store.layout_of(digest)
            if layout is None:
                raise HTTPError(404, f"{digest} is not on this host")
            return encode_have(Bitfield.full(layout.count))
        if download.have.count() <= known:
            if self.watching >= self.max_watching:
                raise HTTPError(503, "too many watches", [("retry-after", "1")])
            self.watching += 1
            try:
                with trio.move_on_after(WATCH_SECONDS):
                    await download.wait_pieces(known)
            finally:
                self.watching -= 1
        return encode_have(download.have)

    def _complete_layout(self, digest: Digest, piece_size: int | None) -> PieceLayout:
        """The layout to serve complete blob `digest` in: the one named, else the one it was
        downloaded with (`BlobStore.layout_of`, kept in memory)."""
        held = self.blobs.store.layout_of(digest)
        if held is None:
            raise HTTPError(404, f"{digest} is not on this host")
        if piece_size is None or piece_size == held.piece_size:
            return held
        try:
            return _layout_for(held.total_size, piece_size)
        except LayoutError as exc:
            raise HTTPError(400, f"no layout of {digest}: {exc}") from None

    async def start_upload(self, fd: int, length: int) -> int:
        """Count an upload of `length` bytes from `fd` (after the upload limiter's wait);
        returns the uploads under way, this one included (`UPLOADS_HEADER`). The caller
        calls `finish_upload` once it is sent or failed; if this raises, it was called."""
        self.busy += 1
        uploads = self.busy  # counted before the limiter's wait: the others are under way
        try:
            await self.limiter.consume(length)
        except BaseException:
            self.finish_upload(fd)
            raise
        self.bytes_served += length
        return uploads

    def finish_upload(self, fd: int) -> None:
        self.busy -= 1
        os.close(fd)


def encode_have(have: Bitfield) -> str:
    """`HAVE_HEADER`'s value for `have`."""
    return base64.b64encode(have.to_bytes()).decode("ascii")


def decode_have(value: bytes | str, count: int) -> Bitfield | None:
    """The bitfield of a blob of `count` pieces that a `HAVE_HEADER` value names, or None when
    it names none (not base64, or another length): the header is advice, and a parent's
    piece is judged by its hash, not by its headers."""
    try:
        data = base64.b64decode(value, validate=True)
        return Bitfield.from_bytes(count, data)
    except (binascii.Error, ValueError):
        return None


def _known(request: Request) -> int:
    """The piece count a watch names (`KNOWN_HEADER`); 400 if absent or malformed."""
    named = [v for k, v in request.headers if k == KNOWN_HEADER]
    if len(named) != 1 or not _KNOWN_VALUE.fullmatch(named[0]):
        raise HTTPError(400, f"want one {KNOWN_HEADER}, a decimal")
    return int(named[0])


def named_piece_size(request: Request) -> int | None:
    """The piece size a piece request names (`PIECE_SIZE_HEADER`), None if none; 400 if it
    is malformed or named twice."""
    named = [v for k, v in request.headers if k == PIECE_SIZE_HEADER]
    if not named:
        return None
    if len(named) > 1 or not _PIECE_SIZE_VALUE.fullmatch(named[0]):
        raise HTTPError(400, f"want at most one {PIECE_SIZE_HEADER}, a decimal")
    return int(named[0])


@functools.lru_cache(maxsize=64)
def _layout_for(size: int, piece_size: int) -> PieceLayout:
    """A layout a requester names for a complete blob (`PieceLayout.checked`), remembered:
    checked once, not per piece served."""
    return PieceLayout.checked(size, piece_size)


class PieceFetchError(Exception):
    """A parent did not deliver the piece (connection, protocol or status problem)."""

    def __init__(
        self,
        message: str,
        *,
        not_found: bool = False,
        busy: bool = False,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        # it answered 404 (it does not hold the piece, yet) or 409 (it holds the blob cut
        # otherwise, see PIECE_SIZE_HEADER)
        self.not_found = not_found
        self.busy = busy  # it answered 503: all its upload slots are taken; try later
        self.unreachable = unreachable  # refused, reset or closed: it may be gone


# Reading a body from a socket, this host asks the kernel to wake it only once BODY_LOWAT
# bytes are queued (SO_RCVLOWAT; less near the end of the body). Behind a link slower than
# this host reads, each read would otherwise bring a packet or two (1-4 KiB), and the cost of
# a read in the event loop is per call, not per byte: at 25 Mbit/s that was most of a
# host's CPU. Measured in the namespace fleet (issue 5 notes).
BODY_LOWAT = 256 * 1024
# Streams that are not sockets (the storm's in-memory network) have no kernel to ask: there a
# read shorter than COALESCE_BELOW waits COALESCE_DELAY before the next.
COALESCE_BELOW = 32 * 1024
COALESCE_DELAY = 0.002

# A fetch calls its `nearly_done` when the rest of the body is due within this many seconds
# at its rate so far: the next request to that parent then reaches it while this body still
# fills the link (the request's trip, the parent's reaction, the first bytes' trip back).
# 0.15 rather than 0.05: with 0.05 one host alone still fell behind the seeder in the
# namespace fleet (0.39 s per 4 MiB piece where the link takes 0.35; a loaded machine, where
# the parent's reaction to a request takes tens of ms). The two bodies share the parent's
# upload for that long: nothing lost to a lone child, a small share of a busy parent's.
LEAD_SECONDS = 0.15
# A piece response says how many pieces its server is sending, this one included. The early
# request above pays off only for a parent that would otherwise idle: with other children's
# bodies under way its upload stays busy through the gap, and a second request in flight
# would only share it further and slow every piece's hop through the swarm (storm
# simulator, Storm-A at 200 hosts with every body overlapped: 1.17x -> 1.25x the bound). So
# `nearly_done` is called early only when this header says 1 (or is absent: an older peer).
UPLOADS_HEADER = "x-p2p-uploads"
# A piece response from a peer names the pieces of the blob its server holds, as the bytes of
# a `Bitfield` in base64: the child learns of its parent's new pieces with every piece it
# fetches instead of waiting for the parent's announce and then its own call to the supernode
# (each paced by the supernode in a large fleet). Storm simulator, Storm-A: 1000 hosts
# 1.098 / 1.108 / 1.117 -> 1.089 / 1.100 / 1.104 of the bound (71 -> 63 messages per host),
# 3000 hosts 1.204 / 1.229 / 1.240 -> 1.175 / 1.199 / 1.219 (59 -> 43). The child takes it
# only from a parent the supernode offers in full (a peer of its own zone:
# `DownloadSession.offered_in_full`); the seeder does not send it (its offers are the
# supernode's rare-piece claims). Absent or unreadable: the supernode's word alone, as before.
HAVE_HEADER = "x-p2p-have"
# A child that has taken every piece its parent offered watches it: ``GET /have/<digest>``
# with `KNOWN_HEADER` (how many pieces it knows the parent holds) is answered, empty, with
# `HAVE_HEADER` once the parent holds more, or after WATCH_SECONDS. Without it such a child
# waited for the parent's announce and then for its own next call to the supernode (both
# paced in a large fleet). Storm simulator, Storm-A with `HAVE_HEADER` already: 1000 hosts
# 1.089 / 1.100 / 1.104 -> 1.080 / 1.091 / 1.098 of the bound, 3000 hosts 1.175 / 1.199 /
# 1.219 -> 1.153 / 1.175 / 1.194. A server holds at most `max_watching` at once (503 past).
KNOWN_HEADER = "x-p2p-known"
WATCH_SECONDS = 5.0
# The piece size the requester cuts the blob by (see the module docstring).
PIECE_SIZE_HEADER = "x-p2p-piece-size"

# Pieces past its published prefix that a seeder serves cut-through, as they arrive from the
# registry (supernode/seeder.py): the one it is reading and the next, so that a child's
# request for the next is there before its first byte. A child may ask for as many pieces
# past the hashes it knows (`SessionConfig.stream_ahead`) and checks each once its hash came.
STREAM_AHEAD = 2

# Opens a stream to (host, port); the storm's full-stack engine passes an in-memory one.
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


def set_lowat(sock: trio.socket.SocketType, nbytes: int, current: int) -> int:
    """Set the socket's SO_RCVLOWAT to `nbytes`, at most a quarter of its receive buffer;
    return the value set. A low-water mark near the buffer's size makes Linux clamp the
    receive window to it (tcp_set_rcvlowat): the sender then stops at every mark until
    this host wakes, reads and reopens the window -- measured as one host's pull through
    p2pd going from 12.6 to 16-17 s behind a 100 Mbit/s link. Under a quarter, the window
    stays open and the buffer keeps its autotuning, so the mark grows with it."""
    if nbytes > 1:
        nbytes = max(1, min(nbytes, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 4))
    if nbytes != current:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
    return nbytes


class _Conn:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # A socket's bytes go straight into the caller's buffer (recv_into); any other stream
        # is read with receive_some and copied.
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.idle_since = 0.0
        self.lowat = 1  # the socket's SO_RCVLOWAT

    def want(self, nbytes: int) -> None:
        """Wake the next read only once `nbytes` are queued (sockets; 1 is the default).
        Never more than the bytes still due: the last ones would never wake it."""
        if self.sock is not None:
            self.lowat = set_lowat(self.sock, nbytes, self.lowat)

    async def receive_into(self, view: memoryview, *, drained: bool = False) -> int:
        """Read into `view`. `drained`: the last read left the socket's queue empty, so wait
        until it is readable (with SO_RCVLOWAT, until the mark is queued) before reading.
        trio's ``recv_into`` tries the read first and waits only on EAGAIN: right after a
        read that emptied the queue, that try returns the packet or two that came since,
        one more read per wake-up (34-40 reads per 4 MiB piece where 16 wake-ups would do,
        behind a slow link)."""
        if self.sock is not None:
            if drained:
                await trio.lowlevel.wait_readable(self.sock)
            return await self.sock.recv_into(view)
        data = await self.stream.receive_some(len(view))
        view[: len(data)] = data
        return len(data)

    def close_now(self) -> None:
        """Close without waiting (a socket's close is synchronous; other streams are closed
        by their far end's timeout)."""
        if self.sock is not None:
            self.sock.close()


_UPLOADS_NAME = UPLOADS_HEADER.encode("ascii")
_HAVE_NAME = HAVE_HEADER.encode("ascii")


class _Stale(Exception):
    """A pooled connection turned out closed before any byte of the response."""


class PieceClient:
    """Fetches pieces from parents over kept-alive connections, one request per connection.

    Idle connections are kept for `idle_seconds`, well under the server's keep-alive timeout
    (30 s), and a pooled connection that fails before the first response byte is retried once
    on a fresh one: a peer that closed an idle connection is not a peer that is gone.
    """

    def __init__(
        self,
        limiter: RateLimiter | None = None,
        connect_timeout: float = 5.0,
        idle_per_parent: int = 4,
        idle_seconds: float = 15.0,
        auth: ClusterAuth | None = None,
        connect: Connector | None = None,
        lead_seconds: float = LEAD_SECONDS,
    ) -> None:
        self.limiter = limiter or RateLimiter(0)
        self.auth = auth or ClusterAuth(None)
        self.open_stream: Connector = connect or _open_tcp
        self.connect_timeout = connect_timeout
        self.idle_per_parent = idle_per_parent
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[_Conn]] = {}
        # Watches keep connections of their own: a parent's lean piece path hands a
        # connection that carried anything but a piece GET to its general server for good
        # (`p2pd.piecehttp`), and piece GETs should not follow a watch there.
        self._idle_watches: dict[str, list[_Conn]] = {}
        self.bytes_received = 0
        self.lead_seconds = lead_seconds

    async def fetch(
        self,
        address: str,
        digest: Digest,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
        *,
        piece_size: int | None = None,
    ) -> bytes | None:
        """Fill `buffer` (exactly the piece's length) with piece `index` from `address`, the
        blob cut in `piece_size`-byte pieces (`PIECE_SIZE_HEADER`; None: the parent's layout).
        Returns the response's `HAVE_HEADER` value (None without one): see `decode_have`.

        `nearly_done` is called once when the rest of the body should arrive within
        `lead_seconds` at the rate it has come so far (or when it has all arrived): time to
        ask this parent for the next piece, so that its upload has that request in hand
        before this body's last bytes leave it, instead of idling for a round trip and the
        parent's reaction time after every piece. The transfer may still fail after it.
        """
        target = f"/pieces/{digest.hex}/{index}"
        extra = f"{PIECE_SIZE_HEADER}: {piece_size}\r\n" if piece_size is not None else ""
        request = self._get(address, target, extra)
        return await self._send(address, request, index, buffer, nearly_done, self._idle)

    def _get(self, address: str, target: str, extra: str) -> bytes:
        """A signed GET of `target` from `address` with `extra` header lines."""
        signature = self.auth.sign("GET", target)
        auth_line = f"{HEADER}: {signature}\r\n" if signature else ""
        return f"GET {target} HTTP/1.1\r\nHost: {address}\r\n{auth_line}{extra}\r\n".encode("ascii")

    async def _send(
        self,
        address: str,
        request: bytes,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None,
        pool: dict[str, list[_Conn]],
    ) -> bytes | None:
        """`request` on a connection to `address` from `pool`, else on a new one (see the
        class docstring), kept in `pool` after; the response's body into `buffer`, its
        `HAVE_HEADER` value returned."""
        conn = self._pooled(address, pool)
        if conn is not None:
            try:
                return await self._attempt(
                    conn, address, request, index, buffer, nearly_done, pool, pooled=True
                )
            except _Stale:
                pass
        conn = await self._connect(address)
        try:
            return await self._attempt(
                conn, address, request, index, buffer, nearly_done, pool, pooled=False
            )
        except _Stale as exc:
            raise PieceFetchError(
                f"{address}: connection closed before a response", unreachable=True
            ) from exc

    async def watch(self, address: str, digest: Digest, known: int) -> bytes | None:
        """Wait for the parent at `address` to hold more than `known` pieces of `digest`
        (at most `WATCH_SECONDS`, see `KNOWN_HEADER`); its `HAVE_HEADER` value, or None if
        it sent none. `PieceFetchError` if it failed or refused."""
        request = self._get(address, f"/have/{digest.hex}", f"{KNOWN_HEADER}: {known}\r\n")
        empty = memoryview(bytearray())
        try:
            with trio.fail_after(WATCH_SECONDS + self.connect_timeout):
                return await self._send(address, request, -1, empty, None, self._idle_watches)
        except trio.TooSlowError:
            raise PieceFetchError(
                f"{address}: no answer to a watch in time", unreachable=True
            ) from None

    async def _attempt(
        self,
        conn: _Conn,
        address: str,
        request: bytes,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None,
        pool: dict[str, list[_Conn]],
        *,
        pooled: bool,
    ) -> bytes | None:
        reusable = False
        try:
            have = await self._exchange(conn, address, request, index, buffer, nearly_done)
            reusable = True
            return have
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if pooled:
                raise _Stale from exc
            raise PieceFetchError(f"{address}: {exc}", unreachable=True) from exc
        finally:
            if reusable and len(pool.setdefault(address, [])) < self.idle_per_parent:
                conn.idle_since = trio.current_time()
                pool[address].append(conn)
            else:
                with trio.CancelScope(shield=True):
                    await conn.stream.aclose()

    async def aclose(self) -> None:
        for idle in (self._idle, self._idle_watches):
            conns = [conn for pooled in idle.values() for conn in pooled]
            idle.clear()
            for conn in conns:
                await conn.stream.aclose()

    def _pooled(self, address: str, pool: dict[str, list[_Conn]]) -> _Conn | None:
        idle = pool.get(address)
        oldest_ok = trio.current_time() - self.idle_seconds
        while idle:
            conn = idle.pop()
            if conn.idle_since >= oldest_ok:
                return conn
            conn.close_now()  # too old: the server may have closed it already
        return None

    async def _connect(self, address: str) -> _Conn:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await self.open_stream(host, int(port))
        except (OSError, trio.TooSlowError, ValueError) as exc:
            raise PieceFetchError(f"cannot connect to {address}: {exc}", unreachable=True) from exc
        return _Conn(stream)

    async def _exchange(
        self,
        conn: _Conn,
        address: str,
        request: bytes,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
    ) -> bytes | None:
        """One request and its response on `conn`; the response's `HAVE_HEADER` value. The
        connection may be kept if this returns."""
        await conn.stream.send_all(request)
        head = bytearray()
        chunk: bytes | bytearray = b""
        while b"\r\n\r\n" not in head:
            if len(head) > _MAX_HEAD:
                raise PieceFetchError(f"{address}: response head over {_MAX_HEAD} bytes")
            chunk = await conn.stream.receive_some(_HEAD_READ)
            if not chunk:
                if not head:
                    raise _Stale
                raise PieceFetchError(f"{address}: connection closed in the response head")
            head += chunk
        end = head.index(b"\r\n\r\n")
        status, length, uploads, have = _parse_head(bytes(head[:end]), address)
        body = head[end + 4 :]
        if status != 200:
            raise PieceFetchError(
                f"{address}: {f'piece {index}' if index >= 0 else 'watch'} answered {status}",
                # 409: it holds the blob cut otherwise (PIECE_SIZE_HEADER), so not this piece
                not_found=status in (404, 409),
                busy=status == 503,
            )
        if length != len(buffer):
            raise PieceFetchError(f"{address}: piece {index} is {length} bytes, want {len(buffer)}")
        if len(body) > length:
            raise PieceFetchError(f"{address}: more bytes than the Content-Length")
        buffer[: len(body)] = body
        got = len(body)
        overlap = nearly_done if uploads <= 1 else None  # see UPLOADS_HEADER
        started = trio.current_time()
        first = got  # bytes before the clock started: not part of the rate
        lead = self.lead_seconds
        drained = len(chunk) < _HEAD_READ  # a short read took all there was
        while got < length:
            conn.want(min(BODY_LOWAT, length - got))
            n = await conn.receive_into(buffer[got:], drained=drained)
            drained = True  # short of the body's end: the read took all there was
            if n == 0:
                raise PieceFetchError(
                    f"{address}: connection closed at {got} of {length}", unreachable=True
                )
            got += n
            await self.limiter.consume(n)
            if overlap is not None and got < length:
                # rest / rate <= lead, i.e. rest * elapsed <= lead * measured; the rate is
                # trusted once it was watched for `lead` or over half the body (bytes queued
                # before the first read would make a slow link look fast)
                elapsed = trio.current_time() - started
                measured = got - first
                if (length - got) * elapsed <= lead * measured and (
                    elapsed >= lead or 2 * measured >= length - first
                ):
                    overlap()
                    overlap = nearly_done = None
            if conn.sock is None and n < COALESCE_BELOW and got < length:
                await trio.sleep(COALESCE_DELAY)  # let more bytes gather (see above)
        conn.want(1)  # the next response's head is short
        self.bytes_received += length
        if nearly_done is not None:
            nearly_done()
        return have


async def _open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


def _parse_head(head: bytes, address: str) -> tuple[int, int, int, bytes | None]:
    """Status, Content-Length, the server's uploads (`UPLOADS_HEADER`; 0 when absent) and
    its `HAVE_HEADER` value (None when absent; not checked here)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
        raise PieceFetchError(f"{address}: malformed status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = -1
    uploads = 0
    have: bytes | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise PieceFetchError(f"{address}: malformed header line {line[:80]!r}")
        if name.strip().lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or length != -1:
                raise PieceFetchError(f"{address}: bad Content-Length {text[:20]!r}")
            length = int(text)
        elif name.strip().lower() == b"transfer-encoding":
            raise PieceFetchError(f"{address}: chunked piece responses are not accepted")
        elif name.strip().lower() == _UPLOADS_NAME:
            text = value.strip()
            if not text.isdigit() or len(text) > 9:
                raise PieceFetchError(f"{address}: bad {UPLOADS_HEADER} {text[:20]!r}")
            uploads = int(text)
        elif name.strip().lower() == _HAVE_NAME:
            have = value.strip()
    if status == 200 and length < 0:
        raise PieceFetchError(f"{address}: no Content-Length")
    return status, max(length, 0), uploads, have
