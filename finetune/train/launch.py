"""Starting a job: everything checked before any work starts, then one process or Ray workers.

Before a worker starts: the recipe is valid, the method can run here (QLoRA needs CUDA), there
are enough devices, the model is in the store, and the dataset is prepared (and cached, so each
worker loads the same rows). The job folder holds the resolved recipe, the data report,
``metrics.jsonl``, ``checkpoints/`` and ``final/``. Running the same recipe into the same job
folder again resumes it; a different recipe there is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, Issue, RecipeError
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.train.run import JobSpec

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"


class JobFolderError(FinetuneError):
    """The job folder belongs to another recipe."""


def _claim_job_dir(job_dir: Path, recipe: Recipe) -> None:
    resolved = recipe.model_dump(mode="json")
    path = job_dir / RECIPE_FILE
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != resolved:
            raise JobFolderError(
                f"{job_dir} holds a job with a different recipe; choose another --output, or remove it to start over"
            )
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plan_job(
    recipe_path: Path,
    settings: Settings,
    *,
    registry: Registry,
    output: Path | None = None,
    bucket_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[JobSpec, dict[str, Any]]:
    """Check everything, prepare the data, and return the job spec and the data report.

    Raises:
        RecipeError: the recipe is invalid, or cannot run on this machine (with every reason).
        ModelStoreError: the model is not in the store.
        DataError: the dataset cannot be used as the recipe says.
    """
    import torch

    from finetune.data.pipeline import prepare
    from finetune.loading import load_tokenizer, model_folder
    from finetune.storage import Bucket
    from finetune.validate import environment_issues, load_recipe

    recipe = load_recipe(recipe_path, registry)
    if workers is not None:
        recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"gpus": workers})})
    cuda = torch.cuda.is_available()
    issues = environment_issues(recipe, cuda_available=cuda, devices=torch.cuda.device_count() if cuda else 0)
    if issues:
        raise RecipeError(issues, f"{recipe_path} cannot run on this machine")
    bucket = Bucket.folder(bucket_dir or recipe_path.parent)
    model_dir = model_folder(recipe, registry, settings.store_path, bucket)
    job_dir = output or settings.data_dir / "jobs" / (recipe.name or recipe_path.stem)
    _claim_job_dir(job_dir, recipe)
    entry = registry.get(recipe.model.id) if recipe.model.id else None
    eot = entry.chat.eot if entry is not None and entry.chat is not None else None
    cache_dir = settings.data_dir / "cache" / "data"
    prepared = prepare(recipe, bucket, load_tokenizer(model_dir), model_dir=model_dir, eot=eot, cache_dir=cache_dir)
    report = prepared.report.as_dict()
    (job_dir / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    spec = JobSpec(
        recipe=recipe.model_dump(mode="json"),
        job_dir=str(job_dir.resolve()),
        model_dir=str(model_dir.resolve()),
        bucket_dir=str(Path(bucket.root).resolve()),
        cache_dir=str(cache_dir.resolve()),
        eot=eot,
        progress=progress,
    )
    return spec, report


def launch(spec: JobSpec, launcher: str) -> dict[str, Any]:
    """Run the job in this process (``local``) or on Ray workers, one per GPU (``ray``)."""
    gpus = int(spec.recipe["resources"]["gpus"])
    if launcher == "local":
        if gpus > 1:
            issue = Issue("resources.gpus", f"asks for {gpus} workers but --launcher local runs one")
            raise RecipeError([issue], "the local launcher runs one process; use --launcher ray for several workers")
        from finetune.train.run import run_job

        return run_job(spec)
    import torch

    cpus = os.cpu_count() or 1
    if not torch.cuda.is_available() and gpus > cpus and not os.environ.get("RAY_ADDRESS"):
        issue = Issue("resources.gpus", f"asks for {gpus} workers but this machine has {cpus} CPU cores and no GPU")
        raise RecipeError([issue], "not enough devices: Ray would wait for them forever")
    from workers.train import run_with_ray

    return run_with_ray(spec, num_workers=gpus)
