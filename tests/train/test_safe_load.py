"""DeepSpeed checkpoints read with torch's restricted unpickler: real states restore exactly, code never runs.

The engines are the ones :func:`finetune.train.run.build_engine` makes from a recipe (the tiny
SmolLM2-architecture model on CPU, one gloo process), saved as ``finetune.train.checkpoint`` saves
them and loaded as it loads them, under :func:`restricted_deepspeed_loads`.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.recipe import Recipe
from finetune.train.checkpoint_files import CheckpointError
from finetune.train.loop import Worker
from finetune.train.plan import make_plan
from finetune.train.run import build_engine, close_process_group, init_process_group
from finetune.train.safe_load import (
    DEEPSPEED_SAFE_GLOBALS,
    RestrictedTorchCheckpointEngine,
    UnsafeCheckpointError,
    restricted_deepspeed_loads,
    restricted_load,
    restricted_zero_to_fp32_loads,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_ID = "smollm2-135m-instruct"  # the model_dir fixture of tests/train/conftest.py
TAG = "deepspeed"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BATCHES = [torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]


# ----------------------------------------------------------------------------- helpers
class Evil:
    """Unpickling it runs ``call(*args)``: what a tampered checkpoint would carry."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.call, self.args


def exploits(marker: Path) -> dict[str, Evil]:
    return {"os.system": Evil(os.system, f"touch {marker}"), "open": Evil(open, str(marker), "w")}


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``torch.load`` call made in the test, with its keyword arguments."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append({"file": str(f), **kwargs})
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def snapshot(value: Any) -> Any:
    """A copy of a nested state whose tensors no later training step can change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, snapshot(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return copy.copy(value)


def assert_same(got: Any, expected: Any, where: str = "") -> None:
    """Exact equality of nested states: tensors bit for bit (and dtype), objects by their attributes."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, where
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif hasattr(expected, "__dict__") and not isinstance(expected, type):
        assert type(got) is type(expected), where
        assert_same(vars(got), vars(expected), where)
    else:
        assert got == expected, where


# ----------------------------------------------------------------------------- restricted_load
@dataclass
class Opaque:
    """Plain data, but not on the list: refused all the same."""

    value: int


def test_the_allowlist_is_the_three_deepspeed_data_classes() -> None:
    names = {f"{g.__module__}.{g.__qualname__}" for g in DEEPSPEED_SAFE_GLOBALS}
    assert names == {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }


def test_restricted_load_reads_deepspeed_states_and_leaves_no_global_allowlist(tmp_path: Path) -> None:
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "zero_stage": ZeroStageEnum.gradients,
        "loss_scaler": LossScaler(1.0),
        "param_slice_mappings": [OrderedDict(w=fragment_address(numel=6, start=2))],
        "param_shapes": [OrderedDict(w=torch.Size([2, 3]))],
        "weights": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    }
    torch.save(state, tmp_path / "state.pt")
    assert_same(restricted_load(tmp_path / "state.pt"), state)
    assert restricted_load(tmp_path / "state.pt")["zero_stage"] is ZeroStageEnum.gradients
    assert not set(DEEPSPEED_SAFE_GLOBALS) & set(torch.serialization.get_safe_globals())
    with pytest.raises(pickle.UnpicklingError, match="ZeroStageEnum"):  # not allowed outside restricted_load
        torch.load(tmp_path / "state.pt", weights_only=True)


@pytest.mark.parametrize("kind", ["os.system", "open"])
def test_restricted_load_refuses_code_and_runs_none(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "x": exploits(marker)[kind]}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.pt: it names the global") as info:
        restricted_load(tmp_path / "evil.pt")
    assert ("system" if kind == "os.system" else "open") in str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert not marker.exists()


def test_restricted_load_refuses_unlisted_data_classes(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    for name, value in {"Opaque": Opaque(1), "DynamicLossScaler": DynamicLossScaler(2.0, 1000, 1.0, 2, True)}.items():
        torch.save({"x": value}, tmp_path / "x.pt")
        with pytest.raises(UnsafeCheckpointError, match=name):
            restricted_load(tmp_path / "x.pt")


# ----------------------------------------------------------------------------- the context managers
class FakeEngine:
    """The slice of a DeepSpeed engine the context manager touches."""

    def __init__(self, checkpoint_engine: Any, universal: bool = False) -> None:
        self.checkpoint_engine = checkpoint_engine
        self.universal = universal

    def load_universal_checkpoint(self) -> bool:
        return self.universal


def test_restricted_deepspeed_loads_swaps_and_restores() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    original = TorchCheckpointEngine()
    original.zipfile_serialization = True
    engine = FakeEngine(original)
    with restricted_deepspeed_loads(engine):
        inner = engine.checkpoint_engine
        assert isinstance(inner, RestrictedTorchCheckpointEngine) and inner.zipfile_serialization is True
        assert zero_to_fp32.torch is not torch and zero_to_fp32.torch.float32 is torch.float32
        with restricted_deepspeed_loads(engine):  # nested: the same restricted engine
            assert engine.checkpoint_engine is inner
        assert engine.checkpoint_engine is inner and zero_to_fp32.torch is not torch
    assert engine.checkpoint_engine is original and zero_to_fp32.torch is torch
    with pytest.raises(RuntimeError, match="boom"), restricted_deepspeed_loads(engine):
        raise RuntimeError("boom")
    assert engine.checkpoint_engine is original and zero_to_fp32.torch is torch


def test_restricted_deepspeed_loads_refuses_what_it_cannot_restrict() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Other(TorchCheckpointEngine):
        pass

    for engine, message in [
        (FakeEngine(None), "NoneType"),
        (FakeEngine(Other()), "Other"),
        (FakeEngine(TorchCheckpointEngine(), universal=True), "universal"),
    ]:
        with pytest.raises(CheckpointError, match=message), restricted_deepspeed_loads(engine):
            pytest.fail("entered")
        assert type(engine.checkpoint_engine) is not RestrictedTorchCheckpointEngine


# ----------------------------------------------------------------------------- real DeepSpeed engines
@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """A one-process gloo group, as ``--launcher local`` makes (the environment is put back after)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in DIST_ENV:
            mp.setenv(key, "")
            mp.delenv(key)
        worker, created = init_process_group(cuda=False)
        try:
            yield worker
        finally:
            close_process_group(created)


@pytest.fixture(autouse=True)
def forget_zero3() -> Iterator[None]:
    """A ZeRO-3 build leaves transformers partitioning later loads; stop that after each test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def recipe_for(stage: int, method: str, precision: str) -> Recipe:
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {}
    return Recipe.model_validate(
        {
            "model": {"id": MODEL_ID, "tiny": True},
            "data": {"path": "train.jsonl", "max_seq_len": 64},
            "method": {"type": method, **lora},
            "training": {
                "max_steps": 4,
                "micro_batch_size": 2,
                "learning_rate": 1e-2,
                "precision": precision,
                "gradient_checkpointing": False,
                "seed": 7,
            },
            "resources": {"zero_stage": stage},
        }
    )


def build(recipe: Recipe, model_dir: Path, worker: Worker, seed: int) -> Any:
    plan = make_plan(recipe, rows=8, world_size=1, row_tokens=64)
    torch.manual_seed(seed)
    engine, stage, _ = build_engine(recipe, model_dir, plan, worker, cuda=False)
    assert stage == recipe.resources.zero_stage
    return engine


def step(engine: Any, ids: torch.Tensor) -> float:
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss.detach())


def frozen(engine: Any) -> set[str]:
    return {n for n, p in engine.module.named_parameters() if not p.requires_grad}


def trainable(engine: Any) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in named}


def save(engine: Any, folder: Path) -> None:
    """As ``finetune.train.checkpoint.save_checkpoint`` has DeepSpeed write its share."""
    excluded = bool(frozen(engine))
    engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False, exclude_frozen_parameters=excluded)


def load(engine: Any, folder: Path) -> None:
    """As ``finetune.train.checkpoint._load_engine`` loads, under the restricted loader."""
    names = frozen(engine)

    def strict_except_frozen(src: dict[str, Any], dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        assert not (set(result.missing_keys) - names) and not result.unexpected_keys

    with restricted_deepspeed_loads(engine):
        path, _ = engine.load_checkpoint(
            str(folder),
            tag=TAG,
            load_module_strict=not names,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=strict_except_frozen if names else None,
        )
    assert path is not None


def pt_files(folder: Path) -> set[str]:
    return {p.name for p in (folder / TAG).glob("*.pt")}


CASES = [
    (stage, method, precision) for stage in (0, 2, 3) for method in ("full", "lora") for precision in ("fp32", "bf16")
]


@pytest.mark.integration
@pytest.mark.parametrize(("stage", "method", "precision"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_restricted_load_restores_weights_and_optimizer_exactly(
    tmp_path: Path,
    model_dir: Path,
    worker: Worker,
    torch_loads: list[dict[str, Any]],
    stage: int,
    method: str,
    precision: str,
) -> None:
    recipe = recipe_for(stage, method, precision)
    first = build(recipe, model_dir, worker, seed=0)
    step(first, BATCHES[0])
    save(first, tmp_path)
    saved_weights, saved_optimizer = trainable(first), snapshot(first.optimizer.state_dict())
    next_loss = step(first, BATCHES[1])
    next_weights = trainable(first)

    second = build(recipe, model_dir, worker, seed=1)  # another LoRA init; the base is the model's own
    assert any(not torch.equal(w, saved_weights[n]) for n, w in trainable(second).items())
    torch_loads.clear()
    load(second, tmp_path)
    assert {Path(call["file"]).name for call in torch_loads} == pt_files(tmp_path), "every DeepSpeed file was read"
    assert all(call["weights_only"] is True for call in torch_loads), torch_loads

    assert_same(trainable(second), saved_weights, "weights")
    assert_same(second.optimizer.state_dict(), saved_optimizer, "optimizer")
    assert second.global_steps == 1
    assert step(second, BATCHES[1]) == next_loss
    assert_same(trainable(second), next_weights, "weights after the next step")


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, worker: Worker) -> Path:
    """A real ZeRO-2 full fine-tuning checkpoint (model states and an optimizer shard), written once."""
    folder = tmp_path_factory.mktemp("zero2")
    engine = build(recipe_for(2, "full", "fp32"), model_dir, worker, seed=0)
    step(engine, BATCHES[0])
    save(engine, folder)
    return folder


def tamper(path: Path, evil: Evil) -> None:
    """Rewrite a real DeepSpeed file with an exploit tucked into its state (still a valid torch.save file)."""
    state = restricted_load(path)
    state["client_note"] = evil
    torch.save(state, path)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["os.system", "open"])
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_tampered_checkpoint_file_is_refused_and_runs_nothing(
    tmp_path: Path, zero2_checkpoint: Path, model_dir: Path, worker: Worker, name: str, kind: str
) -> None:
    folder, marker = tmp_path / "checkpoint", tmp_path / "pwned"
    shutil.copytree(zero2_checkpoint, folder)
    tamper(folder / TAG / name, exploits(marker)[kind])
    engine = build(recipe_for(2, "full", "fp32"), model_dir, worker, seed=1)
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load .*{name}: it names the global"):
        load(engine, folder)
    assert not marker.exists(), "the exploit ran"
    assert type(engine.checkpoint_engine) is not RestrictedTorchCheckpointEngine
    torch.load(folder / TAG / name, weights_only=False)  # the control: DeepSpeed's own load runs it
    assert marker.exists()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero_to_fp32_consolidates_a_zero3_checkpoint_under_the_restricted_loader(
    tmp_path: Path, model_dir: Path, worker: Worker, torch_loads: list[dict[str, Any]], method: str
) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = build(recipe_for(3, method, "fp32"), model_dir, worker, seed=0)
    step(engine, BATCHES[0])
    save(engine, tmp_path)
    weights = trainable(engine)
    torch_loads.clear()
    with restricted_zero_to_fp32_loads():  # as finetune.archive.source._checkpoint_state calls it
        state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=TAG)
    assert {Path(call["file"]).name for call in torch_loads} == pt_files(tmp_path)
    assert all(call["weights_only"] is True for call in torch_loads), torch_loads
    assert weights.keys() <= state.keys()
    if method == "lora":
        assert not frozen(engine) & state.keys(), "frozen base weights were not saved"
    for name, weight in weights.items():
        assert torch.equal(state[name], weight), name

    marker = tmp_path / "pwned"
    tamper(tmp_path / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", exploits(marker)["os.system"])
    with pytest.raises(UnsafeCheckpointError, match="posix.system"), restricted_zero_to_fp32_loads():
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=TAG)
    assert not marker.exists()
