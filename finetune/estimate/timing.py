"""From tokens and FLOPs to seconds: the throughput a job can expect, and the parts of its wall time.

The wall time of a job is its **start-up** (allocation to the first step: scheduling, processes,
imports, data preparation, model load, DeepSpeed initialisation) plus its **training span**, the
span from the job's ``start`` event to its ``end`` event: every optimizer step,
the evaluations, the checkpoints and the final model. Steps and evaluations come from a throughput;
checkpoints and the final model from the bytes they write; the start-up is an allowance.

Throughput comes from a measured run when one fits (:mod:`finetune.estimate.table`): the run's
achieved hardware FLOP/s (tokens/s x hardware FLOPs per token) is held constant, so a job with
more FLOPs per token (longer documents, another model, gradient checkpointing) gets proportionally
fewer tokens/s. Without a measurement a GPU gets an assumed utilisation of its bf16 peak; a CPU has
no peak to assume a share of, and a tiny model is bound by per-step overheads rather than FLOPs, so
those get no time estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from finetune.estimate.devices import Device
from finetune.estimate.table import Measurement


@dataclass(frozen=True)
class Allowances:
    """The stated assumptions behind every figure that is not measured.

    Attributes:
        startup_gpu_s: Fixed start-up of a GPU job: scheduling, container and Ray workers, imports,
            process group and DeepSpeed initialisation.
        startup_cpu_s: The same on a CPU machine (no container or scheduler; imports dominate).
        load_bytes_per_s: Reading the weights from the model store.
        data_tokens_per_s: Data preparation (read, chat template, labels, pack) in one process; the
            recorded data-pipeline benchmark measured 136,740 tokens/s on one 2-core process.
        storage_bytes_per_s: Writing a checkpoint or the final model, digests included.
        checkpoint_fixed_s: Fixed cost of one checkpoint (DeepSpeed's files, RNG states, trainer state,
            marker, commit): 0.025-0.04 s measured on a quiet 2-core CPU with a tiny model, whose
            1.7 MB of states take milliseconds to write (up to 0.12 s when the machine was busy).
        final_fixed_s: Fixed cost of the final model (configs, tokenizer, rename into place): about
            0.01-0.02 s measured the same way.
        utilisation: Share of the bf16 peak assumed as hardware FLOPs utilisation when nothing is
            measured, by method. Without activation recomputation it equals MFU.
    """

    startup_gpu_s: float = 300.0
    startup_cpu_s: float = 60.0
    load_bytes_per_s: float = 1.0e9
    data_tokens_per_s: float = 100_000.0
    storage_bytes_per_s: float = 0.5e9
    checkpoint_fixed_s: float = 0.03
    final_fixed_s: float = 0.02
    utilisation: tuple[tuple[str, float], ...] = (("full", 0.40), ("lora", 0.30), ("qlora", 0.20))

    def utilisation_of(self, method: str) -> float:
        return dict(self.utilisation)[method]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["utilisation"] = dict(self.utilisation)
        return data


@dataclass(frozen=True)
class Throughput:
    """Tokens per second per GPU for a job, and where the figure comes from.

    Attributes:
        source: ``measured`` (a recorded run, scaled by FLOPs per token), ``assumed`` (a share of
            the device's peak) or ``none`` (no estimate possible).
        tokens_per_s: Training tokens per second per GPU; None when ``source`` is ``none``.
        flops_per_s: Achieved hardware FLOP/s per GPU that the figure stands for.
        note: How the figure was obtained, or why there is none.
        measurement: The recorded run, when measured.
    """

    source: str
    tokens_per_s: float | None
    flops_per_s: float | None
    note: str
    measurement: Measurement | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tokens_per_s_per_gpu": self.tokens_per_s,
            "hardware_flops_per_s_per_gpu": self.flops_per_s,
            "note": self.note,
            "measurement": self.measurement.as_dict() if self.measurement else None,
        }


def throughput_for(
    measurement: Measurement | None,
    device: Device,
    method: str,
    hardware_flops_per_token: float,
    allowances: Allowances,
    *,
    missing: str,
    tiny: bool = False,
) -> Throughput:
    """The expected throughput of a job (rules in the module docstring).

    Args:
        measurement: The closest recorded run, if any.
        device: The device the job runs on.
        method: ``full``, ``lora`` or ``qlora``.
        hardware_flops_per_token: The job's hardware FLOPs per token (recomputation included).
        allowances: The assumed utilisation when nothing is measured.
        missing: Why no measurement fits (said when falling back or giving up).
        tiny: Whether the job trains a tiny model (no utilisation is assumed for one).
    """
    if measurement is not None:
        achieved = measurement.tokens_per_s * measurement.hardware_flops_per_token
        rate = achieved / hardware_flops_per_token
        ratio = rate / measurement.tokens_per_s
        scaled = (
            f", scaled x{ratio:.3f} by hardware FLOPs per token (achieved FLOP/s held constant)"
            if abs(ratio - 1) > 0.005
            else ""
        )
        note = f"measured: {measurement.describe()}{scaled}"
        return Throughput("measured", rate, achieved, note, measurement)
    if device.peak_flops is None or tiny:
        why = (
            "a CPU has no peak FLOP/s to assume a share of"
            if device.peak_flops is None
            else "a tiny model's speed is set by per-step overheads, not FLOPs, so no share of the peak fits it"
        )
        note = (
            f"cannot estimate the time: {missing}, and {why}; record a run with benchmarks/throughput.py "
            f"on a {device.kind} device, or point --results at a folder that has one"
        )
        return Throughput("none", None, None, note)
    share = allowances.utilisation_of(method)
    achieved = share * device.peak_flops
    note = (
        f"assumed: {missing}, so {share:.0%} of the {device.kind} bf16 peak ({device.peak_flops / 1e12:,.1f} TFLOP/s) "
        f"is assumed as hardware FLOPs utilisation for {method}"
    )
    return Throughput("assumed", achieved / hardware_flops_per_token, achieved, note)


@dataclass(frozen=True)
class Timing:
    """The parts of a job's wall time, seconds (see the module docstring)."""

    train_s: float
    evaluations: int
    eval_s: float
    checkpoints: int
    checkpoint_s: float
    final_s: float
    startup_s: float
    startup_parts: dict[str, float]

    @property
    def span_s(self) -> float:
        """From the job's ``start`` event to its ``end`` event."""
        return self.train_s + self.eval_s + self.checkpoint_s + self.final_s

    @property
    def wall_s(self) -> float:
        return self.startup_s + self.span_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(span_s=self.span_s, wall_s=self.wall_s)
        return data


def count_evaluations(total_steps: int, eval_every: int, has_eval_rows: bool) -> int:
    """Evaluations of a run: every ``eval_every`` steps and after the last step (early stopping not foreseen)."""
    if not eval_every or not has_eval_rows:
        return 0
    return total_steps // eval_every + (1 if total_steps % eval_every else 0)


def count_checkpoints(
    total_steps: int, save_every_steps: int, save_every_s: float, step_s: float, eval_s_per_step: float
) -> int:
    """Checkpoints of a run: by steps, by time (the clock restarts at each save), and one after the last step."""
    per_step = step_s + eval_s_per_step
    if save_every_steps and save_every_steps * per_step <= save_every_s:
        return (total_steps - 1) // save_every_steps + 1
    if per_step <= 0:
        return 1
    every = save_every_s if not save_every_steps else min(save_every_s, save_every_steps * per_step)
    return max(0, math.ceil(total_steps * per_step / every) - 1) + 1
