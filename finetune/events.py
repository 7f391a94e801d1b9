"""A training job's event log: typed records in its bucket, for the job service to ingest.

Rank 0 records what happens (start, steps, evaluations, checkpoints, preemption, the end or a
failure) as typed events. Object stores have no append, so the log is a folder of immutable
segments, ``<prefix>/events/<first seq>-<last seq>.jsonl``, each written once and atomically.
Every event carries a per-job ``seq`` so the service can ingest incrementally and idempotently
by (job, seq), skipping segments it has seen by their name alone. A job restarted after a crash
or a preemption continues the numbering after the largest published seq.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from finetune.storage import Bucket

__all__ = [
    "IMMEDIATE_KINDS",
    "MAX_LINE_BYTES",
    "CheckpointEvent",
    "EndEvent",
    "ErrorInfo",
    "EvalEvent",
    "Event",
    "EventLog",
    "FailureEvent",
    "JobSummary",
    "PreemptedEvent",
    "ResumeEvent",
    "StartEvent",
    "StepEvent",
    "event_adapter",
    "events_jsonl",
    "latest_by_step",
    "parse_event",
    "parse_jsonl",
    "read_events",
    "to_jsonl",
]

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1_000_000
"""Longest line the reader accepts and the writer produces."""

IMMEDIATE_KINDS = frozenset({"start", "resume", "checkpoint", "preempted", "end", "failure"})
"""Kinds published at once: the service should see them without waiting for the next flush."""

_SEGMENT = re.compile(r"^(\d{12})-(\d{12})\.jsonl$")


# ----------------------------------------------------------------------------------- the records
class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    seq: int = 0
    time: float = 0.0
    step: int


class _StartFields(_EventBase):
    detail: str
    hardware: dict[str, Any]
    zero_stage: int
    parameters: dict[str, int]  # {"total", "trained"}
    total_steps: int


class StartEvent(_StartFields):
    """The job started from scratch."""

    kind: Literal["start"] = "start"


class ResumeEvent(_StartFields):
    """The job started again from a checkpoint."""

    kind: Literal["resume"] = "resume"
    checkpoint: str
    refused: list[str] = []  # checkpoints passed over, each "NAME: why"


class StepEvent(_EventBase):
    """One optimizer step done; ``grad_norm`` may be NaN."""

    kind: Literal["step"] = "step"
    epoch: float
    lr: float
    loss: float
    trained_tokens: int
    tokens: int
    grad_norm: float
    step_time: float
    tokens_per_s: float
    peak_memory: int


class EvalEvent(_EventBase):
    """An evaluation on the held-out rows."""

    kind: Literal["eval"] = "eval"
    eval_loss: float
    eval_ppl: float
    eval_tokens: int


class CheckpointEvent(_EventBase):
    """A checkpoint was committed."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str
    files: int
    bytes: int
    seconds: float


class PreemptedEvent(_EventBase):
    """Training stopped early on request ("signal", "stop requested"), after saving a checkpoint."""

    kind: Literal["preempted"] = "preempted"
    reason: str
    detail: str = ""


class JobSummary(BaseModel):
    """How a job ended."""

    model_config = ConfigDict(extra="forbid")

    steps: int
    preempted: bool
    stopped_early: bool
    final: str | None  # bucket-relative path of the final model
    zero_stage: int
    eval: dict[str, float] = {}


class EndEvent(_EventBase):
    """The job finished (or stopped early) without an error."""

    kind: Literal["end"] = "end"
    summary: JobSummary


class ErrorInfo(BaseModel):
    """What went wrong, and whose problem it is to fix."""

    model_config = ConfigDict(extra="forbid")

    type: str
    message: str
    fault: Literal["tenant", "transient", "platform"]
    hint: str | None = None
    issues: list[dict[str, Any]] = []  # located problems ({file, line, path, message, hint}), as the engine found them


class FailureEvent(_EventBase):
    """The job failed."""

    kind: Literal["failure"] = "failure"
    error: ErrorInfo


Event = Annotated[
    StartEvent | ResumeEvent | StepEvent | EvalEvent | CheckpointEvent | PreemptedEvent | EndEvent | FailureEvent,
    Field(discriminator="kind"),
]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


# ----------------------------------------------------------------------------------- JSON lines
def _line(event: Event) -> bytes:
    # python's json writes NaN (grad_norm can be nan), which pydantic's JSON serialiser will not
    record = event.model_dump(mode="json")
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode() + b"\n"


def parse_event(line_or_dict: str | bytes | Mapping[str, Any]) -> Event:
    """One event from a JSON line or an already decoded record.

    Args:
        line_or_dict: a JSON object as text (``NaN`` allowed) or a mapping.

    Returns:
        The event, typed by its ``kind``.

    Raises:
        ValueError: the text is not JSON, or the record is not a valid event
            (pydantic's ``ValidationError`` is a ``ValueError``).
    """
    record = json.loads(line_or_dict) if isinstance(line_or_dict, str | bytes) else line_or_dict
    return event_adapter.validate_python(record)


def to_jsonl(events: Iterable[Event]) -> bytes:
    """Events as ``metrics.jsonl``: one compact JSON object per line, keys in field order.

    Args:
        events: the events, written in the order given.

    Returns:
        UTF-8 bytes, each line ending in a newline; empty for no events.
    """
    return b"".join(_line(event) for event in events)


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in errors[:3]]
        return "; ".join(parts) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    return str(exc)


def parse_jsonl(data: bytes | str, *, source: str) -> list[Event]:
    """The events of a ``metrics.jsonl`` text; bad lines are skipped, never fatal.

    A line that is not JSON, not a valid event, not UTF-8 or longer than :data:`MAX_LINE_BYTES`
    is skipped with a warning naming ``source`` and the line number. Blank lines are ignored.

    Args:
        data: the text.
        source: where it came from, for the warnings (a file or object name).

    Returns:
        The valid events, in the order of their lines.
    """
    raw = data.encode() if isinstance(data, str) else data
    events: list[Event] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            logger.warning("%s:%d: skipped a line of %d bytes (at most %d)", source, number, len(line), MAX_LINE_BYTES)
            continue
        try:
            events.append(parse_event(line.decode("utf-8")))
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and validation errors are ValueErrors
            logger.warning("%s:%d: skipped a line that is not a valid event: %s", source, number, _why(exc))
    return events


# ----------------------------------------------------------------------------------- segments
def _events_folder(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/events" if prefix else "events"


def _segments(bucket: Bucket, prefix: str) -> list[tuple[int, int, str]]:
    """(first seq, last seq, bucket-relative name) of each segment, in seq order."""
    found = []
    for name in bucket.list(_events_folder(prefix)):
        match = _SEGMENT.match(name.rsplit("/", 1)[-1])
        if match and int(match[1]) <= int(match[2]):
            found.append((int(match[1]), int(match[2]), name))
    return sorted(found)


class EventLog:
    """Rank 0's writer: stamps each event with ``seq`` and ``time`` and publishes them in segments.

    Events are buffered and published as one new object per flush, at most every
    ``flush_seconds`` for steps and evaluations and at once for the kinds in
    :data:`IMMEDIATE_KINDS`. A failed publication is logged, not raised, and the events stay
    buffered for the next flush: recording must never stop training. If a write that reported
    an error did land, the retry's segment overlaps it and readers keep the first copy of a seq.
    """

    def __init__(
        self, bucket: Bucket, prefix: str, *, flush_seconds: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        """Open the log under ``prefix``, continuing after the largest seq already published.

        Args:
            bucket: the tenant's bucket.
            prefix: the job's folder in the bucket; ``""`` when the bucket root is the job folder.
            flush_seconds: the longest time a step or evaluation waits in the buffer.
            clock: unix seconds; replaced in tests.

        Raises:
            StorageError: the existing segments cannot be listed, or ``prefix`` leaves the bucket.
        """
        self.bucket, self.prefix = bucket, prefix
        self.flush_seconds, self.clock = flush_seconds, clock
        self._folder = _events_folder(prefix)
        bucket.full(self._folder)  # refuse a prefix outside the bucket now, not at the first flush
        self._seq = max((last for _, last, _ in _segments(bucket, prefix)), default=0)
        self._buffer: list[tuple[int, bytes]] = []
        self._last_flush = clock()

    @property
    def pending(self) -> int:
        """How many events wait in the buffer."""
        return len(self._buffer)

    def emit(self, event: Event) -> Event:
        """Record one event: stamp it, buffer it, and publish if due.

        Args:
            event: the event; its ``seq`` and ``time`` are ignored and it is not changed.

        Returns:
            A copy with ``seq`` and ``time`` filled in.

        Raises:
            ValueError: the event cannot be written as JSON, or its line is longer than
                :data:`MAX_LINE_BYTES`; nothing is recorded and no seq is used. Storage errors
                are never raised here.
        """
        stamped = event.model_copy(update={"seq": self._seq + 1, "time": round(self.clock(), 3)})
        try:
            line = _line(stamped)
        except Exception as exc:  # a value in hardware that JSON cannot hold: the caller's bug
            raise ValueError(f"{event.kind} event at step {event.step} cannot be written as JSON: {exc}") from exc
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"{event.kind} event at step {event.step} is {len(line)} bytes (at most {MAX_LINE_BYTES})")
        self._seq += 1
        self._buffer.append((stamped.seq, line))
        if stamped.kind in IMMEDIATE_KINDS or self.clock() - self._last_flush >= self.flush_seconds:
            self.flush()
        return stamped

    def flush(self, *, raise_errors: bool = False) -> bool:
        """Publish every buffered event as one new segment.

        The time of the attempt counts as the last flush even when it fails, so a storage outage
        costs one attempt per ``flush_seconds`` rather than one per step.

        Args:
            raise_errors: raise a storage error instead of logging it.

        Returns:
            True when nothing is left unpublished (an empty buffer is a success), False when the
            write failed and the events stay buffered.

        Raises:
            Exception: whatever the bucket raised, only with ``raise_errors``.
        """
        self._last_flush = self.clock()
        if not self._buffer:
            return True
        first, last = self._buffer[0][0], self._buffer[-1][0]
        name = f"{self._folder}/{first:012d}-{last:012d}.jsonl"
        try:
            self.bucket.write_bytes(name, b"".join(line for _, line in self._buffer))
        except Exception:
            if raise_errors:
                raise
            logger.exception("could not publish events %d-%d to %s; kept for the next flush", first, last, name)
            return False
        self._buffer.clear()
        return True

    def close(self) -> None:
        """Publish what is buffered; a failure is logged, as in :meth:`flush`."""
        self.flush()


# ----------------------------------------------------------------------------------- reading
def read_events(bucket: Bucket, prefix: str, *, after: int = 0) -> list[Event]:
    """The job's events with ``seq`` greater than ``after``, each seq once, in seq order.

    Segments that end at or before ``after`` are not read; names that are not segments are
    ignored. Where segments overlap the first segment (by its first seq) wins, and an event
    outside its segment's range is skipped with a warning, since readers trust the names.

    Args:
        bucket: the tenant's bucket.
        prefix: the job's folder in the bucket (``""`` for the bucket root).
        after: the largest seq already ingested.

    Returns:
        The events, seq strictly increasing.

    Raises:
        StorageError, OSError: a segment could not be listed or read.
    """
    found: dict[int, Event] = {}
    for first, last, name in _segments(bucket, prefix):
        if last <= after:
            continue
        for event in parse_jsonl(bucket.read_bytes(name), source=name):
            if not first <= event.seq <= last:
                logger.warning("%s: skipped seq %d, outside the segment's range", name, event.seq)
            elif event.seq > after:
                found.setdefault(event.seq, event)
    return [found[seq] for seq in sorted(found)]


def events_jsonl(bucket: Bucket, prefix: str) -> bytes:
    """The job's whole log as ``metrics.jsonl`` (see :func:`to_jsonl`)."""
    return to_jsonl(read_events(bucket, prefix))


@overload
def latest_by_step(events: Iterable[Event], kind: Literal["step"]) -> list[StepEvent]: ...
@overload
def latest_by_step(events: Iterable[Event], kind: Literal["eval"]) -> list[EvalEvent]: ...
def latest_by_step(events: Iterable[Event], kind: Literal["step", "eval"]) -> list[StepEvent] | list[EvalEvent]:
    """The last ``kind`` event recorded for each step, sorted by step.

    A resumed job runs again the steps after its checkpoint; the later record (by seq) wins.

    Args:
        events: the events, for example from :func:`read_events`.
        kind: ``"step"`` or ``"eval"``.

    Returns:
        One event per step.
    """
    latest: dict[int, Any] = {}
    for event in sorted((e for e in events if e.kind == kind), key=lambda e: e.seq):
        latest[event.step] = event
    return [latest[step] for step in sorted(latest)]
