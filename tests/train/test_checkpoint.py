"""Checkpoints in the job's store: the signed commit, damage and planting refused, pruning, resume.

The protocol tests run on a local folder and on the S3 server on loopback. Ranks write into
their own scratch folders and meet only in the bucket.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune.hashing import sha256_file
from finetune.jobstore import JobStore
from finetune.published import MARKER, commit_folder, upload_files
from finetune.signing import SigningKey, sign_document
from finetune.storage import Bucket
from finetune.train import checkpoint as ckpt
from finetune.train.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    Rank,
    load_latest,
    resume_problem,
    save_checkpoint,
)
from finetune.train.checkpoint_files import (
    check_checkpoint,
    checkpoint_path,
    find_latest,
    list_steps,
    prune,
    recipe_digest,
)

KEY = SigningKey.from_base64(base64.b64encode(bytes(range(32))).decode())  # the same in spawned ranks
ONE = Rank(0, 1)
RECIPE = {"method": {"type": "lora", "rank": 8}, "model": "tiny"}
DIGEST = recipe_digest(RECIPE)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "file":
        return JobStore(Bucket.folder(tmp_path / "bucket"), "jobs/j1", "j1")
    return JobStore(Bucket(request.getfixturevalue("s3_storage")(), "t1", "2026q1"), "jobs/j1", "j1")


@pytest.fixture
def local(tmp_path: Path) -> JobStore:
    return JobStore(Bucket.folder(tmp_path / "bucket"), "", "j1")


def commit(store: JobStore, step: int, key: SigningKey = KEY, **meta: Any) -> CheckpointInfo:
    src = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"ckpt-src-{uuid.uuid4().hex}"
    for name, data in {"model.bin": b"weights" * 10, "sub/optim.bin": b"moments" * 20}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    rel = checkpoint_path(store, f"step-{step:09d}")
    files = upload_files(store.bucket, src, rel, move=True)
    meta = {"job_id": store.job_id, "recipe_sha256": DIGEST, "step": step, "world_size": 1, "zero_stage": 0, **meta}
    commit_folder(store.bucket, rel, "checkpoint", files, meta, key)
    return check_checkpoint(store, f"step-{step:09d}", key.public)


def names(store: JobStore) -> list[str]:
    return [name for _, name in list_steps(store)]


def rel(store: JobStore, step: int, name: str = "") -> str:
    return checkpoint_path(store, f"step-{step:09d}") + (f"/{name}" if name else "")


def marker_of(store: JobStore, step: int) -> dict[str, Any]:
    return dict(json.loads(store.bucket.read_bytes(rel(store, step, MARKER))))


def write_marker(store: JobStore, step: int, marker: dict[str, Any]) -> None:
    store.bucket.write_bytes(rel(store, step, MARKER), json.dumps(marker).encode())


# ----------------------------------------------------------------------------- commit and check
def test_commit_writes_a_signed_manifest_with_digests(store: JobStore, tmp_path: Path) -> None:
    info = commit(store, 7, epoch=1, data_position={"row": 3})
    assert names(store) == ["step-000000007"]
    marker = marker_of(store, 7)
    assert marker["kind"] == "checkpoint" and marker["job_id"] == "j1"
    assert (marker["step"], marker["epoch"], marker["data_position"]) == (7, 1, {"row": 3})
    assert marker["signature"]["algorithm"] == "ed25519" and marker["signature"]["key_id"] == KEY.key_id
    assert set(marker["files"]) == {"model.bin", "sub/optim.bin"}
    store.bucket.download(rel(store, 7, "model.bin"), tmp_path / "m.bin")
    assert marker["files"]["model.bin"] == {"size": 70, "sha256": sha256_file(tmp_path / "m.bin")}
    assert find_latest(store, KEY.public) == (info, [])


def test_commit_refuses_reserved_metadata_and_missing_uploads(local: JobStore) -> None:
    with pytest.raises(Exception, match="may not set"):
        commit_folder(local.bucket, "x", "checkpoint", {}, {"files": {}}, KEY)
    with pytest.raises(Exception, match="is not in the bucket"):
        commit_folder(local.bucket, "x", "checkpoint", {"a.bin": {"size": 3, "sha256": "0"}}, {}, KEY)


def _no_marker(store: JobStore) -> None:
    commit(store, 2)
    store.bucket.remove(rel(store, 2, MARKER))


def _missing_file(store: JobStore) -> None:
    commit(store, 2)
    store.bucket.remove(rel(store, 2, "sub/optim.bin"))


def _truncated_file(store: JobStore) -> None:
    commit(store, 2)
    store.bucket.write_bytes(rel(store, 2, "sub/optim.bin"), b"short")


def _extra_file(store: JobStore) -> None:
    commit(store, 2)
    store.bucket.write_bytes(rel(store, 2, "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"), b"planted")


def _corrupt_marker(store: JobStore) -> None:
    commit(store, 2)
    store.bucket.write_bytes(rel(store, 2, MARKER), b'{"format_version": 2, "step": 2, "fil')


def _unsigned(store: JobStore) -> None:
    commit(store, 2)
    marker = marker_of(store, 2)
    del marker["signature"]
    write_marker(store, 2, marker)


def _redigested(store: JobStore) -> None:
    commit(store, 2)
    marker = marker_of(store, 2)
    store.bucket.write_bytes(rel(store, 2, "model.bin"), b"altered!" * 10)
    marker["files"]["model.bin"] = {"size": 80, "sha256": "0" * 64}
    write_marker(store, 2, marker)


def _other_key(store: JobStore) -> None:
    commit(store, 2, key=SigningKey.generate())


def _other_recipe(store: JobStore) -> None:
    commit(store, 2)
    marker = marker_of(store, 2)
    write_marker(store, 2, sign_document({**marker, "recipe_sha256": recipe_digest({"other": 1})}, KEY))


def _renamed(store: JobStore) -> None:
    commit(store, 3)
    for name, _size in store.bucket.walk_files(rel(store, 3)):
        store.bucket.write_bytes(name.replace("step-000000003", "step-000000002"), store.bucket.read_bytes(name))
    store.bucket.remove(rel(store, 3), recursive=True)


DAMAGE: dict[str, tuple[Callable[[JobStore], None], str]] = {
    "upload cut off before the manifest": (_no_marker, "cut off before its commit"),
    "missing file": (_missing_file, "'sub/optim.bin' is missing"),
    "truncated file": (_truncated_file, "bytes, the manifest lists"),
    "unlisted file planted": (_extra_file, "is not in the signed manifest"),
    "corrupt manifest": (_corrupt_marker, "not readable JSON"),
    "unsigned manifest": (_unsigned, "unsigned"),
    "re-digested altered file": (_redigested, "signature does not match"),
    "signed by another key": (_other_key, "signed with another key"),
    "another recipe's checkpoint": (_other_recipe, "written under another recipe"),
    "renamed folder": (_renamed, "its name says step-000000002"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_planted_checkpoint_is_refused_by_name(
    local: JobStore, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = DAMAGE[damage]
    older = commit(local, 1)
    make(local)
    with caplog.at_level(logging.WARNING):
        latest, refused = find_latest(local, KEY.public, recipe=DIGEST)
    assert latest == older, "the older complete checkpoint wins"
    assert len(refused) == 1 and refused[0].startswith("step-000000002: ") and reason in refused[0], refused


def test_the_s3_path_refuses_damage_too(store: JobStore) -> None:
    older = commit(store, 1)
    _redigested(store)
    latest, refused = find_latest(store, KEY.public)
    assert latest == older and "signature does not match" in refused[0]


def test_newest_is_chosen_by_step_number(local: JobStore) -> None:
    for step in (9, 10, 2, 1_000_000_000):
        commit(local, step)
    info, _ = find_latest(local, KEY.public)
    assert info is not None and info.step == 1_000_000_000 and info.name == "step-1000000000"
    assert find_latest(JobStore(local.bucket, "elsewhere", "j1"), KEY.public) == (None, [])


def test_manifest_names_that_leave_the_folder_are_refused(local: JobStore) -> None:
    commit(local, 1)
    marker = marker_of(local, 1)
    marker["files"]["../outside.bin"] = {"size": 1, "sha256": "0"}
    write_marker(local, 1, sign_document(marker, KEY))
    assert "unsafe file names" in find_latest(local, KEY.public)[1][0]


# ----------------------------------------------------------------------------- pruning
def test_prune_keeps_the_newest_k_and_removes_leftovers(store: JobStore) -> None:
    for step in range(1, 6):
        commit(store, step)
    store.bucket.write_bytes(rel(store, 9, "model.bin"), b"an upload cut off")
    removed = prune(store, 2, KEY.public)
    assert names(store) == ["step-000000004", "step-000000005"]
    assert removed == ["step-000000001", "step-000000002", "step-000000003", "step-000000009"]
    assert prune(store, 2, KEY.public) == []


def test_prune_never_removes_the_only_complete_checkpoint(local: JobStore) -> None:
    commit(local, 1)
    _unsigned(local)
    prune(local, 1, KEY.public)
    assert names(local) == ["step-000000001"]
    with pytest.raises(ValueError):
        prune(local, 0, KEY.public)


# ----------------------------------------------------------------------------- save/load without DeepSpeed
class FakeEngine:
    """The slice of a DeepSpeed engine the checkpoint code uses."""

    def __init__(self, stage: int = 0, frozen: bool = False, rank: int = 0) -> None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.module = torch.nn.Linear(2, 2)
        self.rank = rank
        if frozen:
            self.module.weight.requires_grad_(False)
        self.stage = stage
        self.calls: list[str] = []
        self.checkpoint_engine = TorchCheckpointEngine()

    def zero_optimization_stage(self) -> int:
        return self.stage

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], **kwargs: Any) -> bool:
        assert kwargs == {"save_latest": False, "exclude_frozen_parameters": not self.module.weight.requires_grad}
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"state")
            (Path(save_dir) / "zero_to_fp32.py").write_text("print('never run')")
        if self.stage:
            (Path(save_dir) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(b"shard")
        self.calls.append("save")
        return True

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        self.calls.append("load")
        self.loaded = sorted(p.relative_to(load_dir).as_posix() for p in Path(load_dir).rglob("*") if p.is_file())
        return os.path.join(load_dir, tag), {}


def fake_save(store: JobStore, step: int, scratch: Path, engine: FakeEngine | None = None, **kwargs: Any) -> Any:
    state: dict[str, Any] = {"step": step, "epoch": 0.5, "best_eval_loss": None, "last_eval": {}}
    return save_checkpoint(
        store, step, engine or FakeEngine(), state=state, recipe_json=RECIPE, me=ONE, scratch=scratch, key=KEY,
        **kwargs,
    )  # fmt: skip


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_save_and_load_round_trip_restores_state_and_rng(store: JobStore, tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = fake_save(store, 4, tmp_path / "scratch")
    expected = draws()
    assert (saved.name, saved.files) == ("step-000000004", 4)
    assert not any((tmp_path / "scratch").rglob("*.pt")), "the rank's scratch copy is gone once uploaded"
    marker = marker_of(store, 4)
    assert {k: marker[k] for k in ("step", "epoch", "world_size", "zero_stage", "method", "frozen_excluded")} == {
        "step": 4, "epoch": 0.5, "world_size": 1, "zero_stage": 0, "method": "lora", "frozen_excluded": False,
    }  # fmt: skip
    assert marker["data_position"] == {"step": 4}
    assert set(marker["files"]) == {
        "deepspeed/mp_rank_00_model_states.pt", "rng/rank-00000.safetensors", "trainer_state.json", "recipe.json",
    }, "DeepSpeed's recovery script is never published"  # fmt: skip
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    engine = FakeEngine()
    resumed = load_latest(store, engine, recipe_json=RECIPE, me=ONE, scratch=tmp_path / "scratch", key=KEY.public)
    assert resumed.state is not None and engine.calls == ["load"] and resumed.refused == []
    state = resumed.state
    assert (state.step, state.epoch, state.data_position, state.name) == (4, 0.5, {"step": 4}, "step-000000004")
    assert state.trainer_state == {"step": 4, "epoch": 0.5, "best_eval_loss": None, "last_eval": {}}
    assert state.recipe == RECIPE
    assert draws() == expected
    assert not (tmp_path / "scratch" / "resume").exists(), "the fetched copy is removed after the load"


def test_load_latest_without_checkpoints_starts_afresh(local: JobStore, tmp_path: Path) -> None:
    resumed = load_latest(local, FakeEngine(), recipe_json=RECIPE, me=ONE, scratch=tmp_path, key=KEY.public)
    assert resumed.state is None and resumed.refused == []


def test_saving_a_committed_step_again_is_a_no_op(local: JobStore, tmp_path: Path) -> None:
    fake_save(local, 2, tmp_path)
    engine = FakeEngine()
    assert fake_save(local, 2, tmp_path, engine).files == 0
    assert engine.calls == []


def test_a_leftover_of_the_same_step_is_replaced(local: JobStore, tmp_path: Path) -> None:
    local.bucket.write_bytes(rel(local, 2, "deepspeed/stale.pt"), b"from a crashed attempt")
    fake_save(local, 2, tmp_path)
    assert "deepspeed/stale.pt" not in marker_of(local, 2)["files"]
    assert find_latest(local, KEY.public)[1] == []


def test_state_must_be_json(local: JobStore, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(local, 1, FakeEngine(), state={"x": object()}, recipe_json={}, me=ONE, scratch=tmp_path,
                        key=KEY)  # fmt: skip
    assert names(local) == []


def test_prune_runs_only_after_the_commit(local: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_save(local, 1, tmp_path)
    fake_save(local, 2, tmp_path)
    order: list[str] = []
    real_commit, real_prune = ckpt.commit_folder, ckpt.prune

    def recorded(name: str, real: Callable[..., Any] | None) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            order.append(name)
            if real is None:
                raise OSError("storage unavailable")
            return real(*args)

        return call

    monkeypatch.setattr(ckpt, "prune", recorded("prune", real_prune))
    monkeypatch.setattr(ckpt, "commit_folder", recorded("commit", None))
    with pytest.raises(OSError, match="storage unavailable"):
        fake_save(local, 3, tmp_path, keep=1)
    assert order == ["commit"]
    monkeypatch.setattr(ckpt, "commit_folder", recorded("commit", real_commit))
    fake_save(local, 4, tmp_path, keep=1)
    assert order == ["commit", "commit", "prune"]
    assert names(local) == ["step-000000004"], "the upload of step 3 that was never committed is gone too"


def test_resume_problem_policy() -> None:
    def info(world: int, stage: int, frozen: bool = False) -> CheckpointInfo:
        marker = {"world_size": world, "zero_stage": stage, "frozen_excluded": frozen}
        return CheckpointInfo(name="step-000000005", step=5, marker=marker)

    assert resume_problem(info(2, 2), world_size=2, zero_stage=2, frozen=False) is None
    assert resume_problem(info(4, 0), world_size=2, zero_stage=0, frozen=False) is None
    sharded = resume_problem(info(4, 2), world_size=2, zero_stage=2, frozen=False)
    assert sharded is not None and "Resume with 4 worker(s)" in sharded and "step-000000005" in sharded
    stage = resume_problem(info(1, 2), world_size=1, zero_stage=3, frozen=False)
    assert stage is not None and "pin ZeRO stage 2" in stage
    method = resume_problem(info(1, 0, frozen=True), world_size=1, zero_stage=0, frozen=False)
    assert method is not None and "adapter" in method


def test_load_latest_refuses_a_sharded_checkpoint_on_another_world_size(local: JobStore, tmp_path: Path) -> None:
    fake_save(local, 3, tmp_path, FakeEngine(stage=2))
    write_marker(local, 3, sign_document({**marker_of(local, 3), "world_size": 2}, KEY))
    engine = FakeEngine(stage=2)
    with pytest.raises(CheckpointError, match=r"written by 2 worker\(s\) with ZeRO stage 2.*Resume with 2"):
        load_latest(local, engine, recipe_json=RECIPE, me=ONE, scratch=tmp_path, key=KEY.public)
    assert engine.calls == [], "nothing was loaded"


class Boom:
    """A pickle that would run code when unpickled: it leaves a file behind."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


def test_a_file_swapped_after_signing_is_caught_by_its_digest_before_any_load(local: JobStore, tmp_path: Path) -> None:
    """Same size, other bytes: the manifest still checks out; the digest check while fetching does not."""
    fake_save(local, 1, tmp_path)
    fake_save(local, 2, tmp_path)
    local.bucket.write_bytes(rel(local, 2, "deepspeed/mp_rank_00_model_states.pt"), b"STATE")  # 5 bytes, as before
    engine = FakeEngine()
    resumed = load_latest(local, engine, recipe_json=RECIPE, me=ONE, scratch=tmp_path, key=KEY.public)
    assert resumed.state is not None and resumed.state.name == "step-000000001"
    assert len(resumed.refused) == 1 and "does not match its sha256 digest" in resumed.refused[0]
    assert resumed.refused[0].startswith("step-000000002: ") and engine.calls == ["load"]


def test_a_planted_pickle_is_never_unpickled(local: JobStore, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    fake_save(local, 1, tmp_path)
    payload = pickle.dumps(Boom(sentinel))
    for step in (2, 3):  # an unsigned hand-made manifest, and a re-digested signed one
        fake_save(local, step, tmp_path)
        local.bucket.write_bytes(rel(local, step, "deepspeed/mp_rank_00_model_states.pt"), payload)
        marker = marker_of(local, step)
        marker["files"]["deepspeed/mp_rank_00_model_states.pt"] = {"size": len(payload), "sha256": "x"}
        if step == 2:
            del marker["signature"]
        write_marker(local, step, marker)
    resumed = load_latest(local, FakeEngine(), recipe_json=RECIPE, me=ONE, scratch=tmp_path, key=KEY.public)
    assert resumed.state is not None and resumed.state.name == "step-000000001"
    assert [r.split(":")[0] for r in resumed.refused] == ["step-000000003", "step-000000002"]
    assert "unsigned" in resumed.refused[1] and "signature does not match" in resumed.refused[0]
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- two ranks (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, root: str, port: int) -> None:
    """One of two gloo ranks, each with its own scratch: save and resume collectively, then save
    with rank 1's upload failing."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    store = JobStore(Bucket.folder(Path(root) / "bucket"), "", "j1")
    scratch = Path(root) / f"scratch-{rank}"
    me = Rank(rank, 2)
    results: list[dict[str, Any]] = []
    try:
        for step in (5, 6):
            if step == 6 and rank == 1:
                ckpt.upload_files = _unreachable  # type: ignore[assignment]
            try:
                saved = save_checkpoint(store, step, FakeEngine(2, rank=rank), state={}, recipe_json={}, me=me,
                                        scratch=scratch, key=KEY)  # fmt: skip
                engine = FakeEngine(2, rank=rank)
                resumed = load_latest(store, engine, recipe_json={}, me=me, scratch=scratch, key=KEY.public)
                state = resumed.state
                results.append({"name": saved.name, "step": state.step if state else None, "loaded": engine.loaded})
            except Exception as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        Path(root, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # both ranks are done talking
        os._exit(0)  # gloo's teardown at interpreter exit sometimes aborts (a thread not joined): skip it


def _unreachable(*args: Any, **kwargs: Any) -> Any:
    raise OSError("storage unreachable")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict[str, Any]]]]:
    """Run :func:`_rank_main` on two processes; ``(root, each rank's results)``."""
    import torch.multiprocessing as tmp

    root = tmp_path_factory.mktemp("two-ranks")
    context = tmp.start_processes(_rank_main, args=(str(root), _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):  # True once both ended
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks hung")
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
def test_two_ranks_with_their_own_scratch_commit_once_and_resume_together(
    two_ranks: tuple[Path, list[list[dict[str, Any]]]], tmp_path: Path
) -> None:
    root, results = two_ranks
    assert [{k: r[0][k] for k in ("name", "step")} for r in results] == [{"name": "step-000000005", "step": 5}] * 2
    shared = ["deepspeed/mp_rank_00_model_states.pt"] + [f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                        for r in range(2)]  # fmt: skip
    for rank in range(2):  # each rank fetched the shared files, its own RNG state and no script
        own = [f"rng/rank-{rank:05d}.safetensors", "recipe.json", "trainer_state.json"]
        assert results[rank][0]["loaded"] == sorted([*shared, *own])
    store = JobStore(Bucket.folder(root / "bucket"), "", "j1")
    marker = marker_of(store, 5)
    assert marker["world_size"] == 2
    assert {"rng/rank-00000.safetensors", "rng/rank-00001.safetensors", *shared} <= set(marker["files"])
    with pytest.raises(CheckpointError, match=r"Resume with 2 worker\(s\)"):
        load_latest(store, FakeEngine(2), recipe_json={}, me=ONE, scratch=tmp_path, key=KEY.public)


@pytest.mark.integration
def test_a_failed_upload_on_one_rank_fails_every_rank(two_ranks: tuple[Path, list[list[dict[str, Any]]]]) -> None:
    root, results = two_ranks
    for rank in range(2):
        assert results[rank][1] == {"error": "CheckpointError: checkpoint step-000000006 failed on rank 1: "
                                             "OSError: storage unreachable"}  # fmt: skip
    store = JobStore(Bucket.folder(root / "bucket"), "", "j1")
    latest, refused = find_latest(store, KEY.public)
    assert latest is not None and latest.step == 5 and refused == ["step-000000006: no COMMITTED.json: cut off "
                                                                    "before its commit"]  # fmt: skip


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
    store = JobStore(Bucket.folder(tmp_path / "bucket"), "jobs/j", "j")
    save_checkpoint(store, 3, first, state=state, recipe_json=RECIPE, me=ONE, scratch=tmp_path / "s", key=KEY, keep=2)
    expected_losses, expected_weights = train(first, BATCHES[3:]), trained_weights(first)

    marker = marker_of(store, 3)
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
    resumed = load_latest(store, second, recipe_json=RECIPE, me=ONE, scratch=tmp_path / "s", key=KEY.public).state
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
