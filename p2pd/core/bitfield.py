"""Which pieces a peer holds.

A `Bitfield` is a fixed-length set of piece indexes backed by one Python int (bit ``i`` is piece
``i``). Python ints make the set algebra the scheduler lives on -- "pieces the parent has and
the child lacks" -- one C-level operation on a few hundred bytes, and ``int.bit_count`` gives the
size. On the wire it is ``ceil(length / 8)`` bytes, little-endian: byte ``k`` bit ``j`` is piece
``8k + j``; bits past the length must be zero.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator


class BitfieldError(ValueError):
    """A piece index outside the bitfield, or wire bytes that do not fit its length."""


class Bitfield:
    __slots__ = ("_bits", "_length")

    def __init__(self, length: int, bits: int = 0) -> None:
        if type(length) is not int or length < 0:
            raise BitfieldError(f"bitfield length must be a non-negative int, got {length!r}")
        if bits < 0 or bits >> length:
            raise BitfieldError(f"bits set beyond length {length}")
        self._length = length
        self._bits = bits

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def full(cls, length: int) -> Bitfield:
        return cls(length, (1 << length) - 1)

    @classmethod
    def from_indexes(cls, length: int, indexes: Iterable[int]) -> Bitfield:
        b = cls(length)
        for i in indexes:
            b.add(i)
        return b

    @classmethod
    def from_bytes(cls, length: int, data: bytes) -> Bitfield:
        if len(data) != (length + 7) // 8:
            raise BitfieldError(
                f"bitfield of {length} pieces needs {(length + 7) // 8} bytes, got {len(data)}"
            )
        return cls(length, int.from_bytes(data, "little"))

    def to_bytes(self) -> bytes:
        return self._bits.to_bytes((self._length + 7) // 8, "little")

    def copy(self) -> Bitfield:
        # no checks: this one passed them (the scheduler copies a bitfield per parent per reply);
        # compiled (p2pd.native), the constructor is the fast way and the only one
        if _COMPILED:
            return Bitfield(self._length, self._bits)
        other = object.__new__(Bitfield)
        other._length = self._length
        other._bits = self._bits
        return other

    # -- queries ------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self._length

    @property
    def bits(self) -> int:
        """The raw int, for set algebra between bitfields of the same length."""
        return self._bits

    def count(self) -> int:
        return self._bits.bit_count()

    def is_full(self) -> bool:
        return self._bits == (1 << self._length) - 1

    def is_empty(self) -> bool:
        return self._bits == 0

    def __contains__(self, index: object) -> bool:
        return type(index) is int and 0 <= index < self._length and bool(self._bits >> index & 1)

    def __iter__(self) -> Iterator[int]:
        return iter_bits(self._bits)

    def __len__(self) -> int:
        return self.count()

    def first_missing(self) -> int:
        """The lowest index not held (``length`` when full): the end of the contiguous prefix."""
        return (~self._bits & (self._bits + 1)).bit_length() - 1

    def missing_from(self, other: Bitfield) -> int:
        """Raw bits of the pieces `other` holds that this bitfield lacks."""
        return other._bits & ~self._bits

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitfield):
            return NotImplemented
        return self._length == other._length and self._bits == other._bits

    def __hash__(self) -> int:
        return hash((self._length, self._bits))

    def __repr__(self) -> str:
        shown = "".join("1" if i in self else "." for i in range(min(self._length, 64)))
        more = "…" if self._length > 64 else ""
        return f"Bitfield({self._length}, {shown}{more})"

    # -- mutation -----------------------------------------------------------------------------

    def add(self, index: int) -> bool:
        """Mark `index` held; True if it was not held before."""
        self._check(index)
        mask = 1 << index
        if self._bits & mask:
            return False
        self._bits |= mask
        return True

    def discard(self, index: int) -> None:
        self._check(index)
        self._bits &= ~(1 << index)

    def update(self, bits: int) -> int:
        """OR raw `bits` in; return the raw bits that were new."""
        if bits < 0 or bits >> self._length:
            raise BitfieldError(f"bits set beyond length {self._length}")
        new = bits & ~self._bits
        self._bits |= bits
        return new

    def _check(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self._length:
            raise BitfieldError(f"piece index {index!r} out of range for {self._length} pieces")


def iter_bits(bits: int) -> Iterator[int]:
    """Indexes of the set bits of a raw int, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


_COMPILED = not isinstance(iter_bits, types.FunctionType)  # by mypyc: see p2pd.native
