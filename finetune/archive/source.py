"""Where an archive's weights come from: a finished job's ``final/`` or one of its checkpoints.

:func:`open_job` reads the job's store (a tenant bucket's job prefix, or a local job folder),
checks the signed manifest of the final model or checkpoint, fetches its files into a work folder
with their digests checked, and finds the base model; :func:`engine_model` rebuilds the model the
engine trained, in fp32 on the CPU, exactly: the full weights as saved, or the base model with the
LoRA adapter on top (not merged). Everything the archive holds is derived from it, and its logits
are the reference the archive is verified against.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.events import Event, read_events
from finetune.jobstore import DATA_REPORT, FINAL, RECIPE, JobStore
from finetune.offline import LOAD_KWARGS
from finetune.published import FolderRefused, fetch_folder, read_marker
from finetune.recipe import LoraMethod, Recipe
from finetune.registry import ModelEntry, Registry
from finetune.signing import VerifyKey

logger = logging.getLogger(__name__)


class ArchiveError(FinetuneError):
    """The archive cannot be built as asked (and what to do instead)."""


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft calls a transformers method that 5.x deprecates; the warning means nothing to a tenant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
        yield


#: The most a job's recipe.json or data_report.json may hold (both are written by the engine).
_JSON_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class JobSource:
    """A job and the weights chosen from it, fetched and checked."""

    store: JobStore
    recipe: Recipe
    recipe_json: dict[str, Any]
    entry: ModelEntry | None
    base_dir: Path
    label: str  # "final" or the checkpoint's folder name
    weights_dir: Path  # the local copy of final/ or of the checkpoint
    step: int | None
    events: list[Event]
    data_report: dict[str, Any]
    marker: dict[str, Any]  # the signed manifest of the weights' folder

    @property
    def is_lora(self) -> bool:
        return isinstance(self.recipe.method, LoraMethod)

    @property
    def eot(self) -> str | None:
        return self.entry.eot if self.entry is not None else None


def _json(store: JobStore, name: str, required: bool) -> dict[str, Any]:
    rel = store.path(name)
    if not store.bucket.exists(rel):
        if required:
            raise ArchiveError(f"{store.describe()} is not a job folder: it has no {name}")
        return {}
    if store.bucket.size(rel) > _JSON_MAX_BYTES:
        raise ArchiveError(f"{store.describe(name)} is larger than the engine ever writes it")
    try:
        data = json.loads(store.bucket.read_bytes(rel))
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{store.describe(name)} is not readable JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{store.describe(name)} is not a JSON object")
    return data


def open_job(
    store: JobStore, checkpoint: str | None, registry: Registry, model_store: Path, key: VerifyKey, work: Path
) -> JobSource:
    """The job in ``store`` with its final model, or the named checkpoint, fetched into ``work``.

    Raises:
        ArchiveError: not a job, no trustworthy final model (the job has not finished, or its
            files were altered), an unknown or untrusted checkpoint (the message lists the
            trustworthy ones).
        ModelStoreError: the base model is not in the model store.
    """
    from finetune.loading import model_folder
    from finetune.train.checkpoint_files import check_checkpoint, checkpoint_path, list_steps, recipe_digest, trusted

    recipe_json = _json(store, RECIPE, required=True)
    recipe = Recipe.model_validate(recipe_json)
    if recipe.model.custom is not None:
        raise ArchiveError("archives of custom (uploaded) models are not supported yet: their origin record is manual")
    entry = registry.get(recipe.model.id) if recipe.model.id else None
    base_dir = model_folder(recipe, registry, model_store)
    events, report = read_events(store.bucket, store.prefix), _json(store, DATA_REPORT, required=False)
    names = [name for _, name in list_steps(store)]
    complete = ", ".join(info.name for info in trusted(store, key)) or "none"
    if checkpoint is None:
        try:
            manifest = read_marker(store.bucket, store.path(FINAL), "final", key)
        except FolderRefused as exc:
            hint = f"; choose a checkpoint with --checkpoint ({complete})" if complete != "none" else ""
            raise ArchiveError(f"{store.describe()} has no final model that can be trusted ({exc}){hint}") from None
        dest = work / FINAL
        _fetch(store, store.path(FINAL), manifest, dest, None)
        step = manifest.get("step")
        return JobSource(store, recipe, recipe_json, entry, base_dir, "final", dest,
                         step if isinstance(step, int) else None, events, report, manifest)  # fmt: skip
    if checkpoint not in names:
        raise ArchiveError(f"no checkpoint '{checkpoint}' in {store.describe()}; complete ones: {complete}")
    try:
        info = check_checkpoint(store, checkpoint, key, recipe_digest(recipe_json))
    except FolderRefused as exc:
        raise ArchiveError(f"checkpoint '{checkpoint}' cannot be trusted: {exc}") from None
    dest = work / checkpoint
    _fetch(store, checkpoint_path(store, checkpoint), info.marker, dest, lambda n: not n.endswith(".py"))
    return JobSource(store, recipe, recipe_json, entry, base_dir, checkpoint, dest, info.step, events, report,
                     info.marker)  # fmt: skip


def _fetch(store: JobStore, rel: str, manifest: dict[str, Any], dest: Path, wanted: Any) -> None:
    try:
        fetch_folder(store.bucket, rel, manifest, dest, wanted=wanted)
    except FolderRefused as exc:
        raise ArchiveError(f"{store.describe()}/{rel}: {exc}") from None


def base_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base model is published in (``config.json``), float32 when it does not say."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load_fp32(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **LOAD_KWARGS, dtype=torch.float32, use_safetensors=True)


def _checkpoint_state(src: JobSource) -> dict[str, torch.Tensor]:
    """The module weights of a checkpoint (trainable ones only for adapters), fp32 for ZeRO-3.

    ZeRO-3 states are partitioned across the workers' optimizer files; DeepSpeed's own
    consolidation reads them (as it does when a job resumes).
    """
    from finetune.train.safe_load import restricted_load, restricted_zero_to_fp32_loads

    marker = src.marker
    tag = str(marker.get("deepspeed_tag", "deepspeed"))
    if int(marker.get("zero_stage", 0)) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with restricted_zero_to_fp32_loads():  # DeepSpeed's consolidation, with torch's restricted unpickler
            state = get_fp32_state_dict_from_zero_checkpoint(str(src.weights_dir), tag=tag)
        return dict(state)
    # DeepSpeed writes it with torch.save; it is read with torch's restricted unpickler, which
    # builds tensors and plain containers only and runs no code (and its sha256 was checked
    # against the signed manifest while it was fetched).
    saved = restricted_load(src.weights_dir / tag / "mp_rank_00_model_states.pt")
    return dict(saved["module"])


def _load_checkpoint_into(model: torch.nn.Module, state: dict[str, torch.Tensor], trainable_only: bool) -> None:
    expected = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = set(result.missing_keys) & expected if expected is not None else set(result.missing_keys)
    missing -= {n for n, _ in model.named_buffers()}
    if expected is None:  # tied weights are saved once
        missing -= {n for n in missing if n.endswith("lm_head.weight")}
    if missing or result.unexpected_keys:
        raise ArchiveError(
            f"checkpoint weights do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


def engine_model(src: JobSource) -> tuple[Any, torch.dtype]:
    """The trained model in fp32 on the CPU, in eval mode (full weights, or base + unmerged adapter).

    Returns the model and the dtype the complete model is written in: the base model's for LoRA
    (merged weights are cast back to it), the trained weights' own for full fine-tuning.
    """
    if not src.is_lora:
        if src.label == "final":
            return _load_fp32(src.weights_dir).eval(), base_dtype(src.weights_dir)
        model = _load_fp32(src.base_dir)
        state = _checkpoint_state(src)
        _load_checkpoint_into(model, state, trainable_only=False)
        model.tie_weights()
        floats = {v.dtype for v in state.values() if v.is_floating_point()}
        return model.eval(), (floats.pop() if len(floats) == 1 else torch.float32)
    base = _load_fp32(src.base_dir)
    if src.label == "final":
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(src.weights_dir), is_trainable=False, **LOAD_KWARGS)
    else:
        from finetune.train.model import add_adapters

        assert isinstance(src.recipe.method, LoraMethod)
        model = add_adapters(base, src.recipe.method)
        _load_checkpoint_into(model, _checkpoint_state(src), trainable_only=True)
    return model.eval(), base_dtype(src.base_dir)
