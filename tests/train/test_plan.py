"""The run's plan and learning-rate schedule: pure functions, the same on every worker."""

import pytest
import torch
from transformers import get_scheduler

from finetune.recipe import Recipe
from finetune.train.plan import make_plan
from finetune.train.schedule import Schedule, warmup_steps


def recipe(**training):
    return Recipe.model_validate({"model": {"id": "x"}, "data": {"path": "d"}, "training": training})


@pytest.mark.parametrize(
    ("kind", "hf_name"), [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")]
)
def test_schedule_matches_hugging_face(kind, hf_name):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=3e-4)
    theirs = get_scheduler(hf_name, opt, num_warmup_steps=4, num_training_steps=25)
    ours = Schedule(3e-4, 4, 25, kind)
    for step in range(25):
        assert ours.lr(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        theirs.step()


def test_warmup_steps_from_ratio_or_exact():
    assert warmup_steps(100, 0.03, None) == 3
    assert warmup_steps(100, 0.03, 10) == 10
    assert warmup_steps(5, 0.0, 50) == 4  # never the whole run


def test_plan_counts_steps_and_accumulation():
    plan = make_plan(
        recipe(epochs=2, micro_batch_size=2, gradient_accumulation_steps=3), rows=25, world_size=2, row_tokens=512
    )
    assert plan.rows_per_step == 12 and plan.steps_per_epoch == 3 and plan.total_steps == 6
    tokens = make_plan(recipe(micro_batch_size=1, tokens_per_step=8192), rows=100, world_size=2, row_tokens=1024)
    assert tokens.grad_accum == 4
    assert make_plan(recipe(max_steps=7), rows=3, world_size=1, row_tokens=1).total_steps == 7


def test_every_worker_gets_equal_whole_micro_batches_and_epochs_cover_every_row():
    plan = make_plan(
        recipe(epochs=1, micro_batch_size=2, gradient_accumulation_steps=2), rows=10, world_size=2, row_tokens=1
    )
    seen = []
    for step in range(plan.steps_per_epoch):
        per_rank = [plan.micro_batches(step, rank) for rank in range(2)]
        assert all(len(mb) == 2 and all(len(b) == 2 for b in mb) for mb in per_rank)
        seen += [i for mb in per_rank for b in mb for i in b]
    assert set(seen) == set(range(10))  # wrapped around to fill the last step, nothing left out


def test_data_order_is_deterministic_and_changes_by_epoch_and_seed():
    plan = make_plan(recipe(seed=5), rows=50, world_size=1, row_tokens=1)
    assert plan.epoch_order(0) == make_plan(recipe(seed=5), rows=50, world_size=1, row_tokens=1).epoch_order(0)
    assert plan.epoch_order(0) != plan.epoch_order(1)
    assert plan.epoch_order(0) != make_plan(recipe(seed=6), rows=50, world_size=1, row_tokens=1).epoch_order(0)


def test_evaluation_interval_needs_eval_data():
    no_eval = Recipe.model_validate({"model": {"id": "x"}, "data": {"path": "d", "eval": {"fraction": 0}}})
    assert make_plan(no_eval, rows=10, world_size=1, row_tokens=1).eval_every == 0
    assert make_plan(recipe(), rows=10, world_size=1, row_tokens=1).eval_every == 10  # once per epoch
