"""A job's history: state changes and the engine's records, as events with gap-free positions.

Every state change is a conditional update (``WHERE state = <from>``) made in the same transaction
as its event, so a change happens once however many processes try it; the engine's records are
ingested by their sequence number, which the database holds unique per job, so a record read twice
is stored once. Positions come from the job row's counter, taken in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from finetune.service.models import FINAL_STATES, Event, Job, utcnow

#: Allowed state changes.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"validating", "cancelled", "failed"}),
    "validating": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled"}),
}
_STAMP = {"validating": "validating_at", "running": "started_at"}


def _take_positions(session: Session, job_id: str, count: int) -> int:
    """Reserve ``count`` positions of the job's history; the first of them."""
    new_next = session.execute(
        update(Job).where(Job.id == job_id).values(next_position=Job.next_position + count).returning(Job.next_position)
    ).scalar_one()
    return int(new_next) - count


def add_events(
    session: Session, job: Job, events: Sequence[tuple[str, dict[str, Any], int | None, datetime | None]]
) -> None:
    """Append events ``(kind, data, engine seq or None, time or None)`` to the job's history."""
    if not events:
        return
    first = _take_positions(session, job.id, len(events))
    for offset, (kind, data, seq, when) in enumerate(events):
        session.add(Event(job_id=job.id, position=first + offset, seq=seq, attempt=job.attempt, kind=kind,
                          time=when or utcnow(), data=data))  # fmt: skip
    session.flush()


def transition(
    session: Session, job: Job, to: str, *, reason: str | None = None, error: dict[str, Any] | None = None,
    changes: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
) -> bool:  # fmt: skip
    """Move ``job`` from the state it was read in to ``to``, with its event; False if another
    process moved it first (nothing is changed then).

    Raises:
        ValueError: ``to`` cannot follow the job's state.
    """
    source = job.state
    if to not in TRANSITIONS.get(source, frozenset()):
        raise ValueError(f"a {source} job cannot become {to}")
    now = utcnow()
    values: dict[str, Any] = {"state": to, "updated_at": now, **(changes or {})}
    if to in _STAMP:
        values[_STAMP[to]] = now
    if to in FINAL_STATES:
        values["finished_at"] = now
        values["reason"] = reason
    if error is not None:
        values["error"] = error
    done = session.execute(update(Job).where(Job.id == job.id, Job.state == source).values(**values))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        session.expire(job)
        return False
    session.refresh(job)
    data: dict[str, Any] = {"state": to, "from": source}
    if reason:
        data["reason"] = reason
    if error is not None:
        data["error"] = error
    data.update(detail or {})
    add_events(session, job, [("state", data, None, now)])
    return True


def ingested_seqs(session: Session, job_id: str, seqs: Sequence[int]) -> set[int]:
    """Which of these engine sequence numbers the job's history holds already."""
    if not seqs:
        return set()
    rows = session.scalars(select(Event.seq).where(Event.job_id == job_id, Event.seq.in_(list(seqs))))
    return {int(s) for s in rows if s is not None}


def event_count(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Event).where(Event.job_id == job_id)) or 0)
