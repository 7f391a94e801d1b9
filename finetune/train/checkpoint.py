"""Training checkpoints of a DeepSpeed engine: save every rank's state, commit once, resume exactly.

:func:`save_checkpoint` is collective (every rank calls it): each rank has DeepSpeed write its
share into a temporary folder and adds its RNG states; rank 0 adds the trainer state and the
resolved recipe, then commits the folder (marker with digests written last, atomic rename; the
protocol and its crash windows are described in :mod:`finetune.train.checkpoint_files`) and
tells every rank the outcome. Old checkpoints are pruned only after the new one is committed.

What a checkpoint folder holds::

    deepspeed/mp_rank_00_model_states.pt       module weights (trainable only for adapters),
                                               DeepSpeed counters, and the optimizer when not ZeRO
    deepspeed/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO: rank r's optimizer shard
    deepspeed/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: rank r's model states
    zero_to_fp32.py, zero_to_torch.py          DeepSpeed's recovery scripts (ZeRO; never run)
    rng/rank-<r>.safetensors                   python, numpy, torch CPU and CUDA RNG states
    trainer_state.json                         the loop's state, verbatim (JSON)
    recipe.json                                the resolved recipe
    COMMITTED.json                             the marker, written last

DeepSpeed's own ``latest`` file is not written (``save_latest=False``); the newest complete
checkpoint is found from the markers (:func:`finetune.train.checkpoint_files.find_latest`).

Pickle: DeepSpeed writes its files with ``torch.save`` and reads them back with
``torch.load(weights_only=False)``, i.e. pickle. The rule "only ``.safetensors`` weights are ever
read" is about models that come from outside. These files are ones this engine wrote into its own
job folder, and before any of them is loaded rank 0 checks every file's sha256 against the marker
written with them, so the bytes unpickled are the bytes we pickled. Everything we add ourselves
(RNG states, trainer state, recipe) is safetensors or JSON. Never resume from a checkpoint folder
that a tenant could have written to (for instance one copied back from a tenant bucket): the
digests prove integrity, not origin.

Resuming on another number of workers: the model-states file of ZeRO-0/1/2 is whole, but the
optimizer state of ZeRO-1/2/3 is sharded per worker, and DeepSpeed refuses to re-partition it. So
a ZeRO-0 checkpoint resumes on any number of workers (with a warning: batches and dropout masks
then differ from the uninterrupted run), and a ZeRO-1/2/3 one stops with a :class:`CheckpointError`
saying how many workers to resume with. A change of ZeRO stage or of method is refused the same way.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.train.checkpoint_files import (
    CheckpointError,
    CheckpointInfo,
    checkpoints_root,
    find_latest,
    prune,
    read_marker,
    remove_folder,
    step_dir,
    tmp_dir,
    verify,
    write_committed,
    write_json_atomic,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "ResumeState",
    "find_latest",
    "load_latest",
    "prune",
    "resume_problem",
    "save_checkpoint",
    "verify",
    "write_committed",
]

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.json"
RECIPE = "recipe.json"
T = TypeVar("T")


@dataclass(frozen=True)
class ResumeState:
    """Where a resumed run continues from; the engine's own state is already restored.

    Attributes:
        step: Optimizer steps already taken.
        epoch: The epoch recorded with the checkpoint (None when the loop did not give one).
        data_position: The loop's data position, as it gave it.
        trainer_state: The loop's state dict, exactly as it was passed to :func:`save_checkpoint`.
        recipe: The resolved recipe the checkpoint was written under.
        path: The checkpoint folder resumed from.
    """

    step: int
    epoch: float | int | None
    data_position: dict[str, Any]
    trainer_state: dict[str, Any]
    recipe: dict[str, Any]
    path: Path


# ----------------------------------------------------------------------------- collectives
def _active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _on_rank0(fn: Callable[[], T], rank: int, active: bool) -> T:
    """Run ``fn`` on rank 0 and hand its result (or its failure) to every rank."""
    if rank != 0 and not active:
        raise CheckpointError(f"rank {rank} called a checkpoint collective without an initialised process group")
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            outcome = [("ok", fn())]
        except Exception as exc:
            if active:
                dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
    if active:
        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise CheckpointError(f"rank 0 failed: {value}")
    return value


# ----------------------------------------------------------------------------- RNG states
def save_rng(path: Path) -> None:
    """Write this process's python, numpy, torch CPU and current-CUDA-device RNG states as safetensors.

    Only the current CUDA device is saved: each worker trains on one device, and touching the
    others would create a CUDA context on every visible GPU.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    tensors = {
        "python": torch.tensor(internal, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state().cpu()
    meta = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_cached)]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def restore_rng(path: Path) -> None:
    """Restore the RNG states written by :func:`save_rng` (no pickle involved)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    np_name, np_pos, np_has_gauss, np_cached = json.loads(meta["numpy"])
    np_keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((np_name, np_keys, np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    elif "torch_cuda" in tensors or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        logger.warning("CUDA RNG state not restored: the checkpoint and this process disagree on CUDA")


def rng_name(rank: int) -> str:
    return f"rng/rank-{rank:05d}.safetensors"


# ----------------------------------------------------------------------------- engine helpers
def _frozen_names(engine: Any) -> set[str]:
    return {name for name, p in engine.module.named_parameters() if not p.requires_grad}


def _method(recipe_json: dict[str, Any]) -> str | None:
    method = recipe_json.get("method")
    return method.get("type") if isinstance(method, dict) else method if isinstance(method, str) else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _json_safe(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be JSON-serialisable: {exc}") from None


# ----------------------------------------------------------------------------- saving
def _prepare(job_dir: Path, step: int) -> str | None:
    """Rank 0: the temporary folder's name, or None when ``step`` is already committed."""
    final = step_dir(job_dir, step)
    if final.exists():
        problems = verify(final, digests=False)
        if not problems:
            logger.info("checkpoint of step %d already committed: %s", step, final)
            return None
        logger.warning("removing incomplete %s before writing it again: %s", final, "; ".join(problems))
        remove_folder(final)
    tmp = tmp_dir(job_dir, step, str(os.getpid()))
    if tmp.exists():
        remove_folder(tmp)
    tmp.mkdir(parents=True)
    return tmp.name


def save_checkpoint(
    job_dir: Path,
    step: int,
    engine: Any,
    *,
    state: dict[str, Any],
    recipe_json: dict[str, Any],
    rank: int,
    world_size: int,
    keep: int | None = None,
) -> Path:
    """Write and commit a checkpoint of ``step``. Collective: every rank must call it.

    Args:
        job_dir: The job folder; checkpoints go to ``<job_dir>/checkpoints``.
        step: Optimizer steps taken so far.
        engine: The DeepSpeed engine (``save_checkpoint``, ``zero_optimization_stage``, ``module``).
        state: The loop's state (JSON-safe); saved verbatim as ``trainer_state.json``. Its
            ``epoch`` and ``data_position`` keys, when present, are copied into the marker.
        recipe_json: The resolved recipe (JSON-safe).
        rank: This process's global rank.
        world_size: Number of workers.
        keep: When given, prune to this many complete checkpoints after the commit.

    Returns:
        The committed folder (on every rank, once rank 0 has committed it).

    Raises:
        CheckpointError: The state is not JSON-safe, or rank 0 failed to commit (on the other
            ranks; rank 0 raises its original error, an ``OSError`` for instance).
    """
    job_dir = Path(job_dir)
    _json_safe(state, "the trainer state")
    _json_safe(recipe_json, "the recipe")
    active = _active(world_size)
    final = step_dir(job_dir, step)
    name = _on_rank0(lambda: _prepare(job_dir, step), rank, active)
    if name is None:
        return final
    tmp = checkpoints_root(job_dir) / name
    frozen = bool(_frozen_names(engine))
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=frozen)
    save_rng(tmp / rng_name(rank))
    if active:
        dist.barrier()
    meta = {
        "step": step,
        "epoch": state.get("epoch"),
        "data_position": state.get("data_position", {"step": step}),
        "world_size": world_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "method": _method(recipe_json),
        "frozen_excluded": frozen,
        "deepspeed_tag": DS_TAG,
        "versions": {"deepspeed": _version("deepspeed"), "torch": torch.__version__},
    }

    def commit() -> None:
        write_json_atomic(tmp / TRAINER_STATE, state)
        write_json_atomic(tmp / RECIPE, recipe_json)
        write_committed(tmp, final, meta)

    _on_rank0(commit, rank, active)
    if keep is not None and rank == 0:
        try:
            prune(job_dir, keep)
        except OSError as exc:  # the new checkpoint is committed: a failed cleanup must not stop training
            logger.warning("pruning old checkpoints failed: %s", exc)
    return final


# ----------------------------------------------------------------------------- resuming
def resume_problem(info: CheckpointInfo, *, world_size: int, zero_stage: int, frozen: bool) -> str | None:
    """Why ``info`` cannot be resumed by this run, or None when it can.

    Args:
        info: The checkpoint.
        world_size: Workers in this run.
        zero_stage: This engine's ZeRO stage.
        frozen: Whether this engine has frozen parameters (adapter methods).
    """
    name, was = info.path.name, info.world_size
    if bool(info.marker.get("frozen_excluded")) != frozen:
        kind = "an adapter run (frozen base weights not saved)" if not frozen else "a run training every weight"
        return f"checkpoint {name} was written by {kind}; this run's method differs: resume with the same method"
    if info.zero_stage != zero_stage:
        return (
            f"checkpoint {name} was written with ZeRO stage {info.zero_stage}, this run uses stage {zero_stage}: "
            f"pin ZeRO stage {info.zero_stage} in the recipe to resume from it"
        )
    if was != world_size and zero_stage > 0:
        return (
            f"checkpoint {name} was written by {was} worker(s) with ZeRO stage {zero_stage}, whose optimizer state "
            f"is sharded per worker; this run has {world_size}. Resume with {was} worker(s): re-partitioning the "
            "optimizer state (DeepSpeed universal checkpoints) is not supported by this engine"
        )
    return None


def _choose(job_dir: Path) -> str | None:
    info = find_latest(job_dir, digests=True)
    return info.path.name if info else None


def _strict_except_frozen(frozen: set[str]) -> Callable[..., None]:
    """A DeepSpeed ``custom_load_fn`` loading a state dict that lacks exactly the frozen weights."""

    def load(src: dict[str, Any], dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        if missing or result.unexpected_keys:
            unexpected = result.unexpected_keys[:5]
            raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}, extra {unexpected}")

    return load


def _load_engine(engine: Any, info: CheckpointInfo) -> None:
    frozen = _frozen_names(engine)
    tag = str(info.marker.get("deepspeed_tag", DS_TAG))
    load_path, _ = engine.load_checkpoint(
        str(info.path),
        tag=tag,
        load_module_strict=not frozen,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        custom_load_fn=_strict_except_frozen(frozen) if frozen else None,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {info.path / tag}")


def load_latest(job_dir: Path, engine: Any, *, world_size: int, rank: int | None = None) -> ResumeState | None:
    """Restore the newest complete checkpoint into ``engine`` and this process. Collective.

    Rank 0 chooses the checkpoint and verifies every file's digest; the other ranks check the
    marker and file sizes of the one it chose. Incomplete or damaged checkpoints are skipped with
    a warning naming why.

    Args:
        job_dir: The job folder.
        engine: A freshly built DeepSpeed engine of the same model, method and ZeRO stage.
        world_size: Workers in this run.
        rank: This process's global rank (default: from the process group, else 0).

    Returns:
        Where to continue from, or None when there is no complete checkpoint (start afresh).

    Raises:
        CheckpointError: The checkpoint cannot be resumed by this run (and what to do instead).
    """
    job_dir = Path(job_dir)
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    name = _on_rank0(lambda: _choose(job_dir), rank, _active(world_size))
    if name is None:
        logger.info("no complete checkpoint under %s: starting from step 0", checkpoints_root(job_dir))
        return None
    path = checkpoints_root(job_dir) / name
    if rank != 0 and (problems := verify(path, digests=False)):
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    marker = read_marker(path)
    info = CheckpointInfo(path=path, step=int(marker["step"]), marker=marker)
    zero_stage, frozen = int(engine.zero_optimization_stage()), bool(_frozen_names(engine))
    if problem := resume_problem(info, world_size=world_size, zero_stage=zero_stage, frozen=frozen):
        raise CheckpointError(problem)
    if info.world_size != world_size:
        logger.warning(
            "resuming %s, written by %d worker(s), on %d: weights and optimizer state are exact, but batches "
            "and dropout masks will differ from the uninterrupted run",
            name, info.world_size, world_size,
        )  # fmt: skip
    _load_engine(engine, info)
    rng = path / rng_name(rank)
    if rng.is_file():
        restore_rng(rng)
    else:
        logger.warning("%s has no RNG state for rank %d: this rank keeps its current RNG", name, rank)
    logger.info("resumed from %s (step %d)", path, info.step)
    return ResumeState(
        step=info.step,
        epoch=marker.get("epoch"),
        data_position=dict(marker.get("data_position") or {}),
        trainer_state=json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")),
        recipe=json.loads((path / RECIPE).read_text(encoding="utf-8")),
        path=path,
    )
