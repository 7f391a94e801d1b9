"""One worker's whole job: data, model, DeepSpeed engine, resume, loop, checkpoints, final model.

The same function runs in the single process of ``--launcher local`` and in every Ray Train
worker; it only needs the process group to exist (or creates a one-process group itself).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune.errors import FinetuneError
from finetune.hardware import describe
from finetune.recipe import Recipe
from finetune.train.loop import Hooks, LoopState, Worker, as_rows, run_loop
from finetune.train.metrics import Fanout, JsonlSink, MetricsSink, ProgressSink
from finetune.train.plan import make_plan

logger = logging.getLogger(__name__)


class TrainingError(FinetuneError):
    """Training stopped on an error a tenant can act on (out of memory, a diverging loss...)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs, as plain data (it travels to Ray workers)."""

    recipe: dict[str, Any]
    job_dir: str
    model_dir: str
    bucket_dir: str
    cache_dir: str
    eot: str | None = None
    progress: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SAVED_ENV: dict[str, str | None] = {}


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its copies of process groups; after a group is destroyed they are stale."""
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


def init_process_group(cuda: bool) -> tuple[Worker, bool]:
    """Join the process group set up by the launcher, or make a one-process group.

    Returns the worker and whether this call created the group (then :func:`close_process_group`
    destroys it at the end).
    """
    import deepspeed

    created = not dist.is_initialized()
    if created:
        _SAVED_ENV.clear()
        _SAVED_ENV.update({key: os.environ.get(key) for key in _GROUP_ENV})
        values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        os.environ.update({**values, "MASTER_PORT": str(_free_port())})
        _forget_deepspeed_groups()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Worker(rank=rank, world_size=world, device=device), created


def close_process_group(created: bool) -> None:
    """Destroy a group :func:`init_process_group` created, and put its environment back."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
        _forget_deepspeed_groups()
    if created:
        for key, value in _SAVED_ENV.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _SAVED_ENV.clear()


def _sinks(spec: JobSpec, worker: Worker, total_steps: int) -> MetricsSink:
    if not worker.is_main:
        return Fanout([])
    sinks: list[MetricsSink] = [JsonlSink(Path(spec.job_dir) / "metrics.jsonl")]
    if spec.progress:
        sinks.append(ProgressSink(total_steps, every=max(1, total_steps // 50)))
    return Fanout(sinks)


def build_engine(recipe: Recipe, model_dir: Path, plan: Any, worker: Worker, cuda: bool) -> tuple[Any, int, str]:
    """The model, wrapped in a DeepSpeed engine with the ZeRO stage chosen for it.

    A pinned ZeRO-3 partitions the weights while they load; otherwise the stage is chosen from a
    memory estimate of the loaded model.
    """
    import deepspeed

    from finetune.train.model import build_model, optimizer_groups
    from finetune.train.zero import choose_stage_for, deepspeed_config

    def config_for(stage: int, bf16: bool) -> dict[str, Any]:
        t = recipe.training
        return deepspeed_config(
            stage=stage, offload=recipe.resources.offload, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
            max_grad_norm=t.max_grad_norm, lr=plan.schedule.peak_lr, weight_decay=t.weight_decay, bf16=bf16, cuda=cuda,
        )  # fmt: skip

    if recipe.resources.zero_stage == 3:
        from finetune.train.model import resolve_precision

        config = config_for(3, resolve_precision(recipe, cuda) == torch.bfloat16)
        model = build_model(recipe, model_dir, cuda=cuda, zero3_config=config)
        stage, why = 3, "ZeRO-3 pinned by resources.zero_stage"
    else:
        model = build_model(recipe, model_dir, cuda=cuda)
        seq_len = recipe.data.max_seq_len
        stage, why = choose_stage_for(recipe, model, world_size=worker.world_size, cuda=cuda, seq_len=seq_len)
        config = config_for(stage, next(model.parameters()).dtype == torch.bfloat16)
    groups = optimizer_groups(model, recipe.training.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine, stage, why


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Train as the spec says; resume from the newest complete checkpoint if there is one."""
    recipe = Recipe.model_validate(spec.recipe)
    cuda = torch.cuda.is_available()
    worker, created = init_process_group(cuda)
    try:
        return _run(spec, recipe, worker, cuda)
    finally:
        close_process_group(created)
        _forget_zero3_loading()


def _forget_zero3_loading() -> None:
    """Stop transformers partitioning later loads in this process (it keeps the job's ZeRO-3 config).

    ``from_pretrained`` consults a process-wide reference to the last ``HfDeepSpeedConfig``; while
    the trained model lives on (in a caller, or until garbage collection), it would try to build
    every later model in this process under ``deepspeed.zero.Init`` as well.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _run(spec: JobSpec, recipe: Recipe, worker: Worker, cuda: bool) -> dict[str, Any]:
    from finetune.data.pipeline import prepare
    from finetune.loading import load_tokenizer
    from finetune.storage import Bucket
    from finetune.train.checkpoint import load_latest, save_checkpoint
    from finetune.train.final import save_final
    from finetune.train.model import count_parameters
    from finetune.train.zero import oom_message

    job_dir, model_dir = Path(spec.job_dir), Path(spec.model_dir)
    tokenizer = load_tokenizer(model_dir)
    prepared = prepare(
        recipe, Bucket.folder(Path(spec.bucket_dir)), tokenizer, model_dir=model_dir, eot=spec.eot,
        cache_dir=Path(spec.cache_dir),
    )  # fmt: skip
    packed = recipe.data.packing
    train_rows, eval_rows = as_rows(prepared.train, packed), as_rows(prepared.eval, packed)
    row_tokens = recipe.data.max_seq_len if packed else max(1, prepared.report.tokens_train // max(1, len(train_rows)))
    plan = make_plan(recipe, rows=len(train_rows), world_size=worker.world_size, row_tokens=row_tokens)
    torch.manual_seed(recipe.training.seed)
    engine, stage, why = build_engine(recipe, model_dir, plan, worker, cuda)
    total, trainable = count_parameters(engine.module)
    resume = load_latest(job_dir, engine, world_size=worker.world_size)
    state = LoopState(**resume.trainer_state) if resume is not None else LoopState()
    state.preempted = state.stopped_early = False  # a resumed job goes on from where it stopped
    sink = _sinks(spec, worker, plan.total_steps)
    if worker.is_main:
        sink.emit({"kind": "event", "event": "start" if resume is None else "resume", "step": state.step,
                   "detail": f"{trainable:,} of {total:,} parameters trained; ZeRO-{stage} ({why}); "
                   f"{plan.total_steps} steps of {plan.rows_per_step} rows",
                   "hardware": describe(cuda, worker.world_size), "zero_stage": stage,
                   "parameters": {"total": total, "trained": trainable}})  # fmt: skip

    def save(loop_state: LoopState) -> None:  # every worker; old checkpoints pruned after the commit
        save_checkpoint(
            job_dir, loop_state.step, engine, state=loop_state.as_dict(), recipe_json=spec.recipe,
            rank=worker.rank, world_size=worker.world_size, keep=recipe.output.keep_checkpoints,
        )  # fmt: skip

    try:
        state = run_loop(
            engine, plan, train_rows, eval_rows, pad_id=tokenizer.pad_token_id, worker=worker, sink=sink,
            hooks=Hooks(save=save), state=state,
            early_stopping=(recipe.training.early_stopping.patience, recipe.training.early_stopping.min_delta),
        )  # fmt: skip
    except torch.OutOfMemoryError as exc:
        t = recipe.training
        message = oom_message(stage, t.micro_batch_size, t.gradient_checkpointing, recipe.resources.offload)
        if worker.is_main:
            sink.emit({"kind": "event", "event": "out of memory", "step": state.step, "detail": message})
            sink.close()
        raise TrainingError(f"out of memory at step {state.step + 1}: {message}") from exc
    except FloatingPointError as exc:  # the loss diverged
        if worker.is_main:
            sink.emit({"kind": "event", "event": "diverged", "step": state.step, "detail": str(exc)})
            sink.close()
        raise TrainingError(str(exc)) from exc
    final = None
    if not state.preempted:
        final = save_final(engine, tokenizer, job_dir / "final", stage=stage, is_main=worker.is_main, eot=spec.eot)
    summary = {"steps": state.step, "preempted": state.preempted, "stopped_early": state.stopped_early,
               "final": str(final) if final else None, "zero_stage": stage, "eval": state.last_eval}  # fmt: skip
    if worker.is_main:
        sink.emit({"kind": "event", "event": "end", "step": state.step, "detail": json.dumps(summary)})
        sink.close()
    return summary
