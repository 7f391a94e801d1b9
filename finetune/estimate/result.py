"""What an estimate says: plain data for the job service (``as_dict``) and lines for a terminal."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.estimate.devices import Device
from finetune.estimate.timing import Allowances, Throughput, Timing

GiB = 1024**3
#: Platform rule P3: one point is half a GPU-hour.
GPU_HOURS_PER_POINT = 0.5


@dataclass(frozen=True)
class ModelFacts:
    """The model as the job will train it (shape read from its config, no weights loaded)."""

    id: str | None
    architecture: str
    size: str  # "tiny" or "full"
    config_source: str
    tokenizer_source: str
    params: int
    matrix_params: int
    adapter_params: int
    trainable_params: int
    layers: int
    hidden: int
    query_width: int
    vocab: int
    dtype: str


@dataclass(frozen=True)
class DataFacts:
    """The dataset after the same preparation ``finetune data inspect`` runs."""

    train_samples: int
    eval_samples: int
    refused_rows: int
    dropped: int
    truncated: int
    tokens_per_epoch: int
    trained_tokens_per_epoch: int
    eval_tokens: int
    rows: int
    max_seq_len: int
    packing: bool
    packing_efficiency: float | None
    attn_len: float


@dataclass(frozen=True)
class PlanFacts:
    """Optimizer steps and tokens of the whole run (``finetune.train.plan``)."""

    gpus: int
    micro_batch: int
    grad_accum: int
    rows_per_step: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    eval_every: int
    tokens_per_step: float
    tokens: float
    trained_tokens: float


@dataclass(frozen=True)
class FlopsFacts:
    """FLOPs per token (``finetune.flops``) and in all."""

    model_per_token: float
    hardware_per_token: float
    eval_per_token: float
    recompute: bool
    model_total: float
    hardware_total: float


@dataclass(frozen=True)
class MemoryFacts:
    """Per-GPU memory from ``finetune.train.zero`` at the ZeRO stage the job would get."""

    zero_stage: int
    reason: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    host: int
    per_gpu: int
    device_memory: int
    budget: int
    fits: bool


@dataclass(frozen=True)
class Estimate:
    """Everything the estimator found for one recipe on one device."""

    recipe: str
    name: str | None
    method: str
    device: Device
    model: ModelFacts
    data: DataFacts
    plan: PlanFacts
    flops: FlopsFacts
    throughput: Throughput
    timing: Timing | None
    memory: MemoryFacts
    allowances: Allowances
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def can_estimate_time(self) -> bool:
        return self.timing is not None

    @property
    def gpu_hours(self) -> float | None:
        """GPUs held x wall time; None on a CPU (no GPU is held) or without a time."""
        if self.timing is None or not self.device.is_gpu:
            return None
        return self.plan.gpus * self.timing.wall_s / 3600.0

    @property
    def points(self) -> float | None:
        hours = self.gpu_hours
        return None if hours is None else hours / GPU_HOURS_PER_POINT

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "name": self.name,
            "method": self.method,
            "device": self.device.as_dict(),
            "model": asdict(self.model),
            "data": asdict(self.data),
            "plan": asdict(self.plan),
            "flops": asdict(self.flops),
            "throughput": self.throughput.as_dict(),
            "time": self.timing.as_dict() if self.timing else None,
            "gpu_hours": self.gpu_hours,
            "points": self.points,
            "memory": asdict(self.memory),
            "allowances": self.allowances.as_dict(),
            "assumptions": list(self.assumptions),
            "warnings": list(self.warnings),
        }

    def summary_lines(self) -> list[str]:
        """The estimate for a terminal, every assumption included."""
        m, d, p, f = self.model, self.data, self.plan, self.flops
        eff = f", packing efficiency {d.packing_efficiency:.1%}" if d.packing and d.packing_efficiency else ""
        lines = [
            f"recipe         {self.recipe}" + (f" ({self.name})" if self.name else ""),
            f"model          {m.id or 'custom'} ({m.size}, {m.architecture}, {m.dtype}): {m.params:,} parameters, "
            f"N = {m.matrix_params:,} in matrix products, {m.layers} layers, query width {m.query_width}",
            f"method         {self.method}: {m.trainable_params:,} parameters trained",
            f"device         {p.gpus} x {self.device.name} ({self.device.kind})",
            f"data           {d.train_samples:,} train / {d.eval_samples:,} eval samples ({d.refused_rows} rows "
            f"refused, {d.dropped} dropped, {d.truncated} truncated); {d.tokens_per_epoch:,} tokens per epoch "
            f"({d.trained_tokens_per_epoch:,} trained) in {d.rows:,} rows{eff}; attention length T = {d.attn_len:.1f}",
            f"plan           {p.total_steps:,} steps ({p.steps_per_epoch:,} per epoch, {p.epochs:g} epochs) of "
            f"{p.rows_per_step} rows (micro batch {p.micro_batch} x accumulation {p.grad_accum} x {p.gpus} GPU(s))",
            f"tokens         {p.tokens:,.0f} processed ({p.trained_tokens:,.0f} trained), "
            f"{p.tokens_per_step:,.0f} a step",
            f"FLOPs          {f.model_per_token:.4g} model / {f.hardware_per_token:.4g} hardware per token"
            f"{' (gradient checkpointing recomputes)' if f.recompute else ''}; {f.model_total:.4g} model FLOPs in all",
            f"throughput     {_rate(self.throughput.tokens_per_s)}: {self.throughput.note}",
        ]
        lines += self._time_lines()
        mem = self.memory
        per = "GPU" if self.device.is_gpu else "process"
        lines.append(
            f"memory         ZeRO-{mem.zero_stage}: {_gib(mem.per_gpu)} per {per}"
            f" (weights {_gib(mem.weights)}, gradients {_gib(mem.gradients)}, optimizer {_gib(mem.optimizer)}, "
            f"activations {_gib(mem.activations)}) of {_gib(mem.device_memory)}, budget {_gib(mem.budget)}: "
            f"{'fits' if mem.fits else 'DOES NOT FIT'}"
        )
        lines.append(f"               {mem.reason}")
        lines.append("assumptions")
        lines += [f"  - {a}" for a in self.assumptions]
        if self.warnings:
            lines.append("warnings")
            lines += [f"  - {w}" for w in self.warnings]
        return lines

    def _time_lines(self) -> list[str]:
        t = self.timing
        if t is None:
            return ["time           cannot estimate (see throughput)"]
        lines = [
            f"time           training span {_dur(t.span_s)}: steps {_dur(t.train_s)} + {t.evaluations} evaluation(s) "
            f"{_dur(t.eval_s)} + {t.checkpoints} checkpoint(s) {_dur(t.checkpoint_s)} + final model {_dur(t.final_s)}",
            f"               + start-up allowance {_dur(t.startup_s)} ("
            + ", ".join(f"{k} {_dur(v)}" for k, v in t.startup_parts.items())
            + f") = {_dur(t.wall_s)} wall",
        ]
        if self.gpu_hours is not None and self.points is not None:
            lines.append(
                f"cost           {self.plan.gpus} GPU(s) x {_dur(t.wall_s)} = {self.gpu_hours:,.3f} GPU-hours "
                f"= {self.points:,.3f} points (1 point = {GPU_HOURS_PER_POINT} GPU-hour)"
            )
        else:
            lines.append("cost           no GPU held: no points")
        return lines


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _rate(tokens_per_s: float | None) -> str:
    return "none" if tokens_per_s is None else f"{tokens_per_s:,.0f} tokens/s per GPU"


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
