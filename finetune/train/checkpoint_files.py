"""Checkpoints in the job's store: names, the signed commit, the newest trustworthy one, pruning.

This module knows nothing of torch or DeepSpeed; :mod:`finetune.train.checkpoint` writes the files
on each rank and calls the publication protocol of :mod:`finetune.published`.

Layout, under ``<job prefix>/checkpoints/``::

    step-000000123/                 one checkpoint; trusted only through its COMMITTED.json
        deepspeed/...               DeepSpeed's files (each rank uploads its own)
        rng/rank-00000.safetensors  each rank's RNG states
        trainer_state.json          the loop's state
        recipe.json                 the resolved recipe
        COMMITTED.json              written last, by rank 0, once every rank's upload is listed:
                                    kind "checkpoint", job id, the recipe's sha256, step, epoch,
                                    data position, world size, ZeRO stage, method, every file's
                                    size and sha256, and the platform's signature

Crash windows: while ranks upload, the folder has no manifest and is ignored; a manifest is
written only after every listed file is in the bucket with its size; a folder damaged or planted
afterwards fails the signature, the listing or a digest and is refused by name, and the previous
complete checkpoint is used. A rerun of the same step removes a leftover folder first.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from finetune.errors import FinetuneError
from finetune.jobstore import CHECKPOINTS, JobStore
from finetune.published import FolderRefused, read_marker, remove_folder
from finetune.signing import VerifyKey, canonical_json

logger = logging.getLogger(__name__)

KIND = "checkpoint"
STEP_PREFIX = "step-"
_STEP_NAME = re.compile(r"^step-(\d{9,})$")


class CheckpointError(FinetuneError):
    """A checkpoint could not be written, or cannot be resumed from (and why)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint and its verified manifest.

    Attributes:
        name: The folder's name (``step-000000123``).
        step: The optimizer step it was taken after.
        marker: The manifest (metadata, ``files``, signature).
    """

    name: str
    step: int
    marker: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.marker.get("world_size", 1))

    @property
    def zero_stage(self) -> int:
        return int(self.marker.get("zero_stage", 0))


def step_name(step: int) -> str:
    """The folder name of the checkpoint of ``step``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:09d}"


def checkpoint_path(store: JobStore, name: str) -> str:
    """The bucket-relative folder of a checkpoint."""
    return store.path(CHECKPOINTS, name)


def list_steps(store: JobStore) -> list[tuple[int, str]]:
    """``(step, name)`` of every ``step-*`` folder, committed or not, oldest first."""
    root = store.path(CHECKPOINTS)
    found = []
    for full in store.bucket.list(root):
        name = full.rsplit("/", 1)[-1]
        if match := _STEP_NAME.match(name):
            found.append((int(match.group(1)), name))
    return sorted(found)


def recipe_digest(recipe_json: dict[str, Any]) -> str:
    """The sha256 of a resolved recipe, as a checkpoint's manifest records it."""
    return hashlib.sha256(canonical_json(recipe_json)).hexdigest()


def check_checkpoint(store: JobStore, name: str, key: VerifyKey, recipe: str | None = None) -> CheckpointInfo:
    """The checkpoint ``name`` after checking its manifest: signature, step, files listed, recipe.

    Args:
        store: The job's store.
        name: The checkpoint's folder name.
        key: The platform's public key.
        recipe: When given, the digest of the recipe the checkpoint must have been written under
            (:func:`recipe_digest`): a job resumes only from its own recipe's checkpoints.

    Raises:
        FolderRefused: Why it cannot be trusted.
    """
    marker = read_marker(store.bucket, checkpoint_path(store, name), KIND, key)
    if recipe is not None and marker.get("recipe_sha256") != recipe:
        raise FolderRefused("it was written under another recipe than this job's")
    step = marker.get("step")
    match = _STEP_NAME.match(name)
    if isinstance(step, bool) or not isinstance(step, int) or match is None or int(match.group(1)) != step:
        raise FolderRefused(f"its manifest says step {step!r}, its name says {name}")
    return CheckpointInfo(name=name, step=step, marker=marker)


def trusted(store: JobStore, key: VerifyKey) -> list[CheckpointInfo]:
    """Every checkpoint whose manifest checks out, oldest first."""
    found = []
    for _step, name in list_steps(store):
        try:
            found.append(check_checkpoint(store, name, key))
        except FolderRefused:
            continue
    return found


def find_latest(
    store: JobStore, key: VerifyKey, *, recipe: str | None = None, passed_over: tuple[str, ...] = ()
) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest checkpoint whose manifest checks out, and every newer one refused (``"NAME: why"``).

    Args:
        store: The job's store.
        key: The platform's public key.
        recipe: The digest of the job's recipe (see :func:`check_checkpoint`).
        passed_over: Names already refused by the caller (a digest failed while fetching).
    """
    refused: list[str] = []
    for _step, name in reversed(list_steps(store)):
        if name in passed_over:
            continue
        try:
            return check_checkpoint(store, name, key, recipe), refused
        except FolderRefused as exc:
            logger.warning("ignoring checkpoint %s: %s", name, exc)
            refused.append(f"{name}: {exc}")
    return None, refused


def prune(store: JobStore, keep: int, key: VerifyKey) -> list[str]:
    """Keep the ``keep`` newest trustworthy checkpoints; remove older ones and every untrusted one.

    Call it only after a checkpoint has been committed, never while one is being uploaded.
    Folders without a valid manifest (uploads cut off, hand-made folders) are removed; the newest
    trustworthy checkpoint never is.

    Returns:
        The names removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    doomed, complete = [], 0
    for _step, name in reversed(list_steps(store)):
        try:
            check_checkpoint(store, name, key)
        except FolderRefused as exc:
            logger.warning("removing checkpoint %s: %s", name, exc)
            doomed.append(name)
            continue
        complete += 1
        if complete > keep:
            doomed.append(name)
    for name in sorted(doomed):
        remove_folder(store.bucket, checkpoint_path(store, name))
    if doomed:
        logger.info("pruned %d checkpoint folder(s) of %s", len(doomed), store.describe())
    return sorted(doomed)
