"""API keys: 256 random bits, shown once, stored as their SHA-256, revocable, with a role."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from finetune.service.ids import new_id
from finetune.service.models import ROLES, ApiKey, utcnow

#: Visible start of each role's keys, so a leaked key is recognisable in logs and scanners.
KEY_PREFIX = {"tenant": "ftk_t_", "ops": "ftk_o_", "admin": "ftk_a_"}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    key: str  # the only time it exists in clear
    role: str
    tenant_id: str | None


def create_key(session: Session, *, role: str, tenant_id: str | None, name: str = "") -> NewKey:
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}': one of {', '.join(ROLES)}")
    if (role == "tenant") != (tenant_id is not None):
        raise ValueError("a tenant key belongs to a tenant; ops and admin keys to none")
    key = KEY_PREFIX[role] + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, role=role, prefix=key[:12], key_hash=key_hash(key), name=name)
    session.add(row)
    session.flush()
    return NewKey(row.id, key, role, tenant_id)


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live key ``key`` is, or None (unknown or revoked)."""
    if not key.startswith("ftk_") or len(key) > 200:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True
