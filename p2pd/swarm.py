"""The swarm filler: download a blob's pieces from parents the supernode assigns.

One `Swarm.fill` call runs one blob's download on this host: it registers with the blob's
supernode and drives a sans-IO `DownloadSession` (p2pd/core/session.py: the picker and every
policy decision, shared with the storm simulator) with real transfers. Piece transfers run as
child tasks and report back over a memory channel, so the session sees events in order:

    register ──▶ assignment (layout, manifest hashes, parents) ──▶ session
    loop: session.poll ──▶ fetch tasks ──▶ last bytes coming in ──▶ session (the parent's
          slot is free: its next piece is asked for) ──▶ verify against the manifest ──▶ write
          (in a worker thread, in the fetch task) ──▶ session; announces (in a task of their
          own, one at a time, in one message with the host's other downloads' at the same
          supernode: p2pd.coalescer) and reports ──▶ supernode ──▶ new assignment ──▶ session

Rules:
- The blob is cut the way its supernode says (`_take_layout`), whatever this version's rule:
  the download is re-cut before its first piece; the pieces are asked for naming that piece
  size, so a parent that holds the blob cut otherwise answers that it does not have them.
- A piece is written only after its xxh3-128 matches the manifest; a mismatch is reported to
  the supernode (the parent is blamed) and the piece is fetched again elsewhere. A piece the
  seeder streamed before its hash was known waits, bytes in hand, for a reply that brings
  the hash (the loop calls the supernode as soon as pacing allows while one waits).
- Requests the session cancels (endgame losers, dropped parents, timeouts) have their transfer
  tasks cancelled; a result that arrives for a request no longer on the books is dropped.
- When the session gives up (no progress for its stall timeout, a failed task), or no
  supernode answers, `FillerGaveUp` hands the download to the registry fallback.
- After the blob is complete the host keeps seeding: it heartbeats the supernode for
  `seed_time` so it stays a parent, then leaves.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import trio

from p2pd import offload, wire
from p2pd.blobs import BlobSource, Download, DownloadState, FillerGaveUp
from p2pd.clusterauth import ClusterAuth
from p2pd.coalescer import Coalescer, Item, Outcome
from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import LayoutError, PieceLayout
from p2pd.core.manifest import ManifestError, PieceManifest
from p2pd.core.picker import Request
from p2pd.core.session import DownloadSession, ParentView, SessionConfig
from p2pd.peers import PieceClient, PieceFetchError, decode_have
from p2pd.tracker import ControlClient, TrackerRejected, TrackerSession, TrackerUnavailable

log = logging.getLogger(__name__)

# Piece-size buffers kept for reuse (per piece size): enough for the requests in flight.
_POOLED_BUFFERS = 8
# Pieces whose parent slot was freed as their last bytes came in (`PieceClient.fetch`'s
# `nearly_done`), being received, checked and written at once (per download). Beyond it a
# piece keeps its slot until written: when the disk is slower than the network, the backlog
# (threads, buffers) stays bounded instead of growing.
_EARLY_RELEASES = 2
# After a watch of a parent that failed (busy, unreachable, too slow), this long before it
# is watched again.
_WATCH_RETRY = 1.0
# Longest wait for a background announce's reply before the loop looks at its timers again.
_ANNOUNCE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    peer_id: str
    advertise: str
    zone: str = ""
    upload_slots: int = 8
    seed_time: float = 600.0
    session: SessionConfig = field(default_factory=SessionConfig)
    # Watch parents that offer nothing more (`p2pd.peers.KNOWN_HEADER`). Off: in the
    # namespace fleet (8 hosts and their containerds on 2 cores, CPU-bound; four balanced
    # pairs) the watches, 3000-3700 a storm, cost the p2pd ~2 ms of CPU each (80.8 -> 109.4
    # CPU-s in all) and the storm 24.1 -> 27.8 s, against a small gain in the simulator
    # (Storm-A 1.089 -> 1.082 of the bound, 3000 hosts 1.175 -> 1.156). To be turned on
    # once news of a parent's pieces costs far less than a general-server request.
    watch_parents: bool = False


@dataclass(slots=True)
class _Reply:
    """The supernode's answer to an announce sent in the background (or why none came)."""

    assignment: wire.Assignment | None
    want_parents: bool
    error: FillerGaveUp | None = None


def _host_port(url: str) -> str:
    """``host:port`` of a supernode's base URL, as its seeder's address would read."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


@dataclass(slots=True)
class _Watched:
    """A watch of a parent ended: what it says it holds now (None: it failed or said
    nothing)."""

    parent: str
    have: Bitfield | None
    unwatchable: bool = False  # it cannot be watched: do not ask it again


@dataclass(slots=True)
class _Result:
    """A transfer's news: its bytes arrived (`ok` None), or its verdict, or its error."""

    request: Request
    token: int  # which transfer of that request: a re-issued request gets a new one
    ok: bool | None = None  # True: verified and written; False: failed verification
    error: PieceFetchError | None = None
    parent_has: Bitfield | None = None  # with a verdict: the parent's `HAVE_HEADER`


class Swarm:
    """A `Filler` that gets pieces from other hosts through the supernode's assignments."""

    def __init__(
        self,
        config: SwarmConfig,
        http: httpx.AsyncClient | ControlClient,
        pieces: PieceClient,
        supernodes: list[str],
        nursery: trio.Nursery,
        rng: random.Random | None = None,
        auth: ClusterAuth | None = None,
    ) -> None:
        self.config = config
        self.auth = auth or ClusterAuth(None)
        self.http = http
        self.pieces = pieces
        self.supernodes = supernodes
        self.nursery = nursery  # where seeding heartbeats live after a download
        self.rng = rng or random.Random()
        self._buffers: dict[int, list[bytearray]] = {}
        # one message per supernode for the announces of this host's downloads it tracks
        self.coalescer = Coalescer()
        self.bad_pieces = 0
        self.pieces_verified = 0

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
        session = TrackerSession(self.http, self.supernodes, register, auth=self.auth)
        try:
            assignment = await session.register(download.have)
        except (TrackerUnavailable, TrackerRejected) as exc:
            raise FillerGaveUp(f"supernode: {exc}") from exc
        try:
            _take_layout(download, assignment)
            await _Run(self, download, session).run(assignment)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await session.leave()
            raise
        self.nursery.start_soon(self._seed, download, session)

    async def _seed(self, download: Download, session: TrackerSession) -> None:
        """Stay a parent for `seed_time` once the blob is verified and cached: heartbeat
        within the supernode's liveness window; stop when the blob leaves the cache."""
        try:
            await download.finished.wait()
            if download.state is not DownloadState.COMPLETE:
                return
            store = download.partial.store
            deadline = trio.current_time() + self.config.seed_time
            while trio.current_time() < deadline and store.has(download.digest):
                await trio.sleep(min(10.0, self.config.seed_time))
                await session.announce([], download.layout.count, download.have, False)
        except (TrackerUnavailable, TrackerRejected):
            pass
        except Exception:
            log.exception("seeding %s failed", download.digest)  # never the daemon's end
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await session.leave()

    # -- buffers: one per piece in flight, reused (fresh big buffers cost page faults) --------

    def take_buffer(self, piece_size: int) -> bytearray:
        free = self._buffers.get(piece_size)
        return free.pop() if free else bytearray(piece_size)

    def give_buffer(self, buffer: bytearray) -> None:
        free = self._buffers.setdefault(len(buffer), [])
        if len(free) < _POOLED_BUFFERS:
            free.append(buffer)


def _take_layout(download: Download, assignment: wire.Assignment) -> None:
    """Cut the download the way its supernode cuts the blob, whatever this version's rule
    (p2pd.core.layout); a layout that is no sane one for the blob hands it to the registry."""
    ours = download.layout
    if assignment.layout == ours:
        return
    try:
        if assignment.size != ours.total_size:
            raise LayoutError(f"the blob is {ours.total_size} bytes")
        download.relayout(PieceLayout.checked(ours.total_size, assignment.piece_size))
    except LayoutError as exc:
        raise FillerGaveUp(
            f"supernode's layout {assignment.size}/{assignment.piece_size} refused: {exc}"
        ) from None
    log.info(
        "%s: cut in %d-byte pieces, as its supernode says (not %d)",
        download.digest,
        assignment.piece_size,
        ours.piece_size,
    )


class _Run:
    """One blob's download: drives its `DownloadSession` with real transfers and replies."""

    def __init__(self, swarm: Swarm, download: Download, session: TrackerSession) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.download = download
        self.tracker = session
        self.layout = download.layout
        self.manifest = PieceManifest(download.digest, download.layout)
        self.session: DownloadSession | None = None
        self.live: dict[Request, tuple[int, trio.CancelScope]] = {}
        self.tokens = 0
        self.released: set[Request] = set()  # slots freed early, verdicts pending
        # Parents offered in full (`DownloadSession.offered_in_full`: peers of our zone,
        # not the seeder, which is the parent at the supernode's own address) that offered
        # nothing we lack, being watched for their next piece (`PieceClient.watch`), and each
        # watch's scope; parents that cannot be watched (they refused or answered with
        # nothing readable): not asked again.
        self.watching: dict[str, trio.CancelScope] = {}
        self.unwatchable: set[str] = set()
        self.announcing = False  # an announce is in flight (`_announce_in_background`)
        self.awaiting_hash = 0  # transfers whose bytes are in, waiting for their hash
        self.hashes = trio.Event()  # set (and replaced) when the manifest grows
        self.send, self.receive = trio.open_memory_channel[_Result | _Reply | _Watched](math.inf)

    async def run(self, assignment: wire.Assignment) -> None:
        self._extend_manifest(assignment)
        # pieces on disk from before a restart count only once their hash matches
        good = await offload.run_sync(self._recheck_claims)
        for index in good:
            self.download.adopt(index, "resumed")
        now = trio.current_time()
        self.session = DownloadSession(
            self.layout,
            self.config.peer_id,
            random.Random(self.swarm.rng.random()),
            self.config.session,
            have=self.download.have.copy(),
            now=now,
            zone=self.config.zone,
        )
        self.session.completed.extend(good)  # the supernode learns them with the first announce
        self._apply(assignment, now)
        # Transfers run in a nursery, so a give-up inside it would come out wrapped in an
        # exception group: carry it out as a value and raise it plainly here.
        gave_up: FillerGaveUp | None = None
        self.swarm.coalescer.join(self)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._loop(nursery)
                except FillerGaveUp as exc:
                    gave_up = exc
                nursery.cancel_scope.cancel()
        finally:
            self.swarm.coalescer.leave(self)
        if gave_up is not None:
            raise gave_up
        await self._announce(trio.current_time(), final=True)

    async def _loop(self, nursery: trio.Nursery) -> None:
        session = self.session
        assert session is not None
        while True:
            now = trio.current_time()
            if self.awaiting_hash:
                session.hashes_wanted(now)
            out = session.poll(now)
            for request in out.cancel:
                self.released.discard(request)
                entry = self.live.pop(request, None)
                if entry is not None:
                    entry[1].cancel()
            for request in out.fetch:
                self.tokens += 1
                scope = trio.CancelScope()
                self.live[request] = (self.tokens, scope)
                nursery.start_soon(self._fetch, request, self.tokens, scope)
            for parent, index, reason in out.reports:
                reply = await self.tracker.report(parent, index, reason)
                if reply is not None:
                    self._apply(reply, trio.current_time())
            if out.gave_up is not None:
                raise FillerGaveUp(out.gave_up)
            if session.is_complete():
                while self.announcing:  # its pieces should reach the supernode
                    late = await self.receive.receive()
                    if isinstance(late, _Reply):
                        # every piece is written: a supernode that stopped answering now
                        # is the final announce's business (it ignores that), not a failure
                        self.announcing = False
                        if late.error is None:
                            self._handle_reply(late)
                return
            if out.announce and not self.announcing:
                self._announce_in_background(now)
            self._watch_exhausted(nursery)
            wake = session.next_wakeup()
            if self.announcing and wake <= now:
                # the announce timer is due, but one is in flight: its reply wakes the loop
                # (a request's deadline still counts)
                wake = now + _ANNOUNCE_WAIT
                deadline = session.picker.next_deadline()
                if deadline is not None and deadline < wake:
                    wake = deadline
            message: _Result | _Reply | _Watched | None = None
            with trio.move_on_at(wake):
                message = await self.receive.receive()
            if isinstance(message, _Reply):
                self._handle_reply(message)
            elif isinstance(message, _Watched):
                self.watching.pop(message.parent, None)
                if message.have is not None:
                    session.on_have(message.parent, message.have)
                elif message.unwatchable:
                    self.unwatchable.add(message.parent)
            elif message is not None:
                self._handle(message)

    def _recheck_claims(self) -> list[int]:
        """(In a worker thread.) Claimed pieces whose bytes match the manifest."""
        partial = self.download.partial
        return [
            i
            for i in self.download.claimed
            if i < self.manifest.known and self.manifest.verify(i, partial.read_piece(i))
        ]

    # -- supernode replies --------------------------------------------------------------------

    def _extend_manifest(self, assignment: wire.Assignment) -> None:
        known = self.manifest.known
        try:
            self.manifest.extend(assignment.manifest_start, assignment.hashes)
        except ManifestError as exc:
            raise FillerGaveUp(f"supernode sent a bad manifest: {exc}") from exc
        if self.manifest.known > known:
            self.hashes.set()
            self.hashes = trio.Event()

    def _apply(self, assignment: wire.Assignment, now: float) -> None:
        assert self.session is not None
        if assignment.digest != self.download.digest:
            raise FillerGaveUp(f"supernode answered about another blob: {assignment.digest}")
        if assignment.state != "failed" and assignment.layout != self.layout:
            # (a failover to a supernode that cuts the blob otherwise: the pieces held are
            # in this layout, so the registry has the rest)
            raise FillerGaveUp(
                f"supernode's layout {assignment.size}/{assignment.piece_size} changed from "
                f"{self.layout.total_size}/{self.layout.piece_size} mid-download"
            )
        if assignment.state != "failed":
            self._extend_manifest(assignment)
        parents = [ParentView(p.peer_id, p.address, p.pieces, p.zone) for p in assignment.parents]
        session = self.session
        session.apply(
            assignment.state,
            self.manifest.known,
            parents,
            now,
            assignment.pace_ms / 1000,
            _host_port(self.tracker.current) if self.tracker.current else None,
        )
        for parent in [p for p in self.watching if not session.offered_in_full(p)]:
            self.watching.pop(parent).cancel()

    def _announce_in_background(self, now: float) -> None:
        """Send an announce without holding up the loop; the reply comes back as a `_Reply`.

        Awaited in the loop, an announce held up every transfer decision for its round trip,
        and behind a busy downlink that trip is long: the reply queues behind piece bytes
        (tens of ms in the 100 Mbit/s fleet, with an announce every 0.2 s early on), while
        the parent's upload sat idle for want of the next request (traced: one host alone).
        The swarm's `Coalescer` sends it, with the announces of this host's other downloads
        at the same supernode that may go now, in the swarm's nursery (see p2pd.coalescer).
        """
        assert self.session is not None
        pieces, want_parents = self.session.take_announce(now)
        self.announcing = True
        item = Item(self.tracker, pieces, self.manifest.known, self.download.have, want_parents)
        coalescer = self.swarm.coalescer
        self.swarm.nursery.start_soon(coalescer.send, coalescer.gather(self, item))

    def ride_along(self, now: float) -> Item | None:
        """(`coalescer.Member`) This download's announce, to go in another's message now."""
        session = self.session
        if self.announcing or session is None or not session.may_ride_along(now):
            return None
        pieces, want_parents = session.take_announce(now)
        self.announcing = True
        return Item(self.tracker, pieces, self.manifest.known, self.download.have, want_parents)

    def deliver(self, item: Item, outcome: Outcome) -> None:
        """(`coalescer.Member`) The answer to an announce of ours, back to the loop."""
        reply = _Reply(None, item.want_parents)
        if isinstance(outcome, wire.Assignment):
            reply.assignment = outcome
        elif isinstance(outcome, TrackerRejected):
            reply.error = FillerGaveUp(f"supernode refused the announce: {outcome}")
        else:
            reply.error = FillerGaveUp(f"no supernode answers: {outcome}")
        self.send.send_nowait(reply)

    def _handle_reply(self, reply: _Reply) -> None:
        self.announcing = False
        if reply.error is not None:
            raise reply.error
        if reply.want_parents and reply.assignment is not None:
            self._apply(reply.assignment, trio.current_time())

    async def _announce(self, now: float, final: bool = False) -> None:
        assert self.session is not None
        pieces, want_parents = self.session.take_announce(now)
        want_parents = want_parents and not final
        try:
            assignment = await self.tracker.announce(
                pieces, self.manifest.known, self.download.have, want_parents
            )
        except TrackerRejected as exc:
            if final:
                return
            raise FillerGaveUp(f"supernode refused the announce: {exc}") from exc
        except TrackerUnavailable as exc:
            if final:
                return
            raise FillerGaveUp(f"no supernode answers: {exc}") from exc
        if want_parents:
            self._apply(assignment, now)

    # -- watching parents ----------------------------------------------------------------------

    def _watch_exhausted(self, nursery: trio.Nursery) -> None:
        """Watch each parent of our zone that offers nothing we lack (one watch at a time
        each): its next piece is news the supernode would bring only after its announce and
        our next call (`p2pd.peers.KNOWN_HEADER`). The count we name is of all it was said
        to hold, so a parent answers at once only with a piece we did not know it had: the
        watches of one parent cannot spin."""
        assert self.session is not None
        if not self.config.watch_parents:
            return
        for parent in self.session.exhausted():
            if parent not in self.watching and parent not in self.unwatchable:
                scope = trio.CancelScope()
                self.watching[parent] = scope
                known = self.session.known_of(parent)
                nursery.start_soon(self._watch, parent, known, scope)

    async def _watch(self, parent: str, known: int, scope: trio.CancelScope) -> None:
        assert self.session is not None
        address = self.session.addresses[parent]
        with scope:
            have: Bitfield | None = None
            unwatchable = False
            try:
                value = await self.swarm.pieces.watch(address, self.download.digest, known)
                if value is not None:
                    have = decode_have(value, self.layout.count)
                # nothing we can read (another layout, another version): not again
                unwatchable = have is None
            except PieceFetchError as exc:
                log.debug("watch of %s: %s", parent, exc)
                if exc.busy or exc.unreachable:
                    # (a parent that is gone fails its transfers, which count; this does not)
                    await trio.sleep(_WATCH_RETRY)
                else:
                    unwatchable = True  # refused (404: no such route or blob there)
            self.send.send_nowait(_Watched(parent, have, unwatchable))

    # -- transfers ----------------------------------------------------------------------------

    async def _fetch(self, request: Request, token: int, scope: trio.CancelScope) -> None:
        """Fetch, then verify and write in a worker thread, reporting each step to the loop.

        Checking and writing run here rather than in the loop so that the loop can ask the
        parent for its next piece as soon as this one's bytes are in: on a fast link the
        write takes about half as long as the transfer, and doing them one after the other
        left the parent's upload idle over a third of the time (traced on loopback).
        """
        assert self.session is not None
        length = self.layout.length(request.index)
        buffer = self.swarm.take_buffer(self.layout.piece_size)
        try:
            with scope:
                try:
                    have = await self.swarm.pieces.fetch(
                        self.session.addresses[request.parent],
                        self.download.digest,
                        request.index,
                        memoryview(buffer)[:length],
                        # the parent's slot is free from here: its next request overlaps
                        # the end of this body (see `PieceClient.fetch`)
                        lambda: self.send.send_nowait(_Result(request, token)),
                        piece_size=self.layout.piece_size,
                    )
                except PieceFetchError as exc:
                    self.send.send_nowait(_Result(request, token, error=exc))
                    return
                streamed = request.index >= self.manifest.known
                if streamed:
                    self.awaiting_hash += 1  # before the loop hears of it (see `_loop`)
                self.send.send_nowait(_Result(request, token))
                if streamed:
                    try:
                        while request.index >= self.manifest.known:
                            await self.hashes.wait()
                    finally:
                        self.awaiting_hash -= 1
                piece = memoryview(buffer)[:length]
                try:
                    # not abandoned on cancel: the buffer goes back only once the thread is done
                    ok = await offload.run_sync(self._verify_and_write, request.index, piece)
                finally:
                    piece.release()
                parent_has = None
                if have is not None and self.session.offered_in_full(request.parent):
                    parent_has = decode_have(have, self.layout.count)
                self.send.send_nowait(_Result(request, token, ok=ok, parent_has=parent_has))
        finally:
            self.swarm.give_buffer(buffer)

    def _handle(self, result: _Result) -> None:
        """One step of a transfer: bytes in (the parent's slot is free), or its outcome."""
        assert self.session is not None
        request = result.request
        entry = self.live.get(request)
        if entry is None or entry[0] != result.token:
            return  # cancelled meanwhile (or an older transfer of a re-issued request)
        if result.error is None and result.ok is None:
            if len(self.released) < _EARLY_RELEASES:
                self.released.add(request)
                self.session.on_received(request)
            return
        self.released.discard(request)
        del self.live[request]
        if result.error is not None:
            error = result.error
            log.debug("piece %d from %s: %s", request.index, request.parent, error)
            self.session.on_failure(request, error.not_found, trio.current_time(), busy=error.busy)
            return
        if result.ok:
            self.swarm.pieces_verified += 1
            self.download.mark_written(request.index, f"peer:{request.parent}")
        else:
            self.swarm.bad_pieces += 1
            log.warning(
                "piece %d of %s from %s failed verification",
                request.index,
                self.download.digest,
                request.parent,
            )
        slow = len(self.session.slow)
        self.session.on_piece(request, bool(result.ok), trio.current_time(), result.parent_has)
        if len(self.session.slow) > slow:
            log.info(
                "%s: parent %s set aside, far slower than the others",
                self.download.digest,
                request.parent,
            )

    def _verify_and_write(self, index: int, piece: memoryview) -> bool:
        """(In a worker thread.) True when the piece matched its hash and is on disk."""
        if not self.manifest.verify(index, piece):
            return False
        if index not in self.download.partial.have:
            self.download.partial.write_bytes(index, piece)
            self.download.hash_if_next(index, piece)
        return True
