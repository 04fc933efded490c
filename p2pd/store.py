"""The blob cache on disk: complete, verified blobs and resumable partial downloads.

Layout under the data directory::

    blobs/<hex>          complete blobs whose sha256 was checked; the only ones served as whole
    layouts/<hex>        msgpack: size and piece size a complete blob was downloaded with
    partial/<hex>.part   a download in progress, preallocated to the blob's size
    partial/<hex>.meta   msgpack: size, piece size and the pieces written so far

Rules:
- A blob reaches ``blobs/`` only by `PartialBlob.commit`, which the caller invokes after the
  whole-blob sha256 matched. A crash at any point leaves either a complete verified blob or a
  partial one, never a half-written file under ``blobs/``.
- ``.meta`` is written atomically (temp file + rename) but not fsynced per piece, so after a
  crash it may claim a piece whose bytes did not reach the disk. A resumed download therefore
  re-verifies every claimed piece against the manifest before trusting it (`recheck`).
- The quota counts complete and partial bytes. `reserve` evicts the least recently used blobs
  that nobody holds a lease on (a download or a client being served holds one), and partial
  downloads nobody has open (abandoned by an earlier run), until the new blob fits; when that
  is not enough it raises `StorageFull` and evicts nothing. It also keeps the new blob from
  filling the disk itself: the free space, less what open downloads will still write and a
  small margin, must hold it, evicting the same way if not. Callers that get `StorageFull`
  stream the blob without caching it rather than fail.
- Recency survives a restart: a use stamps the blob file's mtime (nanoseconds, never going
  backwards), and the scan at start-up orders blobs by it. Piece reads (`open_reader`, per
  piece served) stamp it at most once every `_STAMP_EVERY_NS`; the order in memory is exact.
- `open_reader` keeps one fd open per complete blob lately served (at most `_READERS_MAX`)
  and hands out duplicates: a piece server opens a blob a thousand times per GiB, and the
  open, the stamp and their paths were a tenth of a piece request's CPU. `remove` closes it;
  so does a blob whose file vanished behind the store's back (found at the next stamp).
- A blob's layout is its supernode's (p2pd.core.layout), which need not be this version's
  rule: ``.meta`` records it, a resumed download keeps it, and `PartialBlob.commit` writes it
  to ``layouts/`` before the blob enters ``blobs/`` (the piece server answers requesters that
  name no piece size in it). A complete blob without a usable record -- from an older version,
  or a record that is unreadable or does not fit the blob (logged) -- has the rule's layout
  (`PieceLayout.for_size`). The record is read once, at start-up; `layout_of` is a lookup.
- Disk errors surface as `StorageError` subclasses (ENOSPC/EDQUOT as `StorageFull`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
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
# Room kept free on the cache's file system: 1% of it, at most this much.
_DISK_MARGIN_MAX = 1 << 30
# Complete blobs kept open for `open_reader`, the least recently read closed first.
_READERS_MAX = 64
# How often `open_reader` stamps a blob's file (and finds out whether it is still there).
_STAMP_EVERY_NS = 1_000_000_000


class StorageError(Exception):
    """The cache could not do what was asked (I/O error, corrupt state)."""


class StorageFull(StorageError):
    """Not enough room under the quota (or on the disk) even after eviction. `evicted`: what
    was evicted before the shortfall was found (the quota step can succeed and the disk step
    fail), so that the caller can still account for it."""

    evicted: tuple[Digest, ...] = ()


@dataclass(slots=True)
class _Entry:
    size: int
    atime: int  # nanoseconds; the blob file's mtime
    layout: PieceLayout | None  # None: a size no layout fits (never served as pieces)
    stamped: int = 0  # time.monotonic_ns() when `open_reader` last stamped the file


class BlobStore:
    def __init__(self, root: Path, quota_bytes: int | None = None) -> None:
        self.root = root
        self.quota = quota_bytes
        self.blobs_dir = root / "blobs"
        self.partial_dir = root / "partial"
        self.layouts_dir = root / "layouts"
        for directory in (self.blobs_dir, self.partial_dir, self.layouts_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._complete: dict[Digest, _Entry] = {}
        self._partial_bytes: dict[Digest, int] = {}
        self._partial_atime: dict[Digest, int] = {}
        self._open: dict[Digest, int] = {}  # open `PartialBlob`s per digest
        self._leases: dict[Digest, int] = {}
        self._readers: dict[Digest, int] = {}  # see open_reader; least recently read first
        self._clock = 0
        self._scan()

    # -- startup ------------------------------------------------------------------------------

    def _scan(self) -> None:
        for path in self.blobs_dir.iterdir():
            digest = _digest_from_name(path.name)
            if digest is None or not path.is_file():
                log.warning("ignoring stray file in the cache: %s", path)
                continue
            st = path.stat()
            layout = self._recorded_layout(digest, st.st_size)
            self._complete[digest] = _Entry(st.st_size, st.st_mtime_ns, layout)
        for path in self.layouts_dir.iterdir():
            digest = _digest_from_name(path.name)
            if digest is None or digest not in self._complete:
                path.unlink(missing_ok=True)  # a temp file, or the record of a blob gone
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
                    st = path.stat()
                    self._partial_bytes[digest] = st.st_size
                    self._partial_atime[digest] = st.st_mtime_ns
            elif path.suffix == ".meta" and (
                digest in self._complete or not path.with_suffix(".part").exists()
            ):
                path.unlink(missing_ok=True)  # the state of a download that is gone
        stamps = [e.atime for e in self._complete.values()] + list(self._partial_atime.values())
        self._clock = max(stamps, default=0)

    def _recorded_layout(self, digest: Digest, size: int) -> PieceLayout | None:
        """The layout `layouts/` records for complete blob `digest` of `size` bytes, else
        the rule's (see the module docstring)."""
        try:
            default = PieceLayout.for_size(size)
        except LayoutError:
            return None
        path = self.layouts_dir / digest.hex
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return default  # stored by an older version, or before the record was written
        except OSError as exc:
            log.warning("cannot read the layout of %s (%s): taking the rule's", digest, exc)
            return default
        layout = _layout_from(_unpack(body), size, default)
        if layout is None:
            log.warning("unusable layout record for %s: taking the rule's", digest)
            path.unlink(missing_ok=True)
            return default
        return layout

    def _now(self) -> int:
        """A use's time stamp: wall-clock nanoseconds, strictly increasing."""
        self._clock = max(self._clock + 1, time.time_ns())
        return self._clock

    # -- complete blobs -----------------------------------------------------------------------

    def path_of(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.hex

    def has(self, digest: Digest) -> bool:
        return digest in self._complete

    def size_of(self, digest: Digest) -> int | None:
        entry = self._complete.get(digest)
        return entry.size if entry else None

    def layout_of(self, digest: Digest) -> PieceLayout | None:
        """The layout complete blob `digest` was downloaded with (None if it is not here)."""
        entry = self._complete.get(digest)
        return entry.layout if entry else None

    def touch(self, digest: Digest) -> None:
        """Mark a complete blob as just used (for LRU eviction)."""
        entry = self._complete.get(digest)
        if entry is not None:
            entry.atime = self._now()
            with contextlib.suppress(OSError):
                os.utime(self.path_of(digest), ns=(entry.atime, entry.atime))

    def open_complete(self, digest: Digest) -> int:
        """An fd on a complete blob (the caller closes it); touches it for LRU."""
        try:
            fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget_complete(digest)
            raise StorageError(f"{digest} vanished from the cache") from None
        self.touch(digest)
        return fd

    def open_reader(self, digest: Digest) -> int | None:
        """An fd on complete blob `digest` (the caller closes it), or None if it is not
        complete here; touches it for LRU. Cheaper than `open_complete` when called again and
        again for the same blob (see the module docstring): a duplicate of an fd kept open."""
        entry = self._complete.get(digest)
        if entry is None:
            return None
        now = time.monotonic_ns()
        if now - entry.stamped >= _STAMP_EVERY_NS:
            entry.atime = self._now()
            try:
                os.utime(self.path_of(digest), ns=(entry.atime, entry.atime))
            except FileNotFoundError:
                self._forget_complete(digest)
                return None
            except OSError:
                pass  # a stamp that cannot be written costs recency after a restart, no more
            entry.stamped = now
        else:
            entry.atime = self._now()
        fd = self._readers.pop(digest, None)
        if fd is None:
            try:
                fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._forget_complete(digest)
                return None
            except OSError as exc:
                raise _storage_error(exc, f"cannot open {digest}") from exc
            if len(self._readers) >= _READERS_MAX:
                os.close(self._readers.pop(next(iter(self._readers))))
        self._readers[digest] = fd  # (re)inserted last: the most recently read
        return os.dup(fd)

    def close_readers(self) -> None:
        """Close the fds `open_reader` keeps (the duplicates it handed out stay valid)."""
        readers, self._readers = self._readers, {}
        for fd in readers.values():
            os.close(fd)

    def _forget_complete(self, digest: Digest) -> None:
        self._complete.pop(digest, None)
        fd = self._readers.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def remove(self, digest: Digest) -> None:
        self._forget_complete(digest)
        self.path_of(digest).unlink(missing_ok=True)
        (self.layouts_dir / digest.hex).unlink(missing_ok=True)

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

    def reserve(self, size: int, keep: Digest | None = None) -> list[Digest]:
        """Make room for `size` more bytes under the quota and on the disk; return what was
        evicted. `keep` (a partial download about to be resumed) is not a candidate.
        `StorageFull` if that cannot be done; its `evicted` names what went all the same."""
        evicted: list[Digest] = []
        try:
            if self.quota is not None:
                need = self.usage() + size - self.quota
                if need > 0:
                    evicted += self._evict(need, f"under the {self.quota}-byte quota", keep)
            short = self._disk_shortfall(size)
            if short > 0:
                evicted += self._evict(short, "on the disk", keep)
        except StorageFull as exc:
            exc.evicted = tuple(evicted)
            raise
        return evicted

    def _evict(self, need: int, where: str, keep: Digest | None) -> list[Digest]:
        """Free `need` bytes: abandoned partial downloads and unleased complete blobs, least
        recently used first."""
        victims = sorted(
            [(e.atime, d, False) for d, e in self._complete.items() if d not in self._leases]
            + [
                (self._partial_atime.get(d, 0), d, True)
                for d in self._partial_bytes
                if d not in self._open and d not in self._leases and d != keep
            ]
        )
        sizes = {
            (d, partial): self._partial_bytes[d] if partial else self._complete[d].size
            for _, d, partial in victims
        }
        if sum(sizes.values()) < need:
            raise StorageFull(
                f"{need} more bytes needed {where}, but only {sum(sizes.values())} can be freed "
                "(the rest is in use)"
            )
        evicted: list[Digest] = []
        for _, digest, partial in victims:
            if need <= 0:
                break
            need -= sizes[digest, partial]
            if partial:
                self._remove_partial(digest)
                log.info("removed the abandoned partial download of %s (%s)", digest, where)
            else:
                self.remove(digest)
                log.info("evicted %s from the cache (room %s)", digest, where)
            evicted.append(digest)
        return evicted

    def _disk_shortfall(self, size: int) -> int:
        """Bytes missing on the file system for `size` more, counting what open downloads
        (sparse files) will still write and a margin; <= 0 if there is room."""
        try:
            fs = os.statvfs(self.root)
        except OSError:
            return 0
        free = fs.f_bavail * fs.f_frsize
        margin = min(_DISK_MARGIN_MAX, fs.f_blocks * fs.f_frsize // 100)
        pending = 0
        for digest in self._open:
            try:
                st = os.stat(self.partial_dir / f"{digest.hex}.part")
            except OSError:
                continue
            pending += max(0, st.st_size - st.st_blocks * 512)
        return size + pending + margin - free

    def _remove_partial(self, digest: Digest) -> None:
        (self.partial_dir / f"{digest.hex}.part").unlink(missing_ok=True)
        (self.partial_dir / f"{digest.hex}.meta").unlink(missing_ok=True)
        self._forget_partial(digest)

    # -- partial blobs ------------------------------------------------------------------------

    def open_partial(self, digest: Digest, layout: PieceLayout) -> PartialBlob:
        """Start or resume the download of `digest`; claimed pieces still need `recheck`. A
        resumed download keeps the layout it was started with (its supernode's, which may
        differ from `layout`, the rule's): the blob's `PartialBlob.layout` says which."""
        part = self.partial_dir / f"{digest.hex}.part"
        meta = self.partial_dir / f"{digest.hex}.meta"
        have = Bitfield(layout.count)
        if part.exists() and meta.exists():
            resumed = _read_meta(meta, layout)
            if resumed is not None:
                layout, have = resumed  # the layout it was started with, maybe not `layout`
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
        self._partial_atime[digest] = self._now()
        self._open[digest] = self._open.get(digest, 0) + 1
        blob = PartialBlob(self, digest, layout, fd, part, meta, have)
        blob.save_meta()
        return blob

    def _forget_partial(self, digest: Digest) -> None:
        self._partial_bytes.pop(digest, None)
        self._partial_atime.pop(digest, None)

    def _closed(self, digest: Digest) -> None:
        left = self._open.get(digest, 0) - 1
        if left > 0:
            self._open[digest] = left
        else:
            self._open.pop(digest, None)

    def _adopt(self, digest: Digest, layout: PieceLayout) -> None:
        self._forget_partial(digest)
        stale = self._readers.pop(digest, None)  # (none: a removal closed it)
        if stale is not None:
            os.close(stale)
        entry = _Entry(layout.total_size, self._now(), layout)
        self._complete[digest] = entry
        with contextlib.suppress(OSError):
            os.utime(self.path_of(digest), ns=(entry.atime, entry.atime))


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
        self.write_at(offset, data, f"piece {index}")

    def write_at(
        self, offset: int, data: bytes | bytearray | memoryview, what: str = "bytes"
    ) -> None:
        """Write `data` at byte `offset` without counting any piece (one pwrite)."""
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise _storage_error(exc, f"cannot write {what} of {self.digest}") from exc

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

    def relayout(self, layout: PieceLayout) -> None:
        """Cut the blob into `layout`'s pieces instead (same size), holding none of them:
        the download's supernode chose another layout before any piece was counted."""
        if layout.total_size != self.layout.total_size:
            raise LayoutError(
                f"a layout of {layout.total_size} bytes for a blob of {self.layout.total_size}"
            )
        self.layout = layout
        self.have = Bitfield(layout.count)
        self.save_meta()

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
        record = self.store.layouts_dir / self.digest.hex
        tmp = record.with_suffix(".tmp")
        body = msgpack.packb(
            {
                "v": _META_VERSION,
                "size": self.layout.total_size,
                "piece_size": self.layout.piece_size,
            }
        )
        try:
            # the record first: a crash between the two leaves a record without its blob,
            # which the next start-up deletes (not fsynced: one lost takes the rule's layout)
            tmp.write_bytes(body)
            tmp.replace(record)
            os.fsync(self.fd)
            self._part.replace(target)
        except OSError as exc:
            raise _storage_error(exc, f"cannot commit {self.digest}") from exc
        self._meta.unlink(missing_ok=True)
        self.store._adopt(self.digest, self.layout)
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
            self.store._closed(self.digest)


def _digest_from_name(name: str) -> Digest | None:
    try:
        return Digest.parse("sha256:" + name)
    except DigestError:
        return None


def _read_meta(path: Path, default: PieceLayout) -> tuple[PieceLayout, Bitfield] | None:
    """A partial download's layout and claimed pieces, if its ``.meta`` fits a blob of
    `default`'s size."""
    try:
        meta = _unpack(path.read_bytes())
        layout = _layout_from(meta, default.total_size, default)
        have = meta.get("have")
        if layout is None or not isinstance(have, bytes):
            return None
        return layout, Bitfield.from_bytes(layout.count, have)
    except (OSError, ValueError):
        return None


def _unpack(body: bytes) -> dict[str, object]:
    """A ``.meta`` or ``layouts/`` record's map ({} if it is none)."""
    try:
        meta = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException):
        return {}
    return meta if isinstance(meta, dict) else {}


def _layout_from(meta: dict[str, object], size: int, default: PieceLayout) -> PieceLayout | None:
    """The layout a ``.meta`` or ``layouts/`` record holds, if it is one for a blob of `size`
    bytes: `default` or one that `PieceLayout.checked` takes; None if not."""
    piece_size = meta.get("piece_size")
    if meta.get("v") != _META_VERSION or meta.get("size") != size or type(piece_size) is not int:
        return None
    if piece_size == default.piece_size:
        return default
    try:
        return PieceLayout.checked(size, piece_size)
    except LayoutError:
        return None


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: disk full")
    return StorageError(f"{what}: {exc.strerror or exc}")
