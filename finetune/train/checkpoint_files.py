"""Checkpoint folders on disk: layout, commit marker, verification, choice of the newest, pruning.

This module knows nothing of torch or DeepSpeed; :mod:`finetune.train.checkpoint` fills a
temporary folder and calls :func:`write_committed`.

Layout, under ``<job>/checkpoints/``::

    .tmp-step-000000123-<token>/   being written (or left behind by a crash): never read
    step-000000123/                committed: holds COMMITTED.json, written last
        COMMITTED.json             format version, step, epoch, data position, world size,
                                   ZeRO stage, method, time, and ``files``: every other file's
                                   relative path, size and sha256 (the shape of the manifest in
                                   :meth:`finetune.storage.Bucket.publish_folder`)

Commit protocol (:func:`write_committed`):

1. every file is written into the temporary folder (DeepSpeed's files, RNG states, trainer
   state, recipe) and each one is fsynced while its digest is taken;
2. the marker is written inside the temporary folder, atomically (``.COMMITTED.json.part``,
   fsync, ``os.replace``), then the folder itself is fsynced;
3. the temporary folder is renamed to ``step-<n>`` (atomic on POSIX) and the parent is fsynced.

Crash windows: during 1 or 2 only a ``.tmp-*`` folder exists, which is never read and is
removed by the next :func:`prune`. Between 2 and 3 the ``.tmp-*`` folder holds a complete
marker but is still ignored (the name decides; no salvage). During 3 the rename either
happened or not; after a power loss before the parent's fsync it may be undone, which is the
previous case. So a ``step-*`` folder exists only once everything in it is on disk, and a
``step-*`` folder without a valid marker (hand-made, truncated copy) is ignored and removed by
:func:`prune`. Readers still verify sizes and digests against the marker before trusting a
checkpoint (:func:`verify`), so a file damaged or replaced afterwards is caught too.

Removal is atomic as well: :func:`prune` first renames a folder to ``.tmp-rm-*`` and then deletes
it, so a half-deleted checkpoint never appears under a ``step-*`` name.

Publishing a committed folder with ``Bucket.publish_folder`` copies ``COMMITTED.json`` as an
ordinary file and adds the bucket's own marker (``.published.json``, same ``files`` shape);
:func:`verify` tolerates that extra marker, so a downloaded published checkpoint verifies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.errors import FinetuneError
from finetune.hashing import sha256_file
from finetune.storage import MARKER as BUCKET_MARKER

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
_STEP_NAME = re.compile(r"^step-(\d{9,})$")
_RESERVED = ("format_version", "files", "committed_at")


class CheckpointError(FinetuneError):
    """A checkpoint could not be written, or cannot be resumed from (and why)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint folder and its marker.

    Attributes:
        path: The ``step-<n>`` folder.
        step: The optimizer step it was taken after.
        marker: The parsed ``COMMITTED.json`` (metadata and ``files`` manifest).
    """

    path: Path
    step: int
    marker: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.marker.get("world_size", 1))

    @property
    def zero_stage(self) -> int:
        return int(self.marker.get("zero_stage", 0))


def checkpoints_root(job_dir: Path) -> Path:
    """The folder holding a job's checkpoints."""
    return Path(job_dir) / CHECKPOINTS


def step_dir(job_dir: Path, step: int) -> Path:
    """Where the committed checkpoint of ``step`` lives."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return checkpoints_root(job_dir) / f"{STEP_PREFIX}{step:09d}"


def tmp_dir(job_dir: Path, step: int, token: str) -> Path:
    """The temporary folder a checkpoint of ``step`` is written into before it is committed."""
    return checkpoints_root(job_dir) / f"{TMP_PREFIX}{STEP_PREFIX}{step:09d}-{token}"


def list_step_dirs(job_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder, committed or not, oldest first."""
    root = checkpoints_root(job_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_NAME.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            found.append((int(match.group(1)), child))
    return sorted(found)


# ----------------------------------------------------------------------------------- writing
def _fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk (folders: POSIX only)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one, and it survives a crash."""
    part = path.with_name(f".{path.name}.part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    _fsync_path(path.parent)


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` but the markers; each file is fsynced.

    Raises:
        CheckpointError: The folder holds links or anything but plain files and folders.
    """
    manifest: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"{path}: checkpoints hold plain files only (found a link or special file)")
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            _fsync_path(path)
        elif name not in (MARKER, BUCKET_MARKER):
            _fsync_path(path)
            manifest[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return manifest


def write_committed(tmp: Path, final: Path, meta: dict[str, Any]) -> CheckpointInfo:
    """Commit a fully written temporary folder: manifest, marker last, then the atomic rename.

    Args:
        tmp: The temporary folder holding every file of the checkpoint.
        final: The ``step-<n>`` folder it becomes; it must not exist.
        meta: JSON-safe metadata for the marker; must hold ``step`` (an int matching ``final``).

    Returns:
        The committed checkpoint.

    Raises:
        CheckpointError: ``final`` exists, ``meta`` is unusable, or the folder holds links.
    """
    step = meta.get("step")
    match = _STEP_NAME.match(final.name)
    if not isinstance(step, int) or not match or int(match.group(1)) != step:
        raise CheckpointError(f"marker step {step!r} does not match the folder name '{final.name}'")
    if clash := [k for k in _RESERVED if k in meta]:
        raise CheckpointError(f"marker metadata may not set {clash}")
    if final.exists():
        raise CheckpointError(f"{final} already exists; a committed checkpoint is never overwritten")
    if (tmp / MARKER).exists():
        raise CheckpointError(f"{tmp} already holds a marker")
    marker = {
        "format_version": FORMAT_VERSION,
        **meta,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": build_manifest(tmp),
    }
    write_json_atomic(tmp / MARKER, marker)
    _fsync_path(tmp)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    logger.info("checkpoint committed: %s (%d files)", final, len(marker["files"]))
    return CheckpointInfo(path=final, step=step, marker=marker)


# ----------------------------------------------------------------------------------- reading
def read_marker(folder: Path) -> dict[str, Any]:
    """The parsed marker of ``folder`` (checked for shape only; :func:`verify` checks the files).

    Raises:
        CheckpointError: The marker is missing, unreadable or not of this format (the message
            does not name the folder; callers add it).
    """
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"no {MARKER} (cut off before its commit)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {MARKER}: {exc}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{MARKER} is not a checkpoint marker")
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"marker format {marker.get('format_version')!r}, this engine reads {FORMAT_VERSION}")
    if isinstance(marker.get("step"), bool) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{MARKER} has no integer step")
    return marker


def _unsafe_name(name: str) -> bool:
    pure = PurePosixPath(name)
    return not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or name in (MARKER, BUCKET_MARKER)


def _file_problem(folder: Path, name: str, entry: Any, digests: bool) -> str | None:
    if _unsafe_name(name) or not isinstance(entry, dict):
        return f"manifest entry '{name}' is not a valid file entry"
    path = folder / name
    if path.is_symlink() or not path.is_file():
        return f"'{name}' is missing"
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"'{name}' has {size} bytes, the marker lists {entry.get('size')}"
    if digests and sha256_file(path) != entry.get("sha256"):
        return f"'{name}' does not match its sha256 digest"
    return None


def verify(folder: Path, *, digests: bool = True) -> list[str]:
    """Every reason not to trust a checkpoint folder; empty when it is complete and intact.

    Args:
        folder: A ``step-<n>`` folder.
        digests: Also compare sha256 digests (reads every byte); sizes are always compared.

    Returns:
        The problems found, in words (empty list: complete).
    """
    try:
        marker = read_marker(folder)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    match = _STEP_NAME.match(folder.name)
    if match and int(match.group(1)) != marker["step"]:
        problems.append(f"the marker says step {marker['step']}, the folder name says {int(match.group(1))}")
    for name, entry in sorted(marker["files"].items()):
        if problem := _file_problem(folder, name, entry, digests):
            problems.append(problem)
    listed = set(marker["files"]) | {MARKER, BUCKET_MARKER}
    extra = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]
    problems.extend(f"'{name}' is not in the marker's manifest" for name in sorted(set(extra) - listed))
    return problems


def find_latest(job_dir: Path, *, digests: bool = True) -> CheckpointInfo | None:
    """The newest complete checkpoint by step; incomplete or damaged ones are skipped with a warning.

    Args:
        job_dir: The job folder.
        digests: Verify sha256 digests of the chosen checkpoint (and of every newer one tried).

    Returns:
        The checkpoint to resume from, or None when there is no complete one.
    """
    for step, folder in reversed(list_step_dirs(job_dir)):
        problems = verify(folder, digests=digests)
        if not problems:
            return CheckpointInfo(path=folder, step=step, marker=read_marker(folder))
        logger.warning("ignoring checkpoint %s: %s", folder, "; ".join(problems))
    return None


# ----------------------------------------------------------------------------------- pruning
def remove_folder(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the ``step-*`` names first, so never half-visible."""
    doomed = folder.with_name(f"{TMP_PREFIX}rm-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def prune(job_dir: Path, keep: int) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; remove older ones and every leftover.

    Call it only after a checkpoint has been committed, and never while another one is being
    written into the same job folder: it removes every ``.tmp-*`` folder (writes cut off by a
    crash) and every ``step-*`` folder that fails the size check (no marker, missing files).
    Completeness is judged by sizes, not digests: the newest checkpoint was digested when it
    was committed a moment before. The newest complete checkpoint is never removed.

    Args:
        job_dir: The job folder.
        keep: How many complete checkpoints to keep (at least 1).

    Returns:
        The folders removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = checkpoints_root(job_dir)
    if not root.is_dir():
        return []
    doomed = [child for child in root.iterdir() if child.name.startswith(TMP_PREFIX)]
    complete = 0
    for _step, folder in reversed(list_step_dirs(job_dir)):
        problems = verify(folder, digests=False)
        if not problems:
            complete += 1
            if complete > keep:
                doomed.append(folder)
        else:
            logger.warning("removing incomplete checkpoint %s: %s", folder, "; ".join(problems))
            doomed.append(folder)
    for folder in sorted(doomed):
        if folder.is_dir() and not folder.is_symlink():
            remove_folder(folder)
        else:
            folder.unlink(missing_ok=True)
    if doomed:
        logger.info("pruned %d checkpoint folder(s) under %s", len(doomed), root)
    return sorted(doomed)
