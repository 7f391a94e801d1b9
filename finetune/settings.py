"""Engine settings, from ``FINETUNE_*`` environment variables, with embedded defaults.

Embedded defaults keep everything under one data directory in the working folder, so a fresh
checkout runs with no server to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune.data.limits import DataLimits
from finetune.limits import Limits

if TYPE_CHECKING:
    from finetune.signing import SigningKey

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
    model_config = SettingsConfigDict(
        env_prefix="FINETUNE_", extra="ignore", populate_by_name=True, env_nested_delimiter="__"
    )

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
    signing_key: SecretStr | None = Field(
        default=None,
        description="The platform's Ed25519 signing key (base64 of its 32-byte seed); signs checkpoints, final "
        "models and archives. Default: a key file under <data_dir>/keys, made on first use.",
    )
    signing_key_file: Path | None = Field(default=None, description="Key file; default <data_dir>/keys/signing.key.")
    scratch_dir: Path | None = Field(
        default=None,
        description="Node-local scratch of the workers (checkpoints before upload); default <data_dir>/scratch.",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("FINETUNE_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Address of an existing Ray cluster; default: a private local one.",
    )
    ray_max_failures: int = Field(default=2, ge=0, description="Worker-group restarts Ray Train may make in one job.")
    recipe_limits: Limits = Field(
        default_factory=Limits,
        description="Bounds on a recipe (file size, nesting, aliases, integer digits, errors listed); "
        "e.g. FINETUNE_RECIPE_LIMITS__MAX_DEPTH.",
    )
    data_limits: DataLimits = Field(
        default_factory=DataLimits,
        description="Bounds on reading a dataset (bytes per row, inflation, JSON depth, .json size); "
        "e.g. FINETUNE_DATA_LIMITS__ROW_BYTES.",
    )
    events_flush_seconds: float = Field(
        default=10.0, gt=0, description="Longest wait before a job's step events are published to its bucket."
    )

    @property
    def store_path(self) -> Path:
        return self.model_store if self.model_store is not None else self.data_dir / "models"

    @property
    def scratch_path(self) -> Path:
        return self.scratch_dir if self.scratch_dir is not None else self.data_dir / "scratch"

    @property
    def data_cache_path(self) -> Path:
        """Prepared datasets, by content (finetune.data.cache)."""
        return self.data_dir / "cache" / "data"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file if self.signing_key_file is not None else self.data_dir / "keys" / "signing.key"

    def signer(self) -> SigningKey:
        """The platform's signing key (made on first use under the data folder on embedded defaults)."""
        from finetune.signing import load_signing_key

        seed = self.signing_key.get_secret_value() if self.signing_key else None
        return load_signing_key(seed, self.signing_key_path)

    def for_workers(self) -> dict[str, Any]:
        """These settings for processes elsewhere: paths made absolute, secrets left out (each
        process reads those from its own environment)."""
        data = self.model_dump(exclude={"signing_key", "s3_secret_access_key", "s3_access_key_id"})
        paths = {"data_dir": self.data_dir, "model_store": self.store_path, "registry": self.registry,
                 "benchmark_results": self.benchmark_results, "model_lock": self.lock_path,
                 "signing_key_file": self.signing_key_path, "scratch_dir": self.scratch_path}  # fmt: skip
        data.update({key: str(Path(value).resolve()) for key, value in paths.items()})
        return data

    @property
    def lock_path(self) -> Path:
        return self.model_lock if self.model_lock is not None else self.store_path / "models.lock.json"


def get_settings() -> Settings:
    return Settings()
