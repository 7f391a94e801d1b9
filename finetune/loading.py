"""From a validated recipe to the model folder, config and tokenizer it names, offline.

Approved models come from the model store (imported beforehand); a recipe with ``tiny: true``
gets a tiny random-weight model of the same architecture, built here on first use (it needs no
download, so it is always available). Loading is local-only, safetensors-only, no remote code.

The estimator may also work on a registry model that is not in the store yet (``stand_in``): it
gets the full-size config from the registry's ``architecture`` and, to count tokens, the stand-in
tokenizer of its tiny model (byte-level BPE with the family's chat template and special tokens).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError, ModelStoreError
from finetune.modelstore import TINY_REVISION, model_dir, resolve_model
from finetune.offline import LOAD_KWARGS
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.storage import Bucket

logger = logging.getLogger(__name__)

#: Keys of a registry architecture that do not describe the model's shape.
_NOT_CONFIG = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version")


def ensure_tiny(registry: Registry, model_id: str, store: Path) -> Path:
    """The tiny random-weight model of an approved entry, materialised in the store if missing."""
    from finetune.tiny import materialize_tiny

    entry = registry.get(model_id)
    if entry is None:
        raise ModelStoreError(f"'{model_id}' is not in the registry")
    dest = model_dir(store, model_id, TINY_REVISION)
    if not (dest / "config.json").is_file():
        logger.info("building tiny random-weight %s in %s", model_id, dest)
        try:
            materialize_tiny(entry, registry.chat_template(entry), dest)
        except FinetuneError:
            if not (dest / "config.json").is_file():  # not just another process publishing it first
                raise
    return resolve_model(registry, model_id, store, tiny=True)


def model_folder(
    recipe: Recipe, registry: Registry, store: Path, bucket: Bucket | None = None, *, reviews: Path | None = None
) -> Path:
    """The local folder of the recipe's model.

    A custom model is checked as ``finetune models check`` checks a folder (no pickle, no custom
    code, no links, plain files only, sound safetensors headers), then needs an approved origin
    review of exactly its files (:mod:`finetune.reviews`): the recipe's declaration alone never
    lets it train.

    Args:
        reviews: The review store (``finetune.reviews.reviews_dir``); without one a custom model
            is refused (fail closed).

    Raises:
        ModelStoreError: the model is not in the store (with the command that puts it there), a
            custom model is not where the recipe says in the bucket, or it has no approved review
            of exactly its files (``ReviewError``, with the command that records one).
        ModelCheckError: a custom model's folder holds unsafe files.
    """
    if recipe.model.custom is not None:
        from finetune.reviews import require_approval

        custom = recipe.model.custom
        rel = custom.path  # normalised by the recipe
        if bucket is None or not bucket.local:
            raise ModelStoreError("custom models are read from a local bucket; copy the model folder there first")
        folder = bucket.local_path(rel)
        parts = rel.split("/")
        if any(Path(bucket.root).joinpath(*parts[:n]).is_symlink() for n in range(1, len(parts) + 1)):
            raise ModelStoreError(f"'{rel}' goes through a link in your bucket; upload the model folder itself")
        if not (folder / "config.json").is_file():
            raise ModelStoreError(f"no model folder at '{rel}' in your bucket (config.json not found)")
        if reviews is None:
            raise ModelStoreError("custom models are checked against the origin reviews; none were given here")
        require_approval(folder, custom.developer, custom.country, registry, reviews, shown_as=rel)
        return folder
    if recipe.model.id is None:
        raise ModelStoreError("the recipe names no model")
    if recipe.model.tiny:
        return ensure_tiny(registry, recipe.model.id, store)
    return resolve_model(registry, recipe.model.id, store)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a local model folder, with its chat template; never from a hub."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoTokenizer.from_pretrained(str(folder), **LOAD_KWARGS)


@dataclass
class ModelSource:
    """The recipe's model: its folder (None for a stand-in), config, tokenizer, and where they come from."""

    config: Any
    tokenizer: Any
    folder: Path | None
    config_source: str
    tokenizer_source: str
    size: str
    eot: str | None


def model_source(
    recipe: Recipe,
    registry: Registry,
    store: Path,
    bucket: Bucket | None,
    *,
    stand_in: bool = False,
    reviews: Path | None = None,
) -> ModelSource:
    """The recipe's model config and tokenizer (a stand-in only when asked: see the module docstring).

    Raises:
        ModelStoreError: The model is not in the store (and no stand-in was asked for), a custom
            model is not in the bucket, or a tiny model cannot be built.
    """
    from transformers import AutoConfig

    entry = registry.get(recipe.model.id) if recipe.model.id else None
    eot = entry.eot if entry is not None else None
    size = "tiny" if recipe.model.tiny else "full"
    try:
        folder = model_folder(recipe, registry, store, bucket, reviews=reviews)
    except ModelStoreError:
        if not stand_in or entry is None or entry.chat is None or entry.architecture is None or recipe.model.tiny:
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
