"""Access control for blobs: the upstream registry decides who may read a layer, every time.

A blob may already sit in this host's cache or be on its way through the swarm because another
client was allowed to read it. That says nothing about *this* client, so before a blob is served
the mirror asks the upstream, with this client's own credentials::

    HEAD {upstream}/v2/{repository}/blobs/{digest}      Authorization: <the client's, or none>

Rules:
- 200 → allowed; the blob's size is the answer's Content-Length.
- 3xx → allowed too: registries on object storage (Docker Hub among them) redirect an
  authorised blob request to a signed storage URL. The size then comes from that URL, asked
  *without* the client's Authorization (it is the registry's credential, not the storage's).
- Anything else (401, 403, 404, 429, 5xx) → `AccessRefused` carrying the upstream's status and
  headers, so the client gets ``WWW-Authenticate`` and can do its token dance through the mirror.
- No answer (connection refused, timeout, bad framing) → `UpstreamUnavailable` (502): the client
  falls back to the registry itself.
- Only positive answers are cached, for ``ttl`` seconds of `trio.current_time` (MockClock in
  tests), per (credential, upstream, repository, digest). The credential is keyed by a keyed
  hash (blake2b with a per-process random key), never stored: a heap dump holds no tokens and
  no brute-forceable password hashes. The cache is bounded; the oldest entries go first.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import httpx
import trio

from p2pd import __version__
from p2pd.core.digest import Digest
from p2pd.core.layout import MAX_BLOB_SIZE
from p2pd.upstream import forwardable_response_headers

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
USER_AGENT = f"p2pd/{__version__}"
MAX_REDIRECTS = 3


class AccessRefused(Exception):
    """The upstream did not allow this client to read the blob; its answer, to pass on."""

    def __init__(self, status: int, headers: Headers) -> None:
        super().__init__(f"upstream refused with {status}")
        self.status = status
        self.headers = headers


class UpstreamUnavailable(Exception):
    """The upstream could not be asked (or answered nonsense); the mirror answers 502."""


@dataclass(frozen=True, slots=True)
class Grant:
    """This client may read the blob; `headers` answer a HEAD the way the upstream did."""

    size: int
    headers: tuple[tuple[str, str], ...]


class AccessChecker:
    def __init__(
        self,
        client: httpx.AsyncClient,
        ttl: float,
        *,
        max_entries: int = 10_000,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._max_entries = max_entries
        self._key = secrets.token_bytes(32)
        # Entries are inserted with now + ttl and ttl is fixed, so insertion order is expiry
        # order: expired entries are always at the front.
        self._cache: OrderedDict[tuple[bytes, str, str, Digest], tuple[float, Grant]] = (
            OrderedDict()
        )

    def _credential_key(self, authorization: str | None) -> bytes:
        data = b"\x00anonymous" if authorization is None else b"\x01" + authorization.encode()
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    async def check(
        self, upstream: str, repository: str, digest: Digest, authorization: str | None
    ) -> Grant:
        """A `Grant`, or raise `AccessRefused` / `UpstreamUnavailable` (see the module doc)."""
        key = (self._credential_key(authorization), upstream, repository, digest)
        now = trio.current_time()
        self._expire(now)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        grant = await self._ask(upstream, repository, digest, authorization)
        if self._ttl > 0:
            # pop first: a concurrent check of the same key may have inserted it meanwhile,
            # and re-assigning would keep its old place in the order.
            self._cache.pop(key, None)
            self._cache[key] = (trio.current_time() + self._ttl, grant)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return grant

    def _expire(self, now: float) -> None:
        while self._cache:
            key, (expires, _) = next(iter(self._cache.items()))
            if expires > now:
                return
            del self._cache[key]

    async def _ask(
        self, upstream: str, repository: str, digest: Digest, authorization: str | None
    ) -> Grant:
        url = f"{upstream}/v2/{repository}/blobs/{digest}"
        headers = [("user-agent", USER_AGENT)]
        if authorization is not None:
            headers.append(("authorization", authorization))
        response = await self._send(httpx.Request("HEAD", url, headers=headers), upstream)
        status = response.status_code
        out = forwardable_response_headers(_str_headers(response))
        if status == 200:
            return Grant(_content_length(response, url), tuple(out))
        if status in (301, 302, 303, 307, 308) and "location" in response.headers:
            size = await self._size_behind_redirect(response)
            return Grant(size, tuple(_synthesised_head(digest, size)))
        raise AccessRefused(status, out)

    async def _send(
        self, request: httpx.Request, upstream: str, *, stream: bool = False
    ) -> httpx.Response:
        try:
            # auth=None: whatever the client object was built with, only the headers we set
            # go out (no netrc, no default auth).
            return await self._client.send(
                request, auth=None, follow_redirects=False, stream=stream
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"upstream {upstream} did not answer the access check: {type(exc).__name__}: {exc}"
            ) from exc

    async def _size_behind_redirect(self, response: httpx.Response) -> int:
        """Follow a registry's redirect to storage, without the client's credentials, and find
        the blob's size there: a HEAD, or (signed URLs are often signed for GET only) a
        one-byte ranged GET whose Content-Range names the total."""
        url = response.url
        for _ in range(MAX_REDIRECTS):
            url = url.join(response.headers["location"])
            if url.scheme not in ("http", "https"):
                break
            plain = [("user-agent", USER_AGENT)]
            response = await self._send(httpx.Request("HEAD", url, headers=plain), url.host)
            if response.status_code in (301, 302, 303, 307, 308) and "location" in (
                response.headers
            ):
                continue
            if response.status_code == 200:
                return _content_length(response, str(url.copy_with(query=None)))
            ranged = [*plain, ("range", "bytes=0-0")]
            request = httpx.Request("GET", url, headers=ranged)
            # Streamed and closed unread: storage that ignores Range must not send us the blob.
            response = await self._send(request, url.host, stream=True)
            await response.aclose()
            total = response.headers.get("content-range", "").rpartition("/")[2]
            if response.status_code == 206 and total.isdigit() and int(total) <= MAX_BLOB_SIZE:
                return int(total)
            if response.status_code == 200:
                return _content_length(response, str(url.copy_with(query=None)))
            break
        raise UpstreamUnavailable("upstream redirected the blob; its size could not be found")


def _str_headers(response: httpx.Response) -> Headers:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]


def _content_length(response: httpx.Response, what: str) -> int:
    values = response.headers.get_list("content-length")
    if len(values) != 1 or not values[0].isdigit() or int(values[0]) > MAX_BLOB_SIZE:
        raise UpstreamUnavailable(f"no usable Content-Length in the answer for {what}")
    return int(values[0])


def _synthesised_head(digest: Digest, size: int) -> Headers:
    return [
        ("content-length", str(size)),
        ("content-type", "application/octet-stream"),
        ("docker-content-digest", str(digest)),
        ("docker-distribution-api-version", "registry/2.0"),
    ]
