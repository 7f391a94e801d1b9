"""From a recipe's data section to training rows: read, check, split, tokenise, pack, cache.

Every row is accounted for in the :class:`~finetune.data.report.DataReport`: used, refused with
a located reason, an exact duplicate, dropped or truncated for length. The recipe's bad-row policy
decides whether refused rows fail the job, its duplicates policy what happens to exact duplicates
(they are never bad rows); a sample too long under ``truncation: fail`` always fails it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.cache import cache_key, files_digest, load_entry, save_entry, tokenizer_digest
from finetune.data.formats import DETECT_ROWS, detect_format, to_sample
from finetune.data.limits import DEFAULT_DATA_LIMITS, DataLimits
from finetune.data.packing import pack, packing_efficiency
from finetune.data.readers import read_rows
from finetune.data.report import DataReport, length_histogram, length_stats
from finetune.data.tokenize import Dropped, TooLong, render_trained, special_token_in, tokenize_sample
from finetune.data.types import PackedRow, Row, RowProblem, Sample, TokenizedSample
from finetune.errors import Issue, IssuesError, RecipeError
from finetune.recipe import DataSection, Recipe
from finetune.storage import Bucket

logger = logging.getLogger(__name__)

#: Samples per task handed to a tokenising process.
_CHUNK = 256

#: Issues written out in a DataError's message; ``issues`` holds every one of them.
_ISSUES_IN_MESSAGE = 50


class DataError(IssuesError):
    """The dataset cannot be used as the recipe says (too many bad rows, a sample too long...).

    Attributes:
        issues: Every problem that refused the dataset, located; the message lists the first 50.
        summary: Why the dataset was refused, in one line.
        report: The data report as far as preparation got; None when it stopped before reading.
    """

    def __init__(self, issues: Iterable[Issue], summary: str, report: DataReport | None = None) -> None:
        super().__init__(issues, summary)
        self.summary = summary
        self.report = report
        hidden = len(self.issues) - _ISSUES_IN_MESSAGE
        if hidden > 0:
            shown = [f"  {i}" for i in self.issues[:_ISSUES_IN_MESSAGE]]
            self.args = ("\n".join([summary, *shown, f"  ... and {hidden} more"]),)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.issues, self.summary, self.report))


@dataclass
class PreparedData:
    """Training and evaluation rows (packed or not) and the report that accounts for them."""

    train: Sequence[Any]
    eval: Sequence[Any]
    report: DataReport


def problem_issue(problem: RowProblem | Dropped) -> Issue:
    """A row problem as a located :class:`Issue` (``file:line`` split when there is a line)."""
    file, _, tail = problem.where.rpartition(":")
    line = int(tail) if file and tail.isdigit() else None
    return Issue(getattr(problem, "field", None) or "", problem.reason, file=file if line else problem.where, line=line)


# ------------------------------------------------------------------------------- reading


def _local_files(bucket: Bucket, rel: str, scratch: Path | None) -> tuple[Path, list[tuple[str, Path]]]:
    """A local path for ``rel`` (downloaded to ``scratch`` from remote buckets) and its regular files."""
    from finetune.data.readers import dataset_files

    if not bucket.exists(rel):
        raise DataError([Issue("data.path", f"'{rel}' does not exist in your bucket")], "dataset not found")
    if bucket.local:
        path = bucket.local_path(rel)
    else:
        if scratch is None:
            raise DataError([Issue("data.path", "a remote bucket needs a scratch folder")], "dataset not readable")
        path = scratch / rel
        names = [n for n, _ in bucket.walk_files(rel)] if bucket.isdir(rel) else [rel]
        for name in names:
            bucket.download(name, scratch / name)
    # Never through a link: these files are hashed for the cache key before read_rows refuses the rest.
    return path, dataset_files(path)


def read_samples(
    path: Path, display: str, data: DataSection, report: DataReport
) -> tuple[list[Sample], list[RowProblem]]:
    """Rows of one file or folder as samples, and the rows refused.

    Exact duplicates follow ``data.duplicates`` and are counted in the report, never refused here.
    Counts go to the report as they are found.
    """
    samples, problems, _ = _read(path, display, data, report)
    return samples, problems


def _read(
    path: Path, display: str, data: DataSection, report: DataReport, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> tuple[list[Sample], list[RowProblem], list[RowProblem]]:
    """Samples, refused rows and exact duplicates (each located, naming the row it repeats)."""
    rows: list[Row] = []
    problems: list[RowProblem] = []
    for item in read_rows(path, display, limits=limits):
        (rows if isinstance(item, Row) else problems).append(item)  # type: ignore[arg-type]
    report.rows_read += len(rows) + len(problems)
    fmt = data.format
    if fmt == "auto" and rows:
        fmt, report.format_reason = detect_format(rows[:DETECT_ROWS], data.fields)
    elif not report.format_reason:
        report.format_reason = "set in the recipe"
    report.format = fmt
    samples: list[Sample] = []
    duplicates: list[RowProblem] = []
    seen: dict[str, str] = {}
    for row in rows:
        result = to_sample(row, fmt, data.fields, data.system_prompt) if fmt != "auto" else None
        if isinstance(result, RowProblem) or result is None:
            problems.append(result or RowProblem(row.where, "format unknown"))
            continue
        key = _sample_key(result)
        if key in seen:
            duplicates.append(RowProblem(row.where, f"exact duplicate of {seen[key]}"))
            if data.duplicates != "keep":
                continue
        else:
            seen[key] = row.where
        samples.append(result)
    report.duplicates += len(duplicates)
    problems.sort(key=_file_order)
    report.add_problems(problems)
    return samples, problems, duplicates


def _sample_key(sample: Sample) -> str:
    """What makes two samples exact duplicates: the same content, wherever it came from."""
    messages = [(m.role, m.content) for m in sample.messages]
    return json.dumps([sample.kind, messages, sample.text, sample.chosen, sample.rejected], ensure_ascii=False)


def _file_order(problem: RowProblem) -> tuple[str, int, str]:
    file, _, tail = problem.where.rpartition(":")
    digits = "".join(ch for ch in tail if ch.isdigit())
    return (file, int(digits), tail) if file and digits else (problem.where, 0, "")


def check_rows(
    data: DataSection, report: DataReport, problems: Iterable[RowProblem], duplicates: Iterable[RowProblem] = ()
) -> None:
    """Apply the recipe's duplicates and bad-row policies to the rows found so far.

    Raises:
        DataError: duplicates under ``duplicates: fail``, or too many bad rows; every such row
            located, and the report attached.
    """
    reasons: list[str] = []
    refused: list[RowProblem] = []
    repeated = list(duplicates)
    if repeated and data.duplicates == "fail":
        reasons.append(
            f"{len(repeated)} row(s) are exact duplicates of earlier rows and data.duplicates is 'fail'; "
            "remove them, or change data.duplicates"
        )
        refused += repeated
    bad = _bad_rows_reason(data, report)
    if bad:
        reasons.append(f"{bad}; fix the rows listed, or change data.bad_rows")
        refused += problems
    if reasons:
        issues = [problem_issue(p) for p in sorted(refused, key=_file_order)]
        raise DataError(issues, "; ".join(reasons), report)


def _bad_rows_reason(data: DataSection, report: DataReport) -> str | None:
    """Why the bad rows counted so far fail the job, or None when the policy allows them.

    Exact duplicates are not bad rows, and only those kept count as rows at all.
    """
    if report.problems_total == 0:
        return None
    counted = report.rows_read - (report.duplicates if data.duplicates != "keep" else 0)
    fraction = report.problems_total / max(counted, 1)
    policy = data.bad_rows
    if policy.policy == "skip" and fraction <= policy.max_fraction:
        return None
    why = (
        "the bad-row policy is 'fail'"
        if policy.policy == "fail"
        else f"{fraction:.1%} of rows are bad, more than the {policy.max_fraction:.1%} allowed"
    )
    rows = f"{counted} rows" if counted == report.rows_read else f"{counted} distinct rows"
    return f"{report.problems_total} of {rows} cannot be used and {why}"


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A deterministic train/eval split: the same seed and rows give the same split."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(samples) - 1, max(1, round(fraction * len(samples))))
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


# ------------------------------------------------------------------------------- tokenising

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, options: dict[str, Any]) -> None:
    _WORKER["tokenizer"], _WORKER["options"] = tokenizer, options


def _tokenize_chunk(samples: list[Sample]) -> list[Any]:
    return [tokenize_sample(s, _WORKER["tokenizer"], **_WORKER["options"]) for s in samples]


def tokenize_all(samples: list[Sample], tokenizer: Any, options: dict[str, Any], workers: int = 1) -> list[Any]:
    """Tokenise samples in order, in ``workers`` processes when more than one."""
    if workers <= 1 or len(samples) < 2 * _CHUNK:
        return [tokenize_sample(s, tokenizer, **options) for s in samples]
    chunks = [samples[i : i + _CHUNK] for i in range(0, len(samples), _CHUNK)]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer, options)) as pool:
        return [r for chunk in pool.map(_tokenize_chunk, chunks) for r in chunk]


def _sort_results(results: list[Any], report: DataReport) -> tuple[list[TokenizedSample], list[RowProblem]]:
    kept: list[TokenizedSample] = []
    problems: list[RowProblem] = []
    too_long: list[TooLong] = []
    for r in results:
        if isinstance(r, TokenizedSample):
            kept.append(r)
            report.truncated += int(r.truncated)
        elif isinstance(r, Dropped):
            report.dropped += 1
        elif isinstance(r, TooLong):
            too_long.append(r)
        else:
            problems.append(r)
    if too_long:
        raise DataError(
            [problem_issue(p) for p in too_long],
            f"{len(too_long)} sample(s) are longer than data.max_seq_len and data.truncation is 'fail'",
            report,
        )
    return kept, problems


# ------------------------------------------------------------------------------- the whole path


def _settings_key(recipe: Recipe) -> dict[str, Any]:
    return {"data": recipe.data.model_dump(mode="json"), "seed": recipe.training.seed}


def prepare(
    recipe: Recipe,
    bucket: Bucket,
    tokenizer: Any,
    *,
    model_dir: Path | None = None,
    eot: str | None = None,
    cache_dir: Path | None = None,
    scratch: Path | None = None,
    workers: int = 1,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> PreparedData:
    """Prepare the recipe's dataset for training, from the cache when nothing changed.

    ``limits`` bound what reading the tenant's files may cost (bytes per row, inflation, depth).

    Raises:
        DataError: the dataset is missing, no format fits, too many rows are bad, or a sample is
            too long under ``truncation: fail``; each problem located.
    """
    data = recipe.data
    if data.system_prompt and (token := special_token_in(data.system_prompt, tokenizer)):
        issue = Issue(
            "data.system_prompt", f"contains the special token {token!r}, which the tokenizer would read as a "
            "control token", hint="remove it: the chat template adds the model's control tokens itself",
        )  # fmt: skip
        raise RecipeError([issue], "the recipe's system prompt cannot be used")
    path, files = _local_files(bucket, data.path, scratch)
    eval_files: list[tuple[str, Path]] = []
    eval_path = None
    if data.eval.path:
        eval_path, eval_files = _local_files(bucket, data.eval.path, scratch)
    key = digest = ""
    if cache_dir is not None and model_dir is not None:
        digest = files_digest([("train/" + n, p) for n, p in files] + [("eval/" + n, p) for n, p in eval_files])
        key = cache_key(digest, tokenizer_digest(model_dir), _settings_key(recipe))
        cached = load_entry(cache_dir / key)
        if cached is not None:
            splits, report_data = cached
            report = DataReport.from_dict(report_data)
            report.cache_hit, report.dataset_sha256 = True, digest
            return PreparedData(splits.get("train", []), splits.get("eval", []), report)
    prepared = _prepare_uncached(recipe, path, files, eval_path, tokenizer, eot, workers, limits)
    prepared.report.cache_key, prepared.report.dataset_sha256 = key, digest
    if key and cache_dir is not None:
        save_entry(cache_dir / key, {"train": prepared.train, "eval": prepared.eval}, prepared.report.as_dict())
    return prepared


def _prepare_uncached(
    recipe: Recipe,
    path: Path,
    files: list[tuple[str, Path]],
    eval_path: Path | None,
    tokenizer: Any,
    eot: str | None,
    workers: int,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> PreparedData:
    data = recipe.data
    report = DataReport(dataset=data.path, files=[n for n, _ in files], bad_row_policy=_policy_text(data))
    report.truncation, report.max_seq_len, report.packing = data.truncation, data.max_seq_len, data.packing
    report.duplicates_policy = data.duplicates
    samples, problems, duplicates = _read(path, data.path, data, report, limits)
    if eval_path is not None and data.eval.path:
        held, eval_problems, eval_duplicates = _read(eval_path, data.eval.path, data, report, limits)
        train, problems, duplicates = samples, problems + eval_problems, duplicates + eval_duplicates
        report.eval_source = f"file {data.eval.path}"
    else:
        train, held = split(samples, data.eval.fraction, recipe.training.seed)
        report.eval_source = f"{data.eval.fraction:.0%} held out (seed {recipe.training.seed})"
    if report.rows_read == 0:
        raise DataError([Issue("data.path", f"'{data.path}' holds no rows")], "the dataset is empty", report)
    check_rows(data, report, problems, duplicates)
    options = {
        "max_seq_len": data.max_seq_len,
        "truncation": data.truncation,
        "train_on_inputs": data.train_on_inputs,
        "assistant_turns": data.assistant_turns,
        "eot": eot,
    }
    train_tok, train_problems = _sort_results(tokenize_all(train, tokenizer, options, workers), report)
    eval_tok, eval_problems = _sort_results(tokenize_all(held, tokenizer, options, workers), report)
    report.add_problems(train_problems + eval_problems)
    check_rows(data, report, problems + train_problems + eval_problems)
    if not train_tok:
        raise DataError([Issue("data.path", "no sample is left to train on")], "nothing to train on", report)
    report.rows_used = len(train_tok) + len(eval_tok)
    report.train_samples, report.eval_samples = len(train_tok), len(eval_tok)
    lengths = [len(s) for s in train_tok]
    report.tokens_train = sum(lengths)
    report.trained_tokens_train = sum(s.trained_tokens for s in train_tok)
    report.tokens_eval = sum(len(s) for s in eval_tok)
    report.lengths = length_stats(lengths)
    report.histogram = length_histogram(lengths, data.max_seq_len)
    report.sample = render_trained(train_tok[0], tokenizer)
    train_rows: Sequence[Any] = train_tok
    eval_rows: Sequence[Any] = eval_tok
    if data.packing:
        train_rows, eval_rows = pack(train_tok, data.max_seq_len), pack(eval_tok, data.max_seq_len)
        report.packed_rows_train, report.packed_rows_eval = len(train_rows), len(eval_rows)
        report.packing_efficiency = round(packing_efficiency(train_rows, data.max_seq_len), 4)
    return PreparedData(train_rows, eval_rows, report)


def _policy_text(data: DataSection) -> str:
    if data.bad_rows.policy == "fail":
        return "fail on any bad row"
    return f"skip, fail above {data.bad_rows.max_fraction:.1%}"


__all__ = ["DataError", "PackedRow", "PreparedData", "prepare", "read_samples", "split", "tokenize_all"]
