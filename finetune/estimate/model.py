"""Parameter counts of a recipe's model for the estimator, with no weights.

Parameters are counted on a copy of the model built on PyTorch's ``meta`` device (shapes only, no
memory), with the adapters the training engine would add, so the counts are exact for every family.
The config comes from :func:`finetune.loading.model_source`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.flops import ModelShape, shape_of
from finetune.recipe import LoraMethod, Recipe


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the model as it trains."""

    params: int
    trainable: int
    adapters: int
    shape: ModelShape
    hidden: int
    vocab: int


def count_on_meta(config: Any, recipe: Recipe) -> Counts:
    """Build the model on the ``meta`` device (no memory), add the recipe's adapters, and count.

    Raises:
        RecipeError: Listed LoRA target modules that the model does not have.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.train.model import add_adapters, count_parameters

    method = recipe.method
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers for a renamed property
        model = AutoModelForCausalLM.from_config(config)
        if isinstance(method, LoraMethod):
            model = add_adapters(model, method)
    total, trainable = count_parameters(model)
    adapters = trainable if isinstance(method, LoraMethod) else 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Counts(
        params=total - adapters,
        trainable=trainable if adapters else total,
        adapters=adapters,
        shape=shape_of(model),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
    )


def stored_weight_bytes(folder: Path | None, params: int) -> int:
    """Bytes of weights read at start-up: the store's safetensors files, else ``params`` in bf16."""
    if folder is not None:
        files = list(folder.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return 2 * params
