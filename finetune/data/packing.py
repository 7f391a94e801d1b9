"""Packing tokenised samples into training rows, collating rows into batches, and packed attention.

**Packing** is best-fit decreasing: documents, longest first, each go into the open row with the
least room that still holds them (ties: the oldest row), else a new row. It is deterministic and
takes O(n log n). Rows come out longest documents first: the caller shuffles them.

**Label shift.** A causal LM's logits at position ``t`` predict the token at ``t + 1``
(transformers shifts ``labels`` inside the model). In a packed row the last token of one document
would predict the first token of the next, so the first label of every document is
``IGNORE_INDEX``. A document run on its own never predicts its first token either, so a packed row
trains exactly the tokens its documents train one at a time.

**Document isolation.** Position ids restart at 0 at each document; attention never crosses a
document boundary:

* CPU (SDPA or eager): no ``attention_mask``; transformers reads the document boundaries from the
  restarting ``position_ids`` and builds a block-diagonal causal mask, but only when the forward
  pass has no cache, so ``use_cache=False`` must be passed: :func:`forward_packed` does it. With a
  cache (transformers' default) the documents see each other.
* CUDA: variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``) through the
  ``"finetune_varlen"`` attention implementation (:func:`register_varlen_attention`), fed with
  ``cu_seq_lens`` from :func:`collate` (``varlen=True``); FlexAttention with transformers'
  document block mask (``"flex_attention"``) where varlen cannot serve (logit soft-capping). See
  :func:`packed_attn_implementation`.

Padding at the end of a row is one more pseudo-document (positions from 0, labels ignored), so it
never joins a real document's attention.
"""

from __future__ import annotations

import heapq
import inspect
import logging
from bisect import bisect_left, insort
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from finetune.data.types import IGNORE_INDEX, PackedRow, TokenizedSample

logger = logging.getLogger(__name__)


class VarlenUnsupportedError(ValueError):
    """The model needs an attention feature PyTorch's varlen kernel does not have (FlexAttention does)."""


#: Name under which :func:`varlen_attention_forward` is registered in transformers' AttentionInterface.
VARLEN_ATTENTION = "finetune_varlen"


def pack(samples: Sequence[TokenizedSample], max_seq_len: int) -> list[PackedRow]:
    """Pack documents into rows of at most ``max_seq_len`` tokens (best-fit decreasing).

    Equivalent to :func:`plan_rows` on the lengths, then :func:`packed_row` for each row; a data
    loader holding many tokens can keep the plan and build rows when they are read.

    Args:
        samples: Tokenised documents, each of 1 to ``max_seq_len`` tokens (truncate or drop
            longer ones first).
        max_seq_len: Tokens in a row.

    Returns:
        The rows, in the order they were opened; within a row, documents longest first. Every
        document is in exactly one row; the first label of each document is ``IGNORE_INDEX``.

    Raises:
        ValueError: A document is empty or longer than ``max_seq_len``.
    """
    plan = plan_rows([len(sample) for sample in samples], max_seq_len, names=[s.where for s in samples])
    positions = list(range(max_seq_len))  # shared int objects: rows only copy references
    rows = [packed_row([samples[i] for i in members], positions) for members in plan]
    logger.info(
        "packed %d documents into %d rows of %d tokens: %.2f%% of token slots hold real tokens",
        len(samples),
        len(rows),
        max_seq_len,
        100 * packing_efficiency(rows, max_seq_len),
    )
    return rows


def plan_rows(lengths: Sequence[int], max_seq_len: int, *, names: Sequence[str] | None = None) -> list[list[int]]:
    """Which documents go into which row: best-fit decreasing, deterministic, O(n log n).

    Documents are placed longest first (ties: lower index first), each into the open row with
    the least room that holds it (ties: the row opened first), else into a new row.

    Args:
        lengths: Token count of each document.
        max_seq_len: Tokens in a row.
        names: Where each document comes from, for error messages.

    Returns:
        For each row, the indices of its documents in placement order.

    Raises:
        ValueError: A length is below 1 or above ``max_seq_len``.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    for i, size in enumerate(lengths):
        if not 0 < size <= max_seq_len:
            where = names[i] if names is not None else f"document {i}"
            raise ValueError(
                f"{where}: a document of {size} tokens cannot be packed into rows of {max_seq_len}; "
                "truncate or drop it first"
            )
    bins: list[list[int]] = []
    open_by_room: dict[int, list[int]] = {}  # room left -> heap of row numbers with that room
    rooms: list[int] = []  # sorted keys of open_by_room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        k = bisect_left(rooms, size)
        if k == len(rooms):
            row, room = len(bins), max_seq_len
            bins.append([])
        else:
            room = rooms[k]
            row = heapq.heappop(open_by_room[room])
            if not open_by_room[room]:
                del open_by_room[room]
                del rooms[k]
        bins[row].append(i)
        room -= size
        if room > 0:
            if room in open_by_room:
                heapq.heappush(open_by_room[room], row)
            else:
                open_by_room[room] = [row]
                insort(rooms, room)
    return bins


def packed_row(docs: Sequence[TokenizedSample], positions: Sequence[int] | None = None) -> PackedRow:
    """One row holding ``docs`` in order: position ids restart and the first label of each is ignored.

    Args:
        docs: The row's documents.
        positions: ``list(range(n))`` for some ``n`` at least the longest document, to share.
    """
    if positions is None:
        positions = range(max((len(doc) for doc in docs), default=0))
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for doc in docs:
        input_ids += doc.input_ids
        labels.append(IGNORE_INDEX)  # never predicted from the previous document's last token
        labels += doc.labels[1:]
        position_ids += positions[: len(doc)]
    return PackedRow(input_ids, labels, position_ids, [len(doc) for doc in docs])


def packing_efficiency(rows: Sequence[PackedRow], max_seq_len: int) -> float:
    """Real tokens / token slots (``len(rows) * max_seq_len``); 0.0 for no rows."""
    if not rows:
        return 0.0
    return sum(len(row) for row in rows) / (len(rows) * max_seq_len)


# ------------------------------------------------------------------------------ batches


def collate(rows: Sequence[PackedRow], pad_id: int, *, varlen: bool = False) -> dict[str, Any]:
    """A batch of packed rows, padded to the longest row, for :func:`forward_packed`.

    There is deliberately no ``attention_mask``: the documents are told apart by ``position_ids``.

    Args:
        rows: Packed rows.
        pad_id: Token id of padding.
        varlen: Also give the variable-length attention arguments transformers knows
            (``cu_seq_lens_q``/``_k``: int32 offsets of every document, padding included, in the
            batch flattened to one sequence; ``max_length_q``/``_k``: Python ints), for the
            ``"finetune_varlen"`` and flash attention implementations.

    Returns:
        ``input_ids``, ``labels`` (padding ``IGNORE_INDEX``), ``position_ids`` (padding counts from
        0 as a document of its own), all ``[batch, length]`` int64 tensors; and the varlen keys.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    length = max(len(row) for row in rows)
    input_ids, labels, position_ids = [], [], []
    segments: list[int] = []
    for row in rows:
        pad = length - len(row)
        input_ids.append(row.input_ids + [pad_id] * pad)
        labels.append(row.labels + [IGNORE_INDEX] * pad)
        position_ids.append(row.position_ids + list(range(pad)))
        segments.extend(row.doc_lengths or [len(row)])
        if pad:
            segments.append(pad)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }
    if varlen:
        offsets = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(
            cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=max(segments), max_length_k=max(segments)
        )
    return batch


def collate_padded(samples: Sequence[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of unpacked samples (``packing: false``), right-padded to the longest.

    Returns:
        ``input_ids``, ``labels`` (padding ``IGNORE_INDEX``) and ``attention_mask`` (1 on real
        tokens), ``[batch, length]`` int64 tensors.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s) for s in samples)
    pads = [length - len(s) for s in samples]
    return {
        "input_ids": torch.tensor([s.input_ids + [pad_id] * p for s, p in zip(samples, pads, strict=True)]),
        "labels": torch.tensor([s.labels + [IGNORE_INDEX] * p for s, p in zip(samples, pads, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * p for s, p in zip(samples, pads, strict=True)]),
    }


def forward_packed(model: Any, batch: dict[str, Any], **kwargs: Any) -> Any:
    """Run a causal LM on a packed batch with documents kept apart (``use_cache=False``).

    Args:
        model: A transformers causal LM.
        batch: From :func:`collate`, on the model's device.
        **kwargs: More forward arguments (not ``use_cache``, not ``attention_mask``).

    Returns:
        The model's output (with ``loss`` when the batch has ``labels``).
    """
    if kwargs.pop("use_cache", False) or "attention_mask" in batch or "attention_mask" in kwargs:
        raise ValueError("a packed batch runs without cache and without attention_mask, or documents see each other")
    return model(**batch, use_cache=False, **kwargs)


# ------------------------------------------------------------------------------ CUDA attention


def packed_attn_implementation(device: torch.device | str, config: Any) -> str:
    """The attention implementation that keeps packed documents apart on ``device``.

    CPU: ``"sdpa"`` (``"eager"`` for models with attention logit soft-capping, which SDPA refuses).
    CUDA: ``"finetune_varlen"`` where ``varlen_attn`` exists and the model needs no soft-capping,
    else ``"flex_attention"``.
    """
    softcap = getattr(config, "attn_logit_softcapping", None)
    if torch.device(device).type != "cuda":
        return "eager" if softcap else "sdpa"
    if softcap or _varlen_attn() is None:
        return "flex_attention"
    register_varlen_attention()
    return VARLEN_ATTENTION


def register_varlen_attention() -> str:
    """Register :func:`varlen_attention_forward` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


@cache
def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@cache
def _varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_varlen_attn()).parameters)


def _cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document offsets in the flattened batch from restarting position ids (synchronises the GPU)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    ends = torch.cat([starts, starts.new_tensor([flat.numel()])])
    return ends.to(torch.int32), int(ends.diff().max())


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal variable-length flash attention over packed documents (transformers attention function).

    ``query`` is ``[batch, heads, length, head_dim]``, ``key``/``value`` ``[batch, kv_heads, length,
    head_dim]`` (fp16 or bf16, CUDA). Documents are the ``cu_seq_lens_q`` offsets of
    :func:`collate` (``varlen=True``), or else where ``position_ids`` restart at 0. A sliding window
    of ``w`` lets a token see itself and the ``w - 1`` before it, as transformers' masks do. Works
    with torch 2.10's ``varlen_attn`` (``is_causal``, no scale, no GQA, no window) and later ones
    (``window_size``, ``scale``, ``enable_gqa``).

    Returns:
        The attention output ``[batch, length, heads, head_dim]`` and no weights.
    """
    if softcap is not None:
        raise VarlenUnsupportedError("varlen attention has no logit soft-capping; use flex_attention")
    if dropout and module.training:
        raise VarlenUnsupportedError("varlen attention has no attention dropout")
    batch, heads, length, dim = query.shape
    offsets, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if offsets is None or longest is None:
        offsets, longest = _cu_seq_lens(kwargs["position_ids"].expand(batch, -1))
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    params = _varlen_params()
    extra: dict[str, Any] = {}
    if "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None:  # torch 2.10's varlen_attn always scales by dim ** -0.5
        q = q * (scaling * dim**0.5)
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if "window_size" in params:
        extra["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif sliding_window is not None:
        raise VarlenUnsupportedError("this torch's varlen_attn has no sliding window; use flex_attention")
    else:
        extra["is_causal"] = True
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    out = _varlen_attn()(q, k, v, offsets, offsets, int(longest), int(longest), **extra)
    return out.reshape(batch, length, heads, -1), None
