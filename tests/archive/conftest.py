"""Two tiny finished jobs (LoRA and full, with checkpoints), trained once for all archive tests."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.registry import Registry
from finetune.settings import get_settings
from finetune.signing import SigningKey

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
name: {name}
model:
  id: smollm2-135m-instruct
  tiny: true
data:
  path: data/quickstart.jsonl
  max_seq_len: 256
  eval:
    fraction: 0.1
method:
{method}
training:
  max_steps: 4
  micro_batch_size: 4
  learning_rate: {lr}
  save_every_steps: 2
  gradient_checkpointing: false
output:
  archive: {archive}
resources:
  zero_stage: {zero}
"""


@dataclass(frozen=True)
class Jobs:
    data_dir: Path
    lora: Path
    full: Path
    registry: Registry

    @property
    def store(self) -> Path:
        return self.data_dir / "models"

    @property
    def key(self) -> SigningKey:
        """The platform key the jobs (and their archives) are signed with."""
        from finetune.settings import Settings

        return Settings(data_dir=self.data_dir).signer()

    def build(self, job: Path, out: Path, *, store: Path | None = None, **options: Any) -> Any:
        """``build_archive`` of a local job folder, with the jobs' settings (model store, platform key)."""
        from finetune.archive import build_archive
        from finetune.jobstore import JobStore
        from finetune.settings import Settings

        settings = Settings(data_dir=self.data_dir, model_store=store or self.store)
        return build_archive(JobStore.folder(job), out, registry=self.registry, settings=settings, **options)


def _train(folder: Path, name: str, method: str, lr: float, archive: str, zero: str = "auto") -> Path:
    from finetune.cli import main

    recipe = folder / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, method=method, lr=lr, archive=archive, zero=zero), encoding="utf-8")
    job = folder / "jobs" / name
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["train", str(recipe), "--output", str(job)])
    assert code == 0, err.getvalue()[-3000:]
    return job


@contextmanager
def _training_env(data_dir: Path) -> Iterator[None]:
    """FINETUNE_DATA_DIR set and one torch thread while session fixtures train (monkeypatch is per test)."""
    saved = os.environ.get("FINETUNE_DATA_DIR")
    os.environ["FINETUNE_DATA_DIR"] = str(data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if saved is None:
            os.environ.pop("FINETUNE_DATA_DIR", None)
        else:
            os.environ["FINETUNE_DATA_DIR"] = saved


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    folder = tmp_path_factory.mktemp("archive-jobs")
    shutil.copytree(ROOT / "recipes" / "data", folder / "data")
    with _training_env(folder / "finetune-data"):
        lora = _train(folder, "tiny-lora", "  type: lora\n  rank: 8", 0.01, "both")
        full = _train(folder, "tiny-full", "  type: full", 0.002, "merged")
    yield Jobs(folder / "finetune-data", lora, full, Registry.load(get_settings().registry))


@pytest.fixture(scope="session")
def zero3_jobs(jobs: Jobs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same two jobs trained under a pinned ZeRO-3 (partitioned weights and optimizer states)."""
    folder = tmp_path_factory.mktemp("archive-zero3")
    shutil.copytree(ROOT / "recipes" / "data", folder / "data")
    with _training_env(jobs.data_dir):
        lora = _train(folder, "z3-lora", "  type: lora\n  rank: 8", 0.01, "both", zero="3")
        full = _train(folder, "z3-full", "  type: full", 0.002, "merged", zero="3")
    return {"lora": lora, "full": full}


@pytest.fixture
def data_dir(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The jobs' data dir as FINETUNE_DATA_DIR (verify finds the base model in its store)."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(jobs.data_dir))
    return jobs.data_dir
