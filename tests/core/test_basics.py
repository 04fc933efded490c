"""Digest, piece layout, bitfield and manifest: the core's value types."""

from __future__ import annotations

import hashlib
import random

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.bitfield import Bitfield, BitfieldError, iter_bits
from p2pd.core.digest import Digest, DigestError
from p2pd.core.layout import (
    MAX_BLOB_SIZE,
    MAX_PIECES,
    PIECE_SIZE,
    SMALLEST_PIECE_SIZE,
    TARGET_MAX_PIECES,
    TARGET_MIN_PIECES,
    LayoutError,
    PieceLayout,
)
from p2pd.core.manifest import HASH_SIZE, ManifestBuilder, ManifestError, PieceManifest

MiB = 1024 * 1024


def digest_of(data: bytes) -> Digest:
    return Digest.from_bytes(hashlib.sha256(data).digest())


# -- digest ----------------------------------------------------------------------------------


def test_digest_round_trip() -> None:
    text = "sha256:" + "ab" * 32
    d = Digest.parse(text)
    assert str(d) == text
    assert d.raw == bytes.fromhex("ab" * 32)
    assert Digest.from_bytes(d.raw) == d


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha256:" + "AB" * 32,
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 33,
        "sha512:" + "ab" * 32,
        "sha256:" + "../" * 21 + "a",
        "sha256:" + "ab" * 32 + "\n",
        " sha256:" + "ab" * 32,
    ],
)
def test_digest_rejects(text: str) -> None:
    with pytest.raises(DigestError, match="not a sha256 digest"):
        Digest.parse(text)


def test_digest_rejects_non_str_and_wrong_length_bytes() -> None:
    with pytest.raises(DigestError):
        Digest.parse(b"sha256:" + b"ab" * 32)  # type: ignore[arg-type]
    with pytest.raises(DigestError, match="32 bytes"):
        Digest.from_bytes(b"\0" * 31)


# -- layout ----------------------------------------------------------------------------------


def test_layout_empty_blob_has_no_pieces() -> None:
    lay = PieceLayout.for_size(0)
    assert lay.count == 0
    assert lay.piece_size == SMALLEST_PIECE_SIZE
    with pytest.raises(LayoutError):
        lay.length(0)


def test_layout_one_byte() -> None:
    lay = PieceLayout.for_size(1)
    assert (lay.count, lay.span(0)) == (1, (0, 1))


@pytest.mark.parametrize("k", [TARGET_MIN_PIECES, 300, TARGET_MAX_PIECES])
def test_layout_exact_multiple_has_full_last_piece(k: int) -> None:
    lay = PieceLayout.for_size(k * PIECE_SIZE)
    assert lay.piece_size == PIECE_SIZE
    assert lay.count == k
    assert lay.length(k - 1) == PIECE_SIZE


def test_layout_one_past_a_multiple() -> None:
    lay = PieceLayout.for_size(3 * SMALLEST_PIECE_SIZE + 1)
    assert lay.count == 4
    assert lay.span(3) == (3 * SMALLEST_PIECE_SIZE, 1)


def test_layout_small_blobs_get_smaller_pieces_down_to_the_smallest() -> None:
    # 2 MiB pieces from TARGET_MIN_PIECES of them up
    assert PieceLayout.for_size(TARGET_MIN_PIECES * PIECE_SIZE).piece_size == PIECE_SIZE
    assert PieceLayout.for_size((TARGET_MIN_PIECES - 1) * PIECE_SIZE).piece_size == PIECE_SIZE // 2
    # Storm-A's 30 MiB layer: 120 pieces of 256 KiB; its 200 MiB one: 200 of 1 MiB
    assert PieceLayout.for_size(30 << 20) == PieceLayout(30 << 20, SMALLEST_PIECE_SIZE)
    assert PieceLayout.for_size(200 << 20).count == 200
    # never below the smallest, however few pieces that leaves
    assert PieceLayout.for_size(5 * SMALLEST_PIECE_SIZE).count == 5


def test_layout_piece_size_doubles_past_target_count() -> None:
    lay = PieceLayout.for_size(TARGET_MAX_PIECES * PIECE_SIZE + 1)
    assert lay.piece_size == 2 * PIECE_SIZE
    assert lay.count == TARGET_MAX_PIECES // 2 + 1


def test_layout_huge_sizes() -> None:
    lay = PieceLayout.for_size(MAX_BLOB_SIZE)
    assert lay.count == TARGET_MAX_PIECES
    assert lay.offset(lay.count - 1) + lay.length(lay.count - 1) == MAX_BLOB_SIZE
    with pytest.raises(LayoutError, match="blob size out of range"):
        PieceLayout.for_size(MAX_BLOB_SIZE + 1)
    with pytest.raises(LayoutError, match="exceed the limit"):
        PieceLayout(MAX_PIECES * 2, 1)


@pytest.mark.parametrize("size", [-1, 1.5, True])
def test_layout_rejects_bad_sizes(size: object) -> None:
    with pytest.raises(LayoutError):
        PieceLayout.for_size(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("piece_size", [0, -4, 2**40])
def test_layout_rejects_bad_piece_sizes(piece_size: int) -> None:
    with pytest.raises(LayoutError, match="piece size"):
        PieceLayout(100, piece_size)


def test_layout_index_and_offset_checks() -> None:
    lay = PieceLayout(10, 4)
    assert [lay.length(i) for i in range(lay.count)] == [4, 4, 2]
    assert [lay.piece_at(o) for o in (0, 3, 4, 9)] == [0, 0, 1, 2]
    for bad in (-1, 3):
        with pytest.raises(LayoutError, match="piece index"):
            lay.offset(bad)
    with pytest.raises(LayoutError, match="byte offset"):
        lay.piece_at(10)


@given(st.integers(min_value=0, max_value=MAX_BLOB_SIZE))
def test_layout_rule_invariants(size: int) -> None:
    lay = PieceLayout.for_size(size)
    assert lay.count <= TARGET_MAX_PIECES
    assert lay.piece_size >= SMALLEST_PIECE_SIZE
    assert lay.piece_size & (lay.piece_size - 1) == 0
    # 2 MiB, unless that gives too few pieces (then the largest size that gives enough, or
    # the smallest) or too many (then the smallest size that keeps the count under the target)
    if lay.piece_size > PIECE_SIZE:
        assert -(-size // (lay.piece_size // 2)) > TARGET_MAX_PIECES
    elif lay.piece_size < PIECE_SIZE:
        assert -(-size // (lay.piece_size * 2)) < TARGET_MIN_PIECES
        assert lay.count >= TARGET_MIN_PIECES or lay.piece_size == SMALLEST_PIECE_SIZE
    if size:
        assert sum(lay.length(i) for i in (0, lay.count - 1)) <= 2 * lay.piece_size
        assert lay.offset(lay.count - 1) + lay.length(lay.count - 1) == size
        assert 1 <= lay.length(lay.count - 1) <= lay.piece_size


# -- bitfield --------------------------------------------------------------------------------


def test_bitfield_basics() -> None:
    b = Bitfield(10)
    assert b.is_empty() and not b.is_full() and b.first_missing() == 0
    assert b.add(0) and b.add(1) and b.add(3)
    assert not b.add(3)
    assert list(b) == [0, 1, 3] and b.count() == 3 == len(b)
    assert 3 in b and 2 not in b and 10 not in b and "x" not in b
    assert b.first_missing() == 2
    b.discard(1)
    assert b.first_missing() == 1
    assert Bitfield.full(10).first_missing() == 10
    assert Bitfield(0).first_missing() == 0 and Bitfield(0).is_full()


def test_bitfield_set_algebra() -> None:
    child = Bitfield.from_indexes(8, [0, 1])
    parent = Bitfield.from_indexes(8, [1, 2, 5])
    assert list(iter_bits(child.missing_from(parent))) == [2, 5]
    assert child.update(parent.bits) == parent.bits & ~0b11
    assert list(child) == [0, 1, 2, 5]
    assert child.copy() == child and child.copy() is not child


def test_bitfield_rejects_out_of_range() -> None:
    b = Bitfield(9)
    for bad in (-1, 9):
        with pytest.raises(BitfieldError, match="out of range"):
            b.add(bad)
    with pytest.raises(BitfieldError, match="beyond length"):
        b.update(1 << 9)
    with pytest.raises(BitfieldError, match="beyond length"):
        Bitfield(3, 0b1000)
    with pytest.raises(BitfieldError):
        Bitfield(-1)


def test_bitfield_wire_form() -> None:
    b = Bitfield.from_indexes(9, [0, 8])
    assert b.to_bytes() == b"\x01\x01"
    assert Bitfield.from_bytes(9, b"\x01\x01") == b
    with pytest.raises(BitfieldError, match="needs 2 bytes"):
        Bitfield.from_bytes(9, b"\x01")
    with pytest.raises(BitfieldError, match="beyond length"):
        Bitfield.from_bytes(9, b"\x01\x02")  # bit 9 set in a 9-piece field


@given(
    st.integers(0, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0))))
    )
)
def test_bitfield_round_trip(case: tuple[int, set[int]]) -> None:
    n, idx = case
    idx = {i for i in idx if i < n}
    b = Bitfield.from_indexes(n, idx)
    assert set(b) == idx
    assert Bitfield.from_bytes(n, b.to_bytes()) == b
    expected_first = next(i for i in range(n + 1) if i not in idx)
    assert b.first_missing() == expected_first


# -- manifest --------------------------------------------------------------------------------


def _blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@given(size=st.integers(0, 5000), piece=st.integers(1, 700), chunk=st.integers(1, 900))
def test_builder_hashes_every_piece_in_any_chunking(size: int, piece: int, chunk: int) -> None:
    data = _blob(size)
    manifest = PieceManifest(digest_of(data), PieceLayout(size, piece))
    builder = ManifestBuilder(manifest)
    for i in range(0, size, chunk):
        builder.feed(data[i : i + chunk])
    assert builder.finish()
    assert manifest.sealed and manifest.known == manifest.layout.count
    for i in range(manifest.layout.count):
        off, length = manifest.layout.span(i)
        assert manifest.hash_of(i) == xxhash.xxh3_128_digest(data[off : off + length])
        assert manifest.verify(i, data[off : off + length])


def test_builder_publishes_hashes_as_pieces_complete() -> None:
    data = _blob(10)
    manifest = PieceManifest(digest_of(data), PieceLayout(10, 4))
    builder = ManifestBuilder(manifest)
    assert builder.feed(data[:3]) == 0 and manifest.known == 0
    assert builder.feed(data[3:9]) == 2 and manifest.known == 2
    assert builder.feed(data[9:]) == 1 and manifest.known == 3
    assert not manifest.sealed
    assert builder.finish() and manifest.sealed


def test_builder_wrong_sha256_is_not_sealed() -> None:
    data = _blob(100)
    manifest = PieceManifest(digest_of(b"other"), PieceLayout(100, 32))
    builder = ManifestBuilder(manifest)
    builder.feed(data)
    assert not builder.finish()
    assert not manifest.sealed


def test_builder_rejects_wrong_length() -> None:
    data = _blob(100)
    builder = ManifestBuilder(PieceManifest(digest_of(data), PieceLayout(100, 32)))
    with pytest.raises(ManifestError, match="longer than"):
        builder.feed(data + b"x")
    builder.feed(data[:50])
    with pytest.raises(ManifestError, match="ended after 50"):
        builder.finish()


def test_manifest_extend_rules() -> None:
    lay = PieceLayout(40, 10)
    m = PieceManifest(digest_of(b""), lay)
    h = [bytes([i]) * HASH_SIZE for i in range(4)]
    assert m.extend(0, h[0] + h[1]) == 2
    assert m.extend(1, h[1] + h[2]) == 1  # overlap that agrees
    assert m.known == 3 and m.hashes == h[0] + h[1] + h[2] and m.hashes_from(2) == h[2]
    with pytest.raises(ManifestError, match="contradict"):
        m.extend(2, h[3])
    assert m.extend(4, b"") == 0  # an empty update from further on says nothing
    with pytest.raises(ManifestError, match="known prefix ends at 3"):
        m.extend(4, h[3])
    with pytest.raises(ManifestError, match="multiple of 16"):
        m.extend(3, b"x")
    with pytest.raises(ManifestError, match="blob has 4"):
        m.extend(3, h[3] + h[3])
    with pytest.raises(ManifestError, match="cannot seal"):
        m.seal()
    with pytest.raises(ManifestError, match="not known"):
        m.hash_of(3)


def test_manifest_verify_refuses_wrong_data() -> None:
    data = _blob(64)
    m = PieceManifest(digest_of(data), PieceLayout(64, 16))
    ManifestBuilder(m).feed(data)
    assert m.verify(1, data[16:32])
    assert not m.verify(1, data[0:16])  # wrong piece
    assert not m.verify(1, data[16:31])  # truncated
    assert not m.verify(1, b"\0" * 16)  # corrupt
    assert not m.verify(4, b"")  # out of range
    assert not m.verify(-1, data[:16])


def test_manifest_of_large_layout_reaches_limit() -> None:
    lay = PieceLayout(2560 * 4 * MiB, 4 * MiB)
    m = PieceManifest(digest_of(b""), lay)
    assert m.extend(0, b"\1" * HASH_SIZE * lay.count) == 2560
    m.seal()
    assert m.sealed
