"""What a worker is handed: a job spec, plain data that travels to Ray workers on any node.

It names the job's store (bucket reference, prefix, job id), the resolved recipe, the model
folder and the settings the workers share (paths made absolute). Secrets never travel in it:
each process reads the signing key and the storage credentials from its own environment.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune.jobstore import JobStoreRef
from finetune.settings import Settings


class JobSpec(BaseModel):
    """Everything a worker needs to run its share of a prepared job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: JobStoreRef
    recipe: dict[str, Any]
    model_dir: str
    eot: str | None = None
    settings: dict[str, Any]
    progress: bool = False

    @property
    def job_id(self) -> str:
        return self.store.job_id

    @property
    def workers(self) -> int:
        return int(self.recipe["resources"]["gpus"])

    def open_settings(self) -> Settings:
        """The settings in this process: the spec's, with secrets from this process's environment."""
        return Settings(**self.settings)
