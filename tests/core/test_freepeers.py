"""FreePeers must answer exactly what sorting every candidate would: same peers, same order."""

from __future__ import annotations

import heapq
import random

import pytest

from p2pd.core import freepeers
from p2pd.core.freepeers import FreePeers, Key


def brute(
    peers: dict[str, tuple[float, float, int]],
    lacking: int,
    wanted: int,
    parents: set[str],
    shunned: set[str],
) -> list[Key]:
    keys = [
        (load, -useful, tie, pid)
        for pid, (load, tie, bits) in peers.items()
        if (useful := (bits & lacking).bit_count()) and pid not in parents and pid not in shunned
    ]
    return heapq.nsmallest(wanted, keys)


# (_UNION_SHARE, _COUNT_MOST) forcing each way of answering after the first slice
PATHS = {
    "walk": (10**9, 0),
    "union": (0, 0),  # ranking the holders of the lacking pieces
    "count": (10**9, 10**9),  # counting the lacking pieces each holder holds
}


@pytest.mark.parametrize("path", [*PATHS, "own choice"])
@pytest.mark.parametrize("seed", range(40))
def test_best_matches_a_full_sort(seed: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path in PATHS:
        monkeypatch.setattr(freepeers, "_UNION_SHARE", PATHS[path][0])
        monkeypatch.setattr(freepeers, "_COUNT_MOST", PATHS[path][1])
    rng = random.Random(seed)
    count = rng.choice([1, 3, 8, 50])
    full = (1 << count) - 1
    index = FreePeers(count)
    peers: dict[str, tuple[float, float, int]] = {}
    for step in range(1500):
        pid = f"p{rng.randrange(300)}"
        roll = rng.random()
        if roll < 0.05:
            index.discard(pid)
            peers.pop(pid, None)
        elif roll < 0.08:
            index.forget(pid)  # left the task: its slot goes
            peers.pop(pid, None)
        else:
            # few loads and piece counts, so that runs of equal (load, count) are long
            load = rng.choice([0.0, 0.125, 0.5, 0.875])
            kind = rng.random()
            if kind < 0.3:
                bits = full  # complete
            elif kind < 0.6:
                bits = (1 << rng.randint(1, count)) - 1  # a prefix, as the seeder hands out
            else:
                bits = rng.getrandbits(count) or 1
            tie = peers[pid][1] if pid in peers else rng.random()
            index.put(pid, load, tie, bits)
            peers[pid] = (load, tie, bits)
        assert len(index) == len(peers)
        held = 0
        for _, _, bits in peers.values():
            held |= bits
        assert index.pieces == held
        if step % 10 == 0:
            have = (
                rng.getrandbits(count)
                if rng.random() < 0.7
                else full & ~(1 << rng.randrange(count))
            )
            lacking = ~have if rng.random() < 0.5 else full & ~have
            wanted = rng.randint(0, 9)
            parents = {p for p in peers if rng.random() < 0.1}
            shunned = {p for p in peers if rng.random() < 0.05}
            assert index.best(lacking, wanted, parents, shunned) == brute(
                peers, lacking, wanted, parents, shunned
            )


def test_few_holders_of_the_lacking_pieces_are_ranked_directly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child lacking a piece only a few of many free peers hold: the answer comes from
    those holders (no walk over every entry), and is the full sort's."""
    count = 10
    index = FreePeers(count)
    peers: dict[str, tuple[float, float, int]] = {}
    rng = random.Random(7)
    for k in range(500):
        pid = f"p{k:03}"
        bits = (1 << (count - 1)) - 1 if k % 100 else (1 << count) - 1  # 5 hold piece 9
        load, tie = rng.choice([0.0, 0.5]), rng.random()
        index.put(pid, load, tie, bits)
        peers[pid] = (load, tie, bits)
    index.discard("p100")
    del peers["p100"]
    ranked: list[int] = []
    real_rank = FreePeers._rank

    def spy(self: FreePeers, slots: int, *args: object) -> list[Key]:
        ranked.append(slots.bit_count())
        return real_rank(self, slots, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FreePeers, "_rank", spy)
    got = index.best(1 << (count - 1), 8, {"p200"}, set())
    assert got == brute(peers, 1 << (count - 1), 8, {"p200"}, set())
    assert sorted(key[-1] for key in got) == ["p000", "p300", "p400"]
    assert ranked == [4]  # p000, p200, p300, p400: the discarded p100 is not among them


def test_forgotten_peers_give_their_slots_back() -> None:
    # a long-lived task: 20 000 peers come and go, some 50 at a time in the index
    rng = random.Random(5)
    count = 64
    index = FreePeers(count)
    peers: dict[str, tuple[float, float, int]] = {}
    for n in range(20_000):
        pid = f"h{n}"
        bits = rng.getrandbits(count) or 1
        tie = rng.random()
        index.put(pid, 0.5, tie, bits)
        peers[pid] = (0.5, tie, bits)
        if len(peers) > 50:
            gone = next(iter(peers))
            index.forget(gone)
            del peers[gone]
        if n % 997 == 0:
            lacking = rng.getrandbits(count)
            assert index.best(lacking, 4, set(), set()) == brute(peers, lacking, 4, set(), set())
    assert len(index._ids) <= 2 * len(peers) + 65
    assert max(holders.bit_length() for holders in index._holders) <= 2 * len(peers) + 65
