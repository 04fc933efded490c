"""An in-memory network for trio: byte streams between named hosts, paced by `Network`.

The full-stack storm engine runs every daemon of a storm in one trio run on a virtual clock
(`trio.testing.MockClock` with autojump). Their sockets are replaced by `MemoryStream` pairs
that a `Fabric` connects; every ``send_all`` between two hosts is one *flow* on the fast
simulator's own network model (`benchmarks.storm.network.Network`: per-host upload and download
capacity shared among active flows by water-filling, zone links), and its bytes reach the other
end when the model says the flow is complete. Using the very same model is deliberate: when the two
engines disagree, the difference is in the daemons' code (HTTP, the swarm loop, the seeder),
not in two ideas of a network.

Rules:
- A host sending to itself (a runtime talking to its own mirror on loopback) costs no time,
  nor does a send smaller than ``free_below`` bytes (0 by default: every byte is paced). The
  fast engine's control messages and request heads take no time; ``free_below`` lets the full
  engine do the same, to tell what their time on a congested link does to a storm.
- ``send_all`` returns once its bytes are delivered (store and forward per call). The piece
  server sends a piece as one call (`p2pd.http.server.sendfile` reads at most 4 MiB at a
  time), which is the fast simulator's flow of one piece.
- Closing one end (``aclose``) is a reset for the other: a send in flight is cut (its flow is
  cancelled, so the bandwidth frees up at once, as the simulator's cancel does) and raises
  `trio.BrokenResourceError`; the other end's reads see the end of the stream.
- `Fabric.remove_host` is a crash: its flows are cut, its streams broken, connections to it
  refused from then on.
- No threads, no sockets, no wall clock: time is `trio.current_time()`, which the
  `Fabric` keeps monotonic for the model (a flow due at t completes at max(clock, t)).
"""

from __future__ import annotations

import errno
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from benchmarks.storm.network import Network

#: Largest chunk a `receive_some` without a limit returns.
DEFAULT_RECEIVE = 1 << 22


class _Wait:
    """One flow's completion, as the sending task waits for it."""

    __slots__ = ("broken", "event", "flow", "pipe", "size")

    def __init__(self, pipe: _Pipe, size: int) -> None:
        self.event = trio.Event()
        self.broken = False
        self.flow = -1
        self.pipe = pipe
        self.size = size


@dataclass(eq=False)
class _Pipe:
    """One direction of a connection: src host sends, dst host reads."""

    src: int
    dst: int
    # Delivered chunks, each as sent (no copy), and how far the reader is into the first.
    chunks: deque[bytes] = field(default_factory=deque)
    offset: int = 0
    eof: bool = False  # the writer closed or half-closed: reads end after the buffer
    reset: bool = False  # the reader went away (or a host crashed): writes fail
    sending: _Wait | None = None
    readable: trio.Event = field(default_factory=trio.Event)

    def wake(self) -> None:
        self.readable.set()
        self.readable = trio.Event()

    def break_(self) -> None:
        """Reader gone: writes fail from now on, a send in flight is cut."""
        self.reset = True
        self.wake()


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection; see the module docstring for the semantics."""

    def __init__(self, fabric: Fabric, out: _Pipe, inp: _Pipe, peer: str) -> None:
        self._fabric = fabric
        self._out = out
        self._in = inp
        self.peer = peer  # who is at the other end, for logs (`p2pd.http.server` reads it)
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this end is closed")
        pipe = self._out
        if pipe.eof:
            raise trio.ClosedResourceError("this end sent EOF")
        if pipe.reset:
            raise trio.BrokenResourceError("the other end is closed")
        payload = bytes(data)
        await self._fabric.transfer(pipe, len(payload))
        if pipe.reset:
            raise trio.BrokenResourceError("the other end is closed")
        if payload:
            pipe.chunks.append(payload)
        pipe.wake()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this end is closed")
        self._out.eof = True
        self._out.wake()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        pipe = self._in
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this end is closed")
            if pipe.chunks:
                return _take(pipe, max_bytes or DEFAULT_RECEIVE)
            if pipe.eof:
                return b""
            if pipe.reset:  # a crash of either host: the connection is gone
                raise trio.BrokenResourceError("connection reset")
            await pipe.readable.wait()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.eof = True
            self._out.wake()
            self._in.chunks.clear()
            self._fabric.cut(self._in)
        await trio.lowlevel.checkpoint()


def _take(pipe: _Pipe, most: int) -> bytes:
    """Up to `most` bytes from the front of `pipe`: a whole chunk when it fits (no copy)."""
    first = pipe.chunks[0]
    start = pipe.offset
    end = min(len(first), start + most)
    if start == 0 and end == len(first):
        pipe.chunks.popleft()
        return first
    piece = first[start:end]
    if end == len(first):
        pipe.chunks.popleft()
        pipe.offset = 0
    else:
        pipe.offset = end
    return piece


Handler = Callable[[MemoryStream], Awaitable[None]]


@dataclass
class _Host:
    name: str
    index: int  # in the Network
    alive: bool = True
    servers: dict[int, tuple[Handler, trio.Nursery]] = field(default_factory=dict)
    pipes: set[_Pipe] = field(default_factory=set)


class Fabric:
    """Hosts, their listening ports and the connections between them, paced by a `Network`.

    Run `run` in a task for as long as streams are used (it completes flows on time).
    `on_sent(src, dst, bytes, now)` is called for every completed flow between two hosts.
    """

    def __init__(self, free_below: int = 0, sharing: str = "fill") -> None:
        self.net = Network(sharing)
        self.free_below = free_below
        self._hosts: dict[str, _Host] = {}
        self._by_index: dict[int, _Host] = {}
        self._active: dict[int, _Wait] = {}
        self._changed = trio.Event()
        self._now = -math.inf
        self.on_sent: Callable[[int, int, int, float], None] | None = None
        self.flows = 0
        self.closed = False  # `close`: every connection attempt is refused

    # -- topology ---------------------------------------------------------------------------

    def add_host(self, name: str, up: float, down: float, zone: int = 0) -> int:
        if name in self._hosts:
            raise ValueError(f"host {name!r} exists")
        index = self.net.add_host(up, down, zone)
        host = _Host(name, index)
        self._hosts[name] = host
        self._by_index[index] = host
        return index

    def set_link(self, zone_a: int, zone_b: int, capacity: float) -> None:
        self.net.set_link(zone_a, zone_b, capacity, now=max(self._now, 0.0))

    def host(self, name: str) -> int:
        return self._hosts[name].index

    def listen(self, host: str, port: int, handler: Handler, nursery: trio.Nursery) -> None:
        """Accept connections to host:port; each runs `handler(stream)` in `nursery`."""
        self._hosts[host].servers[port] = (handler, nursery)

    async def connect(self, src: int, host: str, port: int) -> MemoryStream:
        """A stream from host `src` to the server at host:port (OSError when refused)."""
        await trio.lowlevel.checkpoint()
        me = self._by_index[src]
        there = self._hosts.get(host)
        if self.closed or not me.alive:
            raise OSError(errno.ENETUNREACH, f"{me.name} is down")
        if there is None or not there.alive or port not in there.servers:
            raise OSError(errno.ECONNREFUSED, f"connection to {host}:{port} refused")
        handler, nursery = there.servers[port]
        up = _Pipe(src, there.index)
        down = _Pipe(there.index, src)
        for pipe in (up, down):
            me.pipes.add(pipe)
            there.pipes.add(pipe)
        client = MemoryStream(self, up, down, f"{host}:{port}")
        server = MemoryStream(self, down, up, me.name)
        try:
            nursery.start_soon(handler, server)
        except RuntimeError as exc:  # the server is shutting down (its nursery is closed)
            raise OSError(errno.ECONNREFUSED, f"{host}:{port} is shutting down") from exc
        return client

    def close(self) -> None:
        """The end of the experiment: refuse new connections (daemons shutting down try to
        say goodbye; nobody is listening any more)."""
        self.closed = True

    def remove_host(self, name: str) -> None:
        """A crash: cut the host's flows, break its connections, refuse new ones."""
        host = self._hosts[name]
        if not host.alive:
            return
        host.alive = False
        host.servers.clear()
        for fid in self.net.remove_host(host.index, self.now()):
            wait = self._active.pop(fid, None)
            if wait is not None:
                wait.broken = True
                wait.event.set()
        for pipe in list(host.pipes):
            pipe.reset = True
            pipe.eof = True
            pipe.wake()
            for end in (pipe.src, pipe.dst):
                self._by_index[end].pipes.discard(pipe)
        host.pipes.clear()
        self._kick()

    # -- time and flows ---------------------------------------------------------------------

    def now(self) -> float:
        """The model's time: trio's clock, never before a time the model was already told."""
        t = trio.current_time()
        self._now = max(self._now, t)
        return self._now

    def _kick(self) -> None:
        self._changed.set()

    async def transfer(self, pipe: _Pipe, size: int) -> None:
        """Move `size` bytes along `pipe` at the model's pace; BrokenResourceError if cut."""
        if pipe.src == pipe.dst or size == 0 or size < self.free_below:
            await trio.lowlevel.checkpoint()
            return
        wait = _Wait(pipe, size)
        wait.flow = self.net.start_flow(pipe.src, pipe.dst, size, self.now(), wait)
        self._active[wait.flow] = wait
        self.flows += 1
        pipe.sending = wait
        self._kick()
        try:
            await wait.event.wait()
        finally:
            pipe.sending = None
            if self._active.pop(wait.flow, None) is not None:  # cancelled: stop the flow
                self.net.cancel_flow(wait.flow, self.now())
                self._kick()
        if wait.broken:
            raise trio.BrokenResourceError("connection reset mid-transfer")

    def cut(self, pipe: _Pipe) -> None:
        """The reader of `pipe` went away: cut the send in flight (the bandwidth frees now)."""
        pipe.break_()
        wait = pipe.sending
        if wait is not None and self._active.pop(wait.flow, None) is not None:
            self.net.cancel_flow(wait.flow, self.now())
            wait.broken = True
            wait.event.set()
            self._kick()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Complete flows when they are due, until cancelled."""
        task_status.started()
        net = self.net
        while True:
            self._changed = trio.Event()
            upcoming = net.next_completion()
            if upcoming is None:
                await self._changed.wait()
                continue
            at, fid = upcoming
            if trio.current_time() < at:
                with trio.move_on_at(at):
                    await self._changed.wait()
                if self._changed.is_set() and trio.current_time() < at:
                    continue  # something changed before the flow was due: look again
            # Due: complete it at the announced time (the clock may be an ulp short of it).
            self._now = max(self._now, at)
            now = self.now()
            wait = net.complete(fid, now)
            assert isinstance(wait, _Wait)
            if self._active.pop(fid, None) is not None:
                if self.on_sent is not None:
                    self.on_sent(wait.pipe.src, wait.pipe.dst, wait.size, now)
                wait.event.set()
            await trio.lowlevel.checkpoint()
