"""The model a job trains: loaded from the offline model store, then made full, LoRA, DoRA or QLoRA.

Loading is local-only and safetensors-only (:data:`finetune.offline.LOAD_KWARGS`). Weights load
in the training precision (bf16 on CUDA, fp32 on CPU unless the recipe says otherwise) with an
attention implementation that keeps packed documents apart (:mod:`finetune.data.packing`).

* ``full``: every parameter trains.
* ``lora``: peft LoRA adapters (DoRA with ``dora: true``) on every linear projection of the
  family (``q/k/v/o_proj``, ``gate/up/down_proj`` for Llama; ``qkv_proj``/``gate_up_proj`` for
  Phi-3...), never on the LM head or the embeddings, unless the recipe lists modules itself.
* ``qlora``: the same adapters over a bitsandbytes 4-bit copy of the weights. It needs CUDA and
  the ``gpu`` extra; without them the job stops before anything is loaded.

Gradient checkpointing recomputes each decoder layer in the backward pass (non-reentrant
``torch.utils.checkpoint``); transformers then makes the embedding output require grad so
that gradients reach adapters whose inputs come from frozen layers.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError, Issue, RecipeError
from finetune.offline import LOAD_KWARGS
from finetune.recipe import LoraMethod, Recipe

logger = logging.getLogger(__name__)

GPU_EXTRA = "pip install 'finetune[gpu]'"


class MethodUnavailableError(FinetuneError):
    """The recipe's method cannot run here (QLoRA without CUDA or without bitsandbytes)."""


def resolve_precision(recipe: Recipe, cuda: bool) -> torch.dtype:
    """The dtype the weights train in.

    ``auto`` is bf16 on CUDA and fp32 on CPU (where bf16 matrix products are slow on most
    processors and DeepSpeed's bf16 path gains nothing). An explicit ``bf16`` is honoured on CPU
    too (it is how bf16 numerics are checked without a GPU), and ``fp32`` on CUDA.

    Args:
        recipe: The job's recipe (``training.precision``).
        cuda: Whether training runs on CUDA GPUs.

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.
    """
    precision = recipe.training.precision
    if precision == "bf16":
        if not cuda:
            logger.warning("training in bf16 on CPU, as the recipe asks: expect it to be slow")
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    return torch.bfloat16 if cuda else torch.float32


def check_method_available(recipe: Recipe, *, cuda: bool) -> None:
    """Stop a job whose method cannot run here, before anything is loaded.

    Raises:
        MethodUnavailableError: QLoRA without CUDA, or without bitsandbytes installed.
    """
    if recipe.method.type != "qlora":
        return
    if not cuda:
        raise MethodUnavailableError(
            "QLoRA needs a CUDA GPU: bitsandbytes 4-bit weights do not run on CPU. "
            "Use method 'lora' (or 'full') here, or run the job on a GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodUnavailableError(f"QLoRA needs bitsandbytes, which is not installed: {GPU_EXTRA}")


def attention_implementation(config: Any, *, cuda: bool, packing: bool) -> str:
    """The attention implementation for a model config.

    Packed rows use :func:`finetune.data.packing.packed_attn_implementation` (SDPA or eager on
    CPU, variable-length flash or flex attention on CUDA). Unpacked, padded batches use SDPA,
    except for models with attention logit soft-capping (Gemma 2), which SDPA cannot do: eager on
    CPU, flex attention on CUDA.
    """
    from finetune.data.packing import packed_attn_implementation

    if packing:
        return packed_attn_implementation("cuda" if cuda else "cpu", config)
    if getattr(config, "attn_logit_softcapping", None):
        return "flex_attention" if cuda else "eager"
    return "sdpa"


def build_model(
    recipe: Recipe,
    model_dir: Path,
    *,
    cuda: bool,
    attn_implementation: str | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Load the recipe's model from a local folder and prepare it for its method.

    Args:
        recipe: The job's recipe (method, precision, gradient checkpointing, packing).
        model_dir: The model folder (Hugging Face layout, safetensors weights).
        cuda: Whether training runs on CUDA GPUs. The model is returned on CPU except for QLoRA,
            whose 4-bit weights are quantised straight onto the current CUDA device; DeepSpeed
            moves the others.
        attn_implementation: Overrides the choice of :func:`attention_implementation`.
        zero3_config: The DeepSpeed config, when it is ZeRO-3: weights are then partitioned
            across the processes while they load (``deepspeed.zero.Init`` through transformers'
            ``HfDeepSpeedConfig``), so no process ever holds the whole model. Needs the process
            group to exist already. Ignored for QLoRA.

    Returns:
        The model (a ``peft.PeftModel`` for LoRA and QLoRA), in training mode.

    Raises:
        MethodUnavailableError: QLoRA without CUDA or bitsandbytes (before any loading).
        RecipeError: Listed LoRA target modules that the model does not have.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_method_available(recipe, cuda=cuda)
    dtype = resolve_precision(recipe, cuda)
    if attn_implementation is None:
        config = AutoConfig.from_pretrained(str(model_dir), **LOAD_KWARGS)
        attn_implementation = attention_implementation(config, cuda=cuda, packing=recipe.data.packing)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation, "use_safetensors": True}
    method = recipe.method
    keep_alive = None
    if method.type == "qlora":
        kwargs["quantization_config"] = quantization_config(method, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # read by from_pretrained through a weak reference
    logger.info("loading %s (%s, %s attention, method %s)", model_dir, dtype, attn_implementation, method.type)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **LOAD_KWARGS, **kwargs)
    model.config.use_cache = False
    if method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the 4-bit weights and upcasts the rest; checkpointing is switched on below instead.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if isinstance(method, LoraMethod):
        model = add_adapters(model, method)
    else:
        model.requires_grad_(True)
    if keep_alive is not None:
        model._finetune_hf_deepspeed_config = keep_alive  # transformers consults it while the model lives
    model.train()
    total, trainable = count_parameters(model)
    logger.info("model ready: %d parameters, %d trainable (%.2f%%)", total, trainable, 100 * trainable / total)
    return model


def quantization_config(method: Any, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes 4-bit settings of a QLoRA method (``transformers.BitsAndBytesConfig``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant checkpointing).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable``; older 5.x releases only have the first.
    """
    settings = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def linear_targets(model: torch.nn.Module) -> list[str]:
    """Names of the model's linear projections, as LoRA targets: every ``nn.Linear`` but the LM head.

    Short names (``q_proj``) are returned, as peft matches them against the end of module
    paths; should the LM head share a short name with another projection, full paths are
    returned instead so that the head stays out.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    full = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    short = {n.rsplit(".", 1)[-1] for n in full}
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if head is not None and m is head}
    return sorted(full) if short & head_names else sorted(short)


def add_adapters(model: Any, method: LoraMethod) -> Any:
    from peft import LoraConfig, get_peft_model

    if method.target_modules == "all-linear":
        targets = linear_targets(model)
    else:
        targets = list(method.target_modules)
        _check_targets(model, targets)
    config = LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        use_dora=method.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    logger.info("%s adapters of rank %d on %s", "DoRA" if method.dora else "LoRA", method.rank, ", ".join(targets))
    return get_peft_model(model, config)


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise RecipeError(
            [
                Issue(
                    "method.target_modules",
                    f"this model has no module named {', '.join(missing)}",
                    hint=f"its linear projections are {', '.join(linear_targets(model))}, or use 'all-linear'",
                )
            ]
        )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """All and trainable parameters, whole even when ZeRO-3 has partitioned them.

    A ZeRO-3 parameter keeps its full size in ``ds_numel``; a bitsandbytes 4-bit parameter
    packs two weights per byte of storage.

    Returns:
        ``(total, trainable)``.
    """
    total = trainable = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", None) or param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return total, trainable


#: Parameters the Hugging Face Trainer exempts from weight decay (``get_decay_parameter_names``):
#: biases and normalisation weights.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups as the HF Trainer makes them: biases and norms undecayed."""
    exempt: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, torch.nn.LayerNorm) or _NO_DECAY.search(full.lower()):
                exempt.add(id(param))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # an empty group upsets ZeRO
