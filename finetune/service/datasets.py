"""Datasets in a tenant's bucket: uploaded through the API or put there with S3 tools, then checked.

A check reads every row (within the data limits) from a local copy, so that a file the tenant can
change under us is read once, hashed while it is copied, and never trusted further: the job later
prepares the data again from the bucket, digests compared.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from finetune.data.check import check_dataset
from finetune.errors import Issue
from finetune.paths import bucket_path_problem, normalise_bucket_path
from finetune.service.errors import ApiError
from finetune.service.ids import new_id
from finetune.service.models import Dataset
from finetune.service.scope import TenantScope
from finetune.storage import StorageError

DATASETS = "datasets"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def dataset_path(path: str, param: str = "path") -> str:
    """A dataset's bucket path, checked: inside the bucket, of a readable kind.

    Raises:
        ApiError: 422 naming the problem.
    """
    if problem := bucket_path_problem(path):
        raise ApiError(422, f"'{path}': {problem}", param=param, issues=[Issue(param, problem)])
    path = normalise_bucket_path(path)
    if not path.lower().endswith(SUFFIXES):
        message = f"'{path}' is not a dataset file: use one of {', '.join(SUFFIXES)}"
        raise ApiError(422, message, param=param, issues=[Issue(param, message)])
    if path.startswith("jobs/"):
        raise ApiError(422, "jobs/ holds the jobs' outputs; put datasets elsewhere (datasets/, say)", param=param)
    return path


def suffix(path: str) -> str:
    """The dataset kind's file suffix of ``path`` (a local copy keeps it: the readers go by it)."""
    return max((s for s in SUFFIXES if path.lower().endswith(s)), key=len)


def scratch(scope: TenantScope) -> Path:
    folder = scope.svc.engine.data_dir.resolve() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def record(scope: TenantScope, path: str, local: Path, sha256: str, size: int, *, commit: bool = True) -> Dataset:
    """Check the local copy of ``path`` and record the dataset (its check kept, good or bad)."""
    check = check_dataset(local, path, limits=scope.svc.engine.data_limits)
    row = scope.add(Dataset(
        id=new_id("dataset"), path=path, sha256=sha256, size=size, format=check.format, rows=check.rows,
        status="ok" if check.format is not None and check.rows > 0 else "refused",
        issues=[i.as_dict() for i in check.issues], summary=check.summary(),
    ))  # fmt: skip
    if commit:
        scope.session.commit()
    else:
        scope.session.flush()
    return row


def taken(scope: TenantScope, path: str) -> None:
    from finetune.service.models import Dataset as Row

    if scope.session.scalar(scope.datasets().where(Row.path == path)) is not None:
        raise ApiError(409, f"a dataset is registered at '{path}' already; delete it first", param="path",
                       code="conflict")  # fmt: skip


def register(scope: TenantScope, path: str) -> Dataset:
    """Check and record a file the tenant put in its bucket."""
    path = dataset_path(path)
    taken(scope, path)
    bucket = scope.bucket
    try:
        size = bucket.size(path)
    except (FileNotFoundError, StorageError):
        raise ApiError(422, f"'{path}' is not in your bucket", param="path",
                       issues=[Issue("path", f"'{path}' is not in your bucket")]) from None  # fmt: skip
    if bucket.isdir(path):
        raise ApiError(422, f"'{path}' is a folder; register its files one by one", param="path")
    with tempfile.TemporaryDirectory(dir=scratch(scope)) as tmp:
        local = Path(tmp) / Path(path).name
        digest = bucket.download(path, local, max_bytes=max(size, 0))
        return record(scope, path, local, digest, local.stat().st_size)
