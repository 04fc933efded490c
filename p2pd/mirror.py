"""The registry mirror: what container runtimes on this host talk to (containerd's hosts.toml,
registries.conf of skopeo/podman/CRI-O, Docker's registry-mirrors), on loopback.

One request, in order:
1. Only ``GET`` and ``HEAD`` (a pull-only mirror; anything else is 405). The target must be an
   origin-form ``/v2`` path of plain characters (`p2pd.upstream.check_target`).
2. Pick the upstream (`p2pd.upstream.Router`): ``?ns=``, a path prefix, the default upstream;
   nothing else is ever contacted.
3. ``GET``/``HEAD /v2/<name>/blobs/sha256:<hex>``: the upstream first confirms that this client
   may read the blob (`p2pd.access`), then the bytes come from the `BlobService` (cache, swarm
   or registry), streamed in order. ``Range: bytes=N-`` (containerd resumes that way),
   ``bytes=N-M`` and ``bytes=-K`` give 206; an unsatisfiable range gives 416.
4. Everything else (the ``/v2/`` ping, manifests, tag lists, referrers, blobs of other digest
   algorithms) passes through: same method, path (minus the routing prefix) and query (minus
   ``ns``), and *all* request headers in order, repeated ones unmerged (skopeo sends six
   ``Accept`` lines; merging them makes registries answer 404 for OCI manifests), except
   hop-by-hop ones and Host. The answer comes back the same way: status, every header
   (repeated ``WWW-Authenticate``, ``Link``...) but hop-by-hop ones, and the raw body streamed
   (never decoded, never buffered whole). Redirects are passed on, not followed.
5. The upstream unreachable → 502 with the reason; runtimes then fall back to the registry.

The httpx client must add nothing of its own: requests are built as bare `httpx.Request`s (so
the client's default Accept, Accept-Encoding, User-Agent and cookies are not merged in) and
sent with ``auth=None``. Build the client with `upstream_client` (no redirects, no environment:
``trust_env`` would bring in proxies from the environment and, worse for an access-controlled
mirror, credentials from ~/.netrc).

Every request is logged once when its response is finished: client, method, path, status,
body bytes sent and duration. Never the Authorization value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Self

import httpx
import trio

from p2pd.access import AccessChecker, AccessRefused, UpstreamUnavailable
from p2pd.blobs import BlobService, BlobSource
from p2pd.config import P2pdConfig
from p2pd.core.digest import Digest
from p2pd.http.server import FileRegion, Request, Response, ResponseAborted
from p2pd.upstream import (
    BlobPath,
    Route,
    RouteError,
    Router,
    check_target,
    forwardable_request_headers,
    forwardable_response_headers,
    parse_v2_path,
)
from p2pd.wire import MAX_AUTHORIZATION

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
Chunk = bytes | FileRegion
API_VERSION = ("docker-distribution-api-version", "registry/2.0")
_AUTHORIZATION = re.compile(r"[ -~]+")
_RANGE = re.compile(r"bytes=(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))")
_ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 429: "TOOMANYREQUESTS"}


def upstream_client(
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
) -> httpx.AsyncClient:
    """The httpx client the mirror wants: no redirects followed, nothing from the environment."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        follow_redirects=False,
        trust_env=False,
    )


def oci_error(status: int, code: str, message: str, headers: Headers | None = None) -> Response:
    """An error in the distribution spec's JSON form, which runtimes print to the user."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode() + b"\n"
    out = [("content-type", "application/json; charset=utf-8"), API_VERSION, *(headers or [])]
    return Response(status, out, body)


class Mirror:
    def __init__(
        self,
        config: P2pdConfig,
        client: httpx.AsyncClient,
        blobs: BlobService,
        *,
        router: Router | None = None,
        access: AccessChecker | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.blobs = blobs
        self.router = router or Router.from_config(config)
        self.access = access or AccessChecker(client, config.access_cache_ttl)

    async def handle(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            response = await self._dispatch(request)
        except RouteError as exc:
            response = oci_error(exc.status, exc.code, exc.message)
        except UpstreamUnavailable as exc:
            log.warning("mirror: %s", exc)
            response = oci_error(502, "UNAVAILABLE", str(exc))
        if isinstance(response.body, _LoggedBody):
            response.body.set_log(request, response.status, started)
        else:
            body = response.body
            sent = len(body) if isinstance(body, bytes) and request.method != "HEAD" else 0
            _log_request(request, response.status, sent, started)
        return response

    async def _dispatch(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return oci_error(
                405,
                "UNSUPPORTED",
                "this mirror only serves pulls (GET and HEAD)",
                [("allow", "GET, HEAD")],
            )
        check_target(request.target, request.path)
        ns_values = request.query.get("ns")
        if ns_values is not None and (len(ns_values) != 1 or not ns_values[0]):
            raise RouteError(400, "UNSUPPORTED", "give ?ns= once, with a registry host")
        route = self.router.route(request.path, ns_values[0] if ns_values else None)
        if route.via == "local":
            body = b"{}" if request.method == "GET" else b""
            return Response(200, [("content-type", "application/json"), API_VERSION], body)
        target = parse_v2_path(route.path)
        if isinstance(target, BlobPath):
            return await self._blob(request, route, target)
        return await self._pass_through(request, route)

    # -- pass-through -----------------------------------------------------------------------

    async def _pass_through(self, request: Request, route: Route) -> Response:
        query = _query_without_ns(request.target)
        url = route.url + (f"?{query}" if query else "")
        upstream_request = httpx.Request(
            request.method, url, headers=forwardable_request_headers(request.headers)
        )
        try:
            upstream = await self.client.send(
                upstream_request, stream=True, auth=None, follow_redirects=False
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"upstream {route.upstream} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        headers = forwardable_response_headers(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.headers.raw]
        )
        status = upstream.status_code
        if request.method == "HEAD" or status in (204, 304):
            await upstream.aclose()
            if request.method == "HEAD" and "content-length" not in upstream.headers:
                # No length upstream means it would have sent chunked; so do we.
                return Response(status, headers, _UpstreamBody(upstream, None))
            return Response(status, headers, b"")
        length = upstream.headers.get("content-length")
        expected = int(length) if length is not None and length.isdigit() else None
        return Response(status, headers, _UpstreamBody(upstream, expected))

    # -- blobs ------------------------------------------------------------------------------

    async def _blob(self, request: Request, route: Route, target: BlobPath) -> Response:
        authorization = _authorization(request)
        try:
            grant = await self.access.check(
                route.upstream, target.name, target.digest, authorization
            )
        except AccessRefused as refused:
            return _refusal(request.method, refused)
        if request.method == "HEAD":
            return Response(200, list(grant.headers), b"")
        digest, size = target.digest, grant.size
        headers: Headers = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", str(digest)),
            ("accept-ranges", "bytes"),
            ("etag", f'"{digest}"'),
            API_VERSION,
        ]
        span = _requested_range(request, digest, size)
        if isinstance(span, str):  # "unsatisfiable"
            return oci_error(
                416,
                "SIZE_INVALID",
                f"range not satisfiable for a blob of {size} bytes",
                [("content-range", f"bytes */{size}")],
            )
        status = 200
        start, end = 0, size  # end exclusive
        if span is not None:
            start, end = span
            status = 206
            headers.append(("content-range", f"bytes {start}-{end - 1}/{size}"))
        if end == start:  # an empty blob: nothing to fetch, but it must be *the* empty blob
            if size == 0 and digest.raw != _EMPTY_SHA256:
                log.warning("mirror: the registry sizes %s at 0 bytes", digest)
                return oci_error(
                    502, "UNAVAILABLE", f"the registry says {digest} is empty, which it is not"
                )
            return Response(status, headers, b"")
        source = BlobSource(route.upstream, target.name, authorization, size)
        body = _BlobBody(self.blobs.stream(digest, source, start), end - start, cut=end < size)
        try:
            await body.prime()
        except Exception as exc:
            # Nothing is sent yet: a clean 502 makes the runtime fall back to the registry.
            await body.aclose()
            log.warning("mirror: blob %s failed before its first byte", digest, exc_info=True)
            return oci_error(502, "UNAVAILABLE", f"blob {digest} unavailable: {exc}")
        return Response(status, headers, body, content_length=end - start)


# -- helpers ------------------------------------------------------------------------------------

_EMPTY_SHA256 = hashlib.sha256(b"").digest()


def _query_without_ns(target: str) -> str:
    """The raw query minus ``ns`` parameters; the rest is sent upstream byte for byte."""
    query = target.partition("?")[2]
    return "&".join(p for p in query.split("&") if p and p.partition("=")[0] != "ns")


def _authorization(request: Request) -> str | None:
    values = [v for k, v in request.headers if k.lower() == "authorization"]
    if not values:
        return None
    # One, printable and bounded: it is forwarded upstream and to the supernode.
    if len(values) > 1:
        raise RouteError(400, "UNAUTHORIZED", "more than one Authorization header")
    value = values[0].strip()
    if not value:
        return None
    if len(value) > MAX_AUTHORIZATION or _AUTHORIZATION.fullmatch(value) is None:
        raise RouteError(400, "UNAUTHORIZED", "malformed Authorization header")
    return value


def _refusal(method: str, refused: AccessRefused) -> Response:
    """The upstream's refusal passed on. The access check was a HEAD, so it had no body: a GET
    gets the same status and headers with a distribution-style JSON error as its body."""
    if method == "HEAD":
        return Response(refused.status, refused.headers, b"")
    drop = {"content-length", "content-encoding"}
    headers = [(k, v) for k, v in refused.headers if k.lower() not in drop]
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    if "json" not in content_type:
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        headers.append(("content-type", "application/json; charset=utf-8"))
    code = _ERROR_CODES.get(refused.status, "UNKNOWN")
    message = f"the upstream registry answered {refused.status} for this blob"
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode() + b"\n"
    return Response(refused.status, headers, body)


def _requested_range(request: Request, digest: Digest, size: int) -> tuple[int, int] | str | None:
    """(start, end exclusive), "unsatisfiable", or None for the whole blob.

    A Range we cannot parse, or several ranges, is ignored (RFC 9110 allows serving the whole
    representation); so is a Range whose If-Range names another representation.
    """
    values = [v for k, v in request.headers if k.lower() == "range"]
    if len(values) != 1:
        return None
    match = _RANGE.fullmatch(values[0].replace(" ", ""))
    if match is None:
        return None
    if_range = request.header("if-range")
    if if_range is not None and if_range.strip() != f'"{digest}"':
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        n = int(suffix)
        return (max(0, size - n), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid range-spec: ignored
    if start >= size:
        return "unsatisfiable"
    end = min(int(last) + 1, size) if last else size
    return start, end


def _log_request(request: Request, status: int, sent: int, started: float) -> None:
    ns = request.query_one("ns")
    where = request.path[:300] + (f" ns={ns[:100]}" if ns else "")
    log.info(
        "%s %s %s -> %d, %d bytes, %.3f s",
        request.client,
        request.method,
        where,
        status,
        sent,
        trio.current_time() - started,
    )


class _LoggedBody:
    """A streamed response body that counts what it yields and logs the request when closed.

    A class rather than an async generator: the server calls ``aclose`` also when it never
    started the body (the client went away after the head), and an unstarted generator's
    ``finally`` would not run, leaking the upstream response.
    """

    def __init__(self) -> None:
        self.sent = 0
        self._log: tuple[Request, int, float] | None = None
        self._closed = False

    def set_log(self, request: Request, status: int, started: float) -> None:
        self._log = (request, status, started)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Chunk:
        chunk = await self._next()
        self.sent += len(chunk)
        return chunk

    async def _next(self) -> Chunk:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._close()
        finally:
            if self._log is not None:
                _log_request(*self._log[:2], self.sent, self._log[2])


class _UpstreamBody(_LoggedBody):
    """The upstream's raw body, as it arrives; a short or broken one aborts our response."""

    def __init__(self, response: httpx.Response, expected: int | None) -> None:
        super().__init__()
        self._response = response
        self._expected = expected
        self._chunks = response.aiter_raw()
        self._received = 0

    async def _next(self) -> bytes:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            if self._expected is not None and self._received != self._expected:
                raise ResponseAborted("upstream body shorter than its Content-Length") from None
            raise
        except httpx.HTTPError as exc:
            raise ResponseAborted(f"upstream body broke off: {type(exc).__name__}") from exc
        self._received += len(chunk)
        return chunk

    async def _close(self) -> None:
        await self._response.aclose()


class _BlobBody(_LoggedBody):
    """`length` bytes of the blob service's stream; with `cut` the stream is longer (a range
    ending before the blob does) and is sliced and closed early, else it must end exactly."""

    def __init__(self, chunks: AsyncIterator[Chunk], length: int, *, cut: bool) -> None:
        super().__init__()
        self._chunks = chunks
        self._remaining = length
        self._cut = cut
        self._primed: Chunk | None = None

    async def prime(self) -> None:
        """Wait for the first bytes before the response head goes out, so that a blob that
        cannot be had at all is a clean 502 rather than a truncated 200."""
        self._primed = await self._pull()

    async def _pull(self) -> Chunk:
        while True:  # skip empty chunks; each turn awaits the service
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise ResponseAborted(f"blob ended {self._remaining} bytes early") from None
            if len(chunk) > 0:
                return chunk

    async def _next(self) -> Chunk:
        if self._remaining == 0:
            if not self._cut:
                await self._expect_end()
            raise StopAsyncIteration
        chunk, self._primed = (self._primed, None) if self._primed is not None else (None, None)
        if chunk is None:
            chunk = await self._pull()
        if len(chunk) > self._remaining:
            if not self._cut:
                raise ResponseAborted("blob service sent more bytes than the blob's size")
            chunk = _head(chunk, self._remaining)
        self._remaining -= len(chunk)
        return chunk

    async def _expect_end(self) -> None:
        # Pulling once more lets the service finish (its final checks run before it ends).
        while True:
            try:
                extra = await anext(self._chunks)
            except StopAsyncIteration:
                return
            if len(extra) > 0:
                raise ResponseAborted("blob service sent more bytes than the blob's size")

    async def _close(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _head(chunk: Chunk, n: int) -> Chunk:
    if isinstance(chunk, FileRegion):
        return dataclasses.replace(chunk, length=n)
    return chunk[:n]
