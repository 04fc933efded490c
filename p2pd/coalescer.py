"""One message per supernode for the announces of all of this host's downloads it tracks.

Why: an image of L layers is L downloads, each its own tracker session; announcing them one by
one costs the supernode L HTTP messages where one would do (its time goes mostly to the
message, not the announce: `p2p-bench dataplane`, control batches), and the supernode paces
every host by what its calls cost (`p2pd.core.scheduler.Scheduler.pace`).

How: every swarm download joins the daemon's `Coalescer` while it runs. When one of them is due
to announce, the other downloads registered with the same supernode that may announce now
(`DownloadSession.may_ride_along`: not complete, half their own gap passed, no announce of
theirs in flight) hand over theirs, and all go as one `wire.AnnounceBatch`; each reply item goes
back to its own download. Nothing waits for company: the due download never waits for others.
A batch runs in the daemon's nursery, not in any one download's, so a download that ends or
gives up meanwhile does not take the others' answers with it.

Rules, the same per item as for a lone announce (`TrackerSession.announce`):

* An ``unknown_task`` / ``unknown_peer`` item registers that download again with the same
  supernode; any other Error item is that download's refusal alone.
* A lost supernode (no answer, 5xx, garbled reply) fails every item over to its next
  supernode, each on its own, as each would have alone.
* A ``deferred`` item (the supernode's reply had no room for it) is sent again alone.
* A supernode without the batch route (404: an older version during a rolling upgrade) gets
  lone announces, the batch's items all at once, and no batch for `recheck_after` seconds.
* A batch that cannot be encoded (over the message size limit) goes as lone announces too.
* Nothing is done on behalf of a download that ended while its announce was out: no register
  again, no failover (it may have left the supernode already).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pd import wire
from p2pd.core.bitfield import Bitfield
from p2pd.tracker import (
    BatchUnsupported,
    TrackerRejected,
    TrackerSession,
    TrackerUnavailable,
)

log = logging.getLogger(__name__)

Outcome = wire.Assignment | TrackerRejected | TrackerUnavailable
# what came back for one announce, before any recovery; None: send it again alone
Answer = wire.Assignment | wire.Error | TrackerRejected | TrackerUnavailable | None


@dataclass(frozen=True, slots=True)
class Item:
    """One download's announce, and what it needs should it have to recover."""

    session: TrackerSession
    pieces: list[int]
    manifest_known: int
    have: Bitfield  # what the download holds, for registering again
    want_parents: bool


class Member(Protocol):
    """A download taking part: the swarm's run of one blob."""

    @property
    def tracker(self) -> TrackerSession: ...

    def ride_along(self, now: float) -> Item | None:
        """Its announce, taken now (it then counts as announcing), if it may send one."""

    def deliver(self, item: Item, outcome: Outcome) -> None:
        """The answer to its announce `item` (taken by `ride_along` or its own)."""


Crew = list[tuple["Member", Item]]  # the members whose announces go in one message


class Coalescer:
    def __init__(
        self, *, recheck_after: float = 300.0, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.recheck_after = recheck_after
        self.clock = clock
        self._members: dict[int, Member] = {}  # by id(), in joining order
        self._lone_until: dict[str, float] = {}  # supernodes without the batch route
        self.batches = 0  # batch messages sent
        self.batched = 0  # announces that went in them

    def join(self, member: Member) -> None:
        self._members[id(member)] = member

    def leave(self, member: Member) -> None:
        self._members.pop(id(member), None)

    async def announce(self, own: Member, item: Item) -> None:
        """Send `item` (`own`'s announce, already taken) with whatever announces of other
        members may ride along, and deliver every outcome to its member."""
        await self.send(self.gather(own, item))

    def gather(self, own: Member, item: Item) -> Crew:
        """`own`'s announce `item` and those of the members that may ride along with it,
        taken now. Synchronous, so that members whose timers fall due at the same instant
        find their announces taken rather than each sending its own."""
        url = item.session.current
        now = self.clock()
        crew: Crew = [(own, item)]
        if url is None or self._lone_until.get(url, -1.0) > now:
            return crew
        for member in list(self._members.values()):
            if len(crew) >= wire.MAX_BATCH:
                break
            if member is own or member.tracker.current != url:
                continue
            ride = member.ride_along(now)
            if ride is not None:
                crew.append((member, ride))
        return crew

    async def send(self, crew: Crew) -> None:
        """Send a `gather`ed crew's announces, one message for all (a lone announce for a
        crew of one), and deliver each outcome to its member."""
        url = crew[0][1].session.current
        answers: list[Answer]
        if len(crew) == 1 or url is None:
            answers = [await _once(crew[0][1])]
        else:
            answers = await self._send(url, [i for _, i in crew])
        async with trio.open_nursery() as nursery:
            for (member, it), answer in zip(crew, answers, strict=True):
                nursery.start_soon(self._settle, member, it, answer)

    async def _send(self, url: str, items: list[Item]) -> list[Answer]:
        """Each item's answer to one batch; None: send that one alone."""
        try:
            announces = [
                i.session.announce_message(i.pieces, i.manifest_known, i.want_parents)
                for i in items
            ]
            batch = wire.AnnounceBatch(tuple(announces))
            wire.encode(batch)  # over the size limit: lone announces (ProtocolError)
        except wire.ProtocolError as exc:
            log.info("announces to %s go alone: %s", url, exc)
            return [None] * len(items)
        self.batches += 1
        self.batched += len(items)
        try:
            return list(await items[0].session.announce_batch(url, batch))
        except BatchUnsupported:
            log.info("supernode %s takes no batches; announcing alone", url)
            self._lone_until[url] = self.clock() + self.recheck_after
            return [None] * len(items)
        except (TrackerUnavailable, TrackerRejected) as exc:
            return [exc] * len(items)

    async def _settle(self, member: Member, item: Item, answer: Answer) -> None:
        outcome: Outcome
        if isinstance(answer, wire.Assignment):
            outcome = answer
        elif id(member) not in self._members:
            # it ended (complete, or gave up and left) meanwhile: nothing more on its behalf
            outcome = TrackerUnavailable("the download ended before its answer")
        elif answer is None or (isinstance(answer, wire.Error) and answer.code == "deferred"):
            outcome = await _alone(item)
        else:
            try:
                outcome = await item.session.recover(_as_exception(answer), item.have)
            except (TrackerRejected, TrackerUnavailable) as exc:
                outcome = exc
        member.deliver(item, outcome)


def _as_exception(
    answer: wire.Error | TrackerRejected | TrackerUnavailable,
) -> TrackerRejected | TrackerUnavailable:
    if isinstance(answer, wire.Error):
        return TrackerRejected(200, answer.code, answer.message)
    return answer


async def _alone(item: Item) -> Outcome:
    try:
        return await item.session.announce(
            item.pieces, item.manifest_known, item.have, item.want_parents
        )
    except (TrackerRejected, TrackerUnavailable) as exc:
        return exc


async def _once(item: Item) -> Answer:
    """A lone announce without recovery: `_settle` recovers, if its member still runs."""
    try:
        return await item.session.announce_once(item.pieces, item.manifest_known, item.want_parents)
    except (TrackerRejected, TrackerUnavailable) as exc:
        return exc
