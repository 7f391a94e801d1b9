"""A prepared job on Ray Train: one worker per GPU, each running :func:`finetune.train.run.run_job`.

Ray Train's ``TorchTrainer`` starts the workers and their process group; DeepSpeed runs inside
each worker. When a worker dies, Ray restarts the group (up to ``ray_max_failures`` times) and the
job resumes from the newest trustworthy checkpoint in its store. Ray's own bookkeeping stays in
the driver's scratch folder: the job keeps nothing of its own there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from finetune.errors import FinetuneError
from finetune.events import ErrorInfo, JobSummary, read_events
from finetune.jobstore import JobStore
from finetune.settings import Settings
from finetune.train.spec import JobSpec

__all__ = ["JobFailed", "run_on_ray", "train_worker"]

logger = logging.getLogger(__name__)


class JobFailed(FinetuneError):
    """The job's workers failed; the error they recorded, and whose move it is."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.type}: {error.message}")
        self.error = error
        self.fault = error.fault


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: this worker's share of the job (its record is the job's events)."""
    from finetune.train.run import run_job

    run_job(JobSpec.model_validate(config))


def connect(settings: Settings) -> None:
    """Join the Ray cluster of the settings, or start a private local one (once per process)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
    # no address: a private local cluster, never one that happens to run on this machine
    ray.init(address=settings.ray_address or "local", include_dashboard=False, log_to_driver=True)


def run_on_ray(
    spec: JobSpec, settings: Settings, *, loop_per_worker: Callable[[dict[str, Any]], None] = train_worker
) -> JobSummary:
    """Run the job on ``spec.workers`` Ray workers (GPUs when CUDA is present) and wait for it.

    Returns:
        The summary of the job's ``end`` event, which rank 0 publishes in the job's store.

    Raises:
        JobFailed: The workers failed (after Ray's restarts): the last ``failure`` event they
            recorded, with whose move it is (a tenant's data error stays the tenant's, though Ray
            reports every worker failure as its own).
        FinetuneError: The job ended without an ``end`` event.
    """
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(settings)
    store = JobStore.open(spec.store, settings)
    before = max((e.seq for e in read_events(store.bucket, store.prefix)), default=0)
    storage = settings.scratch_path / "ray" / spec.job_id
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(
            name=spec.job_id,
            storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=settings.ray_max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        if (failed := recorded_failure(store, after=before)) is not None:
            raise failed from exc
        raise
    return recorded_summary(store, after=before)


def recorded_failure(store: JobStore, *, after: int) -> JobFailed | None:
    """The last failure the job's workers recorded after event ``after``, as an error; None if none."""
    failures = [e for e in read_events(store.bucket, store.prefix, after=after) if e.kind == "failure"]
    return JobFailed(failures[-1].error) if failures else None


def recorded_summary(store: JobStore, *, after: int) -> JobSummary:
    """The summary of the job's last ``end`` event after event ``after``.

    Raises:
        FinetuneError: The job recorded no end.
    """
    ends = [e for e in read_events(store.bucket, store.prefix, after=after) if e.kind == "end"]
    if not ends:
        raise FinetuneError(f"the job ended without recording its end in {store.describe('events')}")
    return ends[-1].summary
