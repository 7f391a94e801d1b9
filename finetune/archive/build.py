"""``finetune archive build``: a finished job (or one checkpoint) packaged as one verifiable tar file."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import finetune
from finetune.archive.card import loss_curve_png, model_card, usage
from finetune.archive.layout import (
    ADAPTER_DIR,
    CARD,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MERGED_DIR,
    REFERENCE_FILE,
    TOLERANCE,
    archive_name,
)
from finetune.archive.source import ArchiveError, JobSource, engine_model, open_job
from finetune.archive.tarball import wants_zstd, write_tar
from finetune.archive.weights import merged_deviation, tokenizer_of, write_adapter, write_merged, write_reference
from finetune.hashing import sha256_file
from finetune.registry import Registry
from finetune.train.final import stop_token_ids

logger = logging.getLogger(__name__)

Contents = Literal["merged", "adapter", "both"]


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        files = self.manifest["files"]
        return {
            "archive": str(self.path),
            "size": self.path.stat().st_size,
            "name": self.manifest["name"],
            "contents": self.manifest["contents"],
            "files": len(files),
            "source": self.manifest["job"]["source"],
            "usage": self.manifest["usage"],
        }


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"finetune": finetune.__version__}
    for package in ("torch", "transformers", "peft", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _parts(src: JobSource, contents: Contents | None) -> tuple[bool, bool]:
    """Whether to write the merged model and the adapter."""
    wanted = contents or src.recipe.output.archive
    if not src.is_lora:
        if wanted == "adapter":
            raise ArchiveError("a full fine-tuning job has no adapter: build the archive with --contents merged")
        return True, False
    return wanted in ("merged", "both"), wanted in ("adapter", "both")


def _base_model(src: JobSource, registry: Registry) -> dict[str, Any]:
    from finetune.modelstore import scan_folder

    entry = src.entry
    assert entry is not None  # open_job refuses custom models
    if entry.files and not src.recipe.model.tiny:  # pinned at import (models.lock.json): no need to hash again
        digests = dict(entry.files)
    else:
        digests, _ = scan_folder(src.base_dir)
    revision = "tiny-random" if src.recipe.model.tiny else (entry.source.revision if entry.source else None)
    return {
        "id": entry.id,
        "name": entry.name,
        "repo": entry.source.repo if entry.source else None,
        "revision": revision,
        "tiny": bool(src.recipe.model.tiny),
        "developer": entry.developer.entity,
        "country": entry.developer.country,
        "license": entry.license,
        "origin": registry.verdict(entry).as_dict(),
        "files": {name: d.model_dump() for name, d in sorted(digests.items())},
    }


def _job(src: JobSource, records: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r for r in records if r.get("kind") == "train" and (src.step is None or r["step"] <= src.step)]
    evals = [r for r in records if r.get("kind") == "eval" and (src.step is None or r["step"] <= src.step)]
    source = "final model" if src.label == "final" else f"checkpoint {src.label}"
    return {
        "name": src.recipe.name,
        "method": src.recipe.method.type,
        "source": source,
        "step": src.step,
        "final_train_loss": train[-1]["loss"] if train else None,
        "eval": {k: evals[-1][k] for k in ("step", "eval_loss", "eval_ppl")} if evals else None,
    }


def _data_stats(job_dir: Path) -> dict[str, Any]:
    from finetune.data.report import DataReport

    path = job_dir / "data_report.json"
    if not path.is_file():
        return {}
    return DataReport.from_dict(json.loads(path.read_text(encoding="utf-8"))).for_operators()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def build_archive(
    job_dir: Path,
    out: Path,
    *,
    registry: Registry,
    store: Path,
    checkpoint: str | None = None,
    contents: Contents | None = None,
    shard_size: str = "5GB",
    zstd: bool | None = None,
) -> BuildResult:
    """Package the job's final model (or ``checkpoint``) into the tar file ``out``.

    Raises:
        ArchiveError: the job or checkpoint cannot be archived as asked (with what to do instead).
        ModelStoreError: the base model is not in the model store.
    """
    from finetune.train.metrics import read_metrics

    src = open_job(job_dir, checkpoint, registry, store)
    merged, adapter = _parts(src, contents)
    records = read_metrics(job_dir / "metrics.jsonl")
    top = archive_name(out.name.split(".tar")[0] if ".tar" in out.name else out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".archive-", dir=out.parent))
    try:
        tokenizer = tokenizer_of(src)
        model, dtype = engine_model(src)
        reference = write_reference(model, tokenizer, staging / REFERENCE_FILE)
        if adapter:
            write_adapter(model, tokenizer, src, staging / ADAPTER_DIR)
        weights_dtype = str(dtype).removeprefix("torch.")
        reference["tolerance"] = {"merged": TOLERANCE.get(weights_dtype, TOLERANCE["bfloat16"]), "adapter": 1e-4}
        if merged:
            write_merged(model, dtype, tokenizer, src, staging / MERGED_DIR, shard_size)
        del model
        if merged:  # the model as written, loaded back as a tenant would: refuse to ship one that is off
            diff, allowed = merged_deviation(staging / MERGED_DIR, staging / REFERENCE_FILE, reference)
            if diff > allowed:
                raise ArchiveError(
                    f"the merged model's logits differ from the engine's by {diff:.3g} (allowed {allowed:.3g}); "
                    "the archive was not written"
                )
            reference["merged_deviation"] = diff
        shutil.copyfile(job_dir / "recipe.json", staging / "recipe.json")
        shutil.copyfile(job_dir / "metrics.jsonl", staging / "metrics.jsonl")
        data = _data_stats(job_dir)
        _write_json(staging / "data_stats.json", data)
        use = usage(records, default_devices=src.recipe.resources.gpus)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": top,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "engine": {"name": "finetune", "version": finetune.__version__, "versions": _versions()},
            "job": _job(src, records),
            "base_model": _base_model(src, registry),
            "contents": ({"merged": MERGED_DIR} if merged else {}) | ({"adapter": ADAPTER_DIR} if adapter else {}),
            "weights_dtype": weights_dtype,
            "eot": src.eot,
            "stop_token_ids": stop_token_ids(tokenizer, src.eot),
            "verification": reference,
            "usage": use.as_dict(),
            "data": data,
        }
        mark = src.step if src.label != "final" else None
        loss_curve_png(records, staging / "loss_curve.png", f"{top}: loss by step", mark_step=mark)
        (staging / CARD).write_text(model_card(src, meta), encoding="utf-8")
        meta["files"] = _file_digests(staging)
        _write_json(staging / MANIFEST, meta)
        stamp = int(records[-1]["time"]) if records else int(time.time())
        write_tar(staging, top, out, mtime=stamp, zstd=wants_zstd(out) if zstd is None else zstd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("archive written to %s", out)
    return BuildResult(out, meta)
