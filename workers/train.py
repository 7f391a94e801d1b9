"""Ray entry point: one Ray Train worker per GPU, each running the library's job function.

Ray Train's ``TorchTrainer`` starts the workers and their process group; DeepSpeed runs inside
each worker. When a worker dies, Ray restarts the group (up to ``max_failures`` times) and the
job resumes from the newest complete checkpoint in the job folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.train.metrics import read_metrics
from finetune.train.run import JobSpec


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from finetune.train.run import run_job

    summary = run_job(JobSpec(**config))
    ray.train.report({"steps": summary["steps"], "preempted": summary["preempted"]})


def run_with_ray(spec: JobSpec, num_workers: int, max_failures: int = 2) -> dict[str, Any]:
    """Run the job on ``num_workers`` Ray workers (GPUs when CUDA is present) and wait for it."""
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = torch.cuda.is_available()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.as_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=Path(spec.job_dir).name,
            storage_path=str(Path(spec.job_dir) / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    trainer.fit()
    ends = [r for r in read_metrics(Path(spec.job_dir) / "metrics.jsonl") if r.get("event") == "end"]
    return json.loads(ends[-1]["detail"]) if ends else {}
