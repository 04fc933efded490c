"""/stats' bytes held of a download in progress, counted from its bitfield."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.bitfield import Bitfield
from p2pd.core.layout import PieceLayout
from p2pd.daemon import _have_bytes


@given(
    size=st.integers(min_value=0, max_value=10_000),
    piece=st.integers(min_value=1, max_value=1_500),
    data=st.data(),
)
def test_have_bytes_is_the_sum_of_the_held_pieces_lengths(
    size: int, piece: int, data: st.DataObject
) -> None:
    layout = PieceLayout(size, piece)
    have = Bitfield(layout.count)
    for index in data.draw(st.sets(st.integers(0, max(layout.count - 1, 0)))):
        if index < layout.count:
            have.add(index)
    assert _have_bytes(layout, have) == sum(layout.length(i) for i in have)
