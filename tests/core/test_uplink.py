"""Upload slots follow the uplink: one per 100 Mbit/s, within [1, ceiling]."""

from __future__ import annotations

import math

import pytest

from p2pd.core.uplink import SLOT_RATE, upload_slots_for

MBIT = 1e6 / 8


@pytest.mark.parametrize(
    ("uplink", "expected"),
    [
        (100 * MBIT, 1),  # a slow host feeds one child at its full uplink
        (50 * MBIT, 1),  # never none: a host that holds pieces serves them
        (250 * MBIT, 2),
        (799 * MBIT, 7),
        (1000 * MBIT, 8),  # a 1 Gbit/s host: the ceiling
        (10_000 * MBIT, 8),
        (math.inf, 8),
        (0.0, 8),  # unknown: the configured figure stands
        (-1.0, 8),
        (math.nan, 8),
    ],
)
def test_slots_from_uplink(uplink: float, expected: int) -> None:
    assert upload_slots_for(uplink, 8) == expected


def test_ceiling_is_the_configured_figure() -> None:
    assert upload_slots_for(10 * SLOT_RATE, 3) == 3
    assert upload_slots_for(2 * SLOT_RATE, 3) == 2
    with pytest.raises(ValueError, match="at least 1"):
        upload_slots_for(SLOT_RATE, 0)
