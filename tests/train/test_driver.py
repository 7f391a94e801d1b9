"""The Ray job driver the service submits: ``python -m workers.driver SPEC_FILE`` runs one prepared job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.events import read_events
from finetune.jobstore import JobStore
from finetune.recipe import Recipe
from finetune.registry import Registry
from finetune.settings import Settings
from finetune.storage import Bucket
from finetune.train.launch import plan_job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_the_driver_runs_a_prepared_job_from_its_spec_alone(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", ray_address=None)
    bucket = tmp_path / "bucket"
    (bucket / "data").mkdir(parents=True)
    shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", bucket / "data" / "quickstart.jsonl")
    recipe = Recipe.model_validate({
        "name": "driven", "model": {"id": "smollm2-135m-instruct", "tiny": True},
        "data": {"path": "data/quickstart.jsonl", "max_seq_len": 128, "eval": {"fraction": 0.1}},
        "method": {"type": "lora", "rank": 4}, "training": {"max_steps": 3, "gradient_checkpointing": False},
    })  # fmt: skip
    store = JobStore(Bucket.folder(tmp_path / "tenant"), "jobs/j-1", "j-1")
    registry = Registry.load(settings.registry, settings.lock_path)
    spec, _ = plan_job(recipe, Bucket.folder(bucket), store, settings, registry=registry)
    (tmp_path / "spec.json").write_text(spec.model_dump_json(), encoding="utf-8")
    assert "secret" not in spec.model_dump_json().lower()

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FINETUNE_DATA_DIR")}
    env |= {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "workers.driver", str(tmp_path / "spec.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["final"] == "jobs/j-1/final" and not summary["preempted"]
    events = read_events(store.bucket, store.prefix)
    assert [e.kind for e in events if e.kind not in ("step", "eval", "checkpoint")] == ["start", "end"]
    assert (tmp_path / "tenant" / "jobs" / "j-1" / "final" / "adapter_config.json").is_file()
