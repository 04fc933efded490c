"""``p2pd preheat IMAGE``: have the supernodes fetch an image's blobs before a rollout.

Steps: resolve the reference to its manifest at the upstream (an image index or manifest list is
narrowed to one platform, ``linux/amd64`` by default), list its blobs (config and layers), and
register each with the supernode in charge of it (rendezvous ranking, as p2pd does) under the
pseudo-peer id ``preheat``, which leaves at once: the supernode's seeder starts fetching and
keeps the blob. Then the supernodes' ``/status`` is polled until every blob is ready (or one
failed), printing progress.

Credentials: the registry's own challenge flow (Basic, or a Bearer token from its realm) with the
``--user`` given, or anonymously; the resulting Authorization is what the supernode's seeder
uses for its fetch, exactly as for a runtime's pull.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from p2pd import wire
from p2pd.clusterauth import ClusterAuth
from p2pd.config import P2pdConfig
from p2pd.core.digest import Digest
from p2pd.tracker import TrackerRejected, TrackerSession, TrackerUnavailable

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
PREHEAT_PEER = "preheat"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class PreheatError(Exception):
    """The image could not be resolved or preheated; the message says why."""


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    repository: str
    reference: str  # tag or digest


@dataclass(frozen=True, slots=True)
class Blob:
    digest: Digest
    size: int


def parse_reference(text: str) -> Reference:
    """``registry/repo:tag``, ``repo@sha256:…`` or a Docker Hub short name."""
    name, reference = text, "latest"
    if "@" in name:
        name, reference = name.split("@", 1)
    else:
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, reference = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "docker.io", name
        if "/" not in repository:
            repository = f"library/{repository}"
    if not repository or not reference:
        raise PreheatError(f"not an image reference: {text!r}")
    return Reference(registry, repository, reference)


class RegistryAuth:
    """Answers a registry's 401 challenge once per scope and remembers the header."""

    def __init__(self, client: httpx.Client, user: tuple[str, str] | None) -> None:
        self.client = client
        self.user = user
        self.header: str | None = None

    def get(self, url: str, accept: str) -> httpx.Response:
        response = self._get(url, accept)
        if response.status_code == 401 and self.header is None:
            self.header = self._answer(response.headers.get("www-authenticate", ""))
            response = self._get(url, accept)
        return response

    def _get(self, url: str, accept: str) -> httpx.Response:
        headers = {"accept": accept}
        if self.header:
            headers["authorization"] = self.header
        return self.client.get(url, headers=headers, follow_redirects=True)

    def _answer(self, challenge: str) -> str | None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            return _basic(self.user) if self.user else None
        if scheme.lower() != "bearer":
            return None
        fields = dict(_CHALLENGE_PARAM.findall(params))
        realm = fields.pop("realm", "")
        if not realm:
            return None
        headers = {"authorization": _basic(self.user)} if self.user else {}
        reply = self.client.get(realm, params=fields, headers=headers)
        if reply.status_code != 200:
            raise PreheatError(f"token server {realm} answered {reply.status_code}")
        data = reply.json()
        token = data.get("token") or data.get("access_token")
        return f"Bearer {token}" if token else None


def _basic(user: tuple[str, str] | None) -> str:
    assert user is not None
    return "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()


def resolve(
    auth: RegistryAuth, upstream: str, ref: Reference, platform: str = "linux/amd64"
) -> list[Blob]:
    """The image's blobs (config first, then layers) for `platform`."""
    accept = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
    url = f"{upstream}/v2/{ref.repository}/manifests/{ref.reference}"
    response = auth.get(url, accept)
    if response.status_code != 200:
        raise PreheatError(f"{url}: {response.status_code} {response.text[:200]}")
    manifest = response.json()
    media = manifest.get("mediaType") or response.headers.get("content-type", "")
    if media in INDEX_TYPES or "manifests" in manifest:
        os_, _, arch = platform.partition("/")
        chosen = [
            m
            for m in manifest.get("manifests", [])
            if m.get("platform", {}).get("os") == os_
            and m.get("platform", {}).get("architecture") == arch
        ]
        if not chosen:
            raise PreheatError(f"{url}: no manifest for platform {platform}")
        url = f"{upstream}/v2/{ref.repository}/manifests/{chosen[0]['digest']}"
        response = auth.get(url, ", ".join(MANIFEST_TYPES))
        if response.status_code != 200:
            raise PreheatError(f"{url}: {response.status_code}")
        manifest = response.json()
    try:
        entries = [manifest["config"], *manifest["layers"]]
        return [Blob(Digest.parse(e["digest"]), int(e["size"])) for e in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise PreheatError(f"{url}: not an image manifest: {exc}") from exc


def preheat(
    config: P2pdConfig,
    image: str,
    *,
    upstream: str | None = None,
    user: tuple[str, str] | None = None,
    platform: str = "linux/amd64",
    timeout: float = 600.0,
    progress: Callable[[str], None] = print,
) -> dict[str, str]:
    """Preheat `image`; returns blob digest -> final state ("ready" or "failed: …")."""
    if not config.supernodes:
        raise PreheatError("no supernodes configured")
    ref = parse_reference(image)
    base = upstream or config.registries.get(ref.registry) or config.default_upstream
    if not base:
        raise PreheatError(f"no upstream configured for registry {ref.registry!r}")
    with httpx.Client(timeout=30) as client:
        auth = RegistryAuth(client, user)
        blobs = resolve(auth, base, ref, platform)
        progress(f"{image}: {len(blobs)} blobs, {sum(b.size for b in blobs)} bytes")
        with_supernode = _register_all(config, base, ref.repository, auth.header, blobs)
        return _watch(client, with_supernode, blobs, timeout, progress)


def _register_all(
    config: P2pdConfig, upstream: str, repository: str, authorization: str | None, blobs: list[Blob]
) -> dict[Digest, str]:
    """Register every blob with its supernode (and leave at once); digest -> supernode URL."""

    placed: dict[Digest, str] = {}

    async def register_all() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            for blob in blobs:
                session = TrackerSession(
                    http,
                    list(config.supernodes),
                    wire.Register(
                        digest=blob.digest,
                        size=blob.size,
                        peer_id=PREHEAT_PEER,
                        address="preheat.invalid:9",
                        zone="",
                        upload_slots=1,
                        upstream=upstream,
                        repository=repository,
                        authorization=authorization,
                        have=None,
                    ),
                    auth=ClusterAuth.from_file(config.cluster_secret_file),
                )
                try:
                    await session.register(None)
                except (TrackerUnavailable, TrackerRejected) as exc:
                    raise PreheatError(f"{blob.digest}: {exc}") from exc
                assert session.current is not None
                placed[blob.digest] = session.current
                await session.leave()

    trio.run(register_all)
    return placed


def _watch(
    client: httpx.Client,
    placed: dict[Digest, str],
    blobs: list[Blob],
    timeout: float,
    progress: Callable[[str], None],
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    final: dict[str, str] = {}
    while True:
        seen: dict[str, dict[str, object]] = {}
        for url in sorted(set(placed.values())):
            try:
                for task in client.get(f"{url}/status").json().get("tasks", []):
                    seen[str(task["digest"])] = task
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                progress(f"{url}: status unavailable: {exc}")
        lines = []
        for blob in blobs:
            task = seen.get(str(blob.digest))
            if task is None:
                lines.append(f"  {blob.digest}: unknown to its supernode")
                continue
            state = str(task["state"])
            seeded, pieces = task["seeded"], task["pieces"]
            if state == "failed":
                final[str(blob.digest)] = f"failed: {task.get('failure')}"
            elif state == "ready":
                final[str(blob.digest)] = "ready"
            lines.append(f"  {blob.digest}: {state} {seeded}/{pieces} pieces")
        progress("\n".join(lines))
        if len(final) == len(blobs):
            return final
        if time.monotonic() > deadline:
            raise PreheatError(f"not ready after {timeout:.0f} s")
        time.sleep(0.5)
