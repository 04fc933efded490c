"""Blob digests as the OCI distribution spec writes them, restricted to sha256.

A digest crosses every boundary of the system (URLs, control messages, file names), so it is
parsed once, strictly, into a `Digest`, and everything downstream can trust its form: exactly
``sha256:`` followed by 64 lowercase hex characters. Anything else is refused, which also keeps
path tricks out of names derived from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class DigestError(ValueError):
    """A string that is not a well-formed ``sha256:<64 lowercase hex>`` digest."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated sha256 blob digest; ``str(d)`` gives back ``sha256:<hex>``."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not isinstance(text, str) or _DIGEST_RE.fullmatch(text) is None:
            shown = text[:80] if isinstance(text, str) else type(text).__name__
            raise DigestError(f"not a sha256 digest (want 'sha256:' + 64 lowercase hex): {shown!r}")
        return cls(text[7:])

    @classmethod
    def from_bytes(cls, raw: bytes) -> Digest:
        """The digest of a 32-byte sha256 value, e.g. ``hashlib.sha256(b).digest()``."""
        if len(raw) != 32:
            raise DigestError(f"sha256 value must be 32 bytes, got {len(raw)}")
        return cls(raw.hex())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.hex)
