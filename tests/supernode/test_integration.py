"""The supernode in front of a real docker-registry, everything on 127.0.0.1.

The real `supernode` process fetches a pushed layer exactly once however many peers register,
every piece it serves verifies against its manifest, and the blob's sha256 is the digest.
After a restart it serves the same blob from its store without asking the registry again;
SIGTERM stops it cleanly (exit status 0). And with Docker-Hub-style token auth the supernode
fetches with the registrant's bearer token (in-process, to look at the failure reasons).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx

from benchmarks.harness.image import make_image, push_image
from benchmarks.harness.procs import LOOPBACK, Process, free_port, http_responds, wait_for
from benchmarks.harness.registry import Registry
from benchmarks.harness.tokenserver import TokenServer
from p2pd import wire
from p2pd.core.digest import Digest
from p2pd.core.manifest import PieceManifest
from supernode.seeder import UpstreamRefused
from tests.supernode.helpers import manifest_of, running

REPO = "team/app"
ROOT = Path(__file__).resolve().parents[2]


def supernode_process(tmp_path: Path, registry: Registry, port: int) -> Process:
    argv = [
        sys.executable,
        "-m",
        "supernode.cli",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--data-dir",
        str(tmp_path / "data"),
        "--upstream",
        registry.url,
        "--log-level",
        "debug",
    ]
    return Process("supernode", argv, log_path=tmp_path / "supernode.log", cwd=ROOT)


def register(client: httpx.Client, peer: str, digest: Digest, size: int, upstream: str) -> None:
    msg = wire.Register(
        digest, size, peer, f"{LOOPBACK}:{7000 + len(peer)}", "", 8, upstream, REPO, None, None
    )
    r = client.post("/v1/register", content=wire.encode(msg))
    assert r.status_code == 200, r.content
    assert wire.decode(r.content, expect=wire.Assignment).size == size


def wait_ready(client: httpx.Client, peer: str, digest: Digest) -> wire.Assignment:
    seen: list[wire.Assignment] = []

    def ready() -> bool:
        r = client.post(
            "/v1/announce", content=wire.encode(wire.Announce(digest, peer, (), 0, True))
        )
        seen.append(wire.decode(r.content, expect=wire.Assignment))
        assert seen[-1].state != "failed"
        return seen[-1].state == "ready"

    wait_for(ready, timeout=20, what=f"{digest} to become ready", interval=0.05)
    return seen[-1]


def fetch_all(client: httpx.Client, assignment: wire.Assignment) -> bytes:
    manifest = PieceManifest(assignment.digest, assignment.layout)
    manifest.extend(assignment.manifest_start, assignment.hashes)
    assert manifest.known == assignment.layout.count > 1
    pieces = []
    for index in range(manifest.known):
        r = client.get(f"/pieces/{assignment.digest.hex}/{index}")
        assert r.status_code == 200
        assert manifest.verify(index, r.content), index
        pieces.append(r.content)
    return b"".join(pieces)


def test_real_registry_blob_leaves_it_once(tmp_path: Path) -> None:
    image = make_image(11, [9_000_000], workdir=tmp_path / "image")
    layer = image.layers[0]
    digest = Digest.parse(layer.digest)
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, REPO, "v1", image)
        port = free_port()
        base = f"http://{LOOPBACK}:{port}"
        for run in range(2):
            with supernode_process(tmp_path, registry, port) as proc:
                proc.wait_ready(http_responds(f"{base}/healthz"), timeout=15, what="/healthz")
                with httpx.Client(base_url=base, timeout=10) as client:
                    for peer in ("p1", "p2", "p3", "p4"):
                        register(client, peer, digest, layer.size, registry.url)
                    assignment = wait_ready(client, "p1", digest)
                    assert [p.address for p in assignment.parents] == [f"{LOOPBACK}:{port}"]
                    blob = fetch_all(client, assignment)
                assert hashlib.sha256(blob).hexdigest() == digest.hex
                assert blob == layer.path.read_bytes()
                assert registry.blob_gets(layer.digest) == 1, f"run {run}"
                assert proc.stop() == 0, proc.describe_log()
    log = (tmp_path / "supernode.log").read_text()
    assert "Traceback" not in log
    assert log.count("SIGTERM received") == 2


async def test_token_auth_registry_fetch_uses_the_registrants_token(tmp_path: Path) -> None:
    image = make_image(12, [5_000_000], workdir=tmp_path / "image")
    layer = image.layers[0]
    digest = Digest.parse(layer.digest)
    tokens = TokenServer(
        tmp_path / "tokens",
        users={"alice": "wonderland"},
        grants={"alice": {REPO: ["pull", "push"]}},
    )
    with tokens, Registry(tmp_path / "registry", auth=tokens.registry_auth()) as registry:
        push_image(registry.url, REPO, "v1", image, ("alice", "wonderland"))
        pull = tokens.issue("alice", tokens.service, [f"repository:{REPO}:pull"]).token
        async with running(tmp_path / "sn", None, allowed_upstreams=[registry.url]) as h:
            fields = {"digest": digest, "size": layer.size, "upstream": registry.url}
            await h.register("anonymous", **fields)
            task = await h.wait_done(digest)
            assert isinstance(task.failure, UpstreamRefused) and task.failure.status == 401
            await h.register("alice-host", authorization=f"Bearer {pull}", **fields)
            task = await h.wait_done(digest)
            assert task.failure is None
            got = await h.announce("alice-host", digest=digest)
            manifest = manifest_of(got)
            pieces = [(await h.piece(i, digest)).content for i in range(manifest.known)]
            assert all(manifest.verify(i, piece) for i, piece in enumerate(pieces))
            assert b"".join(pieces) == layer.path.read_bytes()
        assert registry.blob_gets(layer.digest) == 1
