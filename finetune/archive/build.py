"""``finetune archive build``: a finished job (or one checkpoint) packaged as one verifiable tar file."""

from __future__ import annotations

import logging
import math
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
    ADAPTER_TOLERANCE,
    CARD,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MERGED_DIR,
    REFERENCE_FILE,
    TOLERANCE,
    archive_name,
    parse_size,
)
from finetune.archive.source import ArchiveError, JobSource, engine_model, open_job
from finetune.archive.tarball import wants_zstd, write_tar
from finetune.archive.weights import merged_deviation, tokenizer_of, write_adapter, write_merged, write_reference
from finetune.events import latest_by_step, to_jsonl
from finetune.files import dumps_json
from finetune.hashing import folder_manifest
from finetune.jobstore import JobStore
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.signing import SigningKey, sign_document
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


def _job(src: JobSource) -> dict[str, Any]:
    train = [e for e in latest_by_step(src.events, "step") if src.step is None or e.step <= src.step]
    evals = [e for e in latest_by_step(src.events, "eval") if src.step is None or e.step <= src.step]
    source = "final model" if src.label == "final" else f"checkpoint {src.label}"
    return {
        "name": src.recipe.name,
        "method": src.recipe.method.type,
        "source": source,
        "step": src.step,
        "final_train_loss": train[-1].loss if train else None,
        "eval": {"step": evals[-1].step, "eval_loss": evals[-1].eval_loss, "eval_ppl": evals[-1].eval_ppl}
        if evals
        else None,
    }


def _data_stats(src: JobSource) -> dict[str, Any]:
    from finetune.data.report import DataReport

    return DataReport.from_dict(src.data_report).for_operators() if src.data_report else {}


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities as None: the manifest is plain JSON, which a signature covers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def _write_json(path: Path, data: Any) -> None:
    path.write_text(dumps_json(data), encoding="utf-8")


def build_archive(
    job: JobStore,
    out: Path,
    *,
    registry: Registry,
    settings: Settings,
    checkpoint: str | None = None,
    contents: Contents | None = None,
    shard_size: str | int = "5GB",
    zstd: bool | None = None,
) -> BuildResult:
    """Package the job's final model (or ``checkpoint``) into the tar file ``out``.

    Args:
        job: The job's store (a tenant bucket's job prefix, or a local job folder).
        out: The tar file to write (``.tar.zst``: zstd-compressed).
        registry: The model registry.
        settings: Engine settings (model store, the platform key: it signed the job's files and
            signs the archive's manifest).
        checkpoint: A checkpoint's name (default: the final model).
        contents: Weights to include (default: the recipe's).
        shard_size: Largest safetensors shard of the merged model (bytes, or a size such as ``5GB``).
        zstd: Compress (default: from the file name).

    Raises:
        ArchiveError: the job or checkpoint cannot be archived as asked (with what to do instead).
        ModelStoreError: the base model is not in the model store.
        SigningError: the platform key (which signs the manifest) is missing or unusable.
    """
    try:
        shard_bytes = shard_size if isinstance(shard_size, int) else parse_size(shard_size)
    except ValueError as exc:
        raise ArchiveError(f"shard size: {exc}") from None
    if shard_bytes <= 0:
        raise ArchiveError(f"shard size: {shard_bytes} is not a positive number of bytes")
    key = settings.signer()
    top = archive_name(out.name.split(".tar")[0] if ".tar" in out.name else out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".archive-", dir=out.parent))
    try:
        src = open_job(job, checkpoint, registry, settings.store_path, key.public, work / "source")
        meta = _build(src, out, top, contents, shard_bytes, zstd, registry, key, work / top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("archive written to %s", out)
    return BuildResult(out, meta)


def _build(
    src: JobSource, out: Path, top: str, contents: Contents | None, shard_size: int, zstd: bool | None,
    registry: Registry, key: SigningKey, staging: Path,
) -> dict[str, Any]:  # fmt: skip
    merged, adapter = _parts(src, contents)
    staging.mkdir(parents=True)
    tokenizer = tokenizer_of(src)
    model, dtype = engine_model(src)
    reference = write_reference(model, tokenizer, staging / REFERENCE_FILE)
    if adapter:
        write_adapter(model, tokenizer, src, staging / ADAPTER_DIR)
    weights_dtype = str(dtype).removeprefix("torch.")
    if weights_dtype not in TOLERANCE:
        raise ArchiveError(f"weights in {weights_dtype}: an archive holds float32, bfloat16 or float16 weights")
    # for the reader only: verify takes its tolerance from TOLERANCE, never from the manifest
    reference["tolerance"] = {"merged": TOLERANCE[weights_dtype], "adapter": ADAPTER_TOLERANCE}
    if merged:
        write_merged(model, dtype, tokenizer, src, staging / MERGED_DIR, shard_size)
    del model
    if merged:  # the model as written, loaded back as a tenant would: refuse to ship one that is off
        diff, allowed = merged_deviation(staging / MERGED_DIR, staging / REFERENCE_FILE, TOLERANCE[weights_dtype])
        if diff > allowed:
            raise ArchiveError(
                f"the merged model's logits differ from the engine's by {diff:.3g} (allowed {allowed:.3g}); "
                "the archive was not written"
            )
        reference["merged_deviation"] = diff
    _write_json(staging / "recipe.json", src.recipe_json)
    (staging / "metrics.jsonl").write_bytes(to_jsonl(src.events))
    data = _data_stats(src)
    _write_json(staging / "data_stats.json", data)
    use = usage(src.events, default_devices=src.recipe.resources.gpus)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": top,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {"name": "finetune", "version": finetune.__version__, "versions": _versions()},
        "job": _job(src),
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
    loss_curve_png(src.events, staging / "loss_curve.png", f"{top}: loss by step", mark_step=mark)
    (staging / CARD).write_text(model_card(src, meta), encoding="utf-8")
    meta["files"] = folder_manifest(staging, exclude={MANIFEST})
    meta = sign_document(_finite(meta), key)
    _write_json(staging / MANIFEST, meta)
    stamp = int(src.events[-1].time) if src.events else int(time.time())
    write_tar(staging, top, out, mtime=stamp, zstd=wants_zstd(out) if zstd is None else zstd)
    return meta
