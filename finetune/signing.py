"""The platform's signature on what the engine publishes: Ed25519 over canonical JSON.

Tenants can write into their own bucket with S3 tools, so a checkpoint, a final model or an
archive found there proves nothing by its digests alone: anyone can re-digest altered files. The
engine signs each manifest it publishes with the platform key, and reads nothing back (above all,
unpickles nothing) whose manifest does not carry a valid signature by that key. Ed25519, so that a
verifier needs only the public key (a tenant checking an archive never holds the private one).

The key comes from the settings: ``FINETUNE_SIGNING_KEY`` (base64 of the 32-byte private seed) in
production; on embedded defaults a key file is made under the data folder on first use (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from finetune.errors import FinetuneError

__all__ = [
    "ALGORITHM",
    "SIGNATURE",
    "SigningError",
    "SigningKey",
    "VerifyKey",
    "canonical_json",
    "load_signing_key",
    "sign_document",
    "signature_problem",
]

ALGORITHM = "ed25519"
SIGNATURE = "signature"


class SigningError(FinetuneError):
    """The platform key is missing or unusable."""

    fault = "platform"


def canonical_json(data: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class VerifyKey:
    """A public key: checks signatures, cannot make them."""

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.raw = raw
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_base64(cls, text: str) -> VerifyKey:
        """A public key from the base64 of its 32 raw bytes."""
        try:
            return cls(Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise SigningError(f"not an Ed25519 public key (base64 of 32 bytes): {exc}") from None

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def verify(self, data: bytes, signature: str) -> bool:
        try:
            self._public.verify(base64.b64decode(signature, validate=True), data)
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


class SigningKey:
    """The platform's private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = VerifyKey(private.public_key())
        self.key_id = self.public.key_id

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_base64(cls, text: str) -> SigningKey:
        """A key from the base64 of its 32-byte private seed."""
        try:
            seed = base64.b64decode(text.strip(), validate=True)
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        except (binascii.Error, ValueError) as exc:
            raise SigningError(f"the signing key is not base64 of a 32-byte Ed25519 seed: {exc}") from None

    def seed_base64(self) -> str:
        raw = self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw).decode()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._private.sign(data)).decode()


def _read_or_create(path: Path) -> SigningKey:
    if path.is_file():
        return SigningKey.from_base64(path.read_text(encoding="ascii"))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.seed_base64() + "\n")
    try:
        os.link(part, path)  # fails if another process made the key first: then use theirs
    except FileExistsError:
        pass
    finally:
        os.unlink(part)
    return SigningKey.from_base64(path.read_text(encoding="ascii"))


def load_signing_key(seed_base64: str | None, key_file: Path | None) -> SigningKey:
    """The platform key: from its base64 seed, else from ``key_file`` (created on first use).

    Raises:
        SigningError: Neither is given, or the key is malformed.
    """
    if seed_base64:
        return SigningKey.from_base64(seed_base64)
    if key_file is None:
        raise SigningError("no signing key: set FINETUNE_SIGNING_KEY (base64 of a 32-byte Ed25519 seed)")
    return _read_or_create(key_file)


def sign_document(document: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """A copy of ``document`` with its signature (over everything but the signature) added."""
    body = {k: v for k, v in document.items() if k != SIGNATURE}
    return {**body, SIGNATURE: {"algorithm": ALGORITHM, "key_id": key.key_id, "value": key.sign(canonical_json(body))}}


def signature_problem(document: Any, key: VerifyKey) -> str | None:
    """Why ``document`` does not carry a valid signature by ``key``, or None when it does."""
    if not isinstance(document, dict):
        return "not a signed document"
    signature = document.get(SIGNATURE)
    if signature is None:
        return "unsigned: it carries no platform signature"
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return "its signature is not an Ed25519 platform signature"
    if signature.get("key_id") != key.key_id:
        return f"signed with another key (key id {str(signature.get('key_id'))[:32]!r}, the platform's is {key.key_id})"
    value = signature.get("value")
    body = {k: v for k, v in document.items() if k != SIGNATURE}
    try:
        payload = canonical_json(body)
    except ValueError:
        return "its content cannot be signed (not plain JSON)"
    if not isinstance(value, str) or not key.verify(payload, value):
        return "the signature does not match its content (altered after signing)"
    return None
