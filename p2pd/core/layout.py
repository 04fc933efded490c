"""How a blob is cut into pieces.

The rule (`PieceLayout.for_size`): pieces are ``MIN_PIECE_SIZE`` (2 MiB) unless that would give
more than ``TARGET_MAX_PIECES`` (1024) pieces; then the piece size doubles until it does not.
So a layer never has more than 1024 pieces, per-piece overheads (a request, a hash, an announce)
stay small against the bytes moved, and small layers still split into several pieces that
different parents can serve at once. Piece sizes are powers of two.

Why 2 MiB: in a storm a new piece reaches the swarm hop by hop, and a hop lasts as long as a
piece takes through a parent's upload shared by its children; halving the piece halves the
hop. The storm simulator, Storm-A at 1000 hosts (`p2p-bench storm --preset storm-a`): 4 MiB
1.44x / 1.48x / 1.51x the bound (p50 / p99 / max), 2 MiB 1.27x / 1.30x / 1.31x, 1 MiB
1.24x / 1.26x / 1.27x -- the last for twice the requests, announces and simulated events
of 2 MiB. (Early-announce thresholds are in bytes, see `SessionConfig.early_bytes`.) Every piece is
``piece_size`` long except the last, which holds the remainder; a 0-byte blob has no pieces.

A layout can also be built with an explicit piece size (tests, the simulator, benchmarks); the
wire layer bounds what it accepts from the network.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PIECE_SIZE = 2 * 1024 * 1024
TARGET_MAX_PIECES = 1024
# Protocol bounds: what any peer may claim, whatever rule produced it.
MAX_PIECE_SIZE = 1 << 31
MAX_PIECES = 1 << 16
MAX_BLOB_SIZE = MAX_PIECE_SIZE * TARGET_MAX_PIECES


class LayoutError(ValueError):
    """A size, piece size or piece index that does not fit a layout."""


@dataclass(frozen=True, slots=True)
class PieceLayout:
    total_size: int
    piece_size: int

    def __post_init__(self) -> None:
        if type(self.total_size) is not int or not 0 <= self.total_size <= MAX_BLOB_SIZE:
            raise LayoutError(f"blob size out of range: {self.total_size!r}")
        if type(self.piece_size) is not int or not 1 <= self.piece_size <= MAX_PIECE_SIZE:
            raise LayoutError(f"piece size out of range: {self.piece_size!r}")
        if self.count > MAX_PIECES:
            raise LayoutError(
                f"{self.count} pieces of {self.piece_size} bytes exceed the limit of {MAX_PIECES}"
            )

    @classmethod
    def for_size(cls, total_size: int) -> PieceLayout:
        """The layout the documented rule gives for a blob of `total_size` bytes."""
        if type(total_size) is not int or not 0 <= total_size <= MAX_BLOB_SIZE:
            raise LayoutError(f"blob size out of range: {total_size!r}")
        piece_size = MIN_PIECE_SIZE
        while -(-total_size // piece_size) > TARGET_MAX_PIECES:
            piece_size *= 2
        return cls(total_size, piece_size)

    @property
    def count(self) -> int:
        return -(-self.total_size // self.piece_size)

    def offset(self, index: int) -> int:
        self._check(index)
        return index * self.piece_size

    def length(self, index: int) -> int:
        self._check(index)
        if index == self.count - 1:
            return self.total_size - index * self.piece_size
        return self.piece_size

    def span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of piece `index`."""
        return self.offset(index), self.length(index)

    def piece_at(self, byte_offset: int) -> int:
        """The index of the piece holding byte `byte_offset`."""
        if not 0 <= byte_offset < self.total_size:
            raise LayoutError(f"byte offset {byte_offset} outside a blob of {self.total_size}")
        return byte_offset // self.piece_size

    def _check(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self.count:
            raise LayoutError(f"piece index {index!r} out of range 0..{self.count - 1}")
