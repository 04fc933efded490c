"""Image references and manifest resolution for `p2pd preheat`."""

from __future__ import annotations

import json

import httpx
import pytest

from p2pd.preheat import PreheatError, RegistryAuth, parse_reference, resolve

D = "sha256:" + "ab" * 32
C = "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest"),
        ("ubuntu:24.04", "docker.io", "library/ubuntu", "24.04"),
        ("team/app:1", "docker.io", "team/app", "1"),
        ("example.test/app/demo:v1", "example.test", "app/demo", "v1"),
        ("localhost:5000/app", "localhost:5000", "app", "latest"),
        (f"quay.io/org/app@{D}", "quay.io", "org/app", D),
    ],
)
def test_parse_reference(text: str, registry: str, repository: str, reference: str) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.reference) == (registry, repository, reference)


def test_resolve_follows_a_bearer_challenge_and_picks_the_platform() -> None:
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": C, "size": 10},
        "layers": [{"digest": D, "size": 1234}],
    }
    index = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": "sha256:" + "11" * 32, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:" + "22" * 32, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/token":
            assert request.url.params["scope"] == "repository:app:pull"
            return httpx.Response(200, json={"token": "T"})
        if request.headers.get("authorization") != "Bearer T":
            challenge = 'Bearer realm="http://r.test/token",service="r",scope="repository:app:pull"'
            return httpx.Response(401, headers={"www-authenticate": challenge})
        body = index if request.url.path.endswith("/v1") else manifest
        return httpx.Response(200, content=json.dumps(body).encode())

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        auth = RegistryAuth(client, None)
        blobs = resolve(auth, "http://r.test", parse_reference("r.test/app:v1"))
    assert [str(b.digest) for b in blobs] == [C, D] and blobs[1].size == 1234
    assert "/v2/app/manifests/" + "sha256:" + "22" * 32 in seen
    assert auth.header == "Bearer T"


def test_resolve_refuses_a_missing_platform() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"manifests": []})

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as client,
        pytest.raises(PreheatError, match="no manifest for platform"),
    ):
        resolve(RegistryAuth(client, None), "http://r.test", parse_reference("r.test/app"))
