"""One watcher per process for every open event stream.

Each stream used to ask the database for news four times a second; with many streams open that is
most of what a process does (benchmarks/service_load.py). Now a stream with nothing to send waits
here, and one task asks, once per interval, where the watched jobs' histories stand (one query for
all of them), waking only the streams whose job moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from finetune.service.models import FINAL_STATES, Job
from finetune.service.scope import Service

_FEEDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, EventFeed]] = weakref.WeakKeyDictionary()


class EventFeed:
    def __init__(self, svc: Service, interval: float) -> None:
        self.svc, self.interval = svc, interval
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.known: dict[str, tuple[int, str]] = {}  # job -> (next position, state)
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, svc: Service) -> EventFeed:
        """The feed of ``svc`` in the running event loop."""
        feeds = _FEEDS.setdefault(asyncio.get_running_loop(), {})
        found = feeds.get(id(svc))
        if found is None or found.svc is not svc:
            found = feeds[id(svc)] = cls(svc, svc.settings.sse_poll_seconds)
        return found

    async def wait(self, job_id: str, after: int, timeout: float) -> None:
        """Return once the job has an event after position ``after`` or is over, or after ``timeout``."""
        known = self.known.get(job_id)
        if known is not None and (known[0] - 1 > after or known[1] in FINAL_STATES):
            return
        event = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(event)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._watch())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiting = self.waiters.get(job_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self.waiters[job_id]

    async def _watch(self) -> None:
        while self.waiters:
            ids = list(self.waiters)
            try:
                rows = await run_in_threadpool(self._positions, ids)
            except Exception:  # noqa: BLE001 - a failed look is retried; streams time out meanwhile
                rows = []
            for job_id, position, state in rows:
                if self.known.get(job_id) != (position, state):
                    self.known[job_id] = (position, state)
                    for event in self.waiters.get(job_id, ()):
                        event.set()
            for job_id in [j for j in self.known if j not in self.waiters]:
                del self.known[job_id]
            await asyncio.sleep(self.interval)

    def _positions(self, ids: Sequence[str]) -> list[Any]:
        with self.svc.db() as session:
            return list(session.execute(select(Job.id, Job.next_position, Job.state).where(Job.id.in_(ids))).all())
