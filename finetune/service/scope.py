"""Who is calling, and what they may reach: the one place where tenant scoping is enforced.

Every route takes one of three dependencies: :func:`tenant_scope` (a tenant key: a database access
limited to that tenant and its current term, and its bucket), :func:`ops_scope` (an ops or admin
key: scheduling, usage and health of every tenant, through views that carry no content) or
:func:`admin_scope`. Routes never compare owner ids themselves: they ask the scope, and another
tenant's resource is as missing as one that never existed (404).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from finetune.service.errors import ApiError, not_found
from finetune.service.keys import find_key
from finetune.service.models import Dataset, Grant, Job, Tenant, Term, utcnow

if TYPE_CHECKING:
    from finetune.registry import Registry
    from finetune.service.config import ServiceSettings
    from finetune.service.dispatcher import Dispatcher
    from finetune.settings import Settings
    from finetune.storage import Bucket

T = TypeVar("T")
LAST_USED_EVERY = timedelta(minutes=1)
_TOUCHED: dict[str, datetime] = {}  # when this process last wrote a key's last_used_at
_TOUCHED_LOCK = threading.Lock()  # how stale a key's last_used_at may get (no write per request)
#: Declares the key in the OpenAPI document, on exactly the routes that take one, with the role a route
#: needs as the requirement's scope (``tenant``, ``ops`` or ``admin``); :func:`_bearer` reads the key.
BEARER = HTTPBearer(
    scheme_name="bearer",
    auto_error=False,
    description="An API key: `Authorization: Bearer <key>`. "
    "A route's security names the role its key needs: tenant, ops (admin keys too) or admin.",
)


@dataclass
class Service:
    """What every request may need: settings, the database, the registry and the dispatcher."""

    settings: ServiceSettings
    engine: Settings
    db: sessionmaker[Session]
    registry: Registry
    dispatcher: Dispatcher | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def service(request: Request) -> Service:
    return request.app.state.service


@dataclass(frozen=True)
class Caller:
    key_id: str
    role: str
    tenant_id: str | None


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "an API key is needed: 'Authorization: Bearer <key>'", code="unauthorized",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    return key.strip()


def caller(
    request: Request,
    svc: Annotated[Service, Depends(service)],
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> Caller:
    """The key's owner and role; 401 for a missing, unknown or revoked key."""
    key = _bearer(request)
    with svc.db() as session, session.begin():
        row = find_key(session, key)
        if row is None:
            raise ApiError(401, "unknown or revoked API key", code="unauthorized",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})  # fmt: skip
        now = utcnow()
        with _TOUCHED_LOCK:  # one write a minute per key and process, not one per request in flight
            last = max(filter(None, (row.last_used_at, _TOUCHED.get(row.id))), default=None)
            due = last is None or now - last > LAST_USED_EVERY
            if due:
                _TOUCHED[row.id] = now
        if due:
            row.last_used_at = now
        return Caller(row.id, row.role, row.tenant_id)


def current_grant(session: Session, tenant_id: str) -> tuple[Grant, Term] | None:
    """The tenant's grant in its current term: started, not closed, not purged; the newest one."""
    now = utcnow()
    found = session.execute(
        select(Grant, Term)
        .join(Term, Term.id == Grant.term_id)
        .where(Grant.tenant_id == tenant_id, Term.starts_at <= now, Term.closed_at.is_(None), Term.purged_at.is_(None))
        .order_by(Term.starts_at.desc())
        .limit(1)
    ).first()
    return None if found is None else (found[0], found[1])


class TenantScope:
    """One tenant's view of the database and its bucket, for its current term."""

    def __init__(self, svc: Service, session: Session, tenant: Tenant, grant: Grant, term: Term, key_id: str) -> None:
        self.svc, self.session, self.tenant, self.grant, self.term, self.key_id = (
            svc,
            session,
            tenant,
            grant,
            term,
            key_id,
        )

    @property
    def tenant_id(self) -> str:
        return self.tenant.id

    @property
    def term_id(self) -> str:
        return self.term.id

    @cached_property
    def bucket(self) -> Bucket:
        """The tenant's bucket for the term, with the grant's storage quota."""
        from finetune.storage import Bucket

        engine = self.svc.engine.model_copy(update={"quota_bytes": self.grant.storage_bytes})
        return Bucket.for_tenant(engine, self.tenant.id, self.term.id)

    def jobs(self) -> Select[Job]:
        return select(Job).where(Job.tenant_id == self.tenant.id, Job.term_id == self.term.id)

    def datasets(self) -> Select[Dataset]:
        return select(Dataset).where(Dataset.tenant_id == self.tenant.id, Dataset.term_id == self.term.id)

    def job(self, job_id: str, *, lock: bool = False) -> Job:
        query = self.jobs().where(Job.id == job_id)
        row = self.session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise not_found("job", job_id)
        return row

    def dataset(self, dataset_id: str) -> Dataset:
        row = self.session.scalar(self.datasets().where(Dataset.id == dataset_id))
        if row is None:
            raise not_found("dataset", dataset_id)
        return row

    def add(self, row: T) -> T:
        """Add a new row of this tenant's: its owner and term are set here, never by a route."""
        row.tenant_id = self.tenant.id  # type: ignore[attr-defined]
        row.term_id = self.term.id  # type: ignore[attr-defined]
        self.session.add(row)
        return row


def tenant_scope(
    who: Annotated[Caller, Security(caller, scopes=["tenant"])], svc: Annotated[Service, Depends(service)]
) -> Iterator[TenantScope]:
    if who.role != "tenant" or who.tenant_id is None:
        raise ApiError(403, "this route serves a tenant's own content; ops and admin keys cannot reach it",
                       code="forbidden")  # fmt: skip
    with svc.db() as session:
        tenant = session.get(Tenant, who.tenant_id)
        found = current_grant(session, who.tenant_id) if tenant is not None else None
        if tenant is None or found is None:
            raise ApiError(403, "this tenant has no grant in a term that is open now", code="no_active_term")
        session.commit()  # the connection goes back to the pool; the route's first query takes one again
        yield TenantScope(svc, session, tenant, found[0], found[1], who.key_id)


class OpsScope:
    """Every tenant's scheduling, usage and health; never content."""

    def __init__(self, svc: Service, session: Session, who: Caller) -> None:
        self.svc, self.session, self.who = svc, session, who


def ops_scope(
    who: Annotated[Caller, Security(caller, scopes=["ops"])], svc: Annotated[Service, Depends(service)]
) -> Iterator[OpsScope]:
    if who.role not in ("ops", "admin"):
        raise ApiError(403, "this route is for the platform's operators", code="forbidden")
    with svc.db() as session:
        yield OpsScope(svc, session, who)


def admin_scope(
    who: Annotated[Caller, Security(caller, scopes=["admin"])], svc: Annotated[Service, Depends(service)]
) -> Iterator[OpsScope]:
    if who.role != "admin":
        raise ApiError(403, "this route is for the platform's administrators", code="forbidden")
    with svc.db() as session:
        yield OpsScope(svc, session, who)


#: Requests holding a database session at once, per process; more wait without a thread or a
#: connection (benchmarks/service_load.py: 100 clients on 2 cores exhausted the pool without it).
DB_CONCURRENCY = 24  # with ops' 8 and admins' 4: 36 of the pool's 40 connections
# "function": a scope's session (and its pooled connection) ends when the route returns, before the
# response is sent, so a download or an event stream holds none while it streams.
Tenancy = Annotated[TenantScope, Depends(tenant_scope, scope="function", max_concurrency=DB_CONCURRENCY)]
Ops = Annotated[OpsScope, Depends(ops_scope, scope="function", max_concurrency=8)]
Admin = Annotated[OpsScope, Depends(admin_scope, scope="function", max_concurrency=4)]
#: An upload spends most of its time receiving bytes, holding no connection (see tenant_scope): it is
#: not counted against the requests that query.
Uploading = Annotated[TenantScope, Depends(tenant_scope, scope="function")]
Svc = Annotated[Service, Depends(service)]
