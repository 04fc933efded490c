"""Blocking work (hashing, file writes, fsync) off the event loop, or inline when asked.

The daemons hash and write pieces in worker threads so that transfers keep flowing meanwhile.
The full-stack storm engine (`benchmarks/storm/full`) runs a hundred daemons in one trio run on
a virtual clock, where a thread would be real time the clock cannot see and a source of
nondeterminism: inside `inline()` the same calls run on the trio thread instead (the virtual
clock then charges them nothing, which is what a storm's model of time wants).

The switch is a context variable, so it covers exactly the tasks spawned under it; everything
else keeps the threads.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

T = TypeVar("T")

_INLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("p2pd_offload_inline", default=False)


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a worker thread (inline under `inline()`); a checkpoint either way."""
    if _INLINE.get():
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


@contextlib.contextmanager
def inline() -> Iterator[None]:
    """Run `run_sync` calls of this task and of the tasks it spawns on the trio thread."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)
