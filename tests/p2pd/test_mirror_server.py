"""The mirror behind the real h11 server on 127.0.0.1 (upstream still a MockTransport):
framing of HEAD, ranges and file bodies on the wire, hostile bytes, aborted streams."""

from __future__ import annotations

import httpx
import pytest
import trio

from p2pd.http.server import bound_port, serve
from p2pd.mirror import Mirror
from tests.p2pd.fakes import (
    BLOB,
    BLOB_DIGEST,
    DOCKER_MANIFEST,
    MANIFEST,
    OCI_MANIFEST,
    FakeBlobs,
    FakeRegistry,
    make_mirror,
)

BLOB_PATH = f"/v2/library/app/blobs/{BLOB_DIGEST}"


async def start(nursery: trio.Nursery, mirror: Mirror) -> str:
    listeners = await nursery.start(
        lambda task_status: serve(mirror.handle, "127.0.0.1", 0, task_status=task_status)
    )
    return f"http://127.0.0.1:{bound_port(listeners)}"


async def raw(url: str, data: bytes) -> bytes:
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    with trio.move_on_after(5):
        await stream.send_all(data)
        while chunk := await stream.receive_some(65536):
            out += chunk
    await stream.aclose()
    return out


async def test_blob_bodies_ranges_and_heads_on_the_wire(nursery: trio.Nursery) -> None:
    blobs = FakeBlobs(regions=True, chunk=4096)  # sent with sendfile
    mirror, _ = make_mirror(blobs=blobs)
    url = await start(nursery, mirror)
    async with httpx.AsyncClient(base_url=url) as client:
        whole = await client.get(BLOB_PATH)
        assert whole.status_code == 200 and whole.content == BLOB
        assert whole.headers["content-length"] == str(len(BLOB))
        part = await client.get(BLOB_PATH, headers={"Range": "bytes=5000-5099"})
        assert part.status_code == 206 and part.content == BLOB[5000:5100]
        resumed = await client.get(BLOB_PATH, headers={"Range": "bytes=9000-"})
        assert resumed.content == BLOB[9000:]
        head = await client.head(BLOB_PATH)
        assert head.headers["content-length"] == str(len(BLOB)) and head.content == b""
        manifest = await client.head("/v2/library/app/manifests/v1")
        assert manifest.headers["content-length"] == str(len(MANIFEST))
        assert (await client.get(BLOB_PATH)).content == BLOB  # connection reuse after HEADs


async def test_repeated_accept_lines_survive_the_whole_way(nursery: trio.Nursery) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    url = await start(nursery, mirror)
    out = await raw(
        url,
        b"GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n"
        + f"Accept: {DOCKER_MANIFEST}\r\nAccept: {OCI_MANIFEST}\r\n".encode()
        + b"Connection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(MANIFEST)
    assert registry.requests[0].headers.get_list("accept") == [DOCKER_MANIFEST, OCI_MANIFEST]


async def test_broken_blob_stream_truncates_and_the_mirror_lives(nursery: trio.Nursery) -> None:
    blobs = FakeBlobs(fail_after=3000)
    mirror, _ = make_mirror(blobs=blobs)
    url = await start(nursery, mirror)
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(BLOB_PATH)
        blobs.fail_after = None
        assert (await client.get(BLOB_PATH)).content == BLOB


async def test_upstream_down_then_back(nursery: trio.Nursery) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    url = await start(nursery, mirror)
    async with httpx.AsyncClient(base_url=url) as client:
        registry.down = True
        down = await client.get("/v2/library/app/manifests/v1")
        assert down.status_code == 502 and "unreachable" in down.json()["errors"][0]["message"]
        registry.down = False
        assert (await client.get("/v2/library/app/manifests/v1")).status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # (the server's head limit is 64 KiB per read, so a head below 128 KiB may still pass)
        (b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", b"431"),
        (b"GET /v2/ HTTP/1.1\r\nHost: m\r\nBad Header\r\n\r\n", b"400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, b"400"),  # TLS hello
        (b"GET /v2/a/../../x HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n", b"400"),
        (
            b"GET http://evil.test/v2/ HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
            b"400",
        ),
        (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n", b"405"),
    ],
)
async def test_hostile_bytes_get_4xx_and_the_mirror_lives(
    nursery: trio.Nursery, request_bytes: bytes, status: bytes
) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    url = await start(nursery, mirror)
    out = await raw(url, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status), out[:200]
    assert registry.requests == []
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v2/")).status_code == 200
