"""File digests and digest manifests, streamed so that multi-gigabyte weight files never sit in memory."""

from __future__ import annotations

import hashlib
from collections.abc import Container
from pathlib import Path
from typing import Any

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one file: the entry shape of every manifest the engine writes."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def folder_manifest(folder: Path, *, exclude: Container[str] = ()) -> dict[str, dict[str, Any]]:
    """The entry of every file under ``folder`` by its relative POSIX name, sorted, but ``exclude``.

    Raises:
        ValueError: The folder holds a link or anything but plain files and folders.
    """
    manifest: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"{path}: a link or special file; only plain files are published")
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in exclude:
            manifest[name] = file_entry(path)
    return manifest
