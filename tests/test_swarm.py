"""The swarm filler's driving of transfers and announces, on a virtual clock.

A fake supernode (a `ControlClient` answering from memory) and a fake piece client stand in for
the network; the `Swarm`, its `DownloadSession`, the store and the manifest are the real ones.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from p2pd import offload, wire
from p2pd.blobs import BlobSource, Download, FillerGaveUp
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import piece_hash
from p2pd.core.session import SessionConfig
from p2pd.peers import PieceClient, PieceFetchError, encode_have
from p2pd.store import BlobStore
from p2pd.swarm import Swarm, SwarmConfig
from p2pd.tracker import ControlClient

PIECE = 1000
LAYOUT = PieceLayout(4 * PIECE, PIECE)
DATA = random.Random(5).randbytes(LAYOUT.total_size)
DIGEST = Digest.from_bytes(hashlib.sha256(DATA).digest())
HASHES = b"".join(piece_hash(DATA[o : o + n]) for o, n in map(LAYOUT.span, range(LAYOUT.count)))


class FakeSupernode(ControlClient):
    """Answers every call with the whole manifest and one parent holding every piece; an
    announce's answer waits `announce_delay` (a reply queued behind piece bytes)."""

    def __init__(self, announce_delay: float = 0.0) -> None:
        super().__init__(httpx.AsyncClient())
        self.announce_delay = announce_delay
        self.announces: list[tuple[float, tuple[int, ...]]] = []

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        msg = wire.decode(body, (wire.Register, wire.Announce, wire.Leave, wire.Report))
        if isinstance(msg, wire.Leave):
            return 200, wire.encode(wire.Ack())
        if isinstance(msg, wire.Announce):
            self.announces.append((trio.current_time(), msg.pieces))
            await trio.sleep(self.announce_delay)
        full = Bitfield.from_indexes(LAYOUT.count, range(LAYOUT.count))
        reply = wire.Assignment(
            digest=DIGEST,
            state="ready",
            size=LAYOUT.total_size,
            piece_size=PIECE,
            manifest_start=0,
            hashes=HASHES,
            sealed=True,
            parents=(wire.ParentInfo("seed", "10.0.0.9:65003", "", full),),
        )
        return 200, wire.encode(reply)


class FakePieces(PieceClient):
    """Each piece's body takes `body` seconds; `nearly_done` comes `tail` seconds before its
    end, as the real client calls it `lead_seconds` before the end."""

    def __init__(self, body: float, tail: float) -> None:
        super().__init__()
        self.body = body
        self.tail = tail
        self.starts: dict[int, float] = {}
        self.ends: dict[int, float] = {}

    async def watch(self, address: str, digest: Digest, known: int) -> bytes | None:
        """No parent here is ever watched over the network: the watch waits, unanswered."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fetch(
        self,
        address: str,
        digest: Digest,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
        *,
        piece_size: int | None = None,
    ) -> bytes | None:
        self.starts[index] = trio.current_time()
        await trio.sleep(self.body - self.tail)
        if nearly_done is not None:
            nearly_done()
        await trio.sleep(self.tail)
        offset, length = LAYOUT.span(index)
        buffer[:] = DATA[offset : offset + length]
        self.ends[index] = trio.current_time()
        return None


async def fill(
    tmp_path: Path, control: FakeSupernode, pieces: FakePieces, *, watch: bool = True
) -> Download:
    store = BlobStore(tmp_path)
    download = Download(DIGEST, store.open_partial(DIGEST, LAYOUT))
    source = BlobSource("http://registry.test", "library/x", None, LAYOUT.total_size)
    config = SwarmConfig(
        peer_id="me",
        advertise="10.0.0.1:65003",
        seed_time=0.0,
        # every piece done is announced at once: the announces run all through the download
        # (and the other timers as these tests' timings assume, whatever the defaults)
        session=SessionConfig(
            early_bytes=100 * LAYOUT.piece_size,
            early_announce_interval=0.01,
            announce_interval=1.0,
            min_announce_gap=0.05,
        ),
        watch_parents=watch,
    )
    with offload.inline():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(config, control, pieces, ["http://sn.test"], nursery, random.Random(1))
            await swarm.fill(download, source)
            nursery.cancel_scope.cancel()  # the seeding that follows is not under test
    return download


async def test_a_lone_parent_gets_the_next_request_before_the_last_bytes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The next request reaches the parent while the current body's tail is still on its
    way (`nearly_done`), so its upload never waits for a round trip between pieces."""
    pieces = FakePieces(body=1.0, tail=0.2)
    download = await fill(tmp_path, FakeSupernode(), pieces)
    assert download.have.is_full()
    order = sorted(pieces.starts, key=pieces.starts.__getitem__)
    for before, after in itertools.pairwise(order):
        assert pieces.starts[after] == pytest.approx(pieces.ends[before] - 0.2)
    assert pieces.ends[order[-1]] == pytest.approx(4 * 0.8 + 0.2)


async def test_a_slow_announce_reply_does_not_hold_up_the_transfers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Announce replies that take longer than a piece (queued behind piece bytes) are
    waited for beside the transfers, not in their way."""
    control = FakeSupernode(announce_delay=0.7)
    pieces = FakePieces(body=0.5, tail=0.1)
    download = await fill(tmp_path, control, pieces)
    assert download.have.is_full()
    last = max(pieces.ends.values())
    assert last == pytest.approx(4 * 0.4 + 0.1)  # as with an instant supernode
    assert len(control.announces) >= 2  # some went out while pieces were moving
    # every piece reached the supernode, the last ones in the final announce
    announced = sorted(i for _, batch in control.announces for i in batch)
    assert announced == list(range(LAYOUT.count))


class DiesMidAnnounce(FakeSupernode):
    """Answers register and the first announce; the next announce is slow and meets a
    supernode that has stopped answering (503), as does every call after it."""

    def __init__(self, announce_delay: float) -> None:
        super().__init__(announce_delay)
        self.down = False

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        msg = wire.decode(body, (wire.Register, wire.Announce, wire.Leave, wire.Report))
        if self.down:
            return 503, b""
        if isinstance(msg, wire.Announce) and self.announces:
            self.announces.append((trio.current_time(), msg.pieces))
            await trio.sleep(self.announce_delay)
            self.down = True
            return 503, b""
        return await super().post(base, path, body, headers)


async def test_a_supernode_dying_during_the_last_announce_does_not_fail_a_complete_download(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # the announce in flight when the last piece lands fails, and so does its fail-over: every
    # piece is written, so the download is done (the final announce ignores that)
    control = DiesMidAnnounce(announce_delay=0.7)
    download = await fill(tmp_path, control, FakePieces(body=0.5, tail=0.1))
    assert download.have.is_full()
    assert control.down


# -- cut-through: pieces streamed by the seeder before their hashes are known -------------------

PUBLISH_EVERY = 1.0  # the seeder publishes piece i at (i + 1) * PUBLISH_EVERY


def published(now: float) -> int:
    return min(LAYOUT.count, int(now / PUBLISH_EVERY + 1e-9))


class StreamingSupernode(FakeSupernode):
    """A seeder still reading the blob: hashes of the pieces published so far, and an offer
    of those plus the next two, which it streams."""

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        msg = wire.decode(body, (wire.Register, wire.Announce, wire.Leave, wire.Report))
        if isinstance(msg, wire.Leave):
            return 200, wire.encode(wire.Ack())
        if isinstance(msg, wire.Announce):
            self.announces.append((trio.current_time(), msg.pieces))
        known = published(trio.current_time())
        offer = Bitfield.from_indexes(LAYOUT.count, range(min(LAYOUT.count, known + 2)))
        reply = wire.Assignment(
            digest=DIGEST,
            state="ready" if known == LAYOUT.count else "fetching",
            size=LAYOUT.total_size,
            piece_size=PIECE,
            manifest_start=0,
            hashes=HASHES[: 16 * known],
            sealed=known == LAYOUT.count,
            parents=(wire.ParentInfo("seed", "10.0.0.9:65003", "", offer),),
        )
        return 200, wire.encode(reply)


class StreamedPieces(FakePieces):
    """A piece's last bytes come once the seeder published it (or `body` after the start)."""

    async def fetch(
        self,
        address: str,
        digest: Digest,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
        *,
        piece_size: int | None = None,
    ) -> None:
        self.starts[index] = now = trio.current_time()
        end = max(now + self.body, (index + 1) * PUBLISH_EVERY + 0.001)
        await trio.sleep_until(end - self.tail)
        if nearly_done is not None:
            nearly_done()
        await trio.sleep_until(end)
        offset, length = LAYOUT.span(index)
        buffer[:] = DATA[offset : offset + length]
        self.ends[index] = trio.current_time()


async def test_streamed_pieces_are_fetched_early_and_written_only_once_their_hash_came(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = BlobStore(tmp_path)
    download = Download(DIGEST, store.open_partial(DIGEST, LAYOUT))
    written: dict[int, float] = {}
    mark_written = download.mark_written

    def record(index: int, source: str) -> None:
        written[index] = trio.current_time()
        mark_written(index, source)

    download.mark_written = record  # type: ignore[method-assign]
    source = BlobSource("http://registry.test", "library/x", None, LAYOUT.total_size)
    # announces on their own only every 5 s: the hashes must be asked for
    session = SessionConfig(
        early_bytes=0, announce_interval=5.0, min_announce_gap=0.01, stream_ahead=2
    )
    config = SwarmConfig(peer_id="me", advertise="10.0.0.1:65003", seed_time=0.0, session=session)
    pieces = StreamedPieces(body=0.1, tail=0.05)
    with offload.inline():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(
                config, StreamingSupernode(), pieces, ["http://sn.test"], nursery, random.Random(1)
            )
            await swarm.fill(download, source)
            nursery.cancel_scope.cancel()
    assert download.have.is_full() and swarm.bad_pieces == 0
    for index in range(LAYOUT.count):
        publish = (index + 1) * PUBLISH_EVERY
        assert pieces.starts[index] < publish  # asked for before its hash existed
        assert publish <= written[index] < publish + 0.1  # checked once it came, promptly


# -- the layout is the supernode's -----------------------------------------------------------

# The rule (this version's) cuts this blob in 3 pieces of 256 KiB; the supernode in 10 of 64 KiB.
CUT = PieceLayout(600_000, 64 * 1024)
CUT_DATA = random.Random(6).randbytes(CUT.total_size)
CUT_DIGEST = Digest.from_bytes(hashlib.sha256(CUT_DATA).digest())


class CuttingSupernode(FakeSupernode):
    """Answers with its own piece size for CUT_DIGEST and the matching hashes."""

    def __init__(self, piece_size: int, size: int = CUT.total_size) -> None:
        super().__init__()
        self.piece_size = piece_size
        self.size = size

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        msg = wire.decode(body, (wire.Register, wire.Announce, wire.Leave, wire.Report))
        if isinstance(msg, wire.Leave):
            return 200, wire.encode(wire.Ack())
        layout = PieceLayout(self.size, self.piece_size)
        spans = map(layout.span, range(layout.count))
        reply = wire.Assignment(
            digest=CUT_DIGEST,
            state="ready",
            size=self.size,
            piece_size=self.piece_size,
            manifest_start=0,
            hashes=b"".join(piece_hash(CUT_DATA[o : o + n]) for o, n in spans),
            sealed=True,
            parents=(wire.ParentInfo("seed", "10.0.0.9:65003", "", Bitfield.full(layout.count)),),
        )
        return 200, wire.encode(reply)


class CutPieces(PieceClient):
    """A parent holding CUT_DATA, cutting it by the piece size each request names."""

    def __init__(self) -> None:
        super().__init__()
        self.named: set[int | None] = set()

    async def watch(self, address: str, digest: Digest, known: int) -> bytes | None:
        """No parent here is ever watched over the network: the watch waits, unanswered."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def fetch(
        self,
        address: str,
        digest: Digest,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
        *,
        piece_size: int | None = None,
    ) -> None:
        self.named.add(piece_size)
        assert piece_size is not None
        await trio.sleep(0.01)
        offset, length = PieceLayout(CUT.total_size, piece_size).span(index)
        buffer[:] = CUT_DATA[offset : offset + length]


async def cut_fill(tmp_path: Path, control: FakeSupernode, pieces: PieceClient) -> Download:
    rules = PieceLayout.for_size(CUT.total_size)
    assert rules.piece_size == 256 * 1024
    download = Download(CUT_DIGEST, BlobStore(tmp_path).open_partial(CUT_DIGEST, rules))
    source = BlobSource("http://registry.test", "library/x", None, CUT.total_size)
    config = SwarmConfig(peer_id="me", advertise="10.0.0.1:65003", seed_time=0.0)
    gave_up: FillerGaveUp | None = None
    with offload.inline():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(config, control, pieces, ["http://sn.test"], nursery, random.Random(1))
            try:
                await swarm.fill(download, source)
            except FillerGaveUp as exc:
                gave_up = exc  # (raised out of the nursery it would come in a group)
            nursery.cancel_scope.cancel()
    if gave_up is not None:
        download.partial.close()
        raise gave_up
    return download


async def test_the_download_takes_the_supernodes_layout_not_its_own_rule(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = CutPieces()
    download = await cut_fill(tmp_path, CuttingSupernode(CUT.piece_size), pieces)
    assert download.layout == CUT == download.partial.layout
    assert download.have.is_full()  # every piece verified against the supernode's hashes
    assert pieces.named == {CUT.piece_size}
    assert os.pread(download.partial.fd, CUT.total_size, 0) == CUT_DATA
    download.partial.close()


@pytest.mark.parametrize(
    ("piece_size", "size", "why"),
    [
        (100_000, CUT.total_size, "not a power of two"),
        (1024, CUT.total_size, "not a power of two of at least 16384"),
        (CUT.piece_size, CUT.total_size + 1, "the blob is 600000 bytes"),
    ],
)
async def test_a_nonsense_layout_hands_the_blob_to_the_registry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, piece_size: int, size: int, why: str
) -> None:
    with pytest.raises(FillerGaveUp, match=f"layout {size}/{piece_size} refused: .*{why}"):
        await cut_fill(tmp_path, CuttingSupernode(piece_size, size), CutPieces())


class Outdated(FakeSupernode):
    """Names one parent, in `zone`, and says it holds piece 0 only, however often asked."""

    def __init__(self, zone: str, address: str = "10.0.0.8:65003") -> None:
        super().__init__()
        self.zone = zone
        self.address = address

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        msg = wire.decode(body, (wire.Register, wire.Announce, wire.Leave, wire.Report))
        if isinstance(msg, wire.Leave | wire.Report):
            return 200, wire.encode(wire.Ack())
        reply = wire.Assignment(
            digest=DIGEST,
            state="ready",
            size=LAYOUT.total_size,
            piece_size=PIECE,
            manifest_start=0,
            hashes=HASHES,
            sealed=True,
            parents=(wire.ParentInfo("peer", self.address, self.zone, Bitfield(LAYOUT.count, 1)),),
        )
        return 200, wire.encode(reply)


class SaysItHoldsAll(FakePieces):
    """A parent whose piece responses say it holds the whole blob (HAVE_HEADER)."""

    async def fetch(
        self,
        address: str,
        digest: Digest,
        index: int,
        buffer: memoryview,
        nearly_done: Callable[[], None] | None = None,
        *,
        piece_size: int | None = None,
    ) -> bytes | None:
        await super().fetch(address, digest, index, buffer, nearly_done, piece_size=piece_size)
        return encode_have(Bitfield.full(LAYOUT.count)).encode()


async def test_a_parent_of_our_zone_is_asked_for_what_its_responses_say_it_holds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = SaysItHoldsAll(body=0.1, tail=0.0)
    download = await fill(tmp_path, Outdated(zone=""), pieces)  # our zone: ""
    assert download.have.is_full()
    assert sorted(pieces.starts) == list(range(LAYOUT.count))


async def test_a_parent_in_another_zone_is_asked_only_for_what_the_supernode_offers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # the supernode rations what parents in other zones are asked for (zone claims)
    pieces = SaysItHoldsAll(body=0.1, tail=0.0)
    with pytest.raises(BaseExceptionGroup) as raised:  # (out of fill's nursery)
        await fill(tmp_path, Outdated(zone="z1"), pieces)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived")
    assert sorted(pieces.starts) == [0]


class Watchable(FakePieces):
    """A parent whose piece responses name nothing; a watch of it says, after `delay`
    seconds, that it holds the whole blob."""

    def __init__(self, delay: float, answer: bytes | None = None) -> None:
        super().__init__(body=0.1, tail=0.0)
        self.delay = delay
        self.answer = answer or encode_have(Bitfield.full(LAYOUT.count)).encode()
        self.watches: list[tuple[float, str, int]] = []

    async def watch(self, address: str, digest: Digest, known: int) -> bytes | None:
        self.watches.append((trio.current_time(), address, known))
        await trio.sleep(self.delay)
        return self.answer


async def test_a_parent_that_offers_nothing_more_is_watched_for_its_next_piece(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = Watchable(delay=0.5)
    download = await fill(tmp_path, Outdated(zone=""), pieces)
    assert download.have.is_full()
    # piece 0 took 0.1 s; then the parent, offering nothing more, was watched (knowing of
    # one piece), and its answer at 0.6 s brought the rest
    assert pieces.watches[0] == (pytest.approx(0.1), "10.0.0.8:65003", 1)
    assert sorted(pieces.starts) == list(range(LAYOUT.count))
    assert min(t for i, t in pieces.starts.items() if i) == pytest.approx(0.6)


async def test_a_parent_in_another_zone_is_not_watched(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = Watchable(delay=0.5)
    with pytest.raises(BaseExceptionGroup) as raised:
        await fill(tmp_path, Outdated(zone="z1"), pieces)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived")
    assert pieces.watches == [] and sorted(pieces.starts) == [0]


async def test_a_parent_whose_watch_says_nothing_readable_is_not_watched_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = Watchable(delay=0.0, answer=b"not base64!")
    with pytest.raises(BaseExceptionGroup) as raised:
        await fill(tmp_path, Outdated(zone=""), pieces)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived for 15 s")
    assert len(pieces.watches) == 1


class Refusing(Watchable):
    """A watch is refused as `error` says."""

    def __init__(self, error: PieceFetchError) -> None:
        super().__init__(delay=0.0)
        self.error = error

    async def watch(self, address: str, digest: Digest, known: int) -> bytes | None:
        self.watches.append((trio.current_time(), address, known))
        raise self.error


@pytest.mark.parametrize(
    ("error", "again"),
    [
        (PieceFetchError("404", not_found=True), False),  # an older peer, or no such blob
        (PieceFetchError("400"), False),
        (PieceFetchError("503", busy=True), True),  # once a second until it gives up
        (PieceFetchError("refused", unreachable=True), True),
    ],
)
async def test_a_refused_watch_is_tried_again_only_if_the_parent_was_busy_or_unreachable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, error: PieceFetchError, again: bool
) -> None:
    pieces = Refusing(error)
    with pytest.raises(BaseExceptionGroup) as raised:
        await fill(tmp_path, Outdated(zone=""), pieces)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived for 15 s")
    times = [t for t, _, _ in pieces.watches]
    if again:
        assert 10 <= len(times) <= 16
        assert all(b - a > 1.0 - 1e-6 for a, b in itertools.pairwise(times))
    else:
        assert len(times) == 1


async def test_the_seeder_is_not_watched(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # the parent at the supernode's own address is its seeder: its offers are claims
    pieces = Watchable(delay=0.5)
    with pytest.raises(BaseExceptionGroup) as raised:
        await fill(tmp_path, Outdated(zone="", address="sn.test:80"), pieces)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived")
    assert pieces.watches == [] and sorted(pieces.starts) == [0]


async def test_no_parent_is_watched_unless_the_daemon_is_told_to(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pieces = Watchable(delay=0.5)
    with pytest.raises(BaseExceptionGroup) as raised:
        await fill(tmp_path, Outdated(zone=""), pieces, watch=False)
    assert raised.group_contains(FillerGaveUp, match="no piece arrived")
    assert pieces.watches == [] and sorted(pieces.starts) == [0]
    assert SwarmConfig(peer_id="me", advertise="10.0.0.1:65003").watch_parents is False
