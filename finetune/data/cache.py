"""Cache of prepared datasets, so reruns and resumed jobs skip reading, tokenising and packing.

An entry is keyed by what decides its content: the digest of the dataset files, the digest of
the tokenizer files, the recipe's data section (and the seed that draws the eval split), and
the version of the preparation code. It is an Arrow dataset (``datasets.save_to_disk``) per split,
plus the report as JSON, written under a temporary name and published by a rename, so a cache
entry is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.hashing import sha256_file

logger = logging.getLogger(__name__)

#: Bump when the preparation code changes what it produces for the same inputs.
PREPARATION_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "added_tokens.json",
)  # fmt: skip
_COLUMNS = ("input_ids", "labels", "position_ids", "doc_lengths")


def files_digest(files: Sequence[tuple[str, Path]]) -> str:
    """Digest of named files: their names, sizes and contents."""
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(f"{name}\0{path.stat().st_size}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_digest(model_dir: Path) -> str:
    """Digest of the tokenizer files of a model folder (weights do not change tokenisation)."""
    return files_digest([(name, model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()])


def cache_key(dataset: str, tokenizer: str, settings: dict[str, Any]) -> str:
    """The cache key of a prepared dataset."""
    blob = json.dumps(
        {"v": PREPARATION_VERSION, "dataset": dataset, "tokenizer": tokenizer, "settings": settings},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _to_columns(rows: Sequence[Any]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
    for row in rows:
        for c in _COLUMNS:
            columns[c].append(getattr(row, c, None))
    return {c: v for c, v in columns.items() if any(x is not None for x in v) or c in ("input_ids", "labels")}


def save_entry(folder: Path, splits: dict[str, Sequence[Any]], report: dict[str, Any]) -> Path:
    """Write one cache entry atomically: an Arrow dataset per split, and ``report.json``."""
    from datasets import Dataset

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split, rows in splits.items():
            if len(rows) == 0:  # datasets cannot load an empty saved dataset; an absent split reads as empty
                continue
            Dataset.from_dict(_to_columns(rows)).save_to_disk(str(tmp / split))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached prepared dataset at %s", folder)
    return folder


def load_entry(folder: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The cached splits (as ``datasets.Dataset``) and report, or None when there is no entry."""
    report_path = folder / "report.json"
    if not report_path.is_file():
        return None
    from datasets import load_from_disk

    splits = {p.name: load_from_disk(str(p)) for p in sorted(folder.iterdir()) if p.is_dir() and any(p.glob("*.arrow"))}
    return splits, json.loads(report_path.read_text(encoding="utf-8"))
