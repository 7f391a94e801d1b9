"""Jobs: create (YAML or JSON, idempotent with a key), list, get, cancel, clone; their checkpoints,
data report and model archive (streamed, with HTTP Range)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from finetune.service.errors import ApiError, error_responses
from finetune.service.history import transition
from finetune.service.jobs import clone_text, create_job, job_out, queue_position
from finetune.service.models import FINAL_STATES, Checkpoint, Job, utcnow
from finetune.service.paging import After, Limit, page
from finetune.service.routes.catalog import RECIPE_BODY
from finetune.service.schemas import CheckpointOut, CloneJob, JobOut, Page
from finetune.service.scope import Tenancy

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_KEY_HELP = "A retried create with the same key returns the job made the first time."
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, description=_KEY_HELP)]
JOB_PREFIX = "jobs"
CHUNK = 1024 * 1024


def job_prefix(job_id: str) -> str:
    """The job's folder in the tenant's bucket."""
    return f"{JOB_PREFIX}/{job_id}"


def _created(job: Job, fresh: bool, scope: Tenancy) -> JSONResponse:
    body = job_out(job, position=queue_position(scope.session, job)).model_dump(mode="json")
    headers = {"Location": f"/v1/jobs/{job.id}"} | ({} if fresh else {"Idempotent-Replayed": "true"})
    return JSONResponse(body, status_code=201 if fresh else 200, headers=headers)


@router.post("", response_model=JobOut, status_code=201, summary="Submit a recipe as a new job",
             responses=error_responses(409))  # fmt: skip
def submit_job(scope: Tenancy, body: Annotated[str, RECIPE_BODY], key: IdempotencyKey = None) -> JSONResponse:
    job, fresh = create_job(scope, body, idempotency_key=key)
    return _created(job, fresh, scope)


@router.get("", response_model=Page[JobOut], summary="Your jobs, newest first")
def list_jobs(scope: Tenancy, after: After = None, limit: Limit = 20, state: str | None = None) -> Page[JobOut]:
    query = scope.jobs()
    if state is not None:
        query = query.where(Job.state == state)
    return page(
        scope.session, query, Job.id, after, limit, lambda j: job_out(j, position=queue_position(scope.session, j))
    )


@router.get("/{job_id}", response_model=JobOut, summary="One job")
def get_job(scope: Tenancy, job_id: str) -> JobOut:
    job = scope.job(job_id)
    return job_out(job, position=queue_position(scope.session, job))


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202, summary="Stop a job, keeping its checkpoints",
             responses=error_responses(409))  # fmt: skip
def cancel_job(scope: Tenancy, job_id: str) -> JobOut:
    job = scope.job(job_id, lock=True)
    if job.state in FINAL_STATES:
        raise ApiError(409, f"the job has {job.state} already", code="job_finished")
    if job.cancel_requested_at is None:
        job.cancel_requested_at = utcnow()
        scope.session.flush()
    if job.state == "queued":  # nothing runs yet: cancelled at once
        transition(scope.session, job, "cancelled", reason="cancelled")
    scope.session.commit()
    if scope.svc.dispatcher is not None:
        scope.svc.dispatcher.wake()
    return job_out(job)


@router.post(
    "/{job_id}/clone",
    response_model=JobOut,
    status_code=201,
    summary="A new job from this one's recipe, changed",
    responses=error_responses(409),
)
def clone_job(scope: Tenancy, job_id: str, body: CloneJob, key: IdempotencyKey = None) -> JSONResponse:
    source = scope.job(job_id)
    job, fresh = create_job(scope, clone_text(source, body.changes), idempotency_key=key, cloned_from=source.id)
    return _created(job, fresh, scope)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut], summary="The job's committed checkpoints")
def list_checkpoints(scope: Tenancy, job_id: str) -> list[CheckpointOut]:
    job = scope.job(job_id)
    rows = scope.session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step))
    return [
        CheckpointOut(step=c.step, name=c.name, files=c.files, bytes=c.bytes, created_at=c.created_at) for c in rows
    ]


@router.get("/{job_id}/data-report", summary="The data report of the job's dataset (ready once validated)")
def get_data_report(scope: Tenancy, job_id: str) -> dict[str, Any]:
    from finetune.jobstore import DATA_REPORT

    job = scope.job(job_id)
    rel = f"{job_prefix(job.id)}/{DATA_REPORT}"
    try:
        size = scope.bucket.size(rel)
        if size > 64 * 1024 * 1024:
            raise ApiError(500, "the data report is larger than a report can be")
        report = json.loads(scope.bucket.read_bytes(rel))
    except FileNotFoundError:
        raise ApiError(404, "the job has no data report yet: it is written while the job validates",
                       code="not_ready") from None  # fmt: skip
    except ValueError:
        raise ApiError(500, "the job's data report cannot be read") from None
    if not isinstance(report, dict):
        raise ApiError(500, "the job's data report cannot be read")
    return report


def _archive(scope: Tenancy, job: Job) -> tuple[str, str, int]:
    """The published archive's bucket path, file name and size, its signed manifest checked."""
    from finetune.archive.publish import ARCHIVE, KIND
    from finetune.published import FolderRefused, read_marker

    rel = f"{job_prefix(job.id)}/{ARCHIVE}"
    try:
        manifest = read_marker(scope.bucket, rel, KIND, scope.svc.engine.signer().public)
    except FolderRefused as exc:
        raise ApiError(404, f"the job has no archive to download: {exc}", code="not_ready") from None
    [(name, entry)] = manifest["files"].items()
    return f"{rel}/{name}", name, int(entry["size"])


def _ranges(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for (inclusive ends), None for the whole file.

    Raises:
        ApiError: 416 for a range outside the file or several ranges.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ApiError(416, "one range of bytes can be asked for ('Range: bytes=START-END')",
                       headers={"Content-Range": f"bytes */{size}"})  # fmt: skip
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        raise ApiError(
            416, "the Range header is not a byte range", headers={"Content-Range": f"bytes */{size}"}
        ) from None
    end = min(end, size - 1)
    if start > end or start >= size:
        raise ApiError(416, "the range is outside the file", headers={"Content-Range": f"bytes */{size}"})
    return start, end


_TAR: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/x-tar": {}}},
    206: {"description": "Part of the archive"},
    **error_responses(416),
}


@router.get("/{job_id}/archive", summary="Download the model archive (HTTP Range supported)",
            response_class=StreamingResponse, responses=_TAR)  # fmt: skip
def download_archive(scope: Tenancy, job_id: str, request: Request) -> Response:
    job = scope.job(job_id)
    rel, name, size = _archive(scope, job)
    wanted = _ranges(request.headers.get("range"), size)
    start, end = wanted or (0, size - 1)
    bucket = scope.bucket

    def body() -> Iterator[bytes]:
        with bucket.open(rel) as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1),
               "Content-Disposition": f'attachment; filename="{name}"'}  # fmt: skip
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    media = "application/zstd" if name.endswith(".zst") else "application/x-tar"
    return StreamingResponse(body(), status_code=206 if wanted else 200, headers=headers, media_type=media)
