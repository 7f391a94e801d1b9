"""The job's ``final/`` folder: the trained adapter or full weights, the tokenizer, stop tokens.

It loads with plain ``transformers`` (full) or ``peft`` (adapter), from safetensors, and its
``generation_config.json`` stops at the family's end-of-turn token as well as EOS, so a chat
model trained here stops where it should. The folder is written under a temporary name and
renamed into place: it is complete or absent.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _full_state_dict(module: Any, stage: int, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The module's state dict on the main worker, gathered from every worker under ZeRO-3."""
    if stage != 3:
        return None
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                state[name] = param.detach().cpu().clone()
    if is_main:
        saved = module.state_dict().keys()  # persistent buffers only: not rotary inv_freq and the like
        for name, buf in module.named_buffers():
            if name in saved:
                state.setdefault(name, buf.detach().cpu().clone())
    return state


def stop_token_ids(tokenizer: Any, eot: str | None) -> list[int]:
    """EOS and the end-of-turn token, as ids, without duplicates."""
    ids = [tokenizer.eos_token_id]
    if eot:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(eot_id, int) and eot_id != tokenizer.unk_token_id:
            ids.append(eot_id)
    return [i for i in dict.fromkeys(ids) if i is not None]


def save_final(engine: Any, tokenizer: Any, dest: Path, *, stage: int, is_main: bool, eot: str | None) -> Path | None:
    """Write ``dest`` from the trained engine; every worker calls it (ZeRO-3 gathers collectively).

    Returns ``dest`` on the main worker, None elsewhere.
    """
    module = engine.module
    state = _full_state_dict(module, stage, is_main)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not is_main:
        return None
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None and hasattr(module, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(module, state_dict=state)
    module.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    config = getattr(module, "generation_config", None)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    config = getattr(base, "generation_config", config)
    if config is not None:
        config.eos_token_id = stop_token_ids(tokenizer, eot)
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    logger.info("final model written to %s", dest)
    return dest
