"""This host's side of the control protocol: talking to the supernode in charge of a blob.

Each blob has one supernode in charge, chosen by rendezvous hashing of its digest over the
configured list (`rank_supernodes`): every host ranks the list the same way without talking to
anyone, a supernode added or removed moves only its own share of blobs, and the next one in a
blob's ranking is its failover. A `TrackerSession` registers with the first supernode that
answers and sticks to it; when that one stops answering, the session registers again with the
next one in the ranking, carrying the pieces it already holds.

Errors: `TrackerUnavailable` when no supernode answers (the caller falls back to the registry),
`TrackerRejected` when one answers with a protocol Error (its code and message).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TypeVar

import httpx
import xxhash

from p2pd import wire
from p2pd.clusterauth import HEADER, ClusterAuth
from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-msgpack"

M = TypeVar("M", wire.Assignment, wire.Ack)


class TrackerUnavailable(Exception):
    """No supernode for this blob answered."""


class TrackerRejected(Exception):
    """A supernode refused a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def rank_supernodes(supernodes: list[str], digest: Digest) -> list[str]:
    """The supernodes in the order a blob tries them (highest rendezvous score first)."""
    return sorted(
        supernodes,
        key=lambda url: (-xxhash.xxh3_64_intdigest(f"{url}|{digest}".encode()), url),
    )


class TrackerSession:
    def __init__(
        self,
        client: httpx.AsyncClient,
        supernodes: list[str],
        register: wire.Register,
        timeout: float = 10.0,
        auth: ClusterAuth | None = None,
    ) -> None:
        self.client = client
        self.auth = auth or ClusterAuth(None)
        self.ranking = rank_supernodes(supernodes, register.digest)
        self.template = register
        self.timeout = timeout
        self.current: str | None = None
        self.messages = 0

    @property
    def digest(self) -> Digest:
        return self.template.digest

    @property
    def peer_id(self) -> str:
        return self.template.peer_id

    async def register(self, have: Bitfield | None, *, move_on: bool = False) -> wire.Assignment:
        """Register with the first supernode that answers: the current one first (or, with
        `move_on`, the one after it, because it stopped answering), then the ranking."""
        errors = []
        start = self.ranking.index(self.current) if self.current in self.ranking else 0
        if move_on and self.current in self.ranking:
            start += 1
        order = self.ranking[start:] + self.ranking[:start]
        for url in order:
            held = have if have is not None and not have.is_empty() else None
            msg = dataclasses.replace(self.template, have=held)
            try:
                reply = await self._post(url, "register", msg, wire.Assignment)
            except TrackerUnavailable as exc:
                errors.append(str(exc))
                continue
            self.current = url
            return reply
        raise TrackerUnavailable("; ".join(errors) or "no supernode configured")

    async def announce(
        self, pieces: list[int], manifest_known: int, have: Bitfield, want_parents: bool = True
    ) -> wire.Assignment:
        msg = wire.Announce(self.digest, self.peer_id, tuple(pieces), manifest_known, want_parents)
        try:
            return await self._post(self._url(), "announce", msg, wire.Assignment)
        except TrackerUnavailable as exc:
            log.info("supernode %s lost (%s); failing over", self.current, exc)
            return await self.register(have, move_on=True)
        except TrackerRejected as exc:
            if exc.code not in ("unknown_task", "unknown_peer"):
                raise
            # the supernode restarted (or expired us): join it again with what we hold
            return await self.register(have)

    async def report(self, parent_id: str, index: int, reason: str) -> wire.Assignment | None:
        msg = wire.Report(self.digest, self.peer_id, parent_id, index, reason)
        try:
            return await self._post(self._url(), "report", msg, wire.Assignment)
        except (TrackerUnavailable, TrackerRejected) as exc:
            log.warning("could not report %s for piece %d: %s", parent_id, index, exc)
            return None

    async def leave(self) -> None:
        if self.current is None:
            return
        try:
            await self._post(self.current, "leave", wire.Leave(self.digest, self.peer_id), wire.Ack)
        except (TrackerUnavailable, TrackerRejected) as exc:
            log.info("leave of %s: %s", self.digest, exc)

    def _url(self) -> str:
        if self.current is None:
            raise TrackerUnavailable("not registered")
        return self.current

    async def _post(self, base: str, verb: str, msg: wire.Message, expect: type[M]) -> M:
        self.messages += 1
        body = wire.encode(msg)
        headers = {"content-type": CONTENT_TYPE}
        signature = self.auth.sign("POST", f"/v1/{verb}", body)
        if signature:
            headers[HEADER] = signature
        try:
            response = await self.client.post(
                f"{base}/v1/{verb}", content=body, headers=headers, timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            raise TrackerUnavailable(f"{base}: {exc!r}") from exc
        if response.status_code >= 500:
            raise TrackerUnavailable(f"{base}: answered {response.status_code}")
        try:
            reply = wire.decode(response.content, (wire.Assignment, wire.Ack, wire.Error))
        except wire.ProtocolError as exc:
            raise TrackerUnavailable(f"{base}: unreadable reply: {exc}") from exc
        if isinstance(reply, wire.Error):
            raise TrackerRejected(response.status_code, reply.code, reply.message)
        if response.status_code != 200 or not isinstance(reply, expect):
            raise TrackerUnavailable(
                f"{base}: answered {response.status_code} {type(reply).__name__} to {verb}"
            )
        return reply
