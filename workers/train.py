"""Ray Train's per-worker entry point: one worker's share of a prepared job (the library does the work)."""

from __future__ import annotations

from typing import Any

from finetune.train.ray_launch import train_worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run this worker's share of the job the config (a :class:`finetune.train.spec.JobSpec`) describes."""
    train_worker(config)
