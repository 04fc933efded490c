"""How a blob is cut into pieces.

The rule (`PieceLayout.for_size`): pieces are ``PIECE_SIZE`` (2 MiB), halved while the blob
would have fewer than ``TARGET_MIN_PIECES`` (128) pieces, down to ``SMALLEST_PIECE_SIZE``
(256 KiB), and doubled while it would have more than ``TARGET_MAX_PIECES`` (1024). So a layer
never has more than 1024 pieces and per-piece overheads (a request, a hash, an announce) stay
small against the bytes moved, while a small layer still has enough pieces for its swarm to
pipeline. Piece sizes are powers of two.

Why 2 MiB: in a storm a new piece reaches the swarm hop by hop, and a hop lasts as long as a
piece takes through a parent's upload shared by its children; halving the piece halves the
hop. The storm simulator, Storm-A at 1000 hosts (`p2p-bench storm --preset storm-a`): 4 MiB
1.44x / 1.48x / 1.51x the bound (p50 / p99 / max), 2 MiB 1.27x / 1.30x / 1.31x, 1 MiB
1.24x / 1.26x / 1.27x -- the last for twice the requests, announces and simulated events
of 2 MiB. (Early-announce thresholds are in bytes, see `SessionConfig.early_bytes`.)

Why at least 128 pieces: a layer of a few pieces cannot be pipelined -- each of its pieces
goes hop by hop through the whole fleet -- and every host pulls an image's layers at once, so
the hops of a small layer's pieces are slow too (its flows share each host's links with the
other layers'). A storm of one 1 GiB layer, 200 hosts, ended at 1.053x the bound; the same
bytes as ten layers of 8-360 MiB at 1.34x. With at least 128 pieces per layer: ten layers
1.10x, Storm-A (30 + 200 + 800 MiB) 1.13x -> 1.06x; at 1000 hosts with the supernode's CPU
modelled (`storm-a-cpu`) 1.217 / 1.229 / 1.235 -> 1.170 / 1.182 / 1.186, as good as 1 MiB
pieces everywhere (1.166 / 1.175 / 1.176) for a third more pieces instead of twice as many.
Small pieces cost the daemons little since the piece path is lean (`p2pd.piecehttp`).

Every piece is ``piece_size`` long except the last, which holds the remainder; a 0-byte blob
has no pieces. The rule is the supernode's: it cuts each blob (task) by it and tells its peers
the piece size, and a p2pd takes that layout (`PieceLayout.checked`) whatever its own version's
rule, so a fleet whose members run different rules (mid-upgrade) still shares every blob.

A layout can also be built with an explicit piece size (tests, the simulator, benchmarks); the
wire layer bounds what it accepts from the network.
"""

from __future__ import annotations

from dataclasses import dataclass

PIECE_SIZE = 2 * 1024 * 1024
SMALLEST_PIECE_SIZE = 256 * 1024
TARGET_MIN_PIECES = 128
TARGET_MAX_PIECES = 1024
# Protocol bounds: what any peer may claim, whatever rule produced it.
MAX_PIECE_SIZE = 1 << 31
MAX_PIECES = 1 << 16
MAX_BLOB_SIZE = MAX_PIECE_SIZE * TARGET_MAX_PIECES
# The smallest piece size a p2pd takes from elsewhere (`PieceLayout.checked`).
MIN_CHOSEN_PIECE_SIZE = 16 * 1024


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
        piece_size = PIECE_SIZE
        while piece_size > SMALLEST_PIECE_SIZE and -(-total_size // piece_size) < TARGET_MIN_PIECES:
            piece_size //= 2
        while -(-total_size // piece_size) > TARGET_MAX_PIECES:
            piece_size *= 2
        return cls(total_size, piece_size)

    @classmethod
    def checked(cls, total_size: int, piece_size: int) -> PieceLayout:
        """A layout another member of the fleet chose (a supernode's assignment, the piece
        size a requester names, one recorded on disk): besides the protocol bounds, its piece
        size must be a power of two of at least `MIN_CHOSEN_PIECE_SIZE`, as any rule gives."""
        if (
            type(piece_size) is not int
            or piece_size < MIN_CHOSEN_PIECE_SIZE
            or piece_size & (piece_size - 1)
        ):
            raise LayoutError(
                f"piece size {piece_size!r} is not a power of two of at least "
                f"{MIN_CHOSEN_PIECE_SIZE}"
            )
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
