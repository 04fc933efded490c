"""The mirror with real parts: docker-registry (anonymous and token auth), containerd's ctr,
skopeo. The mirror runs in this process on 127.0.0.1 with a BlobService double that streams
each blob from the registry itself (the swarm-backed service is tested elsewhere).

Clients fall back to the registry silently, so every test also proves where the bytes came
from: hosts.toml is written with ``fallback=False`` (its ``server`` is a dead port), the
registry's access log must show blob bytes going only to the double's User-Agent, and the
mirror's own record must show it served every blob. The harness's blocking calls (subprocess
pulls, log reads) run in worker threads so the mirror keeps serving meanwhile.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from benchmarks.harness.clients import (
    Containerd,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)
from benchmarks.harness.image import Image, make_image, push_image
from benchmarks.harness.procs import HarnessError
from benchmarks.harness.registry import Registry, RequestRecord
from benchmarks.harness.tokenserver import TokenServer
from p2pd.blobs import BlobSource
from p2pd.config import P2pdConfig
from p2pd.core.digest import Digest
from p2pd.http.server import FileRegion, Request, Response, bound_port, serve
from p2pd.mirror import Mirror, upstream_client

NAME = "example.test"
REF = f"{NAME}/library/app:v1"
BLOB_AGENT = "p2pd-test-blobs"
ALICE = ("alice", "wonderland")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_image(7, [30_000, 400_000], workdir=tmp_path_factory.mktemp("image"))


@pytest.fixture
def registry(tmp_path: Path, image: Image) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, "library/app", "v1", image)
        yield registry


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    with Containerd(tmp_path / "containerd") as ctd:
        yield ctd


class RegistryBlobs:
    """BlobService double: GETs the blob from the upstream with the client's credentials."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.served: list[tuple[str, int]] = []  # (digest, start)

    def cached_size(self, digest: Digest) -> int | None:
        return None

    async def stream(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[bytes | FileRegion]:
        self.served.append((str(digest), start))
        headers = [("user-agent", BLOB_AGENT)]
        if source.authorization is not None:
            headers.append(("authorization", source.authorization))
        if start:
            headers.append(("range", f"bytes={start}-"))
        url = f"{source.upstream}/v2/{source.repository}/blobs/{digest}"
        response = await self.client.send(httpx.Request("GET", url, headers=headers), stream=True)
        try:
            if response.status_code not in (200, 206):
                raise RuntimeError(f"registry answered {response.status_code} for {url}")
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    """Closes what a test opened (httpx clients) after the test, when its mirrors are gone."""
    async with AsyncExitStack() as stack:
        yield stack


@dataclass
class RunningMirror:
    url: str
    host: str  # 127.0.0.1:PORT, as registries.conf names it
    mirror: Mirror
    blobs: RegistryBlobs
    handled: list[tuple[Request, int]] = field(default_factory=list)

    def blob_gets(self) -> dict[str, int]:
        """Blob digest -> GETs the mirror answered 200/206."""
        out: dict[str, int] = {}
        for request, status in self.handled:
            if request.method == "GET" and "/blobs/" in request.path and status in (200, 206):
                digest = request.path.rsplit("/", 1)[1]
                out[digest] = out.get(digest, 0) + 1
        return out

    def paths(self, method: str) -> list[str]:
        return [r.path for r, _ in self.handled if r.method == method]


async def start_mirror(
    nursery: trio.Nursery, client: httpx.AsyncClient, **options: Any
) -> RunningMirror:
    blobs = RegistryBlobs(client)
    mirror = Mirror(P2pdConfig.from_mapping(options), client, blobs)
    running = RunningMirror("", "", mirror, blobs)

    async def recording(request: Request) -> Response:
        response = await mirror.handle(request)
        running.handled.append((request, response.status))
        return response

    listeners = await nursery.start(functools.partial(serve, recording, "127.0.0.1", 0))
    running.host = f"127.0.0.1:{bound_port(listeners)}"
    running.url = f"http://{running.host}"
    return running


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def assert_bytes_left_the_registry_only_through_the_mirror(
    records: list[RequestRecord], image: Image
) -> None:
    blob_gets = [r for r in records if r.served_blob_bytes]
    assert {r.user_agent for r in blob_gets} == {BLOB_AGENT}
    for digest in image.blobs:
        assert sum(1 for r in blob_gets if r.blob_digest == digest) == 1, digest
    # The mirror strips ?ns=: a client that reached the registry directly would have sent it.
    assert not any("ns=" in r.uri for r in records)


# -- containerd ---------------------------------------------------------------------------------


async def test_containerd_pulls_through_the_mirror(
    nursery: trio.Nursery, tmp_path: Path, registry: Registry, containerd: Containerd, image: Image
) -> None:
    async with upstream_client() as client:
        running = await start_mirror(nursery, client, registries={NAME: registry.url})
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url, running.url, fallback=False)
        await blocking(containerd.pull, REF, hosts_dir=hosts)

    assert REF in await blocking(containerd.image_names)
    assert running.blob_gets() == {digest: 1 for digest in image.blobs}
    assert {d for d, _ in running.blobs.served} == set(image.blobs)
    assert any("/manifests/" in p for p in running.paths("HEAD") + running.paths("GET"))
    assert all(r.query_one("ns") == NAME for r, _ in running.handled)
    records = await blocking(registry.requests)
    assert_bytes_left_the_registry_only_through_the_mirror(records, image)
    access_checks = [r for r in records if r.method == "HEAD" and r.user_agent.startswith("p2pd/")]
    assert {r.blob_digest for r in access_checks} == set(image.blobs)


# -- skopeo (containers/image) ------------------------------------------------------------------


@pytest.mark.parametrize("with_path", [False, True], ids=["plain-location", "location-with-path"])
async def test_skopeo_copies_through_the_mirror(
    nursery: trio.Nursery,
    stack: AsyncExitStack,
    tmp_path: Path,
    registry: Registry,
    image: Image,
    with_path: bool,
) -> None:
    client = await stack.enter_async_context(upstream_client())
    if with_path:
        # registries.conf mirror "127.0.0.1:PORT/example.test": containers/image puts the
        # location in place of the prefix, so requests are /v2/example.test/library/app/...
        running = await start_mirror(nursery, client, prefixes={NAME: registry.url})
        location = f"{running.host}/{NAME}"
    else:
        running = await start_mirror(nursery, client, default_upstream=registry.url)
        location = running.host
    conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host, location)
    out = tmp_path / "out"
    await blocking(skopeo_copy, REF, registries_conf=conf, out_dir=out)

    for digest, blob in image.blobs.items():
        assert (out / digest.removeprefix("sha256:")).read_bytes() == blob.path.read_bytes()
    assert running.blob_gets() == {digest: 1 for digest in image.blobs}
    expected_prefix = f"/v2/{NAME}/library/app/" if with_path else "/v2/library/app/"
    assert all(
        p.startswith(expected_prefix) for p in running.paths("GET") if p not in ("/v2", "/v2/")
    )
    manifest_gets = [r for r, s in running.handled if "/manifests/" in r.path and s == 200]
    assert manifest_gets
    # skopeo's Accept lines, one per media type, arrived (and went upstream) unmerged.
    assert len([v for k, v in manifest_gets[0].headers if k == "accept"]) > 1
    records = await blocking(registry.requests)
    assert_bytes_left_the_registry_only_through_the_mirror(records, image)
    assert any(r.path == "/v2/library/app/manifests/v1" and r.status == 200 for r in records)


# -- token auth ---------------------------------------------------------------------------------


async def test_token_auth_through_the_mirror(
    nursery: trio.Nursery,
    stack: AsyncExitStack,
    tmp_path: Path,
    containerd: Containerd,
    image: Image,
) -> None:
    tokens = TokenServer(
        tmp_path / "tokens",
        users={ALICE[0]: ALICE[1], "bob": "builder"},
        grants={ALICE[0]: {"private/*": ["pull", "push"]}},
    )
    with tokens, Registry(tmp_path / "registry", auth=tokens.registry_auth()) as registry:
        await blocking(push_image, registry.url, "private/app", "v1", image, ALICE)
        client = await stack.enter_async_context(upstream_client())
        running = await start_mirror(nursery, client, registries={NAME: registry.url})
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url, running.url, fallback=False)
        ref = f"{NAME}/private/app:v1"

        # Authorised: the token dance goes through the mirror, then the layers do.
        await blocking(containerd.pull, ref, hosts_dir=hosts, user=ALICE)
        assert running.blob_gets() == {digest: 1 for digest in image.blobs}
        served = len(running.blobs.served)

        # Anonymous: refused with the registry's own challenge, and no bytes flow.
        await blocking(containerd.reset)
        with pytest.raises(HarnessError, match=r"401|authoriz"):
            await blocking(containerd.pull, ref, hosts_dir=hosts)
        layer = image.layer_digests[-1]
        url = f"{running.url}/v2/private/app/blobs/{layer}?ns={NAME}"
        alice = tokens.issue("alice", tokens.service, ["repository:private/app:pull"]).token
        bob = tokens.issue("bob", tokens.service, ["repository:private/app:pull"]).token
        async with httpx.AsyncClient() as runtime:
            for authorization in (None, f"Bearer {bob}"):
                headers = {"Authorization": authorization} if authorization else {}
                refused = await runtime.get(url, headers=headers)
                assert refused.status_code == 401
                challenge = refused.headers["www-authenticate"]
                assert challenge.startswith("Bearer ") and tokens.realm in challenge
                assert len(refused.content) < 1000  # an error document, not the layer
            allowed = await runtime.get(url, headers={"Authorization": f"Bearer {alice}"})
            assert allowed.status_code == 200
            assert allowed.content == image.blobs[layer].path.read_bytes()
        assert len(running.blobs.served) == served + 1  # only alice's GET reached the service

        # skopeo with credentials (no ?ns=, so a mirror with a default upstream): its ping
        # gets the registry's challenge through the mirror, then it authenticates.
        second = await start_mirror(nursery, client, default_upstream=registry.url)
        conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host, second.host)
        with pytest.raises(HarnessError, match=r"denied|unauthorized"):
            await blocking(skopeo_copy, ref, registries_conf=conf, out_dir=tmp_path / "anon")
        assert second.blob_gets() == {}
        out = tmp_path / "skopeo-out"
        await blocking(skopeo_copy, ref, registries_conf=conf, out_dir=out, creds=ALICE)
        assert second.blob_gets() == {digest: 1 for digest in image.blobs}

        # A mirror location with a path: containers/image first asks the token server for its
        # own name ("example.test/private/app", granted nothing), gets the registry's 401 with
        # the real scope through the mirror, and retries with that scope added.
        third = await start_mirror(nursery, client, prefixes={NAME: registry.url})
        conf = write_registries_conf(
            tmp_path / "registries-path.conf", NAME, registry.host, f"{third.host}/{NAME}"
        )
        out = tmp_path / "skopeo-path-out"
        await blocking(skopeo_copy, ref, registries_conf=conf, out_dir=out, creds=ALICE)
        assert third.blob_gets() == {digest: 1 for digest in image.blobs}
        assert any(
            t.account == "alice"
            and any(a.name == "private/app" for a in t.requested)
            and any(a.name == f"{NAME}/private/app" for a in t.requested)
            for t in tokens.issued
        )

        records = await blocking(registry.requests)
        blob_gets = [r for r in records if r.served_blob_bytes]
        assert {r.user_agent for r in blob_gets} == {BLOB_AGENT}
