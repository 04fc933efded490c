"""Blob downloads as the mirror sees them: one shared download per blob, streamed in order.

`BlobSource` says where the runtime's request for a blob would have gone upstream (and with
which credentials). `BlobManager` (the daemon's `BlobService`) turns a digest plus its source
into the blob's bytes from a byte offset: from the cache when the blob is complete there, else
from the one `Download` of that blob on this host, which any number of clients share.

A `Download` owns the ``.part`` file. *Fillers* put pieces into it -- the swarm first, the
registry (`BackSource`) when the swarm cannot help -- and readers stream the contiguous prefix
as it grows. Rules:

- Every byte a reader gets was written by a filler and, for swarm pieces, verified against the
  piece manifest before it was written.
- The whole-blob sha256 is computed incrementally over the contiguous prefix (in a worker
  thread), from the file -- or, for a piece written next to the hashed prefix, from the
  filler's buffer as it writes it (`Download.hash_if_next`). The last piece is held back
  from readers until the sha256 matched, so a runtime never receives a complete body that is
  wrong. On mismatch the download fails, the readers' responses are aborted mid-way (the
  runtime retries) and nothing is cached.
- Only then is the blob committed to the cache (`PartialBlob.commit`).
- A download is not cancelled when a client goes away: other clients, and other hosts through
  the piece server, may want it, and the runtime will usually retry.
- When the cache cannot take the blob (the quota is all in use, the disk is full, or it fills
  up during the download) the runtime still gets it: straight from the registry, not cached,
  hashed on the way with the last bytes held back until the sha256 matched
  (`BackSource.stream_verified`). Nothing half written is ever committed.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio

from p2pd import excgroups, offload
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.http.server import FileRegion, ResponseAborted
from p2pd.store import BlobStore, PartialBlob, StorageError, StorageFull

log = logging.getLogger(__name__)

_HASH_CHUNK = 1024 * 1024  # hashing speed is the same from 1 MiB reads up
_STREAM_CHUNK = 16 * 1024 * 1024
_META_EVERY = 8  # pieces between saves of the resume state


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


class DownloadFailed(Exception):
    """The blob could not be fetched or did not verify; the message says why."""


class FillerGaveUp(Exception):
    """A filler stopped without completing the blob; the next filler may take over.

    `fleetwide` says the cause may hit every host at once (a supernode down, a stalled swarm),
    so the next filler starts after a random delay instead of with the whole fleet.
    """

    def __init__(self, reason: str, *, fleetwide: bool = True) -> None:
        super().__init__(reason)
        self.fleetwide = fleetwide


class DownloadState(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class Download:
    """One blob being fetched to this host; fillers put pieces, readers stream the prefix."""

    def __init__(
        self, digest: Digest, partial: PartialBlob, totals: dict[str, int] | None = None
    ) -> None:
        self.digest = digest
        self.partial = partial
        self.layout: PieceLayout = partial.layout
        self.state = DownloadState.RUNNING
        self.error = ""
        self.sources: dict[str, int] = {}  # bytes by where they came from ("peer:<id>", …)
        self._totals = totals if totals is not None else {}  # the same, over all downloads
        # `_hashed` bytes of the prefix are in `_sha`; both change under `_sha_lock` only
        # (the hasher task's worker thread and fillers' worker threads share them)
        self._hashed = 0
        self._sha = hashlib.sha256()
        self._sha_lock = threading.Lock()
        self._hash_buffer: bytearray | None = None  # allocated on first use
        self._changed = trio.Event()
        self.finished = trio.Event()  # set once COMPLETE or FAILED
        self.keep_partial = False
        self.storage_full = False  # failed for want of room: readers go to the registry
        self.on_fail: list[Callable[[], None]] = []
        # Pieces a previous run claimed to have written: not trusted (nor released to
        # readers) until a filler that knows their hashes checks them (`adopt`).
        self.claimed = partial.have.copy()
        partial.have = Bitfield(self.layout.count)
        self._prefix_pieces = 0

    # -- what fillers use ---------------------------------------------------------------------

    def relayout(self, layout: PieceLayout) -> None:
        """Cut the blob into `layout`'s pieces, the layout its supernode chose (a filler calls
        this before it writes anything). Claimed pieces carry over where the new pieces lie
        wholly inside claimed old ones; they are still checked before they count.
        `LayoutError` if `layout` is for another size or pieces are counted already."""
        if layout == self.layout:
            return
        if self.state is not DownloadState.RUNNING or not self.have.is_empty():
            raise LayoutError(f"{self.digest}: pieces already written in another layout")
        self.partial.relayout(layout)
        self.claimed = _recut(self.claimed, self.layout, layout)
        self.layout = layout
        self._prefix_pieces = 0

    @property
    def have(self) -> Bitfield:
        return self.partial.have

    def missing(self) -> list[int]:
        return [i for i in range(self.layout.count) if i not in self.partial.have]

    def pieces_complete(self) -> bool:
        return self.partial.have.is_full()

    def put_piece(self, index: int, data: bytes | bytearray | memoryview, source: str) -> None:
        """Write a piece (already verified, if it can be) and wake readers and the hasher."""
        if self.state is not DownloadState.RUNNING or index in self.partial.have:
            return
        self.partial.write_bytes(index, data)
        self.mark_written(index, source)

    def hash_if_next(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """(Any thread.) Piece `index` was just written with `data`: when it extends the
        hashed prefix, feed the sha256 from `data` now, saving `hash_and_commit` a read of
        it back from the file (a copy per byte; the swarm writes pieces mostly in order).
        Skipped when the hasher holds the lock: it reads the piece from the file then."""
        offset = self.layout.offset(index)
        if self._hashed != offset or not self._sha_lock.acquire(blocking=False):
            return
        try:
            if self._hashed == offset and len(data) == self.layout.length(index):
                self._sha.update(data)
                self._hashed = offset + len(data)
        finally:
            self._sha_lock.release()

    def mark_written(self, index: int, source: str) -> None:
        """A piece's bytes are on disk (written by `PartialBlob.write_bytes`, perhaps in a
        worker thread): count it and wake readers and the hasher."""
        if self.state is not DownloadState.RUNNING or index in self.partial.have:
            return
        self.partial.have.add(index)
        if self.partial.have.count() % _META_EVERY == 0:
            self.partial.save_meta()  # progress a restart can resume from
        length = self.layout.length(index)
        self.sources[source] = self.sources.get(source, 0) + length
        kind = source.partition(":")[0]
        self._totals[kind] = self._totals.get(kind, 0) + length
        self._prefix_pieces = self.partial.have.first_missing()
        self._notify()

    def adopt(self, index: int, source: str) -> None:
        """A claimed piece already on disk matched its hash: count it as written."""
        if self.state is not DownloadState.RUNNING or index in self.partial.have:
            return
        self.claimed.discard(index)
        self.partial.have.add(index)
        self.sources[source] = self.sources.get(source, 0) + self.layout.length(index)
        self._prefix_pieces = self.partial.have.first_missing()
        self._notify()

    # -- what readers use ---------------------------------------------------------------------

    @property
    def prefix_bytes(self) -> int:
        """Bytes of the contiguous prefix written so far."""
        if self._prefix_pieces >= self.layout.count:
            return self.layout.total_size
        return self._prefix_pieces * self.layout.piece_size

    @property
    def released(self) -> int:
        """Bytes readers may have: the prefix, less the last piece until the sha256 matched."""
        if self.state is DownloadState.COMPLETE:
            return self.layout.total_size
        if self.layout.count == 0:
            return 0
        return min(self.prefix_bytes, self.layout.offset(self.layout.count - 1))

    async def wait_released(self, beyond: int) -> int:
        """Wait until more than `beyond` bytes are released (or the blob is complete)."""
        while True:
            if self.state is DownloadState.FAILED:
                raise ResponseAborted(f"download of {self.digest} failed: {self.error}")
            released = self.released
            if released > beyond or self.state is DownloadState.COMPLETE:
                return released
            await self._changed.wait()

    async def wait_pieces(self, beyond: int) -> None:
        """Wait until more than `beyond` pieces are written, or the download ends."""
        while self.state is DownloadState.RUNNING and self.partial.have.count() <= beyond:
            await self._changed.wait()

    # -- life-cycle ---------------------------------------------------------------------------

    def fail(self, reason: str, *, keep_partial: bool = False) -> None:
        """Give up; the partial file is discarded unless `keep_partial` (a shutdown: the
        verified pieces stay for a resume)."""
        if self.state is DownloadState.RUNNING:
            self.state = DownloadState.FAILED
            self.error = reason
            self.keep_partial = keep_partial
            log.warning("download of %s failed: %s", self.digest, reason)
            self.finished.set()
            self._notify()
            for callback in self.on_fail:
                callback()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def hash_and_commit(self) -> None:
        """Follow the prefix with the sha256 until the blob is whole; commit or fail."""
        size = self.layout.total_size
        while self.state is DownloadState.RUNNING:
            target = self.prefix_bytes
            if self._hashed < target:
                await offload.run_sync(self._hash_range, target)
                continue
            if self._hashed == size and target == size:
                # (pieces hashed from their buffers may run ahead of the written prefix: the
                # blob is whole once every piece is marked written too)
                break
            await self._changed.wait()
        if self.state is not DownloadState.RUNNING:
            return
        if self._sha.digest() != self.digest.raw:
            self.fail(f"sha256 of the assembled blob is {self._sha.hexdigest()}")
            return
        try:
            # fsync of a multi-GB file can take seconds: not on the event loop
            await offload.run_sync(self.partial.commit)
        except StorageError as exc:
            self.storage_full = isinstance(exc, StorageFull)
            self.fail(str(exc))
            return
        if self.state is DownloadState.RUNNING:
            self.state = DownloadState.COMPLETE
            self.finished.set()
            self._notify()

    def _hash_range(self, end: int) -> None:
        """(In a worker thread.) Feed the sha256 from the file up to byte `end`."""
        # Into one buffer reused for the whole download: a fresh multi-MiB bytes object per
        # read was allocated in whichever worker thread ran this, and each thread's malloc
        # arena kept its freed chunks resident (tens of MiB of peak RSS).
        fd = self.partial.fd
        if self._hash_buffer is None:
            self._hash_buffer = bytearray(_HASH_CHUNK)
        view = memoryview(self._hash_buffer)
        try:
            with self._sha_lock:
                start = self._hashed
                while start < end:
                    n = os.preadv(fd, [view[: min(_HASH_CHUNK, end - start)]], start)
                    if not n:
                        raise StorageError(f"{self.digest}: file shorter than its prefix")
                    self._sha.update(view[:n])
                    start += n
                    self._hashed = start
        finally:
            view.release()


def _recut(claimed: Bitfield, old: PieceLayout, new: PieceLayout) -> Bitfield:
    """The pieces of `new` whose bytes all lie in pieces of `old` that `claimed` holds."""
    recut = Bitfield(new.count)
    for index in range(new.count):
        offset, length = new.span(index)
        first, last = old.piece_at(offset), old.piece_at(offset + length - 1)
        if all(i in claimed for i in range(first, last + 1)):
            recut.add(index)
    return recut


class Filler(Protocol):
    """Something that puts pieces into a download: the swarm, or the registry directly."""

    async def fill(self, download: Download, source: BlobSource) -> None:
        """Put pieces until every piece is in; raise `FillerGaveUp` to hand over."""
        ...


class BackSource:
    """Fetch a blob straight from the registry (with the runtime's credentials).

    Used when no supernode answers or the swarm stalls. Resumes from the first missing piece
    with a Range request; the registry's bytes are checked by the whole-blob sha256.
    """

    def __init__(self, client: httpx.AsyncClient, attempts: int = 3) -> None:
        self.client = client
        self.attempts = attempts

    async def fill(self, download: Download, source: BlobSource) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                await self._fetch(download, source)
                return
            except (httpx.TransportError, FillerGaveUp) as exc:
                if attempt == self.attempts:
                    raise DownloadFailed(f"registry fetch failed: {exc}") from exc
                log.info("registry fetch of %s: %s; retrying", download.digest, exc)
                await trio.sleep(0.5 * attempt)

    async def stream_verified(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[bytes]:
        """The blob from byte `start`, straight from the registry and not cached. The whole
        body is hashed (from byte 0 even for a later `start`), and the last chunk is held back
        until the sha256 and the size matched: a wrong blob ends in `ResponseAborted`, never
        as a complete body."""
        url = f"{source.upstream}/v2/{source.repository}/blobs/{digest}"
        headers = {"Authorization": source.authorization} if source.authorization else {}
        sha = hashlib.sha256()
        position = 0
        held = b""
        try:
            async with self.client.stream(
                "GET", url, headers=headers, follow_redirects=True
            ) as response:
                if response.status_code != 200:
                    raise ResponseAborted(f"registry answered {response.status_code} for {url}")
                async for chunk in response.aiter_raw():
                    sha.update(chunk)
                    end = position + len(chunk)
                    if end > source.size:
                        raise ResponseAborted("registry sent more bytes than the blob's size")
                    if held:
                        yield held
                    held = chunk[max(0, start - position) :] if end > start else b""
                    position = end
        except httpx.HTTPError as exc:
            raise ResponseAborted(f"registry fetch broke off: {type(exc).__name__}") from exc
        if position != source.size or sha.digest() != digest.raw:
            raise ResponseAborted(f"registry's {digest} is not the blob: size or sha256 differ")
        if held:
            yield held

    async def _fetch(self, download: Download, source: BlobSource) -> None:
        layout = download.layout
        first = download.have.first_missing()
        if first >= layout.count:
            return
        start = layout.offset(first)
        url = f"{source.upstream}/v2/{source.repository}/blobs/{download.digest}"
        headers = {"Range": f"bytes={start}-"} if start else {}
        if source.authorization:
            headers["Authorization"] = source.authorization
        async with self.client.stream(
            "GET", url, headers=headers, follow_redirects=True
        ) as response:
            if start and response.status_code == 200:
                start, first = 0, 0  # the registry ignored the range: take it from the top
            elif response.status_code not in (200, 206):
                if response.status_code >= 500:
                    raise FillerGaveUp(f"registry answered {response.status_code}")
                raise DownloadFailed(f"registry answered {response.status_code} for {url}")
            index, offset = first, start
            buf = bytearray()
            async for chunk in response.aiter_raw():
                buf += chunk
                while index < layout.count and len(buf) >= layout.length(index):
                    length = layout.length(index)
                    download.put_piece(index, memoryview(buf)[:length], "registry")
                    del buf[:length]
                    index += 1
                    offset += length
                if index >= layout.count and buf:
                    raise DownloadFailed("registry sent more bytes than the blob's size")
            if index < layout.count:
                raise FillerGaveUp(f"registry stream ended at byte {offset + len(buf)}")


class BlobManager:
    """The daemon's `BlobService`: cache first, else one shared download per blob."""

    def __init__(
        self,
        store: BlobStore,
        nursery: trio.Nursery,
        fillers: list[Filler],
        *,
        rng: random.Random | None = None,
        fallback_jitter: float = 0.0,
    ) -> None:
        self.store = store
        self.nursery = nursery
        self.fillers = fillers
        self.rng = rng or random.Random()
        self.fallback_jitter = fallback_jitter
        self.downloads: dict[Digest, Download] = {}
        # bytes written into downloads by kind of source ("peer", "registry")
        self.bytes_from: dict[str, int] = {}
        self.bytes_to_clients = 0
        self.cache_hits = 0
        self.back_to_source = 0  # downloads handed to a fallback filler
        self.uncached = 0  # blobs streamed from the registry because the cache had no room
        self.completed = 0
        self.failed = 0

    def cached_size(self, digest: Digest) -> int | None:
        return self.store.size_of(digest)

    def active(self, digest: Digest) -> Download | None:
        return self.downloads.get(digest)

    async def stream(
        self, digest: Digest, source: BlobSource, start: int
    ) -> AsyncIterator[bytes | FileRegion]:
        if self.store.has(digest):
            self.cache_hits += 1
            async for region in self._stream_complete(digest, start):
                yield region
            return
        download = self.downloads.get(digest)
        if download is None:
            try:
                download = self._start(digest, source)
            except StorageError as exc:
                async for chunk in self._uncached(digest, source, start, exc):
                    yield chunk
                return
        fd = os.dup(download.partial.fd)
        try:
            with self.store.lease(digest):
                position = start
                while True:
                    try:
                        released = await download.wait_released(position)
                    except ResponseAborted as exc:
                        if not download.storage_full:
                            raise
                        # the disk filled up under the download: the rest from the registry
                        async for chunk in self._uncached(digest, source, position, exc):
                            yield chunk
                        return
                    if released > position:
                        end = min(released, position + _STREAM_CHUNK)
                        yield FileRegion(fd, position, end - position)
                        self.bytes_to_clients += end - position
                        position = end
                    elif download.state is DownloadState.COMPLETE:
                        return
        finally:
            os.close(fd)

    async def _stream_complete(self, digest: Digest, start: int) -> AsyncIterator[FileRegion]:
        with self.store.lease(digest):
            fd = self.store.open_complete(digest)
            try:
                size = os.fstat(fd).st_size
                if start < size:
                    yield FileRegion(fd, start, size - start)
                    self.bytes_to_clients += size - start
            finally:
                os.close(fd)

    async def _uncached(
        self, digest: Digest, source: BlobSource, start: int, why: Exception
    ) -> AsyncIterator[bytes]:
        back = next((f for f in self.fillers if isinstance(f, BackSource)), None)
        if back is None:
            raise ResponseAborted(f"cannot cache {digest}: {why}")
        log.warning("cannot cache %s (%s): streaming it from the registry", digest, why)
        self.uncached += 1
        async for chunk in back.stream_verified(digest, source, start):
            self.bytes_from["registry"] = self.bytes_from.get("registry", 0) + len(chunk)
            self.bytes_to_clients += len(chunk)
            yield chunk

    def _start(self, digest: Digest, source: BlobSource) -> Download:
        """Start the download (StorageError if the cache has no room for it)."""
        # the rule's layout until a filler learns the blob's supernode's (`Download.relayout`);
        # a resumed download keeps the one it had (`BlobStore.open_partial`)
        layout = PieceLayout.for_size(source.size)
        # a resumed partial is counted already
        self.store.reserve(layout.total_size - self.store.partial_size(digest), keep=digest)
        partial = self.store.open_partial(digest, layout)
        download = Download(digest, partial, self.bytes_from)
        self.downloads[digest] = download
        self.nursery.start_soon(self._run, download, source)
        return download

    async def _run(self, download: Download, source: BlobSource) -> None:
        digest = download.digest
        started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, download, download.hash_and_commit())
                with trio.CancelScope() as filling:
                    # a failed download (say, a sha256 mismatch) stops its fillers at once,
                    # and the next request for the blob starts afresh
                    download.on_fail.append(filling.cancel)
                    download.on_fail.append(lambda: self._drop(download))
                    await self._guarded(download, self._fill(download, source))
                if download.state is DownloadState.RUNNING and not download.pieces_complete():
                    download.fail("no filler completed the blob")
        finally:
            self._forget(download)
            if download.state is DownloadState.RUNNING:
                # cancelled (the daemon is stopping): keep the verified pieces for a resume
                download.fail("the daemon is shutting down", keep_partial=True)
                with contextlib.suppress(StorageError):
                    download.partial.save_meta()
            download.partial.close()
            if download.state is DownloadState.COMPLETE:
                self.completed += 1
            elif not download.keep_partial:
                self.failed += 1
            seconds = trio.current_time() - started
            sources = dict(sorted(download.sources.items()))
            log.info(
                "download of %s %s in %.2f s: %s",
                digest,
                download.state.value,
                seconds,
                ", ".join(f"{k}={v}" for k, v in sources.items()) or "-",
                extra={
                    "fields": {
                        "event": "pull",
                        "digest": str(digest),
                        "state": download.state.value,
                        "bytes": download.layout.total_size,
                        "seconds": round(seconds, 3),
                        "sources": sources,
                        "error": download.error or None,
                    }
                },
            )

    def _drop(self, download: Download) -> None:
        """A download failed: its files go at once (readers keep their fds), so that the next
        request for the blob starts afresh without racing this one's clean-up."""
        if not download.keep_partial:
            with contextlib.suppress(OSError):
                download.partial.discard()
        self._forget(download)

    def _forget(self, download: Download) -> None:
        if self.downloads.get(download.digest) is download:
            del self.downloads[download.digest]

    async def _guarded(self, download: Download, work: Awaitable[None]) -> None:
        """Run `work`; any failure fails the download (and wakes its readers) instead of
        tearing down the daemon."""
        try:
            await work
        except DownloadFailed as exc:
            download.fail(str(exc))
        except StorageError as exc:
            download.storage_full = isinstance(exc, StorageFull)
            download.fail(f"cache: {exc}")
        except Exception as exc:
            log.exception("download of %s crashed", download.digest)
            download.fail(f"internal error: {exc!r}")

    async def _fill(self, download: Download, source: BlobSource) -> None:
        jitter = False
        for n, filler in enumerate(self.fillers):
            if download.pieces_complete() or download.state is not DownloadState.RUNNING:
                return
            if n:
                self.back_to_source += 1
            if jitter and self.fallback_jitter:
                # spread a fleet's fallback over time instead of all hosts at once
                await trio.sleep(self.rng.uniform(0, self.fallback_jitter))
            try:
                await filler.fill(download, source)
            except FillerGaveUp as exc:
                log.info("%s gave up on %s: %s", type(filler).__name__, download.digest, exc)
                jitter = exc.fleetwide
            except StorageError:
                raise  # the cache's trouble, not the filler's: the next one would meet it too
            except Exception as exc:
                storage = excgroups.find(exc, StorageError)
                if storage is not None:
                    # the same trouble from inside a filler's own tasks (an exception group):
                    # a full disk is not a filler bug, and the registry would meet it too
                    raise storage from exc
                if n == len(self.fillers) - 1:
                    raise
                # a bug or a surprise in one filler must not cost the download its fallback
                log.exception("%s failed on %s", type(filler).__name__, download.digest)
                jitter = True
