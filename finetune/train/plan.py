"""The numbers of a run, decided before it starts: batch shape, steps, warm-up, intervals, data order.

Every worker computes the same plan from the same inputs, so the data order and the learning
rate of step ``k`` are the same everywhere and after a resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from finetune.recipe import Recipe, default_learning_rate
from finetune.train.schedule import Schedule, warmup_steps


@dataclass(frozen=True)
class Plan:
    """How the rows are cut into optimizer steps.

    Attributes:
        micro_batch: Rows per worker per forward pass.
        grad_accum: Micro batches per worker per optimizer step.
        world_size: Workers (one per GPU).
        rows: Training rows (packed rows, or samples without packing).
        steps_per_epoch: Optimizer steps in one pass over the rows.
        total_steps: Optimizer steps of the whole run.
        schedule: The learning-rate schedule.
        eval_every: Steps between evaluations (0: never).
        save_every_steps: Steps between checkpoints (0: by time only).
        save_every_seconds: Seconds between checkpoints.
        seed: Seed of the data order.
    """

    micro_batch: int
    grad_accum: int
    world_size: int
    rows: int
    steps_per_epoch: int
    total_steps: int
    schedule: Schedule
    eval_every: int
    save_every_steps: int
    save_every_seconds: float
    seed: int

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """Row indices of one epoch, shuffled by (seed, epoch), wrapped around to whole steps.

        The last step of an epoch is filled with rows from the start of the same order (as
        PyTorch's DistributedSampler pads), so every worker runs the same number of micro
        batches in every step and no step is partial.
        """
        order = list(range(self.rows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        need = self.steps_per_epoch * self.rows_per_step
        while len(order) < need:
            order += order[: need - len(order)]
        return order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Row indices of each micro batch this worker runs in optimizer step ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[within * self.rows_per_step : (within + 1) * self.rows_per_step]
        mine = chunk[rank :: self.world_size]
        return [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]


def row_tokens(recipe: Recipe, rows: int, tokens: int) -> int:
    """Tokens of a typical training row: the packed length, else the mean sample length."""
    return recipe.data.max_seq_len if recipe.data.packing else max(1, tokens // max(1, rows))


def plan_for(recipe: Recipe, *, rows: int, tokens: int, world_size: int) -> Plan:
    """The plan over ``rows`` prepared training rows holding ``tokens`` tokens in all."""
    return make_plan(recipe, rows=rows, world_size=world_size, row_tokens=row_tokens(recipe, rows, tokens))


def make_plan(recipe: Recipe, *, rows: int, world_size: int, row_tokens: int) -> Plan:
    """The plan of a recipe over ``rows`` training rows of about ``row_tokens`` tokens each.

    Gradient accumulation comes from the recipe, else from ``tokens_per_step`` (rounded up to whole
    micro batches on every worker), else 1.
    """
    t = recipe.training
    micro = t.micro_batch_size
    if t.gradient_accumulation_steps is not None:
        accum = t.gradient_accumulation_steps
    elif t.tokens_per_step is not None:
        accum = max(1, math.ceil(t.tokens_per_step / (micro * world_size * max(1, row_tokens))))
    else:
        accum = 1
    per_step = micro * accum * world_size
    steps_per_epoch = max(1, math.ceil(rows / per_step))
    total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    schedule = Schedule(
        peak_lr=default_learning_rate(recipe),
        warmup_steps=warmup_steps(total, t.warmup_ratio, t.warmup_steps),
        total_steps=total,
        kind=t.scheduler,
    )
    has_eval = recipe.data.eval.path is not None or recipe.data.eval.fraction > 0
    eval_every = (t.eval_every_steps or steps_per_epoch) if has_eval else 0
    return Plan(
        micro_batch=micro,
        grad_accum=accum,
        world_size=world_size,
        rows=rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        schedule=schedule,
        eval_every=eval_every,
        save_every_steps=t.save_every_steps or 0,
        save_every_seconds=t.save_every_minutes * 60.0,
        seed=t.seed,
    )
