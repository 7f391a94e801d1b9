"""What the API answers: pydantic models, so the OpenAPI document describes every body exactly.

Tenant views carry the tenant's own content (recipes, errors, events); ops views carry scheduling,
usage and throughput only, and are separate models so that no field can leak by accident.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from finetune.service.errors import IssueOut

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_after: str | None = Field(default=None, description="Pass as `after` for the next page.")


class ModelOut(BaseModel):
    id: str
    name: str | None = None
    developer: str | None = None
    country: str | None = None
    license: str | None = None
    parameters: float | None = Field(default=None, description="Billions of parameters.")
    methods: list[str]
    max_seq_len: int | None = None
    summary: dict[str, Any] = {}


class ValidationOut(BaseModel):
    valid: bool
    issues: list[IssueOut]
    recipe: dict[str, Any] | None = Field(default=None, description="The recipe with every default filled in.")


class DatasetOut(BaseModel):
    id: str
    path: str
    sha256: str
    size: int
    format: str | None
    rows: int | None
    status: Literal["ok", "refused"]
    issues: list[IssueOut]
    summary: dict[str, Any]
    created_at: datetime


class RegisterDataset(BaseModel):
    path: str = Field(description="The file's path inside your bucket (datasets/train.jsonl, say).", max_length=1024)


class JobOut(BaseModel):
    id: str
    name: str | None
    model_id: str
    method: str
    gpus: int
    state: str
    reason: str | None
    error: dict[str, Any] | None
    attempt: int
    queue_position: int | None = Field(default=None, description="1 for the next job to start, while queued.")
    created_at: datetime
    validating_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    tokens_per_s_per_gpu: float | None
    cloned_from: str | None
    recipe: dict[str, Any]
    warnings: list[str] = []


class OpsJobOut(BaseModel):
    """A job as ops see it: scheduling and throughput, no content."""

    id: str
    tenant_id: str
    model_id: str
    method: str
    gpus: int
    state: str
    reason: str | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    step: int
    total_steps: int | None
    tokens_per_s_per_gpu: float | None


class EventOut(BaseModel):
    position: int = Field(description="The event's place in the job's history (1, 2, 3...): the cursor.")
    seq: int | None = Field(default=None, description="The engine's sequence number (none on a state change).")
    kind: str
    time: datetime
    attempt: int
    data: dict[str, Any]


class EventPage(BaseModel):
    data: list[EventOut]
    has_more: bool
    next_after: int | None = None


class MetricPoint(BaseModel):
    step: int
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s_per_gpu: float | None = None
    lr: float | None = None
    time: datetime


class MetricsOut(BaseModel):
    job_id: str
    points: list[MetricPoint]


class CheckpointOut(BaseModel):
    step: int
    name: str
    files: int
    bytes: int
    created_at: datetime


class CloneJob(BaseModel):
    changes: dict[str, Any] = Field(
        default_factory=dict,
        description='A JSON merge patch (RFC 7396) over the source job\'s recipe: {"training": {"epochs": 3}}.',
    )
