"""Folders published into a bucket: files first, a signed manifest (``COMMITTED.json``) last.

One protocol for everything a job publishes (checkpoints, the prepared data, the final model):
the files are uploaded, the uploads are listed back with their sizes, and only then the manifest
is written: every file's size and sha256, what the folder is, and the platform's signature over
all of it. Readers trust a folder only through its manifest: a folder without one (an upload cut
off) or with an unsigned, wrongly signed or mismatching one (a folder a tenant wrote or altered with
S3 tools) is refused by name, and every file is checked against its digest as it is downloaded,
before anything reads it. Removal deletes the manifest first, so a half-deleted folder is never
taken for a complete one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from finetune.hashing import file_entry
from finetune.signing import SigningKey, VerifyKey, sign_document, signature_problem
from finetune.storage import Bucket, StorageError

__all__ = [
    "FORMAT_VERSION",
    "MARKER",
    "FolderRefused",
    "commit_folder",
    "fetch_folder",
    "publish_folder",
    "read_marker",
    "remove_folder",
    "upload_files",
]

logger = logging.getLogger(__name__)

MARKER = "COMMITTED.json"
FORMAT_VERSION = 2
MARKER_MAX_BYTES = 16 * 1024 * 1024
_RESERVED = ("format_version", "kind", "files", "committed_at", "signature")


class FolderRefused(StorageError):
    """A published folder cannot be trusted (and why)."""

    fault = "platform"


def join(*parts: str) -> str:
    """Bucket-relative names joined with '/', empty parts skipped."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _safe_name(name: str) -> bool:
    pure = PurePosixPath(name)
    return bool(name) and "\\" not in name and not pure.is_absolute() and ".." not in pure.parts and name != MARKER


def upload_files(
    bucket: Bucket, local: Path, rel: str, names: list[str] | None = None, *, move: bool = False
) -> dict[str, dict[str, Any]]:
    """Upload files of the local folder ``local`` under ``rel``; their manifest entries.

    Args:
        bucket: Where to.
        local: The local folder.
        rel: The folder in the bucket.
        names: Relative names to upload (default: every file under ``local``).
        move: The local files are not needed afterwards (see :meth:`Bucket.upload`).

    Raises:
        StorageError: A file is a link or special file, or the quota would be exceeded.
    """
    if names is None:
        found = sorted(p for p in local.rglob("*") if not p.is_dir() or p.is_symlink())
        names = [p.relative_to(local).as_posix() for p in found]
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        path = local / name
        if path.is_symlink() or not path.is_file() or not _safe_name(name):
            raise StorageError(f"{path}: only plain files are published (a link, special file or reserved name)")
        entries[name] = file_entry(path)
    bucket.check_quota(sum(e["size"] for e in entries.values()))
    for name in names:
        bucket.upload(local / name, join(rel, name), move=move, check_quota=False)
    return entries


def commit_folder(
    bucket: Bucket, rel: str, kind: str, files: dict[str, dict[str, Any]], meta: dict[str, Any], key: SigningKey
) -> dict[str, Any]:
    """Write the signed manifest of ``rel`` once every file it lists is there with its size.

    Args:
        bucket: The bucket.
        rel: The folder.
        kind: What the folder is (``checkpoint``, ``final``, ``data``...); readers ask for it.
        files: Every file's entry (``{"size", "sha256"}``), from :func:`upload_files`.
        meta: JSON-safe metadata for the manifest (may not use the reserved keys).
        key: The platform key.

    Returns:
        The manifest written.

    Raises:
        StorageError: A listed file is missing or has another size in the bucket, or ``meta``
            uses a reserved key.
    """
    if clash := [k for k in _RESERVED if k in meta]:
        raise StorageError(f"manifest metadata may not set {clash}")
    present = dict(bucket.walk_files(rel))
    for name, entry in sorted(files.items()):
        size = present.get(join(rel, name))
        if size != entry["size"]:
            raise StorageError(
                f"'{join(rel, name)}' is not in the bucket with its {entry['size']} bytes (found {size})"
            )
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **meta,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": dict(sorted(files.items())),
    }
    signed = sign_document(manifest, key)
    bucket.write_bytes(join(rel, MARKER), json.dumps(signed, indent=1, ensure_ascii=False).encode())
    logger.info("published %s (%d files)", join(rel, ""), len(files))
    return signed


def publish_folder(
    bucket: Bucket, local: Path, rel: str, kind: str, meta: dict[str, Any], key: SigningKey, *, move: bool = False
) -> dict[str, Any]:
    """Upload a whole local folder and commit it (one process; a checkpoint's ranks use the parts).

    Raises:
        StorageError: ``rel`` is already published, or as :func:`upload_files`/:func:`commit_folder`.
    """
    if bucket.exists(join(rel, MARKER)):
        raise StorageError(f"'{rel}' is already published")
    files = upload_files(bucket, local, rel, move=move)
    return commit_folder(bucket, rel, kind, files, meta, key)


def read_marker(bucket: Bucket, rel: str, kind: str, key: VerifyKey) -> dict[str, Any]:
    """The manifest of ``rel``, after checking its signature, kind and that the files are there.

    Sizes are checked against a listing here; digests when the files are fetched.

    Raises:
        FolderRefused: No manifest (an upload cut off), an unreadable, unsigned or wrongly
            signed one, another kind, unsafe names, files missing, of another size, or not listed.
    """
    marker = join(rel, MARKER)
    try:
        size = bucket.size(marker)
    except FileNotFoundError:
        raise FolderRefused("no COMMITTED.json: cut off before its commit") from None
    if size > MARKER_MAX_BYTES:
        raise FolderRefused(f"COMMITTED.json has {size:,} bytes, more than a manifest can")
    try:
        manifest = json.loads(bucket.read_bytes(marker))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FolderRefused(f"COMMITTED.json is not readable JSON: {str(exc)[:200]}") from None
    if problem := signature_problem(manifest, key):
        raise FolderRefused(f"COMMITTED.json is {problem}" if problem.startswith("unsigned") else problem)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") != kind:
        raise FolderRefused(f"not a published {kind} (format {manifest.get('format_version')!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_safe_name(n) and isinstance(e, dict) for n, e in files.items()):
        raise FolderRefused("its manifest lists unsafe file names")
    present = dict(bucket.walk_files(rel))
    for name, entry in sorted(files.items()):
        found = present.get(join(rel, name))
        if found is None:
            raise FolderRefused(f"'{name}' is missing")
        if found != entry.get("size"):
            raise FolderRefused(f"'{name}' has {found} bytes, the manifest lists {entry.get('size')}")
    extra = sorted(set(present) - {join(rel, n) for n in files} - {marker})
    if extra:
        raise FolderRefused(f"'{extra[0][len(join(rel, '')) + 1 :]}' is not in the signed manifest")
    return dict(manifest)


def fetch_folder(
    bucket: Bucket, rel: str, manifest: dict[str, Any], dest: Path, wanted: Callable[[str], bool] | None = None
) -> None:
    """Download the files of a checked manifest into ``dest``, each checked against its digest.

    No more bytes than the manifest lists are ever written for a file.

    Raises:
        FolderRefused: A file does not match its digest (its name in the message).
    """
    for name, entry in sorted(manifest["files"].items()):
        if wanted is not None and not wanted(name):
            continue
        try:
            digest = bucket.download(join(rel, name), dest / name, max_bytes=int(entry["size"]))
        except StorageError as exc:
            raise FolderRefused(f"'{name}': {exc}") from None
        if digest != entry.get("sha256"):
            (dest / name).unlink(missing_ok=True)
            raise FolderRefused(f"'{name}' does not match its sha256 digest in the signed manifest")


def remove_folder(bucket: Bucket, rel: str) -> None:
    """Delete a published folder: the manifest first, so it is never half-visible as complete."""
    bucket.remove(join(rel, MARKER))
    bucket.remove(rel, recursive=True)
