"""Gradient accumulation is exact: micro batch 1 x 4 accumulation steps trains as micro batch 4 x 1.

The same 20 packed rows, in the same plan order, train 5 optimizer steps of 4 rows each, once as
four micro batches of one row and once as one micro batch of four rows. The rows carry very
different numbers of trained tokens (half of them are almost all prompt), so the two agree only
if every micro batch's token loss is divided by the trained tokens of the whole step, which is
what :func:`finetune.train.loop.train_step` does. A loop that took the mean of each micro batch
and averaged those over the accumulation steps (the classic mistake) weighs a row of 3 trained
tokens like a row of 60: :func:`test_a_per_micro_batch_mean_would_not_match` runs exactly that
loop and shows the comparison would catch it.

Both ZeRO-0 and ZeRO-2 are checked: DeepSpeed accumulates gradients in different places for them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.data.packing import pack
from finetune.data.types import IGNORE_INDEX, PackedRow, TokenizedSample
from finetune.recipe import Recipe
from finetune.train import loop
from finetune.train.loop import Hooks, LoopState, Worker, make_batch, run_loop
from finetune.train.plan import Plan, make_plan
from finetune.train.run import build_engine, close_process_group, init_process_group

PAD_ID = 1
SEQ_LEN = 64
ROWS = 20
STEPS = 5
ROWS_PER_STEP = 4
SEED = 11
#: Largest relative difference of a step's loss, and of a trained tensor (relative to its largest magnitude).
RTOL = 1e-5
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


MODEL_ID = "smollm2-135m-instruct"  # the model_dir fixture of tests/train/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


def trained_targets(row: PackedRow) -> int:
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


@pytest.fixture(scope="module")
def rows() -> list[PackedRow]:
    """20 full-length rows: half train 2 to 4 tokens (long prompts, short answers), half train 40 or more."""
    rng = random.Random(SEED)
    docs = []
    for i in range(ROWS):
        ids = [rng.randrange(3, 1024) for _ in range(SEQ_LEN)]
        prompt = SEQ_LEN - rng.randint(3, 5) if i % 2 else rng.randint(2, SEQ_LEN - 41)
        docs.append(TokenizedSample(f"doc {i}", ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    packed = pack(docs, SEQ_LEN)
    assert len(packed) == ROWS
    return packed


def recipe_for(micro_batch: int, grad_accum: int, zero_stage: int) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"id": MODEL_ID, "tiny": True},
            "data": {"path": "train.jsonl", "max_seq_len": SEQ_LEN, "packing": True},
            "method": {"type": "full"},
            "training": {
                "max_steps": STEPS,
                "learning_rate": 2e-3,
                "micro_batch_size": micro_batch,
                "gradient_accumulation_steps": grad_accum,
                "warmup_steps": 1,
                "scheduler": "cosine",
                "max_grad_norm": 1.0,
                "precision": "fp32",
                "gradient_checkpointing": False,
                "seed": SEED,
            },
            "resources": {"zero_stage": zero_stage},
        }
    )


class Records:
    """A metrics sink that keeps the events, as dicts."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def emit(self, event: Any) -> None:
        self.records.append(event.model_dump())

    def close(self) -> None:
        pass


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(recipe: Recipe, model_dir: Path, rows: list[PackedRow]) -> dict[str, Any]:
    """Our loop as ``run_job`` drives it (seed, engine, loop), minus data preparation and checkpoints."""
    plan = make_plan(recipe, rows=len(rows), world_size=1, row_tokens=SEQ_LEN)
    with pytest.MonkeyPatch.context() as mp:
        for key in DIST_ENV:  # init_process_group sets them; mp puts back what was there, removes what was not
            mp.setenv(key, "")
            mp.delenv(key)
        worker, created = init_process_group(cuda=False)
        try:
            torch.manual_seed(recipe.training.seed)
            engine, stage, _ = build_engine(recipe, model_dir, plan, worker, cuda=False)
            assert stage == recipe.resources.zero_stage
            sink = Records()
            run_loop(
                engine, plan, rows, [], pad_id=PAD_ID, worker=worker, sink=sink, hooks=Hooks(save=lambda _: None),
                state=LoopState(),
            )  # fmt: skip
            steps = [r for r in sink.records if r["kind"] == "step"]
            return {"plan": plan, "steps": steps, "final": trainable(engine.module)}
        finally:
            close_process_group(created)


def micro_batches(plan: Plan) -> list[list[list[int]]]:
    return [plan.micro_batches(step, 0) for step in range(plan.total_steps)]


def loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    x = torch.tensor([r["loss"] for r in a["steps"]], dtype=torch.float64)
    y = torch.tensor([r["loss"] for r in b["steps"]], dtype=torch.float64)
    return float(((x - y).abs() / y.abs()).max())


def weight_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest difference of a trained tensor, relative to the tensor's largest magnitude."""
    return max(float((a["final"][n] - w).abs().max() / w.abs().max()) for n, w in b["final"].items())


@pytest.fixture(scope="module")
def one_by_four_rows(model_dir: Path, rows: list[PackedRow]) -> dict[str, Any]:
    """The reference: micro batch 4, no accumulation (every step's loss is one batch's token mean), ZeRO-0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures come before the function-scoped one_thread
    try:
        return train(recipe_for(4, 1, 0), model_dir, rows)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_four_micro_batches_of_one_row_train_as_one_of_four(
    zero_stage: int, model_dir: Path, rows: list[PackedRow], one_by_four_rows: dict[str, Any]
) -> None:
    """Per-step losses and final weights of 1 x 4 equal those of 4 x 1 (1e-5 relative, fp32)."""
    reference = one_by_four_rows
    accumulated = train(recipe_for(1, 4, zero_stage), model_dir, rows)
    assert accumulated["plan"].grad_accum == 4 and reference["plan"].grad_accum == 1
    steps = micro_batches(accumulated["plan"])
    assert [[i for micro in step for i in micro] for step in steps] == [
        step[0] for step in micro_batches(reference["plan"])
    ]  # the same rows in the same order, cut differently
    for step in steps:  # the premise: micro batches of very unequal weight within every step
        counts = [trained_targets(rows[micro[0]]) for micro in step]
        assert max(counts) >= 10 * min(counts), counts
    assert [r["trained_tokens"] for r in accumulated["steps"]] == [r["trained_tokens"] for r in reference["steps"]]
    assert loss_gap(accumulated, reference) < RTOL
    assert weight_gap(accumulated, reference) < RTOL


def naive_train_step(
    engine: Any, micro: list[list[int]], data: list[PackedRow], pad_id: int, worker: Worker
) -> dict[str, Any]:
    """The classic mistake: each micro batch's own token mean, averaged over the accumulation steps."""
    loss = 0.0
    for rows in micro:
        batch = make_batch([data[i] for i in rows], pad_id, worker.device)
        out = engine(**batch, use_cache=False)  # no num_items_in_batch: the mean over this micro batch's tokens
        engine.backward(out.loss / len(micro), scale_wrt_gas=False)
        engine.step()
        loss += float(out.loss.detach()) / len(micro)
    return {"loss": loss, "trained_tokens": 0, "tokens": 1, "grad_norm": float("nan")}


@pytest.mark.integration
def test_a_per_micro_batch_mean_would_not_match(
    model_dir: Path, rows: list[PackedRow], one_by_four_rows: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same 1 x 4 run with per-micro-batch means lands far outside the tolerance: the test above can fail."""
    monkeypatch.setattr(loop, "train_step", naive_train_step)
    naive = train(recipe_for(1, 4, 0), model_dir, rows)
    assert loss_gap(naive, one_by_four_rows) > 100 * RTOL
    assert weight_gap(naive, one_by_four_rows) > 100 * RTOL
