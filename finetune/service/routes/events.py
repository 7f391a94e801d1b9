"""A job's history: as pages of JSON with a cursor, as a server-sent-events stream that resumes
from ``Last-Event-ID``, and its metrics (loss, evaluation loss, tokens/s per GPU by step)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from finetune.service.errors import ApiError
from finetune.service.feed import EventFeed
from finetune.service.models import FINAL_STATES, Event, Job
from finetune.service.schemas import EventOut, EventPage, MetricPoint, MetricsOut
from finetune.service.scope import Service, Tenancy

router = APIRouter(prefix="/v1/jobs", tags=["events"])

MAX_POSITION = 2**31 - 1  # positions are 32-bit integers in the database: a larger cursor cannot be compared
AfterPosition = Annotated[int, Query(ge=0, le=MAX_POSITION, description="The last position seen; 0 for the beginning.")]
KEEPALIVE_SECONDS = 15.0
BATCH = 500


def event_out(row: Event) -> EventOut:
    return EventOut(
        position=row.position, seq=row.seq, kind=row.kind, time=row.time, attempt=row.attempt, data=row.data
    )


def _sse(rows: list[Event]) -> bytes:
    """Events as server-sent events, one chunk (one socket write for a batch)."""
    parts = []
    for row in rows:
        data = json.dumps(event_out(row).model_dump(mode="json"), ensure_ascii=False, allow_nan=False)
        parts.append(f"id: {row.position}\nevent: {row.kind}\ndata: {data}\n\n")
    return "".join(parts).encode()


def _news(svc: Service, job_id: str, after: int, limit: int) -> tuple[bytes, int, int, bool]:
    """The events after ``after`` as one chunk, the last position, how many, and whether the job is
    over with nothing more to send. Runs in a worker thread: the event loop only writes bytes."""

    def since(session: Session) -> list[Event]:
        query = select(Event).where(Event.job_id == job_id, Event.position > after).order_by(Event.position)
        return list(session.scalars(query.limit(limit)).all())

    with svc.db() as session:
        rows = since(session)
        over = False
        if not rows and session.scalar(select(Job.state).where(Job.id == job_id)) in FINAL_STATES:
            rows = since(session)  # the final event commits with the state: read again to miss nothing
            over = not rows
        return _sse(rows), (rows[-1].position if rows else after), len(rows), over


@router.get("/{job_id}/events", response_model=EventPage, summary="The job's events, oldest first, from a cursor")
def list_events(scope: Tenancy, job_id: str, after: AfterPosition = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventPage:  # fmt: skip
    job = scope.job(job_id)
    rows = scope.session.scalars(
        select(Event).where(Event.job_id == job.id, Event.position > after).order_by(Event.position).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    out = [event_out(r) for r in rows[:limit]]
    return EventPage(data=out, has_more=more, next_after=out[-1].position if out else after)


def _start(last_event_id: str | None, after: int) -> int:
    if last_event_id is None or not last_event_id.strip():
        return after
    try:
        value = int(last_event_id.strip())
    except ValueError:
        raise ApiError(422, "Last-Event-ID is the position of the last event received", param="Last-Event-ID") from None
    if not 0 <= value <= MAX_POSITION:
        raise ApiError(422, f"Last-Event-ID is a position from 0 to {MAX_POSITION}", param="Last-Event-ID")
    return value


@router.get("/{job_id}/events/stream", summary="The job's events as server-sent events, live",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})  # fmt: skip
def stream_events(scope: Tenancy, job_id: str, request: Request, after: AfterPosition = 0,
                  last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
                  ) -> StreamingResponse:  # fmt: skip
    """Each event is sent as ``id: <position>``, ``event: <kind>``, ``data: <the event as JSON>``; the
    stream ends after the job's final event. Reconnect with ``Last-Event-ID`` to go on without a gap."""
    job = scope.job(job_id)
    svc, ident, cursor = scope.svc, job.id, _start(last_event_id, after)
    scope.session.close()  # a stream may last hours: it holds no connection, each look takes one briefly

    async def body() -> AsyncIterator[bytes]:
        nonlocal cursor
        feed, loop = EventFeed.of(svc), asyncio.get_running_loop()
        quiet = 0.0
        yield b"retry: 2000\n\n"
        while True:
            chunk, cursor, count, over = await run_in_threadpool(_news, svc, ident, cursor, BATCH)
            if count:
                yield chunk
                quiet = 0.0
                if count == BATCH:
                    continue
            if over or await request.is_disconnected():
                return
            started = loop.time()
            await feed.wait(ident, cursor, KEEPALIVE_SECONDS - quiet)
            quiet += loop.time() - started
            if quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield b": keep-alive\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


@router.get(
    "/{job_id}/metrics", response_model=MetricsOut, summary="Loss, evaluation loss and tokens/s per GPU by step"
)
def get_metrics(scope: Tenancy, job_id: str) -> MetricsOut:
    job = scope.job(job_id)
    rows = scope.session.scalars(
        select(Event).where(Event.job_id == job.id, Event.kind.in_(("step", "eval"))).order_by(Event.position)
    ).all()
    by_step: dict[int, MetricPoint] = {}
    for row in rows:
        data = row.data
        step = int(data.get("step", 0))
        point = by_step.setdefault(step, MetricPoint(step=step, time=row.time))
        if row.kind == "step":  # a resumed attempt repeats no step; the newest record of a step wins
            point.loss = _num(data.get("loss"))
            point.lr = _num(data.get("lr"))
            tps = _num(data.get("tokens_per_s"))
            point.tokens_per_s_per_gpu = None if tps is None else tps / max(1, int(data.get("world_size") or job.gpus))
            point.time = row.time
        else:
            point.eval_loss = _num(data.get("eval_loss"))
    return MetricsOut(job_id=job.id, points=[by_step[s] for s in sorted(by_step)])


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None
