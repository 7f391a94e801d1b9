"""The ops' throughput benchmark as a cluster job: ``benchmarks/throughput.py`` (our engine against
the Hugging Face Trainer on the same model, synthetic data and settings) on each of the GPUs asked
for, one copy per GPU, in one Ray job. Figures are recorded per GPU with the device model and shown
beside the live throughput of tenant jobs. No tenant is involved or charged: synthetic data only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.recipe import METHOD_TYPES

#: The line the benchmark driver ends its log with.
RESULT_MARKER = "FINETUNE_BENCHMARK_RESULT "
ENV = "FINETUNE_BENCHMARK"
_RUN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}:(full|lora|qlora)$")


class BenchmarkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(default=1, ge=1, le=64, description="GPUs to benchmark, one copy of the benchmark on each.")
    runs: list[str] = Field(default=["llama-3.2-1b-instruct:lora"], min_length=1, max_length=8,
                            description="MODEL:METHOD pairs of the registry.")  # fmt: skip
    size: Literal["auto", "tiny", "full"] = Field(default="auto", description="'auto': full on GPUs, tiny on CPUs.")
    seq_len: int = Field(default=1024, ge=64, le=32768)
    micro_batch: int = Field(default=4, ge=1, le=64)
    warmup: int = Field(default=3, ge=0, le=100)
    steps: int = Field(default=10, ge=1, le=1000)
    baseline: bool = Field(default=True, description="Also run the Hugging Face Trainer on the same settings.")

    @field_validator("runs")
    @classmethod
    def _runs(cls, value: list[str]) -> list[str]:
        for run in value:
            if not _RUN.match(run):
                raise ValueError(f"'{run}' is not MODEL:METHOD with a method of {', '.join(METHOD_TYPES)}")
        return value

    def argv(self, *, gpu: bool) -> list[str]:
        """The benchmark script's arguments (the output file is added by the driver)."""
        size = self.size if self.size != "auto" else ("full" if gpu else "tiny")
        args = ["--size", size, "--seq-len", str(self.seq_len), "--micro-batch", str(self.micro_batch),
                "--warmup", str(self.warmup), "--steps", str(self.steps), "--packing", "on"]  # fmt: skip
        if not gpu:  # a CPU slot: a small corpus keeps the tokenizer and data quick
            args += ["--rows", "120", "--passages", "400", "--vocab", "2048"]
        for run in self.runs:
            args += ["--run", run]
        return args + ([] if self.baseline else ["--no-baseline"])


def script() -> Path | None:
    """``throughput.py``: the wheel's copy, else the source checkout's."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (
        package / "_data" / "benchmarks" / "throughput.py",
        package.parent / "benchmarks" / "throughput.py",
    ):
        if candidate.is_file():
            return candidate
    return None


def parse_result(logs: str) -> list[dict[str, Any]] | None:
    """The per-GPU results the driver printed last, or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                found = json.loads(line[len(RESULT_MARKER) :])
            except ValueError:
                return None
            return found if isinstance(found, list) else None
    return None


def per_gpu_rows(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per GPU, system, model and method: tokens/s per GPU, MFU, step time, device."""
    rows = []
    for gpu, one in enumerate(result):
        device = one.get("device") or {}
        for run in one.get("runs") or []:
            rows.append({
                "gpu": gpu, "device": device.get("name"), "device_kind": device.get("kind"),
                "system": run.get("system"), "model_id": run.get("model"), "method": run.get("method"),
                "size": run.get("size"), "tokens_per_s_per_gpu": run.get("tokens_per_s_per_gpu"),
                "mfu": run.get("mfu"), "step_time_s": run.get("step_time_s"), "valid": run.get("valid"),
                "speedup_vs_baseline": run.get("speedup_vs_baseline"),
            })  # fmt: skip
    return rows
