"""The blob cache on disk: complete, verified blobs and resumable partial downloads.

Layout under the data directory::

    blobs/<hex>          complete blobs whose sha256 was checked; the only ones served as whole
    partial/<hex>.part   a download in progress, preallocated to the blob's size
    partial/<hex>.meta   msgpack: size, piece size and the pieces written so far

Rules:
- A blob reaches ``blobs/`` only by `PartialBlob.commit`, which the caller invokes after the
  whole-blob sha256 matched. A crash at any point leaves either a complete verified blob or a
  partial one, never a half-written file under ``blobs/``.
- ``.meta`` is written atomically (temp file + rename) but not fsynced per piece, so after a
  crash it may claim a piece whose bytes did not reach the disk. A resumed download therefore
  re-verifies every claimed piece against the manifest before trusting it (`recheck`).
- The quota counts complete and partial bytes. `reserve` evicts the least recently used complete
  blobs that nobody holds a lease on (a download or a client being served holds one); when that
  is not enough it raises `StorageFull` and nothing is evicted that is in use.
- Disk errors surface as `StorageError` subclasses, which the daemon maps to 507/500 answers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest, DigestError
from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.core.manifest import PieceManifest

log = logging.getLogger(__name__)

_META_VERSION = 1


class StorageError(Exception):
    """The cache could not do what was asked (I/O error, corrupt state)."""


class StorageFull(StorageError):
    """Not enough room under the quota (or on the disk) even after eviction."""


@dataclass(slots=True)
class _Entry:
    size: int
    atime: float


class BlobStore:
    def __init__(self, root: Path, quota_bytes: int | None = None) -> None:
        self.root = root
        self.quota = quota_bytes
        self.blobs_dir = root / "blobs"
        self.partial_dir = root / "partial"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self._complete: dict[Digest, _Entry] = {}
        self._partial_bytes: dict[Digest, int] = {}
        self._leases: dict[Digest, int] = {}
        self._clock = 0.0
        self._scan()

    # -- startup ------------------------------------------------------------------------------

    def _scan(self) -> None:
        for path in self.blobs_dir.iterdir():
            digest = _digest_from_name(path.name)
            if digest is None or not path.is_file():
                log.warning("ignoring stray file in the cache: %s", path)
                continue
            st = path.stat()
            self._complete[digest] = _Entry(st.st_size, st.st_mtime)
        for path in self.partial_dir.iterdir():
            if path.suffix == ".tmp":
                path.unlink(missing_ok=True)
                continue
            digest = _digest_from_name(path.stem)
            if digest is None:
                log.warning("ignoring stray file in the cache: %s", path)
                continue
            if path.suffix == ".part":
                if not path.with_suffix(".meta").exists() or digest in self._complete:
                    path.unlink(missing_ok=True)
                else:
                    self._partial_bytes[digest] = path.stat().st_size
        # latest access first is what LRU needs; start the logical clock past every mtime
        self._clock = max((e.atime for e in self._complete.values()), default=0.0)

    # -- complete blobs -----------------------------------------------------------------------

    def path_of(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.hex

    def has(self, digest: Digest) -> bool:
        return digest in self._complete

    def size_of(self, digest: Digest) -> int | None:
        entry = self._complete.get(digest)
        return entry.size if entry else None

    def touch(self, digest: Digest) -> None:
        """Mark a complete blob as just used (for LRU eviction)."""
        entry = self._complete.get(digest)
        if entry is not None:
            self._clock += 1
            entry.atime = self._clock
            with contextlib.suppress(OSError):
                os.utime(self.path_of(digest), (self._clock, self._clock))

    def open_complete(self, digest: Digest) -> int:
        """An fd on a complete blob (the caller closes it); touches it for LRU."""
        try:
            fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._complete.pop(digest, None)
            raise StorageError(f"{digest} vanished from the cache") from None
        self.touch(digest)
        return fd

    def remove(self, digest: Digest) -> None:
        self._complete.pop(digest, None)
        self.path_of(digest).unlink(missing_ok=True)

    # -- leases and quota ---------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, digest: Digest) -> Iterator[None]:
        """Hold `digest` in the cache (no eviction) for the duration."""
        self._leases[digest] = self._leases.get(digest, 0) + 1
        try:
            yield
        finally:
            left = self._leases[digest] - 1
            if left:
                self._leases[digest] = left
            else:
                del self._leases[digest]

    def partial_size(self, digest: Digest) -> int:
        """Bytes already counted for a partial download of `digest` (0 if none)."""
        return self._partial_bytes.get(digest, 0)

    def usage(self) -> int:
        return sum(e.size for e in self._complete.values()) + sum(self._partial_bytes.values())

    def reserve(self, size: int) -> list[Digest]:
        """Make room for `size` more bytes under the quota; return what was evicted."""
        if self.quota is None:
            return []
        need = self.usage() + size - self.quota
        evicted: list[Digest] = []
        if need <= 0:
            return evicted
        victims = sorted((e.atime, d) for d, e in self._complete.items() if d not in self._leases)
        freeable = sum(self._complete[d].size for _, d in victims)
        if freeable < need:
            raise StorageFull(
                f"need {size} bytes but only {self.quota - self.usage() + freeable} can be freed "
                f"under the {self.quota}-byte quota"
            )
        for _, digest in victims:
            if need <= 0:
                break
            need -= self._complete[digest].size
            self.remove(digest)
            evicted.append(digest)
            log.info("evicted %s from the cache (quota)", digest)
        return evicted

    # -- partial blobs ------------------------------------------------------------------------

    def open_partial(self, digest: Digest, layout: PieceLayout) -> PartialBlob:
        """Start or resume the download of `digest`; claimed pieces still need `recheck`."""
        part = self.partial_dir / f"{digest.hex}.part"
        meta = self.partial_dir / f"{digest.hex}.meta"
        have = Bitfield(layout.count)
        if part.exists() and meta.exists():
            resumed = _read_meta(meta, layout)
            if resumed is not None:
                have = resumed
            else:
                log.warning("discarding the unusable partial download of %s", digest)
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, f"cannot create {part}") from exc
        try:
            if os.fstat(fd).st_size != layout.total_size:
                os.ftruncate(fd, layout.total_size)
                have = Bitfield(layout.count)
        except OSError as exc:
            os.close(fd)
            raise _storage_error(exc, f"cannot size {part}") from exc
        self._partial_bytes[digest] = layout.total_size
        blob = PartialBlob(self, digest, layout, fd, part, meta, have)
        blob.save_meta()
        return blob

    def _forget_partial(self, digest: Digest) -> None:
        self._partial_bytes.pop(digest, None)

    def _adopt(self, digest: Digest, size: int) -> None:
        self._partial_bytes.pop(digest, None)
        self._clock += 1
        self._complete[digest] = _Entry(size, self._clock)


class PartialBlob:
    """A download in progress: an fd on the ``.part`` file and the pieces written so far."""

    def __init__(
        self,
        store: BlobStore,
        digest: Digest,
        layout: PieceLayout,
        fd: int,
        part: Path,
        meta: Path,
        have: Bitfield,
    ) -> None:
        self.store = store
        self.digest = digest
        self.layout = layout
        self.fd = fd
        self.have = have
        self._part = part
        self._meta = meta
        self.closed = False
        self.discarded = False

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write piece `index` and count it as held."""
        self.write_bytes(index, data)
        self.have.add(index)

    def write_bytes(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write piece `index` without counting it (safe in a worker thread: one pwrite)."""
        offset, length = self.layout.span(index)
        if len(data) != length:
            raise StorageError(f"piece {index} is {length} bytes, got {len(data)}")
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise _storage_error(exc, f"cannot write piece {index} of {self.digest}") from exc

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise _storage_error(exc, f"cannot read {self.digest}") from exc

    def read_piece(self, index: int) -> bytes:
        offset, length = self.layout.span(index)
        return self.read(offset, length)

    def recheck(self, manifest: PieceManifest) -> list[int]:
        """Drop claimed pieces (with known hashes) whose bytes do not match; return them."""
        dropped = [
            i
            for i in self.have
            if i < manifest.known and not manifest.verify(i, self.read_piece(i))
        ]
        for i in dropped:
            self.have.discard(i)
        return dropped

    def save_meta(self) -> None:
        body = msgpack.packb(
            {
                "v": _META_VERSION,
                "size": self.layout.total_size,
                "piece_size": self.layout.piece_size,
                "have": self.have.to_bytes(),
            }
        )
        tmp = self._meta.with_suffix(".tmp")
        try:
            tmp.write_bytes(body)
            tmp.replace(self._meta)
        except OSError as exc:
            raise _storage_error(exc, f"cannot save progress of {self.digest}") from exc

    def commit(self) -> Path:
        """Move the verified blob into ``blobs/``; the fd stays valid for readers."""
        target = self.store.path_of(self.digest)
        try:
            os.fsync(self.fd)
            self._part.replace(target)
        except OSError as exc:
            raise _storage_error(exc, f"cannot commit {self.digest}") from exc
        self._meta.unlink(missing_ok=True)
        self.store._adopt(self.digest, self.layout.total_size)
        return target

    def discard(self) -> None:
        """Delete the partial files (once: the paths may belong to a newer download later)."""
        if self.discarded:
            return
        self.discarded = True
        self._part.unlink(missing_ok=True)
        self._meta.unlink(missing_ok=True)
        self.store._forget_partial(self.digest)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _digest_from_name(name: str) -> Digest | None:
    try:
        return Digest.parse("sha256:" + name)
    except DigestError:
        return None


def _read_meta(path: Path, layout: PieceLayout) -> Bitfield | None:
    try:
        meta = msgpack.unpackb(path.read_bytes(), raw=False)
        if (
            not isinstance(meta, dict)
            or meta.get("v") != _META_VERSION
            or meta.get("size") != layout.total_size
            or meta.get("piece_size") != layout.piece_size
            or not isinstance(meta.get("have"), bytes)
        ):
            return None
        return Bitfield.from_bytes(layout.count, meta["have"])
    except (OSError, ValueError, LayoutError, msgpack.UnpackException):
        return None


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: disk full")
    return StorageError(f"{what}: {exc.strerror or exc}")
