"""Typed errors shared by the whole engine.

Every problem a tenant can cause is reported as an :class:`Issue`: where it is (file, line,
field path) and what to do about it. Functions collect issues and raise one error holding
all of them, so a tenant fixes everything in one pass instead of one error at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: Whose move it is after a failure: the tenant's (fix the data or the recipe), nobody's (a
#: transient failure: retrying may succeed), or the platform's (a bug or a missing platform asset).
Fault = Literal["tenant", "transient", "platform"]


@dataclass(frozen=True)
class Issue:
    """One located problem.

    Attributes:
        path: Dotted field path (``training.learning_rate``) or ``""`` for the whole document.
        message: What is wrong, in words a tenant understands.
        file: The file the problem was found in, when there is one.
        line: 1-based line in ``file``, when it can be known.
        hint: What to do about it, when there is something useful to say.
    """

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    hint: str | None = None

    def location(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.path:
            parts.append(self.path)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.location()
        text = f"{where}: {self.message}" if where else self.message
        return f"{text} (hint: {self.hint})" if self.hint else text

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


class FinetuneError(Exception):
    """Base class of every error the engine raises on purpose."""

    fault: Fault = "platform"


class IssuesError(FinetuneError):
    """An error carrying every located issue that was found, not just the first."""

    fault: Fault = "tenant"

    def __init__(self, issues: Iterable[Issue], summary: str | None = None) -> None:
        self.issues = list(issues)
        head = summary or f"{len(self.issues)} problem(s) found"
        super().__init__("\n".join([head, *(f"  {i}" for i in self.issues)]))


class RecipeError(IssuesError):
    """The recipe is not valid: bad YAML, unknown keys, values out of range, denied model..."""


class RegistryError(IssuesError):
    """The model registry file (or its lock file) is malformed or inconsistent."""


class ModelStoreError(FinetuneError):
    """A model is missing from the offline store, or its files do not match the pinned digests."""


class ModelCheckError(IssuesError):
    """A model folder was refused: pickle weights, custom code, a denied checkpoint..."""


def fault_of(exc: BaseException) -> Fault:
    """Whose move it is after ``exc``: the engine's own errors say; lost connections, lost workers
    and I/O failures are transient; anything else is the platform's."""
    if isinstance(exc, FinetuneError):
        return exc.fault
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return "transient"
    module = type(exc).__module__
    if module.split(".")[0] == "ray" or module.startswith("torch.distributed"):  # a lost worker or node
        return "transient"
    if isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _LOST_PEER):
        return "transient"  # a collective whose peer died (gloo and NCCL raise plain RuntimeErrors)
    return "platform"


#: What the communication backends say when a peer process died in the middle of a collective.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
