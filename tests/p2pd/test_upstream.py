"""Routing a request to its upstream and parsing /v2 paths (pure functions)."""

from __future__ import annotations

import pytest

from p2pd.core.digest import Digest
from p2pd.upstream import (
    BlobPath,
    ManifestPath,
    OtherPath,
    Route,
    RouteError,
    Router,
    check_target,
    forwardable_request_headers,
    forwardable_response_headers,
    parse_v2_path,
)

HEX = "0123456789abcdef" * 4
A = "http://a.test"
B = "http://b.test"


def test_ns_wins_and_unknown_ns_is_refused() -> None:
    router = Router(registries={"docker.io": A}, prefixes={"docker.io": B}, default_upstream=B)
    assert router.route("/v2/docker.io/x/manifests/v1", "docker.io") == Route(
        A, "/v2/docker.io/x/manifests/v1", "ns"
    )
    assert router.route("/v2/", "DOCKER.IO").upstream == A
    with pytest.raises(RouteError) as info:
        router.route("/v2/", "evil.test")
    assert info.value.status == 403 and "evil.test" in info.value.message


def test_longest_prefix_on_whole_components_is_stripped() -> None:
    router = Router(prefixes={"a": A, "a/b": B})
    assert router.route("/v2/a/b/app/manifests/v1", None) == Route(
        B, "/v2/app/manifests/v1", "prefix"
    )
    assert router.route("/v2/a/app/blobs/sha256:x", None) == Route(
        A, "/v2/app/blobs/sha256:x", "prefix"
    )
    with pytest.raises(RouteError):  # "ab" is not under the prefix "a"
        router.route("/v2/ab/app/manifests/v1", None)


def test_default_then_refusal() -> None:
    assert Router(default_upstream=A).route("/v2/x/manifests/v1", None) == Route(
        A, "/v2/x/manifests/v1", "default"
    )
    with pytest.raises(RouteError) as info:
        Router(registries={"docker.io": A}).route("/v2/x/manifests/v1", None)
    assert info.value.status == 403


def test_the_ping_without_a_default() -> None:
    assert Router(default_upstream=A).route("/v2/", None).via == "default"
    assert Router(prefixes={"x": A, "y": A}).route("/v2/", None) == Route(A, "/v2/", "ping")
    assert Router(prefixes={"x": A, "y": B}).route("/v2/", None).via == "local"
    assert Router().route("/v2/", None).via == "local"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/v2/library/app/blobs/sha256:{HEX}", BlobPath("library/app", Digest(HEX))),
        (f"/v2/a/blobs/b/blobs/sha256:{HEX}", BlobPath("a/blobs/b", Digest(HEX))),
        ("/v2/a-b/c__d/e.f/manifests/v1.2_3-x", ManifestPath("a-b/c__d/e.f", "v1.2_3-x")),
        (f"/v2/app/manifests/sha256:{HEX}", ManifestPath("app", f"sha256:{HEX}")),
        ("/v2/app/blobs/sha512:" + "ab" * 64, OtherPath("app")),
        ("/v2/app/tags/list", OtherPath("app")),
        (f"/v2/app/referrers/sha256:{HEX}", OtherPath("app")),
        ("/v2/", OtherPath(None)),
        ("/v2/_catalog", OtherPath(None)),
    ],
)
def test_paths(path: str, expected: object) -> None:
    check_target(path, path)
    assert parse_v2_path(path) == expected


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (f"/v2/app/blobs/sha256:{HEX.upper()}", "DIGEST_INVALID"),
        ("/v2/app/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/app/blobs/uploads", "DIGEST_INVALID"),
        ("/v2/app/blobs/sha256:", "DIGEST_INVALID"),
        (f"/v2/app/manifests/sha256:{HEX[:-1]}", "DIGEST_INVALID"),
        ("/v2/App/manifests/v1", "NAME_INVALID"),
        ("/v2/a-/manifests/v1", "NAME_INVALID"),
        ("/v2/a___b/manifests/v1", "NAME_INVALID"),
        ("/v2/-v1/tags/list", "NAME_INVALID"),
        ("/v2/app/manifests/.v1", "MANIFEST_INVALID"),
    ],
)
def test_malformed_routes(path: str, code: str) -> None:
    check_target(path, path)
    with pytest.raises(RouteError) as info:
        parse_v2_path(path)
    assert (info.value.status, info.value.code) == (400, code)


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("http://evil.test/v2/", 400),
        ("*", 400),
        ("/v2/#x", 400),
        ("/v3/", 404),
        ("/v2x", 404),
        ("/v2/a/../b", 400),
        ("/v2/./a", 400),
        ("/v2//a", 400),
        ("/v2/a%2fb", 400),
        ("/v2/a\\b", 400),
    ],
)
def test_targets_refused(target: str, status: int) -> None:
    path = target.split("?", maxsplit=1)[0] if target.startswith("/") else "/v2/"
    with pytest.raises(RouteError) as info:
        check_target(target, path)
    assert info.value.status == status


def test_header_filters() -> None:
    request = [
        ("host", "mirror"),
        ("accept", "a"),
        ("connection", "x-foo, close"),
        ("x-foo", "1"),
        ("accept", "b"),
        ("te", "trailers"),
        ("content-length", "0"),
        ("proxy-authorization", "Basic x"),
    ]
    assert forwardable_request_headers(request) == [("accept", "a"), ("accept", "b")]
    response = [
        ("Transfer-Encoding", "chunked"),
        ("Link", "1"),
        ("Link", "2"),
        ("Content-Length", "3"),
        ("Upgrade", "h2c"),
    ]
    assert forwardable_response_headers(response) == [
        ("Link", "1"),
        ("Link", "2"),
        ("Content-Length", "3"),
    ]
