"""The service's settings, from ``FINETUNE_SERVICE_*`` environment variables.

Embedded defaults (``mode=embedded``): a SQLite file and ``file://`` buckets under the data folder,
and a local Ray head the service starts itself when no Ray address is set. ``mode=production``
refuses to start without a PostgreSQL URL, S3 storage, a Ray cluster's address and the platform's
signing key, naming every one that is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune.errors import FinetuneError
from finetune.settings import Settings


class ServiceConfigError(FinetuneError):
    """The service cannot start with these settings."""

    fault = "platform"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_SERVICE_", extra="ignore")

    mode: Literal["embedded", "production"] = "embedded"
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/service.db"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest dataset uploaded through the API.")
    max_body_bytes: int = Field(default=1024**2, gt=0, description="Largest JSON or YAML request body.")
    dispatcher: bool = Field(default=True, description="Run the dispatcher in this process.")
    poll_seconds: float = Field(default=1.0, gt=0, description="How often the dispatcher looks at the cluster.")
    max_attempts: int = Field(default=3, ge=1, description="Attempts of a job before a platform failure fails it.")
    gpu_capacity: int | None = Field(
        default=None, ge=0, description="GPUs the dispatcher may hand out; default: what the Ray cluster reports."
    )
    cpu_slots: int = Field(
        default=2, ge=0, description="On a cluster without GPUs, CPU workers handed out as 'GPUs' (tests, laptops)."
    )
    worker_python: str | None = Field(
        default=None, description="The Python the cluster runs jobs with; default: this process's interpreter."
    )
    ray_port: int = Field(default=6390, description="Port of the local Ray head started on embedded defaults.")
    ray_dashboard_port: int = Field(default=8265, description="Job-submission port of that local head.")
    ray_num_cpus: int | None = Field(default=None, description="CPUs of the local Ray head; default: all.")
    events_flush_seconds: float = Field(
        default=2.0, gt=0, description="Most seconds a job's step records wait before reaching the bucket."
    )
    sse_poll_seconds: float = Field(default=0.25, gt=0, description="How often an event stream looks for news.")

    def database(self, engine: Settings) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(engine.data_dir / 'service.db').resolve()}"

    def problems(self, engine: Settings) -> list[str]:
        """What production mode lacks (empty on embedded defaults)."""
        if self.mode != "production":
            return []
        found = []
        if not (self.database_url or "").startswith(("postgresql", "postgres")):
            found.append("FINETUNE_SERVICE_DATABASE_URL must be a PostgreSQL URL (postgresql+psycopg://...)")
        if not (engine.storage_url or "").startswith("s3://"):
            found.append("FINETUNE_STORAGE_URL must be an s3:// URL")
        if not engine.ray_address:
            found.append("RAY_ADDRESS (or FINETUNE_RAY_ADDRESS) must name the Ray cluster's job-submission address")
        if engine.signing_key is None:
            found.append("FINETUNE_SIGNING_KEY must hold the platform's signing key (production never makes one)")
        if engine.storage_url and engine.storage_url.startswith("s3://") and not engine.s3_secret_access_key:
            found.append("FINETUNE_S3_SECRET_ACCESS_KEY must be set for S3 storage")
        return found

    def check(self, engine: Settings) -> None:
        if problems := self.problems(engine):
            raise ServiceConfigError("the service cannot start in production mode:\n  " + "\n  ".join(problems))

    def ray_state_dir(self, engine: Settings) -> Path:
        return (engine.data_dir / "ray").resolve()
