"""Tiny random-weight models of registry architectures, built offline for tests and the quick-start.

A tiny model keeps the family's structure (``model_type``, attention grouping, per-layer
attention pattern, rope scaling type, multipliers, tied embeddings) at a size that trains on a
laptop CPU in seconds, so the real loading, chat-rendering and training code runs on real files
without a model hub.

The tokenizer is byte-level BPE learned from a small built-in corpus: every UTF-8 string
round-trips exactly, and the family's special tokens are atomic special tokens. It prepends
``bos`` to plain text (``add_special_tokens=True``) only for families with a dedicated bos token
that their chat template emits: Llama 3, Mistral and Gemma, whose real tokenizers do the same.
Families whose "bos" doubles as eos (Granite, OLMo 2, Phi-4) or whose template never emits it
(Phi-3.5, SmolLM2, Falcon 3) get nothing prepended. Chat rendering never doubles ``bos``:
``apply_chat_template`` renders text that already holds it and tokenizes that text with
``add_special_tokens=False``, as it does for the real tokenizers.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

from finetune.errors import FinetuneError
from finetune.modelstore import scan_folder
from finetune.registry import ChatSpec, ModelEntry

logger = logging.getLogger(__name__)

#: Vocabulary size the BPE trainer aims for (256 byte symbols, special tokens, learned merges).
DEFAULT_VOCAB_SIZE = 1024
#: Upper bound of a tiny model's context length.
TINY_MAX_POSITIONS = 4096
#: Sliding-window length of tiny models whose family uses a real (shorter than context) window.
TINY_SLIDING_WINDOW = 32
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_HEAD_DIM = TINY_HIDDEN // TINY_HEADS
TINY_INTERMEDIATE = 128
TINY_LAYERS = 2

#: Keys of a real ``config.json`` that make no sense for a tiny random model (or are unsafe).
_DROPPED_KEYS = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model learns nothing, but it loads like a real one.",
    "You are a helpful assistant. Answer the user's question briefly and politely, in the user's language.",
    "The system prompt sets the rules; the user asks; the assistant answers; then the turn ends.",
    "Fine-tuning adapts a pretrained model to a task with LoRA, QLoRA or full training of every weight.",
    "Training runs offline: no network, no remote code, and only safetensors weight files are ever read.",
    "Each checkpoint is complete or ignored, and resuming it continues the loss curve of the first run.",
    "Please summarise the following paragraph in three sentences, then list the key terms it uses.",
    "What is the capital of Taiwan? Taipei is the capital, and Kaohsiung is the largest southern port.",
    "Numbers and code: for i in range(10): total += i * 2  # 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 2024",
    'JSON: {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"}',
    "你好，我是一個樂於助人的助理。請用繁體中文回答使用者的問題，並保持簡潔與禮貌。",
    "臺灣位於東亞，首都是臺北市。高雄是南部最大的港口城市，臺中與臺南也是重要的都市。",
    "機器學習模型需要大量的資料進行訓練，微調可以讓預訓練模型適應特定的任務與領域。",
    "系統提示設定規則，使用者提出問題，助理給予回答，然後這一輪對話就結束了。",
    "今天天氣很好，我們一起去公園散步吧。晚上再到夜市吃小吃，喝一杯珍珠奶茶。",
    "請將下列段落翻譯成英文，並說明其中的專有名詞。語言模型的訓練與評估都很重要。",
    "資料的品質比數量更重要。清理資料、移除重複內容、保護個人隱私，都是訓練前的必要步驟。",
    "這個模型只有兩層，權重是隨機的，但是它的架構與真正的模型相同，可以用來測試程式。",
    "Mixed text 混合文字: the model 模型 reads English 英文 and Chinese 中文 in one sentence 句子.",
    "User 使用者: 請問 LoRA 是什麼？ Assistant 助理: LoRA 是一種低秩調整的微調方法。",
)


@lru_cache(maxsize=32)
def _trained_bpe(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    """Learn the BPE merges once per special-token set; return the tokenizer as JSON."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def _prepends_bos(chat: ChatSpec, template: str) -> bool:
    """Whether plain-text encoding prepends bos: a dedicated bos token that the chat template emits."""
    return chat.bos is not None and chat.bos not in (chat.eos, chat.eot) and "bos_token" in template


def build_tokenizer(
    chat: ChatSpec,
    template: str,
    vocab_size: int | None = None,
    *,
    model_max_length: int = TINY_MAX_POSITIONS,
) -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer with a family's special tokens and chat template.

    Args:
        chat: The family's chat spec: its bos, eos, eot, pad and extra special tokens.
        template: The Jinja chat template text (``Registry.chat_template(entry)``).
        vocab_size: Target vocabulary size of the BPE trainer, special tokens included
            (default :data:`DEFAULT_VOCAB_SIZE`). The small corpus may stop it short of that.
        model_max_length: The tokenizer's ``model_max_length``.

    Returns:
        A fast tokenizer that round-trips any UTF-8 text and never splits the special tokens
        (see the module docstring for when it prepends ``bos``).
    """
    specials = tuple(chat.special_tokens())
    backend = Tokenizer.from_str(_trained_bpe(specials, vocab_size or DEFAULT_VOCAB_SIZE))
    named = {chat.bos, chat.eos, chat.pad}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=chat.bos,
        eos_token=chat.eos,
        pad_token=chat.pad or chat.eos,
        extra_special_tokens=[t for t in specials if t not in named],
        add_bos_token=_prepends_bos(chat, template),
        add_eos_token=False,
        chat_template=template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _scaled_length(length: int, real_max: int, tiny_max: int) -> int:
    """A length scaled by ``tiny_max / real_max`` (at least 1), capped at ``tiny_max``."""
    return max(1, min(tiny_max, length * tiny_max // real_max))


def _resample(factors: list[float], n: int) -> list[float]:
    """``n`` evenly spaced values of ``factors`` (first and last kept): per-frequency rope factors."""
    return [factors[round(i * (len(factors) - 1) / max(n - 1, 1))] for i in range(n)]


def _scaled_rope(rope: Any, real_max: int, tiny_max: int, rotary_pairs: int) -> Any:
    """Rope scaling parameters (flat, or nested per layer type) with their sizes scaled down."""
    if not isinstance(rope, dict):
        return rope
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return {k: _scaled_rope(v, real_max, tiny_max, rotary_pairs) for k, v in rope.items()}
    out = dict(rope)
    if isinstance(original := out.get("original_max_position_embeddings"), int):
        out["original_max_position_embeddings"] = _scaled_length(original, real_max, tiny_max)
    for key in ("short_factor", "long_factor"):
        if isinstance(out.get(key), list):
            out[key] = _resample(out[key], rotary_pairs)
    return out


def _tiny_kv_heads(heads: int, kv_heads: int) -> int:
    """Key/value heads of the tiny model: MHA stays MHA, MQA stays MQA, GQA stays GQA (2 groups)."""
    return TINY_HEADS if kv_heads >= heads else 1 if kv_heads == 1 else 2


def _require(entry: ModelEntry) -> tuple[dict[str, Any], ChatSpec]:
    if entry.architecture is None or entry.chat is None:
        raise FinetuneError(f"model '{entry.id}' has no architecture or chat spec; a tiny model cannot be built for it")
    return entry.architecture, entry.chat


def tiny_config(entry: ModelEntry, tokenizer: PreTrainedTokenizerFast | None = None) -> PretrainedConfig:
    """The entry's architecture scaled down to a tiny model of the same family.

    Sizes become 2 layers, hidden 64, 4 heads of dimension 16 and intermediate 128. Everything
    else the entry records is kept; values that refer to sizes are scaled with them: the
    per-layer attention pattern (one layer of each kind when the family mixes them), the
    sliding window, rope ``original_max_position_embeddings`` and per-frequency factors,
    ``query_pre_attn_scalar`` and Granite's ``attention_multiplier``.

    Args:
        entry: A registry entry with an architecture and a chat spec.
        tokenizer: The tiny tokenizer (vocabulary size and special token ids come from it);
            built from the entry's chat spec when not given.

    Returns:
        The tiny model's configuration.

    Raises:
        FinetuneError: The entry has no architecture or chat spec, or transformers rejects it.
    """
    arch, chat = _require(entry)
    if tokenizer is None:
        tokenizer = build_tokenizer(chat, "")
    kwargs = {k: v for k, v in entry.config_kwargs().items() if k not in _DROPPED_KEYS}
    try:
        real = AutoConfig.for_model(**copy.deepcopy(kwargs))
    except Exception as exc:  # transformers raises ValueError or huggingface_hub's StrictDataclassError
        raise FinetuneError(f"model '{entry.id}': transformers rejects its architecture: {exc}") from exc
    heads = int(real.num_attention_heads)
    real_head_dim = int(getattr(real, "head_dim", None) or real.hidden_size // heads)
    real_max = int(getattr(real, "max_position_embeddings", None) or TINY_MAX_POSITIONS)
    tiny_max = min(real_max, TINY_MAX_POSITIONS)
    kwargs.update(
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=_tiny_kv_heads(heads, int(getattr(real, "num_key_value_heads", None) or heads)),
        max_position_embeddings=tiny_max,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if hasattr(real, "head_dim"):
        kwargs["head_dim"] = TINY_HEAD_DIM
    if getattr(real, "layer_types", None):
        kinds = list(dict.fromkeys(real.layer_types))
        kwargs["layer_types"] = (kinds * TINY_LAYERS)[:TINY_LAYERS] if len(kinds) == 1 else kinds[:TINY_LAYERS]
        kwargs.pop("sliding_window_pattern", None)
    window = getattr(real, "sliding_window", None)
    if window is not None:
        kwargs["sliding_window"] = tiny_max if window >= real_max else min(window, TINY_SLIDING_WINDOW)
    if isinstance(original := arch.get("original_max_position_embeddings"), int):  # phi3 keeps it top-level
        kwargs["original_max_position_embeddings"] = _scaled_length(original, real_max, tiny_max)
    for key in ("rope_scaling", "rope_parameters"):
        if key in kwargs:
            rope = kwargs[key] if isinstance(kwargs[key], dict) else {}
            partial = float(rope.get("partial_rotary_factor") or kwargs.get("partial_rotary_factor") or 1.0)
            kwargs[key] = _scaled_rope(kwargs[key], real_max, tiny_max, int(TINY_HEAD_DIM * partial) // 2)
    if getattr(real, "query_pre_attn_scalar", None):
        kwargs["query_pre_attn_scalar"] = max(1, round(real.query_pre_attn_scalar * TINY_HEAD_DIM / real_head_dim))
    multiplier = getattr(real, "attention_multiplier", None)
    if multiplier and multiplier > 0 and multiplier != 1.0:
        # muP scales attention scores by head_dim ** -p; keep p, not the number.
        power = -math.log(multiplier) / math.log(real_head_dim)
        kwargs["attention_multiplier"] = TINY_HEAD_DIM**-power
    try:
        return AutoConfig.for_model(**kwargs)
    except Exception as exc:  # transformers raises ValueError or huggingface_hub's StrictDataclassError
        raise FinetuneError(f"model '{entry.id}': the scaled-down architecture is not valid: {exc}") from exc


def materialize_tiny(entry: ModelEntry, template: str, dest: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a complete Hugging Face model folder with a tiny random-weight model of the entry.

    The folder holds ``config.json``, ``generation_config.json`` (stopping on both eos and the
    end-of-turn token), fp32 ``model.safetensors`` and the tokenizer files: no pickle, no code.
    It is built in a temporary folder next to ``dest`` and renamed into place at the end, so
    ``dest`` is either complete or absent. The same seed gives byte-identical weights.

    Args:
        entry: A registry entry with an architecture and a chat spec.
        template: The entry's chat template text (``Registry.chat_template(entry)``).
        dest: The folder to create.
        seed: Seed of the random weights.
        overwrite: Replace ``dest`` if it exists (otherwise that is an error).

    Returns:
        ``dest``.

    Raises:
        FinetuneError: The entry cannot be built, or ``dest`` exists and ``overwrite`` is false.
    """
    _, chat = _require(entry)
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FinetuneError(f"{dest} already exists; pass overwrite=True to replace it")
    tokenizer = build_tokenizer(chat, template)
    config = tiny_config(entry, tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stop_ids = list(dict.fromkeys(tokenizer.get_vocab()[t] for t in (chat.eos, chat.eot)))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _, unsafe = scan_folder(tmp)
        if unsafe:
            raise FinetuneError(f"refusing to publish a tiny model that fails the store's checks: {unsafe}")
        os.chmod(tmp, 0o755)
        if dest.exists():
            if not overwrite:  # another process published the same model meanwhile (same seed, same bytes)
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("materialised tiny %s model '%s' at %s", config.model_type, entry.id, dest)
    return dest
