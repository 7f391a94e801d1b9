"""Where a job's outputs live: a prefix in the tenant's bucket (or a local job folder).

Layout under the prefix (DESIGN.md, "Bucket layout")::

    recipe.json          the resolved recipe the job was started with
    claim.json           the digests of the recipe, the dataset and the model's weights it was started with
    data_report.json     the data report of its dataset
    data/                the prepared dataset the workers train on (signed folder)
    events/              the job's typed events, in segments (finetune.events)
    checkpoints/step-N/  committed checkpoints (signed folders)
    final/               the trained model (signed folder)

A local run uses a plain folder as the bucket and the empty prefix: the job folder itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from finetune.published import join
from finetune.settings import Settings
from finetune.storage import Bucket, BucketRef

RECIPE = "recipe.json"
CLAIM = "claim.json"
DATA_REPORT = "data_report.json"
DATA = "data"
CHECKPOINTS = "checkpoints"
FINAL = "final"


class JobStoreRef(BaseModel):
    """A job store as plain data (it travels to the workers in the job spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: BucketRef
    prefix: str
    job_id: str


@dataclass(frozen=True)
class JobStore:
    """One job's prefix in a bucket, and the job's id (bound into every manifest it signs)."""

    bucket: Bucket
    prefix: str
    job_id: str

    @classmethod
    def folder(cls, path: Path) -> JobStore:
        """A local job folder acting as the job's store (the command line's ``--output``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(Bucket.folder(path), "", path.resolve().name)

    @classmethod
    def open(cls, ref: JobStoreRef, settings: Settings) -> JobStore:
        return cls(Bucket.from_ref(ref.bucket, settings), ref.prefix, ref.job_id)

    def ref(self) -> JobStoreRef:
        return JobStoreRef(bucket=self.bucket.ref(), prefix=self.prefix, job_id=self.job_id)

    def path(self, *parts: str) -> str:
        """A name under the job's prefix."""
        return join(self.prefix, *parts)

    def describe(self, *parts: str) -> str:
        """Where a part of the job is, for people: a local path or the bucket and key."""
        return f"{self.bucket.root}/{self.path(*parts)}".rstrip("/")
