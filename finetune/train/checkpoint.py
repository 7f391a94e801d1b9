"""Training checkpoints of a DeepSpeed engine: every rank writes locally, uploads, rank 0 commits.

:func:`save_checkpoint` is collective (every rank calls it): each rank has DeepSpeed write its
share into its own node-local scratch folder, adds its RNG states, and uploads its files into the
job's store; rank 0 adds the trainer state and the resolved recipe, and once every rank's upload
is listed in the bucket with its size, writes the signed manifest (``COMMITTED.json``) last
(protocol and crash windows: :mod:`finetune.train.checkpoint_files`). Old checkpoints are pruned
only after the new one is committed.

:func:`load_latest` is collective too: rank 0 picks the newest checkpoint whose signed manifest
checks out; every rank downloads the files it needs into its own scratch folder, each checked
against its digest while it is written; only when every rank has all its files intact does
DeepSpeed read them, with torch's restricted unpickler (:mod:`finetune.train.safe_load`). A
refused checkpoint is named with the reason and the next older one is tried.

What a checkpoint holds::

    deepspeed/mp_rank_00_model_states.pt       module weights (trainable only for adapters),
                                               DeepSpeed counters, and the optimizer when not ZeRO
    deepspeed/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO: rank r's optimizer shard
    deepspeed/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: rank r's model states
    zero_to_fp32.py                            DeepSpeed's recovery script (never fetched, never run)
    rng/rank-<r>.safetensors                   python, numpy, torch CPU and CUDA RNG states
    trainer_state.json                         the loop's state, verbatim (JSON)
    recipe.json                                the resolved recipe
    COMMITTED.json                             the signed manifest, written last

Resuming on another number of workers: the model-states file of ZeRO-0/1/2 is whole, but the
optimizer state of ZeRO-1/2/3 is sharded per worker, and DeepSpeed refuses to re-partition it. So
a ZeRO-0 checkpoint resumes on any number of workers (with a warning: batches and dropout masks
then differ from the uninterrupted run), and a ZeRO-1/2/3 one stops with a :class:`CheckpointError`
saying how many workers to resume with. A change of ZeRO stage or of method is refused the same way.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.files import write_json_atomic
from finetune.jobstore import JobStore
from finetune.published import FolderRefused, commit_folder, fetch_folder, remove_folder, upload_files
from finetune.signing import SigningKey, VerifyKey
from finetune.train.checkpoint_files import (
    CheckpointError,
    CheckpointInfo,
    check_checkpoint,
    checkpoint_path,
    find_latest,
    prune,
    recipe_digest,
    step_name,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Resumed",
    "ResumeState",
    "SavedCheckpoint",
    "find_latest",
    "load_latest",
    "prune",
    "resume_problem",
    "save_checkpoint",
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
        name: The checkpoint resumed from.
    """

    step: int
    epoch: float | int | None
    data_position: dict[str, Any]
    trainer_state: dict[str, Any]
    recipe: dict[str, Any]
    name: str


@dataclass(frozen=True)
class Resumed:
    """What :func:`load_latest` found: the state resumed (None: start afresh) and what it refused."""

    state: ResumeState | None
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint just committed (or found already committed)."""

    name: str
    files: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Rank:
    """This process in the checkpoint collectives."""

    rank: int
    world_size: int

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- collectives
def _on_rank0(fn: Callable[[], T], me: Rank) -> T:
    """Run ``fn`` on rank 0 and hand its result (or its failure) to every rank."""
    if me.rank != 0 and not me.active:
        raise CheckpointError(f"rank {me.rank} called a checkpoint collective without an initialised process group")
    outcome: list[Any] = [None]
    if me.rank == 0:
        try:
            outcome = [("ok", fn())]
        except Exception as exc:
            if me.active:
                dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
    if me.active:
        dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise CheckpointError(f"rank 0 failed: {value}")
    return value


def _everyone(fn: Callable[[], T], me: Rank) -> list[tuple[str, Any]]:
    """Run ``fn`` on every rank without letting one rank's failure hang the others.

    Returns every rank's ``("ok", result)`` or ``("error", message)``, in rank order.
    """
    try:
        mine: tuple[str, Any] = ("ok", fn())
    except Exception as exc:
        logger.warning("rank %d: %s: %s", me.rank, type(exc).__name__, exc)
        mine = ("error", f"{type(exc).__name__}: {exc}")
    if not me.active:
        return [mine]
    gathered: list[Any] = [None] * me.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _raise_failures(results: list[tuple[str, Any]], what: str) -> None:
    failed = [f"rank {r}: {value}" for r, (status, value) in enumerate(results) if status == "error"]
    if failed:
        raise CheckpointError(f"{what} failed on {'; '.join(failed)}")


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
def _prepare(store: JobStore, step: int, key: VerifyKey) -> bool:
    """Rank 0: False when ``step`` is already committed; else removes any leftover of it."""
    name = step_name(step)
    if store.bucket.exists(checkpoint_path(store, name)):
        try:
            check_checkpoint(store, name, key)
            logger.info("checkpoint %s already committed", name)
            return False
        except FolderRefused as exc:
            logger.warning("removing the leftover %s before writing it again: %s", name, exc)
            remove_folder(store.bucket, checkpoint_path(store, name))
    return True


def _write_local(local: Path, engine: Any, me: Rank, state: dict[str, Any], recipe_json: dict[str, Any]) -> None:
    """This rank's files of the checkpoint, in its own scratch folder."""
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    frozen = bool(_frozen_names(engine))
    engine.save_checkpoint(str(local), tag=DS_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=frozen)
    for script in local.glob("*.py"):  # DeepSpeed's recovery scripts: never run, so never published
        script.unlink()
    save_rng(local / rng_name(me.rank))
    if me.rank == 0:
        write_json_atomic(local / TRAINER_STATE, state)
        write_json_atomic(local / RECIPE, recipe_json)


def save_checkpoint(
    store: JobStore,
    step: int,
    engine: Any,
    *,
    state: dict[str, Any],
    recipe_json: dict[str, Any],
    me: Rank,
    scratch: Path,
    key: SigningKey,
    keep: int | None = None,
) -> SavedCheckpoint:
    """Write, upload and commit the checkpoint of ``step``. Collective: every rank must call it.

    Args:
        store: The job's store; checkpoints go to ``<prefix>/checkpoints``.
        step: Optimizer steps taken so far.
        engine: The DeepSpeed engine (``save_checkpoint``, ``zero_optimization_stage``, ``module``).
        state: The loop's state (JSON-safe); saved verbatim as ``trainer_state.json``. Its
            ``epoch`` and ``data_position`` keys, when present, are copied into the manifest.
        recipe_json: The resolved recipe (JSON-safe).
        me: This process's rank and the number of workers.
        scratch: This rank's own node-local scratch folder.
        key: The platform key that signs the manifest.
        keep: When given, prune to this many complete checkpoints after the commit.

    Returns:
        The committed checkpoint (on every rank, once rank 0 has committed it).

    Raises:
        CheckpointError: The state is not JSON-safe, or a rank failed to write or upload its
            files, or rank 0 failed to commit (every rank raises).
    """
    _json_safe(state, "the trainer state")
    _json_safe(recipe_json, "the recipe")
    started = time.monotonic()
    name = step_name(step)
    if not _on_rank0(lambda: _prepare(store, step, key.public), me):
        return SavedCheckpoint(name, 0, 0, 0.0)
    local = scratch / f"checkpoint-{name}"
    rel = checkpoint_path(store, name)

    _write_local(local, engine, me, state, recipe_json)  # DeepSpeed's save holds collectives of its own

    def upload() -> dict[str, dict[str, Any]]:
        try:
            return upload_files(store.bucket, local, rel, move=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    uploads = _everyone(upload, me)
    _raise_failures(uploads, f"checkpoint {name}")
    meta = {
        "job_id": store.job_id,
        "recipe_sha256": recipe_digest(recipe_json),
        "step": step,
        "epoch": state.get("epoch"),
        "data_position": state.get("data_position", {"step": step}),
        "world_size": me.world_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "method": _method(recipe_json),
        "frozen_excluded": bool(_frozen_names(engine)),
        "deepspeed_tag": DS_TAG,
        "versions": {"deepspeed": _version("deepspeed"), "torch": torch.__version__},
    }

    def commit() -> SavedCheckpoint:
        files: dict[str, dict[str, Any]] = {}
        for rank, (_status, entries) in enumerate(uploads):
            if clash := sorted(set(files) & set(entries)):
                raise CheckpointError(f"rank {rank} uploaded files another rank did too: {clash[:3]}")
            files.update(entries)
        commit_folder(store.bucket, rel, "checkpoint", files, meta, key)
        size = sum(int(e["size"]) for e in files.values())
        return SavedCheckpoint(name, len(files), size, round(time.monotonic() - started, 3))

    saved = _on_rank0(commit, me)
    if keep is not None and me.rank == 0:
        try:
            prune(store, keep, key.public)
        except Exception as exc:  # the new checkpoint is committed: a failed cleanup must not stop training
            logger.warning("pruning old checkpoints failed: %s", exc)
    return saved


# ----------------------------------------------------------------------------- resuming
def resume_problem(info: CheckpointInfo, *, world_size: int, zero_stage: int, frozen: bool) -> str | None:
    """Why ``info`` cannot be resumed by this run, or None when it can.

    Args:
        info: The checkpoint.
        world_size: Workers in this run.
        zero_stage: This engine's ZeRO stage.
        frozen: Whether this engine has frozen parameters (adapter methods).
    """
    name, was = info.name, info.world_size
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


_OWN_ONLY = (
    re.compile(r"^rng/rank-(\d+)\.safetensors$"),
    re.compile(r"^deepspeed/zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$"),
)


def needed_by(rank: int) -> Callable[[str], bool]:
    """Which files of a checkpoint a rank fetches: its own RNG state and ZeRO-3 model states, the
    optimizer shards of every rank (DeepSpeed reads them all), the shared files; never scripts."""

    def wanted(name: str) -> bool:
        if name.endswith(".py"):
            return False
        for pattern in _OWN_ONLY:
            if match := pattern.match(name):
                return int(match.group(1)) == rank
        return True

    return wanted


def _strict_except_frozen(frozen: set[str]) -> Callable[..., None]:
    """A DeepSpeed ``custom_load_fn`` loading a state dict that lacks exactly the frozen weights."""

    def load(src: dict[str, Any], dst: torch.nn.Module) -> None:
        result = dst.load_state_dict(src, strict=False)
        missing = sorted(set(result.missing_keys) - frozen)
        if missing or result.unexpected_keys:
            unexpected = result.unexpected_keys[:5]
            raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}, extra {unexpected}")

    return load


def _load_engine(engine: Any, local: Path, info: CheckpointInfo) -> None:
    from finetune.train.safe_load import restricted_deepspeed_loads

    frozen = _frozen_names(engine)
    tag = str(info.marker.get("deepspeed_tag", DS_TAG))
    with restricted_deepspeed_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(local),
            tag=tag,
            load_module_strict=not frozen,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=_strict_except_frozen(frozen) if frozen else None,
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {info.name}/{tag}")


def _choose(store: JobStore, key: VerifyKey, recipe: str, refused: list[str]) -> CheckpointInfo | None:
    passed_over = tuple(r.split(":", 1)[0] for r in refused)
    info, newly = find_latest(store, key, recipe=recipe, passed_over=passed_over)
    refused.extend(newly)
    return info


def _fetch(store: JobStore, info: CheckpointInfo, local: Path, rank: int) -> None:
    if local.exists():
        shutil.rmtree(local)
    fetch_folder(store.bucket, checkpoint_path(store, info.name), info.marker, local, wanted=needed_by(rank))


def load_latest(
    store: JobStore, engine: Any, *, recipe_json: dict[str, Any], me: Rank, scratch: Path, key: VerifyKey
) -> Resumed:
    """Restore the newest trustworthy checkpoint into ``engine`` and this process. Collective.

    Args:
        store: The job's store.
        engine: A freshly built DeepSpeed engine of the same model, method and ZeRO stage.
        recipe_json: The job's resolved recipe: checkpoints written under another are passed over.
        me: This process's rank and the number of workers.
        scratch: This rank's own node-local scratch folder.
        key: The platform's public key.

    Returns:
        The state to continue from (None: no trustworthy checkpoint, start afresh), and every
        checkpoint refused on the way with the reason (``"NAME: why"``).

    Raises:
        CheckpointError: The checkpoint cannot be resumed by this run (and what to do instead),
            or a rank could not reach the store.
    """
    refused: list[str] = []
    local, recipe = scratch / "resume", recipe_digest(recipe_json)
    while True:
        chosen = _on_rank0(lambda: _choose(store, key, recipe, refused), me)
        if me.active:  # every rank reports the same refusals
            box: list[Any] = [refused]
            dist.broadcast_object_list(box, src=0)
            refused[:] = list(box[0])
        if chosen is None:
            logger.info("no trustworthy checkpoint in %s: starting from step 0", store.describe("checkpoints"))
            return Resumed(None, refused)
        results = _everyone(lambda: _fetch(store, chosen, local, me.rank), me)  # noqa: B023
        problems = [f"{value} (rank {r})" for r, (status, value) in enumerate(results) if status == "error"]
        if not problems:
            break
        shutil.rmtree(local, ignore_errors=True)
        refused.append(f"{chosen.name}: {'; '.join(problems)}")
        logger.warning("refusing checkpoint %s: %s", chosen.name, "; ".join(problems))
    try:
        return Resumed(_restore(engine, local, chosen, me), refused)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _restore(engine: Any, local: Path, info: CheckpointInfo, me: Rank) -> ResumeState:
    zero_stage, frozen = int(engine.zero_optimization_stage()), bool(_frozen_names(engine))
    if problem := resume_problem(info, world_size=me.world_size, zero_stage=zero_stage, frozen=frozen):
        raise CheckpointError(problem)
    if info.world_size != me.world_size:
        logger.warning(
            "resuming %s, written by %d worker(s), on %d: weights and optimizer state are exact, but batches "
            "and dropout masks will differ from the uninterrupted run",
            info.name, info.world_size, me.world_size,
        )  # fmt: skip
    _load_engine(engine, local, info)
    rng = local / rng_name(me.rank)
    if rng.is_file():
        restore_rng(rng)
    else:
        logger.warning("%s has no RNG state for rank %d: this rank keeps its current RNG", info.name, me.rank)
    logger.info("resumed from %s (step %d)", info.name, info.step)
    marker = info.marker
    return ResumeState(
        step=info.step,
        epoch=marker.get("epoch"),
        data_position=dict(marker.get("data_position") or {}),
        trainer_state=json.loads((local / TRAINER_STATE).read_text(encoding="utf-8")),
        recipe=json.loads((local / RECIPE).read_text(encoding="utf-8")),
        name=info.name,
    )
