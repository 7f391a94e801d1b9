"""Where training metrics go: a small sink interface, a ``metrics.jsonl`` writer, a progress bar.

The job service subscribes to the same interface later; a sink receives plain dicts (one per
optimizer step, evaluation or event) and must not raise into the training loop.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed at every record."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._fh = open(path, "a", encoding="utf-8")
        if torn:  # a process killed mid-line (SIGKILL): start on a fresh line
            self._fh.write("\n")

    def emit(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({"time": round(time.time(), 3), **record}, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ProgressSink:
    """One line per logged step on a terminal: step, loss, learning rate, tokens per second."""

    def __init__(self, total_steps: int, stream: TextIO | None = None, every: int = 1) -> None:
        self.total, self.every = total_steps, max(1, every)
        self.stream = stream or sys.stderr

    def emit(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "train" and (record["step"] % self.every == 0 or record["step"] == self.total):
            width = len(str(self.total))
            self.stream.write(
                f"step {record['step']:>{width}}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s\n"
            )
        elif kind == "eval":
            self.stream.write(
                f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}\n"
            )
        elif kind == "event":
            self.stream.write(f"{record['event']}: {record.get('detail', '')}\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class Fanout:
    """Sends each record to several sinks; a failing sink is logged, never fatal."""

    def __init__(self, sinks: Iterable[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def emit(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception:  # a sink must not stop training
                logger.exception("metrics sink %r failed", sink)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a killed process
            logger.warning("skipping a torn line in %s", path)
    return records
