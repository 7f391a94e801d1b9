"""The service's tables (SQLAlchemy 2). Alembic's migrations create them; a test keeps both in step.

What a tenant hands us lives in the tenant's bucket; the database holds what the service needs to
schedule, show and meter jobs: identities, grants, the datasets' checks, jobs, their events and
checkpoints. Times are stored as UTC and read back as aware datetimes on every database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Job states; the last three are final.
STATES = ("queued", "validating", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
ROLES = ("tenant", "ops", "admin")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored as naive UTC, read back aware (UTC) on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


#: An auto-incrementing 64-bit key (SQLite only auto-increments INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    time_zone: Mapped[str] = mapped_column(String(64), default="Asia/Taipei")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Term(Base):
    """A grant period (three months, say) shared by every tenant granted in it."""

    __tablename__ = "terms"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    download_until: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Grant(Base):
    """What one tenant may use in one term."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("tenant_id", "term_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    term_id: Mapped[str] = mapped_column(ForeignKey("terms.id"), index=True)
    tier: Mapped[str] = mapped_column(String(8), default="L1")
    gpus_per_job: Mapped[int] = mapped_column(Integer, default=8)
    gpus_held: Mapped[int] = mapped_column(Integer, default=8)
    storage_bytes: Mapped[int] = mapped_column(BigInteger, default=10**12)
    points: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key, stored as its SHA-256 (keys are 256 random bits: no slow hash is needed)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(10))
    prefix: Mapped[str] = mapped_column(String(24))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Dataset(Base):
    """A file in the tenant's bucket, checked: its digest, size, format and rows (or its problems)."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "term_id", "path"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    term_id: Mapped[str] = mapped_column(ForeignKey("terms.id"))
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(32))
    rows: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # "ok" | "refused"
    issues: Mapped[list[Any]] = mapped_column(default=list)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_term", "tenant_id", "term_id", "id"),
        Index("ix_jobs_state", "state", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    term_id: Mapped[str] = mapped_column(ForeignKey("terms.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    model_id: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(16))
    gpus: Mapped[int] = mapped_column(Integer)
    recipe: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[dict[str, Any] | None]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    cloned_from: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    validating_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    # the dispatcher's bookkeeping: the Ray job of the current attempt and phase
    phase: Mapped[str | None] = mapped_column(String(16))  # "prepare" | "train"
    submission_id: Mapped[str | None] = mapped_column(String(120))
    submitted_at: Mapped[datetime | None]
    last_seq: Mapped[int] = mapped_column(Integer, default=0)  # the engine's newest event ingested
    next_position: Mapped[int] = mapped_column(Integer, default=1)  # the position of the job's next event
    # progress, from the newest events
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    tokens_per_s_per_gpu: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """One entry of a job's history: a state change of the service's, or a record of the engine's.

    ``position`` orders a job's events (1, 2, 3... with no gap) and is the cursor clients resume
    from; ``seq`` is the engine's own sequence number, unique per job, so that ingesting the same
    record twice is refused by the database itself.
    """

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "position"), UniqueConstraint("job_id", "seq"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(32))
    time: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BenchmarkRun(Base):
    """A throughput benchmark ops ran on the cluster; charges no tenant."""

    __tablename__ = "benchmark_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    gpus: Mapped[int] = mapped_column(Integer)
    request: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued, running, succeeded, failed
    submission_id: Mapped[str | None] = mapped_column(String(120))
    submitted_at: Mapped[datetime | None]
    device: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[list[Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
