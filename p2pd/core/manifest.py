"""Piece manifests: the per-piece hashes a peer checks every piece against.

The seeder reads a blob from the registry front to back, so piece hashes become known in order.
A `PieceManifest` is therefore a growing *prefix* of xxh3-128 hashes (16 bytes each) stored
columnar in one ``bytearray``: hash ``i`` is ``hashes[16*i : 16*i + 16]``. Peers may download
and verify piece ``i`` as soon as ``i < known``, long before the seeder has the whole blob.

``sealed`` means every piece hash is known *and* the seeder has checked the whole blob's sha256
against its digest. A peer still recomputes the sha256 itself before it marks the blob complete:
piece hashes protect against bad peers, the digest against a bad seeder.

`ManifestBuilder` is the seeder's side: feed it the blob's bytes in any chunking and it emits
piece hashes as piece boundaries pass and the sha256 at the end.
"""

from __future__ import annotations

import hashlib

import xxhash

from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout

HASH_SIZE = 16


class ManifestError(ValueError):
    """Hashes that do not fit the manifest: wrong size, out of order, or contradicting it."""


def piece_hash(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


class PieceManifest:
    __slots__ = ("_hashes", "digest", "layout", "sealed")

    def __init__(self, digest: Digest, layout: PieceLayout) -> None:
        self.digest = digest
        self.layout = layout
        self._hashes = bytearray()
        self.sealed = False

    @property
    def known(self) -> int:
        """How many leading pieces have a known hash."""
        return len(self._hashes) // HASH_SIZE

    @property
    def hashes(self) -> bytes:
        """All known hashes, columnar: the form the wire carries."""
        return bytes(self._hashes)

    def hashes_from(self, start: int) -> bytes:
        """Known hashes from piece `start` on (for incremental updates to peers)."""
        return bytes(self._hashes[start * HASH_SIZE :])

    def hash_of(self, index: int) -> bytes:
        if not 0 <= index < self.known:
            raise ManifestError(f"hash of piece {index} not known (known: {self.known})")
        return bytes(self._hashes[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def extend(self, start: int, hashes: bytes) -> int:
        """Merge hashes for pieces ``start, start+1, …``; return how many became newly known.

        Overlap with what is known must agree; a gap after the known prefix is refused.
        """
        if len(hashes) % HASH_SIZE:
            raise ManifestError(f"hash bytes not a multiple of {HASH_SIZE}: {len(hashes)}")
        n = len(hashes) // HASH_SIZE
        if n == 0 and 0 <= start <= self.layout.count:
            return 0  # nothing new, whatever the sender's position
        if start < 0 or start > self.known:
            raise ManifestError(f"hashes start at piece {start}, known prefix ends at {self.known}")
        if start + n > self.layout.count:
            raise ManifestError(
                f"hashes for pieces {start}..{start + n - 1} but the blob has {self.layout.count}"
            )
        overlap = min(self.known - start, n) * HASH_SIZE
        lo = start * HASH_SIZE
        if self._hashes[lo : lo + overlap] != hashes[:overlap]:
            raise ManifestError("hashes contradict the ones already known")
        before = self.known
        self._hashes += hashes[overlap:]
        return self.known - before

    def seal(self) -> None:
        """The seeder verified the whole blob: every hash is final."""
        if self.known != self.layout.count:
            raise ManifestError(f"cannot seal with {self.known} of {self.layout.count} hashes")
        self.sealed = True

    def verify(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """True when `data` is exactly piece `index` (length and hash)."""
        if not 0 <= index < self.known or len(data) != self.layout.length(index):
            return False
        lo = index * HASH_SIZE
        return piece_hash(data) == self._hashes[lo : lo + HASH_SIZE]


class ManifestBuilder:
    """Hash a blob as it streams in: piece hashes at piece boundaries, sha256 at the end."""

    def __init__(self, manifest: PieceManifest) -> None:
        self.manifest = manifest
        self._sha = hashlib.sha256()
        self._piece = xxhash.xxh3_128()
        self._piece_fill = 0
        self._received = 0

    @property
    def received(self) -> int:
        return self._received

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Hash the next bytes of the blob; return how many piece hashes became known."""
        layout = self.manifest.layout
        view = memoryview(data)
        if self._received + len(view) > layout.total_size:
            raise ManifestError(f"blob longer than its declared {layout.total_size} bytes")
        self._sha.update(view)
        self._received += len(view)
        done = bytearray()
        while view:
            index = self.manifest.known + len(done) // HASH_SIZE
            want = layout.length(index) - self._piece_fill
            chunk, view = view[:want], view[want:]
            self._piece.update(chunk)
            self._piece_fill += len(chunk)
            if self._piece_fill == layout.length(index):
                done += self._piece.digest()
                self._piece.reset()
                self._piece_fill = 0
        if done:
            self.manifest.extend(self.manifest.known, bytes(done))
        return len(done) // HASH_SIZE

    def finish(self) -> bool:
        """All bytes fed: True and the manifest sealed when the sha256 equals the digest."""
        if self._received != self.manifest.layout.total_size:
            raise ManifestError(
                f"blob ended after {self._received} of {self.manifest.layout.total_size} bytes"
            )
        if self._sha.digest() != self.manifest.digest.raw:
            return False
        self.manifest.seal()
        return True
