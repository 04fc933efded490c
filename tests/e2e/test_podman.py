"""podman pulls through p2pd with the README's registries.conf: real registry, supernode, p2pd
and podman (root, vfs storage in a temporary directory).

podman falls back to the registry silently when the mirror fails, so the test proves the mirror
served every blob from p2pd's own counters and the registry's log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks.harness.clients import write_registries_conf
from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import make_image, push_image
from benchmarks.harness.registry import Registry


def test_podman_pulls_through_p2pd(tmp_path: Path) -> None:
    podman = shutil.which("podman")
    if podman is None:
        pytest.fail("podman missing (Debian package podman)")
    image = make_image(41, [3_000_000, 1_000_000], workdir=tmp_path / "image")
    with ExitStack() as stack:
        registry = stack.enter_context(Registry(tmp_path / "registry"))
        push_image(registry.url, "app/pm", "v1", image)
        with (
            SupernodeProcess(tmp_path / "sn", [registry.url]) as supernode,
            P2pdProcess(
                tmp_path,
                "h1",
                supernodes=[supernode.url],
                registries={},
                default_upstream=registry.url,  # podman sends no ?ns=
            ) as p2pd,
        ):
            conf = write_registries_conf(
                tmp_path / "registries.conf",
                "example.test",
                registry.host,
                p2pd.mirror_url.removeprefix("http://"),
            )
            before = {d: registry.blob_gets(d) for d in image.blobs}
            # podman wants a run root of at most 50 characters: not under pytest's tmp_path
            runroot = stack.enter_context(tempfile.TemporaryDirectory(prefix="pm-"))
            out = subprocess.run(
                [
                    podman,
                    "--root",
                    str(tmp_path / "root"),
                    "--runroot",
                    runroot,
                    "--storage-driver",
                    "vfs",
                    "pull",
                    "example.test/app/pm:v1",
                ],
                env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == image.config_digest.removeprefix("sha256:")
            stats = p2pd.stats()
            assert stats["bytes_to_clients"] == image.total_size
            assert stats["bytes_from_registry"] == 0
            # the registry saw only the supernode's one fetch of each layer
            after = {d: registry.blob_gets(d) for d in image.blobs}
            assert all(after[d] - before[d] <= 1 for d in image.blobs), (before, after)
