"""Packing: placement, efficiency, collation, and packed losses equal to one-document-at-a-time losses."""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.data import packing
from finetune.data.packing import (
    VarlenUnsupportedError,
    collate,
    collate_padded,
    forward_packed,
    pack,
    packed_attn_implementation,
    packed_row,
    packing_efficiency,
    plan_rows,
)
from finetune.data.types import IGNORE_INDEX, PackedRow, TokenizedSample
from finetune.registry import Registry
from finetune.tiny import build_tokenizer, materialize_tiny, tiny_config

logger = logging.getLogger(__name__)
REGISTRY = Registry.load(Path(__file__).resolve().parents[2] / "model_registry.yaml")


def docs_of(lengths: list[int], seed: int = 0, vocab: int = 500) -> list[TokenizedSample]:
    """Random documents; every third label masked, as prompts are in chat data."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        out.append(TokenizedSample(f"doc{i}", ids, [t if j % 3 else IGNORE_INDEX for j, t in enumerate(ids)]))
    return out


def lognormal_lengths(n: int, median: int, sigma: float, most: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(most, max(16, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


# ------------------------------------------------------------------------------ placement


def test_every_document_is_placed_once_in_rows_that_fit() -> None:
    docs = docs_of(lognormal_lengths(500, 120, 1.0, 256))
    plan = plan_rows([len(d) for d in docs], 256)
    assert sorted(i for row in plan for i in row) == list(range(len(docs)))
    rows = pack(docs, 256)
    assert len(rows) == len(plan)
    for row, members in zip(rows, plan, strict=True):
        assert len(row) <= 256 and row.doc_lengths == [len(docs[i]) for i in members]
        assert row.input_ids == [t for i in members for t in docs[i].input_ids]
        assert row.position_ids == [p for i in members for p in range(len(docs[i]))]
        assert row.labels == [lab for i in members for lab in [IGNORE_INDEX, *docs[i].labels[1:]]]
    assert pack(docs, 256) == rows  # deterministic
    assert packed_row([docs[i] for i in plan[0]]) == rows[0]


def test_best_fit_decreasing_choice() -> None:
    # 6 opens row 0 (room 4); 5 opens row 1 (room 5); 4 fits row 0 exactly (best fit, not first fit);
    # 3 and 2 fill row 1. Ties in length keep input order.
    assert plan_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert plan_rows([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert plan_rows([], 8) == []


def test_documents_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="doc1: a document of 9 tokens cannot be packed into rows of 8"):
        pack(docs_of([3, 9]), 8)
    with pytest.raises(ValueError, match="a document of 0 tokens"):
        pack([TokenizedSample("empty", [], [])], 8)


def test_efficiency_on_a_realistic_length_mix() -> None:
    # Chat-like lengths: median 350 tokens, long tail to the maximum.
    docs = [TokenizedSample(f"d{i}", [1] * n, [1] * n) for i, n in enumerate(lognormal_lengths(2000, 350, 1.0, 2048))]
    rows = pack(docs, 2048)
    efficiency = packing_efficiency(rows, 2048)
    logger.info("packing efficiency %.4f over %d rows", efficiency, len(rows))
    assert efficiency >= 0.98
    assert sum(len(r) for r in rows) == sum(len(d) for d in docs)
    assert packing_efficiency([], 2048) == 0.0


# ------------------------------------------------------------------------------ collation


def test_collate_pads_as_a_separate_document() -> None:
    rows = pack(docs_of([5, 3, 4]), 8)  # [[5, 3], [4]]
    batch = collate(rows, pad_id=0, varlen=True)
    assert batch["input_ids"].shape == (2, 8) and "attention_mask" not in batch
    assert batch["input_ids"][1, 4:].tolist() == [0] * 4
    assert batch["labels"][1, 4:].tolist() == [IGNORE_INDEX] * 4
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 16]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 5
    offsets, longest = packing._cu_seq_lens(batch["position_ids"])
    assert offsets.tolist() == batch["cu_seq_lens_q"].tolist() and longest == 5

    unpacked = collate_padded(docs_of([2, 4]), pad_id=7)
    assert unpacked["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert unpacked["input_ids"][0, 2:].tolist() == [7, 7] and unpacked["labels"][0, 2:].tolist() == [-100, -100]


def test_forward_packed_refuses_a_cache_or_mask() -> None:
    batch = collate(pack(docs_of([3]), 4), pad_id=0)
    with pytest.raises(ValueError, match="without cache"):
        forward_packed(object(), batch, use_cache=True)
    with pytest.raises(ValueError, match="without cache"):
        forward_packed(object(), {**batch, "attention_mask": torch.ones(1, 3)})


# ------------------------------------------------------------------------------ equality

#: Documents longer than the tiny models' sliding window (32), a one-token one, padding in a row.
LENGTHS = [37, 5, 60, 1, 23, 48, 70, 2]
ROW = 128
FAMILIES = [
    ("smollm2-135m-instruct", "sdpa"),  # llama
    ("smollm2-135m-instruct", "eager"),
    ("gemma-3-1b-it", "sdpa"),  # sliding-window layers
    ("gemma-3-1b-it", "eager"),
    ("gemma-2-2b-it", "eager"),  # logit soft-capping, sliding window
    ("breeze-7b-instruct-v1.0", "sdpa"),  # mistral, sliding window
    ("phi-3.5-mini-instruct", "sdpa"),
]


def tiny_model(model_id: str, attn: str, dtype: torch.dtype = torch.float32) -> Any:
    entry = REGISTRY.get(model_id)
    assert entry is not None and entry.chat is not None
    config = tiny_config(entry, build_tokenizer(entry.chat, REGISTRY.chat_template(entry)))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each label predicted from the previous position (0 where ignored), as transformers shifts."""
    targets = labels[..., 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].float().flatten(0, -2), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    return losses.view(targets.shape)


def packed_losses(model: Any, docs: list[TokenizedSample], rows: list[PackedRow], **collate_kw: Any) -> dict:
    """(document, position) -> loss, from one packed batch."""
    batch = collate(rows, pad_id=0, **collate_kw)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = forward_packed(model, batch)
    losses = per_token_losses(out.logits, batch["labels"])
    plan = plan_rows([len(d) for d in docs], ROW)
    result = {}
    for b, members in enumerate(plan):
        start = 0
        for i in members:
            for t in range(1, len(docs[i])):
                if batch["labels"][b, start + t] != IGNORE_INDEX:
                    result[(i, t)] = losses[b, start + t - 1]
            start += len(docs[i])
    return {"losses": result, "loss": out.loss}


def worst_difference(packed: dict, alone: dict) -> float:
    assert packed.keys() == alone.keys()  # the same targets: none crosses a boundary, none is lost
    return max(abs(float((packed[k] - alone[k]).detach())) for k in alone)


def single_losses(model: Any, docs: list[TokenizedSample]) -> dict:
    """(document, position) -> loss, each document run alone."""
    device = next(model.parameters()).device
    result = {}
    for i, doc in enumerate(docs):
        ids = torch.tensor([doc.input_ids], device=device)
        logits = model(input_ids=ids, use_cache=False).logits
        losses = per_token_losses(logits, torch.tensor([doc.labels], device=device))[0]
        for t in range(1, len(doc)):
            if doc.labels[t] != IGNORE_INDEX:
                result[(i, t)] = losses[t - 1]
    return result


@pytest.mark.parametrize(("model_id", "attn"), FAMILIES)
def test_packed_losses_and_gradients_equal_one_at_a_time(model_id: str, attn: str) -> None:
    model = tiny_model(model_id, attn)
    docs = docs_of(LENGTHS)
    rows = pack(docs, ROW)
    assert len(rows) > 1 and min(len(r) for r in rows) < ROW  # several rows, one padded
    packed = packed_losses(model, docs, rows)
    alone = single_losses(model, docs)
    # Same targets: no token is predicted across a document boundary, none is lost.
    assert packed["losses"].keys() == alone.keys()
    keys = sorted(alone)
    torch.testing.assert_close(
        torch.stack([packed["losses"][k] for k in keys]), torch.stack([alone[k] for k in keys]), rtol=0, atol=1e-5
    )
    # transformers' own shifted loss over the packed batch is the mean over the same targets.
    torch.testing.assert_close(packed["loss"], torch.stack(list(alone.values())).mean(), rtol=0, atol=1e-5)

    params = [p for p in model.parameters() if p.requires_grad]
    grads_packed = torch.autograd.grad(torch.stack(list(packed["losses"].values())).sum(), params)
    grads_alone = torch.autograd.grad(torch.stack(list(single_losses(model, docs).values())).sum(), params)
    for gp, ga in zip(grads_packed, grads_alone, strict=True):
        torch.testing.assert_close(gp, ga, rtol=1e-4, atol=1e-5)


def test_materialized_model_folder_packs_equally(tmp_path: Path) -> None:
    """The same check on a model loaded from its folder, as training loads it."""
    entry = REGISTRY.get("llama-3.2-1b-instruct")
    assert entry is not None
    folder = materialize_tiny(entry, REGISTRY.chat_template(entry), tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert packed_attn_implementation("cpu", model.config) == "sdpa"
    docs = docs_of(LENGTHS)
    packed = packed_losses(model, docs, pack(docs, ROW))["losses"]
    assert worst_difference(packed, single_losses(model, docs)) <= 1e-5


# ------------------------------------------------------------------------------ the CUDA path, on CPU


def reference_varlen_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (torch 2.13 signature) in plain torch, causal only."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if enable_gqa:
            ks, vs = (t.repeat_interleave(qs.shape[0] // t.shape[0], 0) for t in (ks, vs))
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        allowed = (j <= i) & ((i - j <= window_size[0]) | (window_size[0] < 0))
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=allowed, scale=scale
        ).transpose(0, 1)
    return out


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "gemma-3-1b-it", "breeze-7b-instruct-v1.0"])
def test_varlen_attention_wiring_on_cpu(model_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA varlen path through transformers, with the kernel replaced by a CPU reference."""
    monkeypatch.setattr(packing, "_varlen_attn", lambda: reference_varlen_attn)
    monkeypatch.setattr(
        packing, "_varlen_params", lambda: frozenset(inspect.signature(reference_varlen_attn).parameters)
    )
    model = tiny_model(model_id, packing.register_varlen_attention())
    assert model.config._attn_implementation == packing.VARLEN_ATTENTION
    docs = docs_of(LENGTHS)
    rows = pack(docs, ROW)
    alone = single_losses(tiny_model(model_id, "sdpa"), docs)
    for collate_kw in ({"varlen": True}, {}):  # offsets from collate, or from position ids
        assert worst_difference(packed_losses(model, docs, rows, **collate_kw)["losses"], alone) <= 1e-5


def test_attention_implementation_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, capped = tiny_model("smollm2-135m-instruct", "sdpa").config, tiny_model("gemma-2-2b-it", "eager").config
    assert packed_attn_implementation("cpu", plain) == "sdpa"
    assert packed_attn_implementation("cpu", capped) == "eager"  # SDPA refuses logit soft-capping
    monkeypatch.setattr(packing, "_varlen_attn", lambda: reference_varlen_attn)
    assert packed_attn_implementation("cuda", plain) == packing.VARLEN_ATTENTION
    assert packed_attn_implementation("cuda", capped) == "flex_attention"
    monkeypatch.setattr(packing, "_varlen_attn", lambda: None)
    assert packed_attn_implementation("cuda", plain) == "flex_attention"


def torch_2_10_varlen_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool = False,
    return_aux: Any = None,
) -> torch.Tensor:
    """The first ``varlen_attn`` (torch 2.10): no scale, no GQA, no window."""
    assert is_causal and q.shape[1] == k.shape[1]
    return reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "granite-3.1-2b-instruct"])  # GQA; muP scaling
def test_varlen_attention_wiring_with_torch_2_10_signature(model_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "_varlen_attn", lambda: torch_2_10_varlen_attn)
    monkeypatch.setattr(
        packing, "_varlen_params", lambda: frozenset(inspect.signature(torch_2_10_varlen_attn).parameters)
    )
    docs = docs_of(LENGTHS)
    model = tiny_model(model_id, packing.register_varlen_attention())
    packed = packed_losses(model, docs, pack(docs, ROW), varlen=True)["losses"]
    assert worst_difference(packed, single_losses(tiny_model(model_id, "sdpa"), docs)) <= 1e-5
    with pytest.raises(VarlenUnsupportedError, match="no sliding window"):
        packed_losses(tiny_model("gemma-3-1b-it", packing.VARLEN_ATTENTION), docs, pack(docs, ROW), varlen=True)


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("model_id", ["smollm2-135m-instruct", "gemma-3-1b-it"])
@pytest.mark.parametrize("attn", ["varlen", "flex_attention"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_attention_isolates_documents(model_id: str, attn: str) -> None:
    """Packed per-token losses on CUDA equal SDPA one document at a time.

    varlen needs bf16, so it is compared in bf16 at 3e-2 (a leak across documents moves these
    losses by 0.1 to 1); FlexAttention runs fp32, held to 1e-4 (its kernel sums in another order).
    """
    if attn == "varlen":
        if packing._varlen_attn() is None:
            pytest.skip("this torch has no torch.nn.attention.varlen")
        attn, dtype, tolerance, collate_kw = packing.register_varlen_attention(), torch.bfloat16, 3e-2, {"varlen": True}
    else:
        dtype, tolerance, collate_kw = torch.float32, 1e-4, {}
    model = tiny_model(model_id, attn, dtype).cuda()
    docs = docs_of(LENGTHS)
    packed = packed_losses(model, docs, pack(docs, ROW), **collate_kw)["losses"]
    alone = single_losses(tiny_model(model_id, "sdpa", dtype).cuda(), docs)
    worst = worst_difference(packed, alone)
    logger.warning("%s %s: largest per-token loss difference %.2e", model_id, attn, worst)
    assert worst <= tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_paths_agree_and_speed_report() -> None:
    """Document-causal attention over 4 x 4096 packed tokens (32 heads of 128, 8 kv heads, bf16).

    varlen (through :func:`varlen_attention_forward`), FlexAttention with a document block mask and
    SDPA with a 4D block-diagonal mask must agree; their forward + backward times are logged so
    the fastest can be kept (no timing assert).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = [
        length for row in pack(docs_of(lognormal_lengths(64, 700, 0.8, 4096)), 4096)[:4] for length in row.doc_lengths
    ]
    total, heads, kv_heads, dim = sum(lengths), 32, 8, 128
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    position_ids = torch.cat([torch.arange(n) for n in lengths]).cuda()[None]
    module = torch.nn.Module().eval()

    def document_causal(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block_mask = create_block_mask(document_causal, None, None, total, total, device="cuda")
    flex = torch.compile(flex_attention)
    dense_mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
    paths = {
        "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2),
        "sdpa_4d_mask": lambda: torch.nn.functional.scaled_dot_product_attention(  # memory-efficient kernel
            q,
            k.repeat_interleave(heads // kv_heads, 1),
            v.repeat_interleave(heads // kv_heads, 1),
            attn_mask=dense_mask,
        ).transpose(1, 2),
    }
    if packing._varlen_attn() is not None:
        paths["varlen"] = lambda: packing.varlen_attention_forward(module, q, k, v, None, position_ids=position_ids)[0]
    outputs, timings = {}, {}
    for name, run in paths.items():
        for step in range(5):  # the first two compile / warm up
            if step == 2:
                torch.cuda.synchronize()
                start = time.perf_counter()
            out = run()
            out.float().square().mean().backward()
        torch.cuda.synchronize()
        timings[name] = round((time.perf_counter() - start) / 3 * 1000, 3)
        outputs[name] = out.detach().float()
    logger.warning("document-causal attention fwd+bwd ms on %s: %s", torch.cuda.get_device_name(), timings)
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["sdpa_4d_mask"], rtol=2e-2, atol=2e-2, msg=name)
