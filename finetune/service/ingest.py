"""The engine's records, from the job's folder in the tenant's bucket into the database.

Records are read after the newest sequence number the job holds and stored with it in one
transaction, together with what they tell about the job (its step, loss, throughput, checkpoints,
and its start, which makes a validating job running). The database's unique (job, seq) makes a
record read twice impossible to store twice, whichever process reads it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from finetune.events import Event, read_events
from finetune.service.history import add_events, transition
from finetune.service.models import Checkpoint, Job, utcnow
from finetune.storage import Bucket

JOBS = "jobs"
MAX_BATCH = 2000  # records stored per transaction


def job_prefix(job_id: str) -> str:
    return f"{JOBS}/{job_id}"


def _clean(value: Any) -> Any:
    """JSON the databases accept: NaN and infinities (a diverged loss) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def event_data(event: Event) -> dict[str, Any]:
    data = event.model_dump(mode="python", exclude={"kind", "seq", "time"})
    return dict(_clean(data))


def _apply(session: Session, job: Job, event: Event, data: dict[str, Any]) -> None:
    """What one record tells about the job."""
    kind = event.kind
    if kind in ("start", "resume"):
        job.total_steps = data.get("total_steps")
        job.step = int(data.get("step") or 0)
    elif kind == "step":
        job.step = event.step
        job.loss = data.get("loss")
        tps = data.get("tokens_per_s")
        job.tokens_per_s_per_gpu = None if tps is None else float(tps) / max(1, job.gpus)
    elif kind == "eval":
        job.eval_loss = data.get("eval_loss")
    elif kind == "checkpoint":
        found = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == event.step))
        if found is None:
            session.add(Checkpoint(job_id=job.id, step=event.step, name=str(data.get("name", "")),
                                   files=int(data.get("files") or 0), bytes=int(data.get("bytes") or 0),
                                   created_at=_when(event)))  # fmt: skip


def _when(event: Event) -> datetime:
    return datetime.fromtimestamp(event.time, UTC) if event.time else utcnow()


def ingest(session: Session, job: Job, bucket: Bucket) -> list[Event]:
    """Store the job's new records (committing each batch); the records stored."""
    events = read_events(bucket, job_prefix(job.id), after=job.last_seq)
    stored: list[Event] = []
    for start in range(0, len(events), MAX_BATCH):
        batch = events[start : start + MAX_BATCH]
        rows = []
        for event in batch:
            data = event_data(event)
            _apply(session, job, event, data)
            rows.append((event.kind, data, event.seq, _when(event)))
        job.last_seq = batch[-1].seq
        job.updated_at = utcnow()
        add_events(session, job, rows)
        if job.state == "validating" and any(e.kind in ("start", "resume") for e in batch):
            transition(session, job, "running")
        session.commit()
        stored.extend(batch)
    return stored
