"""Shared downloads: one download per blob, streamed in order, verified before the tail."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from p2pd import offload
from p2pd.blobs import BackSource, BlobManager, BlobSource, Download, FillerGaveUp
from p2pd.core.digest import Digest
from p2pd.core.layout import SMALLEST_PIECE_SIZE, LayoutError, PieceLayout
from p2pd.http.server import FileRegion, ResponseAborted
from p2pd.store import BlobStore, StorageFull

UPSTREAM = "http://registry.test"
REPO = "library/app"


def make_blob(size: int, seed: int = 0) -> tuple[Digest, bytes]:
    data = random.Random(seed).randbytes(size)
    return Digest.from_bytes(hashlib.sha256(data).digest()), data


class FakeRegistry:
    def __init__(self, blobs: dict[Digest, bytes], corrupt: bool = False) -> None:
        self.blobs = blobs
        self.corrupt = corrupt
        self.gets: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.gets.append(request)
        digest = Digest.parse(request.url.path.rsplit("/", 1)[1])
        data = self.blobs[digest]
        if self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        if "range" in request.headers:
            start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
            return httpx.Response(206, stream=Chunked(data[start:]))
        return httpx.Response(200, stream=Chunked(data))


class Chunked(httpx.AsyncByteStream):
    """A response body that arrives in pieces, like one from the network."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 65536):
            yield self.data[i : i + 65536]
            await trio.lowlevel.checkpoint()


async def collect(chunks: AsyncIterator[bytes | FileRegion]) -> bytes:
    out = bytearray()
    async for chunk in chunks:
        if isinstance(chunk, FileRegion):
            out += os.pread(chunk.fd, chunk.length, chunk.offset)
        else:
            out += chunk
    return bytes(out)


def manager(
    tmp_path: Path, nursery: trio.Nursery, registry: FakeRegistry
) -> tuple[BlobManager, BlobStore]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(registry.handler))
    store = BlobStore(tmp_path)
    return BlobManager(store, nursery, [BackSource(client, attempts=1)]), store


async def test_two_clients_share_one_download_and_the_blob_is_cached(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(3 * SMALLEST_PIECE_SIZE + 123)
    registry = FakeRegistry({digest: data})
    blobs, store = manager(tmp_path, nursery, registry)
    source = BlobSource(UPSTREAM, REPO, "Bearer t", len(data))
    results: list[bytes] = []

    async def client(start: int) -> None:
        results.append(await collect(blobs.stream(digest, source, start)))

    async with trio.open_nursery() as clients:
        clients.start_soon(client, 0)
        clients.start_soon(client, 1000)
    assert sorted(results, key=len) == [data[1000:], data]
    assert len(registry.gets) == 1
    assert registry.gets[0].headers["authorization"] == "Bearer t"
    assert store.has(digest) and blobs.cached_size(digest) == len(data)
    # served from the cache from now on
    assert await collect(blobs.stream(digest, source, 5)) == data[5:]
    assert len(registry.gets) == 1


async def test_corrupt_blob_aborts_readers_and_is_not_cached(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(2 * SMALLEST_PIECE_SIZE + 10, seed=3)
    registry = FakeRegistry({digest: data}, corrupt=True)
    blobs, store = manager(tmp_path, nursery, registry)
    received = bytearray()
    with pytest.raises(ResponseAborted, match="sha256"):
        async for chunk in blobs.stream(digest, BlobSource(UPSTREAM, REPO, None, len(data)), 0):
            assert isinstance(chunk, FileRegion)
            received += os.pread(chunk.fd, chunk.length, chunk.offset)
    # the reader never got the (corrupt) last piece
    assert len(received) <= 2 * SMALLEST_PIECE_SIZE
    assert received == data[: len(received)]
    assert not store.has(digest)
    await trio.testing.wait_all_tasks_blocked()
    assert not list((tmp_path / "partial").iterdir())


async def test_empty_blob(tmp_path: Path, nursery: trio.Nursery) -> None:
    digest, data = make_blob(0)
    blobs, store = manager(tmp_path, nursery, FakeRegistry({digest: data}))
    assert await collect(blobs.stream(digest, BlobSource(UPSTREAM, REPO, None, 0), 0)) == b""
    assert store.has(digest)


class StallingFiller:
    def __init__(self, pieces: list[int], data: bytes) -> None:
        self.pieces = pieces
        self.data = data

    async def fill(self, download: Download, source: BlobSource) -> None:
        for i in self.pieces:
            off, n = download.layout.span(i)
            download.put_piece(i, self.data[off : off + n], "peer:test")
        raise FillerGaveUp("no progress")


async def test_registry_fallback_resumes_after_the_swarm_gave_up(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(4 * SMALLEST_PIECE_SIZE, seed=5)
    registry = FakeRegistry({digest: data})
    client = httpx.AsyncClient(transport=httpx.MockTransport(registry.handler))
    store = BlobStore(tmp_path)
    blobs = BlobManager(
        store, nursery, [StallingFiller([0, 1, 3], data), BackSource(client, attempts=1)]
    )
    got = await collect(blobs.stream(digest, BlobSource(UPSTREAM, REPO, None, len(data)), 0))
    assert got == data
    assert registry.gets[0].headers["range"] == f"bytes={2 * SMALLEST_PIECE_SIZE}-"
    assert store.has(digest)


async def test_pieces_claimed_by_a_previous_run_are_not_trusted_unchecked(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(3 * SMALLEST_PIECE_SIZE, seed=8)
    layout = PieceLayout.for_size(len(data))
    # a crash left a claim for piece 0 whose bytes never reached the disk
    part = BlobStore(tmp_path).open_partial(digest, layout)
    part.have.add(0)
    part.save_meta()
    part.close()
    registry = FakeRegistry({digest: data})
    client = httpx.AsyncClient(transport=httpx.MockTransport(registry.handler))
    store = BlobStore(tmp_path)
    blobs = BlobManager(store, nursery, [BackSource(client, attempts=1)])
    got = await collect(blobs.stream(digest, BlobSource(UPSTREAM, REPO, None, len(data)), 0))
    assert got == data
    assert "range" not in registry.gets[0].headers  # fetched from the start, claim ignored
    assert store.has(digest)


async def test_a_failed_download_is_forgotten_at_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(SMALLEST_PIECE_SIZE + 5, seed=9)
    registry = FakeRegistry({digest: data}, corrupt=True)
    blobs, _ = manager(tmp_path, nursery, registry)
    source = BlobSource(UPSTREAM, REPO, None, len(data))
    with pytest.raises(ResponseAborted):
        await collect(blobs.stream(digest, source, 0))
    assert blobs.active(digest) is None
    registry.corrupt = False
    assert await collect(blobs.stream(digest, source, 0)) == data


class DiskFullInsideFiller:
    """A filler whose own task hit a full disk: it reaches the manager in an exception group,
    as trio's nurseries deliver it."""

    async def fill(self, download: Download, source: BlobSource) -> None:
        raise ExceptionGroup("filler tasks", [StorageFull("no space left on the device")])


async def test_a_full_disk_inside_a_filler_is_the_caches_trouble_not_a_filler_bug(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    digest, data = make_blob(2 * SMALLEST_PIECE_SIZE, seed=9)
    registry = FakeRegistry({digest: data})
    client = httpx.AsyncClient(transport=httpx.MockTransport(registry.handler))
    store = BlobStore(tmp_path)
    blobs = BlobManager(store, nursery, [DiskFullInsideFiller(), BackSource(client, attempts=1)])
    got = await collect(blobs.stream(digest, BlobSource(UPSTREAM, REPO, None, len(data)), 0))
    assert got == data  # streamed from the registry, verified, not cached
    assert blobs.back_to_source == 0  # not handed to the next filler as if a filler bug
    assert blobs.uncached == 1 and len(registry.gets) == 1
    assert not store.has(digest)


@pytest.mark.parametrize(
    ("order", "read_back"),
    [
        ((0, 1, 2, 3), set()),  # in order: every piece hashed from the filler's buffer
        ((1, 0, 3, 2), {1, 3}),  # a piece ahead of the hashed prefix is read back later
    ],
)
async def test_pieces_written_next_to_the_hashed_prefix_are_hashed_from_the_buffer(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: tuple[int, ...],
    read_back: set[int],
) -> None:
    layout = PieceLayout(4000, 1000)
    digest, data = make_blob(layout.total_size, seed=7)
    download = Download(digest, BlobStore(tmp_path).open_partial(digest, layout))
    read_back_pieces: set[int] = set()
    preadv = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = preadv(fd, buffers, offset)
        read_back_pieces.update(range(offset // 1000, (offset + n - 1) // 1000 + 1))
        return n

    monkeypatch.setattr(os, "preadv", counting)
    # the hasher on the trio thread, so that each step below finds it done with the last
    with offload.inline():
        await fill_in(download, layout, data, order)
    assert download.state.value == "complete"
    assert read_back_pieces == read_back


async def fill_in(
    download: Download, layout: PieceLayout, data: bytes, order: tuple[int, ...]
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(download.hash_and_commit)
        for index in order:
            offset, length = layout.span(index)
            piece = memoryview(data)[offset : offset + length]
            download.partial.write_bytes(index, piece)  # as the swarm's worker thread does
            download.hash_if_next(index, piece)
            download.mark_written(index, "peer:p")
            await trio.testing.wait_all_tasks_blocked()


async def test_no_commit_before_every_piece_is_marked_written(tmp_path: Path) -> None:
    # two pieces written and hashed from their buffers in two worker threads; the loop hears
    # of piece 0 first: the hasher has the whole sha256 but must wait for piece 1's mark
    layout = PieceLayout(2000, 1000)
    digest, data = make_blob(layout.total_size, seed=7)
    download = Download(digest, BlobStore(tmp_path).open_partial(digest, layout))
    with offload.inline():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(download.hash_and_commit)
            await trio.testing.wait_all_tasks_blocked()
            for index in (0, 1):
                offset, length = layout.span(index)
                download.partial.write_bytes(index, data[offset : offset + length])
                download.hash_if_next(index, memoryview(data)[offset : offset + length])
            download.mark_written(0, "peer:p")
            await trio.testing.wait_all_tasks_blocked()
            assert download.state.value == "running"
            download.mark_written(1, "peer:p")
    assert download.state.value == "complete"
    assert sorted(download.have) == [0, 1]


def test_a_download_cut_anew_keeps_only_claims_its_old_pieces_cover(tmp_path: Path) -> None:
    digest, data = make_blob(600_000, seed=12)
    rules = PieceLayout.for_size(len(data))  # 3 pieces of 256 KiB
    chosen = PieceLayout(len(data), 64 * 1024)  # the supernode's: 10 pieces
    part = BlobStore(tmp_path).open_partial(digest, rules)
    part.have.add(0)  # bytes 0..262143: new pieces 0-3
    part.have.add(2)  # bytes 524288..599999: new pieces 8 and 9
    part.save_meta()
    part.close()
    download = Download(digest, BlobStore(tmp_path).open_partial(digest, rules))
    download.relayout(chosen)
    assert download.layout == chosen == download.partial.layout
    assert list(download.claimed) == [0, 1, 2, 3, 8, 9]
    assert download.have.length == chosen.count and download.have.is_empty()
    download.put_piece(4, data[4 * 65536 : 5 * 65536], "peer:x")
    with pytest.raises(LayoutError, match="already written"):
        download.relayout(rules)  # a piece counted: too late to cut it otherwise
    download.partial.close()
