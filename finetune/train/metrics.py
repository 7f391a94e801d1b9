"""Where a job's events go while it trains: a small sink interface, a progress printer, a fan-out.

The job's record is the event log in its bucket (:class:`finetune.events.EventLog`, which is a
sink); a terminal run adds :class:`ProgressSink`. A sink must not raise into the training loop.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Protocol, TextIO

from finetune.events import Event

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def emit(self, event: Event) -> object: ...

    def close(self) -> None: ...


class ProgressSink:
    """One line per logged step on a terminal: step, loss, learning rate, tokens per second."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, every: int = 1) -> None:
        self.total, self.every = total_steps, max(1, every)
        self.stream = stream or sys.stderr

    def emit(self, event: Event) -> None:
        if event.kind == "step":
            if event.step % self.every == 0 or event.step == self.total:
                width = len(str(self.total))
                self.stream.write(
                    f"step {event.step:>{width}}/{self.total}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                    f"grad {event.grad_norm:.3f}  {event.tokens_per_s:,.0f} tok/s\n"
                )
        elif event.kind == "eval":
            self.stream.write(f"eval at step {event.step}: loss {event.eval_loss:.4f}  ppl {event.eval_ppl:.2f}\n")
        elif event.kind in ("start", "resume"):
            self.stream.write(f"{event.kind}: {event.detail}\n")
        elif event.kind == "checkpoint":
            self.stream.write(f"checkpoint {event.name} committed ({event.files} files, {event.seconds:.1f} s)\n")
        elif event.kind == "preempted":
            self.stream.write(f"preempted at step {event.step} ({event.reason}): {event.detail}\n")
        elif event.kind == "failure":
            self.stream.write(f"failed at step {event.step}: {event.error.message}\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class Fanout:
    """Sends each event to several sinks; a failing sink is logged, never fatal."""

    def __init__(self, sinks: Iterable[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:  # a sink must not stop training
                logger.exception("metrics sink %r failed", sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("metrics sink %r failed to close", sink)
