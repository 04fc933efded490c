"""The swarm filler: download a blob's pieces from parents the supernode assigns.

One `Swarm.fill` call runs one blob's download on this host. A single task owns the sans-IO
`PiecePicker` and the `PieceManifest`; piece transfers run as child tasks and report back over
a memory channel, so every decision happens in one place, in event order:

    register ──▶ assignment (layout, manifest hashes, parents)
    loop: pick ──▶ fetch tasks ──▶ result ──▶ verify against the manifest ──▶ write ──▶ picker
          every `announce_interval` (sooner when idle): announce the batch ──▶ new assignment

Rules:
- A piece is written only after its xxh3-128 matches the manifest; a mismatch is reported to
  the supernode (the parent is blamed) and the piece is fetched again elsewhere.
- Requests the picker cancels (endgame losers, dropped parents, timeouts) have their transfer
  tasks cancelled; a result that arrives for a request no longer on the books is dropped.
- No progress for `stall_timeout` (or no supernode at all, or a failed task) raises
  `FillerGaveUp`, and the download falls back to the registry for what is missing.
- After the blob is complete the host keeps seeding: it heartbeats the supernode for
  `seed_time` so it stays a parent, then leaves.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import httpx
import trio

from p2pd import wire
from p2pd.blobs import BlobSource, Download, FillerGaveUp
from p2pd.core.manifest import ManifestError, PieceManifest
from p2pd.core.picker import BadParent, Cancel, PickerConfig, PiecePicker, Request
from p2pd.peers import PieceClient, PieceFetchError
from p2pd.tracker import TrackerRejected, TrackerSession, TrackerUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    peer_id: str
    advertise: str
    zone: str = ""
    upload_slots: int = 8
    announce_interval: float = 1.0
    min_announce_gap: float = 0.05
    stall_timeout: float = 15.0
    max_connect_failures: int = 2
    seed_time: float = 600.0
    picker: PickerConfig = field(default_factory=PickerConfig)


@dataclass(slots=True)
class _Result:
    request: Request
    buffer: bytearray | None
    error: PieceFetchError | None = None


class Swarm:
    """A `Filler` that gets pieces from other hosts through the supernode's assignments."""

    def __init__(
        self,
        config: SwarmConfig,
        http: httpx.AsyncClient,
        pieces: PieceClient,
        supernodes: list[str],
        nursery: trio.Nursery,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.http = http
        self.pieces = pieces
        self.supernodes = supernodes
        self.nursery = nursery  # where seeding heartbeats live after a download
        self.rng = rng or random.Random()
        self._buffers: dict[int, list[bytearray]] = {}
        self.bad_pieces = 0

    async def fill(self, download: Download, source: BlobSource) -> None:
        if not self.supernodes:
            raise FillerGaveUp("no supernode configured", fleetwide=False)
        register = wire.Register(
            digest=download.digest,
            size=download.layout.total_size,
            peer_id=self.config.peer_id,
            address=self.config.advertise,
            zone=self.config.zone,
            upload_slots=self.config.upload_slots,
            upstream=source.upstream,
            repository=source.repository,
            authorization=source.authorization,
            have=None,
        )
        session = TrackerSession(self.http, self.supernodes, register)
        try:
            assignment = await session.register(download.have)
        except (TrackerUnavailable, TrackerRejected) as exc:
            raise FillerGaveUp(f"supernode: {exc}") from exc
        await _Run(self, download, session).run(assignment)
        self.nursery.start_soon(self._seed, download, session)

    async def _seed(self, download: Download, session: TrackerSession) -> None:
        """Stay a parent for `seed_time`: heartbeat within the supernode's liveness window."""
        deadline = trio.current_time() + self.config.seed_time
        try:
            while trio.current_time() < deadline:
                await trio.sleep(min(10.0, self.config.seed_time))
                try:
                    await session.announce([], download.layout.count, download.have, False)
                except (TrackerUnavailable, TrackerRejected):
                    return
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await session.leave()

    # -- buffers: one per piece in flight, reused (fresh big buffers cost page faults) --------

    def take_buffer(self, size: int) -> bytearray:
        free = self._buffers.get(size)
        return free.pop() if free else bytearray(size)

    def give_buffer(self, buffer: bytearray) -> None:
        free = self._buffers.setdefault(len(buffer), [])
        if len(free) < 64:
            free.append(buffer)


class _Run:
    """One blob's download loop: the only code that touches its picker and manifest."""

    def __init__(self, swarm: Swarm, download: Download, session: TrackerSession) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.download = download
        self.session = session
        self.layout = download.layout
        self.manifest = PieceManifest(download.digest, download.layout)
        self.picker: PiecePicker | None = None
        self.addresses: dict[str, str] = {}
        self.live: dict[Request, trio.CancelScope] = {}
        self.completed: list[int] = []
        self.shunned: set[str] = set()  # parents that served a bad piece or are gone
        self.failures: dict[str, int] = {}  # consecutive failed transfers per parent
        self.send, self.receive = trio.open_memory_channel[_Result](math.inf)

    async def run(self, assignment: wire.Assignment) -> None:
        if assignment.layout != self.layout:
            raise FillerGaveUp(
                f"supernode's layout {assignment.size}/{assignment.piece_size} does not match "
                f"the blob's {self.layout.total_size}/{self.layout.piece_size}"
            )
        self._apply_manifest(assignment)
        # pieces on disk from before a restart are trusted only once their hash matches
        claimed = list(self.download.have)
        bad = self.download.partial.recheck(self.manifest)
        unknown = [i for i in claimed if i >= self.manifest.known]
        self.download.drop_pieces(bad + unknown)
        self.picker = PiecePicker(
            self.layout,
            random.Random(self.swarm.rng.random()),
            self.config.picker,
            have=self.download.have.copy(),
        )
        now = trio.current_time()
        self._apply(assignment, now)
        # The loop runs inside a nursery (the transfers), so a give-up inside it would come out
        # wrapped in an exception group: carry it out as a value and raise it plainly here.
        gave_up: FillerGaveUp | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._loop(nursery, now)
            except FillerGaveUp as exc:
                gave_up = exc
            nursery.cancel_scope.cancel()
        if gave_up is not None:
            raise gave_up
        await self._announce(trio.current_time(), want_parents=False)

    async def _loop(self, nursery: trio.Nursery, now: float) -> None:
        assert self.picker is not None
        last_progress = now
        next_announce = now + self.config.announce_interval
        # While nothing is in flight (parents not yet assigned, the seeder still reading), ask
        # again soon, backing off towards the regular interval so idle hosts stay cheap.
        idle_gap = self.config.min_announce_gap
        self._launch(nursery, now)
        while not self.picker.is_complete():
            if not self.live:
                next_announce = min(next_announce, now + idle_gap)
            wake = min(next_announce, last_progress + self.config.stall_timeout)
            deadline = self.picker.next_deadline()
            if deadline is not None:
                wake = min(wake, deadline)
            result: _Result | None = None
            with trio.move_on_at(wake):
                result = await self.receive.receive()
            now = trio.current_time()
            if result is not None and await self._handle(result, now):
                last_progress = now
                idle_gap = self.config.min_announce_gap
            for request in self.picker.expire(now):
                self._cancel(request)
            if now >= next_announce:
                if not self.live:
                    idle_gap = min(2 * idle_gap, self.config.announce_interval)
                await self._announce(now)
                next_announce = now + self.config.announce_interval
            if now - last_progress >= self.config.stall_timeout:
                raise FillerGaveUp(
                    f"no piece arrived for {self.config.stall_timeout:.0f} s "
                    f"({self.picker.have.count()}/{self.layout.count} pieces)"
                )
            self._launch(nursery, now)

    # -- assignments --------------------------------------------------------------------------

    def _apply_manifest(self, assignment: wire.Assignment) -> None:
        if assignment.state == "failed":
            raise FillerGaveUp("the supernode could not fetch the blob from the registry")
        try:
            self.manifest.extend(assignment.manifest_start, assignment.hashes)
        except ManifestError as exc:
            raise FillerGaveUp(f"supernode sent a bad manifest: {exc}") from exc

    def _apply(self, assignment: wire.Assignment, now: float) -> None:
        assert self.picker is not None
        self._apply_manifest(assignment)
        self.picker.set_verifiable(self.manifest.known)
        wanted = {
            p.peer_id: p
            for p in assignment.parents
            if p.peer_id != self.config.peer_id and p.peer_id not in self.shunned
        }
        for parent in self.picker.parents():
            if parent not in wanted:
                self.picker.remove_parent(parent)
                for request in [r for r in self.live if r.parent == parent]:
                    self._cancel(request)
        for parent_id, info in wanted.items():
            self.addresses[parent_id] = info.address
            self.picker.add_parent(parent_id, info.pieces)

    async def _announce(self, now: float, want_parents: bool = True) -> None:
        assert self.picker is not None
        batch, self.completed = self.completed, []
        try:
            assignment = await self.session.announce(
                batch, self.manifest.known, self.download.have, want_parents
            )
        except TrackerRejected as exc:
            raise FillerGaveUp(f"supernode refused the announce: {exc}") from exc
        except TrackerUnavailable as exc:
            if not want_parents:
                return
            raise FillerGaveUp(f"no supernode answers: {exc}") from exc
        if want_parents:
            self._apply(assignment, now)

    # -- transfers ----------------------------------------------------------------------------

    def _launch(self, nursery: trio.Nursery, now: float) -> None:
        assert self.picker is not None
        for request in self.picker.pick(now):
            scope = trio.CancelScope()
            self.live[request] = scope
            nursery.start_soon(self._fetch, request, scope)

    def _cancel(self, request: Request) -> None:
        scope = self.live.pop(request, None)
        if scope is not None:
            scope.cancel()

    async def _fetch(self, request: Request, scope: trio.CancelScope) -> None:
        length = self.layout.length(request.index)
        buffer = self.swarm.take_buffer(length)
        delivered = False
        with scope:
            try:
                await self.swarm.pieces.fetch(
                    self.addresses[request.parent],
                    self.download.digest,
                    request.index,
                    memoryview(buffer),
                )
                self.send.send_nowait(_Result(request, buffer))
                delivered = True
            except PieceFetchError as exc:
                self.send.send_nowait(_Result(request, None, exc))
        if not delivered:
            self.swarm.give_buffer(buffer)

    async def _failing(self, request: Request, now: float) -> None:
        """Count failed transfers (refused, reset, garbled); a parent that keeps failing is
        dropped and reported, so the supernode stops handing it out (a killed host would
        look alive until its TTL)."""
        assert self.picker is not None
        parent = request.parent
        self.failures[parent] = self.failures.get(parent, 0) + 1
        if self.failures[parent] < self.config.max_connect_failures:
            return
        log.info("parent %s of %s keeps failing; dropping it", parent, self.download.digest)
        self.shunned.add(parent)
        if parent in self.picker.parents():
            self.picker.remove_parent(parent)
        for live in [r for r in self.live if r.parent == parent]:
            self._cancel(live)
        reply = await self.session.report(parent, request.index, wire.REPORT_UNREACHABLE)
        if reply is not None:
            self._apply(reply, now)

    async def _handle(self, result: _Result, now: float) -> bool:
        """Take one transfer's outcome; True when it brought a new verified piece."""
        assert self.picker is not None
        request = result.request
        if self.live.pop(request, None) is None:
            if result.buffer is not None:
                self.swarm.give_buffer(result.buffer)
            return False  # cancelled meanwhile: the picker has already moved on
        if result.buffer is None:
            error = result.error
            assert error is not None
            log.debug("piece %d from %s: %s", request.index, request.parent, error)
            self.picker.on_failure(request.parent, request.index, lacks_piece=error.not_found)
            if not error.not_found:
                await self._failing(request, now)
            return False
        self.failures.pop(request.parent, None)
        buffer = result.buffer
        try:
            ok = self.manifest.verify(request.index, buffer)
            if ok:
                self.download.put_piece(request.index, buffer, f"peer:{request.parent}")
                self.completed.append(request.index)
            else:
                self.swarm.bad_pieces += 1
                log.warning(
                    "piece %d of %s from %s failed verification",
                    request.index,
                    self.download.digest,
                    request.parent,
                )
        finally:
            self.swarm.give_buffer(buffer)
        for action in self.picker.on_piece(request.parent, request.index, ok, now):
            if isinstance(action, Cancel):
                self._cancel(Request(action.parent, action.index))
            elif isinstance(action, BadParent):
                self.shunned.add(action.parent)
                reply = await self.session.report(
                    action.parent, action.index, wire.REPORT_BAD_PIECE
                )
                if reply is not None:
                    self._apply(reply, now)
        return ok
