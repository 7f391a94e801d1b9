"""Administration over HTTP (admin keys): tenants, terms, grants and keys, as ``finetune admin``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from finetune.service import admin
from finetune.service.errors import ApiError, error_responses, not_found
from finetune.service.keys import create_key, revoke_key
from finetune.service.models import ApiKey, Tenant
from finetune.service.scope import Admin

router = APIRouter(prefix="/v1/admin", tags=["admin"])

#: Names and ids hold no control character (PostgreSQL cannot even store a NUL: it would be a 500).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
#: A term starts and ends within these; a time outside them cannot be stored (nor 92 days added to it).
EARLIEST, LATEST = datetime(2000, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


class NewTenant(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=PRINTABLE)
    time_zone: str = Field(default="Asia/Taipei", max_length=64)


class NewTerm(BaseModel):
    id: str = Field(max_length=63, description="Lower-case letters, digits and '-': 2026-q4")
    starts_at: datetime | None = None
    ends_at: datetime | None = None


class GrantIn(BaseModel):
    tenant_id: str = Field(max_length=40, pattern=PRINTABLE)
    term_id: str = Field(max_length=63, pattern=PRINTABLE)
    tier: Literal["L1", "L2", "L3"] = "L1"
    gpus_per_job: int = Field(default=8, ge=1, le=1024)
    gpus_held: int = Field(default=8, ge=1, le=4096)
    storage_bytes: int = Field(default=10**12, ge=0, le=10**15)
    points: float = Field(default=0.0, ge=0, le=10**9)


class NewKey(BaseModel):
    role: Literal["tenant", "ops", "admin"]
    tenant_id: str | None = Field(default=None, max_length=40, pattern=PRINTABLE)
    name: str = Field(default="", max_length=100, pattern=PRINTABLE)


def _run(scope: Admin, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        out = fn(scope.session, *args, **kwargs)
    except admin.AdminError as exc:
        scope.session.rollback()
        raise ApiError(422, str(exc)) from None
    scope.session.commit()
    return out


@router.post("/tenants", status_code=201, summary="A new tenant and its first key (shown once)")
def create_tenant(scope: Admin, body: NewTenant) -> JSONResponse:
    tenant, key = _run(scope, admin.create_tenant, body.name, time_zone=body.time_zone)
    return JSONResponse({"tenant": {"id": tenant.id, "name": tenant.name, "time_zone": tenant.time_zone},
                         "key": {"id": key.id, "key": key.key, "role": key.role}}, status_code=201)  # fmt: skip


@router.get("/tenants", summary="Every tenant")
def list_tenants(scope: Admin) -> list[dict[str, Any]]:
    return admin.list_tenants(scope.session)


@router.post("/terms", status_code=201, summary="A new term")
def create_term(scope: Admin, body: NewTerm) -> dict[str, Any]:
    if body.starts_at is not None and body.starts_at.tzinfo is None:
        raise ApiError(422, "give times with their offset (2026-10-01T00:00:00+08:00)", param="starts_at")
    if body.ends_at is not None and body.ends_at.tzinfo is None:
        raise ApiError(422, "give times with their offset (2026-12-31T00:00:00+08:00)", param="ends_at")
    for name, value in (("starts_at", body.starts_at), ("ends_at", body.ends_at)):
        if value is not None and not EARLIEST <= value <= LATEST:
            raise ApiError(422, f"a term lies between {EARLIEST.year} and {LATEST.year}", param=name)
    term = _run(scope, admin.create_term, body.id, starts_at=body.starts_at, ends_at=body.ends_at)
    return admin.term_dict(term)


@router.get("/terms", summary="Every term")
def list_terms(scope: Admin) -> list[dict[str, Any]]:
    return admin.list_terms(scope.session)


@router.put("/grants", summary="Grant a tenant resources in a term (or change the grant)")
def put_grant(scope: Admin, body: GrantIn) -> dict[str, Any]:
    row = _run(scope, admin.grant, body.tenant_id, body.term_id, tier=body.tier, gpus_per_job=body.gpus_per_job,
               gpus_held=body.gpus_held, storage_bytes=body.storage_bytes, points=body.points)  # fmt: skip
    return admin.grant_dict(row)


@router.get("/grants", summary="Every grant")
def list_grants(scope: Admin) -> list[dict[str, Any]]:
    return admin.list_grants(scope.session)


@router.post("/keys", status_code=201, summary="A new API key (shown once)", responses=error_responses(404))
def new_key(scope: Admin, body: NewKey) -> dict[str, Any]:
    if body.tenant_id is not None and scope.session.get(Tenant, body.tenant_id) is None:
        raise not_found("tenant", body.tenant_id)
    try:
        key = create_key(scope.session, role=body.role, tenant_id=body.tenant_id, name=body.name)
    except ValueError as exc:
        raise ApiError(422, str(exc), param="tenant_id") from None
    scope.session.commit()
    return {"id": key.id, "key": key.key, "role": key.role, "tenant_id": key.tenant_id}


@router.get("/keys", summary="Every key (never the key itself)")
def list_keys(scope: Admin) -> list[dict[str, Any]]:
    return admin.list_keys(scope.session)


@router.post("/keys/{key_id}/revoke", summary="Revoke a key: it answers 401 from now on")
def revoke(scope: Admin, key_id: str) -> dict[str, Any]:
    if scope.session.get(ApiKey, key_id) is None:
        raise not_found("key", key_id)
    revoke_key(scope.session, key_id)
    scope.session.commit()
    row = scope.session.get(ApiKey, key_id)
    assert row is not None
    return admin.key_dict(row)
