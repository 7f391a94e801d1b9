"""Engine settings, from ``FINETUNE_*`` environment variables, with embedded defaults.

Embedded defaults keep everything under one data directory in the working folder, so a fresh
checkout runs with no server to install.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGE = Path(__file__).resolve().parent


def default_registry_path() -> Path:
    """The registry shipped with the engine: the wheel's copy, else the source checkout's."""
    packaged = _PACKAGE / "_data" / "model_registry.yaml"
    return packaged if packaged.exists() else _PACKAGE.parent / "model_registry.yaml"


def default_results_path() -> Path:
    """The recorded benchmark results: the wheel's copy, else the source checkout's ``benchmarks/results``."""
    packaged = _PACKAGE / "_data" / "benchmarks" / "results"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "benchmarks" / "results"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", extra="ignore")

    data_dir: Path = Field(default=Path("finetune-data"), description="Root of everything the engine writes.")
    model_store: Path | None = Field(default=None, description="Offline model store; default <data_dir>/models.")
    registry: Path = Field(default_factory=default_registry_path, description="The model registry YAML file.")
    benchmark_results: Path = Field(
        default_factory=default_results_path,
        description="Folder of throughput-*.json benchmark results, read by the estimator.",
    )
    model_lock: Path | None = Field(default=None, description="Pinned digests; default <model_store>/models.lock.json.")
    storage_url: str | None = Field(
        default=None, description="Where tenant buckets live: file:///path or s3://bucket; default <data_dir>/buckets."
    )
    quota_bytes: int = Field(default=10**12, ge=0, description="Storage quota per tenant and term, in bytes.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (any provider).")
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    @property
    def store_path(self) -> Path:
        return self.model_store if self.model_store is not None else self.data_dir / "models"

    @property
    def lock_path(self) -> Path:
        return self.model_lock if self.model_lock is not None else self.store_path / "models.lock.json"


def get_settings() -> Settings:
    return Settings()
