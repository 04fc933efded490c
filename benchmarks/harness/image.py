"""Deterministic OCI images built in the test, and pushing them with the registry API.

:func:`make_image` writes, for a seed and a list of layer sizes, gzip'd tar layers, an OCI
image config and an OCI image manifest into a work directory. The same seed and sizes give
the same uncompressed tars (diff_ids) everywhere, and the same blobs and digests wherever zlib
lays out its stored blocks the same way (any one machine, and in practice any zlib version):

* each layer's tar holds one file, ``layer-<i>.bin``, of pseudo-random bytes from SHAKE-256
  over (seed, layer, chunk). No two chunks repeat, inside a blob, across the layers of an image
  or across seeds, so a bug that serves the wrong piece or the wrong layer changes the bytes
  and fails the digest check;
* tar headers are fixed (mtime 0, uid/gid 0, mode 0644) and gzip stores no name and mtime 0;
* gzip runs at level 0 (stored blocks): random bytes do not compress anyway, level 0 is ≈30
  times faster than level 1, and the blob stays a valid gzip stream that every client unpacks;
* the file size is the requested size minus the tar/gzip overhead, so a layer blob is within
  a few hundred bytes plus 0.0125% of what was asked (:func:`size_error_bound`).

Layers are streamed to disk (1 MiB at a time), never held in memory, so 100 MB layers are fine.
Blobs are stored as ``<workdir>/blobs/sha256/<hex>``, the OCI layout's naming.

:func:`push_image` uploads with the plain registry API: ``POST /v2/<repo>/blobs/uploads/`` →
202 + Location; ``PUT <Location>&digest=…`` with the whole blob → 201 (blobs the repository
already has are skipped after a HEAD); then ``PUT /v2/<repo>/manifests/<tag>`` with the OCI
manifest media type → 201. Basic and bearer-token auth are answered by
:class:`~benchmarks.harness.regauth.ChallengeAuth`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from benchmarks.harness.procs import HarnessError
from benchmarks.harness.regauth import ChallengeAuth, Credentials

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

CHUNK = 1 << 20
# What a layer blob holds besides the file: a 512-byte tar header and two 512-byte
# end-of-archive blocks, 18 bytes of gzip header and trailer, and 5 bytes per deflate stored
# block, which zlib makes every ≈43 KiB at level 0 (we reserve one byte in 8000).
_OVERHEAD = 3 * 512 + 18
_DEFLATE_BYTES_PER_OVERHEAD_BYTE = 8000


def size_error_bound(requested: int) -> int:
    """How far below ``requested`` a layer blob may be (never above, unless ``requested`` is
    smaller than the overhead itself)."""
    return 1024 + requested // 8000


@dataclass(frozen=True)
class Blob:
    """One content-addressed blob on disk."""

    digest: str
    size: int
    path: Path
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """An OCI image: config, layers (in rootfs order) and the manifest that names them."""

    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str = OCI_MANIFEST

    @property
    def blobs(self) -> dict[str, Blob]:
        """digest → blob, config included (what a pull fetches besides the manifest)."""
        return {b.digest: b for b in (self.config, *self.layers)}

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def layers_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def total_size(self) -> int:
        """Bytes of all blobs (layers and config), the manifest not counted."""
        return self.layers_size + self.config.size


def goarch() -> str:
    """This machine's architecture in Go's (and so the image config's) spelling."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _random_chunks(seed: int, layer: int, size: int) -> Iterator[bytes]:
    index = 0
    remaining = size
    while remaining > 0:
        n = min(CHUNK, remaining)
        yield hashlib.shake_256(f"harness:{seed}:{layer}:{index}".encode()).digest(n)
        remaining -= n
        index += 1


class _Sink(Protocol):
    def write(self, data: memoryview, /) -> int: ...


class _HashingWriter(io.RawIOBase):
    """Writes through to ``sink`` (if any) while taking the sha256 and the size."""

    def __init__(self, sink: _Sink | None) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += len(view)
        if self._sink is not None:
            self._sink.write(view)
        return len(view)

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


def _blob_path(workdir: Path, digest: str) -> Path:
    return workdir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _store(workdir: Path, tmp: Path, digest: str) -> Path:
    path = _blob_path(workdir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return path


def _write_layer(workdir: Path, seed: int, index: int, size: int) -> tuple[Blob, str]:
    """One layer blob of about ``size`` bytes; returns the blob and its diff_id."""
    payload = max(0, size - _OVERHEAD - size // _DEFLATE_BYTES_PER_OVERHEAD_BYTE)
    payload -= payload % 512  # whole tar blocks: no padding after the file
    info = tarfile.TarInfo(f"layer-{index}.bin")
    info.size = payload
    info.mode = 0o644
    info.mtime = 0
    tmp = workdir / f"layer-{index}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out:
        compressed = _HashingWriter(out)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=0
        ) as gz:
            # The tar is written by hand (header, file, end-of-archive) rather than through
            # tarfile.open, which pads the archive to a 10 KiB record and so would put small
            # layers up to 10 KiB off their requested size.
            tar = _HashingWriter(gz)
            tar.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            for chunk in _random_chunks(seed, index, payload):
                tar.write(chunk)
            tar.write(bytes(2 * tarfile.BLOCKSIZE))
    digest = compressed.digest()
    path = _store(workdir, tmp, digest)
    return Blob(digest, compressed.size, path, OCI_LAYER_GZIP), tar.digest()


def _write_json_blob(workdir: Path, document: dict[str, Any], media_type: str) -> Blob:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_path(workdir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Blob(digest, len(data), path, media_type)


def make_image(seed: int, layer_sizes: Sequence[int], *, workdir: Path) -> Image:
    """Build an image whose layer blobs are about ``layer_sizes`` bytes each, under ``workdir``."""
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for index, size in enumerate(layer_sizes):
        layer, diff_id = _write_layer(workdir, seed, index, size)
        layers.append(layer)
        diff_ids.append(diff_id)
    config = _write_json_blob(
        workdir,
        {
            "architecture": goarch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Cmd": [f"/layer-{len(layer_sizes) - 1}.bin"],
                "Labels": {"seed": str(seed)},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"harness layer {i}"}
                for i in range(len(layer_sizes))
            ],
        },
        OCI_CONFIG,
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return Image(
        config=config,
        layers=tuple(layers),
        diff_ids=tuple(diff_ids),
        manifest=manifest,
        manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
    )


def _file_body(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise HarnessError(
            f"{what}: expected {status}, got {response.status_code} {response.text[:500]!r}"
        )


def push_blob(client: httpx.Client, registry_url: str, repo: str, blob: Blob) -> None:
    """Upload one blob (monolithic upload) unless the repository already has it."""
    blob_url = f"{registry_url}/v2/{repo}/blobs/{blob.digest}"
    if client.head(blob_url).status_code == 200:
        return
    started = client.post(f"{registry_url}/v2/{repo}/blobs/uploads/")
    _expect(started, 202, f"start upload of {blob.digest} to {repo}")
    location = httpx.URL(registry_url).join(started.headers["Location"])
    finished = client.put(
        location.copy_merge_params({"digest": blob.digest}),
        content=_file_body(blob.path),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
    )
    _expect(finished, 201, f"upload of {blob.digest} to {repo}")


def push_image(
    registry_url: str,
    repo: str,
    tag: str,
    image: Image,
    auth: Credentials | None = None,
    *,
    timeout: float = 120.0,
) -> str:
    """Push ``image`` as ``repo:tag``; returns the manifest digest the registry reports.

    ``auth`` is (user, password) for Basic or token auth, or None for anonymous.
    """
    with httpx.Client(auth=ChallengeAuth(auth), timeout=timeout) as client:
        for blob in image.blobs.values():
            push_blob(client, registry_url, repo, blob)
        response = client.put(
            f"{registry_url}/v2/{repo}/manifests/{tag}",
            content=image.manifest,
            headers={"Content-Type": image.manifest_media_type},
        )
        _expect(response, 201, f"put manifest {repo}:{tag}")
    digest = str(response.headers.get("Docker-Content-Digest", ""))
    if digest != image.manifest_digest:
        raise HarnessError(
            f"registry stored manifest {repo}:{tag} as {digest!r}, expected {image.manifest_digest}"
        )
    return digest
