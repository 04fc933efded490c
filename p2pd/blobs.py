"""Blob downloads as the mirror sees them: where a blob comes from and how it is streamed.

`BlobSource` says where the runtime's request for a blob would have gone upstream (and with
which credentials); `BlobService` turns a digest plus its source into the bytes of the blob,
streamed in order from a byte offset, from the cache, the swarm or the registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from p2pd.core.digest import Digest
from p2pd.http.server import FileRegion


@dataclass(frozen=True, slots=True)
class BlobSource:
    """Where a blob lives upstream, as the runtime's request named it."""

    upstream: str  # registry base URL, e.g. "https://registry-1.docker.io"
    repository: str  # e.g. "library/alpine"
    authorization: str | None  # the runtime's Authorization header, forwarded as is
    size: int  # from the upstream's answer to the access-check HEAD


class BlobService(Protocol):
    def cached_size(self, digest: Digest) -> int | None:
        """Size of the blob if it is complete and verified in the local cache."""
        ...

    def stream(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[bytes | FileRegion]:
        """The blob from byte `start` to its end, in order, as verified bytes become available.

        Raises `p2pd.http.server.ResponseAborted` mid-stream when the blob turns out bad (the
        whole-blob sha256 does not match): the runtime sees a truncated body and retries. The
        final bytes are only released after the sha256 matched.
        """
        ...
