"""Tenants, terms, grants and keys: used by ``finetune admin`` and the admin routes alike."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from finetune.errors import FinetuneError
from finetune.service.ids import new_id
from finetune.service.keys import NewKey, create_key
from finetune.service.models import ApiKey, Grant, Tenant, Term, utcnow
from finetune.storage import ID_PATTERN

TIERS = ("L1", "L2", "L3")


class AdminError(FinetuneError):
    """An administrative request that cannot be done (a name taken, an unknown term...)."""

    fault = "tenant"


def create_tenant(session: Session, name: str, *, time_zone: str = "Asia/Taipei") -> tuple[Tenant, NewKey]:
    """A new tenant and its first API key (a tenant key, shown once)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise AdminError("a tenant's name is 1 to 200 characters")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise AdminError(f"a tenant named '{name}' exists already")
    _check_zone(time_zone)
    tenant = Tenant(id=new_id("tenant"), name=name, time_zone=time_zone)
    session.add(tenant)
    session.flush()
    return tenant, create_key(session, role="tenant", tenant_id=tenant.id, name="first key")


def _check_zone(zone: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise AdminError(f"unknown time zone '{zone}' (an IANA name such as Asia/Taipei)") from exc


def create_term(session: Session, term_id: str, *, starts_at: datetime | None = None,
                ends_at: datetime | None = None) -> Term:  # fmt: skip
    """A term (default: starting now, for 92 days)."""
    if not ID_PATTERN.match(term_id):
        raise AdminError(f"invalid term id '{term_id}': lower-case letters, digits and '-' (2026-q4, say)")
    if session.get(Term, term_id) is not None:
        raise AdminError(f"term '{term_id}' exists already")
    starts = starts_at or utcnow()
    ends = ends_at or starts + timedelta(days=92)
    if ends <= starts:
        raise AdminError("a term ends after it starts")
    term = Term(id=term_id, starts_at=starts, ends_at=ends)
    session.add(term)
    session.flush()
    return term


def grant(session: Session, tenant_id: str, term_id: str, *, tier: str = "L1", gpus_per_job: int = 8,
          gpus_held: int = 8, storage_bytes: int = 10**12, points: float = 0.0) -> Grant:  # fmt: skip
    """Grant a tenant resources in a term (or change its grant there)."""
    if session.get(Tenant, tenant_id) is None:
        raise AdminError(f"no tenant '{tenant_id}'")
    if session.get(Term, term_id) is None:
        raise AdminError(f"no term '{term_id}'")
    if tier not in TIERS:
        raise AdminError(f"unknown tier '{tier}': one of {', '.join(TIERS)}")
    if gpus_per_job < 1 or gpus_held < gpus_per_job:
        raise AdminError("GPUs per job is at least 1 and no more than the GPUs held at once")
    if storage_bytes < 0 or points < 0:
        raise AdminError("storage and points cannot be negative")
    row = session.scalar(select(Grant).where(Grant.tenant_id == tenant_id, Grant.term_id == term_id))
    if row is None:
        row = Grant(id=new_id("grant"), tenant_id=tenant_id, term_id=term_id)
        session.add(row)
    row.tier, row.gpus_per_job, row.gpus_held = tier, gpus_per_job, gpus_held
    row.storage_bytes, row.points = storage_bytes, points
    session.flush()
    return row


def list_tenants(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Tenant).order_by(Tenant.id)).all()
    return [
        {"id": t.id, "name": t.name, "time_zone": t.time_zone, "created_at": t.created_at.isoformat()} for t in rows
    ]


def list_terms(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Term).order_by(Term.starts_at)).all()
    return [term_dict(t) for t in rows]


def term_dict(t: Term) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {"id": t.id, "starts_at": iso(t.starts_at), "ends_at": iso(t.ends_at), "closed_at": iso(t.closed_at),
            "download_until": iso(t.download_until), "purged_at": iso(t.purged_at)}  # fmt: skip


def grant_dict(g: Grant) -> dict[str, Any]:
    return {"id": g.id, "tenant_id": g.tenant_id, "term_id": g.term_id, "tier": g.tier, "gpus_per_job": g.gpus_per_job,
            "gpus_held": g.gpus_held, "storage_bytes": g.storage_bytes, "points": g.points}  # fmt: skip


def list_grants(session: Session, tenant_id: str | None = None) -> list[dict[str, Any]]:
    query = select(Grant).order_by(Grant.tenant_id, Grant.term_id)
    if tenant_id:
        query = query.where(Grant.tenant_id == tenant_id)
    return [grant_dict(g) for g in session.scalars(query).all()]


def key_dict(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "tenant_id": k.tenant_id, "role": k.role, "prefix": k.prefix, "name": k.name,
            "created_at": k.created_at.isoformat(), "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None}  # fmt: skip


def list_keys(session: Session, tenant_id: str | None = None) -> list[dict[str, Any]]:
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant_id:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return [key_dict(k) for k in session.scalars(query).all()]
