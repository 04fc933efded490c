"""Test doubles for the mirror: a registry behind httpx.MockTransport, an in-memory BlobService,
and requests built without a socket (so component tests can run on MockClock)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import h11
import httpx
import trio

from p2pd.blobs import BlobSource
from p2pd.config import P2pdConfig
from p2pd.core.digest import Digest
from p2pd.http.server import FileRegion, Request, Response
from p2pd.mirror import Mirror

UPSTREAM = "http://registry.test"
OTHER_UPSTREAM = "http://other.test"
GOOD = "Bearer good-token"
OTHER_GOOD = "Bearer other-token"
CHALLENGE = 'Bearer realm="http://auth.test/token",service="registry.test"'
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def digest_of(data: bytes) -> Digest:
    return Digest.from_bytes(hashlib.sha256(data).digest())


BLOB = bytes(range(256)) * 40  # 10240 bytes
BLOB_DIGEST = digest_of(BLOB)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()
MANIFEST_DIGEST = digest_of(MANIFEST)


class FakeRegistry:
    """A registry in memory. With `tokens` set, only those Authorization values are let in
    (others get 401 + WWW-Authenticate, like distribution). Records every request."""

    def __init__(self, base: str = UPSTREAM) -> None:
        self.base = base
        self.requests: list[httpx.Request] = []
        self.blobs: dict[str, bytes] = {str(BLOB_DIGEST): BLOB}
        self.manifests: dict[str, tuple[str, bytes]] = {"v1": (OCI_MANIFEST, MANIFEST)}
        self.tokens: set[str] | None = None
        self.down = False

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.requests.append(request)
        api = [("docker-distribution-api-version", "registry/2.0")]
        if self.tokens is not None and request.headers.get("authorization") not in self.tokens:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            headers = [
                ("content-type", "application/json; charset=utf-8"),
                ("www-authenticate", CHALLENGE),
                *api,
            ]
            return _answer(request, 401, headers, body)
        path = request.url.path
        if path == "/v2/":
            return _answer(request, 200, [("content-type", "application/json"), *api], b"{}")
        parts = path.split("/")
        if "/manifests/" in path:
            found = self.manifests.get(parts[-1])
            accepted = request.headers.get_list("accept")
            wanted = {a.strip() for a in accepted}
            if found is None or (wanted and not wanted & {found[0], "*/*"}):
                return _answer(request, 404, api, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            media_type, body = found
            headers = [
                ("content-type", media_type),
                ("docker-content-digest", str(digest_of(body))),
                ("etag", f'"{digest_of(body)}"'),
                *api,
            ]
            return _answer(request, 200, headers, body)
        if "/blobs/" in path:
            blob = self.blobs.get(parts[-1])
            if blob is None:
                return _answer(request, 404, api, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            headers = [
                ("content-type", "application/octet-stream"),
                ("docker-content-digest", parts[-1]),
                ("accept-ranges", "bytes"),
                *api,
            ]
            return _answer(request, 200, headers, blob)
        return _answer(request, 404, api, b"")

    def seen(self, method: str | None = None, path_part: str = "") -> list[httpx.Request]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and path_part in r.url.path
        ]


class RawStream(httpx.AsyncByteStream):
    """A body as a real transport delivers it: unread until iterated (httpx reads and
    decodes ``content=bytes`` at once, which no network response does)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def raw_response(
    status: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> httpx.Response:
    return httpx.Response(status, headers=list(headers), stream=RawStream(body))


def _answer(
    request: httpx.Request, status: int, headers: list[tuple[str, str]], body: bytes
) -> httpx.Response:
    """Like a real server: Content-Length always, the body only for GET."""
    headers = [*headers, ("content-length", str(len(body)))]
    return raw_response(status, headers, b"" if request.method == "HEAD" else body)


@dataclass
class StreamCall:
    digest: Digest
    source: BlobSource
    start: int
    closed: bool = False
    yielded: int = 0


@dataclass
class FakeBlobs:
    """A BlobService serving blobs from memory in `chunk`-byte pieces; records its calls.

    `regions=True` yields FileRegions of a temp file instead of bytes. `fail_after` makes the
    stream raise after that many bytes (0: before the first).
    """

    blobs: dict[Digest, bytes] = field(default_factory=lambda: {BLOB_DIGEST: BLOB})
    chunk: int = 1000
    regions: bool = False
    fail_after: int | None = None
    cached: set[Digest] = field(default_factory=set)
    calls: list[StreamCall] = field(default_factory=list)

    def cached_size(self, digest: Digest) -> int | None:
        return len(self.blobs[digest]) if digest in self.cached else None

    def stream(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[bytes | FileRegion]:
        call = StreamCall(digest, source, start)
        self.calls.append(call)
        return self._stream(call)

    async def _stream(self, call: StreamCall) -> AsyncIterator[bytes | FileRegion]:
        data = self.blobs[call.digest]
        fd = -1
        if self.regions:
            fd, path = tempfile.mkstemp()
            os.unlink(path)
            os.write(fd, data)
        try:
            for offset in range(call.start, len(data), self.chunk):
                await trio.lowlevel.checkpoint()
                if self.fail_after is not None and call.yielded >= self.fail_after:
                    raise RuntimeError("swarm exploded")
                n = min(self.chunk, len(data) - offset)
                call.yielded += n
                yield FileRegion(fd, offset, n) if self.regions else data[offset : offset + n]
        finally:
            call.closed = True
            if fd >= 0:
                os.close(fd)


def make_request(method: str, target: str, headers: Sequence[tuple[str, str]] = ()) -> Request:
    """A server `Request` without a socket (the mirror never reads GET/HEAD bodies)."""
    event = h11.Request(method=method, target=target, headers=[("Host", "mirror"), *headers])

    async def receive() -> h11.Event:
        return h11.EndOfMessage()

    return Request(event, h11.Connection(h11.SERVER), receive, "test-client")


async def body_bytes(response: Response) -> bytes:
    """The response body as the server would send it (FileRegions read from their file)."""
    body = response.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, FileRegion):
        return os.pread(body.fd, body.length, body.offset)
    out = bytearray()
    try:
        async for chunk in body:
            if isinstance(chunk, FileRegion):
                out += os.pread(chunk.fd, chunk.length, chunk.offset)
            else:
                out += chunk
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
    return bytes(out)


def header_values(response: Response, name: str) -> list[str]:
    return [v for k, v in response.headers if k.lower() == name]


def make_mirror(
    registry: FakeRegistry | None = None,
    blobs: FakeBlobs | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    config: P2pdConfig | None = None,
    **options: object,
) -> tuple[Mirror, httpx.AsyncClient]:
    """A Mirror over a fake upstream. Default routing: ns "registry.test" and the default
    upstream both go to UPSTREAM."""
    if config is None:
        raw: dict[str, object] = {
            "registries": {"registry.test": UPSTREAM, "other.test": OTHER_UPSTREAM},
            "default_upstream": UPSTREAM,
        }
        raw.update(options)
        config = P2pdConfig.from_mapping(raw)
    if transport is None:
        transport = (registry or FakeRegistry()).transport
    client = httpx.AsyncClient(transport=transport, follow_redirects=False)
    return Mirror(config, client, blobs or FakeBlobs()), client


Handler = Callable[[httpx.Request], httpx.Response]
