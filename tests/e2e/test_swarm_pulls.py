"""End to end: real registry, real supernode and p2pd processes, real container clients.

Every pull here goes through p2pd with the client's fallback to the registry disabled (or, for
skopeo, checked against the registry's log), so a pull that succeeds was served by our mirror.
"Left the registry once" is counted from the registry's own request log.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.clients import (
    Containerd,
    pull_concurrently,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)
from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import Image, make_image, push_image
from benchmarks.harness.procs import HarnessError
from benchmarks.harness.registry import Registry
from benchmarks.harness.tokenserver import TokenServer
from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout

REF = "example.test/app/demo:v1"
LAYERS = [100_000, 6_000_000, 20_000_000]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def image(workdir: Path) -> Image:
    return make_image(7, LAYERS, workdir=workdir / "image")


@pytest.fixture(scope="module")
def registry(workdir: Path, image: Image) -> Iterator[Registry]:
    with Registry(workdir / "registry") as reg:
        push_image(reg.url, "app/demo", "v1", image)
        yield reg


def blob_gets(registry: Registry, image: Image) -> dict[str, int]:
    return {d: registry.blob_gets(d) for d in image.blobs}


def start_hosts(
    stack: ExitStack,
    workdir: Path,
    registry: Registry,
    n: int,
    supernodes: list[str],
    extra: tuple[str, ...] = (),
) -> list[tuple[P2pdProcess, Path, Containerd]]:
    hosts = []
    for i in range(n):
        p2pd = stack.enter_context(
            P2pdProcess(
                workdir,
                f"h{i}",
                supernodes=supernodes,
                registries={"example.test": registry.url},
                default_upstream=registry.url,
                extra=extra,
            )
        )
        hosts_dir = workdir / f"hosts-h{i}"
        write_hosts_toml(hosts_dir, "example.test", registry.url, p2pd.mirror_url, fallback=False)
        containerd = stack.enter_context(Containerd(workdir / f"containerd-h{i}"))
        hosts.append((p2pd, hosts_dir, containerd))
    return hosts


def pull_all(
    hosts: list[tuple[P2pdProcess, Path, Containerd]], user: tuple[str, str] | None = None
) -> dict[str, float | str]:
    """Pull REF on every host at once; host name -> seconds, or the error text."""
    return pull_concurrently({p.name: (c, d) for p, d, c in hosts}, REF, user=user)


def test_four_hosts_pull_and_each_blob_leaves_the_registry_once(
    workdir: Path, registry: Registry, image: Image
) -> None:
    before = blob_gets(registry, image)
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn1", [registry.url]))
        hosts = start_hosts(stack, workdir / "four", registry, 4, [supernode.url])
        results = pull_all(hosts)
        assert all(isinstance(v, float) for v in results.values()), results
        after = blob_gets(registry, image)
        assert {d: after[d] - before[d] for d in after} == dict.fromkeys(image.blobs, 1)
        stats = [p2pd.stats() for p2pd, _, _ in hosts]
        # `p2pd status` shows the same counters
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pd.cli",
                "status",
                "--peer-listen",
                f"127.0.0.1:{hosts[0][0].peer_port}",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert ["bytes_to_clients", str(image.total_size)] in [
            line.split() for line in status.splitlines()
        ]
        for s in stats:
            assert s["bytes_to_clients"] == image.total_size
            assert s["bytes_from_registry"] == 0
            assert s["bytes_from_peers"] == image.total_size
            # a batch carries the announces of two downloads or more
            assert s["announces_batched"] >= 2 * s["announce_batches"]
        # the bytes a client gets through the mirror have the right digests
        with httpx.Client(base_url=hosts[0][0].mirror_url, timeout=30) as client:
            for digest in image.blobs:
                body = client.get(f"/v2/app/demo/blobs/{digest}?ns=example.test").content
                assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_skopeo_pulls_through_p2pd(workdir: Path, registry: Registry, image: Image) -> None:
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn2", [registry.url]))
        ((p2pd, _, _),) = start_hosts(stack, workdir / "skopeo", registry, 1, [supernode.url])
        conf = write_registries_conf(
            workdir / "skopeo" / "registries.conf",
            "example.test",
            registry.host,
            p2pd.mirror_url.removeprefix("http://"),
        )
        before = blob_gets(registry, image)
        out = workdir / "skopeo" / "out"
        skopeo_copy(REF, registries_conf=conf, out_dir=out)
        for digest, blob in image.blobs.items():
            data = (out / digest.removeprefix("sha256:")).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest.removeprefix("sha256:")
            assert len(data) == blob.size
        # skopeo falls back silently: prove the mirror served the blobs
        assert p2pd.stats()["bytes_to_clients"] == image.total_size
        after = blob_gets(registry, image)
        assert all(after[d] - before[d] <= 1 for d in after)  # only the supernode's fetches


def test_supernode_down_pulls_still_succeed_from_the_registry(
    workdir: Path, registry: Registry, image: Image
) -> None:
    with ExitStack() as stack:
        dead = "http://127.0.0.1:1"
        hosts = start_hosts(stack, workdir / "nosn", registry, 2, [dead])
        results = pull_all(hosts)
        assert all(isinstance(v, float) for v in results.values()), results
        for p2pd, _, _ in hosts:
            s = p2pd.stats()
            assert s["bytes_from_registry"] == image.total_size
            assert s["bytes_to_clients"] == image.total_size


def test_killed_peer_does_not_stop_the_others(
    workdir: Path, registry: Registry, image: Image
) -> None:
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn3", [registry.url]))
        # slow hosts so the kill lands mid-transfer
        hosts = start_hosts(
            stack,
            workdir / "kill",
            registry,
            3,
            [supernode.url],
            extra=("--download-rate", "8000000", "--upload-rate", "8000000"),
        )
        victim = hosts[0][0]
        killer = threading.Timer(1.5, victim.kill)
        killer.start()
        results = pull_all(hosts)
        killer.join()
        assert not victim.process.running
        assert isinstance(results["h1"], float), results["h1"]
        assert isinstance(results["h2"], float), results["h2"]
        for p2pd, _, _ in hosts[1:]:
            assert p2pd.stats()["bytes_to_clients"] == image.total_size


def test_private_repository_needs_the_clients_own_credentials(workdir: Path) -> None:
    users = {"alice": "wonderland"}
    with ExitStack() as stack:
        tokens = stack.enter_context(
            TokenServer(workdir / "tokens", users=users, grants={"alice": {"*": ["pull", "push"]}})
        )
        registry = stack.enter_context(
            Registry(workdir / "private-registry", auth=tokens.registry_auth())
        )
        image = make_image(11, [50_000, 3_000_000], workdir=workdir / "private-image")
        push_image(registry.url, "app/demo", "v1", image, auth=("alice", "wonderland"))
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn4", [registry.url]))
        (host,) = start_hosts(stack, workdir / "private", registry, 1, [supernode.url])
        p2pd, hosts_dir, containerd = host
        assert isinstance(pull_all([host], user=("alice", "wonderland"))["h0"], float)
        served = p2pd.stats()["bytes_to_clients"]
        assert served == image.total_size
        assert p2pd.stats()["bytes_from_peers"] == image.total_size  # through the swarm

        # the layers are now cached on this host; a client without credentials gets nothing
        containerd.reset()
        with pytest.raises(HarnessError):
            containerd.pull(REF, hosts_dir=hosts_dir)
        layer = image.layer_digests[-1]
        with httpx.Client(base_url=p2pd.mirror_url, timeout=30) as client:
            anonymous = client.get(f"/v2/app/demo/blobs/{layer}?ns=example.test")
            assert anonymous.status_code == 401
            assert "bearer" in anonymous.headers["www-authenticate"].lower()
            assert anonymous.content != (workdir / "x").name.encode()  # no blob bytes
            wrong = client.get(
                f"/v2/app/demo/blobs/{layer}?ns=example.test",
                headers={"authorization": "Bearer not-a-token"},
            )
            assert wrong.status_code == 401
        assert p2pd.stats()["bytes_to_clients"] == served


def test_hostile_requests_get_clean_errors_and_daemons_keep_serving(
    workdir: Path, registry: Registry, image: Image
) -> None:
    import socket

    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn5", [registry.url]))
        (host,) = start_hosts(stack, workdir / "hostile", registry, 1, [supernode.url])
        p2pd = host[0]
        ports = {
            "mirror": p2pd.mirror_port,
            "peer": p2pd.peer_port,
            "supernode": supernode.port,
        }
        garbage = [
            b"\x00\x01\x02garbage\r\n\r\n",
            b"GET /" + b"A" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v2/app/demo/blobs/sha256:..%2f..%2fetc HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /pieces/" + b"0" * 64 + b"/99999999 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n\xc1\xc1\xc1",
            b"POST /v1/announce HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
        ]
        for name, port in ports.items():
            for data in garbage:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    reply = b""
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        reply += chunk
                status = reply[:12]
                assert status.startswith(b"HTTP/1.1 4"), (name, data[:40], reply[:200])
        # still serving
        assert httpx.get(f"{supernode.url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{p2pd.peer_url}/healthz", timeout=5).status_code == 200
        assert isinstance(pull_all([host])["h0"], float)


class CorruptPeer:
    """A host that claims every piece and serves random bytes of the right length."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        served: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                served.append(self.path)
                length = int(self.server.piece_length(self.path))  # type: ignore[attr-defined]
                body = os.urandom(length)
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.served = served
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self, piece_length: Callable[[str], int]) -> None:
        self.server.piece_length = piece_length  # type: ignore[attr-defined]
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_corrupt_peer_is_detected_avoided_and_the_layer_is_correct(
    workdir: Path, registry: Registry, image: Image
) -> None:
    layer = image.layer_digests[-1]
    size = image.blobs[layer].size
    layout = PieceLayout.for_size(size)
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn6", [registry.url]))
        liar = CorruptPeer()
        liar.start(lambda path: layout.length(int(path.rsplit("/", 1)[1])))
        stack.callback(liar.stop)
        # the liar joins first, claiming the whole layer: it looks like the best parent
        register = wire.Register(
            digest=Digest.parse(layer),
            size=size,
            peer_id="liar",
            address=liar.address,
            zone="",
            upload_slots=8,
            upstream=registry.url,
            repository="app/demo",
            authorization=None,
            have=Bitfield.full(layout.count),
        )
        reply = httpx.post(f"{supernode.url}/v1/register", content=wire.encode(register))
        assert reply.status_code == 200, reply.content
        (host,) = start_hosts(stack, workdir / "corrupt", registry, 1, [supernode.url])
        p2pd, hosts_dir, containerd = host
        containerd.pull(REF, hosts_dir=hosts_dir)  # containerd checks every digest itself
        stats = p2pd.stats()
        assert liar.served, "the corrupt peer was never asked"
        assert stats["bad_pieces"] >= 1
        assert stats["bytes_to_clients"] == image.total_size
        with httpx.Client(base_url=p2pd.mirror_url, timeout=30) as client:
            body = client.get(f"/v2/app/demo/blobs/{layer}?ns=example.test").content
        assert "sha256:" + hashlib.sha256(body).hexdigest() == layer
        # after its first bad piece the liar was banned: not asked for every piece
        assert len(liar.served) < layout.count


def test_a_dead_supernode_fails_over_to_the_next_in_the_ranking(
    workdir: Path, registry: Registry, image: Image
) -> None:
    from p2pd.tracker import rank_supernodes

    with ExitStack() as stack:
        first = stack.enter_context(SupernodeProcess(workdir / "sn7a", [registry.url]))
        second = stack.enter_context(SupernodeProcess(workdir / "sn7b", [registry.url]))
        urls = [first.url, second.url]
        # stop the supernode that the largest layer ranks first
        largest = max(image.blobs, key=lambda d: image.blobs[d].size)
        in_charge = rank_supernodes(urls, Digest.parse(largest))[0]
        (first if in_charge == first.url else second).stop()
        (host,) = start_hosts(stack, workdir / "failover", registry, 1, urls)
        assert isinstance(pull_all([host])["h0"], float)
        stats = host[0].stats()
        assert stats["bytes_from_registry"] == 0  # the swarm served it, not the fallback
        assert stats["bytes_from_peers"] == image.total_size


def test_preheat_fetches_every_blob_once_before_the_rollout(
    workdir: Path, registry: Registry, image: Image
) -> None:
    import json

    # a multi-arch index on top of the image: preheat must pick the platform's manifest
    # (the arm64 entry is another, tiny image)
    other = make_image(99, [1000], workdir=workdir / "arm-image")
    push_image(registry.url, "app/demo", "arm", other)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": len(image.manifest if arch == "amd64" else other.manifest),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, digest in (("arm64", other.manifest_digest), ("amd64", image.manifest_digest))
        ],
    }
    put = httpx.put(
        f"{registry.url}/v2/app/demo/manifests/multi",
        content=json.dumps(index).encode(),
        headers={"content-type": "application/vnd.oci.image.index.v1+json"},
    )
    assert put.status_code == 201, put.text
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn8", [registry.url]))
        before = blob_gets(registry, image)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pd.cli",
                "preheat",
                "example.test/app/demo:multi",
                "--supernodes",
                supernode.url,
                "--registry",
                f"example.test={registry.url}",
                "--timeout",
                "60",
            ],
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert f"{len(image.blobs)} blobs" in out.stdout
        after = blob_gets(registry, image)
        assert {d: after[d] - before[d] for d in after} == dict.fromkeys(image.blobs, 1)
        status = httpx.get(f"{supernode.url}/status", timeout=5).json()
        states = {t["digest"]: t["state"] for t in status["tasks"]}
        assert states == dict.fromkeys(image.blobs, "ready")
        page = httpx.get(f"{supernode.url}/", timeout=5)
        assert page.status_code == 200 and "<title>supernode status</title>" in page.text
        # the rollout: the host's pull comes from the swarm, the registry sends nothing more
        (host,) = start_hosts(stack, workdir / "preheated", registry, 1, [supernode.url])
        assert isinstance(pull_all([host])["h0"], float)
        assert blob_gets(registry, image) == after
        assert host[0].stats()["bytes_from_peers"] == image.total_size


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=3000",
]


def test_status_page_renders_in_a_real_browser(
    workdir: Path, registry: Registry, image: Image
) -> None:
    import shutil

    chromium = shutil.which("chromium")
    assert chromium, "chromium missing (Debian package chromium)"
    with ExitStack() as stack:
        supernode = stack.enter_context(SupernodeProcess(workdir / "sn9", [registry.url]))
        (host,) = start_hosts(stack, workdir / "page", registry, 1, [supernode.url])
        assert isinstance(pull_all([host])["h0"], float)
        profile = workdir / "chromium-profile"
        url = f"{supernode.url}/"
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            check=True,
            text=True,
            timeout=120,
        ).stdout
        # the script ran and drew one row per blob, with its state and its hosts
        assert dom.count("<tr>") == len(image.blobs) + 1, dom[:2000]
        assert "app/demo" in dom and "state-ready" in dom and "1 / 1" in dom
        shot = Path("bench-out") / "supernode-status.png"
        shot.parent.mkdir(exist_ok=True)
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--window-size=1200,420",
                f"--screenshot={shot.resolve()}",
                url,
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fleet_with_a_cluster_secret_keeps_strangers_off(
    workdir: Path, registry: Registry, image: Image
) -> None:
    secret = workdir / "cluster.secret"
    secret.write_text("a-fleet-secret-of-more-than-16-bytes\n")
    flag = ("--cluster-secret-file", str(secret))
    layer = image.layer_digests[-1]
    with ExitStack() as stack:
        supernode = stack.enter_context(
            SupernodeProcess(workdir / "sn10", [registry.url], extra=flag)
        )
        hosts = start_hosts(stack, workdir / "secret", registry, 2, [supernode.url], extra=flag)
        results = pull_all(hosts)
        assert all(isinstance(v, float) for v in results.values()), results
        for p2pd, _, _ in hosts:
            assert p2pd.stats()["bytes_from_peers"] == image.total_size  # the swarm worked
        # a stranger: no signature, no pieces and no say at the supernode
        piece = httpx.get(f"{hosts[0][0].peer_url}/pieces/{layer.removeprefix('sha256:')}/0")
        assert piece.status_code == 401
        register = wire.Register(
            digest=Digest.parse(layer),
            size=image.blobs[layer].size,
            peer_id="stranger",
            address="127.0.0.1:9",
            zone="",
            upload_slots=1,
            upstream=registry.url,
            repository="app/demo",
            authorization=None,
            have=None,
        )
        reply = httpx.post(f"{supernode.url}/v1/register", content=wire.encode(register))
        assert reply.status_code == 401
        seeder_piece = httpx.get(f"{supernode.url}/pieces/{layer.removeprefix('sha256:')}/0")
        assert seeder_piece.status_code == 401
