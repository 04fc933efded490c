"""The daemon's announce coalescer, on a virtual clock against fake supernodes in memory.

First the `Coalescer` alone, with scripted members: who rides along, what each item's answer
becomes (per-item recovery exactly as a lone announce's), failover, and the 404 fallback. Then
real `Swarm` downloads of three blobs at once: one message per tick carries all three.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from p2pd import offload, wire
from p2pd.blobs import BlobSource, Download
from p2pd.coalescer import Coalescer, Item, Outcome
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import piece_hash
from p2pd.core.session import SessionConfig
from p2pd.peers import PieceClient
from p2pd.store import BlobStore
from p2pd.swarm import Swarm, SwarmConfig
from p2pd.tracker import (
    ControlClient,
    TrackerRejected,
    TrackerSession,
    TrackerUnavailable,
    rank_supernodes,
)

A, B = "http://sn-a.test:65002", "http://sn-b.test:65002"  # nothing is sent: fakes in memory
PIECE = 1000
LAYOUT = PieceLayout(4 * PIECE, PIECE)


@dataclass
class Blob:
    digest: Digest
    data: bytes
    hashes: bytes


def blobs(k: int, first: str = A) -> list[Blob]:
    """`k` blobs whose supernode ranking puts `first` first (so they share a supernode)."""
    out: list[Blob] = []
    seed = 0
    while len(out) < k:
        seed += 1
        data = random.Random(seed).randbytes(LAYOUT.total_size)
        d = Digest.from_bytes(hashlib.sha256(data).digest())
        if rank_supernodes([A, B], d)[0] != first:
            continue
        spans = map(LAYOUT.span, range(LAYOUT.count))
        out.append(Blob(d, data, b"".join(piece_hash(data[o : o + n]) for o, n in spans)))
    return out


class Supernodes(ControlClient):
    """Fake supernodes by URL. Every blob is ready with one parent, "seed", holding it all.

    ``down``: URLs answering 503; ``old``: URLs without the batch route (404 in plain text,
    as the h11 server answers an unknown route); ``script[digest]``: error codes the next
    announces of that blob get, one each (alone or as a batch item); ``delay``: seconds every
    answer takes."""

    def __init__(self, known: list[Blob]) -> None:
        super().__init__(httpx.AsyncClient())
        self.blobs = {b.digest: b for b in known}
        self.calls: list[tuple[float, str, wire.Message]] = []
        self.down: set[str] = set()
        self.old: set[str] = set()
        self.script: dict[Digest, list[str]] = {}
        self.delay = 0.0

    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if base in self.down:
            return 503, b""
        if path == "/v1/announce-batch" and base in self.old:
            return 404, b"no route '/v1/announce-batch'\n"
        msg = wire.decode(body)
        assert path == {"announce_batch": "/v1/announce-batch"}.get(msg.TYPE, f"/v1/{msg.TYPE}")
        self.calls.append((trio.current_time(), base, msg))
        await trio.sleep(self.delay)
        if isinstance(msg, wire.Leave):
            return 200, wire.encode(wire.Ack())
        if isinstance(msg, wire.Register):
            return 200, wire.encode(self.assignment(msg.digest))
        if isinstance(msg, wire.Announce):
            answer = self.answer(msg)
            return (200 if isinstance(answer, wire.Assignment) else 404), wire.encode(answer)
        assert isinstance(msg, wire.AnnounceBatch)
        return 200, wire.encode(wire.BatchReply(tuple(self.answer(i) for i in msg.items)))

    def answer(self, msg: wire.Announce) -> wire.Assignment | wire.Error:
        codes = self.script.get(msg.digest)
        if codes:
            return wire.Error(codes.pop(0), "scripted")
        return self.assignment(msg.digest)

    def assignment(self, digest: Digest) -> wire.Assignment:
        full = Bitfield.full(LAYOUT.count)
        return wire.Assignment(
            digest=digest,
            state="ready",
            size=LAYOUT.total_size,
            piece_size=PIECE,
            manifest_start=0,
            hashes=self.blobs[digest].hashes,
            sealed=True,
            parents=(wire.ParentInfo("seed", "10.0.0.9:65003", "", full),),
        )

    def kinds(self, since: int = 0) -> list[tuple[str, str]]:
        """(URL, what) of each call: register, announce, or batch:<digest indexes>."""
        order = list(self.blobs)
        out = []
        for _, url, msg in self.calls[since:]:
            if isinstance(msg, wire.AnnounceBatch):
                what = "batch:" + ",".join(str(order.index(i.digest)) for i in msg.items)
            else:
                what = f"{msg.TYPE}:{order.index(msg.digest)}"  # type: ignore[union-attr]
            out.append((url.split("//")[1][:4], what))
        return out


@dataclass(eq=False)
class Member:
    """A scripted download: rides along while `ready`, records what it is delivered."""

    tracker: TrackerSession
    ready: bool = True
    delivered: list[Outcome] = field(default_factory=list)

    def item(self) -> Item:
        """Its announce, taken: it counts as announcing until something else says so."""
        self.ready = False
        return Item(self.tracker, [1], 4, Bitfield(4, 0b10), True)

    def ride_along(self, now: float) -> Item | None:
        return self.item() if self.ready else None

    def deliver(self, item: Item, outcome: Outcome) -> None:
        assert item.session is self.tracker
        self.delivered.append(outcome)


async def members(fake: Supernodes, known: list[Blob], peer: str = "me") -> list[Member]:
    out = []
    for blob in known:
        register = wire.Register(
            blob.digest, LAYOUT.total_size, peer, "10.0.0.1:65003", "", 8,
            "http://registry.test", "library/x", None, None,
        )  # fmt: skip
        session = TrackerSession(fake, [A, B], register)
        await session.register(None)
        out.append(Member(session))
    return out


def joined(crew: list[Member]) -> Coalescer:
    """A coalescer that every member of `crew` has joined."""
    coalescer = Coalescer()
    for m in crew:
        coalescer.join(m)
    return coalescer


def outcome_digest(outcome: Outcome) -> Digest | str:
    return outcome.digest if isinstance(outcome, wire.Assignment) else type(outcome).__name__


async def test_the_ready_members_at_the_same_supernode_ride_along(
    autojump_clock: trio.testing.MockClock,
) -> None:
    at_a, at_b = blobs(4, A), blobs(1, B)
    fake = Supernodes(at_a + at_b)
    crew = await members(fake, at_a + at_b)
    crew[2].ready = False  # e.g. its own announce is in flight
    coalescer = joined(crew)
    start = len(fake.calls)
    await coalescer.announce(crew[1], crew[1].item())
    # one message to A: the caller's announce first, then the ready members at A
    assert fake.kinds(start) == [("sn-a", "batch:1,0,3")]
    assert [outcome_digest(o) for m in crew for o in m.delivered] == [
        at_a[0].digest, at_a[1].digest, at_a[3].digest,
    ]  # fmt: skip
    assert crew[4].ready and (coalescer.batches, coalescer.batched) == (1, 3)

    # alone (nobody else ready): the plain announce route
    start = len(fake.calls)
    await coalescer.announce(crew[2], crew[2].item())
    assert fake.kinds(start) == [("sn-a", "announce:2")]
    # a member that left rides no more
    coalescer.leave(crew[4])
    crew[0].ready = True
    start = len(fake.calls)
    await coalescer.announce(crew[3], crew[3].item())
    assert fake.kinds(start) == [("sn-a", "batch:3,0")]


async def test_each_item_recovers_as_a_lone_announce_would(
    autojump_clock: trio.testing.MockClock,
) -> None:
    known = blobs(5)
    fake = Supernodes(known)
    crew = await members(fake, known)
    coalescer = joined(crew)
    d = [b.digest for b in known]
    fake.script = {
        d[1]: ["unknown_task"],  # the supernode restarted: register again, same supernode
        d[2]: ["unknown_peer"],  # it expired us: the same
        d[3]: ["bad_request"],  # that download's refusal alone
        d[4]: ["deferred"],  # no room in the reply: sent again alone
    }
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    kinds = fake.kinds(start)
    assert kinds[0] == ("sn-a", "batch:0,1,2,3,4")
    assert sorted(kinds[1:]) == [("sn-a", "announce:4"), ("sn-a", "register:1"),
                                 ("sn-a", "register:2")]  # fmt: skip
    register = fake.calls[start + 1 :]
    assert all(isinstance(m, wire.Register) and m.have == Bitfield(4, 0b10)
               for _, _, m in register if m.TYPE == "register")  # fmt: skip
    got = [m.delivered for m in crew]
    assert [outcome_digest(o) for (o,) in got] == [d[0], d[1], d[2], "TrackerRejected", d[4]]
    rejected = got[3][0]
    assert isinstance(rejected, TrackerRejected) and rejected.code == "bad_request"
    assert all(m.tracker.current == A for m in crew)


async def test_a_lost_supernode_fails_every_item_over_on_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    known = blobs(3)
    fake = Supernodes(known)
    crew = await members(fake, known)
    coalescer = joined(crew)
    fake.down.add(A)
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    # the batch got no answer (not recorded: A is down); each registers with B, its next
    assert sorted(fake.kinds(start)) == [("sn-b", f"register:{i}") for i in range(3)]
    assert [outcome_digest(m.delivered[0]) for m in crew] == [b.digest for b in known]
    assert all(m.tracker.current == B for m in crew)
    # with B gone too, each download learns that no supernode answers
    fake.down.add(B)
    for m in crew:
        m.ready = True
    await coalescer.announce(crew[0], crew[0].item())
    assert all(isinstance(m.delivered[1], TrackerUnavailable) for m in crew)


async def test_a_supernode_without_the_batch_route_gets_lone_announces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    known = blobs(3)
    fake = Supernodes(known)
    fake.old.add(A)
    crew = await members(fake, known)
    coalescer = Coalescer(recheck_after=60.0)
    for m in crew:
        coalescer.join(m)
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    # the 404 is not recorded by the fake: what follows are the three announces, alone
    assert sorted(fake.kinds(start)) == [("sn-a", f"announce:{i}") for i in range(3)]
    assert [outcome_digest(m.delivered[0]) for m in crew] == [b.digest for b in known]
    # until recheck_after, no batch is tried and nobody rides along
    for m in crew:
        m.ready = True
    await trio.sleep(30)
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    assert fake.kinds(start) == [("sn-a", "announce:0")]
    # then the supernode may have been upgraded: a batch again
    fake.old.clear()
    await trio.sleep(31)
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    assert fake.kinds(start) == [("sn-a", "batch:0,1,2")]


async def test_a_download_that_ended_meanwhile_is_not_registered_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    known = blobs(2)
    fake = Supernodes(known)
    crew = await members(fake, known)
    coalescer = joined(crew)
    fake.script = {known[1].digest: ["unknown_peer"]}
    fake.delay = 1.0
    start = len(fake.calls)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.announce, crew[0], crew[0].item())
        await trio.sleep(0.5)
        coalescer.leave(crew[1])  # it left (and told the supernode) while the batch was out
    assert fake.kinds(start) == [("sn-a", "batch:0,1")]
    assert isinstance(crew[1].delivered[0], TrackerUnavailable)
    assert isinstance(crew[0].delivered[0], wire.Assignment)
    # the same for a lone announce
    fake.script = {known[0].digest: ["unknown_peer"]}
    start = len(fake.calls)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(coalescer.announce, crew[0], crew[0].item())
        await trio.sleep(0.5)
        coalescer.leave(crew[0])
    assert fake.kinds(start) == [("sn-a", "announce:0")]
    assert isinstance(crew[0].delivered[1], TrackerUnavailable)
    # while it runs, a lone announce recovers as TrackerSession.announce does
    coalescer.join(crew[0])
    fake.script = {known[0].digest: ["unknown_task"]}
    start = len(fake.calls)
    await coalescer.announce(crew[0], crew[0].item())
    assert fake.kinds(start) == [("sn-a", "announce:0"), ("sn-a", "register:0")]
    assert isinstance(crew[0].delivered[2], wire.Assignment)


# -- real downloads -----------------------------------------------------------------------------


class Pieces(PieceClient):
    """Every piece of every blob takes `seconds`; the blob's bytes come from `known`."""

    def __init__(self, known: list[Blob], seconds: float) -> None:
        super().__init__()
        self.data = {b.digest: b.data for b in known}
        self.seconds = seconds

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
        await trio.sleep(self.seconds)
        offset, length = LAYOUT.span(index)
        buffer[:] = self.data[digest][offset : offset + length]


async def pull_all(
    tmp_path: Path, fake: Supernodes, known: list[Blob], starts: tuple[float, ...] = ()
) -> list[Download]:
    """Pull `known` in one swarm, download i starting at ``starts[i]`` (default 0)."""
    store = BlobStore(tmp_path)
    downloads = [Download(b.digest, store.open_partial(b.digest, LAYOUT)) for b in known]
    source = BlobSource("http://registry.test", "library/x", None, LAYOUT.total_size)
    config = SwarmConfig(
        peer_id="me",
        advertise="10.0.0.1:65003",
        seed_time=0.0,
        # the timing these tests reason about (announce timers of 0.2 s, idle gaps from
        # 0.05 s), whatever the defaults are tuned to
        session=SessionConfig(
            early_bytes=100 * PIECE,
            early_announce_interval=0.2,
            announce_interval=1.0,
            min_announce_gap=0.05,
        ),
    )

    async def pull(swarm: Swarm, download: Download, at: float) -> None:
        await trio.sleep(at)
        await swarm.fill(download, source)

    with offload.inline():
        async with trio.open_nursery() as nursery:
            swarm = Swarm(config, fake, Pieces(known, 1.0), [A, B], nursery, random.Random(1))
            async with trio.open_nursery() as pulls:
                for i, download in enumerate(downloads):
                    pulls.start_soon(pull, swarm, download, starts[i] if starts else 0.0)
            nursery.cancel_scope.cancel()  # the seeding that follows is not under test
    return downloads


@pytest.mark.parametrize("starts", [(0.0, 0.0, 0.0), (0.0, 0.05, 0.13)], ids=["same", "apart"])
async def test_three_downloads_announce_in_one_message_per_tick(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, starts: tuple[float, ...]
) -> None:
    known = blobs(3)
    fake = Supernodes(known)
    downloads = await pull_all(tmp_path, fake, known, starts)
    assert all(d.have.is_full() for d in downloads)
    # A piece takes 1 s and each download's announce timer 0.2 s: alone they would send
    # three announces per tick. Once the timers are aligned (by the first ride along), every
    # tick until the last pieces sends one message carrying all three.
    calls = [(t, what) for (t, _, _), (_, what) in zip(fake.calls, fake.kinds(), strict=True)]
    ticks = [(t, what) for t, what in calls if 1.4 <= t < 3.9]
    assert len(ticks) == 13  # 1.4, 1.6, ..., 3.8
    for t, what in ticks:
        assert sorted(what.removeprefix("batch:").split(",")) == ["0", "1", "2"], (t, what)
    assert [b - a for (a, _), (b, _) in itertools.pairwise(ticks)] == [pytest.approx(0.2)] * 12
    alone = [what for _, what in calls if what.startswith("announce")]
    assert sorted(alone) == ["announce:0", "announce:1", "announce:2"]  # the final ones
    # and every piece of every blob reached the supernode
    for i, blob in enumerate(known):
        told: list[int] = []
        for _, _, msg in fake.calls:
            if isinstance(msg, wire.AnnounceBatch):
                told += [p for a in msg.items if a.digest == blob.digest for p in a.pieces]
            elif isinstance(msg, wire.Announce) and msg.digest == blob.digest:
                told += msg.pieces
        assert sorted(told) == list(range(LAYOUT.count)), i


@pytest.mark.parametrize("old", [False, True], ids=["batching", "old-supernode"])
async def test_downloads_complete_against_either_supernode(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, old: bool
) -> None:
    known = blobs(3)
    fake = Supernodes(known)
    if old:
        fake.old.add(A)
    downloads = await pull_all(tmp_path, fake, known)
    assert all(d.have.is_full() for d in downloads)
    kinds = [what for _, what in fake.kinds()]
    batches = sum(what.startswith("batch") for what in kinds)
    alone = sum(what.startswith("announce") for what in kinds)
    # 4 s of downloads at a tick per 0.2 s: ~16 ticks, the last announces alone either way
    assert (batches, alone) == ((0, alone) if old else (batches, 3))
    assert (alone if old else batches) >= (3 * 15 if old else 15)
