"""What a training benchmark trains on: a random-weight model folder and synthetic chat data.

The model is a registry architecture with random weights, either at full size (the registry's
own config, for GPUs) or scaled down by :func:`finetune.tiny.tiny_config` (for CPUs). Its
tokenizer is byte-level BPE learned from the synthetic corpus of ``synthetic.py`` with the
family's special tokens and chat template, so synthetic chat rows get the token-length mix they
were designed for (a real 32k-128k vocabulary: about 0.75 words a token). At full size the
config keeps the family's real vocabulary (the embedding and the LM head cost what they cost
in the real model); the tokenizer only uses its first ids.

The folder is an ordinary Hugging Face model folder (``config.json``, safetensors weights,
tokenizer files), so both trainers load it the way they load a real model.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import chat_rows, corpus, write_jsonl  # noqa: E402

from finetune.registry import ModelEntry, Registry  # noqa: E402

logger = logging.getLogger(__name__)

#: Keys of a registry architecture that make no sense for a random-weight model.
_DROPPED_KEYS = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version")


def train_tokenizer(entry: ModelEntry, registry: Registry, vocab_size: int, passages: int) -> Any:
    """A fast BPE tokenizer learned from the synthetic corpus, with the family's chat spec and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat = entry.chat
    if chat is None:
        raise ValueError(f"{entry.id} has no chat spec")
    specials = chat.special_tokens()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(passages), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=chat.bos,
        eos_token=chat.eos,
        pad_token=chat.pad or chat.eos,
        extra_special_tokens=[t for t in specials if t not in {chat.bos, chat.eos, chat.pad}],
        chat_template=registry.chat_template(entry),
        clean_up_tokenization_spaces=False,
    )


def model_config(entry: ModelEntry, tokenizer: Any, size: str) -> Any:
    """The config of the benchmark model: the registry's architecture at full size, or scaled down."""
    from transformers import AutoConfig

    from finetune.tiny import tiny_config

    if size == "tiny":
        config = tiny_config(entry, tokenizer)
    elif size == "full":
        kwargs = {k: v for k, v in entry.config_kwargs().items() if k not in _DROPPED_KEYS}
        config = AutoConfig.for_model(**kwargs)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than the model's {config.vocab_size}")
    else:
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.use_cache = False
    return config


def build_model_folder(
    entry: ModelEntry, registry: Registry, dest: Path, *, size: str, vocab: int, passages: int, seed: int = 0
) -> Path:
    """Write a random-weight model of ``entry`` with its tokenizer to ``dest`` (Hugging Face layout).

    Weights are initialised on the GPU when there is one (an 8B model takes seconds there, minutes
    on a CPU) and stored in bf16 at full size, fp32 when tiny.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(entry, registry, vocab, passages)
    config = model_config(entry, tokenizer, size)
    dtype = torch.bfloat16 if size == "full" else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("random-weight %s (%s) written to %s", entry.id, size, dest)
    return dest


@dataclass
class BenchData:
    """The tokenised samples (unpacked) both trainers start from, and how long they are."""

    samples: list[Any]  # finetune.data.types.TokenizedSample
    dropped: int
    rows: int

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]


def make_recipe(
    model_id: str,
    *,
    method: str,
    seq_len: int,
    packing: bool,
    micro_batch: int,
    steps: int,
    warmup: int,
    precision: str,
    grad_ckpt: bool,
    lr: float | None,
    seed: int = 0,
) -> Any:
    """The recipe our engine runs (and whose hyper-parameters the baseline copies)."""
    from finetune.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {"id": model_id},
            "data": {
                "path": "chat.jsonl",
                "format": "messages",
                "max_seq_len": seq_len,
                "packing": packing,
                "eval": {"fraction": 0.0},
            },
            "method": {"type": method},
            "training": {
                "max_steps": steps,
                "learning_rate": lr,
                "scheduler": "cosine",
                "warmup_steps": warmup,
                "micro_batch_size": micro_batch,
                "gradient_accumulation_steps": 1,
                "precision": precision,
                "gradient_checkpointing": grad_ckpt,
                "seed": seed,
            },
        }
    )


def prepare_data(
    model_dir: Path, workdir: Path, recipe: Any, eot: str, *, rows: int, workers: int = 1, seed: int = 0
) -> BenchData:
    """Synthetic chat rows through the engine's own data path (read, chat template, labels), unpacked.

    No dataset cache is used (it needs the ``datasets`` library, which the benchmark does not).
    """
    from finetune.data.pipeline import prepare
    from finetune.loading import load_tokenizer
    from finetune.storage import Bucket

    bucket = workdir / "bucket"
    write_jsonl(bucket / "chat.jsonl", chat_rows(rows, seed=seed, max_tokens=recipe.data.max_seq_len))
    unpacked = recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": False})})
    prepared = prepare(unpacked, Bucket.folder(bucket), load_tokenizer(model_dir), eot=eot, workers=workers)
    report = prepared.report
    return BenchData(samples=list(prepared.train), dropped=report.rows_read - len(prepared.train), rows=rows)
