"""Where a mirror request goes upstream, and what its ``/v2/...`` path names.

Choosing the upstream (`Router.route`), first rule that applies:

1. ``?ns=<host>`` (containerd adds it to every mirror request): the base URL configured for
   that registry host in ``registries``. An ``ns`` that is not configured is refused, never
   guessed from the name: the daemon is not an open proxy.
2. A configured path prefix: ``/v2/<prefix>/<rest>`` goes to that prefix's base URL as
   ``/v2/<rest>`` (longest prefix wins, matched on whole name components). This is for
   containers/image clients (skopeo, podman, CRI-O): their ``registries.conf`` mirror location
   may carry a path, and containers/image substitutes the location for the ``prefix`` in the
   image reference, so mirror ``127.0.0.1:65001/example.test`` for prefix ``example.test``
   turns ``example.test/library/app:v1`` into requests for
   ``/v2/example.test/library/app/manifests/v1``. Its ping, though, is always plain ``/v2/``.
3. ``default_upstream``.
4. Otherwise refused (403 DENIED).

The ping ``GET /v2/`` without ``ns`` and without a default upstream is special: it carries no
name, so no prefix can match. If all prefixes lead to one upstream, the ping goes there (the
client must see that registry's auth challenge, or it will never send credentials); if they
lead to several, the mirror answers the ping itself (200, no challenge), which serves anonymous
pulls and makes clients that need credentials fall back to the registry.

Paths: only origin-form ``/v2`` paths made of the characters that names, tags, digests and
``_catalog`` use; no ``%``-escapes, no empty or dot segments. On the blob, manifest, tag-list
and referrers routes the name must follow the OCI grammar and the digest the OCI digest grammar;
a ``sha256`` digest must be exactly 64 lowercase hex characters (`Digest.parse`). Blob digests of
other algorithms are legal but not ours to serve: they pass through to the upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from p2pd.config import P2pdConfig
from p2pd.core.digest import Digest, DigestError

MAX_NAME = 255  # distribution's limit on a repository name (also p2pd.wire.MAX_REPOSITORY)

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):[A-Za-z0-9=_-]+")
_SAFE_PATH = re.compile(r"/v2(?:/[A-Za-z0-9._~:@+=,-]*)*")
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests|referrers)/(?P<ref>[^/]+)")
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list")


class RouteError(Exception):
    """The request cannot be routed; answered with `status` and an OCI error `code`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Route:
    """`path` (no query) to be sent to the base URL `upstream`; `via` says which rule chose it.

    ``via == "local"``: an unroutable ping, answered by the mirror itself (`upstream` is "").
    """

    upstream: str
    path: str
    via: Literal["ns", "prefix", "default", "ping", "local"]

    @property
    def url(self) -> str:
        return self.upstream + self.path


@dataclass(frozen=True, slots=True)
class BlobPath:
    name: str
    digest: Digest


@dataclass(frozen=True, slots=True)
class ManifestPath:
    name: str
    reference: str  # a tag or a digest


@dataclass(frozen=True, slots=True)
class OtherPath:
    """Any other well-formed ``/v2`` path: the ping, tag lists, referrers, non-sha256 blobs."""

    name: str | None


V2Path = BlobPath | ManifestPath | OtherPath


def check_target(target: str, path: str) -> None:
    """Refuse anything but an origin-form, plain ``/v2`` path (see the module doc)."""
    if not target.startswith("/") or "#" in target:
        raise RouteError(400, "UNSUPPORTED", "only origin-form request targets (/v2/...)")
    if path != "/v2" and not path.startswith("/v2/"):
        raise RouteError(404, "NOT_FOUND", "the mirror serves the registry API under /v2/ only")
    if _SAFE_PATH.fullmatch(path) is None:
        raise RouteError(400, "NAME_INVALID", "characters not allowed in a registry path")
    segments = path.split("/")[2:]
    if segments and segments[-1] == "":
        segments = segments[:-1]  # one trailing slash, as in "/v2/"
    if any(s in ("", ".", "..") for s in segments):
        raise RouteError(400, "NAME_INVALID", "empty or dot segments in the path")


def parse_v2_path(path: str) -> V2Path:
    """What a checked ``/v2`` path names; `RouteError` (400) for malformed names and digests."""
    match = _ROUTE.fullmatch(path)
    if match is None:
        tags = _TAGS.fullmatch(path)
        if tags is not None:
            return OtherPath(_check_name(tags["name"]))
        return OtherPath(None)
    name = _check_name(match["name"])
    kind, ref = match["kind"], match["ref"]
    if kind == "manifests":
        if TAG_RE.fullmatch(ref) is None and DIGEST_RE.fullmatch(ref) is None:
            raise RouteError(400, "MANIFEST_INVALID", f"not a tag or digest: {ref[:80]!r}")
        if ref.startswith("sha256:"):
            _sha256(ref)
        return ManifestPath(name, ref)
    digest_match = DIGEST_RE.fullmatch(ref)
    if digest_match is None:
        raise RouteError(400, "DIGEST_INVALID", f"not a digest: {ref[:80]!r}")
    if digest_match["algorithm"] != "sha256":
        return OtherPath(name)
    digest = _sha256(ref)
    return BlobPath(name, digest) if kind == "blobs" else OtherPath(name)


def _check_name(name: str) -> str:
    if len(name) > MAX_NAME or NAME_RE.fullmatch(name) is None:
        raise RouteError(400, "NAME_INVALID", f"not a valid repository name: {name[:80]!r}")
    return name


def _sha256(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except DigestError as exc:
        raise RouteError(400, "DIGEST_INVALID", str(exc)) from None


class Router:
    """The routing table of the module doc, built once from the config."""

    def __init__(
        self,
        *,
        registries: dict[str, str] | None = None,
        prefixes: dict[str, str] | None = None,
        default_upstream: str = "",
    ) -> None:
        self.registries = {k.lower(): v for k, v in (registries or {}).items()}
        # Longest first, so "a/b" wins over "a" for "/v2/a/b/app/...".
        self.prefixes = sorted(
            ((k.strip("/"), v) for k, v in (prefixes or {}).items()),
            key=lambda kv: (-len(kv[0]), kv[0]),
        )
        self.default_upstream = default_upstream
        targets = {v for _, v in self.prefixes}
        self._ping_upstream = default_upstream or (targets.pop() if len(targets) == 1 else "")

    @classmethod
    def from_config(cls, config: P2pdConfig) -> Router:
        return cls(
            registries=dict(config.registries),
            prefixes=dict(config.prefixes),
            default_upstream=config.default_upstream,
        )

    def route(self, path: str, ns: str | None) -> Route:
        """The upstream for a checked ``/v2`` `path`; `RouteError` 403 if none is allowed."""
        if ns is not None:
            upstream = self.registries.get(ns.lower())
            if upstream is None:
                raise RouteError(
                    403, "DENIED", f"registry {ns[:100]!r} is not configured on this mirror"
                )
            return Route(upstream, path, "ns")
        for prefix, upstream in self.prefixes:
            head = f"/v2/{prefix}"
            if path == head or path.startswith(head + "/"):
                rest = path[len(head) :].lstrip("/")
                return Route(upstream, "/v2/" + rest, "prefix")
        if self.default_upstream:
            return Route(self.default_upstream, path, "default")
        if path in ("/v2", "/v2/"):
            if self._ping_upstream:
                return Route(self._ping_upstream, path, "ping")
            return Route("", path, "local")
        raise RouteError(
            403,
            "DENIED",
            "no upstream registry configured for this request (no ns, prefix or default)",
        )


# -- headers on the way through -----------------------------------------------------------------

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, never forwarded; Host and the
# framing headers are the sending side's own business.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    """Header names a ``Connection`` header declares hop-by-hop for this message."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }


def forwardable_request_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers to send upstream: all of them, repeated ones in order, minus
    hop-by-hop ones, Host (set from the upstream URL) and body framing (no body is sent)."""
    drop = HOP_BY_HOP | _connection_tokens(headers) | {"host", "content-length", "expect"}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def forwardable_response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers to send back: all, in order, minus hop-by-hop ones
    (our server frames the body itself; a Content-Length is kept and checked)."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]
