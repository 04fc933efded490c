"""Data-plane and control-plane figures of the real daemons, on loopback (JSON out).

Everything runs as real processes on 127.0.0.1 (no namespaces): a docker-registry holding one
generated layer (1 GiB by default), a supernode, and two p2pd daemons, *seed* and *leech*.

- **peak RSS**: the seed pulls the layer through its mirror (the supernode fetches it from the
  registry meanwhile and feeds the seed); then the leech pulls it too. Each daemon's VmHWM
  (/proc/PID/status) afterwards is its peak resident set while pulling a 1 GiB layer.
  Goal: <= 80 MiB (nothing holds a whole layer in memory).
- **piece transfer**: a fresh leech's pull is fed by the seed (a complete peer is preferred;
  the supernode is a parent of last resort only): serve (sendfile), receive (``recv_into``),
  verify (xxh3-128), write. Its rate is the layer size over the time from the request until
  the leech's ``/stats`` shows every byte from peers, polled every 20 ms. The request asks for
  the blob's last byte only (``Range: bytes=-1``): that starts the whole download, but no
  runtime streams the gigabyte out of the mirror meanwhile, which is not piece transfer and
  on this 2-core machine took a third of the CPU from it (the daemon's whole-blob sha256
  still runs: it is part of the download). Against it, in the same round and on the same
  file (both on the work directory's file system): the raw ceiling, a minimal HTTP server in
  another process answering each piece with a head and ``os.sendfile``, read by a plain
  ``recv_into`` client over one kept-alive connection, piece after piece. ``--repeat`` rounds
  of a fresh leech between two raw transfers, its ceiling the mean of the two: measured once
  before it only, at load 4-5 (another helper's simulations), the ceiling went from 1096 to
  492 MB/s between rounds of one run while the leech stayed at 412-484, and that round's
  share read 92 %. Each leech is stopped before the next starts (so each is fed by the seed
  alone); the share is the median of the rounds' shares. Also reported, once each: the raw
  client with xxh3-128 and ``pwrite`` added (what the daemon's receive path costs
  without the daemon), and a fresh leech's pull with the client reading the whole body
  through the mirror as a runtime does.
  Goal: >= 50% of the raw ceiling.
- **control messages**: P simulated peers register with the supernode for the same layer, then
  announce their pieces (a few per message, random order, ``want_parents`` until full) over C
  kept-alive connections with pre-encoded `p2pd.wire` bodies. Reported: messages per second of
  wall time and per second of the supernode's own CPU time (its utime + stime; the machine's
  other core runs the load generator). ``--repeat`` rounds, each with its own peers (the
  previous round's leave first, uncounted); the median round is the figure.
  Goal: >= 3000 per second per core.
- **control batches**: the same over ``--control-layers`` layers of their own (each peer a
  download of every layer), announced three ways in the same rounds, in turn: every announce a
  message of its own, and a peer's announces for 3 and for all of the layers at once in one
  ``announce_batch`` (as p2pd sends them). Reported: announces and messages per supernode
  CPU-second, and the fit ``per message + per announce`` that `Scheduler.pace` uses
  (``message_overhead``: the per-message share of a lone announce's cost). ``--control-only``
  runs the control figures alone (no piece transfer, no 1 GiB layer).
  This phase runs last, and its layers are built, pushed and fetched only then, by a
  supernode of its own (the first one and the seed are stopped by then). Built up front with
  the image, those ten 100 MiB layers took the piece transfer from ~41 % of raw to ~30 %
  (first rounds 13 %), even with this phase run after the piece rounds. The cause is this
  VM, not the daemons: its memory is balloon-backed with free page reporting
  (/sys/module/page_reporting), so a page freed for more than ~2 s goes back to the
  host, and the next first touch of it faults on the host. A leech writes a GiB into tmpfs
  pages it allocates as the pieces come; writing 1 GiB into tmpfs costs 0.37 CPU-s in
  pages freed just before and 0.7-0.8 CPU-s in reported ones (measured with pwrite), and
  under load perf showed the leech's pwrite copy (copy_folio_from_iter_atomic) at half of
  its CPU time. Three GiB more of tmpfs in use (the layers in the image, the registry and
  the supernode) leave the leech's writes the cold pages; a 3 GiB file of zeros made on
  the side did the same to the same code (leech 4.4 instead of 1.9-2.1 CPU-s per GiB).
  The raw ceiling writes nothing, so only the leech pays, and the share fell.

Figures, not pass/fail; medians of ``--repeat`` rounds where a figure is repeated, with every
round in the JSON. The machine is shared: the load average before and after is part of the
report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio
import xxhash

from benchmarks.harness.fleet import P2pdProcess, SupernodeProcess
from benchmarks.harness.image import make_image, push_image
from benchmarks.harness.procs import LOOPBACK, HarnessError, wait_for
from benchmarks.harness.registry import Registry
from benchmarks.hosts.cluster import cpu_seconds, peak_rss
from p2pd import wire
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout

MIB = 1024 * 1024
REPO = "micro/app"
GOAL_PIECE_SHARE = 0.5
GOAL_CONTROL = 3000.0
GOAL_RSS = 80 * MIB


# -- plain HTTP over a socket, for the clients of this benchmark -----------------------------


def _read_head(sock: socket.socket, carry: bytearray) -> tuple[int, int, bytes]:
    """Read a response head; returns (status, content-length, body bytes already read)."""
    while b"\r\n\r\n" not in carry:
        chunk = sock.recv(65536)
        if not chunk:
            raise HarnessError("connection closed in a response head")
        carry += chunk
    end = carry.index(b"\r\n\r\n")
    lines = bytes(carry[:end]).split(b"\r\n")
    status = int(lines[0].split()[1])
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if name.strip().lower() == b"transfer-encoding":
            raise HarnessError("chunked response: this client wants a Content-Length")
    rest = bytes(carry[end + 4 :])
    carry.clear()
    return status, length, rest


def get_into_void(
    port: int, path: str, buffer: memoryview, timeout: float = 600.0, *, last_byte: bool = False
) -> int:
    """GET ``path`` from 127.0.0.1:port, reading the body into ``buffer`` over and over;
    ``last_byte`` asks for the final byte only (``Range: bytes=-1``, answered 206)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        extra = "Range: bytes=-1\r\n" if last_byte else ""
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
        status, length, got_bytes = _read_head(sock, bytearray())
        if status != (206 if last_byte else 200) or length < 0:
            raise HarnessError(f"GET {path}: status {status}, length {length}")
        got = len(got_bytes)
        while got < length:
            n = sock.recv_into(buffer)
            if n == 0:
                raise HarnessError(f"GET {path}: closed at {got} of {length} bytes")
            got += n
        return got


def _json_get(port: int, path: str) -> dict[str, Any]:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, length, body = _read_head(sock, bytearray())
        data = bytearray(body)
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if status != 200:
        raise HarnessError(f"GET {path}: {status}")
    out: dict[str, Any] = json.loads(data)
    return out


class _StatsPoller:
    """GET /stats over one kept-alive connection (reopened if the daemon closed it).

    The pull is timed by polling the leech's /stats every 20 ms, on the loop that drives its
    transfers; a fresh connection per poll added an accept and a close to each of them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.carry = bytearray()

    def __enter__(self) -> _StatsPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()

    def get(self) -> dict[str, Any]:
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = socket.create_connection((LOOPBACK, self.port), timeout=5)
                self.carry.clear()
            try:
                return self._exchange(self.sock)
            except (OSError, HarnessError):
                self.sock.close()
                self.sock = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _exchange(self, sock: socket.socket) -> dict[str, Any]:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        status, length, body = _read_head(sock, self.carry)
        data = bytearray(body)
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise HarnessError("/stats: connection closed mid-body")
            data += chunk
        if status != 200 or length < 0:
            raise HarnessError(f"/stats: {status}")
        self.carry[:] = data[length:]  # (nothing: one request at a time)
        out: dict[str, Any] = json.loads(bytes(data[:length]))
        return out


# -- the raw ceiling --------------------------------------------------------------------------


def serve_raw(path: str, piece_size: int) -> None:
    """A minimal piece server (``GET /<index>`` -> head + sendfile) on a free loopback port.

    Prints the port, serves one connection, exits when it closes. Runs in its own process, as
    a parent's piece server does.
    """
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        print(listener.getsockname()[1], flush=True)
        listener.settimeout(60)
        conn, _ = listener.accept()
        # Blocking (a timeout would make the socket non-blocking and sendfile fail with
        # EAGAIN); the client's own timeout ends a stalled exchange by closing.
        conn.settimeout(None)
        carry = bytearray()
        with conn:
            while True:
                while b"\r\n\r\n" not in carry:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    carry += chunk
                end = carry.index(b"\r\n\r\n")
                index = int(bytes(carry[:end]).split()[1][1:])
                del carry[: end + 4]
                offset = index * piece_size
                length = min(piece_size, size - offset)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: %d\r\n\r\n" % length
                )
                sent = 0
                while sent < length:
                    sent += os.sendfile(conn.fileno(), fd, offset + sent, length - sent)


def raw_transfer(blob: Path, layout: PieceLayout, *, verify_and_write: Path | None) -> float:
    """Bytes/s of every piece of ``blob`` from a raw sendfile server into a recv_into client."""
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.hosts.micro_dataplane", "raw-serve", str(blob),
         str(layout.piece_size)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    out_fd = -1
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        buffer = bytearray(layout.piece_size)
        view = memoryview(buffer)
        if verify_and_write is not None:
            out_fd = os.open(verify_and_write, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
            started = time.perf_counter()
            carry = bytearray()
            for index in range(layout.count):
                offset, length = layout.span(index)
                sock.sendall(f"GET /{index} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, declared, first = _read_head(sock, carry)
                if status != 200 or declared != length:
                    raise HarnessError(f"raw server: {status} {declared} for piece {index}")
                view[: len(first)] = first
                got = len(first)
                while got < length:
                    n = sock.recv_into(view[got:length])
                    if n == 0:
                        raise HarnessError("raw server closed mid-piece")
                    got += n
                if out_fd >= 0:
                    xxhash.xxh3_128_digest(view[:length])
                    os.pwrite(out_fd, view[:length], offset)
            elapsed = time.perf_counter() - started
        return layout.total_size / elapsed
    finally:
        if out_fd >= 0:
            os.close(out_fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


# -- the daemons' pulls -----------------------------------------------------------------------


def timed_pull(
    p2pd: P2pdProcess, digest: str, size: int, buffer: memoryview, *, read_body: bool = True
) -> dict[str, float]:
    """Pull the blob through ``p2pd``'s mirror; when did the swarm have it, when the client?

    Without ``read_body`` the client asks for the last byte only: the whole download runs,
    but nobody streams the body out of the mirror meanwhile."""
    path = f"/v2/{REPO}/blobs/{digest}?ns=example.test"
    base = _json_get(p2pd.peer_port, "/stats")["bytes_from_peers"]
    result: dict[str, float] = {}

    async def main() -> None:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                got = await trio.to_thread.run_sync(
                    functools.partial(
                        get_into_void, p2pd.mirror_port, path, buffer, last_byte=not read_body
                    )
                )
                if got != (size if read_body else 1):
                    raise HarnessError(f"mirror sent {got} of {size} bytes")
                result["client_seconds"] = time.perf_counter() - started

            async def swarm_done() -> None:
                deadline = started + 600
                with _StatsPoller(p2pd.peer_port) as poller:
                    while time.perf_counter() < deadline:
                        stats = await trio.to_thread.run_sync(poller.get)
                        if stats["bytes_from_peers"] - base >= size:
                            result["swarm_seconds"] = time.perf_counter() - started
                            return
                        await trio.sleep(0.02)
                raise HarnessError("the swarm did not deliver the blob in 600 s")

            nursery.start_soon(client)
            nursery.start_soon(swarm_done)

    trio.run(main)
    return result


# -- control messages -------------------------------------------------------------------------


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def control_messages(
    port: int,
    supernode_pid: int,
    digest: str,
    layout: PieceLayout,
    upstream: str,
    *,
    peers: int,
    connections: int,
    per_announce: int,
    seed: int,
    tag: str = "sim",
) -> dict[str, Any]:
    """Register ``peers`` simulated peers (ids ``<tag><n>``), then announce all their pieces;
    count and time. Then they leave (timed apart, not counted), so rounds do not pile up."""
    rng = random.Random(seed)
    d = Digest.parse(digest)
    registers = [
        _post("/v1/register", wire.encode(_register(d, layout, f"{tag}{i:05d}", i, upstream)))
        for i in range(peers)
    ]
    # Each peer announces its pieces in its own random order, a few per message, asking for
    # parents until it is full (as DownloadSession.take_announce does).
    announces: list[list[bytes]] = []
    for i in range(peers):
        order = list(range(layout.count))
        rng.shuffle(order)
        batches = [order[k : k + per_announce] for k in range(0, len(order), per_announce)]
        announces.append(
            [
                _post(
                    "/v1/announce",
                    wire.encode(
                        wire.Announce(
                            digest=d,
                            peer_id=f"{tag}{i:05d}",
                            pieces=tuple(batch),
                            manifest_known=layout.count,
                            want_parents=b + 1 < len(batches),
                        )
                    ),
                )
                for b, batch in enumerate(batches)
            ]
        )
    # Round-robin over peers, so the swarm fills evenly as in a storm.
    rounds = max(len(a) for a in announces)
    announce_queue = [a[r] for r in range(rounds) for a in announces if r < len(a)]

    leaves = [
        _post("/v1/leave", wire.encode(wire.Leave(digest=d, peer_id=f"{tag}{i:05d}")))
        for i in range(peers)
    ]
    phases: dict[str, Any] = {}
    for name, queue in (("register", registers), ("announce", announce_queue), ("leave", leaves)):
        cpu_before = cpu_seconds(supernode_pid)
        count, errors, elapsed = trio.run(_drive, port, queue, connections)
        cpu = cpu_seconds(supernode_pid) - cpu_before
        phases[name] = {
            "messages": count,
            "errors": errors,
            "wall_seconds": round(elapsed, 3),
            "per_second": count / elapsed,
            "supernode_cpu_seconds": round(cpu, 3),
            "per_cpu_second": count / cpu if cpu > 0 else None,
        }
    counted = [phases["register"], phases["announce"]]  # leaves only tidy up
    total = sum(p["messages"] for p in counted)
    wall = sum(p["wall_seconds"] for p in counted)
    cpu = sum(p["supernode_cpu_seconds"] for p in counted)
    return {
        "peers": peers,
        "connections": connections,
        "pieces": layout.count,
        "pieces_per_announce": per_announce,
        "phases": phases,
        "messages": total,
        "per_second": total / wall,
        "per_cpu_second": total / cpu if cpu > 0 else None,
    }


async def _drive(port: int, queue: list[bytes], connections: int) -> tuple[int, int, float]:
    """Send `queue` over `connections` kept-alive connections, one request at a time each;
    (answers, non-200 answers, wall seconds)."""
    errors = 0
    count = 0
    next_item = 0

    async def worker() -> None:
        nonlocal errors, count, next_item
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            carry = bytearray()
            while next_item < len(queue):
                request = queue[next_item]
                next_item += 1
                await stream.send_all(request)
                status, _ = await _receive_response(stream, carry)
                count += 1
                errors += status != 200

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    return count, errors, time.perf_counter() - started


def _register(
    digest: Digest, layout: PieceLayout, peer: str, n: int, upstream: str
) -> wire.Register:
    return wire.Register(
        digest=digest,
        size=layout.total_size,
        peer_id=peer,
        address=f"127.0.0.1:{10000 + n}",  # never dialled: nobody fetches pieces
        zone="",
        upload_slots=8,
        upstream=upstream,
        repository=REPO,
        authorization=None,
        have=None,
    )


def control_batches(
    port: int,
    supernode_pid: int,
    layers: list[tuple[str, PieceLayout]],
    upstream: str,
    *,
    peers: int,
    connections: int,
    per_announce: int,
    batch_sizes: tuple[int, ...],
    seed: int,
    tag: str,
) -> dict[str, Any]:
    """For each k of `batch_sizes`, in turn: `peers` fresh peers (ids ``<tag>k<k>.<n>``)
    register for every layer (not counted), then announce all their pieces, a peer's k
    layers' announces of a round in one message (k = 1: one ``/v1/announce`` each), timed
    against the supernode's CPU; then they leave (not counted)."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for k in batch_sizes:
        ids = [f"{tag}k{k}.{i:04d}" for i in range(peers)]
        registers = [
            _post(
                "/v1/register", wire.encode(_register(Digest.parse(d), layout, peer, i, upstream))
            )
            for i, peer in enumerate(ids)
            for d, layout in layers
        ]
        # every (peer, layer) download announces its pieces in its own random order, a few
        # at a time; announce r of a peer's downloads goes out together (their timers align)
        queue: list[bytes] = []
        announces = 0
        plans = []
        for peer in ids:
            per_layer = []
            for digest, layout in layers:
                order = list(range(layout.count))
                rng.shuffle(order)
                chunks = [order[j : j + per_announce] for j in range(0, len(order), per_announce)]
                per_layer.append(
                    [
                        wire.Announce(
                            Digest.parse(digest), peer, tuple(c), layout.count, n + 1 < len(chunks)
                        )
                        for n, c in enumerate(chunks)
                    ]
                )
            plans.append(per_layer)
        rounds = max(len(a) for plan in plans for a in plan)
        for r in range(rounds):
            for per_layer in plans:  # round-robin over peers, as in a storm
                due = [a[r] for a in per_layer if r < len(a)]
                announces += len(due)
                for j in range(0, len(due), k):
                    group = due[j : j + k]
                    if len(group) == 1:
                        queue.append(_post("/v1/announce", wire.encode(group[0])))
                    else:
                        body = wire.encode(wire.AnnounceBatch(tuple(group)))
                        queue.append(_post("/v1/announce-batch", body))
        leaves = [
            _post("/v1/leave", wire.encode(wire.Leave(Digest.parse(digest), peer)))
            for peer in ids
            for digest, _ in layers
        ]
        trio.run(_drive, port, registers, connections)
        cpu_before = cpu_seconds(supernode_pid)
        count, errors, elapsed = trio.run(_drive, port, queue, connections)
        cpu = cpu_seconds(supernode_pid) - cpu_before
        trio.run(_drive, port, leaves, connections)
        out[str(k)] = {
            "batch": k,
            "messages": count,
            "announces": announces,
            "errors": errors,
            "wall_seconds": round(elapsed, 3),
            "supernode_cpu_seconds": round(cpu, 3),
            "messages_per_cpu_second": count / cpu if cpu > 0 else None,
            "announces_per_cpu_second": announces / cpu if cpu > 0 else None,
        }
    return out


def fit_batch_cost(variants: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Least squares of a message's supernode CPU time = per_message + per_announce x its
    announces, over every variant; ``message_overhead`` = per_message / (per_message +
    per_announce), the per-message share of a lone announce's cost."""
    points = [
        (v["announces"] / v["messages"], v["supernode_cpu_seconds"] / v["messages"])
        for v in variants.values()
        if v["messages"] and v["supernode_cpu_seconds"] > 0
    ]
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    per_message = my - slope * mx
    return {
        "per_message_us": per_message * 1e6,
        "per_announce_us": slope * 1e6,
        "message_overhead": per_message / (per_message + slope),
    }


async def _receive_response(stream: trio.SocketStream, carry: bytearray) -> tuple[int, int]:
    while b"\r\n\r\n" not in carry:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise HarnessError("supernode closed a control connection")
        carry += chunk
    end = carry.index(b"\r\n\r\n")
    lines = bytes(carry[:end]).split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    del carry[: end + 4]
    while len(carry) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise HarnessError("supernode closed a control connection mid-body")
        carry += chunk
    del carry[:length]
    return status, length


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the run ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    report: dict[str, Any] = {"repeat": args.repeat, "cpus": os.cpu_count()}
    buffer = memoryview(bytearray(1 << 20))
    with ExitStack() as stack:
        registry = stack.enter_context(Registry(workdir / "registry"))
        if not args.control_only:
            with ExitStack() as phase:  # its supernode and seed stop before the next phase
                _piece_and_control_figures(args, workdir, phase, registry, report, buffer)
        if args.control_layers:
            # last, with layers and a supernode of their own: see the module docstring
            report["control_batches"] = _control_batches(args, workdir, stack, registry)
    if not args.control_only:
        report["goals"] = _goals(report)
        report["workdir"] = str(workdir)
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return report


def _piece_and_control_figures(
    args: argparse.Namespace,
    workdir: Path,
    stack: ExitStack,
    registry: Registry,
    report: dict[str, Any],
    buffer: memoryview,
) -> None:
    """Peak RSS, piece transfer and control messages, on the one --layer-mib layer."""
    print(f"building a layer of {args.layer_mib} MiB …", flush=True)
    image = make_image(args.seed, [args.layer_mib * MIB], workdir=workdir / "image")
    push_image(registry.url, REPO, "v1", image)
    supernode = stack.enter_context(SupernodeProcess(workdir / "sn", [registry.url]))

    def p2pd(name: str) -> P2pdProcess:
        return P2pdProcess(
            workdir / "hosts",
            name,
            supernodes=[supernode.url],
            registries={"example.test": registry.url},
        )

    layer = image.layers[0]
    layout = PieceLayout.for_size(layer.size)
    report.update(
        {"layer_bytes": layer.size, "piece_size": layout.piece_size, "pieces": layout.count}
    )
    gib = layer.size / (1 << 30)
    seed = stack.enter_context(p2pd("seed"))
    print("seed pulls the layer (supernode fetching from the registry meanwhile) …")
    first = timed_pull(seed, layer.digest, layer.size, buffer)
    rss = {"seed": peak_rss(seed.process.pid)}

    def leech_pull(name: str, read_body: bool) -> dict[str, Any]:
        """A fresh leech pulls from the seed; stopped afterwards, so that the next one
        has the seed alone as its parent again, and its store deleted: kept, each round
        left a GiB more in the tmpfs, and on this VM every round's writes went to pages
        never touched before, slower each time (leech 1.7 -> 2.6 -> 3.9 CPU-s per GiB
        over three rounds, 46 -> 21 -> 15 % of raw; deleted: 1.7 CPU-s and 37-48 % in
        every round). The raw ceiling it is compared with writes nothing."""
        with p2pd(name) as leech:
            pids = {"seed": seed.process.pid, "leech": leech.process.pid}
            cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            own_before = _own_cpu()
            pull = timed_pull(leech, layer.digest, layer.size, buffer, read_body=read_body)
            # CPU per GiB moved: on a machine of 2 shared cores this, not the network,
            # sets the pace
            cpu = {k: (cpu_seconds(pid) - cpu_before[k]) / gib for k, pid in pids.items()}
            cpu["benchmark client"] = (_own_cpu() - own_before) / gib
            stats = _json_get(leech.peer_port, "/stats")
            rss[name] = peak_rss(leech.process.pid)
        shutil.rmtree(leech.data_dir, ignore_errors=True)
        return {
            **pull,
            "swarm_bytes_per_s": layer.size / pull["swarm_seconds"],
            "bytes_from_peers": stats["bytes_from_peers"],
            "bytes_from_registry": stats["bytes_from_registry"],
            "cpu_seconds_per_gib": cpu,
        }

    rounds = []
    raw_after = raw_transfer(layer.path, layout, verify_and_write=None)
    for k in range(args.repeat):
        print(f"round {k + 1}/{args.repeat}: a fresh leech, then the raw ceiling …", flush=True)
        raw_before = raw_after
        pull = leech_pull(f"leech{k}", read_body=False)
        raw_after = raw_transfer(layer.path, layout, verify_and_write=None)
        # the ceiling on either side of the pull (see the module docstring)
        raw = (raw_before + raw_after) / 2
        pull["raw_bytes_per_s"] = raw
        pull["raw_before_after_bytes_per_s"] = [raw_before, raw_after]
        pull["share_of_raw"] = pull["swarm_bytes_per_s"] / raw
        rounds.append(pull)
        print(
            f"  raw {raw_before / 1e6:.0f} / {raw_after / 1e6:.0f} MB/s, p2pd "
            f"{pull['swarm_bytes_per_s'] / 1e6:.0f} MB/s = {pull['share_of_raw']:.0%}, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    print("raw + xxh3 + pwrite; a pull with the client reading the body …", flush=True)
    raw_vw = _median(
        [
            raw_transfer(layer.path, layout, verify_and_write=workdir / "raw-out")
            for _ in range(args.repeat)
        ]
    )
    streamed = leech_pull("leech-streamed", read_body=True)
    raw_median = _median([r["raw_bytes_per_s"] for r in rounds])
    streamed["share_of_raw_median"] = streamed["swarm_bytes_per_s"] / raw_median
    seed_stats = _json_get(seed.peer_port, "/stats")
    rss["seed"] = peak_rss(seed.process.pid)
    report["piece_transfer"] = {
        "seed_pull": first,
        "rounds": rounds,
        "raw_bytes_per_s": raw_median,
        "leech_swarm_bytes_per_s": _median([r["swarm_bytes_per_s"] for r in rounds]),
        "share_of_raw": _median([r["share_of_raw"] for r in rounds]),
        "raw_verify_write_bytes_per_s": raw_vw,
        "streamed_pull": streamed,
        "seed_bytes_to_peers": seed_stats["bytes_to_peers"],
    }
    report["peak_rss_bytes"] = rss

    print(f"control messages: {args.peers} simulated peers, {args.repeat} rounds …", flush=True)
    wait_for(lambda: supernode.process.running, timeout=1, what="supernode")
    control_rounds = [
        control_messages(
            supernode.port,
            supernode.process.pid,
            layer.digest,
            layout,
            registry.url,
            peers=args.peers,
            connections=args.connections,
            per_announce=args.per_announce,
            seed=args.seed + k,
            tag=f"r{k}.sim",
        )
        for k in range(args.repeat)
    ]
    per_cpu = [c["per_cpu_second"] for c in control_rounds if c["per_cpu_second"]]
    report["control"] = {
        "rounds": control_rounds,
        "per_second": _median([c["per_second"] for c in control_rounds]),
        "per_cpu_second": _median(per_cpu) if per_cpu else None,
    }


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    control = report["control"]["per_cpu_second"]
    share = report["piece_transfer"]["share_of_raw"]
    rss = report["peak_rss_bytes"]
    return {
        "piece_transfer_share_of_raw": {
            "value": share,
            "limit": f">= {GOAL_PIECE_SHARE}",
            "met": share >= GOAL_PIECE_SHARE,
        },
        "control_messages_per_cpu_second": {
            "value": control,
            "limit": f">= {GOAL_CONTROL:g}",
            "met": control is not None and control >= GOAL_CONTROL,
        },
        "peak_rss_bytes": {
            "value": max(rss.values()),
            "limit": f"<= {GOAL_RSS}",
            "met": max(rss.values()) <= GOAL_RSS,
        },
    }


def _control_batches(
    args: argparse.Namespace, workdir: Path, stack: ExitStack, registry: Registry
) -> dict[str, Any]:
    sizes_mib = [args.control_layer_mib] * args.control_layers
    print(f"building {args.control_layers} layers of {args.control_layer_mib} MiB …", flush=True)
    image = make_image(
        args.seed + 1, [n * MIB for n in sizes_mib], workdir=workdir / "image-batches"
    )
    push_image(registry.url, REPO, "batches", image)
    supernode = stack.enter_context(SupernodeProcess(workdir / "sn-batches", [registry.url]))
    upstream = registry.url
    layers = [(blob.digest, PieceLayout.for_size(blob.size)) for blob in image.layers]
    sizes = tuple(sorted({1, 3, len(layers)}))
    print(
        f"control batches: {args.peers} peers x {len(layers)} layers, batches of "
        f"{', '.join(map(str, sizes))}, {args.repeat} rounds …",
        flush=True,
    )
    wait_for(lambda: supernode.process.running, timeout=1, what="supernode")
    # the seeder's fetch of the layers would count in the first round's CPU: wait it out
    warm = [
        _post("/v1/register", wire.encode(_register(Digest.parse(d), layout, "warm", 0, upstream)))
        for d, layout in layers
    ]
    trio.run(_drive, supernode.port, warm, 1)

    def ready() -> bool:
        tasks = _json_get(supernode.port, "/status")["tasks"]
        return len(tasks) >= len(layers) and all(t["state"] == "ready" for t in tasks)

    wait_for(ready, timeout=300, what="the supernode's fetch of the control layers")
    rounds = [
        control_batches(
            supernode.port,
            supernode.process.pid,
            layers,
            upstream,
            peers=args.peers,
            connections=args.connections,
            per_announce=args.per_announce,
            batch_sizes=sizes,
            seed=args.seed + k,
            tag=f"b{k}.",
        )
        for k in range(args.repeat)
    ]
    median: dict[str, dict[str, Any]] = {}
    for key in rounds[0]:
        runs = [r[key] for r in rounds]
        pick = sorted(runs, key=lambda v: v["announces_per_cpu_second"] or 0)[len(runs) // 2]
        median[key] = pick
    # a batch's cost in lone announces, against the lone ones of the same round, and the
    # message_overhead o that makes o + k (1 - o) that cost for its mean of k announces
    implied: dict[str, list[float]] = {}
    for r in rounds:
        lone = r["1"]["supernode_cpu_seconds"] / r["1"]["messages"]
        for key, v in r.items():
            k = v["announces"] / v["messages"]
            if key == "1" or not lone or k <= 1:
                continue
            cost = v["supernode_cpu_seconds"] / v["messages"] / lone
            implied.setdefault(key, []).append((k - cost) / (k - 1))
    return {
        "layers": len(layers),
        "pieces_per_layer": layers[0][1].count,
        "rounds": rounds,
        "median": median,
        "message_overhead_implied": {k: _median(v) for k, v in implied.items()},
        "fit": fit_batch_cost({f"{n}.{k}": v for n, r in enumerate(rounds) for k, v in r.items()}),
    }


def print_summary(r: dict[str, Any]) -> None:
    batches = r.get("control_batches")
    if batches:
        layers = f"{batches['layers']} layers of {batches['pieces_per_layer']} pieces"
        print(f"\ncontrol batches ({layers}; median round by announces per supernode CPU-s):")
        for key, v in batches["median"].items():
            print(
                f"  batch of {key:>2}: {v['announces_per_cpu_second']:7.0f} announces and "
                f"{v['messages_per_cpu_second']:7.0f} messages per CPU-s "
                f"({v['announces']} announces in {v['messages']} messages, {v['errors']} errors)"
            )
        implied = ", ".join(f"{k}: {o:.2f}" for k, o in batches["message_overhead_implied"].items())
        print(f"  message_overhead implied by each batch size against lone announces: {implied}")
        fit = batches["fit"]
        if fit:
            print(
                f"  fit: {fit['per_message_us']:.1f} us per message + {fit['per_announce_us']:.1f}"
                f" us per announce -> message_overhead {fit['message_overhead']:.2f}"
            )
    if "piece_transfer" not in r:
        return
    pt, c = r["piece_transfer"], r["control"]
    mb = 1e6
    print()
    pieces = f"{r['pieces']} pieces of {r['piece_size'] / MIB:.0f} MiB"
    print(f"layer {r['layer_bytes'] / MIB:.0f} MiB in {pieces}; work dir {r['workdir']}")
    shares = ", ".join(f"{x['share_of_raw']:.0%}" for x in pt["rounds"])
    print(
        f"piece transfer p2pd -> p2pd (median of {len(pt['rounds'])} rounds): "
        f"{pt['leech_swarm_bytes_per_s'] / mb:.0f} MB/s; raw ceiling "
        f"{pt['raw_bytes_per_s'] / mb:.0f} MB/s -> {pt['share_of_raw']:.0%} of raw "
        f"(rounds: {shares}); raw + xxh3 + pwrite "
        f"{pt['raw_verify_write_bytes_per_s'] / mb:.0f} MB/s"
    )
    st = pt["streamed_pull"]
    print(
        f"with a client reading the body through the mirror: swarm "
        f"{st['swarm_bytes_per_s'] / mb:.0f} MB/s ({st['share_of_raw_median']:.0%} of raw), "
        f"client saw {r['layer_bytes'] / st['client_seconds'] / mb:.0f} MB/s"
    )
    for k, round_ in enumerate(c["rounds"]):
        for name, p in round_["phases"].items():
            per_cpu = p["per_cpu_second"]
            print(
                f"control round {k} {name:9}: {p['messages']} msgs, {p['per_second']:.0f}/s "
                f"wall, {per_cpu:.0f}/s per supernode CPU second, {p['errors']} errors"
                if per_cpu
                else f"control round {k} {name}: {p['messages']} msgs"
            )
    for label, cpu_map in (
        ("last-byte pull", pt["rounds"][-1]["cpu_seconds_per_gib"]),
        ("streamed pull", st["cpu_seconds_per_gib"]),
    ):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in cpu_map.items())
        print(f"CPU seconds per GiB, {label}: {cpu}")
    rss = ", ".join(f"{k} {v / MIB:.1f}" for k, v in r["peak_rss_bytes"].items())
    print(f"peak RSS (MiB): {rss}")
    for name, g in r["goals"].items():
        print(f"  {name:34} {g['value']:.4g}  {g['limit']}  {'met' if g['met'] else 'MISSED'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p-bench micro-dataplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--layer-mib", type=int, default=1024, help="layer size (default 1024)")
    parser.add_argument("--peers", type=int, default=300, help="simulated peers (default 300)")
    parser.add_argument("--connections", type=int, default=8, help="control connections")
    parser.add_argument("--per-announce", type=int, default=2, help="pieces per announce")
    parser.add_argument(
        "--control-layers",
        type=int,
        default=10,
        help="layers for the control batch figures (0: none; default 10)",
    )
    parser.add_argument(
        "--control-layer-mib", type=int, default=100, help="size of each of them (default 100)"
    )
    parser.add_argument(
        "--control-only",
        action="store_true",
        help="only the control figures: no piece transfer, no --layer-mib layer",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of each figure (median kept; default 3)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out/hosts-micro.json"))
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument(
        "--tmp-base",
        type=Path,
        help="where the temporary work directory goes; /dev/shm takes this machine's disk "
        "(slow first writes) out of the piece path (default: the system's temp dir)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["raw-serve"] and len(argv) == 3:
        serve_raw(argv[1], int(argv[2]))
        return 0
    args = build_parser().parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="p2p-micro-", dir=args.tmp_base) as tmp:
            report = run(args, Path(tmp))
    print_summary(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
