"""The training loop: our own, compact, over a DeepSpeed engine; the same code on 1 or N workers.

One optimizer step takes ``grad_accum`` micro batches on every worker. Its loss is the sum of the
token losses of the whole global batch divided by the number of trained tokens in that global
batch (counted across micro batches and workers before the first forward pass), not a mean of
per-micro-batch means: a micro batch with few trained tokens weighs what its tokens weigh.
DeepSpeed averages gradients over workers, so each worker back-propagates ``world_size`` times
its share.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from finetune.data.packing import collate, collate_padded
from finetune.data.types import IGNORE_INDEX, PackedRow, TokenizedSample
from finetune.events import EvalEvent, PreemptedEvent, StepEvent
from finetune.train.metrics import MetricsSink
from finetune.train.plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    """Where this process stands in the run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LoopState:
    """What a checkpoint must hold besides the engine's own state to continue exactly."""

    step: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    preempted: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def as_rows(rows: Sequence[Any], packed: bool) -> list[PackedRow] | list[TokenizedSample]:
    """Training rows from a prepared dataset: dataclasses as they are, cached Arrow rows converted."""
    if not rows or isinstance(rows[0], PackedRow | TokenizedSample):
        return list(rows)
    if packed:
        return [PackedRow(r["input_ids"], r["labels"], r["position_ids"], r["doc_lengths"]) for r in rows]
    return [TokenizedSample("", r["input_ids"], r["labels"]) for r in rows]


def make_batch(rows: Sequence[Any], pad_id: int, device: torch.device) -> dict[str, Any]:
    batch = collate(rows, pad_id) if isinstance(rows[0], PackedRow) else collate_padded(rows, pad_id)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def trained_targets(batch: dict[str, Any]) -> int:
    """Tokens the batch trains: labels the model predicts after its internal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def real_tokens(rows: Sequence[Any]) -> int:
    return sum(len(r) for r in rows)


def _all_sum(value: float | int, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _forward(engine: Any, batch: dict[str, Any], **kwargs: Any) -> Any:
    # No cache, ever: with packed rows transformers tells the documents apart by their restarting
    # position_ids only when there is no cache (finetune.data.packing).
    return engine(**batch, use_cache=False, **kwargs)


def summed_loss(engine: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the token losses of a batch, with the LM head run on trained positions only.

    Prompt tokens, document starts and padding train nothing, yet a causal LM computes logits
    (and the loss its log-softmax) at every position: in instruction data that is often a third
    to a half of the head's work and of its logits' memory. A pre-hook on the output embedding
    hands it only the hidden states whose next label is trained; the loss is then the same sum
    that transformers' causal-LM loss takes (fp32 logits, labels shifted by one).
    """
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep]

    def trained_positions(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, :-1][keep], *args[1:])

    handle = engine.module.get_output_embeddings().register_forward_pre_hook(trained_positions)
    try:
        out = _forward(engine, {k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return torch.nn.functional.cross_entropy(out.logits.float(), targets, reduction="sum")


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _grad_norm(engine: Any) -> float:
    """2-norm of the (already reduced) gradients of the trainable parameters."""
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def train_step(engine: Any, micro: list[list[Any]], data: Sequence[Any], pad_id: int, worker: Worker) -> dict[str, Any]:
    """One optimizer step over this worker's micro batches. Returns the step's global figures."""
    batches = [make_batch([data[i] for i in rows], pad_id, worker.device) for rows in micro]
    n_global = _all_sum(sum(trained_targets(b) for b in batches), worker.device)
    if n_global == 0:
        raise RuntimeError("a step without any trained token; the data pipeline should never produce one")
    normaliser = torch.tensor(n_global, device=worker.device)
    loss_share = 0.0
    own_norm = None
    for i, batch in enumerate(batches):
        loss = summed_loss(engine, batch) / normaliser
        engine.backward(loss * worker.world_size, scale_wrt_gas=False)
        if i == len(batches) - 1 and engine.zero_optimization_stage() == 0:
            own_norm = _grad_norm(engine)  # DeepSpeed clips fp32 ZeRO-0 gradients without keeping the norm
        engine.step()
        loss_share += float(loss.detach())
    tokens = _all_sum(sum(real_tokens([data[i] for i in rows]) for rows in micro), worker.device)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = own_norm if grad_norm is None or own_norm is not None else grad_norm
    return {
        "loss": _all_sum(loss_share, worker.device),
        "trained_tokens": int(n_global),
        "tokens": int(tokens),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
    }


@torch.no_grad()
def evaluate(engine: Any, data: Sequence[Any], plan: Plan, pad_id: int, worker: Worker) -> dict[str, float]:
    """Mean token loss and perplexity over the evaluation rows, split across workers."""
    engine.eval()
    mine = list(range(worker.rank, len(data), worker.world_size))
    total, count = 0.0, 0
    for i in range(0, len(mine), plan.micro_batch):
        batch = make_batch([data[j] for j in mine[i : i + plan.micro_batch]], pad_id, worker.device)
        n = trained_targets(batch)
        if n:
            total += float(summed_loss(engine, batch))
            count += n
    engine.train()
    total, count_all = _all_sum(total, worker.device), _all_sum(count, worker.device)
    loss = total / max(count_all, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count_all)}


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (a checkpoint, then a clean exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (some launchers): no signal handling there
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: checkpointing at the end of this step, then stopping")
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class Hooks:
    """What the loop calls out to: checkpointing and the wish to stop (points exhausted...)."""

    save: Any  # Callable[[LoopState], None]
    should_stop: Any = None  # Callable[[], bool] | None


def run_loop(
    engine: Any,
    plan: Plan,
    train_rows: Sequence[Any],
    eval_rows: Sequence[Any],
    *,
    pad_id: int,
    worker: Worker,
    sink: MetricsSink,
    hooks: Hooks,
    state: LoopState,
    early_stopping: tuple[int | None, float] = (None, 0.0),
) -> LoopState:
    """Train from ``state.step`` to the plan's last step, evaluating and checkpointing on the way."""
    patience, min_delta = early_stopping
    last_save = time.monotonic()
    engine.train()
    with Preemption() as preemption:
        while state.step < plan.total_steps:
            step = state.step
            _set_lr(engine, plan.schedule.lr(step))
            start = time.perf_counter()
            figures = train_step(engine, plan.micro_batches(step, worker.rank), train_rows, pad_id, worker)
            seconds = time.perf_counter() - start
            state.step = step + 1
            if worker.is_main:
                sink.emit(StepEvent(
                    step=state.step, epoch=round(plan.epoch_of(state.step), 4), lr=plan.schedule.lr(step), **figures,
                    step_time=round(seconds, 4), tokens_per_s=figures["tokens"] / seconds, peak_memory=_peak_memory(),
                ))  # fmt: skip
            if not math.isfinite(figures["loss"]):
                raise FloatingPointError(f"the loss is {figures['loss']} at step {state.step}: lower the learning rate")
            if plan.eval_every and eval_rows and (state.step % plan.eval_every == 0 or state.step == plan.total_steps):
                state.last_eval = evaluate(engine, eval_rows, plan, pad_id, worker)
                if worker.is_main:
                    sink.emit(EvalEvent(step=state.step, **state.last_eval))
                if _early_stop(state, patience, min_delta):
                    state.stopped_early = True
            stop_wanted = bool(hooks.should_stop and hooks.should_stop())
            preempted = _all_sum(int(preemption.requested or stop_wanted), worker.device) > 0
            reason = "signal" if preemption.requested else "stop requested"
            due = (plan.save_every_steps and state.step % plan.save_every_steps == 0) or (
                time.monotonic() - last_save >= plan.save_every_seconds
            )
            if preempted or state.stopped_early or due or state.step == plan.total_steps:
                state.preempted = preempted and state.step < plan.total_steps
                hooks.save(state)
                last_save = time.monotonic()
            if state.preempted and worker.is_main:
                sink.emit(PreemptedEvent(step=state.step, reason=reason, detail="checkpoint saved"))
            if state.preempted or state.stopped_early:
                break
    return state


def _early_stop(state: LoopState, patience: int | None, min_delta: float) -> bool:
    loss = state.last_eval.get("eval_loss")
    if loss is None:
        return False
    if state.best_eval_loss is None or loss < state.best_eval_loss - min_delta:
        state.best_eval_loss, state.evals_without_improvement = loss, 0
        return False
    state.evals_without_improvement += 1
    return patience is not None and state.evals_without_improvement >= patience
