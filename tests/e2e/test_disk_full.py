"""A full disk under p2pd (ENOSPC), end to end: the cache on a 16 MB tmpfs, a real registry,
supernode and p2pd process.

What must hold: every pull still gets the right bytes -- a blob the disk cannot take is streamed
from the registry uncached, and a download whose disk fills up under it hands its reader over
to the registry mid-way -- nothing truncated or unverified ever lands in ``blobs/``, no partial
file is left behind, and the daemon keeps serving what it has.

Needs root for the tmpfs mount (CI runs as root); without it the test fails saying so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import Image, make_image, push_image
from benchmarks.harness.registry import Registry

MB = 1_000_000
LAYERS = [3 * MB, 30 * MB, 10 * MB]  # A fits, B never fits, C fits until the disk fills


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def pull(p2pd: P2pdProcess, digest: str) -> int:
    """GET the blob through the mirror as a runtime would; check its sha256; its size."""
    url = f"{p2pd.mirror_url}/v2/app/disk/blobs/{digest}?ns=example.test"
    sha, size = hashlib.sha256(), 0
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200, response.status_code
        for chunk in response.iter_bytes():
            sha.update(chunk)
            size += len(chunk)
    assert f"sha256:{sha.hexdigest()}" == digest
    return size


def fill_up(path: Path) -> None:
    """Write zeros until the file system is full."""
    block = b"\0" * (256 * 1024)
    with path.open("wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def check_cache(data_dir: Path, image: Image, expect: set[str]) -> None:
    blobs = {f"sha256:{p.name}": p for p in (data_dir / "blobs").iterdir()}
    assert set(blobs) == expect
    for digest, path in blobs.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
        assert path.stat().st_size == image.blobs[digest].size
    assert list((data_dir / "partial").iterdir()) == []


def test_p2pd_on_a_full_disk(tmp_path: Path, small_disk: Path) -> None:
    image = make_image(31, LAYERS, workdir=tmp_path / "image")
    a, b, c = image.layer_digests
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, "app/disk", "v1", image)
        with (
            SupernodeProcess(tmp_path / "sn", [registry.url]) as supernode,
            P2pdProcess(
                tmp_path,
                "h1",
                supernodes=[supernode.url],
                registries={"example.test": registry.url},
                # slow enough to fill the disk while C is half-way
                extra=("--data-dir", str(small_disk / "p2pd"), "--download-rate", "3000000"),
            ) as p2pd,
        ):
            data_dir = small_disk / "p2pd"
            assert pull(p2pd, a) == image.blobs[a].size
            check_cache(data_dir, image, {a})

            # B is bigger than the whole disk: streamed from the registry, A kept
            pull(p2pd, b)
            check_cache(data_dir, image, {a})
            assert p2pd.stats()["uncached"] == 1

            # C starts into the cache; the disk fills up under it half-way
            result: list[BaseException | int] = []
            reader = threading.Thread(target=lambda: result.append(_try(pull, p2pd, c)))
            reader.start()
            deadline = time.monotonic() + 30
            while not any(d["have"] for d in p2pd.stats()["downloads"]):
                assert time.monotonic() < deadline, "C's download never started"
                time.sleep(0.05)
            filler = small_disk / "filler"
            fill_up(filler)
            reader.join(60)
            assert result == [image.blobs[c].size], result  # right bytes, via the registry
            stats = p2pd.stats()
            assert stats["uncached"] == 2 and stats["downloads_failed"] == 1
            check_cache(data_dir, image, {a})  # no half of C anywhere

            # with the disk still full: what is cached is served, new blobs stream through
            assert pull(p2pd, a) == image.blobs[a].size
            assert httpx.get(f"{p2pd.peer_url}/healthz", timeout=5).status_code == 200
            filler.unlink()
            # room again: C is cached normally
            assert pull(p2pd, c) == image.blobs[c].size
            check_cache(data_dir, image, {a, c})


def _try(fn: object, *args: object) -> BaseException | int:
    try:
        assert callable(fn)
        value = fn(*args)
        assert isinstance(value, int)
        return value
    except BaseException as exc:  # reported by the main thread's assertion
        return exc
