"""The peer-side piece picker.

Piece states are written compactly, libtorrent style: one character per piece, ``H`` HAVE,
``D`` DOWNLOADING, ``.`` MISSING. Bitfields are written the same way, ``1`` held, ``.`` not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.core.bitfield import Bitfield, iter_bits
from p2pd.core.layout import PieceLayout
from p2pd.core.picker import (
    PIECE_TRANSITIONS,
    BadParent,
    Cancel,
    PickerConfig,
    PickerError,
    PiecePicker,
    PieceState,
    Request,
)

# -- notation --------------------------------------------------------------------------------


def bf(text: str) -> Bitfield:
    """``"11.1"`` -> pieces 0, 1 and 3 held."""
    return Bitfield.from_indexes(len(text), (i for i, c in enumerate(text) if c == "1"))


def states(picker: PiecePicker, n: int) -> str:
    return "".join(picker.state(i).value for i in range(n))


def make(
    n: int,
    *,
    seed: int = 0,
    verifiable: int | None = None,
    have: str | None = None,
    **config: int | float,
) -> PiecePicker:
    """A picker over `n` one-byte pieces, everything verifiable unless said otherwise.

    Four requests per parent unless said otherwise, so that tests can show pipelining."""
    config.setdefault("max_in_flight_per_parent", 4)
    config.setdefault("pipeline_depth", 0)  # tested on its own below
    picker = PiecePicker(
        PieceLayout(n, 1),
        random.Random(seed),
        PickerConfig(**config),  # type: ignore[arg-type]
        have=None if have is None else bf(have),
    )
    picker.set_verifiable(n if verifiable is None else verifiable)
    return picker


def pairs(actions: list[Request] | list[Cancel | BadParent]) -> list[tuple[str, int]]:
    return [(a.parent, a.index) for a in actions]


def rank_order(n: int, seed: int) -> list[int]:
    """The tie-break priority the picker draws: a seeded shuffle of the indexes."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# -- configuration and construction ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"max_in_flight_per_parent": 0},
        {"endgame_duplicates": 0},
        {"prefix_window": -1},
        {"request_timeout": 0.0},
        {"max_bad_pieces": 0},
    ],
)
def test_config_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(PickerError):
        PickerConfig(**bad)  # type: ignore[arg-type]


def test_transition_table() -> None:
    M, D, H = PieceState.MISSING, PieceState.DOWNLOADING, PieceState.HAVE
    assert {(M, D), (D, H), (D, M)} == PIECE_TRANSITIONS
    assert (M, H) not in PIECE_TRANSITIONS  # only by resuming at construction


def test_zero_pieces() -> None:
    picker = make(0)
    picker.add_parent("a", Bitfield(0))
    assert picker.is_complete()
    assert picker.first_missing() == 0
    assert picker.pick(0.0) == []
    assert picker.next_deadline() is None
    assert not picker.in_endgame()
    with pytest.raises(PickerError):
        picker.state(0)


def test_one_piece() -> None:
    picker = make(1)
    picker.add_parent("a", bf("1"))
    assert pairs(picker.pick(0.0)) == [("a", 0)]
    assert states(picker, 1) == "D"
    assert picker.on_piece("a", 0, True, 1.0) == []
    assert states(picker, 1) == "H"
    assert picker.is_complete()
    assert picker.first_missing() == 1
    assert picker.pick(2.0) == []
    assert picker.in_flight("a") == 0


def test_resume_with_have() -> None:
    picker = make(5, have="11..1")
    picker.add_parent("a", bf("11111"))
    assert states(picker, 5) == "HH..H"
    assert picker.first_missing() == 2
    assert sorted(r.index for r in picker.pick(0.0)) == [2, 3]
    assert picker.have == bf("11..1")


def test_have_is_a_copy_and_checked() -> None:
    have = bf("1.")
    picker = PiecePicker(PieceLayout(2, 1), random.Random(0), have=have)
    have.add(1)
    picker.have.add(1)
    assert states(picker, 2) == "H."
    with pytest.raises(PickerError):
        PiecePicker(PieceLayout(2, 1), random.Random(0), have=bf("1.."))


# -- verifiable gating -----------------------------------------------------------------------


def test_only_verifiable_pieces_are_requested() -> None:
    picker = make(6, verifiable=0)
    picker.add_parent("a", bf("111111"))
    assert picker.pick(0.0) == []
    picker.set_verifiable(2)
    assert sorted(r.index for r in picker.pick(0.0)) == [0, 1]
    picker.set_verifiable(3)
    assert [r.index for r in picker.pick(0.0)] == [2]
    assert picker.verifiable == 3


def test_set_verifiable_is_monotonic_and_bounded() -> None:
    picker = make(4, verifiable=2)
    picker.set_verifiable(2)
    with pytest.raises(PickerError):
        picker.set_verifiable(1)
    with pytest.raises(PickerError):
        picker.set_verifiable(5)


def test_verifiable_skips_pieces_already_held() -> None:
    picker = make(3, verifiable=0, have="1..")
    picker.add_parent("a", bf("111"))
    picker.set_verifiable(3)
    assert sorted(r.index for r in picker.pick(0.0)) == [1, 2]


# -- parents ---------------------------------------------------------------------------------


def test_parents_and_availability() -> None:
    picker = make(3)
    picker.add_parent("b", bf("11."))
    picker.add_parent("a", bf(".11"))
    assert picker.parents() == ["a", "b"]
    assert [picker.availability(i) for i in range(3)] == [1, 2, 1]
    picker.update_parent("b", bf("111"))
    assert [picker.availability(i) for i in range(3)] == [1, 2, 2]
    picker.add_parent("a", bf("..."))  # a known parent: its bitfield is replaced
    assert [picker.availability(i) for i in range(3)] == [1, 1, 1]
    picker.remove_parent("b")
    assert picker.parents() == ["a"]
    assert [picker.availability(i) for i in range(3)] == [0, 0, 0]


def test_parent_misuse() -> None:
    picker = make(3)
    with pytest.raises(PickerError):
        picker.update_parent("x", bf("111"))
    with pytest.raises(PickerError):
        picker.remove_parent("x")
    with pytest.raises(PickerError):
        picker.in_flight("x")
    with pytest.raises(PickerError):
        picker.add_parent("a", bf("1111"))
    picker.add_parent("a", bf("111"))
    with pytest.raises(PickerError):
        picker.update_parent("a", bf("11"))


def test_add_pieces_only_adds_and_keeps_availability_in_step() -> None:
    picker = make(3)
    picker.add_parent("a", bf("1.."))
    picker.add_pieces("a", bf(".1.").bits)
    assert picker.offers("a") == bf("11.").bits
    assert [picker.availability(i) for i in range(3)] == [1, 1, 0]
    picker.add_pieces("a", bf("...").bits)  # nothing taken back
    assert picker.offers("a") == bf("11.").bits
    with pytest.raises(PickerError):
        picker.add_pieces("a", 1 << 3)  # past the blob's end
    with pytest.raises(PickerError):
        picker.add_pieces("x", 1)


def test_a_parent_named_with_pieces_it_said_it_holds_changes_in_one_step() -> None:
    picker = make(4)
    picker.add_parent("a", bf("1..."), extra=bf(".1..").bits)
    assert picker.offers("a") == bf("11..").bits
    assert [picker.availability(i) for i in range(4)] == [1, 1, 0, 0]
    picker.add_parent("a", bf("..1."), extra=bf(".1..").bits)  # the reply's view replaced
    assert picker.offers("a") == bf(".11.").bits
    assert [picker.availability(i) for i in range(4)] == [0, 1, 1, 0]
    with pytest.raises(PickerError):
        picker.add_parent("a", bf("1..."), extra=1 << 4)  # past the blob's end
    assert picker.offers("a") == bf(".11.").bits  # a refused call changes nothing


def test_a_pick_with_nothing_to_ask_passes_the_turn_on() -> None:
    """`pass_turn` is what a pick that finds every slot taken does to the rotation."""
    picked = []
    for skip in (False, True):
        picker = make(4, max_in_flight_per_parent=1, prefix_window=4)
        picker.add_parent("a", bf("1111"))
        picker.add_parent("b", bf("1111"))
        assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1)]
        if skip:
            picker.pass_turn()
        else:
            assert picker.pick(0.0) == []  # every slot taken
        picker.on_piece("a", 0, True, 1.0)
        picker.on_piece("b", 1, True, 1.0)
        picked.append(pairs(picker.pick(1.0)))
    assert picked[0] == picked[1] == [("a", 2), ("b", 3)]


def test_remove_parent_restores_its_pieces() -> None:
    picker = make(4, max_in_flight_per_parent=2, prefix_window=4)
    picker.add_parent("a", bf("1111"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("a", 1)]
    assert picker.remove_parent("a") == [0, 1]
    assert states(picker, 4) == "...."
    assert picker.next_deadline() is None
    picker.add_parent("b", bf("1111"))
    assert pairs(picker.pick(1.0)) == [("b", 0), ("b", 1)]


def test_update_parent_keeps_requests_in_flight() -> None:
    picker = make(2, max_in_flight_per_parent=1)
    picker.add_parent("a", bf("11"))
    assert pairs(picker.pick(0.0)) == [("a", 0)]
    picker.update_parent("a", bf(".1"))
    assert picker.in_flight("a") == 1
    assert picker.on_piece("a", 0, True, 1.0) == []
    assert pairs(picker.pick(1.0)) == [("a", 1)]


# -- picking order ---------------------------------------------------------------------------


def test_pipelining_limit() -> None:
    picker = make(10, max_in_flight_per_parent=3)
    picker.add_parent("a", bf("1" * 10))
    assert len(picker.pick(0.0)) == 3
    assert picker.in_flight("a") == 3
    assert picker.pick(0.0) == []
    picker.on_piece("a", 0, True, 1.0)
    assert len(picker.pick(1.0)) == 1
    assert picker.in_flight("a") == 3


def test_piece_in_flight_is_not_requested_twice_in_normal_mode() -> None:
    picker = make(4, max_in_flight_per_parent=1, prefix_window=4)
    picker.add_parent("a", bf("1111"))
    picker.add_parent("b", bf("1111"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1)]
    assert states(picker, 4) == "DD.."


def test_prefix_window_comes_first_in_index_order() -> None:
    picker = make(8, prefix_window=3, max_in_flight_per_parent=3)
    picker.add_parent("a", bf("11111111"))
    picker.add_parent("b", bf("1111111."))  # piece 7 is the rarest, but outside the window
    got = pairs(picker.pick(0.0))
    assert got[:3] == [("a", 0), ("b", 1), ("a", 2)]
    assert got[4] == ("a", 7)  # then rarest first


def test_prefix_window_follows_first_missing() -> None:
    picker = make(8, prefix_window=2, max_in_flight_per_parent=2, have="111.....")
    picker.add_parent("a", bf("11111111"))
    assert [r.index for r in picker.pick(0.0)] == [3, 4]


def test_rarest_first_outside_the_window() -> None:
    picker = make(6, prefix_window=0, max_in_flight_per_parent=6, endgame_duplicates=1)
    picker.add_parent("a", bf("111111"))
    picker.add_parent("b", bf("1111.."))
    picker.add_parent("c", bf("11...."))
    got = pairs(picker.pick(0.0))
    # Turns go a, b, c, a, b, c: each takes the rarest piece it can serve.
    assert {got[0][1], got[3][1]} == {4, 5}
    assert {got[1][1], got[4][1]} == {2, 3}
    assert {got[2][1], got[5][1]} == {0, 1}
    assert [g[0] for g in got] == ["a", "b", "c"] * 2


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_ties_go_to_the_seeded_priority(seed: int) -> None:
    n = 16
    picker = make(n, seed=seed, prefix_window=0, max_in_flight_per_parent=n)
    picker.add_parent("a", bf("1" * n))
    assert [r.index for r in picker.pick(0.0)] == rank_order(n, seed)


def test_different_seeds_spread_peers_out() -> None:
    firsts = set()
    for seed in range(8):
        picker = make(64, seed=seed, prefix_window=0, max_in_flight_per_parent=1)
        picker.add_parent("a", bf("1" * 64))
        firsts.add(picker.pick(0.0)[0].index)
    assert len(firsts) > 1


def test_turns_rotate_between_calls() -> None:
    picker = make(4, max_in_flight_per_parent=1, prefix_window=4)
    picker.add_parent("a", bf("1111"))
    picker.add_parent("b", bf("1111"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1)]
    picker.on_piece("a", 0, True, 1.0)
    picker.on_piece("b", 1, True, 1.0)
    assert pairs(picker.pick(1.0)) == [("b", 2), ("a", 3)]


def test_parent_gets_the_best_piece_it_can_serve() -> None:
    picker = make(4, max_in_flight_per_parent=1, prefix_window=2)
    picker.add_parent("a", bf("..11"))
    picker.add_parent("b", bf("1111"))
    got = dict(pairs(picker.pick(0.0)))
    assert got["b"] == 0
    assert got["a"] in (2, 3)


# -- endgame ---------------------------------------------------------------------------------


def test_endgame_duplicates_and_cancels() -> None:
    picker = make(2, max_in_flight_per_parent=2, endgame_duplicates=2)
    picker.add_parent("a", bf("11"))
    picker.add_parent("b", bf("11"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1), ("a", 1), ("b", 0)]
    assert picker.in_endgame()
    assert picker.requesters(0) == ["a", "b"]
    assert pairs(picker.on_piece("a", 0, True, 1.0)) == [("b", 0)]
    assert isinstance(picker.on_piece("b", 1, True, 1.0)[0], Cancel)
    assert states(picker, 2) == "HH"
    assert picker.in_flight("a") == 0
    assert picker.in_flight("b") == 0
    assert picker.on_piece("b", 0, True, 2.0) == []  # lost the race, cancel came too late
    assert picker.on_piece("gone", 1, False, 2.0) == []


def test_endgame_disabled_with_one_duplicate() -> None:
    picker = make(2, max_in_flight_per_parent=2, endgame_duplicates=1)
    picker.add_parent("a", bf("11"))
    picker.add_parent("b", bf("11"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1)]
    assert picker.in_endgame()


def test_no_endgame_while_another_parent_has_fresh_pieces() -> None:
    picker = make(3, max_in_flight_per_parent=1, prefix_window=0, endgame_duplicates=2)
    picker.add_parent("a", bf("1.."))
    picker.add_parent("b", bf("111"))
    picker.add_parent("c", bf("1.."))
    got = pairs(picker.pick(0.0))
    assert got[0] == ("a", 0)
    assert got[1][0] == "b"
    assert len(got) == 2  # c could only duplicate 0, but b's other piece is still fresh
    assert not picker.in_endgame()
    picker.on_piece("b", got[1][1], True, 1.0)
    got = pairs(picker.pick(1.0))  # turns start at b now
    assert got[0][0] == "b"
    assert got[1] == ("c", 0)
    assert picker.in_endgame()
    assert picker.requesters(0) == ["a", "c"]


def test_endgame_prefers_fewest_requests() -> None:
    picker = make(2, max_in_flight_per_parent=1, endgame_duplicates=3, prefix_window=0)
    picker.add_parent("a", bf("11"))
    picker.add_parent("b", bf("11"))
    picker.pick(0.0)
    picker.add_parent("c", bf("11"))
    (first,) = picker.pick(0.0)
    assert first.parent == "c"
    picker.add_parent("d", bf("11"))
    (second,) = picker.pick(0.0)
    assert second.parent == "d"
    assert second.index != first.index
    assert len(picker.requesters(0)) == len(picker.requesters(1)) == 2


def test_endgame_never_asks_one_parent_twice_for_a_piece() -> None:
    picker = make(1, max_in_flight_per_parent=4, endgame_duplicates=4)
    picker.add_parent("a", bf("1"))
    assert pairs(picker.pick(0.0)) == [("a", 0)]
    assert picker.pick(0.0) == []


# -- results ---------------------------------------------------------------------------------


def test_bad_piece_drops_parent_and_is_fetched_elsewhere() -> None:
    picker = make(2, max_in_flight_per_parent=1, endgame_duplicates=1)
    picker.add_parent("a", bf("11"))
    picker.add_parent("b", bf("11"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 1)]
    assert picker.on_piece("a", 0, False, 1.0) == [BadParent("a", 0)]
    assert picker.parents() == ["b"]
    assert states(picker, 2) == ".D"
    assert picker.on_piece("b", 1, True, 2.0) == []
    assert pairs(picker.pick(2.0)) == [("b", 0)]


def test_bad_piece_with_tolerance_bans_the_piece_then_the_parent() -> None:
    picker = make(3, max_in_flight_per_parent=2, max_bad_pieces=2, prefix_window=3)
    picker.add_parent("a", bf("111"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("a", 1)]
    assert picker.on_piece("a", 0, False, 1.0) == [BadParent("a", 0)]
    assert picker.parents() == ["a"]
    assert picker.availability(0) == 0
    assert pairs(picker.pick(1.0)) == [("a", 2)]  # never piece 0 again from a
    picker.update_parent("a", bf("111"))  # even when it keeps claiming it
    assert picker.availability(0) == 0
    assert picker.on_piece("a", 1, False, 2.0) == [BadParent("a", 1), Cancel("a", 2)]
    assert picker.parents() == []
    assert states(picker, 3) == "..."
    assert picker.next_deadline() is None


def test_bad_piece_keeps_downloading_while_a_duplicate_is_in_flight() -> None:
    picker = make(1, max_in_flight_per_parent=1, endgame_duplicates=2, max_bad_pieces=5)
    picker.add_parent("a", bf("1"))
    picker.add_parent("b", bf("1"))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("b", 0)]
    assert picker.on_piece("b", 0, False, 1.0) == [BadParent("b", 0)]
    assert states(picker, 1) == "D"
    assert picker.on_piece("a", 0, True, 1.0) == []
    assert picker.is_complete()


def test_on_piece_misuse() -> None:
    picker = make(3)
    picker.add_parent("a", bf("1.."))
    picker.pick(0.0)
    with pytest.raises(PickerError):
        picker.on_piece("a", 3, True, 0.0)
    with pytest.raises(PickerError):
        picker.on_piece("x", 0, True, 0.0)
    with pytest.raises(PickerError):
        picker.on_piece("a", 1, True, 0.0)  # MISSING, never requested: no MISSING -> HAVE
    assert states(picker, 3) == "D.."


def test_failure_restores_the_request() -> None:
    picker = make(2, max_in_flight_per_parent=1, prefix_window=2)
    picker.add_parent("a", bf("11"))
    assert pairs(picker.pick(0.0)) == [("a", 0)]
    picker.on_failure("a", 0)
    assert states(picker, 2) == ".."
    assert picker.in_flight("a") == 0
    assert pairs(picker.pick(1.0)) == [("a", 0)]
    with pytest.raises(PickerError):
        picker.on_failure("a", 1)
    with pytest.raises(PickerError):
        picker.on_failure("x", 0)
    with pytest.raises(PickerError):
        picker.on_failure("a", 9)


def test_failure_because_parent_lacks_the_piece() -> None:
    picker = make(2, max_in_flight_per_parent=1, prefix_window=2)
    picker.add_parent("a", bf("11"))
    picker.pick(0.0)
    picker.on_failure("a", 0, lacks_piece=True)
    assert picker.availability(0) == 0
    assert pairs(picker.pick(1.0)) == [("a", 1)]
    picker.on_piece("a", 1, True, 1.0)
    assert picker.pick(1.0) == []
    picker.update_parent("a", bf("11"))
    assert pairs(picker.pick(2.0)) == [("a", 0)]


# -- timeouts --------------------------------------------------------------------------------


def test_expire_and_next_deadline() -> None:
    picker = make(3, max_in_flight_per_parent=1, request_timeout=5.0, prefix_window=3)
    picker.add_parent("a", bf("111"))
    picker.add_parent("b", bf("111"))
    assert picker.next_deadline() is None
    assert pairs(picker.pick(10.0)) == [("a", 0), ("b", 1)]
    picker.on_piece("b", 1, True, 11.0)
    assert pairs(picker.pick(11.0)) == [("b", 2)]
    assert picker.next_deadline() == 15.0
    assert picker.expire(14.9) == []
    assert pairs(picker.expire(15.0)) == [("a", 0)]
    assert states(picker, 3) == ".HD"
    assert picker.next_deadline() == 16.0
    picker.on_piece("b", 2, True, 12.0)
    assert picker.next_deadline() is None
    assert picker.expire(100.0) == []


def test_deadline_of_a_rerequested_piece_is_fresh() -> None:
    picker = make(1, request_timeout=5.0)
    picker.add_parent("a", bf("1"))
    picker.pick(0.0)
    picker.on_failure("a", 0)
    picker.pick(3.0)
    assert picker.expire(5.0) == []  # the first request's deadline no longer counts
    assert picker.next_deadline() == 8.0


def test_long_download_keeps_deadline_heap_small() -> None:
    n = 400
    picker = make(n, max_in_flight_per_parent=3, request_timeout=30.0)
    picker.add_parent("a", bf("1" * n))
    issued: list[tuple[float, Request]] = []
    now = 0.0
    while not picker.is_complete():
        issued.extend((now, r) for r in picker.pick(now))
        assert picker.next_deadline() == issued[0][0] + 30.0
        _, r = issued.pop(0)
        picker.on_piece(r.parent, r.index, True, now)
        now += 1.0
        assert len(picker._deadlines) <= 2 * 3 + 64 + 1  # finished requests are swept
    assert picker.next_deadline() is None
    assert repr(picker).startswith("PiecePicker(HHHH")


# -- properties ------------------------------------------------------------------------------

NAMES = "abcde"


@dataclass
class Model:
    """What a careful driver knows, to check the picker's answers against."""

    n: int
    config: PickerConfig
    have: int
    verifiable: int = 0
    now: float = 0.0
    reported: dict[str, int] = field(default_factory=dict)
    banned: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    out: dict[tuple[str, int], float] = field(default_factory=dict)  # request -> deadline
    received: set[tuple[str, int]] = field(default_factory=set)  # bytes in, verdict pending

    def busy(self, name: str) -> int:
        """The parent's slots taken: its requests whose bytes are still coming."""
        return sum(1 for k in self.out if k[0] == name and k not in self.received)

    def held(self, name: str) -> int:
        return self.reported[name] & ~self.banned[name]

    def avail(self, i: int) -> int:
        return sum(self.held(name) >> i & 1 for name in self.reported)

    def free(self) -> int:
        busy = 0
        for _, i in self.out:
            busy |= 1 << i
        return ((1 << self.verifiable) - 1) & ~self.have & ~busy

    def count(self, name: str) -> int:
        return sum(1 for p, _ in self.out if p == name)

    def drop(self, name: str) -> None:
        for key in [k for k in self.out if k[0] == name]:
            del self.out[key]
        for d in (self.reported, self.banned, self.bad):
            d.pop(name, None)


def check_pick(m: Model, got: list[Request]) -> None:
    cfg = m.config
    fm = (~m.have & (m.have + 1)).bit_length() - 1
    window = ((1 << cfg.prefix_window) - 1) << fm
    free = m.free()
    for r in got:
        held = m.held(r.parent)
        assert held >> r.index & 1, "asked a parent for a piece it lacks"
        assert r.index < m.verifiable, "asked for an unverifiable piece"
        assert not m.have >> r.index & 1, "asked for a piece already held"
        assert (r.parent, r.index) not in m.out
        if free >> r.index & 1:
            mine = held & free
            if mine & window:
                assert r.index == (mine & window & -(mine & window)).bit_length() - 1
            else:
                best = min(m.avail(i) for i in iter_bits(mine))
                assert m.avail(r.index) == best, "a rarer piece was available"
            free &= ~(1 << r.index)
        else:
            for name in m.reported:
                assert not m.held(name) & free, "endgame while a fresh piece was free"
            counts = {
                i: len(reqs)
                for i in iter_bits(m.held(r.parent))
                if (reqs := [p for p, j in m.out if j == i]) and r.parent not in reqs
            }
            assert counts[r.index] < cfg.endgame_duplicates
            assert counts[r.index] == min(counts.values()), "fewest requests first"
        m.out[(r.parent, r.index)] = m.now + cfg.request_timeout
        m.received.discard((r.parent, r.index))  # a request issued again: bytes not in yet
        assert m.busy(r.parent) <= cfg.max_in_flight_per_parent
    # Nothing left undone: every parent with a free slot had nothing more it could be given.
    endgame = not any(m.held(name) & free for name in m.reported)
    for name in m.reported:
        if m.busy(name) < cfg.max_in_flight_per_parent:
            assert not m.held(name) & free
            if endgame:
                for i in iter_bits(m.held(name)):
                    reqs = [p for p, j in m.out if j == i]
                    assert not reqs or name in reqs or len(reqs) >= cfg.endgame_duplicates


def check_states(m: Model, picker: PiecePicker) -> None:
    busy = {i for _, i in m.out}
    expect = "".join("H" if m.have >> i & 1 else "D" if i in busy else "." for i in range(m.n))
    assert states(picker, m.n) == expect
    assert picker.parents() == sorted(m.reported)
    for name in m.reported:
        assert picker.in_flight(name) == m.count(name)
    for i in range(m.n):
        assert picker.availability(i) == m.avail(i)
    deadlines = list(m.out.values())
    assert picker.next_deadline() == (min(deadlines) if deadlines else None)


Event = tuple[str, str, int]
# Picks and good pieces are most of a real download; the rest stir things up.
KINDS = ["pick"] * 4 + ["ok"] * 3 + ["recv"] * 2
KINDS += ["bad", "fail", "tick", "add", "update", "remove", "verify"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, PickerConfig, int, list[Event]]:
    n = draw(st.integers(0, 24))
    full = (1 << n) - 1
    bitfields = st.integers(0, full) | st.just(full)
    events: list[Event] = [
        ("add", name, draw(bitfields)) for name in NAMES[: draw(st.integers(1, 4))]
    ]
    events.append(("verify", "", draw(st.integers(0, n))))
    for _ in range(draw(st.integers(5, 60))):
        kind = draw(st.sampled_from(KINDS))
        if kind in ("add", "update"):
            events.append((kind, draw(st.sampled_from(NAMES)), draw(bitfields)))
        elif kind == "remove":
            events.append((kind, draw(st.sampled_from(NAMES)), 0))
        else:
            events.append((kind, "", draw(st.integers(0, 99 if kind != "tick" else 12))))
    have = draw(st.just(0) | st.integers(0, full))
    return n, draw(st.integers(0, 2**32)), draw(configs), have, events


configs = st.builds(
    PickerConfig,
    max_in_flight_per_parent=st.integers(1, 4),
    endgame_duplicates=st.integers(1, 3),
    prefix_window=st.integers(0, 4),
    request_timeout=st.just(10.0),
    max_bad_pieces=st.integers(1, 3),
)


def run(n: int, seed: int, config: PickerConfig, have: int, events: list[Event]) -> list[object]:
    """Drive a picker through `events`, checking it against a model; return what it said."""
    have &= (1 << n) - 1
    picker = PiecePicker(PieceLayout(n, 1), random.Random(seed), config, Bitfield(n, have))
    m = Model(n, config, have)
    said: list[object] = []
    for op, name, arg in events:
        if op in ("add", "update"):
            bits = arg & ((1 << n) - 1)
            if op == "update" and name not in m.reported:
                with pytest.raises(PickerError):
                    picker.update_parent(name, Bitfield(n, bits))
                continue
            getattr(picker, f"{op}_parent")(name, Bitfield(n, bits))
            m.reported[name] = bits
            m.banned.setdefault(name, 0)
            m.bad.setdefault(name, 0)
        elif op == "remove":
            if name not in m.reported:
                with pytest.raises(PickerError):
                    picker.remove_parent(name)
                continue
            expect = sorted(i for p, i in m.out if p == name)
            assert picker.remove_parent(name) == expect
            m.drop(name)
            said.append(expect)
        elif op == "verify":
            m.verifiable = max(m.verifiable, arg % (n + 1))
            picker.set_verifiable(m.verifiable)
        elif op == "pick":
            got = picker.pick(m.now)
            check_pick(m, got)
            said.append(got)
        elif op == "tick":
            m.now += arg
            got = picker.expire(m.now)
            expired = {k for k, d in m.out.items() if d <= m.now}
            assert set(pairs(got)) == expired
            for k in expired:
                del m.out[k]
            said.append(got)
        elif m.out:
            parent, i = sorted(m.out)[arg % len(m.out)]
            if op == "recv":
                picker.on_received(parent, i)  # frees the parent's slot, request stays
                m.received.add((parent, i))
                check_states(m, picker)
                continue
            if op == "fail":
                lacks = arg >= 50  # the parent answered 404: it is not asked again for now
                picker.on_failure(parent, i, lacks_piece=lacks)
                del m.out[(parent, i)]
                if lacks:
                    m.reported[parent] &= ~(1 << i)
                check_states(m, picker)
                continue
            answer = picker.on_piece(parent, i, op == "ok", m.now)
            said.append(answer)
            del m.out[(parent, i)]
            if op == "ok":
                others = sorted(p for p, j in m.out if j == i)
                assert answer == [Cancel(p, i) for p in others]
                for p in others:
                    del m.out[(p, i)]
                m.have |= 1 << i
                assert picker.on_piece(parent, i, True, m.now) == []  # late duplicate
            else:
                m.bad[parent] += 1
                m.banned[parent] |= 1 << i
                cancels = []
                if m.bad[parent] >= config.max_bad_pieces:
                    cancels = [Cancel(parent, j) for p, j in sorted(m.out) if p == parent]
                    m.drop(parent)
                assert answer == [BadParent(parent, i), *cancels]
        check_states(m, picker)
    return said


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_events_keep_the_rules(
    scenario: tuple[int, int, PickerConfig, int, list[Event]],
) -> None:
    first = run(*scenario)
    assert run(*scenario) == first  # same seed, same events: same picks


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**32),
    config=configs,
    holders=st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
    mishaps=st.integers(0, 30),
)
def test_always_completes_when_parents_hold_everything(
    n: int, seed: int, config: PickerConfig, holders: list[int], mishaps: int
) -> None:
    full = (1 << n) - 1
    bits = [h & full for h in holders]
    bits[seed % len(bits)] |= full & ~sum_or(bits)  # together they hold every piece
    picker = PiecePicker(PieceLayout(n, 1), random.Random(seed), config)
    for k, b in enumerate(bits):
        picker.add_parent(f"p{k}", Bitfield(n, b))
    rng = random.Random(seed)
    out: list[Request] = []
    now = 0.0
    for _ in range(20 * n + 50):
        if picker.is_complete():
            break
        picker.set_verifiable(min(n, picker.verifiable + rng.randint(0, 3)))
        out.extend(picker.pick(now))
        if not out:
            assert picker.verifiable < n, "stuck with nothing in flight"
            continue
        r = out.pop(rng.randrange(len(out)))
        roll = rng.random()
        if mishaps and roll < 0.15:
            mishaps -= 1
            picker.on_failure(r.parent, r.index)
        elif mishaps and roll < 0.2:
            mishaps -= 1
            out.append(r)
            now += config.request_timeout
            expired = picker.expire(now)
            assert r in expired
            out = [x for x in out if x not in expired]
        else:
            gone = picker.on_piece(r.parent, r.index, True, now)
            out = [x for x in out if Cancel(x.parent, x.index) not in gone]
    assert picker.is_complete()
    assert picker.next_deadline() is None


def sum_or(values: list[int]) -> int:
    acc = 0
    for v in values:
        acc |= v
    return acc


def test_pipeline_depth_spreads_over_the_parents() -> None:
    picker = make(16, max_in_flight_per_parent=1, pipeline_depth=4, prefix_window=0)
    picker.add_parent("a", Bitfield.full(16))
    assert picker.in_flight_limit() == 4
    assert len(picker.pick(0.0)) == 4  # one parent: still four in flight
    picker.add_parent("b", Bitfield.full(16))
    assert picker.in_flight_limit() == 2
    for name in "cd":
        picker.add_parent(name, Bitfield.full(16))
    assert picker.in_flight_limit() == 1
    requests = picker.pick(1.0)
    assert {r.parent for r in requests} == {"b", "c", "d"}  # a is still full
    assert all(picker.in_flight(p) <= 4 for p in "abcd")


def test_received_bytes_free_the_parents_slot_until_the_verdict() -> None:
    picker = make(4, max_in_flight_per_parent=1, prefix_window=4, max_bad_pieces=1)
    picker.add_parent("a", Bitfield.full(4))
    assert pairs(picker.pick(0.0)) == [("a", 0)]
    assert picker.pick(0.0) == []  # the one slot is taken while the bytes come
    picker.on_received("a", 0)
    picker.on_received("a", 0)  # idempotent
    assert pairs(picker.pick(0.0)) == [("a", 1)]  # asked while piece 0 is being checked
    assert picker.in_flight("a") == 2
    assert states(picker, 4) == "DD.."
    assert picker.pick(0.0) == []
    # a bad verdict still blames the parent, and its other request comes back
    assert picker.on_piece("a", 0, False, 0.0) == [BadParent("a", 0), Cancel("a", 1)]
    assert states(picker, 4) == "...."


def test_received_for_a_request_not_in_flight_is_misuse() -> None:
    picker = make(2)
    picker.add_parent("a", Bitfield.full(2))
    with pytest.raises(PickerError):
        picker.on_received("a", 0)
    picker.pick(0.0)
    with pytest.raises(PickerError):
        picker.on_received("b", 0)


def test_received_lists_a_parents_pieces_whose_bytes_are_in() -> None:
    picker = make(4, max_in_flight_per_parent=2, prefix_window=4)
    picker.add_parent("a", Bitfield.full(4))
    assert pairs(picker.pick(0.0)) == [("a", 0), ("a", 1)]
    assert picker.received("a") == []
    picker.on_received("a", 1)
    assert picker.received("a") == [1]
    picker.on_piece("a", 1, True, 0.0)
    assert picker.received("a") == []  # verdict in: no longer pending
    with pytest.raises(PickerError):
        picker.received("b")


def test_receiving_says_whether_some_requests_bytes_are_still_coming() -> None:
    picker = PiecePicker(PieceLayout(4, 1), random.Random(0))
    picker.set_verifiable(4)
    assert not picker.receiving()
    picker.add_parent("a", Bitfield.from_indexes(4, [0, 1]))
    (req,) = picker.pick(0.0)
    assert picker.receiving()
    picker.on_received(req.parent, req.index)
    assert not picker.receiving()  # in flight still, but its bytes are in
    assert picker.state(req.index) is PieceState.DOWNLOADING


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_availability_of_a_large_blob_from_dense_and_sparse_bitfields(density: float) -> None:
    """Availability levels are kept in priority-rank space; a blob of hundreds of pieces
    takes the dense conversion as well as the sparse one."""
    n = 400
    rng = random.Random(7)
    picker = make(n, seed=3)
    held = {
        name: {i for i in range(n) if rng.random() < density} | {rng.randrange(n)} for name in "abc"
    }
    for name, pieces in held.items():
        picker.add_parent(name, Bitfield.from_indexes(n, pieces))
    picker.update_parent("b", Bitfield.from_indexes(n, set(range(0, n, 3))))
    held["b"] = set(range(0, n, 3))
    for i in range(n):
        assert picker.availability(i) == sum(i in pieces for pieces in held.values())
