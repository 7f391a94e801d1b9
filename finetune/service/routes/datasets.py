"""Datasets: upload a file (streamed to the bucket), or register one already in the bucket; each
is checked (format, rows, every bad row located) and listed with its check."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from finetune.service.datasets import dataset_path, record, register, scratch, suffix, taken
from finetune.service.errors import ApiError, error_responses
from finetune.service.models import Dataset
from finetune.service.paging import After, Limit, page
from finetune.service.schemas import DatasetOut, Page, RegisterDataset
from finetune.service.scope import Tenancy, Uploading
from finetune.storage import QuotaExceededError

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(id=row.id, path=row.path, sha256=row.sha256, size=row.size, format=row.format, rows=row.rows,
                      status=row.status, issues=row.issues, summary=row.summary,
                      created_at=row.created_at)  # fmt: skip


def _created(row: Dataset) -> JSONResponse:
    return JSONResponse(dataset_out(row).model_dump(mode="json"), status_code=201,
                        headers={"Location": f"/v1/datasets/{row.id}"})  # fmt: skip


@router.put(
    "/upload",
    response_model=DatasetOut,
    status_code=201,
    summary="Upload a dataset file (the request body is the file)",
    responses=error_responses(409),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}},
)  # fmt: skip
async def upload_dataset(
    scope: Uploading,
    request: Request,
    path: Annotated[str, Query(max_length=1024, description="Where it goes in your bucket: datasets/train.jsonl")],
) -> JSONResponse:
    """The body is streamed to disk (never held in memory), hashed on the way, checked, then moved
    into your bucket. A body over the upload limit is refused (413) before it is read."""
    path = dataset_path(path)
    await run_in_threadpool(taken, scope, path)
    fd, name = tempfile.mkstemp(dir=scratch(scope), prefix="upload-", suffix=suffix(path))
    local = Path(name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if size == 0:
            raise ApiError(422, "the upload is empty: send the file as the request body", param="body")

        def store() -> Dataset:
            try:
                scope.bucket.check_quota(size)
            except QuotaExceededError as exc:
                raise ApiError(413, str(exc), code="quota_exceeded") from None
            row = record(scope, path, local, digest.hexdigest(), size, commit=False)
            scope.bucket.upload(local, path, move=True, check_quota=False)
            scope.session.commit()
            return row

        return _created(await run_in_threadpool(store))
    finally:
        local.unlink(missing_ok=True)


@router.post("", response_model=DatasetOut, status_code=201, summary="Register a file already in your bucket",
             responses=error_responses(409))  # fmt: skip
def register_dataset(scope: Tenancy, body: RegisterDataset) -> JSONResponse:
    return _created(register(scope, body.path))


@router.get("", response_model=Page[DatasetOut], summary="Your datasets, newest first")
def list_datasets(scope: Tenancy, after: After = None, limit: Limit = 20) -> Page[DatasetOut]:
    return page(scope.session, scope.datasets(), Dataset.id, after, limit, dataset_out)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset and its check")
def get_dataset(scope: Tenancy, dataset_id: str) -> DatasetOut:
    return dataset_out(scope.dataset(dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset and its file")
def delete_dataset(scope: Tenancy, dataset_id: str) -> Response:
    row = scope.dataset(dataset_id)
    scope.bucket.remove(row.path)
    scope.session.delete(row)
    scope.session.commit()
    return Response(status_code=204)
