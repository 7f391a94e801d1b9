"""Read DeepSpeed checkpoint files with torch's restricted unpickler, never with full pickle.

DeepSpeed writes its checkpoint files with ``torch.save`` and reads them back with
``torch.load(weights_only=False)``: unpickling such a file can run any code it names. The sha256
digests in a checkpoint's marker prove the bytes are the ones written, not who wrote them, so
every DeepSpeed file this engine reads goes through :func:`restricted_load` instead: tensors,
plain containers and the few DeepSpeed data classes listed in :data:`DEEPSPEED_SAFE_GLOBALS`, and
nothing else. Any other global fails the load with :class:`UnsafeCheckpointError` before it is called.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from finetune.train.checkpoint_files import CheckpointError

__all__ = [
    "DEEPSPEED_SAFE_GLOBALS",
    "RestrictedTorchCheckpointEngine",
    "UnsafeCheckpointError",
    "restricted_deepspeed_loads",
    "restricted_load",
    "restricted_zero_to_fp32_loads",
]

logger = logging.getLogger(__name__)

#: The globals, beyond torch's own ``weights_only`` allowlist (tensors, storages, ``OrderedDict``,
#: ``torch.Size``...), that DeepSpeed 0.19 writes into the checkpoints this engine makes: ZeRO
#: stages 0, 2 and 3, full fine-tuning and LoRA, fp32 and bf16 (found with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint``; ZeRO-0 files and every model-states
#: file need none). Each is a plain data class or enum of DeepSpeed's: rebuilding one looks up an
#: enum member, or runs DeepSpeed's own ``__init__``/``__new__`` and fills the instance's
#: ``__dict__``, and only with values the restricted unpickler itself can build, so no code the
#: file's author chose runs. ``DynamicLossScaler`` is left out on purpose: only fp16 runs save it,
#: and no recipe can ask for fp16.
DEEPSPEED_SAFE_GLOBALS: list[Any] = [
    # ZeRO-2/3 optimizer shards: the stage, an ``int`` enum (``zero_stage``).
    ZeroStageEnum,
    # ZeRO-2/3 optimizer shards: the static loss scaler (scale 1.0 in bf16 and fp32); its
    # ``__init__`` only sets attributes.
    LossScaler,
    # ZeRO-2 optimizer shards: each parameter's slice of the flat partition (``param_slice_mappings``),
    # a dataclass of two integers.
    fragment_address,
]

# torch.serialization.safe_globals adds to and removes from one process-wide set; a lock keeps
# two of our loads in different threads from removing the globals under each other.
_LOCK = threading.Lock()


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names something the restricted unpickler does not allow; nothing of it ran."""


def _refusal(path: object, exc: Exception) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"the global {found.group(1)}" if found else "a construct the restricted unpickler does not allow"
    allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in DEEPSPEED_SAFE_GLOBALS)
    return UnsafeCheckpointError(
        f"refused to load {path}: it names {what}. A DeepSpeed checkpoint may hold only tensors, plain "
        f"containers and {allowed}; this file was not written by this engine's training, or DeepSpeed's "
        "format changed (then extend DEEPSPEED_SAFE_GLOBALS after reviewing the new class)"
    )


def restricted_load(path: str | os.PathLike[str], map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing :data:`DEEPSPEED_SAFE_GLOBALS` too.

    Args:
        path: The file, as written by ``torch.save``.
        map_location: Where tensors go, as for ``torch.load`` (a device, a string or a function).
        mmap: Map the file's storages instead of reading them (zip-format files only).

    Returns:
        The unpickled object.

    Raises:
        UnsafeCheckpointError: The file names a global outside torch's allowlist and ours, or
            calls something the restricted unpickler forbids; nothing it names was called.
    """
    with _LOCK, torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise _refusal(path, exc) from exc


class RestrictedTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading through :func:`restricted_load` (saving unchanged)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        logger.debug("restricted load of %s", path)
        return restricted_load(path, map_location=map_location)

    @classmethod
    def like(cls, original: TorchCheckpointEngine) -> RestrictedTorchCheckpointEngine:
        """A copy of ``original``'s settings, without running (and logging) the constructor again."""
        engine = cls.__new__(cls)
        engine.__dict__.update(vars(original))
        return engine


class _TorchWithRestrictedLoad:
    """Stands for the ``torch`` module inside ``zero_to_fp32``: torch's every attribute but ``load``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, *, weights_only: bool | None = None, mmap: bool | None = None) -> Any:
        # zero_to_fp32 asks for weights_only=False; the restricted unpickler is used whatever it asks.
        return restricted_load(f, map_location=map_location, mmap=bool(mmap))


@contextmanager
def restricted_zero_to_fp32_loads() -> Iterator[None]:
    """Make ``deepspeed.utils.zero_to_fp32`` read checkpoint files with :func:`restricted_load`.

    ``zero_to_fp32`` (``get_fp32_state_dict_from_zero_checkpoint`` and the rest) calls
    ``torch.load`` itself through its module-level name ``torch``; for the duration that name is
    bound to a stand-in whose ``load`` is :func:`restricted_load` and whose other attributes are
    torch's. Only that module is affected, not ``torch.load`` elsewhere in the process. Nests.
    """
    from deepspeed.utils import zero_to_fp32

    previous = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithRestrictedLoad()
    try:
        yield
    finally:
        zero_to_fp32.torch = previous


@contextmanager
def restricted_deepspeed_loads(engine: Any) -> Iterator[None]:
    """Make ``engine.load_checkpoint`` read every file with :func:`restricted_load`.

    For the duration, the engine's checkpoint engine is a :class:`RestrictedTorchCheckpointEngine`
    with the same settings (DeepSpeed reads the model states and the ZeRO optimizer shards through
    it), and ``zero_to_fp32`` is restricted as by :func:`restricted_zero_to_fp32_loads` (ZeRO-3
    consolidates through it when optimizer states are not loaded). The original checkpoint engine
    is put back on exit. Nests.

    Args:
        engine: A ``deepspeed.DeepSpeedEngine``.

    Raises:
        CheckpointError: The engine has another kind of checkpoint engine, or loads universal
            checkpoints (whose ZeRO paths call ``torch.load`` directly): neither could be restricted.
    """
    original = getattr(engine, "checkpoint_engine", None)
    if type(original) not in (TorchCheckpointEngine, RestrictedTorchCheckpointEngine):
        raise CheckpointError(
            f"cannot restrict the loads of DeepSpeed checkpoint engine {type(original).__name__}: "
            "only DeepSpeed's TorchCheckpointEngine is supported"
        )
    universal: Callable[[], bool] | None = getattr(engine, "load_universal_checkpoint", None)
    if universal is not None and universal():
        raise CheckpointError("cannot restrict the loads of a DeepSpeed universal checkpoint: they are not supported")
    if not isinstance(original, RestrictedTorchCheckpointEngine):  # already restricted when nested
        engine.checkpoint_engine = RestrictedTorchCheckpointEngine.like(original)
    try:
        with restricted_zero_to_fp32_loads():
            yield
    finally:
        engine.checkpoint_engine = original
