"""Commands the benchmark runs *inside* a namespace: ``python -m benchmarks.hosts.inns …``.

The root namespace must never address a 10.200.x host, so whatever talks to one runs in a
child process started with ``ip netns exec``. Today that is the image push::

    python -m benchmarks.hosts.inns push IMAGE.json http://10.200.0.1:5000 REPO TAG

``IMAGE.json`` describes an image built by `benchmarks.harness.image.make_image` in the root
namespace (no network needed there); see :func:`image_to_json`.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness.image import Blob, Image, push_image


def _blob_json(blob: Blob) -> dict[str, Any]:
    return {
        "digest": blob.digest,
        "size": blob.size,
        "path": str(blob.path),
        "media_type": blob.media_type,
    }


def _blob(doc: dict[str, Any]) -> Blob:
    return Blob(doc["digest"], int(doc["size"]), Path(doc["path"]), doc["media_type"])


def image_to_json(image: Image) -> dict[str, Any]:
    """Everything a push needs; the blobs stay where they are on disk."""
    return {
        "config": _blob_json(image.config),
        "layers": [_blob_json(layer) for layer in image.layers],
        "diff_ids": list(image.diff_ids),
        "manifest": base64.b64encode(image.manifest).decode(),
        "manifest_digest": image.manifest_digest,
        "manifest_media_type": image.manifest_media_type,
    }


def image_from_json(doc: dict[str, Any]) -> Image:
    return Image(
        config=_blob(doc["config"]),
        layers=tuple(_blob(layer) for layer in doc["layers"]),
        diff_ids=tuple(doc["diff_ids"]),
        manifest=base64.b64decode(doc["manifest"]),
        manifest_digest=doc["manifest_digest"],
        manifest_media_type=doc["manifest_media_type"],
    )


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] != "push":
        print(
            "usage: python -m benchmarks.hosts.inns push IMAGE.json URL REPO TAG", file=sys.stderr
        )
        return 2
    _, description, url, repo, tag = argv
    image = image_from_json(json.loads(Path(description).read_text()))
    print(push_image(url, repo, tag, image))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
