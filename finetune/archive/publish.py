"""A built archive, published into its job's store the way checkpoints and final models are.

The tar file and a signed manifest (``COMMITTED.json``: its size and sha256, the job, the step
of the weights) go to ``<job prefix>/archive/``; a download checks both before it is offered.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.jobstore import JobStore
from finetune.published import fetch_folder, publish_folder, read_marker, remove_folder
from finetune.signing import SigningKey, VerifyKey

ARCHIVE = "archive"
KIND = "archive"


def publish_archive(store: JobStore, archive: Path, key: SigningKey, meta: dict[str, Any]) -> dict[str, Any]:
    """Upload ``archive`` into the job's store (replacing an earlier one) with its signed manifest.

    Args:
        store: The job's store.
        archive: The built tar file.
        key: The platform key.
        meta: What to record with it (the job's step, the archive's name...).

    Returns:
        The manifest written.
    """
    rel = store.path(ARCHIVE)
    if store.bucket.exists(rel):
        remove_folder(store.bucket, rel)
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=archive.parent) as tmp:
        staged = Path(tmp) / archive.name
        shutil.copyfile(archive, staged)
        return publish_folder(store.bucket, Path(tmp), rel, KIND, {"job_id": store.job_id, **meta}, key, move=True)


def fetch_archive(store: JobStore, key: VerifyKey, dest: Path) -> Path:
    """Download the job's published archive into the folder ``dest``, its digest checked; its path.

    Raises:
        FolderRefused: No archive was published, or it does not match its signed manifest.
    """
    rel = store.path(ARCHIVE)
    manifest = read_marker(store.bucket, rel, KIND, key)
    fetch_folder(store.bucket, rel, manifest, dest)
    [name] = manifest["files"]
    return dest / name
