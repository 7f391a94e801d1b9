"""A job as the service hands it to the cluster: one Ray job per attempt, whose driver prepares the
data (a CPU step: no GPU is held yet), then runs the engine's Ray Train job, then packages and
publishes the model archive.

The driver's input travels in the Ray job's environment (:data:`ENV`), never through the tenant's
bucket: a tenant can write there, and what a driver runs with must come from the service. Secrets
never travel in it; each process reads them from its own environment.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune.errors import FinetuneError, IssuesError, fault_of
from finetune.events import ErrorInfo, EventLog, FailureEvent, JobSummary
from finetune.jobstore import JobStore, JobStoreRef
from finetune.settings import Settings

logger = logging.getLogger(__name__)

ENV = "FINETUNE_CLUSTER_JOB"
EXIT_OK, EXIT_FAIL, EXIT_TENANT, EXIT_PREEMPTED = 0, 1, 2, 75


class ClusterJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    attempt: int
    store: JobStoreRef
    recipe: dict[str, Any]
    settings: dict[str, Any]


def error_info(exc: BaseException) -> ErrorInfo:
    """An exception as the failure a job records: its type, message, whose fault, located issues."""
    from finetune.train.ray_launch import JobFailed

    if isinstance(exc, JobFailed):
        return exc.error
    issues = [i.as_dict() for i in exc.issues] if isinstance(exc, IssuesError) else []
    message = str(exc) or type(exc).__name__
    hint = getattr(exc, "hint", None)
    return ErrorInfo(type=type(exc).__name__, message=message[:4000], fault=fault_of(exc),
                     hint=hint if isinstance(hint, str) else None, issues=issues)  # fmt: skip


def _record_failure(store: JobStore, settings: Settings, exc: BaseException) -> None:
    log = EventLog(store.bucket, store.prefix, flush_seconds=settings.events_flush_seconds)
    log.emit(FailureEvent(step=0, error=error_info(exc)))
    log.flush(raise_errors=True)


def run_cluster_job(job: ClusterJob, *, loop_per_worker: Any) -> int:
    """Prepare, train and package one attempt of a job; the driver's exit code.

    0: finished, archive published. 75: stopped after a checkpoint (the next attempt resumes).
    2: the tenant's to fix (recorded as a failure event with every located issue). 1: anything else.
    """
    from finetune.prepare import prepare_job
    from finetune.recipe import Recipe
    from finetune.registry import Registry
    from finetune.train.launch import stage_job
    from finetune.train.ray_launch import JobFailed, run_on_ray

    settings = Settings(**job.settings)
    store = JobStore.open(job.store, settings)
    try:
        recipe = Recipe.model_validate(job.recipe)
        registry = Registry.load(settings.registry, settings.lock_path)
        prepared = prepare_job(recipe, store.bucket, settings, registry=registry)
        spec = stage_job(prepared, store, settings, registry=registry)
    except Exception as exc:  # the data or the recipe refused before any GPU is held
        logger.exception("job %s could not be prepared", job.job_id)
        _record_failure(store, settings, exc)
        return EXIT_TENANT if fault_of(exc) == "tenant" else EXIT_FAIL
    try:
        summary = run_on_ray(spec, settings, loop_per_worker=loop_per_worker)
    except JobFailed as exc:  # the workers recorded it
        return EXIT_TENANT if exc.fault == "tenant" else EXIT_FAIL
    except Exception as exc:
        logger.exception("job %s failed on the cluster", job.job_id)
        _record_failure(store, settings, exc)
        return EXIT_TENANT if fault_of(exc) == "tenant" else EXIT_FAIL
    if summary.preempted:
        return EXIT_PREEMPTED
    try:
        publish(store, settings, registry, summary)
    except Exception as exc:
        logger.exception("job %s trained but its archive could not be made", job.job_id)
        _record_failure(store, settings, exc)
        return EXIT_TENANT if fault_of(exc) == "tenant" else EXIT_FAIL
    return EXIT_OK


def publish(store: JobStore, settings: Settings, registry: Any, summary: JobSummary) -> None:
    """Build the job's model archive from its final model and publish it into the job's store."""
    from finetune.archive import build_archive, publish_archive

    scratch = settings.scratch_path / store.job_id
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="archive-", dir=scratch) as tmp:
        out = Path(tmp) / f"{store.job_id}.tar"
        result = build_archive(store, out, registry=registry, settings=settings)
        if not result.path.is_file():
            raise FinetuneError("the archive was not written")
        publish_archive(store, result.path, settings.signer(), {"name": result.manifest["name"], "step": summary.steps})
