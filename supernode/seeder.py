"""The seeder: bring one blob into the supernode's store, publishing pieces as they land.

A `Task` is the supernode's record of one blob beside the scheduler's state: where to fetch it
(`Source`), the *public* manifest peers are told about, the partial file while fetching, and
why it failed. `Seeder.run` drives one task to READY or FAILED and never raises (except
cancellation): a bad upstream is the task's failure, not the daemon's.

Two sources, tried in order:

1. the store: a blob already complete on disk (a restart) is hashed once, piece by piece in a
   worker thread, and becomes READY when its sha256 still equals the digest; otherwise it is
   removed and fetched again;
2. the upstream registry: ``GET {upstream}/v2/{repository}/blobs/{digest}`` with the
   registrant's ``Authorization``, following redirects (httpx drops the header when a redirect
   leaves the registry's origin, as storage back-ends require).

Data path of a fetch: network chunks are written to the ``.part`` file as they arrive and
copied into one reused piece-sized buffer; when a piece is complete one worker-thread call
hashes it (xxh3 + the running sha256, in a private `ManifestBuilder`); back on the trio thread
its hash joins the public manifest and `Scheduler.seeder_progress` lets peers fetch it. So
peers start long before the blob is complete, the event loop never hashes, and only the trio
thread touches the scheduler, the store's bookkeeping and the public manifest.

Cut-through: the next `STREAM_AHEAD` pieces after the published prefix may be served while
they arrive (`Task.stream_piece`, when the scheduler offers them: to a lone peer only): the
bytes go out as they land in the file, all but the last, which waits until the piece is
hashed and published, so that the peer, which checks the piece once its hash reaches it,
finds it in the reply to the announce it sends on the last byte. Nothing unverified is kept
as held: a peer checks a streamed piece against the manifest before it writes or serves it.

Errors (`SeedError`, the one tree of this boundary) decide retries at one place, `_fetch`:

* `UpstreamUnavailable` -- connection errors, timeouts, 5xx, 408, 429, a body cut short:
  retried with capped exponential backoff up to ``fetch.retries`` times. A retry resumes at
  the first piece not yet hashed (``Range: bytes=N-``; a 200 answer is skipped up to N).
* `UpstreamRefused` -- any other non-2xx (401/403: the forwarded credentials; 404: no such
  blob): the task fails at once.
* `BlobMismatch` -- Content-Length or body length differs from the registered size, or the
  sha256 differs from the digest: the task fails at once and its partial file is discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import trio

from p2pd import offload
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import ManifestBuilder, PieceManifest
from p2pd.core.scheduler import Scheduler, TaskState
from p2pd.http.server import FileRegion, ResponseAborted
from p2pd.peers import COALESCE_BELOW, COALESCE_DELAY, STREAM_AHEAD, set_lowat
from p2pd.store import BlobStore, PartialBlob, StorageError
from supernode.config import FetchConfig

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUSES = frozenset({408, 429})
# Network chunks the registry reader may queue ahead of hashing (64 KiB each from httpcore).
READ_AHEAD_CHUNKS = 128
# Bytes queued on the registry socket before a read wakes up (`_BodyLowat`).
UPSTREAM_LOWAT = 64 * 1024
# The longest a read waits for the mark before it takes what is there (see `_read_ahead`).
UPSTREAM_LOWAT_WAIT = 0.1


class SeedError(Exception):
    """Why a blob could not be seeded; the text becomes the task's failure reason."""

    retryable = False


class UpstreamUnavailable(SeedError):
    """The registry could not be reached or failed transiently; worth another attempt."""

    retryable = True


class UpstreamRefused(SeedError):
    """The registry refused the request (4xx): retrying with the same credentials won't help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def auth(self) -> bool:
        """The forwarded credentials were refused (other credentials might work)."""
        return self.status in (401, 403)


class BlobMismatch(SeedError):
    """The bytes are not the registered blob: wrong size or wrong sha256."""


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """Where the first registrant said the blob lives, and its credentials for it."""

    upstream: str  # normalised allowlist entry, no trailing slash
    repository: str
    authorization: str | None

    def blob_url(self, digest: Digest) -> str:
        return f"{self.upstream}/v2/{self.repository}/blobs/{digest}"


class Task:
    """One blob as the supernode sees it; the scheduler holds its swarm state."""

    __slots__ = (
        "_grew",
        "digest",
        "done",
        "failure",
        "finished_at",
        "layout",
        "manifest",
        "partial",
        "source",
        "streamed",
    )

    def __init__(self, digest: Digest, layout: PieceLayout, source: Source) -> None:
        self.digest = digest
        self.layout = layout
        self.source = source
        # What peers are told: grows only on the trio thread, after the piece is on disk.
        self.manifest = PieceManifest(digest, layout)
        self.partial: PartialBlob | None = None  # while fetching: the file pieces are served from
        self.failure: SeedError | None = None
        self.finished_at: float | None = None  # trio time of READY or FAILED
        self.done = trio.Event()
        self.streamed = 0  # bytes of the blob in the partial file, from its start
        self._grew = trio.Event()

    def grew(self, streamed: int) -> None:
        """`streamed` bytes are in the file now, or a piece was published: wake streams."""
        self.streamed = streamed
        self._grew.set()
        self._grew = trio.Event()

    async def stream_piece(self, index: int, fd: int) -> AsyncGenerator[FileRegion, None]:
        """Piece `index` from `fd` (the caller's, closed by it) as its bytes arrive: all but
        the last until the piece is published. Raises `ResponseAborted` if the fetch fails
        first (the peer sees a short body)."""
        offset, length = self.layout.span(index)
        sent, end = offset, offset + length
        while sent < end:
            if index < self.manifest.known:
                ready = end
            elif self.partial is None or self.done.is_set():
                raise ResponseAborted(f"fetch of {self.digest} ended before piece {index}")
            else:
                ready = min(self.streamed, end - 1)
            if ready > sent:
                yield FileRegion(fd, sent, ready - sent)
                sent = ready
            else:
                await self._grew.wait()


class Seeder:
    """Runs tasks to completion against one upstream client and one store."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        store: BlobStore,
        scheduler: Scheduler,
        fetch: FetchConfig,
        reserve: Callable[[Digest, int], None],
    ) -> None:
        self.client = client
        self.store = store
        self.scheduler = scheduler
        self.fetch = fetch
        # Makes room under the quota for a new partial file (raises StorageFull); the tracker
        # owns it because it knows which blobs are in use.
        self._reserve = reserve

    async def run(self, task: Task) -> None:
        """Seed `task` to READY or FAILED. Never raises, except on cancellation."""
        digest = task.digest
        started = trio.current_time()
        try:
            origin = "the store"
            if not await self._from_store(task):
                origin = task.source.upstream
                await self._fetch(task)
            log.info(
                "%s ready from %s: %d bytes",
                digest,
                origin,
                task.layout.total_size,
                extra=_fetch_fields(task, started, "store" if origin == "the store" else None),
            )
        except SeedError as exc:
            self._fail(task, exc, started)
        except StorageError as exc:
            self._fail(task, SeedError(f"storage: {exc}"), started)
        except Exception as exc:
            # A bug here must cost this task, not the daemon.
            log.exception("seeding %s crashed", digest)
            self._fail(task, SeedError(f"internal error: {type(exc).__name__}"), started)
        finally:
            if task.partial is not None:
                # Failed or cancelled: a fresh fetch starts from scratch, so nothing to keep.
                # Pieces being served stay readable through their own duplicated fds.
                task.partial.close()
                task.partial.discard()
                task.partial = None
            task.done.set()

    def _fail(self, task: Task, exc: SeedError, started: float) -> None:
        log.warning("%s failed: %s", task.digest, exc, extra=_fetch_fields(task, started, exc))
        task.failure = exc
        task.finished_at = trio.current_time()
        if self.scheduler.task_state(task.digest) is TaskState.FETCHING:
            self.scheduler.seeder_done(task.digest, ok=False)

    def _ready(self, task: Task) -> None:
        task.manifest.seal()
        # The registrant's credentials were needed for the fetch only; don't keep them.
        task.source = dataclasses.replace(task.source, authorization=None)
        task.finished_at = trio.current_time()
        self.scheduler.seeder_done(task.digest, ok=True)

    # -- from the store ---------------------------------------------------------------------

    async def _from_store(self, task: Task) -> bool:
        """READY from a complete blob on disk; False (and the file removed if bad) otherwise."""
        digest, layout = task.digest, task.layout
        if self.store.size_of(digest) != layout.total_size:
            return False
        builder = ManifestBuilder(PieceManifest(digest, layout))
        buf = memoryview(bytearray(layout.piece_size if layout.count else 0))
        with self.store.lease(digest):
            fd = self.store.open_complete(digest)
            try:
                for index in range(layout.count):
                    offset, length = layout.span(index)
                    # One thread call per piece, so that shutdown is never stuck behind a
                    # whole-blob hash.
                    await offload.run_sync(_hash_from_file, builder, fd, offset, buf[:length])
            finally:
                os.close(fd)
        if not builder.finish():
            log.warning("%s in the store no longer matches its digest; fetching it again", digest)
            self.store.remove(digest)
            return False
        task.manifest.extend(0, builder.manifest.hashes)
        self._ready(task)
        return True

    # -- from the upstream ------------------------------------------------------------------

    async def _fetch(self, task: Task) -> None:
        digest, layout = task.digest, task.layout
        self._reserve(digest, layout.total_size)
        partial = self.store.open_partial(digest, layout)
        if not partial.have.is_empty():
            # Left by an earlier run. Its sha256 prefix state is lost and its .meta may claim
            # pieces that never reached the disk, so start over.
            partial.close()
            partial.discard()
            partial = self.store.open_partial(digest, layout)
        task.partial = partial
        task.grew(0)
        self.scheduler.seeder_progress(digest, 0, trio.current_time(), streaming=STREAM_AHEAD)
        builder = ManifestBuilder(PieceManifest(digest, layout))
        buf = bytearray(layout.piece_size if layout.count else 0)
        attempt = 0
        while True:
            try:
                await self._stream(task, builder, buf)
                break
            except SeedError as exc:
                if not exc.retryable or attempt >= self.fetch.retries:
                    raise
                attempt += 1
                delay = self.fetch.delay(attempt)
                log.warning(
                    "%s: %s; retry %d/%d in %.2fs at byte %d",
                    digest,
                    exc,
                    attempt,
                    self.fetch.retries,
                    delay,
                    builder.received,
                )
                await trio.sleep(delay)
        if not builder.finish():
            raise BlobMismatch("sha256 mismatch: the upstream bytes do not hash to the digest")
        # fsync may take a while for a big file; the rename and the store's books stay here.
        await offload.run_sync(os.fsync, partial.fd)
        partial.commit()
        partial.close()
        task.partial = None
        self._ready(task)

    async def _stream(self, task: Task, builder: ManifestBuilder, buf: bytearray) -> None:
        """One GET from the first unhashed byte to the end, feeding whole pieces."""
        layout, url = task.layout, task.source.blob_url(task.digest)
        start = builder.received
        headers = {"Accept-Encoding": "identity"}  # the digest is over the stored bytes
        if task.source.authorization is not None:
            headers["Authorization"] = task.source.authorization
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            async with self.client.stream("GET", url, headers=headers) as response:
                skip = _check_response(response, url, start, layout.total_size)
                lowat = _BodyLowat.of(response)
                # aclosing: leaving the loop early (a mismatch) must close the generator now,
                # not at garbage collection.
                raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # typed loosely
                try:
                    async with contextlib.aclosing(raw) as body:
                        fill = await self._read_ahead(task, builder, buf, body, skip, lowat)
                finally:
                    if lowat is not None:
                        lowat.reset()  # the connection goes back to the pool
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        except httpx.RequestError as exc:  # too many redirects, undecodable body, ...
            raise UpstreamRefused(0, f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if builder.received < layout.total_size:
            raise UpstreamUnavailable(
                f"GET {url}: body ended after {builder.received + fill} of "
                f"{layout.total_size} bytes"
            )

    async def _read_ahead(
        self,
        task: Task,
        builder: ManifestBuilder,
        buf: bytearray,
        body: AsyncIterator[bytes],
        skip: int,
        lowat: _BodyLowat | None = None,
    ) -> int:
        """`_consume` the body while a second task keeps reading it.

        Hashing and writing a piece takes a worker thread a few milliseconds, longer on a
        loaded host, and the registry connection should not sit idle meanwhile. The reader
        queues at most `READ_AHEAD_CHUNKS` network chunks (httpcore reads 64 KiB at a time),
        so memory stays bounded and a slow disk still slows the registry down through TCP.
        (The slow registry download seen in the 8-host namespace benchmark turned out to be
        CPU: the supernode got 10-25 % of a core there; see the issue 5 notes.)
        """
        send, receive = trio.open_memory_channel[bytes](READ_AHEAD_CHUNKS)
        read_error: BaseException | None = None
        failure: BaseException | None = None
        fill = 0

        async def read() -> None:
            nonlocal read_error
            async with send:
                try:
                    async for raw in body:
                        if lowat is not None:
                            lowat.received(len(raw))
                        await send.send(raw)
                        if lowat is not None:
                            if lowat.remaining and len(raw) < UPSTREAM_LOWAT:
                                # trio tries recv() before it waits, and a non-blocking recv
                                # returns whatever is queued: the mark counts only once the
                                # queue is empty. Wait for it here (profiled in the namespace
                                # fleet: ~3.2 KB per read without this), bounded, so a slow
                                # or stalled registry is left to the read timeout as before.
                                with trio.move_on_after(UPSTREAM_LOWAT_WAIT):
                                    await trio.lowlevel.wait_readable(lowat.sock)
                        elif len(raw) < COALESCE_BELOW:
                            # let more bytes gather: behind a 100 Mbit/s link each read would
                            # bring a packet or two, and httpx/h11's per-read cost made the
                            # registry download most of the supernode's CPU
                            await trio.sleep(COALESCE_DELAY)
                except (httpx.HTTPError, trio.BrokenResourceError) as exc:
                    # Surfaces after the consumer has used every byte that did arrive, so a
                    # retry resumes after the last whole piece, as before.
                    read_error = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                async with receive:
                    fill = await self._consume(task, builder, buf, receive, skip)
            except Exception as exc:  # re-raised below, not wrapped in an exception group
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if read_error is not None:
            raise read_error
        return fill

    async def _consume(
        self,
        task: Task,
        builder: ManifestBuilder,
        buf: bytearray,
        body: AsyncIterator[bytes],
        skip: int,
    ) -> int:
        """Cut the body into pieces in `buf`; return the bytes of an unfinished last piece."""
        layout, view = task.layout, memoryview(buf)
        index, fill = builder.manifest.known, 0
        partial = task.partial
        assert partial is not None
        async for raw in body:
            chunk = memoryview(raw)
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if chunk and index < layout.count:
                # into the file at once, for the peers it is streamed to (one pwrite into the
                # page cache: tens of microseconds for a network chunk)
                at = layout.offset(index) + fill
                end = min(at + len(chunk), layout.total_size)
                partial.write_at(at, chunk[: end - at])
                task.grew(end)
            while chunk:
                if index == layout.count:
                    raise BlobMismatch(
                        f"size mismatch: upstream sent more than the registered "
                        f"{layout.total_size} bytes"
                    )
                length = layout.length(index)
                n = min(length - fill, len(chunk))
                view[fill : fill + n] = chunk[:n]
                fill, chunk = fill + n, chunk[n:]
                if fill == length:
                    await self._absorb(task, builder, index, view[:length])
                    index, fill = index + 1, 0
        return fill

    async def _absorb(
        self, task: Task, builder: ManifestBuilder, index: int, data: memoryview
    ) -> None:
        """Hash piece `index` (already in the file), then tell peers it exists."""
        partial = task.partial
        assert partial is not None

        await offload.run_sync(builder.feed, data)  # the bytes are in the file already
        partial.have.add(index)
        task.manifest.extend(index, builder.manifest.hash_of(index))
        self.scheduler.seeder_progress(
            task.digest, task.manifest.known, trio.current_time(), streaming=STREAM_AHEAD
        )
        task.grew(task.streamed)  # its last bytes may go now


def _fetch_fields(task: Task, started: float, outcome: SeedError | str | None) -> dict[str, Any]:
    """The structured fields of a task's one log line (`p2pd.logs` renders them as JSON):
    the registry's host only -- never the credentials, nor a redirect's signed URL."""
    failed = isinstance(outcome, SeedError)
    return {
        "fields": {
            "event": "fetch",
            "digest": str(task.digest),
            "state": "failed" if failed else "ready",
            "bytes": task.layout.total_size,
            "seconds": round(trio.current_time() - started, 3),
            "source": "store" if outcome == "store" else "upstream",
            "upstream": urlsplit(task.source.upstream).netloc,
            "repository": task.source.repository,
            "error": str(outcome) if failed else None,
        }
    }


def _hash_from_file(builder: ManifestBuilder, fd: int, offset: int, buf: memoryview) -> None:
    """Read `len(buf)` bytes at `offset` into `buf` and feed them (runs in a worker thread)."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise StorageError(f"blob file ended at byte {offset + got}")
        got += n
    builder.feed(buf)


class _BodyLowat:
    """Fewer, larger reads of a registry body: the socket's SO_RCVLOWAT keeps each read
    waiting until `UPSTREAM_LOWAT` bytes are queued (httpcore reads at most 64 KiB), or the
    rest of the body when less is due. Behind a 100 Mbit/s link each read would otherwise
    bring a packet or two, and httpx/h11's per-read cost made the registry download most of
    the supernode's CPU. The price: a registry sending less than `UPSTREAM_LOWAT` within
    ``fetch.read_timeout`` counts as stalled."""

    def __init__(self, sock: trio.socket.SocketType, remaining: int) -> None:
        self.sock = sock
        self.remaining = remaining
        self.current = 1
        self._want(min(UPSTREAM_LOWAT, remaining))

    @classmethod
    def of(cls, response: httpx.Response) -> _BodyLowat | None:
        """For a response with a Content-Length read from a plain socket of ours; else None.
        Not over TLS: the mark counts ciphertext on the socket while the body counts
        plaintext, and a TLS layer holding part of a record would leave the last read
        waiting for bytes that never come (a kept-alive connection sends no FIN) until the
        read timeout."""
        declared = response.headers.get("content-length", "")
        stream = response.extensions.get("network_stream")
        if not declared.isdigit() or int(declared) == 0 or stream is None:
            return None
        if stream.get_extra_info("ssl_object") is not None:
            return None
        try:
            sock = stream.get_extra_info("socket")
        except AssertionError:  # httpcore's trio backend over something else than a socket
            return None
        if not isinstance(sock, trio.socket.SocketType):
            return None
        return cls(sock, int(declared))

    def received(self, nbytes: int) -> None:
        """`nbytes` of the body came out of the HTTP parser: the next read wants the rest."""
        self.remaining -= nbytes
        if self.remaining > 0:
            self._want(min(UPSTREAM_LOWAT, self.remaining))

    def reset(self) -> None:
        with contextlib.suppress(OSError):  # already closed
            self._want(1)

    def _want(self, nbytes: int) -> None:
        self.current = set_lowat(self.sock, nbytes, self.current)


def _check_response(response: httpx.Response, url: str, start: int, size: int) -> int:
    """Raise the `SeedError` an answer deserves; else how many leading body bytes to skip."""
    status = response.status_code
    if status >= 500 or status in _RETRY_STATUSES:
        raise UpstreamUnavailable(f"GET {url}: upstream answered {status} {response.reason_phrase}")
    if status not in (200, 206):
        hint = {
            401: " (the forwarded credentials were not accepted)",
            403: " (the forwarded credentials may not read this repository)",
            404: " (no such blob in this repository)",
        }.get(status, "")
        raise UpstreamRefused(
            status, f"GET {url}: upstream answered {status} {response.reason_phrase}{hint}"
        )
    declared = response.headers.get("content-length")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
        if not start or match is None:
            raise UpstreamRefused(status, f"GET {url}: unexpected partial content")
        first, last, total = match.groups()
        if int(first) != start or int(last) != size - 1 or total not in ("*", str(size)):
            raise BlobMismatch(
                f"size mismatch: upstream sent range {first}-{last}/{total} for a resume at "
                f"{start} of a {size}-byte blob"
            )
        expected, skip = size - start, 0
    else:
        expected, skip = size, start  # a resume the server did not honour: skip the prefix
    if declared is not None and declared != str(expected):
        raise BlobMismatch(
            f"size mismatch: upstream Content-Length {declared}, expected {expected} "
            f"(registered size {size})"
        )
    return skip
