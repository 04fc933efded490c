"""Cluster signatures: pieces and control messages only for holders of the fleet's secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pd.clusterauth import ClusterAuth, ClusterAuthError
from p2pd.core.layout import SMALLEST_PIECE_SIZE
from p2pd.peers import PieceClient, PieceFetchError
from tests.test_peers import SIZE, start_server_with

SECRET = b"0123456789abcdef-fleet"


def clock(t: float) -> ClusterAuth:
    return ClusterAuth(SECRET, clock=lambda: t, max_skew=300)


def test_sign_and_check() -> None:
    sig = clock(1000).sign("POST", "/v1/announce", b"body")
    assert sig is not None and sig.startswith("1000.")
    clock(1100).check(sig, "POST", "/v1/announce", b"body")
    for method, target, body in [
        ("GET", "/v1/announce", b"body"),
        ("POST", "/v1/register", b"body"),
        ("POST", "/v1/announce", b"other"),
    ]:
        with pytest.raises(ClusterAuthError, match="bad cluster signature"):
            clock(1000).check(sig, method, target, body)
    with pytest.raises(ClusterAuthError, match="expired"):
        clock(1400).check(sig, "POST", "/v1/announce", b"body")
    with pytest.raises(ClusterAuthError, match="missing"):
        clock(1000).check(None, "POST", "/v1/announce", b"body")
    other = ClusterAuth(b"another-secret-of-16+", clock=lambda: 1000)
    with pytest.raises(ClusterAuthError, match="bad"):
        other.check(sig, "POST", "/v1/announce", b"body")


def test_no_secret_means_open_and_unsigned() -> None:
    open_ = ClusterAuth(None)
    assert open_.sign("GET", "/x") is None
    open_.check(None, "GET", "/x")
    with pytest.raises(ValueError, match="16 bytes"):
        ClusterAuth(b"short")


async def test_piece_server_refuses_unsigned_requests(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    auth = ClusterAuth(SECRET)
    address, digest, data = await start_server_with(nursery, tmp_path, auth=auth)
    buf = bytearray(SIZE - 2 * SMALLEST_PIECE_SIZE)
    with pytest.raises(PieceFetchError, match="answered 401"):
        await PieceClient().fetch(address, digest, 2, memoryview(buf))
    with pytest.raises(PieceFetchError, match="answered 401"):
        await PieceClient(auth=ClusterAuth(b"not-the-fleet-secret")).fetch(
            address, digest, 2, memoryview(buf)
        )
    member = PieceClient(auth=ClusterAuth(SECRET))
    await member.fetch(address, digest, 2, memoryview(buf))
    assert buf == data[-len(buf) :]
    await member.aclose()
