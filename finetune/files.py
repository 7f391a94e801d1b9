"""Small helpers for local files: atomic JSON writes and human-readable sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk (folders: POSIX only)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dumps_json(data: Any, *, sort_keys: bool = True) -> str:
    """The engine's JSON files: indented, keys sorted, UTF-8 text kept as it is, newline-terminated."""
    return json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write JSON so that readers see the old file or the whole new one, and it survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(part, "w", encoding="utf-8") as fh:
        fh.write(dumps_json(data, sort_keys=sort_keys))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    fsync_path(path.parent)


def human_size(n: int | float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as disks and quotas are sold)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"
