"""Cluster authentication: only members holding the shared secret may fetch pieces or talk to
the supernode.

Why: the piece port serves any blob it holds to whoever asks for a digest, and a private
image's layers must not leak to hosts outside the fleet. p2pd checks every runtime against the
registry before serving it; this keeps everyone else off the piece and control ports.

A request carries ``X-P2P-Auth: <unix time>.<hex HMAC-SHA256>`` over the time, the method, the
path (with query) and the sha256 of the body. Receivers accept a time within ``max_skew``
seconds of their clock (clocks of a fleet are NTP-synchronised) and compare in constant time.
With no secret configured the check is off, and the daemons say so at start.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path

HEADER = "x-p2p-auth"


class ClusterAuthError(Exception):
    """A request without a valid cluster signature."""


class ClusterAuth:
    def __init__(
        self,
        secret: bytes | None,
        *,
        max_skew: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self.secret = secret
        self.max_skew = max_skew
        self.clock = clock

    @classmethod
    def from_file(cls, path: Path | None) -> ClusterAuth:
        if path is None:
            return cls(None)
        return cls(path.read_bytes().strip())

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def sign(self, method: str, target: str, body: bytes = b"") -> str | None:
        """The header value for a request, or None when no secret is configured."""
        if self.secret is None:
            return None
        stamp = str(int(self.clock()))
        return f"{stamp}.{self._mac(stamp, method, target, body)}"

    def check(self, value: str | None, method: str, target: str, body: bytes = b"") -> None:
        if self.secret is None:
            return
        if not value:
            raise ClusterAuthError("missing cluster signature")
        stamp, _, mac = value.partition(".")
        if not stamp.isdigit() or abs(self.clock() - int(stamp)) > self.max_skew:
            raise ClusterAuthError("cluster signature expired or malformed")
        if not hmac.compare_digest(mac, self._mac(stamp, method, target, body)):
            raise ClusterAuthError("bad cluster signature")

    def _mac(self, stamp: str, method: str, target: str, body: bytes) -> str:
        assert self.secret is not None
        message = "\n".join((stamp, method.upper(), target, hashlib.sha256(body).hexdigest()))
        # hmac.digest: the one-shot C path, half the time of an hmac.new object (the supernode
        # checks a signature on every control call)
        return hmac.digest(self.secret, message.encode(), "sha256").hex()
