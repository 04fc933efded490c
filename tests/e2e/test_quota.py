"""Disk quota on both daemons, end to end: a real registry, real supernode and p2pd processes,
blobs pulled through the mirror over HTTP as a runtime does.

Each daemon's quota holds two of the three 10 MB layers. The test checks, on each daemon, that
the least recently used blob is the one evicted, that a blob in use (a runtime reading it from
p2pd) is never evicted, that peers merely seeding a blob do not pin it in the supernode's
quota (they go on serving it), and that every pull still succeeds -- a blob larger than the
quota is streamed from the registry uncached.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import Image, make_image, push_image
from benchmarks.harness.procs import LOOPBACK
from benchmarks.harness.registry import Registry

MB = 1_000_000
QUOTA = 25 * MB  # two of the 10 MB layers, not three
LAYERS = [10 * MB, 10 * MB, 10 * MB, 30 * MB]  # A, B, C, and D larger than the quota


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quota")


@pytest.fixture(scope="module")
def image(workdir: Path) -> Image:
    return make_image(23, LAYERS, workdir=workdir / "image")


@pytest.fixture(scope="module")
def registry(workdir: Path, image: Image) -> Iterator[Registry]:
    with Registry(workdir / "registry") as reg:
        push_image(reg.url, "app/quota", "v1", image)
        yield reg


def pull(p2pd: P2pdProcess, digest: str) -> None:
    """GET the blob through the mirror and check its sha256, as a runtime would."""
    url = f"{p2pd.mirror_url}/v2/app/quota/blobs/{digest}?ns=example.test"
    sha = hashlib.sha256()
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200, response.status_code
        for chunk in response.iter_bytes():
            sha.update(chunk)
    assert f"sha256:{sha.hexdigest()}" == digest


def cached(data_dir: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (data_dir / "blobs").iterdir()}


def supernode_cached(data_dir: Path, expected: set[str], timeout: float = 10.0) -> set[str]:
    """The supernode's cache once it holds `expected` (or after `timeout`): its seeder commits
    a blob after checking the whole blob's sha256, which may come a moment after a p2pd that
    pulled it through the seeder's pieces has finished (the last piece is served as read)."""
    deadline = time.monotonic() + timeout
    while (found := cached(data_dir)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def hold_open(p2pd: P2pdProcess, digest: str) -> socket.socket:
    """A runtime that starts reading a blob and stalls: a tiny receive buffer, the head and a
    few bytes read, the rest left in flight (the daemon is still serving it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((LOOPBACK, p2pd.mirror_port))
    path = f"/v2/app/quota/blobs/{digest}?ns=example.test"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
    head = sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_quota_on_both_daemons(workdir: Path, registry: Registry, image: Image) -> None:
    a, b, c, d = image.layer_digests
    with ExitStack() as stack:
        supernode = stack.enter_context(
            SupernodeProcess(
                workdir / "sn",
                [registry.url],
                extra=("--quota", str(QUOTA), "--failed-task-ttl", "0", "--log-format", "json"),
            )
        )

        def p2pd_host(name: str) -> P2pdProcess:
            return stack.enter_context(
                P2pdProcess(
                    workdir,
                    name,
                    supernodes=[supernode.url],
                    registries={"example.test": registry.url},
                    extra=("--quota-bytes", str(QUOTA)),
                )
            )

        h1 = p2pd_host("h1")
        pull(h1, a)
        pull(h1, b)
        assert cached(h1.data_dir) == {a, b}
        assert supernode_cached(supernode.data_dir, {a, b}) == {a, b}

        # -- p2pd: LRU first, never a blob being served ------------------------------------
        reader = hold_open(h1, b)  # B is being served (and so its least recent use is now)
        pull(h1, a)  # A used after B: B is the least recently used, but in use
        pull(h1, c)  # room for C: A goes, B stays
        assert cached(h1.data_dir) == {b, c}
        reader.close()
        time.sleep(1.0)  # the daemon notices the closed connection and drops B's lease
        pull(h1, a)  # room for A: B, now least recently used and free, goes before C
        assert cached(h1.data_dir) == {c, a}
        pull(h1, d)  # larger than the quota: streamed from the registry, not cached
        assert cached(h1.data_dir) == {c, a}
        stats = h1.stats()
        assert stats["uncached"] == 1 and stats["cache_bytes"] <= QUOTA

        # -- supernode: LRU first; a blob only seeded by peers does not pin the quota -------
        # h1 seeded A and B, yet the supernode made room for C by evicting A (least recently
        # used), whose task h1 went on seeding; when h1 wanted A back, nobody held it any
        # more, so the supernode fetched it again, evicting B (seeded by h1) this time.
        assert supernode_cached(supernode.data_dir, {c, a}) == {c, a}
        h1.stop()  # h1 leaves the swarm
        h2 = p2pd_host("h2")
        pull(h2, c)
        assert h2.stats()["bytes_from_peers"] == image.blobs[c].size  # from the supernode
        pull(h2, b)  # nobody holds B: fetched again, evicting A (LRU, no peers: forgotten)
        assert supernode_cached(supernode.data_dir, {c, b}) == {c, b}
        assert cached(h2.data_dir) == {c, b}

        status = subprocess.run(
            [sys.executable, "-m", "supernode.cli", "status", "--url", supernode.url],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        rows = {
            line.split()[0]: line.split() for line in status.splitlines() if line[:7] == "sha256:"
        }
        assert rows[c[:19]][1:3] == ["ready", "100.0%"]
        assert rows[b[:19]][1] == "ready"

    # one JSON line per fetched task; no fetch failed for room
    events = [
        line
        for line in map(json.loads, (workdir / "sn" / "supernode.log").read_text().splitlines())
        if line.get("event") == "fetch"
    ]
    assert [(e["digest"], e["state"]) for e in events] == [
        (a, "ready"),
        (b, "ready"),
        (c, "ready"),
        (a, "ready"),
        (b, "ready"),
    ]
    assert all(e["upstream"] == registry.url.removeprefix("http://") for e in events)
