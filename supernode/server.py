"""The supernode's HTTP face, and `Supernode`, the object that wires the daemon together.

Routes (one port for peers' control calls and piece downloads)::

    POST /v1/register    wire.Register -> 200 wire.Assignment
    POST /v1/announce    wire.Announce -> 200 wire.Assignment
    POST /v1/announce-batch  wire.AnnounceBatch -> 200 wire.BatchReply (an item per announce:
                         an Assignment, or the Error it alone got; see Tracker.announce_batch)
    POST /v1/report      wire.Report   -> 200 wire.Assignment
    POST /v1/leave       wire.Leave    -> 200 wire.Ack
    GET|HEAD /pieces/<64 lowercase hex>/<index>   -> 200 the piece's bytes (sendfile)
    GET|HEAD /healthz    -> 200 "ok"

Control replies are MessagePack (``application/msgpack``); a refused control call gets a 4xx
with a ``wire.Error`` body and one log line: 400 ``bad_request`` (undecodable or invalid
message, index out of range, size mismatch), 403 ``upstream_not_allowed``, 404
``unknown_task`` / ``unknown_peer``, 405 ``method_not_allowed``, 413 ``too_large`` (bodies are
capped at ``wire.MAX_MESSAGE_SIZE``), or 503 ``unavailable`` (a register during shutdown).
Piece and other routes answer errors in plain text: 400 for a malformed path or an index out
of range, 404 for an unknown task or a piece not held yet, 409 for a piece size named
(p2pd.peers.PIECE_SIZE_HEADER) that is not the task's, 405 for another method. The piece
path is matched whole against a strict pattern on the undecoded path, so ``..``,
percent-encoded slashes or upper-case hex never reach a file name.

`_refusal` is the one place where an exception becomes a status and an error code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable

import httpx
import trio

from p2pd import __version__, metrics, wire
from p2pd.clusterauth import HEADER, ClusterAuth, ClusterAuthError
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.http.server import (
    PIECE_CONGESTION,
    FileRegion,
    HTTPError,
    Request,
    Response,
    ServerLimits,
    bound_port,
    prefer_congestion,
)
from p2pd.peers import UPLOADS_HEADER, named_piece_size
from p2pd.store import BlobStore
from supernode import controlhttp
from supernode.config import SupernodeConfig
from supernode.statuspage import STATUS_PAGE
from supernode.tracker import ApiError, Tracker

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
_MSGPACK_HEADER = ("content-type", MSGPACK)
_CONTROL: dict[str, type[wire.Message]] = {
    "/v1/register": wire.Register,
    "/v1/announce": wire.Announce,
    "/v1/announce-batch": wire.AnnounceBatch,
    "/v1/report": wire.Report,
    "/v1/leave": wire.Leave,
}
# Six digits cover every legal index (< 65536) and keep absurd numbers out of int().
_PIECE_PATH = re.compile(r"/pieces/([0-9a-f]{64})/(0|[1-9][0-9]{0,5})")
_ERROR_CODES = {405: "method_not_allowed", 413: "too_large"}


class Supernode:
    """Store, upstream client, tracker and HTTP server of one supernode.

    `transport` replaces the network for the upstream client (tests pass an
    ``httpx.MockTransport``), `layout_rule` the rule that cuts new tasks' blobs (see
    `Tracker`); everything else comes from `config`.
    """

    def __init__(
        self,
        config: SupernodeConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: ServerLimits | None = None,
        layout_rule: Callable[[int], PieceLayout] = PieceLayout.for_size,
    ) -> None:
        self.config = config
        self.limits = limits
        self.store = BlobStore(config.data_dir, config.quota_bytes)
        fetch = config.fetch
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(fetch.read_timeout, connect=fetch.connect_timeout),
            follow_redirects=True,
            trust_env=fetch.trust_env,
            headers={"User-Agent": f"p2p-supernode/{__version__}"},
        )
        self.tracker = Tracker(config, self.store, self.client, layout_rule=layout_rule)
        self.auth = ClusterAuth.from_file(config.cluster_secret_file)
        if not self.auth.enabled:
            log.warning("no cluster_secret_file: anyone who reaches this port may fetch pieces")
        self.messages = 0  # control messages answered
        self.piece_bytes = 0  # piece bytes handed to peers
        self.uploads = 0  # piece responses being sent now
        self.metrics = metrics.registry_for(self.counters, SUPERNODE_COUNTERS, SUPERNODE_GAUGES)
        self.port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status` gets the bound port."""
        async with self.client, trio.open_nursery() as nursery:
            await nursery.start(self.tracker.run)
            listeners = await nursery.start(self._listen)
            self.port = bound_port(listeners)
            self.tracker.advertise = self.config.advertise_for(self.port)
            log.info(
                "supernode listening on port %d, advertised as %s, fetching from %s",
                self.port,
                self.tracker.advertise,
                ", ".join(self.config.allowed_upstreams),
            )
            task_status.started(self.port)

    async def _listen(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(
            self.config.listen_port, host=self.config.listen_host
        )
        # pieces go out on these connections, beside the registry fetches that fill our
        # downlink: see PIECE_CONGESTION
        prefer_congestion(listeners, PIECE_CONGESTION)
        async with trio.open_nursery() as nursery:
            task_status.started(listeners)
            await trio.serve_listeners(self.serve_connection, listeners, handler_nursery=nursery)

    async def serve_connection(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve one accepted connection (any trio stream) until it ends: control POSTs on
        the lean path, the rest through `handle` on the general HTTP server."""
        await controlhttp.serve_connection(
            stream,
            self.control,
            self.handle,
            self.limits or ServerLimits(),
            auth_header=HEADER,
            client=_peer_name(stream),
        )

    def counters(self) -> dict[str, float]:
        values: dict[str, float] = dict(self.tracker.scheduler.stats())
        values["messages"] = self.messages
        values["piece_bytes"] = self.piece_bytes
        values["pace"] = self.tracker.scheduler.pace()
        return values

    async def handle(self, request: Request) -> Response:
        path = request.path
        message_type = _CONTROL.get(path)
        if message_type is not None:
            return await self._control(request, message_type)
        if path.startswith("/pieces/"):
            return self._piece(request)
        if path == "/healthz":
            _allow(request, "GET", "HEAD")
            return Response(200, [("content-type", "text/plain; charset=utf-8")], b"ok\n")
        if path == "/status":
            _allow(request, "GET")
            body = json.dumps(self.tracker.status()).encode()
            return Response(200, [("content-type", "application/json")], body)
        if path in ("/", "/index.html"):
            _allow(request, "GET")
            return Response(200, [("content-type", "text/html; charset=utf-8")], STATUS_PAGE)
        if path == "/metrics":
            _allow(request, "GET")
            body = metrics.render(self.metrics)
            return Response(200, [("content-type", metrics.CONTENT_TYPE)], body)
        raise HTTPError(404, f"no route {path[:100]!r}")

    def control(
        self, path: str, auth: str | None, body: bytes, client: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Answer one control POST to `path` (one of `_CONTROL`, no query): the lean HTTP path
        (`supernode.controlhttp`) calls this with the body already read and bounded."""
        return self._answer(_CONTROL[path], "POST", path, path, auth, body, client)

    async def _control(self, request: Request, message_type: type[wire.Message]) -> Response:
        try:
            if request.method != "POST":
                raise HTTPError(405, f"{request.path} takes POST", [("allow", "POST")])
            body = await request.read_body(wire.MAX_MESSAGE_SIZE)
        except HTTPError as exc:
            status, headers, payload = self._refused(
                exc, request.method, request.path, request.client
            )
        else:
            status, headers, payload = self._answer(
                message_type,
                request.method,
                request.path,
                request.target,
                request.header(HEADER),
                body,
                request.client,
            )
        return Response(status, headers, payload)

    def _answer(
        self,
        message_type: type[wire.Message],
        method: str,
        path: str,
        target: str,
        auth: str | None,
        body: bytes,
        client: str,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            try:
                self.auth.check(auth, method, target, body)
            except ClusterAuthError as exc:
                raise HTTPError(401, str(exc)) from None
            reply = self.tracker.call(wire.decode(body, expect=message_type))
            self.messages += 1
        except (ApiError, HTTPError, wire.ProtocolError) as exc:
            return self._refused(exc, method, path, client)
        return 200, [_MSGPACK_HEADER], wire.encode(reply)

    def _refused(
        self, exc: ApiError | HTTPError | wire.ProtocolError, method: str, path: str, client: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        status, code, message = _refusal(exc)
        log.info("%s %s %s -> %d %s: %s", client, method, path, status, code, message)
        headers = [_MSGPACK_HEADER]
        if isinstance(exc, HTTPError):
            headers += exc.headers
        return status, headers, wire.encode(wire.Error.safe(code, message))

    def _authenticate(self, request: Request, body: bytes = b"") -> None:
        try:
            self.auth.check(request.header(HEADER), request.method, request.target, body)
        except ClusterAuthError as exc:
            raise HTTPError(401, str(exc)) from None

    def _piece(self, request: Request) -> Response:
        _allow(request, "GET", "HEAD")
        self._authenticate(request)
        match = _PIECE_PATH.fullmatch(request.path)
        if match is None:
            raise HTTPError(400, "malformed piece path: want /pieces/<64 lowercase hex>/<index>")
        digest, index = Digest.parse(f"sha256:{match[1]}"), int(match[2])
        try:
            region = self.tracker.open_piece(digest, index, named_piece_size(request))
        except ApiError as exc:
            status, _, message = _refusal(exc)
            raise HTTPError(status, message) from None
        content = "application/octet-stream"
        if not isinstance(region, FileRegion):
            # still arriving from the registry, streamed as it lands (cut-through), to a
            # task's only peer: it may overlap its next request (UPLOADS_HEADER)
            task = self.tracker.task(digest)
            assert task is not None  # open_piece found it
            length = task.layout.length(index)
            self.piece_bytes += length
            headers = [("content-type", content), (UPLOADS_HEADER, "1")]
            return Response(200, headers, region, content_length=length)
        self.piece_bytes += region.length
        self.uploads += 1
        done = region.on_done

        def sent() -> None:
            self.uploads -= 1
            if done is not None:
                done()

        # the peer overlaps its next request only when we serve no one else (UPLOADS_HEADER)
        headers = [("content-type", content), (UPLOADS_HEADER, str(self.uploads))]
        return Response(200, headers, dataclasses.replace(region, on_done=sent))


SUPERNODE_COUNTERS: metrics.Table = {
    "supernode_control_messages": ("control messages answered (a batch counts one)", "messages"),
    "supernode_piece_bytes_sent": ("piece bytes served by the seeder", "piece_bytes"),
    "supernode_parent_links": ("parent links made", "links"),
    "supernode_bad_piece_reports": ("reports of bad pieces", "bad_reports"),
    "supernode_bans": ("parents banned for bad pieces", "bans"),
    "supernode_unreachable_reports": ("reports of unreachable parents", "unreachable_reports"),
    "supernode_peers_expired": ("peers dropped after their TTL", "expired"),
}
SUPERNODE_GAUGES: metrics.Table = {
    "supernode_tasks": ("blobs being tracked", "tasks"),
    "supernode_peers": ("peer memberships over all blobs", "peers"),
    "supernode_active_links": ("current parent links", "active_links"),
    # Seconds the supernode asks each downloading peer to keep between its calls, so that it
    # answers at most its control_rate (Scheduler.pace). Above the peers' own early interval
    # (0.2 s) through a storm, news of pieces reaches the swarm late: run more supernodes
    # (p2p-bench storm, 10 layers at 1000 hosts: 1.67x the bound with one, 1.38x with three).
    "supernode_pace_seconds": ("interval downloading peers are paced to", "pace"),
}


def _peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the other end, for log lines."""
    try:
        sock = getattr(stream, "socket", None)
        peer = sock.getpeername() if sock is not None else getattr(stream, "peer", "?")
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _allow(request: Request, *methods: str) -> None:
    if request.method not in methods:
        allowed = ", ".join(methods)
        raise HTTPError(405, f"{request.path[:100]} takes {allowed}", [("allow", allowed)])


def _refusal(exc: ApiError | HTTPError | wire.ProtocolError) -> tuple[int, str, str]:
    """(HTTP status, wire error code, message) for a refused request."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message
    if isinstance(exc, HTTPError):  # from the HTTP layer: body too large, bad framing, method
        return exc.status, _ERROR_CODES.get(exc.status, "bad_request"), exc.reason
    return 400, "bad_request", str(exc)
