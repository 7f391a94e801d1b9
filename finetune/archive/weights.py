"""The archive's model folders, and the reference logits it is verified against.

- ``model/``: the complete model, sharded safetensors, loadable with plain ``transformers``. A
  LoRA adapter is merged into the base weights in fp32 and the result cast to the base model's
  published dtype; full fine-tuning weights are written in the dtype they were trained in.
- ``adapter/``: the LoRA adapter alone, for ``peft`` on top of the base model.

Both hold the tokenizer (with its chat template) and a ``generation_config.json`` whose EOS ids
include the end-of-turn token, so generation stops where a chat turn ends.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from finetune.archive.layout import PROMPT, REFERENCE_FILE
from finetune.archive.source import JobSource, quiet_peft
from finetune.train.final import stop_token_ids

logger = logging.getLogger(__name__)


def tokenizer_of(src: JobSource) -> Any:
    from finetune.loading import load_tokenizer

    fetched = src.weights_dir  # final/ carries the tokenizer; a checkpoint does not (it is the base model's)
    return load_tokenizer(fetched if (fetched / "tokenizer_config.json").is_file() else src.base_dir)


def prompt_ids(tokenizer: Any) -> list[int]:
    """The fixed verification prompt, rendered with the model's own chat template."""
    rendered = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [int(i) for i in rendered["input_ids"]]


@torch.no_grad()
def logits_of(model: Any, ids: list[int]) -> torch.Tensor:
    """fp32 logits of every position of ``ids`` (one sequence, no padding)."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().cpu()


def write_reference(model: Any, tokenizer: Any, dest: Path) -> dict[str, Any]:
    """Save the engine model's logits on the fixed prompt; returns what the manifest records."""
    ids = prompt_ids(tokenizer)
    logits = logits_of(model, ids)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": torch.tensor(ids, dtype=torch.long), "logits": logits.contiguous()}, str(dest))
    return {"file": REFERENCE_FILE, "prompt": PROMPT, "tokens": len(ids), "computed_in": "float32"}


def _generation_config(model: Any, tokenizer: Any, eot: str | None) -> Any:
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None) or GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer, eot)
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def write_adapter(model: Any, tokenizer: Any, src: JobSource, dest: Path) -> None:
    """The LoRA adapter alone (peft layout), pointing at the base model's repository."""
    model.save_pretrained(str(dest))
    (dest / "README.md").unlink(missing_ok=True)  # peft's template card; the archive has its own
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    repo = src.entry.source.repo if src.entry is not None and src.entry.source is not None else None
    config["base_model_name_or_path"] = repo if repo and not src.recipe.model.tiny else src.recipe.model.id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(dest))
    _generation_config(model.get_base_model(), tokenizer, src.eot).save_pretrained(str(dest))


def write_merged(model: Any, dtype: torch.dtype, tokenizer: Any, src: JobSource, dest: Path, shard_size: int) -> None:
    """The complete model in ``dtype``, sharded; for LoRA the adapter is merged (fp32) first. Consumes ``model``."""
    if src.is_lora:
        with quiet_peft():
            model = model.merge_and_unload()  # fp32: the base was loaded in fp32
    model = model.to(dtype)
    model.config.use_cache = True  # training switched it off; generation wants it
    model.generation_config = _generation_config(model, tokenizer, src.eot)
    model.save_pretrained(str(dest), max_shard_size=shard_size)
    tokenizer.save_pretrained(str(dest))
    logger.info("merged model written to %s (%s)", dest, dtype)


def allowed_difference(ref: torch.Tensor, tolerance: float) -> float:
    """The largest logit difference the tolerance allows: a fraction of the largest reference logit (at least 1)."""
    return tolerance * max(1.0, float(ref.abs().max()))


def merged_deviation(folder: Path, reference_file: Path, tolerance: float) -> tuple[float, float]:
    """Largest logit difference of the written model (loaded in fp32, as verify does) from the reference.

    Returns the difference and what ``tolerance`` allows.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.offline import LOAD_KWARGS

    tensors = load_file(str(reference_file))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **LOAD_KWARGS, dtype=torch.float32, use_safetensors=True)
    ref = tensors["logits"]
    diff = float((logits_of(model.eval(), tensors["input_ids"].tolist()) - ref).abs().max())
    return diff, allowed_difference(ref, tolerance)
