"""One job preparation from objects: a validated recipe and the tenant's bucket in, the job out.

``finetune train``, ``finetune estimate``, ``finetune data inspect`` and the job service all start
here, so they agree on the model, the tokenizer, the data and the plan. Nothing here knows about
recipe files: the command line loads those, the service receives recipes in requests.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.pipeline import PreparedData, prepare
from finetune.data.report import DataReport
from finetune.loading import ModelSource, model_source
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket
from finetune.train.plan import Plan, plan_for

__all__ = ["PreparedJob", "prepare_job"]


@dataclass
class PreparedJob:
    """A recipe made ready to run: its model, its prepared data, the plan of its steps.

    Attributes:
        recipe: The validated recipe.
        bucket: The tenant's bucket its paths are read from.
        model: The model's folder, config and tokenizer.
        data: The prepared rows and the data report.
        train_rows: Training rows (packed, or samples), as the loop takes them.
        eval_rows: Evaluation rows.
        plan: The optimizer steps over the training rows, for ``recipe.resources.gpus`` workers.
        cache_dir: The cache entry of the prepared data, when it was cached.
    """

    recipe: Recipe
    bucket: Bucket
    model: ModelSource
    data: PreparedData
    train_rows: Sequence[Any]
    eval_rows: Sequence[Any]
    plan: Plan
    cache_dir: Path | None

    @property
    def report(self) -> DataReport:
        return self.data.report


def prepare_job(
    recipe: Recipe,
    bucket: Bucket,
    settings: Settings,
    *,
    registry: Registry,
    workers: int = 1,
    use_cache: bool = True,
    stand_in: bool = False,
) -> PreparedJob:
    """Resolve the model, prepare the dataset (from the cache when nothing changed) and plan the steps.

    Args:
        recipe: A validated recipe.
        bucket: The tenant's bucket (the recipe's paths are inside it).
        settings: Engine settings (model store, data cache).
        registry: The model registry.
        workers: Tokenising processes.
        use_cache: Read and write the prepared-data cache.
        stand_in: Accept a registry model missing from the store, with its registry config and a
            stand-in tokenizer (the estimator; never for training).

    Raises:
        ModelStoreError: The model is not in the store (with the command that puts it there).
        DataError: The dataset cannot be used as the recipe says (every problem located).
    """
    from finetune.reviews import reviews_dir
    from finetune.train.loop import as_rows

    model = model_source(
        recipe, registry, settings.store_path, bucket, stand_in=stand_in, reviews=reviews_dir(settings.data_dir)
    )
    cache = settings.data_cache_path if use_cache and model.folder is not None else None
    settings.scratch_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dataset-", dir=settings.scratch_path) as scratch:  # remote buckets
        data = prepare(
            recipe, bucket, model.tokenizer, model_dir=model.folder, eot=model.eot, cache_dir=cache,
            scratch=Path(scratch), workers=workers, limits=settings.data_limits,
        )  # fmt: skip
    packed = recipe.data.packing
    train_rows, eval_rows = as_rows(data.train, packed), as_rows(data.eval, packed)
    plan = plan_for(recipe, rows=len(train_rows), tokens=data.report.tokens_train, world_size=recipe.resources.gpus)
    entry = cache / data.report.cache_key if cache is not None and data.report.cache_key else None
    return PreparedJob(recipe, bucket, model, data, train_rows, eval_rows, plan, entry)
