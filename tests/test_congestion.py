"""Piece uploads use a loss-based TCP congestion control, whatever the system's default.

Checked on the server's side of a real accepted connection, as `ss` reports it: the kernel
copies a listener's congestion control to the sockets it accepts, and that is what the
daemons rely on (see `p2pd.http.server.PIECE_CONGESTION`)."""

from __future__ import annotations

import functools
import re
import socket
from pathlib import Path

import trio

from p2pd.config import P2pdConfig
from p2pd.daemon import Running, run_daemon
from p2pd.http.server import (
    PIECE_CONGESTION,
    Request,
    Response,
    bound_port,
    prefer_congestion,
    serve,
)
from tests.supernode.helpers import running


async def _ok(request: Request) -> Response:
    return Response(200, [], b"ok")


def _system_default() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


async def _server_side_congestion(port: int) -> str:
    """Open a connection to 127.0.0.1:`port` and return the congestion control of the
    server's end of it (`ss -ti` names it first on the connection's line of details)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client_port = stream.socket.getsockname()[1]
        filters = f"( sport = :{port} and dport = :{client_port} )"
        with trio.fail_after(10):
            while True:
                done = await trio.run_process(
                    ["ss", "-tinH", "state", "established", filters], capture_stdout=True
                )
                lines = done.stdout.decode().splitlines()
                if len(lines) >= 2:  # the accept may trail the connect by a moment
                    match = re.match(r"\s*(\w+)", lines[1])
                    assert match, lines
                    return match.group(1)
                await trio.sleep(0.01)


async def test_serve_sets_the_congestion_control_of_accepted_connections() -> None:
    # reno: built into every Linux kernel, and not a usual default, so the check can fail
    assert _system_default() != "reno"
    async with trio.open_nursery() as nursery:
        plain = await nursery.start(functools.partial(serve, _ok, "127.0.0.1", 0))
        chosen = await nursery.start(
            functools.partial(serve, _ok, "127.0.0.1", 0, congestion="reno")
        )
        assert await _server_side_congestion(bound_port(plain)) == _system_default()
        assert await _server_side_congestion(bound_port(chosen)) == "reno"
        nursery.cancel_scope.cancel()


async def test_an_unknown_congestion_control_keeps_the_default() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        assert not prefer_congestion(listeners, "no-such-algorithm")
        name = listeners[0].socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        assert name.rstrip(b"\0").decode() == _system_default()
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_supernode_uploads_pieces_with_the_piece_congestion_control(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, None) as harness:
        assert await _server_side_congestion(harness.port) == PIECE_CONGESTION


async def test_p2pd_piece_server_uses_the_piece_congestion_control(tmp_path: Path) -> None:
    config = P2pdConfig.from_mapping(
        {
            "mirror_listen": "127.0.0.1:0",
            "peer_listen": "127.0.0.1:0",
            "advertise": "127.0.0.1:65003",
            "data_dir": str(tmp_path / "data"),
        }
    )
    async with trio.open_nursery() as nursery:
        daemon: Running = await nursery.start(run_daemon, config)
        assert await _server_side_congestion(daemon.ports.peer) == PIECE_CONGESTION
        # the mirror talks to local clients only: left at the default
        assert await _server_side_congestion(daemon.ports.mirror) == _system_default()
        nursery.cancel_scope.cancel()
