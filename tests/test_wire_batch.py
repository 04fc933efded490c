"""Batched announces on the wire: AnnounceBatch and BatchReply, their limits and bad input.

The same promise as the other messages (tests/test_wire.py): a batch decodes to a valid message
or raises `ProtocolError` naming the item and the field at fault, never anything else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.digest import Digest
from p2pd.wire import (
    MAX_BATCH,
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    Ack,
    Announce,
    AnnounceBatch,
    BatchReply,
    Error,
    ProtocolError,
    decode,
    encode,
)
from tests.test_wire import (
    FUZZ,
    assignment,
    decodes_or_refuses,
    digests,
    messages,
    peer_ids,
    register,
)


def digest(i: int) -> Digest:
    return Digest(f"{i:064x}")


def announce(i: int, peer_id: str = "node-1:65003", **changes: Any) -> Announce:
    base = Announce(digest(i), peer_id, (i, i + 1), manifest_known=4, want_parents=True)
    return dataclasses.replace(base, **changes)


def batch(k: int = 3) -> AnnounceBatch:
    return AnnounceBatch(tuple(announce(i) for i in range(k)))


def body(msg: AnnounceBatch | BatchReply) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(encode(msg), use_list=True)
    return out


def pack(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def refused(data: bytes, fragment: str) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


REPLY = BatchReply(
    (assignment(digest=digest(0)), Error("unknown_task", "no task"), assignment(digest=digest(2)))
)


@pytest.mark.parametrize("msg", [batch(1), batch(MAX_BATCH), REPLY], ids=["1", "max", "reply"])
def test_round_trip(msg: AnnounceBatch | BatchReply) -> None:
    assert decode(encode(msg), type(msg)) == msg


def test_wire_form_items_are_their_own_maps_without_the_version() -> None:
    b = body(batch(2))
    assert b["v"] == PROTOCOL_VERSION and b["type"] == "announce_batch"
    assert list(b) == ["v", "type", "items"]
    assert b["items"][1] == {
        "type": "announce",
        "digest": str(digest(1)),
        "peer_id": "node-1:65003",
        "pieces": [1, 2],
        "manifest_known": 4,
        "want_parents": True,
    }
    items = body(REPLY)["items"]
    assert [item["type"] for item in items] == ["assignment", "error", "assignment"]
    assert "v" not in items[0]
    assert items[1] == {"type": "error", "code": "unknown_task", "message": "no task"}


def test_batch_relations() -> None:
    with pytest.raises(ProtocolError, match=r"items\[2\].peer_id: 'other' is not the first"):
        AnnounceBatch((announce(0), announce(1), announce(2, peer_id="other")))
    with pytest.raises(ProtocolError, match="two announces for one digest"):
        AnnounceBatch((announce(0), announce(1), announce(0, pieces=())))
    # the same on the wire
    b = body(batch(3))
    b["items"][2]["peer_id"] = "other"
    refused(pack(b), "is not the first item's")
    b = body(batch(3))
    b["items"][2]["digest"] = b["items"][0]["digest"]
    refused(pack(b), "two announces for one digest")


@pytest.mark.parametrize("count", [0, MAX_BATCH + 1])
def test_item_count_bounds(count: int) -> None:
    with pytest.raises(ProtocolError, match=f"{count} items, want 1..{MAX_BATCH}"):
        AnnounceBatch(tuple(announce(i) for i in range(count)))
    b = body(batch(1))
    b["items"] = b["items"] * count if count else []
    refused(pack(b), f"AnnounceBatch.items: {count} items, want 1..{MAX_BATCH}")


def test_items_of_the_wrong_kind_are_refused() -> None:
    with pytest.raises(ProtocolError, match=r"items\[1\]: expected announce, got Register"):
        AnnounceBatch((announce(0), register()))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="expected assignment or error, got Ack"):
        BatchReply((Ack(),))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="expected announce, got tuple"):
        AnnounceBatch(((),))  # type: ignore[arg-type]
    # on the wire: an item typed as another message, or a batch inside a batch
    b = body(batch(2))
    b["items"][1]["type"] = "register"
    refused(pack(b), "AnnounceBatch.items[1]: item: type 'register' is not one of announce")
    b = body(batch(1))
    b["items"] = [body(batch(1))]
    refused(pack(b), "type 'announce_batch' is not one of announce")
    r = body(REPLY)
    r["items"][1] = {"type": "ack"}
    refused(pack(r), "BatchReply.items[1]: item: type 'ack' is not one of assignment, error")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda item: item.pop("type"), "type None is not one of announce"),
        (lambda item: item.update(type=1), "type 1 is not one of announce"),
        (lambda item: item.update(v=PROTOCOL_VERSION), "Announce: unknown field(s) 'v'"),
        (lambda item: item.pop("pieces"), "Announce: missing field(s) pieces"),
        (lambda item: item.update(extra=1), "unknown field(s) 'extra'"),
        (lambda item: item.update(pieces=[1, 1]), "Announce.pieces: duplicate piece indexes"),
        (lambda item: item.update(pieces=[70000]), "Announce.pieces[0]: 70000 out of range"),
        (lambda item: item.update(want_parents=1), "Announce.want_parents: expected bool"),
        (lambda item: item.update(peer_id="a b"), "Announce.peer_id: not a peer id"),
    ],
)
def test_bad_item_fields_name_the_item(change: Any, fragment: str) -> None:
    b = body(batch(3))
    change(b["items"][1])
    message = refused(pack(b), fragment)
    assert message.startswith("AnnounceBatch.items[1]: ")


@pytest.mark.parametrize(
    "items",
    [None, 3, "items", b"x", {"type": "announce"}, [None], [[1, 2]], [b"\x80"]],
    ids=repr,
)
def test_items_of_the_wrong_shape(items: object) -> None:
    b = body(batch(1))
    b["items"] = items
    refused(pack(b), "AnnounceBatch.items")


def test_reply_item_fields_are_checked_like_a_message() -> None:
    r = body(REPLY)
    r["items"][0]["sealed"] = True  # contradicts state "fetching"
    refused(pack(r), "BatchReply.items[0]: Assignment.sealed: True contradicts state")
    r = body(REPLY)
    r["items"][1]["code"] = "Not A Code"
    refused(pack(r), "BatchReply.items[1]: Error.code")


def test_expect_restricts_batches_too() -> None:
    with pytest.raises(ProtocolError, match="unexpected message type 'announce_batch'"):
        decode(encode(batch(2)), Announce)
    assert decode(encode(REPLY), (BatchReply, Error)) == REPLY


def test_a_batch_over_the_size_limit_is_refused_before_unpacking() -> None:
    huge = AnnounceBatch(tuple(announce(i, pieces=tuple(range(40000))) for i in range(20)))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(huge)
    items = [b"x" * MAX_MESSAGE_SIZE]
    data = pack({"v": PROTOCOL_VERSION, "type": "announce_batch", "items": items})
    refused(data, "exceeds")


@st.composite
def batches(draw: st.DrawFn) -> AnnounceBatch:
    peer = draw(peer_ids)
    ds = draw(st.lists(digests, min_size=1, max_size=MAX_BATCH, unique=True))
    return AnnounceBatch(
        tuple(
            Announce(
                d,
                peer,
                tuple(draw(st.lists(st.integers(0, 2000), unique=True, max_size=8))),
                draw(st.integers(0, 2000)),
                draw(st.booleans()),
            )
            for d in ds
        )
    )


replies = st.lists(
    messages.filter(lambda m: isinstance(m, Error) or type(m).__name__ == "Assignment"),
    min_size=1,
    max_size=6,
).map(lambda items: BatchReply(tuple(items)))  # type: ignore[arg-type]


@FUZZ
@given(st.one_of(batches(), replies))
def test_valid_batches_round_trip(msg: AnnounceBatch | BatchReply) -> None:
    assert decode(encode(msg), type(msg)) == msg


@FUZZ
@given(batches(), st.data())
def test_mutated_batches_decode_or_refuse(msg: AnnounceBatch, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    pos = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    if how == "flip":
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    decodes_or_refuses(bytes(raw))
