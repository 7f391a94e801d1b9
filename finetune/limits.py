"""Bounds on untrusted input: recipes come from tenants and are read as hostile.

Each limit is far above what an honest recipe needs and far below what would cost the platform
memory or time. A document over a limit is refused with a located issue whose hint names the
limit, never with a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from finetune.errors import Issue


@dataclass(frozen=True)
class Limits:
    """Limits on one tenant document (a recipe file, or the body of an API request)."""

    #: A recipe is a few kB; 1 MiB leaves room for long prompt texts. Read no further than this.
    max_file_bytes: int = 1024 * 1024
    #: Recipes nest 3 or 4 levels; 64 stops "[[[[..." before any recursive code sees it.
    max_depth: int = 64
    #: References such as ``*defaults``; a "billion laughs" file needs a few dozen of them.
    max_aliases: int = 100
    #: Values in the document, each alias counted as the values it expands to.
    max_nodes: int = 100_000
    #: Digits of one integer: a 64-bit seed has 20. Python refuses to read 4,301 or more.
    max_int_digits: int = 30
    #: Problems listed per document; the rest are counted in one line.
    max_issues: int = 50


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class MoreProblems(Issue):
    """The line standing for the problems beyond :attr:`Limits.max_issues`.

    Attributes:
        more: How many problems were left out.
    """

    more: int = 0

    def as_dict(self) -> dict[str, object]:
        return {**super().as_dict(), "more": self.more}


def more_problems(more: int, file: str | None = None) -> MoreProblems:
    """The one line standing for ``more`` problems that are not listed."""
    return MoreProblems("", f"... and {more} more problems", file=file, more=more)


#: Characters of an issue's path, and of its message or hint, shown: a key can be a megabyte long.
_PATH_CHARS, _TEXT_CHARS = 200, 400


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _clipped(issue: Issue) -> Issue:
    hint = _clip(issue.hint, _TEXT_CHARS) if issue.hint else issue.hint
    return replace(issue, path=_clip(issue.path, _PATH_CHARS), message=_clip(issue.message, _TEXT_CHARS), hint=hint)


def cap_issues(issues: list[Issue], limits: Limits = DEFAULT_LIMITS) -> list[Issue]:
    """The first ``limits.max_issues`` issues, each clipped to a few hundred characters, then one
    :class:`MoreProblems` counting the rest. Capping a capped list changes nothing."""
    listed = [i for i in issues if not isinstance(i, MoreProblems)]
    more = sum(i.more for i in issues if isinstance(i, MoreProblems)) + max(0, len(listed) - limits.max_issues)
    shown = [_clipped(i) for i in listed[: limits.max_issues]]
    return [*shown, more_problems(more, issues[0].file)] if more else shown
