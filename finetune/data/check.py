"""A dataset file checked on its own, before any recipe uses it: its format and every bad row.

The job service checks each file a tenant uploads or registers: rows are read within the data
limits, the format is detected from the first rows (or taken as given), and every row is turned
into a sample, so that each problem comes back located (file, line, field) before a job is made.
Tokenisation needs a model and waits for the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.formats import DETECT_ROWS, DataFormatError, detect_format, to_sample
from finetune.data.limits import DEFAULT_DATA_LIMITS, DataLimits
from finetune.data.readers import DataReadError, read_rows
from finetune.data.types import Row, RowProblem
from finetune.errors import Issue
from finetune.recipe import DataFormat, FieldMapping

#: Located problems kept in a check (the count of the rest is kept too).
MAX_ISSUES = 200


@dataclass
class DatasetCheck:
    format: str | None
    rows: int  # usable rows
    bad_rows: int
    explanation: str = ""
    issues: list[Issue] = field(default_factory=list)
    more_issues: int = 0

    @property
    def ok(self) -> bool:
        return self.format is not None and self.rows > 0 and not self.issues

    def summary(self) -> dict[str, Any]:
        return {"format": self.format, "rows": self.rows, "bad_rows": self.bad_rows,
                "explanation": self.explanation, "more_issues": self.more_issues}  # fmt: skip


def problem_issue(problem: RowProblem) -> Issue:
    """A row problem as a located issue: ``file`` and ``line`` split from its ``where``."""
    file, _, line = problem.where.rpartition(":")
    if file and line.isdigit():
        return Issue(problem.field or "", problem.reason, file=file, line=int(line))
    return Issue(problem.field or "", problem.reason, file=problem.where)


def check_dataset(
    path: Path,
    name: str,
    *,
    fmt: DataFormat = "auto",
    fields: FieldMapping | None = None,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> DatasetCheck:
    """Read every row of ``path`` (shown as ``name``) and report its format and problems.

    Never raises for the data's sake: an unreadable file, no rows or no fitting format is an issue.
    """
    fields = fields or FieldMapping()
    issues: list[Issue] = []
    more = 0

    def note(issue: Issue) -> None:
        nonlocal more
        if len(issues) < MAX_ISSUES:
            issues.append(issue)
        else:
            more += 1

    try:
        explanation = ""
        if fmt == "auto":  # a first pass reads only the rows detection looks at
            head: list[Row] = []
            for item in read_rows(path, name, limits=limits):
                if isinstance(item, Row):
                    head.append(item)
                    if len(head) >= DETECT_ROWS:
                        break
            if head:
                try:
                    fmt, explanation = detect_format(head, fields)
                except DataFormatError as exc:
                    return DatasetCheck(None, 0, 0, issues=list(exc.issues))
        rows = bad = 0
        for item in read_rows(path, name, limits=limits):  # then every row, one at a time
            checked = to_sample(item, fmt, fields, None) if isinstance(item, Row) and fmt != "auto" else item
            if isinstance(checked, RowProblem):
                bad += 1
                note(problem_issue(checked))
            else:
                rows += 1
    except DataReadError as exc:
        return DatasetCheck(None, 0, 0, issues=[Issue("", str(exc), file=name)])
    if rows == 0 or fmt == "auto":
        hint = "upload a .jsonl, .json, .csv or .parquet file with rows"
        note(Issue("", "the file holds no rows", file=name, hint=hint))
        return DatasetCheck(None, 0, bad, issues=issues, more_issues=more)
    return DatasetCheck(fmt, rows, bad, explanation, issues, more)
