"""Control messages between p2pd and the supernode: MessagePack bodies over HTTP/1.1 POSTs.

Pure code: `encode` turns a message object into bytes, `decode` turns bytes from the network into
a message object or raises `ProtocolError`. The HTTP layer maps that one error to a 4xx reply
with ``Error(code="bad_request", message=str(exc))``; nothing the network sends can raise
anything else out of `decode`.

Format
------
Every body is one MessagePack map holding ``"v": 2`` (`PROTOCOL_VERSION`), ``"type"`` (the
message's short name) and exactly the message's fields, keyed by their Python attribute names
(the classes below list them; `_SPECS` gives each one's rule)::

    register    p2pd -> supernode, first contact for one blob       -> Assignment | Error
    announce    p2pd -> supernode, batched progress                 -> Assignment | Error
    announce_batch  p2pd -> supernode: the announces of several of one host's downloads
                whose blobs that supernode tracks, in one message    -> BatchReply | Error
    report      p2pd -> supernode, a parent served a bad piece      -> Assignment | Error
    leave       p2pd -> supernode, the peer drops the blob          -> Ack | Error
    assignment  supernode -> p2pd: task state, layout, new manifest hashes, candidate parents,
                the fewest milliseconds between the peer's calls (``pace_ms``, 0 = its own)
    batch_reply supernode -> p2pd: one item per item of an AnnounceBatch, in its order, each
                an Assignment or an Error (one unknown task does not fail the others)
    ack         generic empty success
    error       failure: a code (``bad_request``, ``unknown_task``, ...) and a message

Wire forms: a digest is its ``sha256:<hex>`` string; ``hashes`` is one bin of xxh3-128 hashes,
16 bytes each, for pieces ``manifest_start, manifest_start + 1, ...`` (columnar: a per-piece map
costs ~800x more to pack); a bitfield is the pair ``[length, bytes]`` in the layout of
`p2pd.core.bitfield`. The length rides along so every field decodes on its own: a Register's
``have`` arrives before the supernode has told anyone the piece size, and the supernode checks
``have.length`` against the layout it knows. A parent is a map ``{peer_id, address, zone,
pieces}``. ``pieces`` of an Announce is an array of piece indexes. The ``items`` of a batch
are an array of 1..`MAX_BATCH` maps, each the item's own message map without ``"v"`` (the
batch carries it) but with its ``"type"``, checked exactly like a message of its own.

Rules
-----
* The raw size is checked before unpacking (`MAX_MESSAGE_SIZE`); msgpack then runs with length
  limits, no ext types, string keys only, and a duplicate key in any map is refused (two parsers
  that keep different copies of a key are a classic smuggling hole).
* Then, in order: the top level is a map; ``"v"`` is `PROTOCOL_VERSION` (checked before anything
  else so that a newer peer gets "unsupported protocol version", not a confusing field error);
  ``"type"`` names a known message, one of ``expect`` if given; every field is present and no
  other key is.
* Types are exact: an int field refuses ``True`` and floats, a bin field refuses a str and the
  other way round. Ranges, lengths and formats are those of the table `_SPECS` at the bottom,
  plus the relations between an Assignment's fields (`Assignment._check_relations`).
* A message object is valid by construction: ``__post_init__`` runs the same checks, raising
  `ProtocolError` (a `ValueError`), so `decode` is "convert the wire forms, then construct", and
  `encode` of anything that exists yields bytes `decode` accepts. Messages are frozen; the
  `Bitfield` objects they hold are not copied, so build a message right before sending it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NoReturn, TypeAlias, TypeVar, overload

import msgpack

from p2pd.core import session
from p2pd.core.bitfield import Bitfield, BitfieldError
from p2pd.core.digest import Digest, DigestError
from p2pd.core.layout import MAX_BLOB_SIZE, MAX_PIECE_SIZE, MAX_PIECES, LayoutError, PieceLayout
from p2pd.core.manifest import HASH_SIZE

# 2: Assignment.pace_ms. Both sides insist on their own version, so a fleet mid-upgrade gets
# "unsupported protocol version" (and p2pd goes to the registry), not a confusing field error.
PROTOCOL_VERSION: Final = 2
MAX_MESSAGE_SIZE: Final = 2 * 1024 * 1024
# With at most 64 parents even a 65536-piece Assignment (1 MiB of hashes, 64 x 8 KiB bitfields)
# fits the message limit, so the supernode never has to split a reply.
MAX_PARENTS: Final = 64
MAX_UPLOAD_SLOTS: Final = 1024
TASK_STATES: Final = ("fetching", "ready", "failed")

MAX_AUTHORIZATION: Final = 8192
MAX_UPSTREAM: Final = 2048
MAX_REPOSITORY: Final = 255
MAX_REASON: Final = 200
MAX_ERROR_MESSAGE: Final = 1000
# Announces in one AnnounceBatch: a host's downloads at one supernode (images have 5-15 layers,
# a host pulls a few at once). The supernode keeps the reply under MAX_MESSAGE_SIZE itself
# (supernode.tracker.Tracker.announce_batch).
MAX_BATCH: Final = 32
MAX_PACE_MS: Final = 3_600_000  # an hour: anything larger is nonsense; peers cap it far lower
# Report reasons the supernode acts on (p2pd.core.session): a bad piece blames the parent;
# "unreachable" only says the reporter could not connect. Other text counts as a bad piece.
REPORT_BAD_PIECE: Final = session.REPORT_BAD_PIECE
REPORT_UNREACHABLE: Final = session.REPORT_UNREACHABLE

# Limits handed to msgpack so a hostile body cannot make it allocate much before our checks
# run. The longest string field is the authorization (ASCII: chars == bytes); the longest
# array is an Announce's piece list; the widest map is Register's 10 fields + "v" + "type".
_UNPACK_OPTIONS: Final[dict[str, Any]] = {
    "raw": False,
    "use_list": False,
    "strict_map_key": True,
    "max_str_len": MAX_AUTHORIZATION,
    "max_bin_len": MAX_MESSAGE_SIZE,
    "max_array_len": MAX_PIECES,
    "max_map_len": 16,
    "max_ext_len": 0,
}


T = TypeVar("T")


class ProtocolError(ValueError):
    """A control message that is malformed, of the wrong kind, or that this daemon cannot speak.

    The one error of this module: `decode` raises it for any bad input, and constructing an
    invalid message raises it too. The text names the field and the rule it broke.
    """


def _fail(where: str, problem: str) -> NoReturn:
    raise ProtocolError(f"{where}: {problem}")


def _show(value: object) -> str:
    """A short, printable rendering of a bad value for an error message."""
    if isinstance(value, str | bytes):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if value is None or isinstance(value, int | float):
        return repr(value)
    return type(value).__name__


def _typed(where: str, value: object, want: type[T]) -> T:
    """`value` if its type is exactly `want` (so ``True`` is no int and a subclass is no str)."""
    if type(value) is not want:
        _fail(where, f"expected {want.__name__}, got {type(value).__name__} {_show(value)}")
    return value


# -- field kinds --------------------------------------------------------------------------------
# A kind checks a field's in-memory value and converts it to and from its wire form. Most kinds
# travel as they are; `load` only has to undo what `dump` did, because the constructor checks.


class _Kind:
    __slots__ = ()

    def check(self, where: str, value: object) -> None:
        raise NotImplementedError

    def dump(self, value: Any) -> object:
        return value

    def load(self, where: str, raw: object) -> object:
        return raw


@dataclass(frozen=True, slots=True)
class _Int(_Kind):
    lo: int
    hi: int

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, int)
        if not self.lo <= value <= self.hi:
            _fail(where, f"{value} out of range {self.lo}..{self.hi}")


@dataclass(frozen=True, slots=True)
class _Exact(_Kind):
    want: type

    def check(self, where: str, value: object) -> None:
        _typed(where, value, self.want)


@dataclass(frozen=True, slots=True)
class _Bytes(_Kind):
    max_len: int
    multiple: int = 1

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, bytes)
        if len(value) > self.max_len:
            _fail(where, f"{len(value)} bytes exceed the limit of {self.max_len}")
        if len(value) % self.multiple:
            _fail(where, f"{len(value)} bytes is not a multiple of {self.multiple}")


@dataclass(frozen=True, slots=True)
class _Str(_Kind):
    """A string of `min_len`..`max_len` characters for which `valid` is true; `form` names the
    accepted form in the error. The length is checked first so no regex runs on a long string.
    """

    form: str
    min_len: int
    max_len: int
    valid: Callable[[str], object]

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, str)
        if not self.min_len <= len(value) <= self.max_len:
            _fail(where, f"length {len(value)} outside {self.min_len}..{self.max_len}")
        if not self.valid(value):
            _fail(where, f"not {self.form}: {_show(value)}")


@dataclass(frozen=True, slots=True)
class _Optional(_Kind):
    inner: _Kind

    def check(self, where: str, value: object) -> None:
        if value is not None:
            self.inner.check(where, value)

    def dump(self, value: Any) -> object:
        return None if value is None else self.inner.dump(value)

    def load(self, where: str, raw: object) -> object:
        return None if raw is None else self.inner.load(where, raw)


# Digests parsed lately: a supernode sees the same few digests in every control call.
# Digests are immutable; the cache is bounded (cleared when full) so no input can grow it.
_DIGESTS: dict[str, Digest] = {}
_DIGESTS_MAX = 1024


class _DigestKind(_Kind):
    __slots__ = ()

    def check(self, where: str, value: object) -> None:
        _typed(where, value, Digest)

    def dump(self, value: Any) -> object:
        return str(value)

    def load(self, where: str, raw: object) -> object:
        text = _typed(where, raw, str)
        digest = _DIGESTS.get(text)
        if digest is not None:
            return digest
        try:
            digest = Digest.parse(text)
        except DigestError as exc:
            _fail(where, str(exc))
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.clear()
        _DIGESTS[text] = digest
        return digest


class _BitfieldKind(_Kind):
    """A `Bitfield` of at most MAX_PIECES pieces; on the wire ``[length, bytes]``."""

    __slots__ = ()

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, Bitfield)
        if value.length > MAX_PIECES:
            _fail(where, f"bitfield of {value.length} pieces exceeds the limit of {MAX_PIECES}")

    def dump(self, value: Any) -> object:
        return (value.length, value.to_bytes())

    def load(self, where: str, raw: object) -> object:
        if type(raw) is not tuple or len(raw) != 2:
            _fail(where, f"expected a [length, bytes] pair, got {_show(raw)}")
        length, data = raw
        _PIECE_COUNT.check(f"{where}.length", length)
        try:
            return Bitfield.from_bytes(length, _typed(f"{where}.bytes", data, bytes))
        except BitfieldError as exc:
            _fail(where, str(exc))


class _PieceList(_Kind):
    """Distinct piece indexes below MAX_PIECES (the supernode checks them against the layout).
    A duplicate means a buggy peer, so it is refused rather than silently merged."""

    __slots__ = ()

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, tuple)
        if len(value) > MAX_PIECES:
            _fail(where, f"{len(value)} pieces exceed the limit of {MAX_PIECES}")
        if not all(type(i) is int and 0 <= i < MAX_PIECES for i in value):
            for i, index in enumerate(value):  # find the culprit for the message
                _PIECE_INDEX.check(f"{where}[{i}]", index)
        if len(set(value)) != len(value):
            _fail(where, "duplicate piece indexes")


class _ParentList(_Kind):
    """Up to MAX_PARENTS `ParentInfo` with distinct peer ids; on the wire an array of maps."""

    __slots__ = ()

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, tuple)
        if len(value) > MAX_PARENTS:
            _fail(where, f"{len(value)} parents exceed the limit of {MAX_PARENTS}")
        for i, parent in enumerate(value):
            _typed(f"{where}[{i}]", parent, ParentInfo)
        if len({p.peer_id for p in value}) != len(value):
            _fail(where, "duplicate parent peer ids")

    def dump(self, value: Any) -> object:
        # Spelled out rather than `_dump_fields` per parent: a reply carries up to MAX_PARENTS
        # of them and this is the supernode's hottest encoding (the same map, see _SPECS).
        return tuple(
            [
                {
                    "peer_id": p.peer_id,
                    "address": p.address,
                    "zone": p.zone,
                    "pieces": (p.pieces.length, p.pieces.to_bytes()),
                }
                for p in value
            ]
        )

    def load(self, where: str, raw: object) -> object:
        parents = []
        for i, item in enumerate(_typed(where, raw, tuple)):
            try:
                parents.append(_load_fields(ParentInfo, item))
            except ProtocolError as exc:  # say which parent
                _fail(f"{where}[{i}]", str(exc))
        return tuple(parents)


@dataclass(frozen=True, slots=True)
class _Items(_Kind):
    """1..MAX_BATCH messages of the `classes` (by type name) inside a batch; on the wire an
    array of the items' own maps, ``"type"`` included and ``"v"`` left to the batch."""

    classes: tuple[str, ...]

    def check(self, where: str, value: object) -> None:
        value = _typed(where, value, tuple)
        if not 1 <= len(value) <= MAX_BATCH:
            _fail(where, f"{len(value)} items, want 1..{MAX_BATCH}")
        for i, item in enumerate(value):
            if not isinstance(item, _Body) or item.TYPE not in self.classes:
                _fail(f"{where}[{i}]", f"expected {' or '.join(self.classes)}, got {_show(item)}")

    def dump(self, value: Any) -> object:
        return tuple(_message_map(item, top=False) for item in value)

    def load(self, where: str, raw: object) -> object:
        items = _typed(where, raw, tuple)
        if not 1 <= len(items) <= MAX_BATCH:  # before looking into any of them
            _fail(where, f"{len(items)} items, want 1..{MAX_BATCH}")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(_load_item(item, self.classes))
            except ProtocolError as exc:  # say which item
                _fail(f"{where}[{i}]", str(exc))
        return tuple(out)


# -- string forms -------------------------------------------------------------------------------


def _re(pattern: str) -> Callable[[str], object]:
    return re.compile(pattern).fullmatch


_NAME_CHARS = r"[A-Za-z0-9._:-]"
# Hosts: IPv4, bracketed IPv6 (checked again by `ipaddress`), or a hostname (underscores
# tolerated: some container runtimes name hosts that way) that is not all digits and dots, so
# "999.1.1.1" is refused rather than taken for a name. One regex per form: a parent list is
# decoded on every reply, and `ipaddress` is ~20x slower than a regex for IPv4.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = (
    rf"(?P<host>{_OCTET}(?:\.{_OCTET}){{3}}|\[(?P<v6>[0-9A-Fa-f:.]+)\]"
    rf"|(?![0-9.]+(?![A-Za-z0-9_.-]))(?:{_LABEL}\.)*{_LABEL})"
)
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_PATH = r"(?:/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*)?"
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"


def _endpoint(pattern: str) -> Callable[[str], bool]:
    match = re.compile(pattern).fullmatch

    def valid(text: str) -> bool:
        m = match(text)
        if m is None or len(m["host"]) > 253:
            return False
        if m["v6"] is not None:
            try:
                ipaddress.IPv6Address(m["v6"])
            except ValueError:
                return False
        return True

    return valid


def _text(max_len: int, min_len: int = 0) -> _Str:
    # Free text ends up in logs: no control, format or separator characters except space.
    return _Str("printable text", min_len, max_len, str.isprintable)


_PEER_ID = _Str(f"a peer id (1..64 of {_NAME_CHARS})", 1, 64, _re(f"{_NAME_CHARS}+"))
_ZONE = _Str(f"a zone (0..64 of {_NAME_CHARS})", 0, 64, _re(f"{_NAME_CHARS}*"))
_ADDRESS = _Str("host:port (IPv4, [IPv6] or hostname)", 3, 259, _endpoint(f"{_HOST}:{_PORT}"))
_UPSTREAM = _Str(
    "an http(s):// base URL without user info, query or fragment",
    8,
    MAX_UPSTREAM,
    _endpoint(f"https?://{_HOST}(?::{_PORT})?{_PATH}"),
)
_REPOSITORY = _Str(
    "an OCI repository name", 1, MAX_REPOSITORY, _re(f"{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*")
)
# The client's header value is forwarded upstream and may be logged: printable ASCII only, so
# no CR/LF header injection and no terminal escapes.
_AUTHORIZATION = _Str("a printable ASCII header value", 1, MAX_AUTHORIZATION, _re(r"[ -~]+"))
_STATE = _Str(f"one of {', '.join(TASK_STATES)}", 1, 16, _re("|".join(TASK_STATES)))
_ERROR_CODE = _Str("an error code ([a-z][a-z0-9_]*)", 1, 64, _re("[a-z][a-z0-9_]*"))
_DIGEST = _DigestKind()
_BOOL = _Exact(bool)
_BITFIELD = _BitfieldKind()
_PIECE_INDEX = _Int(0, MAX_PIECES - 1)
_PIECE_COUNT = _Int(0, MAX_PIECES)
_PARENT_LIST = _ParentList()


# -- messages -----------------------------------------------------------------------------------


class _Body:
    """Base of the message dataclasses (and of ParentInfo): validation on construction."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field, where, kind in _FIELDS[type(self)]:
            kind.check(where, getattr(self, field))
        self._check_relations()

    def _check_relations(self) -> None:
        """Rules between fields; runs after every field passed on its own."""


@dataclass(frozen=True, slots=True)
class Register(_Body):
    """First contact for one blob; `upstream`, `repository` and `authorization` let the
    supernode fetch the blob itself. `have` lists pieces already on disk when resuming."""

    TYPE: ClassVar[str] = "register"
    digest: Digest
    size: int
    peer_id: str
    address: str
    zone: str
    upload_slots: int
    upstream: str
    repository: str
    authorization: str | None
    have: Bitfield | None


@dataclass(frozen=True, slots=True)
class ParentInfo(_Body):
    """A candidate parent: where it serves pieces and which pieces it holds."""

    peer_id: str
    address: str
    zone: str
    pieces: Bitfield

    @classmethod
    def trusted(cls, peer_id: str, address: str, zone: str, pieces: Bitfield) -> ParentInfo:
        """A ParentInfo built without running the checks, for values that passed them already.

        Only for the supernode's own state: every peer id, address and zone it holds arrived
        in a Register that `decode` checked (or is its own configuration, checked at start),
        and the Assignment that carries the parent still checks the bitfield lengths.
        Checking them again cost a dozen regex matches per parent per reply (about a tenth
        of the supernode's time under a profiler). Anything from the network goes through
        `decode`, which always checks.
        """
        obj = object.__new__(cls)
        set_peer_id, set_address, set_zone, set_pieces = _PARENT_SETTERS
        set_peer_id(obj, peer_id)
        set_address(obj, address)
        set_zone(obj, zone)
        set_pieces(obj, pieces)
        return obj


@dataclass(frozen=True, slots=True)
class Assignment(_Body):
    """The supernode's answer to Register, Announce and Report.

    ``hashes`` holds the manifest hashes of pieces ``manifest_start ..``; ``sealed`` (the whole
    manifest is known and the seeder verified the blob's sha256) is true exactly when ``state``
    is ``"ready"``."""

    TYPE: ClassVar[str] = "assignment"
    digest: Digest
    state: str
    size: int
    piece_size: int
    manifest_start: int
    hashes: bytes
    sealed: bool
    parents: tuple[ParentInfo, ...]
    # The fewest milliseconds the peer should leave between its calls about this blob: the
    # supernode paces its peers when it is busy (p2pd.core.scheduler.Scheduler.pace); 0 = the
    # peer's own timing. The peer caps it (p2pd.core.session.MAX_PACE).
    pace_ms: int = 0

    @classmethod
    def trusted(
        cls,
        digest: Digest,
        state: str,
        size: int,
        piece_size: int,
        manifest_start: int,
        hashes: bytes,
        sealed: bool,
        parents: tuple[ParentInfo, ...],
        pace_ms: int,
    ) -> Assignment:
        """An Assignment built without the field and relation checks, for the supernode's
        replies, whose every value comes from its own state: the task's layout and manifest,
        the scheduler's state (its bitfields are the layout's length), parents made with
        `ParentInfo.trusted`. The checks were a tenth of an announce's CPU at the supernode.
        Only the parent count is checked (the scheduler's ``max_parents`` is configurable).
        The receiving p2pd decodes every reply with all the checks (`decode`); tests decode
        every reply the supernode sends the same way.
        """
        if len(parents) > MAX_PARENTS:
            _fail("Assignment.parents", f"{len(parents)} parents exceed the limit of {MAX_PARENTS}")
        obj = object.__new__(cls)
        (
            set_digest,
            set_state,
            set_size,
            set_piece_size,
            set_manifest_start,
            set_hashes,
            set_sealed,
            set_parents,
            set_pace_ms,
        ) = _ASSIGNMENT_SETTERS
        set_digest(obj, digest)
        set_state(obj, state)
        set_size(obj, size)
        set_piece_size(obj, piece_size)
        set_manifest_start(obj, manifest_start)
        set_hashes(obj, hashes)
        set_sealed(obj, sealed)
        set_parents(obj, parents)
        set_pace_ms(obj, pace_ms)
        return obj

    @property
    def layout(self) -> PieceLayout:
        return PieceLayout(self.size, self.piece_size)

    @property
    def manifest_end(self) -> int:
        """One past the last piece whose hash this message carries."""
        return self.manifest_start + len(self.hashes) // HASH_SIZE

    def _check_relations(self) -> None:
        try:
            count = self.layout.count
        except LayoutError as exc:
            _fail("Assignment.piece_size", str(exc))
        if self.manifest_start > count:
            _fail("Assignment.manifest_start", f"{self.manifest_start} past the {count} pieces")
        if self.manifest_end > count:
            _fail(
                "Assignment.hashes",
                f"hashes for pieces {self.manifest_start}..{self.manifest_end - 1} "
                f"but the blob has {count}",
            )
        for i, parent in enumerate(self.parents):
            if parent.pieces.length != count:
                _fail(
                    f"Assignment.parents[{i}].pieces",
                    f"bitfield of {parent.pieces.length} pieces for a blob of {count}",
                )
        if self.sealed != (self.state == "ready"):
            _fail("Assignment.sealed", f"{self.sealed} contradicts state {self.state!r}")


# The slots' own setters, for the `trusted` constructors: a frozen dataclass refuses setattr,
# and ``object.__setattr__`` looks the slot up by its name every time (twice as slow, on the
# objects the supernode makes most: a ParentInfo per parent per reply).
_PARENT_SETTERS: Final = tuple(
    ParentInfo.__dict__[name].__set__ for name in ("peer_id", "address", "zone", "pieces")
)
_ASSIGNMENT_SETTERS: Final = tuple(
    Assignment.__dict__[name].__set__
    for name in (
        "digest",
        "state",
        "size",
        "piece_size",
        "manifest_start",
        "hashes",
        "sealed",
        "parents",
        "pace_ms",
    )
)


@dataclass(frozen=True, slots=True)
class Announce(_Body):
    """Pieces completed since the last announce; `manifest_known` is how many hashes the peer
    already has, so the reply carries only newer ones."""

    TYPE: ClassVar[str] = "announce"
    digest: Digest
    peer_id: str
    pieces: tuple[int, ...]
    manifest_known: int
    want_parents: bool


@dataclass(frozen=True, slots=True)
class AnnounceBatch(_Body):
    """Several announces of one host (one peer id), for distinct blobs that the receiving
    supernode tracks: one message in place of one per download (``POST
    /v1/announce-batch``). Answered by a `BatchReply`."""

    TYPE: ClassVar[str] = "announce_batch"
    items: tuple[Announce, ...]

    def _check_relations(self) -> None:
        peer_id = self.items[0].peer_id
        for i, item in enumerate(self.items):
            if item.peer_id != peer_id:
                _fail(
                    f"AnnounceBatch.items[{i}].peer_id",
                    f"{item.peer_id!r} is not the first item's {peer_id!r}",
                )
        if len({item.digest for item in self.items}) != len(self.items):
            _fail("AnnounceBatch.items", "two announces for one digest")


@dataclass(frozen=True, slots=True)
class BatchReply(_Body):
    """The answer to an `AnnounceBatch`: item i answers the batch's item i, an `Assignment`
    or an `Error` (``unknown_task``, ``unknown_peer``, ``bad_request``, or ``deferred``: the
    announce was taken but its reply did not fit this message; send it again alone)."""

    TYPE: ClassVar[str] = "batch_reply"
    items: tuple[Assignment | Error, ...]


@dataclass(frozen=True, slots=True)
class Report(_Body):
    """Parent `parent_id` served a bad piece `index`."""

    TYPE: ClassVar[str] = "report"
    digest: Digest
    peer_id: str
    parent_id: str
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Leave(_Body):
    TYPE: ClassVar[str] = "leave"
    digest: Digest
    peer_id: str


@dataclass(frozen=True, slots=True)
class Ack(_Body):
    TYPE: ClassVar[str] = "ack"


@dataclass(frozen=True, slots=True)
class Error(_Body):
    """A failure reply: a machine-readable `code` (``bad_request``, ``unknown_task``, ...) and
    a human-readable `message`."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str

    @classmethod
    def safe(cls, code: str, message: str) -> Error:
        """An Error whose message is made valid (unprintables replaced, truncated): for
        wrapping exception texts that the code building the reply does not control."""
        cleaned = "".join(c if c.isprintable() else "?" for c in message[:MAX_ERROR_MESSAGE])
        return cls(code, cleaned)


Message: TypeAlias = (
    Register | Assignment | Announce | AnnounceBatch | BatchReply | Report | Leave | Ack | Error
)
M = TypeVar("M", bound=Message)

# The wire format as a table: every field of every message, in order, with its rule.
_SPECS: Final[dict[type[Any], dict[str, _Kind]]] = {
    Register: {
        "digest": _DIGEST,
        "size": _Int(0, MAX_BLOB_SIZE),
        "peer_id": _PEER_ID,
        "address": _ADDRESS,
        "zone": _ZONE,
        "upload_slots": _Int(1, MAX_UPLOAD_SLOTS),
        "upstream": _UPSTREAM,
        "repository": _REPOSITORY,
        "authorization": _Optional(_AUTHORIZATION),
        "have": _Optional(_BITFIELD),
    },
    ParentInfo: {"peer_id": _PEER_ID, "address": _ADDRESS, "zone": _ZONE, "pieces": _BITFIELD},
    Assignment: {
        "digest": _DIGEST,
        "state": _STATE,
        "size": _Int(0, MAX_BLOB_SIZE),
        "piece_size": _Int(1, MAX_PIECE_SIZE),
        "manifest_start": _PIECE_COUNT,
        "hashes": _Bytes(MAX_PIECES * HASH_SIZE, HASH_SIZE),
        "sealed": _BOOL,
        "parents": _PARENT_LIST,
        "pace_ms": _Int(0, MAX_PACE_MS),
    },
    Announce: {
        "digest": _DIGEST,
        "peer_id": _PEER_ID,
        "pieces": _PieceList(),
        "manifest_known": _PIECE_COUNT,
        "want_parents": _BOOL,
    },
    AnnounceBatch: {"items": _Items(("announce",))},
    BatchReply: {"items": _Items(("assignment", "error"))},
    Report: {
        "digest": _DIGEST,
        "peer_id": _PEER_ID,
        "parent_id": _PEER_ID,
        "index": _PIECE_INDEX,
        "reason": _text(MAX_REASON, min_len=1),
    },
    Leave: {"digest": _DIGEST, "peer_id": _PEER_ID},
    Ack: {},
    Error: {"code": _ERROR_CODE, "message": _text(MAX_ERROR_MESSAGE)},
}
_BY_TYPE: Final[dict[str, type[Any]]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Assignment,
        Announce,
        AnnounceBatch,
        BatchReply,
        Report,
        Leave,
        Ack,
        Error,
    )
}
# Derived once: (field, "Class.field", kind) triples so that checking formats no strings until
# something fails, and the exact key set of each wire map.
_FIELDS: Final = {
    cls: tuple((name, f"{cls.__name__}.{name}", kind) for name, kind in spec.items())
    for cls, spec in _SPECS.items()
}
_KEYS: Final = {
    cls: set(spec) | ({"v", "type"} if cls in _BY_TYPE.values() else set())
    for cls, spec in _SPECS.items()
}
_ITEM_KEYS: Final = {cls: _KEYS[cls] - {"v"} for cls in _BY_TYPE.values()}
_ENVELOPE: Final = ("v", "type")
# The fields whose wire form is not their value (their kind has its own `load`): decoding
# converts these only, not every field through a call that returns it as it came.
_CONVERTED: Final = {
    cls: tuple(field for field in fields if type(field[2]).load is not _Kind.load)
    for cls, fields in _FIELDS.items()
}
# The message types whose fields hold no map (see _decode_flat), by type name.
_FLAT: Final = {
    name: cls
    for name, cls in _BY_TYPE.items()
    if not any(isinstance(kind, _ParentList | _Items) for kind in _SPECS[cls].values())
}
_FIXMAP: Final = 0x80  # MessagePack's first byte of a map of 0..15 entries, plus their count
# How `encode` begins the other types' maps (after the map's header): such a message (a batch,
# at the supernode) goes the careful way at once, not after a wasted unpack.
_NOT_FLAT_HEADS: Final = tuple(
    msgpack.packb({"v": PROTOCOL_VERSION, "type": name})[1:]
    for name in _BY_TYPE
    if name not in _FLAT
)


# -- encode / decode ----------------------------------------------------------------------------


def _dump_fields(obj: _Body) -> dict[str, object]:
    return {name: kind.dump(getattr(obj, name)) for name, _, kind in _FIELDS[type(obj)]}


def _load_fields(cls: type[Any], raw: object, keys: set[str] | None = None) -> Any:
    """Build a `cls` from its wire map: exact key set (`keys`, by default the message's),
    wire forms converted, then construct."""
    if keys is None:
        keys = _KEYS[cls]
    if type(raw) is not dict:
        _fail(cls.__name__, f"expected a map, got {_show(raw)}")
    if raw.keys() != keys:
        missing = [name for name in _SPECS[cls] if name not in raw]
        if missing:
            _fail(cls.__name__, f"missing field(s) {', '.join(missing)}")
        unknown = [_show(key) for key in raw if key not in keys]
        _fail(cls.__name__, f"unknown field(s) {', '.join(unknown)}")
    fields = dict(raw)  # the key set is exact: all of cls's fields, and the envelope's
    for envelope in _ENVELOPE:
        fields.pop(envelope, None)
    for name, where, kind in _CONVERTED[cls]:
        fields[name] = kind.load(where, fields[name])
    return cls(**fields)


def _load_item(raw: object, classes: tuple[str, ...]) -> Any:
    """One item of a batch: its own map with its ``"type"`` (one of `classes`), no ``"v"``."""
    if type(raw) is not dict:
        _fail("item", f"expected a map, got {_show(raw)}")
    name = raw.get("type")
    if type(name) is not str or name not in classes:
        _fail("item", f"type {_show(name)} is not one of {', '.join(classes)}")
    cls = _BY_TYPE[name]
    return _load_fields(cls, raw, _ITEM_KEYS[cls])


def _too_big(size: int) -> NoReturn:
    raise ProtocolError(f"message of {size} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit")


def _decode_flat(data: bytes, expect: object) -> Message | None:
    """The message in `data`, a MessagePack fixmap, if it is a valid one of a type without a
    map inside it (every request but a batch) and of the `expect`ed type; None for anything
    else, which `decode` then unpacks the careful way (and refuses with that way's error).

    Why: the duplicate-key hook (`_unique_keys`) is a Python call per map, a tenth of the
    supernode's cost to decode an announce. Such a message is one map; the fixmap's header
    says how many entries it held, so a dict with fewer had a duplicate. A map anywhere else
    fails its field's check, so it goes the careful way too."""
    try:
        body = msgpack.unpackb(data, **_UNPACK_OPTIONS)
    except Exception:
        return None
    if type(body) is not dict or len(body) != data[0] - _FIXMAP:
        return None
    name, version = body.get("type"), body.get("v")
    cls = _FLAT.get(name) if type(name) is str else None
    if cls is None or type(version) is not int or version != PROTOCOL_VERSION:
        return None
    if (
        expect is not None
        and cls is not expect
        and not (isinstance(expect, tuple) and cls in expect)
    ):
        return None
    try:
        message: Message = _load_fields(cls, body)
    except ProtocolError:
        return None
    return message


def _unique_keys(pairs: list[tuple[object, object]]) -> dict[object, object]:
    """msgpack's map hook: refuse duplicate keys, which msgpack itself lets the last one win."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a map")
    return result


def _message_map(msg: Message, *, top: bool = True) -> dict[str, object]:
    """The wire map of `msg`; without ``"v"`` unless `top` (an item of a batch)."""
    body: dict[str, object]
    if type(msg) is Assignment:
        # Spelled out: the supernode's reply to every control call (the same map as
        # `_dump_fields` makes, which a test checks).
        body = {
            "v": PROTOCOL_VERSION,
            "type": "assignment",
            "digest": str(msg.digest),
            "state": msg.state,
            "size": msg.size,
            "piece_size": msg.piece_size,
            "manifest_start": msg.manifest_start,
            "hashes": msg.hashes,
            "sealed": msg.sealed,
            "parents": _PARENT_LIST.dump(msg.parents),
            "pace_ms": msg.pace_ms,
        }
    elif type(msg) in _BY_TYPE.values():
        body = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
        body.update(_dump_fields(msg))
    else:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    if not top:
        del body["v"]
    return body


def encode(msg: Message) -> bytes:
    """The wire bytes of `msg` (already valid: it was checked when it was built)."""
    data: bytes = msgpack.packb(_message_map(msg), use_bin_type=True)
    if len(data) > MAX_MESSAGE_SIZE:  # unreachable with today's limits; kept as the invariant
        _too_big(len(data))
    return data


@overload
def decode(data: bytes | bytearray | memoryview, expect: None = None) -> Message: ...
@overload
def decode(data: bytes | bytearray | memoryview, expect: type[M]) -> M: ...
@overload
def decode(data: bytes | bytearray | memoryview, expect: tuple[type[Message], ...]) -> Message: ...
def decode(
    data: bytes | bytearray | memoryview,
    expect: type[Any] | tuple[type[Any], ...] | None = None,
) -> Message:
    """Parse and validate one message; `expect` restricts which message types are acceptable.

    Raises `ProtocolError` for anything wrong, and nothing else.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        _too_big(len(data))
    if (
        type(data) is bytes
        and data
        and _FIXMAP <= data[0] < _FIXMAP + 16
        and not data.startswith(_NOT_FLAT_HEADS, 1)
    ):
        flat = _decode_flat(data, expect)
        if flat is not None:
            return flat
    try:
        body = msgpack.unpackb(data, object_pairs_hook=_unique_keys, **_UNPACK_OPTIONS)
    except Exception as exc:
        # msgpack raises ValueError, ExtraData, FormatError, StackError, UnicodeDecodeError,
        # TypeError, OverflowError, ... with no common base: this is the one place they become
        # a ProtocolError.
        raise ProtocolError(
            f"malformed MessagePack: {type(exc).__name__} {_show(str(exc))}"
        ) from exc
    if type(body) is not dict:
        raise ProtocolError(f"message must be a map, got {_show(body)}")
    if "v" not in body:
        raise ProtocolError("message has no protocol version ('v')")
    version = body["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {_show(version)} (this daemon speaks {PROTOCOL_VERSION})"
        )
    if "type" not in body:
        raise ProtocolError("message has no 'type'")
    name = body["type"]
    if type(name) is not str or name not in _BY_TYPE:
        raise ProtocolError(f"unknown message type {_show(name)}")
    cls = _BY_TYPE[name]
    if expect is not None:
        allowed = expect if isinstance(expect, tuple) else (expect,)
        if cls not in allowed:
            wanted = ", ".join(c.TYPE for c in allowed)
            raise ProtocolError(f"unexpected message type {name!r} (expected {wanted})")
    result: Message = _load_fields(cls, body)
    return result
