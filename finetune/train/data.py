"""The prepared dataset of a job, published with the job so that every worker trains on the same rows.

The planner prepares the data once (a CPU step, before any GPU is held) and publishes the cache
entry (Arrow splits and the report) into the job's store as a signed folder; each worker fetches
it into its own scratch folder, digests checked, and reads it there. Workers on other nodes need
nothing but the bucket.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.cache import load_entry, save_entry
from finetune.errors import FinetuneError
from finetune.jobstore import DATA, JobStore
from finetune.prepare import PreparedJob
from finetune.published import FolderRefused, fetch_folder, publish_folder, read_marker
from finetune.signing import SigningKey, VerifyKey

KIND = "data"


class JobDataError(FinetuneError):
    """The job's store holds prepared data of another dataset, or none that can be trusted."""

    fault = "tenant"


@dataclass(frozen=True)
class TrainingRows:
    """What a worker trains on: the rows and the tokens of the training split."""

    train: Sequence[Any]
    eval: Sequence[Any]
    tokens: int


def publish_prepared(job: PreparedJob, store: JobStore, key: SigningKey) -> None:
    """Publish the job's prepared data into its store, unless this very data is there already.

    Raises:
        JobDataError: The store holds the prepared data of another dataset (or settings).
    """
    rel, cache_key = store.path(DATA), job.report.cache_key
    if store.bucket.exists(rel):
        try:
            published = read_marker(store.bucket, rel, KIND, key.public).get("cache_key")
        except FolderRefused:
            published = None  # cut off or altered: publish it again
        if published == cache_key and cache_key:
            return
        if published is not None:
            raise JobDataError(
                f"{store.describe()} holds a job started on other data (prepared data {published}, now {cache_key}): "
                "the dataset or its settings changed; choose another job folder, or remove it to start over"
            )
        from finetune.published import remove_folder

        remove_folder(store.bucket, rel)
    meta = {"job_id": store.job_id, "cache_key": cache_key}
    if job.cache_dir is not None and job.cache_dir.is_dir():
        publish_folder(store.bucket, job.cache_dir, rel, KIND, meta, key)
        return
    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:
        entry = save_entry(Path(tmp) / "entry", {"train": job.data.train, "eval": job.data.eval}, job.report.as_dict())
        publish_folder(store.bucket, entry, rel, KIND, meta, key)


def fetch_prepared(store: JobStore, key: VerifyKey, dest: Path, packed: bool) -> TrainingRows:
    """The job's prepared rows, fetched into ``dest`` with their digests checked.

    Raises:
        JobDataError: No trustworthy prepared data in the store (the job was not staged, or its
            data folder was altered).
    """
    from finetune.train.loop import as_rows

    rel = store.path(DATA)
    try:
        manifest = read_marker(store.bucket, rel, KIND, key)
        if dest.exists():
            shutil.rmtree(dest)
        fetch_folder(store.bucket, rel, manifest, dest)
    except FolderRefused as exc:
        raise JobDataError(f"the prepared data in {store.describe(DATA)} cannot be used: {exc}") from None
    loaded = load_entry(dest)
    if loaded is None:
        raise JobDataError(f"the prepared data in {store.describe(DATA)} has no report")
    splits, report = loaded
    train, held = as_rows(splits.get("train", []), packed), as_rows(splits.get("eval", []), packed)
    return TrainingRows(train, held, int(report.get("tokens_train", 0)))
