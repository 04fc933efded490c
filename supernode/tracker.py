"""The supernode's control plane: the task table, the scheduler, and the control calls.

`Tracker` turns decoded control messages (`p2pd.wire`) into scheduler events and builds the
`wire.Assignment` replies; it starts a `Seeder` for every new task and expires silent peers.

Rules:

* Only the trio thread touches the `Scheduler`, the `Task` records and their public manifests.
  Every public method here is synchronous, so each control call is atomic with respect to the
  others and to the seeders' progress reports.
* ``now`` is always `trio.current_time()` (tests drive it with trio's MockClock).
* A refusal is an `ApiError` (HTTP status, wire error code, message), raised where the problem
  is found; the server renders it (`server._refusal` is the one place that maps exceptions to
  statuses). A `SchedulerError` that slips past the checks here becomes 400 ``bad_request``.
* Seeders run in the tracker's nursery (`run`), so a shutdown cancels them.

Task table life-cycle (the scheduler's FETCHING -> READY | FAILED, plus when a record goes)::

    (absent) --first register--> FETCHING (seeder started)
    READY    --its blob evicted from the store (quota) while peers hold it--> READY, seeded
                by the peers alone (the seeder offers nothing)
    READY    --its blob evicted or found missing, no peer left to cover it--> (absent)
    FAILED   --register, failed_task_ttl after the failure--> (absent) -> FETCHING again
    FAILED   --register with other credentials, after a 401/403 upstream--> FETCHING again
    FAILED   --failed_task_ttl passed, when another task starts--> (absent)

Removing a task drops its peers; their next call gets 404 ``unknown_task`` or ``unknown_peer``
and they register again, which is the p2pd protocol's recovery path anyway.

Quota: before a fetch the tracker asks the store for room while it holds a lease on every blob
in use -- being fetched, or with a peer still downloading it -- so eviction only takes blobs
nobody is downloading. Peers that merely seed a blob do not pin it: after a rollout they seed
for minutes, and pinning their blobs left the supernode without room for the next image (every
host then went to the registry). An evicted blob's task stays, served by its peers; a newcomer
that finds pieces no peer holds any more restarts the fetch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable

import httpx
import trio

from p2pd import wire
from p2pd.core.digest import Digest
from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.core.scheduler import Assignment, Scheduler, SchedulerError, TaskState
from p2pd.http.server import FileRegion
from p2pd.store import BlobStore, StorageError, StorageFull
from supernode.config import SupernodeConfig
from supernode.seeder import Seeder, Source, Task, UpstreamRefused

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refused request: HTTP `status`, wire error `code`, human `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


class Tracker:
    """`layout_rule` cuts a new task's blob (`PieceLayout.for_size` unless a test or a
    benchmark injects another): the supernode is the one authority on a blob's layout, its
    peers take it from the Assignment whatever their own version's rule."""

    def __init__(
        self,
        config: SupernodeConfig,
        store: BlobStore,
        client: httpx.AsyncClient,
        *,
        layout_rule: Callable[[int], PieceLayout] = PieceLayout.for_size,
    ) -> None:
        self.config = config
        self.layout_rule = layout_rule
        self.store = store
        self.scheduler = Scheduler(
            random.Random(config.seed),
            config.scheduler,
            seeder_id=config.seeder_id,
            seeder_zone=config.zone,
        )
        # The seeder's address in assignments; set by the server once its port is bound.
        self.advertise = config.advertise or ""
        self._tasks: dict[Digest, Task] = {}
        self._evicted: set[Digest] = set()  # READY tasks whose blob left the store; peers seed
        self._seeder = Seeder(client, store, self.scheduler, config.fetch, self._reserve)
        self._nursery: trio.Nursery | None = None
        self._peer_joined = trio.Event()

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the seeders and expire silent peers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._expire_loop()
            finally:
                self._nursery = None

    async def _expire_loop(self) -> None:
        while True:
            deadline = self.scheduler.next_deadline()
            if deadline is None:
                # Nobody can expire; a register is the only thing that creates a deadline.
                self._peer_joined = trio.Event()
                await self._peer_joined.wait()
                continue
            # `expire` drops peers strictly past their deadline: wake just after it.
            await trio.sleep_until(math.nextafter(deadline, math.inf))
            gone = self.scheduler.expire(trio.current_time())
            for digest, peer_id in gone:
                log.info("peer %s of %s expired (silent too long)", peer_id, digest)

    # -- introspection ----------------------------------------------------------------------

    def task(self, digest: Digest) -> Task | None:
        return self._tasks.get(digest)

    def status(self) -> dict[str, object]:
        """What the status page and `p2pd preheat` show: every task with its progress."""
        tasks = []
        for digest, task in self._tasks.items():
            state = (
                self.scheduler.task_state(digest).value
                if self.scheduler.has_task(digest)
                else "gone"
            )
            peers = self.scheduler.peers(digest) if self.scheduler.has_task(digest) else []
            complete = sum(1 for p in peers if self.scheduler.peer_pieces(digest, p).is_full())
            tasks.append(
                {
                    "digest": str(digest),
                    "repository": task.source.repository,
                    "size": task.layout.total_size,
                    "pieces": task.layout.count,
                    "piece_size": task.layout.piece_size,
                    "seeded": task.manifest.known,
                    "state": state,
                    "peers": len(peers),
                    "peers_complete": complete,
                    "failure": str(task.failure) if task.failure else None,
                    # READY, but the blob left this supernode's store: its peers seed it
                    "evicted": digest in self._evicted,
                }
            )
        return {"seeder": self.advertise, "tasks": tasks, "scheduler": self.scheduler.stats()}

    # -- control calls ----------------------------------------------------------------------

    def call(self, msg: wire.Message) -> wire.Message:
        """Answer one decoded control message (register, announce, report, leave)."""
        if isinstance(msg, wire.Register):
            return self.register(msg)
        if isinstance(msg, wire.Announce):
            return self.announce(msg)
        if isinstance(msg, wire.AnnounceBatch):
            return self.announce_batch(msg)
        if isinstance(msg, wire.Report):
            return self.report(msg)
        if isinstance(msg, wire.Leave):
            self.leave(msg)
            return wire.Ack()
        raise _bad_request(f"not a request: {msg.TYPE}")

    def register(self, msg: wire.Register) -> wire.Assignment:
        upstream = self.config.upstream_allowed(msg.upstream)
        if upstream is None:
            raise ApiError(
                403,
                "upstream_not_allowed",
                f"upstream {msg.upstream!r} is not on this supernode's allowlist",
            )
        digest, now = msg.digest, trio.current_time()
        task = self._tasks.get(digest)
        if task is not None and self._should_restart(task, msg, now):
            self._forget(digest, "restarted by a new register")
            task = None
        if task is not None:
            layout = task.layout
            if layout.total_size != msg.size:
                raise _bad_request(
                    f"size mismatch: {digest} is registered as {layout.total_size} bytes, "
                    f"not {msg.size}"
                )
        else:
            try:
                layout = self.layout_rule(msg.size)
            except LayoutError as exc:
                raise _bad_request(str(exc)) from None
        if msg.have is not None and msg.have.length != layout.count:
            raise _bad_request(
                f"have is a bitfield of {msg.have.length} pieces, the blob has {layout.count}"
            )
        if task is None:
            source = Source(upstream, msg.repository, msg.authorization)
            task = self._start(digest, layout, source, now)
        try:
            assignment = self.scheduler.register(
                digest,
                msg.peer_id,
                msg.address,
                msg.zone,
                now,
                upload_slots=msg.upload_slots,
                have=msg.have,
            )
        except SchedulerError as exc:  # e.g. the seeder's reserved peer id
            raise _bad_request(str(exc)) from None
        self._peer_joined.set()
        return self._reply(task, assignment, 0)

    def announce(self, msg: wire.Announce) -> wire.Assignment:
        task = self._task(msg.digest)
        count = task.layout.count
        for index in msg.pieces:
            if index >= count:
                raise _bad_request(f"piece index {index} out of range 0..{count - 1}")
        if msg.manifest_known > count:
            raise _bad_request(f"manifest_known {msg.manifest_known} past the {count} pieces")
        try:
            assignment = self.scheduler.announce(
                msg.digest, msg.peer_id, msg.pieces, trio.current_time(), msg.want_parents
            )
        except SchedulerError as exc:
            raise self._peer_error(task, msg.peer_id, exc) from None
        return self._reply(task, assignment, min(msg.manifest_known, task.manifest.known))

    def announce_batch(
        self, msg: wire.AnnounceBatch, limit: int = wire.MAX_MESSAGE_SIZE
    ) -> wire.BatchReply:
        """Each announce of the batch as if it came alone, in order; a refused one (unknown
        task or peer, bad request) becomes an Error item and the others go on.

        The reply is kept under `limit` (the message size limit): once the items' sizes (counted
        generously, see `_size_bound`) would pass it, an item goes without its new manifest
        hashes (the peer asks for them again with its next announce), and if even that does
        not fit, as an Error ``deferred`` (the announce was taken; the peer sends it again
        alone). Only blobs of tens of thousands of pieces with many parents come near it.
        """
        # the batch's own map and array headers, and room for every item to be deferred
        room = limit - 64 - 128 * len(msg.items)
        items: list[wire.Assignment | wire.Error] = []
        for item in msg.items:
            try:
                reply = self.announce(item)
            except ApiError as exc:
                items.append(wire.Error.safe(exc.code, exc.message))
                room -= 64 + len(exc.message.encode())
                continue
            size = _size_bound(reply)
            if size > room and reply.hashes:
                reply = dataclasses.replace(reply, hashes=b"")
                size = _size_bound(reply)
            if size > room:
                items.append(wire.Error("deferred", "no room in the batch's reply: send it alone"))
                continue
            items.append(reply)
            room -= size
        return wire.BatchReply(tuple(items))

    def report(self, msg: wire.Report) -> wire.Assignment:
        task = self._task(msg.digest)
        if msg.index >= task.layout.count:
            raise _bad_request(f"piece index {msg.index} out of range 0..{task.layout.count - 1}")
        unreachable = msg.reason == wire.REPORT_UNREACHABLE
        now = trio.current_time()
        try:
            if unreachable:
                assignment = self.scheduler.report_unreachable(
                    msg.digest, msg.peer_id, msg.parent_id, now
                )
            else:
                assignment = self.scheduler.report_bad_piece(
                    msg.digest, msg.peer_id, msg.parent_id, msg.index, now
                )
        except SchedulerError as exc:
            raise self._peer_error(task, msg.peer_id, exc) from None
        log.warning(
            "peer %s reports %s %d of %s from %s: %s",
            msg.peer_id,
            "unreachable parent for piece" if unreachable else "bad piece",
            msg.index,
            msg.digest,
            msg.parent_id,
            msg.reason,
        )
        # A report carries no manifest position: new hashes come with the next announce.
        return self._reply(task, assignment, task.manifest.known)

    def leave(self, msg: wire.Leave) -> None:
        task = self._task(msg.digest)
        try:
            self.scheduler.leave(msg.digest, msg.peer_id)
        except SchedulerError as exc:
            raise self._peer_error(task, msg.peer_id, exc) from None

    # -- pieces -----------------------------------------------------------------------------

    def open_piece(
        self, digest: Digest, index: int, piece_size: int | None = None
    ) -> FileRegion | AsyncIterator[FileRegion]:
        """The region of piece `index` to send; the fd and lease go with its ``on_done``. A
        piece still arriving from the registry (`Task.streamable`) comes as an iterator of
        regions instead, which closes its fd when it ends. `piece_size`: the one the
        requester cuts the blob by (p2pd.peers.PIECE_SIZE_HEADER); another than the task's
        is a 409 (a peer of an earlier task, cut otherwise, before it learns of this one)."""
        task = self._tasks.get(digest)
        if task is None:
            raise ApiError(404, "unknown_task", f"no task for {digest}")
        if piece_size is not None and piece_size != task.layout.piece_size:
            raise ApiError(
                409,
                "layout_mismatch",
                f"{digest} is cut in {task.layout.piece_size}-byte pieces here, not {piece_size}",
            )
        if not 0 <= index < task.layout.count:
            raise _bad_request(f"piece index {index} out of range 0..{task.layout.count - 1}")
        state = self.scheduler.task_state(digest)
        streaming = state is TaskState.FETCHING and index >= task.manifest.known
        if streaming and self.scheduler.seeder_streams(digest, index) and task.partial is not None:
            return _StreamedPiece(task, index, os.dup(task.partial.fd))
        if state is TaskState.FAILED or index >= task.manifest.known or digest in self._evicted:
            raise ApiError(404, "piece_not_held", f"piece {index} of {digest} is not held")
        offset, length = task.layout.span(index)
        # The fd is our own (a dup, or a fresh open under a lease), so a commit, a failure's
        # discard or an eviction while the piece is being sent cannot pull it away.
        cleanup = contextlib.ExitStack()
        try:
            if task.partial is not None:
                fd = os.dup(task.partial.fd)
            else:
                cleanup.enter_context(self.store.lease(digest))
                fd = self.store.open_complete(digest)
            cleanup.callback(os.close, fd)
        except (OSError, StorageError) as exc:
            cleanup.close()
            log.warning("cannot open %s for piece %d: %s", digest, index, exc)
            if state is TaskState.READY and not self.store.has(digest):
                self._forget(digest, "its blob is gone from the store")
            raise ApiError(
                404, "piece_not_held", f"piece {index} of {digest} is unavailable"
            ) from None
        return FileRegion(fd, offset, length, on_done=cleanup.close)

    # -- internals --------------------------------------------------------------------------

    def _task(self, digest: Digest) -> Task:
        task = self._tasks.get(digest)
        if task is None:
            raise ApiError(404, "unknown_task", f"no task for {digest}: register first")
        return task

    def _peer_error(self, task: Task, peer_id: str, exc: SchedulerError) -> ApiError:
        if peer_id not in self.scheduler.peers(task.digest):
            return ApiError(
                404, "unknown_peer", f"peer {peer_id!r} is not registered for {task.digest}"
            )
        return _bad_request(str(exc))

    def _should_restart(self, task: Task, msg: wire.Register, now: float) -> bool:
        state = self.scheduler.task_state(task.digest)
        if state is TaskState.READY:
            if task.digest in self._evicted:
                # the peers seed it alone: fetch again once they cannot cover it (a peer that
                # registers again has lost what it had, whatever its old record says)
                return not self.scheduler.coverage(task.digest, msg.peer_id).is_full()
            return not self.store.has(task.digest)
        if state is not TaskState.FAILED or task.finished_at is None:
            return False
        if now - task.finished_at >= self.config.failed_task_ttl:
            return True
        # Refused credentials are the registrant's, not the blob's: other ones may work.
        failure = task.failure
        return (
            isinstance(failure, UpstreamRefused)
            and failure.auth
            and msg.authorization != task.source.authorization
        )

    def _start(self, digest: Digest, layout: PieceLayout, source: Source, now: float) -> Task:
        if self._nursery is None:
            raise ApiError(503, "unavailable", "the supernode is not running")
        self._sweep_failed(now)
        self.scheduler.add_task(digest, layout, now)
        task = Task(digest, layout, source)
        self._tasks[digest] = task
        log.info(
            "new task %s: %d bytes from %s", digest, layout.total_size, source.blob_url(digest)
        )
        self._nursery.start_soon(self._seeder.run, task, name=f"seed {digest}")
        return task

    def _forget(self, digest: Digest, why: str) -> None:
        self._evicted.discard(digest)
        del self._tasks[digest]
        self.scheduler.remove_task(digest)
        log.info("forgot task %s: %s", digest, why)

    def _sweep_failed(self, now: float) -> None:
        """Drop FAILED tasks past their TTL, so failures do not accumulate forever."""
        ttl = self.config.failed_task_ttl
        stale = [
            d
            for d, t in self._tasks.items()
            if t.failure is not None and t.finished_at is not None and now - t.finished_at >= ttl
        ]
        for digest in stale:
            self._forget(digest, "failed task expired")

    def _reserve(self, digest: Digest, size: int) -> None:
        """Room for a new partial file of `size` bytes (under the quota and on the disk);
        evicts only blobs nobody uses."""
        with contextlib.ExitStack() as in_use:
            for other, task in self._tasks.items():
                busy = not task.done.is_set() or self.scheduler.downloading(other)
                if other != digest and busy and other not in self._evicted:
                    in_use.enter_context(self.store.lease(other))
            try:
                evicted = self.store.reserve(size)
            except StorageFull as exc:
                self._evicted_from_store(exc.evicted)
                raise
        self._evicted_from_store(evicted)

    def _evicted_from_store(self, evicted: Iterable[Digest]) -> None:
        """Account for blobs the store evicted: peers seed on, or the task goes."""
        for gone in evicted:
            if gone not in self._tasks:
                continue
            if (
                self.scheduler.task_state(gone) is TaskState.READY
                and self.scheduler.coverage(gone).is_full()
            ):
                self.scheduler.seeder_evicted(gone)
                self._evicted.add(gone)
                log.info("evicted %s from the store (quota); its peers seed it on", gone)
            else:
                self._forget(gone, "evicted from the store (quota)")

    def _reply(self, task: Task, assignment: Assignment, start: int) -> wire.Assignment:
        state = assignment.state
        # A failed task's hashes may describe bad bytes: peers fall back to the registry.
        hashes = b"" if state is TaskState.FAILED else task.manifest.hashes_from(start)
        # the scheduler's peers all came in checked Registers, and the seeder's address is our
        # own: no need to check the parents again (ParentInfo.trusted), nor the assignment
        # built from our own state (Assignment.trusted). Spelled out, not a call per parent:
        # a reply has up to max_parents of them, and this is every control call's reply.
        seeder_id, advertise, trusted = self.scheduler.seeder_id, self.advertise, _TRUSTED_PARENT
        parents = [
            trusted(p.peer_id, advertise if p.peer_id == seeder_id else p.address, p.zone, p.pieces)
            for p in assignment.parents
        ]
        return wire.Assignment.trusted(
            digest=task.digest,
            state=state.value,
            size=task.layout.total_size,
            piece_size=task.layout.piece_size,
            manifest_start=start,
            hashes=hashes,
            sealed=state is TaskState.READY,
            parents=tuple(parents),
            pace_ms=min(wire.MAX_PACE_MS, math.ceil(assignment.pace * 1000)),
        )


_TRUSTED_PARENT = wire.ParentInfo.trusted


class _StreamedPiece:
    """`Task.stream_piece` from a private fd, closed by `aclose` -- which the server calls
    also for a body it never started (an async generator's ``finally`` would not run then)."""

    def __init__(self, task: Task, index: int, fd: int) -> None:
        self._fd = fd
        self._regions = task.stream_piece(index, fd)

    def __aiter__(self) -> _StreamedPiece:
        return self

    async def __anext__(self) -> FileRegion:
        return await anext(self._regions)

    async def aclose(self) -> None:
        if self._fd >= 0:
            await self._regions.aclose()
            os.close(self._fd)
            self._fd = -1


def _size_bound(reply: wire.Assignment) -> int:
    """At least the bytes `reply` takes in a batch: a peer id and zone are at most 64 bytes,
    an address 259, a digest 71, and the keys and msgpack headers are counted generously."""
    parents = sum(600 + (p.pieces.length + 7) // 8 for p in reply.parents)
    return 400 + len(reply.hashes) + parents
