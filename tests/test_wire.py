"""The control-message codec: round trips, one test per validation rule, and fuzzing.

The fuzz tests hold the module's promise: whatever bytes arrive, `decode` either returns a valid
message (which then round-trips) or raises `ProtocolError` -- never anything else.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pd.core.bitfield import Bitfield
from p2pd.core.digest import Digest
from p2pd.core.layout import MAX_BLOB_SIZE, MAX_PIECE_SIZE, MAX_PIECES
from p2pd.wire import (
    _SPECS,
    MAX_MESSAGE_SIZE,
    MAX_PARENTS,
    PROTOCOL_VERSION,
    Ack,
    Announce,
    Assignment,
    Error,
    Leave,
    Message,
    ParentInfo,
    ProtocolError,
    Register,
    Report,
    _dump_fields,
    decode,
    encode,
)

DIGEST = Digest("ab" * 32)
MIB = 1024 * 1024
LONG_HOST = ".".join(["h" * 63] * 3 + ["h" * 61])  # 253 characters, the most DNS allows
ALL_TYPES: tuple[type[Any], ...] = (Register, Assignment, Announce, Report, Leave, Ack, Error)


def parent(peer_id: str = "peer-b", count: int = 10, bits: int = 0b1011) -> ParentInfo:
    return ParentInfo(peer_id, "10.0.0.2:7001", "rack-1", Bitfield(count, bits))


def register(**changes: Any) -> Register:
    base = Register(
        digest=DIGEST,
        size=40 * MIB,
        peer_id="node-17.example:a",
        address="10.0.0.1:7001",
        zone="eu-west-1a",
        upload_slots=8,
        upstream="https://registry-1.docker.io",
        repository="library/app",
        authorization="Bearer abc.def",
        have=Bitfield(10, 0b11),
    )
    return dataclasses.replace(base, **changes)


def assignment(**changes: Any) -> Assignment:
    base = Assignment(
        digest=DIGEST,
        state="fetching",
        size=40 * MIB,
        piece_size=4 * MIB,
        manifest_start=2,
        hashes=bytes(range(48)),
        sealed=False,
        parents=(parent(), parent("peer-c", bits=0)),
        pace_ms=1500,
    )
    return dataclasses.replace(base, **changes)


def announce(**changes: Any) -> Announce:
    base = Announce(DIGEST, "peer-a", (3, 1, 2), manifest_known=5, want_parents=True)
    return dataclasses.replace(base, **changes)


def report(**changes: Any) -> Report:
    return dataclasses.replace(Report(DIGEST, "peer-a", "peer-b", 7, "hash mismatch"), **changes)


EXAMPLES: dict[type[Any], Message] = {
    Register: register(),
    Assignment: assignment(),
    Announce: announce(),
    Report: report(),
    Leave: Leave(DIGEST, "peer-a"),
    Ack: Ack(),
    Error: Error("unknown_task", "no task for sha256:ab…"),
}


def wire(msg: Message) -> dict[Any, Any]:
    """The decoded map of an encoding, for tests that break one field."""
    body: dict[Any, Any] = msgpack.unpackb(encode(msg), use_list=False)
    return body


def pack(body: object) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def rejects(data: bytes, fragment: str, expect: Any = None) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, expect)
    assert fragment in str(info.value), str(info.value)


def rejects_field(msg: Message, key: str, value: object, fragment: str) -> None:
    body = wire(msg)
    body[key] = value
    rejects(pack(body), fragment)


# -- round trips --------------------------------------------------------------------------------

ROUND_TRIPS = [
    *EXAMPLES.values(),
    register(zone="", authorization=None, have=None, size=0),
    register(
        address="[2001:db8::1]:65535",
        upstream="http://" + "r" * 60 + ".internal:5000/" + "p" * 1900,
        repository="/".join(["a" * 63] * 4),
        authorization="Basic " + "x" * 8186,
        have=Bitfield.full(MAX_PIECES),
        peer_id="p" * 64,
        zone="z" * 64,
        upload_slots=1024,
        size=MAX_BLOB_SIZE,
    ),
    # A 0-byte blob: no pieces, nothing to hash, ready at once.
    assignment(
        size=0,
        manifest_start=0,
        hashes=b"",
        state="ready",
        sealed=True,
        parents=(parent(count=0, bits=0),),
    ),
    assignment(state="failed", parents=(), hashes=b"", manifest_start=10),
    # The largest reply: every hash of a 65536-piece blob and MAX_PARENTS full bitfields.
    assignment(
        size=MAX_PIECES * 32 * MIB,
        piece_size=32 * MIB,
        manifest_start=0,
        hashes=bytes(16 * MAX_PIECES),
        state="ready",
        sealed=True,
        parents=tuple(
            ParentInfo(f"p{i}", LONG_HOST + ":65535", "z" * 64, Bitfield.full(MAX_PIECES))
            for i in range(MAX_PARENTS)
        ),
    ),
    announce(pieces=(), manifest_known=0, want_parents=False),
    announce(pieces=tuple(range(MAX_PIECES)), manifest_known=MAX_PIECES),
    report(reason="r" * 200, index=MAX_PIECES - 1),
    Error("bad_request", ""),
    Error("e", "ü" * 1000),
]


@pytest.mark.parametrize("msg", ROUND_TRIPS, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode(data) == msg
    assert decode(data, type(msg)) == msg


def test_envelope_and_wire_forms() -> None:
    body = wire(register())
    assert body["v"] == PROTOCOL_VERSION and body["type"] == "register"
    assert body["digest"] == str(DIGEST)
    assert body["have"] == (10, b"\x03\x00")  # [length, little-endian bitfield bytes]
    body = wire(assignment())
    assert type(body["hashes"]) is bytes  # columnar, one bin
    assert body["parents"][0] == {
        "peer_id": "peer-b",
        "address": "10.0.0.2:7001",
        "zone": "rack-1",
        "pieces": (10, b"\x0b\x00"),
    }
    assert wire(Ack()) == {"v": PROTOCOL_VERSION, "type": "ack"}


def test_spec_table_matches_the_dataclasses() -> None:
    for cls, spec in _SPECS.items():
        assert list(spec) == [f.name for f in dataclasses.fields(cls)], cls


def test_expect_restricts_message_types() -> None:
    data = encode(Ack())
    assert decode(data, Ack) == Ack()
    assert decode(data, (Assignment, Ack)) == Ack()
    rejects(data, "unexpected message type 'ack' (expected announce)", Announce)
    rejects(data, "(expected assignment, error)", (Assignment, Error))


def test_assignment_helpers() -> None:
    a = assignment()
    assert a.layout.count == 10
    assert a.manifest_end == 5


def test_error_safe_cleans_uncontrolled_text() -> None:
    e = Error.safe("bad_request", "line one\nline two\x1b[31m" + "x" * 2000)
    assert e.message.startswith("line one?line two?[31m")
    assert len(e.message) == 1000
    assert decode(encode(e)) == e


def test_bytes_like_input() -> None:
    data = encode(register())
    assert decode(bytearray(data)) == decode(memoryview(data)) == register()
    # Not bytes at all: msgpack's TypeError still comes out as the one error.
    rejects("text", "malformed MessagePack: TypeError")  # type: ignore[arg-type]


# -- the envelope -------------------------------------------------------------------------------


def test_oversize_body_rejected_before_unpacking() -> None:
    huge = pack({"v": PROTOCOL_VERSION, "type": "ack", "pad": b"x" * MAX_MESSAGE_SIZE})
    rejects(huge, f"message of {len(huge)} bytes exceeds the 2097152-byte limit")
    # At the limit, msgpack runs (and finds garbage): the limit is inclusive.
    rejects(b"\xc1" * MAX_MESSAGE_SIZE, "malformed MessagePack")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "malformed MessagePack"),
        (b"\xc1", "malformed MessagePack"),  # never-used type byte
        (pack({"v": PROTOCOL_VERSION, "type": "ack"}) + b"\x00", "ExtraData"),
        (b"\x91" * 5000 + b"\x00", "malformed MessagePack"),  # nesting too deep
        (pack({1: 1}), "malformed MessagePack"),  # non-string map key
        (b"\x82\xa1v\x01\xa1v\x01", "duplicate key"),
        (
            pack({"v": PROTOCOL_VERSION, "type": "ack", "x": msgpack.ExtType(1, b"abc")}),
            "malformed",
        ),
        (b"\xdb\xff\xff\xff\xff", "malformed MessagePack"),  # str32 claiming 4 GiB
        (pack([1, "ack"]), "message must be a map, got tuple"),
        (pack("hello"), "message must be a map"),
    ],
)
def test_malformed_messagepack(data: bytes, fragment: str) -> None:
    rejects(data, fragment)


@pytest.mark.parametrize("msg", [announce(), register(), Leave(DIGEST, "peer-a")])
def test_a_duplicate_key_is_refused_in_a_message_otherwise_valid(msg: Message) -> None:
    # decode's fast path for messages without inner maps (_decode_flat) unpacks without the
    # duplicate-key hook: the top map's header must still give the duplicate away, whichever
    # copy of the key is the valid one
    pairs = list(wire(msg).items())
    key = pairs[2][0]
    for doubled in ([*pairs, (key, "bogus")], [(key, "bogus"), *pairs]):
        data = bytes([0x80 + len(doubled)]) + b"".join(pack(k) + pack(v) for k, v in doubled)
        rejects(data, "duplicate key in a map")
    # and without the duplicate, the same bytes decode
    data = bytes([0x80 + len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs)
    assert decode(data) == msg


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"type": "ack"}, "message has no protocol version ('v')"),
        ({"v": 7, "type": "ack"}, "unsupported protocol version 7 (this daemon speaks 2)"),
        ({"v": True, "type": "ack"}, "unsupported protocol version True"),
        ({"v": 1.0, "type": "ack"}, "unsupported protocol version 1.0"),
        ({"v": "1", "type": "ack"}, "unsupported protocol version '1'"),
        # the version is checked before anything else about the message
        ({"v": 3, "type": "from-the-future", "x": 1}, "unsupported protocol version 3"),
        # the version before Assignment.pace_ms
        ({"v": 1, "type": "ack"}, "unsupported protocol version 1 (this daemon speaks 2)"),
        ({"v": PROTOCOL_VERSION}, "message has no 'type'"),
        ({"v": PROTOCOL_VERSION, "type": "subscribe"}, "unknown message type 'subscribe'"),
        ({"v": PROTOCOL_VERSION, "type": b"ack"}, "unknown message type b'ack'"),
        ({"v": PROTOCOL_VERSION, "type": "Ack"}, "unknown message type 'Ack'"),
    ],
)
def test_version_and_type(body: dict[str, Any], fragment: str) -> None:
    rejects(pack(body), fragment)


# -- fields -------------------------------------------------------------------------------------


def test_missing_field() -> None:
    body = wire(register())
    del body["zone"], body["have"]
    rejects(pack(body), "Register: missing field(s) zone, have")


def test_unknown_field() -> None:
    body = wire(announce())
    body["priority"] = 1
    rejects(pack(body), "Announce: unknown field(s) 'priority'")
    body = wire(Ack())
    body[b"v"] = 1
    rejects(pack(body), "Ack: unknown field(s) b'v'")


@pytest.mark.parametrize(
    ("msg", "key", "value", "fragment"),
    [
        (register(), "size", True, "Register.size: expected int, got bool True"),
        (register(), "size", 1.0, "Register.size: expected int, got float"),
        (register(), "size", "1", "Register.size: expected int, got str"),
        (register(), "peer_id", b"peer-a", "Register.peer_id: expected str, got bytes"),
        (register(), "authorization", b"Bearer", "Register.authorization: expected str"),
        (register(), "digest", DIGEST.raw, "Register.digest: expected str, got bytes"),
        (register(), "have", (10, "\x03"), "Register.have.bytes: expected bytes, got str"),
        (register(), "have", (True, b"\x03"), "Register.have.length: expected int, got bool"),
        (register(), "have", b"\x03", "Register.have: expected a [length, bytes] pair"),
        (register(), "have", (10, b"\x03", 1), "Register.have: expected a [length, bytes]"),
        (register(), "zone", None, "Register.zone: expected str, got NoneType"),
        (assignment(), "hashes", "x" * 16, "Assignment.hashes: expected bytes, got str"),
        (assignment(), "sealed", 0, "Assignment.sealed: expected bool, got int 0"),
        (assignment(), "parents", {}, "Assignment.parents: expected tuple, got dict"),
        (
            assignment(),
            "parents",
            ("x",),
            "Assignment.parents[0]: ParentInfo: expected a map, got 'x'",
        ),
        (announce(), "pieces", (1, True), "Announce.pieces[1]: expected int, got bool"),
        (announce(), "pieces", 5, "Announce.pieces: expected tuple, got int"),
        (announce(), "want_parents", 1, "Announce.want_parents: expected bool, got int"),
        (report(), "reason", None, "Report.reason: expected str, got NoneType"),
    ],
)
def test_wrong_types(msg: Message, key: str, value: object, fragment: str) -> None:
    rejects_field(msg, key, value, fragment)


@pytest.mark.parametrize(
    ("msg", "key", "value", "fragment"),
    [
        (register(), "size", -1, "Register.size: -1 out of range 0..2199023255552"),
        (register(), "size", MAX_BLOB_SIZE + 1, "Register.size: 2199023255553 out of range"),
        (register(), "size", 2**64 - 1, "Register.size: 18446744073709551615 out of range"),
        (register(), "upload_slots", 0, "Register.upload_slots: 0 out of range 1..1024"),
        (register(), "upload_slots", 1025, "Register.upload_slots: 1025 out of range"),
        (register(), "have", (MAX_PIECES + 1, b""), "Register.have.length: 65537 out of range"),
        (assignment(), "piece_size", 0, "Assignment.piece_size: 0 out of range"),
        (assignment(), "piece_size", MAX_PIECE_SIZE * 2, "Assignment.piece_size: 4294967296 out"),
        (assignment(), "state", "done", "Assignment.state: not one of fetching, ready, failed"),
        (assignment(), "pace_ms", -1, "Assignment.pace_ms: -1 out of range 0..3600000"),
        (assignment(), "pace_ms", 3_600_001, "Assignment.pace_ms: 3600001 out of range"),
        (assignment(), "pace_ms", 1.5, "Assignment.pace_ms: expected int, got float"),
        (announce(), "pieces", (MAX_PIECES,), "Announce.pieces[0]: 65536 out of range 0..65535"),
        (announce(), "pieces", (-1,), "Announce.pieces[0]: -1 out of range"),
        (announce(), "pieces", (4, 2, 4), "Announce.pieces: duplicate piece indexes"),
        (announce(), "manifest_known", -1, "Announce.manifest_known: -1 out of range"),
        (report(), "index", MAX_PIECES, "Report.index: 65536 out of range 0..65535"),
        (report(), "reason", "", "Report.reason: length 0 outside 1..200"),
        (report(), "reason", "r" * 201, "Report.reason: length 201 outside 1..200"),
        (Error("x", ""), "message", "m" * 1001, "Error.message: length 1001 outside 0..1000"),
        (Error("x", ""), "code", "Bad-Code", "Error.code: not an error code"),
    ],
)
def test_out_of_range(msg: Message, key: str, value: object, fragment: str) -> None:
    rejects_field(msg, key, value, fragment)


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "AB" * 32,  # uppercase hex
        "sha256:" + "ab" * 31,  # short
        "sha256:" + "ab" * 33,  # long
        "sha512:" + "ab" * 64,  # wrong algorithm
        "sha256:../../etc",
        "sha256:" + "ab" * 32 + "\n",
        "",
    ],
)
def test_bad_digest(text: str) -> None:
    rejects_field(Leave(DIGEST, "p"), "digest", text, "Leave.digest: not a sha256 digest")


BAD_STRINGS: list[tuple[str, str, str]] = [
    ("peer_id", "", "Register.peer_id: length 0 outside 1..64"),
    ("peer_id", "p" * 65, "Register.peer_id: length 65 outside 1..64"),
    ("peer_id", "peer a", "Register.peer_id: not a peer id"),
    ("peer_id", "peer\n", "Register.peer_id: not a peer id"),
    ("peer_id", "péer", "Register.peer_id: not a peer id"),
    ("peer_id", "peer/../x", "Register.peer_id: not a peer id"),
    ("zone", "z" * 65, "Register.zone: length 65 outside 0..64"),
    ("zone", "eu west", "Register.zone: not a zone"),
    ("zone", "a\x00", "Register.zone: not a zone"),
    ("address", "10.0.0.1", "Register.address: not host:port"),
    ("address", "10.0.0.1:0", "Register.address: not host:port"),
    ("address", "10.0.0.1:65536", "Register.address: not host:port"),
    ("address", "10.0.0.1:080", "Register.address: not host:port"),
    ("address", "999.0.0.1:80", "Register.address: not host:port"),
    ("address", "10.0.0:80", "Register.address: not host:port"),
    ("address", "::1:80", "Register.address: not host:port"),
    ("address", "[::g]:80", "Register.address: not host:port"),
    ("address", "[fe80::1%eth0]:80", "Register.address: not host:port"),
    ("address", "-host:80", "Register.address: not host:port"),
    ("address", "a..b:80", "Register.address: not host:port"),
    ("address", "host :80", "Register.address: not host:port"),
    ("address", "host:80\r\n", "Register.address: not host:port"),
    ("address", LONG_HOST + "hh:1", "Register.address: not host:port"),  # 255 > 253
    ("upstream", "ftp://registry", "Register.upstream: not an http(s)://"),
    ("upstream", "HTTPS://registry", "Register.upstream: not an http(s)://"),
    ("upstream", "https://user:pw@registry", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry/v2?x=1", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry/#frag", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry/a b", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry/\r\nHost: evil", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry/%zz", "Register.upstream: not an http(s)://"),
    ("upstream", "https://registry:99999", "Register.upstream: not an http(s)://"),
    ("upstream", "https://" + "a" * 2041, "Register.upstream: length 2049 outside 8..2048"),
    ("repository", "Library/App", "Register.repository: not an OCI repository name"),
    ("repository", "library//app", "Register.repository: not an OCI repository name"),
    ("repository", "/app", "Register.repository: not an OCI repository name"),
    ("repository", "app/", "Register.repository: not an OCI repository name"),
    ("repository", "app___x", "Register.repository: not an OCI repository name"),
    ("repository", "../etc", "Register.repository: not an OCI repository name"),
    ("repository", "a" * 256, "Register.repository: length 256 outside 1..255"),
    ("authorization", "", "Register.authorization: length 0 outside 1..8192"),
    ("authorization", "Bearer x\r\nX-Evil: 1", "Register.authorization: not a printable ASCII"),
    ("authorization", "Bearer \x7f", "Register.authorization: not a printable ASCII"),
    ("authorization", "Bearer é", "Register.authorization: not a printable ASCII"),
    ("authorization", "B" * 8193, "malformed MessagePack"),  # over msgpack's string limit
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_STRINGS)
def test_bad_strings(key: str, value: str, fragment: str) -> None:
    rejects_field(register(), key, value, fragment)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("address", "registry.example.com:5000"),
        ("address", "[::ffff:10.0.0.1]:1"),
        ("address", "compose_service_1:7001"),
        ("address", "1host:1"),
        ("upstream", "http://10.1.2.3:5000/mirror/"),
        ("upstream", "https://[2001:db8::2]"),
        ("upstream", "https://ghcr.io/v2/a%2Fb"),
        ("repository", "a.b_c__d---e/f0"),
    ],
)
def test_good_strings(key: str, value: str) -> None:
    msg = register(**{key: value})
    assert decode(encode(msg)) == msg


def test_report_reason_and_error_message_must_be_printable() -> None:
    rejects_field(report(), "reason", "bad\nline", "Report.reason: not printable text")
    rejects_field(report(), "reason", "rtl\u202eoverride", "Report.reason: not printable text")
    rejects_field(Error("x", ""), "message", "\x1b[2J", "Error.message: not printable text")


# -- the assignment's relations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"hashes": bytes(17)}, "Assignment.hashes: 17 bytes is not a multiple of 16"),
        ({"manifest_start": 11}, "Assignment.manifest_start: 11 past the 10 pieces"),
        ({"manifest_start": 8}, "Assignment.hashes: hashes for pieces 8..10 but the blob has 10"),
        (
            {"size": 2**40, "piece_size": 1024},
            "Assignment.piece_size: 1073741824 pieces of 1024 bytes exceed the limit of 65536",
        ),
        ({"sealed": True}, "Assignment.sealed: True contradicts state 'fetching'"),
        ({"state": "ready"}, "Assignment.sealed: False contradicts state 'ready'"),
    ],
)
def test_assignment_relations(changes: dict[str, Any], fragment: str) -> None:
    body = wire(assignment())
    body.update(changes)
    rejects(pack(body), fragment)


def test_assignment_parents() -> None:
    body = wire(assignment())
    p = dict(body["parents"][0])
    p["pieces"] = (10, b"\x00\x04")  # bit 10 of a 10-piece bitfield
    body["parents"] = (p,)
    rejects(pack(body), "Assignment.parents[0]: ParentInfo.pieces: bits set beyond length 10")
    p["pieces"] = (10, b"\x00")
    rejects(
        pack(body), "Assignment.parents[0]: ParentInfo.pieces: bitfield of 10 pieces needs 2 bytes"
    )
    p["pieces"] = (11, b"\x00\x00")
    rejects(pack(body), "Assignment.parents[0].pieces: bitfield of 11 pieces for a blob of 10")
    p["pieces"] = (10, b"\x00\x00")
    p["address"] = "nope"
    rejects(pack(body), "Assignment.parents[0]: ParentInfo.address: not host:port")
    del p["address"]
    rejects(pack(body), "Assignment.parents[0]: ParentInfo: missing field(s) address")
    body["parents"] = (wire(assignment())["parents"][0],) * 2
    rejects(pack(body), "Assignment.parents: duplicate parent peer ids")
    body["parents"] = tuple(
        {**body["parents"][0], "peer_id": f"p{i}"} for i in range(MAX_PARENTS + 1)
    )
    rejects(pack(body), "Assignment.parents: 65 parents exceed the limit of 64")


def test_register_have_trailing_bits() -> None:
    rejects_field(register(), "have", (3, b"\x08"), "Register.have: bits set beyond length 3")
    rejects_field(register(), "have", (3, b"\x01\x00"), "needs 1 bytes, got 2")


# -- the encode side ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: register(peer_id="bad id"), "Register.peer_id: not a peer id"),
        (lambda: register(size=True), "Register.size: expected int, got bool"),
        (lambda: register(have=Bitfield(MAX_PIECES + 1)), "Register.have: bitfield of 65537"),
        (lambda: announce(pieces=[1, 2]), "Announce.pieces: expected tuple, got list"),
        (lambda: assignment(hashes=bytearray(16)), "Assignment.hashes: expected bytes"),
        (lambda: assignment(parents=[parent()]), "Assignment.parents: expected tuple"),
        (lambda: assignment(parents=(parent(count=9),)), "bitfield of 9 pieces for a blob of 10"),
        (lambda: Leave(str(DIGEST), "p"), "Leave.digest: expected Digest, got str"),  # type: ignore[arg-type]
        (lambda: Error("bad_request", "two\nlines"), "Error.message: not printable text"),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], Message], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(fragment)):
        build()


def test_trusted_parent_is_the_checked_one_without_the_checks() -> None:
    checked = parent()
    trusted = ParentInfo.trusted(checked.peer_id, checked.address, checked.zone, checked.pieces)
    assert trusted == checked
    assert decode(encode(assignment(parents=(trusted,)))) == assignment(parents=(checked,))
    # the carrying Assignment still checks what relates the parent to the blob
    short = ParentInfo.trusted("p", "10.0.0.2:7001", "", Bitfield(9))
    with pytest.raises(ProtocolError, match="bitfield of 9 pieces for a blob of 10"):
        assignment(parents=(short,))
    # and from the wire, nothing is trusted: a bad parent field is refused as before
    body = wire(assignment(parents=(trusted,)))
    body["parents"] = ({**body["parents"][0], "peer_id": "bad id"},)
    rejects(pack(body), "Assignment.parents[0]: ParentInfo.peer_id: not a peer id")


def test_trusted_assignment_is_the_checked_one_without_the_checks() -> None:
    checked = assignment()
    fields = {f.name: getattr(checked, f.name) for f in dataclasses.fields(Assignment)}
    trusted = Assignment.trusted(**fields)
    assert trusted == checked
    assert encode(trusted) == encode(checked)
    # the one check it keeps: a configurable count
    many = tuple(parent(f"p{i}") for i in range(MAX_PARENTS + 1))
    with pytest.raises(ProtocolError, match=f"{MAX_PARENTS + 1} parents exceed the limit"):
        Assignment.trusted(**{**fields, "parents": many})


def test_assignment_encoding_is_the_generic_one() -> None:
    """`encode` spells the Assignment map out for speed; it must be the table's map."""
    for msg in (assignment(), assignment(parents=(), hashes=b"", state="ready", sealed=True)):
        generic = {"v": PROTOCOL_VERSION, "type": "assignment", **_dump_fields(msg)}
        assert encode(msg) == pack(generic)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError, match="not a wire message: ParentInfo"):
        encode(parent())  # type: ignore[arg-type]


# -- fuzzing ------------------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,20}[A-Za-z0-9_])?"
_REPO = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"

digests = st.binary(min_size=32, max_size=32).map(Digest.from_bytes)
peer_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
zones = st.from_regex(r"[A-Za-z0-9._:-]{0,64}", fullmatch=True)
hostnames = st.from_regex(rf"(?:{_LABEL}\.){{0,3}}{_LABEL}", fullmatch=True).filter(
    lambda h: re.fullmatch(r"[0-9.]+", h) is None
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"), hostnames
)
addresses = st.builds("{}:{}".format, hosts, st.integers(1, 65535))
upstreams = st.builds(
    "{}://{}{}".format,
    st.sampled_from(["http", "https"]),
    hosts,
    st.sampled_from(["", ":5000", "/", "/v2/mirror", ":443/a%2Fb"]),
)
repositories = st.from_regex(rf"{_REPO}(?:/{_REPO}){{0,3}}", fullmatch=True).filter(
    lambda r: len(r) <= 255
)
texts = st.text(st.characters(categories=["L", "N", "P", "S"]) | st.just(" "), max_size=40)


def bitfields(count: int) -> st.SearchStrategy[Bitfield]:
    return st.integers(0, (1 << count) - 1).map(lambda bits: Bitfield(count, bits))


@st.composite
def assignments(draw: st.DrawFn) -> Assignment:
    piece_size = draw(st.sampled_from([1, 1000, 4 * MIB, MAX_PIECE_SIZE]))
    count = draw(st.integers(0, 40))
    size = 0 if count == 0 else draw(st.integers((count - 1) * piece_size + 1, count * piece_size))
    start = draw(st.integers(0, count))
    known = draw(st.integers(start, count))
    state = draw(st.sampled_from(["fetching", "ready", "failed"]))
    ids = draw(st.lists(peer_ids, unique=True, max_size=4))
    parents = tuple(
        ParentInfo(pid, draw(addresses), draw(zones), draw(bitfields(count))) for pid in ids
    )
    hashes = draw(st.binary(min_size=16 * (known - start), max_size=16 * (known - start)))
    return Assignment(
        draw(digests), state, size, piece_size, start, hashes, state == "ready", parents
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Register,
        digest=digests,
        size=st.integers(0, MAX_BLOB_SIZE),
        peer_id=peer_ids,
        address=addresses,
        zone=zones,
        upload_slots=st.integers(1, 1024),
        upstream=upstreams,
        repository=repositories,
        authorization=st.none() | st.from_regex(r"[ -~]{1,100}", fullmatch=True),
        have=st.none() | st.integers(0, 100).flatmap(bitfields),
    ),
    assignments(),
    st.builds(
        Announce,
        digest=digests,
        peer_id=peer_ids,
        pieces=st.lists(st.integers(0, MAX_PIECES - 1), unique=True, max_size=20).map(tuple),
        manifest_known=st.integers(0, MAX_PIECES),
        want_parents=st.booleans(),
    ),
    st.builds(
        Report,
        digest=digests,
        peer_id=peer_ids,
        parent_id=peer_ids,
        index=st.integers(0, MAX_PIECES - 1),
        reason=texts.filter(bool),
    ),
    st.builds(Leave, digest=digests, peer_id=peer_ids),
    st.just(Ack()),
    st.builds(Error, code=st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True), message=texts),
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(data: bytes) -> None:
    """The module's promise: a valid message that round-trips, or a ProtocolError."""
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


@FUZZ
@given(messages)
def test_valid_messages_round_trip(msg: Message) -> None:
    assert decode(encode(msg), type(msg)) == msg


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(messages)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if how == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del data[pos:]
        elif how == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            other = encode(draw(messages))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_encodings(data: bytes) -> None:
    decodes_or_refuses(data)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.binary(max_size=4) | st.integers(-9, 9), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@FUZZ
@given(structures)
def test_random_structures(value: object) -> None:
    decodes_or_refuses(pack(value))


junk = st.one_of(
    scalars,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=10,
    ),
)


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> dict[Any, Any]:
    """A real message's map with fields swapped for junk or for the same field of another
    message (a Register's size in an Assignment...), sometimes one dropped or one added."""
    body, other = wire(draw(messages)), wire(draw(messages))
    for key in list(body):
        keep = 30 if key in ("v", "type") else 8
        roll = draw(st.sampled_from(["keep"] * keep + ["junk", "other"]))
        if roll == "junk":
            body[key] = draw(junk)
        elif roll == "other" and key in other:
            body[key] = other[key]
    if draw(st.integers(0, 5)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(max_size=8))] = draw(scalars)
    return body


@FUZZ
@given(near_valid_bodies())
def test_near_valid_bodies(body: dict[Any, Any]) -> None:
    decodes_or_refuses(pack(body))


def test_the_digest_cache_is_bounded_and_changes_nothing() -> None:
    from p2pd import wire as wire_module

    for i in range(wire_module._DIGESTS_MAX + 100):
        digest = Digest(f"{i:064x}")
        assert decode(encode(Leave(digest, "p"))) == Leave(digest, "p")
        assert len(wire_module._DIGESTS) <= wire_module._DIGESTS_MAX
    again = decode(encode(Leave(Digest(f"{5:064x}"), "p")), expect=Leave)
    assert again.digest == Digest(f"{5:064x}")
    body = wire(Leave(DIGEST, "p"))
    rejects(pack({**body, "digest": "sha256:" + "AB" * 32}), "Leave.digest")
