"""What the lean HTTP paths share: `supernode.controlhttp` (control POSTs) and
`p2pd.piecehttp` (piece GETs) each serve one request shape straight off a kept-alive socket and
hand anything else, with the bytes read so far, to the general server.

`LeanConnection` holds the connection's state and the parts both paths run alike: the one
watchdog task per connection that ends a wait for a request after ``head_timeout``, the loop's
exits (closed, too slow, broken), and reading up to the end of a head. Each path supplies how
it reads (`_receive`), what a head of its shape starts with (`_plausible`) and its loop
(`_serve`).
"""

from __future__ import annotations

import logging
import re

import trio

from p2pd.http.server import ServerLimits

HEAD_END = b"\r\n\r\n"
BARE_LF = re.compile(rb"(?<!\r)\n")  # a line ended by LF alone: h11 takes such heads
# Requests served without waiting before the loop yields all the same, so that a client that
# pipelines without pause cannot starve the others.
STREAK = 16


class Closed(Exception):
    """The client closed the connection."""


class LeanConnection:
    def __init__(self, limits: ServerLimits, client: str, log: logging.Logger) -> None:
        self.limits = limits
        self.log = log  # the path's own logger
        self.client = client
        self.buffer = bytearray()
        self.streak = 0  # requests served without waiting: yield now and then all the same
        self.waited = False
        self.scope = trio.CancelScope()  # around _serve: cancelled by _watch
        self.since: float | None = None  # when the request now awaited was first awaited

    async def run(self) -> bytes | None:
        """Serve requests until the connection ends (None: close it) or one is not of this
        path's shape (the bytes read so far, for the general server)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            handed = await self._run()
            nursery.cancel_scope.cancel()
        return handed

    async def _watch(self) -> None:
        """Cancel `self.scope` once a request has been awaited for ``head_timeout``.

        Why a watchdog: a cancel scope per awaited request (``move_on_after``), or a deadline
        moved at each one, was a twentieth of a lone announce's CPU; `_serve` only notes when
        it starts and stops waiting. The watchdog wakes at the due time of the wait it saw, or
        ``head_timeout`` after it saw none, so it is never late. (A request that comes in the
        very scheduler tick its wait falls due may still be served, as it was under
        ``move_on_after``; the connection then ends at its next wait.)"""
        timeout = self.limits.head_timeout
        while True:
            if self.since is None:
                await trio.sleep(timeout)
                continue
            due = self.since + timeout
            if trio.current_time() >= due:
                self.scope.cancel()
                return
            await trio.sleep_until(due)

    async def _run(self) -> bytes | None:
        try:
            with self.scope:
                return await self._serve()
            # only the watchdog cancels the scope: too slow, or idle too long
            self._dropped()
            return None
        except Closed:
            return None
        except trio.TooSlowError:
            self.log.info("response to %s timed out", self.client)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None

    def _dropped(self) -> None:
        """The watchdog ended the connection (a path may log it)."""

    async def _serve(self) -> bytes | None:
        raise NotImplementedError

    async def _receive(self) -> None:
        """Append what the client sent next to `self.buffer`; `Closed` at its end."""
        raise NotImplementedError

    def _plausible(self, buffer: bytearray) -> bool:
        """Whether an incomplete head may still be of this path's shape."""
        raise NotImplementedError

    async def _until_head(self) -> int:
        """Where the head ends; -1 if it is over the size limit, or is plainly not of this
        path's shape already (no reason to wait for the rest of it)."""
        buffer = self.buffer
        while True:
            end = buffer.find(HEAD_END)
            if end >= 0:
                return end
            if (
                len(buffer) > self.limits.max_head
                or not self._plausible(buffer)
                or BARE_LF.search(buffer)
            ):
                return -1
            await self._receive()
