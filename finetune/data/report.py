"""The data report: what was read, what was refused and why, tokens, lengths, packing.

The report speaks of counts and locations. It holds content in exactly one place, the rendered
``sample``, which shows the tenant which tokens are trained; anything shown to operators must
leave it out (:meth:`DataReport.for_operators`).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.types import RowProblem

#: Problems listed one by one in the report (all are counted). Generous, so that data_report.json
#: names every bad row of any dataset worth fixing, yet bounded: a broken file must not make a huge report.
MAX_LISTED_PROBLEMS = 10_000

#: Problems listed in the terminal summary; the rest are in data_report.json.
SUMMARY_PROBLEMS = 20

_DUPLICATES_DONE = {"drop": "dropped", "keep": "kept", "fail": "refused"}


def problem_kind(problem: RowProblem) -> str:
    """A reason with its numbers taken out, to count problems by kind."""
    return re.sub(r"\d+", "N", problem.reason.split(":")[0]).strip()


def length_histogram(lengths: list[int], max_seq_len: int) -> list[dict[str, int]]:
    """Counts of lengths in power-of-two bins up to ``max_seq_len``."""
    edges = [0]
    edge = 32
    while edge < max_seq_len:
        edges.append(edge)
        edge *= 2
    edges.append(max_seq_len)
    bins = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        bins.append({"from": lo + 1, "to": hi, "count": sum(1 for n in lengths if lo < n <= hi)})
    over = sum(1 for n in lengths if n > max_seq_len)
    if over:
        bins.append({"from": max_seq_len + 1, "to": max(lengths), "count": over})
    return bins


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"min": 0, "median": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
    }


@dataclass
class DataReport:
    """Everything a tenant needs to trust (or fix) a dataset, as plain data."""

    dataset: str
    files: list[str] = field(default_factory=list)
    format: str = ""
    format_reason: str = ""
    rows_read: int = 0
    rows_used: int = 0
    problems: list[str] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    problems_total: int = 0
    duplicates: int = 0
    duplicates_policy: str = ""
    bad_row_policy: str = ""
    train_samples: int = 0
    eval_samples: int = 0
    eval_source: str = ""
    truncation: str = ""
    truncated: int = 0
    dropped: int = 0
    tokens_train: int = 0
    trained_tokens_train: int = 0
    tokens_eval: int = 0
    max_seq_len: int = 0
    lengths: dict[str, float] = field(default_factory=dict)
    histogram: list[dict[str, int]] = field(default_factory=list)
    packing: bool = False
    packed_rows_train: int = 0
    packed_rows_eval: int = 0
    packing_efficiency: float | None = None
    sample: str = ""
    cache_key: str = ""
    cache_hit: bool = False
    dataset_sha256: str = ""  # the dataset files' names, sizes and contents (when it was cached)

    def add_problems(self, problems: list[RowProblem]) -> None:
        self.problems_total += len(problems)
        room = MAX_LISTED_PROBLEMS - len(self.problems)
        self.problems.extend(str(p) for p in problems[: max(0, room)])
        counts = Counter(self.problem_counts)
        counts.update(problem_kind(p) for p in problems)
        self.problem_counts = dict(counts.most_common())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> Path:
        """Write the report as JSON to ``path``, atomically: readers see the old file or the new one.

        Returns:
            ``path``.
        """
        from finetune.files import write_json_atomic

        write_json_atomic(path, self.as_dict(), sort_keys=False)
        return path

    def for_operators(self) -> dict[str, Any]:
        """The report without tenant content: counts only, no sample and no row-level reasons."""
        data = self.as_dict()
        for key in ("sample", "problems", "files", "dataset"):
            data.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def summary_lines(self, report_path: str = "data_report.json") -> list[str]:
        """The report for a terminal.

        Args:
            report_path: Where the full report is, named when the problem list is cut short.
        """
        done = _DUPLICATES_DONE.get(self.duplicates_policy, "found")
        lines = [
            f"dataset        {self.dataset} ({len(self.files)} file(s)), format {self.format}: {self.format_reason}",
            f"rows           {self.rows_read} read, {self.rows_used} used, {self.problems_total} refused, "
            f"{self.duplicates} exact duplicates {done}; bad rows: {self.bad_row_policy}",
        ]
        for kind, count in self.problem_counts.items():
            lines.append(f"  {count:>6} x {kind}")
        shown = self.problems[:SUMMARY_PROBLEMS]
        lines += [f"  {text}" for text in shown]
        if self.problems_total > len(shown):
            lines.append(f"  ... and {self.problems_total - len(shown)} more (see {report_path})")
        lines += [
            f"split          {self.train_samples} train, {self.eval_samples} eval ({self.eval_source})",
            f"long samples   {self.truncation}: {self.truncated} truncated, {self.dropped} dropped "
            f"(max {self.max_seq_len} tokens)",
            f"tokens         {self.tokens_train} train ({self.trained_tokens_train} trained), {self.tokens_eval} eval",
            "lengths        " + ", ".join(f"{k} {v}" for k, v in self.lengths.items()),
        ]
        peak = max((b["count"] for b in self.histogram), default=0) or 1
        for b in self.histogram:
            bar = "#" * round(40 * b["count"] / peak)
            lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>7} {bar}")
        if self.packing:
            eff = f"{100 * self.packing_efficiency:.2f}%" if self.packing_efficiency is not None else "-"
            lines.append(f"packing        {self.packed_rows_train} rows, efficiency {eff} (real tokens / token slots)")
        else:
            lines.append("packing        off")
        lines.append(f"cache          {'hit' if self.cache_hit else 'miss'} ({self.cache_key})")
        if self.sample:
            lines += ["sample         trained tokens are shown [[like this]]:", self.sample]
        return lines
