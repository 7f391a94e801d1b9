"""DeepSpeed ZeRO: how much GPU memory a job needs, which stage it gets, and the engine's config.

Everything here is a pure function of numbers (no torch, no DeepSpeed import), so the policy is
easy to test and to explain in a job's log.

**Memory model** (per GPU, bytes; ``P`` parameters, ``T`` of them trainable, ``N`` GPUs):

* weights: ``P * weight_bytes``, divided by ``N`` under ZeRO-3, which also holds the gathered
  weights of about two layers at a time (the one computing and the one prefetched);
  under ZeRO-3 with ``offload: all`` only that working set stays on the GPU.
* gradients: ``T * g`` with ``g`` = 2 (16-bit training) or 4 (fp32), divided by ``N`` under
  ZeRO-2/3; moved to host memory with the optimizer under offload (ZeRO-Offload keeps the
  gradient partitions beside the optimizer states).
* optimizer (AdamW): fp32 master weights and two fp32 moments, ``T * 12`` with 16-bit weights,
  ``T * 8`` with fp32 weights (the weights are the master copy); divided by ``N`` under
  ZeRO-2/3; moved to host memory by offload. Full fine-tuning in bf16 without sharding therefore
  costs 2 + 2 + 12 = 16 bytes a parameter (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", section 3.1).
* activations, from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", section 4.1, equation 1: a transformer layer keeps
  ``s*b*h*(34 + 5*a*s/h)`` bytes of 16-bit activations for ``b`` sequences of ``s`` tokens and
  hidden size ``h``. With SDPA or flash attention the attention scores are never stored, which
  drops the ``5*a*s/h`` term: ``34*s*b*h`` a layer. With full recomputation (gradient
  checkpointing) only each layer's input is kept, ``2*s*b*h`` a layer, plus one layer being
  recomputed (``34*s*b*h``). fp32 activations double the figures. The LM head adds its logits:
  16-bit logits, their fp32 copy for the loss and the fp32 log-softmax kept for backward, about
  10 bytes a logit (8 in fp32), ``b*s*V`` logits for vocabulary ``V``. The paper's layer has a
  4h-wide GELU MLP; a SwiGLU layer of the usual width keeps a little more, so this is an
  estimate, not a bound.

Not counted: the CUDA context, DeepSpeed's communication buckets and allocator fragmentation,
typically 1-4 GiB, which is why a stage "fits" only within :data:`FIT_FRACTION` of the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.errors import Issue, RecipeError

if TYPE_CHECKING:
    from finetune.recipe import Recipe

logger = logging.getLogger(__name__)

GiB = 1024**3
#: Share of a GPU's memory an estimate may use and still count as fitting; the rest covers what
#: the estimate leaves out (CUDA context, communication buckets, fragmentation).
FIT_FRACTION = 0.9
OFFLOADS = ("none", "optimizer", "all")
#: DeepSpeed's own progress lines are off: our loop logs (it prints when ``step % this == 0``).
STEPS_PER_PRINT_OFF = 2**62


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per GPU (and per process in host memory), by kind.

    Attributes:
        weights: Model weights held on the GPU.
        gradients: Gradients of the trainable parameters held on the GPU.
        optimizer: AdamW master weights and moments held on the GPU.
        activations: Activations kept for the backward pass, logits included.
        host: Bytes this process moves to host memory by offloading.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    host: int = 0

    @property
    def total(self) -> int:
        """GPU bytes in all."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        """One line for a log: each part and the total, in GiB."""
        parts = (
            f"weights {_gib(self.weights)}, gradients {_gib(self.gradients)}, optimizer {_gib(self.optimizer)}, "
            f"activations {_gib(self.activations)}: {_gib(self.total)} per GPU"
        )
        return parts + (f" (+{_gib(self.host)} host memory)" if self.host else "")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def activation_bytes(
    *,
    micro_batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    grad_checkpointing: bool,
    vocab: int = 0,
    dtype_bytes: int = 2,
) -> int:
    """Activations kept for backward (Korthikanti et al. 2022, eq. 1, without attention scores).

    Args:
        micro_batch: Sequences per forward pass.
        seq_len: Tokens per sequence.
        hidden: Hidden size.
        layers: Transformer layers.
        grad_checkpointing: Full recomputation of each layer in the backward pass.
        vocab: Vocabulary size (0 leaves the logits out).
        dtype_bytes: Bytes of an activation element (2 for bf16, 4 for fp32).

    Returns:
        Bytes.
    """
    sbh = micro_batch * seq_len * hidden
    scale = dtype_bytes / 2  # the paper's figures are for 16-bit activations
    if grad_checkpointing:
        layer_bytes = 2 * sbh * layers + 34 * sbh  # layer inputs, plus the layer being recomputed
    else:
        layer_bytes = 34 * sbh * layers
    logit_bytes = (8 if dtype_bytes >= 4 else dtype_bytes + 8) * micro_batch * seq_len * vocab
    return int(layer_bytes * scale + logit_bytes)


def estimate_memory(
    *,
    params: int,
    trainable: int,
    gpus: int,
    stage: int,
    offload: str,
    weight_bytes: float,
    grad_checkpointing: bool,
    micro_batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    vocab: int = 0,
) -> MemoryEstimate:
    """Per-GPU memory of a training job (the model is in the module docstring).

    Args:
        params: All parameters of the model.
        trainable: Parameters that train (all of them for full fine-tuning, the adapters for LoRA).
        gpus: Data-parallel processes, one per GPU.
        stage: ZeRO stage: 0, 1, 2 or 3.
        offload: ``none``, ``optimizer`` (states and gradients to host memory) or ``all``
            (weights too; ZeRO-3 only).
        weight_bytes: Bytes per stored weight: 2 (bf16), 4 (fp32), about 0.5 for 4-bit QLoRA.
        grad_checkpointing: Whether layers are recomputed in the backward pass.
        micro_batch: Sequences per GPU per forward pass.
        seq_len: Tokens per sequence.
        hidden: Hidden size.
        layers: Transformer layers.
        vocab: Vocabulary size, for the logits (0 leaves them out).

    Returns:
        The estimate.
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    full_precision = weight_bytes >= 4
    grad_bytes = 4 if full_precision else 2  # adapters of a 4-bit model train in 16 bits too
    opt_bytes = 8 if full_precision else 12
    shard_states = gpus if stage >= 1 else 1
    shard_grads = gpus if stage >= 2 else 1
    weights = params * weight_bytes
    host = 0.0
    if stage >= 3:
        working_set = 2 * params / max(layers, 1) * weight_bytes
        if offload == "all":
            host += weights / gpus
            weights = working_set
        else:
            weights = weights / gpus + working_set
    gradients = trainable * grad_bytes / shard_grads
    optimizer = trainable * opt_bytes / shard_states
    if offload != "none":
        host += gradients + optimizer
        gradients, optimizer = 0.0, 0.0
    acts = activation_bytes(
        micro_batch=micro_batch,
        seq_len=seq_len,
        hidden=hidden,
        layers=layers,
        grad_checkpointing=grad_checkpointing,
        vocab=vocab,
        dtype_bytes=4 if full_precision else 2,
    )
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), acts, int(host))


def stage_estimator(**shape: Any) -> Callable[[int], MemoryEstimate]:
    """``estimate(stage)`` for :func:`choose_zero_stage`: :func:`estimate_memory` with all else bound.

    Args:
        **shape: Every keyword argument of :func:`estimate_memory` except ``stage``.
    """

    def estimate(stage: int) -> MemoryEstimate:
        return estimate_memory(stage=stage, **shape)

    return estimate


def weight_bytes_for(method: str, bf16: bool) -> float:
    """Bytes per stored weight: 2 (bf16) or 4 (fp32); QLoRA's NF4 with double quantisation ~0.52.

    4-bit weights take half a byte, plus one 8-bit scale per 64 weights and one fp32 scale per
    256 of those (Dettmers et al. 2023, "QLoRA", section 3). The embeddings and the LM head stay
    in 16 bits, so this is low for small models with large vocabularies.
    """
    if method == "qlora":
        return 0.5 + 1 / 64 + 4 / (64 * 256)
    return 2 if bf16 else 4


def offload_issues(stage: int | str, offload: str) -> list[Issue]:
    """Combinations of a pinned ZeRO stage and offload that DeepSpeed cannot run.

    Optimizer offload needs ZeRO-1 or more (it moves the optimizer's partitions); parameter
    offload (``all``) needs ZeRO-3.
    """
    if stage == "auto" or offload == "none" or (stage == 3) or (offload == "optimizer" and stage != 0):
        return []
    if offload == "all":
        message, hint = f"'all' (parameters too) needs ZeRO stage 3, not {stage}", "or offload 'optimizer'"
    else:
        message, hint = "'optimizer' needs ZeRO stage 2 or 3, not 0", "or 2"
    return [Issue("resources.offload", message, hint=f"set resources.zero_stage to 3 or 'auto', {hint}")]


def choose_zero_stage(
    recipe_stage: int | str,
    method: str,
    estimate: Callable[[int], MemoryEstimate],
    *,
    gpu_memory_bytes: int | None,
    gpus: int,
    offload: str = "none",
) -> tuple[int, str]:
    """The ZeRO stage of a job, and why (for the job's log).

    Rules, in order:

    * a pinned stage (``resources.zero_stage`` 0, 2 or 3) is used as it is; the reason warns
      when the estimate says it will not fit;
    * ``offload: all`` needs ZeRO-3; ``offload: optimizer`` at least ZeRO-2;
    * on CPU (``gpu_memory_bytes`` None) there is no device memory to save: 0 for one
      process, 2 for several (it shards gradients and optimizer states across them with the same
      communication volume as plain data parallelism, and never gathers parameters);
    * one GPU without offload: 0 when it fits (ZeRO has nothing to shard across one GPU);
    * several GPUs: 2 when it fits, else 3 when that fits. ZeRO-2's reduce-scatter plus
      all-gather moves as many bytes as data parallelism's all-reduce (Rajbhandari et al. 2020,
      section 7), so it is preferred to 0 for full fine-tuning as well as for LoRA; LoRA or QLoRA
      on a model that fits never gets ZeRO-3, which costs speed for nothing there;
    * nothing fits: 3, with a reason that recommends offload (or more GPUs, or LoRA).

    Args:
        recipe_stage: ``resources.zero_stage``: ``"auto"``, 0, 2 or 3.
        method: ``full``, ``lora`` or ``qlora`` (only used in the reason).
        estimate: Per-GPU memory estimate of a stage (:func:`stage_estimator`).
        gpu_memory_bytes: Memory of one GPU; None on CPU.
        gpus: Data-parallel processes.
        offload: ``resources.offload``.

    Returns:
        The stage and the reason.

    Raises:
        RecipeError: The pinned stage cannot run the requested offload.
    """
    issues = offload_issues(recipe_stage, offload)
    if issues:
        raise RecipeError(issues, "the ZeRO stage and the offload setting do not go together")
    budget = None if gpu_memory_bytes is None else int(gpu_memory_bytes * FIT_FRACTION)
    if recipe_stage != "auto":
        return _pinned(int(recipe_stage), estimate, budget)
    if offload == "all":
        return 3, "offload 'all' moves parameters to host memory, which needs ZeRO-3"
    if budget is None:
        stage = 2 if gpus > 1 or offload == "optimizer" else 0
        return stage, f"CPU run with {gpus} process(es): ZeRO-{stage} (no device memory to save)"
    if offload == "optimizer":
        candidates = [2] if gpus == 1 else [2, 3]
    else:
        candidates = [0] if gpus == 1 else [2, 3]
    for stage in candidates:
        needed = estimate(stage)
        if needed.total <= budget:
            return stage, _fits_reason(stage, method, gpus, offload, needed, budget)
    needed = estimate(3)
    return 3, (
        f"{method} does not fit at any ZeRO stage on {gpus} GPU(s) of {_gib(gpu_memory_bytes or 0)} "
        f"(ZeRO-3: {needed.describe()}; budget {_gib(budget)}): set resources.offload "
        f"{'all' if offload == 'optimizer' else 'optimizer (or all)'}, use more GPUs, "
        "or train with method lora/qlora; expect out of memory as it is"
    )


def _pinned(stage: int, estimate: Callable[[int], MemoryEstimate], budget: int | None) -> tuple[int, str]:
    reason = f"ZeRO-{stage} pinned by resources.zero_stage"
    if budget is not None:
        needed = estimate(stage)
        if needed.total > budget:
            reason += (
                f"; warning: the estimate ({needed.describe()}) exceeds the budget of {_gib(budget)}, "
                "expect out of memory (try resources.zero_stage 'auto', offload, or a smaller micro batch)"
            )
    return stage, reason


def _fits_reason(stage: int, method: str, gpus: int, offload: str, needed: MemoryEstimate, budget: int) -> str:
    if offload != "none" and gpus == 1:
        why = "the smallest stage that offloads the optimizer"
    else:
        why = {
            0: "one GPU: ZeRO has nothing to shard",
            2: "shards gradients and optimizer states at data parallelism's communication cost",
            3: "ZeRO-2 does not fit; ZeRO-3 also shards the weights",
        }[stage]
    return f"ZeRO-{stage} for {method} on {gpus} GPU(s): {why} ({needed.describe()}; budget {_gib(budget)})"


def choose_stage_for(
    recipe: Recipe,
    model: Any,
    *,
    world_size: int,
    cuda: bool,
    seq_len: int,
    gpu_memory_bytes: int | None = None,
) -> tuple[int, str]:
    """:func:`choose_zero_stage` for a recipe and its built model (shape and counts read from it).

    Args:
        recipe: The job's recipe (method, micro batch, checkpointing, ZeRO stage, offload).
        model: The model from :func:`finetune.train.model.build_model`.
        world_size: Data-parallel processes, one per GPU.
        cuda: Whether training runs on CUDA GPUs.
        seq_len: Tokens per training row.
        gpu_memory_bytes: Memory of one GPU; by default the current CUDA device's (None on CPU).

    Returns:
        The stage and the reason.
    """
    import torch

    from finetune.train.model import count_parameters

    if cuda and gpu_memory_bytes is None:
        gpu_memory_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    config = model.config.get_text_config()
    total, trainable = count_parameters(model)
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    estimate = stage_estimator(
        params=total,
        trainable=trainable,
        gpus=world_size,
        offload=recipe.resources.offload,
        weight_bytes=weight_bytes_for(recipe.method.type, bf16),
        grad_checkpointing=recipe.training.gradient_checkpointing,
        micro_batch=recipe.training.micro_batch_size,
        seq_len=seq_len,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
    )
    return choose_zero_stage(
        recipe.resources.zero_stage,
        recipe.method.type,
        estimate,
        gpu_memory_bytes=gpu_memory_bytes if cuda else None,
        gpus=world_size,
        offload=recipe.resources.offload,
    )


def deepspeed_config(
    *,
    stage: int,
    offload: str,
    micro_batch: int,
    grad_accum: int,
    max_grad_norm: float,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    bf16: bool,
    cuda: bool,
) -> dict[str, Any]:
    """The DeepSpeed config of a job (keys as DeepSpeed 0.19's config parser reads them).

    No learning-rate scheduler is configured: our loop sets the rate each step. The optimizer is
    AdamW: on CUDA, DeepSpeed's fused Adam (``torch_adam: false``), or DeepSpeedCPUAdam when the
    optimizer is offloaded (DeepSpeed picks it for ``offload_optimizer``); on CPU, ``torch.optim.AdamW``
    (``torch_adam: true``), and offload is ignored (the states already live in host memory).

    Args:
        stage: ZeRO stage, 0 to 3.
        offload: ``none``, ``optimizer`` or ``all`` (``all`` needs stage 3, ``optimizer`` stage 1+).
        micro_batch: Sequences per GPU per forward pass.
        grad_accum: Micro batches per optimizer step.
        max_grad_norm: Gradient clipping norm.
        lr: Initial learning rate (the loop overrides it every step).
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        bf16: Train in bf16 (fp32 master weights in the optimizer).
        cuda: Whether the engine runs on CUDA GPUs.

    Returns:
        The config dict, for ``deepspeed.initialize(config=...)``.

    Raises:
        ValueError: An unknown offload, or one the stage cannot run.
    """
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if cuda and offload_issues(stage, offload):
        raise ValueError(str(offload_issues(stage, offload)[0]))
    if not cuda and offload != "none":
        logger.info("offload %r ignored on CPU: the optimizer states already live in host memory", offload)
        offload = "none"
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=cuda)
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "torch_adam": not cuda,
            },
        },
        "bf16": {"enabled": bf16},
        "steps_per_print": STEPS_PER_PRINT_OFF,
        "wall_clock_breakdown": False,
    }


def oom_message(stage: int, micro_batch: int, grad_checkpointing: bool, offload: str) -> str:
    """What to tell a tenant whose job ran out of GPU memory: the knobs, the next thing first.

    Args:
        stage: The ZeRO stage the job ran with.
        micro_batch: ``training.micro_batch_size`` of the job.
        grad_checkpointing: ``training.gradient_checkpointing`` of the job.
        offload: ``resources.offload`` of the job.

    Returns:
        The message, one line.
    """
    steps = []
    if micro_batch > 1:
        steps.append(f"reduce training.micro_batch_size (now {micro_batch}; gradient accumulation keeps the step size)")
    if not grad_checkpointing:
        steps.append("turn on training.gradient_checkpointing")
    if stage < 3:
        steps.append(f"use resources.zero_stage 3 (now {stage}) with more than one GPU")
    if offload == "none":
        steps.append("set resources.offload optimizer")
    elif offload == "optimizer":
        steps.append("set resources.offload all")
    steps.append("shorten data.max_seq_len, or train with method lora or qlora")
    tried = f"micro batch {micro_batch}, gradient checkpointing {'on' if grad_checkpointing else 'off'}, "
    tried += f"ZeRO stage {stage}, offload {offload}"
    return f"out of GPU memory ({tried}). Try, in this order: " + "; ".join(steps) + "."
