"""The mirror's handler against a registry behind httpx.MockTransport and an in-memory
BlobService: pass-through fidelity, blob serving with ranges, access control, failures."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from p2pd.access import AccessChecker
from p2pd.http.server import FileRegion, ResponseAborted
from p2pd.mirror import upstream_client
from tests.p2pd.fakes import (
    BLOB,
    BLOB_DIGEST,
    CHALLENGE,
    DOCKER_MANIFEST,
    GOOD,
    MANIFEST,
    MANIFEST_DIGEST,
    OCI_MANIFEST,
    OTHER_GOOD,
    OTHER_UPSTREAM,
    UPSTREAM,
    FakeBlobs,
    FakeRegistry,
    body_bytes,
    header_values,
    make_mirror,
    make_request,
    raw_response,
)

BLOB_PATH = f"/v2/library/app/blobs/{BLOB_DIGEST}"


# -- pass-through -------------------------------------------------------------------------------


async def test_repeated_accept_lines_arrive_upstream_in_order_and_nothing_is_added() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    accepts = [DOCKER_MANIFEST, OCI_MANIFEST, "application/vnd.oci.image.index.v1+json"]
    client_headers = [
        ("User-Agent", "skopeo/1.9"),
        *[("Accept", a) for a in accepts],
        ("Authorization", GOOD),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "must not travel"),
        ("Keep-Alive", "timeout=5"),
        ("X-Custom", "kept"),
    ]
    response = await mirror.handle(
        make_request("GET", "/v2/library/app/manifests/v1?ns=registry.test", client_headers)
    )
    assert response.status == 200
    assert await body_bytes(response) == MANIFEST
    [sent] = registry.requests
    # Exactly the client's end-to-end headers, in order, plus the Host httpx sets from the
    # URL: no default Accept/Accept-Encoding/User-Agent/Connection from the httpx client.
    assert sent.headers.raw == [
        (b"Host", b"registry.test"),
        (b"user-agent", b"skopeo/1.9"),
        *[(b"accept", a.encode()) for a in accepts],
        (b"authorization", GOOD.encode()),
        (b"x-custom", b"kept"),
    ]
    assert str(sent.url) == f"{UPSTREAM}/v2/library/app/manifests/v1"


async def test_the_accept_gotcha_merged_lines_would_have_been_a_404() -> None:
    # The fake registry, like distribution, compares each Accept value with the media type.
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    separate = [("Accept", DOCKER_MANIFEST), ("Accept", OCI_MANIFEST)]
    ok = await mirror.handle(make_request("GET", "/v2/library/app/manifests/v1", separate))
    merged = [("Accept", f"{DOCKER_MANIFEST}, {OCI_MANIFEST}")]
    missed = await mirror.handle(make_request("GET", "/v2/library/app/manifests/v1", merged))
    assert (ok.status, missed.status) == (200, 404)


async def test_query_passes_raw_without_ns() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    target = "/v2/library/app/tags/list?n=10&ns=registry.test&last=a%2Fb"
    await body_bytes(await mirror.handle(make_request("GET", target)))
    assert registry.requests[0].url.raw_path == b"/v2/library/app/tags/list?n=10&last=a%2Fb"


async def test_response_status_and_repeated_headers_come_back() -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return raw_response(
            401,
            [
                ("Content-Type", "application/json; charset=utf-8"),
                ("WWW-Authenticate", 'Bearer realm="a"'),
                ("WWW-Authenticate", 'Basic realm="b"'),
                ("Link", "</v2/x?n=1>; rel=next"),
                ("Link", "</v2/y>; rel=other"),
                ("Docker-Content-Digest", str(MANIFEST_DIGEST)),
                ("Connection", "close"),
                ("Keep-Alive", "timeout=1"),
                ("Content-Length", "7"),
            ],
            b"denied!",
        )

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    response = await mirror.handle(make_request("GET", "/v2/"))
    assert response.status == 401
    names = [k.lower() for k, _ in response.headers]
    assert "connection" not in names and "keep-alive" not in names
    assert header_values(response, "www-authenticate") == ['Bearer realm="a"', 'Basic realm="b"']
    assert header_values(response, "link") == ["</v2/x?n=1>; rel=next", "</v2/y>; rel=other"]
    assert header_values(response, "docker-content-digest") == [str(MANIFEST_DIGEST)]
    assert header_values(response, "content-type") == ["application/json; charset=utf-8"]
    assert header_values(response, "content-length") == ["7"]
    assert await body_bytes(response) == b"denied!"


async def test_head_manifest_keeps_length_and_sends_no_body() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    response = await mirror.handle(make_request("HEAD", "/v2/library/app/manifests/v1"))
    assert response.status == 200
    assert header_values(response, "content-length") == [str(len(MANIFEST))]
    assert header_values(response, "docker-content-digest") == [str(MANIFEST_DIGEST)]
    assert response.body == b""
    assert registry.requests[0].method == "HEAD"


async def test_compressed_body_passes_raw_and_redirects_are_not_followed() -> None:
    packed = gzip.compress(b"{}" * 1000)
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/tags/list"):
            return raw_response(
                200, [("Content-Encoding", "gzip"), ("Content-Length", str(len(packed)))], packed
            )
        return raw_response(307, [("Location", "https://storage.test/x")])

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    tags = await mirror.handle(
        make_request("GET", "/v2/a/tags/list", [("Accept-Encoding", "gzip")])
    )
    assert header_values(tags, "content-encoding") == ["gzip"]
    assert await body_bytes(tags) == packed
    moved = await mirror.handle(make_request("GET", "/v2/a/manifests/sha256:" + "a" * 64))
    assert moved.status == 307 and header_values(moved, "location") == ["https://storage.test/x"]
    await body_bytes(moved)
    assert [r.url.host for r in seen] == ["registry.test", "registry.test"]


async def test_bodies_are_streamed_not_buffered() -> None:
    release = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first;"
        await release.wait()
        yield b"second"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=slow_body())

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    response = await mirror.handle(make_request("GET", "/v2/a/manifests/v1"))
    assert header_values(response, "content-length") == []  # chunked, as upstream sent it
    assert not isinstance(response.body, bytes | FileRegion)
    chunks = response.body.__aiter__()
    assert await chunks.__anext__() == b"first;"  # before the upstream has finished
    release.set()
    assert await chunks.__anext__() == b"second"
    await body_bytes(response)


async def test_short_upstream_body_aborts_the_response() -> None:
    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[("Content-Length", "10")], content=short())

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    response = await mirror.handle(make_request("GET", "/v2/a/manifests/v1"))
    with pytest.raises(ResponseAborted, match="shorter"):
        await body_bytes(response)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_only_pulls_are_proxied(method: str) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    response = await mirror.handle(make_request(method, "/v2/library/app/blobs/uploads/"))
    assert response.status == 405
    assert header_values(response, "allow") == ["GET, HEAD"]
    assert registry.requests == []


async def test_upstream_down_is_502_and_the_mirror_keeps_serving() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    registry.down = True
    for target in ("/v2/", "/v2/library/app/manifests/v1", BLOB_PATH):
        response = await mirror.handle(make_request("GET", target))
        assert response.status == 502
        message = json.loads(await body_bytes(response))["errors"][0]["message"]
        assert "registry.test" in message and "ConnectError" in message
    registry.down = False
    assert (await mirror.handle(make_request("GET", "/v2/library/app/manifests/v1"))).status == 200


async def test_upstream_client_takes_nothing_from_the_environment() -> None:
    async with upstream_client() as client:
        assert client.trust_env is False and client.follow_redirects is False


async def test_upstream_timeout_is_502() -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("too slow", request=request)

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    response = await mirror.handle(make_request("GET", "/v2/a/manifests/v1"))
    assert response.status == 502 and b"ReadTimeout" in response.body  # type: ignore[operator]


# -- routing through the handler ----------------------------------------------------------------


async def test_routing_ns_prefix_default_and_refusal() -> None:
    hosts: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        hosts.append(f"{request.url.host}{request.url.path}")
        return raw_response(200, [], b"{}")

    mirror, _ = make_mirror(
        transport=httpx.MockTransport(upstream),
        registries={"registry.test": UPSTREAM, "other.test": OTHER_UPSTREAM},
        prefixes={"other.test": OTHER_UPSTREAM},
        default_upstream="",
    )
    statuses = []
    for target in (
        "/v2/a/manifests/v1?ns=other.test",
        "/v2/a/manifests/v1?ns=REGISTRY.test",
        "/v2/other.test/a/b/manifests/v1",
        "/v2/a/manifests/v1",  # no ns, no prefix, no default
        "/v2/a/manifests/v1?ns=evil.test",
        "/v2/a/manifests/v1?ns=registry.test&ns=other.test",
        "/v2/",  # the ping goes to the only prefix upstream
    ):
        response = await mirror.handle(make_request("GET", target))
        await body_bytes(response)
        statuses.append(response.status)
    assert statuses == [200, 200, 200, 403, 403, 400, 200]
    assert hosts == [
        "other.test/v2/a/manifests/v1",
        "registry.test/v2/a/manifests/v1",
        "other.test/v2/a/b/manifests/v1",
        "other.test/v2/",
    ]


async def test_unroutable_ping_is_answered_locally() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(
        registry,
        registries={},
        prefixes={"a": UPSTREAM, "b": OTHER_UPSTREAM},
        default_upstream="",
    )
    response = await mirror.handle(make_request("GET", "/v2/"))
    assert response.status == 200
    assert header_values(response, "docker-distribution-api-version") == ["registry/2.0"]
    assert registry.requests == []


# -- blobs --------------------------------------------------------------------------------------


async def test_blob_get_checks_access_then_streams_from_the_service() -> None:
    registry = FakeRegistry()
    blobs = FakeBlobs()
    mirror, _ = make_mirror(registry, blobs)
    response = await mirror.handle(
        make_request("GET", BLOB_PATH + "?ns=registry.test", [("Authorization", GOOD)])
    )
    assert response.status == 200
    assert response.content_length == len(BLOB)
    assert header_values(response, "docker-content-digest") == [str(BLOB_DIGEST)]
    assert header_values(response, "content-type") == ["application/octet-stream"]
    assert header_values(response, "accept-ranges") == ["bytes"]
    assert await body_bytes(response) == BLOB
    [head] = registry.requests
    assert head.method == "HEAD" and head.url.path == BLOB_PATH
    assert head.headers["authorization"] == GOOD
    [call] = blobs.calls
    assert (call.digest, call.start) == (BLOB_DIGEST, 0)
    assert (call.source.upstream, call.source.repository) == (UPSTREAM, "library/app")
    assert (call.source.authorization, call.source.size) == (GOOD, len(BLOB))
    assert call.closed


async def test_anonymous_access_check_sends_no_authorization() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    await body_bytes(await mirror.handle(make_request("GET", BLOB_PATH)))
    assert "authorization" not in registry.requests[0].headers


async def test_blob_head_answers_as_the_upstream_did_without_the_service() -> None:
    registry = FakeRegistry()
    blobs = FakeBlobs()
    mirror, _ = make_mirror(registry, blobs)
    response = await mirror.handle(make_request("HEAD", BLOB_PATH))
    assert response.status == 200 and response.body == b""
    assert header_values(response, "content-length") == [str(len(BLOB))]
    assert header_values(response, "docker-content-digest") == [str(BLOB_DIGEST)]
    assert blobs.calls == []


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=2500-", 2500, len(BLOB)),  # containerd's resume
        ("bytes=10-1509", 10, 1510),
        ("bytes=0-0", 0, 1),
        ("bytes=1500-999999", 1500, len(BLOB)),
        ("bytes=-100", len(BLOB) - 100, len(BLOB)),
    ],
)
async def test_ranges_give_206_with_exactly_the_bytes(
    regions: bool, spec: str, start: int, end: int
) -> None:
    blobs = FakeBlobs(regions=regions)
    mirror, _ = make_mirror(blobs=blobs)
    response = await mirror.handle(make_request("GET", BLOB_PATH, [("Range", spec)]))
    assert response.status == 206
    assert header_values(response, "content-range") == [f"bytes {start}-{end - 1}/{len(BLOB)}"]
    assert response.content_length == end - start
    assert await body_bytes(response) == BLOB[start:end]
    [call] = blobs.calls
    assert call.start == start
    assert call.closed  # a range ending early closes the service's stream
    assert call.yielded - (end - start) < blobs.chunk  # and did not read on needlessly


@pytest.mark.parametrize(
    "spec", [f"bytes={len(BLOB)}-", "bytes=99999999-", "bytes=-0", f"bytes={10**18}-"]
)
async def test_unsatisfiable_range_is_416(spec: str) -> None:
    blobs = FakeBlobs()
    mirror, _ = make_mirror(blobs=blobs)
    response = await mirror.handle(make_request("GET", BLOB_PATH, [("Range", spec)]))
    assert response.status == 416
    assert header_values(response, "content-range") == [f"bytes */{len(BLOB)}"]
    assert blobs.calls == []


@pytest.mark.parametrize(
    "spec", ["bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=abc", f"bytes={'9' * 5000}-"]
)
async def test_unusable_range_is_ignored(spec: str) -> None:
    mirror, _ = make_mirror()
    response = await mirror.handle(make_request("GET", BLOB_PATH, [("Range", spec)]))
    assert response.status == 200
    assert await body_bytes(response) == BLOB


async def test_if_range_for_another_representation_gets_the_whole_blob() -> None:
    mirror, _ = make_mirror()
    headers = [("Range", "bytes=100-"), ("If-Range", '"sha256:' + "0" * 64 + '"')]
    response = await mirror.handle(make_request("GET", BLOB_PATH, headers))
    assert response.status == 200
    await body_bytes(response)
    headers = [("Range", "bytes=100-"), ("If-Range", f'"{BLOB_DIGEST}"')]
    response = await mirror.handle(make_request("GET", BLOB_PATH, headers))
    assert response.status == 206
    await body_bytes(response)


async def test_service_failing_before_the_first_byte_is_502_after_it_aborts() -> None:
    blobs = FakeBlobs(fail_after=0)
    mirror, _ = make_mirror(blobs=blobs)
    response = await mirror.handle(make_request("GET", BLOB_PATH))
    assert response.status == 502
    assert blobs.calls[0].closed

    blobs.fail_after = 3000
    response = await mirror.handle(make_request("GET", BLOB_PATH))
    assert response.status == 200
    with pytest.raises(RuntimeError, match="exploded"):
        await body_bytes(response)


async def test_service_sending_too_few_or_too_many_bytes_aborts() -> None:
    blobs = FakeBlobs()
    mirror, _ = make_mirror(blobs=blobs)
    blobs.blobs[BLOB_DIGEST] = BLOB[:-1]  # shorter than the upstream says
    with pytest.raises(ResponseAborted, match="early"):
        await body_bytes(await mirror.handle(make_request("GET", BLOB_PATH)))
    blobs.blobs[BLOB_DIGEST] = BLOB + b"x"
    with pytest.raises(ResponseAborted, match="more bytes"):
        await body_bytes(await mirror.handle(make_request("GET", BLOB_PATH)))


async def test_non_sha256_blobs_pass_through() -> None:
    registry = FakeRegistry()
    blobs = FakeBlobs()
    registry.blobs["sha512:" + "ab" * 64] = b"other algorithm"
    mirror, _ = make_mirror(registry, blobs)
    response = await mirror.handle(make_request("GET", "/v2/a/blobs/sha512:" + "ab" * 64))
    assert await body_bytes(response) == b"other algorithm"
    assert blobs.calls == [] and registry.requests[0].method == "GET"


# -- access control -----------------------------------------------------------------------------


async def test_access_is_cached_per_credential_and_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = FakeRegistry()
    registry.tokens = {GOOD, OTHER_GOOD}
    mirror, _ = make_mirror(registry, access_cache_ttl=60)

    async def get(auth: str) -> int:
        response = await mirror.handle(make_request("GET", BLOB_PATH, [("Authorization", auth)]))
        await body_bytes(response)
        return response.status

    assert await get(GOOD) == 200
    assert await get(GOOD) == 200
    assert len(registry.seen("HEAD")) == 1  # the second GET was not re-checked
    assert await get(OTHER_GOOD) == 200
    assert len(registry.seen("HEAD")) == 2  # other credentials: checked
    await trio.sleep(61)
    assert await get(GOOD) == 200
    assert len(registry.seen("HEAD")) == 3  # expired: checked again
    # Only a keyed hash of the credential is kept.
    assert all(GOOD.encode() not in repr(key).encode() for key in mirror.access._cache)
    assert all(isinstance(key[0], bytes) and len(key[0]) == 32 for key in mirror.access._cache)


async def test_access_cache_is_bounded() -> None:
    registry = FakeRegistry()
    async with httpx.AsyncClient(transport=registry.transport) as client:
        checker = AccessChecker(client, ttl=60, max_entries=2)
        for auth in ("Bearer a", "Bearer b", "Bearer c", "Bearer c", "Bearer a"):
            grant = await checker.check(UPSTREAM, "library/app", BLOB_DIGEST, auth)
            assert grant.size == len(BLOB)
    assert len(checker._cache) == 2
    # "a" was evicted by "c" and had to be asked again; the second "c" was a hit.
    assert [r.headers["authorization"] for r in registry.seen("HEAD")] == [
        "Bearer a",
        "Bearer b",
        "Bearer c",
        "Bearer a",
    ]


async def test_refused_client_gets_the_upstreams_401_even_after_someone_was_allowed() -> None:
    registry = FakeRegistry()
    registry.tokens = {GOOD}
    blobs = FakeBlobs(cached={BLOB_DIGEST})  # the bytes are right here on this host
    mirror, _ = make_mirror(registry, blobs)
    allowed = await mirror.handle(make_request("GET", BLOB_PATH, [("Authorization", GOOD)]))
    assert await body_bytes(allowed) == BLOB

    for auth in ([], [("Authorization", "Bearer stolen")]):
        for method in ("GET", "GET", "HEAD"):
            refused = await mirror.handle(make_request(method, BLOB_PATH, auth))
            assert refused.status == 401
            assert header_values(refused, "www-authenticate") == [CHALLENGE]
            assert header_values(refused, "docker-distribution-api-version") == ["registry/2.0"]
            body = await body_bytes(refused)
            if method == "GET":
                assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
                assert header_values(refused, "content-type")[0].startswith("application/json")
                assert header_values(refused, "content-length") == []  # framed by our body
            else:
                assert body == b""
    assert len(blobs.calls) == 1  # only the allowed client got bytes
    # Refusals are never cached: every refused request asked the upstream again.
    assert len(registry.seen("HEAD")) == 1 + 6


async def test_upstream_404_and_500_are_passed_on() -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    missing = f"/v2/library/app/blobs/sha256:{'0' * 64}"
    response = await mirror.handle(make_request("GET", missing))
    assert response.status == 404
    assert json.loads(await body_bytes(response))["errors"][0]["code"] == "BLOB_UNKNOWN"

    def broken(request: httpx.Request) -> httpx.Response:
        return raw_response(503, [("Retry-After", "5")])

    mirror, _ = make_mirror(transport=httpx.MockTransport(broken))
    response = await mirror.handle(make_request("HEAD", BLOB_PATH))
    assert (response.status, header_values(response, "retry-after")) == (503, ["5"])


async def test_redirected_blob_is_allowed_and_sized_without_the_clients_credential() -> None:
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.test":
            return raw_response(307, [("Location", "https://cdn.test/blob?sig=s")])
        if request.method == "HEAD":
            return raw_response(403)  # signed for GET only, like S3
        assert request.headers["range"] == "bytes=0-0"
        return raw_response(206, [("Content-Range", f"bytes 0-0/{len(BLOB)}")], BLOB[:1])

    blobs = FakeBlobs()
    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream), blobs=blobs)
    response = await mirror.handle(make_request("GET", BLOB_PATH, [("Authorization", GOOD)]))
    assert await body_bytes(response) == BLOB
    assert blobs.calls[0].source.size == len(BLOB)
    assert [(r.method, r.url.host) for r in seen] == [
        ("HEAD", "registry.test"),
        ("HEAD", "cdn.test"),
        ("GET", "cdn.test"),
    ]
    assert "authorization" in seen[0].headers
    assert all("authorization" not in r.headers for r in seen[1:])


async def test_head_without_usable_length_is_502() -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return raw_response(200, [("Content-Length", "12"), ("Content-Length", "13")])

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    assert (await mirror.handle(make_request("GET", BLOB_PATH))).status == 502


# -- hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/v2/library/app/blobs/sha256:" + "A" * 64, 400),  # uppercase hex
        ("/v2/library/app/blobs/sha256:abc", 400),  # short
        ("/v2/library/app/blobs/sha256:" + "a" * 65, 400),
        ("/v2/library/app/blobs/..", 400),
        ("/v2/library/../../etc/blobs/sha256:" + "a" * 64, 400),
        ("/v2/library/app/blobs/sha256:..%2f..%2f" + "a" * 58, 400),
        ("/v2/%2e%2e/app/manifests/v1", 400),
        ("/v2/Library/App/manifests/v1", 400),  # names are lowercase
        ("/v2/library//app/manifests/v1", 400),
        ("/v2/library/app/manifests/" + "t" * 200, 400),
        ("/v2/" + "a/" * 200 + "manifests/v1", 400),  # name over 255 characters
        ("/v2/a/manifests/v1?ns=", 400),
        (BLOB_PATH, 200),  # control: a fine request
        ("/etc/passwd", 404),
        ("/", 404),
        ("http://evil.test/v2/", 400),  # absolute-form: never a proxy to elsewhere
    ],
)
async def test_hostile_paths_get_4xx_and_reach_no_upstream(target: str, status: int) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    response = await mirror.handle(make_request("GET", target))
    assert response.status == status, await body_bytes(response)
    if status != 200:
        assert registry.requests == []
        assert json.loads(await body_bytes(response))["errors"][0]["message"]
    else:
        await body_bytes(response)


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", GOOD), ("Authorization", OTHER_GOOD)],
        [("Authorization", "Bearer " + "x" * 9000)],
    ],
)
async def test_bad_authorization_on_blobs_is_400(headers: list[tuple[str, str]]) -> None:
    registry = FakeRegistry()
    mirror, _ = make_mirror(registry)
    response = await mirror.handle(make_request("GET", BLOB_PATH, headers))
    assert response.status == 400
    assert registry.requests == []


# -- logging ------------------------------------------------------------------------------------


async def test_one_log_line_per_request_without_the_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Bearer sekrit-value"
    registry = FakeRegistry()
    registry.tokens = {secret}
    mirror, _ = make_mirror(registry)
    headers = [("Authorization", secret)]
    await body_bytes(await mirror.handle(make_request("GET", BLOB_PATH, headers)))
    await body_bytes(await mirror.handle(make_request("GET", "/v2/a/manifests/v1", headers)))
    await body_bytes(await mirror.handle(make_request("GET", BLOB_PATH + "x")))
    lines = [r.getMessage() for r in caplog.records if r.name == "p2pd.mirror"]
    assert len(lines) == 3
    assert f"GET {BLOB_PATH} -> 200, {len(BLOB)} bytes" in lines[0]
    assert "GET /v2/a/manifests/v1 -> 200" in lines[1]
    assert "-> 400, " in lines[2]
    assert all("sekrit" not in r.getMessage() for r in caplog.records)


async def test_a_zero_size_only_passes_for_the_empty_blobs_digest() -> None:
    """A registry that sizes a blob at 0 bytes must be naming the empty blob: anything else
    would hand the runtime an empty body under a digest it does not have."""
    empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    def upstream(request: httpx.Request) -> httpx.Response:
        return raw_response(200, [("Content-Length", "0")])

    mirror, _ = make_mirror(transport=httpx.MockTransport(upstream))
    lying = await mirror.handle(make_request("GET", BLOB_PATH))
    assert lying.status == 502
    assert b"is empty, which it is not" in await body_bytes(lying)
    honest = await mirror.handle(make_request("GET", f"/v2/library/app/blobs/{empty}"))
    assert honest.status == 200 and await body_bytes(honest) == b""
