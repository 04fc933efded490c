"""The blob cache: partial downloads, resume after restart, commit, quota with leases."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from pathlib import Path

import pytest

from p2pd import store as store_module
from p2pd.core.digest import Digest
from p2pd.core.layout import PieceLayout
from p2pd.core.manifest import ManifestBuilder, PieceManifest
from p2pd.store import BlobStore, StorageError, StorageFull


def blob(n: int, seed: int = 0) -> tuple[Digest, bytes]:
    data = random.Random(seed).randbytes(n)
    return Digest.from_bytes(hashlib.sha256(data).digest()), data


def manifest_for(digest: Digest, data: bytes, layout: PieceLayout) -> PieceManifest:
    m = PieceManifest(digest, layout)
    b = ManifestBuilder(m)
    b.feed(data)
    assert b.finish()
    return m


def fill(store: BlobStore, seed: int, size: int = 1000) -> Digest:
    return fill_in(store, PieceLayout(size, 256), seed)[0]


def fill_in(store: BlobStore, layout: PieceLayout, seed: int = 3) -> tuple[Digest, bytes]:
    """A complete blob stored piece by piece in `layout`: its digest and bytes."""
    digest, data = blob(layout.total_size, seed)
    part = store.open_partial(digest, layout)
    for i in range(layout.count):
        off, n = layout.span(i)
        part.write_piece(i, data[off : off + n])
    part.commit()
    part.close()
    return digest, data


def test_write_commit_and_read_back(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest, data = blob(1000)
    layout = PieceLayout(1000, 256)
    part = store.open_partial(digest, layout)
    for i in reversed(range(layout.count)):
        off, n = layout.span(i)
        part.write_piece(i, data[off : off + n])
    assert part.have.is_full()
    assert not store.has(digest)
    path = part.commit()
    assert store.has(digest) and path.read_bytes() == data
    assert part.read(0, 10) == data[:10]  # the fd survives the rename
    part.close()
    assert not list((tmp_path / "partial").iterdir())


def test_wrong_piece_length_is_refused(tmp_path: Path) -> None:
    digest, _ = blob(1000)
    part = BlobStore(tmp_path).open_partial(digest, PieceLayout(1000, 256))
    with pytest.raises(StorageError, match="256 bytes"):
        part.write_piece(0, b"x" * 10)
    part.close()


def test_resume_after_restart_rechecks_claimed_pieces(tmp_path: Path) -> None:
    digest, data = blob(1000)
    layout = PieceLayout(1000, 256)
    part = BlobStore(tmp_path).open_partial(digest, layout)
    part.write_piece(0, data[:256])
    part.write_piece(2, data[512:768])
    part.save_meta()
    part.close()
    # simulate a crash that lost the bytes of piece 2 but kept the meta
    with open(tmp_path / "partial" / f"{digest.hex}.part", "r+b") as f:
        f.seek(512)
        f.write(b"\0" * 256)

    store = BlobStore(tmp_path)
    assert not store.has(digest)
    part = store.open_partial(digest, layout)
    assert list(part.have) == [0, 2]
    assert part.recheck(manifest_for(digest, data, layout)) == [2]
    assert list(part.have) == [0]
    part.close()


def test_corrupt_meta_starts_over(tmp_path: Path) -> None:
    digest, data = blob(1000)
    layout = PieceLayout(1000, 256)
    part = BlobStore(tmp_path).open_partial(digest, layout)
    part.write_piece(1, data[256:512])
    part.save_meta()
    part.close()
    (tmp_path / "partial" / f"{digest.hex}.meta").write_bytes(b"\xc1garbage")
    part = BlobStore(tmp_path).open_partial(digest, layout)
    assert part.have.is_empty()
    part.close()


def test_half_written_blob_is_never_complete_after_restart(tmp_path: Path) -> None:
    digest, data = blob(1000)
    part = BlobStore(tmp_path).open_partial(digest, PieceLayout(1000, 256))
    part.write_piece(0, data[:256])
    part.close()  # crash: no commit
    (tmp_path / "blobs" / "not-a-digest").write_bytes(b"x")  # stray file is ignored
    store = BlobStore(tmp_path)
    assert not store.has(digest)
    with pytest.raises(StorageError, match="vanished"):
        store.open_complete(digest)


def test_complete_blobs_survive_restart(tmp_path: Path) -> None:
    digest = fill(BlobStore(tmp_path), 1)
    store = BlobStore(tmp_path)
    assert store.has(digest) and store.size_of(digest) == 1000


def test_quota_evicts_least_recently_used_but_never_leased(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    a, b, c = (fill(store, s) for s in (1, 2, 3))
    store.touch(a)  # b is now the least recently used
    assert store.reserve(500) == [b]
    assert store.has(a) and store.has(c) and not store.has(b)
    with store.lease(c):
        assert store.reserve(1500) == [a]
        with pytest.raises(StorageFull, match="quota"):
            store.reserve(2500)
        assert store.has(c)
    assert store.usage() == 1000


def test_partial_bytes_count_against_the_quota(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=1500)
    digest, _ = blob(1000, 9)
    part = store.open_partial(digest, PieceLayout(1000, 256))
    with pytest.raises(StorageFull):
        store.reserve(1000)
    part.discard()
    part.close()
    assert store.usage() == 0
    assert store.reserve(1000) == []


def test_lru_order_survives_a_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    a, b, c = (fill(store, s) for s in (1, 2, 3))
    store.touch(a)
    store.touch(b)  # c is now the least recently used, then a
    store = BlobStore(tmp_path, quota_bytes=3000)
    assert store.reserve(1500) == [c, a]
    assert store.has(b)


def test_abandoned_partials_are_evicted_but_never_an_open_one(tmp_path: Path) -> None:
    old, _ = blob(1000, 11)
    part = BlobStore(tmp_path).open_partial(old, PieceLayout(1000, 256))
    part.save_meta()
    part.close()  # an earlier run left it behind
    store = BlobStore(tmp_path, quota_bytes=2500)
    complete = fill(store, 1)  # used after the partial was last written
    assert store.usage() == 2000
    # the partial about to be resumed is not a candidate; the complete blob is
    assert store.reserve(1000, keep=old) == [complete]
    fill(store, 2)
    assert store.reserve(1000) == [old]  # abandoned, least recently used: it goes first
    assert not (tmp_path / "partial" / f"{old.hex}.part").exists()
    assert not (tmp_path / "partial" / f"{old.hex}.meta").exists()
    running, _ = blob(1000, 12)
    live = store.open_partial(running, PieceLayout(1000, 256))  # a download in progress
    with pytest.raises(StorageFull, match="in use"), store.lease(blob(1000, 2)[0]):
        store.reserve(1500)
    assert live.store.partial_size(running) == 1000
    live.close()


def test_orphaned_meta_files_are_removed_at_start(tmp_path: Path) -> None:
    digest = fill(BlobStore(tmp_path), 1)
    other, _ = blob(1000, 5)
    partial = tmp_path / "partial"
    (partial / f"{digest.hex}.meta").write_bytes(b"stale")  # its blob is complete
    (partial / f"{other.hex}.meta").write_bytes(b"stale")  # its .part is gone
    BlobStore(tmp_path)
    assert list(partial.iterdir()) == []


def test_a_failed_reserve_still_names_what_it_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quota step may evict before the disk step finds no room: the caller must learn
    what went (the supernode keeps tasks for its blobs)."""
    store = BlobStore(tmp_path, quota_bytes=2000)
    a, b = fill(store, 1), fill(store, 2)
    monkeypatch.setattr(store, "_disk_shortfall", lambda size: 10**12)
    with pytest.raises(StorageFull, match="on the disk") as failure:
        store.reserve(500)
    assert failure.value.evicted == (a,) and not store.has(a) and store.has(b)


# -- open_reader: one fd kept per complete blob for the piece server --------------------------


def open_fds() -> set[str]:
    """What this process's fds point at."""
    out = set()
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # (the listing's own fd, closed now)
            out.add(os.readlink(f"/proc/self/fd/{n}"))
    return out


def test_a_reader_reads_the_blob_and_one_fd_per_blob_stays_open(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = fill(store, 1)
    _, data = blob(1000, 1)
    fds = [store.open_reader(digest) for _ in range(3)]
    try:
        assert all(fd is not None and os.pread(fd, 1000, 0) == data for fd in fds)
        assert len({fd for fd in fds}) == 3  # each caller gets an fd of its own
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
    # the store keeps exactly one open on the blob, and closes it with its readers
    assert sum(p == str(store.path_of(digest)) for p in open_fds()) == 1
    store.close_readers()
    assert str(store.path_of(digest)) not in open_fds()
    assert store.open_reader(Digest("ab" * 32)) is None  # not here: no fd


def test_removing_a_blob_closes_its_reader_but_not_one_handed_out(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, quota_bytes=2000)
    a, b = fill(store, 1), fill(store, 2)
    fd = store.open_reader(a)
    assert fd is not None
    try:
        assert store.reserve(1000) == [b]  # a was read more recently
        assert store.reserve(2000) == [a]
        assert sum(p.startswith(str(store.path_of(a))) for p in open_fds()) == 1  # ours
        assert os.pread(fd, 1000, 0) == blob(1000, 1)[1]  # the piece being sent goes on
    finally:
        os.close(fd)
    assert store.open_reader(a) is None


def test_a_blob_deleted_behind_the_store_is_found_at_the_next_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    digest = fill(store, 1)
    fd = store.open_reader(digest)
    assert fd is not None
    os.close(fd)
    store.path_of(digest).unlink()
    monkeypatch.setattr(store_module, "_STAMP_EVERY_NS", 0)
    assert store.open_reader(digest) is None
    assert not store.has(digest)
    assert not any(p.startswith(str(store.path_of(digest))) for p in open_fds())


def test_readers_stamp_recency_in_memory_always_and_on_disk_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path, quota_bytes=3000)
    a, b, c = (fill(store, s) for s in (1, 2, 3))
    path = store.path_of(a)
    for digest in (a, b):
        fd = store.open_reader(digest)
        assert fd is not None
        os.close(fd)
    stamped = path.stat().st_mtime_ns
    fd = store.open_reader(a)  # within _STAMP_EVERY_NS: not written again
    assert fd is not None
    os.close(fd)
    assert path.stat().st_mtime_ns == stamped
    assert store.reserve(1000) == [c]  # but in memory a and b are both newer than c
    assert store.reserve(2000) == [b]  # and a newer than b
    monkeypatch.setattr(store_module, "_STAMP_EVERY_NS", 0)
    fd = store.open_reader(a)
    assert fd is not None
    os.close(fd)
    assert path.stat().st_mtime_ns > stamped
    assert BlobStore(tmp_path)._complete[a].atime == path.stat().st_mtime_ns


def test_readers_kept_open_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_READERS_MAX", 2)
    store = BlobStore(tmp_path)
    digests = [fill(store, s) for s in (1, 2, 3)]
    for digest in (*digests, digests[0]):
        fd = store.open_reader(digest)
        assert fd is not None
        os.close(fd)
    kept = {p for p in open_fds() if p.startswith(str(store.blobs_dir))}
    # the least recently read (the second) was closed
    assert kept == {str(store.path_of(digests[0])), str(store.path_of(digests[2]))}
    store.close_readers()


# -- a blob's layout: its supernode's, recorded with it -----------------------------------------

# The rule cuts this blob in 3 pieces of 256 KiB; its supernode chose 10 of 64 KiB.
CHOSEN = PieceLayout(600_000, 64 * 1024)
RULES = PieceLayout.for_size(CHOSEN.total_size)
assert RULES.piece_size == 256 * 1024 and RULES != CHOSEN


def test_a_complete_blob_keeps_its_supernodes_layout_across_a_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest, _ = fill_in(store, CHOSEN)
    assert store.layout_of(digest) == CHOSEN
    assert BlobStore(tmp_path).layout_of(digest) == CHOSEN
    # a blob committed in the rule's layout is recorded too (the rule may change)
    other, _ = fill_in(store, RULES, seed=4)
    assert BlobStore(tmp_path).layout_of(other) == RULES
    store.remove(digest)
    assert not (tmp_path / "layouts" / digest.hex).exists()
    assert BlobStore(tmp_path).layout_of(digest) is None


@pytest.mark.parametrize(
    "record",
    [
        None,  # an older version's blob
        b"\xc1garbage",
        b"",
        store_module.msgpack.packb({"v": 1, "size": 600_001, "piece_size": 65536}),
        store_module.msgpack.packb({"v": 1, "size": 600_000, "piece_size": 65535}),
        store_module.msgpack.packb({"v": 1, "size": 600_000, "piece_size": 1024}),
        store_module.msgpack.packb({"v": 1, "size": 600_000, "piece_size": "65536"}),
        store_module.msgpack.packb({"v": 9, "size": 600_000, "piece_size": 65536}),
        store_module.msgpack.packb([1, 600_000, 65536]),
    ],
)
def test_a_blob_without_a_usable_layout_record_has_the_rules(
    tmp_path: Path, record: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    digest, data = fill_in(BlobStore(tmp_path), CHOSEN)
    path = tmp_path / "layouts" / digest.hex
    if record is None:
        path.unlink()
    else:
        path.write_bytes(record)
    store = BlobStore(tmp_path)
    assert store.layout_of(digest) == RULES
    assert store.path_of(digest).read_bytes() == data  # the blob itself stays
    assert ("unusable layout record" in caplog.text) == (record is not None)
    assert not path.exists()  # an unusable record goes: the warning does not come back


def test_layout_records_without_their_blob_are_removed_at_start(tmp_path: Path) -> None:
    digest, _ = fill_in(BlobStore(tmp_path), CHOSEN)
    store_module.os.unlink(tmp_path / "blobs" / digest.hex)  # gone behind the store's back
    (tmp_path / "layouts" / "x.tmp").write_bytes(b"half written")
    store = BlobStore(tmp_path)
    assert not store.has(digest)
    assert list((tmp_path / "layouts").iterdir()) == []


def test_a_resumed_download_keeps_the_layout_it_was_started_with(tmp_path: Path) -> None:
    digest, data = blob(CHOSEN.total_size, 3)
    part = BlobStore(tmp_path).open_partial(digest, CHOSEN)
    part.write_piece(1, data[65536:131072])
    part.save_meta()
    part.close()
    # the restarted daemon offers the rule's layout; the download was cut otherwise
    part = BlobStore(tmp_path).open_partial(digest, RULES)
    assert part.layout == CHOSEN and list(part.have) == [1]
    part.close()


def test_a_partial_blob_is_cut_anew_before_it_holds_pieces(tmp_path: Path) -> None:
    digest, _ = blob(CHOSEN.total_size, 3)
    part = BlobStore(tmp_path).open_partial(digest, RULES)
    part.relayout(CHOSEN)
    assert part.layout == CHOSEN and part.have.length == CHOSEN.count
    with pytest.raises(store_module.LayoutError, match="600001 bytes"):
        part.relayout(PieceLayout(600_001, 65536))
    part.close()
    part = BlobStore(tmp_path).open_partial(digest, RULES)
    assert part.layout == CHOSEN  # saved at once
    part.close()
