"""Training FLOPs per token and the devices' peak FLOP/s: the one place the formulas live.

Used by the throughput benchmark (MFU and HFU) and by the estimator (points a job needs).

Model FLOPs per trained token (PaLM, appendix B; the formulas ops quote):

- full fine-tuning: ``6·N + 12·L·H·Q·T``
- LoRA / QLoRA:     ``4·N + 6·N_adapter + 12·L·H·Q·T`` (the frozen weights need no weight
  gradient, so their backward pass costs ``2·N`` instead of ``4·N``)

``N`` counts the parameters that take part in matrix products: every parameter except the input
embedding table, which is a lookup (with tied embeddings the table is also the output head, so it
counts once). ``L`` is the number of layers, ``H·Q`` the width of the queries (heads x head
dimension), ``T`` the attention length: with several documents per row (packing, or one per padded
row) each token attends within its own document only, so ``T = sum(len^2) / sum(len)``.

Hardware FLOPs (HFU) add what activation checkpointing recomputes: one more forward pass,
``2·N + 4·L·H·Q·T`` per token (for LoRA the adapters' forward is part of ``2·N``'s rounding and
is left out).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

FORMULAS = {
    "full": "6*N + 12*L*H*Q*T per token",
    "lora": "4*N + 6*N_adapter + 12*L*H*Q*T per token",
    "recompute": "+ 2*N + 4*L*H*Q*T per token with activation checkpointing (hardware FLOPs only)",
    "N": "parameters in matrix products: all but the input embedding lookup (counted once when tied to the head)",
    "T": "sum(len^2) / sum(len) over the documents (attention stays within a document)",
    "head": "the formulas count the LM head at every token; our engine runs it on trained positions only, "
    "so its MFU counts head work it skips (as with any algorithmic saving)",
}

# Dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (without sparsity).
PEAK_BF16 = {
    "h100-sxm": 989.4e12,
    "h100-pcie": 756.0e12,
    "h100-nvl": 835.0e12,
    "h200": 989.4e12,
    "a100": 312.0e12,
}


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need from a model."""

    params: int  # N: parameters in matrix products
    layers: int  # L
    query_width: int  # H * Q

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def shape_of(model: Any) -> ModelShape:
    """The shape of a loaded ``transformers`` model (peft-wrapped or not); adapters are not counted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _text_config(base.config)
    seen: set[int] = set()
    total = 0
    for name, param in base.named_parameters():
        if id(param) in seen or "lora_" in name:
            continue
        seen.add(id(param))
        total += _numel(param)
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is not None and head.weight is embed
    params = total if tied else total - _numel(embed)
    return ModelShape(params=params, layers=config.num_hidden_layers, query_width=_query_width(config))


def _numel(param: Any) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 partitions report ds_numel


def _query_width(config: Any) -> int:
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * int(head_dim)


def shape_from_config(config: Any) -> ModelShape:
    """The shape of a model from its config alone (no weights): a dense decoder's parameter count.

    Counts attention (q, k, v, o), the gated MLP (three matrices), norms and the output head; the
    estimator uses it where the model is not loaded. Exact for Llama-style models, within a few
    per cent for families with extra biases or norms.
    """
    c = _text_config(config)
    d, layers, vocab = int(c.hidden_size), int(c.num_hidden_layers), int(c.vocab_size)
    q = _query_width(c)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    head_dim = q // int(c.num_attention_heads)
    attn = d * q + 2 * d * kv_heads * head_dim + q * d
    mlp = 3 * d * int(c.intermediate_size)
    per_layer = attn + mlp + 2 * d
    params = layers * per_layer + d + vocab * d  # final norm + head (the lookup is not a product)
    return ModelShape(params=params, layers=layers, query_width=q)


def attention_length(lengths: Iterable[int]) -> float:
    """``T = sum(len^2) / sum(len)``: the mean attention span of a token, documents kept apart."""
    square = total = 0
    for n in lengths:
        square += n * n
        total += n
    return square / total if total else 0.0


def flops_per_token(
    shape: ModelShape, method: str, attn_len: float, *, adapter_params: int = 0, recompute: bool = False
) -> tuple[float, float]:
    """Model FLOPs and hardware FLOPs per trained token (see the module docstring)."""
    attention = 12.0 * shape.layers * shape.query_width * attn_len
    if method == "full":
        model = 6.0 * shape.params + attention
    elif method in ("lora", "qlora"):
        model = 4.0 * shape.params + 6.0 * adapter_params + attention
    else:
        raise ValueError(f"unknown method {method!r}")
    hardware = model + (2.0 * shape.params + attention / 3.0 if recompute else 0.0)
    return model, hardware


def gpu_kind(name: str) -> str | None:
    """The key of :data:`PEAK_BF16` for a CUDA device name, or None when it is not known."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n:
        if "pcie" in n:
            return "h100-pcie"
        if "nvl" in n:
            return "h100-nvl"
        return "h100-sxm"
    if "a100" in n:
        return "a100"
    return None


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by name; None for CPUs and unknown devices."""
    kind = gpu_kind(device_name)
    return PEAK_BF16[kind] if kind else None
