"""Parity with the Hugging Face Trainer: our loop trains exactly as ``transformers.Trainer`` does.

Both sides train the same tiny random-weight model (one folder, materialised once) on the same
packed rows in the same order with the same hyper-parameters, for 20 optimizer steps in fp32 on
CPU: AdamW (lr, betas, eps, weight decay), gradient clipping at 1.0, a cosine schedule with 3
warm-up steps, micro batch 2 with 3 accumulation steps. Ours is
:func:`finetune.train.loop.run_loop` over the DeepSpeed engine that
:func:`finetune.train.run.build_engine` makes (ZeRO-0 on CPU); theirs is the Trainer (with ``peft``
for LoRA) fed our plan's row order through its sequential sampler and our collate.

What is compared is like with like. Our step loss is the token loss summed over the global batch
divided by its trained tokens (``labels[:, 1:] != -100``, counted before the first forward pass).
The Trainer counts the same tokens over its accumulation window (``get_batch_samples``), passes
them to the model as ``num_items_in_batch`` and, with ``logging_steps=1``, logs the sum of its
micro-batch losses: the same quantity. Its logged ``grad_norm`` is the norm before clipping, as
ours is, and its ``learning_rate`` the rate of the step's update.

The rows carry very unequal numbers of trained tokens (a quarter of the documents train a
single token), so a loop that averaged per-micro-batch means would part from the Trainer at the
first step; the learning rate is high enough that the weights move well away from their start.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from finetune.data.packing import collate, pack
from finetune.data.types import IGNORE_INDEX, PackedRow, TokenizedSample
from finetune.recipe import Recipe
from finetune.train.loop import Hooks, LoopState, run_loop
from finetune.train.plan import Plan, make_plan
from finetune.train.run import build_engine, close_process_group, init_process_group

PAD_ID = 1  # the tiny model's pad token (padding only ever carries ignored labels)
SEQ_LEN = 64
STEPS = 20
MICRO_BATCH = 2
GRAD_ACCUM = 3
WARMUP = 3
SEED = 7
#: Largest relative difference of a step's loss (the issue's acceptance) and of its gradient norm.
LOSS_RTOL = 1e-4
#: Largest difference of a trained tensor, relative to the tensor's largest magnitude.
WEIGHT_RTOL = 1e-5
#: Environment variables that :func:`init_process_group` sets and Accelerate reads.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


MODEL_ID = "smollm2-135m-instruct"  # the model_dir fixture of tests/train/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


def trained_targets(row: PackedRow) -> int:
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


@pytest.fixture(scope="module")
def rows() -> list[PackedRow]:
    """Packed rows whose trained-token counts differ a lot (documents of almost all prompt, or of all answer)."""
    rng = random.Random(SEED)
    docs = []
    for i in range(40):
        length = rng.randint(4, SEQ_LEN)
        ids = [rng.randrange(3, 1024) for _ in range(length)]
        prompt = length - 1 if i % 4 == 0 else rng.randint(0, length // 2)
        docs.append(TokenizedSample(f"doc {i}", ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    packed = pack(docs, SEQ_LEN)
    counts = [trained_targets(row) for row in packed]
    assert max(counts) > 4 * min(counts), counts  # the premise: unequal rows
    return packed


def recipe_for(method: str, weight_decay: float) -> Recipe:
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {}
    return Recipe.model_validate(
        {
            "model": {"id": MODEL_ID, "tiny": True},
            "data": {"path": "train.jsonl", "max_seq_len": SEQ_LEN, "packing": True},
            "method": {"type": method, **lora},
            "training": {
                "max_steps": STEPS,
                "learning_rate": 1e-3 if method == "full" else 5e-3,
                "micro_batch_size": MICRO_BATCH,
                "gradient_accumulation_steps": GRAD_ACCUM,
                "warmup_steps": WARMUP,
                "scheduler": "cosine",
                "weight_decay": weight_decay,
                "max_grad_norm": 1.0,
                "precision": "fp32",
                "gradient_checkpointing": False,
                "seed": SEED,
            },
            "resources": {"zero_stage": 0},
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


def isolated_env(mp: pytest.MonkeyPatch) -> None:
    """Clear the process-group variables; ``mp`` puts back what was there (and removes what was not)."""
    for key in DIST_ENV:
        mp.setenv(key, "")
        mp.delenv(key)


def run_ours(recipe: Recipe, model_dir: Path, rows: list[PackedRow]) -> dict[str, Any]:
    """Our loop as ``run_job`` drives it (seed, engine, loop), minus data preparation and checkpoints."""
    plan = make_plan(recipe, rows=len(rows), world_size=1, row_tokens=SEQ_LEN)
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp)
        worker, created = init_process_group(cuda=False)
        try:
            torch.manual_seed(recipe.training.seed)
            engine, stage, _ = build_engine(recipe, model_dir, plan, worker, cuda=False)
            assert stage == 0
            initial = trainable(engine.module)
            sink = Records()
            run_loop(
                engine, plan, rows, [], pad_id=PAD_ID, worker=worker, sink=sink, hooks=Hooks(save=lambda _: None),
                state=LoopState(),
            )  # fmt: skip
            steps = [r for r in sink.records if r["kind"] == "step"]
            return {"plan": plan, "steps": steps, "initial": initial, "final": trainable(engine.module)}
        finally:
            close_process_group(created)


def row_order(plan: Plan) -> list[int]:
    """The rows our loop trains, micro batch after micro batch, step after step (epochs reshuffled)."""
    return [i for step in range(plan.total_steps) for micro in plan.micro_batches(step, 0) for i in micro]


class InOrder(torch.utils.data.Dataset):
    """Rows served as they are, for a sequential sampler."""

    def __init__(self, rows: list[PackedRow]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PackedRow:
        return self.rows[i]


def run_trainer(
    recipe: Recipe, model_dir: Path, rows: list[PackedRow], initial: dict[str, torch.Tensor], out: Path
) -> dict[str, Any]:
    """The Hugging Face Trainer on ``rows`` in this order, from the same initial trainable weights."""
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    t = recipe.training
    assert t.learning_rate and t.gradient_accumulation_steps and t.warmup_steps is not None and t.max_steps
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # packed rows: documents are told apart by position_ids only without a cache
    if recipe.method.type == "lora":
        from peft import LoraConfig, get_peft_model

        m = recipe.method
        config = LoraConfig(r=m.rank, lora_alpha=m.alpha, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config)
    assert trainable(model).keys() == initial.keys()  # the same parameters train on both sides
    assert not model.load_state_dict(initial, strict=False).unexpected_keys  # they start alike (LoRA's A is random)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_steps=t.max_steps,
        seed=t.seed,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    with pytest.MonkeyPatch.context() as mp:
        isolated_env(mp)  # else Accelerate believes it is distributed and makes a process group of its own
        assert not dist.is_initialized()
        trainer = Trainer(
            model=model, args=args, train_dataset=InOrder(rows), data_collator=lambda batch: collate(batch, PAD_ID)
        )
        try:
            trainer.train()
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    assert not dist.is_initialized()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"logs": logs, "final": trainable(model)}


def relative(ours: list[float], theirs: list[float]) -> float:
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    return float(((a - b).abs() / b.abs()).max())


def weight_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: the largest difference relative to the tensor's largest magnitude."""
    return {n: float((ours[n] - w).abs().max() / w.abs().max()) for n, w in theirs.items()}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "weight_decay"),
    [
        pytest.param("full", 0.0, id="full"),
        pytest.param("lora", 0.1, id="lora"),
        pytest.param("full", 0.1, id="full-weight-decay"),  # biases and norms undecayed, as the Trainer does
    ],
)
def test_loss_curve_and_weights_match_the_hf_trainer(
    method: str, weight_decay: float, model_dir: Path, rows: list[PackedRow], tmp_path: Path
) -> None:
    """20 steps of our loop and of the Trainer: step losses within 1e-4 relative, same rates, norms, weights."""
    recipe = recipe_for(method, weight_decay)
    ours = run_ours(recipe, model_dir, rows)
    order = row_order(ours["plan"])
    assert len(order) > len(rows)  # several epochs of our plan, each reshuffled: one long epoch for the Trainer
    theirs = run_trainer(recipe, model_dir, [rows[i] for i in order], ours["initial"], tmp_path)
    steps, logs = ours["steps"], theirs["logs"]
    assert [r["step"] for r in steps] == [h["step"] for h in logs] == list(range(1, STEPS + 1))

    per_step = GRAD_ACCUM * MICRO_BATCH
    counts = [sum(trained_targets(rows[i]) for i in order[k * per_step : (k + 1) * per_step]) for k in range(STEPS)]
    assert [r["trained_tokens"] for r in steps] == counts  # each loss is normalised by its whole step's tokens

    assert relative([r["lr"] for r in steps[1:]], [h["learning_rate"] for h in logs[1:]]) < 1e-12
    assert steps[0]["lr"] == logs[0]["learning_rate"] == 0.0  # warm-up starts from zero on both sides
    assert relative([r["grad_norm"] for r in steps], [h["grad_norm"] for h in logs]) < LOSS_RTOL
    assert any(h["grad_norm"] > 1.0 for h in logs) or method == "lora"  # clipping took part (full)
    loss_gap = relative([r["loss"] for r in steps], [h["loss"] for h in logs])
    assert loss_gap < LOSS_RTOL, ([r["loss"] for r in steps], [h["loss"] for h in logs])

    moved = weight_difference(ours["initial"], ours["final"])
    assert all(m > 100 * WEIGHT_RTOL for m in moved.values()), moved  # each trained tensor moved far beyond tolerance
    gaps = weight_difference(ours["final"], theirs["final"])
    assert max(gaps.values()) < WEIGHT_RTOL, {n: g for n, g in gaps.items() if g >= WEIGHT_RTOL}
