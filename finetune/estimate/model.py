"""The model of a recipe for the estimator: its config, tokenizer and parameter counts, with no weights.

The config is the one that will run: a ``tiny: true`` recipe's tiny model (materialised in the
store, as ``finetune data inspect`` does), a model in the store, or a custom model's folder. A
registry model that is not in the store yet gets its full-size config from the registry's
``architecture`` and, to count tokens, the stand-in tokenizer of its tiny model (byte-level BPE with
the family's chat template and special tokens). Parameters are counted on a copy of the model built
on PyTorch's ``meta`` device (shapes only, no memory), with the adapters the training engine
would add, so the counts are exact for every family.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ModelStoreError
from finetune.flops import ModelShape, shape_of
from finetune.recipe import LoraMethod, Recipe
from finetune.registry import Registry
from finetune.storage import Bucket

#: Keys of a registry architecture that do not describe the model's shape.
_NOT_CONFIG = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version")


@dataclass
class ModelSource:
    """Where the model's config and tokenizer come from."""

    config: Any
    tokenizer: Any
    folder: Path | None
    config_source: str
    tokenizer_source: str
    size: str
    eot: str | None


def model_source(recipe: Recipe, registry: Registry, store: Path, bucket: Bucket) -> ModelSource:
    """The recipe's model config and tokenizer (rules in the module docstring).

    Raises:
        ModelStoreError: A custom model is not in the bucket, or a tiny model cannot be built.
    """
    from transformers import AutoConfig

    from finetune.loading import load_tokenizer, model_folder
    from finetune.offline import LOAD_KWARGS

    entry = registry.get(recipe.model.id) if recipe.model.id else None
    eot = entry.chat.eot if entry is not None and entry.chat is not None else None
    size = "tiny" if recipe.model.tiny else "full"
    try:
        folder = model_folder(recipe, registry, store, bucket)
    except ModelStoreError:
        if entry is None or entry.chat is None or entry.architecture is None or recipe.model.tiny:
            raise
        from finetune.tiny import build_tokenizer

        kwargs = {k: v for k, v in entry.config_kwargs().items() if k not in _NOT_CONFIG}
        config = AutoConfig.for_model(**kwargs)
        tokenizer = build_tokenizer(entry.chat, registry.chat_template(entry))
        return ModelSource(
            config,
            tokenizer,
            None,
            f"the registry's architecture of {entry.id} (not in the model store at {store})",
            f"the stand-in tokenizer of the tiny {entry.id} (vocabulary {len(tokenizer):,}), not the model's own",
            size,
            eot,
        )
    config = AutoConfig.from_pretrained(str(folder), **LOAD_KWARGS)
    return ModelSource(config, load_tokenizer(folder), folder, f"{folder}/config.json", f"{folder}", size, eot)


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
