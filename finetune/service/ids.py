"""Public identifiers: time-ordered and unguessable.

An id is a prefix and 26 characters of lower-case Crockford base32: 48 bits of milliseconds, then
80 random bits (the ULID layout). Ids sort by creation time, which gives lists a stable order and a
cursor without a second column, and 80 random bits make them impossible to guess. They fit the
storage layer's id pattern (lower-case letters, digits and '-'), so a job id is also its folder.
"""

from __future__ import annotations

import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

PREFIXES = {"tenant": "tn", "job": "job", "dataset": "ds", "key": "key", "grant": "gr", "bench": "bm"}
ID_RE = re.compile(r"^[a-z]{2,5}-[0-9a-hjkmnp-tv-z]{26}$")


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(kind: str, *, now: float | None = None) -> str:
    """A new id of ``kind`` (a key of :data:`PREFIXES`)."""
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    return f"{PREFIXES[kind]}-{_encode(millis, 10)}{_encode(secrets.randbits(80), 16)}"


def looks_like(kind: str, value: str) -> bool:
    """Whether ``value`` has the shape of an id of ``kind`` (it may still not exist)."""
    return bool(ID_RE.match(value)) and value.startswith(PREFIXES[kind] + "-")
