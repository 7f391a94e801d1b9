"""Checkpoints: complete or ignored, pruned only after a commit, resumed exactly (DeepSpeed on CPU)."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune.hashing import sha256_file
from finetune.storage import Bucket
from finetune.train import checkpoint as ckpt
from finetune.train import checkpoint_files as files
from finetune.train.checkpoint import CheckpointError, CheckpointInfo, load_latest, resume_problem, save_checkpoint
from finetune.train.checkpoint_files import (
    MARKER,
    find_latest,
    prune,
    step_dir,
    tmp_dir,
    verify,
    write_committed,
)


# ----------------------------------------------------------------------------- helpers
def fill(folder: Path, contents: dict[str, bytes] | None = None) -> None:
    for name, data in (contents or {"model.bin": b"weights" * 10, "sub/optim.bin": b"moments" * 20}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def commit(job: Path, step: int, **meta: Any) -> CheckpointInfo:
    tmp = tmp_dir(job, step, "test")
    tmp.mkdir(parents=True)
    fill(tmp)
    return write_committed(tmp, step_dir(job, step), {"step": step, "world_size": 1, "zero_stage": 0, **meta})


def steps_on_disk(job: Path) -> list[str]:
    return sorted(p.name for p in (job / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- commit and verify
def test_commit_writes_marker_with_digests_and_renames(tmp_path: Path) -> None:
    info = commit(tmp_path, 7, epoch=1, data_position={"row": 3})
    assert info.path == tmp_path / "checkpoints" / "step-000000007"
    assert steps_on_disk(tmp_path) == ["step-000000007"]
    marker = json.loads((info.path / MARKER).read_text())
    assert marker["format_version"] == files.FORMAT_VERSION
    assert (marker["step"], marker["epoch"], marker["data_position"]) == (7, 1, {"row": 3})
    assert set(marker["files"]) == {"model.bin", "sub/optim.bin"}
    for name, entry in marker["files"].items():
        assert entry == {"size": (info.path / name).stat().st_size, "sha256": sha256_file(info.path / name)}
    assert verify(info.path) == []
    assert find_latest(tmp_path) == info


def test_commit_refuses_bad_metadata_and_overwrites(tmp_path: Path) -> None:
    commit(tmp_path, 1)
    tmp = tmp_dir(tmp_path, 2, "x")
    tmp.mkdir()
    fill(tmp)
    with pytest.raises(CheckpointError, match="does not match"):
        write_committed(tmp, step_dir(tmp_path, 2), {"step": 3})
    with pytest.raises(CheckpointError, match="may not set"):
        write_committed(tmp, step_dir(tmp_path, 2), {"step": 2, "files": {}})
    with pytest.raises(CheckpointError, match="never overwritten"):
        write_committed(tmp, step_dir(tmp_path, 1), {"step": 1})
    (tmp / "link").symlink_to(tmp / "model.bin")
    with pytest.raises(CheckpointError, match="plain files"):
        write_committed(tmp, step_dir(tmp_path, 2), {"step": 2})


def _crash_tmp_only(job: Path) -> None:
    tmp = tmp_dir(job, 2, "123")
    tmp.mkdir(parents=True)
    fill(tmp)


def _crash_before_rename(job: Path) -> None:
    tmp = tmp_dir(job, 2, "123")
    tmp.mkdir(parents=True)
    fill(tmp)

    def crash(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt("killed between marker and rename")

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(files.os, "rename", crash)
        write_committed(tmp, step_dir(job, 2), {"step": 2})
    assert (tmp / MARKER).is_file()


def _final_without_marker(job: Path) -> None:
    step_dir(job, 2).mkdir(parents=True)
    fill(step_dir(job, 2))


def _wrong_digest(job: Path) -> None:
    info = commit(job, 2)
    data = (info.path / "model.bin").read_bytes()
    (info.path / "model.bin").write_bytes(b"X" + data[1:])


def _missing_file(job: Path) -> None:
    (commit(job, 2).path / "sub" / "optim.bin").unlink()


def _truncated_file(job: Path) -> None:
    path = commit(job, 2).path / "sub" / "optim.bin"
    path.write_bytes(path.read_bytes()[:-1])


def _extra_file(job: Path) -> None:
    (commit(job, 2).path / "mp_rank_01_model_states.pt").write_bytes(b"planted")


def _corrupt_marker(job: Path) -> None:
    (commit(job, 2).path / MARKER).write_text('{"format_version": 1, "step": 2, "fil')


def _future_format(job: Path) -> None:
    path = commit(job, 2).path / MARKER
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))


CRASHES: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "tmp folder only": (_crash_tmp_only, None),
    "marker written, not renamed": (_crash_before_rename, None),
    "final folder without marker": (_final_without_marker, "cut off before its commit"),
    "wrong digest": (_wrong_digest, "sha256"),
    "missing file": (_missing_file, "'sub/optim.bin' is missing"),
    "truncated file": (_truncated_file, "bytes, the marker lists"),
    "unlisted file": (_extra_file, "not in the marker's manifest"),
    "corrupt marker json": (_corrupt_marker, "unreadable COMMITTED.json"),
    "unknown marker format": (_future_format, "marker format 99"),
}


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_checkpoint_cut_off_or_damaged_is_ignored(tmp_path: Path, crash: str, caplog: pytest.LogCaptureFixture) -> None:
    make, reason = CRASHES[crash]
    older = commit(tmp_path, 1)
    make(tmp_path)
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        latest = find_latest(tmp_path)
    assert latest is not None and latest.path == older.path, "the older complete checkpoint wins"
    if reason is None:
        assert not caplog.records, "a .tmp-* folder is never even looked at"
    else:
        assert any("step-000000002" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert find_latest(tmp_path / "elsewhere") is None


def test_only_incomplete_checkpoints_means_start_afresh(tmp_path: Path) -> None:
    _final_without_marker(tmp_path)
    _crash_tmp_only(tmp_path)
    assert find_latest(tmp_path) is None


def test_newest_is_chosen_by_step_number(tmp_path: Path) -> None:
    for step in (9, 10, 2, 1_000_000_000):
        commit(tmp_path, step)
    info = find_latest(tmp_path)
    assert info is not None and info.step == 1_000_000_000
    assert info.path.name == "step-1000000000"


def test_verify_refuses_manifest_paths_that_leave_the_folder(tmp_path: Path) -> None:
    info = commit(tmp_path, 1)
    marker = json.loads((info.path / MARKER).read_text())
    marker["files"]["../outside.bin"] = {"size": 1, "sha256": "0"}
    (info.path / MARKER).write_text(json.dumps(marker))
    assert any("not a valid file entry" in p for p in verify(info.path))


# ----------------------------------------------------------------------------- pruning
def test_prune_keeps_the_newest_k_and_removes_leftovers(tmp_path: Path) -> None:
    for step in range(1, 6):
        commit(tmp_path, step)
    _crash_tmp_only(tmp_path)  # a .tmp-step-000000002-123 left by a crash
    (tmp_path / "checkpoints" / "step-000000009").mkdir()  # marker-less
    removed = prune(tmp_path, keep=2)
    assert steps_on_disk(tmp_path) == ["step-000000004", "step-000000005"]
    assert len(removed) == 5
    assert prune(tmp_path, keep=2) == []


def test_prune_never_removes_the_only_complete_checkpoint(tmp_path: Path) -> None:
    commit(tmp_path, 1)
    _final_without_marker(tmp_path)  # step 2, newer but incomplete
    _crash_tmp_only(tmp_path)
    prune(tmp_path, keep=1)
    assert steps_on_disk(tmp_path) == ["step-000000001"]
    latest = find_latest(tmp_path)
    assert latest is not None and latest.step == 1
    with pytest.raises(ValueError):
        prune(tmp_path, keep=0)
    assert prune(tmp_path / "nothing", keep=1) == []


def test_committed_folder_publishes_to_a_bucket_and_still_verifies(tmp_path: Path) -> None:
    info = commit(tmp_path / "job", 3)
    bucket = Bucket.folder(tmp_path / "bucket")
    published = bucket.publish_folder(info.path, "checkpoints/step-000000003")
    assert bucket.is_published("checkpoints/step-000000003")
    assert {k: v for k, v in published["files"].items() if k != MARKER} == info.marker["files"]
    assert verify(bucket.local_path("checkpoints/step-000000003")) == []


# ----------------------------------------------------------------------------- save/load without DeepSpeed
class FakeEngine:
    """The slice of a DeepSpeed engine the checkpoint code uses."""

    def __init__(self, stage: int = 0, frozen: bool = False, rank: int = 0) -> None:
        self.module = torch.nn.Linear(2, 2)
        self.rank = rank
        if frozen:
            self.module.weight.requires_grad_(False)
        self.stage = stage
        self.calls: list[str] = []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], **kwargs: Any) -> bool:
        assert kwargs == {"save_latest": False, "exclude_frozen_parameters": not self.module.weight.requires_grad}
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"state")
        if self.stage:
            (Path(save_dir) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(b"shard")
        self.calls.append("save")
        return True

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        self.calls.append("load")
        return os.path.join(load_dir, tag), {}


RECIPE = {"method": {"type": "lora", "rank": 8}, "model": "tiny"}


def fake_save(job: Path, step: int, engine: FakeEngine | None = None, **kwargs: Any) -> Path:
    state: dict[str, Any] = {"step": step, "epoch": 0.5, "best_eval_loss": None, "last_eval": {}}
    return save_checkpoint(
        job, step, engine or FakeEngine(), state=state, recipe_json=RECIPE, rank=0, world_size=1, **kwargs
    )


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_save_and_load_round_trip_restores_state_and_rng(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = fake_save(tmp_path, 4)
    expected = draws()
    marker = json.loads((path / MARKER).read_text())
    assert {k: marker[k] for k in ("step", "epoch", "world_size", "zero_stage", "method", "frozen_excluded")} == {
        "step": 4, "epoch": 0.5, "world_size": 1, "zero_stage": 0, "method": "lora", "frozen_excluded": False,
    }  # fmt: skip
    assert marker["data_position"] == {"step": 4}
    assert set(marker["files"]) == {
        "deepspeed/mp_rank_00_model_states.pt", "rng/rank-00000.safetensors", "trainer_state.json", "recipe.json",
    }  # fmt: skip
    assert not (tmp_path / "checkpoints" / "latest").exists()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    engine = FakeEngine()
    resumed = load_latest(tmp_path, engine, world_size=1)
    assert resumed is not None and engine.calls == ["load"]
    assert (resumed.step, resumed.epoch, resumed.data_position) == (4, 0.5, {"step": 4})
    assert resumed.trainer_state == {"step": 4, "epoch": 0.5, "best_eval_loss": None, "last_eval": {}}
    assert resumed.recipe == RECIPE
    assert draws() == expected


def test_load_latest_without_checkpoints_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path, FakeEngine(), world_size=1) is None


def test_saving_a_committed_step_again_is_a_no_op(tmp_path: Path) -> None:
    first = fake_save(tmp_path, 2)
    engine = FakeEngine()
    assert fake_save(tmp_path, 2, engine) == first
    assert engine.calls == []


def test_state_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 1, FakeEngine(), state={"x": object()}, recipe_json={}, rank=0, world_size=1)
    assert not (tmp_path / "checkpoints").exists()


def test_prune_runs_only_after_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_save(tmp_path, 1)
    fake_save(tmp_path, 2)
    order: list[str] = []
    real_commit, real_prune = ckpt.write_committed, ckpt.prune

    def recorded(name: str, real: Callable[..., Any] | None) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            order.append(name)
            if real is None:
                raise OSError("disk full")
            return real(*args)

        return call

    monkeypatch.setattr(ckpt, "prune", recorded("prune", real_prune))
    monkeypatch.setattr(ckpt, "write_committed", recorded("commit", None))
    with pytest.raises(OSError, match="disk full"):
        fake_save(tmp_path, 3, keep=1)
    assert order == ["commit"]
    assert [p for p in steps_on_disk(tmp_path) if p.startswith("step-")] == ["step-000000001", "step-000000002"]

    monkeypatch.setattr(ckpt, "write_committed", recorded("commit", real_commit))
    fake_save(tmp_path, 4, keep=1)
    assert order == ["commit", "commit", "prune"]
    assert steps_on_disk(tmp_path) == ["step-000000004"], "the stale .tmp folder of step 3 is gone too"


def test_resume_problem_policy(tmp_path: Path) -> None:
    def info(world: int, stage: int, frozen: bool = False) -> CheckpointInfo:
        marker = {"world_size": world, "zero_stage": stage, "frozen_excluded": frozen}
        return CheckpointInfo(path=tmp_path / "step-000000005", step=5, marker=marker)

    assert resume_problem(info(2, 2), world_size=2, zero_stage=2, frozen=False) is None
    assert resume_problem(info(4, 0), world_size=2, zero_stage=0, frozen=False) is None
    sharded = resume_problem(info(4, 2), world_size=2, zero_stage=2, frozen=False)
    assert sharded is not None and "Resume with 4 worker(s)" in sharded and "step-000000005" in sharded
    stage = resume_problem(info(1, 2), world_size=1, zero_stage=3, frozen=False)
    assert stage is not None and "pin ZeRO stage 2" in stage
    method = resume_problem(info(1, 0, frozen=True), world_size=1, zero_stage=0, frozen=False)
    assert method is not None and "adapter" in method


def test_load_latest_refuses_a_sharded_checkpoint_on_another_world_size(tmp_path: Path) -> None:
    fake_save(tmp_path, 3, FakeEngine(stage=2))
    marker_path = step_dir(tmp_path, 3) / MARKER
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "world_size": 2}))
    engine = FakeEngine(stage=2)
    with pytest.raises(CheckpointError, match=r"written by 2 worker\(s\) with ZeRO stage 2.*Resume with 2"):
        load_latest(tmp_path, engine, world_size=1)
    assert engine.calls == [], "nothing was loaded"


# ----------------------------------------------------------------------------- two ranks (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _disk_full(tmp: Path, final: Path, meta: dict[str, Any]) -> CheckpointInfo:
    raise OSError("disk full")


def _rank_main(rank: int, job: str, port: int) -> None:
    """One of two gloo ranks: save and resume collectively, then save with rank 0 failing to commit."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results: list[dict[str, Any]] = []
    try:
        for step in (5, 6):
            if step == 6 and rank == 0:
                ckpt.write_committed = _disk_full
            try:
                engine = FakeEngine(2, rank=rank)
                saved = save_checkpoint(Path(job), step, engine, state={}, recipe_json={}, rank=rank, world_size=2)
                resumed = load_latest(Path(job), FakeEngine(2, rank=rank), world_size=2, rank=rank)
                results.append({"path": saved.name, "step": resumed.step if resumed else None})
            except Exception as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        Path(job, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict[str, Any]]]]:
    """Run :func:`_rank_main` on two processes; ``(job folder, each rank's results)``."""
    import torch.multiprocessing as tmp

    job = tmp_path_factory.mktemp("two-ranks")
    context = tmp.start_processes(_rank_main, args=(str(job), _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):  # True once both ended
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks hung")
    return job, [json.loads((job / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
def test_two_ranks_commit_once_and_resume_together(two_ranks: tuple[Path, list[list[dict[str, Any]]]]) -> None:
    job, results = two_ranks
    assert [r[0] for r in results] == [{"path": "step-000000005", "step": 5}] * 2
    marker = json.loads((step_dir(job, 5) / MARKER).read_text())
    assert marker["world_size"] == 2
    assert {"rng/rank-00000.safetensors", "rng/rank-00001.safetensors"} <= set(marker["files"])
    assert {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= set(marker["files"])
    with pytest.raises(CheckpointError, match=r"Resume with 2 worker\(s\)"):
        load_latest(job, FakeEngine(2), world_size=1)


@pytest.mark.integration
def test_a_failed_commit_on_rank0_fails_every_rank(two_ranks: tuple[Path, list[list[dict[str, Any]]]]) -> None:
    job, results = two_ranks
    assert results[0][1] == {"error": "OSError: disk full"}
    assert results[1][1] == {"error": "CheckpointError: rank 0 failed: OSError: disk full"}
    latest = find_latest(job)
    assert latest is not None and latest.step == 5


# ----------------------------------------------------------------------------- DeepSpeed on CPU


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-process gloo group, as ``--launcher local`` makes."""
    import deepspeed
    import torch.distributed as dist

    created = not dist.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        if created:
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0"}
            for key, value in {**env, "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
                mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        if created:
            dist.destroy_process_group()


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "gradient_clipping": 1.0,
}


def tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, attention_dropout=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def lora(seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(0)  # the frozen base is the same in both runs, as when reloaded from the model store
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(base, config)


def engine_of(model: torch.nn.Module) -> Any:
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=DS_CONFIG)
    return engine


BATCHES = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def train(engine: Any, batches: list[torch.Tensor]) -> list[float]:
    losses = []
    for ids in batches:
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    return losses


def trained_weights(engine: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


@pytest.mark.integration
@pytest.mark.parametrize("build", [tiny_llama, lora], ids=["full", "lora"])
def test_deepspeed_resume_continues_the_loss_curve_exactly(
    tmp_path: Path, process_group: None, build: Callable[[int], torch.nn.Module]
) -> None:
    torch.manual_seed(0)
    first = engine_of(build(0))
    train(first, BATCHES[:3])
    state = {"step": 3, "best_eval_loss": None}
    path = save_checkpoint(tmp_path, 3, first, state=state, recipe_json=RECIPE, rank=0, world_size=1, keep=2)
    expected_losses, expected_weights = train(first, BATCHES[3:]), trained_weights(first)

    marker = json.loads((path / MARKER).read_text())
    assert marker["zero_stage"] == 2 and marker["frozen_excluded"] == (build is lora)
    assert {"deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(
        marker["files"]
    )
    if build is lora:  # only the adapter is saved, not the frozen base
        whole = sum(p.numel() * 4 for p in first.module.parameters())
        assert marker["files"]["deepspeed/mp_rank_00_model_states.pt"]["size"] < whole / 2

    torch.manual_seed(123)  # another init and another RNG: the checkpoint must restore both
    second = engine_of(build(1))
    assert trained_weights(second).keys() == expected_weights.keys()
    resumed = load_latest(tmp_path, second, world_size=1)
    assert resumed is not None and resumed.step == 3 and resumed.trainer_state == state
    assert second.global_steps == 3
    assert train(second, BATCHES[3:]) == expected_losses
    for name, weight in trained_weights(second).items():
        assert torch.equal(weight, expected_weights[name]), name


@pytest.mark.integration
def test_dropout_makes_the_rng_matter(process_group: None) -> None:
    model = tiny_llama(0).train()
    ids = BATCHES[0]
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) != float(model(input_ids=ids, labels=ids).loss)
