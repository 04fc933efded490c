"""Shared pieces of the supernode tests: a scriptable fake registry on httpx.MockTransport, a
supernode running in-process on 127.0.0.1:0, and a peer-side client speaking the wire format.

No test here sends a byte off the machine: the upstream URL ``https://registry.test`` only ever
reaches the MockTransport, and the supernode listens on loopback.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import SMALLEST_PIECE_SIZE, PieceLayout
from p2pd.core.manifest import PieceManifest
from supernode.config import from_mapping
from supernode.seeder import Task
from supernode.server import Supernode

UPSTREAM = "https://registry.test"
REPO = "team/app"
PIECE = SMALLEST_PIECE_SIZE


def make_blob(size: int, seed: int = 7) -> tuple[Digest, bytes]:
    data = random.Random(seed).randbytes(size)
    return Digest.from_bytes(hashlib.sha256(data).digest()), data


# Three pieces: two full ones and a short last one.
SIZE = 2 * PIECE + 100_003
DIGEST, BLOB = make_blob(SIZE)
LAYOUT = PieceLayout.for_size(SIZE)
assert LAYOUT.count == 3 and LAYOUT.piece_size == PIECE


@dataclass
class FakeRegistry:
    """A registry as an httpx.MockTransport handler, with scripted misbehaviour.

    ``blobs`` maps digest strings to the bytes served for them (they may be wrong on purpose).
    ``faults`` are statuses answered, one per request, before the blob is served.
    """

    blobs: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None  # required "Authorization" value, if any
    faults: list[int] = field(default_factory=list)
    redirect: bool = False  # answer 307 to a storage host, as S3-backed registries do
    chunk: int = 256 * 1024
    content_length: int | None = None  # a lying Content-Length; None: the true one
    send_length: bool = True
    cut_after: int | None = None  # the first body breaks (ReadError) after this many bytes
    honour_range: bool = True
    hold_after: int | None = None  # the body pauses after this many bytes until `release`
    held: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    requests: list[httpx.Request] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def blob_gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == "registry.test"]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "storage.test":
            return self._blob(request, request.url.params["d"])
        prefix = f"/v2/{REPO}/blobs/"
        if request.method != "GET" or not request.url.path.startswith(prefix):
            return httpx.Response(404)
        if self.token is not None and request.headers.get("authorization") != self.token:
            return httpx.Response(401, headers={"www-authenticate": 'Bearer realm="x"'})
        if self.faults:
            return httpx.Response(self.faults.pop(0))
        digest = request.url.path.removeprefix(prefix)
        if digest not in self.blobs:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        if self.redirect:
            return httpx.Response(307, headers={"location": f"http://storage.test/b?d={digest}"})
        return self._blob(request, digest)

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs[digest]
        status, start = 200, 0
        ranged = request.headers.get("range")
        if ranged is not None and self.honour_range:
            start = int(ranged.removeprefix("bytes=").removesuffix("-"))
            status = 206
        body = data[start:]
        headers = {"content-type": "application/octet-stream"}
        if status == 206:
            headers["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.send_length:
            length = len(body) if self.content_length is None else self.content_length
            headers["content-length"] = str(length)
        cut, self.cut_after = self.cut_after, None
        return httpx.Response(status, headers=headers, content=self._stream(body, cut))

    async def _stream(self, body: bytes, cut: int | None) -> AsyncIterator[bytes]:
        pos = 0
        while pos < len(body):
            end = min(len(body), pos + self.chunk)
            # Chunk edges fall on the hold and cut points, so "held" means the reader has
            # taken everything before them (the seeder absorbs it soon after).
            for mark in (self.hold_after, cut):
                if mark is not None and pos < mark < end:
                    end = mark
            if cut is not None and pos >= cut:
                raise httpx.ReadError("connection reset by the fake registry")
            if self.hold_after is not None and pos == self.hold_after and not self.release.is_set():
                self.held.set()
                await self.release.wait()
            yield body[pos:end]
            pos = end
            await trio.lowlevel.checkpoint()


def config_for(data_dir: Path, **overrides: Any) -> Any:
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "allowed_upstreams": [UPSTREAM],
        "listen": "127.0.0.1:0",
        "seed": 1,
        "fetch": {"backoff": 0.001, "backoff_max": 0.01, "retries": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return from_mapping(raw)


@dataclass
class Harness:
    """A running supernode and a client for it, speaking as any peer."""

    supernode: Supernode
    http: httpx.AsyncClient
    port: int

    @property
    def advertise(self) -> str:
        return f"127.0.0.1:{self.port}"

    def task(self, digest: Digest = DIGEST) -> Task:
        task = self.supernode.tracker.task(digest)
        assert task is not None
        return task

    async def wait_done(self, digest: Digest = DIGEST) -> Task:
        task = self.task(digest)
        with trio.fail_after(20):
            await task.done.wait()
        return task

    async def post(self, path: str, msg: wire.Message) -> httpx.Response:
        return await self.http.post(path, content=wire.encode(msg))

    async def call(self, path: str, msg: wire.Message) -> wire.Assignment:
        r = await self.post(path, msg)
        assert r.status_code == 200, (r.status_code, r.content)
        assert r.headers["content-type"] == "application/msgpack"
        return wire.decode(r.content, expect=wire.Assignment)

    async def refused(self, path: str, msg: wire.Message | bytes) -> tuple[int, wire.Error]:
        body = msg if isinstance(msg, bytes) else wire.encode(msg)
        r = await self.http.post(path, content=body)
        assert 400 <= r.status_code < 500, (r.status_code, r.content)
        return r.status_code, wire.decode(r.content, expect=wire.Error)

    async def register(
        self, peer_id: str, *, digest: Digest = DIGEST, size: int = SIZE, **fields: Any
    ) -> wire.Assignment:
        msg = register_msg(peer_id, digest=digest, size=size, **fields)
        return await self.call("/v1/register", msg)

    async def announce(
        self,
        peer_id: str,
        pieces: tuple[int, ...] = (),
        *,
        known: int = 0,
        want_parents: bool = True,
        digest: Digest = DIGEST,
    ) -> wire.Assignment:
        msg = wire.Announce(digest, peer_id, pieces, known, want_parents)
        return await self.call("/v1/announce", msg)

    async def piece(self, index: int, digest: Digest = DIGEST) -> httpx.Response:
        return await self.http.get(f"/pieces/{digest.hex}/{index}")


def register_msg(
    peer_id: str,
    *,
    digest: Digest = DIGEST,
    size: int = SIZE,
    address: str | None = None,
    zone: str = "",
    upload_slots: int = 8,
    upstream: str = UPSTREAM,
    authorization: str | None = None,
    have: Bitfield | None = None,
) -> wire.Register:
    address = address or f"127.0.0.1:{7000 + sum(peer_id.encode()) % 1000}"
    return wire.Register(
        digest, size, peer_id, address, zone, upload_slots, upstream, REPO, authorization, have
    )


@asynccontextmanager
async def running(
    data_dir: Path,
    registry: FakeRegistry | None,
    *,
    layout_rule: Callable[[int], PieceLayout] = PieceLayout.for_size,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """A supernode on 127.0.0.1:0 whose upstream is `registry`, or the real network (for a
    real registry on loopback, named in ``allowed_upstreams``) when it is None; it cuts blobs
    by `layout_rule`."""
    config = config_for(data_dir, **overrides)
    transport = None if registry is None else registry.transport()
    supernode = Supernode(config, transport=transport, layout_rule=layout_rule)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(supernode.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield Harness(supernode, http, port)
        nursery.cancel_scope.cancel()


def manifest_of(assignment: wire.Assignment, base: PieceManifest | None = None) -> PieceManifest:
    """The peer's view of the manifest after applying `assignment`'s hashes."""
    manifest = base or PieceManifest(assignment.digest, assignment.layout)
    manifest.extend(assignment.manifest_start, assignment.hashes)
    return manifest


async def raw_request(port: int, head: bytes) -> bytes:
    """Send `head` as-is (no client-side URL normalisation); return one whole response (read
    by its Content-Length, so a server still waiting for a request body is no problem)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    try:
        with trio.fail_after(10):
            await stream.send_all(head)
            while b"\r\n\r\n" not in out:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed mid-head: {out!r}"
                out += chunk
            top, _, body = out.partition(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in top.split(b"\r\n")[1:] if b":" in line)
            length = int(fields[b"content-length"].strip())
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                assert chunk, "connection closed mid-body"
                body += chunk
            return top + b"\r\n\r\n" + body
    finally:
        await stream.aclose()
