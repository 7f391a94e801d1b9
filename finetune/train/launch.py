"""Starting a job: everything checked before any work starts, then one process or Ray workers.

Before a worker starts: the recipe can run here (QLoRA needs CUDA; enough devices), the model is
in the store, the dataset is prepared, and the job's store holds its claim (the resolved recipe),
the data report and the prepared data (signed, for the workers to fetch). Starting the same
recipe into the same job store again resumes it; a different recipe or dataset there is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, Issue, RecipeError
from finetune.events import JobSummary
from finetune.files import dumps_json
from finetune.hashing import file_entry
from finetune.jobstore import CLAIM, DATA_REPORT, RECIPE, JobStore
from finetune.prepare import PreparedJob, prepare_job
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket
from finetune.train.checkpoint_files import recipe_digest
from finetune.train.spec import JobSpec

__all__ = ["JobFolderError", "check_environment", "launch", "plan_job", "stage_job"]

logger = logging.getLogger(__name__)


class JobFolderError(FinetuneError):
    """The job's store belongs to another recipe."""

    fault = "tenant"


def check_environment(recipe: Recipe, *, cuda: bool, devices: int, what: str = "this machine") -> None:
    """Refuse a recipe that cannot run where it is sent (every reason at once).

    Raises:
        RecipeError: QLoRA without CUDA, more GPUs than there are...
    """
    from finetune.validate import environment_issues

    if issues := environment_issues(recipe, cuda_available=cuda, devices=devices):
        raise RecipeError(issues, f"the recipe cannot run on {what}")


def _json_or_none(store: JobStore, rel: str) -> Any:
    try:
        return json.loads(store.bucket.read_bytes(rel))
    except (FileNotFoundError, ValueError, RecursionError):
        return None


def model_weights_digest(folder: Path, pinned: dict[str, Any] | None = None) -> str:
    """The sha256 over a model folder's weight files (name, size, sha256), from pinned digests when given."""
    entries = pinned or {p.name: file_entry(p) for p in sorted(folder.glob("*.safetensors"))}
    lines = [f"{name}\0{dict(e)['size']}\0{dict(e)['sha256']}\n" for name, e in sorted(entries.items())]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _identity(job: PreparedJob, registry: Registry) -> dict[str, Any]:
    """What the job's store is claimed for: the recipe, the dataset and the model's weights, by digest."""
    assert job.model.folder is not None
    entry = registry.get(job.recipe.model.id) if job.recipe.model.id else None
    pinned = (
        {n: d.model_dump() for n, d in entry.files.items()}
        if entry and entry.files and not job.recipe.model.tiny
        else None
    )
    return {
        "recipe_sha256": recipe_digest(job.recipe.model_dump(mode="json")),
        "dataset_sha256": job.report.dataset_sha256,
        "model": {"id": job.recipe.model.id, "weights_sha256": model_weights_digest(job.model.folder, pinned)},
    }


_DIFFERENCES = {
    "recipe_sha256": "the recipe",
    "dataset_sha256": "the dataset (its files' names, sizes or contents)",
    "model": "the model's weights",
}


def _claim(store: JobStore, job: PreparedJob, registry: Registry) -> None:
    """Claim the store for this recipe, dataset and model; a resume must match all three.

    Raises:
        JobFolderError: The store holds a job of another recipe, dataset or model (saying which).
    """
    resolved, identity = job.recipe.model_dump(mode="json"), _identity(job, registry)
    previous = _json_or_none(store, store.path(RECIPE))
    if previous is not None and previous != resolved:
        raise JobFolderError(
            f"{store.describe()} holds a job with a different recipe; choose another job folder (--output), "
            "or remove it to start over"
        )
    claimed = _json_or_none(store, store.path(CLAIM))
    if isinstance(claimed, dict):
        differ = [what for key, what in _DIFFERENCES.items() if claimed.get(key) != identity[key]]
        if differ:
            raise JobFolderError(
                f"{store.describe()} holds a job started on other input: {' and '.join(differ)} differ(s) from the "
                "job's; choose another job folder (--output), or remove it to start over"
            )
        return
    if previous is None:
        store.bucket.write_bytes(store.path(RECIPE), dumps_json(resolved, sort_keys=False).encode())
    store.bucket.write_bytes(store.path(CLAIM), dumps_json(identity).encode())


def stage_job(
    job: PreparedJob, store: JobStore, settings: Settings, *, registry: Registry, progress: bool = False
) -> JobSpec:
    """Claim the job's store, publish its data report and prepared data; the spec for the workers.

    Raises:
        JobFolderError: The store holds a job with another recipe, dataset or model.
        JobDataError: The store holds a job started on other data.
    """
    from finetune.train.data import publish_prepared

    if job.model.folder is None:
        raise FinetuneError("a job can only be staged with its real model in the store")
    _claim(store, job, registry)
    store.bucket.write_bytes(store.path(DATA_REPORT), dumps_json(job.report.as_dict(), sort_keys=False).encode())
    publish_prepared(job, store, settings.signer())
    return JobSpec(
        store=store.ref(),
        recipe=job.recipe.model_dump(mode="json"),
        model_dir=str(job.model.folder.resolve()),
        eot=job.model.eot,
        settings=settings.for_workers(),
        progress=progress,
    )


def plan_job(
    recipe: Recipe,
    bucket: Bucket,
    store: JobStore,
    settings: Settings,
    *,
    registry: Registry,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[JobSpec, PreparedJob]:
    """Check everything, prepare the data and stage the job: the spec for the workers, and the job.

    Args:
        recipe: A validated recipe.
        bucket: The tenant's bucket the recipe's paths are in.
        store: Where the job's outputs go.
        settings: Engine settings.
        registry: The model registry.
        workers: Workers (GPUs), overriding ``resources.gpus``.
        progress: Workers print progress lines.

    Raises:
        RecipeError: The recipe cannot run on this machine (with every reason).
        ModelStoreError: The model is not in the store.
        DataError: The dataset cannot be used as the recipe says.
        JobFolderError: The store holds a job with another recipe.
    """
    import torch

    if workers is not None:
        recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"gpus": workers})})
    cuda = torch.cuda.is_available()
    check_environment(recipe, cuda=cuda, devices=torch.cuda.device_count() if cuda else 0)
    job = prepare_job(recipe, bucket, settings, registry=registry)
    return stage_job(job, store, settings, registry=registry, progress=progress), job


def launch(spec: JobSpec, launcher: str, settings: Settings) -> JobSummary:
    """Run the job in this process (``local``) or on Ray workers, one per GPU (``ray``)."""
    gpus = spec.workers
    if launcher == "local":
        if gpus > 1:
            issue = Issue("resources.gpus", f"asks for {gpus} workers but --launcher local runs one")
            raise RecipeError([issue], "the local launcher runs one process; use --launcher ray for several workers")
        from finetune.train.run import run_job

        return run_job(spec)
    import torch

    cpus = os.cpu_count() or 1
    if not torch.cuda.is_available() and gpus > cpus and not settings.ray_address:
        issue = Issue("resources.gpus", f"asks for {gpus} workers but this machine has {cpus} CPU cores and no GPU")
        raise RecipeError([issue], "not enough devices: Ray would wait for them forever")
    from finetune.train.ray_launch import run_on_ray

    return run_on_ray(spec, settings)
