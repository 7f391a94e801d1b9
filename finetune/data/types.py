"""The records that flow through the data pipeline.

Readers yield :class:`Row` objects (a raw record and where it came from) or :class:`RowProblem`
objects; formats turn rows into :class:`Sample` objects; tokenisation turns samples into
:class:`TokenizedSample` objects; packing turns those into :class:`PackedRow` objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
SampleKind = Literal["chat", "text", "preference"]

#: Label of a token that is not trained (PyTorch's cross-entropy ignore index).
IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class Row:
    """One raw record as read from a file.

    Attributes:
        where: ``"train.jsonl:17"``: file name (relative to the bucket) and 1-based line, or
            ``"train.parquet:row 17"`` for formats without lines.
        record: The record as a mapping of column name to value.
    """

    where: str
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that cannot be used, and why. ``str()`` gives ``file:line: field: reason``."""

    where: str
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}" if self.field else f"{self.where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``weight`` 0 or 1 overrides whether an assistant message is trained."""

    role: Role
    content: str
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """A usable row, normalised whatever its file format.

    ``chat``: ``messages`` (system prompt included when there is one).
    ``text``: ``text`` (continued pre-training: every token is trained).
    ``preference``: ``messages`` hold the prompt turns, ``chosen`` and ``rejected`` the answers.
    """

    where: str
    kind: SampleKind
    messages: tuple[Message, ...] = ()
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None


@dataclass(slots=True)
class TokenizedSample:
    """Token ids and labels of one sample; ``labels[i]`` is ``IGNORE_INDEX`` where not trained."""

    where: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(slots=True)
class PackedRow:
    """Several documents in one training row of at most ``max_seq_len`` tokens.

    ``position_ids`` restart at 0 at each document; ``doc_lengths`` lists the documents'
    lengths in order, so attention can be kept inside each document (no cross-document
    attention), and ``cu_seqlens`` can be derived for variable-length attention kernels.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    doc_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)
