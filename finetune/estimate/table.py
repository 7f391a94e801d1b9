"""The recorded throughput table: ``throughput-<device kind>-<YYYYMMDD>.json`` files of the benchmark.

Each file holds the runs of one benchmark session on one device (``benchmarks/throughput.py``
writes them). The estimator looks for the run closest to a job: only valid runs of our own engine
(``system: finetune``) on the same device kind, with the same method, model size class (``tiny``
or ``full``) and precision count. Among those, closest means, in this order: the same model
(registry id), else the same architecture (``model_type``), else any model; then the nearest
sequence length (by ratio); then the same micro batch; then the same packing; then the newest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Keys a run needs to be usable, with their types (the rest of the format is informative).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "system": str,
    "model": str,
    "architecture": str,
    "size": str,
    "method": str,
    "seq_len": int,
    "micro_batch": int,
    "packing": bool,
    "dtype": str,
    "tokens_per_s_per_gpu": (int, float),
    "model_flops_per_token": (int, float),
    "valid": bool,
}
_MODEL_MATCH = ("same model", "same architecture", "another model of the same size class")


@dataclass(frozen=True)
class Query:
    """What a job looks like to the table."""

    kind: str
    model: str | None
    architecture: str
    size: str
    method: str
    dtype: str
    seq_len: int
    micro_batch: int
    packing: bool


@dataclass(frozen=True)
class Measurement:
    """The run chosen for a job, where it came from and how it differs from the job."""

    file: str
    date: str
    device_name: str
    run: dict[str, Any]
    match: str
    differences: tuple[str, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return float(self.run["tokens_per_s_per_gpu"])

    @property
    def hardware_flops_per_token(self) -> float:
        return float(self.run.get("hardware_flops_per_token") or self.run["model_flops_per_token"])

    def describe(self) -> str:
        r = self.run
        text = (
            f"{Path(self.file).name} ({self.date}, {self.device_name}): {r['model']} {r['size']} {r['method']}, "
            f"seq {r['seq_len']}, micro batch {r['micro_batch']}, packing {'on' if r['packing'] else 'off'}, "
            f"{r['dtype']}: {self.tokens_per_s:,.0f} tokens/s per GPU ({self.match})"
        )
        return text + ("; differs in " + ", ".join(self.differences) if self.differences else "")

    def as_dict(self) -> dict[str, Any]:
        keep = (*_REQUIRED, "attn_len", "hardware_flops_per_token", "mfu")
        return {
            "file": self.file,
            "date": self.date,
            "device": self.device_name,
            "match": self.match,
            "differences": list(self.differences),
            "run": {k: self.run.get(k) for k in keep},
        }


@dataclass
class Table:
    """Usable runs of one device kind, and what was skipped on the way (for the estimate's warnings)."""

    runs: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)  # file, date, device, run
    skipped: list[str] = field(default_factory=list)


def _run_problem(run: Any) -> str | None:
    if not isinstance(run, dict):
        return "not an object"
    for key, kinds in _REQUIRED.items():
        value = run.get(key)
        if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool)):
            return f"'{key}' missing or not {kinds.__name__ if isinstance(kinds, type) else 'a number'}"
    if run["tokens_per_s_per_gpu"] <= 0 or run["model_flops_per_token"] <= 0 or run["seq_len"] <= 0:
        return "throughput, FLOPs per token and seq_len must be positive"
    return None


def read_table(folder: Path, kind: str) -> Table:
    """The runs recorded for device ``kind`` in ``folder`` (``throughput-*.json``); bad files are listed, not fatal."""
    table = Table()
    if not folder.is_dir():
        table.skipped.append(f"no results folder at {folder}")
        return table
    for path in sorted(folder.glob("throughput-*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            device = doc["device"]
            runs, date = doc["runs"], str(doc["date"])
            if not isinstance(runs, list) or not isinstance(device, dict):
                raise TypeError("'runs' must be a list and 'device' an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            table.skipped.append(f"{path}: not a throughput result ({exc.__class__.__name__}: {exc})")
            continue
        if device.get("kind") != kind:
            continue
        for i, run in enumerate(runs):
            problem = _run_problem(run)
            if problem:
                table.skipped.append(f"{path}: runs[{i}]: {problem}")
            else:
                table.runs.append((str(path), date, str(device.get("name") or kind), run))
    return table


def _differences(query: Query, run: dict[str, Any]) -> tuple[str, ...]:
    out = []
    if run["seq_len"] != query.seq_len:
        out.append(f"sequence length ({run['seq_len']}, job {query.seq_len})")
    if run["micro_batch"] != query.micro_batch:
        out.append(f"micro batch ({run['micro_batch']}, job {query.micro_batch})")
    if run["packing"] != query.packing:
        out.append(f"packing ({'on' if run['packing'] else 'off'}, job {'on' if query.packing else 'off'})")
    return tuple(out)


def find_measurement(table: Table, query: Query) -> Measurement | None:
    """The closest valid run of our engine for ``query`` (the order is in the module docstring), or None."""
    best: tuple[tuple[Any, ...], Measurement] | None = None
    for order, (file, date, device_name, run) in enumerate(table.runs):
        if not (
            run["system"] == "finetune"
            and run["valid"]
            and run["method"] == query.method
            and run["size"] == query.size
            and run["dtype"] == query.dtype
        ):
            continue
        if query.model is not None and run["model"] == query.model:
            rank = 0
        elif run["architecture"] == query.architecture:
            rank = 1
        else:
            rank = 2
        key = (
            rank,
            abs(math.log(run["seq_len"] / query.seq_len)),
            run["micro_batch"] != query.micro_batch,
            abs(run["micro_batch"] - query.micro_batch),
            run["packing"] != query.packing,
            _negated(date),
            -order,
        )
        if best is None or key < best[0]:
            best = (key, Measurement(file, date, device_name, run, _MODEL_MATCH[rank], _differences(query, run)))
    return best[1] if best is not None else None


def _negated(date: str) -> tuple[int, ...]:
    """Sorts the newest date first (dates are ``YYYY-MM-DD``; anything else sorts last)."""
    digits = [int(p) for p in date[:10].split("-") if p.isdigit()]
    return tuple(-d for d in digits) if len(digits) == 3 else (1,)
