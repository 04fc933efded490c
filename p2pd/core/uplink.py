"""How many children a host feeds at once, from what its uplink carries.

The supernode fills a child's parent set from peers with a free upload slot, least loaded first
(children per slot). Every host registering the same number of slots makes a 100 Mbit/s host
look like a 1 Gbit/s one: late in a storm the fast parents are full and the slow hosts are the
ones with free slots, so fast children end up with several parents that each give them a
trickle -- a slow host's 12.5 MB/s split eight ways. One slot per `SLOT_RATE` of uplink keeps
what a parent gives each child roughly the same whatever the host: a 100 Mbit/s host feeds one
child at its full uplink, a 1 Gbit/s host feeds eight (the configured ceiling) at an eighth.

Measured (`p2p-bench storm --preset slow-hosts`, 1000 hosts, 10 % at 100 Mbit/s, each host
against its own bound): p50 / p99 / max 1.257 / 1.678 / 1.732 with eight slots everywhere,
1.263 / 1.599 / 1.664 with slots from the uplink (hosts of 1 Gbit/s keep their eight).
"""

from __future__ import annotations

from typing import Final

# Uplink bytes/s per upload slot: 100 Mbit/s.
SLOT_RATE: Final = 100e6 / 8


def upload_slots_for(uplink: float, ceiling: int) -> int:
    """Upload slots for a host whose uplink carries `uplink` bytes/s (0: unknown), at most
    `ceiling` (the configured ``upload_slots``) and at least one."""
    if ceiling < 1:
        raise ValueError(f"upload slot ceiling must be at least 1, got {ceiling!r}")
    if not uplink > 0 or uplink >= ceiling * SLOT_RATE:  # unknown (also NaN), or plenty
        return ceiling
    return max(1, int(uplink // SLOT_RATE))
