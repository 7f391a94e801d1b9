"""One worker's whole job: data, model, DeepSpeed engine, resume, loop, checkpoints, final model.

The same function runs in the single process of ``--launcher local`` and in every Ray Train
worker; it only needs the process group to exist (or creates a one-process group itself). It
reads and writes nothing shared but the job's store: the prepared data and the checkpoints come
from the bucket into this rank's own scratch folder, checkpoints and the final model go back up.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune.errors import FinetuneError, fault_of
from finetune.events import (
    CheckpointEvent,
    EndEvent,
    ErrorInfo,
    EventLog,
    FailureEvent,
    JobSummary,
    ResumeEvent,
    StartEvent,
)
from finetune.hardware import describe
from finetune.jobstore import FINAL, JobStore
from finetune.recipe import Recipe
from finetune.train.checkpoint import Rank, Resumed
from finetune.train.loop import Hooks, LoopState, Worker, run_loop
from finetune.train.metrics import Fanout, MetricsSink, ProgressSink
from finetune.train.plan import Plan, plan_for
from finetune.train.spec import JobSpec

__all__ = ["JobSpec", "TrainingError", "run_job"]

logger = logging.getLogger(__name__)


class TrainingError(FinetuneError):
    """Training stopped on an error a tenant can act on (out of memory, a diverging loss...)."""

    fault = "tenant"


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


def run_job(spec: JobSpec) -> JobSummary:
    """Train as the spec says; resume from the newest trustworthy checkpoint in the job's store."""
    recipe = Recipe.model_validate(spec.recipe)
    settings = spec.open_settings()
    cuda = torch.cuda.is_available()
    worker, created = init_process_group(cuda)
    scratch = settings.scratch_path / spec.job_id / f"rank-{worker.rank}"
    try:
        job = _Job(spec, recipe, JobStore.open(spec.store, settings), worker, cuda, scratch, settings)
        return job.run()
    finally:
        close_process_group(created)
        _forget_zero3_loading()
        shutil.rmtree(scratch, ignore_errors=True)


def _forget_zero3_loading() -> None:
    """Stop transformers partitioning later loads in this process (it keeps the job's ZeRO-3 config).

    ``from_pretrained`` consults a process-wide reference to the last ``HfDeepSpeedConfig``; while
    the trained model lives on (in a caller, or until garbage collection), it would try to build
    every later model in this process under ``deepspeed.zero.Init`` as well.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@dataclass
class _Job:
    spec: JobSpec
    recipe: Recipe
    store: JobStore
    worker: Worker
    cuda: bool
    scratch: Path
    settings: Any

    def run(self) -> JobSummary:
        from finetune.train.checkpoint import load_latest
        from finetune.train.data import fetch_prepared

        signer = self.settings.signer()
        self.scratch.mkdir(parents=True, exist_ok=True)
        sink = self._sinks()
        state = LoopState()
        try:
            rows = fetch_prepared(self.store, signer.public, self.scratch / "data", self.recipe.data.packing)
            plan = plan_for(self.recipe, rows=len(rows.train), tokens=rows.tokens, world_size=self.worker.world_size)
            if self.spec.progress and self.worker.is_main:
                sink.sinks.append(ProgressSink(plan.total_steps, every=max(1, plan.total_steps // 50)))
            tokenizer = _tokenizer(Path(self.spec.model_dir))
            torch.manual_seed(self.recipe.training.seed)
            engine, stage, why = build_engine(self.recipe, Path(self.spec.model_dir), plan, self.worker, self.cuda)
            me = Rank(self.worker.rank, self.worker.world_size)
            resumed = load_latest(
                self.store, engine, recipe_json=self.spec.recipe, me=me, scratch=self.scratch, key=signer.public
            )
            if resumed.state is not None:
                state = LoopState(**resumed.state.trainer_state)
            state.preempted = state.stopped_early = False  # a resumed job goes on from where it stopped
            if self.worker.is_main:
                sink.emit(self._started(engine, stage, why, plan, resumed, state.step))
            state = self._train(engine, stage, plan, rows, tokenizer, sink, state, signer, me)
            final = None
            if not state.preempted:
                final = self._final(engine, tokenizer, stage, state.step, signer)
            summary = JobSummary(
                steps=state.step, preempted=state.preempted, stopped_early=state.stopped_early, final=final,
                zero_stage=stage, eval=state.last_eval,
            )  # fmt: skip
            if self.worker.is_main:
                sink.emit(EndEvent(step=state.step, summary=summary))
            return summary
        except Exception as exc:
            if self.worker.is_main:
                sink.emit(FailureEvent(step=state.step, error=error_info(exc)))
            raise
        finally:
            sink.close()

    def _sinks(self) -> Fanout:
        """Rank 0 records the job's events in its store; the other ranks record nothing."""
        if not self.worker.is_main:
            return Fanout([])
        log = EventLog(self.store.bucket, self.store.prefix, flush_seconds=self.settings.events_flush_seconds)
        return Fanout([log])

    def _started(self, engine: Any, stage: int, why: str, plan: Plan, resumed: Resumed, step: int) -> Any:
        from finetune.train.model import count_parameters

        total, trainable = count_parameters(engine.module)
        detail = (
            f"{trainable:,} of {total:,} parameters trained; ZeRO-{stage} ({why}); "
            f"{plan.total_steps} steps of {plan.rows_per_step} rows"
        )
        common = {"step": step, "hardware": describe(self.cuda, self.worker.world_size), "zero_stage": stage,
                  "parameters": {"total": total, "trained": trainable}, "total_steps": plan.total_steps}  # fmt: skip
        if resumed.state is None:
            if resumed.refused:
                detail += f"; starting over: no trustworthy checkpoint ({'; '.join(resumed.refused)})"
            return StartEvent(detail=detail, **common)
        detail = f"from checkpoint {resumed.state.name} (step {step}); {detail}"
        if resumed.refused:
            detail += f"; passed over: {'; '.join(resumed.refused)}"
        return ResumeEvent(detail=detail, checkpoint=resumed.state.name, refused=resumed.refused, **common)

    def _train(
        self, engine: Any, stage: int, plan: Plan, rows: Any, tokenizer: Any, sink: MetricsSink, state: LoopState,
        signer: Any, me: Rank,
    ) -> LoopState:  # fmt: skip
        from finetune.train.checkpoint import save_checkpoint
        from finetune.train.zero import oom_message

        recipe = self.recipe

        def save(loop_state: LoopState) -> None:  # every worker; old checkpoints pruned after the commit
            saved = save_checkpoint(
                self.store, loop_state.step, engine, state=loop_state.as_dict(), recipe_json=self.spec.recipe, me=me,
                scratch=self.scratch, key=signer, keep=recipe.output.keep_checkpoints,
            )  # fmt: skip
            if self.worker.is_main and saved.files:
                sink.emit(CheckpointEvent(step=loop_state.step, name=saved.name, files=saved.files,
                                          bytes=saved.bytes, seconds=saved.seconds))  # fmt: skip

        try:
            return run_loop(
                engine, plan, rows.train, rows.eval, pad_id=tokenizer.pad_token_id, worker=self.worker, sink=sink,
                hooks=Hooks(save=save), state=state,
                early_stopping=(recipe.training.early_stopping.patience, recipe.training.early_stopping.min_delta),
            )  # fmt: skip
        except torch.OutOfMemoryError as exc:
            t = recipe.training
            message = oom_message(stage, t.micro_batch_size, t.gradient_checkpointing, recipe.resources.offload)
            raise TrainingError(f"out of memory at step {state.step + 1}: {message}") from exc
        except FloatingPointError as exc:  # the loss diverged
            raise TrainingError(str(exc)) from exc

    def _final(self, engine: Any, tokenizer: Any, stage: int, step: int, signer: Any) -> str:
        """Write the final model (collectively under ZeRO-3) and publish it from rank 0."""
        from finetune.published import FolderRefused, publish_folder, read_marker, remove_folder
        from finetune.train.final import save_final

        rel = self.store.path(FINAL)
        local = save_final(engine, tokenizer, self.scratch / FINAL, stage=stage, is_main=self.worker.is_main,
                           eot=self.spec.eot)  # fmt: skip
        if local is None:
            return rel
        meta = {"job_id": self.store.job_id, "step": step}
        if self.store.bucket.exists(rel):
            try:
                if read_marker(self.store.bucket, rel, "final", signer.public).get("step") == step:
                    logger.info("the final model of step %d is already published", step)
                    return rel
            except FolderRefused as exc:
                logger.warning("replacing the final model in %s: %s", self.store.describe(FINAL), exc)
            remove_folder(self.store.bucket, rel)
        publish_folder(self.store.bucket, local, rel, "final", meta, signer, move=True)
        return rel


def _tokenizer(model_dir: Path) -> Any:
    from finetune.loading import load_tokenizer

    return load_tokenizer(model_dir)


def error_info(exc: BaseException) -> ErrorInfo:
    """A failure as a typed record: what it was, whose move it is, and what to do when known."""
    message = str(exc) or type(exc).__name__
    hint = None
    if isinstance(exc, TrainingError):
        hint = "change the recipe as the message says and start the job again"
    elif fault_of(exc) == "transient":
        hint = "a temporary failure: the job resumes from its newest checkpoint when started again"
    return ErrorInfo(type=type(exc).__name__, message=message[:4000], fault=fault_of(exc), hint=hint)
