"""Where an archive's weights come from: a finished job's ``final/`` or one of its checkpoints.

:func:`open_job` checks the job folder and finds the base model; :func:`engine_model` rebuilds
the model the engine trained, in fp32 on the CPU, exactly: the full weights as saved, or the base
model with the LoRA adapter on top (not merged). Everything the archive holds is derived from it,
and its logits are the reference the archive is verified against.
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
from finetune.offline import LOAD_KWARGS
from finetune.recipe import LoraMethod, Recipe
from finetune.registry import ModelEntry, Registry

logger = logging.getLogger(__name__)


class ArchiveError(FinetuneError):
    """The archive cannot be built as asked (and what to do instead)."""


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft calls a transformers method that 5.x deprecates; the warning means nothing to a tenant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
        yield


@dataclass(frozen=True)
class JobSource:
    """A job folder and the weights chosen from it."""

    job_dir: Path
    recipe: Recipe
    recipe_json: dict[str, Any]
    entry: ModelEntry | None
    base_dir: Path
    label: str  # "final" or the checkpoint's folder name
    weights_dir: Path  # final/ or checkpoints/<name>/
    step: int | None

    @property
    def is_lora(self) -> bool:
        return isinstance(self.recipe.method, LoraMethod)

    @property
    def eot(self) -> str | None:
        return self.entry.chat.eot if self.entry is not None and self.entry.chat is not None else None


def _final_step(job_dir: Path) -> int | None:
    from finetune.train.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(job_dir / "metrics.jsonl") if r.get("kind") == "train"]
    return max(steps) if steps else None


def open_job(job_dir: Path, checkpoint: str | None, registry: Registry, store: Path) -> JobSource:
    """The job at ``job_dir`` with its ``final/`` model, or the named checkpoint.

    Raises:
        ArchiveError: not a job folder, no final model (the job has not finished), an unknown or
            incomplete checkpoint (the message lists the complete ones).
        ModelStoreError: the base model is not in the model store.
    """
    from finetune.loading import model_folder
    from finetune.train.checkpoint_files import checkpoints_root, list_step_dirs, verify

    recipe_path = job_dir / "recipe.json"
    if not recipe_path.is_file():
        raise ArchiveError(f"{job_dir} is not a job folder: it has no recipe.json")
    recipe_json = json.loads(recipe_path.read_text(encoding="utf-8"))
    recipe = Recipe.model_validate(recipe_json)
    if recipe.model.custom is not None:
        raise ArchiveError("archives of custom (uploaded) models are not supported yet: their origin record is manual")
    entry = registry.get(recipe.model.id) if recipe.model.id else None
    base_dir = model_folder(recipe, registry, store)
    complete = [p.name for _, p in list_step_dirs(job_dir) if not verify(p, digests=False)]
    if checkpoint is None:
        final = job_dir / "final"
        if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
            hint = f"; choose a checkpoint with --checkpoint ({', '.join(complete)})" if complete else ""
            raise ArchiveError(f"{job_dir} has no final model: the job has not finished{hint}")
        return JobSource(job_dir, recipe, recipe_json, entry, base_dir, "final", final, _final_step(job_dir))
    folder = checkpoints_root(job_dir) / checkpoint
    if "/" in checkpoint or checkpoint.startswith(".") or not folder.is_dir():
        raise ArchiveError(f"no checkpoint '{checkpoint}' in {job_dir}; complete ones: {', '.join(complete) or 'none'}")
    problems = verify(folder, digests=True)  # the digests before anything in it is unpickled
    if problems:
        raise ArchiveError(f"checkpoint '{checkpoint}' is incomplete or damaged: {'; '.join(problems)}")
    marker = json.loads((folder / "COMMITTED.json").read_text(encoding="utf-8"))
    if json.loads((folder / "recipe.json").read_text(encoding="utf-8")) != recipe_json:
        raise ArchiveError(f"checkpoint '{checkpoint}' was written under another recipe than {recipe_path}")
    return JobSource(job_dir, recipe, recipe_json, entry, base_dir, checkpoint, folder, int(marker["step"]))


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
    marker = json.loads((src.weights_dir / "COMMITTED.json").read_text(encoding="utf-8"))
    tag = str(marker.get("deepspeed_tag", "deepspeed"))
    if int(marker.get("zero_stage", 0)) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(src.weights_dir), tag=tag)
        return dict(state)
    # DeepSpeed writes it with torch.save; it is read with torch's restricted unpickler, which
    # builds tensors and plain containers only and runs no code (and its sha256 was checked
    # against the marker in open_job).
    path = src.weights_dir / tag / "mp_rank_00_model_states.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
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
