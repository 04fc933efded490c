"""The full-stack storm engine: its in-memory network, its HTTP transport, and the honesty
check itself on a small storm (the fast simulator and the real daemons must agree)."""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from benchmarks.storm.compare import AGREEMENT, compare, format_comparison
from benchmarks.storm.full.engine import (
    _TURN_WAIT,
    FakeRegistry,
    FullStorm,
    _ArrivalOrder,
    make_layers,
)
from benchmarks.storm.full.net import Fabric, MemoryStream
from benchmarks.storm.full.transport import FabricTransport
from benchmarks.storm.presets import PRESETS, MiB
from benchmarks.storm.report import StormResult, summarize
from benchmarks.storm.sim import Sim
from p2pd import offload, wire
from p2pd.core.digest import Digest
from p2pd.core.scheduler import Assignment, Scheduler
from p2pd.http.server import FileRegion, Request, Response, serve_stream

# -- the fabric -------------------------------------------------------------------------------


async def _sink(stream: MemoryStream) -> None:
    """A server that reads everything and never answers."""
    while await stream.receive_some():
        pass


async def _timed_send(stream: MemoryStream, size: int, done: dict[str, float], key: str) -> None:
    await stream.send_all(b"x" * size)
    done[key] = trio.current_time()


async def test_an_uplink_is_shared_equally_and_a_share_grows_when_a_flow_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fabric = Fabric()
    a = fabric.add_host("a", up=100.0, down=1e9)
    fabric.add_host("b", up=1e9, down=1e9)
    fabric.add_host("c", up=1e9, down=1e9)
    done: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("b", 1, _sink, nursery)
        fabric.listen("c", 1, _sink, nursery)
        to_b = await fabric.connect(a, "b", 1)
        to_c = await fabric.connect(a, "c", 1)
        t0 = trio.current_time()
        async with trio.open_nursery() as sends:
            sends.start_soon(_timed_send, to_b, 50, done, "b")
            sends.start_soon(_timed_send, to_c, 150, done, "c")
        nursery.cancel_scope.cancel()
    # 50 B/s each until b's 50 bytes are through (1 s), then c alone at 100 B/s for its last 100
    assert done["b"] - t0 == pytest.approx(1.0)
    assert done["c"] - t0 == pytest.approx(2.0)
    assert fabric.net.bytes_sent(a) == pytest.approx(200)


async def test_a_download_is_shared_equally(autojump_clock: trio.testing.MockClock) -> None:
    fabric = Fabric()
    senders = [fabric.add_host(f"s{i}", up=1e9, down=1e9) for i in range(4)]
    fabric.add_host("d", up=1e9, down=400.0)
    done: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("d", 1, _sink, nursery)
        streams = [await fabric.connect(s, "d", 1) for s in senders]
        async with trio.open_nursery() as sends:
            for i, stream in enumerate(streams):
                sends.start_soon(_timed_send, stream, 100, done, str(i))
        nursery.cancel_scope.cancel()
    assert sorted(done.values()) == pytest.approx([1.0] * 4)  # 100 B/s each, together


async def test_closing_the_receiver_cuts_the_send_and_frees_the_bandwidth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fabric = Fabric()
    a = fabric.add_host("a", up=100.0, down=1e9)
    fabric.add_host("b", up=1e9, down=1e9)
    fabric.add_host("c", up=1e9, down=1e9)
    servers: list[MemoryStream] = []
    done: dict[str, float] = {}

    async def keep(stream: MemoryStream) -> None:
        servers.append(stream)
        await trio.sleep_forever()

    async def doomed(stream: MemoryStream) -> None:
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"y" * 1000)
        done["cut"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("b", 1, keep, nursery)
        fabric.listen("c", 1, _sink, nursery)
        to_b = await fabric.connect(a, "b", 1)
        to_c = await fabric.connect(a, "c", 1)
        async with trio.open_nursery() as sends:
            sends.start_soon(doomed, to_b)
            sends.start_soon(_timed_send, to_c, 100, done, "c")
            await trio.sleep(0.5)
            await servers[0].aclose()
        nursery.cancel_scope.cancel()
    assert done["cut"] == pytest.approx(0.5)
    # 25 bytes at 50 B/s while sharing, the other 75 at the whole 100 B/s
    assert done["c"] == pytest.approx(1.25)
    assert fabric.net.bytes_sent(a) == pytest.approx(125)


async def test_loopback_is_free_and_bytes_arrive_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fabric = Fabric()
    a = fabric.add_host("a", up=1.0, down=1.0)
    got = bytearray()

    async def read_all(stream: MemoryStream) -> None:
        while chunk := await stream.receive_some(3):
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("a", 1, read_all, nursery)
        stream = await fabric.connect(a, "a", 1)
        await stream.send_all(b"hello ")
        await stream.send_all(bytearray(b"world"))
        await stream.aclose()
        await trio.sleep(0.001)
        assert trio.current_time() < 0.01
        nursery.cancel_scope.cancel()
    assert bytes(got) == b"hello world"


async def test_a_crashed_host_breaks_its_streams_and_refuses_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fabric = Fabric()
    a = fabric.add_host("a", up=100.0, down=100.0)
    fabric.add_host("b", up=100.0, down=100.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("b", 1, _sink, nursery)
        stream = await fabric.connect(a, "b", 1)

        async def crash_soon() -> None:
            await trio.sleep(1)
            fabric.remove_host("b")

        nursery.start_soon(crash_soon)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"z" * 1000)
        assert trio.current_time() == pytest.approx(1.0)
        with pytest.raises(OSError):
            await fabric.connect(a, "b", 1)
        nursery.cancel_scope.cancel()


# -- HTTP over the fabric ---------------------------------------------------------------------


async def test_httpx_through_the_fabric_reaches_the_real_server_files_included(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 40)

    async def handler(request: Request) -> Response:
        if request.method == "POST":
            return Response(200, [], b"echo:" + await request.read_body(1000))
        fd = os.open(path, os.O_RDONLY)
        return Response(200, [], FileRegion(fd, 256, 5000, on_done=lambda: os.close(fd)))

    fabric = Fabric()
    client_host = fabric.add_host("client", up=1000.0, down=1000.0)
    fabric.add_host("server", up=1000.0, down=1000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("server", 80, lambda s: serve_stream(s, handler), nursery)
        async with httpx.AsyncClient(transport=FabricTransport(fabric, client_host)) as client:
            got = await client.get("http://server/file")
            assert got.status_code == 200
            assert got.content == (bytes(range(256)) * 40)[256:5256]
            # 5000 body bytes at 1000 B/s (and two HTTP heads): the file crossed the model
            assert 5.0 <= trio.current_time() < 5.5
            echoed = await client.post("http://server/x", content=b"abc")
            assert echoed.content == b"echo:abc"
            with pytest.raises(httpx.ConnectError):
                await client.get("http://nobody/")
        nursery.cancel_scope.cancel()


async def test_fake_registry_serves_ranges_of_content_that_hashes_to_its_digest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    layers = make_layers(replace(PRESETS["small"], layers=(5 * MiB + 7,)))
    layer = layers[0]
    fabric = Fabric()
    me = fabric.add_host("me", up=1e9, down=1e9)
    fabric.add_host("registry", up=1e9, down=1e9)
    registry = FakeRegistry(layers)
    url = f"http://registry:5000/v2/storm/app/blobs/{layer.digest}"
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("registry", 5000, lambda s: serve_stream(s, registry.handle), nursery)
        async with httpx.AsyncClient(transport=FabricTransport(fabric, me)) as client:
            whole = await client.get(url)
            part = await client.get(url, headers={"Range": "bytes=4194304-"})
            head = await client.head(url)
        nursery.cancel_scope.cancel()
    assert whole.status_code == 200 and whole.content == layer.content
    assert layer.digest.raw == __import__("hashlib").sha256(whole.content).digest()
    assert part.status_code == 206 and part.content == layer.content[4194304:]
    assert head.headers["content-length"] == str(len(layer.content))


async def test_offload_inline_runs_on_the_trio_thread() -> None:
    trio_thread = threading.get_ident()
    assert await offload.run_sync(threading.get_ident) != trio_thread
    with offload.inline():
        assert await offload.run_sync(threading.get_ident) == trio_thread
    assert await offload.run_sync(threading.get_ident) != trio_thread


# -- the honesty check, small -----------------------------------------------------------------

# One piece and three pieces (at the 2 MiB piece size): small enough for every test run.
SMALL = replace(PRESETS["small"], name="tiny", nodes=8, layers=(2 * MiB, 6 * MiB))


def test_full_stack_and_fast_simulator_agree_on_a_small_storm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_threads_or_sockets(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread or a socket under the virtual clock")

    # the rule for this engine: no threads and no real sockets under the virtual clock
    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads_or_sockets)
    monkeypatch.setattr(trio, "open_tcp_stream", no_threads_or_sockets)
    monkeypatch.setattr(trio, "open_tcp_listeners", no_threads_or_sockets)
    fast = summarize(Sim(SMALL).run())
    result = FullStorm(SMALL, workdir=tmp_path).run()
    full = summarize(result)
    verdict = compare([fast], [full])
    print(format_comparison(verdict))
    assert full["completed"] == SMALL.nodes
    # each layer left the registry once (plus a few hundred bytes of HTTP heads)
    assert full["registry_egress"]["ratio_to_image"] == pytest.approx(1.0, abs=0.01)
    # the peers served each other (the supernode sent less than every node's whole image),
    # in the proportion the simulator expects
    assert full["supernode_upload"]["ratio_to_image"] < SMALL.nodes
    assert full["supernode_upload"]["bytes"] == pytest.approx(
        fast["supernode_upload"]["bytes"], rel=AGREEMENT
    )
    assert full["control_messages"]["total"] > 0
    for key in ("p50", "p99"):
        rel = (full["durations"][key] - fast["durations"][key]) / fast["durations"][key]
        assert abs(rel) <= AGREEMENT, (key, fast["durations"][key], full["durations"][key])
    assert verdict["agree"]
    assert list(tmp_path.iterdir()) == []  # the stores are cleaned up


def test_the_engines_agree_when_the_peers_run_out_of_pieces_to_ask_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two and six pieces: a peer often has every offered piece in hand and nothing more to
    ask for. The daemon then announces as the last bytes come in (the session's starved
    rule), and its reply may land before or after those bytes' verdict. The fast engine used
    to give verdicts with the bytes and never see that moment (p50 0.291 s against the
    daemons' 0.245 s, 118 messages against 145); and the daemons' own result hung on the
    order of replies and verdicts at one instant (p50 0.245 s or 0.342 s from run to run).
    Sixteen hosts, not eight: there p99 is one host's time, and one piece's hop (13 %) comes
    and goes with the order in which trio runs the hosts' first calls (pytest's hypothesis
    plugin has trio shuffle its tasks). With batched announces it came with the order in
    which the hosts' registers of each blob reach the supernode (its seeder's stripes are
    dealt by it): p99 0.275 s or 0.34 s in both engines, given the same orders. The full
    engine now breaks that tie as the fast one does (`_ArrivalOrder`)."""
    scenario = replace(SMALL, nodes=16, layers=(4 * MiB, 12 * MiB))
    # the announces each engine's sessions make, as the schedulers see them: since a host's
    # announces are batched, the HTTP message counts also depend on how they are grouped
    # (here the daemons' coalescer groups fewer: 139 messages against the fast engine's 125
    # for 142 and 144 announces; an open question in the issue notes)
    announces: Counter[str] = Counter()
    plain = Scheduler.announce

    def counted(self: Scheduler, digest: Digest, *args: Any, **kwargs: Any) -> Assignment:
        announces[engine] += 1
        return plain(self, digest, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "announce", counted)
    engine = "fast"
    fast = summarize(Sim(scenario).run())
    engine = "full"
    full = summarize(FullStorm(scenario, workdir=tmp_path).run())
    verdict = compare([fast], [full])
    print(format_comparison(verdict), dict(announces))
    assert full["completed"] == scenario.nodes
    assert verdict["agree"]
    for key in ("p50", "p99"):
        assert full["durations"][key] == pytest.approx(fast["durations"][key], rel=AGREEMENT)
    assert announces["full"] == pytest.approx(announces["fast"], rel=AGREEMENT)


async def test_hosts_starting_together_register_each_blob_in_node_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The supernode deals its seeder's stripes by order of arrival in each blob's task; for
    hosts that start at one instant the full engine sends their first registers of a blob in
    node order (the fast engine's tie-break), whatever order trio runs them in."""
    order = _ArrivalOrder(["n0", "n1", "n2"], [0.0, 0.0, 1.0])
    blob_a, blob_b = (Digest.from_bytes(bytes([i]) * 32) for i in (1, 2))
    sent: list[tuple[str, Digest, float]] = []

    def register(peer: str, digest: Digest) -> bytes:
        return wire.encode(
            wire.Register(
                digest=digest,
                size=1,
                peer_id=peer,
                address=f"{peer}:1",
                zone="",
                upload_slots=1,
                upstream="http://registry:5000",
                repository="storm/app",
                authorization=None,
                have=None,
            )
        )

    async def send(peer: str, digest: Digest, after: float = 0.0) -> None:
        await trio.sleep(after)
        delivered = await order.turn("/v1/register", register(peer, digest))
        sent.append((peer, digest, trio.current_time()))
        await trio.sleep(0.001)  # the bytes on their way
        delivered()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "n1", blob_a)  # n1 first, n0 a moment later
        nursery.start_soon(send, "n0", blob_a, 0.0005)
        nursery.start_soon(send, "n2", blob_a)  # another start time: not held
    assert [(p, t) for p, _, t in sent] == [
        ("n2", pytest.approx(0.0)),
        ("n0", pytest.approx(0.0005)),
        ("n1", pytest.approx(0.0015)),
    ]
    sent.clear()
    now = trio.current_time()
    # registering again is no tie; a host whose predecessor never registers waits a bound
    await send("n1", blob_a)
    await send("n1", blob_b)
    assert [(p, d, t - now) for p, d, t in sent] == [
        ("n1", blob_a, pytest.approx(0.0)),
        ("n1", blob_b, pytest.approx(0.001 + _TURN_WAIT)),
    ]
    # other messages are never held
    assert (await order.turn("/v1/announce", b"")) is not None
    assert trio.current_time() - now == pytest.approx(0.002 + _TURN_WAIT)


def _summary(durations: list[float], seed: int = 1) -> dict[str, object]:
    scenario = replace(SMALL, nodes=len(durations), seed=seed)
    n = len(durations)
    return summarize(
        StormResult(
            scenario=scenario,
            engine="test",
            start=[0.0] * n,
            completion=list[float | None](durations),
            node_up=[scenario.node_up] * n,
            node_down=[scenario.node_down] * n,
            registry_egress_bytes=float(scenario.image_size),
            registry_egress_timeline=[(0.0, 0.0)],
            cross_zone_bytes=0.0,
            supernode_upload_bytes=0.0,
            control_messages=n,
            naive_completion=[],
            wall_seconds=0.0,
        )
    )


def test_compare_judges_the_means_of_p50_and_p99_at_ten_per_cent() -> None:
    base = [1.0] * 50 + [2.0] * 50  # p50 1.0, p99 2.0
    close = [1.05] * 50 + [2.15] * 50
    far = [1.0] * 50 + [2.3] * 50  # p99 15% off
    assert compare([_summary(base)], [_summary(close)])["agree"]
    verdict = compare([_summary(base)], [_summary(far)])
    assert not verdict["agree"]
    assert "DISAGREE" in format_comparison(verdict)
    # two runs each: means are compared (1.0 and 1.2 vs 1.1 and 1.1: equal means), ranges kept
    a = [_summary([1.0] * 100), _summary([1.2] * 100, seed=2)]
    b = [_summary([1.1] * 100), _summary([1.1] * 100, seed=2)]
    verdict = compare(a, b)
    assert verdict["agree"]
    p50 = next(r for r in verdict["rows"] if r["figure"] == "duration p50 (s)")
    assert p50["fast_range"] == [1.0, 1.2] and p50["rel"] == pytest.approx(0.0)


async def test_sends_under_free_below_take_no_time(autojump_clock: trio.testing.MockClock) -> None:
    fabric = Fabric(free_below=100)
    a = fabric.add_host("a", up=10.0, down=10.0)
    fabric.add_host("b", up=10.0, down=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(fabric.run)
        fabric.listen("b", 1, _sink, nursery)
        stream = await fabric.connect(a, "b", 1)
        await stream.send_all(b"h" * 99)
        assert trio.current_time() < 0.01
        await stream.send_all(b"b" * 100)
        assert trio.current_time() == pytest.approx(10.0)
        nursery.cancel_scope.cancel()


def test_the_full_engine_refuses_what_it_does_not_model() -> None:
    with pytest.raises(ValueError, match="fast engine only"):
        FullStorm(replace(SMALL, supernodes=2, supernode_failure_at=0.5))
    for what in ({"latency": 0.001}, {"supernode_rate": 1000.0}):
        with pytest.raises(ValueError, match="fast engine only"):
            FullStorm(replace(SMALL, **what))  # type: ignore[arg-type]
